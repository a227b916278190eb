//! `kafka-peak`: eda on Kafka beside rdkafka used at its best on the same broker (see
//! `peak.rs` for what both sides do and how they are timed).
//!
//! - eda: its publisher (CloudEvents `ce_*` headers, keyed records, idempotent producer with
//!   `acks=all`), 8 partitions, one member of the group consuming them all with a window of
//!   1024 each, per-key order, the idempotency guard (in memory), commits of the contiguous
//!   handled prefix.
//! - raw: the same producer settings, publishing keyed records bare and, separately, with the
//!   very headers eda sends; one group member (`StreamConsumer`) handling records as they come,
//!   storing each offset after its effect, with the offsets committed every 100 ms (librdkafka's
//!   at-least-once commit after processing), no dedupe.
//!
//! Publishing is measured with librdkafka's batching (`linger.ms` 5) on topics nobody consumes.
//! The consumed topic is produced with one record per batch on both sides: tansu 0.6.0 serves a
//! fetch at an offset inside a batch from the next batch on, so a consumer that resumes inside a
//! batch (eda pauses a partition whose window is full) would miss the rest of that batch, and
//! tansu's latest offset, which lag is read from, is wrong for batches. Kafka needs neither.

use std::sync::Arc;
use std::time::{Duration, Instant};

use eda::transport::kafka::KafkaOptions;
use eda::{Binding, Envelope, PendingEvent, Registry, Runtime};
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use super::peak::{
    acked, at_fixed_rate, eda_consume, eda_publish, peak, Effect, Peak, Round, LATENCY_EVENTS, UNCONFIRMED,
};
use super::{now_us, BoxError};

const PARTITIONS: u32 = 8;
/// Records published to a topic before its publish rate is timed.
const WARM: u64 = 500;

fn brokers() -> String {
    std::env::var("EDA_BENCH_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

fn namespace() -> String {
    format!("bench{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

fn options(namespace: &str, one_per_batch: bool) -> KafkaOptions {
    let o = KafkaOptions::new(brokers()).namespace(namespace).partitions(PARTITIONS).replication(1);
    if one_per_batch {
        o.set("batch.num.messages", "1")
    } else {
        o
    }
}

async fn eda_round(n: u64) -> Result<Round, BoxError> {
    let timed = options(&namespace(), false).connect().await?;
    let publishing = Runtime::builder(Registry::default()).transport(timed).start().await?;
    // Untimed first: the topic is created and the producer knows its partitions' leaders.
    eda_publish(&publishing.publisher(), WARM).await?;
    let publish_eps = eda_publish(&publishing.publisher(), n).await?;
    publishing.shutdown().await;

    let kafka = options(&namespace(), true).connect().await?;
    let publishing = Runtime::builder(Registry::default()).transport(kafka.clone()).start().await?;
    eda_publish(&publishing.publisher(), n).await?;
    let effect = Arc::new(Effect::default());
    let publisher = publishing.publisher();
    let (consume_eps, p99_us) = eda_consume(Arc::new(kafka.clone()), effect.clone(), &publisher, n).await?;
    publishing.shutdown().await;
    Ok(Round { publish_eps, publish_headers_eps: 0.0, consume_eps, p99_us })
}

/// The headers eda sends with an event, for the raw side's publish with headers.
fn eda_headers(event: &Peak) -> Result<OwnedHeaders, BoxError> {
    let envelope = Envelope::root("bench", PendingEvent::new(event)?, None);
    let mut headers = OwnedHeaders::new();
    for (name, value) in envelope.headers(Binding::Kafka) {
        headers = headers.insert(Header { key: name, value: Some(value.as_str()) });
    }
    Ok(headers)
}

/// A producer with eda's settings: idempotent, `acks=all`, `linger.ms` 5, Java's partitioner.
fn producer(one_per_batch: bool) -> Result<FutureProducer, BoxError> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers())
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("partitioner", "murmur2_random");
    if one_per_batch {
        config.set("batch.num.messages", "1");
    }
    Ok(config.create()?)
}

/// Publishes n keyed records with up to `UNCONFIRMED` waiting for their delivery report.
async fn raw_publish(producer: &FutureProducer, topic: &str, n: u64, headers: bool) -> Result<f64, BoxError> {
    let started = Instant::now();
    let mut pending = FuturesUnordered::new();
    for i in 0..n {
        while pending.len() >= UNCONFIRMED {
            if let Some(delivered) = pending.next().await {
                delivered?;
            }
        }
        let event = peak(i, 0);
        let payload = serde_json::to_vec(&event)?;
        let key = event.key.to_string();
        let mut record = FutureRecord::to(topic).key(&key).payload(&payload);
        if headers {
            record = record.headers(eda_headers(&event)?);
        }
        let delivery = producer.send_result(record).map_err(|(e, _)| e)?;
        pending.push(async move {
            match delivery.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((e, _))) => Err(BoxError::from(e)),
                Err(_) => Err("the producer went away".into()),
            }
        });
    }
    while let Some(delivered) = pending.next().await {
        delivered?;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// Records of `topic` not committed by `group` yet.
fn uncommitted(reader: &BaseConsumer, topic: &str) -> Result<u64, BoxError> {
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(topic, p as i32);
    }
    let committed = reader.committed_offsets(tpl, Duration::from_secs(10))?;
    let mut total = 0;
    for p in 0..PARTITIONS {
        let (low, high) = reader.fetch_watermarks(topic, p as i32, Duration::from_secs(10))?;
        let from = match committed.find_partition(topic, p as i32).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o,
            _ => low,
        };
        total += u64::try_from(high - from).unwrap_or(0);
    }
    Ok(total)
}

async fn create_topics(topics: &[&str]) -> Result<(), BoxError> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<_> = ClientConfig::new().set("bootstrap.servers", brokers()).create()?;
    let new: Vec<NewTopic> =
        topics.iter().map(|t| NewTopic::new(t, PARTITIONS as i32, TopicReplication::Fixed(1))).collect();
    admin.create_topics(&new, &AdminOptions::new()).await?;
    Ok(())
}

async fn raw_round(n: u64) -> Result<Round, BoxError> {
    let ns = namespace();
    let (bare, full, consumed) = (format!("{ns}.bare"), format!("{ns}.full"), format!("{ns}.peak"));
    create_topics(&[&bare, &full, &consumed]).await?;
    let batching = producer(false)?;
    // Untimed first, as on eda's side: each topic's leaders known to the producer.
    raw_publish(&batching, &bare, WARM, false).await?;
    raw_publish(&batching, &full, WARM, true).await?;
    let publish_eps = raw_publish(&batching, &bare, n, false).await?;
    let publish_headers_eps = raw_publish(&batching, &full, n, true).await?;
    let single = producer(true)?;
    raw_publish(&single, &consumed, n, true).await?;

    let group = format!("{ns}.raw");
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", &group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "100")
        .set("enable.auto.offset.store", "false")
        .create()?;
    consumer.subscribe(&[&consumed])?;
    let consumer = Arc::new(consumer);
    let effect = Arc::new(Effect::default());
    let worker = {
        let (effect, consumer) = (effect.clone(), consumer.clone());
        tokio::spawn(async move {
            let mut stream = consumer.stream();
            while let Some(Ok(m)) = stream.next().await {
                let Some(Ok(event)) = m.payload().map(serde_json::from_slice::<Peak>) else { continue };
                effect.record(&event);
                let _ = consumer.store_offset_from_message(&m);
            }
        })
    };
    effect.wait(n).await?;
    let reader: Arc<BaseConsumer> =
        Arc::new(ClientConfig::new().set("bootstrap.servers", brokers()).set("group.id", &group).create()?);
    let done = acked(|| {
        let (reader, topic) = (reader.clone(), consumed.clone());
        async move { tokio::task::spawn_blocking(move || uncommitted(&reader, &topic)).await? }
    })
    .await?;
    let consume_eps = effect.rate(n, done);
    effect.latencies_us.lock().unwrap_or_else(|p| p.into_inner()).clear();
    let single = Arc::new(single);
    at_fixed_rate(move |i| {
        let (producer, topic) = (single.clone(), consumed.clone());
        async move {
            let event = peak(n + i, now_us());
            let payload = serde_json::to_vec(&event)?;
            let key = event.key.to_string();
            let record = FutureRecord::to(&topic).key(&key).payload(&payload).headers(eda_headers(&event)?);
            producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e)?;
            Ok(())
        }
    })
    .await?;
    effect.wait(n + LATENCY_EVENTS).await?;
    let p99_us = effect.p99();
    worker.abort();
    Ok(Round { publish_eps, publish_headers_eps, consume_eps, p99_us })
}

/// Runs the scenario and prints its line.
pub async fn run(n: u64, rounds: usize, json: bool) -> Result<(), BoxError> {
    super::peak::run("kafka-peak", n, rounds, json, |n| Box::pin(eda_round(n)), |n| Box::pin(raw_round(n))).await
}
