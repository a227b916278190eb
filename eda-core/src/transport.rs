//! The contract between the runtime and a broker.
//!
//! It is shaped by all the brokers eda targets at once: Kafka's partitioned offsets (an ack
//! marks an offset, committed as the contiguous processed prefix), RabbitMQ's and NATS
//! JetStream's per-message acks with redelivery counts, and the SQL log's stored offsets.
//! A subscription is a [`futures_core::Stream`] of [`Delivery`]s, so back-pressure
//! comes from polling it only when there is room; acknowledging or failing a delivery consumes
//! it, so a delivery cannot be acknowledged twice.

use std::any::Any;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_core::Stream;

use crate::envelope::{CorrelationId, Envelope};
use crate::error::{StoreError, TransportError};
use crate::store::{Claim, GuardKey, StepState};

/// A broker, or anything that behaves as one.
#[async_trait::async_trait]
pub trait Transport: Send + Sync + 'static {
    /// A short name: `memory`, `sqlite`, `nats`, …
    fn kind(&self) -> &'static str;

    /// Publishes one event; returns once the broker has durably accepted it.
    async fn publish(&self, envelope: &Envelope) -> Result<(), TransportError>;

    /// Publishes several events, in order; returns once all are accepted.
    async fn publish_all(&self, envelopes: &[Envelope]) -> Result<(), TransportError> {
        for e in envelopes {
            self.publish(e).await?;
        }
        Ok(())
    }

    /// Joins consumer group `group` on `topic`. Every group receives every event of the topic;
    /// subscriptions of the same group share them.
    async fn subscribe(&self, subscription: &Subscription) -> Result<Deliveries, TransportError>;

    /// Makes sure `subscription`'s group gets the topic's events from now on, without consuming
    /// them: for a broker that keeps events only for groups it knows of (RabbitMQ: the group's
    /// queues). The runtime calls it for the groups linked into a binary that it does not run.
    /// Nothing to do where the log keeps every event for every group (the default).
    async fn prepare(&self, subscription: &Subscription) -> Result<(), TransportError> {
        let _ = subscription;
        Ok(())
    }

    /// True when a subscription hands out at most one event of a key at a time, and an event
    /// handed back comes again before its key's later ones: then the runtime does not sequence
    /// keys itself. Transports whose deliveries may overtake each other keep the default.
    fn sequences_keys(&self) -> bool {
        false
    }

    /// Which partitions this process consumes, per subscription, where the transport shares
    /// partitions out among a group's instances itself (empty elsewhere).
    fn ownership(&self) -> Vec<Ownership> {
        Vec::new()
    }

    /// How far `group` is behind on `topic`, per partition.
    async fn lag(&self, group: &str, topic: &str) -> Result<Vec<PartitionLag>, TransportError>;

    /// Forgets a consumer group that no handler consumes any more: its positions, leases and
    /// attempt counts, and its guard and saga records (its dead letters stay, for `dlq`). Until
    /// then a retired group's position keeps the log it has not read from retention. Refused
    /// while an instance of the group is live. Returns how many records went.
    async fn retire_group(&self, group: &str) -> Result<u64, TransportError> {
        Err(TransportError::Config {
            transport: self.kind(),
            reason: format!(
                "retiring group `{group}` is not something this transport does; its broker's own tools remove a group"
            ),
        })
    }

    /// Flushes and closes the connection. Deliveries not yet acknowledged are redelivered later.
    async fn close(&self) -> Result<(), TransportError> {
        Ok(())
    }

    /// What this transport recorded of each saga, when it keeps a record (a SQL log does).
    fn saga_view(&self) -> Option<&dyn SagaView> {
        None
    }

    /// Where this transport keeps dead letters, when it keeps them itself.
    fn dead_letter_store(&self) -> Option<&dyn DeadLetterStore> {
        None
    }

    /// The transport's own store, when its log is a database: replayed dead letters are handled
    /// in its transactions.
    fn store(self: Arc<Self>) -> Option<Arc<dyn Store>> {
        None
    }

    /// The inbox the runtimes on this transport share, where it keeps one: saga step records
    /// there reach every instance of a group (and survive a restart where the broker keeps
    /// them), so a compensator on another instance finds the step it undoes. `None` where
    /// handlings go through the transport's own [`store`](Self::store), or where it keeps
    /// none: a runtime with compensators then needs an inbox every instance shares.
    fn inbox(&self) -> Option<Arc<dyn crate::Inbox>> {
        None
    }
}

/// What a consumer asks of [`Transport::subscribe`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscription {
    /// The consumer group.
    pub group: String,
    /// The topic.
    pub topic: String,
    /// How many unacknowledged deliveries the broker may push ahead to this subscriber.
    pub prefetch: usize,
}

/// The deliveries of one subscription.
pub type Deliveries = Pin<Box<dyn Stream<Item = Result<Delivery, TransportError>> + Send>>;

/// One delivery of one event to one consumer group.
pub struct Delivery {
    /// The event (shared: handlers and the transport read the same copy).
    pub envelope: Arc<Envelope>,
    /// Which delivery of this event to this group this is, 1 for the first. Survives restarts
    /// where the broker keeps a delivery count.
    pub attempt: u32,
    /// The partition it came from (0 where the broker has none).
    pub partition: u32,
    /// How many handler attempts on this event already failed in this group (recorded through
    /// [`attempt_failed`](Self::attempt_failed)): what the retry limit counts. Hand-backs — a
    /// busy guard, a store away, a shutdown, a compensation waiting for its step — are
    /// deliveries, not failures, and do not count.
    pub failures: u32,
    acker: Box<dyn Acker>,
}

impl Delivery {
    /// A delivery that `acker` settles, with no failed attempts behind it.
    pub fn new(envelope: impl Into<Arc<Envelope>>, attempt: u32, partition: u32, acker: Box<dyn Acker>) -> Self {
        Self { envelope: envelope.into(), attempt, partition, failures: 0, acker }
    }

    /// The same delivery, with `failures` failed attempts behind it.
    pub fn with_failures(mut self, failures: u32) -> Self {
        self.failures = failures;
        self
    }

    /// Done: the broker may forget this event for this group.
    pub async fn ack(self) -> Result<(), TransportError> {
        self.acker.ack().await
    }

    /// Not done: deliver it again after `delay`, to this group, before later events of its key.
    pub async fn nack(self, delay: Duration) -> Result<(), TransportError> {
        self.acker.nack(delay).await
    }

    /// Records a failed attempt, so that the event comes back with it in
    /// [`failures`](Self::failures) — after a crash too, where the transport keeps counts
    /// durably — and is dead-lettered in time instead of retried from one.
    pub async fn attempt_failed(&self) -> Result<(), TransportError> {
        self.acker.attempt_failed().await
    }

    /// Starts handling this delivery in one transaction of the transport's own store, when it
    /// has one (the SQL log): the guard record, the handler's writes, the events it emits and,
    /// with [`UnitOfWork::commit`]`(ack = true)`, the acknowledgement then commit together.
    /// `None` for brokers: the runtime then guards with its [`Inbox`](crate::Inbox).
    pub async fn begin(&self) -> Result<Option<Box<dyn UnitOfWork>>, TransportError> {
        self.acker.begin().await
    }

    /// Give up on it: keep it, with why, as a dead letter of this group; later events go on.
    pub async fn dead_letter(self, reason: DeadLetterReason) -> Result<(), TransportError> {
        let Delivery { envelope, attempt, acker, .. } = self;
        let envelope = Arc::unwrap_or_clone(envelope);
        acker.dead_letter(DeadLetter { envelope, attempts: attempt, reason, at: SystemTime::now() }).await
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("id", &self.envelope.id)
            .field("type", &self.envelope.ty)
            .field("attempt", &self.attempt)
            .field("failures", &self.failures)
            .field("partition", &self.partition)
            .finish()
    }
}

/// Settles one delivery on its broker. Dropping an acker unsettled must make the event
/// deliverable again (a consumer that dies loses nothing).
#[async_trait::async_trait]
pub trait Acker: Send + Sync {
    /// See [`Delivery::ack`].
    async fn ack(self: Box<Self>) -> Result<(), TransportError>;
    /// See [`Delivery::nack`].
    async fn nack(self: Box<Self>, delay: Duration) -> Result<(), TransportError>;
    /// See [`Delivery::dead_letter`].
    async fn dead_letter(self: Box<Self>, letter: DeadLetter) -> Result<(), TransportError>;
    /// See [`Delivery::begin`]; transports without a transactional store keep the default.
    async fn begin(&self) -> Result<Option<Box<dyn UnitOfWork>>, TransportError> {
        Ok(None)
    }
    /// See [`Delivery::attempt_failed`]. The default keeps no count: the event's
    /// [`failures`](Delivery::failures) then stay 0 and each delivery retries from its first
    /// attempt.
    async fn attempt_failed(&self) -> Result<(), TransportError> {
        Ok(())
    }
}

/// One attempt at handling one delivery by one handler against the transport's own store.
///
/// Reads (the guard, saga records) happen first, outside any write lock; the handler runs, and
/// may open the store's transaction for its own writes; [`commit`](UnitOfWork::commit) then
/// checks the guard and the saga record again inside that transaction and writes the guard
/// record, the emitted events, the step record and (with `ack`) the acknowledgement, so a
/// handling either happens whole or not at all. Dropping it rolls everything back.
#[async_trait::async_trait]
pub trait UnitOfWork: Send {
    /// Reads the handler's idempotency guard; [`commit`](UnitOfWork::commit) checks it again.
    async fn claim(&mut self, key: &GuardKey) -> Result<Claim, StoreError>;
    /// See [`Inbox::step_started`](crate::Inbox::step_started); checked again at commit.
    async fn step_started(&mut self, group: &str, step: &str, correlation: &CorrelationId) -> Result<bool, StoreError>;
    /// Records, at commit, whether the step's effects happened.
    fn step_finished(&mut self, group: &str, step: &str, correlation: &CorrelationId, succeeded: bool);
    /// See [`Inbox::compensation_started`](crate::Inbox::compensation_started).
    async fn compensation_started(
        &mut self,
        group: &str,
        step: &str,
        correlation: &CorrelationId,
    ) -> Result<StepState, StoreError>;
    /// Lends the handler what opens the store's transaction (see
    /// [`Ctx::transaction`](crate::Ctx::transaction)).
    fn lend_transaction(&mut self) -> Option<Box<dyn Any + Send>>;
    /// Takes it back after the handler ran.
    fn return_transaction(&mut self, transaction: Box<dyn Any + Send>);
    /// Events to publish at commit.
    fn publish(&mut self, envelopes: Vec<Envelope>);
    /// Commits the handling, or finds that it must not happen after all.
    async fn commit(self: Box<Self>, ack: bool) -> Result<Commit, TransportError>;
}

/// A database beside a broker: each handling keeps its guard record, its writes and the events
/// it emits (an outbox) there, in one transaction, and a relay carries the outbox to the broker.
/// Transports whose log is itself a database do this without one (see [`Delivery::begin`]).
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Starts one attempt of one handling. `commit(ack)` ignores `ack`: the delivery is
    /// acknowledged to its broker after the commit.
    async fn begin(&self) -> Result<Box<dyn UnitOfWork>, StoreError>;
}

/// What [`UnitOfWork::commit`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Commit {
    /// Everything was written.
    Done,
    /// Another handling of the same event committed first: nothing was written.
    Duplicate,
    /// The step was compensated while it ran: nothing was written.
    Cancelled,
}

/// Why an event was dead-lettered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetterReason {
    /// The handler that gave up, if one did.
    pub handler: Option<String>,
    /// The error, as text.
    pub error: String,
    /// True when it was dead-lettered without retries.
    pub permanent: bool,
}

/// A dead-lettered event: the original envelope and why it was given up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    /// The event, as delivered.
    pub envelope: Envelope,
    /// How many deliveries it had.
    pub attempts: u32,
    /// Why.
    pub reason: DeadLetterReason,
    /// When.
    pub at: SystemTime,
}

/// One event of a saga as a store recorded it, with the handlings recorded for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SagaEvent {
    /// The event.
    pub envelope: Envelope,
    /// How many times it was published with the same id (producer retries, relay repeats).
    pub publications: u32,
    /// The handlings that completed, in the order they did.
    pub handled_by: Vec<SagaHandling>,
}

/// One completed handling of a saga's event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SagaHandling {
    /// The consumer group.
    pub group: String,
    /// The handler.
    pub handler: String,
    /// When its guard record was written.
    pub at: SystemTime,
}

/// Reads back what a transport recorded of one business transaction: its events, in publish
/// order, and the handlings their guard records show.
#[async_trait::async_trait]
pub trait SagaView: Send + Sync {
    /// The saga of `correlation`.
    async fn saga(&self, correlation: &CorrelationId) -> Result<Vec<SagaEvent>, TransportError>;
}

/// A dead letter as a store keeps it: with an id to inspect, replay or purge it by, and the
/// consumer group whose handler gave up on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredDeadLetter {
    /// The id within its store.
    pub id: u64,
    /// The consumer group it was dead-lettered by; a replay goes to this group only.
    pub group: String,
    /// The letter.
    pub letter: DeadLetter,
}

/// One page of a dead-letter listing: the letters with ids above `after`, oldest first, at most
/// `limit` of them. The next page starts after the last id of this one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Page {
    /// Letters with ids above this one (0 for the first page).
    pub after: u64,
    /// At most this many.
    pub limit: usize,
}

impl Default for Page {
    /// The first 100.
    fn default() -> Self {
        Self { after: 0, limit: 100 }
    }
}

/// Where a transport keeps dead letters, for the tools that list, inspect, replay and purge
/// them.
#[async_trait::async_trait]
pub trait DeadLetterStore: Send + Sync {
    /// One page of the dead letters of `group` (or of every group), oldest first. A letter
    /// whose stored event cannot be read is listed all the same, with what could be read.
    async fn dead_letter_page(&self, group: Option<&str>, page: Page) -> Result<Vec<StoredDeadLetter>, TransportError>;
    /// Every dead letter of `group` (or of every group), oldest first, read a page at a time.
    async fn dead_letters(&self, group: Option<&str>) -> Result<Vec<StoredDeadLetter>, TransportError> {
        let mut all = Vec::new();
        let mut page = Page { after: 0, limit: 1000 };
        loop {
            let letters = self.dead_letter_page(group, page).await?;
            let full = letters.len() >= page.limit;
            page.after = letters.last().map_or(page.after, |l| l.id);
            all.extend(letters);
            if !full {
                return Ok(all);
            }
        }
    }
    /// One dead letter.
    async fn dead_letter(&self, id: u64) -> Result<Option<StoredDeadLetter>, TransportError>;
    /// Removes a dead letter; false when there was none with that id.
    async fn remove_dead_letter(&self, id: u64) -> Result<bool, TransportError>;
}

/// What one subscription of this process holds of its group's partitions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ownership {
    /// The consumer group.
    pub group: String,
    /// The topic.
    pub topic: String,
    /// Partitions this process consumes now.
    pub owned: u32,
    /// Partitions it handed over to another instance since it started (rebalances, shutdown).
    pub handed_over: u64,
    /// Partitions it took over from an instance whose lease lapsed (a crash, a hang).
    pub taken_over: u64,
}

/// How far a group is behind on one partition of a topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartitionLag {
    /// The partition (0 where the broker has none).
    pub partition: u32,
    /// Events published and not yet acknowledged by the group.
    pub lag: u64,
}
