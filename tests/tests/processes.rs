//! Durability across processes on the SQL log, SQLite and PostgreSQL alike: a consumer that was
//! down catches up from its stored offset, a consumer stopped by SIGTERM mid-stream finishes
//! later, and a consumer killed with SIGKILL again and again still applies every event's effects
//! exactly once, its emitted events included.

use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use eda::sql::sqlx;
use eda::Transport;

const NODE: &str = env!("CARGO_BIN_EXE_eda-test-node");

/// A test database, and the test node run against it (with a broker beside it, when given).
struct Target(eda_tests::TestDb, Option<String>);

impl std::ops::Deref for Target {
    type Target = eda_tests::TestDb;
    fn deref(&self) -> &eda_tests::TestDb {
        &self.0
    }
}

impl Target {
    async fn new(postgres: bool) -> Self {
        Self(eda_tests::TestDb::new(postgres).await, None)
    }

    /// A SQLite inbox and outbox beside NATS, in a namespace of the test's own.
    async fn beside_nats(namespace: &str) -> Self {
        let broker = format!("{}?namespace={namespace}&ack_wait=2s&max_age=1h", eda_tests::nats_url());
        Self(eda_tests::TestDb::new(false).await, Some(broker))
    }

    fn node(&self, args: &[&str]) -> Child {
        self.node_named("node", args)
    }

    /// A node with an instance id of its own, to run beside others.
    fn node_named(&self, instance: &str, args: &[&str]) -> Child {
        self.node_with(&[("EDA_TEST_INSTANCE", instance)], args)
    }

    /// A node with these environment variables.
    fn node_with(&self, env: &[(&str, &str)], args: &[&str]) -> Child {
        let (mode, rest) = args.split_first().expect("a mode");
        let mut node = Command::new(NODE);
        node.envs(env.iter().copied());
        node.arg(mode).arg(&self.url).arg(&self.prefix).args(rest);
        if let Some(broker) = &self.1 {
            node.env("EDA_TEST_BROKER", broker);
        }
        node.spawn().expect("the test node starts")
    }

    fn run(&self, args: &[&str]) -> ExitStatus {
        self.node(args).wait().expect("the test node runs")
    }

    async fn counts(&self) -> Counts {
        Counts {
            effects: self.count("SELECT COUNT(*) FROM {p}effects").await,
            distinct_effects: self.count("SELECT COUNT(DISTINCT n) FROM {p}effects").await,
            tallies: self.count("SELECT COUNT(*) FROM {p}tallies").await,
            distinct_tallies: self.count("SELECT COUNT(DISTINCT n) FROM {p}tallies").await,
        }
    }

    /// Each key's effects (keys are `n % 50`) in the order they were applied, checked to be
    /// the order of the events.
    async fn assert_effects_in_key_order(&self) {
        let db = self.open().await;
        let sql = format!("SELECT n FROM {}effects ORDER BY id", self.prefix);
        let applied: Vec<i64> = sqlx::query_scalar(&sql).fetch_all(db.pool()).await.expect("effects");
        let mut last: std::collections::HashMap<i64, i64> = std::collections::HashMap::new();
        for n in applied {
            if let Some(before) = last.insert(n % 50, n) {
                assert!(before < n, "key {}: effect of {n} applied after that of {before}", n % 50);
            }
        }
    }

    async fn lag(&self, group: &str, topic: &str) -> u64 {
        self.open().await.lag(group, topic).await.expect("lag").iter().map(|p| p.lag).sum()
    }
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

#[derive(Debug)]
struct Counts {
    effects: i64,
    distinct_effects: i64,
    tallies: i64,
    distinct_tallies: i64,
}

async fn a_consumer_that_was_down_catches_up_from_its_stored_offset(postgres: bool) {
    let db = Target::new(postgres).await;
    assert!(db.run(&["publish", "100", "0"]).success());
    let mut consumer = db.node(&["consume", "100"]);
    assert!(wait_with_timeout(&mut consumer, Duration::from_secs(60)).success());

    // The consumer is down while 100 more events are published.
    assert!(db.run(&["publish", "100", "100"]).success());
    assert_eq!(db.lag("workers", "work").await, 100, "the new events wait for the consumer");

    let mut consumer = db.node(&["consume", "200"]);
    assert!(wait_with_timeout(&mut consumer, Duration::from_secs(60)).success());
    let c = db.counts().await;
    assert_eq!((c.effects, c.distinct_effects), (200, 200), "every event applied once");
    assert_eq!((c.tallies, c.distinct_tallies), (200, 200), "every emitted event applied once");
    assert_eq!(db.lag("workers", "work").await, 0);
}

async fn sigterm_mid_stream_loses_nothing_and_applies_nothing_twice(postgres: bool) {
    let db = Target::new(postgres).await;
    assert!(db.run(&["publish", "2000", "0"]).success());

    let mut consumer = db.node(&["consume", "2000"]);
    std::thread::sleep(Duration::from_millis(700));
    let pid = consumer.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().expect("kill runs").success());
    assert!(wait_with_timeout(&mut consumer, Duration::from_secs(30)).success(), "a graceful stop exits 0");
    let stopped = db.counts().await;
    assert!(stopped.tallies < 2000, "stopped mid-stream ({} of 2000 done)", stopped.tallies);

    let mut consumer = db.node(&["consume", "2000"]);
    assert!(wait_with_timeout(&mut consumer, Duration::from_secs(120)).success());
    let c = db.counts().await;
    assert_eq!((c.effects, c.distinct_effects), (2000, 2000));
    assert_eq!((c.tallies, c.distinct_tallies), (2000, 2000));
}

async fn sigkill_at_random_moments_still_applies_every_effect_exactly_once(postgres: bool) {
    sigkill_at_random_moments(Target::new(postgres).await, 10_000, 20).await
}

/// On NATS, with the inbox and outbox in SQLite beside it: a killed consumer's acks may be lost
/// and its unacknowledged events come back after the ack wait; the guard records that committed
/// with the effects absorb them, and the relay carries each emitted event once in effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_on_nats_with_the_outbox_beside_it_still_applies_every_effect_exactly_once() {
    let namespace = eda_tests::fresh_namespace();
    sigkill_at_random_moments(Target::beside_nats(&namespace).await, 3_000, 10).await;
    let nats = eda_tests::nats_options().namespace(namespace).connect().await.expect("NATS answers");
    nats.delete_namespace().await.expect("the test's streams can be deleted");
}

/// The deliveries the nodes that wrote into `dir` absorbed as duplicates.
fn duplicates_absorbed(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .expect("the nodes' counts")
        .map(|f| std::fs::read_to_string(f.expect("a count").path()).expect("readable"))
        .map(|n| n.trim().parse::<u64>().unwrap_or(0))
        .sum()
}

async fn sigkill_at_random_moments(db: Target, events: u32, kills_wanted: usize) {
    let stats = tempfile::tempdir().expect("a directory for the nodes' counts");
    let stats_dir = stats.path().to_str().expect("a UTF-8 temporary path").to_owned();
    let node = |args: &[&str]| db.node_with(&[("EDA_TEST_STATS_DIR", stats_dir.as_str())], args);
    let seed = std::env::var("EDA_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| fastrand::u64(..));
    println!("crash test seed {seed} (set EDA_CRASH_SEED to repeat it)");
    let mut rng = fastrand::Rng::with_seed(seed);
    assert!(db.run(&["publish", &events.to_string(), "0"]).success());

    let expected = events.to_string();
    let all = i64::from(events);
    let mut kills = 0;
    while kills < kills_wanted {
        let before = db.counts().await.effects;
        let mut consumer = node(&["consume", &expected]);
        std::thread::sleep(Duration::from_millis(rng.u64(150..900)));
        let handled = db.counts().await.effects;
        if consumer.try_wait().expect("try_wait").is_some() {
            break; // finished before this kill: nothing left to interrupt
        }
        consumer.kill().expect("SIGKILL");
        consumer.wait().expect("reaped");
        // Only a kill that interrupted work counts: this node handled some, and not all.
        if before < handled && handled < all {
            kills += 1;
        }
    }
    let mut consumer = node(&["consume", &expected]);
    assert!(wait_with_timeout(&mut consumer, Duration::from_secs(300)).success());

    let c = db.counts().await;
    // Deliveries that came again after their effects had committed, absorbed by the guards.
    let again = duplicates_absorbed(stats.path());
    println!("{kills} kills; {c:?}; {again} deliveries absorbed as duplicates");
    assert!(kills >= kills_wanted, "only {kills} kills interrupted work before it was done: make the work longer");
    assert_eq!((c.effects, c.distinct_effects), (all, all), "each event's effect exactly once");
    assert_eq!((c.tallies, c.distinct_tallies), (all, all), "each emitted event's effect exactly once");
    db.assert_effects_in_key_order().await;
    if db.1.is_some() {
        // On a broker the ack follows the commit: a kill between the two brings the event
        // again, and only the guard stops it being applied twice. Some kill must have landed
        // there, or this test never met the case it is about.
        assert!(again > 0, "no kill landed between a commit and its ack: nothing came again");
    }
}

/// Two consumers; one is paused (SIGSTOP) past its lease while it holds partitions, the other
/// takes them over, and the paused one wakes (SIGCONT) with handlings in flight: its late
/// commits must be fenced off by the partitions' positions. Every effect once, in key order,
/// and no partition's position ever moved back (a trigger records any update that would: the
/// guards alone would hide a stale commit's rewind, absorbing the repeats it causes).
///
/// PostgreSQL only: on SQLite a process paused inside its write transaction holds the
/// database-wide write lock, so no other instance can take anything over until it wakes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_paused_past_its_lease_is_fenced_when_it_wakes() {
    const EVENTS: u32 = 4000;
    let db = Target::new(true).await;
    assert!(db.run(&["publish", &EVENTS.to_string(), "0"]).success());
    let p = &db.prefix;
    for ddl in [
        format!("CREATE TABLE {p}rewinds (partition INT NOT NULL, from_position BIGINT NOT NULL, to_position BIGINT NOT NULL)"),
        format!(
            "CREATE FUNCTION {p}note_rewind() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
                 IF NEW.position < OLD.position THEN
                     INSERT INTO {p}rewinds VALUES (OLD.partition, OLD.position, NEW.position);
                 END IF;
                 RETURN NEW;
             END $$"
        ),
        format!("CREATE TRIGGER {p}rewind BEFORE UPDATE ON {p}offsets FOR EACH ROW EXECUTE FUNCTION {p}note_rewind()"),
    ] {
        db.execute(&ddl).await;
    }
    let expected = EVENTS.to_string();
    let stats = tempfile::tempdir().expect("a directory for the nodes' counts");
    let stats_dir = stats.path().to_str().expect("a UTF-8 temporary path");
    let node =
        |name| db.node_with(&[("EDA_TEST_INSTANCE", name), ("EDA_TEST_STATS_DIR", stats_dir)], &["consume", &expected]);
    let mut paused = node("a");
    let mut other = node("b");
    let deadline = Instant::now() + Duration::from_secs(60);
    while db.counts().await.effects < 300 {
        assert!(Instant::now() < deadline, "the consumers never got going");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = paused.id().to_string();
    assert!(Command::new("kill").args(["-STOP", &pid]).status().expect("kill runs").success());
    let at_pause = db.counts().await.effects;
    // Past the lease (2 s): the other consumer takes the paused one's partitions and goes on.
    std::thread::sleep(Duration::from_secs(5));
    let while_paused = db.counts().await.effects;
    assert!(Command::new("kill").args(["-CONT", &pid]).status().expect("kill runs").success());
    assert!(while_paused > at_pause, "the other consumer took over ({at_pause} → {while_paused})");
    assert!(while_paused < i64::from(EVENTS), "the pause ended before the work did: make the work longer");
    assert!(wait_with_timeout(&mut other, Duration::from_secs(300)).success());
    assert!(wait_with_timeout(&mut paused, Duration::from_secs(300)).success());
    let c = db.counts().await;
    let all = i64::from(EVENTS);
    assert_eq!((c.effects, c.distinct_effects), (all, all), "each event's effect exactly once");
    assert_eq!((c.tallies, c.distinct_tallies), (all, all), "each emitted event's effect exactly once");
    db.assert_effects_in_key_order().await;
    let rewinds = db.count("SELECT COUNT(*) FROM {p}rewinds").await;
    db.execute(&format!("DROP FUNCTION {p}note_rewind() CASCADE")).await;
    assert_eq!(rewinds, 0, "a stale commit moved a partition's position back");
    // The case this test is about: the pause caught handlings in flight, which the other
    // consumer then ran too; one of each pair was turned away.
    assert!(duplicates_absorbed(stats.path()) > 0, "the pause caught no handling in flight");
}

/// The PostgreSQL review's defect 10: leases were judged by each instance's own clock, so an
/// instance whose clock ran ahead saw live leases as expired and took them every round, and
/// wrote leases that looked live to the others for as long as it ran ahead. Both nodes here
/// run side by side, one with its wall clock 30 s ahead (a preloaded `clock_gettime`): every
/// lease must still end within a lease of the database's own time, and every effect apply once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_whose_clock_runs_ahead_neither_takes_live_leases_nor_writes_long_ones() {
    const EVENTS: u32 = 3000;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let shim = dir.path().join("clock_ahead.so");
    let source = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/clock_ahead.c");
    let built = Command::new("cc").args(["-shared", "-fPIC", "-o"]).arg(&shim).arg(source).arg("-ldl").status();
    assert!(built.expect("cc runs (it links Rust programs too)").success(), "the clock shim compiles");
    let shim = shim.to_str().expect("a UTF-8 temporary path");

    let db = Target::new(true).await;
    assert!(db.run(&["publish", &EVENTS.to_string(), "0"]).success());
    let expected = EVENTS.to_string();
    let mut on_time = db.node_named("on-time", &["consume", &expected]);
    let mut ahead = db.node_with(
        &[("EDA_TEST_INSTANCE", "ahead"), ("LD_PRELOAD", shim), ("EDA_TEST_CLOCK_AHEAD_MS", "30000")],
        &["consume", &expected],
    );
    let p = &db.prefix;
    let db_now = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)";
    // The nodes' leases last 2 s: none may end later than that (and a little) past now.
    let furthest = format!("SELECT COALESCE(MAX(expires_at), 0) - {db_now} FROM {p}leases");
    let mut worst = i64::MIN;
    let deadline = Instant::now() + Duration::from_secs(60);
    while db.counts().await.effects < i64::from(EVENTS) && Instant::now() < deadline {
        worst = worst.max(db.count(&furthest).await);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(wait_with_timeout(&mut on_time, Duration::from_secs(120)).success());
    assert!(wait_with_timeout(&mut ahead, Duration::from_secs(120)).success());
    println!("the furthest lease ended {worst} ms past the database's now");
    assert!(worst <= 3_000, "a lease ran {worst} ms past the database's time: written by the clock that runs ahead");
    let c = db.counts().await;
    let all = i64::from(EVENTS);
    assert_eq!((c.effects, c.distinct_effects), (all, all), "each event's effect exactly once");
    db.assert_effects_in_key_order().await;
}

async fn a_poison_event_is_dead_lettered_while_the_rest_flow_and_is_replayed_from_the_command_line(postgres: bool) {
    const EVENTS: i64 = 10_000;
    let db = Target::new(postgres).await;
    assert!(db.run(&["publish", &EVENTS.to_string(), "0"]).success());
    // Work 0 chokes: after its 3 attempts it is dead-lettered, and everything else is applied,
    // including the work behind it on its key (keys are n % 50).
    let mut consumer = db.node(&["poison", &(EVENTS - 1).to_string()]);
    assert!(wait_with_timeout(&mut consumer, Duration::from_secs(300)).success());

    let transport = db.open().await;
    let pool = transport.pool();
    let p = &db.prefix;
    let key_zero: Vec<i64> = sqlx::query_scalar(&format!("SELECT n FROM {p}effects WHERE n % 50 = 0 ORDER BY id"))
        .fetch_all(pool)
        .await
        .expect("effects");
    assert_eq!(key_zero, (1..200).map(|i| i * 50).collect::<Vec<_>>(), "the poison's key went on, in order");
    let effects: i64 =
        sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {p}effects")).fetch_one(pool).await.expect("count");
    assert_eq!(effects, EVENTS - 1);
    db.assert_effects_in_key_order().await;

    let list = dlq(&db, &["list"], false);
    assert!(
        list.contains("Work.v1") && list.contains("poisoned/apply_or_choke") && list.contains("choked on work 0"),
        "{list}"
    );
    let id = list.lines().nth(1).and_then(|l| l.split_whitespace().next()).expect("a dead letter row").to_owned();
    let shown = dlq(&db, &["show", &id], false);
    assert!(shown.contains("attempts     3 (retries exhausted)") && shown.contains("\"n\":0"), "{shown}");

    // Still broken: the replay fails again and the dead letter stays.
    let again = dlq(&db, &["replay", &id], false);
    assert!(again.contains("failed again"), "{again}");
    // Fixed: handled once, and gone.
    let replayed = dlq(&db, &["replay", &id], true);
    assert!(replayed.contains("handled and removed"), "{replayed}");
    assert!(dlq(&db, &["list"], true).contains("no dead letters"));
    let zero: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {p}effects WHERE n = 0"))
        .fetch_one(pool)
        .await
        .expect("count");
    assert_eq!(zero, 1, "the poison's effect, exactly once");
    let status = db.node(&["dlq", "replay", &id]).wait().expect("runs");
    assert!(!status.success(), "replaying a dead letter that is gone is an error");
}

/// README: "a crash does not reset failed attempts" (on the SQL log, where they are kept in
/// the database). The poison's handler (limit 3) fails once, its process is killed during the
/// backoff, and a new process finishes the count: three calls in all, then the dead letter.
async fn a_crash_does_not_reset_failed_attempts(postgres: bool) {
    let db = Target::new(postgres).await;
    assert!(db.run(&["publish", "1", "0"]).success());
    let dir = tempfile::tempdir().expect("tempdir");
    let calls_file = dir.path().join("calls");
    let calls = || std::fs::read_to_string(&calls_file).map_or(0, |c| c.lines().count());
    let env = [("EDA_TEST_CALLS", calls_file.to_str().expect("a path")), ("EDA_TEST_BACKOFF_MS", "3000")];
    let mut first = db.node_with(&env, &["poison", "0"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while calls() < 1 {
        assert!(Instant::now() < deadline, "the poison was never handled");
        std::thread::sleep(Duration::from_millis(10));
    }
    // In the backoff after the first failure (recorded before it).
    std::thread::sleep(Duration::from_millis(500));
    first.kill().expect("SIGKILL");
    first.wait().expect("reaped");
    assert_eq!(calls(), 1, "killed before a second attempt");
    let mut second = db.node_with(&env, &["poison", "0"]);
    assert!(wait_with_timeout(&mut second, Duration::from_secs(120)).success());
    assert_eq!(calls(), 3, "the limit is 3 attempts in all, across the crash");
    let list = dlq(&db, &["list"], false);
    let id = list.lines().nth(1).and_then(|l| l.split_whitespace().next()).expect("a dead letter row").to_owned();
    let shown = dlq(&db, &["show", &id], false);
    assert!(shown.contains("attempts     3 (retries exhausted)"), "{shown}");
}

/// Two live processes given the same `instance_id` would be one owner to the leases: each
/// renewing, taking and releasing the other's partitions, both handling them. The second is
/// refused at start and says why; the first goes on undisturbed. (A restart after a crash under
/// the same name, where the old process is gone, is what the SIGKILL tests do throughout.)
async fn a_second_live_process_with_the_same_instance_id_is_refused(postgres: bool) {
    const EVENTS: u32 = 3000;
    let db = Target::new(postgres).await;
    assert!(db.run(&["publish", &EVENTS.to_string(), "0"]).success());
    let expected = EVENTS.to_string();
    let mut first = db.node_named("twin", &["consume", &expected]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while db.counts().await.effects < 50 {
        assert!(Instant::now() < deadline, "the first consumer never got going");
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = Command::new(NODE)
        .args(["consume", &db.url, &db.prefix, &expected])
        .env("EDA_TEST_INSTANCE", "twin")
        .output()
        .expect("the test node runs");
    let said = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "a second live process under one instance id started");
    assert!(said.contains("another live process consumes") && said.contains("`twin`"), "{said}");
    assert!(wait_with_timeout(&mut first, Duration::from_secs(300)).success());
    let c = db.counts().await;
    let all = i64::from(EVENTS);
    assert_eq!((c.effects, c.distinct_effects), (all, all), "each event's effect exactly once");
    db.assert_effects_in_key_order().await;
}

/// Runs a `dlq` command of the test node and returns what it printed.
fn dlq(db: &Target, args: &[&str], fixed: bool) -> String {
    let output = Command::new(NODE)
        .arg("dlq")
        .arg(&db.url)
        .arg(&db.prefix)
        .args(args)
        .env("EDA_TEST_FIXED", if fixed { "1" } else { "0" })
        .output()
        .expect("the test node runs");
    assert!(output.status.success(), "dlq {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

eda_tests::on_sql_databases! {
    a_consumer_that_was_down_catches_up_from_its_stored_offset,
    sigterm_mid_stream_loses_nothing_and_applies_nothing_twice,
    sigkill_at_random_moments_still_applies_every_effect_exactly_once,
    a_crash_does_not_reset_failed_attempts,
    a_second_live_process_with_the_same_instance_id_is_refused,
    a_poison_event_is_dead_lettered_while_the_rest_flow_and_is_replayed_from_the_command_line,
}
