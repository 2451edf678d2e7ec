//! The Drover controller: the HTTP API, authentication, the scheduler, the agent
//! gateway, node liveness and metrics.
//!
//! All decisions are made under one lock on [`State`], the in-memory view of the store.
//! Every operation changes memory and records the change in a [`Tx`]; the transaction is
//! committed to the store before anything is acknowledged (an HTTP response, an event
//! ack to an agent). If a commit fails, memory is reloaded from the store, so the two
//! never disagree about anything that was acknowledged.

mod api;
mod artifacts;
mod auth;
pub mod blobs;
mod buffer_calls;
mod buffers;
mod error;
mod follow;
mod gateway;
pub mod logs;
pub mod metrics;
mod ops;
mod pipelines;
mod plan;
mod retention;
mod rollout;
mod scheduler;
mod serve;
pub mod state;
mod tenants;
mod vertices;

use drover_core::protocol::ControllerMessage;
use drover_core::{Millis, NodeId, ProjectId, now_millis};
use drover_store::{Change, Role, Store, StoreError, TokenRecord, hash_token};
use state::State;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;

pub use api::ROUTES;
pub use auth::Principal;
pub use buffers::BufferSettings;
pub use drover_core::api::MAX_BLOB_SIZE_HEADER;
pub use retention::Retention;
pub use tenants::reset_admin_token;

/// A token the controller makes sure exists at start-up (the admin and join tokens of
/// `drover up`).
#[derive(Clone, Debug)]
pub struct BootstrapToken {
    pub secret: String,
    pub role: Role,
    pub name: String,
}

#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Where task logs (`logs/`) and artifact blobs (`blobs/sha256/`) are kept.
    pub data_dir: PathBuf,
    /// How often agents must send a heartbeat.
    pub heartbeat_interval: Duration,
    /// A node silent for this long is unreachable: its tasks are unknown until their
    /// job's `disconnect.lost_after`, then replaced.
    pub node_timeout: Duration,
    /// A node unreachable for this long is lost: its tasks that are still unknown are
    /// lost (and replaced where their job allows).
    pub node_gone_after: Duration,
    /// Unacknowledged commands are sent again after this long.
    pub command_resend_after: Duration,
    /// A task must reach `running` within this long of being scheduled.
    pub start_deadline: Duration,
    /// A task asked to stop must have ended this long after its `stop_grace`; if its
    /// agent never says so, the task is marked lost and the agent told to forget it.
    pub stop_deadline: Duration,
    pub bootstrap_tokens: Vec<BootstrapToken>,
    /// The largest blob an upload may store; larger ones are refused with 413.
    pub max_blob_size: u64,
    /// A blob no artifact references is kept this long after it was last written, since
    /// it may belong to a push whose artifact is not created yet.
    pub blob_grace: Duration,
    /// How long a connection may take to send a request's headers. The clock starts
    /// when the connection opens and again whenever a kept-alive connection waits for
    /// its next request, so this is also how long an idle keep-alive connection is kept
    /// (hyper has one timer for both). It stops once the headers are in: a streaming
    /// answer (`logs -f`) or an agent's WebSocket is never cut by it.
    pub header_read_timeout: Duration,
    /// The most connections one client address may hold open; more are closed as soon
    /// as they are accepted. Agents behind one NAT address count together.
    pub max_connections_per_ip: usize,
    /// The most connections held open at once from everyone; more are closed as soon as
    /// they are accepted. The default is the open-file limit less a reserve, so the
    /// controller keeps descriptors for its store, logs and blobs.
    pub max_connections: usize,
    /// How long finished jobs, replaced attempts and lost nodes are kept.
    pub retention: Retention,
    /// The commit the binary was built from, which `/health` reports; the binary knows
    /// it, this library does not.
    pub commit: Option<String>,
    /// Where pipelines' buffers are kept besides the embedded backend.
    pub buffers: BufferSettings,
}

impl ControllerConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        ControllerConfig {
            data_dir,
            heartbeat_interval: Duration::from_secs(2),
            node_timeout: Duration::from_secs(15),
            node_gone_after: Duration::from_secs(3600),
            command_resend_after: Duration::from_secs(3),
            start_deadline: Duration::from_secs(300),
            stop_deadline: Duration::from_secs(30),
            bootstrap_tokens: Vec::new(),
            max_blob_size: 2 << 30,
            blob_grace: Duration::from_secs(3600),
            header_read_timeout: Duration::from_secs(10),
            max_connections_per_ip: 256,
            max_connections: serve::default_max_connections(),
            retention: Retention::default(),
            commit: None,
            buffers: BufferSettings::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("pipeline buffers: {0}")]
    Buffers(#[from] drover_buffer::BufferError),
}

/// An open agent connection.
struct Session {
    conn_id: u64,
    tx: mpsc::Sender<Arc<str>>,
}

pub(crate) struct Inner {
    cfg: ControllerConfig,
    store: Arc<dyn Store>,
    state: Mutex<State>,
    sessions: std::sync::Mutex<HashMap<NodeId, Session>>,
    next_conn: std::sync::atomic::AtomicU64,
    /// Bumped on every committed change and stored log chunk; followers wait on it.
    changed: watch::Sender<u64>,
    schedule: Notify,
    logs: logs::LogStore,
    blobs: blobs::BlobStore,
    metrics: metrics::Metrics,
    /// Every token by the hash of its secret, loaded at start-up and kept current by
    /// token creation and revocation; requests read it without the state lock.
    tokens: std::sync::Mutex<HashMap<String, TokenRecord>>,
    /// Each node's cached environments, as last reported; kept in memory only, since
    /// agents report them again on every new connection.
    node_envs: std::sync::Mutex<HashMap<NodeId, Vec<drover_core::state::EnvInfo>>>,
    /// Which projects may use each blob: those that uploaded it, or whose artifacts or
    /// jobs name it. Blobs are stored once for everyone, but a project sees only these,
    /// so a digest cannot tell one project what another has stored. Rebuilt from the
    /// artifacts and jobs at start-up; an upload nothing names yet must be sent again
    /// after a restart.
    blob_owners: std::sync::Mutex<
        HashMap<drover_core::artifact::Digest, std::collections::HashSet<ProjectId>>,
    >,
    /// Nodes that came back after being unreachable and whose tasks are settled at
    /// their first heartbeat; read on every heartbeat without the state lock.
    returning: std::sync::Mutex<std::collections::HashSet<NodeId>>,
    /// The pipelines' buffer backends.
    buffers: buffers::Buffers,
    /// The pipeline and vertex controllers' observations and wake-up.
    pipes: pipelines::Runtime,
    shutdown: CancellationToken,
}

/// A running controller. Cloning shares it.
#[derive(Clone)]
pub struct Controller {
    inner: Arc<Inner>,
}

/// Changes made under the state lock, waiting to be committed.
#[derive(Default)]
pub(crate) struct Tx {
    changes: Vec<Change>,
}

impl Tx {
    /// Applies a change to memory and records it for the commit.
    pub(crate) fn put(&mut self, state: &mut State, change: Change) {
        state.apply(change.clone());
        self.changes.push(change);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }
}

impl Controller {
    /// Loads the store, makes sure the bootstrap tokens exist and starts the background
    /// loops (scheduler, liveness). They stop on [`Controller::shutdown`].
    pub async fn start(
        cfg: ControllerConfig,
        store: Arc<dyn Store>,
    ) -> Result<Controller, ControllerError> {
        let mut snap = store.load().await?;
        let snap_tokens = std::mem::take(&mut snap.tokens);
        let mut state = State::from_snapshot(snap);
        let now = now_millis();
        // Agents have to reconnect to a new controller; until they do (or the lost
        // timeout runs out) their nodes are disconnected, counted from now.
        let mut changes = Vec::new();
        for e in state.nodes.values_mut() {
            if e.node.status == drover_core::state::NodeStatus::Ready {
                e.node.status = drover_core::state::NodeStatus::Disconnected;
                changes.push(Change::Node(e.node.clone()));
            }
            e.node.last_seen = now;
        }
        let mut tokens: HashMap<String, TokenRecord> = snap_tokens
            .into_iter()
            .map(|t| (t.hash.clone(), t))
            .collect();
        for b in &cfg.bootstrap_tokens {
            let hash = hash_token(&b.secret);
            // The configuration decides a bootstrap secret's role (stores from before the
            // cluster role held these as "admin"); a revocation, though, stands: the way
            // back is a new secret.
            let wanted = match tokens.get(&hash) {
                Some(t) if t.role == b.role => None,
                Some(t) => Some(TokenRecord {
                    role: b.role,
                    ..t.clone()
                }),
                None => Some(TokenRecord {
                    hash: hash.clone(),
                    project: ProjectId::default(),
                    role: b.role,
                    name: b.name.clone(),
                    created_at: now,
                    revoked: false,
                }),
            };
            if let Some(t) = wanted {
                tokens.insert(hash, t.clone());
                changes.push(Change::Token(t));
            }
        }
        if !state.projects.contains_key(&ProjectId::default()) {
            let p = drover_core::auth::Project {
                name: ProjectId::default(),
                created_at: now,
            };
            state.apply(Change::Project(p.clone()));
            changes.push(Change::Project(p));
        }
        store.commit(&changes).await?;
        let metrics = metrics::Metrics::new();
        let logs = logs::LogStore::new(cfg.data_dir.join("logs"), metrics.log_bytes.clone())?;
        let known: std::collections::HashSet<_> = state.tasks.keys().cloned().collect();
        let orphans = logs.remove_unknown(&known);
        if orphans > 0 {
            tracing::info!(
                tasks = orphans,
                "removed the logs of tasks that are no longer stored"
            );
        }
        let blobs =
            blobs::BlobStore::open(cfg.data_dir.join("blobs").join("sha256"), cfg.max_blob_size)?;
        let buffers = buffers::Buffers::open(&cfg.data_dir, &cfg.buffers).await?;
        let (changed, _) = watch::channel(0);
        let blob_owners = artifacts::owners_from(&state);
        let inner = Arc::new(Inner {
            cfg,
            store,
            state: Mutex::new(state),
            sessions: std::sync::Mutex::new(HashMap::new()),
            next_conn: std::sync::atomic::AtomicU64::new(1),
            changed,
            schedule: Notify::new(),
            logs,
            blobs,
            metrics,
            tokens: std::sync::Mutex::new(tokens),
            node_envs: std::sync::Mutex::new(HashMap::new()),
            blob_owners: std::sync::Mutex::new(blob_owners),
            returning: std::sync::Mutex::new(Default::default()),
            buffers,
            pipes: pipelines::Runtime::default(),
            shutdown: CancellationToken::new(),
        });
        let c = Controller { inner };
        tokio::spawn(scheduler::run(c.inner.clone()));
        tokio::spawn(ops::liveness_loop(c.inner.clone()));
        tokio::spawn(artifacts::gc_loop(c.inner.clone()));
        tokio::spawn(retention::gc_loop(c.inner.clone()));
        tokio::spawn(pipelines::run(c.inner.clone()));
        Ok(c)
    }

    /// The HTTP routes: the API, `/health`, `/metrics` and the agent WebSocket.
    pub fn router(&self) -> axum::Router {
        api::router(self.inner.clone())
    }

    /// Serves the router on `listener` until shutdown, within the config's connection
    /// limits (header timeout, per-address and overall caps).
    pub async fn serve(&self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        serve::serve(
            self.inner.clone(),
            self.router(),
            listener,
            self.limits(),
            None,
        )
        .await
    }

    /// Serves the router over TLS with `tls` (HTTPS, and WSS for agents), within the
    /// same limits as [`Controller::serve`]; a TLS handshake must end within the header
    /// timeout.
    pub async fn serve_tls(
        &self,
        listener: tokio::net::TcpListener,
        tls: Arc<drover_tls::rustls::ServerConfig>,
    ) -> std::io::Result<()> {
        let acceptor = drover_tls::tokio_rustls::TlsAcceptor::from(tls);
        serve::serve(
            self.inner.clone(),
            self.router(),
            listener,
            self.limits(),
            Some(acceptor),
        )
        .await
    }

    fn limits(&self) -> serve::Limits {
        let cfg = &self.inner.cfg;
        serve::Limits {
            header_read_timeout: cfg.header_read_timeout,
            max_per_ip: cfg.max_connections_per_ip,
            max_total: cfg.max_connections,
        }
    }

    /// Stops the background loops and the server, and closes agent connections.
    pub fn shutdown(&self) {
        self.inner.shutdown.cancel();
        self.inner.sessions_lock().clear();
    }

    /// Applies a job whose spec carries a vertex plane, as the vertex controller does,
    /// for embedders and tests of the data path that do without a pipeline. The HTTP API
    /// refuses such specs from users; a caller holding the `Controller` already holds
    /// its store, so this opens nothing to a tenant.
    pub async fn apply_vertex_job(
        &self,
        project: ProjectId,
        spec: drover_core::spec::JobSpec,
    ) -> Result<drover_core::api::ApplyResponse, String> {
        if spec.vertex.is_none() {
            return Err(format!("job {} has no vertex", spec.name));
        }
        spec.validate()?;
        self.inner
            .apply_job(project, spec, ops::ApplyOptions::default())
            .await
            .map_err(|e| e.to_string())
    }

    /// The number of agents connected right now.
    pub fn connected_agents(&self) -> usize {
        self.inner.sessions_lock().len()
    }
}

/// A controller message as the text frame that goes on the wire.
pub(crate) fn frame(msg: &ControllerMessage) -> Arc<str> {
    // These plain types always serialise; an empty frame would be ignored by the agent.
    serde_json::to_string(msg).unwrap_or_default().into()
}

impl Inner {
    pub(crate) fn sessions_lock(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, Session>> {
        // A panic while holding this lock cannot leave the map half-changed (every
        // operation on it is a single insert or remove), so a poisoned lock is usable.
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn returning_lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<NodeId>> {
        // Every operation on the set is a single insert or remove, so a poisoned lock
        // still holds a consistent set.
        self.returning.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Commits a transaction. On failure memory is rebuilt from the store, so nothing
    /// unacknowledged lingers in memory, and the error is returned to the caller.
    pub(crate) async fn commit(&self, state: &mut State, tx: Tx) -> Result<(), StoreError> {
        if tx.is_empty() {
            return Ok(());
        }
        match self.store.commit(&tx.changes).await {
            Ok(()) => {
                self.bump();
                Ok(())
            }
            Err(e) => {
                tracing::error!("commit failed, reloading state from the store: {e}");
                match self.store.load().await {
                    Ok(snap) => {
                        let pending_reasons = std::mem::take(&mut state.pending_reasons);
                        *state = State::from_snapshot(snap);
                        state.pending_reasons = pending_reasons;
                    }
                    Err(e2) => tracing::error!("reloading state failed too: {e2}"),
                }
                Err(e)
            }
        }
    }

    pub(crate) fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    pub(crate) fn now(&self) -> Millis {
        now_millis()
    }
}
