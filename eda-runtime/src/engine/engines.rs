//! The engines of one transport's subscriptions: what closing waits for, and what they own.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use super::EngineTask;

/// The engine of every subscription of a transport, and the totals of those that stopped, so
/// that closing waits for stopped subscriptions to settle and hand over, and the ownership
/// totals never go back.
#[derive(Default)]
pub(crate) struct Engines {
    running: Mutex<Vec<EngineTask>>,
    /// Handed over and taken over by the engines that stopped, per group and topic.
    retired: Mutex<HashMap<(String, String), (u64, u64)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Engines {
    /// Keeps a new subscription's engine, and forgets those that stopped (keeping their totals).
    pub(crate) fn add(&self, engine: EngineTask) {
        let mut running = lock(&self.running);
        let mut retired = lock(&self.retired);
        running.retain(|e| {
            if e.finished() {
                let o = e.ownership();
                let totals = retired.entry((o.group, o.topic)).or_default();
                *totals = (totals.0 + o.handed_over, totals.1 + o.taken_over);
            }
            !e.finished()
        });
        running.push(engine);
    }

    /// True while the engine of a dropped subscription still settles and hands over.
    pub(crate) fn stopping(&self) -> bool {
        lock(&self.running).iter().any(EngineTask::stopping)
    }

    /// Per group and topic: what the running engines own, and every engine's totals.
    pub(crate) fn ownership(&self) -> Vec<eda_core::Ownership> {
        let mut by: HashMap<(String, String), eda_core::Ownership> = HashMap::new();
        for ((group, topic), (handed_over, taken_over)) in lock(&self.retired).iter() {
            let o = eda_core::Ownership {
                group: group.clone(),
                topic: topic.clone(),
                owned: 0,
                handed_over: *handed_over,
                taken_over: *taken_over,
            };
            by.insert((group.clone(), topic.clone()), o);
        }
        for e in lock(&self.running).iter() {
            let o = e.ownership();
            let entry = by.entry((o.group.clone(), o.topic.clone())).or_insert(eda_core::Ownership {
                owned: 0,
                handed_over: 0,
                taken_over: 0,
                ..o.clone()
            });
            entry.owned += if e.finished() { 0 } else { o.owned };
            entry.handed_over += o.handed_over;
            entry.taken_over += o.taken_over;
        }
        by.into_values().collect()
    }
}
