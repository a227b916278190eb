use serde::{Deserialize, Serialize};

#[eda::event(topic = "users", partition = id)]
#[derive(Serialize, Deserialize)]
struct UserRegistered {
    id: u32,
}

fn main() {}
