use eda::{event, handler};
use serde::{Deserialize, Serialize};

#[event(topic = "users", key = id)]
#[derive(Serialize, Deserialize)]
struct UserRegistered {
    id: u32,
}

fn reserve(_: UserRegistered) {}

#[eda::compensates(reserve)]
#[handler(group = "mailer")]
async fn undo(ev: UserRegistered) {
    let _ = ev.id;
}

fn main() {}
