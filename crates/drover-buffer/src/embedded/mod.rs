//! The embedded backend: durable buffers in files under one directory, one
//! subdirectory per buffer, living in the controller's process.
//!
//! Each buffer is an append-only log of segments (one record per message, CRC-32C
//! checked), an ack log of acknowledged sequence-number ranges, and its state in memory:
//! the messages not yet acked (bounded by the buffer's limit), the leases handed out
//! (bounded by what was fetched) and the ids inside the de-duplication window. Appends
//! and acks are synced to disk before they return, concurrent ones sharing one sync.
//! A segment is deleted once all its messages are acked and its ids have left the
//! window, so a restart can rebuild the window from the segments still there.

mod buffer;
mod log;
#[cfg(test)]
mod tests;

use crate::{Buffer, BufferBackend, BufferConfig, BufferError, BufferName};
use async_trait::async_trait;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Buffers as directories under one directory.
pub struct EmbeddedBackend {
    dir: PathBuf,
    /// The buffers opened so far: one instance per buffer, since two writing the same
    /// files would corrupt them.
    open: tokio::sync::Mutex<HashMap<BufferName, buffer::Handle>>,
    sizes: buffer::Sizes,
}

/// A directory name read back as a buffer name: `project.pipeline.vertex.partition`,
/// exactly as [`BufferName`] writes it.
fn parse_name(dir_name: &str) -> Option<BufferName> {
    let mut parts = dir_name.split('.');
    let (project, pipeline, vertex, partition) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let name = BufferName::new(project, pipeline, vertex, partition.parse().ok()?).ok()?;
    // Rejects spellings the name would not produce, such as a partition of "01".
    (name.as_str() == dir_name).then_some(name)
}

impl EmbeddedBackend {
    /// Uses `dir` (created if missing) for its buffers.
    pub fn open(dir: PathBuf) -> Result<EmbeddedBackend, BufferError> {
        std::fs::create_dir_all(&dir).map_err(|e| log::io_err(&dir, "creating", e))?;
        Ok(EmbeddedBackend {
            dir,
            open: tokio::sync::Mutex::new(HashMap::new()),
            sizes: buffer::Sizes {
                segment: log::SEGMENT_BYTES,
                ack_log: log::ACK_LOG_COMPACT_BYTES,
            },
        })
    }

    /// Rolls segments at `segment` bytes and compacts ack logs past `ack_log` bytes,
    /// for buffers opened from now on: small sizes let tests reach both quickly.
    #[doc(hidden)]
    pub fn with_file_sizes(mut self, segment: u64, ack_log: u64) -> EmbeddedBackend {
        self.sizes = buffer::Sizes { segment, ack_log };
        self
    }

    /// The directory the buffers live in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn buffer_dir(&self, name: &BufferName) -> PathBuf {
        self.dir.join(name.as_str())
    }
}

#[async_trait]
impl BufferBackend for EmbeddedBackend {
    async fn open(
        &self,
        name: &BufferName,
        config: &BufferConfig,
    ) -> Result<Arc<dyn Buffer>, BufferError> {
        if config.max_length == 0
            || config.usage_limit.is_nan()
            || config.usage_limit <= 0.0
            || config.lease.is_zero()
        {
            return Err(BufferError::Invalid(format!(
                "buffer {name}: expected max_length > 0, usage_limit > 0 and a lease > 0, got {config:?}"
            )));
        }
        let mut open = self.open.lock().await;
        if let Some(existing) = open.get(name) {
            if !existing.is_failed() {
                existing.set_config(config);
                let existing: Arc<dyn Buffer> = existing.clone();
                return Ok(existing);
            }
            // A buffer whose write failed is recovered from its files afresh.
            tracing::warn!(buffer = %name, "reopening a buffer after a failed write");
        }
        let (name2, dir, config2) = (name.clone(), self.buffer_dir(name), config.clone());
        let sizes = self.sizes;
        let buffer = tokio::task::spawn_blocking(move || {
            buffer::EmbeddedBuffer::open(name2, dir, config2, sizes)
        })
        .await
        .map_err(|e| BufferError::Backend(format!("opening buffer {name}: {e}")))??;
        let buffer = Arc::new(buffer);
        open.insert(name.clone(), buffer.clone());
        Ok(buffer)
    }

    async fn delete(&self, name: &BufferName) -> Result<(), BufferError> {
        let mut open = self.open.lock().await;
        if let Some(buffer) = open.remove(name) {
            buffer.close().await;
        }
        let dir = self.buffer_dir(name);
        tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(log::io_err(&dir, "deleting", e)),
        })
        .await
        .map_err(|e| BufferError::Backend(format!("deleting buffer {name}: {e}")))?
    }

    async fn list(&self) -> Result<Vec<BufferName>, BufferError> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || {
            let mut names = Vec::new();
            for entry in std::fs::read_dir(&dir).map_err(|e| log::io_err(&dir, "listing", e))? {
                let entry = entry.map_err(|e| log::io_err(&dir, "listing", e))?;
                let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
                let file_name = entry.file_name();
                match file_name.to_str().and_then(parse_name) {
                    Some(name) if is_dir => names.push(name),
                    _ => tracing::warn!(
                        path = %entry.path().display(),
                        "skipping an entry of the buffer directory that is not a buffer (expected a directory named project.pipeline.vertex.partition)"
                    ),
                }
            }
            names.sort();
            Ok(names)
        })
        .await
        .map_err(|e| BufferError::Backend(format!("listing buffers in {}: {e}", self.dir.display())))?
    }
}
