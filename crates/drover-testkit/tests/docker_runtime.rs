//! The Docker runtime driven directly (no controller or agent) against the machine's
//! real Docker engine, with a busybox image built locally (see `images.rs`).
//!
//! Every test uses its own node id, so its containers are told apart from those of tests
//! running at the same time, and removes them when it ends, passed or not.

use drover_core::quantity::{ByteSize, Dur};
use drover_core::spec::{HealthCheck, HttpProbe, JobSpec, PullPolicy, RuntimeKind, TcpProbe};
use drover_core::{NodeId, TaskId};
use drover_runtime::docker::{DockerConfig, DockerRuntime};
use drover_runtime::{ExitStatus, Recovered, Runtime, RuntimeError, StopOutcome, TaskContext};
use drover_testkit::images::{BUSYBOX_INDEX_HTML, busybox_image};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The longest any single step may take before the test fails instead of hanging.
const T: Duration = Duration::from_secs(60);

/// One test's runtime, node id, task directories and image; removes the node's
/// containers when dropped.
struct Fixture {
    rt: DockerRuntime,
    node: NodeId,
    dir: tempfile::TempDir,
    image: String,
}

impl Fixture {
    fn new() -> Fixture {
        let image = busybox_image().expect("the busybox test image");
        let node = NodeId::generate();
        Fixture {
            rt: DockerRuntime::new(config(&node)).expect("a docker runtime"),
            node,
            dir: tempfile::tempdir().expect("a temporary directory"),
            image,
        }
    }

    /// A context for a new task of a job named after `name` running `command` in the
    /// busybox image; `edit` adjusts the spec.
    fn task(&self, name: &str, command: &[&str], edit: impl FnOnce(&mut JobSpec)) -> TaskContext {
        let task_id = TaskId::generate();
        let job_name = format!(
            "{name}-{}",
            &self.node.as_str()[self.node.as_str().len() - 8..]
        );
        let mut spec = JobSpec::new(
            job_name.clone(),
            command.iter().map(|s| s.to_string()).collect(),
        );
        spec.runtime = RuntimeKind::Docker;
        spec.image = Some(self.image.clone());
        spec.pull = PullPolicy::Never;
        edit(&mut spec);
        let dir = self.dir.path().join(task_id.as_str());
        std::fs::create_dir_all(&dir).expect("a task directory");
        let mut env = spec.env.clone();
        env.insert("DROVER_TASK_ID".into(), task_id.to_string());
        env.insert("DROVER_JOB".into(), job_name.clone());
        TaskContext {
            task_id,
            job_name,
            job_id: drover_core::JobId::generate(),
            index: 0,
            stdout_path: dir.join("stdout"),
            stderr_path: dir.join("stderr"),
            user: None,
            stdin: None,
            mounts: Vec::new(),
            workdir: None,
            dir,
            env,
            spec,
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        remove_node_containers(&self.node);
    }
}

fn config(node: &NodeId) -> DockerConfig {
    let mut cfg = DockerConfig::new(node.clone());
    cfg.pull_timeout = Duration::from_secs(30);
    cfg
}

/// Removes every container labelled with `node`, through the CLI so it works from Drop.
fn remove_node_containers(node: &NodeId) {
    let ids = containers_of(node);
    if !ids.is_empty() {
        let _ = Command::new("docker")
            .arg("rm")
            .arg("-f")
            .args(&ids)
            .output();
    }
}

/// The ids of all containers (running or not) labelled with `node`.
fn containers_of(node: &NodeId) -> Vec<String> {
    let out = Command::new("docker")
        .args(["ps", "-aq", "--no-trunc", "--filter"])
        .arg(format!("label=drover.node={node}"))
        .output()
        .expect("the docker CLI");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

fn docker_inspect(container_or_name: &str, format: &str) -> String {
    let out = Command::new("docker")
        .args(["inspect", "--format", format, container_or_name])
        .output()
        .expect("the docker CLI");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

async fn wait(rt: &DockerRuntime, id: &TaskId) -> ExitStatus {
    tokio::time::timeout(T, rt.wait(id))
        .await
        .expect("the task to end in time")
        .expect("its exit status")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Waits until `path` contains `needle`, failing with what it holds.
async fn until_logged(path: &Path, needle: &str) {
    let deadline = Instant::now() + T;
    while !read(path).contains(needle) {
        assert!(
            Instant::now() < deadline,
            "{} never contained {needle:?}; it holds {:?}",
            path.display(),
            read(path)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn sh(script: &str) -> Vec<&str> {
    vec!["sh", "-c", script]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_container_succeeds_with_its_output_and_only_the_task_environment() {
    // A variable of the agent's own process, which must not reach the task.
    // SAFETY: nextest runs each test in its own process and this test sets the variable
    // before starting any thread that reads the environment.
    unsafe { std::env::set_var("DROVER_TEST_AGENT_ONLY", "leaked") };
    let f = Fixture::new();
    let ctx = f.task("batch-ok", &sh("echo out; echo err >&2; env"), |s| {
        s.env.insert("GREETING".into(), "bonjour".into());
    });
    f.rt.prepare(&ctx).await.unwrap();
    let started = f.rt.start(&ctx).await.unwrap();
    assert!(started.ports.is_empty());

    // Labels say whose container it is.
    let labels = docker_inspect(
        &format!("drover-{}", ctx.task_id),
        "{{index .Config.Labels \"drover.task\"}} {{index .Config.Labels \"drover.job\"}} \
         {{index .Config.Labels \"drover.job-id\"}} {{index .Config.Labels \"drover.node\"}} \
         {{index .Config.Labels \"drover.managed\"}}",
    );
    assert_eq!(
        labels,
        format!(
            "{} {} {} {} true",
            ctx.task_id, ctx.job_name, ctx.job_id, f.node
        )
    );

    assert_eq!(wait(&f.rt, &ctx.task_id).await, ExitStatus::Exited(0));
    // Every caller sees the same status, however late.
    assert_eq!(wait(&f.rt, &ctx.task_id).await, ExitStatus::Exited(0));
    let stdout = read(&ctx.stdout_path);
    let stderr = read(&ctx.stderr_path);
    assert!(stdout.starts_with("out\n"), "stdout: {stdout:?}");
    assert_eq!(stderr, "err\n");
    assert!(stdout.contains("GREETING=bonjour"), "stdout: {stdout:?}");
    assert!(
        stdout.contains(&format!("DROVER_TASK_ID={}", ctx.task_id)),
        "stdout: {stdout:?}"
    );
    assert!(
        !stdout.contains("DROVER_TEST_AGENT_ONLY"),
        "stdout: {stdout:?}"
    );
    assert!(!stdout.contains("leaked"), "stdout: {stdout:?}");
    assert_eq!(
        f.rt.stop(&ctx.task_id, Duration::from_secs(1))
            .await
            .unwrap(),
        StopOutcome::AlreadyExited
    );
    f.rt.destroy(&ctx.task_id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_container_reports_its_exit_code() {
    let f = Fixture::new();
    let ctx = f.task("batch-fail", &sh("echo failing >&2; exit 3"), |_| {});
    f.rt.start(&ctx).await.unwrap();
    assert_eq!(wait(&f.rt, &ctx.task_id).await, ExitStatus::Exited(3));
    assert_eq!(read(&ctx.stderr_path), "failing\n");
    f.rt.destroy(&ctx.task_id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_replaces_the_entrypoint_and_args_replace_the_cmd() {
    let f = Fixture::new();
    // Only args: the image's CMD (`sh`) is replaced, there is no ENTRYPOINT.
    let args_only = f.task("args-only", &[], |s| {
        s.args = vec!["sh".into(), "-c".into(), "echo from-args".into()];
    });
    // Both: `command` is the program and `args` its arguments.
    let both = f.task("both", &["echo"], |s| {
        s.args = vec!["one".into(), "two".into()];
    });
    for ctx in [&args_only, &both] {
        f.rt.start(ctx).await.unwrap();
        assert_eq!(wait(&f.rt, &ctx.task_id).await, ExitStatus::Exited(0));
    }
    assert_eq!(read(&args_only.stdout_path), "from-args\n");
    assert_eq!(read(&both.stdout_path), "one two\n");
    // A missing program is a start error naming it.
    let missing = f.task("missing", &["no-such-program"], |_| {});
    let err = f.rt.start(&missing).await.unwrap_err().to_string();
    assert!(err.contains("no-such-program"), "{err}");
    assert!(
        containers_of(&f.node).len() == 2,
        "the failed container was removed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_service_starts_once_healthy_and_its_port_is_published() {
    let f = Fixture::new();
    let ctx = f.task("web", &["httpd", "-f", "-p", "8080", "-h", "/www"], |s| {
        s.ports = vec![8080];
        s.health = Some(HealthCheck {
            http: Some(HttpProbe {
                port: 8080,
                path: "/index.html".into(),
            }),
            tcp: None,
            command: Vec::new(),
            interval: Dur::from_millis(100),
            timeout: Dur::from_secs(1),
            start_deadline: Dur::from_secs(20),
        });
    });
    let started = tokio::time::timeout(T, f.rt.start(&ctx))
        .await
        .expect("start in time")
        .unwrap();
    assert_eq!(started.ports.len(), 1, "{:?}", started.ports);
    assert_eq!(started.ports[0].container, 8080);
    let host = started.ports[0].host;
    assert_ne!(host, 0);
    let body = reqwest::get(format!("http://127.0.0.1:{host}/"))
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, BUSYBOX_INDEX_HTML);

    let stats = f.rt.stats(&ctx.task_id).await.unwrap();
    assert!(stats.memory_bytes > 0, "{stats:?}");
    assert!(stats.cpu_seconds >= 0.0, "{stats:?}");

    // httpd as PID 1 has no TERM handler, so the stop ends with the kill.
    let outcome =
        f.rt.stop(&ctx.task_id, Duration::from_millis(300))
            .await
            .unwrap();
    assert_eq!(outcome, StopOutcome::Killed);
    f.rt.destroy(&ctx.task_id).await.unwrap();
    assert!(containers_of(&f.node).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_check_that_never_passes_fails_the_start_by_its_deadline() {
    let f = Fixture::new();
    // Published, but nothing listens on 9090: only the engine's proxy answers there.
    let ctx = f.task(
        "web-wrong-port",
        &["httpd", "-f", "-p", "8080", "-h", "/www"],
        |s| {
            s.ports = vec![8080, 9090];
            s.health = Some(HealthCheck {
                http: Some(HttpProbe {
                    port: 9090,
                    path: "/".into(),
                }),
                tcp: None,
                command: Vec::new(),
                interval: Dur::from_millis(200),
                timeout: Dur::from_millis(500),
                start_deadline: Dur::from_secs(2),
            });
        },
    );
    let began = Instant::now();
    let err = tokio::time::timeout(T, f.rt.start(&ctx))
        .await
        .expect("start to give up in time")
        .unwrap_err();
    let took = began.elapsed();
    let msg = err.to_string();
    assert!(matches!(err, RuntimeError::Start(_)), "{err:?}");
    assert!(msg.contains("health check"), "{msg}");
    assert!(msg.contains("start deadline"), "{msg}");
    assert!(msg.contains("container port 9090"), "{msg}");
    assert!(took >= Duration::from_secs(2), "gave up early: {took:?}");
    assert!(took < Duration::from_secs(15), "gave up late: {took:?}");
    assert!(
        containers_of(&f.node).is_empty(),
        "the container was removed"
    );

    // A TCP probe sees through the proxy too: nothing listens, so it never passes.
    let tcp = f.task(
        "tcp-wrong-port",
        &["httpd", "-f", "-p", "8080", "-h", "/www"],
        |s| {
            s.ports = vec![8080, 9090];
            s.health = Some(HealthCheck {
                http: None,
                tcp: Some(TcpProbe { port: 9090 }),
                command: Vec::new(),
                interval: Dur::from_millis(200),
                timeout: Dur::from_millis(500),
                start_deadline: Dur::from_secs(1),
            });
        },
    );
    let err = f.rt.start(&tcp).await.unwrap_err().to_string();
    assert!(err.contains("TCP connect"), "{err}");

    // A probe of a port that is not published is refused before anything runs.
    let unpublished = f.task("web-unpublished", &["httpd", "-f", "-p", "8080"], |s| {
        s.health = Some(HealthCheck {
            http: None,
            tcp: Some(TcpProbe { port: 8080 }),
            command: Vec::new(),
            interval: Dur::from_millis(100),
            timeout: Dur::from_millis(500),
            start_deadline: Dur::from_secs(5),
        });
    });
    let err = f.rt.start(&unpublished).await.unwrap_err().to_string();
    assert!(err.contains("health.tcp.port 8080"), "{err}");
    assert!(containers_of(&f.node).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_health_check_runs_inside_the_container() {
    let f = Fixture::new();
    let ctx = f.task(
        "cmd-health",
        &sh("sleep 0.5; touch /tmp/ready; exec sleep 1000"),
        |s| {
            s.health = Some(HealthCheck {
                http: None,
                tcp: None,
                command: vec!["test".into(), "-f".into(), "/tmp/ready".into()],
                interval: Dur::from_millis(100),
                timeout: Dur::from_secs(2),
                start_deadline: Dur::from_secs(20),
            });
        },
    );
    let began = Instant::now();
    f.rt.start(&ctx).await.unwrap();
    assert!(
        began.elapsed() >= Duration::from_millis(400),
        "healthy too soon"
    );

    // A container that exits before its check passes fails the start at once.
    let dies = f.task("cmd-health-dies", &sh("exit 4"), |s| {
        s.health = Some(HealthCheck {
            http: None,
            tcp: None,
            command: vec!["test".into(), "-f".into(), "/never".into()],
            interval: Dur::from_millis(100),
            timeout: Dur::from_secs(2),
            start_deadline: Dur::from_secs(30),
        });
    });
    let began = Instant::now();
    let err = f.rt.start(&dies).await.unwrap_err().to_string();
    assert!(err.contains("exit code 4"), "{err}");
    assert!(
        began.elapsed() < Duration::from_secs(15),
        "{:?}",
        began.elapsed()
    );
    f.rt.stop(&ctx.task_id, Duration::ZERO).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_past_its_memory_limit_is_reported_out_of_memory() {
    let f = Fixture::new();
    // The shell doubles a string until the 16 MiB limit (with no swap) is hit.
    let ctx = f.task("oom", &sh("x=a; while true; do x=$x$x; done"), |s| {
        s.resources.memory = ByteSize(16 << 20);
    });
    f.rt.start(&ctx).await.unwrap();
    let memory = docker_inspect(
        &format!("drover-{}", ctx.task_id),
        "{{.HostConfig.Memory}} {{.HostConfig.MemorySwap}}",
    );
    assert_eq!(memory, format!("{0} {0}", 16 << 20));
    match wait(&f.rt, &ctx.task_id).await {
        ExitStatus::OutOfMemory(_) => {}
        other => panic!("expected OutOfMemory, got {other:?}"),
    }
    f.rt.destroy(&ctx.task_id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_honours_the_grace_period() {
    let f = Fixture::new();
    // Handles TERM: ends within the grace, having run its handler.
    let polite = f.task(
        "polite",
        &sh("trap 'echo got-term; exit 0' TERM; echo ready; while true; do sleep 0.1; done"),
        |_| {},
    );
    // Ignores TERM explicitly: only the kill ends it.
    let stubborn = f.task(
        "stubborn",
        &sh("trap '' TERM; echo ready; sleep 1000"),
        |_| {},
    );
    f.rt.start(&polite).await.unwrap();
    f.rt.start(&stubborn).await.unwrap();
    until_logged(&polite.stdout_path, "ready").await;
    until_logged(&stubborn.stdout_path, "ready").await;

    let began = Instant::now();
    let outcome =
        f.rt.stop(&polite.task_id, Duration::from_secs(10))
            .await
            .unwrap();
    assert_eq!(outcome, StopOutcome::Graceful);
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "{:?}",
        began.elapsed()
    );
    assert_eq!(wait(&f.rt, &polite.task_id).await, ExitStatus::Exited(0));
    assert!(read(&polite.stdout_path).contains("got-term"));

    let grace = Duration::from_millis(700);
    let began = Instant::now();
    let outcome = f.rt.stop(&stubborn.task_id, grace).await.unwrap();
    let took = began.elapsed();
    assert_eq!(outcome, StopOutcome::Killed);
    assert!(took >= grace, "killed before the grace ran out: {took:?}");
    assert!(
        took < grace + Duration::from_secs(5),
        "killed late: {took:?}"
    );
    assert_eq!(
        wait(&f.rt, &stubborn.task_id).await,
        ExitStatus::Signaled("SIGKILL".into())
    );
    assert_eq!(
        f.rt.stop(&stubborn.task_id, grace).await.unwrap(),
        StopOutcome::AlreadyExited
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_runtime_recovers_running_ended_and_missing_containers() {
    let f = Fixture::new();
    let ticker = f.task(
        "ticker",
        &sh("i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.1; done"),
        |_| {},
    );
    let quitter = f.task("quitter", &sh("sleep 1; echo bye; exit 7"), |_| {});
    let first = DockerRuntime::new(config(&f.node)).unwrap();
    first.start(&ticker).await.unwrap();
    first.start(&quitter).await.unwrap();
    until_logged(&ticker.stdout_path, "tick 3\n").await;
    // The agent restarts: its runtime (and the copying it did) goes away.
    drop(first);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let second = DockerRuntime::new(config(&f.node)).unwrap();
    assert_eq!(second.recover(&ticker).await.unwrap(), Recovered::Adopted);
    // Repeated recovery is harmless.
    assert_eq!(second.recover(&ticker).await.unwrap(), Recovered::Adopted);
    let before = read(&ticker.stdout_path).lines().count();
    until_logged(&ticker.stdout_path, &format!("tick {}\n", before + 5)).await;

    // The quitter ended while nobody watched: its status and last output are found.
    let deadline = Instant::now() + T;
    let name = format!("drover-{}", quitter.task_id);
    while docker_inspect(&name, "{{.State.Running}}") != "false" {
        assert!(Instant::now() < deadline, "the quitter never ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        second.recover(&quitter).await.unwrap(),
        Recovered::Exited(ExitStatus::Exited(7))
    );
    assert_eq!(wait(&second, &quitter.task_id).await, ExitStatus::Exited(7));
    assert_eq!(read(&quitter.stdout_path), "bye\n");

    // Never started here: nothing to find.
    let missing = f.task("missing", &sh("true"), |_| {});
    assert_eq!(second.recover(&missing).await.unwrap(), Recovered::Gone);

    // The adopted task stops and ends like one started here.
    assert_eq!(
        second
            .stop(&ticker.task_id, Duration::from_millis(200))
            .await
            .unwrap(),
        StopOutcome::Killed
    );
    assert_eq!(
        wait(&second, &ticker.task_id).await,
        ExitStatus::Signaled("SIGKILL".into())
    );
    // Its output was copied across the restart without a gap or a repeat.
    let out = read(&ticker.stdout_path);
    let ticks: Vec<u64> = out
        .lines()
        .map(|l| l.strip_prefix("tick ").and_then(|n| n.parse().ok()))
        .collect::<Option<_>>()
        .unwrap_or_else(|| panic!("unexpected output {out:?}"));
    let expected: Vec<u64> = (0..ticks.len() as u64).collect();
    assert_eq!(ticks, expected, "ticks lost or repeated across recovery");
    second.destroy(&ticker.task_id).await.unwrap();
    second.destroy(&quitter.task_id).await.unwrap();
    assert!(containers_of(&f.node).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_returns_only_this_nodes_containers_and_destroy_removes_them() {
    let f = Fixture::new();
    let other_node = NodeId::generate();
    let other = DockerRuntime::new(config(&other_node)).unwrap();
    // Removes the other node's containers too, whatever happens below.
    struct Cleanup(NodeId);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            remove_node_containers(&self.0);
        }
    }
    let _cleanup = Cleanup(other_node.clone());

    let mine = f.task("mine", &sh("sleep 1000"), |_| {});
    let done = f.task("mine-done", &sh("true"), |_| {});
    let theirs = f.task("theirs", &sh("sleep 1000"), |_| {});
    f.rt.start(&mine).await.unwrap();
    f.rt.start(&done).await.unwrap();
    other.start(&theirs).await.unwrap();
    assert_eq!(wait(&f.rt, &done.task_id).await, ExitStatus::Exited(0));

    let mut expected = vec![mine.task_id.clone(), done.task_id.clone()];
    expected.sort();
    assert_eq!(
        f.rt.list().await.unwrap(),
        expected,
        "running and ended ones"
    );
    assert_eq!(other.list().await.unwrap(), vec![theirs.task_id.clone()]);

    f.rt.stop(&mine.task_id, Duration::ZERO).await.unwrap();
    f.rt.destroy(&mine.task_id).await.unwrap();
    f.rt.destroy(&done.task_id).await.unwrap();
    assert!(f.rt.list().await.unwrap().is_empty());
    assert!(containers_of(&f.node).is_empty());
    assert!(matches!(
        f.rt.wait(&mine.task_id).await,
        Err(RuntimeError::UnknownTask(_))
    ));
    // Destroying by id alone finds the container by its labels (as after a restart).
    let fresh = DockerRuntime::new(config(&other_node)).unwrap();
    fresh.destroy(&theirs.task_id).await.unwrap();
    assert!(containers_of(&other_node).is_empty());
    // Destroying what is already gone is fine.
    fresh.destroy(&theirs.task_id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_reports_missing_and_malformed_images_clearly() {
    let f = Fixture::new();
    let fp = f.rt.fingerprint().await.unwrap();
    assert_eq!(fp.kind, RuntimeKind::Docker);
    for key in ["version", "os", "arch"] {
        assert!(fp.attributes.contains_key(key), "{fp:?}");
    }

    // Present: fine whatever the policy short of always.
    for pull in [PullPolicy::Never, PullPolicy::IfNotPresent] {
        let ctx = f.task("present", &sh("true"), |s| s.pull = pull);
        f.rt.prepare(&ctx).await.unwrap();
    }

    let missing = format!("drover-test/missing-{}:1", f.node.as_str().to_lowercase());
    let ctx = f.task("missing-never", &sh("true"), |s| {
        s.image = Some(missing.clone());
        s.pull = PullPolicy::Never;
    });
    // Prepare looks the image up (its platform is checked against the engine's), so
    // with pull: never a missing image is reported there, and by start too.
    let err = f.rt.prepare(&ctx).await.unwrap_err().to_string();
    assert!(err.contains(&missing), "{err}");
    assert!(err.contains("pull policy is never"), "{err}");
    let err = f.rt.start(&ctx).await.unwrap_err().to_string();
    assert!(err.contains(&missing), "{err}");
    assert!(err.contains("pull policy is never"), "{err}");

    let ctx = f.task("bad-name", &sh("true"), |s| {
        s.image = Some("Not A/Valid:image!".into());
    });
    let err = f.rt.prepare(&ctx).await.unwrap_err().to_string();
    assert!(err.contains("invalid image reference"), "{err}");
    assert!(err.contains("Not A/Valid:image!"), "{err}");

    // No registry is reachable from here: the pull must fail, promptly and clearly.
    for pull in [PullPolicy::Always, PullPolicy::IfNotPresent] {
        let ctx = f.task("missing-pull", &sh("true"), |s| {
            s.image = Some(missing.clone());
            s.pull = pull;
        });
        let began = Instant::now();
        let err = f.rt.prepare(&ctx).await.unwrap_err().to_string();
        assert!(err.contains("pulling image"), "{err}");
        assert!(err.contains(&missing), "{err}");
        assert!(
            began.elapsed() < Duration::from_secs(40),
            "{:?}",
            began.elapsed()
        );
    }

    // Starting without the image says so instead of pulling behind the policy's back.
    let ctx = f.task("missing-start", &sh("true"), |s| {
        s.image = Some(missing.clone())
    });
    let err = f.rt.start(&ctx).await.unwrap_err().to_string();
    assert!(
        err.contains(&missing) && err.contains("not present"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_that_is_down_or_hung_is_reported_not_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeId::generate();

    // Down: no socket at all. Making the runtime still works.
    let mut cfg = config(&node);
    let socket: PathBuf = dir.path().join("absent.sock");
    cfg.host = Some(format!("unix://{}", socket.display()));
    let down = DockerRuntime::new(cfg).unwrap();
    let err = down.fingerprint().await.unwrap_err();
    assert!(matches!(err, RuntimeError::Unavailable(_)), "{err:?}");
    assert!(err.to_string().contains("absent.sock"), "{err}");
    let mut spec = JobSpec::new("down", vec!["true".into()]);
    spec.image = Some("busybox:1".into());
    let ctx = TaskContext {
        task_id: TaskId::generate(),
        job_name: "down".into(),
        job_id: drover_core::JobId::generate(),
        index: 0,
        spec,
        dir: dir.path().to_path_buf(),
        env: BTreeMap::new(),
        stdout_path: dir.path().join("stdout"),
        stderr_path: dir.path().join("stderr"),
        user: None,
        stdin: None,
        mounts: Vec::new(),
        workdir: None,
    };
    let err = down.prepare(&ctx).await.unwrap_err().to_string();
    assert!(err.contains("cannot reach the Docker engine"), "{err}");

    // Hung: something accepts connections on the socket and never answers.
    let hung_socket = dir.path().join("hung.sock");
    let listener = tokio::net::UnixListener::bind(&hung_socket).unwrap();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let mut cfg = config(&node);
    cfg.host = Some(format!("unix://{}", hung_socket.display()));
    cfg.ping_timeout = Duration::from_millis(500);
    cfg.request_timeout = Duration::from_secs(1);
    let hung = DockerRuntime::new(cfg).unwrap();
    let began = Instant::now();
    let err = hung.fingerprint().await.unwrap_err();
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "{:?}",
        began.elapsed()
    );
    assert!(err.to_string().contains("did not answer"), "{err}");
    let began = Instant::now();
    let err = hung.prepare(&ctx).await.unwrap_err().to_string();
    assert!(err.contains("did not answer"), "{err}");
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "{:?}",
        began.elapsed()
    );
    holder.abort();
}

/// A task of `f` running `script` with `input` as its stdin.
fn fed_task(f: &Fixture, name: &str, script: &str, input: &[u8]) -> TaskContext {
    let mut ctx = f.task(name, &sh(script), |spec| {
        spec.stdin = Some(drover_core::spec::StdinInput {
            blob: drover_core::artifact::Digest::of(input),
            size: input.len() as u64,
        });
    });
    let path = ctx.dir.join("input");
    std::fs::write(&path, input).unwrap();
    ctx.stdin = Some(path);
    ctx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_reads_its_input_whole_and_then_its_end() {
    let f = Fixture::new();
    assert!(f.rt.takes_stdin());
    // Every byte value, over more than one pipe buffer, so the copy goes in pieces.
    let input: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let ctx = fed_task(&f, "fed", "sha256sum; cat", &input);
    f.rt.start(&ctx).await.unwrap();
    assert_eq!(wait(&f.rt, &ctx.task_id).await, ExitStatus::Exited(0));
    let expected = format!("{}  -\n", drover_core::artifact::Digest::of(&input).hex());
    assert_eq!(read(&ctx.stdout_path), expected);
    assert!(
        ctx.dir
            .join(drover_runtime::docker::STDIN_SENT_FILE)
            .exists()
    );

    // Without input the container's stdin is closed, as /dev/null is to a process.
    let plain = f.task("plain", &sh("cat; echo end"), |_| {});
    f.rt.start(&plain).await.unwrap();
    assert_eq!(wait(&f.rt, &plain.task_id).await, ExitStatus::Exited(0));
    assert_eq!(read(&plain.stdout_path), "end\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopted_container_whose_input_was_cut_short_is_ended_with_the_reason() {
    let f = Fixture::new();
    let ctx = fed_task(
        &f,
        "cut",
        "read line; echo got $line; sleep 60",
        b"one\ntwo\n",
    );
    let first = DockerRuntime::new(config(&f.node)).unwrap();
    first.start(&ctx).await.unwrap();
    until_logged(&ctx.stdout_path, "got one\n").await;
    let sent = ctx.dir.join(drover_runtime::docker::STDIN_SENT_FILE);
    let deadline = Instant::now() + T;
    while !sent.exists() {
        assert!(Instant::now() < deadline, "the input was never all sent");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(first);

    // Whole input: adopted as ever.
    let second = DockerRuntime::new(config(&f.node)).unwrap();
    assert_eq!(second.recover(&ctx).await.unwrap(), Recovered::Adopted);
    drop(second);

    // As if the agent had stopped while still sending it.
    std::fs::remove_file(&sent).unwrap();
    let third = DockerRuntime::new(config(&f.node)).unwrap();
    match third.recover(&ctx).await.unwrap() {
        Recovered::Exited(ExitStatus::Unknown(why)) => {
            assert!(
                why.contains("before the container had read all of its stdin"),
                "{why}"
            )
        }
        other => panic!("expected the container to be ended, got {other:?}"),
    }
    let name = format!("drover-{}", ctx.task_id);
    assert_eq!(docker_inspect(&name, "{{.State.Running}}"), "false");
    third.destroy(&ctx.task_id).await.unwrap();
}
