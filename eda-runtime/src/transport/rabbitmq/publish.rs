//! Publishing: an event as an AMQP message (the CloudEvents binary mode), sent `mandatory` on
//! the publishing channel and waited for by its publisher confirm; batches pipelined in order.

use std::time::Duration;

use eda_core::{Binding, Envelope, TransportError};
use lapin::options::BasicPublishOptions;
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Confirmation};
use tokio::time::Instant;

use super::{other, text, RabbitTransport, NAME};
use crate::transport::keys::partition_of;

impl RabbitTransport {
    /// The properties of an event's message: CloudEvents attributes as `ce-*` headers, the
    /// content type as the property, persistent.
    fn properties(envelope: &Envelope) -> BasicProperties {
        let mut headers = FieldTable::default();
        let mut content_type = None;
        for (name, value) in envelope.headers(Binding::Amqp) {
            if name == Binding::Amqp.content_type_header() {
                content_type = Some(value);
            } else {
                headers.insert(ShortString::from(name), text(value));
            }
        }
        let properties = BasicProperties::default()
            .with_headers(headers)
            .with_delivery_mode(2)
            .with_message_id(ShortString::from(envelope.id.to_string()));
        match content_type {
            Some(ct) => properties.with_content_type(ShortString::from(ct)),
            None => properties,
        }
    }

    /// Sends one message on the publishing channel; its confirm comes later.
    async fn send(&self, m: &Outgoing<'_>) -> Result<lapin::PublisherConfirm, TransportError> {
        let link = self.link().await?;
        let options = BasicPublishOptions { mandatory: true, ..Default::default() };
        link.publish
            .basic_publish(
                m.exchange.as_str().into(),
                m.routing_key.as_str().into(),
                options,
                m.data,
                m.properties.clone(),
            )
            .await
            .map_err(other)
    }

    /// What the broker's confirm says: `Ok(None)` kept, `Ok(Some(e))` refused for good,
    /// `Err(e)` lost on the way (the connection went), to try again.
    fn confirmed(
        m: &Outgoing<'_>,
        confirmation: Result<Confirmation, TransportError>,
    ) -> Result<Option<TransportError>, TransportError> {
        let refused = |reason: String| {
            Ok(Some(TransportError::PublishRejected { transport: NAME, topic: m.topic.to_owned(), reason }))
        };
        match confirmation? {
            Confirmation::Ack(None) => Ok(None),
            Confirmation::Ack(Some(returned)) => refused(format!(
                "no queue takes it ({} {}): no consumer group has subscribed to topic `{}` on this broker yet, so the event would be lost; start the consuming services once before publishing",
                returned.reply_code, returned.reply_text, m.topic
            )),
            Confirmation::Nack(_) => refused(
                "the broker refused it (a queue of the topic is full: its length limit rejects new messages); try again once the consumers caught up".into(),
            ),
            Confirmation::NotRequested => refused("the channel was not in confirm mode, so the broker's word is unknown".into()),
        }
    }

    /// Publishes one message and waits for its confirm. A publish that the connection took
    /// down with it is tried again until the publish timeout.
    pub(super) async fn publish_message(&self, m: &Outgoing<'_>) -> Result<(), TransportError> {
        let deadline = Instant::now() + self.inner.options.publish_timeout;
        let _place = self.inner.unconfirmed.acquire().await.map_err(|_| TransportError::Closed(NAME))?;
        self.publish_held(m, deadline).await
    }

    /// [`Self::publish_message`] with its place among the unconfirmed already taken, done by
    /// `deadline` or an error.
    async fn publish_held(&self, m: &Outgoing<'_>, deadline: Instant) -> Result<(), TransportError> {
        let mut attempt = 0u32;
        loop {
            let sent = async {
                match self.send(m).await {
                    Ok(confirm) => confirm.await.map_err(other),
                    Err(e) => Err(e),
                }
            };
            // A broker that blocks publishers (a memory or disk alarm) answers nothing.
            let confirmation = match tokio::time::timeout_at(deadline, sent).await {
                Ok(confirmation) => confirmation,
                Err(_) => Err(TransportError::Closed(NAME)),
            };
            let e = match Self::confirmed(m, confirmation) {
                Ok(None) => return Ok(()),
                Ok(Some(refused)) => return Err(refused),
                Err(e) => e,
            };
            attempt += 1;
            if Instant::now() >= deadline {
                return Err(TransportError::Unreachable { transport: NAME, reason: format!(
                    "{}: publishing to `{}` failed for {:?} ({e}); publishing again may store it twice, which consumers' guards absorb",
                    self.inner.options.shown, m.exchange, self.inner.options.publish_timeout
                ) });
            }
            tracing::debug!(exchange = %m.exchange, attempt, error = %e, "publish not confirmed; trying again");
            let pause = Duration::from_millis(100).saturating_mul(attempt.min(10)).min(deadline - Instant::now());
            tokio::time::sleep(pause).await;
        }
    }

    /// Publishes messages in order, pipelined: a batch is sent without waiting, then its
    /// confirms are awaited. Those lost on the way (the connection went) are tried again one
    /// at a time, in order.
    pub(super) async fn publish_in_order(&self, messages: &[Outgoing<'_>]) -> Result<(), TransportError> {
        // One deadline for the whole batch: a broker away does not make it wait per message.
        let deadline = Instant::now() + self.inner.options.publish_timeout;
        let mut first_refusal = None;
        for chunk in messages.chunks(self.inner.options.max_unconfirmed) {
            if let Some(refused) = first_refusal {
                // Not past a refused event: its key's later events would overtake it.
                return Err(refused);
            }
            let places = u32::try_from(chunk.len()).unwrap_or(u32::MAX);
            let _places =
                self.inner.unconfirmed.acquire_many(places).await.map_err(|_| TransportError::Closed(NAME))?;
            let mut confirms = Vec::with_capacity(chunk.len());
            for m in chunk {
                // Once one could not be sent, the rest wait for their turn below.
                let sent = match confirms.last() {
                    Some(Err(_)) => Err(TransportError::Closed(NAME)),
                    _ => self.send(m).await,
                };
                confirms.push(sent);
            }
            let confirmations = futures_util::future::join_all(confirms.into_iter().map(|sent| async move {
                match sent {
                    Ok(confirm) => match tokio::time::timeout_at(deadline, confirm).await {
                        Ok(confirmation) => confirmation.map_err(other),
                        Err(_) => Err(TransportError::Closed(NAME)),
                    },
                    Err(e) => Err(e),
                }
            }))
            .await;
            for (m, confirmation) in chunk.iter().zip(confirmations) {
                let outcome = match Self::confirmed(m, confirmation) {
                    Ok(outcome) => outcome,
                    Err(_) if first_refusal.is_some() => None,
                    Err(_) => self.publish_held(m, deadline).await.err(),
                };
                if let Some(refused) = outcome {
                    first_refusal.get_or_insert(refused);
                }
            }
        }
        first_refusal.map_or(Ok(()), Err)
    }

    pub(super) async fn outgoing<'a>(&self, envelope: &'a Envelope) -> Result<Outgoing<'a>, TransportError> {
        self.ensure_topic(&envelope.topic).await?;
        let key = envelope.subject.clone().unwrap_or_else(|| envelope.id.to_string());
        let partition = partition_of(&key, self.inner.options.partitions);
        Ok(Outgoing {
            exchange: self.exchange(&envelope.topic),
            routing_key: partition.to_string(),
            topic: &envelope.topic,
            data: &envelope.data,
            properties: Self::properties(envelope),
        })
    }
}

/// One message to publish.
pub(super) struct Outgoing<'a> {
    pub exchange: String,
    pub routing_key: String,
    pub topic: &'a str,
    pub data: &'a [u8],
    pub properties: BasicProperties,
}
