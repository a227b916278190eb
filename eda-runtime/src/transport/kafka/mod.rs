//! Kafka (feature `kafka`, URLs `kafka://host:9092,…`), with librdkafka.
//!
//! What eda keeps on the cluster, for namespace `eda` (the default; see
//! [`KafkaOptions::namespace`]):
//!
//! - **A topic per eda topic**, `eda.<topic>`, created on first use with
//!   [`partitions`](KafkaOptions::partitions) partitions and the
//!   [`replication`](KafkaOptions::replication) factor (a topic that exists keeps its own).
//!   An event is a record keyed by its key (its subject, or its id), so librdkafka's
//!   `murmur2_random` partitioner puts it where a Java producer would put the same key, with its
//!   CloudEvents attributes as `ce_*` headers and its content type as `content-type` (the Kafka
//!   binding's binary mode) and the payload as the value. The producer is idempotent with
//!   `acks=all`; publishes are pipelined, and a record the cluster did not take within
//!   [`publish_timeout`](KafkaOptions::publish_timeout) is an error to the caller, never a
//!   silent loss.
//! - **A consumer group per eda group and topic**, `eda.<group>:<topic>`, with
//!   `cooperative-sticky` assignment. The group protocol gives each partition to one member; the
//!   delivery engine gives that member a window of [`window`](KafkaOptions::window) events
//!   of the partition at once, one event per key out at a time (also across retries) while
//!   other keys run on, and commits the offset after the contiguous handled prefix — never
//!   past an event still in flight — without waiting, a batch at a time, and waits for the
//!   last commit of a partition it gives up. A revoked partition stops taking, lets what is
//!   out finish (up to the [`handover_timeout`](KafkaOptions::handover_timeout)), commits
//!   what is done, and only then goes to its next owner, which resumes from the committed
//!   offset; what was handled and not yet committed comes again, and the idempotency guards
//!   absorb it.
//! - **Dead letters** in `eda.<topic>.dlq` (one partition): the original record with
//!   `eda-dlq-*` headers saying which group gave up, why, after how many attempts and when,
//!   keyed by the letter's id. [`DeadLetterStore`] reads those topics through; removing a
//!   letter writes a tombstone for its key, so `<app> dlq list|show|replay|purge` work on
//!   Kafka as on the other transports.
//!
//! Lag is, per partition, the high watermark less the group's committed offset.
//!
//! Kafka keeps no count of deliveries: an event whose handler crashes the process every time
//! it runs comes again after every restart, as a Kafka consumer would see it; the runtime's
//! retries and dead letters cover handlers that fail without crashing.

mod consumer;
mod dead_letters;
mod options;
mod publish;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use eda_core::{DeadLetterStore, Deliveries, Envelope, PartitionLag, Subscription, Transport, TransportError};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, DefaultConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::time::Instant;

pub use options::KafkaOptions;

const NAME: &str = "kafka";

/// How long a metadata or offsets request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The Kafka transport: see the [module docs](self) for what it keeps on the cluster.
///
/// ```no_run
/// # async fn run() -> Result<(), eda::TransportError> {
/// use eda::transport::kafka::KafkaOptions;
/// let transport = KafkaOptions::new("127.0.0.1:9092").namespace("shop").connect().await?;
/// # drop(transport); Ok(()) }
/// ```
#[derive(Clone)]
pub struct KafkaTransport {
    inner: Arc<Inner>,
}

struct Inner {
    options: KafkaOptions,
    producer: FutureProducer<Logged>,
    admin: AdminClient<Logged>,
    /// Reads the cluster's metadata.
    meta: BaseConsumer<Logged>,
    /// The partition count of each Kafka topic this instance made sure of.
    topics: Mutex<HashMap<String, u32>>,
    /// The engine of every subscription: closing waits for those of stopped ones.
    engines: crate::engine::Engines,
    /// Per consumer group, a client that reads its committed offsets (it never joins).
    offsets: Mutex<HashMap<String, Arc<BaseConsumer<DefaultConsumerContext>>>>,
}

/// Sends librdkafka's log lines and errors to `tracing`, without secrets (librdkafka logs no
/// passwords).
#[derive(Clone, Copy, Default)]
pub(super) struct Logged;

impl ClientContext for Logged {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        log(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", error = %error, "{reason}");
    }
}

impl rdkafka::consumer::ConsumerContext for Logged {}

pub(super) fn log(level: RDKafkaLogLevel, fac: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
            tracing::error!(target: "librdkafka", facility = fac, "{message}")
        }
        RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", facility = fac, "{message}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", facility = fac, "{message}")
        }
        RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", facility = fac, "{message}"),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// librdkafka's refusal of a client's settings, as an error that names the property and never
/// shows a secret's value (librdkafka's own message repeats the value it refused).
pub(super) fn refused(e: KafkaError) -> TransportError {
    let reason = match &e {
        KafkaError::ClientConfig(_, _, key, _) if options::secret(key) => {
            format!("librdkafka refused the value of `{key}` (not shown); check it")
        }
        KafkaError::ClientConfig(_, description, key, _) => {
            format!("librdkafka refused `{key}`: {description}; check the librdkafka properties given")
        }
        e => format!("librdkafka refused the settings: {e}; check the librdkafka properties given"),
    };
    TransportError::Config { transport: NAME, reason }
}

fn other(e: impl std::error::Error + Send + Sync + 'static) -> TransportError {
    TransportError::Other { transport: NAME, source: Box::new(e) }
}

/// Runs a blocking librdkafka call off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, TransportError> {
    tokio::task::spawn_blocking(f).await.map_err(|_| TransportError::Closed(NAME))
}

impl KafkaTransport {
    /// Connects to the cluster a URL names, with settings from its query (see
    /// [`KafkaOptions::from_url`]).
    pub async fn connect(url: &str) -> Result<Self, TransportError> {
        KafkaOptions::from_url(url)?.connect().await
    }

    /// Connects with `options`: the cluster must answer now, so a wrong address or password
    /// shows at start.
    pub async fn connect_with(options: KafkaOptions) -> Result<Self, TransportError> {
        options.check()?;
        let mut producer = options.client();
        producer
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("partitioner", "murmur2_random")
            .set("message.timeout.ms", options.publish_timeout.as_millis().to_string());
        if !options.properties.iter().any(|(k, _)| k == "linger.ms") {
            producer.set("linger.ms", "5");
        }
        let producer: FutureProducer<Logged> = producer.create_with_context(Logged).map_err(refused)?;
        let admin: AdminClient<Logged> = options.client().create_with_context(Logged).map_err(refused)?;
        let mut meta = options.consumer_client();
        meta.set("allow.auto.create.topics", "false");
        let meta: BaseConsumer<Logged> = meta.create_with_context(Logged).map_err(refused)?;
        let transport = Self {
            inner: Arc::new(Inner {
                options,
                producer,
                admin,
                meta,
                topics: Mutex::default(),
                engines: Default::default(),
                offsets: Mutex::default(),
            }),
        };
        transport.metadata(None).await?;
        Ok(transport)
    }

    pub(super) fn options(&self) -> &KafkaOptions {
        &self.inner.options
    }

    pub(super) fn producer(&self) -> &FutureProducer<Logged> {
        &self.inner.producer
    }

    /// The Kafka topic of an eda topic.
    pub(super) fn topic_name(&self, topic: &str) -> String {
        format!("{}.{topic}", self.inner.options.namespace)
    }

    /// The consumer group of an eda group on one topic: each subscription is a group of its
    /// own, so that one joining or leaving does not stop the group's other topics for a
    /// rebalance.
    pub(super) fn group_name(&self, group: &str, topic: &str) -> String {
        format!("{}.{group}:{topic}", self.inner.options.namespace)
    }

    /// The cluster's topics (or only `topic`, where it exists) with their partition counts; an
    /// error that says what to check when the cluster does not answer. Asked by a consumer
    /// client, which never makes the topic it asks about.
    async fn metadata(&self, topic: Option<&str>) -> Result<HashMap<String, u32>, TransportError> {
        let t = self.clone();
        let topic = topic.map(str::to_owned);
        let read = blocking(move || t.inner.meta.fetch_metadata(topic.as_deref(), REQUEST_TIMEOUT)).await?;
        let metadata = read.map_err(|e| TransportError::Unreachable {
            transport: NAME,
            reason: format!(
                "Kafka at {}: {e}; check that the brokers run and the address, security protocol and SASL settings",
                self.inner.options.brokers
            ),
        })?;
        let found = metadata.topics().iter().filter(|t| t.error().is_none() && !t.partitions().is_empty());
        Ok(found.map(|t| (t.name().to_owned(), t.partitions().len() as u32)).collect())
    }

    /// Makes sure a Kafka topic exists (once per instance), creating it with `partitions`;
    /// returns its partition count.
    pub(super) async fn ensure_topic_named(&self, name: &str, partitions: u32) -> Result<u32, TransportError> {
        if let Some(n) = lock(&self.inner.topics).get(name) {
            return Ok(*n);
        }
        check_name(name)?;
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        let mut created = false;
        loop {
            if let Some(n) = self.metadata(Some(name)).await?.get(name).copied() {
                lock(&self.inner.topics).insert(name.to_owned(), n);
                return Ok(n);
            }
            if !created {
                self.create_topic(name, partitions).await?;
                created = true;
            }
            if Instant::now() >= deadline {
                return Err(TransportError::Unreachable {
                    transport: NAME,
                    reason: format!(
                        "topic `{name}` was created but its partitions did not show within {REQUEST_TIMEOUT:?}"
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Makes sure the topic of an eda topic exists; returns its partition count.
    pub(super) async fn ensure_topic(&self, topic: &str) -> Result<u32, TransportError> {
        self.ensure_topic_named(&self.topic_name(topic), self.inner.options.partitions).await
    }

    async fn create_topic(&self, name: &str, partitions: u32) -> Result<(), TransportError> {
        let replication = self.inner.options.replication.map_or(-1, i32::from);
        let new = NewTopic::new(name, partitions as i32, TopicReplication::Fixed(replication));
        let options = AdminOptions::new().request_timeout(Some(REQUEST_TIMEOUT));
        let results = self.inner.admin.create_topics([&new], &options).await.map_err(other)?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    return Err(TransportError::Config {
                        transport: NAME,
                        reason: format!(
                            "Kafka refused to create topic `{topic}` ({partitions} partitions, replication {replication}): {code}; create it by hand or change `partitions`/`replication`"
                        ),
                    })
                }
            }
        }
        Ok(())
    }

    /// Deletes every topic of this transport's namespace, with what they hold: for tests and
    /// tear-downs, never while other instances use the namespace.
    pub async fn delete_namespace(&self) -> Result<(), TransportError> {
        let prefix = format!("{}.", self.inner.options.namespace);
        let topics: Vec<String> = self.metadata(None).await?.into_keys().filter(|t| t.starts_with(&prefix)).collect();
        if topics.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        let options = AdminOptions::new().request_timeout(Some(REQUEST_TIMEOUT));
        self.inner.admin.delete_topics(&names, &options).await.map_err(other)?;
        lock(&self.inner.topics).clear();
        Ok(())
    }

    /// A client that reads `group`'s committed offsets without joining it.
    fn offsets_reader(
        &self,
        group: &str,
        topic: &str,
    ) -> Result<Arc<BaseConsumer<DefaultConsumerContext>>, TransportError> {
        let name = self.group_name(group, topic);
        if let Some(c) = lock(&self.inner.offsets).get(&name) {
            return Ok(c.clone());
        }
        let mut config = self.inner.options.consumer_client();
        config.set("group.id", &name).set("enable.auto.commit", "false");
        let reader: BaseConsumer<DefaultConsumerContext> = config.create().map_err(refused)?;
        let reader = Arc::new(reader);
        lock(&self.inner.offsets).insert(name, reader.clone());
        Ok(reader)
    }
}

/// Checks a Kafka topic name: up to 249 of `a-z A-Z 0-9 . _ -`.
fn check_name(name: &str) -> Result<(), TransportError> {
    let ok = |c: char| c.is_ascii_alphanumeric() || "._-".contains(c);
    if name.is_empty() || name.len() > 249 || !name.chars().all(ok) {
        return Err(TransportError::Config {
            transport: NAME,
            reason: format!(
                "`{name}` cannot name a Kafka topic: use up to 249 letters, digits, `.`, `_` and `-` (namespace and topic together)"
            ),
        });
    }
    Ok(())
}

#[async_trait]
impl Transport for KafkaTransport {
    fn kind(&self) -> &'static str {
        NAME
    }

    async fn publish(&self, envelope: &Envelope) -> Result<(), TransportError> {
        self.publish_all(std::slice::from_ref(envelope)).await
    }

    async fn publish_all(&self, envelopes: &[Envelope]) -> Result<(), TransportError> {
        self.publish_in_order(envelopes).await
    }

    async fn prepare(&self, subscription: &Subscription) -> Result<(), TransportError> {
        self.ensure_topic(&subscription.topic).await.map(drop)
    }

    async fn subscribe(&self, subscription: &Subscription) -> Result<Deliveries, TransportError> {
        let partitions = self.ensure_topic(&subscription.topic).await?;
        let (deliveries, engine) = consumer::subscribe(self.clone(), subscription, partitions)?;
        self.inner.engines.add(engine);
        Ok(deliveries)
    }

    fn sequences_keys(&self) -> bool {
        // The engine hands out one event per key at a time.
        true
    }

    fn ownership(&self) -> Vec<eda_core::Ownership> {
        self.inner.engines.ownership()
    }

    async fn lag(&self, group: &str, topic: &str) -> Result<Vec<PartitionLag>, TransportError> {
        let name = self.topic_name(topic);
        let Some(partitions) = self.metadata(Some(&name)).await?.get(&name).copied() else {
            // No topic yet: nothing was published to it.
            return Ok(Vec::new());
        };
        let reader = self.offsets_reader(group, topic)?;
        blocking(move || {
            let mut tpl = TopicPartitionList::new();
            for p in 0..partitions {
                tpl.add_partition(&name, p as i32);
            }
            let committed = reader.committed_offsets(tpl, REQUEST_TIMEOUT).map_err(other)?;
            let mut lags = Vec::with_capacity(partitions as usize);
            for p in 0..partitions {
                let (low, high) = reader.fetch_watermarks(&name, p as i32, REQUEST_TIMEOUT).map_err(other)?;
                let from = match committed.find_partition(&name, p as i32).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o.max(low),
                    // Nothing committed: the group starts at the earliest record.
                    _ => low,
                };
                lags.push(PartitionLag { partition: p, lag: u64::try_from(high - from).unwrap_or(0) });
            }
            Ok(lags)
        })
        .await?
    }

    async fn close(&self) -> Result<(), TransportError> {
        // The engines of stopped subscriptions commit what is done and leave their groups.
        let deadline = Instant::now() + self.inner.options.engine.handover_timeout + Duration::from_secs(5);
        while self.inner.engines.stopping() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let t = self.clone();
        let _ = blocking(move || t.inner.producer.flush(Duration::from_secs(5))).await;
        Ok(())
    }

    fn dead_letter_store(&self) -> Option<&dyn DeadLetterStore> {
        Some(self)
    }
}
