//! What an enqueue costs a producer: commits/s of a business transaction
//! (one row into an `orders` table) alone, and with `Outbox::enqueue` of a
//! 512-byte event over 1,000 keys in the same transaction, from 1 and 8
//! connections, with each way of waking the relay: `always` NOTIFYs on
//! every commit (`notify_when = 'always'`, how it was before migration
//! 00006), `waiting` only while a relay worker waits for the row's
//! partition (the default), `never` leaves the relay to poll
//! (`notify = false`). All of it twice: with `synchronous_commit = on`, as
//! producers commit (every commit waits for its WAL flush, so the disk sets
//! the pace), and `off`, which shows the write path's CPU cost alone.
//!
//! ```sh
//! cargo bench -p outbox --bench enqueue
//! ```
//!
//! Each figure is the median of [`RUNS`] runs of [`SECONDS`] s (the spread
//! is printed beside it); every run with the enqueue follows a run of the
//! business alone, and the ratio is the median of these pairs' ratios, so
//! it compares runs seconds apart (this machine's disk flushes vary by 3x
//! from minute to minute, and every commit waits for one). No relay
//! runs: with `waiting`, no relay is waiting, which is the case of a busy
//! relay (a sleeping one is woken by the first commit, then busy). The
//! outbox tables are emptied between runs. `DATABASE_URL` points it at
//! another server; the schema is dropped at the end.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::{Connection, PgConnection};
use outbox::{Config, Outbox};
use serde::Serialize;

/// Runs per figure.
const RUNS: usize = 5;
/// Length of one run.
const SECONDS: u64 = 3;
/// Distinct ordering keys.
const KEYS: u64 = 1_000;

#[derive(Serialize)]
struct OrderPlaced {
    order_id: u64,
    customer: String,
    note: String,
}

impl outbox::Event for OrderPlaced {
    const EXCHANGE: &'static str = "order";
    const ROUTING_KEY: &'static str = "order.v1.placed";
    const EVENT_TYPE: &'static str = "order.placed";

    fn ordering_key(&self) -> Option<String> {
        Some(format!("order-{}", self.order_id % KEYS))
    }
}

/// What a run's transactions do.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Business,
    Enqueue,
}

/// Where and how a run's connections work.
struct Setup<'a> {
    url: &'a str,
    schema: &'a str,
    outbox: &'a Arc<Outbox>,
    connections: u64,
    synchronous_commit: &'static str,
}

fn main() {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let schema = format!("bench_enqueue_{}", std::process::id());
    let outbox = Outbox::new(Config {
        schema: schema.clone(),
        ..Config::default()
    })
    .expect("outbox config");
    let mut admin = PgConnection::establish(&url).expect("PostgreSQL (run scripts/services.sh)");
    outbox.migrate(&mut admin).expect("migrate");
    admin
        .batch_execute(&format!(
            r#"CREATE TABLE "{schema}".orders (id bigserial PRIMARY KEY, customer text NOT NULL,
                                               total_cents bigint NOT NULL, created_at timestamptz NOT NULL DEFAULT now())"#
        ))
        .expect("orders table");
    let outbox = Arc::new(outbox);

    for synchronous_commit in ["on", "off"] {
        println!(
            "\nenqueue cost, synchronous_commit = {synchronous_commit}{}: commits/s, median of {RUNS} runs of {SECONDS} s (min-max)",
            if synchronous_commit == "on" {
                " (every commit waits for its WAL flush, as producers' do)"
            } else {
                " (the write path's CPU cost, without the disk)"
            }
        );
        println!(
            "{:<36} {:>20} {:>20}  ratio of pairs",
            "", "business alone", "business + enqueue"
        );
        for connections in [1, 8] {
            for wake in ["always", "waiting", "never"] {
                set_wake(&mut admin, &schema, wake);
                let mut alone = Vec::new();
                let mut with = Vec::new();
                let mut ratios = Vec::new();
                let setup = Setup {
                    url: &url,
                    schema: &schema,
                    outbox: &outbox,
                    connections,
                    synchronous_commit,
                };
                for _ in 0..RUNS {
                    reset(&mut admin, &schema);
                    alone.push(run(&setup, Kind::Business));
                    reset(&mut admin, &schema);
                    with.push(run(&setup, Kind::Enqueue));
                    ratios.push(with[with.len() - 1] / alone[alone.len() - 1]);
                }
                let (a, w, r) = (median(&mut alone), median(&mut with), median(&mut ratios));
                let (r_min, r_max) = (ratios[0], ratios[ratios.len() - 1]);
                println!(
                    "{:<36} {:>20} {:>20} {:>6.2}x ({r_min:.2}-{r_max:.2})",
                    format!("{connections} connection(s), wake = {wake}"),
                    spread(a, &alone),
                    spread(w, &with),
                    r
                );
            }
        }
    }
    admin
        .batch_execute(&format!(r#"DROP SCHEMA "{schema}" CASCADE"#))
        .expect("drop schema");
}

fn set_wake(conn: &mut PgConnection, schema: &str, wake: &str) {
    let set = match wake {
        "never" => "notify = false".to_owned(),
        when => format!("notify = true, notify_when = '{when}'"),
    };
    conn.batch_execute(&format!(r#"UPDATE "{schema}".outbox_settings SET {set}"#))
        .expect("set wake");
}

fn reset(conn: &mut PgConnection, schema: &str) {
    // Separate statements: VACUUM refuses to run in a multi-statement batch.
    for sql in [
        format!(
            r#"TRUNCATE "{schema}".outbox_messages, "{schema}".outbox_keys, "{schema}".orders"#
        ),
        format!(
            r#"VACUUM ANALYZE "{schema}".outbox_messages, "{schema}".outbox_keys, "{schema}".orders"#
        ),
        "CHECKPOINT".to_owned(),
    ] {
        conn.batch_execute(&sql).expect("reset");
    }
}

/// Commits/s of the setup's connections doing `kind` for [`SECONDS`] s.
fn run(setup: &Setup<'_>, kind: Kind) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let commits = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..setup.connections)
        .map(|t| {
            let (url, schema) = (setup.url.to_owned(), setup.schema.to_owned());
            let synchronous_commit = setup.synchronous_commit;
            let (outbox, stop, commits) = (
                Arc::clone(setup.outbox),
                Arc::clone(&stop),
                Arc::clone(&commits),
            );
            std::thread::spawn(move || {
                let mut conn = PgConnection::establish(&url).expect("connect");
                conn.batch_execute(&format!("SET synchronous_commit = {synchronous_commit}"))
                    .expect("synchronous_commit");
                let insert = format!(
                    r#"INSERT INTO "{schema}".orders (customer, total_cents) VALUES ('customer', 1999)"#
                );
                let mut n = t * 1_000_003;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    conn.transaction::<_, outbox::Error, _>(|conn| {
                        conn.batch_execute(&insert)?;
                        if kind == Kind::Enqueue {
                            outbox.enqueue(
                                conn,
                                &OrderPlaced {
                                    order_id: n,
                                    customer: "customer".into(),
                                    note: "x".repeat(440),
                                },
                            )?;
                        }
                        Ok(())
                    })
                    .expect("transaction");
                    commits.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    // Let every connection start before counting.
    std::thread::sleep(Duration::from_millis(300));
    let start_count = commits.load(Ordering::Relaxed);
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(SECONDS));
    let done = commits.load(Ordering::Relaxed) - start_count;
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("producer thread");
    }
    done as f64 / elapsed
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn spread(median: f64, xs: &[f64]) -> String {
    let min = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let max = xs.iter().copied().fold(0.0, f64::max);
    format!("{median:.0} ({min:.0}-{max:.0})")
}
