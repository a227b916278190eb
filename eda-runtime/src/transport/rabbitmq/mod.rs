//! RabbitMQ (feature `rabbitmq`, URLs `amqp://…` and `amqps://…`), with quorum queues.
//!
//! What eda keeps on the broker, for namespace `eda` (the default; see
//! [`RabbitOptions::namespace`]), all durable and declared with the same arguments every time:
//!
//! - **A direct exchange per topic**, `eda.<topic>`, recording the topic's partition count in
//!   its argument `x-eda-partitions` (an instance configured with another count is refused at
//!   start). An event goes with routing key `<partition>` — the same FNV-1a hash of its key as
//!   the SQL log and NATS — as a persistent message: its CloudEvents attributes as `ce-*`
//!   headers and its content type as the `content-type` property (the AMQP binding's binary
//!   mode, as Knative and the CloudEvents SDKs read it), the payload as the body. Every publish
//!   is `mandatory` and waits for its publisher confirm (up to
//!   [`max_unconfirmed`](RabbitOptions::max_unconfirmed) in flight): a nack, or an event no
//!   group's queue takes (312 NO_ROUTE, which comes with an ack), is an error to the caller,
//!   never a silent loss. A group gets the events published once its queues exist: from its
//!   first subscription on, or from the start of any runtime that links its handlers without
//!   running them ([`Transport::prepare`]); events published before then are not kept for it.
//! - **A quorum queue per group and partition**, `eda.<topic>.<group>.<partition>`, bound to the
//!   topic's exchange, with a single active consumer: every instance of the group consumes
//!   every partition, and the broker hands each partition's messages to one of them at a time.
//!   The delivery engine gives that consumer a window of
//!   [`window`](RabbitOptions::window) events (the prefetch), one event per key out at a time
//!   (also across retries) while other keys run on, and settles the contiguous done prefix
//!   with one `basic.ack` (`multiple`) per batch. When an instance dies, its channels close, its
//!   unsettled messages go to the next consumer first and in order, and the idempotency guards
//!   absorb what was done and not yet settled. An instance that joins stands by: the broker
//!   does not move an active consumer's partition while it lives.
//! - **Dead letters**: each group queue has `x-delivery-limit` five times
//!   [`max_deliver`](RabbitOptions::max_deliver) (at least 100; see below), dead-letter exchange `eda.dlx` (a topic
//!   exchange, routing key = the topic), `x-dead-letter-strategy=at-least-once` and
//!   `x-overflow=reject-publish` (without which the broker silently dead-letters at most once).
//!   The quorum queue `eda.dlq`, bound to `eda.dlx` with `#`, keeps every dead letter: those
//!   eda gives up on (the original message with `eda-dlq-*` headers saying which group gave
//!   up, why, after how many attempts and when) and those the broker gives up on after its
//!   delivery limit. Bind your own queue to `eda.dlx` with a topic's name to watch that topic's.
//!   [`DeadLetterStore`] lists, shows and removes them, so `<app> dlq list|show|replay|purge`
//!   work on RabbitMQ as on the other transports.
//!
//! An event whose consumers died holding it more than `max_deliver` times (the broker's
//! `x-delivery-count`, on the first message a new consumer gets) is dead-lettered without being
//! handed out again. The broker counts a delivery for every message a closed channel held, the
//! prefetched ones too, so its own limit is set higher: it gives up only on a message that came
//! back that often. The runtime's retries
//! hold the event unsettled and its key's lane, not the broker.
//!
//! Lag is, per partition, the messages ready in the group's queue (passive `queue.declare`)
//! plus those delivered to this instance and not settled yet; AMQP does not tell what other
//! instances hold unsettled.
//!
//! The transport reconnects after the broker restarts or closes the connection: a publish
//! retries until [`publish_timeout`](RabbitOptions::publish_timeout) (a publish whose confirm
//! was lost with the connection may be stored twice, which the guards absorb); a partition
//! whose channel closed is consumed again, and what was not settled comes again.

mod consumer;
mod dead_letters;
mod members;
mod options;
mod publish;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use eda_core::{DeadLetterStore, Deliveries, Envelope, PartitionLag, Subscription, Transport, TransportError};
use lapin::options::{
    ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::Semaphore;
use tokio::time::Instant;

pub use options::RabbitOptions;

const NAME: &str = "rabbitmq";

/// The RabbitMQ transport: see the [module docs](self) for what it keeps on the broker.
///
/// ```no_run
/// # async fn run() -> Result<(), eda::TransportError> {
/// use eda::transport::rabbitmq::RabbitOptions;
/// let transport = RabbitOptions::new("amqp://guest:guest@127.0.0.1:5672/%2f").namespace("shop").connect().await?;
/// # drop(transport); Ok(()) }
/// ```
#[derive(Clone)]
pub struct RabbitTransport {
    inner: Arc<Inner>,
}

struct Inner {
    options: RabbitOptions,
    link: tokio::sync::Mutex<Option<Arc<Link>>>,
    /// Topics whose exchange this instance declared.
    topics: Mutex<HashSet<String>>,
    /// Whether the dead-letter exchange and queue are declared.
    dead_letters_declared: Mutex<bool>,
    /// Queues this instance declared, for [`RabbitTransport::delete_declared`].
    queues: Mutex<HashSet<String>>,
    unconfirmed: Semaphore,
    /// The engine of every subscription: closing waits for those of stopped ones.
    engines: crate::engine::Engines,
    /// Per group and topic, each partition's messages delivered to this instance and not
    /// settled yet: the part of the lag AMQP does not tell.
    unsettled: Mutex<HashMap<(String, String), Partitions>>,
    /// Partition channels closing now.
    closing: Arc<AtomicUsize>,
}

/// Per partition of one subscription, what this instance holds unsettled.
type Partitions = Arc<[consumer::Unsettled]>;

/// One connection with its publishing channel (in confirm mode).
struct Link {
    connection: Connection,
    publish: lapin::Channel,
}

impl Link {
    fn usable(&self) -> bool {
        self.connection.status().connected() && self.publish.status().connected()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn other(e: impl std::error::Error + Send + Sync + 'static) -> TransportError {
    TransportError::Other { transport: NAME, source: Box::new(e) }
}

/// A string header value, as AMQP carries it.
fn text(value: impl Into<String>) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.into()))
}

/// A header's value as text, where it is text.
pub(super) fn as_text(value: &AMQPValue) -> Option<&str> {
    match value {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

/// A header's value as a number, where it is one.
pub(super) fn as_number(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::Timestamp(n) => i64::try_from(*n).ok(),
        _ => None,
    }
}

impl RabbitTransport {
    /// Connects to the broker a URL names, with settings from its query (see
    /// [`RabbitOptions::from_url`]).
    pub async fn connect(url: &str) -> Result<Self, TransportError> {
        RabbitOptions::from_url(url)?.connect().await
    }

    /// Connects with `options`: the broker must answer now, so a wrong URL or password shows at
    /// start.
    pub async fn connect_with(options: RabbitOptions) -> Result<Self, TransportError> {
        options.check()?;
        let inner = Inner {
            unconfirmed: Semaphore::new(options.max_unconfirmed),
            options,
            link: tokio::sync::Mutex::new(None),
            topics: Mutex::default(),
            dead_letters_declared: Mutex::new(false),
            queues: Mutex::default(),
            engines: Default::default(),
            unsettled: Mutex::default(),
            closing: Arc::default(),
        };
        let transport = Self { inner: Arc::new(inner) };
        transport.link().await?;
        Ok(transport)
    }

    /// The current connection, made anew when the last one is gone.
    async fn link(&self) -> Result<Arc<Link>, TransportError> {
        let mut current = self.inner.link.lock().await;
        if let Some(link) = current.as_ref().filter(|l| l.usable()) {
            return Ok(link.clone());
        }
        let o = &self.inner.options;
        let properties = ConnectionProperties::default()
            .with_connection_name(LongString::from(format!("eda pid {}", std::process::id())));
        let connection = Connection::connect(&o.url, properties).await.map_err(|e| TransportError::Unreachable {
            transport: NAME,
            reason: format!(
                "RabbitMQ at {}: {e}; check that the broker runs, and the URL's host, port, vhost, user and password",
                o.shown
            ),
        })?;
        let publish = connection.create_channel().await.map_err(other)?;
        publish.confirm_select(ConfirmSelectOptions::default()).await.map_err(other)?;
        let link = Arc::new(Link { connection, publish });
        *current = Some(link.clone());
        Ok(link)
    }

    /// A channel of its own, for declarations that may close it (a 406 or 404 closes the
    /// channel it came on) and for consumers.
    async fn channel(&self) -> Result<lapin::Channel, TransportError> {
        let link = self.link().await?;
        link.connection.create_channel().await.map_err(other)
    }

    /// Deletes every exchange and queue this instance declared, with the messages they hold,
    /// and the namespace's dead-letter exchange and queue: for tests and tear-downs, never
    /// while other instances use the namespace.
    pub async fn delete_declared(&self) -> Result<(), TransportError> {
        let channel = self.channel().await?;
        let queues: Vec<String> = lock(&self.inner.queues).drain().collect();
        let topics: Vec<String> = lock(&self.inner.topics).drain().collect();
        let subscriptions: Vec<(String, String)> = lock(&self.inner.unsettled).drain().map(|(k, _)| k).collect();
        let members = subscriptions.iter().map(|(group, topic)| self.members_exchange(topic, group));
        for queue in queues.iter().chain([&self.dead_letter_queue()]) {
            channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await.map_err(other)?;
        }
        for exchange in topics.iter().map(|t| self.exchange(t)).chain(members).chain([self.dead_letter_exchange()]) {
            channel.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default()).await.map_err(other)?;
        }
        *lock(&self.inner.dead_letters_declared) = false;
        let _ = channel.close(200, "OK".into()).await;
        Ok(())
    }

    pub(super) fn closing(&self) -> Arc<AtomicUsize> {
        self.inner.closing.clone()
    }

    pub(super) fn options(&self) -> &RabbitOptions {
        &self.inner.options
    }

    /// The exchange of a topic.
    pub(super) fn exchange(&self, topic: &str) -> String {
        format!("{}.{topic}", self.inner.options.namespace)
    }

    /// The queue of a group's partition.
    pub(super) fn queue(&self, topic: &str, group: &str, partition: u32) -> String {
        format!("{}.{topic}.{group}.{partition}", self.inner.options.namespace)
    }

    /// The fanout exchange a group's instances on a topic say they are there on.
    pub(super) fn members_exchange(&self, topic: &str, group: &str) -> String {
        format!("{}.{topic}.{group}.members", self.inner.options.namespace)
    }

    /// The exchange dead letters go through.
    pub(super) fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.inner.options.namespace)
    }

    /// The queue that keeps every dead letter.
    pub(super) fn dead_letter_queue(&self) -> String {
        format!("{}.dlq", self.inner.options.namespace)
    }

    /// Declares a topic's exchange (once per instance), with its partition count.
    async fn ensure_topic(&self, topic: &str) -> Result<(), TransportError> {
        if lock(&self.inner.topics).contains(topic) {
            return Ok(());
        }
        check_name("topic", topic)?;
        let partitions = self.inner.options.partitions;
        let mut arguments = FieldTable::default();
        arguments.insert("x-eda-partitions".into(), AMQPValue::LongInt(partitions as i32));
        let channel = self.channel().await?;
        let exchange = self.exchange(topic);
        let declared = channel
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions { durable: true, ..Default::default() },
                arguments,
            )
            .await;
        let _ = channel.close(200, "OK".into()).await;
        declared
            .map_err(|e| declare_refused(&format!("the exchange `{exchange}` of topic `{topic}`"), e, partitions))?;
        lock(&self.inner.topics).insert(topic.to_owned());
        Ok(())
    }

    /// Declares the dead-letter exchange and queue (once per instance).
    async fn ensure_dead_letters(&self) -> Result<(), TransportError> {
        if *lock(&self.inner.dead_letters_declared) {
            return Ok(());
        }
        let channel = self.channel().await?;
        let declared = async {
            channel
                .exchange_declare(
                    self.dead_letter_exchange().as_str().into(),
                    ExchangeKind::Topic,
                    ExchangeDeclareOptions { durable: true, ..Default::default() },
                    FieldTable::default(),
                )
                .await?;
            let mut arguments = FieldTable::default();
            arguments.insert("x-queue-type".into(), text("quorum"));
            channel
                .queue_declare(
                    self.dead_letter_queue().as_str().into(),
                    QueueDeclareOptions { durable: true, ..Default::default() },
                    arguments,
                )
                .await?;
            channel
                .queue_bind(
                    self.dead_letter_queue().as_str().into(),
                    self.dead_letter_exchange().as_str().into(),
                    "#".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
        }
        .await;
        let _ = channel.close(200, "OK".into()).await;
        declared
            .map_err(|e| declare_refused(&format!("the dead-letter queue `{}`", self.dead_letter_queue()), e, 0))?;
        *lock(&self.inner.dead_letters_declared) = true;
        Ok(())
    }

    /// The arguments of a group's partition queue: always the same, as RabbitMQ refuses a
    /// declaration that differs from the queue's.
    fn queue_arguments(&self, topic: &str) -> FieldTable {
        let mut arguments = FieldTable::default();
        arguments.insert("x-queue-type".into(), text("quorum"));
        arguments.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        let limit = i32::try_from(broker_delivery_limit(self.inner.options.engine.max_deliver)).unwrap_or(i32::MAX);
        arguments.insert("x-delivery-limit".into(), AMQPValue::LongInt(limit));
        arguments.insert("x-dead-letter-exchange".into(), text(self.dead_letter_exchange()));
        arguments.insert("x-dead-letter-routing-key".into(), text(topic));
        // at-least-once takes effect only with reject-publish; otherwise the broker quietly
        // falls back to at-most-once.
        arguments.insert("x-dead-letter-strategy".into(), text("at-least-once"));
        arguments.insert("x-overflow".into(), text("reject-publish"));
        arguments
    }

    /// Declares a group's partition queue and binds it to its topic's exchange, on `channel`.
    async fn declare_queue(
        &self,
        channel: &lapin::Channel,
        topic: &str,
        group: &str,
        partition: u32,
    ) -> Result<String, TransportError> {
        let queue = self.queue(topic, group, partition);
        let declared = async {
            channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions { durable: true, ..Default::default() },
                    self.queue_arguments(topic),
                )
                .await?;
            channel
                .queue_bind(
                    queue.as_str().into(),
                    self.exchange(topic).as_str().into(),
                    partition.to_string().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
        };
        declared.await.map_err(|e| declare_refused(&format!("the queue `{queue}`"), e, 0))?;
        lock(&self.inner.queues).insert(queue.clone());
        Ok(queue)
    }
}

/// The queues' `x-delivery-limit`: well above `max_deliver`, as the broker counts a delivery
/// for every message a closed channel held — one a consumer crashed on, but also those
/// prefetched and not yet handed out when an instance stepped back or lost its connection. eda
/// blames only the first of them and dead-letters it past `max_deliver`; the broker gives up
/// only on a message that came back this many times.
pub(super) fn broker_delivery_limit(max_deliver: u32) -> u32 {
    max_deliver.saturating_mul(5).max(100)
}

/// A declaration the broker refused, with what to do about it.
fn declare_refused(what: &str, e: lapin::Error, partitions: u32) -> TransportError {
    let text = e.to_string();
    if text.contains("inequivalent arg") || text.contains("PRECONDITION_FAILED") {
        let hint = if text.contains("x-eda-partitions") {
            format!(
                "the topic exists with another partition count than this instance's {partitions}; configure the count it was made with (`partitions=` in the URL)"
            )
        } else {
            "it exists with other settings (another namespace's, or made by hand); delete it or choose another namespace".to_owned()
        };
        return TransportError::Config {
            transport: NAME,
            reason: format!("RabbitMQ refused to declare {what}: {text}; {hint}"),
        };
    }
    TransportError::Unreachable { transport: NAME, reason: format!("RabbitMQ could not declare {what}: {text}") }
}

/// Checks a topic or group name for what an AMQP name can hold.
fn check_name(what: &str, name: &str) -> Result<(), TransportError> {
    if name.is_empty() || name.len() > 200 || name.chars().any(|c| c.is_control() || c == '#' || c == '*') {
        return Err(TransportError::Config {
            transport: NAME,
            reason: format!(
                "{what} `{name}` cannot name a RabbitMQ queue: use 1 to 200 printable characters without `#` or `*`"
            ),
        });
    }
    Ok(())
}

#[async_trait]
impl Transport for RabbitTransport {
    fn kind(&self) -> &'static str {
        NAME
    }

    async fn publish(&self, envelope: &Envelope) -> Result<(), TransportError> {
        self.publish_message(&self.outgoing(envelope).await?).await
    }

    async fn publish_all(&self, envelopes: &[Envelope]) -> Result<(), TransportError> {
        let mut messages = Vec::with_capacity(envelopes.len());
        for e in envelopes {
            messages.push(self.outgoing(e).await?);
        }
        self.publish_in_order(&messages).await
    }

    async fn prepare(&self, subscription: &Subscription) -> Result<(), TransportError> {
        check_name("group", &subscription.group)?;
        self.ensure_topic(&subscription.topic).await?;
        self.ensure_dead_letters().await?;
        let channel = self.channel().await?;
        for p in 0..self.inner.options.partitions {
            self.declare_queue(&channel, &subscription.topic, &subscription.group, p).await?;
        }
        let _ = channel.close(200, "OK".into()).await;
        Ok(())
    }

    async fn subscribe(&self, subscription: &Subscription) -> Result<Deliveries, TransportError> {
        self.prepare(subscription).await?;
        let unsettled: Arc<[consumer::Unsettled]> =
            (0..self.inner.options.partitions).map(|_| consumer::Unsettled::default()).collect();
        let key = (subscription.group.clone(), subscription.topic.clone());
        lock(&self.inner.unsettled).insert(key, unsettled.clone());
        let log = Arc::new(consumer::RabbitPartitions {
            transport: self.clone(),
            topic: subscription.topic.clone(),
            group: subscription.group.clone(),
            unsettled,
        });
        let members = members::watch(self.clone(), subscription.group.clone(), subscription.topic.clone());
        let (deliveries, engine) = crate::engine::held::subscribe(
            log,
            (&subscription.group, &subscription.topic),
            NAME,
            self.inner.options.engine.clone(),
            members,
        );
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
        let mut lags = Vec::with_capacity(self.inner.options.partitions as usize);
        let unsettled = lock(&self.inner.unsettled).get(&(group.to_owned(), topic.to_owned())).cloned();
        let held = |p: u32| unsettled.as_ref().and_then(|u| u.get(p as usize)).map_or(0, consumer::Unsettled::count);
        let mut channel = self.channel().await?;
        for p in 0..self.inner.options.partitions {
            let queue = self.queue(topic, group, p);
            let options = QueueDeclareOptions { passive: true, durable: true, ..Default::default() };
            match channel.queue_declare(queue.as_str().into(), options, FieldTable::default()).await {
                Ok(q) => lags.push(PartitionLag { partition: p, lag: u64::from(q.message_count()) + held(p) }),
                Err(e) if e.to_string().contains("NOT_FOUND") => {
                    // Not subscribed yet: nothing waits for this group (the broker keeps events
                    // only for queues that exist).
                    lags.push(PartitionLag { partition: p, lag: 0 });
                    channel = self.channel().await?;
                }
                Err(e) => return Err(other(e)),
            }
        }
        let _ = channel.close(200, "OK".into()).await;
        Ok(lags)
    }

    async fn close(&self) -> Result<(), TransportError> {
        // The engines of stopped subscriptions settle what is done and close their channels:
        // once they are closed, what was not settled is back in the queues.
        // The connection stays for other users of this transport.
        let deadline = Instant::now() + self.inner.options.engine.handover_timeout + Duration::from_secs(2);
        let stopping = || self.inner.engines.stopping() || self.inner.closing.load(Ordering::Acquire) > 0;
        while stopping() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    fn dead_letter_store(&self) -> Option<&dyn DeadLetterStore> {
        Some(self)
    }
}
