//! The `process` runtime: each task is a child process in its own session and process
//! group, in its task directory, with exactly the task's environment.
//!
//! The child's stdout and stderr are the task's log files themselves (not pipes), so the
//! child keeps running and logging when the agent restarts. The agent records the child's
//! pid and start time in `<dir>/pid`, which lets a later agent re-adopt it without ever
//! mistaking a recycled pid for the task. With a shim configured, the group leader is the
//! shim (see [`crate::shim`]), which records the program's exit status in
//! `<dir>/exit-status` so that it is known even if the agent was away when it ended.

use crate::cgroup::{self, Cgroups};
use crate::sandbox::{self, Confinement};
use crate::shim;
use crate::status::{settle, wait_status};
use crate::{
    ExitStatus, Fingerprint, Recovered, Runtime, RuntimeError, Started, StopOutcome, TaskContext,
};
use async_trait::async_trait;
use drover_core::TaskId;
use drover_core::spec::RuntimeKind;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::collections::{BTreeMap, HashMap};
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

/// The PATH a task gets when its environment has none. Fixed, so that a task never
/// depends on the agent's own PATH.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The file in the task directory holding `"<pid> <starttime>"` of the group leader.
pub const PID_FILE: &str = "pid";

/// The file in the task directory where the shim records the program's exit status.
pub const STATUS_FILE: &str = "exit-status";

/// How long a task may take to end after SIGKILL before `stop` gives up. SIGKILL cannot
/// be caught, so only a process stuck in the kernel (e.g. on a dead NFS mount) gets here.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long to wait for the watcher to publish the status of a task that has already
/// ended; it does so right after reaping, so this is only a guard against a bug.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

/// How often an adopted task (one we are not the parent of) is checked for having ended.
const ADOPTED_POLL: Duration = Duration::from_millis(50);

/// The status of an adopted task that ended without a shim to record how.
const ADOPTED_UNKNOWN: &str = "the task ended while the agent was restarting";

/// Settings of the process runtime, from the agent's config.
#[derive(Clone, Debug, Default)]
pub struct ProcessConfig {
    /// The `drover` binary to run as each task's shim; `None` runs programs directly.
    pub shim: Option<PathBuf>,
    /// Gives each task a cgroup of its own, under `drover/<scope>`, where the machine
    /// allows it; the scope (the node's id) keeps agents sharing a machine apart. `None`
    /// makes no cgroups.
    pub cgroup_scope: Option<String>,
}

/// Runs tasks as local processes.
pub struct ProcessRuntime {
    config: ProcessConfig,
    tasks: Mutex<HashMap<TaskId, Arc<TaskEntry>>>,
    /// Whether a task may get a `/proc` of its own that hides other users' processes;
    /// found out once, by trying, the first time it matters.
    hide_proc: OnceLock<bool>,
    /// The tasks' cgroups, or why there are none.
    cgroups: Result<Arc<dyn Cgroups>, String>,
}

/// A task's cgroup: the driver and the cgroup's name (the task's id).
#[derive(Clone)]
struct TaskCgroup {
    driver: Arc<dyn Cgroups>,
    name: String,
}

impl TaskCgroup {
    /// Kills whatever is left in the cgroup once the task's own process has ended, so
    /// nothing it started outlives it, and says whether the kernel killed anything in
    /// it for exceeding its memory limit.
    async fn end(&self) -> bool {
        let me = self.clone();
        let swept = tokio::task::spawn_blocking(move || {
            let left = me
                .driver
                .pids(&me.name)
                .map(|p| !p.is_empty())
                .unwrap_or(true);
            if left && let Err(e) = me.driver.kill(&me.name) {
                tracing::warn!(task = %me.name, "killing what the task left running: {e}");
            }
            me.driver.oom_kills(&me.name) > 0
        })
        .await;
        swept.unwrap_or_else(|e| {
            tracing::warn!(task = %self.name, "sweeping the task's cgroup stopped: {e}");
            false
        })
    }
}

/// Turns a failed task's status into an out-of-memory one when the kernel killed part
/// of it for exceeding its memory limit; a task that succeeded anyway keeps its status.
fn with_oom(status: ExitStatus, oom_killed: bool) -> ExitStatus {
    match status {
        ExitStatus::Exited(0) => status,
        _ if !oom_killed => status,
        ExitStatus::Exited(code) => ExitStatus::OutOfMemory(Some(code)),
        ExitStatus::Signaled(_) | ExitStatus::OutOfMemory(_) | ExitStatus::Unknown(_) => {
            ExitStatus::OutOfMemory(None)
        }
    }
}

/// What the runtime keeps for one task.
struct TaskEntry {
    /// The pid of the group leader, which is also the process group id.
    pid: i32,
    /// The leader's start time (field 22 of `/proc/<pid>/stat`), which tells it apart
    /// from a later process that reuses the pid.
    starttime: Option<u64>,
    status: watch::Receiver<Option<ExitStatus>>,
    control: Control,
}

/// How signals reach a task's process group.
enum Control {
    /// Our own child: signals go through the task that owns the child, which checks that
    /// it has not been reaped first. An unreaped child keeps its pid (and so its group
    /// id) reserved, so the group signalled is certainly the task's.
    Child(mpsc::Sender<SignalRequest>),
    /// A process adopted after an agent restart: its start time is checked right before
    /// each signal, since we cannot stop someone else from reaping it.
    Adopted,
}

/// A request to the watcher of a child to signal its group; the reply says whether the
/// signal was sent (false: the child had already ended).
struct SignalRequest {
    signal: Signal,
    reply: oneshot::Sender<bool>,
}

impl SignalRequest {
    fn answer(self, sent: bool) {
        if self.reply.send(sent).is_err() {
            // The stop that asked has given up waiting (it was dropped for a shorter
            // one); the signal's outcome matters to nobody else.
        }
    }
}

/// Fields of `/proc/<pid>/stat` the runtime needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ProcStat {
    /// The state letter; `Z` is a zombie, which has ended.
    state: char,
    /// Clock ticks after boot at which the process started.
    starttime: u64,
    /// The process group.
    pgrp: i32,
    /// User plus system CPU time, in clock ticks.
    cpu_ticks: u64,
    /// Resident pages.
    rss_pages: u64,
}

impl ProcessRuntime {
    pub fn new(config: ProcessConfig) -> Self {
        let cgroups = match &config.cgroup_scope {
            Some(scope) => cgroup::detect(scope).map(Arc::from),
            None => Err("not configured".to_string()),
        };
        if let (Err(why), Some(_)) = (&cgroups, &config.cgroup_scope) {
            tracing::warn!(
                "process tasks get no cgroup (no enforced memory or CPU limit, and a process a task detaches can outlive it): {why}"
            );
        }
        ProcessRuntime {
            config,
            tasks: Mutex::new(HashMap::new()),
            hide_proc: OnceLock::new(),
            cgroups,
        }
    }

    fn task_cgroup(&self, id: &TaskId) -> Option<TaskCgroup> {
        let driver = self.cgroups.as_ref().ok()?.clone();
        Some(TaskCgroup {
            driver,
            name: id.to_string(),
        })
    }

    /// Creates the task's cgroup with its job's memory limit and CPU quota; returns the
    /// files its first process joins it through.
    async fn create_cgroup(&self, ctx: &TaskContext) -> Result<Vec<PathBuf>, RuntimeError> {
        let Some(cg) = self.task_cgroup(&ctx.task_id) else {
            return Ok(Vec::new());
        };
        let r = &ctx.spec.resources;
        let limits = cgroup::Limits {
            memory_bytes: (r.memory.0 > 0).then_some(r.memory.0),
            cpu: (r.cpu > 0.0 && r.cpu.is_finite()).then_some(r.cpu),
        };
        tokio::task::spawn_blocking(move || cg.driver.create(&cg.name, &limits))
            .await
            .map_err(|e| RuntimeError::Start(format!("creating the task's cgroup stopped: {e}")))?
            .map_err(|e| RuntimeError::Start(format!("creating the task's cgroup: {e}")))
    }

    /// Whether tasks get a `/proc` that shows only their own user's processes.
    pub fn hides_proc(&self) -> bool {
        *self.hide_proc.get_or_init(|| {
            let can = sandbox::can_hide_proc();
            if !can {
                tracing::info!(
                    "process tasks share the node's /proc: a private mount with hidepid cannot be made here"
                );
            }
            can
        })
    }

    /// What confines the task: its user and, with one, its own `/proc`. A task run as
    /// the agent's own user gets neither, since hiding processes by user would hide
    /// nothing from it.
    fn confinement(
        &self,
        ctx: &TaskContext,
        cgroup_procs: &[PathBuf],
    ) -> Result<Confinement, RuntimeError> {
        let hide_proc = ctx.user.is_some() && self.hides_proc();
        Confinement::new(cgroup_procs, hide_proc, ctx.user)
            .map_err(|e| RuntimeError::Start(format!("confining the task: {e}")))
    }

    fn tasks(&self) -> std::sync::MutexGuard<'_, HashMap<TaskId, Arc<TaskEntry>>> {
        // The map is only touched by short, non-panicking sections, so a poisoned lock
        // still holds consistent data and is safe to keep using.
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn entry(&self, id: &TaskId) -> Result<Arc<TaskEntry>, RuntimeError> {
        self.tasks()
            .get(id)
            .cloned()
            .ok_or_else(|| RuntimeError::UnknownTask(id.clone()))
    }

    /// Builds the command that starts the task: the program itself, or the shim running it.
    fn command(
        &self,
        ctx: &TaskContext,
        program: &Path,
        cgroup_procs: &[PathBuf],
    ) -> Result<std::process::Command, RuntimeError> {
        let argv = &ctx.spec.command;
        let confinement = self.confinement(ctx, cgroup_procs)?;
        let mut cmd = match &self.config.shim {
            Some(shim_path) => {
                let mut cmd = std::process::Command::new(shim_path);
                cmd.args(shim::command_args(
                    &ctx.dir.join(STATUS_FILE),
                    &confinement,
                    argv,
                ));
                cmd
            }
            None => {
                let mut cmd = std::process::Command::new(program);
                // The program keeps the name it was given, as a shell would run it.
                if let Some((name, args)) = argv.split_first() {
                    cmd.arg0(name).args(args);
                }
                cmd
            }
        };
        cmd.env_clear().envs(&ctx.env);
        if !ctx.env.contains_key("PATH") {
            cmd.env("PATH", DEFAULT_PATH);
        }
        cmd.current_dir(&ctx.dir).stdin(match &ctx.stdin {
            // Opened here, by the agent, and inherited through the shim: the task's own
            // user need not be able to open the agent's cached copy, and once open the
            // input stays readable whatever happens to that copy or to the agent.
            Some(path) => Stdio::from(open_stdin(path)?),
            None => Stdio::null(),
        });
        cmd.stdout(open_log(&ctx.stdout_path)?);
        cmd.stderr(open_log(&ctx.stderr_path)?);
        if self.config.shim.is_some() {
            // The shim resets signal dispositions for the task itself, so no code needs to
            // run between fork and exec here: without `pre_exec` the standard library
            // can use posix_spawn, which does not copy the agent's page tables (a
            // measurable share of a short task's start). The shim leads its own process
            // group, so a stop still reaches everything the task started.
            cmd.process_group(0);
            return Ok(cmd);
        }
        // SAFETY: the closure only calls `setsid`, `signal` and the confinement's system
        // calls, all async-signal-safe, so it is fine to run between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // A session of its own makes the child a process group leader, so a stop
                // reaches everything it started, and detaches it from any terminal.
                if libc::setsid() == -1 {
                    return Err(io::Error::last_os_error());
                }
                // Ignored dispositions survive exec; the task must start with defaults
                // whatever the agent ignores.
                for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
                    if libc::signal(sig, libc::SIG_DFL) == libc::SIG_ERR {
                        return Err(io::Error::last_os_error());
                    }
                }
                // Last, since it gives up the privileges the steps before may need.
                confinement.enter()
            });
        }
        Ok(cmd)
    }

    /// Sends `signal` to the task's process group if the task is still running; returns
    /// whether it was sent.
    async fn signal(&self, entry: &TaskEntry, signal: Signal) -> bool {
        match &entry.control {
            Control::Child(requests) => {
                let (reply, answer) = oneshot::channel();
                if requests
                    .send(SignalRequest { signal, reply })
                    .await
                    .is_err()
                {
                    // The watcher is gone, so the child has been reaped.
                    return false;
                }
                answer.await.unwrap_or(false)
            }
            Control::Adopted => {
                if !is_running(entry.pid, entry.starttime) {
                    return false;
                }
                match killpg(Pid::from_raw(entry.pid), signal) {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::debug!(pid = entry.pid, %e, "signalling an adopted task failed");
                        false
                    }
                }
            }
        }
    }
}

#[async_trait]
impl Runtime for ProcessRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Process
    }

    fn takes_stdin(&self) -> bool {
        true
    }

    async fn fingerprint(&self) -> Result<Fingerprint, RuntimeError> {
        let mut attributes = BTreeMap::new();
        attributes.insert("os".to_string(), std::env::consts::OS.to_string());
        attributes.insert("arch".to_string(), std::env::consts::ARCH.to_string());
        attributes.insert("shim".to_string(), self.config.shim.is_some().to_string());
        attributes.insert("hidepid".to_string(), self.hides_proc().to_string());
        match &self.cgroups {
            Ok(driver) => {
                attributes.insert("cgroup".to_string(), driver.version().to_string());
            }
            Err(why) => {
                attributes.insert("cgroup".to_string(), "none".to_string());
                attributes.insert("cgroup_note".to_string(), why.clone());
            }
        }
        Ok(Fingerprint {
            kind: RuntimeKind::Process,
            attributes,
        })
    }

    async fn prepare(&self, ctx: &TaskContext) -> Result<(), RuntimeError> {
        resolve_program(ctx).map(|_| ())
    }

    async fn start(&self, ctx: &TaskContext) -> Result<Started, RuntimeError> {
        if let Some(existing) = self.tasks().get(&ctx.task_id)
            && existing.status.borrow().is_none()
        {
            return Err(RuntimeError::Start(format!(
                "task {} is already running",
                ctx.task_id
            )));
        }
        if !ctx.dir.is_dir() {
            // Checked here because a missing working directory would otherwise be
            // reported by the spawn as "not found", as if the program were missing.
            return Err(RuntimeError::Start(format!(
                "the task directory {} does not exist",
                ctx.dir.display()
            )));
        }
        let program = resolve_program(ctx)?;
        let status_file = ctx.dir.join(STATUS_FILE);
        // A status left by an earlier run in this directory would be taken for this one's.
        // Emptied rather than removed, so the shim reuses the file's inode (an empty
        // status reads as none). With a shim it is made here, by the agent, so that the
        // name is taken by a file the task (which may share the directory as another
        // user) can neither replace nor point elsewhere before the shim writes it.
        let prepared = if self.config.shim.is_some() {
            create_empty(&status_file)
        } else {
            empty_if_exists(&status_file)
        };
        prepared.map_err(|e| {
            RuntimeError::Start(format!("cannot empty {}: {e}", status_file.display()))
        })?;

        let cgroup_procs = self.create_cgroup(ctx).await?;
        let cgroup = self.task_cgroup(&ctx.task_id);
        let spawned = self.command(ctx, &program, &cgroup_procs).and_then(|cmd| {
            tokio::process::Command::from(cmd).spawn().map_err(|e| {
                spawn_error(
                    ctx.spec.command.first().map_or("", String::as_str),
                    self.config.shim.as_deref(),
                    &e,
                )
            })
        });
        let child = match spawned {
            Ok(child) => child,
            Err(e) => {
                if let Some(cg) = &cgroup {
                    remove_cgroup(cg).await;
                }
                return Err(e);
            }
        };
        let Some(pid) = child.id().map(|p| p as i32) else {
            // `id` is only None once the child has been reaped, and nothing has waited
            // for it yet.
            return Err(RuntimeError::Start(
                "the process vanished right after it was spawned".into(),
            ));
        };
        // The child cannot have been reaped yet (only the watcher below reaps it), so its
        // /proc entry exists even if it has already exited.
        let starttime = read_proc_stat(pid).map(|s| s.starttime);
        if let Err(e) = write_pid_file(&ctx.dir, pid, starttime) {
            // Without the pid file a restarted agent could not find the task, so it must
            // not run untracked.
            if let Err(errno) = killpg(Pid::from_raw(pid), Signal::SIGKILL) {
                tracing::warn!(task = %ctx.task_id, "killing a task whose pid file could not be written: {errno}");
            }
            let mut child = child;
            match tokio::time::timeout(KILL_TIMEOUT, child.wait()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(task = %ctx.task_id, "reaping a task whose pid file could not be written: {e}")
                }
                Err(_) => tracing::warn!(
                    task = %ctx.task_id,
                    "a task whose pid file could not be written did not exit within {}s of SIGKILL",
                    KILL_TIMEOUT.as_secs()
                ),
            }
            return Err(RuntimeError::Start(format!(
                "cannot write {}: {e}",
                ctx.dir.join(PID_FILE).display()
            )));
        }

        let (status_tx, status_rx) = watch::channel(None);
        // A stop sends at most two signals; a few more slots absorb concurrent stops.
        let (requests_tx, requests_rx) = mpsc::channel(8);
        let shim_status = self.config.shim.is_some().then_some(status_file);
        tokio::spawn(watch_child(
            child,
            pid,
            requests_rx,
            shim_status,
            cgroup,
            status_tx,
        ));
        tracing::debug!(task = %ctx.task_id, pid, "started process");
        self.tasks().insert(
            ctx.task_id.clone(),
            Arc::new(TaskEntry {
                pid,
                starttime,
                status: status_rx,
                control: Control::Child(requests_tx),
            }),
        );
        Ok(Started::default())
    }

    async fn stats(&self, id: &TaskId) -> Result<crate::TaskStats, RuntimeError> {
        let entry = self.entry(id)?;
        if entry.status.borrow().is_some() {
            return Err(RuntimeError::Other(format!("task {id} has ended")));
        }
        // The task leads its own process group, so its pid is the group's id. Scanning
        // /proc is blocking work, kept off the async threads.
        let pgid = entry.pid;
        tokio::task::spawn_blocking(move || group_usage(pgid))
            .await
            .map_err(|e| RuntimeError::Other(format!("sampling task {id}: {e}")))
    }

    async fn wait(&self, id: &TaskId) -> Result<ExitStatus, RuntimeError> {
        let mut status = self.entry(id)?.status.clone();
        wait_status(&mut status).await
    }

    async fn stop(&self, id: &TaskId, grace: Duration) -> Result<StopOutcome, RuntimeError> {
        let entry = self.entry(id)?;
        let mut status = entry.status.clone();
        if status.borrow().is_some() {
            return Ok(StopOutcome::AlreadyExited);
        }
        if !self.signal(&entry, Signal::SIGTERM).await {
            settle(&mut status, SETTLE_TIMEOUT, "the task").await?;
            return Ok(StopOutcome::AlreadyExited);
        }
        if tokio::time::timeout(grace, wait_status(&mut status))
            .await
            .is_ok()
        {
            return Ok(StopOutcome::Graceful);
        }
        if !self.signal(&entry, Signal::SIGKILL).await {
            // It ended on its own between the grace running out and the kill.
            settle(&mut status, SETTLE_TIMEOUT, "the task").await?;
            return Ok(StopOutcome::Graceful);
        }
        match tokio::time::timeout(KILL_TIMEOUT, wait_status(&mut status)).await {
            Ok(_) => Ok(StopOutcome::Killed),
            Err(_) => Err(RuntimeError::Other(format!(
                "task {id} (pid {}) did not end within {}s of SIGKILL",
                entry.pid,
                KILL_TIMEOUT.as_secs()
            ))),
        }
    }

    async fn destroy(&self, id: &TaskId) -> Result<(), RuntimeError> {
        // Dropping the entry is enough for the process: a child's watcher keeps running
        // until it has reaped the child, and an adopted task's poller ends once nobody is
        // waiting. Its cgroup goes too, with anything still in it (this is also how an
        // orphaned cgroup found after a restart is removed).
        self.tasks().remove(id);
        let Some(cg) = self.task_cgroup(id) else {
            return Ok(());
        };
        let name = cg.name.clone();
        tokio::task::spawn_blocking(move || {
            // Usually the task's end has emptied it already, and a kill is only needed
            // for what is still in it (an orphan's processes, say).
            if !cg.driver.pids(&cg.name)?.is_empty() {
                cg.driver.kill(&cg.name)?;
            }
            cg.driver.remove(&cg.name)
        })
        .await
        .map_err(|e| {
            RuntimeError::Other(format!("removing the cgroup of task {name} stopped: {e}"))
        })?
        .map_err(|e| RuntimeError::Other(format!("removing the cgroup of task {name}: {e}")))
    }

    async fn list(&self) -> Result<Vec<TaskId>, RuntimeError> {
        // A task's other traces live in its directory; its cgroup is the one thing that
        // lives elsewhere and could be left behind.
        let Ok(driver) = &self.cgroups else {
            return Ok(Vec::new());
        };
        let driver = driver.clone();
        let names = tokio::task::spawn_blocking(move || driver.list())
            .await
            .map_err(|e| RuntimeError::Other(format!("listing cgroups stopped: {e}")))?
            .map_err(|e| RuntimeError::Other(format!("listing cgroups: {e}")))?;
        Ok(names.iter().filter_map(|n| TaskId::parse(n).ok()).collect())
    }

    async fn recover(&self, ctx: &TaskContext) -> Result<Recovered, RuntimeError> {
        if let Some(entry) = self.tasks().get(&ctx.task_id) {
            // Already known to this agent process, e.g. a repeated recovery.
            return Ok(match entry.status.borrow().clone() {
                None => Recovered::Adopted,
                Some(status) => Recovered::Exited(status),
            });
        }
        let status_file = ctx.dir.join(STATUS_FILE);
        let recorded = read_pid_file(&ctx.dir);
        let alive = recorded.and_then(|(pid, starttime)| {
            // Without a start time the pid cannot be told apart from a recycled one, so
            // it is never adopted (and so never signalled).
            let starttime = starttime?;
            is_running(pid, Some(starttime)).then_some((pid, starttime))
        });
        let Some((pid, starttime)) = alive else {
            return Ok(match shim::read_status(&status_file) {
                Some(status) => Recovered::Exited(status),
                None => Recovered::Gone,
            });
        };
        let (status_tx, status_rx) = watch::channel(None);
        let cgroup = self.task_cgroup(&ctx.task_id);
        tokio::spawn(watch_adopted(
            pid,
            starttime,
            status_file,
            cgroup,
            status_tx,
        ));
        tracing::debug!(task = %ctx.task_id, pid, "adopted process");
        self.tasks().insert(
            ctx.task_id.clone(),
            Arc::new(TaskEntry {
                pid,
                starttime: Some(starttime),
                status: status_rx,
                control: Control::Adopted,
            }),
        );
        Ok(Recovered::Adopted)
    }
}

/// Owns a child until it ends: reaps it, signals its group on request, and publishes how
/// it ended. Ends when the child has ended.
async fn watch_child(
    mut child: tokio::process::Child,
    pgid: i32,
    mut requests: mpsc::Receiver<SignalRequest>,
    shim_status: Option<PathBuf>,
    cgroup: Option<TaskCgroup>,
    status_tx: watch::Sender<Option<ExitStatus>>,
) {
    let result = loop {
        tokio::select! {
            result = child.wait() => break result,
            Some(request) = requests.recv() => {
                // Check without blocking whether the child has ended: signalling the
                // group of a reaped child could hit a stranger that reused the pid.
                match child.try_wait() {
                    Ok(None) => {
                        let sent = killpg(Pid::from_raw(pgid), request.signal).is_ok();
                        request.answer(sent);
                    }
                    Ok(Some(status)) => {
                        request.answer(false);
                        break Ok(status);
                    }
                    Err(e) => {
                        request.answer(false);
                        break Err(e);
                    }
                }
            }
        }
    };
    let own = match result {
        Ok(status) => exit_status(status),
        Err(e) => ExitStatus::Unknown(format!("waiting for the process failed: {e}")),
    };
    // The shim's record is authoritative: it is the program's own exit, whereas the
    // shim's status only says how the shim ended. No record means the shim was killed
    // (SIGKILL to the group) before the program ended, and then its own status is right.
    let status = shim_status
        .as_deref()
        .and_then(shim::read_status)
        .unwrap_or(own);
    let status = match &cgroup {
        Some(cg) => with_oom(status, cg.end().await),
        None => status,
    };
    status_tx.send_replace(Some(status));
}

/// Removes a cgroup nothing ran in, logging a failure: there is no task to fail.
async fn remove_cgroup(cg: &TaskCgroup) {
    let cg = cg.clone();
    let name = cg.name.clone();
    let removed = tokio::task::spawn_blocking(move || cg.driver.remove(&cg.name)).await;
    match removed {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(task = %name, "removing the task's cgroup: {e}"),
        Err(e) => tracing::warn!(task = %name, "removing the task's cgroup stopped: {e}"),
    }
}

/// Watches a process we are not the parent of, by polling, and publishes how it ended.
/// Ends when the process has ended or when nobody can observe the status any more.
async fn watch_adopted(
    pid: i32,
    starttime: u64,
    status_file: PathBuf,
    cgroup: Option<TaskCgroup>,
    status_tx: watch::Sender<Option<ExitStatus>>,
) {
    let mut tick = tokio::time::interval(ADOPTED_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if status_tx.is_closed() {
            return;
        }
        if !is_running(pid, Some(starttime)) {
            break;
        }
    }
    let status = shim::read_status(&status_file)
        .unwrap_or_else(|| ExitStatus::Unknown(ADOPTED_UNKNOWN.to_string()));
    let status = match &cgroup {
        Some(cg) => with_oom(status, cg.end().await),
        None => status,
    };
    status_tx.send_replace(Some(status));
}

/// Converts a std exit status, naming the signal when there was one.
fn exit_status(status: std::process::ExitStatus) -> ExitStatus {
    match (status.code(), status.signal()) {
        (Some(code), _) => ExitStatus::Exited(code),
        (None, Some(signo)) => ExitStatus::Signaled(shim::signal_name(signo)),
        (None, None) => ExitStatus::Unknown(format!("unrecognised exit status {status:?}")),
    }
}

/// Finds the program a task runs, the way exec would: a name containing `/` is a path
/// (relative to the task directory), anything else is looked up in the task's PATH.
fn resolve_program(ctx: &TaskContext) -> Result<PathBuf, RuntimeError> {
    let Some(program) = ctx.spec.command.first() else {
        return Err(RuntimeError::Start("the command is empty".into()));
    };
    if program.contains('/') {
        let path = ctx.dir.join(program);
        return if is_executable(&path) {
            Ok(path)
        } else if path.exists() {
            Err(RuntimeError::Start(format!(
                "program {program:?} is not an executable file"
            )))
        } else {
            Err(RuntimeError::Start(format!(
                "program {program:?} not found"
            )))
        };
    }
    let search = ctx
        .env
        .get("PATH")
        .map(String::as_str)
        .unwrap_or(DEFAULT_PATH);
    search
        .split(':')
        // An empty PATH entry means the current directory, which is the task directory.
        .map(|dir| {
            ctx.dir
                .join(if dir.is_empty() { "." } else { dir })
                .join(program)
        })
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| {
            RuntimeError::Start(format!("program {program:?} not found in PATH {search}"))
        })
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Turns a spawn failure into a message naming what could not be run.
fn spawn_error(program: &str, shim_path: Option<&Path>, e: &io::Error) -> RuntimeError {
    let what = match shim_path {
        Some(path) => format!("the shim {}", path.display()),
        None => format!("program {program:?}"),
    };
    RuntimeError::Start(match (e.kind(), e.raw_os_error()) {
        (io::ErrorKind::NotFound, _) => format!("{what} not found"),
        (io::ErrorKind::PermissionDenied, _) => format!("{what} is not executable: {e}"),
        (_, Some(libc::ENOEXEC)) => {
            format!("{what} is not an executable for this platform (exec format error)")
        }
        _ => format!("cannot run {what}: {e}"),
    })
}

/// Opens a log file for appending, so the agent's tail and earlier output are kept.
/// A symbolic link there is refused rather than followed, since the task may have
/// planted it.
fn open_log(path: &Path) -> Result<std::fs::File, RuntimeError> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .append(true)
        .create(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| RuntimeError::Start(format!("cannot open log file {}: {e}", path.display())))
}

/// Opens the task's input for reading, refusing to follow a symbolic link to it.
fn open_stdin(path: &Path) -> Result<std::fs::File, RuntimeError> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| {
            RuntimeError::Start(format!(
                "cannot open the stdin file {}: {e}",
                path.display()
            ))
        })
}

/// Makes `path` an empty regular file, refusing to follow a symbolic link there.
fn create_empty(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    if f.metadata()?.len() > 0 {
        f.set_len(0)?;
    }
    Ok(())
}

fn empty_if_exists(path: &Path) -> io::Result<()> {
    match std::fs::OpenOptions::new().write(true).open(path) {
        Ok(f) if f.metadata()?.len() > 0 => f.set_len(0),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Writes `<dir>/pid` as `"<pid> <starttime>"`; the start time is `-` where `/proc` is
/// unavailable, and such a task is then never adopted.
fn write_pid_file(dir: &Path, pid: i32, starttime: Option<u64>) -> io::Result<()> {
    let starttime = starttime.map_or_else(|| "-".to_string(), |t| t.to_string());
    shim::write_record_file(
        &dir.join(PID_FILE),
        format!("{pid} {starttime}\n").as_bytes(),
    )
}

/// Reads `<dir>/pid`; `None` when it is missing or malformed.
fn read_pid_file(dir: &Path) -> Option<(i32, Option<u64>)> {
    let text = std::fs::read_to_string(dir.join(PID_FILE)).ok()?;
    let mut fields = text.split_whitespace();
    let pid: i32 = fields.next()?.parse().ok()?;
    // Pids 0 and below address groups or everything when signalled; never accept them.
    if pid <= 0 {
        return None;
    }
    let starttime = fields.next().and_then(|t| t.parse().ok());
    Some((pid, starttime))
}

/// Whether `pid` is a live (not zombie) process that started at `starttime`.
fn is_running(pid: i32, starttime: Option<u64>) -> bool {
    match (read_proc_stat(pid), starttime) {
        (Some(stat), Some(expected)) => stat.state != 'Z' && stat.starttime == expected,
        _ => false,
    }
}

fn read_proc_stat(pid: i32) -> Option<ProcStat> {
    parse_proc_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) is in parentheses and may itself
/// contain spaces and parentheses, so the fields are counted from the last `)`.
fn parse_proc_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (the state), so field n is f[n - 3].
    let field = |n: usize| f.get(n - 3).copied();
    let num = |n: usize| field(n).and_then(|v| v.parse::<u64>().ok());
    Some(ProcStat {
        state: field(3)?.chars().next()?,
        pgrp: field(5)?.parse().ok()?,
        cpu_ticks: num(14)? + num(15)?,
        starttime: num(22)?,
        rss_pages: num(24)?,
    })
}

/// Sums the CPU time and resident memory of every process in a process group: a task
/// is its whole group, children included.
fn group_usage(pgid: i32) -> crate::TaskStats {
    // SAFETY: sysconf has no preconditions; it only reads system configuration.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    let mut out = crate::TaskStats::default();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if let Some(st) = read_proc_stat(pid)
            && st.pgrp == pgid
        {
            out.cpu_seconds += st.cpu_ticks as f64 / ticks;
            out.memory_bytes += st.rss_pages * page;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_core::spec::JobSpec;
    use std::time::Instant;

    fn spec(command: &[&str]) -> JobSpec {
        let json = serde_json::json!({
            "name": "t",
            "command": command,
        });
        JobSpec::from_json(json.to_string().as_bytes()).unwrap()
    }

    fn context(dir: &Path, command: &[&str]) -> TaskContext {
        TaskContext {
            task_id: TaskId::generate(),
            job_name: "t".into(),
            job_id: drover_core::JobId::from("job-t"),
            index: 0,
            spec: spec(command),
            dir: dir.to_path_buf(),
            env: BTreeMap::from([("DROVER_TASK_ID".to_string(), "x".to_string())]),
            stdout_path: dir.join("stdout.log"),
            stderr_path: dir.join("stderr.log"),
            user: None,
            stdin: None,
            mounts: Vec::new(),
            workdir: None,
        }
    }

    fn direct() -> ProcessRuntime {
        ProcessRuntime::new(ProcessConfig::default())
    }

    async fn wait(rt: &ProcessRuntime, id: &TaskId) -> ExitStatus {
        tokio::time::timeout(Duration::from_secs(10), rt.wait(id))
            .await
            .expect("the task ends in time")
            .unwrap()
    }

    /// Polls a log file until it has a line, for tasks that print then keep running.
    async fn first_line(path: &Path) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            if let Some((line, _)) = text.split_once('\n') {
                return line.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "nothing logged to {}",
                path.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Removes a file a test is about to have written afresh; one not there yet is fine.
    fn remove_if_there(path: &Path) {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("removing {}: {e}", path.display()),
        }
    }

    /// Polls a log file until it contains `needle`; the test binary acting as the shim
    /// logs a line of its own first.
    async fn until_logged(path: &Path, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !std::fs::read_to_string(path)
            .unwrap_or_default()
            .contains(needle)
        {
            assert!(
                Instant::now() < deadline,
                "{needle:?} never logged to {}",
                path.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether a process has ended (gone, or a zombie nobody reaped yet).
    fn ended(pid: i32) -> bool {
        read_proc_stat(pid).is_none_or(|s| s.state == 'Z')
    }

    async fn eventually_ended(pid: i32) -> bool {
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if ended(pid) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    #[test]
    fn proc_stat_is_parsed_after_the_last_parenthesis() {
        let tail = "S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 987654 20 21";
        for comm in ["sleep", "a b", "x) S 9 (y", ")("] {
            let text = format!("123 ({comm}) {tail}\n");
            assert_eq!(
                parse_proc_stat(&text),
                Some(ProcStat {
                    state: 'S',
                    starttime: 987654,
                    pgrp: 2,
                    cpu_ticks: 23,
                    rss_pages: 21,
                }),
                "{comm}"
            );
        }
        assert_eq!(parse_proc_stat("123 (x) S 1 2"), None);
        let me = read_proc_stat(std::process::id() as i32).unwrap();
        assert!(me.starttime > 0);
    }

    /// A task's usage covers its whole process group: a child that burns CPU and holds
    /// memory shows up in the sample.
    #[tokio::test]
    async fn stats_sum_the_task_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let rt = ProcessRuntime::new(ProcessConfig::default());
        // The shell forks a child that fills 32 MiB and spins; the sample must see it.
        let ctx = context(
            dir.path(),
            &[
                "sh",
                "-c",
                "python3 -c 'x = bytearray(32 << 20); [0 for _ in iter(int, 1)]' & wait",
            ],
        );
        rt.start(&ctx).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let stats = loop {
            let s = rt.stats(&ctx.task_id).await.unwrap();
            if (s.memory_bytes > 32 << 20 && s.cpu_seconds > 0.2) || Instant::now() > deadline {
                break s;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        rt.stop(&ctx.task_id, Duration::ZERO).await.unwrap();
        assert!(stats.memory_bytes > 32 << 20, "{stats:?}");
        assert!(stats.cpu_seconds > 0.2, "{stats:?}");
    }

    #[tokio::test]
    async fn a_command_runs_with_its_logs_and_exit_code() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(
            dir.path(),
            &["sh", "-c", "echo out; echo err >&2; pwd; exit 3"],
        );
        let rt = direct();
        rt.prepare(&ctx).await.unwrap();
        rt.start(&ctx).await.unwrap();
        assert_eq!(wait(&rt, &ctx.task_id).await, ExitStatus::Exited(3));
        // Every caller sees the same status, however often it asks.
        assert_eq!(wait(&rt, &ctx.task_id).await, ExitStatus::Exited(3));
        let out = std::fs::read_to_string(&ctx.stdout_path).unwrap();
        let cwd = dir.path().canonicalize().unwrap();
        assert_eq!(out, format!("out\n{}\n", cwd.display()));
        assert_eq!(std::fs::read_to_string(&ctx.stderr_path).unwrap(), "err\n");
        let pid_file = std::fs::read_to_string(dir.path().join(PID_FILE)).unwrap();
        let (pid, starttime) = read_pid_file(dir.path()).unwrap();
        assert!(pid > 0 && starttime.is_some(), "{pid_file}");
        assert_eq!(
            rt.stop(&ctx.task_id, Duration::from_secs(1)).await.unwrap(),
            StopOutcome::AlreadyExited
        );
        rt.destroy(&ctx.task_id).await.unwrap();
        assert!(matches!(
            rt.wait(&ctx.task_id).await,
            Err(RuntimeError::UnknownTask(_))
        ));
    }

    #[tokio::test]
    async fn the_task_sees_only_its_own_environment() {
        // SAFETY: tests in this binary read no environment variable of this name, and
        // the variable is only ever added, so concurrent readers see a valid environment.
        unsafe { std::env::set_var("DROVER_TEST_SECRET", "leaked") };
        let dir = tempfile::tempdir().unwrap();
        let mut ctx = context(
            dir.path(),
            &[
                "sh",
                "-c",
                "echo \"[$DROVER_TEST_SECRET] [$GREETING] [$PATH]\"",
            ],
        );
        ctx.env.insert("GREETING".into(), "hello".into());
        let rt = direct();
        rt.start(&ctx).await.unwrap();
        assert_eq!(wait(&rt, &ctx.task_id).await, ExitStatus::Exited(0));
        let out = std::fs::read_to_string(&ctx.stdout_path).unwrap();
        assert_eq!(out, format!("[] [hello] [{DEFAULT_PATH}]\n"));
    }

    #[tokio::test]
    async fn stop_ends_a_task_gracefully_with_sigterm() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path(), &["sh", "-c", "sleep 30"]);
        let rt = direct();
        rt.start(&ctx).await.unwrap();
        let started = Instant::now();
        let outcome = rt.stop(&ctx.task_id, Duration::from_secs(5)).await.unwrap();
        assert_eq!(outcome, StopOutcome::Graceful);
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(
            wait(&rt, &ctx.task_id).await,
            ExitStatus::Signaled("SIGTERM".into())
        );
        assert_eq!(
            rt.stop(&ctx.task_id, Duration::from_secs(1)).await.unwrap(),
            StopOutcome::AlreadyExited
        );
    }

    #[tokio::test]
    async fn stop_kills_a_task_that_ignores_sigterm_when_the_grace_runs_out() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(
            dir.path(),
            &[
                "sh",
                "-c",
                "trap '' TERM; echo ready; while true; do sleep 0.1; done",
            ],
        );
        let rt = Arc::new(direct());
        rt.start(&ctx).await.unwrap();
        // The trap must be in place before the signal, or SIGTERM would end it.
        first_line(&ctx.stdout_path).await;
        let waiter = {
            let rt = rt.clone();
            let id = ctx.task_id.clone();
            tokio::spawn(async move { rt.wait(&id).await })
        };
        let started = Instant::now();
        let grace = Duration::from_millis(300);
        let outcome = rt.stop(&ctx.task_id, grace).await.unwrap();
        let took = started.elapsed();
        assert_eq!(outcome, StopOutcome::Killed);
        assert!(
            took >= grace && took < grace + Duration::from_secs(2),
            "{took:?}"
        );
        let status = waiter.await.unwrap().unwrap();
        assert_eq!(status, ExitStatus::Signaled("SIGKILL".into()));
    }

    #[tokio::test]
    async fn stop_reaches_the_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path(), &["sh", "-c", "sleep 30 & echo $!; wait"]);
        let rt = direct();
        rt.start(&ctx).await.unwrap();
        let grandchild: i32 = first_line(&ctx.stdout_path).await.parse().unwrap();
        assert!(!ended(grandchild));
        rt.stop(&ctx.task_id, Duration::from_secs(5)).await.unwrap();
        assert!(
            eventually_ended(grandchild).await,
            "the grandchild {grandchild} survived"
        );
    }

    #[tokio::test]
    async fn a_missing_program_is_a_start_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let rt = direct();
        for command in [&["drover-nosuch"][..], &["./drover-nosuch"][..]] {
            let ctx = context(dir.path(), command);
            for err in [
                rt.prepare(&ctx).await.unwrap_err(),
                rt.start(&ctx).await.unwrap_err(),
            ] {
                let text = err.to_string();
                assert!(matches!(err, RuntimeError::Start(_)), "{text}");
                assert!(
                    text.contains(&format!("program {:?} not found", command[0])),
                    "{text}"
                );
            }
        }
        // A task PATH is searched instead of the default one.
        let mut ctx = context(dir.path(), &["sh", "-c", "true"]);
        ctx.env.insert("PATH".into(), "/nonexistent".into());
        let text = rt.prepare(&ctx).await.unwrap_err().to_string();
        assert!(text.contains("not found in PATH /nonexistent"), "{text}");
        // A directory is not a program.
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let ctx = context(dir.path(), &["./sub"]);
        let text = rt.start(&ctx).await.unwrap_err().to_string();
        assert!(text.contains("not an executable"), "{text}");
    }

    #[tokio::test]
    async fn a_restarted_agent_adopts_a_running_task_and_can_stop_it() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path(), &["sh", "-c", "sleep 30"]);
        {
            let rt = direct();
            rt.start(&ctx).await.unwrap();
        }
        let rt = direct();
        assert_eq!(rt.recover(&ctx).await.unwrap(), Recovered::Adopted);
        assert_eq!(rt.recover(&ctx).await.unwrap(), Recovered::Adopted);
        let outcome = rt.stop(&ctx.task_id, Duration::from_secs(5)).await.unwrap();
        assert_eq!(outcome, StopOutcome::Graceful);
        // Without a shim nobody recorded how it ended.
        assert_eq!(
            wait(&rt, &ctx.task_id).await,
            ExitStatus::Unknown(ADOPTED_UNKNOWN.into())
        );
        let (pid, _) = read_pid_file(dir.path()).unwrap();
        assert!(eventually_ended(pid).await);
    }

    #[tokio::test]
    async fn a_recycled_pid_is_never_adopted_or_signalled() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path(), &["sh", "-c", "sleep 30"]);
        let first = direct();
        first.start(&ctx).await.unwrap();
        let (pid, starttime) = read_pid_file(dir.path()).unwrap();
        // Pretend the recorded process was an earlier one that held the same pid.
        let wrong = starttime.unwrap() + 1;
        std::fs::write(dir.path().join(PID_FILE), format!("{pid} {wrong}\n")).unwrap();
        let rt = direct();
        assert_eq!(rt.recover(&ctx).await.unwrap(), Recovered::Gone);
        assert!(matches!(
            rt.stop(&ctx.task_id, Duration::from_millis(100)).await,
            Err(RuntimeError::UnknownTask(_))
        ));
        assert!(!ended(pid), "the unrelated process was touched");
        first
            .stop(&ctx.task_id, Duration::from_secs(5))
            .await
            .unwrap();
        // A recorded exit status is reported instead of Gone.
        shim::write_status(&dir.path().join(STATUS_FILE), &ExitStatus::Exited(4)).unwrap();
        let rt = direct();
        assert_eq!(
            rt.recover(&ctx).await.unwrap(),
            Recovered::Exited(ExitStatus::Exited(4))
        );
    }

    #[tokio::test]
    async fn with_the_shim_the_programs_status_is_recorded_and_recovered() {
        let dir = tempfile::tempdir().unwrap();
        let shim_path = shim::tests::shim_wrapper(dir.path());
        let config = ProcessConfig {
            shim: Some(shim_path),
            ..ProcessConfig::default()
        };
        let task_dir = dir.path().join("task");
        std::fs::create_dir(&task_dir).unwrap();

        let ctx = context(&task_dir, &["sh", "-c", "echo hi; exit 3"]);
        let rt = ProcessRuntime::new(config.clone());
        rt.start(&ctx).await.unwrap();
        assert_eq!(wait(&rt, &ctx.task_id).await, ExitStatus::Exited(3));
        assert!(
            std::fs::read_to_string(&ctx.stdout_path)
                .unwrap()
                .contains("hi\n")
        );
        // A later agent learns how it ended from the status file.
        assert_eq!(
            ProcessRuntime::new(config.clone())
                .recover(&ctx)
                .await
                .unwrap(),
            Recovered::Exited(ExitStatus::Exited(3))
        );

        // SIGTERM reaches the program, not just the shim, and the shim records it. The
        // stop waits until the program runs: a stop during the shim's own start-up would
        // end the shim before it shields itself, and then nothing would be recorded.
        let ctx = context(&task_dir, &["sh", "-c", "echo ready; sleep 30"]);
        remove_if_there(&ctx.stdout_path);
        rt.start(&ctx).await.unwrap();
        until_logged(&ctx.stdout_path, "ready").await;
        {
            let adopter = ProcessRuntime::new(config.clone());
            assert_eq!(adopter.recover(&ctx).await.unwrap(), Recovered::Adopted);
            let outcome = adopter
                .stop(&ctx.task_id, Duration::from_secs(5))
                .await
                .unwrap();
            assert_eq!(outcome, StopOutcome::Graceful);
            let status = wait(&adopter, &ctx.task_id).await;
            assert_eq!(status, ExitStatus::Signaled("SIGTERM".into()));
        }
        assert_eq!(
            wait(&rt, &ctx.task_id).await,
            ExitStatus::Signaled("SIGTERM".into())
        );

        // A program that ignores SIGTERM is killed with its shim, which then cannot record.
        let ctx = context(
            &task_dir,
            &[
                "sh",
                "-c",
                "trap '' TERM; echo ready; while true; do sleep 0.1; done",
            ],
        );
        remove_if_there(&ctx.stdout_path);
        rt.start(&ctx).await.unwrap();
        until_logged(&ctx.stdout_path, "ready").await;
        let outcome = rt
            .stop(&ctx.task_id, Duration::from_millis(300))
            .await
            .unwrap();
        assert_eq!(outcome, StopOutcome::Killed);
        assert_eq!(
            wait(&rt, &ctx.task_id).await,
            ExitStatus::Signaled("SIGKILL".into())
        );
    }

    #[tokio::test]
    async fn fingerprint_always_succeeds() {
        let fp = direct().fingerprint().await.unwrap();
        assert_eq!(fp.kind, RuntimeKind::Process);
        assert_eq!(fp.attributes["os"], std::env::consts::OS);
    }
}
