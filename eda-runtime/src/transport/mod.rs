//! Transports, one module per broker, each behind its cargo feature.

#[cfg(feature = "kafka")]
#[cfg_attr(docsrs, doc(cfg(feature = "kafka")))]
pub mod kafka;
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "nats", feature = "rabbitmq", feature = "kafka"))]
mod keys;
#[cfg(any(feature = "nats", feature = "rabbitmq", feature = "kafka"))]
mod letters;
mod memory;
#[cfg(feature = "nats")]
#[cfg_attr(docsrs, doc(cfg(feature = "nats")))]
pub mod nats;
#[cfg(feature = "rabbitmq")]
#[cfg_attr(docsrs, doc(cfg(feature = "rabbitmq")))]
pub mod rabbitmq;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "sqlite", feature = "postgres"))))]
pub mod sql;

use std::sync::Arc;

#[cfg(any(feature = "sqlite", feature = "postgres", feature = "nats", feature = "rabbitmq", feature = "kafka"))]
pub use keys::partition_of;
pub use memory::MemoryTransport;

use crate::{Error, Result};

/// Connects the transport a URL names: `memory://` (always available), `sqlite://path`
/// (feature `sqlite`, on by default), `postgres://user@host/database` (feature `postgres`),
/// `nats://host:4222` or `tls://host:4222` (feature `nats`; settings in the query, see
/// [`nats::NatsOptions::from_url`]), `amqp://user:password@host:5672/vhost` or `amqps://…`
/// (feature `rabbitmq`; settings in the query, see [`rabbitmq::RabbitOptions::from_url`]),
/// `kafka://host:9092,host2:9092` (feature `kafka`; settings in the query, see
/// [`kafka::KafkaOptions::from_url`]).
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
    #[allow(unused_variables)] // every feature may be on
    let not_built = |feature: &str| {
        Error::Config(format!(
            "`{scheme}://` needs the cargo feature `{feature}` of eda-runtime, which this build lacks"
        ))
    };
    match scheme {
        "memory" => Ok(Arc::new(memory_of(url)?)),
        #[cfg(feature = "sqlite")]
        "sqlite" => Ok(Arc::new(sql::SqlTransport::connect(url).await?)),
        #[cfg(not(feature = "sqlite"))]
        "sqlite" => Err(not_built("sqlite")),
        #[cfg(feature = "postgres")]
        "postgres" | "postgresql" => Ok(Arc::new(sql::SqlTransport::connect(url).await?)),
        #[cfg(not(feature = "postgres"))]
        "postgres" | "postgresql" => Err(not_built("postgres")),
        #[cfg(feature = "kafka")]
        "kafka" => Ok(Arc::new(kafka::KafkaTransport::connect(url).await?)),
        #[cfg(not(feature = "kafka"))]
        "kafka" => Err(not_built("kafka")),
        #[cfg(feature = "rabbitmq")]
        "amqp" | "amqps" => Ok(Arc::new(rabbitmq::RabbitTransport::connect(url).await?)),
        #[cfg(not(feature = "rabbitmq"))]
        "amqp" | "amqps" => Err(not_built("rabbitmq")),
        #[cfg(feature = "nats")]
        "nats" | "tls" => Ok(Arc::new(nats::NatsTransport::connect(url).await?)),
        #[cfg(not(feature = "nats"))]
        "nats" | "tls" => Err(not_built("nats")),
        // Not echoed: without a scheme nothing says which part might be a password.
        "" => Err(Error::Config(
            "the transport URL has no scheme: write it as `<scheme>://…`, e.g. `memory://` or `postgres://user@host/db`".into(),
        )),
        other => Err(Error::Config(format!(
            "unknown transport scheme `{other}://` in `{}`: eda knows `memory://`, `sqlite://`, `postgres://`, `nats://`, `amqp://` and `kafka://`",
            keys::redact(url)
        ))),
    }
}

/// `memory://`, or `memory://?capacity=N` for a bound of N events per topic.
fn memory_of(url: &str) -> Result<MemoryTransport> {
    let query = url.split_once('?').map_or("", |(_, q)| q);
    let mut capacity = MemoryTransport::DEFAULT_CAPACITY;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("capacity", n)) => {
                capacity = n.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                    Error::Config(format!("`memory://?capacity={n}`: the capacity is a number of events above 0"))
                })?
            }
            _ => {
                return Err(Error::Config(format!(
                    "`memory://` takes one setting, `capacity` (events per topic, {} by default), not `{pair}`",
                    MemoryTransport::DEFAULT_CAPACITY
                )))
            }
        }
    }
    Ok(MemoryTransport::with_capacity(capacity))
}
