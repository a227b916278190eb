//! Measures eda beside the raw client of the same store doing the same work with the same
//! guarantees: a warm-up pair that is not reported, then rounds alternating which side goes
//! first; it prints the medians and the median of the per-round ratios with their min–max.
//!
//! ```text
//! cargo run --release -p eda-examples --bin bench -- \
//!     [--transport memory,sqlite,postgres,sqlite-batched,postgres-batched,postgres-outbox,nats-peak,rabbitmq-peak,kafka-peak] \
//!     [--events N] [--payload BYTES] [--in-flight N] [--groups 1..4] [--rounds N] [--json]
//! ```
//!
//! Scenarios, each "publish N events, then handle every one in every group", timed until the
//! last handling is complete on both sides (committed on SQL), counting fresh handlings only;
//! then, on the same consumers, events published at a fixed rate below both sides' capacity
//! give the latency from publish to complete handling:
//! - `memory`: eda's in-memory log with the idempotency guard, beside a hand-written tokio
//!   pipeline (serialize, bounded queue, deserialize, dedupe, call, serialize what it emits).
//! - `sqlite`, `postgres`: eda's SQL log, where each handling writes an effect row and emits an
//!   event in one transaction with its guard record and offset, beside plain SQL doing the same
//!   inserts and selects (a log table, an inbox keyed on the event's UUID, an effects table, an
//!   outbox, an offset), one transaction per event as eda.
//! - `sqlite-batched`, `postgres-batched`: the same, with the plain SQL consumer committing
//!   once per batch of up to 100 events, as a hand-written consumer would.
//! - `postgres-outbox`: N events already in a PostgreSQL outbox; eda's relay carries them to an
//!   in-memory target, beside a plain relay moving a position row past batches of 100.
//! - `nats-peak`: eda on NATS beside async-nats at its best (one wide pull consumer, no
//!   ordering, no dedupe), publish bare and with eda's headers, and latency at 1,000 events/s;
//!   see `nats_peak.rs`.
//! - `rabbitmq-peak`: eda on RabbitMQ beside lapin at its best (one quorum queue, confirms with
//!   up to 256 unconfirmed, prefetch 1024, an ack per message, no ordering, no dedupe), the
//!   same three measures; see `rabbitmq_peak.rs`.
//! - `kafka-peak` (or `kafka`): eda on Kafka beside rdkafka at its best (one group member
//!   handling records as they come, offsets stored after each effect and committed every
//!   100 ms, no ordering beyond Kafka's own, no dedupe), the same three measures; see
//!   `kafka_peak.rs`. `EDA_BENCH_KAFKA_BROKERS` (default `127.0.0.1:9092`).
//! - `sqlite-backlog`, `postgres-backlog`: N events (1,000,000 by default) waiting in the log;
//!   a consumer works through them for `--seconds` (10 by default). It reports the rate and the
//!   peak RSS, which the in-flight limit bounds whatever the backlog.
//!
//! PostgreSQL runs use `EDA_BENCH_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/test`)
//! and tables under a fresh prefix; NATS runs `EDA_BENCH_NATS_URL` (default
//! `nats://127.0.0.1:4222`) and streams under a fresh namespace, deleted afterwards; RabbitMQ runs
//! `EDA_BENCH_AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`) and queues under a
//! fresh namespace, deleted afterwards.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use eda::sql::sqlx;
use eda::transport::MemoryTransport;
use eda::{event, handler, Ctx, EntryKind, Handler as _, Registry, Runtime, Transport};
use serde::{Deserialize, Serialize};

mod kafka_peak;
mod nats_peak;
mod peak;
mod rabbitmq_peak;
mod sql;

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

/// The handlers' state: the effect's SQL, when the effect is a row.
struct Sink {
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

const SCENARIOS: [&str; 11] = [
    "memory",
    "sqlite",
    "postgres",
    "sqlite-batched",
    "postgres-batched",
    "postgres-outbox",
    "nats-peak",
    "rabbitmq-peak",
    "kafka-peak",
    "sqlite-backlog",
    "postgres-backlog",
];

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
    for t in &mut args.transports {
        if t == "kafka" {
            // The only Kafka scenario.
            *t = "kafka-peak".into();
        }
        if t == "nats" || t == "nats-drain" {
            return Err(format!(
                "`{t}` is retired: its raw side copied eda's former design (one event in flight per partition); use nats-peak"
            ));
        }
        if !SCENARIOS.contains(&t.as_str()) {
            return Err(format!("unknown transport `{t}`: use one of {}", SCENARIOS.join(", ")));
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

/// The fixed-rate phase that gives the latency: `events` published at `rate` per second.
#[derive(Clone, Copy, Debug)]
pub struct Latency {
    rate: u64,
    events: u64,
}

/// The in-memory latency phase: 1,000 events/s, far below both sides' capacity.
const MEMORY_LATENCY: Latency = Latency { rate: 1_000, events: 2_000 };

/// A ticker at `rate` per second that does not catch up in bursts when late.
fn pace(rate: u64) -> tokio::time::Interval {
    let mut ticks = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks
}

fn start_eda(
    transport: &Arc<dyn Transport>,
    sink: &Arc<Sink>,
    a: &Args,
    journal: usize,
) -> impl Future<Output = eda::Result<Runtime>> {
    Runtime::builder(groups(a.groups))
        .shared_state(sink.clone())
        .shared_transport(transport.clone())
        .max_in_flight(a.in_flight)
        .journal_capacity(journal)
        .start()
}

/// eda: publish `n` events, handle them in `groups` groups; counted by the runtime once each
/// handling is complete (committed, on SQL), fresh ones only. `check` runs after, before the
/// latency phase. Then a second runtime on the same transport, with the journal on (not in the
/// timed phase), handles `latency.events` published at a fixed rate: the journal's record of
/// each handling, written after its commit, gives the latency from publish.
async fn eda_run<C, F>(
    transport: Arc<dyn Transport>,
    insert_effect: Option<String>,
    a: &Args,
    n: u64,
    latency: Latency,
    check: C,
) -> Result<Sample, BoxError>
where
    C: FnOnce() -> F,
    F: Future<Output = Result<(), BoxError>>,
{
    let sink = Arc::new(Sink { insert_effect });
    let groups = a.groups as u64;
    let runtime = start_eda(&transport, &sink, a, 0).await?;
    let body = "x".repeat(a.payload);
    let publisher = runtime.publisher();
    let start = Instant::now();
    for seq in 0..n {
        publisher.publish(&tick(seq, &body)).await?;
    }
    let published = start.elapsed();
    wait_for(|| runtime.stats().handled, n * groups, "eda").await?;
    let total = start.elapsed();
    runtime.shutdown().await;
    check().await?;

    // Each event journals its publish, and per group its handling and the event it emits.
    let runtime = start_eda(&transport, &sink, a, (latency.events as usize + 1) * (2 * a.groups + 1) + 16).await?;
    let publisher = runtime.publisher();
    // Subscribed in every group before the clock: one event handled by each.
    publisher.publish(&tick(n, &body)).await?;
    wait_for(|| runtime.stats().handled, groups, "eda").await?;
    let mut sent = HashMap::with_capacity(latency.events as usize);
    let mut ticks = pace(latency.rate);
    for i in 0..latency.events {
        ticks.tick().await;
        let t = tick(n + 1 + i, &body);
        let sent_us = t.sent_us;
        sent.insert(publisher.publish(&t).await?.id, sent_us);
    }
    wait_for(|| runtime.stats().handled, (latency.events + 1) * groups, "eda").await?;
    let latencies_us = runtime
        .journal()
        .iter()
        .filter(|e| matches!(e.kind, EntryKind::Handled { .. }))
        .filter_map(|e| {
            let at = e.at.duration_since(UNIX_EPOCH).ok()?.as_micros() as u64;
            Some(at.saturating_sub(*sent.get(&e.event_id)?))
        })
        .collect::<Vec<u64>>();
    runtime.shutdown().await;
    if latencies_us.len() as u64 != latency.events * groups {
        return Err(
            format!("{} latency samples where {} were taken", latencies_us.len(), latency.events * groups).into()
        );
    }
    Ok(Sample {
        publish_eps: n as f64 / published.as_secs_f64(),
        e2e_eps: n as f64 / total.as_secs_f64(),
        latencies_us,
    })
}

/// The hand-written in-process pipeline: serialize, bounded queue, deserialize, dedupe, call,
/// serialize what it emits; counted after each handling, fresh ones only.
async fn raw_memory(a: &Args, n: u64) -> Result<Sample, BoxError> {
    #[derive(Serialize, Deserialize)]
    struct Wire {
        id: String,
        tick: Tick,
    }
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(MEMORY_LATENCY.events as usize)));
    let handled = Arc::new(AtomicU64::new(0));
    let mut senders = Vec::new();
    let mut consumers = Vec::new();
    for _ in 0..a.groups {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(a.in_flight);
        senders.push(tx);
        let (latencies, handled) = (latencies.clone(), handled.clone());
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
                if wire.tick.seq >= n {
                    latencies
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(now_us().saturating_sub(wire.tick.sent_us));
                }
                handled.fetch_add(1, Ordering::Release);
            }
            emitted.len()
        }));
    }
    let body = "x".repeat(a.payload);
    let send = |seq: u64| {
        let senders = &senders;
        let body = &body;
        async move {
            let bytes = serde_json::to_vec(&Wire { id: uuid::Uuid::now_v7().to_string(), tick: tick(seq, body) })?;
            for tx in senders {
                tx.send(bytes.clone()).await?;
            }
            Ok::<(), BoxError>(())
        }
    };
    let groups = a.groups as u64;
    let start = Instant::now();
    for seq in 0..n {
        send(seq).await?;
    }
    let published = start.elapsed();
    wait_for(|| handled.load(Ordering::Acquire), n * groups, "hand-written").await?;
    let total = start.elapsed();
    let mut ticks = pace(MEMORY_LATENCY.rate);
    for i in 0..MEMORY_LATENCY.events {
        ticks.tick().await;
        send(n + i).await?;
    }
    wait_for(|| handled.load(Ordering::Acquire), (n + MEMORY_LATENCY.events) * groups, "hand-written").await?;
    drop(senders);
    for c in consumers {
        let emitted = c.await?;
        if emitted as u64 != n + MEMORY_LATENCY.events {
            return Err(format!("hand-written: {emitted} emitted, not {}", n + MEMORY_LATENCY.events).into());
        }
    }
    let latencies_us = std::mem::take(&mut *latencies.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(Sample {
        publish_eps: n as f64 / published.as_secs_f64(),
        e2e_eps: n as f64 / total.as_secs_f64(),
        latencies_us,
    })
}

/// eda on the in-memory transport; the effects are checked by the runtime's own count.
async fn eda_memory(a: &Args, n: u64) -> Result<Sample, BoxError> {
    let transport = MemoryTransport::new();
    let out = transport.clone();
    let expected = n * a.groups as u64;
    eda_run(Arc::new(transport), None, a, n, MEMORY_LATENCY, || async move {
        match out.len("bench-out") as u64 {
            emitted if emitted == expected => Ok(()),
            emitted => Err(format!("eda: {emitted} emitted events, not {expected}").into()),
        }
    })
    .await
}

/// The rate of a scenario's latency phase, when it has one.
fn latency_rate(transport: &str) -> Option<u64> {
    match transport {
        "memory" => Some(MEMORY_LATENCY.rate),
        "postgres-outbox" => None,
        _ => Some(sql::LATENCY.rate),
    }
}

fn nats_url() -> String {
    std::env::var("EDA_BENCH_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

fn nats_namespace() -> String {
    format!("bench{}", &uuid::Uuid::new_v4().simple().to_string()[..10])
}

async fn measure(
    transport: &str,
    a: &Args,
) -> Result<(u64, &'static str, Summary, Summary, (f64, f64, f64)), BoxError> {
    let default_events = match transport {
        "memory" => 50_000,
        "postgres-outbox" => 5_000,
        _ => 2_000,
    };
    let n = a.events.unwrap_or(default_events);
    let (mut eda, mut raw) = (Vec::new(), Vec::new());
    // A warm-up pair first, not reported: neither side gets the cold start alone.
    for round in 0..=a.rounds {
        // Alternate which goes first, so warm-up and drift fall on both alike.
        for first_eda in [round % 2 == 0, round % 2 != 0] {
            let sample = match (transport, first_eda) {
                ("memory", true) => eda_memory(a, n).await?,
                ("memory", false) => raw_memory(a, n).await?,
                ("postgres-outbox", true) => sql::eda_relay(a, n).await?,
                ("postgres-outbox", false) => sql::raw_relay(a, n).await?,
                (db, true) => sql::eda_sql(db.starts_with("postgres"), a, n).await?,
                (db, false) => {
                    let commit = if db.ends_with("-batched") { sql::Commit::PerBatch } else { sql::Commit::PerEvent };
                    sql::raw_sql(db.starts_with("postgres"), commit, a, n).await?
                }
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
        "sqlite-batched" | "postgres-batched" => "the same, plain SQL commits per batch",
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
            eprintln!(
                "usage: bench [--transport {}] [--events N] [--payload BYTES] [--in-flight N] [--groups 1..4] [--rounds N] [--seconds N] [--json]",
                SCENARIOS.join(",")
            );
            std::process::exit(2);
        }
    };
    sqlx::any::install_default_drivers();
    if !args.json && args.transports.iter().any(|t| !t.ends_with("-backlog") && !t.ends_with("-peak")) {
        println!(
            "{:<16} {:<36} {:>7} {:>7} {:>10} {:>10} {:>10} {:>10} {:>17} {:>8} {:>9} {:>9} {:>9} {:>9} {:>8}",
            "transport",
            "scenario",
            "events",
            "payload",
            "eda pub/s",
            "raw pub/s",
            "eda ev/s",
            "raw ev/s",
            "ratio",
            "lat. at",
            "eda p50",
            "eda p99",
            "raw p50",
            "raw p99",
            "peak MB"
        );
    }
    let mut failed = false;
    for transport in &args.transports {
        if transport.ends_with("-peak") {
            let (n, rounds, json) = (args.events.unwrap_or(20_000), args.rounds, args.json);
            let ran = match transport.as_str() {
                "nats-peak" => nats_peak::run(n, rounds, json).await,
                "kafka-peak" => kafka_peak::run(n, rounds, json).await,
                _ => rabbitmq_peak::run(n, rounds, json).await,
            };
            if let Err(e) = ran {
                eprintln!("{transport}: {e}");
                failed = true;
            }
            continue;
        }
        if let Some(db) = transport.strip_suffix("-backlog") {
            match sql::backlog(db == "postgres", &args).await {
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
                        "peak_rss_mb": (rss * 10.0).round() / 10.0, "latency_rate_per_s": latency_rate(transport),
                    });
                    println!("{line}");
                } else {
                    println!(
                        "{:<16} {:<36} {:>7} {:>7} {:>10.0} {:>10.0} {:>10.0} {:>10.0} {:>17} {:>8} {:>7}us {:>7}us {:>7}us {:>7}us {:>8.1}",
                        transport,
                        scenario,
                        n,
                        args.payload,
                        eda.publish_eps,
                        raw.publish_eps,
                        eda.e2e_eps,
                        raw.e2e_eps,
                        format!("{ratio:.2} ({ratio_min:.2}–{ratio_max:.2})"),
                        latency_rate(transport).map_or("–".to_owned(), |r| format!("{r}/s")),
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
