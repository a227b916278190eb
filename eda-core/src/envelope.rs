//! The envelope every event travels in: CloudEvents 1.0 attributes plus the payload.

use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::EnvelopeError;
use crate::event::PendingEvent;

/// The CloudEvents `specversion` eda writes.
pub const SPEC_VERSION: &str = "1.0";

/// The unique id of one event (CloudEvents `id`).
///
/// Events published by application code get a UUIDv7 (time-ordered). Events emitted by a
/// handler get an id derived from the handled event, the handler and the position of the
/// event among those it emitted, so a handling that is repeated after a crash emits the same
/// ids again and downstream idempotency guards absorb the repeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EventId(pub Uuid);

impl EventId {
    /// A fresh, time-ordered id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// The id of the `index`-th event emitted by `handler` of `group` while handling `cause`.
    pub fn derived(cause: EventId, group: &str, handler: &str, index: usize) -> Self {
        let name = format!("{group}/{handler}/{index}");
        Self(Uuid::new_v5(&cause.0, name.as_bytes()))
    }
}

impl Default for EventId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for EventId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(Self)
    }
}

/// The id shared by every event of one business transaction (one checkout, one saga).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CorrelationId(pub String);

impl CorrelationId {
    /// A fresh correlation id.
    pub fn new() -> Self {
        Self(Uuid::now_v7().to_string())
    }
}

impl Default for CorrelationId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for CorrelationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for CorrelationId {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

impl From<String> for CorrelationId {
    fn from(s: String) -> Self {
        Self(s)
    }
}

/// An event with its CloudEvents attributes, as it is stored and sent.
///
/// ```
/// use eda_core::{event, Envelope, Event, PendingEvent};
/// use serde::{Deserialize, Serialize};
///
/// #[event(topic = "orders", key = order_id)]
/// #[derive(Serialize, Deserialize)]
/// struct OrderConfirmed { order_id: u32 }
///
/// let root = Envelope::root("shop", PendingEvent::new(&OrderConfirmed { order_id: 1 }).unwrap(), None);
/// assert_eq!(root.ty, "OrderConfirmed.v1");
/// assert_eq!(root.subject.as_deref(), Some("1"));
/// assert_eq!(root.correlation_id.0, root.id.to_string());
///
/// let next = PendingEvent::new(&OrderConfirmed { order_id: 1 }).unwrap();
/// let child = Envelope::derived(&root, "shop", "billing", "charge", 0, next);
/// assert_eq!(child.causation_id, Some(root.id));
/// assert_eq!(child.correlation_id, root.correlation_id);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// CloudEvents `id`.
    pub id: EventId,
    /// CloudEvents `source`: the service that published it.
    pub source: String,
    /// CloudEvents `type`: `<event name>.v<version>`.
    #[serde(rename = "type")]
    pub ty: String,
    /// CloudEvents `time`.
    #[serde(with = "time_format")]
    pub time: SystemTime,
    /// CloudEvents `subject`: the partition key.
    pub subject: Option<String>,
    /// The topic the event is published on (a transport attribute, not a CloudEvents one).
    pub topic: String,
    /// CloudEvents `datacontenttype`.
    pub datacontenttype: String,
    /// Extension `correlationid`.
    pub correlation_id: CorrelationId,
    /// Extension `causationid`: the id of the event whose handling emitted this one.
    pub causation_id: Option<EventId>,
    /// Extension `traceparent` (W3C trace context).
    pub traceparent: Option<String>,
    /// The encoded event.
    pub data: Vec<u8>,
}

impl Envelope {
    /// Envelopes an event published by application code: a new id, and a new correlation id
    /// unless one is given (then the event joins that business transaction).
    pub fn root(source: &str, event: PendingEvent, correlation: Option<CorrelationId>) -> Self {
        let id = EventId::new();
        let correlation_id = correlation.unwrap_or_else(|| CorrelationId(id.to_string()));
        let trace_id = Uuid::new_v4().simple().to_string();
        let traceparent = Some(trace::traceparent(&trace_id, id));
        Self::build(id, source, event, correlation_id, None, traceparent)
    }

    /// Envelopes an event emitted by `handler` of `group` while it handled `cause`: it keeps
    /// the cause's correlation id and trace, and names the cause as its causation.
    pub fn derived(
        cause: &Envelope,
        source: &str,
        group: &str,
        handler: &str,
        index: usize,
        event: PendingEvent,
    ) -> Self {
        let id = EventId::derived(cause.id, group, handler, index);
        let traceparent = match cause.traceparent.as_deref().and_then(trace::trace_id) {
            Some(trace_id) => trace::traceparent(trace_id, id),
            None => trace::traceparent(&Uuid::new_v4().simple().to_string(), id),
        };
        let traceparent = Some(traceparent);
        Self::build(id, source, event, cause.correlation_id.clone(), Some(cause.id), traceparent)
    }

    fn build(
        id: EventId,
        source: &str,
        event: PendingEvent,
        correlation_id: CorrelationId,
        causation_id: Option<EventId>,
        traceparent: Option<String>,
    ) -> Self {
        Self {
            id,
            source: source.to_owned(),
            ty: event.info.ce_type.to_owned(),
            time: now_micros(),
            subject: event.key,
            topic: event.info.topic.to_owned(),
            datacontenttype: crate::codec::JSON.to_owned(),
            correlation_id,
            causation_id,
            traceparent,
            data: event.data,
        }
    }

    /// The event name and version of the CloudEvents `type`, when it has eda's `<name>.v<N>`
    /// form.
    pub fn name_and_version(&self) -> Option<(&str, u32)> {
        let (name, version) = self.ty.rsplit_once(".v")?;
        Some((name, version.parse().ok()?))
    }

    /// The CloudEvents attributes in binary content mode: `(header name, value)` pairs with the
    /// given binding's prefix, plus the content type.
    pub fn headers(&self, binding: Binding) -> Vec<(&'static str, String)> {
        let n = binding.attribute_names();
        let mut h = Vec::with_capacity(10);
        h.push((n[0], SPEC_VERSION.to_owned()));
        h.push((n[1], self.id.to_string()));
        h.push((n[2], self.source.clone()));
        h.push((n[3], self.ty.clone()));
        h.push((n[4], humantime::format_rfc3339_micros(self.time).to_string()));
        h.push((n[6], self.correlation_id.0.clone()));
        if let Some(s) = &self.subject {
            h.push((n[5], s.clone()));
        }
        if let Some(c) = &self.causation_id {
            h.push((n[7], c.to_string()));
        }
        if let Some(t) = &self.traceparent {
            h.push((n[8], t.clone()));
        }
        h.push((binding.content_type_header(), self.datacontenttype.clone()));
        h
    }

    /// Reads an envelope back from binary-mode headers, as written by [`Envelope::headers`] or
    /// by any CloudEvents producer using the same binding.
    pub fn from_headers<'a>(
        binding: Binding,
        topic: &str,
        headers: impl IntoIterator<Item = (&'a str, &'a str)>,
        data: Vec<u8>,
    ) -> Result<Self, EnvelopeError> {
        // Read in place: names compared without case, nothing copied but what is kept.
        let p = binding.prefix();
        let mut found: [Option<&str>; ATTRIBUTES.len()] = [None; ATTRIBUTES.len()];
        let mut content_type = None;
        for (name, value) in headers {
            if name.eq_ignore_ascii_case(binding.content_type_header()) {
                content_type = Some(value);
            } else if let Some(attr) =
                name.get(..p.len()).filter(|h| h.eq_ignore_ascii_case(p)).map(|_| &name[p.len()..])
            {
                if let Some(i) = ATTRIBUTES.iter().position(|a| attr.eq_ignore_ascii_case(a)) {
                    found[i] = Some(value);
                }
            }
        }
        let mut take = |name: &'static str| -> Option<&str> {
            ATTRIBUTES.iter().position(|a| *a == name).and_then(|i| found[i].take())
        };
        let spec = take("specversion").ok_or(EnvelopeError::Missing("specversion"))?;
        if spec != SPEC_VERSION {
            return Err(invalid("specversion", spec, "eda reads CloudEvents 1.0"));
        }
        let raw_id = take("id").ok_or(EnvelopeError::Missing("id"))?;
        let id = raw_id.parse().map_err(|e: uuid::Error| invalid("id", raw_id, &e.to_string()))?;
        let source = take("source").ok_or(EnvelopeError::Missing("source"))?.to_owned();
        let ty = take("type").ok_or(EnvelopeError::Missing("type"))?.to_owned();
        let time = match take("time") {
            Some(t) => crate::time::parse_rfc3339(t).map_err(|e| invalid("time", t, &e))?,
            None => SystemTime::now(),
        };
        let causation_id = match take("causationid") {
            Some(c) => Some(c.parse().map_err(|e: uuid::Error| invalid("causationid", c, &e.to_string()))?),
            None => None,
        };
        let correlation_id = CorrelationId(take("correlationid").unwrap_or(raw_id).to_owned());
        Ok(Self {
            id,
            source,
            ty,
            time,
            subject: take("subject").map(str::to_owned),
            topic: topic.to_owned(),
            datacontenttype: content_type.unwrap_or(crate::codec::JSON).to_owned(),
            correlation_id,
            causation_id,
            traceparent: take("traceparent").map(str::to_owned),
            data,
        })
    }
}

/// The CloudEvents attributes eda reads from headers (after the binding's prefix).
const ATTRIBUTES: [&str; 9] =
    ["specversion", "id", "source", "type", "time", "subject", "correlationid", "causationid", "traceparent"];

/// Now, to the microsecond: the precision every binding carries, so an envelope reads back
/// equal to the one that was published.
fn now_micros() -> SystemTime {
    let since = SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    std::time::UNIX_EPOCH + std::time::Duration::from_micros(since.as_micros() as u64)
}

fn invalid(attribute: &'static str, value: &str, reason: &str) -> EnvelopeError {
    EnvelopeError::Invalid { attribute, value: value.to_owned(), reason: reason.to_owned() }
}

/// A CloudEvents protocol binding for binary content mode: how attribute headers are named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binding {
    /// Kafka: `ce_<attr>` headers, `content-type`.
    Kafka,
    /// AMQP 0-9-1 (RabbitMQ): `ce-<attr>` headers; the content type travels as a property.
    Amqp,
    /// NATS (server ≥ 2.2): `ce-<attr>` headers, `content-type`.
    Nats,
}

impl Binding {
    /// The attribute header prefix.
    pub fn prefix(self) -> &'static str {
        match self {
            Binding::Kafka => "ce_",
            Binding::Amqp | Binding::Nats => "ce-",
        }
    }

    /// The header names of the attributes eda writes, in the order of `ATTRIBUTES`.
    fn attribute_names(self) -> [&'static str; ATTRIBUTES.len()] {
        match self {
            Binding::Kafka => [
                "ce_specversion",
                "ce_id",
                "ce_source",
                "ce_type",
                "ce_time",
                "ce_subject",
                "ce_correlationid",
                "ce_causationid",
                "ce_traceparent",
            ],
            Binding::Amqp | Binding::Nats => [
                "ce-specversion",
                "ce-id",
                "ce-source",
                "ce-type",
                "ce-time",
                "ce-subject",
                "ce-correlationid",
                "ce-causationid",
                "ce-traceparent",
            ],
        }
    }

    /// The name of the content-type header.
    pub fn content_type_header(self) -> &'static str {
        "content-type"
    }
}

mod time_format {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_micros(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let s = String::deserialize(d)?;
        crate::time::parse_rfc3339(&s).map_err(serde::de::Error::custom)
    }
}

/// W3C trace context helpers.
pub mod trace {
    use super::EventId;

    /// A `traceparent` header value for `trace_id`, with a span id taken from the event id.
    pub fn traceparent(trace_id: &str, span_of: EventId) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut value = String::with_capacity(3 + trace_id.len() + 1 + 16 + 3);
        value.push_str("00-");
        value.push_str(trace_id);
        value.push('-');
        // The last 8 bytes of a UUIDv7/v5 are its most random ones.
        for b in &span_of.0.as_bytes()[8..] {
            value.push(char::from(HEX[usize::from(b >> 4)]));
            value.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        value.push_str("-01");
        value
    }

    /// The trace id of a `traceparent` value, when it is well formed.
    pub fn trace_id(traceparent: &str) -> Option<&str> {
        let mut parts = traceparent.split('-');
        let (_version, trace, span) = (parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
        (hex(trace, 32) && hex(span, 16)).then_some(trace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventInfo;

    fn sample() -> Envelope {
        let info = EventInfo {
            name: "OrderConfirmed",
            version: 2,
            ce_type: "OrderConfirmed.v2",
            topic: "orders",
            path: "shop::OrderConfirmed",
        };
        let pending = PendingEvent { info, key: Some("o-1".into()), data: b"{}".to_vec() };
        Envelope::root("shop", pending, None)
    }

    #[test]
    fn headers_round_trip_for_every_binding() {
        let env = sample();
        for binding in [Binding::Kafka, Binding::Amqp, Binding::Nats] {
            let headers = env.headers(binding);
            let back = Envelope::from_headers(
                binding,
                "orders",
                headers.iter().map(|(k, v)| (*k, v.as_str())),
                env.data.clone(),
            )
            .expect("valid headers");
            assert_eq!(back, env);
        }
        assert!(env.headers(Binding::Kafka).iter().any(|(k, _)| *k == "ce_id"));
        assert!(env.headers(Binding::Nats).iter().any(|(k, _)| *k == "ce-id"));
        for binding in [Binding::Kafka, Binding::Nats] {
            let names = binding.attribute_names();
            for (name, attribute) in names.iter().zip(ATTRIBUTES) {
                assert_eq!(*name, format!("{}{attribute}", binding.prefix()), "names in the order of ATTRIBUTES");
            }
        }
    }

    #[test]
    fn missing_and_invalid_attributes_are_reported() {
        let err = Envelope::from_headers(Binding::Nats, "t", [("ce-specversion", "1.0")], vec![]);
        assert_eq!(err, Err(EnvelopeError::Missing("id")));
        let err = Envelope::from_headers(
            Binding::Nats,
            "t",
            [("ce-specversion", "1.0"), ("ce-id", "nope"), ("ce-source", "s"), ("ce-type", "X.v1")],
            vec![],
        );
        assert!(matches!(err, Err(EnvelopeError::Invalid { attribute: "id", .. })));
    }

    #[test]
    fn a_time_with_an_offset_or_in_lowercase_is_read_as_its_instant() {
        let id = "01a23d1b-2d25-71b5-9de4-e4e102afca27";
        let read = |time: &str| {
            let headers =
                [("ce-specversion", "1.0"), ("ce-id", id), ("ce-source", "s"), ("ce-type", "X.v1"), ("ce-time", time)];
            Envelope::from_headers(Binding::Nats, "t", headers, vec![]).map(|e| e.time)
        };
        let utc = read("2026-03-01T10:00:00Z").expect("UTC");
        // Without a fraction this was refused (dead-lettered); with one, read two hours off.
        assert_eq!(read("2026-03-01T12:00:00+02:00"), Ok(utc));
        assert_eq!(read("2026-03-01T12:00:00.000+02:00"), Ok(utc));
        assert_eq!(read("2026-03-01t10:00:00z"), Ok(utc));
    }

    #[test]
    fn a_traceparent_is_version_trace_span_and_flags_in_lower_case_hex() {
        let id = EventId(Uuid::from_bytes([0, 1, 2, 3, 4, 5, 6, 7, 0x8a, 0x9b, 0xac, 0xbd, 0xce, 0xdf, 0xe0, 0xf1]));
        let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
        assert_eq!(trace::traceparent(trace_id, id), "00-4bf92f3577b34da6a3ce929d0e0e4736-8a9bacbdcedfe0f1-01");
        assert_eq!(trace::trace_id(&trace::traceparent(trace_id, id)), Some(trace_id));
    }

    #[test]
    fn derived_events_keep_the_trace_and_have_stable_ids() {
        let root = sample();
        let pending = || PendingEvent {
            info: EventInfo { name: "A", version: 1, ce_type: "A.v1", topic: "a", path: "tests::A" },
            key: None,
            data: vec![],
        };
        let a = Envelope::derived(&root, "svc", "g", "h", 0, pending());
        let again = Envelope::derived(&root, "svc", "g", "h", 0, pending());
        let other = Envelope::derived(&root, "svc", "g", "h", 1, pending());
        assert_eq!(a.id, again.id);
        assert_ne!(a.id, other.id);
        let root_trace = trace::trace_id(root.traceparent.as_deref().unwrap_or_default());
        assert_eq!(trace::trace_id(a.traceparent.as_deref().unwrap_or_default()), root_trace);
        assert_ne!(a.traceparent, root.traceparent);
        assert_eq!(root.name_and_version(), Some(("OrderConfirmed", 2)));
    }
}
