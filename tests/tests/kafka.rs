//! Kafka's consumer groups where the conformance suite does not reach: a partition that moves
//! away from a member and back to it.
//!
//! Needs the Kafka-protocol broker on 127.0.0.1:9092 (`tests/kafka.sh`, which tests/run.sh
//! runs); fails, not skips, without it.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eda::{event, handler, Ctx, Registry, Runtime};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

#[event(topic = "pages", key = book)]
#[derive(Clone, Debug, Serialize, Deserialize)]
struct PageRead {
    book: u32,
    page: u32,
}

/// What each instance read, and every page read by anyone.
#[derive(Default)]
struct Shelf {
    seen: Mutex<BTreeSet<(u32, u32)>>,
    by_instance: [AtomicU32; 2],
}

struct Instance(usize);

#[handler(group = "readers")]
async fn read_slowly(ev: PageRead, cx: Ctx<'_, (Arc<Shelf>, Instance)>) {
    let (shelf, me) = &*cx;
    // Slower than the broker hands records out: every partition's route fills and pauses.
    tokio::time::sleep(Duration::from_millis(20)).await;
    shelf.seen.lock().expect("lock").insert((ev.book, ev.page));
    shelf.by_instance[me.0].fetch_add(1, Ordering::SeqCst);
}

async fn wait_until(what: &str, within: Duration, done: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The first instance has a backlog far beyond its window, so its partitions are paused
/// while their runs are behind. A second instance joins and the group takes partitions from
/// the first while they are paused; the second leaves, and they come back to the first, which
/// reads them to the end: a revoked partition is resumed (librdkafka keeps an application's
/// pause on a partition until it is resumed) and read again from its committed offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_paused_when_revoked_are_read_again_when_they_come_back() {
    let namespace = eda_tests::fresh_namespace();
    let kafka =
        |window: usize| eda_tests::kafka_options().namespace(namespace.clone()).partitions(4).window(window).connect();
    let shelf = Arc::new(Shelf::default());
    let start = |me: usize| {
        let shelf = shelf.clone();
        async move {
            let registry = Registry::builder().handler::<read_slowly>().publishes::<PageRead>().build();
            let transport = kafka(2).await.expect("Kafka on 127.0.0.1:9092 (tests/kafka.sh starts it)");
            Runtime::builder(registry)
                .shared_state(Arc::new((shelf, Instance(me))))
                .transport(transport)
                .start()
                .await
                .expect("start")
        }
    };
    let (books, pages) = (16u32, 40u32);
    let first = start(0).await;
    let all: Vec<PageRead> = (0..pages).flat_map(|page| (0..books).map(move |book| PageRead { book, page })).collect();
    first.publisher().publish_all(&all).await.expect("publish");
    let total = (books * pages) as usize;
    let count = |i: usize| shelf.by_instance[i].load(Ordering::SeqCst);
    wait_until("the first instance reads", Duration::from_secs(30), || count(0) >= 20).await;

    let second = start(1).await;
    wait_until("the second instance gets partitions", Duration::from_secs(60), || count(1) >= 10).await;
    second.shutdown().await;
    let read = || shelf.seen.lock().expect("lock").len();
    let left = total - read();
    assert!(left > 0, "the backlog outlasted the second instance");
    // The partitions come back to the first, which reads them to the end.
    wait_until(
        &format!("every page is read (after the second left, {left} were not)"),
        Duration::from_secs(60),
        || read() == total,
    )
    .await;
    first.settled(Duration::from_secs(30)).await.expect("settled");
    first.shutdown().await;
}
