//! What the broker transports keep with a dead letter beside the original message, the same
//! on every broker: the `eda-dlq-*` header names, and the envelope of a letter that is not a
//! readable eda event.

use std::time::{SystemTime, UNIX_EPOCH};

use eda_core::{CorrelationId, Envelope, EventId};

/// The group that gave up.
pub(crate) const GROUP: &str = "eda-dlq-group";
/// The handler that gave up, if one did.
pub(crate) const HANDLER: &str = "eda-dlq-handler";
/// Why.
pub(crate) const ERROR: &str = "eda-dlq-error";
/// Whether it was dead-lettered without retries.
pub(crate) const PERMANENT: &str = "eda-dlq-permanent";
/// After how many attempts.
pub(crate) const ATTEMPTS: &str = "eda-dlq-attempts";
/// When, as RFC 3339.
pub(crate) const AT: &str = "eda-dlq-at";

/// An envelope for a dead letter that is not a readable eda event: what its headers (`get`)
/// have, with `id` where it has none.
pub(crate) fn unreadable(
    get: &dyn Fn(&str) -> Option<String>,
    topic: &str,
    id: impl FnOnce() -> EventId,
    data: Vec<u8>,
) -> Envelope {
    let id = get("ce-id").and_then(|id| id.parse().ok()).unwrap_or_else(id);
    Envelope {
        id,
        source: get("ce-source").unwrap_or_else(|| "unknown".into()),
        ty: get("ce-type").unwrap_or_else(|| "unknown".into()),
        time: UNIX_EPOCH,
        subject: get("ce-subject"),
        topic: topic.to_owned(),
        datacontenttype: get("content-type").unwrap_or_else(|| "application/octet-stream".into()),
        correlation_id: CorrelationId(get("ce-correlationid").unwrap_or_else(|| id.to_string())),
        causation_id: None,
        traceparent: get("ce-traceparent"),
        data,
    }
}

/// A dead letter's id: when it was made, in microseconds, shifted left by 8 bits, with 8 bits
/// of `salt` that tell letters of one microsecond apart, so that ids sort as letters were made.
pub(crate) fn letter_id(at: SystemTime, salt: u64) -> u64 {
    let micros = at.duration_since(UNIX_EPOCH).unwrap_or_default().as_micros() as u64;
    (micros << 8) | (salt & 0xff)
}

/// `text` cut to at most `max` bytes, on a character boundary: what a header can hold.
pub(crate) fn cut(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}
