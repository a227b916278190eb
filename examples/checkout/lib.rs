//! The checkout saga: five services that never call each other.
//!
//! The order service publishes `OrderConfirmed`. The inventory service reserves stock
//! (`StockReserved`) or reports a shortage (`InventoryFailed`, and the order service cancels
//! the order). The payment service charges the card (`PaymentCollected`, and the order service
//! fulfils the order) or reports a decline (`PaymentFailed`: the inventory service releases the
//! stock it reserved, which `#[compensates(reserve_stock)]`, and the order service cancels the
//! order). Email and analytics are independent consumer groups reading the same events.

pub mod services;

use std::sync::Arc;
use std::time::Duration;

use eda::{EntryKind, Envelope, JournalEntry, Runtime};

pub use services::*;

/// One order the scenario places.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// A short label.
    pub label: &'static str,
    /// The order.
    pub order: OrderConfirmed,
}

/// The three orders of the seed article: one fulfilled, one short of stock, one declined.
pub fn scenarios() -> Vec<Scenario> {
    let order = |id: &str, user: &str, sku: &str, quantity: u32, unit_cents: u64, token: &str| OrderConfirmed {
        order_id: id.to_owned(),
        user: user.to_owned(),
        items: vec![Item { sku: sku.to_owned(), quantity }],
        total_cents: unit_cents * u64::from(quantity),
        payment_token: token.to_owned(),
    };
    vec![
        Scenario { label: "fulfilled", order: order("order-1", "alice", "keyboard", 2, 4_900, "tok_visa") },
        Scenario { label: "stock short", order: order("order-2", "bob", "monitor", 5, 19_900, "tok_visa") },
        Scenario { label: "card declined", order: order("order-3", "carol", "mouse", 1, 2_500, "tok_declined") },
    ]
}

/// The stock the inventory service starts with.
pub fn initial_stock() -> Vec<(&'static str, u32)> {
    vec![("keyboard", 10), ("monitor", 1), ("mouse", 3)]
}

/// What one run of the checkout produced.
pub struct CheckoutRun {
    /// The running runtime (shut it down when done).
    pub runtime: Runtime,
    /// Each scenario with the envelope its `OrderConfirmed` was published in.
    pub orders: Vec<(Scenario, Envelope)>,
}

/// Every service of the checkout, with its state; the transport is still to be given.
pub fn services(orders: Arc<Orders>) -> eda::RuntimeBuilder {
    Runtime::from_registry()
        .service("checkout")
        .publishes::<OrderConfirmed>()
        .state(Inventory::with_stock(initial_stock()))
        .state(Payments::default())
        .shared_state(orders)
        .state(Mailer::default())
        .state(Analytics::default())
        .retry(eda::RetryPolicy { initial_backoff: Duration::from_millis(20), ..Default::default() })
}

/// Starts every service of the checkout on the transport `url` names, places the three orders,
/// delivers the first one a second time (a producer retry: the same envelope, the same id), and
/// waits until every saga has settled.
pub async fn run(url: &str) -> eda::Result<CheckoutRun> {
    run_on(eda::transport::connect(url).await?).await
}

/// [`run`] on a transport that is already connected; with the outbox [`outbox_for`] gives it.
pub async fn run_on(transport: Arc<dyn eda::Transport>) -> eda::Result<CheckoutRun> {
    let outbox = outbox_for(&transport).await?;
    run_configured(transport, |services| match outbox {
        Some(db) => services.outbox(db),
        None => services,
    })
    .await
}

/// The database that keeps the saga's records (guards, steps, the outbox) beside a broker that
/// keeps none, such as RabbitMQ or Kafka: `EDA_OUTBOX_URL` (any SQL URL), by default the SQLite file
/// `checkout-outbox.db`. `None` where the transport keeps them itself (the SQL log, the
/// in-process log, NATS) and `EDA_OUTBOX_URL` is not set.
pub async fn outbox_for(transport: &Arc<dyn eda::Transport>) -> eda::Result<Option<eda::sql::SqlTransport>> {
    let keeps_records = transport.inbox().is_some() || transport.clone().store().is_some();
    let url = match std::env::var("EDA_OUTBOX_URL") {
        Ok(url) => url,
        Err(_) if keeps_records => return Ok(None),
        Err(_) => "sqlite://checkout-outbox.db".to_owned(),
    };
    Ok(Some(eda::sql::SqlTransport::connect(&url).await?))
}

/// [`run_on`], with more runtime settings (a metrics endpoint, say).
pub async fn run_configured(
    transport: Arc<dyn eda::Transport>,
    configure: impl FnOnce(eda::RuntimeBuilder) -> eda::RuntimeBuilder,
) -> eda::Result<CheckoutRun> {
    let orders = Arc::new(Orders::default());
    let runtime = configure(services(orders.clone()).shared_transport(transport)).start().await?;
    let publisher = runtime.publisher();
    let mut placed = Vec::new();
    for scenario in scenarios() {
        // The order service records the order, then publishes the fact.
        orders.confirm(&scenario.order.order_id);
        let envelope = publisher.publish(&scenario.order).await?;
        placed.push((scenario, envelope));
    }
    // The order service's producer retries after a timeout: the very same envelope again.
    if let Some((_, first)) = placed.first() {
        publisher.republish(first).await?;
    }
    runtime.settled(Duration::from_secs(30)).await?;
    Ok(CheckoutRun { runtime, orders: placed })
}

/// The trace of one saga as readable text: each event under the event that caused it, with
/// what every consumer group did with it.
pub fn render_trace(trace: &[JournalEntry]) -> String {
    let mut out = String::new();
    let roots: Vec<_> = trace
        .iter()
        .filter(|e| matches!(e.kind, EntryKind::Published { by: None }) && e.causation_id.is_none())
        .collect();
    let mut seen = std::collections::HashSet::new();
    for root in roots {
        if seen.insert(root.event_id) {
            render_event(trace, root, 1, &mut out);
        }
    }
    out
}

fn render_event(trace: &[JournalEntry], event: &JournalEntry, depth: usize, out: &mut String) {
    let pad = "  ".repeat(depth);
    let publications =
        trace.iter().filter(|e| e.event_id == event.event_id && matches!(e.kind, EntryKind::Published { .. })).count();
    let by = match (&event.kind, publications) {
        (EntryKind::Published { by: Some(by) }, _) => format!("emitted by {by}"),
        (_, 1) => "published".to_owned(),
        (_, n) => format!("published {n} times with the same id (a producer retry)"),
    };
    out.push_str(&format!("{pad}{:<20} {by}\n", short_type(&event.ty)));
    for e in trace.iter().filter(|e| e.event_id == event.event_id) {
        match &e.kind {
            // Not this group's business: noise in a trace.
            EntryKind::Published { .. } | EntryKind::Unhandled { .. } => {}
            other => out.push_str(&format!("{pad}  · {other}\n")),
        }
    }
    let mut children: Vec<_> = trace
        .iter()
        .filter(|e| e.causation_id == Some(event.event_id) && matches!(e.kind, EntryKind::Published { .. }))
        .collect();
    children.dedup_by_key(|e| e.event_id);
    for child in children {
        render_event(trace, child, depth + 1, out);
    }
}

fn short_type(ty: &str) -> &str {
    ty.strip_suffix(".v1").unwrap_or(ty)
}
