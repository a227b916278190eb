//! What the NATS transport does beyond the conformance suite (which runs on it through
//! `on_every_transport!`): the wire format a plain NATS client sees, messages that are not eda
//! events, events that kill their consumers, per-key order across instances, streams that
//! already exist, lag before a group subscribes, dead-letter tools, and the errors a user can
//! cause.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eda::transport::nats::{NatsOptions, NatsTransport};
use eda::{event, handler, Ctx, HandlerError, Registry, Replay, Runtime, Transport};
use eda_tests::{fresh_namespace, nats_options, NatsServer};
use futures_util::TryStreamExt;
use serde::{Deserialize, Serialize};

const SETTLE: Duration = Duration::from_secs(20);

/// A transport on the shared test server, in a namespace of its own, removed when done.
struct Fixture {
    nats: NatsTransport,
    namespace: String,
}

impl Fixture {
    async fn new(options: impl FnOnce(NatsOptions) -> NatsOptions) -> Self {
        let namespace = fresh_namespace();
        let nats = options(nats_options().namespace(&namespace)).connect().await.expect("NATS answers");
        Self { nats, namespace }
    }

    /// Another connection on the same namespace, as another process would have.
    async fn peer(&self, options: impl FnOnce(NatsOptions) -> NatsOptions) -> NatsTransport {
        options(nats_options().namespace(&self.namespace)).connect().await.expect("NATS answers")
    }

    fn js(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(self.nats.client().clone())
    }

    async fn done(self) {
        self.nats.delete_namespace().await.expect("the test's streams can be deleted");
    }
}

#[event(topic = "orders.placed", key = order)]
#[derive(Clone, Debug, Serialize, Deserialize)]
struct OrderPlaced {
    order: String,
    cents: u64,
}

#[derive(Default)]
struct Seen(Mutex<Vec<String>>);

#[handler(group = "shipping")]
async fn ship(ev: OrderPlaced, seen: Ctx<'_, Seen>) {
    seen.0.lock().expect("lock").push(ev.order);
}

/// A service whose group `shipping` records the orders it sees, on `nats`.
fn shipping(nats: NatsTransport) -> eda::RuntimeBuilder {
    Runtime::builder(Registry::builder().handler::<ship>().publishes::<OrderPlaced>().build())
        .state(Seen::default())
        .transport(nats)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_cloudevents_in_binary_mode_that_a_plain_nats_client_reads() {
    let f = Fixture::new(|o| o).await;
    let rt = Runtime::builder(Registry::builder().publishes::<OrderPlaced>().build())
        .transport(f.nats.clone())
        .service("shop")
        .start()
        .await
        .expect("start");
    let sent = rt.publisher().publish(&OrderPlaced { order: "o-1".into(), cents: 1250 }).await.expect("publish");
    let subject = f.nats.subject_of(&sent).await.expect("subject");
    assert!(subject.starts_with(&format!("{}.orders.placed.", f.namespace)), "{subject}");

    let stream = f.js().get_stream(f.nats.stream_name("orders.placed")).await.expect("the topic's stream");
    let raw = stream.get_raw_message(1).await.expect("the event is stored");
    assert_eq!(raw.subject.as_str(), subject);
    let header = |name: &str| raw.headers.get(name).map(|v| v.as_str().to_owned());
    assert_eq!(header("ce-specversion").as_deref(), Some("1.0"));
    assert_eq!(header("ce-id"), Some(sent.id.to_string()));
    assert_eq!(header("ce-source").as_deref(), Some("shop"));
    assert_eq!(header("ce-type").as_deref(), Some("OrderPlaced.v1"));
    assert_eq!(header("ce-subject").as_deref(), Some("o-1"));
    assert_eq!(header("ce-correlationid"), Some(sent.correlation_id.to_string()));
    assert_eq!(header("ce-traceparent"), sent.traceparent.clone());
    assert!(header("ce-time").is_some_and(|t| humantime::parse_rfc3339(&t).is_ok()));
    assert_eq!(header("content-type").as_deref(), Some("application/json"));
    assert_eq!(header("Nats-Msg-Id"), Some(sent.id.to_string()), "the event id deduplicates");
    let body: serde_json::Value = serde_json::from_slice(&raw.payload).expect("the data is the JSON event");
    assert_eq!(body, serde_json::json!({ "order": "o-1", "cents": 1250 }));

    // The same event again within the window: the server keeps one.
    rt.publisher().republish(&sent).await.expect("republish");
    assert_eq!(stream.get_info().await.expect("info").state.messages, 1);
    assert_eq!(f.nats.deduplicated(), 1);
    rt.shutdown().await;
    f.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_is_not_an_eda_event_is_dead_lettered_as_it_came_and_the_rest_go_on() {
    let f = Fixture::new(|o| o.partitions(1)).await;
    let rt = shipping(f.nats.clone()).start().await.expect("start");
    rt.publisher().publish(&OrderPlaced { order: "o-1".into(), cents: 1 }).await.expect("publish");
    // Another producer writes to eda's subject without CloudEvents attributes.
    let subject = f.nats.subject("orders.placed", 0);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("X-Producer", "legacy");
    let js = f.js();
    js.publish_with_headers(subject.clone(), headers, "not an event".into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    rt.publisher().publish(&OrderPlaced { order: "o-2".into(), cents: 1 }).await.expect("publish");
    rt.settled(SETTLE).await.expect("settled");
    // Two keys: handled concurrently, in either order.
    let mut seen = rt.state::<Seen>().expect("state").0.lock().expect("lock").clone();
    seen.sort();
    assert_eq!(seen, ["o-1", "o-2"]);

    let dead = rt.dead_letters(Some("shipping")).await.expect("dead letters");
    assert_eq!(dead.len(), 1);
    let letter = &dead[0].letter;
    assert!(
        letter.reason.permanent && letter.reason.error.contains("no `specversion` attribute"),
        "{:?}",
        letter.reason
    );
    assert_eq!(letter.envelope.data, b"not an event", "the payload is kept as it came");
    // The copy in the dead-letter stream has the original headers too.
    let dlq = js.get_stream(f.nats.dead_letter_stream()).await.expect("dead-letter stream");
    let copy = dlq.get_raw_message(dead[0].id).await.expect("the copy");
    assert_eq!(copy.subject.as_str(), f.nats.dead_letter_subject("orders.placed"));
    assert_eq!(copy.headers.get("X-Producer").map(|v| v.as_str()), Some("legacy"));
    assert_eq!(copy.headers.get("eda-dlq-group").map(|v| v.as_str()), Some("shipping"));

    // Replaying it would only drop it: no handler of the group takes it.
    let replay = rt.replay(dead[0].id, false).await.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(replay.contains("replaying it would only drop it") && replay.contains("dlq purge"), "{replay}");
    assert_eq!(rt.dead_letters(None).await.expect("dead letters").len(), 1, "still kept");
    assert!(rt.purge(dead[0].id).await.expect("purge"));
    assert!(!rt.purge(dead[0].id).await.expect("purge again"), "purged once");
    assert!(rt.dead_letters(None).await.expect("dead letters").is_empty());
    rt.shutdown().await;
    f.done().await;
}

#[event(topic = "ledger", key = account)]
#[derive(Serialize, Deserialize)]
struct Entry {
    account: u32,
    seq: u32,
}

/// Every handling that completed, in completion order, from every instance.
#[derive(Default)]
struct Journal {
    done: Mutex<Vec<(u32, u32)>>,
    failed_once: Mutex<std::collections::HashSet<(u32, u32)>>,
    slow: AtomicBool,
    handled: AtomicU32,
}

#[handler(group = "bookkeepers")]
async fn keep(ev: Entry, journal: Ctx<'_, Journal>) -> Result<(), HandlerError> {
    if journal.slow.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(u64::from(ev.seq % 4))).await;
    }
    if ev.seq % 5 == 2 && journal.failed_once.lock().expect("lock").insert((ev.account, ev.seq)) {
        return Err(HandlerError::transient("first attempt fails"));
    }
    journal.done.lock().expect("lock").push((ev.account, ev.seq));
    journal.handled.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_one_key_stay_in_order_across_instances_and_an_instance_stopping_mid_stream() {
    let f = Fixture::new(|o| o.partitions(4)).await;
    let journal = Arc::new(Journal::default());
    journal.slow.store(true, Ordering::SeqCst);
    let registry = || Registry::builder().handler::<keep>().publishes::<Entry>().build();
    let start = |nats: NatsTransport| {
        Runtime::builder(registry())
            .shared_state(journal.clone())
            .transport(nats)
            .retry(eda::RetryPolicy { initial_backoff: Duration::from_millis(2), ..Default::default() })
            .shutdown_timeout(Duration::from_millis(1))
            .start()
    };
    let a = start(f.nats.clone()).await.expect("start a");
    let b = start(f.peer(|o| o).await).await.expect("start b");
    let (accounts, per_account) = (6u32, 40u32);
    for seq in 0..per_account {
        for account in 0..accounts {
            a.publisher().publish(&Entry { account, seq }).await.expect("publish");
        }
    }
    let deadline = tokio::time::Instant::now() + SETTLE;
    while journal.handled.load(Ordering::SeqCst) < accounts * per_account / 3 {
        assert!(tokio::time::Instant::now() < deadline, "a third was never handled");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // One instance goes away with handlings cut short; what it held goes back to the group.
    a.shutdown().await;
    b.settled(SETTLE).await.expect("b finishes the work");
    let done = journal.done.lock().expect("lock").clone();
    let mut by_account: HashMap<u32, Vec<u32>> = HashMap::new();
    for (account, seq) in done {
        by_account.entry(account).or_default().push(seq);
    }
    for account in 0..accounts {
        let handled = by_account.remove(&account).unwrap_or_default();
        // At least once: what the instance that stopped handled past the partition's settled
        // point comes again to the other, whose guard cannot know it (each has its own inbox).
        // In order means: each entry first handled after the one before it.
        let mut seen = std::collections::HashSet::new();
        let firsts: Vec<u32> = handled.into_iter().filter(|seq| seen.insert(*seq)).collect();
        assert_eq!(firsts, (0..per_account).collect::<Vec<_>>(), "account {account} out of order or incomplete");
    }
    b.shutdown().await;
    f.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_stream_keeps_its_partitions_and_takes_the_configured_limits() {
    let f = Fixture::new(|o| o.partitions(3)).await;
    let rt = Runtime::builder(Registry::builder().publishes::<OrderPlaced>().build())
        .transport(f.nats.clone())
        .start()
        .await
        .expect("start");
    for n in 0..10 {
        rt.publisher().publish(&OrderPlaced { order: format!("o-{n}"), cents: 1 }).await.expect("publish");
    }
    rt.shutdown().await;

    // Another deployment of the same namespace, configured for more partitions and a longer age.
    let other = f.peer(|o| o.partitions(8).max_age(Some(Duration::from_secs(7200)))).await;
    let rt = shipping(other.clone()).start().await.expect("start");
    rt.publisher().publish(&OrderPlaced { order: "o-late".into(), cents: 1 }).await.expect("publish");
    rt.settled(SETTLE).await.expect("settled");
    assert_eq!(rt.state::<Seen>().expect("state").0.lock().expect("lock").len(), 11, "every event, on 3 partitions");
    let info =
        f.js().get_stream(f.nats.stream_name("orders.placed")).await.expect("stream").get_info().await.expect("info");
    assert_eq!(info.config.subjects.len(), 3, "the stream kept its partitions");
    assert_eq!(info.config.max_age, Duration::from_secs(7200), "and took the configured, longer age");
    assert_eq!(other.lag("shipping", "orders.placed").await.expect("lag").len(), 3);
    rt.shutdown().await;

    // The NATS review's defect 2: a process configured to keep less (a producer-only
    // service, a `dlq` command without the service's URL options) shrank the stream, and the
    // server deleted events not yet read. The stream keeps its wider limits.
    let narrow = f.peer(|o| o.max_age(Some(Duration::from_secs(600))).max_messages(Some(5))).await;
    let rt = Runtime::builder(Registry::builder().publishes::<OrderPlaced>().build())
        .transport(narrow)
        .start()
        .await
        .expect("start");
    rt.publisher().publish(&OrderPlaced { order: "o-narrow".into(), cents: 1 }).await.expect("publish");
    rt.shutdown().await;
    let info =
        f.js().get_stream(f.nats.stream_name("orders.placed")).await.expect("stream").get_info().await.expect("info");
    assert_eq!(info.config.max_age, Duration::from_secs(7200), "not shrunk to 10 min");
    assert!(info.config.max_messages <= 0, "not limited to 5 messages: {}", info.config.max_messages);
    assert_eq!(info.state.messages, 12, "nothing deleted");
    f.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_counts_what_waits_for_a_group_before_and_after_it_subscribes() {
    let f = Fixture::new(|o| o.partitions(2)).await;
    let total = |lags: Vec<eda::PartitionLag>| lags.iter().map(|l| l.lag).sum::<u64>();
    assert_eq!(total(f.nats.lag("shipping", "orders.placed").await.expect("lag")), 0, "no stream yet");
    let rt = Runtime::builder(Registry::builder().publishes::<OrderPlaced>().build())
        .transport(f.nats.clone())
        .start()
        .await
        .expect("start");
    for n in 0..5 {
        rt.publisher().publish(&OrderPlaced { order: format!("o-{n}"), cents: 1 }).await.expect("publish");
    }
    rt.shutdown().await;
    let waiting = f.nats.lag("shipping", "orders.placed").await.expect("lag");
    assert_eq!(waiting.len(), 2);
    assert_eq!(total(waiting), 5, "the group has not subscribed: all five wait for it");

    let rt = shipping(f.nats.clone()).start().await.expect("start");
    rt.settled(SETTLE).await.expect("settled");
    assert_eq!(total(f.nats.lag("shipping", "orders.placed").await.expect("lag")), 0);
    rt.shutdown().await;
    f.done().await;
}

#[derive(Default)]
struct Flaky {
    fixed: AtomicBool,
    handled: AtomicU32,
}

#[handler(group = "billing")]
async fn bill(ev: OrderPlaced, flaky: Ctx<'_, Flaky>) -> Result<(), HandlerError> {
    if ev.cents == 0 && !flaky.fixed.load(Ordering::SeqCst) {
        return Err(HandlerError::permanent("zero is not a price"));
    }
    flaky.handled.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_shown_replayed_and_purged_through_the_commands() {
    let f = Fixture::new(|o| o).await;
    let services = || {
        Runtime::builder(Registry::builder().handler::<bill>().publishes::<OrderPlaced>().build())
            .state(Flaky::default())
            .transport(f.nats.clone())
    };
    let rt = services().start().await.expect("start");
    let free = rt.publisher().publish(&OrderPlaced { order: "o-free".into(), cents: 0 }).await.expect("publish");
    rt.publisher().publish(&OrderPlaced { order: "o-also-free".into(), cents: 0 }).await.expect("publish");
    rt.settled(SETTLE).await.expect("settled");
    let dead = rt.dead_letters(Some("billing")).await.expect("dead letters");
    assert_eq!(dead.len(), 2);
    let listed = eda::cli::run(services(), eda::cli::Command::DlqList { group: None, page: eda::Page::default() })
        .await
        .expect("dlq list");
    assert!(listed.contains("billing") && listed.contains("zero is not a price"), "{listed}");
    let first = dead.iter().find(|d| d.letter.envelope.id == free.id).expect("the first is there");
    let shown = eda::cli::run(services(), eda::cli::Command::DlqShow { id: first.id }).await.expect("dlq show");
    assert!(shown.contains(&free.id.to_string()), "{shown}");

    // Fixed: the replay handles it once and removes it; the other is purged.
    rt.state::<Flaky>().expect("state").fixed.store(true, Ordering::SeqCst);
    assert_eq!(rt.replay(first.id, false).await.expect("replay"), Replay::Handled);
    assert_eq!(rt.state::<Flaky>().expect("state").handled.load(Ordering::SeqCst), 1);
    let second = dead.iter().find(|d| d.id != first.id).expect("the second");
    assert!(rt.purge(second.id).await.expect("purge"));
    assert!(rt.dead_letters(None).await.expect("dead letters").is_empty());
    rt.shutdown().await;
    f.done().await;
}

/// The NATS review's defect 1: a dead letter's id was `group:stream:sequence`. A topic's
/// stream deleted and made again restarts its sequences, so the next letter at the same
/// sequence came back `duplicate`, was taken as stored, and its event was acked: lost. A
/// letter purged and then written again within the duplicate window must be kept too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_is_never_taken_for_an_earlier_one() {
    let f = Fixture::new(|o| o.partitions(1)).await;
    let services = || {
        Runtime::builder(Registry::builder().handler::<bill>().publishes::<OrderPlaced>().build())
            .state(Flaky::default())
            .transport(f.nats.clone())
    };
    async fn letters(rt: &Runtime) -> Vec<eda::StoredDeadLetter> {
        rt.dead_letters(Some("billing")).await.expect("dead letters")
    }
    let rt = services().start().await.expect("start");
    let first = rt.publisher().publish(&OrderPlaced { order: "o-1".into(), cents: 0 }).await.expect("publish");
    rt.settled(SETTLE).await.expect("settled");
    assert_eq!(letters(&rt).await.len(), 1);
    rt.shutdown().await;

    // The topic's stream is deleted and made again: sequences start over at 1.
    f.js().delete_stream(f.nats.stream_name("orders.placed")).await.expect("the stream is deleted");
    let rt = services().start().await.expect("start again");
    let second = rt.publisher().publish(&OrderPlaced { order: "o-2".into(), cents: 0 }).await.expect("publish");
    rt.settled(SETTLE).await.expect("settled");
    let kept: Vec<_> = letters(&rt).await.iter().map(|d| d.letter.envelope.id).collect();
    assert!(kept.contains(&first.id) && kept.contains(&second.id), "both letters are kept: {kept:?}");

    // Purged, then the same event given up again within the window: a letter again.
    let letter = letters(&rt).await.into_iter().find(|d| d.letter.envelope.id == second.id).expect("kept");
    assert!(rt.purge(letter.id).await.expect("purge"));
    eda_tests::Bus::republish_on_nats(&f.nats, &letter.letter.envelope).await;
    rt.settled(SETTLE).await.expect("settled");
    let kept: Vec<_> = letters(&rt).await.iter().map(|d| d.letter.envelope.id).collect();
    assert!(kept.contains(&second.id), "given up again, it is kept again: {kept:?}");
    rt.shutdown().await;
    f.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_nats_cannot_carry_is_refused_with_a_reason() {
    let f = Fixture::new(|o| o).await;
    let rt = Runtime::builder(Registry::builder().publishes::<OrderPlaced>().build())
        .transport(f.nats.clone())
        .max_payload(4 * 1024 * 1024)
        .start()
        .await
        .expect("start");
    let big = OrderPlaced { order: "o-big".into(), cents: 1 };
    let mut envelope = eda::Envelope::root("shop", eda::PendingEvent::new(&big).expect("encode"), None);
    envelope.data = vec![b' '; 1024 * 1024];
    let err = rt.publisher().republish(&envelope).await.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("this NATS server carries") && err.contains("reference to large data"), "{err}");

    let line_break = OrderPlaced { order: "o-1\r\nX-Injected: yes".into(), cents: 1 };
    let err = rt.publisher().publish(&line_break).await.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("`ce-subject` attribute contains a line break"), "{err}");
    rt.shutdown().await;
    f.done().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_settings_an_absent_server_and_a_server_without_jetstream_are_errors_that_say_what_to_do() {
    let err = |r: Result<NatsTransport, eda::TransportError>| r.err().map(|e| e.to_string()).unwrap_or_default();

    let closed = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a port").port();
    let absent = err(NatsTransport::connect(&format!("nats://app:hunter2@127.0.0.1:{closed}")).await);
    assert!(
        absent.contains("cannot reach the nats broker") && absent.contains(&format!("127.0.0.1:{closed}")),
        "{absent}"
    );
    assert!(!absent.contains("hunter2"), "the password is not shown: {absent}");

    let typo = err(NatsTransport::connect("nats://127.0.0.1:4222?partitons=4").await);
    assert!(typo.contains("unknown setting `partitons`") && typo.contains("partitions"), "{typo}");

    let via_runtime = eda::transport::connect("nats://127.0.0.1:4222?max_deliver=0").await.err().map(|e| e.to_string());
    assert!(via_runtime.unwrap_or_default().contains("max_deliver 0"));

    let mut plain = NatsServer::start_with(&[]);
    let no_js = err(NatsTransport::connect(&plain.url()).await);
    assert!(no_js.contains("JetStream") && no_js.contains("-js"), "{no_js}");
    plain.stop("-TERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_and_streams_removed_under_a_running_service_are_made_again() {
    let f = Fixture::new(|o| o.partitions(1)).await;
    let rt = shipping(f.nats.clone()).start().await.expect("start");
    let seen = || rt.state::<Seen>().expect("state").0.lock().expect("lock").clone();
    rt.publisher().publish(&OrderPlaced { order: "o-1".into(), cents: 1 }).await.expect("publish");
    rt.settled(SETTLE).await.expect("settled");

    // An operator removes the group's consumer: it is made again, starts from the stream's
    // beginning, and the guard absorbs what was handled already.
    let stream = f.js().get_stream(f.nats.stream_name("orders.placed")).await.expect("stream");
    let names: Vec<String> = stream.consumer_names().try_collect().await.expect("consumer names");
    let current = names.iter().find(|n| n.starts_with("shipping_0-")).expect("the partition's consumer");
    stream.delete_consumer(current).await.expect("delete the consumer");
    rt.publisher().publish(&OrderPlaced { order: "o-2".into(), cents: 1 }).await.expect("publish");
    let deadline = tokio::time::Instant::now() + SETTLE;
    while seen().len() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "o-2 never handled: {:?}", seen());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Then the whole stream: publishing makes it again, and the consumer with it.
    f.js().delete_stream(f.nats.stream_name("orders.placed")).await.expect("delete the stream");
    rt.publisher().publish(&OrderPlaced { order: "o-3".into(), cents: 1 }).await.expect("publish");
    while seen().len() < 3 {
        assert!(tokio::time::Instant::now() < deadline, "o-3 never handled: {:?}", seen());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rt.settled(SETTLE).await.expect("settled");
    assert_eq!(seen(), ["o-1", "o-2", "o-3"], "each handled once");
    rt.shutdown().await;
    f.done().await;
}

/// A certificate authority and a server certificate for 127.0.0.1, made with openssl.
fn certificates(dir: &std::path::Path) {
    let openssl = |args: &[&str]| {
        let status = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("this test makes its certificates with the openssl command: install it (Debian package openssl)");
        assert!(status.success(), "openssl {args:?} failed");
    };
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").expect("write");
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=eda test CA",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "1",
        "-extfile",
        "san.ext",
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_a_password_from_the_url_work_and_a_wrong_password_is_refused_without_showing_it() {
    let dir = tempfile::tempdir().expect("a directory");
    certificates(dir.path());
    let path = |f: &str| dir.path().join(f).display().to_string();
    let (cert, key) = (path("server.pem"), path("server.key"));
    let mut server = NatsServer::start_with(&[
        "-js",
        "--tls",
        "--tlscert",
        &cert,
        "--tlskey",
        &key,
        "--user",
        "app",
        "--pass",
        "hunter2",
    ]);
    let port = server.url().rsplit(':').next().unwrap_or_default().to_owned();
    let url = format!("tls://app:hunter2@127.0.0.1:{port}?tls_ca={}&namespace=tlstest", path("ca.pem"));
    let nats = NatsTransport::connect(&url).await.expect("TLS with the test CA, and the password, are accepted");
    let rt = shipping(nats).start().await.expect("start");
    rt.publisher().publish(&OrderPlaced { order: "o-tls".into(), cents: 1 }).await.expect("publish");
    rt.settled(SETTLE).await.expect("settled");
    assert_eq!(rt.state::<Seen>().expect("state").0.lock().expect("lock").clone(), ["o-tls"]);
    rt.shutdown().await;

    let wrong = format!("tls://app:wrong-secret@127.0.0.1:{port}?tls_ca={}", path("ca.pem"));
    let err = NatsTransport::connect(&wrong).await.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("cannot reach the nats broker") && err.contains("app:***@"), "{err}");
    assert!(!err.contains("wrong-secret"), "the password is not shown: {err}");
    let untrusted = NatsTransport::connect(&format!("tls://app:hunter2@127.0.0.1:{port}")).await;
    assert!(untrusted.is_err(), "a server certificate from an unknown authority is refused");
    server.stop("-TERM");
}
