//! Partitions that the broker's group protocol assigns: Kafka's consumer groups.
//!
//! The broker shares a group's partitions out among its live members and says so to each
//! (assign, revoke). The adapter passes those words on as [`Assignment`]s, and the engine runs
//! each assigned partition — window, per-key lanes, contiguous settlement — until it is
//! revoked. A revocation waits for its partition: intake stops, what is out finishes (up to the
//! handover timeout), the done prefix is settled, and only then does the adapter let the broker
//! give the partition to another member. A partition whose assignment was *lost* (the member
//! was too late for the group) is abandoned at once: nothing more is settled, as another member
//! may already read it.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use eda_core::{Deliveries, TransportError};
use futures_util::FutureExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::ownership::{EngineStats, EngineTask};
use super::partition::{self, Control, Ended, Fence, PartitionRun};
use super::{EngineOptions, PartitionLog, Resume};

/// What the broker said of one partition, as the adapter passes it on.
pub(crate) enum Assignment {
    /// This member consumes the partition from now on; `first` on the member's first
    /// assignment, otherwise it takes the partition over from another member.
    Assigned { partition: u32, first: bool },
    /// The partition goes to another member. `done` is told once the partition's run ended
    /// (with everything done settled, unless `lost`).
    Revoked { partition: u32, lost: bool, done: oneshot::Sender<()> },
}

/// Starts the engine for one subscription whose partitions the broker assigns. `assignments`
/// ends when the adapter stopped consuming; `stop` is raised once the subscription is dropped,
/// for the adapter to leave the group (revoking every partition).
pub(crate) fn subscribe(
    log: Arc<impl PartitionLog>,
    (group, topic): (&str, &str),
    transport: &'static str,
    options: EngineOptions,
    mut assignments: mpsc::UnboundedReceiver<Assignment>,
    stop: Arc<AtomicBool>,
) -> (Deliveries, EngineTask) {
    let (tx, mut rx) = mpsc::channel(options.window.min(4096));
    let subscription = tx.downgrade();
    let stats = Arc::new(EngineStats::default());
    let watched = stats.clone();
    let group_topic = format!("{group} on {topic}");
    let task = tokio::spawn(async move {
        // However the task ends (its runtime may drop it), the adapter stops consuming.
        let _stop = StopOnDrop(stop.clone());
        let mut runs: JoinSet<(u32, Ended)> = JoinSet::new();
        let mut running: HashMap<u32, watch::Sender<Control>> = HashMap::new();
        let mut waiting: HashMap<u32, Vec<oneshot::Sender<()>>> = HashMap::new();
        let mut open = true;
        loop {
            tokio::select! {
                () = tx.closed(), if !stop.load(Ordering::Acquire) => {
                    // Dropped: the runs drain and settle by themselves (their deliveries are
                    // closed); the adapter leaves the group, revoking each partition.
                    stop.store(true, Ordering::Release);
                }
                word = assignments.recv(), if open => match word {
                    Some(Assignment::Assigned { partition: p, first }) => {
                        if running.contains_key(&p) {
                            continue;
                        }
                        if !first {
                            watched.taken_over.fetch_add(1, Ordering::Relaxed);
                        }
                        let (control, control_rx) = watch::channel(Control::Run);
                        running.insert(p, control);
                        let run = run(log.clone(), p, transport, options.clone(), tx.clone(), control_rx);
                        // A run that panicked still ends: the revocation waiting for it is
                        // answered, and the broker can give the partition on.
                        runs.spawn(async move { (p, AssertUnwindSafe(run).catch_unwind().await.unwrap_or(Ended::Released)) });
                    }
                    Some(Assignment::Revoked { partition, lost, done }) => match running.get(&partition) {
                        Some(control) => {
                            control.send_replace(if lost { Control::Abandon } else { Control::Release });
                            waiting.entry(partition).or_default().push(done);
                        }
                        None => {
                            let _ = done.send(());
                        }
                    },
                    None => open = false,
                },
                joined = runs.join_next(), if !runs.is_empty() => match joined {
                    Some(Ok((p, ended))) => {
                        running.remove(&p);
                        let revoked = waiting.remove(&p);
                        if matches!(ended, Ended::Released) && revoked.is_some() {
                            watched.handed_over.fetch_add(1, Ordering::Relaxed);
                        }
                        for done in revoked.into_iter().flatten() {
                            let _ = done.send(());
                        }
                    }
                    Some(Err(e)) => tracing::error!(subscription = %group_topic, error = %e, "a partition's run failed"),
                    None => {}
                },
            }
            watched.owned.store(running.len() as u32, Ordering::Relaxed);
            if !open && runs.is_empty() {
                break;
            }
        }
        for done in waiting.into_values().flatten() {
            let _ = done.send(());
        }
        watched.owned.store(0, Ordering::Relaxed);
    });
    let engine = EngineTask::new(subscription, task, (group, topic), stats);
    (Box::pin(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))), engine)
}

/// Raises the adapter's stop flag when dropped.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// The longest pause between two openings of a partition that keep failing.
const MAX_PAUSE: Duration = Duration::from_secs(5);

/// Runs an assigned partition until it is revoked (released or abandoned) or the subscription
/// is dropped. A reading that fails opens the partition again from its settled point.
async fn run<L: PartitionLog>(
    log: Arc<L>,
    partition: u32,
    transport: &'static str,
    options: EngineOptions,
    deliveries: mpsc::Sender<Result<eda_core::Delivery, TransportError>>,
    control: watch::Receiver<Control>,
) -> Ended {
    let mut failures = 0u32;
    let mut generation = 0u64;
    loop {
        let opening = log.open(partition, options.window, Resume::default(), generation);
        let opened =
            AssertUnwindSafe(opening).catch_unwind().await.unwrap_or_else(|_| Err(TransportError::Closed(transport)));
        generation += 1;
        let ended = match opened {
            Ok(opened) => {
                let run = PartitionRun {
                    log: log.clone(),
                    transport,
                    partition,
                    options: options.clone(),
                    deliveries: deliveries.clone(),
                    control: control.clone(),
                    // The broker fences: a member that lost its assignment is out of the group,
                    // and the run is abandoned as soon as the adapter hears of it.
                    fence: Arc::new(Fence::new(Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600))),
                    floor: Arc::default(),
                    busy: Arc::new(AtomicBool::new(false)),
                    first_attempt: 1,
                };
                let ended = AssertUnwindSafe(partition::run(run, opened)).catch_unwind().await;
                ended.unwrap_or_else(|_| Ended::Failed(TransportError::Closed(transport)))
            }
            Err(e) => Ended::Failed(e),
        };
        let assigned = *control.borrow() == Control::Run && !deliveries.is_closed();
        let e = match ended {
            Ended::Failed(e) if assigned => e,
            // The done prefix could not be settled, yet the partition is still this member's:
            // it is read again from the settled point rather than left unread.
            Ended::Lost if assigned => TransportError::Closed(transport),
            Ended::Failed(_) => return Ended::Released,
            ended => return ended,
        };
        failures = failures.saturating_add(1);
        if failures == 1 || failures.is_multiple_of(10) {
            tracing::warn!(partition, error = %e, failures, "a partition could not be read; it is opened again from its settled point");
        }
        let pause = Duration::from_millis(100).saturating_mul(failures.min(50)).min(MAX_PAUSE);
        let mut control = control.clone();
        tokio::select! {
            _ = deliveries.closed() => return Ended::Released,
            _ = control.wait_for(|c| *c != Control::Run) => return Ended::Released,
            () = tokio::time::sleep(pause) => {}
        }
    }
}
