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

impl fmt::Display for Exit {
    /// How the process ended, as the agent words it: `exited with code 1`, `killed by
    /// SIGKILL`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.code, &self.signal) {
            (Some(c), _) => write!(f, "exited with code {c}"),
            (None, Some(s)) => write!(f, "killed by {s}"),
            (None, None) => f.write_str("ended"),
        }
    }
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
    /// For a pipeline vertex's replica: its message counts since it started. Since
    /// protocol version 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plane: Option<PlaneCounts>,
}

/// A vertex replica's message counts since it started, from its agent's data plane.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlaneCounts {
    /// Messages handed to the program (maps and sinks) or read from it (sources).
    pub read: u64,
    /// Messages written downstream.
    pub written: u64,
    /// Input messages acknowledged.
    pub acked: u64,
    /// Writes downstream refused because a buffer was full (back-pressure).
    pub backpressured: u64,
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
    /// What happened to the task, oldest first, at most [`Task::MAX_EVENTS`] (see
    /// [`Task::record`]). Absent from records older than the timeline, and left out of
    /// task listings, which would otherwise carry every task's history.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<TaskEvent>,
}

/// What kind of thing happened to a task, for its timeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskEventKind {
    /// A new index of a service scaled up.
    Created,
    /// A new attempt of an index whose previous attempt ended: why, and its back-off.
    Restart,
    /// A second copy of an index whose task is on an unreachable node.
    Replacement,
    /// The scheduler placed the task on a node.
    Placed,
    /// The agent began preparing it (directory, files, environment, image).
    Preparing,
    /// One step of its preparation is done: its working_dir unpacked, its Python
    /// environment built or reused, its artifact installed, its image ready.
    Prepared,
    /// The agent is starting it through its runtime.
    Starting,
    /// It runs (for a task with a health check, a probe has passed).
    Started,
    /// The job's health check passed.
    HealthPassed,
    /// The controller asked its agent to stop it, and why.
    StopRequested,
    /// Its agent is stopping it.
    Stopping,
    /// Its process ended with an exit code or a signal.
    Exited,
    /// It failed without an exit of its own (its preparation failed, a deadline passed).
    Failed,
    Stopped,
    Lost,
    /// Events left out between the first few and the latest, so that the list stays
    /// bounded; [`TaskEvent::omitted`] says how many.
    Omitted,
    /// A kind this build does not know, from a newer server.
    #[serde(other)]
    Unknown,
}

impl TaskEventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskEventKind::Created => "created",
            TaskEventKind::Restart => "restart",
            TaskEventKind::Replacement => "replacement",
            TaskEventKind::Placed => "placed",
            TaskEventKind::Preparing => "preparing",
            TaskEventKind::Prepared => "prepared",
            TaskEventKind::Starting => "starting",
            TaskEventKind::Started => "started",
            TaskEventKind::HealthPassed => "health_passed",
            TaskEventKind::StopRequested => "stop_requested",
            TaskEventKind::Stopping => "stopping",
            TaskEventKind::Exited => "exited",
            TaskEventKind::Failed => "failed",
            TaskEventKind::Stopped => "stopped",
            TaskEventKind::Lost => "lost",
            TaskEventKind::Omitted => "omitted",
            TaskEventKind::Unknown => "unknown",
        }
    }
}

impl TaskEventKind {
    /// The kind for people, which is also the line of an event without a message.
    pub fn label(self) -> &'static str {
        match self {
            TaskEventKind::Created => "created",
            TaskEventKind::Restart => "restart",
            TaskEventKind::Replacement => "replacement",
            TaskEventKind::Placed => "placed",
            TaskEventKind::Preparing => "preparing",
            TaskEventKind::Prepared => "prepared",
            TaskEventKind::Starting => "starting",
            TaskEventKind::Started => "started",
            TaskEventKind::HealthPassed => "health check passed",
            TaskEventKind::StopRequested => "stop requested",
            TaskEventKind::Stopping => "stopping",
            TaskEventKind::Exited => "exited",
            TaskEventKind::Failed => "failed",
            TaskEventKind::Stopped => "stopped",
            TaskEventKind::Lost => "lost",
            TaskEventKind::Omitted => "earlier events left out",
            TaskEventKind::Unknown => "an event this client does not know",
        }
    }
}

impl fmt::Display for TaskEventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry of a task's timeline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskEvent {
    /// When it happened, in Unix milliseconds like every other time.
    pub at: Millis,
    pub kind: TaskEventKind,
    /// What happened, for people: a whole line such as `placed on node n1` or `exited
    /// with code 1`. Empty when the kind says it all (`preparing`, `starting`, a
    /// `started` with no ports); [`TaskEvent::text`] gives the line either way.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// For an [`TaskEventKind::Omitted`] marker, how many events it stands for.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub omitted: u32,
}

impl TaskEvent {
    /// The event's line: its message, or its kind's label when it has none.
    pub fn text(&self) -> &str {
        if self.message.is_empty() {
            self.kind.label()
        } else {
            &self.message
        }
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
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
            events: Vec::new(),
        }
    }

    /// The most events a task keeps. A task that has lived long enough to have more
    /// keeps its first [`Task::KEEP_FIRST`] (how it began), a marker saying how many
    /// were left out, and the latest.
    pub const MAX_EVENTS: usize = 32;

    /// How many of the oldest events are always kept.
    pub const KEEP_FIRST: usize = 8;

    /// Adds an event to the task's timeline, at `at` or, should that be earlier than the
    /// latest event or the task's creation (clocks of different machines), at that
    /// time, so the timeline stays in order. Past [`Task::MAX_EVENTS`] the oldest event after the
    /// first few is dropped and counted in a marker in its place.
    pub fn record(&mut self, at: Millis, kind: TaskEventKind, message: impl Into<String>) {
        let floor = self.events.last().map_or(self.created_at, |last| last.at);
        let at = at.max(floor);
        if self.events.len() >= Self::MAX_EVENTS {
            self.omit_one();
        }
        self.events.push(TaskEvent {
            at,
            kind,
            message: message.into(),
            omitted: 0,
        });
    }

    /// Frees one place in a full timeline: the event after the first few goes, counted
    /// in the marker that stands where the left-out events were.
    fn omit_one(&mut self) {
        let first = Self::KEEP_FIRST;
        let Some(slot) = self.events.get(first) else {
            return;
        };
        if slot.kind != TaskEventKind::Omitted {
            // The first overflow turns the event at the marker's place into the marker,
            // which counts that event; the next one is dropped below to make room.
            let dropped = &mut self.events[first];
            dropped.kind = TaskEventKind::Omitted;
            dropped.omitted = 1;
        }
        if self.events.len() > first + 1 {
            let gone = self.events.remove(first + 1);
            let marker = &mut self.events[first];
            marker.omitted += 1;
            // The marker takes the time of the latest event it stands for, so that it
            // sorts between the kept events around it.
            marker.at = gone.at;
        }
        let marker = &mut self.events[first];
        marker.message = format!(
            "{} earlier event{} left out",
            marker.omitted,
            if marker.omitted == 1 { "" } else { "s" }
        );
    }

    /// Moves the task forward; returns false (and changes nothing) for a stale move.
    /// The move is recorded in the task's timeline at `at`.
    pub fn advance(
        &mut self,
        next: TaskState,
        reason: &str,
        exit: Option<Exit>,
        at: Millis,
    ) -> bool {
        self.advance_reported(next, reason, exit, at, at)
    }

    /// [`Task::advance`] for a move an agent reported: `at` is when the controller
    /// applies it (which deadlines count from), `happened` when the agent saw it, which
    /// the timeline records (a replayed event can be minutes old). A `happened` later
    /// than `at` (a node's clock ahead of the controller's) is taken as `at`.
    pub fn advance_reported(
        &mut self,
        next: TaskState,
        reason: &str,
        exit: Option<Exit>,
        at: Millis,
        happened: Millis,
    ) -> bool {
        if next == self.state && next == TaskState::Preparing && !reason.is_empty() {
            return self.note_prepared(reason, happened.min(at));
        }
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
        let (kind, message) = self.describe_move(reason);
        self.record(happened.min(at), kind, message);
        true
    }

    /// Records a step of the task's preparation that its agent reported (as `preparing`
    /// again, with what the step did), unless the latest such note says the same, as
    /// a replayed event would. The task's state, reason and deadlines stay as they are:
    /// an older controller ignores these reports as repeated moves, and nothing else
    /// depends on them. Returns whether the timeline changed.
    fn note_prepared(&mut self, what: &str, at: Millis) -> bool {
        let seen = self
            .events
            .iter()
            .rev()
            .take_while(|e| e.kind != TaskEventKind::Preparing)
            .any(|e| e.kind == TaskEventKind::Prepared && e.message == what);
        if seen {
            return false;
        }
        self.record(at, TaskEventKind::Prepared, what);
        true
    }

    /// The timeline entry for the move the task just made into its current state.
    fn describe_move(&self, reason: &str) -> (TaskEventKind, String) {
        // A move with nothing to add to its kind's label keeps no message of its own
        // (see [`TaskEvent::text`]): most moves are those, and every task has several.
        let with = |what: &str| {
            if reason.is_empty() {
                String::new()
            } else {
                format!("{what}: {reason}")
            }
        };
        match self.state {
            TaskState::Pending => (TaskEventKind::Created, with("created")),
            TaskState::Scheduled => (TaskEventKind::Placed, with("placed")),
            TaskState::Preparing => (TaskEventKind::Preparing, with("preparing")),
            TaskState::Starting => (TaskEventKind::Starting, with("starting")),
            TaskState::Running => {
                let mut m = String::new();
                if !self.ports.is_empty() {
                    let ports: Vec<String> = self.ports.iter().map(|p| p.to_string()).collect();
                    m.push_str(&format!(", ports {}", ports.join(",")));
                }
                if !reason.is_empty() {
                    m.push_str(&format!(" ({reason})"));
                }
                if !m.is_empty() {
                    m.insert_str(0, "started");
                }
                (TaskEventKind::Started, m)
            }
            TaskState::Stopping => (TaskEventKind::Stopping, with("stopping")),
            TaskState::Succeeded => {
                let m = if reason.is_empty() {
                    "exited with code 0".to_string()
                } else {
                    format!("exited with code 0 ({reason})")
                };
                (TaskEventKind::Exited, m)
            }
            TaskState::Failed => match &self.exit {
                // The agent's reason already says how the process ended ("exited with
                // code 1", "killed by SIGKILL", "oom: ...").
                Some(_) if !reason.is_empty() => (TaskEventKind::Exited, reason.to_string()),
                Some(e) => (TaskEventKind::Exited, e.to_string()),
                None => (TaskEventKind::Failed, with("failed")),
            },
            TaskState::Stopped => (TaskEventKind::Stopped, with("stopped")),
            TaskState::Lost => (TaskEventKind::Lost, with("lost")),
        }
    }

    /// The task without its timeline, for listings of many tasks.
    pub fn without_events(&self) -> Task {
        Task {
            id: self.id.clone(),
            project: self.project.clone(),
            job_id: self.job_id.clone(),
            job_name: self.job_name.clone(),
            index: self.index,
            attempt: self.attempt,
            state: self.state,
            node_id: self.node_id.clone(),
            reason: self.reason.clone(),
            exit: self.exit.clone(),
            desired_stop: self.desired_stop,
            stop_forced: self.stop_forced,
            not_before: self.not_before,
            created_at: self.created_at,
            updated_at: self.updated_at,
            ports: self.ports.clone(),
            events: Vec::new(),
        }
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

    /// Whether the node's agent gives tasks of `runtime` their job's `stdin` (it says so
    /// with the attribute `RUNTIME.stdin`; see [`crate::spec::STDIN_ATTRIBUTE`]).
    pub fn takes_stdin(&self, runtime: &RuntimeKind) -> bool {
        self.attributes
            .get(&format!("{runtime}.{}", crate::spec::STDIN_ATTRIBUTE))
            .is_some_and(|v| v == "true")
    }

    /// Whether the node's agent serves tasks of `runtime` as pipeline vertex replicas
    /// (the attribute `RUNTIME.vertex`; see [`crate::spec::VERTEX_ATTRIBUTE`]).
    pub fn runs_vertices(&self, runtime: &RuntimeKind) -> bool {
        self.attributes
            .get(&format!("{runtime}.{}", crate::spec::VERTEX_ATTRIBUTE))
            .is_some_and(|v| v == "true")
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
            events: Vec::new(),
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

    fn a_task() -> Task {
        let job = Job::new(
            ProjectId::default(),
            JobSpec::new("j", vec!["true".into()]),
            1,
            0,
        );
        Task::pending(&job, 0, 0, 0, 0)
    }

    #[test]
    fn advance_records_each_move_in_the_timeline() {
        let mut t = a_task();
        t.record(10, TaskEventKind::Placed, "placed on node n1");
        assert!(t.advance_reported(TaskState::Preparing, "", None, 20, 15));
        assert!(t.advance(TaskState::Starting, "", None, 30));
        t.ports = vec![PortBinding {
            container: 80,
            host: 8080,
        }];
        assert!(t.advance(TaskState::Running, "", None, 40));
        let exit = Exit {
            code: Some(1),
            signal: None,
        };
        assert!(t.advance(TaskState::Failed, "exited with code 1", Some(exit), 50));
        // A stale move records nothing.
        assert!(!t.advance(TaskState::Running, "", None, 60));
        let seen: Vec<(Millis, TaskEventKind, &str)> =
            t.events.iter().map(|e| (e.at, e.kind, e.text())).collect();
        assert_eq!(
            seen,
            vec![
                (10, TaskEventKind::Placed, "placed on node n1"),
                (15, TaskEventKind::Preparing, "preparing"),
                (30, TaskEventKind::Starting, "starting"),
                (40, TaskEventKind::Started, "started, ports 8080->80"),
                (50, TaskEventKind::Exited, "exited with code 1"),
            ]
        );
        // A move its kind says all about stores no message.
        assert_eq!(t.events[1].message, "");
        // A failure without an exit of its own, and an agent clock behind the
        // controller's (the event keeps the timeline in order) or ahead of it (the
        // controller's time is taken).
        let mut t = a_task();
        t.record(100, TaskEventKind::Placed, "placed on node n1");
        assert!(t.advance_reported(TaskState::Preparing, "", None, 110, 90));
        assert!(t.advance_reported(
            TaskState::Failed,
            "runtime_env.python: no pip",
            None,
            120,
            500
        ));
        let last = &t.events[2];
        assert_eq!(t.events[1].at, 100);
        assert_eq!(
            (last.at, last.kind, last.message.as_str()),
            (
                120,
                TaskEventKind::Failed,
                "failed: runtime_env.python: no pip"
            )
        );
    }

    #[test]
    fn preparation_steps_join_the_timeline_once_and_change_nothing_else() {
        let mut t = a_task();
        assert!(t.advance_reported(TaskState::Preparing, "", None, 20, 20));
        let updated = t.updated_at;
        assert!(t.advance_reported(
            TaskState::Preparing,
            "working_dir unpacked: 3 files, 120 bytes",
            None,
            30,
            25
        ));
        assert!(t.advance_reported(
            TaskState::Preparing,
            "python environment ready in 4.2s",
            None,
            40,
            40
        ));
        // A replayed report of a step adds nothing.
        assert!(!t.advance_reported(
            TaskState::Preparing,
            "working_dir unpacked: 3 files, 120 bytes",
            None,
            50,
            25
        ));
        assert_eq!(t.state, TaskState::Preparing);
        assert_eq!(
            t.updated_at, updated,
            "the prepare deadline still counts from its start"
        );
        assert_eq!(t.reason, "");
        let seen: Vec<(TaskEventKind, &str)> =
            t.events.iter().map(|e| (e.kind, e.text())).collect();
        assert_eq!(
            seen,
            [
                (TaskEventKind::Preparing, "preparing"),
                (
                    TaskEventKind::Prepared,
                    "working_dir unpacked: 3 files, 120 bytes"
                ),
                (TaskEventKind::Prepared, "python environment ready in 4.2s"),
            ]
        );
        // Once it has moved on, a late note of its preparation is still not a move.
        assert!(t.advance(TaskState::Starting, "", None, 60));
        assert!(!t.advance_reported(TaskState::Preparing, "image x ready", None, 70, 70));
        assert_eq!(t.state, TaskState::Starting);
    }

    #[test]
    fn the_timeline_keeps_its_beginning_and_latest_events_within_its_bound() {
        let mut t = a_task();
        let total = Task::MAX_EVENTS as i64 + 25;
        for i in 0..total {
            t.record(i, TaskEventKind::Started, format!("event {i}"));
            assert!(
                t.events.len() <= Task::MAX_EVENTS,
                "after {i}: {}",
                t.events.len()
            );
        }
        assert_eq!(t.events.len(), Task::MAX_EVENTS);
        for (i, e) in t.events.iter().take(Task::KEEP_FIRST).enumerate() {
            assert_eq!(e.message, format!("event {i}"));
        }
        let marker = &t.events[Task::KEEP_FIRST];
        let kept_latest = Task::MAX_EVENTS - Task::KEEP_FIRST - 1;
        let omitted = total as usize - Task::KEEP_FIRST - kept_latest;
        assert_eq!(marker.kind, TaskEventKind::Omitted);
        assert_eq!(marker.omitted as usize, omitted);
        assert_eq!(marker.message, format!("{omitted} earlier events left out"));
        // The marker sorts between the kept events around it.
        assert!(t.events.windows(2).all(|w| w[0].at <= w[1].at));
        let latest: Vec<String> = t.events[Task::KEEP_FIRST + 1..]
            .iter()
            .map(|e| e.message.clone())
            .collect();
        let want: Vec<String> = (total - kept_latest as i64..total)
            .map(|i| format!("event {i}"))
            .collect();
        assert_eq!(latest, want);
        // Listings leave the timeline out; the task is otherwise the same.
        let brief = t.without_events();
        assert!(brief.events.is_empty());
        assert_eq!(
            Task {
                events: t.events.clone(),
                ..brief
            },
            t
        );
    }

    #[test]
    fn events_of_a_newer_server_and_records_without_a_timeline_are_read() {
        let mut t = a_task();
        let mut old = serde_json::to_value(&t).unwrap();
        assert!(
            old.get("events").is_none(),
            "an empty timeline is not written"
        );
        old.as_object_mut().unwrap().remove("events");
        assert_eq!(serde_json::from_value::<Task>(old).unwrap(), t);
        t.record(5, TaskEventKind::Placed, "placed on node n1");
        let mut v = serde_json::to_value(&t).unwrap();
        assert_eq!(
            v["events"],
            serde_json::json!([{"at": 5, "kind": "placed", "message": "placed on node n1"}])
        );
        v["events"][0]["kind"] = "teleported".into();
        let read: Task = serde_json::from_value(v).unwrap();
        assert_eq!(read.events[0].kind, TaskEventKind::Unknown);
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
