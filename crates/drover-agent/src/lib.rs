//! The Drover agent: dials out to the controller, runs the tasks it is given through
//! its runtimes, ships their logs and reports their states.
//!
//! Nothing dials in to an agent. It keeps its identity, its outbox and its tasks'
//! directories in its data dir, so a restarted agent is the same node, replays what the
//! controller has not acknowledged and re-adopts the tasks it left running.

pub mod artifacts;
mod cache;
mod cleanup;
mod connection;
pub mod dataplane;
mod dirpool;
mod holdings;
mod link;
mod logship;
mod outbox;
pub mod platform;
mod prepare;
pub mod pyenv;
pub mod socket;
mod tasks;
pub mod unpack;
pub mod users;
pub mod vertex;

pub use tasks::TaskLimits;

use drover_core::NodeId;
use drover_core::quantity::ByteSize;
use drover_core::spec::{Resources, RuntimeKind};
use drover_core::state::NodeInfo;
use drover_runtime::Runtime;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tasks::TaskManager;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
pub struct AgentConfig {
    /// The controller's base URL, `http://host:port`.
    pub server: String,
    pub join_token: String,
    pub data_dir: PathBuf,
    /// The node's name; defaults to the host name.
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// What tasks may use; defaults to the machine's cores and memory.
    pub capacity: Option<Resources>,
    /// The runtimes this agent offers, chosen by its config.
    pub runtimes: Vec<Arc<dyn Runtime>>,
    pub limits: TaskLimits,
    /// The longest wait between reconnection attempts.
    pub max_backoff: Duration,
    /// Cached artifact blobs not used by a running task are evicted, least recently used
    /// first, past this many bytes.
    pub artifact_cache_bytes: u64,
    /// Platforms this node runs through an emulator, each with the emulator's
    /// executable (a path, or a bare name looked up in `PATH` when the agent starts).
    /// The emulator is run with the artifact's path and arguments after it.
    pub emulate: Vec<(drover_core::platform::Platform, PathBuf)>,
    /// The interpreter `runtime_env.python` environments are built with (a path, or a
    /// name looked up in the agent's `PATH` when the first one is built).
    pub python: PathBuf,
    /// Python environments no running task uses are evicted, least recently used
    /// first, past this many bytes.
    pub env_cache_bytes: u64,
    /// How an `https://` controller's certificate is trusted (a CA file, a pinned
    /// fingerprint); the system's roots when `None`. Unused for `http://`.
    pub tls: Option<drover_tls::ClientTls>,
    /// The uids process tasks run as, one per task, when the agent runs as root;
    /// `None` runs them as the agent's own user.
    pub task_uids: Option<std::ops::RangeInclusive<u32>>,
    /// The `drover` binary whose hidden `__vertex` subcommand runs built-in pipeline
    /// vertices; the agent's own executable by default. An agent running inside
    /// another program (a test) points it at the built `drover`; `None` fails
    /// built-in vertices' tasks with a reason.
    pub self_exe: Option<PathBuf>,
}

impl AgentConfig {
    pub fn new(
        server: String,
        join_token: String,
        data_dir: PathBuf,
        runtimes: Vec<Arc<dyn Runtime>>,
    ) -> Self {
        AgentConfig {
            server,
            join_token,
            data_dir,
            name: hostname(),
            labels: BTreeMap::new(),
            capacity: None,
            runtimes,
            limits: TaskLimits::default(),
            max_backoff: Duration::from_secs(10),
            artifact_cache_bytes: 10 << 30,
            emulate: Vec::new(),
            python: PathBuf::from("python3"),
            env_cache_bytes: 5 << 30,
            tls: None,
            task_uids: Some(users::DEFAULT_RANGE),
            self_exe: std::env::current_exe().ok(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("agent data dir {path}: {error}")]
    DataDir {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("bad server URL {0:?}: expected http://HOST:PORT or https://HOST:PORT")]
    ServerUrl(String),
    #[error(transparent)]
    Tls(#[from] drover_tls::TlsError),
    #[error("emulator {interpreter:?} for {platform}: {why}")]
    Emulator {
        platform: drover_core::platform::Platform,
        interpreter: PathBuf,
        why: String,
    },
}

/// Finds an emulator's executable: a path as given, a bare name in the agent's `PATH`.
/// The agent's own `PATH` is read here because the emulator is the agent's tool, chosen
/// by its operator; tasks never see it.
fn resolve_emulator(
    platform: &drover_core::platform::Platform,
    interpreter: &std::path::Path,
) -> Result<PathBuf, AgentError> {
    use std::os::unix::fs::PermissionsExt;
    let fail = |why: String| AgentError::Emulator {
        platform: platform.clone(),
        interpreter: interpreter.to_path_buf(),
        why,
    };
    let executable = |p: &std::path::Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if interpreter.components().count() > 1 || interpreter.is_absolute() {
        return if executable(interpreter) {
            Ok(interpreter.to_path_buf())
        } else {
            Err(fail("not an executable file".into()))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(interpreter))
        .find(|p| executable(p))
        .ok_or_else(|| {
            fail(format!(
                "not found in PATH ({}); install it or give its full path",
                path.to_string_lossy()
            ))
        })
}

/// A running agent. Dropping it does not stop it; call [`Agent::shutdown`].
pub struct Agent {
    node_id: NodeId,
    shutdown: CancellationToken,
    manager: Arc<TaskManager>,
    /// The controller connection; taken once it has been awaited.
    join: Option<tokio::task::JoinHandle<Result<(), String>>>,
}

/// Where the CLI also reads an agent's join token from, named in the agent's error when
/// the controller refuses it.
pub const JOIN_TOKEN_ENV_NAME: &str = "DROVER_JOIN_TOKEN";

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// The machine's cores and memory.
pub fn detect_capacity() -> Resources {
    let cpu = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as f64;
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(1 << 20);
    Resources {
        cpu,
        memory: ByteSize(mem_kib * 1024),
    }
}

/// The longest a shutdown waits for the controller connection to close.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// The longest a runtime's fingerprint may take before the runtime is not offered.
const FINGERPRINT_TIMEOUT: Duration = Duration::from_secs(10);

/// The node id an agent with this data directory has (created on first use). Runtimes
/// that label what they create with the node, like Docker, are built with it before the
/// agent starts.
pub fn load_node_id(dir: &std::path::Path) -> std::io::Result<NodeId> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("node-id");
    match std::fs::read_to_string(&path) {
        // A node id kept by an earlier agent is checked like any id from outside: a
        // hand-edited file must not smuggle a path into the controller's records.
        Ok(s) if !s.trim().is_empty() => NodeId::parse(s.trim()).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        }),
        _ => {
            let id = NodeId::generate();
            let tmp = dir.join("node-id.tmp");
            std::fs::write(&tmp, id.as_str())?;
            std::fs::rename(tmp, &path)?;
            Ok(id)
        }
    }
}

/// Sets the agent's directories up so process tasks can run as users of their own,
/// or says why they cannot. A task's user must reach its own directory (so every
/// directory above it must let others through) but nothing else of the agent's: the
/// data dir and the tasks dir let others through without listing them, the artifact
/// cache (every project's blobs; a task's artifact is a link in its own directory) is
/// the agent's alone, and the Python environments can be used but not listed or changed.
fn task_users(cfg: &AgentConfig) -> Result<users::TaskUsers, String> {
    use std::os::unix::fs::PermissionsExt;
    let Some(range) = cfg.task_uids.clone() else {
        return Err("the agent was started without a task uid range".into());
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(
            "the agent is not running as root, so it cannot run tasks as other users".into(),
        );
    }
    let data_dir = cfg
        .data_dir
        .canonicalize()
        .map_err(|e| format!("resolving {}: {e}", cfg.data_dir.display()))?;
    for above in data_dir.ancestors().skip(1) {
        let mode = std::fs::metadata(above)
            .map_err(|e| format!("reading {}: {e}", above.display()))?
            .permissions()
            .mode();
        if mode & 0o001 == 0 {
            return Err(format!(
                "{} (above the data dir) does not let other users through (mode {:o}); put the data dir where it does",
                above.display(),
                mode & 0o7777
            ));
        }
    }
    let set = |path: &std::path::Path, mode: u32| -> Result<(), String> {
        std::fs::create_dir_all(path)
            .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)))
            .map_err(|e| format!("setting up {}: {e}", path.display()))
    };
    // Files in the data dir itself (the outbox: every task's states and reasons) are
    // the agent's alone; the directory only lets tasks through to their own.
    for entry in std::fs::read_dir(&data_dir)
        .map_err(|e| format!("reading {}: {e}", data_dir.display()))?
        .flatten()
    {
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            set_file_mode(&entry.path(), 0o600)?;
        }
    }
    set(&data_dir, 0o711)?;
    set(&data_dir.join("tasks"), 0o711)?;
    set(&data_dir.join("tasks").join(".free"), 0o700)?;
    set(&data_dir.join("artifacts"), 0o700)?;
    set(&data_dir.join("envs"), 0o711)?;
    set(&data_dir.join("envs").join("python"), 0o711)?;
    Ok(users::TaskUsers::new(range))
}

/// The interpreter to build Python environments with when tasks run as other users: a
/// path is taken as given; a bare name is the first in the agent's `PATH` that every
/// user may run (its real file and every directory above it open to others), skipping,
/// say, a version manager's interpreters under a private home.
fn python_for_task_users(python: &std::path::Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    if python.components().count() > 1 || python.is_absolute() {
        return Some(python.to_path_buf());
    }
    let others_may_run = |candidate: &std::path::Path| -> bool {
        let Ok(real) = candidate.canonicalize() else {
            return false;
        };
        let file_ok = std::fs::metadata(&real)
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o001 != 0);
        file_ok
            && real.ancestors().skip(1).all(|dir| {
                std::fs::metadata(dir).is_ok_and(|m| m.permissions().mode() & 0o001 != 0)
            })
    };
    // The agent's own PATH is read because the interpreter is the agent's tool, chosen
    // by its operator; tasks never see this PATH.
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(python))
        .find(|candidate| candidate.is_file() && others_may_run(candidate))
}

fn set_file_mode(path: &std::path::Path, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("setting the mode of {}: {e}", path.display()))
}

impl Agent {
    /// Recovers the tasks a previous agent process left, then connects (and keeps
    /// reconnecting) in the background.
    pub async fn start(cfg: AgentConfig) -> Result<Agent, AgentError> {
        let dd = |error| AgentError::DataDir {
            path: cfg.data_dir.clone(),
            error,
        };
        std::fs::create_dir_all(&cfg.data_dir).map_err(dd)?;
        let url = connection::connect_url(&cfg.server)?;
        // TLS is set up only for a TLS URL, so a plain one never depends on the system's
        // certificate store.
        let tls = match &cfg.tls {
            _ if !url.starts_with("wss://") => None,
            Some(t) => Some(t.clone()),
            None => Some(drover_tls::ClientTls::new(None, None)?),
        };
        let emulate = cfg
            .emulate
            .iter()
            .map(|(p, i)| Ok((p.clone(), resolve_emulator(p, i)?)))
            .collect::<Result<Vec<_>, AgentError>>()?;
        let node_id = load_node_id(&cfg.data_dir).map_err(dd)?;
        // Fingerprints run side by side, each bounded, so one slow engine or plugin
        // neither delays the others nor holds up the agent.
        let prints = futures_util::future::join_all(cfg.runtimes.iter().map(|rt| async move {
            let r = tokio::time::timeout(FINGERPRINT_TIMEOUT, rt.fingerprint()).await;
            (rt, r)
        }))
        .await;
        let mut runtimes: HashMap<RuntimeKind, Arc<dyn Runtime>> = HashMap::new();
        let mut attributes = BTreeMap::new();
        for (rt, r) in prints {
            match r {
                Ok(Ok(fp)) => {
                    for (k, v) in fp.attributes {
                        attributes.insert(format!("{}.{k}", rt.kind()), v);
                    }
                    // Set by the agent from the trait, over anything the fingerprint
                    // said: a plugin reporting `stdin` itself must not have the scheduler
                    // send it input the agent cannot hand over.
                    let stdin = format!("{}.{}", rt.kind(), drover_core::spec::STDIN_ATTRIBUTE);
                    if rt.takes_stdin() {
                        attributes.insert(stdin, "true".into());
                    } else {
                        attributes.remove(&stdin);
                    }
                    // Vertex replicas are served over the task socket, which only
                    // process tasks are given.
                    let vertex = format!("{}.{}", rt.kind(), drover_core::spec::VERTEX_ATTRIBUTE);
                    if rt.kind() == RuntimeKind::Process {
                        attributes.insert(vertex, "true".into());
                    } else {
                        attributes.remove(&vertex);
                    }
                    runtimes.insert(rt.kind(), rt.clone());
                }
                Ok(Err(e)) => tracing::warn!("runtime {} is not offered: {e}", rt.kind()),
                Err(_) => tracing::warn!(
                    "runtime {} is not offered: its fingerprint took over {}s",
                    rt.kind(),
                    FINGERPRINT_TIMEOUT.as_secs()
                ),
            }
        }
        let shutdown = CancellationToken::new();
        let link = link::Link::default();
        let machine = platform::detect();
        let cache = artifacts::ArtifactCache::open(artifacts::CacheConfig {
            dir: cfg.data_dir.join("artifacts"),
            limit_bytes: cfg.artifact_cache_bytes,
            server: cfg.server.trim_end_matches('/').to_string(),
            token: cfg.join_token.clone(),
            timeout: Duration::from_secs(30),
            tls: tls.as_ref().map(|t| t.config()),
        })
        .map_err(dd)?;
        let users = match task_users(&cfg) {
            Ok(users) => Some(Arc::new(users)),
            Err(why) => {
                if runtimes.contains_key(&RuntimeKind::Process) {
                    tracing::warn!(
                        "process tasks run as the agent's own user and can see each other: {why}"
                    );
                    attributes.insert("process.isolation_note".into(), why);
                }
                None
            }
        };
        // What keeps process tasks apart here, in one word for `drover node ls`: their
        // own users, their own cgroups (limits enforced, nothing left behind), both or
        // neither. The runtime's attributes say why a part is missing.
        let cgroups = attributes
            .get("process.cgroup")
            .is_some_and(|v| v != "none");
        let isolation = match (users.is_some(), cgroups) {
            (true, true) => "user+cgroup",
            (true, false) => "user",
            (false, true) => "cgroup",
            (false, false) => "none",
        };
        if runtimes.contains_key(&RuntimeKind::Process) {
            attributes.insert("process.isolation".into(), isolation.into());
        }
        let python = {
            let mut pc = pyenv::PythonEnvConfig::new(cfg.data_dir.join("envs").join("python"));
            pc.python = cfg.python.clone();
            if users.is_some() {
                // An environment links to the interpreter it was made with, which its
                // tasks, running as other users, must be able to run too.
                match python_for_task_users(&cfg.python) {
                    Some(found) => pc.python = found,
                    None => tracing::warn!(
                        "no {} in the agent's PATH can be run by other users; tasks will not be able to use runtime_env.python",
                        cfg.python.display()
                    ),
                }
            }
            pc.max_bytes = cfg.env_cache_bytes;
            pyenv::PythonEnvs::new(pc).map_err(dd)?
        };
        let node_platform =
            machine
                .platform
                .parse()
                .ok()
                .map(|platform| drover_core::platform::NodePlatform {
                    platform,
                    libc: machine.libc.clone(),
                });
        let vertices = Arc::new(vertex::VertexSupport::new(cfg.self_exe.clone()));
        let manager = TaskManager::new(
            node_id.clone(),
            cfg.data_dir.clone(),
            runtimes.clone(),
            cfg.limits.clone(),
            link,
            shutdown.clone(),
            holdings::ArtifactSupport {
                cache,
                python,
                node: node_platform,
                emulate: emulate.clone(),
            },
            users,
            vertices,
        )
        .map_err(dd)?;
        manager.recover().await;
        manager.remove_orphans().await;
        {
            let manager = manager.clone();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {
                            // Recycled often, so a burst of short tasks soon reuses the
                            // directories of its own first tasks; idle, this costs nothing.
                            if manager.has_retired() {
                                let m = manager.clone();
                                let recycled = tokio::task::spawn_blocking(move || m.collect_garbage()).await;
                                if let Err(e) = recycled {
                                    tracing::warn!("recycling finished tasks' directories stopped: {e}");
                                }
                            }
                        }
                    }
                }
            });
        }
        {
            // Resource samples for heartbeats, taken apart from the connection so a slow
            // runtime never delays a heartbeat.
            let manager = manager.clone();
            let stop = shutdown.clone();
            let every = cfg.limits.stats_interval;
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(every) => manager.sample_usage().await,
                    }
                }
            });
        }
        let mut kinds: Vec<RuntimeKind> = runtimes.keys().cloned().collect();
        kinds.sort();
        let info = NodeInfo {
            name: cfg.name.clone(),
            platform: machine.platform,
            labels: cfg.labels.clone(),
            runtimes: kinds,
            capacity: cfg.capacity.unwrap_or_else(detect_capacity),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            attributes,
            libc: Some(machine.libc),
            uname: machine.uname.map(Box::new),
            agent_arch: machine.agent_arch,
            emulates: emulate.iter().map(|(p, _)| p.clone()).collect(),
        };
        let conn = connection::Connection::new(
            url,
            tls,
            cfg.clone(),
            node_id.clone(),
            info,
            manager.clone(),
            shutdown.clone(),
        );
        let join = tokio::spawn(conn.run());
        Ok(Agent {
            node_id,
            shutdown,
            manager,
            join: Some(join),
        })
    }

    pub fn node_id(&self) -> &NodeId {
        &self.node_id
    }

    /// How many artifact blobs this agent has downloaded; a cache hit makes none.
    pub fn artifact_downloads(&self) -> u64 {
        self.manager.artifact_downloads()
    }

    /// The node's Python environments (`runtime_env.python`).
    pub fn python_envs(&self) -> &Arc<pyenv::PythonEnvs> {
        self.manager.python_envs()
    }

    pub fn is_connected(&self) -> bool {
        self.manager.link.is_connected()
    }

    /// Tasks this agent is running (not those that ended and wait for an ack).
    pub fn running_tasks(&self) -> usize {
        self.manager.running_count()
    }

    /// Events written to the outbox that the controller has not acknowledged.
    pub fn unacked_events(&self) -> usize {
        self.manager.unacked()
    }

    /// Resolves when the agent stops on its own, which it does only when the controller
    /// refuses its join token before ever letting it in: the error says so. Pending
    /// forever once it has resolved.
    pub async fn stopped(&mut self) -> Result<(), String> {
        let Some(join) = self.join.as_mut() else {
            return std::future::pending().await;
        };
        let result = join.await;
        self.join = None;
        match result {
            Ok(r) => r,
            Err(e) => Err(format!("the controller connection ended abnormally: {e}")),
        }
    }

    /// Disconnects and stops. Running tasks are left running for the next agent process
    /// to adopt, as after a crash.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        let Some(join) = self.join else {
            // `stopped` saw the connection end already.
            return;
        };
        match tokio::time::timeout(SHUTDOWN_WAIT, join).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(why))) => tracing::warn!("the controller connection ended: {why}"),
            Ok(Err(e)) => tracing::warn!("the controller connection ended abnormally: {e}"),
            Err(_) => tracing::warn!(
                "the controller connection did not stop within {}s of the shutdown",
                SHUTDOWN_WAIT.as_secs()
            ),
        }
    }
}
