//! `crate = "…"` names the crate that re-exports eda, for facades that rename it.

#[eda::event(topic = "users", key = id, crate = "eda")]
#[derive(serde::Serialize, serde::Deserialize)]
pub struct UserRegistered {
    pub id: String,
}

fn main() {
    use eda::Event;
    assert_eq!(UserRegistered { id: "u1".into() }.key().as_deref(), Some("u1"));
}
