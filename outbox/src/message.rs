//! A validated message, ready to be written to the outbox.

use serde::Serialize;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::{Error, Event, Result, trace, validate};

/// One outbox message: where it goes, its JSON body and its headers.
///
/// Build it from a typed [`Event`] with [`Message::from_event`], or field by
/// field with [`Message::builder`] when the destination is only known at run
/// time. Every field has been checked by the time a `Message` exists; only
/// the payload size is checked at enqueue, against the [`crate::Config`].
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub(crate) id: Uuid,
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
    pub(crate) event_type: String,
    pub(crate) event_version: i32,
    pub(crate) ordering_key: Option<String>,
    pub(crate) payload: Vec<u8>,
    pub(crate) headers: Map<String, Value>,
}

impl Message {
    /// The message for a typed event, with the trace context of the current
    /// span in its headers.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] when a constant or the ordering key breaks the
    /// rules in [`MessageBuilder::build`], [`Error::Serialize`] when the
    /// event does not serialize.
    pub fn from_event<E: Event>(event: &E) -> Result<Self> {
        MessageBuilder::from_event(event).build()
    }

    /// Starts a message for the given exchange, routing key and event type.
    pub fn builder(
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
        event_type: impl Into<String>,
    ) -> MessageBuilder {
        MessageBuilder {
            id: None,
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            event_type: event_type.into(),
            event_version: 1,
            ordering_key: None,
            payload: Payload::Missing,
            headers: Vec::new(),
        }
    }

    /// The message id: the AMQP `message_id` consumers dedupe on (UUID v7).
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// The topic exchange the relay publishes to.
    pub fn exchange(&self) -> &str {
        &self.exchange
    }

    /// The routing key.
    pub fn routing_key(&self) -> &str {
        &self.routing_key
    }

    /// The event type.
    pub fn event_type(&self) -> &str {
        &self.event_type
    }

    /// The payload's schema version.
    pub fn event_version(&self) -> u32 {
        self.event_version.unsigned_abs()
    }

    /// The ordering key, if the message has one.
    pub fn ordering_key(&self) -> Option<&str> {
        self.ordering_key.as_deref()
    }

    /// The JSON body, byte for byte as it will be published.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// User headers and trace context.
    pub fn headers(&self) -> &Map<String, Value> {
        &self.headers
    }
}

/// Where the builder's body comes from; serialized at `build`.
#[derive(Debug)]
enum Payload {
    Missing,
    Json(std::result::Result<Vec<u8>, serde_json::Error>),
    Raw(Vec<u8>),
}

/// Builds a [`Message`]; [`MessageBuilder::build`] checks every field.
#[derive(Debug)]
#[must_use = "a builder does nothing until build() is called"]
pub struct MessageBuilder {
    id: Option<Uuid>,
    exchange: String,
    routing_key: String,
    event_type: String,
    event_version: u32,
    ordering_key: Option<String>,
    payload: Payload,
    // Kept in call order and checked at build, so a bad name is reported
    // there like every other field.
    headers: Vec<(String, Value)>,
}

impl MessageBuilder {
    /// A builder filled from a typed event; add headers before `build`.
    pub fn from_event<E: Event>(event: &E) -> Self {
        let mut builder = Message::builder(E::EXCHANGE, E::ROUTING_KEY, E::EVENT_TYPE)
            .version(E::VERSION)
            .json(event);
        builder.ordering_key = event.ordering_key();
        builder
    }

    /// Sets the message id. Defaults to a new UUID v7; set it only to make a
    /// retried producer write the same id.
    pub fn id(mut self, id: Uuid) -> Self {
        self.id = Some(id);
        self
    }

    /// Sets the payload's schema version. Defaults to 1.
    pub fn version(mut self, version: u32) -> Self {
        self.event_version = version;
        self
    }

    /// Sets the ordering key. Defaults to none (unordered).
    pub fn ordering_key(mut self, key: impl Into<String>) -> Self {
        self.ordering_key = Some(key.into());
        self
    }

    /// Sets the body to `value` serialized as JSON.
    pub fn json<T: Serialize + ?Sized>(mut self, value: &T) -> Self {
        self.payload = Payload::Json(serde_json::to_vec(value));
        self
    }

    /// Sets the body to bytes that are already JSON; `build` checks they parse.
    pub fn raw_json(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.payload = Payload::Raw(bytes.into());
        self
    }

    /// Adds a header (sent as an AMQP header). A second call with the same
    /// name replaces the value.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Value>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Checks every field and returns the message.
    ///
    /// The W3C `traceparent` (and `tracestate`) of the current `tracing` span
    /// are added as headers unless already set.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] naming the field: an exchange outside
    /// `A-Z a-z 0-9 _ . : -` or starting with `amq.`; a routing key that is
    /// not dot-separated words of `A-Z a-z 0-9 _ : -`; an event type that is
    /// empty or has control characters; a version of 0; an ordering key that
    /// is empty; a header name that is empty or reserved (every name the
    /// toolkit sets or interprets: see [`crate::wire::is_reserved`]); any name over 255
    /// bytes. [`Error::Serialize`] when the payload does not serialize or
    /// raw bytes are not JSON; [`Error::Invalid`] for a missing payload.
    pub fn build(self) -> Result<Message> {
        validate::exchange(&self.exchange)?;
        validate::routing_key(&self.routing_key)?;
        validate::event_type(&self.event_type)?;
        let event_version = validate::event_version(self.event_version)?;
        if let Some(key) = &self.ordering_key {
            validate::ordering_key(key)?;
        }
        let payload = match self.payload {
            Payload::Missing => {
                return Err(Error::invalid(
                    "payload",
                    "",
                    "set one with json() or raw_json()",
                ));
            }
            Payload::Json(result) => result.map_err(|cause| Error::Serialize {
                event_type: self.event_type.clone(),
                cause,
            })?,
            Payload::Raw(bytes) => {
                serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).map_err(|cause| {
                    Error::Serialize {
                        event_type: self.event_type.clone(),
                        cause,
                    }
                })?;
                bytes
            }
        };
        let mut headers = Map::new();
        for (name, value) in self.headers {
            validate::header_name(&name)?;
            validate::header_value(&value)?;
            headers.insert(name, value);
        }
        if !headers.contains_key("traceparent")
            && let Some((traceparent, tracestate)) = trace::current()
        {
            headers.insert("traceparent".into(), traceparent.into());
            if let Some(tracestate) = tracestate {
                headers.insert("tracestate".into(), tracestate.into());
            }
        }
        let headers = Value::Object(headers);
        let size = crate::wire::headers_size(&headers);
        if size > crate::wire::MAX_HEADERS_BYTES {
            return Err(Error::invalid(
                "headers",
                &format!("{size} bytes as JSON"),
                "together at most 16384 bytes as JSON (the broker takes a message's properties in one frame)",
            ));
        }
        let Value::Object(headers) = headers else {
            unreachable!("built as an object just above")
        };
        Ok(Message {
            id: self.id.unwrap_or_else(Uuid::now_v7),
            exchange: self.exchange,
            routing_key: self.routing_key,
            event_type: self.event_type,
            event_version,
            ordering_key: self.ordering_key,
            payload,
            headers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Shipped {
        parcel: u32,
    }

    impl Event for Shipped {
        const EXCHANGE: &'static str = "logistics";
        const ROUTING_KEY: &'static str = "logistics.v2.shipped";
        const EVENT_TYPE: &'static str = "logistics.shipped";
        const VERSION: u32 = 2;

        fn ordering_key(&self) -> Option<String> {
            Some(format!("parcel-{}", self.parcel))
        }
    }

    #[test]
    fn from_event_takes_every_field_from_the_type() {
        let msg = Message::from_event(&Shipped { parcel: 7 }).unwrap();
        assert_eq!(msg.exchange(), "logistics");
        assert_eq!(msg.routing_key(), "logistics.v2.shipped");
        assert_eq!(msg.event_type(), "logistics.shipped");
        assert_eq!(msg.event_version(), 2);
        assert_eq!(msg.ordering_key(), Some("parcel-7"));
        assert_eq!(msg.payload(), br#"{"parcel":7}"#);
        assert_eq!(msg.id().get_version_num(), 7);
    }

    #[test]
    fn raw_payload_must_be_json() {
        let err = Message::builder("a", "a.b", "t")
            .raw_json(b"{nope".to_vec())
            .build()
            .unwrap_err();
        assert!(matches!(err, Error::Serialize { .. }), "{err}");
        assert!(
            Message::builder("a", "a.b", "t")
                .raw_json(b"[1,2]".to_vec())
                .build()
                .is_ok()
        );
    }

    #[test]
    fn missing_payload_is_refused() {
        let err = Message::builder("a", "a.b", "t").build().unwrap_err();
        assert!(err.to_string().contains("payload"), "{err}");
    }

    #[test]
    fn user_headers_are_kept_and_reserved_ones_refused() {
        let msg = Message::builder("a", "a.b", "t")
            .json(&1)
            .header("tenant", "acme")
            .header("priority", 3)
            .build()
            .unwrap();
        assert_eq!(msg.headers()["tenant"], "acme");
        assert_eq!(msg.headers()["priority"], 3);
        let err = Message::builder("a", "a.b", "t")
            .json(&1)
            .header("x-key-seq", 9)
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("x-key-seq"), "{err}");
    }
}
