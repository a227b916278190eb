//! Partition ownership among a group's live instances.
//!
//! Each instance of a group on a topic (one subscription) is a member: it writes its member key
//! every heartbeat. Each partition has a lease key holding its owner, the settled point the
//! owner last reported and how many owners in a row died on that point. Every instance watches
//! the keys of its group and topic and shares the partitions out the same way — member `i` of
//! the `n` live ones, sorted by id, takes partitions `p` with `p % n == i` — so that when the
//! members agree, so do the owners:
//!
//! - a free lease (none, or deleted) is taken by creating it; one whose revision has not moved
//!   for a whole TTL, as this instance saw it, is taken by compare-and-set on that revision;
//! - the owner renews its leases each heartbeat by compare-and-set; one it cannot renew, or could
//!   not renew for most of a TTL, it stops settling at once (the revision is the fencing
//!   number: whoever takes it next has seen it stand still for longer than that);
//! - a partition that should be another member's is handed over: intake stops, what is out
//!   finishes (up to the handover timeout), the done prefix is settled, the lease is deleted.
//!
//! An owner that takes a lease lapsed on the same settled point as the last one counts a
//! strike; the first event of the partition goes out with that many attempts behind it, and is
//! dead-lettered once it passes `max_deliver` — the event that crashes every consumer stops
//! there.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use eda_core::{Deliveries, Delivery, TransportError};
use futures_core::Stream;
use std::panic::AssertUnwindSafe;

use futures_util::{FutureExt, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::partition::{self, Control, Ended, Fence, PartitionRun};
use super::{EngineOptions, Opened, PartitionLog, Resume};

/// A change of one key under a watched prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LeaseUpdate {
    pub key: String,
    pub revision: u64,
    /// `None` when the key was deleted.
    pub value: Option<Vec<u8>>,
    /// When the store wrote it, by the store's clock (nanoseconds since the epoch).
    pub written_ns: u64,
}

/// Keys with revisions and compare-and-set: JetStream KV on NATS; a row with a version in SQL.
#[async_trait]
pub(crate) trait LeaseStore: Send + Sync + 'static {
    /// Every key under `prefix` as it is, then every change, in order.
    async fn watch(
        &self,
        prefix: &str,
    ) -> Result<std::pin::Pin<Box<dyn Stream<Item = Result<LeaseUpdate, TransportError>> + Send>>, TransportError>;
    /// The key as it is now.
    async fn get(&self, key: &str) -> Result<Option<LeaseUpdate>, TransportError>;
    /// Writes `key` whatever it holds.
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64, TransportError>;
    /// Writes `key` if it does not exist (or was deleted); `None` when it exists.
    async fn create(&self, key: &str, value: Vec<u8>) -> Result<Option<u64>, TransportError>;
    /// Writes `key` if its revision is still `revision`; `None` when it moved.
    async fn update(&self, key: &str, value: Vec<u8>, revision: u64) -> Result<Option<u64>, TransportError>;
    /// Deletes `key`, if its revision is still `revision` when one is given.
    async fn delete(&self, key: &str, revision: Option<u64>) -> Result<(), TransportError>;
}

/// What a lease key holds, written `<owner> <floor> <strikes> <busy> <origin>`; no owner when
/// it was given back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Lease {
    /// The member that holds it.
    pub owner: String,
    /// The settled point its owner last reported.
    pub floor: u64,
    /// Owners in a row that died holding an event at this settled point.
    pub strikes: u32,
    /// Whether its owner had events out when it last reported: an owner that dies idle is
    /// no strike against anything.
    pub busy: bool,
    /// The incarnation of the partition's log `floor` is in (see `Resume::origin`).
    pub origin: u64,
}

impl Lease {
    fn encode(&self) -> Vec<u8> {
        format!("{} {} {} {} {}", self.owner, self.floor, self.strikes, u8::from(self.busy), self.origin).into_bytes()
    }

    fn decode(value: &[u8]) -> Self {
        let text = String::from_utf8_lossy(value);
        let mut parts = text.split(' ');
        let owner = parts.next().unwrap_or_default().to_owned();
        let floor = parts.next().and_then(|f| f.parse().ok()).unwrap_or(0);
        let strikes = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        let busy = parts.next() == Some("1");
        let origin = parts.next().and_then(|o| o.parse().ok()).unwrap_or(0);
        Self { owner, floor, strikes, busy, origin }
    }

    fn resume(&self) -> Resume {
        Resume { floor: self.floor, origin: self.origin }
    }

    /// The strikes a new owner counts, having found the partition settled at `floor` after
    /// this lease lapsed.
    fn strikes_after_lapse(&self, floor: u64) -> u32 {
        match (self.busy, self.floor == floor) {
            (false, _) => 0,
            (true, true) => self.strikes.saturating_add(1),
            (true, false) => 1,
        }
    }
}

/// Starts the engine for one subscription: the member joins the group's partitions on `log`,
/// and the events of the partitions it comes to own are its deliveries. `scope` is the key
/// prefix of this group and topic in `leases`; `member` says who this is, for operators.
#[allow(clippy::too_many_arguments)] // the subscription's names, its log and leases, settings
pub(crate) async fn subscribe<L: PartitionLog>(
    log: Arc<L>,
    leases: Arc<dyn LeaseStore>,
    group: &str,
    topic: &str,
    scope: String,
    member: String,
    transport: &'static str,
    options: EngineOptions,
) -> Result<(Deliveries, EngineTask), TransportError> {
    let watch = leases.watch(&scope).await?;
    let me = uuid::Uuid::new_v4().simple().to_string();
    leases.put(&format!("{scope}.m.{me}"), member.clone().into_bytes()).await?;
    let capacity = options.window.min(4096);
    let (tx, mut rx) = mpsc::channel(capacity);
    let owner = Owner {
        log,
        leases,
        scope,
        me,
        member,
        options,
        transport,
        deliveries: tx,
        view: HashMap::new(),
        owned: HashMap::new(),
        resting: HashMap::new(),
        runs: JoinSet::new(),
        stats: Arc::default(),
    };
    let subscription = owner.deliveries.downgrade();
    let stats = owner.stats.clone();
    let task = tokio::spawn(owner.run(watch));
    let engine = EngineTask::new(subscription, task, (group, topic), stats);
    Ok((Box::pin(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))), engine))
}

/// What one subscription's engine did, for metrics.
#[derive(Debug, Default)]
pub(super) struct EngineStats {
    pub(super) owned: AtomicU32,
    pub(super) handed_over: AtomicU64,
    pub(super) taken_over: AtomicU64,
}

/// The engine of one subscription, as its transport keeps track of it.
pub(crate) struct EngineTask {
    subscription: mpsc::WeakSender<Result<Delivery, TransportError>>,
    task: tokio::task::JoinHandle<()>,
    group: String,
    topic: String,
    stats: Arc<EngineStats>,
}

impl EngineTask {
    pub(super) fn new(
        subscription: mpsc::WeakSender<Result<Delivery, TransportError>>,
        task: tokio::task::JoinHandle<()>,
        (group, topic): (&str, &str),
        stats: Arc<EngineStats>,
    ) -> Self {
        Self { subscription, task, group: group.to_owned(), topic: topic.to_owned(), stats }
    }

    /// True once it has stopped.
    pub(crate) fn finished(&self) -> bool {
        self.task.is_finished()
    }

    /// What it holds of its group's partitions.
    pub(crate) fn ownership(&self) -> eda_core::Ownership {
        eda_core::Ownership {
            group: self.group.clone(),
            topic: self.topic.clone(),
            owned: self.stats.owned.load(Ordering::Relaxed),
            handed_over: self.stats.handed_over.load(Ordering::Relaxed),
            taken_over: self.stats.taken_over.load(Ordering::Relaxed),
        }
    }

    /// True while its subscription is dropped and it still hands its partitions over.
    pub(crate) fn stopping(&self) -> bool {
        !self.task.is_finished() && self.subscription.upgrade().is_none_or(|tx| tx.is_closed())
    }
}

/// A key as this member last saw it.
struct Seen {
    revision: u64,
    value: Option<Vec<u8>>,
    /// When this member first saw this revision.
    since: Instant,
    /// How old it already was then (known only for what the watch replays at start).
    head_start: Duration,
}

impl Seen {
    /// How long ago this revision was written, as far as this member can tell: never less.
    fn age(&self) -> Duration {
        self.since.elapsed() + self.head_start
    }
}

/// A partition this member holds.
struct Owned {
    revision: u64,
    lease: Lease,
    control: watch::Sender<Control>,
    fence: Arc<Fence>,
    floor: Arc<AtomicU64>,
    busy: Arc<AtomicBool>,
    releasing: bool,
}

/// A partition taken and opened, ready to run.
struct Acquired<M> {
    partition: u32,
    revision: u64,
    lease: Lease,
    fence: Arc<Fence>,
    opened: Opened<M>,
}

struct Owner<L: PartitionLog> {
    log: Arc<L>,
    leases: Arc<dyn LeaseStore>,
    scope: String,
    me: String,
    /// Who this is, for operators reading the bucket.
    member: String,
    options: EngineOptions,
    transport: &'static str,
    deliveries: mpsc::Sender<Result<Delivery, TransportError>>,
    view: HashMap<String, Seen>,
    owned: HashMap<u32, Owned>,
    /// Partitions whose run failed, and until when they are left alone.
    resting: HashMap<u32, (Instant, u32)>,
    runs: JoinSet<(u32, Ended)>,
    stats: Arc<EngineStats>,
}

type Updates = std::pin::Pin<Box<dyn Stream<Item = Result<LeaseUpdate, TransportError>> + Send>>;

impl<L: PartitionLog> Owner<L> {
    fn member_key(&self) -> String {
        format!("{}.m.{}", self.scope, self.me)
    }

    fn lease_key(&self, partition: u32) -> String {
        format!("{}.p.{partition}", self.scope)
    }

    async fn run(mut self, watch: Updates) {
        let mut watch = Some(watch);
        // What the watch shows first is the state as it is: read it before taking anything.
        let settle_in = Instant::now() + (self.options.heartbeat / 4).min(Duration::from_millis(250));
        let mut replayed = Vec::new();
        while let Ok(Some(Ok(update))) = tokio::time::timeout_at(settle_in, next_update(&mut watch)).await {
            replayed.push(update);
        }
        // What the replay shows is aged by the store's own timestamps against the newest of
        // them (no two machines' clocks compared): keys of members long gone, and leases that
        // lapsed before this member started, are seen as such at once. Later changes are aged
        // from their arrival here, which a clock stepping on a server cannot make older.
        let newest = replayed.iter().map(|u| u.written_ns).max().unwrap_or(0);
        for update in replayed {
            let head_start = Duration::from_nanos(newest.saturating_sub(update.written_ns));
            self.seen(update, head_start);
        }
        let mut tick = tokio::time::interval(self.options.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failures = 0u32;
        loop {
            let mut rebalance = false;
            tokio::select! {
                _ = self.deliveries.closed() => break,
                _ = tick.tick() => {
                    self.heartbeat().await;
                    rebalance = true;
                }
                update = next_update(&mut watch) => match update {
                    Some(Ok(update)) => {
                        failures = 0;
                        rebalance = self.seen(update, Duration::ZERO);
                    }
                    failed => {
                        failures += 1;
                        if let Some(Err(e)) = failed {
                            tracing::warn!(scope = %self.scope, error = %e, "watching the group's leases failed; watching again");
                        }
                        // Renewals go on meanwhile: the pause is short, and the next tick renews.
                        tokio::time::sleep(Duration::from_millis(50).saturating_mul(failures.min(10))).await;
                        watch = self.leases.watch(&self.scope).await.ok();
                    }
                },
                Some(ended) = self.runs.join_next() => {
                    if let Ok((partition, ended)) = ended {
                        self.ended(partition, ended).await;
                    }
                    rebalance = true;
                }
            }
            if rebalance {
                self.rebalance().await;
            }
        }
        self.leave().await;
    }

    /// Takes a change of the watched keys, `head_start` old when it arrives; true when it may
    /// change who should own what.
    fn seen(&mut self, update: LeaseUpdate, head_start: Duration) -> bool {
        let LeaseUpdate { key, revision, value, .. } = update;
        let since = Instant::now();
        if value.is_none() && key.starts_with(&format!("{}.m.", self.scope)) {
            return self.view.remove(&key).is_some();
        }
        // A new key, a deletion, or a lease given back (no owner) may free something to take.
        let given_back = value.as_deref().is_some_and(|v| Lease::decode(v).owner.is_empty());
        let relevant = value.is_none() || given_back || !self.view.contains_key(&key);
        match self.view.get_mut(&key) {
            Some(seen) if seen.revision >= revision => return false,
            Some(seen) => *seen = Seen { revision, value, since, head_start },
            None => {
                self.view.insert(key, Seen { revision, value, since, head_start });
            }
        }
        relevant
    }

    /// The live members, sorted: whose key was written within a TTL, and this one. Keys of
    /// members gone for longer are forgotten.
    fn members(&mut self) -> Vec<String> {
        let prefix = format!("{}.m.", self.scope);
        let ttl = self.options.lease_ttl;
        self.view.retain(|k, s| !k.starts_with(&prefix) || s.age() < ttl * 3);
        let mut members: Vec<String> = self
            .view
            .iter()
            .filter(|(_, s)| s.value.is_some() && s.age() < ttl)
            .filter_map(|(k, _)| k.strip_prefix(&prefix).map(str::to_owned))
            .chain([self.me.clone()])
            .collect();
        members.sort_unstable();
        members.dedup();
        members
    }

    /// Writes the member key and renews every lease held.
    async fn heartbeat(&mut self) {
        if let Err(e) = self.leases.put(&self.member_key(), self.member.clone().into_bytes()).await {
            tracing::warn!(scope = %self.scope, error = %e, "could not write the member key");
        }
        let keep = self.options.lease_ttl - self.options.lease_ttl / 5;
        let renewals = self.owned.iter().map(|(&p, o)| {
            let floor = o.floor.load(Ordering::Relaxed);
            let strikes = if floor > o.lease.floor { 0 } else { o.lease.strikes };
            let busy = o.busy.load(Ordering::Relaxed);
            let lease = Lease { owner: self.me.clone(), floor, strikes, busy, origin: o.lease.origin };
            let (leases, key, revision) = (self.leases.clone(), self.lease_key(p), o.revision);
            async move {
                let sent = Instant::now();
                let mut renewed = leases.update(&key, lease.encode(), revision).await;
                if let Ok(None) = renewed {
                    // The revision moved: taken, or our own write whose answer was lost.
                    renewed = match leases.get(&key).await {
                        Ok(Some(now))
                            if now.value.as_deref().map(Lease::decode).is_some_and(|l| l.owner == lease.owner) =>
                        {
                            leases.update(&key, lease.encode(), now.revision).await
                        }
                        Ok(_) => Ok(None),
                        Err(e) => Err(e),
                    };
                }
                (p, sent, lease, renewed)
            }
        });
        for (p, sent, lease, renewed) in futures_util::future::join_all(renewals).await {
            let Some(owned) = self.owned.get_mut(&p) else { continue };
            match renewed {
                Ok(Some(revision)) => {
                    owned.revision = revision;
                    owned.lease = lease;
                    owned.fence.extend(sent + keep);
                }
                Ok(None) => {
                    tracing::warn!(scope = %self.scope, partition = p, "the lease was taken by another instance; the partition is given up");
                    owned.control.send_replace(Control::Abandon);
                }
                Err(e) if !owned.fence.holds() => {
                    tracing::warn!(scope = %self.scope, partition = p, error = %e, "the lease could not be renewed in time; the partition is given up");
                    owned.control.send_replace(Control::Abandon);
                }
                Err(e) => {
                    tracing::debug!(scope = %self.scope, partition = p, error = %e, "could not renew a lease yet")
                }
            }
        }
    }

    /// Hands over what another member should own, and takes what this one should.
    async fn rebalance(&mut self) {
        let members = self.members();
        let (n, i) = (members.len() as u32, members.iter().position(|m| *m == self.me).unwrap_or(0) as u32);
        let mine = |p: u32| p % n == i;
        for (&p, owned) in self.owned.iter_mut() {
            if !mine(p) && !owned.releasing {
                tracing::info!(scope = %self.scope, partition = p, members = n, "handing a partition over");
                owned.releasing = true;
                owned.control.send_replace(Control::Release);
                self.stats.handed_over.fetch_add(1, Ordering::Relaxed);
            }
        }
        let now = Instant::now();
        let resting = |p: &u32| self.resting.get(p).is_some_and(|(until, _)| *until > now);
        let wanted: Vec<u32> =
            (0..self.log.partitions()).filter(|p| mine(*p) && !self.owned.contains_key(p) && !resting(p)).collect();
        // Taken concurrently: opening is a few round trips each, and renewals wait for it.
        let takes = wanted.into_iter().map(|p| self.take(p));
        for (p, taken) in futures_util::future::join_all(takes).await {
            match taken {
                Ok(Some(acquired)) => self.start(acquired),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(scope = %self.scope, partition = p, error = %e, "could not take a partition; trying again");
                    self.rest(p);
                }
            }
        }
    }

    /// Leaves a partition alone for a while after it failed, longer each time in a row.
    fn rest(&mut self, p: u32) {
        let times = self.resting.get(&p).map_or(0, |(_, n)| *n).saturating_add(1);
        let pause = Duration::from_millis(200).saturating_mul(1 << times.min(6)).min(self.options.lease_ttl);
        self.resting.insert(p, (Instant::now() + pause, times));
    }

    /// Takes partition `p` if its lease is free or lapsed, and opens it.
    async fn take(&self, p: u32) -> (u32, Result<Option<Acquired<L::Message>>, TransportError>) {
        (p, self.acquire(p).await)
    }

    async fn acquire(&self, p: u32) -> Result<Option<Acquired<L::Message>>, TransportError> {
        let key = self.lease_key(p);
        let ttl = self.options.lease_ttl;
        let held = self.view.get(&key).and_then(|s| {
            let lease = s.value.as_deref().map(Lease::decode);
            // Given back: free, and its settled point is still worth knowing.
            lease.map(|l| (s.revision, l.owner.is_empty() || s.age() >= ttl, l))
        });
        let mine = Lease { owner: self.me.clone(), ..Lease::default() };
        let sent = Instant::now();
        let (revision, lapsed, known) = match held {
            None => match self.leases.create(&key, mine.encode()).await? {
                Some(revision) => (revision, None, Resume::default()),
                None => return Ok(None),
            },
            Some((_, false, _)) => return Ok(None),
            Some((revision, true, before)) => {
                let lease = Lease { owner: self.me.clone(), ..before.clone() };
                match self.leases.update(&key, lease.encode(), revision).await? {
                    Some(revision) if before.owner.is_empty() => (revision, None, before.resume()),
                    Some(revision) => {
                        tracing::info!(scope = %self.scope, partition = p, from = %before.owner, "took over a lapsed lease");
                        self.stats.taken_over.fetch_add(1, Ordering::Relaxed);
                        let known = before.resume();
                        (revision, Some(before), known)
                    }
                    None => return Ok(None),
                }
            }
        };
        let fence = Arc::new(Fence::new(sent + ttl - ttl / 5));
        let opened = match self.log.open(p, self.options.window, known, revision).await {
            Ok(opened) => opened,
            Err(e) => {
                let given_back = Lease { floor: known.floor, origin: known.origin, ..Lease::default() };
                let _ = self.leases.update(&key, given_back.encode(), revision).await;
                return Err(e);
            }
        };
        let strikes = lapsed.map_or(0, |before| before.strikes_after_lapse(opened.floor));
        // Busy from the start when events wait: an owner that dies before its first renewal
        // held one of them.
        let lease =
            Lease { owner: self.me.clone(), floor: opened.floor, strikes, busy: opened.backlog, origin: opened.origin };
        let revision = match self.leases.update(&key, lease.encode(), revision).await {
            Ok(Some(r)) => r,
            Ok(None) => {
                // Taken while this member opened it (a slow open): the new owner reads it.
                tracing::warn!(scope = %self.scope, partition = p, "the lease was taken while the partition was being opened");
                return Ok(None);
            }
            // The store is away: the heartbeat finds out and gives it up if it stays away.
            Err(_) => revision,
        };
        if !fence.holds() {
            tracing::warn!(scope = %self.scope, partition = p, "opening the partition outlasted its lease; it is left to the next owner");
            return Ok(None);
        }
        Ok(Some(Acquired { partition: p, revision, lease, fence, opened }))
    }

    /// Starts consuming a partition just taken.
    fn start(&mut self, acquired: Acquired<L::Message>) {
        let Acquired { partition: p, revision, lease, fence, opened } = acquired;
        let (control, control_rx) = watch::channel(Control::Run);
        let floor = Arc::new(AtomicU64::new(opened.floor));
        let busy = Arc::new(AtomicBool::new(lease.busy));
        let run = PartitionRun {
            log: self.log.clone(),
            transport: self.transport,
            partition: p,
            options: self.options.clone(),
            deliveries: self.deliveries.clone(),
            control: control_rx,
            fence: fence.clone(),
            floor: floor.clone(),
            busy: busy.clone(),
            first_attempt: lease.strikes.saturating_add(1),
        };
        tracing::debug!(scope = %self.scope, partition = p, floor = opened.floor, strikes = lease.strikes, "consuming a partition");
        self.runs.spawn(async move {
            let ended = AssertUnwindSafe(partition::run(run, opened)).catch_unwind().await;
            (p, ended.unwrap_or_else(|_| Ended::Failed(TransportError::Closed("a partition's run panicked"))))
        });
        self.owned.insert(p, Owned { revision, lease, control, fence, floor, busy, releasing: false });
        self.stats.owned.store(self.owned.len() as u32, Ordering::Relaxed);
    }

    /// A partition's run ended: give its lease back unless it was lost.
    async fn ended(&mut self, p: u32, ended: Ended) {
        let Some(owned) = self.owned.remove(&p) else { return };
        self.stats.owned.store(self.owned.len() as u32, Ordering::Relaxed);
        match ended {
            Ended::Lost => {}
            Ended::Released | Ended::Failed(_) => {
                if let Ended::Failed(e) = &ended {
                    tracing::warn!(scope = %self.scope, partition = p, error = %e, "a partition stopped; it is taken again");
                    self.rest(p);
                } else {
                    self.resting.remove(&p);
                }
                if owned.fence.holds() {
                    // Given back with its settled point: whoever takes it next starts there even
                    // if the partition's consumer is gone.
                    let floor = owned.floor.load(Ordering::Relaxed);
                    let given_back = Lease { floor, origin: owned.lease.origin, ..Lease::default() };
                    if let Err(e) = self.leases.update(&self.lease_key(p), given_back.encode(), owned.revision).await {
                        tracing::debug!(scope = %self.scope, partition = p, error = %e, "could not give a lease back; it lapses");
                    }
                }
            }
        }
    }

    /// The subscription was dropped: hand every partition over, then leave the group.
    async fn leave(mut self) {
        for owned in self.owned.values() {
            owned.control.send_replace(Control::Release);
        }
        // Renew while the runs finish, so that the leases hold until they are handed over.
        let mut tick = tokio::time::interval(self.options.heartbeat);
        tick.tick().await;
        while !self.owned.is_empty() && !self.runs.is_empty() {
            tokio::select! {
                Some(ended) = self.runs.join_next() => {
                    if let Ok((p, ended)) = ended {
                        self.ended(p, ended).await;
                    }
                }
                _ = tick.tick() => self.heartbeat().await,
            }
        }
        if let Err(e) = self.leases.delete(&self.member_key(), None).await {
            tracing::debug!(scope = %self.scope, error = %e, "could not delete the member key; it lapses");
        }
    }
}

async fn next_update(watch: &mut Option<Updates>) -> Option<Result<LeaseUpdate, TransportError>> {
    match watch {
        Some(w) => w.next().await,
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_reads_back_what_it_wrote_and_counts_strikes_only_for_busy_owners() {
        let lease = Lease { owner: "m1".into(), floor: 41, strikes: 2, busy: true, origin: 7 };
        assert_eq!(Lease::decode(&lease.encode()), lease);
        assert_eq!(Lease::decode(b" 7 0 0 9"), Lease { floor: 7, origin: 9, ..Lease::default() }, "given back");
        assert_eq!(lease.strikes_after_lapse(41), 3, "died again on the same point");
        assert_eq!(lease.strikes_after_lapse(50), 1, "moved on, then died holding something");
        let idle = Lease { busy: false, ..lease };
        assert_eq!(idle.strikes_after_lapse(41), 0, "an owner that died idle held nothing to blame");
    }
}
