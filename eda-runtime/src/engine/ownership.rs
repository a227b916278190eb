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
use std::sync::atomic::{AtomicU64, Ordering};
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
use super::{EngineOptions, PartitionLog};

/// A change of one key under a watched prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LeaseUpdate {
    pub key: String,
    pub revision: u64,
    /// `None` when the key was deleted.
    pub value: Option<Vec<u8>>,
}

/// Keys with revisions and compare-and-set: JetStream KV on NATS; a row with a version in SQL.
#[async_trait]
pub(crate) trait LeaseStore: Send + Sync + 'static {
    /// Every key under `prefix` as it is, then every change, in order.
    async fn watch(
        &self,
        prefix: &str,
    ) -> Result<std::pin::Pin<Box<dyn Stream<Item = Result<LeaseUpdate, TransportError>> + Send>>, TransportError>;
    /// Writes `key` whatever it holds.
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64, TransportError>;
    /// Writes `key` if it does not exist (or was deleted); `None` when it exists.
    async fn create(&self, key: &str, value: Vec<u8>) -> Result<Option<u64>, TransportError>;
    /// Writes `key` if its revision is still `revision`; `None` when it moved.
    async fn update(&self, key: &str, value: Vec<u8>, revision: u64) -> Result<Option<u64>, TransportError>;
    /// Deletes `key`, if its revision is still `revision` when one is given.
    async fn delete(&self, key: &str, revision: Option<u64>) -> Result<(), TransportError>;
}

/// What a lease key holds, written `<owner> <floor> <strikes>`; no owner when it was given back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Lease {
    /// The member that holds it.
    pub owner: String,
    /// The settled point its owner last reported.
    pub floor: u64,
    /// Owners in a row whose lease lapsed on this settled point.
    pub strikes: u32,
}

impl Lease {
    fn encode(&self) -> Vec<u8> {
        format!("{} {} {}", self.owner, self.floor, self.strikes).into_bytes()
    }

    fn decode(value: &[u8]) -> Self {
        let text = String::from_utf8_lossy(value);
        let mut parts = text.split(' ');
        let owner = parts.next().unwrap_or_default().to_owned();
        let floor = parts.next().and_then(|f| f.parse().ok()).unwrap_or(0);
        let strikes = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        Self { owner, floor, strikes }
    }
}

/// Starts the engine for one subscription: the member joins the group's partitions on `log`,
/// and the events of the partitions it comes to own are its deliveries. `scope` is the key
/// prefix of this group and topic in `leases`; `member` says who this is, for operators.
pub(crate) async fn subscribe<L: PartitionLog>(
    log: Arc<L>,
    leases: Arc<dyn LeaseStore>,
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
        runs: JoinSet::new(),
    };
    let subscription = owner.deliveries.downgrade();
    let task = tokio::spawn(owner.run(watch));
    Ok((Box::pin(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))), EngineTask { subscription, task }))
}

/// The engine of one subscription, as its transport keeps track of it.
pub(crate) struct EngineTask {
    subscription: mpsc::WeakSender<Result<Delivery, TransportError>>,
    task: tokio::task::JoinHandle<()>,
}

impl EngineTask {
    /// True once it has stopped.
    pub(crate) fn finished(&self) -> bool {
        self.task.is_finished()
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
    /// When this revision was first seen here.
    since: Instant,
}

/// A partition this member holds.
struct Owned {
    revision: u64,
    lease: Lease,
    control: watch::Sender<Control>,
    fence: Arc<Fence>,
    floor: Arc<AtomicU64>,
    releasing: bool,
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
    runs: JoinSet<(u32, Ended)>,
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
        while let Ok(Some(Ok(update))) = tokio::time::timeout_at(settle_in, next_update(&mut watch)).await {
            self.seen(update);
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
                        rebalance = self.seen(update);
                    }
                    failed => {
                        failures += 1;
                        if let Some(Err(e)) = failed {
                            tracing::warn!(scope = %self.scope, error = %e, "watching the group's leases failed; watching again");
                        }
                        tokio::time::sleep(Duration::from_millis(100).saturating_mul(failures.min(20))).await;
                        watch = self.leases.watch(&self.scope).await.ok();
                        // Whatever moved meanwhile comes again; until then no lease has lapsed.
                        // Members keep their clocks: one that died meanwhile must not count.
                        let now = Instant::now();
                        let leases = format!("{}.p.", self.scope);
                        self.view.iter_mut().filter(|(k, _)| k.starts_with(&leases)).for_each(|(_, s)| s.since = now);
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

    /// Takes a change of the watched keys; true when it may change who should own what.
    fn seen(&mut self, update: LeaseUpdate) -> bool {
        let LeaseUpdate { key, revision, value } = update;
        let relevant = value.is_none() || !self.view.contains_key(&key);
        if value.is_none() && key.starts_with(&format!("{}.m.", self.scope)) {
            self.view.remove(&key);
            return true;
        }
        match self.view.get_mut(&key) {
            Some(seen) if seen.revision >= revision => return false,
            Some(seen) => *seen = Seen { revision, value, since: Instant::now() },
            None => {
                self.view.insert(key, Seen { revision, value, since: Instant::now() });
            }
        }
        relevant
    }

    /// The live members, sorted: whose key moved within a TTL, and this one.
    fn members(&self) -> Vec<&str> {
        let prefix = format!("{}.m.", self.scope);
        let ttl = self.options.lease_ttl;
        let mut members: Vec<&str> = self
            .view
            .iter()
            .filter(|(_, s)| s.value.is_some() && s.since.elapsed() < ttl)
            .filter_map(|(k, _)| k.strip_prefix(&prefix))
            .chain([self.me.as_str()])
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
            let lease = Lease { owner: self.me.clone(), floor, strikes };
            let (leases, key, revision) = (self.leases.clone(), self.lease_key(p), o.revision);
            async move {
                let sent = Instant::now();
                let value = lease.encode();
                (p, sent, lease, leases.update(&key, value, revision).await)
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
            }
        }
        for p in 0..self.log.partitions() {
            if !mine(p) || self.owned.contains_key(&p) {
                continue;
            }
            if let Err(e) = self.take(p).await {
                tracing::warn!(scope = %self.scope, partition = p, error = %e, "could not take a partition; trying again");
            }
        }
    }

    /// Takes partition `p` if its lease is free or lapsed, and starts consuming it.
    async fn take(&mut self, p: u32) -> Result<(), TransportError> {
        let key = self.lease_key(p);
        let ttl = self.options.lease_ttl;
        let held = self.view.get(&key).and_then(|s| {
            let lease = s.value.as_deref().map(Lease::decode);
            // Given back: free, and its settled point is still worth knowing.
            lease.map(|l| (s.revision, l.owner.is_empty() || s.since.elapsed() >= ttl, l))
        });
        let mine = Lease { owner: self.me.clone(), ..Lease::default() };
        let sent = Instant::now();
        let (revision, lapsed, known_floor) = match held {
            None => match self.leases.create(&key, mine.encode()).await? {
                Some(revision) => (revision, None, 0),
                None => return Ok(()),
            },
            Some((_, false, _)) => return Ok(()),
            Some((revision, true, before)) => {
                let lease = Lease { owner: self.me.clone(), ..before.clone() };
                match self.leases.update(&key, lease.encode(), revision).await? {
                    Some(revision) if before.owner.is_empty() => (revision, None, before.floor),
                    Some(revision) => {
                        tracing::info!(scope = %self.scope, partition = p, from = %before.owner, "took over a lapsed lease");
                        let floor = before.floor;
                        (revision, Some(before), floor)
                    }
                    None => return Ok(()),
                }
            }
        };
        let fence = Arc::new(Fence::new(sent + ttl - ttl / 5));
        let opened = match self.log.open(p, self.options.window, known_floor).await {
            Ok(opened) => opened,
            Err(e) => {
                let given_back = Lease { floor: known_floor, ..Lease::default() };
                let _ = self.leases.update(&key, given_back.encode(), revision).await;
                return Err(e);
            }
        };
        let strikes = match lapsed {
            Some(before) if before.floor == opened.floor => before.strikes.saturating_add(1),
            Some(_) => 1,
            None => 0,
        };
        let lease = Lease { owner: self.me.clone(), floor: opened.floor, strikes };
        let revision = match self.leases.update(&key, lease.encode(), revision).await {
            Ok(Some(r)) => r,
            // Taken meanwhile, or the store is away: the heartbeat finds out and gives it up.
            _ => revision,
        };
        let (control, control_rx) = watch::channel(Control::Run);
        let floor = Arc::new(AtomicU64::new(opened.floor));
        let run = PartitionRun {
            log: self.log.clone(),
            transport: self.transport,
            partition: p,
            options: self.options.clone(),
            deliveries: self.deliveries.clone(),
            control: control_rx,
            fence: fence.clone(),
            floor: floor.clone(),
            first_attempt: strikes.saturating_add(1),
        };
        tracing::debug!(scope = %self.scope, partition = p, floor = opened.floor, strikes, "consuming a partition");
        self.runs.spawn(async move {
            let ended = AssertUnwindSafe(partition::run(run, opened)).catch_unwind().await;
            (p, ended.unwrap_or_else(|_| Ended::Failed(TransportError::Closed("a partition's run panicked"))))
        });
        self.owned.insert(p, Owned { revision, lease, control, fence, floor, releasing: false });
        Ok(())
    }

    /// A partition's run ended: give its lease back unless it was lost.
    async fn ended(&mut self, p: u32, ended: Ended) {
        let Some(owned) = self.owned.remove(&p) else { return };
        match ended {
            Ended::Lost => {}
            Ended::Released | Ended::Failed(_) => {
                if let Ended::Failed(e) = &ended {
                    tracing::warn!(scope = %self.scope, partition = p, error = %e, "a partition stopped; it is taken again");
                }
                if owned.fence.holds() {
                    // Given back with its settled point: whoever takes it next starts there even
                    // if the partition's consumer is gone.
                    let given_back = Lease { floor: owned.floor.load(Ordering::Relaxed), ..Lease::default() };
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
                else => break,
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
