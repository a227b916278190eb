//! The consumer of one (group, topic) subscription: intake with back-pressure, per-key lanes,
//! the idempotency guard, saga bookkeeping, retries and dead letters.
//!
//! Data flows one way: transport → intake → key lane → guard → handler → publish → settle.

use std::collections::{HashMap, HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eda_core::{
    Claim, Commit, DeadLetterReason, Deliveries, Delivery, Envelope, GuardKey, HandlerDescriptor, HandlerError,
    Handling, Idempotency, Inbox, States, StepState, Store, Subscription, Transport, TransportError, UnitOfWork,
};
use futures_util::{FutureExt, StreamExt};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::FastMap;

use crate::journal::{EntryKind, Journal};
use crate::retry::RetryPolicy;

/// How long a delivery waits at least before it is tried again when its guard or its saga step
/// is held by another handling.
const BUSY_DELAY: Duration = Duration::from_millis(50);

/// Settings of the consumers.
#[derive(Clone, Debug)]
pub(crate) struct ConsumerConfig {
    pub max_in_flight: usize,
    /// The largest payload published or handled, in bytes.
    pub max_payload: usize,
    pub retry: RetryPolicy,
    pub shutdown_timeout: Duration,
}

/// Counts of what the consumers did, since start.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    handled: AtomicU64,
    duplicates: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    unhandled: AtomicU64,
    skipped: AtomicU64,
}

/// A snapshot of what the consumers did since the runtime started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Successful handlings.
    pub handled: u64,
    /// Duplicate deliveries absorbed by idempotency guards.
    pub duplicates: u64,
    /// Failed attempts that were retried.
    pub retried: u64,
    /// Events dead-lettered.
    pub dead_lettered: u64,
    /// Events of types a group has no handler for (acknowledged).
    pub unhandled: u64,
    /// Handlings skipped by saga bookkeeping (compensation before its step).
    pub skipped: u64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            handled: get(&self.handled),
            duplicates: get(&self.duplicates),
            retried: get(&self.retried),
            dead_lettered: get(&self.dead_lettered),
            unhandled: get(&self.unhandled),
            skipped: get(&self.skipped),
        }
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// What every consumer of a runtime shares.
pub(crate) struct Shared {
    pub transport: Arc<dyn Transport>,
    pub inbox: Arc<dyn Inbox>,
    pub states: States,
    pub source: String,
    pub config: ConsumerConfig,
    pub journal: Journal,
    pub stats: Stats,
    pub metrics: crate::metrics::Metrics,
    /// Deliveries received and not yet settled.
    pub in_flight: AtomicUsize,
    /// Handlers that some compensator undoes: their runs are recorded per correlation id.
    pub steps: HashSet<(&'static str, &'static str)>,
    /// Per-handler concurrency limits (`#[handler(concurrency = N)]`).
    pub limits: HashMap<(&'static str, &'static str), Arc<Semaphore>>,
    /// The failure events of each saga step (the failure side of its `Outcome`).
    pub failures: HashMap<(&'static str, &'static str), Vec<&'static str>>,
    /// The database beside the broker, when handlings keep their records and outbox there.
    pub store: Option<Arc<dyn Store>>,
    pub stop: watch::Receiver<bool>,
    /// The transport sequences keys itself (`Transport::sequences_keys`): no lanes here.
    pub sequences_keys: bool,
    /// What every handler's handlings share: its name and metrics.
    pub handlers: HashMap<(&'static str, &'static str), Arc<HandlerInfo>>,
}

/// A handler's name and metrics, made once.
pub(crate) struct HandlerInfo {
    pub name: String,
    pub metrics: crate::metrics::HandlerMetrics,
}

impl HandlerInfo {
    pub(crate) fn new(h: &HandlerDescriptor, metrics: &crate::metrics::Metrics) -> Self {
        Self { name: h.qualified_name(), metrics: metrics.of_handler(h.group, h.name) }
    }
}

impl Shared {
    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }
}

/// What to do with a delivery once its handlers have run.
enum Disposition {
    Done,
    Redeliver(Duration),
    DeadLetter(DeadLetterReason, u32),
}

type Lanes = Arc<Mutex<FastMap<String, VecDeque<(Delivery, OwnedSemaphorePermit)>>>>;

/// Runs the consumer of `group` on `topic` until the runtime stops. How its first subscription
/// went is sent on `first`: a transport that refuses the subscription for its settings
/// ([`TransportError::Config`]) ends the consumer, and the runtime's start fails with it; any
/// other failure, and a refusal that comes after the start stopped waiting, is logged and
/// retried here, in the background.
pub(crate) async fn consume(
    shared: Arc<Shared>,
    group: &'static str,
    topic: &'static str,
    handlers: Arc<[&'static HandlerDescriptor]>,
    first: tokio::sync::oneshot::Sender<Option<TransportError>>,
) {
    let mut first = Some(first);
    let permits = Arc::new(Semaphore::new(shared.config.max_in_flight.max(1)));
    let lanes: Lanes = Arc::default();
    let mut tasks = JoinSet::new();
    let mut stop = shared.stop.clone();
    let mut stream: Option<Deliveries> = None;
    let mut failures = 0u32;
    let subscription =
        Subscription { group: group.to_owned(), topic: topic.to_owned(), prefetch: shared.config.max_in_flight };

    while !shared.stopping() {
        while tasks.try_join_next().is_some() {}
        let Some(deliveries) = stream.as_mut() else {
            match shared.transport.subscribe(&subscription).await {
                Ok(s) => {
                    stream = Some(s);
                    failures = 0;
                    if let Some(first) = first.take() {
                        let _ = first.send(None);
                    }
                }
                Err(mut e) => {
                    let config = matches!(e, TransportError::Config { .. });
                    if let Some(first) = first.take() {
                        if !config {
                            let _ = first.send(None);
                        } else {
                            // The start fails with it, unless it stopped waiting: then this
                            // consumer must not end unseen, and goes on trying.
                            match first.send(Some(e)) {
                                Ok(()) => return,
                                Err(back) => e = back.unwrap_or(TransportError::Closed("runtime")),
                            }
                        }
                    }
                    failures += 1;
                    let wait = shared.config.retry.backoff(failures.saturating_add(1)).max(Duration::from_millis(50));
                    if config {
                        tracing::error!(group, topic, error = %e, ?wait, "cannot subscribe until the configuration is fixed; trying again");
                    } else {
                        tracing::warn!(group, topic, error = %e, ?wait, "cannot subscribe; trying again");
                    }
                    let _ = tokio::time::timeout(wait, stop.wait_for(|s| *s)).await;
                }
            }
            continue;
        };
        // Under load a permit is free and a delivery waiting: take them without a select.
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => break,
                p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            },
        };
        let next = match deliveries.next().now_or_never() {
            Some(n) => n,
            None => tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => break,
                n = deliveries.next() => n,
            },
        };
        match next {
            Some(Ok(delivery)) => {
                if shared.stopping() {
                    // Taken as the stop came (a hand-back of a handler that saw it): dropped
                    // unhandled, it goes back to the transport.
                    drop(delivery);
                    break;
                }
                failures = 0;
                shared.in_flight.fetch_add(1, Ordering::SeqCst);
                dispatch(&shared, &handlers, &lanes, &mut tasks, delivery, permit);
            }
            Some(Err(e)) => {
                // The stream goes on after an error (a lost connection, a busy database): keep
                // it, and its leases and position, and try again after a pause.
                failures += 1;
                let wait = shared.config.retry.backoff(failures.saturating_add(1)).max(Duration::from_millis(50));
                tracing::warn!(group, topic, error = %e, ?wait, "the subscription failed; trying again");
                drop(permit);
                let _ = tokio::time::timeout(wait, stop.wait_for(|s| *s)).await;
                continue;
            }
            None => stream = None,
        }
    }
    // Intake stops first: what the broker has not handed over stays with the broker.
    drop(stream);
    let drained =
        tokio::time::timeout(shared.config.shutdown_timeout, async { while tasks.join_next().await.is_some() {} })
            .await;
    if drained.is_err() {
        tracing::warn!(group, topic, timeout = ?shared.config.shutdown_timeout,
            "handlers still running at the shutdown deadline were stopped; their events will be delivered again");
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
}

fn dispatch(
    shared: &Arc<Shared>,
    handlers: &Arc<[&'static HandlerDescriptor]>,
    lanes: &Lanes,
    tasks: &mut JoinSet<()>,
    delivery: Delivery,
    permit: OwnedSemaphorePermit,
) {
    let (shared, handlers) = (shared.clone(), handlers.clone());
    let key = delivery.envelope.subject.clone().filter(|_| !shared.sequences_keys);
    let Some(key) = key else {
        tasks.spawn(async move {
            handle_delivery(&shared, &handlers, delivery, None).await;
            drop(permit);
        });
        return;
    };
    {
        let mut l = lanes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(queue) = l.get_mut(&key) {
            // An earlier event of this key is being handled: wait behind it.
            queue.push_back((delivery, permit));
            return;
        }
        l.insert(key.clone(), VecDeque::new());
    }
    let lanes = lanes.clone();
    tasks.spawn(async move {
        let mut current = Some((delivery, permit));
        while let Some((delivery, permit)) = current.take() {
            let settled = handle_delivery(&shared, &handlers, delivery, None).await;
            drop(permit);
            let stopped_queue = {
                let mut l = lanes.lock().unwrap_or_else(|p| p.into_inner());
                let mut queue = l.remove(&key).unwrap_or_default();
                // Stopping, or the event went back to the broker: what waits behind it on its
                // key goes back too, so it cannot overtake it.
                if shared.stopping() || !settled {
                    Some(queue)
                } else {
                    current = queue.pop_front();
                    if current.is_some() {
                        l.insert(key.clone(), queue);
                    }
                    None
                }
            };
            for (delivery, _permit) in stopped_queue.into_iter().flatten() {
                settle(&shared, delivery, Disposition::Redeliver(Duration::ZERO)).await;
            }
        }
    });
}

/// Runs the group's handlers of the delivered event, then settles the delivery. `force` names a
/// handler (`group/name`) whose idempotency guard is bypassed: a forced replay.
///
/// Returns false when the delivery went back to the transport to be delivered again.
pub(crate) async fn handle_delivery(
    shared: &Shared,
    handlers: &[&'static HandlerDescriptor],
    delivery: Delivery,
    force: Option<&str>,
) -> bool {
    let envelope = &delivery.envelope;
    let matching: Vec<_> = handlers.iter().filter(|h| h.event.ce_type == envelope.ty).collect();
    let disposition = if envelope.data.len() > shared.config.max_payload {
        oversized(shared, handlers, envelope)
    } else if matching.is_empty() {
        unhandled(shared, handlers, envelope)
    } else {
        let mut outcome = Disposition::Done;
        let last = matching.len() - 1;
        for (i, h) in matching.into_iter().enumerate() {
            let forced = force.is_some_and(|f| f == h.qualified_name());
            outcome = handle_with(shared, h, &delivery, i == last, forced).await;
            if !matches!(outcome, Disposition::Done) {
                break;
            }
        }
        outcome
    };
    let settled = !matches!(disposition, Disposition::Redeliver(_));
    settle(shared, delivery, disposition).await;
    settled
}

/// A payload over the limit (from a producer that does not check it) is not decoded at all.
fn oversized(shared: &Shared, handlers: &[&'static HandlerDescriptor], envelope: &Envelope) -> Disposition {
    let group = handlers.first().map_or("", |h| h.group);
    let error = format!(
        "the payload is {} bytes, over the limit of {} (RuntimeBuilder::max_payload)",
        envelope.data.len(),
        shared.config.max_payload
    );
    shared.journal.record(envelope, EntryKind::DeadLettered { handler: group.to_owned(), error: error.clone() });
    bump(&shared.stats.dead_lettered);
    shared.metrics.dead_lettered.get_or_create(&crate::metrics::group(group)).inc();
    Disposition::DeadLetter(DeadLetterReason { handler: None, error, permanent: true }, 1)
}

/// An event type no handler of the group takes: an unknown version of a handled event is a
/// permanent failure; any other type is simply not this group's business.
fn unhandled(shared: &Shared, handlers: &[&'static HandlerDescriptor], envelope: &Envelope) -> Disposition {
    let group = handlers.first().map_or("", |h| h.group);
    if let Some((name, version)) = envelope.name_and_version() {
        let known: Vec<_> = handlers.iter().filter(|h| h.event.name == name).map(|h| h.event.version).collect();
        if !known.is_empty() {
            let error = format!(
                "version {version} of `{name}` is unknown to group `{group}`, which handles version(s) {known:?}: deploy a handler for it, then replay"
            );
            shared
                .journal
                .record(envelope, EntryKind::DeadLettered { handler: group.to_owned(), error: error.clone() });
            bump(&shared.stats.dead_lettered);
            shared.metrics.dead_lettered.get_or_create(&crate::metrics::group(group)).inc();
            return Disposition::DeadLetter(DeadLetterReason { handler: None, error, permanent: true }, 1);
        }
    }
    shared.journal.record(envelope, EntryKind::Unhandled { group: group.to_owned() });
    bump(&shared.stats.unhandled);
    shared.metrics.unhandled.get_or_create(&crate::metrics::group(group)).inc();
    Disposition::Done
}

async fn settle(shared: &Shared, mut delivery: Delivery, disposition: Disposition) {
    let (id, ty) = (delivery.envelope.id, delivery.envelope.ty.clone());
    let result = match disposition {
        Disposition::Done => delivery.ack().await,
        Disposition::Redeliver(delay) => delivery.nack(delay).await,
        Disposition::DeadLetter(reason, attempts) => {
            delivery.attempt = attempts;
            delivery.dead_letter(reason).await
        }
    };
    if let Err(e) = result {
        // Not settled means delivered again later; the guard absorbs the repeat.
        tracing::warn!(event_id = %id, r#type = %ty, error = %e, "could not settle a delivery; it will be delivered again");
    }
    shared.in_flight.fetch_sub(1, Ordering::SeqCst);
}

fn guard_key(h: &HandlerDescriptor, envelope: &Envelope) -> Result<Option<GuardKey>, HandlerError> {
    let key = match h.idempotency {
        Idempotency::Off => return Ok(None),
        Idempotency::EventId => envelope.id.to_string(),
        Idempotency::Key(f) => f(envelope).map_err(HandlerError::permanent)?,
    };
    Ok(Some(GuardKey { group: h.group.to_owned(), handler: h.name.to_owned(), key }))
}

/// Where a failed attempt leads.
enum AfterFailure {
    Retry,
    Stop(Disposition),
}

/// One handler's view of one delivery, shared by the two ways of guarding it.
struct Job<'a> {
    shared: &'a Shared,
    h: &'static HandlerDescriptor,
    delivery: &'a Delivery,
    envelope: &'a Arc<Envelope>,
    info: Arc<HandlerInfo>,
    policy: RetryPolicy,
}

impl<'a> Job<'a> {
    fn new(shared: &'a Shared, h: &'static HandlerDescriptor, delivery: &'a Delivery) -> Self {
        let policy = RetryPolicy {
            max_attempts: h.max_attempts.unwrap_or(shared.config.retry.max_attempts),
            ..shared.config.retry.clone()
        };
        let info = match shared.handlers.get(&(h.group, h.name)) {
            Some(info) => info.clone(),
            None => Arc::new(HandlerInfo::new(h, &shared.metrics)),
        };
        Self { shared, h, delivery, envelope: &delivery.envelope, info, policy }
    }

    fn journal(&self, kind: impl FnOnce() -> EntryKind) {
        if self.shared.journal.enabled() {
            self.shared.journal.record(self.envelope, kind());
        }
    }

    /// The number of this delivery's first attempt: one past the failures behind it (never
    /// its deliveries: hand-backs do not use up the retry limit).
    fn first_attempt(&self) -> u32 {
        self.delivery.failures.saturating_add(1)
    }

    fn is_step(&self) -> bool {
        self.shared.steps.contains(&(self.h.group, self.h.name))
    }

    fn store_unavailable(&self, error: &dyn std::fmt::Display) -> Disposition {
        tracing::warn!(handler = %self.info.name, %error, "store unavailable; the event will be delivered again");
        self.again_later(Duration::ZERO)
    }

    /// Back to the transport, to come again after a pause that grows with its deliveries: on a
    /// broker that counts every delivery (NATS), a store that stays away or a guard held for
    /// long must not use up the delivery limit in seconds.
    fn again_later(&self, at_least: Duration) -> Disposition {
        let attempt = self.delivery.attempt.saturating_add(1);
        Disposition::Redeliver(self.shared.config.retry.backoff(attempt).max(at_least))
    }

    fn busy(&self) -> Disposition {
        self.again_later(BUSY_DELAY)
    }

    fn duplicate(&self) -> Disposition {
        self.journal(|| EntryKind::Duplicate { handler: self.info.name.clone() });
        bump(&self.shared.stats.duplicates);
        self.info.metrics.duplicates.inc();
        Disposition::Done
    }

    /// What to do when the guard was not acquired; `None` when it was.
    fn unclaimed(&self, claim: Result<Claim, eda_core::StoreError>) -> Option<Disposition> {
        match claim {
            Ok(Claim::Acquired) => None,
            Ok(Claim::Done) => Some(self.duplicate()),
            Ok(Claim::Busy) => Some(self.busy()),
            Err(e) => Some(self.store_unavailable(&e)),
        }
    }

    fn skipped(&self, reason: String) {
        self.journal(|| EntryKind::Skipped { handler: self.info.name.clone(), reason });
        bump(&self.shared.stats.skipped);
        self.info.metrics.skipped.inc();
    }

    fn step_not_run_reason(step: &HandlerDescriptor) -> String {
        format!("`{}` had not run for this correlation id, and now will not", step.qualified_name())
    }

    fn dead(&self, error: &HandlerError, attempt: u32) -> Disposition {
        tracing::error!(handler = %self.info.name, event_id = %self.envelope.id, attempt, %error, "dead-lettered");
        self.journal(|| EntryKind::DeadLettered { handler: self.info.name.clone(), error: error.to_string() });
        bump(&self.shared.stats.dead_lettered);
        self.info.metrics.dead_lettered.inc();
        Disposition::DeadLetter(reason(&self.info.name, error), attempt)
    }

    /// Runs the handler once; on success, returns the envelopes of what it emitted and whether
    /// it emitted one of its failure events (then its step had no effects to undo).
    async fn attempt(
        &self,
        attempt: u32,
        transaction: Option<Box<dyn std::any::Any + Send>>,
    ) -> (Result<(Vec<Envelope>, bool), HandlerError>, Option<Box<dyn std::any::Any + Send>>) {
        let (h, envelope) = (self.h, self.envelope);
        let handling = Handling::new(Arc::clone(envelope), h.group, h.name, attempt).with_transaction(transaction);
        let span = tracing::info_span!("handle", handler = %self.info.name, event_id = %envelope.id, r#type = %envelope.ty,
            correlation_id = %envelope.correlation_id, causation_id = ?envelope.causation_id, attempt);
        #[cfg(feature = "otel")]
        crate::otel::continue_trace(&span, envelope.traceparent.as_deref());
        #[cfg(feature = "otel")]
        let handling_span = span.clone();
        let started = std::time::Instant::now();
        let result = AssertUnwindSafe((h.invoke)(&handling, &self.shared.states)).catch_unwind().instrument(span).await;
        self.info.metrics.duration.observe(started.elapsed().as_secs_f64());
        let transaction = handling.take_transaction();
        let result = match result {
            Ok(Ok(())) => {
                let emitted = handling.take_emitted();
                let failures = self.shared.failures.get(&(h.group, h.name));
                let failed_step = emitted.iter().any(|e| failures.is_some_and(|f| f.contains(&e.info.ce_type)));
                #[allow(unused_mut)] // mutated with the `otel` feature
                let mut envelopes: Vec<Envelope> = emitted
                    .into_iter()
                    .enumerate()
                    .map(|(i, p)| Envelope::derived(envelope, &self.shared.source, h.group, h.name, i, p))
                    .collect();
                // The handling's span is the parent of what it emitted.
                #[cfg(feature = "otel")]
                if let Some(tp) = crate::otel::traceparent(&handling_span) {
                    for e in &mut envelopes {
                        e.traceparent = Some(tp.clone());
                    }
                }
                let limit = self.shared.config.max_payload;
                match envelopes.iter().find(|e| e.data.len() > limit) {
                    Some(big) => Err(HandlerError::permanent(format!(
                        "the handler emitted `{}` of {} bytes, over the limit of {limit} (RuntimeBuilder::max_payload)",
                        big.ty,
                        big.data.len()
                    ))),
                    None => Ok((envelopes, failed_step)),
                }
            }
            Ok(Err(e)) => Err(e),
            Err(panic) => Err(HandlerError::transient(Panicked(panic_message(&*panic)))),
        };
        (result, transaction)
    }

    fn succeeded(&self, envelopes: &[Envelope], attempt: u32) -> Disposition {
        if self.shared.journal.enabled() {
            for e in envelopes {
                self.shared.journal.record(e, EntryKind::Published { by: Some(self.info.name.clone()) });
            }
        }
        self.journal(|| EntryKind::Handled { handler: self.info.name.clone(), attempt });
        bump(&self.shared.stats.handled);
        self.info.metrics.handled.inc();
        Disposition::Done
    }

    /// After a failed attempt: retry after a backoff, dead-letter, or (when stopping) hand the
    /// event back to the transport.
    async fn after_failure(&self, error: HandlerError, attempt: u32) -> AfterFailure {
        self.info.metrics.failed.inc();
        let retry = !error.is_permanent() && self.policy.may_retry(attempt);
        if !retry {
            return AfterFailure::Stop(self.dead(&error, attempt));
        }
        // Counted where the transport keeps counts, so neither a crash nor a shutdown during
        // the backoff resets them.
        if let Err(e) = self.delivery.attempt_failed().await {
            tracing::warn!(handler = %self.info.name, error = %e, "could not record a failed attempt");
        }
        if self.shared.stopping() {
            return AfterFailure::Stop(Disposition::Redeliver(Duration::ZERO));
        }
        tracing::warn!(handler = %self.info.name, event_id = %self.envelope.id, attempt, %error, "attempt failed; retrying");
        self.journal(|| EntryKind::Retrying { handler: self.info.name.clone(), attempt, error: error.to_string() });
        bump(&self.shared.stats.retried);
        self.info.metrics.retried.inc();
        let mut stop = self.shared.stop.clone();
        if tokio::time::timeout(self.policy.backoff(attempt + 1), stop.wait_for(|s| *s)).await.is_ok() {
            return AfterFailure::Stop(Disposition::Redeliver(Duration::ZERO));
        }
        AfterFailure::Retry
    }
}

/// Runs one handler on one delivery. With a transport that handles in a transaction, every
/// attempt is one transaction: guard, saga records, the handler's writes, emitted events and
/// (for the last handler of the delivery) the acknowledgement. Otherwise the runtime's inbox
/// guards the handling and emitted events are published after it.
async fn handle_with(
    shared: &Shared,
    h: &'static HandlerDescriptor,
    delivery: &Delivery,
    ack_on_commit: bool,
    forced: bool,
) -> Disposition {
    let job = Job::new(shared, h, delivery);
    let guard = match guard_key(h, &delivery.envelope) {
        Ok(_) if forced => None,
        Ok(g) => g,
        Err(e) => return job.dead(&e, delivery.failures + 1),
    };
    let _limit = match shared.limits.get(&(h.group, h.name)) {
        Some(s) => s.clone().acquire_owned().await.ok(),
        None => None,
    };
    let from_store = |store: &Arc<dyn Store>| Source::Store(store.clone());
    let (source, first) = match delivery.begin().await {
        Ok(Some(first)) => (Source::Delivery(delivery), first),
        Ok(None) => match shared.store.as_ref().map(from_store) {
            Some(source) => match source.begin().await {
                Ok(Some(first)) => (source, first),
                Ok(None) => return with_inbox(&job, guard.as_ref()).await,
                Err(e) => return job.store_unavailable(&e),
            },
            None => return with_inbox(&job, guard.as_ref()).await,
        },
        Err(e) => return job.store_unavailable(&e),
    };
    // The acknowledgement rides in the last handler's transaction only on the log's own store.
    let ack_on_commit = ack_on_commit && matches!(source, Source::Delivery(_));
    in_transactions(&job, guard.as_ref(), &source, first, ack_on_commit).await
}

/// Where the transactions of a handling come from: the log the delivery came from, or the
/// database beside the broker.
enum Source<'a> {
    Delivery(&'a Delivery),
    Store(Arc<dyn Store>),
}

impl Source<'_> {
    async fn begin(&self) -> Result<Option<Box<dyn UnitOfWork>>, String> {
        match self {
            Source::Delivery(d) => d.begin().await.map_err(|e| e.to_string()),
            Source::Store(s) => s.begin().await.map(Some).map_err(|e| e.to_string()),
        }
    }
}

async fn in_transactions(
    job: &Job<'_>,
    guard: Option<&GuardKey>,
    source: &Source<'_>,
    first: Box<dyn UnitOfWork>,
    ack_on_commit: bool,
) -> Disposition {
    let (h, correlation) = (job.h, &job.envelope.correlation_id);
    let mut next = Some(first);
    let mut attempt = job.first_attempt();
    loop {
        let mut uow = match next.take() {
            Some(u) => u,
            None => match source.begin().await {
                Ok(Some(u)) => u,
                Ok(None) => return job.store_unavailable(&"the transport stopped offering transactions"),
                Err(e) => return job.store_unavailable(&e),
            },
        };
        if let Some(key) = guard {
            if let Some(d) = job.unclaimed(uow.claim(key).await) {
                return d;
            }
        }
        if let Some(step) = h.compensates.map(|f| f()) {
            match uow.compensation_started(step.group, step.name, correlation).await {
                Ok(StepState::Done) => {}
                Ok(StepState::NotRun) => {
                    return match uow.commit(ack_on_commit).await {
                        Ok(Commit::Duplicate) => job.duplicate(),
                        Ok(_) => {
                            job.skipped(Job::step_not_run_reason(step));
                            Disposition::Done
                        }
                        Err(e) => job.store_unavailable(&e),
                    };
                }
                Ok(StepState::Running) => return job.busy(),
                Err(e) => return job.store_unavailable(&e),
            }
        }
        if job.is_step() {
            match uow.step_started(h.group, h.name, correlation).await {
                Ok(true) => {}
                Ok(false) => {
                    return match uow.commit(ack_on_commit).await {
                        Ok(Commit::Duplicate) => job.duplicate(),
                        Ok(_) => {
                            job.skipped("compensated before it ran".into());
                            Disposition::Done
                        }
                        Err(e) => job.store_unavailable(&e),
                    };
                }
                Err(e) => return job.store_unavailable(&e),
            }
        }
        let lent = uow.lend_transaction();
        let (result, returned) = job.attempt(attempt, lent).await;
        if let Some(tx) = returned {
            uow.return_transaction(tx);
        }
        let error = match result {
            Ok((envelopes, failed_step)) => {
                if job.is_step() {
                    uow.step_finished(h.group, h.name, correlation, !failed_step);
                }
                uow.publish(envelopes.clone());
                match uow.commit(ack_on_commit).await {
                    Ok(Commit::Done) => return job.succeeded(&envelopes, attempt),
                    Ok(Commit::Duplicate) => return job.duplicate(),
                    Ok(Commit::Cancelled) => {
                        job.skipped("compensated while it ran; its writes were rolled back".into());
                        return Disposition::Done;
                    }
                    // The whole attempt rolled back: nothing of it happened; try it again.
                    Err(e) => HandlerError::transient(e),
                }
            }
            Err(e) => {
                drop(uow); // rolls back the handler's writes
                e
            }
        };
        match job.after_failure(error, attempt).await {
            AfterFailure::Retry => attempt += 1,
            AfterFailure::Stop(d) => return d,
        }
    }
}

async fn with_inbox(job: &Job<'_>, guard: Option<&GuardKey>) -> Disposition {
    let (shared, h, correlation) = (job.shared, job.h, &job.envelope.correlation_id);
    let inbox = &*shared.inbox;
    if let Some(key) = guard {
        if let Some(d) = job.unclaimed(inbox.claim(key).await) {
            return d;
        }
    }
    // The inbox may be shared with other runtimes: a handling cut off (shutdown past its
    // timeout) gives its claim back, or the event would be busy for them forever.
    let held = HeldClaim { inbox: &shared.inbox, key: guard, open: AtomicBool::new(guard.is_some()) };
    let release = || async {
        if let Some(key) = guard {
            held.open.store(false, Ordering::SeqCst);
            if let Err(e) = inbox.release(key).await {
                tracing::warn!(handler = %job.info.name, error = %e, "could not release an idempotency guard");
            }
        }
    };
    let complete = || async {
        if let Some(key) = guard {
            held.open.store(false, Ordering::SeqCst);
            if let Err(e) = inbox.complete(key).await {
                tracing::warn!(handler = %job.info.name, error = %e, "could not record a handled event; a redelivery would run it again");
            }
        }
    };
    // A step's record must be written: left "running", its compensator would wait for it
    // for good. Tried until the store answers, holding the event (and its key); false when
    // the runtime stops first.
    let step_finished = |succeeded| async move {
        if !job.is_step() {
            return true;
        }
        let mut tries = 1;
        loop {
            match inbox.step_finished(h.group, h.name, correlation, succeeded).await {
                Ok(()) => return true,
                Err(e) => {
                    tracing::warn!(handler = %job.info.name, error = %e, "could not record a saga step; trying again");
                    tries += 1;
                    let mut stop = shared.stop.clone();
                    let pause = shared.config.retry.backoff(tries);
                    if tokio::time::timeout(pause, stop.wait_for(|s| *s)).await.is_ok() {
                        return false;
                    }
                }
            }
        }
    };

    if let Some(step) = h.compensates.map(|f| f()) {
        match inbox.compensation_started(step.group, step.name, correlation).await {
            Ok(StepState::Done) => {}
            Ok(StepState::NotRun) => {
                job.skipped(Job::step_not_run_reason(step));
                complete().await;
                return Disposition::Done;
            }
            Ok(StepState::Running) => {
                release().await;
                return job.busy();
            }
            Err(e) => {
                release().await;
                return job.store_unavailable(&e);
            }
        }
    }
    if job.is_step() {
        match inbox.step_started(h.group, h.name, correlation).await {
            Ok(true) => {}
            Ok(false) => {
                job.skipped("compensated before it ran".into());
                complete().await;
                return Disposition::Done;
            }
            Err(e) => {
                release().await;
                return job.store_unavailable(&e);
            }
        }
    }

    let mut attempt = job.first_attempt();
    loop {
        let error = match job.attempt(attempt, None).await.0 {
            Ok((envelopes, failed_step)) => {
                if let Err(e) = publish_all(shared, &envelopes, &job.policy).await {
                    // The handler's own effects happened; its events did not get out. Deliver the
                    // event again so they do (the guard is released for that).
                    tracing::error!(handler = %job.info.name, error = %e, "could not publish emitted events; the event will be handled again");
                    release().await;
                    return Disposition::Redeliver(job.policy.backoff(attempt + 1));
                }
                if !step_finished(!failed_step).await {
                    // Stopping with the step unrecorded: it runs again after the restart.
                    release().await;
                    return Disposition::Redeliver(Duration::ZERO);
                }
                complete().await;
                return job.succeeded(&envelopes, attempt);
            }
            Err(e) => e,
        };
        match job.after_failure(error, attempt).await {
            AfterFailure::Retry => attempt += 1,
            AfterFailure::Stop(d) => {
                release().await;
                if !step_finished(false).await {
                    return Disposition::Redeliver(Duration::ZERO);
                }
                return d;
            }
        }
    }
}

/// A claim on the inbox that the handling has neither completed nor released yet.
struct HeldClaim<'a> {
    inbox: &'a Arc<dyn Inbox>,
    key: Option<&'a GuardKey>,
    open: AtomicBool,
}

impl Drop for HeldClaim<'_> {
    fn drop(&mut self) {
        let (Some(key), true) = (self.key, self.open.load(Ordering::SeqCst)) else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let (inbox, key) = (self.inbox.clone(), key.clone());
        runtime.spawn(async move {
            if let Err(e) = inbox.release(&key).await {
                tracing::warn!(handler = %key.handler, error = %e, "could not release the guard of a handling cut off");
            }
        });
    }
}

async fn publish_all(
    shared: &Shared,
    envelopes: &[Envelope],
    policy: &RetryPolicy,
) -> Result<(), eda_core::TransportError> {
    if envelopes.is_empty() {
        return Ok(());
    }
    let mut attempt = 1;
    loop {
        match shared.transport.publish_all(envelopes).await {
            Ok(()) => return Ok(()),
            Err(e) if policy.may_retry(attempt) && !shared.stopping() => {
                tracing::warn!(error = %e, attempt, "publish failed; retrying");
                attempt += 1;
                tokio::time::sleep(policy.backoff(attempt)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

fn reason(handler: &str, error: &HandlerError) -> DeadLetterReason {
    DeadLetterReason { handler: Some(handler.to_owned()), error: error.to_string(), permanent: error.is_permanent() }
}

/// A handler panicked; treated as a transient error.
#[derive(Debug, thiserror::Error)]
#[error("the handler panicked: {0}")]
struct Panicked(String);

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}
