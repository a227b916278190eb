//! Prometheus metrics: what the consumers did, how long handlers took, and how far every
//! group is behind, served in the OpenMetrics text format on `GET /metrics`.
//!
//! Labels are bounded by the registry: group, handler, topic and partition, never event ids.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::consumer::Shared;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct HandlerLabels {
    pub group: String,
    pub handler: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct GroupLabels {
    pub group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TopicLabels {
    pub topic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct SubscriptionLabels {
    pub group: String,
    pub topic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct LagLabels {
    pub group: String,
    pub topic: String,
    pub partition: String,
}

type HistogramFamily = Family<HandlerLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 0.5 ms to about 16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// The runtime's metrics.
pub(crate) struct Metrics {
    registry: Registry,
    pub handled: Family<HandlerLabels, Counter>,
    pub failed: Family<HandlerLabels, Counter>,
    pub retried: Family<HandlerLabels, Counter>,
    pub dead_lettered: Family<GroupLabels, Counter>,
    pub duplicates: Family<HandlerLabels, Counter>,
    pub skipped: Family<HandlerLabels, Counter>,
    pub unhandled: Family<GroupLabels, Counter>,
    pub duration: HistogramFamily,
    pub lag: Family<LagLabels, Gauge>,
    pub owned: Family<SubscriptionLabels, Gauge>,
    pub handed_over: Family<SubscriptionLabels, Counter>,
    pub taken_over: Family<SubscriptionLabels, Counter>,
    #[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
    pub outbox_backlog: Family<TopicLabels, Gauge>,
    #[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
    pub outbox_age: Family<TopicLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub relayed: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("eda");
        let handled = Family::default();
        let failed = Family::default();
        let retried = Family::default();
        let dead_lettered = Family::default();
        let duplicates = Family::default();
        let skipped = Family::default();
        let unhandled = Family::default();
        let duration: HistogramFamily = Family::new_with_constructor(latency_histogram);
        let lag = Family::default();
        let owned = Family::default();
        let handed_over = Family::default();
        let taken_over = Family::default();
        let outbox_backlog = Family::default();
        let outbox_age = Family::default();
        let relayed = Counter::default();
        registry.register("events_handled", "Events a handler handled successfully", handled.clone());
        registry.register("handler_failures", "Failed attempts of a handler (errors and panics)", failed.clone());
        registry.register("events_retried", "Failed attempts that were retried", retried.clone());
        registry.register("events_dead_lettered", "Events dead-lettered, by consumer group", dead_lettered.clone());
        registry.register(
            "events_duplicate",
            "Duplicate deliveries absorbed by idempotency guards",
            duplicates.clone(),
        );
        registry.register("events_skipped", "Handlings skipped by saga bookkeeping", skipped.clone());
        registry.register("events_unhandled", "Events of types a group has no handler for", unhandled.clone());
        registry.register("handler_duration_seconds", "How long one attempt of a handler took", duration.clone());
        registry.register("consumer_lag", "Events published and not yet settled by the group", lag.clone());
        registry.register("partitions_owned", "Partitions of the group this process consumes", owned.clone());
        registry.register(
            "partitions_handed_over",
            "Partitions handed over to another instance of the group (rebalances, shutdown)",
            handed_over.clone(),
        );
        registry.register(
            "partitions_taken_over",
            "Partitions taken over from an instance whose lease lapsed",
            taken_over.clone(),
        );
        registry.register("outbox_backlog", "Events in the outbox not yet relayed", outbox_backlog.clone());
        registry.register(
            "outbox_oldest_age_seconds",
            "Age of the oldest event in the outbox not yet relayed",
            outbox_age.clone(),
        );
        registry.register("relay_published", "Events the outbox relay published", relayed.clone());
        Self {
            registry,
            handled,
            failed,
            retried,
            dead_lettered,
            duplicates,
            skipped,
            unhandled,
            duration,
            lag,
            owned,
            handed_over,
            taken_over,
            outbox_backlog,
            outbox_age,
            relayed,
        }
    }
}

/// One handler's metrics, looked up once instead of at every handling.
#[derive(Clone)]
pub(crate) struct HandlerMetrics {
    pub handled: Counter,
    pub failed: Counter,
    pub retried: Counter,
    pub duplicates: Counter,
    pub skipped: Counter,
    pub dead_lettered: Counter,
    pub duration: Histogram,
}

impl Metrics {
    pub(crate) fn of_handler(&self, group: &str, name: &str) -> HandlerMetrics {
        let labels = handler(group, name);
        HandlerMetrics {
            handled: self.handled.get_or_create(&labels).clone(),
            failed: self.failed.get_or_create(&labels).clone(),
            retried: self.retried.get_or_create(&labels).clone(),
            duplicates: self.duplicates.get_or_create(&labels).clone(),
            skipped: self.skipped.get_or_create(&labels).clone(),
            dead_lettered: self.dead_lettered.get_or_create(&self::group(group)).clone(),
            duration: self.duration.get_or_create(&labels).clone(),
        }
    }
}

pub(crate) fn handler(group: &str, handler: &str) -> HandlerLabels {
    HandlerLabels { group: group.to_owned(), handler: handler.to_owned() }
}

pub(crate) fn group(group: &str) -> GroupLabels {
    GroupLabels { group: group.to_owned() }
}

/// What a scrape reads besides the counters: the lag of each subscription (and of the relay).
pub(crate) struct Scrape {
    pub shared: Arc<Shared>,
    pub subscriptions: Vec<(&'static str, &'static str)>,
    #[cfg(any(feature = "sqlite", feature = "postgres"))]
    pub outbox: Option<crate::sql::SqlTransport>,
    /// The relay's running count, and how much of it the counter has seen.
    pub relayed: Option<(Arc<std::sync::atomic::AtomicU64>, std::sync::atomic::AtomicU64)>,
    /// One render at a time: concurrent scrapes would clear each other's series.
    pub rendering: tokio::sync::Mutex<()>,
}

/// How long one scrape waits for a lag read: a slow database must not pile scrapes up.
const LAG_TIMEOUT: Duration = Duration::from_secs(5);

impl Scrape {
    /// The exposition, with the lag read now.
    pub async fn render(&self) -> String {
        // A scrape that finds another reading the lag (a slow database) does not queue behind
        // it: it answers with what is known, so scrapes cannot pile up.
        let one_at_a_time = tokio::time::timeout(Duration::from_secs(1), self.rendering.lock()).await.ok();
        let metrics = &self.shared.metrics;
        let mut lags = Vec::new();
        let mut all_read = one_at_a_time.is_some();
        let subscriptions = if one_at_a_time.is_some() { &self.subscriptions[..] } else { &[] };
        for (group, topic) in subscriptions {
            let read = tokio::time::timeout(LAG_TIMEOUT, self.shared.transport.lag(group, topic)).await;
            match read {
                Ok(Ok(parts)) => lags.extend(parts.into_iter().map(|p| ((*group).to_owned(), (*topic).to_owned(), p))),
                Ok(Err(e)) => {
                    all_read = false;
                    tracing::warn!(group, topic, error = %e, "cannot read the lag for metrics; its series keep their last value");
                }
                Err(_) => {
                    all_read = false;
                    tracing::warn!(group, topic, timeout = ?LAG_TIMEOUT, "the lag read timed out; its series keep their last value");
                }
            }
        }
        #[cfg(any(feature = "sqlite", feature = "postgres"))]
        if let Some(outbox) = &self.outbox {
            use eda_core::Transport as _;
            metrics.outbox_backlog.clear();
            metrics.outbox_age.clear();
            for topic in outbox.topics().await.unwrap_or_default() {
                let labels = TopicLabels { topic: topic.clone() };
                if let Ok(parts) = outbox.lag("eda-relay", &topic).await {
                    let backlog: u64 = parts.iter().map(|p| p.lag).sum();
                    metrics.outbox_backlog.get_or_create(&labels).set(i64::try_from(backlog).unwrap_or(i64::MAX));
                    lags.extend(parts.into_iter().map(|p| ("eda-relay".to_owned(), topic.clone(), p)));
                }
                let age = match outbox.oldest_pending("eda-relay", &topic).await {
                    Ok(Some(t)) => std::time::SystemTime::now().duration_since(t).map_or(0.0, |d| d.as_secs_f64()),
                    _ => 0.0,
                };
                metrics.outbox_age.get_or_create(&labels).set(age);
            }
        }
        if let Some((count, seen)) = &self.relayed {
            use std::sync::atomic::Ordering;
            let now = count.load(Ordering::Relaxed);
            let before = seen.swap(now, Ordering::Relaxed);
            metrics.relayed.inc_by(now.saturating_sub(before));
        }
        metrics.owned.clear();
        for o in self.shared.transport.ownership() {
            let labels = SubscriptionLabels { group: o.group, topic: o.topic };
            metrics.owned.get_or_create(&labels).set(i64::from(o.owned));
            // Totals kept by the transport; the counters catch up to them.
            let handed = metrics.handed_over.get_or_create(&labels);
            handed.inc_by(o.handed_over.saturating_sub(handed.get()));
            let taken = metrics.taken_over.get_or_create(&labels);
            taken.inc_by(o.taken_over.saturating_sub(taken.get()));
        }
        // Cleared (so that series of partitions gone go too) only when every read succeeded:
        // lag series must not vanish, and their alerts resolve, while the database is in
        // trouble.
        if all_read {
            metrics.lag.clear();
        }
        for (group, topic, p) in lags {
            let labels = LagLabels { group, topic, partition: p.partition.to_string() };
            metrics.lag.get_or_create(&labels).set(i64::try_from(p.lag).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &metrics.registry) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        out
    }
}

/// Serves `GET /metrics` on `listener` until `stop` turns true.
pub(crate) async fn serve(listener: TcpListener, scrape: Arc<Scrape>, mut stop: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, _)) => {
                let scrape = scrape.clone();
                tokio::spawn(async move {
                    if let Err(e) = respond(stream, &scrape).await {
                        tracing::debug!(error = %e, "a metrics request failed");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "the metrics endpoint cannot accept connections");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn respond(mut stream: TcpStream, scrape: &Scrape) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    // The request head only; a scrape has no body.
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request head timed out"))??;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&request);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let path = path.split('?').next().unwrap_or_default();
    let (status, content_type, body) = if method == "GET" && path == "/metrics" {
        ("200 OK", "application/openmetrics-text; version=1.0.0; charset=utf-8", scrape.render().await)
    } else {
        ("404 Not Found", "text/plain; charset=utf-8", "eda serves GET /metrics\n".to_owned())
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// Binds the metrics endpoint, with an error that says what to do when the address is taken.
pub(crate) async fn bind(addr: SocketAddr) -> crate::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        crate::Error::Config(format!(
            "cannot serve metrics on {addr}: {e}; choose another address with .metrics_addr(…)"
        ))
    })
}
