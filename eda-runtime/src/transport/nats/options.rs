//! Settings of the NATS transport, from a builder or from a URL's query.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use eda_core::TransportError;

/// What a topic's stream keeps: every event until its limits remove it (`Limits`, the default:
/// a consumer group created later still reads the whole history), or only until every
/// existing consumer group has acknowledged it (`Interest`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retention {
    /// Kept until `max_age`, `max_bytes` or `max_messages` removes it.
    Limits,
    /// Removed once every consumer group that exists has acknowledged it. An event published
    /// while no group has subscribed yet is not kept at all, and a group that subscribes later
    /// starts from what is published after.
    Interest,
}

/// Where the server keeps a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    /// On disk (the default): survives a server restart.
    File,
    /// In the server's memory: lost when it stops.
    Memory,
}

#[derive(Clone, PartialEq, Eq)]
pub(super) enum Credentials {
    None,
    UserPassword(String, String),
    Token(String),
    /// An nkey seed.
    NKey(String),
    /// A `.creds` file (JWT and nkey seed).
    File(PathBuf),
}

/// Settings of a [`NatsTransport`](super::NatsTransport).
///
/// ```
/// use std::time::Duration;
/// use eda::transport::nats::NatsOptions;
///
/// let options = NatsOptions::new("nats://127.0.0.1:4222")
///     .namespace("shop")
///     .partitions(32)
///     .ack_wait(Duration::from_secs(10))
///     .max_deliver(5);
/// # let _ = options;
/// // The same from a URL alone, as `EDA_URL` gives it:
/// let from_url = NatsOptions::from_url("nats://127.0.0.1:4222?namespace=shop&partitions=32&ack_wait=10s&max_deliver=5");
/// assert!(from_url.is_ok());
/// let typo = NatsOptions::from_url("nats://127.0.0.1:4222?partitons=32").err().expect("unknown setting");
/// assert!(typo.to_string().contains("partitons"));
/// ```
#[derive(Clone)]
pub struct NatsOptions {
    pub(super) servers: Vec<String>,
    pub(super) credentials: Credentials,
    pub(super) tls_required: bool,
    pub(super) tls_root_certificates: Option<PathBuf>,
    pub(super) tls_client_certificate: Option<(PathBuf, PathBuf)>,
    pub(super) name: Option<String>,
    pub(super) namespace: String,
    pub(super) partitions: u32,
    pub(super) ack_wait: Duration,
    pub(super) retention: Retention,
    pub(super) storage: Storage,
    pub(super) max_age: Option<Duration>,
    pub(super) max_bytes: Option<u64>,
    pub(super) max_messages: Option<u64>,
    pub(super) replicas: usize,
    pub(super) duplicate_window: Duration,
    pub(super) publish_timeout: Duration,
    pub(super) connection_timeout: Duration,
    pub(super) max_unconfirmed: usize,
    /// The delivery engine: window, leases, handover.
    pub(super) engine: crate::engine::EngineOptions,
    /// The URL as given, secrets hidden: for messages.
    pub(super) shown: String,
}

impl fmt::Debug for NatsOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let credentials = match &self.credentials {
            Credentials::None => "none",
            Credentials::UserPassword(..) => "user and password",
            Credentials::Token(_) => "token",
            Credentials::NKey(_) => "nkey",
            Credentials::File(_) => "credentials file",
        };
        f.debug_struct("NatsOptions")
            .field("url", &self.shown)
            .field("credentials", &credentials)
            .field("tls_required", &self.tls_required)
            .field("namespace", &self.namespace)
            .field("partitions", &self.partitions)
            .field("ack_wait", &self.ack_wait)
            .field("max_deliver", &self.engine.max_deliver)
            .field("retention", &self.retention)
            .field("storage", &self.storage)
            .field("max_age", &self.max_age)
            .field("duplicate_window", &self.duplicate_window)
            .field("window", &self.engine.window)
            .field("lease_ttl", &self.engine.lease_ttl)
            .field("heartbeat", &self.engine.heartbeat)
            .field("handover_timeout", &self.engine.handover_timeout)
            .finish_non_exhaustive()
    }
}

const KNOWN: &str = "namespace, partitions, ack_wait, max_deliver, retention, storage, max_age, max_bytes, \
     max_messages, replicas, duplicate_window, publish_timeout, connection_timeout, name, creds, nkey_file, \
     tls_required, tls_ca, tls_cert, tls_key, window, lease_ttl, heartbeat, handover_timeout, max_unconfirmed";

impl NatsOptions {
    /// Options for the servers at `url`: `nats://host:4222` (several as
    /// `nats://a:4222,b:4222`), `nats://user:password@host:4222` or `nats://token@host:4222` for
    /// credentials, `tls://host:4222` to require TLS. Settings in the URL's query are not read
    /// here: see [`from_url`](Self::from_url).
    pub fn new(url: impl Into<String>) -> Self {
        let url = url.into();
        let (servers, credentials, tls_required) = split_url(&url);
        Self {
            servers,
            credentials,
            tls_required,
            tls_root_certificates: None,
            tls_client_certificate: None,
            name: None,
            namespace: "eda".into(),
            partitions: 16,
            ack_wait: Duration::from_secs(30),
            retention: Retention::Limits,
            storage: Storage::File,
            max_age: Some(Duration::from_secs(7 * 24 * 3600)),
            max_bytes: None,
            max_messages: None,
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            publish_timeout: Duration::from_secs(10),
            connection_timeout: Duration::from_secs(5),
            max_unconfirmed: 4096,
            engine: crate::engine::EngineOptions::default(),
            shown: String::new(),
        }
        .shown()
    }

    /// Fills in `shown`: the servers, with the user's name but never a password or token.
    fn shown(mut self) -> Self {
        let userinfo = match &self.credentials {
            Credentials::UserPassword(user, _) => format!("{user}:***@"),
            Credentials::Token(_) => "***@".to_owned(),
            _ => String::new(),
        };
        let mut servers = self.servers.iter();
        self.shown = match servers.next().and_then(|first| first.split_once("://")) {
            Some((scheme, host)) => {
                let rest: Vec<&str> = servers.map(String::as_str).collect();
                let rest = if rest.is_empty() { String::new() } else { format!(",{}", rest.join(",")) };
                format!("{scheme}://{userinfo}{host}{rest}")
            }
            None => "(no server)".to_owned(),
        };
        self
    }

    /// Options from a URL and the settings in its query, for configurations that are one URL
    /// (`EDA_URL`): `nats://host:4222?namespace=shop&partitions=32&ack_wait=10s`. The keys are
    /// the builder methods' names — `namespace`, `partitions`, `ack_wait`, `max_deliver`,
    /// `retention`, `storage`, `max_age`, `max_bytes`, `max_messages`, `replicas`,
    /// `duplicate_window`, `publish_timeout`, `connection_timeout`, `max_unconfirmed`, `window`,
    /// `lease_ttl`, `heartbeat`, `handover_timeout` — and `name` (the connection
    /// name), `creds` (a `.creds` file), `nkey_file` (a file holding an nkey seed),
    /// `tls_required`, `tls_ca`, `tls_cert` and `tls_key`. Durations are written `10s`, `500ms`,
    /// `7d`; `max_age=none` keeps events until another limit removes them.
    /// A user and password or a token go in the URL itself. An unknown key is an error, so a
    /// typo does not pass silently.
    pub fn from_url(url: &str) -> Result<Self, TransportError> {
        let mut options = Self::new(url);
        let Some((_, query)) = url.split_once('?') else { return Ok(options) };
        let mut cert = None;
        let mut key = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v);
            let bad = |why: &str| config(format!("`{k}={v}` in the NATS URL: {why}"));
            let duration = |v: &str| humantime::parse_duration(v).map_err(|e| bad(&format!("{e} (write e.g. `10s`)")));
            let number = |v: &str| v.parse::<u64>().map_err(|_| bad("not a whole number"));
            options = match k {
                "namespace" => options.namespace(v),
                "partitions" => options.partitions(number(&v)?.try_into().map_err(|_| bad("too large"))?),
                "ack_wait" => options.ack_wait(duration(&v)?),
                "max_deliver" => options.max_deliver(number(&v)?.try_into().map_err(|_| bad("too large"))?),
                "retention" => options.retention(match v.as_str() {
                    "limits" => Retention::Limits,
                    "interest" => Retention::Interest,
                    _ => return Err(bad("write `limits` or `interest`")),
                }),
                "storage" => options.storage(match v.as_str() {
                    "file" => Storage::File,
                    "memory" => Storage::Memory,
                    _ => return Err(bad("write `file` or `memory`")),
                }),
                "max_age" if v == "none" => options.max_age(None),
                "max_age" => options.max_age(Some(duration(&v)?)),
                "max_bytes" => options.max_bytes(Some(number(&v)?)),
                "max_messages" => options.max_messages(Some(number(&v)?)),
                "replicas" => options.replicas(number(&v)? as usize),
                "duplicate_window" => options.duplicate_window(duration(&v)?),
                "publish_timeout" => options.publish_timeout(duration(&v)?),
                "connection_timeout" => options.connection_timeout(duration(&v)?),
                "name" => options.connection_name(v),
                "max_unconfirmed" => options.max_unconfirmed(number(&v)?.try_into().map_err(|_| bad("too large"))?),
                "window" => options.window(number(&v)?.try_into().map_err(|_| bad("too large"))?),
                "lease_ttl" => options.lease_ttl(duration(&v)?),
                "heartbeat" => options.heartbeat(duration(&v)?),
                "handover_timeout" => options.handover_timeout(duration(&v)?),
                "creds" => options.credentials_file(v),
                "nkey_file" => {
                    let seed =
                        std::fs::read_to_string(&v).map_err(|e| bad(&format!("cannot read the seed file: {e}")))?;
                    options.nkey(seed.trim())
                }
                "tls_required" => options.require_tls(match v.as_str() {
                    "true" | "1" | "" => true,
                    "false" | "0" => false,
                    _ => return Err(bad("write `true` or `false`")),
                }),
                "tls_ca" => options.tls_root_certificates(v),
                "tls_cert" => {
                    cert = Some(PathBuf::from(v));
                    options
                }
                "tls_key" => {
                    key = Some(PathBuf::from(v));
                    options
                }
                unknown => {
                    return Err(config(format!(
                        "unknown setting `{unknown}` in the NATS URL; the settings are {KNOWN}"
                    )))
                }
            };
        }
        match (cert, key) {
            (Some(cert), Some(key)) => options = options.tls_client_certificate(cert, key),
            (None, None) => {}
            _ => return Err(config("a TLS client certificate needs both `tls_cert` and `tls_key` in the NATS URL")),
        }
        Ok(options)
    }

    /// Prefixes every subject (`<namespace>.<topic>.<partition>`) and stream name
    /// (`<namespace>_<topic>`) eda uses, so that several deployments or tests share a server
    /// without seeing each other's events (`eda` by default; letters and digits).
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// How many partitions (subjects, and consumers per group) a new topic gets (16 by default).
    /// Events of one key go to one partition and are handled one at a time, in order; a group
    /// handles at most this many events of a topic at once. A topic keeps the count its stream
    /// was created with.
    pub fn partitions(mut self, n: u32) -> Self {
        self.partitions = n;
        self
    }

    /// How long the server waits for a delivery to be settled before it delivers it again to the
    /// partition's owner (30 s by default). The owner ignores such repeats of what it holds; the
    /// wait matters only when deliveries are lost on the way. When an instance dies, the next
    /// owner starts from the settled point after `lease_ttl`, not after this wait.
    pub fn ack_wait(mut self, wait: Duration) -> Self {
        self.ack_wait = wait;
        self
    }

    /// How many owners of an event's partition may die holding it before the transport
    /// dead-letters it without handing it to a handler again (20 by default): the guard
    /// against an event that crashes every consumer taking it. Hand-backs by the runtime
    /// (shutting down, its store unavailable, a busy guard) do not count: they come back after
    /// pauses that grow with each delivery. Failed handlings are retried and dead-lettered by
    /// the runtime's retry policy, which counts only failures.
    pub fn max_deliver(mut self, n: u32) -> Self {
        self.engine.max_deliver = n;
        self
    }

    /// How many publishes may wait for the server's confirmation at once, from all callers of
    /// this transport together (4096 by default); more wait for a place. Publishes do not wait
    /// for each other's confirmations, so concurrent callers (or `Publisher::publish_all`
    /// across partitions) keep the connection busy.
    pub fn max_unconfirmed(mut self, publishes: usize) -> Self {
        self.max_unconfirmed = publishes;
        self
    }

    /// How many events of one partition a group's owner has in flight at most — handed out,
    /// waiting in their key's lane, or done but not yet settled (1024 by default). Events of
    /// different keys run concurrently up to the runtime's in-flight limit; one event that keeps
    /// failing holds back its partition once the window behind it is full.
    pub fn window(mut self, events: usize) -> Self {
        self.engine.window = events;
        self
    }

    /// How long an instance's hold on a partition lasts without renewal (10 s by default): when
    /// an instance dies, another takes its partitions after this long.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.engine.lease_ttl = ttl;
        self
    }

    /// How often leases are renewed and the group's instances counted (2 s by default; at most
    /// a third of `lease_ttl`).
    pub fn heartbeat(mut self, every: Duration) -> Self {
        self.engine.heartbeat = every;
        self
    }

    /// How long an instance handing a partition over (another instance joined, or it stops)
    /// waits for the handlers still running on its events before it lets go (5 min by
    /// default; most handovers take milliseconds, as they wait only for what runs). A handler
    /// still running past it is handled again by the next owner, at the same time as here;
    /// the guards absorb that repeat only where they are shared (`.outbox(db)`). A stopping
    /// runtime cuts its handlers off at its own shutdown timeout, so shutdown never waits this
    /// long.
    pub fn handover_timeout(mut self, timeout: Duration) -> Self {
        self.engine.handover_timeout = timeout;
        self
    }

    /// What a topic's stream keeps (see [`Retention`]; `Limits` by default).
    pub fn retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }

    /// Where the server keeps the streams (`File` by default).
    pub fn storage(mut self, storage: Storage) -> Self {
        self.storage = storage;
        self
    }

    /// How long a topic's stream keeps an event (7 days by default; `None` keeps it until another
    /// limit removes it). Dead letters are kept until they are replayed or purged.
    pub fn max_age(mut self, age: Option<Duration>) -> Self {
        self.max_age = age;
        self
    }

    /// The most bytes a topic's stream keeps; the oldest events go first (no limit by default).
    pub fn max_bytes(mut self, bytes: Option<u64>) -> Self {
        self.max_bytes = bytes;
        self
    }

    /// The most events a topic's stream keeps; the oldest go first (no limit by default).
    pub fn max_messages(mut self, n: Option<u64>) -> Self {
        self.max_messages = n;
        self
    }

    /// Replicas of each stream in a clustered JetStream (1 by default).
    pub fn replicas(mut self, n: usize) -> Self {
        self.replicas = n;
        self
    }

    /// How long the server remembers the ids of published events to drop a second publication of
    /// one (2 minutes by default). The event id is the `Nats-Msg-Id`, so a producer that retries
    /// after a timeout does not store an event twice.
    pub fn duplicate_window(mut self, window: Duration) -> Self {
        self.duplicate_window = window;
        self
    }

    /// How long a publish keeps trying (through reconnects, with the same `Nats-Msg-Id`) before it
    /// fails (10 s by default).
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// How long the first connection may take before connecting fails (5 s by default).
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }

    /// The connection's name, as the server's monitoring shows it.
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Authenticates with a user and password (also read from `nats://user:password@host`).
    pub fn user_and_password(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.credentials = Credentials::UserPassword(user.into(), password.into());
        self.shown()
    }

    /// Authenticates with a token (also read from `nats://token@host`).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.credentials = Credentials::Token(token.into());
        self.shown()
    }

    /// Authenticates with an nkey seed (`SU…`).
    pub fn nkey(mut self, seed: impl Into<String>) -> Self {
        self.credentials = Credentials::NKey(seed.into());
        self
    }

    /// Authenticates with a `.creds` file (a user JWT and its nkey seed).
    pub fn credentials_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.credentials = Credentials::File(path.into());
        self
    }

    /// Refuses to talk to a server without TLS (implied by `tls://` URLs).
    pub fn require_tls(mut self, required: bool) -> Self {
        self.tls_required = required;
        self
    }

    /// Trusts the certificate authorities in this PEM file (beside the system's).
    pub fn tls_root_certificates(mut self, pem: impl Into<PathBuf>) -> Self {
        self.tls_root_certificates = Some(pem.into());
        self
    }

    /// Presents this client certificate and key (PEM files) to the server.
    pub fn tls_client_certificate(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.tls_client_certificate = Some((cert.into(), key.into()));
        self
    }

    /// Connects (see [`NatsTransport::open`](super::NatsTransport::open)).
    pub async fn connect(self) -> Result<super::NatsTransport, TransportError> {
        super::NatsTransport::open(self).await
    }

    /// Checks the settings against each other, before anything is sent to a server.
    pub(super) fn validate(&self) -> Result<(), TransportError> {
        if self.servers.is_empty() {
            return Err(config(format!("`{}` names no NATS server: write `nats://host:4222`", self.shown)));
        }
        if self.namespace.is_empty()
            || self.namespace.len() > 32
            || !self.namespace.chars().all(|c| c.is_ascii_alphanumeric())
        {
            return Err(config(format!(
                "NATS namespace `{}` is not valid: use 1 to 32 letters and digits",
                self.namespace
            )));
        }
        if !(1..=1024).contains(&self.partitions) {
            return Err(config(format!("{} partitions: a NATS topic has 1 to 1024", self.partitions)));
        }
        if self.ack_wait < Duration::from_millis(300) {
            return Err(config(format!("ack_wait {:?} is too short to renew: use at least 300 ms", self.ack_wait)));
        }
        if let Some(age) = self.max_age {
            if age < self.duplicate_window {
                return Err(config(format!(
                    "the duplicate window ({:?}) is longer than max_age ({age:?}); NATS refuses that: shorten the window",
                    self.duplicate_window
                )));
            }
        }
        if self.replicas == 0 {
            return Err(config("replicas 0: a stream has at least one"));
        }
        self.engine.check().map_err(config)?;
        if self.max_unconfirmed == 0 {
            return Err(config("max_unconfirmed 0 would let no publish through: use 1 or more"));
        }
        Ok(())
    }
}

fn config(message: impl Into<String>) -> TransportError {
    TransportError::Config { transport: "nats", reason: message.into() }
}

/// The servers of a URL with its credentials taken out, and whether it asks for TLS.
fn split_url(url: &str) -> (Vec<String>, Credentials, bool) {
    let without_query = url.split('?').next().unwrap_or_default();
    let (scheme, rest) = without_query.split_once("://").unwrap_or(("nats", without_query));
    let tls = scheme == "tls";
    let (userinfo, hosts) = match rest.rsplit_once('@') {
        Some((userinfo, hosts)) => (Some(userinfo), hosts),
        None => (None, rest),
    };
    let credentials = match userinfo.map(|u| u.split_once(':')) {
        None => Credentials::None,
        Some(Some((user, password))) => Credentials::UserPassword(percent_decode(user), percent_decode(password)),
        Some(None) => Credentials::Token(percent_decode(userinfo.unwrap_or_default())),
    };
    let servers = hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(|h| match h.split_once("://") {
            Some(_) => h.to_owned(),
            None => format!("{scheme}://{h}"),
        })
        .collect();
    (servers, credentials, tls)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                out.push(h << 4 | l);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_give_servers_credentials_and_tls() {
        let o = NatsOptions::new("nats://app:p%40ss@a:4222,b:4223");
        assert_eq!(o.servers, ["nats://a:4222", "nats://b:4223"]);
        assert!(o.credentials == Credentials::UserPassword("app".into(), "p@ss".into()));
        assert!(!o.tls_required);
        let o = NatsOptions::new("tls://s3cr3t@nats.internal:4222");
        assert!(o.credentials == Credentials::Token("s3cr3t".into()));
        assert!(o.tls_required);
        assert_eq!(o.servers, ["tls://nats.internal:4222"]);
    }

    #[test]
    fn secrets_stay_out_of_debug_output_and_messages() {
        for url in ["u:pw@host:4222", "nats://u:pw@a:4222,b:4222", "s3cr3t@host", "tls://s3cr3t@host"] {
            let shown = NatsOptions::new(url).shown;
            assert!(!shown.contains("pw") && !shown.contains("s3cr3t") && shown.contains("***@"), "{url} → {shown}");
        }
        assert_eq!(NatsOptions::new("nats://u:pw@a:4222,b:4222").shown, "nats://u:***@a:4222,nats://b:4222");
        let o = NatsOptions::new("nats://app:hunter2@a:4222").token("t0ken");
        let shown = format!("{o:?}");
        assert!(!shown.contains("hunter2") && !shown.contains("t0ken"), "{shown}");
        let err = NatsOptions::from_url("nats://app:hunter2@a:4222?namespace=a-b").and_then(|o| o.validate());
        let err = err.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("namespace `a-b`") && !err.contains("hunter2"), "{err}");
    }

    #[test]
    fn query_settings_are_read_and_checked() {
        let o = NatsOptions::from_url(
            "nats://h:4222?partitions=4&ack_wait=2s&window=64&lease_ttl=3s&heartbeat=1s&max_age=none&retention=interest",
        )
        .expect("valid");
        assert_eq!((o.partitions, o.ack_wait, o.max_age), (4, Duration::from_secs(2), None));
        assert_eq!((o.engine.window, o.engine.lease_ttl), (64, Duration::from_secs(3)));
        let narrow = NatsOptions::from_url("nats://h?max_unconfirmed=16").map(|o| o.max_unconfirmed);
        assert_eq!(narrow.ok(), Some(16));
        assert_eq!(o.retention, Retention::Interest);
        let slow = NatsOptions::new("nats://h").heartbeat(Duration::from_secs(5)).validate();
        assert!(slow.err().map(|e| e.to_string()).unwrap_or_default().contains("lease_ttl"));
        let err = NatsOptions::from_url("nats://h?ack_wait=soon").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("ack_wait=soon"), "{err}");
        let err = NatsOptions::from_url("nats://h?tls_cert=/a.pem").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("tls_key"), "{err}");
        let short = NatsOptions::new("nats://h").max_age(Some(Duration::from_secs(60))).validate();
        assert!(short.err().map(|e| e.to_string()).unwrap_or_default().contains("duplicate window"));
    }
}
