//! NATS goes away mid-stream and comes back: a nats-server of the test's own (the machine's
//! binary, on a free port, with a store in a temporary directory, so the shared server and the
//! tests using it are left alone) is stopped with SIGTERM and later killed with SIGKILL while
//! events are being published and handled, and each time started again on the same port and
//! store. Every event is handled, and none twice.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eda::transport::nats::NatsOptions;
use eda::{event, handler, Ctx, Registry, RetryPolicy, Runtime};
use eda_tests::NatsServer;
use serde::{Deserialize, Serialize};

const EVENTS: u32 = 600;

#[event(topic = "transfers", key = account)]
#[derive(Serialize, Deserialize)]
struct Transfer {
    seq: u32,
    account: u32,
}

#[event(topic = "booked", key = account)]
#[derive(Serialize, Deserialize)]
struct Booked {
    seq: u32,
    account: u32,
}

/// How many times each effect happened.
#[derive(Default)]
struct Effects {
    applied: Mutex<HashMap<u32, u32>>,
    booked: Mutex<HashMap<u32, u32>>,
    count: AtomicU32,
}

#[handler(group = "ledger")]
async fn apply(t: Transfer, fx: Ctx<'_, Effects>) -> Booked {
    *fx.applied.lock().expect("lock").entry(t.seq).or_default() += 1;
    fx.count.fetch_add(1, Ordering::SeqCst);
    Booked { seq: t.seq, account: t.account }
}

#[handler(group = "bookkeeping")]
async fn book(b: Booked, fx: Ctx<'_, Effects>) {
    *fx.booked.lock().expect("lock").entry(b.seq).or_default() += 1;
}

async fn wait_for(what: &str, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restarted_mid_stream_loses_nothing_and_applies_nothing_twice() {
    let mut server = NatsServer::start();
    let transport = NatsOptions::new(server.url())
        .ack_wait(Duration::from_secs(2))
        .partitions(4)
        .connect()
        .await
        .expect("the test's server answers");
    let registry = Registry::builder().handler::<apply>().handler::<book>().publishes::<Transfer>().build();
    let fx = Arc::new(Effects::default());
    let rt = Runtime::builder(registry)
        .shared_state(fx.clone())
        .transport(transport.clone())
        .retry(RetryPolicy { max_attempts: 50, ..RetryPolicy::default() })
        .start()
        .await
        .expect("start");

    let publisher = rt.publisher();
    let producer = tokio::spawn(async move {
        for seq in 0..EVENTS {
            // Published once: riding out the restarts is the transport's job (it retries a
            // publish with the same `Nats-Msg-Id` until its publish timeout).
            publisher.publish(&Transfer { seq, account: seq % 7 }).await.expect("published despite the restarts");
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    });

    // Each restart lands mid-stream: the first while the producer still publishes, both while
    // handlers still run.
    wait_for("a third of the events", || fx.count.load(Ordering::SeqCst) >= EVENTS / 3).await;
    assert!(!producer.is_finished() && fx.count.load(Ordering::SeqCst) < EVENTS, "the restart came too late");
    server.restart("-TERM");
    wait_for("two thirds of the events", || fx.count.load(Ordering::SeqCst) >= 2 * EVENTS / 3).await;
    // (The producer may be done by now; the crash must still find handlers at work.)
    assert!(fx.count.load(Ordering::SeqCst) < EVENTS, "the crash came too late");
    // A crash: acknowledgements the server had not written yet are lost, and their events come
    // again; the guards absorb them.
    server.restart("-KILL");

    producer.await.expect("the producer ran");
    rt.settled(Duration::from_secs(60)).await.expect("everything settles after the restarts");
    let applied = fx.applied.lock().expect("lock").clone();
    let booked = fx.booked.lock().expect("lock").clone();
    let missing: Vec<_> = (0..EVENTS).filter(|s| !applied.contains_key(s)).collect();
    let twice: Vec<_> = applied.iter().filter(|(_, n)| **n > 1).collect();
    assert!(missing.is_empty(), "never applied: {missing:?}");
    assert!(twice.is_empty(), "applied more than once: {twice:?}");
    assert_eq!(applied.len() as u32, EVENTS);
    let booked_twice: Vec<_> = booked.iter().filter(|(_, n)| **n > 1).collect();
    assert_eq!(booked.len() as u32, EVENTS, "every emitted event arrived");
    assert!(booked_twice.is_empty(), "booked more than once: {booked_twice:?}");
    // The streams hold each event exactly once: publishes retried across the restarts were
    // deduplicated by the server, none stored twice, none missing.
    let js = async_nats::jetstream::new(transport.client().clone());
    for (stream, what) in [("eda_transfers", "transfers"), ("eda_booked", "bookings")] {
        let info = js.get_stream(stream).await.expect("stream").get_info().await.expect("info");
        assert_eq!(info.state.messages, u64::from(EVENTS), "{what} stored once each");
    }
    eprintln!(
        "publishes the server deduplicated: {}; redeliveries absorbed by guards: {}",
        transport.deduplicated(),
        rt.stats().duplicates
    );
    rt.shutdown().await;
}
