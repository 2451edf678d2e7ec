//! Pipelines: graphs of vertices (sources, maps, sinks) joined by edges, each edge a
//! durable buffer between the vertices it joins.
//!
//! Everything here is plain data and pure rules, like the rest of this crate:
//! - [`spec`]: the pipeline spec a user writes, and [`graph`] the rules its graph keeps;
//! - [`vertex`]: the object the pipeline controller stores per vertex, and the replica
//!   count the vertex controller derives from that object alone;
//! - [`autoscale`]: the autoscaler's decision for one vertex;
//! - [`lifecycle`]: the pipeline's run, pause, resume and delete as a step function.

pub mod autoscale;
pub mod graph;
pub mod lifecycle;
pub mod object;
pub mod spec;
pub mod vertex;

pub use autoscale::{Decision, Observation, ScaleConfig, ScaleState, decide};
pub use lifecycle::{
    BufferLevel, LifecycleRequest, LifecycleStep, PipelineObservation, PipelinePhase,
    PipelineStatus, VertexDirective, VertexObservation, step,
};
pub use object::{
    BufferView, HttpAccepted, HttpMessage, HttpMessages, Pipeline, PipelineApplied,
    PipelineSummary, PipelineView, Rates, VertexView,
};
pub use spec::{
    BufferBackend, BufferSpec, DesiredPhase, EdgeCondition, EdgeDef, LifecycleSpec, MapDef,
    PipelineSpec, RunDef, SinkDef, SourceDef, TagCondition, VertexDef, VertexRole,
};
pub use vertex::{
    Vertex, VertexSpec, VertexStatus, autoscale as autoscale_vertex, desired_replicas,
};
