//! The event contract at run time: what an independent review of the macros and the envelope
//! found, each named after its defect — two types claiming one event name, and keys that must
//! survive the wire exactly or be refused.

use std::time::Duration;

use eda::{event, handler, Error, Registry, Runtime, Subscription};
use eda_tests::{on_every_transport, Bus};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

mod orders {
    use super::*;

    #[event(topic = "orders", key = id)]
    #[derive(Serialize, Deserialize)]
    pub struct Cancelled {
        pub id: String,
    }

    #[handler(group = "orders")]
    pub async fn restock(_ev: Cancelled) {}
}

mod refunds {
    use super::*;

    #[event(topic = "refunds", key = id)]
    #[derive(Serialize, Deserialize)]
    pub struct Cancelled {
        pub refund: u64,
        pub id: String,
    }

    #[handler(group = "refunds")]
    pub async fn reopen(_ev: Cancelled) {}
}

/// Defect 1: `orders::Cancelled` and `refunds::Cancelled` both became `Cancelled.v1`, and a
/// consumer picks handlers by type alone: both handlers ran on either, one decoding the other's
/// payload. Start-up refuses it, naming both types and the fix.
#[tokio::test]
async fn two_event_types_claiming_one_name_are_refused_at_start() {
    let registry = Registry::builder()
        .handler::<orders::restock>()
        .handler::<refunds::reopen>()
        .publishes::<orders::Cancelled>()
        .publishes::<refunds::Cancelled>()
        .build();
    let err = Runtime::builder(registry).transport_url("memory://").start().await.err();
    let Some(Error::InvalidRegistry(report)) = err else { panic!("expected an invalid registry, got {err:?}") };
    let text = report.to_string();
    assert!(text.contains("`contract::orders::Cancelled` and `contract::refunds::Cancelled`"), "{text}");
    assert!(text.contains("`Cancelled.v1`") && text.contains("#[event(name = "), "{text}");
}

#[event(topic = "customers", key = name)]
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Renamed {
    name: String,
}

on_every_transport! {
    a_key_survives_the_wire_exactly_or_is_refused_at_publish,
}

/// Defect 10: NATS trims header values, so a key `" Bob"` read back as `"Bob"`, and a replay of
/// the event landed on another partition than its siblings. A key arrives byte for byte, or
/// publishing it is an error that says why.
async fn a_key_survives_the_wire_exactly_or_is_refused_at_publish(bus: Bus) {
    let rt = Runtime::builder(Registry::builder().publishes::<Renamed>().build())
        .shared_transport(bus.transport())
        .without_consumers()
        .start()
        .await
        .expect("start");
    let subscription = Subscription { group: "g".into(), topic: "customers".into(), prefetch: 16 };
    let mut deliveries = bus.transport().subscribe(&subscription).await.expect("subscribe");
    for name in [" Bob", "Ann\t", "  ", "Eve"] {
        match rt.publisher().publish(&Renamed { name: name.into() }).await {
            Ok(envelope) => {
                let delivered = tokio::time::timeout(Duration::from_secs(20), deliveries.next()).await;
                let delivered = delivered.expect("delivered").expect("item").expect("delivery");
                assert_eq!(delivered.envelope.id, envelope.id);
                assert_eq!(delivered.envelope.subject.as_deref(), Some(name), "the key arrives as published");
                delivered.ack().await.expect("ack");
            }
            Err(e) => {
                assert!(bus.is_nats(), "only NATS refuses a key: {e}");
                let e = e.to_string();
                assert!(e.contains("whitespace") && e.contains("ce-subject"), "{e}");
            }
        }
    }
    rt.shutdown().await;
}
