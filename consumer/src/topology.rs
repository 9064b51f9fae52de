//! The consumer's broker objects, declared idempotently at every start.
//!
//! - partitions = 1: queue `<name>` (durable, single active consumer), bound
//!   to each producer exchange with the handlers' patterns.
//! - partitions = N: exchange `<name>.partitions` (`x-consistent-hash` on the
//!   `x-hash-key` header, which the relay sets to the ordering key, or the
//!   message id when there is none) bound to the producer exchanges, and
//!   queues `<name>.0` to `<name>.N-1` (durable, single active consumer),
//!   each bound with weight 1. All of a key's messages go to one queue.
//! - Always: `<name>.dead-letters` (durable).
//!
//! An object that exists with other arguments is not changed: the broker
//! refuses the declaration and we say which object and why.

use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};

use crate::config::ConsumerConfig;
use crate::handler::Routes;
use crate::{Error, Result};

pub use outbox::HASH_KEY_HEADER as HASH_HEADER;

/// Declares everything the consumer needs; see the module docs.
pub(crate) async fn declare(
    channel: &Channel,
    config: &ConsumerConfig,
    routes: &Routes,
) -> Result<()> {
    let mut bindings: Vec<(&str, &str)> = routes
        .0
        .iter()
        .map(|r| (r.exchange.as_str(), r.pattern.as_str()))
        .collect();
    bindings.sort_unstable();
    bindings.dedup();
    if config.declare_exchanges {
        let mut exchanges: Vec<&str> = bindings.iter().map(|b| b.0).collect();
        exchanges.dedup();
        for exchange in exchanges {
            channel
                .exchange_declare(
                    exchange.into(),
                    ExchangeKind::Topic,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|e| refused("exchange", exchange, &e))?;
        }
    }
    declare_queue(channel, &config.dead_letter_queue(), FieldTable::default()).await?;
    if config.partitions == 1 {
        let queue = config.queue(0);
        declare_queue(channel, &queue, single_active()).await?;
        for (exchange, pattern) in bindings {
            channel
                .queue_bind(
                    queue.as_str().into(),
                    exchange.into(),
                    pattern.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| refused("binding to", exchange, &e))?;
        }
        return Ok(());
    }
    let hash = config.partition_exchange();
    let mut args = FieldTable::default();
    args.insert(
        "hash-header".into(),
        AMQPValue::LongString(LongString::from(HASH_HEADER)),
    );
    channel
        .exchange_declare(
            hash.as_str().into(),
            ExchangeKind::Custom("x-consistent-hash".into()),
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            args,
        )
        .await
        .map_err(|e| refused("exchange", &hash, &e))?;
    for (exchange, pattern) in bindings {
        channel
            .exchange_bind(
                hash.as_str().into(),
                exchange.into(),
                pattern.into(),
                ExchangeBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| refused("binding from", exchange, &e))?;
    }
    for index in 0..config.partitions {
        let queue = config.queue(index);
        declare_queue(channel, &queue, single_active()).await?;
        // The binding key is the queue's weight on the hash ring.
        channel
            .queue_bind(
                queue.as_str().into(),
                hash.as_str().into(),
                "1".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| refused("binding to", &hash, &e))?;
    }
    Ok(())
}

fn single_active() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    args
}

async fn declare_queue(channel: &Channel, name: &str, args: FieldTable) -> Result<()> {
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .map(|_| ())
        .map_err(|e| refused("queue", name, &e))
}

fn refused(what: &'static str, name: &str, e: &lapin::Error) -> Error {
    let text = e.to_string();
    let reason = if text.contains("PRECONDITION_FAILED") || text.contains("inequivalent") {
        format!(
            "exists on the broker with other arguments ({text}); delete it (after draining) \
             or use another consumer name"
        )
    } else if text.contains("unknown exchange type") {
        format!(
            "the broker lacks the consistent-hash exchange ({text}); run \
             `rabbitmq-plugins enable rabbitmq_consistent_hash_exchange`"
        )
    } else if text.contains("NOT_FOUND") {
        format!("not found ({text}); is the producer's exchange declared, or declare_exchanges on?")
    } else {
        text
    };
    Error::Topology {
        object: format!("{what} {name:?}"),
        reason,
    }
}
