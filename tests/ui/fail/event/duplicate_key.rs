use serde::{Deserialize, Serialize};

#[eda::event(topic = "users", topic = "accounts")]
#[derive(Serialize, Deserialize)]
struct UserRegistered {
    id: u32,
}

fn main() {}
