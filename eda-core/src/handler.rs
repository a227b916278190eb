//! Handlers as the registry sees them, and the context a handler runs in.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use crate::envelope::{CorrelationId, Envelope, EventId};
use crate::error::{CodecError, HandlerError};
use crate::event::{EmittedEvent, Event, EventInfo, PendingEvent};

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The generated entry point of a handler: decodes the event, calls the function and collects
/// what it emits into the [`Handling`].
pub type Invoke = for<'a> fn(&'a Handling, &'a States) -> BoxFuture<'a, Result<(), HandlerError>>;

/// Everything the runtime needs to know about one `#[handler]` function.
pub struct HandlerDescriptor {
    /// The handler's name: the function's name unless `#[handler(name = "…")]` says otherwise.
    pub name: &'static str,
    /// The module the function is defined in.
    pub module: &'static str,
    /// The consumer group it belongs to.
    pub group: &'static str,
    /// The event type it handles (its topic is `event.topic`).
    pub event: EventInfo,
    /// The type of the shared state it receives.
    pub state: StateInfo,
    /// The event types it may emit.
    pub emits: fn() -> Vec<EmittedEvent>,
    /// The step this handler compensates, when it is a compensator.
    pub compensates: Option<fn() -> &'static HandlerDescriptor>,
    /// How duplicate deliveries are recognised.
    pub idempotency: Idempotency,
    /// How many events this handler may handle at once (the runtime's default when `None`).
    pub concurrency: Option<usize>,
    /// How many attempts a transient failure gets (the runtime's default when `None`).
    pub max_attempts: Option<u32>,
    /// The generated entry point.
    pub invoke: Invoke,
}

impl HandlerDescriptor {
    /// The topic the handler consumes.
    pub fn topic(&self) -> &'static str {
        self.event.topic
    }

    /// `group/name`, how logs and errors name a handler.
    pub fn qualified_name(&self) -> String {
        format!("{}/{}", self.group, self.name)
    }
}

impl fmt::Debug for HandlerDescriptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerDescriptor")
            .field("name", &self.name)
            .field("module", &self.module)
            .field("group", &self.group)
            .field("event", &self.event.ce_type)
            .field("topic", &self.event.topic)
            .field("compensates", &self.compensates.map(|c| c().name))
            .field("idempotency", &self.idempotency)
            .finish()
    }
}

/// The type of a handler's shared state, for the start-up check that it was provided.
#[derive(Clone, Copy)]
pub struct StateInfo {
    /// The state type's id.
    pub type_id: fn() -> TypeId,
    /// The state type's name, for error messages.
    pub type_name: fn() -> &'static str,
}

impl StateInfo {
    /// The info of state type `S`.
    pub const fn of<S: Any>() -> Self {
        Self { type_id: TypeId::of::<S>, type_name: std::any::type_name::<S> }
    }

    /// True when the handler needs no state.
    pub fn is_unit(&self) -> bool {
        (self.type_id)() == TypeId::of::<()>()
    }
}

/// How a handler's idempotency guard recognises a duplicate.
#[derive(Clone, Copy)]
pub enum Idempotency {
    /// By (group, handler, event id): the default.
    EventId,
    /// By (group, handler, a key computed from the event): `#[handler(dedupe_key = field)]`.
    Key(fn(&Envelope) -> Result<String, CodecError>),
    /// No guard: `#[handler(idempotent = false)]`; the handler must be idempotent by itself.
    Off,
}

impl fmt::Debug for Idempotency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Idempotency::EventId => "EventId",
            Idempotency::Key(_) => "Key",
            Idempotency::Off => "Off",
        })
    }
}

/// A `#[handler]` function, named by the type `#[handler]` generates beside it.
///
/// `#[compensates(step)]` and explicit registration take these names:
/// `Registry::builder().handler::<reserve_stock>()`.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an eda handler",
    label = "not a `#[handler]` function",
    note = "name a function that is marked `#[handler(group = \"…\")]`"
)]
pub trait Handler {
    /// The handler's registry entry.
    fn descriptor() -> &'static HandlerDescriptor;
}

/// The registry entry that `#[handler]` submits to `inventory`.
pub struct HandlerRegistration(pub &'static HandlerDescriptor);

inventory::collect!(HandlerRegistration);

/// Shared state handed to handlers, one value per type.
#[derive(Clone, Default)]
pub struct States {
    by_type: HashMap<TypeId, Arc<dyn Any + Send + Sync>>,
}

/// A handler needs state the runtime was not given.
#[derive(Debug, thiserror::Error)]
#[error("no state of type `{0}` was given to the runtime: add `.state(…)` with a `{0}` to the runtime builder")]
pub struct MissingState(pub &'static str);

impl States {
    /// Adds (or replaces) the state of type `S`.
    pub fn insert<S: Send + Sync + 'static>(&mut self, state: S) {
        self.by_type.insert(TypeId::of::<S>(), Arc::new(state));
    }

    /// Adds state that is already shared.
    pub fn insert_arc<S: Send + Sync + 'static>(&mut self, state: Arc<S>) {
        self.by_type.insert(TypeId::of::<S>(), state);
    }

    /// True when state of the given type is present (`()` always is).
    pub fn contains(&self, type_id: TypeId) -> bool {
        type_id == TypeId::of::<()>() || self.by_type.contains_key(&type_id)
    }

    /// The state of type `S`.
    pub fn get<S: Send + Sync + 'static>(&self) -> Result<&S, MissingState> {
        static UNIT: () = ();
        let any: &(dyn Any + Send + Sync) = match self.by_type.get(&TypeId::of::<S>()) {
            Some(v) => &**v,
            None => &UNIT,
        };
        any.downcast_ref::<S>().ok_or(MissingState(std::any::type_name::<S>()))
    }
}

/// One handling of one delivered event by one handler: what the generated code reads, and
/// where the events it emits are collected until the runtime makes them durable.
pub struct Handling {
    envelope: Arc<Envelope>,
    group: &'static str,
    handler: &'static str,
    attempt: u32,
    emitted: Mutex<Vec<PendingEvent>>,
    transaction: futures_util::lock::Mutex<Option<Box<dyn Any + Send>>>,
}

impl Handling {
    /// Starts a handling.
    pub fn new(envelope: Arc<Envelope>, group: &'static str, handler: &'static str, attempt: u32) -> Self {
        Self {
            envelope,
            group,
            handler,
            attempt,
            emitted: Mutex::new(Vec::new()),
            transaction: futures_util::lock::Mutex::new(None),
        }
    }

    /// Lends the handler the transport's transaction.
    pub fn with_transaction(self, transaction: Option<Box<dyn Any + Send>>) -> Self {
        Self { transaction: futures_util::lock::Mutex::new(transaction), ..self }
    }

    /// Takes the lent transaction back once the handler has finished.
    pub fn take_transaction(&self) -> Option<Box<dyn Any + Send>> {
        self.transaction.try_lock().and_then(|mut slot| slot.take())
    }

    /// The envelope being handled.
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// The handler's consumer group.
    pub fn group(&self) -> &'static str {
        self.group
    }

    /// The handler's name.
    pub fn handler(&self) -> &'static str {
        self.handler
    }

    /// Which attempt this is (1 for the first).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Decodes the event; a payload that does not decode is a permanent error.
    pub fn decode<E: Event>(&self) -> Result<E, HandlerError> {
        crate::codec::decode(&self.envelope).map_err(HandlerError::permanent)
    }

    /// Adds events to publish once the handling succeeds.
    pub fn emit(&self, events: impl crate::event::Emit) -> Result<(), HandlerError> {
        let mut out = Vec::new();
        events.emit(&mut out)?;
        self.lock().extend(out);
        Ok(())
    }

    /// Takes the events emitted so far.
    pub fn take_emitted(&self) -> Vec<PendingEvent> {
        std::mem::take(&mut *self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<PendingEvent>> {
        // A panicking handler can poison the lock; the events it held are still valid.
        self.emitted.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What a handler function receives beside its event: the shared state of type `S` and the
/// handling's metadata, and a way to emit more events.
///
/// ```
/// use eda_core::{event, handler, Ctx};
/// use serde::{Deserialize, Serialize};
/// use std::sync::atomic::{AtomicU64, Ordering};
///
/// #[event(topic = "orders")]
/// #[derive(Serialize, Deserialize)]
/// struct OrderPlaced { total: u64 }
///
/// struct Revenue(AtomicU64);
///
/// #[handler(group = "reporting")]
/// async fn add_revenue(ev: OrderPlaced, cx: Ctx<'_, Revenue>) {
///     cx.0.fetch_add(ev.total, Ordering::Relaxed);
///     assert_eq!(cx.attempt(), 1);
/// }
/// ```
pub struct Ctx<'a, S = ()> {
    state: &'a S,
    handling: &'a Handling,
}

impl<'a, S> Ctx<'a, S> {
    /// Used by generated code.
    #[doc(hidden)]
    pub fn new(state: &'a S, handling: &'a Handling) -> Self {
        Self { state, handling }
    }

    /// The shared state.
    pub fn state(&self) -> &'a S {
        self.state
    }

    /// The envelope of the event being handled.
    pub fn envelope(&self) -> &'a Envelope {
        self.handling.envelope()
    }

    /// The id of the event being handled.
    pub fn event_id(&self) -> EventId {
        self.handling.envelope().id
    }

    /// The correlation id of the business transaction this event belongs to.
    pub fn correlation_id(&self) -> &'a CorrelationId {
        &self.handling.envelope().correlation_id
    }

    /// Which attempt this is (1 for the first).
    pub fn attempt(&self) -> u32 {
        self.handling.attempt()
    }

    /// The transaction the handling runs in, when the transport keeps its log in a database:
    /// the handler's own writes through it commit together with the guard record, the events
    /// it emits and the acknowledgement. `None` when the transport has no such transaction or
    /// it is not of type `T`. Transports offer typed shortcuts (`eda::sqlite::transaction`).
    pub async fn transaction<T: Any + Send>(&self) -> Option<Transaction<'a, T>> {
        let slot = self.handling.transaction.lock().await;
        if !slot.as_ref().is_some_and(|t| t.is::<T>()) {
            return None;
        }
        let mapped =
            futures_util::lock::MutexGuard::map(slot, |t| match t.as_mut().and_then(|b| b.downcast_mut::<T>()) {
                Some(t) => t,
                None => unreachable!("the transaction's type was checked under the same lock"),
            });
        Some(Transaction(mapped))
    }

    /// Emits an event besides those the handler returns. Like returned events, it is published
    /// only if the handling succeeds, with this event as its cause.
    pub fn emit<E: Event>(&self, event: E) -> Result<(), HandlerError> {
        self.handling.emit(event)
    }
}

/// The transaction a handler runs in, borrowed from its [`Ctx`]; dereferences to the
/// transport's transaction type.
pub struct Transaction<'a, T>(futures_util::lock::MappedMutexGuard<'a, Option<Box<dyn Any + Send>>, T>);

impl<T> std::ops::Deref for Transaction<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> std::ops::DerefMut for Transaction<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

impl<S> std::ops::Deref for Ctx<'_, S> {
    type Target = S;
    fn deref(&self) -> &S {
        self.state
    }
}

/// Not public API: the shape of one `#[handler]` function, implemented by the macro on the
/// type it generates beside the function. The bounds on the associated types are where a wrong
/// argument or return type is reported, once, on the user's tokens.
#[doc(hidden)]
pub trait HandlerFn: 'static {
    /// The event the function takes.
    type Event: Event;
    /// The state its context carries.
    type State: Send + Sync + 'static;
    /// What it returns.
    type Output: crate::event::HandlerReturn;
    /// Calls the function.
    fn call<'a>(event: Self::Event, cx: Ctx<'a, Self::State>) -> BoxFuture<'a, Self::Output>;
}

/// Not public API: what `#[handler]` arguments say, for [`describe`].
#[doc(hidden)]
pub struct HandlerAttrs {
    pub name: &'static str,
    pub module: &'static str,
    pub group: &'static str,
    pub compensates: Option<fn() -> &'static HandlerDescriptor>,
    pub idempotency: Idempotency,
    pub concurrency: Option<usize>,
    pub max_attempts: Option<u32>,
}

/// Not public API: the descriptor of the handler `H`, built at compile time.
#[doc(hidden)]
pub const fn describe<H: HandlerFn>(attrs: HandlerAttrs) -> HandlerDescriptor {
    let HandlerAttrs { name, module, group, compensates, idempotency, concurrency, max_attempts } = attrs;
    HandlerDescriptor {
        name,
        module,
        group,
        event: <H::Event as Event>::INFO,
        state: StateInfo::of::<H::State>(),
        emits: emits_of::<H::Output>,
        compensates,
        idempotency,
        concurrency,
        max_attempts,
        invoke: invoke::<H>,
    }
}

/// The event types a handler returning `R` emits.
fn emits_of<R: crate::event::HandlerReturn>() -> Vec<EmittedEvent> {
    let mut out = Vec::new();
    <R::Emits as crate::event::Emit>::describe(&mut out, false);
    out
}

/// Decodes the event, calls the handler with its state, and collects what it emits.
fn invoke<'a, H: HandlerFn>(handling: &'a Handling, states: &'a States) -> BoxFuture<'a, Result<(), HandlerError>> {
    Box::pin(async move {
        let event = handling.decode::<H::Event>()?;
        let state = states.get::<H::State>().map_err(HandlerError::permanent)?;
        let output = H::call(event, Ctx::new(state, handling)).await;
        handling.emit(crate::event::HandlerReturn::into_result(output)?)
    })
}
