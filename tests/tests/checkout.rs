//! The checkout saga end to end: for each order, exactly which events were emitted, and their
//! causal chain.

use std::collections::{BTreeSet, HashMap};

use checkout::{Analytics, Inventory, Mailer, OrderStatus, Orders, Payments};
use eda::{EntryKind, EventId, JournalEntry};
use eda_tests::{on_every_transport, Bus};

/// The events of one saga as (type, type of its cause) pairs, after checking that every event
/// shares the root's correlation id and names a published event as its cause.
fn causal_chain(trace: &[JournalEntry], root: EventId) -> BTreeSet<(String, Option<String>)> {
    let published: Vec<_> = trace.iter().filter(|e| matches!(e.kind, EntryKind::Published { .. })).collect();
    let types: HashMap<EventId, &str> = published.iter().map(|e| (e.event_id, e.ty.as_str())).collect();
    let correlation = &trace.first().expect("a trace").correlation_id;
    let mut chain = BTreeSet::new();
    for e in &published {
        assert_eq!(&e.correlation_id, correlation, "{} left the saga", e.ty);
        match e.causation_id {
            None => assert_eq!(e.event_id, root, "only the confirmed order starts the saga"),
            Some(cause) => {
                assert!(types.contains_key(&cause), "{} names a cause that was never published", e.ty);
            }
        }
        let cause = e.causation_id.map(|c| types[&c].trim_end_matches(".v1").to_owned());
        chain.insert((e.ty.trim_end_matches(".v1").to_owned(), cause));
    }
    chain
}

fn pairs(expected: &[(&str, Option<&str>)]) -> BTreeSet<(String, Option<String>)> {
    expected.iter().map(|(t, c)| ((*t).to_owned(), c.map(str::to_owned))).collect()
}

on_every_transport! {
    three_orders_settle_with_the_right_events_in_the_right_causal_chain,
    the_duplicate_delivery_is_absorbed_by_each_groups_guard,
}

/// The checkout, with its producer retry made a second delivery on every transport: NATS drops
/// the retry itself (the event id is its `Nats-Msg-Id`), so there it is published once more
/// past the broker's deduplication, as a retry after the duplicate window would be.
async fn checkout_with_a_second_delivery(bus: &Bus) -> checkout::CheckoutRun {
    let run = checkout::run_configured(bus.transport(), |services| match bus.records() {
        Some(db) => services.outbox(db),
        None => services,
    })
    .await
    .expect("the checkout runs");
    bus.publish_past_deduplication(&run.orders[0].1).await;
    run.runtime.settled(std::time::Duration::from_secs(30)).await.expect("settled");
    assert_eq!(bus.deduplicated_publications(), u64::from(bus.deduplicates_publications()));
    run
}

async fn three_orders_settle_with_the_right_events_in_the_right_causal_chain(bus: Bus) {
    let run = checkout_with_a_second_delivery(&bus).await;
    let rt = &run.runtime;
    let expected = [
        pairs(&[
            ("OrderConfirmed", None),
            ("StockReserved", Some("OrderConfirmed")),
            ("PaymentCollected", Some("StockReserved")),
            ("OrderFulfilled", Some("PaymentCollected")),
        ]),
        pairs(&[
            ("OrderConfirmed", None),
            ("InventoryFailed", Some("OrderConfirmed")),
            ("OrderCancelled", Some("InventoryFailed")),
        ]),
        pairs(&[
            ("OrderConfirmed", None),
            ("StockReserved", Some("OrderConfirmed")),
            ("PaymentFailed", Some("StockReserved")),
            ("StockReleased", Some("PaymentFailed")),
            ("OrderCancelled", Some("PaymentFailed")),
        ]),
    ];
    for ((scenario, envelope), expected) in run.orders.iter().zip(expected) {
        let trace = rt.trace(&envelope.correlation_id);
        assert_eq!(causal_chain(&trace, envelope.id), expected, "order {}", scenario.order.order_id);
        // Each emitted event was published exactly once.
        let emitted: Vec<_> = trace
            .iter()
            .filter(|e| matches!(e.kind, EntryKind::Published { by: Some(_) }))
            .map(|e| e.event_id)
            .collect();
        assert_eq!(emitted.len(), expected.len() - 1, "order {}", scenario.order.order_id);
    }

    let orders = rt.state::<Orders>().expect("orders state");
    assert_eq!(orders.status("order-1"), Some(OrderStatus::Fulfilled));
    assert!(matches!(orders.status("order-2"), Some(OrderStatus::Cancelled(why)) if why.contains("monitor")));
    assert_eq!(orders.status("order-3"), Some(OrderStatus::Cancelled("card declined".into())));

    let inventory = rt.state::<Inventory>().expect("inventory state");
    assert_eq!(inventory.available("keyboard"), 8, "order-1 reserved two, once despite the duplicate");
    assert_eq!(inventory.available("monitor"), 1, "order-2 reserved nothing");
    assert_eq!(inventory.available("mouse"), 3, "order-3's reservation was released");
    assert_eq!(rt.state::<Payments>().expect("payments").charges(), vec![("order-1".to_owned(), 9_800)]);
    assert_eq!(rt.state::<Mailer>().expect("mailer").sent().len(), 3 + 1 + 2);
    assert_eq!(rt.state::<Analytics>().expect("analytics").count("OrderConfirmed"), 3);

    let stats = rt.stats();
    assert_eq!((stats.duplicates, stats.dead_lettered, stats.retried), (3, 0, 0));
    rt.shutdown().await;
}

async fn the_duplicate_delivery_is_absorbed_by_each_groups_guard(bus: Bus) {
    let run = checkout_with_a_second_delivery(&bus).await;
    let (_, first) = &run.orders[0];
    let trace = run.runtime.trace(&first.correlation_id);
    let absorbed: BTreeSet<_> = trace
        .iter()
        .filter(|e| e.event_id == first.id)
        .filter_map(|e| match &e.kind {
            EntryKind::Duplicate { handler } => Some(handler.as_str()),
            _ => None,
        })
        .collect();
    let expected: BTreeSet<_> =
        ["analytics/count_confirmed", "email-service/email_confirmation", "inventory-service/reserve_stock"].into();
    assert_eq!(absorbed, expected);
    let rendered = checkout::render_trace(&trace);
    assert!(rendered.contains("published 2 times with the same id"), "{rendered}");
    run.runtime.shutdown().await;
}

#[tokio::test]
async fn the_choreography_graph_shows_the_compensation() {
    let registry = eda::Registry::from_inventory();
    let names: BTreeSet<_> =
        registry.handlers().iter().filter(|h| h.module.starts_with("checkout")).map(|h| h.name).collect();
    assert_eq!(names.len(), 13, "every checkout handler is linked: {names:?}");
    let graph = registry.mermaid();
    assert!(graph.contains("h_inventory_service_release_stock -. compensates .-> h_inventory_service_reserve_stock"));
    assert!(graph.contains("h_payment_service_charge_card -. failure .-> ev_PaymentFailed_v1"));
}

async fn the_saga_can_be_read_back_from_the_database(postgres: bool) {
    let db = eda_tests::TestDb::new(postgres).await;
    let run = checkout::run_on(std::sync::Arc::new(db.open().await)).await.expect("the checkout runs");
    let (_, declined) = &run.orders[2];
    // Read back from the database alone, as `checkout trace <id>` does in another process.
    let reader = eda::Runtime::builder(eda::Registry::default())
        .transport(db.open().await)
        .without_consumers()
        .start()
        .await
        .expect("start");
    let saga = reader.saga(&declined.correlation_id).await.expect("saga");
    let types: Vec<_> = saga.iter().map(|e| e.envelope.ty.trim_end_matches(".v1")).collect();
    let expected: BTreeSet<_> =
        ["OrderConfirmed", "StockReserved", "PaymentFailed", "StockReleased", "OrderCancelled"].into();
    assert_eq!(types.iter().copied().collect::<BTreeSet<_>>(), expected, "{types:?}");
    assert_eq!(types[0], "OrderConfirmed", "publish order");
    let handled = |ty: &str| -> BTreeSet<String> {
        saga.iter()
            .filter(|e| e.envelope.ty.starts_with(ty))
            .flat_map(|e| e.handled_by.iter().map(|h| format!("{}/{}", h.group, h.handler)))
            .collect()
    };
    assert_eq!(
        handled("PaymentFailed"),
        ["inventory-service/release_stock", "order-service/cancel_on_payment_failure"].map(String::from).into()
    );
    assert_eq!(handled("OrderConfirmed").len(), 3);
    assert!(saga.iter().all(|e| e.envelope.correlation_id == declined.correlation_id));
    run.runtime.shutdown().await;
    reader.shutdown().await;
}

mod read_back {
    use super::the_saga_can_be_read_back_from_the_database;

    eda_tests::on_sql_databases! {
        the_saga_can_be_read_back_from_the_database,
    }
}
