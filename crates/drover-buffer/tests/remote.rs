//! The whole buffer contract, run on buffers reached through the binary codec: every
//! call a [`RemoteBuffer`] makes is encoded, carried as bytes by an in-memory
//! transport, decoded, executed on an embedded buffer with `remote::execute` and its
//! answer encoded and decoded back. Passing it shows the codec and the client keep
//! every behaviour (Full stays Full, waits, leases, counts).

use async_trait::async_trait;
use bytes::Bytes;
use drover_buffer::remote::{self, Answer, CallTransport, RemoteBuffer};
use drover_buffer::{
    Buffer, BufferBackend, BufferConfig, BufferError, BufferName, EmbeddedBackend,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The serving side: the buffers opened so far, by name, and the calls it served.
#[derive(Default)]
struct Server {
    open: Mutex<HashMap<String, Arc<dyn Buffer>>>,
    served: std::sync::atomic::AtomicU64,
}

#[async_trait]
impl CallTransport for Server {
    async fn call(&self, id: u64, frame: Bytes) -> Result<Bytes, BufferError> {
        // Bytes only cross here, as they would a WebSocket.
        let call = remote::decode_call(&frame)?;
        assert_eq!(call.id, id);
        let buffer = self.open.lock().unwrap().get(&call.buffer).cloned();
        let result = match buffer {
            Some(b) => remote::execute(b.as_ref(), call.op).await,
            None => Err(BufferError::Invalid(format!(
                "no open buffer {}",
                call.buffer
            ))),
        };
        self.served
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(remote::encode_answer(&Answer { id, result }))
    }
}

/// A backend whose buffers are remote: opening one opens it on the server's embedded
/// backend and hands back a client for it.
struct RemoteBackend {
    embedded: EmbeddedBackend,
    server: Arc<Server>,
}

#[async_trait]
impl BufferBackend for RemoteBackend {
    async fn open(
        &self,
        name: &BufferName,
        config: &BufferConfig,
    ) -> Result<Arc<dyn Buffer>, BufferError> {
        let b = self.embedded.open(name, config).await?;
        self.server
            .open
            .lock()
            .unwrap()
            .insert(name.as_str().to_string(), b);
        Ok(Arc::new(RemoteBuffer::new(
            name.clone(),
            self.server.clone(),
        )))
    }

    async fn delete(&self, name: &BufferName) -> Result<(), BufferError> {
        self.server.open.lock().unwrap().remove(name.as_str());
        self.embedded.delete(name).await
    }

    async fn list(&self) -> Result<Vec<BufferName>, BufferError> {
        self.embedded.list().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_contract_holds_through_the_codec() {
    let dir = tempfile::tempdir().unwrap();
    let backend = RemoteBackend {
        embedded: EmbeddedBackend::open(dir.path().join("buffers")).unwrap(),
        server: Arc::new(Server::default()),
    };
    let failures = drover_buffer::contract::run(&backend, "remote").await;
    assert!(failures.is_empty(), "{failures:#?}");
    // The cases went through the transport, not around it.
    let served = backend
        .server
        .served
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(served > 100, "only {served} calls were served");
}
