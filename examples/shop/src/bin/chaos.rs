//! `shop-chaos`: the fault suite (see `shop::chaos`). `shop-chaos run`
//! runs it and exits non-zero on any loss, double application, order
//! violation, dead letter or parked row; `shop-chaos consumer` is one
//! consumer instance, started (and killed) by `run`.
//!
//! It restarts RabbitMQ and terminates PostgreSQL sessions: run it alone.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// The fault suite of the outbox, relay and consumer.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// PostgreSQL URL.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test",
        global = true,
        hide_env_values = true
    )]
    database_url: String,
    /// RabbitMQ URL.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        global = true,
        hide_env_values = true
    )]
    amqp_url: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the suite.
    Run(RunArgs),
    /// One consumer instance (started by `run`).
    Consumer(ConsumerArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Events to commit.
    #[arg(long, default_value_t = 100_000)]
    events: u64,
    /// Ordering keys.
    #[arg(long, default_value_t = 200)]
    keys: u32,
    /// Producer connections.
    #[arg(long, default_value_t = 4)]
    producers: u32,
    /// Events per second in all (0: as fast as the producers go).
    #[arg(long, default_value_t = 0)]
    rate: u32,
    /// Partition queues of each consumer at the start.
    #[arg(long, default_value_t = 4)]
    partitions: u16,
    /// The partition count one instance is restarted with mid-run.
    #[arg(long, default_value_t = 2)]
    repartition_to: u16,
    /// Seconds between relay kills.
    #[arg(long, default_value_t = 4.0)]
    relay_kill_every: f64,
    /// Shortest and longest seconds between consumer kills.
    #[arg(long, num_args = 2, default_values_t = [6.0, 15.0])]
    consumer_kill_every: Vec<f64>,
    /// Full broker restarts (up to 3).
    #[arg(long, default_value_t = 2)]
    broker_restarts: usize,
    /// Times every database session is terminated (up to 3).
    #[arg(long, default_value_t = 2)]
    session_kills: usize,
    /// Times every broker connection is closed (up to 2).
    #[arg(long, default_value_t = 1)]
    connection_closes: usize,
    /// Seconds the consumers may take to catch up after producing.
    #[arg(long, default_value_t = 600)]
    drain_timeout: u64,
    /// Seed of the random choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where the processes' logs go.
    #[arg(long, default_value = "target/chaos")]
    log_dir: PathBuf,
    /// The `outbox-relay` binary [default: beside this one].
    #[arg(long)]
    relay_binary: Option<PathBuf>,
}

#[derive(clap::Args)]
struct ConsumerArgs {
    /// Schema of the inbox tables.
    #[arg(long)]
    schema: String,
    /// Consumer name.
    #[arg(long)]
    name: String,
    /// The producers' exchange.
    #[arg(long)]
    exchange: String,
    /// Routing keys it binds, comma-separated.
    #[arg(long, value_delimiter = ',')]
    routes: Vec<String>,
    /// Partition queues.
    #[arg(long, default_value_t = 4)]
    partitions: u16,
    /// Handlers at once.
    #[arg(long, default_value_t = 4)]
    lanes: usize,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,lapin=off".into()),
        )
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Consumer(args) => {
            let args = shop::chaos::member::MemberArgs {
                database_url: cli.database_url,
                amqp_url: cli.amqp_url,
                schema: args.schema,
                name: args.name,
                exchange: args.exchange,
                partitions: args.partitions,
                routes: args.routes,
                lanes: args.lanes,
            };
            match shop::chaos::member::run(args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("consumer gave up: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run(args) => {
            let self_binary = match std::env::current_exe() {
                Ok(path) => path,
                Err(e) => {
                    eprintln!("cannot find this binary: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let relay_binary = args.relay_binary.unwrap_or_else(|| {
                self_binary
                    .parent()
                    .map(|dir| dir.join("outbox-relay"))
                    .unwrap_or_default()
            });
            let seconds = Duration::from_secs_f64;
            let config = shop::chaos::ChaosConfig {
                database_url: cli.database_url,
                amqp_url: cli.amqp_url,
                events: args.events,
                keys: args.keys,
                producers: args.producers,
                rate: args.rate,
                partitions: args.partitions,
                repartition_to: args.repartition_to,
                relay_kill_every: seconds(args.relay_kill_every),
                consumer_kill_every: (
                    seconds(args.consumer_kill_every[0]),
                    seconds(args.consumer_kill_every[1]),
                ),
                broker_restarts: args.broker_restarts,
                session_kills: args.session_kills,
                connection_closes: args.connection_closes,
                drain_timeout: Duration::from_secs(args.drain_timeout),
                seed: args.seed,
                relay_binary,
                self_binary,
                log_dir: args.log_dir,
                progress: true,
            };
            match shop::chaos::run(&config).await {
                Ok(report) => {
                    println!("{report}");
                    if report.passed() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("chaos run could not run: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
