//! Helpers for Drover's integration tests.
//!
//! [`TestCluster`] runs a real controller (SQLite store, HTTP on a loopback port chosen
//! by the OS) and real agents in the test's process; [`Api`] talks to it over HTTP like
//! the CLI does. Every wait takes a timeout and fails the test with what it last saw.

pub mod fake_agent;
pub mod images;
pub mod vertex;

use anyhow::{Context, Result, bail};
use drover_agent::{Agent, AgentConfig};
use drover_controller::{BootstrapToken, Controller, ControllerConfig};
use drover_core::JobSpec;
use drover_core::api::{ApplyResponse, JobView, NodeView, StreamEvent, TaskView};
use drover_core::spec::Resources;
use drover_runtime::Runtime;
use drover_runtime::docker::{DockerConfig, DockerRuntime};
use drover_runtime::mock::MockRuntime;
use drover_runtime::plugin::{PluginConfig, PluginRuntime};
use drover_runtime::process::{ProcessConfig, ProcessRuntime};
use drover_store::{Durability, Role, SqliteConfig, SqliteStore};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const ADMIN_TOKEN: &str = "drv_test_admin";
pub const JOIN_TOKEN: &str = "drj_test_join";

/// Logs to the test's output when `DROVER_LOG` is set (e.g. `DROVER_LOG=debug`).
pub fn init_logging() {
    if let Ok(filter) = std::env::var("DROVER_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

/// Knobs for a test controller; the defaults are fast timeouts for tests.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub heartbeat: Duration,
    pub node_timeout: Duration,
    /// How long an unreachable node is kept before it is lost.
    pub node_gone_after: Duration,
    /// How long a placed task may take to reach running.
    pub start_deadline: Duration,
    /// How long past its grace a task asked to stop may take to end.
    pub stop_deadline: Duration,
    /// How long a connection may take to send a request's headers (also how long an
    /// idle keep-alive connection is kept).
    pub header_read_timeout: Duration,
    /// The most connections one client address may hold open.
    pub max_connections_per_ip: usize,
    /// What finished work and lost nodes the controller keeps.
    pub retention: drover_controller::Retention,
    /// The NATS server for pipelines whose buffers are there (`--nats`).
    pub nats_url: Option<String>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            heartbeat: Duration::from_millis(200),
            node_timeout: Duration::from_secs(2),
            node_gone_after: Duration::from_secs(3600),
            start_deadline: Duration::from_secs(300),
            stop_deadline: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(10),
            max_connections_per_ip: 256,
            retention: drover_controller::Retention::default(),
            nats_url: None,
        }
    }
}

pub struct TestCluster {
    pub controller: Controller,
    pub url: String,
    pub dir: tempfile::TempDir,
    serve: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Which runtimes a test agent offers.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub capacity: Resources,
    pub process: bool,
    pub mock: bool,
    /// The shim binary for the process runtime, if any.
    pub shim: Option<PathBuf>,
    /// Task limits; the defaults, with fast log shipping, when `None`.
    pub limits: Option<drover_agent::TaskLimits>,
    /// Offer the Docker runtime, on this machine's engine.
    pub docker: bool,
    /// Plugin runtimes, by name and executable.
    pub plugins: Vec<(String, PathBuf)>,
    /// Platforms the agent runs through an emulator, with the emulator's executable.
    pub emulate: Vec<(drover_core::platform::Platform, PathBuf)>,
    /// The built `drover` binary, whose `__vertex` runs built-in pipeline vertices;
    /// an agent inside a test binary cannot run them without it.
    pub self_exe: Option<PathBuf>,
}

impl AgentOptions {
    pub fn named(name: &str) -> Self {
        AgentOptions {
            name: name.to_string(),
            labels: BTreeMap::new(),
            capacity: Resources {
                cpu: 4.0,
                memory: drover_core::quantity::ByteSize(8 << 30),
            },
            process: true,
            mock: true,
            shim: None,
            limits: None,
            docker: false,
            plugins: Vec::new(),
            emulate: Vec::new(),
            self_exe: None,
        }
    }

    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.labels.insert(k.into(), v.into());
        self
    }
}

impl TestCluster {
    pub async fn start() -> Result<TestCluster> {
        Self::start_with(ClusterOptions::default()).await
    }

    pub async fn start_with(opts: ClusterOptions) -> Result<TestCluster> {
        init_logging();
        let dir = tempfile::tempdir()?;
        // Run as root, as CI does, agents run process tasks as users of their own, who
        // must pass through this directory to reach theirs.
        std::fs::set_permissions(
            dir.path(),
            <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o711),
        )?;
        Self::start_in(dir, opts, "127.0.0.1:0").await
    }

    /// Starts a controller over an existing data dir (to test a restart).
    pub async fn start_in(
        dir: tempfile::TempDir,
        opts: ClusterOptions,
        listen: &str,
    ) -> Result<TestCluster> {
        let store = SqliteStore::open(&SqliteConfig {
            path: Some(dir.path().join("drover.db")),
            durability: Durability::Process,
        })
        .await?;
        let mut cfg = ControllerConfig::new(dir.path().join("controller"));
        cfg.heartbeat_interval = opts.heartbeat;
        cfg.node_timeout = opts.node_timeout;
        cfg.node_gone_after = opts.node_gone_after;
        cfg.start_deadline = opts.start_deadline;
        cfg.stop_deadline = opts.stop_deadline;
        cfg.header_read_timeout = opts.header_read_timeout;
        cfg.max_connections_per_ip = opts.max_connections_per_ip;
        cfg.retention = opts.retention;
        cfg.buffers.nats_url = opts.nats_url;
        cfg.command_resend_after = Duration::from_millis(500);
        cfg.bootstrap_tokens = vec![
            BootstrapToken {
                secret: ADMIN_TOKEN.into(),
                role: Role::Cluster,
                name: "admin".into(),
            },
            BootstrapToken {
                secret: JOIN_TOKEN.into(),
                role: Role::Agent,
                name: "join".into(),
            },
        ];
        let controller = Controller::start(cfg, Arc::new(store)).await?;
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let url = format!("http://{}", listener.local_addr()?);
        let c = controller.clone();
        let serve = tokio::spawn(async move { c.serve(listener).await });
        Ok(TestCluster {
            controller,
            url,
            dir,
            serve,
        })
    }

    /// Stops the controller and hands back its data dir.
    pub async fn stop(self) -> tempfile::TempDir {
        self.controller.shutdown();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.serve).await;
        self.dir
    }

    pub fn api(&self) -> Api {
        Api::new(&self.url, ADMIN_TOKEN)
    }

    /// Submits a job whose spec carries a pipeline vertex's plane (`spec.vertex`), as
    /// the vertex controller would create it: for tests of the data path alone. The one
    /// place tests make vertex jobs without a pipeline.
    pub async fn submit_vertex_job(&self, spec: &JobSpec) -> Result<ApplyResponse> {
        // The HTTP API refuses a spec with a vertex from users, so this goes straight to
        // the controller, as its vertex controller's own applies do.
        self.controller
            .apply_vertex_job(drover_core::ProjectId::default(), spec.clone())
            .await
            .map_err(|e| anyhow::anyhow!("submit_vertex_job: {e}"))
    }

    /// Starts an in-process agent with its own data dir under the cluster's.
    pub async fn agent(&self, opts: AgentOptions) -> Result<Agent> {
        let data_dir = self.dir.path().join("agents").join(&opts.name);
        start_agent(&self.url, data_dir, opts).await
    }
}

pub async fn start_agent(url: &str, data_dir: PathBuf, opts: AgentOptions) -> Result<Agent> {
    let mut runtimes: Vec<Arc<dyn Runtime>> = Vec::new();
    if opts.process {
        let node_id = drover_agent::load_node_id(&data_dir)?;
        runtimes.push(Arc::new(ProcessRuntime::new(ProcessConfig {
            shim: opts.shim.clone(),
            cgroup_scope: Some(node_id.to_string()),
        })));
    }
    if opts.mock {
        runtimes.push(Arc::new(MockRuntime::new()));
    }
    if opts.docker {
        let node_id = drover_agent::load_node_id(&data_dir)?;
        runtimes.push(Arc::new(DockerRuntime::new(DockerConfig::new(node_id))?));
    }
    for (name, path) in &opts.plugins {
        let cfg = PluginConfig::new(name.clone(), path.clone(), data_dir.join("plugins"));
        runtimes.push(Arc::new(PluginRuntime::new(cfg)));
    }
    let mut cfg = AgentConfig::new(url.to_string(), JOIN_TOKEN.to_string(), data_dir, runtimes);
    cfg.name = opts.name;
    cfg.labels = opts.labels;
    cfg.capacity = Some(opts.capacity);
    cfg.emulate = opts.emulate;
    // The test binary is no `drover`: without a binary given, built-in vertices fail
    // with a reason rather than running the test binary with `__vertex`.
    cfg.self_exe = opts.self_exe;
    cfg.max_backoff = Duration::from_millis(500);
    if let Some(l) = opts.limits {
        cfg.limits = l;
    }
    cfg.limits.log_interval = Duration::from_millis(50);
    cfg.limits.stats_interval = Duration::from_millis(200);
    Ok(Agent::start(cfg).await?)
}

/// The path of an example plugin shipped in `examples/plugins/NAME/drover-plugin-NAME`.
pub fn example_plugin(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/plugins")
        .join(name)
        .join(format!("drover-plugin-{name}"))
}

/// A minimal HTTP client for the API, as a user's script would use it.
#[derive(Clone)]
pub struct Api {
    pub url: String,
    pub token: String,
    http: reqwest::Client,
}

impl Api {
    pub fn new(url: &str, token: &str) -> Api {
        Api {
            url: url.to_string(),
            token: token.to_string(),
            http: reqwest::Client::new(),
        }
    }

    /// The same caller acting in `project` (the `drover-project` header on every request).
    pub fn in_project(mut self, project: &str) -> Api {
        let mut headers = reqwest::header::HeaderMap::new();
        // Test project names are plain ASCII.
        headers.insert(
            drover_core::auth::PROJECT_HEADER,
            reqwest::header::HeaderValue::from_str(project).expect("an ASCII project name"),
        );
        self.http = reqwest::Client::builder()
            .default_headers(headers)
            .build()
            .expect("a client with default headers");
        self
    }

    /// Creates a project (as a cluster admin).
    pub async fn create_project(&self, name: &str) -> Result<drover_core::auth::Project> {
        let body = serde_json::json!({ "name": name });
        self.json(
            reqwest::Method::POST,
            "/v1/projects",
            Some(serde_json::to_vec(&body)?),
        )
        .await
    }

    /// Creates a token with `role` in `project` and returns it, secret included.
    pub async fn create_token(
        &self,
        project: &str,
        role: drover_core::auth::Role,
    ) -> Result<drover_core::auth::CreatedToken> {
        let body = serde_json::json!({ "project": project, "role": role });
        self.json(
            reqwest::Method::POST,
            "/v1/tokens",
            Some(serde_json::to_vec(&body)?),
        )
        .await
    }

    pub async fn raw(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, String)> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(30));
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        Ok((status, resp.text().await?))
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T> {
        let (status, text) = self.raw(method.clone(), path, body).await?;
        if !(200..300).contains(&status) {
            bail!("{method} {path}: HTTP {status}: {text}");
        }
        serde_json::from_str(&text).with_context(|| format!("decoding {path}: {text}"))
    }

    pub async fn apply_yaml(&self, yaml: &str) -> Result<ApplyResponse> {
        let spec = JobSpec::from_yaml(yaml, "test.yaml")?;
        self.json(
            reqwest::Method::POST,
            "/v1/jobs",
            Some(serde_json::to_vec(&spec)?),
        )
        .await
    }

    pub async fn job(&self, name: &str) -> Result<JobView> {
        self.json(reqwest::Method::GET, &format!("/v1/jobs/{name}"), None)
            .await
    }

    pub async fn stop(&self, name: &str) -> Result<JobView> {
        self.json(
            reqwest::Method::POST,
            &format!("/v1/jobs/{name}/stop"),
            None,
        )
        .await
    }

    /// Stops a job with `force=true`: its tasks are killed at once.
    pub async fn stop_forced(&self, name: &str) -> Result<JobView> {
        self.json(
            reqwest::Method::POST,
            &format!("/v1/jobs/{name}/stop?force=true"),
            None,
        )
        .await
    }

    pub async fn tasks(&self, job: &str) -> Result<Vec<TaskView>> {
        self.json(reqwest::Method::GET, &format!("/v1/tasks?job={job}"), None)
            .await
    }

    /// The Prometheus text at `/metrics`.
    pub async fn metrics(&self) -> Result<String> {
        let resp = self
            .http
            .get(format!("{}/metrics", self.url))
            .bearer_auth(&self.token)
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!("GET /metrics: {}", resp.status());
        }
        Ok(resp.text().await?)
    }

    pub async fn nodes(&self) -> Result<Vec<NodeView>> {
        self.json(reqwest::Method::GET, "/v1/nodes", None).await
    }

    /// The job's whole output so far, stdout and stderr concatenated per task in index
    /// order, read through the same stream `drover logs` uses.
    pub async fn logs(&self, job: &str) -> Result<String> {
        self.logs_of(job, "output").await
    }

    /// What the agent wrote while preparing the job's tasks.
    pub async fn prepare_logs(&self, job: &str) -> Result<String> {
        self.logs_of(job, "prepare").await
    }

    async fn logs_of(&self, job: &str, which: &str) -> Result<String> {
        let path = format!("/v1/jobs/{job}/logs?logs={which}");
        let (status, text) = self.raw(reqwest::Method::GET, &path, None).await?;
        if status != 200 {
            bail!("logs of {job}: HTTP {status}: {text}");
        }
        let mut out = String::new();
        for line in text.lines() {
            if let StreamEvent::Log { data, .. } = serde_json::from_str(line)? {
                out.push_str(&data);
            }
        }
        Ok(out)
    }

    /// Polls `f` on the job until it returns true, or fails after `timeout` with the
    /// job and its tasks as last seen.
    pub async fn wait_job(
        &self,
        name: &str,
        timeout: Duration,
        f: impl Fn(&JobView, &[TaskView]) -> bool,
    ) -> Result<(JobView, Vec<TaskView>)> {
        let start = Instant::now();
        loop {
            let job = self.job(name).await?;
            let tasks = self.tasks(name).await?;
            if f(&job, &tasks) {
                return Ok((job, tasks));
            }
            if start.elapsed() > timeout {
                bail!(
                    "timed out after {timeout:?} waiting on job {name}; last seen: {}\ntasks: {}",
                    serde_json::to_string_pretty(&job)?,
                    serde_json::to_string_pretty(&tasks)?
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until one of the job's tasks is running.
    pub async fn wait_running(
        &self,
        name: &str,
        timeout: Duration,
    ) -> Result<(JobView, Vec<TaskView>)> {
        self.wait_job(name, timeout, |_, t| {
            t.iter()
                .any(|t| t.task.state == drover_core::TaskState::Running)
        })
        .await
    }

    /// Waits until the job reaches a final status and returns it.
    pub async fn wait_final(
        &self,
        name: &str,
        timeout: Duration,
    ) -> Result<(JobView, Vec<TaskView>)> {
        self.wait_job(name, timeout, |j, t| {
            j.job.status.is_final() && t.iter().all(|t| t.task.state.is_terminal())
        })
        .await
    }
}

/// Polls `f` until it is true or the timeout ends.
pub async fn wait_for(
    what: &str,
    timeout: Duration,
    mut f: impl AsyncFnMut() -> bool,
) -> Result<()> {
    let start = Instant::now();
    while !f().await {
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Ok(())
}

/// A gzip'd tar archive of regular files (path, contents), as a `working_dir` upload is.
pub fn tar_gz(entries: &[(&str, &[u8])]) -> Vec<u8> {
    use std::io::Write;
    let mut builder = tar::Builder::new(Vec::new());
    for (path, data) in entries {
        let mut h = tar::Header::new_gnu();
        let name = &mut h.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        builder
            .append(&h, *data)
            .expect("appending to a tar in memory");
    }
    let tar = builder.into_inner().expect("finishing a tar in memory");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).expect("compressing in memory");
    gz.finish().expect("compressing in memory")
}

/// The content address of `bytes`, as the blob routes name it: `sha256:` and hex.
pub fn digest_of(bytes: &[u8]) -> String {
    drover_core::artifact::Digest::of(bytes).to_string()
}

impl TestCluster {
    /// Where the controller keeps blobs, one file per digest.
    pub fn blobs_dir(&self) -> PathBuf {
        self.dir
            .path()
            .join("controller")
            .join("blobs")
            .join("sha256")
    }

    /// The names of every file in the blob directory, temporary uploads included, sorted.
    pub fn blob_files(&self) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(self.blobs_dir())? {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    }
}

/// Blob and artifact calls, answering the status and body as the server gave them so
/// tests can check refusals as closely as successes.
impl Api {
    /// Uploads a blob in one piece.
    pub async fn put_blob(&self, digest: &str, body: Vec<u8>) -> Result<(u16, String)> {
        self.put_blob_body(digest, reqwest::Body::from(body)).await
    }

    /// Uploads a blob from any body, e.g. a stream that breaks off part-way.
    pub async fn put_blob_body(&self, digest: &str, body: reqwest::Body) -> Result<(u16, String)> {
        let resp = self
            .http
            .put(format!("{}/v1/blobs/{digest}", self.url))
            .bearer_auth(&self.token)
            .header("content-type", "application/octet-stream")
            .timeout(Duration::from_secs(60))
            .body(body)
            .send()
            .await?;
        let status = resp.status().as_u16();
        Ok((status, resp.text().await?))
    }

    /// The status of `HEAD /v1/blobs/{digest}` and its Content-Length, if any.
    pub async fn head_blob(&self, digest: &str) -> Result<(u16, Option<u64>)> {
        let resp = self
            .http
            .head(format!("{}/v1/blobs/{digest}", self.url))
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(30))
            .send()
            .await?;
        let len = resp
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        Ok((resp.status().as_u16(), len))
    }

    /// Downloads a blob whole.
    pub async fn get_blob(&self, digest: &str) -> Result<(u16, Vec<u8>)> {
        let resp = self
            .http
            .get(format!("{}/v1/blobs/{digest}", self.url))
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(60))
            .send()
            .await?;
        let status = resp.status().as_u16();
        Ok((status, resp.bytes().await?.to_vec()))
    }

    /// Uploads `files` (platform, bytes) and creates them as version 1 of artifact
    /// `name`; any answer but success is an error.
    pub async fn push_artifact(&self, name: &str, files: &[(&str, &[u8])]) -> Result<()> {
        let mut variants = Vec::new();
        for (platform, bytes) in files {
            let digest = digest_of(bytes);
            let (status, body) = self.put_blob(&digest, bytes.to_vec()).await?;
            if status != 200 && status != 201 {
                bail!("uploading {digest}: {status} {body}");
            }
            variants.push(serde_json::json!({
                "platform": platform, "digest": digest, "size": bytes.len(),
            }));
        }
        let body = serde_json::json!({ "name": name, "version": "1", "variants": variants });
        let (status, answer) = self.create_artifact(&body).await?;
        if status != 201 {
            bail!("creating artifact {name}:1: {status} {answer}");
        }
        Ok(())
    }

    /// `POST /v1/artifacts` with a JSON body.
    pub async fn create_artifact(&self, body: &serde_json::Value) -> Result<(u16, String)> {
        self.raw(
            reqwest::Method::POST,
            "/v1/artifacts",
            Some(serde_json::to_vec(body)?),
        )
        .await
    }
}
