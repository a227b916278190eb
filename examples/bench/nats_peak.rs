//! `nats-peak`: eda on NATS beside async-nats used at its best on the same server, not beside a
//! copy of eda's design.
//!
//! Both sides, each round: publish N events of 256 B with up to 256 unconfirmed; then one
//! consumer group works through them with an effect per event (the event decoded, a counter
//! moved) and no emitted event; then, with the consumer running, events published at 1,000/s
//! give the publish-to-handler latency.
//!
//! - eda: its publisher (CloudEvents headers, `Nats-Msg-Id`), 16 partitions, one instance of
//!   the group owning them all, per-key order, the idempotency guard (in memory).
//! - raw: one stream and subject; publish bare and, separately, with the very headers eda sends;
//!   one durable pull consumer, `max_ack_pending` 1024, batches of 512, an ack per message, no
//!   ordering and no dedupe.
//!
//! The handling rate is timed on both sides from the first handled event until the server
//! holds every event acknowledged (no pending and no unacknowledged message on the group's
//! consumers, polled every millisecond once the effects are all done, the same way on both
//! sides); set-up is outside both clocks. A warm-up pair is run and dropped; then rounds alternate which side
//! goes first, and the reported ratios are the median of the per-round ratios, with min–max.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use eda::transport::nats::NatsOptions;
use eda::{event, handler, Binding, Ctx, Envelope, PendingEvent, Registry, Runtime, Transport as _};
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::{nats_namespace, nats_url, now_us, percentile, spread, BoxError};

/// How many publishes may wait for their confirmation at once, on both sides.
const UNCONFIRMED: usize = 256;
const LATENCY_EVENTS: u64 = 3_000;

#[event(topic = "peak", key = key)]
#[derive(Serialize, Deserialize)]
pub struct Peak {
    seq: u64,
    key: u32,
    sent_us: u64,
    body: String,
}

fn peak(seq: u64, sent_us: u64) -> Peak {
    Peak { seq, key: (seq % 1024) as u32, sent_us, body: "x".repeat(200) }
}

/// What the effect records, on both sides.
#[derive(Default)]
struct Effect {
    handled: AtomicU64,
    first: OnceLock<Instant>,
    latencies_us: Mutex<Vec<u64>>,
}

impl Effect {
    fn record(&self, event: &Peak) {
        let now = Instant::now();
        let _ = self.first.set(now);
        if event.sent_us > 0 {
            self.latencies_us.lock().unwrap_or_else(|p| p.into_inner()).push(now_us().saturating_sub(event.sent_us));
        }
        self.handled.fetch_add(1, Ordering::Release);
    }

    async fn wait(&self, n: u64) -> Result<(), BoxError> {
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
    fn rate(&self, n: u64, acked: Instant) -> f64 {
        match self.first.get().copied() {
            Some(f) if acked > f => (n - 1) as f64 / (acked - f).as_secs_f64(),
            _ => 0.0,
        }
    }

    fn p99(&self) -> u64 {
        let mut l = self.latencies_us.lock().unwrap_or_else(|p| p.into_inner()).clone();
        l.sort_unstable();
        percentile(&l, 0.99)
    }
}

#[handler(group = "peak")]
async fn peak_effect(event: Peak, effect: Ctx<'_, Effect>) {
    effect.record(&event);
}

/// When the server holds every event acknowledged: polls `unsettled` (messages pending or
/// unacknowledged on the group's consumers) every millisecond until it reads 0.
async fn acked<F, Fut>(unsettled: F) -> Result<Instant, BoxError>
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

/// One side's figures of one round.
#[derive(Clone, Copy, Debug, Default)]
struct Round {
    publish_eps: f64,
    /// Raw only: publishing with eda's headers.
    publish_headers_eps: f64,
    consume_eps: f64,
    p99_us: u64,
}

/// Publishes at 1,000 events/s while the consumer runs, each publish on its own task.
async fn at_fixed_rate<F, Fut>(publish: F) -> Result<(), BoxError>
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

async fn eda_round(n: u64) -> Result<Round, BoxError> {
    let nats = NatsOptions::new(nats_url()).namespace(nats_namespace()).partitions(16).connect().await?;
    let publishing = Runtime::builder(Registry::default()).transport(nats.clone()).start().await?;
    let publisher = publishing.publisher();
    let started = Instant::now();
    let mut pending = futures_util::stream::iter((0..n).map(|i| {
        let publisher = publisher.clone();
        async move { publisher.publish(&peak(i, 0)).await.map(drop) }
    }))
    .buffer_unordered(UNCONFIRMED);
    while let Some(r) = pending.next().await {
        r?;
    }
    let publish_eps = n as f64 / started.elapsed().as_secs_f64();

    let effect = Arc::new(Effect::default());
    let runtime = Runtime::builder(Registry::builder().handler::<peak_effect>().build())
        .shared_state(effect.clone())
        .transport(nats.clone())
        .max_in_flight(1024)
        .journal_capacity(0)
        .start()
        .await?;
    effect.wait(n).await?;
    let done = acked(|| async { Ok(nats.lag("peak", "peak").await?.iter().map(|p| p.lag).sum()) }).await?;
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
    publishing.shutdown().await;
    nats.delete_namespace().await?;
    Ok(Round { publish_eps, publish_headers_eps: 0.0, consume_eps, p99_us })
}

/// The headers eda sends with an event, for the raw side's publish with headers.
fn eda_headers(event: &Peak, stream: &str) -> Result<async_nats::HeaderMap, BoxError> {
    let envelope = Envelope::root("bench", PendingEvent::new(event)?, None);
    let mut headers = async_nats::HeaderMap::new();
    for (name, value) in envelope.headers(Binding::Nats) {
        headers.insert(name, value);
    }
    headers.insert(async_nats::header::NATS_MESSAGE_ID, envelope.id.to_string());
    headers.insert(async_nats::header::NATS_EXPECTED_STREAM, stream);
    Ok(headers)
}

/// Publishes with up to `UNCONFIRMED` waiting for their acknowledgement.
async fn raw_publish(js: &jetstream::Context, subject: &str, n: u64, headers: Option<&str>) -> Result<f64, BoxError> {
    let started = Instant::now();
    let mut pending = FuturesUnordered::new();
    for i in 0..n {
        while pending.len() >= UNCONFIRMED {
            if let Some(ack) = pending.next().await {
                ack?;
            }
        }
        let event = peak(i, 0);
        let payload = bytes::Bytes::from(serde_json::to_vec(&event)?);
        let ack = match headers {
            Some(stream) => js.publish_with_headers(subject.to_owned(), eda_headers(&event, stream)?, payload).await?,
            None => js.publish(subject.to_owned(), payload).await?,
        };
        pending.push(std::future::IntoFuture::into_future(ack));
    }
    while let Some(ack) = pending.next().await {
        ack?;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

async fn raw_round(n: u64) -> Result<Round, BoxError> {
    let client = async_nats::connect(nats_url()).await?;
    let js = jetstream::new(client);
    let ns = nats_namespace();
    let (bare, full) = (format!("{ns}_bare"), format!("{ns}_peak"));
    for name in [&bare, &full] {
        js.create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![format!("{name}.events")],
            ..Default::default()
        })
        .await?;
    }
    let publish_eps = raw_publish(&js, &format!("{bare}.events"), n, None).await?;
    let publish_headers_eps = raw_publish(&js, &format!("{full}.events"), n, Some(&full)).await?;

    let stream = js.get_stream(&full).await?;
    let consumer: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("peak".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            max_ack_pending: 1024,
            ..Default::default()
        })
        .await?;
    let effect = Arc::new(Effect::default());
    let worker = {
        let effect = effect.clone();
        let mut messages = consumer.stream().max_messages_per_batch(512).messages().await?;
        tokio::spawn(async move {
            while let Some(Ok(message)) = messages.next().await {
                let Ok(event) = serde_json::from_slice::<Peak>(&message.payload) else { continue };
                if message.ack().await.is_ok() {
                    effect.record(&event);
                }
            }
        })
    };
    effect.wait(n).await?;
    let done = acked(|| async {
        let info = consumer.get_info().await?;
        Ok(info.num_pending + info.num_ack_pending as u64)
    })
    .await?;
    let consume_eps = effect.rate(n, done);
    effect.latencies_us.lock().unwrap_or_else(|p| p.into_inner()).clear();
    let subject = format!("{full}.events");
    at_fixed_rate(|i| {
        let (js, subject, full) = (js.clone(), subject.clone(), full.clone());
        async move {
            let event = peak(n + i, now_us());
            let payload = bytes::Bytes::from(serde_json::to_vec(&event)?);
            js.publish_with_headers(subject, eda_headers(&event, &full)?, payload).await?.await?;
            Ok(())
        }
    })
    .await?;
    effect.wait(n + LATENCY_EVENTS).await?;
    let p99_us = effect.p99();
    worker.abort();
    for name in [&bare, &full] {
        js.delete_stream(name).await?;
    }
    Ok(Round { publish_eps, publish_headers_eps, consume_eps, p99_us })
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Runs the scenario and prints its line.
pub async fn run(n: u64, rounds: usize, json: bool) -> Result<(), BoxError> {
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
            "transport": "nats-peak", "events": n, "payload_bytes": 256, "rounds": rounds,
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
        println!("nats-peak: {n} events of 256 B, {rounds} rounds (median of per-round ratios, min–max)");
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
