//! The inbox and the transactional outbox beside a broker, on SQLite and PostgreSQL: handlings
//! keep their guard records, their writes and the events they emit in the database in one
//! transaction; application code publishes in its own transaction; the relay carries the
//! outbox to the broker in order per key; and a relay killed between the broker's
//! acknowledgement and recording it makes duplicates that the consumers' guards absorb.

use std::collections::BTreeMap;
use std::process::{Command, ExitStatus};
use std::sync::Mutex;
use std::time::Duration;

use eda::sql::{sqlx, SqlTransport};
use eda::transport::MemoryTransport;
use eda::{event, handler, Ctx, HandlerError, Registry, Runtime};
use serde::{Deserialize, Serialize};

const SETTLE: Duration = Duration::from_secs(30);
const NODE: &str = env!("CARGO_BIN_EXE_eda-test-node");

#[event(topic = "accounts", key = account)]
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Deposited {
    account: String,
    seq: u32,
}

#[event(topic = "ledger", key = account)]
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Credited {
    account: String,
    seq: u32,
}

/// The ledger service's table, under the test's prefix.
struct Ledger {
    insert: String,
}

#[handler(group = "ledger")]
async fn credit(ev: Deposited, cx: Ctx<'_, Ledger>) -> Result<Credited, HandlerError> {
    let mut tx = eda::sql::transaction(&cx).await?;
    sqlx::query(&cx.insert).bind(&ev.account).bind(i64::from(ev.seq)).execute(&mut **tx).await?;
    Ok(Credited { account: ev.account, seq: ev.seq })
}

#[derive(Default)]
struct Notified(Mutex<Vec<(String, u32)>>);

#[handler(group = "notifier")]
async fn notify(ev: Credited, seen: Ctx<'_, Notified>) {
    seen.0.lock().expect("lock").push((ev.account, ev.seq));
}

/// A database to serve as the outbox, with the ledger's table, under a fresh prefix.
struct Outbox {
    db: SqlTransport,
    prefix: String,
    test_db: eda_tests::TestDb,
}

impl Outbox {
    async fn new(postgres: bool) -> Self {
        let test_db = eda_tests::TestDb::new(postgres).await;
        let db = test_db.open().await;
        let prefix = test_db.prefix.clone();
        for ddl in [
            format!("CREATE TABLE {prefix}credits (account TEXT NOT NULL, seq BIGINT NOT NULL)"),
            format!("CREATE TABLE {prefix}orders (id TEXT NOT NULL)"),
        ] {
            sqlx::query(&ddl).execute(db.pool()).await.expect("test tables");
        }
        Self { db, prefix, test_db }
    }

    async fn count(&self, sql: &str) -> i64 {
        self.test_db.count(sql).await
    }

    async fn runtime(&self, broker: &MemoryTransport) -> Runtime {
        let registry = Registry::builder().handler::<credit>().handler::<notify>().publishes::<Deposited>().build();
        Runtime::builder(registry)
            .state(Ledger { insert: format!("INSERT INTO {}credits (account, seq) VALUES ($1, $2)", self.prefix) })
            .state(Notified::default())
            .transport(broker.clone())
            .outbox(self.db.clone())
            .start()
            .await
            .expect("start")
    }
}

async fn emitted_events_leave_through_the_outbox_once_and_in_order_per_key(postgres: bool) {
    let outbox = Outbox::new(postgres).await;
    let broker = MemoryTransport::new();
    let rt = outbox.runtime(&broker).await;
    let mut first = None;
    for seq in 0..20 {
        for account in ["a", "b", "c", "d", "e"] {
            let envelope = rt.publisher().publish(&Deposited { account: account.into(), seq }).await.expect("publish");
            first.get_or_insert(envelope);
        }
    }
    // A producer retry of the very same envelope: the guard record in the database absorbs it.
    rt.publisher().republish(first.as_ref().expect("published")).await.expect("republish");
    rt.settled(SETTLE).await.expect("settled");

    assert_eq!(outbox.count("SELECT COUNT(*) FROM {p}credits").await, 100, "each deposit credited once");
    assert_eq!(
        outbox.count("SELECT COUNT(*) FROM {p}inbox").await,
        200,
        "a guard record per handling, in the database, for both groups"
    );
    assert_eq!(rt.stats().duplicates, 1);
    let seen = rt.state::<Notified>().expect("state").0.lock().expect("lock").clone();
    let mut by_account: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for (account, seq) in seen {
        by_account.entry(account).or_default().push(seq);
    }
    assert_eq!(by_account.len(), 5);
    for (account, seqs) in by_account {
        assert_eq!(seqs, (0..20).collect::<Vec<_>>(), "account {account}: relayed once each, in order");
    }
    rt.shutdown().await;
}

async fn application_code_publishes_in_its_own_transaction(postgres: bool) {
    let outbox = Outbox::new(postgres).await;
    let broker = MemoryTransport::new();
    let rt = outbox.runtime(&broker).await;
    let orders = format!("INSERT INTO {}orders (id) VALUES ($1)", outbox.prefix);

    // Rolled back: neither the order nor its event exist.
    let mut tx = outbox.db.pool().begin().await.expect("begin");
    sqlx::query(&orders).bind("o-1").execute(&mut *tx).await.expect("insert");
    outbox.db.publish_in(&mut tx, "shop", &Deposited { account: "x".into(), seq: 1 }).await.expect("publish_in");
    tx.rollback().await.expect("rollback");

    // Committed: both.
    let mut tx = outbox.db.pool().begin().await.expect("begin");
    sqlx::query(&orders).bind("o-2").execute(&mut *tx).await.expect("insert");
    let env =
        outbox.db.publish_in(&mut tx, "shop", &Deposited { account: "y".into(), seq: 2 }).await.expect("publish_in");
    tx.commit().await.expect("commit");

    rt.settled(SETTLE).await.expect("settled");
    assert_eq!(outbox.count("SELECT COUNT(*) FROM {p}orders").await, 1);
    assert_eq!(outbox.count("SELECT COUNT(*) FROM {p}credits").await, 1, "only the committed event was relayed");
    let seen = rt.state::<Notified>().expect("state").0.lock().expect("lock").clone();
    assert_eq!(seen, vec![("y".to_owned(), 2)]);
    let trace = rt.trace(&env.correlation_id);
    assert!(trace.iter().any(|e| e.ty == "Credited.v1"), "the chain continued through the broker: {trace:?}");
    rt.shutdown().await;
}

fn node(args: &[&str]) -> std::process::Child {
    Command::new(NODE).args(args).spawn().expect("the test node starts")
}

fn run(args: &[&str]) -> ExitStatus {
    node(args).wait().expect("the test node runs")
}

async fn a_relay_killed_between_publish_and_record_makes_duplicates_that_guards_absorb(postgres: bool) {
    const EVENTS: u32 = 300;
    let mut rng = fastrand::Rng::new();
    let (outbox_url, outbox_prefix) = if postgres {
        (eda_tests::postgres_url().await, eda_tests::fresh_prefix())
    } else {
        ("sqlite://{dir}/outbox.db".to_owned(), "eda_".to_owned())
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let outbox_url = outbox_url.replace("{dir}", &dir.path().display().to_string());
    let target_url = format!("sqlite://{}", dir.path().join("target.db").display());

    assert!(run(&["publish", &outbox_url, &outbox_prefix, &EVENTS.to_string(), "0"]).success());
    let relay = ["relay", &outbox_url, &outbox_prefix, &target_url, "eda_"];
    let mut kills = 0;
    for _ in 0..10 {
        let mut relaying = node(&relay);
        std::thread::sleep(Duration::from_millis(rng.u64(150..450)));
        if relaying.try_wait().expect("try_wait").is_some() {
            break;
        }
        relaying.kill().expect("SIGKILL");
        relaying.wait().expect("reaped");
        kills += 1;
    }
    assert!(run(&relay).success(), "the last relay run carries the rest");

    let target = eda_tests::sql_options(&target_url).connect().await.expect("the target opens");
    let carried: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM eda_log WHERE topic = 'work'")
        .fetch_one(target.pool())
        .await
        .expect("count");
    let distinct: i64 = sqlx::query_scalar("SELECT COUNT(DISTINCT id) FROM eda_log WHERE topic = 'work'")
        .fetch_one(target.pool())
        .await
        .expect("count");
    println!("{kills} kills; {carried} events carried for {distinct} distinct");
    assert_eq!(distinct, i64::from(EVENTS), "nothing lost");
    assert!(carried > i64::from(EVENTS), "a kill between publish and record duplicated some events ({kills} kills)");

    assert!(run(&["consume", &target_url, "eda_", &EVENTS.to_string()]).success());
    let effects: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM eda_effects").fetch_one(target.pool()).await.expect("count");
    let distinct_effects: i64 =
        sqlx::query_scalar("SELECT COUNT(DISTINCT n) FROM eda_effects").fetch_one(target.pool()).await.expect("count");
    let inbox_skips = carried - effects;
    assert_eq!(effects, i64::from(EVENTS), "the guards absorbed all {inbox_skips} duplicates");
    assert_eq!(distinct_effects, i64::from(EVENTS), "every event's effect, none twice");
}

eda_tests::on_sql_databases! {
    emitted_events_leave_through_the_outbox_once_and_in_order_per_key,
    application_code_publishes_in_its_own_transaction,
    a_relay_killed_between_publish_and_record_makes_duplicates_that_guards_absorb,
}
