//! The Prometheus endpoint, scraped with a real HTTP client: the lag series equals the backlog
//! while it waits and reads zero once drained; the counters count what happened.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use eda::{event, handler, Ctx, Registry, Runtime};
use eda_tests::{on_every_transport, Bus, OnBus};
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
    every_counter_agrees_with_the_runtimes_stats,
}

#[event(topic = "audits", key = id)]
#[derive(Clone, Serialize, Deserialize)]
struct Audited {
    id: u32,
    kind: String,
}

#[event(topic = "audits", key = id)]
#[derive(Clone, Serialize, Deserialize)]
struct Unrelated {
    id: u32,
}

#[event(topic = "audit_holds", key = id)]
#[derive(Clone, Serialize, Deserialize)]
struct AuditHoldRequested {
    id: u32,
}

#[event(topic = "audit_holds", key = id)]
#[derive(Clone, Serialize, Deserialize)]
struct AuditHeld {
    id: u32,
}

#[event(topic = "audit_checks", key = id)]
#[derive(Clone, Serialize, Deserialize)]
struct AuditFailed {
    id: u32,
}

#[derive(Default)]
struct Flakes(AtomicU32);

#[handler(group = "auditors")]
async fn audit(ev: Audited, flakes: Ctx<'_, Flakes>) -> Result<(), eda::HandlerError> {
    match ev.kind.as_str() {
        "flaky" if flakes.0.fetch_add(1, Ordering::SeqCst) == 0 => Err(eda::HandlerError::transient("once")),
        "bad" => Err(eda::HandlerError::permanent("bad audit")),
        _ => Ok(()),
    }
}

#[handler(group = "audit_holder")]
async fn hold_audit(ev: AuditHoldRequested) -> AuditHeld {
    AuditHeld { id: ev.id }
}

#[handler(group = "audit_checker")]
async fn check_audit(ev: AuditHeld) -> eda::Outcome<(), AuditFailed> {
    eda::Outcome::Failure(AuditFailed { id: ev.id })
}

#[eda::compensates(hold_audit)]
#[handler(group = "audit_holder")]
async fn lift_audit(_ev: AuditFailed) {}

/// The suite's audit: failed, retried, dead-lettered, duplicate and skipped counters were never
/// read, and already disagreed with `stats()` (an unknown version's dead letter moved the stats
/// only). After a scenario that moves every one, each series sums to its stats figure, and the
/// lag series carry their partition label.
async fn every_counter_agrees_with_the_runtimes_stats(bus: Bus) {
    let registry = Registry::builder()
        .handler::<audit>()
        .handler::<hold_audit>()
        .handler::<check_audit>()
        .handler::<lift_audit>()
        .publishes::<Audited>()
        .publishes::<Unrelated>()
        .publishes::<AuditHoldRequested>()
        .publishes::<AuditFailed>()
        .build();
    let rt = Runtime::builder(registry)
        .state(Flakes::default())
        .on(&bus)
        .retry(eda::RetryPolicy { initial_backoff: Duration::from_millis(5), ..eda::RetryPolicy::default() })
        .metrics_addr(([127, 0, 0, 1], 0).into())
        .start()
        .await
        .expect("start");
    let p = rt.publisher();
    let audited = |id, kind: &str| Audited { id, kind: kind.into() };
    let ok = p.publish(&audited(1, "ok")).await.expect("publish");
    p.publish(&audited(2, "flaky")).await.expect("publish");
    p.publish(&audited(3, "bad")).await.expect("publish");
    p.publish(&Unrelated { id: 4 }).await.expect("publish");
    rt.settled(Duration::from_secs(30)).await.expect("settled");
    // A duplicate, and a version of `Audited` no handler knows.
    bus.deliver_again(&rt, &ok).await;
    let info = eda::EventInfo { version: 9, ce_type: "Audited.v9", ..<Audited as eda::Event>::INFO };
    let pending = eda::PendingEvent { info, key: Some("5".into()), data: br#"{"id":5,"kind":"ok"}"#.to_vec() };
    bus.transport().publish(&eda::Envelope::root("test", pending, None)).await.expect("publish v9");
    // A compensation before its step: skipped, and the step after it skipped too.
    let saga = eda::CorrelationId::from("audit-saga");
    p.publish_correlated(&AuditFailed { id: 6 }, saga.clone()).await.expect("publish");
    rt.settled(Duration::from_secs(30)).await.expect("settled");
    p.publish_correlated(&AuditHoldRequested { id: 6 }, saga).await.expect("publish");
    rt.settled(Duration::from_secs(30)).await.expect("settled");

    let stats = rt.stats();
    let scraped = scrape(rt.metrics_addr().expect("serving metrics")).await;
    let total = |metric| sum(&scraped, metric, &[]) as u64;
    assert_eq!(total("eda_events_handled_total"), stats.handled, "{scraped}");
    assert_eq!(total("eda_events_retried_total"), stats.retried, "{scraped}");
    assert_eq!(total("eda_events_dead_lettered_total"), stats.dead_lettered, "{scraped}");
    assert_eq!(total("eda_events_duplicate_total"), stats.duplicates, "{scraped}");
    assert_eq!(total("eda_events_skipped_total"), stats.skipped, "{scraped}");
    assert_eq!(total("eda_events_unhandled_total"), stats.unhandled, "{scraped}");
    // And the scenario moved each of them as meant.
    assert_eq!((stats.retried, stats.dead_lettered, stats.duplicates, stats.skipped), (1, 2, 1, 2), "{stats:?}");
    assert_eq!(total("eda_handler_failures_total"), 2, "the flaky attempt and the bad one");
    assert!(stats.unhandled >= 1, "{stats:?}");
    let lag: Vec<_> = scraped.lines().filter(|l| l.starts_with("eda_consumer_lag{")).collect();
    assert!(!lag.is_empty() && lag.iter().all(|l| l.contains("partition=\"")), "{lag:?}");
    rt.shutdown().await;
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

/// The PostgreSQL review's defect 4: a failed lag query cleared every lag series, so they
/// vanished while the database was in trouble, and their alerts resolved. They keep their
/// last value until a read succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_series_keep_their_value_while_the_lag_cannot_be_read() {
    let db = eda_tests::TestDb::new(true).await;
    let registry = Registry::builder().handler::<meter>().publishes::<Metered>().build();
    let valve = Valve::default();
    valve.closed.store(true, Ordering::SeqCst);
    let rt = Runtime::builder(registry)
        .state(valve)
        .transport(db.open().await)
        .metrics_addr(([127, 0, 0, 1], 0).into())
        .start()
        .await
        .expect("start");
    let addr = rt.metrics_addr().expect("serving metrics");
    for key in 0..5 {
        rt.publisher().publish(&Metered { key }).await.expect("publish");
    }
    let lag = |text: &str| sum(text, "eda_consumer_lag", &["group=\"meters\""]);
    assert_eq!(lag(&scrape(addr).await), 5.0);
    // The lag cannot be read: its table is away.
    let rename = |from: &str, to: &str| format!("ALTER TABLE {p}{from} RENAME TO {p}{to}", p = db.prefix);
    let pool = db.open().await;
    eda::sql::sqlx::query(&rename("offsets", "offsets_away")).execute(pool.pool()).await.expect("rename");
    let during = scrape(addr).await;
    eda::sql::sqlx::query(&rename("offsets_away", "offsets")).execute(pool.pool()).await.expect("rename back");
    assert_eq!(lag(&during), 5.0, "the series kept their last value: {during}");
    rt.state::<Valve>().expect("state").closed.store(false, Ordering::SeqCst);
    rt.settled(Duration::from_secs(30)).await.expect("settled");
    assert_eq!(lag(&scrape(addr).await), 0.0);
    rt.shutdown().await;
}
