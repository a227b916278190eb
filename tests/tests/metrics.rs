//! The Prometheus endpoint, scraped with a real HTTP client: the lag series equals the backlog
//! while it waits and reads zero once drained; the counters count what happened.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use eda::{event, handler, Ctx, Registry, Runtime};
use eda_tests::{on_every_transport, Bus};
use serde::{Deserialize, Serialize};

#[event(topic = "metered", key = key)]
#[derive(Serialize, Deserialize)]
struct Metered {
    key: u32,
}

/// Holds every handling until released.
#[derive(Default)]
struct Valve {
    closed: AtomicBool,
    entered: AtomicU32,
}

#[handler(group = "meters")]
async fn meter(_ev: Metered, valve: Ctx<'_, Valve>) {
    valve.entered.fetch_add(1, Ordering::SeqCst);
    while valve.closed.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    tokio::task::spawn_blocking(move || {
        let mut response = ureq::get(&format!("http://{addr}/metrics")).call().expect("the endpoint answers");
        assert_eq!(response.status(), 200);
        let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
        assert!(content_type.starts_with("application/openmetrics-text"), "{content_type}");
        response.body_mut().read_to_string().expect("a body")
    })
    .await
    .expect("the scrape ran")
}

/// The sum of a metric's samples whose labels contain every `label="value"` given.
fn sum(exposition: &str, metric: &str, labels: &[&str]) -> f64 {
    exposition
        .lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")) || l.starts_with(&format!("{metric} ")))
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

async fn the_lag_series_equals_the_backlog_and_reads_zero_when_drained(bus: Bus) {
    let registry = Registry::builder().handler::<meter>().publishes::<Metered>().build();
    let valve = Valve::default();
    valve.closed.store(true, Ordering::SeqCst);
    let rt = Runtime::builder(registry)
        .state(valve)
        .shared_transport(bus.transport())
        .metrics_addr(([127, 0, 0, 1], 0).into())
        .start()
        .await
        .expect("start");
    let addr = rt.metrics_addr().expect("serving metrics");
    for key in 0..5 {
        rt.publisher().publish(&Metered { key }).await.expect("publish");
    }
    let valve = rt.state::<Valve>().expect("state");
    while valve.entered.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let waiting = scrape(addr).await;
    let group = "group=\"meters\"";
    assert_eq!(sum(&waiting, "eda_consumer_lag", &[group, "topic=\"metered\""]), 5.0, "{waiting}");
    assert_eq!(sum(&waiting, "eda_events_handled_total", &[group]), 0.0);

    valve.closed.store(false, Ordering::SeqCst);
    rt.settled(Duration::from_secs(30)).await.expect("settled");
    let drained = scrape(addr).await;
    assert_eq!(sum(&drained, "eda_consumer_lag", &[group]), 0.0, "{drained}");
    assert_eq!(sum(&drained, "eda_events_handled_total", &[group, "handler=\"meter\""]), 5.0, "{drained}");
    assert_eq!(sum(&drained, "eda_handler_duration_seconds_count", &[group]), 5.0, "{drained}");
    assert!(drained.trim_end().ends_with("# EOF"));
    if bus.is_nats() {
        // One instance owns every partition of its group, and has handed none over yet.
        let subscription = [group, "topic=\"metered\""];
        assert_eq!(sum(&drained, "eda_partitions_owned", &subscription), 16.0, "{drained}");
        assert_eq!(sum(&drained, "eda_partitions_handed_over_total", &subscription), 0.0, "{drained}");
        assert_eq!(sum(&drained, "eda_partitions_taken_over_total", &subscription), 0.0, "{drained}");
    }
    rt.shutdown().await;
}

on_every_transport! {
    the_lag_series_equals_the_backlog_and_reads_zero_when_drained,
}

#[tokio::test]
async fn a_taken_address_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let registry = Registry::builder().handler::<meter>().publishes::<Metered>().build();
    let err = Runtime::builder(registry)
        .state(Valve::default())
        .transport_url("memory://")
        .metrics_addr(addr)
        .start()
        .await
        .err()
        .map(|e| e.to_string())
        .expect("refused");
    assert!(err.contains(&format!("cannot serve metrics on {addr}")) && err.contains(".metrics_addr("), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_reports_its_backlog_age_and_what_the_relay_published() {
    let db = eda_tests::TestDb::new(false).await;
    let outbox = db.open().await;
    let broker = eda::transport::MemoryTransport::new();
    let registry = Registry::builder().handler::<meter>().publishes::<Metered>().build();
    let rt = Runtime::builder(registry)
        .state(Valve::default())
        .transport(broker)
        .outbox(outbox.clone())
        .metrics_addr(([127, 0, 0, 1], 0).into())
        .start()
        .await
        .expect("start");
    let addr = rt.metrics_addr().expect("serving metrics");
    let mut conn = outbox.pool().acquire().await.expect("a connection");
    for key in 0..4 {
        outbox.publish_in(&mut conn, "app", &Metered { key }).await.expect("publish_in");
    }
    drop(conn);
    rt.settled(Duration::from_secs(30)).await.expect("settled");
    let drained = scrape(addr).await;
    assert_eq!(sum(&drained, "eda_relay_published_total", &[]), 4.0, "{drained}");
    assert_eq!(sum(&drained, "eda_outbox_backlog", &["topic=\"metered\""]), 0.0, "{drained}");
    assert!(drained.contains("eda_outbox_oldest_age_seconds{topic=\"metered\"} 0.0"), "{drained}");
    assert_eq!(sum(&drained, "eda_events_handled_total", &["group=\"meters\""]), 4.0, "{drained}");
    rt.shutdown().await;
}
