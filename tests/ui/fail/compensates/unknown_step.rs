use eda::{event, handler};
use serde::{Deserialize, Serialize};

#[event(topic = "users", key = id)]
#[derive(Serialize, Deserialize)]
struct UserRegistered {
    id: u32,
}

#[eda::compensates(reserve_stock)]
#[handler(group = "mailer")]
async fn undo(ev: UserRegistered) {
    let _ = ev.id;
}

fn main() {}
