//! The in-memory inbox: idempotency guards and saga step records for one process.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use eda_core::{Claim, CorrelationId, GuardKey, Inbox, StepState, StoreError};

use crate::FastMap;

/// Keeps guard records in memory, forgetting the oldest handled ones beyond `capacity`.
///
/// It guards against duplicates within one process's life. Across restarts, use a SQL inbox.
pub struct MemoryInbox {
    state: Mutex<State>,
    capacity: usize,
}

#[derive(Default)]
struct State {
    /// Each key is allocated once, at its claim, and shared with `done_order`.
    guards: FastMap<Arc<GuardKey>, bool>,
    done_order: VecDeque<Arc<GuardKey>>,
    steps: FastMap<StepKey, Step>,
    /// Step records that stopped running (done or cancelled), oldest first: forgotten in this
    /// order beyond `capacity`.
    finished_steps: VecDeque<StepKey>,
    /// How many times each key stands in `finished_steps` (a step that finishes again is
    /// queued again, and only its last place counts).
    queued: FastMap<StepKey, usize>,
}

type StepKey = (String, String, CorrelationId);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Step {
    Running,
    Done,
    Cancelled,
}

impl Default for MemoryInbox {
    fn default() -> Self {
        Self::with_capacity(1_000_000)
    }
}

impl MemoryInbox {
    /// An inbox that remembers at most `capacity` handled events (and as many step records).
    pub fn with_capacity(capacity: usize) -> Self {
        Self { state: Mutex::new(State::default()), capacity: capacity.max(1) }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl State {
    /// A step record stopped running; beyond `capacity` finished records, the oldest go (never
    /// a running one, and never all at once).
    fn finished(&mut self, key: StepKey, capacity: usize) {
        *self.queued.entry(key.clone()).or_default() += 1;
        self.finished_steps.push_back(key);
        while self.finished_steps.len() > capacity {
            let Some(old) = self.finished_steps.pop_front() else { break };
            let left = self.queued.get_mut(&old).map(|n| {
                *n -= 1;
                *n
            });
            if left == Some(0) {
                self.queued.remove(&old);
                if self.steps.get(&old).is_some_and(|s| *s != Step::Running) {
                    self.steps.remove(&old);
                }
            }
        }
    }
}

fn step_key(group: &str, step: &str, correlation: &CorrelationId) -> StepKey {
    (group.to_owned(), step.to_owned(), correlation.clone())
}

#[async_trait]
impl Inbox for MemoryInbox {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn claim(&self, key: &GuardKey) -> Result<Claim, StoreError> {
        let mut s = self.lock();
        Ok(match s.guards.get(key) {
            Some(true) => Claim::Done,
            Some(false) => Claim::Busy,
            None => {
                s.guards.insert(Arc::new(key.clone()), false);
                Claim::Acquired
            }
        })
    }

    async fn complete(&self, key: &GuardKey) -> Result<(), StoreError> {
        let mut s = self.lock();
        let shared = match s.guards.get_key_value(key) {
            Some((shared, _)) => shared.clone(),
            None => Arc::new(key.clone()),
        };
        s.guards.insert(shared.clone(), true);
        s.done_order.push_back(shared);
        while s.done_order.len() > self.capacity {
            if let Some(old) = s.done_order.pop_front() {
                s.guards.remove(&*old);
            }
        }
        Ok(())
    }

    async fn release(&self, key: &GuardKey) -> Result<(), StoreError> {
        let mut s = self.lock();
        if s.guards.get(key) == Some(&false) {
            s.guards.remove(key);
        }
        Ok(())
    }

    async fn step_started(&self, group: &str, step: &str, correlation: &CorrelationId) -> Result<bool, StoreError> {
        let mut s = self.lock();
        let entry = s.steps.entry(step_key(group, step, correlation)).or_insert(Step::Running);
        match *entry {
            Step::Cancelled => Ok(false),
            // Already done (a redelivery after a crash): it stays done, so that this run
            // failing cannot erase what the first run did.
            Step::Done => Ok(true),
            Step::Running => Ok(true),
        }
    }

    async fn step_finished(
        &self,
        group: &str,
        step: &str,
        correlation: &CorrelationId,
        succeeded: bool,
    ) -> Result<(), StoreError> {
        let mut s = self.lock();
        let key = step_key(group, step, correlation);
        match (s.steps.get(&key).copied(), succeeded) {
            (Some(Step::Cancelled), true) => {
                tracing::warn!(group, step, %correlation, "a saga step ran although compensated before it; its effects remain");
            }
            (Some(Step::Running) | None, true) => {
                s.steps.insert(key.clone(), Step::Done);
                s.finished(key, self.capacity);
            }
            // Its effects did not happen: as if it never ran (a done or cancelled record stays).
            (Some(Step::Running), false) => {
                s.steps.remove(&key);
            }
            _ => {}
        }
        Ok(())
    }

    async fn compensation_started(
        &self,
        group: &str,
        step: &str,
        correlation: &CorrelationId,
    ) -> Result<StepState, StoreError> {
        let mut s = self.lock();
        let key = step_key(group, step, correlation);
        let state = match s.steps.get(&key) {
            Some(Step::Running) => StepState::Running,
            Some(Step::Done) => StepState::Done,
            Some(Step::Cancelled) => StepState::NotRun,
            None => {
                s.steps.insert(key.clone(), Step::Cancelled);
                s.finished(key, self.capacity);
                StepState::NotRun
            }
        };
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn claims_are_exclusive_until_released_and_final_once_complete() {
        let inbox = MemoryInbox::with_capacity(2);
        let key = |k: &str| GuardKey { group: "g".into(), handler: "h".into(), key: k.into() };
        assert_eq!(inbox.claim(&key("1")).await.ok(), Some(Claim::Acquired));
        assert_eq!(inbox.claim(&key("1")).await.ok(), Some(Claim::Busy));
        inbox.release(&key("1")).await.ok();
        assert_eq!(inbox.claim(&key("1")).await.ok(), Some(Claim::Acquired));
        inbox.complete(&key("1")).await.ok();
        assert_eq!(inbox.claim(&key("1")).await.ok(), Some(Claim::Done));
        for k in ["2", "3"] {
            inbox.claim(&key(k)).await.ok();
            inbox.complete(&key(k)).await.ok();
        }
        assert_eq!(inbox.claim(&key("1")).await.ok(), Some(Claim::Acquired), "oldest forgotten beyond capacity");
    }

    #[tokio::test]
    async fn past_capacity_the_oldest_step_records_are_forgotten_one_at_a_time() {
        let inbox = MemoryInbox::with_capacity(2);
        let c = |n: &str| CorrelationId::from(n);
        for n in ["1", "2", "3"] {
            assert_eq!(inbox.step_started("g", "reserve", &c(n)).await.ok(), Some(true));
            inbox.step_finished("g", "reserve", &c(n), true).await.ok();
        }
        // A running step is never forgotten, however many records there are.
        assert_eq!(inbox.step_started("g", "reserve", &c("4")).await.ok(), Some(true));
        let state = |n: &'static str| {
            let inbox = &inbox;
            async move { inbox.compensation_started("g", "reserve", &c(n)).await.ok() }
        };
        assert_eq!(state("3").await, Some(StepState::Done), "the newest done records are kept");
        assert_eq!(state("2").await, Some(StepState::Done));
        assert_eq!(state("4").await, Some(StepState::Running));
    }

    #[tokio::test]
    async fn a_compensation_before_its_step_cancels_the_step() {
        let inbox = MemoryInbox::default();
        let c = CorrelationId::from("order-1");
        assert_eq!(inbox.compensation_started("g", "reserve", &c).await.ok(), Some(StepState::NotRun));
        assert_eq!(inbox.step_started("g", "reserve", &c).await.ok(), Some(false));
        let d = CorrelationId::from("order-2");
        assert_eq!(inbox.step_started("g", "reserve", &d).await.ok(), Some(true));
        assert_eq!(inbox.compensation_started("g", "reserve", &d).await.ok(), Some(StepState::Running));
        inbox.step_finished("g", "reserve", &d, true).await.ok();
        assert_eq!(inbox.compensation_started("g", "reserve", &d).await.ok(), Some(StepState::Done));
    }
}
