//! The [`Runtime`] trait and its built-in implementations.
//!
//! The agent's task manager owns the task state machine; a runtime only starts, waits
//! for, stops and cleans up the thing that runs a task. Runtimes never set task states.
//! The rest of the system sees a runtime only as `Arc<dyn Runtime>`.

pub mod cgroup;
pub mod docker;
pub mod mock;
pub mod plugin;
pub mod process;
pub mod sandbox;
pub mod shim;
mod status;

use async_trait::async_trait;
use drover_core::spec::{JobSpec, RuntimeKind};
use drover_core::state::PortBinding;
use drover_core::{JobId, TaskId};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// Everything a runtime needs to run one task. The agent builds it; the runtime must
/// not read anything else (in particular, not the agent's own environment).
#[derive(Clone, Debug)]
pub struct TaskContext {
    pub task_id: TaskId,
    pub job_id: JobId,
    pub job_name: String,
    pub index: u32,
    pub spec: JobSpec,
    /// The task's own directory, created by the agent; the working directory of the task.
    pub dir: PathBuf,
    /// The complete environment of the task: the declared variables plus `DROVER_*`.
    pub env: BTreeMap<String, String>,
    /// Files the task's stdout and stderr are appended to.
    pub stdout_path: PathBuf,
    pub stderr_path: PathBuf,
    /// The unprivileged user the task runs as; `None` runs it as the agent's own user.
    /// Only the process runtime uses it (a container has users of its own).
    pub user: Option<sandbox::TaskUser>,
    /// A file the task reads as its standard input (the job's `stdin`, fetched by the
    /// agent); `None` gives it `/dev/null`. Only runtimes whose [`Runtime::takes_stdin`]
    /// is true are ever given one.
    pub stdin: Option<PathBuf>,
    /// Files of the agent's to show inside a container (the task socket, the config
    /// file, the working_dir); only runtimes that isolate the task's filesystem use it.
    pub mounts: Vec<Mount>,
    /// The directory a container's program starts in (its working_dir's mount); the
    /// image's own when `None`. A process task always starts in its task directory.
    pub workdir: Option<String>,
}

/// A host file shown inside a container at another path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub host: PathBuf,
    /// An absolute path inside the container.
    pub container: String,
    pub read_only: bool,
}

/// How a task's process ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    Exited(i32),
    /// Ended by a signal, named like `SIGKILL`.
    Signaled(String),
    /// Killed by the kernel or engine for exceeding its memory limit; the exit code when
    /// one is known.
    OutOfMemory(Option<i32>),
    /// It ended but how cannot be known (e.g. it ended while nobody was watching and left
    /// no status); the string says why.
    Unknown(String),
}

/// Which step of a stop ended the task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopOutcome {
    /// It ended within the grace period after the polite signal (SIGTERM).
    Graceful,
    /// It had to be killed (SIGKILL) when the grace period ran out.
    Killed,
    /// It had already ended before the stop.
    AlreadyExited,
}

/// What `recover` found for a task the agent had before it restarted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recovered {
    /// Still running and now watched again; `wait` works as after `start`.
    Adopted,
    /// It ended while the agent was away, like this.
    Exited(ExitStatus),
    /// Nothing of it is left (or a different process holds its old pid).
    Gone,
}

/// What a runtime reports once a task has started.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Started {
    /// Ports published on the node's host, e.g. a container's 8080 on host port 32768.
    pub ports: Vec<PortBinding>,
}

/// A sample of what a running task uses.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TaskStats {
    /// CPU time used so far, in seconds (user plus system).
    pub cpu_seconds: f64,
    /// Resident memory now, in bytes.
    pub memory_bytes: u64,
}

/// What a runtime offers on this node.
#[derive(Clone, Debug, PartialEq)]
pub struct Fingerprint {
    pub kind: RuntimeKind,
    /// Free-form facts, e.g. an engine version.
    pub attributes: BTreeMap<String, String>,
}

/// A runtime's failure; the message is shown to users as the task's reason.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("failed to start: {0}")]
    Start(String),
    #[error("unknown task {0}")]
    UnknownTask(TaskId),
    #[error("runtime unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Other(String),
}

#[async_trait]
pub trait Runtime: Send + Sync {
    fn kind(&self) -> RuntimeKind;

    /// Whether the runtime works here; an error means it is not offered.
    async fn fingerprint(&self) -> Result<Fingerprint, RuntimeError>;

    /// Whether `start` gives the task the file in [`TaskContext::stdin`] as its standard
    /// input. The agent advertises it for the runtime, and the scheduler places a job
    /// with `stdin` only on nodes that do, so a runtime that cannot must say false
    /// rather than start the task with `/dev/null`.
    fn takes_stdin(&self) -> bool {
        false
    }

    /// Gets ready to start (fetches, builds, checks). May be slow; bounded by the agent.
    async fn prepare(&self, ctx: &TaskContext) -> Result<(), RuntimeError>;

    /// Starts the task and returns once it is running (for a task with a health check,
    /// once it is healthy; the runtime enforces `health.start_deadline` itself).
    async fn start(&self, ctx: &TaskContext) -> Result<Started, RuntimeError>;

    /// Resolves when the task has ended. Safe to call more than once and concurrently
    /// with `stop`; every caller sees the same status.
    async fn wait(&self, id: &TaskId) -> Result<ExitStatus, RuntimeError>;

    /// Asks the task to end (SIGTERM or the runtime's equivalent), waits up to `grace`,
    /// then forces it (SIGKILL). Returns once it has ended.
    async fn stop(&self, id: &TaskId, grace: Duration) -> Result<StopOutcome, RuntimeError>;

    /// Releases everything the runtime holds for the task. The task must have ended.
    async fn destroy(&self, id: &TaskId) -> Result<(), RuntimeError>;

    /// After an agent restart: re-attach to a task started by a previous agent process.
    async fn recover(&self, ctx: &TaskContext) -> Result<Recovered, RuntimeError>;

    /// What the task uses now. Runtimes that cannot tell say `Unavailable`.
    async fn stats(&self, id: &TaskId) -> Result<TaskStats, RuntimeError> {
        Err(RuntimeError::Unavailable(format!("no stats for task {id}")))
    }

    /// The tasks this runtime holds anything for on this node (running or not), found
    /// from the runtime's own records (e.g. container labels). After a restart the agent
    /// destroys those it has no record of, so nothing is orphaned. Runtimes whose every
    /// trace lives in the task's directory return an empty list.
    async fn list(&self) -> Result<Vec<TaskId>, RuntimeError> {
        Ok(Vec::new())
    }
}
