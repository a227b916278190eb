//! The embedded durable log: one SQLite file holds the log of every topic, each consumer
//! group's offsets, partition leases, the inbox, saga records and dead letters.
//!
//! A topic's events are spread over a fixed number of partitions by key, so events of one key
//! stay in one partition, in order. Each consumer instance holds leases on a fair share of the
//! partitions of its group (instances may live in several processes sharing the file), handles
//! one event at a time per partition, and commits each handling — the guard record, the
//! handler's own writes through [`transaction`], the events it emits and the new offset — in one
//! SQLite transaction. Delivery is at least once; effects are exactly once.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use eda_core::{
    Acker, Claim, Commit, CorrelationId, Ctx, DeadLetter, DeadLetterReason, DeadLetterStore, Deliveries, Delivery,
    Envelope, EventId, GuardKey, HandlerError, PartitionLag, StepState, StoreError, Subscription, Transport,
    TransportError, UnitOfWork,
};
pub use sqlx;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous};
use sqlx::{Row, SqliteConnection, SqlitePool};
use tokio::sync::Notify;
use tokio::time::Instant;

/// The transaction type behind [`transaction`].
pub type SqliteTransaction = sqlx::Transaction<'static, sqlx::Sqlite>;

/// The SQLite transaction of the current handling, opened on first use: the handler's writes
/// through it commit together with the guard record, the emitted events and the offset, or not
/// at all. A handler that never asks for it runs without holding SQLite's write lock.
///
/// ```no_run
/// # use eda::{event, handler, Ctx, HandlerError};
/// # #[event(topic = "orders")]
/// # #[derive(serde::Serialize, serde::Deserialize)]
/// # struct OrderPlaced { id: String }
/// #[handler(group = "orders-db")]
/// async fn store_order(ev: OrderPlaced, cx: Ctx<'_>) -> Result<(), HandlerError> {
///     let mut tx = eda::sqlite::transaction(&cx).await?;
///     eda::sqlite::sqlx::query("INSERT INTO orders (id) VALUES (?1)").bind(&ev.id).execute(&mut **tx).await?;
///     Ok(())
/// }
/// ```
pub async fn transaction<'a, S>(cx: &Ctx<'a, S>) -> Result<HandlerTransaction<'a>, HandlerError> {
    let mut lazy = cx.transaction::<LazyTransaction>().await.ok_or_else(|| {
        HandlerError::permanent("this handler runs without a SQLite transaction: run it on a `sqlite://` transport")
    })?;
    if lazy.tx.is_none() {
        let tx = lazy.pool.begin_with("BEGIN IMMEDIATE").await.map_err(HandlerError::transient)?;
        lazy.tx = Some(tx);
    }
    Ok(HandlerTransaction(lazy))
}

/// A handler's borrow of its SQLite transaction; dereferences to [`SqliteTransaction`], so
/// `&mut **tx` is the connection to run queries on.
pub struct HandlerTransaction<'a>(eda_core::Transaction<'a, LazyTransaction>);

impl std::ops::Deref for HandlerTransaction<'_> {
    type Target = SqliteTransaction;
    fn deref(&self) -> &SqliteTransaction {
        match self.0.tx.as_ref() {
            Some(tx) => tx,
            None => unreachable!("opened before the borrow was handed out"),
        }
    }
}

impl std::ops::DerefMut for HandlerTransaction<'_> {
    fn deref_mut(&mut self) -> &mut SqliteTransaction {
        match self.0.tx.as_mut() {
            Some(tx) => tx,
            None => unreachable!("opened before the borrow was handed out"),
        }
    }
}

/// The transaction of one handling, opened when first needed.
struct LazyTransaction {
    pool: SqlitePool,
    tx: Option<SqliteTransaction>,
}

impl LazyTransaction {
    async fn conn(&mut self) -> Result<&mut SqliteConnection, sqlx::Error> {
        if self.tx.is_none() {
            self.tx = Some(self.pool.begin_with("BEGIN IMMEDIATE").await?);
        }
        match self.tx.as_deref_mut() {
            Some(conn) => Ok(conn),
            None => Err(sqlx::Error::PoolClosed),
        }
    }
}

/// Settings of a [`SqliteTransport`].
#[derive(Clone, Debug)]
pub struct SqliteOptions {
    url: String,
    prefix: String,
    partitions: u32,
    lease_ttl: Duration,
    poll_interval: Duration,
    instance: Option<String>,
    max_connections: u32,
}

impl SqliteOptions {
    /// Options for the database at `url` (`sqlite://path/to/file.db`; created if missing).
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefix: "eda_".into(),
            partitions: 8,
            lease_ttl: Duration::from_secs(6),
            poll_interval: Duration::from_millis(50),
            instance: None,
            max_connections: 8,
        }
    }

    /// The prefix of eda's tables (`eda_` by default): letters, digits and `_`.
    pub fn table_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How many partitions a new topic gets (8 by default). A topic keeps the count it was
    /// created with; it bounds how many events of one group run at once.
    pub fn partitions(mut self, n: u32) -> Self {
        self.partitions = n.max(1);
        self
    }

    /// How long a consumer's claim on a partition lasts without renewal (6 s by default): after
    /// a crash, another instance takes the partition over within this time.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl.max(Duration::from_millis(300));
        self
    }

    /// How often to look for events published by other processes (50 ms by default; events
    /// published in this process wake consumers at once).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// A stable name for this instance: a restarted process with the same name takes its
    /// partitions back at once instead of waiting for its old leases to expire.
    pub fn instance_id(mut self, id: impl Into<String>) -> Self {
        self.instance = Some(id.into());
        self
    }

    /// Opens (or creates) the database and brings its schema up to date.
    pub async fn connect(self) -> Result<SqliteTransport, TransportError> {
        SqliteTransport::open(self).await
    }
}

/// The SQLite transport. Clones share one connection pool.
#[derive(Clone)]
pub struct SqliteTransport {
    inner: Arc<Inner>,
}

struct Inner {
    pool: SqlitePool,
    sql: Sql,
    options: SqliteOptions,
    instance: String,
    published: Notify,
    topics: Mutex<HashMap<String, u32>>,
    owners: Mutex<Vec<(String, String, String)>>,
}

fn unreachable(reason: impl std::fmt::Display) -> TransportError {
    TransportError::Unreachable { transport: "sqlite", reason: reason.to_string() }
}

fn other(e: impl std::error::Error + Send + Sync + 'static) -> TransportError {
    TransportError::Other { transport: "sqlite", source: Box::new(e) }
}

fn store(e: sqlx::Error) -> StoreError {
    StoreError { store: "sqlite", source: Box::new(e) }
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// FNV-1a: stable across processes and versions, unlike `std`'s hasher.
fn partition_of(key: &str, partitions: u32) -> u32 {
    let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    (hash % u64::from(partitions.max(1))) as u32
}

/// eda's SQL, with the table prefix filled in once.
struct Sql {
    migrate: Vec<String>,
    insert_event: String,
    topic_insert: String,
    topic_select: String,
    next_event: String,
    ack: String,
    clear_attempts: String,
    nack: String,
    member_upsert: String,
    members_expire: String,
    members_count: String,
    leases_renew: String,
    leases_mine: String,
    lease_claim: String,
    lease_release: String,
    leases_release_owner: String,
    members_release_owner: String,
    lag: String,
    inbox_claim: String,
    step_select: String,
    step_upsert: String,
    step_delete: String,
    dead_insert: String,
    dead_select: String,
}

impl Sql {
    fn new(p: &str) -> Self {
        let v1 = format!(
            "CREATE TABLE IF NOT EXISTS {p}topics (topic TEXT PRIMARY KEY, partitions INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS {p}log (
                 seq INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, partition INTEGER NOT NULL,
                 id TEXT NOT NULL, source TEXT NOT NULL, type TEXT NOT NULL, time TEXT NOT NULL, subject TEXT,
                 datacontenttype TEXT NOT NULL, correlation_id TEXT NOT NULL, causation_id TEXT, traceparent TEXT,
                 data BLOB NOT NULL);
             CREATE INDEX IF NOT EXISTS {p}log_by_partition ON {p}log (topic, partition, seq);
             CREATE TABLE IF NOT EXISTS {p}offsets (grp TEXT NOT NULL, topic TEXT NOT NULL, partition INTEGER NOT NULL,
                 position INTEGER NOT NULL, PRIMARY KEY (grp, topic, partition));
             CREATE TABLE IF NOT EXISTS {p}attempts (grp TEXT NOT NULL, topic TEXT NOT NULL, seq INTEGER NOT NULL,
                 attempts INTEGER NOT NULL, PRIMARY KEY (grp, topic, seq));
             CREATE TABLE IF NOT EXISTS {p}leases (grp TEXT NOT NULL, topic TEXT NOT NULL, partition INTEGER NOT NULL,
                 owner TEXT NOT NULL, expires_at INTEGER NOT NULL, PRIMARY KEY (grp, topic, partition));
             CREATE TABLE IF NOT EXISTS {p}members (grp TEXT NOT NULL, topic TEXT NOT NULL, owner TEXT NOT NULL,
                 seen_at INTEGER NOT NULL, PRIMARY KEY (grp, topic, owner));
             CREATE TABLE IF NOT EXISTS {p}inbox (grp TEXT NOT NULL, handler TEXT NOT NULL, key TEXT NOT NULL,
                 handled_at INTEGER NOT NULL, PRIMARY KEY (grp, handler, key));
             CREATE TABLE IF NOT EXISTS {p}steps (grp TEXT NOT NULL, step TEXT NOT NULL, correlation_id TEXT NOT NULL,
                 state TEXT NOT NULL, updated_at INTEGER NOT NULL, PRIMARY KEY (grp, step, correlation_id));
             CREATE TABLE IF NOT EXISTS {p}dead_letters (id INTEGER PRIMARY KEY AUTOINCREMENT, grp TEXT NOT NULL,
                 topic TEXT NOT NULL, seq INTEGER NOT NULL, envelope TEXT NOT NULL, attempts INTEGER NOT NULL,
                 handler TEXT, error TEXT NOT NULL, permanent INTEGER NOT NULL, at INTEGER NOT NULL);"
        );
        let columns =
            "id, source, type, time, subject, datacontenttype, correlation_id, causation_id, traceparent, data";
        Self {
            migrate: vec![v1],
            insert_event: format!(
                "INSERT INTO {p}log (topic, partition, {columns}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
            ),
            topic_insert: format!("INSERT INTO {p}topics (topic, partitions) VALUES (?1, ?2) ON CONFLICT DO NOTHING"),
            topic_select: format!("SELECT partitions FROM {p}topics WHERE topic = ?1"),
            next_event: format!(
                "SELECT l.seq, {columns},
                    COALESCE((SELECT attempts FROM {p}attempts a WHERE a.grp = ?1 AND a.topic = ?2 AND a.seq = l.seq), 0) AS attempts
                 FROM {p}log l
                 WHERE l.topic = ?2 AND l.partition = ?3
                   AND l.seq > COALESCE((SELECT position FROM {p}offsets o
                                         WHERE o.grp = ?1 AND o.topic = ?2 AND o.partition = ?3), 0)
                 ORDER BY l.seq LIMIT 1"
            ),
            ack: format!(
                "INSERT INTO {p}offsets (grp, topic, partition, position) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (grp, topic, partition) DO UPDATE SET position = excluded.position
                 WHERE excluded.position > {p}offsets.position"
            ),
            clear_attempts: format!("DELETE FROM {p}attempts WHERE grp = ?1 AND topic = ?2 AND seq = ?3"),
            nack: format!(
                "INSERT INTO {p}attempts (grp, topic, seq, attempts) VALUES (?1, ?2, ?3, 1)
                 ON CONFLICT (grp, topic, seq) DO UPDATE SET attempts = attempts + 1"
            ),
            member_upsert: format!(
                "INSERT INTO {p}members (grp, topic, owner, seen_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (grp, topic, owner) DO UPDATE SET seen_at = excluded.seen_at"
            ),
            members_expire: format!("DELETE FROM {p}members WHERE grp = ?1 AND topic = ?2 AND seen_at < ?3"),
            members_count: format!("SELECT COUNT(*) FROM {p}members WHERE grp = ?1 AND topic = ?2"),
            leases_renew: format!("UPDATE {p}leases SET expires_at = ?4 WHERE grp = ?1 AND topic = ?2 AND owner = ?3"),
            leases_mine: format!("SELECT partition FROM {p}leases WHERE grp = ?1 AND topic = ?2 AND owner = ?3"),
            lease_claim: format!(
                "INSERT INTO {p}leases (grp, topic, partition, owner, expires_at) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (grp, topic, partition) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at
                 WHERE {p}leases.expires_at < ?6 OR {p}leases.owner = excluded.owner"
            ),
            lease_release: format!(
                "DELETE FROM {p}leases WHERE grp = ?1 AND topic = ?2 AND partition = ?3 AND owner = ?4"
            ),
            leases_release_owner: format!("DELETE FROM {p}leases WHERE grp = ?1 AND topic = ?2 AND owner = ?3"),
            members_release_owner: format!("DELETE FROM {p}members WHERE grp = ?1 AND topic = ?2 AND owner = ?3"),
            lag: format!(
                "SELECT l.partition, COUNT(*) FROM {p}log l
                 LEFT JOIN {p}offsets o ON o.grp = ?1 AND o.topic = l.topic AND o.partition = l.partition
                 WHERE l.topic = ?2 AND l.seq > COALESCE(o.position, 0)
                 GROUP BY l.partition"
            ),
            inbox_claim: format!(
                "INSERT INTO {p}inbox (grp, handler, key, handled_at) VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING"
            ),
            step_select: format!("SELECT state FROM {p}steps WHERE grp = ?1 AND step = ?2 AND correlation_id = ?3"),
            step_upsert: format!(
                "INSERT INTO {p}steps (grp, step, correlation_id, state, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (grp, step, correlation_id) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at"
            ),
            step_delete: format!("DELETE FROM {p}steps WHERE grp = ?1 AND step = ?2 AND correlation_id = ?3"),
            dead_insert: format!(
                "INSERT INTO {p}dead_letters (grp, topic, seq, envelope, attempts, handler, error, permanent, at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
            ),
            dead_select: format!(
                "SELECT envelope, attempts, handler, error, permanent, at FROM {p}dead_letters WHERE grp = ?1 ORDER BY id"
            ),
        }
    }
}

impl SqliteTransport {
    /// Opens the database at `url` with default options.
    pub async fn connect(url: &str) -> Result<Self, TransportError> {
        SqliteOptions::new(url).connect().await
    }

    async fn open(options: SqliteOptions) -> Result<Self, TransportError> {
        if options.prefix.is_empty() || !options.prefix.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(unreachable(format!(
                "table prefix `{}` is not valid: use letters, digits and `_`",
                options.prefix
            )));
        }
        if options.url.contains(":memory:") || options.url.contains("mode=memory") {
            return Err(unreachable(
                "an in-memory SQLite database is private to each connection and cannot hold a shared log; use a file (`sqlite://eda.db`) or `memory://`",
            ));
        }
        let connect = SqliteConnectOptions::from_str(&options.url)
            .map_err(|e| {
                unreachable(format!("`{}` is not a SQLite URL ({e}); write `sqlite://path/to/file.db`", options.url))
            })?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(options.max_connections)
            .connect_with(connect)
            .await
            .map_err(|e| unreachable(format!("cannot open `{}`: {e}", options.url)))?;
        let instance = options.instance.clone().unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        let inner = Inner {
            pool,
            sql: Sql::new(&options.prefix),
            options,
            instance,
            published: Notify::new(),
            topics: Mutex::default(),
            owners: Mutex::default(),
        };
        let transport = Self { inner: Arc::new(inner) };
        transport.migrate().await?;
        Ok(transport)
    }

    /// Creates eda's tables, or brings them to the current version. Safe to run from several
    /// processes at once: it runs in one write transaction.
    async fn migrate(&self) -> Result<(), TransportError> {
        let p = &self.inner.options.prefix;
        let mut tx = self.inner.pool.begin_with("BEGIN IMMEDIATE").await.map_err(other)?;
        sqlx::raw_sql(&format!("CREATE TABLE IF NOT EXISTS {p}schema (version INTEGER NOT NULL)"))
            .execute(&mut *tx)
            .await
            .map_err(other)?;
        let current: i64 = sqlx::query_scalar(&format!("SELECT COALESCE(MAX(version), 0) FROM {p}schema"))
            .fetch_one(&mut *tx)
            .await
            .map_err(other)?;
        let known = self.inner.sql.migrate.len() as i64;
        if current > known {
            return Err(unreachable(format!(
                "the database's eda schema is version {current}, newer than this build knows ({known}): upgrade eda"
            )));
        }
        for (i, step) in self.inner.sql.migrate.iter().enumerate().skip(current as usize) {
            sqlx::raw_sql(step).execute(&mut *tx).await.map_err(other)?;
            sqlx::query(&format!("INSERT INTO {p}schema (version) VALUES (?1)"))
                .bind(i as i64 + 1)
                .execute(&mut *tx)
                .await
                .map_err(other)?;
        }
        tx.commit().await.map_err(other)
    }

    /// The connection pool, for application tables in the same file.
    pub fn pool(&self) -> &SqlitePool {
        &self.inner.pool
    }
}

#[async_trait]
impl DeadLetterStore for SqliteTransport {
    async fn dead_letters(&self, group: &str) -> Result<Vec<DeadLetter>, TransportError> {
        let rows =
            sqlx::query(&self.inner.sql.dead_select).bind(group).fetch_all(&self.inner.pool).await.map_err(other)?;
        rows.iter()
            .map(|row| {
                let envelope: String = row.try_get(0).map_err(other)?;
                let envelope = serde_json::from_str(&envelope).map_err(other)?;
                let at: i64 = row.try_get(5).map_err(other)?;
                Ok(DeadLetter {
                    envelope,
                    attempts: row.try_get::<i64, _>(1).map_err(other)? as u32,
                    reason: DeadLetterReason {
                        handler: row.try_get(2).map_err(other)?,
                        error: row.try_get(3).map_err(other)?,
                        permanent: row.try_get::<i64, _>(4).map_err(other)? != 0,
                    },
                    at: UNIX_EPOCH + Duration::from_millis(at.max(0) as u64),
                })
            })
            .collect()
    }
}

impl SqliteTransport {
    /// The partition count of `topic`, fixed when the topic is first used. Runs on `conn` so it
    /// can take part in a transaction that already holds the write lock.
    async fn partitions(&self, conn: &mut SqliteConnection, topic: &str) -> Result<u32, TransportError> {
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
        let n = u32::try_from(n).unwrap_or(1).max(1);
        lock(&self.inner.topics).insert(topic.to_owned(), n);
        Ok(n)
    }

    async fn insert(&self, conn: &mut SqliteConnection, envelopes: &[Envelope]) -> Result<(), TransportError> {
        for e in envelopes {
            let partitions = self.partitions(conn, &e.topic).await?;
            let key = e.subject.clone().unwrap_or_else(|| e.id.to_string());
            sqlx::query(&self.inner.sql.insert_event)
                .bind(&e.topic)
                .bind(i64::from(partition_of(&key, partitions)))
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
                .execute(&mut *conn)
                .await
                .map_err(|err| TransportError::PublishRejected {
                    transport: "sqlite",
                    topic: e.topic.clone(),
                    reason: err.to_string(),
                })?;
        }
        Ok(())
    }
}

/// Reads a stored event: the envelope, as much of it as could be read, and what is wrong with
/// the row when it is not a valid envelope.
fn envelope_of(row: &SqliteRow, topic: &str) -> (Envelope, Option<String>) {
    let text = |i: usize| row.try_get::<String, _>(i).unwrap_or_default();
    let opt = |i: usize| row.try_get::<Option<String>, _>(i).ok().flatten();
    let mut problems = Vec::new();
    let id = text(1).parse::<EventId>().unwrap_or_else(|e| {
        problems.push(format!("id: {e}"));
        EventId(uuid::Uuid::nil())
    });
    let time = humantime::parse_rfc3339_weak(&text(4)).unwrap_or_else(|e| {
        problems.push(format!("time: {e}"));
        SystemTime::now()
    });
    let causation_id = opt(8).and_then(|c| match c.parse() {
        Ok(id) => Some(id),
        Err(e) => {
            problems.push(format!("causation_id: {e}"));
            None
        }
    });
    let envelope = Envelope {
        id,
        source: text(2),
        ty: text(3),
        time,
        subject: opt(5),
        topic: topic.to_owned(),
        datacontenttype: text(6),
        correlation_id: CorrelationId(text(7)),
        causation_id,
        traceparent: opt(9),
        data: row.try_get::<Vec<u8>, _>(10).unwrap_or_default(),
    };
    let problem = (!problems.is_empty()).then(|| format!("the stored event is corrupt ({})", problems.join("; ")));
    (envelope, problem)
}

#[async_trait]
impl Transport for SqliteTransport {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    async fn publish(&self, envelope: &Envelope) -> Result<(), TransportError> {
        self.publish_all(std::slice::from_ref(envelope)).await
    }

    async fn publish_all(&self, envelopes: &[Envelope]) -> Result<(), TransportError> {
        let mut tx = self.inner.pool.begin_with("BEGIN IMMEDIATE").await.map_err(other)?;
        self.insert(&mut tx, envelopes).await?;
        tx.commit().await.map_err(other)?;
        self.inner.published.notify_waiters();
        Ok(())
    }

    async fn subscribe(&self, subscription: &Subscription) -> Result<Deliveries, TransportError> {
        let mut conn = self.inner.pool.acquire().await.map_err(other)?;
        let partitions = self.partitions(&mut conn, &subscription.topic).await?;
        drop(conn);
        let owner = {
            let mut owners = lock(&self.inner.owners);
            let n = owners.iter().filter(|(g, t, _)| *g == subscription.group && *t == subscription.topic).count();
            let owner = format!("{}#{n}", self.inner.instance);
            owners.push((subscription.group.clone(), subscription.topic.clone(), owner.clone()));
            owner
        };
        let consumer = Consumer {
            shared: Arc::new(ConsumerShared {
                transport: self.clone(),
                group: subscription.group.clone(),
                topic: subscription.topic.clone(),
                slots: Mutex::default(),
                wake: Notify::new(),
            }),
            owner,
            partitions,
            next_rebalance: Instant::now(),
            cursor: 0,
        };
        let stream = futures_util::stream::unfold(consumer, |mut c| async move {
            let item = c.next().await;
            Some((item, c))
        });
        Ok(Box::pin(stream))
    }

    async fn lag(&self, group: &str, topic: &str) -> Result<Vec<PartitionLag>, TransportError> {
        let rows = sqlx::query(&self.inner.sql.lag)
            .bind(group)
            .bind(topic)
            .fetch_all(&self.inner.pool)
            .await
            .map_err(other)?;
        let mut lags = rows
            .iter()
            .map(|r| {
                Ok(PartitionLag {
                    partition: r.try_get::<i64, _>(0).map_err(other)? as u32,
                    lag: r.try_get::<i64, _>(1).map_err(other)? as u64,
                })
            })
            .collect::<Result<Vec<_>, TransportError>>()?;
        if lags.is_empty() {
            lags.push(PartitionLag { partition: 0, lag: 0 });
        }
        Ok(lags)
    }

    async fn close(&self) -> Result<(), TransportError> {
        // Hand this instance's partitions over now rather than when the leases expire.
        let owners = std::mem::take(&mut *lock(&self.inner.owners));
        for (group, topic, owner) in owners {
            for sql in [&self.inner.sql.leases_release_owner, &self.inner.sql.members_release_owner] {
                sqlx::query(sql)
                    .bind(&group)
                    .bind(&topic)
                    .bind(&owner)
                    .execute(&self.inner.pool)
                    .await
                    .map_err(other)?;
            }
        }
        Ok(())
    }
}

/// What one partition of a subscription is doing.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Slot {
    Idle,
    InFlight,
    WaitUntil(Instant),
}

struct ConsumerShared {
    transport: SqliteTransport,
    group: String,
    topic: String,
    slots: Mutex<HashMap<u32, Slot>>,
    wake: Notify,
}

impl ConsumerShared {
    fn set(&self, partition: u32, slot: Slot) {
        if let Some(s) = lock(&self.slots).get_mut(&partition) {
            *s = slot;
        }
        self.wake.notify_waiters();
    }

    async fn ack(&self, conn: &mut SqliteConnection, partition: u32, seq: i64) -> Result<(), sqlx::Error> {
        let sql = &self.transport.inner.sql;
        sqlx::query(&sql.ack)
            .bind(&self.group)
            .bind(&self.topic)
            .bind(i64::from(partition))
            .bind(seq)
            .execute(&mut *conn)
            .await?;
        sqlx::query(&sql.clear_attempts).bind(&self.group).bind(&self.topic).bind(seq).execute(&mut *conn).await?;
        Ok(())
    }
}

/// One subscription: holds leases on a fair share of the partitions, hands out the next event
/// of each partition that has nothing in flight.
struct Consumer {
    shared: Arc<ConsumerShared>,
    owner: String,
    partitions: u32,
    next_rebalance: Instant,
    cursor: u32,
}

impl Consumer {
    async fn next(&mut self) -> Result<Delivery, TransportError> {
        let inner = self.shared.transport.inner.clone();
        let shared = self.shared.clone();
        loop {
            if Instant::now() >= self.next_rebalance {
                self.rebalance().await?;
                self.next_rebalance = Instant::now() + inner.options.lease_ttl / 3;
            }
            let published = inner.published.notified();
            let woken = shared.wake.notified();
            tokio::pin!(published, woken);
            published.as_mut().enable();
            woken.as_mut().enable();

            let now = Instant::now();
            let (ready, earliest) = {
                let slots = lock(&self.shared.slots);
                let mut ready: Vec<u32> = slots
                    .iter()
                    .filter(|(_, s)| match s {
                        Slot::Idle => true,
                        Slot::WaitUntil(t) => *t <= now,
                        Slot::InFlight => false,
                    })
                    .map(|(p, _)| *p)
                    .collect();
                ready.sort_unstable();
                let earliest =
                    slots.values().filter_map(|s| if let Slot::WaitUntil(t) = s { Some(*t) } else { None }).min();
                (ready, earliest)
            };
            // Start where the last call stopped, so no partition starves the others.
            let start = ready.iter().position(|p| *p >= self.cursor).unwrap_or(0);
            for &partition in ready[start..].iter().chain(&ready[..start]) {
                if let Some(delivery) = self.fetch(partition).await? {
                    self.cursor = partition + 1;
                    return Ok(delivery);
                }
            }
            let mut wait =
                inner.options.poll_interval.min(self.next_rebalance.saturating_duration_since(Instant::now()));
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

    async fn fetch(&self, partition: u32) -> Result<Option<Delivery>, TransportError> {
        let shared = &self.shared;
        let inner = &shared.transport.inner;
        let row = sqlx::query(&inner.sql.next_event)
            .bind(&shared.group)
            .bind(&shared.topic)
            .bind(i64::from(partition))
            .fetch_optional(&inner.pool)
            .await
            .map_err(other)?;
        let Some(row) = row else {
            shared.set(partition, Slot::Idle);
            return Ok(None);
        };
        let seq: i64 = row.try_get(0).map_err(other)?;
        let attempts: i64 = row.try_get(11).map_err(other)?;
        shared.set(partition, Slot::InFlight);
        let acker = SqliteAcker { shared: shared.clone(), partition, seq, settled: Arc::new(AtomicBool::new(false)) };
        match envelope_of(&row, &shared.topic) {
            (envelope, None) => Ok(Some(Delivery::new(envelope, attempts as u32 + 1, partition, Box::new(acker)))),
            (envelope, Some(error)) => {
                // A corrupt row must not block its partition: set it aside with the reason.
                tracing::error!(group = %shared.group, topic = %shared.topic, seq, %error, "dead-lettering a corrupt stored event");
                let reason = DeadLetterReason { handler: None, error, permanent: true };
                let letter = DeadLetter { envelope, attempts: attempts as u32 + 1, reason, at: SystemTime::now() };
                Box::new(acker).dead_letter(letter).await?;
                Ok(None)
            }
        }
    }

    /// Renews this consumer's leases, and takes or gives up partitions towards a fair share
    /// among the live members of the group.
    async fn rebalance(&mut self) -> Result<(), TransportError> {
        let shared = &self.shared;
        let inner = &shared.transport.inner;
        let sql = &inner.sql;
        let (g, t, me) = (&shared.group, &shared.topic, &self.owner);
        let now = now_ms();
        let ttl = inner.options.lease_ttl.as_millis() as i64;
        let mut tx = inner.pool.begin_with("BEGIN IMMEDIATE").await.map_err(other)?;
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
        if mine.len() > fair {
            // Give up idle partitions beyond the fair share; busy ones go at a later round.
            let idle: Vec<u32> = {
                let slots = lock(&shared.slots);
                mine.iter().rev().copied().filter(|p| !matches!(slots.get(p), Some(Slot::InFlight))).collect()
            };
            for p in idle.into_iter().take(mine.len() - fair) {
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
        }
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
                }
            }
            p += 1;
        }
        tx.commit().await.map_err(other)?;
        let mut slots = lock(&shared.slots);
        slots.retain(|p, s| mine.contains(p) || *s == Slot::InFlight);
        for p in mine {
            slots.entry(p).or_insert(Slot::Idle);
        }
        Ok(())
    }
}

struct SqliteAcker {
    shared: Arc<ConsumerShared>,
    partition: u32,
    seq: i64,
    settled: Arc<AtomicBool>,
}

impl SqliteAcker {
    fn finish(&self, slot: Slot) {
        self.settled.store(true, Ordering::SeqCst);
        self.shared.set(self.partition, slot);
    }
}

#[async_trait]
impl Acker for SqliteAcker {
    async fn ack(self: Box<Self>) -> Result<(), TransportError> {
        if self.settled.load(Ordering::SeqCst) {
            return Ok(()); // acknowledged in the handling's own transaction
        }
        let mut conn = self.shared.transport.inner.pool.acquire().await.map_err(other)?;
        self.shared.ack(&mut conn, self.partition, self.seq).await.map_err(other)?;
        self.finish(Slot::Idle);
        Ok(())
    }

    async fn nack(self: Box<Self>, delay: Duration) -> Result<(), TransportError> {
        let s = &self.shared;
        sqlx::query(&s.transport.inner.sql.nack)
            .bind(&s.group)
            .bind(&s.topic)
            .bind(self.seq)
            .execute(&s.transport.inner.pool)
            .await
            .map_err(other)?;
        self.finish(Slot::WaitUntil(Instant::now() + delay));
        Ok(())
    }

    async fn dead_letter(self: Box<Self>, letter: DeadLetter) -> Result<(), TransportError> {
        let s = &self.shared;
        let inner = &s.transport.inner;
        let envelope = serde_json::to_string(&letter.envelope).map_err(other)?;
        let at = letter.at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        let mut tx = inner.pool.begin_with("BEGIN IMMEDIATE").await.map_err(other)?;
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
        s.ack(&mut tx, self.partition, self.seq).await.map_err(other)?;
        tx.commit().await.map_err(other)?;
        self.finish(Slot::Idle);
        Ok(())
    }

    async fn begin(&self) -> Result<Option<Box<dyn UnitOfWork>>, TransportError> {
        Ok(Some(Box::new(SqliteUnit {
            shared: self.shared.clone(),
            partition: self.partition,
            seq: self.seq,
            settled: self.settled.clone(),
            lazy: Some(Box::new(LazyTransaction { pool: self.shared.transport.inner.pool.clone(), tx: None })),
            claim: None,
            step: None,
            step_succeeded: None,
            envelopes: Vec::new(),
        })))
    }
}

impl Drop for SqliteAcker {
    fn drop(&mut self) {
        if !self.settled.load(Ordering::SeqCst) {
            // Not settled: the event stays at the head of its partition and goes again.
            self.shared.set(self.partition, Slot::Idle);
        }
    }
}

/// One attempt of one handler: reads first, then one `BEGIN IMMEDIATE` transaction that the
/// handler may open early for its own writes.
struct SqliteUnit {
    shared: Arc<ConsumerShared>,
    partition: u32,
    seq: i64,
    settled: Arc<AtomicBool>,
    /// `None` while lent to the handler.
    lazy: Option<Box<LazyTransaction>>,
    claim: Option<GuardKey>,
    step: Option<(String, String, CorrelationId)>,
    step_succeeded: Option<bool>,
    envelopes: Vec<Envelope>,
}

impl SqliteUnit {
    fn sql(&self) -> &Sql {
        &self.shared.transport.inner.sql
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
        if let Some((group, step, correlation)) = self.step.clone() {
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
        let transport = self.shared.transport.clone();
        let conn = self.lazy()?.conn().await?;
        transport.insert(conn, &envelopes).await.map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
        if ack {
            let (shared, partition, seq) = (self.shared.clone(), self.partition, self.seq);
            shared.ack(self.lazy()?.conn().await?, partition, seq).await?;
        }
        Ok(Commit::Done)
    }
}

#[async_trait]
impl UnitOfWork for SqliteUnit {
    async fn claim(&mut self, key: &GuardKey) -> Result<Claim, StoreError> {
        let sql = format!(
            "SELECT 1 FROM {}inbox WHERE grp = ?1 AND handler = ?2 AND key = ?3",
            self.shared.transport.inner.options.prefix
        );
        let query = sqlx::query_scalar::<_, i64>(&sql).bind(&key.group).bind(&key.handler).bind(&key.key);
        let lazy = self.lazy().map_err(store)?;
        let seen = match lazy.tx.as_deref_mut() {
            Some(conn) => query.fetch_optional(conn).await,
            None => query.fetch_optional(&lazy.pool).await,
        }
        .map_err(store)?;
        if seen.is_some() {
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
        // Decided inside the write transaction: a step's record is never seen half-written.
        self.lazy().map_err(store)?.conn().await.map_err(store)?;
        match self.read_step(group, step, correlation).await.map_err(store)?.as_deref() {
            Some("done") => Ok(StepState::Done),
            _ => {
                self.write_step(group, step, correlation, "cancelled").await.map_err(store)?;
                Ok(StepState::NotRun)
            }
        }
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
        let outcome = self.write(ack).await.map_err(other)?;
        let tx = self.lazy.as_mut().and_then(|l| l.tx.take());
        if outcome != Commit::Done {
            return Ok(outcome); // dropping the transaction rolls it back
        }
        if let Some(tx) = tx {
            tx.commit().await.map_err(other)?;
        }
        self.shared.transport.inner.published.notify_waiters();
        if ack {
            self.settled.store(true, Ordering::SeqCst);
            self.shared.set(self.partition, Slot::Idle);
        }
        Ok(Commit::Done)
    }
}

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;

    use super::*;

    #[test]
    fn partitions_are_stable_and_spread() {
        assert_eq!(partition_of("order-1", 8), partition_of("order-1", 8));
        let used: std::collections::HashSet<_> = (0..100).map(|i| partition_of(&format!("k{i}"), 8)).collect();
        assert_eq!(used.len(), 8);
        assert_eq!(partition_of("anything", 1), 0);
    }

    #[test]
    fn the_prefix_reaches_every_statement() {
        let sql = Sql::new("app_eda_");
        let mut all = String::new();
        for s in [&sql.insert_event, &sql.next_event, &sql.ack, &sql.lag, &sql.inbox_claim, &sql.dead_insert] {
            let _ = writeln!(all, "{s}");
        }
        assert!(!all.contains(" eda_"), "{all}");
        assert!(sql.migrate[0].contains("app_eda_log"));
    }
}
