//! Appending to the log: a topic's partition count, and events inserted in the caller's
//! transaction, in one of their own, or in a single statement.

use eda_core::{Envelope, TransportError};
use sqlx::AnyConnection;

use super::{lock, other, Dialect, SqlTransport};
use crate::transport::keys::{fnv1a, partition_of};

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

/// Binds `$1` to `$12` of an event insert.
fn bind_event<'q>(query: AnyQuery<'q>, e: &'q Envelope, partition: u32) -> AnyQuery<'q> {
    query
        .bind(&e.topic)
        .bind(i64::from(partition))
        .bind(e.id.to_string())
        .bind(&e.source)
        .bind(&e.ty)
        .bind(humantime::format_rfc3339_micros(e.time).to_string())
        .bind(&e.subject)
        .bind(&e.datacontenttype)
        .bind(&e.correlation_id.0)
        .bind(e.causation_id.map(|c| c.to_string()))
        .bind(&e.traceparent)
        .bind(&e.data)
}

/// What places an event in a partition: its subject (the event's key), else its id.
fn partition_key(e: &Envelope) -> std::borrow::Cow<'_, str> {
    match &e.subject {
        Some(subject) => subject.as_str().into(),
        None => e.id.to_string().into(),
    }
}

/// The advisory lock key of one partition of one topic under one prefix.
fn partition_lock(prefix: &str, topic: &str, partition: u32) -> i64 {
    fnv1a(&[prefix, "partition", topic, &partition.to_string()]) as i64
}

impl SqlTransport {
    /// The partition count of `topic`, fixed when the topic is first used. Runs on `conn` so it
    /// can take part in a transaction that already holds the write lock.
    ///
    /// The count is cached only once the topic is known to be committed (see
    /// [`remember_topics`](Self::remember_topics)): a transaction that created it may still roll back.
    pub(super) async fn partitions(&self, conn: &mut AnyConnection, topic: &str) -> Result<u32, TransportError> {
        if let Some(n) = lock(&self.inner.topics).get(topic) {
            return Ok(*n);
        }
        let sql = &self.inner.sql;
        sqlx::query(&sql.topic_insert)
            .bind(topic)
            .bind(i64::from(self.inner.options.partitions))
            .execute(&mut *conn)
            .await
            .map_err(other)?;
        let n: i64 = sqlx::query_scalar(&sql.topic_select).bind(topic).fetch_one(&mut *conn).await.map_err(other)?;
        Ok(u32::try_from(n).unwrap_or(1).max(1))
    }

    /// The partition count of `topic`, which is created, committed, on a connection of its own
    /// when it is new.
    pub(super) async fn partitions_committed(&self, topic: &str) -> Result<u32, TransportError> {
        if let Some(n) = lock(&self.inner.topics).get(topic) {
            return Ok(*n);
        }
        // Not from the pool: the caller may hold the pool's last connection.
        let mut conn = self.inner.leases.acquire().await.map_err(other)?;
        let n = self.partitions(&mut conn, topic).await?;
        self.remember_topics([(topic, n)]);
        Ok(n)
    }

    /// Caches the partition counts of topics whose creation has committed.
    pub(super) fn remember_topics<'a>(&self, committed: impl IntoIterator<Item = (&'a str, u32)>) {
        let mut topics = lock(&self.inner.topics);
        for (topic, n) in committed {
            topics.entry(topic.to_owned()).or_insert(n);
        }
    }

    /// Appends events in one transaction of their own, and caches what it created.
    pub(super) async fn insert_committed(&self, envelopes: &[Envelope]) -> Result<(), TransportError> {
        let _turn = self.inner.gate.enter().await.map_err(other)?;
        if let [e] = envelopes {
            // One statement is a transaction of its own: no BEGIN and COMMIT round trips.
            let partitions = match self.inner.dialect {
                Dialect::Postgres => Some(self.partitions_committed(&e.topic).await?),
                Dialect::Sqlite => lock(&self.inner.topics).get(&e.topic).copied(),
            };
            if let Some(partitions) = partitions {
                let partition = partition_of(&partition_key(e), partitions);
                let mut conn = self.inner.pool.acquire().await.map_err(other)?;
                return match self.inner.dialect {
                    // SQLite's single writer orders the log without a partition lock.
                    Dialect::Sqlite => self.insert_event(&mut conn, e, partition).await,
                    Dialect::Postgres => self.insert_event_locked(&mut conn, e, partition).await,
                };
            }
        }
        let mut tx = self.inner.pool.begin_with(self.inner.dialect.begin()).await.map_err(other)?;
        let placed = self.insert(&mut tx, envelopes).await?;
        tx.commit().await.map_err(other)?;
        self.remember_topics(placed.iter().map(|(t, n)| (t.as_str(), *n)));
        Ok(())
    }

    /// Appends events to the log on `conn`, inside the caller's transaction. On PostgreSQL the
    /// partitions written to are locked first, in one order, so that sequence order equals
    /// commit order within a partition: a consumer that has read past a sequence number never
    /// sees an earlier one commit later.
    /// Returns each topic written to with its partition count.
    pub(super) async fn insert(
        &self,
        conn: &mut AnyConnection,
        envelopes: &[Envelope],
    ) -> Result<Vec<(String, u32)>, TransportError> {
        let mut placed = Vec::with_capacity(envelopes.len());
        let mut topics: Vec<(String, u32)> = Vec::new();
        for e in envelopes {
            let partitions = match self.inner.dialect {
                // A topic made inside the caller's transaction would hold its row locked until
                // that commits, and every other publisher to the topic would wait on it.
                Dialect::Postgres => self.partitions_committed(&e.topic).await?,
                // SQLite's single writer: the caller's transaction may already hold it.
                Dialect::Sqlite => self.partitions(conn, &e.topic).await?,
            };
            if !topics.iter().any(|(t, _)| *t == e.topic) {
                topics.push((e.topic.clone(), partitions));
            }
            placed.push((e, partition_of(&partition_key(e), partitions)));
        }
        if let Some(lock) = self.inner.dialect.lock() {
            let mut keys: Vec<(i64, &str, u32)> = placed
                .iter()
                .map(|(e, p)| (partition_lock(&self.inner.options.prefix, &e.topic, *p), e.topic.as_str(), *p))
                .collect();
            keys.sort_unstable_by_key(|(key, _, _)| *key);
            keys.dedup_by_key(|(key, _, _)| *key);
            for (key, topic, partition) in keys {
                sqlx::query(lock)
                    .bind(key)
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| self.lock_failed(&e, topic, partition).unwrap_or_else(|| other(e)))?;
            }
        }
        if let Some(notify) = self.inner.dialect.notify() {
            if self.notify_now() {
                // Delivered at commit, and not at all on rollback.
                sqlx::query(notify).bind(self.channel()).bind("").execute(&mut *conn).await.map_err(other)?;
            }
        }
        for (e, partition) in placed {
            self.insert_event(conn, e, partition).await?;
        }
        Ok(topics)
    }

    /// Appends one event to `partition` of its topic on `conn`.
    async fn insert_event(&self, conn: &mut AnyConnection, e: &Envelope, partition: u32) -> Result<(), TransportError> {
        bind_event(sqlx::query(&self.inner.sql.insert_event), e, partition)
            .execute(&mut *conn)
            .await
            .map_err(|err| self.publish_rejected(&e.topic, err))?;
        Ok(())
    }

    /// PostgreSQL: appends one event in a statement of its own (outside any transaction) that
    /// takes the partition's lock first, and notifies listeners when it is time to.
    async fn insert_event_locked(
        &self,
        conn: &mut AnyConnection,
        e: &Envelope,
        partition: u32,
    ) -> Result<(), TransportError> {
        let (sql, lock) = (&self.inner.sql, partition_lock(&self.inner.options.prefix, &e.topic, partition));
        let query = match self.notify_now() {
            true => {
                bind_event(sqlx::query(&sql.insert_event_locked_notify), e, partition).bind(lock).bind(self.channel())
            }
            false => bind_event(sqlx::query(&sql.insert_event_locked), e, partition).bind(lock),
        };
        query.execute(&mut *conn).await.map_err(|err| match self.lock_failed(&err, &e.topic, partition) {
            Some(refused) => refused,
            None => self.publish_rejected(&e.topic, err),
        })?;
        Ok(())
    }

    /// The database refused the event; anything else (a lost connection, a pool timeout) is
    /// an error of the transport, worth trying again.
    fn publish_rejected(&self, topic: &str, err: sqlx::Error) -> TransportError {
        if err.as_database_error().is_none() {
            return other(err);
        }
        TransportError::PublishRejected {
            transport: self.inner.dialect.name(),
            topic: topic.to_owned(),
            reason: err.to_string(),
        }
    }

    /// Why a partition lock could not be taken, and what to do about it, when `e` says so: the
    /// timeout and the deadlock are the application's to fix. `None` for any other error.
    fn lock_failed(&self, e: &sqlx::Error, topic: &str, partition: u32) -> Option<TransportError> {
        let code = e.as_database_error().and_then(|d| d.code()).map(|c| c.into_owned());
        let reason = match code.as_deref() {
            Some("55P03") => format!(
                "waited longer than the lock timeout ({:?}) for partition {partition}, which another transaction has published to and not yet committed: keep transactions that publish short, or raise `SqlOptions::lock_timeout`",
                self.inner.options.lock_timeout.unwrap_or_default()
            ),
            Some("40P01") => format!(
                "PostgreSQL ended this transaction to break a deadlock on partition {partition}: another transaction published to the same partitions in the opposite order; publish a transaction's events with one `publish_all_in`, which locks their partitions in one order, and run the transaction again"
            ),
            _ => return None,
        };
        Some(TransportError::PublishRejected { transport: self.inner.dialect.name(), topic: topic.to_owned(), reason })
    }
}
