//! The per-message transaction: applied once per consumer name, in order per
//! key, with the handler's writes committing with the dedupe row.

use std::time::Duration;

use consumer::{AheadPolicy, Applied, HandlerError, Inbox, Incoming};
use diesel::connection::SimpleConnection;
use diesel::sql_types::{BigInt, Text};
use diesel::{PgConnection, QueryableByName, RunQueryDsl};
use testkit::TestSchema;
use uuid::Uuid;

/// A migrated schema with a business table the handlers write to.
fn setup(prefix: &str) -> TestSchema {
    let schema = TestSchema::new(prefix);
    let outbox = outbox::Outbox::new(outbox::Config {
        schema: schema.name().to_owned(),
        ..outbox::Config::default()
    })
    .unwrap();
    let mut conn = schema.connect();
    outbox.migrate(&mut conn).unwrap();
    conn.batch_execute("CREATE TABLE effects (n bigserial PRIMARY KEY, what text NOT NULL)")
        .unwrap();
    schema
}

/// A handler that records `what` as a business effect.
fn write(what: &str) -> impl FnOnce(&mut PgConnection) -> Result<(), HandlerError> + '_ {
    move |conn| {
        diesel::sql_query("INSERT INTO effects (what) VALUES ($1)")
            .bind::<Text, _>(what)
            .execute(conn)
            .map(|_| ())
            .map_err(|e| HandlerError::Retry {
                after: None,
                reason: e.to_string(),
            })
    }
}

#[derive(QueryableByName)]
struct Effect {
    #[diesel(sql_type = Text)]
    what: String,
}

fn effects(conn: &mut PgConnection) -> Vec<String> {
    diesel::sql_query("SELECT what FROM effects ORDER BY n")
        .load::<Effect>(conn)
        .unwrap()
        .into_iter()
        .map(|e| e.what)
        .collect()
}

fn keyed(id: Uuid, key: &str, seq: i64) -> Incoming<'_> {
    Incoming::keyed(id, key, seq)
}

#[test]
fn a_message_delivered_twice_is_applied_once() {
    let schema = setup("inbox_twice");
    let inbox = Inbox::new("billing", schema.name()).unwrap();
    let mut conn = schema.connect();
    let id = Uuid::now_v7();
    let first = inbox.apply(
        &mut conn,
        keyed(id, "order-1", 1),
        AheadPolicy::Apply,
        write("charge"),
    );
    let second = inbox.apply(
        &mut conn,
        keyed(id, "order-1", 1),
        AheadPolicy::Apply,
        write("charge"),
    );
    assert_eq!(first.unwrap(), Applied::Applied);
    assert_eq!(second.unwrap(), Applied::Duplicate);
    assert_eq!(effects(&mut conn), ["charge"]);
}

#[test]
fn concurrent_duplicate_deliveries_apply_once() {
    let schema = setup("inbox_race");
    let inbox = Inbox::new("billing", schema.name()).unwrap();
    let ids: Vec<Uuid> = (0..50).map(|_| Uuid::now_v7()).collect();
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                let mut conn = schema.connect();
                for (i, id) in ids.iter().enumerate() {
                    let message = keyed(*id, "order-1", i as i64 + 1);
                    // Each delivery is retried until it is applied or known
                    // as duplicate, as a consumer redelivers.
                    loop {
                        match inbox.apply(&mut conn, message, AheadPolicy::Hold, write("effect")) {
                            Ok(Applied::Applied | Applied::Duplicate) => break,
                            Ok(Applied::Held { .. }) => std::thread::yield_now(),
                            other => panic!("unexpected {other:?}"),
                        }
                    }
                }
            });
        }
    });
    assert_eq!(
        effects(&mut schema.connect()).len(),
        ids.len(),
        "each message applied exactly once"
    );
}

#[test]
fn a_retrying_handler_leaves_no_trace_and_the_redelivery_applies() {
    let schema = setup("inbox_retry");
    let inbox = Inbox::new("billing", schema.name()).unwrap();
    let mut conn = schema.connect();
    let id = Uuid::now_v7();
    let failed = inbox
        .apply(
            &mut conn,
            keyed(id, "order-1", 1),
            AheadPolicy::Apply,
            |conn| {
                write("half done")(conn)?;
                Err(HandlerError::Retry {
                    after: Some(Duration::from_millis(10)),
                    reason: "ledger locked".into(),
                })
            },
        )
        .unwrap();
    assert_eq!(
        failed,
        Applied::Retry {
            after: Some(Duration::from_millis(10)),
            reason: "ledger locked".into()
        }
    );
    assert!(
        effects(&mut conn).is_empty(),
        "the failed attempt's writes rolled back"
    );
    let again = inbox.apply(
        &mut conn,
        keyed(id, "order-1", 1),
        AheadPolicy::Apply,
        write("charge"),
    );
    assert_eq!(
        again.unwrap(),
        Applied::Applied,
        "not mistaken for a duplicate"
    );
    assert_eq!(effects(&mut conn), ["charge"]);
}

#[test]
fn a_message_ahead_of_its_key_is_held_then_applied_in_order() {
    let schema = setup("inbox_ahead");
    let inbox = Inbox::new("logistics", schema.name()).unwrap();
    let mut conn = schema.connect();
    let (one, two) = (Uuid::now_v7(), Uuid::now_v7());
    let early = inbox.apply(
        &mut conn,
        keyed(two, "order-1", 2),
        AheadPolicy::Hold,
        write("2"),
    );
    assert_eq!(early.unwrap(), Applied::Held { last: 0 });
    assert!(effects(&mut conn).is_empty());
    assert_eq!(
        inbox
            .apply(
                &mut conn,
                keyed(one, "order-1", 1),
                AheadPolicy::Hold,
                write("1")
            )
            .unwrap(),
        Applied::Applied
    );
    assert_eq!(
        inbox
            .apply(
                &mut conn,
                keyed(two, "order-1", 2),
                AheadPolicy::Hold,
                write("2")
            )
            .unwrap(),
        Applied::Applied
    );
    assert_eq!(effects(&mut conn), ["1", "2"]);
}

#[test]
fn gaps_are_applied_under_the_default_policy() {
    // A consumer bound to some event types of a key sees gaps in key_seq.
    let schema = setup("inbox_gap");
    let inbox = Inbox::new("billing", schema.name()).unwrap();
    let mut conn = schema.connect();
    for (seq, what) in [(1, "submitted"), (3, "cancelled")] {
        let applied = inbox.apply(
            &mut conn,
            keyed(Uuid::now_v7(), "order-1", seq),
            AheadPolicy::default(),
            write(what),
        );
        assert_eq!(applied.unwrap(), Applied::Applied);
    }
    assert_eq!(effects(&mut conn), ["submitted", "cancelled"]);
}

#[test]
fn a_late_message_is_reported_and_not_applied() {
    let schema = setup("inbox_late");
    let inbox = Inbox::new("billing", schema.name()).unwrap();
    let mut conn = schema.connect();
    for seq in 1..=2 {
        inbox
            .apply(
                &mut conn,
                keyed(Uuid::now_v7(), "order-1", seq),
                AheadPolicy::Apply,
                write("on time"),
            )
            .unwrap();
    }
    let late = Uuid::now_v7();
    let applied = inbox.apply(
        &mut conn,
        keyed(late, "order-1", 1),
        AheadPolicy::Apply,
        write("late"),
    );
    assert_eq!(applied.unwrap(), Applied::Late { last: 2 });
    assert_eq!(effects(&mut conn), ["on time", "on time"]);
    #[derive(QueryableByName)]
    struct N {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let recorded: N =
        diesel::sql_query("SELECT count(*) AS n FROM inbox_messages WHERE message_id = $1")
            .bind::<diesel::sql_types::Uuid, _>(late)
            .get_result(&mut conn)
            .unwrap();
    assert_eq!(
        recorded.n, 0,
        "a late message is not marked as seen: it can still be replayed"
    );
}

#[test]
fn a_discarded_message_is_recorded_undone_and_its_key_moves_on() {
    let schema = setup("inbox_discard");
    let inbox = Inbox::new("billing", schema.name()).unwrap();
    let mut conn = schema.connect();
    let bad = Uuid::now_v7();
    let discarded = inbox
        .apply(
            &mut conn,
            keyed(bad, "order-1", 1),
            AheadPolicy::Hold,
            |conn| {
                write("partial")(conn)?;
                Err(HandlerError::Discard("unknown currency XXX".into()))
            },
        )
        .unwrap();
    assert_eq!(discarded, Applied::Discarded("unknown currency XXX".into()));
    assert!(
        effects(&mut conn).is_empty(),
        "the handler's writes were undone"
    );
    assert_eq!(
        inbox
            .apply(
                &mut conn,
                keyed(bad, "order-1", 1),
                AheadPolicy::Hold,
                write("again")
            )
            .unwrap(),
        Applied::Duplicate,
        "a discarded message is not handled again"
    );
    assert_eq!(
        inbox
            .apply(
                &mut conn,
                keyed(Uuid::now_v7(), "order-1", 2),
                AheadPolicy::Hold,
                write("next")
            )
            .unwrap(),
        Applied::Applied,
        "the key is not stuck behind it"
    );
}

#[test]
fn each_consumer_name_applies_a_message_once_for_itself() {
    let schema = setup("inbox_names");
    let billing = Inbox::new("billing", schema.name()).unwrap();
    let logistics = Inbox::new("logistics", schema.name()).unwrap();
    let mut conn = schema.connect();
    let id = Uuid::now_v7();
    let unkeyed = Incoming::unordered(id);
    for inbox in [&billing, &logistics, &billing] {
        inbox
            .apply(&mut conn, unkeyed, AheadPolicy::Apply, write("x"))
            .unwrap();
    }
    assert_eq!(effects(&mut conn).len(), 2);
    assert!(Inbox::new("", schema.name()).is_err());
    assert!(Inbox::new("billing", "Bad Schema").is_err());
}

/// A handler that swallows the error of a failed statement and returns Ok
/// has left the transaction aborted: the message must not be reported
/// applied (PostgreSQL turns that COMMIT into a rollback), so it is tried
/// again and its dedupe row is not left behind.
#[test]
fn a_handler_that_swallows_a_failed_statement_is_not_reported_applied() {
    let schema = setup("inbox_swallow");
    let inbox = Inbox::new("billing", schema.name()).unwrap();
    let mut conn = schema.connect();
    for key in [None, Some(("order-1", 1))] {
        let message = Incoming {
            message_id: Uuid::now_v7(),
            key,
            after: None,
        };
        let swallowed = inbox.apply(&mut conn, message, AheadPolicy::Apply, |conn| {
            write("lost")(conn)?;
            let _ = diesel::sql_query("SELECT 1 / 0").execute(conn);
            Ok(())
        });
        assert!(
            swallowed.is_err(),
            "key {key:?}: an aborted transaction reported as {swallowed:?}"
        );
        let mut conn = schema.connect();
        let again = inbox.apply(&mut conn, message, AheadPolicy::Apply, write("kept"));
        assert_eq!(again.unwrap(), Applied::Applied, "key {key:?}");
    }
    assert_eq!(effects(&mut schema.connect()), ["kept", "kept"]);
}
