//! The one writer of a SQLite database, taken in turn by this process's connections.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, OwnedMutexGuard};

use super::schema::Dialect;

/// How long a writer waits for its turn: as long as SQLite's busy timeout lets another process's
/// writer keep the database.
const WAIT: Duration = Duration::from_secs(10);

/// SQLite lets one connection write at a time. Connections of one process that meet in its busy
/// handler sleep (1, 2, 5, 10… ms) and wake to find the lock taken again, so under load most of
/// the time goes to sleeping. They wait their turn here instead, in order and woken at once;
/// SQLite's busy timeout still orders the writers of other processes. PostgreSQL has no gate.
#[derive(Clone, Debug)]
pub(super) struct WriteGate(Option<Arc<Mutex<()>>>);

/// A writer's turn; the next one's comes when it is dropped.
pub(super) type Turn = Option<OwnedMutexGuard<()>>;

impl WriteGate {
    pub(super) fn new(dialect: Dialect) -> Self {
        Self((dialect == Dialect::Sqlite).then(|| Arc::new(Mutex::new(()))))
    }

    /// Waits for this process's turn to write. Held across a wait for something that itself
    /// writes, it ends as SQLite's busy timeout would, with an error, not a hang.
    pub(super) async fn enter(&self) -> Result<Turn, sqlx::Error> {
        let Some(gate) = &self.0 else { return Ok(None) };
        match tokio::time::timeout(WAIT, gate.clone().lock_owned()).await {
            Ok(turn) => Ok(Some(turn)),
            Err(_) => Err(sqlx::Error::Protocol(format!(
                "database is locked: another writer of this process held it for {WAIT:?} (a handler waiting \
                 inside its transaction for something that writes to the same database?)"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_writer_waits_its_turn_and_one_kept_waiting_too_long_gets_an_error() {
        let gate = WriteGate::new(Dialect::Sqlite);
        let first = gate.enter().await.expect("the first turn");
        let next = tokio::spawn({
            let gate = gate.clone();
            async move { gate.enter().await.map(|turn| turn.is_some()) }
        });
        tokio::task::yield_now().await;
        assert!(!next.is_finished(), "the next writer waits");
        drop(first);
        assert!(next.await.expect("joins").expect("its turn"));

        let _held = gate.enter().await.expect("a turn");
        let late = gate.enter().await.expect_err("kept waiting past the busy timeout");
        assert!(late.to_string().contains("database is locked"), "{late}");
        assert!(WriteGate::new(Dialect::Postgres).enter().await.expect("no gate").is_none());
    }
}
