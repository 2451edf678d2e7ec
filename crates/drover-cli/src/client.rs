//! A small typed client for the controller's HTTP API.

use anyhow::{Context, Result, anyhow, bail};
use drover_core::JobSpec;
use drover_core::api::{
    ApplyResponse, ErrorBody, JobView, NodeView, PlanResponse, StreamEvent, TaskView,
};
use drover_core::artifact::{Artifact, ArtifactRef, Digest, NewArtifact};
use futures_util::{StreamExt, TryStreamExt};
use serde::de::DeserializeOwned;
use std::path::Path;
use std::time::Duration;

/// How many times a submission is sent when the server cannot be reached.
const APPLY_ATTEMPTS: u64 = 3;

/// How a submission is made.
#[derive(Clone, Debug, Default)]
pub struct ApplyRequest {
    /// Makes a repeat of the same request (a retry, here or by the user) do nothing new;
    /// a fresh key is used when absent.
    pub idempotency_key: Option<String>,
    /// Run an unchanged spec again if its job has finished.
    pub rerun: bool,
}

/// What `HEAD /v1/blobs/{digest}` says.
pub struct BlobCheck {
    pub exists: bool,
    /// The controller's limit on one blob, when it says.
    pub max_size: Option<u64>,
}

#[derive(Clone)]
pub struct Client {
    base: String,
    token: String,
    http: reqwest::Client,
    /// How an `https://` server's certificate is trusted; `None` for `http://`.
    tls: Option<drover_tls::ClientTls>,
}

fn http_client(
    project: Option<&str>,
    tls: Option<&drover_tls::ClientTls>,
) -> Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(p) = project {
        let value = reqwest::header::HeaderValue::from_str(p)
            .map_err(|_| anyhow!("project {p:?}: expected a project name"))?;
        headers.insert(drover_core::auth::PROJECT_HEADER, value);
    }
    let mut builder = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(5))
        // Closed before the server's idle timeout (10 s by default) closes it, so a
        // request never goes out on a connection the server is closing.
        .pool_idle_timeout(Duration::from_secs(5))
        .default_headers(headers);
    if let Some(tls) = tls {
        builder = builder.tls_backend_preconfigured(tls.config().as_ref().clone());
    }
    builder.build().context("building the HTTP client")
}

/// An error the server answered with; the CLI maps these to exit codes.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: u16,
    pub code: String,
    pub message: String,
}

impl Client {
    /// A client of the server at `base`; `tls` says how to trust an `https://` one and
    /// is ignored for `http://`.
    pub fn new(base: &str, token: &str, tls: Option<drover_tls::ClientTls>) -> Result<Client> {
        let base = base.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            bail!("server {base:?} is not a URL; expected https://HOST:PORT or http://HOST:PORT");
        }
        let tls = tls.filter(|_| base.starts_with("https://"));
        Ok(Client {
            http: http_client(None, tls.as_ref())?,
            base,
            token: token.to_string(),
            tls,
        })
    }

    /// Acts inside `project`: a cluster admin's requests then see and change only it,
    /// and a project token's requests are refused unless it is the token's own.
    pub fn in_project(mut self, project: Option<&str>) -> Result<Client> {
        if project.is_some() {
            self.http = http_client(project, self.tls.as_ref())?;
        }
        Ok(self)
    }

    async fn check(&self, resp: reqwest::Response) -> Result<reqwest::Response> {
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default();
        let (code, message) = match serde_json::from_str::<ErrorBody>(&body) {
            Ok(e) => (e.code, e.error),
            Err(_) => ("http".to_string(), format!("HTTP {status}: {body}")),
        };
        Err(ApiError {
            status,
            code,
            message,
        }
        .into())
    }

    fn connect_error(&self, e: reqwest::Error) -> anyhow::Error {
        // A refused certificate surfaces from reqwest as a bare handshake error; the
        // verifier kept what was wrong, and the user needs to know what to pass.
        if let Some(why) = self.tls.as_ref().and_then(|t| t.take_refusal()) {
            return anyhow!(
                "cannot trust the Drover server at {}: {why}. Pass --ca FILE (or set DROVER_CA, or `ca:` in the config file) with the server's certificate or its CA, \
                 or pin the certificate with --server-fingerprint sha256:HEX (DROVER_SERVER_FINGERPRINT, `server_fingerprint:`) as `drover server` prints it",
                self.base
            );
        }
        anyhow!(
            "cannot reach the Drover server at {}: {e}. Is it running? (`drover up` starts one)",
            self.base
        )
    }

    /// Sends a request with the token and a timeout, and decodes a JSON answer.
    async fn call<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
        what: &str,
    ) -> Result<T> {
        let resp = req
            .bearer_auth(&self.token)
            .timeout(std::time::Duration::from_secs(30))
            .send()
            .await
            .map_err(|e| self.connect_error(e))?;
        let resp = self.check(resp).await?;
        resp.json()
            .await
            .with_context(|| format!("decoding the answer to {what}"))
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let req = self.http.get(format!("{}{path}", self.base));
        self.call(req, &format!("GET {path}")).await
    }

    async fn post<T: DeserializeOwned>(&self, path: &str, body: Vec<u8>) -> Result<T> {
        let req = self
            .http
            .post(format!("{}{path}", self.base))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        self.call(req, &format!("POST {path}")).await
    }

    async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let req = self.http.delete(format!("{}{path}", self.base));
        self.call(req, &format!("DELETE {path}")).await
    }

    /// Submits a spec. The request carries an idempotency key (the caller's, or a fresh
    /// one), so when the server cannot be reached or its answer is lost the request is
    /// sent again safely: the server carries out a key once.
    pub async fn apply(&self, spec: &JobSpec, how: &ApplyRequest) -> Result<ApplyResponse> {
        let key = how
            .idempotency_key
            .clone()
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        let path = if how.rerun {
            "/v1/jobs?rerun=true"
        } else {
            "/v1/jobs"
        };
        let body = serde_json::to_vec(spec)?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let req = self
                .http
                .post(format!("{}{path}", self.base))
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header(drover_core::api::IDEMPOTENCY_KEY_HEADER, &key)
                .bearer_auth(&self.token)
                .timeout(std::time::Duration::from_secs(30))
                .body(body.clone());
            match req.send().await {
                Ok(resp) => {
                    let resp = self.check(resp).await?;
                    return resp
                        .json()
                        .await
                        .with_context(|| format!("decoding the answer to POST {path}"));
                }
                Err(e) if attempt < APPLY_ATTEMPTS => {
                    tracing::debug!("POST {path} failed ({e}); sending it again with the same key");
                    tokio::time::sleep(std::time::Duration::from_millis(300 * attempt)).await;
                }
                Err(e) => return Err(self.connect_error(e)),
            }
        }
    }

    /// What applying `spec` would do, changing nothing (`POST /v1/plan`). Safe to
    /// repeat, so it carries no idempotency key.
    pub async fn plan(&self, spec: &JobSpec) -> Result<PlanResponse> {
        let body = serde_json::to_vec(spec)?;
        self.post("/v1/plan", body).await.map_err(|e| {
            // A server older than plans answers its fallback's 404 for the route.
            match e.downcast_ref::<ApiError>() {
                Some(a) if a.status == 404 => anyhow!(
                    "the server at {} cannot plan (it has no POST /v1/plan): it is older than this client",
                    self.base
                ),
                _ => e,
            }
        })
    }

    pub async fn jobs(&self) -> Result<Vec<JobView>> {
        self.get("/v1/jobs").await
    }

    pub async fn job(&self, name: &str) -> Result<JobView> {
        self.get(&format!("/v1/jobs/{}", enc(name))).await
    }

    /// Stops a job; `force` kills its tasks at once instead of giving them stop_grace.
    pub async fn stop_job(&self, name: &str, force: bool) -> Result<JobView> {
        let query = if force { "?force=true" } else { "" };
        self.post(&format!("/v1/jobs/{}/stop{query}", enc(name)), Vec::new())
            .await
    }

    pub async fn tasks(&self, job: Option<&str>) -> Result<Vec<TaskView>> {
        match job {
            Some(j) => self.get(&format!("/v1/tasks?job={}", enc(j))).await,
            None => self.get("/v1/tasks").await,
        }
    }

    /// The current version's tasks of a job, every attempt, each with its timeline. A
    /// server that predates timelines ignores the parameter and sends none.
    pub async fn tasks_with_events(&self, job: &str) -> Result<Vec<TaskView>> {
        self.get(&format!("/v1/tasks?job={}&events=true", enc(job)))
            .await
    }

    /// Tasks of every version the server keeps, not only the current ones.
    pub async fn tasks_of_all_versions(&self, job: Option<&str>) -> Result<Vec<TaskView>> {
        match job {
            Some(j) => {
                self.get(&format!("/v1/tasks?job={}&versions=all", enc(j)))
                    .await
            }
            None => self.get("/v1/tasks?versions=all").await,
        }
    }

    pub async fn task(&self, id: &str) -> Result<TaskView> {
        self.get(&format!("/v1/tasks/{}", enc(id))).await
    }

    pub async fn nodes(&self) -> Result<Vec<NodeView>> {
        self.get("/v1/nodes").await
    }

    /// Removes a node that is not connected; returns it as it was.
    pub async fn remove_node(&self, node: &str) -> Result<NodeView> {
        self.delete(&format!("/v1/nodes/{}", enc(node))).await
    }

    /// The nodes' cached environments, of one node when `node` (a name or id) is given.
    pub async fn envs(&self, node: Option<&str>) -> Result<Vec<drover_core::api::NodeEnvView>> {
        match node {
            Some(n) => self.get(&format!("/v1/envs?node={}", enc(n))).await,
            None => self.get("/v1/envs").await,
        }
    }

    /// Asks nodes to remove their unused environments; returns the nodes asked.
    pub async fn prune_envs(&self, node: Option<&str>) -> Result<serde_json::Value> {
        let path = match node {
            Some(n) => format!("/v1/envs/prune?node={}", enc(n)),
            None => "/v1/envs/prune".to_string(),
        };
        self.post(&path, Vec::new()).await
    }

    /// The server's `/health`: its version and commit, and how many nodes are ready.
    pub async fn health(&self) -> Result<drover_core::api::Health> {
        self.get("/health").await
    }

    /// The server's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    pub async fn projects(&self) -> Result<Vec<drover_core::auth::Project>> {
        self.get("/v1/projects").await
    }

    pub async fn create_project(&self, name: &str) -> Result<drover_core::auth::Project> {
        let body = drover_core::auth::NewProject {
            name: name.to_string(),
        };
        self.post("/v1/projects", serde_json::to_vec(&body)?).await
    }

    pub async fn tokens(&self) -> Result<Vec<drover_core::auth::TokenView>> {
        self.get("/v1/tokens").await
    }

    pub async fn create_token(
        &self,
        new: &drover_core::auth::NewToken,
    ) -> Result<drover_core::auth::CreatedToken> {
        self.post("/v1/tokens", serde_json::to_vec(new)?).await
    }

    pub async fn revoke_token(&self, id: &str) -> Result<drover_core::auth::TokenView> {
        self.post(&format!("/v1/tokens/{}/revoke", enc(id)), Vec::new())
            .await
    }

    pub async fn artifacts(&self) -> Result<Vec<Artifact>> {
        self.get("/v1/artifacts").await
    }

    pub async fn artifact(&self, r: &ArtifactRef) -> Result<Artifact> {
        self.get(&artifact_path(r)).await
    }

    /// Every version of a job the server keeps, newest first.
    pub async fn job_versions(&self, name: &str) -> Result<Vec<JobView>> {
        self.get(&format!("/v1/jobs/{}/versions", enc(name))).await
    }

    /// Removes every version of a finished job, with its tasks and logs.
    pub async fn delete_job(&self, name: &str) -> Result<drover_core::api::RemovedJob> {
        self.delete(&format!("/v1/jobs/{}", enc(name))).await
    }

    pub async fn delete_artifact(&self, r: &ArtifactRef) -> Result<Artifact> {
        self.delete(&artifact_path(r)).await
    }

    pub async fn create_artifact(&self, new: &NewArtifact) -> Result<Artifact> {
        self.post("/v1/artifacts", serde_json::to_vec(new)?).await
    }

    /// Whether the controller already has the blob, so its upload can be skipped, and
    /// the largest blob it accepts.
    pub async fn blob_check(&self, digest: &Digest) -> Result<BlobCheck> {
        let resp = self
            .http
            .head(format!("{}/v1/blobs/{digest}", self.base))
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .map_err(|e| self.connect_error(e))?;
        let max_size = resp
            .headers()
            .get(drover_core::api::MAX_BLOB_SIZE_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        match resp.status().as_u16() {
            200 => Ok(BlobCheck {
                exists: true,
                max_size,
            }),
            404 => Ok(BlobCheck {
                exists: false,
                max_size,
            }),
            // A HEAD answer has no body to explain itself, so the status has to.
            status => Err(ApiError {
                status,
                code: "http".into(),
                message: match status {
                    401 => "the server refused the token (HTTP 401)".into(),
                    403 => "this token may not read blobs (HTTP 403)".into(),
                    _ => format!("checking blob {digest}: HTTP {status}"),
                },
            }
            .into()),
        }
    }

    /// Streams a file to the blob store as `digest`; `on_chunk` is told how many bytes
    /// each piece had, for a progress bar. The server checks the digest and keeps
    /// nothing if the bytes do not match it.
    pub async fn upload_blob(
        &self,
        digest: &Digest,
        path: &Path,
        size: u64,
        on_chunk: impl Fn(u64) + Send + Sync + 'static,
    ) -> Result<()> {
        let file = tokio::fs::File::open(path)
            .await
            .with_context(|| format!("opening {}", path.display()))?;
        let stream = tokio_util::io::ReaderStream::with_capacity(file, 256 << 10)
            .inspect_ok(move |chunk| on_chunk(chunk.len() as u64));
        // Generous enough for a slow link (a minute plus 256 KiB/s), yet finite.
        let timeout = Duration::from_secs(60 + size / (256 << 10));
        let resp = self
            .http
            .put(format!("{}/v1/blobs/{digest}", self.base))
            .bearer_auth(&self.token)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .header(reqwest::header::CONTENT_LENGTH, size)
            .timeout(timeout)
            .body(reqwest::Body::wrap_stream(stream))
            .send()
            .await
            .map_err(|e| {
                // The server was reachable a moment ago (the blob was checked first), so
                // this is the upload itself failing: say so, with the cause.
                anyhow::Error::new(e).context(format!("uploading {}", path.display()))
            })?;
        self.check(resp).await?;
        Ok(())
    }

    /// Streams a job's or task's log and state events to `on_event` until the stream
    /// ends (when not following, or when everything has finished).
    pub async fn stream(
        &self,
        path: &str,
        q: &StreamQuery,
        mut on_event: impl FnMut(StreamEvent) -> Result<()>,
    ) -> Result<()> {
        let mut url = format!("{}{path}?follow={}&logs={}", self.base, q.follow, q.logs);
        if let Some(n) = q.tail {
            url.push_str(&format!("&tail={n}"));
        }
        // Sent only when asked for, so a plain stream is the same request an older
        // server knows.
        if let Some(since) = q.since {
            url.push_str(&format!("&since={}", enc(&since.to_string())));
        }
        if q.timestamps {
            url.push_str("&timestamps=true");
        }
        let resp = self
            .http
            .get(url)
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| self.connect_error(e))?;
        let resp = self.check(resp).await?;
        let mut body = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        // The server sends a keepalive at least every 10 s; a minute of silence means
        // the connection is gone even if TCP has not noticed.
        loop {
            let next = tokio::time::timeout(std::time::Duration::from_secs(60), body.next())
                .await
                .map_err(|_| anyhow!("the server stopped answering (no data for 60s)"))?;
            let Some(chunk) = next else { break };
            let chunk = chunk.context("reading the log stream")?;
            buf.extend_from_slice(&chunk);
            while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                let ev: StreamEvent = serde_json::from_slice(&line[..line.len() - 1])
                    .context("decoding a stream event")?;
                on_event(ev)?;
            }
        }
        Ok(())
    }
}

/// What a log stream asks the server for.
pub struct StreamQuery {
    /// Keep following until the job or task ends.
    pub follow: bool,
    /// `output`, `prepare` or `all`.
    pub logs: &'static str,
    /// Start at each stream's last this many lines.
    pub tail: Option<u64>,
    /// Start at each stream's first line written at or after this.
    pub since: Option<drover_core::logtime::Since>,
    /// Ask for the time of each piece of output.
    pub timestamps: bool,
}

/// Pipelines (`drover pipeline ...`).
impl Client {
    pub async fn apply_pipeline(
        &self,
        spec: &drover_core::pipeline::PipelineSpec,
    ) -> Result<drover_core::pipeline::PipelineApplied> {
        self.post("/v1/pipelines", serde_json::to_vec(spec)?).await
    }

    pub async fn pipelines(&self) -> Result<Vec<drover_core::pipeline::PipelineSummary>> {
        self.get("/v1/pipelines").await
    }

    pub async fn pipeline(&self, name: &str) -> Result<drover_core::pipeline::PipelineView> {
        self.get(&format!("/v1/pipelines/{}", enc(name))).await
    }

    /// `action` is `pause`, `resume` or `resume?slow=true`.
    pub async fn pipeline_action(
        &self,
        name: &str,
        action: &str,
    ) -> Result<drover_core::pipeline::PipelineSummary> {
        self.post(&format!("/v1/pipelines/{}/{action}", enc(name)), Vec::new())
            .await
    }

    pub async fn delete_pipeline(
        &self,
        name: &str,
    ) -> Result<drover_core::pipeline::PipelineSummary> {
        self.delete(&format!("/v1/pipelines/{}", enc(name))).await
    }

    pub async fn send_messages(
        &self,
        name: &str,
        vertex: &str,
        messages: &drover_core::pipeline::HttpMessages,
    ) -> Result<drover_core::pipeline::HttpAccepted> {
        let path = format!(
            "/v1/pipelines/{}/vertices/{}/messages",
            enc(name),
            enc(vertex)
        );
        self.post(&path, serde_json::to_vec(messages)?).await
    }
}

fn artifact_path(r: &ArtifactRef) -> String {
    format!("/v1/artifacts/{}/{}", enc(&r.name), enc(&r.version))
}

fn enc(s: &str) -> String {
    // Names and ids are restricted to URL-safe characters by validation; anything
    // else is escaped so a mistyped name gets a clean 404 rather than a bad request.
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
