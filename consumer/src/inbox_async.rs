//! The inbox transaction on diesel-async's `AsyncPgConnection` (feature
//! `async`): the same statements and decisions as the sync path in
//! [`inbox`](crate::inbox), awaited instead of blocking.

use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};

use crate::handler::{BoxFuture, HandlerResult};
use crate::inbox::{
    Abort, Applied, Check, Handled, HandlerError, Inbox, Incoming, Inserted, LastSeq, finish,
    out_of_turn,
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
                let last = match message.key {
                    Some((key, _)) => Some(
                        self.lock_key_query(key)
                            .get_result::<LastSeq>(conn)
                            .await?
                            .last_seq,
                    ),
                    None => None,
                };
                let revive = matches!(check, Check::None);
                let inserted: Vec<Inserted> = self
                    .record_query(message, "applied", revive)
                    .load(conn)
                    .await?;
                if inserted.is_empty() {
                    return Err(Abort::Outcome(Applied::Duplicate));
                }
                if let Some(outcome) = out_of_turn(last, message, check) {
                    return Err(Abort::Outcome(outcome));
                }
                let handled = conn
                    .transaction::<(), Handled, _>(async move |conn| {
                        handler(conn).await.map_err(Handled::Handler)
                    })
                    .await;
                match handled {
                    Ok(()) => {
                        if let Some(q) = self.move_key_query(message) {
                            q.execute(conn).await?;
                        }
                        Ok(Applied::Applied)
                    }
                    Err(Handled::Handler(HandlerError::Retry { after, reason })) => {
                        Err(Abort::Outcome(Applied::Retry { after, reason }))
                    }
                    Err(Handled::Handler(HandlerError::Discard(reason))) => {
                        self.mark_discarded_query(message).execute(conn).await?;
                        if let Some(q) = self.move_key_query(message) {
                            q.execute(conn).await?;
                        }
                        Ok(Applied::Discarded(reason))
                    }
                    Err(Handled::Database(e)) => Err(Abort::Database(e)),
                }
            })
            .await;
        finish(result)
    }
}
