//! A lane runs the messages the session hands it: reads each, finds its
//! handler, applies it through the inbox on the lane's own database
//! connection, then acks, retries, holds or dead-letters it. The session
//! decides which message a lane gets next (one per key at a time).
//!
//! A message is an [`Item`]: a delivery from a queue, or a message that
//! waited in `inbox_held` and whose turn has come. The two differ only in
//! how they are settled (a delivery is acked; a held one is taken out of
//! the table in its apply transaction).

use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::{Connection, PgConnection};
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use lapin::{Acker, BasicProperties, Channel};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::batch::{self, BatchCall};
use crate::config::{GapPolicy, LatePolicy, UnknownPolicy};
use crate::consumer::Shared;
use crate::dead_letter::{self, DeadLetter};
use crate::envelope::{self, Malformed, Meta};
use crate::handler::{Call, Erased};
use crate::held::{self, HeldRow, Hold, ToHold};
use crate::inbox::{AheadPolicy, Applied, Check, Incoming, Outcome, Settled};
use crate::schedule::{Finish, Sequenced};
use crate::stats::Counters;
use crate::{Error, Result};

/// Where a message came from, which decides how it is settled.
pub(crate) enum Source {
    /// A delivery from the session's subscription `queue`: acked once
    /// settled (after its transaction commits).
    Delivery { acker: Acker, queue: usize },
    /// A message kept in `inbox_held`: its transaction takes it out of the
    /// table; nothing to ack.
    Held { key: String, seq: i64 },
}

/// A message waiting in, or running from, the session's scheduler.
pub(crate) struct Item {
    pub(crate) source: Source,
    /// The exchange and routing key it was published with (a replay's
    /// original ones are in its meta).
    exchange: String,
    routing_key: String,
    properties: BasicProperties,
    body: Vec<u8>,
    meta: std::result::Result<Meta, Malformed>,
    key: String,
    seq: i64,
    /// Handler runs that failed so far.
    attempts: u32,
    /// A held message whose key has not moved for the gap wait.
    gap_expired: bool,
    /// Settle it without moving its key (its sequence number is bogus).
    keep_key: bool,
    /// Where an honoured replay was first published (from the replay
    /// tool's record): a dead letter of it must say that place, not the
    /// queue it was replayed into, nor what its headers claim.
    replay_of: Option<(String, String)>,
}

impl Item {
    /// A delivery from the session's subscription `queue`.
    pub(crate) fn delivery(delivery: Delivery, queue: usize) -> Self {
        let meta = envelope::read(
            delivery.exchange.as_str(),
            delivery.routing_key.as_str(),
            delivery.redelivered,
            &delivery.properties,
        );
        Item::new(
            Source::Delivery {
                acker: delivery.acker,
                queue,
            },
            delivery.exchange.to_string(),
            delivery.routing_key.to_string(),
            delivery.properties,
            delivery.data,
            meta,
            // A delivery that cannot be read runs on a key of its own.
            format!("d:{}:{}", queue, delivery.delivery_tag),
        )
    }

    /// A held message loaded from `inbox_held`.
    pub(crate) fn held(row: HeldRow) -> Self {
        let (properties, meta) = match held::decode_properties(&row.properties) {
            Ok(properties) => {
                let meta = envelope::read(&row.exchange, &row.routing_key, true, &properties);
                (properties, meta)
            }
            Err(reason) => (
                BasicProperties::default().with_message_id(row.message_id.to_string().into()),
                Err(Malformed::new(Some(row.message_id), reason)),
            ),
        };
        let mut item = Item::new(
            Source::Held {
                key: row.ordering_key.clone(),
                seq: row.key_seq,
            },
            row.exchange,
            row.routing_key,
            properties,
            row.body,
            meta,
            format!("k:{}", row.ordering_key),
        );
        item.seq = row.key_seq;
        item.gap_expired = row.gap_expired;
        item
    }

    fn new(
        source: Source,
        exchange: String,
        routing_key: String,
        properties: BasicProperties,
        body: Vec<u8>,
        meta: std::result::Result<Meta, Malformed>,
        unreadable_key: String,
    ) -> Self {
        // Unordered messages get a key of their own, so they run side by
        // side; the prefixes keep these apart from real keys.
        let (key, seq) = match &meta {
            Ok(m) => match m.key() {
                Some((k, s)) => (format!("k:{k}"), s),
                None => (format!("m:{}", m.message_id), 0),
            },
            Err(_) => (unreadable_key, 0),
        };
        Item {
            source,
            exchange,
            routing_key,
            properties,
            body,
            meta,
            key,
            seq,
            attempts: 0,
            gap_expired: false,
            keep_key: false,
            replay_of: None,
        }
    }

    /// The bytes the message holds in memory (its body).
    pub(crate) fn size(&self) -> usize {
        self.body.len()
    }

    /// The id of a held message (for the session's list of those it has).
    pub(crate) fn held_id(&self) -> Option<Uuid> {
        match (&self.source, &self.meta) {
            (Source::Held { .. }, Ok(meta)) => Some(meta.message_id),
            (Source::Held { .. }, Err(bad)) => bad.message_id,
            _ => None,
        }
    }

    /// The message as the inbox records it when settling it (no order
    /// check, so no `after`).
    fn incoming(&self) -> Option<Incoming<'_>> {
        match (&self.meta, &self.source) {
            (Ok(meta), _) => Some(Incoming {
                message_id: meta.message_id,
                key: meta.key().filter(|_| !self.keep_key),
                after: None,
            }),
            // A held message whose properties did not decode: the table
            // row still says what it is.
            (Err(bad), Source::Held { key, seq }) => Some(Incoming {
                message_id: bad.message_id?,
                key: Some((key.as_str(), *seq)),
                after: None,
            }),
            (Err(bad), Source::Delivery { .. }) => Some(Incoming::unordered(bad.message_id?)),
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

/// How one message's run ended, back to the session.
pub(crate) struct Finished {
    pub(crate) key: String,
    pub(crate) finish: Finish<Item>,
    /// The subscription the message came from, if it was a delivery.
    pub(crate) queue: Option<usize>,
    /// The delivery's size, for the session's byte budget.
    pub(crate) bytes: usize,
    /// The id of a held message (settled, or left in the table).
    pub(crate) held: Option<Uuid>,
}

impl Finished {
    /// Labels `finish` with what the session tracks of `item`.
    fn of(item: &Item) -> impl FnOnce(Finish<Item>) -> Finished + use<> {
        let key = item.key.clone();
        let queue = match &item.source {
            Source::Delivery { queue, .. } => Some(*queue),
            Source::Held { .. } => None,
        };
        let held = item.held_id();
        let bytes = item.size();
        move |finish| Finished {
            key,
            finish,
            queue,
            bytes,
            held,
        }
    }
}

/// A finished batch, back to the session.
pub(crate) struct Done {
    pub(crate) lane: usize,
    pub(crate) finished: Vec<Finished>,
    /// Held messages whose turn came while the batch ran: to schedule.
    pub(crate) released: Vec<Item>,
}

/// How the inbox is asked to order a message.
#[derive(Debug, Clone, Copy)]
enum Order {
    Checked(AheadPolicy),
    Unordered,
}

impl Order {
    fn check(self) -> Check {
        match self {
            Order::Checked(ahead) => Check::Order(ahead),
            Order::Unordered => Check::None,
        }
    }
}

/// A message whose handler call is prepared, on its way through the inbox.
struct Ready {
    item: Item,
    meta: Meta,
    /// The key position it follows, for this consumer's bindings.
    after: Option<i64>,
    handler: Arc<dyn Erased>,
    call: Option<Call>,
    order: Order,
    span: tracing::Span,
}

impl Ready {
    fn is_held(&self) -> bool {
        matches!(self.item.source, Source::Held { .. })
    }

    /// A sync handler call with what the inbox needs to run it; the call
    /// is spent by it.
    fn inbox_call(&mut self) -> Result<InboxCall> {
        let call = match self.call.take() {
            Some(call) => call,
            // Spent on a run that rolled back: deserialize again.
            None => self
                .handler
                .prepare(&self.meta, &self.item.body)
                .map_err(Error::Handler)?,
        };
        match call {
            Call::Sync(f) => Ok(InboxCall {
                f,
                message_id: self.meta.message_id,
                key: self.meta.key().map(|(k, s)| (k.to_owned(), s)),
                after: self.after,
                check: self.order.check(),
                held: self.is_held(),
                span: self.span.clone(),
            }),
            #[cfg(feature = "async")]
            Call::Async(_) => Err(Error::Handler(
                "an async handler's call on the sync path".to_owned(),
            )),
        }
    }
}

/// A sync handler call with what the inbox needs, movable to the blocking
/// thread; the same whether it runs alone or in a batch's transaction.
struct InboxCall {
    f: Box<dyn FnOnce(&mut PgConnection) -> crate::handler::HandlerResult + Send>,
    message_id: Uuid,
    key: Option<(String, i64)>,
    after: Option<i64>,
    check: Check,
    held: bool,
    span: tracing::Span,
}

impl InboxCall {
    /// The inbox transaction (a savepoint when `conn` is in one already).
    fn run(self, inbox: &crate::inbox::Inbox, conn: &mut PgConnection) -> Result<Outcome> {
        let _entered = self.span.enter();
        let incoming = Incoming {
            message_id: self.message_id,
            key: self.key.as_ref().map(|(k, s)| (k.as_str(), *s)),
            after: self.after,
        };
        if self.held {
            inbox.apply_held(conn, incoming, self.check, self.f)
        } else {
            inbox.run(conn, incoming, self.check, self.f)
        }
    }
}

/// What preparing a message came to.
// Both variants hold a message; boxing one would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum Prepared {
    Ready(Ready),
    /// Settled without the inbox (dead-lettered, ignored) or to retry.
    Finished(Finish<Item>),
}

/// One lane: its database connections and the session's dead-letter channel.
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
    /// Keys this batch moved that have held messages behind them.
    woken: Vec<String>,
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
            woken: Vec::new(),
        }
    }

    /// Runs batches until the session drops its sender. The messages of a
    /// batch have different keys; their sync handlers share one
    /// transaction, so a backlog costs one commit per batch, not per
    /// message. Nothing is acked before that commit.
    pub(crate) async fn run(
        mut self,
        mut jobs: mpsc::Receiver<Vec<Item>>,
        done: mpsc::UnboundedSender<Done>,
    ) -> Self {
        while let Some(batch) = jobs.recv().await {
            let finished = self.process(batch).await;
            let released = self.release_held().await;
            if done
                .send(Done {
                    lane: self.index,
                    finished,
                    released,
                })
                .is_err()
            {
                break;
            }
        }
        self
    }

    async fn process(&mut self, batch: Vec<Item>) -> Vec<Finished> {
        let mut finished: Vec<Finished> = Vec::with_capacity(batch.len());
        let mut together = Vec::new();
        let mut alone = Vec::new();
        for item in batch {
            let label = Finished::of(&item);
            match self.prepare(item).await {
                Prepared::Finished(finish) => finished.push(label(finish)),
                // Live deliveries with sync handlers share a transaction;
                // async handlers and held messages run alone.
                Prepared::Ready(ready)
                    if !ready.is_held() && matches!(ready.call, Some(Call::Sync(_))) =>
                {
                    together.push(ready);
                }
                Prepared::Ready(ready) => alone.push(ready),
            }
        }
        if together.len() == 1 {
            alone.append(&mut together);
        }
        if !together.is_empty() {
            let (ran, results) = self.apply_together(together).await;
            match results {
                Ok(results) => {
                    for (ready, result) in ran.into_iter().zip(results) {
                        let label = Finished::of(&ready.item);
                        finished.push(label(self.conclude(ready, result).await));
                    }
                }
                // The commit failed: nothing of the batch was applied.
                Err(e) => {
                    for ready in ran {
                        let label = Finished::of(&ready.item);
                        finished.push(label(self.failed_for_now(ready.item, &e)));
                    }
                }
            }
        }
        for mut ready in alone {
            let label = Finished::of(&ready.item);
            let result = self.apply(&mut ready).await;
            finished.push(label(self.conclude(ready, result).await));
        }
        flush_acks(std::mem::take(&mut self.acks)).await;
        finished
    }

    /// Reads a message and prepares its handler call; settles at once what
    /// needs no inbox transaction (malformed, unknown, undeserializable).
    async fn prepare(&mut self, mut item: Item) -> Prepared {
        let mut meta = match &item.meta {
            Ok(meta) => meta.clone(),
            Err(bad) => {
                let reason = format!("malformed message: {}", bad.reason);
                return Prepared::Finished(self.dead_letter(item, reason).await);
            }
        };
        meta.attempt = item.attempts + 1;
        // A replay is honoured only when it came straight into our queue
        // (the default exchange) and the replay tool recorded it: then it
        // is routed by where it was first published, and applied whatever
        // its key's position. Otherwise the header is just a header.
        if meta.asks_replay() && item.exchange.is_empty() {
            match self.recorded_replay(meta.message_id).await {
                Ok(Some(record)) => {
                    meta.exchange = record.original_exchange;
                    meta.routing_key = record.original_routing_key;
                    meta.replayed = true;
                    item.replay_of = Some((meta.exchange.clone(), meta.routing_key.clone()));
                }
                Ok(None) => {}
                Err(e) => return Prepared::Finished(self.failed_for_now(item, &e)),
            }
        }
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
        let routes = &self.shared.routes;
        let Some(handler) = routes.find(&meta.exchange, &meta.routing_key).cloned() else {
            return Prepared::Finished(match self.shared.config.unknown {
                UnknownPolicy::Ignore => self.settle(item, Settled::Ignored).await,
                UnknownPolicy::DeadLetter => {
                    let reason = format!(
                        "no handler for exchange {:?} routing key {:?}",
                        meta.exchange, meta.routing_key
                    );
                    self.dead_letter(item, reason).await
                }
            });
        };
        // What this consumer must have applied first: the latest earlier
        // event of the key on a route it binds.
        let after = meta
            .key_prev
            .as_ref()
            .map(|prev| prev.predecessor(|x, r| routes.find(x, r).is_some()));
        let order = if meta.replayed {
            Order::Unordered
        } else if item.gap_expired && self.shared.config.after_gap == GapPolicy::Apply {
            Order::Checked(AheadPolicy::Apply)
        } else {
            Order::Checked(AheadPolicy::Hold)
        };
        match handler.prepare(&meta, &item.body) {
            Err(reason) => Prepared::Finished(self.dead_letter(item, reason).await),
            Ok(call) => Prepared::Ready(Ready {
                item,
                meta,
                after,
                handler,
                call: Some(call),
                order,
                span,
            }),
        }
    }

    /// The replay tool's record of `message_id`.
    async fn recorded_replay(
        &mut self,
        message_id: Uuid,
    ) -> Result<Option<crate::inbox::ReplayRecord>> {
        let inbox = self.shared.inbox.clone();
        self.with_conn(move |conn| inbox.find_replay(conn, message_id))
            .await
    }

    /// Acts on a message's inbox outcome: ack, hold, retry or dead-letter.
    async fn conclude(&mut self, mut ready: Ready, result: Result<Outcome>) -> Finish<Item> {
        let result = match result {
            Ok(Outcome {
                applied: Applied::Late { last },
                ..
            }) if self.shared.config.late == LatePolicy::Apply => {
                Counters::add(&self.shared.counters.late);
                tracing::warn!(parent: &ready.span, last, "late message applied out of order");
                ready.order = Order::Unordered;
                self.apply(&mut ready).await
            }
            other => other,
        };
        tracing::debug!(parent: &ready.span, outcome = ?result, "inbox outcome");
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(e) => return self.failed_for_now(ready.item, &e),
        };
        if outcome.held_behind {
            self.woken.push(ready.item.key.clone());
        }
        let counters = &self.shared.counters;
        let span = ready.span.clone();
        let item = ready.item;
        match outcome.applied {
            Applied::Applied => {
                self.db_failures = 0;
                Counters::add(&counters.applied);
                self.ack(&item);
                Finish::Done
            }
            Applied::Duplicate => {
                Counters::add(&counters.duplicates);
                self.ack(&item);
                Finish::Done
            }
            Applied::Discarded(reason) => {
                tracing::info!(parent: &span, %reason, "handler discarded the message");
                Counters::add(&counters.discarded);
                self.ack(&item);
                Finish::Done
            }
            Applied::Held { last } => match item.source {
                Source::Delivery { .. } => {
                    let after = ready.after;
                    self.hold(item, after).await
                }
                // The gap did not fill in time and the policy says so.
                Source::Held { .. } if item.gap_expired => {
                    let reason = format!(
                        "key_seq {} still waits for an earlier event (the key is at {last}) after \
                         the key did not move for the gap wait of {:?}",
                        item.seq, self.shared.config.gap_wait
                    );
                    self.dead_letter(item, reason).await
                }
                // Still waiting; it stays in the table.
                Source::Held { .. } => Finish::Done,
            },
            Applied::TooFarAhead { last, max } => {
                let reason = format!(
                    "malformed message: key_seq {} is more than {max} beyond the key's position {last}",
                    item.seq
                );
                let mut item = item;
                item.keep_key = true;
                self.dead_letter(item, reason).await
            }
            Applied::Late { last } => {
                Counters::add(&counters.late);
                let reason = format!(
                    "late: key_seq {} is at or behind the key's position {last}, and was never applied",
                    item.seq
                );
                self.dead_letter(item, reason).await
            }
            Applied::Retry { after, reason } => {
                Counters::add(&counters.retried);
                let mut item = item;
                item.attempts += 1;
                let retry = &self.shared.config.retry;
                if retry.exhausted(item.attempts) {
                    let reason = format!("handler failed {} times; last: {reason}", item.attempts);
                    return self.dead_letter(item, reason).await;
                }
                let delay = after.unwrap_or_else(|| retry.delay(item.attempts));
                tracing::info!(parent: &span, %reason, ?delay, attempts = item.attempts, "handler did not succeed; will retry");
                Finish::RetryAt(item, Instant::now() + delay)
            }
        }
    }

    /// Keeps a delivery that is ahead of its key in `inbox_held`, then
    /// acks it.
    async fn hold(&mut self, item: Item, after: Option<i64>) -> Finish<Item> {
        let (Ok(meta), Source::Delivery { .. }) = (&item.meta, &item.source) else {
            return Finish::Done;
        };
        let properties = match held::encode_properties(&item.properties) {
            Ok(p) => p,
            Err(e) => return self.failed_for_now(item, &e),
        };
        let inbox = self.shared.inbox.clone();
        let (message_id, key, exchange, routing_key, body) = (
            meta.message_id,
            meta.key().map(|(k, s)| (k.to_owned(), s)),
            item.exchange.clone(),
            item.routing_key.clone(),
            item.body.clone(),
        );
        let held = self
            .with_conn(move |conn| {
                let incoming = Incoming {
                    message_id,
                    key: key.as_ref().map(|(k, s)| (k.as_str(), *s)),
                    after,
                };
                inbox.hold(
                    conn,
                    incoming,
                    &ToHold {
                        exchange: &exchange,
                        routing_key: &routing_key,
                        properties: &properties,
                        body: &body,
                    },
                )
            })
            .await;
        match held {
            Ok(Hold::Held) => {
                Counters::add(&self.shared.counters.held);
                self.ack(&item);
                Finish::Done
            }
            Ok(Hold::Duplicate) => {
                Counters::add(&self.shared.counters.duplicates);
                self.ack(&item);
                Finish::Done
            }
            // Its predecessor was applied meanwhile: run it again now.
            Ok(Hold::NotAhead) => Finish::RetryAt(item, Instant::now()),
            Err(e) => self.failed_for_now(item, &e),
        }
    }

    /// Loads the held messages of the keys this batch moved whose turn has
    /// come, for the session to schedule.
    async fn release_held(&mut self) -> Vec<Item> {
        let keys: Vec<String> = std::mem::take(&mut self.woken)
            .into_iter()
            .filter_map(|k| k.strip_prefix("k:").map(str::to_owned))
            .collect();
        if keys.is_empty() {
            return Vec::new();
        }
        let inbox = self.shared.inbox.clone();
        let loaded = self
            .with_conn(move |conn| {
                let mut rows = Vec::new();
                for key in &keys {
                    rows.extend(inbox.runnable_held(conn, key, 16)?);
                }
                Ok(rows)
            })
            .await;
        match loaded {
            Ok(rows) => rows.into_iter().map(Item::held).collect(),
            // The sweep finds them instead.
            Err(e) => {
                tracing::warn!(consumer = %self.shared.config.name, error = %e, "cannot read held messages; the sweep will");
                Vec::new()
            }
        }
    }

    /// Applies several live deliveries (different keys, sync handlers) in
    /// one transaction. First the fast way, every message in one pass
    /// ([`batch::apply_batch`]); if one of them needs undoing on its own,
    /// again with each message in its own savepoint, so a handler's retry,
    /// discard or hold touches only its own message. If the commit fails,
    /// every one of them failed.
    async fn apply_together(
        &mut self,
        mut batch: Vec<Ready>,
    ) -> (Vec<Ready>, Result<Vec<Result<Outcome>>>) {
        // Both ways lock the keys in one order, byte order of the key (the
        // one-pass statement sorts with collation "C"): two transactions
        // over overlapping keys, as two instances during a hand-over may
        // run, then cannot deadlock.
        batch.sort_by(|a, b| a.item.key.cmp(&b.item.key));
        let mut calls = Vec::with_capacity(batch.len());
        for ready in &mut batch {
            match ready.inbox_call() {
                Ok(call) => calls.push(call),
                Err(e) => return (batch, Err(e)),
            }
        }
        match self.apply_in_one_pass(calls).await {
            Ok(Some(outcomes)) => return (batch, Ok(outcomes.into_iter().map(Ok).collect())),
            Ok(None) => {}
            Err(e) => return (batch, Err(e)),
        }
        // The calls were spent on the pass that rolled back: again, each
        // message in its own savepoint.
        let calls: Vec<Result<InboxCall>> = batch.iter_mut().map(Ready::inbox_call).collect();
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
        (batch, results)
    }

    /// The one-pass batch, when every message takes the ordered path.
    /// `Ok(None)`: it does not qualify, or a message needed undoing on its
    /// own and the pass rolled back.
    async fn apply_in_one_pass(&mut self, calls: Vec<InboxCall>) -> Result<Option<Vec<Outcome>>> {
        let mut batch = Vec::with_capacity(calls.len());
        for c in calls {
            let Check::Order(ahead) = c.check else {
                return Ok(None);
            };
            batch.push(BatchCall {
                f: c.f,
                message_id: c.message_id,
                key: c.key,
                after: c.after,
                ahead,
                span: c.span,
            });
        }
        let inbox = self.shared.inbox.clone();
        match self
            .with_conn(move |conn| batch::apply_batch(&inbox, conn, batch))
            .await
        {
            Ok(outcomes) => Ok(outcomes),
            // Perhaps one handler's statement failed and took the shared
            // transaction with it: the careful path finds out which.
            Err(e @ Error::Database { .. }) => {
                tracing::debug!(error = %e, "one-pass batch failed; applying it message by message");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// The inbox transaction with the handler, on the lane's connection.
    async fn apply(&mut self, ready: &mut Ready) -> Result<Outcome> {
        #[cfg(feature = "async")]
        if let Some(Call::Async(_)) = &ready.call {
            return self.apply_async(ready).await;
        }
        let call = ready.inbox_call()?;
        let inbox = self.shared.inbox.clone();
        self.with_conn(move |conn| call.run(&inbox, conn)).await
    }

    /// [`Lane::apply`] for a diesel-async handler, on the lane's async
    /// connection (a discard is recorded on the sync one).
    #[cfg(feature = "async")]
    async fn apply_async(&mut self, ready: &mut Ready) -> Result<Outcome> {
        use crate::inbox_async::AsyncOutcome;
        use tracing::Instrument;

        let Some(Call::Async(f)) = ready.call.take() else {
            return Err(Error::Handler("an async handler's call was spent".into()));
        };
        let incoming = Incoming {
            message_id: ready.meta.message_id,
            key: ready.meta.key(),
            after: ready.after,
        };
        let mut conn = match self.async_conn.take() {
            Some(c) => c,
            None => crate::connect::async_handler_database(&self.shared.config).await?,
        };
        let inbox = self.shared.inbox.clone();
        let check = ready.order.check();
        let held = ready.is_held();
        let result = async {
            if held {
                inbox.apply_held_async(&mut conn, incoming, check, f).await
            } else {
                inbox.run_async(&mut conn, incoming, check, f).await
            }
        }
        .instrument(ready.span.clone())
        .await;
        if !matches!(result, Err(Error::Database { .. })) {
            self.async_conn = Some(conn);
        }
        match result? {
            AsyncOutcome::Done(outcome) => Ok(outcome),
            AsyncOutcome::Discarded(reason) => {
                let held_behind = self.record_settled(&ready.item, Settled::Discarded).await?;
                Ok(Outcome {
                    applied: Applied::Discarded(reason),
                    held_behind,
                })
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
        let shared = Arc::clone(&self.shared);
        let (conn, result) = tokio::task::spawn_blocking(move || {
            let mut conn = match conn {
                Some(conn) => conn,
                None => match crate::connect::handler_database(&shared.config) {
                    Ok(conn) => conn,
                    Err(e) => return (None, Err(e)),
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

    /// Records the message as settled without a handler (its key moves past
    /// it), then acks it.
    async fn settle(&mut self, item: Item, outcome: Settled) -> Finish<Item> {
        match self.record_settled(&item, outcome).await {
            Ok(held_behind) => {
                if held_behind {
                    self.woken.push(item.key.clone());
                }
                let counters = &self.shared.counters;
                match outcome {
                    Settled::DeadLettered => Counters::add(&counters.dead_lettered),
                    Settled::Ignored => Counters::add(&counters.ignored),
                    Settled::Discarded => Counters::add(&counters.discarded),
                }
                self.ack(&item);
                Finish::Done
            }
            Err(e) => self.failed_for_now(item, &e),
        }
    }

    /// The settle's transaction: whether messages of the key are held.
    async fn record_settled(&mut self, item: &Item, outcome: Settled) -> Result<bool> {
        let Some(incoming) = item.incoming() else {
            // No id to record (an unreadable message id): nothing dedupes it.
            return Ok(false);
        };
        let (message_id, key) = (
            incoming.message_id,
            incoming.key.map(|(k, s)| (k.to_owned(), s)),
        );
        let held = matches!(item.source, Source::Held { .. });
        let inbox = self.shared.inbox.clone();
        let settled = self
            .with_conn(move |conn| {
                let incoming = Incoming {
                    message_id,
                    key: key.as_ref().map(|(k, s)| (k.as_str(), *s)),
                    after: None,
                };
                if held {
                    inbox.settle_held(conn, incoming, outcome)
                } else {
                    inbox.settle_inner(conn, incoming, outcome)
                }
            })
            .await?;
        Ok(settled == Some(true))
    }

    /// Publishes the message to the dead-letter queue (confirmed), records
    /// it, moves its key on, and acks it.
    async fn dead_letter(&mut self, item: Item, reason: String) -> Finish<Item> {
        let published = dead_letter::publish(
            &self.dead_letters,
            &self.shared.config,
            DeadLetter {
                // Where it was first published: the replay record's place
                // for an honoured replay, else where it came from (never
                // what its headers claim).
                exchange: item.replay_of.as_ref().map_or(&item.exchange, |(x, _)| x),
                routing_key: item
                    .replay_of
                    .as_ref()
                    .map_or(&item.routing_key, |(_, rk)| rk),
                properties: &item.properties,
                body: &item.body,
                reason: &reason,
                attempts: item.attempts,
            },
        )
        .await;
        if let Err(e) = published {
            // Keep it: unacked (or held), it comes back if the channel is gone.
            return self.failed_for_now(item, &e);
        }
        let id = match &item.meta {
            Ok(meta) => Some(meta.message_id),
            Err(bad) => bad.message_id,
        };
        tracing::warn!(consumer = %self.shared.config.name, instance = %self.shared.instance, message_id = ?id, %reason, "message dead-lettered");
        self.settle(item, Settled::DeadLettered).await
    }

    /// Queues the delivery's ack for the end of the batch.
    fn ack(&mut self, item: &Item) {
        if let Source::Delivery { acker, .. } = &item.source {
            self.acks.push(acker.clone());
        }
    }
}

/// Sends the acks of a batch (all after its commit) side by side. A failed
/// ack (the channel went away) is harmless: the broker redelivers and the
/// inbox absorbs the duplicate. Bounded: on a connection that died, the
/// client may never answer, and the lane must not wait for it.
async fn flush_acks(acks: Vec<Acker>) {
    let sent = futures_util::future::join_all(
        acks.iter()
            .map(|acker| acker.ack(BasicAckOptions::default())),
    );
    match tokio::time::timeout(crate::session::BROKER_CALL_TIMEOUT, sent).await {
        Ok(sent) => {
            for e in sent.into_iter().filter_map(|r| r.err()) {
                tracing::debug!(error = %e, "ack failed; the redelivery will be a duplicate");
            }
        }
        Err(_) => tracing::debug!(
            "acks unanswered (connection lost); the redeliveries will be duplicates"
        ),
    }
}
