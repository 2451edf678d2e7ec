//! The shapes of the HTTP API's requests and responses, shared by the controller and
//! the CLI so the two cannot drift apart.

use crate::Millis;
use crate::ids::{JobId, TaskId};
use crate::protocol::LogStream;
use crate::spec::Resources;
use crate::state::{Exit, Job, JobStatus, Node, RolloutState, Task, TaskState};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The body of every error response.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    /// A stable machine-readable kind, one of [`ErrorCode`]'s (kept a string on the
    /// wire, so a client reads codes newer than itself).
    pub code: String,
}

/// Every kind of error the API answers with, as `code` in [`ErrorBody`]. One list, so a
/// client can rely on the codes and a handler cannot invent one; each has one HTTP
/// status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The request has no token, or one that is invalid or revoked.
    Unauthorized,
    /// The token's role may not do this, or it names a project that is not its own.
    Forbidden,
    /// No such object, or one the caller may not see: both answer the same.
    NotFound,
    /// A prefix or name matches more than one object.
    Ambiguous,
    /// The body or a parameter could not be parsed.
    InvalidRequest,
    /// A job spec failed validation; the message names the field.
    InvalidSpec,
    /// A project name is not valid.
    InvalidProject,
    /// An artifact version failed validation.
    InvalidArtifact,
    /// A blob digest is not `sha256:` and 64 hex digits.
    InvalidDigest,
    /// An upload's bytes do not hash to the digest it was sent under.
    DigestMismatch,
    /// An artifact or job names a blob that has not been uploaded.
    MissingBlob,
    /// An upload ended before its declared length.
    UploadIncomplete,
    /// The object exists already and may not be replaced.
    Exists,
    /// The object is still used by something that must go first.
    InUse,
    /// The node is connected; its agent must stop first.
    Connected,
    /// The last active cluster admin token may not be revoked.
    LastClusterAdmin,
    /// The body is larger than the controller accepts.
    TooLarge,
    /// An idempotency key was reused for a different request.
    IdempotencyKeyReused,
    /// The controller failed to read or write its own files.
    Internal,
    /// The store did not take the change; nothing was done, and the request may be retried.
    StoreUnavailable,
    /// A pipeline buffer is at its usage limit; retry the same request later.
    BufferFull,
    /// A pipeline buffer could not be written (its backend failed); the request may be
    /// retried.
    BufferUnavailable,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 22] = [
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::Ambiguous,
        ErrorCode::InvalidRequest,
        ErrorCode::InvalidSpec,
        ErrorCode::InvalidProject,
        ErrorCode::InvalidArtifact,
        ErrorCode::InvalidDigest,
        ErrorCode::DigestMismatch,
        ErrorCode::MissingBlob,
        ErrorCode::UploadIncomplete,
        ErrorCode::Exists,
        ErrorCode::InUse,
        ErrorCode::Connected,
        ErrorCode::LastClusterAdmin,
        ErrorCode::TooLarge,
        ErrorCode::IdempotencyKeyReused,
        ErrorCode::Internal,
        ErrorCode::StoreUnavailable,
        ErrorCode::BufferFull,
        ErrorCode::BufferUnavailable,
    ];

    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Ambiguous => "ambiguous",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::InvalidSpec => "invalid_spec",
            ErrorCode::InvalidProject => "invalid_project",
            ErrorCode::InvalidArtifact => "invalid_artifact",
            ErrorCode::InvalidDigest => "invalid_digest",
            ErrorCode::DigestMismatch => "digest_mismatch",
            ErrorCode::MissingBlob => "missing_blob",
            ErrorCode::UploadIncomplete => "upload_incomplete",
            ErrorCode::Exists => "exists",
            ErrorCode::InUse => "in_use",
            ErrorCode::Connected => "connected",
            ErrorCode::LastClusterAdmin => "last_cluster_admin",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::IdempotencyKeyReused => "idempotency_key_reused",
            ErrorCode::Internal => "internal",
            ErrorCode::StoreUnavailable => "store_unavailable",
            ErrorCode::BufferFull => "buffer_full",
            ErrorCode::BufferUnavailable => "buffer_unavailable",
        }
    }

    /// The HTTP status an error of this kind is answered with.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::Ambiguous => 400,
            ErrorCode::InvalidRequest => 400,
            ErrorCode::InvalidSpec => 400,
            ErrorCode::InvalidProject => 400,
            ErrorCode::InvalidArtifact => 400,
            ErrorCode::InvalidDigest => 400,
            ErrorCode::DigestMismatch => 400,
            ErrorCode::MissingBlob => 400,
            ErrorCode::UploadIncomplete => 400,
            ErrorCode::Exists => 409,
            ErrorCode::InUse => 409,
            ErrorCode::Connected => 409,
            ErrorCode::LastClusterAdmin => 409,
            ErrorCode::TooLarge => 413,
            ErrorCode::IdempotencyKeyReused => 422,
            ErrorCode::Internal => 500,
            ErrorCode::StoreUnavailable => 503,
            ErrorCode::BufferFull => 429,
            ErrorCode::BufferUnavailable => 503,
        }
    }

    /// The code named `s`; `None` for one this version does not know (a newer server).
    pub fn parse(s: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The request header that makes a submission safe to retry: a repeat with the same key
/// (in the same project, within [`IDEMPOTENCY_WINDOW_MS`]) gets the first answer back.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

/// How long an idempotency key is remembered: 24 hours.
pub const IDEMPOTENCY_WINDOW_MS: i64 = 24 * 3600 * 1000;

/// Checks an idempotency key from a request: 1 to 255 visible ASCII characters.
pub fn parse_idempotency_key(key: &str) -> Result<String, String> {
    if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "header {IDEMPOTENCY_KEY_HEADER}: expected 1 to 255 visible ASCII characters (a UUID, say), got {} bytes",
            key.len()
        ));
    }
    Ok(key.to_string())
}

/// What `POST /v1/jobs` answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApplyResponse {
    pub job: JobView,
    /// `created`, `updated` (a new version: the spec changed, or a rerun was asked for),
    /// `rolling out version N` (a new version of a running service, whose tasks replace
    /// the old ones a few at a time: the job's `rollout` says how far it has got),
    /// `scaled` (a running service's count alone changed: tasks were added or stopped,
    /// the others left running, same version) or `unchanged` (the same spec as the
    /// current version, running or finished).
    pub result: String,
}

/// `POST /v1/plan`: what `POST /v1/jobs` would do with the same body, worked out
/// without changing anything (nothing is stored, no task is made, no idempotency key is
/// used up).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanResponse {
    /// The job's name, from the spec.
    pub name: String,
    /// The project the job is (or would be) in: the caller's.
    pub project: crate::ids::ProjectId,
    pub action: PlanAction,
    /// The current version of the job of that name, if there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_version: Option<u32>,
    /// The version the job has after applying: a new one for `create`, `update` and
    /// `re-run`, the current one otherwise.
    pub version: u32,
    /// For `scale`: the count before and after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<ScaleChange>,
    /// Every spec field that differs from the current version's, in path order; empty
    /// for `create`, `unchanged` and `re-run`.
    #[serde(default)]
    pub changes: Vec<FieldChange>,
    /// Whether the tasks applying would start can be placed.
    pub placement: PlacementPlan,
    /// The blob `runtime_env.working_dir` names when the caller has not uploaded it:
    /// applying the spec as it is would be refused until it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing_blob: Option<String>,
}

impl PlanResponse {
    /// Whether applying would change anything.
    pub fn changes_something(&self) -> bool {
        self.action != PlanAction::Unchanged
    }
}

/// What applying a spec does to the job of its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PlanAction {
    /// No job has the name: version 1 is made.
    Create,
    /// The spec changed: a new version, whose tasks replace all of the current one's.
    Update,
    /// A running service's spec changed only in `count`: tasks are added or stopped in
    /// place, the others keep running, the version stays.
    Scale,
    /// The same spec as the current version: nothing happens.
    Unchanged,
    /// The unchanged spec of a finished job, asked to run again (`rerun=true`): a new
    /// version.
    #[serde(rename = "re-run")]
    Rerun,
    /// An action this client does not know, from a newer server.
    #[serde(other)]
    Unknown,
}

impl PlanAction {
    pub fn as_str(self) -> &'static str {
        match self {
            PlanAction::Create => "create",
            PlanAction::Update => "update",
            PlanAction::Scale => "scale",
            PlanAction::Unchanged => "unchanged",
            PlanAction::Rerun => "re-run",
            PlanAction::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for PlanAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A count change of a running service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScaleChange {
    pub from: u32,
    pub to: u32,
}

/// One spec field that differs between two versions. A field absent (or null) on one
/// side has no `old` or no `new`: it is added or removed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FieldChange {
    /// Where the field is, e.g. `resources.cpu` or `env.GREETING`; a key that is not a
    /// plain word is quoted, as in `env["A.B"]`.
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new: Option<serde_json::Value>,
}

/// The fields of `new` that differ from `old`, from the specs as JSON, so every field
/// the spec has (and any it gains) is compared. Objects (the spec, its sections, maps
/// such as `env`) are compared key by key; anything else, lists included, is one value,
/// since a list reads better whole than as a change of its third element. The list is
/// as long as the specs are, which their own validation bounds.
pub fn spec_changes(old: &crate::JobSpec, new: &crate::JobSpec) -> Vec<FieldChange> {
    // A spec is plain data (strings, numbers, maps with string keys), so it always
    // turns into a JSON value; should that ever fail, the null compares as a change
    // of the whole spec rather than as no change.
    let old = serde_json::to_value(old).unwrap_or_default();
    let new = serde_json::to_value(new).unwrap_or_default();
    let mut out = Vec::new();
    diff_values(String::new(), Some(&old), Some(&new), &mut out);
    out
}

fn diff_values(
    path: String,
    old: Option<&serde_json::Value>,
    new: Option<&serde_json::Value>,
    out: &mut Vec<FieldChange>,
) {
    use serde_json::Value;
    // A null field and a missing one mean the same in a spec: not set.
    let old = old.filter(|v| !v.is_null());
    let new = new.filter(|v| !v.is_null());
    if old == new {
        return;
    }
    let fields = |v: Option<&Value>| match v {
        Some(Value::Object(m)) => Some(m.clone()),
        None => Some(serde_json::Map::new()),
        Some(_) => None,
    };
    // An object on one side and an object or nothing on the other is compared field by
    // field, so a section that appears lists what it sets.
    let objects = matches!(old, Some(Value::Object(_))) || matches!(new, Some(Value::Object(_)));
    if objects && let (Some(a), Some(b)) = (fields(old), fields(new)) {
        let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
        keys.sort();
        keys.dedup();
        for k in keys {
            diff_values(join_path(&path, k), a.get(k), b.get(k), out);
        }
        return;
    }
    out.push(FieldChange {
        path,
        old: old.cloned(),
        new: new.cloned(),
    });
}

/// `parent.key`, or `parent["key"]` for a key that is not a plain word.
fn join_path(parent: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    match (parent.is_empty(), plain) {
        (true, true) => key.to_string(),
        (false, true) => format!("{parent}.{key}"),
        (_, false) => format!("{parent}[{}]", serde_json::Value::from(key)),
    }
}

/// Whether the tasks a plan would start can be placed, as the scheduler would decide it
/// now: against the ready nodes and what their tasks hold, the job's tasks placed one
/// after another. Tasks still waiting in the queue are not counted, and neither is what
/// the current version's tasks would free when an update stops them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlacementPlan {
    /// How many tasks applying would start: every index for a new version, the new
    /// indexes of a scale up, none otherwise.
    pub tasks: u32,
    /// The first index of those tasks; they are placed in index order.
    #[serde(default)]
    pub first_index: u32,
    /// How many of them some ready node can take now.
    pub placed: u32,
    /// Where those would go, by node name, as the scheduler spreads them.
    #[serde(default)]
    pub nodes: BTreeMap<String, u32>,
    pub verdict: PlacementVerdict,
    /// Why the others cannot be placed, in the scheduler's words (as a pending task's
    /// reason would say it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// For tasks that would wait: whether they fit once the current version's tasks,
    /// which an update stops, have freed what they hold.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fits_after_current_stops: bool,
}

/// The placement of a plan's tasks in one word.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PlacementVerdict {
    /// Applying starts no task.
    Nothing,
    /// Every task fits on a ready node now.
    Fits,
    /// Some tasks find no room now (or no ready node) and would wait as pending until
    /// there is.
    Waits,
    /// No ready node could ever run the tasks as they are (runtime, platform,
    /// constraints, capacity): they cannot be placed on any node in the cluster.
    Blocked,
    /// A verdict this client does not know, from a newer server.
    #[serde(other)]
    Unknown,
}

impl PlacementVerdict {
    pub fn as_str(self) -> &'static str {
        match self {
            PlacementVerdict::Nothing => "nothing",
            PlacementVerdict::Fits => "fits",
            PlacementVerdict::Waits => "waits",
            PlacementVerdict::Blocked => "blocked",
            PlacementVerdict::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for PlacementVerdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A job with a summary of its tasks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobView {
    #[serde(flatten)]
    pub job: Job,
    /// How many of the current version's tasks are in each state, counting also the
    /// tasks of older versions that have not ended (the old tasks a rollout has not
    /// replaced yet, or ones still stopping).
    pub task_states: BTreeMap<TaskState, u32>,
    /// Why tasks are still pending, when they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_reason: Option<String>,
    /// What the job is doing, as people ask it; absent from older servers, whose
    /// clients fall back on `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<JobState>,
}

/// `DELETE /v1/jobs/{name}`: what was removed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RemovedJob {
    pub name: String,
    pub project: crate::ids::ProjectId,
    /// How many versions of the job were removed, each with its tasks and their logs.
    pub versions: usize,
    pub tasks: usize,
}

/// A job's state as its user reads it: the stored `status` says only whether the job is
/// still wanted and how it ended; this says whether it actually runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobState {
    /// Tasks wait for room on a node (or for a node), or are being prepared and
    /// started; none runs yet.
    Pending,
    /// No node in the cluster could ever run the tasks as they are (no node has the
    /// runtime, the platform, the labels or enough capacity): it waits until one joins.
    Blocked,
    /// Every task that should run does.
    Running,
    /// A service runs fewer tasks than its count.
    Degraded,
    /// A service's task keeps failing and is restarted with back-off.
    CrashLooping,
    /// A service's tasks are being replaced by those of its newest version, a few at a
    /// time; the job's `rollout` says how far it has got.
    RollingOut,
    /// A new version's task failed during its rollout: the rollout stopped, and the old
    /// tasks not yet replaced keep running. The job's `rollout.reason` says why.
    RolloutFailed,
    Succeeded,
    Failed,
    Stopped,
    /// A state this client does not know, from a newer server.
    #[serde(other)]
    Unknown,
}

/// How many failed attempts in a row make a service's task index crash-looping.
pub const CRASH_LOOP_FAILURES: usize = 3;

impl JobState {
    /// The state of `job` from its current version's tasks; `blocked` says whether the
    /// scheduler found that no ready node could ever run its pending tasks.
    pub fn of<'a>(job: &Job, tasks: impl IntoIterator<Item = &'a Task>, blocked: bool) -> JobState {
        match job.status {
            JobStatus::Complete => return JobState::Succeeded,
            JobStatus::Failed => return JobState::Failed,
            JobStatus::Stopped => return JobState::Stopped,
            JobStatus::Running => {}
        }
        match job.rollout.as_ref().map(|r| r.state) {
            Some(RolloutState::InProgress) => return JobState::RollingOut,
            Some(RolloutState::Failed) => return JobState::RolloutFailed,
            _ => {}
        }
        let mut by_index: BTreeMap<u32, Vec<&Task>> = BTreeMap::new();
        for t in tasks {
            by_index.entry(t.index).or_default().push(t);
        }
        let service = job.spec.kind == crate::spec::JobKind::Service;
        let mut running = 0usize;
        let mut live = 0usize;
        let mut looping = false;
        for attempts in by_index.values_mut() {
            attempts.sort_by_key(|t| t.attempt);
            let latest = attempts.last().map(|t| t.state);
            running += usize::from(latest == Some(TaskState::Running));
            live += usize::from(latest.is_some_and(|s| !s.is_terminal()));
            let failed_in_a_row = attempts
                .iter()
                .rev()
                .filter(|t| t.state.is_terminal())
                .take_while(|t| t.state == TaskState::Failed)
                .count();
            looping |= service
                && latest != Some(TaskState::Running)
                && failed_in_a_row >= CRASH_LOOP_FAILURES;
        }
        if looping {
            JobState::CrashLooping
        } else if running == 0 && live > 0 && blocked {
            JobState::Blocked
        } else if running == 0 {
            JobState::Pending
        } else if service && running < job.spec.count as usize {
            JobState::Degraded
        } else {
            JobState::Running
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Blocked => "blocked",
            JobState::Running => "running",
            JobState::Degraded => "degraded",
            JobState::CrashLooping => "crash-looping",
            JobState::RollingOut => "rolling-out",
            JobState::RolloutFailed => "rollout-failed",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Stopped => "stopped",
            JobState::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A task with its node's name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskView {
    #[serde(flatten)]
    pub task: Task,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// The latest resource sample of a running task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<crate::state::TaskUsage>,
    /// Whether the task's node is unreachable, so that its state is only the last one
    /// known: the task may have finished, or still run, out of sight.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unknown: bool,
    /// Why a pending task is not placed yet (its job's pending reason).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_reason: Option<String>,
    /// The version of the job the task runs, so that a listing during a rollout can
    /// tell old tasks from new; absent from older servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
}

/// A node with what is allocated on it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    #[serde(flatten)]
    pub node: Node,
    pub allocated: Resources,
    pub tasks: u32,
}

/// One line of a log follow stream (`GET /v1/jobs/{name}/logs?follow=true`), sent as
/// newline-delimited JSON.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StreamEvent {
    Log {
        task_id: TaskId,
        index: u32,
        stream: LogStream,
        offset: u64,
        /// The bytes as text, invalid UTF-8 replaced.
        data: String,
        /// How many bytes before `offset` were dropped by the job's `logs.max_size`
        /// since the last event of this stream: the reader has a hole there.
        #[serde(default, skip_serializing_if = "is_zero")]
        dropped: u64,
        /// When the agent read these bytes from the task's file (RFC 3339), sent when
        /// the stream was asked for `timestamps`; absent when unknown (output stored
        /// before the controller kept times, or a damaged time index) and from older
        /// servers. One time per chunk of output, not per line.
        #[serde(
            default,
            skip_serializing_if = "Option::is_none",
            with = "crate::logtime::rfc3339_opt"
        )]
        time: Option<crate::Millis>,
    },
    Task {
        task_id: TaskId,
        index: u32,
        state: TaskState,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exit: Option<Exit>,
    },
    /// The job reached a final status; the stream ends after this.
    Job {
        job_id: JobId,
        status: JobStatus,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exit: Option<Exit>,
    },
    /// Sent when nothing else happened for a while, so clients see the stream is alive.
    Keepalive { at: Millis },
}

/// `GET /v1/tasks/{id}/logs` without follow: the stored bytes of both streams.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskLogs {
    pub task_id: TaskId,
    pub stdout: String,
    pub stderr: String,
}

/// `GET /health`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
    pub version: String,
    /// The commit the server was built from; absent from older servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    pub nodes_ready: u32,
}

/// One cached environment on one node, as `GET /v1/envs` lists it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeEnvView {
    pub node_id: crate::NodeId,
    pub node_name: String,
    /// What kind of environment: `python`.
    pub kind: String,
    #[serde(flatten)]
    pub env: crate::state::EnvInfo,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The response header on `HEAD /v1/blobs/{digest}` that gives the largest blob the
/// controller accepts, so a client can refuse a larger upload before sending it.
pub const MAX_BLOB_SIZE_HEADER: &str = "drover-max-blob-size";

#[cfg(test)]
mod tests {
    use super::ErrorCode;

    #[test]
    fn error_codes_are_distinct_round_trip_and_have_error_statuses() {
        let mut seen = std::collections::HashSet::new();
        for c in ErrorCode::ALL {
            assert!(seen.insert(c.as_str()), "{c} twice");
            assert_eq!(ErrorCode::parse(c.as_str()), Some(c));
            assert!((400..600).contains(&c.status()), "{c}: {}", c.status());
        }
        assert_eq!(ErrorCode::parse("from_a_newer_server"), None);
    }

    mod spec_changes {
        use crate::api::{FieldChange, spec_changes};
        use crate::spec::JobSpec;
        use serde_json::json;

        fn spec(yaml: &str) -> JobSpec {
            JobSpec::from_yaml(yaml, "j.yaml").unwrap()
        }

        fn change(
            path: &str,
            old: Option<serde_json::Value>,
            new: Option<serde_json::Value>,
        ) -> FieldChange {
            FieldChange {
                path: path.into(),
                old,
                new,
            }
        }

        #[test]
        fn every_changed_field_is_named_with_its_old_and_new_value() {
            let a = spec("name: j\ncommand: [echo, a]\nenv: {KEEP: '1', GONE: x, A.B: y}\n");
            assert!(spec_changes(&a, &a).is_empty());
            let b = spec(
                "name: j\ncommand: [echo, b]\nenv: {KEEP: '1', NEW: z, A.B: w}\nresources: {cpu: 2}\n",
            );
            assert_eq!(
                spec_changes(&a, &b),
                vec![
                    change(
                        "command",
                        Some(json!(["echo", "a"])),
                        Some(json!(["echo", "b"]))
                    ),
                    change("env[\"A.B\"]", Some(json!("y")), Some(json!("w"))),
                    change("env.GONE", Some(json!("x")), None),
                    change("env.NEW", None, Some(json!("z"))),
                    change("resources.cpu", Some(json!(0.1)), Some(json!(2.0))),
                ]
            );
        }

        #[test]
        fn a_section_that_appears_lists_what_it_sets() {
            let a = spec("name: j\ncommand: [x]\n");
            let b = spec("name: j\ncommand: [x]\nartifact: app:1\nruntime_env: {env: {A: b}}\n");
            assert_eq!(
                spec_changes(&a, &b),
                vec![
                    change("artifact", None, Some(json!("app:1"))),
                    change("runtime_env.env.A", None, Some(json!("b"))),
                ]
            );
            assert_eq!(
                spec_changes(&b, &a),
                vec![
                    change("artifact", Some(json!("app:1")), None),
                    change("runtime_env.env.A", Some(json!("b")), None),
                ]
            );
        }
    }

    mod job_state {
        use crate::api::JobState;
        use crate::ids::ProjectId;
        use crate::spec::{JobKind, JobSpec};
        use crate::state::{Job, JobStatus, Rollout, RolloutState, Task, TaskState};

        fn job(kind: JobKind, count: u32, status: JobStatus) -> Job {
            let mut spec = JobSpec::new("j", vec!["true".into()]);
            spec.kind = kind;
            spec.count = count;
            Job {
                status,
                ..Job::new(ProjectId::default(), spec, 1, 0)
            }
        }

        /// Tasks as (index, attempt, state).
        fn tasks(job: &Job, list: &[(u32, u32, TaskState)]) -> Vec<Task> {
            list.iter()
                .map(|&(index, attempt, state)| Task {
                    state,
                    ..Task::pending(job, index, attempt, 0, 0)
                })
                .collect()
        }

        fn state(j: &Job, list: &[(u32, u32, TaskState)], blocked: bool) -> JobState {
            JobState::of(j, &tasks(j, list), blocked)
        }

        #[test]
        fn states_say_what_the_job_actually_does() {
            use TaskState::*;
            let svc = job(JobKind::Service, 2, JobStatus::Running);
            assert_eq!(
                state(&svc, &[(0, 0, Pending), (1, 0, Pending)], false),
                JobState::Pending
            );
            assert_eq!(
                state(&svc, &[(0, 0, Pending), (1, 0, Pending)], true),
                JobState::Blocked
            );
            assert_eq!(
                state(&svc, &[(0, 0, Running), (1, 0, Running)], false),
                JobState::Running
            );
            assert_eq!(
                state(&svc, &[(0, 0, Running), (1, 0, Pending)], true),
                JobState::Degraded
            );
            let looping = [
                (0, 0, Running),
                (1, 0, Failed),
                (1, 1, Failed),
                (1, 2, Failed),
                (1, 3, Pending),
            ];
            assert_eq!(state(&svc, &looping, false), JobState::CrashLooping);
            // A running attempt ends the loop.
            let recovered = [
                (0, 0, Running),
                (1, 0, Failed),
                (1, 1, Failed),
                (1, 2, Failed),
                (1, 3, Running),
            ];
            assert_eq!(state(&svc, &recovered, false), JobState::Running);
            let batch = job(JobKind::Batch, 2, JobStatus::Running);
            assert_eq!(
                state(
                    &batch,
                    &[
                        (0, 0, Failed),
                        (0, 1, Failed),
                        (0, 2, Failed),
                        (0, 3, Pending)
                    ],
                    false
                ),
                JobState::Pending,
                "only services crash-loop"
            );
            assert_eq!(
                state(&batch, &[(0, 0, Succeeded), (1, 0, Running)], false),
                JobState::Running
            );
            for (status, want) in [
                (JobStatus::Complete, JobState::Succeeded),
                (JobStatus::Failed, JobState::Failed),
                (JobStatus::Stopped, JobState::Stopped),
            ] {
                assert_eq!(state(&job(JobKind::Batch, 1, status), &[], true), want);
            }
            // A rollout says what the job is doing until it completes.
            let mut rolling = svc.clone();
            rolling.rollout = Some(Rollout::start(1, 0));
            let mixed = [(0, 0, Running), (1, 0, Pending)];
            assert_eq!(state(&rolling, &mixed, false), JobState::RollingOut);
            if let Some(r) = rolling.rollout.as_mut() {
                r.state = RolloutState::Failed;
            }
            assert_eq!(state(&rolling, &mixed, false), JobState::RolloutFailed);
            if let Some(r) = rolling.rollout.as_mut() {
                r.state = RolloutState::Complete;
            }
            assert_eq!(state(&rolling, &mixed, false), JobState::Degraded);
            let unknown: JobState = serde_json::from_str("\"hibernating\"").unwrap();
            assert_eq!(unknown, JobState::Unknown);
            assert_eq!(
                serde_json::to_string(&JobState::CrashLooping).unwrap(),
                "\"crash-looping\""
            );
        }
    }
}
