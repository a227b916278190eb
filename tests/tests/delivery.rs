//! Delivery semantics, on every transport: guards, groups, competing consumers, retries, dead
//! letters, per-key order, compensation bookkeeping, shutdown, and the start-up checks.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use eda::{event, handler, CorrelationId, Ctx, Error, HandlerError, Outcome, Registry, RetryPolicy, Runtime};
use eda_tests::{on_every_transport, Bus, OnBus};
use serde::{Deserialize, Serialize};

const SETTLE: Duration = Duration::from_secs(20);

fn fast_retries(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(20),
        multiplier: 2.0,
    }
}

#[event(topic = "deposits", key = account)]
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Deposited {
    account: String,
    seq: u32,
    cents: u64,
}

/// Balances per account, and who handled what.
#[derive(Default)]
struct Ledger {
    balances: Mutex<HashMap<String, u64>>,
    seen: Mutex<Vec<(String, u32)>>,
}

impl Ledger {
    fn balance(&self, account: &str) -> u64 {
        self.balances.lock().expect("lock").get(account).copied().unwrap_or(0)
    }
    fn seen(&self) -> Vec<(String, u32)> {
        self.seen.lock().expect("lock").clone()
    }
}

#[handler(group = "ledger")]
async fn credit(ev: Deposited, ledger: Ctx<'_, Ledger>) {
    // Not idempotent by itself: only the guard keeps a duplicate from crediting twice.
    *ledger.balances.lock().expect("lock").entry(ev.account.clone()).or_default() += ev.cents;
    ledger.seen.lock().expect("lock").push((ev.account, ev.seq));
}

#[derive(Default)]
struct Audit(Mutex<Vec<u32>>);

#[handler(group = "audit")]
async fn audit(ev: Deposited, log: Ctx<'_, Audit>) {
    log.0.lock().expect("lock").push(ev.seq);
}

fn deposit(account: &str, seq: u32) -> Deposited {
    Deposited { account: account.into(), seq, cents: 100 }
}

on_every_transport! {
    the_same_envelope_delivered_twice_has_one_effect,
    every_group_gets_every_event_and_instances_of_a_group_share_them,
    transient_failures_and_panics_are_retried_until_they_succeed,
    exhausted_and_permanent_failures_are_dead_lettered_with_their_reason,
    an_undecodable_payload_is_dead_lettered_at_once,
    an_unknown_version_is_dead_lettered_and_other_types_are_acknowledged,
    events_of_one_key_are_handled_in_order_while_keys_run_concurrently,
    a_compensator_undoes_its_step_and_one_arriving_first_cancels_the_step,
    shutdown_mid_stream_leaves_unhandled_events_with_the_transport,
    a_consumer_that_dies_before_acknowledging_loses_nothing,
    oversized_events_are_refused_when_published_and_dead_lettered_when_they_arrive,
}

async fn the_same_envelope_delivered_twice_has_one_effect(bus: Bus) {
    let registry = Registry::builder().handler::<credit>().publishes::<Deposited>().build();
    let rt = Runtime::builder(registry)
        .state(Ledger::default())
        .shared_transport(bus.transport())
        .start()
        .await
        .expect("start");
    let envelope = rt.publisher().publish(&deposit("acc-1", 1)).await.expect("publish");
    rt.publisher().republish(&envelope).await.expect("republish");
    // NATS drops that second publication itself (the event id is its `Nats-Msg-Id`); one the
    // broker cannot recognise must still reach the guard there.
    bus.publish_past_deduplication(&envelope).await;
    rt.settled(SETTLE).await.expect("settled");
    assert_eq!(rt.state::<Ledger>().map(|l| l.balance("acc-1")), Some(100));
    assert_eq!(rt.stats().duplicates, 1);
    assert_eq!(rt.stats().handled, 1);
    assert_eq!(bus.deduplicated_publications(), u64::from(bus.deduplicates_publications()));
    rt.shutdown().await;
}

async fn every_group_gets_every_event_and_instances_of_a_group_share_them(bus: Bus) {
    let bus = bus.transport();
    let registry = || Registry::builder().handler::<credit>().handler::<audit>().publishes::<Deposited>().build();
    let start = |groups: &[&str]| {
        Runtime::builder(registry())
            .state(Ledger::default())
            .state(Audit::default())
            .groups(groups.iter().copied())
            .shared_transport(bus.clone())
            .max_in_flight(4)
            .start()
    };
    let a = start(&["ledger", "audit"]).await.expect("start a");
    let b = start(&["ledger"]).await.expect("start b");
    // Let the instances agree on who takes what (the SQL log leases partitions).
    tokio::time::sleep(Duration::from_millis(800)).await;
    let n = 200u32;
    for seq in 0..n {
        a.publisher().publish(&deposit(&format!("acc-{seq}"), seq)).await.expect("publish");
    }
    a.settled(SETTLE).await.expect("a settled");
    b.settled(SETTLE).await.expect("b settled");

    let mut audited = a.state::<Audit>().expect("audit").0.lock().expect("lock").clone();
    audited.sort_unstable();
    assert_eq!(audited, (0..n).collect::<Vec<_>>(), "the audit group got every event once");

    let seen_a = a.state::<Ledger>().expect("ledger").seen();
    let seen_b = b.state::<Ledger>().expect("ledger").seen();
    let mut all: Vec<_> = seen_a.iter().chain(&seen_b).map(|(_, s)| *s).collect();
    all.sort_unstable();
    assert_eq!(all, (0..n).collect::<Vec<_>>(), "the ledger group handled every event exactly once");
    assert!(
        !seen_a.is_empty() && !seen_b.is_empty(),
        "both instances took a share: a {}, b {}",
        seen_a.len(),
        seen_b.len()
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[event(topic = "jobs", key = id)]
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Job {
    id: u32,
    fail_times: u32,
    permanent: bool,
    panic: bool,
}

#[derive(Default)]
struct Attempts(Mutex<HashMap<u32, u32>>, AtomicU32);

#[handler(group = "workers", max_attempts = 4)]
async fn work(job: Job, attempts: Ctx<'_, Attempts>) -> Result<(), HandlerError> {
    let n = {
        let mut map = attempts.0.lock().expect("lock");
        let n = map.entry(job.id).or_default();
        *n += 1;
        *n
    };
    if n <= job.fail_times {
        if job.permanent {
            return Err(HandlerError::permanent(format!("job {} is invalid", job.id)));
        }
        if job.panic {
            panic!("job {} blew up", job.id);
        }
        return Err(HandlerError::transient(format!("job {} timed out", job.id)));
    }
    attempts.1.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

async fn jobs_runtime(bus: &Bus) -> Runtime {
    let registry = Registry::builder().handler::<work>().publishes::<Job>().build();
    Runtime::builder(registry)
        .state(Attempts::default())
        .shared_transport(bus.transport())
        .retry(fast_retries(10))
        .start()
        .await
        .expect("start")
}

async fn transient_failures_and_panics_are_retried_until_they_succeed(bus: Bus) {
    let rt = jobs_runtime(&bus).await;
    let p = rt.publisher();
    p.publish(&Job { id: 1, fail_times: 2, permanent: false, panic: false }).await.expect("publish");
    p.publish(&Job { id: 2, fail_times: 1, permanent: false, panic: true }).await.expect("publish");
    rt.settled(SETTLE).await.expect("settled");
    let attempts = rt.state::<Attempts>().expect("state");
    assert_eq!(attempts.0.lock().expect("lock").clone(), HashMap::from([(1, 3), (2, 2)]));
    assert_eq!(attempts.1.load(Ordering::SeqCst), 2, "each job succeeded once");
    assert_eq!(rt.stats().retried, 3);
    assert!(bus.dead_letters("workers").await.is_empty());
    rt.shutdown().await;
}

async fn exhausted_and_permanent_failures_are_dead_lettered_with_their_reason(bus: Bus) {
    let rt = jobs_runtime(&bus).await;
    let p = rt.publisher();
    let hopeless = p.publish(&Job { id: 1, fail_times: 99, permanent: false, panic: false }).await.expect("publish");
    let invalid = p.publish(&Job { id: 2, fail_times: 99, permanent: true, panic: false }).await.expect("publish");
    p.publish(&Job { id: 3, fail_times: 0, permanent: false, panic: false }).await.expect("publish");
    rt.settled(SETTLE).await.expect("settled");
    let dead = bus.dead_letters("workers").await;
    assert_eq!(dead.len(), 2);
    let by_id: BTreeMap<_, _> = dead.iter().map(|d| (d.envelope.id, d)).collect();
    let h = by_id[&hopeless.id];
    assert_eq!(h.attempts, 4, "the handler's max_attempts, not the runtime's 10");
    assert!(!h.reason.permanent && h.reason.error.contains("timed out"), "{:?}", h.reason);
    assert_eq!(h.reason.handler.as_deref(), Some("workers/work"));
    let i = by_id[&invalid.id];
    assert_eq!(i.attempts, 1, "permanent errors are not retried");
    assert!(i.reason.permanent && i.reason.error.contains("invalid"), "{:?}", i.reason);
    assert_eq!(i.envelope, invalid, "the original envelope is kept");
    assert_eq!(rt.state::<Attempts>().expect("state").1.load(Ordering::SeqCst), 1, "job 3 went on");
    rt.shutdown().await;
}

async fn an_undecodable_payload_is_dead_lettered_at_once(bus: Bus) {
    let rt = jobs_runtime(&bus).await;
    let mut envelope =
        rt.publisher().publish(&Job { id: 7, fail_times: 0, permanent: false, panic: false }).await.expect("publish");
    envelope.id = eda::EventId::new();
    envelope.data = b"{\"id\": \"seven\"}".to_vec();
    rt.publisher().republish(&envelope).await.expect("republish");
    rt.settled(SETTLE).await.expect("settled");
    let dead = bus.dead_letters("workers").await;
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].reason.permanent && dead[0].reason.error.contains("cannot decode `Job.v1`"),
        "{:?}",
        dead[0].reason
    );
    rt.shutdown().await;
}

#[event(topic = "jobs", key = id, name = "Job", version = 2)]
#[derive(Clone, Debug, Serialize, Deserialize)]
struct JobV2 {
    id: u32,
}

#[event(topic = "jobs")]
#[derive(Serialize, Deserialize)]
struct Unrelated {}

async fn an_unknown_version_is_dead_lettered_and_other_types_are_acknowledged(bus: Bus) {
    let rt = jobs_runtime(&bus).await;
    let newer = rt.publisher().publish(&JobV2 { id: 1 }).await.expect("publish");
    rt.publisher().publish(&Unrelated {}).await.expect("publish");
    rt.settled(SETTLE).await.expect("settled");
    let dead = bus.dead_letters("workers").await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].envelope.id, newer.id);
    assert!(dead[0].reason.error.contains("version 2 of `Job` is unknown"), "{}", dead[0].reason.error);
    assert_eq!(rt.stats().unhandled, 1);
    rt.shutdown().await;
}

async fn events_of_one_key_are_handled_in_order_while_keys_run_concurrently(bus: Bus) {
    #[event(topic = "ordered", key = key)]
    #[derive(Serialize, Deserialize)]
    struct Step {
        key: u32,
        seq: u32,
        fail_first: bool,
    }

    #[derive(Default)]
    struct Seen(Mutex<Vec<(u32, u32)>>, Mutex<HashSet<(u32, u32)>>, AtomicU32, AtomicU32);

    #[handler(group = "sequencer")]
    async fn sequence(ev: Step, seen: Ctx<'_, Seen>) -> Result<(), HandlerError> {
        let running = seen.2.fetch_add(1, Ordering::SeqCst) + 1;
        seen.3.fetch_max(running, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(u64::from(ev.seq % 3))).await;
        seen.2.fetch_sub(1, Ordering::SeqCst);
        if ev.fail_first && seen.1.lock().expect("lock").insert((ev.key, ev.seq)) {
            return Err(HandlerError::transient("first attempt fails"));
        }
        seen.0.lock().expect("lock").push((ev.key, ev.seq));
        Ok(())
    }

    let registry = Registry::builder().handler::<sequence>().publishes::<Step>().build();
    let rt = Runtime::builder(registry)
        .state(Seen::default())
        .shared_transport(bus.transport())
        .max_in_flight(16)
        .retry(fast_retries(3))
        .start()
        .await
        .expect("start");
    let step = |key, seq| Step { key, seq, fail_first: seq % 7 == 3 };
    for seq in 0..20 {
        for key in 0..8 {
            rt.publisher().publish(&step(key, seq)).await.expect("publish");
        }
    }
    // The rest in one batch: each key's steps keep their order within it.
    let batch: Vec<Step> = (20..40).flat_map(|seq| (0..8).map(move |key| step(key, seq))).collect();
    assert_eq!(rt.publisher().publish_all(&batch).await.expect("publish_all").len(), 160);
    rt.settled(SETTLE).await.expect("settled");
    let seen = rt.state::<Seen>().expect("state");
    let log = seen.0.lock().expect("lock").clone();
    assert_eq!(log.len(), 320);
    for key in 0..8 {
        let order: Vec<_> = log.iter().filter(|(k, _)| *k == key).map(|(_, s)| *s).collect();
        assert_eq!(order, (0..40).collect::<Vec<_>>(), "key {key} out of order");
    }
    assert!(seen.3.load(Ordering::SeqCst) > 1, "different keys ran concurrently ({:?})", bus.kind);
    rt.shutdown().await;
}

// A saga step, its failure downstream, and its compensator.
#[event(topic = "holds", key = hold)]
#[derive(Serialize, Deserialize)]
struct HoldRequested {
    hold: String,
}
#[event(topic = "holds", key = hold)]
#[derive(Serialize, Deserialize)]
struct Held {
    hold: String,
}
#[event(topic = "holds", key = hold)]
#[derive(Serialize, Deserialize)]
struct HoldRefused {
    hold: String,
}
#[event(topic = "checks", key = hold)]
#[derive(Serialize, Deserialize)]
struct CheckFailed {
    hold: String,
}
#[event(topic = "holds", key = hold)]
#[derive(Serialize, Deserialize)]
struct Unheld {
    hold: String,
}

#[derive(Default)]
struct Holds(Mutex<Vec<String>>);

#[handler(group = "holder")]
async fn place_hold(ev: HoldRequested, holds: Ctx<'_, Holds>) -> Outcome<Held, HoldRefused> {
    holds.0.lock().expect("lock").push(ev.hold.clone());
    Outcome::Success(Held { hold: ev.hold })
}

#[handler(group = "checker")]
async fn check(ev: Held) -> Outcome<(), CheckFailed> {
    Outcome::Failure(CheckFailed { hold: ev.hold })
}

#[eda::compensates(place_hold)]
#[handler(group = "holder")]
async fn lift_hold(ev: CheckFailed, holds: Ctx<'_, Holds>) -> Unheld {
    holds.0.lock().expect("lock").retain(|h| *h != ev.hold);
    Unheld { hold: ev.hold }
}

async fn a_compensator_undoes_its_step_and_one_arriving_first_cancels_the_step(bus: Bus) {
    let registry = Registry::builder()
        .handler::<place_hold>()
        .handler::<check>()
        .handler::<lift_hold>()
        .publishes::<HoldRequested>()
        .build();
    let rt = Runtime::builder(registry).state(Holds::default()).on(&bus).start().await.expect("start");
    let p = rt.publisher();

    // The normal saga: placed, check fails, lifted.
    let saga = CorrelationId::from("saga-1");
    p.publish_correlated(&HoldRequested { hold: "h1".into() }, saga.clone()).await.expect("publish");
    rt.settled(SETTLE).await.expect("settled");
    assert!(rt.state::<Holds>().expect("holds").0.lock().expect("lock").is_empty());
    // Empty because it was placed and lifted, not because it never was.
    let handled: Vec<_> = rt
        .trace(&saga)
        .into_iter()
        .filter_map(|e| match e.kind {
            eda::EntryKind::Handled { handler, .. } => Some(handler),
            _ => None,
        })
        .collect();
    for h in ["holder/place_hold", "checker/check", "holder/lift_hold"] {
        assert!(handled.iter().any(|x| x == h), "{h} ran: {handled:?}");
    }

    // The failure overtakes the step (another topic, another route): the compensator is a
    // no-op, and the step, arriving later, does not run.
    let saga = CorrelationId::from("saga-2");
    p.publish_correlated(&CheckFailed { hold: "h2".into() }, saga.clone()).await.expect("publish");
    rt.settled(SETTLE).await.expect("settled");
    p.publish_correlated(&HoldRequested { hold: "h2".into() }, saga.clone()).await.expect("publish");
    rt.settled(SETTLE).await.expect("settled");
    assert!(rt.state::<Holds>().expect("holds").0.lock().expect("lock").is_empty(), "h2 was never placed");
    let skipped: Vec<_> =
        rt.trace(&saga).into_iter().filter(|e| matches!(e.kind, eda::EntryKind::Skipped { .. })).collect();
    assert_eq!(skipped.len(), 2, "{skipped:?}");
    rt.shutdown().await;
}

#[tokio::test]
async fn start_up_refuses_a_failure_that_nothing_compensates() {
    let registry = Registry::builder().handler::<place_hold>().handler::<check>().publishes::<HoldRequested>().build();
    let err = Runtime::builder(registry).state(Holds::default()).transport_url("memory://").start().await.err();
    let Some(Error::InvalidRegistry(report)) = err else { panic!("expected an invalid registry, got {err:?}") };
    assert_eq!(report.errors.len(), 1, "{report}");
    assert!(report.errors[0]
        .contains("`CheckFailed.v1` (emitted by `checker/check` on failure) follows step `holder/place_hold`"));
    assert!(report.errors[0].contains("add `#[compensates(place_hold)]`"));
}

#[tokio::test]
async fn start_up_refuses_missing_state_and_unknown_transports() {
    let registry = || Registry::builder().handler::<credit>().publishes::<Deposited>().build();
    let err = Runtime::builder(registry()).transport_url("memory://").start().await.err().map(|e| e.to_string());
    let err = err.expect("missing state is an error");
    assert!(err.contains("Ledger") && err.contains("ledger/credit") && err.contains(".state("), "{err}");

    let err =
        Runtime::builder(registry()).state(Ledger::default()).transport_url("mqtt://127.0.0.1:1883").start().await;
    let err = err.err().map(|e| e.to_string()).expect("no MQTT transport");
    assert!(err.contains("unknown transport scheme `mqtt://`") && err.contains("`kafka://`"), "{err}");

    let err = Runtime::builder(registry()).state(Ledger::default()).start().await.err().map(|e| e.to_string());
    assert!(err.expect("no transport").contains("transport_url"));

    let err = Runtime::builder(registry())
        .state(Ledger::default())
        .groups(["nobody"])
        .transport_url("memory://")
        .start()
        .await;
    assert!(err.err().map(|e| e.to_string()).expect("unknown group").contains("`nobody`"));
}

async fn shutdown_mid_stream_leaves_unhandled_events_with_the_transport(bus: Bus) {
    #[event(topic = "slow", key = id)]
    #[derive(Serialize, Deserialize)]
    struct Slow {
        id: u32,
    }
    #[derive(Default)]
    struct Done(Mutex<Vec<u32>>);
    #[handler(group = "slowpoke")]
    async fn slow(ev: Slow, done: Ctx<'_, Done>) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        done.0.lock().expect("lock").push(ev.id);
    }

    let registry = || Registry::builder().handler::<slow>().publishes::<Slow>().build();
    let first = Runtime::builder(registry())
        .state(Done::default())
        .shared_transport(bus.transport())
        .max_in_flight(2)
        .start()
        .await
        .expect("start");
    for id in 0..50 {
        first.publisher().publish(&Slow { id }).await.expect("publish");
    }
    let done = || first.state::<Done>().map_or(0, |d| d.0.lock().expect("lock").len());
    let deadline = tokio::time::Instant::now() + SETTLE;
    while done() < 3 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.shutdown().await;
    let before: Vec<u32> = first.state::<Done>().expect("state").0.lock().expect("lock").clone();
    assert!(!before.is_empty() && before.len() < 50, "stopped mid-stream after {}", before.len());
    let lag = bus.lag("slowpoke", "slow").await;
    assert_eq!(lag as usize, 50 - before.len(), "exactly the unhandled events are left");

    let second = Runtime::builder(registry())
        .state(Done::default())
        .shared_transport(bus.transport())
        .start()
        .await
        .expect("restart");
    second.settled(SETTLE).await.expect("settled");
    let after: Vec<u32> = second.state::<Done>().expect("state").0.lock().expect("lock").clone();
    let mut all: Vec<_> = before.iter().chain(&after).copied().collect();
    all.sort_unstable();
    assert_eq!(all, (0..50).collect::<Vec<_>>(), "nothing lost, nothing handled twice");
    second.shutdown().await;
}

#[event(topic = "stuck", key = key)]
#[derive(Serialize, Deserialize)]
struct Stuck {
    key: u32,
    n: u32,
}

/// Blocks the first handling forever while `block` is set, as a hung or dying consumer would.
#[derive(Default)]
struct Gate {
    block: std::sync::atomic::AtomicBool,
    entered: AtomicU32,
    done: Mutex<Vec<u32>>,
}

#[handler(group = "gated")]
async fn gated(ev: Stuck, gate: Ctx<'_, Gate>) {
    gate.entered.fetch_add(1, Ordering::SeqCst);
    if gate.block.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    gate.done.lock().expect("lock").push(ev.n);
}

async fn a_consumer_that_dies_before_acknowledging_loses_nothing(bus: Bus) {
    let registry = || Registry::builder().handler::<gated>().publishes::<Stuck>().build();
    let dying = Gate::default();
    dying.block.store(true, Ordering::SeqCst);
    let first = Runtime::builder(registry())
        .state(dying)
        .shared_transport(bus.transport())
        .shutdown_timeout(Duration::from_millis(50))
        .start()
        .await
        .expect("start");
    for n in 0..3 {
        first.publisher().publish(&Stuck { key: 1, n }).await.expect("publish");
    }
    let deadline = tokio::time::Instant::now() + SETTLE;
    while first.state::<Gate>().map_or(0, |g| g.entered.load(Ordering::SeqCst)) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the first handling never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The handler hangs; the deadline passes and it is cut off before it could acknowledge.
    first.shutdown().await;

    let second = Runtime::builder(registry())
        .state(Gate::default())
        .shared_transport(bus.transport())
        .start()
        .await
        .expect("restart");
    second.settled(SETTLE).await.expect("settled");
    let done = second.state::<Gate>().expect("state").done.lock().expect("lock").clone();
    assert_eq!(done, vec![0, 1, 2], "the unacknowledged event came back, first, and nothing was lost");
    second.shutdown().await;
}

#[event(topic = "blobs", key = key)]
#[derive(Serialize, Deserialize)]
struct Blob {
    key: u32,
    body: String,
}

#[handler(group = "blob-readers")]
async fn read_blob(_ev: Blob, seen: Ctx<'_, Audit>) {
    seen.0.lock().expect("lock").push(0);
}

async fn oversized_events_are_refused_when_published_and_dead_lettered_when_they_arrive(bus: Bus) {
    let registry = Registry::builder().handler::<read_blob>().publishes::<Blob>().build();
    let rt = Runtime::builder(registry)
        .state(Audit::default())
        .shared_transport(bus.transport())
        .max_payload(1_000)
        .start()
        .await
        .expect("start");
    let err = rt.publisher().publish(&Blob { key: 1, body: "x".repeat(2_000) }).await.err().map(|e| e.to_string());
    let err = err.expect("refused");
    assert!(err.contains("over the payload limit of 1000") && err.contains("Blob.v1"), "{err}");

    // A producer that does not check (another service, another language) sends one anyway.
    let pending = eda::PendingEvent::new(&Blob { key: 1, body: "y".repeat(2_000) }).expect("encode");
    let big = eda::Envelope::root("elsewhere", pending, None);
    bus.transport().publish(&big).await.expect("the transport itself takes it");
    rt.publisher().publish(&Blob { key: 2, body: "small".into() }).await.expect("publish");
    rt.settled(SETTLE).await.expect("settled");
    let dead = bus.dead_letters("blob-readers").await;
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].reason.permanent && dead[0].reason.error.contains("over the limit of 1000"),
        "{:?}",
        dead[0].reason
    );
    assert_eq!(rt.state::<Audit>().expect("state").0.lock().expect("lock").len(), 1, "the small one was handled");
    rt.shutdown().await;
}
