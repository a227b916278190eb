//! The in-process log stays bounded over an endless run: a million events through one group,
//! with a capacity of 10,000, and the log never holds more than that.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use eda::transport::MemoryTransport;
use eda::{event, handler, Ctx, Registry, Runtime};
use serde::{Deserialize, Serialize};

#[event(topic = "ticks", key = key)]
#[derive(Serialize, Deserialize)]
struct Tick {
    key: u32,
}

#[derive(Default)]
struct Count(AtomicU64);

#[handler(group = "counter", idempotent = false)]
async fn count(_tick: Tick, n: Ctx<'_, Count>) {
    n.0.fetch_add(1, Ordering::Relaxed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_events_through_a_log_of_ten_thousand() {
    const EVENTS: u64 = 1_000_000;
    const CAPACITY: usize = 10_000;
    let bus = MemoryTransport::with_capacity(CAPACITY);
    let counted = Arc::new(Count::default());
    let registry = Registry::builder().handler::<count>().publishes::<Tick>().build();
    let rt = Runtime::builder(registry)
        .shared_state(counted.clone())
        .transport(bus.clone())
        .journal_capacity(0)
        .start()
        .await
        .expect("start");
    let publisher = rt.publisher();
    let mut most = 0;
    for n in 0..EVENTS {
        publisher.publish(&Tick { key: (n % 1024) as u32 }).await.expect("publish");
        if n % 100 == 0 {
            most = most.max(bus.len("ticks"));
        }
    }
    rt.settled(Duration::from_secs(120)).await.expect("settled");
    assert_eq!(counted.0.load(Ordering::Relaxed), EVENTS);
    most = most.max(bus.len("ticks"));
    println!("the log held at most {most} events");
    assert!(most <= CAPACITY, "the log held {most} events, over its capacity of {CAPACITY}");
}
