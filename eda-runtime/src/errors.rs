//! The runtime's error type.

use std::time::Duration;

use eda_core::{CodecError, Report, StoreError, TransportError};

/// What can go wrong when starting, running or talking to the runtime.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The choreography does not hold together; the report says what to fix.
    #[error("the handler registry is not valid:\n{0}")]
    InvalidRegistry(Report),
    /// The runtime was configured in a way that cannot work; the message says what to change.
    #[error("{0}")]
    Config(String),
    /// The transport failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The inbox or outbox store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An event could not be encoded.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// [`Runtime::settled`](crate::Runtime::settled) gave up waiting.
    #[error("events were still being handled after {waited:?}: {detail}")]
    NotSettled {
        /// How long it waited.
        waited: Duration,
        /// What was still pending.
        detail: String,
    },
    /// Installing a signal handler failed.
    #[error("cannot listen for shutdown signals: {0}")]
    Signal(#[source] std::io::Error),
}

/// `Result` with the runtime's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
