//! The NATS JetStream backend: one stream per buffer, so a pipeline's buffers can live
//! outside the controller and grow past one machine.
//!
//! Layout, for the buffer `project.pipeline.vertex.partition`:
//! - stream `DROVER_project_pipeline_vertex_partition` (labels hold no `_`, so the name
//!   maps back to the buffer), file storage, work-queue retention (an acknowledged
//!   message is removed), `max_msgs` = `max_length` with discard-new as a hard stop
//!   behind the usage limit, and `duplicate_window` = the de-duplication window;
//! - subject `drover.project.pipeline.vertex.partition`;
//! - one durable pull consumer `drover` with explicit acks, `ack_wait` = the lease and
//!   `max_ack_pending` = `max_length`.
//!
//! Each message's payload is a compact envelope (see [`encode`]) carrying the id, the
//! event time and the key beside the payload, since keys are arbitrary bytes that NATS
//! headers cannot hold. The id also goes in the `Nats-Msg-Id` header, which is what
//! JetStream de-duplicates on.
//!
//! What is approximate: `duplicates_total` counts the duplicates this process saw since
//! it opened the buffer (JetStream keeps no such count); `acked_total` is the stream's
//! last sequence less the messages it still holds, which is exact while nothing but acks
//! removes messages (true here: there is no age limit and a full stream refuses writes
//! instead of dropping old ones). The back-pressure check reads the consumer's counts at
//! most once per [`NatsOptions::counts_cache`] and adjusts them for this process's own
//! appends and acks in between, so writers in other processes can overshoot the limit
//! by what they write in that time; the stream's `max_msgs` stops them at `max_length`.

/// The client this backend is built on, for callers that need the same version (a
/// benchmark's baseline, tests that create foreign streams).
pub use async_nats;

use crate::{
    Appended, Buffer, BufferBackend, BufferConfig, BufferError, BufferName, BufferStats, Delivery,
    DeliveryTag, Message, MessageId,
};
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, AckKind};
use async_nats::{Client, Subject};
use async_trait::async_trait;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use std::collections::{HashMap, HashSet};
use std::fmt::Display;
use std::future::{Future, IntoFuture};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Every Drover stream's name starts with this, so `list` can tell them from others.
const STREAM_PREFIX: &str = "DROVER_";
/// Every buffer's subject starts with this.
const SUBJECT_PREFIX: &str = "drover.";
/// The one durable consumer of each stream.
const CONSUMER: &str = "drover";
/// How long a fetch of what is there now may be held by the server (see `fetch_now`).
const FETCH_NOW_EXPIRY: Duration = Duration::from_millis(20);
/// The envelope's format; a reader refuses any other.
const ENVELOPE_VERSION: u8 = 1;
/// Version, id, event time and key length.
const ENVELOPE_HEADER: usize = 1 + 16 + 8 + 4;

/// How the backend talks to NATS.
#[derive(Clone, Debug)]
pub struct NatsOptions {
    /// Bounds every request to the server (stream and consumer calls, publish acks,
    /// flushes): during an outage an operation fails after this long instead of hanging.
    pub request_timeout: Duration,
    /// Bounds the first connection.
    pub connect_timeout: Duration,
    /// The longest pause between reconnection attempts; they start at 50 ms and double.
    pub max_reconnect_delay: Duration,
    /// How long the consumer's counts are reused by the back-pressure check. Reading
    /// them is a JetStream API call the server answers in JSON; every 20 ms per buffer
    /// and writer it took a measurable share of a busy server's CPU, and the stream's
    /// own `max_msgs` stops any overshoot at `max_length` anyway.
    pub counts_cache: Duration,
    /// The client's name, as the server's monitoring shows it.
    pub client_name: String,
}

impl Default for NatsOptions {
    fn default() -> Self {
        NatsOptions {
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            max_reconnect_delay: Duration::from_secs(2),
            counts_cache: Duration::from_millis(200),
            client_name: "drover".to_string(),
        }
    }
}

/// Buffers kept as JetStream streams on one NATS server or cluster.
#[derive(Clone)]
pub struct NatsBackend {
    client: Client,
    js: jetstream::Context,
    options: NatsOptions,
}

impl NatsBackend {
    /// Connects to the NATS server at `url` (e.g. `nats://127.0.0.1:4222`). The client
    /// reconnects by itself after a loss; operations during an outage fail with
    /// [`BufferError::Backend`] and succeed again once it is back.
    pub async fn connect(url: &str, options: NatsOptions) -> Result<NatsBackend, BufferError> {
        let max_delay = options.max_reconnect_delay;
        let connect = async_nats::ConnectOptions::new()
            .name(&options.client_name)
            .connection_timeout(options.connect_timeout)
            .request_timeout(Some(options.request_timeout))
            .reconnect_delay_callback(move |attempts| reconnect_delay(attempts, max_delay))
            .event_callback(|event| async move {
                tracing::info!(%event, "NATS connection event");
            })
            .connect(url);
        // The connection timeout bounds each attempt; this bounds the whole call, TLS and
        // the server's greeting included.
        let client = bounded(
            options.connect_timeout.saturating_mul(2),
            || format!("connecting to NATS at {url}"),
            connect,
        )
        .await?;
        let js = jetstream::ContextBuilder::new()
            .timeout(options.request_timeout)
            .build(client.clone());
        Ok(NatsBackend {
            client,
            js,
            options,
        })
    }

    async fn request<T, E: Display>(
        &self,
        what: impl FnOnce() -> String,
        fut: impl Future<Output = Result<T, E>>,
    ) -> Result<T, BufferError> {
        bounded(self.options.request_timeout, what, fut).await
    }
}

#[async_trait]
impl BufferBackend for NatsBackend {
    async fn open(
        &self,
        name: &BufferName,
        config: &BufferConfig,
    ) -> Result<Arc<dyn Buffer>, BufferError> {
        check_config(config)?;
        let stream_name = stream_name(name);
        let subject = subject(name);
        // Checked above to fit, so the casts to NATS's signed counts keep their value.
        let max_length = config.max_length as i64;
        let stream_config = jetstream::stream::Config {
            name: stream_name.clone(),
            subjects: vec![subject.clone()],
            retention: RetentionPolicy::WorkQueue,
            storage: StorageType::File,
            max_messages: max_length,
            discard: DiscardPolicy::New,
            duplicate_window: config.dedup_window,
            ..Default::default()
        };
        self.request(
            || format!("creating or updating stream {stream_name}"),
            self.js.create_or_update_stream(stream_config),
        )
        .await?;
        let stream = self
            .request(
                || format!("opening stream {stream_name}"),
                self.js.get_stream_no_info(&stream_name),
            )
            .await?;
        let consumer_config = pull::Config {
            durable_name: Some(CONSUMER.to_string()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: config.lease,
            max_ack_pending: max_length,
            deliver_policy: DeliverPolicy::All,
            filter_subject: subject.clone(),
            ..Default::default()
        };
        let consumer = self
            .request(
                || format!("creating or updating consumer {CONSUMER} of stream {stream_name}"),
                stream.create_consumer(consumer_config),
            )
            .await?;
        Ok(Arc::new(NatsBuffer {
            name: name.clone(),
            stream_name,
            subject: Subject::from(subject),
            config: config.clone(),
            backend: self.clone(),
            stream,
            consumer,
            next_tag: AtomicU64::new(1),
            in_flight: Mutex::new(HashMap::new()),
            // A lease that ended leaves its entry until the next prune, while the same
            // message may already be out again under a new tag: twice the server's cap
            // on unacknowledged messages covers both.
            in_flight_cap: usize::try_from(config.max_length.saturating_mul(2))
                .unwrap_or(usize::MAX),
            counts: Mutex::new(None),
            duplicates: AtomicU64::new(0),
        }))
    }

    async fn delete(&self, name: &BufferName) -> Result<(), BufferError> {
        let stream_name = stream_name(name);
        let deleted = tokio::time::timeout(
            self.options.request_timeout,
            self.js.delete_stream(&stream_name),
        )
        .await
        .map_err(|_| timed_out(format!("deleting stream {stream_name}")))?;
        match deleted {
            Ok(_) => Ok(()),
            Err(err) => match err.kind() {
                GetStreamErrorKind::JetStream(js_err)
                    if js_err.error_code() == ErrorCode::STREAM_NOT_FOUND =>
                {
                    Ok(())
                }
                _ => Err(BufferError::Backend(format!(
                    "deleting stream {stream_name}: {err}"
                ))),
            },
        }
    }

    async fn list(&self) -> Result<Vec<BufferName>, BufferError> {
        let collect = async {
            let mut names = Vec::new();
            let mut streams = self.js.stream_names();
            while let Some(stream) = streams.next().await {
                let stream = stream?;
                if !stream.starts_with(STREAM_PREFIX) {
                    continue;
                }
                match buffer_name_of_stream(&stream) {
                    Some(name) => names.push(name),
                    // Someone else's stream under our prefix: not ours to report.
                    None => tracing::debug!(stream, "ignoring a DROVER_ stream of another shape"),
                }
            }
            names.sort();
            Ok::<_, async_nats::jetstream::context::StreamsError>(names)
        };
        self.request(|| "listing streams".to_string(), collect)
            .await
    }
}

/// One leased delivery: where to send its ack and when its lease ends.
struct InFlight {
    reply: Subject,
    lease_end: Instant,
}

/// The consumer's pending-and-unacknowledged count as last read, adjusted since.
struct Counts {
    occupied: u64,
    read_at: Instant,
}

struct NatsBuffer {
    name: BufferName,
    stream_name: String,
    subject: Subject,
    config: BufferConfig,
    /// The connection, its JetStream context and options, shared with the backend.
    backend: NatsBackend,
    stream: jetstream::stream::Stream<()>,
    consumer: PullConsumer,
    next_tag: AtomicU64,
    /// Deliveries handed out and not yet acked or given back, bounded by
    /// `in_flight_cap`: `fetch` asks for no more than fits.
    in_flight: Mutex<HashMap<DeliveryTag, InFlight>>,
    in_flight_cap: usize,
    counts: Mutex<Option<Counts>>,
    duplicates: AtomicU64,
}

impl NatsBuffer {
    fn in_flight(&self) -> MutexGuard<'_, HashMap<DeliveryTag, InFlight>> {
        // A poisoned lock means a panic while the map was changed; each change is a
        // single insert, remove or retain, so the map is still whole and usable.
        self.in_flight
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn counts(&self) -> MutexGuard<'_, Option<Counts>> {
        // As for `in_flight`: the value is replaced or adjusted in one step.
        self.counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Pending plus unacknowledged, from the consumer at most once per cache period.
    async fn occupied(&self) -> Result<u64, BufferError> {
        if let Some(counts) = self.counts().as_ref()
            && counts.read_at.elapsed() < self.backend.options.counts_cache
        {
            return Ok(counts.occupied);
        }
        let info = self
            .backend
            .request(
                || format!("reading consumer {CONSUMER} of stream {}", self.stream_name),
                self.consumer.get_info(),
            )
            .await?;
        let occupied = info.num_pending + info.num_ack_pending as u64;
        *self.counts() = Some(Counts {
            occupied,
            read_at: Instant::now(),
        });
        Ok(occupied)
    }

    fn adjust_counts(&self, added: u64, removed: u64) {
        if let Some(counts) = self.counts().as_mut() {
            counts.occupied = counts
                .occupied
                .saturating_add(added)
                .saturating_sub(removed);
        }
    }

    /// Sends `kind` for each known tag, makes sure it reached the server, then forgets
    /// the tags (or renews their leases). Unknown tags (acked already, or long expired)
    /// are skipped: acks are idempotent.
    async fn settle(&self, tags: &[DeliveryTag], kind: AckKind) -> Result<usize, BufferError> {
        let replies: Vec<Subject> = {
            let in_flight = self.in_flight();
            tags.iter()
                .filter_map(|tag| in_flight.get(tag).map(|d| d.reply.clone()))
                .collect()
        };
        if replies.is_empty() {
            return Ok(0);
        }
        let send = async {
            for reply in &replies {
                self.backend
                    .client
                    .publish(reply.clone(), kind.into())
                    .await?;
            }
            // Publishing only queues the acks; the flush returns once they are written
            // to the server, so a success here means the server has them.
            self.backend.client.flush().await?;
            Ok::<_, async_nats::Error>(())
        };
        self.backend
            .request(
                || {
                    format!(
                        "sending {} {kind:?} for stream {}",
                        replies.len(),
                        self.stream_name
                    )
                },
                send,
            )
            .await?;
        // Only now are the tags forgotten, so a failed call can be retried with them.
        let mut in_flight = self.in_flight();
        if matches!(kind, AckKind::Progress) {
            let lease_end = Instant::now() + self.config.lease;
            for tag in tags {
                if let Some(d) = in_flight.get_mut(tag) {
                    d.lease_end = lease_end;
                }
            }
        } else {
            for tag in tags {
                in_flight.remove(tag);
            }
        }
        Ok(replies.len())
    }

    /// Up to `max` messages that are there now, without waiting.
    async fn fetch_now(&self, max: usize) -> Result<Vec<jetstream::Message>, BufferError> {
        let collect = async {
            // Without an expiry the server holds a no-wait request open once the
            // consumer reaches max_ack_pending, and fills it with redeliveries when
            // leases end; the expiry ends it instead (408, which ends the batch).
            let mut batch = self
                .consumer
                .fetch()
                .max_messages(max)
                .expires(FETCH_NOW_EXPIRY)
                .messages()
                .await?;
            let mut messages = Vec::new();
            while let Some(message) = batch.next().await {
                match message {
                    Ok(message) => messages.push(message),
                    // 409: the consumer has as many unacknowledged messages as it
                    // allows; what came so far is the batch.
                    Err(err) if err.to_string().contains("409") => break,
                    Err(err) => return Err(err),
                }
            }
            Ok::<_, async_nats::Error>(messages)
        };
        self.backend
            .request(
                || format!("fetching from stream {}", self.stream_name),
                collect,
            )
            .await
    }

    /// Waits up to `wait` for one message.
    async fn fetch_one(&self, wait: Duration) -> Result<Vec<jetstream::Message>, BufferError> {
        let collect = async {
            let mut batch = self
                .consumer
                .batch()
                .max_messages(1)
                .expires(wait)
                .messages()
                .await?;
            match batch.next().await {
                Some(Ok(message)) => Ok(vec![message]),
                Some(Err(err)) if err.to_string().contains("409") => Ok(Vec::new()),
                Some(Err(err)) => Err(err),
                None => Ok(Vec::new()),
            }
        };
        bounded(
            wait + self.backend.options.request_timeout,
            || format!("waiting for a message in stream {}", self.stream_name),
            collect,
        )
        .await
    }

    /// Turns a JetStream message into a delivery and remembers its reply subject; a
    /// message that is not a Drover envelope is terminated (never delivered again) and
    /// skipped, since no reader could make sense of it.
    async fn deliver(&self, message: jetstream::Message) -> Option<Delivery> {
        let delivered = match message.info() {
            Ok(info) => info.delivered,
            Err(err) => {
                tracing::warn!(stream = %self.stream_name, %err, "a message without JetStream delivery info; skipping it");
                return None;
            }
        };
        // Into the plain message, which keeps the reply subject (`split` would move it
        // into an acker).
        let message = async_nats::Message::from(message);
        let Some(reply) = message.reply else {
            tracing::warn!(stream = %self.stream_name, "a message without a reply subject; skipping it");
            return None;
        };
        match decode(message.payload) {
            Ok(decoded) => {
                let tag = DeliveryTag(self.next_tag.fetch_add(1, Ordering::Relaxed));
                self.in_flight().insert(
                    tag,
                    InFlight {
                        reply,
                        lease_end: Instant::now() + self.config.lease,
                    },
                );
                Some(Delivery {
                    tag,
                    redeliveries: u32::try_from(delivered.saturating_sub(1)).unwrap_or(u32::MAX),
                    message: decoded,
                })
            }
            Err(err) => {
                tracing::warn!(stream = %self.stream_name, %err, "dropping a message that is not a Drover envelope");
                if let Err(err) = self
                    .backend
                    .client
                    .publish(reply, AckKind::Term.into())
                    .await
                {
                    tracing::warn!(stream = %self.stream_name, %err, "terminating the undecodable message failed; it will come back after its lease");
                }
                None
            }
        }
    }

    /// Forgets deliveries whose lease ended more than a lease ago: the server has handed
    /// them out again by then, and an ack for them would be a no-op anyway. The grace
    /// lets a reader that is a little late still ack its delivery.
    fn prune(&self) -> usize {
        let now = Instant::now();
        let lease = self.config.lease;
        let mut in_flight = self.in_flight();
        in_flight.retain(|_, d| d.lease_end + lease > now);
        self.in_flight_cap.saturating_sub(in_flight.len())
    }
}

#[async_trait]
impl Buffer for NatsBuffer {
    fn name(&self) -> &BufferName {
        &self.name
    }

    async fn append(&self, batch: &[Message]) -> Result<Appended, BufferError> {
        if batch.is_empty() {
            return Ok(Appended::default());
        }
        let limit = self.config.limit();
        let occupied = self.occupied().await?;
        if occupied >= limit {
            return Err(self.full(occupied));
        }
        // Repeats inside the batch are dropped here, which saves their round trip; the
        // server drops repeats of earlier batches by their Nats-Msg-Id.
        let mut seen = HashSet::with_capacity(batch.len());
        let mut appended = Appended::default();
        let publish_all = async {
            let mut acks = Vec::with_capacity(batch.len());
            for message in batch {
                if !seen.insert(message.id) {
                    appended.duplicates += 1;
                    continue;
                }
                let publish = PublishMessage::build()
                    .payload(encode(message))
                    .message_id(message.id.to_string());
                acks.push(
                    self.backend
                        .js
                        .send_publish(self.subject.clone(), publish)
                        .await?,
                );
            }
            Ok::<_, async_nats::jetstream::context::PublishError>(acks)
        };
        // Every publish goes out before any ack is awaited: one round trip per batch.
        let acks = self
            .backend
            .request(
                || format!("publishing to stream {}", self.stream_name),
                publish_all,
            )
            .await?;
        let mut first_error = None;
        let mut refused_full = false;
        // One deadline for the batch's acks: each future's own timeout starts when it is
        // awaited, so during an outage they would add up.
        let deadline = tokio::time::Instant::now() + self.backend.options.request_timeout;
        for ack in acks {
            let Ok(ack) = tokio::time::timeout_at(deadline, ack.into_future()).await else {
                first_error.get_or_insert_with(|| {
                    format!(
                        "no ack within {:?}; is the NATS server reachable?",
                        self.backend.options.request_timeout
                    )
                });
                continue;
            };
            match ack {
                Ok(ack) if ack.duplicate => appended.duplicates += 1,
                Ok(_) => appended.written += 1,
                Err(err) => {
                    let text = err.to_string();
                    // The stream's max_msgs with discard-new: the hard stop behind the
                    // usage limit, refused like the limit itself.
                    if text.contains("maximum messages") {
                        refused_full = true;
                    } else if first_error.is_none() {
                        first_error = Some(text);
                    }
                }
            }
        }
        self.adjust_counts(appended.written as u64, 0);
        self.duplicates
            .fetch_add(appended.duplicates as u64, Ordering::Relaxed);
        // A refused or failed part leaves the written part in place; the writer retries
        // the whole batch and the written part comes back as duplicates.
        if let Some(err) = first_error {
            return Err(BufferError::Backend(format!(
                "publishing to stream {}: {err}",
                self.stream_name
            )));
        }
        if refused_full {
            return Err(self.full(self.config.max_length));
        }
        Ok(appended)
    }

    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BufferError> {
        let room = self.prune();
        let max = max.min(room);
        if max == 0 {
            // Nothing to ask for, or every slot is leased out: wait as asked, so a reader
            // looping on fetch does not spin.
            tokio::time::sleep(wait).await;
            return Ok(Vec::new());
        }
        let mut messages = self.fetch_now(max).await?;
        if messages.is_empty() && !wait.is_zero() {
            // A pull request for the whole batch would be held until all of it came or
            // `wait` ran out; asking for one and then for what is there returns as soon
            // as anything arrives.
            messages = self.fetch_one(wait).await?;
            if !messages.is_empty() && max > 1 {
                messages.extend(self.fetch_now(max - 1).await?);
            }
        }
        let mut deliveries = Vec::with_capacity(messages.len());
        for message in messages {
            if let Some(delivery) = self.deliver(message).await {
                deliveries.push(delivery);
            }
        }
        Ok(deliveries)
    }

    async fn ack(&self, tags: &[DeliveryTag]) -> Result<(), BufferError> {
        let acked = self.settle(tags, AckKind::Ack).await?;
        self.adjust_counts(0, acked as u64);
        Ok(())
    }

    async fn nack(&self, tags: &[DeliveryTag], delay: Duration) -> Result<(), BufferError> {
        let delay = (!delay.is_zero()).then_some(delay);
        self.settle(tags, AckKind::Nak(delay)).await.map(|_| ())
    }

    async fn keep_alive(&self, tags: &[DeliveryTag]) -> Result<(), BufferError> {
        self.settle(tags, AckKind::Progress).await.map(|_| ())
    }

    async fn stats(&self) -> Result<BufferStats, BufferError> {
        let (consumer, stream) = tokio::join!(
            self.backend.request(
                || format!("reading consumer {CONSUMER} of stream {}", self.stream_name),
                self.consumer.get_info(),
            ),
            self.backend.request(
                || format!("reading stream {}", self.stream_name),
                self.stream.get_info(),
            ),
        );
        let (consumer, stream) = (consumer?, stream?);
        let pending = consumer.num_pending;
        let unacked = consumer.num_ack_pending as u64;
        let written_total = stream.state.last_sequence;
        Ok(BufferStats {
            pending,
            unacked,
            usage: (pending + unacked) as f64 / self.config.max_length as f64,
            acked_total: written_total.saturating_sub(stream.state.messages),
            written_total,
            duplicates_total: self.duplicates.load(Ordering::Relaxed),
        })
    }
}

impl NatsBuffer {
    fn full(&self, pending: u64) -> BufferError {
        BufferError::Full {
            name: self.name.clone(),
            pending,
            limit: self.config.limit(),
        }
    }
}

/// Runs `fut` for at most `limit`, mapping both its error and the timeout to
/// [`BufferError::Backend`] with `what` it was doing.
async fn bounded<T, E: Display>(
    limit: Duration,
    what: impl FnOnce() -> String,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, BufferError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(BufferError::Backend(format!("{}: {err}", what()))),
        Err(_) => Err(timed_out(format!("{} (after {limit:?})", what()))),
    }
}

fn timed_out(what: String) -> BufferError {
    BufferError::Backend(format!("{what}: timed out; is the NATS server reachable?"))
}

/// 50 ms, doubling with each failed attempt, up to `max`.
fn reconnect_delay(attempts: usize, max: Duration) -> Duration {
    let shift = u32::try_from(attempts.min(16)).unwrap_or(16);
    Duration::from_millis(50u64 << shift).min(max)
}

fn check_config(config: &BufferConfig) -> Result<(), BufferError> {
    if config.max_length == 0 || config.max_length > i64::MAX as u64 {
        return Err(BufferError::Invalid(format!(
            "buffer max_length {}: expected 1 to {}",
            config.max_length,
            i64::MAX
        )));
    }
    if !(config.usage_limit > 0.0 && config.usage_limit <= 1.0) {
        return Err(BufferError::Invalid(format!(
            "buffer usage_limit {}: expected more than 0 and at most 1",
            config.usage_limit
        )));
    }
    for (field, value) in [
        ("lease", config.lease),
        ("dedup_window", config.dedup_window),
    ] {
        if value < Duration::from_millis(1) {
            return Err(BufferError::Invalid(format!(
                "buffer {field} {value:?}: expected at least 1ms"
            )));
        }
    }
    Ok(())
}

fn stream_name(name: &BufferName) -> String {
    format!("{STREAM_PREFIX}{}", name.as_str().replace('.', "_"))
}

fn subject(name: &BufferName) -> String {
    format!("{SUBJECT_PREFIX}{}", name.as_str())
}

/// The buffer a `DROVER_` stream holds, if its name has the shape [`stream_name`] gives.
fn buffer_name_of_stream(stream: &str) -> Option<BufferName> {
    let rest = stream.strip_prefix(STREAM_PREFIX)?;
    let parts: Vec<&str> = rest.split('_').collect();
    let [project, pipeline, vertex, partition] = parts.as_slice() else {
        return None;
    };
    // u32's parser takes a leading `+`, which `stream_name` never writes.
    if !partition.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let name = BufferName::new(project, pipeline, vertex, partition.parse().ok()?).ok()?;
    (stream_name(&name) == stream).then_some(name)
}

/// The payload as stored: version (1 byte), id (16, big-endian), event time (8,
/// big-endian), key length (4, big-endian), key, then the message's payload.
fn encode(message: &Message) -> Bytes {
    let mut out =
        BytesMut::with_capacity(ENVELOPE_HEADER + message.key.len() + message.payload.len());
    out.put_u8(ENVELOPE_VERSION);
    out.put_u128(message.id.0);
    out.put_i64(message.event_time);
    // Keys come from user code; one past u32::MAX bytes would not fit any NATS message
    // (whose default maximum is 1 MiB), so the publish fails on size before this matters.
    out.put_u32(u32::try_from(message.key.len()).unwrap_or(u32::MAX));
    out.put_slice(&message.key);
    out.put_slice(&message.payload);
    out.freeze()
}

/// Reads an envelope written by [`encode`]; the key and payload share `payload`'s
/// memory.
fn decode(mut payload: Bytes) -> Result<Message, String> {
    if payload.len() < ENVELOPE_HEADER {
        return Err(format!(
            "envelope of {} bytes: expected at least {ENVELOPE_HEADER}",
            payload.len()
        ));
    }
    let version = payload.get_u8();
    if version != ENVELOPE_VERSION {
        return Err(format!(
            "envelope version {version}: expected {ENVELOPE_VERSION}"
        ));
    }
    let id = MessageId(payload.get_u128());
    let event_time = payload.get_i64();
    let key_len = payload.get_u32() as usize;
    if key_len > payload.len() {
        return Err(format!(
            "envelope key length {key_len}: expected at most the {} bytes left",
            payload.len()
        ));
    }
    let key = payload.split_to(key_len);
    Ok(Message {
        id,
        key,
        event_time,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(key: &'static [u8], payload: &'static [u8]) -> Message {
        Message {
            id: MessageId(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210),
            key: Bytes::from_static(key),
            event_time: -1_700_000_000_123,
            payload: Bytes::from_static(payload),
        }
    }

    #[test]
    fn envelopes_round_trip() {
        for (key, payload) in [
            (&b""[..], &b""[..]),
            (b"k", b""),
            (b"", b"payload"),
            (b"\0\xff binary key", b"\x00\x01\x02"),
        ] {
            let original = message(key, payload);
            let encoded = encode(&original);
            assert_eq!(encoded.len(), ENVELOPE_HEADER + key.len() + payload.len());
            assert_eq!(decode(encoded).unwrap(), original);
        }
    }

    #[test]
    fn damaged_envelopes_are_refused() {
        let good = encode(&message(b"key", b"payload"));
        let mut wrong_version = good.to_vec();
        wrong_version[0] = 2;
        let mut long_key = good.to_vec();
        long_key[25..29].copy_from_slice(&1000u32.to_be_bytes());
        for (bytes, expected) in [
            (Vec::new(), "expected at least 29"),
            (good[..ENVELOPE_HEADER - 1].to_vec(), "expected at least 29"),
            (wrong_version, "version 2"),
            (long_key, "key length 1000"),
        ] {
            let err = decode(Bytes::from(bytes)).unwrap_err();
            assert!(err.contains(expected), "{err}");
        }
    }

    #[test]
    fn stream_names_map_back_to_buffers() {
        let name = BufferName::new("default", "etl", "map-1", 7).unwrap();
        assert_eq!(stream_name(&name), "DROVER_default_etl_map-1_7");
        assert_eq!(subject(&name), "drover.default.etl.map-1.7");
        assert_eq!(buffer_name_of_stream(&stream_name(&name)), Some(name));
        for other in [
            "KV_bucket",
            "DROVER_",
            "DROVER_a_b_c",
            "DROVER_a_b_c_d",
            "DROVER_a_b_c_+1",
            "DROVER_a_b_c_01",
            "DROVER_a_b_c_1_2",
            "DROVER_A_b_c_1",
        ] {
            assert_eq!(buffer_name_of_stream(other), None, "{other}");
        }
    }

    #[test]
    fn configs_are_checked_by_field() {
        let good = BufferConfig::default();
        assert!(check_config(&good).is_ok());
        for (config, field) in [
            (
                BufferConfig {
                    max_length: 0,
                    ..good.clone()
                },
                "max_length",
            ),
            (
                BufferConfig {
                    usage_limit: 0.0,
                    ..good.clone()
                },
                "usage_limit",
            ),
            (
                BufferConfig {
                    usage_limit: f64::NAN,
                    ..good.clone()
                },
                "usage_limit",
            ),
            (
                BufferConfig {
                    lease: Duration::ZERO,
                    ..good.clone()
                },
                "lease",
            ),
            (
                BufferConfig {
                    dedup_window: Duration::from_micros(10),
                    ..good.clone()
                },
                "dedup_window",
            ),
        ] {
            let err = check_config(&config).unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
    }

    #[test]
    fn reconnect_delays_double_up_to_the_cap() {
        let max = Duration::from_secs(2);
        let delays: Vec<u64> = [0, 1, 2, 5, 6, 100]
            .into_iter()
            .map(|attempt| reconnect_delay(attempt, max).as_millis() as u64)
            .collect();
        assert_eq!(delays, [50, 100, 200, 1600, 2000, 2000]);
    }
}
