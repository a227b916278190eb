//! The delivery engine of the partitioned brokers: NATS JetStream, RabbitMQ and Kafka.
//!
//! A broker adapter supplies only what its broker knows — read a partition from its settled
//! point, settle up to a message, dead-letter a message, keep leases — and the engine decides
//! *when* a delivery runs and *when* it is settled:
//!
//! - [`ownership`] (where the broker does not keep it; [`held`] where it hands each partition to
//!   one consumer; [`assigned`] where its group protocol assigns them): a group's partitions are shared out among its live instances by leases with
//!   a TTL, renewed by heartbeat and taken by compare-and-set; an instance consumes only the
//!   partitions it holds, so per-key order needs no help from the broker. A lease's revision is
//!   its fencing number: a holder that cannot renew stops settling before anyone may take it.
//! - `window`: a wide window of each owned partition in flight at once, with per-key lanes
//!   (one event of a key out at a time, also across retries; other keys run on);
//! - [`partition`]: the run of an owned partition over its window, and settlement of the
//!   contiguous done prefix in batches — never past an event still in flight.
//!
//! The runtime's consumer (guards, sagas, retries, dead letters) sits on top unchanged: it gets
//! a [`Deliveries`] stream like from any transport.

#[cfg_attr(not(feature = "kafka"), allow(dead_code))]
pub(crate) mod assigned;
mod engines;
pub(crate) mod held;
pub(crate) mod ownership;
pub(crate) mod partition;
mod window;

use std::time::Duration;

use async_trait::async_trait;
use eda_core::{DeadLetterReason, Envelope, TransportError};
use futures_core::Stream;

pub(crate) use engines::Engines;
pub(crate) use ownership::{subscribe, EngineTask, LeaseStore, LeaseUpdate};

/// How the engine runs a group's partitions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct EngineOptions {
    /// Events of one partition in flight (fetched and not yet settled) at most.
    pub window: usize,
    /// How long a lease holds without renewal.
    pub lease_ttl: Duration,
    /// How often leases are renewed and the group's members looked at.
    pub heartbeat: Duration,
    /// How long a partition given up (rebalance, shutdown) waits for its events in flight.
    pub handover_timeout: Duration,
    /// Deliveries of one event without settlement (its handlers crash the process) before it
    /// is dead-lettered without being handed out again.
    pub max_deliver: u32,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            window: 1024,
            lease_ttl: Duration::from_secs(10),
            heartbeat: Duration::from_secs(2),
            // As long as a handler may sensibly run (Kafka's max.poll.interval.ms is 5 min):
            // given back earlier, the partition's next owner would handle an event that still
            // runs here, at the same time.
            handover_timeout: Duration::from_secs(300),
            max_deliver: 20,
        }
    }
}

impl EngineOptions {
    /// Checks the settings against each other; `Err` says what to change.
    pub(crate) fn check(&self) -> Result<(), String> {
        if !(1..=65_536).contains(&self.window) {
            return Err(format!("window {} is out of range: use 1 to 65536 events", self.window));
        }
        if self.heartbeat.is_zero() || self.heartbeat * 3 > self.lease_ttl {
            return Err(format!(
                "heartbeat {:?} must be at most a third of lease_ttl {:?}, so that a lease is renewed twice before it lapses",
                self.heartbeat, self.lease_ttl
            ));
        }
        if self.max_deliver == 0 {
            return Err("max_deliver 0 would dead-letter every event: use 1 or more".into());
        }
        Ok(())
    }
}

/// One message read from a partition.
pub(crate) struct Fetched<M> {
    /// Its position in the partition; increasing, not necessarily contiguous.
    pub offset: u64,
    /// The event, or why the message is not one (it is dead-lettered as it came).
    pub event: Result<Envelope, String>,
    /// What the adapter needs to settle or dead-letter it.
    pub message: M,
    /// Deliveries of it the broker counted before this one (0 where it does not count them):
    /// a first message that earlier consumers died holding goes out alone, and is
    /// dead-lettered once it passes `max_deliver`.
    pub delivered: u32,
}

/// Where the leases last saw a partition settled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Resume {
    pub floor: u64,
    /// Which incarnation of the partition's log that floor is in (0: unknown): a log made anew
    /// numbers its offsets from the start again.
    pub origin: u64,
}

/// A partition opened for reading.
pub(crate) struct Opened<M> {
    /// Every offset up to this one is settled; reading starts after it.
    pub floor: u64,
    /// The incarnation of the log (see [`Resume::origin`]).
    pub origin: u64,
    /// Whether events wait after `floor`: the new owner is busy from the start.
    pub backlog: bool,
    /// The messages after `floor`, in offset order. An error ends the reading: the engine opens
    /// the partition again from its settled point.
    pub messages: std::pin::Pin<Box<dyn Stream<Item = Result<Fetched<M>, TransportError>> + Send>>,
}

/// What a broker supplies for one group on one topic.
#[async_trait]
pub(crate) trait PartitionLog: Send + Sync + 'static {
    /// A message as the adapter holds it.
    type Message: Send + Sync + 'static;

    /// How many partitions the topic has.
    fn partitions(&self) -> u32;

    /// Opens `partition` for reading from just after its settled point, with at most `window`
    /// messages delivered and not settled. Whatever an earlier reader left unsettled comes
    /// again, in order. `known` is the settled point the leases last recorded, for a broker
    /// that lost its own; `generation` grows with every opening of the partition by any
    /// instance (the lease's revision), for brokers that keep a reader per opening.
    async fn open(
        &self,
        partition: u32,
        window: usize,
        known: Resume,
        generation: u64,
    ) -> Result<Opened<Self::Message>, TransportError>;

    /// Settles every message of its partition up to and including `message`; with `confirm`,
    /// waits until the broker has it.
    async fn settle(&self, message: &Self::Message, confirm: bool) -> Result<(), TransportError>;

    /// Keeps `message` as a dead letter of the group (it is settled with the prefix later).
    async fn dead_letter(
        &self,
        message: &Self::Message,
        reason: &DeadLetterReason,
        attempts: u32,
    ) -> Result<(), TransportError>;
}
