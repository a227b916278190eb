//! RabbitMQ goes away mid-stream and comes back: the broker's application is stopped
//! (`rabbitmqctl stop_app`) while events are published and handled, and started again. Every
//! event is handled, each key's events in publish order, and no effect happens twice (the
//! guards absorb what comes again).
//!
//! It stops the machine's broker, so it is the only test of its binary: cargo runs test
//! binaries one after the other, so no other test meets the outage.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use eda::{event, handler, Ctx, Registry, Runtime};
use eda_tests::{Bus, Kind};
use serde::{Deserialize, Serialize};

const KEYS: u32 = 10;
const PER_KEY: u32 = 60;

#[event(topic = "deposits", key = account)]
#[derive(Serialize, Deserialize)]
struct Deposit {
    account: u32,
    seq: u32,
}

/// Each account's deposits in the order they were applied, and how often each was.
#[derive(Default)]
struct Accounts(Mutex<HashMap<u32, Vec<u32>>>);

#[handler(group = "accounts")]
async fn deposit(d: Deposit, accounts: Ctx<'_, Accounts>) {
    tokio::time::sleep(Duration::from_millis(2)).await;
    accounts.0.lock().expect("lock").entry(d.account).or_default().push(d.seq);
}

fn rabbitmqctl(command: &str) {
    let status = std::process::Command::new("rabbitmqctl")
        .arg(command)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("this test runs `rabbitmqctl {command}` (Debian package rabbitmq-server): {e}"));
    assert!(status.success(), "rabbitmqctl {command} failed: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_stopped_and_started_mid_stream_loses_nothing_and_keeps_each_keys_order() {
    let bus = Bus::new(Kind::Rabbitmq).await;
    let cleanup = bus.cleanup();
    let rt = Runtime::builder(Registry::builder().handler::<deposit>().publishes::<Deposit>().build())
        .state(Accounts::default())
        .shared_transport(bus.transport())
        .start()
        .await
        .expect("start");
    let publisher = rt.publisher();
    let publishing = tokio::spawn(async move {
        for seq in 0..PER_KEY {
            for account in 0..KEYS {
                // A publish meets the outage and waits it out (publish_timeout, 30 s).
                publisher.publish(&Deposit { account, seq }).await.expect("published despite the outage");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let applied = |rt: &Runtime| {
        rt.state::<Accounts>().map_or(0, |a| a.0.lock().expect("lock").values().map(Vec::len).sum::<usize>())
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while applied(&rt) < 100 {
        assert!(tokio::time::Instant::now() < deadline, "nothing handled before the outage");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    rabbitmqctl("stop_app");
    tokio::time::sleep(Duration::from_secs(2)).await;
    rabbitmqctl("start_app");
    publishing.await.expect("the publisher finished");
    rt.settled(Duration::from_secs(120)).await.expect("settled after the outage");

    let accounts = rt.state::<Accounts>().expect("state").0.lock().expect("lock").clone();
    for account in 0..KEYS {
        let seen = accounts.get(&account).cloned().unwrap_or_default();
        assert_eq!(seen, (0..PER_KEY).collect::<Vec<_>>(), "account {account}: every deposit once, in order");
    }
    assert!(rt.stats().handled >= u64::from(KEYS * PER_KEY));
    rt.shutdown().await;
    cleanup.run().await;
}
