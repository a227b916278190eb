//! Durability across processes on the SQLite log: a consumer that was down catches up from its
//! stored offset, and a consumer killed with SIGKILL again and again still applies every event's
//! effects exactly once, its emitted events included.

use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use eda::sqlite::sqlx;
use eda::Transport;

const NODE: &str = env!("CARGO_BIN_EXE_eda-test-node");

fn node(args: &[&str]) -> Child {
    Command::new(NODE).args(args).spawn().expect("the test node starts")
}

fn run_node(args: &[&str]) -> ExitStatus {
    node(args).wait().expect("the test node runs")
}

fn wait_with_timeout(child: &mut Child, timeout: Duration) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            panic!("the test node did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Counts {
    effects: i64,
    distinct_effects: i64,
    tallies: i64,
    distinct_tallies: i64,
}

async fn counts(url: &str) -> Counts {
    let transport = eda_tests::reopen(url).await;
    let pool = transport.pool();
    let one = |sql: &'static str| async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(pool).await.expect(sql) };
    Counts {
        effects: one("SELECT COUNT(*) FROM effects").await,
        distinct_effects: one("SELECT COUNT(DISTINCT n) FROM effects").await,
        tallies: one("SELECT COUNT(*) FROM tallies").await,
        distinct_tallies: one("SELECT COUNT(DISTINCT n) FROM tallies").await,
    }
}

async fn lag(url: &str, group: &str, topic: &str) -> u64 {
    let transport = eda_tests::reopen(url).await;
    transport.lag(group, topic).await.expect("lag").iter().map(|p| p.lag).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_was_down_catches_up_from_its_stored_offset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("eda.db").display());

    assert!(run_node(&["publish", &url, "100", "0"]).success());
    let mut consumer = node(&["consume", &url, "100"]);
    assert!(wait_with_timeout(&mut consumer, Duration::from_secs(60)).success());

    // The consumer is down while 100 more events are published.
    assert!(run_node(&["publish", &url, "100", "100"]).success());
    assert_eq!(lag(&url, "workers", "work").await, 100, "the new events wait for the consumer");

    let mut consumer = node(&["consume", &url, "200"]);
    assert!(wait_with_timeout(&mut consumer, Duration::from_secs(60)).success());
    let c = counts(&url).await;
    assert_eq!((c.effects, c.distinct_effects), (200, 200), "every event applied once");
    assert_eq!((c.tallies, c.distinct_tallies), (200, 200), "every emitted event applied once");
    assert_eq!(lag(&url, "workers", "work").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_loses_nothing_and_applies_nothing_twice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("eda.db").display());
    assert!(run_node(&["publish", &url, "2000", "0"]).success());

    let mut consumer = node(&["consume", &url, "2000"]);
    std::thread::sleep(Duration::from_millis(700));
    let pid = consumer.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().expect("kill runs").success());
    assert!(wait_with_timeout(&mut consumer, Duration::from_secs(30)).success(), "a graceful stop exits 0");
    let stopped = counts(&url).await;
    assert!(stopped.tallies < 2000, "stopped mid-stream ({} of 2000 done)", stopped.tallies);

    let mut consumer = node(&["consume", &url, "2000"]);
    assert!(wait_with_timeout(&mut consumer, Duration::from_secs(120)).success());
    let c = counts(&url).await;
    assert_eq!((c.effects, c.distinct_effects), (2000, 2000));
    assert_eq!((c.tallies, c.distinct_tallies), (2000, 2000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_still_applies_every_effect_exactly_once() {
    const EVENTS: u32 = 10_000;
    const KILLS: usize = 20;
    let seed = std::env::var("EDA_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| fastrand::u64(..));
    println!("crash test seed {seed} (set EDA_CRASH_SEED to repeat it)");
    let mut rng = fastrand::Rng::with_seed(seed);

    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("eda.db").display());
    assert!(run_node(&["publish", &url, &EVENTS.to_string(), "0"]).success());

    let expected = EVENTS.to_string();
    let mut kills = 0;
    while kills < KILLS {
        let mut consumer = node(&["consume", &url, &expected]);
        std::thread::sleep(Duration::from_millis(rng.u64(150..900)));
        if consumer.try_wait().expect("try_wait").is_some() {
            break; // finished before this kill: nothing left to interrupt
        }
        consumer.kill().expect("SIGKILL");
        consumer.wait().expect("reaped");
        kills += 1;
    }
    let mut consumer = node(&["consume", &url, &expected]);
    assert!(wait_with_timeout(&mut consumer, Duration::from_secs(300)).success());

    let c = counts(&url).await;
    println!("{kills} kills; {} effects, {} tallies", c.effects, c.tallies);
    assert!(kills >= KILLS, "only {kills} kills happened before the work was done: make the work longer");
    assert_eq!(
        (c.effects, c.distinct_effects),
        (i64::from(EVENTS), i64::from(EVENTS)),
        "each event's effect exactly once"
    );
    assert_eq!(
        (c.tallies, c.distinct_tallies),
        (i64::from(EVENTS), i64::from(EVENTS)),
        "each emitted event's effect exactly once"
    );
}
