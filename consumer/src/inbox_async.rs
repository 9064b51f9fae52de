//! The inbox transaction on diesel-async's `AsyncPgConnection` (feature
//! `async`): the same statements and decisions as the sync path in
//! [`inbox`](crate::inbox), awaited instead of blocking.

use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

use crate::handler::{BoxFuture, HandlerResult};
use crate::inbox::{
    Abort, Applied, Check, HandlerError, Inbox, Incoming, Recorded, Settled, finish, out_of_turn,
};
use crate::{AheadPolicy, Error, Result};

/// A handler call on the async connection.
pub(crate) type AsyncCall =
    Box<dyn for<'c> FnOnce(&'c mut AsyncPgConnection) -> BoxFuture<'c, HandlerResult> + Send>;

/// Connects a lane's async connection.
pub(crate) async fn connect(url: &str) -> Result<AsyncPgConnection> {
    AsyncPgConnection::establish(url)
        .await
        .map_err(|e| Error::Connect {
            what: "database",
            url: outbox::redact_url(url),
            cause: e.to_string(),
        })
}

impl Inbox {
    /// [`Inbox::apply`] on an `AsyncPgConnection`.
    pub(crate) async fn apply_async(
        &self,
        conn: &mut AsyncPgConnection,
        message: Incoming<'_>,
        ahead: AheadPolicy,
        handler: AsyncCall,
    ) -> Result<Applied> {
        self.run_async(conn, message, Check::Order(ahead), handler)
            .await
    }

    /// [`Inbox::apply_unordered`] on an `AsyncPgConnection`.
    pub(crate) async fn apply_unordered_async(
        &self,
        conn: &mut AsyncPgConnection,
        message: Incoming<'_>,
        handler: AsyncCall,
    ) -> Result<Applied> {
        self.run_async(conn, message, Check::None, handler).await
    }

    async fn run_async(
        &self,
        conn: &mut AsyncPgConnection,
        message: Incoming<'_>,
        check: Check,
        handler: AsyncCall,
    ) -> Result<Applied> {
        let result = conn
            .transaction::<Applied, Abort, _>(async move |conn| {
                let revive = matches!(check, Check::None);
                let Some(last) = self
                    .record_query(message, "applied", revive)
                    .load::<Recorded>(conn)
                    .await?
                    .pop()
                else {
                    return Err(Abort::Outcome(Applied::Duplicate));
                };
                if let Some(outcome) = out_of_turn(last.last_seq, message, check) {
                    return Err(Abort::Outcome(outcome));
                }
                match handler(conn).await {
                    Ok(()) => {
                        self.after_handler_query(message).execute(conn).await?;
                        Ok(Applied::Applied)
                    }
                    Err(HandlerError::Retry { after, reason }) => {
                        Err(Abort::Outcome(Applied::Retry { after, reason }))
                    }
                    Err(HandlerError::Discard(reason)) => Err(Abort::Discard(reason)),
                }
            })
            .await;
        if let Err(Abort::Discard(reason)) = result {
            self.settle_async(conn, message, Settled::Discarded).await?;
            return Ok(Applied::Discarded(reason));
        }
        finish(result)
    }

    /// [`Inbox::settle`] on an `AsyncPgConnection`.
    pub(crate) async fn settle_async(
        &self,
        conn: &mut AsyncPgConnection,
        message: Incoming<'_>,
        outcome: Settled,
    ) -> Result<bool> {
        conn.transaction::<bool, diesel::result::Error, _>(async move |conn| {
            let recorded: Vec<Recorded> = self
                .record_query(message, outcome.as_str(), false)
                .load(conn)
                .await?;
            if recorded.is_empty() {
                return Ok(false);
            }
            if let Some(q) = self.move_key_query(message) {
                q.execute(conn).await?;
            }
            Ok(true)
        })
        .await
        .map_err(|cause| Error::Database {
            operation: "recording a settled message",
            cause,
        })
    }
}
