//! NATS JetStream (feature `nats`, URLs `nats://…` and `tls://…`).
//!
//! What eda keeps on the server, for namespace `eda` (the default; see
//! [`NatsOptions::namespace`]):
//!
//! - **A stream per topic**, `eda_<topic>`, with one subject per partition:
//!   `eda.<topic>.0` … `eda.<topic>.<P-1>`. An event goes to the partition of its key (the same
//!   FNV-1a hash as the SQL log), with its CloudEvents attributes as `ce-*` headers (the NATS
//!   binding's binary mode), its id as `Nats-Msg-Id` (a second publication of one event within
//!   the duplicate window is dropped by the server) and the payload as the message body.
//!   Publishing waits for the stream's acknowledgement.
//! - **A durable pull consumer per group and partition**, `<group>_<n>`, filtered on that
//!   partition's subject, with `AckPolicy::All` and `max_ack_pending` equal to the window
//!   ([`NatsOptions::window`], 1024 by default). Each partition has one owner among the group's
//!   live instances at a time, by a lease in the key-value bucket `<namespace>_leases` (see
//!   the delivery engine): the owner has a window of the partition in flight at once, hands out
//!   one event per key at a time (also across retries) while other keys run concurrently, and
//!   settles the contiguous done prefix with one `+ACK` per batch. So events of one key are
//!   handled in publish order by the whole group, across its instances, redeliveries and
//!   crashes. An owner that dies is replaced after [`NatsOptions::lease_ttl`]; the new owner
//!   makes the consumer anew from its ack floor, so whatever was left unsettled comes first and
//!   in order (repeats are absorbed by the idempotency guards). An instance that joins gets a
//!   share: the others hand partitions over (intake stops, what is out finishes within
//!   [`NatsOptions::handover_timeout`], the done prefix is settled, the lease is deleted).
//! - **Dead letters** in the stream `eda-dead-letters`, on the subjects `eda.<topic>.dlq`: the
//!   original message, byte for byte, with `eda-dlq-*` headers saying which group gave up, why,
//!   after how many attempts and when. [`DeadLetterStore`] lists, shows and removes them, so
//!   `<app> dlq list|show|replay|purge` work on NATS as on the other transports.
//!
//! An event whose partition's owners died holding it more than
//! [`max_deliver`](NatsOptions::max_deliver) times is dead-lettered without being handed out
//! again. The runtime's hand-backs (shutting down, a busy guard) are not counted there, nor
//! toward the retry limit, which counts failed handler attempts only.
//!
//! A handler that hangs forever holds its key, and once the window behind it is full, its
//! partition: as on the SQL log, eda does not cut a running handler short.
//!
//! The client reconnects for as long as the server is away; a partition whose deliveries were
//! lost on the way (a gap in the consumer's sequence) or whose reading failed is opened again
//! from its ack floor; publishes retry with the same `Nats-Msg-Id` for
//! [`publish_timeout`](NatsOptions::publish_timeout); acknowledgements lost with the connection
//! make their events come again, which the idempotency guards absorb.
//!
//! Lag is, per partition, the consumer's `num_pending` plus `num_ack_pending`.

mod consumer;
mod dead_letters;
mod leases;
mod options;
mod steps;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_nats::header::{NATS_EXPECTED_STREAM, NATS_MESSAGE_ID};
use async_nats::jetstream::context::{CreateStreamErrorKind, GetStreamErrorKind, PublishErrorKind};
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, ErrorCode};
use async_nats::{HeaderMap, Subject};
use async_trait::async_trait;
use bytes::Bytes;
use eda_core::{Binding, DeadLetterStore, Deliveries, Envelope, PartitionLag, Subscription, Transport, TransportError};
use futures_util::TryStreamExt;
use tokio::time::Instant;

use super::keys::{fnv1a, partition_of};

/// How long closing waits for the client to flush what it holds.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);
pub use options::{NatsOptions, Retention, Storage};

const NAME: &str = "nats";

/// Bytes kept free under the server's `max_payload` when publishing, so that an event can
/// always be dead-lettered with its `eda-dlq-*` headers.
const DEAD_LETTER_RESERVE: usize = 4096;

/// The NATS JetStream transport. Clones share one connection.
///
/// ```no_run
/// # #[tokio::main] async fn main() -> eda::Result<()> {
/// use eda::transport::nats::NatsOptions;
///
/// let nats = NatsOptions::new("nats://127.0.0.1:4222").namespace("shop").connect().await?;
/// let runtime = eda::Runtime::from_registry().transport(nats).start().await?;
/// # runtime.shutdown().await; Ok(()) }
/// ```
#[derive(Clone)]
pub struct NatsTransport {
    inner: Arc<Inner>,
}

struct Inner {
    options: NatsOptions,
    client: async_nats::Client,
    js: jetstream::Context,
    /// The layout of every topic this transport has used.
    topics: Mutex<HashMap<String, Arc<TopicLayout>>>,
    /// Topics whose dead-letter subject the dead-letter stream is known to capture.
    dead_letter_topics: Mutex<HashSet<String>>,
    /// Serializes changes to streams, so one process does not race itself.
    topology: tokio::sync::Mutex<()>,
    deduplicated: AtomicU64,
    /// The engine of every subscription, so that closing waits for those of stopped
    /// subscriptions to settle what is done and hand their partitions over.
    engines: crate::engine::Engines,
    /// Places for publishes waiting for their confirmation (`max_unconfirmed`).
    unconfirmed: tokio::sync::Semaphore,
    /// The server's `max_payload` when the connection was made (asking the client copies all
    /// of the server's information).
    max_payload: usize,
    /// The engine's leases, once a subscription needs them.
    leases: tokio::sync::OnceCell<Arc<leases::NatsLeases>>,
    /// What the runtimes on this transport share: saga step records in the namespace's
    /// bucket, guards in the process.
    inbox: Arc<steps::NatsInbox>,
}

/// Where a topic lives on the server.
#[derive(Debug)]
struct TopicLayout {
    topic: String,
    stream: String,
    partitions: u32,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn other(e: impl std::error::Error + Send + Sync + 'static) -> TransportError {
    TransportError::Other { transport: NAME, source: Box::new(e) }
}

fn unreachable(reason: impl std::fmt::Display) -> TransportError {
    TransportError::Unreachable { transport: NAME, reason: reason.to_string() }
}

/// A topic or group name as a stream or consumer name may spell it: NATS names cannot hold `.`,
/// so a dotted name gets `_` and a hash of the original (keeping `a.b` and `a_b` apart).
fn name_part(name: &str) -> String {
    if name.contains('.') {
        format!("{}-{:08x}", name.replace('.', "_"), fnv1a(&[name]) as u32)
    } else {
        name.to_owned()
    }
}

impl NatsTransport {
    /// Connects to the servers at `url` with the settings in its query (see
    /// [`NatsOptions::from_url`]).
    pub async fn connect(url: &str) -> Result<Self, TransportError> {
        NatsOptions::from_url(url)?.connect().await
    }

    /// Connects with these options and checks that JetStream is there. Streams and consumers are
    /// created (or brought to the options) when a topic is first published to or subscribed to.
    pub async fn open(options: NatsOptions) -> Result<Self, TransportError> {
        options.validate()?;
        let shown = options.shown.clone();
        let mut connect = async_nats::ConnectOptions::new()
            .connection_timeout(options.connection_timeout)
            .name(options.name.clone().unwrap_or_else(|| format!("eda {}", env!("CARGO_PKG_VERSION"))))
            .reconnect_delay_callback(|attempts| {
                retry_pause(u32::try_from(attempts).unwrap_or(u32::MAX)) + Duration::from_millis(fastrand::u64(0..100))
            })
            .event_callback({
                let shown = shown.clone();
                move |event| {
                    let shown = shown.clone();
                    async move {
                        match event {
                            async_nats::Event::Connected => tracing::info!(server = %shown, "connected to NATS"),
                            async_nats::Event::Disconnected => {
                                tracing::warn!(server = %shown, "lost the connection to NATS; reconnecting")
                            }
                            other => tracing::warn!(server = %shown, event = %other, "NATS connection event"),
                        }
                    }
                }
            });
        connect = match &options.credentials {
            options::Credentials::None => connect,
            options::Credentials::UserPassword(user, password) => {
                connect.user_and_password(user.clone(), password.clone())
            }
            options::Credentials::Token(token) => connect.token(token.clone()),
            options::Credentials::NKey(seed) => connect.nkey(seed.clone()),
            options::Credentials::File(path) => {
                connect.credentials_file(path).await.map_err(|e| TransportError::Config {
                    transport: NAME,
                    reason: format!("cannot read the NATS credentials file `{}`: {e}", path.display()),
                })?
            }
        };
        if options.tls_required {
            connect = connect.require_tls(true);
        }
        if let Some(ca) = &options.tls_root_certificates {
            connect = connect.add_root_certificates(ca.clone());
        }
        if let Some((cert, key)) = &options.tls_client_certificate {
            connect = connect.add_client_certificate(cert.clone(), key.clone());
        }
        let servers = options
            .servers
            .iter()
            .map(|s| s.parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TransportError::Config {
                transport: NAME,
                reason: format!("`{shown}` is not a NATS URL ({e}): write `nats://host:4222`"),
            })?;
        let client = connect.connect(servers).await.map_err(|e| unreachable(format!("{shown}: {e}")))?;
        let js = jetstream::new(client.clone());
        check_jetstream(&client).await.map_err(|why| {
            unreachable(format!(
                "{shown} answers, but JetStream does not ({why}): start nats-server with `-js`, with JetStream enabled for this account"
            ))
        })?;
        let max_payload = client.server_info().max_payload;
        let unconfirmed = tokio::sync::Semaphore::new(options.max_unconfirmed);
        let inbox = Arc::new(steps::NatsInbox::new(js.clone(), options.clone()));
        let inner = Inner {
            options,
            client,
            js,
            topics: Mutex::default(),
            dead_letter_topics: Mutex::default(),
            topology: tokio::sync::Mutex::new(()),
            deduplicated: AtomicU64::new(0),
            engines: Default::default(),
            leases: tokio::sync::OnceCell::new(),
            inbox,
            max_payload,
            unconfirmed,
        };
        Ok(Self { inner: Arc::new(inner) })
    }

    /// The settings it runs with.
    pub fn options(&self) -> &NatsOptions {
        &self.inner.options
    }

    /// The underlying client, for what eda does not do itself.
    pub fn client(&self) -> &async_nats::Client {
        &self.inner.client
    }

    /// How many publications the server dropped as duplicates of an event it already had (the
    /// same event id within the duplicate window: a producer retry, a relay repeating itself).
    pub fn deduplicated(&self) -> u64 {
        self.inner.deduplicated.load(Ordering::Relaxed)
    }

    /// The subject of one partition of a topic: `<namespace>.<topic>.<partition>`.
    pub fn subject(&self, topic: &str, partition: u32) -> String {
        format!("{}.{topic}.{partition}", self.inner.options.namespace)
    }

    /// The subject `envelope` is published on: its topic's partition of its key (or of its id
    /// when it has no key). Creates the topic's stream if it does not exist yet.
    pub async fn subject_of(&self, envelope: &Envelope) -> Result<String, TransportError> {
        let layout = self.topic(&envelope.topic).await?;
        let key = envelope.subject.clone().unwrap_or_else(|| envelope.id.to_string());
        Ok(self.subject(&layout.topic, partition_of(&key, layout.partitions)))
    }

    /// The subject a topic's dead letters are kept on: `<namespace>.<topic>.dlq`.
    pub fn dead_letter_subject(&self, topic: &str) -> String {
        format!("{}.{topic}.dlq", self.inner.options.namespace)
    }

    /// The stream of a topic: `<namespace>_<topic>`.
    pub fn stream_name(&self, topic: &str) -> String {
        format!("{}_{}", self.inner.options.namespace, name_part(topic))
    }

    /// The stream that holds every topic's dead letters: `<namespace>-dead-letters`.
    pub fn dead_letter_stream(&self) -> String {
        format!("{}-dead-letters", self.inner.options.namespace)
    }

    fn consumer_name(group: &str, partition: u32) -> String {
        format!("{}_{partition}", name_part(group))
    }

    /// Deletes every stream of this transport's namespace (topics and dead letters) with their
    /// consumers: for tests and for tearing an environment down. Returns how many it deleted.
    pub async fn delete_namespace(&self) -> Result<usize, TransportError> {
        let ns = &self.inner.options.namespace;
        let names: Vec<String> = self.inner.js.stream_names().try_collect().await.map_err(other)?;
        let mut deleted = 0;
        let buckets = [format!("KV_{ns}_leases"), format!("KV_{ns}_steps")];
        for name in names
            .iter()
            .filter(|n| n.starts_with(&format!("{ns}_")) || **n == self.dead_letter_stream() || buckets.contains(n))
        {
            self.inner.js.delete_stream(name).await.map_err(other)?;
            deleted += 1;
        }
        lock(&self.inner.topics).clear();
        lock(&self.inner.dead_letter_topics).clear();
        Ok(deleted)
    }

    /// The layout of `topic`, creating its stream (or bringing it to the options) the first
    /// time.
    async fn topic(&self, topic: &str) -> Result<Arc<TopicLayout>, TransportError> {
        if let Some(layout) = lock(&self.inner.topics).get(topic) {
            return Ok(layout.clone());
        }
        check_name("topic", topic)?;
        let _topology = self.inner.topology.lock().await;
        if let Some(layout) = lock(&self.inner.topics).get(topic) {
            return Ok(layout.clone());
        }
        let layout = Arc::new(self.ensure_stream(topic).await?);
        lock(&self.inner.topics).insert(topic.to_owned(), layout.clone());
        Ok(layout)
    }

    /// The layout of `topic` if its stream exists; creates nothing.
    async fn existing_topic(&self, topic: &str) -> Result<Option<Arc<TopicLayout>>, TransportError> {
        if let Some(layout) = lock(&self.inner.topics).get(topic) {
            return Ok(Some(layout.clone()));
        }
        match self.inner.js.get_stream(self.stream_name(topic)).await {
            Ok(stream) => {
                let config = &stream.cached_info().config;
                let partitions = self.partitions_of(topic, config)?;
                // Not remembered: the first publish or subscription still brings the stream to
                // the configured limits.
                Ok(Some(Arc::new(TopicLayout { topic: topic.to_owned(), stream: config.name.clone(), partitions })))
            }
            Err(e) if stream_missing(&e) => Ok(None),
            Err(e) => Err(other(e)),
        }
    }

    fn stream_config(&self, topic: &str, partitions: u32) -> stream::Config {
        let o = &self.inner.options;
        stream::Config {
            name: self.stream_name(topic),
            description: Some(format!("eda topic `{topic}`, {partitions} partitions by key")),
            subjects: (0..partitions).map(|p| self.subject(topic, p)).collect(),
            retention: match o.retention {
                Retention::Limits => RetentionPolicy::Limits,
                Retention::Interest => RetentionPolicy::Interest,
            },
            storage: storage_type(o.storage),
            max_age: o.max_age.unwrap_or(Duration::ZERO),
            max_bytes: o.max_bytes.map_or(-1, |b| b.min(i64::MAX as u64) as i64),
            max_messages: o.max_messages.map_or(-1, |n| n.min(i64::MAX as u64) as i64),
            max_message_size: -1,
            max_messages_per_subject: -1,
            max_consumers: -1,
            discard: DiscardPolicy::Old,
            num_replicas: o.replicas,
            duplicate_window: o.duplicate_window,
            ..Default::default()
        }
    }

    /// How many partitions an existing stream of `topic` has, from its subjects.
    fn partitions_of(&self, topic: &str, config: &stream::Config) -> Result<u32, TransportError> {
        let prefix = format!("{}.{topic}.", self.inner.options.namespace);
        let mut found: Vec<u32> = Vec::new();
        for subject in &config.subjects {
            match subject.strip_prefix(&prefix).and_then(|p| p.parse::<u32>().ok()) {
                Some(p) => found.push(p),
                None => {
                    return Err(TransportError::Config {
                        transport: NAME,
                        reason: format!(
                            "stream `{}` captures `{subject}`, which is not one of eda's partition subjects `{prefix}<n>`: it is not eda's stream for topic `{topic}`; use another namespace or remove that stream",
                            config.name
                        ),
                    })
                }
            }
        }
        found.sort_unstable();
        if found.is_empty() || found.iter().enumerate().any(|(i, p)| *p != i as u32) {
            return Err(TransportError::Config {
                transport: NAME,
                reason: format!(
                    "stream `{}` has partition subjects {found:?} instead of 0..n: restore them or remove the stream",
                    config.name
                ),
            });
        }
        Ok(found.len() as u32)
    }

    async fn ensure_stream(&self, topic: &str) -> Result<TopicLayout, TransportError> {
        let js = &self.inner.js;
        let name = self.stream_name(topic);
        for _ in 0..3 {
            match js.get_stream(&name).await {
                Ok(stream) => {
                    let existing = stream.cached_info().config.clone();
                    let partitions = self.partitions_of(topic, &existing)?;
                    if partitions != self.inner.options.partitions {
                        tracing::warn!(topic, stream = %name, partitions, configured = self.inner.options.partitions,
                            "the topic's stream has another partition count than configured; it keeps its own, as moving keys between partitions would break their order");
                    }
                    let configured = self.stream_config(topic, partitions);
                    let wanted = widened(&existing, &configured);
                    if let Some(kept) = stream_change(&configured, &wanted) {
                        tracing::warn!(stream = %name, %kept,
                            "the topic's stream keeps its wider limits: this process is configured to keep less, and eda never lets a process shrink what the server keeps (unread events would go); shrink it on the server (`nats stream edit`) if that is meant");
                    }
                    if let Some(change) = stream_change(&existing, &wanted) {
                        tracing::info!(stream = %name, %change, "updating the stream to the configured limits");
                        js.update_stream(&wanted).await.map_err(|e| {
                            let reason = match e.kind() {
                                CreateStreamErrorKind::JetStream(js) => js.to_string(),
                                _ => e.to_string(),
                            };
                            TransportError::Config {
                                transport: NAME,
                                reason: format!("NATS refuses to change stream `{name}` ({change}): {reason}; set the option back, or change or remove the stream yourself"),
                            }
                        })?;
                    }
                    return Ok(TopicLayout { topic: topic.to_owned(), stream: name, partitions });
                }
                Err(e) if stream_missing(&e) => {
                    let partitions = self.inner.options.partitions;
                    match js.create_stream(self.stream_config(topic, partitions)).await {
                        Ok(_) => {
                            tracing::debug!(topic, stream = %name, partitions, "created the topic's stream");
                            return Ok(TopicLayout { topic: topic.to_owned(), stream: name, partitions });
                        }
                        // Another process created it meanwhile: read it again.
                        Err(e) if create_code(&e) == Some(ErrorCode::STREAM_NAME_EXIST) => continue,
                        Err(e) if create_code(&e) == Some(ErrorCode::STREAM_SUBJECT_OVERLAP) => {
                            return Err(TransportError::Config {
                                transport: NAME,
                                reason: format!(
                                    "another stream already captures subjects of topic `{topic}` (`{}.*`): eda needs them for its stream `{name}`; use another namespace or remove that stream",
                                    format_args!("{}.{topic}", self.inner.options.namespace)
                                ),
                            })
                        }
                        Err(e) => return Err(other(e)),
                    }
                }
                Err(e) => return Err(other(e)),
            }
        }
        Err(unreachable(format!("stream `{name}` was created and removed while eda looked at it; try again")))
    }

    /// Makes sure the dead-letter stream captures `topic`'s dead-letter subject.
    async fn ensure_dead_letter_subject(&self, topic: &str) -> Result<(), TransportError> {
        if lock(&self.inner.dead_letter_topics).contains(topic) {
            return Ok(());
        }
        let _topology = self.inner.topology.lock().await;
        let js = &self.inner.js;
        let (name, subject) = (self.dead_letter_stream(), self.dead_letter_subject(topic));
        // Another process may update the subjects at the same moment: read again until ours is in.
        for _ in 0..10 {
            match js.get_stream(&name).await {
                Ok(stream) => {
                    let mut config = stream.cached_info().config.clone();
                    if config.subjects.contains(&subject) {
                        lock(&self.inner.dead_letter_topics).insert(topic.to_owned());
                        return Ok(());
                    }
                    config.subjects.push(subject.clone());
                    js.update_stream(&config).await.map_err(other)?;
                }
                Err(e) if stream_missing(&e) => {
                    let o = &self.inner.options;
                    let config = stream::Config {
                        name: name.clone(),
                        description: Some("eda dead letters of every topic, kept until replayed or purged".into()),
                        subjects: vec![subject.clone()],
                        retention: RetentionPolicy::Limits,
                        storage: storage_type(o.storage),
                        num_replicas: o.replicas,
                        duplicate_window: o.duplicate_window,
                        ..Default::default()
                    };
                    match js.create_stream(config).await {
                        Ok(_) => {}
                        Err(e) if create_code(&e) == Some(ErrorCode::STREAM_NAME_EXIST) => {}
                        Err(e) => return Err(other(e)),
                    }
                }
                Err(e) => return Err(other(e)),
            }
        }
        Err(unreachable(format!("could not add `{subject}` to stream `{name}`: it keeps changing under eda")))
    }

    /// Publishes messages and waits for the stream to store each. Messages of one subject go
    /// one after the other, each confirmed before the next: were one lost with a connection
    /// while the next got through, trying it again would store it after its successor. Subjects
    /// (partitions) go concurrently.
    async fn publish_messages(&self, messages: &mut [Outgoing<'_>]) -> Result<(), TransportError> {
        if let [one] = messages {
            return self.publish_one(one).await;
        }
        let mut by_subject: Vec<(Subject, Vec<&mut Outgoing<'_>>)> = Vec::new();
        for m in messages.iter_mut() {
            match by_subject.iter_mut().find(|(subject, _)| *subject == m.subject) {
                Some((_, queue)) => queue.push(m),
                None => by_subject.push((m.subject.clone(), vec![m])),
            }
        }
        let sent = futures_util::future::join_all(by_subject.into_iter().map(|(_, queue)| async move {
            for m in queue {
                self.publish_one(m).await?;
            }
            Ok::<(), TransportError>(())
        }))
        .await;
        sent.into_iter().collect()
    }

    /// Publishes one message and waits for the stream to store it. A publish that times out
    /// (the server is away, or slow) is tried again with the same `Nats-Msg-Id` until the
    /// publish timeout, so it is stored once.
    async fn publish_one(&self, m: &mut Outgoing<'_>) -> Result<(), TransportError> {
        let _place = self.inner.unconfirmed.acquire().await.map_err(|_| TransportError::Closed(NAME))?;
        let js = &self.inner.js;
        let deadline = Instant::now() + self.inner.options.publish_timeout;
        let mut attempt = 0u32;
        loop {
            // An event's headers go out as built the first time and are built again for a
            // retry; only a dead-letter copy (which has no envelope to build from) is cloned.
            let headers = match (m.headers.take(), m.event) {
                (Some(h), Some(_)) => h,
                (None, Some(event)) => self.event_headers(event)?,
                (Some(h), None) => {
                    let copy = h.clone();
                    m.headers = Some(h);
                    copy
                }
                (None, None) => HeaderMap::new(),
            };
            let publish = jetstream::message::PublishMessage::build().payload(m.payload.clone()).headers(headers);
            let stored = match js.send_publish(m.subject.clone(), publish).await {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            let e = match stored {
                Ok(ack) if ack.duplicate && m.dead_letter => {
                    // A dead letter is settled only once it is surely kept.
                    let id = m.headers.as_ref().and_then(|h| h.get(NATS_MESSAGE_ID)).map(|v| v.as_str().to_owned());
                    let id = id.unwrap_or_default();
                    if self.letter_is_kept(ack.sequence, &id).await? {
                        return Ok(());
                    }
                    let fresh = format!("{id}:{}", uuid::Uuid::new_v4().simple());
                    tracing::debug!(%id, %fresh, "the server remembers this letter's id from one no longer kept; storing it under another");
                    if let Some(h) = m.headers.as_mut() {
                        h.insert(NATS_MESSAGE_ID, fresh);
                    }
                    continue;
                }
                Ok(ack) => {
                    if ack.duplicate {
                        self.inner.deduplicated.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(stream = %ack.stream, sequence = ack.sequence, "the server already had this event");
                    }
                    return Ok(());
                }
                Err(e) => e,
            };
            let retry = matches!(
                e.kind(),
                PublishErrorKind::TimedOut
                    | PublishErrorKind::BrokenPipe
                    | PublishErrorKind::StreamNotFound
                    | PublishErrorKind::MaxAckPending
            );
            if !retry {
                return Err(TransportError::PublishRejected {
                    transport: NAME,
                    topic: m.topic.clone(),
                    reason: e.to_string(),
                });
            }
            attempt += 1;
            if Instant::now() >= deadline {
                return Err(unreachable(format!(
                    "{}: publishing to `{}` failed for {:?} ({e}); nothing is lost by retrying: the event id deduplicates",
                    self.inner.options.shown, m.subject, self.inner.options.publish_timeout
                )));
            }
            tracing::debug!(subject = %m.subject, attempt, error = %e, "publish not acknowledged; trying again");
            if e.kind() == PublishErrorKind::StreamNotFound {
                // No stream captures the subject: the server is back without it, JetStream is
                // still starting, or another instance rewrote the dead-letter stream's subjects.
                // Make sure it is there before trying again.
                let ensured = if m.dead_letter {
                    lock(&self.inner.dead_letter_topics).remove(&m.topic);
                    self.ensure_dead_letter_subject(&m.topic).await
                } else {
                    self.forget_topic(&m.topic);
                    self.topic(&m.topic).await.map(drop)
                };
                if let Err(e) = ensured {
                    tracing::debug!(topic = %m.topic, error = %e, "the stream is not there yet");
                }
            }
            let pause = Duration::from_millis(50).saturating_mul(attempt.min(10)).min(deadline - Instant::now());
            tokio::time::sleep(pause).await;
        }
    }

    /// Forgets what this transport knew of a topic's stream, to look it up again.
    fn forget_topic(&self, topic: &str) {
        lock(&self.inner.topics).remove(topic);
    }

    /// The headers of an event: its CloudEvents attributes, its id as `Nats-Msg-Id`, and the
    /// stream that must store it.
    fn event_headers(&self, envelope: &Envelope) -> Result<HeaderMap, TransportError> {
        let mut headers = HeaderMap::new();
        for (name, value) in envelope.headers(Binding::Nats) {
            let refused = |why: &str| TransportError::EventRefused {
                transport: NAME,
                topic: envelope.topic.clone(),
                reason: format!("the `{name}` attribute {why}: change the key or correlation id"),
            };
            if value.contains(['\r', '\n']) {
                return Err(refused("contains a line break, which a NATS header cannot carry"));
            }
            // The server trims header values: a key read back without its spaces would land
            // its replays on another partition than its siblings.
            if value.trim() != value {
                return Err(refused("begins or ends with whitespace, which a NATS header does not keep"));
            }
            headers.insert(name, value);
        }
        headers.insert(NATS_MESSAGE_ID, envelope.id.to_string());
        headers.insert(NATS_EXPECTED_STREAM, self.stream_name(&envelope.topic));
        Ok(headers)
    }

    /// The message of an envelope: subject of its partition, CloudEvents headers, payload.
    async fn outgoing<'a>(&self, envelope: &'a Envelope) -> Result<Outgoing<'a>, TransportError> {
        let subject = self.subject_of(envelope).await?;
        let headers = self.event_headers(envelope)?;
        let size = message_size(&headers, envelope.data.len());
        let max_payload = self.inner.max_payload;
        let limit = max_payload.saturating_sub(DEAD_LETTER_RESERVE);
        if size > limit {
            return Err(TransportError::EventRefused {
                transport: NAME,
                topic: envelope.topic.clone(),
                reason: format!(
                    "`{}` is {size} bytes with its headers, over the {limit} this NATS server carries ({max_payload} max_payload, less {DEAD_LETTER_RESERVE} kept for dead-letter metadata): send a reference to large data instead",
                    envelope.ty,
                ),
            });
        }
        Ok(Outgoing {
            topic: envelope.topic.clone(),
            subject: Subject::from(subject),
            headers: Some(headers),
            payload: Bytes::from(envelope.data.clone()),
            dead_letter: false,
            event: Some(envelope),
        })
    }
}

/// Asks the server's JetStream API for the account's limits: it answers only when JetStream
/// runs for this account. (async-nats' `query_account` cannot parse 2.9's answer.)
async fn check_jetstream(client: &async_nats::Client) -> Result<(), String> {
    let reply = client.request("$JS.API.INFO", Bytes::new()).await.map_err(|e| e.to_string())?;
    let answer: serde_json::Value = serde_json::from_slice(&reply.payload).map_err(|e| e.to_string())?;
    match answer.get("error") {
        Some(error) => Err(error.get("description").and_then(|d| d.as_str()).unwrap_or("an error").to_owned()),
        None => Ok(()),
    }
}

/// One message to publish.
struct Outgoing<'a> {
    topic: String,
    subject: Subject,
    /// `None` once handed to the client: an event's are built again for a retry.
    headers: Option<HeaderMap>,
    payload: Bytes,
    /// A copy for the dead-letter stream (not an event of the topic's stream).
    dead_letter: bool,
    /// The event it carries, to build its headers from again.
    event: Option<&'a Envelope>,
}

/// What a message takes of the server's `max_payload`: headers as they go on the wire, and the
/// payload.
fn message_size(headers: &HeaderMap, payload: usize) -> usize {
    let header_bytes: usize = headers
        .iter()
        .map(|(name, values)| {
            values.iter().map(|v| AsRef::<str>::as_ref(name).len() + v.as_str().len() + 4).sum::<usize>()
        })
        .sum();
    "NATS/1.0\r\n\r\n".len() + header_bytes + payload
}

/// A pause that grows with repeated failures, 100 ms each, up to 2 s: quick to come back after a
/// server restart, never hammering one that stays away.
fn retry_pause(failures: u32) -> Duration {
    Duration::from_millis(100).saturating_mul(failures.min(20)).min(Duration::from_secs(2))
}

/// Names eda maps onto subjects, streams and consumers: what `#[event]` and `#[handler]` accept
/// (letters, digits, `.`, `-`, `_`), checked again for envelopes made by hand.
fn check_name(what: &str, name: &str) -> Result<(), TransportError> {
    let valid = !name.is_empty()
        && name.len() <= 200
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        && !name.starts_with('.')
        && !name.ends_with('.')
        && !name.contains("..");
    if valid {
        return Ok(());
    }
    Err(TransportError::Config {
        transport: NAME,
        reason: format!(
            "the {what} name `{name}` cannot be a NATS subject token: use letters, digits, `.`, `-` and `_`, with no leading, trailing or double `.`"
        ),
    })
}

fn storage_type(storage: Storage) -> StorageType {
    match storage {
        Storage::File => StorageType::File,
        Storage::Memory => StorageType::Memory,
    }
}

pub(super) fn stream_missing(e: &async_nats::error::Error<GetStreamErrorKind>) -> bool {
    matches!(e.kind(), GetStreamErrorKind::JetStream(js) if js.error_code() == ErrorCode::STREAM_NOT_FOUND)
}

fn create_code(e: &async_nats::error::Error<CreateStreamErrorKind>) -> Option<ErrorCode> {
    match e.kind() {
        CreateStreamErrorKind::JetStream(js) => Some(js.error_code()),
        _ => None,
    }
}

/// What differs between an existing stream and the configured one, in the settings eda owns.
/// `configured`, widened to what `existing` keeps where that is more: a process with smaller
/// limits (a producer-only service, a `dlq` command run without the service's URL options)
/// must not make the server delete events that others have not read. Limits grow; retention
/// policy and storage stay as the stream has them.
fn widened(existing: &stream::Config, configured: &stream::Config) -> stream::Config {
    // A size or count this process does not set (-1) asks nothing: the stream keeps its
    // own. Otherwise the wider wins, and the server's "no limit" (0 or -1) is the widest.
    let wider = |existing: i64, configured: i64| match (existing, configured) {
        (e, c) if c <= 0 => e,
        (e, _) if e <= 0 => -1,
        (e, c) => e.max(c),
    };
    let age = |a: Duration, b: Duration| if a.is_zero() || b.is_zero() { Duration::ZERO } else { a.max(b) };
    stream::Config {
        retention: existing.retention,
        storage: existing.storage,
        max_age: age(existing.max_age, configured.max_age),
        max_bytes: wider(existing.max_bytes, configured.max_bytes),
        max_messages: wider(existing.max_messages, configured.max_messages),
        num_replicas: existing.num_replicas.max(configured.num_replicas),
        duplicate_window: existing.duplicate_window.max(configured.duplicate_window),
        ..configured.clone()
    }
}

fn stream_change(existing: &stream::Config, wanted: &stream::Config) -> Option<String> {
    // The server reports "no limit" as -1 (or 0 for an age); compare them as equal.
    let limit = |n: i64| if n <= 0 { -1 } else { n };
    let mut changes = Vec::new();
    if existing.retention != wanted.retention {
        changes.push(format!("retention {:?} → {:?}", existing.retention, wanted.retention));
    }
    if existing.storage != wanted.storage {
        changes.push(format!("storage {:?} → {:?}", existing.storage, wanted.storage));
    }
    if existing.max_age != wanted.max_age {
        changes.push(format!("max_age {:?} → {:?}", existing.max_age, wanted.max_age));
    }
    if limit(existing.max_bytes) != limit(wanted.max_bytes) {
        changes.push(format!("max_bytes {} → {}", existing.max_bytes, wanted.max_bytes));
    }
    if limit(existing.max_messages) != limit(wanted.max_messages) {
        changes.push(format!("max_messages {} → {}", existing.max_messages, wanted.max_messages));
    }
    if existing.num_replicas.max(1) != wanted.num_replicas.max(1) {
        changes.push(format!("replicas {} → {}", existing.num_replicas, wanted.num_replicas));
    }
    if existing.duplicate_window != wanted.duplicate_window {
        changes.push(format!("duplicate_window {:?} → {:?}", existing.duplicate_window, wanted.duplicate_window));
    }
    (!changes.is_empty()).then(|| changes.join(", "))
}

#[async_trait]
impl Transport for NatsTransport {
    fn kind(&self) -> &'static str {
        NAME
    }

    fn inbox(&self) -> Option<Arc<dyn eda_core::Inbox>> {
        Some(self.inner.inbox.clone())
    }

    async fn publish(&self, envelope: &Envelope) -> Result<(), TransportError> {
        let mut message = self.outgoing(envelope).await?;
        self.publish_one(&mut message).await
    }

    async fn publish_all(&self, envelopes: &[Envelope]) -> Result<(), TransportError> {
        let mut messages = Vec::with_capacity(envelopes.len());
        for e in envelopes {
            messages.push(self.outgoing(e).await?);
        }
        self.publish_messages(&mut messages).await
    }

    async fn subscribe(&self, subscription: &Subscription) -> Result<Deliveries, TransportError> {
        check_name("group", &subscription.group)?;
        let layout = self.topic(&subscription.topic).await?;
        self.ensure_dead_letter_subject(&subscription.topic).await?;
        let leases = self
            .inner
            .leases
            .get_or_try_init(|| async {
                leases::NatsLeases::open(&self.inner.js, &self.inner.options).await.map(Arc::new)
            })
            .await?
            .clone();
        let group = subscription.group.clone();
        let scope = consumer::scope(&group, &subscription.topic);
        let member = format!("{} pid {}", self.inner.options.name.as_deref().unwrap_or("eda"), std::process::id());
        let log = Arc::new(consumer::NatsPartitions { transport: self.clone(), layout, group });
        let (deliveries, engine) = crate::engine::subscribe(
            log,
            leases,
            &subscription.group,
            &subscription.topic,
            scope,
            member,
            NAME,
            self.inner.options.engine.clone(),
        )
        .await?;
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
        let Some(layout) = self.existing_topic(topic).await? else {
            return Ok(vec![PartitionLag { partition: 0, lag: 0 }]);
        };
        let stream = self.inner.js.get_stream_no_info(&layout.stream).await.map_err(other)?;
        // The newest consumer of each partition is the one its owner reads.
        let mut newest: HashMap<u32, (u64, u64)> = HashMap::new();
        let infos: Vec<_> = stream.consumers().try_collect().await.map_err(other)?;
        for info in infos {
            if let Some((p, generation)) = consumer::partition_of_consumer(group, &info.name) {
                let lag = info.num_pending + info.num_ack_pending as u64;
                if newest.get(&p).is_none_or(|(g, _)| *g <= generation) {
                    newest.insert(p, (generation, lag));
                }
            }
        }
        let mut lags = Vec::with_capacity(layout.partitions as usize);
        let mut missing = Vec::new();
        for p in 0..layout.partitions {
            match newest.get(&p) {
                Some((_, lag)) => lags.push(PartitionLag { partition: p, lag: *lag }),
                None => missing.push(p),
            }
        }
        if !missing.is_empty() {
            // The group has not subscribed yet: everything the partition holds is waiting for it.
            let filter = format!("{}.{topic}.*", self.inner.options.namespace);
            let counts: HashMap<String, usize> =
                stream.info_with_subjects(filter).await.map_err(other)?.try_collect().await.map_err(other)?;
            for p in missing {
                let lag = counts.get(&self.subject(topic, p)).copied().unwrap_or(0) as u64;
                lags.push(PartitionLag { partition: p, lag });
            }
            lags.sort_by_key(|l| l.partition);
        }
        Ok(lags)
    }

    async fn close(&self) -> Result<(), TransportError> {
        // The engines of stopped subscriptions settle what is done and hand their partitions
        // over, then those acks leave the client's buffer. The connection stays for other users
        // of this transport, and so do the engines of their subscriptions.
        let deadline = Instant::now() + self.inner.options.engine.handover_timeout + Duration::from_secs(2);
        let stopping = || self.inner.engines.stopping();
        while stopping() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // While the server is away the client holds a flush until it is back, which may be
        // never: acks not flushed make their events come again, which the guards absorb.
        match tokio::time::timeout(FLUSH_TIMEOUT, self.inner.client.flush()).await {
            Ok(flushed) => flushed.map_err(other),
            Err(_) => Err(unreachable(format!(
                "{}: the last acknowledgements were not flushed within {FLUSH_TIMEOUT:?}; their events will be delivered again",
                self.inner.options.shown
            ))),
        }
    }

    fn dead_letter_store(&self) -> Option<&dyn DeadLetterStore> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_keep_dotted_and_underscored_names_apart() {
        assert_eq!(name_part("orders"), "orders");
        assert_eq!(name_part("inventory-service"), "inventory-service");
        assert_ne!(name_part("orders.confirmed"), name_part("orders_confirmed"));
        assert!(name_part("orders.confirmed").starts_with("orders_confirmed-"));
        assert_eq!(NatsTransport::consumer_name("billing", 3), "billing_3");
    }

    #[test]
    fn limits_only_widen_and_no_limit_is_the_widest() {
        let day = Duration::from_secs(86_400);
        let existing = stream::Config { max_age: day * 30, max_bytes: 1 << 30, max_messages: -1, ..Default::default() };
        let smaller = stream::Config { max_age: day * 7, max_bytes: 1 << 20, max_messages: 1000, ..Default::default() };
        let kept = widened(&existing, &smaller);
        assert_eq!((kept.max_age, kept.max_bytes, kept.max_messages), (day * 30, 1 << 30, -1));
        assert_eq!(stream_change(&existing, &kept), None, "nothing to update");
        let larger =
            stream::Config { max_age: Duration::ZERO, max_bytes: 1 << 31, max_messages: -1, ..Default::default() };
        let grown = widened(&existing, &larger);
        assert_eq!((grown.max_age, grown.max_bytes), (Duration::ZERO, 1 << 31));
        assert!(stream_change(&existing, &grown).is_some_and(|c| c.contains("max_age") && c.contains("max_bytes")));
        let unset = stream::Config { max_bytes: -1, max_messages: -1, ..smaller.clone() };
        let capped = stream::Config { max_messages: 5000, ..existing.clone() };
        let kept = widened(&capped, &unset);
        assert_eq!((kept.max_bytes, kept.max_messages), (1 << 30, 5000), "an unset limit lifts no cap");
        let interest = stream::Config { retention: RetentionPolicy::Interest, ..smaller };
        assert_eq!(widened(&existing, &interest).retention, RetentionPolicy::Limits, "the stream keeps its policy");
    }

    #[test]
    fn stream_changes_ignore_the_servers_spelling_of_no_limit() {
        let wanted = stream::Config { max_bytes: -1, max_messages: -1, num_replicas: 1, ..Default::default() };
        let existing = stream::Config { max_bytes: -1, max_messages: 0, num_replicas: 1, ..Default::default() };
        assert_eq!(stream_change(&existing, &wanted), None);
        let older = stream::Config { max_age: Duration::from_secs(60), ..existing };
        assert!(stream_change(&older, &wanted).is_some_and(|c| c.contains("max_age")));
    }
}
