//! One attempt of one handler against the SQL log: reads first, then one write transaction.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use eda_core::{Claim, Commit, CorrelationId, Envelope, GuardKey, StepState, StoreError, TransportError, UnitOfWork};

use super::consumer::ConsumerShared;
use super::schema::Sql;
use super::{fnv1a, now_ms, other, store, unreachable, LazyTransaction, SqlTransport};

/// The log delivery a unit settles when it commits with `ack`.
pub(super) struct LogDelivery {
    pub(super) shared: Arc<ConsumerShared>,
    pub(super) partition: u32,
    pub(super) seq: i64,
    pub(super) retried: bool,
    pub(super) settled: Arc<AtomicBool>,
}

/// One attempt of one handler: reads first, then one write transaction that the handler may
/// open early for its own writes. It handles a delivery of this log, or (as a [`Store`]) one
/// of a broker, whose emitted events then wait in this log for the relay.
///
/// [`Store`]: eda_core::Store
pub(super) struct SqlUnit {
    pub(super) transport: SqlTransport,
    pub(super) delivery: Option<LogDelivery>,
    /// `None` while lent to the handler.
    pub(super) lazy: Option<Box<LazyTransaction>>,
    pub(super) claim: Option<GuardKey>,
    pub(super) step: Option<(String, String, CorrelationId)>,
    pub(super) step_succeeded: Option<bool>,
    /// The step a compensator undoes, and whether it found it done: checked again at commit.
    pub(super) compensated: Option<((String, String, CorrelationId), bool)>,
    pub(super) envelopes: Vec<Envelope>,
    /// Topics written to, to cache once committed.
    pub(super) topics: Vec<(String, u32)>,
}

impl SqlUnit {
    /// A unit for a handling whose delivery, if any, is settled elsewhere.
    pub(super) fn new(transport: SqlTransport, delivery: Option<LogDelivery>) -> Self {
        let lazy = LazyTransaction::new(&transport);
        Self {
            transport,
            delivery,
            lazy: Some(Box::new(lazy)),
            claim: None,
            step: None,
            step_succeeded: None,
            compensated: None,
            envelopes: Vec::new(),
            topics: Vec::new(),
        }
    }

    fn sql(&self) -> &Sql {
        &self.transport.inner.sql
    }

    fn lazy(&mut self) -> Result<&mut LazyTransaction, sqlx::Error> {
        self.lazy.as_deref_mut().ok_or_else(|| sqlx::Error::Protocol("the handler kept the transaction".into()))
    }

    /// Runs a read in the transaction when it is open, on the pool otherwise.
    async fn read_step(
        &mut self,
        group: &str,
        step: &str,
        correlation: &CorrelationId,
    ) -> Result<Option<String>, sqlx::Error> {
        let sql = self.sql().step_select.clone();
        let query = sqlx::query_scalar(&sql).bind(group).bind(step).bind(&correlation.0);
        let lazy = self.lazy()?;
        match lazy.tx.as_deref_mut() {
            Some(conn) => query.fetch_optional(conn).await,
            None => query.fetch_optional(&lazy.pool).await,
        }
    }

    async fn write_step(
        &mut self,
        group: &str,
        step: &str,
        correlation: &CorrelationId,
        state: &str,
    ) -> Result<(), sqlx::Error> {
        let sql = self.sql().step_upsert.clone();
        let conn = self.lazy()?.conn().await?;
        sqlx::query(&sql).bind(group).bind(step).bind(&correlation.0).bind(state).bind(now_ms()).execute(conn).await?;
        Ok(())
    }

    /// Serializes everything that decides about one saga step (PostgreSQL; SQLite's single
    /// writer already does), so a step and its compensator never both think they went first.
    ///
    /// It opens the write transaction in both dialects: on SQLite that is the lock, and a step
    /// record read before it could be stale by the time anything is written; so it is taken
    /// at commit only, and what was read before it is read again after it.
    async fn lock_step(&mut self, group: &str, step: &str, correlation: &CorrelationId) -> Result<(), sqlx::Error> {
        let inner = self.transport.inner.clone();
        let conn = self.lazy()?.conn().await?;
        if let Some(lock) = inner.dialect.lock() {
            let key = fnv1a(&[&inner.options.prefix, "step", group, step, &correlation.0]) as i64;
            sqlx::query(lock).bind(key).execute(conn).await?;
        }
        Ok(())
    }

    async fn write(&mut self, ack: bool) -> Result<Commit, sqlx::Error> {
        let sql_claim = self.sql().inbox_claim.clone();
        let sql_delete = self.sql().step_delete.clone();
        if let Some(key) = self.claim.clone() {
            let conn = self.lazy()?.conn().await?;
            let claimed = sqlx::query(&sql_claim)
                .bind(&key.group)
                .bind(&key.handler)
                .bind(&key.key)
                .bind(now_ms())
                .execute(conn)
                .await?;
            if claimed.rows_affected() == 0 {
                return Ok(Commit::Duplicate);
            }
        }
        if let Some(((group, step, correlation), found_done)) = self.compensated.clone() {
            // Decided on a read without a lock (so the handler ran holding none); under the
            // lock now, the decision must still hold: a step that committed "done" meanwhile
            // must be compensated, not cancelled.
            self.lock_step(&group, &step, &correlation).await?;
            let done = self.read_step(&group, &step, &correlation).await?.as_deref() == Some("done");
            if done != found_done {
                return Err(sqlx::Error::Protocol(format!(
                    "saga step `{group}/{step}` changed while its compensation ran; it is decided again"
                )));
            }
            if !done {
                self.write_step(&group, &step, &correlation, "cancelled").await?;
            }
        }
        if let Some((group, step, correlation)) = self.step.clone() {
            self.lock_step(&group, &step, &correlation).await?;
            if self.read_step(&group, &step, &correlation).await?.as_deref() == Some("cancelled") {
                return Ok(Commit::Cancelled);
            }
            match self.step_succeeded {
                Some(true) => self.write_step(&group, &step, &correlation, "done").await?,
                _ => {
                    let conn = self.lazy()?.conn().await?;
                    sqlx::query(&sql_delete).bind(&group).bind(&step).bind(&correlation.0).execute(conn).await?;
                }
            }
        }
        let envelopes = std::mem::take(&mut self.envelopes);
        let transport = self.transport.clone();
        let conn = self.lazy()?.conn().await?;
        self.topics = transport.insert(conn, &envelopes).await.map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
        if let (true, Some(d)) = (ack, &self.delivery) {
            let (shared, partition, seq, retried) = (d.shared.clone(), d.partition, d.seq, d.retried);
            if !shared.ack(self.lazy()?.conn().await?, partition, seq, retried).await? {
                // Fenced off: the partition's new holder got here first. Write nothing.
                return Ok(Commit::Duplicate);
            }
        }
        Ok(Commit::Done)
    }
}

#[async_trait]
impl UnitOfWork for SqlUnit {
    async fn claim(&mut self, key: &GuardKey) -> Result<Claim, StoreError> {
        let sql = self.sql().inbox_seen.clone();
        let query = sqlx::query_scalar::<_, i64>(&sql).bind(&key.group).bind(&key.handler).bind(&key.key);
        let lazy = self.lazy().map_err(store)?;
        let seen = match lazy.tx.as_deref_mut() {
            Some(conn) => query.fetch_one(conn).await,
            None => query.fetch_one(&lazy.pool).await,
        }
        .map_err(store)?;
        if seen > 0 {
            return Ok(Claim::Done);
        }
        self.claim = Some(key.clone());
        Ok(Claim::Acquired)
    }

    async fn step_started(&mut self, group: &str, step: &str, correlation: &CorrelationId) -> Result<bool, StoreError> {
        let state = self.read_step(group, step, correlation).await.map_err(store)?;
        self.step = Some((group.to_owned(), step.to_owned(), correlation.clone()));
        Ok(state.as_deref() != Some("cancelled"))
    }

    fn step_finished(&mut self, _group: &str, _step: &str, _correlation: &CorrelationId, succeeded: bool) {
        self.step_succeeded = Some(succeeded);
    }

    async fn compensation_started(
        &mut self,
        group: &str,
        step: &str,
        correlation: &CorrelationId,
    ) -> Result<StepState, StoreError> {
        // Read without a lock: the write transaction (on SQLite the database-wide write lock)
        // is not held while the compensator runs. The commit checks the step again under the
        // lock and writes "cancelled" there when it had not run.
        let done = self.read_step(group, step, correlation).await.map_err(store)?.as_deref() == Some("done");
        self.compensated = Some(((group.to_owned(), step.to_owned(), correlation.clone()), done));
        Ok(if done { StepState::Done } else { StepState::NotRun })
    }

    fn lend_transaction(&mut self) -> Option<Box<dyn std::any::Any + Send>> {
        self.lazy.take().map(|lazy| -> Box<dyn std::any::Any + Send> { Box::new(*lazy) })
    }

    fn return_transaction(&mut self, transaction: Box<dyn std::any::Any + Send>) {
        if let Ok(lazy) = transaction.downcast::<LazyTransaction>() {
            self.lazy = Some(lazy);
        }
    }

    fn publish(&mut self, envelopes: Vec<Envelope>) {
        self.envelopes.extend(envelopes);
    }

    async fn commit(mut self: Box<Self>, ack: bool) -> Result<Commit, TransportError> {
        // Bounded here too: a connection cut off without a word (a failover, a partition)
        // would hold the partition in flight for as long as the OS keeps the socket. Whether
        // it committed is then unknown; the event comes again and the guard tells.
        let within = self.transport.answer_within();
        match tokio::time::timeout(within, self.commit_now(ack)).await {
            Ok(done) => done,
            Err(_) => {
                Err(unreachable(format!("the database did not answer within {within:?} while committing a handling")))
            }
        }
    }
}

impl SqlUnit {
    async fn commit_now(&mut self, ack: bool) -> Result<Commit, TransportError> {
        let outcome = self.write(ack).await.map_err(other)?;
        let tx = self.lazy.as_mut().and_then(|l| l.tx.take());
        if outcome != Commit::Done {
            return Ok(outcome); // dropping the transaction rolls it back
        }
        if let Some(tx) = tx {
            tx.commit().await.map_err(other)?;
        }
        if !self.topics.is_empty() {
            self.transport.remember_topics(self.topics.iter().map(|(t, n)| (t.as_str(), *n)));
            self.transport.inner.published.notify_waiters();
        }
        if let (true, Some(d)) = (ack, &self.delivery) {
            d.settled.store(true, Ordering::SeqCst);
            d.shared.advanced(d.partition);
        }
        Ok(Commit::Done)
    }
}
