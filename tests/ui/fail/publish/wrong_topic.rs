use eda::{event, Event, Publisher};
use serde::{Deserialize, Serialize};

#[event(topic = "orders")]
#[derive(Serialize, Deserialize)]
struct OrderPlaced {
    id: u32,
}

#[event(topic = "shipments")]
#[derive(Serialize, Deserialize)]
struct OrderShipped {
    id: u32,
}

async fn place(publisher: Publisher) -> eda::Result<()> {
    publisher.publish_to(OrderShipped::topic(), &OrderPlaced { id: 1 }).await?;
    Ok(())
}

fn main() {
    let _ = place;
}
