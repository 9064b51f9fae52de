//! The migrations install into new and existing databases, are idempotent,
//! work in a named schema and revert cleanly.

mod common;

use diesel::connection::SimpleConnection;
use diesel::sql_types::Text;
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};
use outbox::{Config, Outbox};
use testkit::TestDatabase;

#[derive(QueryableByName)]
struct Catalog {
    #[diesel(sql_type = Text)]
    objects: String,
}

/// Every user object of the database with its shape: schemas, relations,
/// columns with types and defaults, functions with their bodies, comments.
fn catalog(conn: &mut PgConnection) -> String {
    diesel::sql_query(
        r#"SELECT coalesce(string_agg(x, E'\n' ORDER BY x), '') AS objects FROM (
             SELECT 'schema ' || nspname AS x FROM pg_namespace
              WHERE nspname NOT IN ('pg_catalog', 'information_schema') AND nspname NOT LIKE 'pg_toast%' AND nspname NOT LIKE 'pg_temp%'
             UNION ALL
             SELECT 'rel ' || n.nspname || '.' || c.relname || ' ' || c.relkind::text
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'
             UNION ALL
             SELECT 'col ' || n.nspname || '.' || c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
                    || ' ' || a.attnotnull || ' ' || coalesce(pg_get_expr(d.adbin, d.adrelid), '')
               FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
               LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
              WHERE a.attnum > 0 AND NOT a.attisdropped
                AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'
             UNION ALL
             SELECT 'fn ' || n.nspname || '.' || p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ') ' || md5(p.prosrc)
                    || ' ' || coalesce(array_to_string(p.proconfig, ','), '')
               FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
              WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')
             UNION ALL
             SELECT 'comment ' || d.objoid::regclass::text || ' ' || d.objsubid || ' ' || d.description
               FROM pg_description d JOIN pg_class c ON c.oid = d.objoid AND d.classoid = 'pg_class'::regclass
           ) s"#,
    )
    .get_result::<Catalog>(conn)
    .unwrap()
    .objects
}

fn our_objects(catalog: &str) -> Vec<&str> {
    catalog
        .lines()
        .filter(|l| l.contains("outbox_") || l.contains("inbox_"))
        .collect()
}

/// A service's own tables and a function with a name like ours, with data.
const EXISTING_SERVICE: &str = r#"
    CREATE TABLE orders (id bigserial PRIMARY KEY, customer text NOT NULL, total_cents bigint NOT NULL);
    INSERT INTO orders (customer, total_cents) VALUES ('ada', 4200), ('bob', 999);
    CREATE TABLE messages (id int PRIMARY KEY, body text);
    INSERT INTO messages VALUES (1, 'hello');
    CREATE FUNCTION enqueue(x int) RETURNS int LANGUAGE sql AS 'SELECT x + 1';
    CREATE SCHEMA billing;
    CREATE TABLE billing.ledger (id int PRIMARY KEY, amount bigint);
    INSERT INTO billing.ledger VALUES (1, 10);
"#;

#[test]
fn migrate_installs_into_an_empty_database() {
    let db = TestDatabase::new("mig_empty");
    let mut conn = db.connect();
    assert_eq!(outbox::migrate(&mut conn).unwrap(), [1, 2, 3, 4, 5, 6]);
    let catalog = catalog(&mut conn);
    for object in [
        "rel public.outbox_messages r",
        "rel public.outbox_keys r",
        "rel public.outbox_settings r",
        "rel public.inbox_messages r",
        "rel public.inbox_keys r",
        "rel public.outbox_migrations r",
        "rel public.outbox_messages_pending i",
    ] {
        assert!(catalog.contains(object), "missing {object}");
    }
    assert!(catalog.contains("fn public.outbox_enqueue("));
    assert!(
        catalog.contains("comment outbox_messages 3 Events sharing a key"),
        "columns carry comments"
    );
    // And it works: enqueue through the free function on `public`.
    let enqueued = conn
        .transaction(|conn| outbox::enqueue(conn, &common::NewsletterSent { issue: 1 }))
        .unwrap();
    assert_eq!(enqueued.seq, 1);
}

#[test]
fn migrate_twice_changes_nothing() {
    let db = TestDatabase::new("mig_twice");
    let mut conn = db.connect();
    outbox::migrate(&mut conn).unwrap();
    let first = catalog(&mut conn);
    assert!(
        outbox::migrate(&mut conn).unwrap().is_empty(),
        "nothing pending the second time"
    );
    assert_eq!(catalog(&mut conn), first);

    // The plain SQL file is idempotent on its own too, for teams that run it
    // with their own tool (and may run it again), as the file's header says:
    // search_path set to the target schema first.
    conn.batch_execute("SET search_path TO public").unwrap();
    for migration in outbox::migrate::MIGRATIONS {
        conn.batch_execute(migration.up).unwrap();
    }
    assert_eq!(catalog(&mut conn), first);
}

#[test]
fn migrate_on_an_existing_database_leaves_its_objects_and_data_alone() {
    let db = TestDatabase::new("mig_existing");
    let mut conn = db.connect();
    conn.batch_execute(EXISTING_SERVICE).unwrap();
    let before = catalog(&mut conn);

    outbox::migrate(&mut conn).unwrap();

    let after = catalog(&mut conn);
    for line in before.lines() {
        assert!(after.contains(line), "migration changed or removed: {line}");
    }
    let added: Vec<&str> = after
        .lines()
        .filter(|l| !before.contains(l))
        .filter(|l| !l.starts_with("comment "))
        .collect();
    assert!(
        added
            .iter()
            .all(|l| l.contains("outbox_") || l.contains("inbox_")),
        "migration created objects outside its own names: {added:?}"
    );
    #[derive(QueryableByName)]
    struct Sum {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        total: i64,
    }
    let sum: Sum = diesel::sql_query("SELECT sum(total_cents)::bigint AS total FROM orders")
        .get_result(&mut conn)
        .unwrap();
    assert_eq!(sum.total, 5199, "existing data untouched");
}

#[test]
fn revert_restores_the_starting_state() {
    let db = TestDatabase::new("mig_down");
    let mut conn = db.connect();
    conn.batch_execute(EXISTING_SERVICE).unwrap();
    let before = catalog(&mut conn);

    outbox::migrate(&mut conn).unwrap();
    assert_ne!(catalog(&mut conn), before);
    assert_eq!(
        Outbox::default().revert_migrations(&mut conn).unwrap(),
        [6, 5, 4, 3, 2, 1]
    );

    assert_eq!(catalog(&mut conn), before);
    assert!(
        Outbox::default()
            .revert_migrations(&mut conn)
            .unwrap()
            .is_empty(),
        "reverting again is harmless"
    );
}

#[test]
fn migrate_into_a_named_schema_leaves_public_alone_and_enqueue_finds_it() {
    let db = TestDatabase::new("mig_schema");
    let mut conn = db.connect();
    conn.batch_execute(EXISTING_SERVICE).unwrap();
    let outbox = Outbox::new(Config {
        schema: "messaging".into(),
        ..Config::default()
    })
    .unwrap();

    assert_eq!(outbox.migrate(&mut conn).unwrap(), [1, 2, 3, 4, 5, 6]);

    let catalog = catalog(&mut conn);
    let ours = our_objects(&catalog);
    assert!(!ours.is_empty());
    for line in &ours {
        assert!(
            line.contains("messaging.") || line.starts_with("comment "),
            "object outside the schema: {line}"
        );
    }
    // The connection's search_path is still public; enqueue goes to messaging.
    let enqueued = conn
        .transaction(|conn| outbox.enqueue(conn, &common::NewsletterSent { issue: 1 }))
        .unwrap();
    conn.batch_execute("SET search_path TO messaging").unwrap();
    assert_eq!(common::rows(&mut conn)[0].id, enqueued.id);

    conn.batch_execute("SET search_path TO public").unwrap();
    outbox.revert_migrations(&mut conn).unwrap();
    assert!(our_objects(&self::catalog(&mut conn)).is_empty());
}

#[test]
fn concurrent_migrations_apply_once() {
    let db = TestDatabase::new("mig_race");
    let outbox = Outbox::new(Config {
        schema: "svc".into(),
        ..Config::default()
    })
    .unwrap();
    let applied: Vec<Vec<i32>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|_| scope.spawn(|| outbox.migrate(&mut db.connect()).unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut all: Vec<i32> = applied.into_iter().flatten().collect();
    all.sort();
    assert_eq!(
        all,
        [1, 2, 3, 4, 5, 6],
        "exactly one caller applied each migration"
    );
}

#[test]
fn bad_schema_names_are_refused_before_touching_the_database() {
    let err = Outbox::new(Config {
        schema: "svc; DROP TABLE orders".into(),
        ..Config::default()
    })
    .unwrap_err();
    assert!(err.to_string().contains("schema"), "{err}");
}

/// Each migration's down undoes exactly its up, also one that changes
/// objects an earlier one created (00003 replaces `outbox_enqueue` and adds
/// columns): the catalog after the earlier ones is restored byte for byte.
#[test]
fn each_down_restores_the_catalog_its_up_found() {
    let db = TestDatabase::new("mig_each_down");
    let mut conn = db.connect();
    conn.batch_execute("SET search_path TO public").unwrap();
    for migration in outbox::migrate::MIGRATIONS {
        let before = catalog(&mut conn);
        conn.batch_execute(migration.up).unwrap();
        assert_ne!(
            catalog(&mut conn),
            before,
            "{} changes something",
            migration.name
        );
        conn.batch_execute(migration.down).unwrap();
        assert_eq!(
            catalog(&mut conn),
            before,
            "migration {} ({}) down leaves what its up found",
            migration.version,
            migration.name
        );
        conn.batch_execute(migration.up).unwrap();
    }
}
