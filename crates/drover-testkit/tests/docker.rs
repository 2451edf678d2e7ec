//! The Docker runtime end to end: a real controller, a real agent offering `docker` and
//! the machine's real engine, with the busybox image built locally (see `images.rs`).
//!
//! Each test runs its own cluster and agent, so its node id tells its containers apart
//! from those of tests running at the same time; each checks that none of its containers
//! is left when it ends, and removes any that are (passed or not) when it is dropped.

use drover_agent::Agent;
use drover_core::state::JobStatus;
use drover_core::{NodeId, TaskId, TaskState};
use drover_testkit::images::{BUSYBOX_INDEX_HTML, busybox_image, foreign_image};
use drover_testkit::{AgentOptions, Api, ClusterOptions, TestCluster, start_agent, wait_for};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// The longest any single wait may take before the test fails instead of hanging.
const T: Duration = Duration::from_secs(60);

/// An agent offering only the Docker runtime.
fn docker_agent(name: &str) -> AgentOptions {
    let mut opts = AgentOptions::named(name);
    opts.process = false;
    opts.mock = false;
    opts.docker = true;
    opts
}

/// A cluster with one docker-only agent, its node id, and a guard that removes the
/// node's containers when the test ends, whatever happened.
async fn docker_cluster(name: &str) -> (TestCluster, Agent, NodeId, Cleanup) {
    let c = TestCluster::start().await.unwrap();
    let agent = c.agent(docker_agent(name)).await.unwrap();
    let node = agent.node_id().clone();
    let cleanup = Cleanup(node.clone());
    (c, agent, node, cleanup)
}

/// The test image, built if needed.
fn image() -> String {
    busybox_image().expect("the busybox test image")
}

/// The ids of all containers (running or not) labelled with `node`.
fn containers_of(node: &NodeId) -> Vec<String> {
    let out = Command::new("docker")
        .args(["ps", "-aq", "--no-trunc", "--filter"])
        .arg(format!("label=drover.node={node}"))
        .output()
        .expect("the docker CLI");
    assert!(
        out.status.success(),
        "docker ps failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// `docker inspect --format FORMAT NAME`, trimmed; empty if there is no such container.
fn docker_inspect(container: &str, format: &str) -> String {
    let out = Command::new("docker")
        .args([
            "inspect",
            "--type",
            "container",
            "--format",
            format,
            container,
        ])
        .output()
        .expect("the docker CLI");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// What the engine kept of a container's output (stdout and stderr).
fn docker_logs(container: &str) -> String {
    let out = Command::new("docker")
        .args(["logs", container])
        .output()
        .expect("the docker CLI");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Removes every container labelled with the node when dropped, so a failed test
/// leaves nothing behind. Tests check for leftovers themselves before it runs.
struct Cleanup(NodeId);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let ids = containers_of(&self.0);
        if !ids.is_empty() {
            let _ = Command::new("docker")
                .arg("rm")
                .arg("-f")
                .args(&ids)
                .output();
        }
    }
}

/// Waits until the engine holds no container of `node`.
async fn until_no_containers(node: &NodeId) {
    wait_for(
        &format!("the containers of node {node} to be removed"),
        T,
        async || containers_of(node).is_empty(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}; left: {:?}", containers_of(node)));
}

/// Waits until the cluster lists the agent's node.
async fn until_registered(api: &Api, node: &NodeId) {
    wait_for("the agent to register", T, async || {
        api.nodes()
            .await
            .is_ok_and(|ns| ns.iter().any(|n| &n.node.id == node))
    })
    .await
    .unwrap();
}

/// Waits until the job's logs contain `needle`, failing with what they held.
async fn until_logged(api: &Api, job: &str, needle: &str) -> String {
    let start = Instant::now();
    loop {
        let logs = api.logs(job).await.unwrap();
        if logs.contains(needle) {
            return logs;
        }
        assert!(
            start.elapsed() < T,
            "the logs of {job} never contained {needle:?}; they hold {logs:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The numbers of the `tick N` lines in `text`, in order.
fn ticks(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("tick ")?.parse().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_httpd_service_is_running_only_once_its_health_check_passes() {
    let image = image();
    let (c, _agent, node, _cleanup) = docker_cluster("web").await;
    let api = c.api();
    api.apply_yaml(&format!(
        r#"
name: web-httpd
kind: service
runtime: docker
image: {image}
pull: never
command: ["/bin/busybox", "httpd", "-f", "-v", "-p", "8080", "-h", "/www"]
ports: [8080]
resources: {{ cpu: 0.5, memory: 64Mi }}
health:
  http: {{ port: 8080, path: / }}
  interval: 200ms
  timeout: 1s
  start_deadline: 30s
"#
    ))
    .await
    .unwrap();
    let (_, tasks) = api.wait_running("web-httpd", T).await.unwrap();
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    let task = &tasks[0].task;
    assert_eq!(task.node_id.as_ref(), Some(&node));
    assert_eq!(task.ports.len(), 1, "{:?}", task.ports);
    assert_eq!(task.ports[0].container, 8080);
    let host = task.ports[0].host;
    assert_ne!(host, 0, "{:?}", task.ports);
    // The container got the job's limits.
    assert_eq!(
        docker_inspect(
            &format!("drover-{}", task.id),
            "{{.HostConfig.NanoCpus}} {{.HostConfig.Memory}}"
        ),
        format!("500000000 {}", 64 << 20)
    );

    // Running means serving: the published port answers at once.
    let resp = reqwest::get(format!("http://127.0.0.1:{host}/"))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.text().await.unwrap(), BUSYBOX_INDEX_HTML);
    // A path only this test asks for, so its log line cannot be a health probe's.
    let resp = reqwest::get(format!("http://127.0.0.1:{host}/drover-test-missing"))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);

    // httpd -v logs each response on stderr: the one probe that passed and both of ours.
    let start = Instant::now();
    loop {
        let logs = api.logs("web-httpd").await.unwrap();
        if logs.matches("response:200").count() >= 2 && logs.contains("response:404") {
            break;
        }
        assert!(
            start.elapsed() < T,
            "httpd's request log lines never reached the job's logs: {logs:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    api.stop("web-httpd").await.unwrap();
    let (job, tasks) = api.wait_final("web-httpd", T).await.unwrap();
    assert_eq!(job.job.status, JobStatus::Stopped, "{:?}", job.job);
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    assert_eq!(
        tasks[0].task.state,
        TaskState::Stopped,
        "{:?}",
        tasks[0].task
    );
    until_no_containers(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_whose_health_check_never_passes_fails_without_ever_running() {
    let image = image();
    let (c, _agent, node, _cleanup) = docker_cluster("web").await;
    let api = c.api();
    // Port 8080 is published, but nothing in the container listens on it.
    api.apply_yaml(&format!(
        r#"
name: web-unhealthy
kind: service
runtime: docker
image: {image}
pull: never
command: ["/bin/sleep", "600"]
ports: [8080]
health:
  http: {{ port: 8080, path: / }}
  interval: 200ms
  timeout: 1s
  start_deadline: 2s
"#
    ))
    .await
    .unwrap();

    // Watches the tasks until the first one has ended; none may ever be running.
    let start = Instant::now();
    let first = loop {
        let tasks = api.tasks("web-unhealthy").await.unwrap();
        if let Some(t) = tasks.iter().find(|t| t.task.state == TaskState::Running) {
            panic!("a task was reported running: {:?}", t.task);
        }
        if let Some(t) = tasks
            .iter()
            .find(|t| t.task.attempt == 0 && t.task.state.is_terminal())
        {
            break t.task.clone();
        }
        assert!(
            start.elapsed() < T,
            "the first task never ended; last seen: {tasks:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = start.elapsed();
    assert_eq!(first.state, TaskState::Failed, "{first:?}");
    assert!(first.reason.contains("health check"), "{}", first.reason);
    assert!(first.reason.contains("start deadline"), "{}", first.reason);
    // Ports are only reported with running, so a task that had them was running.
    assert!(first.ports.is_empty(), "{first:?}");
    assert!(took >= Duration::from_secs(2), "gave up early: {took:?}");

    api.stop("web-unhealthy").await.unwrap();
    let (job, tasks) = api.wait_final("web-unhealthy", T).await.unwrap();
    assert_eq!(job.job.status, JobStatus::Stopped, "{:?}", job.job);
    for t in &tasks {
        assert_ne!(t.task.state, TaskState::Succeeded, "{:?}", t.task);
        assert!(t.task.ports.is_empty(), "{:?}", t.task);
    }
    until_no_containers(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_past_its_memory_limit_fails_with_reason_oom() {
    let image = image();
    let (c, _agent, node, _cleanup) = docker_cluster("oom").await;
    let api = c.api();
    // The shell doubles a string until the 16 MiB limit (with no swap) is hit.
    api.apply_yaml(&format!(
        r#"
name: docker-oom
runtime: docker
image: {image}
pull: never
command: ["/bin/sh", "-c", "echo growing; x=a; while true; do x=$x$x; done"]
resources: {{ memory: 16Mi }}
restart: {{ attempts: 0 }}
"#
    ))
    .await
    .unwrap();
    let (job, tasks) = api.wait_final("docker-oom", T).await.unwrap();
    assert_eq!(job.job.status, JobStatus::Failed, "{:?}", job.job);
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    let t = &tasks[0].task;
    assert_eq!(t.state, TaskState::Failed, "{t:?}");
    assert!(t.reason.starts_with("oom"), "{}", t.reason);
    assert!(job.job.reason.contains("oom"), "{}", job.job.reason);
    let logs = api.logs("docker-oom").await.unwrap();
    assert!(logs.contains("growing"), "{logs:?}");
    until_no_containers(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_reattaches_to_its_running_container() {
    let image = image();
    // The agent is away for a few seconds on purpose; the node must not be declared
    // lost (and its task replaced) meanwhile.
    let c = TestCluster::start_with(ClusterOptions {
        node_timeout: Duration::from_secs(60),
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    let opts = docker_agent("reattach");
    let data_dir = c.dir.path().join("agents").join("reattach");
    let agent = c.agent(opts.clone()).await.unwrap();
    let node = agent.node_id().clone();
    let _cleanup = Cleanup(node.clone());
    let api = c.api();
    api.apply_yaml(&format!(
        r#"
name: reattach
kind: service
runtime: docker
image: {image}
pull: never
command: ["/bin/sh", "-c", "trap 'echo bye; exit 0' TERM; echo started; i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.2; done"]
stop_grace: 10s
"#
    ))
    .await
    .unwrap();
    let (_, tasks) = api.wait_running("reattach", T).await.unwrap();
    let task_id = tasks[0].task.id.clone();
    let container = format!("drover-{task_id}");
    let container_id = docker_inspect(&container, "{{.Id}}");
    assert!(!container_id.is_empty(), "no container {container}");
    until_logged(&api, "reattach", "tick 3\n").await;

    agent.shutdown().await;
    assert_eq!(
        docker_inspect(&container, "{{.State.Running}}"),
        "true",
        "the container must outlive its agent"
    );
    // Let it write a second or more while no agent copies its output.
    let shipped_before = ticks(&api.logs("reattach").await.unwrap())
        .into_iter()
        .max()
        .unwrap_or(0);
    let start = Instant::now();
    let written_while_down = loop {
        let n = ticks(&docker_logs(&container))
            .into_iter()
            .max()
            .unwrap_or(0);
        if n >= shipped_before + 6 {
            break n;
        }
        assert!(start.elapsed() < T, "the container stopped printing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let agent = start_agent(&c.url, data_dir, opts).await.unwrap();
    assert_eq!(agent.node_id(), &node, "same data dir, same node");
    let logs = until_logged(
        &api,
        "reattach",
        &format!("tick {}\n", written_while_down + 3),
    )
    .await;

    // The same task, on the same container, still running; nothing replaced it.
    let tasks = api.tasks("reattach").await.unwrap();
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    assert_eq!(tasks[0].task.id, task_id);
    assert_eq!(
        tasks[0].task.state,
        TaskState::Running,
        "{:?}",
        tasks[0].task
    );
    assert_eq!(docker_inspect(&container, "{{.Id}}"), container_id);
    assert_eq!(agent.running_tasks(), 1);

    // The container reaches the socket the new agent serves, not the one the old agent
    // made before it went: its socket directory, not the file, is bound in.
    let source = docker_inspect(
        &container,
        r#"{{range .Mounts}}{{if eq .Destination "/run/drover/socket"}}{{.Source}}{{end}}{{end}}"#,
    );
    assert!(
        !source.is_empty(),
        "no socket directory bound into {container}"
    );
    let served = std::os::unix::fs::MetadataExt::ino(
        &std::fs::metadata(Path::new(&source).join("drover.sock")).unwrap(),
    );
    let out = Command::new("docker")
        .args([
            "exec",
            &container,
            "stat",
            "-c",
            "%i",
            "/run/drover/socket/drover.sock",
        ])
        .output()
        .expect("the docker CLI");
    let seen = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(
        seen,
        served.to_string(),
        "the container sees another socket than the agent serves: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The output reached the logs with no gap, and was not copied again from the start
    // (a little may repeat: the copy position is recorded at most every 200 ms).
    let seen = ticks(&logs);
    let last = *seen.iter().max().unwrap();
    let missing: Vec<u64> = (0..=last).filter(|n| !seen.contains(n)).collect();
    assert!(
        missing.is_empty(),
        "ticks missing from the logs: {missing:?}"
    );
    let repeated = seen.len() as u64 - (last + 1);
    eprintln!();
    assert!(repeated <= 5, "{repeated} ticks repeated: {seen:?}");
    assert_eq!(logs.matches("started\n").count(), 1, "{logs:?}");

    api.stop("reattach").await.unwrap();
    let (job, tasks) = api.wait_final("reattach", T).await.unwrap();
    assert_eq!(job.job.status, JobStatus::Stopped, "{:?}", job.job);
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    let t = &tasks[0].task;
    assert_eq!(t.state, TaskState::Stopped, "{t:?}");
    assert!(t.reason.contains("ended after SIGTERM"), "{}", t.reason);
    let logs = api.logs("reattach").await.unwrap();
    assert!(logs.contains("bye\n"), "{logs:?}");
    until_no_containers(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_left_by_a_deleted_task_is_removed_when_the_agent_starts() {
    let image = image();
    let c = TestCluster::start().await.unwrap();
    let opts = docker_agent("orphans");
    let data_dir = c.dir.path().join("agents").join("orphans");
    let agent = c.agent(opts.clone()).await.unwrap();
    let node = agent.node_id().clone();
    let _cleanup = Cleanup(node.clone());
    agent.shutdown().await;

    // As the runtime would have made it for a task the agent no longer knows.
    let ghost = TaskId::generate();
    let run = |node: &NodeId, task: &TaskId| {
        let out = Command::new("docker")
            .args(["run", "-d", "--name"])
            .arg(format!("drover-{task}"))
            .args(["--label", "drover.managed=true", "--label"])
            .arg(format!("drover.node={node}"))
            .arg("--label")
            .arg(format!("drover.task={task}"))
            .args(["--label", "drover.job=ghost"])
            .arg(&image)
            .args(["/bin/sleep", "600"])
            .output()
            .expect("the docker CLI");
        assert!(
            out.status.success(),
            "docker run failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let orphan = run(&node, &ghost);
    // Another node's container, which this agent must leave alone.
    let other_node = NodeId::generate();
    let _other_cleanup = Cleanup(other_node.clone());
    let other = run(&other_node, &TaskId::generate());
    assert_eq!(containers_of(&node), vec![orphan.clone()]);

    let agent = start_agent(&c.url, data_dir, opts).await.unwrap();
    assert_eq!(agent.node_id(), &node);
    wait_for(
        "the orphaned container to be removed",
        Duration::from_secs(10),
        async || containers_of(&node).is_empty(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}; left: {:?}", containers_of(&node)));
    assert_eq!(
        containers_of(&other_node),
        vec![other],
        "another node's container was touched"
    );
    assert_eq!(docker_inspect(&orphan, "{{.Id}}"), "");
    // And the agent goes on as usual.
    until_registered(&c.api(), &node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_image_with_pull_never_fails_the_task_with_a_clear_reason() {
    let (c, _agent, node, _cleanup) = docker_cluster("noimage").await;
    let api = c.api();
    let start = Instant::now();
    api.apply_yaml(
        r#"
name: no-image
runtime: docker
image: drover-test/does-not-exist:1
pull: never
command: ["/bin/true"]
restart: { attempts: 0 }
"#,
    )
    .await
    .unwrap();
    let (job, tasks) = api.wait_final("no-image", T).await.unwrap();
    let took = start.elapsed();
    assert!(took < Duration::from_secs(15), "took {took:?}");
    assert_eq!(job.job.status, JobStatus::Failed, "{:?}", job.job);
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    let t = &tasks[0].task;
    assert_eq!(t.state, TaskState::Failed, "{t:?}");
    for needle in ["drover-test/does-not-exist:1", "pull", "never"] {
        assert!(
            t.reason.contains(needle),
            "reason lacks {needle:?}: {}",
            t.reason
        );
    }
    assert!(t.ports.is_empty() && t.exit.is_none(), "{t:?}");
    assert!(containers_of(&node).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_for_another_architecture_fails_with_both_platforms_named() {
    let (c, _agent, node, _cleanup) = docker_cluster("foreign").await;
    let api = c.api();
    // An image for the other of the two common architectures than this machine's.
    let other = if std::env::consts::ARCH == "aarch64" {
        "amd64"
    } else {
        "arm64"
    };
    let native = if other == "amd64" { "arm64" } else { "amd64" };
    let image = foreign_image("linux", other).expect("the foreign test image");
    for pull in ["never", "if_not_present"] {
        let name = format!("foreign-{}", pull.replace('_', "-"));
        api.apply_yaml(&format!(
            "name: {name}\nruntime: docker\nimage: {image}\npull: {pull}\n\
             command: [\"/README\"]\nrestart: {{ attempts: 0 }}\n"
        ))
        .await
        .unwrap();
        let (job, tasks) = api.wait_final(&name, T).await.unwrap();
        assert_eq!(job.job.status, JobStatus::Failed, "{:?}", job.job);
        let t = &tasks[0].task;
        assert_eq!(t.state, TaskState::Failed, "{t:?}");
        for needle in [
            format!("{image} is built for linux/{other}"),
            format!("runs linux/{native}"),
        ] {
            assert!(
                t.reason.contains(&needle),
                "reason lacks {needle:?}: {}",
                t.reason
            );
        }
        assert!(
            t.exit.is_none(),
            "it must fail before any container runs: {t:?}"
        );
    }
    assert!(containers_of(&node).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_is_offered_with_the_engines_version() {
    let c = TestCluster::start().await.unwrap();
    let agent = c.agent(docker_agent("offers")).await.unwrap();
    let node = agent.node_id().clone();
    let api = c.api();
    until_registered(&api, &node).await;
    let nodes = api.nodes().await.unwrap();
    let me = nodes
        .iter()
        .find(|n| n.node.id == node)
        .expect("the agent's node");
    assert_eq!(
        me.node.info.runtimes,
        vec![drover_core::spec::RuntimeKind::Docker],
        "{:?}",
        me.node.info
    );
    // What the runtime's fingerprint read from the engine, as `RUNTIME.KEY`.
    let version = me.node.info.attributes.get("docker.version");
    assert!(
        version.is_some_and(|v| !v.trim().is_empty()),
        "no docker.version in {:?}",
        me.node.info.attributes
    );
    let engine = Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .expect("the docker CLI");
    let engine = String::from_utf8_lossy(&engine.stdout).trim().to_string();
    assert_eq!(version.map(String::as_str), Some(engine.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_finds_its_task_socket_config_file_and_working_dir() {
    let image = image();
    let (c, agent, node, _cleanup) = docker_cluster("docker-socket").await;
    let api = c.api();
    let files = drover_testkit::tar_gz(&[("app/data.txt", b"shipped with the job\n")]);
    let digest = drover_testkit::digest_of(&files);
    let (status, body) = api.put_blob(&digest, files).await.unwrap();
    assert!(status == 200 || status == 201, "{status} {body}");
    // busybox has no client for a Unix socket; that one is there, a socket, is what
    // the bind shows, and the socket itself is the one process tasks are served on. The
    // program starts in its working_dir, where it also writes.
    api.apply_yaml(&format!(
        r#"
name: sees-agent
runtime: docker
image: {image}
pull: never
command: ["/bin/sh", "-c", "test -S \"$DROVER_SOCKET\" && echo socket $DROVER_SOCKET && cat \"$DROVER_CONFIG\" && echo && pwd && cat app/data.txt && echo new > app/out.txt"]
runtime_env:
  config: {{ greeting: hello }}
  working_dir: "{digest}"
"#
    ))
    .await
    .unwrap();
    let (job, tasks) = api.wait_final("sees-agent", T).await.unwrap();
    let logs = api.logs("sees-agent").await.unwrap();
    assert_eq!(job.job.status, JobStatus::Complete, "{logs}\n{tasks:?}");
    assert!(
        logs.contains("socket /run/drover/socket/drover.sock"),
        "{logs}"
    );
    assert!(logs.contains(r#""greeting":"hello""#), "{logs}");
    assert!(
        logs.contains("/run/drover/work\nshipped with the job"),
        "{logs}"
    );
    assert!(containers_of(&node).is_empty() || wait_gone(&node).await);
    agent.shutdown().await;
}

/// Waits for the node's containers to be removed.
async fn wait_gone(node: &NodeId) -> bool {
    wait_for("the containers to be removed", T, async || {
        containers_of(node).is_empty()
    })
    .await
    .is_ok()
}
