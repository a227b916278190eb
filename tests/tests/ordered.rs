//! Per-key order across the instances of one group on NATS, with real processes
//! (`eda-test-ordered`): two instances share the partitions; one is SIGKILLed mid-stream and
//! the survivor takes its partitions; a third joins mid-stream and gets a share; a poisoned
//! event holds back only its own key; an event that crashes every process taking it is
//! dead-lettered after `max_deliver` owners died on it.
//! Settings are in each test's NATS URL: 16 partitions, a lease TTL of 3 s renewed every second.
//!
//! Every handling is a line in one log file, in the order the group handled them. Order holds
//! when, for every key, the first handling of each step comes after the first handling of the
//! step before (a step handled again after a crash or handover is a repeat, which a shared
//! inbox would absorb; here the inbox is each process's own).

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use eda::transport::nats::NatsTransport;
use eda::{event, Registry, Runtime, Transport as _};
use serde::{Deserialize, Serialize};

const NODE: &str = env!("CARGO_BIN_EXE_eda-test-ordered");
const KEYS: u32 = 64;
const STEPS: u32 = 300;

/// The instances' event, as the publisher sees it.
#[event(topic = "steps", key = key)]
#[derive(Serialize, Deserialize)]
struct Step {
    key: u32,
    seq: u32,
}

/// One test's group: a namespace of its own on the shared server, a log file, its processes.
struct Group {
    url: String,
    broker: Broker,
    log: tempfile::NamedTempFile,
    children: Vec<(String, Child)>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Broker {
    Nats,
    RabbitMq,
    Kafka,
}

impl Group {
    fn new(settings: &str) -> Self {
        Self::on(Broker::Nats, settings)
    }

    /// The same on RabbitMQ, with a namespace of its own.
    fn on_rabbitmq(settings: &str) -> Self {
        Self::on(Broker::RabbitMq, settings)
    }

    /// The same on Kafka, with a namespace of its own.
    fn on_kafka(settings: &str) -> Self {
        Self::on(Broker::Kafka, settings)
    }

    fn on(broker: Broker, settings: &str) -> Self {
        let base = match broker {
            Broker::Nats => eda_tests::nats_url(),
            Broker::RabbitMq => eda_tests::rabbit_url(),
            Broker::Kafka => eda_tests::kafka_url(),
        };
        let url = format!("{base}?namespace={}&{settings}", eda_tests::fresh_namespace());
        Self { url, broker, log: tempfile::NamedTempFile::new().expect("a log file"), children: Vec::new() }
    }

    /// `(instance, handled, duplicates)` as each instance stopped with SIGTERM wrote them.
    fn stats(&self) -> Vec<(String, u64, u64)> {
        let text = std::fs::read_to_string(format!("{}.stats", self.log.path().display())).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let mut parts = l.split(' ');
                Some((parts.next()?.to_owned(), parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
            })
            .collect()
    }

    fn start(&mut self, instance: &str, env: &[(&str, &str)]) {
        let child = Command::new(NODE)
            .args([&self.url, &self.log.path().display().to_string(), instance])
            .envs(env.iter().copied())
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("the instance starts");
        self.children.push((instance.to_owned(), child));
    }

    fn pid(&self, instance: &str) -> String {
        self.children.iter().find(|(name, _)| name == instance).map(|(_, c)| c.id().to_string()).expect("that instance")
    }

    /// `(instance, key, seq)` of every handling so far, in order.
    fn handlings(&self) -> Vec<(String, u32, u32)> {
        let text = std::fs::read_to_string(self.log.path()).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let mut parts = l.split(' ');
                let instance = parts.next()?.to_owned();
                Some((instance, parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
            })
            .collect()
    }

    fn distinct(&self) -> usize {
        self.handlings().into_iter().map(|(_, k, s)| (k, s)).collect::<BTreeSet<_>>().len()
    }

    /// The keys not handled to their last step, with the steps each has: what a failed wait
    /// shows.
    fn behind(&self) -> String {
        let mut steps: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
        for (_, key, seq) in self.handlings() {
            steps.entry(key).or_default().insert(seq);
        }
        let behind: Vec<String> = (0..KEYS)
            .filter_map(|k| {
                let got = steps.get(&k).map_or(0, BTreeSet::len);
                (got < STEPS as usize)
                    .then(|| format!("key {k}: {got} steps, up to {:?}", steps.get(&k).and_then(|s| s.last())))
            })
            .collect();
        format!("{} keys behind: {}", behind.len(), behind.join(", "))
    }

    async fn wait_for(&self, what: &str, within: Duration, done: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + within;
        while !done(self) {
            assert!(Instant::now() < deadline, "timed out after {within:?} waiting for {what}; {}", self.behind());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn transport(&self) -> NatsTransport {
        NatsTransport::connect(&self.url).await.expect("NATS with JetStream (tests/run.sh starts it)")
    }

    async fn any_transport(&self) -> std::sync::Arc<dyn eda::Transport> {
        eda::transport::connect(&self.url).await.expect("the broker (tests/run.sh starts it)")
    }

    /// Publishes `steps` of every key, each key's in order, the keys concurrently.
    async fn publish(&self, keys: u32, steps: std::ops::Range<u32>) {
        let runtime = Runtime::builder(Registry::default())
            .shared_transport(self.any_transport().await)
            .start()
            .await
            .expect("start");
        let publishers = (0..keys).map(|key| {
            let publisher = runtime.publisher();
            let steps = steps.clone();
            async move {
                for seq in steps {
                    publisher.publish(&Step { key, seq }).await.expect("published");
                }
            }
        });
        futures_util::future::join_all(publishers).await;
        runtime.shutdown().await;
    }

    /// Publishes `steps` of every key and SIGKILLs instance b once a third of all steps were
    /// handled; then waits until every step was, checks each key's order and that a, the
    /// survivor, did the last of the work. `(time from the kill, handlings run twice)`.
    async fn kill_b_mid_stream(&self, steps: std::ops::Range<u32>) -> (Duration, usize) {
        let b = self.pid("b");
        let killing = async {
            self.wait_for("a third of the steps", Duration::from_secs(120), |g| g.distinct() >= ALL / 3).await;
            assert!(Command::new("kill").args(["-KILL", &b]).status().expect("kill runs").success());
            Instant::now()
        };
        let ((), killed) = tokio::join!(self.publish(KEYS, steps), killing);
        self.wait_for("every step", Duration::from_secs(120), |g| g.distinct() == ALL).await;
        let taken = killed.elapsed();
        let handlings = self.handlings();
        let repeats = assert_in_order(&handlings, &[]);
        assert!(instances(&handlings).contains("b"), "b took a share before it was killed");
        let after_kill: BTreeSet<_> = handlings.iter().rev().take(100).map(|(i, _, _)| i.clone()).collect();
        assert_eq!(after_kill, ["a".to_owned()].into(), "the survivor finished the work");
        (taken, repeats)
    }

    /// Stops every instance with SIGTERM, as an orchestrator would.
    fn stop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .stderr(std::process::Stdio::null())
                .status();
            let _ = child.wait();
        }
    }

    async fn done(mut self) {
        self.stop();
        if self.broker == Broker::RabbitMq {
            // The instances declared the queues; what they declared goes with the broker's
            // namespace being fresh (nothing else uses it), and is deleted by name here.
            let t = eda::transport::rabbitmq::RabbitTransport::connect(&self.url).await.expect("RabbitMQ");
            use eda::Transport as _;
            let steps = eda::Subscription { group: "ordered".into(), topic: "steps".into(), prefetch: 1 };
            t.prepare(&steps).await.expect("the queues are there");
            t.delete_declared().await.expect("the test's queues can be deleted");
            return;
        }
        if self.broker == Broker::Kafka {
            // The topics stay, in a namespace of their own (see `eda_tests::Cleanup`).
            return;
        }
        self.transport().await.delete_namespace().await.expect("the test's streams can be deleted");
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Asserts per-key order (see the module docs) and returns how many handlings were repeats.
fn assert_in_order(handlings: &[(String, u32, u32)], skipped: &[(u32, u32)]) -> usize {
    let mut firsts: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for (_, key, seq) in handlings {
        if seen.insert((*key, *seq)) {
            firsts.entry(*key).or_default().push(*seq);
        }
    }
    for (key, seqs) in &firsts {
        let expected: Vec<u32> = (0..STEPS).filter(|s| !skipped.contains(&(*key, *s))).collect();
        assert_eq!(seqs, &expected, "key {key} was not handled in publish order");
    }
    handlings.len() - seen.len()
}

fn instances(handlings: &[(String, u32, u32)]) -> BTreeSet<String> {
    handlings.iter().map(|(i, _, _)| i.clone()).collect()
}

const SETTINGS: &str = "partitions=16&lease_ttl=3s&heartbeat=1s&handover_timeout=5s";
const ALL: usize = (KEYS * STEPS) as usize;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_handle_every_key_in_publish_order() {
    let mut group = Group::new(SETTINGS);
    group.start("a", &[]);
    group.start("b", &[]);
    group.publish(KEYS, 0..STEPS).await;
    group.wait_for("every step", Duration::from_secs(120), |g| g.distinct() == ALL).await;
    let handlings = group.handlings();
    assert_in_order(&handlings, &[]);
    assert_eq!(instances(&handlings), ["a".to_owned(), "b".to_owned()].into(), "both instances took a share");
    group.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_survivor_of_a_sigkill_takes_over_its_partitions_in_order() {
    let mut group = Group::new(SETTINGS);
    group.start("a", &[]);
    group.start("b", &[]);
    let (taken, repeats) = group.kill_b_mid_stream(0..STEPS).await;
    // The lease TTL (3 s) and a few seconds more.
    assert!(taken < Duration::from_secs(30), "took {taken:?}");
    eprintln!("repeats after the kill: {repeats}");
    group.done().await;
}

/// The same on RabbitMQ: the broker gives the killed instance's partitions, with what it held
/// unsettled first, to the consumers waiting in line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_rabbitmq_the_survivor_of_a_sigkill_takes_over_in_order() {
    let mut group = Group::on_rabbitmq("partitions=8&member_heartbeat=250ms&member_ttl=1s&handover_timeout=5s");
    group.start("a", &[]);
    group.start("b", &[]);
    // Both instances in line on every partition, and sharing them, before the stream starts.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, repeats) = group.kill_b_mid_stream(0..STEPS).await;
    eprintln!("repeats after the kill: {repeats}");
    group.done().await;
}

/// Kafka settings: heartbeats every 200 ms, and one record per produce batch, because tansu
/// loses records of batches for consumers that commit (see `eda_tests::kafka_options`). tansu
/// drops a member that died only after the rebalance timeout (`max.poll.interval.ms`), not
/// after its session (as Kafka does): that is 15 s here. tansu 0.6.0 also keeps naming a dead
/// group leader as the leader to the members that rejoin, which then wait for its assignment
/// for ever; so the member killed here is never the leader (the first to join).
const KAFKA: &str = "partitions=8&session_timeout=6s&heartbeat.interval.ms=200&handover_timeout=5s&max.poll.interval.ms=15000&batch.num.messages=1";

/// The same on Kafka: the group protocol gives the killed member's partitions to the survivor
/// once the broker drops the dead member (see `KAFKA`), which resumes from the committed
/// offsets. The guards are kept in one PostgreSQL database for both instances, so that what
/// the killed one handled and did not commit to Kafka yet is absorbed when it comes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kafka_the_survivor_of_a_sigkill_takes_over_in_order() {
    let mut group = Group::on_kafka(KAFKA);
    let outbox = eda_tests::postgres_url().await;
    let prefix = format!("{}_", eda_tests::fresh_namespace());
    let guards = [("EDA_TEST_OUTBOX", outbox.as_str()), ("EDA_TEST_OUTBOX_PREFIX", prefix.as_str())];
    group.start("a", &guards);
    // The first step of every key, handled by a alone: a is in the group, and its leader,
    // before b joins.
    group.publish(KEYS, 0..1).await;
    group.wait_for("a to handle the first steps", Duration::from_secs(60), |g| g.distinct() == KEYS as usize).await;
    group.start("b", &guards);
    let (taken, repeats) = group.kill_b_mid_stream(1..STEPS).await;
    // The broker's 15 s to drop the dead member, a rebalance, and the rest of the work.
    assert!(taken < Duration::from_secs(60), "took {taken:?}");
    // Only a handling that b's kill cut short runs again: what b committed to the guards and
    // not to Kafka comes again to a, and its guard absorbs it.
    assert!(repeats <= 256, "{repeats} handlings ran twice: more than b had in flight");
    group.stop();
    let stats = group.stats();
    eprintln!("repeats after the kill: {repeats}; (instance, handled, duplicates absorbed): {stats:?}");
    assert!(stats.iter().any(|(i, _, _)| i == "a"), "a stopped cleanly and wrote its stats: {stats:?}");
    group.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_instance_joining_mid_stream_gets_a_share_in_order() {
    let mut group = Group::new(SETTINGS);
    group.start("a", &[]);
    group.start("b", &[]);
    group.publish(KEYS, 0..STEPS / 2).await;
    group.wait_for("a quarter of the steps", Duration::from_secs(120), |g| g.distinct() >= ALL / 4).await;
    group.start("c", &[]);
    // Two heartbeats: the others see c and hand partitions over while the work goes on.
    let second_half = group.publish(KEYS, STEPS / 2..STEPS);
    let (_, ()) = tokio::join!(tokio::time::sleep(Duration::from_secs(2)), second_half);
    group.wait_for("every step", Duration::from_secs(120), |g| g.distinct() == ALL).await;
    let handlings = group.handlings();
    assert_in_order(&handlings, &[]);
    assert!(instances(&handlings).contains("c"), "the instance that joined took a share");
    group.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_event_holds_back_its_own_key_only() {
    // A window wider than a partition's share of the work: only the poisoned key waits.
    let mut group = Group::new(&format!("{SETTINGS}&window=4096"));
    group.start("a", &[("EDA_TEST_POISON", "7:10")]);
    group.publish(KEYS, 0..STEPS).await;
    let others = (ALL - STEPS as usize) + 10;
    group.wait_for("every other key", Duration::from_secs(120), |g| g.distinct() >= others).await;
    // A while more, in which key 7 must not move.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let handlings = group.handlings();
    let key7 = handlings.iter().filter(|(_, k, _)| *k == 7).map(|(_, _, s)| *s).max();
    assert_eq!(key7, Some(9), "key 7 waits behind its poisoned step while the others finish");
    std::fs::write(format!("{}.cured", group.log.path().display()), b"").expect("the cure");
    group.wait_for("key 7 once its step is cured", Duration::from_secs(60), |g| g.distinct() == ALL).await;
    assert_in_order(&group.handlings(), &[]);
    group.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_that_crashes_every_owner_is_dead_lettered_after_max_deliver() {
    let mut group = Group::new("partitions=1&lease_ttl=1500ms&heartbeat=500ms&max_deliver=2");
    {
        let runtime =
            Runtime::builder(Registry::default()).transport(group.transport().await).start().await.expect("start");
        for seq in 0..20 {
            runtime.publisher().publish(&Step { key: 1, seq }).await.expect("published");
        }
        runtime.shutdown().await;
    }
    let poison = [("EDA_TEST_POISON", "1:0"), ("EDA_TEST_POISON_ABORT", "1")];
    let mut crashes = 0;
    for run in 0..4 {
        group.start(&format!("run{run}"), &poison);
        let deadline = Instant::now() + Duration::from_secs(15);
        let crashed = loop {
            let (_, child) = group.children.last_mut().expect("started");
            if let Some(status) = child.try_wait().expect("status") {
                break !status.success();
            }
            if group.distinct() == 19 || Instant::now() > deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        if !crashed {
            break;
        }
        crashes += 1;
    }
    assert_eq!(crashes, 2, "two owners died on the event; the third dead-lettered it");
    group.wait_for("the steps behind it", Duration::from_secs(20), |g| g.distinct() == 19).await;
    let dead = group.transport().await.dead_letters_of("ordered").await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].attempts, 2, "{:?}", dead[0].reason);
    assert!(dead[0].reason.error.contains("without being settled"), "{}", dead[0].reason.error);
    group.done().await;
}

/// What the tests read of dead letters.
trait DeadLetters {
    async fn dead_letters_of(&self, group: &str) -> Vec<eda::DeadLetter>;
}

impl DeadLetters for NatsTransport {
    async fn dead_letters_of(&self, group: &str) -> Vec<eda::DeadLetter> {
        let store = self.dead_letter_store().expect("NATS keeps dead letters");
        store.dead_letters(Some(group)).await.expect("listed").into_iter().map(|d| d.letter).collect()
    }
}
