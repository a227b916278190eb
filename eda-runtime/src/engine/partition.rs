//! One owned partition's run: reading into its [`Window`], handing deliveries to the runtime
//! and taking back its word on each, and settling the done prefix on the broker a batch at a
//! time, never past one still in flight, and never once the lease's fence has passed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use eda_core::{Acker, DeadLetter, DeadLetterReason, Delivery, TransportError};
use futures_util::{FutureExt, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::window::{State, Window};
use super::{EngineOptions, Fetched, Opened, PartitionLog};

/// How long a done prefix waits to be settled with what follows it.
const SETTLE_DELAY: Duration = Duration::from_millis(2);
/// How long the run waits after a settlement failed, before anything else.
const SETTLE_RETRY: Duration = Duration::from_millis(200);
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
    /// A handler attempt failed; the delivery is still out.
    Failed,
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

fn engine_acker(offset: u64, transport: &'static str, run: &SettleTx) -> Box<dyn Acker> {
    Box::new(EngineAcker { offset, transport, run: Some(run.clone()) })
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

    async fn attempt_failed(&self) -> Result<(), TransportError> {
        let run = self.run.as_ref().ok_or(TransportError::Closed(self.transport))?;
        run.send((self.offset, Settled::Failed)).map_err(|_| TransportError::Closed(self.transport))
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
                let Some(delivery) = window.next_out(run.partition, |offset| engine_acker(offset, run.transport, &settle_tx)) else { continue };
                permit.send(Ok(delivery));
                for _ in 0..BURST {
                    if !window.has_ready() {
                        break;
                    }
                    let Ok(permit) = deliveries.try_reserve() else { break };
                    let Some(delivery) = window.next_out(run.partition, |offset| engine_acker(offset, run.transport, &settle_tx)) else { break };
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
        // Not at once again: the broker (or the connection) needs a moment.
        tokio::time::sleep(SETTLE_RETRY).await;
    }
    run.floor.store(window.settled, Ordering::Relaxed);
    true
}

/// Takes the runtime's word on one delivery.
async fn settled<L: PartitionLog>(run: &PartitionRun<L>, window: &mut Window<L::Message>, offset: u64, how: Settled) {
    match how {
        Settled::Done => window.done(offset),
        Settled::Failed => window.failed(offset),
        Settled::Back(delay) => window.back(offset, delay),
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
            window.back(offset, DEAD_LETTER_RETRY);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::super::window::tests::fetched;
    use super::*;

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
        let d = w.next_out(0, |o| engine_acker(o, "test", &tx));
        drop(d);
        let Ok((offset, Settled::Back(delay))) = rx.try_recv() else { panic!("no word of the drop") };
        assert_eq!((offset, delay), (1, Duration::ZERO));
    }
}
