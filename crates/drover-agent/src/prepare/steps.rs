//! The agent's prepare steps, in the order they run.
//!
//! What every task's launch has from the start (its declared environment, `DROVER_*`,
//! the artifact's path and the command that runs it) is not a step's: the task
//! manager computes it from the assignment alone (`TaskManager::context`), because a
//! restarted agent hands the same context to a runtime that re-adopts the task. A step
//! adds to the launch only what exists once it has run: the task's user, a Python
//! environment's variables.

use super::{PrepareError, PrepareStep, StepGuard};
use crate::artifacts::Lease;
use crate::holdings::{Holdings, RetireQueue};
use crate::logship::log_path;
use crate::users::TaskUsers;
use async_trait::async_trait;
use drover_core::platform::{BinaryPlatform, detect_executable, runs_on};
use drover_core::protocol::{AssignedArtifact, LogStream, TaskAssignment};
use drover_core::spec::RuntimeKind;
use drover_runtime::sandbox::TaskUser;
use drover_runtime::{Runtime, TaskContext};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The file in a task's directory holding its job's config, named by `DROVER_CONFIG`.
pub const CONFIG_FILE: &str = "config.json";

/// What is kept in a task's directory so a restarted agent knows the task.
#[derive(Serialize, Deserialize)]
pub(crate) struct TaskFile {
    pub assignment: TaskAssignment,
    /// The uid (and private gid) the task runs as, when it runs as a user of its own;
    /// a restarted agent takes it back before handing out any other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
}

/// Where a docker task's working_dir is unpacked in its task directory: a directory of
/// its own, since that alone is bound into the container (the rest of the task
/// directory holds the agent's files).
pub const CONTAINER_WORK_DIR: &str = "work";

/// The largest working_dir archive an agent downloads.
const MAX_WORKING_DIR_ARCHIVE: u64 = 4 << 30;

/// Files of the agent's own in a task's directory. They stay the agent's when the rest of
/// the directory is given to the task's user, so the task cannot rewrite what the agent
/// reads back (its assignment, its pid, how it ended).
const AGENT_FILES: &[&str] = &[
    "task.json",
    "stdout.log",
    "stderr.log",
    "prepare.log",
    "stdout.log.1",
    "stderr.log.1",
    "prepare.log.1",
    "logpos.json",
    "pid",
    "exit-status",
    CONFIG_FILE,
    crate::socket::SOCKET_FILE,
];

/// Every step of a task's preparation, in the order they run. The task's user comes
/// first, since its directory is made its own; the directory before anything is put
/// in it; the runtime last, with the task's whole environment (a Python environment's
/// `PATH` finds its `python`).
pub(crate) static STEPS: &[&dyn PrepareStep<PrepareContext>] = &[
    &TaskUserStep,
    &TaskDirStep,
    &SocketStep,
    &ConfigStep,
    &WorkingDirStep,
    &PythonStep,
    &ArtifactStep,
    &StdinStep,
    &RuntimeStep,
];

/// What the agent's steps work with.
pub(crate) struct PrepareContext {
    /// What the node holds: task users, the directory pool, the artifact cache and the
    /// Python environments.
    pub holdings: Arc<Holdings>,
    pub assignment: TaskAssignment,
    /// The task's launch, which the steps add to.
    pub launch: TaskContext,
    pub runtime: Arc<dyn Runtime>,
    /// The preparation's deadline, which also bounds a Python environment's build.
    pub timeout: Duration,
}

impl PrepareContext {
    /// The task's preparing log, where steps note what they do for `drover logs
    /// --prepare`.
    fn log(&self) -> PathBuf {
        log_path(&self.launch.dir, LogStream::Prepare)
    }
}

/// Gives a process task a user of its own, when the agent can give it one.
struct TaskUserStep;

#[async_trait]
impl PrepareStep<PrepareContext> for TaskUserStep {
    fn name(&self) -> &'static str {
        "task user"
    }

    async fn prepare(&self, cx: &mut PrepareContext) -> Result<StepGuard, PrepareError> {
        let users = match (&cx.holdings.users, &cx.assignment.spec.runtime) {
            (Some(users), RuntimeKind::Process) => users,
            _ => return Ok(StepGuard::nothing()),
        };
        let Some(uid) = users.take() else {
            return Err(format!(
                "no free task user on this node: all {} uids of --task-uid-range are in use",
                users.taken()
            )
            .into());
        };
        cx.launch.user = Some(TaskUser::private(uid));
        Ok(user_guard(users.clone(), uid))
    }
}

/// Gives a task's uid back once the task is retired: its processes have ended, so the
/// uid can go to another task. Its directory, still owned by that uid's group, is
/// emptied before any task gets it again.
pub(crate) fn user_guard(users: Arc<TaskUsers>, uid: u32) -> StepGuard {
    StepGuard::until_retired(move || users.release(uid))
}

/// Makes the task's directory (from the pool when it can), gives it to the task's user,
/// and records the assignment in it, so a restarted agent finds the task again.
struct TaskDirStep;

#[async_trait]
impl PrepareStep<PrepareContext> for TaskDirStep {
    fn name(&self) -> &'static str {
        "task directory"
    }

    async fn prepare(&self, cx: &mut PrepareContext) -> Result<StepGuard, PrepareError> {
        let holdings = &cx.holdings;
        let dir = &cx.launch.dir;
        let made = holdings
            .pool
            .take(dir)
            .and_then(|()| match (cx.launch.user, &holdings.users) {
                (Some(user), _) => hand_over_dir(dir, user),
                // A recycled directory may still carry the group of the task that had
                // it before, whose uid may be another task's by now.
                (None, Some(_)) => take_back_dir(dir),
                (None, None) => Ok(()),
            });
        if let Err(e) = made {
            // Whatever part of it was made goes back to the pool, which empties it
            // before any task gets it.
            holdings.pool.give(dir);
            return Err(format!("creating the task directory: {e}").into());
        }
        write_task_file(&cx.assignment, dir, cx.launch.user.map(|u| u.uid));
        Ok(dir_guard(holdings.retired.clone(), dir.clone()))
    }
}

/// Queues a task's directory for recycling once the task is retired: the controller
/// has its end and its logs by then. It is recycled a little later still (see
/// `TaskManager::collect_garbage`), so that anything finishing with it is done.
pub(crate) fn dir_guard(retired: RetireQueue, dir: PathBuf) -> StepGuard {
    StepGuard::until_retired(move || {
        retired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back((std::time::Instant::now(), dir));
    })
}

/// Records the assignment (and the uid the task runs as) in `task.json`.
fn write_task_file(a: &TaskAssignment, dir: &Path, uid: Option<u32>) {
    let file = TaskFile {
        assignment: a.clone(),
        uid,
    };
    // One write to a new file, without a temporary file and rename: the file is
    // written once, before the task starts, and recovery treats an unreadable one
    // as a start that never happened (which it then was). Each inode operation
    // saved here is time every short task saves.
    let write = || -> std::io::Result<()> {
        let bytes = serde_json::to_vec(&file).map_err(std::io::Error::other)?;
        std::fs::write(dir.join("task.json"), bytes)
    };
    if let Err(e) = write() {
        tracing::error!(task = %a.task_id, "writing task.json: {e}");
    }
}

/// Serves the task's socket, when its launch names one: from before the task starts
/// (or, for an adopted task, from when the agent adopts it) until it has ended.
struct SocketStep;

impl SocketStep {
    async fn serve(cx: &PrepareContext) -> Result<StepGuard, PrepareError> {
        let (a, launch) = (&cx.assignment, &cx.launch);
        if !launch.env.contains_key(crate::socket::ENV_VAR) {
            if a.spec.vertex.is_some() {
                return Err(format!(
                    "a pipeline vertex's replica needs the task socket, which runtime {} tasks are not given",
                    a.spec.runtime
                )
                .into());
            }
            return Ok(StepGuard::nothing());
        }
        // Where the task is told to look may be a path inside its container; the
        // socket itself is always here, bound into the container when it has one.
        let in_container = a.spec.runtime == drover_core::RuntimeKind::Docker;
        let path = if in_container {
            crate::socket::container_socket_dir(&launch.dir).join(crate::socket::SOCKET_FILE)
        } else {
            crate::socket::socket_path(&launch.dir)
        };
        let path = path.display().to_string();
        let path = path.as_str();
        let config = a
            .config
            .as_ref()
            .filter(|c| c.format == drover_core::protocol::CONFIG_FORMAT_JSON)
            .map(|c| c.data.clone());
        let facts = crate::socket::TaskFacts {
            task_id: a.task_id.to_string(),
            job: a.job_name.clone(),
            job_id: a.job_id.to_string(),
            project: a.project.to_string(),
            index: a.index,
            attempt: a.attempt,
            config,
        };
        // A vertex's replica has its data connections served by a plane over the
        // pipeline's buffers; its counters are reported while the socket is served.
        let (data, counters) = match a.spec.vertex.as_deref() {
            Some(plane) => {
                let vertices = &cx.holdings.vertices;
                if plane.is_builtin() {
                    vertices
                        .builtin_command(plane)
                        .map_err(|why| format!("built-in vertex: {why}"))?;
                }
                let (endpoint, counters) = vertices
                    .plane(a, plane)
                    .await
                    .map_err(|e| format!("the vertex's data plane: {e}"))?;
                (Some(Arc::new(endpoint)), Some(counters))
            }
            None => (None, None),
        };
        let socket = crate::socket::TaskSocket::bind_with(Path::new(path), facts, data)
            .map_err(|e| format!("serving the task socket {path}: {e}"))?;
        if let Some(user) = launch.user {
            // Dropping the socket on this error stops serving it and removes it.
            socket
                .restrict_to(user.uid, user.gid)
                .map_err(|e| format!("giving the task socket {path} to its user: {e}"))?;
        }
        Ok(StepGuard::holding((socket, counters)))
    }
}

#[async_trait]
impl PrepareStep<PrepareContext> for SocketStep {
    fn name(&self) -> &'static str {
        "task socket"
    }

    async fn prepare(&self, cx: &mut PrepareContext) -> Result<StepGuard, PrepareError> {
        SocketStep::serve(cx).await
    }

    async fn readopt(&self, cx: &mut PrepareContext) -> Result<StepGuard, PrepareError> {
        SocketStep::serve(cx).await
    }
}

/// Writes the job's `runtime_env.config` to the task's directory, where `DROVER_CONFIG`
/// names it. It goes with the directory.
struct ConfigStep;

#[async_trait]
impl PrepareStep<PrepareContext> for ConfigStep {
    fn name(&self) -> &'static str {
        "config"
    }

    async fn prepare(&self, cx: &mut PrepareContext) -> Result<StepGuard, PrepareError> {
        let Some(config) = &cx.assignment.config else {
            return Ok(StepGuard::nothing());
        };
        let json = config
            .json()
            .map_err(|e| format!("runtime_env.config: {e}"))?;
        let path = cx.launch.dir.join(CONFIG_FILE);
        tokio::fs::write(&path, json)
            .await
            .map_err(|e| format!("runtime_env.config: writing {}: {e}", path.display()))?;
        Ok(StepGuard::nothing())
    }
}

/// Unpacks the job's uploaded `runtime_env.working_dir` archive into the task's
/// directory, and gives its files to the task's user. They go with the directory, and
/// the archive's cache lease is released as soon as it is unpacked.
struct WorkingDirStep;

#[async_trait]
impl PrepareStep<PrepareContext> for WorkingDirStep {
    fn name(&self) -> &'static str {
        "working_dir"
    }

    async fn prepare(&self, cx: &mut PrepareContext) -> Result<StepGuard, PrepareError> {
        let Some(w) = &cx.assignment.spec.runtime_env.working_dir else {
            return Ok(StepGuard::nothing());
        };
        let log = cx.log();
        let digest: drover_core::artifact::Digest = w
            .parse()
            .map_err(|e| format!("runtime_env.working_dir: {e}"))?;
        note(&log, &format!("fetching working_dir {digest}\n")).await;
        let lease = cx
            .holdings
            .artifacts
            .cache
            .get_up_to(&digest, MAX_WORKING_DIR_ARCHIVE)
            .await
            .map_err(|e| format!("runtime_env.working_dir: {e}"))?;
        let dest = if cx.assignment.spec.runtime == drover_core::RuntimeKind::Docker {
            let work = cx.launch.dir.join(CONTAINER_WORK_DIR);
            tokio::fs::create_dir_all(&work).await.map_err(|e| {
                format!("runtime_env.working_dir: creating {}: {e}", work.display())
            })?;
            work
        } else {
            cx.launch.dir.clone()
        };
        let archive = lease.path().to_path_buf();
        let into = dest.clone();
        let unpacked = tokio::task::spawn_blocking(move || {
            crate::unpack::unpack(&archive, &into, &crate::unpack::UnpackLimits::default())
        })
        .await
        .map_err(|e| format!("runtime_env.working_dir: unpacking stopped: {e}"))?
        .map_err(|e| format!("runtime_env.working_dir: {e}"))?;
        if let Some(user) = cx.launch.user {
            // The task may change its files as it could on a machine of its own.
            tokio::task::spawn_blocking(move || give_contents_to(&dest, user))
                .await
                .map_err(|e| format!("runtime_env.working_dir: handing over stopped: {e}"))?
                .map_err(|e| {
                    format!("runtime_env.working_dir: giving the files to the task's user: {e}")
                })?;
        }
        let done = format!(
            "working_dir unpacked: {} files, {} bytes",
            unpacked.files, unpacked.bytes
        );
        note(&log, &format!("{done}\n")).await;
        Ok(StepGuard::nothing().noting(done))
    }
}

/// Makes the job's `runtime_env.python` environment ready (built, or found in the
/// node's cache) and adds its variables to the launch. Its lease keeps the environment
/// from being pruned while the task runs.
struct PythonStep;

impl PythonStep {
    /// Adds the environment's variables to the launch, its `bin` first on `PATH`.
    fn activate(cx: &mut PrepareContext, lease: &crate::pyenv::EnvLease) {
        let base = cx
            .launch
            .env
            .get("PATH")
            .map(String::as_str)
            .unwrap_or(drover_runtime::process::DEFAULT_PATH);
        let vars = lease.env_vars(base);
        cx.launch.env.extend(vars);
    }
}

#[async_trait]
impl PrepareStep<PrepareContext> for PythonStep {
    fn name(&self) -> &'static str {
        "python env"
    }

    async fn prepare(&self, cx: &mut PrepareContext) -> Result<StepGuard, PrepareError> {
        let Some(py) = &cx.assignment.spec.runtime_env.python else {
            return Ok(StepGuard::nothing());
        };
        let began = std::time::Instant::now();
        let lease = cx
            .holdings
            .artifacts
            .python
            .ensure(&py.requirements, &cx.log(), cx.timeout)
            .await
            .map_err(|e| format!("runtime_env.python: {e}"))?;
        PythonStep::activate(cx, &lease);
        let done = format!(
            "python environment ready in {:.1}s",
            began.elapsed().as_secs_f64()
        );
        Ok(StepGuard::holding(lease).noting(done))
    }

    /// Leases the environment the adopted task runs in again, so that a prune or an
    /// eviction after the agent's restart cannot delete it under the task. An
    /// environment that is gone is reported (the task keeps running; what it still
    /// needs from the environment will fail in the task itself).
    async fn readopt(&self, cx: &mut PrepareContext) -> Result<StepGuard, PrepareError> {
        let Some(py) = &cx.assignment.spec.runtime_env.python else {
            return Ok(StepGuard::nothing());
        };
        let lease = cx
            .holdings
            .artifacts
            .python
            .lease_cached(&py.requirements)
            .await
            .map_err(|e| format!("runtime_env.python: {e}"))?
            .ok_or_else(|| {
                format!(
                    "runtime_env.python: the environment for {:?} is no longer on this node",
                    py.requirements
                )
            })?;
        PythonStep::activate(cx, &lease);
        Ok(StepGuard::holding(lease))
    }
}

/// Fetches the task's artifact variant into the cache (or finds it there), checks that
/// this node can run it, and installs it in the task's directory under the artifact's
/// name. Its lease keeps the blob in the cache while the task runs.
struct ArtifactStep;

#[async_trait]
impl PrepareStep<PrepareContext> for ArtifactStep {
    fn name(&self) -> &'static str {
        "artifact"
    }

    async fn prepare(&self, cx: &mut PrepareContext) -> Result<StepGuard, PrepareError> {
        let Some(art) = &cx.assignment.artifact else {
            return Ok(StepGuard::nothing());
        };
        let lease = install_artifact(&cx.holdings, art, &cx.launch).await?;
        let done = format!(
            "artifact {} installed ({})",
            art.reference, art.variant.platform
        );
        Ok(StepGuard::holding(lease).noting(done))
    }

    /// Leases the adopted task's blob again while it is still cached, so the cache
    /// counts it as in use. The task runs its own installed file, which stays whether
    /// or not the blob does, so a blob evicted meanwhile is no error.
    async fn readopt(&self, cx: &mut PrepareContext) -> Result<StepGuard, PrepareError> {
        let Some(art) = &cx.assignment.artifact else {
            return Ok(StepGuard::nothing());
        };
        Ok(
            match cx
                .holdings
                .artifacts
                .cache
                .lease_cached(&art.variant.digest)
            {
                Some(lease) => StepGuard::holding(lease),
                None => StepGuard::nothing(),
            },
        )
    }
}

/// The artifact step's work. The error is the task's failure reason.
async fn install_artifact(
    holdings: &Holdings,
    art: &AssignedArtifact,
    launch: &TaskContext,
) -> Result<Lease, String> {
    let r = &art.reference;
    let support = &holdings.artifacts;
    let lease = support
        .cache
        .get(&art.variant.digest, art.variant.size)
        .await
        .map_err(|e| format!("artifact {r}: {e}"))?;
    if let (Some(node), BinaryPlatform::Native { .. }) = (&support.node, &art.variant.platform) {
        // Checked here so a wrong build fails with a reason, not "exec format error".
        let head = read_head(lease.path()).map_err(|e| format!("artifact {r}: {e}"))?;
        match detect_executable(&head) {
            Ok(exe)
                if exe
                    .platforms
                    .iter()
                    .any(|p| runs_on(p, node).is_some() || support.emulator(p).is_some()) => {}
            Ok(exe) => {
                let built: Vec<String> = exe.platforms.iter().map(|p| p.to_string()).collect();
                return Err(format!(
                    "artifact {r}: the file is built for {}, which this node ({}+{}) cannot run",
                    built.join(", "),
                    node.platform,
                    node.libc.kind
                ));
            }
            Err(e) => {
                return Err(format!(
                    "artifact {r}: declared {} but the file is not an executable this node can run: {e}",
                    art.variant.platform
                ));
            }
        }
    }
    let dest = launch.dir.join(&r.name);
    crate::artifacts::install(&lease, &dest)
        .map_err(|e| format!("artifact {r}: installing {}: {e}", dest.display()))?;
    Ok(lease)
}

/// Fetches the job's `stdin` blob into the artifact cache (or finds it there) and names
/// it as the task's input. The runtime opens it when it starts the task, so the lease
/// only has to keep the file until then; it is held while the task runs all the same,
/// so that a runtime that reads it later (docker copies it into the container) has it.
struct StdinStep;

#[async_trait]
impl PrepareStep<PrepareContext> for StdinStep {
    fn name(&self) -> &'static str {
        "stdin"
    }

    async fn prepare(&self, cx: &mut PrepareContext) -> Result<StepGuard, PrepareError> {
        let Some(input) = &cx.assignment.spec.stdin else {
            return Ok(StepGuard::nothing());
        };
        // The scheduler sends input only to nodes that advertise it for the runtime, so
        // this is a controller that did not check; the task fails rather than run
        // without its input.
        if !cx.runtime.takes_stdin() {
            return Err(format!(
                "stdin: runtime {} on this node cannot give a task its input",
                cx.runtime.kind()
            )
            .into());
        }
        let lease = cx
            .holdings
            .artifacts
            .cache
            .get(&input.blob, input.size)
            .await
            .map_err(|e| format!("stdin: {e}"))?;
        cx.launch.stdin = Some(lease.path().to_path_buf());
        Ok(StepGuard::holding(lease))
    }

    /// Leases the adopted task's input again while it is still cached. A process task
    /// holds its stdin open itself, so an input evicted meanwhile is no error.
    async fn readopt(&self, cx: &mut PrepareContext) -> Result<StepGuard, PrepareError> {
        let Some(input) = &cx.assignment.spec.stdin else {
            return Ok(StepGuard::nothing());
        };
        Ok(
            match cx.holdings.artifacts.cache.lease_cached(&input.blob) {
                Some(lease) => {
                    cx.launch.stdin = Some(lease.path().to_path_buf());
                    StepGuard::holding(lease)
                }
                None => StepGuard::nothing(),
            },
        )
    }
}

/// The runtime's own preparation (pulling an image, say), last, with the task's whole
/// environment. What it holds for the task is the runtime's to release when the task
/// manager destroys the task.
struct RuntimeStep;

#[async_trait]
impl PrepareStep<PrepareContext> for RuntimeStep {
    fn name(&self) -> &'static str {
        "runtime"
    }

    async fn prepare(&self, cx: &mut PrepareContext) -> Result<StepGuard, PrepareError> {
        cx.runtime
            .prepare(&cx.launch)
            .await
            .map_err(|e| format!("prepare: {e}"))?;
        // The runtime's own preparation is worth a line when it fetched something, as
        // a container image; a process needs none.
        let guard = StepGuard::nothing();
        Ok(match &cx.assignment.spec.image {
            Some(image) => guard.noting(format!("image {image} ready")),
            None => guard,
        })
    }
}

/// The first 64 KiB of a file: enough for every executable header format.
fn read_head(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut head = Vec::with_capacity(64 << 10);
    std::fs::File::open(path)?
        .take(64 << 10)
        .read_to_end(&mut head)?;
    Ok(head)
}

/// Appends a line of the agent's own to a task's preparing log. The log only informs, so
/// a failure to write it does not fail the task; it is only logged.
async fn note(log: &Path, line: &str) {
    use tokio::io::AsyncWriteExt;
    let written = async {
        let mut f = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .await?;
        f.write_all(line.as_bytes()).await
    };
    if let Err(e) = written.await {
        tracing::warn!("writing to the preparing log {}: {e}", log.display());
    }
}

/// Makes a fresh task directory its user's to work in while the agent's own files in it
/// stay the agent's: owned by root and the task's private group, group-writable, with
/// the sticky bit, so the task may create and remove its own files but cannot remove,
/// rename or replace the agent's (its assignment, logs, pid and exit status), and
/// nobody else may even look inside. The preparing log is made now, by the agent, so
/// that the task cannot claim the name with a link of its own.
fn hand_over_dir(dir: &Path, user: TaskUser) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::os::unix::fs::chown(dir, Some(0), Some(user.gid))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o1770))?;
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(log_path(dir, LogStream::Prepare))?;
    Ok(())
}

/// Makes a directory the agent's alone again, as a new one would be.
fn take_back_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::os::unix::fs::chown(dir, Some(0), Some(0))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
}

/// Gives everything in a task's directory but the agent's own files to the task's user
/// (links themselves, never what they point at).
fn give_contents_to(dir: &Path, user: TaskUser) -> std::io::Result<()> {
    fn walk(path: &Path, user: TaskUser) -> std::io::Result<()> {
        std::os::unix::fs::lchown(path, Some(user.uid), Some(user.gid))?;
        if std::fs::symlink_metadata(path)?.is_dir() {
            for e in std::fs::read_dir(path)? {
                walk(&e?.path(), user)?;
            }
        }
        Ok(())
    }
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_name()
            .to_str()
            .is_some_and(|n| AGENT_FILES.contains(&n))
        {
            continue;
        }
        walk(&e.path(), user)?;
    }
    Ok(())
}
