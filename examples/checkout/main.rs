//! Runs the checkout saga: three orders (fulfilled, stock short, card declined) and one
//! duplicate delivery, then prints each saga's trace.
//!
//! `checkout` runs it on `EDA_URL` (default `sqlite://checkout.db`, the embedded durable log;
//! `memory://`, `postgres://…`, `nats://127.0.0.1:4222`, `amqp://guest:guest@127.0.0.1:5672`
//! and `kafka://127.0.0.1:9092` work the same; on RabbitMQ and Kafka, which keep no saga
//! records, they go to `EDA_OUTBOX_URL`, by default the SQLite file `checkout-outbox.db`, with
//! the transactional outbox);
//! `checkout graph` prints the choreography as Mermaid; `checkout dlq list|show|replay|purge`
//! works on the dead letters. With `EDA_METRICS_ADDR=127.0.0.1:9464` it serves Prometheus
//! metrics there and, once the orders have settled, keeps serving them until ctrl-c.

use checkout::{render_trace, OrderStatus, Orders};

#[tokio::main]
async fn main() -> eda::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    if std::env::args().nth(1).as_deref() == Some("graph") {
        print!("{}", eda::Registry::from_inventory().mermaid());
        return Ok(());
    }
    let url = std::env::var("EDA_URL").unwrap_or_else(|_| "sqlite://checkout.db".into());
    if let Some(command) = eda::cli::Command::from_args(std::env::args()) {
        let transport = eda::transport::connect(&url).await?;
        let services = match checkout::outbox_for(&transport).await? {
            Some(db) => checkout::services(Default::default()).shared_transport(transport).outbox(db),
            None => checkout::services(Default::default()).shared_transport(transport),
        };
        let outcome = match command {
            Ok(command) => eda::cli::run(services, command).await,
            Err(usage) => Err(eda::Error::Config(usage)),
        };
        match outcome {
            Ok(text) => print!("{text}"),
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        }
        return Ok(());
    }
    println!("checkout saga on {url}\n");
    let metrics: Option<std::net::SocketAddr> = match std::env::var("EDA_METRICS_ADDR") {
        Ok(addr) => Some(addr.parse().map_err(|_| {
            eda::Error::Config(format!("EDA_METRICS_ADDR=`{addr}` is not an address: write it as 127.0.0.1:9464"))
        })?),
        Err(_) => None,
    };
    let transport = eda::transport::connect(&url).await?;
    let outbox = checkout::outbox_for(&transport).await?;
    let run = checkout::run_configured(transport, |services| {
        let services = match outbox {
            Some(db) => services.outbox(db),
            None => services,
        };
        match metrics {
            Some(addr) => services.metrics_addr(addr),
            None => services,
        }
    })
    .await?;
    let orders = run.runtime.state::<Orders>();
    for (scenario, envelope) in &run.orders {
        let o = &scenario.order;
        let items: Vec<_> = o.items.iter().map(|i| format!("{} × {}", i.quantity, i.sku)).collect();
        let status = match orders.and_then(|s| s.status(&o.order_id)) {
            Some(OrderStatus::Fulfilled) => "FULFILLED".to_owned(),
            Some(OrderStatus::Cancelled(why)) => format!("CANCELLED ({why})"),
            Some(OrderStatus::Confirmed) => "still running".to_owned(),
            None => "unknown".to_owned(),
        };
        println!("{} — {} buys {} with {} [{}]", o.order_id, o.user, items.join(", "), o.payment_token, scenario.label);
        println!("  correlation id {}", envelope.correlation_id);
        print!("{}", render_trace(&run.runtime.trace(&envelope.correlation_id)));
        println!("  => {status}\n");
    }
    let stats = run.runtime.stats();
    println!(
        "handled {}, duplicates absorbed {}, retried {}, dead-lettered {}",
        stats.handled, stats.duplicates, stats.retried, stats.dead_lettered
    );
    if run.runtime.transport().kind() == "nats" {
        println!("(on NATS the producer's retry never reaches the guards: the server drops a second publication of an event id within its duplicate window)");
    }
    if let Some(addr) = run.runtime.metrics_addr() {
        println!("serving metrics on http://{addr}/metrics; ctrl-c stops");
        tokio::signal::ctrl_c().await.map_err(eda::Error::Signal)?;
    }
    run.runtime.shutdown().await;
    Ok(())
}
