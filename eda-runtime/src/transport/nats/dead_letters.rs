//! Dead letters on NATS: copies of the original messages in the dead-letter stream, on the
//! subject `<namespace>.<topic>.dlq`, with `eda-dlq-*` headers saying who gave up and why. A
//! dead letter's id is its sequence in that stream.

use std::time::{SystemTime, UNIX_EPOCH};

use async_nats::header::{NATS_EXPECTED_STREAM, NATS_MESSAGE_ID};
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{DeleteMessageErrorKind, RawMessageErrorKind};
use async_nats::jetstream::ErrorCode;
use async_nats::{HeaderMap, Subject};
use async_trait::async_trait;
use bytes::Bytes;
use eda_core::{
    Binding, DeadLetter, DeadLetterReason, DeadLetterStore, Envelope, EventId, Page, StoredDeadLetter, TransportError,
};

use super::{message_size, other, stream_missing, NatsTransport, Outgoing, TopicLayout, DEAD_LETTER_RESERVE};

use crate::transport::letters::{unreadable, AT, ATTEMPTS, ERROR, GROUP, HANDLER, PERMANENT};

const TOPIC: &str = "eda-dlq-topic";
const ORIGIN: &str = "eda-dlq-origin";
const OMITTED: &str = "eda-dlq-payload-omitted";

/// The longest error text kept (the rest of the dead letter must fit the reserve).
const MAX_ERROR: usize = 1024;
const _: () = assert!(DEAD_LETTER_RESERVE > MAX_ERROR + 2048, "room for the other eda-dlq-* headers");

/// A header value NATS can carry: one line, not too long.
fn header_value(text: &str, max: usize) -> String {
    let mut line: String = text.chars().map(|c| if c == '\r' || c == '\n' { ' ' } else { c }).collect();
    if line.len() > max {
        let mut cut = max;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
        line.push('…');
    }
    line
}

impl NatsTransport {
    /// The dead-letter copy of a message: its own headers (CloudEvents attributes and all) and
    /// payload, plus why it was given up. Its `Nats-Msg-Id` names the group and the event, so
    /// dead-lettering the same delivery twice keeps one copy (see [`Self::letter_is_kept`]).
    pub(super) fn dead_letter_copy(
        &self,
        layout: &TopicLayout,
        group: &str,
        original: &async_nats::Message,
        stream_sequence: u64,
        reason: &DeadLetterReason,
        attempts: u32,
    ) -> Outgoing<'static> {
        let mut headers = HeaderMap::new();
        for (name, values) in original.headers.iter().flat_map(|h| h.iter()) {
            let name_str: &str = name.as_ref();
            if !name_str.starts_with("Nats-") && !name_str.starts_with("eda-dlq-") {
                for v in values {
                    headers.append(name.clone(), v.clone());
                }
            }
        }
        let at = humantime::format_rfc3339_micros(SystemTime::now()).to_string();
        headers.insert(GROUP, group);
        headers.insert(TOPIC, layout.topic.as_str());
        if let Some(handler) = &reason.handler {
            headers.insert(HANDLER, header_value(handler, 512));
        }
        headers.insert(ERROR, header_value(&reason.error, MAX_ERROR));
        headers.insert(PERMANENT, if reason.permanent { "true" } else { "false" });
        headers.insert(ATTEMPTS, attempts.to_string());
        headers.insert(AT, at);
        headers.insert(ORIGIN, format!("{}:{stream_sequence}", layout.stream));
        // Named by the event, never by its place in the stream: a stream deleted and made
        // again restarts its sequences, and a letter named by one would be taken by the
        // server for an earlier event's. A message that is no eda event gets an id of its own.
        let event_id = original.headers.as_ref().and_then(|h| h.get("ce-id")).map(|v| v.as_str().to_owned());
        let id = match event_id {
            Some(event) => format!("{group}:{event}"),
            None => format!("{group}:{}:{stream_sequence}:{}", layout.stream, uuid::Uuid::new_v4().simple()),
        };
        headers.insert(NATS_MESSAGE_ID, id);
        headers.insert(NATS_EXPECTED_STREAM, self.dead_letter_stream());
        let mut payload = original.payload.clone();
        let limit = self.inner.client.server_info().max_payload;
        if message_size(&headers, payload.len()) > limit {
            // Only a message published by someone else can be this large (eda keeps
            // DEAD_LETTER_RESERVE free): keep the attributes, and say where the body still is.
            headers.insert(
                OMITTED,
                format!(
                    "{} bytes, too large to copy; the original stays in stream {} at sequence {stream_sequence} until its retention removes it",
                    payload.len(),
                    layout.stream
                ),
            );
            payload = Bytes::new();
        }
        Outgoing {
            topic: layout.topic.clone(),
            subject: Subject::from(self.dead_letter_subject(&layout.topic)),
            headers: Some(headers),
            payload,
            dead_letter: true,
            event: None,
        }
    }

    fn stored(&self, m: StreamMessage) -> StoredDeadLetter {
        let h = &m.headers;
        let get = |name: &str| h.get(name).map(|v| v.as_str().to_owned());
        let topic = get(TOPIC).unwrap_or_default();
        let data = m.payload.to_vec();
        let pairs =
            h.iter().flat_map(|(name, values)| values.iter().map(move |v| (AsRef::<str>::as_ref(name), v.as_str())));
        let envelope = Envelope::from_headers(Binding::Nats, &topic, pairs, data.clone()).unwrap_or_else(|_| {
            let get = |name: &str| h.get(name).map(|v| v.as_str().to_owned());
            // Named by where it is kept.
            let name = format!("{}:{}", self.dead_letter_stream(), m.sequence);
            let id = || EventId(uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, name.as_bytes()));
            unreadable(&get, &topic, id, data)
        });
        let at = get(AT).and_then(|t: String| humantime::parse_rfc3339_weak(&t).ok()).unwrap_or(UNIX_EPOCH);
        let mut error = get(ERROR).unwrap_or_default();
        if let Some(omitted) = get(OMITTED) {
            error.push_str(&format!(" (payload {omitted})"));
        }
        StoredDeadLetter {
            id: m.sequence,
            group: get(GROUP).unwrap_or_default(),
            letter: DeadLetter {
                envelope,
                attempts: get(ATTEMPTS).and_then(|a| a.parse().ok()).unwrap_or(1),
                reason: DeadLetterReason {
                    handler: get(HANDLER),
                    error,
                    permanent: get(PERMANENT).as_deref() == Some("true"),
                },
                at,
            },
        }
    }
}

fn no_message(e: &async_nats::error::Error<RawMessageErrorKind>) -> bool {
    match e.kind() {
        RawMessageErrorKind::NoMessageFound => true,
        RawMessageErrorKind::JetStream(js) => js.error_code() == ErrorCode::NO_MESSAGE_FOUND,
        _ => false,
    }
}

#[async_trait]
impl DeadLetterStore for NatsTransport {
    async fn dead_letter_page(&self, group: Option<&str>, page: Page) -> Result<Vec<StoredDeadLetter>, TransportError> {
        let stream = match self.inner.js.get_stream(self.dead_letter_stream()).await {
            Ok(s) => s,
            Err(e) if stream_missing(&e) => return Ok(Vec::new()),
            Err(e) => return Err(other(e)),
        };
        // get_stream fetched the info already.
        let state = stream.cached_info().state.clone();
        let mut letters = Vec::new();
        // Ids are the stream's sequence numbers.
        let (mut sequence, mut seen) = (state.first_sequence.max(page.after.saturating_add(1)).max(1), 0);
        while sequence <= state.last_sequence && seen < state.messages && letters.len() < page.limit {
            match stream.get_raw_message(sequence).await {
                Ok(m) => {
                    seen += 1;
                    let letter = self.stored(m);
                    if group.is_none_or(|g| letter.group == g) {
                        letters.push(letter);
                    }
                }
                Err(e) if no_message(&e) => {}
                Err(e) => return Err(other(e)),
            }
            sequence += 1;
        }
        Ok(letters)
    }

    async fn dead_letter(&self, id: u64) -> Result<Option<StoredDeadLetter>, TransportError> {
        let stream = match self.inner.js.get_stream_no_info(self.dead_letter_stream()).await {
            Ok(s) => s,
            Err(e) => return Err(other(e)),
        };
        match stream.get_raw_message(id).await {
            Ok(m) => Ok(Some(self.stored(m))),
            Err(e) if no_message(&e) => Ok(None),
            Err(e) if matches!(e.kind(), RawMessageErrorKind::JetStream(js) if js.error_code() == ErrorCode::STREAM_NOT_FOUND) => {
                Ok(None)
            }
            Err(e) => Err(other(e)),
        }
    }

    async fn remove_dead_letter(&self, id: u64) -> Result<bool, TransportError> {
        let stream = self.inner.js.get_stream_no_info(self.dead_letter_stream()).await.map_err(other)?;
        match stream.delete_message(id).await {
            Ok(deleted) => Ok(deleted),
            Err(e) => match e.kind() {
                // Deleting a sequence that is not there fails with 10057 ("no message found"),
                // or, once it was deleted, with 10043 ("sequence not found").
                DeleteMessageErrorKind::JetStream(js)
                    if [
                        ErrorCode::STREAM_MESSAGE_DELETE_FAILED,
                        ErrorCode::NO_MESSAGE_FOUND,
                        ErrorCode::SEQUENCE_NOT_FOUND,
                        ErrorCode::STREAM_NOT_FOUND,
                    ]
                    .contains(&js.error_code()) =>
                {
                    Ok(false)
                }
                _ => Err(other(e)),
            },
        }
    }
}

impl NatsTransport {
    /// The server called a dead letter a duplicate, pointing at `sequence`: true when a letter
    /// with that id is really kept there, and not one purged or replayed since (then the server
    /// still remembers the id within its duplicate window, and the new letter must go in under
    /// another).
    pub(super) async fn letter_is_kept(&self, sequence: u64, id: &str) -> Result<bool, TransportError> {
        let stream = self.inner.js.get_stream_no_info(self.dead_letter_stream()).await.map_err(other)?;
        match stream.get_raw_message(sequence).await {
            Ok(kept) => Ok(kept.headers.get(async_nats::header::NATS_MESSAGE_ID).is_some_and(|v| v.as_str() == id)),
            Err(e) if matches!(e.kind(), async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound) => {
                Ok(false)
            }
            Err(e) => Err(other(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_are_one_line_and_bounded() {
        assert_eq!(header_value("a\r\nb", 100), "a  b");
        let long = header_value(&"é".repeat(1000), 11);
        assert!(long.len() <= 11 + '…'.len_utf8() && long.ends_with('…'), "{long}");
    }
}
