//! Partitions whose ownership the broker keeps: RabbitMQ's single active consumer.
//!
//! Every instance of a group opens every partition, and the broker hands a partition's messages
//! to one of its consumers at a time, moving them to another only once that one's channel is
//! gone (with whatever it held unsettled, first and in order). So no leases are kept: each
//! partition runs in the engine — window, per-key lanes, contiguous settlement — for as long as
//! the subscription lives, and is opened again when its reading fails. The broker is the fence:
//! a settlement on a channel that is gone reaches nothing.
//!
//! The broker never moves a partition from a live consumer, so an instance that joins would
//! stand by for ever. Instances therefore say they are there (the adapter keeps the list of the
//! group's live members), and share the partitions out as the leases do: member `i` of `n`,
//! sorted by id, prefers partitions `p` with `p % n == i`. When the members change, each
//! instance steps back from the partitions it does not prefer: intake stops, what is out
//! finishes, the done prefix is settled, the channel closes — the broker makes the next
//! consumer in line active — and it consumes the partition again from the back of the line.
//! Only the preferred member never steps back, so it ends first in line: the active one.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use eda_core::{Deliveries, TransportError};
use futures_util::FutureExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::ownership::{EngineStats, EngineTask};
use super::partition::{self, Control, Ended, Fence, PartitionRun};
use super::{EngineOptions, PartitionLog, Resume};

/// The longest pause between two openings of a partition that keep failing.
const MAX_PAUSE: Duration = Duration::from_secs(5);

/// Starts the engine for one subscription on a broker that gives each partition one active
/// consumer: every partition of `log` is opened and run until the subscription is dropped.
/// `members` is this instance's place among the group's live instances, and their number.
pub(crate) fn subscribe(
    log: Arc<impl PartitionLog>,
    (group, topic): (&str, &str),
    transport: &'static str,
    options: EngineOptions,
    mut members: watch::Receiver<(usize, usize)>,
) -> (Deliveries, EngineTask) {
    let (tx, mut rx) = mpsc::channel(options.window.min(4096));
    let subscription = tx.downgrade();
    let stats = Arc::new(EngineStats::default());
    let mut runs = JoinSet::new();
    let partitions = log.partitions();
    let mut held = Vec::with_capacity(partitions as usize);
    for p in 0..partitions {
        let (control, _) = watch::channel(Control::Run);
        let h = Arc::new(Held {
            log: log.clone(),
            partition: p,
            transport,
            options: options.clone(),
            floor: Arc::default(),
            control,
            stats: stats.clone(),
        });
        held.push(h.clone());
        let deliveries = tx.clone();
        runs.spawn(async move { h.run(deliveries).await });
    }
    let group_topic = format!("{group} on {topic}");
    let watched = stats.clone();
    let heartbeat = options.heartbeat;
    let subscribed = tx.clone();
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500).min(heartbeat));
        let mut members_open = true;
        let mut stopping = false;
        loop {
            tokio::select! {
                () = subscribed.closed(), if !stopping => {
                    // The subscription was dropped: every partition finishes what is out,
                    // settles it and closes (a run notices only when woken).
                    stopping = true;
                    for h in &held {
                        h.control.send_replace(Control::Release);
                    }
                }
                joined = runs.join_next() => match joined {
                    Some(Err(e)) => tracing::error!(subscription = %group_topic, error = %e, "a partition's run failed"),
                    Some(Ok(())) => {}
                    None => break,
                },
                changed = members.changed(), if members_open => {
                    members_open = changed.is_ok();
                    let (i, n) = *members.borrow_and_update();
                    for h in held.iter().filter(|h| n > 1 && h.partition as usize % n != i) {
                        tracing::debug!(subscription = %group_topic, partition = h.partition, members = n, "stepping back from a partition another instance prefers");
                        h.control.send_if_modified(|c| std::mem::replace(c, Control::Release) == Control::Run);
                    }
                }
                _ = tick.tick() => {
                    // The broker does not say which partitions are this instance's: those it
                    // delivered and this one settled since their consumer began count as owned.
                    let active = held.iter().filter(|h| h.active()).count();
                    watched.owned.store(active as u32, Ordering::Relaxed);
                }
            }
        }
        watched.owned.store(0, Ordering::Relaxed);
    });
    drop(tx);
    let engine = EngineTask::new(subscription, task, (group, topic), stats);
    (Box::pin(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))), engine)
}

struct Held<L: PartitionLog> {
    log: Arc<L>,
    partition: u32,
    transport: &'static str,
    options: EngineOptions,
    /// The settled point of the current opening.
    floor: Arc<AtomicU64>,
    /// `Release` hands the partition over to a waiting instance.
    control: watch::Sender<Control>,
    stats: Arc<EngineStats>,
}

impl<L: PartitionLog> Held<L> {
    /// Whether the broker made this instance the partition's consumer: it settled some of it.
    fn active(&self) -> bool {
        self.floor.load(Ordering::Relaxed) > 0 && *self.control.borrow() == Control::Run
    }

    /// Opens and runs the partition until the subscription is dropped.
    async fn run(&self, deliveries: mpsc::Sender<Result<eda_core::Delivery, TransportError>>) {
        let mut failures = 0u32;
        while !deliveries.is_closed() {
            let opened = tokio::select! {
                _ = deliveries.closed() => return,
                opened = self.log.open(self.partition, self.options.window, Resume::default(), 0) => opened,
            };
            let began = Instant::now();
            let mut was_active = false;
            let ended = match opened {
                Ok(opened) => {
                    self.floor.store(0, Ordering::Relaxed);
                    let run = PartitionRun {
                        log: self.log.clone(),
                        transport: self.transport,
                        partition: self.partition,
                        options: self.options.clone(),
                        deliveries: deliveries.clone(),
                        control: self.control.subscribe(),
                        // Settlements on a channel the broker closed reach nothing: no lease to
                        // outlive.
                        fence: Arc::new(Fence::new(Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600))),
                        floor: self.floor.clone(),
                        busy: Arc::new(AtomicBool::new(false)),
                        first_attempt: 1,
                    };
                    let ended = AssertUnwindSafe(partition::run(run, opened)).catch_unwind().await;
                    was_active = self.floor.swap(0, Ordering::Relaxed) > 0;
                    ended.unwrap_or_else(|_| Ended::Failed(TransportError::Closed("a partition's run panicked")))
                }
                Err(e) => Ended::Failed(e),
            };
            if began.elapsed() > MAX_PAUSE * 6 {
                // A reading that went on for a while before it failed starts the count again.
                failures = 0;
            }
            match ended {
                Ended::Released if deliveries.is_closed() => return,
                Ended::Released => {
                    // Stepped back: in line again behind the consumers already waiting.
                    if was_active {
                        self.stats.handed_over.fetch_add(1, Ordering::Relaxed);
                    }
                    self.control.send_replace(Control::Run);
                    continue;
                }
                Ended::Lost => failures = failures.saturating_add(1),
                Ended::Failed(e) => {
                    failures = failures.saturating_add(1);
                    if failures == 1 || failures.is_multiple_of(10) {
                        tracing::warn!(partition = self.partition, error = %e, failures, "a partition could not be read; it is opened again");
                    }
                }
            }
            let pause = Duration::from_millis(100).saturating_mul(failures.min(50)).min(MAX_PAUSE);
            tokio::select! {
                _ = deliveries.closed() => return,
                () = tokio::time::sleep(pause) => {}
            }
        }
    }
}
