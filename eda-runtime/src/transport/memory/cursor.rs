//! One topic's retained events, and where one consumer group stands on them.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use eda_core::Envelope;
use tokio::time::Instant;

use crate::FastMap;

/// How many events a group may pass over because their key is held by an unsettled earlier
/// event, before it stops reading further ahead (bounds the memory one poison key can pin).
const MAX_HELD_BACK: usize = 10_000;

/// The events a topic still holds: those from offset `base` on. Offsets count from the
/// topic's first event ever, so they stay the same as older events go.
#[derive(Default)]
pub(super) struct Retained {
    events: VecDeque<Arc<Envelope>>,
    base: u64,
}

impl Retained {
    /// The event at `offset`, while it is held.
    pub(super) fn get(&self, offset: u64) -> Option<&Arc<Envelope>> {
        offset.checked_sub(self.base).and_then(|i| self.events.get(usize::try_from(i).ok()?))
    }

    /// The offset the next event will get.
    pub(super) fn end(&self) -> u64 {
        self.base + self.events.len() as u64
    }

    /// The oldest offset held.
    pub(super) fn base(&self) -> u64 {
        self.base
    }

    /// How many events are held.
    pub(super) fn len(&self) -> usize {
        self.events.len()
    }

    pub(super) fn extend(&mut self, envelopes: impl IntoIterator<Item = Arc<Envelope>>) {
        self.events.extend(envelopes);
    }

    /// Lets go of every event below `offset`.
    pub(super) fn trim_to(&mut self, offset: u64) {
        while self.base < offset && self.events.pop_front().is_some() {
            self.base += 1;
        }
    }
}

/// Where one consumer group stands on one topic.
#[derive(Default)]
pub(super) struct GroupCursor {
    /// Every offset below this one is settled.
    pub(super) committed: u64,
    /// Offsets at or above `committed` that are settled.
    settled_ahead: BTreeSet<u64>,
    /// The next offset never looked at.
    next: u64,
    /// Offsets passed over because their key was held, queued per key in log order.
    held_back: FastMap<String, VecDeque<u64>>,
    /// How many offsets `held_back` holds.
    held_count: usize,
    /// Offsets whose key was released: deliverable, oldest first.
    released: BTreeSet<u64>,
    /// Nacked offsets: when they may go again, and their next attempt number.
    retry: BTreeMap<u64, (Instant, u32)>,
    /// The offset that holds each key (in flight or waiting for redelivery).
    key_holder: FastMap<String, u64>,
    /// Failed handler attempts of unsettled offsets.
    pub(super) failures: FastMap<u64, u32>,
    /// Offsets handed out and not yet settled, with their attempt number.
    pub(super) in_flight: FastMap<u64, u32>,
}

impl GroupCursor {
    /// A group that joins now: it starts at the oldest event held.
    pub(super) fn starting_at(offset: u64) -> Self {
        Self { committed: offset, next: offset, ..Self::default() }
    }

    /// The next deliverable offset and its attempt number, or when to look again. Every step
    /// is logarithmic in the backlog: no scan over what waits.
    pub(super) fn take_next(&mut self, events: &Retained, now: Instant) -> Result<(u64, u32), Option<Instant>> {
        let ready = self.retry.iter().find(|(_, (at, _))| *at <= now).map(|(o, (_, attempt))| (*o, *attempt));
        if let Some((offset, attempt)) = ready {
            self.retry.remove(&offset);
            return Ok(self.hand_out(offset, attempt, events));
        }
        if let Some(offset) = self.released.pop_first() {
            return Ok(self.hand_out(offset, 1, events));
        }
        while self.next < events.end() && self.held_count < MAX_HELD_BACK {
            let offset = self.next;
            self.next += 1;
            match key_of(events, offset) {
                Some(k) if self.key_holder.contains_key(k) => {
                    self.held_back.entry(k.clone()).or_default().push_back(offset);
                    self.held_count += 1;
                }
                _ => return Ok(self.hand_out(offset, 1, events)),
            }
        }
        Err(self.retry.values().map(|(at, _)| *at).min())
    }

    fn hand_out(&mut self, offset: u64, attempt: u32, events: &Retained) -> (u64, u32) {
        if let Some(k) = key_of(events, offset) {
            self.key_holder.insert(k.clone(), offset);
        }
        self.in_flight.insert(offset, attempt);
        (offset, attempt)
    }

    pub(super) fn settle(&mut self, offset: u64, events: &Retained) {
        // The runtime relies on it (`sequences_keys`): only a key's holder is ever out.
        debug_assert!(
            !self.in_flight.contains_key(&offset)
                || key_of(events, offset).is_none_or(|k| self.key_holder.get(k) == Some(&offset)),
            "offset {offset} was out without holding its key"
        );
        self.in_flight.remove(&offset);
        self.failures.remove(&offset);
        if let Some(k) = key_of(events, offset) {
            if self.key_holder.get(k) == Some(&offset) {
                // The key passes to the oldest event waiting for it, if any.
                let next = self.held_back.get_mut(k).and_then(VecDeque::pop_front);
                match next {
                    Some(waiting) => {
                        self.held_count -= 1;
                        self.key_holder.insert(k.clone(), waiting);
                        self.released.insert(waiting);
                    }
                    None => {
                        self.key_holder.remove(k);
                    }
                }
                if self.held_back.get(k).is_some_and(VecDeque::is_empty) {
                    self.held_back.remove(k);
                }
            }
        }
        self.settled_ahead.insert(offset);
        while self.settled_ahead.remove(&self.committed) {
            self.committed += 1;
        }
    }

    pub(super) fn requeue(&mut self, offset: u64, at: Instant) {
        if let Some(attempt) = self.in_flight.remove(&offset) {
            self.retry.insert(offset, (at, attempt.saturating_add(1)));
        }
    }
}

fn key_of(events: &Retained, offset: u64) -> Option<&String> {
    events.get(offset).and_then(|e| e.subject.as_ref())
}
