use serde::{Deserialize, Serialize};

#[eda::event(topic = "users")]
#[derive(Serialize, Deserialize)]
struct Registered<T> {
    id: T,
}

fn main() {}
