//! Pipelines in the controller: the API's routes, the pipeline controller and the vertex
//! controller.
//!
//! The pipeline controller is the only writer of vertex specs: per pipeline it observes
//! the vertices' replicas and the buffers' levels, takes one
//! [`lifecycle::step`](drover_core::pipeline::step) from the stored status, and writes
//! what the step says into each vertex and the pipeline's status. The vertex controller
//! then runs each vertex's job from the vertex object alone ([`crate::vertices`]).
//! Everything either decides comes from the store or from what it observes now, so a
//! restarted controller carries on where the old one was.

use crate::auth::{Action, Principal};
use crate::error::{ApiError, ApiResult};
use crate::state::State as CtlState;
use crate::vertices::{self, JobAction, JobObs, Ring, Sample, VertexObs};
use crate::{Inner, Tx};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use bytes::Bytes;
use drover_buffer::{
    BufferBackend, BufferConfig, BufferError, BufferName, BufferStats, Message, MessageId,
};
use drover_core::api::ErrorCode;
use drover_core::pipeline::autoscale::Observation;
use drover_core::pipeline::object::{MAX_HTTP_BODY, MAX_HTTP_MESSAGES};
use drover_core::pipeline::vertex::{desired_replicas, job_name};
use drover_core::pipeline::{
    BufferLevel, BufferSpec, BufferView, DesiredPhase, HttpAccepted, HttpMessages,
    LifecycleRequest, Pipeline, PipelineApplied, PipelineObservation, PipelinePhase, PipelineSpec,
    PipelineSummary, PipelineView, SourceDef, Vertex, VertexObservation, VertexRole, VertexView,
};
use drover_core::{JobId, ProjectId, TaskState};
use drover_store::Change;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

type Shared = State<Arc<Inner>>;

/// How often the controllers look at every pipeline and vertex when nothing wakes them.
const TICK: Duration = Duration::from_millis(300);

/// What the pipeline controllers keep in memory: observations only.
#[derive(Default)]
pub(crate) struct Runtime {
    /// Each vertex's recent counts, for its rates.
    rates: std::sync::Mutex<HashMap<VertexKey, Ring>>,
    /// Each vertex's latest autoscaler reason, holds included, for the status: kept
    /// here rather than in the vertex's stored status, which would then be rewritten
    /// on every round.
    decisions: std::sync::Mutex<HashMap<VertexKey, String>>,
    /// Woken by the API on every change to a pipeline.
    pub(crate) wake: tokio::sync::Notify,
    /// Held shared by API requests that open a pipeline's buffers, and exclusively
    /// while a deleted pipeline's buffers and records are removed: opening a buffer
    /// creates it, so a request that looked the pipeline up just before its removal
    /// would otherwise make a buffer again after it was deleted.
    gate: tokio::sync::RwLock<()>,
}

type VertexKey = (ProjectId, String, String);

impl Runtime {
    fn rates_lock(&self) -> std::sync::MutexGuard<'_, HashMap<VertexKey, Ring>> {
        // Each operation on the map is one insert, lookup or retain: a panic cannot
        // leave it half-changed, so a poisoned lock is still usable.
        self.rates.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn decisions_lock(&self) -> std::sync::MutexGuard<'_, HashMap<VertexKey, String>> {
        // As for the rates: one insert, lookup or retain at a time.
        self.decisions.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The buffers' settings as the backend takes them.
fn buffer_config(b: &BufferSpec) -> BufferConfig {
    BufferConfig {
        max_length: b.max_length,
        usage_limit: b.usage_limit,
        ..BufferConfig::default()
    }
}

/// Every input buffer of a pipeline, by vertex, as backend names.
fn buffers_of(project: &ProjectId, spec: &PipelineSpec) -> Vec<(String, BufferName)> {
    let mut out = Vec::new();
    for v in &spec.vertices {
        if matches!(v.role, VertexRole::Source(_)) {
            continue;
        }
        for p in 0..v.partitions() {
            match BufferName::new(project.as_str(), &spec.name, &v.name, p) {
                Ok(n) => out.push((v.name.clone(), n)),
                // The spec's names were checked to be valid labels when it was applied;
                // a project name that is not one cannot have buffers at all.
                Err(e) => tracing::warn!(pipeline = %spec.name, "buffer name: {e}"),
            }
        }
    }
    out
}

/// Reads the counts of those of `names` that exist; a buffer never created is left out,
/// and one that cannot be read is an error.
async fn read_levels(
    backend: &Result<Arc<dyn BufferBackend>, String>,
    names: &[BufferName],
    config: &BufferConfig,
) -> BTreeMap<BufferName, Result<BufferStats, String>> {
    let mut out = BTreeMap::new();
    let backend = match backend {
        Ok(b) => b,
        Err(e) => {
            for n in names {
                out.insert(n.clone(), Err(e.clone()));
            }
            return out;
        }
    };
    let existing: BTreeSet<BufferName> = match backend.list().await {
        Ok(l) => l.into_iter().collect(),
        Err(e) => {
            for n in names {
                out.insert(n.clone(), Err(e.to_string()));
            }
            return out;
        }
    };
    for n in names.iter().filter(|n| existing.contains(*n)) {
        let stats = match backend.open(n, config).await {
            Ok(b) => b.stats().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        out.insert(n.clone(), stats);
    }
    out
}

/// The vertex's job's tasks that have not ended, over every version of its name (a
/// replaced version's tasks may still be stopping).
fn live_tasks(state: &CtlState, project: &ProjectId, job: &str) -> (u32, u32) {
    let Some(cur) = state.job_by_name(project, job) else {
        return (0, 0);
    };
    let mut live = 0;
    let mut running = 0;
    for t in state.job_tasks(&cur.id).chain(state.older_live_tasks(cur)) {
        if !t.state.is_terminal() {
            live += 1;
        }
        if t.state == TaskState::Running {
            running += 1;
        }
    }
    (live, running)
}

/// Every stored version of a job name.
fn versions_of(state: &CtlState, project: &ProjectId, job: &str) -> Vec<JobId> {
    state
        .versions
        .get(&(project.clone(), job.to_string()))
        .map(|v| v.values().cloned().collect())
        .unwrap_or_default()
}

/// A vertex's replicas before the pipeline controller has written it: its `scale.min`.
fn initial_replicas(spec: &PipelineSpec, vertex: &str) -> u32 {
    spec.vertex(vertex)
        .map_or(0, |v| v.scale.clamp(v.scale.min))
}

impl Inner {
    /// Stores a pipeline spec: version 1, a new version when it changed, or nothing.
    async fn apply_pipeline(
        &self,
        project: ProjectId,
        spec: PipelineSpec,
    ) -> ApiResult<(PipelineApplied, bool)> {
        self.buffers.backend(spec.buffer.backend).map_err(|e| {
            ApiError::new(
                ErrorCode::InvalidSpec,
                format!("invalid pipeline spec: {e}"),
            )
        })?;
        let mut state = self.state.lock().await;
        let state = &mut *state;
        name_clash(state, &project, &spec)?;
        let now = self.now();
        let key = (project.clone(), spec.name.clone());
        let (pipeline, result) = match state.pipelines.get(&key) {
            Some(cur) if cur.deleting() => {
                return Err(ApiError::new(
                    ErrorCode::InUse,
                    format!(
                        "pipeline {} is being deleted; apply it again once it is gone",
                        cur.name
                    ),
                ));
            }
            Some(cur) if cur.spec == spec => (cur.clone(), "unchanged"),
            Some(cur) => (
                Pipeline {
                    version: cur.version + 1,
                    spec,
                    updated_at: now,
                    ..cur.clone()
                },
                "updated",
            ),
            None => (
                Pipeline {
                    project,
                    name: spec.name.clone(),
                    version: 1,
                    spec,
                    status: Default::default(),
                    request: None,
                    created_at: now,
                    updated_at: now,
                },
                "created",
            ),
        };
        if result != "unchanged" {
            let mut tx = Tx::default();
            tx.put(state, Change::Pipeline(pipeline.clone()));
            self.commit(state, tx).await?;
            self.pipes.wake.notify_one();
            tracing::info!(pipeline = %pipeline.name, version = pipeline.version, "pipeline {result}");
        }
        let running = pipeline_running(state, &pipeline);
        Ok((
            PipelineApplied {
                pipeline: PipelineSummary::of(&pipeline, running),
                result: result.into(),
            },
            result == "created",
        ))
    }

    /// Writes a user's pause, resume or delete into the stored pipeline before
    /// answering, so it survives a restart: a pause and a resume change the spec's
    /// `desired_phase` (a resume also leaves its request for the controller's next
    /// step), a delete leaves its request.
    async fn request_pipeline(
        &self,
        p: &Principal,
        name: &str,
        what: Requested,
    ) -> ApiResult<PipelineSummary> {
        let mut state = self.state.lock().await;
        let state = &mut *state;
        let key = find_pipeline(state, p, name)?;
        let Some(cur) = state.pipelines.get(&key).cloned() else {
            return Err(ApiError::not_found(&format!("pipeline {name:?}")));
        };
        let mut next = cur.clone();
        match what {
            Requested::Delete => next.request = Some(LifecycleRequest::Delete),
            _ if cur.deleting() => {
                return Err(ApiError::new(
                    ErrorCode::InUse,
                    format!("pipeline {name} is being deleted"),
                ));
            }
            Requested::Pause => {
                next.spec.lifecycle.desired_phase = DesiredPhase::Paused;
                next.request = None;
            }
            Requested::Resume { slow } => {
                next.spec.lifecycle.desired_phase = DesiredPhase::Running;
                next.request = Some(LifecycleRequest::Resume { slow });
            }
        }
        if next != cur {
            next.updated_at = self.now();
            let mut tx = Tx::default();
            tx.put(state, Change::Pipeline(next.clone()));
            self.commit(state, tx).await?;
            self.pipes.wake.notify_one();
        }
        let running = pipeline_running(state, &next);
        Ok(PipelineSummary::of(&next, running))
    }

    /// One round of the pipeline controller over every pipeline.
    async fn pipelines_pass(&self) {
        let keys: Vec<(ProjectId, String)> =
            self.state.lock().await.pipelines.keys().cloned().collect();
        for key in keys {
            if let Err(e) = self.reconcile_pipeline(&key).await {
                tracing::warn!(project = %key.0, pipeline = %key.1, "pipeline controller: {e}");
            }
        }
    }

    async fn reconcile_pipeline(&self, key: &(ProjectId, String)) -> Result<(), String> {
        // Observe the vertices under the lock, then the buffers without it.
        let (pipeline, mut obs, orphans_live) = {
            let state = self.state.lock().await;
            let Some(p) = state.pipelines.get(key).cloned() else {
                return Ok(());
            };
            let mut obs = PipelineObservation::default();
            for v in &p.spec.vertices {
                let job = job_name(&p.name, &v.name);
                let (live, _) = live_tasks(&state, &p.project, &job);
                let replicas = state
                    .vertices
                    .get(&(p.project.clone(), p.name.clone(), v.name.clone()))
                    .map_or_else(|| initial_replicas(&p.spec, &v.name), |x| x.spec.replicas);
                let failed = state
                    .job_by_name(&p.project, &job)
                    .and_then(|j| state.pending_reasons.get(&j.id))
                    .filter(|r| r.blocked)
                    .map(|r| r.text.clone());
                obs.vertices.insert(
                    v.name.clone(),
                    VertexObservation {
                        replicas,
                        running: live,
                        failed,
                    },
                );
            }
            // Vertices whose name left the spec are stopped and removed by this
            // controller too; their replicas hold up a delete like any other.
            let orphans_live: u32 = state
                .vertices_of(&p.project, &p.name)
                .filter(|v| p.spec.vertex(&v.spec.name).is_none())
                .map(|v| live_tasks(&state, &p.project, &v.spec.job_name()).0)
                .sum();
            (p, obs, orphans_live)
        };
        let backend = self.buffers.backend(pipeline.spec.buffer.backend);
        let names: Vec<BufferName> = buffers_of(&pipeline.project, &pipeline.spec)
            .into_iter()
            .map(|(_, n)| n)
            .collect();
        let config = buffer_config(&pipeline.spec.buffer);
        for (name, stats) in read_levels(&backend, &names, &config).await {
            let level = match stats {
                Ok(s) => BufferLevel::Known {
                    pending: s.pending,
                    unacked: s.unacked,
                },
                Err(e) => {
                    tracing::debug!(buffer = %name, "buffer unreadable: {e}");
                    BufferLevel::Unknown
                }
            };
            obs.buffers.insert(name.to_string(), level);
        }
        let now = self.now();
        let step = drover_core::pipeline::step(
            &pipeline.spec,
            &pipeline.status,
            &obs,
            pipeline.request,
            now,
        );
        if step.removable && orphans_live == 0 {
            let _gate = self.pipes.gate.write().await;
            // The buffers go first: if the controller stops half-way, the pipeline is
            // still stored and the next round removes what is left.
            if let Ok(b) = &backend {
                for n in &names {
                    b.delete(n)
                        .await
                        .map_err(|e| format!("deleting buffer {n}: {e}"))?;
                }
            }
            return self.remove_pipeline(&pipeline).await;
        }
        let mut state = self.state.lock().await;
        let state = &mut *state;
        // Acted on only if nobody changed the pipeline meanwhile (a request that came
        // in is stepped next round).
        if state.pipelines.get(key) != Some(&pipeline) {
            return Ok(());
        }
        let mut tx = Tx::default();
        for (name, d) in &step.vertices {
            let vkey = (
                pipeline.project.clone(),
                pipeline.name.clone(),
                name.clone(),
            );
            let existing = state.vertices.get(&vkey).cloned();
            let replicas = d.replicas.unwrap_or_else(|| {
                existing.as_ref().map_or_else(
                    || initial_replicas(&pipeline.spec, name),
                    |v| v.spec.replicas,
                )
            });
            let generation = existing.as_ref().map_or(1, |v| v.spec.generation);
            let Some(spec) = pipeline.spec.vertex_spec(
                &pipeline.project,
                name,
                replicas,
                d.desired_phase,
                generation,
            ) else {
                continue;
            };
            match existing {
                Some(v) if v.spec == spec => {}
                Some(mut v) => {
                    v.spec = drover_core::pipeline::VertexSpec {
                        generation: generation + 1,
                        ..spec
                    };
                    tx.put(state, Change::Vertex(v));
                }
                None => tx.put(
                    state,
                    Change::Vertex(Vertex {
                        project: pipeline.project.clone(),
                        spec,
                        status: Default::default(),
                    }),
                ),
            }
        }
        // Vertices no longer in the spec: paused, then removed with their jobs once
        // nothing of them runs.
        let orphans: Vec<Vertex> = state
            .vertices_of(&pipeline.project, &pipeline.name)
            .filter(|v| pipeline.spec.vertex(&v.spec.name).is_none())
            .cloned()
            .collect();
        for mut v in orphans {
            let job = v.spec.job_name();
            if live_tasks(state, &v.project, &job).0 == 0 {
                for id in versions_of(state, &v.project, &job) {
                    tx.put(state, Change::DeleteJob(id));
                }
                tx.put(
                    state,
                    Change::DeleteVertex {
                        project: v.project.clone(),
                        pipeline: v.spec.pipeline.clone(),
                        name: v.spec.name.clone(),
                    },
                );
            } else if v.spec.lifecycle.desired_phase != DesiredPhase::Paused {
                v.spec.lifecycle.desired_phase = DesiredPhase::Paused;
                v.spec.generation += 1;
                tx.put(state, Change::Vertex(v));
            }
        }
        let mut next = pipeline.clone();
        next.status = step.status;
        // A resume has been acted on once its step is stored; a delete stays until
        // the pipeline is gone.
        if matches!(next.request, Some(LifecycleRequest::Resume { .. })) {
            next.request = None;
        }
        if next != pipeline {
            if next.status.phase != pipeline.status.phase {
                tracing::info!(pipeline = %next.name, phase = ?next.status.phase, "{}", next.status.reason);
            }
            next.updated_at = now;
            tx.put(state, Change::Pipeline(next));
        }
        self.commit(state, tx).await.map_err(|e| e.to_string())
    }

    /// Removes a deleted pipeline whose replicas have all stopped: its vertices' jobs,
    /// its vertices and itself, in one commit.
    async fn remove_pipeline(&self, pipeline: &Pipeline) -> Result<(), String> {
        let mut state = self.state.lock().await;
        let state = &mut *state;
        let mut tx = Tx::default();
        let vertices: Vec<Vertex> = state
            .vertices_of(&pipeline.project, &pipeline.name)
            .cloned()
            .collect();
        let mut jobs: BTreeSet<String> = vertices.iter().map(|v| v.spec.job_name()).collect();
        jobs.extend(
            pipeline
                .spec
                .vertices
                .iter()
                .map(|v| job_name(&pipeline.name, &v.name)),
        );
        for job in &jobs {
            if live_tasks(state, &pipeline.project, job).0 > 0 {
                // A replica started after the step looked; the next round sees it.
                return Ok(());
            }
            for id in versions_of(state, &pipeline.project, job) {
                tx.put(state, Change::DeleteJob(id));
            }
        }
        for v in vertices {
            tx.put(
                state,
                Change::DeleteVertex {
                    project: v.project,
                    pipeline: v.spec.pipeline,
                    name: v.spec.name,
                },
            );
        }
        tx.put(
            state,
            Change::DeletePipeline {
                project: pipeline.project.clone(),
                name: pipeline.name.clone(),
            },
        );
        self.commit(state, tx).await.map_err(|e| e.to_string())?;
        let other = |(p, pl, _): &VertexKey| !(p == &pipeline.project && pl == &pipeline.name);
        self.pipes.rates_lock().retain(|k, _| other(k));
        self.pipes.decisions_lock().retain(|k, _| other(k));
        tracing::info!(pipeline = %pipeline.name, "pipeline deleted");
        Ok(())
    }

    /// One round of the vertex controller over every vertex.
    async fn vertices_pass(&self) {
        let keys: Vec<VertexKey> = self.state.lock().await.vertices.keys().cloned().collect();
        // The rates of vertices that are gone (removed from their pipeline's spec) go
        // with them; the keys come sorted from the map, so a binary search finds them.
        self.pipes
            .rates_lock()
            .retain(|k, _| keys.binary_search(k).is_ok());
        self.pipes
            .decisions_lock()
            .retain(|k, _| keys.binary_search(k).is_ok());
        for key in keys {
            if let Err(e) = self.reconcile_vertex(&key).await {
                tracing::warn!(project = %key.0, pipeline = %key.1, vertex = %key.2, "vertex controller: {e}");
            }
        }
    }

    async fn reconcile_vertex(&self, key: &VertexKey) -> Result<(), String> {
        let now = self.now();
        let (vertex, job, running, job_id) = {
            let state = self.state.lock().await;
            let Some(v) = state.vertices.get(key).cloned() else {
                return Ok(());
            };
            let name = v.spec.job_name();
            let cur = state.job_by_name(&v.project, &name);
            let job = cur.map(|j| JobObs {
                spec: j.spec.clone(),
                finished: j.status.is_final(),
            });
            let (_, running) = live_tasks(&state, &v.project, &name);
            // The replicas' cumulative counts, summed, for the rates.
            let mut counts: Option<Sample> = None;
            if let Some(j) = cur {
                for t in state.job_tasks(&j.id) {
                    if let Some(c) = state.usage.get(&t.id).and_then(|u| u.plane) {
                        let s = counts.get_or_insert(Sample {
                            at: now,
                            read: 0,
                            written: 0,
                            backpressured: 0,
                        });
                        s.read = s.read.saturating_add(c.read);
                        s.written = s.written.saturating_add(c.written);
                        s.backpressured = s.backpressured.saturating_add(c.backpressured);
                    }
                }
            }
            if let Some(s) = counts {
                self.pipes
                    .rates_lock()
                    .entry(key.clone())
                    .or_default()
                    .push(s);
            }
            (v.clone(), job, running, cur.map(|j| j.id.clone()))
        };
        let scale = self.scale_observation(&vertex, key, running).await;
        let plan = vertices::reconcile(
            &vertex,
            &VertexObs {
                job,
                running,
                scale,
                now,
            },
        );
        {
            let mut decisions = self.pipes.decisions_lock();
            match &plan.decision {
                Some(why) => {
                    decisions.insert(key.clone(), why.clone());
                }
                None => {
                    decisions.remove(key);
                }
            }
        }
        match &plan.job {
            JobAction::Nothing => {}
            JobAction::Stop => {
                if let Some(id) = &job_id {
                    self.stop_job(id, false).await.map_err(|e| e.to_string())?;
                }
            }
            JobAction::Apply { spec, rerun } => {
                let how = crate::ops::ApplyOptions {
                    idempotency_key: None,
                    rerun: *rerun,
                };
                self.apply_job(vertex.project.clone(), (**spec).clone(), how)
                    .await
                    .map_err(|e| format!("applying job {}: {e}", spec.name))?;
            }
        }
        let mut state = self.state.lock().await;
        let state = &mut *state;
        // Written only over the vertex this round read: the pipeline controller may
        // have written a new spec meanwhile, and its word wins.
        let Some(cur) = state.vertices.get(key) else {
            return Ok(());
        };
        if cur.spec != vertex.spec {
            return Ok(());
        }
        let mut next = cur.clone();
        next.spec.replicas = plan.replicas;
        next.status = plan.status;
        if &next != cur {
            let mut tx = Tx::default();
            tx.put(state, Change::Vertex(next));
            self.commit(state, tx).await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// What the autoscaler needs of a vertex: its input backlog, the rate one replica
    /// processes at (unknown until the replicas report counts), and an output buffer at
    /// its usage limit.
    async fn scale_observation(&self, v: &Vertex, key: &VertexKey, running: u32) -> Observation {
        let backend = self.buffers.backend(v.spec.buffer.backend);
        let config = buffer_config(&v.spec.buffer);
        let inputs: Vec<BufferName> = (0..v.spec.inputs.len() as u32)
            .filter_map(|p| {
                BufferName::new(v.project.as_str(), &v.spec.pipeline, &v.spec.name, p).ok()
            })
            .collect();
        let outputs: Vec<BufferName> = v
            .spec
            .outputs
            .iter()
            .flat_map(|o| {
                (0..o.buffers.len() as u32).filter_map(|p| {
                    BufferName::new(v.project.as_str(), &v.spec.pipeline, &o.to, p).ok()
                })
            })
            .collect();
        let inputs_read = read_levels(&backend, &inputs, &config).await;
        // A source reads no buffer: its backlog is unknown, and the autoscaler holds.
        let pending = if inputs.is_empty() || inputs_read.values().any(|s| s.is_err()) {
            None
        } else {
            Some(inputs_read.values().flatten().map(|s| s.pending).sum())
        };
        let unacked = inputs_read.values().flatten().map(|s| s.unacked).sum();
        // A downstream buffer at its limit now, or else (when the vertex's writes were
        // refused lately) the fullest one.
        let levels = read_levels(&backend, &outputs, &config).await;
        let usage = |s: &Result<drover_buffer::BufferStats, _>| s.as_ref().map_or(0.0, |s| s.usage);
        let pushed_back = self
            .pipes
            .rates_lock()
            .get(key)
            .is_some_and(Ring::pushed_back_lately);
        let backpressure = levels
            .iter()
            .find(|(_, s)| usage(s) >= v.spec.buffer.usage_limit)
            .or_else(|| {
                levels
                    .iter()
                    .filter(|_| pushed_back)
                    .max_by(|a, b| usage(a.1).total_cmp(&usage(b.1)))
            })
            .map(|(n, _)| n.to_string());
        let rate_per_replica = {
            let rates = self.pipes.rates_lock();
            rates
                .get(key)
                .and_then(|r| r.rates().0.m1)
                .filter(|_| running > 0)
                .map(|r| r / f64::from(running))
        };
        Observation {
            pending,
            unacked,
            rate_per_replica,
            backpressure,
        }
    }

    /// Writes messages POSTed for an http source into its output buffers.
    async fn send_messages(
        &self,
        p: &Principal,
        name: &str,
        vertex: &str,
        body: &[u8],
    ) -> ApiResult<HttpAccepted> {
        let _gate = self.pipes.gate.read().await;
        let pipeline = {
            let state = self.state.lock().await;
            let key = find_pipeline(&state, p, name)?;
            state
                .pipelines
                .get(&key)
                .cloned()
                .ok_or_else(|| ApiError::not_found(&format!("pipeline {name:?}")))?
        };
        let Some(def) = pipeline.spec.vertex(vertex) else {
            return Err(ApiError::not_found(&format!(
                "vertex {vertex:?} of pipeline {name}"
            )));
        };
        if !matches!(def.role, VertexRole::Source(SourceDef::Http(_))) {
            return Err(ApiError::new(
                ErrorCode::InvalidRequest,
                format!(
                    "vertex {vertex} of pipeline {name} is a {} vertex, not an http source; only `source: {{ http: {{}} }}` takes messages",
                    def.role.kind()
                ),
            ));
        }
        if pipeline.deleting()
            || pipeline.status.phase != PipelinePhase::Running
            || pipeline.spec.lifecycle.desired_phase != DesiredPhase::Running
        {
            return Err(ApiError::new(
                ErrorCode::InUse,
                format!(
                    "pipeline {name} is {} (desired {}); its sources take no messages until it runs",
                    phase_word(pipeline.status.phase),
                    pipeline.spec.lifecycle.desired_phase
                ),
            ));
        }
        if body.len() > MAX_HTTP_BODY {
            return Err(ApiError::new(
                ErrorCode::TooLarge,
                format!(
                    "the body is {} bytes; at most {MAX_HTTP_BODY} are taken",
                    body.len()
                ),
            ));
        }
        let req: HttpMessages = serde_json::from_slice(body).map_err(|e| {
            ApiError::new(
                ErrorCode::InvalidRequest,
                format!("body: {e}; expected {{\"messages\": [{{\"key\": \"...\", \"data\": \"...\"}}]}}"),
            )
        })?;
        if req.messages.is_empty() || req.messages.len() > MAX_HTTP_MESSAGES {
            return Err(ApiError::new(
                ErrorCode::InvalidRequest,
                format!(
                    "messages: expected 1 to {MAX_HTTP_MESSAGES}, got {}",
                    req.messages.len()
                ),
            ));
        }
        let backend = self
            .buffers
            .backend(pipeline.spec.buffer.backend)
            .map_err(|e| ApiError::new(ErrorCode::BufferUnavailable, e))?;
        let config = buffer_config(&pipeline.spec.buffer);
        let now = self.now();
        let messages: Vec<Message> = req
            .messages
            .iter()
            .map(|m| Message {
                id: MessageId(rand::random()),
                key: Bytes::copy_from_slice(m.key.as_bytes()),
                event_time: now,
                payload: Bytes::copy_from_slice(m.data.as_bytes()),
            })
            .collect();
        let mut written = 0u64;
        for edge in pipeline.spec.edges.iter().filter(|e| e.from == vertex) {
            let Some(to) = pipeline.spec.vertex(&edge.to) else {
                continue;
            };
            let parts = to.partitions().max(1);
            let mut batches: BTreeMap<u32, Vec<Message>> = BTreeMap::new();
            for (i, m) in messages.iter().enumerate() {
                let part = if m.key.is_empty() {
                    (i as u32) % parts
                } else {
                    (fnv(&m.key) % u64::from(parts)) as u32
                };
                batches.entry(part).or_default().push(m.clone());
            }
            for (part, batch) in batches {
                let bname =
                    BufferName::new(pipeline.project.as_str(), &pipeline.name, &to.name, part)
                        .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
                let buffer = backend.open(&bname, &config).await.map_err(buffer_error)?;
                let done = buffer.append(&batch).await.map_err(buffer_error)?;
                written += done.written as u64;
            }
        }
        Ok(HttpAccepted {
            ids: messages.iter().map(|m| m.id.to_string()).collect(),
            written,
        })
    }

    /// `drover pipeline status`: the pipeline, each vertex and each input buffer.
    async fn pipeline_view(&self, p: &Principal, name: &str) -> ApiResult<PipelineView> {
        let (pipeline, mut vertices) = {
            let state = self.state.lock().await;
            let key = find_pipeline(&state, p, name)?;
            let Some(pl) = state.pipelines.get(&key).cloned() else {
                return Err(ApiError::not_found(&format!("pipeline {name:?}")));
            };
            let rates = self.pipes.rates_lock();
            let decisions = self.pipes.decisions_lock();
            let mut views = Vec::new();
            for def in &pl.spec.vertices {
                let vkey = (pl.project.clone(), pl.name.clone(), def.name.clone());
                let v = state.vertices.get(&vkey);
                let (_, running) = live_tasks(&state, &pl.project, &job_name(&pl.name, &def.name));
                let (rate_in, rate_out) = rates.get(&vkey).map(|r| r.rates()).unwrap_or_default();
                views.push(VertexView {
                    name: def.name.clone(),
                    kind: role_kind(&def.role),
                    desired_phase: v
                        .map_or(DesiredPhase::Running, |v| v.spec.lifecycle.desired_phase),
                    desired_replicas: v.map_or(0, |v| {
                        if v.spec.job_spec().is_some() {
                            desired_replicas(&v.spec)
                        } else {
                            0
                        }
                    }),
                    running_replicas: running,
                    rate_in,
                    rate_out,
                    last_scale: v.and_then(|v| v.status.last_scale.clone()),
                    scale_decision: decisions.get(&vkey).cloned(),
                    buffers: Vec::new(),
                });
            }
            (pl, views)
        };
        let _gate = self.pipes.gate.read().await;
        let key = (pipeline.project.clone(), pipeline.name.clone());
        if !self.state.lock().await.pipelines.contains_key(&key) {
            return Err(ApiError::not_found(&format!("pipeline {name:?}")));
        }
        let backend = self.buffers.backend(pipeline.spec.buffer.backend);
        let config = buffer_config(&pipeline.spec.buffer);
        let all = buffers_of(&pipeline.project, &pipeline.spec);
        let names: Vec<BufferName> = all.iter().map(|(_, n)| n.clone()).collect();
        let levels = read_levels(&backend, &names, &config).await;
        for (vname, bname) in all {
            let view = match levels.get(&bname) {
                None => BufferView {
                    name: bname.to_string(),
                    exists: false,
                    pending: Some(0),
                    unacked: Some(0),
                    usage: Some(0.0),
                    error: None,
                },
                Some(Ok(s)) => BufferView {
                    name: bname.to_string(),
                    exists: true,
                    pending: Some(s.pending),
                    unacked: Some(s.unacked),
                    usage: Some(s.usage),
                    error: None,
                },
                Some(Err(e)) => BufferView {
                    name: bname.to_string(),
                    exists: true,
                    pending: None,
                    unacked: None,
                    usage: None,
                    error: Some(e.clone()),
                },
            };
            if let Some(v) = vertices.iter_mut().find(|v| v.name == vname) {
                v.buffers.push(view);
            }
        }
        Ok(PipelineView { pipeline, vertices })
    }
}

/// A 64-bit FNV-1a hash: the partition of a keyed message, the same for every write.
fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn phase_word(p: PipelinePhase) -> &'static str {
    match p {
        PipelinePhase::Running => "running",
        PipelinePhase::Pausing => "pausing",
        PipelinePhase::Paused => "paused",
        PipelinePhase::Deleting => "deleting",
        PipelinePhase::Failed => "failed",
    }
}

/// `source/generator`, `map/run`, `sink/log`.
fn role_kind(role: &VertexRole) -> String {
    use drover_core::pipeline::{MapDef, SinkDef};
    let what = match role {
        VertexRole::Source(SourceDef::Generator(_)) => "generator",
        VertexRole::Source(SourceDef::Http(_)) => "http",
        VertexRole::Sink(SinkDef::Log(_)) => "log",
        VertexRole::Sink(SinkDef::Blackhole(_)) => "blackhole",
        VertexRole::Source(SourceDef::Run(_))
        | VertexRole::Map(MapDef::Run(_))
        | VertexRole::Sink(SinkDef::Run(_)) => "run",
    };
    format!("{}/{what}", role.kind())
}

fn buffer_error(e: BufferError) -> ApiError {
    match e {
        BufferError::Full { .. } => ApiError::new(ErrorCode::BufferFull, e.to_string()),
        BufferError::Invalid(m) => ApiError::new(ErrorCode::InvalidRequest, m),
        other => ApiError::new(ErrorCode::BufferUnavailable, other.to_string()),
    }
}

/// Refuses a pipeline one of whose vertices' jobs (`PIPELINE-VERTEX`) would take the
/// name of a job that is not that vertex's: a user's job, or another pipeline's vertex
/// (pipeline `a` with vertex `b-c` and pipeline `a-b` with vertex `c` are both `a-b-c`).
fn name_clash(state: &CtlState, project: &ProjectId, spec: &PipelineSpec) -> ApiResult<()> {
    for (i, v) in spec.vertices.iter().enumerate() {
        let job = job_name(&spec.name, &v.name);
        let clash = match state.job_by_name(project, &job) {
            Some(j) => match &j.spec.vertex {
                None => Some(format!("job {job} exists and is not a pipeline's")),
                Some(plane) if plane.pipeline != spec.name => Some(format!(
                    "job {job} runs vertex {} of pipeline {}",
                    plane.vertex, plane.pipeline
                )),
                Some(_) => None,
            },
            None => state
                .vertices
                .values()
                .find(|o| {
                    &o.project == project
                        && o.spec.pipeline != spec.name
                        && o.spec.job_name() == job
                })
                .map(|o| {
                    format!(
                        "vertex {} of pipeline {} has the job name {job} too",
                        o.spec.name, o.spec.pipeline
                    )
                }),
        };
        if let Some(why) = clash {
            return Err(ApiError::new(
                ErrorCode::InUse,
                format!(
                    "vertices[{i}].name: its job would be named {job}, but {why}; rename the vertex or the pipeline"
                ),
            ));
        }
    }
    Ok(())
}

/// The replicas running now over a pipeline's vertices.
fn pipeline_running(state: &CtlState, p: &Pipeline) -> u32 {
    p.spec
        .vertices
        .iter()
        .map(|v| live_tasks(state, &p.project, &job_name(&p.name, &v.name)).1)
        .sum()
}

/// Finds a pipeline the caller may see: its own project's first, then the one other
/// project that has it; a name several other projects have is ambiguous.
fn find_pipeline(state: &CtlState, p: &Principal, name: &str) -> ApiResult<(ProjectId, String)> {
    let own = (p.project.clone(), name.to_string());
    if state.pipelines.contains_key(&own) {
        return Ok(own);
    }
    let found: Vec<&(ProjectId, String)> = state
        .pipelines
        .keys()
        .filter(|(proj, n)| n == name && p.sees(proj))
        .collect();
    match found.as_slice() {
        [] => Err(ApiError::not_found(&format!("pipeline {name:?}"))),
        [only] => Ok((*only).clone()),
        several => {
            let projects: Vec<String> = several.iter().map(|(p, _)| p.to_string()).collect();
            Err(ApiError::new(
                ErrorCode::Ambiguous,
                format!(
                    "pipeline {name:?} exists in projects {}; say which with --project",
                    projects.join(", ")
                ),
            ))
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Requested {
    Pause,
    Resume { slow: bool },
    Delete,
}

/// The pipeline and vertex controllers' loop: a round on every wake-up from the API
/// and every [`TICK`], until shutdown.
pub(crate) async fn run(inner: Arc<Inner>) {
    loop {
        tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            _ = inner.pipes.wake.notified() => {}
            _ = tokio::time::sleep(TICK) => {}
        }
        inner.pipelines_pass().await;
        inner.vertices_pass().await;
    }
}

pub(crate) async fn apply(
    State(inner): Shared,
    Extension(p): Extension<Principal>,
    body: Bytes,
) -> ApiResult<Response> {
    p.require(Action::Write)?;
    let spec = PipelineSpec::from_json(&body).map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidSpec,
            format!("invalid pipeline spec: {e}"),
        )
    })?;
    let (applied, created) = inner.apply_pipeline(p.project.clone(), spec).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(applied)).into_response())
}

pub(crate) async fn list(
    State(inner): Shared,
    Extension(p): Extension<Principal>,
) -> ApiResult<Json<Vec<PipelineSummary>>> {
    p.require(Action::Read)?;
    let state = inner.state.lock().await;
    let out = state
        .pipelines
        .values()
        .filter(|pl| p.sees(&pl.project))
        .map(|pl| PipelineSummary::of(pl, pipeline_running(&state, pl)))
        .collect();
    Ok(Json(out))
}

pub(crate) async fn get(
    State(inner): Shared,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<PipelineView>> {
    p.require(Action::Read)?;
    Ok(Json(inner.pipeline_view(&p, &name).await?))
}

pub(crate) async fn delete(
    State(inner): Shared,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<PipelineSummary>> {
    p.require(Action::Write)?;
    Ok(Json(
        inner.request_pipeline(&p, &name, Requested::Delete).await?,
    ))
}

pub(crate) async fn pause(
    State(inner): Shared,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<PipelineSummary>> {
    p.require(Action::Write)?;
    Ok(Json(
        inner.request_pipeline(&p, &name, Requested::Pause).await?,
    ))
}

/// `POST .../resume` query: `slow=true` starts every vertex at its `scale.min`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ResumeQuery {
    #[serde(default)]
    slow: bool,
}

pub(crate) async fn resume(
    State(inner): Shared,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    query: Result<axum::extract::Query<ResumeQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<PipelineSummary>> {
    p.require(Action::Write)?;
    let axum::extract::Query(q) = query.map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidRequest,
            format!(
                "query: {}; the only parameter is slow=true|false",
                e.body_text()
            ),
        )
    })?;
    Ok(Json(
        inner
            .request_pipeline(&p, &name, Requested::Resume { slow: q.slow })
            .await?,
    ))
}

pub(crate) async fn send(
    State(inner): Shared,
    Extension(p): Extension<Principal>,
    Path((name, vertex)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<HttpAccepted>> {
    p.require(Action::Write)?;
    Ok(Json(inner.send_messages(&p, &name, &vertex, &body).await?))
}
