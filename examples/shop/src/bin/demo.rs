//! `shop-demo`: runs the whole shop under load and checks it. See
//! `shop::demo`. Exits non-zero when any consistency check fails.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

/// The shop demo: the order and users services, a relay per producing
/// service, and the billing, logistics, order, inventory, payment and users
/// consumers, under load.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Orders to place.
    #[arg(long, default_value_t = 500)]
    orders: usize,
    /// Orders per second (0: as fast as possible).
    #[arg(long, default_value_t = 50)]
    rate: u32,
    /// Cancel every n-th order (0: none).
    #[arg(long, default_value_t = 5)]
    cancel_every: usize,
    /// Place every n-th order as order.v2.submitted (0: none).
    #[arg(long, default_value_t = 3)]
    v2_every: usize,
    /// Users to register before the orders; they place the orders in turn.
    #[arg(long, default_value_t = 40)]
    users: usize,
    /// Rename a user after every n-th order (0: none).
    #[arg(long, default_value_t = 25)]
    rename_every: usize,
    /// Percent of the orders paid with a card that payment declines.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(0..=100))]
    fail_payments: u32,
    /// Units of the scarce SKU (sku-10) in stock [default: a quarter of --orders].
    #[arg(long)]
    scarce_stock: Option<u32>,
    /// Kill and restart relays and consumers in turn, and cut broker
    /// connections, while the load runs.
    #[arg(long)]
    faults: bool,
    /// Seconds to wait for the consumers to catch up after the load.
    #[arg(long, default_value_t = 120)]
    settle_timeout: u64,
    /// PostgreSQL URL.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    database_url: String,
    /// RabbitMQ URL without the vhost (the demo makes its own vhost).
    #[arg(
        long,
        env = "AMQP_BASE",
        default_value = "amqp://guest:guest@127.0.0.1:5672"
    )]
    amqp_base: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error,lapin=off".into()),
        )
        .init();
    let args = Args::parse();
    let config = shop::demo::DemoConfig {
        database_url: args.database_url,
        amqp_base: args.amqp_base,
        prefix: format!("shop_demo_{}", std::process::id()),
        orders: args.orders,
        rate: args.rate,
        cancel_every: args.cancel_every,
        v2_every: args.v2_every,
        users: args.users,
        rename_every: args.rename_every,
        fail_payments: args.fail_payments,
        scarce_stock: args.scarce_stock,
        faults: args.faults,
        progress: true,
        settle_timeout: Duration::from_secs(args.settle_timeout),
    };
    match shop::demo::run(&config).await {
        Ok(report) => {
            println!("{report}");
            if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("demo could not run: {e:#}");
            ExitCode::FAILURE
        }
    }
}
