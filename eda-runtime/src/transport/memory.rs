//! The in-process transport: a log per topic with consumer groups, in memory.
//!
//! It behaves as the durable transports do, minus durability: every group gets every event of
//! a topic from the beginning of the log; the subscriptions of one group share the events; an
//! event is handed to a group only when no earlier event of its key is still unsettled there,
//! so per-key order holds across competing consumers and redeliveries; a delivery that is
//! nacked, or dropped unsettled, is delivered again.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use eda_core::{
    Acker, DeadLetter, DeadLetterStore, Deliveries, Delivery, Envelope, Page, PartitionLag, StoredDeadLetter,
    Subscription, Transport, TransportError,
};
use tokio::sync::Notify;
use tokio::time::Instant;

/// How many events a group may pass over because their key is held by an unsettled earlier
/// event, before it stops reading further ahead (bounds the memory one poison key can pin).
const MAX_HELD_BACK: usize = 10_000;

/// The in-process transport. Clones share the same log.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use eda::transport::MemoryTransport;
/// use eda::Transport;
///
/// let bus = MemoryTransport::new();
/// assert!(bus.lag("billing", "orders").await?.iter().all(|p| p.lag == 0));
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct MemoryTransport {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    topics: Mutex<HashMap<String, TopicLog>>,
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

#[derive(Default)]
struct TopicLog {
    events: Vec<Arc<Envelope>>,
    groups: HashMap<String, GroupCursor>,
    notify: Arc<Notify>,
}

/// Where one consumer group stands on one topic.
#[derive(Default)]
struct GroupCursor {
    /// Every offset below this one is settled.
    committed: u64,
    /// Offsets at or above `committed` that are settled.
    settled_ahead: BTreeSet<u64>,
    /// The next offset never looked at.
    next: u64,
    /// Offsets passed over because their key was held, queued per key in log order.
    held_back: HashMap<String, VecDeque<u64>>,
    /// How many offsets `held_back` holds.
    held_count: usize,
    /// Offsets whose key was released: deliverable, oldest first.
    released: BTreeSet<u64>,
    /// Nacked offsets: when they may go again, and their next attempt number.
    retry: BTreeMap<u64, (Instant, u32)>,
    /// Offsets handed out and not yet settled, with their attempt number.
    in_flight: HashMap<u64, u32>,
    /// The offset that holds each key (in flight or waiting for redelivery).
    key_holder: HashMap<String, u64>,
    /// Failed handler attempts of unsettled offsets.
    failures: HashMap<u64, u32>,
}

impl GroupCursor {
    /// The next deliverable offset and its attempt number, or when to look again. Every step
    /// is logarithmic in the backlog: no scan over what waits.
    fn take_next(&mut self, events: &[Arc<Envelope>], now: Instant) -> Result<(u64, u32), Option<Instant>> {
        let ready = self.retry.iter().find(|(_, (at, _))| *at <= now).map(|(o, (_, attempt))| (*o, *attempt));
        if let Some((offset, attempt)) = ready {
            self.retry.remove(&offset);
            return Ok(self.hand_out(offset, attempt, events));
        }
        if let Some(offset) = self.released.pop_first() {
            return Ok(self.hand_out(offset, 1, events));
        }
        while (self.next as usize) < events.len() && self.held_count < MAX_HELD_BACK {
            let offset = self.next;
            self.next += 1;
            match key_of(events, offset) {
                Some(k) if self.key_holder.contains_key(k) => {
                    self.held_back.entry(k.clone()).or_default().push_back(offset);
                    self.held_count += 1;
                }
                _ => return Ok(self.hand_out(offset, 1, events)),
            }
        }
        Err(self.retry.values().map(|(at, _)| *at).min())
    }

    fn hand_out(&mut self, offset: u64, attempt: u32, events: &[Arc<Envelope>]) -> (u64, u32) {
        if let Some(k) = key_of(events, offset) {
            self.key_holder.insert(k.clone(), offset);
        }
        self.in_flight.insert(offset, attempt);
        (offset, attempt)
    }

    fn settle(&mut self, offset: u64, events: &[Arc<Envelope>]) {
        self.in_flight.remove(&offset);
        self.failures.remove(&offset);
        if let Some(k) = key_of(events, offset) {
            if self.key_holder.get(k) == Some(&offset) {
                // The key passes to the oldest event waiting for it, if any.
                let next = self.held_back.get_mut(k).and_then(VecDeque::pop_front);
                match next {
                    Some(waiting) => {
                        self.held_count -= 1;
                        self.key_holder.insert(k.clone(), waiting);
                        self.released.insert(waiting);
                    }
                    None => {
                        self.key_holder.remove(k);
                    }
                }
                if self.held_back.get(k).is_some_and(VecDeque::is_empty) {
                    self.held_back.remove(k);
                }
            }
        }
        self.settled_ahead.insert(offset);
        while self.settled_ahead.remove(&self.committed) {
            self.committed += 1;
        }
    }

    fn requeue(&mut self, offset: u64, at: Instant) {
        if let Some(attempt) = self.in_flight.remove(&offset) {
            self.retry.insert(offset, (at, attempt.saturating_add(1)));
        }
    }
}

fn key_of(events: &[Arc<Envelope>], offset: u64) -> Option<&String> {
    events.get(offset as usize).and_then(|e| e.subject.as_ref())
}

impl MemoryTransport {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    fn topics(&self) -> MutexGuard<'_, HashMap<String, TopicLog>> {
        // No code path panics while holding the lock; recover the data if one ever does.
        self.inner.topics.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many events `topic` holds.
    pub fn len(&self, topic: &str) -> usize {
        self.topics().get(topic).map_or(0, |t| t.events.len())
    }

    /// True when no event was ever published on `topic`.
    pub fn is_empty(&self, topic: &str) -> bool {
        self.len(topic) == 0
    }

    fn settle(&self, topic: &str, group: &str, offset: u64, how: Settle) {
        let mut topics = self.topics();
        let Some(log) = topics.get_mut(topic) else { return };
        let TopicLog { events, groups, notify } = log;
        let Some(cursor) = groups.get_mut(group) else { return };
        match how {
            Settle::Done => cursor.settle(offset, events),
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
                let cursor = log.groups.entry(group.to_owned()).or_default();
                match cursor.take_next(&log.events, Instant::now()) {
                    Ok((offset, attempt)) => {
                        let envelope = log.events[offset as usize].clone();
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

    async fn publish(&self, envelope: &Envelope) -> Result<(), TransportError> {
        let mut topics = self.topics();
        let log = topics.entry(envelope.topic.clone()).or_default();
        log.events.push(Arc::new(envelope.clone()));
        log.notify.notify_waiters();
        Ok(())
    }

    async fn subscribe(&self, subscription: &Subscription) -> Result<Deliveries, TransportError> {
        let (topic, group) = (subscription.topic.clone(), subscription.group.clone());
        // The topic's wake-up, taken once for the subscription's life (a log is never removed).
        let notify = {
            let mut topics = self.topics();
            let log = topics.entry(topic.clone()).or_default();
            log.groups.entry(group.clone()).or_default();
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
            let committed = log.groups.get(group).map_or(0, |c| c.committed);
            log.events.len() as u64 - committed
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

    #[tokio::test]
    async fn same_key_waits_for_the_unsettled_event_and_other_keys_do_not() {
        let bus = MemoryTransport::new();
        for (k, n) in [("a", 1), ("a", 2), ("b", 3)] {
            bus.publish(&envelope(k, n)).await.expect("publish");
        }
        let mut s = bus.subscribe(&sub("g")).await.expect("subscribe");
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
}
