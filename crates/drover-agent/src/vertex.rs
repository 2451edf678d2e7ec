//! What the agent needs to run pipeline vertex replicas: the way its buffer calls
//! reach the controller (binary frames on the controller connection, answers matched
//! by id), its NATS connections for pipelines whose buffers are there, and each
//! replica's data plane built from the `vertex` of its job's spec.

use crate::dataplane::{Plane, PlaneConfig, PlaneCounters, Route};
use async_trait::async_trait;
use bytes::Bytes;
use drover_buffer::remote::{self, CallTransport, RemoteBuffer};
use drover_buffer::{Buffer, BufferBackend, BufferError};
use drover_core::TaskId;
use drover_core::pipeline::spec::BufferBackend as BackendKind;
use drover_core::pipeline::vertex::{PlaneRole, VertexPlane};
use drover_core::protocol::TaskAssignment;
use drover_core::state::PlaneCounts;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// The most buffer calls awaiting answers at once, below the controller's bound per
/// connection so that the agent's own calls are never refused for it.
pub const MAX_PENDING_CALLS: usize = 192;

/// How long a call may wait for its answer beyond the longest fetch wait.
const CALL_SLACK: Duration = Duration::from_secs(15);

/// The agent's end of the buffer calls on its controller connection.
#[derive(Default)]
pub struct BufferLink {
    /// Where calls go while connected: the connection's queue of binary frames.
    out: Mutex<Option<mpsc::Sender<Bytes>>>,
    /// Calls sent and not yet answered, by id.
    pending: Mutex<HashMap<u64, oneshot::Sender<Bytes>>>,
}

impl BufferLink {
    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<Bytes>>> {
        // Every operation is one insert or remove, so a poisoned lock is consistent.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn out(&self) -> std::sync::MutexGuard<'_, Option<mpsc::Sender<Bytes>>> {
        self.out.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A connection came up (`Some`) or went down (`None`). Going down fails every
    /// call awaiting an answer at once: their answers cannot come on a new connection.
    pub(crate) fn set(&self, out: Option<mpsc::Sender<Bytes>>) {
        let down = out.is_none();
        *self.out() = out;
        if down {
            self.pending().clear();
        }
    }

    /// Hands an answer frame from the controller to the call awaiting it.
    pub(crate) fn deliver(&self, frame: Bytes) {
        let Some(id) = remote::frame_id(&frame) else {
            tracing::warn!("ignoring a buffer answer too short to have an id");
            return;
        };
        match self.pending().remove(&id) {
            Some(waiting) => {
                if waiting.send(frame).is_err() {
                    tracing::debug!(id, "a buffer answer came after its call gave up");
                }
            }
            None => tracing::debug!(id, "a buffer answer for no call awaiting one"),
        }
    }
}

/// Removes a call from the pending map however its wait ends.
struct PendingGuard<'a> {
    link: &'a BufferLink,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.link.pending().remove(&self.id);
    }
}

fn unavailable(why: &str) -> BufferError {
    BufferError::Backend(format!("the controller is unavailable: {why}"))
}

#[async_trait]
impl CallTransport for BufferLink {
    async fn call(&self, id: u64, frame: Bytes) -> Result<Bytes, BufferError> {
        let Some(out) = self.out().clone() else {
            return Err(unavailable("not connected"));
        };
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.pending();
            if pending.len() >= MAX_PENDING_CALLS {
                return Err(unavailable(&format!(
                    "{MAX_PENDING_CALLS} buffer calls are already awaiting answers"
                )));
            }
            pending.insert(id, tx);
        }
        let _guard = PendingGuard { link: self, id };
        let deadline = remote::MAX_WAIT + CALL_SLACK;
        match tokio::time::timeout(deadline, out.send(frame)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(unavailable("the connection closed")),
            Err(_) => return Err(unavailable("the connection took no call in time")),
        }
        match tokio::time::timeout(deadline, rx).await {
            Ok(Ok(answer)) => Ok(answer),
            // Dropped by `set(None)`: the connection went down mid-call.
            Ok(Err(_)) => Err(unavailable("the connection dropped before the answer")),
            Err(_) => Err(unavailable(&format!("no answer within {deadline:?}"))),
        }
    }
}

/// What the agent holds for all its vertex replicas.
pub struct VertexSupport {
    pub link: Arc<BufferLink>,
    /// The binary run for built-in vertices (`drover __vertex KIND`); `None` when the
    /// agent was not given one, and then built-in vertices fail to start with why.
    pub self_exe: Option<PathBuf>,
    /// One NATS connection per server URL, shared by every replica using it.
    nats: tokio::sync::Mutex<HashMap<String, Arc<drover_buffer::nats::NatsBackend>>>,
    /// Each serving replica's counters, for the heartbeat's usage samples.
    counters: Mutex<HashMap<TaskId, Arc<PlaneCounters>>>,
}

fn snapshot(counters: &PlaneCounters) -> PlaneCounts {
    PlaneCounts {
        read: counters.read.load(Ordering::Relaxed),
        written: counters.written.load(Ordering::Relaxed),
        acked: counters.acked.load(Ordering::Relaxed),
        backpressured: counters.backpressured.load(Ordering::Relaxed),
    }
}

impl VertexSupport {
    pub fn new(self_exe: Option<PathBuf>) -> VertexSupport {
        VertexSupport {
            link: Arc::new(BufferLink::default()),
            self_exe,
            nats: Default::default(),
            counters: Default::default(),
        }
    }

    fn counters(&self) -> std::sync::MutexGuard<'_, HashMap<TaskId, Arc<PlaneCounters>>> {
        // Every operation is one insert or remove, so a poisoned lock is consistent.
        self.counters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A replica's counts so far, when it is one.
    pub fn counts(&self, task: &TaskId) -> Option<PlaneCounts> {
        let counters = self.counters().get(task)?.clone();
        Some(snapshot(&counters))
    }

    /// Every replica's counts so far.
    pub fn all_counts(&self) -> Vec<(TaskId, PlaneCounts)> {
        self.counters()
            .iter()
            .map(|(id, c)| (id.clone(), snapshot(c)))
            .collect()
    }

    /// The command of a built-in vertex's replica: this binary's `__vertex` with the
    /// built-in's arguments.
    pub fn builtin_command(&self, plane: &VertexPlane) -> Result<Vec<String>, String> {
        let exe = self.self_exe.as_ref().ok_or_else(|| {
            "this agent was not told which drover binary runs built-in vertices".to_string()
        })?;
        let mut cmd = vec![exe.display().to_string(), "__vertex".to_string()];
        cmd.extend(plane.builtin.iter().cloned());
        Ok(cmd)
    }

    async fn nats(&self, url: &str) -> Result<Arc<drover_buffer::nats::NatsBackend>, BufferError> {
        let mut conns = self.nats.lock().await;
        if let Some(c) = conns.get(url) {
            return Ok(c.clone());
        }
        let options = drover_buffer::nats::NatsOptions {
            client_name: format!("drover-agent {}", crate::hostname()),
            ..Default::default()
        };
        let backend = Arc::new(drover_buffer::nats::NatsBackend::connect(url, options).await?);
        conns.insert(url.to_string(), backend.clone());
        Ok(backend)
    }

    /// Builds the data plane of the replica `a` (whose spec has `vertex`): its input
    /// partition, its routes, every buffer reached the way the pipeline's backend says.
    /// Registers its counters for the heartbeat until the returned guard is dropped.
    pub(crate) async fn plane(
        self: &Arc<Self>,
        a: &TaskAssignment,
        plane: &VertexPlane,
    ) -> Result<(crate::socket::DataEndpoint, CountersGuard), String> {
        let open = |name: String| {
            let this = self.clone();
            let nats_url = a.nats_url.clone();
            let spec = plane.buffer;
            async move {
                let parsed = remote::parse_name(&name).map_err(|e| e.to_string())?;
                let buffer: Arc<dyn Buffer> = match spec.backend {
                    BackendKind::Embedded => Arc::new(RemoteBuffer::new(parsed, this.link.clone())),
                    BackendKind::Nats => {
                        let url = nats_url.ok_or_else(|| {
                            format!(
                                "buffer {name} is in NATS, and the assignment names no NATS server"
                            )
                        })?;
                        let backend = this
                            .nats(&url)
                            .await
                            .map_err(|e| format!("NATS at {url}: {e}"))?;
                        let config = drover_buffer::BufferConfig {
                            max_length: spec.max_length,
                            usage_limit: spec.usage_limit,
                            ..Default::default()
                        };
                        backend
                            .open(&parsed, &config)
                            .await
                            .map_err(|e| format!("opening buffer {name}: {e}"))?
                    }
                };
                Ok::<_, String>(buffer)
            }
        };
        let input = match plane.inputs.len() {
            0 => None,
            n => {
                // Replicas share the partitions round-robin by their index.
                let name = plane.inputs[a.index as usize % n].clone();
                Some(open(name).await?)
            }
        };
        let mut routes = Vec::with_capacity(plane.outputs.len());
        for out in &plane.outputs {
            let mut partitions = Vec::with_capacity(out.buffers.len());
            for b in &out.buffers {
                partitions.push(open(b.clone()).await?);
            }
            routes.push(Route {
                condition: out.condition.as_ref().map(|c| c.tags.clone()),
                partitions,
            });
        }
        let counters = Arc::new(PlaneCounters::default());
        self.counters().insert(a.task_id.clone(), counters.clone());
        let guard = CountersGuard {
            support: self.clone(),
            task: a.task_id.clone(),
        };
        let role = match plane.role {
            PlaneRole::Source => drover_pipeline::proto::Role::Source,
            PlaneRole::Map => drover_pipeline::proto::Role::Map,
            PlaneRole::Sink => drover_pipeline::proto::Role::Sink,
        };
        let endpoint = crate::socket::DataEndpoint {
            role,
            plane: Plane {
                input,
                routes,
                identity: format!("{}/{}/{}", a.project, plane.pipeline, plane.vertex),
                config: PlaneConfig::default(),
                counters,
            },
        };
        Ok((endpoint, guard))
    }
}

/// Unregisters a replica's counters when its data plane stops serving.
pub(crate) struct CountersGuard {
    support: Arc<VertexSupport>,
    task: TaskId,
}

impl Drop for CountersGuard {
    fn drop(&mut self) {
        self.support.counters().remove(&self.task);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn calls_fail_fast_while_disconnected_and_answers_find_their_calls() {
        let link = Arc::new(BufferLink::default());
        let e = link.call(1, Bytes::from_static(b"x")).await.unwrap_err();
        assert!(e.to_string().contains("not connected"), "{e}");

        let (tx, mut rx) = mpsc::channel(4);
        link.set(Some(tx));
        let caller = {
            let link = link.clone();
            tokio::spawn(async move { link.call(7, Bytes::from_static(b"call")).await })
        };
        assert_eq!(rx.recv().await.unwrap(), Bytes::from_static(b"call"));
        // An answer to another id changes nothing; the right one completes the call.
        let mut answer = vec![remote::VERSION, 2];
        answer.extend_from_slice(&99u64.to_le_bytes());
        link.deliver(Bytes::from(answer.clone()));
        answer[2..10].copy_from_slice(&7u64.to_le_bytes());
        link.deliver(Bytes::from(answer.clone()));
        assert_eq!(caller.await.unwrap().unwrap(), Bytes::from(answer));
        assert!(link.pending().is_empty());

        // A call in flight when the connection drops fails at once.
        let caller = {
            let link = link.clone();
            tokio::spawn(async move { link.call(8, Bytes::from_static(b"call")).await })
        };
        rx.recv().await.unwrap();
        link.set(None);
        let e = tokio::time::timeout(Duration::from_secs(5), caller)
            .await
            .unwrap()
            .unwrap()
            .unwrap_err();
        assert!(e.to_string().contains("dropped"), "{e}");
    }
}
