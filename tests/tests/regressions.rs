//! Defects an independent review found in the runtime, the SQL log, its relay and the memory
//! transport. Each test is named after its defect and failed on the code before the fix.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use eda::sql::{sqlx, Relay};
use eda::transport::MemoryTransport;
use eda::{
    event, handler, CorrelationId, Ctx, DeadLetterReason, DeadLetterStore, Envelope, HandlerError, Outcome,
    PendingEvent, Registry, RetryPolicy, Runtime, Subscription, Transport,
};
use eda_tests::{on_every_transport, on_sql_databases, Bus, Kind, OnBus, TestDb};
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
    a_compensation_after_a_restart_finds_its_step,
    dead_letter_ids_are_never_reused,
    a_shutdown_during_a_backoff_counts_one_failure_once,
}

// A saga step, its failure downstream, and its compensator.
#[event(topic = "seats", key = seat)]
#[derive(Serialize, Deserialize)]
struct SeatRequested {
    seat: String,
}
#[event(topic = "seats", key = seat)]
#[derive(Serialize, Deserialize)]
struct SeatHeld {
    seat: String,
}
#[event(topic = "seat_checks", key = seat)]
#[derive(Serialize, Deserialize)]
struct SeatCheckFailed {
    seat: String,
}

#[handler(group = "seating")]
async fn hold_seat(ev: SeatRequested) -> SeatHeld {
    SeatHeld { seat: ev.seat }
}

#[handler(group = "seat_checker")]
async fn check_seat(ev: SeatHeld) -> Outcome<(), SeatCheckFailed> {
    Outcome::Failure(SeatCheckFailed { seat: ev.seat })
}

#[eda::compensates(hold_seat)]
#[handler(group = "seating")]
async fn release_seat(_ev: SeatCheckFailed) {}

fn seating() -> Registry {
    Registry::builder()
        .handler::<hold_seat>()
        .handler::<check_seat>()
        .handler::<release_seat>()
        .publishes::<SeatRequested>()
        .build()
}

/// Defect 1: step records lived in each process's memory. The step ran in one instance; the
/// failure reached a restarted one (or another instance), which found no record, recorded the
/// step as cancelled and skipped the compensator: the hold stayed placed.
async fn a_compensation_after_a_restart_finds_its_step(bus: Bus) {
    let saga = CorrelationId::from("seat-1");
    // The first instance runs the seating group only: the step, and nothing downstream yet.
    let first = Runtime::builder(seating()).groups(["seating"]).on(&bus).start().await.expect("start");
    first.publisher().publish_correlated(&SeatRequested { seat: "1A".into() }, saga.clone()).await.expect("publish");
    first.settled(SETTLE).await.expect("settled");
    assert!(first
        .trace(&saga)
        .iter()
        .any(|e| matches!(&e.kind, eda::EntryKind::Handled { handler, .. } if handler.contains("hold_seat"))));
    first.shutdown().await;

    // A new instance (a restart, or another process): the check fails, the compensator runs.
    let second = Runtime::builder(seating()).on(&bus).start().await.expect("start again");
    second.settled(SETTLE).await.expect("settled");
    let trace = second.trace(&saga);
    let compensated = trace
        .iter()
        .any(|e| matches!(&e.kind, eda::EntryKind::Handled { handler, .. } if handler.contains("release_seat")));
    assert!(compensated, "the compensator ran: {trace:?}");
    assert_eq!(second.stats().skipped, 0, "{trace:?}");
    second.shutdown().await;
}

/// Defect 1, as a review of its fix found: a step delivered again after it was done (the
/// instance crashed before acknowledging it) overwrote "done" with "running"; when that run
/// failed ("already reserved"), it removed the record, and the compensation was skipped.
async fn a_step_run_again_after_it_was_done_keeps_its_record(bus: Bus) {
    let inbox = bus.transport().inbox().expect("the transport's own inbox");
    let saga = CorrelationId::from("again-1");
    assert!(inbox.step_started("seating", "hold_seat", &saga).await.expect("started"));
    inbox.step_finished("seating", "hold_seat", &saga, true).await.expect("done");
    // Delivered again; this run fails and is given up.
    assert!(inbox.step_started("seating", "hold_seat", &saga).await.expect("started again"));
    inbox.step_finished("seating", "hold_seat", &saga, false).await.expect("failed");
    let state = inbox.compensation_started("seating", "hold_seat", &saga).await.expect("compensation");
    assert_eq!(state, eda::StepState::Done, "the first run's effects are compensated");
}

/// A transport that keeps no inbox of its own (a broker without a key-value store).
struct NoInbox(MemoryTransport);

#[async_trait::async_trait]
impl Transport for NoInbox {
    fn kind(&self) -> &'static str {
        "no-inbox"
    }
    async fn publish(&self, envelope: &Envelope) -> Result<(), eda::TransportError> {
        self.0.publish(envelope).await
    }
    async fn subscribe(&self, subscription: &Subscription) -> Result<eda::Deliveries, eda::TransportError> {
        self.0.subscribe(subscription).await
    }
    async fn lag(&self, group: &str, topic: &str) -> Result<Vec<eda::PartitionLag>, eda::TransportError> {
        self.0.lag(group, topic).await
    }
}

/// Defect 1, where records cannot be shared: compensators on a transport that keeps no
/// inbox, with a per-process one, are refused at start with what to configure.
#[tokio::test]
async fn compensators_without_shared_step_records_are_refused_at_start() {
    let err = Runtime::builder(seating()).transport(NoInbox(MemoryTransport::new())).start().await.err();
    let err = err.map(|e| e.to_string()).expect("refused");
    assert!(err.contains("seating/release_seat") && err.contains("no-inbox") && err.contains(".outbox(db)"), "{err}");
    let given = Runtime::builder(seating())
        .transport(NoInbox(MemoryTransport::new()))
        .inbox(eda::MemoryInbox::default())
        .start()
        .await;
    given.expect("an inbox given explicitly is the user's choice").shutdown().await;
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

#[event(topic = "flaky", key = id)]
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Flaky {
    id: u32,
}

/// Calls of a handler, and from which call on it succeeds.
#[derive(Default)]
struct Calls {
    calls: AtomicU32,
    succeed_from: AtomicU32,
}

#[handler(group = "flaky")]
async fn flaky(_ev: Flaky, calls: Ctx<'_, Calls>) -> Result<(), HandlerError> {
    let call = calls.calls.fetch_add(1, Ordering::SeqCst) + 1;
    if call < calls.succeed_from.load(Ordering::SeqCst) {
        return Err(HandlerError::transient(format!("call {call} fails")));
    }
    Ok(())
}

/// Defect 5, on the SQL log: a shutdown during a retry's backoff counted that one failure
/// twice (`attempt_failed`, then again in the hand-back), so the next instance started a
/// limit-3 handler at attempt 3 and dead-lettered it after two real failures.
async fn a_shutdown_during_a_backoff_counts_one_failure_once(bus: Bus) {
    let calls = Arc::new(Calls { succeed_from: AtomicU32::new(3), ..Calls::default() });
    let start = || {
        let registry = Registry::builder().handler::<flaky>().publishes::<Flaky>().build();
        Runtime::builder(registry)
            .shared_state(calls.clone())
            .shared_transport(bus.transport())
            .retry(RetryPolicy {
                max_attempts: 3,
                initial_backoff: Duration::from_secs(5),
                max_backoff: Duration::from_secs(5),
                multiplier: 1.0,
            })
            .start()
    };
    let first = start().await.expect("start");
    first.publisher().publish(&Flaky { id: 1 }).await.expect("publish");
    let deadline = tokio::time::Instant::now() + SETTLE;
    while calls.calls.load(Ordering::SeqCst) < 1 {
        assert!(tokio::time::Instant::now() < deadline, "the handler never ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Shut down in the backoff after the first failure.
    tokio::time::sleep(Duration::from_millis(100)).await;
    first.shutdown().await;
    assert_eq!(calls.calls.load(Ordering::SeqCst), 1);

    let second = start().await.expect("start again");
    let deadline = tokio::time::Instant::now() + SETTLE + Duration::from_secs(20);
    while calls.calls.load(Ordering::SeqCst) < 3 && second.dead_letters(None).await.expect("list").is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "neither handled nor dead-lettered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    second.settled(SETTLE).await.expect("settled");
    let dead = second.dead_letters(None).await.expect("list");
    assert!(dead.is_empty(), "dead-lettered after {} calls: {dead:?}", calls.calls.load(Ordering::SeqCst));
    assert_eq!(calls.calls.load(Ordering::SeqCst), 3, "two failures, then the third attempt succeeded");
    second.shutdown().await;
}

// A slow saga step, and a compensator that meets it running.
#[event(topic = "slow_holds", key = hold)]
#[derive(Serialize, Deserialize)]
struct SlowHoldRequested {
    hold: String,
}
#[event(topic = "slow_holds", key = hold)]
#[derive(Serialize, Deserialize)]
struct SlowHeld {
    hold: String,
}
#[event(topic = "slow_checks", key = hold)]
#[derive(Serialize, Deserialize)]
struct SlowCheckFailed {
    hold: String,
}

/// The step runs until released; the compensator fails its first call.
#[derive(Default)]
struct Gate {
    running: AtomicBool,
    released: AtomicBool,
    compensations: AtomicU32,
}

#[handler(group = "slow_holder")]
async fn slow_hold(ev: SlowHoldRequested, gate: Ctx<'_, Gate>) -> SlowHeld {
    gate.running.store(true, Ordering::SeqCst);
    while !gate.released.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    SlowHeld { hold: ev.hold }
}

#[handler(group = "slow_checker")]
async fn slow_check(_ev: SlowHeld) -> Outcome<(), SlowCheckFailed> {
    Outcome::Success(())
}

#[eda::compensates(slow_hold)]
#[handler(group = "slow_holder")]
async fn lift_slow_hold(_ev: SlowCheckFailed, gate: Ctx<'_, Gate>) -> Result<(), HandlerError> {
    if gate.compensations.fetch_add(1, Ordering::SeqCst) == 0 {
        return Err(HandlerError::transient("the first compensation fails"));
    }
    Ok(())
}

/// Defect 5: the retry loop started at the delivery's number, which counts hand-backs. A
/// compensator handed back while its step ran (each time `Running`) met its first real
/// failure at attempt 10 or so and was dead-lettered with no retry at all.
async fn hand_backs_do_not_use_up_the_retry_limit(bus: Bus) {
    let registry = Registry::builder()
        .handler::<slow_hold>()
        .handler::<slow_check>()
        .handler::<lift_slow_hold>()
        .publishes::<SlowHoldRequested>()
        .publishes::<SlowCheckFailed>()
        .build();
    let rt = Runtime::builder(registry)
        .state(Gate::default())
        .shared_transport(bus.transport())
        .retry(RetryPolicy {
            max_attempts: 2,
            initial_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(20),
            multiplier: 2.0,
        })
        .start()
        .await
        .expect("start");
    let gate = rt.state::<Gate>().expect("gate");
    let saga = CorrelationId::from("slow-1");
    rt.publisher().publish_correlated(&SlowHoldRequested { hold: "h".into() }, saga.clone()).await.expect("publish");
    let deadline = tokio::time::Instant::now() + SETTLE;
    while !gate.running.load(Ordering::SeqCst) {
        assert!(tokio::time::Instant::now() < deadline, "the step never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    rt.publisher().publish_correlated(&SlowCheckFailed { hold: "h".into() }, saga.clone()).await.expect("publish");
    // The compensator comes and is handed back, again and again, while the step runs.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(gate.compensations.load(Ordering::SeqCst), 0, "no compensation while its step runs");
    gate.released.store(true, Ordering::SeqCst);
    rt.settled(SETTLE).await.expect("settled");
    let dead = rt.dead_letters(None).await.expect("list");
    assert!(dead.is_empty(), "dead-lettered: {dead:?}");
    assert_eq!(gate.compensations.load(Ordering::SeqCst), 2, "one failure, one retry that succeeded");
    rt.shutdown().await;
}

/// The transports that keep an inbox of their own (the SQL log handles in its transactions,
/// and there a compensator never meets its step running: it cancels the step, whose commit
/// then rolls back, as the delivery tests show).
mod inbox {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_step_run_again_after_it_was_done_keeps_its_record_in_memory() {
        a_step_run_again_after_it_was_done_keeps_its_record(Bus::new(Kind::Memory).await).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_step_run_again_after_it_was_done_keeps_its_record_on_nats() {
        let bus = Bus::new(Kind::Nats).await;
        let cleanup = bus.cleanup();
        a_step_run_again_after_it_was_done_keeps_its_record(bus).await;
        cleanup.run().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hand_backs_do_not_use_up_the_retry_limit_in_memory() {
        hand_backs_do_not_use_up_the_retry_limit(Bus::new(Kind::Memory).await).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hand_backs_do_not_use_up_the_retry_limit_on_nats() {
        let bus = Bus::new(Kind::Nats).await;
        let cleanup = bus.cleanup();
        hand_backs_do_not_use_up_the_retry_limit(bus).await;
        cleanup.run().await;
    }
}

/// Defect 2: the relay retried an event the broker refused, whatever the refusal, forever: a
/// correlation id with a line break (which no NATS header carries) held its outbox partition
/// back for good — relay lag 2, nothing relayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_broker_refuses_does_not_block_its_outbox_partition() {
    let db = TestDb::new(false).await;
    let outbox = db.open().await;
    let broker = Bus::new(Kind::Nats).await;
    let cleanup = broker.cleanup();
    let event = |id, correlation: &str| {
        let pending = PendingEvent::new(&Refused { id }).expect("encoded");
        Envelope::root("test", pending, Some(CorrelationId::from(correlation)))
    };
    // One key, so one partition: the refused event comes first, the good one behind it.
    let (poison, good) = (event(7, "order-7\nX-Injected: yes"), event(7, "order-7"));
    outbox.publish(&poison).await.expect("the outbox takes it");
    outbox.publish(&good).await.expect("the outbox takes it");
    let subscription = Subscription { group: "g".into(), topic: "refusals".into(), prefetch: 16 };
    let mut deliveries = broker.transport().subscribe(&subscription).await.expect("subscribe");
    let relay = Relay::new(outbox.clone(), broker.transport()).spawn();

    let delivered = tokio::time::timeout(SETTLE, deliveries.next()).await.expect("the good event is relayed");
    let delivered = delivered.expect("item").expect("delivery");
    assert_eq!(delivered.envelope.id, good.id);
    delivered.ack().await.expect("ack");
    let letters = outbox.dead_letters(Some("eda-relay")).await.expect("the relay's dead letters");
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].letter.envelope.id, poison.id);
    assert!(letters[0].letter.reason.error.contains("line break"), "{:?}", letters[0].letter.reason);
    relay.stop().await;
    assert_eq!(outbox.lag("eda-relay", "refusals").await.expect("lag").iter().map(|p| p.lag).sum::<u64>(), 0);
    cleanup.run().await;
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
        a_compensator_holds_no_write_lock_while_it_runs,
    }

    #[event(topic = "quick_holds", key = hold)]
    #[derive(Serialize, Deserialize)]
    struct QuickHoldRequested {
        hold: String,
    }
    #[event(topic = "quick_holds", key = hold)]
    #[derive(Serialize, Deserialize)]
    struct QuickHeld {
        hold: String,
    }
    #[event(topic = "quick_checks", key = hold)]
    #[derive(Serialize, Deserialize)]
    struct QuickCheckFailed {
        hold: String,
    }

    /// Another handle on the database (another process, in effect), and what its write did
    /// while the compensator ran.
    struct Probe {
        other: eda::sql::SqlTransport,
        wrote: std::sync::Mutex<Option<Result<(), String>>>,
    }

    #[handler(group = "quick_holder")]
    async fn quick_hold(ev: QuickHoldRequested) -> QuickHeld {
        QuickHeld { hold: ev.hold }
    }

    #[handler(group = "quick_checker")]
    async fn quick_check(ev: QuickHeld) -> Outcome<(), QuickCheckFailed> {
        Outcome::Failure(QuickCheckFailed { hold: ev.hold })
    }

    #[eda::compensates(quick_hold)]
    #[handler(group = "quick_holder")]
    async fn quick_unhold(_ev: QuickCheckFailed, probe: Ctx<'_, Probe>) {
        let envelope = Envelope::root("probe", PendingEvent::new(&Refused { id: 1 }).expect("encoded"), None);
        let write = probe.other.publish(&envelope);
        let wrote = match tokio::time::timeout(Duration::from_secs(3), write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("still waiting for the write lock after 3 s".into()),
        };
        *probe.wrote.lock().expect("lock") = Some(wrote);
    }

    /// Defect 6: on SQLite a compensator's unit opened `BEGIN IMMEDIATE` before the handler
    /// ran, so every other writer in every process waited for the compensator (past
    /// `busy_timeout`: "database is locked"). The docs say a handler that never asks for the
    /// transaction holds no write lock.
    async fn a_compensator_holds_no_write_lock_while_it_runs(postgres: bool) {
        let db = TestDb::new(postgres).await;
        let registry = Registry::builder()
            .handler::<quick_hold>()
            .handler::<quick_check>()
            .handler::<quick_unhold>()
            .publishes::<QuickHoldRequested>()
            .build();
        let probe = Probe { other: db.open().await, wrote: Default::default() };
        let rt = Runtime::builder(registry).state(probe).transport(db.open().await).start().await.expect("start");
        rt.publisher().publish(&QuickHoldRequested { hold: "q".into() }).await.expect("publish");
        rt.settled(SETTLE).await.expect("settled");
        let wrote = rt.state::<Probe>().and_then(|p| p.wrote.lock().expect("lock").clone());
        assert_eq!(wrote, Some(Ok(())), "another writer went on while the compensator ran");
        let kinds: Vec<_> = rt.journal().into_iter().map(|e| format!("{:?}", e.kind)).collect();
        assert!(kinds.iter().any(|k| k.contains("Handled") && k.contains("quick_unhold")), "{kinds:?}");
        rt.shutdown().await;
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
