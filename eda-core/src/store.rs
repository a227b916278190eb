//! Stores beside the handler: the inbox behind the idempotency guard and saga step records.

use crate::envelope::CorrelationId;
use crate::error::StoreError;

/// What identifies one handling for the idempotency guard.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GuardKey {
    /// The consumer group.
    pub group: String,
    /// The handler.
    pub handler: String,
    /// The event id, or the handler's custom dedupe key.
    pub key: String,
}

/// What the inbox knows of a handling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// Never handled: the caller now holds it and must [`Inbox::complete`] or
    /// [`Inbox::release`] it.
    Acquired,
    /// Already handled: a duplicate to skip.
    Done,
    /// Being handled right now by someone else: try again later.
    Busy,
}

/// Where a saga step stands for one correlation id, as a compensator sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepState {
    /// The step has not run: the compensator is a no-op, and the step will not run later.
    NotRun,
    /// The step is running: compensate after it finishes.
    Running,
    /// The step's effects happened: compensate them.
    Done,
}

/// The store behind idempotency guards and compensation bookkeeping.
#[async_trait::async_trait]
pub trait Inbox: Send + Sync + 'static {
    /// A short name: `memory`, `sqlite`, `postgres`.
    fn kind(&self) -> &'static str;

    /// Claims a handling.
    async fn claim(&self, key: &GuardKey) -> Result<Claim, StoreError>;

    /// Records a claimed handling as done; later claims see [`Claim::Done`].
    async fn complete(&self, key: &GuardKey) -> Result<(), StoreError>;

    /// Gives a claimed handling up, so a redelivery can claim it again.
    async fn release(&self, key: &GuardKey) -> Result<(), StoreError>;

    /// A saga step of `group` is about to run for `correlation`. False when it was compensated
    /// before it ran: the step must then not run.
    async fn step_started(&self, group: &str, step: &str, correlation: &CorrelationId) -> Result<bool, StoreError>;

    /// The step's handling ended: `succeeded` when its effects happened.
    async fn step_finished(
        &self,
        group: &str,
        step: &str,
        correlation: &CorrelationId,
        succeeded: bool,
    ) -> Result<(), StoreError>;

    /// A compensator of `step` is about to run for `correlation`: where does the step stand?
    /// [`StepState::NotRun`] also records that the step must not run later.
    async fn compensation_started(
        &self,
        group: &str,
        step: &str,
        correlation: &CorrelationId,
    ) -> Result<StepState, StoreError>;
}
