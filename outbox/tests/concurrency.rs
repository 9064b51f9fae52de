//! Per-key sequence numbers are gapless and follow commit order under
//! concurrent writers.

mod common;

use std::collections::BTreeMap;

use common::{OrderSubmitted, outbox_in_own_schema, rows};
use diesel::connection::SimpleConnection;
use diesel::sql_types::{BigInt, Text};
use diesel::{Connection, QueryableByName, RunQueryDsl};

const WRITERS: usize = 8;
const TRANSACTIONS_PER_WRITER: usize = 400;
const KEYS: usize = 10;

#[derive(QueryableByName)]
struct Version {
    #[diesel(sql_type = BigInt)]
    version: i64,
}

#[test]
fn key_sequences_are_gapless_and_match_the_business_version_committed_with_them() {
    let (schema, outbox) = outbox_in_own_schema("concurrency");
    schema
        .connect()
        .batch_execute(
            "CREATE TABLE order_versions (order_id text PRIMARY KEY, version bigint NOT NULL)",
        )
        .unwrap();

    std::thread::scope(|scope| {
        for writer in 0..WRITERS {
            let (schema, outbox) = (&schema, &outbox);
            scope.spawn(move || {
                let mut conn = schema.connect();
                for i in 0..TRANSACTIONS_PER_WRITER {
                    let key = format!("order-{}", (writer * 7 + i) % KEYS);
                    conn.transaction(|conn| {
                        // The business change: bump the order's version.
                        let version: Version = diesel::sql_query(
                            "INSERT INTO order_versions AS v (order_id, version) VALUES ($1, 1)
                             ON CONFLICT (order_id) DO UPDATE SET version = v.version + 1
                             RETURNING v.version",
                        )
                        .bind::<Text, _>(&key)
                        .get_result(conn)?;
                        // The event, in the same transaction, carrying the version.
                        outbox.enqueue(
                            conn,
                            &OrderSubmitted {
                                order_id: key.clone(),
                                total_cents: version.version,
                            },
                        )?;
                        Ok::<_, outbox::Error>(())
                    })
                    .unwrap();
                }
            });
        }
    });

    let mut by_key: BTreeMap<String, Vec<(i64, i64)>> = BTreeMap::new();
    for row in rows(&mut schema.connect()) {
        let payload: serde_json::Value = serde_json::from_slice(&row.payload).unwrap();
        let version = payload["total_cents"].as_i64().unwrap();
        by_key
            .entry(row.ordering_key.unwrap())
            .or_default()
            .push((row.key_seq.unwrap(), version));
    }
    assert_eq!(by_key.len(), KEYS);
    let mut total = 0;
    for (key, mut events) in by_key {
        events.sort();
        let n = events.len() as i64;
        total += events.len();
        let seqs: Vec<i64> = events.iter().map(|e| e.0).collect();
        assert_eq!(
            seqs,
            (1..=n).collect::<Vec<_>>(),
            "key {key}: sequence has a gap or a repeat"
        );
        for (key_seq, version) in events {
            assert_eq!(
                key_seq, version,
                "key {key}: event {key_seq} committed with version {version}"
            );
        }
    }
    assert_eq!(total, WRITERS * TRANSACTIONS_PER_WRITER);
}
