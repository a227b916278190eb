//! Workspace-level tests of eda: `tests/ui` holds the trybuild cases of the macros,
//! `tests/*.rs` the end-to-end and delivery tests. This library holds what they share: a
//! fixture per transport, so that one test body runs on every transport.

use std::sync::Arc;
use std::time::Duration;

use eda::sql::{SqlOptions, SqlTransport};
use eda::transport::kafka::{KafkaOptions, KafkaTransport};
use eda::transport::nats::{NatsOptions, NatsTransport};
use eda::transport::rabbitmq::{RabbitOptions, RabbitTransport};
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
    /// `nats://` with streams of its own (a fresh namespace) on the test server
    Nats,
    /// `amqp://` with exchanges and queues of its own (a fresh namespace) on the test broker
    Rabbitmq,
    /// `kafka://` with topics and groups of its own (a fresh namespace) on the test broker
    Kafka,
}

/// One transport under test, with what the tests need to look into it.
pub struct Bus {
    /// Which transport.
    pub kind: Kind,
    transport: Arc<dyn Transport>,
    dead: Arc<dyn DeadLetterStore>,
    _db: Option<TestDb>,
    nats: Option<NatsTransport>,
    rabbit: Option<RabbitTransport>,
    kafka: Option<KafkaTransport>,
    /// Where runtimes keep saga records beside a broker that keeps none (RabbitMQ).
    records: Option<SqlTransport>,
}

/// Puts a runtime on a test's transport.
pub trait OnBus {
    /// The bus's transport, with the database that keeps saga records where the transport
    /// keeps none (RabbitMQ: the inbox and outbox beside the broker, as in production).
    fn on(self, bus: &Bus) -> Self;
}

impl OnBus for eda::RuntimeBuilder {
    fn on(self, bus: &Bus) -> Self {
        let builder = self.shared_transport(bus.transport());
        match bus.records.clone() {
            Some(db) => builder.outbox(db),
            None => builder,
        }
    }
}

impl Bus {
    /// A fresh, empty transport of the given kind.
    pub async fn new(kind: Kind) -> Self {
        let db = match kind {
            Kind::Memory => {
                let t = MemoryTransport::new();
                return Self {
                    kind,
                    transport: Arc::new(t.clone()),
                    dead: Arc::new(t),
                    _db: None,
                    nats: None,
                    rabbit: None,
                    kafka: None,
                    records: None,
                };
            }
            Kind::Kafka => {
                let t = kafka_options().namespace(fresh_namespace()).connect().await.unwrap_or_else(|e| {
                    panic!("a Kafka broker is needed at {} (tests/run.sh starts tansu): {e}", kafka_url())
                });
                return Self::beside_records(kind, Arc::new(t.clone()), Arc::new(t.clone()), None, Some(t)).await;
            }
            Kind::Rabbitmq => {
                let t =
                    rabbit_options().namespace(fresh_namespace()).connect().await.unwrap_or_else(|e| {
                        panic!("RabbitMQ is needed at {} (tests/run.sh starts it): {e}", rabbit_url())
                    });
                return Self::beside_records(kind, Arc::new(t.clone()), Arc::new(t.clone()), Some(t), None).await;
            }
            Kind::Nats => {
                let t = nats_options().namespace(fresh_namespace()).connect().await.unwrap_or_else(|e| {
                    panic!("NATS with JetStream is needed at {} (tests/run.sh starts it): {e}", nats_url())
                });
                return Self {
                    kind,
                    transport: Arc::new(t.clone()),
                    dead: Arc::new(t.clone()),
                    _db: None,
                    nats: Some(t),
                    rabbit: None,
                    kafka: None,
                    records: None,
                };
            }
            Kind::Sqlite => TestDb::new(false).await,
            Kind::Postgres => TestDb::new(true).await,
        };
        let t = db.open().await;
        Self {
            kind,
            transport: Arc::new(t.clone()),
            dead: Arc::new(t),
            _db: Some(db),
            nats: None,
            rabbit: None,
            kafka: None,
            records: None,
        }
    }

    /// A broker that keeps no saga records, with a SQLite database of its own that does.
    async fn beside_records(
        kind: Kind,
        transport: Arc<dyn Transport>,
        dead: Arc<dyn DeadLetterStore>,
        rabbit: Option<RabbitTransport>,
        kafka: Option<KafkaTransport>,
    ) -> Self {
        let db = TestDb::new(false).await;
        let records = Some(db.open().await);
        Self { kind, transport, dead, _db: Some(db), nats: None, rabbit, kafka, records }
    }

    /// What removes the test's broker state (its NATS streams) once the test is done.
    pub fn cleanup(&self) -> Cleanup {
        Cleanup(self.nats.clone(), self.rabbit.clone(), self.kafka.clone())
    }

    /// True on NATS JetStream.
    pub fn is_nats(&self) -> bool {
        self.nats.is_some()
    }

    /// True when the broker itself drops a second publication of an event id (NATS'
    /// `Nats-Msg-Id` deduplication), so a republished envelope is not delivered again.
    pub fn deduplicates_publications(&self) -> bool {
        self.nats.is_some()
    }

    /// Publishes `envelope` once more where the broker cannot recognise it as a duplicate (on
    /// NATS: under another `Nats-Msg-Id`, as a producer retrying after the duplicate window
    /// would); elsewhere it does nothing, as a republish already arrives twice there.
    pub async fn publish_past_deduplication(&self, envelope: &eda::Envelope) {
        let Some(nats) = &self.nats else { return };
        Self::republish_on_nats(nats, envelope).await;
    }

    /// Publishes `envelope` on `nats` once more, under another `Nats-Msg-Id` (see
    /// [`Bus::publish_past_deduplication`]).
    pub async fn republish_on_nats(nats: &NatsTransport, envelope: &eda::Envelope) {
        let subject = nats.subject_of(envelope).await.expect("the topic's subject");
        let mut headers = async_nats::HeaderMap::new();
        for (name, value) in envelope.headers(eda::Binding::Nats) {
            headers.insert(name, value);
        }
        headers.insert(async_nats::header::NATS_MESSAGE_ID, format!("{}-after-the-window", envelope.id));
        let js = async_nats::jetstream::new(nats.client().clone());
        let payload = bytes::Bytes::from(envelope.data.clone());
        js.publish_with_headers(subject, headers, payload).await.expect("publish").await.expect("stored");
    }

    /// Delivers `envelope` once more to its groups: republished by `rt`, or on NATS, whose
    /// server would drop that as a duplicate, under another `Nats-Msg-Id`.
    pub async fn deliver_again(&self, rt: &eda::Runtime, envelope: &eda::Envelope) {
        if self.deduplicates_publications() {
            self.publish_past_deduplication(envelope).await;
        } else {
            rt.publisher().republish(envelope).await.expect("republish");
        }
    }

    /// How many publications the broker dropped as duplicates (0 where it does not deduplicate).
    pub fn deduplicated_publications(&self) -> u64 {
        self.nats.as_ref().map_or(0, NatsTransport::deduplicated)
    }

    /// The database that keeps saga records beside the broker, where the transport keeps none.
    pub fn records(&self) -> Option<SqlTransport> {
        self.records.clone()
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

/// Removes what a test left on a broker (see [`Bus::cleanup`]).
pub struct Cleanup(Option<NatsTransport>, Option<RabbitTransport>, Option<KafkaTransport>);

impl Cleanup {
    /// Deletes the test's streams.
    pub async fn run(self) {
        if let Some(nats) = self.0 {
            nats.delete_namespace().await.expect("the test's NATS streams can be deleted");
        }
        if let Some(rabbit) = self.1 {
            rabbit.delete_declared().await.expect("the test's RabbitMQ queues can be deleted");
        }
        // The test's Kafka topics stay (each test has a namespace of its own): librdkafka
        // 2.12 crashed in its metadata cache (a null topic name) when tansu deleted topics that
        // clients of the process still knew.
        drop(self.2);
    }
}

/// The RabbitMQ broker the tests use: `EDA_TEST_AMQP_URL`, or the local one.
pub fn rabbit_url() -> String {
    std::env::var("EDA_TEST_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// RabbitMQ settings for tests: instances hear each other within a quarter second.
pub fn rabbit_options() -> RabbitOptions {
    RabbitOptions::new(rabbit_url()).member_heartbeat(Duration::from_millis(250)).member_ttl(Duration::from_secs(1))
}

/// The Kafka broker the tests use: `EDA_TEST_KAFKA_URL`, or the local one (tansu, which
/// tests/run.sh installs and starts).
pub fn kafka_url() -> String {
    std::env::var("EDA_TEST_KAFKA_URL").unwrap_or_else(|_| "kafka://127.0.0.1:9092".to_owned())
}

/// Kafka settings for tests: a short session, heartbeats every 200 ms, so that members hear of
/// a rebalance soon, and one record per produce batch. The last is for tansu 0.6.0, whose
/// memory store serves a fetch at an offset inside a batch from the *next* batch on (the rest
/// of that batch is never returned: a consumer that resumes at a committed offset after a
/// rebalance, or after a pause, loses it), and whose latest offset is one past the last
/// batch's base (so lag, and `Runtime::settled`, would be wrong). With one record per batch
/// every offset is a batch's base and both are right. Kafka itself needs none of this.
pub fn kafka_options() -> KafkaOptions {
    KafkaOptions::from_url(&kafka_url())
        .expect("EDA_TEST_KAFKA_URL is a Kafka URL")
        .replication(1)
        .session_timeout(Duration::from_secs(6))
        .set("heartbeat.interval.ms", "200")
        .set("batch.num.messages", "1")
}

/// The NATS server the tests use: `EDA_TEST_NATS_URL`, or the local one.
pub fn nats_url() -> String {
    std::env::var("EDA_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// NATS settings for tests: a short ack wait, so an event whose settlement was lost (a
/// server restart) comes back quickly.
pub fn nats_options() -> NatsOptions {
    NatsOptions::new(nats_url()).ack_wait(Duration::from_secs(3)).max_age(Some(Duration::from_secs(3600)))
}

/// A NATS namespace no other test uses.
pub fn fresh_namespace() -> String {
    format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// A nats-server of a test's own: the machine's binary on a free port, with a store in a
/// temporary directory, so a test can stop, kill and restart it without touching the shared
/// server.
pub struct NatsServer {
    binary: std::path::PathBuf,
    port: u16,
    args: Vec<String>,
    store: tempfile::TempDir,
    child: Option<std::process::Child>,
}

impl NatsServer {
    /// Starts one with JetStream.
    pub fn start() -> Self {
        Self::start_with(&["-js"])
    }

    /// Starts one with these extra arguments.
    pub fn start_with(args: &[&str]) -> Self {
        let binary = std::env::var_os("EDA_TEST_NATS_SERVER")
            .map(std::path::PathBuf::from)
            .or_else(|| {
                let path = std::env::var_os("PATH")?;
                std::env::split_paths(&path).map(|d| d.join("nats-server")).find(|p| p.is_file())
            })
            .or_else(|| Some(std::path::PathBuf::from("/usr/sbin/nats-server")).filter(|p| p.is_file()))
            .expect("this test runs its own nats-server: install it (Debian package nats-server) or set EDA_TEST_NATS_SERVER");
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
        let args = args.iter().map(|a| (*a).to_owned()).collect();
        let mut server =
            Self { binary, port, args, store: tempfile::tempdir().expect("a store directory"), child: None };
        server.run();
        server
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts it (again).
    pub fn run(&mut self) {
        let child = std::process::Command::new(&self.binary)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-sd"])
            .arg(self.store.path())
            .args(&self.args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{} starts: {e}", self.binary.display()));
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the test's nats-server did not open port {}", self.port);
    }

    /// Stops the server with `signal` (`-TERM`, `-KILL`) and waits until it is gone.
    pub fn stop(&mut self, signal: &str) {
        let Some(mut child) = self.child.take() else { return };
        let status =
            std::process::Command::new("kill").args([signal, &child.id().to_string()]).status().expect("kill runs");
        assert!(status.success(), "kill {signal} failed");
        child.wait().expect("the server exits");
    }

    /// Stops it with `signal` and starts it again on the same port and store.
    pub fn restart(&mut self, signal: &str) {
        self.stop(signal);
        self.run();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
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

    /// Runs one statement on the database.
    pub async fn execute(&self, sql: &str) {
        let db = self.open().await;
        eda::sql::sqlx::query(sql).execute(db.pool()).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
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
        $crate::on_every_transport!(@kind memory Memory $($test),*);
        $crate::on_every_transport!(@kind sqlite Sqlite $($test),*);
        $crate::on_every_transport!(@kind postgres Postgres $($test),*);
        $crate::on_every_transport!(@kind nats Nats $($test),*);
        $crate::on_every_transport!(@kind rabbitmq Rabbitmq $($test),*);
        $crate::on_every_transport!(@kind kafka Kafka $($test),*);
    };
    (@kind $module:ident $kind:ident $($test:ident),*) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let bus = $crate::Bus::new($crate::Kind::$kind).await;
                    let cleanup = bus.cleanup();
                    super::$test(bus).await;
                    cleanup.run().await;
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

/// A TCP proxy on 127.0.0.1 in front of a local server, whose connections can be cut off the
/// way a network partition or a failover cuts them: [`freeze`](Self::freeze) makes every
/// connection open at that moment stop carrying bytes, either way, without closing — neither
/// side is told. Connections made afterwards work. Lives as long as the test's runtime.
pub struct FreezingProxy {
    /// The port to connect to instead of the server's.
    pub port: u16,
    open: Arc<std::sync::Mutex<Vec<Arc<std::sync::atomic::AtomicBool>>>>,
}

impl FreezingProxy {
    /// A proxy to `target` (`host:port`).
    pub async fn start(target: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a free port");
        let port = listener.local_addr().expect("bound").port();
        let open: Arc<std::sync::Mutex<Vec<Arc<std::sync::atomic::AtomicBool>>>> = Arc::default();
        let (target, connections) = (target.to_owned(), open.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&target).await else { continue };
                let frozen = Arc::new(std::sync::atomic::AtomicBool::new(false));
                connections.lock().expect("lock").push(frozen.clone());
                let (from_client, to_client) = client.into_split();
                let (from_server, to_server) = server.into_split();
                tokio::spawn(Self::carry(from_client, to_server, frozen.clone()));
                tokio::spawn(Self::carry(from_server, to_client, frozen));
            }
        });
        Self { port, open }
    }

    /// Cuts off every connection open now.
    pub fn freeze(&self) {
        for frozen in self.open.lock().expect("lock").drain(..) {
            frozen.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    async fn carry(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        frozen: Arc<std::sync::atomic::AtomicBool>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = vec![0; 16 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if frozen.load(std::sync::atomic::Ordering::SeqCst) {
                // Both sockets stay open, and nothing more gets through.
                let _keep = (from, to);
                std::future::pending::<()>().await;
                return;
            }
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }
}
