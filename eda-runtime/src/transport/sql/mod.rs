//! The durable log in a SQL database: one SQLite file (the embedded default, `sqlite://…`) or a
//! PostgreSQL database (`postgres://…`) holds the log of every topic, each consumer group's
//! offsets, partition leases, the inbox, saga records and dead letters.
//!
//! A topic's events are spread over a fixed number of partitions by key, so events of one key
//! stay in one partition, in order. Each consumer instance holds leases on a fair share of the
//! partitions of its group (instances may live in several processes sharing the database),
//! handles one event at a time per partition, and commits each handling — the guard record,
//! the handler's own writes through [`transaction`], the events it emits and the new offset —
//! in one transaction. Delivery is at least once; effects are exactly once.
//!
//! Both dialects run the same code through sqlx's `Any` driver; where they differ (how a write
//! transaction starts, which locks keep the log's order equal to its commit order) the
//! [`Dialect`] says so.

mod consumer;
mod gate;
#[cfg(feature = "postgres")]
mod listen;
mod options;
mod publish;
mod records;
mod relay;
mod schema;
mod unit;

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use eda_core::{
    CorrelationId, Ctx, DeadLetterStore, Deliveries, Envelope, EventId, HandlerError, PartitionLag, StoreError,
    Subscription, Transport, TransportError,
};
pub use options::SqlOptions;
pub use relay::{Relay, RelayHandle};
pub use schema::Dialect;
pub use sqlx;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyRow};
use sqlx::pool::PoolConnection;
use sqlx::{AnyConnection, AnyPool, Row};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::keys::{fnv1a, redact};
use consumer::{Consumer, ConsumerShared};
use gate::{Turn, WriteGate};
use schema::Sql;

/// The transaction type behind [`transaction`]: run queries on `&mut **tx`.
pub type SqlTransaction = sqlx::Transaction<'static, sqlx::Any>;

/// The database transaction of the current handling, opened on first use: the handler's writes
/// through it commit together with the guard record, the emitted events and the offset, or not
/// at all. A handler that never asks for it holds no write lock while it runs. Placeholders are
/// the database's own (`$1` works on both PostgreSQL and SQLite).
///
/// ```no_run
/// # use eda::{event, handler, Ctx, HandlerError};
/// # #[event(topic = "orders")]
/// # #[derive(serde::Serialize, serde::Deserialize)]
/// # struct OrderPlaced { id: String }
/// #[handler(group = "orders-db")]
/// async fn store_order(ev: OrderPlaced, cx: Ctx<'_>) -> Result<(), HandlerError> {
///     let mut tx = eda::sql::transaction(&cx).await?;
///     eda::sql::sqlx::query("INSERT INTO orders (id) VALUES ($1)").bind(&ev.id).execute(&mut **tx).await?;
///     Ok(())
/// }
/// ```
pub async fn transaction<'a, S>(cx: &Ctx<'a, S>) -> Result<HandlerTransaction<'a>, HandlerError> {
    let mut lazy = cx.transaction::<LazyTransaction>().await.ok_or_else(|| {
        HandlerError::permanent(
            "this handler runs without a database transaction: run it on a `sqlite://` or `postgres://` transport",
        )
    })?;
    lazy.conn().await.map_err(HandlerError::transient)?;
    Ok(HandlerTransaction(lazy))
}

/// A handler's borrow of its database transaction; dereferences to [`SqlTransaction`], so
/// `&mut **tx` is the connection to run queries on.
pub struct HandlerTransaction<'a>(eda_core::Transaction<'a, LazyTransaction>);

impl std::ops::Deref for HandlerTransaction<'_> {
    type Target = SqlTransaction;
    fn deref(&self) -> &SqlTransaction {
        match self.0.tx.as_ref() {
            Some(tx) => tx,
            None => unreachable!("opened before the borrow was handed out"),
        }
    }
}

impl std::ops::DerefMut for HandlerTransaction<'_> {
    fn deref_mut(&mut self) -> &mut SqlTransaction {
        match self.0.tx.as_mut() {
            Some(tx) => tx,
            None => unreachable!("opened before the borrow was handed out"),
        }
    }
}

/// The transaction of one handling, opened when first needed.
struct LazyTransaction {
    pool: AnyPool,
    dialect: Dialect,
    gate: WriteGate,
    /// Before `turn`: the transaction ends before the next writer's turn begins.
    tx: Option<SqlTransaction>,
    turn: Turn,
}

impl LazyTransaction {
    fn new(transport: &SqlTransport) -> Self {
        let inner = &transport.inner;
        Self { pool: inner.pool.clone(), dialect: inner.dialect, gate: inner.gate.clone(), tx: None, turn: None }
    }

    /// The open transaction, opened now if it is not.
    async fn conn(&mut self) -> Result<&mut AnyConnection, sqlx::Error> {
        if self.tx.is_none() {
            self.turn = self.gate.enter().await?;
            match self.pool.begin_with(self.dialect.begin()).await {
                Ok(tx) => self.tx = Some(tx),
                Err(e) => {
                    self.turn = None;
                    return Err(e);
                }
            }
        }
        match self.tx.as_deref_mut() {
            Some(conn) => Ok(conn),
            None => Err(sqlx::Error::PoolClosed),
        }
    }
}

/// The SQL log transport. Clones share one connection pool.
#[derive(Clone)]
pub struct SqlTransport {
    inner: Arc<Inner>,
}

struct Inner {
    pool: AnyPool,
    /// For partition leases only (see [`LEASE_CONNECTIONS`]).
    leases: AnyPool,
    dialect: Dialect,
    /// This process's writers of a SQLite database, one at a time.
    gate: WriteGate,
    sql: Sql,
    options: SqlOptions,
    instance: String,
    published: Notify,
    topics: Mutex<HashMap<String, u32>>,
    owners: Mutex<Vec<(String, String, String)>>,
    last_clean_up: Mutex<Option<Instant>>,
    /// A clean-up runs now.
    cleaning: std::sync::atomic::AtomicBool,
    notified: Mutex<Notified>,
}

/// When this transport last sent NOTIFY, and whether a trailing one is scheduled.
#[derive(Default)]
struct Notified {
    sent: Option<Instant>,
    trailing: bool,
}

/// Connections each transport keeps for renewing its consumers' partition leases: renewals are
/// short, and one per consumer every third of a lease.
const LEASE_CONNECTIONS: u32 = 2;

/// See [`SqlTransport::notify_now`].
const NOTIFY_WINDOW: Duration = Duration::from_millis(20);

fn unreachable(reason: impl std::fmt::Display) -> TransportError {
    TransportError::Unreachable { transport: "sql", reason: reason.to_string() }
}

fn other(e: impl std::error::Error + Send + Sync + 'static) -> TransportError {
    TransportError::Other { transport: "sql", source: Box::new(e) }
}

/// PostgreSQL cuts names past 63 bytes without a word: two tables could become one, and the
/// NOTIFY channel (`<prefix>log`) fails every publish. Refused at start instead.
fn check_name_lengths(prefix: &str) -> Result<(), TransportError> {
    const LIMIT: usize = 63;
    // The longest names eda makes from a prefix: an index, a table, and the channel.
    let table_part = prefix.rsplit('.').next().unwrap_or(prefix);
    let longest = [table_part.len() + "dead_letters".len(), prefix.len() + "log_by_partition".len(), prefix.len() + 3];
    let over = longest.into_iter().max().unwrap_or(0);
    if over > LIMIT {
        let room = LIMIT - "log_by_partition".len();
        return Err(unreachable(format!(
            "table prefix `{prefix}` is too long for PostgreSQL, whose names hold {LIMIT} bytes (the longest eda would make has {over}): use a prefix of at most {room} characters"
        )));
    }
    Ok(())
}

/// What one of eda's steps on a connection came to, given up after `within` (see
/// [`SqlTransport::answer_within`]). A connection that did not answer in time (a failover, lost
/// packets: nothing says it is gone) is closed rather than given back: the pool pings what it
/// is given back with no time limit, and would hold one of its places for as long as the
/// operating system keeps the socket.
fn answered<T>(
    conn: PoolConnection<sqlx::Any>,
    done: Result<Result<T, TransportError>, tokio::time::error::Elapsed>,
    within: Duration,
    what: &str,
) -> Result<T, TransportError> {
    match done {
        Ok(done) => done,
        Err(_) => {
            drop(conn.detach());
            Err(unreachable(format!("the database did not answer within {within:?} while {what}")))
        }
    }
}

fn store(e: sqlx::Error) -> StoreError {
    StoreError { store: "sql", source: Box::new(e) }
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SqlTransport {
    /// Opens the database at `url` with default options.
    pub async fn connect(url: &str) -> Result<Self, TransportError> {
        SqlOptions::new(url).connect().await
    }

    async fn open(options: SqlOptions) -> Result<Self, TransportError> {
        let valid = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '.';
        if options.prefix.is_empty() || !options.prefix.chars().all(valid) {
            return Err(unreachable(format!(
                "table prefix `{}` is not valid: use letters, digits and `_` (and `schema.` on PostgreSQL)",
                options.prefix
            )));
        }
        let Some(dialect) = Dialect::of(&options.url) else {
            return Err(unreachable(format!(
                "`{}` is not a database URL this build supports: write `sqlite://path/to/file.db` (feature `sqlite`) or `postgres://user@host/database` (feature `postgres`)",
                redact(&options.url)
            )));
        };
        if dialect == Dialect::Postgres {
            check_name_lengths(&options.prefix)?;
        }
        if dialect == Dialect::Sqlite && (options.url.contains(":memory:") || options.url.contains("mode=memory")) {
            return Err(unreachable(
                "an in-memory SQLite database is private to each connection and cannot hold a shared log; use a file (`sqlite://eda.db`) or `memory://`",
            ));
        }
        install_drivers();
        let url = match dialect {
            // Create the file when it does not exist yet, unless the URL says otherwise.
            Dialect::Sqlite if !options.url.contains("mode=") => {
                let sep = if options.url.contains('?') { '&' } else { '?' };
                format!("{}{sep}mode=rwc", options.url)
            }
            _ => options.url.clone(),
        };
        let connect = AnyConnectOptions::from_str(&url)
            .map_err(|e| unreachable(format!("`{}` is not a valid database URL: {e}", redact(&options.url))))?;
        let pool_options = |max: u32, acquire: Duration, settings: Vec<String>| {
            let settings = Arc::new(settings);
            AnyPoolOptions::new().max_connections(max).acquire_timeout(acquire).after_connect(move |conn, _| {
                let settings = settings.clone();
                Box::pin(async move {
                    for setting in settings.iter() {
                        sqlx::query(setting).execute(&mut *conn).await?;
                    }
                    Ok(())
                })
            })
        };
        let settings = session_settings(dialect, options.lock_timeout, options.statement_timeout);
        let pool = pool_options(options.max_connections, options.acquire_timeout, settings)
            .connect_with(connect.clone())
            .await
            .map_err(|e| unreachable(format!("cannot open `{}`: {e}", redact(&options.url))))?;
        // Leases are renewed on connections of their own: handlings, publishers waiting on a
        // partition lock or the application's queries can take every connection of the pool,
        // and a renewal that waited for one would let the leases lapse.
        let lease_wait = options.acquire_timeout.min(options.lease_ttl / 3);
        // Nothing a renewal does may outlast the lease it renews.
        let settings = session_settings(dialect, Some(options.lease_ttl), Some(options.lease_ttl));
        let leases = pool_options(LEASE_CONNECTIONS, lease_wait, settings).connect_lazy_with(connect);
        let instance = options.instance.clone().unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        let inner = Inner {
            pool,
            leases,
            dialect,
            gate: WriteGate::new(dialect),
            sql: Sql::new(dialect, &options.prefix),
            options,
            instance,
            published: Notify::new(),
            topics: Mutex::default(),
            owners: Mutex::default(),
            last_clean_up: Mutex::default(),
            cleaning: std::sync::atomic::AtomicBool::new(false),
            notified: Mutex::default(),
        };
        let transport = Self { inner: Arc::new(inner) };
        transport.migrate().await?;
        #[cfg(feature = "postgres")]
        if dialect == Dialect::Postgres {
            listen::listen(Arc::downgrade(&transport.inner), transport.inner.options.url.clone(), transport.channel());
        }
        Ok(transport)
    }

    /// Creates eda's tables, or brings them to the current version. Safe to run from several
    /// processes at once: it runs in one write transaction (under an advisory lock on
    /// PostgreSQL, whose `CREATE … IF NOT EXISTS` is not safe against a concurrent twin).
    async fn migrate(&self) -> Result<(), TransportError> {
        let (inner, sql) = (&self.inner, &self.inner.sql);
        let _turn = inner.gate.enter().await.map_err(other)?;
        let mut tx = inner.pool.begin_with(inner.dialect.begin()).await.map_err(other)?;
        if inner.dialect == Dialect::Postgres {
            // Building an index on a large log takes longer than any one statement may.
            for setting in ["SET LOCAL statement_timeout = 0", "SET LOCAL lock_timeout = 0"] {
                sqlx::query(setting).execute(&mut *tx).await.map_err(other)?;
            }
        }
        if let Some(lock) = inner.dialect.lock() {
            let key = fnv1a(&[&inner.options.prefix, "schema"]) as i64;
            sqlx::query(lock).bind(key).execute(&mut *tx).await.map_err(other)?;
        }
        sqlx::raw_sql(&sql.schema_table).execute(&mut *tx).await.map_err(other)?;
        let current: i64 = sqlx::query_scalar(&sql.schema_version).fetch_one(&mut *tx).await.map_err(other)?;
        let known = sql.migrate.len() as i64;
        if current > known {
            return Err(unreachable(format!(
                "the database's eda schema is version {current}, newer than this build knows ({known}): upgrade eda"
            )));
        }
        for (i, step) in sql.migrate.iter().enumerate().skip(current as usize) {
            sqlx::raw_sql(step).execute(&mut *tx).await.map_err(other)?;
            sqlx::query(&sql.schema_insert).bind(i as i64 + 1).execute(&mut *tx).await.map_err(other)?;
        }
        tx.commit().await.map_err(other)
    }

    /// Whether this insert should NOTIFY. Commits that notify serialize on PostgreSQL's notify
    /// queue, which cost a quarter of the log's throughput when every one did; so within
    /// [`NOTIFY_WINDOW`] of a notification, later inserts skip it and one trailing notification
    /// follows the window instead. Listeners are woken at most a window late; a trailing
    /// notification that beats a slow commit leaves that event to the poll.
    fn notify_now(&self) -> bool {
        let mut last = lock(&self.inner.notified);
        let now = Instant::now();
        match last.sent {
            Some(t) if now.duration_since(t) < NOTIFY_WINDOW => {
                if !last.trailing {
                    last.trailing = true;
                    let transport = self.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(NOTIFY_WINDOW).await;
                        transport.notify_trailing().await;
                    });
                }
                false
            }
            _ => {
                last.sent = Some(now);
                true
            }
        }
    }

    async fn notify_trailing(&self) {
        {
            let mut last = lock(&self.inner.notified);
            last.trailing = false;
            last.sent = Some(Instant::now());
        }
        if let Some(notify) = self.inner.dialect.notify() {
            if let Err(e) = sqlx::query(notify).bind(self.channel()).bind("").execute(&self.inner.pool).await {
                tracing::debug!(error = %e, "a trailing NOTIFY failed; listeners will poll");
            }
        }
    }

    /// How often consumers poll when nothing woke them.
    fn poll_interval(&self) -> Duration {
        self.inner.options.poll_interval.unwrap_or_else(|| self.inner.dialect.poll_interval())
    }

    /// How long eda waits for the database's answer to one of its own steps: the statement
    /// timeout and a margin for the reply to arrive (5 minutes without a statement timeout).
    fn answer_within(&self) -> Duration {
        self.inner.options.statement_timeout.map_or(Duration::from_secs(300), |t| t + Duration::from_secs(5))
    }

    /// The NOTIFY channel of this log: lower case, as PostgreSQL folds unquoted names.
    fn channel(&self) -> String {
        format!("{}log", self.inner.options.prefix).to_lowercase().replace('.', "_")
    }

    /// The connection pool, for the application's own tables in the same database.
    pub fn pool(&self) -> &AnyPool {
        &self.inner.pool
    }

    /// Publishes an event from application code inside the application's own transaction on
    /// this database: it becomes visible, and is relayed, only if that transaction commits —
    /// the transactional outbox (`BEGIN; INSERT INTO orders …; <publish_in>; COMMIT`).
    ///
    /// ```no_run
    /// # async fn place(outbox: &eda::sql::SqlTransport, order: &impl eda::Event) -> eda::Result<()> {
    /// use eda::sql::sqlx;
    /// let mut tx = outbox.pool().begin().await.map_err(|e| eda::Error::Config(e.to_string()))?;
    /// sqlx::query("INSERT INTO orders (id) VALUES ($1)").bind("o-1").execute(&mut *tx).await.ok();
    /// outbox.publish_in(&mut tx, "shop", order).await?;
    /// tx.commit().await.map_err(|e| eda::Error::Config(e.to_string()))?;
    /// # Ok(()) }
    /// ```
    pub async fn publish_in<E: eda_core::Event>(
        &self,
        conn: &mut AnyConnection,
        source: &str,
        event: &E,
    ) -> Result<Envelope, TransportError> {
        let pending = eda_core::PendingEvent::new(event).map_err(other)?;
        let envelope = Envelope::root(source, pending, None);
        self.insert(conn, std::slice::from_ref(&envelope)).await?;
        // Consumers in this process look at once; the commit may still be pending, in which
        // case they find nothing yet and the poll picks it up.
        self.inner.published.notify_waiters();
        Ok(envelope)
    }

    /// Publishes several events inside the application's own transaction, like
    /// [`publish_in`](Self::publish_in) for each, but locking their partitions in one order:
    /// two transactions that each publish to the same partitions cannot deadlock, whichever
    /// order their events come in (with one `publish_in` per event, PostgreSQL would end one of
    /// them to break the deadlock).
    ///
    /// ```no_run
    /// # async fn place(outbox: &eda::sql::SqlTransport, placed: &impl eda::Event, reserved: &impl eda::Event) -> eda::Result<()> {
    /// use eda::PendingEvent;
    /// let mut tx = outbox.pool().begin().await.map_err(|e| eda::Error::Config(e.to_string()))?;
    /// let events = [PendingEvent::new(placed)?, PendingEvent::new(reserved)?];
    /// outbox.publish_all_in(&mut tx, "shop", events).await?;
    /// tx.commit().await.map_err(|e| eda::Error::Config(e.to_string()))?;
    /// # Ok(()) }
    /// ```
    pub async fn publish_all_in(
        &self,
        conn: &mut AnyConnection,
        source: &str,
        events: impl IntoIterator<Item = eda_core::PendingEvent>,
    ) -> Result<Vec<Envelope>, TransportError> {
        let envelopes: Vec<Envelope> =
            events.into_iter().map(|pending| Envelope::root(source, pending, None)).collect();
        self.insert(conn, &envelopes).await?;
        self.inner.published.notify_waiters();
        Ok(envelopes)
    }

    /// When the oldest event `group` has not settled on `topic` was published: how stale an
    /// outbox is, for the relay's group.
    pub async fn oldest_pending(&self, group: &str, topic: &str) -> Result<Option<SystemTime>, TransportError> {
        let oldest: Option<String> = sqlx::query_scalar(&self.inner.sql.oldest_pending)
            .bind(group)
            .bind(topic)
            .fetch_one(&self.inner.pool)
            .await
            .map_err(other)?;
        Ok(oldest.and_then(|t| humantime::parse_rfc3339_weak(&t).ok()))
    }

    /// The topics the log has seen.
    pub async fn topics(&self) -> Result<Vec<String>, TransportError> {
        sqlx::query_scalar(&self.inner.sql.topics_all).fetch_all(&self.inner.pool).await.map_err(other)
    }

    /// Deletes what the retention period (see [`SqlOptions::retention`]) has made old: log
    /// entries every consumer group has passed and guard records; saga step records only
    /// after four times the retention, and at least 30 days, as a compensation can come long
    /// after its step (a long saga, a lagging group, a replay). Attempt counts of events their
    /// group has passed, or that are gone, go whatever the retention. Dead letters stay until
    /// they are replayed or purged, and a group's position until the group is retired
    /// ([`Transport::retire_group`], `group retire` in [`cli`](crate::cli)): a group that
    /// stopped for good keeps what it has not read. It deletes in batches of a few thousand
    /// rows. Consumers run it now and then by themselves, beside (never inside) their lease
    /// renewals.
    pub async fn clean_up(&self) -> Result<CleanUp, TransportError> {
        let sql = &self.inner.sql;
        let attempts = self.delete_in_batches(&sql.clean_attempts, |q| q).await?;
        let Some(retention) = self.inner.options.retention else {
            return Ok(CleanUp { attempts, ..CleanUp::default() });
        };
        let before = |age: Duration| SystemTime::now().checked_sub(age).unwrap_or(UNIX_EPOCH);
        let millis = |t: SystemTime| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        let cutoff = before(retention);
        let steps_cutoff = before(retention.saturating_mul(4).max(STEP_RETENTION));
        let log = self
            .delete_in_batches(&sql.clean_log, |q| q.bind(humantime::format_rfc3339_micros(cutoff).to_string()))
            .await?;
        let inbox = self.delete_in_batches(&sql.clean_inbox, |q| q.bind(millis(cutoff))).await?;
        let steps = self.delete_in_batches(&sql.clean_steps, |q| q.bind(millis(steps_cutoff))).await?;
        Ok(CleanUp { log, inbox, steps, attempts })
    }

    /// See [`Transport::retire_group`].
    async fn retire(&self, group: &str) -> Result<u64, TransportError> {
        let (inner, sql) = (&self.inner, &self.inner.sql);
        let turn = inner.gate.enter().await.map_err(other)?;
        let mut tx = inner.pool.begin_with(inner.dialect.begin()).await.map_err(other)?;
        let now: i64 = sqlx::query_scalar(inner.dialect.now_ms()).fetch_one(&mut *tx).await.map_err(other)?;
        let since = now - inner.options.lease_ttl.as_millis() as i64;
        let live: i64 = sqlx::query_scalar(&sql.members_live)
            .bind(group)
            .bind(since)
            .bind(now)
            .fetch_one(&mut *tx)
            .await
            .map_err(other)?;
        if live > 0 {
            return Err(TransportError::Config {
                transport: "sql",
                reason: format!(
                    "{live} consumer(s) of group `{group}` renewed their leases within the last {:?}: stop every instance that runs the group's handlers, then retire it",
                    inner.options.lease_ttl
                ),
            });
        }
        let mut removed = 0;
        for statement in &sql.retire {
            removed += sqlx::query(statement).bind(group).execute(&mut *tx).await.map_err(other)?.rows_affected();
        }
        tx.commit().await.map_err(other)?;
        drop(turn);
        // Guard and saga records may be many: a batch at a time, like retention.
        removed += self.delete_in_batches(&sql.retire_inbox, |q| q.bind(group)).await?;
        removed += self.delete_in_batches(&sql.retire_steps, |q| q.bind(group)).await?;
        Ok(removed)
    }

    /// Runs a batched delete until a batch comes back short; returns the rows deleted.
    async fn delete_in_batches<'q>(
        &self,
        statement: &'q str,
        bind: impl Fn(
            sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
        ) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    ) -> Result<u64, TransportError> {
        let mut deleted = 0;
        loop {
            let turn = self.inner.gate.enter().await.map_err(other)?;
            let done = bind(sqlx::query(statement)).execute(&self.inner.pool).await.map_err(other)?.rows_affected();
            drop(turn);
            deleted += done;
            if done < schema::CLEAN_BATCH {
                return Ok(deleted);
            }
            // Let the writers in between batches.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Starts [`clean_up`](Self::clean_up) in the background when it last ran long enough ago
    /// and is not running: the caller (the lease renewal) never waits for it.
    fn clean_up_now_and_then(&self) {
        let due = {
            let mut last = lock(&self.inner.last_clean_up);
            let due = last.is_none_or(|t| t.elapsed() >= CLEAN_UP_EVERY);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        if !due || self.inner.cleaning.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let transport = self.clone();
        tokio::spawn(async move {
            match transport.clean_up().await {
                Ok(done) if done != CleanUp::default() => tracing::debug!(?done, "retention clean-up"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "retention clean-up failed; it will be tried again"),
            }
            transport.inner.cleaning.store(false, std::sync::atomic::Ordering::SeqCst);
        });
    }
}

/// How often consumers run the retention clean-up.
const CLEAN_UP_EVERY: Duration = Duration::from_secs(60);

/// The least time saga step records are kept (see [`SqlTransport::clean_up`]).
const STEP_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// What [`SqlTransport::clean_up`] deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CleanUp {
    /// Log entries.
    pub log: u64,
    /// Guard records.
    pub inbox: u64,
    /// Saga step records.
    pub steps: u64,
    /// Attempt counts: of events their group has passed (a commit whose reply was lost
    /// leaves one behind), or that are gone.
    pub attempts: u64,
}

/// What every connection is set up with. SQLite: WAL lets readers run beside the one writer,
/// and the busy timeout makes other connections and processes wait for the write lock instead
/// of failing. PostgreSQL: the lock timeout, and `statement` as both the statement timeout and
/// how long a session may sit idle inside a transaction: a client cut off mid-transaction (a
/// network partition) would otherwise leave its session holding locks for as long as the
/// server's TCP keepalive takes to notice, hours by default.
fn session_settings(dialect: Dialect, lock: Option<Duration>, statement: Option<Duration>) -> Vec<String> {
    match dialect {
        Dialect::Sqlite => ["PRAGMA journal_mode = WAL", "PRAGMA synchronous = NORMAL", "PRAGMA busy_timeout = 10000"]
            .map(String::from)
            .to_vec(),
        Dialect::Postgres => [
            ("lock_timeout", lock),
            ("statement_timeout", statement),
            ("idle_in_transaction_session_timeout", statement),
        ]
        .into_iter()
        .filter_map(|(name, timeout)| timeout.map(|t| format!("SET {name} = {}", t.as_millis().max(1))))
        .collect(),
    }
}

/// Makes sqlx's `Any` driver know the databases this build supports. An application that
/// installed its own set first keeps it.
fn install_drivers() {
    let _ = sqlx::any::install_drivers(&[
        #[cfg(feature = "postgres")]
        sqlx::postgres::any::DRIVER,
        #[cfg(feature = "sqlite")]
        sqlx::sqlite::any::DRIVER,
    ]);
}

/// Reads a stored event: the envelope, as much of it as could be read, and what is wrong with
/// the row when it is not a valid envelope.
fn envelope_of(row: &AnyRow, topic: &str) -> (Envelope, Option<String>) {
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

impl SqlTransport {
    /// A consumer of `group` on `topic`, with an owner name of its own for the leases.
    async fn consumer(&self, subscription: &Subscription) -> Result<Consumer, TransportError> {
        let turn = self.inner.gate.enter().await.map_err(other)?;
        let mut conn = self.inner.pool.acquire().await.map_err(other)?;
        // Outside any transaction: the topic is committed once this returns.
        let partitions = self.partitions(&mut conn, &subscription.topic).await?;
        // The group's position, from the start: retention keeps what it has not passed yet.
        for p in 0..partitions {
            sqlx::query(&self.inner.sql.offset_start)
                .bind(&subscription.group)
                .bind(&subscription.topic)
                .bind(i64::from(p))
                .execute(&mut *conn)
                .await
                .map_err(other)?;
        }
        drop((conn, turn));
        self.remember_topics([(subscription.topic.as_str(), partitions)]);
        let owner = {
            let mut owners = lock(&self.inner.owners);
            let n = owners.iter().filter(|(g, t, _)| *g == subscription.group && *t == subscription.topic).count();
            let owner = format!("{}#{n}", self.inner.instance);
            owners.push((subscription.group.clone(), subscription.topic.clone(), owner.clone()));
            owner
        };
        let shared = Arc::new(ConsumerShared {
            transport: self.clone(),
            group: subscription.group.clone(),
            topic: subscription.topic.clone(),
            owner,
            partitions,
            slots: Mutex::default(),
            ahead: Mutex::default(),
            wake: Notify::new(),
            renewed_at: std::sync::atomic::AtomicI64::new(consumer::NOT_RENEWED),
            release_now: Notify::new(),
            renewed: Mutex::default(),
            attempted_at: std::sync::atomic::AtomicI64::new(consumer::NOT_RENEWED),
        });
        if self.inner.options.instance.is_some() {
            if let Err(e) = shared.refuse_a_twin().await {
                // Not this process's name to release at close: the twin holds it.
                lock(&self.inner.owners).retain(|(g, t, o)| (g, t, o) != (&shared.group, &shared.topic, &shared.owner));
                return Err(e);
            }
        }
        // Hold leases before the first fetch, then keep them in the background.
        if let Err(e) = shared.rebalance().await {
            lock(&self.inner.owners).retain(|(g, t, o)| (g, t, o) != (&shared.group, &shared.topic, &shared.owner));
            return Err(e);
        }
        shared.keep_leases();
        Ok(Consumer { shared, cursor: 0 })
    }

    /// Batches of up to `limit` consecutive events of one partition at a time, for the relay.
    async fn batches(
        &self,
        group: &str,
        topic: &str,
        limit: usize,
    ) -> Result<impl futures_core::Stream<Item = Result<consumer::Batch, TransportError>> + Send, TransportError> {
        let subscription = Subscription { group: group.to_owned(), topic: topic.to_owned(), prefetch: limit };
        let consumer = self.consumer(&subscription).await?;
        Ok(futures_util::stream::unfold(consumer, move |mut c| async move {
            let item = c.next_batch(limit).await;
            Some((item, c))
        }))
    }
}

#[async_trait]
impl Transport for SqlTransport {
    fn kind(&self) -> &'static str {
        self.inner.dialect.name()
    }

    fn dead_letter_store(&self) -> Option<&dyn DeadLetterStore> {
        Some(self)
    }

    fn saga_view(&self) -> Option<&dyn eda_core::SagaView> {
        Some(self)
    }

    fn store(self: Arc<Self>) -> Option<Arc<dyn eda_core::Store>> {
        Some(self)
    }

    async fn publish(&self, envelope: &Envelope) -> Result<(), TransportError> {
        self.publish_all(std::slice::from_ref(envelope)).await
    }

    async fn publish_all(&self, envelopes: &[Envelope]) -> Result<(), TransportError> {
        self.insert_committed(envelopes).await?;
        self.inner.published.notify_waiters();
        Ok(())
    }

    async fn subscribe(&self, subscription: &Subscription) -> Result<Deliveries, TransportError> {
        let consumer = self.consumer(subscription).await?;
        let stream = futures_util::stream::unfold(consumer, |mut c| async move {
            let item = c.next().await;
            Some((item, c))
        });
        Ok(Box::pin(stream))
    }

    async fn retire_group(&self, group: &str) -> Result<u64, TransportError> {
        self.retire(group).await
    }

    async fn lag(&self, group: &str, topic: &str) -> Result<Vec<PartitionLag>, TransportError> {
        let sql = &self.inner.sql;
        let within = self.answer_within();
        let mut conn = self.inner.pool.acquire().await.map_err(other)?;
        let done = tokio::time::timeout(within, async {
            let conn = &mut *conn;
            let partitions: Option<i64> =
                sqlx::query_scalar(&sql.topic_select).bind(topic).fetch_optional(&mut *conn).await.map_err(other)?;
            let Some(partitions) = partitions else { return Ok(vec![PartitionLag { partition: 0, lag: 0 }]) };
            let positions: HashMap<i64, i64> = sqlx::query_as::<_, (i64, i64)>(&sql.lag_positions)
                .bind(group)
                .bind(topic)
                .fetch_all(&mut *conn)
                .await
                .map_err(other)?
                .into_iter()
                .collect();
            let mut lags = Vec::with_capacity(partitions as usize);
            for partition in 0..partitions {
                let position = positions.get(&partition).copied().unwrap_or(0);
                let waiting: i64 = sqlx::query_scalar(&sql.lag)
                    .bind(topic)
                    .bind(partition)
                    .bind(position)
                    .fetch_one(&mut *conn)
                    .await
                    .map_err(other)?;
                lags.push(PartitionLag { partition: partition as u32, lag: waiting.max(0) as u64 });
            }
            Ok(lags)
        })
        .await;
        answered(conn, done, within, "reading the lag")
    }

    async fn close(&self) -> Result<(), TransportError> {
        // Hand this instance's partitions over now rather than when the leases expire.
        let owners = std::mem::take(&mut *lock(&self.inner.owners));
        for (group, topic, owner) in owners {
            let _turn = self.inner.gate.enter().await.map_err(other)?;
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
