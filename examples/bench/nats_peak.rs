//! `nats-peak`: eda on NATS beside async-nats used at its best on the same server (see
//! `peak.rs` for what both sides do and how they are timed).
//!
//! - eda: its publisher (CloudEvents headers, `Nats-Msg-Id`), 16 partitions, one instance of
//!   the group owning them all, per-key order, the idempotency guard (in memory).
//! - raw: one stream and subject; publish bare and, separately, with the very headers eda sends;
//!   one durable pull consumer, `max_ack_pending` 1024, batches of 512, an ack per message, no
//!   ordering and no dedupe.

use std::sync::Arc;
use std::time::Instant;

use async_nats::jetstream::{self, consumer, stream};
use eda::transport::nats::NatsOptions;
use eda::{Binding, Envelope, PendingEvent, Registry, Runtime};
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;

use super::peak::{
    acked, at_fixed_rate, eda_consume, eda_publish, peak, Effect, Peak, Round, LATENCY_EVENTS, UNCONFIRMED,
};
use super::{nats_namespace, nats_url, now_us, BoxError};

async fn eda_round(n: u64) -> Result<Round, BoxError> {
    let nats = NatsOptions::new(nats_url()).namespace(nats_namespace()).partitions(16).connect().await?;
    let publishing = Runtime::builder(Registry::default()).transport(nats.clone()).start().await?;
    let publisher = publishing.publisher();
    let publish_eps = eda_publish(&publisher, n).await?;

    let effect = Arc::new(Effect::default());
    let (consume_eps, p99_us) = eda_consume(Arc::new(nats.clone()), effect.clone(), &publisher, n).await?;
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

/// Runs the scenario and prints its line.
pub async fn run(n: u64, rounds: usize, json: bool) -> Result<(), BoxError> {
    super::peak::run("nats-peak", n, rounds, json, |n| Box::pin(eda_round(n)), |n| Box::pin(raw_round(n))).await
}
