//! `rabbitmq-peak`: eda on RabbitMQ beside lapin used at its best on the same broker (see
//! `peak.rs` for what both sides do and how they are timed).
//!
//! - eda: its publisher (CloudEvents headers, persistent, `mandatory`, confirms), 4 partitions
//!   as quorum queues with a single active consumer, one instance of the group consuming them
//!   all with a window of 1024 each, per-key order, the idempotency guard (in memory),
//!   settlement by `basic.ack` with `multiple`.
//! - raw: one quorum queue; publish bare and, separately, with the very headers eda sends,
//!   persistent, up to 256 unconfirmed; one consumer with prefetch 1024, a `basic.ack` per
//!   message, no ordering and no dedupe.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use eda::transport::rabbitmq::RabbitOptions;
use eda::{Binding, Envelope, PendingEvent, Registry, Runtime};
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};

use super::peak::{
    acked, at_fixed_rate, eda_consume, eda_publish, peak, peak_effect, Effect, Peak, Round, LATENCY_EVENTS, UNCONFIRMED,
};
use super::{now_us, BoxError};

fn amqp_url() -> String {
    std::env::var("EDA_BENCH_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn namespace() -> String {
    format!("bench{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

async fn eda_round(n: u64) -> Result<Round, BoxError> {
    let rabbit = RabbitOptions::new(amqp_url()).namespace(namespace()).partitions(4).connect().await?;
    let effect = Arc::new(Effect::default());
    // The group's queues are made as it subscribes (RabbitMQ keeps events only for queues
    // that exist): it subscribes once and stops, and the backlog waits in its queues.
    let declaring = Runtime::builder(Registry::builder().handler::<peak_effect>().build())
        .shared_state(Arc::new(Effect::default()))
        .transport(rabbit.clone())
        .start()
        .await?;
    declaring.shutdown().await;
    let publishing = Runtime::builder(Registry::default()).transport(rabbit.clone()).start().await?;
    let publisher = publishing.publisher();
    let publish_eps = eda_publish(&publisher, n).await?;

    let (consume_eps, p99_us) = eda_consume(Arc::new(rabbit.clone()), effect.clone(), &publisher, n).await?;
    publishing.shutdown().await;
    rabbit.delete_declared().await?;
    Ok(Round { publish_eps, publish_headers_eps: 0.0, consume_eps, p99_us })
}

/// The properties eda sends with an event, for the raw side's publish with headers.
fn eda_properties(event: &Peak) -> Result<BasicProperties, BoxError> {
    let envelope = Envelope::root("bench", PendingEvent::new(event)?, None);
    let mut headers = FieldTable::default();
    let mut content_type = None;
    for (name, value) in envelope.headers(Binding::Amqp) {
        if name == Binding::Amqp.content_type_header() {
            content_type = Some(value);
        } else {
            headers.insert(ShortString::from(name), AMQPValue::LongString(LongString::from(value)));
        }
    }
    let properties = BasicProperties::default()
        .with_headers(headers)
        .with_delivery_mode(2)
        .with_message_id(ShortString::from(envelope.id.to_string()));
    Ok(match content_type {
        Some(ct) => properties.with_content_type(ShortString::from(ct)),
        None => properties,
    })
}

/// Publishes with up to `UNCONFIRMED` waiting for their confirm.
async fn raw_publish(channel: &lapin::Channel, queue: &str, n: u64, headers: bool) -> Result<f64, BoxError> {
    let started = Instant::now();
    let mut pending = FuturesUnordered::new();
    for i in 0..n {
        while pending.len() >= UNCONFIRMED {
            if let Some(confirm) = pending.next().await {
                let _: lapin::Confirmation = confirm?;
            }
        }
        let event = peak(i, 0);
        let payload = serde_json::to_vec(&event)?;
        let properties = match headers {
            true => eda_properties(&event)?,
            false => BasicProperties::default().with_delivery_mode(2),
        };
        let confirm = channel
            .basic_publish("".into(), queue.into(), BasicPublishOptions::default(), &payload, properties)
            .await?;
        pending.push(confirm);
    }
    while let Some(confirm) = pending.next().await {
        confirm?;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

async fn quorum_queue(channel: &lapin::Channel, name: &str) -> Result<(), BoxError> {
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), AMQPValue::LongString(LongString::from("quorum")));
    channel.queue_declare(name.into(), QueueDeclareOptions { durable: true, ..Default::default() }, arguments).await?;
    Ok(())
}

async fn raw_round(n: u64) -> Result<Round, BoxError> {
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    let ns = namespace();
    let (bare, full) = (format!("{ns}.bare"), format!("{ns}.peak"));
    for name in [&bare, &full] {
        quorum_queue(&channel, name).await?;
    }
    let publish_eps = raw_publish(&channel, &bare, n, false).await?;
    let publish_headers_eps = raw_publish(&channel, &full, n, true).await?;

    let consuming = connection.create_channel().await?;
    consuming.basic_qos(1024, BasicQosOptions::default()).await?;
    let effect = Arc::new(Effect::default());
    let settled = Arc::new(AtomicU64::new(0));
    let mut consumer = consuming
        .basic_consume(full.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await?;
    let worker = {
        let (effect, settled) = (effect.clone(), settled.clone());
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let Ok(event) = serde_json::from_slice::<Peak>(&delivery.data) else { continue };
                if delivery.ack(BasicAckOptions::default()).await.is_ok() {
                    effect.record(&event);
                    settled.fetch_add(1, Ordering::Release);
                }
            }
        })
    };
    effect.wait(n).await?;
    // The broker has every ack once the client wrote it and nothing is ready.
    let done = acked(|| async {
        let options = QueueDeclareOptions { passive: true, durable: true, ..Default::default() };
        let ready = channel.queue_declare(full.as_str().into(), options, FieldTable::default()).await?.message_count();
        Ok(u64::from(ready) + n.saturating_sub(settled.load(Ordering::Acquire)))
    })
    .await?;
    let consume_eps = effect.rate(n, done);
    effect.latencies_us.lock().unwrap_or_else(|p| p.into_inner()).clear();
    let queue = full.clone();
    let publishing = channel.clone();
    at_fixed_rate(move |i| {
        let (channel, queue) = (publishing.clone(), queue.clone());
        async move {
            let event = peak(n + i, now_us());
            let payload = serde_json::to_vec(&event)?;
            let options = BasicPublishOptions::default();
            channel
                .basic_publish("".into(), queue.as_str().into(), options, &payload, eda_properties(&event)?)
                .await?
                .await?;
            Ok(())
        }
    })
    .await?;
    effect.wait(n + LATENCY_EVENTS).await?;
    let p99_us = effect.p99();
    worker.abort();
    for name in [&bare, &full] {
        channel.queue_delete(name.as_str().into(), QueueDeleteOptions::default()).await?;
    }
    let _ = connection.close(200, "OK".into()).await;
    Ok(Round { publish_eps, publish_headers_eps, consume_eps, p99_us })
}

/// Runs the scenario and prints its line.
pub async fn run(n: u64, rounds: usize, json: bool) -> Result<(), BoxError> {
    super::peak::run("rabbitmq-peak", n, rounds, json, |n| Box::pin(eda_round(n)), |n| Box::pin(raw_round(n))).await
}
