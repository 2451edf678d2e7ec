//! The job specification a user writes in YAML (or sends as JSON), and its validation.
//!
//! Parsing happens once, at the edge: the CLI parses YAML with serde-saphyr so that a
//! mistake is reported with the file, line and column; the controller parses the same
//! type from JSON and runs the same [`JobSpec::validate`], so both paths accept exactly
//! the same specs.
//!
//! Unknown fields are refused at that edge ([`JobSpec::from_yaml`], [`JobSpec::from_json`])
//! by watching what the types ignore, not by the types themselves: a spec read back from
//! the store or inside an agent's Start command tolerates fields a newer controller added,
//! so an older agent or a rolled-back controller still reads it.

use crate::quantity::{ByteSize, Dur};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;

/// Whether a job's tasks run to completion or are kept running.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    #[default]
    Batch,
    Service,
}

impl fmt::Display for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            JobKind::Batch => "batch",
            JobKind::Service => "service",
        })
    }
}

/// Which runtime runs a job's tasks. Written as text (`process`, `docker`, `mock`,
/// `plugin:NAME`) and parsed into this enum once.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RuntimeKind {
    #[default]
    Process,
    Docker,
    Mock,
    Plugin(String),
}

impl RuntimeKind {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "process" => Ok(RuntimeKind::Process),
            "docker" => Ok(RuntimeKind::Docker),
            "mock" => Ok(RuntimeKind::Mock),
            other => match other.strip_prefix("plugin:") {
                Some(name) if !name.is_empty() => Ok(RuntimeKind::Plugin(name.to_string())),
                _ => Err(format!(
                    "unknown runtime {other:?}; expected process, docker, mock or plugin:NAME"
                )),
            },
        }
    }
}

impl fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuntimeKind::Process => f.write_str("process"),
            RuntimeKind::Docker => f.write_str("docker"),
            RuntimeKind::Mock => f.write_str("mock"),
            RuntimeKind::Plugin(n) => write!(f, "plugin:{n}"),
        }
    }
}

impl Serialize for RuntimeKind {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RuntimeKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        RuntimeKind::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// What a task reserves on its node. The scheduler only places a task where this fits.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Resources {
    /// CPU cores, fractional (`0.5` is half a core).
    pub cpu: f64,
    /// Memory, e.g. `64Mi`.
    pub memory: ByteSize,
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            cpu: 0.1,
            memory: ByteSize(64 << 20),
        }
    }
}

/// What a constraint compares: a node attribute.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ConstraintKey {
    /// The node's platform, `os/arch[/variant]`.
    Platform,
    Os,
    Arch,
    /// The node's name.
    Name,
    /// A node label, written `label.NAME`.
    Label(String),
}

impl ConstraintKey {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "platform" => Ok(ConstraintKey::Platform),
            "os" => Ok(ConstraintKey::Os),
            "arch" => Ok(ConstraintKey::Arch),
            "name" => Ok(ConstraintKey::Name),
            other => match other.strip_prefix("label.") {
                Some(l) if !l.is_empty() => Ok(ConstraintKey::Label(l.to_string())),
                _ => Err(format!(
                    "unknown constraint key {other:?}; expected platform, os, arch, name or label.NAME"
                )),
            },
        }
    }
}

impl fmt::Display for ConstraintKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConstraintKey::Platform => f.write_str("platform"),
            ConstraintKey::Os => f.write_str("os"),
            ConstraintKey::Arch => f.write_str("arch"),
            ConstraintKey::Name => f.write_str("name"),
            ConstraintKey::Label(l) => write!(f, "label.{l}"),
        }
    }
}

impl Serialize for ConstraintKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ConstraintKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ConstraintKey::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// How a constraint compares the attribute with its value(s).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ConstraintOp {
    #[default]
    #[serde(rename = "==", alias = "eq")]
    Eq,
    #[serde(rename = "!=", alias = "ne")]
    Ne,
    #[serde(rename = "in")]
    In,
    #[serde(rename = "not_in")]
    NotIn,
    #[serde(rename = "exists")]
    Exists,
}

/// A rule a node must satisfy to run a job's tasks, e.g.
/// `{ key: label.zone, op: in, values: [a, b] }`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Constraint {
    pub key: ConstraintKey,
    #[serde(default)]
    pub op: ConstraintOp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

/// The rule as its spec would say it, for reasons that name it: `label.zone in [a, b]`.
impl fmt::Display for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let value = self.value.as_deref().unwrap_or("");
        match self.op {
            ConstraintOp::Eq => write!(f, "{} == {value}", self.key),
            ConstraintOp::Ne => write!(f, "{} != {value}", self.key),
            ConstraintOp::In => write!(f, "{} in [{}]", self.key, self.values.join(", ")),
            ConstraintOp::NotIn => write!(f, "{} not_in [{}]", self.key, self.values.join(", ")),
            ConstraintOp::Exists => write!(f, "{} exists", self.key),
        }
    }
}

impl Constraint {
    /// Whether a node attribute value (None when the node lacks it) satisfies this rule.
    pub fn matches(&self, actual: Option<&str>) -> bool {
        match self.op {
            ConstraintOp::Exists => actual.is_some(),
            ConstraintOp::Eq => actual.is_some() && actual == self.value.as_deref(),
            ConstraintOp::Ne => actual != self.value.as_deref(),
            ConstraintOp::In => actual.is_some_and(|a| self.values.iter().any(|v| v == a)),
            ConstraintOp::NotIn => !actual.is_some_and(|a| self.values.iter().any(|v| v == a)),
        }
    }

    fn validate(&self, at: &str) -> Result<(), String> {
        if self.key == ConstraintKey::Platform {
            let values = self.value.iter().chain(self.values.iter());
            for (i, v) in values.enumerate() {
                if let Err(e) = v.parse::<crate::platform::Platform>() {
                    let field = if self.value.is_some() && i == 0 {
                        "value".to_string()
                    } else {
                        format!("values[{}]", i - usize::from(self.value.is_some()))
                    };
                    return Err(format!("{at}.{field}: {e}"));
                }
            }
        }
        match self.op {
            ConstraintOp::Eq | ConstraintOp::Ne if self.value.is_none() => {
                Err(format!("{at}.value: required for op == and !="))
            }
            ConstraintOp::In | ConstraintOp::NotIn if self.values.is_empty() => Err(format!(
                "{at}.values: required (a non-empty list) for op in and not_in"
            )),
            _ => Ok(()),
        }
    }
}

/// When and how often a failed task is tried again.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RestartPolicy {
    /// For batch jobs: how many times a failed task is retried before the job fails.
    /// For services: how many quick restarts in a row before backing off to `max_delay`;
    /// a service is never given up on.
    pub attempts: u32,
    /// The wait before the first retry.
    pub delay: Dur,
    /// The factor the delay grows by after each retry.
    pub backoff: f64,
    /// The longest wait between retries.
    pub max_delay: Dur,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            attempts: 2,
            delay: Dur::from_millis(500),
            backoff: 2.0,
            max_delay: Dur::from_secs(30),
        }
    }
}

impl RestartPolicy {
    /// The wait before retry number `retry` (1 for the first retry).
    pub fn delay_for(&self, retry: u32) -> std::time::Duration {
        let factor = self
            .backoff
            .max(1.0)
            .powi(retry.saturating_sub(1).min(30) as i32);
        let ms = (self.delay.as_millis() as f64 * factor).min(self.max_delay.as_millis() as f64);
        std::time::Duration::from_millis(ms as u64)
    }
}

/// Scripted behaviour for the `mock` runtime, used by tests and benchmarks.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MockScript {
    /// How long preparing takes.
    pub prepare_latency: Dur,
    /// How long starting takes.
    pub start_latency: Dur,
    /// Exit after this long; absent means run until stopped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_after: Option<Dur>,
    pub exit_code: i32,
    /// Fail to start with this message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fail_start: Option<String>,
    /// Ignore graceful stops, so only the forced kill ends the task.
    pub ignore_stop: bool,
}

/// When the Docker runtime pulls a job's image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PullPolicy {
    /// Never pull; a missing image fails the task.
    Never,
    /// Pull only when the engine does not have the image.
    #[default]
    IfNotPresent,
    /// Pull before every start.
    Always,
}

/// What happens to a job's tasks when their node stops answering.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnLost {
    /// Run a replacement elsewhere once `lost_after` has passed; should the original
    /// come back before the replacement finished, the original is kept.
    #[default]
    Reschedule,
    /// Never run a replacement: the task is lost and the job fails, for work that must
    /// not run twice.
    Fail,
}

/// `disconnect`: how long a job's tasks on an unreachable node are waited for.
///
/// A node that misses heartbeats for the controller's node timeout is unreachable and
/// its tasks are `unknown`: not finished, not failed. After `lost_after` they are
/// replaced (or, with `on_lost: fail`, the job fails). When the node comes back, what
/// its tasks did stands: a result it reports is accepted if no replacement finished
/// first, and the surplus copy is stopped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct Disconnect {
    /// How long after its node became unreachable a task is replaced. Defaults to
    /// [`SERVICE_LOST_AFTER`] for services and [`BATCH_LOST_AFTER`] for batch jobs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lost_after: Option<Dur>,
    pub on_lost: OnLost,
}

/// A service's tasks on an unreachable node are replaced this soon, by default.
pub const SERVICE_LOST_AFTER: Dur = Dur::from_secs(5);
/// A batch task on an unreachable node is waited for this long, by default, before it
/// is run again elsewhere: long enough to ride out an agent restart or a short outage.
pub const BATCH_LOST_AFTER: Dur = Dur::from_secs(300);
/// The longest `disconnect.lost_after` accepted.
pub const MAX_LOST_AFTER: Dur = Dur::from_secs(7 * 24 * 3600);

/// The longest `retention`: a year; a record kept longer is better kept elsewhere.
pub const MAX_RETENTION: Dur = Dur::from_secs(365 * 24 * 3600);

impl Disconnect {
    pub fn is_default(&self) -> bool {
        *self == Disconnect::default()
    }
}

/// How much of a task's output the controller keeps. Each stream (stdout, stderr) is
/// kept up to `max_size`; past it the oldest half is dropped, so a task that writes
/// without end costs the controller a bounded amount of disk and `drover logs` still
/// shows its latest output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct Logs {
    /// The most kept per task and stream; [`DEFAULT_LOG_MAX_SIZE`] when not given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_size: Option<ByteSize>,
}

/// The output kept per task and stream when a job does not say.
pub const DEFAULT_LOG_MAX_SIZE: ByteSize = ByteSize(64 << 20);
/// The smallest `logs.max_size` accepted: below it, dropping half at a time would
/// drop lines a person is still reading.
pub const MIN_LOG_MAX_SIZE: ByteSize = ByteSize(64 << 10);
/// The largest `logs.max_size` accepted, so one job cannot claim the controller's disk.
pub const MAX_LOG_MAX_SIZE: ByteSize = ByteSize(4 << 30);

impl Logs {
    pub fn is_default(&self) -> bool {
        *self == Logs::default()
    }

    /// The cap in force for each stream.
    pub fn max_size(&self) -> ByteSize {
        self.max_size.unwrap_or(DEFAULT_LOG_MAX_SIZE)
    }

    fn validate(&self) -> Result<(), String> {
        if let Some(m) = self.max_size
            && !(MIN_LOG_MAX_SIZE..=MAX_LOG_MAX_SIZE).contains(&m)
        {
            return Err(format!(
                "logs.max_size: expected a size from {MIN_LOG_MAX_SIZE} to {MAX_LOG_MAX_SIZE}, got {m}"
            ));
        }
        Ok(())
    }
}

/// `update`: how a running service moves to a new version of its spec. Its tasks are
/// replaced a few indexes at a time: for each index the old task is stopped and a task
/// of the new version started in its place, and the next index is taken only once the
/// new task has run (and passed its health check, if it has one) for
/// `min_healthy_time`. A new task that fails before then stops the rollout, and the old
/// tasks not yet replaced keep running. Only services have it; a change of `count`
/// alone never rolls anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct UpdatePolicy {
    /// How many indexes are replaced at once.
    pub max_parallel: u32,
    /// How long a new task must run before its index counts as updated.
    pub min_healthy_time: Dur,
}

/// A rollout replaces one index at a time unless the spec says otherwise.
pub const DEFAULT_MAX_PARALLEL: u32 = 1;
/// How long a new task must run before its index counts as updated, unless the spec
/// says otherwise (Nomad's default).
pub const DEFAULT_MIN_HEALTHY_TIME: Dur = Dur::from_secs(10);
/// The longest `update.min_healthy_time`: a task that must run an hour before it counts
/// makes a rollout of a few tasks last a day.
pub const MAX_MIN_HEALTHY_TIME: Dur = Dur::from_secs(60 * 60);

impl Default for UpdatePolicy {
    fn default() -> Self {
        UpdatePolicy {
            max_parallel: DEFAULT_MAX_PARALLEL,
            min_healthy_time: DEFAULT_MIN_HEALTHY_TIME,
        }
    }
}

impl UpdatePolicy {
    fn validate(&self) -> Result<(), String> {
        // As many at once as a job may have tasks means "all at once"; more says nothing
        // more, and a bound keeps the rollout's bookkeeping bounded too.
        if self.max_parallel == 0 || self.max_parallel > MAX_COUNT {
            return Err(format!(
                "update.max_parallel: expected 1 to {MAX_COUNT} (how many tasks are replaced at once), got {}",
                self.max_parallel
            ));
        }
        Ok(())
    }
}

/// An HTTP health probe: healthy when `GET path` on the port answers 2xx or 3xx.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HttpProbe {
    /// The container port (for Docker, the host port mapped to it is probed).
    pub port: u16,
    #[serde(default = "default_probe_path")]
    pub path: String,
}

fn default_probe_path() -> String {
    "/".into()
}

/// A TCP health probe: healthy when the port accepts a connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TcpProbe {
    pub port: u16,
}

/// How a service task shows it is ready. Exactly one of `http`, `tcp` or `command`.
/// A task with a health check becomes `running` only once a probe passes; it fails if
/// none passes before `start_deadline`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HealthCheck {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpProbe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpProbe>,
    /// A command run inside the task's environment (for Docker, inside the container);
    /// exit code 0 means healthy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    #[serde(default = "default_probe_interval")]
    pub interval: Dur,
    #[serde(default = "default_probe_timeout")]
    pub timeout: Dur,
    #[serde(default = "default_probe_deadline")]
    pub start_deadline: Dur,
}

fn default_probe_interval() -> Dur {
    Dur::from_secs(1)
}

fn default_probe_timeout() -> Dur {
    Dur::from_secs(1)
}

fn default_probe_deadline() -> Dur {
    Dur::from_secs(60)
}

impl HealthCheck {
    fn validate(&self) -> Result<(), String> {
        let n =
            self.http.is_some() as u8 + self.tcp.is_some() as u8 + !self.command.is_empty() as u8;
        if n != 1 {
            return Err("health: give exactly one of http, tcp or command".into());
        }
        if self.interval.as_millis() == 0 || self.timeout.as_millis() == 0 {
            return Err("health: interval and timeout must be positive".into());
        }
        if self.start_deadline.as_millis() == 0 {
            return Err("health.start_deadline: must be positive".into());
        }
        if let Some(h) = &self.http
            && !h.path.starts_with('/')
        {
            return Err(format!(
                "health.http.path: expected a path starting with '/', got {:?}",
                h.path
            ));
        }
        Ok(())
    }
}

/// A job as the user declares it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub name: String,
    #[serde(default)]
    pub kind: JobKind,
    #[serde(default = "default_count")]
    pub count: u32,
    #[serde(default)]
    pub runtime: RuntimeKind,
    /// The program and its arguments, as a list of strings (no shell is involved).
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default)]
    pub constraints: Vec<Constraint>,
    #[serde(default)]
    pub restart: RestartPolicy,
    /// How long a task has between SIGTERM and SIGKILL when stopped.
    #[serde(default = "default_stop_grace")]
    pub stop_grace: Dur,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mock: Option<MockScript>,
    /// The container image (runtime `docker`, and plugins that run images).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// For `docker`: arguments that replace the image's CMD. `command`, when given,
    /// replaces the image's ENTRYPOINT (as in Kubernetes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Container ports to publish; the agent picks a free host port for each and reports
    /// the mapping in the task's status.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    #[serde(default)]
    pub pull: PullPolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthCheck>,
    /// An artifact (`NAME:VERSION`) whose variant for the node is placed, executable, in
    /// the task's directory under the artifact's name; with no `command`, it is run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<crate::artifact::ArtifactRef>,
    /// What the task needs around it: variables, a config object, files, a Python
    /// environment. Nothing on the node is shared with other jobs.
    #[serde(default, skip_serializing_if = "RuntimeEnv::is_empty")]
    pub runtime_env: RuntimeEnv,
    /// What happens to the job's tasks when their node stops answering.
    #[serde(default, skip_serializing_if = "Disconnect::is_default")]
    pub disconnect: Disconnect,
    /// How much of each task's output the controller keeps.
    #[serde(default, skip_serializing_if = "Logs::is_default")]
    pub logs: Logs,
    /// How long the controller keeps this job, its tasks and their logs once it has
    /// finished (like Kubernetes' `ttlSecondsAfterFinished`); the controller's
    /// `--job-retention` (24h) when absent. `drover run` without `--name` sets 1h, so
    /// one-off runs do not pile up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Dur>,
    /// What each task reads on its standard input: an uploaded blob, given whole. Absent,
    /// a task's stdin is `/dev/null`. `drover run` sets it from its own stdin when that
    /// is piped or redirected from a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<StdinInput>,
    /// How a running service rolls over to a new version of this spec; the defaults of
    /// [`UpdatePolicy`] when absent. Services only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<UpdatePolicy>,
    /// Set only by the controller, on the jobs whose tasks are a pipeline vertex's
    /// replicas: where each replica reads and writes messages. The API refuses a job
    /// spec that carries it, so no user job can reach a pipeline's buffers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vertex: Option<Box<crate::plane::VertexPlane>>,
}

/// `stdin`: the content a task reads on its standard input, stored on the controller as
/// a blob of the job's project.
///
/// Input is data given whole before the task starts, not a stream from the client (like
/// `kubectl create --from-file`, not `kubectl run -i`): the agent fetches the blob and
/// opens it as the task's stdin, so the input is the same whether the task is started
/// for the first time, retried, rescheduled on another node or adopted by a restarted
/// agent, and no client needs to stay connected.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StdinInput {
    /// The blob's digest (`sha256:...`), uploaded with `PUT /v1/blobs/{digest}`.
    pub blob: crate::artifact::Digest,
    /// The blob's size in bytes, which the controller checks and the agent's download
    /// is held to.
    pub size: u64,
}

/// The largest `stdin` accepted. Input this size is read whole by the CLI and stored on
/// the controller for as long as the job is kept; bigger data belongs in an artifact or
/// a `runtime_env.working_dir`.
pub const MAX_STDIN_BYTES: u64 = 64 << 20;

/// The node attribute (after the runtime's name: `process.stdin`) that an agent sets to
/// `true` for each runtime of its that gives tasks their `stdin`. Agents older than the
/// field do not set it, and the scheduler places a job with `stdin` only where it is
/// set, so no task is ever started with `/dev/null` in place of its input.
pub const STDIN_ATTRIBUTE: &str = "stdin";

/// The node attribute (after the runtime's name: `process.vertex`) that an agent sets
/// to `true` for each runtime whose tasks it can serve as pipeline vertex replicas
/// (their data plane on the task socket, their buffers through its connection).
/// Agents older than pipelines do not set it, and the scheduler places a job with
/// `vertex` only where it is set, so no replica starts where nothing moves its data.
pub const VERTEX_ATTRIBUTE: &str = "vertex";

/// A job's own environment, materialised on the node before its task starts.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RuntimeEnv {
    /// Variables, merged over the job's `env`. The task sees these, the job's `env`
    /// and Drover's `DROVER_*` variables, and nothing from the agent's environment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Any structured object. The task finds it, as JSON, in the file named by
    /// `DROVER_CONFIG`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<serde_json::Value>,
    /// Files unpacked into the task's directory: in the API, the digest of an uploaded
    /// gzip'd tar archive (`sha256:...`); in a YAML file given to the CLI, a local
    /// directory (relative to the file), which the CLI packs and uploads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// A Python virtual environment built on the node with these requirements.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub python: Option<PythonEnv>,
    /// The limit on materialising all of this on a node (downloads, unpacking, building
    /// the Python environment); the agent's prepare timeout when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub setup_timeout: Option<Dur>,
}

/// `runtime_env.python`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PythonEnv {
    /// pip requirement specifiers, e.g. `six==1.16.0`; no pip options.
    pub requirements: Vec<String>,
}

/// The largest config object accepted, encoded as compact JSON. Configs travel in every
/// task assignment; bulk data belongs in `working_dir` or an artifact.
pub const MAX_CONFIG_BYTES: usize = 1 << 20;

impl RuntimeEnv {
    pub fn is_empty(&self) -> bool {
        *self == RuntimeEnv::default()
    }

    fn validate(&self, runtime: &RuntimeKind) -> Result<(), String> {
        validate_env_names("runtime_env.env", &self.env)?;
        if let Some(config) = &self.config {
            let len = serde_json::to_vec(config)
                .map(|v| v.len())
                .unwrap_or(usize::MAX);
            if len > MAX_CONFIG_BYTES {
                return Err(format!(
                    "runtime_env.config: {len} bytes as JSON, more than the {MAX_CONFIG_BYTES} allowed; put bulk data in working_dir or an artifact"
                ));
            }
        }
        // Only the controller requires a digest here: the CLI reads a local directory
        // from the same field and replaces it with its archive's digest.
        if self
            .working_dir
            .as_deref()
            .is_some_and(|w| w.trim().is_empty())
        {
            return Err("runtime_env.working_dir: expected a directory (or, in the API, an archive's digest)".into());
        }
        if let Some(py) = &self.python {
            if py.requirements.is_empty() {
                return Err("runtime_env.python.requirements: expected at least one requirement, e.g. [\"six==1.16.0\"]".into());
            }
            for (i, r) in py.requirements.iter().enumerate() {
                validate_requirement(r)
                    .map_err(|m| format!("runtime_env.python.requirements[{i}]: {m}"))?;
            }
        }
        if let Some(t) = self.setup_timeout
            && t.as_millis() == 0
        {
            return Err("runtime_env.setup_timeout: must be positive".into());
        }
        // A container brings its own interpreter: a Python environment built on the node
        // would not run in it. Its config file and working_dir are bound in.
        if *runtime == RuntimeKind::Docker && self.python.is_some() {
            return Err(
                "runtime_env.python: not supported by runtime docker; build it into the image (runtime_env.env, config and working_dir work)"
                    .into(),
            );
        }
        Ok(())
    }
}

/// Checks one pip requirement: a specifier, never an option (`--index-url`, `-e`), which
/// could point pip somewhere the node's operator did not intend.
pub fn validate_requirement(r: &str) -> Result<(), String> {
    let t = r.trim();
    if t.is_empty() {
        return Err("empty; expected a requirement like six==1.16.0".into());
    }
    if t.starts_with('-') {
        return Err(format!(
            "{r:?} is a pip option; only requirement specifiers are accepted"
        ));
    }
    if r.contains(['\n', '\r', '\0']) {
        return Err(format!(
            "{r:?} contains a line break; give one requirement per entry"
        ));
    }
    Ok(())
}

fn validate_env_names(field: &str, env: &BTreeMap<String, String>) -> Result<(), String> {
    for key in env.keys() {
        let ok = !key.is_empty()
            && !key.contains('=')
            && !key.contains('\0')
            && !key.chars().next().is_some_and(|c| c.is_ascii_digit());
        if !ok {
            return Err(format!(
                "{field}.{key}: not a valid environment variable name"
            ));
        }
        if key.starts_with("DROVER_") {
            return Err(format!(
                "{field}.{key}: names starting with DROVER_ are set by Drover itself"
            ));
        }
    }
    Ok(())
}

impl JobSpec {
    /// A spec with the given name and command and every other field at its default.
    pub fn new(name: impl Into<String>, command: Vec<String>) -> JobSpec {
        JobSpec {
            name: name.into(),
            kind: JobKind::default(),
            count: 1,
            runtime: RuntimeKind::default(),
            command,
            env: BTreeMap::new(),
            resources: Resources::default(),
            constraints: Vec::new(),
            restart: RestartPolicy::default(),
            stop_grace: default_stop_grace(),
            mock: None,
            image: None,
            args: Vec::new(),
            ports: Vec::new(),
            pull: PullPolicy::default(),
            health: None,
            artifact: None,
            runtime_env: RuntimeEnv::default(),
            disconnect: Disconnect::default(),
            logs: Logs::default(),
            retention: None,
            stdin: None,
            update: None,
            vertex: None,
        }
    }

    /// The update policy in force: the spec's, or the defaults.
    pub fn update_policy(&self) -> UpdatePolicy {
        self.update.unwrap_or_default()
    }

    /// How long a task of this job on an unreachable node is waited for before it is
    /// replaced (or, with `on_lost: fail`, given up).
    pub fn lost_after(&self) -> std::time::Duration {
        let d = self.disconnect.lost_after.unwrap_or(match self.kind {
            JobKind::Service => SERVICE_LOST_AFTER,
            JobKind::Batch => BATCH_LOST_AFTER,
        });
        std::time::Duration::from_millis(d.as_millis())
    }
}

fn default_count() -> u32 {
    1
}

fn default_stop_grace() -> Dur {
    Dur::from_secs(5)
}

/// The most tasks one job may ask for; a typo like `count: 1000000000` is refused
/// instead of filling the store.
pub const MAX_COUNT: u32 = 100_000;

/// The longest `stop_grace`. A task that needs more than an hour to shut down cannot be
/// stopped in practice, and the controller waits this long (plus its own margin) for a
/// stopping task before it declares the task lost.
pub const MAX_STOP_GRACE: Dur = Dur::from_secs(60 * 60);

/// The longest `restart.delay` and `restart.max_delay`: a task that waits more than an
/// hour to be tried again looks, to whoever watches it, like one never retried.
pub const MAX_RESTART_DELAY: Dur = Dur::from_secs(60 * 60);

/// The longest `health.interval` and `health.timeout`: a probe rarer or slower than
/// hourly checks nothing a user would call health.
pub const MAX_PROBE_PERIOD: Dur = Dur::from_secs(60 * 60);

/// The longest `health.start_deadline` and `runtime_env.setup_timeout`. Starting a
/// service or building its environment may download a great deal, but one that has not
/// finished within a day is stuck, and its node's resources stay reserved meanwhile.
pub const MAX_START_WAIT: Dur = Dur::from_secs(24 * 60 * 60);

/// The longest of the mock runtime's scripted durations; tests and benchmarks never
/// need more, and the bound keeps every duration in a spec finite.
pub const MAX_MOCK_DURATION: Dur = Dur::from_secs(24 * 60 * 60);

/// The longest single argument or environment entry (`NAME=VALUE`) a task may have:
/// Linux refuses to exec a string longer than MAX_ARG_STRLEN, 131072 bytes including its
/// terminating NUL. Checked at apply, the mistake is reported before any node tries.
pub const MAX_ARG_BYTES: usize = 131_071;

/// The most bytes a task's arguments and environment may take together, each string
/// counted with its NUL. Linux allows a quarter of the stack limit (2 MiB under the
/// usual 8 MiB), and the agent adds its own `DROVER_*` variables; 1 MiB leaves room for
/// both on any node with a default stack limit.
pub const MAX_EXEC_BYTES: usize = 1 << 20;

/// A spec that could not be accepted, with where in which file, when that is known.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub struct SpecError {
    pub file: Option<String>,
    pub line: Option<u64>,
    pub column: Option<u64>,
    pub message: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{file}")?;
            if let (Some(l), Some(c)) = (self.line, self.column) {
                write!(f, ":{l}:{c}")?;
            }
            write!(f, ": ")?;
        } else if let (Some(l), Some(c)) = (self.line, self.column) {
            write!(f, "line {l}, column {c}: ")?;
        }
        write!(f, "{}", self.message)
    }
}

impl SpecError {
    pub(crate) fn invalid(file: Option<&str>, message: String) -> Self {
        SpecError {
            file: file.map(str::to_string),
            line: None,
            column: None,
            message,
        }
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.chars().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_' || c == '.'
        })
}

/// Whether `name` is usable as a job name: 1–63 characters of `a-z 0-9 - _ .`, starting
/// with a letter or digit.
pub fn is_valid_job_name(name: &str) -> bool {
    valid_name(name)
}

impl JobSpec {
    /// Parses and validates a YAML spec; `file` names it in error messages.
    pub fn from_yaml(text: &str, file: &str) -> Result<JobSpec, SpecError> {
        let spec: JobSpec = parse_yaml(text, file, "a job spec")?;
        spec.validate().map_err(|message| {
            // Point at the top-level key the message names, so a rule the types alone
            // cannot express is reported with a line like a type error is.
            let field = message.split(['.', '[', ':']).next().unwrap_or("");
            let line = text.lines().position(|l| {
                l.strip_prefix(field)
                    .is_some_and(|r| r.trim_start().starts_with(':'))
            });
            SpecError {
                file: Some(file.to_string()),
                line: line.map(|l| l as u64 + 1),
                column: line.map(|_| 1),
                message,
            }
        })?;
        Ok(spec)
    }

    /// Parses and validates a JSON spec, as the API receives it.
    pub fn from_json(text: &[u8]) -> Result<JobSpec, SpecError> {
        let spec: JobSpec = parse_json(text, "the job spec")?;
        spec.validate().map_err(|m| SpecError::invalid(None, m))?;
        Ok(spec)
    }

    /// Checks what the types alone cannot; the message starts with the field's path.
    pub fn validate(&self) -> Result<(), String> {
        if !valid_name(&self.name) {
            return Err(format!(
                "name: {:?} is not a valid job name; expected 1-63 characters of a-z, 0-9, '-', '_' or '.', starting with a letter or digit",
                self.name
            ));
        }
        if self.count == 0 || self.count > MAX_COUNT {
            return Err(format!(
                "count: expected 1 to {MAX_COUNT}, got {}",
                self.count
            ));
        }
        match self.runtime {
            RuntimeKind::Mock => {}
            RuntimeKind::Docker if self.image.as_deref().is_none_or(str::is_empty) => {
                return Err(
                    "image: required for runtime docker, e.g. image: local/busybox:1".into(),
                );
            }
            RuntimeKind::Docker => {}
            RuntimeKind::Process if self.artifact.is_some() => {}
            // A built-in vertex runs the agent's own binary, which only the agent knows.
            RuntimeKind::Process if self.vertex.as_ref().is_some_and(|v| v.is_builtin()) => {}
            _ if self.command.is_empty() => {
                return Err(format!(
                    "command: required for runtime {}; give the program and its arguments as a list, e.g. [\"sh\", \"-c\", \"echo hi\"]",
                    self.runtime
                ));
            }
            _ => {}
        }
        if self.command.first().is_some_and(|c| c.is_empty()) {
            return Err("command[0]: the program must not be empty".into());
        }
        self.validate_exec_size()?;
        self.validate_durations()?;
        self.logs.validate()?;
        validate_env_names("env", &self.env)?;
        self.runtime_env.validate(&self.runtime)?;
        if !(self.resources.cpu > 0.0 && self.resources.cpu.is_finite()) {
            return Err(format!(
                "resources.cpu: expected a positive number of cores, got {}",
                self.resources.cpu
            ));
        }
        if self.resources.memory.0 == 0 {
            return Err("resources.memory: expected a positive size like 64Mi".into());
        }
        for (i, c) in self.constraints.iter().enumerate() {
            c.validate(&format!("constraints[{i}]"))?;
        }
        if !(self.restart.backoff >= 1.0 && self.restart.backoff.is_finite()) {
            return Err(format!(
                "restart.backoff: expected a factor of at least 1.0, got {}",
                self.restart.backoff
            ));
        }
        if self.artifact.is_some() && matches!(self.runtime, RuntimeKind::Docker) {
            return Err("artifact: not used by runtime docker; ship code in the image".into());
        }
        if self.mock.is_some() && self.runtime != RuntimeKind::Mock {
            return Err("mock: only allowed with runtime: mock".into());
        }
        if self.image.is_some() && matches!(self.runtime, RuntimeKind::Process | RuntimeKind::Mock)
        {
            return Err(format!(
                "image: not used by runtime {}; use runtime: docker",
                self.runtime
            ));
        }
        if !self.args.is_empty() && self.runtime != RuntimeKind::Docker {
            return Err("args: only used by runtime docker; put arguments in command".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, p) in self.ports.iter().enumerate() {
            if *p == 0 {
                return Err(format!("ports[{i}]: expected a port from 1 to 65535"));
            }
            if !seen.insert(*p) {
                return Err(format!("ports[{i}]: port {p} is listed twice"));
            }
        }
        // The process runtime publishes no ports and runs no probes; accepting either
        // would let a user believe a check guards the task when none does.
        if matches!(self.runtime, RuntimeKind::Process | RuntimeKind::Mock) {
            if !self.ports.is_empty() {
                return Err(format!(
                    "ports: runtime {} does not publish ports (a process binds the node's ports directly); use runtime: docker",
                    self.runtime
                ));
            }
            if self.health.is_some() {
                return Err(format!(
                    "health: runtime {} does not run health checks; use runtime: docker or a plugin that does",
                    self.runtime
                ));
            }
        }
        if let Some(h) = &self.health {
            h.validate()?;
            if self.kind != JobKind::Service {
                return Err("health: only service jobs have health checks".into());
            }
        }
        if let Some(input) = &self.stdin {
            if input.size == 0 || input.size > MAX_STDIN_BYTES {
                return Err(format!(
                    "stdin.size: expected 1 to {MAX_STDIN_BYTES} bytes ({}), got {}; give bigger input as an artifact or a runtime_env.working_dir",
                    ByteSize(MAX_STDIN_BYTES),
                    input.size
                ));
            }
            // The mock runtime runs no program, so nothing would read the input; saying
            // so beats a job that seems to use it.
            if self.runtime == RuntimeKind::Mock {
                return Err("stdin: runtime mock runs no program to read it".into());
            }
        }
        if let Some(u) = &self.update {
            if self.kind != JobKind::Service {
                return Err(
                    "update: only services roll out new versions; a batch job's new version replaces the old one at once, so remove update or use kind: service".into(),
                );
            }
            u.validate()?;
        }
        Ok(())
    }
}

impl JobSpec {
    /// Refuses arguments and environments a node could not exec, so the mistake is
    /// reported at apply rather than as a failed start on every node tried.
    fn validate_exec_size(&self) -> Result<(), String> {
        let probe: &[String] = self.health.as_ref().map_or(&[], |h| &h.command);
        for (field, list) in [
            ("command", &self.command[..]),
            ("args", &self.args[..]),
            ("health.command", probe),
        ] {
            for (i, a) in list.iter().enumerate() {
                if a.len() > MAX_ARG_BYTES {
                    return Err(format!(
                        "{field}[{i}]: {} bytes; a single argument may be at most {MAX_ARG_BYTES} bytes",
                        a.len()
                    ));
                }
            }
        }
        for (field, env) in [
            ("env", &self.env),
            ("runtime_env.env", &self.runtime_env.env),
        ] {
            for (k, v) in env {
                let n = k.len() + 1 + v.len();
                if n > MAX_ARG_BYTES {
                    return Err(format!(
                        "{field}.{}: {n} bytes as NAME=VALUE; a single environment variable may be at most {MAX_ARG_BYTES} bytes",
                        clip(k)
                    ));
                }
            }
        }
        // The task sees runtime_env.env merged over env, so a name in both counts once.
        let mut env: BTreeMap<&str, &str> = BTreeMap::new();
        for (k, v) in self.env.iter().chain(&self.runtime_env.env) {
            env.insert(k, v);
        }
        let args: usize = self
            .command
            .iter()
            .chain(&self.args)
            .map(|a| a.len() + 1)
            .sum();
        let vars: usize = env.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
        if args + vars > MAX_EXEC_BYTES {
            return Err(format!(
                "command and env: {} bytes together (command and args {args}, env and runtime_env.env {vars}, each string with its NUL); a task's arguments and environment may be at most {MAX_EXEC_BYTES} bytes",
                args + vars
            ));
        }
        Ok(())
    }

    /// Refuses any duration above its field's bound. Every duration in a spec is listed
    /// here; the structs are taken apart without `..`, so a field added to any of them
    /// fails to compile until it is listed (with a bound) or named as not a duration.
    fn validate_durations(&self) -> Result<(), String> {
        let JobSpec {
            name: _,
            kind: _,
            count: _,
            runtime: _,
            command: _,
            env: _,
            resources: _,
            constraints: _,
            restart,
            stop_grace,
            mock,
            image: _,
            args: _,
            ports: _,
            pull: _,
            health,
            artifact: _,
            runtime_env,
            disconnect,
            logs: _,
            retention,
            stdin: _,
            update,
            vertex: _,
        } = self;
        let Disconnect {
            lost_after,
            on_lost: _,
        } = disconnect;
        let RestartPolicy {
            attempts: _,
            delay,
            backoff: _,
            max_delay,
        } = restart;
        let RuntimeEnv {
            env: _,
            config: _,
            working_dir: _,
            python: _,
            setup_timeout,
        } = runtime_env;
        let mut all = vec![
            ("stop_grace", *stop_grace, MAX_STOP_GRACE),
            ("restart.delay", *delay, MAX_RESTART_DELAY),
            ("restart.max_delay", *max_delay, MAX_RESTART_DELAY),
        ];
        if let Some(t) = setup_timeout {
            all.push(("runtime_env.setup_timeout", *t, MAX_START_WAIT));
        }
        if let Some(t) = lost_after {
            all.push(("disconnect.lost_after", *t, MAX_LOST_AFTER));
        }
        if let Some(t) = retention {
            all.push(("retention", *t, MAX_RETENTION));
        }
        if let Some(UpdatePolicy {
            max_parallel: _,
            min_healthy_time,
        }) = update
        {
            all.push((
                "update.min_healthy_time",
                *min_healthy_time,
                MAX_MIN_HEALTHY_TIME,
            ));
        }
        if let Some(HealthCheck {
            http: _,
            tcp: _,
            command: _,
            interval,
            timeout,
            start_deadline,
        }) = health
        {
            all.push(("health.interval", *interval, MAX_PROBE_PERIOD));
            all.push(("health.timeout", *timeout, MAX_PROBE_PERIOD));
            all.push(("health.start_deadline", *start_deadline, MAX_START_WAIT));
        }
        if let Some(MockScript {
            prepare_latency,
            start_latency,
            exit_after,
            exit_code: _,
            fail_start: _,
            ignore_stop: _,
        }) = mock
        {
            all.push(("mock.prepare_latency", *prepare_latency, MAX_MOCK_DURATION));
            all.push(("mock.start_latency", *start_latency, MAX_MOCK_DURATION));
            if let Some(e) = exit_after {
                all.push(("mock.exit_after", *e, MAX_MOCK_DURATION));
            }
        }
        for (field, value, max) in all {
            if value > max {
                return Err(format!(
                    "{field}: expected at most {}, got {value}",
                    bound_text(max)
                ));
            }
        }
        Ok(())
    }
}

/// Reads a YAML document into `T`, refusing a key no field takes, with the file, line,
/// column and field path in the error. `what` names the document in messages ("a job
/// spec"). Shared by every spec a user writes, so each is read with the same care.
pub(crate) fn parse_yaml<T: serde::de::DeserializeOwned>(
    text: &str,
    file: &str,
    what: &str,
) -> Result<T, SpecError> {
    // serde_path_to_error records which field failed, so a type error names it even
    // when the YAML library's own message only names the expected type.
    let path = std::cell::RefCell::new(String::new());
    let mut unknown = None;
    let parsed = serde_saphyr::with_deserializer_from_str(text, |de| {
        let mut note = |p: serde_ignored::Path<'_>| note_unknown(&mut unknown, p);
        let de = serde_ignored::Deserializer::new(de, &mut note);
        serde_path_to_error::deserialize(de).map_err(|e| {
            *path.borrow_mut() = e.path().to_string();
            e.into_inner()
        })
    });
    let value: T = parsed.map_err(|e| {
        let loc = e.location();
        let path = path.into_inner();
        let found = loc.and_then(|l| value_at(text, l.line(), l.column()));
        let message = plain_words(&path, &yaml_message(&e.to_string()), found.as_deref(), what);
        SpecError {
            file: Some(file.to_string()),
            line: loc.map(|l| l.line()),
            column: loc.map(|l| l.column()),
            message: if path.is_empty() || path == "." {
                message
            } else {
                format!("{path}: {message}")
            },
        }
    })?;
    if let Some((parent, leaf)) = unknown {
        let line = text.lines().position(|l| {
            l.trim_start()
                .trim_start_matches("- ")
                .trim_start_matches('{')
                .trim_start()
                .starts_with(&format!("{leaf}:"))
        });
        return Err(SpecError {
            file: Some(file.to_string()),
            line: line.map(|l| l as u64 + 1),
            column: line.map(|_| 1),
            message: unknown_message(&parent, &leaf),
        });
    }
    Ok(value)
}

/// Reads one JSON object into `T` as the API receives it, refusing unknown keys and
/// anything after the object. `what` names the document in messages ("the job spec").
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(
    text: &[u8],
    what: &str,
) -> Result<T, SpecError> {
    let mut de = serde_json::Deserializer::from_slice(text);
    let mut unknown = None;
    let mut note = |p: serde_ignored::Path<'_>| note_unknown(&mut unknown, p);
    let watched = serde_ignored::Deserializer::new(&mut de, &mut note);
    let value: T = serde_path_to_error::deserialize(watched).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        // serde_json appends its own " at line L column C"; the location is kept
        // in the fields instead, so it is not said twice.
        let msg = inner.to_string();
        let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
        SpecError {
            file: None,
            line: Some(inner.line() as u64),
            column: Some(inner.column() as u64),
            message: if path.is_empty() || path == "." {
                msg
            } else {
                format!("{path}: {msg}")
            },
        }
    })?;
    // `from_slice` on a Deserializer reads one value and stops; without this check
    // `{...} not json` would be accepted as if the garbage were not there.
    de.end().map_err(|e| SpecError {
        file: None,
        line: Some(e.line() as u64),
        column: Some(e.column() as u64),
        message: format!("unexpected data after {what}; send exactly one JSON object"),
    })?;
    if let Some((parent, leaf)) = unknown {
        return Err(SpecError::invalid(None, unknown_message(&parent, &leaf)));
    }
    Ok(value)
}

/// A bound as a user would write it: the bounds are whole hours, which humantime would
/// print as `1day` for 24h.
pub(crate) fn bound_text(max: Dur) -> String {
    let secs = max.0.as_secs();
    if secs > 0 && secs.is_multiple_of(3600) && max.0.subsec_nanos() == 0 {
        format!("{}h", secs / 3600)
    } else {
        max.to_string()
    }
}

/// A name short enough to quote in a message, however long the user made it.
fn clip(s: &str) -> String {
    const SHOWN: usize = 64;
    if s.len() <= SHOWN {
        return s.to_string();
    }
    let end = (0..=SHOWN)
        .rev()
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0);
    format!("{}...", &s[..end])
}

/// Keeps the first key of a spec that no field takes, as (its parent's path, the key).
fn note_unknown(first: &mut Option<(String, String)>, path: serde_ignored::Path<'_>) {
    if first.is_some() {
        return;
    }
    let (parent, leaf) = match path {
        serde_ignored::Path::Map { parent, key } => (path_text(parent), key),
        other => (String::new(), path_text(&other)),
    };
    *first = Some((parent, leaf));
}

/// A path as validation messages write it (`constraints[0].key`), rather than as
/// serde_ignored does (`constraints.0.key`, with `?` for an optional value's inside,
/// a step the user never wrote).
fn path_text(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", path_text(parent)),
        Path::Map { parent, key } => match path_text(parent) {
            p if p.is_empty() => key.clone(),
            p => format!("{p}.{key}"),
        },
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => path_text(parent),
    }
}

fn unknown_message(parent: &str, leaf: &str) -> String {
    if parent.is_empty() {
        format!(
            "unknown field `{leaf}`; check its spelling, or whether this Drover is older than the spec"
        )
    } else {
        format!(
            "{parent}: unknown field `{leaf}`; check its spelling, or whether this Drover is older than the spec"
        )
    }
}

/// The YAML library's message without its own `error: line N column M:` prefix and
/// source snippet, since [`SpecError`] prints the location itself.
/// The scalar written at a 1-based line and column of the spec, as the user wrote it:
/// the rest of the line up to a comma, a closing bracket or a comment.
fn value_at(text: &str, line: u64, column: u64) -> Option<String> {
    let l = text
        .lines()
        .nth(usize::try_from(line).ok()?.checked_sub(1)?)?;
    let start = usize::try_from(column).ok()?.checked_sub(1)?;
    let rest = l.get(start..)?.trim_start();
    if rest.starts_with('[')
        || rest.starts_with('-') && !rest[1..].starts_with(|c: char| c.is_ascii_digit())
    {
        return Some("a list".to_string());
    }
    if rest.starts_with('{') {
        return Some("a mapping".to_string());
    }
    let end = rest.find([',', '}', ']', '#']).unwrap_or(rest.len());
    let v = rest[..end].trim();
    (!v.is_empty()).then(|| v.to_string())
}

/// The YAML library's message in the words of someone writing a spec, with what was
/// found where it can be read back: "expected a whole number, found three" rather than
/// "invalid u32", "expected a list like [\"echo\", \"hi\"]" rather than "expected
/// sequence start".
fn plain_words(path: &str, message: &str, found: Option<&str>, what: &str) -> String {
    let found = |what: &str| match found {
        Some(v) => format!("{what}, found {v}"),
        None => what.to_string(),
    };
    let list_example = if path == "command" || path.ends_with(".command") {
        "a list like [\"echo\", \"hi\"]"
    } else {
        "a list like [a, b]"
    };
    match message {
        m if m.starts_with("invalid u") => found("expected a whole number, 0 or more"),
        m if m.starts_with("invalid i") => found("expected a whole number"),
        m if m.starts_with("invalid floating point") => found("expected a number"),
        m if m.starts_with("invalid bool") => found("expected true or false"),
        m if m.starts_with("expected sequence start") => found(&format!("expected {list_example}")),
        m if m.starts_with("expected mapping start") || m.starts_with("expected map") => {
            found("expected a mapping like { key: value }")
        }
        m if m.starts_with("multiple YAML documents") => {
            format!(
                "the file holds several YAML documents (separated by ---), but {what} is exactly one"
            )
        }
        m => m.to_string(),
    }
}

fn yaml_message(s: &str) -> String {
    let first = s.lines().next().unwrap_or(s).trim();
    let first = first.strip_prefix("error:").unwrap_or(first).trim();
    match first.strip_prefix("line ") {
        Some(rest) => match rest.split_once(": ") {
            Some((_, msg)) => msg.trim().to_string(),
            None => first.to_string(),
        },
        None => first.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_errors_are_in_the_words_of_someone_writing_a_spec() {
        let cases = [
            (
                "name: a\ncount: three\ncommand: [x]\n",
                "2:8: count: expected a whole number, 0 or more, found three",
            ),
            (
                "name: a\ncommand: echo hi\n",
                "2:10: command: expected a list like [\"echo\", \"hi\"], found echo hi",
            ),
            (
                "name: a\ncommand: [x]\n---\nname: b\n",
                "the file holds several YAML documents (separated by ---), but a job spec is exactly one",
            ),
            (
                "name: a\ncommand: [x]\nresources: { cpu: lots }\n",
                "resources.cpu: expected a number, found lots",
            ),
            (
                "name: a\ncommand: [x]\nenv: [a]\n",
                "env: expected a mapping like { key: value }, found a list",
            ),
        ];
        for (yaml, want) in cases {
            let err = JobSpec::from_yaml(yaml, "job.yaml")
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{yaml:?}: {err}");
            assert!(
                !err.contains("invalid u32") && !err.contains("sequence start"),
                "{err}"
            );
        }
    }

    const FULL: &str = r#"
name: web
kind: service
count: 3
runtime: process
command: ["sh", "-c", "echo hi"]
env: { GREETING: hello }
resources: { cpu: 0.5, memory: 64Mi }
constraints:
  - { key: label.zone, op: in, values: [a, b] }
  - { key: platform, value: linux/amd64 }
restart: { attempts: 3, delay: 1s, backoff: 2, max_delay: 10s }
stop_grace: 2s
"#;

    #[test]
    fn a_full_spec_parses_into_typed_fields() {
        let spec = JobSpec::from_yaml(FULL, "web.yaml").unwrap();
        assert_eq!(spec.kind, JobKind::Service);
        assert_eq!(spec.count, 3);
        assert_eq!(spec.resources.memory, ByteSize(64 << 20));
        assert_eq!(spec.constraints[0].key, ConstraintKey::Label("zone".into()));
        assert_eq!(spec.constraints[1].op, ConstraintOp::Eq);
        assert_eq!(spec.restart.attempts, 3);
        assert_eq!(spec.stop_grace, Dur::from_secs(2));
        // The JSON form the API receives parses to the same value.
        let json = serde_json::to_vec(&spec).unwrap();
        assert_eq!(JobSpec::from_json(&json).unwrap(), spec);
    }

    /// Each bad spec must be refused with the file, and a message naming the field.
    #[test]
    fn bad_specs_name_the_file_and_the_field() {
        let cases: &[(&str, &str)] = &[
            ("name: a\ncommand: [x]\ncont: 2\n", "cont"),
            (
                "name: a\ncommand: [x]\ncount: many\n",
                "count: expected a whole number, 0 or more, found many",
            ),
            ("name: a\ncommand: [x]\nkind: forever\n", "forever"),
            ("name: a\ncommand: [x]\nruntime: vm\n", "unknown runtime"),
            ("name: a\n", "command: required"),
            ("name: Bad Name\ncommand: [x]\n", "name:"),
            ("name: a\ncommand: [x]\ncount: 0\n", "count:"),
            (
                "name: a\ncommand: [x]\nresources: { memory: 12Zb }\n",
                "unknown size unit",
            ),
            ("name: a\ncommand: [x]\nstop_grace: soon\n", "duration"),
            (
                "name: a\ncommand: [x]\nenv: { DROVER_JOB: x }\n",
                "env.DROVER_JOB",
            ),
            (
                "name: a\ncommand: [x]\nconstraints: [{ key: label.z, op: in }]\n",
                "constraints[0].values",
            ),
            (
                "name: a\ncommand: [x]\nconstraints: [{ key: colour, value: x }]\n",
                "unknown constraint key",
            ),
            (
                "name: a\ncommand: [x]\nconstraints: [{ key: platform, value: linux/sparc }]\n",
                "constraints[0].value",
            ),
            ("name: [a\n", ""),
            ("name: a\nruntime: docker\n", "image: required"),
            ("name: a\ncommand: [x]\nimage: busybox\n", "image: not used"),
            (
                "name: a\nruntime: docker\nimage: i\nports: [80, 80]\n",
                "ports[1]",
            ),
            (
                "name: a\nkind: service\nruntime: docker\nimage: i\nhealth: { interval: 1s }\n",
                "exactly one of",
            ),
            (
                "name: a\nruntime: docker\nimage: i\npull: sometimes\n",
                "sometimes",
            ),
            (
                "name: a\ncommand: [x]\nruntime_env: { env: { DROVER_X: y } }\n",
                "runtime_env.env.DROVER_X",
            ),
            (
                "name: a\ncommand: [x]\nruntime_env: { python: { requirements: [] } }\n",
                "runtime_env.python.requirements: expected at least one",
            ),
            (
                "name: a\ncommand: [x]\nruntime_env: { python: { requirements: [six, \"--index-url=http://x\"] } }\n",
                "runtime_env.python.requirements[1]",
            ),
            (
                "name: a\ncommand: [x]\nruntime_env: { working_dir: \"  \" }\n",
                "runtime_env.working_dir",
            ),
            (
                "name: a\ncommand: [x]\nruntime_env: { setup_timeout: 0s }\n",
                "runtime_env.setup_timeout",
            ),
            (
                "name: a\nruntime: docker\nimage: i\nruntime_env: { python: { requirements: [six] } }\n",
                "runtime_env.python: not supported by runtime docker",
            ),
            (
                "name: a\ncommand: [x]\nruntime_env: { pip: [six] }\n",
                "pip",
            ),
        ];
        for (yaml, needle) in cases {
            let err = JobSpec::from_yaml(yaml, "job.yaml").unwrap_err();
            let text = err.to_string();
            assert!(text.starts_with("job.yaml"), "{yaml:?} -> {text}");
            assert!(
                text.contains(needle),
                "{yaml:?} -> {text} (wanted {needle:?})"
            );
        }
    }

    /// Every duration field is refused just past its bound, with the field, the bound
    /// and the value in the message, and accepted at the bound itself.
    #[test]
    fn every_duration_is_bounded() {
        const SVC: &str = "name: a\nkind: service\nruntime: docker\nimage: i\n";
        const HEALTH: &str = "health: { tcp: { port: 80 }";
        const MOCK: &str = "name: a\nruntime: mock\n";
        let cases: &[(String, &str, String)] = &[
            (
                "name: a\ncommand: [x]\nstop_grace: 100y\n".into(),
                "stop_grace: expected at most 1h, got 100years",
                "name: a\ncommand: [x]\nstop_grace: 1h\n".into(),
            ),
            (
                "name: a\ncommand: [x]\nstop_grace: 3601s\n".into(),
                "stop_grace: expected at most 1h, got 1h 1s",
                "name: a\ncommand: [x]\nstop_grace: 3600s\n".into(),
            ),
            (
                // A bare number is seconds; the largest one must not wrap to a small grace.
                "name: a\ncommand: [x]\nstop_grace: 18446744073709551615\n".into(),
                "stop_grace: expected at most 1h, got 584542046090years",
                "name: a\ncommand: [x]\nstop_grace: 3600\n".into(),
            ),
            (
                "name: a\ncommand: [x]\ndisconnect: { lost_after: 8d }\n".into(),
                "disconnect.lost_after: expected at most 168h, got 8days",
                "name: a\ncommand: [x]\ndisconnect: { lost_after: 7d, on_lost: fail }\n".into(),
            ),
            (
                "name: a\ncommand: [x]\nrestart: { delay: 2h }\n".into(),
                "restart.delay: expected at most 1h, got 2h",
                "name: a\ncommand: [x]\nrestart: { delay: 1h, max_delay: 1h }\n".into(),
            ),
            (
                "name: a\ncommand: [x]\nrestart: { max_delay: 61m }\n".into(),
                "restart.max_delay: expected at most 1h, got 1h 1m",
                "name: a\ncommand: [x]\nrestart: { max_delay: 60m }\n".into(),
            ),
            (
                format!("{SVC}{HEALTH}, interval: 2h }}\n"),
                "health.interval: expected at most 1h",
                format!("{SVC}{HEALTH}, interval: 1h }}\n"),
            ),
            (
                format!("{SVC}{HEALTH}, timeout: 1h 1ms }}\n"),
                "health.timeout: expected at most 1h",
                format!("{SVC}{HEALTH}, timeout: 1h }}\n"),
            ),
            (
                format!("{SVC}{HEALTH}, start_deadline: 25h }}\n"),
                "health.start_deadline: expected at most 24h, got 1day 1h",
                format!("{SVC}{HEALTH}, start_deadline: 24h }}\n"),
            ),
            (
                "name: a\ncommand: [x]\nruntime_env: { setup_timeout: 2days }\n".into(),
                "runtime_env.setup_timeout: expected at most 24h, got 2days",
                "name: a\ncommand: [x]\nruntime_env: { setup_timeout: 1day }\n".into(),
            ),
            (
                format!("{MOCK}mock: {{ prepare_latency: 1year }}\n"),
                "mock.prepare_latency: expected at most 24h",
                format!("{MOCK}mock: {{ prepare_latency: 24h }}\n"),
            ),
            (
                format!("{MOCK}mock: {{ start_latency: 1year }}\n"),
                "mock.start_latency: expected at most 24h",
                format!("{MOCK}mock: {{ start_latency: 24h }}\n"),
            ),
            (
                format!("{MOCK}mock: {{ exit_after: 1year }}\n"),
                "mock.exit_after: expected at most 24h",
                format!("{MOCK}mock: {{ exit_after: 24h }}\n"),
            ),
            (
                format!("{SVC}update: {{ min_healthy_time: 61m }}\n"),
                "update.min_healthy_time: expected at most 1h, got 1h 1m",
                format!("{SVC}update: {{ min_healthy_time: 1h }}\n"),
            ),
        ];
        for (bad, needle, at_bound) in cases {
            let err = JobSpec::from_yaml(bad, "job.yaml").unwrap_err().to_string();
            assert!(err.contains(needle), "{bad:?} -> {err} (wanted {needle:?})");
            // The API parses JSON through the same validation.
            let spec: JobSpec = serde_saphyr::from_str(bad).unwrap();
            let json = serde_json::to_vec(&spec).unwrap();
            let err = JobSpec::from_json(&json).unwrap_err().to_string();
            assert!(err.contains(needle), "{bad:?} as JSON -> {err}");
            if let Err(e) = JobSpec::from_yaml(at_bound, "job.yaml") {
                panic!("{at_bound:?} is at the bound and must be accepted: {e}");
            }
        }
    }

    #[test]
    fn update_is_for_services_with_a_bounded_parallelism() {
        const SVC: &str = "name: a\nkind: service\ncommand: [x]\n";
        // Absent, the defaults: one index at a time, each healthy for 10s.
        let plain = JobSpec::from_yaml(SVC, "job.yaml").unwrap();
        assert_eq!(plain.update, None);
        assert_eq!(
            plain.update_policy(),
            UpdatePolicy {
                max_parallel: 1,
                min_healthy_time: Dur::from_secs(10),
            }
        );
        // A field left out keeps its default.
        let some = JobSpec::from_yaml(&format!("{SVC}update: {{ max_parallel: 2 }}\n"), "job.yaml")
            .unwrap();
        assert_eq!(
            some.update_policy(),
            UpdatePolicy {
                max_parallel: 2,
                min_healthy_time: Dur::from_secs(10),
            }
        );
        let quick = JobSpec::from_yaml(
            &format!("{SVC}update: {{ max_parallel: 100000, min_healthy_time: 0s }}\n"),
            "job.yaml",
        )
        .unwrap();
        assert_eq!(quick.update_policy().min_healthy_time, Dur::from_secs(0));
        let cases = [
            (
                format!("{SVC}update: {{ max_parallel: 0 }}\n"),
                "job.yaml:4:1: update.max_parallel: expected 1 to 100000 (how many tasks are replaced at once), got 0",
            ),
            (
                format!("{SVC}update: {{ max_parallel: 100001 }}\n"),
                "update.max_parallel: expected 1 to 100000",
            ),
            (
                format!("{SVC}update: {{ max_parallel: two }}\n"),
                "update.max_parallel: expected a whole number",
            ),
            (
                format!("{SVC}update: {{ min_healthy_time: soon }}\n"),
                "update.min_healthy_time:",
            ),
            (
                format!("{SVC}update: {{ max_paralel: 2 }}\n"),
                "update: unknown field `max_paralel`",
            ),
            (
                "name: a\ncommand: [x]\nupdate: { max_parallel: 2 }\n".to_string(),
                "job.yaml:3:1: update: only services roll out new versions",
            ),
        ];
        for (bad, want) in cases {
            let err = JobSpec::from_yaml(&bad, "job.yaml")
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{bad:?} -> {err} (wanted {want:?})");
        }
        // The API's JSON goes through the same rules.
        let batch = br#"{"name": "a", "command": ["x"], "update": {}}"#;
        let err = JobSpec::from_json(batch).unwrap_err().to_string();
        assert!(err.starts_with("update: only services"), "{err}");
    }

    /// Arguments and environments a node could not exec are refused, naming the field
    /// (and index or variable) and the limit.
    #[test]
    fn arguments_and_environments_past_the_exec_limits_are_refused() {
        let long = "x".repeat(MAX_ARG_BYTES + 1);
        let longest = "x".repeat(MAX_ARG_BYTES);
        // The program and eight arguments at the single-argument limit come to just over
        // 1 MiB, as do the program and eight variables of 131072 bytes each.
        let many: Vec<String> = std::iter::once("sh".to_string())
            .chain(vec![longest.clone(); 8])
            .collect();
        let big_env: BTreeMap<String, String> = (0..8)
            .map(|i| (format!("V{i}"), "x".repeat(MAX_ARG_BYTES - 3)))
            .collect();
        let spec = |f: &dyn Fn(&mut JobSpec)| {
            let mut s = JobSpec::new("a", vec!["sh".into()]);
            f(&mut s);
            s
        };
        let cases: Vec<(JobSpec, String)> = vec![
            (
                spec(&|s| s.command = vec!["sh".into(), long.clone()]),
                format!(
                    "command[1]: {} bytes; a single argument may be at most 131071 bytes",
                    MAX_ARG_BYTES + 1
                ),
            ),
            (
                spec(&|s| {
                    s.runtime = RuntimeKind::Docker;
                    s.image = Some("i".into());
                    s.args = vec!["a".into(), "b".into(), long.clone()];
                }),
                "args[2]: 131072 bytes".into(),
            ),
            (
                spec(&|s| {
                    s.runtime = RuntimeKind::Docker;
                    s.image = Some("i".into());
                    s.kind = JobKind::Service;
                    s.health = Some(HealthCheck {
                        http: None,
                        tcp: None,
                        command: vec![long.clone()],
                        interval: default_probe_interval(),
                        timeout: default_probe_timeout(),
                        start_deadline: default_probe_deadline(),
                    });
                }),
                "health.command[0]: 131072 bytes".into(),
            ),
            (
                spec(&|s| {
                    s.env.insert("BIG".into(), "x".repeat(MAX_ARG_BYTES - 3));
                }),
                "env.BIG: 131072 bytes as NAME=VALUE; a single environment variable may be at most 131071 bytes".into(),
            ),
            (
                // A name that long is shown clipped, not quoted whole.
                spec(&|s| {
                    s.env.insert("K".repeat(MAX_ARG_BYTES), String::new());
                }),
                format!("env.{}...: 131072 bytes as NAME=VALUE", "K".repeat(64)),
            ),
            (
                spec(&|s| {
                    s.runtime_env.env.insert("BIG".into(), "x".repeat(MAX_ARG_BYTES));
                }),
                "runtime_env.env.BIG: 131075 bytes".into(),
            ),
            (
                spec(&|s| s.command = many.clone()),
                "command and env: 1048579 bytes together (command and args 1048579, env and runtime_env.env 0, each string with its NUL); a task's arguments and environment may be at most 1048576 bytes".into(),
            ),
            (
                spec(&|s| s.env = big_env.clone()),
                "command and env: 1048579 bytes together (command and args 3, env and runtime_env.env 1048576".into(),
            ),
        ];
        for (s, needle) in cases {
            let err = s.validate().unwrap_err();
            assert!(err.contains(&needle), "{err}\n(wanted {needle:?})");
        }
        // At the limits: the longest argument and environment variable, and a name set
        // in both env and runtime_env.env, which the task sees once.
        let ok = spec(&|s| {
            s.command = vec!["sh".into(), longest.clone()];
            s.env.insert("V".into(), "x".repeat(MAX_ARG_BYTES - 2));
            for i in 0..6 {
                s.env.insert(format!("W{i}"), "x".repeat(100_000));
                s.runtime_env
                    .env
                    .insert(format!("W{i}"), "y".repeat(100_000));
            }
        });
        assert_eq!(ok.validate(), Ok(()));
    }

    /// An unknown key inside a list is named with the list index as validation
    /// messages write it, in YAML and in JSON.
    #[test]
    fn unknown_keys_in_lists_are_named_by_index() {
        let yaml = "name: a\ncommand: [x]\nconstraints:\n  - { key: os, value: linux }\n  - { key: os, value: linux, kee: x }\n";
        let err = JobSpec::from_yaml(yaml, "job.yaml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("constraints[1]: unknown field `kee`"), "{err}");
        let json = br#"{"name":"a","command":["x"],"restart":{"attempts":1,"atempts":2}}"#;
        let err = JobSpec::from_json(json).unwrap_err().to_string();
        assert!(err.starts_with("restart: unknown field `atempts`"), "{err}");
    }

    #[test]
    fn json_with_anything_after_the_spec_is_refused() {
        let good = br#"{"name":"a","command":["x"]}"#;
        JobSpec::from_json(good).unwrap();
        // Whitespace after the object is not data.
        JobSpec::from_json(b"{\"name\":\"a\",\"command\":[\"x\"]} \n\t").unwrap();
        for trailing in [" not json", "{}", ",", "]"] {
            let body = [&good[..], trailing.as_bytes()].concat();
            let err = JobSpec::from_json(&body).unwrap_err();
            assert!(
                err.message.contains("unexpected data after the job spec"),
                "{trailing:?} -> {err}"
            );
            assert_eq!(err.line, Some(1), "{err}");
        }
    }

    #[test]
    fn a_docker_service_spec_parses() {
        let yaml = "name: web\nkind: service\nruntime: docker\nimage: local/busybox:1\npull: never\ncommand: [/bin/busybox, httpd, -f, -p, '8080']\nports: [8080]\nhealth: { http: { port: 8080, path: / }, interval: 1s, timeout: 1s, start_deadline: 30s }\n";
        let spec = JobSpec::from_yaml(yaml, "web.yaml").unwrap();
        assert_eq!(spec.pull, PullPolicy::Never);
        assert_eq!(spec.ports, vec![8080]);
        let h = spec.health.as_ref().unwrap();
        assert_eq!(h.http.as_ref().unwrap().port, 8080);
        assert_eq!(h.start_deadline, Dur::from_secs(30));
        let json = serde_json::to_vec(&spec).unwrap();
        assert_eq!(JobSpec::from_json(&json).unwrap(), spec);
    }

    #[test]
    fn type_errors_carry_line_and_column() {
        let err = JobSpec::from_yaml("name: a\ncommand: [x]\ncount: many\n", "j.yaml").unwrap_err();
        assert_eq!(err.line, Some(3), "{err}");
        assert!(err.column.is_some());
    }

    #[test]
    fn constraints_match_node_attributes() {
        let c = |op, value: Option<&str>, values: &[&str]| Constraint {
            key: ConstraintKey::Label("zone".into()),
            op,
            value: value.map(str::to_string),
            values: values.iter().map(|s| s.to_string()).collect(),
        };
        assert!(c(ConstraintOp::Eq, Some("a"), &[]).matches(Some("a")));
        assert!(!c(ConstraintOp::Eq, Some("a"), &[]).matches(None));
        assert!(c(ConstraintOp::Ne, Some("a"), &[]).matches(None));
        assert!(c(ConstraintOp::In, None, &["a", "b"]).matches(Some("b")));
        assert!(!c(ConstraintOp::NotIn, None, &["a", "b"]).matches(Some("b")));
        assert!(c(ConstraintOp::Exists, None, &[]).matches(Some("")));
    }

    #[test]
    fn restart_delay_grows_and_is_capped() {
        let p = RestartPolicy {
            attempts: 5,
            delay: Dur::from_millis(100),
            backoff: 2.0,
            max_delay: Dur::from_millis(500),
        };
        let d: Vec<u64> = (1..=5).map(|i| p.delay_for(i).as_millis() as u64).collect();
        assert_eq!(d, vec![100, 200, 400, 500, 500]);
    }
}
