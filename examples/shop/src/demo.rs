//! The demo: every service of the shop in one process, under load, with
//! faults on request, ending in a report and a consistency check.
//!
//! It uses a RabbitMQ virtual host and PostgreSQL schemas of its own (named
//! by [`DemoConfig::prefix`]), made fresh at the start and removed at the
//! end, so runs never see each other's messages or rows.

use std::fmt;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use consumer::{Consumer, ConsumerConfig, Stats};
use diesel::connection::SimpleConnection;
use diesel::sql_types::BigInt;
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::billing::Latencies;
use crate::events::Line;
use crate::order::{NewOrder, OrderService};
use crate::{billing, http, logistics, order, service_url};

/// What the demo does.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// PostgreSQL URL (the schemas are made in this database).
    pub database_url: String,
    /// RabbitMQ host and port with credentials, without the vhost
    /// (`amqp://guest:guest@127.0.0.1:5672`).
    pub amqp_base: String,
    /// Names the vhost and schemas (`<prefix>_order`, ...).
    pub prefix: String,
    /// Orders to place.
    pub orders: usize,
    /// Orders placed per second (0: as fast as the service takes them).
    pub rate: u32,
    /// Cancel every n-th order (0: none).
    pub cancel_every: usize,
    /// Place every n-th order as `order.v2.submitted` (0: none).
    pub v2_every: usize,
    /// Kill and restart the relay and a consumer, and cut broker
    /// connections, while the load runs.
    pub faults: bool,
    /// Print a progress line every second.
    pub progress: bool,
    /// How long to wait for every event to be applied after the load.
    pub settle_timeout: Duration,
}

impl DemoConfig {
    /// Defaults for a local run against this machine's services.
    pub fn local(prefix: &str) -> Self {
        DemoConfig {
            database_url: std::env::var("DATABASE_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into()),
            amqp_base: std::env::var("AMQP_BASE")
                .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672".into()),
            prefix: prefix.to_owned(),
            orders: 500,
            rate: 50,
            cancel_every: 5,
            v2_every: 3,
            faults: false,
            progress: true,
            settle_timeout: Duration::from_secs(120),
        }
    }
}

/// One consistency check.
#[derive(Debug, Clone)]
pub struct Check {
    /// What was checked.
    pub name: &'static str,
    /// Whether it held.
    pub ok: bool,
    /// The figures behind it.
    pub detail: String,
}

/// What the demo saw.
#[derive(Debug, Clone)]
pub struct Report {
    /// Orders the order service accepted.
    pub orders_placed: u64,
    /// Orders cancelled.
    pub orders_cancelled: u64,
    /// Events written to the outboxes (orders, cancellations, shipments).
    pub events_enqueued: u64,
    /// Of those, published to RabbitMQ (no longer pending).
    pub events_relayed: u64,
    /// Each consumer's counters.
    pub consumers: Vec<(&'static str, Stats)>,
    /// Faults injected: (relay restarts, consumer crashes, broker connection cuts).
    pub faults: (u32, u32, u32),
    /// Order commit to billing handler start: p50 and p99, in ms.
    pub latency_ms: (f64, f64),
    /// Dead letters waiting in the consumers' dead-letter queues.
    pub dead_letters: u32,
    /// The consistency checks.
    pub checks: Vec<Check>,
    /// How long the run took.
    pub elapsed: Duration,
}

impl Report {
    /// Whether every check held.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "== shop demo report ({:.1} s) ==",
            self.elapsed.as_secs_f64()
        )?;
        writeln!(f, "orders placed       {:>8}", self.orders_placed)?;
        writeln!(f, "orders cancelled    {:>8}", self.orders_cancelled)?;
        writeln!(f, "events enqueued     {:>8}", self.events_enqueued)?;
        writeln!(f, "events relayed      {:>8}", self.events_relayed)?;
        for (name, s) in &self.consumers {
            writeln!(
                f,
                "{name:<10} applied {:>6}  duplicates absorbed {:>4}  held back {:>4}  retried {:>4}  dead-lettered {:>3}",
                s.applied, s.duplicates, s.held, s.retried, s.dead_lettered
            )?;
        }
        writeln!(f, "dead letters queued {:>8}", self.dead_letters)?;
        writeln!(
            f,
            "commit -> billing handler: p50 {:.1} ms, p99 {:.1} ms",
            self.latency_ms.0, self.latency_ms.1
        )?;
        let (relay, consumer, cuts) = self.faults;
        writeln!(
            f,
            "faults: {relay} relay kills, {consumer} consumer kills, {cuts} broker connection cuts"
        )?;
        writeln!(f, "consistency:")?;
        for c in &self.checks {
            writeln!(
                f,
                "  [{}] {}: {}",
                if c.ok { "ok" } else { "FAILED" },
                c.name,
                c.detail
            )?;
        }
        write!(f, "{}", if self.passed() { "PASSED" } else { "FAILED" })
    }
}

/// The schemas of the three services.
struct Schemas {
    order: String,
    billing: String,
    logistics: String,
}

/// A task that can be killed (aborted, as a crash would) and started again.
struct Restartable {
    start: Box<dyn Fn(CancellationToken) -> JoinHandle<()> + Send>,
    token: CancellationToken,
    task: JoinHandle<()>,
}

impl Restartable {
    fn new(start: Box<dyn Fn(CancellationToken) -> JoinHandle<()> + Send>) -> Self {
        let token = CancellationToken::new();
        let task = start(token.clone());
        Restartable { start, token, task }
    }

    /// Kills the task hard (no graceful shutdown) and starts a new one.
    fn crash_and_restart(&mut self) {
        self.abort();
        self.restart();
    }

    /// Stops the task where it is.
    fn abort(&mut self) {
        self.task.abort();
    }

    /// Starts a new task.
    fn restart(&mut self) {
        self.token = CancellationToken::new();
        self.task = (self.start)(self.token.clone());
    }

    async fn stop(self) {
        self.token.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(30), self.task).await;
    }
}

/// Runs the demo and returns its report; see [`DemoConfig`].
///
/// # Errors
///
/// When PostgreSQL or RabbitMQ cannot be set up (a failed consistency check
/// is in the report, not an error).
pub async fn run(config: &DemoConfig) -> anyhow::Result<Report> {
    let started = Instant::now();
    let vhost = config.prefix.clone();
    rabbitmqctl(&["add_vhost", &vhost])?;
    rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"])?;
    let result = run_in(config, &vhost, started).await;
    let _ = rabbitmqctl(&["delete_vhost", &vhost]);
    result
}

async fn run_in(config: &DemoConfig, vhost: &str, started: Instant) -> anyhow::Result<Report> {
    let amqp_url = format!("{}/{}", config.amqp_base, vhost.replace('/', "%2f"));
    let schemas = Schemas {
        order: format!("{}_order", config.prefix),
        billing: format!("{}_billing", config.prefix),
        logistics: format!("{}_logistics", config.prefix),
    };
    let mut admin = PgConnection::establish(&config.database_url)
        .with_context(|| format!("connecting to {}", outbox::redact_url(&config.database_url)))?;
    for (schema, sql) in [
        (&schemas.order, order::SCHEMA_SQL),
        (&schemas.billing, billing::SCHEMA_SQL),
        (&schemas.logistics, logistics::SCHEMA_SQL),
    ] {
        admin.batch_execute(&format!(
            r#"DROP SCHEMA IF EXISTS "{schema}" CASCADE; CREATE SCHEMA "{schema}""#
        ))?;
        let mut conn = PgConnection::establish(&service_url(&config.database_url, schema))?;
        outbox::Outbox::new(outbox::Config {
            schema: schema.clone(),
            ..outbox::Config::default()
        })?
        .migrate(&mut conn)?;
        conn.batch_execute(sql)?;
    }

    let relay_for = |schema: &str| relay::RelayConfig {
        database_url: config.database_url.clone(),
        amqp_url: amqp_url.clone(),
        schema: schema.to_owned(),
        workers: 2,
        poll_interval: Duration::from_millis(500),
        retry: outbox::RetryPolicy {
            initial: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            ..outbox::RetryPolicy::default()
        },
        ..relay::RelayConfig::default()
    };
    let consumer_config = |name: &str, schema: &str| {
        // The application name lets a simulated crash find its sessions.
        let url = format!(
            "{}&application_name={}",
            service_url(&config.database_url, schema),
            crash_tag(&config.prefix, name)
        );
        let mut c = ConsumerConfig::new(name, &url, &amqp_url);
        c.schema = schema.to_owned();
        c.lanes = 4;
        c.retry.max_delay = Duration::from_secs(2);
        c
    };
    let latencies: Latencies = Latencies::default();
    let billing = billing::consumer(
        consumer_config("billing", &schemas.billing),
        Some(latencies.clone()),
    )?;
    let logistics = logistics::consumer(consumer_config("logistics", &schemas.logistics))?;
    let order_events = Consumer::builder(consumer_config("order", &schemas.order))
        .handle("logistics", "logistics.*.dispatched", order::on_dispatched)
        .build()?;
    let consumers = [
        ("billing", billing),
        ("logistics", logistics),
        ("order", order_events),
    ];

    // Bind before anything is published: an event published before its
    // consumer's binding exists never reaches that consumer.
    for (_, c) in &consumers {
        c.declare().await?;
    }
    let mut order_relay = Restartable::new(relay_task(relay_for(&schemas.order)));
    let logistics_relay = Restartable::new(relay_task(relay_for(&schemas.logistics)));
    let mut running: Vec<Restartable> = consumers
        .iter()
        .map(|(_, c)| Restartable::new(consumer_task(c.clone())))
        .collect();

    let service = Arc::new(OrderService::new(
        &service_url(&config.database_url, &schemas.order),
        &schemas.order,
    )?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let http_stop = CancellationToken::new();
    let server = {
        let stop = http_stop.clone();
        let app = order::router(Arc::clone(&service));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
        })
    };

    // Load, faults and progress run side by side.
    let placed = Arc::new(AtomicU64::new(0));
    let cancelled = Arc::new(AtomicU64::new(0));
    let load = tokio::spawn(drive_load(
        config.clone(),
        addr,
        Arc::clone(&placed),
        Arc::clone(&cancelled),
    ));
    let mut faults = (0u32, 0u32, 0u32);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut second = 0u32;
    while !load.is_finished() {
        tick.tick().await;
        second += 1;
        if config.faults && second.is_multiple_of(2) {
            match (second / 2 - 1) % 3 {
                0 => {
                    order_relay.crash_and_restart();
                    faults.0 += 1;
                }
                1 => {
                    // The billing consumer crashes mid-work: as when its
                    // process dies, its tasks stop and its database and
                    // broker connections drop (open transactions roll back,
                    // unacked deliveries go back to the queue).
                    let (url, vhost) = (config.database_url.clone(), vhost.to_owned());
                    let tag = crash_tag(&config.prefix, "billing");
                    running[0].abort();
                    tokio::task::spawn_blocking(move || {
                        kill_connections(&url, &tag, &vhost, "consumer billing")
                    })
                    .await??;
                    running[0].restart();
                    faults.1 += 1;
                }
                _ => {
                    let vhost = vhost.to_owned();
                    let cut = tokio::task::spawn_blocking(move || close_connections(&vhost, None))
                        .await??;
                    faults.2 += u32::from(cut > 0);
                }
            }
        }
        if config.progress {
            println!(
                "[{second:>3}s] placed {:>6}  cancelled {:>5}  billing applied {:>6}  logistics applied {:>6}  order applied {:>6}",
                placed.load(Ordering::Relaxed),
                cancelled.load(Ordering::Relaxed),
                consumers[0].1.stats().applied,
                consumers[1].1.stats().applied,
                consumers[2].1.stats().applied,
            );
        }
    }
    let load_error = load.await?.err();

    // Wait until every service has caught up with what was ordered.
    let expected_orders = placed.load(Ordering::Relaxed);
    let expected_cancels = cancelled.load(Ordering::Relaxed);
    let deadline = Instant::now() + config.settle_timeout;
    loop {
        let settled = {
            let url = config.database_url.clone();
            let s = (
                schemas.order.clone(),
                schemas.billing.clone(),
                schemas.logistics.clone(),
            );
            tokio::task::spawn_blocking(move || {
                caught_up(&url, &s, expected_orders, expected_cancels)
            })
            .await??
        };
        if settled || Instant::now() > deadline {
            break;
        }
        if config.progress {
            println!(
                "waiting for the consumers: billing applied {}, logistics applied {}, order applied {}",
                consumers[0].1.stats().applied,
                consumers[1].1.stats().applied,
                consumers[2].1.stats().applied
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    http_stop.cancel();
    let _ = server.await;
    let dead_letters = dead_letter_count(&amqp_url, &["billing", "logistics", "order"]).await;
    for r in running {
        r.stop().await;
    }
    order_relay.stop().await;
    logistics_relay.stop().await;

    let url = config.database_url.clone();
    let s = (
        schemas.order.clone(),
        schemas.billing.clone(),
        schemas.logistics.clone(),
    );
    let (mut checks, pending) = tokio::task::spawn_blocking(move || {
        consistency(&url, &s, expected_orders, expected_cancels)
    })
    .await??;
    checks.push(Check {
        name: "no dead letters",
        ok: dead_letters == 0,
        detail: format!("{dead_letters} in the consumers' dead-letter queues"),
    });
    if let Some(e) = load_error {
        checks.push(Check {
            name: "load ran",
            ok: false,
            detail: e.to_string(),
        });
    }
    let events_enqueued = expected_orders * 2 + expected_cancels;
    let latency_ms = {
        let mut l = latencies.lock().unwrap_or_else(|p| p.into_inner()).clone();
        l.sort_unstable();
        let at = |q: f64| {
            l.get(((l.len() as f64 * q) as usize).min(l.len().saturating_sub(1)))
                .map_or(0.0, |us| *us as f64 / 1000.0)
        };
        (at(0.5), at(0.99))
    };
    let report = Report {
        orders_placed: expected_orders,
        orders_cancelled: expected_cancels,
        events_enqueued,
        events_relayed: events_enqueued.saturating_sub(pending),
        consumers: consumers.iter().map(|(n, c)| (*n, c.stats())).collect(),
        faults,
        latency_ms,
        dead_letters,
        checks,
        elapsed: started.elapsed(),
    };
    // A failed run keeps its schemas for inspection.
    if report.passed() {
        let mut admin = PgConnection::establish(&config.database_url)?;
        for schema in [&schemas.order, &schemas.billing, &schemas.logistics] {
            admin.batch_execute(&format!(r#"DROP SCHEMA IF EXISTS "{schema}" CASCADE"#))?;
        }
    }
    Ok(report)
}

fn relay_task(
    config: relay::RelayConfig,
) -> Box<dyn Fn(CancellationToken) -> JoinHandle<()> + Send> {
    Box::new(move |token: CancellationToken| {
        let config = config.clone();
        tokio::spawn(async move {
            match relay::Relay::new(config) {
                Ok(relay) => {
                    if let Err(e) = relay.run(async move { token.cancelled().await }).await {
                        tracing::error!(error = %e, "relay stopped");
                    }
                }
                Err(e) => tracing::error!(error = %e, "relay config"),
            }
        })
    })
}

fn consumer_task(consumer: Consumer) -> Box<dyn Fn(CancellationToken) -> JoinHandle<()> + Send> {
    Box::new(move |token: CancellationToken| {
        let consumer = consumer.clone();
        tokio::spawn(async move {
            if let Err(e) = consumer.run(token).await {
                tracing::error!(error = %e, "consumer stopped");
            }
        })
    })
}

/// Places the orders over HTTP at the configured rate, cancelling some.
async fn drive_load(
    config: DemoConfig,
    addr: SocketAddr,
    placed: Arc<AtomicU64>,
    cancelled: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let pace = (config.rate > 0).then(|| Duration::from_secs_f64(1.0 / f64::from(config.rate)));
    let mut next = tokio::time::Instant::now();
    let mut inflight = tokio::task::JoinSet::new();
    for i in 1..=config.orders {
        if let Some(pace) = pace {
            next += pace;
            tokio::time::sleep_until(next).await;
        }
        while inflight.len() >= 8 {
            if let Some(r) = inflight.join_next().await {
                r??;
            }
        }
        let order = NewOrder {
            customer: format!("customer-{}", i % 37),
            lines: (0..1 + i % 3)
                .map(|l| Line {
                    sku: format!("sku-{}", (i + l) % 11),
                    qty: 1 + i32::try_from((i + l) % 4).unwrap_or(0),
                    price_cents: 250 + i64::try_from(((i * 7) + l) % 900).unwrap_or(0),
                })
                .collect(),
            currency: (config.v2_every > 0 && i % config.v2_every == 0).then(|| "EUR".to_owned()),
        };
        let cancel = config.cancel_every > 0 && i % config.cancel_every == 0;
        let (placed, cancelled) = (Arc::clone(&placed), Arc::clone(&cancelled));
        inflight.spawn(async move {
            let body = serde_json::to_vec(&order)?;
            let created = http::request(addr, "POST", "/orders", Some(&body)).await?;
            if created.status != 201 {
                bail!("POST /orders answered {}: {}", created.status, created.body);
            }
            placed.fetch_add(1, Ordering::Relaxed);
            if cancel {
                let id = created.body["id"].as_str().unwrap_or_default().to_owned();
                let r = http::request(addr, "POST", &format!("/orders/{id}/cancel"), None).await?;
                if r.status != 200 {
                    bail!("cancel answered {}: {}", r.status, r.body);
                }
                cancelled.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        });
    }
    while let Some(r) = inflight.join_next().await {
        r??;
    }
    Ok(())
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

fn count(conn: &mut PgConnection, sql: &str) -> anyhow::Result<i64> {
    Ok(diesel::sql_query(sql).get_result::<Count>(conn)?.n)
}

/// Whether every consumer has applied everything the orders imply.
fn caught_up(
    url: &str,
    (o, b, l): &(String, String, String),
    orders: u64,
    cancels: u64,
) -> anyhow::Result<bool> {
    let mut conn = PgConnection::establish(url)?;
    let ledger = count(
        &mut conn,
        &format!(r#"SELECT count(*) AS n FROM "{b}".ledger"#),
    )?;
    let cancelled_shipments = count(
        &mut conn,
        &format!(r#"SELECT count(*) AS n FROM "{l}".shipments WHERE status = 'cancelled'"#),
    )?;
    let noted = count(
        &mut conn,
        &format!(r#"SELECT count(*) AS n FROM "{o}".orders WHERE shipment_id IS NOT NULL"#),
    )?;
    let want = i64::try_from(orders + cancels)?;
    Ok(ledger >= want
        && cancelled_shipments >= i64::try_from(cancels)?
        && noted >= i64::try_from(orders)?)
}

/// Checks every service's tables against the orders; also returns the
/// events still pending in the outboxes.
fn consistency(
    url: &str,
    (o, b, l): &(String, String, String),
    orders: u64,
    cancels: u64,
) -> anyhow::Result<(Vec<Check>, u64)> {
    let mut conn = PgConnection::establish(url)?;
    let mut checks = Vec::new();
    let mut check =
        |name: &'static str, sql: String, want: i64, what: &str| -> anyhow::Result<()> {
            let got = count(&mut conn, &sql)?;
            checks.push(Check {
                name,
                ok: got == want,
                detail: format!("{got} {what} (expected {want})"),
            });
            Ok(())
        };
    let orders_i = i64::try_from(orders)?;
    let cancels_i = i64::try_from(cancels)?;
    check(
        "orders stored",
        format!(r#"SELECT count(*) AS n FROM "{o}".orders"#),
        orders_i,
        "orders",
    )?;
    check(
        "one charge per order, for its total",
        format!(
            r#"SELECT count(*) AS n FROM "{o}".orders ord
               JOIN "{b}".ledger c ON c.order_id = ord.id AND c.entry = 'charge' AND c.amount_cents = ord.total_cents"#
        ),
        orders_i,
        "matching charges",
    )?;
    check(
        "no order charged twice",
        format!(
            r#"SELECT count(*) AS n FROM (SELECT order_id FROM "{b}".ledger WHERE entry = 'charge' GROUP BY order_id HAVING count(*) > 1) t"#
        ),
        0,
        "orders charged more than once",
    )?;
    check(
        "one reversal per cancelled order",
        format!(
            r#"SELECT count(*) AS n FROM "{o}".orders ord
               JOIN "{b}".ledger r ON r.order_id = ord.id AND r.entry = 'reversal' AND r.amount_cents = -ord.total_cents
               WHERE ord.status = 'cancelled'"#
        ),
        cancels_i,
        "matching reversals",
    )?;
    check(
        "ledger balance equals the open orders",
        format!(
            r#"SELECT ((SELECT coalesce(sum(amount_cents), 0) FROM "{b}".ledger)
                     - (SELECT coalesce(sum(total_cents), 0) FROM "{o}".orders WHERE status <> 'cancelled'))::bigint AS n"#
        ),
        0,
        "cents of difference",
    )?;
    check(
        "one shipment per order",
        format!(
            r#"SELECT count(DISTINCT order_id) AS n FROM "{l}".shipments s JOIN "{o}".orders ord ON ord.id = s.order_id"#
        ),
        orders_i,
        "orders with a shipment",
    )?;
    check(
        "shipments cancelled exactly with their orders",
        format!(
            r#"SELECT count(*) AS n FROM "{l}".shipments s JOIN "{o}".orders ord ON ord.id = s.order_id
               WHERE (s.status = 'cancelled') <> (ord.status = 'cancelled')"#
        ),
        0,
        "mismatches",
    )?;
    check(
        "each order knows its shipment",
        format!(
            r#"SELECT count(*) AS n FROM "{o}".orders ord JOIN "{l}".shipments s ON s.id = ord.shipment_id AND s.order_id = ord.id"#
        ),
        orders_i,
        "orders noting their shipment",
    )?;
    let pending = count(
        &mut conn,
        &format!(
            r#"SELECT ((SELECT count(*) FROM "{o}".outbox_messages WHERE published_at IS NULL)
                     + (SELECT count(*) FROM "{l}".outbox_messages WHERE published_at IS NULL))::bigint AS n"#
        ),
    )?;
    checks.push(Check {
        name: "outboxes drained",
        ok: pending == 0,
        detail: format!("{pending} events still pending"),
    });
    Ok((checks, u64::try_from(pending)?))
}

async fn dead_letter_count(amqp_url: &str, consumers: &[&str]) -> u32 {
    let Ok(conn) =
        lapin::Connection::connect(amqp_url, lapin::ConnectionProperties::default()).await
    else {
        return u32::MAX;
    };
    let mut total = 0;
    for name in consumers {
        let Ok(channel) = conn.create_channel().await else {
            return u32::MAX;
        };
        match channel
            .queue_declare(
                format!("{name}.dead-letters").as_str().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await
        {
            Ok(q) => total += q.message_count(),
            Err(_) => return u32::MAX,
        }
    }
    let _ = conn.close(200, "counted".into()).await;
    total
}

fn rabbitmqctl(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .context("running rabbitmqctl (the demo manages its own RabbitMQ vhost)")?;
    if !out.status.success() {
        bail!(
            "rabbitmqctl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The `application_name` of a consumer's database sessions in this run.
fn crash_tag(prefix: &str, consumer: &str) -> String {
    format!("{prefix}-{consumer}")
}

/// What a process death does to its connections: ends the database
/// sessions named `tag` and closes the broker connections to `vhost` named
/// `connection`. An aborted task alone would leave both running.
fn kill_connections(url: &str, tag: &str, vhost: &str, connection: &str) -> anyhow::Result<()> {
    let mut conn = PgConnection::establish(url)?;
    diesel::sql_query(
        "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity WHERE application_name = $1",
    )
    .bind::<diesel::sql_types::Text, _>(tag)
    .get_result::<Count>(&mut conn)?;
    close_connections(vhost, Some(connection))?;
    Ok(())
}

/// Closes, from the broker's side, the client connections to `vhost`
/// (only those whose client properties mention `named`, when given).
fn close_connections(vhost: &str, named: Option<&str>) -> anyhow::Result<usize> {
    let listing = rabbitmqctl(&[
        "list_connections",
        "-q",
        "--no-table-headers",
        "pid",
        "vhost",
        "client_properties",
    ])?;
    let mut closed = 0;
    for line in listing.lines() {
        let mut fields = line.splitn(3, char::is_whitespace);
        let (Some(pid), Some(v), properties) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        if v == vhost
            && named.is_none_or(|n| properties.is_some_and(|p| p.contains(n)))
            && rabbitmqctl(&["close_connection", pid, "demo fault"]).is_ok()
        {
            closed += 1;
        }
    }
    Ok(closed)
}
