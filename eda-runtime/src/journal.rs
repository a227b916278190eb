//! What this process saw happen to each business transaction: the events it published and
//! every handling, in order, kept in a bounded in-memory ring.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use eda_core::{CorrelationId, Envelope, EventId};

/// One thing that happened to one event in this process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JournalEntry {
    /// When.
    pub at: SystemTime,
    /// The event's correlation id.
    pub correlation_id: CorrelationId,
    /// The event's id.
    pub event_id: EventId,
    /// The event's causation id.
    pub causation_id: Option<EventId>,
    /// The event's CloudEvents type.
    pub ty: String,
    /// What happened.
    pub kind: EntryKind,
}

/// What happened to an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// Published, by application code (`handler` is `None`) or emitted by a handler.
    Published {
        /// `group/handler` that emitted it.
        by: Option<String>,
    },
    /// A handler handled it.
    Handled {
        /// `group/handler`.
        handler: String,
        /// Which attempt succeeded.
        attempt: u32,
    },
    /// A duplicate delivery, absorbed by the handler's idempotency guard.
    Duplicate {
        /// `group/handler`.
        handler: String,
    },
    /// The handler did not run, on purpose.
    Skipped {
        /// `group/handler`.
        handler: String,
        /// Why.
        reason: String,
    },
    /// An attempt failed and will be retried.
    Retrying {
        /// `group/handler`.
        handler: String,
        /// The attempt that failed.
        attempt: u32,
        /// The error.
        error: String,
    },
    /// Given up: dead-lettered.
    DeadLettered {
        /// `group/handler`, or the group when no handler could take it.
        handler: String,
        /// The error.
        error: String,
    },
    /// A group received an event type it has no handler for (acknowledged).
    Unhandled {
        /// The group.
        group: String,
    },
}

impl fmt::Display for EntryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EntryKind::Published { by: None } => write!(f, "published"),
            EntryKind::Published { by: Some(by) } => write!(f, "emitted by {by}"),
            EntryKind::Handled { handler, attempt: 1 } => write!(f, "handled by {handler}"),
            EntryKind::Handled { handler, attempt } => write!(f, "handled by {handler} (attempt {attempt})"),
            EntryKind::Duplicate { handler } => write!(f, "duplicate absorbed by the guard of {handler}"),
            EntryKind::Skipped { handler, reason } => write!(f, "skipped by {handler}: {reason}"),
            EntryKind::Retrying { handler, attempt, error } => {
                write!(f, "attempt {attempt} of {handler} failed, retrying: {error}")
            }
            EntryKind::DeadLettered { handler, error } => write!(f, "dead-lettered by {handler}: {error}"),
            EntryKind::Unhandled { group } => write!(f, "no handler in {group}, acknowledged"),
        }
    }
}

/// The bounded journal of one runtime.
pub struct Journal {
    entries: Mutex<VecDeque<JournalEntry>>,
    capacity: usize,
}

impl Journal {
    /// A journal keeping the last `capacity` entries.
    pub fn new(capacity: usize) -> Self {
        Self { entries: Mutex::new(VecDeque::new()), capacity }
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<JournalEntry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records what happened to `envelope`.
    /// False when it keeps nothing (capacity 0): callers need not build entries.
    pub fn enabled(&self) -> bool {
        self.capacity > 0
    }

    pub fn record(&self, envelope: &Envelope, kind: EntryKind) {
        if self.capacity == 0 {
            return;
        }
        let entry = JournalEntry {
            at: SystemTime::now(),
            correlation_id: envelope.correlation_id.clone(),
            event_id: envelope.id,
            causation_id: envelope.causation_id,
            ty: envelope.ty.clone(),
            kind,
        };
        let mut entries = self.lock();
        if entries.len() == self.capacity {
            entries.pop_front();
        }
        entries.push_back(entry);
    }

    /// Everything recorded for one business transaction, in order.
    pub fn trace(&self, correlation: &CorrelationId) -> Vec<JournalEntry> {
        self.lock().iter().filter(|e| &e.correlation_id == correlation).cloned().collect()
    }

    /// Every entry still held, in order.
    pub fn entries(&self) -> Vec<JournalEntry> {
        self.lock().iter().cloned().collect()
    }
}
