use eda::{event, handler, Registry};
use serde::{Deserialize, Serialize};

#[event(topic = "users", key = id)]
#[derive(Serialize, Deserialize)]
struct UserRegistered {
    id: u32,
}

#[handler(group = "mailer")]
fn welcome(ev: UserRegistered) {
    let _ = ev.id;
}

fn main() {
    // Only the real error is reported: the handler's marker still exists.
    let _ = Registry::builder().handler::<welcome>().build();
}
