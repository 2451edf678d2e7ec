//! The `plugin` runtime (`runtime: plugin:<name>`): tasks are run by an external program,
//! the plugin, which the agent starts and talks to over a Unix socket with line-delimited
//! JSON. The protocol is described in `docs/plugin-protocol.md`.
//!
//! The plugin is a child of the agent in a process group of its own, with only `PATH` and
//! `DROVER_PLUGIN_SOCKET` in its environment. It is started on the first request and
//! restarted, with a capped backoff, on the first request after it crashed.
//!
//! A misbehaving plugin must never hold up the agent or another runtime, so each
//! connection has one reader task, one writer task and one supervisor task; a request is
//! a line queued for the writer plus an entry in a bounded map of pending requests, which
//! the reader completes when the reply with its id arrives; and every request has a
//! timeout. A task's end is reported by the plugin as an `exited` event, which is what
//! [`Runtime::wait`] waits for. When the plugin dies, every pending request fails at once
//! and every task it was running ends with [`ExitStatus::Unknown`] naming the crash.

use crate::process::DEFAULT_PATH;
use crate::shim::signal_name;
use crate::status::{settle, wait_status};
use crate::{
    ExitStatus, Fingerprint, Recovered, Runtime, RuntimeError, Started, StopOutcome, TaskContext,
    TaskStats,
};
use async_trait::async_trait;
use drover_core::TaskId;
use drover_core::spec::{JobSpec, RuntimeKind};
use drover_core::state::PortBinding;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::process::Child;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The protocol version this agent speaks, sent and checked in `hello`.
pub const PROTOCOL_VERSION: u64 = 1;

/// The environment variable that tells the plugin where to listen.
pub const SOCKET_ENV: &str = "DROVER_PLUGIN_SOCKET";

/// The longest line accepted from the plugin. Replies are small, but a `list` of many
/// tasks is not; a longer line is discarded rather than buffered without bound.
const MAX_LINE: usize = 16 << 20;

/// The longest line of the plugin's own output that is logged whole.
const MAX_LOG_LINE: usize = 64 << 10;

/// How often connecting to the socket is retried while the plugin starts up.
const CONNECT_RETRY: Duration = Duration::from_millis(20);

/// How long a plugin that closed its connection gets to exit on its own, so that the
/// crash can be reported with its exit status, before it is killed.
const EXIT_GRACE: Duration = Duration::from_millis(300);

/// How long a plugin may take to end after SIGKILL before it is given up on. SIGKILL
/// cannot be caught, so only a process stuck in the kernel gets here.
const REAP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long after a stop's reply the task's `exited` event may still be missing. The
/// protocol has the plugin send the event before the reply, so this only guards against
/// a plugin that never sends it.
const STOP_SETTLE: Duration = Duration::from_secs(5);

/// A plugin that ran at least this long before it crashed restarts after the shortest
/// backoff again.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);

/// The wait before the first restart after a failure; it doubles with each further one.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// How many of the plugin's last output lines are kept to explain a failed start.
const OUTPUT_TAIL: usize = 5;

/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// How much of an unreadable line is quoted in a log or an error.
const EXCERPT: usize = 200;

/// How long [`PluginRuntime::shutdown`] waits for the plugin to be killed and reaped.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(15);

/// Settings of one plugin runtime, from the agent's `--plugin NAME=PATH` flags.
#[derive(Clone, Debug)]
pub struct PluginConfig {
    /// The name jobs use in `runtime: plugin:<name>`.
    pub name: String,
    /// The plugin executable.
    pub path: PathBuf,
    /// A directory of the agent's where the socket, `<name>.sock`, is created. Created
    /// (mode 0700) if missing. Its path must be short: a socket path is at most 107 bytes.
    pub state_dir: PathBuf,
    /// How long a request may wait for its reply, except for the ones below.
    pub request_timeout: Duration,
    /// How long `prepare` and `start` may take (a start with a health check may also take
    /// up to its `start_deadline` plus `request_timeout`). `stop` may take its grace
    /// period plus `request_timeout`.
    pub start_timeout: Duration,
    /// How long starting the plugin may take, from spawning it to its answer to `hello`.
    pub connect_timeout: Duration,
    /// The longest wait between restarts of a plugin that keeps failing.
    pub max_backoff: Duration,
    /// The most requests that may wait for a reply at once; more fail at once.
    pub max_pending: usize,
}

impl PluginConfig {
    /// A config with the default timeouts.
    pub fn new(
        name: impl Into<String>,
        path: impl Into<PathBuf>,
        state_dir: impl Into<PathBuf>,
    ) -> Self {
        PluginConfig {
            name: name.into(),
            path: path.into(),
            state_dir: state_dir.into(),
            request_timeout: Duration::from_secs(10),
            start_timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(10),
            max_backoff: Duration::from_secs(10),
            max_pending: 1024,
        }
    }

    /// Where the plugin is told to listen: `<state_dir>/<name>.sock`, with any character
    /// of the name that could upset a path replaced by `_`.
    pub fn socket_path(&self) -> PathBuf {
        let file: String = self
            .name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.state_dir.join(format!("{file}.sock"))
    }
}

/// Runs tasks through an external plugin. Dropping it (or [`PluginRuntime::shutdown`])
/// kills the plugin; the tasks it runs are left running for a later agent to re-adopt.
pub struct PluginRuntime {
    shared: Arc<Shared>,
}

/// What the runtime's handle and its background tasks share.
struct Shared {
    cfg: PluginConfig,
    /// The current connection and the restart backoff. Held while a plugin is being
    /// started, so that concurrent requests start it only once.
    slot: tokio::sync::Mutex<Slot>,
    tasks: Mutex<HashMap<TaskId, Arc<TaskEntry>>>,
    /// Set once, when the runtime is shut down or dropped.
    shutdown: watch::Sender<bool>,
    /// The pid of the live plugin process, for tests and diagnostics.
    pid: Mutex<Option<u32>>,
    /// The supervisor of the latest plugin process, awaited by `shutdown`.
    supervisor: Mutex<Option<JoinHandle<()>>>,
    generations: AtomicU64,
}

#[derive(Default)]
struct Slot {
    conn: Option<Arc<Conn>>,
    /// Failures since the plugin last ran healthily; sets the backoff.
    failures: u32,
    next_attempt: Option<Instant>,
    last_error: String,
}

/// What the runtime keeps for one task.
struct TaskEntry {
    /// The connection (plugin process) the task was started or re-adopted on; its death
    /// ends the task's wait.
    generation: u64,
    /// The task directory, sent along with `stop`, `stats` and `destroy`.
    dir: PathBuf,
    status: watch::Sender<Option<ExitStatus>>,
}

impl TaskEntry {
    fn new(generation: u64, dir: PathBuf) -> Self {
        TaskEntry {
            generation,
            dir,
            status: watch::channel(None).0,
        }
    }

    fn is_running(&self) -> bool {
        self.status.borrow().is_none()
    }

    /// Records how the task ended; the first status recorded wins.
    fn finish(&self, status: ExitStatus) {
        self.status.send_if_modified(|current| {
            if current.is_some() {
                return false;
            }
            *current = Some(status);
            true
        });
    }
}

/// One plugin process and its connection.
struct Conn {
    generation: u64,
    started: Instant,
    outgoing: mpsc::Sender<String>,
    pending: Mutex<Pending>,
    next_id: AtomicU64,
    /// Set by the supervisor once the plugin has died or been killed.
    death: watch::Sender<Option<Death>>,
    max_pending: usize,
}

#[derive(Clone, Debug)]
struct Death {
    /// What happened, phrased to follow "plugin NAME crashed: it ".
    reason: String,
    /// Whether it was killed because the runtime was shut down, which is no crash.
    shutdown: bool,
    at: Instant,
}

#[derive(Default)]
struct Pending {
    waiting: HashMap<u64, Waiter>,
    /// Once set, no more requests are accepted; the message says why.
    closed: Option<String>,
}

struct Waiter {
    method: String,
    reply: oneshot::Sender<Result<Value, CallError>>,
}

/// Why a request got no usable reply.
#[derive(Debug)]
enum CallError {
    /// The plugin answered with an error.
    Plugin {
        code: String,
        message: String,
    },
    /// The plugin answered this request with something that is no reply.
    Malformed(String),
    /// The plugin died (or was shut down) before answering; the message says which.
    Closed(String),
    Timeout(Duration),
    /// The request could not even be sent.
    Busy(String),
}

/// What the reader or writer tells the supervisor.
enum Failure {
    /// The connection broke; the plugin has probably died.
    Broken(String),
    /// The plugin is given up on (it failed to start properly) and must be killed.
    Abandon(String),
}

/// What [`read_line`] found.
#[derive(Debug, PartialEq, Eq)]
enum LineRead {
    Line,
    /// A line longer than the limit, discarded.
    TooLong,
    Eof,
}

/// The plugin's reply to `hello`.
#[derive(Deserialize)]
struct HelloReply {
    protocol: u64,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    version: Option<String>,
}

#[derive(Deserialize)]
struct FingerprintReply {
    #[serde(default)]
    attributes: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
struct StartReply {
    #[serde(default)]
    ports: Vec<PortBinding>,
}

#[derive(Deserialize)]
struct StopReply {
    outcome: String,
}

#[derive(Deserialize)]
struct RecoverReply {
    state: String,
    #[serde(default)]
    status: Option<Value>,
}

#[derive(Deserialize)]
struct StatsReply {
    cpu_seconds: f64,
    memory_bytes: u64,
}

#[derive(Deserialize)]
struct ListReply {
    tasks: Vec<String>,
}

/// An exit status as the plugin writes it.
#[derive(Deserialize)]
struct StatusWire {
    #[serde(default)]
    code: Option<i32>,
    #[serde(default)]
    signal: Option<String>,
    #[serde(default)]
    oom: bool,
    #[serde(default)]
    unknown: Option<String>,
}

/// The params of `prepare`, `start` and `recover`: the whole task context.
#[derive(Serialize)]
struct ContextParams<'a> {
    task_id: &'a TaskId,
    job_name: &'a str,
    index: u32,
    spec: &'a JobSpec,
    dir: &'a str,
    env: &'a BTreeMap<String, String>,
    stdout_path: &'a str,
    stderr_path: &'a str,
}

impl PluginRuntime {
    /// Creates the runtime. Nothing is started until the first request.
    pub fn new(cfg: PluginConfig) -> Self {
        PluginRuntime {
            shared: Arc::new(Shared {
                cfg,
                slot: tokio::sync::Mutex::new(Slot::default()),
                tasks: Mutex::new(HashMap::new()),
                shutdown: watch::channel(false).0,
                pid: Mutex::new(None),
                supervisor: Mutex::new(None),
                generations: AtomicU64::new(0),
            }),
        }
    }

    pub fn config(&self) -> &PluginConfig {
        &self.shared.cfg
    }

    /// The pid of the plugin process while one is running (it is also its process group).
    pub fn plugin_pid(&self) -> Option<u32> {
        *lock(&self.shared.pid)
    }

    /// Kills the plugin and stops every background task; later requests fail. Tasks the
    /// plugin runs are left running, and waits for them do not resolve, since they have
    /// not ended: a later agent re-adopts them with `recover`.
    pub async fn shutdown(&self) {
        self.shared.shutdown.send_replace(true);
        let supervisor = lock(&self.shared.supervisor).take();
        if let Some(supervisor) = supervisor
            && tokio::time::timeout(SHUTDOWN_WAIT, supervisor)
                .await
                .is_err()
        {
            tracing::warn!(plugin = %self.shared.cfg.name, "the plugin did not end in time");
        }
    }
}

impl Drop for PluginRuntime {
    fn drop(&mut self) {
        // The supervisor sees this and kills the plugin; it cannot be awaited here.
        self.shared.shutdown.send_replace(true);
    }
}

impl Shared {
    fn name(&self) -> &str {
        &self.cfg.name
    }

    fn tasks(&self) -> MutexGuard<'_, HashMap<TaskId, Arc<TaskEntry>>> {
        lock(&self.tasks)
    }

    fn entry(&self, id: &TaskId) -> Result<Arc<TaskEntry>, RuntimeError> {
        self.tasks()
            .get(id)
            .cloned()
            .ok_or_else(|| RuntimeError::UnknownTask(id.clone()))
    }

    fn is_shut_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    fn shut_down_error(&self) -> RuntimeError {
        RuntimeError::Unavailable(format!("plugin {} has been shut down", self.name()))
    }

    /// How a crash (or shutdown) reads in an error or a task's status.
    fn death_message(&self, death: &Death) -> String {
        if death.shutdown {
            format!("plugin {} was shut down", self.name())
        } else {
            format!("plugin {} crashed: it {}", self.name(), death.reason)
        }
    }

    /// The live connection, starting the plugin if there is none (waiting out the
    /// restart backoff first). Bounded by the connect timeout.
    async fn connection(self: &Arc<Self>) -> Result<Arc<Conn>, RuntimeError> {
        let name = self.name();
        let deadline = Instant::now() + self.cfg.connect_timeout;
        let mut slot = tokio::time::timeout_at(deadline, self.slot.lock())
            .await
            .map_err(|_| {
                RuntimeError::Unavailable(format!(
                    "plugin {name} is still being started after {:?}",
                    self.cfg.connect_timeout
                ))
            })?;
        if self.is_shut_down() {
            return Err(self.shut_down_error());
        }
        if let Some(conn) = &slot.conn {
            let Some(death) = conn.death() else {
                return Ok(conn.clone());
            };
            // Counted here, once per dead connection, rather than by the supervisor, so
            // that all the backoff bookkeeping lives under the slot's lock.
            slot.failures = if death.at.duration_since(conn.started) >= HEALTHY_AFTER {
                1
            } else {
                slot.failures.saturating_add(1)
            };
            slot.next_attempt = Some(death.at + self.backoff(slot.failures));
            slot.last_error = format!("crashed: it {}", death.reason);
            slot.conn = None;
        }
        if let Some(at) = slot.next_attempt
            && at > Instant::now()
        {
            if at > deadline {
                return Err(RuntimeError::Unavailable(format!(
                    "plugin {name} is waiting {:.1}s before its next restart; it last {}",
                    at.duration_since(Instant::now()).as_secs_f64(),
                    slot.last_error
                )));
            }
            let mut shutdown = self.shutdown.subscribe();
            tokio::select! {
                () = tokio::time::sleep_until(at) => {}
                () = shut_down(&mut shutdown) => return Err(self.shut_down_error()),
            }
        }
        match self.launch(deadline).await {
            Ok(conn) => {
                slot.conn = Some(conn.clone());
                slot.next_attempt = None;
                Ok(conn)
            }
            Err(why) => {
                slot.failures = slot.failures.saturating_add(1);
                slot.next_attempt = Some(Instant::now() + self.backoff(slot.failures));
                slot.last_error = format!("failed to start: {why}");
                tracing::warn!(plugin = %name, "the plugin could not be started: {why}");
                Err(RuntimeError::Unavailable(format!(
                    "plugin {name} could not be started: {why}"
                )))
            }
        }
    }

    fn backoff(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(20);
        FIRST_BACKOFF
            .saturating_mul(1 << doublings)
            .min(self.cfg.max_backoff)
    }

    /// Starts the plugin process, connects to its socket and says hello. On failure the
    /// process is killed and the error says why, with the plugin's last output.
    async fn launch(self: &Arc<Self>, deadline: Instant) -> Result<Arc<Conn>, String> {
        let cfg = &self.cfg;
        let socket = cfg.socket_path();
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(format!(
                "its socket path {} is longer than {MAX_SOCKET_PATH} bytes; use a shorter state directory",
                socket.display()
            ));
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&cfg.state_dir)
            .map_err(|e| format!("cannot create {}: {e}", cfg.state_dir.display()))?;
        // A socket left by an earlier plugin process would be connected to (and refuse),
        // or mistaken for the new plugin being ready.
        match std::fs::remove_file(&socket) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(format!("cannot remove {}: {e}", socket.display()));
            }
            _ => {}
        }

        let mut cmd = tokio::process::Command::new(&cfg.path);
        // The plugin gets the agent's PATH (it is the operator's software, like the agent
        // itself, and may be a script needing an interpreter) but nothing else of the
        // agent's environment; tasks get exactly the environment in their requests.
        cmd.env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into()),
            )
            .env(SOCKET_ENV, &socket)
            .current_dir(&cfg.state_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // A group of its own keeps terminal signals meant for the agent away from it
            // and lets the whole plugin be killed at once.
            .process_group(0)
            // Should the supervisor never get to run (the Tokio runtime going away), the
            // plugin still dies with the handle.
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", cfg.path.display()))?;
        let Some(pid) = child.id() else {
            // `id` is only None once the child has been reaped, and nothing has waited
            // for it yet.
            return Err("it vanished right after it was spawned".into());
        };
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let mut loggers = Vec::new();
        if let Some(out) = child.stdout.take() {
            loggers.push(tokio::spawn(log_output(
                cfg.name.clone(),
                "stdout",
                out,
                tail.clone(),
            )));
        }
        if let Some(err) = child.stderr.take() {
            loggers.push(tokio::spawn(log_output(
                cfg.name.clone(),
                "stderr",
                err,
                tail.clone(),
            )));
        }

        let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
        // Every queued line belongs to a pending request, so the queue is bounded by the
        // same limit (plus lines of requests that already timed out, see `request`).
        let (outgoing, outgoing_rx) = mpsc::channel(cfg.max_pending.max(1));
        let conn = Arc::new(Conn {
            generation,
            started: Instant::now(),
            outgoing,
            pending: Mutex::new(Pending::default()),
            next_id: AtomicU64::new(1),
            death: watch::channel(None).0,
            max_pending: cfg.max_pending.max(1),
        });
        // Room for one failure from each of the reader, the writer and the launch.
        let (failures, failures_rx) = mpsc::channel(4);
        *lock(&self.pid) = Some(pid);
        let supervisor = tokio::spawn(supervise(
            self.clone(),
            conn.clone(),
            child,
            pid,
            failures_rx,
        ));
        *lock(&self.supervisor) = Some(supervisor);
        tracing::debug!(plugin = %cfg.name, pid, "started the plugin");

        let result = async {
            let stream = self.connect(&conn, &socket, deadline).await?;
            let (read, write) = stream.into_split();
            tokio::spawn(read_replies(
                self.clone(),
                conn.clone(),
                read,
                failures.clone(),
            ));
            tokio::spawn(write_requests(
                write,
                outgoing_rx,
                conn.death.subscribe(),
                failures.clone(),
            ));
            self.hello(&conn, deadline).await
        }
        .await;
        if let Err(why) = result {
            if failures.try_send(Failure::Abandon(why.clone())).is_err() {
                // A full channel means a failure is already on its way to the
                // supervisor, which kills the plugin either way; a closed one, that the
                // runtime is shutting down.
            }
            // The last lines may still be in the pipe when the plugin has just died.
            for logger in loggers {
                match tokio::time::timeout(Duration::from_millis(200), logger).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(plugin = %cfg.name, "reading its output stopped: {e}")
                    }
                    // Still reading: what it has not read is missing from the tail
                    // below, which says what it has.
                    Err(_) => {}
                }
            }
            let tail = lock(&tail).iter().cloned().collect::<Vec<_>>().join(" | ");
            return Err(if tail.is_empty() {
                why
            } else {
                format!("{why}; its last output: {tail}")
            });
        }
        Ok(conn)
    }

    /// Connects to the plugin's socket, retrying while the plugin starts listening.
    async fn connect(
        &self,
        conn: &Conn,
        socket: &Path,
        deadline: Instant,
    ) -> Result<UnixStream, String> {
        let mut death = conn.death.subscribe();
        let mut shutdown = self.shutdown.subscribe();
        loop {
            if let Some(death) = conn.death() {
                return Err(format!(
                    "it {} before listening on its socket",
                    death.reason
                ));
            }
            let error = match UnixStream::connect(socket).await {
                Ok(stream) => return Ok(stream),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(format!(
                    "it did not listen on {} within {:?} ({error})",
                    socket.display(),
                    self.cfg.connect_timeout
                ));
            }
            tokio::select! {
                () = tokio::time::sleep(CONNECT_RETRY) => {}
                () = dead(&mut death) => {}
                () = shut_down(&mut shutdown) => return Err("the runtime was shut down".into()),
            }
        }
    }

    /// The protocol handshake.
    async fn hello(&self, conn: &Conn, deadline: Instant) -> Result<(), String> {
        let params = json!({ "protocol": PROTOCOL_VERSION, "runtime": self.name() });
        let timeout = deadline.saturating_duration_since(Instant::now());
        let reply = match conn.request("hello", params, timeout).await {
            Ok(reply) => reply,
            Err(CallError::Timeout(_)) => {
                return Err(format!(
                    "it did not answer hello within {:?}",
                    self.cfg.connect_timeout
                ));
            }
            Err(CallError::Plugin { code, message }) => {
                return Err(format!("it refused hello: {message} ({code})"));
            }
            Err(CallError::Malformed(detail)) => {
                return Err(format!("it sent a malformed reply to hello: {detail}"));
            }
            Err(CallError::Closed(message) | CallError::Busy(message)) => {
                return Err(match conn.death() {
                    Some(death) => format!("it {} before answering hello", death.reason),
                    None => message,
                });
            }
        };
        let hello: HelloReply = serde_json::from_value(reply)
            .map_err(|e| format!("it sent a malformed reply to hello: {e}"))?;
        if hello.protocol != PROTOCOL_VERSION {
            return Err(format!(
                "it speaks protocol version {}, but the agent speaks {PROTOCOL_VERSION}",
                hello.protocol
            ));
        }
        tracing::info!(
            plugin = %self.name(),
            reported_name = hello.name.as_deref().unwrap_or(""),
            version = hello.version.as_deref().unwrap_or(""),
            "connected to the plugin"
        );
        Ok(())
    }

    /// Sends a request on the live connection (starting the plugin if needed).
    async fn call(
        self: &Arc<Self>,
        method: &str,
        params: Value,
        timeout: Duration,
        task: Option<&TaskId>,
    ) -> Result<Value, RuntimeError> {
        let conn = self.connection().await?;
        conn.request(method, params, timeout)
            .await
            .map_err(|e| self.error(method, task, e))
    }

    /// Turns a failed request into the error the agent shows, naming the plugin and the
    /// method.
    fn error(&self, method: &str, task: Option<&TaskId>, e: CallError) -> RuntimeError {
        let name = self.name();
        match e {
            CallError::Plugin { code, message } => match (code.as_str(), task) {
                ("unknown_task", Some(task)) => RuntimeError::UnknownTask(task.clone()),
                ("start_failed" | "already_running", _) => RuntimeError::Start(message),
                ("unavailable", _) => {
                    RuntimeError::Unavailable(format!("plugin {name}: {message}"))
                }
                _ => RuntimeError::Other(format!(
                    "plugin {name}: {method} failed: {message} ({code})"
                )),
            },
            CallError::Malformed(detail) => RuntimeError::Other(format!(
                "plugin {name} sent a malformed reply to {method}: {detail}"
            )),
            CallError::Closed(message) => {
                RuntimeError::Unavailable(format!("{message} (while handling {method})"))
            }
            CallError::Timeout(timeout) => RuntimeError::Unavailable(format!(
                "plugin {name} did not answer {method} within {timeout:?}"
            )),
            CallError::Busy(why) => {
                RuntimeError::Unavailable(format!("plugin {name} cannot take {method}: {why}"))
            }
        }
    }

    /// Decodes a reply's result, or says that it is malformed.
    fn decode<T: DeserializeOwned>(&self, method: &str, value: Value) -> Result<T, RuntimeError> {
        serde_json::from_value(value).map_err(|e| {
            RuntimeError::Other(format!(
                "plugin {} sent a malformed reply to {method}: {e}",
                self.name()
            ))
        })
    }

    /// Records a task as run by `conn`. Should the plugin have died already, the task is
    /// ended at once: the supervisor marks the tasks it finds after the death is recorded,
    /// and this checks the death after the task is recorded, so one of them sees the other.
    fn insert_task(&self, id: &TaskId, entry: Arc<TaskEntry>, conn: &Conn) {
        self.tasks().insert(id.clone(), entry.clone());
        if let Some(death) = conn.death() {
            entry.finish(ExitStatus::Unknown(self.death_message(&death)));
        }
    }

    /// Forgets a task, unless it has been replaced in the meantime.
    fn remove_task(&self, id: &TaskId, entry: &Arc<TaskEntry>) {
        let mut tasks = self.tasks();
        if tasks.get(id).is_some_and(|e| Arc::ptr_eq(e, entry)) {
            tasks.remove(id);
        }
    }

    /// Ends every task the dead plugin process was running.
    fn fail_tasks(&self, generation: u64, message: &str) {
        let entries: Vec<_> = self
            .tasks()
            .values()
            .filter(|e| e.generation == generation)
            .cloned()
            .collect();
        for entry in entries {
            entry.finish(ExitStatus::Unknown(message.to_string()));
        }
    }

    /// Handles one line from the plugin: a reply, an event, or garbage (logged).
    fn handle_line(&self, conn: &Conn, line: &[u8]) {
        let name = self.name();
        let line = line.trim_ascii();
        if line.is_empty() {
            return;
        }
        let map = match serde_json::from_slice::<Value>(line) {
            Ok(Value::Object(map)) => map,
            Ok(_) => {
                tracing::warn!(plugin = %name, line = %excerpt(line), "ignored a line that is not a JSON object");
                return;
            }
            Err(e) => {
                tracing::warn!(plugin = %name, line = %excerpt(line), "ignored a line that is not JSON: {e}");
                return;
            }
        };
        if let Some(id) = map.get("id") {
            let Some(id) = id.as_u64() else {
                tracing::warn!(plugin = %name, line = %excerpt(line), "ignored a reply whose id is not a request number");
                return;
            };
            let waiter = lock(&conn.pending).waiting.remove(&id);
            let Some(waiter) = waiter else {
                // Most likely a reply that came after its request timed out.
                tracing::debug!(plugin = %name, id, "ignored a reply to no pending request");
                return;
            };
            let reply = parse_reply(map, line);
            if let Err(CallError::Malformed(detail)) = &reply {
                tracing::warn!(plugin = %name, method = %waiter.method, "malformed reply: {detail}");
            }
            if waiter.reply.send(reply).is_err() {
                // The requester has just given up; nobody needs the reply.
            }
            return;
        }
        match map.get("event").and_then(Value::as_str) {
            Some("exited") => self.handle_exited(&map, line),
            Some(other) => {
                tracing::debug!(plugin = %name, event = other, "ignored an unknown event");
            }
            None => {
                tracing::warn!(plugin = %name, line = %excerpt(line), "ignored a line that is neither a reply nor an event");
            }
        }
    }

    fn handle_exited(&self, map: &Map<String, Value>, line: &[u8]) {
        let name = self.name();
        let Some(task_id) = map.get("task_id").and_then(Value::as_str) else {
            tracing::warn!(plugin = %name, line = %excerpt(line), "ignored an exited event without a task_id");
            return;
        };
        let task_id = TaskId::from(task_id);
        let Some(entry) = self.tasks().get(&task_id).cloned() else {
            tracing::debug!(plugin = %name, task = %task_id, "ignored an exited event for an unknown task");
            return;
        };
        // The task has ended either way, so an unreadable status still ends it.
        let status = map
            .get("status")
            .ok_or_else(|| "no status".to_string())
            .and_then(|s| parse_status(s.clone()))
            .unwrap_or_else(|e| {
                ExitStatus::Unknown(format!(
                    "plugin {name} reported an unreadable exit status ({e}): {}",
                    excerpt(line)
                ))
            });
        tracing::debug!(plugin = %name, task = %task_id, ?status, "task exited");
        entry.finish(status);
    }

    fn context_params(&self, ctx: &TaskContext) -> Result<Value, RuntimeError> {
        let params = ContextParams {
            task_id: &ctx.task_id,
            job_name: &ctx.job_name,
            index: ctx.index,
            spec: &ctx.spec,
            dir: utf8(&ctx.dir)?,
            env: &ctx.env,
            stdout_path: utf8(&ctx.stdout_path)?,
            stderr_path: utf8(&ctx.stderr_path)?,
        };
        serde_json::to_value(params)
            .map_err(|e| RuntimeError::Other(format!("cannot encode the task for the plugin: {e}")))
    }
}

impl Conn {
    fn death(&self) -> Option<Death> {
        self.death.borrow().clone()
    }

    /// Sends a request and waits, up to `timeout`, for its reply.
    async fn request(
        &self,
        method: &str,
        params: Value,
        timeout: Duration,
    ) -> Result<Value, CallError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        {
            let mut pending = lock(&self.pending);
            if let Some(message) = &pending.closed {
                return Err(CallError::Closed(message.clone()));
            }
            if pending.waiting.len() >= self.max_pending {
                return Err(CallError::Busy(format!(
                    "{} requests are already waiting for its replies",
                    pending.waiting.len()
                )));
            }
            pending.waiting.insert(
                id,
                Waiter {
                    method: method.to_string(),
                    reply,
                },
            );
        }
        // However this ends (reply, timeout, or the caller giving up), the request must
        // not stay in the map.
        let _guard = PendingGuard { conn: self, id };
        let line = format!(
            "{}\n",
            json!({ "id": id, "method": method, "params": params })
        );
        match self.outgoing.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(CallError::Busy(
                    "it is not reading its requests (the queue is full)".into(),
                ));
            }
            Err(TrySendError::Closed(_)) => {
                let message = lock(&self.pending)
                    .closed
                    .clone()
                    .unwrap_or_else(|| "its connection is closed".into());
                return Err(CallError::Closed(message));
            }
        }
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(result)) => result,
            // The waiter is only dropped unanswered when the connection closes.
            Ok(Err(_)) => Err(CallError::Closed(
                lock(&self.pending)
                    .closed
                    .clone()
                    .unwrap_or_else(|| "its connection closed".into()),
            )),
            Err(_) => Err(CallError::Timeout(timeout)),
        }
    }

    /// Fails every pending request and refuses new ones, then records the death.
    fn close(&self, death: Death, message: &str) {
        let waiting = {
            let mut pending = lock(&self.pending);
            pending.closed = Some(message.to_string());
            std::mem::take(&mut pending.waiting)
        };
        for waiter in waiting.into_values() {
            let closed = Err(CallError::Closed(message.to_string()));
            if waiter.reply.send(closed).is_err() {
                // The requester has just given up; nobody needs to hear why.
            }
        }
        self.death.send_replace(Some(death));
    }
}

/// Removes a request from the pending map when its caller is done with it.
struct PendingGuard<'a> {
    conn: &'a Conn,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        lock(&self.conn.pending).waiting.remove(&self.id);
    }
}

#[async_trait]
impl Runtime for PluginRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Plugin(self.shared.cfg.name.clone())
    }

    async fn fingerprint(&self) -> Result<Fingerprint, RuntimeError> {
        let shared = &self.shared;
        let reply = shared
            .call("fingerprint", json!({}), shared.cfg.request_timeout, None)
            .await?;
        let reply: FingerprintReply = shared.decode("fingerprint", reply)?;
        let attributes = reply
            .attributes
            .into_iter()
            .map(|(k, v)| match v {
                Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect();
        Ok(Fingerprint {
            kind: self.kind(),
            attributes,
        })
    }

    async fn prepare(&self, ctx: &TaskContext) -> Result<(), RuntimeError> {
        let shared = &self.shared;
        let params = shared.context_params(ctx)?;
        shared
            .call(
                "prepare",
                params,
                shared.cfg.start_timeout,
                Some(&ctx.task_id),
            )
            .await
            .map(|_| ())
    }

    async fn start(&self, ctx: &TaskContext) -> Result<Started, RuntimeError> {
        let shared = &self.shared;
        if shared.entry(&ctx.task_id).is_ok_and(|e| e.is_running()) {
            return Err(RuntimeError::Start(format!(
                "task {} is already running",
                ctx.task_id
            )));
        }
        let params = shared.context_params(ctx)?;
        let conn = shared.connection().await?;
        // Recorded before the request, so that an exited event racing the reply is kept.
        let entry = Arc::new(TaskEntry::new(conn.generation, ctx.dir.clone()));
        shared.insert_task(&ctx.task_id, entry.clone(), &conn);
        let timeout = match &ctx.spec.health {
            Some(health) => shared.cfg.start_timeout.max(
                health
                    .start_deadline
                    .0
                    .saturating_add(shared.cfg.request_timeout),
            ),
            None => shared.cfg.start_timeout,
        };
        match conn.request("start", params, timeout).await {
            Ok(reply) => {
                let reply: StartReply = shared.decode("start", reply)?;
                tracing::debug!(plugin = %shared.name(), task = %ctx.task_id, "started task");
                Ok(Started { ports: reply.ports })
            }
            // The plugin may still start the task after we gave up; the agent then stops
            // and destroys it, which needs the entry.
            Err(e @ CallError::Timeout(_)) => Err(shared.error("start", Some(&ctx.task_id), e)),
            Err(e) => {
                shared.remove_task(&ctx.task_id, &entry);
                Err(shared.error("start", Some(&ctx.task_id), e))
            }
        }
    }

    async fn wait(&self, id: &TaskId) -> Result<ExitStatus, RuntimeError> {
        let mut status = self.shared.entry(id)?.status.subscribe();
        wait_status(&mut status).await
    }

    async fn stop(&self, id: &TaskId, grace: Duration) -> Result<StopOutcome, RuntimeError> {
        let shared = &self.shared;
        let entry = shared.entry(id)?;
        if !entry.is_running() {
            return Ok(StopOutcome::AlreadyExited);
        }
        let conn = shared.connection().await?;
        let mut status = entry.status.subscribe();
        if conn.generation != entry.generation {
            // The plugin that ran the task has died, which ends the task's wait (the
            // supervisor is about to record it, if it has not yet).
            settle(&mut status, STOP_SETTLE, &format!("task {id}")).await?;
            return Ok(StopOutcome::AlreadyExited);
        }
        let params = json!({
            "task_id": id,
            "grace_ms": u64::try_from(grace.as_millis()).unwrap_or(u64::MAX),
            "dir": utf8(&entry.dir)?,
        });
        let timeout = grace.saturating_add(shared.cfg.request_timeout);
        let reply = conn
            .request("stop", params, timeout)
            .await
            .map_err(|e| shared.error("stop", Some(id), e))?;
        let reply: StopReply = shared.decode("stop", reply)?;
        let outcome = match reply.outcome.as_str() {
            "graceful" => StopOutcome::Graceful,
            "killed" => StopOutcome::Killed,
            "already_exited" => StopOutcome::AlreadyExited,
            other => {
                return Err(RuntimeError::Other(format!(
                    "plugin {} sent an unknown stop outcome {other:?}",
                    shared.name()
                )));
            }
        };
        if settle(&mut status, STOP_SETTLE, &format!("task {id}"))
            .await
            .is_err()
        {
            // A stop returns once the task has ended, so it has; only how is unknown.
            entry.finish(ExitStatus::Unknown(format!(
                "plugin {} stopped the task but reported no exit status",
                shared.name()
            )));
        }
        Ok(outcome)
    }

    async fn destroy(&self, id: &TaskId) -> Result<(), RuntimeError> {
        let shared = &self.shared;
        let entry = shared.tasks().remove(id);
        let mut params = json!({ "task_id": id });
        if let Some(entry) = &entry {
            params["dir"] = Value::String(utf8(&entry.dir)?.to_string());
        }
        // Sent even for a task this runtime no longer knows (after a crash or a restart),
        // so that the plugin can clean up whatever it still holds for it.
        match shared
            .call("destroy", params, shared.cfg.request_timeout, Some(id))
            .await
        {
            Ok(_) | Err(RuntimeError::UnknownTask(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn recover(&self, ctx: &TaskContext) -> Result<Recovered, RuntimeError> {
        let shared = &self.shared;
        if let Ok(entry) = shared.entry(&ctx.task_id) {
            // Already known to this runtime, e.g. a repeated recovery.
            return Ok(match entry.status.borrow().clone() {
                None => Recovered::Adopted,
                Some(status) => Recovered::Exited(status),
            });
        }
        let params = shared.context_params(ctx)?;
        let conn = shared.connection().await?;
        // Recorded before the request, like a start, so that no event is missed.
        let entry = Arc::new(TaskEntry::new(conn.generation, ctx.dir.clone()));
        shared.insert_task(&ctx.task_id, entry.clone(), &conn);
        let result = async {
            let reply = conn
                .request("recover", params, shared.cfg.request_timeout)
                .await
                .map_err(|e| shared.error("recover", Some(&ctx.task_id), e))?;
            let reply: RecoverReply = shared.decode("recover", reply)?;
            match (reply.state.as_str(), reply.status) {
                ("adopted", _) => Ok(Recovered::Adopted),
                ("gone", _) => Ok(Recovered::Gone),
                ("exited", Some(status)) => {
                    parse_status(status).map(Recovered::Exited).map_err(|e| {
                        RuntimeError::Other(format!(
                            "plugin {} sent a malformed reply to recover: {e}",
                            shared.name()
                        ))
                    })
                }
                (state, _) => Err(RuntimeError::Other(format!(
                    "plugin {} sent a malformed reply to recover: state {state:?}",
                    shared.name()
                ))),
            }
        }
        .await;
        if !matches!(result, Ok(Recovered::Adopted)) {
            shared.remove_task(&ctx.task_id, &entry);
        }
        result
    }

    async fn stats(&self, id: &TaskId) -> Result<TaskStats, RuntimeError> {
        let shared = &self.shared;
        let mut params = json!({ "task_id": id });
        if let Ok(entry) = shared.entry(id) {
            params["dir"] = Value::String(utf8(&entry.dir)?.to_string());
        }
        let reply = shared
            .call("stats", params, shared.cfg.request_timeout, Some(id))
            .await?;
        let reply: StatsReply = shared.decode("stats", reply)?;
        Ok(TaskStats {
            cpu_seconds: reply.cpu_seconds,
            memory_bytes: reply.memory_bytes,
        })
    }

    async fn list(&self) -> Result<Vec<TaskId>, RuntimeError> {
        let shared = &self.shared;
        let reply = shared
            .call("list", json!({}), shared.cfg.request_timeout, None)
            .await?;
        let reply: ListReply = shared.decode("list", reply)?;
        Ok(reply.tasks.into_iter().map(TaskId).collect())
    }
}

/// Owns the plugin process: notices its death (it exits, or its connection breaks),
/// kills it when it must go, and then fails what depended on it. Ends once the plugin has
/// been reaped.
async fn supervise(
    shared: Arc<Shared>,
    conn: Arc<Conn>,
    mut child: Child,
    pid: u32,
    mut failures: mpsc::Receiver<Failure>,
) {
    let mut shutdown = shared.shutdown.subscribe();
    let (reason, is_shutdown) = tokio::select! {
        status = child.wait() => (describe_exit(status), false),
        failure = failures.recv() => match failure {
            Some(Failure::Broken(why)) => {
                // Give it a moment to exit on its own, so that the crash can be reported
                // with its exit status rather than as the broken connection.
                match tokio::time::timeout(EXIT_GRACE, child.wait()).await {
                    Ok(status) => (describe_exit(status), false),
                    Err(_) => {
                        kill(&mut child, pid, shared.name()).await;
                        (why, false)
                    }
                }
            }
            Some(Failure::Abandon(why)) => {
                tracing::debug!(plugin = %shared.name(), pid, "giving up on the plugin: {why}");
                kill(&mut child, pid, shared.name()).await;
                ("was given up on while it started".to_string(), false)
            }
            // Every sender is gone although nothing was reported: the launch was
            // abandoned before its reader and writer existed (its caller gave up), and
            // a plugin nobody is connected to must not be left running.
            None => {
                kill(&mut child, pid, shared.name()).await;
                ("was given up on while it started".to_string(), false)
            }
        },
        () = shut_down(&mut shutdown) => {
            kill(&mut child, pid, shared.name()).await;
            ("was shut down".to_string(), true)
        }
    };
    {
        let mut current = lock(&shared.pid);
        if *current == Some(pid) {
            *current = None;
        }
    }
    let death = Death {
        reason,
        shutdown: is_shutdown,
        at: Instant::now(),
    };
    let message = shared.death_message(&death);
    if is_shutdown {
        tracing::debug!(plugin = %shared.name(), pid, "stopped the plugin");
    } else {
        tracing::warn!(plugin = %shared.name(), pid, "{message}");
    }
    conn.close(death, &message);
    // On shutdown the tasks have not ended; they keep running for a later agent.
    if !is_shutdown {
        shared.fail_tasks(conn.generation, &message);
    }
}

/// Kills the plugin's process group and reaps the plugin.
async fn kill(child: &mut Child, pid: u32, name: &str) {
    // Only while the plugin has not been reaped is its pid, and so its group id, certainly
    // still its own; `try_wait` reaps it if it has just exited, and then it is left alone.
    if let Ok(None) = child.try_wait()
        && let Ok(pgid) = i32::try_from(pid)
        && let Err(errno) = killpg(Pid::from_raw(pgid), Signal::SIGKILL)
    {
        tracing::warn!(plugin = %name, "killing its process group: {errno}");
    }
    if tokio::time::timeout(REAP_TIMEOUT, child.wait())
        .await
        .is_err()
    {
        tracing::warn!(plugin = %name, pid, "the plugin did not end after SIGKILL");
    }
}

/// Reads the plugin's replies and events until the connection ends or the plugin dies.
async fn read_replies(
    shared: Arc<Shared>,
    conn: Arc<Conn>,
    read: OwnedReadHalf,
    failures: mpsc::Sender<Failure>,
) {
    let mut reader = BufReader::new(read);
    let mut death = conn.death.subscribe();
    let mut line = Vec::new();
    loop {
        line.clear();
        let read = tokio::select! {
            read = read_line(&mut reader, &mut line, MAX_LINE) => read,
            () = dead(&mut death) => return,
        };
        match read {
            Ok(LineRead::Line) => shared.handle_line(&conn, &line),
            Ok(LineRead::TooLong) => {
                tracing::warn!(plugin = %shared.name(), "ignored a line longer than {MAX_LINE} bytes");
            }
            Ok(LineRead::Eof) => {
                report(&failures, Failure::Broken("closed its connection".into())).await;
                return;
            }
            Err(e) => {
                report(
                    &failures,
                    Failure::Broken(format!("broke its connection: {e}")),
                )
                .await;
                return;
            }
        }
    }
}

/// Writes queued requests to the plugin until the plugin dies.
async fn write_requests(
    mut write: OwnedWriteHalf,
    mut lines: mpsc::Receiver<String>,
    mut death: watch::Receiver<Option<Death>>,
    failures: mpsc::Sender<Failure>,
) {
    loop {
        let line = tokio::select! {
            line = lines.recv() => line,
            () = dead(&mut death) => return,
        };
        let Some(line) = line else { return };
        // A plugin that does not read blocks this write, so it too must end with the
        // plugin.
        let written = tokio::select! {
            written = write.write_all(line.as_bytes()) => written,
            () = dead(&mut death) => return,
        };
        if let Err(e) = written {
            report(
                &failures,
                Failure::Broken(format!("broke its connection: {e}")),
            )
            .await;
            return;
        }
    }
}

/// Logs the plugin's own output line by line, keeping the last few lines to explain a
/// failed start.
async fn log_output(
    name: String,
    stream: &'static str,
    pipe: impl AsyncRead + Unpin,
    tail: Arc<Mutex<VecDeque<String>>>,
) {
    let mut reader = BufReader::new(pipe);
    let mut line = Vec::new();
    loop {
        line.clear();
        match read_line(&mut reader, &mut line, MAX_LOG_LINE).await {
            Ok(LineRead::Line) => {
                let text = String::from_utf8_lossy(line.trim_ascii_end()).into_owned();
                tracing::info!(plugin = %name, stream, "{text}");
                let mut tail = lock(&tail);
                if tail.len() == OUTPUT_TAIL {
                    tail.pop_front();
                }
                tail.push_back(text);
            }
            Ok(LineRead::TooLong) => {
                tracing::info!(plugin = %name, stream, "(a line longer than {MAX_LOG_LINE} bytes)");
            }
            Ok(LineRead::Eof) | Err(_) => return,
        }
    }
}

/// Reads one line (without its newline) into `buf`, discarding a line longer than `max`
/// instead of buffering it. A last line without a newline still counts as a line.
async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> io::Result<LineRead> {
    let mut too_long = false;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(match (too_long, buf.is_empty()) {
                (true, _) => LineRead::TooLong,
                (false, true) => LineRead::Eof,
                (false, false) => LineRead::Line,
            });
        }
        let (used, complete) = match available.iter().position(|&b| b == b'\n') {
            Some(at) => (at + 1, true),
            None => (available.len(), false),
        };
        let chunk = &available[..used];
        let chunk = chunk.strip_suffix(b"\n").unwrap_or(chunk);
        if !too_long {
            if buf.len() + chunk.len() > max {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(chunk);
            }
        }
        reader.consume(used);
        if complete {
            return Ok(if too_long {
                LineRead::TooLong
            } else {
                LineRead::Line
            });
        }
    }
}

/// Reads a reply object into the result the requester gets.
fn parse_reply(mut map: Map<String, Value>, line: &[u8]) -> Result<Value, CallError> {
    if let Some(error) = map.remove("error") {
        let code = error
            .get("code")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string();
        let message = match error.get("message").and_then(Value::as_str) {
            Some(message) => message.to_string(),
            None => error.to_string(),
        };
        return Err(CallError::Plugin { code, message });
    }
    match map.remove("result") {
        Some(result) => Ok(result),
        None => Err(CallError::Malformed(format!(
            "a reply with neither result nor error: {}",
            excerpt(line)
        ))),
    }
}

/// Reads an exit status as the plugin writes it.
fn parse_status(value: Value) -> Result<ExitStatus, String> {
    let text = value.to_string();
    let wire: StatusWire = serde_json::from_value(value).map_err(|e| format!("{e}: {text}"))?;
    if wire.oom {
        return Ok(ExitStatus::OutOfMemory(wire.code));
    }
    match (wire.signal, wire.code, wire.unknown) {
        (Some(signal), _, _) => Ok(ExitStatus::Signaled(signal)),
        (None, Some(code), _) => Ok(ExitStatus::Exited(code)),
        (None, None, Some(why)) => Ok(ExitStatus::Unknown(why)),
        (None, None, None) => Err(format!("no code, signal, oom or unknown in {text}")),
    }
}

/// Tells the plugin's supervisor that its connection failed.
async fn report(failures: &mpsc::Sender<Failure>, failure: Failure) {
    if failures.send(failure).await.is_err() {
        // The supervisor is gone, so the runtime is shutting down and the plugin with
        // it: nobody is left to act on the failure.
    }
}

/// Resolves once the connection's death has been recorded.
async fn dead(death: &mut watch::Receiver<Option<Death>>) {
    // The guard `wait_for` returns is dropped within this condition, so it is never held
    // across an await (it is not Send).
    if death.wait_for(Option::is_some).await.is_err() {
        // A closed channel means the connection is gone, which is what this waits for.
    }
}

/// Resolves once the runtime is shut down.
async fn shut_down(shutdown: &mut watch::Receiver<bool>) {
    if shutdown.wait_for(|down| *down).await.is_err() {
        // A closed channel means the runtime itself is gone, which is a shutdown too.
    }
}

fn describe_exit(status: io::Result<std::process::ExitStatus>) -> String {
    match status {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => format!("exited with code {code}"),
            (None, Some(signo)) => format!("was killed by {}", signal_name(signo)),
            (None, None) => format!("ended with {status:?}"),
        },
        Err(e) => format!("could not be waited for: {e}"),
    }
}

fn utf8(path: &Path) -> Result<&str, RuntimeError> {
    path.to_str().ok_or_else(|| {
        RuntimeError::Other(format!(
            "the path {} is not valid UTF-8, which the plugin protocol cannot carry",
            path.display()
        ))
    })
}

/// The start of a line, for logs and errors.
fn excerpt(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(line);
    let mut excerpt: String = text.chars().take(EXCERPT).collect();
    if excerpt.len() < text.len() {
        excerpt.push('…');
    }
    excerpt
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every section holding these locks is short and does not panic, so a poisoned lock
    // still holds consistent data and is safe to keep using.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines(input: &[u8], max: usize) -> Vec<(LineRead, String)> {
        let mut reader = BufReader::with_capacity(4, input);
        let mut out = Vec::new();
        loop {
            let mut buf = Vec::new();
            let read = read_line(&mut reader, &mut buf, max).await.unwrap();
            if read == LineRead::Eof {
                return out;
            }
            out.push((read, String::from_utf8(buf).unwrap()));
        }
    }

    #[tokio::test]
    async fn lines_are_split_and_over_long_ones_discarded() {
        let got = lines(b"one\n0123456789\ntwo\nlast", 6).await;
        assert_eq!(
            got,
            vec![
                (LineRead::Line, "one".to_string()),
                (LineRead::TooLong, String::new()),
                (LineRead::Line, "two".to_string()),
                (LineRead::Line, "last".to_string()),
            ]
        );
    }

    #[test]
    fn statuses_are_read_like_the_protocol_says() {
        let parse = |v: Value| parse_status(v).unwrap();
        assert_eq!(parse(json!({"code": 3})), ExitStatus::Exited(3));
        assert_eq!(
            parse(json!({"signal": "SIGKILL"})),
            ExitStatus::Signaled("SIGKILL".into())
        );
        assert_eq!(
            parse(json!({"oom": true, "code": 137})),
            ExitStatus::OutOfMemory(Some(137))
        );
        assert_eq!(
            parse(json!({"unknown": "why"})),
            ExitStatus::Unknown("why".into())
        );
        assert!(parse_status(json!({})).is_err());
        assert!(parse_status(json!({"code": "three"})).is_err());
    }

    #[test]
    fn replies_carry_results_errors_or_are_malformed() {
        let map = |v: Value| match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        };
        assert_eq!(
            parse_reply(map(json!({"id": 1, "result": {"a": 1}})), b"").unwrap(),
            json!({"a": 1})
        );
        match parse_reply(
            map(json!({"id": 1, "error": {"code": "unknown_task", "message": "no"}})),
            b"",
        ) {
            Err(CallError::Plugin { code, message }) => {
                assert_eq!((code.as_str(), message.as_str()), ("unknown_task", "no"));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            parse_reply(map(json!({"id": 1, "oops": true})), b"x"),
            Err(CallError::Malformed(_))
        ));
    }

    #[test]
    fn socket_names_are_safe_and_backoff_is_capped() {
        let mut cfg = PluginConfig::new("my/plugin x", "/bin/true", "/run/drover");
        assert_eq!(
            cfg.socket_path(),
            PathBuf::from("/run/drover/my_plugin_x.sock")
        );
        cfg.max_backoff = Duration::from_secs(1);
        let rt = PluginRuntime::new(cfg);
        let backoff = |n| rt.shared.backoff(n);
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(2), Duration::from_millis(200));
        assert_eq!(backoff(5), Duration::from_secs(1));
        assert_eq!(backoff(u32::MAX), Duration::from_secs(1));
    }
}
