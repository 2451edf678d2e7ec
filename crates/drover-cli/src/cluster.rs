//! Starting the server side in this process: `drover server`, `drover agent`,
//! `drover up` (both, persistent) and the ephemeral cluster of a bare `drover run`.

use anyhow::{Context, Result};
use drover_agent::{Agent, AgentConfig};
use drover_controller::{BootstrapToken, Controller, ControllerConfig};
use drover_core::spec::Resources;
use drover_runtime::Runtime;
use drover_runtime::docker::{DockerConfig, DockerRuntime};
use drover_runtime::mock::MockRuntime;
use drover_runtime::plugin::{PluginConfig, PluginRuntime};
use drover_runtime::process::{ProcessConfig, ProcessRuntime};
use drover_store::{Durability, Role, SqliteConfig, SqliteStore, TokenRecord};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Which runtimes beyond `process` and `mock` an agent offers.
#[derive(Clone, Debug, Default)]
pub struct RuntimeOptions {
    /// Offer `docker` (when the engine answers).
    pub docker: bool,
    /// The engine's address (`unix://...` or `tcp://...`); the local socket when `None`.
    pub docker_host: Option<String>,
    /// External plugins, by name and executable.
    pub plugins: Vec<(String, PathBuf)>,
    /// Platforms the agent runs through an emulator, with the emulator's executable.
    pub emulate: Vec<(drover_core::platform::Platform, PathBuf)>,
    /// The artifact cache's size limit; the agent's default when `None`.
    pub artifact_cache_bytes: Option<u64>,
    /// The environment cache's size limit; the agent's default when `None`.
    pub env_cache_bytes: Option<u64>,
    /// The interpreter Python environments are built with; `python3` when `None`.
    pub python: Option<PathBuf>,
    /// Run process tasks as the agent's own user even when it is root.
    pub no_task_users: bool,
    /// The uids process tasks run as; the agent's default range when `None`.
    pub task_uid_range: Option<std::ops::RangeInclusive<u32>>,
}

/// The runtimes an agent in this binary offers. The process runtime uses this very
/// binary as its shim, so exit statuses survive an agent restart. Docker and plugins are
/// offered only if their fingerprint succeeds when the agent starts.
pub fn runtimes(data_dir: &Path, opts: &RuntimeOptions) -> Result<Vec<Arc<dyn Runtime>>> {
    let shim = std::env::current_exe().ok();
    // Task cgroups are named after the node, so agents sharing a machine keep apart.
    let node_id = drover_agent::load_node_id(data_dir)
        .with_context(|| format!("reading the node id in {}", data_dir.display()))?;
    let mut out: Vec<Arc<dyn Runtime>> = vec![
        Arc::new(ProcessRuntime::new(ProcessConfig {
            shim,
            cgroup_scope: Some(node_id.to_string()),
        })),
        Arc::new(MockRuntime::new()),
    ];
    if opts.docker {
        let mut cfg = DockerConfig::new(node_id);
        cfg.host = opts.docker_host.clone();
        out.push(Arc::new(DockerRuntime::new(cfg).context("--docker-host")?));
    }
    for (name, path) in &opts.plugins {
        let meta = std::fs::metadata(path).with_context(|| {
            format!(
                "--plugin {name}={}: cannot read the executable",
                path.display()
            )
        })?;
        if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
            anyhow::bail!(
                "--plugin {name}={}: expected an executable file",
                path.display()
            );
        }
        let cfg = PluginConfig::new(name.clone(), path.clone(), data_dir.join("plugins"));
        out.push(Arc::new(PluginRuntime::new(cfg)));
    }
    Ok(out)
}

/// The controller's connection limits; `None` and the defaults keep the controller's own.
#[derive(Clone, Debug)]
pub struct ConnectionLimits {
    pub max_per_ip: usize,
    /// The cap on all connections; the controller's default (from the open-file limit)
    /// when `None`.
    pub max_total: Option<usize>,
    pub header_read_timeout: std::time::Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        let d = ControllerConfig::new(PathBuf::new());
        ConnectionLimits {
            max_per_ip: d.max_connections_per_ip,
            max_total: None,
            header_read_timeout: d.header_read_timeout,
        }
    }
}

pub struct ServerOptions {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub admin_token: String,
    pub join_token: String,
    pub durability: Durability,
    pub heartbeat_interval: std::time::Duration,
    pub node_timeout: std::time::Duration,
    pub node_gone_after: std::time::Duration,
    pub retention: drover_controller::Retention,
    pub connections: ConnectionLimits,
    /// Serve HTTPS (and WSS to agents) with this; plain HTTP when `None`.
    pub tls: Option<drover_tls::ServerIdentity>,
    /// A NATS server for pipelines with `buffer.backend: nats`.
    pub nats_url: Option<String>,
}

pub struct RunningServer {
    pub controller: Controller,
    pub addr: SocketAddr,
    /// The fingerprint of the certificate it serves, when it serves TLS.
    pub fingerprint: Option<drover_tls::Fingerprint>,
    serve: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl RunningServer {
    pub fn url(&self) -> String {
        let scheme = if self.fingerprint.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    pub async fn stop(self) {
        self.controller.shutdown();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), self.serve).await;
    }

    /// Waits until the server stops on its own (it does not, short of an error).
    pub async fn wait(&mut self) -> Result<()> {
        (&mut self.serve)
            .await
            .context("server task")?
            .context("serving HTTP")
    }
}

pub async fn start_server(opts: ServerOptions) -> Result<RunningServer> {
    std::fs::create_dir_all(&opts.data_dir)
        .with_context(|| format!("creating data dir {}", opts.data_dir.display()))?;
    let store = open_store(&opts.data_dir, opts.durability).await?;
    let mut cfg = ControllerConfig::new(opts.data_dir.clone());
    cfg.heartbeat_interval = opts.heartbeat_interval;
    cfg.node_timeout = opts.node_timeout;
    cfg.node_gone_after = opts.node_gone_after;
    cfg.retention = opts.retention;
    cfg.max_connections_per_ip = opts.connections.max_per_ip;
    if let Some(n) = opts.connections.max_total {
        cfg.max_connections = n;
    }
    cfg.header_read_timeout = opts.connections.header_read_timeout;
    cfg.commit = Some(crate::COMMIT.to_string());
    cfg.buffers.nats_url = opts.nats_url.clone();
    cfg.bootstrap_tokens = vec![
        BootstrapToken {
            secret: opts.admin_token.clone(),
            role: Role::Cluster,
            name: "admin".into(),
        },
        BootstrapToken {
            secret: opts.join_token.clone(),
            role: Role::Agent,
            name: "join".into(),
        },
    ];
    let controller = Controller::start(cfg, Arc::new(store))
        .await
        .context("starting the controller")?;
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("listening on {}", opts.listen))?;
    let addr = listener.local_addr()?;
    let c = controller.clone();
    let fingerprint = opts.tls.as_ref().map(|t| t.fingerprint);
    let serve = match opts.tls {
        Some(tls) => tokio::spawn(async move { c.serve_tls(listener, tls.config).await }),
        None => tokio::spawn(async move { c.serve(listener).await }),
    };
    Ok(RunningServer {
        controller,
        addr,
        fingerprint,
        serve,
    })
}

/// Opens the controller's store in its data dir.
async fn open_store(data_dir: &Path, durability: Durability) -> Result<SqliteStore> {
    SqliteStore::open(&SqliteConfig {
        path: Some(data_dir.join("drover.db")),
        durability,
    })
    .await
    .with_context(|| format!("opening the store in {}", data_dir.display()))
}

/// Makes a new cluster admin token in the store of the controller whose data dir is
/// `controller_dir`, then writes its secret to `token_file`, where the server reads its
/// admin token at start-up. The token is stored first: should writing the file fail,
/// the old file stays and the new token is merely unused.
pub async fn reset_admin_token(controller_dir: &Path, token_file: &Path) -> Result<TokenRecord> {
    ensure_dir(controller_dir)?;
    let store = open_store(controller_dir, Durability::Full).await?;
    let (secret, record) = drover_controller::reset_admin_token(&store)
        .await
        .with_context(|| {
            format!(
                "storing a new admin token in {}",
                controller_dir.join("drover.db").display()
            )
        })?;
    crate::config::write_secret(token_file, &secret)?;
    Ok(record)
}

pub struct AgentOptions {
    pub server: String,
    pub join_token: String,
    pub data_dir: PathBuf,
    pub name: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub capacity: Option<Resources>,
    pub runtimes: RuntimeOptions,
    /// How an `https://` server's certificate is trusted; the system's roots when `None`.
    pub tls: Option<drover_tls::ClientTls>,
}

pub async fn start_agent(opts: AgentOptions) -> Result<Agent> {
    let runtimes = runtimes(&opts.data_dir, &opts.runtimes)?;
    let mut cfg = AgentConfig::new(opts.server, opts.join_token, opts.data_dir, runtimes);
    if let Some(n) = opts.name {
        cfg.name = n;
    }
    cfg.labels = opts.labels;
    cfg.capacity = opts.capacity;
    cfg.tls = opts.tls;
    cfg.emulate = opts.runtimes.emulate.clone();
    if let Some(bytes) = opts.runtimes.artifact_cache_bytes {
        cfg.artifact_cache_bytes = bytes;
    }
    if let Some(bytes) = opts.runtimes.env_cache_bytes {
        cfg.env_cache_bytes = bytes;
    }
    if let Some(python) = &opts.runtimes.python {
        cfg.python = python.clone();
    }
    if opts.runtimes.no_task_users {
        cfg.task_uids = None;
    } else if let Some(range) = &opts.runtimes.task_uid_range {
        cfg.task_uids = Some(range.clone());
    }
    Agent::start(cfg).await.context("starting the agent")
}

/// A throwaway cluster for one `drover run`: everything under a temporary directory,
/// on a loopback port chosen by the OS, gone when dropped.
pub struct Ephemeral {
    pub server: RunningServer,
    pub agent: Agent,
    pub token: String,
    _dir: tempfile::TempDir,
}

impl Ephemeral {
    /// Starts it with the runtimes the one job needs: the Docker engine is asked only
    /// when `docker` is set, so a plain `drover run` never waits on it.
    pub async fn start(runtimes: RuntimeOptions) -> Result<Ephemeral> {
        let dir = tempfile::Builder::new()
            .prefix("drover-run-")
            .tempdir()
            .context("creating a temporary directory")?;
        // The task runs as a user of its own when this process is root, and must reach
        // its directory in here; others may pass through, not list.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))
            .with_context(|| format!("setting the mode of {}", dir.path().display()))?;
        let token = crate::config::new_secret("drv");
        let join = crate::config::new_secret("drj");
        let server = start_server(ServerOptions {
            data_dir: dir.path().join("server"),
            listen: "127.0.0.1:0".parse()?,
            admin_token: token.clone(),
            join_token: join.clone(),
            // Nothing outlives this cluster, so fsyncs would buy nothing.
            durability: Durability::Process,
            heartbeat_interval: std::time::Duration::from_secs(2),
            node_timeout: std::time::Duration::from_secs(15),
            node_gone_after: std::time::Duration::from_secs(3600),
            retention: drover_controller::Retention::default(),
            connections: ConnectionLimits::default(),
            // The cluster lives and dies with this process on loopback; TLS would only
            // slow every `drover run` down.
            tls: None,
            nats_url: None,
        })
        .await?;
        let agent = start_agent(AgentOptions {
            server: server.url(),
            join_token: join,
            data_dir: dir.path().join("agent"),
            name: None,
            labels: BTreeMap::new(),
            capacity: None,
            runtimes,
            tls: None,
        })
        .await?;
        Ok(Ephemeral {
            server,
            agent,
            token,
            _dir: dir,
        })
    }

    pub async fn stop(self) {
        self.agent.shutdown().await;
        self.server.stop().await;
    }
}

pub fn ensure_dir(p: &Path) -> Result<()> {
    std::fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))
}
