//! The task state machine and the records the controller keeps for jobs, tasks and nodes.
//!
//! States only move forward. [`TaskState::replaces`] is the one rule for which of two
//! records of a task wins; the store and the controller both apply it, so a duplicate
//! or stale event from an agent changes nothing wherever it arrives.

use crate::Millis;
use crate::ids::{JobId, NodeId, ProjectId, TaskId};
use crate::platform::{Libc, Platform, Uname};
use crate::spec::{JobSpec, Resources, RuntimeKind};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    Pending,
    Scheduled,
    Preparing,
    Starting,
    Running,
    Stopping,
    Succeeded,
    Failed,
    Stopped,
    Lost,
}

impl TaskState {
    pub const ALL: [TaskState; 10] = [
        TaskState::Pending,
        TaskState::Scheduled,
        TaskState::Preparing,
        TaskState::Starting,
        TaskState::Running,
        TaskState::Stopping,
        TaskState::Succeeded,
        TaskState::Failed,
        TaskState::Stopped,
        TaskState::Lost,
    ];

    /// The position in the forward order; all terminal states share the last rank.
    pub fn rank(self) -> u8 {
        match self {
            TaskState::Pending => 0,
            TaskState::Scheduled => 1,
            TaskState::Preparing => 2,
            TaskState::Starting => 3,
            TaskState::Running => 4,
            TaskState::Stopping => 5,
            TaskState::Succeeded | TaskState::Failed | TaskState::Stopped | TaskState::Lost => {
                Self::TERMINAL_RANK
            }
        }
    }

    /// The rank every terminal state shares.
    pub const TERMINAL_RANK: u8 = 6;

    pub fn is_terminal(self) -> bool {
        self.rank() == Self::TERMINAL_RANK
    }

    /// Whether a task in `self` may move to `next`: strictly forward, never out of a
    /// terminal state.
    pub fn can_move_to(self, next: TaskState) -> bool {
        !self.is_terminal() && next.rank() > self.rank()
    }

    /// Whether a task record in state `self` may be written over the stored record of
    /// the same task, in state `stored`. This is the one rule for which record wins,
    /// applied by the controller's memory and by every store: a move forward, or an
    /// update within the same live state (a reason, ports, a stop request), and never
    /// anything over a terminal record. Stale and duplicate reports from agents are
    /// therefore harmless wherever they arrive.
    pub fn replaces(self, stored: TaskState) -> bool {
        !stored.is_terminal() && self.rank() >= stored.rank()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::Scheduled => "scheduled",
            TaskState::Preparing => "preparing",
            TaskState::Starting => "starting",
            TaskState::Running => "running",
            TaskState::Stopping => "stopping",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Stopped => "stopped",
            TaskState::Lost => "lost",
        }
    }

    pub fn parse(s: &str) -> Option<TaskState> {
        TaskState::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a task's process ended, when it did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exit {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// The signal that ended it, by name (`SIGTERM`, `SIGKILL`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
}

/// A container port published on a host port of the task's node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortBinding {
    pub container: u16,
    pub host: u16,
}

impl fmt::Display for PortBinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}->{}", self.host, self.container)
    }
}

/// What a running task uses, as its runtime last sampled it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskUsage {
    /// CPU time used so far, in seconds.
    pub cpu_seconds: f64,
    /// Resident memory, in bytes.
    pub memory_bytes: u64,
}

/// One placed instance of a job, as the controller stores it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub id: TaskId,
    pub project: ProjectId,
    pub job_id: JobId,
    pub job_name: String,
    /// 0 to count−1; replacements of a task keep its index.
    pub index: u32,
    /// 0 for the first try, then one more for each replacement of the same index.
    pub attempt: u32,
    pub state: TaskState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<NodeId>,
    /// Why the task is in its state: the pending reason, the failure, who stopped it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<Exit>,
    /// Set when the controller wants the task stopped; the agent is told until it acks.
    #[serde(default)]
    pub desired_stop: bool,
    /// Set by a forced stop, which gives the task no grace. Kept with the task so that a
    /// stop re-sent after its agent reconnects, and the controller's deadline for it, are
    /// as forced as the first.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stop_forced: bool,
    /// Earliest time the scheduler may place it (restart delay).
    #[serde(default)]
    pub not_before: Millis,
    pub created_at: Millis,
    pub updated_at: Millis,
    /// Ports the runtime published for the task, reported when it started.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortBinding>,
}

impl Task {
    /// A new attempt of one of a job's task indexes: pending, and not to be placed
    /// before `not_before` (a restart's back-off).
    pub fn pending(job: &Job, index: u32, attempt: u32, now: Millis, not_before: Millis) -> Task {
        Task {
            id: TaskId::generate(),
            project: job.project.clone(),
            job_id: job.id.clone(),
            job_name: job.name.clone(),
            index,
            attempt,
            state: TaskState::Pending,
            node_id: None,
            reason: String::new(),
            exit: None,
            desired_stop: false,
            stop_forced: false,
            not_before,
            created_at: now,
            updated_at: now,
            ports: Vec::new(),
        }
    }

    /// Moves the task forward; returns false (and changes nothing) for a stale move.
    pub fn advance(
        &mut self,
        next: TaskState,
        reason: &str,
        exit: Option<Exit>,
        at: Millis,
    ) -> bool {
        if !self.state.can_move_to(next) {
            return false;
        }
        self.state = next;
        if !reason.is_empty() || next.is_terminal() {
            self.reason = reason.to_string();
        }
        if exit.is_some() {
            self.exit = exit;
        }
        self.updated_at = at;
        true
    }
}

/// The lifecycle of a job as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Tasks are pending, starting or running.
    Running,
    /// A batch job whose every task succeeded.
    Complete,
    /// A batch job with a task that failed after its last retry.
    Failed,
    /// Stopped by a user.
    Stopped,
}

impl JobStatus {
    pub fn is_final(self) -> bool {
        !matches!(self, JobStatus::Running)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Running => "running",
            JobStatus::Complete => "complete",
            JobStatus::Failed => "failed",
            JobStatus::Stopped => "stopped",
        }
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A submitted job, as the controller stores it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    pub project: ProjectId,
    pub name: String,
    /// Bumped each time the same name is applied with a different spec.
    pub version: u32,
    pub spec: JobSpec,
    pub status: JobStatus,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<Exit>,
    pub created_at: Millis,
    pub updated_at: Millis,
    /// The `Idempotency-Key` of the request that created this version, so that a retry
    /// of that request gets this version back instead of making another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// For a version of a service that replaces a running one: how far the replacement
    /// of the old tasks has got. Kept with the job, so a restarted controller carries
    /// on where it was; absent from records older than rollouts, which load as having
    /// none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
}

/// Where a rollout stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RolloutState {
    /// Old tasks are being replaced, a few indexes at a time.
    InProgress,
    /// Every index runs the new version; the old versions are stopped.
    Complete,
    /// A new task failed before it had been healthy long enough: nothing more is
    /// replaced, and the old tasks still running keep running.
    Failed,
    /// Ended before it finished, without failing: a newer version took over, or the
    /// job was stopped. `reason` says which.
    Stopped,
    /// A state this client does not know, from a newer server.
    #[serde(other)]
    Unknown,
}

impl RolloutState {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::InProgress => "in-progress",
            RolloutState::Complete => "complete",
            RolloutState::Failed => "failed",
            RolloutState::Stopped => "stopped",
            RolloutState::Unknown => "unknown",
        }
    }
}

impl fmt::Display for RolloutState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The replacement of a service's running tasks by those of a new version (the job
/// record it is kept on), one index after another.
///
/// For an index in `in_flight` the old task has been asked to stop, and the new one is
/// started once the old one has ended; the index is `done` when its new task has been
/// running for the spec's `update.min_healthy_time`. Indexes the old versions never
/// ran are started at once and are done the same way. Both sets hold indexes below the
/// job's count, so they are bounded by it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// The version that was running when the rollout began; its tasks, and those of any
    /// older version still running, are the ones replaced.
    pub from_version: u32,
    pub state: RolloutState,
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub in_flight: BTreeSet<u32>,
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub done: BTreeSet<u32>,
    /// Why it failed or stopped, in a sentence: "rollout to version 3 failed: web[1]
    /// exited with code 1".
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    pub started_at: Millis,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Millis>,
}

impl Rollout {
    /// A rollout from `from_version`, just begun.
    pub fn start(from_version: u32, now: Millis) -> Rollout {
        Rollout {
            from_version,
            state: RolloutState::InProgress,
            in_flight: BTreeSet::new(),
            done: BTreeSet::new(),
            reason: String::new(),
            started_at: now,
            finished_at: None,
        }
    }

    /// Whether it still replaces tasks.
    pub fn in_progress(&self) -> bool {
        self.state == RolloutState::InProgress
    }

    /// How many of a job's `count` indexes run the new version and have been healthy
    /// for long enough.
    pub fn updated(&self, count: u32) -> usize {
        self.done.range(..count).count()
    }
}

impl Job {
    /// A new version of a job, running from `now`.
    pub fn new(project: ProjectId, spec: JobSpec, version: u32, now: Millis) -> Job {
        Job {
            id: JobId::generate(),
            project,
            name: spec.name.clone(),
            version,
            spec,
            status: JobStatus::Running,
            reason: String::new(),
            exit: None,
            created_at: now,
            updated_at: now,
            idempotency_key: None,
            rollout: None,
        }
    }
}

/// Whether a node is taking work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    Ready,
    /// Unreachable for longer than the controller keeps a node: its tasks that were
    /// still unknown are lost, and it comes back as a new registration of the same id.
    Lost,
    /// Not connected: it closed its connection, or missed heartbeats past the node
    /// timeout (then `unreachable_since` is set and its tasks are unknown).
    Disconnected,
}

impl fmt::Display for NodeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NodeStatus::Ready => "ready",
            NodeStatus::Lost => "lost",
            NodeStatus::Disconnected => "disconnected",
        })
    }
}

/// What a node offers, as it reported at registration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    /// `os/arch[/variant]`, normalised (`linux/amd64/v3`, `linux/arm64/v8.2`); see
    /// [`crate::platform::Platform`].
    pub platform: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub runtimes: Vec<RuntimeKind>,
    /// Total capacity available to tasks.
    pub capacity: Resources,
    #[serde(default)]
    pub agent_version: String,
    /// What the runtimes' fingerprints found, as `RUNTIME.KEY` (e.g. `docker.version`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
    /// The machine's C library; absent from agents that predate its reporting.
    #[serde(default)]
    pub libc: Option<Libc>,
    /// The raw `uname` values the platform was derived from. Boxed because they are
    /// rarely read and would otherwise make every agent `Hello` message much larger.
    #[serde(default)]
    pub uname: Option<Box<Uname>>,
    /// The architecture the agent binary itself was built for (`amd64`), which can differ
    /// from the machine's (a 32-bit agent on a 64-bit kernel, or under emulation).
    #[serde(default)]
    pub agent_arch: String,
    /// Platforms the node runs through an emulator it was explicitly given (`qemu-user`,
    /// say). The scheduler uses them only when no node runs a job's artifact natively.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub emulates: Vec<Platform>,
}

impl NodeInfo {
    pub fn os(&self) -> &str {
        self.platform.split('/').next().unwrap_or("")
    }

    /// The architecture alone, without the variant (`amd64` for `linux/amd64/v3`).
    pub fn arch(&self) -> &str {
        self.platform.split('/').nth(1).unwrap_or("")
    }

    /// The variant, if the node reported one (`v3` for `linux/amd64/v3`).
    pub fn variant(&self) -> Option<&str> {
        self.platform.split('/').nth(2)
    }

    /// The platform without its variant (`linux/amd64` for `linux/amd64/v3`).
    pub fn os_arch(&self) -> &str {
        match self.platform.match_indices('/').nth(1) {
            Some((i, _)) => &self.platform[..i],
            None => &self.platform,
        }
    }

    /// The platform parsed, for matching binaries; `None` if the node sent one this
    /// controller does not know.
    pub fn parsed_platform(&self) -> Option<Platform> {
        self.platform.parse().ok()
    }
}

/// A node, as the controller stores it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub id: NodeId,
    pub info: NodeInfo,
    pub status: NodeStatus,
    pub last_seen: Millis,
    /// The highest agent event sequence number the controller has applied.
    pub last_event_seq: u64,
    pub registered_at: Millis,
    /// When the node was found silent past the node timeout. While set, its tasks are
    /// unknown: neither finished nor failed, waited for until their job's `lost_after`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreachable_since: Option<Millis>,
    /// The agent protocol version agreed at the node's last hello; 0 for records from
    /// before it was kept.
    #[serde(default)]
    pub protocol_version: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_only_move_forward() {
        use TaskState::*;
        assert!(Pending.can_move_to(Scheduled));
        assert!(Pending.can_move_to(Stopped));
        assert!(Running.can_move_to(Succeeded));
        assert!(!Running.can_move_to(Starting));
        assert!(!Running.can_move_to(Running));
        for t in [Succeeded, Failed, Stopped, Lost] {
            for n in TaskState::ALL {
                assert!(!t.can_move_to(n), "{t} -> {n}");
            }
        }
        for s in TaskState::ALL {
            assert_eq!(TaskState::parse(s.as_str()), Some(s));
        }
    }

    #[test]
    fn a_stale_event_changes_nothing() {
        let mut t = Task {
            id: TaskId::generate(),
            project: ProjectId::default(),
            job_id: JobId::generate(),
            job_name: "j".into(),
            index: 0,
            attempt: 0,
            state: TaskState::Running,
            node_id: None,
            reason: String::new(),
            exit: None,
            desired_stop: false,
            stop_forced: false,
            not_before: 0,
            created_at: 0,
            updated_at: 1,
            ports: Vec::new(),
        };
        assert!(t.advance(
            TaskState::Failed,
            "exit 3",
            Some(Exit {
                code: Some(3),
                signal: None
            }),
            5
        ));
        let before = t.clone();
        assert!(!t.advance(TaskState::Running, "", None, 9));
        assert!(!t.advance(TaskState::Succeeded, "late", None, 9));
        assert_eq!(t, before);
    }

    #[test]
    fn node_platform_helpers_split_os_arch_and_variant() {
        let json = serde_json::json!({
            "name": "n1",
            "platform": "linux/amd64/v3",
            "runtimes": ["process"],
            "capacity": {"cpu": 1.0, "memory": "1Gi"},
        });
        // A registration from an agent that reports no libc, uname or agent arch.
        let mut info: NodeInfo = serde_json::from_value(json).unwrap();
        assert_eq!(
            (info.os(), info.arch(), info.variant()),
            ("linux", "amd64", Some("v3"))
        );
        assert_eq!(info.os_arch(), "linux/amd64");
        assert_eq!(
            info.parsed_platform().unwrap().to_string(),
            "linux/amd64/v3"
        );
        assert_eq!((info.libc.clone(), info.uname.clone()), (None, None));
        assert_eq!(info.agent_arch, "");
        info.platform = "linux/arm64".into();
        assert_eq!(
            (info.os(), info.arch(), info.variant()),
            ("linux", "arm64", None)
        );
        assert_eq!(info.os_arch(), "linux/arm64");
    }
}

/// One cached environment on a node (a `runtime_env.python` virtual environment), as
/// its agent reports it and `drover env ls` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EnvInfo {
    pub key: String,
    pub requirements: Vec<String>,
    /// The interpreter's version number, e.g. `3.11.7`.
    pub python: String,
    /// Bytes on disk.
    pub size: u64,
    /// Unix milliseconds of the last lease or release.
    pub last_used_ms: u64,
    /// Running tasks using it now.
    pub in_use: u32,
}
