//! Transports, one module per broker, each behind its cargo feature.

mod memory;
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub mod sqlite;

use std::sync::Arc;

pub use memory::MemoryTransport;

use crate::{Error, Result};

/// Connects the transport a URL names: `memory://` (always available), `sqlite://path`
/// (feature `sqlite`, on by default).
///
/// A URL whose transport is not in this build fails with an error that says so.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let transport = eda::transport::connect("memory://").await.expect("always available");
/// assert_eq!(transport.kind(), "memory");
/// let err = eda::transport::connect("carrier-pigeon://coop").await.err().expect("unknown");
/// assert!(err.to_string().contains("carrier-pigeon"));
/// # }
/// ```
pub async fn connect(url: &str) -> Result<Arc<dyn eda_core::Transport>> {
    let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or_default();
    let missing = |name: &str| {
        Error::Config(format!(
            "`{scheme}://` URLs need the {name} transport, which this version of eda does not have yet; use `memory://` or `sqlite://`"
        ))
    };
    match scheme {
        "memory" => Ok(Arc::new(MemoryTransport::new())),
        #[cfg(feature = "sqlite")]
        "sqlite" => Ok(Arc::new(sqlite::SqliteTransport::connect(url).await?)),
        #[cfg(not(feature = "sqlite"))]
        "sqlite" => Err(Error::Config(format!(
            "`{url}` needs the SQLite transport: enable the cargo feature `sqlite` of eda-runtime (on by default)"
        ))),
        "postgres" | "postgresql" => Err(missing("PostgreSQL")),
        "kafka" => Err(missing("Kafka")),
        "amqp" | "amqps" => Err(missing("RabbitMQ")),
        "nats" | "tls" => Err(missing("NATS JetStream")),
        "" => {
            Err(Error::Config(format!("`{url}` is not a transport URL: write it as `<scheme>://…`, e.g. `memory://`")))
        }
        other => Err(Error::Config(format!(
            "unknown transport scheme `{other}://` in `{url}`: eda knows `memory://` and `sqlite://`"
        ))),
    }
}
