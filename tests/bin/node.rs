//! A service process for the process-level tests: it publishes work, or consumes it with
//! handlers whose side effects are rows in the same database as the log, written in the handling's
//! transaction. Tests stop it, kill it and restart it, then count the rows.
//!
//! `eda-test-node publish <url> <prefix> <count> <first>` publishes `Work { n }` for n in
//! first..first+count. `eda-test-node consume <url> <prefix> <expected>` handles work until
//! `expected` tallies exist, then exits; SIGTERM (or ctrl-c) stops it gracefully before that.
//! With `EDA_TEST_STATS_DIR` set, it keeps the number of duplicate deliveries its guards
//! absorbed in a file named after its process id there, rewritten every 50 ms.
//! `eda-test-node relay <url> <prefix> <target-url> <target-prefix>` relays the log at `url`,
//! used as an outbox, into the log at `target-url` until everything is relayed; it pauses after
//! each event the target accepted, before recording it, so that a kill often lands in between.
//! `eda-test-node poison <url> <prefix> <expected>` handles work with a handler that fails on
//! `n == 0` (the poison) unless `EDA_TEST_FIXED=1`, until `expected` effects exist and the
//! poison is dead-lettered. `eda-test-node dlq <url> <prefix> <dlq command…>` runs eda's
//! dead-letter commands with that same handler.
//! `<prefix>` prefixes every table, eda's and the test's, so tests can share a database.
//! With `EDA_TEST_BROKER=nats://…` set, `publish` and `consume` run on that broker instead, and
//! the database at `<url>` becomes the inbox and outbox beside it (`.outbox(db)`): guard
//! records, effects and emitted events commit together there, and the relay carries the
//! emitted events to the broker.

use std::time::Duration;

use eda::sql::{sqlx, SqlOptions};
use eda::Transport as _;
use eda::{event, handler, Ctx, HandlerError, Registry, Runtime};
use serde::{Deserialize, Serialize};

#[event(topic = "work", key = key)]
#[derive(Serialize, Deserialize)]
struct Work {
    n: u32,
    key: u32,
}

#[event(topic = "applied", key = key)]
#[derive(Serialize, Deserialize)]
struct Applied {
    n: u32,
    key: u32,
}

/// The test's own tables, under the test's prefix.
struct Tables {
    insert_effect: String,
    insert_tally: String,
    count_tallies: String,
}

/// Applies the work: one row per handling, so a handling that happened twice shows.
#[handler(group = "workers")]
async fn apply(work: Work, cx: Ctx<'_, Tables>) -> Result<Applied, HandlerError> {
    let mut tx = eda::sql::transaction(&cx).await?;
    sqlx::query(&cx.insert_effect).bind(cx.event_id().to_string()).bind(i64::from(work.n)).execute(&mut **tx).await?;
    Ok(Applied { n: work.n, key: work.key })
}

/// Counts what was applied: the emitted events must arrive exactly once in effect too.
#[handler(group = "tally")]
async fn tally(applied: Applied, cx: Ctx<'_, Tables>) -> Result<(), HandlerError> {
    let mut tx = eda::sql::transaction(&cx).await?;
    sqlx::query(&cx.insert_tally).bind(i64::from(applied.n)).execute(&mut **tx).await?;
    Ok(())
}

/// A target that lingers after accepting each event: it widens the window between the
/// target's acknowledgement and the relay recording it, where a crash makes a duplicate.
struct Lingering(eda::sql::SqlTransport);

#[async_trait::async_trait]
impl eda::Transport for Lingering {
    fn kind(&self) -> &'static str {
        self.0.kind()
    }
    async fn publish(&self, envelope: &eda::Envelope) -> Result<(), eda::TransportError> {
        self.0.publish(envelope).await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok(())
    }
    async fn subscribe(&self, subscription: &eda::Subscription) -> Result<eda::Deliveries, eda::TransportError> {
        self.0.subscribe(subscription).await
    }
    async fn lag(&self, group: &str, topic: &str) -> Result<Vec<eda::PartitionLag>, eda::TransportError> {
        self.0.lag(group, topic).await
    }
}

/// Applies work, except the poison, until the bug is "fixed".
#[handler(group = "poisoned", max_attempts = 3)]
async fn apply_or_choke(work: Work, cx: Ctx<'_, Tables>) -> Result<(), HandlerError> {
    if work.n == 0 && std::env::var("EDA_TEST_FIXED").as_deref() != Ok("1") {
        // Each call on the poison is a line of EDA_TEST_CALLS, so a test counts them across
        // processes.
        if let Ok(path) = std::env::var("EDA_TEST_CALLS") {
            use std::io::Write;
            let mut calls = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
            writeln!(calls, "call")?;
        }
        return Err(HandlerError::transient("choked on work 0"));
    }
    let mut tx = eda::sql::transaction(&cx).await?;
    sqlx::query(&cx.insert_effect).bind(cx.event_id().to_string()).bind(i64::from(work.n)).execute(&mut **tx).await?;
    Ok(())
}

fn poison_registry() -> Registry {
    Registry::builder().handler::<apply_or_choke>().publishes::<Work>().build()
}

fn registry() -> Registry {
    Registry::builder().handler::<apply>().handler::<tally>().publishes::<Work>().build()
}

async fn transport(url: &str, prefix: &str) -> eda::Result<(eda::sql::SqlTransport, Tables)> {
    // A stable instance name: a restarted node takes its partitions back at once. Nodes that
    // run side by side are named apart with EDA_TEST_INSTANCE.
    let instance = std::env::var("EDA_TEST_INSTANCE").unwrap_or_else(|_| "node".to_owned());
    let transport = SqlOptions::new(url)
        .table_prefix(prefix)
        .instance_id(instance)
        .lease_ttl(Duration::from_secs(2))
        .connect()
        .await?;
    // The effects' own sequence shows the order they were applied in.
    let serial =
        if url.starts_with("postgres") { "id BIGSERIAL PRIMARY KEY" } else { "id INTEGER PRIMARY KEY AUTOINCREMENT" };
    for ddl in [
        format!("CREATE TABLE IF NOT EXISTS {prefix}effects ({serial}, event_id TEXT NOT NULL, n BIGINT NOT NULL)"),
        format!("CREATE TABLE IF NOT EXISTS {prefix}tallies (n BIGINT NOT NULL)"),
    ] {
        sqlx::query(&ddl)
            .execute(transport.pool())
            .await
            .map_err(|e| eda::Error::Config(format!("cannot create the test tables: {e}")))?;
    }
    let tables = Tables {
        insert_effect: format!("INSERT INTO {prefix}effects (event_id, n) VALUES ($1, $2)"),
        insert_tally: format!("INSERT INTO {prefix}tallies (n) VALUES ($1)"),
        count_tallies: format!("SELECT COUNT(*) FROM {prefix}tallies"),
    };
    Ok((transport, tables))
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> eda::Result<T> {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| eda::Error::Config(format!("argument {i} must be {what}; see the usage at the top of node.rs")))
}

#[tokio::main]
async fn main() -> eda::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mode: String = arg(&args, 1, "`publish` or `consume`")?;
    let url: String = arg(&args, 2, "a sqlite:// or postgres:// URL")?;
    let prefix: String = arg(&args, 3, "a table prefix")?;
    let (transport, tables) = transport(&url, &prefix).await?;
    // The database is the log itself, or the inbox and outbox beside a broker.
    let broker = std::env::var("EDA_TEST_BROKER").ok();
    let on = |builder: eda::RuntimeBuilder, db: eda::sql::SqlTransport| match &broker {
        Some(url) => builder.transport_url(url).outbox(db),
        None => builder.transport(db),
    };
    match mode.as_str() {
        "publish" => {
            let (count, first): (u32, u32) = (arg(&args, 4, "a count")?, arg(&args, 5, "the first number")?);
            let runtime = on(Runtime::builder(Registry::default()), transport).start().await?;
            let publisher = runtime.publisher();
            for n in first..first + count {
                publisher.publish(&Work { n, key: n % 50 }).await?;
            }
            runtime.shutdown().await;
            Ok(())
        }
        "consume" => {
            let expected: i64 = arg(&args, 4, "the number of tallies to wait for")?;
            let pool = transport.pool().clone();
            let count = tables.count_tallies.clone();
            let runtime = on(Runtime::builder(registry()).state(tables), transport).max_in_flight(16).start().await?;
            // Where the test reads how many deliveries came again after their effects had
            // committed, even from a process it kills: a file per process, rewritten as it runs.
            let stats = std::env::var_os("EDA_TEST_STATS_DIR")
                .map(|d| std::path::Path::new(&d).join(std::process::id().to_string()));
            let done = async {
                loop {
                    if let Some(path) = &stats {
                        let _ = std::fs::write(path, runtime.stats().duplicates.to_string());
                    }
                    let tallies: i64 = sqlx::query_scalar(&count).fetch_one(&pool).await.unwrap_or(0);
                    if tallies >= expected {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            };
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .map_err(eda::Error::Signal)?;
            tokio::select! {
                _ = done => {}
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            runtime.shutdown().await;
            Ok(())
        }
        "poison" => {
            let expected: i64 = arg(&args, 4, "the number of effects to wait for")?;
            let pool = transport.pool().clone();
            let count = format!("SELECT COUNT(*) FROM {prefix}effects");
            let dead = format!("SELECT COUNT(*) FROM {prefix}dead_letters");
            let backoff = std::env::var("EDA_TEST_BACKOFF_MS").ok().and_then(|b| b.parse().ok()).unwrap_or(10);
            let retry = eda::RetryPolicy {
                initial_backoff: Duration::from_millis(backoff),
                max_backoff: Duration::from_millis(backoff.max(10)),
                ..Default::default()
            };
            let runtime = Runtime::builder(poison_registry())
                .state(tables)
                .transport(transport)
                .retry(retry)
                .max_in_flight(16)
                .start()
                .await?;
            loop {
                let effects: i64 = sqlx::query_scalar(&count).fetch_one(&pool).await.unwrap_or(0);
                let dead: i64 = sqlx::query_scalar(&dead).fetch_one(&pool).await.unwrap_or(0);
                if effects >= expected && dead >= 1 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            runtime.shutdown().await;
            Ok(())
        }
        "dlq" => {
            // As the service's own binary would see it: `<app> dlq …`.
            let as_app = ["node", "dlq"].into_iter().map(String::from).chain(args.iter().skip(4).cloned());
            let command = eda::cli::Command::from_args(as_app)
                .unwrap_or_else(|| Err("expected a `dlq …` command".into()))
                .map_err(eda::Error::Config)?;
            let builder = Runtime::builder(poison_registry()).state(tables).transport(transport);
            print!("{}", eda::cli::run(builder, command).await?);
            Ok(())
        }
        "relay" => {
            let target_url: String = arg(&args, 4, "the target's URL")?;
            let target_prefix: String = arg(&args, 5, "the target's table prefix")?;
            let (target, _) = self::transport(&target_url, &target_prefix).await?;
            let relay = eda::sql::Relay::new(transport.clone(), std::sync::Arc::new(Lingering(target))).spawn();
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let lag: u64 = transport.lag("eda-relay", "work").await?.iter().map(|p| p.lag).sum();
                if lag == 0 {
                    break;
                }
            }
            relay.stop().await;
            Ok(())
        }
        other => Err(eda::Error::Config(format!(
            "unknown mode `{other}`: use `publish`, `consume`, `relay`, `poison` or `dlq`"
        ))),
    }
}
