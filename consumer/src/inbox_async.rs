//! The inbox transaction on diesel-async's `AsyncPgConnection` (feature
//! `async`): the same statements and decisions as the sync path in
//! [`inbox`](crate::inbox) and [`held`](crate::held), awaited instead of
//! blocking. Settling (no handler) always takes the sync path.

use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

use crate::handler::{BoxFuture, HandlerResult};
use crate::inbox::{
    Abort, Applied, Check, HandlerError, HeldCount, Inbox, Incoming, Outcome, Recorded, Takeover,
    finish, held_behind,
};
use crate::{Error, Result};

/// A handler call on the async connection.
pub(crate) type AsyncCall =
    Box<dyn for<'c> FnOnce(&'c mut AsyncPgConnection) -> BoxFuture<'c, HandlerResult> + Send>;

/// Whether a handler's transaction ended in a discard, which is recorded
/// afterwards on the sync path.
pub(crate) enum AsyncOutcome {
    Done(Outcome),
    Discarded(String),
}

impl Inbox {
    /// [`Inbox::run`] on an `AsyncPgConnection`.
    pub(crate) async fn run_async(
        &self,
        conn: &mut AsyncPgConnection,
        message: Incoming<'_>,
        check: Check,
        handler: AsyncCall,
    ) -> Result<AsyncOutcome> {
        let result = conn
            .transaction::<Outcome, Abort, _>(async move |conn| {
                let takeover = match check {
                    Check::None => Takeover::DeadLettered,
                    Check::Order(_) => Takeover::Nothing,
                };
                let Some(last) = self
                    .record_query(message, "applied", takeover)
                    .load::<Recorded>(conn)
                    .await?
                    .pop()
                else {
                    return Err(Abort::Outcome(Applied::Duplicate));
                };
                if let Some(outcome) = self.out_of_turn(last.last_seq, message, check) {
                    return Err(Abort::Outcome(outcome));
                }
                run_handler(self, conn, message, 0, handler).await
            })
            .await;
        discard_or(result)
    }

    /// [`Inbox::apply_held`] on an `AsyncPgConnection`.
    pub(crate) async fn apply_held_async(
        &self,
        conn: &mut AsyncPgConnection,
        message: Incoming<'_>,
        check: Check,
        handler: AsyncCall,
    ) -> Result<AsyncOutcome> {
        let Some((key, _)) = message.key else {
            return Err(Error::Handler("a held message has no key".into()));
        };
        let result = conn
            .transaction::<Outcome, Abort, _>(async move |conn| {
                let last = self
                    .lock_key_query(key)
                    .get_result::<crate::held::KeyPosition>(conn)
                    .await?
                    .last_seq;
                if self
                    .release_query(message.message_id, "applied")
                    .load::<crate::held::Count>(conn)
                    .await?
                    .is_empty()
                {
                    return Err(Abort::Outcome(Applied::Duplicate));
                }
                if let Some(outcome) = self.out_of_turn(Some(last), message, check) {
                    return Err(Abort::Outcome(outcome));
                }
                run_handler(self, conn, message, 1, handler).await
            })
            .await;
        discard_or(result)
    }
}

/// Runs the handler and, when it succeeds, the key's move (less `released`
/// held messages).
async fn run_handler(
    inbox: &Inbox,
    conn: &mut AsyncPgConnection,
    message: Incoming<'_>,
    released: i32,
    handler: AsyncCall,
) -> std::result::Result<Outcome, Abort> {
    use futures_util::FutureExt;
    use std::panic::AssertUnwindSafe;
    // A panic, in making the future or in running it, is a retry that
    // counts as an attempt (see `inbox::catch_panic`).
    let ran = match std::panic::catch_unwind(AssertUnwindSafe(|| handler(conn))) {
        Ok(future) => AssertUnwindSafe(future).catch_unwind().await,
        Err(panic) => Err(panic),
    };
    match ran.unwrap_or_else(|panic| Err(crate::inbox::panicked(panic.as_ref()))) {
        Ok(()) => {
            let held = inbox
                .after_handler_query(message, released)
                .load::<HeldCount>(conn)
                .await?;
            Ok(Outcome {
                applied: Applied::Applied,
                held_behind: held_behind(&held),
            })
        }
        Err(HandlerError::Retry { after, reason }) => {
            Err(Abort::Outcome(Applied::Retry { after, reason }))
        }
        Err(HandlerError::Discard(reason)) => Err(Abort::Discard(reason)),
    }
}

fn discard_or(result: std::result::Result<Outcome, Abort>) -> Result<AsyncOutcome> {
    match result {
        Err(Abort::Discard(reason)) => Ok(AsyncOutcome::Discarded(reason)),
        other => finish(other).map(AsyncOutcome::Done),
    }
}
