//! One owned partition: a window of its events in flight, per-key lanes, and settlement of the
//! contiguous done prefix.
//!
//! Events are read in offset order into the window (at most `window` of them unsettled). An
//! event whose key has no event out goes out at once; one whose key has an event out (or a
//! retry waiting) waits in its key's lane, in offset order. When an event is done, the next of
//! its lane goes out; when one comes back (the runtime hands it back, or drops it), it goes to
//! the front of its lane and out again after its delay, so no later event of its key overtakes
//! it while other keys run on. The lowest offsets that are done are settled together, a batch at
//! a time, never past one still in flight.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use eda_core::{Acker, DeadLetter, DeadLetterReason, Delivery, Envelope, TransportError};
use futures_util::{FutureExt, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::{EngineOptions, Fetched, Opened, PartitionLog};

/// How long a done prefix waits to be settled with what follows it.
const SETTLE_DELAY: Duration = Duration::from_millis(2);
/// How long a dead letter that could not be written waits before its event goes out again.
const DEAD_LETTER_RETRY: Duration = Duration::from_secs(5);

/// What the owner of a partition wants of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Control {
    /// Keep consuming.
    Run,
    /// Hand it over: take nothing more, let what is out finish (up to the handover timeout),
    /// settle what is done, stop.
    Release,
    /// The lease is gone: stop at once, settle nothing more.
    Abandon,
}

/// How a partition's run ended.
#[derive(Debug)]
pub(crate) enum Ended {
    /// Handed over, with everything done settled.
    Released,
    /// Stopped without settling: the lease lapsed or was taken.
    Lost,
    /// Reading failed; what was done is settled, and the partition can be opened again.
    Failed(TransportError),
}

/// Until when the lease of a partition holds, as its owner last renewed it. Nothing is settled
/// past that instant: by then another instance may hold the partition.
#[derive(Debug)]
pub(crate) struct Fence(Mutex<Instant>);

impl Fence {
    pub(crate) fn new(until: Instant) -> Self {
        Self(Mutex::new(until))
    }

    pub(crate) fn extend(&self, until: Instant) {
        let mut held = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *held = (*held).max(until);
    }

    pub(crate) fn holds(&self) -> bool {
        Instant::now() < *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Everything one run of a partition needs.
pub(crate) struct PartitionRun<L: PartitionLog> {
    pub log: Arc<L>,
    pub transport: &'static str,
    pub partition: u32,
    pub options: EngineOptions,
    pub deliveries: mpsc::Sender<Result<Delivery, eda_core::TransportError>>,
    pub control: watch::Receiver<Control>,
    pub fence: Arc<Fence>,
    /// The settled point, for the lease record.
    pub floor: Arc<AtomicU64>,
    /// Whether events are out, for the lease record.
    pub busy: Arc<AtomicBool>,
    /// The attempt number of the first event read: above 1 when earlier owners died holding
    /// one. Then events go out one at a time until the first is settled, so that if this owner
    /// dies too, the event it held is the one to blame.
    pub first_attempt: u32,
}

/// How the runtime settled a delivery.
enum Settled {
    Done,
    Back(Duration),
    Dead(DeadLetterReason, u32),
}

type SettleTx = mpsc::UnboundedSender<(u64, Settled)>;

/// Settles one delivery through its partition's run. Settling only queues the word: the run
/// settles on the broker in batches. Dropped unsettled, the delivery goes back to its lane.
struct EngineAcker {
    offset: u64,
    transport: &'static str,
    run: Option<SettleTx>,
}

impl EngineAcker {
    fn send(&mut self, how: Settled) -> Result<(), TransportError> {
        let run = self.run.take().ok_or(TransportError::Closed(self.transport))?;
        run.send((self.offset, how)).map_err(|_| TransportError::Closed(self.transport))
    }
}

impl Drop for EngineAcker {
    fn drop(&mut self) {
        if let Some(run) = self.run.take() {
            let _ = run.send((self.offset, Settled::Back(Duration::ZERO)));
        }
    }
}

#[async_trait]
impl Acker for EngineAcker {
    async fn ack(mut self: Box<Self>) -> Result<(), TransportError> {
        self.send(Settled::Done)
    }

    async fn nack(mut self: Box<Self>, delay: Duration) -> Result<(), TransportError> {
        self.send(Settled::Back(delay))
    }

    async fn dead_letter(mut self: Box<Self>, letter: DeadLetter) -> Result<(), TransportError> {
        self.send(Settled::Dead(letter.reason, letter.attempts))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// In its lane, or waiting for its delay.
    Waiting,
    /// Queued to go out.
    Ready,
    /// Handed to the runtime.
    Out,
    Done,
}

struct Slot<M> {
    message: M,
    envelope: Option<Arc<Envelope>>,
    attempt: u32,
    state: State,
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
    slots: BTreeMap<u64, Slot<M>>,
    lanes: HashMap<String, Lane>,
    ready: VecDeque<u64>,
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    out: usize,
    /// Every offset up to this one is done.
    settled: u64,
    /// The message at `settled`, while the broker has not been told.
    unsent: Option<M>,
    /// How many offsets `unsent` settles.
    unsent_count: usize,
    first_attempt: u32,
    /// One event out at a time, until one is done (see `PartitionRun::first_attempt`).
    cautious: bool,
    draining: bool,
}

impl<M> Window<M> {
    pub(crate) fn new(floor: u64, first_attempt: u32) -> Self {
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

    fn len(&self) -> usize {
        self.slots.len()
    }

    /// Takes a message read from the partition. Returns it back (with its attempt) when it must
    /// be dead-lettered at once: it is not an event, or earlier owners died on it too often.
    fn admit(&mut self, fetched: Fetched<M>, max_deliver: u32) -> Option<(u64, DeadLetterReason, u32)> {
        let Fetched { offset, event, message } = fetched;
        if offset <= self.settled || self.slots.contains_key(&offset) {
            // The broker delivered again what this window holds or settled.
            return None;
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
        self.slots.insert(offset, Slot { message, envelope, attempt, state: State::Waiting, due: None });
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

    /// The next event to hand out, as a delivery settled through `settle`.
    fn next_out(&mut self, partition: u32, transport: &'static str, settle: &SettleTx) -> Option<Delivery> {
        if self.cautious && self.out > 0 {
            return None;
        }
        while let Some(offset) = self.ready.pop_front() {
            let Some(slot) = self.slots.get_mut(&offset) else { continue };
            let Some(envelope) = slot.envelope.clone().filter(|_| slot.state == State::Ready) else { continue };
            slot.state = State::Out;
            self.out += 1;
            let acker = EngineAcker { offset, transport, run: Some(settle.clone()) };
            return Some(Delivery::new(envelope, slot.attempt, partition, Box::new(acker)));
        }
        None
    }

    fn has_ready(&self) -> bool {
        !(self.ready.is_empty() || self.cautious && self.out > 0)
    }

    /// The event at `offset` is done (handled, or dead-lettered).
    fn done(&mut self, offset: u64) {
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

    /// The event at `offset` came back: out again after `delay`, before the rest of its key.
    /// Returns it when it came back more than `max_deliver` times: it is dead-lettered.
    fn back(&mut self, offset: u64, delay: Duration, max_deliver: u32) -> Option<(DeadLetterReason, u32)> {
        let now = Instant::now();
        let slot = self.slots.get_mut(&offset)?;
        if slot.state != State::Out {
            return None;
        }
        self.out -= 1;
        slot.state = State::Waiting;
        slot.attempt = slot.attempt.saturating_add(1);
        if slot.attempt > max_deliver {
            let error = format!(
                "delivered {} times without being settled: handed back each time (max_deliver {max_deliver})",
                slot.attempt - 1
            );
            return Some((DeadLetterReason { handler: None, error, permanent: false }, slot.attempt - 1));
        }
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
        None
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
    fn next_due(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((at, _))| *at)
    }

    /// Lets the delayed events whose time has come go out.
    fn release_due(&mut self) {
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
    fn drain(&mut self) {
        self.draining = true;
        for offset in self.ready.drain(..) {
            if let Some(slot) = self.slots.get_mut(&offset) {
                slot.state = State::Waiting;
            }
        }
    }
}

/// How many messages already read or words already sent are taken in one go, before the loop
/// looks at everything else again.
const BURST: usize = 64;

/// Runs one owned partition until it is released, lost, or its reading fails.
pub(crate) async fn run<L: PartitionLog>(mut run: PartitionRun<L>, opened: Opened<L::Message>) -> Ended {
    let Opened { floor, messages, .. } = opened;
    let mut messages = Some(messages);
    let mut window: Window<L::Message> = Window::new(floor, run.first_attempt);
    run.floor.store(floor, Ordering::Relaxed);
    let (settle_tx, mut settle_rx) = mpsc::unbounded_channel();
    let batch = (run.options.window / 4).max(1);
    let mut settle_at: Option<Instant> = None;
    let mut drain_until: Option<Instant> = None;
    let mut failure: Option<TransportError> = None;
    let deliveries = run.deliveries.clone();
    // One timer for every deadline (settling, a delayed event, the drain), reset only when the
    // earliest moves: a timer made anew at every turn of the loop costs more than the turn.
    let mut timer = Box::pin(tokio::time::sleep_until(Instant::now()));
    let mut timer_at: Option<Instant> = None;
    let mut control = Box::pin(changed(run.control.clone()));
    loop {
        if drain_until.is_none() && (*run.control.borrow() != Control::Run || deliveries.is_closed()) {
            if *run.control.borrow() == Control::Abandon {
                return Ended::Lost;
            }
            drain_until = Some(Instant::now() + run.options.handover_timeout);
        }
        if let Some(until) = drain_until {
            if !window.draining {
                window.drain();
                messages = None;
            }
            if window.out == 0 || Instant::now() >= until {
                break;
            }
        }
        if window.unsent_count >= batch || (window.unsent.is_some() && drain_until.is_some()) {
            settle_at = Some(Instant::now());
        }
        let earliest = [settle_at, window.next_due(), drain_until].into_iter().flatten().min();
        if earliest != timer_at {
            if let Some(at) = earliest {
                timer.as_mut().reset(at);
            }
            timer_at = earliest;
        }
        let room = window.len() < run.options.window;
        tokio::select! {
            biased;
            still = &mut control => {
                // Seen: the next wait is for the change after this one.
                if !still || *run.control.borrow_and_update() == Control::Abandon {
                    return Ended::Lost;
                }
                control = Box::pin(changed(run.control.clone()));
            }
            Some((offset, how)) = settle_rx.recv() => {
                settled(&run, &mut window, offset, how).await;
                // Take the words already queued before looking at the broker again.
                for _ in 0..BURST * 4 {
                    let Ok((offset, how)) = settle_rx.try_recv() else { break };
                    settled(&run, &mut window, offset, how).await;
                }
            }
            () = &mut timer, if timer_at.is_some() => {
                timer_at = None;
                let now = Instant::now();
                if settle_at.is_some_and(|at| at <= now) {
                    settle_at = None;
                    if !settle(&run, &mut window, false).await {
                        return Ended::Lost;
                    }
                }
                window.release_due();
            }
            permit = deliveries.reserve(), if window.has_ready() && drain_until.is_none() => {
                let Ok(permit) = permit else { continue };
                let Some(delivery) = window.next_out(run.partition, run.transport, &settle_tx) else { continue };
                permit.send(Ok(delivery));
                for _ in 0..BURST {
                    if !window.has_ready() {
                        break;
                    }
                    let Ok(permit) = deliveries.try_reserve() else { break };
                    let Some(delivery) = window.next_out(run.partition, run.transport, &settle_tx) else { break };
                    permit.send(Ok(delivery));
                }
            }
            read = next_message(&mut messages), if room && drain_until.is_none() => {
                let mut read = Some(read);
                let mut taken = 0;
                while let Some(next) = read.take() {
                    match next {
                        Some(Ok(fetched)) => {
                            if !admit(&run, &mut window, fetched).await {
                                failure = Some(TransportError::Closed(run.transport));
                                drain_until = Some(Instant::now() + run.options.handover_timeout);
                                break;
                            }
                        }
                        Some(Err(e)) => {
                            tracing::warn!(partition = run.partition, error = %e, "reading the partition failed; it is opened again from its settled point");
                            failure = Some(e);
                            drain_until = Some(Instant::now() + run.options.handover_timeout);
                            break;
                        }
                        None => {
                            failure = Some(TransportError::Closed(run.transport));
                            drain_until = Some(Instant::now() + run.options.handover_timeout);
                            break;
                        }
                    }
                    // What has arrived already is taken without another turn of the loop.
                    taken += 1;
                    if taken < BURST && window.len() < run.options.window {
                        read = next_message(&mut messages).now_or_never();
                    }
                }
            }
        }
        if window.unsent.is_some() && settle_at.is_none() {
            settle_at = Some(Instant::now() + SETTLE_DELAY);
        }
        run.floor.store(window.settled, Ordering::Relaxed);
        run.busy.store(window.len() > 0, Ordering::Relaxed);
    }
    if !settle(&run, &mut window, true).await || window.unsent.is_some() {
        // Not confirmed: the lease lapses rather than being given back, so no next owner
        // re-creates the partition's consumer while these acks may still be on their way.
        return Ended::Lost;
    }
    match failure {
        Some(e) => Ended::Failed(e),
        None => Ended::Released,
    }
}

/// Takes one message read; false when the partition must be read again (a message that is
/// not an event could not be kept as a dead letter).
async fn admit<L: PartitionLog>(
    run: &PartitionRun<L>,
    window: &mut Window<L::Message>,
    fetched: Fetched<L::Message>,
) -> bool {
    let Some((offset, reason, attempts)) = window.admit(fetched, run.options.max_deliver) else { return true };
    tracing::error!(partition = run.partition, offset, error = %reason.error, "dead-lettered by the engine");
    // Not an event, and not kept: read it again later rather than lose it.
    dead_letter(run, window, offset, &reason, attempts).await
        || window.slots.get(&offset).is_none_or(|s| s.envelope.is_some())
}

/// Resolves when the owner's word changes; false when the owner is gone.
async fn changed(mut control: watch::Receiver<Control>) -> bool {
    control.changed().await.is_ok()
}

type Messages<M> = std::pin::Pin<Box<dyn futures_core::Stream<Item = Result<Fetched<M>, TransportError>> + Send>>;

async fn next_message<M>(messages: &mut Option<Messages<M>>) -> Option<Result<Fetched<M>, TransportError>> {
    match messages {
        Some(m) => m.next().await,
        None => std::future::pending().await,
    }
}

/// Tells the broker the done prefix. False when the lease no longer holds: nothing is settled.
async fn settle<L: PartitionLog>(run: &PartitionRun<L>, window: &mut Window<L::Message>, confirm: bool) -> bool {
    let Some(message) = window.unsent.take() else { return true };
    if !run.fence.holds() {
        tracing::warn!(
            partition = run.partition,
            "the lease lapsed before its done events were settled; the next owner handles them again"
        );
        return false;
    }
    let count = std::mem::take(&mut window.unsent_count);
    if let Err(e) = run.log.settle(&message, confirm).await {
        // Not settled: the next reader of the partition gets these again; guards absorb them.
        tracing::warn!(partition = run.partition, error = %e, "could not settle a done prefix");
        window.unsent = Some(message);
        window.unsent_count = count;
    }
    run.floor.store(window.settled, Ordering::Relaxed);
    true
}

/// Takes the runtime's word on one delivery.
async fn settled<L: PartitionLog>(run: &PartitionRun<L>, window: &mut Window<L::Message>, offset: u64, how: Settled) {
    match how {
        Settled::Done => window.done(offset),
        Settled::Back(delay) => {
            if let Some((reason, attempts)) = window.back(offset, delay, run.options.max_deliver) {
                tracing::error!(partition = run.partition, offset, error = %reason.error, "dead-lettered by the engine");
                dead_letter(run, window, offset, &reason, attempts).await;
            }
        }
        Settled::Dead(reason, attempts) => {
            dead_letter(run, window, offset, &reason, attempts).await;
        }
    }
}

async fn dead_letter<L: PartitionLog>(
    run: &PartitionRun<L>,
    window: &mut Window<L::Message>,
    offset: u64,
    reason: &DeadLetterReason,
    attempts: u32,
) -> bool {
    let Some(slot) = window.slots.get(&offset) else { return true };
    // Past the fence the next owner may have the event: a dead letter here could double its
    // handling. It waits like one that could not be written (the fence may hold again after a
    // late renewal; if not, the run ends as lost).
    let kept = match run.fence.holds() {
        true => run.log.dead_letter(&slot.message, reason, attempts).await,
        false => Err(TransportError::Closed(run.transport)),
    };
    match kept {
        Ok(()) => {
            window.done(offset);
            true
        }
        Err(e) => {
            tracing::warn!(partition = run.partition, offset, error = %e, "could not keep a dead letter; the event goes out again later");
            if let Some(slot) = window.slots.get_mut(&offset) {
                if slot.state == State::Waiting && slot.envelope.is_some() {
                    // Read, never handed out: as if it had come back.
                    slot.state = State::Out;
                    window.out += 1;
                }
            }
            // Without a limit: this event must not be lost for want of a dead-letter store.
            window.back(offset, DEAD_LETTER_RETRY, u32::MAX);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    fn event(key: &str, n: u32) -> Envelope {
        let info = eda_core::EventInfo { name: "T", version: 1, ce_type: "T.v1", topic: "t" };
        let data = serde_json::to_vec(&n).unwrap_or_default();
        Envelope::root("test", eda_core::PendingEvent { info, key: Some(key.to_owned()), data }, None)
    }

    fn fetched(offset: u64, key: &str) -> Fetched<u64> {
        Fetched { offset, event: Ok(event(key, offset as u32)), message: offset }
    }

    fn out(w: &mut Window<u64>, tx: &SettleTx) -> Vec<u64> {
        let mut v = Vec::new();
        while let Some(d) = w.next_out(0, "test", tx) {
            let n: u64 = serde_json::from_slice(&d.envelope.data).unwrap_or(0);
            std::mem::forget(d); // settled by hand in these tests
            v.push(n);
        }
        v
    }

    #[test]
    fn one_event_of_a_key_out_at_a_time_and_other_keys_run_on() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let mut w = Window::new(0, 1);
        for (o, k) in [(1, "a"), (2, "a"), (3, "b"), (4, "a"), (5, "c")] {
            assert!(w.admit(fetched(o, k), 20).is_none());
        }
        assert_eq!(out(&mut w, &tx), vec![1, 3, 5]);
        w.done(3);
        assert_eq!(w.settled, 0, "offset 1 is still out");
        w.done(1);
        assert_eq!(out(&mut w, &tx), vec![2]);
        assert_eq!(w.settled, 1);
        w.done(2);
        w.done(5);
        assert_eq!(out(&mut w, &tx), vec![4]);
        assert_eq!(w.settled, 3, "never past 4, which is out");
        w.done(4);
        assert_eq!((w.settled, w.unsent, w.unsent_count), (5, Some(5), 5));
    }

    #[test]
    fn an_event_that_comes_back_holds_its_key_only() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let mut w = Window::new(10, 1);
        for (o, k) in [(11, "a"), (12, "b"), (13, "a")] {
            w.admit(fetched(o, k), 20);
        }
        assert_eq!(out(&mut w, &tx), vec![11, 12]);
        w.back(11, Duration::from_secs(3600), 20);
        assert!(out(&mut w, &tx).is_empty(), "13 must not overtake 11");
        w.done(12);
        w.admit(fetched(14, "b"), 20);
        assert_eq!(out(&mut w, &tx), vec![14], "other keys run on");
        assert_eq!(w.settled, 10);
        w.back(14, Duration::ZERO, 20);
        assert_eq!(out(&mut w, &tx), vec![14], "at once when it asks no delay");
        assert_eq!(w.slots.get(&14).map(|s| s.attempt), Some(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_delayed_event_goes_out_when_its_time_comes_then_its_successors() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let mut w = Window::new(0, 1);
        w.admit(fetched(1, "a"), 20);
        w.admit(fetched(2, "a"), 20);
        assert_eq!(out(&mut w, &tx), vec![1]);
        w.back(1, Duration::from_secs(5), 20);
        tokio::time::advance(Duration::from_secs(4)).await;
        w.release_due();
        assert!(out(&mut w, &tx).is_empty());
        tokio::time::advance(Duration::from_secs(2)).await;
        w.release_due();
        assert_eq!(out(&mut w, &tx), vec![1]);
        w.done(1);
        assert_eq!(out(&mut w, &tx), vec![2]);
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
        let not_an_event = Fetched { offset: 8, event: Err("not JSON".into()), message: 8 };
        assert!(w.admit(not_an_event, 20).is_some_and(|(_, r, _)| r.permanent));
    }

    #[test]
    fn after_owners_died_on_it_events_go_out_one_at_a_time_until_one_is_done() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let mut w = Window::new(0, 3);
        for (o, k) in [(1, "a"), (2, "b"), (3, "c")] {
            assert!(w.admit(fetched(o, k), 20).is_none());
        }
        assert_eq!(out(&mut w, &tx), vec![1], "only the suspect");
        assert_eq!(w.slots.get(&1).map(|s| s.attempt), Some(3));
        w.done(1);
        assert_eq!(out(&mut w, &tx), vec![2, 3], "then the window opens");
    }

    /// A log in memory: what was settled and dead-lettered, by offset.
    #[derive(Default)]
    struct FakeLog {
        settled: Mutex<Vec<u64>>,
        dead: Mutex<Vec<u64>>,
    }

    #[async_trait]
    impl PartitionLog for FakeLog {
        type Message = u64;

        fn partitions(&self) -> u32 {
            1
        }

        async fn open(&self, _: u32, _: usize, _: super::super::Resume, _: u64) -> Result<Opened<u64>, TransportError> {
            Err(TransportError::Closed("fake"))
        }

        async fn settle(&self, message: &u64, _confirm: bool) -> Result<(), TransportError> {
            self.settled.lock().unwrap_or_else(|p| p.into_inner()).push(*message);
            Ok(())
        }

        async fn dead_letter(&self, message: &u64, _: &DeadLetterReason, _: u32) -> Result<(), TransportError> {
            self.dead.lock().unwrap_or_else(|p| p.into_inner()).push(*message);
            Ok(())
        }
    }

    /// The log, the owner's word, the deliveries and the run.
    type Started = (
        Arc<FakeLog>,
        watch::Sender<Control>,
        mpsc::Receiver<Result<Delivery, TransportError>>,
        tokio::task::JoinHandle<Ended>,
    );

    /// A run over events at offsets 1, 2, … with these keys, and what it hands out.
    fn start(keys: &[&str], fence: Instant, handover: Duration) -> Started {
        let log = Arc::new(FakeLog::default());
        let (deliveries, rx) = mpsc::channel(16);
        let (control, control_rx) = watch::channel(Control::Run);
        let options = EngineOptions { handover_timeout: handover, ..EngineOptions::default() };
        let run = PartitionRun {
            log: log.clone(),
            transport: "fake",
            partition: 0,
            options,
            deliveries,
            control: control_rx,
            fence: Arc::new(Fence::new(fence)),
            floor: Arc::default(),
            busy: Arc::default(),
            first_attempt: 1,
        };
        let fetched: Vec<_> = keys.iter().enumerate().map(|(i, k)| Ok(fetched(i as u64 + 1, k))).collect();
        let messages = futures_util::stream::iter(fetched).chain(futures_util::stream::pending());
        let opened = Opened { floor: 0, origin: 0, backlog: true, messages: Box::pin(messages) };
        (log, control, rx, tokio::spawn(run_partition(run, opened)))
    }

    use super::run as run_partition;

    #[tokio::test]
    async fn a_handover_ends_at_its_deadline_while_a_handler_still_runs() {
        let far = Instant::now() + Duration::from_secs(3600);
        let (log, control, mut rx, run) = start(&["a", "b"], far, Duration::from_millis(200));
        let held = rx.recv().await.and_then(Result::ok).expect("a delivery");
        let done = rx.recv().await.and_then(Result::ok).expect("another");
        done.ack().await.expect("ack");
        control.send_replace(Control::Release);
        let ended = tokio::time::timeout(Duration::from_secs(5), run).await.expect("ends by its deadline");
        assert!(matches!(ended, Ok(Ended::Released)), "{ended:?}");
        assert!(log.settled.lock().unwrap_or_else(|p| p.into_inner()).is_empty(), "never past the one still out");
        drop(held);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_letter_refused_past_the_fence_comes_again_instead_of_stalling_its_key() {
        let lapsed = Instant::now();
        let (log, _control, mut rx, _run) = start(&["a", "a"], lapsed, Duration::from_secs(10));
        let first = rx.recv().await.and_then(Result::ok).expect("a delivery");
        let reason = DeadLetterReason { handler: None, error: "gave up".into(), permanent: true };
        first.dead_letter(reason).await.expect("word sent");
        let again = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await.expect("comes again");
        let again = again.and_then(Result::ok).expect("a delivery");
        assert_eq!(again.attempt, 2);
        assert!(log.dead.lock().unwrap_or_else(|p| p.into_inner()).is_empty(), "no dead letter past the fence");
    }

    #[test]
    fn a_dropped_delivery_comes_back() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut w = Window::new(0, 1);
        w.admit(fetched(1, "a"), 20);
        let d = w.next_out(0, "test", &tx);
        drop(d);
        let Ok((offset, Settled::Back(delay))) = rx.try_recv() else { panic!("no word of the drop") };
        assert_eq!((offset, delay), (1, Duration::ZERO));
    }
}
