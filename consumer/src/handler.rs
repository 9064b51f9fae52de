//! Typed handlers: a serde event type bound to routing-key patterns, and
//! the registry that finds the handler for a delivery.

use std::marker::PhantomData;
use std::sync::Arc;

use diesel::PgConnection;
use serde::de::DeserializeOwned;

use crate::envelope::{Envelope, Meta};
use crate::inbox::HandlerError;
use crate::route::topic_matches;

/// What a handler returns: `Ok` commits its writes with the dedupe row.
pub type HandlerResult = Result<(), HandlerError>;

/// A future a handler on diesel-async returns (feature `async`).
#[cfg(feature = "async")]
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// A handler call, deserialized and ready to run on the transaction's
/// connection.
pub(crate) enum Call {
    Sync(Box<dyn FnOnce(&mut PgConnection) -> HandlerResult + Send>),
    #[cfg(feature = "async")]
    Async(crate::inbox_async::AsyncCall),
}

/// A handler with its event type erased.
pub(crate) trait Erased: Send + Sync {
    /// Deserializes the body; `Err` says why it does not fit the type.
    fn prepare(&self, meta: &Meta, body: &[u8]) -> Result<Call, String>;
}

/// The typed envelope of a delivery; `Err` says why the body does not fit `E`.
fn envelope<E: DeserializeOwned>(meta: &Meta, body: &[u8]) -> Result<Envelope<E>, String> {
    let event = crate::strict::from_slice(body).map_err(|e| {
        format!(
            "body does not deserialize as {}: {e}",
            std::any::type_name::<E>()
        )
    })?;
    Ok(Envelope {
        event,
        meta: meta.clone(),
    })
}

struct SyncHandler<E, F> {
    f: Arc<F>,
    event: PhantomData<fn() -> E>,
}

impl<E, F> Erased for SyncHandler<E, F>
where
    E: DeserializeOwned + Send + 'static,
    F: Fn(&mut PgConnection, Envelope<E>) -> HandlerResult + Send + Sync + 'static,
{
    fn prepare(&self, meta: &Meta, body: &[u8]) -> Result<Call, String> {
        let envelope = envelope::<E>(meta, body)?;
        let f = Arc::clone(&self.f);
        Ok(Call::Sync(Box::new(move |conn| f(conn, envelope))))
    }
}

#[cfg(feature = "async")]
struct AsyncHandler<E, F> {
    f: Arc<F>,
    event: PhantomData<fn() -> E>,
}

#[cfg(feature = "async")]
impl<E, F> Erased for AsyncHandler<E, F>
where
    E: DeserializeOwned + Send + 'static,
    F: for<'c> Fn(
            &'c mut diesel_async::AsyncPgConnection,
            Envelope<E>,
        ) -> BoxFuture<'c, HandlerResult>
        + Send
        + Sync
        + 'static,
{
    fn prepare(&self, meta: &Meta, body: &[u8]) -> Result<Call, String> {
        let envelope = envelope::<E>(meta, body)?;
        let f = Arc::clone(&self.f);
        Ok(Call::Async(Box::new(move |conn| f(conn, envelope))))
    }
}

/// One binding: a producer's exchange, a topic pattern, and its handler.
#[derive(Clone)]
pub(crate) struct Route {
    pub(crate) exchange: String,
    pub(crate) pattern: String,
    pub(crate) handler: Arc<dyn Erased>,
}

impl Route {
    pub(crate) fn sync<E, F>(exchange: &str, pattern: &str, f: F) -> Self
    where
        E: DeserializeOwned + Send + 'static,
        F: Fn(&mut PgConnection, Envelope<E>) -> HandlerResult + Send + Sync + 'static,
    {
        Route {
            exchange: exchange.to_owned(),
            pattern: pattern.to_owned(),
            handler: Arc::new(SyncHandler {
                f: Arc::new(f),
                event: PhantomData,
            }),
        }
    }

    #[cfg(feature = "async")]
    pub(crate) fn asynchronous<E, F>(exchange: &str, pattern: &str, f: F) -> Self
    where
        E: DeserializeOwned + Send + 'static,
        F: for<'c> Fn(
                &'c mut diesel_async::AsyncPgConnection,
                Envelope<E>,
            ) -> BoxFuture<'c, HandlerResult>
            + Send
            + Sync
            + 'static,
    {
        Route {
            exchange: exchange.to_owned(),
            pattern: pattern.to_owned(),
            handler: Arc::new(AsyncHandler {
                f: Arc::new(f),
                event: PhantomData,
            }),
        }
    }
}

/// The routes of a consumer, first match wins.
#[derive(Clone, Default)]
pub(crate) struct Routes(pub(crate) Vec<Route>);

impl Routes {
    /// The handler for a message published to `exchange` with `routing_key`.
    pub(crate) fn find(&self, exchange: &str, routing_key: &str) -> Option<&Arc<dyn Erased>> {
        self.0
            .iter()
            .find(|r| r.exchange == exchange && topic_matches(&r.pattern, routing_key))
            .map(|r| &r.handler)
    }
}
