//! Measures eda beside the raw client of the same store doing the same work with the same
//! guarantees: a warm-up pair that is not reported, then rounds alternating which side goes
//! first; it prints the medians and the median of the per-round ratios with their min–max.
//!
//! ```text
//! cargo run --release -p eda-examples --bin bench -- \
//!     [--transport memory,sqlite,postgres,postgres-outbox,nats] [--events N] [--payload BYTES] \
//!     [--in-flight N] [--groups 1..4] [--rounds N] [--json]
//! ```
//!
//! Scenarios, each "publish N events, then handle every one in every group":
//! - `memory`: eda's in-memory log with the idempotency guard, beside a hand-written tokio
//!   pipeline (serialize, bounded queue, deserialize, dedupe, call, serialize what it emits).
//! - `sqlite`, `postgres`: eda's SQL log, where each handling writes an effect row and emits an
//!   event in one transaction with its guard record and offset, beside plain SQL doing the same
//!   inserts and selects (a log table, an inbox, an effects table, an outbox, an offset).
//! - `postgres-outbox`: N events already in a PostgreSQL outbox; eda's relay carries them to an
//!   in-memory target, beside a plain relay moving a position row past batches of 100.
//! - `nats`: eda on NATS JetStream (16 partitions, per-key order across instances, the
//!   idempotency guard, each handling emitting an event), beside raw async-nats in the design
//!   eda had before its delivery engine: a stream with one subject per partition, a durable
//!   pull consumer per partition with `max_ack_pending` 1 pulling one message at a time, a
//!   dedupe set, and a confirmed publish of what it emits and a confirmed ack per message. Kept
//!   for history until it is replaced; `nats-peak` is the comparison with the broker at its
//!   best. `nats-drain` does the same with the N events published first (pipelined), and
//!   times only their handling.
//! - `nats-peak`: eda on NATS beside async-nats at its best (one wide pull consumer, no
//!   ordering, no dedupe), publish bare and with eda's headers, and latency at 1,000 events/s;
//!   see `nats_peak.rs`.
//! - `sqlite-backlog`, `postgres-backlog`: N events (1,000,000 by default) waiting in the log;
//!   a consumer works through them for `--seconds` (10 by default). It reports the rate and the
//!   peak RSS, which the in-flight limit bounds whatever the backlog.
//!
//! PostgreSQL runs use `EDA_BENCH_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`)
//! and tables under a fresh prefix; NATS runs `EDA_BENCH_NATS_URL` (default
//! `nats://127.0.0.1:4222`) and streams under a fresh namespace, deleted afterwards.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use eda::sql::{sqlx, Relay, SqlOptions, SqlTransport};
use eda::transport::nats::{NatsOptions, NatsTransport};
use eda::transport::{partition_of, MemoryTransport};
use eda::{event, handler, Ctx, Handler as _, Registry, Runtime, Transport};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

mod nats_peak;

#[event(topic = "bench", key = key)]
#[derive(Serialize, Deserialize)]
struct Tick {
    seq: u64,
    key: u32,
    sent_us: u64,
    body: String,
}

#[event(topic = "bench-out", key = key)]
#[derive(Serialize, Deserialize)]
struct Tocked {
    seq: u64,
    key: u32,
}

/// What the handlers record.
struct Sink {
    handled: AtomicU64,
    latencies_us: Mutex<Vec<u64>>,
    insert_effect: Option<String>,
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

async fn record(tick: &Tick, cx: &Ctx<'_, Sink>) -> Result<Tocked, eda::HandlerError> {
    if let Some(sql) = &cx.insert_effect {
        let mut tx = eda::sql::transaction(cx).await?;
        sqlx::query(sql).bind(tick.seq as i64).execute(&mut **tx).await?;
    }
    cx.latencies_us.lock().unwrap_or_else(|p| p.into_inner()).push(now_us().saturating_sub(tick.sent_us));
    cx.handled.fetch_add(1, Ordering::Relaxed);
    Ok(Tocked { seq: tick.seq, key: tick.key })
}

#[handler(group = "bench-1")]
async fn handle_1(tick: Tick, cx: Ctx<'_, Sink>) -> Result<Tocked, eda::HandlerError> {
    record(&tick, &cx).await
}
#[handler(group = "bench-2")]
async fn handle_2(tick: Tick, cx: Ctx<'_, Sink>) -> Result<Tocked, eda::HandlerError> {
    record(&tick, &cx).await
}
#[handler(group = "bench-3")]
async fn handle_3(tick: Tick, cx: Ctx<'_, Sink>) -> Result<Tocked, eda::HandlerError> {
    record(&tick, &cx).await
}
#[handler(group = "bench-4")]
async fn handle_4(tick: Tick, cx: Ctx<'_, Sink>) -> Result<Tocked, eda::HandlerError> {
    record(&tick, &cx).await
}

#[derive(Clone, Debug)]
struct Args {
    transports: Vec<String>,
    events: Option<u64>,
    payload: usize,
    in_flight: usize,
    groups: usize,
    rounds: usize,
    seconds: u64,
    json: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        transports: vec!["memory".into(), "sqlite".into()],
        events: None,
        payload: 256,
        in_flight: 64,
        groups: 1,
        rounds: 3,
        seconds: 10,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("`{flag}` needs a value"));
        let number = |v: String| v.parse::<u64>().map_err(|_| format!("`{v}` is not a number"));
        match flag.as_str() {
            "--transport" => args.transports = value()?.split(',').map(str::to_owned).collect(),
            "--events" => args.events = Some(number(value()?)?),
            "--payload" => args.payload = number(value()?)? as usize,
            "--in-flight" => args.in_flight = number(value()?)?.max(1) as usize,
            "--groups" => args.groups = number(value()?)?.clamp(1, 4) as usize,
            "--rounds" => args.rounds = number(value()?)?.max(1) as usize,
            "--seconds" => args.seconds = number(value()?)?.max(1),
            "--json" => args.json = true,
            "--help" | "-h" => return Err(String::new()),
            other => return Err(format!("unknown flag `{other}`")),
        }
    }
    for t in &args.transports {
        if ![
            "memory",
            "sqlite",
            "postgres",
            "postgres-outbox",
            "nats",
            "nats-drain",
            "nats-peak",
            "sqlite-backlog",
            "postgres-backlog",
        ]
        .contains(&t.as_str())
        {
            return Err(format!(
                "unknown transport `{t}`: use memory, sqlite, postgres, postgres-outbox, nats, nats-drain, nats-peak, sqlite-backlog or postgres-backlog"
            ));
        }
    }
    Ok(args)
}

/// One measured run.
#[derive(Clone, Debug, Default)]
struct Sample {
    publish_eps: f64,
    e2e_eps: f64,
    latencies_us: Vec<u64>,
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Medians over rounds.
#[derive(Clone, Copy, Debug, Default)]
struct Summary {
    publish_eps: f64,
    e2e_eps: f64,
    p50_us: u64,
    p99_us: u64,
}

fn summarize(samples: &[Sample]) -> Summary {
    let p = |q: f64| {
        median(
            samples
                .iter()
                .map(|s| {
                    let mut l = s.latencies_us.clone();
                    l.sort_unstable();
                    percentile(&l, q) as f64
                })
                .collect(),
        ) as u64
    };
    Summary {
        publish_eps: median(samples.iter().map(|s| s.publish_eps).collect()),
        e2e_eps: median(samples.iter().map(|s| s.e2e_eps).collect()),
        p50_us: p(0.50),
        p99_us: p(0.99),
    }
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        .map_or(0.0, |kb| kb / 1024.0)
}

fn tick(seq: u64, body: &str) -> Tick {
    Tick { seq, key: (seq % 64) as u32, sent_us: now_us(), body: body.to_owned() }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

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

async fn wait_for(count: impl Fn() -> u64, target: u64, what: &str) -> Result<(), BoxError> {
    let deadline = Instant::now() + Duration::from_secs(600);
    while count() < target {
        if Instant::now() > deadline {
            return Err(format!("{what}: only {} of {target} after 10 minutes", count()).into());
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    Ok(())
}

/// The benchmark's handlers of the first `n` groups.
fn groups(n: usize) -> Registry {
    let all = [handle_1::descriptor(), handle_2::descriptor(), handle_3::descriptor(), handle_4::descriptor()];
    all.into_iter().take(n).fold(Registry::builder().publishes::<Tick>(), |r, d| r.descriptor(d)).build()
}

/// Publishes `n` ticks on a transport in batches of `batch`; returns how long it took.
async fn fill(transport: &impl Transport, n: u64, payload: usize, batch: u64) -> Result<Duration, BoxError> {
    let body = "x".repeat(payload);
    let start = Instant::now();
    let mut seq = 0;
    while seq < n {
        let envelopes = (seq..(seq + batch).min(n))
            .map(|s| Ok(eda::Envelope::root("bench", eda::PendingEvent::new(&tick(s, &body))?, None)))
            .collect::<Result<Vec<_>, eda::CodecError>>()?;
        seq += envelopes.len() as u64;
        transport.publish_all(&envelopes).await?;
    }
    Ok(start.elapsed())
}

/// eda: publish `n` events, handle them in `groups` groups.
async fn eda_run(
    transport: Arc<dyn Transport>,
    insert_effect: Option<String>,
    a: &Args,
    n: u64,
) -> Result<Sample, BoxError> {
    let registry = groups(a.groups);
    let sink = Arc::new(Sink { handled: AtomicU64::new(0), latencies_us: Mutex::default(), insert_effect });
    let runtime = Runtime::builder(registry)
        .shared_state(sink.clone())
        .shared_transport(transport)
        .max_in_flight(a.in_flight)
        .journal_capacity(0)
        .start()
        .await?;
    let body = "x".repeat(a.payload);
    let publisher = runtime.publisher();
    let start = Instant::now();
    for seq in 0..n {
        publisher.publish(&tick(seq, &body)).await?;
    }
    let published = start.elapsed();
    wait_for(|| sink.handled.load(Ordering::Relaxed), n * a.groups as u64, "eda").await?;
    let total = start.elapsed();
    runtime.shutdown().await;
    let latencies_us = std::mem::take(&mut *sink.latencies_us.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(Sample {
        publish_eps: n as f64 / published.as_secs_f64(),
        e2e_eps: n as f64 / total.as_secs_f64(),
        latencies_us,
    })
}

/// The hand-written in-process pipeline: serialize, bounded queue, deserialize, dedupe, call,
/// serialize what it emits.
async fn raw_memory(a: &Args, n: u64) -> Result<Sample, BoxError> {
    #[derive(Serialize, Deserialize)]
    struct Wire {
        id: String,
        tick: Tick,
    }
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(n as usize)));
    let mut senders = Vec::new();
    let mut consumers = Vec::new();
    for _ in 0..a.groups {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(a.in_flight);
        senders.push(tx);
        let latencies = latencies.clone();
        consumers.push(tokio::spawn(async move {
            let mut seen = HashSet::new();
            let mut emitted = Vec::new();
            while let Some(bytes) = rx.recv().await {
                let Ok(wire) = serde_json::from_slice::<Wire>(&bytes) else { continue };
                if !seen.insert(wire.id) {
                    continue;
                }
                let out = Tocked { seq: wire.tick.seq, key: wire.tick.key };
                emitted.push(serde_json::to_vec(&out).unwrap_or_default());
                latencies.lock().unwrap_or_else(|p| p.into_inner()).push(now_us().saturating_sub(wire.tick.sent_us));
            }
            emitted.len()
        }));
    }
    let body = "x".repeat(a.payload);
    let start = Instant::now();
    for seq in 0..n {
        let bytes = serde_json::to_vec(&Wire { id: uuid::Uuid::now_v7().to_string(), tick: tick(seq, &body) })?;
        for tx in &senders {
            tx.send(bytes.clone()).await?;
        }
    }
    let published = start.elapsed();
    drop(senders);
    for c in consumers {
        c.await?;
    }
    let total = start.elapsed();
    let latencies_us = std::mem::take(&mut *latencies.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(Sample {
        publish_eps: n as f64 / published.as_secs_f64(),
        e2e_eps: n as f64 / total.as_secs_f64(),
        latencies_us,
    })
}

async fn eda_sql(postgres: bool, a: &Args, n: u64) -> Result<Sample, BoxError> {
    let db = Db::new(postgres)?;
    let transport = SqlOptions::new(&db.url).table_prefix(&db.prefix).connect().await?;
    let effects = format!("{}effects", db.prefix);
    sqlx::query(&format!("CREATE TABLE {effects} (seq BIGINT NOT NULL)")).execute(transport.pool()).await?;
    let insert = format!("INSERT INTO {effects} (seq) VALUES ($1)");
    let sample = eda_run(Arc::new(transport.clone()), Some(insert), a, n).await;
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

/// Plain SQL doing what eda's SQL log does per event: one insert per publish (with the event's
/// UUID); per handling one transaction with an inbox insert keyed on that id, an effect row, an
/// outbox row and the offset.
async fn raw_sql(postgres: bool, a: &Args, n: u64) -> Result<Sample, BoxError> {
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
    let p = &db.prefix;
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
    let begin = if postgres { "BEGIN" } else { "BEGIN IMMEDIATE" };
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(n as usize)));
    let handled = Arc::new(AtomicU64::new(0));
    let mut consumers = Vec::new();
    for g in 0..a.groups {
        let (pool, latencies, handled, p) = (pool.clone(), latencies.clone(), handled.clone(), p.clone());
        consumers.push(tokio::spawn(async move {
            let grp = format!("g{g}");
            let mut position = 0i64;
            let mut done = 0u64;
            while done < n {
                let rows: Vec<(i64, String, Vec<u8>)> =
                    sqlx::query_as(&format!("SELECT seq, id, payload FROM {p}raw_log WHERE seq > $1 ORDER BY seq LIMIT 100"))
                        .bind(position)
                        .fetch_all(&pool)
                        .await?;
                if rows.is_empty() {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                }
                for (seq, id, payload) in rows {
                    let tick: Tick = serde_json::from_slice(&payload)?;
                    let mut tx = pool.begin_with(begin).await?;
                    let fresh = sqlx::query(&format!("INSERT INTO {p}raw_inbox (grp, id) VALUES ($1, $2) ON CONFLICT DO NOTHING"))
                        .bind(&grp)
                        .bind(&id)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected()
                        == 1;
                    if fresh {
                        sqlx::query(&format!("INSERT INTO {p}raw_effects (seq) VALUES ($1)")).bind(seq).execute(&mut *tx).await?;
                        let out = serde_json::to_vec(&Tocked { seq: tick.seq, key: tick.key })?;
                        sqlx::query(&format!("INSERT INTO {p}raw_outbox (payload) VALUES ($1)")).bind(out).execute(&mut *tx).await?;
                    }
                    sqlx::query(&format!(
                        "INSERT INTO {p}raw_offsets (grp, position) VALUES ($1, $2) ON CONFLICT (grp) DO UPDATE SET position = excluded.position"
                    ))
                    .bind(&grp)
                    .bind(seq)
                    .execute(&mut *tx)
                    .await?;
                    tx.commit().await?;
                    latencies.lock().unwrap_or_else(|p| p.into_inner()).push(now_us().saturating_sub(tick.sent_us));
                    handled.fetch_add(1, Ordering::Relaxed);
                    position = seq;
                    done += 1;
                }
            }
            Ok::<(), BoxError>(())
        }));
    }
    let body = "x".repeat(a.payload);
    // Each event has its id (a UUIDv7, as eda's), and the inbox is keyed on it.
    let insert = format!("INSERT INTO {p}raw_log (id, payload) VALUES ($1, $2)");
    let start = Instant::now();
    for seq in 0..n {
        sqlx::query(&insert)
            .bind(uuid::Uuid::now_v7().to_string())
            .bind(serde_json::to_vec(&tick(seq, &body))?)
            .execute(&pool)
            .await?;
    }
    let published = start.elapsed();
    for c in consumers {
        c.await??;
    }
    let total = start.elapsed();
    if postgres {
        for t in ["raw_log", "raw_inbox", "raw_effects", "raw_outbox", "raw_offsets"] {
            sqlx::query(&format!("DROP TABLE {p}{t}")).execute(&pool).await?;
        }
    }
    let latencies_us = std::mem::take(&mut *latencies.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(Sample {
        publish_eps: n as f64 / published.as_secs_f64(),
        e2e_eps: n as f64 / total.as_secs_f64(),
        latencies_us,
    })
}

/// eda's relay: `n` events already in a PostgreSQL outbox, carried to an in-memory target.
async fn eda_relay(a: &Args, n: u64) -> Result<Sample, BoxError> {
    let db = Db::new(true)?;
    let outbox = SqlOptions::new(&db.url).table_prefix(&db.prefix).connect().await?;
    let published = fill(&outbox, n, a.payload, 500).await?;
    let target = MemoryTransport::new();
    let start = Instant::now();
    let relay = Relay::new(outbox.clone(), Arc::new(target.clone())).in_flight(a.in_flight).spawn();
    wait_for(|| target.len("bench") as u64, n, "eda relay").await?;
    let total = start.elapsed();
    relay.stop().await;
    drop_tables(&outbox, &db).await;
    Ok(Sample {
        publish_eps: n as f64 / published.as_secs_f64(),
        e2e_eps: n as f64 / total.as_secs_f64(),
        latencies_us: vec![],
    })
}

/// A plain relay as a competent engineer writes it: a position row locked and moved in the
/// transaction that reads the next 100 rows past it (`id > last`), the stored envelopes
/// published as one batch.
async fn raw_relay(a: &Args, n: u64) -> Result<Sample, BoxError> {
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
        latencies_us: vec![],
    })
}

fn nats_url() -> String {
    std::env::var("EDA_BENCH_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// How many partitions both NATS runs use.
const NATS_PARTITIONS: u32 = 16;

fn nats_namespace() -> String {
    format!("bench{}", &uuid::Uuid::new_v4().simple().to_string()[..10])
}

async fn eda_nats(a: &Args, n: u64, drain: bool) -> Result<Sample, BoxError> {
    let nats = NatsOptions::new(nats_url()).namespace(nats_namespace()).partitions(NATS_PARTITIONS).connect().await?;
    let sample =
        if drain { eda_drain(nats.clone(), a, n).await } else { eda_run(Arc::new(nats.clone()), None, a, n).await };
    nats.delete_namespace().await?;
    sample
}

/// eda: `n` events already waiting on the transport; handle them in `groups` groups.
async fn eda_drain(transport: NatsTransport, a: &Args, n: u64) -> Result<Sample, BoxError> {
    let published = fill(&transport, n, a.payload, 500).await?;
    let registry = groups(a.groups);
    let sink = Arc::new(Sink { handled: AtomicU64::new(0), latencies_us: Mutex::default(), insert_effect: None });
    let start = Instant::now();
    let runtime = Runtime::builder(registry)
        .shared_state(sink.clone())
        .transport(transport)
        .max_in_flight(a.in_flight)
        .journal_capacity(0)
        .start()
        .await?;
    wait_for(|| sink.handled.load(Ordering::Relaxed), n * a.groups as u64, "eda").await?;
    let total = start.elapsed();
    runtime.shutdown().await;
    Ok(Sample {
        publish_eps: n as f64 / published.as_secs_f64(),
        e2e_eps: n as f64 / total.as_secs_f64(),
        latencies_us: vec![],
    })
}

/// Raw async-nats doing what eda does on NATS, with the same guarantees: per-key order across
/// instances (a subject and a `max_ack_pending` 1 consumer per partition), a dedupe set,
/// confirmed publishes of the event and of what each handling emits, confirmed acks. With
/// `drain`, the events are published first and only the handling is timed.
async fn raw_nats(a: &Args, n: u64, drain: bool) -> Result<Sample, BoxError> {
    use async_nats::jetstream::{self, consumer, stream};
    let client = async_nats::connect(nats_url()).await?;
    let js = jetstream::new(client);
    let ns = nats_namespace();
    let subjects = |topic: &str| (0..NATS_PARTITIONS).map(|p| format!("{ns}.{topic}.{p}")).collect::<Vec<_>>();
    let (ticks, tocks) = (format!("{ns}_ticks"), format!("{ns}_tocks"));
    js.create_stream(stream::Config { name: ticks.clone(), subjects: subjects("bench"), ..Default::default() }).await?;
    js.create_stream(stream::Config { name: tocks.clone(), subjects: subjects("bench-out"), ..Default::default() })
        .await?;
    let body = "x".repeat(a.payload);
    let publish = |seq: u64| {
        let t = tick(seq, &body);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", uuid::Uuid::now_v7().to_string());
        // The same placement as eda's, so both runs spread the keys alike.
        let subject = format!("{ns}.bench.{}", partition_of(&t.key.to_string(), NATS_PARTITIONS));
        let js = js.clone();
        async move {
            let payload = serde_json::to_vec(&t)?;
            Ok::<_, BoxError>(js.publish_with_headers(subject, headers, payload.into()).await?)
        }
    };
    let start = Instant::now();
    if drain {
        for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
            let mut acks = Vec::with_capacity(chunk.len());
            for seq in chunk {
                acks.push(publish(*seq).await?);
            }
            for ack in acks {
                ack.await?;
            }
        }
    }
    let prefilled = start.elapsed();
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(n as usize)));
    let handled = Arc::new(AtomicU64::new(0));
    let mut consumers = Vec::new();
    let start = Instant::now();
    for g in 0..a.groups {
        let seen = Arc::new(Mutex::new(HashSet::new()));
        for p in 0..NATS_PARTITIONS {
            let stream = js.get_stream(&ticks).await?;
            let consumer = stream
                .create_consumer(consumer::pull::Config {
                    durable_name: Some(format!("g{g}_{p}")),
                    filter_subject: format!("{ns}.bench.{p}"),
                    ack_policy: consumer::AckPolicy::Explicit,
                    max_ack_pending: 1,
                    ..Default::default()
                })
                .await?;
            let (js, ns, seen, latencies, handled) =
                (js.clone(), ns.clone(), seen.clone(), latencies.clone(), handled.clone());
            consumers.push(tokio::spawn(async move {
                let mut messages = consumer.stream().max_messages_per_batch(1).messages().await?;
                while let Some(message) = messages.next().await {
                    let message = message?;
                    let id = message.headers.as_ref().and_then(|h| h.get("Nats-Msg-Id")).map(|v| v.to_string());
                    let tick: Tick = serde_json::from_slice(&message.payload)?;
                    if seen.lock().unwrap_or_else(|p| p.into_inner()).insert(id) {
                        // Where eda's handler records it: before the emitted event and the ack.
                        if !drain {
                            let latency = now_us().saturating_sub(tick.sent_us);
                            latencies.lock().unwrap_or_else(|p| p.into_inner()).push(latency);
                        }
                        let out = serde_json::to_vec(&Tocked { seq: tick.seq, key: tick.key })?;
                        let partition = partition_of(&tick.key.to_string(), NATS_PARTITIONS);
                        let subject = format!("{ns}.bench-out.{partition}");
                        js.publish(subject, out.into()).await?.await?;
                    }
                    message.double_ack().await?;
                    handled.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<(), BoxError>(())
            }));
        }
    }
    if !drain {
        for seq in 0..n {
            publish(seq).await?.await?;
        }
    }
    let published = if drain { prefilled } else { start.elapsed() };
    wait_for(|| handled.load(Ordering::Relaxed), n * a.groups as u64, "raw nats").await?;
    let total = start.elapsed();
    for c in &consumers {
        c.abort();
    }
    js.delete_stream(&ticks).await?;
    js.delete_stream(&tocks).await?;
    let latencies_us = std::mem::take(&mut *latencies.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(Sample {
        publish_eps: n as f64 / published.as_secs_f64(),
        e2e_eps: n as f64 / total.as_secs_f64(),
        latencies_us,
    })
}

/// A large backlog in the log, and a consumer working through it for a while: memory stays
/// bounded by the in-flight limit, not by the backlog.
async fn backlog(postgres: bool, a: &Args) -> Result<String, BoxError> {
    let n = a.events.unwrap_or(1_000_000);
    let db = Db::new(postgres)?;
    let transport = SqlOptions::new(&db.url).table_prefix(&db.prefix).connect().await?;
    let filled = fill(&transport, n, a.payload, 5_000).await?;
    let rss_before = peak_rss_mb();
    let sink = Arc::new(Sink { handled: AtomicU64::new(0), latencies_us: Mutex::default(), insert_effect: None });
    let runtime = Runtime::builder(Registry::builder().descriptor(handle_1::descriptor()).publishes::<Tick>().build())
        .shared_state(sink.clone())
        .transport(transport.clone())
        .max_in_flight(a.in_flight)
        .journal_capacity(0)
        .start()
        .await?;
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(a.seconds)).await;
    let handled = sink.handled.load(Ordering::Relaxed);
    let lag: u64 = transport.lag("bench-1", "bench").await?.iter().map(|p| p.lag).sum();
    runtime.shutdown().await;
    drop_tables(&transport, &db).await;
    let which = if postgres { "postgres" } else { "sqlite" };
    Ok(format!(
        "{which} backlog of {n} events (written at {:.0} ev/s): the consumer handled {handled} in {:.1} s ({:.0} ev/s), {lag} still waiting; peak RSS {rss_before:.1} MB before consuming, {:.1} MB after",
        n as f64 / filled.as_secs_f64(),
        start.elapsed().as_secs_f64(),
        handled as f64 / start.elapsed().as_secs_f64(),
        peak_rss_mb(),
    ))
}

async fn measure(
    transport: &str,
    a: &Args,
) -> Result<(u64, &'static str, Summary, Summary, (f64, f64, f64)), BoxError> {
    let default_events = match transport {
        "memory" => 50_000,
        "postgres-outbox" => 5_000,
        "nats-drain" => 10_000,
        _ => 2_000,
    };
    let n = a.events.unwrap_or(default_events);
    let (mut eda, mut raw) = (Vec::new(), Vec::new());
    // A warm-up pair first, not reported: neither side gets the cold start alone.
    for round in 0..=a.rounds {
        // Alternate which goes first, so warm-up and drift fall on both alike.
        for first_eda in [round % 2 == 0, round % 2 != 0] {
            let sample = match (transport, first_eda) {
                ("memory", true) => eda_run(Arc::new(MemoryTransport::new()), None, a, n).await?,
                ("memory", false) => raw_memory(a, n).await?,
                ("sqlite", true) => eda_sql(false, a, n).await?,
                ("sqlite", false) => raw_sql(false, a, n).await?,
                ("postgres", true) => eda_sql(true, a, n).await?,
                ("postgres", false) => raw_sql(true, a, n).await?,
                ("nats", true) => eda_nats(a, n, false).await?,
                ("nats", false) => raw_nats(a, n, false).await?,
                ("nats-drain", true) => eda_nats(a, n, true).await?,
                ("nats-drain", false) => raw_nats(a, n, true).await?,
                (_, true) => eda_relay(a, n).await?,
                (_, false) => raw_relay(a, n).await?,
            };
            match (round, first_eda) {
                (0, _) => {}
                (_, true) => eda.push(sample),
                (_, false) => raw.push(sample),
            }
        }
    }
    let scenario = match transport {
        "memory" => "in-process dispatch with guard",
        "postgres-outbox" => "relay outbox -> memory",
        "nats" => "ordered pull, guard, emit, ack",
        "nats-drain" => "the same, from a backlog",
        _ => "log + inbox + effect + outbox",
    };
    let ratios: Vec<f64> = eda.iter().zip(&raw).map(|(e, r)| e.e2e_eps / r.e2e_eps.max(f64::MIN_POSITIVE)).collect();
    Ok((n, scenario, summarize(&eda), summarize(&raw), spread(ratios)))
}

/// Median, min and max of per-round ratios.
fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    match (v.first(), v.last()) {
        (Some(lo), Some(hi)) => (v[v.len() / 2], *lo, *hi),
        _ => (0.0, 0.0, 0.0),
    }
}

#[tokio::main]
async fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("error: {e}");
            }
            eprintln!("usage: bench [--transport memory,sqlite,postgres,postgres-outbox,nats,nats-drain] [--events N] [--payload BYTES] [--in-flight N] [--groups 1..4] [--rounds N] [--json]");
            std::process::exit(2);
        }
    };
    sqlx::any::install_default_drivers();
    if !args.json && args.transports.iter().any(|t| !t.ends_with("-backlog") && t != "nats-peak") {
        println!(
            "{:<16} {:<32} {:>7} {:>7} {:>10} {:>10} {:>10} {:>10} {:>17} {:>9} {:>9} {:>9} {:>9} {:>8}",
            "transport",
            "scenario",
            "events",
            "payload",
            "eda pub/s",
            "raw pub/s",
            "eda ev/s",
            "raw ev/s",
            "ratio",
            "eda p50",
            "eda p99",
            "raw p50",
            "raw p99",
            "peak MB"
        );
    }
    let mut failed = false;
    for transport in &args.transports {
        if transport == "nats-peak" {
            if let Err(e) = nats_peak::run(args.events.unwrap_or(20_000), args.rounds, args.json).await {
                eprintln!("{transport}: {e}");
                failed = true;
            }
            continue;
        }
        if let Some(db) = transport.strip_suffix("-backlog") {
            match backlog(db == "postgres", &args).await {
                Ok(line) if args.json => println!("{}", serde_json::json!({ "transport": transport, "report": line })),
                Ok(line) => println!("{line}"),
                Err(e) => {
                    eprintln!("{transport}: {e}");
                    failed = true;
                }
            }
            continue;
        }
        match measure(transport, &args).await {
            Ok((n, scenario, eda, raw, (ratio, ratio_min, ratio_max))) => {
                let rss = peak_rss_mb();
                if args.json {
                    let line = serde_json::json!({
                        "transport": transport, "scenario": scenario, "events": n, "payload_bytes": args.payload,
                        "groups": args.groups, "in_flight": args.in_flight, "rounds": args.rounds,
                        "eda_eps": eda.e2e_eps.round(), "raw_eps": raw.e2e_eps.round(), "ratio": (ratio * 100.0).round() / 100.0,
                        "ratio_min": (ratio_min * 100.0).round() / 100.0, "ratio_max": (ratio_max * 100.0).round() / 100.0,
                        "eda_publish_eps": eda.publish_eps.round(), "raw_publish_eps": raw.publish_eps.round(),
                        "eda_p50_us": eda.p50_us, "eda_p99_us": eda.p99_us, "raw_p50_us": raw.p50_us, "raw_p99_us": raw.p99_us,
                        "peak_rss_mb": (rss * 10.0).round() / 10.0,
                    });
                    println!("{line}");
                } else {
                    println!(
                        "{:<16} {:<32} {:>7} {:>7} {:>10.0} {:>10.0} {:>10.0} {:>10.0} {:>17} {:>7}us {:>7}us {:>7}us {:>7}us {:>8.1}",
                        transport,
                        scenario,
                        n,
                        args.payload,
                        eda.publish_eps,
                        raw.publish_eps,
                        eda.e2e_eps,
                        raw.e2e_eps,
                        format!("{ratio:.2} ({ratio_min:.2}–{ratio_max:.2})"),
                        eda.p50_us,
                        eda.p99_us,
                        raw.p50_us,
                        raw.p99_us,
                        rss
                    );
                }
            }
            Err(e) => {
                eprintln!("{transport}: {e}");
                failed = true;
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
}
