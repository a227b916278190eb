//! One trace across a chain of handlers: each handling's span is a child of the span that
//! published or emitted its event, all share the first event's trace id, and every emitted
//! envelope keeps the first event's correlation id. (A file of its own: it installs the
//! process-wide tracing subscriber.)

use std::time::Duration;

use eda::{event, handler, EntryKind, Registry, Runtime};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use serde::{Deserialize, Serialize};
use tracing_subscriber::layer::SubscriberExt;

#[event(topic = "chain", key = id)]
#[derive(Serialize, Deserialize)]
struct Started {
    id: u32,
}

#[event(topic = "chain", key = id)]
#[derive(Serialize, Deserialize)]
struct Continued {
    id: u32,
}

#[event(topic = "chain", key = id)]
#[derive(Serialize, Deserialize)]
struct Finished {
    id: u32,
}

#[handler(group = "first")]
async fn first(ev: Started) -> Continued {
    Continued { id: ev.id }
}

#[handler(group = "second")]
async fn second(ev: Continued) -> Finished {
    Finished { id: ev.id }
}

#[handler(group = "third")]
async fn third(_ev: Finished) {}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_three_handlers_is_one_trace_with_the_right_parents() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
    let subscriber =
        tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("eda-test")));
    tracing::subscriber::set_global_default(subscriber).expect("the only subscriber of this test binary");

    let registry =
        Registry::builder().handler::<first>().handler::<second>().handler::<third>().publishes::<Started>().build();
    let rt = Runtime::builder(registry).transport_url("memory://").start().await.expect("start");
    let root = rt.publisher().publish(&Started { id: 1 }).await.expect("publish");
    rt.settled(Duration::from_secs(20)).await.expect("settled");
    rt.shutdown().await;
    provider.force_flush().expect("flush");

    let spans: Vec<_> =
        exporter.get_finished_spans().expect("spans").into_iter().filter(|s| s.name == "handle").collect();
    assert_eq!(spans.len(), 3, "one span per handling: {spans:?}");
    let root_tp = root.traceparent.clone().expect("the root event has a traceparent");
    let mut parts = root_tp.split('-').skip(1);
    let (root_trace, root_span) = (parts.next().expect("trace id"), parts.next().expect("span id"));
    let handler_of = |s: &opentelemetry_sdk::trace::SpanData| {
        s.attributes.iter().find(|kv| kv.key.as_str() == "handler").map(|kv| kv.value.to_string()).unwrap_or_default()
    };
    let by_handler =
        |name: &str| spans.iter().find(|s| handler_of(s) == name).unwrap_or_else(|| panic!("no span for {name}"));
    let (a, b, c) = (by_handler("first/first"), by_handler("second/second"), by_handler("third/third"));
    for s in [a, b, c] {
        assert_eq!(s.span_context.trace_id().to_string(), root_trace, "one trace");
    }
    assert_eq!(a.parent_span_id.to_string(), root_span, "the first handling continues the publisher's span");
    assert_eq!(b.parent_span_id, a.span_context.span_id(), "the second is a child of the first");
    assert_eq!(c.parent_span_id, b.span_context.span_id(), "the third is a child of the second");

    let emitted: Vec<_> = rt
        .trace(&root.correlation_id)
        .into_iter()
        .filter(|e| matches!(e.kind, EntryKind::Published { by: Some(_) }))
        .collect();
    assert_eq!(emitted.len(), 2);
    assert!(emitted.iter().all(|e| e.correlation_id == root.correlation_id));
}
