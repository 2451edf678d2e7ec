//! The pipeline specification a user writes: vertices, the edges between them, the
//! pipeline's lifecycle and its buffers. Parsing and the rules of the graph live in
//! [`super::graph`]; this file holds the types and what they mean.

use super::autoscale::ScaleConfig;
use crate::artifact::ArtifactRef;
pub use crate::plane::{
    BufferBackend, BufferSpec, DEFAULT_MAX_LENGTH, DEFAULT_USAGE_LIMIT, EdgeCondition,
    MAX_BUFFER_LENGTH, MAX_CONDITION_TAGS, TagCondition,
};
use crate::quantity::Dur;
use crate::spec::{Constraint, JobKind, JobSpec, PullPolicy, Resources, RuntimeEnv, RuntimeKind};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A pipeline as the user declares it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PipelineSpec {
    pub name: String,
    pub vertices: Vec<VertexDef>,
    #[serde(default)]
    pub edges: Vec<EdgeDef>,
    #[serde(default)]
    pub lifecycle: LifecycleSpec,
    #[serde(default)]
    pub buffer: BufferSpec,
}

/// Whether the user wants the pipeline (or, written into a vertex, the vertex) to run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DesiredPhase {
    #[default]
    Running,
    Paused,
}

impl std::fmt::Display for DesiredPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DesiredPhase::Running => "running",
            DesiredPhase::Paused => "paused",
        })
    }
}

/// `lifecycle`: whether the pipeline should run, and how long a pause waits for its
/// buffers to drain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LifecycleSpec {
    pub desired_phase: DesiredPhase,
    /// How long after a pause began the pipeline waits for in-flight messages before
    /// pausing every vertex anyway.
    pub pause_grace: Dur,
}

/// The wait for in-flight messages when a pipeline is paused, unless the spec says.
pub const DEFAULT_PAUSE_GRACE: Dur = Dur::from_secs(30);
/// The longest `lifecycle.pause_grace`: a pause that may take longer than an hour to
/// finish looks hung to whoever asked for it.
pub const MAX_PAUSE_GRACE: Dur = Dur::from_secs(60 * 60);

impl Default for LifecycleSpec {
    fn default() -> Self {
        LifecycleSpec {
            desired_phase: DesiredPhase::Running,
            pause_grace: DEFAULT_PAUSE_GRACE,
        }
    }
}

/// One vertex: its name, what it is (exactly one of `source`, `map`, `sink`), how far
/// it scales and how many partitions its input buffer has.
///
/// Read through [`RawVertexDef`], so that "exactly one of" is checked while parsing and
/// the rest of the code matches on [`VertexRole`] instead of three options.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawVertexDef", into = "RawVertexDef")]
pub struct VertexDef {
    pub name: String,
    pub role: VertexRole,
    pub scale: ScaleConfig,
    /// How many partitions the vertex's input buffer has; `None` when the spec does not
    /// say, which means 1. Only a vertex that receives messages may say.
    pub partitions: Option<u32>,
}

/// The default and smallest partition count.
pub const DEFAULT_PARTITIONS: u32 = 1;
/// The most partitions a vertex's input may have; each is a buffer of its own.
pub const MAX_PARTITIONS: u32 = 64;

impl VertexDef {
    /// The partition count in force.
    pub fn partitions(&self) -> u32 {
        self.partitions.unwrap_or(DEFAULT_PARTITIONS)
    }
}

/// What a vertex does.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VertexRole {
    Source(SourceDef),
    Map(MapDef),
    Sink(SinkDef),
}

impl VertexRole {
    /// The role's name as the spec writes it.
    pub fn kind(&self) -> &'static str {
        match self {
            VertexRole::Source(_) => "source",
            VertexRole::Map(_) => "map",
            VertexRole::Sink(_) => "sink",
        }
    }

    /// The user's program, when the vertex runs one rather than a built-in.
    pub fn run(&self) -> Option<&RunDef> {
        match self {
            VertexRole::Source(SourceDef::Run(r))
            | VertexRole::Map(MapDef::Run(r))
            | VertexRole::Sink(SinkDef::Run(r)) => Some(r.as_ref()),
            _ => None,
        }
    }

    /// [`VertexRole::run`], to change (the CLI puts an uploaded working_dir's digest in
    /// place of a local directory).
    pub fn run_mut(&mut self) -> Option<&mut RunDef> {
        match self {
            VertexRole::Source(SourceDef::Run(r))
            | VertexRole::Map(MapDef::Run(r))
            | VertexRole::Sink(SinkDef::Run(r)) => Some(r.as_mut()),
            _ => None,
        }
    }
}

/// The vertex as written, with the three roles as options: [`VertexDef`] is read
/// through this and refuses anything but exactly one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RawVertexDef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourceDef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map: Option<MapDef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sink: Option<SinkDef>,
    #[serde(default)]
    pub scale: ScaleConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<u32>,
}

impl TryFrom<RawVertexDef> for VertexDef {
    type Error = String;

    fn try_from(raw: RawVertexDef) -> Result<Self, String> {
        let role = match (raw.source, raw.map, raw.sink) {
            (Some(s), None, None) => VertexRole::Source(s),
            (None, Some(m), None) => VertexRole::Map(m),
            (None, None, Some(s)) => VertexRole::Sink(s),
            _ => {
                return Err(format!(
                    "vertex {:?}: give exactly one of source, map or sink",
                    raw.name
                ));
            }
        };
        Ok(VertexDef {
            name: raw.name,
            role,
            scale: raw.scale,
            partitions: raw.partitions,
        })
    }
}

impl From<VertexDef> for RawVertexDef {
    fn from(v: VertexDef) -> Self {
        let (source, map, sink) = match v.role {
            VertexRole::Source(s) => (Some(s), None, None),
            VertexRole::Map(m) => (None, Some(m), None),
            VertexRole::Sink(s) => (None, None, Some(s)),
        };
        RawVertexDef {
            name: v.name,
            source,
            map,
            sink,
            scale: v.scale,
            partitions: v.partitions,
        }
    }
}

/// `source`: where messages come from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceDef {
    /// Built in: writes made-up messages at a steady rate, for tests and benchmarks.
    Generator(GeneratorSource),
    /// Built in: messages POSTed to the vertex's HTTP endpoint.
    Http(HttpSource),
    /// The user's program. Boxed, since it is much larger than the built-ins.
    Run(Box<RunDef>),
}

/// `source: { generator: {...} }`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GeneratorSource {
    /// Messages per second, across all replicas.
    pub rate: u64,
    /// Bytes per message.
    pub message_size: u64,
    /// How many messages in all; without end when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
}

pub const DEFAULT_GENERATOR_RATE: u64 = 1000;
pub const DEFAULT_MESSAGE_SIZE: u64 = 256;
/// The fastest generator: a million messages a second is past what one node moves.
pub const MAX_GENERATOR_RATE: u64 = 1_000_000;
/// The largest generated message, 1 MiB, the size NATS accepts by default.
pub const MAX_MESSAGE_SIZE: u64 = 1 << 20;

impl Default for GeneratorSource {
    fn default() -> Self {
        GeneratorSource {
            rate: DEFAULT_GENERATOR_RATE,
            message_size: DEFAULT_MESSAGE_SIZE,
            total: None,
        }
    }
}

/// `source: { http: {} }`. Nothing to set yet; a struct so that fields can be added.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpSource {}

/// `map`: what transforms each message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MapDef {
    Run(Box<RunDef>),
}

/// `sink`: where messages end.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkDef {
    /// Built in: writes each message to the vertex's log.
    Log(LogSink),
    /// Built in: acknowledges and drops every message, for benchmarks.
    Blackhole(BlackholeSink),
    Run(Box<RunDef>),
}

/// `sink: { log: {} }`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogSink {}

/// `sink: { blackhole: {} }`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlackholeSink {}

/// `run`: what a job could say about the program it runs, with the same field types
/// and meaning as in a job spec. Everything else about the vertex's tasks (their
/// count, restarts) the pipeline decides.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunDef {
    #[serde(default)]
    pub runtime: RuntimeKind,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default)]
    pub pull: PullPolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<ArtifactRef>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "RuntimeEnv::is_empty")]
    pub runtime_env: RuntimeEnv,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub constraints: Vec<Constraint>,
}

impl RunDef {
    /// The spec of the service job whose tasks are the vertex's replicas. `count` is at
    /// least 1, since a job cannot have none: a vertex at zero replicas is one whose job
    /// the controller stops, not one whose count is 0.
    pub fn job_spec(&self, job_name: &str, replicas: u32) -> JobSpec {
        let RunDef {
            runtime,
            command,
            args,
            image,
            pull,
            artifact,
            env,
            runtime_env,
            resources,
            constraints,
        } = self.clone();
        JobSpec {
            kind: JobKind::Service,
            count: replicas.max(1),
            runtime,
            command,
            args,
            image,
            pull,
            artifact,
            env,
            runtime_env,
            resources,
            constraints,
            ..JobSpec::new(job_name, Vec::new())
        }
    }
}

/// One edge: messages written by `from` go to `to`'s input buffer, when the condition
/// (if any) matches the tags the map attached to the message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeDef {
    pub from: String,
    pub to: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<EdgeCondition>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_becomes_a_service_job_with_the_same_program() {
        let run = RunDef {
            runtime: RuntimeKind::Process,
            command: vec!["python3".into(), "upper.py".into()],
            env: BTreeMap::from([("MODE".into(), "upper".into())]),
            ..RunDef::default()
        };
        let job = run.job_spec("etl-upper", 3);
        assert_eq!(job.kind, JobKind::Service);
        assert_eq!(job.count, 3);
        assert_eq!(job.name, "etl-upper");
        assert_eq!(job.command, run.command);
        assert_eq!(job.env, run.env);
        assert_eq!(job.validate(), Ok(()));
        // A job cannot have zero tasks; the controller stops it instead.
        assert_eq!(run.job_spec("etl-upper", 0).count, 1);
    }
}
