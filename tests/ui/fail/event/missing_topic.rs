use serde::{Deserialize, Serialize};

#[eda::event(key = id)]
#[derive(Serialize, Deserialize)]
struct UserRegistered {
    id: u32,
}

fn main() {}
