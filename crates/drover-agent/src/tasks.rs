//! The task manager: owns every task's state machine on this node.
//!
//! Each task is driven by one tokio task through preparing, starting and running to a
//! terminal state, with a deadline on each step. Every transition is written to the
//! outbox before it is sent. A task's directory holds `task.json` (its assignment), so
//! a restarted agent finds its tasks again and asks the runtime to re-adopt them.

use crate::dirpool::DirPool;
use crate::holdings::{ArtifactSupport, Holdings, RetireQueue};
use crate::link::Link;
use crate::logship::{LogShipper, log_path};
use crate::outbox::Outbox;
use crate::prepare::steps::{CONFIG_FILE, PrepareContext, STEPS, TaskFile};
use crate::prepare::{Guards, prepare_all, readopt_all};
use crate::users::TaskUsers;
use drover_core::protocol::{AgentEvent, Command, LogStream, TaskAssignment, UsageSample};
use drover_core::spec::RuntimeKind;
use drover_core::state::{Exit, TaskUsage};
use drover_core::{NodeId, TaskId, TaskState, now_millis};
use drover_runtime::sandbox::TaskUser;
use drover_runtime::{ExitStatus, Recovered, Runtime, StopOutcome, TaskContext};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How many emptied task directories are kept for reuse.
const POOL_CAP: usize = 4096;

/// Limits the task manager enforces.
#[derive(Clone, Debug)]
pub struct TaskLimits {
    pub prepare_timeout: Duration,
    pub start_timeout: Duration,
    /// Per log file, before rotation.
    pub log_max_bytes: u64,
    /// How often running tasks' logs are shipped.
    pub log_interval: Duration,
    /// How often running tasks' resource use is sampled (sent with heartbeats).
    pub stats_interval: Duration,
    /// How long a finished task's directory stays before it is recycled, so that
    /// anything still finishing with it (a log copier's last write, say) is done.
    pub keep_finished_for: Duration,
}

impl Default for TaskLimits {
    fn default() -> Self {
        TaskLimits {
            prepare_timeout: Duration::from_secs(600),
            start_timeout: Duration::from_secs(60),
            log_max_bytes: 16 << 20,
            log_interval: Duration::from_millis(100),
            stats_interval: Duration::from_secs(10),
            keep_finished_for: Duration::from_millis(200),
        }
    }
}

#[derive(Clone, Debug)]
struct StopRequest {
    grace: Duration,
    reason: String,
    /// Forget: end it and report nothing; the controller no longer owns it.
    forget: bool,
}

struct Entry {
    stop: watch::Sender<Option<StopRequest>>,
    shipper: Arc<LogShipper>,
    /// The outbox seq of its terminal event, once sent; the entry goes when it is acked.
    terminal_seq: Option<u64>,
    runtime: RuntimeKind,
    /// What the task's preparation put in place that outlives its run (its directory
    /// and its user), undone when the task is retired.
    kept: Guards,
}

pub struct TaskManager {
    node_id: NodeId,
    tasks_dir: PathBuf,
    runtimes: HashMap<RuntimeKind, Arc<dyn Runtime>>,
    limits: TaskLimits,
    entries: Mutex<HashMap<TaskId, Entry>>,
    outbox: Mutex<Outbox>,
    /// What the node holds for its tasks, which their prepare steps share.
    pub(crate) holdings: Arc<Holdings>,
    pub(crate) link: Link,
    /// Woken whenever an event is written to the outbox.
    pub(crate) events_ready: tokio::sync::Notify,
    shutdown: CancellationToken,
    /// The latest resource sample of each running task.
    usage: Mutex<HashMap<TaskId, TaskUsage>>,
}

impl TaskManager {
    // Each argument is a separate part the agent builds at start-up and hands over once;
    // bundling them in a struct only for this call would add a type and no clarity.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        node_id: NodeId,
        data_dir: PathBuf,
        runtimes: HashMap<RuntimeKind, Arc<dyn Runtime>>,
        limits: TaskLimits,
        link: Link,
        shutdown: CancellationToken,
        artifacts: ArtifactSupport,
        users: Option<Arc<TaskUsers>>,
        vertices: Arc<crate::vertex::VertexSupport>,
    ) -> std::io::Result<Arc<TaskManager>> {
        let tasks_dir = data_dir.join("tasks");
        std::fs::create_dir_all(&tasks_dir)?;
        let outbox = Outbox::open(&data_dir)?;
        let pool = DirPool::open(&tasks_dir, POOL_CAP)?;
        Ok(Arc::new(TaskManager {
            node_id,
            tasks_dir,
            runtimes,
            limits,
            entries: Mutex::new(HashMap::new()),
            outbox: Mutex::new(outbox),
            holdings: Arc::new(Holdings {
                users,
                pool,
                retired: RetireQueue::default(),
                artifacts,
                vertices,
            }),
            link,
            events_ready: tokio::sync::Notify::new(),
            shutdown,
            usage: Mutex::new(HashMap::new()),
        }))
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<TaskId, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn outbox(&self) -> std::sync::MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every task this agent holds, for the hello.
    pub fn known(&self) -> Vec<TaskId> {
        self.entries().keys().cloned().collect()
    }

    pub fn running_count(&self) -> usize {
        self.entries()
            .values()
            .filter(|e| e.terminal_seq.is_none())
            .count()
    }

    pub fn unacked(&self) -> usize {
        self.outbox().len()
    }

    /// Events after `seq` not yet acknowledged, oldest first.
    pub fn events_after(&self, seq: u64) -> Vec<AgentEvent> {
        self.outbox()
            .pending()
            .filter(|e| e.seq > seq)
            .cloned()
            .collect()
    }

    /// Events not yet acknowledged, to replay after a (re)connect.
    pub fn pending_events(&self) -> Vec<AgentEvent> {
        self.outbox().pending().cloned().collect()
    }

    /// After a (re)connect: ships what was written while disconnected, then probes.
    pub fn ship_logs_after_reconnect(&self) {
        let shippers: Vec<Arc<LogShipper>> =
            self.entries().values().map(|e| e.shipper.clone()).collect();
        for s in shippers {
            s.tick();
            s.probe();
        }
    }

    pub fn resync_log(&self, task: &TaskId, stream: LogStream, offset: u64) {
        if let Some(e) = self.entries().get(task) {
            e.shipper.resync(stream, offset);
            e.shipper.tick();
        }
    }

    /// The controller has stored every event up to `seq`.
    pub fn on_ack(&self, seq: u64) {
        if let Err(e) = self.outbox().ack(seq) {
            tracing::error!("compacting the outbox: {e}");
        }
        let done: Vec<TaskId> = self
            .entries()
            .iter()
            .filter(|(_, e)| e.terminal_seq.is_some_and(|s| s <= seq))
            .map(|(id, _)| id.clone())
            .collect();
        for id in done {
            // The controller has the task's end and its logs; the directory can go,
            // a little later (see `collect_garbage`).
            self.retire(&id);
        }
    }

    /// Forgets a task the controller no longer needs to hear about, and undoes what
    /// its preparation put in place to outlive its run: its directory is queued for
    /// recycling and its uid given back.
    fn retire(&self, id: &TaskId) {
        let entry = self.entries().remove(id);
        if let Some(entry) = entry {
            entry.kept.undo_all();
        }
    }

    /// Keeps the guards that must outlive a task's run with its entry, until the task
    /// is retired; undoes them at once when it already was (an ack or a forget that
    /// came while the run was ending).
    fn keep_until_retired(&self, id: &TaskId, kept: Guards) {
        if kept.is_empty() {
            return;
        }
        let retired = {
            let mut entries = self.entries();
            match entries.get_mut(id) {
                Some(entry) => {
                    entry.kept.append(kept);
                    None
                }
                None => Some(kept),
            }
        };
        if let Some(kept) = retired {
            kept.undo_all();
        }
    }

    pub fn has_retired(&self) -> bool {
        !self
            .holdings
            .retired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// Recycles the directories of tasks that finished more than `keep_finished_for` ago (see
    /// [`DirPool`] for why they are not simply deleted).
    pub fn collect_garbage(&self) {
        let due: Vec<PathBuf> = {
            let mut q = self
                .holdings
                .retired
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let mut due = Vec::new();
            while q
                .front()
                .is_some_and(|(at, _)| at.elapsed() >= self.limits.keep_finished_for)
            {
                if let Some((_, p)) = q.pop_front() {
                    due.push(p);
                }
            }
            due
        };
        for p in due {
            self.holdings.pool.give(&p);
        }
    }

    /// Records an event in the outbox and sends it if connected.
    fn emit(
        &self,
        task: &TaskId,
        state: TaskState,
        reason: &str,
        exit: Option<Exit>,
    ) -> Option<u64> {
        self.record(AgentEvent {
            seq: 0,
            task_id: task.clone(),
            state,
            reason: reason.to_string(),
            exit,
            at: now_millis(),
            ports: Vec::new(),
        })
    }

    /// Puts an event in the outbox (which gives it its sequence number) and wakes the
    /// connection that sends it.
    fn record(&self, ev: AgentEvent) -> Option<u64> {
        let task = ev.task_id.clone();
        let state = ev.state;
        let ev = match self.outbox().push(ev) {
            Ok(ev) => ev,
            Err(e) => {
                tracing::error!(task = %task, "writing the outbox: {e}");
                return None;
            }
        };
        let seq = ev.seq;
        tracing::debug!(task = %task, seq, "task is {state}");
        // The connection sends events straight from the outbox, so none can be dropped
        // by a full send queue; this only wakes it.
        self.events_ready.notify_one();
        Some(seq)
    }

    fn context(&self, a: &TaskAssignment, uid: Option<u32>) -> TaskContext {
        /// Where a container finds the agent's files for its task.
        const CONTAINER_DIR: &str = "/run/drover";
        let dir = self.tasks_dir.join(a.task_id.as_str());
        // The task's environment is what its job declares and Drover's own variables,
        // never anything of the agent's.
        let mut env: BTreeMap<String, String> = a.spec.env.clone();
        env.extend(a.spec.runtime_env.env.clone());
        // A container sees the agent's files for its task at fixed paths of its own.
        let docker = a.spec.runtime == drover_core::RuntimeKind::Docker;
        let mut mounts = Vec::new();
        if a.config.is_some() {
            let host = dir.join(CONFIG_FILE);
            let path = if docker {
                let inside = format!("{CONTAINER_DIR}/{CONFIG_FILE}");
                mounts.push(drover_runtime::Mount {
                    host,
                    container: inside.clone(),
                    read_only: true,
                });
                inside
            } else {
                host.display().to_string()
            };
            env.insert("DROVER_CONFIG".into(), path);
        }
        env.insert("DROVER_JOB".into(), a.job_name.clone());
        env.insert("DROVER_JOB_ID".into(), a.job_id.to_string());
        env.insert("DROVER_TASK_ID".into(), a.task_id.to_string());
        env.insert("DROVER_TASK_INDEX".into(), a.index.to_string());
        env.insert("DROVER_TASK_ATTEMPT".into(), a.attempt.to_string());
        env.insert("DROVER_NODE_ID".into(), self.node_id.to_string());
        env.insert("DROVER_PROJECT".into(), a.project.to_string());
        env.insert("DROVER_TASK_DIR".into(), dir.display().to_string());
        // Only a process on this host can reach a Unix socket of the agent's; a
        // container or another runtime's task is not told of one.
        if a.spec.runtime == drover_core::RuntimeKind::Process {
            env.insert(
                crate::socket::ENV_VAR.into(),
                crate::socket::socket_path(&dir).display().to_string(),
            );
            // A process task's home is its own directory unless its job says otherwise:
            // tools that keep state in $HOME (pip, shells) then write where the task
            // may, and never into the agent's home.
            env.entry("HOME".into())
                .or_insert_with(|| dir.display().to_string());
        } else if docker {
            let inside = format!("{CONTAINER_DIR}/{}", crate::socket::CONTAINER_SOCKET_DIR);
            let host = crate::socket::container_socket_dir(&dir);
            // The bind needs its source to exist when the container is created; the
            // socket itself is made there when the task is prepared.
            if let Err(e) = std::fs::create_dir_all(&host) {
                tracing::warn!(task = %a.task_id, "making the socket directory {}: {e}", host.display());
            }
            mounts.push(drover_runtime::Mount {
                host,
                container: inside.clone(),
                read_only: false,
            });
            env.insert(
                crate::socket::ENV_VAR.into(),
                format!("{inside}/{}", crate::socket::SOCKET_FILE),
            );
        }
        // A container's working_dir is unpacked into a directory of its own in the task
        // directory, and only that is bound in, where the program starts.
        let mut workdir = None;
        if docker && a.spec.runtime_env.working_dir.is_some() {
            let inside = format!("{CONTAINER_DIR}/{}", crate::prepare::CONTAINER_WORK_DIR);
            mounts.push(drover_runtime::Mount {
                host: dir.join(crate::prepare::CONTAINER_WORK_DIR),
                container: inside.clone(),
                read_only: false,
            });
            workdir = Some(inside);
        }
        let mut spec = a.spec.clone();
        // A built-in vertex runs this agent's own binary; a binary it cannot name
        // leaves the command empty, which the runtime refuses with the reason logged.
        if let Some(plane) = a.spec.vertex.as_deref().filter(|v| v.is_builtin()) {
            match self.holdings.vertices.builtin_command(plane) {
                Ok(cmd) => spec.command = cmd,
                Err(why) => tracing::warn!(task = %a.task_id, "built-in vertex: {why}"),
            }
        }
        if let Some(art) = &a.artifact {
            let path = dir.join(&art.reference.name);
            env.insert("DROVER_ARTIFACT".into(), path.display().to_string());
            // With no command, the job runs its artifact.
            if spec.command.is_empty() {
                spec.command = vec![path.display().to_string()];
            }
            // A build for an emulated platform runs through the emulator, when the
            // command runs the artifact itself; a command that runs something else (a
            // script calling it, say) is left as written.
            if let Some((_, interpreter)) = self.holdings.artifacts.emulator(&art.variant.platform)
            {
                let relative = format!("./{}", art.reference.name);
                let absolute = path.display().to_string();
                if spec
                    .command
                    .first()
                    .is_some_and(|c| *c == relative || *c == absolute)
                {
                    spec.command[0] = absolute;
                    spec.command.insert(0, interpreter.display().to_string());
                }
            }
        }
        TaskContext {
            task_id: a.task_id.clone(),
            job_name: a.job_name.clone(),
            job_id: a.job_id.clone(),
            index: a.index,
            spec,
            stdout_path: log_path(&dir, LogStream::Stdout),
            stderr_path: log_path(&dir, LogStream::Stderr),
            dir,
            env,
            user: uid.map(TaskUser::private),
            stdin: None,
            mounts,
            workdir,
        }
    }

    /// Handles a controller command. Every command is idempotent per task.
    pub fn handle(self: &Arc<Self>, cmd: Command) {
        tracing::debug!("command {cmd:?}");
        match cmd {
            Command::Start(a) => self.start(*a),
            Command::Stop {
                task_id,
                grace_ms,
                reason,
            } => {
                if let Some(e) = self.entries().get(&task_id) {
                    let grace = Duration::from_millis(grace_ms);
                    // A repeated stop changes nothing unless it is shorter: a forced stop
                    // (no grace) must end a task already waiting out a long one. A forget
                    // is never turned back into a reported stop.
                    e.stop.send_if_modified(|cur| {
                        if cur.as_ref().is_some_and(|c| c.forget || c.grace <= grace) {
                            return false;
                        }
                        *cur = Some(StopRequest {
                            grace,
                            reason: reason.clone(),
                            forget: false,
                        });
                        true
                    });
                }
            }
            Command::PruneEnvs => {
                let envs = self.holdings.artifacts.python.clone();
                tokio::spawn(async move {
                    let removed = envs.prune().await;
                    tracing::info!(count = removed.len(), "pruned unused Python environments");
                });
            }
            // The connection answers unknown commands before they get here.
            Command::Unknown => tracing::debug!("ignoring a command this agent does not know"),
            Command::Forget { task_id } => {
                let found = self.entries().get(&task_id).map(|e| {
                    e.stop.send_replace(Some(StopRequest {
                        grace: Duration::ZERO,
                        reason: "forgotten".into(),
                        forget: true,
                    }));
                    e.terminal_seq.is_some()
                });
                // A finished task only waits for its ack; forgetting it just drops it.
                if found == Some(true) {
                    self.retire(&task_id);
                }
            }
        }
    }

    fn start(self: &Arc<Self>, a: TaskAssignment) {
        if self.entries().contains_key(&a.task_id) {
            return;
        }
        // The task's user is given to it by a prepare step, which adds it to this
        // context.
        let ctx = self.context(&a, None);
        let (stop_rx, shipper) = self.register(&a, &ctx);
        let me = self.clone();
        tokio::spawn(async move { me.drive(a, ctx, stop_rx, shipper, false).await });
    }

    fn register(
        &self,
        a: &TaskAssignment,
        ctx: &TaskContext,
    ) -> (watch::Receiver<Option<StopRequest>>, Arc<LogShipper>) {
        let (stop, stop_rx) = watch::channel(None);
        let shipper = Arc::new(LogShipper::new(
            a.task_id.clone(),
            ctx.dir.clone(),
            self.limits.log_max_bytes,
            self.link.clone(),
        ));
        self.entries().insert(
            a.task_id.clone(),
            Entry {
                stop,
                shipper: shipper.clone(),
                terminal_seq: None,
                runtime: a.spec.runtime.clone(),
                kept: Guards::default(),
            },
        );
        (stop_rx, shipper)
    }

    /// Emits the terminal event (unless forgotten) and marks the task finished.
    /// Fails a task whose Start command could not be read; a task this agent already
    /// runs is left alone (the unreadable command was a repeat).
    pub fn refuse_start(&self, id: &TaskId, reason: &str) {
        if self.entries().contains_key(id) {
            return;
        }
        tracing::warn!(task = %id, "{reason}");
        self.emit(id, TaskState::Failed, reason, None);
    }

    fn finish(&self, id: &TaskId, state: TaskState, reason: &str, exit: Option<Exit>) {
        let forgotten = self
            .entries()
            .get(id)
            .is_none_or(|e| e.stop.borrow().as_ref().is_some_and(|r| r.forget));
        if forgotten {
            self.retire(id);
            return;
        }
        let seq = self.emit(id, state, reason, exit);
        if let Some(e) = self.entries().get_mut(id) {
            e.terminal_seq = Some(seq.unwrap_or(0));
        }
    }

    /// Ends the task as stopped if a stop arrived before it was started; returns
    /// whether it did.
    fn stopped_before_start(
        &self,
        id: &TaskId,
        stop: &watch::Receiver<Option<StopRequest>>,
    ) -> bool {
        let Some(req) = stop.borrow().clone() else {
            return false;
        };
        let reason = format!("{} before it started", req.reason);
        self.finish(id, TaskState::Stopped, &reason, None);
        true
    }

    fn runtime(&self, kind: &RuntimeKind) -> Option<Arc<dyn Runtime>> {
        self.runtimes.get(kind).cloned()
    }

    /// Takes a task from its assignment to its end: prepares it, starts it, watches it
    /// run and reports how it ended. An adopted task, which a previous agent process
    /// prepared and started, only gets back what lived in that process (its socket)
    /// and is watched from there.
    async fn drive(
        self: Arc<Self>,
        a: TaskAssignment,
        ctx: TaskContext,
        mut stop_rx: watch::Receiver<Option<StopRequest>>,
        shipper: Arc<LogShipper>,
        adopted: bool,
    ) {
        let id = a.task_id.clone();
        let Some(rt) = self.runtime(&a.spec.runtime) else {
            let reason = format!("runtime {} is not available on this node", a.spec.runtime);
            self.finish(&id, TaskState::Failed, &reason, None);
            return;
        };
        let mut cx = PrepareContext {
            holdings: self.holdings.clone(),
            timeout: self.prepare_timeout(&a),
            assignment: a,
            launch: ctx,
            runtime: rt,
        };
        let mut guards = Guards::default();
        let running = if adopted {
            for e in readopt_all(STEPS, &mut cx, &mut guards).await {
                tracing::warn!(task = %id, step = e.step, "{e}");
            }
            true
        } else {
            self.prepare(&mut cx, &mut guards, &stop_rx, &shipper).await
                && self.start_task(&cx, &stop_rx, &shipper).await
        };
        if running {
            self.watch(&cx, &mut stop_rx, &shipper).await;
        }
        // However the task ended, what its preparation put in place is undone, newest
        // first; its directory and user wait until the task is retired.
        let kept = guards.end_run();
        self.keep_until_retired(&id, kept);
    }

    /// How long a task's preparation may take: its job's `runtime_env.setup_timeout`,
    /// else the agent's own limit.
    fn prepare_timeout(&self, a: &TaskAssignment) -> Duration {
        a.spec
            .runtime_env
            .setup_timeout
            .map(|d| Duration::from_millis(d.as_millis()))
            .unwrap_or(self.limits.prepare_timeout)
    }

    /// Reports the task preparing and runs its prepare steps, all under one deadline.
    /// Returns whether it is ready to start; when it is not, it has been finished. What
    /// the steps did is in `guards`, for the caller to undo.
    async fn prepare(
        &self,
        cx: &mut PrepareContext,
        guards: &mut Guards,
        stop_rx: &watch::Receiver<Option<StopRequest>>,
        shipper: &Arc<LogShipper>,
    ) -> bool {
        let id = cx.assignment.task_id.clone();
        self.emit(&id, TaskState::Preparing, "", None);
        if self.stopped_before_start(&id, stop_rx) {
            return false;
        }
        let renv = &cx.assignment.spec.runtime_env;
        let own_timeout = renv.setup_timeout.is_some();
        // A long preparation (a Python environment's build) is shipped as it goes,
        // so `drover logs --prepare` and the CLI's spinner show it.
        let ticker = (renv.python.is_some() || renv.working_dir.is_some()).then(|| {
            let shipper = shipper.clone();
            let every = self.limits.log_interval.max(Duration::from_millis(250));
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    shipper.tick();
                }
            })
        });
        let timeout = cx.timeout;
        // Each step that did something a user waits for (an environment built, an
        // artifact fetched) is reported as it ends, for the task's timeline.
        let mut done = |note: &str| {
            self.emit(&id, TaskState::Preparing, note, None);
        };
        let prepared =
            tokio::time::timeout(timeout, prepare_all(STEPS, cx, guards, &mut done)).await;
        if let Some(t) = ticker {
            t.abort();
        }
        shipper.tick();
        let reason = match prepared {
            Ok(Ok(())) => return true,
            Ok(Err(e)) => {
                tracing::debug!(task = %id, step = e.step, "preparing failed: {e}");
                e.reason
            }
            Err(_) => {
                let what = if own_timeout {
                    "runtime_env.setup_timeout"
                } else {
                    "the agent's prepare timeout"
                };
                format!(
                    "prepare did not finish within {}s ({what})",
                    timeout.as_secs_f64()
                )
            }
        };
        self.finish(&id, TaskState::Failed, &reason, None);
        false
    }

    /// Reports the task starting and starts it through its runtime, under the start
    /// deadline. Returns whether it runs; when it does not, it has been finished.
    async fn start_task(
        &self,
        cx: &PrepareContext,
        stop_rx: &watch::Receiver<Option<StopRequest>>,
        shipper: &LogShipper,
    ) -> bool {
        let (a, rt) = (&cx.assignment, &cx.runtime);
        let id = &a.task_id;
        self.emit(id, TaskState::Starting, "", None);
        if self.stopped_before_start(id, stop_rx) {
            return false;
        }
        // A health check may legitimately keep the start going until its own deadline.
        let start_timeout = match &a.spec.health {
            Some(h) => self
                .limits
                .start_timeout
                .max(h.start_deadline.0 + Duration::from_secs(5)),
            None => self.limits.start_timeout,
        };
        let started = match tokio::time::timeout(start_timeout, rt.start(&cx.launch)).await {
            Ok(Ok(started)) => started,
            Ok(Err(e)) => {
                shipper.tick();
                self.finish(id, TaskState::Failed, &e.to_string(), None);
                // A failed start may have left something behind (a created container,
                // a process a crashed plugin started); release it.
                if let Err(e) = rt.destroy(id).await {
                    tracing::warn!(task = %id, "cleaning up after a failed start: {e}");
                }
                return false;
            }
            Err(_) => {
                // The start may still complete behind our back; make sure it ends.
                if let Err(e) = rt.stop(id, Duration::ZERO).await {
                    tracing::warn!(task = %id, "stopping a start that timed out: {e}");
                }
                if let Err(e) = rt.destroy(id).await {
                    tracing::warn!(task = %id, "cleaning up a start that timed out: {e}");
                }
                let reason = format!("start did not finish within {}s", start_timeout.as_secs());
                self.finish(id, TaskState::Failed, &reason, None);
                return false;
            }
        };
        self.record(AgentEvent {
            seq: 0,
            task_id: id.clone(),
            state: TaskState::Running,
            reason: self
                .holdings
                .artifacts
                .emulation_note(a, "running")
                .unwrap_or_default(),
            exit: None,
            at: now_millis(),
            ports: started.ports,
        });
        true
    }

    /// Watches a running task to its end, shipping its logs and passing on stops, then
    /// reports how it ended and has its runtime clean up after it. When the agent shuts
    /// down instead, the task is left running for the next agent process to adopt.
    async fn watch(
        &self,
        cx: &PrepareContext,
        stop_rx: &mut watch::Receiver<Option<StopRequest>>,
        shipper: &Arc<LogShipper>,
    ) {
        let (a, rt) = (&cx.assignment, &cx.runtime);
        let id = &a.task_id;
        // Ship logs while it runs.
        let ship_stop = CancellationToken::new();
        let ship_task = {
            let shipper = shipper.clone();
            let stop = ship_stop.clone();
            let every = self.limits.log_interval;
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(every) => { shipper.tick(); }
                    }
                }
            })
        };

        let mut stopped: Option<(StopRequest, Result<StopOutcome, String>)> = None;
        let status = loop {
            tokio::select! {
                s = rt.wait(id) => break s,
                r = stop_rx.changed() => {
                    let req = if r.is_ok() { stop_rx.borrow().clone() } else { None };
                    if let Some(req) = req {
                        if !req.forget {
                            self.emit(id, TaskState::Stopping, &req.reason, None);
                        }
                        stopped = Some(stop_task(rt, id, req, stop_rx).await);
                        break rt.wait(id).await;
                    }
                }
                _ = self.shutdown.cancelled() => {
                    // The agent is shutting down, not the task: leave it running for the
                    // next agent process to adopt.
                    ship_stop.cancel();
                    end_shipping(id, ship_task).await;
                    shipper.tick();
                    return;
                }
            }
        };
        ship_stop.cancel();
        end_shipping(id, ship_task).await;
        // The task's last output goes out before its terminal event, on the same
        // ordered connection, so whoever sees the end has seen all the output.
        shipper.tick();
        let (state, reason, exit) = self.ending(a, &status, &stopped);
        self.finish(id, state, &reason, exit);
        if let Err(e) = rt.destroy(id).await {
            tracing::warn!(task = %id, "cleaning up after the task: {e}");
        }
    }

    /// How a task that ran ended: its state, the reason reported with it, and its exit.
    fn ending(
        &self,
        a: &TaskAssignment,
        status: &Result<ExitStatus, drover_runtime::RuntimeError>,
        stopped: &Option<(StopRequest, Result<StopOutcome, String>)>,
    ) -> (TaskState, String, Option<Exit>) {
        match (status, stopped) {
            (Ok(st), Some((req, outcome))) => {
                let how = match outcome {
                    Ok(StopOutcome::Graceful) => "ended after SIGTERM".to_string(),
                    Ok(StopOutcome::Killed) if req.grace.is_zero() => {
                        "killed with SIGKILL at once".to_string()
                    }
                    Ok(StopOutcome::Killed) => format!(
                        "killed with SIGKILL after the {}s grace period",
                        req.grace.as_secs_f64()
                    ),
                    Ok(StopOutcome::AlreadyExited) => "had already exited".to_string(),
                    Err(e) => format!("stopping failed: {e}"),
                };
                (
                    TaskState::Stopped,
                    format!("{}: {how}", req.reason),
                    exit_of(st),
                )
            }
            // An emulated run says so to the end, since a success reason is otherwise
            // empty and would clear the running one.
            (Ok(ExitStatus::Exited(0)), None) => (
                TaskState::Succeeded,
                self.holdings
                    .artifacts
                    .emulation_note(a, "ran")
                    .unwrap_or_default(),
                exit_of(&ExitStatus::Exited(0)),
            ),
            (Ok(st @ ExitStatus::Exited(code)), None) => (
                TaskState::Failed,
                format!("exited with code {code}"),
                exit_of(st),
            ),
            (Ok(st @ ExitStatus::Signaled(sig)), None) => {
                (TaskState::Failed, format!("killed by {sig}"), exit_of(st))
            }
            (Ok(st @ ExitStatus::OutOfMemory(_)), None) => (
                TaskState::Failed,
                format!(
                    "oom: out of memory, killed for exceeding its memory limit of {}",
                    a.spec.resources.memory
                ),
                exit_of(st),
            ),
            (Ok(ExitStatus::Unknown(why)), None) => (TaskState::Failed, why.clone(), None),
            (Err(e), _) => (
                TaskState::Failed,
                format!("waiting for the task: {e}"),
                None,
            ),
        }
    }

    /// After a restart: finds the tasks a previous agent process left and re-adopts,
    /// reports or fails each one.
    pub async fn recover(self: &Arc<Self>) {
        let Ok(dirs) = std::fs::read_dir(&self.tasks_dir) else {
            return;
        };
        for d in dirs.flatten() {
            if d.file_name().to_str().is_none_or(|n| n.starts_with('.')) {
                // The directory pool, or nothing of ours.
                continue;
            }
            let path = d.path();
            let file: TaskFile = match std::fs::read(path.join("task.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
            {
                Some(f) => f,
                None => {
                    // No readable task.json: a start that died before recording it.
                    // Nothing can have been reported, so nothing is owed; clean it up.
                    crate::cleanup::remove_dir_all(
                        &path,
                        "the directory of a task that never started",
                    );
                    continue;
                }
            };
            let a = file.assignment;
            // What the task's first prepare steps did (its user, its directory) is
            // kept until it is retired, as if this agent process had done it.
            let mut kept = Guards::default();
            if let (Some(uid), Some(users)) = (file.uid, &self.holdings.users) {
                if !users.mark(uid) {
                    tracing::warn!(task = %a.task_id, uid, "the recovered task runs as a uid outside --task-uid-range");
                }
                kept.push(crate::prepare::steps::user_guard(users.clone(), uid));
            }
            kept.push(crate::prepare::steps::dir_guard(
                self.holdings.retired.clone(),
                path.clone(),
            ));
            let ctx = self.context(&a, file.uid);
            let (stop_rx, shipper) = self.register(&a, &ctx);
            self.keep_until_retired(&a.task_id, kept);
            let Some(rt) = self.runtime(&a.spec.runtime) else {
                let reason = format!(
                    "runtime {} is not available after the agent restarted",
                    a.spec.runtime
                );
                self.finish(&a.task_id, TaskState::Failed, &reason, None);
                continue;
            };
            match rt.recover(&ctx).await {
                Ok(Recovered::Adopted) => {
                    tracing::info!(task = %a.task_id, "re-adopted a running task");
                    let me = self.clone();
                    tokio::spawn(async move { me.drive(a, ctx, stop_rx, shipper, true).await });
                }
                Ok(Recovered::Exited(st)) => {
                    shipper.tick();
                    let (state, reason) = match &st {
                        ExitStatus::Exited(0) => (TaskState::Succeeded, String::new()),
                        ExitStatus::Exited(c) => (
                            TaskState::Failed,
                            format!("exited with code {c} while the agent was restarting"),
                        ),
                        ExitStatus::Signaled(s) => (
                            TaskState::Failed,
                            format!("killed by {s} while the agent was restarting"),
                        ),
                        ExitStatus::OutOfMemory(_) => (
                            TaskState::Failed,
                            "oom: out of memory, killed for exceeding its memory limit while the agent was restarting".to_string(),
                        ),
                        ExitStatus::Unknown(w) => (TaskState::Failed, w.clone()),
                    };
                    self.finish(&a.task_id, state, &reason, exit_of(&st));
                    // What the runtime still holds for it (a stopped container) goes now.
                    if let Err(e) = rt.destroy(&a.task_id).await {
                        tracing::warn!(task = %a.task_id, "cleaning up after recovery: {e}");
                    }
                }
                Ok(Recovered::Gone) | Err(_) => {
                    shipper.tick();
                    let reason = "the task's process was gone when the agent restarted";
                    self.finish(&a.task_id, TaskState::Lost, reason, None);
                    // Its leader is gone, but what it started may not be (a process it
                    // detached, still in its cgroup).
                    if let Err(e) = rt.destroy(&a.task_id).await {
                        tracing::warn!(task = %a.task_id, "cleaning up after recovery: {e}");
                    }
                }
            }
        }
    }
}

impl TaskManager {
    pub fn python_envs(&self) -> &Arc<crate::pyenv::PythonEnvs> {
        &self.holdings.artifacts.python
    }

    /// How many artifact blobs this agent has downloaded (a cache hit makes none).
    pub fn artifact_downloads(&self) -> u64 {
        self.holdings.artifacts.cache.downloads()
    }

    /// Samples every running task's resource use through its runtime. Each call is
    /// bounded, and a runtime that cannot tell is skipped.
    pub async fn sample_usage(&self) {
        let running: Vec<(TaskId, RuntimeKind)> = self
            .entries()
            .iter()
            .filter(|(_, e)| e.terminal_seq.is_none())
            .map(|(id, e)| (id.clone(), e.runtime.clone()))
            .collect();
        let mut fresh = HashMap::new();
        for (id, kind) in running {
            let Some(rt) = self.runtime(&kind) else {
                continue;
            };
            if let Ok(Ok(s)) = tokio::time::timeout(STATS_CALL_TIMEOUT, rt.stats(&id)).await {
                let plane = self.holdings.vertices.counts(&id);
                fresh.insert(
                    id,
                    TaskUsage {
                        cpu_seconds: s.cpu_seconds,
                        memory_bytes: s.memory_bytes,
                        plane,
                    },
                );
            }
        }
        *self.usage.lock().unwrap_or_else(|p| p.into_inner()) = fresh;
    }

    /// The latest samples, for the next heartbeat. Resource figures come from the last
    /// sampling; vertex replicas' message counts are read now, since they are only
    /// counters and the autoscaler's rates should not lag a sampling interval behind
    /// (a replica started since the last sampling reports zero resources until the
    /// next one).
    pub fn usage_samples(&self) -> Vec<UsageSample> {
        let mut usage = self.usage.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for (id, counts) in self.holdings.vertices.all_counts() {
            usage
                .entry(id)
                .or_insert(TaskUsage {
                    cpu_seconds: 0.0,
                    memory_bytes: 0,
                    plane: None,
                })
                .plane = Some(counts);
        }
        usage
            .into_iter()
            .map(|(task_id, usage)| UsageSample { task_id, usage })
            .collect()
    }

    /// After recovery: anything a runtime still holds for a task this agent has no
    /// record of (a container whose task directory is gone, say) is stopped and
    /// removed, so nothing runs or lingers untracked.
    pub async fn remove_orphans(&self) {
        let known: std::collections::HashSet<TaskId> = self.known().into_iter().collect();
        for rt in self.runtimes.values() {
            let held = match tokio::time::timeout(ORPHAN_CALL_TIMEOUT, rt.list()).await {
                Ok(Ok(held)) => held,
                Ok(Err(e)) => {
                    tracing::warn!("runtime {}: listing its tasks: {e}", rt.kind());
                    continue;
                }
                Err(_) => {
                    tracing::warn!("runtime {}: listing its tasks timed out", rt.kind());
                    continue;
                }
            };
            for id in held.into_iter().filter(|id| !known.contains(id)) {
                tracing::info!(task = %id, runtime = %rt.kind(), "removing an orphaned task");
                // A stop that fails is logged and the removal tried all the same: it
                // ends whatever is left running too.
                match tokio::time::timeout(ORPHAN_CALL_TIMEOUT, rt.stop(&id, Duration::ZERO)).await
                {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::warn!(task = %id, "stopping an orphaned task: {e}"),
                    Err(_) => tracing::warn!(task = %id, "stopping an orphaned task timed out"),
                }
                if let Err(e) = tokio::time::timeout(ORPHAN_CALL_TIMEOUT, rt.destroy(&id))
                    .await
                    .unwrap_or_else(|_| {
                        Err(drover_runtime::RuntimeError::Other("timed out".into()))
                    })
                {
                    tracing::warn!(task = %id, "removing an orphaned task: {e}");
                }
            }
        }
    }
}

/// The longest one task's resource sample may take.
const STATS_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest a runtime call made while cleaning up orphans may take, so a stuck
/// engine cannot hold up the agent's start.
const ORPHAN_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Stops a task with the request's grace. A later request with a shorter grace (a forced
/// stop, or a forget) replaces it at once: the running stop is dropped, which abandons
/// only its wait, and the next one signals again and waits the shorter grace. Returns the
/// request that ended the task, with the outcome.
async fn stop_task(
    rt: &Arc<dyn Runtime>,
    id: &TaskId,
    mut req: StopRequest,
    stop_rx: &mut watch::Receiver<Option<StopRequest>>,
) -> (StopRequest, Result<StopOutcome, String>) {
    loop {
        let stop = rt.stop(id, req.grace);
        tokio::pin!(stop);
        let shorter = loop {
            tokio::select! {
                outcome = &mut stop => return (req, outcome.map_err(|e| e.to_string())),
                changed = stop_rx.changed() => {
                    if changed.is_err() {
                        // The task's entry is gone, so no shorter request can come.
                        let outcome = stop.await.map_err(|e| e.to_string());
                        return (req, outcome);
                    }
                    let next = stop_rx.borrow_and_update().clone();
                    if let Some(next) = next
                        && next.grace < req.grace
                    {
                        break next;
                    }
                }
            }
        };
        req = shorter;
    }
}

fn exit_of(st: &ExitStatus) -> Option<Exit> {
    match st {
        ExitStatus::Exited(c) => Some(Exit {
            code: Some(*c),
            signal: None,
        }),
        ExitStatus::Signaled(s) => Some(Exit {
            code: None,
            signal: Some(s.clone()),
        }),
        ExitStatus::OutOfMemory(code) => Some(Exit {
            code: *code,
            signal: code.is_none().then(|| "SIGKILL".to_string()),
        }),
        ExitStatus::Unknown(_) => None,
    }
}

/// Waits for a task's log shipping loop, once cancelled, to end. It ends only by being
/// cancelled, so an error here is its panic.
async fn end_shipping(id: &TaskId, ship_task: tokio::task::JoinHandle<()>) {
    if let Err(e) = ship_task.await {
        tracing::warn!(task = %id, "shipping the task's logs ended abnormally: {e}");
    }
}
