use eda::{event, handler};
use serde::{Deserialize, Serialize};

#[event(topic = "users", key = id)]
#[derive(Serialize, Deserialize)]
struct UserRegistered {
    id: u32,
}

struct Mailer;

impl Mailer {
    #[handler(group = "mailer")]
    async fn welcome(&self, ev: UserRegistered) {
        let _ = ev.id;
    }
}

fn main() {}
