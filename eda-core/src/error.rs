//! Error classes shared by every part of eda.

use std::fmt;

/// Why handling an event did not succeed, and what the runtime should do about it.
///
/// A handler signals a *domain* failure by returning a failure event (see
/// [`Outcome::Failure`](crate::Outcome::Failure)); a `HandlerError` is for everything else.
/// `?` turns any `std::error::Error` into a [`transient`](HandlerError::transient) error,
/// which the runtime retries with backoff and dead-letters when the attempts run out.
/// [`permanent`](HandlerError::permanent) errors are dead-lettered at once.
///
/// ```
/// use eda_core::HandlerError;
///
/// fn parse(raw: &str) -> Result<u32, HandlerError> {
///     raw.parse::<u32>().map_err(HandlerError::permanent)
/// }
/// assert!(parse("x").unwrap_err().is_permanent());
/// ```
pub struct HandlerError {
    class: ErrorClass,
    source: Box<dyn std::error::Error + Send + Sync + 'static>,
}

/// What the runtime does with a failed handling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Worth retrying: a timeout, a lost connection, a lock conflict, a panic.
    Transient,
    /// Retrying cannot help: an undecodable payload, an unknown version, a failed validation.
    Permanent,
}

impl HandlerError {
    /// A failure that may go away on a later attempt.
    pub fn transient(error: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> Self {
        Self { class: ErrorClass::Transient, source: error.into() }
    }

    /// A failure that no retry can fix; the event is dead-lettered at once.
    pub fn permanent(error: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> Self {
        Self { class: ErrorClass::Permanent, source: error.into() }
    }

    /// The class of this error.
    pub fn class(&self) -> ErrorClass {
        self.class
    }

    /// True for errors that are dead-lettered without retrying.
    pub fn is_permanent(&self) -> bool {
        self.class == ErrorClass::Permanent
    }

    /// The underlying error.
    pub fn source(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.source
    }
}

// `HandlerError` deliberately does not implement `std::error::Error`: that keeps this blanket
// conversion coherent, so `?` works on any error inside a handler (the anyhow pattern).
impl<E> From<E> for HandlerError
where
    E: std::error::Error + Send + Sync + 'static,
{
    fn from(error: E) -> Self {
        Self::transient(error)
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let class = match self.class {
            ErrorClass::Transient => "transient",
            ErrorClass::Permanent => "permanent",
        };
        write!(f, "{class} error: {}", self.source)
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError").field("class", &self.class).field("source", &self.source).finish()
    }
}

/// A payload that could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The payload is not valid for the event type it claims to be.
    #[error("cannot decode `{ty}` from its payload: {source}")]
    Decode {
        /// The CloudEvents `type` of the envelope.
        ty: String,
        /// What the decoder said.
        #[source]
        source: serde_json::Error,
    },
    /// The event could not be serialized.
    #[error("cannot encode `{ty}`: {source}")]
    Encode {
        /// The CloudEvents `type` being encoded.
        ty: String,
        /// What the encoder said.
        #[source]
        source: serde_json::Error,
    },
    /// The envelope's `datacontenttype` is not one eda can decode.
    #[error("unsupported content type `{0}`: eda decodes `application/json` payloads")]
    UnsupportedContentType(String),
}

/// A transport failed to do what was asked of it.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The broker could not be reached or the connection was lost.
    #[error("cannot reach the {transport} broker: {reason}; check that it runs and that the URL is right")]
    Unreachable {
        /// Which transport (`nats`, `rabbitmq`, …).
        transport: &'static str,
        /// What went wrong, without secrets.
        reason: String,
    },
    /// The broker did not accept a published event.
    #[error("the {transport} broker did not accept an event for topic `{topic}`: {reason}")]
    PublishRejected {
        /// Which transport.
        transport: &'static str,
        /// The topic the event was published to.
        topic: String,
        /// What the broker said.
        reason: String,
    },
    /// The transport can never carry this event as it is (a header value it cannot hold, a
    /// size over its limit): trying again cannot help; the event must change.
    #[error("the {transport} transport cannot carry this event for topic `{topic}`: {reason}")]
    EventRefused {
        /// Which transport.
        transport: &'static str,
        /// The topic the event was published to.
        topic: String,
        /// What is wrong with it, and what to do.
        reason: String,
    },
    /// The transport's settings are wrong or contradict each other; nothing was sent.
    #[error("{transport} settings: {reason}")]
    Config {
        /// Which transport.
        transport: &'static str,
        /// What is wrong, and what to write instead.
        reason: String,
    },
    /// The transport has been closed; no further work is possible.
    #[error("the {0} transport is closed")]
    Closed(&'static str),
    /// A received message is not a valid eda envelope.
    #[error(transparent)]
    Malformed(#[from] EnvelopeError),
    /// Any other failure of the broker client.
    #[error("{transport}: {source}")]
    Other {
        /// Which transport.
        transport: &'static str,
        /// The client's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

/// A message whose CloudEvents attributes are missing or invalid.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum EnvelopeError {
    /// A required attribute is absent.
    #[error("the message has no `{0}` attribute; eda needs CloudEvents `id`, `source`, `type` and `specversion`")]
    Missing(&'static str),
    /// An attribute is present but cannot be parsed.
    #[error("the `{attribute}` attribute `{value}` is invalid: {reason}")]
    Invalid {
        /// Which attribute.
        attribute: &'static str,
        /// Its raw value.
        value: String,
        /// Why it is invalid.
        reason: String,
    },
}

/// An inbox or outbox store failed.
#[derive(Debug, thiserror::Error)]
#[error("{store} store: {source}")]
pub struct StoreError {
    /// Which store (`memory`, `sqlite`, `postgres`).
    pub store: &'static str,
    /// The underlying failure.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync + 'static>,
}
