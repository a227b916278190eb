//! Spans leave for an OpenTelemetry collector over OTLP/HTTP: a collector stand-in on 127.0.0.1
//! receives protobuf trace exports with the handlings' spans. (A file of its own: it installs
//! the process-wide tracing subscriber.)

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eda::{event, handler, Registry, Runtime};
use serde::{Deserialize, Serialize};

#[event(topic = "exported", key = id)]
#[derive(Serialize, Deserialize)]
struct Exported {
    id: u32,
}

#[handler(group = "exporters")]
async fn export_me(_ev: Exported) {}

/// A request the stand-in collector received.
#[derive(Debug, Clone)]
struct Received {
    path: String,
    content_type: String,
    body: Vec<u8>,
}

/// Accepts OTLP/HTTP posts on 127.0.0.1 and answers 200 to each.
fn collector() -> (String, Arc<Mutex<Vec<Received>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let endpoint = format!("http://{}/v1/traces", listener.local_addr().expect("addr"));
    let received = Arc::new(Mutex::new(Vec::new()));
    let into = received.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream);
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split_whitespace().nth(1).unwrap_or_default().to_owned();
            let (mut length, mut content_type) = (0usize, String::new());
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).is_err() || header.trim().is_empty() {
                    break;
                }
                let (name, value) = header.split_once(':').unwrap_or_default();
                match name.trim().to_ascii_lowercase().as_str() {
                    "content-length" => length = value.trim().parse().unwrap_or(0),
                    "content-type" => content_type = value.trim().to_owned(),
                    _ => {}
                }
            }
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_err() {
                continue;
            }
            into.lock().expect("lock").push(Received { path, content_type, body });
            let _ = reader.get_mut().write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
    });
    (endpoint, received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handling_spans_are_exported_to_an_otlp_collector() {
    let (endpoint, received) = collector();
    let guard = eda::otel::install_otlp(&endpoint, "eda-otlp-test").expect("installs");
    let registry = Registry::builder().handler::<export_me>().publishes::<Exported>().build();
    let rt = Runtime::builder(registry).transport_url("memory://").start().await.expect("start");
    for id in 0..3 {
        rt.publisher().publish(&Exported { id }).await.expect("publish");
    }
    rt.settled(Duration::from_secs(20)).await.expect("settled");
    rt.shutdown().await;
    tokio::task::spawn_blocking(move || guard.flush()).await.expect("flushed");

    let got = received.lock().expect("lock").clone();
    assert!(!got.is_empty(), "the collector received nothing");
    assert!(got.iter().all(|r| r.path == "/v1/traces" && r.content_type == "application/x-protobuf"), "{got:?}");
    let bytes: Vec<u8> = got.iter().flat_map(|r| r.body.clone()).collect();
    let text = String::from_utf8_lossy(&bytes);
    // Protobuf keeps strings as they are: the span name, the service and the handler are there.
    assert!(
        text.contains("handle") && text.contains("eda-otlp-test") && text.contains("exporters/export_me"),
        "{text}"
    );
}
