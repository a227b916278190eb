//! The engine's leases in a JetStream key-value bucket, `<namespace>_leases`: its revisions are
//! the compare-and-set the leases need.

use std::pin::Pin;
use std::time::Duration;

use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, UpdateErrorKind};
use async_nats::jetstream::stream;
use async_trait::async_trait;
use bytes::Bytes;
use eda_core::TransportError;
use futures_core::Stream;
use futures_util::StreamExt;

use super::{other, storage_type, NatsOptions};
use crate::engine::{LeaseStore, LeaseUpdate};

fn update(entry: kv::Entry) -> LeaseUpdate {
    let value = matches!(entry.operation, Operation::Put).then(|| entry.value.to_vec());
    let written_ns = u64::try_from(entry.created.unix_timestamp_nanos()).unwrap_or(0);
    LeaseUpdate { key: entry.key, revision: entry.revision, value, written_ns }
}

/// The leases of every group of one namespace.
pub(super) struct NatsLeases {
    bucket: kv::Store,
}

impl NatsLeases {
    /// Opens the bucket, making it when it is not there.
    pub(super) async fn open(
        js: &async_nats::jetstream::Context,
        options: &NatsOptions,
    ) -> Result<Self, TransportError> {
        let name = format!("{}_leases", options.namespace);
        // Member keys of instances long gone age out; live keys are rewritten every heartbeat.
        let max_age = (options.engine.lease_ttl * 100).max(Duration::from_secs(3600));
        let description = "eda: which instance of a group consumes which partition";
        Ok(Self { bucket: open_bucket(js, options, &name, description, max_age).await? })
    }
}

/// Opens the key-value bucket `name`, making it when it is not there.
pub(super) async fn open_bucket(
    js: &async_nats::jetstream::Context,
    options: &NatsOptions,
    name: &str,
    description: &str,
    max_age: Duration,
) -> Result<kv::Store, TransportError> {
    if let Err(e) = js.get_key_value(name).await {
        tracing::debug!(bucket = %name, error = %e, "making a key-value bucket");
        // The bucket's stream, made as the KV layout has it (async-nats' own
        // `create_key_value` cannot read a 2.9 server's account information).
        js.get_or_create_stream(stream::Config {
            name: format!("KV_{name}"),
            description: Some(description.into()),
            subjects: vec![format!("$KV.{name}.>")],
            max_messages_per_subject: 1,
            max_age,
            discard: stream::DiscardPolicy::New,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            storage: storage_type(options.storage),
            num_replicas: options.replicas,
            ..Default::default()
        })
        .await
        .map_err(other)?;
    }
    js.get_key_value(name).await.map_err(other)
}

#[async_trait]
impl LeaseStore for NatsLeases {
    async fn watch(
        &self,
        prefix: &str,
    ) -> Result<Pin<Box<dyn Stream<Item = Result<LeaseUpdate, TransportError>> + Send>>, TransportError> {
        let watch = self.bucket.watch_with_history(format!("{prefix}.>")).await.map_err(other)?;
        Ok(Box::pin(watch.map(|entry| entry.map(update).map_err(other))))
    }

    async fn get(&self, key: &str) -> Result<Option<LeaseUpdate>, TransportError> {
        Ok(self.bucket.entry(key).await.map_err(other)?.map(update))
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64, TransportError> {
        self.bucket.put(key, Bytes::from(value)).await.map_err(other)
    }

    async fn create(&self, key: &str, value: Vec<u8>) -> Result<Option<u64>, TransportError> {
        match self.bucket.create(key, Bytes::from(value)).await {
            Ok(revision) => Ok(Some(revision)),
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(other(e)),
        }
    }

    async fn update(&self, key: &str, value: Vec<u8>, revision: u64) -> Result<Option<u64>, TransportError> {
        match self.bucket.update(key, Bytes::from(value), revision).await {
            Ok(revision) => Ok(Some(revision)),
            Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(e) => Err(other(e)),
        }
    }

    async fn delete(&self, key: &str, revision: Option<u64>) -> Result<(), TransportError> {
        self.bucket.delete_expect_revision(key, revision).await.map_err(other)
    }
}
