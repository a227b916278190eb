//! What the SQL log keeps beside the events: the store handlers of other transports write
//! through, the saga view, and dead letters.

use std::time::{Duration, UNIX_EPOCH};

use async_trait::async_trait;
use eda_core::{
    CorrelationId, DeadLetter, DeadLetterReason, DeadLetterStore, Envelope, EventId, Page, StoreError,
    StoredDeadLetter, TransportError,
};
use sqlx::any::AnyRow;
use sqlx::Row;

use super::{envelope_of, other, unit, SqlTransport};

#[async_trait]
impl eda_core::Store for SqlTransport {
    async fn begin(&self) -> Result<Box<dyn eda_core::UnitOfWork>, StoreError> {
        Ok(Box::new(unit::SqlUnit::new(self.clone(), None)))
    }
}

#[async_trait]
impl eda_core::SagaView for SqlTransport {
    async fn saga(&self, correlation: &CorrelationId) -> Result<Vec<eda_core::SagaEvent>, TransportError> {
        let sql = &self.inner.sql;
        let rows =
            sqlx::query(&sql.saga_events).bind(&correlation.0).fetch_all(&self.inner.pool).await.map_err(other)?;
        let mut events: Vec<eda_core::SagaEvent> = Vec::new();
        for row in &rows {
            let topic: String = row.try_get(11).map_err(other)?;
            let (envelope, _) = envelope_of(row, &topic);
            if let Some(seen) = events.iter_mut().find(|e| e.envelope.id == envelope.id) {
                seen.publications += 1;
                continue;
            }
            // Guard records are keyed by event id (handlers with a custom dedupe key do not show).
            let handlings = sqlx::query(&sql.saga_handlings)
                .bind(envelope.id.to_string())
                .fetch_all(&self.inner.pool)
                .await
                .map_err(other)?;
            let handled_by = handlings
                .iter()
                .map(|h| {
                    let at: i64 = h.try_get(2).map_err(other)?;
                    Ok(eda_core::SagaHandling {
                        group: h.try_get(0).map_err(other)?,
                        handler: h.try_get(1).map_err(other)?,
                        at: UNIX_EPOCH + Duration::from_millis(at.max(0) as u64),
                    })
                })
                .collect::<Result<Vec<_>, TransportError>>()?;
            events.push(eda_core::SagaEvent { envelope, publications: 1, handled_by });
        }
        Ok(events)
    }
}

#[async_trait]
impl DeadLetterStore for SqlTransport {
    async fn dead_letter_page(&self, group: Option<&str>, page: Page) -> Result<Vec<StoredDeadLetter>, TransportError> {
        let rows = sqlx::query(&self.inner.sql.dead_select)
            .bind(group.is_none())
            .bind(group.unwrap_or_default())
            .bind(i64::try_from(page.after).unwrap_or(i64::MAX))
            .bind(i64::try_from(page.limit).unwrap_or(i64::MAX))
            .fetch_all(&self.inner.pool)
            .await
            .map_err(other)?;
        rows.iter().map(stored_dead_letter).collect()
    }

    async fn dead_letter(&self, id: u64) -> Result<Option<StoredDeadLetter>, TransportError> {
        let row = sqlx::query(&self.inner.sql.dead_one)
            .bind(id as i64)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(other)?;
        row.as_ref().map(stored_dead_letter).transpose()
    }

    async fn remove_dead_letter(&self, id: u64) -> Result<bool, TransportError> {
        let _turn = self.inner.gate.enter().await.map_err(other)?;
        let done =
            sqlx::query(&self.inner.sql.dead_delete).bind(id as i64).execute(&self.inner.pool).await.map_err(other)?;
        Ok(done.rows_affected() > 0)
    }
}

/// A dead letter from a row of `id, grp, envelope, attempts, handler, error, permanent, at`.
fn stored_dead_letter(row: &AnyRow) -> Result<StoredDeadLetter, TransportError> {
    let id = row.try_get::<i64, _>(0).map_err(other)? as u64;
    let stored: String = row.try_get(2).map_err(other)?;
    let mut error: String = row.try_get(5).map_err(other)?;
    let envelope = match serde_json::from_str(&stored) {
        Ok(envelope) => envelope,
        Err(e) => {
            // Listed all the same (one damaged row must not hide the others), as what it is.
            error = format!("the stored letter cannot be read ({e}); it was set aside for: {error}");
            let topic: String = row.try_get(8).map_err(other)?;
            unreadable_letter(id, topic, stored.into_bytes())
        }
    };
    let at: i64 = row.try_get(7).map_err(other)?;
    Ok(StoredDeadLetter {
        id,
        group: row.try_get(1).map_err(other)?,
        letter: DeadLetter {
            envelope,
            attempts: row.try_get::<i64, _>(3).map_err(other)? as u32,
            reason: DeadLetterReason {
                handler: row.try_get(4).map_err(other)?,
                error,
                permanent: row.try_get::<i64, _>(6).map_err(other)? != 0,
            },
            at: UNIX_EPOCH + Duration::from_millis(at.max(0) as u64),
        },
    })
}

/// What a dead letter whose stored event cannot be read is shown as: its raw text as the data,
/// under an id of its own that stays the same each time it is read.
fn unreadable_letter(id: u64, topic: String, data: Vec<u8>) -> Envelope {
    let event = EventId(uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, format!("eda-dead-letter:{id}").as_bytes()));
    Envelope {
        id: event,
        source: "unknown".into(),
        ty: "unreadable".into(),
        time: UNIX_EPOCH,
        subject: None,
        topic,
        datacontenttype: "text/plain".into(),
        correlation_id: CorrelationId(event.to_string()),
        causation_id: None,
        traceparent: None,
        data,
    }
}
