//! The live instances of a group on a topic, so that the engine can share the partitions out:
//! each instance says it is there every heartbeat on the fanout exchange
//! `<namespace>.<topic>.<group>.members`, and hears the others on an exclusive queue of its
//! own bound to it (gone with its connection). An instance not heard for a lease TTL is gone.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, ExchangeKind};
use tokio::sync::watch;
use tokio::time::Instant;

use super::{other, RabbitTransport};
use eda_core::TransportError;

/// Starts saying this instance is there, and listening for the others: the receiver holds
/// this instance's place among the live ones sorted by id, and how many there are (`(0, 1)`
/// until others are heard). Stops once the receiver is dropped.
pub(super) fn watch(transport: RabbitTransport, group: String, topic: String) -> watch::Receiver<(usize, usize)> {
    let (tx, rx) = watch::channel((0, 1));
    let me = uuid::Uuid::new_v4().simple().to_string();
    tokio::spawn(async move {
        let mut failures = 0u32;
        while !tx.is_closed() {
            let heard = tokio::select! {
                () = tx.closed() => break,
                heard = listen(&transport, &group, &topic, &me, &tx) => heard,
            };
            if let Err(e) = heard {
                failures += 1;
                if failures == 1 {
                    tracing::debug!(%group, %topic, error = %e, "counting the group's instances failed; trying again");
                }
            }
            tokio::select! {
                () = tx.closed() => break,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    });
    rx
}

async fn listen(
    transport: &RabbitTransport,
    group: &str,
    topic: &str,
    me: &str,
    count: &watch::Sender<(usize, usize)>,
) -> Result<(), TransportError> {
    let engine = &transport.options().engine;
    let exchange = transport.members_exchange(topic, group);
    let channel = transport.channel().await?;
    let declare = ExchangeDeclareOptions { durable: true, ..Default::default() };
    channel
        .exchange_declare(exchange.as_str().into(), ExchangeKind::Fanout, declare, FieldTable::default())
        .await
        .map_err(other)?;
    let own = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
    let queue = channel.queue_declare("".into(), own, FieldTable::default()).await.map_err(other)?;
    let bind = QueueBindOptions::default();
    channel
        .queue_bind(queue.name().clone(), exchange.as_str().into(), "".into(), bind, FieldTable::default())
        .await
        .map_err(other)?;
    let consume = BasicConsumeOptions { no_ack: true, exclusive: true, ..Default::default() };
    let mut heard =
        channel.basic_consume(queue.name().clone(), "".into(), consume, FieldTable::default()).await.map_err(other)?;
    let mut seen: HashMap<String, Instant> = HashMap::new();
    let mut tick = tokio::time::interval(engine.heartbeat);
    let result = loop {
        tokio::select! {
            () = count.closed() => break Ok(()),
            _ = tick.tick() => {
                let said = channel
                    .basic_publish(exchange.as_str().into(), "".into(), BasicPublishOptions::default(), me.as_bytes(), BasicProperties::default())
                    .await;
                if let Err(e) = said {
                    break Err(other(e));
                }
            }
            message = heard.next() => match message {
                Some(Ok(m)) => {
                    let who = String::from_utf8_lossy(&m.data).into_owned();
                    match who.strip_prefix('-') {
                        Some(gone) => { seen.remove(gone); }
                        None => { seen.insert(who, Instant::now()); }
                    }
                }
                Some(Err(e)) => break Err(other(e)),
                None => break Err(TransportError::Closed(super::NAME)),
            },
        }
        seen.retain(|_, at| at.elapsed() < engine.lease_ttl);
        let mut live: Vec<&str> = seen.keys().map(String::as_str).chain([me]).collect();
        live.sort_unstable();
        live.dedup();
        let place = (live.iter().position(|m| *m == me).unwrap_or(0), live.len());
        count.send_if_modified(|now| std::mem::replace(now, place) != place);
    };
    // Gone: the others count without this one at once.
    let bye = format!("-{me}");
    let _ = channel
        .basic_publish(
            exchange.as_str().into(),
            "".into(),
            BasicPublishOptions::default(),
            bye.as_bytes(),
            BasicProperties::default(),
        )
        .await;
    let _ = channel.close(200, "OK".into()).await;
    result
}
