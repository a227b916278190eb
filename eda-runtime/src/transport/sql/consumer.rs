//! One subscription on the SQL log: partition leases, and the next event of each partition
//! that has nothing in flight, read a batch ahead.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use eda_core::{Acker, DeadLetter, DeadLetterReason, Delivery, Envelope, TransportError, UnitOfWork};
use sqlx::{AnyConnection, Row};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::unit::{LogDelivery, SqlUnit};
use super::{answered, envelope_of, fnv1a, lock, other, SqlTransport};

/// What one partition of a subscription is doing.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Slot {
    Idle,
    InFlight,
    WaitUntil(Instant),
    /// In flight, but the lease was lost: the slot goes when the event is settled.
    Revoked,
    /// In flight, and to be given up (beyond this instance's fair share) once settled: it is
    /// fetched from no more.
    Leaving,
    /// Given up, or being given up: fetched from no more; the next renewal deletes its lease.
    Released,
}

pub(super) struct ConsumerShared {
    pub(super) transport: SqlTransport,
    pub(super) group: String,
    pub(super) topic: String,
    /// The name this consumer holds leases under.
    pub(super) owner: String,
    /// The topic's partition count.
    pub(super) partitions: u32,
    pub(super) slots: Mutex<HashMap<u32, Slot>>,
    /// Events read ahead per partition, after the one in flight: the next deliveries of the
    /// partition, read in one query. Kept only while the partition's events settle by
    /// advancing its position here; anything else (a hand-back, a lost or given-up lease, a
    /// delivery dropped unsettled, a position found already moved) empties it, and the next
    /// fetch reads from the database again.
    pub(super) ahead: Mutex<HashMap<u32, VecDeque<Read>>>,
    pub(super) wake: Notify,
    /// The database time of this consumer's last renewal, [`NOT_RENEWED`] before the first.
    pub(super) renewed_at: AtomicI64,
    /// A partition being given up has settled: renew now, which releases it.
    pub(super) release_now: Notify,
    /// When the last renewal that committed began, by this process's monotonic clock: the
    /// leases it renewed last at least a lease from then, so this instance reads no more once
    /// most of that has passed without another (it may have lost them).
    pub(super) renewed: Mutex<Option<Instant>>,
    /// The database time the last renewal wrote, committed or not (see `look_for_a_twin`).
    pub(super) attempted_at: AtomicI64,
}

/// [`ConsumerShared::renewed_at`] before the first renewal.
pub(super) const NOT_RENEWED: i64 = i64::MIN;

/// How many events of a partition one query reads: the one handed out and those read ahead.
pub(super) const READ_AHEAD: usize = 32;

/// How many bytes of event data a partition keeps read ahead at most: large events are read
/// again when their turn comes rather than held.
const READ_AHEAD_BYTES: usize = 256 * 1024;

/// An event read from the log: `(seq, attempts so far, envelope)`.
pub(super) type Read = (i64, i64, Envelope);

impl ConsumerShared {
    /// Sets what a partition is doing, and forgets what was read ahead of it. Settling an
    /// event in flight wakes the consumer, which may then fetch the partition's next one;
    /// nothing else does, or an idle consumer would wake itself with every empty fetch.
    pub(super) fn set(&self, partition: u32, slot: Slot) {
        self.settle(partition, slot, false);
    }

    /// The event in flight was settled by moving the partition's position past it, here:
    /// what was read ahead of it still comes next.
    pub(super) fn advanced(&self, partition: u32) {
        self.settle(partition, Slot::Idle, true);
    }

    fn settle(&self, partition: u32, slot: Slot, keep_ahead: bool) {
        let settled = {
            let mut slots = lock(&self.slots);
            if !(keep_ahead && slots.get(&partition) == Some(&Slot::InFlight)) {
                lock(&self.ahead).remove(&partition);
            }
            match slots.get(&partition).copied() {
                Some(Slot::Revoked) if slot != Slot::InFlight => {
                    // Another instance holds this partition now: forget it.
                    slots.remove(&partition);
                    false
                }
                Some(Slot::Leaving) if slot != Slot::InFlight => {
                    // Settled: hand it over at once rather than at the next renewal.
                    slots.insert(partition, Slot::Released);
                    self.release_now.notify_one();
                    false
                }
                // Only a renewal takes a partition being given up back.
                Some(Slot::Released) => false,
                Some(current) => {
                    slots.insert(partition, slot);
                    current == Slot::InFlight && slot != Slot::InFlight
                }
                None => false,
            }
        };
        if settled {
            self.wake.notify_waiters();
        }
    }

    /// Moves the group's position in `partition` up to `seq`; `retried` says whether events up
    /// to it have delivery counts to forget (most have none, which saves a statement). False
    /// when the position was already there: another instance that took the partition over
    /// handled the event first.
    pub(super) async fn ack(
        &self,
        conn: &mut AnyConnection,
        partition: u32,
        seq: i64,
        retried: bool,
    ) -> Result<bool, sqlx::Error> {
        let sql = &self.transport.inner.sql;
        let advanced = sqlx::query(&sql.ack)
            .bind(&self.group)
            .bind(&self.topic)
            .bind(i64::from(partition))
            .bind(seq)
            .execute(&mut *conn)
            .await?
            .rows_affected()
            > 0;
        if retried {
            sqlx::query(&sql.clear_attempts)
                .bind(&self.group)
                .bind(&self.topic)
                .bind(i64::from(partition))
                .bind(seq)
                .execute(&mut *conn)
                .await?;
        }
        Ok(advanced)
    }
}

/// One subscription: holds leases on a fair share of the partitions, hands out the next event
/// of each partition that has nothing in flight.
pub(super) struct Consumer {
    pub(super) shared: Arc<ConsumerShared>,
    pub(super) cursor: u32,
}

impl Consumer {
    /// The next event of a partition with nothing in flight, as a delivery.
    pub(super) async fn next(&mut self) -> Result<Delivery, TransportError> {
        let (partition, mut rows) = self.next_rows(READ_AHEAD, true).await?;
        let (seq, attempts, envelope) = rows.pop_front().ok_or(TransportError::Closed("sql: an empty read"))?;
        let acker = SqlAcker {
            shared: self.shared.clone(),
            partition,
            seq,
            retried: AtomicBool::new(attempts > 0),
            settled: Arc::new(AtomicBool::new(false)),
        };
        let failures = u32::try_from(attempts).unwrap_or(u32::MAX);
        Ok(Delivery::new(envelope, failures.saturating_add(1), partition, Box::new(acker)).with_failures(failures))
    }

    /// Up to `limit` next events of one partition with nothing in flight, settled together:
    /// how the relay moves an outbox in few round trips while keeping per-key order.
    pub(super) async fn next_batch(&mut self, limit: usize) -> Result<Batch, TransportError> {
        let (partition, rows) = self.next_rows(limit, false).await?;
        let rows = Vec::from(rows);
        let retried = rows.iter().any(|(_, attempts, _)| *attempts > 0);
        let last = rows.last().map_or(0, |(seq, _, _)| *seq);
        let (seqs, envelopes) = rows.into_iter().map(|(seq, _, e)| (seq, e)).unzip();
        Ok(Batch { shared: self.shared.clone(), partition, last, retried, seqs, envelopes, settled: false })
    }

    /// Waits for a partition with nothing in flight that has events, marks it in flight and
    /// returns its next events: with `one`, the next, the others of the `limit` read being
    /// kept ahead; else up to `limit`.
    async fn next_rows(&mut self, limit: usize, one: bool) -> Result<(u32, VecDeque<Read>), TransportError> {
        let inner = self.shared.transport.inner.clone();
        let shared = self.shared.clone();
        loop {
            let published = inner.published.notified();
            let woken = shared.wake.notified();
            tokio::pin!(published, woken);
            published.as_mut().enable();
            woken.as_mut().enable();

            let now = Instant::now();
            let (ready, earliest) = {
                let slots = lock(&self.shared.slots);
                let mut ready: Vec<u32> = slots.iter().filter(|(_, s)| s.ready(now)).map(|(p, _)| *p).collect();
                ready.sort_unstable();
                let earliest =
                    slots.values().filter_map(|s| if let Slot::WaitUntil(t) = s { Some(*t) } else { None }).min();
                (ready, earliest)
            };
            // Start where the last call stopped, so no partition starves the others.
            let start = ready.iter().position(|p| *p >= self.cursor).unwrap_or(0);
            for &partition in ready[start..].iter().chain(&ready[..start]) {
                let rows = self.fetch(partition, limit, one).await?;
                if !rows.is_empty() {
                    self.cursor = partition + 1;
                    return Ok((partition, rows));
                }
            }
            let mut wait = shared.transport.poll_interval();
            if let Some(t) = earliest {
                wait = wait.min(t.saturating_duration_since(Instant::now()));
            }
            tokio::select! {
                _ = published => {}
                _ = woken => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Reads the next events of `partition`, up to `limit` and up to the first corrupt one. A
    /// corrupt event at the head is dead-lettered with what is wrong, so it never blocks the
    /// partition. The partition is marked in flight before it is read — a renewal deciding to
    /// give it up meanwhile then waits for what was read to settle — and left so when it
    /// returns events. What was read ahead of the partition's last event comes first, without
    /// a query: it was read under the same leases, and nobody else moved the position since.
    async fn fetch(&self, partition: u32, limit: usize, one: bool) -> Result<VecDeque<Read>, TransportError> {
        if !self.shared.leases_fresh() {
            return Ok(VecDeque::new());
        }
        {
            let mut slots = lock(&self.shared.slots);
            match slots.get_mut(&partition) {
                Some(slot) if slot.ready(Instant::now()) => *slot = Slot::InFlight,
                _ => return Ok(VecDeque::new()),
            }
            let mut ahead = lock(&self.shared.ahead);
            if let Some(mut rows) = ahead.remove(&partition) {
                if let Some(next) = rows.pop_front() {
                    if !rows.is_empty() {
                        ahead.insert(partition, rows);
                    }
                    return Ok(VecDeque::from([next]));
                }
            }
        }
        let mut read = self.read(partition, limit).await;
        {
            let slots = lock(&self.shared.slots);
            match (&mut read, slots.get(&partition)) {
                // Lost while it read: another instance holds it now, and what was read is its own.
                (_, Some(Slot::Revoked)) => read = Ok(VecDeque::new()),
                (Ok(rows), Some(Slot::InFlight)) if one && rows.len() > 1 => {
                    let mut rest = rows.split_off(1);
                    let mut bytes = 0;
                    let kept = rest
                        .iter()
                        .take_while(|(_, _, e)| {
                            bytes += e.data.len();
                            bytes <= READ_AHEAD_BYTES
                        })
                        .count();
                    rest.truncate(kept);
                    if !rest.is_empty() {
                        lock(&self.shared.ahead).insert(partition, rest);
                    }
                }
                _ => {}
            }
        }
        if !matches!(&read, Ok(events) if !events.is_empty()) {
            self.shared.set(partition, Slot::Idle);
        }
        read
    }

    async fn read(&self, partition: u32, limit: usize) -> Result<VecDeque<Read>, TransportError> {
        let shared = &self.shared;
        let inner = &shared.transport.inner;
        let next = sqlx::query(&inner.sql.next_events)
            .bind(&shared.group)
            .bind(&shared.topic)
            .bind(i64::from(partition))
            .bind(limit.max(1) as i64);
        let within = shared.transport.answer_within();
        let mut conn = inner.pool.acquire().await.map_err(other)?;
        let done = tokio::time::timeout(within, async { next.fetch_all(&mut *conn).await.map_err(other) }).await;
        let rows = answered(conn, done, within, "reading the next events")?;
        let mut events = VecDeque::with_capacity(rows.len());
        for row in &rows {
            let seq: i64 = row.try_get(0).map_err(other)?;
            let attempts: i64 = row.try_get(11).map_err(other)?;
            match envelope_of(row, &shared.topic) {
                (envelope, None) => events.push_back((seq, attempts, envelope)),
                (_, Some(_)) if !events.is_empty() => break, // next time it is at the head
                (envelope, Some(error)) => {
                    let acker = SqlAcker {
                        shared: shared.clone(),
                        partition,
                        seq,
                        retried: AtomicBool::new(attempts > 0),
                        settled: Arc::new(AtomicBool::new(false)),
                    };
                    tracing::error!(group = %shared.group, topic = %shared.topic, seq, %error, "dead-lettering a corrupt stored event");
                    let reason = DeadLetterReason { handler: None, error, permanent: true };
                    let letter = DeadLetter { envelope, attempts: attempts as u32 + 1, reason, at: SystemTime::now() };
                    Box::new(acker).dead_letter(letter).await?;
                    return Ok(VecDeque::new());
                }
            }
        }
        Ok(events)
    }
}

impl Slot {
    /// Whether the partition may be read now.
    fn ready(self, now: Instant) -> bool {
        match self {
            Slot::Idle => true,
            Slot::WaitUntil(t) => t <= now,
            Slot::InFlight | Slot::Revoked | Slot::Leaving | Slot::Released => false,
        }
    }
}

impl ConsumerShared {
    /// Whether this consumer's leases surely still hold: a renewal committed within the last
    /// four fifths of a lease.
    fn leases_fresh(&self) -> bool {
        let ttl = self.transport.inner.options.lease_ttl;
        lock(&self.renewed).is_some_and(|at| at.elapsed() < ttl.mul_f64(0.8))
    }

    /// Keeps this consumer's leases alive for as long as it or a delivery of it exists (so a
    /// slow handler or a draining shutdown does not lose them), and runs the retention clean-up
    /// now and then.
    pub(super) fn keep_leases(self: &Arc<Self>) {
        let shared = Arc::downgrade(self);
        let every = self.transport.inner.options.lease_ttl / 3;
        tokio::spawn(async move {
            loop {
                {
                    // Held while it waits: the consumer's end is noticed a round late at most.
                    let Some(strong) = shared.upgrade() else { return };
                    let _ = tokio::time::timeout(every, strong.release_now.notified()).await;
                }
                let Some(shared) = shared.upgrade() else { return };
                let mut failed = shared.rebalance().await.err();
                // One failed round must not let the leases lapse: try again soon, while they last.
                while let Some(e) = failed.take() {
                    tracing::warn!(group = %shared.group, topic = %shared.topic, error = %e, "cannot renew partition leases; trying again");
                    tokio::time::sleep(every / 4).await;
                    if Arc::strong_count(&shared) == 1 {
                        return;
                    }
                    failed = shared.rebalance().await.err();
                }
                shared.transport.clean_up_now_and_then();
            }
        });
    }

    /// With a fixed `instance_id`, refuses to start while another live process consumes under
    /// the same name: the two would renew, take and release each other's leases as one owner,
    /// and both handle the same partitions. A live instance renews its member row every third
    /// of a lease; a row that has not moved for half a lease belongs to a process that is gone.
    /// So after a crash the restarted process waits at most half a lease here (after a clean
    /// stop the row is gone and it goes at once), and beside a live twin it fails. A twin this
    /// misses (both starting at the same moment, or one whose renewal was late by more than a
    /// sixth of a lease) is found by the renewals that follow ([`Self::look_for_a_twin`]).
    pub(super) async fn refuse_a_twin(&self) -> Result<(), TransportError> {
        let inner = &self.transport.inner;
        let quiet = inner.options.lease_ttl.as_millis() as i64 / 2;
        let read = || async {
            let mut conn = inner.leases.acquire().await.map_err(other)?;
            let now: i64 = sqlx::query_scalar(inner.dialect.now_ms()).fetch_one(&mut *conn).await.map_err(other)?;
            Ok::<_, TransportError>((now, self.member_seen(&mut conn).await?))
        };
        let (now, Some(seen)) = read().await? else { return Ok(()) };
        // A row from the future (written by a clock that has since stepped back) counts as
        // fresh: the wait stays within one lease.
        let age = (now - seen).clamp(0, quiet);
        if age >= quiet {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis((quiet - age).unsigned_abs())).await;
        match read().await? {
            (_, Some(again)) if again != seen => Err(TransportError::Config {
                transport: "sql",
                reason: format!(
                    "another live process consumes `{}` on `{}` as instance `{}`: give each process its own `instance_id` (or none, for a random one)",
                    self.group,
                    self.topic,
                    self.owner.rsplit_once('#').map_or(self.owner.as_str(), |(id, _)| id)
                ),
            }),
            _ => Ok(()),
        }
    }

    /// When this consumer's member row was last renewed, by the database's clock.
    async fn member_seen(&self, conn: &mut AnyConnection) -> Result<Option<i64>, TransportError> {
        sqlx::query_scalar(&self.transport.inner.sql.member_seen)
            .bind(&self.group)
            .bind(&self.topic)
            .bind(&self.owner)
            .fetch_optional(&mut *conn)
            .await
            .map_err(other)
    }

    /// With a fixed `instance_id`: whether someone else renewed this consumer's member row since
    /// its last renewal — a second live process under the same name, which started beside this
    /// one. Said loudly at every renewal; the two share leases until one is stopped.
    async fn look_for_a_twin(&self, conn: &mut AnyConnection) -> Result<(), TransportError> {
        let last = self.renewed_at.load(Ordering::SeqCst);
        if last == NOT_RENEWED {
            return Ok(());
        }
        let seen = self.member_seen(conn).await?;
        let attempted = self.attempted_at.load(Ordering::SeqCst);
        // A renewal whose commit reply was lost wrote `attempted`: no twin.
        if seen.is_some_and(|seen| seen != last && seen != attempted) {
            tracing::error!(
                group = %self.group,
                topic = %self.topic,
                instance = %self.owner,
                "another live process consumes under this instance's name: both handle the same partitions; give each process its own `instance_id`"
            );
        }
        Ok(())
    }

    /// Renews this consumer's leases, and takes or gives up partitions towards a fair share
    /// among the live members of the group. Gives up after a lease's time: a database that
    /// does not answer (a failover, lost packets) fails the round instead of hanging it.
    pub(super) async fn rebalance(&self) -> Result<(), TransportError> {
        let inner = &self.transport.inner;
        let within = inner.options.lease_ttl;
        let began = Instant::now();
        let mut conn = inner.leases.acquire().await.map_err(other)?;
        let done = tokio::time::timeout(within, self.rebalance_on(&mut conn)).await;
        answered(conn, done, within, "renewing partition leases")?;
        *lock(&self.renewed) = Some(began);
        Ok(())
    }

    async fn rebalance_on(&self, conn: &mut AnyConnection) -> Result<(), TransportError> {
        let shared = self;
        let inner = &shared.transport.inner;
        let sql = &inner.sql;
        let (g, t, me) = (&shared.group, &shared.topic, &shared.owner);
        let ttl = inner.options.lease_ttl.as_millis() as i64;
        // Not through the write gate: behind a burst of publishers queued there a renewal could
        // wait past its lease. SQLite's busy timeout orders it with the one writer.
        let mut tx = sqlx::Connection::begin_with(conn, inner.dialect.begin()).await.map_err(other)?;
        if let Some(lock) = inner.dialect.lock() {
            // One rebalance per group and topic at a time: claims never interleave.
            let key = fnv1a(&[&inner.options.prefix, "leases", g, t]) as i64;
            sqlx::query(lock).bind(key).execute(&mut *tx).await.map_err(other)?;
        }
        // Every instance judges leases by the database's clock, read once the lock is held:
        // one whose own clock runs ahead would otherwise see live leases as expired.
        let now: i64 = sqlx::query_scalar(inner.dialect.now_ms()).fetch_one(&mut *tx).await.map_err(other)?;
        if inner.options.instance.is_some() {
            self.look_for_a_twin(&mut tx).await?;
        }
        self.attempted_at.store(now, Ordering::SeqCst);
        sqlx::query(&sql.member_upsert).bind(g).bind(t).bind(me).bind(now).execute(&mut *tx).await.map_err(other)?;
        sqlx::query(&sql.members_expire).bind(g).bind(t).bind(now - ttl).execute(&mut *tx).await.map_err(other)?;
        let members: i64 =
            sqlx::query_scalar(&sql.members_count).bind(g).bind(t).fetch_one(&mut *tx).await.map_err(other)?;
        let fair = self.partitions.div_ceil(u32::try_from(members.max(1)).unwrap_or(1)) as usize;
        sqlx::query(&sql.leases_renew)
            .bind(g)
            .bind(t)
            .bind(me)
            .bind(now + ttl)
            .execute(&mut *tx)
            .await
            .map_err(other)?;
        let mut mine: Vec<u32> = sqlx::query_scalar::<_, i64>(&sql.leases_mine)
            .bind(g)
            .bind(t)
            .bind(me)
            .fetch_all(&mut *tx)
            .await
            .map_err(other)?
            .into_iter()
            .map(|p| p as u32)
            .collect();
        // Beyond the fair share, partitions are given up: idle ones now, busy ones once their
        // event settles (marked so under the lock the consumer fetches under, so none is read
        // from after it was chosen). Within it, partitions being given up are taken back.
        let release: Vec<u32> = {
            let mut slots = lock(&shared.slots);
            let busy = |s: Option<&Slot>| matches!(s, Some(Slot::InFlight | Slot::Leaving | Slot::Revoked));
            let mut order = mine.clone();
            order.sort_by_key(|p| (busy(slots.get(p)), std::cmp::Reverse(*p)));
            let excess = mine.len().saturating_sub(fair);
            let mut release = Vec::new();
            for (i, p) in order.into_iter().enumerate() {
                // A lease without a slot yet (taken by a predecessor of this name) is idle.
                let Some(slot) = slots.get(&p).copied().or((i < excess).then_some(Slot::Idle)) else { continue };
                let next = match (slot, i < excess) {
                    // Revoked, yet held again (a renewal whose reply was lost took it back):
                    // still in flight here.
                    (Slot::InFlight | Slot::Leaving | Slot::Revoked, true) => Slot::Leaving,
                    (_, true) => {
                        release.push(p);
                        Slot::Released
                    }
                    (Slot::Leaving, false) => Slot::InFlight,
                    (Slot::Released, false) => Slot::Idle,
                    (kept, false) => kept,
                };
                slots.insert(p, next);
            }
            release
        };
        for p in release {
            sqlx::query(&sql.lease_release)
                .bind(g)
                .bind(t)
                .bind(i64::from(p))
                .bind(me)
                .execute(&mut *tx)
                .await
                .map_err(other)?;
            mine.retain(|m| *m != p);
        }
        // Taken now, not renewed: held by nobody or by another instance since this one last
        // committed a renewal, which may have moved the position meanwhile.
        let mut taken = Vec::new();
        let mut p = 0;
        while mine.len() < fair && p < self.partitions {
            if !mine.contains(&p) {
                let claimed = sqlx::query(&sql.lease_claim)
                    .bind(g)
                    .bind(t)
                    .bind(i64::from(p))
                    .bind(me)
                    .bind(now + ttl)
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(other)?;
                if claimed.rows_affected() == 1 {
                    mine.push(p);
                    taken.push(p);
                }
            }
            p += 1;
        }
        tx.commit().await.map_err(other)?;
        self.renewed_at.store(now, Ordering::SeqCst);
        let gained = {
            let mut slots = lock(&shared.slots);
            // A partition lost with an event in flight stays, revoked, until that event settles;
            // it is fetched from no more.
            slots.retain(|p, s| {
                if mine.contains(p) {
                    return true;
                }
                match s {
                    Slot::InFlight | Slot::Revoked | Slot::Leaving => {
                        *s = Slot::Revoked;
                        true
                    }
                    _ => false,
                }
            });
            let mut gained = false;
            for p in mine {
                match slots.get(&p) {
                    None => {
                        slots.insert(p, Slot::Idle);
                        gained = true;
                    }
                    Some(Slot::Revoked) => {
                        slots.insert(p, Slot::InFlight);
                    }
                    Some(_) => {}
                }
            }
            // What was read ahead of a partition that is no longer simply held, or that was
            // not held all along, is read again.
            let mut ahead = lock(&shared.ahead);
            ahead.retain(|p, _| matches!(slots.get(p), Some(Slot::Idle | Slot::InFlight)) && !taken.contains(p));
            gained
        };
        if gained {
            shared.wake.notify_waiters();
        }
        Ok(())
    }
}

/// Consecutive events of one partition, settled together.
pub(super) struct Batch {
    shared: Arc<ConsumerShared>,
    partition: u32,
    last: i64,
    retried: bool,
    /// Their positions in the log.
    seqs: Vec<i64>,
    /// The events, in log order.
    pub(super) envelopes: Vec<Envelope>,
    settled: bool,
}

impl Batch {
    /// Keeps the event at `index` as a dead letter of the batch's group, with why, once: a
    /// batch read again (after a crash, a lapsed lease) adds no second letter. The batch's
    /// [`ack`](Self::ack) then passes it with the others.
    pub(super) async fn dead_letter(&self, index: usize, error: String) -> Result<(), TransportError> {
        let (Some(seq), Some(envelope)) = (self.seqs.get(index), self.envelopes.get(index)) else { return Ok(()) };
        let s = &self.shared;
        let envelope = serde_json::to_string(envelope).map_err(other)?;
        let at = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        let _turn = s.transport.inner.gate.enter().await.map_err(other)?;
        sqlx::query(&s.transport.inner.sql.dead_insert_once)
            .bind(&s.group)
            .bind(&s.topic)
            .bind(seq)
            .bind(envelope)
            .bind(1i64)
            .bind(None::<String>)
            .bind(error)
            .bind(1i64)
            .bind(at)
            .execute(&s.transport.inner.pool)
            .await
            .map_err(other)?;
        Ok(())
    }

    /// Done with every event of the batch: one position update.
    pub(super) async fn ack(mut self) -> Result<(), TransportError> {
        let turn = self.shared.transport.inner.gate.enter().await.map_err(other)?;
        let mut conn = self.shared.transport.inner.pool.acquire().await.map_err(other)?;
        self.shared.ack(&mut conn, self.partition, self.last, self.retried).await.map_err(other)?;
        drop((conn, turn));
        self.settled = true;
        self.shared.set(self.partition, Slot::Idle);
        Ok(())
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        if !self.settled {
            self.shared.set(self.partition, Slot::Idle);
        }
    }
}

struct SqlAcker {
    shared: Arc<ConsumerShared>,
    partition: u32,
    seq: i64,
    retried: AtomicBool,
    settled: Arc<AtomicBool>,
}

impl SqlAcker {
    fn finish(&self, slot: Slot) {
        self.settled.store(true, Ordering::SeqCst);
        self.shared.set(self.partition, slot);
    }

    /// Settled by moving the partition's position past it: what was read ahead still holds.
    fn finish_advanced(&self) {
        self.settled.store(true, Ordering::SeqCst);
        self.shared.advanced(self.partition);
    }
}

#[async_trait]
impl Acker for SqlAcker {
    async fn ack(self: Box<Self>) -> Result<(), TransportError> {
        if self.settled.load(Ordering::SeqCst) {
            return Ok(()); // acknowledged in the handling's own transaction
        }
        let (shared, retried) = (&self.shared, self.retried.load(Ordering::SeqCst));
        let within = shared.transport.answer_within();
        let turn = shared.transport.inner.gate.enter().await.map_err(other)?;
        let mut conn = shared.transport.inner.pool.acquire().await.map_err(other)?;
        let acked = shared.ack(&mut conn, self.partition, self.seq, retried);
        let done = tokio::time::timeout(within, async { acked.await.map_err(other) }).await;
        let advanced = answered(conn, done, within, "acknowledging")?;
        drop(turn);
        match advanced {
            true => self.finish_advanced(),
            false => self.finish(Slot::Idle),
        }
        Ok(())
    }

    async fn attempt_failed(&self) -> Result<(), TransportError> {
        let s = &self.shared;
        let _turn = s.transport.inner.gate.enter().await.map_err(other)?;
        sqlx::query(&s.transport.inner.sql.nack)
            .bind(&s.group)
            .bind(&s.topic)
            .bind(self.seq)
            .bind(i64::from(self.partition))
            .bind(&s.owner)
            .execute(&s.transport.inner.pool)
            .await
            .map_err(other)?;
        self.retried.store(true, Ordering::SeqCst);
        Ok(())
    }

    async fn nack(self: Box<Self>, delay: Duration) -> Result<(), TransportError> {
        // A hand-back, not a failure: failures were counted by `attempt_failed` as they
        // happened, and a shutdown during a backoff must not count one twice.
        self.finish(Slot::WaitUntil(Instant::now() + delay));
        Ok(())
    }

    async fn dead_letter(self: Box<Self>, letter: DeadLetter) -> Result<(), TransportError> {
        let s = &self.shared;
        let inner = &s.transport.inner;
        let envelope = serde_json::to_string(&letter.envelope).map_err(other)?;
        let at = letter.at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        let _turn = inner.gate.enter().await.map_err(other)?;
        let mut tx = inner.pool.begin_with(inner.dialect.begin()).await.map_err(other)?;
        // Only the partition's holder sets its events aside: after a takeover the new owner
        // delivers this event again and counts its own attempts (held, the lease stays locked
        // until commit, so no one takes the partition in between).
        let held = sqlx::query(&inner.sql.lease_held)
            .bind(&s.group)
            .bind(&s.topic)
            .bind(i64::from(self.partition))
            .bind(&s.owner)
            .fetch_optional(&mut *tx)
            .await
            .map_err(other)?
            .is_some();
        if !held {
            tracing::info!(group = %s.group, topic = %s.topic, seq = self.seq, "not dead-lettered: another instance holds the partition now");
            drop(tx);
            self.finish(Slot::Idle);
            return Ok(());
        }
        // The position first: when the partition's new owner already passed this event (after
        // a lease lapse), it was handled there, and a letter would be replayed as a second
        // handling. Rolled back, it is not an error: the event is settled.
        if !s.ack(&mut tx, self.partition, self.seq, self.retried.load(Ordering::SeqCst)).await.map_err(other)? {
            tracing::info!(group = %s.group, topic = %s.topic, seq = self.seq, "not dead-lettered: another instance handled it");
            drop(tx);
            self.finish(Slot::Idle);
            return Ok(());
        }
        sqlx::query(&inner.sql.dead_insert)
            .bind(&s.group)
            .bind(&s.topic)
            .bind(self.seq)
            .bind(envelope)
            .bind(i64::from(letter.attempts))
            .bind(&letter.reason.handler)
            .bind(&letter.reason.error)
            .bind(i64::from(letter.reason.permanent))
            .bind(at)
            .execute(&mut *tx)
            .await
            .map_err(other)?;
        tx.commit().await.map_err(other)?;
        self.finish_advanced();
        Ok(())
    }

    async fn begin(&self) -> Result<Option<Box<dyn UnitOfWork>>, TransportError> {
        let delivery = LogDelivery {
            shared: self.shared.clone(),
            partition: self.partition,
            seq: self.seq,
            retried: self.retried.load(Ordering::SeqCst),
            settled: self.settled.clone(),
        };
        Ok(Some(Box::new(SqlUnit::new(self.shared.transport.clone(), Some(delivery)))))
    }
}

impl Drop for SqlAcker {
    fn drop(&mut self) {
        if !self.settled.load(Ordering::SeqCst) {
            // Not settled: the event stays at the head of its partition and goes again.
            self.shared.set(self.partition, Slot::Idle);
        }
    }
}
