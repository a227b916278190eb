//! eda: choreographed, event-driven services in Rust.
//!
//! Services publish events and react to events; they never call each other. Annotate domain
//! code with [`event`](macro@event), [`handler`](macro@handler) and [`compensates`](macro@compensates); [`Runtime::from_registry`] collects
//! every handler linked into the binary, checks the choreography, and runs each consumer group
//! on the transport a URL names, with idempotency guards, per-key ordering, retries with
//! backoff and dead letters.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> eda::Result<()> {
//! use eda::{event, handler, Outcome, Runtime};
//! use serde::{Deserialize, Serialize};
//!
//! #[event(topic = "orders", key = order_id)]
//! #[derive(Serialize, Deserialize)]
//! struct OrderPlaced { order_id: u32, total: u32 }
//!
//! #[event(topic = "payments", key = order_id)]
//! #[derive(Serialize, Deserialize)]
//! struct Charged { order_id: u32 }
//!
//! #[event(topic = "payments", key = order_id)]
//! #[derive(Serialize, Deserialize)]
//! struct Declined { order_id: u32 }
//!
//! #[handler(group = "billing")]
//! async fn charge(ev: OrderPlaced) -> Outcome<Charged, Declined> {
//!     if ev.total < 100 { Outcome::Success(Charged { order_id: ev.order_id }) }
//!     else { Outcome::Failure(Declined { order_id: ev.order_id }) }
//! }
//!
//! let runtime = Runtime::builder(eda::Registry::builder().handler::<charge>().build())
//!     .transport_url("memory://")
//!     .start()
//!     .await?;
//! let placed = runtime.publisher().publish(&OrderPlaced { order_id: 1, total: 20 }).await?;
//! runtime.settled(std::time::Duration::from_secs(5)).await?;
//! let trace = runtime.trace(&placed.correlation_id);
//! assert!(trace.iter().any(|e| e.ty == "Charged.v1"));
//! runtime.shutdown().await;
//! # Ok(()) }
//! ```

// Generated code names `::eda::…`; this lets it do so inside this crate's own doc tests.
extern crate self as eda;

pub mod cli;
mod consumer;
mod dead_letters;
#[cfg(any(feature = "nats", feature = "rabbitmq", test))]
mod engine;
mod errors;
mod inbox;
mod journal;
mod metrics;
#[cfg(feature = "otel")]
#[cfg_attr(docsrs, doc(cfg(feature = "otel")))]
pub mod otel;
mod retry;
mod runtime;
pub mod transport;

pub use consumer::StatsSnapshot;
pub use dead_letters::Replay;
pub use eda_core::*;
pub use errors::{Error, Result};
pub use inbox::MemoryInbox;
pub use journal::{EntryKind, JournalEntry};
pub use retry::RetryPolicy;
pub use runtime::{Publisher, Runtime, RuntimeBuilder};

/// The SQL log transport (SQLite, PostgreSQL) and the transaction its handlers run in.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "sqlite", feature = "postgres"))))]
pub use transport::sql;

/// The maps on the path of every event (guards, key lanes, cursors): foldhash is several times
/// faster than the standard SipHash on short keys, and still seeded per map against
/// collision floods from keys that come from outside.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
