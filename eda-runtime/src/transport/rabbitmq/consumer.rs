//! Consuming: what the delivery engine needs of RabbitMQ for one group on one topic.
//!
//! A partition is read by a consumer of its quorum queue on a channel of its own, with the
//! engine's window as the prefetch; the queue's single active consumer makes the broker hand
//! the partition to one instance of the group at a time. The delivery tag is the offset: one
//! `basic.ack` with `multiple` settles the done prefix of that channel, which holds no other
//! queue's messages. Opening a partition makes a new channel and consumer: whatever the
//! former one left unsettled comes again, first and in order.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use eda_core::{Binding, DeadLetterReason, Envelope, TransportError};
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;

use super::{as_number, as_text, other, RabbitTransport};
use crate::engine::{Fetched, Opened, PartitionLog, Resume};

/// The partitions of one topic as one group reads them.
pub(super) struct RabbitPartitions {
    pub transport: RabbitTransport,
    pub topic: String,
    pub group: String,
    pub unsettled: Arc<[Unsettled]>,
}

/// The highest delivery tag delivered and settled on a partition's current channel (tags are
/// contiguous there): their difference is what this instance holds unsettled.
#[derive(Debug, Default)]
pub(super) struct Unsettled {
    delivered: AtomicU64,
    settled: AtomicU64,
}

impl Unsettled {
    pub(super) fn count(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed).saturating_sub(self.settled.load(Ordering::Relaxed))
    }
}

/// A partition's channel, closed once nothing holds it: its messages not settled by then go
/// back to their queue, and stop counting as this instance's.
pub(super) struct HeldChannel {
    channel: lapin::Channel,
    /// The consumer, kept until the channel is closed: dropped earlier, it would be cancelled
    /// while its unsettled messages are still out, and the broker would make the next consumer
    /// active on the newer messages first — ahead of those, which come back only with the close.
    consumer: Option<lapin::Consumer>,
    unsettled: Arc<[Unsettled]>,
    partition: usize,
    /// Channels closing now, which the transport's `close` waits for.
    closing: Arc<AtomicUsize>,
}

impl Drop for HeldChannel {
    fn drop(&mut self) {
        let (channel, unsettled, p, closing) =
            (self.channel.clone(), self.unsettled.clone(), self.partition, self.closing.clone());
        let consumer = self.consumer.take();
        let forget = move || {
            if let Some(u) = unsettled.get(p) {
                u.delivered.store(0, Ordering::Relaxed);
                u.settled.store(0, Ordering::Relaxed);
            }
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return forget() };
        closing.fetch_add(1, Ordering::AcqRel);
        runtime.spawn(async move {
            let _ = channel.close(200, "OK".into()).await;
            drop(consumer);
            forget();
            closing.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

/// A message as the engine holds it: enough to settle it, or to keep it as a dead letter.
pub(super) struct Held {
    channel: Arc<HeldChannel>,
    tag: u64,
    partition: u32,
    pub(super) properties: BasicProperties,
    pub(super) data: Vec<u8>,
}

/// The envelope of a message, from its `ce-*` headers and `content-type` property.
pub(super) fn envelope(topic: &str, properties: &BasicProperties, data: Vec<u8>) -> Result<Envelope, String> {
    let headers = properties.headers().as_ref();
    let pairs = headers.into_iter().flat_map(|h| h.inner().iter()).filter_map(|(k, v)| Some((k.as_str(), as_text(v)?)));
    let content_type = properties.content_type().as_ref().map(|ct| (Binding::Amqp.content_type_header(), ct.as_str()));
    Envelope::from_headers(Binding::Amqp, topic, pairs.chain(content_type), data)
        .map_err(|e| format!("the message is not a CloudEvents event eda can read: {e}"))
}

#[async_trait]
impl PartitionLog for RabbitPartitions {
    type Message = Held;

    fn partitions(&self) -> u32 {
        self.transport.options().partitions
    }

    async fn open(&self, partition: u32, window: usize, _: Resume, _: u64) -> Result<Opened<Held>, TransportError> {
        let channel = self.transport.channel().await?;
        // Declared again at every opening: a broker that lost it (deleted by hand) has it back.
        let queue = self.transport.declare_queue(&channel, &self.topic, &self.group, partition).await?;
        let prefetch = u16::try_from(window).unwrap_or(u16::MAX);
        channel.basic_qos(prefetch, BasicQosOptions::default()).await.map_err(other)?;
        let consumer = channel
            .basic_consume(queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .map_err(other)?;
        let held = Arc::new(HeldChannel {
            channel,
            consumer: Some(consumer.clone()),
            unsettled: self.unsettled.clone(),
            partition: partition as usize,
            closing: self.transport.closing(),
        });
        let topic = self.topic.clone();
        let unsettled = self.unsettled.clone();
        // A new channel numbers its deliveries from 1.
        if let Some(u) = unsettled.get(partition as usize) {
            u.delivered.store(0, Ordering::Relaxed);
            u.settled.store(0, Ordering::Relaxed);
        }
        let messages = consumer.map(move |delivery| {
            let delivery = delivery.map_err(other)?;
            if let Some(u) = unsettled.get(partition as usize) {
                u.delivered.fetch_max(delivery.delivery_tag, Ordering::Relaxed);
            }
            let properties = delivery.properties;
            // Missing on a first delivery.
            let delivered = properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get("x-delivery-count"))
                .and_then(as_number)
                .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX));
            let event = envelope(&topic, &properties, delivery.data.clone());
            let message =
                Held { channel: held.clone(), tag: delivery.delivery_tag, partition, properties, data: delivery.data };
            Ok(Fetched { offset: delivery.delivery_tag, event, message, delivered })
        });
        Ok(Opened { floor: 0, origin: 0, backlog: false, messages: Box::pin(messages) })
    }

    async fn settle(&self, message: &Held, _confirm: bool) -> Result<(), TransportError> {
        // AMQP has no confirm of an ack: once written, the broker has it unless the channel is
        // gone, and then the messages come again.
        message.channel.channel.basic_ack(message.tag, BasicAckOptions { multiple: true }).await.map_err(other)?;
        if let Some(u) = self.unsettled.get(message.partition as usize) {
            u.settled.fetch_max(message.tag, Ordering::Relaxed);
        }
        Ok(())
    }

    async fn dead_letter(
        &self,
        message: &Held,
        reason: &DeadLetterReason,
        attempts: u32,
    ) -> Result<(), TransportError> {
        self.transport.keep_dead_letter(&self.topic, &self.group, message, reason, attempts).await
    }
}
