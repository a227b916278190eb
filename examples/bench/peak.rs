//! What the `*-peak` scenarios share: eda on a broker beside the broker's raw client used at
//! its best on the same server, not beside a copy of eda's design.
//!
//! Both sides, each round: publish N events of 256 B with up to 256 unconfirmed; then one
//! consumer group works through them with an effect per event (the event decoded, a counter
//! moved) and no emitted event; then, with the consumer running, events published at 1,000/s
//! give the publish-to-handler latency. The handling rate is timed on both sides from the first
//! handled event until the broker holds every event settled; set-up is outside both clocks. A
//! warm-up pair is run and dropped; then rounds alternate which side goes first, and the
//! reported ratios are the median of the per-round ratios, with min–max.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use eda::{event, handler, Ctx, Publisher, Registry, Runtime, Transport};
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::{now_us, percentile, spread, BoxError};

/// How many publishes may wait for their confirmation at once, on both sides.
pub const UNCONFIRMED: usize = 256;
pub const LATENCY_EVENTS: u64 = 3_000;

#[event(topic = "peak", key = key)]
#[derive(Serialize, Deserialize)]
pub struct Peak {
    pub seq: u64,
    pub key: u32,
    pub sent_us: u64,
    pub body: String,
}

pub fn peak(seq: u64, sent_us: u64) -> Peak {
    Peak { seq, key: (seq % 1024) as u32, sent_us, body: "x".repeat(200) }
}

/// What the effect records, on both sides.
#[derive(Default)]
pub struct Effect {
    pub handled: AtomicU64,
    first: OnceLock<Instant>,
    pub latencies_us: Mutex<Vec<u64>>,
}

impl Effect {
    pub fn record(&self, event: &Peak) {
        let now = Instant::now();
        let _ = self.first.set(now);
        if event.sent_us > 0 {
            self.latencies_us.lock().unwrap_or_else(|p| p.into_inner()).push(now_us().saturating_sub(event.sent_us));
        }
        self.handled.fetch_add(1, Ordering::Release);
    }

    pub async fn wait(&self, n: u64) -> Result<(), BoxError> {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.handled.load(Ordering::Acquire) < n {
            if Instant::now() > deadline {
                return Err(format!("only {} of {n} handled", self.handled.load(Ordering::Acquire)).into());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }

    /// Events per second from the first handled event until `acked`.
    pub fn rate(&self, n: u64, acked: Instant) -> f64 {
        match self.first.get().copied() {
            Some(f) if acked > f => (n - 1) as f64 / (acked - f).as_secs_f64(),
            _ => 0.0,
        }
    }

    pub fn p99(&self) -> u64 {
        let mut l = self.latencies_us.lock().unwrap_or_else(|p| p.into_inner()).clone();
        l.sort_unstable();
        percentile(&l, 0.99)
    }
}

#[handler(group = "peak")]
pub async fn peak_effect(event: Peak, effect: Ctx<'_, Effect>) {
    effect.record(&event);
}

/// When the server holds every event acknowledged: polls `unsettled` (messages pending or
/// unacknowledged on the group's consumers) every millisecond until it reads 0.
pub async fn acked<F, Fut>(unsettled: F) -> Result<Instant, BoxError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<u64, BoxError>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if unsettled().await? == 0 {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            return Err("the server still holds unacknowledged events after 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Publishes `n` events through eda with up to `UNCONFIRMED` at once; events per second.
pub async fn eda_publish(publisher: &Publisher, n: u64) -> Result<f64, BoxError> {
    let started = Instant::now();
    let mut pending = futures_util::stream::iter((0..n).map(|i| {
        let publisher = publisher.clone();
        async move { publisher.publish(&peak(i, 0)).await.map(drop) }
    }))
    .buffer_unordered(UNCONFIRMED);
    while let Some(r) = pending.next().await {
        r?;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// eda's consuming half of a round: a group of `peak_effect` on `transport` works through the
/// `n` events published to it, timed until the broker holds them all settled (its lag reads
/// 0); then `publisher` publishes at 1,000/s for the p99. `(events/s, p99 µs)`.
pub async fn eda_consume(
    transport: Arc<dyn Transport>,
    effect: Arc<Effect>,
    publisher: &Publisher,
    n: u64,
) -> Result<(f64, u64), BoxError> {
    let runtime = Runtime::builder(Registry::builder().handler::<peak_effect>().build())
        .shared_state(effect.clone())
        .shared_transport(transport.clone())
        .max_in_flight(1024)
        .journal_capacity(0)
        .start()
        .await?;
    effect.wait(n).await?;
    let done = acked(|| async { Ok(transport.lag("peak", "peak").await?.iter().map(|p| p.lag).sum()) }).await?;
    let consume_eps = effect.rate(n, done);
    effect.latencies_us.lock().unwrap_or_else(|p| p.into_inner()).clear();
    at_fixed_rate(|i| {
        let publisher = publisher.clone();
        async move { publisher.publish(&peak(n + i, now_us())).await.map(drop).map_err(Into::into) }
    })
    .await?;
    effect.wait(n + LATENCY_EVENTS).await?;
    let p99_us = effect.p99();
    runtime.shutdown().await;
    Ok((consume_eps, p99_us))
}

/// One side's figures of one round.
#[derive(Clone, Copy, Debug, Default)]
pub struct Round {
    pub publish_eps: f64,
    /// Raw only: publishing with eda's headers.
    pub publish_headers_eps: f64,
    pub consume_eps: f64,
    pub p99_us: u64,
}

/// Publishes at 1,000 events/s while the consumer runs, each publish on its own task.
pub async fn at_fixed_rate<F, Fut>(publish: F) -> Result<(), BoxError>
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = Result<(), BoxError>> + Send + 'static,
{
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let mut sent = FuturesUnordered::new();
    for i in 0..LATENCY_EVENTS {
        tick.tick().await;
        sent.push(tokio::spawn(publish(i)));
    }
    while let Some(r) = sent.next().await {
        r??;
    }
    Ok(())
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// One round of one side.
pub type Side = fn(u64) -> Pin<Box<dyn Future<Output = Result<Round, BoxError>>>>;

/// Runs the scenario `name` and prints its line.
pub async fn run(
    name: &str,
    n: u64,
    rounds: usize,
    json: bool,
    eda_round: Side,
    raw_round: Side,
) -> Result<(), BoxError> {
    // Warm-up, not reported.
    eda_round(n / 4).await?;
    raw_round(n / 4).await?;
    let (mut eda, mut raw) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        if round % 2 == 0 {
            eda.push(eda_round(n).await?);
            raw.push(raw_round(n).await?);
        } else {
            raw.push(raw_round(n).await?);
            eda.push(eda_round(n).await?);
        }
    }
    let per_round = |f: &dyn Fn(&Round, &Round) -> f64| spread(eda.iter().zip(&raw).map(|(e, r)| f(e, r)).collect());
    let ratio = per_round(&|e, r| e.consume_eps / r.consume_eps);
    let publish_ratio = per_round(&|e, r| e.publish_eps / r.publish_eps);
    let publish_headers_ratio = per_round(&|e, r| e.publish_eps / r.publish_headers_eps);
    let median = |f: &dyn Fn(&Round) -> f64, side: &[Round]| spread(side.iter().map(f).collect()).0;
    let (eda_p99, raw_p99) = (median(&|r| r.p99_us as f64, &eda), median(&|r| r.p99_us as f64, &raw));
    if json {
        let line = serde_json::json!({
            "transport": name, "events": n, "payload_bytes": 256, "rounds": rounds,
            "eda_eps": median(&|r| r.consume_eps, &eda).round(), "raw_eps": median(&|r| r.consume_eps, &raw).round(),
            "ratio": round2(ratio.0), "ratio_min": round2(ratio.1), "ratio_max": round2(ratio.2),
            "eda_publish_eps": median(&|r| r.publish_eps, &eda).round(),
            "raw_publish_eps": median(&|r| r.publish_eps, &raw).round(),
            "raw_publish_headers_eps": median(&|r| r.publish_headers_eps, &raw).round(),
            "publish_ratio": round2(publish_ratio.0), "publish_ratio_min": round2(publish_ratio.1), "publish_ratio_max": round2(publish_ratio.2),
            "publish_headers_ratio": round2(publish_headers_ratio.0), "publish_headers_ratio_min": round2(publish_headers_ratio.1),
            "publish_headers_ratio_max": round2(publish_headers_ratio.2),
            "eda_p99_us": eda_p99 as u64, "raw_p99_us": raw_p99 as u64,
        });
        println!("{line}");
    } else {
        let show = |(m, lo, hi): (f64, f64, f64)| format!("{m:.2} ({lo:.2}–{hi:.2})");
        println!("{name}: {n} events of 256 B, {rounds} rounds (median of per-round ratios, min–max)");
        println!(
            "  consume  eda {:>8.0}/s  raw {:>8.0}/s  ratio {}",
            median(&|r| r.consume_eps, &eda),
            median(&|r| r.consume_eps, &raw),
            show(ratio)
        );
        println!(
            "  publish  eda {:>8.0}/s  raw bare {:>8.0}/s  raw with eda's headers {:>8.0}/s  ratio {} / {}",
            median(&|r| r.publish_eps, &eda),
            median(&|r| r.publish_eps, &raw),
            median(&|r| r.publish_headers_eps, &raw),
            show(publish_ratio),
            show(publish_headers_ratio)
        );
        println!("  p99 publish→handler at 1,000/s  eda {eda_p99:.0} us  raw {raw_p99:.0} us");
    }
    Ok(())
}
