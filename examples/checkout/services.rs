//! The events and the services of the checkout, each service a consumer group.

use std::collections::HashMap;
use std::sync::Mutex;

use eda::{compensates, event, handler, Ctx, Outcome};
use serde::{Deserialize, Serialize};

/// A line of an order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    /// The product.
    pub sku: String,
    /// How many.
    pub quantity: u32,
}

/// The customer confirmed an order: the saga starts.
#[event(topic = "orders", key = order_id)]
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OrderConfirmed {
    /// The order.
    pub order_id: String,
    /// Who ordered.
    pub user: String,
    /// What.
    pub items: Vec<Item>,
    /// The amount to charge.
    pub total_cents: u64,
    /// How to charge it.
    pub payment_token: String,
}

/// Paid and reserved: the order is complete.
#[event(topic = "orders", key = order_id)]
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OrderFulfilled {
    /// The order.
    pub order_id: String,
}

/// The order will not happen.
#[event(topic = "orders", key = order_id)]
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OrderCancelled {
    /// The order.
    pub order_id: String,
    /// Why.
    pub reason: String,
}

/// Stock is set aside for the order.
#[event(topic = "inventory", key = order_id)]
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StockReserved {
    /// The order.
    pub order_id: String,
    /// The amount to charge (carried along: services do not ask each other).
    pub total_cents: u64,
    /// How to charge it.
    pub payment_token: String,
}

/// Not enough stock: a domain failure.
#[event(topic = "inventory", key = order_id)]
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InventoryFailed {
    /// The order.
    pub order_id: String,
    /// What was short.
    pub reason: String,
}

/// A reservation was undone.
#[event(topic = "inventory", key = order_id)]
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StockReleased {
    /// The order.
    pub order_id: String,
}

/// The card was charged.
#[event(topic = "payments", key = order_id)]
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PaymentCollected {
    /// The order.
    pub order_id: String,
    /// How much.
    pub amount_cents: u64,
}

/// The card was declined: a domain failure that drives compensation.
#[event(topic = "payments", key = order_id)]
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PaymentFailed {
    /// The order.
    pub order_id: String,
    /// Why.
    pub reason: String,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The inventory service's own data.
#[derive(Default)]
pub struct Inventory {
    available: Mutex<HashMap<String, u32>>,
    reservations: Mutex<HashMap<String, Vec<Item>>>,
}

impl Inventory {
    /// Starts with the given stock.
    pub fn with_stock(stock: impl IntoIterator<Item = (&'static str, u32)>) -> Self {
        let available = stock.into_iter().map(|(sku, n)| (sku.to_owned(), n)).collect();
        Self { available: Mutex::new(available), reservations: Mutex::default() }
    }

    /// How many of `sku` are available.
    pub fn available(&self, sku: &str) -> u32 {
        lock(&self.available).get(sku).copied().unwrap_or(0)
    }
}

/// Inventory: reserve the order's items, or report what is short.
#[handler(group = "inventory-service")]
pub async fn reserve_stock(
    ev: OrderConfirmed,
    inventory: Ctx<'_, Inventory>,
) -> Outcome<StockReserved, InventoryFailed> {
    let mut available = lock(&inventory.available);
    let short = ev.items.iter().find(|i| available.get(&i.sku).copied().unwrap_or(0) < i.quantity);
    if let Some(item) = short {
        let have = available.get(&item.sku).copied().unwrap_or(0);
        return Outcome::Failure(InventoryFailed {
            order_id: ev.order_id,
            reason: format!("{} × {} wanted, {have} in stock", item.quantity, item.sku),
        });
    }
    for item in &ev.items {
        if let Some(n) = available.get_mut(&item.sku) {
            *n -= item.quantity;
        }
    }
    lock(&inventory.reservations).insert(ev.order_id.clone(), ev.items);
    Outcome::Success(StockReserved {
        order_id: ev.order_id,
        total_cents: ev.total_cents,
        payment_token: ev.payment_token,
    })
}

/// Inventory: the payment failed, so put the reserved items back.
#[compensates(reserve_stock)]
#[handler(group = "inventory-service")]
pub async fn release_stock(ev: PaymentFailed, inventory: Ctx<'_, Inventory>) -> Option<StockReleased> {
    let items = lock(&inventory.reservations).remove(&ev.order_id)?;
    let mut available = lock(&inventory.available);
    for item in items {
        *available.entry(item.sku).or_default() += item.quantity;
    }
    Some(StockReleased { order_id: ev.order_id })
}

/// The payment service's own data.
#[derive(Default)]
pub struct Payments {
    charges: Mutex<Vec<(String, u64)>>,
}

impl Payments {
    /// Every charge made: (order, cents).
    pub fn charges(&self) -> Vec<(String, u64)> {
        lock(&self.charges).clone()
    }
}

/// Payments: charge the card; a declined card is a domain failure, not an error.
#[handler(group = "payment-service")]
pub async fn charge_card(ev: StockReserved, payments: Ctx<'_, Payments>) -> Outcome<PaymentCollected, PaymentFailed> {
    if ev.payment_token == "tok_declined" {
        return Outcome::Failure(PaymentFailed { order_id: ev.order_id, reason: "card declined".into() });
    }
    lock(&payments.charges).push((ev.order_id.clone(), ev.total_cents));
    Outcome::Success(PaymentCollected { order_id: ev.order_id, amount_cents: ev.total_cents })
}

/// Where an order stands, as the order service sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OrderStatus {
    /// Placed; the saga is running.
    Confirmed,
    /// Paid and reserved.
    Fulfilled,
    /// Will not happen.
    Cancelled(String),
}

/// The order service's own data.
#[derive(Default)]
pub struct Orders {
    status: Mutex<HashMap<String, OrderStatus>>,
}

impl Orders {
    /// Records a confirmed order (what the order service does before publishing).
    pub fn confirm(&self, order_id: &str) {
        lock(&self.status).insert(order_id.to_owned(), OrderStatus::Confirmed);
    }

    /// The status of an order.
    pub fn status(&self, order_id: &str) -> Option<OrderStatus> {
        lock(&self.status).get(order_id).cloned()
    }

    fn set(&self, order_id: &str, status: OrderStatus) {
        lock(&self.status).insert(order_id.to_owned(), status);
    }
}

/// Orders: paid means fulfilled.
#[handler(group = "order-service")]
pub async fn fulfil_order(ev: PaymentCollected, orders: Ctx<'_, Orders>) -> OrderFulfilled {
    orders.set(&ev.order_id, OrderStatus::Fulfilled);
    OrderFulfilled { order_id: ev.order_id }
}

/// Orders: no stock, no order.
#[handler(group = "order-service")]
pub async fn cancel_on_stock_shortage(ev: InventoryFailed, orders: Ctx<'_, Orders>) -> OrderCancelled {
    orders.set(&ev.order_id, OrderStatus::Cancelled(ev.reason.clone()));
    OrderCancelled { order_id: ev.order_id, reason: ev.reason }
}

/// Orders: no payment, no order.
#[handler(group = "order-service")]
pub async fn cancel_on_payment_failure(ev: PaymentFailed, orders: Ctx<'_, Orders>) -> OrderCancelled {
    orders.set(&ev.order_id, OrderStatus::Cancelled(ev.reason.clone()));
    OrderCancelled { order_id: ev.order_id, reason: ev.reason }
}

/// The email service's outbox of sent mails.
#[derive(Default)]
pub struct Mailer {
    sent: Mutex<Vec<String>>,
}

impl Mailer {
    /// Every mail sent.
    pub fn sent(&self) -> Vec<String> {
        lock(&self.sent).clone()
    }
}

/// Email: confirm the order to the customer.
#[handler(group = "email-service")]
pub async fn email_confirmation(ev: OrderConfirmed, mailer: Ctx<'_, Mailer>) {
    lock(&mailer.sent).push(format!("to {}: we got your order {}", ev.user, ev.order_id));
}

/// Email: tell the customer it is on its way.
#[handler(group = "email-service")]
pub async fn email_fulfilled(ev: OrderFulfilled, mailer: Ctx<'_, Mailer>) {
    lock(&mailer.sent).push(format!("order {} is on its way", ev.order_id));
}

/// Email: tell the customer it was cancelled.
#[handler(group = "email-service")]
pub async fn email_cancelled(ev: OrderCancelled, mailer: Ctx<'_, Mailer>) {
    lock(&mailer.sent).push(format!("order {} was cancelled: {}", ev.order_id, ev.reason));
}

/// What analytics counted, by event type.
#[derive(Default)]
pub struct Analytics {
    counts: Mutex<HashMap<&'static str, u32>>,
}

impl Analytics {
    /// How many events of a type were counted.
    pub fn count(&self, ty: &str) -> u32 {
        lock(&self.counts).get(ty).copied().unwrap_or(0)
    }

    fn add(&self, ty: &'static str) {
        *lock(&self.counts).entry(ty).or_default() += 1;
    }
}

/// Analytics: orders placed.
#[handler(group = "analytics")]
pub async fn count_confirmed(_: OrderConfirmed, analytics: Ctx<'_, Analytics>) {
    analytics.add("OrderConfirmed");
}

/// Analytics: orders fulfilled.
#[handler(group = "analytics")]
pub async fn count_fulfilled(_: OrderFulfilled, analytics: Ctx<'_, Analytics>) {
    analytics.add("OrderFulfilled");
}

/// Analytics: orders cancelled.
#[handler(group = "analytics")]
pub async fn count_cancelled(_: OrderCancelled, analytics: Ctx<'_, Analytics>) {
    analytics.add("OrderCancelled");
}

/// Analytics: reservations undone.
#[handler(group = "analytics")]
pub async fn count_released(_: StockReleased, analytics: Ctx<'_, Analytics>) {
    analytics.add("StockReleased");
}
