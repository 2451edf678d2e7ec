//! The buffers between a pipeline's vertices.
//!
//! Each receiving vertex (and partition) of a pipeline reads from one buffer, like
//! NumaFlow's inter-step buffer. Writers append batches of messages; readers fetch
//! batches, each message leased to them until they acknowledge it, give it back (nack)
//! or let the lease run out, when it is delivered again. Delivery is therefore
//! at-least-once, and every message carries an id chosen by its writer so that the
//! buffer can drop a second write of the same message inside its de-duplication window:
//! a writer that retries after a lost answer does not make a second message.
//!
//! A buffer whose pending count reaches `usage_limit × max_length` refuses appends with
//! [`BufferError::Full`]; writers wait and retry, so nothing is dropped.
//!
//! Two backends implement [`BufferBackend`]: `embedded` (durable files in the
//! controller's data directory; the default) and `nats` (JetStream streams). Everything
//! above this crate sees only the traits, so a pipeline moves between them by config.
//!
//! This crate does no networking of its own besides the NATS client: agents reach the
//! embedded buffers through the controller, which calls these traits for them.

pub mod embedded;
pub use embedded::EmbeddedBackend;

#[cfg(feature = "nats")]
pub mod nats;

pub mod remote;

/// The behavioural suite every backend must pass; for backends' tests, not for use.
#[cfg(any(test, feature = "contract"))]
#[doc(hidden)]
pub mod contract;

use async_trait::async_trait;
use bytes::Bytes;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// A message's identity, chosen by whoever first wrote it: a source derives it from its
/// replica and sequence (or from the id of the record it read), a map from the id of
/// the message it answered and the output's position ([`MessageId::derive`]). Two writes
/// with the same id inside the window are one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(pub u128);

impl MessageId {
    /// The id of the `index`th message produced from the message `parent`; the same
    /// inputs always give the same id, so a map that runs twice on one message writes
    /// the same ids and the second write is dropped as a duplicate.
    pub fn derive(parent: MessageId, index: u32) -> MessageId {
        // SplitMix-style mixing of the parent and the index: cheap, deterministic and
        // well spread, which is all de-duplication needs (ids are not secrets).
        let mut x = parent.0
            ^ (u128::from(index).wrapping_add(1))
                .wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835);
        x ^= x >> 67;
        x = x.wrapping_mul(0xD6E8_FEB8_6659_FD93_2F5A_7D3B_9C1E_4A85);
        x ^= x >> 59;
        MessageId(x)
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// One message in a buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub id: MessageId,
    /// The key a map or source gave it (empty for none); kept for the reader, and the
    /// writer's choice of partition.
    pub key: Bytes,
    /// When the event happened, in milliseconds since the Unix epoch, as the source
    /// said; carried along unchanged.
    pub event_time: i64,
    pub payload: Bytes,
}

/// Identifies one delivery of a message to a reader, for [`Buffer::ack`],
/// [`Buffer::nack`] and [`Buffer::keep_alive`]. Only meaningful to the buffer that
/// gave it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeliveryTag(pub u64);

/// A message leased to a reader.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub tag: DeliveryTag,
    /// How many times this message has been delivered before (0 on the first).
    pub redeliveries: u32,
    pub message: Message,
}

/// What an append did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Appended {
    /// Messages written.
    pub written: usize,
    /// Messages dropped because their id was written inside the de-duplication window.
    pub duplicates: usize,
}

/// A buffer's counts, for back-pressure, the pause's drain check, autoscaling and
/// `drover pipeline status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BufferStats {
    /// Messages written and not yet delivered (or given back and due again).
    pub pending: u64,
    /// Messages delivered and not yet acknowledged.
    pub unacked: u64,
    /// `(pending + unacked) / max_length`: how full the buffer is, 0.0 to 1.0 or a
    /// little over (an append admitted below the limit may overshoot it by its batch).
    pub usage: f64,
    /// Messages acknowledged since the buffer was created.
    pub acked_total: u64,
    /// Messages written since the buffer was created.
    pub written_total: u64,
    /// Writes dropped as duplicates since the buffer was created.
    pub duplicates_total: u64,
}

impl BufferStats {
    /// Whether the buffer holds nothing at all: what a pause waits for.
    pub fn is_drained(&self) -> bool {
        self.pending == 0 && self.unacked == 0
    }
}

/// How a buffer behaves; the pipeline's `buffer:` settings.
#[derive(Clone, Debug, PartialEq)]
pub struct BufferConfig {
    /// The most messages it is meant to hold (pending and unacknowledged).
    pub max_length: u64,
    /// The share of `max_length` at which appends are refused (back-pressure).
    pub usage_limit: f64,
    /// How long a delivered message stays leased to its reader before it is delivered
    /// again, unless acknowledged, given back or kept alive.
    pub lease: Duration,
    /// How long a written id is remembered, to drop a second write of it.
    pub dedup_window: Duration,
    /// The most ids remembered at once, whatever the window: past it the oldest are
    /// forgotten early, so a buffer written very fast keeps a bounded memory (about 64
    /// bytes an id) at the cost of a shorter window. The embedded backend holds to it;
    /// NATS keeps its own bounded window on the server.
    pub dedup_max_ids: usize,
}

/// The default [`BufferConfig::dedup_max_ids`]: two million ids, about 128 MB, covers the
/// default two-minute window up to some 16,000 messages a second, and a retry (which
/// comes within a lease, 30 s) up to some 65,000.
pub const DEFAULT_DEDUP_MAX_IDS: usize = 2_000_000;

impl Default for BufferConfig {
    fn default() -> Self {
        BufferConfig {
            max_length: 30_000,
            usage_limit: 0.8,
            lease: Duration::from_secs(30),
            dedup_window: Duration::from_secs(120),
            dedup_max_ids: DEFAULT_DEDUP_MAX_IDS,
        }
    }
}

impl BufferConfig {
    /// The pending-and-unacknowledged count at which appends are refused.
    pub fn limit(&self) -> u64 {
        // Truncation is the intent: a limit of 24,000.8 messages is 24,000. At least
        // one message always fits, so a tiny buffer still moves data.
        ((self.max_length as f64 * self.usage_limit) as u64).max(1)
    }
}

/// The name of one buffer: unique in a backend. Made of the project, pipeline, vertex
/// and partition, each already checked to be a DNS-like label, joined with `.` (which
/// suits a JetStream stream name as well as a directory name).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BufferName(String);

impl BufferName {
    /// `project.pipeline.vertex.partition`; fails on a part that is empty or holds a
    /// character outside `[a-z0-9-]`.
    pub fn new(
        project: &str,
        pipeline: &str,
        vertex: &str,
        partition: u32,
    ) -> Result<BufferName, BufferError> {
        for (what, part) in [
            ("project", project),
            ("pipeline", pipeline),
            ("vertex", vertex),
        ] {
            let ok = !part.is_empty()
                && part.len() <= 63
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !ok {
                return Err(BufferError::Invalid(format!(
                    "{what} {part:?}: expected 1 to 63 of a-z, 0-9 and -"
                )));
            }
        }
        Ok(BufferName(format!(
            "{project}.{pipeline}.{vertex}.{partition}"
        )))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BufferName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    /// The buffer is at its usage limit: wait and retry the same batch.
    #[error("buffer {name} is full ({pending} of a limit of {limit} messages); retry later")]
    Full {
        name: BufferName,
        pending: u64,
        limit: u64,
    },
    #[error("no buffer {0}")]
    NotFound(BufferName),
    #[error("{0}")]
    Invalid(String),
    /// The backend failed (disk, network); the operation may or may not have happened,
    /// and retrying it is safe (appends are de-duplicated, acks are idempotent).
    #[error("buffer backend: {0}")]
    Backend(String),
}

/// One buffer. Every method may be called concurrently from many tasks.
#[async_trait]
pub trait Buffer: Send + Sync {
    fn name(&self) -> &BufferName;

    /// Writes the batch, dropping messages whose id was written inside the
    /// de-duplication window (and repeats inside the batch). When the buffer is at its
    /// usage limit nothing is written and [`BufferError::Full`] says so. Once this
    /// returns `Ok`, the messages survive a crash of the process holding the buffer.
    async fn append(&self, batch: &[Message]) -> Result<Appended, BufferError>;

    /// Up to `max` messages due for delivery, oldest first, each leased until acked,
    /// given back or its lease ends. Waits up to `wait` for the first message when none
    /// is due, and returns an empty batch if none came.
    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BufferError>;

    /// Marks deliveries done; the messages will not be delivered again. Acking a tag
    /// that is already acked, or whose lease ended and was redelivered, is not an error.
    async fn ack(&self, tags: &[DeliveryTag]) -> Result<(), BufferError>;

    /// Gives deliveries back, to be delivered again after `delay`.
    async fn nack(&self, tags: &[DeliveryTag], delay: Duration) -> Result<(), BufferError>;

    /// Renews the leases of deliveries still being worked on.
    async fn keep_alive(&self, tags: &[DeliveryTag]) -> Result<(), BufferError>;

    async fn stats(&self) -> Result<BufferStats, BufferError>;
}

/// A place buffers live: creates, opens and deletes them by name.
#[async_trait]
pub trait BufferBackend: Send + Sync {
    /// Opens the buffer, creating it if it does not exist; an existing buffer keeps its
    /// messages and takes the new config.
    async fn open(
        &self,
        name: &BufferName,
        config: &BufferConfig,
    ) -> Result<Arc<dyn Buffer>, BufferError>;

    /// Deletes the buffer and its messages; deleting one that does not exist is not an
    /// error.
    async fn delete(&self, name: &BufferName) -> Result<(), BufferError>;

    /// The names of the buffers it holds, for cleaning up after deleted pipelines.
    async fn list(&self) -> Result<Vec<BufferName>, BufferError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        let parent = MessageId(42);
        assert_eq!(MessageId::derive(parent, 0), MessageId::derive(parent, 0));
        let ids: std::collections::HashSet<_> =
            (0..10_000).map(|i| MessageId::derive(parent, i)).collect();
        assert_eq!(ids.len(), 10_000);
        assert_ne!(MessageId::derive(parent, 0), parent);
        assert_ne!(
            MessageId::derive(MessageId(43), 0),
            MessageId::derive(parent, 0)
        );
    }

    #[test]
    fn buffer_names_are_checked_labels() {
        assert_eq!(
            BufferName::new("default", "etl", "map-1", 0)
                .unwrap()
                .as_str(),
            "default.etl.map-1.0"
        );
        for bad in ["", "Upper", "a.b", "a/b", &"x".repeat(64)] {
            assert!(BufferName::new("default", bad, "v", 0).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_limit_is_the_usage_share_of_the_length() {
        assert_eq!(BufferConfig::default().limit(), 24_000);
        let tiny = BufferConfig {
            max_length: 1,
            usage_limit: 0.5,
            ..BufferConfig::default()
        };
        assert_eq!(tiny.limit(), 1);
    }
}
