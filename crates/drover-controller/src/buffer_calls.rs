//! Buffer calls from agents: the binary frames of an agent's WebSocket carry calls on
//! the pipelines' embedded buffers (`drover_buffer::remote`), which the controller
//! holds in its data directory; the answers go back as binary frames on the same
//! connection, matched to their calls by id.
//!
//! Each call is checked against who sent it: a node may use a buffer only while one of
//! its live tasks is a replica of a vertex whose plane names that buffer and whose
//! buffers are embedded. Calls run concurrently (a fetch waits for messages) in tasks
//! of their own, so the connection's reader never waits on one; a bound on each
//! connection's calls in flight keeps one agent from making the controller hold
//! unbounded work.
//!
//! What a connection fetched and has not acknowledged or given back is remembered, and
//! when the connection ends it is given back at once: the agent's replicas lost it
//! with the connection (or the agent died), and waiting for the leases to lapse would
//! stall those messages for a whole lease. A replica that kept them across a short
//! outage and acknowledges them late only makes duplicates, which the downstream
//! buffers drop by id.

use crate::Inner;
use bytes::Bytes;
use drover_buffer::remote::{self, Answer};
use drover_buffer::{Buffer, BufferConfig, BufferError, DeliveryTag};
use drover_core::NodeId;
use drover_core::pipeline::spec::{BufferBackend as BackendKind, BufferSpec};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tokio::sync::{Semaphore, mpsc};

/// How many calls one connection may have in flight; more are refused at once with a
/// retryable error. The agent bounds its own calls below this.
pub(crate) const MAX_CALLS_PER_CONNECTION: usize = 256;

/// How many opened buffers the controller keeps handles to.
const MAX_OPEN: usize = 4096;

/// How many answers may wait for one connection's writer.
pub(crate) const ANSWER_QUEUE: usize = 256;

/// Serves one connection's buffer calls.
pub(crate) struct CallServer {
    inner: Arc<Inner>,
    node_id: NodeId,
    answers: mpsc::Sender<Bytes>,
    slots: Arc<Semaphore>,
    held: Arc<Held>,
}

/// What one connection holds of each buffer, with the buffer's settings.
type HeldMap = HashMap<String, (BufferSpec, HashSet<DeliveryTag>)>;

/// The deliveries one connection holds, per buffer. Bounded by what the buffers lease
/// out, which their lengths bound.
#[derive(Default)]
struct Held(std::sync::Mutex<HeldMap>);

impl Held {
    fn lock(&self) -> std::sync::MutexGuard<'_, HeldMap> {
        // Every operation is one insert or removal, so a poisoned map is whole.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fetched(&self, buffer: &str, spec: BufferSpec, tags: impl Iterator<Item = DeliveryTag>) {
        let mut held = self.lock();
        let entry = held
            .entry(buffer.to_string())
            .or_insert_with(|| (spec, HashSet::new()));
        entry.1.extend(tags);
    }

    fn settled(&self, buffer: &str, tags: &[DeliveryTag]) {
        let mut held = self.lock();
        if let Some((_, set)) = held.get_mut(buffer) {
            for tag in tags {
                set.remove(tag);
            }
            if set.is_empty() {
                held.remove(buffer);
            }
        }
    }
}

impl CallServer {
    pub(crate) fn new(inner: Arc<Inner>, node_id: NodeId, answers: mpsc::Sender<Bytes>) -> Self {
        CallServer {
            inner,
            node_id,
            answers,
            slots: Arc::new(Semaphore::new(MAX_CALLS_PER_CONNECTION)),
            held: Arc::default(),
        }
    }

    /// After the connection ended: once the calls still running have finished (or a
    /// fetch's longest wait has passed), gives back everything the connection held, so
    /// other replicas get it at once.
    pub(crate) async fn release(self) {
        let bound = remote::MAX_WAIT + std::time::Duration::from_secs(5);
        let all = MAX_CALLS_PER_CONNECTION as u32;
        let finished = tokio::select! {
            _ = self.inner.shutdown.cancelled() => return,
            r = tokio::time::timeout(bound, self.slots.acquire_many(all)) => r.is_ok(),
        };
        if !finished {
            tracing::warn!(node = %self.node_id, "buffer calls still running {bound:?} after the connection ended; giving back what is known");
        }
        let held = std::mem::take(&mut *self.held.lock());
        for (buffer, (spec, tags)) in held {
            let tags: Vec<DeliveryTag> = tags.into_iter().collect();
            let given = async {
                let b = self.inner.buffers.open_embedded(&buffer, &spec).await?;
                b.nack(&tags, std::time::Duration::ZERO).await
            };
            match given.await {
                Ok(()) => {
                    tracing::info!(node = %self.node_id, buffer, "gave back {} messages held by a closed connection", tags.len())
                }
                Err(e) => {
                    tracing::warn!(node = %self.node_id, buffer, "giving back {} messages held by a closed connection: {e}; they return when their leases lapse", tags.len())
                }
            }
        }
    }

    /// Takes one binary frame: decodes it and serves it in a task of its own, or
    /// answers at once when it is bad or too many calls are in flight. Never waits.
    pub(crate) fn accept(&self, frame: Bytes) {
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            let why = format!(
                "node {} has {MAX_CALLS_PER_CONNECTION} buffer calls in flight already; retry",
                self.node_id
            );
            self.answer_now(&frame, BufferError::Backend(why));
            return;
        };
        let call = match remote::decode_call(&frame) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(node = %self.node_id, "a bad buffer call: {e}");
                self.answer_now(&frame, e.into());
                return;
            }
        };
        let (inner, node, answers, held) = (
            self.inner.clone(),
            self.node_id.clone(),
            self.answers.clone(),
            self.held.clone(),
        );
        let stop = inner.shutdown.clone();
        tokio::spawn(async move {
            let id = call.id;
            let result = tokio::select! {
                _ = stop.cancelled() => Err(BufferError::Backend("the controller is shutting down".into())),
                r = serve(&inner, &node, &held, call) => r,
            };
            let frame = remote::encode_answer(&Answer { id, result });
            // The answer waits for room in the writer's queue (bounded); a closed
            // connection drops it, and the agent's call fails on its own timeout.
            if answers.send(frame).await.is_err() {
                tracing::debug!(node = %node, id, "buffer answer not sent: the connection closed");
            }
            drop(permit);
        });
    }

    /// Answers a frame that is not served: with its id, if it has one.
    fn answer_now(&self, frame: &[u8], error: BufferError) {
        let Some(id) = remote::frame_id(frame) else {
            tracing::warn!(node = %self.node_id, "dropping a buffer frame too short to answer");
            return;
        };
        let answer = remote::encode_answer(&Answer {
            id,
            result: Err(error),
        });
        if self.answers.try_send(answer).is_err() {
            tracing::debug!(node = %self.node_id, id, "buffer refusal not sent: the answer queue is full");
        }
    }
}

/// Checks the call against the node's tasks and carries it out.
async fn serve(
    inner: &Inner,
    node: &NodeId,
    held: &Held,
    call: remote::Call,
) -> Result<remote::Reply, BufferError> {
    let spec = authorize(inner, node, &call.buffer).await?;
    let buffer = inner.buffers.open_embedded(&call.buffer, &spec).await?;
    let settles = match &call.op {
        remote::Op::Ack(tags) | remote::Op::Nack { tags, .. } => Some(tags.clone()),
        _ => None,
    };
    // The operation runs in a task of its own, so that when this call is given up
    // (the controller shutting down) it still finishes: an embedded buffer's write
    // dropped half-way loses its log appender, and the buffer then refuses every later
    // call as gone, which the agent's data plane takes as the end of its replica.
    let op = call.op;
    let running = buffer.clone();
    let result =
        match tokio::spawn(async move { remote::execute(running.as_ref(), op).await }).await {
            Ok(r) => r,
            Err(e) => Err(BufferError::Backend(format!(
                "the buffer call's task failed: {e}"
            ))),
        };
    match &result {
        Ok(remote::Reply::Fetched(ds)) => {
            held.fetched(&call.buffer, spec, ds.iter().map(|d| d.tag));
        }
        Ok(_) => {
            if let Some(tags) = settles {
                held.settled(&call.buffer, &tags);
            }
        }
        // A buffer whose write failed is recovered from its files when opened again.
        Err(BufferError::Backend(_)) => inner.buffers.forget(&call.buffer),
        Err(_) => {}
    }
    result
}

/// The buffer settings of the vertex through which `node` may use `buffer`, or why it
/// may not.
async fn authorize(inner: &Inner, node: &NodeId, buffer: &str) -> Result<BufferSpec, BufferError> {
    let state = inner.state.lock().await;
    let found = state.nodes.get(node).and_then(|entry| {
        entry.tasks.iter().find_map(|task_id| {
            let task = state.tasks.get(task_id)?;
            if task.state.is_terminal() || task.node_id.as_ref() != Some(node) {
                return None;
            }
            let job = state.jobs.get(&task.job_id)?;
            let plane = job.spec.vertex.as_deref()?;
            // Checked without building the prefix: this runs for every buffer call.
            let in_project = buffer
                .strip_prefix(job.project.as_str())
                .is_some_and(|rest| rest.starts_with('.'));
            let named = in_project && plane.buffers().any(|b| b == buffer);
            (named && plane.buffer.backend == BackendKind::Embedded).then_some(plane.buffer)
        })
    });
    found.ok_or_else(|| {
        BufferError::Invalid(format!(
            "node {node} may not use buffer {buffer}: none of its running tasks is a replica of a vertex with embedded buffers that reads or writes it"
        ))
    })
}

/// A buffer's config from its pipeline's `buffer:` settings.
pub(crate) fn config_of(spec: &BufferSpec) -> BufferConfig {
    BufferConfig {
        max_length: spec.max_length,
        usage_limit: spec.usage_limit,
        ..BufferConfig::default()
    }
}

/// The embedded buffers opened for agents, by name, with the config each was opened
/// with; a changed config opens the buffer again, which applies it.
#[derive(Default)]
pub(crate) struct OpenBuffers(std::sync::Mutex<HashMap<String, OpenBuffer>>);

/// One opened buffer and the config it was opened with.
type OpenBuffer = (BufferConfig, Arc<dyn Buffer>);

impl OpenBuffers {
    pub(crate) fn get(&self, name: &str, config: &BufferConfig) -> Option<Arc<dyn Buffer>> {
        let open = self.0.lock().unwrap_or_else(|p| p.into_inner());
        open.get(name)
            .filter(|(c, _)| c == config)
            .map(|(_, b)| b.clone())
    }

    pub(crate) fn put(&self, name: &str, config: BufferConfig, buffer: Arc<dyn Buffer>) {
        // Every operation is one insert or remove, so a poisoned lock is consistent.
        let mut open = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // Buffers of deleted pipelines would stay here forever; past a bound the map
        // starts over, and the buffers in use are opened again on their next call.
        if open.len() >= MAX_OPEN && !open.contains_key(name) {
            open.clear();
        }
        open.insert(name.to_string(), (config, buffer));
    }

    pub(crate) fn remove(&self, name: &str) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }
}
