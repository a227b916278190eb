//! Defects an independent review found in the runtime, the SQL log, its relay and the memory
//! transport. Each test is named after its defect and failed on the code before the fix.

use std::sync::Arc;
use std::time::Duration;

use eda::sql::{sqlx, Relay};
use eda::transport::MemoryTransport;
use eda::{
    event, handler, DeadLetterReason, Envelope, HandlerError, PendingEvent, Registry, Runtime, Subscription, Transport,
};
use eda_tests::{on_every_transport, on_sql_databases, Bus, TestDb};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

const SETTLE: Duration = Duration::from_secs(20);

#[event(topic = "refusals", key = id)]
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Refused {
    id: u32,
}

#[handler(group = "refuser")]
async fn refuse(ev: Refused) -> Result<(), HandlerError> {
    Err(HandlerError::permanent(format!("refusal {} is final", ev.id)))
}

on_every_transport! {
    dead_letter_ids_are_never_reused,
}

/// Defect 8: the memory transport gave a new letter the id after the newest one, so once the
/// newest was purged an id from an earlier listing named a different letter.
async fn dead_letter_ids_are_never_reused(bus: Bus) {
    let registry = Registry::builder().handler::<refuse>().publishes::<Refused>().build();
    let rt = Runtime::builder(registry).shared_transport(bus.transport()).start().await.expect("start");
    let dead_ids = || async { rt.dead_letters(Some("refuser")).await.expect("list").iter().map(|d| d.id).collect() };
    for id in [1, 2] {
        rt.publisher().publish(&Refused { id }).await.expect("publish");
    }
    rt.settled(SETTLE).await.expect("settled");
    let listed: Vec<u64> = dead_ids().await;
    assert_eq!(listed.len(), 2, "{listed:?}");
    let newest = listed.iter().copied().max().expect("two letters");
    assert!(rt.purge(newest).await.expect("purge"), "the newest letter is purged");

    rt.publisher().publish(&Refused { id: 3 }).await.expect("publish");
    rt.settled(SETTLE).await.expect("settled");
    let now: Vec<u64> = dead_ids().await;
    assert_eq!(now.len(), 2, "{now:?}");
    assert!(!now.contains(&newest), "id {newest} from the earlier listing names another letter now: {now:?}");
    assert!(!rt.purge(newest).await.expect("purge"), "purging the old id again removes nothing");
    assert_eq!(dead_ids().await.len(), 2);
    rt.shutdown().await;
}

/// Defect 3: a relay whose handle was dropped without `stop()` kept listing the outbox's
/// topics in a busy loop (about 1.3 cores) for the rest of the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_dropped_without_stop_ends() {
    let db = TestDb::new(false).await;
    let target: Arc<dyn Transport> = Arc::new(MemoryTransport::new());
    let alive = Arc::downgrade(&target);
    let relay = Relay::new(db.open().await, target).spawn();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(relay);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while alive.upgrade().is_some() {
        assert!(tokio::time::Instant::now() < deadline, "the relay still runs 5 s after its handle was dropped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What only the SQL log can show.
mod sql {
    use super::*;

    on_sql_databases! {
        a_sql_dead_letter_is_not_written_when_another_instance_handled_the_event,
    }

    /// Defect 7: a SQL delivery dead-lettered after another instance had already handled it (the
    /// partition's offset passed it during a lease lapse) still wrote the letter; replaying that
    /// letter applied the event a second time.
    async fn a_sql_dead_letter_is_not_written_when_another_instance_handled_the_event(postgres: bool) {
        let db = TestDb::new(postgres).await;
        let log = db.open().await;
        let subscription = Subscription { group: "g".into(), topic: "refusals".into(), prefetch: 1 };
        let mut deliveries = log.subscribe(&subscription).await.expect("subscribe");
        log.publish(&Envelope::root("test", PendingEvent::new(&Refused { id: 1 }).expect("encoded"), None))
            .await
            .expect("publish");
        let delivery = tokio::time::timeout(SETTLE, deliveries.next()).await.expect("delivered").expect("item");
        let delivery = delivery.expect("delivery");
        // Meanwhile the partition's new owner handled it and moved the group's offset past it.
        let sql = format!(
            "UPDATE {p}offsets SET position = (SELECT MAX(seq) FROM {p}log) WHERE grp = 'g' AND partition = {}",
            delivery.partition,
            p = db.prefix
        );
        let moved = sqlx::query(&sql).execute(log.pool()).await.expect("offsets can be moved");
        assert_eq!(moved.rows_affected(), 1);
        let reason = DeadLetterReason { handler: Some("refuser/refuse".into()), error: "late".into(), permanent: true };
        delivery.dead_letter(reason).await.expect("a fenced dead letter is not an error");
        assert_eq!(
            db.count("SELECT COUNT(*) FROM {p}dead_letters").await,
            0,
            "no letter for an event handled elsewhere"
        );
    }
}
