//! Guarantees the README makes that the rest of the suite only compiled or could not have
//! caught broken: the guard's `dedupe_key`, `idempotent = false`, `concurrency`, running
//! handlers finishing at shutdown, a replay's guard, and per-key order with two instances
//! sharing the work (on every transport, memory included).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use eda::{event, handler, Ctx, HandlerError, Registry, Replay, Runtime};
use eda_tests::{on_every_transport, Bus, OnBus};
use serde::{Deserialize, Serialize};

const SETTLE: Duration = Duration::from_secs(20);

on_every_transport! {
    a_dedupe_key_makes_two_events_one_effect,
    a_handler_without_a_guard_sees_every_delivery,
    concurrency_bounds_the_handlings_running_at_once,
    shutdown_lets_every_running_handler_finish,
    a_replay_skips_handlers_that_already_handled_the_event_unless_forced,
    per_key_order_holds_when_a_second_instance_joins_mid_stream,
    a_compensation_that_meets_its_step_running_waits_or_cancels_it,
}

#[event(topic = "payments", key = account)]
#[derive(Clone, Debug, Serialize, Deserialize)]
struct PaymentRequested {
    account: String,
    payment_id: String,
}

#[derive(Default)]
struct Count(AtomicU32);

#[handler(group = "charger", dedupe_key = payment_id)]
async fn charge_once(_ev: PaymentRequested, charges: Ctx<'_, Count>) {
    charges.0.fetch_add(1, Ordering::SeqCst);
}

/// Two events (two ids) with one `payment_id`: one charge.
async fn a_dedupe_key_makes_two_events_one_effect(bus: Bus) {
    let registry = Registry::builder().handler::<charge_once>().publishes::<PaymentRequested>().build();
    let rt = Runtime::builder(registry)
        .state(Count::default())
        .shared_transport(bus.transport())
        .start()
        .await
        .expect("start");
    let request = |payment: &str| PaymentRequested { account: "acc".into(), payment_id: payment.into() };
    let first = rt.publisher().publish(&request("p-1")).await.expect("publish");
    let second = rt.publisher().publish(&request("p-1")).await.expect("publish");
    assert_ne!(first.id, second.id);
    rt.publisher().publish(&request("p-2")).await.expect("publish");
    rt.settled(SETTLE).await.expect("settled");
    assert_eq!(rt.state::<Count>().map(|c| c.0.load(Ordering::SeqCst)), Some(2), "p-1 once, p-2 once");
    assert_eq!(rt.stats().duplicates, 1);
    rt.shutdown().await;
}

#[handler(group = "counter", idempotent = false)]
async fn count_every_delivery(_ev: PaymentRequested, deliveries: Ctx<'_, Count>) {
    deliveries.0.fetch_add(1, Ordering::SeqCst);
}

/// `idempotent = false`: the same event delivered twice reaches the handler twice.
async fn a_handler_without_a_guard_sees_every_delivery(bus: Bus) {
    let registry = Registry::builder().handler::<count_every_delivery>().publishes::<PaymentRequested>().build();
    let rt = Runtime::builder(registry)
        .state(Count::default())
        .shared_transport(bus.transport())
        .start()
        .await
        .expect("start");
    let envelope = rt
        .publisher()
        .publish(&PaymentRequested { account: "acc".into(), payment_id: "p".into() })
        .await
        .expect("publish");
    rt.settled(SETTLE).await.expect("settled");
    // A second delivery of the same event.
    bus.deliver_again(&rt, &envelope).await;
    rt.settled(SETTLE).await.expect("settled");
    assert_eq!(rt.state::<Count>().map(|c| c.0.load(Ordering::SeqCst)), Some(2));
    assert_eq!(rt.stats().duplicates, 0);
    rt.shutdown().await;
}

#[event(topic = "renders", key = page)]
#[derive(Clone, Debug, Serialize, Deserialize)]
struct RenderRequested {
    page: u32,
}

/// How many run now, and the most that ever ran at once.
#[derive(Default)]
struct Running {
    now: AtomicU32,
    most: AtomicU32,
    entered: AtomicU32,
    finished: AtomicU32,
}

impl Running {
    async fn run(&self, for_ms: u64) {
        self.entered.fetch_add(1, Ordering::SeqCst);
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(for_ms)).await;
        self.now.fetch_sub(1, Ordering::SeqCst);
        self.finished.fetch_add(1, Ordering::SeqCst);
    }
}

#[handler(group = "renderer", concurrency = 2)]
async fn render(_ev: RenderRequested, running: Ctx<'_, Running>) {
    running.run(100).await;
}

/// `concurrency = 2`: ten pages of ten keys, never more than two rendering, and two at times.
async fn concurrency_bounds_the_handlings_running_at_once(bus: Bus) {
    let registry = Registry::builder().handler::<render>().publishes::<RenderRequested>().build();
    let rt = Runtime::builder(registry)
        .state(Running::default())
        .shared_transport(bus.transport())
        .start()
        .await
        .expect("start");
    let pages: Vec<_> = (0..10).map(|page| RenderRequested { page }).collect();
    rt.publisher().publish_all(&pages).await.expect("publish");
    rt.settled(SETTLE).await.expect("settled");
    let running = rt.state::<Running>().expect("state");
    assert_eq!(running.finished.load(Ordering::SeqCst), 10);
    assert_eq!(running.most.load(Ordering::SeqCst), 2, "at most two at once, and two did run together");
    rt.shutdown().await;
}

#[handler(group = "slow_renderer")]
async fn render_slowly(_ev: RenderRequested, running: Ctx<'_, Running>) {
    running.run(400).await;
}

/// Shutdown waits for the handlers that entered: none is cut off inside its shutdown timeout.
async fn shutdown_lets_every_running_handler_finish(bus: Bus) {
    let registry = Registry::builder().handler::<render_slowly>().publishes::<RenderRequested>().build();
    let running = Arc::new(Running::default());
    let rt = Runtime::builder(registry)
        .shared_state(running.clone())
        .shared_transport(bus.transport())
        .shutdown_timeout(Duration::from_secs(10))
        .start()
        .await
        .expect("start");
    let pages: Vec<_> = (0..6).map(|page| RenderRequested { page }).collect();
    rt.publisher().publish_all(&pages).await.expect("publish");
    let deadline = tokio::time::Instant::now() + SETTLE;
    while running.entered.load(Ordering::SeqCst) < 2 {
        assert!(tokio::time::Instant::now() < deadline, "the handlers never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    rt.shutdown().await;
    let (entered, finished) = (running.entered.load(Ordering::SeqCst), running.finished.load(Ordering::SeqCst));
    assert!(entered >= 2, "{entered}");
    assert_eq!(finished, entered, "every handler that entered finished before shutdown returned");
}

#[event(topic = "imports", key = batch)]
#[derive(Clone, Debug, Serialize, Deserialize)]
struct ImportRequested {
    batch: u32,
}

/// Calls of each handler of the importer group, and whether the second one fails for good.
#[derive(Default)]
struct Import {
    parsed: AtomicU32,
    stored: AtomicU32,
    store_broken: AtomicBool,
}

#[handler(group = "importer")]
async fn parse(_ev: ImportRequested, import: Ctx<'_, Import>) {
    import.parsed.fetch_add(1, Ordering::SeqCst);
}

#[handler(group = "importer")]
async fn store(_ev: ImportRequested, import: Ctx<'_, Import>) -> Result<(), HandlerError> {
    if import.store_broken.load(Ordering::SeqCst) {
        return Err(HandlerError::permanent("the store is broken"));
    }
    import.stored.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

/// Letters of `store` are replayed after a copy of their event was handled meanwhile: without
/// `force` the guard skips both handlers (nothing runs twice); with `force`, `store` runs again
/// and `parse`, whose guard `force` leaves alone, does not.
async fn a_replay_skips_handlers_that_already_handled_the_event_unless_forced(bus: Bus) {
    let registry = Registry::builder().handler::<parse>().handler::<store>().publishes::<ImportRequested>().build();
    let import = Arc::new(Import::default());
    let rt = Runtime::builder(registry)
        .shared_state(import.clone())
        .shared_transport(bus.transport())
        .start()
        .await
        .expect("start");
    let counts = || (import.parsed.load(Ordering::SeqCst), import.stored.load(Ordering::SeqCst));
    let mut letters = Vec::new();
    for batch in [1, 2] {
        import.store_broken.store(true, Ordering::SeqCst);
        let envelope = rt.publisher().publish(&ImportRequested { batch }).await.expect("publish");
        rt.settled(SETTLE).await.expect("settled");
        let dead = rt.dead_letters(Some("importer")).await.expect("list");
        let letter = dead.iter().find(|d| d.letter.envelope.id == envelope.id).expect("dead-lettered").clone();
        assert_eq!(letter.letter.reason.handler.as_deref(), Some("importer/store"));
        letters.push(letter.id);
        // Fixed, and the same event arrives again (a producer's retry): `store` handles it now.
        import.store_broken.store(false, Ordering::SeqCst);
        bus.deliver_again(&rt, &envelope).await;
        rt.settled(SETTLE).await.expect("settled");
    }
    assert_eq!(counts(), (2, 2));

    let replayed = rt.replay(letters[0], false).await.expect("replay");
    assert!(matches!(replayed, Replay::Handled), "{replayed:?}");
    assert_eq!(counts(), (2, 2), "the guards held: nothing ran twice");

    let forced = rt.replay(letters[1], true).await.expect("forced replay");
    assert!(matches!(forced, Replay::Handled), "{forced:?}");
    assert_eq!(counts(), (2, 3), "forced, `store` ran again; `parse` did not");
    assert!(rt.dead_letters(Some("importer")).await.expect("list").is_empty());
    rt.shutdown().await;
}

#[event(topic = "moves", key = piece)]
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Moved {
    piece: u32,
    seq: u32,
}

/// Which instance handled what, in the order of the first handling of each event.
#[derive(Default)]
struct Board {
    first_handlings: std::sync::Mutex<Vec<(u32, u32)>>,
    seen: std::sync::Mutex<std::collections::HashSet<(u32, u32)>>,
    by_instance: [AtomicU32; 2],
}

struct Instance(usize);

#[handler(group = "referee")]
async fn referee(ev: Moved, cx: Ctx<'_, (Arc<Board>, Instance)>) {
    let (board, me) = &*cx;
    // Slow enough that the stream outlasts the second instance's joining (a heartbeat or two).
    tokio::time::sleep(Duration::from_millis(10)).await;
    if board.seen.lock().expect("lock").insert((ev.piece, ev.seq)) {
        board.first_handlings.lock().expect("lock").push((ev.piece, ev.seq));
    }
    board.by_instance[me.0].fetch_add(1, Ordering::SeqCst);
}

/// The suite's audit: the order test ran one runtime, whose own lanes order keys whatever the
/// transport hands out, so the transport's order across instances and redeliveries never
/// mattered. Here a second instance joins mid-stream and takes part of the work; each key's
/// events are still first handled in order.
async fn per_key_order_holds_when_a_second_instance_joins_mid_stream(bus: Bus) {
    let board = Arc::new(Board::default());
    let start = |me: usize| {
        let registry = Registry::builder().handler::<referee>().publishes::<Moved>().build();
        Runtime::builder(registry)
            .shared_state(Arc::new((board.clone(), Instance(me))))
            .shared_transport(bus.transport())
            .start()
    };
    let first = start(0).await.expect("start");
    let pieces = 8u32;
    let wave = |from: u32, to: u32| -> Vec<Moved> {
        (from..to).flat_map(|seq| (0..pieces).map(move |piece| Moved { piece, seq })).collect()
    };
    let mut moves = 200u32;
    first.publisher().publish_all(&wave(0, moves)).await.expect("publish");
    let deadline = tokio::time::Instant::now() + SETTLE;
    while board.by_instance[0].load(Ordering::SeqCst) < 40 {
        assert!(tokio::time::Instant::now() < deadline, "the first instance never got going");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let second = start(1).await.expect("start the second");
    // The stream goes on, in waves, until the second instance has taken part (however long
    // its joining takes on this transport), and a little after.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut after_joining = 0;
    while after_joining < 5 {
        assert!(tokio::time::Instant::now() < deadline, "the second instance never got work");
        if board.by_instance[1].load(Ordering::SeqCst) > 0 {
            after_joining += 1;
        }
        first.publisher().publish_all(&wave(moves, moves + 20)).await.expect("publish");
        moves += 20;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while board.seen.lock().expect("lock").len() < (pieces * moves) as usize {
        assert!(tokio::time::Instant::now() < deadline, "not every move was handled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.settled(SETTLE).await.expect("settled");
    second.settled(SETTLE).await.expect("settled");
    let counts = [board.by_instance[0].load(Ordering::SeqCst), board.by_instance[1].load(Ordering::SeqCst)];
    assert!(counts[0] > 0 && counts[1] > 0, "both instances handled moves: {counts:?} ({:?})", bus.kind);
    let firsts = board.first_handlings.lock().expect("lock").clone();
    for piece in 0..pieces {
        let order: Vec<u32> = firsts.iter().filter(|(p, _)| *p == piece).map(|(_, s)| *s).collect();
        assert_eq!(order, (0..moves).collect::<Vec<_>>(), "piece {piece} out of order ({:?})", bus.kind);
    }
    first.shutdown().await;
    second.shutdown().await;
}

#[event(topic = "bookings", key = room)]
#[derive(Clone, Debug, Serialize, Deserialize)]
struct BookingRequested {
    room: u32,
}

#[event(topic = "bookings", key = room)]
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Booked {
    room: u32,
}

#[event(topic = "booking_checks", key = room)]
#[derive(Clone, Debug, Serialize, Deserialize)]
struct BookingRefused {
    room: u32,
}

/// Holds the step until released, and says when it is inside.
#[derive(Default)]
struct Door {
    inside: AtomicBool,
    open: AtomicBool,
    booked: AtomicU32,
    unbooked: AtomicU32,
}

#[handler(group = "booking")]
async fn book(ev: BookingRequested, door: Ctx<'_, Door>) -> Booked {
    door.inside.store(true, Ordering::SeqCst);
    while !door.open.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    door.booked.fetch_add(1, Ordering::SeqCst);
    Booked { room: ev.room }
}

#[handler(group = "booking_checker")]
async fn check_booking(_ev: Booked) {}

#[eda::compensates(book)]
#[handler(group = "booking")]
async fn unbook(_ev: BookingRefused, door: Ctx<'_, Door>) {
    door.unbooked.fetch_add(1, Ordering::SeqCst);
}

/// The suite's audit: the compensation test settled between step and compensator, so a
/// compensator never met a running step. Here the failure arrives while the step runs. With
/// an inbox (memory, NATS) the compensator waits for the step, then undoes it; on the SQL log
/// it cancels the step, whose commit then rolls back ("compensated while it ran").
async fn a_compensation_that_meets_its_step_running_waits_or_cancels_it(bus: Bus) {
    let registry = Registry::builder()
        .handler::<book>()
        .handler::<check_booking>()
        .handler::<unbook>()
        .publishes::<BookingRequested>()
        .publishes::<BookingRefused>()
        .build();
    let door = Arc::new(Door::default());
    let rt = Runtime::builder(registry).shared_state(door.clone()).on(&bus).start().await.expect("start");
    let saga = eda::CorrelationId::from("booking-1");
    rt.publisher().publish_correlated(&BookingRequested { room: 7 }, saga.clone()).await.expect("publish");
    let deadline = tokio::time::Instant::now() + SETTLE;
    while !door.inside.load(Ordering::SeqCst) {
        assert!(tokio::time::Instant::now() < deadline, "the step never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    rt.publisher().publish_correlated(&BookingRefused { room: 7 }, saga.clone()).await.expect("publish");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let unbooked_while_running = door.unbooked.load(Ordering::SeqCst);
    door.open.store(true, Ordering::SeqCst);
    rt.settled(SETTLE).await.expect("settled");
    let trace = rt.trace(&saga);
    let kinds: Vec<_> = trace.iter().map(|e| format!("{:?}", e.kind)).collect();
    assert_eq!(unbooked_while_running, 0, "no compensation while its step runs: {kinds:?}");
    if bus.transport().inbox().is_some() {
        // Waited (handed back while `Running`), then undid the step.
        assert_eq!(door.unbooked.load(Ordering::SeqCst), 1, "{kinds:?}");
        assert!(kinds.iter().any(|k| k.contains("Handled") && k.contains("booking/book")), "{kinds:?}");
        assert!(kinds.iter().any(|k| k.contains("Handled") && k.contains("booking/unbook")), "{kinds:?}");
    } else {
        // Cancelled: the compensator had nothing to undo, and the step's commit rolled back.
        assert_eq!(door.unbooked.load(Ordering::SeqCst), 0, "{kinds:?}");
        assert!(kinds.iter().any(|k| k.contains("compensated while it ran")), "{kinds:?}");
        assert!(kinds.iter().any(|k| k.contains("Skipped") && k.contains("booking/unbook")), "{kinds:?}");
        assert!(!kinds.iter().any(|k| k.contains("Handled") && k.contains("booking/book")), "{kinds:?}");
    }
    rt.shutdown().await;
}
