//! The agent's side of the pipeline data protocol (docs/data-protocol.md): for one
//! connection of a vertex replica's program, it moves messages between the pipeline's
//! buffers and the program.
//!
//! - A **map** replica: fetch a batch from the vertex's input buffer, send it to the
//!   program, write the program's outputs to the buffers of the outgoing edges their
//!   tags choose, then acknowledge the input.
//! - A **sink** replica: fetch a batch, send it, acknowledge what the program wrote
//!   and give back (nack) what it failed to write.
//! - A **source** replica: ask the program to read a batch, write it downstream, then
//!   tell the program the batch is durable so it may commit its own offsets.
//!
//! Delivery is at-least-once: an input is acknowledged only after everything made
//! from it has been written downstream. Every write carries an id derived from the
//! input's id (a map's outputs) or from the source's own id for the record, so a batch
//! written twice (after a crash between the write and the ack) is de-duplicated by the
//! buffer rather than doubled.
//!
//! Several batches are outstanding at once (`window`) so that the program, the buffer
//! reads and the buffer writes overlap. The program answers in order; each answer is
//! handed to a completion stage that writes it downstream and acknowledges its input
//! while the next answers are read, so one batch's buffer round trips do not hold up
//! the next. A batch's place in the window comes back only once it is complete, so
//! the window bounds everything the replica holds. Sources' batches are acknowledged
//! to the program in the order it read them.

use bytes::Bytes;
use drover_buffer::{Buffer, BufferError, Delivery, DeliveryTag, Message, MessageId};
use drover_core::pipeline::spec::TagCondition;
use drover_pipeline::proto::{self, Frame, InMessage, Outstanding, Role};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;

/// An outgoing edge: which messages it takes, and the buffers of the receiving
/// vertex's partitions.
#[derive(Clone)]
pub struct Route {
    /// The edge's condition on the tags the map gave a message; an edge without one
    /// takes every message.
    pub condition: Option<TagCondition>,
    pub partitions: Vec<Arc<dyn Buffer>>,
}

/// How a replica's data plane behaves.
#[derive(Clone, Debug)]
pub struct PlaneConfig {
    /// The most messages in one request to the program.
    pub max_batch: u32,
    /// How many requests may await the program's answer at once.
    pub window: usize,
    /// How long the program may take to answer a request before its replica fails.
    pub answer_timeout: Duration,
    /// How long one fetch from the input buffer waits for messages.
    pub fetch_wait: Duration,
    /// How long a write downstream may keep failing (the buffer unreachable; a full
    /// buffer is waited on without limit, since that is back-pressure) before the
    /// replica fails.
    pub write_deadline: Duration,
    /// How long a message a sink failed to write waits before it is delivered again.
    pub retry_delay: Duration,
    /// How often the leases of messages held by the program are renewed.
    pub keep_alive_every: Duration,
}

impl Default for PlaneConfig {
    fn default() -> Self {
        PlaneConfig {
            max_batch: proto::DEFAULT_MAX_BATCH,
            window: 4,
            answer_timeout: Duration::from_secs(30),
            fetch_wait: Duration::from_millis(200),
            write_deadline: Duration::from_secs(60),
            retry_delay: Duration::from_secs(1),
            keep_alive_every: Duration::from_secs(5),
        }
    }
}

/// Counts a replica's traffic, for rates and autoscaling.
#[derive(Debug, Default)]
pub struct PlaneCounters {
    /// Messages handed to the program (maps and sinks) or read from it (sources).
    pub read: AtomicU64,
    /// Messages written downstream.
    pub written: AtomicU64,
    /// Input messages acknowledged.
    pub acked: AtomicU64,
    /// Writes downstream refused because the buffer was full.
    pub backpressured: AtomicU64,
}

/// One vertex replica's place in its pipeline: where it reads and where it writes.
pub struct Plane {
    /// The vertex's input buffer (maps and sinks; a source has none).
    pub input: Option<Arc<dyn Buffer>>,
    /// Its outgoing edges (sources and maps; a sink has none).
    pub routes: Vec<Route>,
    /// A stable identity of the vertex (`project/pipeline/vertex`), mixed into the ids
    /// of what its sources read, so that the same record read twice gets the same id
    /// while the same offset in two sources does not.
    pub identity: String,
    pub config: PlaneConfig,
    pub counters: Arc<PlaneCounters>,
}

/// Why a replica's data plane stopped.
#[derive(Debug, thiserror::Error)]
pub enum PlaneError {
    #[error("the program said it cannot go on: {0}")]
    Program(String),
    #[error("the program broke the data protocol: {0}")]
    Protocol(#[from] proto::ProtoError),
    #[error("the program did not answer batch {batch} within {timeout:?}")]
    Timeout { batch: u64, timeout: Duration },
    #[error("the connection to the program failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("writing downstream: {0}")]
    Buffer(#[from] BufferError),
    #[error("the program connected as a {got}, but this vertex is a {want}")]
    WrongRole { got: Role, want: Role },
    #[error("this vertex has no input buffer, which a {0} needs")]
    NoInput(Role),
}

/// Runs a buffer call again while it fails with a backend error (the buffer's holder
/// out of reach for a moment, as while the agent reconnects to its controller) until
/// `deadline` has passed; other errors, and the last one, are returned. Fetches and
/// acks are safe to repeat: a lost fetch's leases lapse and an ack is idempotent.
async fn retrying<T, F, Fut>(deadline: Duration, mut call: F) -> Result<T, BufferError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, BufferError>>,
{
    let started = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(5);
    loop {
        match call().await {
            Err(BufferError::Backend(e)) if started.elapsed() < deadline => {
                tracing::debug!("a buffer call failed, will retry: {e}");
            }
            other => return other,
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}

/// What is left to do for a request the program has answered.
enum Completion {
    /// Write a map's outputs downstream, then acknowledge its inputs.
    Map {
        out: Vec<(Message, Vec<String>)>,
        inputs: Vec<DeliveryTag>,
    },
    /// Acknowledge what a sink wrote; give back what it failed to write.
    Sink {
        done: Vec<DeliveryTag>,
        failed: Vec<DeliveryTag>,
    },
    /// Write what a source read downstream, then tell the source it is durable.
    Read {
        batch: u64,
        out: Vec<(Message, Vec<String>)>,
    },
}

/// A request sent to the program and what it needs when its answer comes.
enum Pending {
    /// Deliveries from the input buffer, in the order they were sent.
    Input(Vec<Delivery>),
    /// A source read.
    Read,
}

/// Serves one data connection of a replica whose program announced `role`, after the
/// handshake, until the program closes it (Ok), something fails (the messages it held
/// are given back for redelivery) or `stop` is cancelled.
pub async fn serve<S>(
    plane: &Plane,
    role: Role,
    want: Role,
    stream: S,
    stop: &CancellationToken,
) -> Result<(), PlaneError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    if role != want {
        return Err(PlaneError::WrongRole { got: role, want });
    }
    if role != Role::Source && plane.input.is_none() {
        return Err(PlaneError::NoInput(role));
    }
    let (read, write) = tokio::io::split(stream);
    let (frames, writer) = frame_writer(write);
    let window = plane.config.window.max(1);
    let session = Session {
        plane,
        role,
        frames,
        outstanding: Mutex::new(Outstanding::new(window * 2 + 2)),
        pending: Mutex::new(VecDeque::new()),
        completing: std::sync::Mutex::new(HashMap::new()),
        slots: tokio::sync::Semaphore::new(window),
        next_batch: AtomicU64::new(1),
        source_seq: AtomicU64::new(0),
        nonce: rand::random(),
    };
    // The window bounds the batches between request and completion, so the queue
    // between the answers and the completion stage never fills beyond it.
    let (complete, completions) = mpsc::channel(window);
    // When the program closes its connection the answers loop ends and drops its end
    // of the queue; the completion stage finishes what was answered, then ends too.
    let answered = async {
        tokio::try_join!(
            session.answers(read, complete, stop),
            session.completer(completions, stop)
        )
        .map(|_| ())
    };
    let result = tokio::select! {
        r = session.requests(stop) => r,
        r = answered => r,
        r = writer => match r {
            Ok(r) => r,
            Err(e) => Err(PlaneError::Io(std::io::Error::other(format!("the writer stopped: {e}")))),
        },
    };
    session.give_back().await;
    result
}

/// The writing half of the connection, owned by one task that the request and answer
/// loops hand encoded frames to; a bounded queue, so neither loop runs ahead of the
/// socket.
fn frame_writer<W>(
    mut write: W,
) -> (
    mpsc::Sender<Vec<u8>>,
    tokio::task::JoinHandle<Result<(), PlaneError>>,
)
where
    W: AsyncWrite + Send + Unpin + 'static,
{
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(8);
    let task = tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            write.write_all(&frame).await?;
        }
        Ok(())
    });
    (tx, task)
}

struct Session<'a> {
    plane: &'a Plane,
    role: Role,
    frames: mpsc::Sender<Vec<u8>>,
    outstanding: Mutex<Outstanding>,
    /// Requests awaiting an answer, oldest first, with when each was sent and what its
    /// answer needs.
    pending: Mutex<VecDeque<(u64, tokio::time::Instant, Pending)>>,
    /// The input messages of answered batches not yet acknowledged, by batch: their
    /// leases are renewed and, if the session ends first, they are given back.
    completing: std::sync::Mutex<HashMap<u64, Vec<DeliveryTag>>>,
    /// One permit per request that may be outstanding.
    slots: tokio::sync::Semaphore,
    next_batch: AtomicU64,
    /// Numbers the messages a source reads without an id of its own.
    source_seq: AtomicU64,
    /// This connection's random part of those messages' ids.
    nonce: u64,
}

impl Session<'_> {
    /// Sends requests while the window has room: batches fetched from the input
    /// buffer for maps and sinks, reads for sources.
    async fn requests(&self, stop: &CancellationToken) -> Result<(), PlaneError> {
        let cfg = &self.plane.config;
        loop {
            let permit = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                p = self.slots.acquire() => p,
            };
            // The semaphore is never closed, so acquiring fails only if it were.
            let Ok(permit) = permit else { return Ok(()) };
            let batch = self.next_batch.fetch_add(1, Ordering::Relaxed);
            let (frame, pending) = match self.role {
                Role::Source => (
                    Frame::ReadRequest {
                        batch,
                        max: cfg.max_batch,
                        wait_ms: u32::try_from(cfg.fetch_wait.as_millis()).unwrap_or(u32::MAX),
                    },
                    Pending::Read,
                ),
                Role::Map | Role::Sink => {
                    let Some(input) = &self.plane.input else {
                        return Err(PlaneError::NoInput(self.role));
                    };
                    let deliveries = tokio::select! {
                        _ = stop.cancelled() => return Ok(()),
                        d = retrying(cfg.write_deadline, || input.fetch(cfg.max_batch as usize, cfg.fetch_wait)) => d?,
                    };
                    if deliveries.is_empty() {
                        continue;
                    }
                    let messages = deliveries.iter().map(to_wire).collect();
                    let frame = if self.role == Role::Map {
                        Frame::MapRequest { batch, messages }
                    } else {
                        Frame::SinkRequest { batch, messages }
                    };
                    self.plane
                        .counters
                        .read
                        .fetch_add(deliveries.len() as u64, Ordering::Relaxed);
                    (frame, Pending::Input(deliveries))
                }
            };
            self.send(&frame, Some((batch, pending))).await?;
            // The permit comes back when the answer has been dealt with.
            permit.forget();
        }
    }

    async fn send(&self, frame: &Frame, pending: Option<(u64, Pending)>) -> Result<(), PlaneError> {
        let mut bytes = Vec::new();
        proto::encode(frame, &mut bytes)?;
        self.outstanding.lock().await.sent(frame)?;
        if let Some((batch, p)) = pending {
            let now = tokio::time::Instant::now();
            self.pending.lock().await.push_back((batch, now, p));
        }
        if self.frames.send(bytes).await.is_err() {
            return Err(PlaneError::Io(std::io::Error::other(
                "the connection's writer has stopped",
            )));
        }
        Ok(())
    }

    /// Reads the program's answers and deals with each: writes downstream, acks, and
    /// frees its place in the window.
    async fn answers<R>(
        &self,
        mut read: R,
        complete: mpsc::Sender<(u64, Completion)>,
        stop: &CancellationToken,
    ) -> Result<(), PlaneError>
    where
        R: AsyncRead + Unpin,
    {
        let cfg = &self.plane.config;
        let mut buf: Vec<u8> = Vec::with_capacity(64 << 10);
        let mut keep_alive = tokio::time::interval(cfg.keep_alive_every);
        keep_alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // A whole frame may already be in the buffer from an earlier read.
            if let Some((frame, used)) = proto::decode(&buf)? {
                buf.drain(..used);
                self.answer(frame, &complete).await?;
                continue;
            }
            // The oldest request must be answered within the timeout of when it was
            // sent, however much else (reads, lease renewals) happens meanwhile.
            let oldest = self
                .pending
                .lock()
                .await
                .front()
                .map(|(b, at, _)| (*b, *at));
            let deadline = async {
                match oldest {
                    Some((_, at)) => tokio::time::sleep_until(at + cfg.answer_timeout).await,
                    None => std::future::pending().await,
                }
            };
            let mut chunk = [0u8; 64 << 10];
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = keep_alive.tick() => self.keep_alive().await,
                () = deadline => {
                    return Err(PlaneError::Timeout {
                        batch: oldest.map_or(0, |(b, _)| b),
                        timeout: cfg.answer_timeout,
                    });
                }
                n = read.read(&mut chunk) => {
                    let n = n?;
                    if n == 0 {
                        // The program closed the connection: it is done (or gone, and
                        // its task's exit says why).
                        return Ok(());
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
            }
        }
    }

    /// Renews the leases of the messages the program holds, so a slow batch is not
    /// delivered to another replica meanwhile.
    async fn keep_alive(&self) {
        let Some(input) = &self.plane.input else {
            return;
        };
        let mut tags = held(self.pending.lock().await.iter());
        tags.extend(self.completing().values().flatten().copied());
        if tags.is_empty() {
            return;
        }
        if let Err(e) = input.keep_alive(&tags).await {
            // The lease may lapse and the messages go to another replica as well; the
            // outputs' ids make that a duplicate the buffers drop, not a loss.
            tracing::warn!(buffer = %input.name(), "renewing leases: {e}");
        }
    }

    fn completing(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Vec<DeliveryTag>>> {
        // Every operation is one insert, remove or read, so a poisoned map is whole.
        self.completing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks one answer against the oldest request and hands what is left to do to
    /// the completion stage.
    async fn answer(
        &self,
        frame: Frame,
        complete: &mpsc::Sender<(u64, Completion)>,
    ) -> Result<(), PlaneError> {
        if let Frame::Error { message } = frame {
            return Err(PlaneError::Program(message));
        }
        self.outstanding.lock().await.received(&frame)?;
        if let Frame::AckResponse { .. } = frame {
            return Ok(());
        }
        // Checked against the outstanding requests above, so it answers one of them;
        // the program answers in order, so it is the oldest.
        let Some((batch, _, pending)) = self.pending.lock().await.pop_front() else {
            return Err(proto::ProtoError::Handshake(format!(
                "an answer to batch {:?} that was not asked for",
                frame.batch()
            ))
            .into());
        };
        if frame.batch() != Some(batch) {
            return Err(PlaneError::Program(format!(
                "answered batch {:?} before batch {batch}; answers must come in the order of the requests",
                frame.batch()
            )));
        }
        let completion = match (frame, pending) {
            (Frame::MapResponse { results, .. }, Pending::Input(inputs)) => {
                let mut out = Vec::new();
                for (input, outputs) in inputs.iter().zip(results) {
                    for (i, o) in outputs.into_iter().enumerate() {
                        let id = MessageId::derive(input.message.id, i as u32);
                        let message = Message {
                            id,
                            key: Bytes::from(o.key),
                            event_time: input.message.event_time,
                            payload: Bytes::from(o.payload),
                        };
                        out.push((message, o.tags));
                    }
                }
                let inputs: Vec<DeliveryTag> = inputs.iter().map(|d| d.tag).collect();
                self.completing().insert(batch, inputs.clone());
                Completion::Map { out, inputs }
            }
            (Frame::SinkResponse { statuses, .. }, Pending::Input(inputs)) => {
                let (mut done, mut failed) = (Vec::new(), Vec::new());
                for (d, status) in inputs.iter().zip(statuses) {
                    match status {
                        Ok(()) => done.push(d.tag),
                        Err(why) => {
                            tracing::debug!(id = %d.message.id, "the sink failed a message: {why}");
                            failed.push(d.tag);
                        }
                    }
                }
                self.completing()
                    .insert(batch, inputs.iter().map(|d| d.tag).collect());
                Completion::Sink { done, failed }
            }
            (Frame::ReadResponse { batch, messages }, Pending::Read) => {
                self.plane
                    .counters
                    .read
                    .fetch_add(messages.len() as u64, Ordering::Relaxed);
                let out: Vec<(Message, Vec<String>)> = messages
                    .into_iter()
                    .map(|m| {
                        let id = self.source_id(&m.id);
                        let message = Message {
                            id,
                            key: Bytes::from(m.key),
                            event_time: m.event_time,
                            payload: Bytes::from(m.payload),
                        };
                        (message, Vec::new())
                    })
                    .collect();
                Completion::Read { batch, out }
            }
            (frame, _) => {
                return Err(PlaneError::Program(format!(
                    "answered with a {} where the request wanted another kind",
                    frame.kind()
                )));
            }
        };
        // The window's permits bound the batches between request and completion, and
        // the queue holds as many, so this waits only while the stage is stopping.
        if complete.send((batch, completion)).await.is_err() {
            return Err(PlaneError::Io(std::io::Error::other(
                "the completion stage has stopped",
            )));
        }
        Ok(())
    }

    /// Completes answered batches, as many at once as the window allows; a source's
    /// batches are acknowledged to it in the order it read them. Each completed batch
    /// gives its place in the window back. Ends once the answers loop has ended and
    /// everything it handed over is complete.
    async fn completer(
        &self,
        mut completions: mpsc::Receiver<(u64, Completion)>,
        stop: &CancellationToken,
    ) -> Result<(), PlaneError> {
        use futures_util::StreamExt;
        let queue = futures_util::stream::poll_fn(|cx| completions.poll_recv(cx));
        let mut done = queue
            .map(|(batch, c)| self.complete(batch, c))
            .buffered(self.plane.config.window.max(1));
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                n = done.next() => n,
            };
            let Some(result) = next else { return Ok(()) };
            if let Some(batch) = result? {
                self.send(&Frame::AckRequest { batch }, None).await?;
            }
            self.slots.add_permits(1);
        }
    }

    /// Writes one answered batch downstream and acknowledges its input; for a source,
    /// returns the batch to acknowledge to the program.
    async fn complete(
        &self,
        batch: u64,
        completion: Completion,
    ) -> Result<Option<u64>, PlaneError> {
        let cfg = &self.plane.config;
        let ack_source = match completion {
            Completion::Map { out, inputs } => {
                self.write_downstream(out).await?;
                self.ack(&inputs).await?;
                None
            }
            Completion::Sink { done, failed } => {
                if let Some(input) = &self.plane.input {
                    retrying(cfg.write_deadline, || input.ack(&done)).await?;
                    self.plane
                        .counters
                        .acked
                        .fetch_add(done.len() as u64, Ordering::Relaxed);
                    if !failed.is_empty() {
                        retrying(cfg.write_deadline, || input.nack(&failed, cfg.retry_delay))
                            .await?;
                    }
                }
                None
            }
            Completion::Read { batch, out } => {
                self.write_downstream(out).await?;
                // Every read is acknowledged, an empty one too: the program keeps each
                // read batch until it is (and has a bound on how many it keeps).
                Some(batch)
            }
        };
        self.completing().remove(&batch);
        Ok(ack_source)
    }

    /// The id of a message a source read: from the source's own id for it when it has
    /// one (the same record read again gets the same id, and the buffer drops it),
    /// else from this connection and a sequence number.
    fn source_id(&self, own: &[u8]) -> MessageId {
        if own.is_empty() {
            let seq = self.source_seq.fetch_add(1, Ordering::Relaxed);
            return MessageId((u128::from(self.nonce) << 64) | u128::from(seq));
        }
        let mut h = blake3::Hasher::new();
        h.update(self.plane.identity.as_bytes());
        h.update(&[0]);
        h.update(own);
        let hash = h.finalize();
        let mut first = [0u8; 16];
        first.copy_from_slice(&hash.as_bytes()[..16]);
        MessageId(u128::from_le_bytes(first))
    }

    async fn ack(&self, tags: &[DeliveryTag]) -> Result<(), PlaneError> {
        if let Some(input) = &self.plane.input {
            retrying(self.plane.config.write_deadline, || input.ack(tags)).await?;
            self.plane
                .counters
                .acked
                .fetch_add(tags.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Writes messages to the buffers their tags choose, one append per partition;
    /// returns once every one is durable.
    async fn write_downstream(&self, out: Vec<(Message, Vec<String>)>) -> Result<(), PlaneError> {
        let mut per_buffer: HashMap<(usize, usize), Vec<Message>> = HashMap::new();
        for (message, tags) in out {
            let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
            for (r, route) in self.plane.routes.iter().enumerate() {
                let takes = route.condition.as_ref().is_none_or(|c| c.matches(&tags));
                if route.partitions.is_empty() || !takes {
                    continue;
                }
                let p = partition_of(&message, route.partitions.len());
                per_buffer.entry((r, p)).or_default().push(message.clone());
            }
        }
        for ((r, p), batch) in per_buffer {
            let buffer = &self.plane.routes[r].partitions[p];
            self.append_until_written(buffer.as_ref(), &batch).await?;
            self.plane
                .counters
                .written
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Appends `batch`, waiting while the buffer is full (back-pressure, without a
    /// limit: the pipeline slows down rather than dropping anything) and retrying
    /// other failures until the write deadline.
    async fn append_until_written(
        &self,
        buffer: &dyn Buffer,
        batch: &[Message],
    ) -> Result<(), PlaneError> {
        let started = tokio::time::Instant::now();
        let mut pause = Duration::from_millis(5);
        loop {
            match buffer.append(batch).await {
                Ok(_) => return Ok(()),
                Err(BufferError::Full { .. }) => {
                    self.plane
                        .counters
                        .backpressured
                        .fetch_add(1, Ordering::Relaxed);
                }
                Err(e @ (BufferError::Invalid(_) | BufferError::NotFound(_))) => {
                    return Err(e.into());
                }
                Err(e) if started.elapsed() >= self.plane.config.write_deadline => {
                    return Err(e.into());
                }
                Err(e) => {
                    tracing::debug!(buffer = %buffer.name(), "writing, will retry: {e}");
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(250));
        }
    }

    /// Gives back the messages the program held when the connection ended, so they
    /// are delivered again at once instead of when their leases lapse.
    async fn give_back(&self) {
        let Some(input) = &self.plane.input else {
            return;
        };
        let mut tags = {
            let mut pending = self.pending.lock().await;
            let tags = held(pending.iter());
            pending.clear();
            tags
        };
        // Batches answered but not complete when the session ended: their writes may
        // be partly done, which the ids make harmless when they come again.
        tags.extend(self.completing().drain().flat_map(|(_, t)| t));
        if tags.is_empty() {
            return;
        }
        if let Err(e) = input.nack(&tags, Duration::ZERO).await {
            tracing::warn!(buffer = %input.name(), "giving back {} messages: {e}; they return when their leases lapse", tags.len());
        }
    }
}

/// The delivery tags of the input messages the program holds in `pending` requests.
fn held<'a>(
    pending: impl Iterator<Item = &'a (u64, tokio::time::Instant, Pending)>,
) -> Vec<DeliveryTag> {
    pending
        .flat_map(|(_, _, p)| match p {
            Pending::Input(d) => d.as_slice(),
            Pending::Read => &[],
        })
        .map(|d| d.tag)
        .collect()
}

/// The partition a message goes to: by its key's hash when it has one, so one key's
/// messages stay in order in one partition; else spread by its id.
fn partition_of(message: &Message, partitions: usize) -> usize {
    if partitions <= 1 {
        return 0;
    }
    let n = partitions as u64;
    if message.key.is_empty() {
        return (message.id.0 as u64 % n) as usize;
    }
    let hash = blake3::hash(&message.key);
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.as_bytes()[..8]);
    (u64::from_le_bytes(first) % n) as usize
}

fn to_wire(d: &Delivery) -> InMessage {
    InMessage {
        id: d.message.id.0.to_le_bytes(),
        event_time: d.message.event_time,
        key: d.message.key.to_vec(),
        payload: d.message.payload.to_vec(),
    }
}
