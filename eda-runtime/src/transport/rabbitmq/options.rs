//! How eda uses a RabbitMQ broker: the URL and the settings beside it.

use std::time::Duration;

use eda_core::TransportError;

use super::RabbitTransport;
use crate::engine::EngineOptions;
use crate::transport::keys::redact;

/// The settings eda reads from the query of an `amqp://` URL; the AMQP client's own
/// (`heartbeat`, `connection_timeout`, `channel_max`, `frame_max`, `auth_mechanism`) go to it.
const KNOWN: &str = "namespace, partitions, max_deliver, window, max_unconfirmed, publish_timeout, handover_timeout, \
     member_heartbeat, member_ttl";
const CLIENT: [&str; 5] = ["heartbeat", "connection_timeout", "channel_max", "frame_max", "auth_mechanism"];

/// Settings of the RabbitMQ transport.
///
/// ```
/// use std::time::Duration;
/// use eda::transport::rabbitmq::RabbitOptions;
///
/// let options = RabbitOptions::new("amqp://guest:guest@127.0.0.1:5672/%2f")
///     .namespace("shop")
///     .partitions(8)
///     .window(512);
/// let from_url = RabbitOptions::from_url("amqp://guest:guest@127.0.0.1:5672/%2f?namespace=shop&partitions=8&window=512");
/// assert_eq!(from_url.expect("valid settings"), options);
/// assert!(RabbitOptions::from_url("amqp://127.0.0.1?partitons=8").is_err(), "a misspelt setting is refused");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct RabbitOptions {
    /// The URL given to the AMQP client: eda's settings taken out of its query.
    pub(super) url: String,
    /// The URL as messages and logs show it: without its password.
    pub(super) shown: String,
    pub(super) namespace: String,
    pub(super) partitions: u32,
    pub(super) max_unconfirmed: usize,
    pub(super) publish_timeout: Duration,
    pub(super) engine: EngineOptions,
}

impl std::fmt::Debug for RabbitOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitOptions")
            .field("url", &self.shown)
            .field("namespace", &self.namespace)
            .field("partitions", &self.partitions)
            .field("max_unconfirmed", &self.max_unconfirmed)
            .field("publish_timeout", &self.publish_timeout)
            .field("window", &self.engine.window)
            .field("max_deliver", &self.engine.max_deliver)
            .field("handover_timeout", &self.engine.handover_timeout)
            .field("member_heartbeat", &self.engine.heartbeat)
            .field("member_ttl", &self.engine.lease_ttl)
            .finish()
    }
}

fn config(message: impl Into<String>) -> TransportError {
    TransportError::Config { transport: super::NAME, reason: message.into() }
}

impl RabbitOptions {
    /// The defaults for the broker at `url` (`amqp://user:password@host:5672/vhost`, or
    /// `amqps://…` for TLS): namespace `eda`, 4 partitions per topic, a window of 1024 events
    /// per partition, 256 publishes unconfirmed at once.
    pub fn new(url: impl Into<String>) -> Self {
        let url = url.into();
        Self {
            shown: redact(&url),
            url,
            namespace: "eda".into(),
            partitions: 4,
            max_unconfirmed: 256,
            publish_timeout: Duration::from_secs(30),
            engine: EngineOptions::default(),
        }
    }

    /// Reads the settings from the URL's query, as the runtime does with `EDA_URL`:
    /// `amqp://guest:guest@host:5672/%2f?namespace=shop&partitions=8`. The keys are the builder
    /// methods' names; durations are written like `30s`. The AMQP client's own settings
    /// (`heartbeat=10`, `connection_timeout=5000`, …) pass through to it. An unknown key is an
    /// error that lists the known ones.
    pub fn from_url(url: &str) -> Result<Self, TransportError> {
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut options = Self::new(base);
        let mut passed = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let bad = |why: &str| config(format!("`{k}={v}` in the RabbitMQ URL: {why}"));
            let number = |v: &str| v.parse::<u64>().map_err(|_| bad("not a whole number"));
            let duration = |v: &str| humantime::parse_duration(v).map_err(|e| bad(&format!("{e} (write e.g. `30s`)")));
            options = match k {
                "namespace" => options.namespace(v),
                "partitions" => options.partitions(number(v)?.try_into().map_err(|_| bad("too large"))?),
                "max_deliver" => options.max_deliver(number(v)?.try_into().map_err(|_| bad("too large"))?),
                "window" => options.window(number(v)?.try_into().map_err(|_| bad("too large"))?),
                "max_unconfirmed" => options.max_unconfirmed(number(v)?.try_into().map_err(|_| bad("too large"))?),
                "publish_timeout" => options.publish_timeout(duration(v)?),
                "handover_timeout" => options.handover_timeout(duration(v)?),
                "member_heartbeat" => options.member_heartbeat(duration(v)?),
                "member_ttl" => options.member_ttl(duration(v)?),
                client if CLIENT.contains(&client) => {
                    passed.push(pair);
                    options
                }
                unknown => {
                    return Err(config(format!(
                        "unknown setting `{unknown}` in the RabbitMQ URL; eda's settings are {KNOWN}, the client's {}",
                        CLIENT.join(", ")
                    )))
                }
            };
        }
        if !passed.is_empty() {
            options.url = format!("{base}?{}", passed.join("&"));
            options.shown = redact(&options.url);
        }
        Ok(options)
    }

    /// The prefix of every exchange and queue eda declares (`eda` by default), so that several
    /// applications, or tests, share a broker without meeting.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// How many partitions (quorum queues per group) a new topic gets (4 by default). Every
    /// instance must agree: the topic's exchange records the number, and a different one is
    /// refused at start.
    pub fn partitions(mut self, n: u32) -> Self {
        self.partitions = n;
        self
    }

    /// Deliveries of one event without settlement (its handlers crash the process) before it
    /// is dead-lettered without being handed out again (20 by default). The queues' delivery
    /// limit is five times this (at least 100), so the broker gives up on an event only when
    /// eda could not.
    pub fn max_deliver(mut self, n: u32) -> Self {
        self.engine.max_deliver = n;
        self
    }

    /// Events of one partition in flight at once (1024 by default, at most 65535: the
    /// consumer's prefetch).
    pub fn window(mut self, events: usize) -> Self {
        self.engine.window = events;
        self
    }

    /// Publishes sent and not yet confirmed by the broker at once (256 by default).
    pub fn max_unconfirmed(mut self, publishes: usize) -> Self {
        self.max_unconfirmed = publishes;
        self
    }

    /// How long a publish may take, reconnecting included, before it is an error (30 s).
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// How long a stopping subscription waits for its events in flight (5 min by default).
    pub fn handover_timeout(mut self, timeout: Duration) -> Self {
        self.engine.handover_timeout = timeout;
        self
    }

    /// How often each instance says it is there to the others of its group (2 s by default):
    /// a joining instance gets its share of the partitions about this soon.
    pub fn member_heartbeat(mut self, every: Duration) -> Self {
        self.engine.heartbeat = every;
        self
    }

    /// How long an instance not heard from counts as live (10 s by default): an instance that
    /// dies without a word loses its share of the partitions' preference after this long (the
    /// broker moves its partitions at once, as its channels close).
    pub fn member_ttl(mut self, ttl: Duration) -> Self {
        self.engine.lease_ttl = ttl;
        self
    }

    /// Connects with these settings.
    pub async fn connect(self) -> Result<RabbitTransport, TransportError> {
        RabbitTransport::connect_with(self).await
    }

    /// Checks the settings against each other; the error says what to change.
    pub(super) fn check(&self) -> Result<(), TransportError> {
        if !(1..=1024).contains(&self.partitions) {
            return Err(config(format!("partitions {} is out of range: use 1 to 1024", self.partitions)));
        }
        self.engine
            .check()
            .map_err(|e| config(e.replace("heartbeat", "member_heartbeat").replace("lease_ttl", "member_ttl")))?;
        if !(1..=65_535).contains(&self.engine.window) {
            return Err(config(format!(
                "window {} is out of range: use 1 to 65535 events (the broker's prefetch)",
                self.engine.window
            )));
        }
        if self.max_unconfirmed == 0 {
            return Err(config("max_unconfirmed 0 would never publish: use 1 or more"));
        }
        if self.engine.max_deliver == 0 {
            return Err(config("max_deliver 0 would dead-letter every event: use 1 or more"));
        }
        let name_ok = |c: char| c.is_ascii_alphanumeric() || "-_".contains(c);
        if self.namespace.is_empty() || !self.namespace.chars().all(name_ok) {
            return Err(config(format!(
                "namespace `{}`: use letters, digits, `-` and `_` only (it prefixes exchange and queue names)",
                self.namespace
            )));
        }
        Ok(())
    }
}
