//! The in-process transport: a log per topic with consumer groups, in memory.
//!
//! It behaves as the durable transports do, minus durability: every group gets every event of
//! a topic the log still holds; the subscriptions of one group share the events; an event is
//! handed to a group only when no earlier event of its key is still unsettled there, so
//! per-key order holds across competing consumers and redeliveries; a delivery that is nacked,
//! or dropped unsettled, is delivered again.
//!
//! Each topic holds at most [`capacity`](MemoryTransport::with_capacity) events, like a real
//! broker's bounded log: once full, events every group has settled go; when none can go,
//! publishing waits until the slowest group settles one (back-pressure). Events emitted by a
//! handler (those with a cause) do not wait — a handler waiting for its own group to move on
//! would wait for ever — and so may take a topic past its capacity by what handlers have in
//! flight. A topic no group reads lets its oldest events go instead.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use eda_core::{
    Acker, DeadLetter, DeadLetterStore, Deliveries, Delivery, Envelope, Page, PartitionLag, StoredDeadLetter,
    Subscription, Transport, TransportError,
};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::FastMap;
use cursor::{GroupCursor, Retained};

mod cursor;

/// The in-process transport. Clones share the same log.
///
/// Each topic holds at most [`capacity`](MemoryTransport::with_capacity) events, like a real
/// broker's bounded log: once full, events every group has settled go; when none can go,
/// publishing waits until the slowest group settles one (back-pressure). Events emitted by a
/// handler (those with a cause) do not wait — a handler waiting for its own group to move on
/// would wait for ever — and so may take a topic past its capacity by what handlers have in
/// flight. A topic no group reads lets its oldest events go instead.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use eda::transport::MemoryTransport;
/// use eda::Transport;
///
/// let bus = MemoryTransport::with_capacity(10_000);
/// assert!(bus.lag("billing", "orders").await?.iter().all(|p| p.lag == 0));
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct MemoryTransport {
    inner: Arc<Inner>,
}

struct Inner {
    topics: Mutex<FastMap<String, TopicLog>>,
    capacity: usize,
    dead: Mutex<DeadLetters>,
    /// Guards and saga step records of every runtime on this log.
    inbox: Arc<crate::inbox::MemoryInbox>,
}

/// Dead letters, with ids that are never given out twice: an id from an earlier listing
/// never names another letter.
#[derive(Default)]
struct DeadLetters {
    letters: Vec<StoredDeadLetter>,
    last_id: u64,
}

impl Default for Inner {
    fn default() -> Self {
        Self {
            topics: Mutex::default(),
            capacity: MemoryTransport::DEFAULT_CAPACITY,
            dead: Mutex::default(),
            inbox: Arc::default(),
        }
    }
}

#[derive(Default)]
struct TopicLog {
    events: Retained,
    groups: FastMap<String, GroupCursor>,
    notify: Arc<Notify>,
    /// Woken when a full log has room again.
    space: Arc<Notify>,
}

impl TopicLog {
    /// Lets go of what every group has settled (everything but the newest `capacity`, when no
    /// group reads the topic), once the log is full.
    fn make_room(&mut self, capacity: usize) {
        if self.events.len() < capacity {
            return;
        }
        let upto = match self.groups.values().map(|g| g.committed).min() {
            Some(slowest) => slowest,
            None => self.events.end().saturating_sub(capacity as u64 - 1),
        };
        self.events.trim_to(upto);
    }
}

impl MemoryTransport {
    /// Events a topic holds at most unless told otherwise.
    pub const DEFAULT_CAPACITY: usize = 65_536;

    /// An empty log, holding at most [`DEFAULT_CAPACITY`](Self::DEFAULT_CAPACITY) events per topic.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty log holding at most `capacity` events per topic (see the
    /// [type's docs](MemoryTransport) for what happens when a topic is full).
    pub fn with_capacity(capacity: usize) -> Self {
        Self { inner: Arc::new(Inner { capacity: capacity.max(1), ..Inner::default() }) }
    }

    fn topics(&self) -> MutexGuard<'_, FastMap<String, TopicLog>> {
        // No code path panics while holding the lock; recover the data if one ever does.
        self.inner.topics.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many events `topic` holds now.
    pub fn len(&self, topic: &str) -> usize {
        self.topics().get(topic).map_or(0, |t| t.events.len())
    }

    /// How many events each topic holds at most (emitted events aside, see the [type's docs](MemoryTransport)).
    pub fn capacity(&self) -> usize {
        self.inner.capacity
    }

    /// True when no event was ever published on `topic`.
    pub fn is_empty(&self, topic: &str) -> bool {
        self.len(topic) == 0
    }

    fn settle(&self, topic: &str, group: &str, offset: u64, how: Settle) {
        let mut topics = self.topics();
        let Some(log) = topics.get_mut(topic) else { return };
        let TopicLog { events, groups, notify, space } = log;
        let Some(cursor) = groups.get_mut(group) else { return };
        match how {
            Settle::Done => {
                let before = cursor.committed;
                cursor.settle(offset, events);
                if cursor.committed > before && events.len() >= self.inner.capacity {
                    space.notify_waiters();
                }
            }
            Settle::Again(delay) => cursor.requeue(offset, Instant::now() + delay),
        }
        notify.notify_waiters();
    }

    fn attempt_failed(&self, topic: &str, group: &str, offset: u64) {
        let mut topics = self.topics();
        let cursor = topics.get_mut(topic).and_then(|log| log.groups.get_mut(group));
        if let Some(cursor) = cursor.filter(|c| c.in_flight.contains_key(&offset)) {
            *cursor.failures.entry(offset).or_default() += 1;
        }
    }

    /// Waits for the next deliverable event of `group` on `topic`.
    async fn next_delivery(&self, topic: &str, group: &str, notify: &Notify) -> Delivery {
        loop {
            // Registered before looking, so a publish or a settlement that lands after the look
            // (a nack due later included) wakes the wait instead of being missed.
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let wake_at = {
                let mut topics = self.topics();
                let log = topics.entry(topic.to_owned()).or_default();
                let base = log.events.base();
                let cursor = log.groups.entry(group.to_owned()).or_insert_with(|| GroupCursor::starting_at(base));
                match cursor.take_next(&log.events, Instant::now()) {
                    Ok((offset, attempt)) => {
                        // Never let go of: every group's committed offset is held, and what
                        // it hands out is at or above it. Were it gone, it is passed.
                        let Some(envelope) = log.events.get(offset).cloned() else {
                            cursor.settle(offset, &log.events);
                            continue;
                        };
                        let acker = MemoryAcker {
                            transport: self.clone(),
                            topic: topic.to_owned(),
                            group: group.to_owned(),
                            offset,
                            settled: false,
                        };
                        let failures = cursor.failures.get(&offset).copied().unwrap_or(0);
                        return Delivery::new(envelope, attempt, 0, Box::new(acker)).with_failures(failures);
                    }
                    Err(wake_at) => wake_at,
                }
            };
            #[cfg(test)]
            tests::after_look(topic);
            match wake_at {
                Some(at) => {
                    let _ = tokio::time::timeout_at(at, notified).await;
                }
                None => notified.await,
            }
        }
    }
}

enum Settle {
    Done,
    Again(Duration),
}

#[async_trait]
impl Transport for MemoryTransport {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn sequences_keys(&self) -> bool {
        // A group's cursor holds a key from hand-out to settlement (a hand-back keeps it), and
        // passes it to the key's oldest waiting event: the runtime need not sequence it again.
        true
    }

    async fn publish(&self, envelope: &Envelope) -> Result<(), TransportError> {
        let capacity = self.inner.capacity;
        // Emitted by a handler: never waits (see the module).
        let waits = envelope.causation_id.is_none();
        let topic = envelope.topic.as_str();
        let mut envelope = Some(Arc::new(envelope.clone()));
        loop {
            let space = {
                let mut topics = self.topics();
                let log = topics.entry(topic.to_owned()).or_default();
                log.make_room(capacity);
                if !waits || log.events.len() < capacity {
                    log.events.extend(envelope.take());
                    log.notify.notify_waiters();
                    return Ok(());
                }
                log.space.clone()
            };
            // Registered, then looked again: a settlement in between is not missed.
            let room = space.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            let full = {
                let mut topics = self.topics();
                topics.get_mut(topic).is_some_and(|log| {
                    log.make_room(capacity);
                    log.events.len() >= capacity
                })
            };
            if full {
                room.await;
            }
        }
    }

    async fn subscribe(&self, subscription: &Subscription) -> Result<Deliveries, TransportError> {
        let (topic, group) = (subscription.topic.clone(), subscription.group.clone());
        // The topic's wake-up, taken once for the subscription's life (a log is never removed).
        let notify = {
            let mut topics = self.topics();
            let log = topics.entry(topic.clone()).or_default();
            let base = log.events.base();
            log.groups.entry(group.clone()).or_insert_with(|| GroupCursor::starting_at(base));
            log.notify.clone()
        };
        let transport = self.clone();
        let stream = futures_util::stream::unfold((), move |()| {
            let (transport, topic, group, notify) = (transport.clone(), topic.clone(), group.clone(), notify.clone());
            async move { Some((Ok(transport.next_delivery(&topic, &group, &notify).await), ())) }
        });
        Ok(Box::pin(stream))
    }

    fn dead_letter_store(&self) -> Option<&dyn DeadLetterStore> {
        Some(self)
    }

    fn inbox(&self) -> Option<Arc<dyn eda_core::Inbox>> {
        Some(self.inner.inbox.clone())
    }

    async fn lag(&self, group: &str, topic: &str) -> Result<Vec<PartitionLag>, TransportError> {
        let topics = self.topics();
        let lag = topics.get(topic).map_or(0, |log| {
            let committed = log.groups.get(group).map_or(log.events.base(), |c| c.committed);
            log.events.end().saturating_sub(committed)
        });
        Ok(vec![PartitionLag { partition: 0, lag }])
    }
}

#[async_trait]
impl DeadLetterStore for MemoryTransport {
    async fn dead_letter_page(&self, group: Option<&str>, page: Page) -> Result<Vec<StoredDeadLetter>, TransportError> {
        let dead = self.inner.dead.lock().unwrap_or_else(|p| p.into_inner());
        let mine = |d: &&StoredDeadLetter| d.id > page.after && group.is_none_or(|g| d.group == g);
        Ok(dead.letters.iter().filter(mine).take(page.limit).cloned().collect())
    }

    async fn dead_letter(&self, id: u64) -> Result<Option<StoredDeadLetter>, TransportError> {
        let dead = self.inner.dead.lock().unwrap_or_else(|p| p.into_inner());
        Ok(dead.letters.iter().find(|d| d.id == id).cloned())
    }

    async fn remove_dead_letter(&self, id: u64) -> Result<bool, TransportError> {
        let mut dead = self.inner.dead.lock().unwrap_or_else(|p| p.into_inner());
        let before = dead.letters.len();
        dead.letters.retain(|d| d.id != id);
        Ok(dead.letters.len() < before)
    }
}

struct MemoryAcker {
    transport: MemoryTransport,
    topic: String,
    group: String,
    offset: u64,
    settled: bool,
}

impl MemoryAcker {
    fn finish(&mut self, how: Settle) {
        self.settled = true;
        self.transport.settle(&self.topic, &self.group, self.offset, how);
    }
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(mut self: Box<Self>) -> Result<(), TransportError> {
        self.finish(Settle::Done);
        Ok(())
    }

    async fn nack(mut self: Box<Self>, delay: Duration) -> Result<(), TransportError> {
        self.finish(Settle::Again(delay));
        Ok(())
    }

    async fn attempt_failed(&self) -> Result<(), TransportError> {
        self.transport.attempt_failed(&self.topic, &self.group, self.offset);
        Ok(())
    }

    async fn dead_letter(mut self: Box<Self>, letter: DeadLetter) -> Result<(), TransportError> {
        {
            let mut dead = self.transport.inner.dead.lock().unwrap_or_else(|p| p.into_inner());
            dead.last_id += 1;
            let id = dead.last_id;
            dead.letters.push(StoredDeadLetter { id, group: self.group.clone(), letter });
        }
        self.finish(Settle::Done);
        Ok(())
    }
}

impl Drop for MemoryAcker {
    fn drop(&mut self) {
        // A consumer that dies with a delivery in hand loses nothing: it goes again.
        if !self.settled {
            self.transport.settle(&self.topic, &self.group, self.offset, Settle::Again(Duration::ZERO));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use eda_core::{EventInfo, PendingEvent};
    use futures_util::StreamExt;

    type Hook = Box<dyn FnOnce() + Send>;
    /// What runs once, on a topic, between a subscriber's look at its log and its wait.
    static AFTER_LOOK: Mutex<Vec<(String, Hook)>> = Mutex::new(Vec::new());

    pub(super) fn after_look(topic: &str) {
        let hook = {
            let mut hooks = AFTER_LOOK.lock().unwrap_or_else(|p| p.into_inner());
            let at = hooks.iter().position(|(t, _)| t == topic);
            at.map(|i| hooks.remove(i).1)
        };
        if let Some(hook) = hook {
            hook();
        }
    }

    #[tokio::test]
    async fn a_nack_between_a_look_and_the_wait_still_wakes_the_subscriber() {
        let bus = MemoryTransport::new();
        let sub = Subscription { group: "g".into(), topic: "wakeup".into(), prefetch: 16 };
        let mut event = envelope("a", 1);
        event.topic = "wakeup".into();
        bus.publish(&event).await.expect("publish");
        let mut s = bus.subscribe(&sub).await.expect("subscribe");
        let first = s.next().await.expect("item").expect("delivery");
        // Its acker would settle offset 0 again when dropped; the hook settles it instead.
        std::mem::forget(first);
        let nacker = bus.clone();
        AFTER_LOOK.lock().expect("hooks").push((
            "wakeup".into(),
            Box::new(move || nacker.settle("wakeup", "g", 0, Settle::Again(Duration::from_millis(20)))),
        ));
        // The subscriber finds nothing, then the nack lands before it waits: it must still come.
        let again = tokio::time::timeout(Duration::from_secs(2), s.next()).await;
        let again = again.expect("the nacked event is delivered again").expect("item").expect("delivery");
        assert_eq!(again.attempt, 2);
    }

    fn envelope(key: &str, n: u32) -> Envelope {
        let info = EventInfo { name: "T", version: 1, ce_type: "T.v1", topic: "t", path: "tests::T" };
        let data = n.to_string().into_bytes();
        Envelope::root("test", PendingEvent { info, key: Some(key.into()), data }, None)
    }

    fn sub(group: &str) -> Subscription {
        Subscription { group: group.into(), topic: "t".into(), prefetch: 16 }
    }

    /// A log holding a:1, a:2 and b:3, and group `g` subscribed to it.
    async fn a1_a2_b3() -> (MemoryTransport, Deliveries) {
        let bus = MemoryTransport::new();
        for (k, n) in [("a", 1), ("a", 2), ("b", 3)] {
            bus.publish(&envelope(k, n)).await.expect("publish");
        }
        let s = bus.subscribe(&sub("g")).await.expect("subscribe");
        (bus, s)
    }

    /// The runtime trusts this (`sequences_keys`): an event handed back with a delay keeps its
    /// key, so the key's later events wait for it while other keys go on.
    #[tokio::test]
    async fn an_event_handed_back_with_a_delay_keeps_its_key() {
        let (_bus, mut s) = a1_a2_b3().await;
        let first = s.next().await.expect("item").expect("delivery");
        assert_eq!(first.envelope.data, b"1");
        first.nack(Duration::from_millis(200)).await.expect("nack");
        let handed_back = Instant::now();
        let other = s.next().await.expect("item").expect("delivery");
        assert_eq!(other.envelope.data, b"3", "a:2 waits behind a:1, b goes on");
        other.ack().await.expect("ack");
        let again = s.next().await.expect("item").expect("delivery");
        assert_eq!((again.envelope.data.as_slice(), again.attempt), (b"1".as_slice(), 2));
        assert!(handed_back.elapsed() >= Duration::from_millis(190), "{:?}", handed_back.elapsed());
        again.ack().await.expect("ack");
        let last = s.next().await.expect("item").expect("delivery");
        assert_eq!(last.envelope.data, b"2");
    }

    #[tokio::test]
    async fn same_key_waits_for_the_unsettled_event_and_other_keys_do_not() {
        let (bus, mut s) = a1_a2_b3().await;
        let first = s.next().await.expect("item").expect("delivery");
        let second = s.next().await.expect("item").expect("delivery");
        assert_eq!(first.envelope.data, b"1");
        assert_eq!(second.envelope.data, b"3", "a:2 is held behind a:1");
        first.nack(Duration::ZERO).await.expect("nack");
        let again = s.next().await.expect("item").expect("delivery");
        assert_eq!((again.envelope.data.as_slice(), again.attempt), (b"1".as_slice(), 2));
        drop(again); // dropped unsettled: goes again
        let third = s.next().await.expect("item").expect("delivery");
        assert_eq!((third.envelope.data.as_slice(), third.attempt), (b"1".as_slice(), 3));
        third.ack().await.expect("ack");
        let fourth = s.next().await.expect("item").expect("delivery");
        assert_eq!(fourth.envelope.data, b"2");
        assert_eq!(bus.lag("g", "t").await.expect("lag")[0].lag, 2);
        fourth.ack().await.expect("ack");
        second.ack().await.expect("ack");
        assert_eq!(bus.lag("g", "t").await.expect("lag")[0].lag, 0);
        assert_eq!(bus.lag("other", "t").await.expect("lag")[0].lag, 3);
    }

    #[tokio::test]
    async fn a_full_log_makes_publishers_wait_for_the_slowest_group_and_lets_emitted_events_in() {
        let bus = MemoryTransport::with_capacity(2);
        let mut s = bus.subscribe(&sub("g")).await.expect("subscribe");
        for n in 0..2 {
            bus.publish(&envelope(&format!("k{n}"), n)).await.expect("room");
        }
        let third = envelope("k2", 2);
        let waiting = tokio::time::timeout(Duration::from_millis(100), bus.publish(&third)).await;
        assert!(waiting.is_err(), "the log is full and nothing is settled: the publisher waits");
        // A handler's emitted event has a cause: it goes in all the same.
        let mut emitted = envelope("k9", 9);
        emitted.causation_id = Some(third.id);
        bus.publish(&emitted).await.expect("emitted events do not wait");
        assert_eq!(bus.len("t"), 3);
        let publisher = tokio::spawn({
            let bus = bus.clone();
            async move { bus.publish(&third).await }
        });
        let first = s.next().await.expect("item").expect("delivery");
        first.ack().await.expect("ack");
        let second = s.next().await.expect("item").expect("delivery");
        second.ack().await.expect("ack");
        tokio::time::timeout(Duration::from_secs(2), publisher)
            .await
            .expect("room once the group moved on")
            .expect("joined")
            .expect("published");
        assert!(bus.len("t") <= 3, "settled events went: {}", bus.len("t"));
        assert_eq!(bus.lag("g", "t").await.expect("lag")[0].lag, 2);
    }

    #[tokio::test]
    async fn a_topic_no_group_reads_keeps_its_newest_events() {
        let bus = MemoryTransport::with_capacity(3);
        for n in 0..10 {
            bus.publish(&envelope("k", n)).await.expect("never waits without a group");
        }
        assert_eq!(bus.len("t"), 3);
        // A group joining now starts at the oldest event held.
        let mut s = bus.subscribe(&sub("late")).await.expect("subscribe");
        let first = s.next().await.expect("item").expect("delivery");
        assert_eq!(first.envelope.data, b"7");
    }
}
