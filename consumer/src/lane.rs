//! A lane runs one delivery at a time: reads it, finds its handler, applies
//! it through the inbox on the lane's own database connection, then acks,
//! holds, retries or dead-letters it. The session decides which delivery a
//! lane gets next (one per key at a time).

use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::{Connection, PgConnection};
use lapin::Acker;
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use tokio::sync::mpsc;

use crate::batch::{self, BatchCall};
use crate::config::{GapPolicy, LatePolicy, UnknownPolicy};
use crate::consumer::Shared;
use crate::dead_letter::{self, DeadLetter};
use crate::envelope::{self, Malformed, Meta};
use crate::handler::{Call, Erased};
use crate::inbox::{AheadPolicy, Applied, Incoming, Settled};
use crate::schedule::{Finish, Mode, Sequenced};
use crate::stats::Counters;
use crate::{Error, Result};

/// A delivery waiting in, or running from, the session's scheduler.
pub(crate) struct Item {
    pub(crate) delivery: Delivery,
    meta: std::result::Result<Meta, Malformed>,
    key: String,
    seq: i64,
    /// Handler runs that failed so far.
    attempts: u32,
}

impl Item {
    pub(crate) fn new(delivery: Delivery) -> Self {
        let meta = envelope::read(
            delivery.exchange.as_str(),
            delivery.routing_key.as_str(),
            delivery.redelivered,
            &delivery.properties,
        );
        // Unordered (or unreadable) deliveries get a key of their own, so
        // they run side by side; the prefix keeps them apart from real keys.
        let (key, seq) = match &meta {
            Ok(m) => match m.key() {
                Some((k, s)) => (format!("k:{k}"), s),
                None => (format!("m:{}", m.message_id), 0),
            },
            Err(_) => (format!("d:{}", delivery.delivery_tag), 0),
        };
        Item {
            delivery,
            meta,
            key,
            seq,
            attempts: 0,
        }
    }
}

impl Sequenced for Item {
    fn schedule_key(&self) -> &str {
        &self.key
    }
    fn seq(&self) -> i64 {
        self.seq
    }
}

/// A finished batch, back to the session: how each delivery's run ended.
pub(crate) struct Done {
    pub(crate) lane: usize,
    pub(crate) finished: Vec<(String, Finish<Item>)>,
}

/// A delivery whose handler call is prepared, waiting for the inbox.
struct Ready {
    item: Item,
    mode: Mode,
    meta: Meta,
    handler: Arc<dyn Erased>,
    call: Call,
    order: Order,
    span: tracing::Span,
}

/// What preparing a delivery came to.
// Both variants hold a delivery; boxing one would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum Prepared {
    Ready(Ready),
    /// Settled without the inbox (dead-lettered, ignored) or to retry.
    Finished(Finish<Item>),
}

/// A prepared delivery after its inbox transaction, to conclude.
struct Ran {
    item: Item,
    mode: Mode,
    meta: Meta,
    handler: Arc<dyn Erased>,
    span: tracing::Span,
}

/// One lane: its database connection and the session's dead-letter channel.
pub(crate) struct Lane {
    pub(crate) index: usize,
    pub(crate) shared: Arc<Shared>,
    pub(crate) dead_letters: Channel,
    pub(crate) conn: Option<PgConnection>,
    #[cfg(feature = "async")]
    pub(crate) async_conn: Option<diesel_async::AsyncPgConnection>,
    /// Database failures in a row, for the reconnect backoff.
    db_failures: u32,
    /// Acks of the batch under way, sent when it is done.
    acks: Vec<Acker>,
}

/// A sync handler call with what the inbox needs to run it; the same
/// whether it runs alone or in a batch's transaction.
struct InboxCall {
    f: Box<dyn FnOnce(&mut PgConnection) -> crate::handler::HandlerResult + Send>,
    message_id: uuid::Uuid,
    key: Option<(String, i64)>,
    order: Order,
    span: tracing::Span,
}

impl InboxCall {
    fn new(
        f: Box<dyn FnOnce(&mut PgConnection) -> crate::handler::HandlerResult + Send>,
        meta: &Meta,
        order: Order,
        span: tracing::Span,
    ) -> Self {
        InboxCall {
            f,
            message_id: meta.message_id,
            key: meta.key().map(|(k, s)| (k.to_owned(), s)),
            order,
            span,
        }
    }

    /// The inbox transaction (a savepoint when `conn` is in one already).
    fn run(self, inbox: &crate::inbox::Inbox, conn: &mut PgConnection) -> Result<Applied> {
        let _entered = self.span.enter();
        let incoming = Incoming {
            message_id: self.message_id,
            key: self.key.as_ref().map(|(k, s)| (k.as_str(), *s)),
        };
        match self.order {
            Order::Checked(ahead) => inbox.apply(conn, incoming, ahead, self.f),
            Order::Unordered => inbox.apply_unordered(conn, incoming, self.f),
        }
    }
}

/// How the inbox is asked to order a message.
#[derive(Debug, Clone, Copy)]
enum Order {
    Checked(AheadPolicy),
    Unordered,
}

impl Lane {
    pub(crate) fn new(index: usize, shared: Arc<Shared>, dead_letters: Channel) -> Self {
        Lane {
            index,
            shared,
            dead_letters,
            conn: None,
            #[cfg(feature = "async")]
            async_conn: None,
            db_failures: 0,
            acks: Vec::new(),
        }
    }

    /// Runs batches until the session drops its sender. The deliveries of a
    /// batch have different keys; their sync handlers share one transaction
    /// (each in its own savepoint), so a backlog costs one commit per batch,
    /// not per message. Nothing is acked before that commit.
    pub(crate) async fn run(
        mut self,
        mut jobs: mpsc::Receiver<Vec<(Item, Mode)>>,
        done: mpsc::UnboundedSender<Done>,
    ) -> Self {
        while let Some(batch) = jobs.recv().await {
            let finished = self.process(batch).await;
            if done
                .send(Done {
                    lane: self.index,
                    finished,
                })
                .is_err()
            {
                break;
            }
        }
        self
    }

    async fn process(&mut self, batch: Vec<(Item, Mode)>) -> Vec<(String, Finish<Item>)> {
        let mut finished = Vec::with_capacity(batch.len());
        let mut together = Vec::new();
        for (item, mode) in batch {
            let key = item.key.clone();
            match self.prepare(item, mode).await {
                Prepared::Finished(finish) => finished.push((key, finish)),
                Prepared::Ready(ready) => together.push(ready),
            }
        }
        // Async handlers, and a lone delivery, take the one-message path.
        let (shared_txn, alone): (Vec<Ready>, Vec<Ready>) = together
            .into_iter()
            .partition(|r| matches!(r.call, Call::Sync(_)));
        let (shared_txn, mut alone) = if shared_txn.len() == 1 {
            (Vec::new(), shared_txn.into_iter().chain(alone).collect())
        } else {
            (shared_txn, alone)
        };
        if !shared_txn.is_empty() {
            match self.apply_together(shared_txn).await {
                (ran, Ok(results)) => {
                    for (ran, applied) in ran.into_iter().zip(results) {
                        let key = ran.item.key.clone();
                        finished.push((key, self.conclude(ran, applied).await));
                    }
                }
                // The commit failed: nothing of the batch was applied.
                (ran, Err(e)) => {
                    for ran in ran {
                        let key = ran.item.key.clone();
                        finished.push((key, self.failed_for_now(ran.item, &e)));
                    }
                }
            }
        }
        for ready in alone.drain(..) {
            let key = ready.item.key.clone();
            let Ready {
                item,
                mode,
                meta,
                handler,
                call,
                order,
                span,
            } = ready;
            let applied = self.apply(call, &meta, order, span.clone()).await;
            let ran = Ran {
                item,
                mode,
                meta,
                handler,
                span,
            };
            finished.push((key, self.conclude(ran, applied).await));
        }
        flush_acks(std::mem::take(&mut self.acks)).await;
        finished
    }

    /// Reads a delivery and prepares its handler call; settles at once what
    /// needs no inbox transaction (malformed, unknown, undeserializable).
    async fn prepare(&mut self, item: Item, mode: Mode) -> Prepared {
        let mut meta = match &item.meta {
            Ok(meta) => meta.clone(),
            Err(bad) => {
                let reason = format!("malformed message: {}", bad.reason);
                return Prepared::Finished(self.dead_letter(item, reason).await);
            }
        };
        meta.attempt = item.attempts + 1;
        let span = tracing::info_span!(
            "consume",
            consumer = %self.shared.config.name,
            message_id = %meta.message_id,
            routing_key = %meta.routing_key,
            ordering_key = meta.ordering_key.as_deref(),
            key_seq = meta.key_seq,
            attempt = meta.attempt,
        );
        crate::trace::set_parent(&span, &meta);
        let Some(handler) = self
            .shared
            .routes
            .find(&meta.exchange, &meta.routing_key)
            .cloned()
        else {
            return Prepared::Finished(match self.shared.config.unknown {
                UnknownPolicy::Ignore => {
                    self.settle(item, Settled::Ignored, &CounterRef::Ignored)
                        .await
                }
                UnknownPolicy::DeadLetter => {
                    let reason = format!(
                        "no handler for exchange {:?} routing key {:?}",
                        meta.exchange, meta.routing_key
                    );
                    self.dead_letter(item, reason).await
                }
            });
        };
        let order = if meta.replayed {
            Order::Unordered
        } else if mode == Mode::GapExpired && self.shared.config.after_gap == GapPolicy::Apply {
            Order::Checked(AheadPolicy::Apply)
        } else {
            Order::Checked(AheadPolicy::Hold)
        };
        match handler.prepare(&meta, &item.delivery.data) {
            Err(reason) => Prepared::Finished(self.dead_letter(item, reason).await),
            Ok(call) => Prepared::Ready(Ready {
                item,
                mode,
                meta,
                handler,
                call,
                order,
                span,
            }),
        }
    }

    /// Acts on a delivery's inbox outcome: ack, hold, retry or dead-letter.
    async fn conclude(&mut self, ran: Ran, applied: Result<Applied>) -> Finish<Item> {
        let Ran {
            mut item,
            mode,
            meta,
            handler,
            span,
        } = ran;
        let applied = match applied {
            Ok(Applied::Late { last }) if self.shared.config.late == LatePolicy::Apply => {
                Counters::add(&self.shared.counters.late);
                match handler.prepare(&meta, &item.delivery.data) {
                    Err(reason) => return self.dead_letter(item, reason).await,
                    Ok(call) => {
                        tracing::warn!(parent: &span, last, "late message applied out of order");
                        self.apply(call, &meta, Order::Unordered, span.clone())
                            .await
                    }
                }
            }
            other => other,
        };
        tracing::debug!(parent: &span, outcome = ?applied, "inbox outcome");
        let counters = &self.shared.counters;
        match applied {
            Ok(Applied::Applied) => {
                self.db_failures = 0;
                Counters::add(&counters.applied);
                self.acks.push(item.delivery.acker.clone());
                Finish::Done
            }
            Ok(Applied::Duplicate) => {
                Counters::add(&counters.duplicates);
                self.acks.push(item.delivery.acker.clone());
                Finish::Done
            }
            Ok(Applied::Discarded(reason)) => {
                tracing::info!(parent: &span, %reason, "handler discarded the message");
                Counters::add(&counters.discarded);
                self.acks.push(item.delivery.acker.clone());
                Finish::Done
            }
            Ok(Applied::Held { last }) => {
                if mode == Mode::GapExpired {
                    // after_gap = dead-letter: the gap did not fill in time.
                    let reason = format!(
                        "key_seq {} still ahead of the key's position {last} after the gap wait of {:?}",
                        item.seq, self.shared.config.gap_wait
                    );
                    return self.dead_letter(item, reason).await;
                }
                Counters::add(&counters.held);
                Finish::Held(item)
            }
            Ok(Applied::Late { last }) => {
                Counters::add(&counters.late);
                let reason = format!(
                    "late: key_seq {} is at or behind the key's position {last}, and was never applied",
                    item.seq
                );
                self.dead_letter(item, reason).await
            }
            Ok(Applied::Retry { after, reason }) => {
                Counters::add(&counters.retried);
                item.attempts += 1;
                let retry = &self.shared.config.retry;
                if retry.exhausted(item.attempts) {
                    let reason = format!("handler failed {} times; last: {reason}", item.attempts);
                    return self.dead_letter(item, reason).await;
                }
                let delay = after.unwrap_or_else(|| retry.delay(item.attempts));
                tracing::info!(parent: &span, %reason, ?delay, "handler asked to retry");
                Finish::RetryAt(item, Instant::now() + delay)
            }
            Err(e) => self.failed_for_now(item, &e),
        }
    }

    /// Applies several deliveries (different keys, sync handlers) in one
    /// transaction. First the fast way, every message in one pass
    /// ([`batch::apply_batch`]); if one of them needs undoing on its own,
    /// again with each message in its own savepoint, so a handler's retry
    /// or discard touches only its own message. If the commit fails, every
    /// one of them failed.
    async fn apply_together(
        &mut self,
        mut batch: Vec<Ready>,
    ) -> (Vec<Ran>, Result<Vec<Result<Applied>>>) {
        // Both ways lock the keys in one order, byte order of the key (the
        // one-pass statement sorts with collation "C"): two transactions
        // over overlapping keys, as two instances during a hand-over may
        // run, then cannot deadlock.
        batch.sort_by(|a, b| a.item.key.cmp(&b.item.key));
        let mut ran = Vec::with_capacity(batch.len());
        let mut calls = Vec::with_capacity(batch.len());
        for r in batch {
            #[allow(irrefutable_let_patterns)] // only one variant without `async`
            let Call::Sync(f) = r.call else {
                unreachable!("only sync calls share a transaction")
            };
            calls.push(InboxCall::new(f, &r.meta, r.order, r.span.clone()));
            ran.push(Ran {
                item: r.item,
                mode: r.mode,
                meta: r.meta,
                handler: r.handler,
                span: r.span,
            });
        }
        let orders: Vec<Order> = calls.iter().map(|c| c.order).collect();
        let calls: Vec<Result<InboxCall>> = match self.apply_in_one_pass(calls).await {
            Ok(Ok(outcomes)) => return (ran, Ok(outcomes.into_iter().map(Ok).collect())),
            Err(e) => return (ran, Err(e)),
            // The calls are spent: make them again from the deliveries.
            Ok(Err(calls)) if calls.is_empty() => ran
                .iter()
                .zip(&orders)
                .map(|(r, order)| prepare_sync(r, *order))
                .collect(),
            Ok(Err(calls)) => calls.into_iter().map(Ok).collect(),
        };
        let inbox = self.shared.inbox.clone();
        let results = self
            .with_conn(move |conn| {
                let mut results = Vec::with_capacity(calls.len());
                conn.transaction::<(), diesel::result::Error, _>(|conn| {
                    // Nested: each message's transaction is a savepoint.
                    results.extend(
                        calls
                            .into_iter()
                            .map(|call| call.and_then(|call| call.run(&inbox, conn))),
                    );
                    Ok(())
                })
                .map_err(|cause| Error::Database {
                    operation: "committing a batch of messages",
                    cause,
                })?;
                Ok(results)
            })
            .await;
        (ran, results)
    }

    /// The one-pass batch, when every message takes the ordered path.
    /// `Ok(Err(calls))` hands back calls that never ran (the batch does not
    /// qualify), or none when they were spent on a pass that rolled back.
    async fn apply_in_one_pass(
        &mut self,
        calls: Vec<InboxCall>,
    ) -> Result<std::result::Result<Vec<Applied>, Vec<InboxCall>>> {
        let Some(batch) = calls
            .iter()
            .map(|c| match c.order {
                Order::Checked(ahead) => Some(ahead),
                Order::Unordered => None,
            })
            .collect::<Option<Vec<AheadPolicy>>>()
        else {
            return Ok(Err(calls));
        };
        let batch: Vec<BatchCall> = calls
            .into_iter()
            .zip(batch)
            .map(|(c, ahead)| BatchCall {
                f: c.f,
                message_id: c.message_id,
                key: c.key,
                ahead,
                span: c.span,
            })
            .collect();
        let inbox = self.shared.inbox.clone();
        match self
            .with_conn(move |conn| batch::apply_batch(&inbox, conn, batch))
            .await
        {
            Ok(outcomes) => Ok(outcomes.ok_or_else(Vec::new)),
            // Perhaps one handler's statement failed and took the shared
            // transaction with it: the careful path finds out which.
            Err(e @ Error::Database { .. }) => {
                tracing::debug!(error = %e, "one-pass batch failed; applying it message by message");
                Ok(Err(Vec::new()))
            }
            Err(e) => Err(e),
        }
    }

    /// The inbox transaction with the handler, on the lane's connection.
    async fn apply(
        &mut self,
        call: Call,
        meta: &Meta,
        order: Order,
        span: tracing::Span,
    ) -> Result<Applied> {
        match call {
            Call::Sync(f) => {
                let inbox = self.shared.inbox.clone();
                let call = InboxCall::new(f, meta, order, span);
                self.with_conn(move |conn| call.run(&inbox, conn)).await
            }
            #[cfg(feature = "async")]
            Call::Async(f) => {
                use tracing::Instrument;
                let incoming = Incoming {
                    message_id: meta.message_id,
                    key: meta.key(),
                };
                let mut conn = match self.async_conn.take() {
                    Some(c) => c,
                    None => crate::inbox_async::connect(&self.shared.config.database_url).await?,
                };
                let inbox = self.shared.inbox.clone();
                let result = async {
                    match order {
                        Order::Checked(ahead) => {
                            inbox.apply_async(&mut conn, incoming, ahead, f).await
                        }
                        Order::Unordered => {
                            inbox.apply_unordered_async(&mut conn, incoming, f).await
                        }
                    }
                }
                .instrument(span)
                .await;
                if !matches!(result, Err(Error::Database { .. })) {
                    self.async_conn = Some(conn);
                }
                result
            }
        }
    }

    /// Runs `f` on a blocking thread with the lane's connection (made on
    /// first use). A connection that failed is dropped and made anew.
    async fn with_conn<T, F>(&mut self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut PgConnection) -> Result<T> + Send + 'static,
    {
        let conn = self.conn.take();
        let url = self.shared.config.database_url.clone();
        let (conn, result) = tokio::task::spawn_blocking(move || {
            let mut conn = match conn {
                Some(conn) => conn,
                None => match PgConnection::establish(&url) {
                    Ok(conn) => conn,
                    Err(e) => {
                        return (
                            None,
                            Err(Error::Connect {
                                what: "database",
                                url: outbox::redact_url(&url),
                                cause: e.to_string(),
                            }),
                        );
                    }
                },
            };
            let result = f(&mut conn);
            let healthy = !matches!(result, Err(Error::Database { .. }));
            (healthy.then_some(conn), result)
        })
        .await
        .unwrap_or_else(|panic| {
            (
                None,
                Err(Error::Handler(format!("handler panicked: {panic}"))),
            )
        });
        self.conn = conn;
        result
    }

    /// A database or broker failure: nothing was applied; run it again after
    /// a backoff that grows while failures go on. Attempts are not used up:
    /// the message is fine, the infrastructure is not.
    fn failed_for_now(&mut self, item: Item, error: &Error) -> Finish<Item> {
        Counters::add(&self.shared.counters.retried);
        self.db_failures += 1;
        let delay = self
            .shared
            .config
            .retry
            .delay(self.db_failures)
            .min(Duration::from_secs(10));
        tracing::warn!(consumer = %self.shared.config.name, error = %error, ?delay, "could not apply a message; will retry");
        Finish::RetryAt(item, Instant::now() + delay)
    }

    /// Records the message as settled without a handler, then acks it.
    async fn settle(&mut self, item: Item, outcome: Settled, counter: &CounterRef) -> Finish<Item> {
        let (message_id, key) = match &item.meta {
            Ok(meta) => (
                Some(meta.message_id),
                meta.key().map(|(k, s)| (k.to_owned(), s)),
            ),
            Err(bad) => (bad.message_id, None),
        };
        if let Some(message_id) = message_id {
            let inbox = self.shared.inbox.clone();
            let settled = self
                .with_conn(move |conn| {
                    inbox.settle(
                        conn,
                        Incoming {
                            message_id,
                            key: key.as_ref().map(|(k, s)| (k.as_str(), *s)),
                        },
                        outcome,
                    )
                })
                .await;
            if let Err(e) = settled {
                return self.failed_for_now(item, &e);
            }
        }
        counter.add(&self.shared.counters);
        self.acks.push(item.delivery.acker.clone());
        Finish::Done
    }

    /// Publishes the message to the dead-letter queue (confirmed), records
    /// it, moves its key on, and acks it.
    async fn dead_letter(&mut self, item: Item, reason: String) -> Finish<Item> {
        let published = dead_letter::publish(
            &self.dead_letters,
            &self.shared.config,
            DeadLetter {
                exchange: item.delivery.exchange.as_str(),
                routing_key: item.delivery.routing_key.as_str(),
                properties: &item.delivery.properties,
                body: &item.delivery.data,
                reason: &reason,
                attempts: item.attempts,
            },
        )
        .await;
        if let Err(e) = published {
            // Keep it: unacked, it comes back if the channel is gone.
            return self.failed_for_now(item, &e);
        }
        let id = item.meta.as_ref().map(|m| m.message_id).ok();
        tracing::warn!(consumer = %self.shared.config.name, message_id = ?id, %reason, "message dead-lettered");
        self.settle(item, Settled::DeadLettered, &CounterRef::DeadLettered)
            .await
    }
}

/// A sync handler call made again from a delivery whose first call was
/// spent (its body deserialized before, so it does again).
fn prepare_sync(ran: &Ran, order: Order) -> Result<InboxCall> {
    match ran.handler.prepare(&ran.meta, &ran.item.delivery.data) {
        Ok(Call::Sync(f)) => Ok(InboxCall::new(f, &ran.meta, order, ran.span.clone())),
        #[cfg(feature = "async")]
        Ok(Call::Async(_)) => Err(Error::Handler(
            "a sync handler's call came back async".to_owned(),
        )),
        Err(reason) => Err(Error::Handler(reason)),
    }
}

/// Which counter a settle adds to.
pub(crate) enum CounterRef {
    DeadLettered,
    Ignored,
}

impl CounterRef {
    fn add(&self, counters: &Counters) {
        match self {
            CounterRef::DeadLettered => Counters::add(&counters.dead_lettered),
            CounterRef::Ignored => Counters::add(&counters.ignored),
        }
    }
}

/// Sends the acks of a batch (all after its commit) side by side. A failed
/// ack (the channel went away) is harmless: the broker redelivers and the
/// inbox absorbs the duplicate.
async fn flush_acks(acks: Vec<Acker>) {
    let sent = futures_util::future::join_all(
        acks.iter()
            .map(|acker| acker.ack(BasicAckOptions::default())),
    )
    .await;
    for e in sent.into_iter().filter_map(|r| r.err()) {
        tracing::debug!(error = %e, "ack failed; the redelivery will be a duplicate");
    }
}
