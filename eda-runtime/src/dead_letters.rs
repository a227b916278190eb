//! Dead-letter tools: list, inspect, replay to the group that gave up, purge.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use eda_core::{Acker, DeadLetter, Delivery, HandlerDescriptor, Store, StoredDeadLetter, TransportError, UnitOfWork};

use crate::consumer::{handle_delivery, Shared};
use crate::{Error, Result};

/// What a replay did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Replay {
    /// The group handled the event; the dead letter is gone.
    Handled,
    /// The handlers gave up again; the dead letter stays, with this error.
    FailedAgain(String),
    /// The event was busy elsewhere (a guard or saga step held by another handling); try
    /// again shortly. The dead letter stays.
    Busy,
}

/// How a replayed delivery was settled.
#[derive(Clone, Debug)]
enum Settled {
    Acked,
    Again,
    Dead(String),
}

/// Settles a replayed delivery into a slot the replay reads, and hands out the transport's
/// store for the handling's transaction.
struct ReplayAcker {
    settled: Arc<Mutex<Option<Settled>>>,
    store: Option<Arc<dyn Store>>,
}

impl ReplayAcker {
    fn put(&self, s: Settled) {
        *self.settled.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
    }
}

#[async_trait]
impl Acker for ReplayAcker {
    async fn ack(self: Box<Self>) -> Result<(), TransportError> {
        self.put(Settled::Acked);
        Ok(())
    }

    async fn nack(self: Box<Self>, _delay: Duration) -> Result<(), TransportError> {
        self.put(Settled::Again);
        Ok(())
    }

    async fn dead_letter(self: Box<Self>, letter: DeadLetter) -> Result<(), TransportError> {
        self.put(Settled::Dead(letter.reason.error));
        Ok(())
    }

    async fn begin(&self) -> Result<Option<Box<dyn UnitOfWork>>, TransportError> {
        match &self.store {
            Some(store) => store
                .begin()
                .await
                .map(Some)
                .map_err(|e| TransportError::Other { transport: "replay", source: Box::new(e) }),
            None => Ok(None),
        }
    }
}

/// Hands a dead letter to the handlers of the group that gave up on it, in this process. The
/// idempotency guard applies (handlers that had already handled it skip it) unless `force`,
/// which bypasses the guard of the handler that gave up.
pub(crate) async fn replay(
    shared: &Shared,
    handlers: &[&'static HandlerDescriptor],
    store: Option<Arc<dyn Store>>,
    dead: &StoredDeadLetter,
    force: bool,
) -> Result<Replay> {
    let group: Vec<_> = handlers.iter().copied().filter(|h| h.group == dead.group).collect();
    if group.is_empty() {
        return Err(Error::Config(format!(
            "no handler of group `{}` runs in this binary, so its dead letter {} cannot be replayed here",
            dead.group, dead.id
        )));
    }
    // A type the group has no handler for would be acknowledged as not its business, and the
    // dead letter dropped: refuse instead (an unknown version of a handled event still goes
    // through, and is dead-lettered again until its handler is deployed).
    let ty = &dead.letter.envelope.ty;
    let name = dead.letter.envelope.name_and_version().map(|(name, _)| name);
    if !group.iter().any(|h| h.event.ce_type == ty || Some(h.event.name) == name) {
        return Err(Error::Config(format!(
            "dead letter {} is a `{ty}` event, which no handler of group `{}` takes: replaying it would only drop it; `dlq show {}` shows it, `dlq purge {}` removes it",
            dead.id, dead.group, dead.id, dead.id
        )));
    }
    let settled = Arc::new(Mutex::new(None));
    let acker = ReplayAcker { settled: settled.clone(), store };
    let delivery = Delivery::new(dead.letter.envelope.clone(), 1, 0, Box::new(acker));
    shared.in_flight.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let force = if force { dead.letter.reason.handler.as_deref() } else { None };
    handle_delivery(shared, &group, delivery, force).await;
    let outcome = settled.lock().unwrap_or_else(|p| p.into_inner()).take();
    Ok(match outcome {
        Some(Settled::Acked) => Replay::Handled,
        Some(Settled::Dead(error)) => Replay::FailedAgain(error),
        Some(Settled::Again) | None => Replay::Busy,
    })
}
