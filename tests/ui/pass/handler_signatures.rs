//! Handler signatures plain Rust allows: a `pub` handler with crate-private event, state and
//! error types, a named lifetime, a raw identifier, and a module named like the handler.
use eda::{event, handler, Ctx, Handler, Registry};
use serde::{Deserialize, Serialize};

#[event(topic = "parcels", key = id)]
#[derive(Serialize, Deserialize)]
struct ParcelShipped {
    id: u32,
}

struct Depot;

#[derive(Debug)]
struct DepotClosed;

impl std::fmt::Display for DepotClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the depot is closed")
    }
}

impl std::error::Error for DepotClosed {}

/// Public, over private types: as a plain `pub fn` may be.
#[handler(group = "depot")]
pub async fn receive(ev: ParcelShipped, _depot: Ctx<'_, Depot>) -> Result<(), DepotClosed> {
    let _ = ev.id;
    Ok(())
}

/// A named lifetime rather than `'_`.
#[handler(group = "ledger")]
async fn count<'a>(ev: ParcelShipped, cx: Ctx<'a, Depot>) {
    let _ = (ev.id, cx.event_id());
}

/// A raw identifier: the handler is named `return`.
#[handler(group = "returns")]
async fn r#return(ev: ParcelShipped) {
    let _ = ev.id;
}

/// A module beside a function of the same name.
mod shipping {
    pub const DEPOT: &str = "north";
}

#[handler(group = "shipping")]
async fn shipping(ev: ParcelShipped) {
    let _ = (ev.id, shipping::DEPOT);
}

fn main() {
    assert_eq!(<r#return as Handler>::descriptor().name, "return");
    let registry = Registry::builder()
        .handler::<receive>()
        .handler::<count>()
        .handler::<r#return>()
        .publishes::<ParcelShipped>()
        .build();
    assert_eq!(registry.handlers().len(), 3);
    // `shipping` the module hides the handler's marker type here; the handler registers
    // itself through inventory, as every handler does.
    let all = Registry::from_inventory();
    assert!(all.handlers().iter().any(|h| h.name == "shipping" && h.group == "shipping"));
}
