//! Least privilege, end to end: with only the grants of `docs/grants.sql`
//! and the RabbitMQ permissions of `docs/PRIVILEGES.md`, a producer
//! enqueues, the relay ships (and its admin commands work), the consumer
//! applies, dead-letters and replays, and each of them is refused what is
//! not its job.
//!
//! The schema is migrated by its owner (the test server's superuser); the
//! three database roles are made with `CREATE ROLE .. LOGIN` and granted by
//! running `docs/grants.sql` with `psql`; the two broker users are made with
//! `rabbitmqctl`. The roles log in without a password: the test server
//! trusts TCP connections from 127.0.0.1 (`scripts/services.sh`). Roles,
//! users and broker objects are removed at the end, also when the test
//! fails ([`Cleanup`]).

use std::process::Command;
use std::time::{Duration, Instant};

use consumer::{Consumer, ConsumerConfig, Envelope, HandlerError, HandlerResult};
use diesel::connection::SimpleConnection;
use diesel::sql_types::{BigInt, Text};
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Confirmation, ConnectionProperties, ExchangeKind};
use outbox::{Message, Outbox};
use relay::{Relay, RelayConfig, RetryPolicy, Selection, Store};
use serde::Deserialize;
use testkit::TestSchema;
use testkit::amqp::TestTopology;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How long any one thing the test waits for may take.
const WAIT: Duration = Duration::from_secs(30);

// The RabbitMQ permissions, exactly as docs/PRIVILEGES.md gives them.

/// The relay's (configure, write, read): write on the producers' exchanges,
/// nothing else. Publisher confirms and `mandatory` need no permission.
fn relay_permissions(exchanges: &[&str]) -> [String; 3] {
    [
        "^$".to_owned(),
        format!("^({})$", alternatives(exchanges)),
        "^$".to_owned(),
    ]
}

/// Consumer `name`'s (configure, write, read), binding from `exchanges`
/// (and declaring them: `declare_exchanges`, the default).
fn consumer_permissions(name: &str, exchanges: &[&str]) -> [String; 3] {
    let n = escape(name);
    let x = alternatives(exchanges);
    [
        format!(r"^({n}|{n}\.(slots|unslotted|dead-letters|partitions|[0-9]+)|{x})$"),
        format!(r"^({n}|{n}\.(slots|unslotted|[0-9]+)|amq\.default)$"),
        format!(r"^({n}|{n}\.(slots|unslotted|dead-letters|[0-9]+)|{x})$"),
    ]
}

/// `a|b|c`, each name matched literally.
fn alternatives(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| escape(n))
        .collect::<Vec<_>>()
        .join("|")
}

/// `name` as a regular expression matching just itself.
fn escape(name: &str) -> String {
    name.chars()
        .flat_map(|c| {
            let special = !(c.is_ascii_alphanumeric() || c == '_');
            special.then_some('\\').into_iter().chain([c])
        })
        .collect()
}

/// What the test's consumer handles.
#[derive(Debug, Deserialize)]
struct Ev {
    n: i64,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct Outcome {
    #[diesel(sql_type = Text)]
    outcome: String,
}

/// Everything the test makes outside its schema, removed on drop: database
/// roles, broker users, broker queues and exchanges.
#[derive(Default)]
struct Cleanup {
    roles: Vec<String>,
    users: Vec<String>,
    queues: Vec<String>,
    exchanges: Vec<String>,
}

impl Cleanup {
    /// A new login role, with no privileges yet.
    fn role(&mut self, prefix: &str) -> String {
        let role = testkit::unique_name(prefix);
        testkit::connect(&testkit::database_url())
            .batch_execute(&format!(r#"CREATE ROLE "{role}" LOGIN"#))
            .expect("create role");
        self.roles.push(role.clone());
        role
    }

    /// New broker users, each with its permissions on the test's vhost;
    /// returns their passwords. In parallel: every `rabbitmqctl` call takes
    /// about a second.
    fn users(&mut self, users: &[(&str, [String; 3])]) -> Vec<String> {
        let passwords: Vec<String> = users
            .iter()
            .map(|_| Uuid::now_v7().simple().to_string())
            .collect();
        rabbitmqctl_all(
            users
                .iter()
                .zip(&passwords)
                .map(|((user, _), password)| vec!["add_user", *user, password.as_str()])
                .collect(),
        );
        self.users.extend(users.iter().map(|u| u.0.to_owned()));
        let vhost = vhost();
        rabbitmqctl_all(
            users
                .iter()
                .map(|(user, [configure, write, read])| {
                    vec![
                        "set_permissions",
                        "-p",
                        vhost.as_str(),
                        *user,
                        configure.as_str(),
                        write.as_str(),
                        read.as_str(),
                    ]
                })
                .collect(),
        );
        passwords
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        // The broker objects, on a thread and runtime of its own: this may
        // run inside the test's runtime, which cannot be blocked on.
        let (queues, exchanges) = (self.queues.clone(), self.exchanges.clone());
        let deleted = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async {
                let url = testkit::amqp::amqp_url();
                let connection =
                    lapin::Connection::connect(&url, ConnectionProperties::default()).await?;
                let channel = connection.create_channel().await?;
                for queue in &queues {
                    let _ = channel
                        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                        .await;
                }
                for exchange in &exchanges {
                    let _ = channel
                        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                        .await;
                }
                let _ = connection.close(200, "cleaned up".into()).await;
                Ok::<(), lapin::Error>(())
            })
        })
        .join();
        if !matches!(deleted, Ok(Ok(()))) {
            eprintln!("could not delete the test's broker objects: {deleted:?}");
        }
        if !self.users.is_empty() {
            rabbitmqctl_all(
                self.users
                    .iter()
                    .map(|user| vec!["delete_user", user.as_str()])
                    .collect(),
            );
        }
        // DROP OWNED BY takes the role's grants away (in this database, the
        // only one where it has any), so DROP ROLE can go.
        match PgConnection::establish(&testkit::database_url()) {
            Ok(mut conn) => {
                for role in &self.roles {
                    if let Err(e) = conn.batch_execute(&format!(
                        r#"DROP OWNED BY "{role}"; DROP ROLE IF EXISTS "{role}""#
                    )) {
                        eprintln!("could not drop role {role}: {e}");
                    }
                }
            }
            Err(e) => eprintln!("could not drop the test's roles {:?}: {e}", self.roles),
        }
    }
}

/// Runs `rabbitmqctl` once per argument list, all at once; panics (unless
/// already panicking) when one fails.
fn rabbitmqctl_all(calls: Vec<Vec<&str>>) {
    let children: Vec<_> = calls
        .iter()
        .map(|args| {
            let child = Command::new("rabbitmqctl")
                .args(args)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("rabbitmqctl (the tests run beside the broker)");
            (args, child)
        })
        .collect();
    for (args, child) in children {
        let out = child.wait_with_output().expect("rabbitmqctl ran");
        if !out.status.success() && !std::thread::panicking() {
            panic!(
                "rabbitmqctl {}: {}{}",
                args[0],
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// The vhost of the test broker's URL (`%2f`, the default vhost `/`).
fn vhost() -> String {
    let url = testkit::amqp::amqp_url();
    let after_scheme = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
    match after_scheme.split_once('/') {
        Some((_, path)) if !path.is_empty() => path
            .split('?')
            .next()
            .unwrap_or(path)
            .replace("%2f", "/")
            .replace("%2F", "/"),
        _ => "/".to_owned(),
    }
}

/// The test database's URL, logging in as `role` (no password: trust auth).
fn database_url_as(role: &str) -> String {
    let url = testkit::database_url();
    let (scheme, rest) = url.split_once("://").expect("DATABASE_URL has a scheme");
    let host = rest.split_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}://{role}@{host}")
}

/// The test broker's URL, logging in as `user`.
fn amqp_url_as(user: &str, password: &str) -> String {
    let url = testkit::amqp::amqp_url();
    let (scheme, rest) = url.split_once("://").expect("AMQP_URL has a scheme");
    let host = rest.split_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}://{user}:{password}@{host}")
}

/// A connection as `role` with `search_path` set to `schema`.
fn connect_as(role: &str, schema: &str) -> PgConnection {
    let mut conn = testkit::connect(&database_url_as(role));
    conn.batch_execute(&format!(r#"SET search_path TO "{schema}""#))
        .expect("set search_path");
    conn
}

/// Runs docs/grants.sql with psql, as the documentation says to.
fn apply_grants(schema: &str, producer: &str, relay: &str, consumer: &str) {
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/grants.sql");
    let var = |name: &str, value: &str| format!("{name}={value}");
    let out = Command::new("psql")
        .arg(testkit::database_url())
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1"])
        .args(["-v", &var("schema", schema)])
        .args(["-v", &var("producer", producer)])
        .args(["-v", &var("relay", relay)])
        .args(["-v", &var("consumer", consumer)])
        .args(["-f", file])
        .output()
        .expect("psql (the tests run beside PostgreSQL)");
    assert!(
        out.status.success(),
        "psql -f docs/grants.sql: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `sql` fails with "permission denied".
#[track_caller]
fn assert_denied(conn: &mut PgConnection, who: &str, sql: &str) {
    match conn.batch_execute(sql) {
        Ok(()) => panic!("{who} may run `{sql}`; it should be denied"),
        Err(e) => assert!(
            e.to_string().contains("permission denied"),
            "{who}: `{sql}` failed, but not for want of a privilege: {e}"
        ),
    }
}

/// `sql` succeeds, and is rolled back.
#[track_caller]
fn assert_allowed_then_rolled_back(conn: &mut PgConnection, who: &str, sql: &str) {
    let result = conn.transaction::<(), _, _>(|conn| {
        conn.batch_execute(sql)?;
        Err(diesel::result::Error::RollbackTransaction)
    });
    match result {
        Err(diesel::result::Error::RollbackTransaction) => {}
        other => panic!("{who}: `{sql}` should be allowed: {other:?}"),
    }
}

/// The broker refused the operation for want of a permission.
#[track_caller]
fn assert_refused<T: std::fmt::Debug>(what: &str, result: Result<T, lapin::Error>) {
    match result {
        Ok(ok) => panic!("{what}: allowed ({ok:?}); it should be refused"),
        Err(e) => assert!(
            e.to_string().contains("ACCESS_REFUSED"),
            "{what}: failed, but not with ACCESS_REFUSED: {e}"
        ),
    }
}

/// Polls `condition` until it returns `Some`, panicking with `what` after
/// [`WAIT`]; sleeps without blocking the runtime.
async fn wait_for<T>(what: &str, mut condition: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = condition().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn event(exchange: &str, key: &str, body: serde_json::Value) -> Message {
    Message::builder(exchange, "order.v1.submitted", "order.submitted")
        .ordering_key(key)
        .json(&body)
        .build()
        .unwrap()
}

fn count(conn: &mut PgConnection, sql: &str) -> i64 {
    diesel::sql_query(sql).get_result::<Count>(conn).unwrap().n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_component_does_its_job_with_only_its_privileges() {
    let started = Instant::now();
    let schema = TestSchema::new("priv");
    let s = schema.name().to_owned();
    let outbox = Outbox::new(outbox::Config {
        schema: s.clone(),
        ..outbox::Config::default()
    })
    .unwrap();
    let mut owner = schema.connect();
    outbox.migrate(&mut owner).unwrap();
    // The consumer's business table: its grant is the service's own.
    owner
        .batch_execute("CREATE TABLE effects (message_id uuid PRIMARY KEY, n bigint NOT NULL)")
        .unwrap();

    let mut cleanup = Cleanup::default();
    let producer = cleanup.role("priv_producer");
    let relay_role = cleanup.role("priv_relay");
    let consumer_role = cleanup.role("priv_consumer");
    apply_grants(&s, &producer, &relay_role, &consumer_role);
    owner
        .batch_execute(&format!(r#"GRANT INSERT ON effects TO "{consumer_role}""#))
        .unwrap();

    // The broker side: a test queue on one producer exchange (declared by
    // the test), a consumer binding from another (declared by the consumer
    // itself), and an exchange the relay may not publish to.
    let topology = TestTopology::new("priv_x", "#").await;
    let consumed = testkit::unique_name("priv_orders");
    let forbidden = testkit::unique_name("priv_forbidden");
    let name = testkit::unique_name("priv_c");
    let other_queue = format!("{name}_other");
    cleanup.exchanges.extend([
        consumed.clone(),
        format!("{name}.slots"),
        format!("{name}.unslotted"),
    ]);
    cleanup.queues.extend([
        name.clone(),
        format!("{name}.0"),
        format!("{name}.1"),
        format!("{name}.dead-letters"),
        other_queue.clone(),
    ]);
    let relay_user = testkit::unique_name("priv_relay");
    let consumer_user = testkit::unique_name("priv_consumer");
    let passwords = cleanup.users(&[
        (
            relay_user.as_str(),
            relay_permissions(&[&topology.exchange, &consumed]),
        ),
        (
            consumer_user.as_str(),
            consumer_permissions(&name, &[&consumed]),
        ),
    ]);
    let relay_amqp = amqp_url_as(&relay_user, &passwords[0]);
    let consumer_amqp = amqp_url_as(&consumer_user, &passwords[1]);

    // Producer: enqueues in its own transaction, one event at a time and
    // in a batch; nothing else on the outbox, nothing on the inbox.
    let mut producer_conn = connect_as(&producer, &s);
    let shipped = event(&topology.exchange, "key-a", serde_json::json!({ "n": 1 }));
    let refused = event(&forbidden, "key-x", serde_json::json!({ "n": 1 }));
    producer_conn
        .transaction(|conn| {
            outbox.enqueue_message(conn, &shipped)?;
            outbox.enqueue_batch(conn, std::slice::from_ref(&refused))
        })
        .unwrap();
    for sql in [
        "SELECT payload FROM outbox_messages",
        "SELECT exchange, routing_key FROM outbox_messages",
        "UPDATE outbox_messages SET attempts = 0",
        "DELETE FROM outbox_messages",
        "TRUNCATE outbox_messages",
        // The relay's bookkeeping columns cannot be written, even on insert.
        "INSERT INTO outbox_messages (id, \"partition\", exchange, routing_key, event_type, event_version, payload, published_at)
         VALUES (gen_random_uuid(), 0, 'x', 'a', 't', 1, '\\x7b7d', now())",
        "DELETE FROM outbox_keys",
        "UPDATE outbox_settings SET notify = false",
        "SELECT * FROM outbox_relay_claim_v3(0::smallint, 10, 1000, 'x')",
        "SELECT * FROM inbox_messages",
        "INSERT INTO inbox_messages (consumer, message_id) VALUES ('c', gen_random_uuid())",
        "SELECT * FROM inbox_keys",
    ] {
        assert_denied(&mut producer_conn, "the producer", sql);
    }
    // What the SECURITY INVOKER enqueue still needs, and so still allows
    // (docs/PRIVILEGES.md, "What the grants still allow").
    for sql in [
        "SELECT ordering_key, last_seq FROM outbox_keys",
        "UPDATE outbox_keys SET last_seq = last_seq + 1",
        "INSERT INTO outbox_messages (id, \"partition\", exchange, routing_key, event_type, event_version, payload)
         VALUES (gen_random_uuid(), 0, 'x', 'a', 't', 1, '\\x7b7d')",
    ] {
        assert_allowed_then_rolled_back(&mut producer_conn, "the producer", sql);
    }

    // Consumer: declared first with one queue, then run with two, so it
    // declares `<name>`, `<name>.N` and the rest, and drains and deletes
    // `<name>`, all as its broker user and database role.
    let mut config = ConsumerConfig::new(&name, &database_url_as(&consumer_role), &consumer_amqp);
    config.schema = s.clone();
    config.lanes = 2;
    config.retry.initial = Duration::from_millis(50);
    config.retry.max_delay = Duration::from_millis(200);
    config.membership_interval = Duration::from_millis(200);
    config.shutdown_timeout = Duration::from_secs(10);
    let build = |config: ConsumerConfig| {
        let effects = format!(r#""{s}".effects"#);
        Consumer::builder(config)
            .handle(
                &consumed,
                "order.*.submitted",
                move |conn: &mut PgConnection, e: Envelope<Ev>| -> HandlerResult {
                    diesel::sql_query(format!(
                        "INSERT INTO {effects} (message_id, n) VALUES ($1, $2)"
                    ))
                    .bind::<diesel::sql_types::Uuid, _>(e.meta.message_id)
                    .bind::<BigInt, _>(e.event.n)
                    .execute(conn)
                    .map(|_| ())
                    .map_err(|err| HandlerError::Retry {
                        after: None,
                        reason: err.to_string(),
                    })
                },
            )
            .build()
            .unwrap()
    };
    build(config.clone()).declare().await.unwrap();
    config.partitions = 2;
    let consumer = build(config.clone());
    let shutdown = CancellationToken::new();
    let consuming = {
        let (consumer, shutdown) = (consumer.clone(), shutdown.clone());
        tokio::spawn(async move { consumer.run(shutdown).await })
    };

    // One event the consumer applies, one whose body it cannot read (it
    // dead-letters it: a publish through the default exchange).
    let applied = event(&consumed, "key-b", serde_json::json!({ "n": 2 }));
    let unreadable = event(&consumed, "key-c", serde_json::json!({ "wrong": true }));
    producer_conn
        .transaction(|conn| outbox.enqueue_batch(conn, &[applied.clone(), unreadable.clone()]))
        .unwrap();

    // Relay: ships as its role and broker user, keeping published rows for
    // a moment (a retention: the stamp, then the clean-up's delete).
    let relay = Relay::new(RelayConfig {
        database_url: database_url_as(&relay_role),
        amqp_url: relay_amqp.clone(),
        schema: s.clone(),
        workers: 2,
        poll_interval: Duration::from_millis(100),
        confirm_timeout: Duration::from_secs(5),
        retry: RetryPolicy {
            initial: Duration::from_millis(50),
            max_delay: Duration::from_millis(200),
            max_attempts: 3,
            ..RetryPolicy::default()
        },
        retention: Some(Duration::from_millis(1)),
        cleanup_interval: Duration::from_millis(200),
        stats_interval: Duration::from_millis(200),
        ..RelayConfig::default()
    })
    .unwrap();
    let (stop_relay, relay_stopped) = tokio::sync::oneshot::channel::<()>();
    let relaying = tokio::spawn(relay.run(async {
        let _ = relay_stopped.await;
    }));

    let received = topology.receive(1, WAIT).await;
    assert_eq!(received[0].message_id(), shipped.id().to_string());

    // The admin commands, as the relay's role: the event for an exchange
    // outside the relay user's write permission was refused by the broker
    // and parked.
    let store = Store::new(&s);
    let mut admin = relay::store::connect(&database_url_as(&relay_role))
        .await
        .unwrap();
    store.settings(&mut admin).await.unwrap();
    let parked = wait_for("the refused event to be parked", async || {
        let rows = store.parked(&mut admin, 10).await.unwrap();
        rows.into_iter().find(|r| r.id == refused.id())
    })
    .await;
    let reason = parked.last_error.unwrap_or_default();
    assert!(reason.contains("ACCESS_REFUSED"), "{reason}");
    assert_eq!(store.totals(&mut admin).await.unwrap().parked, 1);
    store.backlog(&mut admin).await.unwrap();
    let retried = store
        .retry_parked(&mut admin, &Selection::Ids(vec![refused.id()]))
        .await
        .unwrap();
    assert_eq!(retried, 1);
    wait_for("the retried event to be parked again", async || {
        (store.totals(&mut admin).await.unwrap().parked == 1).then_some(())
    })
    .await;
    let purged = store
        .purge_parked(&mut admin, &Selection::Key("key-x".into()))
        .await
        .unwrap();
    assert_eq!(purged, 1);

    // The consumer applied one event and dead-lettered the other.
    wait_for("the consumer to apply its event", async || {
        let sql = format!(
            "SELECT count(*) AS n FROM effects WHERE message_id = '{}' AND n = 2",
            applied.id()
        );
        (count(&mut owner, &sql) == 1).then_some(())
    })
    .await;
    wait_for(
        "the consumer to dead-letter the unreadable event",
        async || {
            let outcome: Vec<Outcome> = diesel::sql_query(format!(
            "SELECT outcome FROM inbox_messages WHERE consumer = '{name}' AND message_id = '{}'",
            unreadable.id()
        ))
        .load(&mut owner)
        .unwrap();
            outcome
                .iter()
                .any(|o| o.outcome == "dead-lettered")
                .then_some(())
        },
    )
    .await;
    // Every row was published (stamped), then deleted by the clean-up.
    wait_for("the relay to clean the outbox", async || {
        (count(&mut owner, "SELECT count(*) AS n FROM outbox_messages") == 0).then_some(())
    })
    .await;
    // The queue of the earlier partition count was drained and deleted.
    wait_for("the consumer to delete its retired queue", async || {
        let gone = testkit::amqp::queue_state(&name).await.is_none();
        let recorded = count(
            &mut owner,
            &format!(
                "SELECT count(*) AS n FROM inbox_topology
                 WHERE consumer = '{name}' AND partitions = 2 AND retiring = '{{}}'"
            ),
        );
        (gone && recorded == 1).then_some(())
    })
    .await;

    // The relay's role: no inserts into the outbox, no rewriting of events,
    // nothing on the counters or the inbox.
    let mut relay_conn = connect_as(&relay_role, &s);
    for sql in [
        "INSERT INTO outbox_messages (id, \"partition\", exchange, routing_key, event_type, event_version, payload)
         VALUES (gen_random_uuid(), 0, 'x', 'a', 't', 1, '\\x7b7d')",
        "UPDATE outbox_messages SET payload = '\\x7b7d'",
        "UPDATE outbox_messages SET exchange = 'elsewhere'",
        "SELECT * FROM outbox_keys",
        "SELECT * FROM outbox_enqueue('x', 'a', 't', '\\x7b7d')",
        "SELECT * FROM inbox_messages",
        "DELETE FROM inbox_keys",
    ] {
        assert_denied(&mut relay_conn, "the relay", sql);
    }
    // The consumer's role: nothing on the outbox.
    let mut consumer_conn = connect_as(&consumer_role, &s);
    for sql in [
        "SELECT payload FROM outbox_messages",
        "SELECT * FROM outbox_keys",
        "SELECT * FROM outbox_enqueue('x', 'a', 't', '\\x7b7d')",
        "DELETE FROM outbox_messages",
    ] {
        assert_denied(&mut consumer_conn, "the consumer", sql);
    }

    // The consumer's broker user and role: replay its dead letter (a
    // basic.get on its dead-letter queue, the replay recorded in
    // inbox_replays, a publish to its queue), ...
    shutdown.cancel();
    tokio::time::timeout(WAIT, consuming)
        .await
        .expect("the consumer stops")
        .unwrap()
        .expect("the consumer ran without error");
    // The unreadable event may have been dead-lettered twice: it shared the
    // relay's first batch with the refused event, whose ACCESS_REFUSED
    // closed the channel before the broker's confirms came, so the relay
    // sent it again (a duplicate on the wire, as the promises allow; a body
    // that does not deserialize is dead-lettered before the inbox could
    // call it a duplicate). Every dead letter replayed is that event: one
    // row in inbox_replays (keyed by consumer and message id).
    let replayed = consumer::replay_dead_letters(&config, 10).await.unwrap();
    assert!(replayed >= 1, "{replayed} dead letters replayed");
    let replays = |and: &str| {
        format!("SELECT count(*) AS n FROM inbox_replays WHERE consumer = '{name}'{and}")
    };
    let unreadable_only = format!(" AND message_id = '{}'", unreadable.id());
    assert_eq!(count(&mut owner, &replays("")), 1, "one message replayed");
    assert_eq!(
        count(&mut owner, &replays(&unreadable_only)),
        1,
        "the unreadable event replayed"
    );
    // ... but cannot read another consumer's queue (even one whose name
    // starts with its own), publish as a producer, or declare other names.
    let guest =
        lapin::Connection::connect(&testkit::amqp::amqp_url(), ConnectionProperties::default())
            .await
            .unwrap();
    let mut expires = FieldTable::default();
    expires.insert("x-expires".into(), AMQPValue::LongInt(60_000));
    guest
        .create_channel()
        .await
        .unwrap()
        .queue_declare(
            other_queue.as_str().into(),
            QueueDeclareOptions::default(),
            expires,
        )
        .await
        .unwrap();
    let as_consumer = lapin::Connection::connect(&consumer_amqp, ConnectionProperties::default())
        .await
        .unwrap();
    for queue in [other_queue.as_str(), topology.queue.as_str()] {
        let channel = as_consumer.create_channel().await.unwrap();
        assert_refused(
            &format!("the consumer's basic.get on {queue}"),
            channel
                .basic_get(queue.into(), BasicGetOptions { no_ack: true })
                .await,
        );
    }
    let channel = as_consumer.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    assert_refused(
        "the consumer's publish to a producer's exchange",
        publish(&channel, &consumed).await,
    );
    let channel = as_consumer.create_channel().await.unwrap();
    assert_refused(
        "the consumer's declaration of another name",
        channel
            .queue_declare(
                format!("{name}x").as_str().into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await,
    );

    // The relay's broker user: it published (above), and nothing else: no
    // other exchange, no declaring, no reading.
    let as_relay = lapin::Connection::connect(&relay_amqp, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = as_relay.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    assert_refused(
        "the relay's publish to amq.topic",
        publish(&channel, "amq.topic").await,
    );
    let channel = as_relay.create_channel().await.unwrap();
    assert_refused(
        "the relay's declaration of an exchange",
        channel
            .exchange_declare(
                forbidden.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await,
    );
    let channel = as_relay.create_channel().await.unwrap();
    assert_refused(
        "the relay's basic.get",
        channel
            .basic_get(
                topology.queue.as_str().into(),
                BasicGetOptions { no_ack: true },
            )
            .await,
    );
    for connection in [guest, as_consumer, as_relay] {
        let _ = connection.close(200, "done".into()).await;
    }

    let _ = stop_relay.send(());
    tokio::time::timeout(WAIT, relaying)
        .await
        .expect("the relay stops")
        .unwrap()
        .expect("the relay ran without error");
    eprintln!("privileges test took {:?}", started.elapsed());
}

/// Publishes `{}` to `exchange` on a confirm-mode channel; `Ok` only when
/// the broker acked it.
async fn publish(channel: &lapin::Channel, exchange: &str) -> Result<Confirmation, lapin::Error> {
    let confirmation = channel
        .basic_publish(
            exchange.into(),
            "order.v1.submitted".into(),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default(),
        )
        .await?
        .await?;
    Ok(confirmation)
}
