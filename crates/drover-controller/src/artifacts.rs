//! Artifacts and their blobs over HTTP: uploading and downloading blobs by digest,
//! creating, listing, showing and deleting artifact versions, and collecting the blobs
//! no artifact needs any more.
//!
//! Blobs are stored once for the whole controller: two projects pushing the same bytes
//! share one file. Each project, though, sees only the blobs it uploaded itself or that
//! its artifacts and jobs name; to another project's blob it answers 404, and an upload
//! of bytes already stored is hashed in full before the uploader may use them. So a
//! digest tells no project what another has stored.

use crate::auth::{Action, Principal};
use crate::blobs::{PutError, Stored};
use crate::error::{ApiError, ApiResult};
use crate::{Inner, Tx};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use drover_core::ProjectId;
use drover_core::api::ErrorCode;
use drover_core::api::MAX_BLOB_SIZE_HEADER;
use drover_core::artifact::{Artifact, ArtifactRef, Digest, NewArtifact};
use drover_store::{Change, StoreError};
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

type Shared = State<Arc<Inner>>;

/// What `PUT /v1/blobs/{digest}` answers.
#[derive(Serialize)]
struct BlobInfo {
    digest: Digest,
    size: u64,
    /// False when the blob was already stored and the upload was not read.
    created: bool,
}

fn parse_digest(s: &str) -> ApiResult<Digest> {
    s.parse()
        .map_err(|e: String| ApiError::new(ErrorCode::InvalidDigest, e))
}

fn io_error(what: &str, e: std::io::Error) -> ApiError {
    tracing::error!("{what}: {e}");
    ApiError::new(ErrorCode::Internal, format!("{what}: {e}"))
}

fn blob_headers(digest: &Digest, size: u64) -> [(header::HeaderName, HeaderValue); 3] {
    [
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        ),
        (header::CONTENT_LENGTH, HeaderValue::from(size)),
        // A digest is plain ASCII, so it is always a valid header value.
        (
            header::ETAG,
            HeaderValue::from_str(&format!("\"{digest}\""))
                .unwrap_or_else(|_| HeaderValue::from_static("\"\"")),
        ),
    ]
}

/// Which projects may use each blob, from the artifacts and jobs that name them.
pub(crate) fn owners_from(state: &crate::state::State) -> HashMap<Digest, HashSet<ProjectId>> {
    let mut owners: HashMap<Digest, HashSet<ProjectId>> = HashMap::new();
    for a in state.artifacts.values() {
        for v in &a.variants {
            owners
                .entry(v.digest.clone())
                .or_default()
                .insert(a.project.clone());
        }
    }
    for j in state.jobs.values() {
        if let Some(d) = j
            .spec
            .runtime_env
            .working_dir
            .as_deref()
            .and_then(|w| w.parse::<Digest>().ok())
        {
            owners.entry(d).or_default().insert(j.project.clone());
        }
        if let Some(input) = &j.spec.stdin {
            owners
                .entry(input.blob.clone())
                .or_default()
                .insert(j.project.clone());
        }
    }
    owners
}

impl Inner {
    fn owners(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, HashSet<ProjectId>>> {
        self.blob_owners.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the caller may read or use a stored blob.
    fn may_use_blob(&self, p: &Principal, digest: &Digest) -> bool {
        p.reads_all_blobs()
            || self
                .owners()
                .get(digest)
                .is_some_and(|o| o.contains(&p.project))
    }

    /// The size of a stored blob the caller may use; `None` when it is not stored or
    /// belongs to no project the caller may see, which callers answer alike.
    pub(crate) async fn usable_blob_size(
        &self,
        p: &Principal,
        digest: &Digest,
    ) -> std::io::Result<Option<u64>> {
        if !self.may_use_blob(p, digest) {
            return Ok(None);
        }
        self.blobs.size(digest).await
    }

    fn grant_blob(&self, project: &ProjectId, digest: &Digest) {
        self.owners()
            .entry(digest.clone())
            .or_default()
            .insert(project.clone());
    }
}

pub(crate) async fn put_blob(
    State(inner): Shared,
    Extension(p): Extension<Principal>,
    Path(digest): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    p.require(Action::Write)?;
    let digest = parse_digest(&digest)?;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let stored = inner
        .blobs
        .put(&digest, declared, body.into_data_stream())
        .await
        .map_err(|e| match e {
            PutError::TooLarge { .. } => {
                ApiError::new(ErrorCode::TooLarge, format!("blob {digest}: {e}"))
            }
            PutError::Mismatch { .. } => ApiError::new(
                ErrorCode::DigestMismatch,
                format!("blob {digest}: {e}; nothing was stored"),
            ),
            PutError::Body(_) => ApiError::new(
                ErrorCode::UploadIncomplete,
                format!("blob {digest}: {e}; nothing was stored"),
            ),
            PutError::Io(e) => io_error(&format!("storing blob {digest}"), e),
        })?;
    let size = inner
        .blobs
        .size(&digest)
        .await
        .map_err(|e| io_error("reading the stored blob", e))?
        .unwrap_or(0);
    inner.grant_blob(&p.project, &digest);
    let status = match stored {
        Stored::Created => {
            tracing::debug!(%digest, size, "blob stored");
            StatusCode::CREATED
        }
        Stored::Existed => StatusCode::OK,
    };
    Ok((
        status,
        Json(BlobInfo {
            digest,
            size,
            created: stored == Stored::Created,
        }),
    )
        .into_response())
}

pub(crate) async fn head_blob(
    State(inner): Shared,
    Extension(p): Extension<Principal>,
    Path(digest): Path<String>,
) -> ApiResult<Response> {
    p.require(Action::ReadBlobs)?;
    let digest = parse_digest(&digest)?;
    let limit = (
        header::HeaderName::from_static(MAX_BLOB_SIZE_HEADER),
        HeaderValue::from(inner.blobs.max_size()),
    );
    match inner
        .usable_blob_size(&p, &digest)
        .await
        .map_err(|e| io_error("reading a blob", e))?
    {
        Some(size) => Ok(([limit], blob_headers(&digest, size), ()).into_response()),
        None => Ok((StatusCode::NOT_FOUND, [limit], ()).into_response()),
    }
}

pub(crate) async fn get_blob(
    State(inner): Shared,
    Extension(p): Extension<Principal>,
    Path(digest): Path<String>,
) -> ApiResult<Response> {
    p.require(Action::ReadBlobs)?;
    let digest = parse_digest(&digest)?;
    if !inner.may_use_blob(&p, &digest) {
        return Err(ApiError::not_found(&format!("blob {digest}")));
    }
    let Some((file, size)) = inner
        .blobs
        .open_blob(&digest)
        .await
        .map_err(|e| io_error("opening a blob", e))?
    else {
        return Err(ApiError::not_found(&format!("blob {digest}")));
    };
    let stream = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20);
    Ok((blob_headers(&digest, size), Body::from_stream(stream)).into_response())
}

pub(crate) async fn create_artifact(
    State(inner): Shared,
    Extension(p): Extension<Principal>,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    p.require(Action::Write)?;
    let new: NewArtifact = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(ErrorCode::InvalidArtifact, format!("invalid artifact: {e}")))?;
    let r = new
        .validate()
        .map_err(|e| ApiError::new(ErrorCode::InvalidArtifact, format!("invalid artifact: {e}")))?;
    let artifact = inner.create_artifact(&p, &r, new).await?;
    Ok((StatusCode::CREATED, Json(artifact)).into_response())
}

pub(crate) async fn list_artifacts(
    State(inner): Shared,
    Extension(p): Extension<Principal>,
) -> ApiResult<Json<Vec<Artifact>>> {
    p.require(Action::Read)?;
    let state = inner.state.lock().await;
    let mut list: Vec<Artifact> = state
        .artifacts
        .values()
        .filter(|a| p.sees(&a.project))
        .cloned()
        .collect();
    list.sort_by(|a, b| {
        (&a.name, a.created_at, &a.version, &a.project).cmp(&(
            &b.name,
            b.created_at,
            &b.version,
            &b.project,
        ))
    });
    Ok(Json(list))
}

/// Finds an artifact version the caller may see; an admin seeing several projects gets
/// the one in its own project first.
fn find(
    state: &crate::state::State,
    p: &Principal,
    name: &str,
    version: &str,
) -> ApiResult<Artifact> {
    state
        .artifacts
        .values()
        .filter(|a| a.name == name && a.version == version && p.sees(&a.project))
        .max_by_key(|a| a.project == p.project)
        .cloned()
        .ok_or_else(|| ApiError::not_found(&format!("artifact {name}:{version}")))
}

pub(crate) async fn get_artifact(
    State(inner): Shared,
    Extension(p): Extension<Principal>,
    Path((name, version)): Path<(String, String)>,
) -> ApiResult<Json<Artifact>> {
    p.require(Action::Read)?;
    let state = inner.state.lock().await;
    Ok(Json(find(&state, &p, &name, &version)?))
}

pub(crate) async fn delete_artifact(
    State(inner): Shared,
    Extension(p): Extension<Principal>,
    Path((name, version)): Path<(String, String)>,
) -> ApiResult<Json<Artifact>> {
    p.require(Action::Write)?;
    let artifact = inner.delete_artifact(&p, &name, &version).await?;
    let released: HashMap<Digest, SystemTime> = artifact
        .variants
        .iter()
        // The creation time is in whole milliseconds and a file's modification time is
        // finer: the extra millisecond keeps an upload finished in the same millisecond
        // as its artifact's creation counted as before it.
        .map(|v| (v.digest.clone(), millis_to_time(artifact.created_at + 1)))
        .collect();
    // The delete is committed; a failure to collect only leaves files for the next
    // collection, so it is logged rather than returned.
    if let Err(e) = inner.collect_blobs(&released).await {
        tracing::warn!("collecting unreferenced blobs: {e}");
    }
    Ok(Json(artifact))
}

/// The inputs (`stdin` blobs) of every version of a job, each with the latest creation
/// of a version naming it: what removing the job releases. A blob written after that
/// (the same input uploaded again for another run) is left for the grace period.
pub(crate) fn inputs_of(
    state: &crate::state::State,
    project: &ProjectId,
    name: &str,
) -> HashMap<Digest, SystemTime> {
    let mut released: HashMap<Digest, SystemTime> = HashMap::new();
    for j in state.jobs.values() {
        if j.project != *project || j.name != name {
            continue;
        }
        if let Some(input) = &j.spec.stdin {
            // As for an artifact's variants: the extra millisecond counts an upload in
            // the creation's own millisecond as before it.
            let at = millis_to_time(j.created_at + 1);
            let e = released.entry(input.blob.clone()).or_insert(at);
            *e = (*e).max(at);
        }
    }
    released
}

fn millis_to_time(ms: drover_core::Millis) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

impl Inner {
    /// Stores a new artifact version once every blob it names is stored with the size
    /// it claims.
    async fn create_artifact(
        &self,
        p: &Principal,
        r: &ArtifactRef,
        new: NewArtifact,
    ) -> ApiResult<Artifact> {
        let project = p.project.clone();
        // Shared with other creations, exclusive of collection: the blobs found below
        // stay until the artifact naming them is committed.
        let _gc = self.blobs.gc_lock.read().await;
        let key = (project.clone(), r.name.clone(), r.version.clone());
        // Checked before the blobs so that pushing an existing version again says so,
        // rather than whatever its blobs would say; checked again below, under the lock
        // held to the commit.
        if self.state.lock().await.artifacts.contains_key(&key) {
            return Err(exists(r));
        }
        let mut problems = Vec::new();
        for (i, v) in new.variants.iter().enumerate() {
            match self
                .usable_blob_size(p, &v.digest)
                .await
                .map_err(|e| io_error("reading a blob", e))?
            {
                None => problems.push(format!(
                    "variants[{i}] ({}): blob {} has not been uploaded (PUT /v1/blobs/{})",
                    v.platform, v.digest, v.digest
                )),
                Some(size) if size != v.size => problems.push(format!(
                    "variants[{i}] ({}): blob {} is {size} bytes, not {}",
                    v.platform, v.digest, v.size
                )),
                Some(_) => {}
            }
        }
        if !problems.is_empty() {
            return Err(ApiError::new(
                ErrorCode::MissingBlob,
                format!("artifact {r}: {}", problems.join("; ")),
            ));
        }
        let mut state = self.state.lock().await;
        if state.artifacts.contains_key(&key) {
            return Err(exists(r));
        }
        let artifact = Artifact {
            project,
            name: r.name.clone(),
            version: r.version.clone(),
            variants: new.variants,
            created_at: self.now(),
        };
        let mut tx = Tx::default();
        tx.put(&mut state, Change::Artifact(artifact.clone()));
        match self.commit(&mut state, tx).await {
            Ok(()) => {}
            // Only if another controller wrote it first; this one checked its own state.
            Err(StoreError::Conflict(_)) => return Err(exists(r)),
            Err(e) => return Err(e.into()),
        }
        for v in &artifact.variants {
            self.grant_blob(&artifact.project, &v.digest);
        }
        tracing::info!(artifact = %r, variants = artifact.variants.len(), "artifact created");
        // Tasks waiting for this artifact may be placeable now.
        self.schedule.notify_one();
        Ok(artifact)
    }

    /// Deletes an artifact version that no unfinished job uses.
    async fn delete_artifact(
        &self,
        p: &Principal,
        name: &str,
        version: &str,
    ) -> ApiResult<Artifact> {
        let mut state = self.state.lock().await;
        let artifact = find(&state, p, name, version)?;
        let r = artifact.reference();
        let mut users: Vec<&str> = state
            .current
            .values()
            .filter_map(|id| state.jobs.get(id))
            .filter(|j| {
                j.project == artifact.project
                    && !j.status.is_final()
                    && j.spec.artifact.as_ref() == Some(&r)
            })
            .map(|j| j.name.as_str())
            .collect();
        if !users.is_empty() {
            users.sort();
            return Err(ApiError::new(
                ErrorCode::InUse,
                format!(
                    "artifact {r} is used by job {}; stop the job first (`drover job stop NAME`)",
                    users.join(", ")
                ),
            ));
        }
        let mut tx = Tx::default();
        tx.put(
            &mut state,
            Change::DeleteArtifact {
                project: artifact.project.clone(),
                name: artifact.name.clone(),
                version: artifact.version.clone(),
            },
        );
        self.commit(&mut state, tx).await?;
        tracing::info!(artifact = %r, "artifact deleted");
        Ok(artifact)
    }

    /// Removes the blobs no artifact or job references: those of `released` (the variants of a
    /// just-deleted artifact) unless written again since, and any other left unreferenced
    /// for longer than the grace period.
    pub(crate) async fn collect_blobs(
        &self,
        released: &HashMap<Digest, SystemTime>,
    ) -> std::io::Result<Vec<Digest>> {
        let _gc = self.blobs.gc_lock.write().await;
        let referenced: HashSet<Digest> = {
            let state = self.state.lock().await;
            // Job versions keep their working_dir archives and their input: a task of
            // any stored version may still be started (a retry, a rescheduling). Once
            // the job is removed (by retention or `job rm`), nothing names them and
            // they go like any other unreferenced blob.
            let working_dirs = state
                .jobs
                .values()
                .filter_map(|j| j.spec.runtime_env.working_dir.as_deref())
                .filter_map(|w| w.parse::<Digest>().ok());
            let inputs = state
                .jobs
                .values()
                .filter_map(|j| j.spec.stdin.as_ref().map(|i| i.blob.clone()));
            state
                .artifacts
                .values()
                .flat_map(|a| a.variants.iter().map(|v| v.digest.clone()))
                .chain(working_dirs)
                .chain(inputs)
                .collect()
        };
        let removed = self
            .blobs
            .collect(&referenced, released, self.cfg.blob_grace)
            .await?;
        if !removed.is_empty() {
            let mut owners = self.owners();
            for d in &removed {
                owners.remove(d);
            }
            drop(owners);
            tracing::info!(count = removed.len(), "removed unreferenced blobs");
        }
        Ok(removed)
    }
}

fn exists(r: &ArtifactRef) -> ApiError {
    ApiError::new(
        ErrorCode::Exists,
        format!("artifact {r} already exists; versions are immutable, so push a new version"),
    )
}

/// Collects unreferenced blobs at start-up and then once per grace period, so an upload
/// whose artifact was never created does not stay for ever.
pub(crate) async fn gc_loop(inner: Arc<Inner>) {
    let period = inner.cfg.blob_grace.max(Duration::from_secs(60));
    loop {
        if let Err(e) = inner.collect_blobs(&HashMap::new()).await {
            tracing::warn!("collecting unreferenced blobs: {e}");
        }
        tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
    }
}
