//! Workspace-level tests of eda: `tests/ui` holds the trybuild cases of the macros,
//! `tests/*.rs` the end-to-end and delivery tests. This library holds what they share: a
//! fixture per transport, so that one test body runs on every transport.

use std::sync::Arc;
use std::time::Duration;

use eda::sql::{SqlOptions, SqlTransport};
use eda::transport::MemoryTransport;
use eda::{DeadLetter, DeadLetterStore, Transport};

/// The transports the suite runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `memory://`
    Memory,
    /// `sqlite://` in a fresh temporary file
    Sqlite,
    /// `postgres://` with tables of its own (a fresh prefix) in the test database
    Postgres,
}

/// One transport under test, with what the tests need to look into it.
pub struct Bus {
    /// Which transport.
    pub kind: Kind,
    transport: Arc<dyn Transport>,
    dead: Arc<dyn DeadLetterStore>,
    _db: Option<TestDb>,
}

impl Bus {
    /// A fresh, empty transport of the given kind.
    pub async fn new(kind: Kind) -> Self {
        let db = match kind {
            Kind::Memory => {
                let t = MemoryTransport::new();
                return Self { kind, transport: Arc::new(t.clone()), dead: Arc::new(t), _db: None };
            }
            Kind::Sqlite => TestDb::new(false).await,
            Kind::Postgres => TestDb::new(true).await,
        };
        let t = db.open().await;
        Self { kind, transport: Arc::new(t.clone()), dead: Arc::new(t), _db: Some(db) }
    }

    /// The transport, to give to runtimes.
    pub fn transport(&self) -> Arc<dyn Transport> {
        self.transport.clone()
    }

    /// The dead letters of `group`.
    pub async fn dead_letters(&self, group: &str) -> Vec<DeadLetter> {
        let stored = self.dead.dead_letters(Some(group)).await.expect("dead letters can be listed");
        stored.into_iter().map(|d| d.letter).collect()
    }

    /// Total lag of `group` on `topic`.
    pub async fn lag(&self, group: &str, topic: &str) -> u64 {
        self.transport.lag(group, topic).await.expect("lag").iter().map(|p| p.lag).sum()
    }
}

/// A database for one test: a SQLite file in a temporary directory, or tables under a fresh
/// prefix in the PostgreSQL test database. Open as many independent handles on it as the test
/// needs, as separate processes would.
pub struct TestDb {
    /// The database URL.
    pub url: String,
    /// The prefix of every table of this test.
    pub prefix: String,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    /// A fresh database.
    pub async fn new(postgres: bool) -> Self {
        if postgres {
            Self { url: postgres_url().await, prefix: fresh_prefix(), _dir: None }
        } else {
            let dir = tempfile::tempdir().expect("a temporary directory");
            let url = format!("sqlite://{}", dir.path().join("eda.db").display());
            Self { url, prefix: "eda_".to_owned(), _dir: Some(dir) }
        }
    }

    /// Options for a handle on it, with the test settings.
    pub fn options(&self) -> SqlOptions {
        sql_options(&self.url).table_prefix(&self.prefix)
    }

    /// A new handle on it.
    pub async fn open(&self) -> SqlTransport {
        self.options().connect().await.unwrap_or_else(|e| panic!("{} opens: {e}", self.url))
    }

    /// A scalar from the database; `{p}` in `sql` stands for the test's table prefix.
    pub async fn count(&self, sql: &str) -> i64 {
        let sql = sql.replace("{p}", &self.prefix);
        let db = self.open().await;
        eda::sql::sqlx::query_scalar(&sql).fetch_one(db.pool()).await.unwrap_or_else(|e| panic!("{sql}: {e}"))
    }
}

/// SQL log settings for tests: short leases so instances rebalance quickly.
pub fn sql_options(url: &str) -> SqlOptions {
    SqlOptions::new(url).lease_ttl(Duration::from_millis(600)).poll_interval(Duration::from_millis(20))
}

/// A table prefix no other test uses.
pub fn fresh_prefix() -> String {
    format!("t{}_", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// The PostgreSQL database the tests use: `EDA_TEST_POSTGRES_URL`, or the `eda_test` database
/// on 127.0.0.1, created on first use.
pub async fn postgres_url() -> String {
    static CREATED: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    CREATED
        .get_or_init(|| async {
            if let Ok(url) = std::env::var("EDA_TEST_POSTGRES_URL") {
                return url;
            }
            let admin = "postgres://postgres@127.0.0.1:5432/postgres";
            let mut conn = <eda::sql::sqlx::PgConnection as eda::sql::sqlx::Connection>::connect(admin)
                .await
                .unwrap_or_else(|e| panic!("PostgreSQL is needed at {admin} (tests/run.sh starts it): {e}"));
            let exists: Option<i32> =
                eda::sql::sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = 'eda_test'")
                    .fetch_optional(&mut conn)
                    .await
                    .expect("pg_database can be read");
            if exists.is_none() {
                // Another test binary may create it at the same moment; either way it exists.
                let _ = eda::sql::sqlx::query("CREATE DATABASE eda_test").execute(&mut conn).await;
            }
            "postgres://postgres@127.0.0.1:5432/eda_test".to_owned()
        })
        .await
        .clone()
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
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test($crate::Bus::new($crate::Kind::Postgres).await).await
                }
            )*
        }
    };
}

/// Runs each named `async fn(postgres: bool)` as a test on SQLite and on PostgreSQL.
#[macro_export]
macro_rules! on_sql_databases {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(false).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(true).await
                }
            )*
        }
    };
}
