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
            pausing(spec, &begin_pause(spec, obs, now), obs, now)
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
fn begin_pause(spec: &PipelineSpec, obs: &PipelineObservation, now: Millis) -> PipelineStatus {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::spec::DesiredPhase::{Paused, Running};

    const S: Millis = 1000;
    const T0: Millis = 5_000_000;

    /// gen -> upper -> out, with upper scaling 1..5 and a 30s pause grace.
    fn pipeline(desired: DesiredPhase, upper_max: u32) -> PipelineSpec {
        let min = upper_max.min(1);
        let yaml = format!(
            "name: etl\nvertices:\n  - {{ name: gen, source: {{ generator: {{}} }} }}\n  - {{ name: upper, map: {{ run: {{ command: [x] }} }}, scale: {{ min: {min}, max: {upper_max} }} }}\n  - {{ name: out, sink: {{ log: {{}} }} }}\nedges: [{{ from: gen, to: upper }}, {{ from: upper, to: out }}]\nlifecycle: {{ desired_phase: {desired} }}\n"
        );
        PipelineSpec::from_yaml(&yaml, "etl.yaml").unwrap()
    }

    /// Observations: (vertex, spec replicas, running) and (buffer, pending, unacked).
    fn obs(vertices: &[(&str, u32, u32)], buffers: &[(&str, u64, u64)]) -> PipelineObservation {
        PipelineObservation {
            vertices: vertices
                .iter()
                .map(|(n, replicas, running)| {
                    let o = VertexObservation {
                        replicas: *replicas,
                        running: *running,
                        failed: None,
                    };
                    (n.to_string(), o)
                })
                .collect(),
            buffers: buffers
                .iter()
                .map(|(n, pending, unacked)| {
                    let level = BufferLevel::Known {
                        pending: *pending,
                        unacked: *unacked,
                    };
                    (n.to_string(), level)
                })
                .collect(),
        }
    }

    /// Every vertex at its spec count, all running.
    fn all_up() -> PipelineObservation {
        obs(&[("gen", 1, 1), ("upper", 3, 3), ("out", 1, 1)], &[])
    }

    /// The directives in one line: `gen=paused upper=running:3`.
    fn said(step: &LifecycleStep) -> String {
        step.vertices
            .iter()
            .map(|(n, d)| match d.replicas {
                Some(r) => format!("{n}={}:{r}", d.desired_phase),
                None => format!("{n}={}", d.desired_phase),
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn pausing_since(at: Millis) -> PipelineStatus {
        PipelineStatus {
            phase: PipelinePhase::Pausing,
            reason: "pausing: stopping the sources".into(),
            pause_started_at: Some(at),
            drained_on_pause: false,
            replicas_before_pause: BTreeMap::from([
                ("gen".into(), 1),
                ("upper".into(), 3),
                ("out".into(), 1),
            ]),
        }
    }

    fn paused_status(drained: bool) -> PipelineStatus {
        PipelineStatus {
            phase: PipelinePhase::Paused,
            reason: "paused: sources stopped and every buffer drained".into(),
            drained_on_pause: drained,
            ..pausing_since(T0 - 60 * S)
        }
    }

    #[test]
    fn each_step_decides_from_its_inputs() {
        let sources_down = obs(
            &[("gen", 1, 0), ("upper", 3, 3), ("out", 1, 1)],
            &[("default.etl.upper.0", 0, 0), ("default.etl.out.0", 0, 0)],
        );
        let in_flight = obs(
            &[("gen", 1, 0), ("upper", 3, 3), ("out", 1, 1)],
            &[
                ("default.etl.upper.0", 1200, 0),
                ("default.etl.out.0", 0, 34),
            ],
        );
        let mut unreadable = sources_down.clone();
        unreadable
            .buffers
            .insert("default.etl.out.0".into(), BufferLevel::Unknown);
        let mut failing = all_up();
        if let Some(v) = failing.vertices.get_mut("upper") {
            v.failed = Some("image local/upper:1 not found".into());
        }
        let running = PipelineStatus {
            reason: "running".into(),
            ..PipelineStatus::default()
        };
        // (name, desired, status, observation, request, now, phase, reason, directives)
        type Case<'a> = (
            &'a str,
            DesiredPhase,
            PipelineStatus,
            PipelineObservation,
            Option<LifecycleRequest>,
            Millis,
            PipelinePhase,
            &'a str,
            &'a str,
        );
        let cases: Vec<Case> = vec![
            (
                "running stays running and leaves replicas to the autoscaler",
                Running,
                running.clone(),
                all_up(),
                None,
                T0,
                PipelinePhase::Running,
                "running",
                "gen=running out=running upper=running",
            ),
            (
                "a vertex that cannot run fails the pipeline, which keeps it running",
                Running,
                running.clone(),
                failing.clone(),
                None,
                T0,
                PipelinePhase::Failed,
                "vertex upper: image local/upper:1 not found",
                "gen=running out=running upper=running",
            ),
            (
                "a pause stops the sources first",
                Paused,
                running.clone(),
                all_up(),
                None,
                T0,
                PipelinePhase::Pausing,
                "pausing: waiting for 1 source replica(s) to stop (30s of grace left)",
                "gen=paused out=running upper=running",
            ),
            (
                "a failed pipeline can be paused",
                Paused,
                PipelineStatus {
                    phase: PipelinePhase::Failed,
                    ..running.clone()
                },
                failing,
                None,
                T0,
                PipelinePhase::Pausing,
                "pausing: waiting for 1 source replica(s) to stop",
                "gen=paused out=running upper=running",
            ),
            (
                "with the sources stopped, in-flight messages drain",
                Paused,
                pausing_since(T0 - 10 * S),
                in_flight.clone(),
                None,
                T0,
                PipelinePhase::Pausing,
                "pausing: waiting for 1,234 message(s) in 2 buffer(s) to drain (default.etl.out.0, default.etl.upper.0) (20s of grace left)",
                "gen=paused out=running upper=running",
            ),
            (
                "drained: every vertex paused",
                Paused,
                pausing_since(T0 - 10 * S),
                sources_down.clone(),
                None,
                T0,
                PipelinePhase::Paused,
                "paused: sources stopped and every buffer drained",
                "gen=paused out=paused upper=paused",
            ),
            (
                "a buffer that cannot be read is not taken to be empty",
                Paused,
                pausing_since(T0 - 10 * S),
                unreadable.clone(),
                None,
                T0,
                PipelinePhase::Pausing,
                "pausing: waiting for 0 message(s) in 1 buffer(s) to drain (default.etl.out.0)",
                "gen=paused out=running upper=running",
            ),
            (
                "the grace ends the wait for buffers",
                Paused,
                pausing_since(T0 - 30 * S),
                in_flight,
                None,
                T0,
                PipelinePhase::Paused,
                "paused at the end of the 30s grace, 1,234 message(s) in 2 buffer(s) to drain",
                "gen=paused out=paused upper=paused",
            ),
            (
                "the grace ends the wait for a source that will not stop",
                Paused,
                pausing_since(T0 - 31 * S),
                all_up(),
                None,
                T0,
                PipelinePhase::Paused,
                "paused at the end of the 30s grace, 1 source replica(s) to stop",
                "gen=paused out=paused upper=paused",
            ),
            (
                "paused stays paused",
                Paused,
                paused_status(true),
                obs(&[("gen", 1, 0), ("upper", 3, 0), ("out", 1, 0)], &[]),
                None,
                T0,
                PipelinePhase::Paused,
                "paused: sources stopped and every buffer drained",
                "gen=paused out=paused upper=paused",
            ),
            (
                "resume restores the replicas from before the pause",
                Running,
                paused_status(true),
                obs(&[("gen", 1, 0), ("upper", 1, 0), ("out", 1, 0)], &[]),
                None,
                T0,
                PipelinePhase::Running,
                "running: resumed with the replicas from before the pause",
                "gen=running:1 out=running:1 upper=running:3",
            ),
            (
                "an explicit resume overrides a paused spec",
                Paused,
                paused_status(false),
                obs(&[], &[]),
                Some(LifecycleRequest::Resume { slow: false }),
                T0,
                PipelinePhase::Running,
                "running: resumed with the replicas from before the pause",
                "gen=running:1 out=running:1 upper=running:3",
            ),
            (
                "a slow resume starts each vertex at its min",
                Paused,
                paused_status(true),
                obs(&[], &[]),
                Some(LifecycleRequest::Resume { slow: true }),
                T0,
                PipelinePhase::Running,
                "running: resumed slowly, each vertex at its scale.min",
                "gen=running:1 out=running:1 upper=running:1",
            ),
            (
                "resuming in the middle of a pause restores too",
                Running,
                pausing_since(T0 - 5 * S),
                all_up(),
                None,
                T0,
                PipelinePhase::Running,
                "running: resumed with the replicas from before the pause",
                "gen=running:1 out=running:1 upper=running:3",
            ),
            (
                "delete stops everything",
                Running,
                running.clone(),
                all_up(),
                Some(LifecycleRequest::Delete),
                T0,
                PipelinePhase::Deleting,
                "deleting: waiting for 5 replica(s) to stop",
                "gen=paused out=paused upper=paused",
            ),
            (
                "deleting outlasts the request and the desired phase",
                Running,
                PipelineStatus {
                    phase: PipelinePhase::Deleting,
                    ..running
                },
                obs(&[("gen", 1, 0), ("upper", 3, 0), ("out", 1, 0)], &[]),
                Some(LifecycleRequest::Resume { slow: false }),
                T0,
                PipelinePhase::Deleting,
                "deleting: every replica stopped",
                "gen=paused out=paused upper=paused",
            ),
        ];
        let mut wrong = Vec::new();
        for (name, desired, status, o, request, now, phase, reason, directives) in cases {
            let out = step(&pipeline(desired, 5), &status, &o, request, now);
            let got = (out.status.phase, said(&out));
            if got != (phase, directives.to_string()) || !out.status.reason.starts_with(reason) {
                wrong.push(format!(
                    "{name}: got {got:?} {:?}, wanted {phase:?} {directives:?} {reason:?}",
                    out.status.reason
                ));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    /// Runs steps every 5 seconds from T0 while `observe` says what the cluster does
    /// with the last directives, until the pipeline is paused; returns the final step
    /// and how many steps it took. Bounded, so a hang fails instead of spinning.
    fn pause_until_done(
        spec: &PipelineSpec,
        start: PipelineStatus,
        observe: impl Fn(&LifecycleStep) -> PipelineObservation,
    ) -> (LifecycleStep, usize) {
        let mut status = start;
        let mut o = all_up();
        for n in 1..=100 {
            let now = T0 + (n as Millis - 1) * 5 * S;
            let out = step(spec, &status, &o, None, now);
            if out.status.phase == PipelinePhase::Paused {
                return (out, n);
            }
            o = observe(&out);
            status = out.status;
        }
        panic!("the pause did not finish in 100 steps");
    }

    /// The cluster obeys at once: a paused vertex has no replicas running.
    fn obedient(
        buffers: &'static [(&'static str, u64, u64)],
    ) -> impl Fn(&LifecycleStep) -> PipelineObservation {
        move |out: &LifecycleStep| {
            let mut o = obs(&[], buffers);
            for (n, d) in &out.vertices {
                let running = if d.desired_phase == Paused { 0 } else { 1 };
                o.vertices.insert(
                    n.clone(),
                    VertexObservation {
                        replicas: 1,
                        running,
                        failed: None,
                    },
                );
            }
            o
        }
    }

    #[test]
    fn a_pause_completes_where_numaflow_hung() {
        let running = PipelineStatus::default();
        // No data ever flowed: no buffer exists, so nothing is waited for.
        let (out, steps) = pause_until_done(&pipeline(Paused, 5), running.clone(), obedient(&[]));
        assert!(out.status.drained_on_pause);
        assert_eq!(steps, 2);
        // A vertex with max 0 never reads its buffer; the grace ends the wait.
        let stuck: &[(&str, u64, u64)] = &[("default.etl.upper.0", 500, 0)];
        let (out, steps) = pause_until_done(&pipeline(Paused, 0), running.clone(), obedient(stuck));
        assert!(!out.status.drained_on_pause);
        assert_eq!(steps, 7, "30s of grace at a step every 5s");
        assert_eq!(out.status.replicas_before_pause.get("upper"), Some(&3));
        // The pipeline resumes the vertex with max 0 at 0.
        let resumed = step(&pipeline(Running, 0), &out.status, &obs(&[], &[]), None, T0);
        assert_eq!(resumed.vertices["upper"].replicas, Some(0));
        // Pausing again once paused changes nothing: the replicas to restore are those
        // from before the first pause, not the zeros of the paused vertices.
        let again = step(
            &pipeline(Paused, 5),
            &out.status,
            &obs(&[("gen", 1, 0), ("upper", 3, 0), ("out", 1, 0)], &[]),
            None,
            T0 + 600 * S,
        );
        assert_eq!(again.status, out.status);
        assert_eq!(said(&again), "gen=paused out=paused upper=paused");
    }

    #[test]
    fn a_restarted_controller_decides_as_the_old_one_would() {
        let spec = pipeline(Paused, 5);
        let o = obs(
            &[("gen", 1, 0), ("upper", 3, 3), ("out", 1, 1)],
            &[("default.etl.upper.0", 10, 2)],
        );
        let first = step(&spec, &PipelineStatus::default(), &all_up(), None, T0);
        assert_eq!(first.status.pause_started_at, Some(T0));
        // The controller stored `first.status` and restarted: the same status and
        // observation give the same decisions, and the pause keeps its start time.
        let a = step(&spec, &first.status, &o, None, T0 + 10 * S);
        let b = step(&spec, &first.status, &o, None, T0 + 10 * S);
        assert_eq!(a, b);
        assert_eq!(a.status.pause_started_at, Some(T0));
        assert_eq!(a.status.phase, PipelinePhase::Pausing);
        // Fed its own output again, the step is at rest.
        let c = step(&spec, &a.status, &o, None, T0 + 10 * S);
        assert_eq!(c, a);
        // And the grace counts from the stored start, not from the restart.
        let d = step(&spec, &a.status, &o, None, T0 + 30 * S);
        assert_eq!(d.status.phase, PipelinePhase::Paused);
    }

    #[test]
    fn delete_finishes_once_nothing_runs() {
        let spec = pipeline(Running, 5);
        let out = step(
            &spec,
            &PipelineStatus::default(),
            &all_up(),
            Some(LifecycleRequest::Delete),
            T0,
        );
        assert!(!out.removable);
        let idle = obs(&[("gen", 1, 0), ("upper", 3, 0), ("out", 1, 0)], &[]);
        let out = step(&spec, &out.status, &idle, None, T0 + S);
        assert!(out.removable);
        assert_eq!(out.status.phase, PipelinePhase::Deleting);
    }
}
