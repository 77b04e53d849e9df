//! [`StorageSink`]: audit batches through the storage proxy, with the worker's credential
//! (the same client snapshots use; the worker holds no object-store keys).

use bytes::Bytes;
use futures_util::future::BoxFuture;

use super::{BatchSink, PutBatchError};
use crate::snapshots::ObjectClient;

/// Puts each batch as one object through the storage proxy.
#[derive(Debug, Clone)]
pub struct StorageSink {
    objects: ObjectClient,
}

impl StorageSink {
    pub fn new(objects: ObjectClient) -> Self {
        Self { objects }
    }
}

impl BatchSink for StorageSink {
    fn put(&self, key: String, body: Bytes) -> BoxFuture<'_, Result<(), PutBatchError>> {
        Box::pin(async move { Ok(self.objects.put_bytes(&key, body).await?) })
    }
}
