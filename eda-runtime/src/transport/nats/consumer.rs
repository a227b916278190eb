//! Consuming: one worker per partition consumer of a group, each pulling one event at a time.
//!
//! A worker asks the server for one message (a pull request with an expiry and idle
//! heartbeats), hands it to the runtime, keeps it alive with `+WPI` while the runtime works on it,
//! and settles it as the runtime says: `+ACK` (waiting for the server to confirm), `-NAK` with a
//! delay, or a copy to the dead-letter stream and then `+ACK`. Only then does it ask for the
//! next one. A delivery the runtime drops unsettled is given back with `-NAK` at once. When the
//! subscription is dropped, the worker drains its inbox and gives back whatever arrived.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, ReplayPolicy};
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::stream::ConsumerErrorKind;
use async_nats::jetstream::{AckKind, ErrorCode};
use async_nats::StatusCode;
use async_trait::async_trait;
use bytes::Bytes;
use eda_core::{Acker, Binding, DeadLetter, DeadLetterReason, Deliveries, Delivery, Envelope, TransportError};
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::{lock, other, retry_pause, NatsTransport, TopicLayout, NAME};

/// How long one pull request waits for a message before the server ends it.
const PULL_EXPIRES: Duration = Duration::from_secs(15);
/// How often the server says a waiting pull request is still alive; three missed in a row mean
/// it was lost (a server restart) and a new one is sent.
const PULL_HEARTBEAT: Duration = Duration::from_secs(3);

/// Creates (or updates) the group's consumer on every partition of the topic and starts a
/// worker for each.
pub(super) async fn subscribe(
    transport: NatsTransport,
    layout: Arc<TopicLayout>,
    group: String,
) -> Result<Deliveries, TransportError> {
    let stream = transport.inner.js.get_stream_no_info(&layout.stream).await.map_err(other)?;
    let configs: Vec<_> = (0..layout.partitions).map(|p| transport.consumer_config(&layout, &group, p)).collect();
    let (stream, stream_name) = (&stream, layout.stream.as_str());
    let created = futures_util::future::join_all(configs.into_iter().map(|c| async move {
        let name = c.durable_name.clone().unwrap_or_default();
        stream.create_consumer(c).await.map(|_| ()).map_err(|e| consumer_refused(stream_name, &name, e))
    }))
    .await;
    created.into_iter().collect::<Result<Vec<()>, _>>()?;
    let (tx, mut rx) = mpsc::channel(layout.partitions as usize);
    let mut workers = lock(&transport.inner.workers);
    workers.retain(|w| !w.task.is_finished());
    for partition in 0..layout.partitions {
        let worker = Worker {
            transport: transport.clone(),
            consumer: NatsTransport::consumer_name(&group, partition),
            layout: layout.clone(),
            group: group.clone(),
            partition,
            tx: tx.clone(),
        };
        workers.push(WorkerHandle { subscription: tx.downgrade(), task: tokio::spawn(worker.run()) });
    }
    drop(workers);
    Ok(Box::pin(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))))
}

impl NatsTransport {
    fn consumer_config(&self, layout: &TopicLayout, group: &str, partition: u32) -> pull::Config {
        let o = &self.inner.options;
        pull::Config {
            durable_name: Some(Self::consumer_name(group, partition)),
            description: Some(format!("eda group `{group}` on topic `{}`, partition {partition}", layout.topic)),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: o.ack_wait,
            // eda dead-letters an event delivered more than `max_deliver` times itself, with the
            // event in hand; the server must never give up on it first and leave it stranded in
            // the stream. A backoff needs a finite limit: one the server never reaches.
            max_deliver: if o.backoff.is_empty() { -1 } else { i64::from(i32::MAX) },
            backoff: o.backoff.clone(),
            filter_subject: self.subject(&layout.topic, partition),
            // One event of a partition out at a time: per-key order across every instance.
            max_ack_pending: 1,
            replay_policy: ReplayPolicy::Instant,
            ..Default::default()
        }
    }
}

fn consumer_refused(
    stream: &str,
    name: &str,
    e: async_nats::error::Error<async_nats::jetstream::stream::ConsumerErrorKind>,
) -> TransportError {
    match e.kind() {
        ConsumerErrorKind::JetStream(js) => TransportError::Config {
            transport: NAME,
            reason: format!(
                "NATS refuses consumer `{name}` on stream `{stream}`: {js}; if it exists with settings that cannot change (its ack policy), remove it (`nats consumer rm {stream} {name}`) and eda creates it again"
            ),
        },
        _ => other(e),
    }
}

/// True when a consumer-info error says the consumer does not exist.
pub(super) fn consumer_missing(e: &async_nats::error::Error<ConsumerInfoErrorKind>) -> bool {
    match e.kind() {
        ConsumerInfoErrorKind::NotFound => true,
        ConsumerInfoErrorKind::JetStream(js) => js.error_code() == ErrorCode::CONSUMER_NOT_FOUND,
        _ => false,
    }
}

/// A worker, as the transport keeps track of it.
pub(super) struct WorkerHandle {
    subscription: mpsc::WeakSender<Result<Delivery, TransportError>>,
    task: tokio::task::JoinHandle<()>,
}

/// How many workers still run for a subscription that was dropped (they are giving back what
/// they held).
pub(super) fn stopping_workers(workers: &std::sync::Mutex<Vec<WorkerHandle>>) -> usize {
    let mut workers = lock(workers);
    workers.retain(|w| !w.task.is_finished());
    workers.iter().filter(|w| w.subscription.upgrade().is_none_or(|tx| tx.is_closed())).count()
}

/// How the runtime settled a delivery, and where to say whether that worked.
enum Settle {
    Ack,
    Nak(Duration),
    /// Why, and after how many attempts (the message itself is what the worker holds).
    DeadLetter(DeadLetterReason, u32),
}

type Reply = oneshot::Sender<Result<(), TransportError>>;

/// Settles a delivery through the worker that holds its message. Dropped unsettled, it closes
/// the channel, and the worker gives the message back.
struct NatsAcker {
    settle: Option<oneshot::Sender<(Settle, Reply)>>,
}

impl NatsAcker {
    async fn send(mut self: Box<Self>, how: Settle) -> Result<(), TransportError> {
        let (reply, answer) = oneshot::channel();
        let settle = self.settle.take().ok_or(TransportError::Closed(NAME))?;
        settle.send((how, reply)).map_err(|_| TransportError::Closed(NAME))?;
        answer.await.map_err(|_| TransportError::Closed(NAME))?
    }
}

#[async_trait]
impl Acker for NatsAcker {
    async fn ack(self: Box<Self>) -> Result<(), TransportError> {
        self.send(Settle::Ack).await
    }

    async fn nack(self: Box<Self>, delay: Duration) -> Result<(), TransportError> {
        self.send(Settle::Nak(delay)).await
    }

    async fn dead_letter(self: Box<Self>, letter: DeadLetter) -> Result<(), TransportError> {
        self.send(Settle::DeadLetter(letter.reason, letter.attempts)).await
    }
}

/// Pulls one partition consumer of one group.
struct Worker {
    transport: NatsTransport,
    layout: Arc<TopicLayout>,
    group: String,
    consumer: String,
    partition: u32,
    tx: mpsc::Sender<Result<Delivery, TransportError>>,
}

/// One message the worker holds.
struct Held {
    message: async_nats::jetstream::Message,
    delivered: u32,
    stream_sequence: u64,
}

impl Held {
    async fn nak(&self, delay: Duration) {
        let kind = if delay.is_zero() { AckKind::Nak(None) } else { AckKind::Nak(Some(delay)) };
        if let Err(e) = self.message.ack_with(kind).await {
            tracing::debug!(error = %e, "could not give a message back; it comes again after ack_wait");
        }
    }

    async fn in_progress(&self) {
        if let Err(e) = self.message.ack_with(AckKind::Progress).await {
            tracing::debug!(error = %e, "could not extend a delivery's ack wait");
        }
    }
}

impl Worker {
    async fn run(self) {
        let client = self.transport.inner.client.clone();
        let inbox = client.new_inbox();
        let mut failures = 0u32;
        let mut inbox_sub = loop {
            match client.subscribe(inbox.clone()).await {
                Ok(s) => break s,
                Err(e) => {
                    failures += 1;
                    tracing::warn!(group = %self.group, topic = %self.layout.topic, error = %e, "cannot subscribe to a pull inbox; trying again");
                    if self.tx.is_closed() {
                        return;
                    }
                    tokio::time::sleep(retry_pause(failures)).await;
                }
            }
        };
        self.pull(&mut inbox_sub, &inbox).await;
        // Stopped. The server may have answered a pull request meanwhile: drain the inbox (the
        // server sends nothing after the unsubscribe) and give back what arrived.
        if inbox_sub.drain().await.is_ok() {
            let deadline = Instant::now() + Duration::from_secs(2);
            while let Ok(Some(message)) = tokio::time::timeout_at(deadline, inbox_sub.next()).await {
                if is_delivery(&message) {
                    if let Some(held) = self.hold(message) {
                        held.nak(Duration::ZERO).await;
                    }
                }
            }
        }
    }

    /// Pulls until the subscription is dropped.
    async fn pull(&self, inbox_sub: &mut async_nats::Subscriber, inbox: &str) {
        let request = PullRequest {
            client: self.transport.inner.client.clone(),
            subject: format!("$JS.API.CONSUMER.MSG.NEXT.{}.{}", self.layout.stream, self.consumer).into(),
            inbox: inbox.to_owned().into(),
            body: Bytes::from(format!(
                r#"{{"batch":1,"expires":{},"idle_heartbeat":{}}}"#,
                PULL_EXPIRES.as_nanos(),
                PULL_HEARTBEAT.as_nanos()
            )),
        };
        let mut connections = self.transport.inner.connections.clone();
        connections.borrow_and_update();
        let mut requested = false;
        let mut quiet_until = Instant::now();
        let mut failures = 0u32;
        // Pull requests answered "no responders" in a row.
        let mut unanswered = 0u32;
        loop {
            if self.tx.is_closed() {
                return;
            }
            if !requested {
                if let Err(e) = request.send().await {
                    failures += 1;
                    tracing::warn!(consumer = %self.consumer, error = %e, "cannot send a pull request; trying again");
                    tokio::time::sleep(retry_pause(failures)).await;
                    if self.tx.is_closed() {
                        return;
                    }
                    continue;
                }
                requested = true;
                quiet_until = Instant::now() + PULL_HEARTBEAT * 3;
            }
            let message = tokio::select! {
                _ = self.tx.closed() => return,
                changed = connections.changed() => {
                    // A new connection: the server may not know the request any more.
                    if changed.is_err() {
                        return;
                    }
                    requested = false;
                    continue;
                }
                _ = tokio::time::sleep_until(quiet_until) => {
                    requested = false;
                    continue;
                }
                m = inbox_sub.next() => match m {
                    Some(m) => m,
                    None => {
                        tracing::error!(consumer = %self.consumer, "the pull inbox closed: this partition is not consumed until the subscription is made again");
                        return;
                    }
                },
            };
            quiet_until = Instant::now() + PULL_HEARTBEAT * 3;
            if message.status != Some(StatusCode::NO_RESPONDERS) {
                unanswered = 0;
            }
            match message.status {
                None | Some(StatusCode::OK) => {
                    failures = 0;
                    // A batch of one: that request is done; settling may have sent the next.
                    requested = match self.hold(message) {
                        Some(held) => self.take(held, &request).await,
                        None => false,
                    };
                    quiet_until = Instant::now() + PULL_HEARTBEAT * 3;
                }
                Some(StatusCode::IDLE_HEARTBEAT) => {}
                Some(StatusCode::TIMEOUT) | Some(StatusCode::NOT_FOUND) => requested = false,
                Some(StatusCode::REQUEST_TERMINATED) => {
                    let why = message.description.unwrap_or_default();
                    if why.to_ascii_lowercase().contains("consumer deleted") {
                        tracing::warn!(consumer = %self.consumer, stream = %self.layout.stream, "the consumer was deleted; creating it again");
                        if let Err(e) = self.recreate().await {
                            failures += 1;
                            tracing::warn!(consumer = %self.consumer, error = %e, "cannot create the consumer again");
                            tokio::time::sleep(retry_pause(failures)).await;
                        }
                    } else {
                        tracing::debug!(consumer = %self.consumer, reason = %why, "pull request ended");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    requested = false;
                }
                Some(StatusCode::NO_RESPONDERS) => {
                    // Nobody serves the consumer: JetStream is still starting after a restart,
                    // or the consumer (or its stream) is gone. After a few, make them again.
                    unanswered += 1;
                    if unanswered >= 3 {
                        tracing::warn!(consumer = %self.consumer, stream = %self.layout.stream, "no answer to pull requests; making the stream and consumer again");
                        if let Err(e) = self.recreate().await {
                            tracing::warn!(consumer = %self.consumer, error = %e, "cannot make the consumer again yet");
                        }
                    }
                    tokio::time::sleep(retry_pause(unanswered)).await;
                    requested = false;
                }
                Some(status) => {
                    failures += 1;
                    tracing::warn!(consumer = %self.consumer, %status, description = ?message.description, "pull request refused; trying again");
                    tokio::time::sleep(retry_pause(failures)).await;
                    requested = false;
                }
            }
        }
    }

    /// Makes the consumer again, and its stream first if that is gone too.
    async fn recreate(&self) -> Result<(), TransportError> {
        self.transport.forget_topic(&self.layout.topic);
        let layout = self.transport.topic(&self.layout.topic).await?;
        if layout.partitions != self.layout.partitions {
            tracing::error!(topic = %self.layout.topic, was = self.layout.partitions, now = layout.partitions,
                "the topic's stream was made again with another partition count; restart the service to follow it");
        }
        let stream = self.transport.inner.js.get_stream_no_info(&self.layout.stream).await.map_err(other)?;
        let config = self.transport.consumer_config(&self.layout, &self.group, self.partition);
        stream
            .create_consumer(config)
            .await
            .map(|_| ())
            .map_err(|e| consumer_refused(&self.layout.stream, &self.consumer, e))
    }

    /// The delivery in a message from the inbox, or `None` (with a warning) for anything else.
    fn hold(&self, message: async_nats::Message) -> Option<Held> {
        let message = async_nats::jetstream::Message { message, context: self.transport.inner.js.clone() };
        match message.info() {
            Ok(info) => {
                let (delivered, stream_sequence) = (info.delivered, info.stream_sequence);
                let delivered = u32::try_from(delivered.max(1)).unwrap_or(u32::MAX);
                Some(Held { message, delivered, stream_sequence })
            }
            Err(e) => {
                tracing::warn!(consumer = %self.consumer, error = %e, "ignoring a message on the pull inbox that is not a JetStream delivery");
                None
            }
        }
    }

    /// Hands a delivery to the runtime and settles it as the runtime says. Returns true when it
    /// already asked for the next message.
    async fn take(&self, held: Held, request: &PullRequest) -> bool {
        let o = &self.transport.inner.options;
        if held.delivered > o.max_deliver {
            // Crash loops end here: the event does not reach a handler again.
            let reason = DeadLetterReason {
                handler: None,
                error: format!(
                    "delivered {} times without being acknowledged: the consumers that took it crashed, hung past ack_wait, lost their connection or handed it back each time (max_deliver {})",
                    held.delivered - 1,
                    o.max_deliver
                ),
                permanent: false,
            };
            self.dead_letter_now(&held, reason, held.delivered - 1).await;
            return false;
        }
        let envelope = {
            let headers = held.message.headers.iter().flat_map(|h| h.iter());
            let pairs =
                headers.flat_map(|(name, values)| values.iter().map(move |v| (AsRef::<str>::as_ref(name), v.as_str())));
            Envelope::from_headers(Binding::Nats, &self.layout.topic, pairs, held.message.payload.to_vec())
        };
        let envelope = match envelope {
            Ok(e) => e,
            Err(e) => {
                // Not an eda event (another producer, another format): keep it, raw.
                let reason = DeadLetterReason {
                    handler: None,
                    error: format!("the message is not a CloudEvents event eda can read: {e}"),
                    permanent: true,
                };
                self.dead_letter_now(&held, reason, held.delivered).await;
                return false;
            }
        };
        let (settle, settled) = oneshot::channel();
        let delivery =
            Delivery::new(envelope, held.delivered, self.partition, Box::new(NatsAcker { settle: Some(settle) }));
        let Ok(slot) = self.alive_while(&held, self.tx.reserve()).await else {
            held.nak(Duration::ZERO).await;
            return false;
        };
        slot.send(Ok(delivery));
        let Ok((how, reply)) = self.alive_while(&held, settled).await else {
            // Dropped unsettled: the consumer stopped or died with it.
            held.nak(Duration::ZERO).await;
            return false;
        };
        // Settling takes a while too (an ack is a round trip, a dead letter a publish).
        let (result, asked) = if matches!(how, Settle::Ack) && !self.tx.is_closed() {
            // Ask for the next message while the ack is confirmed: the server holds the
            // request until the ack frees the partition.
            let (acked, asked) = self.alive_while(&held, async { tokio::join!(ack(&held), request.send()) }).await;
            (acked, asked.is_ok())
        } else {
            (self.alive_while(&held, self.settle(&held, how)).await, false)
        };
        let _ = reply.send(result);
        asked
    }

    /// Runs `work` while keeping the held message alive with `+WPI`.
    async fn alive_while<T>(&self, held: &Held, work: impl std::future::Future<Output = T>) -> T {
        let every = self.transport.inner.options.keep_alive_interval();
        let mut keep_alive = tokio::time::interval_at(Instant::now() + every, every);
        tokio::pin!(work);
        loop {
            tokio::select! {
                done = &mut work => return done,
                _ = keep_alive.tick() => held.in_progress().await,
            }
        }
    }

    async fn settle(&self, held: &Held, how: Settle) -> Result<(), TransportError> {
        match how {
            Settle::Ack => ack(held).await,
            Settle::Nak(delay) => {
                held.nak(self.nak_delay(delay, held.delivered)).await;
                Ok(())
            }
            Settle::DeadLetter(reason, attempts) => self.dead_letter(held, &reason, attempts).await,
        }
    }

    /// With a backoff, the server adds `backoff[n-1] − backoff[0]` to a nak's delay on the n-th
    /// delivery; take it off again so the runtime's delay is the one applied. A delay stays a
    /// delay (at least 1 ms): a nak without one is redelivered at once, backoff or not.
    fn nak_delay(&self, delay: Duration, delivered: u32) -> Duration {
        let backoff = &self.transport.inner.options.backoff;
        match (backoff.first(), backoff.get((delivered as usize).clamp(1, backoff.len().max(1)) - 1)) {
            (Some(first), Some(nth)) if !delay.is_zero() => {
                delay.saturating_sub(nth.saturating_sub(*first)).max(Duration::from_millis(1))
            }
            _ => delay,
        }
    }

    /// Copies the message to the dead-letter stream, then acknowledges it.
    async fn dead_letter(&self, held: &Held, reason: &DeadLetterReason, attempts: u32) -> Result<(), TransportError> {
        let copy = self.transport.dead_letter_copy(
            &self.layout,
            &self.group,
            &held.message,
            held.stream_sequence,
            reason,
            attempts,
        );
        if let Err(e) = self.transport.publish_messages(std::slice::from_ref(&copy)).await {
            // Not kept as a dead letter: it must stay an event, and come back later.
            held.nak(self.nak_delay(Duration::from_secs(5), held.delivered)).await;
            return Err(e);
        }
        ack(held).await
    }

    /// Dead-letters a message without handing it to the runtime, keeping it alive meanwhile.
    async fn dead_letter_now(&self, held: &Held, reason: DeadLetterReason, attempts: u32) {
        tracing::error!(group = %self.group, topic = %self.layout.topic, stream_sequence = held.stream_sequence,
            error = %reason.error, "dead-lettered by the transport");
        if let Err(e) = self.alive_while(held, self.dead_letter(held, &reason, attempts)).await {
            tracing::warn!(group = %self.group, error = %e, "could not dead-letter a message; it comes again");
        }
    }
}

/// Acknowledges, and waits for the server to confirm it.
async fn ack(held: &Held) -> Result<(), TransportError> {
    held.message.double_ack().await.map_err(|e| TransportError::Unreachable {
        transport: NAME,
        reason: format!("the server did not confirm an ack: {e}"),
    })
}

/// True for a message the server delivered from the stream (not a status: heartbeat, timeout).
fn is_delivery(message: &async_nats::Message) -> bool {
    matches!(message.status, None | Some(StatusCode::OK))
}

/// A pull request for one message, to one worker's inbox.
struct PullRequest {
    client: async_nats::Client,
    subject: async_nats::Subject,
    inbox: async_nats::Subject,
    body: Bytes,
}

impl PullRequest {
    async fn send(&self) -> Result<(), async_nats::PublishError> {
        self.client.publish_with_reply(self.subject.clone(), self.inbox.clone(), self.body.clone()).await
    }
}
