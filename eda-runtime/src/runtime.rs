//! The runtime: wires the registry's handlers to a transport and runs them.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eda_core::{
    CorrelationId, Envelope, Event, HandlerDescriptor, Inbox, PendingEvent, Registry, States, StoredDeadLetter, Topic,
    Transport,
};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::consumer::{self, ConsumerConfig, Shared, StatsSnapshot};
use crate::inbox::MemoryInbox;
use crate::journal::{EntryKind, Journal, JournalEntry};
use crate::retry::RetryPolicy;
use crate::{Error, Result};

/// Configures and starts a [`Runtime`].
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> eda::Result<()> {
/// use eda::{event, handler, Ctx, Runtime};
/// use serde::{Deserialize, Serialize};
/// use std::sync::atomic::{AtomicU32, Ordering};
///
/// #[event(topic = "greetings")]
/// #[derive(Serialize, Deserialize)]
/// struct Greeted { name: String }
///
/// #[derive(Default)]
/// struct Counter(AtomicU32);
///
/// #[handler(group = "counter")]
/// async fn count(_ev: Greeted, cx: Ctx<'_, Counter>) {
///     cx.0.fetch_add(1, Ordering::SeqCst);
/// }
///
/// let runtime = Runtime::builder(eda::Registry::builder().handler::<count>().publishes::<Greeted>().build())
///     .state(Counter::default())
///     .transport_url("memory://")
///     .start()
///     .await?;
/// runtime.publisher().publish(&Greeted { name: "Ada".into() }).await?;
/// runtime.settled(std::time::Duration::from_secs(5)).await?;
/// assert_eq!(runtime.state::<Counter>().map(|c| c.0.load(Ordering::SeqCst)), Some(1));
/// runtime.shutdown().await;
/// # Ok(()) }
/// ```
pub struct RuntimeBuilder {
    registry: Registry,
    groups: Option<Vec<String>>,
    states: States,
    transport: Option<Arc<dyn Transport>>,
    url: Option<String>,
    inbox: Option<Arc<dyn Inbox>>,
    #[cfg(any(feature = "sqlite", feature = "postgres"))]
    outbox: Option<crate::sql::SqlTransport>,
    source: String,
    config: ConsumerConfig,
    journal_capacity: usize,
    consume: bool,
    metrics_addr: Option<std::net::SocketAddr>,
}

impl RuntimeBuilder {
    fn new(registry: Registry) -> Self {
        Self {
            registry,
            groups: None,
            states: States::default(),
            transport: None,
            url: None,
            inbox: None,
            #[cfg(any(feature = "sqlite", feature = "postgres"))]
            outbox: None,
            source: default_source(),
            config: ConsumerConfig {
                max_in_flight: 64,
                retry: RetryPolicy::default(),
                shutdown_timeout: Duration::from_secs(30),
                max_payload: 1024 * 1024,
            },
            journal_capacity: 100_000,
            consume: true,
            metrics_addr: None,
        }
    }

    /// Serves Prometheus metrics on `GET http://<addr>/metrics` (off unless asked): consumer lag
    /// per group, topic and partition; events handled, failed, retried, dead-lettered, skipped
    /// and absorbed as duplicates; handler latency. Port 0 picks a free port
    /// ([`Runtime::metrics_addr`] says which).
    pub fn metrics_addr(mut self, addr: std::net::SocketAddr) -> Self {
        self.metrics_addr = Some(addr);
        self
    }

    /// Starts no consumers: for tools (the dead-letter commands, lag) that work on the
    /// transport without handling its events.
    pub fn without_consumers(mut self) -> Self {
        self.consume = false;
        self
    }

    /// Adds shared state: handlers taking `Ctx<'_, S>` receive it.
    pub fn state<S: Send + Sync + 'static>(mut self, state: S) -> Self {
        self.states.insert(state);
        self
    }

    /// Adds shared state the application also keeps a handle to.
    pub fn shared_state<S: Send + Sync + 'static>(mut self, state: Arc<S>) -> Self {
        self.states.insert_arc(state);
        self
    }

    /// The transport to use.
    pub fn transport(mut self, transport: impl Transport) -> Self {
        self.transport = Some(Arc::new(transport));
        self
    }

    /// The transport to use, shared with other code.
    pub fn shared_transport(mut self, transport: Arc<dyn Transport>) -> Self {
        self.transport = Some(transport);
        self
    }

    /// The transport to connect at start, by URL (see [`crate::transport::connect`]).
    pub fn transport_url(mut self, url: impl Into<String>) -> Self {
        self.url = Some(url.into());
        self
    }

    /// The inbox behind idempotency guards and saga step records, for transports that handle
    /// outside a database transaction. By default the transport's own
    /// ([`Transport::inbox`]: shared by the runtimes on an in-process log; on NATS, step records
    /// in the broker and guards in the process), else one in this process's memory.
    pub fn inbox(mut self, inbox: impl Inbox) -> Self {
        self.inbox = Some(Arc::new(inbox));
        self
    }

    /// Keeps every handling's guard record, its own writes (through
    /// [`eda::sql::transaction`](crate::sql::transaction)) and the events it emits in this
    /// database, in one transaction, and runs a [`Relay`](crate::sql::Relay) that carries the
    /// emitted events to the transport: the inbox and the transactional outbox beside a broker.
    /// (With a SQL log as the transport, handlings do this without an outbox.)
    #[cfg(any(feature = "sqlite", feature = "postgres"))]
    pub fn outbox(mut self, database: crate::sql::SqlTransport) -> Self {
        self.outbox = Some(database);
        self
    }

    /// Runs only these consumer groups (a service runs its own; by default all run).
    pub fn groups<I: IntoIterator<Item = S>, S: Into<String>>(mut self, groups: I) -> Self {
        self.groups = Some(groups.into_iter().map(Into::into).collect());
        self
    }

    /// Declares that application code publishes `E`.
    pub fn publishes<E: Event>(mut self) -> Self {
        self.registry.add_published(E::INFO);
        self
    }

    /// The CloudEvents `source` of published events (the binary's name by default).
    pub fn service(mut self, name: impl Into<String>) -> Self {
        self.source = name.into();
        self
    }

    /// How many deliveries one subscription holds at once (64 by default).
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.config.max_in_flight = n.max(1);
        self
    }

    /// How transient failures are retried.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.config.retry = policy;
        self
    }

    /// The largest event payload, in bytes, that is published or handled (1 MiB by default,
    /// the most every broker carries: NATS' default `max_payload`, headers included, is 1 MiB).
    /// Publishing a larger event is an error; a larger one that arrives anyway is dead-lettered.
    pub fn max_payload(mut self, bytes: usize) -> Self {
        self.config.max_payload = bytes;
        self
    }

    /// How long shutdown waits for running handlers (30 s by default).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.config.shutdown_timeout = timeout;
        self
    }

    /// How many entries the journal keeps (100 000 by default; 0 turns it off).
    pub fn journal_capacity(mut self, entries: usize) -> Self {
        self.journal_capacity = entries;
        self
    }

    /// Checks the registry and the configuration, connects, and starts every consumer.
    pub async fn start(self) -> Result<Runtime> {
        let RuntimeBuilder {
            mut registry,
            groups,
            states,
            transport,
            url,
            inbox,
            #[cfg(any(feature = "sqlite", feature = "postgres"))]
            outbox,
            source,
            config,
            journal_capacity,
            consume,
            metrics_addr,
        } = self;
        // The choreography is checked whole, before narrowing to this service's groups.
        let report = registry.validate();
        for w in &report.warnings {
            tracing::warn!("{w}");
        }
        if !report.is_ok() {
            return Err(Error::InvalidRegistry(report));
        }
        // The groups linked into this binary that it does not run: a broker that keeps events
        // only for groups it knows of is told about them, so that they miss nothing published
        // from now on.
        let mut elsewhere: BTreeSet<(&'static str, &'static str)> = BTreeSet::new();
        if let Some(groups) = &groups {
            let known: HashSet<_> = registry.handlers().iter().map(|h| h.group).collect();
            let runs = |g: &str| groups.iter().any(|r| r == g);
            elsewhere.extend(registry.handlers().iter().filter(|h| !runs(h.group)).map(|h| (h.group, h.topic())));
            if let Some(unknown) = groups.iter().find(|g| !known.contains(g.as_str())) {
                let mut known: Vec<_> = known.into_iter().collect();
                known.sort_unstable();
                return Err(Error::Config(format!(
                    "no handler belongs to group `{unknown}`; the groups linked into this binary are {known:?}"
                )));
            }
            registry.retain_groups(&groups.iter().map(String::as_str).collect::<Vec<_>>());
        }
        check_states(&registry, &states)?;
        let transport =
            match (transport, url) {
                (Some(t), _) => t,
                (None, Some(url)) => crate::transport::connect(&url).await?,
                (None, None) => return Err(Error::Config(
                    "no transport: call `.transport_url(\"memory://\")` (or `.transport(…)`) on the runtime builder"
                        .into(),
                )),
            };
        let steps: HashSet<_> =
            registry.handlers().iter().filter_map(|h| h.compensates.map(|s| s())).map(|s| (s.group, s.name)).collect();
        let failures = registry
            .handlers()
            .iter()
            .map(|h| {
                ((h.group, h.name), (h.emits)().into_iter().filter(|e| e.failure).map(|e| e.info.ce_type).collect())
            })
            .collect();
        let limits = registry
            .handlers()
            .iter()
            .filter_map(|h| h.concurrency.map(|n| ((h.group, h.name), Arc::new(Semaphore::new(n)))))
            .collect();
        #[cfg(any(feature = "sqlite", feature = "postgres"))]
        let (store, relay) = match &outbox {
            Some(db) => {
                let relay = crate::sql::Relay::new(db.clone(), transport.clone()).spawn();
                (Some(Arc::new(db.clone()) as Arc<dyn eda_core::Store>), Some(relay))
            }
            None => (None, None),
        };
        #[cfg(not(any(feature = "sqlite", feature = "postgres")))]
        let store = None;
        let inbox = match inbox.or_else(|| transport.inbox()) {
            Some(inbox) => inbox,
            None => {
                let own_store = store.is_some() || transport.clone().store().is_some();
                if let (false, Some(h)) = (own_store, registry.handlers().iter().find(|h| h.compensates.is_some())) {
                    return Err(Error::Config(format!(
                        "`{}` compensates a saga step, and the `{}` transport keeps no saga records that every instance shares: \
                         a compensator on another instance, or after a restart, would find no step and skip it. \
                         Keep the inbox in a database with `.outbox(db)`, or give `.inbox(…)` one every instance shares",
                        h.qualified_name(),
                        transport.kind()
                    )));
                }
                Arc::new(MemoryInbox::default())
            }
        };
        let (stop_tx, stop) = watch::channel(false);
        let metrics = crate::metrics::Metrics::default();
        let handler_infos = registry
            .handlers()
            .iter()
            .map(|h| ((h.group, h.name), Arc::new(consumer::HandlerInfo::new(h, &metrics))))
            .collect();
        let shared = Arc::new(Shared {
            handlers: handler_infos,
            sequences_keys: transport.sequences_keys(),
            transport,
            inbox,
            states,
            source,
            config,
            journal: Journal::new(journal_capacity),
            stats: Default::default(),
            metrics,
            in_flight: Default::default(),
            steps,
            failures,
            limits,
            store,
            stop,
        });
        let mut by_subscription: BTreeMap<(&'static str, &'static str), Vec<&'static HandlerDescriptor>> =
            BTreeMap::new();
        for h in registry.handlers() {
            by_subscription.entry((h.group, h.topic())).or_default().push(*h);
        }
        if !consume {
            elsewhere.extend(by_subscription.keys().copied());
        }
        for &(group, topic) in &elsewhere {
            let subscription = eda_core::Subscription { group: group.to_owned(), topic: topic.to_owned(), prefetch: 1 };
            shared.transport.prepare(&subscription).await?;
        }
        let mut tasks = JoinSet::new();
        let mut firsts = Vec::new();
        for ((group, topic), handlers) in by_subscription.iter().filter(|_| consume) {
            tracing::debug!(group, topic, handlers = handlers.len(), "starting consumer");
            let (first, subscribed) = tokio::sync::oneshot::channel();
            firsts.push(subscribed);
            tasks.spawn(consumer::consume(shared.clone(), group, topic, handlers.clone().into(), first));
        }
        let subscriptions: Vec<_> = by_subscription.into_keys().collect();
        let metrics_addr = match metrics_addr {
            Some(addr) => {
                let listener = crate::metrics::bind(addr).await?;
                let bound = listener.local_addr().map_err(|e| Error::Config(format!("metrics endpoint: {e}")))?;
                #[cfg(any(feature = "sqlite", feature = "postgres"))]
                let relayed = relay.as_ref().map(|r| (r.relayed_count(), Default::default()));
                #[cfg(not(any(feature = "sqlite", feature = "postgres")))]
                let relayed = None;
                let scrape = Arc::new(crate::metrics::Scrape {
                    shared: shared.clone(),
                    subscriptions: subscriptions.clone(),
                    #[cfg(any(feature = "sqlite", feature = "postgres"))]
                    outbox: outbox.clone(),
                    relayed,
                    rendering: tokio::sync::Mutex::new(()),
                });
                tasks.spawn(crate::metrics::serve(listener, scrape, shared.stop.clone()));
                tracing::info!(%bound, "serving metrics on /metrics");
                Some(bound)
            }
            None => None,
        };
        let runtime = Runtime {
            shared,
            registry,
            subscriptions,
            stop: stop_tx,
            tasks: Mutex::new(Some(tasks)),
            metrics_addr,
            #[cfg(any(feature = "sqlite", feature = "postgres"))]
            relay: Mutex::new(relay),
            #[cfg(any(feature = "sqlite", feature = "postgres"))]
            outbox,
        };
        // Each consumer's first subscription, for a while: one its transport refuses for its
        // settings fails the start (after the others are shut down again). A transport that
        // does not answer yet is retried in the background, as before.
        let deadline = tokio::time::Instant::now() + FIRST_SUBSCRIPTION;
        for subscribed in firsts {
            if let Ok(Ok(Some(refused))) = tokio::time::timeout_at(deadline, subscribed).await {
                runtime.shutdown().await;
                return Err(refused.into());
            }
        }
        Ok(runtime)
    }

    /// Starts, runs until ctrl-c (or SIGTERM on Unix), then shuts down gracefully.
    pub async fn run_until_ctrl_c(self) -> Result<()> {
        let runtime = self.start().await?;
        wait_for_signal().await?;
        tracing::info!("shutting down");
        runtime.shutdown().await;
        Ok(())
    }
}

/// How long [`RuntimeBuilder::start`] waits for the consumers' first subscriptions.
const FIRST_SUBSCRIPTION: Duration = Duration::from_secs(15);

fn default_source() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "eda".to_owned())
}

fn check_states(registry: &Registry, states: &States) -> Result<()> {
    let mut missing: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for h in registry.handlers() {
        if !states.contains((h.state.type_id)()) {
            missing.entry((h.state.type_name)()).or_default().push(h.qualified_name());
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let lines: Vec<_> = missing
        .iter()
        .map(|(ty, hs)| {
            format!("  `{ty}`, needed by {}: add `.state(…)` with one to the runtime builder", hs.join(", "))
        })
        .collect();
    Err(Error::Config(format!("handlers need state the runtime was not given:\n{}", lines.join("\n"))))
}

async fn wait_for_signal() -> Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).map_err(Error::Signal)?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.map_err(Error::Signal),
            _ = term.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await.map_err(Error::Signal)
    }
}

/// A running set of consumers, with a [`Publisher`] for application code.
pub struct Runtime {
    shared: Arc<Shared>,
    registry: Registry,
    subscriptions: Vec<(&'static str, &'static str)>,
    stop: watch::Sender<bool>,
    tasks: Mutex<Option<JoinSet<()>>>,
    metrics_addr: Option<std::net::SocketAddr>,
    #[cfg(any(feature = "sqlite", feature = "postgres"))]
    relay: Mutex<Option<crate::sql::RelayHandle>>,
    #[cfg(any(feature = "sqlite", feature = "postgres"))]
    outbox: Option<crate::sql::SqlTransport>,
}

impl Runtime {
    /// A builder over every `#[handler]` linked into this binary.
    pub fn from_registry() -> RuntimeBuilder {
        RuntimeBuilder::new(Registry::from_inventory())
    }

    /// A builder over the given registry.
    pub fn builder(registry: Registry) -> RuntimeBuilder {
        RuntimeBuilder::new(registry)
    }

    /// Publishes events on behalf of application code.
    pub fn publisher(&self) -> Publisher {
        Publisher { shared: self.shared.clone() }
    }

    /// The registry this runtime runs (narrowed to its groups).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The transport.
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.shared.transport
    }

    /// Shared state of type `S`, as given to the builder.
    pub fn state<S: Send + Sync + 'static>(&self) -> Option<&S> {
        self.shared.states.get::<S>().ok()
    }

    /// Everything this process saw of one business transaction, in order.
    pub fn trace(&self, correlation: &CorrelationId) -> Vec<JournalEntry> {
        self.shared.journal.trace(correlation)
    }

    /// Every journal entry still held, in order.
    pub fn journal(&self) -> Vec<JournalEntry> {
        self.shared.journal.entries()
    }

    /// What the transport recorded of one saga: its events in publish order, each with the
    /// handlings that completed (from the guard records). Needs a transport that keeps such a
    /// record (the SQL log); [`trace`](Self::trace) is this process's own view.
    pub async fn saga(&self, correlation: &CorrelationId) -> Result<Vec<eda_core::SagaEvent>> {
        let view = self.shared.transport.saga_view().ok_or_else(|| {
            Error::Config(format!(
                "the {} transport keeps no record of sagas to read back; the SQL log does (sqlite://, postgres://)",
                self.shared.transport.kind()
            ))
        })?;
        Ok(view.saga(correlation).await?)
    }

    /// The dead letters of `group` (or of every group), oldest first.
    pub async fn dead_letters(&self, group: Option<&str>) -> Result<Vec<StoredDeadLetter>> {
        Ok(self.dead_letter_store()?.dead_letters(group).await?)
    }

    /// One page of the dead letters of `group` (or of every group), oldest first.
    pub async fn dead_letter_page(&self, group: Option<&str>, page: eda_core::Page) -> Result<Vec<StoredDeadLetter>> {
        Ok(self.dead_letter_store()?.dead_letter_page(group, page).await?)
    }

    /// Forgets consumer group `group`, which no handler of this binary belongs to any more, and
    /// whose instances have all stopped: its positions then no longer keep the log it did not
    /// read from retention (see [`Transport::retire_group`](eda_core::Transport::retire_group)).
    /// Returns how many records went.
    pub async fn retire_group(&self, group: &str) -> Result<u64> {
        if self.registry.handlers().iter().any(|h| h.group == group) {
            return Err(Error::Config(format!(
                "group `{group}` still has handlers in this build: a retired group that runs again starts over from the oldest retained event; remove its handlers (or rename the group) first"
            )));
        }
        Ok(self.shared.transport.retire_group(group).await?)
    }

    /// One dead letter.
    pub async fn dead_letter(&self, id: u64) -> Result<Option<StoredDeadLetter>> {
        Ok(self.dead_letter_store()?.dead_letter(id).await?)
    }

    /// Hands dead letter `id` to the group that gave up on it, once more, in this process;
    /// removes it when the group handled it. The idempotency guard still applies unless
    /// `force`, which bypasses the guard of the handler that gave up.
    pub async fn replay(&self, id: u64, force: bool) -> Result<crate::Replay> {
        let store = self.dead_letter_store()?;
        let Some(dead) = store.dead_letter(id).await? else {
            return Err(Error::Config(format!("there is no dead letter {id}")));
        };
        let own_store = self.shared.store.clone().or_else(|| self.shared.transport.clone().store());
        let outcome =
            crate::dead_letters::replay(&self.shared, self.registry.handlers(), own_store, &dead, force).await?;
        if outcome == crate::Replay::Handled {
            store.remove_dead_letter(id).await?;
        }
        Ok(outcome)
    }

    /// Removes dead letter `id` without handling it; false when there was none.
    pub async fn purge(&self, id: u64) -> Result<bool> {
        Ok(self.dead_letter_store()?.remove_dead_letter(id).await?)
    }

    fn dead_letter_store(&self) -> Result<&dyn eda_core::DeadLetterStore> {
        self.shared.transport.dead_letter_store().ok_or_else(|| {
            Error::Config(format!(
                "the {} transport keeps no dead letters of its own that eda can reach",
                self.shared.transport.kind()
            ))
        })
    }

    /// Where the metrics endpoint listens, when it was asked for.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics_addr
    }

    /// What the consumers did since start.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// Lag of every subscription of this runtime: `(group, topic) → events not yet settled`,
    /// and with an outbox, of its relay (group `eda-relay`): events not yet relayed.
    pub async fn lag(&self) -> Result<BTreeMap<(String, String), u64>> {
        let mut out = BTreeMap::new();
        for (group, topic) in &self.subscriptions {
            let lag = self.shared.transport.lag(group, topic).await?.iter().map(|p| p.lag).sum();
            out.insert(((*group).to_owned(), (*topic).to_owned()), lag);
        }
        #[cfg(any(feature = "sqlite", feature = "postgres"))]
        if let Some(outbox) = &self.outbox {
            for topic in outbox.topics().await? {
                let lag = outbox.lag("eda-relay", &topic).await?.iter().map(|p| p.lag).sum();
                out.insert(("eda-relay".to_owned(), topic), lag);
            }
        }
        Ok(out)
    }

    /// Waits until every subscription has caught up and nothing is being handled, which in a
    /// closed system means every saga has settled.
    pub async fn settled(&self, timeout: Duration) -> Result<()> {
        let started = tokio::time::Instant::now();
        let mut quiet_rounds = 0;
        let mut pause = Duration::from_millis(5);
        loop {
            let in_flight = self.shared.in_flight.load(Ordering::SeqCst);
            // While something is being handled it has not settled, whatever the lag says: ask
            // the transport only when nothing is (on a broker each lag is a round of requests).
            let quiet = in_flight == 0 && self.lag().await?.values().all(|l| *l == 0);
            if quiet {
                // Twice in a row: an event emitted between two reads is caught by the second.
                quiet_rounds += 1;
                if quiet_rounds == 2 {
                    return Ok(());
                }
                pause = Duration::from_millis(5);
            } else {
                quiet_rounds = 0;
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            if started.elapsed() >= timeout {
                let lag = self.lag().await?;
                let behind: Vec<_> = lag.iter().filter(|(_, l)| **l > 0).collect();
                let detail = format!("{in_flight} in flight; behind: {behind:?}");
                return Err(Error::NotSettled { waited: timeout, detail });
            }
            tokio::time::sleep(pause).await;
        }
    }

    /// Stops intake, lets running handlers finish (up to the shutdown timeout), settles their
    /// deliveries and returns. Events not handled stay with the transport. It returns within
    /// the shutdown timeout and a few seconds more, whatever the broker does (away, slow).
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        let deadline = tokio::time::Instant::now() + self.shared.config.shutdown_timeout + CLOSE_GRACE;
        // Each consumer bounds its own drain by the shutdown timeout.
        let tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut tasks) = tasks {
            while tasks.join_next().await.is_some() {}
        }
        // The relay goes last: what the handlers emitted before stopping still gets out.
        #[cfg(any(feature = "sqlite", feature = "postgres"))]
        {
            let relay = self.relay.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(relay) = relay {
                if tokio::time::timeout_at(deadline, relay.stop()).await.is_err() {
                    tracing::warn!(
                        "the relay did not stop in time; what it did not record goes again at the next start"
                    );
                }
            }
        }
        let at_least = tokio::time::Instant::now() + Duration::from_secs(1);
        match tokio::time::timeout_at(deadline.max(at_least), self.shared.transport.close()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "closing the transport failed"),
            Err(_) => tracing::warn!("closing the transport did not finish in time; unsettled events will come again"),
        }
    }
}

/// What shutdown allows past its timeout for the relay and the transport to close.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

impl Drop for Runtime {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Publishes events from application code (outside handlers).
#[derive(Clone)]
pub struct Publisher {
    shared: Arc<Shared>,
}

impl Publisher {
    /// Publishes an event that starts a new business transaction; returns its envelope.
    pub async fn publish<E: Event>(&self, event: &E) -> Result<Envelope> {
        self.send(event, None).await
    }

    /// Publishes an event on its typed topic binding (an event cannot be published on a topic
    /// it is not bound to: this does not compile with another event type's topic).
    pub async fn publish_to<E: Event>(&self, topic: Topic<E>, event: &E) -> Result<Envelope> {
        debug_assert_eq!(topic.name(), E::INFO.topic);
        self.send(event, None).await
    }

    /// Publishes an event as part of an existing business transaction.
    pub async fn publish_correlated<E: Event>(&self, event: &E, correlation: CorrelationId) -> Result<Envelope> {
        self.send(event, Some(correlation)).await
    }

    /// Publishes an envelope as it is: a producer retry or a replay. Consumers' idempotency
    /// guards recognise it by its id; on NATS the server already drops it when it comes within
    /// the stream's duplicate window, as the id is its `Nats-Msg-Id`.
    pub async fn republish(&self, envelope: &Envelope) -> Result<()> {
        self.check_payload(envelope)?;
        self.shared.transport.publish(envelope).await?;
        if self.shared.journal.enabled() {
            self.shared.journal.record(envelope, EntryKind::Published { by: None });
        }
        Ok(())
    }

    /// Publishes several events, each starting a business transaction of its own, and returns
    /// their envelopes once the transport has accepted all of them. Events of one key keep
    /// their order; on a partitioned broker the partitions are published to concurrently, so
    /// this is the fast way to publish a batch. (Concurrent `publish` calls are pipelined too,
    /// but promise no order between themselves.)
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> eda::Result<()> {
    /// #[eda::event(topic = "orders", key = order_id)]
    /// #[derive(serde::Serialize, serde::Deserialize)]
    /// struct OrderPlaced { order_id: u32 }
    ///
    /// let runtime = eda::Runtime::builder(eda::Registry::default()).transport_url("memory://").start().await?;
    /// let orders: Vec<_> = (0..100).map(|order_id| OrderPlaced { order_id }).collect();
    /// let envelopes = runtime.publisher().publish_all(&orders).await?;
    /// assert_eq!(envelopes.len(), 100);
    /// # runtime.shutdown().await; Ok(()) }
    /// ```
    pub async fn publish_all<E: Event>(&self, events: &[E]) -> Result<Vec<Envelope>> {
        let mut envelopes = Vec::with_capacity(events.len());
        for event in events {
            let envelope = Envelope::root(&self.shared.source, PendingEvent::new(event)?, None);
            self.check_payload(&envelope)?;
            envelopes.push(envelope);
        }
        self.shared.transport.publish_all(&envelopes).await?;
        if self.shared.journal.enabled() {
            for envelope in &envelopes {
                self.shared.journal.record(envelope, EntryKind::Published { by: None });
            }
        }
        Ok(envelopes)
    }

    fn check_payload(&self, envelope: &Envelope) -> Result<()> {
        let limit = self.shared.config.max_payload;
        if envelope.data.len() > limit {
            return Err(Error::Config(format!(
                "`{}` is {} bytes, over the payload limit of {limit}: send a reference to large data instead, or raise RuntimeBuilder::max_payload if every transport in the path carries it",
                envelope.ty,
                envelope.data.len()
            )));
        }
        Ok(())
    }

    async fn send<E: Event>(&self, event: &E, correlation: Option<CorrelationId>) -> Result<Envelope> {
        let envelope = Envelope::root(&self.shared.source, PendingEvent::new(event)?, correlation);
        self.republish(&envelope).await?;
        Ok(envelope)
    }
}
