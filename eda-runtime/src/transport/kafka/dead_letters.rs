//! Dead letters on Kafka: each topic's in `<namespace>.<topic>.dlq`, one partition, keyed by
//! the letter's id — the original record with `eda-dlq-*` headers.
//!
//! A log cannot delete a record: removing a letter writes a tombstone (its key without a value),
//! and a listing reads every dead-letter topic of the namespace through, leaving out letters
//! with a tombstone. Give the topics `cleanup.policy=compact` to let the broker drop them too.
//! A letter's id is when it was made, in microseconds, shifted left by 8 bits, with 8 random
//! bits that tell letters of one microsecond apart: ids sort as the letters were made.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use eda_core::{DeadLetter, DeadLetterReason, DeadLetterStore, EventId, Page, StoredDeadLetter, TransportError};
use rdkafka::consumer::{BaseConsumer, Consumer, DefaultConsumerContext};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::time::Instant;

use super::consumer::{envelope, Record};
use super::{blocking, other, refused, KafkaTransport, REQUEST_TIMEOUT};
use crate::transport::keys::fnv1a;
use crate::transport::letters::{cut, letter_id, unreadable, AT, ATTEMPTS, ERROR, GROUP, HANDLER, PERMANENT};

const ID: &str = "eda-dlq-id";

/// A header's value as text.
fn header(headers: Option<&OwnedHeaders>, name: &str) -> Option<String> {
    let h = headers?.iter().find(|h| h.key == name)?;
    Some(String::from_utf8_lossy(h.value?).into_owned())
}

impl KafkaTransport {
    /// The dead-letter topic of an eda topic.
    fn dead_letter_topic(&self, topic: &str) -> String {
        format!("{}.dlq", self.topic_name(topic))
    }

    /// Keeps `record` as a dead letter of `group`: the original, with why it was given up.
    pub(super) async fn keep_dead_letter(
        &self,
        topic: &str,
        group: &str,
        record: &Record,
        reason: &DeadLetterReason,
        attempts: u32,
    ) -> Result<(), TransportError> {
        let dlq = self.dead_letter_topic(topic);
        self.ensure_topic_named(&dlq, 1).await?;
        let mut headers = OwnedHeaders::new();
        for h in record.headers.iter().flat_map(|h| h.iter()) {
            if !h.key.starts_with("eda-dlq-") {
                headers = headers.insert(Header { key: h.key, value: h.value });
            }
        }
        let at = SystemTime::now();
        let id = letter_id(at, fastrand::u64(..));
        let mut add = |key: &str, value: String| {
            headers = std::mem::take(&mut headers).insert(Header { key, value: Some(value.as_bytes()) });
        };
        add(GROUP, group.to_owned());
        if let Some(handler) = &reason.handler {
            add(HANDLER, cut(handler, 512));
        }
        add(ERROR, cut(&reason.error, 4096));
        add(PERMANENT, reason.permanent.to_string());
        add(ATTEMPTS, attempts.to_string());
        add(AT, humantime::format_rfc3339_micros(at).to_string());
        add(ID, id.to_string());
        let key = id.to_string();
        let letter = FutureRecord::to(&dlq).key(key.as_str()).payload(record.payload.as_slice()).headers(headers);
        let mut pending = Vec::with_capacity(1);
        self.send(letter, &mut pending).await?;
        for delivery in pending {
            self.delivered(&dlq, delivery).await?;
        }
        Ok(())
    }

    /// Every letter of the namespace's dead-letter topics not removed, by id, with the topic
    /// it is in.
    async fn scan(&self) -> Result<BTreeMap<u64, (String, StoredDeadLetter)>, TransportError> {
        let prefix = format!("{}.", self.options().namespace);
        let topics: Vec<String> =
            self.metadata(None).await?.into_keys().filter(|t| t.starts_with(&prefix) && t.ends_with(".dlq")).collect();
        let mut config = self.options().consumer_client();
        config
            .set("group.id", format!("{}.eda-dlq-reader", self.options().namespace))
            .set("enable.auto.commit", "false");
        let reader: BaseConsumer<DefaultConsumerContext> = config.create().map_err(refused)?;
        let transport = self.clone();
        blocking(move || {
            let mut letters = BTreeMap::new();
            for dlq in topics {
                transport.read_dead_letters(&reader, &dlq, &mut letters)?;
            }
            Ok(letters)
        })
        .await?
    }

    /// Reads one dead-letter topic through, into `letters`.
    fn read_dead_letters(
        &self,
        reader: &BaseConsumer<DefaultConsumerContext>,
        dlq: &str,
        letters: &mut BTreeMap<u64, (String, StoredDeadLetter)>,
    ) -> Result<(), TransportError> {
        let (low, high) = reader.fetch_watermarks(dlq, 0, REQUEST_TIMEOUT).map_err(other)?;
        if high <= low {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(dlq, 0, Offset::Beginning).map_err(other)?;
        reader.assign(&tpl).map_err(other)?;
        let topic = dlq.strip_prefix(&format!("{}.", self.options().namespace)).unwrap_or(dlq);
        let topic = topic.strip_suffix(".dlq").unwrap_or(topic).to_owned();
        let deadline = Instant::now() + REQUEST_TIMEOUT * 3;
        while Instant::now() < deadline {
            let Some(polled) = reader.poll(Duration::from_millis(200)) else { continue };
            let m = polled.map_err(other)?;
            let id = m.key().and_then(|k| std::str::from_utf8(k).ok()).and_then(|k| k.parse::<u64>().ok());
            match (id, m.payload()) {
                (Some(id), None) => {
                    letters.remove(&id);
                }
                (id, payload) => {
                    let headers = m.headers().map(|h| h.detach());
                    let letter = self.stored(&topic, id, headers.as_ref(), payload.unwrap_or_default().to_vec());
                    letters.insert(letter.id, (dlq.to_owned(), letter));
                }
            }
            if m.offset() + 1 >= high {
                reader.unassign().map_err(other)?;
                return Ok(());
            }
        }
        reader.unassign().map_err(other)?;
        Err(TransportError::Unreachable {
            transport: super::NAME,
            reason: format!(
                "reading the dead letters of `{dlq}` did not reach its end within {:?}",
                REQUEST_TIMEOUT * 3
            ),
        })
    }

    /// A dead letter as read from its topic.
    fn stored(&self, topic: &str, id: Option<u64>, headers: Option<&OwnedHeaders>, data: Vec<u8>) -> StoredDeadLetter {
        let get = |name: &str| header(headers, name);
        let envelope = envelope(topic, headers, data.clone()).unwrap_or_else(|_| {
            // The binding's names: `ce_id`, not `ce-id`.
            let kafka = |name: &str| get(&name.replacen("ce-", "ce_", 1));
            let id = || EventId(uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, &fnv1a(&[topic]).to_be_bytes()));
            unreadable(&kafka, topic, id, data)
        });
        let at = get(AT).and_then(|t| humantime::parse_rfc3339_weak(&t).ok()).unwrap_or(UNIX_EPOCH);
        let id = id.or_else(|| get(ID)?.parse().ok()).unwrap_or_else(|| {
            let h = fnv1a(&[&envelope.id.to_string(), topic]);
            letter_id(at + Duration::from_micros(h % 1_000_000), h >> 56)
        });
        StoredDeadLetter {
            id,
            group: get(GROUP).unwrap_or_default(),
            letter: DeadLetter {
                envelope,
                attempts: get(ATTEMPTS).and_then(|a| a.parse().ok()).unwrap_or(1),
                reason: DeadLetterReason {
                    handler: get(HANDLER),
                    error: get(ERROR).unwrap_or_else(|| "dead-lettered without a reason recorded".into()),
                    permanent: get(PERMANENT).as_deref() == Some("true"),
                },
                at,
            },
        }
    }
}

#[async_trait]
impl DeadLetterStore for KafkaTransport {
    async fn dead_letter_page(&self, group: Option<&str>, page: Page) -> Result<Vec<StoredDeadLetter>, TransportError> {
        let letters = self.scan().await?;
        let wanted =
            letters.into_values().map(|(_, l)| l).filter(|l| l.id > page.after && group.is_none_or(|g| l.group == g));
        Ok(wanted.take(page.limit).collect())
    }

    async fn dead_letter(&self, id: u64) -> Result<Option<StoredDeadLetter>, TransportError> {
        Ok(self.scan().await?.remove(&id).map(|(_, l)| l))
    }

    async fn remove_dead_letter(&self, id: u64) -> Result<bool, TransportError> {
        let Some((dlq, _)) = self.scan().await?.remove(&id) else { return Ok(false) };
        let key = id.to_string();
        let tombstone: FutureRecord<'_, str, [u8]> = FutureRecord::to(&dlq).key(key.as_str());
        let mut pending = Vec::with_capacity(1);
        self.send(tombstone, &mut pending).await?;
        for delivery in pending {
            self.delivered(&dlq, delivery).await?;
        }
        Ok(true)
    }
}
