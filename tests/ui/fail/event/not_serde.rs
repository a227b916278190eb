#[eda::event(topic = "users")]
struct UserRegistered {
    id: u32,
}

fn main() {}
