//! PostgreSQL's LISTEN, which wakes this process's consumers when another process commits.

use std::sync::Weak;
use std::time::Duration;

use super::Inner;

/// How long the listener waits for a notification before it checks that its connection still
/// answers; also how long that check may take.
const QUIET: Duration = Duration::from_secs(5);

/// Wakes this process's consumers when another process commits events (PostgreSQL's
/// LISTEN/NOTIFY). Notifications sent while the listener reconnects are lost; the consumers'
/// polling covers those, and each reconnection wakes them once. A connection that stops
/// answering without closing (a failover, a network partition: no packet says it is gone) is
/// found by a `SELECT 1` after each quiet spell and replaced. Ends when the transport is dropped.
pub(super) fn listen(inner: Weak<Inner>, url: String, channel: String) {
    tokio::spawn(async move {
        loop {
            match sqlx::postgres::PgListener::connect(&url).await {
                Ok(mut listener) => match listener.listen(&channel).await {
                    Ok(()) => loop {
                        let received = tokio::time::timeout(QUIET, listener.try_recv()).await;
                        let Some(inner) = inner.upgrade() else { return };
                        match received {
                            // A notification, or (None) a lost connection: either way, look.
                            Ok(Ok(_)) => inner.published.notify_waiters(),
                            Ok(Err(e)) => {
                                tracing::warn!(error = %e, "LISTEN failed; consumers poll until it is back");
                                break;
                            }
                            Err(_) => {
                                let ping = sqlx::query("SELECT 1").execute(&mut listener);
                                if !matches!(tokio::time::timeout(QUIET, ping).await, Ok(Ok(_))) {
                                    tracing::warn!("the LISTEN connection stopped answering; opening another");
                                    break;
                                }
                            }
                        }
                    },
                    Err(e) => tracing::warn!(error = %e, "LISTEN failed; consumers poll until it is back"),
                },
                Err(e) => {
                    tracing::warn!(error = %e, "cannot open a LISTEN connection; consumers poll until it is back")
                }
            }
            let Some(inner) = inner.upgrade() else { return };
            // What was sent while no one listened is found by looking now.
            inner.published.notify_waiters();
            drop(inner);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
}
