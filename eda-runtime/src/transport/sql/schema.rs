//! The two SQL dialects and eda's statements in them, with the table prefix filled in once.
//!
//! Statements use `$N` placeholders, numbered in order of first use: PostgreSQL reads them as
//! positions and SQLite as names bound in that same order, so one text serves both.

/// Which database holds the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// SQLite: one writer at a time (`BEGIN IMMEDIATE`), which also orders the log.
    Sqlite,
    /// PostgreSQL: row locks, plus advisory locks where commit order must match log order.
    Postgres,
}

impl Dialect {
    /// The dialect a URL names, if it names one this build supports.
    pub fn of(url: &str) -> Option<Self> {
        let scheme = url.split_once(':').map(|(s, _)| s)?;
        match scheme {
            #[cfg(feature = "sqlite")]
            "sqlite" => Some(Dialect::Sqlite),
            #[cfg(feature = "postgres")]
            "postgres" | "postgresql" => Some(Dialect::Postgres),
            _ => None,
        }
    }

    /// How a write transaction starts: SQLite takes the write lock at once, so two writers
    /// never deadlock upgrading a read lock.
    pub fn begin(self) -> &'static str {
        match self {
            Dialect::Sqlite => "BEGIN IMMEDIATE",
            Dialect::Postgres => "BEGIN",
        }
    }

    /// The name transports and errors use.
    pub fn name(self) -> &'static str {
        match self {
            Dialect::Sqlite => "sqlite",
            Dialect::Postgres => "postgres",
        }
    }

    /// Wakes the consumers of other processes at commit (PostgreSQL's NOTIFY, on the channel
    /// `$1`; SQLite has no such thing and they poll).
    pub fn notify(self) -> Option<&'static str> {
        match self {
            Dialect::Sqlite => None,
            Dialect::Postgres => Some("SELECT 1 FROM pg_notify($1, $2)"),
        }
    }

    /// How often consumers look for events from other processes when nothing woke them: often
    /// on SQLite, which cannot notify; rarely on PostgreSQL, whose NOTIFY wakes them.
    pub fn poll_interval(self) -> std::time::Duration {
        match self {
            Dialect::Sqlite => std::time::Duration::from_millis(50),
            Dialect::Postgres => std::time::Duration::from_millis(500),
        }
    }

    /// The database's clock in milliseconds since the Unix epoch. Leases are judged by it, so
    /// that an instance whose own clock runs ahead cannot take live leases (PostgreSQL's
    /// `clock_timestamp()`, which moves within a transaction; SQLite runs in the process, on
    /// the host's clock, which every process on the database shares).
    pub fn now_ms(self) -> &'static str {
        match self {
            Dialect::Sqlite => "SELECT CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
            Dialect::Postgres => "SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
        }
    }

    /// Takes a transaction-scoped lock on a 64-bit key (PostgreSQL only; SQLite's single writer
    /// already excludes everyone).
    pub fn lock(self) -> Option<&'static str> {
        match self {
            Dialect::Sqlite => None,
            Dialect::Postgres => Some("SELECT 1 FROM pg_advisory_xact_lock($1)"),
        }
    }
}

/// Rows one retention delete removes at most.
pub const CLEAN_BATCH: u64 = 5000;

/// eda's SQL for one dialect and table prefix.
pub struct Sql {
    pub migrate: Vec<String>,
    pub schema_table: String,
    pub schema_version: String,
    pub schema_insert: String,
    pub insert_event: String,
    /// PostgreSQL: one event, appended in a statement that is its own transaction and takes
    /// its partition's lock first (`$13`), so that sequence order is still commit order.
    pub insert_event_locked: String,
    /// The same, and NOTIFY on channel `$14` at commit.
    pub insert_event_locked_notify: String,
    pub topic_insert: String,
    pub topic_select: String,
    pub next_events: String,
    pub ack: String,
    pub offset_start: String,
    pub clear_attempts: String,
    pub nack: String,
    pub member_upsert: String,
    pub members_expire: String,
    pub members_count: String,
    pub member_seen: String,
    pub leases_renew: String,
    pub leases_mine: String,
    pub lease_claim: String,
    pub lease_release: String,
    pub lease_held: String,
    pub leases_release_owner: String,
    pub members_release_owner: String,
    pub lag: String,
    pub lag_positions: String,
    pub inbox_seen: String,
    pub inbox_claim: String,
    pub step_select: String,
    pub step_upsert: String,
    pub step_delete: String,
    pub dead_insert: String,
    /// `dead_insert`, unless the group already keeps a letter of that event (the relay's:
    /// a batch read again after a crash must not make a second letter).
    pub dead_insert_once: String,
    pub dead_select: String,
    pub dead_one: String,
    pub dead_delete: String,
    pub topics_all: String,
    pub saga_events: String,
    pub oldest_pending: String,
    pub saga_handlings: String,
    pub clean_log: String,
    pub clean_inbox: String,
    pub clean_steps: String,
    pub clean_attempts: String,
    pub members_live: String,
    pub retire: Vec<String>,
    pub retire_inbox: String,
    pub retire_steps: String,
}

impl Sql {
    pub fn new(dialect: Dialect, p: &str) -> Self {
        let (serial, blob, int) = match dialect {
            Dialect::Sqlite => ("INTEGER PRIMARY KEY AUTOINCREMENT", "BLOB", "INTEGER"),
            Dialect::Postgres => ("BIGSERIAL PRIMARY KEY", "BYTEA", "BIGINT"),
        };
        // An index is named without its schema.
        let ix = p.replace('.', "_");
        let v1 = format!(
            "CREATE TABLE IF NOT EXISTS {p}topics (topic TEXT PRIMARY KEY, partitions {int} NOT NULL);
             CREATE TABLE IF NOT EXISTS {p}log (
                 seq {serial}, topic TEXT NOT NULL, partition {int} NOT NULL,
                 id TEXT NOT NULL, source TEXT NOT NULL, type TEXT NOT NULL, time TEXT NOT NULL, subject TEXT,
                 datacontenttype TEXT NOT NULL, correlation_id TEXT NOT NULL, causation_id TEXT, traceparent TEXT,
                 data {blob} NOT NULL);
             CREATE INDEX IF NOT EXISTS {ix}log_by_partition ON {p}log (topic, partition, seq);
             CREATE TABLE IF NOT EXISTS {p}offsets (grp TEXT NOT NULL, topic TEXT NOT NULL, partition {int} NOT NULL,
                 position {int} NOT NULL, PRIMARY KEY (grp, topic, partition));
             CREATE TABLE IF NOT EXISTS {p}attempts (grp TEXT NOT NULL, topic TEXT NOT NULL, seq {int} NOT NULL,
                 attempts {int} NOT NULL, PRIMARY KEY (grp, topic, seq));
             CREATE TABLE IF NOT EXISTS {p}leases (grp TEXT NOT NULL, topic TEXT NOT NULL, partition {int} NOT NULL,
                 owner TEXT NOT NULL, expires_at {int} NOT NULL, PRIMARY KEY (grp, topic, partition));
             CREATE TABLE IF NOT EXISTS {p}members (grp TEXT NOT NULL, topic TEXT NOT NULL, owner TEXT NOT NULL,
                 seen_at {int} NOT NULL, PRIMARY KEY (grp, topic, owner));
             CREATE TABLE IF NOT EXISTS {p}inbox (grp TEXT NOT NULL, handler TEXT NOT NULL, key TEXT NOT NULL,
                 handled_at {int} NOT NULL, PRIMARY KEY (grp, handler, key));
             CREATE TABLE IF NOT EXISTS {p}steps (grp TEXT NOT NULL, step TEXT NOT NULL, correlation_id TEXT NOT NULL,
                 state TEXT NOT NULL, updated_at {int} NOT NULL, PRIMARY KEY (grp, step, correlation_id));
             CREATE TABLE IF NOT EXISTS {p}dead_letters (id {serial}, grp TEXT NOT NULL,
                 topic TEXT NOT NULL, seq {int} NOT NULL, envelope TEXT NOT NULL, attempts {int} NOT NULL,
                 handler TEXT, error TEXT NOT NULL, permanent {int} NOT NULL, at {int} NOT NULL);"
        );
        let columns =
            "id, source, type, time, subject, datacontenttype, correlation_id, causation_id, traceparent, data";
        // Retention deletes by age: without these, each clean-up scanned the log, the inbox and
        // the saga records whole, in every process.
        let v2 = format!(
            "CREATE INDEX IF NOT EXISTS {ix}log_by_time ON {p}log (time);
             CREATE INDEX IF NOT EXISTS {ix}inbox_by_time ON {p}inbox (handled_at);
             CREATE INDEX IF NOT EXISTS {ix}steps_by_time ON {p}steps (updated_at);"
        );
        Self {
            migrate: vec![v1, v2],
            schema_table: format!("CREATE TABLE IF NOT EXISTS {p}schema (version {int} NOT NULL)"),
            schema_version: format!("SELECT COALESCE(MAX(version), 0) FROM {p}schema"),
            schema_insert: format!("INSERT INTO {p}schema (version) VALUES ($1)"),
            insert_event: format!(
                "INSERT INTO {p}log (topic, partition, {columns}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
            ),
            insert_event_locked: format!(
                "WITH locked AS (SELECT pg_advisory_xact_lock($13))
                 INSERT INTO {p}log (topic, partition, {columns})
                 SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12 FROM locked"
            ),
            insert_event_locked_notify: format!(
                "WITH locked AS (SELECT pg_advisory_xact_lock($13), pg_notify($14, ''))
                 INSERT INTO {p}log (topic, partition, {columns})
                 SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12 FROM locked"
            ),
            topic_insert: format!("INSERT INTO {p}topics (topic, partitions) VALUES ($1, $2) ON CONFLICT DO NOTHING"),
            topic_select: format!("SELECT partitions FROM {p}topics WHERE topic = $1"),
            next_events: format!(
                "SELECT l.seq, {columns},
                    COALESCE((SELECT attempts FROM {p}attempts a WHERE a.grp = $1 AND a.topic = $2 AND a.seq = l.seq), 0) AS attempts
                 FROM {p}log l
                 WHERE l.topic = $2 AND l.partition = $3
                   AND l.seq > COALESCE((SELECT position FROM {p}offsets o
                                         WHERE o.grp = $1 AND o.topic = $2 AND o.partition = $3), 0)
                 ORDER BY l.seq LIMIT $4"
            ),
            ack: format!(
                "INSERT INTO {p}offsets (grp, topic, partition, position) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (grp, topic, partition) DO UPDATE SET position = excluded.position
                 WHERE excluded.position > {p}offsets.position"
            ),
            offset_start: format!(
                "INSERT INTO {p}offsets (grp, topic, partition, position) VALUES ($1, $2, $3, 0) ON CONFLICT DO NOTHING"
            ),
            clear_attempts: format!(
                "DELETE FROM {p}attempts WHERE grp = $1 AND topic = $2 AND seq IN (
                     SELECT seq FROM {p}log WHERE topic = $2 AND partition = $3 AND seq <= $4)"
            ),
            // Counted only while the partition's lease is the caller's: an instance that lost it
            // must not add to the count its new owner keeps.
            nack: format!(
                "INSERT INTO {p}attempts (grp, topic, seq, attempts)
                 SELECT $1, $2, $3, 1 WHERE EXISTS (
                     SELECT 1 FROM {p}leases WHERE grp = $1 AND topic = $2 AND partition = $4 AND owner = $5)
                 ON CONFLICT (grp, topic, seq) DO UPDATE SET attempts = {p}attempts.attempts + 1"
            ),
            // Whether the caller still holds a partition's lease; on PostgreSQL the row stays
            // locked until commit, so no one takes the partition over in between.
            lease_held: format!(
                "SELECT 1 FROM {p}leases WHERE grp = $1 AND topic = $2 AND partition = $3 AND owner = $4{}",
                if dialect == Dialect::Postgres { " FOR SHARE" } else { "" }
            ),
            member_upsert: format!(
                "INSERT INTO {p}members (grp, topic, owner, seen_at) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (grp, topic, owner) DO UPDATE SET seen_at = excluded.seen_at"
            ),
            members_expire: format!("DELETE FROM {p}members WHERE grp = $1 AND topic = $2 AND seen_at < $3"),
            members_count: format!("SELECT COUNT(*) FROM {p}members WHERE grp = $1 AND topic = $2"),
            member_seen: format!("SELECT seen_at FROM {p}members WHERE grp = $1 AND topic = $2 AND owner = $3"),
            leases_renew: format!("UPDATE {p}leases SET expires_at = $4 WHERE grp = $1 AND topic = $2 AND owner = $3"),
            leases_mine: format!("SELECT partition FROM {p}leases WHERE grp = $1 AND topic = $2 AND owner = $3"),
            lease_claim: format!(
                "INSERT INTO {p}leases (grp, topic, partition, owner, expires_at) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (grp, topic, partition) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at
                 WHERE {p}leases.expires_at < $6 OR {p}leases.owner = excluded.owner"
            ),
            lease_release: format!("DELETE FROM {p}leases WHERE grp = $1 AND topic = $2 AND partition = $3 AND owner = $4"),
            leases_release_owner: format!("DELETE FROM {p}leases WHERE grp = $1 AND topic = $2 AND owner = $3"),
            members_release_owner: format!("DELETE FROM {p}members WHERE grp = $1 AND topic = $2 AND owner = $3"),
            // One partition at a time, from its position: a range of the (topic, partition, seq)
            // index, never a scan of the log (a join with COALESCE cannot use the index).
            lag: format!("SELECT COUNT(*) FROM {p}log WHERE topic = $1 AND partition = $2 AND seq > $3"),
            lag_positions: format!("SELECT partition, position FROM {p}offsets WHERE grp = $1 AND topic = $2"),
            inbox_seen: format!("SELECT COUNT(*) FROM {p}inbox WHERE grp = $1 AND handler = $2 AND key = $3"),
            inbox_claim: format!(
                "INSERT INTO {p}inbox (grp, handler, key, handled_at) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING"
            ),
            step_select: format!("SELECT state FROM {p}steps WHERE grp = $1 AND step = $2 AND correlation_id = $3"),
            step_upsert: format!(
                "INSERT INTO {p}steps (grp, step, correlation_id, state, updated_at) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (grp, step, correlation_id) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at"
            ),
            step_delete: format!("DELETE FROM {p}steps WHERE grp = $1 AND step = $2 AND correlation_id = $3"),
            dead_insert: format!(
                "INSERT INTO {p}dead_letters (grp, topic, seq, envelope, attempts, handler, error, permanent, at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
            ),
            dead_insert_once: format!(
                "INSERT INTO {p}dead_letters (grp, topic, seq, envelope, attempts, handler, error, permanent, at)
                 SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9
                 WHERE NOT EXISTS (SELECT 1 FROM {p}dead_letters WHERE grp = $1 AND topic = $2 AND seq = $3)"
            ),
            dead_select: format!(
                "SELECT id, grp, envelope, attempts, handler, error, permanent, at, topic, seq FROM {p}dead_letters
                 WHERE ($1 OR grp = $2) AND id > $3 ORDER BY id LIMIT $4"
            ),
            dead_one: format!(
                "SELECT id, grp, envelope, attempts, handler, error, permanent, at, topic, seq FROM {p}dead_letters WHERE id = $1"
            ),
            dead_delete: format!("DELETE FROM {p}dead_letters WHERE id = $1"),
            topics_all: format!("SELECT topic FROM {p}topics ORDER BY topic"),
            saga_events: format!(
                "SELECT seq, id, source, type, time, subject, datacontenttype, correlation_id, causation_id, traceparent, data, topic
                 FROM {p}log WHERE correlation_id = $1 ORDER BY seq"
            ),
            oldest_pending: format!(
                "SELECT MIN(l.time) FROM {p}log l
                 LEFT JOIN {p}offsets o ON o.grp = $1 AND o.topic = l.topic AND o.partition = l.partition
                 WHERE l.topic = $2 AND l.seq > COALESCE(o.position, 0)"
            ),
            saga_handlings: format!("SELECT grp, handler, handled_at FROM {p}inbox WHERE key = $1 ORDER BY handled_at"),
            // Old, and passed by every group that reads its partition; a bounded batch at a
            // time, so that no delete holds locks (or SQLite's writer) for long.
            clean_log: format!(
                "DELETE FROM {p}log WHERE seq IN (
                     SELECT l.seq FROM {p}log l WHERE l.time < $1 AND NOT EXISTS (
                         SELECT 1 FROM {p}offsets o
                         WHERE o.topic = l.topic AND o.partition = l.partition AND o.position < l.seq)
                     LIMIT {CLEAN_BATCH})"
            ),
            clean_inbox: format!(
                "DELETE FROM {p}inbox WHERE (grp, handler, key) IN (
                     SELECT grp, handler, key FROM {p}inbox WHERE handled_at < $1 LIMIT {CLEAN_BATCH})"
            ),
            clean_steps: format!(
                "DELETE FROM {p}steps WHERE (grp, step, correlation_id) IN (
                     SELECT grp, step, correlation_id FROM {p}steps WHERE updated_at < $1 LIMIT {CLEAN_BATCH})"
            ),
            // Counts of events the group has passed (a commit whose reply was lost leaves
            // one behind), or that retention removed.
            clean_attempts: format!(
                "DELETE FROM {p}attempts WHERE (grp, topic, seq) IN (
                     SELECT a.grp, a.topic, a.seq FROM {p}attempts a
                     WHERE NOT EXISTS (SELECT 1 FROM {p}log l WHERE l.seq = a.seq)
                        OR EXISTS (SELECT 1 FROM {p}log l JOIN {p}offsets o
                                       ON o.grp = a.grp AND o.topic = l.topic AND o.partition = l.partition
                                   WHERE l.seq = a.seq AND o.position >= l.seq)
                     LIMIT {CLEAN_BATCH})"
            ),
            // Members seen within a lease, and leases not yet ended.
            members_live: format!(
                "SELECT (SELECT COUNT(*) FROM {p}members WHERE grp = $1 AND seen_at >= $2)
                      + (SELECT COUNT(*) FROM {p}leases WHERE grp = $1 AND expires_at >= $3)"
            ),
            retire: ["offsets", "leases", "members", "attempts"]
                .map(|table| format!("DELETE FROM {p}{table} WHERE grp = $1"))
                .to_vec(),
            retire_inbox: format!(
                "DELETE FROM {p}inbox WHERE (grp, handler, key) IN (
                     SELECT grp, handler, key FROM {p}inbox WHERE grp = $1 LIMIT {CLEAN_BATCH})"
            ),
            retire_steps: format!(
                "DELETE FROM {p}steps WHERE (grp, step, correlation_id) IN (
                     SELECT grp, step, correlation_id FROM {p}steps WHERE grp = $1 LIMIT {CLEAN_BATCH})"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefix_reaches_every_statement_and_placeholders_are_numbered_in_order() {
        for dialect in [Dialect::Sqlite, Dialect::Postgres] {
            let sql = Sql::new(dialect, "app.eda_");
            for s in [
                &sql.insert_event,
                &sql.next_events,
                &sql.ack,
                &sql.lag,
                &sql.lease_claim,
                &sql.dead_insert,
                &sql.dead_insert_once,
                &sql.nack,
                &sql.lease_held,
                &sql.dead_select,
            ] {
                assert!(!s.contains(" eda_"), "{s}");
                // First uses of $N appear in increasing order, as SQLite binds names by first use.
                let mut highest = 0;
                for (i, _) in s.match_indices('$') {
                    let n: usize =
                        s[i + 1..].chars().take_while(char::is_ascii_digit).collect::<String>().parse().unwrap_or(0);
                    assert!(n <= highest + 1, "${n} is used before ${} in {s}", highest + 1);
                    highest = highest.max(n);
                }
            }
            // PostgreSQL only, which numbers its parameters by position: the lock key comes last.
            for s in [&sql.insert_event_locked, &sql.insert_event_locked_notify] {
                assert!(!s.contains(" eda_") && s.contains("app.eda_log"), "{s}");
            }
            assert!(sql.migrate[0].contains("app.eda_log ("));
            assert!(sql.migrate[0].contains("INDEX IF NOT EXISTS app_eda_log_by_partition"));
        }
    }
}
