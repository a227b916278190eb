//! The settings of a [`SqlTransport`](super::SqlTransport).

use std::time::Duration;

use eda_core::TransportError;

use super::{redact, SqlTransport};

/// Settings of a [`SqlTransport`].
#[derive(Clone)]
pub struct SqlOptions {
    pub(super) url: String,
    pub(super) prefix: String,
    pub(super) partitions: u32,
    pub(super) lease_ttl: Duration,
    pub(super) poll_interval: Option<Duration>,
    pub(super) instance: Option<String>,
    pub(super) max_connections: u32,
    pub(super) acquire_timeout: Duration,
    pub(super) lock_timeout: Option<Duration>,
    pub(super) statement_timeout: Option<Duration>,
    pub(super) retention: Option<Duration>,
}

impl std::fmt::Debug for SqlOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlOptions")
            .field("url", &redact(&self.url))
            .field("prefix", &self.prefix)
            .field("partitions", &self.partitions)
            .field("lease_ttl", &self.lease_ttl)
            .field("poll_interval", &self.poll_interval)
            .field("instance", &self.instance)
            .field("max_connections", &self.max_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("lock_timeout", &self.lock_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field("retention", &self.retention)
            .finish()
    }
}

impl SqlOptions {
    /// Options for the database at `url`: `sqlite://path/to/file.db` (created if missing) or
    /// `postgres://user@host/database`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefix: "eda_".into(),
            partitions: 8,
            lease_ttl: Duration::from_secs(6),
            poll_interval: None,
            instance: None,
            max_connections: 8,
            acquire_timeout: Duration::from_secs(10),
            lock_timeout: Some(Duration::from_secs(10)),
            statement_timeout: Some(Duration::from_secs(60)),
            retention: Some(Duration::from_secs(7 * 24 * 3600)),
        }
    }

    /// How many connections this handle keeps to the database at most (8 by default), for
    /// handlings, publishing and the application's own queries on [`SqlTransport::pool`].
    /// Partition leases are renewed on connections of their own, so an exhausted pool does not
    /// make this instance lose its partitions.
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// How long getting a connection may take before it is an error (10 s by default): a
    /// database that does not answer fails the start, and each later step, within this.
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// How long a statement on PostgreSQL waits for a lock before it fails (10 s by default;
    /// `None` waits for ever): above all a publisher waiting for a partition that another
    /// transaction has published to and not yet committed. Set on every connection of the
    /// pool (PostgreSQL's `lock_timeout`), the application's own queries on it included; a
    /// transaction may change it with `SET LOCAL lock_timeout`.
    pub fn lock_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.lock_timeout = timeout;
        self
    }

    /// How long one statement on PostgreSQL may run before the server cancels it, and how long
    /// a session may sit idle inside a transaction before the server ends it (60 s by default;
    /// `None` for no limit). Set on every connection of the pool (PostgreSQL's
    /// `statement_timeout` and `idle_in_transaction_session_timeout`), the application's own
    /// queries and transactions on it included — a handler's transaction that stays open
    /// longer than this while the handler waits on something else is ended; eda's schema
    /// migration runs without the statement timeout. eda also stops waiting for an answer from
    /// the database 5 s after this, so that a connection whose packets are lost (a failover, a
    /// network partition) fails the step instead of hanging it, and closes that connection.
    pub fn statement_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.statement_timeout = timeout;
        self
    }

    /// The prefix of eda's tables (`eda_` by default): letters, digits and `_`, and on PostgreSQL
    /// a schema (`eda.` or `app.eda_`) that exists.
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

    /// How often to look for events published by other processes when nothing woke the
    /// consumers: 50 ms by default on SQLite, 500 ms on PostgreSQL, where LISTEN/NOTIFY wakes
    /// them at once and polling only covers notifications lost while reconnecting. Events
    /// published in this process wake them at once on either.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = Some(interval);
        self
    }

    /// How long handled log entries, guard records and saga records are kept (7 days by
    /// default; `None` keeps everything). A duplicate arriving later than this is no longer
    /// recognised, so keep it longer than any redelivery or replay can take.
    pub fn retention(mut self, retention: Option<Duration>) -> Self {
        self.retention = retention;
        self
    }

    /// A stable name for this instance: a restarted process with the same name takes its
    /// partitions back at once instead of waiting for its old leases to expire (after a crash,
    /// once its predecessor has been silent for half a lease). Each live process needs its own:
    /// a consumer refuses to start while another live process consumes under the same name.
    pub fn instance_id(mut self, id: impl Into<String>) -> Self {
        self.instance = Some(id.into());
        self
    }

    /// Opens (or creates) the database and brings its schema up to date.
    pub async fn connect(self) -> Result<SqlTransport, TransportError> {
        SqlTransport::open(self).await
    }
}
