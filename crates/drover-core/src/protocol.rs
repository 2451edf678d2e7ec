//! The agent protocol: JSON messages in WebSocket text frames, one connection per agent,
//! dialled by the agent.
//!
//! Reliability rests on two sequence numbers. Agent events carry an `seq` from the
//! agent's outbox; the controller acknowledges the highest it has applied and the agent
//! replays anything above that after a reconnect. Controller commands carry a `seq` too
//! and are re-sent until the agent acknowledges them. Both sides treat a repeat as
//! harmless: events are forward-only state moves and commands are idempotent per task.

use crate::Millis;
use crate::ids::{JobId, NodeId, ProjectId, TaskId};
use crate::spec::JobSpec;
use crate::state::{Exit, NodeInfo, PortBinding, TaskState, TaskUsage};
use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The newest protocol version this build speaks. See `docs/versioning.md`: a version
/// adds messages, variants or fields; a peer that does not know one ignores it or
/// answers [`AgentMessage::Unsupported`], and the two sides agree at hello on the
/// highest version both speak.
///
/// - 1: the first.
/// - 2: unknown message types, commands and fields are tolerated (`Unknown` variants,
///   `Unsupported` answers); hello carries a version range; idle connections are pinged.
/// - 3: pipeline vertices: a task's spec may carry `vertex`, its assignment `nats_url`,
///   usage samples a replica's message counts, and binary frames carry buffer calls
///   (see `drover_buffer::remote`).
pub const PROTOCOL_VERSION: u32 = 3;

/// The oldest protocol version this build still speaks.
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// The version two peers speak, given the range the agent offers, or why there is none.
pub fn negotiate(agent_min: u32, agent_max: u32) -> Result<u32, String> {
    let version = agent_max.min(PROTOCOL_VERSION);
    if version < agent_min.max(MIN_PROTOCOL_VERSION) || agent_min > agent_max {
        return Err(format!(
            "agent speaks protocol versions {agent_min} to {agent_max}, this controller speaks {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}; upgrade the older one"
        ));
    }
    Ok(version)
}

/// The HTTP path agents dial.
pub const AGENT_CONNECT_PATH: &str = "/v1/agent/connect";

/// The header that carries the join token on the agent's upgrade request.
pub const JOIN_TOKEN_HEADER: &str = "x-drover-join-token";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMessage {
    Hello(Hello),
    Heartbeat {
        at: Millis,
        /// The latest resource samples of the node's running tasks.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        usage: Vec<UsageSample>,
        /// The node's cached environments, sent when they changed since the last
        /// heartbeat of this connection (and on its first).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        envs: Option<Vec<crate::state::EnvInfo>>,
    },
    Event(AgentEvent),
    CommandAck {
        seq: u64,
    },
    Log(LogChunk),
    /// The agent received command `seq` but does not know what it asks (a newer
    /// controller's); it is acknowledged too, so it is not sent again. Since version 2.
    Unsupported {
        seq: u64,
        reason: String,
    },
    /// A message of a type this build does not know, from a newer agent; ignored.
    #[serde(other)]
    Unknown,
}

/// One task's resource use, sent with heartbeats.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UsageSample {
    pub task_id: TaskId,
    #[serde(flatten)]
    pub usage: TaskUsage,
}

/// The first message on every connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// The newest version the agent speaks.
    pub protocol_version: u32,
    /// The oldest version the agent speaks; absent from version 1 agents, which speak
    /// only `protocol_version`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_protocol_version: Option<u32>,
    pub node_id: NodeId,
    pub info: NodeInfo,
    /// Every task the agent holds, running or finished but not yet acknowledged.
    pub known_tasks: Vec<TaskId>,
}

/// A task state change observed by the agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentEvent {
    pub seq: u64,
    pub task_id: TaskId,
    pub state: TaskState,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<Exit>,
    pub at: Millis,
    /// Host ports the runtime published, sent with the `running` event.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortBinding>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    Stdout,
    Stderr,
    /// What the agent wrote while preparing the task: building its Python environment,
    /// unpacking its files.
    Prepare,
}

impl LogStream {
    pub fn as_str(self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
            LogStream::Prepare => "prepare",
        }
    }
}

/// Bytes of a task's output at a byte offset of that stream's log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogChunk {
    pub task_id: TaskId,
    pub stream: LogStream,
    pub offset: u64,
    #[serde(with = "b64")]
    pub data: Vec<u8>,
    /// When the agent read the bytes from the task's file, the best time it knows of
    /// their writing. Absent from older agents, whose chunks the controller stamps with
    /// the time it receives them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<crate::Millis>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ControllerMessage {
    Welcome {
        /// The version agreed for this connection.
        protocol_version: u32,
        node_id: NodeId,
        heartbeat_interval_ms: u64,
        /// The highest event seq applied; the agent drops those and replays the rest.
        last_event_seq: u64,
    },
    /// The connection is refused; the agent reports `reason` and does not retry quickly.
    Reject {
        reason: String,
    },
    Command {
        seq: u64,
        command: Command,
    },
    EventAck {
        seq: u64,
    },
    /// The controller has a task's log only up to `offset`; send from there.
    LogResync {
        task_id: TaskId,
        stream: LogStream,
        offset: u64,
    },
    /// A message of a type this build does not know, from a newer controller; ignored.
    #[serde(other)]
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Command {
    /// Run this task. Repeats for a task the agent already has are acknowledged and ignored.
    Start(Box<TaskAssignment>),
    /// Stop gracefully, then forcibly after `grace_ms`.
    Stop {
        task_id: TaskId,
        grace_ms: u64,
        reason: String,
    },
    /// The controller no longer owns this task: kill it and drop it without reporting.
    Forget { task_id: TaskId },
    /// Remove every cached environment no running task uses (`drover env prune`).
    PruneEnvs,
    /// A command this build does not know, from a newer controller: acknowledged and
    /// answered with [`AgentMessage::Unsupported`].
    #[serde(other)]
    Unknown,
}

/// Everything an agent needs to run one task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskAssignment {
    pub task_id: TaskId,
    pub job_id: JobId,
    pub project: ProjectId,
    pub job_name: String,
    pub index: u32,
    pub attempt: u32,
    pub spec: JobSpec,
    /// The build of the job's artifact chosen for this node, when the job has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<AssignedArtifact>,
    /// The job's `runtime_env.config`, taken out of `spec` and carried here in its
    /// versioned encoding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<EncodedConfig>,
    /// For a pipeline vertex's replica whose buffers are in NATS: the server's URL, as
    /// the controller was configured (`--nats`). Absent for the embedded backend, whose
    /// buffers the agent reaches through this connection. Since version 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats_url: Option<String>,
}

/// The config format this build writes: the object as JSON.
pub const CONFIG_FORMAT_JSON: u32 = 1;

/// A job's config on its way to an agent: a format number, so that an agent can tell a
/// format it does not know from a corrupt one, and the encoded object. Format 1 is the
/// object itself, which the message's compact JSON carries at its own size. (Messages
/// are decoded through serde's buffering of tagged enums, which rules out carrying the
/// text unparsed.)
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EncodedConfig {
    pub format: u32,
    pub data: serde_json::Value,
}

impl EncodedConfig {
    /// Encodes `config` in the current format.
    pub fn encode(config: serde_json::Value) -> EncodedConfig {
        EncodedConfig {
            format: CONFIG_FORMAT_JSON,
            data: config,
        }
    }

    /// The config as compact JSON text, or why this agent cannot read it.
    pub fn json(&self) -> Result<String, String> {
        match self.format {
            CONFIG_FORMAT_JSON => serde_json::to_string(&self.data)
                .map_err(|e| format!("the job's config cannot be written as JSON: {e}")),
            other => Err(format!(
                "the job's config is in format {other}, which this agent (format {CONFIG_FORMAT_JSON}) does not know; upgrade the agent"
            )),
        }
    }
}

/// The variant of an artifact the scheduler chose for a task's node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignedArtifact {
    pub reference: crate::artifact::ArtifactRef,
    pub variant: crate::artifact::Variant,
}

mod b64 {
    use super::*;

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_negotiated_down_to_the_highest_both_speak() {
        assert_eq!(negotiate(1, 1), Ok(1));
        assert_eq!(negotiate(1, PROTOCOL_VERSION), Ok(PROTOCOL_VERSION));
        assert_eq!(negotiate(1, PROTOCOL_VERSION + 5), Ok(PROTOCOL_VERSION));
        let err = negotiate(PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 3).unwrap_err();
        assert!(err.contains("upgrade the older one"), "{err}");
        assert!(negotiate(0, 0).is_err());
        assert!(negotiate(3, 2).is_err());
    }

    #[test]
    fn a_config_in_an_unknown_format_is_refused_with_a_reason() {
        let config = serde_json::json!({ "a": [1, 2.5, "ü"] });
        let ok = EncodedConfig::encode(config.clone());
        assert_eq!(ok.json().unwrap(), r#"{"a":[1,2.5,"ü"]}"#);
        let future = EncodedConfig {
            format: 7,
            data: config,
        };
        let err = future.json().unwrap_err();
        assert!(
            err.contains("format 7") && err.contains("upgrade the agent"),
            "{err}"
        );
    }

    #[test]
    fn messages_round_trip_as_tagged_json() {
        let m = AgentMessage::Log(LogChunk {
            task_id: TaskId::from("task-1"),
            stream: LogStream::Stderr,
            offset: 7,
            data: vec![0xff, b'h', b'i'],
            at: Some(1_000),
        });
        let text = serde_json::to_string(&m).unwrap();
        assert!(text.contains("\"type\":\"log\""), "{text}");
        assert_eq!(serde_json::from_str::<AgentMessage>(&text).unwrap(), m);

        let c = ControllerMessage::Command {
            seq: 3,
            command: Command::Stop {
                task_id: TaskId::from("task-1"),
                grace_ms: 100,
                reason: "user".into(),
            },
        };
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<ControllerMessage>(&text).unwrap(), c);
    }
}
