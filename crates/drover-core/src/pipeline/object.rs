//! The stored pipeline object, and what the API shows of pipelines and their vertices.

use super::lifecycle::{LifecycleRequest, PipelineStatus};
use super::spec::{DesiredPhase, PipelineSpec};
use super::vertex::ScaleRecord;
use crate::{Millis, ProjectId};
use serde::{Deserialize, Serialize};

/// One pipeline as the controller stores it: the spec last applied, where its
/// lifecycle is, and a user's request the pipeline controller has not finished acting
/// on. The request is stored before the API answers, so a pause, resume or delete that
/// was acknowledged survives a controller restart.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pipeline {
    pub project: ProjectId,
    pub name: String,
    /// Raised by every apply that changes the spec.
    pub version: u32,
    pub spec: PipelineSpec,
    #[serde(default)]
    pub status: PipelineStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<LifecycleRequest>,
    pub created_at: Millis,
    pub updated_at: Millis,
}

impl Pipeline {
    /// Whether a delete was asked for: the pipeline only goes on towards removal.
    pub fn deleting(&self) -> bool {
        self.request == Some(LifecycleRequest::Delete)
            || self.status.phase == super::PipelinePhase::Deleting
    }
}

/// The answer to `POST /v1/pipelines`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PipelineApplied {
    pub pipeline: PipelineSummary,
    /// `created`, `updated` or `unchanged`.
    pub result: String,
}

/// One line of `drover pipeline ls`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PipelineSummary {
    pub project: ProjectId,
    pub name: String,
    pub version: u32,
    pub phase: super::PipelinePhase,
    pub reason: String,
    pub vertices: u32,
    /// Vertex replicas running now, over all vertices.
    pub running: u32,
    pub created_at: Millis,
    pub updated_at: Millis,
}

impl PipelineSummary {
    pub fn of(p: &Pipeline, running: u32) -> PipelineSummary {
        PipelineSummary {
            project: p.project.clone(),
            name: p.name.clone(),
            version: p.version,
            phase: p.status.phase,
            reason: p.status.reason.clone(),
            vertices: p.spec.vertices.len() as u32,
            running,
            created_at: p.created_at,
            updated_at: p.updated_at,
        }
    }
}

/// `drover pipeline status NAME`: the pipeline and each of its vertices.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PipelineView {
    pub pipeline: Pipeline,
    pub vertices: Vec<VertexView>,
}

/// One vertex as `drover pipeline status` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VertexView {
    pub name: String,
    /// `source`, `map` or `sink` with what it runs (`source/generator`).
    pub kind: String,
    pub desired_phase: DesiredPhase,
    /// The replicas its spec asks for now (0 while paused).
    pub desired_replicas: u32,
    /// Replicas running now.
    pub running_replicas: u32,
    /// Messages per second read and written, over the last 1, 5 and 15 minutes;
    /// `None` where not measured (no counts yet, or not that long observed).
    pub rate_in: Rates,
    pub rate_out: Rates,
    /// The autoscaler's last change, with why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale: Option<ScaleRecord>,
    /// What the autoscaler decided on its latest round, a hold included ("holding at
    /// 1 (wants 3): downstream buffer ... is full"). Not stored: a restarted controller
    /// has none until its first round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_decision: Option<String>,
    /// Its input buffers.
    #[serde(default)]
    pub buffers: Vec<BufferView>,
}

/// Messages per second over three windows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Rates {
    pub m1: Option<f64>,
    pub m5: Option<f64>,
    pub m15: Option<f64>,
}

/// One buffer as `drover pipeline status` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BufferView {
    pub name: String,
    /// Whether it exists yet: a buffer is made when something is first written to it.
    pub exists: bool,
    pub pending: Option<u64>,
    pub unacked: Option<u64>,
    /// `(pending + unacked) / max_length`.
    pub usage: Option<f64>,
    /// Why the counts are missing, when the buffer could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One message for an `http` source (`POST .../vertices/{vertex}/messages`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpMessage {
    /// Chooses the partition; empty for none.
    #[serde(default)]
    pub key: String,
    /// The message's bytes, as text.
    pub data: String,
}

/// The body of `POST .../vertices/{vertex}/messages`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpMessages {
    pub messages: Vec<HttpMessage>,
}

/// The most messages one http-source request may carry.
pub const MAX_HTTP_MESSAGES: usize = 1000;
/// The largest http-source request body.
pub const MAX_HTTP_BODY: usize = 1 << 20;

/// The answer to an http-source request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HttpAccepted {
    /// The ids given to the messages, in order, as 32 hex digits.
    pub ids: Vec<String>,
    /// Messages written (to every output edge).
    pub written: u64,
}
