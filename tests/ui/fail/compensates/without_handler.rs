use eda::{event, handler};
use serde::{Deserialize, Serialize};

#[event(topic = "users", key = id)]
#[derive(Serialize, Deserialize)]
struct UserRegistered {
    id: u32,
}

#[handler(group = "mailer")]
async fn welcome(ev: UserRegistered) {
    let _ = ev.id;
}

#[eda::compensates(welcome)]
async fn undo(ev: UserRegistered) {
    let _ = ev.id;
}

fn main() {}
