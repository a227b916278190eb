//! Dead letters on RabbitMQ: every one in the quorum queue `<namespace>.dlq`, through the
//! dead-letter exchange with the topic as routing key — copies eda makes of the messages it
//! gives up on (with `eda-dlq-*` headers), and messages the broker gives up on after its
//! delivery limit (with its `x-death` headers).
//!
//! A queue has no random access: listing reads the queue through without settling and lets
//! the channel go, so every letter goes back; removing one acknowledges it alone. A letter's
//! id is when it was made, in microseconds, shifted left by 8 bits, with 8 bits that tell
//! letters of one microsecond apart: ids sort as the letters were made.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use eda_core::{DeadLetter, DeadLetterReason, DeadLetterStore, EventId, Page, StoredDeadLetter, TransportError};
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::BasicProperties;

use super::consumer::{envelope, Held};
use super::publish::Outgoing;
use super::{as_number, as_text, other, text, RabbitTransport};
use crate::transport::keys::fnv1a;

use crate::transport::letters::{cut, letter_id, unreadable, AT, ATTEMPTS, ERROR, GROUP, HANDLER, PERMANENT};

const ID: &str = "eda-dlq-id";

/// The most letters one listing reads.
const MAX_SCAN: u32 = 100_000;

impl RabbitTransport {
    /// Keeps `message` as a dead letter of `group`: the original, with why it was given up.
    pub(super) async fn keep_dead_letter(
        &self,
        topic: &str,
        group: &str,
        message: &Held,
        reason: &DeadLetterReason,
        attempts: u32,
    ) -> Result<(), TransportError> {
        self.ensure_dead_letters().await?;
        let mut headers = FieldTable::default();
        if let Some(original) = message.properties.headers() {
            for (name, value) in original.inner() {
                if !name.as_str().starts_with("x-") && !name.as_str().starts_with("eda-dlq-") {
                    headers.insert(name.clone(), value.clone());
                }
            }
        }
        let at = SystemTime::now();
        headers.insert(GROUP.into(), text(group));
        if let Some(handler) = &reason.handler {
            headers.insert(HANDLER.into(), text(cut(handler, 512)));
        }
        headers.insert(ERROR.into(), text(cut(&reason.error, 4096)));
        headers.insert(PERMANENT.into(), AMQPValue::Boolean(reason.permanent));
        headers.insert(ATTEMPTS.into(), AMQPValue::LongLongInt(i64::from(attempts)));
        headers.insert(AT.into(), text(humantime::format_rfc3339_micros(at).to_string()));
        let id = letter_id(at, fastrand::u64(..));
        headers.insert(ID.into(), AMQPValue::LongLongInt(id as i64));
        let properties = message.properties.clone().with_headers(headers).with_delivery_mode(2);
        let letter = Outgoing {
            exchange: self.dead_letter_exchange(),
            routing_key: topic.to_owned(),
            topic,
            data: &message.data,
            properties,
        };
        self.publish_message(&letter).await
    }

    /// A dead letter as read from the queue.
    fn stored(&self, routing_key: &str, properties: &BasicProperties, data: Vec<u8>) -> StoredDeadLetter {
        let empty = FieldTable::default();
        let h = properties.headers().as_ref().unwrap_or(&empty).inner();
        let get = |name: &str| h.get(name).and_then(as_text).map(str::to_owned);
        let topic = routing_key.to_owned();
        let envelope = envelope(&topic, properties, data.clone()).unwrap_or_else(|_| {
            let id = || EventId(uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, &fnv1a(&[&topic]).to_be_bytes()));
            unreadable(&get, &topic, id, data)
        });
        // The broker's own: the first x-death says where, why and when.
        let death = h.get("x-death").and_then(|d| match d {
            AMQPValue::FieldArray(a) => a.as_slice().first().and_then(|f| match f {
                AMQPValue::FieldTable(t) => Some(t.inner().clone()),
                _ => None,
            }),
            _ => None,
        });
        let death_field = |name: &str| death.as_ref().and_then(|d| d.get(name));
        let at = match get(AT).and_then(|t| humantime::parse_rfc3339_weak(&t).ok()) {
            Some(at) => at,
            None => death_field("time")
                .and_then(as_number)
                .map_or(UNIX_EPOCH, |s| UNIX_EPOCH + Duration::from_secs(u64::try_from(s).unwrap_or(0))),
        };
        let prefix = format!("{}.{topic}.", self.options().namespace);
        let group = get(GROUP).or_else(|| {
            let queue = death_field("queue").and_then(as_text)?;
            let rest = queue.strip_prefix(&prefix)?;
            Some(rest.rsplit_once('.').map_or(rest, |(g, _)| g).to_owned())
        });
        let id = h.get(ID).and_then(as_number).map(|n| n as u64).unwrap_or_else(|| {
            // The broker's time has seconds only: the hash fills the microseconds, so that
            // letters of one second keep ids of their own.
            let h = fnv1a(&[&envelope.id.to_string(), group.as_deref().unwrap_or("")]);
            letter_id(at + Duration::from_micros(h % 1_000_000), h >> 56)
        });
        let broker_reason = death_field("reason").and_then(as_text).map(str::to_owned);
        let (error, attempts) = match (get(ERROR), broker_reason) {
            (Some(error), _) => (error, h.get(ATTEMPTS).and_then(as_number).unwrap_or(1)),
            (None, Some(why)) => {
                let limit = i64::from(self.options().engine.max_deliver) + 1;
                (format!("the broker dead-lettered it ({why}): its consumers died holding it {limit} times"), limit)
            }
            (None, None) => ("dead-lettered without a reason recorded".to_owned(), 1),
        };
        StoredDeadLetter {
            id,
            group: group.unwrap_or_default(),
            letter: DeadLetter {
                envelope,
                attempts: u32::try_from(attempts).unwrap_or(1),
                reason: DeadLetterReason {
                    handler: get(HANDLER),
                    error,
                    permanent: matches!(h.get(PERMANENT), Some(AMQPValue::Boolean(true))),
                },
                at,
            },
        }
    }

    /// Reads the dead-letter queue through on a channel of its own, without settling: the
    /// letters, with their delivery tags on that channel. Letting the channel go puts them all
    /// back.
    async fn scan(&self) -> Result<(lapin::Channel, Vec<(u64, StoredDeadLetter)>), TransportError> {
        self.ensure_dead_letters().await?;
        let channel = self.channel().await?;
        let queue = self.dead_letter_queue();
        let mut letters = Vec::new();
        for _ in 0..MAX_SCAN {
            let got = channel.basic_get(ShortString::from(queue.as_str()), BasicGetOptions { no_ack: false });
            let Some(got) = got.await.map_err(other)? else { break };
            let d = got.delivery;
            letters.push((d.delivery_tag, self.stored(d.routing_key.as_str(), &d.properties, d.data)));
        }
        letters.sort_by_key(|(_, l)| l.id);
        Ok((channel, letters))
    }

    /// Puts back every letter `scan` read but `kept`, before the channel goes: the next
    /// reader finds them in the queue.
    async fn give_back(&self, channel: lapin::Channel, letters: &[(u64, StoredDeadLetter)], kept: Option<u64>) {
        // One nack for all: `multiple` covers every tag up to the last still unsettled.
        let last = letters.iter().map(|(tag, _)| *tag).filter(|tag| Some(*tag) != kept).max();
        if let Some(last) = last {
            let back = BasicNackOptions { multiple: true, requeue: true };
            if let Err(e) = channel.basic_nack(last, back).await {
                tracing::debug!(error = %e, "the dead letters go back with their channel");
            }
        }
        let _ = channel.close(200, "OK".into()).await;
    }
}

#[async_trait]
impl DeadLetterStore for RabbitTransport {
    async fn dead_letter_page(&self, group: Option<&str>, page: Page) -> Result<Vec<StoredDeadLetter>, TransportError> {
        let (channel, letters) = self.scan().await?;
        self.give_back(channel, &letters, None).await;
        let wanted =
            letters.into_iter().map(|(_, l)| l).filter(|l| l.id > page.after && group.is_none_or(|g| l.group == g));
        Ok(wanted.take(page.limit).collect())
    }

    async fn dead_letter(&self, id: u64) -> Result<Option<StoredDeadLetter>, TransportError> {
        let (channel, letters) = self.scan().await?;
        self.give_back(channel, &letters, None).await;
        Ok(letters.into_iter().map(|(_, l)| l).find(|l| l.id == id))
    }

    async fn remove_dead_letter(&self, id: u64) -> Result<bool, TransportError> {
        let (channel, letters) = self.scan().await?;
        let found = letters.iter().find(|(_, l)| l.id == id).map(|(tag, _)| *tag);
        let removed = match found {
            Some(tag) => {
                channel.basic_ack(tag, BasicAckOptions { multiple: false }).await.map_err(other).map(|()| true)
            }
            None => Ok(false),
        };
        self.give_back(channel, &letters, found).await;
        removed
    }
}
