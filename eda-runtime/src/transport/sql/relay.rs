//! The outbox relay: carries the events that handlings and application code wrote to the SQL
//! log (used as an outbox beside a broker) to another transport, in order per key.
//!
//! It is a consumer group of the log like any other, so what holds for consumers holds for it:
//! one batch of consecutive events per partition in flight (per-key order), partitions shared by
//! relay instances in any number of processes, and the position stored only after the target
//! accepted the batch. A relay that dies between the target's acknowledgement and storing its
//! position publishes those events again; consumers' idempotency guards absorb the repeats
//! (an event keeps its id).
//!
//! A target that is away or refuses for now (full, electing a leader, any error that may pass)
//! is waited for, with backoff, as long as it takes. An event the target can never carry as it
//! is (`EventRefused`: a header it cannot hold, a size over its limit) becomes a dead letter of
//! the relay's group in the outbox database (`dlq list` shows it), and the events after it go
//! on.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use eda_core::{Transport, TransportError};
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::consumer::Batch;
use super::SqlTransport;
use crate::retry::RetryPolicy;

/// Carries events from a SQL log to a target transport.
///
/// ```no_run
/// # async fn relay(outbox: eda::sql::SqlTransport, broker: std::sync::Arc<dyn eda::Transport>) {
/// let relay = eda::sql::Relay::new(outbox, broker).spawn();
/// // … until the service stops:
/// relay.stop().await;
/// # }
/// ```
pub struct Relay {
    source: SqlTransport,
    target: Arc<dyn Transport>,
    group: String,
    in_flight: usize,
    batch: usize,
    retry: RetryPolicy,
    relayed: Arc<AtomicU64>,
}

impl Relay {
    /// A relay from `source` to `target`.
    pub fn new(source: SqlTransport, target: Arc<dyn Transport>) -> Self {
        Self {
            source,
            target,
            group: "eda-relay".into(),
            in_flight: 16,
            batch: 100,
            retry: RetryPolicy { max_attempts: u32::MAX, ..RetryPolicy::default() },
            relayed: Arc::default(),
        }
    }

    /// The consumer group the relay reads the log as (`eda-relay` by default). Relays that
    /// share a name share the work; relays with different names each carry every event.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = group.into();
        self
    }

    /// How many partitions may have events on their way to the target at once (16 by default).
    pub fn in_flight(mut self, n: usize) -> Self {
        self.in_flight = n.max(1);
        self
    }

    /// How many consecutive events of one partition go to the target before the relay records
    /// its position (100 by default). A crash repeats at most this many per partition.
    pub fn batch(mut self, n: usize) -> Self {
        self.batch = n.max(1);
        self
    }

    /// Runs the relay in the background.
    pub fn spawn(self) -> RelayHandle {
        let (stop, stopped) = watch::channel(false);
        let relayed = self.relayed.clone();
        let task = tokio::spawn(self.run(stopped));
        RelayHandle { stop, task, relayed }
    }

    /// Relays until `stop` turns true: every topic of the log, including topics that appear
    /// while it runs.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let this = Arc::new(self);
        let mut started = HashSet::new();
        let mut forwarders = JoinSet::new();
        loop {
            match this.source.topics().await {
                Ok(topics) => {
                    for topic in topics {
                        if started.insert(topic.clone()) {
                            forwarders.spawn(this.clone().forward(topic, stop.clone()));
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "the relay cannot list the outbox's topics; trying again"),
            }
            if stopped_within(&mut stop, Duration::from_millis(500)).await {
                break;
            }
        }
        while forwarders.join_next().await.is_some() {}
    }

    async fn forward(self: Arc<Self>, topic: String, mut stop: watch::Receiver<bool>) {
        let batches = loop {
            match self.source.batches(&self.group, &topic, self.batch).await {
                Ok(b) => break b,
                Err(e) => {
                    tracing::warn!(%topic, error = %e, "the relay cannot read the outbox; trying again");
                    if stopped_within(&mut stop, Duration::from_secs(1)).await {
                        return;
                    }
                }
            }
        };
        let stopped = {
            let mut stop = stop.clone();
            async move {
                let _ = stop.wait_for(|s| *s).await;
            }
        };
        // Partitions move concurrently, each one batch at a time: per-key order holds.
        batches
            .take_until(stopped)
            .for_each_concurrent(self.in_flight, |item| {
                let this = self.clone();
                let stop = stop.clone();
                async move {
                    match item {
                        Ok(batch) => {
                            if this.carry(&batch, stop).await.is_ok() {
                                let n = batch.envelopes.len() as u64;
                                if let Err(e) = batch.ack().await {
                                    // Published but not recorded: it goes again; guards absorb it.
                                    tracing::warn!(error = %e, "the relay could not record relayed events");
                                } else {
                                    this.relayed.fetch_add(n, Ordering::Relaxed);
                                }
                            }
                            // Not published (stopping): dropping the batch leaves it for later.
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "the relay cannot read the outbox; trying again");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
            })
            .await;
    }

    /// Publishes a batch to the target, in order, retrying with backoff until it is accepted
    /// or the relay stops. When the target can never carry an event as it is
    /// ([`TransportError::EventRefused`]), the batch goes one event at a time and each refused
    /// event becomes a dead letter of the relay's group: a poison event never holds its
    /// partition's outbox back.
    async fn carry(&self, batch: &Batch, mut stop: watch::Receiver<bool>) -> Result<(), TransportError> {
        let mut attempt = 1;
        loop {
            let e = match self.target.publish_all(&batch.envelopes).await {
                Ok(()) => return Ok(()),
                Err(e @ TransportError::EventRefused { .. }) => {
                    tracing::debug!(error = %e, "the relay's target refused an event of a batch; sending them one by one");
                    return self.carry_one_by_one(batch, stop).await;
                }
                Err(e) => e,
            };
            attempt += 1;
            let wait = self.retry.backoff(attempt);
            tracing::warn!(events = batch.envelopes.len(), error = %e, ?wait, "the relay's target is not accepting events; retrying");
            if stopped_within(&mut stop, wait).await {
                return Err(e);
            }
        }
    }

    async fn carry_one_by_one(&self, batch: &Batch, mut stop: watch::Receiver<bool>) -> Result<(), TransportError> {
        for (index, envelope) in batch.envelopes.iter().enumerate() {
            let mut attempt = 1;
            loop {
                let e = match self.target.publish(envelope).await {
                    Ok(()) => break,
                    Err(e @ TransportError::EventRefused { .. }) => {
                        tracing::error!(
                            event_id = %envelope.id, r#type = %envelope.ty, topic = %envelope.topic, error = %e,
                            "the relay's target refused an event; kept as a dead letter of the relay (`dlq list`)"
                        );
                        match batch.dead_letter(index, e.to_string()).await {
                            Ok(()) => break,
                            // Kept nowhere yet: not passed either. Try again after a pause.
                            Err(e) => e,
                        }
                    }
                    Err(e) => e,
                };
                attempt += 1;
                let wait = self.retry.backoff(attempt);
                tracing::warn!(event_id = %envelope.id, error = %e, ?wait, "the relay's target is not accepting events; retrying");
                if stopped_within(&mut stop, wait).await {
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}

/// Waits up to `wait` for the relay to be told to stop; true when it was, or when its handle
/// is gone (dropped without [`RelayHandle::stop`]: nothing can stop it any more, so it stops).
async fn stopped_within(stop: &mut watch::Receiver<bool>, wait: Duration) -> bool {
    matches!(tokio::time::timeout(wait, stop.wait_for(|s| *s)).await, Ok(Ok(_)) | Ok(Err(_)))
}

/// A relay running in the background. Dropping it stops the relay as
/// [`stop`](Self::stop) does, without waiting for it.
pub struct RelayHandle {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    relayed: Arc<AtomicU64>,
}

impl RelayHandle {
    /// How many events it has relayed so far.
    pub fn relayed(&self) -> u64 {
        self.relayed.load(Ordering::Relaxed)
    }

    /// The count behind [`relayed`](Self::relayed), for metrics.
    pub(crate) fn relayed_count(&self) -> Arc<AtomicU64> {
        self.relayed.clone()
    }

    /// Stops it: events on their way finish, the rest stay in the outbox.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.task.await {
            tracing::warn!(error = %e, "the relay task ended abnormally");
        }
    }
}
