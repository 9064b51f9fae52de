//! The consumer's broker objects, declared idempotently at every (re)connect,
//! and the record of its partition count in the database.
//!
//! - `<name>.slots`: a headers exchange bound to each producer exchange with
//!   the handlers' patterns. Queue `i` of `N` is bound to it by the slots
//!   `j` with `j mod N = i` (`x-match: any` over the `outbox-slot-<j>`
//!   header names the relay stamps). The slot is a fixed hash of the
//!   ordering key, so a key's queue does not change when the broker
//!   restarts (a consistent-hash ring does: its order is rebuilt at boot).
//! - `<name>.unslotted`: the slots exchange's alternate exchange (fanout),
//!   bound to the first queue: a message without a slot header (not from
//!   our relay) still arrives.
//! - Queues: `<name>` when `partitions` = 1, else `<name>.0` to
//!   `<name>.N-1`; durable, single active consumer.
//! - `<name>.dead-letters`: durable.
//!
//! Per-key order does not depend on any of this (a message ahead of its key
//! waits in the database), but a stable route keeps keys in one queue, so
//! holds stay rare.
//!
//! **Changing `partitions`.** `inbox_topology` records the count and the
//! queues of earlier counts that may still hold messages (`retiring`). The
//! instance that starts with a new count binds the new queues, unbinds the
//! old bindings and records the old queues as retiring; every instance
//! follows the recorded count. Retiring queues are consumed like the others
//! until they are empty, then deleted ([`crate::session`]).

use std::collections::BTreeSet;

use diesel::sql_types::{Array, Integer, Text};
use diesel::{PgConnection, QueryableByName, RunQueryDsl};
use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ExchangeKind};

use crate::config::{ConsumerConfig, queue_name};
use crate::handler::Routes;
use crate::{Error, Result};

/// The consumer's partition count and the queues being drained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Topology {
    pub(crate) partitions: u16,
    /// Queues of earlier counts that may still hold messages.
    pub(crate) retiring: Vec<String>,
}

impl Topology {
    /// The queues the bindings feed now.
    pub(crate) fn current(&self, name: &str) -> Vec<String> {
        (0..self.partitions)
            .map(|i| queue_name(name, self.partitions, i))
            .collect()
    }
}

/// The binding arguments of queue `index` of `partitions`: its slots.
pub(crate) fn slot_args(index: u16, partitions: u16) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-match".into(), text("any"));
    for slot in (0..outbox::wire::SLOTS).filter(|s| s % partitions == index) {
        args.insert(
            outbox::wire::slot_header(slot).as_str().into(),
            AMQPValue::Boolean(true),
        );
    }
    args
}

/// What was there before this declaration.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Before<'a> {
    /// The recorded topology.
    Recorded(&'a Topology),
    /// Nothing recorded, but the consumer has inbox rows: it ran under an
    /// earlier version, whose broker objects are cleared away.
    EarlierVersion,
    /// A new consumer.
    Nothing,
}

/// Declares everything the consumer needs for `partitions` queues, removes
/// what was bound `before` that no longer applies, and returns the
/// topology to record.
pub(crate) async fn declare(
    connection: &Connection,
    config: &ConsumerConfig,
    routes: &Routes,
    partitions: u16,
    before: Before<'_>,
) -> Result<Topology> {
    let channel = open(connection).await?;
    let name = config.name.as_str();
    let mut bindings: Vec<(&str, &str)> = routes
        .0
        .iter()
        .map(|r| (r.exchange.as_str(), r.pattern.as_str()))
        .collect();
    bindings.sort_unstable();
    bindings.dedup();
    if config.declare_exchanges {
        let exchanges: BTreeSet<&str> = bindings.iter().map(|b| b.0).collect();
        for exchange in exchanges {
            declare_exchange(
                &channel,
                exchange,
                ExchangeKind::Topic,
                FieldTable::default(),
            )
            .await?;
        }
    }
    declare_queue(&channel, &config.dead_letter_queue(), FieldTable::default()).await?;
    let slots = config.slots_exchange();
    let unslotted = config.unslotted_exchange();
    declare_exchange(
        &channel,
        &unslotted,
        ExchangeKind::Fanout,
        FieldTable::default(),
    )
    .await?;
    let mut args = FieldTable::default();
    args.insert("alternate-exchange".into(), text(&unslotted));
    declare_exchange(&channel, &slots, ExchangeKind::Headers, args).await?;
    for (exchange, pattern) in &bindings {
        channel
            .exchange_bind(
                slots.as_str().into(),
                (*exchange).into(),
                (*pattern).into(),
                ExchangeBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| classify("binding from", exchange, &e))?;
    }
    let now = Topology {
        partitions,
        retiring: Vec::new(),
    };
    let current = now.current(name);
    for (index, queue) in (0..partitions).zip(&current) {
        declare_queue(&channel, queue, single_active()).await?;
        bind(&channel, queue, &slots, slot_args(index, partitions)).await?;
    }
    bind(&channel, &current[0], &unslotted, FieldTable::default()).await?;

    // What an earlier count, or an earlier version, left behind.
    let mut candidates: Vec<String> = Vec::new();
    match before {
        Before::Recorded(before) => {
            candidates.extend(before.retiring.iter().cloned());
            let old = before.current(name);
            if before.partitions != partitions {
                for (index, queue) in (0..before.partitions).zip(&old) {
                    if exists(connection, queue).await? {
                        unbind(&channel, queue, &slots, slot_args(index, before.partitions))
                            .await?;
                    }
                }
                if old[0] != current[0] && exists(connection, &old[0]).await? {
                    unbind(&channel, &old[0], &unslotted, FieldTable::default()).await?;
                }
            }
            candidates.extend(old);
        }
        Before::EarlierVersion => candidates.extend(legacy(connection, config, &bindings).await?),
        Before::Nothing => {}
    }
    let mut retiring = Vec::new();
    for queue in candidates {
        if !current.contains(&queue)
            && !retiring.contains(&queue)
            && exists(connection, &queue).await?
        {
            retiring.push(queue);
        }
    }
    let _ = channel.close(200, "declared".into()).await;
    Ok(Topology {
        partitions,
        retiring,
    })
}

/// Undoes what versions before `inbox_topology` declared: the
/// consistent-hash exchange (its queue bindings go with it) and a single
/// queue bound straight to the producer exchanges. Returns the queues
/// they used, to drain.
async fn legacy(
    connection: &Connection,
    config: &ConsumerConfig,
    bindings: &[(&str, &str)],
) -> Result<Vec<String>> {
    let channel = open(connection).await?;
    let legacy_exchange = config.legacy_partition_exchange();
    match channel
        .exchange_delete(
            legacy_exchange.as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await
    {
        Ok(()) => {
            let _ = channel.close(200, "deleted".into()).await;
        }
        // Missing is fine; anything else is worth retrying.
        Err(e) if reply_code(&e) == Some(404) => {}
        Err(e) => return Err(classify("exchange", &legacy_exchange, &e)),
    }
    let mut queues = Vec::new();
    if exists(connection, &config.name).await? {
        for (exchange, pattern) in bindings {
            // A channel each: a missing exchange (404) closes the channel.
            let channel = open(connection).await?;
            match channel
                .queue_unbind(
                    config.name.as_str().into(),
                    (*exchange).into(),
                    (*pattern).into(),
                    FieldTable::default(),
                )
                .await
            {
                Ok(()) => {
                    let _ = channel.close(200, "unbound".into()).await;
                }
                Err(e) if reply_code(&e) == Some(404) => {}
                Err(e) => return Err(classify("binding to", exchange, &e)),
            }
        }
        queues.push(config.name.clone());
    }
    for index in 0..outbox::wire::SLOTS {
        let queue = format!("{}.{index}", config.name);
        if !exists(connection, &queue).await? {
            break;
        }
        queues.push(queue);
    }
    Ok(queues)
}

/// Whether `queue` exists (a passive declare, on a channel of its own: a
/// missing queue closes the channel).
pub(crate) async fn exists(connection: &Connection, queue: &str) -> Result<bool> {
    Ok(depth(connection, queue).await?.is_some())
}

/// Messages ready in `queue`, or `None` when it does not exist.
pub(crate) async fn depth(connection: &Connection, queue: &str) -> Result<Option<u32>> {
    let channel = open(connection).await?;
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    match declared {
        Ok(q) => {
            let _ = channel.close(200, "probed".into()).await;
            Ok(Some(q.message_count()))
        }
        Err(e) if reply_code(&e) == Some(404) => Ok(None),
        Err(e) => Err(classify("queue", queue, &e)),
    }
}

async fn open(connection: &Connection) -> Result<Channel> {
    connection
        .create_channel()
        .await
        .map_err(|e| Error::Broker {
            operation: "opening a channel",
            cause: e.to_string(),
        })
}

fn single_active() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    args
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

async fn declare_exchange(
    channel: &Channel,
    name: &str,
    kind: ExchangeKind,
    args: FieldTable,
) -> Result<()> {
    channel
        .exchange_declare(
            name.into(),
            kind,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            args,
        )
        .await
        .map_err(|e| classify("exchange", name, &e))
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
        .map_err(|e| classify("queue", name, &e))
}

async fn bind(channel: &Channel, queue: &str, exchange: &str, args: FieldTable) -> Result<()> {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            "".into(),
            QueueBindOptions::default(),
            args,
        )
        .await
        .map_err(|e| classify("binding to", exchange, &e))
}

async fn unbind(channel: &Channel, queue: &str, exchange: &str, args: FieldTable) -> Result<()> {
    channel
        .queue_unbind(queue.into(), exchange.into(), "".into(), args)
        .await
        .map_err(|e| classify("binding to", exchange, &e))
}

/// The AMQP reply code of a broker refusal, if `e` is one.
pub(crate) fn reply_code(e: &lapin::Error) -> Option<u16> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => Some(amqp.get_id()),
        _ => None,
    }
}

/// Sorts a failed declaration by cause: a refusal the broker will repeat
/// (an object declared with other arguments, no permission, an exchange
/// type it lacks) is [`Error::Topology`], which ends `run`; anything else
/// (a connection closed or forced, a missing producer exchange that may yet
/// be declared) is [`Error::Broker`], retried with backoff.
pub(crate) fn classify(what: &'static str, name: &str, e: &lapin::Error) -> Error {
    let object = format!("{what} {name:?}");
    let text = e.to_string();
    let permanent = |reason: String| Error::Topology {
        object: object.clone(),
        reason,
    };
    match reply_code(e) {
        Some(406) => permanent(format!(
            "exists on the broker with other arguments ({text}); delete it (after draining) \
             or use another consumer name"
        )),
        Some(403) => permanent(format!(
            "the broker user lacks the permission ({text}); see the README's permissions"
        )),
        Some(503 | 530 | 540) => permanent(text),
        Some(404) => Error::Broker {
            operation: "declaring the topology",
            cause: format!(
                "{object} not found ({text}); is the producer's exchange declared, or \
                 declare_exchanges on? Retrying"
            ),
        },
        _ => Error::Broker {
            operation: "declaring the topology",
            cause: format!("{object}: {text}"),
        },
    }
}

#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = Integer)]
    partitions: i32,
    #[diesel(sql_type = Array<Text>)]
    retiring: Vec<String>,
}

/// Whether `consumer` has inbox rows (it ran before).
pub(crate) fn has_history(
    conn: &mut PgConnection,
    schema: &str,
    consumer: &str,
) -> diesel::QueryResult<bool> {
    #[derive(QueryableByName)]
    struct Flag {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        flag: bool,
    }
    diesel::sql_query(format!(
        r#"SELECT EXISTS (SELECT 1 FROM "{schema}".inbox_keys WHERE consumer = $1)
               OR EXISTS (SELECT 1 FROM "{schema}".inbox_messages WHERE consumer = $1) AS flag"#
    ))
    .bind::<Text, _>(consumer)
    .get_result::<Flag>(conn)
    .map(|f| f.flag)
}

/// The recorded topology of `consumer`, if any.
pub(crate) fn read(
    conn: &mut PgConnection,
    schema: &str,
    consumer: &str,
) -> diesel::QueryResult<Option<Topology>> {
    let rows: Vec<Row> = diesel::sql_query(format!(
        r#"SELECT partitions, retiring FROM "{schema}".inbox_topology WHERE consumer = $1"#
    ))
    .bind::<Text, _>(consumer)
    .load(conn)?;
    Ok(rows.into_iter().next().map(|r| Topology {
        partitions: u16::try_from(r.partitions).unwrap_or(1).max(1),
        retiring: r.retiring,
    }))
}

/// Records `topology` for `consumer`.
pub(crate) fn write(
    conn: &mut PgConnection,
    schema: &str,
    consumer: &str,
    topology: &Topology,
) -> diesel::QueryResult<()> {
    diesel::sql_query(format!(
        r#"INSERT INTO "{schema}".inbox_topology AS t (consumer, partitions, retiring)
           VALUES ($1, $2, $3)
           ON CONFLICT (consumer) DO UPDATE SET partitions = EXCLUDED.partitions,
               retiring = EXCLUDED.retiring,
               changed_at = CASE WHEN t.partitions = EXCLUDED.partitions THEN t.changed_at ELSE now() END"#
    ))
    .bind::<Text, _>(consumer)
    .bind::<Integer, _>(i32::from(topology.partitions))
    .bind::<Array<Text>, _>(&topology.retiring)
    .execute(conn)
    .map(|_| ())
}

/// Forgets a retiring queue that was deleted.
pub(crate) fn retired(
    conn: &mut PgConnection,
    schema: &str,
    consumer: &str,
    queue: &str,
) -> diesel::QueryResult<()> {
    diesel::sql_query(format!(
        r#"UPDATE "{schema}".inbox_topology SET retiring = array_remove(retiring, $2)
           WHERE consumer = $1"#
    ))
    .bind::<Text, _>(consumer)
    .bind::<Text, _>(queue)
    .execute(conn)
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_slot_is_bound_to_exactly_one_queue() {
        for partitions in 1..=outbox::wire::SLOTS {
            let mut bound = Vec::new();
            for index in 0..partitions {
                let args = slot_args(index, partitions);
                for name in args.inner().keys() {
                    if let Some(slot) = outbox::wire::parse_slot_header(name.as_str()) {
                        bound.push(slot);
                    }
                }
            }
            bound.sort_unstable();
            assert_eq!(bound, (0..outbox::wire::SLOTS).collect::<Vec<_>>());
        }
    }

    #[test]
    fn queues_are_named_after_the_consumer() {
        let t = Topology {
            partitions: 1,
            retiring: Vec::new(),
        };
        assert_eq!(t.current("billing"), ["billing"]);
        let t = Topology {
            partitions: 3,
            retiring: Vec::new(),
        };
        assert_eq!(
            t.current("billing"),
            ["billing.0", "billing.1", "billing.2"]
        );
    }
}
