//! One consumer instance of the chaos run, in a process of its own (the
//! `consumer` command of `shop-chaos`), so the run can kill it with
//! SIGKILL. Its handler records every application in `chaos_applied`, in the
//! inbox's transaction: what the checks count.

use consumer::{Consumer, ConsumerConfig, Envelope, HandlerResult};
use diesel::sql_types::{BigInt, Nullable, Text};
use diesel::{PgConnection, RunQueryDsl};
use tokio_util::sync::CancellationToken;

/// The settings of one instance.
#[derive(Debug, Clone)]
pub struct MemberArgs {
    /// PostgreSQL URL.
    pub database_url: String,
    /// RabbitMQ URL.
    pub amqp_url: String,
    /// The run's schema (inbox tables and `chaos_applied`).
    pub schema: String,
    /// The consumer name.
    pub name: String,
    /// The producers' exchange.
    pub exchange: String,
    /// Partition queues (as configured; instances follow the recorded count).
    pub partitions: u16,
    /// Routing keys it binds.
    pub routes: Vec<String>,
    /// Handlers at once.
    pub lanes: usize,
}

/// Runs the instance until SIGTERM or SIGINT.
///
/// # Errors
///
/// A configuration the consumer refuses, or a topology the broker keeps
/// refusing.
pub async fn run(args: MemberArgs) -> anyhow::Result<()> {
    let mut config = ConsumerConfig::new(&args.name, &args.database_url, &args.amqp_url);
    config.schema = args.schema.clone();
    config.partitions = args.partitions;
    config.lanes = args.lanes;
    let mut builder = Consumer::builder(config);
    let table = format!(r#""{}".chaos_applied"#, args.schema);
    for route in &args.routes {
        let (table, name) = (table.clone(), args.name.clone());
        builder = builder.handle(
            &args.exchange,
            route,
            move |conn: &mut PgConnection, e: Envelope<serde_json::Value>| {
                record(conn, &table, &name, &e)
            },
        );
    }
    let consumer = builder.build()?;
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        terminated().await;
        signal.cancel();
    });
    consumer.run(shutdown).await?;
    Ok(())
}

fn record(
    conn: &mut PgConnection,
    table: &str,
    consumer: &str,
    e: &Envelope<serde_json::Value>,
) -> HandlerResult {
    diesel::sql_query(format!(
        "INSERT INTO {table} (consumer, message_id, ordering_key, key_seq, routing_key)
         VALUES ($1, $2, $3, $4, $5)"
    ))
    .bind::<Text, _>(consumer)
    .bind::<diesel::sql_types::Uuid, _>(e.meta.message_id)
    .bind::<Nullable<Text>, _>(e.meta.ordering_key.as_deref())
    .bind::<Nullable<BigInt>, _>(e.meta.key_seq)
    .bind::<Text, _>(&e.meta.routing_key)
    .execute(conn)
    .map(|_| ())
    .map_err(crate::retry)
}

/// SIGTERM or SIGINT.
async fn terminated() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
