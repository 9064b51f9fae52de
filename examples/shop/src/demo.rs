//! The demo: every service of the shop in one process, under load, with
//! faults on request, ending in a report and a consistency check.
//!
//! It uses a RabbitMQ virtual host and PostgreSQL schemas of its own (named
//! by [`DemoConfig::prefix`]), made fresh at the start and removed at the
//! end, so runs never see each other's messages or rows.
//!
//! Here: the run, its settings and its report. The load is in `load`, the
//! faults in `faults`, the consistency checks in `checks`.

mod checks;
mod faults;
mod load;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use consumer::{Consumer, ConsumerConfig, Stats};
use diesel::connection::SimpleConnection;
use diesel::{Connection, PgConnection};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use self::checks::{caught_up, consistency};
use self::faults::{
    Faults, Fleet, Restartable, Scene, consumer_task, crash_tag, rabbitmqctl, relay_task,
};
use self::load::{Load, Targets, drive_load};
use crate::billing::Latencies;
use crate::order::OrderService;
use crate::users::UsersService;
use crate::{billing, customers, inventory, logistics, order, payment, service_url, users};

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
    /// Users registered before the orders; order i is placed by user i mod
    /// `users` (at least 1).
    pub users: usize,
    /// Rename a user after every n-th order (0: none).
    pub rename_every: usize,
    /// Percent of the orders paid with the card payment declines (0 to 100).
    pub fail_payments: u32,
    /// Units of the scarce SKU (`sku-10`) on the shelf; the others are
    /// plentiful. `None`: a quarter of the orders' count, so some orders
    /// are refused for want of stock.
    pub scarce_stock: Option<u32>,
    /// Kill and restart relays and consumers, and cut broker connections,
    /// while the load runs.
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
            users: 40,
            rename_every: 25,
            fail_payments: 10,
            scarce_stock: None,
            faults: false,
            progress: true,
            settle_timeout: Duration::from_secs(120),
        }
    }

    fn scarce_units(&self) -> i32 {
        let units = self
            .scarce_stock
            .unwrap_or_else(|| u32::try_from(self.orders / 4).unwrap_or(u32::MAX));
        i32::try_from(units).unwrap_or(i32::MAX)
    }
}

/// The SKUs the load orders: `sku-0` to `sku-10`.
const SKUS: usize = 11;
/// The one SKU with little stock, so some orders are refused.
const SCARCE_SKU: usize = 10;
/// Stock of every other SKU: more than any run orders.
const PLENTY: i32 = 1_000_000;

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

/// How the orders ended, from the order service's table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcomes {
    /// Paid and confirmed.
    pub confirmed: u64,
    /// Cancelled by their customer.
    pub cancelled_by_customer: u64,
    /// Cancelled for want of stock.
    pub out_of_stock: u64,
    /// Cancelled because the payment was declined.
    pub payment_declined: u64,
    /// Payments given back (the order was cancelled after its payment).
    pub refunds: u64,
}

/// What the demo saw.
#[derive(Debug, Clone)]
pub struct Report {
    /// Users registered.
    pub users_registered: u64,
    /// Renames made.
    pub users_renamed: u64,
    /// Orders the order service accepted.
    pub orders_placed: u64,
    /// Cancellations the load asked for.
    pub cancel_requests: u64,
    /// Of those, accepted (the rest found the order already cancelled by
    /// the saga: answered 409).
    pub orders_cancelled: u64,
    /// How the orders ended.
    pub outcomes: Outcomes,
    /// Events written to each producer's outbox: (service, written, relayed).
    pub events: Vec<(&'static str, u64, u64)>,
    /// Events written to the outboxes, all services.
    pub events_enqueued: u64,
    /// Of those, published to RabbitMQ.
    pub events_relayed: u64,
    /// Each consumer's counters.
    pub consumers: Vec<(&'static str, Stats)>,
    /// Faults injected: (relay restarts, consumer crashes, broker connection cuts).
    pub faults: (u32, u32, u32),
    /// What each fault hit, in order.
    pub fault_log: Vec<String>,
    /// Order commit to billing handler start: p50 and p99, in ms.
    pub latency_ms: (f64, f64),
    /// Order placed to order confirmed, through the saga: p50 and p99, in ms.
    pub saga_ms: (f64, f64),
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

    /// A consumer's counters by name.
    pub fn consumer(&self, name: &str) -> Option<Stats> {
        self.consumers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, s)| *s)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "== shop demo report ({:.1} s) ==",
            self.elapsed.as_secs_f64()
        )?;
        writeln!(
            f,
            "users registered    {:>8}  renamed {}",
            self.users_registered, self.users_renamed
        )?;
        writeln!(f, "orders placed       {:>8}", self.orders_placed)?;
        let o = &self.outcomes;
        writeln!(f, "  confirmed         {:>8}", o.confirmed)?;
        writeln!(
            f,
            "  cancelled         {:>8}  by customer {} (of {} asked), out of stock {}, payment declined {}",
            o.cancelled_by_customer + o.out_of_stock + o.payment_declined,
            o.cancelled_by_customer,
            self.cancel_requests,
            o.out_of_stock,
            o.payment_declined
        )?;
        writeln!(f, "  payments refunded {:>8}", o.refunds)?;
        let per_service: Vec<String> = self
            .events
            .iter()
            .map(|(name, written, _)| format!("{name} {written}"))
            .collect();
        writeln!(
            f,
            "events enqueued     {:>8}  ({})",
            self.events_enqueued,
            per_service.join(", ")
        )?;
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
        writeln!(
            f,
            "placed -> confirmed (saga): p50 {:.1} ms, p99 {:.1} ms",
            self.saga_ms.0, self.saga_ms.1
        )?;
        let (relay, consumer, cuts) = self.faults;
        write!(
            f,
            "faults: {relay} relay kills, {consumer} consumer kills, {cuts} broker connection cuts"
        )?;
        if self.fault_log.is_empty() {
            writeln!(f)?;
        } else {
            writeln!(f, " ({})", self.fault_log.join(", "))?;
        }
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

/// The schemas of the services, one each.
#[derive(Debug, Clone)]
struct Schemas {
    order: String,
    billing: String,
    logistics: String,
    users: String,
    inventory: String,
    payment: String,
}

impl Schemas {
    fn new(prefix: &str) -> Self {
        Schemas {
            order: format!("{prefix}_order"),
            billing: format!("{prefix}_billing"),
            logistics: format!("{prefix}_logistics"),
            users: format!("{prefix}_users"),
            inventory: format!("{prefix}_inventory"),
            payment: format!("{prefix}_payment"),
        }
    }

    /// Each schema with the service's tables.
    fn with_tables(&self) -> [(&str, &[&str]); 6] {
        [
            (&self.order, &[order::SCHEMA_SQL, customers::SCHEMA_SQL]),
            (&self.billing, &[billing::SCHEMA_SQL]),
            (&self.logistics, &[logistics::SCHEMA_SQL]),
            (&self.users, &[users::SCHEMA_SQL]),
            (&self.inventory, &[inventory::SCHEMA_SQL]),
            (&self.payment, &[payment::SCHEMA_SQL]),
        ]
    }

    /// The services that produce events, with their schemas (and outboxes).
    fn producers(&self) -> [(&'static str, &str); 5] {
        [
            ("order", &self.order),
            ("logistics", &self.logistics),
            ("users", &self.users),
            ("inventory", &self.inventory),
            ("payment", &self.payment),
        ]
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
    let schemas = Schemas::new(&config.prefix);
    let mut admin = PgConnection::establish(&config.database_url)
        .with_context(|| format!("connecting to {}", outbox::redact_url(&config.database_url)))?;
    for (schema, sqls) in schemas.with_tables() {
        admin.batch_execute(&format!(
            r#"DROP SCHEMA IF EXISTS "{schema}" CASCADE; CREATE SCHEMA "{schema}""#
        ))?;
        let mut conn = PgConnection::establish(&service_url(&config.database_url, schema))?;
        crate::outbox_in(schema)?.migrate(&mut conn)?;
        for sql in sqls {
            conn.batch_execute(sql)?;
        }
    }
    {
        let mut conn =
            PgConnection::establish(&service_url(&config.database_url, &schemas.inventory))?;
        for n in 0..SKUS {
            let units = if n == SCARCE_SKU {
                config.scarce_units()
            } else {
                PLENTY
            };
            inventory::receive(&mut conn, &sku(n), units)?;
        }
    }

    let relay_for = |schema: &str, workers: u32| relay::RelayConfig {
        database_url: config.database_url.clone(),
        amqp_url: amqp_url.clone(),
        schema: schema.to_owned(),
        workers,
        poll_interval: Duration::from_millis(500),
        retry: outbox::RetryPolicy {
            initial: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            ..outbox::RetryPolicy::default()
        },
        // Published rows are kept (the schemas go at the end), so the
        // report counts every event each service wrote.
        retention: Some(Duration::from_secs(3600)),
        ..relay::RelayConfig::default()
    };
    let consumer_config = |name: &str, schema: &str, lanes: usize| {
        // The application name lets a simulated crash find its sessions.
        let url = format!(
            "{}&application_name={}",
            service_url(&config.database_url, schema),
            crash_tag(&config.prefix, name)
        );
        let mut c = ConsumerConfig::new(name, &url, &amqp_url);
        c.schema = schema.to_owned();
        c.lanes = lanes;
        c.retry.max_delay = Duration::from_secs(2);
        c
    };
    let latencies: Latencies = Latencies::default();
    // Lanes are connections, and PostgreSQL takes 100: the busy consumers
    // get 4, the new services fewer. Inventory and payment get one: every
    // reservation locks the same few stock rows, so more lanes would only
    // queue on those locks.
    let consumers: Vec<(&'static str, Consumer)> = vec![
        (
            "billing",
            billing::consumer(
                consumer_config("billing", &schemas.billing, 4),
                Some(latencies.clone()),
            )?,
        ),
        (
            "logistics",
            logistics::consumer(consumer_config("logistics", &schemas.logistics, 4))?,
        ),
        (
            "order",
            order::consumer(consumer_config("order", &schemas.order, 4))?,
        ),
        (
            "inventory",
            inventory::consumer(consumer_config("inventory", &schemas.inventory, 1))?,
        ),
        (
            "payment",
            payment::consumer(consumer_config("payment", &schemas.payment, 1))?,
        ),
        (
            "users",
            users::consumer(consumer_config("users", &schemas.users, 2))?,
        ),
    ];

    // Bind before anything is published: an event published before its
    // consumer's binding exists never reaches that consumer.
    for (_, c) in &consumers {
        c.declare().await?;
    }
    // A relay per producing service; the order service's is the busiest.
    let mut fleet = Fleet {
        relays: schemas
            .producers()
            .iter()
            .map(|(name, schema)| {
                let workers = if *name == "order" { 2 } else { 1 };
                (
                    *name,
                    Restartable::new(relay_task(relay_for(schema, workers))),
                )
            })
            .collect(),
        consumers: consumers
            .into_iter()
            .map(|(name, c)| {
                let running = Restartable::new(consumer_task(c.clone()));
                (name, c, running)
            })
            .collect(),
    };

    // The two HTTP services, each on its own port: neither calls the other.
    let http_stop = CancellationToken::new();
    let order_service = Arc::new(OrderService::new(
        &service_url(&config.database_url, &schemas.order),
        &schemas.order,
    )?);
    let (order_addr, order_server) = serve(order::router(order_service), http_stop.clone()).await?;
    let users_service = Arc::new(UsersService::new(
        &service_url(&config.database_url, &schemas.users),
        &schemas.users,
    )?);
    let (users_addr, users_server) = serve(users::router(users_service), http_stop.clone()).await?;

    // Load, faults and progress run side by side.
    let counts = Arc::new(Load::default());
    let load = tokio::spawn(drive_load(
        config.clone(),
        Targets {
            order: order_addr,
            users: users_addr,
            database_url: config.database_url.clone(),
            order_schema: schemas.order.clone(),
        },
        Arc::clone(&counts),
    ));
    let mut faults = Faults::default();
    let scene = Scene {
        database_url: &config.database_url,
        vhost,
        prefix: &config.prefix,
    };
    // A fault a second, each kind in turn. One that takes long (rabbitmqctl
    // starts an Erlang VM each time) delays the next instead of bunching
    // them up.
    let load_started = Instant::now();
    let second = Duration::from_secs(1);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + second, second);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut round = 0u32;
    while !load.is_finished() {
        tick.tick().await;
        if config.faults {
            faults.inject(round, &mut fleet, &scene).await?;
            round += 1;
        }
        if config.progress {
            println!(
                "[{:>5.1}s] users {:>4}  placed {:>6}  cancelled {:>5}  applied: {}",
                load_started.elapsed().as_secs_f64(),
                counts.registered.load(Ordering::Relaxed),
                counts.placed.load(Ordering::Relaxed),
                counts.cancelled.load(Ordering::Relaxed),
                applied(&fleet),
            );
        }
    }
    let load_error = load.await?.err();

    // Wait until every service has caught up with what was ordered.
    let placed = counts.placed.load(Ordering::Relaxed);
    let deadline = Instant::now() + config.settle_timeout;
    loop {
        let settled = {
            let url = config.database_url.clone();
            let s = schemas.clone();
            tokio::task::spawn_blocking(move || caught_up(&url, &s, placed)).await??
        };
        if settled || Instant::now() > deadline {
            break;
        }
        if config.progress {
            println!("waiting for the consumers: applied: {}", applied(&fleet));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    http_stop.cancel();
    let _ = order_server.await;
    let _ = users_server.await;
    let names: Vec<&str> = fleet.consumers.iter().map(|(n, _, _)| *n).collect();
    let dead_letters = dead_letter_count(&amqp_url, &names).await;
    let stats = fleet
        .consumers
        .iter()
        .map(|(n, c, _)| (*n, c.stats()))
        .collect();
    fleet.stop().await;

    let url = config.database_url.clone();
    let s = schemas.clone();
    let (mut checks, figures) =
        tokio::task::spawn_blocking(move || consistency(&url, &s, placed)).await??;
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
        users_registered: counts.registered.load(Ordering::Relaxed),
        users_renamed: counts.renamed.load(Ordering::Relaxed),
        orders_placed: placed,
        cancel_requests: counts.cancel_requests.load(Ordering::Relaxed),
        orders_cancelled: counts.cancelled.load(Ordering::Relaxed),
        outcomes: figures.outcomes,
        events_enqueued: figures.events.iter().map(|e| e.1).sum(),
        events_relayed: figures.events.iter().map(|e| e.2).sum(),
        events: figures.events,
        consumers: stats,
        faults: (faults.relay_kills, faults.consumer_kills, faults.cuts),
        fault_log: faults.log,
        latency_ms,
        saga_ms: figures.saga_ms,
        dead_letters,
        checks,
        elapsed: started.elapsed(),
    };
    // A failed run keeps its schemas for inspection.
    if report.passed() {
        let mut admin = PgConnection::establish(&config.database_url)?;
        for (schema, _) in schemas.with_tables() {
            admin.batch_execute(&format!(r#"DROP SCHEMA IF EXISTS "{schema}" CASCADE"#))?;
        }
    }
    Ok(report)
}

/// `sku-<n>`, as the load orders them.
fn sku(n: usize) -> String {
    format!("sku-{n}")
}

/// Every consumer's applied count, for the progress lines.
fn applied(fleet: &Fleet) -> String {
    fleet
        .consumers
        .iter()
        .map(|(n, c, _)| format!("{n} {}", c.stats().applied))
        .collect::<Vec<_>>()
        .join("  ")
}

/// Serves `app` on a free local port until `stop`.
async fn serve(
    app: axum::Router,
    stop: CancellationToken,
) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
    });
    Ok((addr, server))
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
