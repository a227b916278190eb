//! Events, their topic bindings and what a handler may emit.

use std::fmt;
use std::marker::PhantomData;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::HandlerError;

/// What the registry and the transports know of an event type, fixed at compile time by
/// `#[event]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EventInfo {
    /// The event's name (the type's name unless `#[event(name = "…")]` says otherwise).
    pub name: &'static str,
    /// The schema version (`#[event(version = N)]`, 1 by default).
    pub version: u32,
    /// The CloudEvents `type`: `<name>.v<version>`.
    pub ce_type: &'static str,
    /// The topic the event is bound to.
    pub topic: &'static str,
    /// The Rust type's path (`module::Type`): two types claiming one CloudEvents `type` are
    /// told apart by it, and refused at start-up.
    pub path: &'static str,
}

/// A domain event: a fact that happened, bound to one topic.
///
/// Implemented by `#[event]`; implementing it by hand is possible but loses the compile-time
/// checks the macro adds.
///
/// ```
/// use eda_core::{event, Event};
/// use serde::{Deserialize, Serialize};
///
/// #[event(topic = "orders", key = order_id)]
/// #[derive(Serialize, Deserialize)]
/// struct OrderConfirmed {
///     order_id: u64,
/// }
///
/// assert_eq!(OrderConfirmed::INFO.topic, "orders");
/// assert_eq!(OrderConfirmed::INFO.ce_type, "OrderConfirmed.v1");
/// assert_eq!(OrderConfirmed { order_id: 7 }.key().as_deref(), Some("7"));
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an eda event",
    label = "not an event",
    note = "add `#[eda::event(topic = \"…\")]` to the definition of `{Self}`"
)]
pub trait Event: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// Name, version and topic of this event type.
    const INFO: EventInfo;

    /// The partition key: events with the same key are handled in publish order.
    fn key(&self) -> Option<String>;

    /// The typed binding of this event to its topic.
    fn topic() -> Topic<Self>
    where
        Self: Sized,
    {
        Topic { name: Self::INFO.topic, _event: PhantomData }
    }
}

/// A topic as bound to one event type: only [`Event::topic`] makes one, so an event cannot be
/// published on a topic it is not bound to.
pub struct Topic<E> {
    name: &'static str,
    _event: PhantomData<fn() -> E>,
}

impl<E> Topic<E> {
    /// The topic's name.
    pub fn name(&self) -> &'static str {
        self.name
    }
}

impl<E> Clone for Topic<E> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<E> Copy for Topic<E> {}

impl<E> fmt::Debug for Topic<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Topic").field(&self.name).finish()
    }
}

/// The result of a saga step: it either succeeded, emitting `S`, or failed in domain terms,
/// emitting the failure event `F` that drives compensation.
///
/// Domain failures are not errors: they are not retried, they are facts other services react to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome<S, F = Never> {
    /// The step's effects happened.
    Success(S),
    /// The step could not happen; nothing of it needs undoing.
    Failure(F),
}

/// An event that can never be emitted: the failure side of a step that cannot fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Never {}

/// One event type a handler may emit, as recorded in the registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EmittedEvent {
    /// The event type.
    pub info: EventInfo,
    /// True when it is the failure side of an [`Outcome`].
    pub failure: bool,
}

/// An event ready to be published: encoded, keyed, not yet enveloped.
#[derive(Clone, Debug)]
pub struct PendingEvent {
    /// The event type.
    pub info: EventInfo,
    /// Its partition key.
    pub key: Option<String>,
    /// The encoded payload.
    pub data: Vec<u8>,
}

impl PendingEvent {
    /// Encodes an event.
    pub fn new<E: Event>(event: &E) -> Result<Self, crate::CodecError> {
        Ok(Self { info: E::INFO, key: event.key(), data: crate::codec::encode(event)? })
    }
}

/// What a handler may return: events it emits.
///
/// Implemented for `()`, every event, `Option<T>`, `Vec<E>`, `Outcome<S, F>` and tuples of up
/// to four of these.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be emitted by an eda handler",
    label = "not an event or a collection of events",
    note = "return `()`, an `#[event]` type, `Option<E>`, `Vec<E>`, `Outcome<Success, Failure>` or a tuple of these, optionally inside `Result<_, E>`"
)]
pub trait Emit {
    /// Appends the event types this return type can emit.
    fn describe(out: &mut Vec<EmittedEvent>, failure: bool);
    /// Encodes the events this value holds.
    fn emit(self, out: &mut Vec<PendingEvent>) -> Result<(), HandlerError>;
}

impl Emit for () {
    fn describe(_: &mut Vec<EmittedEvent>, _: bool) {}
    fn emit(self, _: &mut Vec<PendingEvent>) -> Result<(), HandlerError> {
        Ok(())
    }
}

impl Emit for Never {
    fn describe(_: &mut Vec<EmittedEvent>, _: bool) {}
    fn emit(self, _: &mut Vec<PendingEvent>) -> Result<(), HandlerError> {
        match self {}
    }
}

impl<E: Event> Emit for E {
    fn describe(out: &mut Vec<EmittedEvent>, failure: bool) {
        out.push(EmittedEvent { info: E::INFO, failure });
    }
    fn emit(self, out: &mut Vec<PendingEvent>) -> Result<(), HandlerError> {
        out.push(PendingEvent::new(&self).map_err(HandlerError::permanent)?);
        Ok(())
    }
}

impl<T: Emit> Emit for Option<T> {
    fn describe(out: &mut Vec<EmittedEvent>, failure: bool) {
        T::describe(out, failure);
    }
    fn emit(self, out: &mut Vec<PendingEvent>) -> Result<(), HandlerError> {
        self.map_or(Ok(()), |v| v.emit(out))
    }
}

impl<E: Event> Emit for Vec<E> {
    fn describe(out: &mut Vec<EmittedEvent>, failure: bool) {
        E::describe(out, failure);
    }
    fn emit(self, out: &mut Vec<PendingEvent>) -> Result<(), HandlerError> {
        self.into_iter().try_for_each(|e| e.emit(out))
    }
}

impl<S: Emit, F: Emit> Emit for Outcome<S, F> {
    fn describe(out: &mut Vec<EmittedEvent>, failure: bool) {
        S::describe(out, failure);
        F::describe(out, true);
    }
    fn emit(self, out: &mut Vec<PendingEvent>) -> Result<(), HandlerError> {
        match self {
            Outcome::Success(s) => s.emit(out),
            Outcome::Failure(f) => f.emit(out),
        }
    }
}

macro_rules! emit_tuple {
    ($($t:ident),+) => {
        impl<$($t: Emit),+> Emit for ($($t,)+) {
            fn describe(out: &mut Vec<EmittedEvent>, failure: bool) {
                $($t::describe(out, failure);)+
            }
            #[allow(non_snake_case)]
            fn emit(self, out: &mut Vec<PendingEvent>) -> Result<(), HandlerError> {
                let ($($t,)+) = self;
                $($t.emit(out)?;)+
                Ok(())
            }
        }
    };
}
emit_tuple!(A, B);
emit_tuple!(A, B, C);
emit_tuple!(A, B, C, D);

/// What a handler function may return: something [`Emit`], or a `Result` of it whose error
/// converts into a [`HandlerError`].
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a valid return type for an eda handler",
    label = "handlers return events, not this",
    note = "return `()`, an `#[event]` type, `Option<E>`, `Vec<E>`, `Outcome<Success, Failure>` or a tuple of these, optionally as `Result<_, E>` where `E` is an error type or `eda::HandlerError`"
)]
pub trait HandlerReturn {
    /// What the handler emits on success.
    type Emits: Emit;
    /// Separates the emitted events from a handler error.
    fn into_result(self) -> Result<Self::Emits, HandlerError>;
}

impl<T: Emit> HandlerReturn for T {
    type Emits = T;
    fn into_result(self) -> Result<T, HandlerError> {
        Ok(self)
    }
}

impl<T: Emit, E> HandlerReturn for Result<T, E>
where
    HandlerError: From<E>,
{
    type Emits = T;
    fn into_result(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::from)
    }
}
