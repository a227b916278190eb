//! Workspace-level tests of eda: `tests/ui` holds the trybuild cases of the macros,
//! `tests/*.rs` the end-to-end and delivery tests. This library holds what they share: a
//! fixture per transport, so that one test body runs on every transport.

use std::sync::Arc;
use std::time::Duration;

use eda::transport::sqlite::{SqliteOptions, SqliteTransport};
use eda::transport::MemoryTransport;
use eda::{DeadLetter, DeadLetterStore, Transport};

/// The transports the suite runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `memory://`
    Memory,
    /// `sqlite://` in a fresh temporary file
    Sqlite,
}

/// One transport under test, with what the tests need to look into it.
pub struct Bus {
    /// Which transport.
    pub kind: Kind,
    transport: Arc<dyn Transport>,
    dead: Arc<dyn DeadLetterStore>,
    url: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl Bus {
    /// A fresh, empty transport of the given kind.
    pub async fn new(kind: Kind) -> Self {
        match kind {
            Kind::Memory => {
                let t = MemoryTransport::new();
                Self { kind, transport: Arc::new(t.clone()), dead: Arc::new(t), url: None, _dir: None }
            }
            Kind::Sqlite => {
                let dir = tempfile::tempdir().expect("a temporary directory");
                let url = format!("sqlite://{}", dir.path().join("eda.db").display());
                let t = sqlite_options(&url).connect().await.expect("the SQLite transport opens");
                Self { kind, transport: Arc::new(t.clone()), dead: Arc::new(t), url: Some(url), _dir: Some(dir) }
            }
        }
    }

    /// The transport, to give to runtimes.
    pub fn transport(&self) -> Arc<dyn Transport> {
        self.transport.clone()
    }

    /// The database URL, for transports that have one.
    pub fn url(&self) -> Option<&str> {
        self.url.as_deref()
    }

    /// The dead letters of `group`.
    pub async fn dead_letters(&self, group: &str) -> Vec<DeadLetter> {
        self.dead.dead_letters(group).await.expect("dead letters can be listed")
    }

    /// Total lag of `group` on `topic`.
    pub async fn lag(&self, group: &str, topic: &str) -> u64 {
        self.transport.lag(group, topic).await.expect("lag").iter().map(|p| p.lag).sum()
    }
}

/// SQLite settings for tests: short leases so instances rebalance quickly.
pub fn sqlite_options(url: &str) -> SqliteOptions {
    SqliteOptions::new(url).lease_ttl(Duration::from_millis(600)).poll_interval(Duration::from_millis(20))
}

/// Opens a second handle on the same SQLite file, as another process would.
pub async fn reopen(url: &str) -> SqliteTransport {
    sqlite_options(url).connect().await.expect("the SQLite transport opens")
}

/// Runs each named `async fn(Bus)` as a test on every transport.
#[macro_export]
macro_rules! on_every_transport {
    ($($test:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test($crate::Bus::new($crate::Kind::Memory).await).await
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test($crate::Bus::new($crate::Kind::Sqlite).await).await
                }
            )*
        }
    };
}
