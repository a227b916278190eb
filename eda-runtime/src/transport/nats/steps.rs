//! The inbox of the runtimes on NATS: saga step records in the key-value bucket
//! `<namespace>_steps`, which every instance of a group reads and which outlives a restart, so
//! a compensator finds the step it undoes wherever and whenever the step ran. Idempotency
//! guards stay in the process (the server's `Nats-Msg-Id` window drops republished events);
//! for guards across restarts, keep the inbox in a database with `.outbox(db)`.
//!
//! Each record is one key, changed only by compare-and-set on its revision: a step and its
//! compensator never both think they went first.

use std::time::Duration;

use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, UpdateErrorKind};
use async_trait::async_trait;
use bytes::Bytes;
use eda_core::{Claim, CorrelationId, GuardKey, Inbox, StepState, StoreError};
use tokio::sync::OnceCell;

use super::leases::open_bucket;
use super::NatsOptions;
use crate::inbox::MemoryInbox;

const RUNNING: &[u8] = b"running";
const DONE: &[u8] = b"done";
const CANCELLED: &[u8] = b"cancelled";

/// The least time a step record is kept.
const MIN_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// Compare-and-set rounds before a record is reported unavailable: each lost round means
/// another writer got there first (or a replica is behind), so a few always settle it.
const ROUNDS: u32 = 50;

/// Guards in the process, saga step records in the namespace's bucket.
pub(super) struct NatsInbox {
    guards: MemoryInbox,
    steps: OnceCell<kv::Store>,
    js: async_nats::jetstream::Context,
    options: NatsOptions,
}

fn store(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError { store: "nats", source: Box::new(e) }
}

/// A key token for any text: what a key may not hold is written `=XX`, byte by byte.
fn token(text: &str) -> String {
    if text.is_empty() {
        return "=".into();
    }
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' => out.push(char::from(b)),
            _ => out.push_str(&format!("={b:02X}")),
        }
    }
    out
}

fn key(group: &str, step: &str, correlation: &CorrelationId) -> String {
    format!("{}.{}.{}", token(group), token(step), token(&correlation.0))
}

/// A record's value and revision; `None` as value when the key is absent or deleted.
type Record = (Option<Bytes>, Option<u64>);

impl NatsInbox {
    pub(super) fn new(js: async_nats::jetstream::Context, options: NatsOptions) -> Self {
        Self { guards: MemoryInbox::default(), steps: OnceCell::new(), js, options }
    }

    async fn bucket(&self) -> Result<&kv::Store, StoreError> {
        self.steps
            .get_or_try_init(|| async {
                let name = format!("{}_steps", self.options.namespace);
                // A compensation can come long after its step (a long saga, a backlog, a
                // replay): records stay four times the topics' age, and at least 30 days
                // (without a topic age, for good).
                let max_age = self.options.max_age.map_or(Duration::ZERO, |age| (age * 4).max(MIN_RETENTION));
                let description = "eda: saga steps, done or cancelled, per group and correlation id";
                open_bucket(&self.js, &self.options, &name, description, max_age).await
            })
            .await
            .map_err(store)
    }

    /// Before compare-and-set round `round` (from 0): a short pause once a round was lost,
    /// and an error once too many were.
    async fn round(&self, round: u32, key: &str) -> Result<(), StoreError> {
        if round >= ROUNDS {
            return Err(StoreError {
                store: "nats",
                source: format!("the saga step record `{key}` kept changing under {ROUNDS} writes; try again").into(),
            });
        }
        if round > 0 {
            tokio::time::sleep(Duration::from_millis(u64::from(round.min(20)) * 5)).await;
        }
        Ok(())
    }

    async fn read(&self, key: &str) -> Result<Record, StoreError> {
        let entry = self.bucket().await?.entry(key).await.map_err(store)?;
        Ok(match entry {
            Some(e) if matches!(e.operation, Operation::Put) => (Some(e.value), Some(e.revision)),
            Some(e) => (None, Some(e.revision)),
            None => (None, None),
        })
    }

    /// Writes `value` if the record is still at `revision` (absent: `None`). False when
    /// someone else wrote first: read again.
    async fn write(&self, key: &str, value: &'static [u8], revision: Option<u64>) -> Result<bool, StoreError> {
        let bucket = self.bucket().await?;
        let value = Bytes::from_static(value);
        match revision {
            Some(revision) => match bucket.update(key, value, revision).await {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => Ok(false),
                Err(e) => Err(store(e)),
            },
            None => match bucket.create(key, value).await {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == CreateErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(store(e)),
            },
        }
    }
}

#[async_trait]
impl Inbox for NatsInbox {
    fn kind(&self) -> &'static str {
        "nats"
    }

    async fn claim(&self, key: &GuardKey) -> Result<Claim, StoreError> {
        self.guards.claim(key).await
    }

    async fn complete(&self, key: &GuardKey) -> Result<(), StoreError> {
        self.guards.complete(key).await
    }

    async fn release(&self, key: &GuardKey) -> Result<(), StoreError> {
        self.guards.release(key).await
    }

    async fn step_started(&self, group: &str, step: &str, correlation: &CorrelationId) -> Result<bool, StoreError> {
        let key = key(group, step, correlation);
        let mut round = 0;
        loop {
            self.round(round, &key).await?;
            round += 1;
            let (value, revision) = self.read(&key).await?;
            match value.as_deref() {
                Some(CANCELLED) => return Ok(false),
                // Already done (a redelivery after a crash): it stays done, so that this run
                // failing cannot erase what the first run did.
                Some(DONE) | Some(RUNNING) => return Ok(true),
                _ => {
                    if self.write(&key, RUNNING, revision).await? {
                        return Ok(true);
                    }
                }
            }
        }
    }

    async fn step_finished(
        &self,
        group: &str,
        step: &str,
        correlation: &CorrelationId,
        succeeded: bool,
    ) -> Result<(), StoreError> {
        let key = key(group, step, correlation);
        let mut round = 0;
        loop {
            self.round(round, &key).await?;
            round += 1;
            let (value, revision) = self.read(&key).await?;
            match (value.as_deref(), succeeded) {
                (Some(DONE), _) => return Ok(()),
                (Some(CANCELLED), true) => {
                    tracing::warn!(group, step, %correlation, "a saga step ran although compensated before it; its effects remain");
                    return Ok(());
                }
                (Some(CANCELLED), false) => return Ok(()),
                (_, true) => {
                    if self.write(&key, DONE, revision).await? {
                        return Ok(());
                    }
                }
                // Its effects did not happen: as if it never ran.
                (Some(RUNNING), false) => match self.bucket().await?.delete_expect_revision(&key, revision).await {
                    Ok(()) => return Ok(()),
                    Err(e) if self.read(&key).await?.1 != revision => {
                        tracing::debug!(error = %e, "a step record changed while it was removed; reading it again");
                    }
                    Err(e) => return Err(store(e)),
                },
                (_, false) => return Ok(()),
            }
        }
    }

    async fn compensation_started(
        &self,
        group: &str,
        step: &str,
        correlation: &CorrelationId,
    ) -> Result<StepState, StoreError> {
        let key = key(group, step, correlation);
        let mut round = 0;
        loop {
            self.round(round, &key).await?;
            round += 1;
            let (value, revision) = self.read(&key).await?;
            match value.as_deref() {
                Some(RUNNING) => return Ok(StepState::Running),
                Some(DONE) => return Ok(StepState::Done),
                Some(CANCELLED) => return Ok(StepState::NotRun),
                _ => {
                    if self.write(&key, CANCELLED, revision).await? {
                        return Ok(StepState::NotRun);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_text_makes_a_valid_key_token_and_distinct_texts_distinct_tokens() {
        assert_eq!(token("order-1_a"), "order-1_a");
        assert_eq!(token("a.b c/é"), "a=2Eb=20c=2F=C3=A9");
        assert_eq!(token(""), "=");
        assert_ne!(token("a.b"), token("a=2Eb"));
        assert_eq!(key("shop", "reserve", &CorrelationId::from("x.y")), "shop.reserve.x=2Ey");
    }
}
