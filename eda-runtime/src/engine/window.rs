//! The window of one owned partition: the events read and not yet settled, which of them go
//! out next, and the settled point.
//!
//! An event whose key has no event out goes out at once; one whose key has an event out (or a
//! retry waiting) waits in its key's lane, in offset order. When an event is done, the next of
//! its lane goes out; when one comes back, it goes to the front of its lane and out again after
//! its delay, so no later event of its key overtakes it while other keys run on. The lowest
//! offsets that are done form the settled point.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use eda_core::{Acker, DeadLetterReason, Delivery, Envelope};
use tokio::time::Instant;

use super::Fetched;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum State {
    /// In its lane, or waiting for its delay.
    Waiting,
    /// Queued to go out.
    Ready,
    /// Handed to the runtime.
    Out,
    Done,
}

pub(super) struct Slot<M> {
    pub(super) message: M,
    pub(super) envelope: Option<Arc<Envelope>>,
    attempt: u32,
    /// Failed handler attempts (in this owner's time: a crash forgets them, and the strikes
    /// of its lease count the crash instead).
    failures: u32,
    pub(super) state: State,
    /// When it may go out again, after it came back with a delay.
    due: Option<Instant>,
}

/// The events of a key that wait behind the one out (or behind a retry's delay), in order.
#[derive(Default)]
struct Lane {
    /// An event of the key is ready or out.
    busy: bool,
    waiting: VecDeque<u64>,
}

/// The window of one partition: what it holds, what goes out next, what is settled.
pub(crate) struct Window<M> {
    pub(super) slots: BTreeMap<u64, Slot<M>>,
    lanes: HashMap<String, Lane>,
    ready: VecDeque<u64>,
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    pub(super) out: usize,
    /// Every offset up to this one is done.
    pub(super) settled: u64,
    /// The message at `settled`, while the broker has not been told.
    pub(super) unsent: Option<M>,
    /// How many offsets `unsent` settles.
    pub(super) unsent_count: usize,
    first_attempt: u32,
    /// One event out at a time, until one is done (see `PartitionRun::first_attempt`).
    cautious: bool,
    pub(super) draining: bool,
}

impl<M> Window<M> {
    pub(super) fn new(floor: u64, first_attempt: u32) -> Self {
        Self {
            slots: BTreeMap::new(),
            lanes: HashMap::new(),
            ready: VecDeque::new(),
            timers: BinaryHeap::new(),
            out: 0,
            settled: floor,
            unsent: None,
            unsent_count: 0,
            first_attempt: first_attempt.max(1),
            cautious: first_attempt > 1,
            draining: false,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.slots.len()
    }

    /// Takes a message read from the partition. Returns it back (with its attempt) when it must
    /// be dead-lettered at once: it is not an event, or earlier owners died on it too often.
    pub(super) fn admit(&mut self, fetched: Fetched<M>, max_deliver: u32) -> Option<(u64, DeadLetterReason, u32)> {
        let Fetched { offset, event, message, delivered } = fetched;
        if offset <= self.settled || self.slots.contains_key(&offset) {
            // The broker delivered again what this window holds or settled.
            return None;
        }
        if delivered > 0 && self.slots.is_empty() && self.unsent.is_none() {
            // The broker says earlier consumers died holding it: blamed as the lease's strikes are.
            self.first_attempt = self.first_attempt.max(delivered.saturating_add(1));
            self.cautious = true;
        }
        let attempt = if self.slots.is_empty() && self.unsent.is_none() && self.first_attempt > 1 {
            std::mem::replace(&mut self.first_attempt, 1)
        } else {
            self.first_attempt = 1;
            1
        };
        let (envelope, dead) = match event {
            Ok(e) if attempt > max_deliver => (
                Some(Arc::new(e)),
                Some(DeadLetterReason {
                    handler: None,
                    error: format!(
                        "delivered {} times without being settled: the owners of its partition died holding it each time (max_deliver {max_deliver})",
                        attempt - 1
                    ),
                    permanent: false,
                }),
            ),
            Ok(e) => (Some(Arc::new(e)), None),
            Err(why) => (None, Some(DeadLetterReason { handler: None, error: why, permanent: true })),
        };
        self.slots.insert(offset, Slot { message, envelope, attempt, failures: 0, state: State::Waiting, due: None });
        if let Some(reason) = dead {
            return Some((offset, reason, attempt.saturating_sub(1).max(1)));
        }
        let envelope = self.slots.get(&offset).and_then(|s| s.envelope.clone());
        match envelope.as_deref().and_then(|e| e.subject.as_deref()) {
            Some(key) => match self.lanes.get_mut(key) {
                Some(lane) if lane.busy || !lane.waiting.is_empty() => lane.waiting.push_back(offset),
                Some(lane) => {
                    lane.busy = true;
                    self.make_ready(offset);
                }
                None => {
                    self.lanes.insert(key.to_owned(), Lane { busy: true, waiting: VecDeque::new() });
                    self.make_ready(offset);
                }
            },
            None => self.make_ready(offset),
        }
        None
    }

    fn make_ready(&mut self, offset: u64) {
        if let Some(slot) = self.slots.get_mut(&offset) {
            slot.state = State::Ready;
            slot.due = None;
            self.ready.push_back(offset);
        }
    }

    /// The next event to hand out, settled through the acker `acker` makes for its offset.
    pub(super) fn next_out(&mut self, partition: u32, acker: impl FnOnce(u64) -> Box<dyn Acker>) -> Option<Delivery> {
        if self.cautious && self.out > 0 {
            return None;
        }
        while let Some(offset) = self.ready.pop_front() {
            let Some(slot) = self.slots.get_mut(&offset) else { continue };
            let Some(envelope) = slot.envelope.clone().filter(|_| slot.state == State::Ready) else { continue };
            slot.state = State::Out;
            self.out += 1;
            return Some(Delivery::new(envelope, slot.attempt, partition, acker(offset)).with_failures(slot.failures));
        }
        None
    }

    pub(super) fn has_ready(&self) -> bool {
        !(self.ready.is_empty() || self.cautious && self.out > 0)
    }

    /// The event at `offset` is done (handled, or dead-lettered).
    pub(super) fn done(&mut self, offset: u64) {
        let Some(slot) = self.slots.get_mut(&offset) else { return };
        if slot.state == State::Out {
            self.out -= 1;
        }
        slot.state = State::Done;
        slot.due = None;
        self.cautious = false;
        let envelope = slot.envelope.clone();
        if let Some(key) = envelope.as_deref().and_then(|e| e.subject.as_deref()) {
            if let Some(lane) = self.lanes.get_mut(key) {
                lane.busy = false;
            }
            self.next_of_lane(key, Instant::now());
        }
        self.advance();
    }

    /// A handler attempt on the event at `offset` failed.
    pub(super) fn failed(&mut self, offset: u64) {
        if let Some(slot) = self.slots.get_mut(&offset).filter(|s| s.state == State::Out) {
            slot.failures = slot.failures.saturating_add(1);
        }
    }

    /// The event at `offset` came back: out again after `delay`, before the rest of its key.
    /// A hand-back is a delivery, not a failure: only the runtime's retry limit (failures) and
    /// `max_deliver` at admission (owners that died holding it) dead-letter an event.
    pub(super) fn back(&mut self, offset: u64, delay: Duration) {
        let now = Instant::now();
        let Some(slot) = self.slots.get_mut(&offset) else { return };
        if slot.state != State::Out {
            return;
        }
        self.out -= 1;
        slot.state = State::Waiting;
        slot.attempt = slot.attempt.saturating_add(1);
        if !delay.is_zero() {
            slot.due = Some(now + delay);
            self.timers.push(Reverse((now + delay, offset)));
        }
        let envelope = slot.envelope.clone();
        match envelope.as_deref().and_then(|e| e.subject.as_deref()) {
            Some(key) => {
                let lane = self.lanes.entry(key.to_owned()).or_default();
                lane.busy = false;
                lane.waiting.push_front(offset);
                self.next_of_lane(key, now);
            }
            None if delay.is_zero() && !self.draining => self.make_ready(offset),
            None => {}
        }
    }

    /// Sends the first waiting event of `key` out, unless one is out or it must still wait.
    fn next_of_lane(&mut self, key: &str, now: Instant) {
        let Some(lane) = self.lanes.get_mut(key) else { return };
        if lane.busy || self.draining {
            return;
        }
        let Some(&front) = lane.waiting.front() else {
            self.lanes.remove(key);
            return;
        };
        if self.slots.get(&front).and_then(|s| s.due).is_some_and(|due| due > now) {
            return;
        }
        lane.waiting.pop_front();
        lane.busy = true;
        self.make_ready(front);
    }

    /// When the next delayed event may go out.
    pub(super) fn next_due(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((at, _))| *at)
    }

    /// Lets the delayed events whose time has come go out.
    pub(super) fn release_due(&mut self) {
        let now = Instant::now();
        while let Some(&Reverse((at, offset))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(slot) = self.slots.get_mut(&offset) else { continue };
            if slot.state != State::Waiting || slot.due != Some(at) {
                continue;
            }
            slot.due = None;
            let envelope = slot.envelope.clone();
            match envelope.as_deref().and_then(|e| e.subject.as_deref()) {
                Some(key) => self.next_of_lane(key, now),
                None if !self.draining => self.make_ready(offset),
                None => {}
            }
        }
    }

    /// Moves the settled point over the done prefix.
    fn advance(&mut self) {
        while let Some(entry) = self.slots.first_entry() {
            if entry.get().state != State::Done {
                break;
            }
            let (offset, slot) = entry.remove_entry();
            self.settled = offset;
            self.unsent = Some(slot.message);
            self.unsent_count += 1;
        }
    }

    /// Stops handing out: what is ready waits; what is out may still finish.
    pub(super) fn drain(&mut self) {
        self.draining = true;
        for offset in self.ready.drain(..) {
            if let Some(slot) = self.slots.get_mut(&offset) {
                slot.state = State::Waiting;
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    fn event(key: &str, n: u32) -> Envelope {
        let info = eda_core::EventInfo { name: "T", version: 1, ce_type: "T.v1", topic: "t", path: "tests::T" };
        let data = serde_json::to_vec(&n).unwrap_or_default();
        Envelope::root("test", eda_core::PendingEvent { info, key: Some(key.to_owned()), data }, None)
    }

    /// The event at `offset` of key `key`, its payload the offset.
    pub(in crate::engine) fn fetched(offset: u64, key: &str) -> Fetched<u64> {
        Fetched { offset, event: Ok(event(key, offset as u32)), message: offset, delivered: 0 }
    }

    /// An acker for tests that settle by hand.
    struct ByHand;

    #[async_trait::async_trait]
    impl Acker for ByHand {
        async fn ack(self: Box<Self>) -> Result<(), eda_core::TransportError> {
            Ok(())
        }
        async fn nack(self: Box<Self>, _: Duration) -> Result<(), eda_core::TransportError> {
            Ok(())
        }
        async fn dead_letter(self: Box<Self>, _: eda_core::DeadLetter) -> Result<(), eda_core::TransportError> {
            Ok(())
        }
    }

    fn out(w: &mut Window<u64>) -> Vec<u64> {
        let mut v = Vec::new();
        while let Some(d) = w.next_out(0, |_| Box::new(ByHand)) {
            let n: u64 = serde_json::from_slice(&d.envelope.data).unwrap_or(0);
            v.push(n);
        }
        v
    }

    #[test]
    fn one_event_of_a_key_out_at_a_time_and_other_keys_run_on() {
        let mut w = Window::new(0, 1);
        for (o, k) in [(1, "a"), (2, "a"), (3, "b"), (4, "a"), (5, "c")] {
            assert!(w.admit(fetched(o, k), 20).is_none());
        }
        assert_eq!(out(&mut w), vec![1, 3, 5]);
        w.done(3);
        assert_eq!(w.settled, 0, "offset 1 is still out");
        w.done(1);
        assert_eq!(out(&mut w), vec![2]);
        assert_eq!(w.settled, 1);
        w.done(2);
        w.done(5);
        assert_eq!(out(&mut w), vec![4]);
        assert_eq!(w.settled, 3, "never past 4, which is out");
        w.done(4);
        assert_eq!((w.settled, w.unsent, w.unsent_count), (5, Some(5), 5));
    }

    #[test]
    fn an_event_that_comes_back_holds_its_key_only() {
        let mut w = Window::new(10, 1);
        for (o, k) in [(11, "a"), (12, "b"), (13, "a")] {
            w.admit(fetched(o, k), 20);
        }
        assert_eq!(out(&mut w), vec![11, 12]);
        w.back(11, Duration::from_secs(3600));
        assert!(out(&mut w).is_empty(), "13 must not overtake 11");
        w.done(12);
        w.admit(fetched(14, "b"), 20);
        assert_eq!(out(&mut w), vec![14], "other keys run on");
        assert_eq!(w.settled, 10);
        w.back(14, Duration::ZERO);
        assert_eq!(out(&mut w), vec![14], "at once when it asks no delay");
        assert_eq!(w.slots.get(&14).map(|s| s.attempt), Some(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_delayed_event_goes_out_when_its_time_comes_then_its_successors() {
        let mut w = Window::new(0, 1);
        w.admit(fetched(1, "a"), 20);
        w.admit(fetched(2, "a"), 20);
        assert_eq!(out(&mut w), vec![1]);
        w.back(1, Duration::from_secs(5));
        tokio::time::advance(Duration::from_secs(4)).await;
        w.release_due();
        assert!(out(&mut w).is_empty());
        tokio::time::advance(Duration::from_secs(2)).await;
        w.release_due();
        assert_eq!(out(&mut w), vec![1]);
        w.done(1);
        assert_eq!(out(&mut w), vec![2]);
    }

    #[test]
    fn repeats_and_settled_offsets_are_ignored_and_crash_loops_are_caught() {
        let mut w = Window::new(5, 21);
        assert!(w.admit(fetched(4, "a"), 20).is_none());
        assert!(w.slots.is_empty());
        let dead = w.admit(fetched(6, "a"), 20).map(|(o, _, a)| (o, a));
        assert_eq!(dead, Some((6, 20)), "the first event after a run of crashes is dead-lettered");
        assert!(w.admit(fetched(7, "a"), 20).is_none());
        assert_eq!(w.slots.get(&7).map(|s| s.attempt), Some(1));
        assert!(w.admit(fetched(7, "a"), 20).is_none(), "a repeat of 7 changes nothing");
        assert_eq!(w.len(), 2);
        let not_an_event = Fetched { offset: 8, event: Err("not JSON".into()), message: 8, delivered: 0 };
        assert!(w.admit(not_an_event, 20).is_some_and(|(_, r, _)| r.permanent));
    }

    #[test]
    fn after_owners_died_on_it_events_go_out_one_at_a_time_until_one_is_done() {
        let mut w = Window::new(0, 3);
        for (o, k) in [(1, "a"), (2, "b"), (3, "c")] {
            assert!(w.admit(fetched(o, k), 20).is_none());
        }
        assert_eq!(out(&mut w), vec![1], "only the suspect");
        assert_eq!(w.slots.get(&1).map(|s| s.attempt), Some(3));
        w.done(1);
        assert_eq!(out(&mut w), vec![2, 3], "then the window opens");
    }
}
