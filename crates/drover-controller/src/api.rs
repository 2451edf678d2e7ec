//! The HTTP API. Every route needs a bearer token except `/health` and the agent
//! connect route, which takes a join token instead.

use crate::auth::{Action, Principal};
use crate::error::{ApiError, ApiResult};
use crate::follow::{self, Target};
use crate::{Inner, artifacts, pipelines, tenants};
use axum::extract::{Path, Query, State, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use drover_core::api::ErrorCode;
use drover_core::api::{Health, JobView, NodeEnvView, NodeView, TaskView};
use drover_core::protocol::{AGENT_CONNECT_PATH, JOIN_TOKEN_HEADER};
use drover_core::state::Task;
use drover_core::{JobSpec, NodeId, TaskId};

use serde::Deserialize;
use std::sync::Arc;

type Shared = State<Arc<Inner>>;

/// Declares the authenticated routes once, giving both the router and [`ROUTES`], the
/// list the isolation tests walk: a route added here without a test case fails them.
macro_rules! authed_routes {
    ($( $path:literal => { $( $method:ident $handler:path ),+ $(,)? } )*) => {
        /// Every route that needs a token, as (method, path pattern).
        pub const ROUTES: &[(&str, &str)] = &[
            $( $( (method_name!($method), $path) ),+ ),*
        ];

        fn authed_router() -> Router<Arc<Inner>> {
            Router::new()
                $( .route($path, axum::routing::MethodRouter::new() $( .$method($handler) )+ ) )*
        }
    };
}

macro_rules! method_name {
    (get) => {
        "GET"
    };
    (post) => {
        "POST"
    };
    (put) => {
        "PUT"
    };
    (head) => {
        "HEAD"
    };
    (delete) => {
        "DELETE"
    };
}

authed_routes! {
    "/v1/jobs" => { post apply_job, get list_jobs }
    "/v1/plan" => { post plan_job }
    "/v1/jobs/{name}" => { get get_job, delete delete_job }
    "/v1/jobs/{name}/stop" => { post stop_job }
    "/v1/jobs/{name}/versions" => { get job_versions }
    "/v1/jobs/{name}/logs" => { get job_logs }
    "/v1/tasks" => { get list_tasks }
    "/v1/tasks/{id}" => { get get_task }
    "/v1/tasks/{id}/logs" => { get task_logs }
    "/v1/nodes" => { get list_nodes }
    "/v1/nodes/{node}" => { delete remove_node }
    "/v1/envs" => { get list_envs }
    "/v1/envs/prune" => { post prune_envs }
    "/v1/blobs/{digest}" => {
        put artifacts::put_blob,
        head artifacts::head_blob,
        get artifacts::get_blob,
    }
    "/v1/artifacts" => { post artifacts::create_artifact, get artifacts::list_artifacts }
    "/v1/artifacts/{name}/{version}" => {
        get artifacts::get_artifact,
        delete artifacts::delete_artifact,
    }
    "/v1/projects" => { post tenants::create_project, get tenants::list_projects }
    "/v1/tokens" => { post tenants::create_token, get tenants::list_tokens }
    "/v1/tokens/{id}/revoke" => { post tenants::revoke_token }
    "/v1/pipelines" => { post pipelines::apply, get pipelines::list }
    "/v1/pipelines/{name}" => { get pipelines::get, delete pipelines::delete }
    "/v1/pipelines/{name}/pause" => { post pipelines::pause }
    "/v1/pipelines/{name}/resume" => { post pipelines::resume }
    "/v1/pipelines/{name}/vertices/{vertex}/messages" => { post pipelines::send }
    "/metrics" => { get metrics }
}

pub(crate) fn router(inner: Arc<Inner>) -> Router {
    let authed = authed_router().layer(middleware::from_fn_with_state(
        inner.clone(),
        crate::auth::authenticate,
    ));
    Router::new()
        .route("/health", get(health))
        .route(AGENT_CONNECT_PATH, get(agent_connect))
        .merge(authed)
        .fallback(|| async { ApiError::new(ErrorCode::NotFound, "no such route") })
        .with_state(inner)
}

async fn health(State(inner): Shared) -> Json<Health> {
    let ready = inner.state.lock().await.ready_nodes() as u32;
    Json(Health {
        status: "ok".into(),
        version: drover_core::VERSION.into(),
        commit: inner.cfg.commit.clone(),
        nodes_ready: ready,
    })
}

async fn metrics(State(inner): Shared, Extension(p): Extension<Principal>) -> ApiResult<Response> {
    // The counts cover every project, so they are the cluster admin's.
    p.require(Action::Cluster)?;
    {
        let state = inner.state.lock().await;
        let mut counts = std::collections::HashMap::new();
        for t in state.tasks.values() {
            *counts.entry(t.state).or_insert(0i64) += 1;
        }
        for s in drover_core::TaskState::ALL {
            inner
                .metrics
                .tasks
                .get_or_create(&crate::metrics::StateLabel {
                    state: s.as_str().into(),
                })
                .set(counts.get(&s).copied().unwrap_or(0));
        }
        inner.metrics.nodes_ready.set(state.ready_nodes() as i64);
    }
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        inner.metrics.encode(),
    )
        .into_response())
}

#[derive(serde::Deserialize)]
struct EnvQuery {
    /// A node's name or id; every node when absent.
    node: Option<String>,
}

/// The nodes `node` (a name or an id) names, or every node; an unknown one is an error.
async fn nodes_named(inner: &Inner, node: Option<&str>) -> ApiResult<Vec<(NodeId, String)>> {
    let state = inner.state.lock().await;
    let all: Vec<(NodeId, String)> = state
        .nodes
        .values()
        .map(|n| (n.node.id.clone(), n.node.info.name.clone()))
        .collect();
    match node {
        None => Ok(all),
        Some(want) => {
            let found: Vec<_> = all
                .into_iter()
                .filter(|(id, name)| id.as_str() == want || name == want)
                .collect();
            if found.is_empty() {
                return Err(ApiError::not_found(&format!("node {want:?}")));
            }
            Ok(found)
        }
    }
}

async fn list_envs(
    State(inner): Shared,
    Extension(p): Extension<Principal>,
    Query(q): Query<EnvQuery>,
) -> ApiResult<Json<Vec<NodeEnvView>>> {
    p.require(Action::Cluster)?;
    let nodes = nodes_named(&inner, q.node.as_deref()).await?;
    let envs = inner.node_envs.lock().unwrap_or_else(|e| e.into_inner());
    let mut out = Vec::new();
    for (id, name) in nodes {
        for env in envs.get(&id).into_iter().flatten() {
            out.push(NodeEnvView {
                node_id: id.clone(),
                node_name: name.clone(),
                kind: "python".into(),
                env: env.clone(),
            });
        }
    }
    out.sort_by(|a, b| (&a.node_name, &a.env.key).cmp(&(&b.node_name, &b.env.key)));
    Ok(Json(out))
}

/// Asks nodes to remove the environments no running task uses. It answers once the
/// request is queued for each node; the listing shows the result after the nodes'
/// next heartbeat.
async fn prune_envs(
    State(inner): Shared,
    Extension(p): Extension<Principal>,
    Query(q): Query<EnvQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    p.require(Action::Cluster)?;
    let nodes = nodes_named(&inner, q.node.as_deref()).await?;
    let mut state = inner.state.lock().await;
    for (id, _) in &nodes {
        inner.enqueue(&mut state, id, drover_core::protocol::Command::PruneEnvs);
    }
    inner.flush_all(&mut state);
    let names: Vec<&str> = nodes.iter().map(|(_, n)| n.as_str()).collect();
    Ok(Json(serde_json::json!({ "nodes": names })))
}

/// `POST /v1/jobs` query: `rerun=true` runs an unchanged spec again once its job has
/// finished.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApplyQuery {
    #[serde(default)]
    rerun: bool,
}

async fn apply_job(
    State(inner): Shared,
    Extension(p): Extension<Principal>,
    headers: HeaderMap,
    query: Result<Query<ApplyQuery>, axum::extract::rejection::QueryRejection>,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    p.require(Action::Write)?;
    tracing::debug!("apply request");
    let Query(query) = apply_query(query)?;
    let idempotency_key = match headers.get(drover_core::api::IDEMPOTENCY_KEY_HEADER) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| "not text".to_string())
                .and_then(drover_core::api::parse_idempotency_key)
                .map_err(|e| ApiError::new(ErrorCode::InvalidRequest, e))?,
        ),
    };
    let spec = user_job_spec(&body)?;
    // Shared with other submissions, exclusive of blob collection: the working_dir
    // archive found below stays until the job naming it is stored. Only a job with one
    // takes it, so plain submissions never wait for a collection.
    let mut _gc = None;
    if spec.runtime_env.working_dir.is_some() || spec.stdin.is_some() {
        _gc = Some(inner.blobs.gc_lock.read().await);
    }
    if let Some(w) = &spec.runtime_env.working_dir {
        let digest = working_dir_digest(w)?;
        let size = inner.usable_blob_size(&p, &digest).await.map_err(|e| {
            ApiError::new(ErrorCode::Internal, format!("reading blob {digest}: {e}"))
        })?;
        if size.is_none() {
            return Err(ApiError::new(
                ErrorCode::MissingBlob,
                format!(
                    "invalid job spec: runtime_env.working_dir: blob {digest} has not been uploaded (PUT /v1/blobs/{digest})"
                ),
            ));
        }
    }
    if let Some(input) = &spec.stdin {
        let digest = &input.blob;
        let size = inner.usable_blob_size(&p, digest).await.map_err(|e| {
            ApiError::new(ErrorCode::Internal, format!("reading blob {digest}: {e}"))
        })?;
        match size {
            None => {
                return Err(ApiError::new(
                    ErrorCode::MissingBlob,
                    format!(
                        "invalid job spec: stdin.blob: blob {digest} has not been uploaded (PUT /v1/blobs/{digest})"
                    ),
                ));
            }
            // The agent's download is held to the declared size, so a wrong one would
            // only fail every task later; it is refused here instead.
            Some(stored) if stored != input.size => {
                return Err(ApiError::new(
                    ErrorCode::InvalidSpec,
                    format!(
                        "invalid job spec: stdin.size: blob {digest} has {stored} bytes, not {}",
                        input.size
                    ),
                ));
            }
            Some(_) => {}
        }
    }
    // A vertex's job is its pipeline's: a user's spec of the same name would replace
    // it, and the vertex controller would put it back.
    {
        let state = inner.state.lock().await;
        if let Some(plane) = state
            .job_by_name(&p.project, &spec.name)
            .and_then(|j| j.spec.vertex.as_ref())
        {
            return Err(ApiError::new(
                ErrorCode::InUse,
                format!(
                    "job {} runs vertex {} of pipeline {}; change the pipeline instead (drover pipeline apply -f FILE)",
                    spec.name, plane.vertex, plane.pipeline
                ),
            ));
        }
    }
    let how = crate::ops::ApplyOptions {
        idempotency_key,
        rerun: query.rerun,
    };
    let res = inner
        .apply_job(p.project.clone(), spec, how)
        .await
        .map_err(|e| match e {
            crate::ops::ApplyError::Store(e) => ApiError::from(e),
            crate::ops::ApplyError::KeyReused(m) => {
                ApiError::new(ErrorCode::IdempotencyKeyReused, m)
            }
        })?;
    let status = if res.result == "created" {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(res)).into_response())
}

/// A job spec as a user may submit it: valid, and without the `vertex` plane, which
/// only the vertex controller sets (it applies vertex jobs directly, not through the
/// API), so no user job can reach a pipeline's buffers.
fn user_job_spec(body: &[u8]) -> ApiResult<JobSpec> {
    let spec = JobSpec::from_json(body)
        .map_err(|e| ApiError::new(ErrorCode::InvalidSpec, format!("invalid job spec: {e}")))?;
    if spec.vertex.is_some() {
        return Err(ApiError::new(
            ErrorCode::InvalidSpec,
            "invalid job spec: vertex: set by the pipeline controller; submit a pipeline instead (drover pipeline apply -f FILE)",
        ));
    }
    Ok(spec)
}

/// Reads apply's query (and the plan's, which takes the same), naming the one
/// parameter there is when it is wrong.
fn apply_query(
    query: Result<Query<ApplyQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Query<ApplyQuery>> {
    query.map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidRequest,
            format!(
                "query: {}; the only parameter is rerun=true|false",
                e.body_text()
            ),
        )
    })
}

/// The digest a spec's `runtime_env.working_dir` must hold in the API.
fn working_dir_digest(w: &str) -> ApiResult<drover_core::artifact::Digest> {
    w.parse().map_err(|_| {
        ApiError::new(ErrorCode::InvalidSpec,
            format!(
                "invalid job spec: runtime_env.working_dir: expected the digest of an uploaded archive (sha256:<64 hex digits>), got {w:?}; the CLI packs and uploads a local directory for you (drover job apply -f FILE)"
            ),
        )
    })
}

/// What `POST /v1/jobs` would do with the same request, changing nothing: the same
/// permission and project, the same spec checks, but a working_dir blob that is not
/// uploaded yet is reported rather than refused (the CLI uploads it only when it
/// applies), and an idempotency key is neither looked up nor used.
async fn plan_job(
    State(inner): Shared,
    Extension(p): Extension<Principal>,
    query: Result<Query<ApplyQuery>, axum::extract::rejection::QueryRejection>,
    body: axum::body::Bytes,
) -> ApiResult<Json<drover_core::api::PlanResponse>> {
    p.require(Action::Write)?;
    let Query(query) = apply_query(query)?;
    let spec = user_job_spec(&body)?;
    let missing_blob = match &spec.runtime_env.working_dir {
        None => None,
        Some(w) => {
            let digest = working_dir_digest(w)?;
            let size = inner.usable_blob_size(&p, &digest).await.map_err(|e| {
                ApiError::new(ErrorCode::Internal, format!("reading blob {digest}: {e}"))
            })?;
            size.is_none().then(|| digest.to_string())
        }
    };
    let plan = inner
        .plan_job(p.project.clone(), spec, query.rerun, missing_blob)
        .await;
    Ok(Json(plan))
}

async fn list_jobs(
    State(inner): Shared,
    Extension(p): Extension<Principal>,
) -> ApiResult<Json<Vec<JobView>>> {
    p.require(Action::Read)?;
    let state = inner.state.lock().await;
    let mut jobs: Vec<JobView> = state
        .current
        .values()
        .filter_map(|id| state.jobs.get(id))
        .filter(|j| p.sees(&j.project))
        .map(|j| state.job_view(j))
        .collect();
    jobs.sort_by(|a, b| a.job.name.cmp(&b.job.name));
    Ok(Json(jobs))
}

/// Finds the current version of a job the caller may see.
async fn find_job(inner: &Inner, p: &Principal, name: &str) -> ApiResult<JobView> {
    let state = inner.state.lock().await;
    let found: Vec<&drover_core::state::Job> = state
        .current
        .iter()
        .filter(|((proj, n), _)| n == name && p.sees(proj))
        .filter_map(|(_, id)| state.jobs.get(id))
        .collect();
    // An admin who sees several projects gets its own project's job; a name only other
    // projects have, more than one of them, is ambiguous rather than a guess.
    let job = match found.iter().find(|j| j.project == p.project) {
        Some(own) => *own,
        None => match found.as_slice() {
            [] => return Err(ApiError::not_found(&format!("job \"{name}\""))),
            [only] => *only,
            several => {
                let mut projects: Vec<String> =
                    several.iter().map(|j| j.project.to_string()).collect();
                projects.sort();
                return Err(ApiError::new(
                    ErrorCode::Ambiguous,
                    format!(
                        "job \"{name}\" exists in projects {}; say which with --project",
                        projects.join(", ")
                    ),
                ));
            }
        },
    };
    Ok(state.job_view(job))
}

async fn get_job(
    State(inner): Shared,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<JobView>> {
    p.require(Action::Read)?;
    Ok(Json(find_job(&inner, &p, &name).await?))
}

/// Every version of a job the controller still keeps, newest first: its spec, when it
/// was made and how it ended (`drover job history`).
async fn job_versions(
    State(inner): Shared,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<Vec<JobView>>> {
    p.require(Action::Read)?;
    let current = find_job(&inner, &p, &name).await?;
    let state = inner.state.lock().await;
    let mut versions: Vec<JobView> = state
        .jobs
        .values()
        .filter(|j| j.project == current.job.project && j.name == current.job.name)
        .map(|j| state.job_view(j))
        .collect();
    versions.sort_by_key(|v| std::cmp::Reverse(v.job.version));
    Ok(Json(versions))
}

async fn stop_job(
    State(inner): Shared,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    Query(q): Query<std::collections::BTreeMap<String, String>>,
) -> ApiResult<Json<JobView>> {
    p.require(Action::Write)?;
    let force = force_param(&q)?;
    let view = find_job(&inner, &p, &name).await?;
    inner.stop_job(&view.job.id, force).await?;
    Ok(Json(find_job(&inner, &p, &name).await?))
}

async fn delete_job(
    State(inner): Shared,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Json<drover_core::api::RemovedJob>> {
    p.require(Action::Write)?;
    let view = find_job(&inner, &p, &name).await?;
    let released = {
        let state = inner.state.lock().await;
        crate::artifacts::inputs_of(&state, &view.job.project, &view.job.name)
    };
    let removed = inner.remove_job(&view.job).await?;
    // A job's input is stored for that job alone (unless another names the same
    // bytes), so it goes with it rather than waiting for the next collection. The
    // removal is committed; a failure to collect only leaves the files for the next
    // collection, so it is logged rather than returned.
    if !released.is_empty()
        && let Err(e) = inner.collect_blobs(&released).await
    {
        tracing::warn!("collecting the removed job's input: {e}");
    }
    Ok(Json(removed))
}

/// Reads `?force=true` (kill at once) or `?force=false` from a stop request. Anything
/// else is refused, naming the parameter, so that a typo cannot quietly turn a forced
/// stop into a graceful one.
fn force_param(q: &std::collections::BTreeMap<String, String>) -> ApiResult<bool> {
    let bad = |m: String| ApiError::new(ErrorCode::InvalidRequest, m);
    if let Some(k) = q.keys().find(|k| *k != "force") {
        return Err(bad(format!(
            "query parameter {k:?}: unknown; a stop takes only force=true or force=false"
        )));
    }
    match q.get("force").map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(bad(format!("force: expected true or false, got {other:?}"))),
    }
}

#[derive(Deserialize)]
struct FollowQuery {
    #[serde(default)]
    follow: bool,
    /// `output` (stdout and stderr, the default), `prepare` (what the agent wrote while
    /// preparing the task) or `all`.
    #[serde(default)]
    logs: LogsWanted,
    /// Start at each stream's last this many lines.
    tail: Option<u64>,
    /// Start at the first line read at or after this: a duration before now (by this
    /// server's clock) or an RFC 3339 time.
    since: Option<String>,
    /// Give each log event the time its bytes were read.
    #[serde(default)]
    timestamps: bool,
}

impl FollowQuery {
    /// The query as typed options, or an error naming the parameter that is wrong.
    /// Older clients send none of `since` and `timestamps`, and get what they always did.
    fn options(
        query: Result<Query<FollowQuery>, axum::extract::rejection::QueryRejection>,
    ) -> ApiResult<follow::StreamOptions> {
        let bad = |m: String| ApiError::new(ErrorCode::InvalidRequest, m);
        let Query(q) = query.map_err(|e| {
            bad(format!(
                "query: {}; the parameters are follow, logs, tail, since and timestamps",
                e.body_text()
            ))
        })?;
        let since = match q.since.as_deref() {
            None => None,
            Some(text) => {
                let since: drover_core::logtime::Since = text
                    .parse()
                    .map_err(|e: String| bad(format!("since: {e}")))?;
                Some(since.resolve(drover_core::now_millis()))
            }
        };
        Ok(follow::StreamOptions {
            follow: q.follow,
            streams: q.logs.streams(),
            tail: q.tail,
            since,
            timestamps: q.timestamps,
        })
    }
}

#[derive(Clone, Copy, Debug, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
enum LogsWanted {
    #[default]
    Output,
    Prepare,
    All,
}

impl LogsWanted {
    fn streams(self) -> &'static [drover_core::protocol::LogStream] {
        match self {
            LogsWanted::Output => follow::OUTPUT,
            LogsWanted::Prepare => follow::PREPARE,
            LogsWanted::All => follow::ALL,
        }
    }
}

fn ndjson(body: axum::body::Body) -> Response {
    ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
}

async fn job_logs(
    State(inner): Shared,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    query: Result<Query<FollowQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    p.require(Action::Read)?;
    let opts = FollowQuery::options(query)?;
    let view = find_job(&inner, &p, &name).await?;
    Ok(ndjson(follow::stream(
        inner.clone(),
        Target::Job(view.job.id),
        opts,
    )))
}

async fn find_task(inner: &Inner, p: &Principal, id: &str) -> ApiResult<TaskView> {
    // How many candidates an ambiguous prefix's error lists; the rest are counted.
    const LISTED: usize = 5;
    let state = inner.state.lock().await;
    // A unique prefix is enough, as with container ids, and the `task-` in front may be
    // left out.
    let wanted = if id.starts_with("task-") {
        id.to_string()
    } else {
        format!("task-{id}")
    };
    let mut found: Vec<&Task> = state
        .tasks
        .values()
        .filter(|t| p.sees(&t.project) && t.id.as_str().starts_with(&wanted))
        .collect();
    if let Some(exact) = found.iter().find(|t| t.id.as_str() == wanted) {
        return Ok(state.task_view(exact));
    }
    match found.len() {
        0 => Err(ApiError::not_found(&format!("task {id:?}"))),
        1 => Ok(state.task_view(found[0])),
        n => {
            found.sort_by_key(|t| (t.created_at, t.id.as_str()));
            let mut names: Vec<String> = found
                .iter()
                .take(LISTED)
                .map(|t| format!("{} ({}/{})", t.id, t.job_name, t.index))
                .collect();
            if n > LISTED {
                names.push(format!("and {} more", n - LISTED));
            }
            Err(ApiError::new(
                ErrorCode::Ambiguous,
                format!(
                    "task id prefix {id:?} matches {n} tasks: {}; give more of the id",
                    names.join(", ")
                ),
            ))
        }
    }
}

async fn get_task(
    State(inner): Shared,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<Json<TaskView>> {
    p.require(Action::Read)?;
    Ok(Json(find_task(&inner, &p, &id).await?))
}

async fn task_logs(
    State(inner): Shared,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
    query: Result<Query<FollowQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    p.require(Action::Read)?;
    let opts = FollowQuery::options(query)?;
    let t = find_task(&inner, &p, &id).await?;
    let id: TaskId = t.task.id;
    Ok(ndjson(follow::stream(
        inner.clone(),
        Target::Task(id),
        opts,
    )))
}

#[derive(Deserialize)]
struct TaskQuery {
    job: Option<String>,
    /// `all`: the tasks of every version the controller keeps, not only the current
    /// one's.
    versions: Option<String>,
    /// `true`: each task with its timeline (`drover job status`). Left out by default,
    /// since a listing of every task would carry every task's history.
    events: Option<String>,
}

async fn list_tasks(
    State(inner): Shared,
    Extension(p): Extension<Principal>,
    Query(q): Query<TaskQuery>,
) -> ApiResult<Json<Vec<TaskView>>> {
    p.require(Action::Read)?;
    let all_versions = match q.versions.as_deref() {
        None | Some("current") => false,
        Some("all") => true,
        Some(other) => {
            return Err(ApiError::new(
                ErrorCode::InvalidRequest,
                format!("versions: expected all or current, got {other:?}"),
            ));
        }
    };
    let with_events = match q.events.as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(ApiError::new(
                ErrorCode::InvalidRequest,
                format!("events: expected true or false, got {other:?}"),
            ));
        }
    };
    let job = match &q.job {
        Some(name) => Some(find_job(&inner, &p, name).await?.job),
        None => None,
    };
    let state = inner.state.lock().await;
    let view = |t: &drover_core::state::Task| {
        if with_events {
            state.task_view(t)
        } else {
            state.task_view_brief(t)
        }
    };
    // Tasks of older versions of a job are history: shown only when asked for, unless
    // they have not ended (the old tasks a rollout has not replaced yet, or ones still
    // stopping).
    let wanted = |t: &&drover_core::state::Task| {
        all_versions
            || !t.state.is_terminal()
            || state.current.get(&(t.project.clone(), t.job_name.clone())) == Some(&t.job_id)
    };
    let mut tasks: Vec<TaskView> = match &job {
        Some(j) if all_versions => state
            .tasks
            .values()
            .filter(|t| t.project == j.project && t.job_name == j.name)
            .map(view)
            .collect(),
        Some(j) => state
            .job_tasks(&j.id)
            .chain(state.older_live_tasks(j))
            .map(view)
            .collect(),
        None => state
            .tasks
            .values()
            .filter(|t| p.sees(&t.project))
            .filter(wanted)
            .map(view)
            .collect(),
    };
    tasks.sort_by(|a, b| {
        (&a.task.job_name, a.task.index, a.task.created_at).cmp(&(
            &b.task.job_name,
            b.task.index,
            b.task.created_at,
        ))
    });
    Ok(Json(tasks))
}

async fn list_nodes(
    State(inner): Shared,
    Extension(p): Extension<Principal>,
) -> ApiResult<Json<Vec<NodeView>>> {
    p.require(Action::Read)?;
    let state = inner.state.lock().await;
    // Nodes are shared by every project, so every reader sees them; the task count,
    // though, counts only the tasks the caller may see. What is allocated stays the
    // node's total, since that is what decides whether the caller's next task fits.
    let mut nodes: Vec<NodeView> = state
        .nodes
        .values()
        .map(|e| {
            let mut v = state.node_view(e);
            v.tasks = e
                .tasks
                .iter()
                .filter_map(|id| state.tasks.get(id))
                .filter(|t| p.sees(&t.project))
                .count() as u32;
            v
        })
        .collect();
    nodes.sort_by(|a, b| a.node.info.name.cmp(&b.node.info.name));
    Ok(Json(nodes))
}

/// Removes a node that is not connected: a cluster-level act, since nodes serve every
/// project.
async fn remove_node(
    State(inner): Shared,
    Extension(p): Extension<Principal>,
    Path(node): Path<String>,
) -> ApiResult<Json<NodeView>> {
    p.require(Action::Cluster)?;
    Ok(Json(inner.remove_node(&node).await?))
}

async fn agent_connect(
    State(inner): Shared,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> ApiResult<Response> {
    let secret = headers
        .get(JOIN_TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ApiError::new(ErrorCode::Unauthorized, "missing join token"))?;
    inner.check_join_token(secret)?;
    let inner = inner.clone();
    Ok(ws
        .max_message_size(16 << 20)
        // tungstenite zeroes up to this many bytes of its buffer before every read; the
        // 128 KiB default made memset the largest cost of a controller with 1,000
        // chatty agents. Messages larger than this still arrive, over several reads.
        .read_buffer_size(8 * 1024)
        .on_upgrade(move |socket| crate::gateway::serve(inner, socket)))
}
