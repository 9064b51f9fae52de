//! The fault suite (`shop-chaos`, `scripts/chaos.sh`): producers enqueue
//! with plain SQL over four connections while two `outbox-relay` processes
//! and two consumers of two instances each (one bound to every routing key,
//! one to two of three) run on partition queues, and faults hit them all:
//! relay and consumer processes killed with SIGKILL and restarted, full
//! broker restarts (`rabbitmqctl stop_app` / `start_app`), every database
//! session terminated, every broker connection closed, and the partition
//! count changed mid-run. Then it counts, per consumer: committed, applied,
//! lost, applied twice, keys out of order, dead letters, held leftovers,
//! parked rows, drain time and the longest a queue went unserved.
//!
//! It restarts the broker and terminates database sessions: run it alone,
//! never beside other tests.
//!
//! - [`fleet`](self): the processes; `produce`: the producers; `monitor`:
//!   the queue watch; `checks`: the counts; [`member`]: a consumer
//!   instance's process.

mod checks;
mod fleet;
pub mod member;
mod monitor;
mod produce;

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use diesel::connection::SimpleConnection;
use diesel::{Connection, PgConnection, RunQueryDsl};
use tokio_util::sync::CancellationToken;

pub use checks::{ConsumerTally, Report};
use fleet::{Member, Recipe};
use produce::{Producer, ROUTES};

/// How a chaos run goes.
#[derive(Debug, Clone)]
pub struct ChaosConfig {
    /// PostgreSQL URL (the run makes a schema of its own in it).
    pub database_url: String,
    /// RabbitMQ URL.
    pub amqp_url: String,
    /// Events to commit.
    pub events: u64,
    /// Ordering keys they spread over.
    pub keys: u32,
    /// Producer connections.
    pub producers: u32,
    /// Events per second, all producers together (0: as fast as they go).
    pub rate: u32,
    /// Partition queues of each consumer at the start.
    pub partitions: u16,
    /// The partition count one instance is restarted with mid-run (the same
    /// as `partitions`: no change).
    pub repartition_to: u16,
    /// A relay is killed this often (the two in turn).
    pub relay_kill_every: Duration,
    /// A consumer instance is killed every so often, at random in this range.
    pub consumer_kill_every: (Duration, Duration),
    /// Full broker restarts, spread over the run.
    pub broker_restarts: usize,
    /// Times every database session is terminated.
    pub session_kills: usize,
    /// Times every broker connection is closed.
    pub connection_closes: usize,
    /// How long the consumers may take to catch up after producing.
    pub drain_timeout: Duration,
    /// Seed of the random choices (keys, routes, victims).
    pub seed: u64,
    /// The `outbox-relay` binary.
    pub relay_binary: PathBuf,
    /// This binary (its `consumer` command runs an instance).
    pub self_binary: PathBuf,
    /// Where each process's log goes.
    pub log_dir: PathBuf,
    /// Print progress while running.
    pub progress: bool,
}

/// The two consumers: one bound to every routing key, one to two of three
/// (a partial subscriber, whose order relies on `x-key-prev`).
fn consumers(prefix: &str) -> [(String, Vec<String>); 2] {
    [
        (
            format!("{prefix}_full"),
            ROUTES.iter().map(|r| (*r).to_owned()).collect(),
        ),
        (
            format!("{prefix}_partial"),
            vec![ROUTES[0].to_owned(), ROUTES[2].to_owned()],
        ),
    ]
}

/// Runs the suite and reports; the report says whether it passed.
///
/// # Errors
///
/// When the run cannot start (a binary missing, the database or broker
/// down). Faults the suite injects are not errors.
pub async fn run(config: &ChaosConfig) -> anyhow::Result<Report> {
    for binary in [&config.relay_binary, &config.self_binary] {
        if !binary.exists() {
            bail!(
                "{} is missing: build it first (scripts/chaos.sh does)",
                binary.display()
            );
        }
    }
    std::fs::create_dir_all(&config.log_dir)?;
    let schema = format!(
        "chaos_{}_{}",
        std::process::id(),
        &uuid::Uuid::now_v7().simple().to_string()[26..]
    );
    let url = crate::service_url(&config.database_url, &schema);
    setup_database(&config.database_url, &schema)?;
    let mut run = Run::new(config, &schema)?;
    let result = run.go(config, &url).await;
    let mut report = run.report;
    report.faults = run.faults.clone();
    match result {
        Ok(()) => {
            let mut conn = PgConnection::establish(&url)?;
            report.consumers.clear();
            for (name, routes) in consumers(&schema) {
                let dead = dead_letters(&config.amqp_url, &name).await;
                report
                    .consumers
                    .push(checks::tally(&mut conn, &name, &routes, dead));
            }
            (report.parked, report.pending) = checks::outbox_rows(&mut conn);
        }
        Err(e) => report.error = Some(format!("{e:#}")),
    }
    if report.passed() {
        cleanup(config, &schema).await;
    } else {
        println!(
            "kept schema {schema} and its queues for a look; logs in {}",
            config.log_dir.display()
        );
    }
    Ok(report)
}

/// The run's schema: the outbox and inbox tables, and the two tables the
/// checks count in.
fn setup_database(database_url: &str, schema: &str) -> anyhow::Result<()> {
    let mut conn = PgConnection::establish(database_url).context("connecting to PostgreSQL")?;
    crate::outbox_in(schema)?.migrate(&mut conn)?;
    conn.batch_execute(&format!(
        r#"SET search_path TO "{schema}";
           CREATE TABLE chaos_produced (
               id uuid PRIMARY KEY, ordering_key text NOT NULL, key_seq bigint NOT NULL,
               routing_key text NOT NULL, committed_at timestamptz NOT NULL DEFAULT clock_timestamp());
           CREATE TABLE chaos_applied (
               n bigserial PRIMARY KEY, consumer text NOT NULL, message_id uuid NOT NULL,
               ordering_key text, key_seq bigint, routing_key text NOT NULL,
               applied_at timestamptz NOT NULL DEFAULT clock_timestamp());
           CREATE INDEX ON chaos_applied (consumer, message_id);"#
    ))?;
    Ok(())
}

/// A run under way: its processes, its shared state, what it did.
struct Run {
    consumers: Vec<Member>,
    relays: Vec<Member>,
    report: Report,
    faults: Vec<(String, u32)>,
    broker: Arc<monitor::BrokerState>,
    served: Arc<Mutex<monitor::Served>>,
    rng: fastrand::Rng,
    schema: String,
}

impl Run {
    fn new(config: &ChaosConfig, schema: &str) -> anyhow::Result<Self> {
        let env = vec![
            ("DATABASE_URL".to_owned(), config.database_url.clone()),
            ("AMQP_URL".to_owned(), config.amqp_url.clone()),
            ("RUST_LOG".to_owned(), "info,lapin=warn".to_owned()),
        ];
        let mut consumers = Vec::new();
        for (name, routes) in self::consumers(schema) {
            for instance in 1..=2 {
                let recipe = Recipe {
                    name: format!(
                        "{}-{instance}",
                        name.trim_start_matches(&format!("{schema}_"))
                    ),
                    program: config.self_binary.clone(),
                    args: [
                        "consumer",
                        "--schema",
                        schema,
                        "--name",
                        &name,
                        "--exchange",
                        schema,
                        "--routes",
                        &routes.join(","),
                        "--partitions",
                        &config.partitions.to_string(),
                    ]
                    .map(str::to_owned)
                    .to_vec(),
                    env: env.clone(),
                };
                consumers.push(Member::start(recipe, &config.log_dir)?);
            }
        }
        Ok(Run {
            consumers,
            relays: Vec::new(),
            report: Report::default(),
            faults: Vec::new(),
            broker: Arc::default(),
            served: Arc::default(),
            rng: fastrand::Rng::with_seed(config.seed),
            schema: schema.to_owned(),
        })
    }

    async fn go(&mut self, config: &ChaosConfig, url: &str) -> anyhow::Result<()> {
        // Consumers first: an event published before its consumer's
        // bindings exist reaches nobody.
        wait_declared(url, &mut self.consumers).await?;
        for instance in 1..=2 {
            let recipe = Recipe {
                name: format!("relay-{instance}"),
                program: config.relay_binary.clone(),
                args: [
                    "run",
                    "--schema",
                    &self.schema,
                    "--http-addr",
                    "127.0.0.1:0",
                ]
                .map(str::to_owned)
                .to_vec(),
                env: vec![
                    ("DATABASE_URL".to_owned(), config.database_url.clone()),
                    ("AMQP_URL".to_owned(), config.amqp_url.clone()),
                ],
            };
            self.relays.push(Member::start(recipe, &config.log_dir)?);
        }
        let stop_watch = CancellationToken::new();
        let watch = tokio::spawn(monitor::watch(
            config.database_url.clone(),
            config.amqp_url.clone(),
            self.schema.clone(),
            Arc::clone(&self.broker),
            Arc::clone(&self.served),
            stop_watch.clone(),
        ));

        let produced = self.produce(config, url).await;
        let drained = match produced {
            Ok(()) => self.drain(config, url).await,
            Err(e) => Err(e),
        };
        stop_watch.cancel();
        let _ = watch.await;
        let served = self
            .served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        self.report.longest_unserved = served.longest_gap;
        self.report.unserved_queue = served.queue;
        let mut stopped = Ok(());
        for member in self.consumers.iter_mut().chain(self.relays.iter_mut()) {
            if let Err(e) = member.stop().await {
                stopped = Err(e);
            }
        }
        drained.and(stopped)
    }

    /// Produces while the faults run; returns when every event is
    /// committed and every scheduled fault was injected.
    async fn produce(&mut self, config: &ChaosConfig, url: &str) -> anyhow::Result<()> {
        let committed = Arc::new(AtomicU64::new(0));
        let mut producers = Vec::new();
        for p in 0..config.producers {
            let producer = Producer {
                url: url.to_owned(),
                exchange: self.schema.clone(),
                keys: config.keys,
                target: config.events,
                rate: f64::from(config.rate) / f64::from(config.producers.max(1)),
                seed: config.seed.wrapping_add(u64::from(p) + 1),
                committed: Arc::clone(&committed),
            };
            producers.push(tokio::task::spawn_blocking(move || producer.run()));
        }
        let started = Instant::now();
        let mut schedule = one_off_faults(config);
        let mut next_relay_kill = started + config.relay_kill_every;
        let mut next_consumer_kill = started + self.consumer_kill_delay(config);
        let mut last_progress = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            for member in self.consumers.iter_mut().chain(self.relays.iter_mut()) {
                member.check()?;
            }
            let done = committed.load(Ordering::Relaxed);
            let progress = done as f64 / config.events.max(1) as f64;
            let now = Instant::now();
            if now >= next_relay_kill && !self.relays.is_empty() {
                let victim = self.faults_of("relay killed") as usize % self.relays.len();
                self.relays[victim].crash_and_restart()?;
                self.count("relay killed");
                next_relay_kill = now + config.relay_kill_every;
            }
            if now >= next_consumer_kill {
                let victim = self.rng.usize(..self.consumers.len());
                self.consumers[victim].crash_and_restart()?;
                self.count("consumer killed");
                next_consumer_kill = now + self.consumer_kill_delay(config);
            }
            while schedule.first().is_some_and(|(at, _)| progress >= *at) {
                let (_, fault) = schedule.remove(0);
                self.inject(fault, config).await?;
            }
            if config.progress && last_progress.elapsed() >= Duration::from_secs(5) {
                println!(
                    "  {done} of {} committed after {:.0?}",
                    config.events,
                    started.elapsed()
                );
                last_progress = Instant::now();
            }
            if done >= config.events && schedule.is_empty() {
                break;
            }
        }
        for p in producers {
            p.await?;
        }
        self.report.produce_time = started.elapsed();
        self.report.committed = committed_rows(url)?;
        Ok(())
    }

    /// Waits until every consumer applied every event it binds.
    async fn drain(&mut self, config: &ChaosConfig, url: &str) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut conn = PgConnection::establish(url)?;
        loop {
            for member in self.consumers.iter_mut().chain(self.relays.iter_mut()) {
                member.check()?;
            }
            let mut behind = Vec::new();
            for (name, routes) in consumers(&self.schema) {
                let (expected, applied) = checks::progress(&mut conn, &name, &routes);
                if applied < expected {
                    behind.push(format!("{name}: {applied} of {expected}"));
                }
            }
            if behind.is_empty() {
                self.report.drain_time = started.elapsed();
                return Ok(());
            }
            if started.elapsed() > config.drain_timeout {
                self.report.drain_time = started.elapsed();
                bail!(
                    "not drained within {:?}: {}",
                    config.drain_timeout,
                    behind.join(", ")
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    fn consumer_kill_delay(&mut self, config: &ChaosConfig) -> Duration {
        let (low, high) = config.consumer_kill_every;
        let span = high.saturating_sub(low).as_millis() as u64;
        low + Duration::from_millis(self.rng.u64(0..=span))
    }

    async fn inject(&mut self, fault: Fault, config: &ChaosConfig) -> anyhow::Result<()> {
        match fault {
            Fault::BrokerRestart => {
                self.broker
                    .down
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                let result = tokio::task::spawn_blocking(restart_broker).await?;
                self.broker
                    .down
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                result?;
                self.count("broker restarted");
            }
            Fault::SessionKill => {
                let url = config.database_url.clone();
                tokio::task::spawn_blocking(move || terminate_sessions(&url)).await??;
                self.count("database sessions terminated");
            }
            Fault::ConnectionClose => {
                tokio::task::spawn_blocking(|| {
                    rabbitmqctl(&["close_all_connections", "closed by the chaos suite"])
                })
                .await??;
                self.count("broker connections closed");
            }
            Fault::Repartition => {
                let to = config.repartition_to.to_string();
                self.consumers[0].restart_with("--partitions", &to).await?;
                self.count(&format!("partitions {} to {to}", config.partitions));
            }
        }
        if config.progress {
            println!("  fault: {fault:?}");
        }
        Ok(())
    }

    fn count(&mut self, fault: &str) {
        match self.faults.iter_mut().find(|(name, _)| name == fault) {
            Some((_, n)) => *n += 1,
            None => self.faults.push((fault.to_owned(), 1)),
        }
    }

    fn faults_of(&self, fault: &str) -> u32 {
        self.faults
            .iter()
            .find(|(name, _)| name == fault)
            .map_or(0, |(_, n)| *n)
    }
}

/// A fault injected once, at a point of the run.
#[derive(Debug, Clone, Copy)]
enum Fault {
    BrokerRestart,
    SessionKill,
    ConnectionClose,
    Repartition,
}

/// The one-off faults, by the share of events committed when they strike.
fn one_off_faults(config: &ChaosConfig) -> Vec<(f64, Fault)> {
    let mut schedule: Vec<(f64, Fault)> = Vec::new();
    for at in [0.25, 0.65, 0.9].iter().take(config.broker_restarts) {
        schedule.push((*at, Fault::BrokerRestart));
    }
    for at in [0.4, 0.8, 0.95].iter().take(config.session_kills) {
        schedule.push((*at, Fault::SessionKill));
    }
    for at in [0.5, 0.85].iter().take(config.connection_closes) {
        schedule.push((*at, Fault::ConnectionClose));
    }
    if config.repartition_to != config.partitions {
        schedule.push((0.55, Fault::Repartition));
    }
    schedule.sort_by(|a, b| a.0.total_cmp(&b.0));
    schedule
}

/// Waits until both consumers have declared their topology (recorded it).
async fn wait_declared(url: &str, consumers: &mut [Member]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut conn = PgConnection::establish(url)?;
    loop {
        for member in consumers.iter_mut() {
            member.check()?;
        }
        #[derive(diesel::QueryableByName)]
        struct N {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let declared: N =
            diesel::sql_query("SELECT count(*) AS n FROM inbox_topology").get_result(&mut conn)?;
        if declared.n == 2 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the consumers did not declare their topology within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn committed_rows(url: &str) -> anyhow::Result<i64> {
    #[derive(diesel::QueryableByName)]
    struct N {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let mut conn = PgConnection::establish(url)?;
    Ok(
        diesel::sql_query("SELECT count(*) AS n FROM chaos_produced")
            .get_result::<N>(&mut conn)?
            .n,
    )
}

/// `rabbitmqctl stop_app`, then `start_app`, and waits until it is up.
fn restart_broker() -> anyhow::Result<()> {
    rabbitmqctl(&["stop_app"])?;
    rabbitmqctl(&["start_app"])?;
    rabbitmqctl(&["await_startup", "--timeout", "120"])
}

fn rabbitmqctl(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .context("running rabbitmqctl (the suite runs beside the broker)")?;
    if !out.status.success() {
        bail!(
            "rabbitmqctl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Terminates every other session of the database.
fn terminate_sessions(database_url: &str) -> anyhow::Result<()> {
    let mut conn = PgConnection::establish(database_url)?;
    diesel::sql_query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid()
           AND backend_type = 'client backend'",
    )
    .execute(&mut conn)?;
    Ok(())
}

/// Messages in `consumer`'s dead-letter queue (0 when it cannot be read).
async fn dead_letters(amqp_url: &str, consumer: &str) -> u32 {
    let Ok(conn) = lapin::Connection::connect(amqp_url, Default::default()).await else {
        return u32::MAX;
    };
    let depth = async {
        let channel = conn.create_channel().await.ok()?;
        let q = channel
            .queue_declare(
                format!("{consumer}.dead-letters").as_str().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                Default::default(),
            )
            .await
            .ok()?;
        Some(q.message_count())
    }
    .await;
    let _ = conn.close(200, "counted".into()).await;
    depth.unwrap_or(u32::MAX)
}

/// Removes the run's schema and broker objects (after a pass).
async fn cleanup(config: &ChaosConfig, schema: &str) {
    if let Ok(mut conn) = PgConnection::establish(&config.database_url) {
        let _ = conn.batch_execute(&format!(r#"DROP SCHEMA IF EXISTS "{schema}" CASCADE"#));
    }
    let Ok(conn) = lapin::Connection::connect(&config.amqp_url, Default::default()).await else {
        return;
    };
    for (name, _) in consumers(schema) {
        let mut queues = vec![name.clone(), format!("{name}.dead-letters")];
        queues.extend((0..outbox::wire::SLOTS).map(|i| format!("{name}.{i}")));
        for queue in queues {
            if let Ok(channel) = conn.create_channel().await {
                let _ = channel
                    .queue_delete(queue.as_str().into(), Default::default())
                    .await;
            }
        }
        for exchange in [format!("{name}.slots"), format!("{name}.unslotted")] {
            if let Ok(channel) = conn.create_channel().await {
                let _ = channel
                    .exchange_delete(exchange.as_str().into(), Default::default())
                    .await;
            }
        }
    }
    if let Ok(channel) = conn.create_channel().await {
        let _ = channel
            .exchange_delete(schema.into(), Default::default())
            .await;
    }
    let _ = conn.close(200, "cleaned up".into()).await;
}
