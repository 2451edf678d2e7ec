//! Reading a pipeline spec and the rules its graph must keep: every name valid and
//! unique, every edge between vertices that exist and in a direction their roles allow,
//! no cycles, every vertex fed by a source, and bounds on every number and on the size
//! of the whole, so no spec can grow without end.

use super::DesiredPhase;
use super::spec::{
    EdgeDef, MAX_BUFFER_LENGTH, MAX_CONDITION_TAGS, MAX_GENERATOR_RATE, MAX_MESSAGE_SIZE,
    MAX_PARTITIONS, MAX_PAUSE_GRACE, PipelineSpec, SourceDef, VertexDef, VertexRole,
};
use super::vertex::{VertexLifecycle, VertexOutput, VertexSpec, buffer_name, job_name};
use crate::ProjectId;
use crate::spec::{JobSpec, SpecError, bound_text, is_valid_job_name, parse_json, parse_yaml};
use serde::{Deserialize, Deserializer, de};
use serde_saphyr::Spanned;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// The most vertices a pipeline may have.
pub const MAX_VERTICES: usize = 64;
/// The most edges a pipeline may have.
pub const MAX_EDGES: usize = 256;
/// The longest tag in an edge condition.
pub const MAX_TAG_LEN: usize = 63;

impl PipelineSpec {
    /// Parses and validates a YAML spec; `file` names it in error messages, which give
    /// the line and column of the field at fault.
    pub fn from_yaml(text: &str, file: &str) -> Result<PipelineSpec, SpecError> {
        let spec: PipelineSpec = parse_yaml(text, file, "a pipeline spec").map_err(|mut e| {
            // An unknown key inside a flow mapping (`{ mx: 2 }`) is not found by the
            // line search the job spec uses; the path finds it.
            if e.line.is_none()
                && let Some((l, c)) = locate(text, field_path(&e.message))
            {
                (e.line, e.column) = (Some(l), Some(c));
            }
            e
        })?;
        spec.validate().map_err(|message| {
            let loc = locate(text, field_path(&message));
            SpecError {
                file: Some(file.to_string()),
                line: loc.map(|(l, _)| l),
                column: loc.map(|(_, c)| c),
                message,
            }
        })?;
        Ok(spec)
    }

    /// Parses and validates a JSON spec, as the API receives it.
    pub fn from_json(text: &[u8]) -> Result<PipelineSpec, SpecError> {
        let spec: PipelineSpec = parse_json(text, "the pipeline spec")?;
        spec.validate().map_err(|m| SpecError::invalid(None, m))?;
        Ok(spec)
    }

    /// Checks what the types alone cannot; the message starts with the field's path
    /// (`edges[2].to: ...`).
    pub fn validate(&self) -> Result<(), String> {
        self.validate_sizes()?;
        check_name("name", &self.name, "pipeline")?;
        let mut seen = BTreeMap::new();
        for (i, v) in self.vertices.iter().enumerate() {
            if let Some(first) = seen.insert(v.name.as_str(), i) {
                return Err(format!(
                    "vertices[{i}].name: {:?} is also the name of vertices[{first}]; vertex names must be unique",
                    v.name
                ));
            }
            self.validate_vertex(i, v)?;
        }
        let mut edges = BTreeMap::new();
        for (i, e) in self.edges.iter().enumerate() {
            self.validate_edge(i, e)?;
            if let Some(first) = edges.insert((e.from.as_str(), e.to.as_str()), i) {
                return Err(format!(
                    "edges[{i}]: the same edge as edges[{first}] (from {} to {}); give each pair once",
                    e.from, e.to
                ));
            }
        }
        self.validate_ends()?;
        self.validate_reach()?;
        self.validate_acyclic()?;
        self.validate_settings()
    }

    fn validate_sizes(&self) -> Result<(), String> {
        if self.vertices.is_empty() || self.vertices.len() > MAX_VERTICES {
            return Err(format!(
                "vertices: expected 1 to {MAX_VERTICES} vertices, got {}",
                self.vertices.len()
            ));
        }
        if self.edges.len() > MAX_EDGES {
            return Err(format!(
                "edges: expected at most {MAX_EDGES} edges, got {}",
                self.edges.len()
            ));
        }
        Ok(())
    }

    fn validate_vertex(&self, i: usize, v: &VertexDef) -> Result<(), String> {
        let at = format!("vertices[{i}]");
        check_name(&format!("{at}.name"), &v.name, "vertex")?;
        let job = job_name(&self.name, &v.name);
        if !is_valid_job_name(&job) {
            return Err(format!(
                "{at}.name: the vertex's job would be named {job:?}, {} characters; the pipeline and vertex names together may be at most 62",
                job.len()
            ));
        }
        v.scale.validate(&format!("{at}.scale"))?;
        match v.partitions {
            Some(_) if matches!(v.role, VertexRole::Source(_)) => {
                return Err(format!(
                    "{at}.partitions: a source reads no buffer, so it has no partitions"
                ));
            }
            Some(p) if p == 0 || p > MAX_PARTITIONS => {
                return Err(format!(
                    "{at}.partitions: expected 1 to {MAX_PARTITIONS}, got {p}"
                ));
            }
            _ => {}
        }
        if let VertexRole::Source(SourceDef::Generator(g)) = &v.role {
            let at = format!("{at}.source.generator");
            for (field, value, max) in [
                ("rate", g.rate, MAX_GENERATOR_RATE),
                ("message_size", g.message_size, MAX_MESSAGE_SIZE),
            ] {
                if value == 0 || value > max {
                    return Err(format!("{at}.{field}: expected 1 to {max}, got {value}"));
                }
            }
            if g.total == Some(0) {
                return Err(format!(
                    "{at}.total: expected at least 1; leave it out for no end"
                ));
            }
        }
        if let Some(run) = v.role.run() {
            run.job_spec(&job, v.scale.min)
                .validate()
                .map_err(|m| format!("{at}.{}.run.{m}", v.role.kind()))?;
        }
        Ok(())
    }

    fn validate_edge(&self, i: usize, e: &EdgeDef) -> Result<(), String> {
        let from = self.find(&format!("edges[{i}].from"), &e.from)?;
        let to = self.find(&format!("edges[{i}].to"), &e.to)?;
        if let VertexRole::Sink(_) = from.role {
            return Err(format!(
                "edges[{i}].from: {:?} is a sink; a sink has no outputs",
                e.from
            ));
        }
        if let VertexRole::Source(_) = to.role {
            return Err(format!(
                "edges[{i}].to: {:?} is a source; a source has no inputs",
                e.to
            ));
        }
        let Some(cond) = &e.condition else {
            return Ok(());
        };
        if !matches!(from.role, VertexRole::Map(_)) {
            return Err(format!(
                "edges[{i}].condition: only an edge leaving a map may have one, and {:?} is a {}; only a map attaches tags",
                e.from,
                from.role.kind()
            ));
        }
        let at = format!("edges[{i}].condition.tags.{}", cond.tags.rule());
        let tags = cond.tags.tags();
        if tags.is_empty() || tags.len() > MAX_CONDITION_TAGS {
            return Err(format!(
                "{at}: expected 1 to {MAX_CONDITION_TAGS} tags, got {}",
                tags.len()
            ));
        }
        for (k, t) in tags.iter().enumerate() {
            if t.is_empty() || t.len() > MAX_TAG_LEN {
                return Err(format!(
                    "{at}[{k}]: expected a tag of 1 to {MAX_TAG_LEN} characters, got {} characters",
                    t.len()
                ));
            }
        }
        Ok(())
    }

    /// The vertex named `name`, or an error at `field` that lists the names there are.
    fn find(&self, field: &str, name: &str) -> Result<&VertexDef, String> {
        self.vertex(name).ok_or_else(|| {
            let names: Vec<&str> = self.vertices.iter().map(|v| v.name.as_str()).collect();
            format!(
                "{field}: no vertex named {name:?} (vertices: {})",
                names.join(", ")
            )
        })
    }

    /// The vertex named `name`.
    pub fn vertex(&self, name: &str) -> Option<&VertexDef> {
        self.vertices.iter().find(|v| v.name == name)
    }

    /// Every map and sink reads something; every source and map writes somewhere.
    fn validate_ends(&self) -> Result<(), String> {
        for (i, v) in self.vertices.iter().enumerate() {
            let kind = v.role.kind();
            let has_in = self.edges.iter().any(|e| e.to == v.name);
            let has_out = self.edges.iter().any(|e| e.from == v.name);
            if !has_in && !matches!(v.role, VertexRole::Source(_)) {
                return Err(format!(
                    "vertices[{i}]: {kind} {:?} has no inputs; add an edge to it",
                    v.name
                ));
            }
            if !has_out && !matches!(v.role, VertexRole::Sink(_)) {
                return Err(format!(
                    "vertices[{i}]: {kind} {:?} has no outputs, so what it writes would be lost; add an edge from it",
                    v.name
                ));
            }
        }
        Ok(())
    }

    /// Every vertex is reached by some source's messages.
    fn validate_reach(&self) -> Result<(), String> {
        let mut reached: BTreeSet<&str> = BTreeSet::new();
        let mut todo: Vec<&str> = self
            .vertices
            .iter()
            .filter(|v| matches!(v.role, VertexRole::Source(_)))
            .map(|v| v.name.as_str())
            .collect();
        while let Some(n) = todo.pop() {
            if reached.insert(n) {
                todo.extend(
                    self.edges
                        .iter()
                        .filter(|e| e.from == n)
                        .map(|e| e.to.as_str()),
                );
            }
        }
        match self
            .vertices
            .iter()
            .position(|v| !reached.contains(v.name.as_str()))
        {
            Some(i) => Err(format!(
                "vertices[{i}]: no source reaches {} {:?}; every vertex must be fed, through edges, by a source",
                self.vertices[i].role.kind(),
                self.vertices[i].name
            )),
            None => Ok(()),
        }
    }

    /// No message may come back to a vertex it has passed; the error names the cycle.
    fn validate_acyclic(&self) -> Result<(), String> {
        // Depth-first search with the path kept on a stack: an edge to a vertex on the
        // stack closes a cycle, which is the stack from that vertex on.
        let mut done: BTreeSet<&str> = BTreeSet::new();
        for start in &self.vertices {
            let mut path: Vec<&str> = Vec::new();
            if let Some(err) = self.find_cycle(&start.name, &mut path, &mut done) {
                return Err(err);
            }
        }
        Ok(())
    }

    fn find_cycle<'a>(
        &'a self,
        at: &'a str,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<String> {
        if done.contains(at) {
            return None;
        }
        path.push(at);
        for (i, e) in self.edges.iter().enumerate().filter(|(_, e)| e.from == at) {
            if let Some(k) = path.iter().position(|p| *p == e.to) {
                let mut names = path[k..].to_vec();
                names.push(&e.to);
                return Some(format!(
                    "edges[{i}]: the edges form a cycle: {}; a message must not come back to a vertex it passed",
                    names.join(" -> ")
                ));
            }
            if let Some(err) = self.find_cycle(&e.to, path, done) {
                return Some(err);
            }
        }
        path.pop();
        done.insert(at);
        None
    }

    fn validate_settings(&self) -> Result<(), String> {
        let b = &self.buffer;
        if b.max_length == 0 || b.max_length > MAX_BUFFER_LENGTH {
            return Err(format!(
                "buffer.max_length: expected 1 to {MAX_BUFFER_LENGTH} messages, got {}",
                b.max_length
            ));
        }
        if !(b.usage_limit > 0.0 && b.usage_limit <= 1.0) {
            return Err(format!(
                "buffer.usage_limit: expected a share above 0 and at most 1 (0.8 is 80%), got {}",
                b.usage_limit
            ));
        }
        if self.lifecycle.pause_grace > MAX_PAUSE_GRACE {
            return Err(format!(
                "lifecycle.pause_grace: expected at most {}, got {}",
                bound_text(MAX_PAUSE_GRACE),
                self.lifecycle.pause_grace
            ));
        }
        Ok(())
    }
}

impl PipelineSpec {
    /// The service job that runs a vertex's replicas, started at `scale.min` (at least
    /// 1); `None` for a built-in vertex or a name not in the spec.
    pub fn job_spec_for(&self, vertex: &str) -> Option<JobSpec> {
        let v = self.vertex(vertex)?;
        let run = v.role.run()?;
        Some(run.job_spec(&job_name(&self.name, &v.name), v.scale.min))
    }

    /// The input buffers of a vertex, one per partition; none for a source.
    pub fn inputs_of(&self, project: &ProjectId, vertex: &VertexDef) -> Vec<String> {
        if matches!(vertex.role, VertexRole::Source(_)) {
            return Vec::new();
        }
        (0..vertex.partitions())
            .map(|p| buffer_name(project, &self.name, &vertex.name, p))
            .collect()
    }

    /// Everything the pipeline controller writes into the vertex named `name`: its
    /// definition, buffers, scale and the given replicas, phase and generation. `None`
    /// for a name not in the spec.
    pub fn vertex_spec(
        &self,
        project: &ProjectId,
        name: &str,
        replicas: u32,
        phase: DesiredPhase,
        generation: u64,
    ) -> Option<VertexSpec> {
        let v = self.vertex(name)?;
        let outputs = self
            .edges
            .iter()
            .filter(|e| e.from == v.name)
            .filter_map(|e| {
                let to = self.vertex(&e.to)?;
                Some(VertexOutput {
                    to: to.name.clone(),
                    buffers: self.inputs_of(project, to),
                    condition: e.condition.clone(),
                })
            })
            .collect();
        Some(VertexSpec {
            pipeline: self.name.clone(),
            name: v.name.clone(),
            role: v.role.clone(),
            inputs: self.inputs_of(project, v),
            outputs,
            buffer: self.buffer,
            scale: v.scale,
            replicas,
            lifecycle: VertexLifecycle {
                desired_phase: phase,
            },
            generation,
        })
    }
}

/// A pipeline or vertex name: the job name rule, without `_` and `.`, since the name
/// becomes part of buffer names, which are joined with `.` and hold only `a-z 0-9 -`.
fn check_name(field: &str, name: &str, what: &str) -> Result<(), String> {
    if is_valid_job_name(name) && !name.contains(['_', '.']) {
        return Ok(());
    }
    let shown: String = name.chars().take(80).collect();
    Err(format!(
        "{field}: {shown:?} is not a valid {what} name; expected 1-63 characters of a-z, 0-9 or '-', starting with a letter or digit"
    ))
}

/// The field path a validation message starts with: the text before the first `": "`.
fn field_path(message: &str) -> &str {
    message.split(": ").next().unwrap_or("")
}

/// The line and column of the node at a field path like `edges[2].to` in a YAML text;
/// the deepest node found when the path goes further than the text (a field left at
/// its default). `None` when the text cannot be read at all.
pub(crate) fn locate(text: &str, path: &str) -> Option<(u64, u64)> {
    let root: Spanned<Node> = serde_saphyr::from_str(text).ok()?;
    let mut at = &root;
    for step in steps(path) {
        let next = match (&at.value, step) {
            (Node::Map(entries), Step::Key(k)) => {
                entries.iter().find(|(name, _)| name == k).map(|(_, n)| n)
            }
            (Node::Seq(items), Step::Index(i)) => items.get(i),
            _ => None,
        };
        match next {
            Some(n) => at = n,
            None => break,
        }
    }
    let loc = at.referenced;
    (loc.line() > 0).then(|| (loc.line(), loc.column()))
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

/// `edges[2].to` as `edges`, `2`, `to`.
fn steps(path: &str) -> Vec<Step<'_>> {
    let mut out = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let mut pieces = part.split('[');
        if let Some(key) = pieces.next().filter(|k| !k.is_empty()) {
            out.push(Step::Key(key));
        }
        for idx in pieces {
            match idx.trim_end_matches(']').parse() {
                Ok(i) => out.push(Step::Index(i)),
                Err(_) => return out,
            }
        }
    }
    out
}

/// A YAML document's shape with where each node is, read only to point at a field.
#[derive(Debug)]
enum Node {
    Map(Vec<(String, Spanned<Node>)>),
    Seq(Vec<Spanned<Node>>),
    Scalar,
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> de::Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some(Key(k)) = map.next_key()? {
            entries.push((k, map.next_value()?));
        }
        Ok(Node::Map(entries))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Node::Seq(items))
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Node, E> {
        Ok(Node::Scalar)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Node, E> {
        Ok(Node::Scalar)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Node, E> {
        Ok(Node::Scalar)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Node, E> {
        Ok(Node::Scalar)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Node, E> {
        Ok(Node::Scalar)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node::Scalar)
    }

    fn visit_none<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node::Scalar)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

/// A mapping key of any scalar type, as text.
struct Key(String);

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl de::Visitor<'_> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
        }
        d.deserialize_any(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::spec::{BufferBackend, MapDef, SinkDef, TagCondition};
    use crate::spec::RuntimeKind;

    /// The example of docs/pipeline-spec.md: its first YAML block, so the document
    /// cannot drift from what the code accepts.
    fn example() -> &'static str {
        let doc = include_str!("../../../../docs/pipeline-spec.md");
        let start = doc.find("```yaml\n").map(|i| i + 8).unwrap_or(0);
        let len = doc[start..].find("```").unwrap_or(0);
        &doc[start..start + len]
    }

    #[test]
    fn the_documented_example_parses_into_typed_values() {
        let spec = PipelineSpec::from_yaml(example(), "etl.yaml").unwrap();
        assert_eq!(spec.vertices.len(), 3);
        let upper = spec.vertex("upper").unwrap();
        let VertexRole::Map(MapDef::Run(run)) = &upper.role else {
            panic!("upper is a map that runs a program: {upper:?}");
        };
        assert_eq!(run.runtime, RuntimeKind::Process);
        assert_eq!(upper.scale.max, 5);
        assert_eq!(upper.scale.zero_after.as_millis(), 300_000);
        // Knobs not given keep their defaults.
        assert_eq!(upper.scale.replicas_per_step, 2);
        assert_eq!(upper.partitions(), 2);
        assert_eq!(spec.vertex("gen").unwrap().partitions(), 1);
        assert!(matches!(
            spec.vertex("out").unwrap().role,
            VertexRole::Sink(SinkDef::Log(_))
        ));
        assert_eq!(
            spec.edges[1].condition.as_ref().unwrap().tags,
            TagCondition::NoneOf(vec!["drop".into()])
        );
        assert_eq!(spec.buffer.backend, BufferBackend::Nats);
        assert_eq!(spec.lifecycle.pause_grace.as_millis(), 60_000);
        // The API reads the same spec from JSON.
        let json = serde_json::to_vec(&spec).unwrap();
        assert_eq!(PipelineSpec::from_json(&json).unwrap(), spec);
        let job = spec.job_spec_for("upper").unwrap();
        assert_eq!(job.name, "etl-upper");
        assert_eq!(job.kind, crate::JobKind::Service);
        assert_eq!(job.count, 1);
        assert_eq!(spec.job_spec_for("gen"), None);
    }

    #[test]
    fn defaults_fill_what_a_minimal_spec_leaves_out() {
        let yaml = "name: p\nvertices:\n  - { name: a, source: { http: {} } }\n  - { name: b, sink: { blackhole: {} } }\nedges: [{ from: a, to: b }]\n";
        let spec = PipelineSpec::from_yaml(yaml, "p.yaml").unwrap();
        assert_eq!(spec.lifecycle.desired_phase, DesiredPhase::Running);
        assert_eq!(spec.lifecycle.pause_grace.as_millis(), 30_000);
        assert_eq!(spec.buffer.backend, BufferBackend::Embedded);
        assert_eq!(spec.buffer.max_length, 30_000);
        assert_eq!(spec.buffer.usage_limit, 0.8);
        let a = spec.vertex("a").unwrap();
        assert_eq!((a.scale.min, a.scale.max), (1, 1));
        assert_eq!(a.scale.target_processing_seconds.as_millis(), 20_000);
        assert_eq!(a.scale.scale_up_cooldown.as_millis(), 90_000);
        assert_eq!(a.scale.scale_down_cooldown.as_millis(), 90_000);
        assert_eq!(a.scale.zero_after.as_millis(), 120_000);
    }

    /// A three-vertex pipeline with the line containing each `old` replaced by its `new`
    /// (an empty `old` appends), for table tests: the vertices are on lines 3 to 5 and
    /// the edges on lines 7 and 8.
    fn with(lines: &[(&str, &str)]) -> String {
        let mut base = vec![
            "name: etl".to_string(),
            "vertices:".into(),
            "  - { name: gen, source: { generator: {} } }".into(),
            "  - { name: upper, map: { run: { command: [python3, upper.py] } } }".into(),
            "  - { name: out, sink: { log: {} } }".into(),
            "edges:".into(),
            "  - { from: gen, to: upper }".into(),
            "  - { from: upper, to: out }".into(),
        ];
        for (old, new) in lines {
            match base.iter().position(|l| !old.is_empty() && l.contains(old)) {
                Some(i) => base[i] = new.to_string(),
                None => base.push(new.to_string()),
            }
        }
        base.join("\n") + "\n"
    }

    #[test]
    fn graph_mistakes_are_refused_naming_file_line_and_field() {
        // (lines to replace or add, the start of the error)
        let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
            (
                vec![("upper, to: out", "  - { from: upper, to: sinc }")],
                "etl.yaml:8:24: edges[1].to: no vertex named \"sinc\" (vertices: gen, upper, out)",
            ),
            (
                vec![("gen, to: upper", "  - { from: gn, to: upper }")],
                "etl.yaml:7:13: edges[0].from: no vertex named \"gn\"",
            ),
            (
                vec![(
                    "  - { from: upper, to: out }",
                    "  - { from: upper, to: out }\n  - { from: upper, to: upper }",
                )],
                "etl.yaml:9:5: edges[2]: the edges form a cycle: upper -> upper",
            ),
            (
                vec![
                    (
                        "name: upper",
                        "  - { name: upper, map: { run: { command: [a] } } }\n  - { name: back, map: { run: { command: [b] } } }",
                    ),
                    (
                        "upper, to: out",
                        "  - { from: upper, to: back }\n  - { from: back, to: upper }\n  - { from: back, to: out }",
                    ),
                ],
                "edges[2]: the edges form a cycle: upper -> back -> upper",
            ),
            (
                vec![("gen, to: upper", "  - { from: upper, to: gen }")],
                "etl.yaml:7:24: edges[0].to: \"gen\" is a source; a source has no inputs",
            ),
            (
                vec![("upper, to: out", "  - { from: out, to: upper }")],
                "edges[1].from: \"out\" is a sink; a sink has no outputs",
            ),
            (
                vec![("upper, to: out", "  - { from: gen, to: out }")],
                "etl.yaml:4:5: vertices[1]: map \"upper\" has no outputs",
            ),
            (
                vec![(
                    "name: out",
                    "  - { name: out, sink: { log: {} } }\n  - { name: lost, sink: { log: {} } }",
                )],
                "etl.yaml:6:5: vertices[3]: sink \"lost\" has no inputs; add an edge to it",
            ),
            (
                vec![
                    (
                        "name: upper",
                        "  - { name: upper, map: { run: { command: [a] } } }\n  - { name: a, map: { run: { command: [b] } } }\n  - { name: b, map: { run: { command: [c] } } }",
                    ),
                    (
                        "upper, to: out",
                        "  - { from: upper, to: out }\n  - { from: a, to: b }\n  - { from: b, to: a }\n  - { from: b, to: out }",
                    ),
                ],
                "vertices[2]: no source reaches map \"a\"",
            ),
            (
                vec![("name: out", "  - { name: upper, sink: { log: {} } }")],
                "etl.yaml:5:13: vertices[2].name: \"upper\" is also the name of vertices[1]",
            ),
            (
                vec![("name: out", "  - { name: Out_1, sink: { log: {} } }")],
                "vertices[2].name: \"Out_1\" is not a valid vertex name",
            ),
            (
                vec![("name: out", "  - { name: a.b, sink: { log: {} } }")],
                "vertices[2].name: \"a.b\" is not a valid vertex name",
            ),
            (
                vec![("name: etl", "name: etl_1")],
                "etl.yaml:1:7: name: \"etl_1\" is not a valid pipeline name",
            ),
            (
                vec![(
                    "name: etl",
                    "name: pppppppppppppppppppppppppppppppppppppppppppppppppppppppppppp",
                )],
                "etl.yaml:3:13: vertices[0].name: the vertex's job would be named \"pppppppppppppppppppppppppppppppppppppppppppppppppppppppppppp-gen\", 64 characters",
            ),
            (
                vec![(
                    "name: out",
                    "  - { name: out, sink: { log: {} }, scale: { min: 3, max: 2 } }",
                )],
                "etl.yaml:5:51: vertices[2].scale.min: 3 is more than max 2",
            ),
            (
                vec![(
                    "name: out",
                    "  - { name: out, sink: { log: {} }, partitions: 0 }",
                )],
                "etl.yaml:5:49: vertices[2].partitions: expected 1 to 64, got 0",
            ),
            (
                vec![(
                    "name: gen",
                    "  - { name: gen, source: { generator: {} }, partitions: 2 }",
                )],
                "vertices[0].partitions: a source reads no buffer",
            ),
            (
                vec![(
                    "name: gen",
                    "  - { name: gen, source: { generator: { rate: 0 } } }",
                )],
                "vertices[0].source.generator.rate: expected 1 to 1000000, got 0",
            ),
            (
                vec![(
                    "name: gen",
                    "  - { name: gen, source: { generator: { total: 0 } } }",
                )],
                "vertices[0].source.generator.total: expected at least 1",
            ),
            (
                vec![(
                    "gen, to: upper",
                    "  - { from: gen, to: upper }\n  - { from: gen, to: upper }",
                )],
                "etl.yaml:8:5: edges[1]: the same edge as edges[0] (from gen to upper)",
            ),
            (
                vec![(
                    "gen, to: upper",
                    "  - { from: gen, to: upper, condition: { tags: { any: [x] } } }",
                )],
                "edges[0].condition: only an edge leaving a map may have one, and \"gen\" is a source",
            ),
            (
                vec![(
                    "upper, to: out",
                    "  - { from: upper, to: out, condition: { tags: { all: [] } } }",
                )],
                "edges[1].condition.tags.all: expected 1 to 64 tags, got 0",
            ),
            (
                vec![(
                    "upper, to: out",
                    "  - { from: upper, to: out, condition: { tags: { any: [x, ''] } } }",
                )],
                "edges[1].condition.tags.any[1]: expected a tag of 1 to 63 characters",
            ),
            (
                vec![("", "buffer: { max_length: 0 }")],
                "etl.yaml:9:23: buffer.max_length: expected 1 to 10000000 messages, got 0",
            ),
            (
                vec![("", "buffer: { usage_limit: 1.5 }")],
                "buffer.usage_limit: expected a share above 0 and at most 1 (0.8 is 80%), got 1.5",
            ),
            (
                vec![("", "buffer: { usage_limit: 0 }")],
                "buffer.usage_limit: expected a share above 0",
            ),
            (
                vec![("", "lifecycle: { pause_grace: 2h }")],
                "lifecycle.pause_grace: expected at most 1h, got 2h",
            ),
            (
                vec![(
                    "name: upper",
                    "  - { name: upper, map: { run: { runtime: docker } } }",
                )],
                "vertices[1].map.run.image: required for runtime docker",
            ),
            (
                vec![(
                    "name: upper",
                    "  - { name: upper, map: { run: { command: [x], env: { DROVER_X: y } } } }",
                )],
                "vertices[1].map.run.env.DROVER_X: names starting with DROVER_ are set by Drover itself",
            ),
            // Mistakes the types catch, with the same quality as a job spec's.
            (
                vec![(
                    "name: out",
                    "  - { name: out, sink: { log: {} }, map: { run: {} } }",
                )],
                "etl.yaml:5:5: vertices[2]: vertex \"out\": give exactly one of source, map or sink",
            ),
            (
                vec![("name: out", "  - { name: out }")],
                "vertices[2]: vertex \"out\": give exactly one of source, map or sink",
            ),
            (
                vec![("name: out", "  - { name: out, sink: { lg: {} } }")],
                "vertices[2].sink: unknown variant `lg`",
            ),
            (
                vec![(
                    "name: out",
                    "  - { name: out, sink: { log: {} }, scale: { mx: 2 } }",
                )],
                "etl.yaml:5:44: vertices[2].scale: unknown field `mx`",
            ),
            (
                vec![("", "lifecycle: { desired_phase: stopped }")],
                "lifecycle.desired_phase: unknown variant `stopped`",
            ),
            (
                vec![("", "buffer: { backend: kafka }")],
                "buffer.backend: unknown variant `kafka`",
            ),
            (
                vec![(
                    "name: out",
                    "  - { name: out, sink: { log: {} }, scale: { max: lots } }",
                )],
                "vertices[2].scale.max: expected a whole number, 0 or more, found lots",
            ),
            (
                vec![("", "---\nname: other")],
                "but a pipeline spec is exactly one",
            ),
        ];
        let mut wrong = Vec::new();
        for (lines, want) in cases {
            let yaml = with(&lines);
            let err = match PipelineSpec::from_yaml(&yaml, "etl.yaml") {
                Ok(_) => "accepted".to_string(),
                Err(e) => e.to_string(),
            };
            if !err.contains(want) || !err.starts_with("etl.yaml") {
                wrong.push(format!("{yaml}-> {err}\n(wanted {want:?})"));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n\n"));
        // The unchanged pipeline is valid, so each case fails for its own line.
        PipelineSpec::from_yaml(&with(&[]), "etl.yaml").unwrap();
    }

    #[test]
    fn size_is_bounded() {
        let mut yaml =
            String::from("name: big\nvertices:\n  - { name: s, source: { http: {} } }\n");
        for i in 0..MAX_VERTICES {
            yaml.push_str(&format!("  - {{ name: v{i}, sink: {{ log: {{}} }} }}\n"));
        }
        let err = PipelineSpec::from_yaml(&yaml, "big.yaml").unwrap_err();
        assert_eq!(
            err.to_string(),
            "big.yaml:3:3: vertices: expected 1 to 64 vertices, got 65"
        );
        let edges: String = (0..=MAX_EDGES)
            .map(|i| format!("  - {{ from: s, to: v{i} }}\n"))
            .collect();
        let yaml = format!("name: big\nvertices: []\nedges:\n{edges}");
        let mut spec: PipelineSpec = serde_saphyr::from_str(&yaml).unwrap();
        spec.vertices = vec![spec_vertex("s")];
        assert_eq!(
            spec.validate().unwrap_err(),
            "edges: expected at most 256 edges, got 257"
        );
        let empty = PipelineSpec::from_json(br#"{"name":"e","vertices":[]}"#).unwrap_err();
        assert_eq!(
            empty.to_string(),
            "vertices: expected 1 to 64 vertices, got 0"
        );
    }

    fn spec_vertex(name: &str) -> VertexDef {
        VertexDef {
            name: name.into(),
            role: VertexRole::Source(SourceDef::Http(Default::default())),
            scale: Default::default(),
            partitions: None,
        }
    }

    #[test]
    fn json_is_held_to_the_same_rules() {
        let bad = br#"{"name":"p","vertices":[{"name":"a","source":{"http":{}}},{"name":"b","sink":{"log":{}}}],"edges":[{"from":"a","to":"c"}]}"#;
        let err = PipelineSpec::from_json(bad).unwrap_err().to_string();
        assert_eq!(err, "edges[0].to: no vertex named \"c\" (vertices: a, b)");
        let unknown = br#"{"name":"p","vertices":[],"colour":"red"}"#;
        let err = PipelineSpec::from_json(unknown).unwrap_err().to_string();
        assert!(err.starts_with("unknown field `colour`"), "{err}");
        let trailing = br#"{"name":"p","vertices":[]} x"#;
        let err = PipelineSpec::from_json(trailing).unwrap_err().to_string();
        assert!(
            err.contains("unexpected data after the pipeline spec"),
            "{err}"
        );
    }

    #[test]
    fn vertex_specs_carry_their_buffers_and_conditions() {
        let spec = PipelineSpec::from_yaml(example(), "etl.yaml").unwrap();
        let project = ProjectId::default_project();
        let gen_ = spec
            .vertex_spec(&project, "gen", 1, DesiredPhase::Running, 7)
            .unwrap();
        assert!(gen_.inputs.is_empty());
        assert_eq!(gen_.outputs.len(), 1);
        assert_eq!(
            gen_.outputs[0].buffers,
            vec!["default.etl.upper.0", "default.etl.upper.1"]
        );
        assert_eq!(gen_.generation, 7);
        let upper = spec
            .vertex_spec(&project, "upper", 3, DesiredPhase::Paused, 7)
            .unwrap();
        assert_eq!(
            upper.inputs,
            vec!["default.etl.upper.0", "default.etl.upper.1"]
        );
        assert_eq!(upper.outputs[0].buffers, vec!["default.etl.out.0"]);
        assert!(upper.outputs[0].condition.is_some());
        assert_eq!(upper.lifecycle.desired_phase, DesiredPhase::Paused);
        assert_eq!(upper.buffer, spec.buffer);
        // The vertex's job is the pipeline's job for it, with its replica count.
        let job = upper.job_spec().unwrap();
        assert_eq!(job.name, "etl-upper");
        assert_eq!(job.command, spec.job_spec_for("upper").unwrap().command);
        assert_eq!(
            spec.vertex_spec(&project, "nope", 1, DesiredPhase::Running, 1),
            None
        );
    }

    #[test]
    fn paths_are_found_in_block_and_flow_yaml() {
        let text = "a:\n  b:\n    - x\n    - { c: 1, d: [5, 6] }\n";
        // (path, line, column)
        let cases = [
            ("a", Some((2, 3))),
            ("a.b[1].c", Some((4, 12))),
            ("a.b[1].d[1]", Some((4, 22))),
            ("a.b[0]", Some((3, 7))),
            // Past what is written: the deepest node found.
            ("a.b[1].e", Some((4, 7))),
            ("a.b[9]", Some((3, 5))),
        ];
        for (path, want) in cases {
            assert_eq!(locate(text, path), want, "{path}");
        }
        assert_eq!(locate("a: [", "a"), None);
    }
}
