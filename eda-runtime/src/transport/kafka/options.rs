//! How eda uses a Kafka cluster: the URL and the settings beside it.

use std::time::Duration;

use eda_core::TransportError;

use super::KafkaTransport;
use crate::engine::EngineOptions;
use crate::transport::keys::redact;

/// The settings eda reads from the query of a `kafka://` URL. A key with a `.` in it is one of
/// librdkafka's own properties (`linger.ms=20`, `sasl.mechanism=SCRAM-SHA-512`, …) and goes to
/// the client as it is.
const KNOWN: &str = "namespace, partitions, replication, window, handover_timeout, publish_timeout, session_timeout, \
     security_protocol, sasl_mechanism, sasl_username, sasl_password, ssl_ca_location, debug";

/// Settings of the Kafka transport.
///
/// ```
/// use eda::transport::kafka::KafkaOptions;
///
/// let options = KafkaOptions::new("127.0.0.1:9092").namespace("shop").partitions(8).window(512);
/// let from_url = KafkaOptions::from_url("kafka://127.0.0.1:9092?namespace=shop&partitions=8&window=512");
/// assert_eq!(from_url.expect("valid settings"), options);
/// assert!(KafkaOptions::from_url("kafka://127.0.0.1:9092?partitons=8").is_err(), "a misspelt setting is refused");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct KafkaOptions {
    /// The bootstrap servers, `host:port,host:port`.
    pub(super) brokers: String,
    pub(super) namespace: String,
    pub(super) partitions: u32,
    /// `None`: the broker's default replication factor.
    pub(super) replication: Option<u16>,
    pub(super) publish_timeout: Duration,
    pub(super) session_timeout: Duration,
    /// librdkafka properties set by the user, security settings included.
    pub(super) properties: Vec<(String, String)>,
    pub(super) engine: EngineOptions,
}

/// `s` with its `%XX` escapes decoded, as URLs carry a password's `@`, `:` or `?`; `None`
/// where a `%` starts no escape or the result is not UTF-8.
fn percent_decoded(s: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(s.len());
    let mut rest = s.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        if b == b'%' {
            let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = &tail[2..];
        } else {
            bytes.push(b);
            rest = tail;
        }
    }
    String::from_utf8(bytes).ok()
}

/// Whether a librdkafka property holds a secret: never shown.
pub(super) fn secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["password", "secret", "token", "key", "oauthbearer.config"].iter().any(|s| key.contains(s))
        && !key.ends_with(".location")
}

impl std::fmt::Debug for KafkaOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let properties: Vec<String> = self
            .properties
            .iter()
            .map(|(k, v)| if secret(k) { format!("{k}=***") } else { format!("{k}={v}") })
            .collect();
        f.debug_struct("KafkaOptions")
            .field("brokers", &self.brokers)
            .field("namespace", &self.namespace)
            .field("partitions", &self.partitions)
            .field("replication", &self.replication)
            .field("publish_timeout", &self.publish_timeout)
            .field("session_timeout", &self.session_timeout)
            .field("window", &self.engine.window)
            .field("handover_timeout", &self.engine.handover_timeout)
            .field("properties", &properties)
            .finish()
    }
}

fn config(message: impl Into<String>) -> TransportError {
    TransportError::Config { transport: super::NAME, reason: message.into() }
}

impl KafkaOptions {
    /// The defaults for the cluster whose bootstrap servers are `brokers` (`host:9092`, or
    /// several separated by commas): namespace `eda`, 4 partitions and the broker's default
    /// replication for the topics eda creates, a window of 1024 events per partition.
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            namespace: "eda".into(),
            partitions: 4,
            replication: None,
            publish_timeout: Duration::from_secs(30),
            session_timeout: Duration::from_secs(10),
            properties: Vec::new(),
            engine: EngineOptions::default(),
        }
    }

    /// Reads the settings from a URL, as the runtime does with `EDA_URL`:
    /// `kafka://host1:9092,host2:9092?namespace=shop&partitions=8`. User info in the URL
    /// (`kafka://user:password@host:9092`) is the SASL user and password, percent-encoded
    /// (`%40` for a `@`, `%3F` for a `?`). The keys are the
    /// builder methods' names; durations are written like `30s`; a key with a `.` is a
    /// librdkafka property, passed through. An unknown key is an error that lists the known ones.
    pub fn from_url(url: &str) -> Result<Self, TransportError> {
        let shown = redact(url);
        let rest = url.strip_prefix("kafka://").ok_or_else(|| {
            config(format!(
                "`{shown}` is not a Kafka URL: write `kafka://host:9092` (several hosts separated by commas)"
            ))
        })?;
        let (authority, query) = rest.split_once('?').unwrap_or((rest, ""));
        if query.split('&').any(|pair| pair.split_once('=').map_or(pair, |(k, _)| k).contains('@')) {
            // A `?` inside a password cut the URL there: nothing of it is echoed.
            return Err(config(format!(
                "`{shown}`: a setting's name holds a `@`, so a `?` in the user info cut the URL; write a password's `?` as `%3F` (and `@ : / #` as `%40 %3A %2F %23`)"
            )));
        }
        let authority = authority.trim_end_matches('/');
        let (user, brokers) = match authority.rsplit_once('@') {
            Some((user, brokers)) => (Some(user), brokers),
            None => (None, authority),
        };
        if brokers.is_empty() {
            return Err(config(format!("`{shown}` names no broker: write `kafka://host:9092`")));
        }
        let mut options = Self::new(brokers);
        if let Some(user) = user {
            let (name, password) = user.split_once(':').unwrap_or((user, ""));
            let undo = |part: &str| {
                percent_decoded(part).ok_or_else(|| {
                    config(format!(
                        "`{shown}`: the user info has a `%` that is not an escape; write `%` as `%25`, and `@ : / ? #` of a password as `%40 %3A %2F %3F %23`"
                    ))
                })
            };
            options = options.sasl(&undo(name)?, &undo(password)?);
        }
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let shown_v = if secret(k) { "***" } else { v };
            let bad = |why: &str| config(format!("`{k}={shown_v}` in the Kafka URL: {why}"));
            let number = |v: &str| v.parse::<u64>().map_err(|_| bad("not a whole number"));
            let duration = |v: &str| humantime::parse_duration(v).map_err(|e| bad(&format!("{e} (write e.g. `30s`)")));
            options = match k {
                "namespace" => options.namespace(v),
                "partitions" => options.partitions(number(v)?.try_into().map_err(|_| bad("too large"))?),
                "replication" => options.replication(number(v)?.try_into().map_err(|_| bad("too large"))?),
                "window" => options.window(number(v)?.try_into().map_err(|_| bad("too large"))?),
                "handover_timeout" => options.handover_timeout(duration(v)?),
                "publish_timeout" => options.publish_timeout(duration(v)?),
                "session_timeout" => options.session_timeout(duration(v)?),
                "security_protocol" => options.set("security.protocol", v),
                "sasl_mechanism" => options.set("sasl.mechanism", v),
                "sasl_username" => options.set("sasl.username", v),
                "sasl_password" => options.set("sasl.password", v),
                "ssl_ca_location" => options.set("ssl.ca.location", v),
                // librdkafka's own debug contexts (`debug=cgrp,fetch`), for a look inside.
                "debug" => options.set("debug", v),
                property if property.contains('.') => options.set(property, v),
                unknown => {
                    return Err(config(format!(
                        "unknown setting `{unknown}` in the Kafka URL; eda's settings are {KNOWN}, and librdkafka's properties (with a `.`) pass through"
                    )))
                }
            };
        }
        Ok(options)
    }

    /// The prefix of every topic and consumer group eda uses (`eda` by default): eda topic
    /// `orders` is the Kafka topic `eda.orders`, and group `billing` consumes it as the
    /// consumer group `eda.billing:orders`. Several applications, or tests, share a cluster without meeting.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// How many partitions a topic eda creates gets (4 by default). A topic that exists keeps
    /// its own count, which eda reads.
    pub fn partitions(mut self, n: u32) -> Self {
        self.partitions = n;
        self
    }

    /// The replication factor of the topics eda creates (by default the broker's own,
    /// `default.replication.factor`).
    pub fn replication(mut self, factor: u16) -> Self {
        self.replication = Some(factor);
        self
    }

    /// Events of one partition in flight at once (1024 by default).
    pub fn window(mut self, events: usize) -> Self {
        self.engine.window = events;
        self
    }

    /// How long a revoked partition, or a stopping subscription, waits for its events in
    /// flight before it is given up (5 min by default). The member's `max.poll.interval.ms`
    /// is set 30 s beyond it, and at least 5 min, as a revocation waits inside a poll.
    pub fn handover_timeout(mut self, timeout: Duration) -> Self {
        self.engine.handover_timeout = timeout;
        self
    }

    /// How long a publish may take, retries included, before it is an error (30 s; librdkafka's
    /// `message.timeout.ms`).
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// How long the group waits for a member that stopped answering before its partitions go
    /// to the others (10 s; `session.timeout.ms`).
    pub fn session_timeout(mut self, timeout: Duration) -> Self {
        self.session_timeout = timeout;
        self
    }

    /// SASL user and password (mechanism `PLAIN` and protocol `SASL_PLAINTEXT` unless set
    /// otherwise, e.g. `sasl_mechanism=SCRAM-SHA-512&security_protocol=sasl_ssl`).
    pub fn sasl(self, username: &str, password: &str) -> Self {
        self.set("sasl.username", username).set("sasl.password", password)
    }

    /// Sets a librdkafka property (see its CONFIGURATION.md), for the producer and the
    /// consumers alike. eda's own choices (`acks`, idempotence, manual commits) cannot be
    /// changed this way.
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        let key = key.into();
        self.properties.retain(|(k, _)| *k != key);
        self.properties.push((key, value.into()));
        self
    }

    /// Connects with these settings.
    pub async fn connect(self) -> Result<KafkaTransport, TransportError> {
        KafkaTransport::connect_with(self).await
    }

    /// The client configuration every producer and consumer starts from.
    pub(super) fn client(&self) -> rdkafka::ClientConfig {
        let mut c = rdkafka::ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        c.set("client.id", format!("eda-{}", std::process::id()));
        let user = self.properties.iter().any(|(k, _)| k == "sasl.username");
        if user {
            c.set("security.protocol", "sasl_plaintext").set("sasl.mechanism", "PLAIN");
        }
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }

    /// The configuration of a consumer client: [`Self::client`] with the session timeout.
    pub(super) fn consumer_client(&self) -> rdkafka::ClientConfig {
        let mut c = rdkafka::ClientConfig::new();
        c.set("session.timeout.ms", self.session_timeout.as_millis().to_string());
        for (k, v) in self.client().config_map().iter() {
            c.set(k, v);
        }
        c
    }

    /// Checks the settings; the error says what to change.
    pub(super) fn check(&self) -> Result<(), TransportError> {
        if !(1..=10_000).contains(&self.partitions) {
            return Err(config(format!("partitions {} is out of range: use 1 to 10000", self.partitions)));
        }
        if self.replication == Some(0) {
            return Err(config("replication 0 keeps no copy: use 1 or more"));
        }
        if !(1..=65_536).contains(&self.engine.window) {
            return Err(config(format!("window {} is out of range: use 1 to 65536 events", self.engine.window)));
        }
        let name_ok = |c: char| c.is_ascii_alphanumeric() || "-_".contains(c);
        if self.namespace.is_empty() || !self.namespace.chars().all(name_ok) {
            return Err(config(format!(
                "namespace `{}`: use letters, digits, `-` and `_` only (it prefixes topic and group names)",
                self.namespace
            )));
        }
        let fixed = ["enable.auto.commit", "enable.idempotence", "acks", "group.id", "enable.auto.offset.store"];
        if let Some((k, _)) = self.properties.iter().find(|(k, _)| fixed.contains(&k.as_str())) {
            return Err(config(format!(
                "`{k}` is eda's to set (it commits an offset only once everything before it is handled, publishes with acks=all and idempotence): leave it out"
            )));
        }
        let poll_interval = self.properties.iter().find(|(k, _)| k == "max.poll.interval.ms");
        if let Some((_, ms)) = poll_interval {
            let ms: u64 =
                ms.parse().map_err(|_| config(format!("max.poll.interval.ms={ms} is not a number of milliseconds")))?;
            if Duration::from_millis(ms) <= self.engine.handover_timeout {
                return Err(config(format!(
                    "max.poll.interval.ms={ms} must exceed handover_timeout {:?}: a revoked partition waits that long for its events while the member does not poll, and the group would drop the member",
                    self.engine.handover_timeout
                )));
            }
        }
        if self.publish_timeout < Duration::from_secs(1) || self.session_timeout < Duration::from_secs(1) {
            return Err(config("publish_timeout and session_timeout must be at least 1s"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_info_is_sasl_and_secrets_are_never_shown() {
        let o = KafkaOptions::from_url(
            "kafka://alice:s3cret@b1:9092,b2:9092?sasl_mechanism=SCRAM-SHA-512&ssl.key.password=p4ss",
        )
        .expect("valid");
        assert_eq!(o.brokers, "b1:9092,b2:9092");
        let shown = format!("{o:?}");
        assert!(!shown.contains("s3cret") && !shown.contains("p4ss"), "{shown}");
        assert!(shown.contains("sasl.username=alice") && shown.contains("SCRAM-SHA-512"), "{shown}");
        let err = KafkaOptions::from_url("kafka://b1:9092?sasl_password=oops&window=x").expect_err("bad window");
        assert!(!err.to_string().contains("oops"), "{err}");
    }

    #[test]
    fn a_password_with_url_characters_is_percent_encoded() {
        let o = KafkaOptions::from_url("kafka://al%40ce:p%3Fss%3Aw%25rd@b1:9092?namespace=shop").expect("valid");
        assert_eq!(o.brokers, "b1:9092");
        assert_eq!(o.namespace, "shop");
        let property = |k: &str| o.properties.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
        assert_eq!(property("sasl.username"), Some("al@ce"));
        assert_eq!(property("sasl.password"), Some("p?ss:w%rd"));
        let err = KafkaOptions::from_url("kafka://alice:pa?ss@b1:9092").expect_err("a raw `?`");
        assert!(err.to_string().contains("%3F") && !err.to_string().contains("pa?ss"), "{err}");
        let err = KafkaOptions::from_url("kafka://u:100%@b1:9092").expect_err("a bare %");
        assert!(err.to_string().contains("%25") && !err.to_string().contains("100%@"), "{err}");
    }

    #[test]
    fn eda_keeps_its_delivery_settings() {
        let o = KafkaOptions::new("b:9092").set("enable.auto.commit", "true");
        assert!(o.check().expect_err("refused").to_string().contains("enable.auto.commit"));
        assert!(KafkaOptions::from_url("kafka://?partitions=2").is_err(), "no broker");
        assert!(KafkaOptions::from_url("amqp://b:9092").is_err(), "not kafka");
    }
}
