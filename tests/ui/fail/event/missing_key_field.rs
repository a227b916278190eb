use serde::{Deserialize, Serialize};

#[eda::event(topic = "users", key = user_id)]
#[derive(Serialize, Deserialize)]
struct UserRegistered {
    id: u32,
    email: String,
}

fn main() {}
