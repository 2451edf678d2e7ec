//! What a pipeline vertex's replica carries to its agent, in its job's spec: where it
//! reads and writes (the buffers, the edges' tag conditions) and how big the buffers
//! may grow. A module of its own, below both the job spec (whose `vertex` field holds
//! a [`VertexPlane`]) and the pipeline model (which makes one from a vertex), so
//! neither has to import the other.

use serde::{Deserialize, Serialize};

/// Which store holds a pipeline's buffers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BufferBackend {
    /// Buffers kept by Drover itself.
    #[default]
    Embedded,
    /// Buffers kept as NATS JetStream streams.
    Nats,
}

/// `buffer`: the limits of every buffer between two vertices.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BufferSpec {
    pub backend: BufferBackend,
    /// The most messages a buffer is meant to hold (pending and unacknowledged).
    pub max_length: u64,
    /// The share of `max_length`, in (0, 1], at which writers are held back.
    pub usage_limit: f64,
}

pub const DEFAULT_MAX_LENGTH: u64 = 30_000;
pub const DEFAULT_USAGE_LIMIT: f64 = 0.8;
/// The largest `buffer.max_length`: ten million messages of a few kilobytes each is
/// already tens of gigabytes per partition.
pub const MAX_BUFFER_LENGTH: u64 = 10_000_000;

impl Default for BufferSpec {
    fn default() -> Self {
        BufferSpec {
            backend: BufferBackend::Embedded,
            max_length: DEFAULT_MAX_LENGTH,
            usage_limit: DEFAULT_USAGE_LIMIT,
        }
    }
}

/// `condition`: which messages take an edge.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeCondition {
    pub tags: TagCondition,
}

/// `tags`: exactly one of `any`, `all` or `none`, each a non-empty list of tags.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TagCondition {
    /// At least one of these tags is on the message.
    Any(Vec<String>),
    /// Every one of these tags is on the message.
    All(Vec<String>),
    /// None of these tags is on the message.
    #[serde(rename = "none")]
    NoneOf(Vec<String>),
}

/// The most tags a condition may list; a condition is read for every message.
pub const MAX_CONDITION_TAGS: usize = 64;

impl TagCondition {
    /// The listed tags, whichever the rule.
    pub fn tags(&self) -> &[String] {
        match self {
            TagCondition::Any(t) | TagCondition::All(t) | TagCondition::NoneOf(t) => t,
        }
    }

    /// The rule's name as the spec writes it.
    pub fn rule(&self) -> &'static str {
        match self {
            TagCondition::Any(_) => "any",
            TagCondition::All(_) => "all",
            TagCondition::NoneOf(_) => "none",
        }
    }

    /// Whether a message with these tags takes the edge.
    pub fn matches(&self, message_tags: &[&str]) -> bool {
        let has = |t: &String| message_tags.contains(&t.as_str());
        match self {
            TagCondition::Any(t) => t.iter().any(has),
            TagCondition::All(t) => t.iter().all(has),
            TagCondition::NoneOf(t) => !t.iter().any(has),
        }
    }
}

impl EdgeCondition {
    pub fn matches(&self, message_tags: &[&str]) -> bool {
        self.tags.matches(message_tags)
    }
}

/// One way out of a vertex: the vertex it feeds, that vertex's input buffers, and the
/// condition (if any) a message must meet to take it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VertexOutput {
    pub to: String,
    pub buffers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<EdgeCondition>,
}

/// Where a vertex replica reads and writes, carried in its job's spec to the agent,
/// which serves the replica's data plane from it. Written by the controller from the
/// vertex object alone; users cannot submit it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VertexPlane {
    pub pipeline: String,
    pub vertex: String,
    pub role: PlaneRole,
    /// For a built-in vertex, the arguments of the agent's own `drover __vertex` that
    /// run it; empty for the user's program.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub builtin: Vec<String>,
    /// The input buffers, one per partition; empty for a source.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<String>,
    /// The outgoing edges; empty for a sink.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<VertexOutput>,
    /// The buffers' backend and limits.
    pub buffer: BufferSpec,
}

impl VertexPlane {
    pub fn is_builtin(&self) -> bool {
        !self.builtin.is_empty()
    }

    /// Every buffer the replica may touch: its inputs and its outputs' partitions. The
    /// controller lets a node use a buffer only when one of its tasks' planes names it.
    pub fn buffers(&self) -> impl Iterator<Item = &str> {
        self.inputs
            .iter()
            .chain(self.outputs.iter().flat_map(|o| o.buffers.iter()))
            .map(String::as_str)
    }
}

/// A replica's side of the data protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlaneRole {
    Source,
    Map,
    Sink,
}

impl PlaneRole {
    pub fn as_str(self) -> &'static str {
        match self {
            PlaneRole::Source => "source",
            PlaneRole::Map => "map",
            PlaneRole::Sink => "sink",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_conditions_match_as_their_rule_says() {
        let tags = |t: &[&str]| t.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // (condition, message tags, takes the edge)
        let cases = [
            (TagCondition::Any(tags(&["a", "b"])), vec!["b"], true),
            (TagCondition::Any(tags(&["a", "b"])), vec!["c"], false),
            (TagCondition::Any(tags(&["a"])), vec![], false),
            (
                TagCondition::All(tags(&["a", "b"])),
                vec!["a", "b", "c"],
                true,
            ),
            (TagCondition::All(tags(&["a", "b"])), vec!["a"], false),
            (TagCondition::NoneOf(tags(&["a"])), vec!["b"], true),
            (TagCondition::NoneOf(tags(&["a"])), vec![], true),
            (TagCondition::NoneOf(tags(&["a"])), vec!["b", "a"], false),
        ];
        for (cond, msg, want) in cases {
            assert_eq!(cond.matches(&msg), want, "{cond:?} on {msg:?}");
        }
    }
}
