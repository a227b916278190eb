//! Events sharing a topic, a handler with and without context, a declared topic, a fallible
//! handler, a compensator in both attribute orders, and explicit registration.
use eda::{compensates, event, handler, Ctx, HandlerError, Outcome, Registry};
use serde::{Deserialize, Serialize};

#[event(topic = "orders", key = order_id)]
#[derive(Serialize, Deserialize)]
pub struct OrderPlaced {
    pub order_id: u64,
}

#[event(topic = "orders", key = order_id, name = "order.paid", version = 3)]
#[derive(Serialize, Deserialize)]
pub struct OrderPaid {
    pub order_id: u64,
}

#[event(topic = "orders", key = order_id)]
#[derive(Serialize, Deserialize)]
pub struct PaymentDeclined {
    pub order_id: u64,
}

#[event(topic = "stock")]
#[derive(Serialize, Deserialize)]
pub enum StockEvent {
    Reserved { order_id: u64 },
    Released { order_id: u64 },
}

pub struct Warehouse;

#[handler(group = "stock", topic = "orders", concurrency = 4)]
async fn reserve(ev: OrderPlaced, _cx: Ctx<'_, Warehouse>) -> StockEvent {
    StockEvent::Reserved { order_id: ev.order_id }
}

#[handler(group = "billing", max_attempts = 3)]
async fn charge(ev: OrderPlaced) -> Result<Outcome<OrderPaid, PaymentDeclined>, HandlerError> {
    if ev.order_id == 0 {
        return Err(HandlerError::permanent("order 0 does not exist"));
    }
    let parsed: u64 = "7".parse()?;
    Ok(Outcome::Success(OrderPaid { order_id: ev.order_id + parsed }))
}

#[compensates(reserve)]
#[handler(group = "stock", dedupe_key = order_id)]
async fn release(ev: PaymentDeclined, _cx: Ctx<'_, Warehouse>) -> Option<StockEvent> {
    Some(StockEvent::Released { order_id: ev.order_id })
}

#[handler(group = "audit", idempotent = false)]
#[compensates(reserve)]
async fn audit_release(_ev: PaymentDeclined, cx: Ctx<'_>) -> Vec<OrderPaid> {
    let _ = cx.correlation_id();
    Vec::new()
}

fn main() {
    let registry = Registry::builder()
        .handler::<reserve>()
        .handler::<charge>()
        .handler::<release>()
        .handler::<audit_release>()
        .publishes::<OrderPlaced>()
        .build();
    assert!(registry.validate().is_ok());
    assert_eq!(<OrderPaid as eda::Event>::INFO.ce_type, "order.paid.v3");
    let _topic: eda::Topic<OrderPlaced> = <OrderPlaced as eda::Event>::topic();
}
