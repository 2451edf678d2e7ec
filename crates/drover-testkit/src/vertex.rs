//! One pipeline vertex replica without a controller: a task socket served with the
//! agent's data plane and a program started on it, as the agent would for a replica.
//! For tests and benchmarks of the data path with real programs and real buffers.

use drover_agent::dataplane::{Plane, PlaneConfig, PlaneCounters, Route};
use drover_agent::socket::{DataEndpoint, TaskFacts, TaskSocket};
use drover_buffer::Buffer;
use drover_pipeline::proto::Role;
use std::path::Path;
use std::sync::Arc;

/// A served replica; dropping it kills its program and closes its socket.
pub struct Replica {
    _socket: TaskSocket,
    pub child: tokio::process::Child,
    pub counters: Arc<PlaneCounters>,
}

/// Where a replica reads and writes, and how its data plane behaves.
pub struct ReplicaSpec<'a> {
    /// Names the socket and the replica's identity (`project/pipe/NAME`).
    pub name: &'a str,
    pub project: &'a str,
    pub role: Role,
    pub input: Option<Arc<dyn Buffer>>,
    pub routes: Vec<Route>,
    pub config: PlaneConfig,
}

impl ReplicaSpec<'_> {
    /// Binds the replica's socket in `dir` and starts `program` on it, as task index 0.
    pub fn start(
        self,
        dir: &Path,
        program: &mut tokio::process::Command,
    ) -> std::io::Result<Replica> {
        let path = dir.join(format!("{}.sock", self.name));
        let facts = TaskFacts {
            task_id: format!("task-{}", self.name),
            job: self.name.into(),
            job_id: format!("job-{}", self.name),
            project: self.project.into(),
            index: 0,
            attempt: 0,
            config: None,
        };
        let counters = Arc::new(PlaneCounters::default());
        let plane = Plane {
            input: self.input,
            routes: self.routes,
            identity: format!("{}/pipe/{}", self.project, self.name),
            config: self.config,
            counters: counters.clone(),
        };
        let endpoint = DataEndpoint {
            role: self.role,
            plane,
        };
        let socket = TaskSocket::bind_with(&path, facts, Some(Arc::new(endpoint)))?;
        let child = program
            .env("DROVER_SOCKET", &path)
            .env("DROVER_TASK_INDEX", "0")
            .kill_on_drop(true)
            .spawn()?;
        Ok(Replica {
            _socket: socket,
            child,
            counters,
        })
    }
}
