//! Consuming: one group member per subscription, polled on a thread of its own, its records
//! routed to the engine's runs partition by partition, and commits of the handled prefix.
//!
//! The member's thread polls librdkafka and serves the group protocol there: an assignment
//! opens a route per partition and tells the engine; a revocation tells the engine and blocks
//! the rebalance until the partition's run has committed what is done (librdkafka keeps the
//! member's heartbeats going meanwhile). A route holds a window of records ahead of the run,
//! and a stash of four more windows; past that the partition is paused, and resumed once half
//! the stash went on, so that a slow partition holds only itself. A pause drops what librdkafka
//! prefetched of the partition, to be fetched again on resume: the stash makes pauses rare.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use eda_core::{Binding, DeadLetterReason, Deliveries, Envelope, Subscription, TransportError};
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{BorrowedMessage, Headers, OwnedHeaders};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::{mpsc, oneshot};

use super::{blocking, lock, other, refused, KafkaTransport, NAME, REQUEST_TIMEOUT};
use crate::engine::assigned::{self, Assignment};
use crate::engine::{EngineTask, Fetched, Opened, PartitionLog, Resume};

/// A record as the engine holds it: where it is, to commit it, and what it was, to keep it as
/// a dead letter.
pub(super) struct Record {
    pub partition: i32,
    pub offset: i64,
    pub headers: Option<OwnedHeaders>,
    pub payload: Vec<u8>,
}

type Item = Result<Fetched<Record>, TransportError>;

/// Told whether a partition is read again from its committed offset.
type Rewound = oneshot::Sender<Result<(), TransportError>>;

/// How many windows of records a route stashes before its partition is paused.
const STASHED: usize = 4;

/// Where one assigned partition's records go.
struct Route {
    tx: mpsc::Sender<Item>,
    /// Records polled while the run had no room, in order; the partition is paused while it
    /// is full.
    stash: VecDeque<Fetched<Record>>,
    paused: bool,
}

/// The routes of one member, shared by its thread and the engine's runs.
struct Routes {
    /// The Kafka topic.
    topic: String,
    /// Records a route holds ahead of its run; its stash holds `STASHED` times as many.
    ahead: usize,
    table: Mutex<HashMap<i32, Route>>,
    /// The reading end of each route, until its run opens the partition.
    opened: Mutex<HashMap<u32, mpsc::Receiver<Item>>>,
    /// Partitions whose run asks to read again from the committed offset.
    rewinds: Mutex<Vec<(u32, Rewound)>>,
}

impl Routes {
    /// A new route for `partition`, replacing any older one.
    fn open(&self, partition: i32) {
        let (tx, rx) = mpsc::channel(self.ahead);
        lock(&self.table).insert(partition, Route { tx, stash: VecDeque::new(), paused: false });
        lock(&self.opened).insert(partition as u32, rx);
    }

    /// Closes a revoked partition's route. A partition paused here is resumed first:
    /// librdkafka keeps the application's pause across a revocation, and the partition,
    /// assigned here again, would never be fetched.
    fn close(&self, consumer: &BaseConsumer<Member>, partition: i32) {
        let route = lock(&self.table).remove(&partition);
        lock(&self.opened).remove(&(partition as u32));
        if route.is_some_and(|r| r.paused) {
            if let Err(e) = consumer.resume(&self.partition_list(partition)) {
                tracing::warn!(partition, error = %e, "could not resume a revoked partition");
            }
        }
    }

    /// The partitions of this route's topic in a rebalance's list.
    fn partitions_of(&self, tpl: &TopicPartitionList) -> Vec<i32> {
        tpl.elements_for_topic(&self.topic).iter().map(|e| e.partition()).collect()
    }

    fn partition_list(&self, partition: i32) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.topic, partition);
        tpl
    }

    /// Passes a polled record to its partition's run.
    fn route(&self, consumer: &BaseConsumer<Member>, fetched: Fetched<Record>) {
        let partition = fetched.message.partition;
        let mut table = lock(&self.table);
        // Not assigned here (any more): its next owner reads it from the committed offset.
        let Some(route) = table.get_mut(&partition) else { return };
        if route.stash.is_empty() {
            match route.tx.try_send(Ok(fetched)) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(Ok(fetched))) => route.stash.push_back(fetched),
                // The run ended; the partition is read again from its committed offset when it
                // opens again.
                Err(_) => return,
            }
        } else {
            route.stash.push_back(fetched);
        }
        if route.stash.len() >= self.ahead * STASHED && !route.paused {
            if let Err(e) = consumer.pause(&self.partition_list(partition)) {
                tracing::warn!(partition, error = %e, "could not pause a partition whose run is behind");
            }
            route.paused = true;
        }
    }

    /// Passes stashed records on where their runs have room, resuming partitions that caught
    /// up. True while some still wait.
    fn flush(&self, consumer: &BaseConsumer<Member>) -> bool {
        let mut waiting = false;
        for (partition, route) in lock(&self.table).iter_mut() {
            while let Some(fetched) = route.stash.pop_front() {
                match route.tx.try_send(Ok(fetched)) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(Ok(fetched))) => {
                        route.stash.push_front(fetched);
                        break;
                    }
                    Err(_) => route.stash.clear(),
                }
            }
            if route.paused && route.stash.len() < self.ahead * STASHED / 2 {
                if let Err(e) = consumer.resume(&self.partition_list(*partition)) {
                    tracing::warn!(partition, error = %e, "could not resume a partition");
                }
                route.paused = false;
            }
            waiting |= !route.stash.is_empty();
        }
        waiting
    }
}

/// The group member's context: it serves the group protocol's rebalances.
pub(super) struct Member {
    routes: Arc<Routes>,
    /// Gone once the member left the group: the engine stops when it is.
    assignments: Mutex<Option<mpsc::UnboundedSender<Assignment>>>,
    /// Whether the member had partitions assigned before.
    assigned_before: AtomicBool,
}

impl Member {
    /// True once the engine is gone (its runtime dropped it): nothing reads the routes.
    fn engine_gone(&self) -> bool {
        lock(&self.assignments).as_ref().is_none_or(mpsc::UnboundedSender::is_closed)
    }
}

impl ClientContext for Member {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        super::log(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", error = %error, "{reason}");
    }
}

impl ConsumerContext for Member {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let send = |word| {
            if let Some(tx) = lock(&self.assignments).as_ref() {
                let _ = tx.send(word);
            }
        };
        match rebalance {
            Rebalance::Assign(tpl) => {
                let first = !self.assigned_before.swap(true, Ordering::Relaxed);
                let partitions = self.routes.partitions_of(tpl);
                tracing::info!(topic = %self.routes.topic, ?partitions, "partitions assigned");
                for &partition in &partitions {
                    self.routes.open(partition);
                    send(Assignment::Assigned { partition: partition as u32, first });
                }
            }
            Rebalance::Revoke(tpl) => {
                // Lost: the group gave the partitions away already; commit nothing more.
                let lost = consumer.assignment_lost();
                let partitions = self.routes.partitions_of(tpl);
                tracing::info!(topic = %self.routes.topic, ?partitions, lost, "partitions revoked");
                let ends: Vec<_> = partitions
                    .iter()
                    .map(|&partition| {
                        let (done, ended) = oneshot::channel();
                        send(Assignment::Revoked { partition: partition as u32, lost, done });
                        (partition, ended)
                    })
                    .collect();
                // A run opening its partition again waits for a rewind this thread would
                // only serve after the revocation: dropping its request tells it there is none.
                lock(&self.routes.rewinds).retain(|(p, _)| !partitions.contains(&(*p as i32)));
                // The runs end within the handover timeout: each lets what is out finish,
                // commits what is done, and says so.
                for (partition, ended) in ends {
                    let _ = ended.blocking_recv();
                    self.routes.close(consumer, partition);
                }
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "the consumer group's rebalance failed"),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(e) = result {
            // The next commit covers these offsets; until then they are handled again after a
            // rebalance, which the guards absorb.
            tracing::debug!(error = %e, "a commit failed");
        }
    }
}

/// The envelope of a record, from its `ce_*` and `content-type` headers.
pub(super) fn envelope(topic: &str, headers: Option<&OwnedHeaders>, data: Vec<u8>) -> Result<Envelope, String> {
    let pairs =
        headers.into_iter().flat_map(|h| h.iter()).filter_map(|h| Some((h.key, std::str::from_utf8(h.value?).ok()?)));
    Envelope::from_headers(Binding::Kafka, topic, pairs, data)
        .map_err(|e| format!("the record is not a CloudEvents event eda can read: {e}"))
}

/// A polled record, read into what the engine takes.
fn fetched(topic: &str, m: &BorrowedMessage<'_>) -> Fetched<Record> {
    let headers = m.headers().map(|h| h.detach());
    let payload = m.payload().unwrap_or_default().to_vec();
    let event = envelope(topic, headers.as_ref(), payload.clone());
    let record = Record { partition: m.partition(), offset: m.offset(), headers, payload };
    // Offsets count from 0, the engine's from 1 (0: nothing settled).
    Fetched { offset: m.offset() as u64 + 1, event, message: record, delivered: 0 }
}

/// Polls the member until the subscription stops, then leaves the group.
fn poll(
    consumer: Arc<BaseConsumer<Member>>,
    routes: Arc<Routes>,
    stop: Arc<AtomicBool>,
    topic: String,
    handover: Duration,
) {
    let mut failures = 0u32;
    while !stop.load(Ordering::Acquire) && !consumer.context().engine_gone() {
        let rewinds = std::mem::take(&mut *lock(&routes.rewinds));
        for (partition, done) in rewinds {
            // Not for a run that gave up waiting: it asks again, and a stale rewind would
            // replace the route its next opening reads.
            if !done.is_closed() {
                let _ = done.send(rewind(&consumer, &routes, partition as i32));
            }
        }
        let waiting = routes.flush(&consumer);
        let mut wait = if waiting { Duration::from_millis(2) } else { Duration::from_millis(100) };
        // Take what has arrived, a burst at a time, before looking at the routes again.
        for _ in 0..256 {
            match consumer.poll(wait) {
                None => break,
                Some(Ok(m)) => {
                    failures = 0;
                    routes.route(&consumer, fetched(&topic, &m));
                }
                Some(Err(e)) => {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(100) {
                        tracing::warn!(topic = %routes.topic, error = %e, failures, "consuming failed; librdkafka retries");
                    }
                    break;
                }
            }
            wait = Duration::ZERO;
        }
    }
    // Unsubscribing revokes every partition: their runs, whose subscription is gone, commit
    // what is done first.
    consumer.unsubscribe();
    let deadline = std::time::Instant::now() + handover + Duration::from_secs(10);
    while consumer.assignment().is_ok_and(|a| a.count() > 0) && std::time::Instant::now() < deadline {
        let _ = consumer.poll(Duration::from_millis(100));
    }
    lock(&consumer.context().assignments).take();
    // The last hold of the consumer (the runs have a weak one, upgraded for a commit at a
    // time): dropping it leaves the group, which blocks, so it is dropped here, on this thread.
    // A commit holds it for a moment (a synchronous one at most a session timeout).
    let mut consumer = consumer;
    let since = std::time::Instant::now();
    let mut warned = false;
    loop {
        match Arc::try_unwrap(consumer) {
            Ok(last) => break drop(last),
            Err(shared) => {
                consumer = shared;
                if !warned && since.elapsed() > Duration::from_secs(30) {
                    tracing::warn!(topic = %routes.topic, "a commit has held the consumer for 30 s; leaving the group waits for it");
                    warned = true;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

/// Reads `partition` again from its committed offset, through a new route. An error leaves
/// the partition without a route to open: its run tries again.
fn rewind(consumer: &BaseConsumer<Member>, routes: &Routes, partition: i32) -> Result<(), TransportError> {
    if !lock(&routes.table).contains_key(&partition) {
        // Revoked meanwhile: nothing to read here.
        return Err(TransportError::Closed(NAME));
    }
    // Unknown, the offset is not guessed: reading from the start would apply the partition
    // again, and reading on from where the last run was would skip what it left undone.
    let committed = consumer.committed_offsets(routes.partition_list(partition), REQUEST_TIMEOUT).map_err(other)?;
    let element = committed.find_partition(&routes.topic, partition).ok_or(TransportError::Closed(NAME))?;
    // The call succeeds while the partition's own answer may be an error (with no offset).
    element.error().map_err(other)?;
    let from = match element.offset() {
        Offset::Offset(o) => Offset::Offset(o),
        // Nothing committed yet: from the start, as `auto.offset.reset=earliest` reads it.
        Offset::Invalid => Offset::Beginning,
        other_offset => {
            return Err(TransportError::Other {
                transport: NAME,
                source: format!("partition {partition} has no readable committed offset ({other_offset:?})").into(),
            })
        }
    };
    routes.open(partition);
    let sought = consumer.seek(&routes.topic, partition, from, REQUEST_TIMEOUT).map_err(other);
    let _ = consumer.resume(&routes.partition_list(partition));
    if sought.is_err() {
        // The route must not be read: records from the old position may come through it.
        lock(&routes.opened).remove(&(partition as u32));
    }
    sought
}

/// One subscription's partitions, as the engine reads and settles them.
struct KafkaPartitions {
    transport: KafkaTransport,
    /// Weak: the member's thread holds it, and drops it last to leave the group.
    consumer: Weak<BaseConsumer<Member>>,
    routes: Arc<Routes>,
    /// The eda topic and group.
    topic: String,
    group: String,
    partitions: u32,
}

#[async_trait]
impl PartitionLog for KafkaPartitions {
    type Message = Record;

    fn partitions(&self) -> u32 {
        self.partitions
    }

    async fn open(
        &self,
        partition: u32,
        _: usize,
        _: Resume,
        generation: u64,
    ) -> Result<Opened<Record>, TransportError> {
        if generation > 0 {
            // Opened again after a failure: what the last run read and did not commit comes
            // again from the committed offset.
            let (done, rewound) = oneshot::channel();
            lock(&self.routes.rewinds).push((partition, done));
            match tokio::time::timeout(REQUEST_TIMEOUT * 3, rewound).await {
                Ok(Ok(rewound)) => rewound?,
                // The member's thread is gone, or busy past any reason: not read this time.
                _ => return Err(TransportError::Closed(NAME)),
            }
        }
        let rx = lock(&self.routes.opened).remove(&partition).ok_or(TransportError::Closed(NAME))?;
        let messages = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
        Ok(Opened { floor: 0, origin: 0, backlog: false, messages: Box::pin(messages) })
    }

    async fn settle(&self, message: &Record, confirm: bool) -> Result<(), TransportError> {
        let consumer = self.consumer.upgrade().ok_or(TransportError::Closed(NAME))?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.routes.topic, message.partition, Offset::Offset(message.offset + 1))
            .map_err(other)?;
        if confirm {
            blocking(move || consumer.commit(&tpl, CommitMode::Sync)).await?.map_err(other)
        } else {
            // Sent at once; a failed one is covered by the next, and logged by the member.
            consumer.commit(&tpl, CommitMode::Async).map_err(other)
        }
    }

    async fn dead_letter(
        &self,
        message: &Record,
        reason: &DeadLetterReason,
        attempts: u32,
    ) -> Result<(), TransportError> {
        self.transport.keep_dead_letter(&self.topic, &self.group, message, reason, attempts).await
    }
}

/// Joins the subscription's consumer group and starts its engine.
pub(super) fn subscribe(
    transport: KafkaTransport,
    subscription: &Subscription,
    partitions: u32,
) -> Result<(Deliveries, EngineTask), TransportError> {
    let options = transport.options().clone();
    let handover = options.engine.handover_timeout;
    let topic = transport.topic_name(&subscription.topic);
    let group = transport.group_name(&subscription.group, &subscription.topic);
    let routes = Arc::new(Routes {
        topic: topic.clone(),
        ahead: options.engine.window.min(1024),
        table: Mutex::default(),
        opened: Mutex::default(),
        rewinds: Mutex::default(),
    });
    let (assignments, words) = mpsc::unbounded_channel();
    let member = Member {
        routes: routes.clone(),
        assignments: Mutex::new(Some(assignments)),
        assigned_before: AtomicBool::new(false),
    };
    // A revocation waits up to the handover timeout inside a poll: the group must not take the
    // member for dead meanwhile.
    let poll_interval = (options.engine.handover_timeout + Duration::from_secs(30)).max(Duration::from_secs(300));
    let mut config = options.consumer_client();
    config
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("heartbeat.interval.ms", (options.session_timeout / 4).as_millis().max(100).to_string())
        .set("max.poll.interval.ms", poll_interval.as_millis().to_string());
    // The user's properties win over eda's defaults above (not over its fixed choices, which
    // `KafkaOptions::check` keeps out).
    for (k, v) in &options.properties {
        config.set(k, v);
    }
    let consumer: BaseConsumer<Member> = config.create_with_context(member).map_err(refused)?;
    consumer.subscribe(&[&topic]).map_err(other)?;
    let consumer = Arc::new(consumer);
    let stop = Arc::new(AtomicBool::new(false));
    let log = Arc::new(KafkaPartitions {
        transport,
        consumer: Arc::downgrade(&consumer),
        routes: routes.clone(),
        topic: subscription.topic.clone(),
        group: subscription.group.clone(),
        partitions,
    });
    let (deliveries, engine) =
        assigned::subscribe(log, (&subscription.group, &subscription.topic), NAME, options.engine, words, stop.clone());
    let eda_topic = subscription.topic.clone();
    std::thread::Builder::new()
        .name(format!("eda-kafka {group}"))
        .spawn(move || poll(consumer, routes, stop, eda_topic, handover))
        .map_err(other)?;
    Ok((deliveries, engine))
}
