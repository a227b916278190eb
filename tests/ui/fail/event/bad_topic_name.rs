use serde::{Deserialize, Serialize};

#[eda::event(topic = "users/registered", version = 0)]
#[derive(Serialize, Deserialize)]
struct UserRegistered {
    id: u32,
}

fn main() {}
