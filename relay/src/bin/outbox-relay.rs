//! `outbox-relay`: the sidecar that ships a service's outbox to RabbitMQ.
//!
//! ```text
//! outbox-relay --database-url postgres://... run --amqp-url amqp://...
//! outbox-relay migrate | status | parked list | parked retry --all | parked purge --id ID
//! ```
//!
//! Every flag also reads an environment variable (see `--help`). A thin
//! layer over the `relay` library: it parses flags, sets up logs and
//! metrics, and calls the library.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use relay::{Relay, RelayConfig, RetryPolicy, Selection, Store, redact_url};
use tracing::{error, info};

/// Ships the transactional outbox to RabbitMQ with publisher confirms,
/// retries and per-key order.
#[derive(Parser, Debug)]
#[command(name = "outbox-relay", version)]
struct Cli {
    /// PostgreSQL URL of the service's database. Prefer the variable or
    /// `--database-url-file`: a flag's value is visible to every local user
    /// in `ps`.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    database_url: Option<String>,

    /// A file holding the PostgreSQL URL (a mounted secret, say).
    #[arg(
        long,
        env = "DATABASE_URL_FILE",
        global = true,
        conflicts_with = "database_url"
    )]
    database_url_file: Option<std::path::PathBuf>,

    /// Schema that holds the outbox tables.
    #[arg(long, env = "OUTBOX_SCHEMA", default_value = "public", global = true)]
    schema: String,

    /// Log format.
    #[arg(long, env = "OUTBOX_RELAY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human, global = true)]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum LogFormat {
    /// Readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the relay until SIGTERM or SIGINT.
    Run(Box<RunArgs>),
    /// Apply the embedded outbox migrations (idempotent).
    Migrate,
    /// Backlog per partition, age of the oldest pending row, parked count.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Rows the relay gave up on after the maximum attempts.
    #[command(subcommand)]
    Parked(ParkedCommand),
}

#[derive(Subcommand, Debug)]
enum ParkedCommand {
    /// List parked rows, oldest first.
    List {
        /// At most this many rows.
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Make parked rows pending again, with fresh attempts.
    Retry(SelectArgs),
    /// Delete parked rows for good.
    Purge(SelectArgs),
}

/// Which parked rows: exactly one of `--id`, `--key`, `--all`.
#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
struct SelectArgs {
    /// These message ids (repeat the flag for several).
    #[arg(long = "id")]
    ids: Vec<uuid::Uuid>,
    /// Every parked row of this ordering key.
    #[arg(long)]
    key: Option<String>,
    /// Every parked row.
    #[arg(long)]
    all: bool,
}

impl SelectArgs {
    fn selection(self) -> Selection {
        if self.all {
            Selection::All
        } else if let Some(key) = self.key {
            Selection::Key(key)
        } else {
            Selection::Ids(self.ids)
        }
    }
}

#[derive(Args, Debug)]
struct RunArgs {
    /// AMQP URL of RabbitMQ (amqps:// needs the `tls` build feature).
    /// Prefer the variable or `--amqp-url-file` (a flag shows in `ps`).
    #[arg(long, env = "AMQP_URL", hide_env_values = true)]
    amqp_url: Option<String>,
    /// A file holding the AMQP URL.
    #[arg(long, env = "AMQP_URL_FILE", conflicts_with = "amqp_url")]
    amqp_url_file: Option<std::path::PathBuf>,
    /// CA certificates (PEM) to trust for amqps://, besides the system's.
    #[arg(long, env = "OUTBOX_RELAY_AMQP_CA_FILE")]
    amqp_ca_file: Option<std::path::PathBuf>,
    /// A client certificate (PEM) for amqps://, with `--amqp-client-key`.
    #[arg(
        long,
        env = "OUTBOX_RELAY_AMQP_CLIENT_CERT",
        requires = "amqp_client_key"
    )]
    amqp_client_cert: Option<std::path::PathBuf>,
    /// The client certificate's key (PEM).
    #[arg(
        long,
        env = "OUTBOX_RELAY_AMQP_CLIENT_KEY",
        requires = "amqp_client_cert"
    )]
    amqp_client_key: Option<std::path::PathBuf>,
    /// Rows per batch (per partition and transaction).
    #[arg(long, env = "OUTBOX_RELAY_BATCH_SIZE", default_value_t = 500)]
    batch_size: u32,
    /// Payload bytes per worker's batch (a larger row goes alone); the
    /// relay's memory is about workers × this.
    #[arg(long, env = "OUTBOX_RELAY_BATCH_BYTES", default_value_t = 1024 * 1024)]
    batch_bytes: u64,
    /// Concurrent workers, each with its own database connection and channel.
    #[arg(long, env = "OUTBOX_RELAY_WORKERS", default_value_t = 4)]
    workers: u32,
    /// Scan every partition this often when no NOTIFY arrives.
    #[arg(long, env = "OUTBOX_RELAY_POLL_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    poll_interval: Duration,
    /// Do not LISTEN for NOTIFY; rely on polling alone.
    #[arg(long, env = "OUTBOX_RELAY_NO_LISTEN")]
    no_listen: bool,
    /// Wait this long for the broker's confirms of a batch.
    #[arg(long, env = "OUTBOX_RELAY_CONFIRM_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    confirm_timeout: Duration,
    /// Delay before the first retry of a failed row.
    #[arg(long, env = "OUTBOX_RELAY_RETRY_INITIAL", default_value = "1s", value_parser = humantime::parse_duration)]
    retry_initial: Duration,
    /// Factor between successive retry delays.
    #[arg(long, env = "OUTBOX_RELAY_RETRY_MULTIPLIER", default_value_t = 2.0)]
    retry_multiplier: f32,
    /// Longest delay between retries.
    #[arg(long, env = "OUTBOX_RELAY_RETRY_MAX_DELAY", default_value = "5m", value_parser = humantime::parse_duration)]
    retry_max_delay: Duration,
    /// Attempts before a row is parked.
    #[arg(long, env = "OUTBOX_RELAY_RETRY_MAX_ATTEMPTS", default_value_t = 10)]
    retry_max_attempts: u32,
    /// Retry at exact delays, without random jitter.
    #[arg(long, env = "OUTBOX_RELAY_NO_RETRY_JITTER")]
    no_retry_jitter: bool,
    /// Keep published rows this long (default: delete them on confirm).
    #[arg(long, env = "OUTBOX_RELAY_RETENTION", value_parser = humantime::parse_duration)]
    retention: Option<Duration>,
    /// How often rows past the retention are deleted.
    #[arg(long, env = "OUTBOX_RELAY_CLEANUP_INTERVAL", default_value = "60s", value_parser = humantime::parse_duration)]
    cleanup_interval: Duration,
    /// AMQP app_id property (default: the exchange name, i.e. the producing service).
    #[arg(long, env = "OUTBOX_RELAY_APP_ID")]
    app_id: Option<String>,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "OUTBOX_RELAY_HTTP_ADDR", default_value = "127.0.0.1:9187")]
    http_addr: SocketAddr,
    /// After SIGTERM, wait this long for batches under way, then exit anyway.
    #[arg(long, env = "OUTBOX_RELAY_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    shutdown_timeout: Duration,
    /// Apply the embedded migrations before starting.
    #[arg(long, env = "OUTBOX_RELAY_MIGRATE")]
    migrate: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("outbox-relay: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole context chain on one line.
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let database_url = secret(
        cli.database_url,
        cli.database_url_file.as_deref(),
        "`--database-url`, `DATABASE_URL`, `--database-url-file` or `DATABASE_URL_FILE` must be set",
    )?;
    // The schema is quoted into SQL: checked before anything runs.
    outbox::Config {
        schema: cli.schema.clone(),
        ..outbox::Config::default()
    }
    .validate()
    .context("`--schema` or `OUTBOX_SCHEMA`")?;
    let store = Store::new(&cli.schema);
    match cli.command {
        Command::Run(args) => run(database_url, cli.schema, *args).await,
        Command::Migrate => migrate(&database_url, &cli.schema).await,
        Command::Status { json } => {
            let mut conn = connect(&database_url).await?;
            status(&store, &mut conn, json).await
        }
        Command::Parked(command) => {
            let mut conn = connect(&database_url).await?;
            parked(&store, &mut conn, command).await
        }
    }
}

/// A secret given directly or in a file (whose trailing newline is not
/// part of it).
fn secret(
    value: Option<String>,
    file: Option<&std::path::Path>,
    missing: &'static str,
) -> anyhow::Result<String> {
    match (value, file) {
        (Some(value), _) => Ok(value),
        (None, Some(path)) => Ok(std::fs::read_to_string(path)
            .with_context(|| format!("reading {}", shown_path(path)))?
            .trim_end()
            .to_owned()),
        (None, None) => anyhow::bail!(missing),
    }
}

/// A secret file's path for an error; a URL given where its file belongs
/// (`DATABASE_URL_FILE=postgres://...`) is shown without its password.
fn shown_path(path: &std::path::Path) -> String {
    let shown = path.display().to_string();
    if shown.contains("://") || shown.contains('@') {
        format!(
            "{} (a URL? this takes the path of a file holding one)",
            redact_url(&shown)
        )
    } else {
        shown
    }
}

async fn connect(database_url: &str) -> anyhow::Result<diesel_async::AsyncPgConnection> {
    Ok(relay::store::connect(database_url).await?)
}

async fn migrate(database_url: &str, schema: &str) -> anyhow::Result<()> {
    let outbox = outbox::Outbox::new(outbox::Config {
        schema: schema.to_owned(),
        ..outbox::Config::default()
    })
    .context("`--schema` or `OUTBOX_SCHEMA`")?;
    let url = database_url.to_owned();
    // Migrations run on diesel's sync connection; keep them off the runtime.
    let applied = tokio::task::spawn_blocking(move || {
        use diesel::Connection;
        // libpq may quote the password (a bad percent-escape, say): redacted.
        let mut conn = diesel::PgConnection::establish(&url).map_err(|e| {
            anyhow::anyhow!(
                "cannot connect to the database at {}: {}",
                redact_url(&url),
                outbox::redact_secrets(&url, &e.to_string())
            )
        })?;
        outbox.migrate(&mut conn).map_err(anyhow::Error::from)
    })
    .await??;
    if applied.is_empty() {
        info!(schema, "migrations already applied");
    } else {
        info!(schema, ?applied, "migrations applied");
    }
    Ok(())
}

async fn run(database_url: String, schema: String, args: RunArgs) -> anyhow::Result<()> {
    let amqp_url = secret(
        args.amqp_url,
        args.amqp_url_file.as_deref(),
        "`--amqp-url`, `AMQP_URL`, `--amqp-url-file` or `AMQP_URL_FILE` must be set",
    )?;
    if args.migrate {
        migrate(&database_url, &schema).await?;
    }
    let config = RelayConfig {
        database_url,
        amqp_url,
        amqp_tls: outbox::AmqpTls {
            ca_file: args.amqp_ca_file,
            client_cert_file: args.amqp_client_cert,
            client_key_file: args.amqp_client_key,
        },
        schema,
        batch_size: args.batch_size,
        batch_bytes: args.batch_bytes,
        workers: args.workers,
        poll_interval: args.poll_interval,
        listen: !args.no_listen,
        confirm_timeout: args.confirm_timeout,
        retry: RetryPolicy {
            initial: args.retry_initial,
            multiplier: args.retry_multiplier,
            max_delay: args.retry_max_delay,
            max_attempts: args.retry_max_attempts,
            jitter: !args.no_retry_jitter,
        },
        retention: args.retention,
        cleanup_interval: args.cleanup_interval,
        app_id: args.app_id,
        http_addr: Some(args.http_addr),
        ..RelayConfig::default()
    };
    let relay = Relay::new(config.clone()).map_err(|e| anyhow::anyhow!(flag_hint(e)))?;
    let metrics = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            relay::metrics::LATENCY_BUCKETS,
        )
        .context("metric buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    info!(config = ?config, "starting");

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut task = tokio::spawn(relay.with_metrics(metrics).run(async {
        let _ = stop_rx.await;
    }));
    tokio::select! {
        result = &mut task => return Ok(result??),
        () = shutdown_signal() => {}
    }
    info!(timeout = ?args.shutdown_timeout, "signal received: stopping");
    let _ = stop_tx.send(());
    match tokio::time::timeout(args.shutdown_timeout, &mut task).await {
        Ok(result) => Ok(result??),
        Err(_) => {
            task.abort();
            // Unfinished batches roll back; their rows are sent again later.
            bail!(
                "batches under way did not finish within {:?}; stopped anyway",
                args.shutdown_timeout
            )
        }
    }
}

/// The library names config fields; the binary names the flag and variable.
fn flag_hint(error: relay::Error) -> String {
    let relay::Error::Config { field, reason } = &error else {
        return error.to_string();
    };
    let (flag, env) = match *field {
        "database_url" => ("--database-url", "DATABASE_URL"),
        "amqp_url" => ("--amqp-url", "AMQP_URL"),
        "schema" => ("--schema", "OUTBOX_SCHEMA"),
        "batch_size" => ("--batch-size", "OUTBOX_RELAY_BATCH_SIZE"),
        "workers" => ("--workers", "OUTBOX_RELAY_WORKERS"),
        "poll_interval" => ("--poll-interval", "OUTBOX_RELAY_POLL_INTERVAL"),
        "confirm_timeout" => ("--confirm-timeout", "OUTBOX_RELAY_CONFIRM_TIMEOUT"),
        "retry" => ("--retry-*", "OUTBOX_RELAY_RETRY_*"),
        "cleanup_interval" => ("--cleanup-interval", "OUTBOX_RELAY_CLEANUP_INTERVAL"),
        "batch_bytes" => ("--batch-bytes", "OUTBOX_RELAY_BATCH_BYTES"),
        "http_addr" => ("--http-addr", "OUTBOX_RELAY_HTTP_ADDR"),
        "amqp_tls" => ("--amqp-client-cert", "OUTBOX_RELAY_AMQP_CLIENT_CERT"),
        _ => return error.to_string(),
    };
    format!("invalid `{flag}` or `{env}`: {reason}")
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

async fn status(
    store: &Store,
    conn: &mut diesel_async::AsyncPgConnection,
    json: bool,
) -> anyhow::Result<()> {
    store.settings(conn).await?;
    let totals = store.totals(conn).await?;
    let backlog = store.backlog(conn).await?;
    if json {
        println!(
            "{}",
            serde_json::json!({ "totals": totals, "partitions": backlog })
        );
        return Ok(());
    }
    println!(
        "pending {}  retrying {}  parked {}  oldest pending {:.1}s",
        totals.pending, totals.retrying, totals.parked, totals.oldest_age_seconds
    );
    if !backlog.is_empty() {
        println!(
            "{:>9} {:>9} {:>9} {:>12}",
            "partition", "pending", "retrying", "oldest (s)"
        );
        for p in backlog {
            println!(
                "{:>9} {:>9} {:>9} {:>12.1}",
                p.partition, p.pending, p.retrying, p.oldest_age_seconds
            );
        }
    }
    Ok(())
}

async fn parked(
    store: &Store,
    conn: &mut diesel_async::AsyncPgConnection,
    command: ParkedCommand,
) -> anyhow::Result<()> {
    store.settings(conn).await?;
    match command {
        ParkedCommand::List { limit, json } => {
            let rows = store.parked(conn, limit).await?;
            for row in &rows {
                if json {
                    println!("{}", serde_json::to_string(row)?);
                } else {
                    println!(
                        "{}  key {} #{}  {} -> {} {}  attempts {}  parked {}  error: {}",
                        row.id,
                        row.ordering_key.as_deref().unwrap_or("-"),
                        row.key_seq.map_or("-".to_owned(), |s| s.to_string()),
                        row.event_type,
                        row.exchange,
                        row.routing_key,
                        row.attempts,
                        row.parked_at.to_rfc3339(),
                        row.last_error.as_deref().unwrap_or("-"),
                    );
                }
            }
            if !json {
                println!("{} parked row(s) shown", rows.len());
            }
        }
        ParkedCommand::Retry(select) => {
            let n = store.retry_parked(conn, &select.selection()).await?;
            println!("{n} parked row(s) made pending again");
        }
        ParkedCommand::Purge(select) => {
            let n = store.purge_parked(conn, &select.selection()).await?;
            println!("{n} parked row(s) deleted");
        }
    }
    Ok(())
}
