//! Wake-ups (migration 00006): by default `outbox_enqueue` NOTIFYs only for
//! a partition some relay worker says it waits on (`outbox_waiting`), since
//! every NOTIFY serialises producers' commits; `notify_when = 'always'`
//! NOTIFYs on every commit, `notify = false` never.
//!
//! Notifications reach a listener in commit order, so "A sent none" is
//! shown without waiting for nothing: A commits first, then B, which does
//! notify; the first notification to arrive must be B's.

mod common;

use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::sql_types::{Integer, SmallInt, Text};
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};
use outbox::{Message, Outbox};

#[derive(QueryableByName)]
struct Partition {
    #[diesel(sql_type = SmallInt)]
    p: i16,
}

#[derive(QueryableByName)]
struct Channel {
    #[diesel(sql_type = Text)]
    channel: String,
}

/// Two ordering keys of different partitions, and their partitions.
fn two_keys(conn: &mut PgConnection, schema: &str) -> [(String, i16); 2] {
    let partition_of = |conn: &mut PgConnection, key: &str| {
        diesel::sql_query(format!(
            r#"SELECT "{schema}".outbox_partition($1, (SELECT partitions FROM "{schema}".outbox_settings)::integer) AS p"#
        ))
        .bind::<Text, _>(key)
        .get_result::<Partition>(conn)
        .unwrap()
        .p
    };
    let a = ("key-a".to_owned(), partition_of(conn, "key-a"));
    let b = (0..)
        .map(|i| format!("key-b{i}"))
        .map(|k| {
            let p = partition_of(conn, &k);
            (k, p)
        })
        .find(|(_, p)| *p != a.1)
        .unwrap();
    [a, b]
}

fn enqueue(conn: &mut PgConnection, outbox: &Outbox, key: &str) {
    let message = Message::builder("order", "order.v1.placed", "order.placed")
        .ordering_key(key)
        .json(&serde_json::json!({ "key": key }))
        .build()
        .unwrap();
    conn.transaction(|conn| outbox.enqueue_message(conn, &message))
        .unwrap();
}

/// The partitions of the next `n` notifications on the listener (10 s at most).
fn next_notifications(listener: &mut PgConnection, n: usize) -> Vec<i16> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while got.len() < n {
        assert!(
            Instant::now() < deadline,
            "only {got:?} arrived within 10 s"
        );
        // A round trip makes libpq read what the server sent meanwhile.
        listener.batch_execute("SELECT 1").unwrap();
        for notification in listener.notifications_iter() {
            got.push(notification.unwrap().payload.parse().unwrap());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    got
}

fn waiting(conn: &mut PgConnection, schema: &str, partitions: &[i16]) {
    let list: Vec<String> = partitions.iter().map(i16::to_string).collect();
    conn.batch_execute(&format!(
        r#"DELETE FROM "{schema}".outbox_waiting;
           INSERT INTO "{schema}".outbox_waiting (worker, partitions) VALUES ('test', '{{{}}}')"#,
        list.join(",")
    ))
    .unwrap();
}

#[test]
fn enqueue_notifies_only_for_partitions_a_relay_waits_on_unless_told_always() {
    let (schema, outbox) = common::outbox_in_own_schema("wake");
    let name = schema.name().to_owned();
    let mut conn = schema.connect();
    let [(a, pa), (b, pb)] = two_keys(&mut conn, &name);
    let channel = diesel::sql_query(format!(
        r#"SELECT notify_channel AS channel FROM "{name}".outbox_settings"#
    ))
    .get_result::<Channel>(&mut conn)
    .unwrap()
    .channel;
    let mut listener = testkit::connect(&testkit::database_url());
    listener
        .batch_execute(&format!(r#"LISTEN "{channel}""#))
        .unwrap();

    // The default, `waiting`: nobody waits for A's partition, a worker
    // waits for B's.
    waiting(&mut conn, &name, &[pb]);
    enqueue(&mut conn, &outbox, &a);
    enqueue(&mut conn, &outbox, &b);
    assert_eq!(next_notifications(&mut listener, 1), [pb], "A sent none");

    // Nobody waits at all: a worker busy with its backlog is not woken.
    conn.batch_execute(&format!(r#"DELETE FROM "{name}".outbox_waiting"#))
        .unwrap();
    enqueue(&mut conn, &outbox, &a);
    waiting(&mut conn, &name, &[pa]);
    enqueue(&mut conn, &outbox, &a);
    assert_eq!(next_notifications(&mut listener, 1), [pa]);

    // `always`: every commit notifies, waiting or not.
    conn.batch_execute(&format!(
        r#"DELETE FROM "{name}".outbox_waiting;
           UPDATE "{name}".outbox_settings SET notify_when = 'always'"#
    ))
    .unwrap();
    enqueue(&mut conn, &outbox, &a);
    enqueue(&mut conn, &outbox, &b);
    assert_eq!(next_notifications(&mut listener, 2), [pa, pb]);

    // notify off: none, whoever waits.
    conn.batch_execute(&format!(
        r#"UPDATE "{name}".outbox_settings SET notify = false"#
    ))
    .unwrap();
    waiting(&mut conn, &name, &[pa, pb]);
    enqueue(&mut conn, &outbox, &a);
    conn.batch_execute(&format!(
        r#"UPDATE "{name}".outbox_settings SET notify = true, notify_when = 'waiting'"#
    ))
    .unwrap();
    enqueue(&mut conn, &outbox, &b);
    assert_eq!(next_notifications(&mut listener, 1), [pb], "A sent none");

    // Plain SQL callers get the same (one write path).
    let _: Vec<Partition> = diesel::sql_query(format!(
        r#"SELECT "partition" AS p FROM "{name}".outbox_enqueue('order', 'order.v1.placed', 'order.placed',
               convert_to('{{}}', 'UTF8'), $1, $2)"#
    ))
    .bind::<Text, _>(&a)
    .bind::<Integer, _>(1)
    .load(&mut conn)
    .unwrap();
    assert_eq!(next_notifications(&mut listener, 1), [pa]);
}
