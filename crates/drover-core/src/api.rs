//! The shapes of the HTTP API's requests and responses, shared by the controller and
//! the CLI so the two cannot drift apart.

use crate::Millis;
use crate::ids::{JobId, TaskId};
use crate::protocol::LogStream;
use crate::spec::Resources;
use crate::state::{Exit, Job, JobStatus, Node, Task, TaskState};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The body of every error response.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    /// A stable machine-readable kind: `unauthorized`, `invalid_spec`, `not_found`...
    pub code: String,
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
    /// `created`, `updated` (a new version: the spec changed, or a rerun was asked for)
    /// or `unchanged` (the same spec as the current version, running or finished).
    pub result: String,
}

/// A job with a summary of its tasks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobView {
    #[serde(flatten)]
    pub job: Job,
    /// How many of the current version's tasks are in each state.
    pub task_states: BTreeMap<TaskState, u32>,
    /// Why tasks are still pending, when they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_reason: Option<String>,
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
