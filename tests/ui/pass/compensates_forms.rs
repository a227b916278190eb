//! `#[compensates]` with a trailing comma in the handler's arguments, and with renamed imports
//! of both macros, in both attribute orders.
use eda::{event, Handler, Outcome, Registry};
use serde::{Deserialize, Serialize};

use eda::compensates as undoes;
use eda::handler as on;

#[event(topic = "rooms", key = room)]
#[derive(Serialize, Deserialize)]
struct RoomRequested {
    room: u32,
}

#[event(topic = "rooms", key = room)]
#[derive(Serialize, Deserialize)]
struct RoomBooked {
    room: u32,
}

#[event(topic = "payments", key = room)]
#[derive(Serialize, Deserialize)]
struct DepositFailed {
    room: u32,
}

#[on(group = "rooms")]
async fn book(ev: RoomRequested) -> RoomBooked {
    RoomBooked { room: ev.room }
}

#[on(group = "payments")]
async fn take_deposit(ev: RoomBooked) -> Outcome<(), DepositFailed> {
    Outcome::Failure(DepositFailed { room: ev.room })
}

#[eda::compensates(book)]
#[eda::handler(group = "rooms", max_attempts = 3,)]
async fn trailing_comma(ev: DepositFailed) {
    let _ = ev.room;
}

#[undoes(book)]
#[on(group = "rooms")]
async fn renamed_above(ev: DepositFailed) {
    let _ = ev.room;
}

#[on(group = "rooms")]
#[undoes(book)]
async fn renamed_below(ev: DepositFailed) {
    let _ = ev.room;
}

fn main() {
    for step in [
        <trailing_comma as Handler>::descriptor().compensates,
        <renamed_above as Handler>::descriptor().compensates,
        <renamed_below as Handler>::descriptor().compensates,
    ] {
        assert_eq!(step.map(|s| s().name), Some("book"));
    }
    assert_eq!(<trailing_comma as Handler>::descriptor().max_attempts, Some(3));
    let registry = Registry::builder()
        .handler::<book>()
        .handler::<take_deposit>()
        .handler::<renamed_above>()
        .publishes::<RoomRequested>()
        .build();
    assert!(registry.validate().is_ok(), "{}", registry.validate());
}
