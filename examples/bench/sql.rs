//! The SQL scenarios: eda's SQL log and relay beside plain SQL doing the same writes.
//!
//! Both sides count a handling once its transaction has committed, and only fresh ones (eda:
//! [`Runtime::stats`]; plain SQL: after `COMMIT`, when its inbox insert was new). After the
//! throughput phase both sides' effect and emitted-event rows are counted, and each must be
//! events × groups.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eda::sql::{sqlx, Relay, SqlOptions, SqlTransport};
use eda::transport::MemoryTransport;
use eda::{Handler as _, Registry, Runtime, Transport};

use super::{
    eda_run, fill, handle_1, now_us, pace, tick, wait_for, Args, BoxError, Latency, Sample, Sink, Tick, Tocked,
};

/// The fixed rate of the SQL latency phase: well below both sides' capacity (about 1,000
/// handlings/s with one group on this machine).
pub const LATENCY: Latency = Latency { rate: 200, events: 600 };

fn postgres_url() -> String {
    std::env::var("EDA_BENCH_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn fresh_prefix() -> String {
    format!("bench_{}_", &uuid::Uuid::new_v4().simple().to_string()[..10])
}

/// A database for one round: a SQLite file or a PostgreSQL prefix.
struct Db {
    url: String,
    prefix: String,
    _dir: Option<PathGuard>,
}

/// Removes a benchmark's SQLite files when the round ends.
struct PathGuard(std::path::PathBuf);

impl Drop for PathGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Db {
    fn new(postgres: bool) -> Result<Self, BoxError> {
        if postgres {
            return Ok(Self { url: postgres_url(), prefix: fresh_prefix(), _dir: None });
        }
        let dir = std::env::temp_dir().join(format!("eda-bench-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir)?;
        let url = format!("sqlite://{}", dir.join("bench.db").display());
        Ok(Self { url, prefix: "eda_".into(), _dir: Some(PathGuard(dir)) })
    }
}

async fn count(pool: &sqlx::AnyPool, sql: &str) -> Result<u64, BoxError> {
    let n: i64 = sqlx::query_scalar(sql).fetch_one(pool).await?;
    Ok(n as u64)
}

/// Fails when a side's effects or emitted events are not one per event and group.
fn check(side: &str, effects: u64, emitted: u64, expected: u64) -> Result<(), BoxError> {
    if effects != expected || emitted != expected {
        return Err(
            format!("{side}: {effects} effect rows and {emitted} emitted events, not {expected} of each").into()
        );
    }
    Ok(())
}

/// eda's SQL log: each handling writes an effect row and emits an event in one transaction with
/// its guard record and offset.
pub async fn eda_sql(postgres: bool, a: &Args, n: u64) -> Result<Sample, BoxError> {
    let db = Db::new(postgres)?;
    let transport = SqlOptions::new(&db.url).table_prefix(&db.prefix).connect().await?;
    let p = &db.prefix;
    sqlx::query(&format!("CREATE TABLE {p}effects (seq BIGINT NOT NULL)")).execute(transport.pool()).await?;
    let insert = format!("INSERT INTO {p}effects (seq) VALUES ($1)");
    let pool = transport.pool().clone();
    let (effects, emitted) =
        (format!("SELECT COUNT(*) FROM {p}effects"), format!("SELECT COUNT(*) FROM {p}log WHERE topic = 'bench-out'"));
    let sample = eda_run(Arc::new(transport.clone()), Some(insert), a, n, LATENCY, || async {
        check("eda", count(&pool, &effects).await?, count(&pool, &emitted).await?, n * a.groups as u64)
    })
    .await;
    drop_tables(&transport, &db).await;
    sample
}

async fn drop_tables(transport: &SqlTransport, db: &Db) {
    if db._dir.is_some() {
        return; // the SQLite file goes with its directory
    }
    let tables: Vec<String> = sqlx::query_scalar("SELECT tablename::text FROM pg_tables WHERE tablename LIKE $1")
        .bind(format!("{}%", db.prefix))
        .fetch_all(transport.pool())
        .await
        .unwrap_or_default();
    for t in tables {
        let _ = sqlx::query(&format!("DROP TABLE IF EXISTS {t}")).execute(transport.pool()).await;
    }
}

/// How the plain SQL consumer commits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// One transaction per event, as eda commits each handling.
    PerEvent,
    /// One transaction per batch read (up to 100 events), as a hand-written consumer would.
    PerBatch,
}

/// What a plain SQL consumer shares with the clock.
struct Progress {
    handled: AtomicU64,
    stop: AtomicBool,
    /// Publish-to-commit latencies of the events of the latency phase (`seq >= latency_from`).
    latencies_us: Mutex<Vec<u64>>,
    latency_from: u64,
}

/// Plain SQL doing what eda's SQL log does per event: one insert per publish (with the event's
/// UUID); per handling an inbox insert keyed on that id, an effect row, an outbox row and the
/// offset, in one transaction per event or per batch read.
pub async fn raw_sql(postgres: bool, commit: Commit, a: &Args, n: u64) -> Result<Sample, BoxError> {
    let db = Db::new(postgres)?;
    let url = if postgres { db.url.clone() } else { format!("{}?mode=rwc", db.url) };
    // The same pragmas as eda's SQLite log, on every connection (they are per connection):
    // WAL, `synchronous = NORMAL` (no fsync per commit), a busy timeout.
    let pool = sqlx::any::AnyPoolOptions::new()
        .after_connect(move |conn, _| {
            Box::pin(async move {
                if !postgres {
                    for pragma in
                        ["PRAGMA journal_mode = WAL", "PRAGMA synchronous = NORMAL", "PRAGMA busy_timeout = 10000"]
                    {
                        sqlx::query(pragma).execute(&mut *conn).await?;
                    }
                }
                Ok(())
            })
        })
        .connect(&url)
        .await?;
    let p = db.prefix.clone();
    let (serial, blob) =
        if postgres { ("BIGSERIAL PRIMARY KEY", "BYTEA") } else { ("INTEGER PRIMARY KEY AUTOINCREMENT", "BLOB") };
    for ddl in [
        format!("CREATE TABLE {p}raw_log (seq {serial}, id TEXT NOT NULL, payload {blob} NOT NULL)"),
        format!("CREATE TABLE {p}raw_inbox (grp TEXT NOT NULL, id TEXT NOT NULL, PRIMARY KEY (grp, id))"),
        format!("CREATE TABLE {p}raw_effects (seq BIGINT NOT NULL)"),
        format!("CREATE TABLE {p}raw_outbox (seq {serial}, payload {blob} NOT NULL)"),
        format!("CREATE TABLE {p}raw_offsets (grp TEXT PRIMARY KEY, position BIGINT NOT NULL)"),
    ] {
        sqlx::query(&ddl).execute(&pool).await?;
    }
    let progress = Arc::new(Progress {
        handled: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        latencies_us: Mutex::default(),
        latency_from: n,
    });
    let consumers: Vec<_> = (0..a.groups)
        .map(|g| {
            tokio::spawn(raw_consumer(pool.clone(), p.clone(), format!("g{g}"), postgres, commit, progress.clone()))
        })
        .collect();
    let body = "x".repeat(a.payload);
    // Each event has its id (a UUIDv7, as eda's), and the inbox is keyed on it.
    let insert = format!("INSERT INTO {p}raw_log (id, payload) VALUES ($1, $2)");
    let publish = |t: Tick| {
        let (pool, insert) = (&pool, &insert);
        async move {
            sqlx::query(insert)
                .bind(uuid::Uuid::now_v7().to_string())
                .bind(serde_json::to_vec(&t)?)
                .execute(pool)
                .await?;
            Ok::<(), BoxError>(())
        }
    };
    let groups = a.groups as u64;
    let start = Instant::now();
    for seq in 0..n {
        publish(tick(seq, &body)).await?;
    }
    let published = start.elapsed();
    wait_for(|| progress.handled.load(Ordering::Acquire), n * groups, "plain SQL").await?;
    let total = start.elapsed();
    let effects = count(&pool, &format!("SELECT COUNT(*) FROM {p}raw_effects")).await?;
    let emitted = count(&pool, &format!("SELECT COUNT(*) FROM {p}raw_outbox")).await?;
    check("plain SQL", effects, emitted, n * groups)?;
    // Latency: events at a fixed rate, below capacity, timed from publish to commit.
    let mut ticks = pace(LATENCY.rate);
    for i in 0..LATENCY.events {
        ticks.tick().await;
        publish(tick(n + i, &body)).await?;
    }
    wait_for(|| progress.handled.load(Ordering::Acquire), (n + LATENCY.events) * groups, "plain SQL").await?;
    progress.stop.store(true, Ordering::Release);
    for c in consumers {
        c.await??;
    }
    if postgres {
        for t in ["raw_log", "raw_inbox", "raw_effects", "raw_outbox", "raw_offsets"] {
            sqlx::query(&format!("DROP TABLE {p}{t}")).execute(&pool).await?;
        }
    }
    let latencies_us = std::mem::take(&mut *progress.latencies_us.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(Sample {
        publish_eps: n as f64 / published.as_secs_f64(),
        e2e_eps: n as f64 / total.as_secs_f64(),
        latencies_us,
    })
}

/// One group's sequential consumer: batches of 100 by position.
async fn raw_consumer(
    pool: sqlx::AnyPool,
    p: String,
    grp: String,
    postgres: bool,
    commit: Commit,
    progress: Arc<Progress>,
) -> Result<(), BoxError> {
    let begin = if postgres { "BEGIN" } else { "BEGIN IMMEDIATE" };
    let select = format!("SELECT seq, id, payload FROM {p}raw_log WHERE seq > $1 ORDER BY seq LIMIT 100");
    let inbox = format!("INSERT INTO {p}raw_inbox (grp, id) VALUES ($1, $2) ON CONFLICT DO NOTHING");
    let effect = format!("INSERT INTO {p}raw_effects (seq) VALUES ($1)");
    let outbox = format!("INSERT INTO {p}raw_outbox (payload) VALUES ($1)");
    let offset = format!(
        "INSERT INTO {p}raw_offsets (grp, position) VALUES ($1, $2) ON CONFLICT (grp) DO UPDATE SET position = excluded.position"
    );
    let mut position = 0i64;
    while !progress.stop.load(Ordering::Acquire) {
        let rows: Vec<(i64, String, Vec<u8>)> = sqlx::query_as(&select).bind(position).fetch_all(&pool).await?;
        if rows.is_empty() {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        // One transaction per event, or one for the whole batch read.
        let size = if commit == Commit::PerEvent { 1 } else { rows.len() };
        for chunk in rows.chunks(size) {
            let mut tx = pool.begin_with(begin).await?;
            let mut fresh = Vec::with_capacity(chunk.len());
            for (seq, id, payload) in chunk {
                let tick: Tick = serde_json::from_slice(payload)?;
                if sqlx::query(&inbox).bind(&grp).bind(id).execute(&mut *tx).await?.rows_affected() == 1 {
                    sqlx::query(&effect).bind(seq).execute(&mut *tx).await?;
                    let out = serde_json::to_vec(&Tocked { seq: tick.seq, key: tick.key })?;
                    sqlx::query(&outbox).bind(out).execute(&mut *tx).await?;
                    fresh.push(tick);
                }
                position = *seq;
            }
            sqlx::query(&offset).bind(&grp).bind(position).execute(&mut *tx).await?;
            tx.commit().await?;
            progress.committed(&fresh);
        }
    }
    Ok(())
}

impl Progress {
    fn committed(&self, ticks: &[Tick]) {
        let now = now_us();
        let mut latencies = self.latencies_us.lock().unwrap_or_else(|p| p.into_inner());
        latencies.extend(ticks.iter().filter(|t| t.seq >= self.latency_from).map(|t| now.saturating_sub(t.sent_us)));
        drop(latencies);
        self.handled.fetch_add(ticks.len() as u64, Ordering::Release);
    }
}

/// eda's relay: `n` events already in a PostgreSQL outbox, carried to an in-memory target. The
/// clock stops when the relay has recorded the last batch as relayed (its position committed).
pub async fn eda_relay(a: &Args, n: u64) -> Result<Sample, BoxError> {
    let db = Db::new(true)?;
    let outbox = SqlOptions::new(&db.url).table_prefix(&db.prefix).connect().await?;
    let published = fill(&outbox, n, a.payload, 500).await?;
    let target = MemoryTransport::new();
    let start = Instant::now();
    let relay = Relay::new(outbox.clone(), Arc::new(target.clone())).in_flight(a.in_flight).spawn();
    wait_for(|| relay.relayed(), n, "eda relay").await?;
    let total = start.elapsed();
    relay.stop().await;
    drop_tables(&outbox, &db).await;
    if target.len("bench") as u64 != n {
        return Err(format!("eda relay: the target holds {} events, not {n}", target.len("bench")).into());
    }
    Ok(Sample {
        publish_eps: n as f64 / published.as_secs_f64(),
        e2e_eps: n as f64 / total.as_secs_f64(),
        ..Sample::default()
    })
}

/// A plain relay as a competent engineer writes it: a position row locked and moved in the
/// transaction that reads the next 100 rows past it (`id > last`), the stored envelopes
/// published as one batch. The clock stops after the last batch's commit.
pub async fn raw_relay(a: &Args, n: u64) -> Result<Sample, BoxError> {
    let db = Db::new(true)?;
    let pool = sqlx::PgPool::connect(&db.url).await?;
    let table = format!("{}raw_outbox", db.prefix);
    sqlx::query(&format!(
        "CREATE TABLE {table} (id BIGSERIAL PRIMARY KEY, event_id TEXT NOT NULL, event_type TEXT NOT NULL,
         envelope BYTEA NOT NULL, created_at TIMESTAMPTZ NOT NULL DEFAULT now())"
    ))
    .execute(&pool)
    .await?;
    // The relay's position, moved in the transaction that reads past it: no rescans of sent
    // rows, one row written per batch.
    sqlx::query(&format!("CREATE TABLE {table}_position (relay TEXT PRIMARY KEY, last_id BIGINT NOT NULL)"))
        .execute(&pool)
        .await?;
    sqlx::query(&format!("INSERT INTO {table}_position VALUES ('raw', 0)")).execute(&pool).await?;
    let body = "x".repeat(a.payload);
    let start = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let mut tx = pool.begin().await?;
        for seq in chunk {
            let envelope = eda::Envelope::root("bench", eda::PendingEvent::new(&tick(*seq, &body))?, None);
            sqlx::query(&format!("INSERT INTO {table} (event_id, event_type, envelope) VALUES ($1, 'Tick.v1', $2)"))
                .bind(envelope.id.to_string())
                .bind(serde_json::to_vec(&envelope)?)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
    }
    let published = start.elapsed();
    let target = MemoryTransport::new();
    let start = Instant::now();
    let mut relayed = 0u64;
    while relayed < n {
        let mut tx = pool.begin().await?;
        let (last,): (i64,) =
            sqlx::query_as(&format!("SELECT last_id FROM {table}_position WHERE relay = 'raw' FOR UPDATE"))
                .fetch_one(&mut *tx)
                .await?;
        let rows: Vec<(i64, Vec<u8>)> =
            sqlx::query_as(&format!("SELECT id, envelope FROM {table} WHERE id > $1 ORDER BY id LIMIT 100"))
                .bind(last)
                .fetch_all(&mut *tx)
                .await?;
        // The stored envelopes as they are (each keeps its event id), the batch in one call.
        let ids: Vec<i64> = rows.iter().map(|(id, _)| *id).collect();
        let envelopes =
            rows.iter().map(|(_, e)| serde_json::from_slice(e)).collect::<Result<Vec<eda::Envelope>, _>>()?;
        target.publish_all(&envelopes).await?;
        if let Some(last) = ids.last() {
            sqlx::query(&format!("UPDATE {table}_position SET last_id = $1 WHERE relay = 'raw'"))
                .bind(last)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        relayed += ids.len() as u64;
    }
    let total = start.elapsed();
    sqlx::query(&format!("DROP TABLE {table}, {table}_position")).execute(&pool).await?;
    Ok(Sample {
        publish_eps: n as f64 / published.as_secs_f64(),
        e2e_eps: n as f64 / total.as_secs_f64(),
        ..Sample::default()
    })
}

/// A large backlog in the log, and a consumer working through it for a while: memory stays
/// bounded by the in-flight limit, not by the backlog.
pub async fn backlog(postgres: bool, a: &Args) -> Result<String, BoxError> {
    let n = a.events.unwrap_or(1_000_000);
    let db = Db::new(postgres)?;
    let transport = SqlOptions::new(&db.url).table_prefix(&db.prefix).connect().await?;
    let filled = fill(&transport, n, a.payload, 5_000).await?;
    let rss_before = super::peak_rss_mb();
    let sink = Arc::new(Sink { insert_effect: None });
    let runtime = Runtime::builder(Registry::builder().descriptor(handle_1::descriptor()).publishes::<Tick>().build())
        .shared_state(sink)
        .transport(transport.clone())
        .max_in_flight(a.in_flight)
        .journal_capacity(0)
        .start()
        .await?;
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(a.seconds)).await;
    let handled = runtime.stats().handled;
    let lag: u64 = transport.lag("bench-1", "bench").await?.iter().map(|p| p.lag).sum();
    runtime.shutdown().await;
    drop_tables(&transport, &db).await;
    let which = if postgres { "postgres" } else { "sqlite" };
    Ok(format!(
        "{which} backlog of {n} events (written at {:.0} ev/s): the consumer handled {handled} in {:.1} s ({:.0} ev/s), {lag} still waiting; peak RSS {rss_before:.1} MB before consuming, {:.1} MB after",
        n as f64 / filled.as_secs_f64(),
        start.elapsed().as_secs_f64(),
        handled as f64 / start.elapsed().as_secs_f64(),
        super::peak_rss_mb(),
    ))
}
