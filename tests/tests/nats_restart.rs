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
        let mut failed_publishes = 0;
        for seq in 0..EVENTS {
            let pending = eda::PendingEvent::new(&Transfer { seq, account: seq % 7 }).expect("encode");
            let envelope = eda::Envelope::root("restart-test", pending, None);
            // A publish that fails may still have been stored: it is retried with the same
            // envelope, whose id the server deduplicates.
            while let Err(e) = publisher.republish(&envelope).await {
                failed_publishes += 1;
                eprintln!("publish {seq} failed, retrying: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        failed_publishes
    });

    wait_for("a third of the events", || fx.count.load(Ordering::SeqCst) >= EVENTS / 3).await;
    server.restart("-TERM");
    wait_for("two thirds of the events", || fx.count.load(Ordering::SeqCst) >= 2 * EVENTS / 3).await;
    // A crash: acknowledgements the server had not written yet are lost, and their events come
    // again; the guards absorb them.
    server.restart("-KILL");

    let failed_publishes = producer.await.expect("the producer ran");
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
    eprintln!(
        "publishes retried by the producer: {failed_publishes}; redeliveries absorbed by guards: {}",
        rt.stats().duplicates
    );
    rt.shutdown().await;
}
