//! Tests that disturb the shared broker (a resource alarm blocks every
//! publisher on it), so they are ignored by `cargo test` and run alone in
//! the serial stage of `.ci/run`:
//! `cargo test -p relay --all-features --test serial -- --ignored --test-threads=1`.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{config, enqueue_rounds, outbox_schema, start};
use diesel::connection::SimpleConnection;
use diesel::{QueryableByName, RunQueryDsl};
use testkit::amqp::{Received, TestTopology};

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .expect("rabbitmqctl (the serial tests run beside the broker)");
    assert!(out.status.success(), "rabbitmqctl {args:?}: {out:?}");
}

/// Lifts the alarm however the test ends.
struct Alarm;

impl Alarm {
    fn raise() -> Self {
        rabbitmqctl(&["set_vm_memory_high_watermark", "absolute", "1"]);
        Alarm
    }
}

impl Drop for Alarm {
    fn drop(&mut self) {
        rabbitmqctl(&["set_vm_memory_high_watermark", "0.4"]);
    }
}

#[derive(QueryableByName)]
struct N {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

/// While the broker blocks publishers (a resource alarm), the relay waits:
/// it does not claim, publish and mark the same rows again and again (a
/// worker that knows its connection is blocked does not claim at all; one
/// blocked mid-batch keeps its connection and waits). When the alarm
/// clears, everything is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "raises a broker alarm: run alone (.ci/run's serial stage)"]
async fn a_blocked_broker_is_waited_for_not_spun_on() {
    let (schema, outbox) = outbox_schema("relay_blocked");
    let topology = TestTopology::new("relay_blocked", "#").await;
    // Every update of an outbox row is counted.
    schema
        .connect()
        .batch_execute(
            "CREATE TABLE updates (n bigint NOT NULL);
             INSERT INTO updates VALUES (0);
             CREATE FUNCTION count_update() RETURNS trigger LANGUAGE plpgsql AS
                 $$ BEGIN UPDATE updates SET n = n + 1; RETURN NULL; END $$;
             CREATE TRIGGER counted AFTER UPDATE ON outbox_messages
                 FOR EACH ROW EXECUTE FUNCTION count_update();",
        )
        .unwrap();
    let updates = || {
        diesel::sql_query("SELECT n FROM updates")
            .get_result::<N>(&mut schema.connect())
            .unwrap()
            .n
    };
    let mut config = config(&schema);
    config.retention = Some(Duration::from_secs(3600));
    config.confirm_timeout = Duration::from_secs(2);
    let relay = start(config);
    // One round goes out before the alarm, so the workers' connections
    // are known to the broker as publishers.
    let first = enqueue_rounds(&schema, &outbox, &topology.exchange, 50, 1);
    topology.receive(first.len(), Duration::from_secs(30)).await;

    let alarm = Alarm::raise();
    let written = enqueue_rounds(&schema, &outbox, &topology.exchange, 50, 20);
    // Long enough for a spinning relay to mark the 1,000 rows many times
    // over (it claimed, failed and marked them in a tight loop).
    let before = updates();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let during = updates() - before;
    drop(alarm);
    eprintln!("updates during the alarm: {during}");
    assert!(
        during <= written.len() as i64 * 2,
        "{during} row updates during 8 s of alarm for {} rows: the relay spun",
        written.len()
    );
    let received = topology
        .receive_until(Duration::from_secs(60), |got| {
            let ids: std::collections::HashSet<String> =
                got.iter().map(Received::message_id).collect();
            written.iter().all(|m| ids.contains(&m.id().to_string()))
        })
        .await;
    assert!(received.len() >= written.len());
    relay.stop().await;
}
