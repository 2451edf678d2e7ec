//! The vertex object: what the pipeline controller stores for each vertex, and the one
//! rule the vertex controller applies to it.
//!
//! The pipeline controller writes everything a vertex needs into the vertex's own spec,
//! the lifecycle included; the vertex controller then decides from that object alone.
//! This is NumaFlow's lesson: when a vertex looked up its pipeline to learn whether it
//! was paused, a pipeline half-way through a change (or gone) left vertices deciding
//! from a state that was no longer, or not yet, theirs.

use super::autoscale::{Observation, ScaleConfig, ScaleState, decide};
use super::spec::{BufferSpec, DesiredPhase, VertexRole};
pub use crate::plane::{PlaneRole, VertexOutput, VertexPlane};
use crate::spec::JobSpec;
use crate::{Millis, ProjectId};
use serde::{Deserialize, Serialize};

/// One vertex as stored: which pipeline it belongs to, what it should be and what it
/// is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Vertex {
    pub project: ProjectId,
    pub spec: VertexSpec,
    #[serde(default)]
    pub status: VertexStatus,
}

/// What the pipeline controller wants of a vertex. Self-contained: nothing here points
/// back at the pipeline object, so nothing that reads it can depend on the pipeline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VertexSpec {
    /// The pipeline's name, for naming the vertex's job and buffers.
    pub pipeline: String,
    /// The vertex's name, unique in its pipeline.
    pub name: String,
    /// What the vertex runs: a built-in or the user's program.
    pub role: VertexRole,
    /// The buffers it reads, one per partition (`project.pipeline.vertex.partition`);
    /// empty for a source.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<String>,
    /// Where it writes; empty for a sink.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<VertexOutput>,
    /// The limits of the buffers it writes to, so it can tell when they are full.
    pub buffer: BufferSpec,
    pub scale: ScaleConfig,
    /// The replicas the autoscaler last chose (or the pipeline restored after a pause).
    pub replicas: u32,
    pub lifecycle: VertexLifecycle,
    /// Raised by the pipeline controller on every change it writes, so the vertex
    /// controller can tell whether it has acted on the latest.
    pub generation: u64,
}

/// The part of the pipeline's lifecycle written into each vertex.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VertexLifecycle {
    pub desired_phase: DesiredPhase,
}

/// What the vertex controller last saw and did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VertexStatus {
    /// Replicas running when last looked.
    pub observed_replicas: u32,
    /// The spec generation the controller last acted on.
    pub observed_generation: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale: Option<ScaleRecord>,
    /// The replicas the vertex had when a pause began; kept until it resumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas_before_pause: Option<u32>,
    /// What the autoscaler keeps between decisions.
    #[serde(default)]
    pub autoscale: ScaleState,
}

/// The autoscaler's last decision, as `drover pipeline status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScaleRecord {
    pub replicas: u32,
    pub reason: String,
    pub at: Millis,
}

/// How many replicas of a vertex should run: none while its spec says paused,
/// otherwise `replicas` within `scale.min..=scale.max`.
///
/// It takes the vertex's spec and nothing else, on purpose: the answer must come from
/// what the pipeline controller wrote into the vertex, never from reading the pipeline,
/// so that a pause is applied by exactly the writes that say so (see the module notes).
pub fn desired_replicas(spec: &VertexSpec) -> u32 {
    match spec.lifecycle.desired_phase {
        DesiredPhase::Paused => 0,
        DesiredPhase::Running => spec.scale.clamp(spec.replicas),
    }
}

/// One autoscaler round for a vertex, from the vertex alone: the replica count to
/// write into its spec and its new status. The spec's replicas and phase are the
/// autoscaler's starting point; its timers come from the status. The status records the
/// decision whenever the count changes, so `drover pipeline status` can say why; the
/// third value is this round's reason, a hold included.
pub fn autoscale(
    spec: &VertexSpec,
    status: &VertexStatus,
    obs: &Observation,
    now: Millis,
) -> (u32, VertexStatus, String) {
    let state = ScaleState {
        replicas: spec.replicas,
        phase: spec.lifecycle.desired_phase,
        ..status.autoscale.clone()
    };
    let d = decide(&spec.scale, obs, &state, now);
    let mut next = status.clone();
    if d.replicas != spec.replicas {
        next.last_scale = Some(ScaleRecord {
            replicas: d.replicas,
            reason: d.reason.clone(),
            at: now,
        });
    }
    next.autoscale = d.state;
    (d.replicas, next, d.reason)
}

impl VertexSpec {
    /// The job name of the vertex's tasks: `pipeline-vertex`.
    pub fn job_name(&self) -> String {
        job_name(&self.pipeline, &self.name)
    }

    /// The service job whose tasks are this vertex's replicas: the user's program, or
    /// for a built-in the agent's own binary (`drover __vertex KIND`). `None` for an
    /// `http` source, whose messages the controller writes downstream itself, so it
    /// has no replicas. Its count is [`desired_replicas`], at least 1: a vertex at zero
    /// is one whose job is stopped.
    pub fn job_spec(&self) -> Option<JobSpec> {
        let count = desired_replicas(self);
        let (mut spec, builtin) = match (&self.role, builtin_args(&self.role)) {
            (_, Some(args)) => {
                let mut spec = JobSpec::new(self.job_name(), Vec::new());
                spec.kind = crate::spec::JobKind::Service;
                spec.count = count.max(1);
                // A built-in moves bytes and little else; the default share of a core
                // would make a small node refuse a pipeline of a few vertices.
                spec.resources.cpu = BUILTIN_CPU;
                (spec, args)
            }
            (role, None) => (role.run()?.job_spec(&self.job_name(), count), Vec::new()),
        };
        spec.vertex = Some(Box::new(VertexPlane {
            pipeline: self.pipeline.clone(),
            vertex: self.name.clone(),
            role: plane_role(&self.role),
            builtin,
            inputs: self.inputs.clone(),
            outputs: self.outputs.clone(),
            buffer: self.buffer,
        }));
        Some(spec)
    }
}

/// The cores a built-in vertex's replica asks for.
pub const BUILTIN_CPU: f64 = 0.1;

/// The arguments of `drover __vertex` that run a built-in vertex; `None` for the
/// user's program and for the `http` source, which runs no replicas.
pub fn builtin_args(role: &VertexRole) -> Option<Vec<String>> {
    use super::spec::{SinkDef, SourceDef};
    let args = match role {
        VertexRole::Source(SourceDef::Generator(g)) => {
            let mut args = vec![
                "generator".to_string(),
                "--rate".into(),
                g.rate.to_string(),
                "--size".into(),
                g.message_size.to_string(),
            ];
            if let Some(total) = g.total {
                args.extend(["--total".to_string(), total.to_string()]);
            }
            args
        }
        VertexRole::Sink(SinkDef::Log(_)) => vec!["log".to_string()],
        VertexRole::Sink(SinkDef::Blackhole(_)) => vec!["blackhole".to_string()],
        _ => return None,
    };
    Some(args)
}

/// The job name of a vertex's tasks.
pub fn job_name(pipeline: &str, vertex: &str) -> String {
    format!("{pipeline}-{vertex}")
}

/// The name of one partition of a vertex's input buffer, as the buffer crate spells it.
pub fn buffer_name(project: &ProjectId, pipeline: &str, vertex: &str, partition: u32) -> String {
    format!("{project}.{pipeline}.{vertex}.{partition}")
}

/// A vertex role's side of the data protocol.
pub fn plane_role(role: &VertexRole) -> PlaneRole {
    match role {
        VertexRole::Source(_) => PlaneRole::Source,
        VertexRole::Map(_) => PlaneRole::Map,
        VertexRole::Sink(_) => PlaneRole::Sink,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::spec::{LogSink, SinkDef};

    fn spec(phase: DesiredPhase, replicas: u32, min: u32, max: u32) -> VertexSpec {
        VertexSpec {
            pipeline: "etl".into(),
            name: "out".into(),
            role: VertexRole::Sink(SinkDef::Log(LogSink {})),
            inputs: vec!["default.etl.out.0".into()],
            outputs: Vec::new(),
            buffer: BufferSpec::default(),
            scale: ScaleConfig {
                min,
                max,
                ..ScaleConfig::default()
            },
            replicas,
            lifecycle: VertexLifecycle {
                desired_phase: phase,
            },
            generation: 1,
        }
    }

    #[test]
    fn desired_replicas_follows_the_phase_and_the_bounds() {
        use DesiredPhase::{Paused, Running};
        // (phase, replicas, min, max, desired)
        let cases = [
            (Running, 3, 1, 5, 3),
            (Running, 0, 1, 5, 1),
            (Running, 9, 1, 5, 5),
            (Running, 0, 0, 5, 0),
            (Running, 2, 0, 0, 0),
            (Running, 4, 4, 4, 4),
            (Paused, 3, 1, 5, 0),
            (Paused, 0, 2, 5, 0),
            (Paused, 9, 9, 9, 0),
        ];
        for (phase, replicas, min, max, want) in cases {
            let s = spec(phase, replicas, min, max);
            assert_eq!(
                desired_replicas(&s),
                want,
                "{phase} replicas {replicas} min {min} max {max}"
            );
        }
    }

    #[test]
    fn autoscale_starts_from_the_spec_and_records_changes() {
        let mut s = spec(DesiredPhase::Running, 1, 1, 10);
        let obs = Observation {
            pending: Some(12_000),
            unacked: 0,
            rate_per_replica: Some(100.0),
            backpressure: None,
        };
        let (n, status, _) = autoscale(&s, &VertexStatus::default(), &obs, 1_000);
        assert_eq!(n, 3);
        let rec = status.last_scale.clone().unwrap();
        assert_eq!(
            (rec.replicas, rec.at, rec.reason.as_str()),
            (
                3,
                1_000,
                "scaled up from 1 to 3: 12,000 pending at 100/s per replica"
            )
        );
        // The next round is in the cooldown: the count holds and the record stays.
        s.replicas = n;
        let (n2, status2, why) = autoscale(&s, &status, &obs, 2_000);
        assert!(why.starts_with("holding at 3"), "{why}");
        assert_eq!(n2, 3);
        assert_eq!(status2.last_scale, status.last_scale);
        // A paused vertex is left alone, whatever its status says.
        s.lifecycle.desired_phase = DesiredPhase::Paused;
        assert_eq!(autoscale(&s, &status, &obs, 999_000).0, 3);
    }

    #[test]
    fn a_built_in_runs_the_agents_binary_and_a_vertex_round_trips_as_json() {
        let s = spec(DesiredPhase::Running, 1, 1, 1);
        let job = s.job_spec().unwrap();
        assert!(job.command.is_empty());
        let plane = job.vertex.as_deref().unwrap();
        assert_eq!(plane.builtin, ["log"]);
        assert_eq!(plane.role, PlaneRole::Sink);
        assert_eq!(plane.buffers().collect::<Vec<_>>(), ["default.etl.out.0"]);
        job.validate().unwrap();
        assert_eq!(s.job_name(), "etl-out");
        let v = Vertex {
            project: ProjectId::default(),
            spec: s,
            status: VertexStatus::default(),
        };
        let json = serde_json::to_string(&v).unwrap();
        assert_eq!(serde_json::from_str::<Vertex>(&json).unwrap(), v);
    }
}
