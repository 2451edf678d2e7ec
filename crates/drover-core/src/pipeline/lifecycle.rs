//! The pipeline's lifecycle as one pure step: from the spec, the stored status, what was
//! just observed and the time, the next status and the phase to write into each
//! vertex's spec.
//!
//! Nothing is remembered between steps except what the status holds, and the
//! controller stores the status it gets back; a controller restarted in the middle of a
//! pause reads the same status and so makes the same decisions.
//!
//! A pause stops the sources first, so nothing new enters; once no source replica runs
//! it waits for every buffer to hold nothing pending or unacknowledged (so what was in
//! flight reaches the sinks), or for `pause_grace` since the pause began, whichever
//! comes first; then it pauses every vertex. The grace bounds the whole pause, so a
//! source that will not stop, a vertex that cannot run (`max: 0`) or a buffer that
//! cannot be read never leaves a pause hanging.

use super::autoscale::thousands;
use super::spec::{DesiredPhase, PipelineSpec, VertexRole};
use crate::{Millis, duration_millis};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Where a pipeline is in its life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PipelinePhase {
    #[default]
    Running,
    /// Sources stopped or stopping; in-flight messages draining.
    Pausing,
    /// Every vertex paused.
    Paused,
    /// Every vertex being stopped before the pipeline is removed.
    Deleting,
    /// A vertex cannot run; the reason says which and why.
    Failed,
}

/// What the controller stores of a pipeline's lifecycle between steps.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineStatus {
    pub phase: PipelinePhase,
    /// A sentence for `drover pipeline status`.
    pub reason: String,
    /// When the current (or last finished) pause began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_started_at: Option<Millis>,
    /// Whether the last pause found every buffer empty, rather than ending at its grace.
    #[serde(default)]
    pub drained_on_pause: bool,
    /// Each vertex's replicas when the pause began, restored on resume.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub replicas_before_pause: BTreeMap<String, u32>,
}

/// What was observed of the pipeline just now.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineObservation {
    /// Per vertex name. A vertex not listed counts as having no replicas.
    #[serde(default)]
    pub vertices: BTreeMap<String, VertexObservation>,
    /// Per buffer name, every buffer of the pipeline that exists. A buffer never
    /// created (no data ever flowed) is left out, and counts as empty.
    #[serde(default)]
    pub buffers: BTreeMap<String, BufferLevel>,
}

/// One vertex as observed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VertexObservation {
    /// The replicas its spec asks for now.
    pub replicas: u32,
    /// The replicas running now.
    pub running: u32,
    /// Why the vertex cannot run, if it cannot (its job refused, for one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
}

/// How full a buffer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BufferLevel {
    Known {
        pending: u64,
        unacked: u64,
    },
    /// The buffer exists but could not be read; it is not taken to be empty.
    Unknown,
}

/// A one-off request from a user, beside what the spec says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LifecycleRequest {
    /// Run again: with the replicas from before the pause, or each vertex's
    /// `scale.min` when `slow`. The controller writes `desired_phase: running` into
    /// the spec with it, so later steps agree.
    Resume { slow: bool },
    /// Stop everything so the pipeline can be removed. Once asked, the status stays
    /// `deleting`.
    Delete,
}

/// What to write into one vertex's spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VertexDirective {
    pub desired_phase: DesiredPhase,
    /// The replicas to set; `None` leaves the vertex's own (its autoscaler's) count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
}

/// The outcome of one step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LifecycleStep {
    pub status: PipelineStatus,
    /// For every vertex of the spec.
    pub vertices: BTreeMap<String, VertexDirective>,
    /// Deleting, and no replica runs: the vertices and buffers can be removed.
    pub removable: bool,
}

/// Takes the pipeline one step along its lifecycle.
pub fn step(
    spec: &PipelineSpec,
    status: &PipelineStatus,
    obs: &PipelineObservation,
    request: Option<LifecycleRequest>,
    now: Millis,
) -> LifecycleStep {
    if status.phase == PipelinePhase::Deleting || request == Some(LifecycleRequest::Delete) {
        return deleting(spec, status, obs);
    }
    let (desired, slow) = match request {
        Some(LifecycleRequest::Resume { slow }) => (DesiredPhase::Running, slow),
        _ => (spec.lifecycle.desired_phase, false),
    };
    match (desired, status.phase) {
        (DesiredPhase::Paused, PipelinePhase::Running | PipelinePhase::Failed) => {
            pausing(spec, &begin_pause(spec, status, obs, now), obs, now)
        }
        (DesiredPhase::Paused, PipelinePhase::Pausing) => pausing(spec, status, obs, now),
        (DesiredPhase::Paused, _) => paused(spec, status.clone()),
        (DesiredPhase::Running, PipelinePhase::Pausing | PipelinePhase::Paused) => {
            resume(spec, status, slow)
        }
        (DesiredPhase::Running, _) => running(spec, obs),
    }
}

/// The status at the start of a pause: when, and each vertex's replicas to restore.
fn begin_pause(
    spec: &PipelineSpec,
    status: &PipelineStatus,
    obs: &PipelineObservation,
    now: Millis,
) -> PipelineStatus {
    let before = spec
        .vertices
        .iter()
        .map(|v| {
            let n = obs
                .vertices
                .get(&v.name)
                .map_or(v.scale.min, |o| o.replicas);
            (v.name.clone(), n)
        })
        .collect();
    PipelineStatus {
        phase: PipelinePhase::Pausing,
        reason: "pausing: stopping the sources".into(),
        pause_started_at: Some(now),
        drained_on_pause: false,
        replicas_before_pause: before,
        ..status.clone()
    }
}

fn pausing(
    spec: &PipelineSpec,
    status: &PipelineStatus,
    obs: &PipelineObservation,
    now: Millis,
) -> LifecycleStep {
    let started = status.pause_started_at.unwrap_or(now);
    let grace = spec.lifecycle.pause_grace;
    let ends = started.saturating_add(duration_millis(grace.0));
    let sources: u32 = spec
        .vertices
        .iter()
        .filter(|v| matches!(v.role, VertexRole::Source(_)))
        .filter_map(|v| obs.vertices.get(&v.name))
        .map(|o| o.running)
        .sum();
    let (messages, undrained) = undrained(obs);
    let mut next = status.clone();
    next.pause_started_at = Some(started);
    if sources == 0 && undrained.is_empty() {
        next.drained_on_pause = true;
        next.reason = "paused: sources stopped and every buffer drained".into();
        return paused(spec, next);
    }
    if now >= ends {
        next.drained_on_pause = false;
        next.reason = format!(
            "paused at the end of the {grace} grace, {}",
            left_over(sources, messages, &undrained)
        );
        return paused(spec, next);
    }
    let wait = crate::quantity::Dur::from_millis(u64::try_from(ends - now).unwrap_or(0));
    next.phase = PipelinePhase::Pausing;
    next.reason = format!(
        "pausing: waiting for {} ({wait} of grace left)",
        left_over(sources, messages, &undrained)
    );
    LifecycleStep {
        vertices: directives(spec, |role| match role {
            VertexRole::Source(_) => DesiredPhase::Paused,
            _ => DesiredPhase::Running,
        }),
        status: next,
        removable: false,
    }
}

/// The messages left in buffers that are not empty, and those buffers' names (with
/// those that could not be read).
fn undrained(obs: &PipelineObservation) -> (u64, Vec<&str>) {
    let mut messages = 0u64;
    let mut names = Vec::new();
    for (name, level) in &obs.buffers {
        match level {
            BufferLevel::Known {
                pending: 0,
                unacked: 0,
            } => {}
            BufferLevel::Known { pending, unacked } => {
                messages = messages.saturating_add(pending.saturating_add(*unacked));
                names.push(name.as_str());
            }
            BufferLevel::Unknown => names.push(name.as_str()),
        }
    }
    (messages, names)
}

/// What a pause is still waiting for, in words.
fn left_over(sources: u32, messages: u64, buffers: &[&str]) -> String {
    let mut parts = Vec::new();
    if sources > 0 {
        parts.push(format!("{sources} source replica(s) to stop"));
    }
    if !buffers.is_empty() {
        parts.push(format!(
            "{} message(s) in {} buffer(s) to drain ({})",
            thousands(messages),
            buffers.len(),
            buffers.join(", ")
        ));
    }
    parts.join(" and ")
}

fn paused(spec: &PipelineSpec, mut status: PipelineStatus) -> LifecycleStep {
    status.phase = PipelinePhase::Paused;
    if status.reason.is_empty() {
        status.reason = "paused".into();
    }
    LifecycleStep {
        vertices: directives(spec, |_| DesiredPhase::Paused),
        status,
        removable: false,
    }
}

fn resume(spec: &PipelineSpec, status: &PipelineStatus, slow: bool) -> LifecycleStep {
    let vertices = spec
        .vertices
        .iter()
        .map(|v| {
            let before = status.replicas_before_pause.get(&v.name).copied();
            let n = if slow {
                v.scale.min
            } else {
                before.unwrap_or(v.scale.min)
            };
            let d = VertexDirective {
                desired_phase: DesiredPhase::Running,
                replicas: Some(v.scale.clamp(n)),
            };
            (v.name.clone(), d)
        })
        .collect();
    let reason = if slow {
        "running: resumed slowly, each vertex at its scale.min"
    } else {
        "running: resumed with the replicas from before the pause"
    };
    LifecycleStep {
        status: PipelineStatus {
            phase: PipelinePhase::Running,
            reason: reason.into(),
            ..PipelineStatus::default()
        },
        vertices,
        removable: false,
    }
}

fn running(spec: &PipelineSpec, obs: &PipelineObservation) -> LifecycleStep {
    let failed = spec.vertices.iter().find_map(|v| {
        let why = obs.vertices.get(&v.name)?.failed.as_ref()?;
        Some(format!("vertex {}: {why}", v.name))
    });
    let (phase, reason) = match failed {
        Some(why) => (PipelinePhase::Failed, why),
        None => (PipelinePhase::Running, "running".to_string()),
    };
    LifecycleStep {
        status: PipelineStatus {
            phase,
            reason,
            ..PipelineStatus::default()
        },
        vertices: directives(spec, |_| DesiredPhase::Running),
        removable: false,
    }
}

fn deleting(
    spec: &PipelineSpec,
    status: &PipelineStatus,
    obs: &PipelineObservation,
) -> LifecycleStep {
    let running: u32 = obs.vertices.values().map(|o| o.running).sum();
    let reason = if running == 0 {
        "deleting: every replica stopped".to_string()
    } else {
        format!("deleting: waiting for {running} replica(s) to stop")
    };
    LifecycleStep {
        status: PipelineStatus {
            phase: PipelinePhase::Deleting,
            reason,
            ..status.clone()
        },
        vertices: directives(spec, |_| DesiredPhase::Paused),
        removable: running == 0,
    }
}

/// The same phase rule for every vertex, replicas left alone.
fn directives(
    spec: &PipelineSpec,
    phase: impl Fn(&VertexRole) -> DesiredPhase,
) -> BTreeMap<String, VertexDirective> {
    spec.vertices
        .iter()
        .map(|v| {
            let d = VertexDirective {
                desired_phase: phase(&v.role),
                replicas: None,
            };
            (v.name.clone(), d)
        })
        .collect()
}
