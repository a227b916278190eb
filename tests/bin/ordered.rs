//! An instance of one consumer group on NATS, for the per-key order tests: several of these run
//! at once, and tests kill, add and poison them.
//!
//! `eda-test-ordered <url> <log-file> <instance>` handles `Step { key, seq }` events in
//! group `ordered` until SIGTERM; each handling appends `<instance> <key> <seq>` to the log
//! file, one line in one write, so the file is the order in which the whole group handled
//! them. With `EDA_TEST_POISON=<key>:<seq>` that event fails (and is retried) until a file
//! `<log-file>.cured` exists; with `EDA_TEST_POISON_ABORT=1` as well, the process aborts on it
//! instead, as a handler that crashes its process would. With `EDA_TEST_OUTBOX=<url>` and
//! `EDA_TEST_OUTBOX_PREFIX=<prefix>`, the guards are kept in that database, shared by the
//! group's instances (persistent guards beside a broker); at SIGTERM the instance writes
//! `<instance> <handled> <duplicates>` to `<log-file>.stats`.

use std::io::Write;
use std::time::Duration;

use eda::{event, handler, Ctx, HandlerError, Registry, RetryPolicy, Runtime};
use serde::{Deserialize, Serialize};

/// One step of a key's sequence.
#[event(topic = "steps", key = key)]
#[derive(Serialize, Deserialize)]
pub struct Step {
    key: u32,
    seq: u32,
}

struct Log {
    file: std::sync::Mutex<std::fs::File>,
    instance: String,
    poison: Option<(u32, u32)>,
    cured: std::path::PathBuf,
    abort: bool,
}

#[handler(group = "ordered")]
async fn record(step: Step, log: Ctx<'_, Log>) -> Result<(), HandlerError> {
    if log.poison == Some((step.key, step.seq)) && !log.cured.exists() {
        if log.abort {
            std::process::abort();
        }
        return Err(HandlerError::transient(format!("step {}:{} is poisoned", step.key, step.seq)));
    }
    // A little work, so that events of different keys overlap.
    tokio::time::sleep(Duration::from_micros(u64::from(step.seq % 3) * 200)).await;
    let line = format!("{} {} {}\n", log.instance, step.key, step.seq);
    let mut file = log.file.lock().map_err(|_| HandlerError::permanent("log lock poisoned"))?;
    file.write_all(line.as_bytes()).map_err(HandlerError::transient)?;
    Ok(())
}

#[tokio::main]
async fn main() -> eda::Result<()> {
    // What the runtime warns about goes to stderr, where the test shows it.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().collect();
    let [_, url, path, instance] = args.as_slice() else {
        return Err(eda::Error::Config("usage: eda-test-ordered <url> <log-file> <instance>".into()));
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| eda::Error::Config(format!("cannot open {path}: {e}")))?;
    let poison = std::env::var("EDA_TEST_POISON").ok().and_then(|p| {
        let (key, seq) = p.split_once(':')?;
        Some((key.parse().ok()?, seq.parse().ok()?))
    });
    let log = Log {
        file: std::sync::Mutex::new(file),
        instance: instance.clone(),
        poison,
        cured: format!("{path}.cured").into(),
        abort: std::env::var("EDA_TEST_POISON_ABORT").as_deref() == Ok("1"),
    };
    let retry = RetryPolicy {
        max_attempts: 1000,
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(500),
        ..Default::default()
    };
    let mut builder = Runtime::builder(Registry::builder().handler::<record>().build())
        .state(log)
        .retry(retry)
        .max_in_flight(256)
        .transport_url(url);
    if let Ok(outbox) = std::env::var("EDA_TEST_OUTBOX") {
        let prefix = std::env::var("EDA_TEST_OUTBOX_PREFIX").unwrap_or_else(|_| "eda_".into());
        builder = builder.outbox(eda::sql::SqlOptions::new(outbox).table_prefix(prefix).connect().await?);
    }
    let runtime = builder.start().await?;
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(eda::Error::Signal)?;
    term.recv().await;
    runtime.shutdown().await;
    let stats = runtime.stats();
    let line = format!("{instance} {} {}\n", stats.handled, stats.duplicates);
    let _ = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(format!("{path}.stats"))
        .and_then(|mut f| f.write_all(line.as_bytes()));
    Ok(())
}
