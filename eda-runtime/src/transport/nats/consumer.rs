//! Consuming: what the delivery engine needs of JetStream for one group on one topic.
//!
//! A partition is read through a durable pull consumer `<group>_<n>`, filtered on the
//! partition's subject, with `AckPolicy::All` and `max_ack_pending` equal to the engine's
//! window: the server hands out up to a window of events at once, and one `+ACK` settles the
//! whole done prefix. Opening a partition makes its consumer anew from its ack floor, so that
//! whatever a former owner left unsettled comes again first and in order (a consumer's
//! delivered-but-unacknowledged events would otherwise come back only after `ack_wait`, behind
//! newer ones). Only the partition's owner (see the engine's leases) reads it.
//!
//! Messages that are not eda events are dead-lettered as they came, by the engine.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, ReplayPolicy};
use async_nats::jetstream::stream::ConsumerErrorKind;
use async_trait::async_trait;
use eda_core::{Binding, DeadLetterReason, Envelope, TransportError};
use futures_util::{StreamExt, TryStreamExt};

use super::{name_part, other, NatsTransport, TopicLayout, NAME};
use crate::engine::{Fetched, Opened, PartitionLog, Resume};

/// How long one pull request waits on the server before it is renewed.
const PULL_EXPIRES: Duration = Duration::from_secs(30);
/// How often the server says a waiting pull request is alive; missed ones end the reading, and
/// the partition is opened again.
const PULL_HEARTBEAT: Duration = Duration::from_secs(5);

/// The partitions of one topic as one group reads them.
pub(super) struct NatsPartitions {
    pub transport: NatsTransport,
    pub layout: Arc<TopicLayout>,
    pub group: String,
}

/// The engine's key prefix for a group on a topic.
pub(super) fn scope(group: &str, topic: &str) -> String {
    format!("{}.{}", name_part(group), name_part(topic))
}

impl NatsPartitions {
    fn config(&self, name: &str, partition: u32, floor: u64, window: usize) -> pull::Config {
        let o = &self.transport.inner.options;
        pull::Config {
            durable_name: Some(name.to_owned()),
            description: Some(format!(
                "eda group `{}` on topic `{}`, partition {partition}",
                self.group, self.layout.topic
            )),
            deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: floor + 1 },
            ack_policy: AckPolicy::All,
            ack_wait: o.ack_wait,
            // The engine counts deliveries and dead-letters; the server never gives up on one.
            max_deliver: -1,
            filter_subject: self.transport.subject(&self.layout.topic, partition),
            max_ack_pending: i64::try_from(window).unwrap_or(i64::MAX),
            replay_policy: ReplayPolicy::Instant,
            ..Default::default()
        }
    }

    fn envelope(&self, message: &async_nats::jetstream::Message) -> Result<Envelope, String> {
        let headers = message.headers.iter().flat_map(|h| h.iter());
        let pairs =
            headers.flat_map(|(name, values)| values.iter().map(move |v| (AsRef::<str>::as_ref(name), v.as_str())));
        Envelope::from_headers(Binding::Nats, &self.layout.topic, pairs, message.payload.to_vec())
            .map_err(|e| format!("the message is not a CloudEvents event eda can read: {e}"))
    }
}

#[async_trait]
impl PartitionLog for NatsPartitions {
    type Message = async_nats::jetstream::Message;

    fn partitions(&self) -> u32 {
        self.layout.partitions
    }

    async fn open(
        &self,
        partition: u32,
        window: usize,
        known: Resume,
        generation: u64,
    ) -> Result<Opened<Self::Message>, TransportError> {
        let js = &self.transport.inner.js;
        let stream = match js.get_stream(&self.layout.stream).await {
            Ok(s) => s,
            Err(e) if super::stream_missing(&e) => {
                // Gone with a server that came back without it: make it again.
                self.transport.forget_topic(&self.layout.topic);
                self.transport.topic(&self.layout.topic).await?;
                js.get_stream(&self.layout.stream).await.map_err(other)?
            }
            Err(e) => return Err(other(e)),
        };
        // A consumer per opening, `<group>_<n>-<generation>`: acknowledgements still on their way
        // to a former owner's consumer land nowhere, and the new consumer exists before the old
        // is removed, so no event is without a consumer in between (which would drop it from an
        // interest stream).
        let earlier = partition_consumers(&stream, &self.group, partition).await?;
        // The stream's incarnation: when it was made.
        let origin = u64::try_from(stream.cached_info().created.unix_timestamp_nanos()).unwrap_or(0);
        let floor = match earlier.iter().map(|(_, floor)| *floor).max() {
            Some(floor) => floor,
            // None left (removed by hand): start where the leases last saw the partition
            // settled, not from the beginning of the stream — unless that was in another
            // incarnation of the stream (made anew, numbering from 1 again).
            None if known.origin != 0 && known.origin == origin => known.floor,
            None => 0,
        };
        let name = format!("{}-{generation}", NatsTransport::consumer_name(&self.group, partition));
        let mut consumer = stream
            .create_consumer(self.config(&name, partition, floor, window))
            .await
            .map_err(|e| consumer_refused(&self.layout.stream, &name, e))?;
        // Only older openings go: a newer one belongs to an owner that took the partition while
        // this one was opening it.
        let older = |old: &str| partition_of_consumer(&self.group, old).is_some_and(|(_, g)| g < generation);
        for (old, _) in earlier.iter().filter(|(old, _)| older(old)) {
            if let Err(e) = stream.delete_consumer(old).await {
                tracing::warn!(stream = %self.layout.stream, consumer = %old, error = %e, "could not remove a former consumer of a partition; the next opening tries again");
            }
        }
        let backlog = consumer.info().await.map(|i| i.num_pending > 0).unwrap_or(true);
        let messages = consumer
            .stream()
            .max_messages_per_batch((window / 2).max(1))
            .expires(PULL_EXPIRES)
            .heartbeat(PULL_HEARTBEAT)
            .messages()
            .await
            .map_err(other)?;
        let this = NatsPartitions {
            transport: self.transport.clone(),
            layout: self.layout.clone(),
            group: self.group.clone(),
        };
        // Consumer sequences count every delivery: one skipped means deliveries were lost on the
        // way (a reconnect), and what follows would overtake them. End there; it is opened again.
        let mut expected = 1u64;
        let messages = messages.map(move |m| {
            let message = m.map_err(other)?;
            let info = message.info().map_err(|e| other(std::io::Error::other(e.to_string())))?;
            let (offset, sequence) = (info.stream_sequence, info.consumer_sequence);
            if sequence != expected {
                return Err(TransportError::Unreachable {
                    transport: NAME,
                    reason: format!(
                        "deliveries {expected} to {} of consumer `{}` were lost on the way",
                        sequence.saturating_sub(1),
                        info.consumer
                    ),
                });
            }
            expected += 1;
            Ok(Fetched { offset, event: this.envelope(&message), message, delivered: 0 })
        });
        // The first error ends the reading.
        let messages = messages.scan(false, |failed, m| {
            let item = (!*failed).then(|| {
                *failed = m.is_err();
                m
            });
            std::future::ready(item)
        });
        Ok(Opened { floor, origin, backlog, messages: Box::pin(messages) })
    }

    async fn settle(&self, message: &Self::Message, confirm: bool) -> Result<(), TransportError> {
        let acked = if confirm { message.double_ack().await } else { message.ack().await };
        acked.map_err(|e| TransportError::Unreachable { transport: NAME, reason: format!("an ack was not taken: {e}") })
    }

    async fn dead_letter(
        &self,
        message: &Self::Message,
        reason: &DeadLetterReason,
        attempts: u32,
    ) -> Result<(), TransportError> {
        let sequence = message.info().map(|i| i.stream_sequence).unwrap_or_default();
        let mut copy = self.transport.dead_letter_copy(&self.layout, &self.group, message, sequence, reason, attempts);
        self.transport.publish_one(&mut copy).await
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
                "NATS refuses consumer `{name}` on stream `{stream}`: {js}; remove it (`nats consumer rm {stream} {name}`) and eda creates it again"
            ),
        },
        _ => other(e),
    }
}

/// Which partition of `group` a consumer name serves, and the generation it was made in
/// (0 for the one-per-partition consumers of earlier versions).
pub(super) fn partition_of_consumer(group: &str, name: &str) -> Option<(u32, u64)> {
    let prefix = format!("{}_", super::name_part(group));
    let tail = name.strip_prefix(&prefix)?;
    let (partition, generation) = match tail.split_once('-') {
        Some((p, g)) => (p, g.parse().ok()?),
        None => (tail, 0),
    };
    Some((partition.parse().ok()?, generation))
}

/// The consumers of `group` on `partition` in `stream`, with their ack floors.
async fn partition_consumers(
    stream: &async_nats::jetstream::stream::Stream,
    group: &str,
    partition: u32,
) -> Result<Vec<(String, u64)>, TransportError> {
    let infos: Vec<_> = stream.consumers().try_collect().await.map_err(other)?;
    Ok(infos
        .into_iter()
        .filter(|i| partition_of_consumer(group, &i.name).is_some_and(|(p, _)| p == partition))
        .map(|i| (i.name.clone(), i.ack_floor.stream_sequence))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::partition_of_consumer;

    #[test]
    fn consumer_names_say_partition_and_generation_of_their_group_only() {
        assert_eq!(partition_of_consumer("billing", "billing_3-41"), Some((3, 41)));
        assert_eq!(partition_of_consumer("billing", "billing_3"), Some((3, 0)), "a consumer of earlier versions");
        assert_eq!(partition_of_consumer("billing", "billing_x_3-41"), None, "another group's");
        assert_eq!(partition_of_consumer("b", "b_1_2-5"), None, "group `b_1`'s, not `b`'s");
        assert_eq!(partition_of_consumer("b_1", "b_1_2-5"), Some((2, 5)));
        assert_eq!(partition_of_consumer("billing", "billing_3-x"), None);
    }
}
