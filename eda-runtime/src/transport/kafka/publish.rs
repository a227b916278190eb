//! Publishing: an event as a Kafka record (the CloudEvents binary mode), keyed by the event's
//! key, pipelined through the idempotent producer and waited for by its delivery report.

use std::time::Duration;

use eda_core::{Binding, Envelope, TransportError};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureRecord};

use super::{KafkaTransport, NAME};

/// The record headers of an event: its CloudEvents attributes as `ce_*`, and `content-type`.
pub(super) fn headers(envelope: &Envelope) -> OwnedHeaders {
    let attributes = envelope.headers(Binding::Kafka);
    let mut headers = OwnedHeaders::new_with_capacity(attributes.len());
    for (name, value) in &attributes {
        headers = headers.insert(Header { key: name, value: Some(value.as_str()) });
    }
    headers
}

/// The record key of an event: its key (the subject), or its id for events without one.
pub(super) fn key(envelope: &Envelope) -> String {
    envelope.subject.clone().unwrap_or_else(|| envelope.id.to_string())
}

impl KafkaTransport {
    /// Hands a record to the producer, waiting while its queue is full.
    pub(super) async fn send(
        &self,
        mut record: FutureRecord<'_, str, [u8]>,
        pending: &mut Vec<DeliveryFuture>,
    ) -> Result<(), TransportError> {
        loop {
            match self.producer().send_result(record) {
                Ok(delivery) => {
                    pending.push(delivery);
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // Full of records on their way: wait for the oldest, or for a moment.
                    record = back;
                    if pending.is_empty() {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    } else {
                        let oldest = pending.remove(0);
                        self.delivered(record.topic, oldest).await?;
                    }
                }
                Err((e, back)) => return Err(self.refused(back.topic, &e)),
            }
        }
    }

    /// Waits for a record's delivery report.
    pub(super) async fn delivered(&self, topic: &str, delivery: DeliveryFuture) -> Result<(), TransportError> {
        match delivery.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((e, _))) => Err(self.refused(topic, &e)),
            Err(_) => Err(TransportError::Closed(NAME)),
        }
    }

    fn refused(&self, topic: &str, e: &KafkaError) -> TransportError {
        match e.rdkafka_error_code() {
            Some(RDKafkaErrorCode::MessageTimedOut | RDKafkaErrorCode::RequestTimedOut) => TransportError::Unreachable {
                transport: NAME,
                reason: format!(
                    "Kafka at {}: a record for `{topic}` was not stored within {:?} ({e}); check that the brokers run — publishing again may store it twice, which consumers' guards absorb",
                    self.options().brokers,
                    self.options().publish_timeout
                ),
            },
            _ => TransportError::PublishRejected { transport: NAME, topic: topic.to_owned(), reason: e.to_string() },
        }
    }

    /// Publishes events in order, pipelined: every record is handed to the producer before
    /// any delivery report is awaited. The idempotent producer keeps each partition's records
    /// in order across its retries; the first failure is the error.
    pub(super) async fn publish_in_order(&self, envelopes: &[Envelope]) -> Result<(), TransportError> {
        let mut pending = Vec::with_capacity(envelopes.len());
        let mut topics = Vec::with_capacity(envelopes.len());
        for e in envelopes {
            self.ensure_topic(&e.topic).await?;
            let topic = self.topic_name(&e.topic);
            let key = key(e);
            let record = FutureRecord::to(&topic).key(key.as_str()).payload(e.data.as_slice()).headers(headers(e));
            self.send(record, &mut pending).await?;
            topics.push(topic);
        }
        let mut first = None;
        let skipped = topics.len() - pending.len();
        for (topic, delivery) in topics.iter().skip(skipped).zip(pending) {
            if let Err(e) = self.delivered(topic, delivery).await {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}
