//! The in-memory inbox: idempotency guards and saga step records for one process.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use eda_core::{Claim, CorrelationId, GuardKey, Inbox, StepState, StoreError};

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
    guards: HashMap<Arc<GuardKey>, bool>,
    done_order: VecDeque<Arc<GuardKey>>,
    steps: HashMap<(String, String, CorrelationId), Step>,
}

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

fn step_key(group: &str, step: &str, correlation: &CorrelationId) -> (String, String, CorrelationId) {
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
        if *entry == Step::Cancelled {
            return Ok(false);
        }
        *entry = Step::Running;
        Ok(true)
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
        if succeeded {
            s.steps.insert(key, Step::Done);
        } else {
            s.steps.remove(&key);
        }
        if s.steps.len() > self.capacity {
            // Bounded memory: forget finished records first.
            s.steps.retain(|_, v| *v == Step::Running);
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
        let entry = s.steps.entry(step_key(group, step, correlation)).or_insert(Step::Cancelled);
        Ok(match *entry {
            Step::Running => StepState::Running,
            Step::Done => StepState::Done,
            Step::Cancelled => StepState::NotRun,
        })
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
