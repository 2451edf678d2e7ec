//! The `docker` runtime: each task is a container on the node's Docker engine.
//!
//! Containers are labelled with the task, job and node they belong to, so a restarted
//! agent finds its tasks again by label ([`Runtime::recover`], [`Runtime::list`]). The
//! container's environment is exactly the task's; its output is copied from the
//! engine's logs API into the task's log files, so the agent ships it
//! like any other task's. Every request to the engine has a time limit, so an engine
//! that hangs fails a step instead of stalling the agent.

mod engine;
mod health;
mod logs;
mod reference;

use crate::shim::signal_name;
use crate::status::{settle, wait_status};
use crate::{
    ExitStatus, Fingerprint, Recovered, Runtime, RuntimeError, Started, StopOutcome, TaskContext,
    TaskStats,
};
use async_trait::async_trait;
use bollard::Docker;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerStateStatusEnum, HostConfig,
    HostConfigLogConfig, PortBinding as EnginePortBinding,
};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, CreateImageOptionsBuilder,
    KillContainerOptionsBuilder, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
    StatsOptionsBuilder, WaitContainerOptionsBuilder,
};
use drover_core::spec::{PullPolicy, RuntimeKind};
use drover_core::state::PortBinding;
use drover_core::{NodeId, TaskId};
use engine::{EngineError, call};
use futures_util::StreamExt;
use health::Probe;
use logs::{LogTarget, Resume};
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::AbortHandle;

/// How long the status of a container the engine says has ended may take to be
/// published: the watcher publishes once the output is copied, which it bounds itself.
const SETTLE_LIMIT: Duration = Duration::from_secs(LOG_DRAIN_TIMEOUT.as_secs() + 10);

/// The label holding the task id of a container.
pub const LABEL_TASK: &str = "drover.task";
/// The label holding the job name of a container.
pub const LABEL_JOB: &str = "drover.job";
/// The label holding the job id of a container.
pub const LABEL_JOB_ID: &str = "drover.job-id";
/// The label holding the id of the node whose agent started a container.
pub const LABEL_NODE: &str = "drover.node";
/// The label marking a container as Drover's (`true`).
pub const LABEL_MANAGED: &str = "drover.managed";

/// How long a task may take to end after SIGKILL before `stop` gives up. SIGKILL cannot
/// be caught, so only a container stuck in the kernel or a hung engine gets here.
const KILL_TIMEOUT: Duration = Duration::from_secs(15);

/// The file in a task's directory that says the container was given the whole of its
/// `stdin`: written once the input is sent and the container's stdin closed. A restarted
/// agent that adopts a running container without it knows the input was cut short.
pub const STDIN_SENT_FILE: &str = "stdin-sent";

/// How long the end of a task waits for the rest of its output to be copied into its
/// files, so that the agent, which ships the files when the task ends, sees all of it.
const LOG_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The wait before asking the engine again after a wait for a container's end broke off.
const WAIT_RETRY: Duration = Duration::from_secs(1);

/// Settings of the Docker runtime, from the agent's config.
#[derive(Clone, Debug)]
pub struct DockerConfig {
    /// This node's id; every container is labelled with it, and [`Runtime::list`]
    /// returns only this node's containers.
    pub node_id: NodeId,
    /// The engine's address: `unix:///path/to/docker.sock` or `tcp://host:port`.
    /// `None` is the standard socket, `/var/run/docker.sock`. (The agent's environment,
    /// e.g. `DOCKER_HOST`, is not read here: the CLI parses it into this field.)
    pub host: Option<String>,
    /// The limit on answering a liveness check (fingerprint, first connection).
    pub ping_timeout: Duration,
    /// The limit on each other request to the engine.
    pub request_timeout: Duration,
    /// The limit on pulling an image.
    pub pull_timeout: Duration,
    /// The host address container ports are published on. Loopback keeps tasks
    /// reachable only from the node; `0.0.0.0` publishes them on every interface.
    pub publish_ip: IpAddr,
    /// Runs the engine's init (`docker run --init`) as each container's PID 1, so that
    /// signals reach programs that install no handler and zombies are reaped.
    pub init: bool,
    /// The engine's log driver for task containers; it must support reading logs back
    /// (`json-file`, `local`, `journald`), since the output is copied from it.
    pub log_driver: String,
    /// Options of the log driver, e.g. `max-size`.
    pub log_options: BTreeMap<String, String>,
}

impl DockerConfig {
    /// The defaults, for the node `node_id`.
    pub fn new(node_id: NodeId) -> DockerConfig {
        DockerConfig {
            node_id,
            host: None,
            ping_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(30),
            pull_timeout: Duration::from_secs(600),
            publish_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            init: false,
            log_driver: "json-file".into(),
            // The engine's copy only has to outlast the agent's copying of it (and an
            // agent restart); bounding it keeps a chatty task from filling the disk twice.
            log_options: BTreeMap::from([
                ("max-size".to_string(), "20m".to_string()),
                ("max-file".to_string(), "2".to_string()),
            ]),
        }
    }
}

/// Runs tasks as Docker containers.
pub struct DockerRuntime {
    config: DockerConfig,
    /// The engine's address as shown in messages.
    address: String,
    /// The client, made (and its API version negotiated) on first use, so that the
    /// runtime can be created while the engine is down.
    client: tokio::sync::Mutex<Option<Docker>>,
    tasks: Mutex<HashMap<TaskId, Arc<TaskEntry>>>,
    /// The engine's `os` and `arch`, asked once: images are checked against them.
    engine_platform: tokio::sync::OnceCell<(String, String)>,
}

/// What the runtime keeps for one task.
struct TaskEntry {
    container: String,
    status: watch::Receiver<Option<ExitStatus>>,
    signals: Arc<SentSignals>,
    /// The watcher and the log copier, ended by `destroy`.
    background: Vec<AbortHandle>,
}

impl Drop for TaskEntry {
    fn drop(&mut self) {
        for task in &self.background {
            task.abort();
        }
    }
}

/// The signals this agent process sent to a container, so that an exit code of
/// 128 + n after our own signal n reads as "ended by signal n" (as the process runtime
/// reports it), while the same code from a program's own `exit` stays an exit code.
#[derive(Default)]
struct SentSignals(AtomicU64);

impl SentSignals {
    fn add(&self, signo: i32) {
        if (1..64).contains(&signo) {
            self.0.fetch_or(1 << signo, Ordering::SeqCst);
        }
    }

    fn contains(&self, signo: i64) -> bool {
        (1..64).contains(&signo) && self.0.load(Ordering::SeqCst) & (1 << signo) != 0
    }
}

impl DockerRuntime {
    /// Makes the runtime. It does not contact the engine, so it succeeds while the
    /// engine is down; [`Runtime::fingerprint`] tells whether it is usable.
    pub fn new(config: DockerConfig) -> Result<DockerRuntime, RuntimeError> {
        let address = engine::display_address(config.host.as_deref());
        // An address of a kind the client cannot use is a configuration mistake, found
        // now rather than on the first task.
        if let Some(h) = &config.host
            && !(h.starts_with('/')
                || h.starts_with("unix://")
                || h.starts_with("tcp://")
                || h.starts_with("http://"))
        {
            return Err(RuntimeError::Other(format!(
                "unsupported Docker host {h:?}; expected unix:///path/to/docker.sock or tcp://host:port"
            )));
        }
        Ok(DockerRuntime {
            config,
            address,
            client: tokio::sync::Mutex::new(None),
            tasks: Mutex::new(HashMap::new()),
            engine_platform: tokio::sync::OnceCell::new(),
        })
    }

    /// The client, connecting and negotiating the API version on first use (and again
    /// after a failed attempt).
    async fn docker(&self) -> Result<Docker, EngineError> {
        let mut client = self.client.lock().await;
        if let Some(docker) = client.as_ref() {
            return Ok(docker.clone());
        }
        let docker = engine::connect(self.config.host.as_deref(), self.config.request_timeout)?;
        // The engine may be older than the client's API version (e.g. Docker 20.10
        // speaks 1.41); negotiating makes every later request use one it understands.
        let docker = call(
            &self.address,
            self.config.ping_timeout,
            docker.negotiate_version(),
        )
        .await?;
        *client = Some(docker.clone());
        Ok(docker)
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

    async fn request<T>(
        &self,
        request: impl Future<Output = Result<T, bollard::errors::Error>>,
    ) -> Result<T, EngineError> {
        call(&self.address, self.config.request_timeout, request).await
    }

    /// The ids of this node's containers for `task` (normally one), newest first.
    async fn find_containers(
        &self,
        docker: &Docker,
        task: &TaskId,
    ) -> Result<Vec<String>, EngineError> {
        let filters = HashMap::from([(
            "label".to_string(),
            vec![
                format!("{LABEL_TASK}={task}"),
                format!("{LABEL_NODE}={}", self.config.node_id),
            ],
        )]);
        let options = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        let mut found = self
            .request(docker.list_containers(Some(options)))
            .await?
            .into_iter()
            .filter_map(|c| Some((c.created.unwrap_or(0), c.id?)))
            .collect::<Vec<_>>();
        found.sort_by_key(|c| std::cmp::Reverse(c.0));
        Ok(found.into_iter().map(|(_, id)| id).collect())
    }

    /// Removes a container and its anonymous volumes, running or not; one already gone
    /// is fine.
    async fn remove(&self, docker: &Docker, container: &str) -> Result<(), EngineError> {
        let options = RemoveContainerOptionsBuilder::new()
            .force(true)
            .v(true)
            .build();
        match self
            .request(docker.remove_container(container, Some(options)))
            .await
        {
            Ok(()) | Err(EngineError::NotFound(_)) => Ok(()),
            // Another removal of the same container is already under way.
            Err(EngineError::Conflict(m)) if m.contains("already in progress") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Sends `signal` to the container; returns whether it was running to receive it.
    async fn kill(
        &self,
        docker: &Docker,
        entry: &TaskEntry,
        signal: nix::sys::signal::Signal,
    ) -> Result<bool, RuntimeError> {
        entry.signals.add(signal as i32);
        let options = KillContainerOptionsBuilder::new()
            .signal(signal.as_str())
            .build();
        match self
            .request(docker.kill_container(&entry.container, Some(options)))
            .await
        {
            Ok(()) => Ok(true),
            // 409: it is not running; 404: it is gone. Either way it has ended.
            Err(EngineError::Conflict(_) | EngineError::NotFound(_)) => Ok(false),
            Err(e) => Err(e.other(format!(
                "sending {} to container {}",
                signal.as_str(),
                short(&entry.container)
            ))),
        }
    }

    /// Starts watching a started container: a task that copies its output into the
    /// task's files and a task that publishes its exit status once it has ended and the
    /// output is copied. Registers the task.
    fn watch(
        &self,
        docker: &Docker,
        ctx: &TaskContext,
        container: &str,
        resume: Resume,
        feeder: Option<AbortHandle>,
    ) -> Arc<TaskEntry> {
        let target = log_target(ctx);
        let copier = tokio::spawn(logs::copy_logs(
            docker.clone(),
            self.address.clone(),
            container.to_string(),
            target,
            resume,
            true,
        ));
        let copier_abort = copier.abort_handle();
        let signals = Arc::new(SentSignals::default());
        let (status_tx, status_rx) = watch::channel(None);
        let watcher = tokio::spawn(watch_container(
            docker.clone(),
            self.address.clone(),
            self.config.request_timeout,
            container.to_string(),
            signals.clone(),
            copier,
            status_tx,
        ));
        let entry = Arc::new(TaskEntry {
            container: container.to_string(),
            status: status_rx,
            signals,
            background: [Some(copier_abort), Some(watcher.abort_handle()), feeder]
                .into_iter()
                .flatten()
                .collect(),
        });
        self.tasks().insert(ctx.task_id.clone(), entry.clone());
        entry
    }

    /// Ends a task whose start failed after its container started: kills it, lets its
    /// output be copied, removes the container and forgets the task.
    async fn abandon(&self, docker: &Docker, id: &TaskId, entry: &TaskEntry) {
        if let Err(e) = self
            .kill(docker, entry, nix::sys::signal::Signal::SIGKILL)
            .await
        {
            tracing::warn!(task = %id, %e, "cannot kill the container of a failed start");
        }
        let mut status = entry.status.clone();
        // The watcher publishes the status after the output is copied, so waiting for
        // it (bounded) leaves the output in the task's files for the agent to ship.
        if tokio::time::timeout(KILL_TIMEOUT, wait_status(&mut status))
            .await
            .is_err()
        {
            tracing::warn!(
                task = %id,
                "the container of a failed start did not end within {}s; its output may be incomplete",
                KILL_TIMEOUT.as_secs()
            );
        }
        if let Err(e) = self.remove(docker, &entry.container).await {
            tracing::warn!(task = %id, %e, "cannot remove the container of a failed start");
        }
        self.tasks().remove(id);
    }

    /// The engine's os and architecture, asked on first use and kept.
    async fn engine_platform(&self, docker: &Docker) -> Result<&(String, String), RuntimeError> {
        self.engine_platform
            .get_or_try_init(|| async {
                let v = self
                    .request(docker.version())
                    .await
                    .map_err(|e| e.other("asking the engine for its platform"))?;
                Ok((v.os.unwrap_or_default(), v.arch.unwrap_or_default()))
            })
            .await
    }

    /// Pulls `image`, bounded by the pull timeout.
    async fn pull(&self, docker: &Docker, image: &str, policy: &str) -> Result<(), RuntimeError> {
        let reference = reference::pull_reference(image).map_err(RuntimeError::Other)?;
        let options = CreateImageOptionsBuilder::new()
            .from_image(&reference)
            .build();
        let pulling = async {
            let mut progress = docker.create_image(Some(options), None, None);
            while let Some(step) = progress.next().await {
                step?;
            }
            Ok(())
        };
        call(&self.address, self.config.pull_timeout, pulling)
            .await
            .map_err(|e| e.other(format!("pulling image {reference} (pull: {policy})")))
    }
}

#[async_trait]
impl Runtime for DockerRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Docker
    }

    fn takes_stdin(&self) -> bool {
        true
    }

    async fn fingerprint(&self) -> Result<Fingerprint, RuntimeError> {
        let unavailable = |e: EngineError| RuntimeError::Unavailable(e.to_string());
        let docker = self.docker().await.map_err(unavailable)?;
        call(&self.address, self.config.ping_timeout, docker.ping())
            .await
            .map_err(unavailable)?;
        let version = call(&self.address, self.config.ping_timeout, docker.version())
            .await
            .map_err(unavailable)?;
        let mut attributes = BTreeMap::new();
        for (key, value) in [
            ("version", version.version),
            ("api_version", version.api_version),
            ("os", version.os),
            ("arch", version.arch),
        ] {
            if let Some(v) = value {
                attributes.insert(key.to_string(), v);
            }
        }
        Ok(Fingerprint {
            kind: RuntimeKind::Docker,
            attributes,
        })
    }

    async fn prepare(&self, ctx: &TaskContext) -> Result<(), RuntimeError> {
        let image = image_of(ctx)?;
        // Checked first so a malformed name is reported as such, not as a missing image.
        reference::pull_reference(image).map_err(RuntimeError::Other)?;
        let docker = self.docker().await.map_err(|e| e.other("preparing"))?;
        let policy = pull_policy_name(ctx.spec.pull);
        let lookup = || async {
            self.request(docker.inspect_image(image))
                .await
                .map_err(|e| e.other(format!("looking up image {image}")))
        };
        let inspected = match ctx.spec.pull {
            PullPolicy::Always => {
                self.pull(&docker, image, policy).await?;
                lookup().await?
            }
            PullPolicy::Never | PullPolicy::IfNotPresent => {
                match self.request(docker.inspect_image(image)).await {
                    Ok(found) => found,
                    Err(EngineError::NotFound(_)) if ctx.spec.pull == PullPolicy::Never => {
                        return Err(RuntimeError::Other(format!(
                            "image {image} is not present on this node and the job's pull \
                             policy is never; load the image on the node or set pull: \
                             if_not_present"
                        )));
                    }
                    Err(EngineError::NotFound(_)) => {
                        self.pull(&docker, image, policy).await?;
                        lookup().await?
                    }
                    Err(e) => return Err(e.other(format!("looking up image {image}"))),
                }
            }
        };
        let engine = self.engine_platform(&docker).await?;
        check_image_platform(
            image,
            inspected.os.as_deref(),
            inspected.architecture.as_deref(),
            engine,
        )
        .map_err(RuntimeError::Other)
    }

    async fn start(&self, ctx: &TaskContext) -> Result<Started, RuntimeError> {
        let id = &ctx.task_id;
        if let Some(existing) = self.tasks().get(id)
            && existing.status.borrow().is_none()
        {
            return Err(RuntimeError::Start(format!("task {id} is already running")));
        }
        let image = image_of(ctx)?;
        if let Some(check) = &ctx.spec.health {
            // Resolved against a stand-in mapping so a probe of an unpublished port is
            // refused before anything is created.
            Probe::resolve(check, self.config.publish_ip, |p| {
                ctx.spec.ports.contains(&p).then_some(p)
            })
            .map_err(RuntimeError::Start)?;
        }
        let docker = self
            .docker()
            .await
            .map_err(|e| e.start(format!("starting task {id}")))?;

        // An earlier run's log position would make the copier skip this run's output.
        let position = ctx.dir.join(logs::POSITION_FILE);
        if let Err(e) = std::fs::remove_file(&position)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            return Err(RuntimeError::Start(format!(
                "cannot remove {}: {e}",
                position.display()
            )));
        }

        let name = container_name(id);
        let create = || {
            let options = CreateContainerOptionsBuilder::new().name(&name).build();
            self.request(docker.create_container(Some(options), self.container_body(ctx, image)))
        };
        let created = match create().await {
            // A container left from an earlier start of this task (e.g. by an agent that
            // died half-way) holds the name: remove it and create again. Looking for one
            // only on a conflict keeps a list call off every start.
            Err(EngineError::Conflict(_)) => {
                for old in self
                    .find_containers(&docker, id)
                    .await
                    .map_err(|e| e.start("looking for an earlier container of the task"))?
                {
                    self.remove(&docker, &old).await.map_err(|e| {
                        e.start(format!("removing the earlier container {}", short(&old)))
                    })?;
                }
                create().await
            }
            other => other,
        }
        .map_err(|e| match e {
            EngineError::NotFound(m) => RuntimeError::Start(format!(
                "image {image} is not present on this node ({m}) and the job's pull policy is {}; load the image on the node or set pull: if_not_present",
                pull_policy_name(ctx.spec.pull)
            )),
            e => e.start(format!("creating container {name} from image {image}")),
        })?;
        let container = created.id;
        // Attached before the start, as `docker run -i` does, so the program cannot read
        // an end of input that comes only from nobody being attached yet.
        let input = match &ctx.stdin {
            Some(path) => match self.attach_input(&docker, ctx, path, &container).await {
                Ok(input) => Some(input),
                Err(e) => {
                    if let Err(removing) = self.remove(&docker, &container).await {
                        tracing::warn!(task = %ctx.task_id, %removing, "cannot remove container {name}, whose stdin could not be attached");
                    }
                    return Err(e);
                }
            },
            None => None,
        };
        if let Err(e) = self.request(docker.start_container(&container, None)).await {
            if let Err(removing) = self.remove(&docker, &container).await {
                tracing::warn!(task = %ctx.task_id, %removing, "cannot remove container {name}, which failed to start");
            }
            return Err(e.start(format!(
                "starting container {name} (image {image}, command {:?})",
                command_line(ctx)
            )));
        }
        tracing::debug!(task = %id, container = %short(&container), "started container");
        let feeder = input.map(|(file, writer)| {
            tokio::spawn(feed_stdin(
                file,
                writer,
                ctx.dir.join(STDIN_SENT_FILE),
                container.clone(),
            ))
            .abort_handle()
        });
        let entry = self.watch(&docker, ctx, &container, Resume::default(), feeder);

        // Only published ports need reading back; without any, the inspect is skipped.
        let ports = if ctx.spec.ports.is_empty() {
            Vec::new()
        } else {
            match self
                .request(docker.inspect_container(&container, None))
                .await
            {
                Ok(info) => published_ports(&info, &ctx.spec.ports),
                Err(e) => {
                    self.abandon(&docker, id, &entry).await;
                    return Err(e.start(format!("inspecting container {name}")));
                }
            }
        };

        if let Some(check) = &ctx.spec.health {
            let probe_ip = probe_ip(self.config.publish_ip);
            let probe = Probe::resolve(check, probe_ip, |p| {
                ports.iter().find(|b| b.container == p).map(|b| b.host)
            });
            let result = match probe {
                Ok(probe) => {
                    self.until_healthy(&docker, &entry, &probe, check, &name)
                        .await
                }
                Err(e) => {
                    // Only when the container ended before its ports were read.
                    Err(format!("{e} (the container may have exited already)"))
                }
            };
            if let Err(reason) = result {
                self.abandon(&docker, id, &entry).await;
                return Err(RuntimeError::Start(reason));
            }
        }
        Ok(Started { ports })
    }

    async fn wait(&self, id: &TaskId) -> Result<ExitStatus, RuntimeError> {
        let mut status = self.entry(id)?.status.clone();
        wait_status(&mut status).await
    }

    async fn stop(&self, id: &TaskId, grace: Duration) -> Result<StopOutcome, RuntimeError> {
        use nix::sys::signal::Signal;
        let entry = self.entry(id)?;
        let mut status = entry.status.clone();
        if status.borrow().is_some() {
            return Ok(StopOutcome::AlreadyExited);
        }
        let docker = self.docker().await.map_err(|e| e.other("stopping"))?;
        // The kill API rather than the engine's stop: its timeout counts whole seconds,
        // and a grace below one second must be honoured too.
        if !self.kill(&docker, &entry, Signal::SIGTERM).await? {
            settle(&mut status, SETTLE_LIMIT, "the container").await?;
            return Ok(StopOutcome::AlreadyExited);
        }
        if tokio::time::timeout(grace, wait_status(&mut status))
            .await
            .is_ok()
        {
            return Ok(StopOutcome::Graceful);
        }
        if !self.kill(&docker, &entry, Signal::SIGKILL).await? {
            // It ended on its own between the grace running out and the kill.
            settle(&mut status, SETTLE_LIMIT, "the container").await?;
            return Ok(StopOutcome::Graceful);
        }
        match tokio::time::timeout(KILL_TIMEOUT, wait_status(&mut status)).await {
            Ok(_) => Ok(StopOutcome::Killed),
            Err(_) => Err(RuntimeError::Other(format!(
                "task {id} (container {}) did not end within {}s of SIGKILL",
                short(&entry.container),
                KILL_TIMEOUT.as_secs()
            ))),
        }
    }

    async fn destroy(&self, id: &TaskId) -> Result<(), RuntimeError> {
        // Dropping the entry (at the end of this call) ends its watcher and log copier.
        let entry = self.tasks().remove(id);
        let docker = self
            .docker()
            .await
            .map_err(|e| e.other(format!("removing the container of task {id}")))?;
        // By label too: after an agent restart the task may be known only that way.
        let mut containers = self
            .find_containers(&docker, id)
            .await
            .map_err(|e| e.other(format!("looking for the containers of task {id}")))?;
        if let Some(e) = &entry
            && !containers.contains(&e.container)
        {
            containers.push(e.container.clone());
        }
        for container in containers {
            self.remove(&docker, &container).await.map_err(|e| {
                e.other(format!(
                    "removing container {} of task {id}",
                    short(&container)
                ))
            })?;
        }
        Ok(())
    }

    async fn recover(&self, ctx: &TaskContext) -> Result<Recovered, RuntimeError> {
        if let Some(entry) = self.tasks().get(&ctx.task_id) {
            // Already known to this agent process, e.g. a repeated recovery.
            return Ok(match entry.status.borrow().clone() {
                None => Recovered::Adopted,
                Some(status) => Recovered::Exited(status),
            });
        }
        let id = &ctx.task_id;
        let docker = self
            .docker()
            .await
            .map_err(|e| e.other(format!("recovering task {id}")))?;
        let found = self
            .find_containers(&docker, id)
            .await
            .map_err(|e| e.other(format!("looking for the container of task {id}")))?;
        let Some(container) = found.first() else {
            return Ok(Recovered::Gone);
        };
        let info = match self
            .request(docker.inspect_container(container, None))
            .await
        {
            Ok(info) => info,
            Err(EngineError::NotFound(_)) => return Ok(Recovered::Gone),
            Err(e) => return Err(e.other(format!("inspecting container {}", short(container)))),
        };
        let state = info.state.clone().unwrap_or_default();
        if state.status == Some(ContainerStateStatusEnum::CREATED) {
            // Created but never started (the previous agent died in between): nothing
            // of the task ever ran.
            if let Err(e) = self.remove(&docker, container).await {
                tracing::warn!(task = %id, %e, "cannot remove container {}, created but never started", short(container));
            }
            return Ok(Recovered::Gone);
        }
        let target = log_target(ctx);
        let resume = Resume::for_recovery(&target);
        let Some(status) = ended_status(&info, &SentSignals::default()) else {
            let entry = self.watch(&docker, ctx, container, resume, None);
            if ctx.spec.stdin.is_some() && !ctx.dir.join(STDIN_SENT_FILE).exists() {
                // The previous agent was still sending the input when it stopped, and with
                // it went the container's stdin: the program saw an end of input that was
                // not the real one. Its results cannot be trusted, so it is ended now and
                // said to be, rather than left to finish on a part of its input.
                return self.cut_short(&docker, ctx, &entry).await;
            }
            tracing::debug!(task = %id, container = %short(container), "adopted container");
            return Ok(Recovered::Adopted);
        };
        // Copy what it wrote while nobody was copying, so the agent can ship it.
        let copying = logs::copy_logs(
            docker.clone(),
            self.address.clone(),
            container.clone(),
            target,
            resume,
            false,
        );
        if tokio::time::timeout(self.config.request_timeout, copying)
            .await
            .is_err()
        {
            tracing::warn!(task = %id, "copying the output of an ended container took too long");
        }
        let (_tx, status_rx) = watch::channel(Some(status.clone()));
        self.tasks().insert(
            id.clone(),
            Arc::new(TaskEntry {
                container: container.clone(),
                status: status_rx,
                signals: Arc::new(SentSignals::default()),
                background: Vec::new(),
            }),
        );
        Ok(Recovered::Exited(status))
    }

    async fn stats(&self, id: &TaskId) -> Result<TaskStats, RuntimeError> {
        let entry = self.entry(id)?;
        let docker = self.docker().await.map_err(|e| e.other("reading stats"))?;
        let options = StatsOptionsBuilder::new()
            .stream(false)
            .one_shot(true)
            .build();
        let sample = async {
            let mut samples = docker.stats(&entry.container, Some(options));
            samples.next().await.transpose()
        };
        let sample = self
            .request(sample)
            .await
            .map_err(|e| {
                e.other(format!(
                    "reading stats of container {}",
                    short(&entry.container)
                ))
            })?
            .ok_or_else(|| {
                RuntimeError::Unavailable(format!(
                    "the engine sent no stats for container {}",
                    short(&entry.container)
                ))
            })?;
        let cpu_ns = sample
            .cpu_stats
            .and_then(|c| c.cpu_usage)
            .and_then(|u| u.total_usage)
            .unwrap_or(0);
        let memory = sample.memory_stats.unwrap_or_default();
        // Like `docker stats`: the page cache the kernel can drop at will (inactive file
        // pages) is not what the task holds, so it is left out of the usage.
        let inactive = memory
            .stats
            .as_ref()
            .and_then(|s| {
                s.get("total_inactive_file")
                    .or_else(|| s.get("inactive_file"))
            })
            .copied()
            .unwrap_or(0);
        Ok(TaskStats {
            cpu_seconds: cpu_ns as f64 / 1e9,
            memory_bytes: memory.usage.unwrap_or(0).saturating_sub(inactive),
        })
    }

    async fn list(&self) -> Result<Vec<TaskId>, RuntimeError> {
        let docker = self
            .docker()
            .await
            .map_err(|e| e.other("listing containers"))?;
        let filters = HashMap::from([(
            "label".to_string(),
            vec![
                format!("{LABEL_NODE}={}", self.config.node_id),
                format!("{LABEL_MANAGED}=true"),
            ],
        )]);
        let options = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        let containers = self
            .request(docker.list_containers(Some(options)))
            .await
            .map_err(|e| e.other("listing this node's containers"))?;
        let mut ids: Vec<TaskId> = containers
            .into_iter()
            .filter_map(|c| c.labels?.remove(LABEL_TASK))
            .map(TaskId)
            .collect();
        ids.sort();
        ids.dedup();
        Ok(ids)
    }
}

impl DockerRuntime {
    /// The container's configuration for the task.
    fn container_body(&self, ctx: &TaskContext, image: &str) -> ContainerCreateBody {
        let spec = &ctx.spec;
        let labels = HashMap::from([
            (LABEL_TASK.to_string(), ctx.task_id.to_string()),
            (LABEL_JOB.to_string(), ctx.job_name.clone()),
            (LABEL_JOB_ID.to_string(), ctx.job_id.to_string()),
            (LABEL_NODE.to_string(), self.config.node_id.to_string()),
            (LABEL_MANAGED.to_string(), "true".to_string()),
        ]);
        let port_keys: Vec<String> = spec.ports.iter().map(|p| format!("{p}/tcp")).collect();
        let bindings = port_keys
            .iter()
            .map(|key| {
                (
                    key.clone(),
                    // No host port: the engine picks a free one, read back after start.
                    Some(vec![EnginePortBinding {
                        host_ip: Some(self.config.publish_ip.to_string()),
                        host_port: None,
                    }]),
                )
            })
            .collect();
        let memory = i64::try_from(spec.resources.memory.0).unwrap_or(i64::MAX);
        let host_config = HostConfig {
            nano_cpus: (spec.resources.cpu > 0.0)
                .then(|| (spec.resources.cpu * 1e9).round() as i64),
            memory: (memory > 0).then_some(memory),
            // Swap equal to memory means no swap at all, so exceeding the limit kills the
            // task instead of slowing it down on swap.
            memory_swap: (memory > 0).then_some(memory),
            port_bindings: Some(bindings),
            init: self.config.init.then_some(true),
            // The agent's files for the task (its socket, its config), each bound on
            // its own so that nothing else of the task's directory is exposed.
            binds: (!ctx.mounts.is_empty()).then(|| {
                ctx.mounts
                    .iter()
                    .map(|m| {
                        let mode = if m.read_only { ":ro" } else { "" };
                        format!("{}:{}{mode}", m.host.display(), m.container)
                    })
                    .collect()
            }),
            log_config: Some(HostConfigLogConfig {
                typ: Some(self.config.log_driver.clone()),
                config: Some(
                    self.config
                        .log_options
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                ),
            }),
            ..Default::default()
        };
        ContainerCreateBody {
            image: Some(image.to_string()),
            // Exactly the task's environment; the image's own ENV still applies beneath.
            env: Some(ctx.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            // As in Kubernetes: `command` replaces the ENTRYPOINT (and with it the image's
            // CMD), `args` replaces the CMD.
            entrypoint: (!spec.command.is_empty()).then(|| spec.command.clone()),
            cmd: (!spec.args.is_empty()).then(|| spec.args.clone()),
            labels: Some(labels),
            exposed_ports: Some(port_keys),
            working_dir: ctx.workdir.clone(),
            tty: Some(false),
            // With input, stdin is open for the one attachment that sends it and closed
            // when that attachment ends (`stdin_once`), so the program reads an end.
            open_stdin: Some(ctx.stdin.is_some()),
            stdin_once: Some(ctx.stdin.is_some()),
            attach_stdin: Some(ctx.stdin.is_some()),
            host_config: Some(host_config),
            ..Default::default()
        }
    }

    /// Opens the task's input and attaches to the created container's stdin.
    async fn attach_input(
        &self,
        docker: &Docker,
        ctx: &TaskContext,
        path: &std::path::Path,
        container: &str,
    ) -> Result<(tokio::fs::File, StdinWriter), RuntimeError> {
        let sent = ctx.dir.join(STDIN_SENT_FILE);
        if let Err(e) = std::fs::remove_file(&sent)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            return Err(RuntimeError::Start(format!(
                "cannot remove {}: {e}",
                sent.display()
            )));
        }
        let file = tokio::fs::File::open(path).await.map_err(|e| {
            RuntimeError::Start(format!(
                "cannot open the stdin file {}: {e}",
                path.display()
            ))
        })?;
        let options = AttachContainerOptionsBuilder::new()
            .stdin(true)
            .stream(true)
            .build();
        let attached = self
            .request(docker.attach_container(container, Some(options)))
            .await
            .map_err(|e| {
                e.start(format!(
                    "attaching to the stdin of container {}",
                    short(container)
                ))
            })?;
        Ok((file, attached.input))
    }

    /// Ends an adopted container whose input was cut short by the agent's restart, and
    /// reports why.
    async fn cut_short(
        &self,
        docker: &Docker,
        ctx: &TaskContext,
        entry: &TaskEntry,
    ) -> Result<Recovered, RuntimeError> {
        let id = &ctx.task_id;
        tracing::warn!(task = %id, "the container's stdin was cut short by the agent's restart; ending it");
        if self
            .kill(docker, entry, nix::sys::signal::Signal::SIGKILL)
            .await?
        {
            let mut status = entry.status.clone();
            if tokio::time::timeout(KILL_TIMEOUT, wait_status(&mut status))
                .await
                .is_err()
            {
                return Err(RuntimeError::Other(format!(
                    "task {id} (container {}) did not end within {}s of SIGKILL",
                    short(&entry.container),
                    KILL_TIMEOUT.as_secs()
                )));
            }
        }
        Ok(Recovered::Exited(ExitStatus::Unknown(
            "the agent restarted before the container had read all of its stdin, so it was stopped rather than left to run on part of its input".into(),
        )))
    }

    /// Probes until the check passes; the error says why the task never became healthy.
    async fn until_healthy(
        &self,
        docker: &Docker,
        entry: &TaskEntry,
        probe: &Probe,
        check: &drover_core::spec::HealthCheck,
        name: &str,
    ) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + check.start_deadline.0;
        let mut status = entry.status.clone();
        let mut last_error;
        loop {
            if let Some(ended) = status.borrow().clone() {
                return Err(format!(
                    "container {name} ended ({}) before its health check ({probe}) passed",
                    describe_status(&ended)
                ));
            }
            match probe
                .run(docker, &self.address, &entry.container, check.timeout.0)
                .await
            {
                Ok(()) => return Ok(()),
                Err(e) => last_error = e,
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                break;
            }
            let pause = check.interval.0.min(deadline - now);
            // Wakes early if the container ends, so that is reported at once. However
            // the wait ends, the loop looks at the container next, so its result says
            // nothing more.
            tokio::time::timeout(pause, status.wait_for(|s| s.is_some()))
                .await
                .ok();
        }
        Err(format!(
            "the health check ({probe}) did not pass within the start deadline of {}; last attempt: {last_error}",
            check.start_deadline
        ))
    }
}

/// Where a container's stdin is written: the attachment's half that goes to the engine.
type StdinWriter = std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>;

/// Copies the task's input into the container's stdin and closes it, which the program
/// reads as the end of its input; then records that all of it was sent. A container
/// that ends before reading everything breaks the copy, which is then no error of the
/// task's: its exit status says how it ended.
async fn feed_stdin(
    mut file: tokio::fs::File,
    mut writer: StdinWriter,
    sent: std::path::PathBuf,
    container: String,
) {
    use tokio::io::AsyncWriteExt;
    let copied = async {
        tokio::io::copy(&mut file, &mut writer).await?;
        writer.shutdown().await
    };
    match copied.await {
        Ok(()) => {
            if let Err(e) = tokio::fs::write(&sent, b"").await {
                tracing::warn!(%container, "cannot record that the stdin was sent in {}: {e}", sent.display());
            }
        }
        Err(e) => {
            tracing::debug!(%container, %e, "sending the stdin stopped");
        }
    }
}

/// Waits for a container to end and publishes how it ended, once its output has been
/// copied into the task's files.
async fn watch_container(
    docker: Docker,
    address: String,
    request_timeout: Duration,
    container: String,
    signals: Arc<SentSignals>,
    copier: tokio::task::JoinHandle<()>,
    status_tx: watch::Sender<Option<ExitStatus>>,
) {
    let status = loop {
        let options = WaitContainerOptionsBuilder::new()
            .condition("not-running")
            .build();
        // No time limit on this one: it lasts as long as the container runs. The engine
        // answers it at once and sends the body when the container ends.
        let waited = docker
            .wait_container(&container, Some(options))
            .next()
            .await;
        let broke_off = match waited {
            // Ended; an exit code other than 0 arrives as this error.
            Some(Ok(_)) | Some(Err(bollard::errors::Error::DockerContainerWaitError { .. })) => {
                false
            }
            Some(Err(e)) => {
                let e = EngineError::from_bollard(&address, e);
                if matches!(e, EngineError::NotFound(_)) {
                    break ExitStatus::Unknown(format!(
                        "container {} was removed before its exit status was read",
                        short(&container)
                    ));
                }
                tracing::debug!(%container, %e, "waiting for the container broke off");
                true
            }
            None => true,
        };
        if broke_off {
            tokio::time::sleep(WAIT_RETRY).await;
        }
        // Whatever the wait said, the container's recorded state is what counts.
        match call(
            &address,
            request_timeout,
            docker.inspect_container(&container, None),
        )
        .await
        {
            Ok(info) => {
                if let Some(status) = ended_status(&info, &signals) {
                    break status;
                }
            }
            Err(EngineError::NotFound(_)) => {
                break ExitStatus::Unknown(format!(
                    "container {} was removed before its exit status was read",
                    short(&container)
                ));
            }
            Err(e) => {
                tracing::debug!(%container, %e, "cannot inspect the container; will retry");
                tokio::time::sleep(WAIT_RETRY).await;
            }
        }
    };
    if tokio::time::timeout(LOG_DRAIN_TIMEOUT, copier)
        .await
        .is_err()
    {
        tracing::warn!(%container, "the container's output was not all copied in time");
    }
    tracing::debug!(%container, ?status, "container ended");
    status_tx.send_replace(Some(status));
}

/// How the container ended, or None while it is still running.
fn ended_status(info: &ContainerInspectResponse, signals: &SentSignals) -> Option<ExitStatus> {
    let state = info.state.as_ref()?;
    if state.running == Some(true) || state.restarting == Some(true) {
        return None;
    }
    let code = state.exit_code.unwrap_or(-1);
    if state.oom_killed == Some(true) {
        return Some(ExitStatus::OutOfMemory(i32::try_from(code).ok()));
    }
    // The runtime reports a container killed by signal n as exit code 128 + n.
    if (129..=191).contains(&code) && signals.contains(code - 128) {
        return Some(ExitStatus::Signaled(signal_name((code - 128) as i32)));
    }
    Some(ExitStatus::Exited(i32::try_from(code).unwrap_or(-1)))
}

fn image_of(ctx: &TaskContext) -> Result<&str, RuntimeError> {
    ctx.spec.image.as_deref().ok_or_else(|| {
        RuntimeError::Other(format!(
            "job {} has no image; the docker runtime needs one (image: in the job spec)",
            ctx.job_name
        ))
    })
}

/// Refuses an image built for another os or architecture than the engine's, so the
/// task fails with a message that names both instead of the container's "exec format
/// error". Names are compared after normalising (`x86_64` is `amd64`); a value the
/// image does not state is not held against it. The architecture variant is not
/// compared: engines do not report theirs.
fn check_image_platform(
    image: &str,
    os: Option<&str>,
    arch: Option<&str>,
    engine: &(String, String),
) -> Result<(), String> {
    use drover_core::platform::{Arch, Os};
    fn same<T: std::str::FromStr + PartialEq>(a: &str, b: &str) -> bool {
        match (a.parse::<T>(), b.parse::<T>()) {
            (Ok(x), Ok(y)) => x == y,
            _ => a.eq_ignore_ascii_case(b),
        }
    }
    let (engine_os, engine_arch) = engine;
    let os_ok = match os {
        Some(o) if !o.is_empty() && !engine_os.is_empty() => same::<Os>(o, engine_os),
        _ => true,
    };
    let arch_ok = match arch {
        Some(a) if !a.is_empty() && !engine_arch.is_empty() => same::<Arch>(a, engine_arch),
        _ => true,
    };
    if os_ok && arch_ok {
        return Ok(());
    }
    Err(format!(
        "image {image} is built for {}/{}, but this node's Docker engine runs {engine_os}/{engine_arch}; \
         use an image (or a multi-platform tag) built for {engine_os}/{engine_arch}, or constrain \
         the job to nodes of the image's platform",
        os.unwrap_or("?"),
        arch.unwrap_or("?"),
    ))
}

fn pull_policy_name(p: PullPolicy) -> &'static str {
    match p {
        PullPolicy::Never => "never",
        PullPolicy::IfNotPresent => "if_not_present",
        PullPolicy::Always => "always",
    }
}

fn log_target(ctx: &TaskContext) -> LogTarget {
    LogTarget {
        stdout: ctx.stdout_path.clone(),
        stderr: ctx.stderr_path.clone(),
        position: ctx.dir.join(logs::POSITION_FILE),
    }
}

/// `drover-<task id>`, with anything a container name cannot hold replaced by `_`.
fn container_name(id: &TaskId) -> String {
    let safe: String = id
        .as_str()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("drover-{safe}")
}

/// The first 12 characters of a container id, as Docker shows them.
fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// What the container runs, for messages: the command and args, or the image's own.
fn command_line(ctx: &TaskContext) -> Vec<String> {
    let mut argv = ctx.spec.command.clone();
    argv.extend(ctx.spec.args.iter().cloned());
    argv
}

/// The host ports the engine published for the declared container ports.
fn published_ports(info: &ContainerInspectResponse, declared: &[u16]) -> Vec<PortBinding> {
    let Some(map) = info
        .network_settings
        .as_ref()
        .and_then(|n| n.ports.as_ref())
    else {
        return Vec::new();
    };
    declared
        .iter()
        .filter_map(|&port| {
            let bindings = map.get(&format!("{port}/tcp"))?.as_ref()?;
            let host = bindings
                .iter()
                .find_map(|b| b.host_port.as_deref()?.parse::<u16>().ok())?;
            Some(PortBinding {
                container: port,
                host,
            })
        })
        .collect()
}

/// Where probes reach a published port: the publish address, or loopback when ports are
/// published on every interface.
fn probe_ip(publish_ip: IpAddr) -> IpAddr {
    match publish_ip {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    }
}

fn describe_status(status: &ExitStatus) -> String {
    match status {
        ExitStatus::Exited(code) => format!("exit code {code}"),
        ExitStatus::Signaled(sig) => format!("killed by {sig}"),
        ExitStatus::OutOfMemory(_) => "killed for exceeding its memory limit".into(),
        ExitStatus::Unknown(why) => why.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_platforms_are_compared_after_normalising() {
        let engine = ("linux".to_string(), "amd64".to_string());
        let check =
            |os: Option<&str>, arch: Option<&str>| check_image_platform("img:1", os, arch, &engine);
        assert_eq!(check(Some("linux"), Some("amd64")), Ok(()));
        assert_eq!(check(Some("Linux"), Some("x86_64")), Ok(()));
        // An image that does not say is given the benefit of the doubt.
        assert_eq!(check(None, None), Ok(()));
        assert_eq!(check(Some(""), Some("")), Ok(()));
        let err = check(Some("linux"), Some("arm64")).unwrap_err();
        assert!(
            err.contains("img:1 is built for linux/arm64")
                && err.contains("engine runs linux/amd64"),
            "{err}"
        );
        assert!(check(Some("windows"), Some("amd64")).is_err());
        // Unknown names compare as text.
        assert!(check(Some("linux"), Some("riscv64")).is_err());
        let odd = ("linux".to_string(), "riscv64".to_string());
        assert_eq!(
            check_image_platform("i", Some("linux"), Some("RISCV64"), &odd),
            Ok(())
        );
    }

    #[test]
    fn container_names_keep_only_allowed_characters() {
        assert_eq!(
            container_name(&TaskId::from("task-0193abc")),
            "drover-task-0193abc"
        );
        assert_eq!(container_name(&TaskId::from("a/b c")), "drover-a_b_c");
    }

    #[test]
    fn exit_codes_after_our_signals_read_as_signals() {
        let info = |code: i64, oom: bool| ContainerInspectResponse {
            state: Some(bollard::models::ContainerState {
                running: Some(false),
                exit_code: Some(code),
                oom_killed: Some(oom),
                ..Default::default()
            }),
            ..Default::default()
        };
        let sent = SentSignals::default();
        assert_eq!(
            ended_status(&info(137, false), &sent),
            Some(ExitStatus::Exited(137))
        );
        sent.add(9);
        assert_eq!(
            ended_status(&info(137, false), &sent),
            Some(ExitStatus::Signaled("SIGKILL".into()))
        );
        assert_eq!(
            ended_status(&info(137, true), &sent),
            Some(ExitStatus::OutOfMemory(Some(137)))
        );
        assert_eq!(
            ended_status(&info(3, false), &sent),
            Some(ExitStatus::Exited(3))
        );
        let running = ContainerInspectResponse {
            state: Some(bollard::models::ContainerState {
                running: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(ended_status(&running, &sent), None);
    }

    #[test]
    fn unsupported_hosts_are_refused_when_made() {
        let mut cfg = DockerConfig::new(NodeId::from("n1"));
        cfg.host = Some("ssh://somewhere".into());
        assert!(DockerRuntime::new(cfg).is_err());
        let mut cfg = DockerConfig::new(NodeId::from("n1"));
        cfg.host = Some("unix:///nonexistent/docker.sock".into());
        assert!(
            DockerRuntime::new(cfg).is_ok(),
            "made without contacting the engine"
        );
    }
}
