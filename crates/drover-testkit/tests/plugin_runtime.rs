//! The plugin runtime driven directly (no controller): the example plugin
//! (`examples/plugins/exec/drover-plugin-exec`) running real processes, and fixture
//! plugins that misbehave (`tests/fixtures/`).

use drover_core::TaskId;
use drover_core::spec::{JobSpec, RuntimeKind};
use drover_runtime::plugin::{PluginConfig, PluginRuntime};
use drover_runtime::{ExitStatus, Recovered, Runtime, RuntimeError, StopOutcome, TaskContext};
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The longest any single step may take before the test fails instead of hanging.
const T: Duration = Duration::from_secs(15);

/// A test's directory. Dropping it kills any task the test left running (when it failed
/// half-way), found by the example plugin's pid files, so no process outlives the test.
struct Base(tempfile::TempDir);

impl Base {
    fn new() -> Self {
        Base(tempfile::tempdir().unwrap())
    }

    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for Base {
    fn drop(&mut self) {
        let Ok(dirs) = std::fs::read_dir(self.path()) else {
            return;
        };
        for dir in dirs.flatten() {
            let Ok(record) = std::fs::read_to_string(dir.path().join("plugin-exec.pid")) else {
                continue;
            };
            let mut fields = record.split_whitespace();
            let (Some(Ok(pid)), Some(Ok(starttime))) = (
                fields.next().map(str::parse::<u32>),
                fields.next().map(str::parse::<u64>),
            ) else {
                continue;
            };
            // The start time tells the task apart from a later process reusing its pid.
            if proc_stat(pid).is_some_and(|(state, since)| state != "Z" && since == starttime) {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", "--", &format!("-{pid}")])
                    .status();
            }
        }
    }
}

fn exec_plugin() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/plugins/exec/drover-plugin-exec")
}

fn fixture(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    // A checkout that lost the executable bit must not make these tests fail for it.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn config(base: &Path, name: &str, path: PathBuf) -> PluginConfig {
    let mut cfg = PluginConfig::new(name, path, base.join("state"));
    cfg.request_timeout = Duration::from_secs(5);
    cfg.start_timeout = Duration::from_secs(10);
    cfg
}

fn exec_runtime(base: &Path) -> PluginRuntime {
    PluginRuntime::new(config(base, "exec", exec_plugin()))
}

/// A task context like the agent builds: its own directory under `base`, the declared
/// variables plus `DROVER_*`.
fn context(base: &Path, command: &[&str], declared: &[(&str, &str)]) -> TaskContext {
    let task_id = TaskId::generate();
    let dir = base.join(task_id.as_str());
    std::fs::create_dir_all(&dir).unwrap();
    let mut spec = JobSpec::new("job", command.iter().map(|s| s.to_string()).collect());
    spec.runtime = RuntimeKind::Plugin("exec".into());
    let mut env: BTreeMap<String, String> = declared
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    spec.env = env.clone();
    env.insert("DROVER_TASK_ID".into(), task_id.to_string());
    env.insert("DROVER_JOB".into(), "job".into());
    env.insert("DROVER_TASK_INDEX".into(), "0".into());
    TaskContext {
        task_id,
        job_name: "job".into(),
        job_id: drover_core::JobId::from("job-1"),
        index: 0,
        spec,
        stdout_path: dir.join("stdout.log"),
        stderr_path: dir.join("stderr.log"),
        user: None,
        stdin: None,
        mounts: Vec::new(),
        workdir: None,
        dir,
        env,
    }
}

async fn wait(rt: &PluginRuntime, id: &TaskId) -> ExitStatus {
    tokio::time::timeout(T, rt.wait(id))
        .await
        .expect("wait timed out")
        .expect("wait failed")
}

/// Waits until `path` contains `needle`, so a test acts only once a task is ready.
async fn wait_for_output(path: &Path, needle: &str) {
    let deadline = Instant::now() + T;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} never contained {needle:?}; it holds {text:?}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The state letter and start time (field 22) of a process, from `/proc/<pid>/stat`.
fn proc_stat(pid: u32) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses, so fields count from the last ')'.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = fields.next()?.to_string();
    let starttime = fields.nth(18)?.parse().ok()?;
    Some((state, starttime))
}

/// Whether a process is alive (a zombie has ended and counts as gone).
fn alive(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|(state, _)| state != "Z")
}

async fn wait_until_dead(pid: u32) {
    let deadline = Instant::now() + T;
    while alive(pid) {
        assert!(Instant::now() < deadline, "process {pid} is still alive");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn kill9(pid: u32) {
    let status = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -KILL {pid} failed");
}

fn parse_env(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_task_runs_with_exactly_its_environment_and_appends_its_output() {
    let base = Base::new();
    let rt = exec_runtime(base.path());
    let ctx = context(
        base.path(),
        &[
            "sh",
            "-c",
            "echo out-line greeting=$GREETING id=$DROVER_TASK_ID; echo err-line >&2; env > env.txt",
        ],
        &[("GREETING", "bonjour")],
    );
    std::fs::write(&ctx.stdout_path, "earlier output\n").unwrap();

    rt.prepare(&ctx).await.unwrap();
    rt.start(&ctx).await.unwrap();
    assert_eq!(wait(&rt, &ctx.task_id).await, ExitStatus::Exited(0));
    // Every waiter sees the same status, however often it asks.
    assert_eq!(wait(&rt, &ctx.task_id).await, ExitStatus::Exited(0));

    let stdout = std::fs::read_to_string(&ctx.stdout_path).unwrap();
    assert_eq!(
        stdout,
        format!(
            "earlier output\nout-line greeting=bonjour id={}\n",
            ctx.task_id
        )
    );
    assert_eq!(
        std::fs::read_to_string(&ctx.stderr_path).unwrap(),
        "err-line\n"
    );

    // env.txt being in the task directory also shows that it ran there.
    let task_env = parse_env(&std::fs::read_to_string(ctx.dir.join("env.txt")).unwrap());
    for (k, v) in &ctx.env {
        assert_eq!(task_env.get(k), Some(v), "{k} in {task_env:?}");
    }
    // Nothing of the plugin's or the test process's own environment reaches the task;
    // only what the shell sets itself, and the default PATH, may be added.
    assert!(
        !task_env.contains_key("DROVER_PLUGIN_SOCKET"),
        "{task_env:?}"
    );
    let own: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
    assert!(
        own.iter().any(|k| k.starts_with("CARGO")),
        "expected the test process to have CARGO_* variables to check against"
    );
    for k in own {
        if ["PATH", "PWD", "OLDPWD", "SHLVL", "_"].contains(&k.as_str()) || ctx.env.contains_key(&k)
        {
            continue;
        }
        assert!(
            !task_env.contains_key(&k),
            "{k} leaked from the test process into the task: {task_env:?}"
        );
    }
    rt.destroy(&ctx.task_id).await.unwrap();
    assert!(matches!(
        rt.wait(&ctx.task_id).await,
        Err(RuntimeError::UnknownTask(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_task_reports_its_exit_code_signal_or_start_error() {
    let base = Base::new();
    let rt = Arc::new(exec_runtime(base.path()));

    let ctx = context(base.path(), &["sh", "-c", "exit 3"], &[]);
    rt.start(&ctx).await.unwrap();
    // Concurrent waiters all see the one status.
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            let rt = rt.clone();
            let id = ctx.task_id.clone();
            tokio::spawn(async move { wait(&rt, &id).await })
        })
        .collect();
    for waiter in waiters {
        assert_eq!(waiter.await.unwrap(), ExitStatus::Exited(3));
    }
    assert_eq!(
        rt.stop(&ctx.task_id, Duration::from_secs(1)).await.unwrap(),
        StopOutcome::AlreadyExited
    );

    let ctx = context(base.path(), &["sh", "-c", "kill -KILL $$"], &[]);
    rt.start(&ctx).await.unwrap();
    assert_eq!(
        wait(&rt, &ctx.task_id).await,
        ExitStatus::Signaled("SIGKILL".into())
    );

    let ctx = context(base.path(), &["no-such-program-here"], &[]);
    let prepared = rt.prepare(&ctx).await.unwrap_err();
    assert!(
        matches!(&prepared, RuntimeError::Start(m) if m.contains("not found")),
        "{prepared}"
    );
    let started = rt.start(&ctx).await.unwrap_err();
    assert!(
        matches!(&started, RuntimeError::Start(m) if m.contains("no-such-program-here")),
        "{started}"
    );
    assert!(matches!(
        rt.wait(&ctx.task_id).await,
        Err(RuntimeError::UnknownTask(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_stops_gracefully_or_is_killed_after_its_grace() {
    let base = Base::new();
    let rt = exec_runtime(base.path());

    let polite = context(
        base.path(),
        &[
            "sh",
            "-c",
            "trap 'exit 0' TERM; echo ready; while true; do sleep 0.1; done",
        ],
        &[],
    );
    rt.start(&polite).await.unwrap();
    // Only once the trap is set would a SIGTERM be caught.
    wait_for_output(&polite.stdout_path, "ready").await;
    let stats = rt.stats(&polite.task_id).await.unwrap();
    assert!(stats.memory_bytes > 0, "{stats:?}");
    let began = Instant::now();
    assert_eq!(
        rt.stop(&polite.task_id, Duration::from_secs(5))
            .await
            .unwrap(),
        StopOutcome::Graceful
    );
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "{:?}",
        began.elapsed()
    );
    assert_eq!(wait(&rt, &polite.task_id).await, ExitStatus::Exited(0));

    let stubborn = context(
        base.path(),
        &[
            "sh",
            "-c",
            "trap '' TERM; echo ready; while true; do sleep 0.1; done",
        ],
        &[],
    );
    rt.start(&stubborn).await.unwrap();
    wait_for_output(&stubborn.stdout_path, "ready").await;
    let grace = Duration::from_millis(300);
    let began = Instant::now();
    assert_eq!(
        rt.stop(&stubborn.task_id, grace).await.unwrap(),
        StopOutcome::Killed
    );
    let took = began.elapsed();
    assert!(
        took >= grace && took < grace + Duration::from_secs(2),
        "the kill came {took:?} after the stop, with a grace of {grace:?}"
    );
    assert_eq!(
        wait(&rt, &stubborn.task_id).await,
        ExitStatus::Signaled("SIGKILL".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_crash_ends_its_tasks_and_requests_and_the_plugin_is_restarted() {
    let base = Base::new();
    let rt = Arc::new(exec_runtime(base.path()));
    let ctx = context(
        base.path(),
        &[
            "sh",
            "-c",
            "trap '' TERM; echo ready; while true; do sleep 0.1; done",
        ],
        &[],
    );
    rt.start(&ctx).await.unwrap();
    wait_for_output(&ctx.stdout_path, "ready").await;
    let plugin = rt.plugin_pid().expect("the plugin is running");
    let task_pid: u32 = std::fs::read_to_string(ctx.dir.join("plugin-exec.pid"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();

    // A stop with a long grace is under way (the task ignores SIGTERM) when the plugin
    // dies: it must fail at once rather than after its grace or timeout.
    let stop = {
        let rt = rt.clone();
        let id = ctx.task_id.clone();
        tokio::spawn(async move { rt.stop(&id, Duration::from_secs(60)).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!stop.is_finished(), "the stop should wait out its grace");
    kill9(plugin);
    let killed = Instant::now();

    let stopped = tokio::time::timeout(T, stop).await.unwrap().unwrap();
    assert!(
        killed.elapsed() < Duration::from_secs(3),
        "{:?}",
        killed.elapsed()
    );
    let error = stopped.unwrap_err().to_string();
    assert!(
        error.contains("plugin exec crashed") && error.contains("stop"),
        "{error}"
    );
    match wait(&rt, &ctx.task_id).await {
        ExitStatus::Unknown(why) => {
            assert!(why.contains("plugin exec crashed"), "{why}");
            assert!(why.contains("SIGKILL"), "{why}");
        }
        other => panic!("expected an unknown status naming the crash, got {other:?}"),
    }

    // The task itself outlived the plugin (it has a session of its own); destroying it
    // goes to a restarted plugin, which finds it by its pid file and kills it.
    assert!(alive(task_pid), "the task died with the plugin");
    rt.destroy(&ctx.task_id).await.unwrap();
    wait_until_dead(task_pid).await;
    let restarted = rt.plugin_pid().expect("the plugin was restarted");
    assert_ne!(restarted, plugin);

    let ctx = context(base.path(), &["sh", "-c", "echo again"], &[]);
    rt.start(&ctx).await.unwrap();
    assert_eq!(wait(&rt, &ctx.task_id).await, ExitStatus::Exited(0));
    assert_eq!(
        std::fs::read_to_string(&ctx.stdout_path).unwrap(),
        "again\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_plugin_times_out_without_holding_up_another_runtime() {
    let base = Base::new();
    let good = exec_runtime(base.path());
    // Started now, so that its own start-up is not what gets measured below.
    good.fingerprint().await.unwrap();

    let mut cfg = config(base.path(), "silent", fixture("silent-plugin"));
    cfg.connect_timeout = Duration::from_millis(1500);
    let limit = cfg.connect_timeout;
    let silent = PluginRuntime::new(cfg);
    let hanging = tokio::spawn(async move {
        let began = Instant::now();
        let result = silent.fingerprint().await;
        (result, began.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(100)).await;

    let began = Instant::now();
    let ctx = context(base.path(), &["sh", "-c", "echo fine"], &[]);
    good.start(&ctx).await.unwrap();
    assert_eq!(wait(&good, &ctx.task_id).await, ExitStatus::Exited(0));
    let took = began.elapsed();
    assert!(
        !hanging.is_finished(),
        "the silent plugin's request should still be waiting"
    );
    assert!(
        took < Duration::from_secs(1),
        "a task on the good plugin took {took:?}"
    );

    let (result, took) = tokio::time::timeout(T, hanging).await.unwrap().unwrap();
    let error = result.unwrap_err().to_string();
    assert!(
        error.contains("plugin silent") && error.contains("did not answer hello"),
        "{error}"
    );
    assert!(
        took >= limit && took < limit + Duration::from_secs(2),
        "the silent plugin failed after {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_replying_plugin_fails_its_requests_without_holding_up_another_runtime() {
    let base = Base::new();
    let good = Arc::new(exec_runtime(base.path()));
    good.fingerprint().await.unwrap();

    let mut cfg = config(base.path(), "garbage", fixture("garbage-plugin"));
    cfg.request_timeout = Duration::from_millis(1000);
    cfg.start_timeout = Duration::from_millis(1000);
    let garbage = Arc::new(PluginRuntime::new(cfg));

    // A reply with the request's id but no result is a failure of that request at once,
    // not after the timeout.
    let began = Instant::now();
    let error = garbage.fingerprint().await.unwrap_err().to_string();
    assert!(
        error.contains("plugin garbage sent a malformed reply to fingerprint"),
        "{error}"
    );
    assert!(
        began.elapsed() < Duration::from_millis(900),
        "{:?}",
        began.elapsed()
    );
    let pid = garbage.plugin_pid().expect("the plugin is running");
    let error = garbage.list().await.unwrap_err().to_string();
    assert!(
        error.contains("plugin garbage sent a malformed reply to list"),
        "{error}"
    );

    // A start drowned in garbage gets no reply and times out, while the good runtime
    // goes on working.
    let ctx = context(base.path(), &["sh", "-c", "echo never"], &[]);
    let hanging = {
        let garbage = garbage.clone();
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let began = Instant::now();
            (garbage.start(&ctx).await, began.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let began = Instant::now();
    let fine = context(base.path(), &["sh", "-c", "echo fine"], &[]);
    good.start(&fine).await.unwrap();
    assert_eq!(wait(&good, &fine.task_id).await, ExitStatus::Exited(0));
    let took = began.elapsed();
    assert!(
        !hanging.is_finished(),
        "the garbage start should still be waiting"
    );
    assert!(
        took < Duration::from_millis(800),
        "the good task took {took:?}"
    );

    let (started, took) = tokio::time::timeout(T, hanging).await.unwrap().unwrap();
    let error = started.unwrap_err().to_string();
    assert!(
        error.contains("plugin garbage did not answer start within 1s"),
        "{error}"
    );
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // The plugin did send an exited event for the task, with a status nobody can read:
    // the task has ended all the same.
    match wait(&garbage, &ctx.task_id).await {
        ExitStatus::Unknown(why) => assert!(why.contains("unreadable exit status"), "{why}"),
        other => panic!("expected an unknown status, got {other:?}"),
    }
    // Garbage is no crash: the same plugin process is still serving.
    assert_eq!(garbage.plugin_pid(), Some(pid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fingerprint_comes_from_the_plugin() {
    let base = Base::new();
    let rt = exec_runtime(base.path());
    assert_eq!(rt.kind(), RuntimeKind::Plugin("exec".into()));
    let fingerprint = rt.fingerprint().await.unwrap();
    assert_eq!(fingerprint.kind, RuntimeKind::Plugin("exec".into()));
    assert_eq!(
        fingerprint.attributes.get("plugin").map(String::as_str),
        Some("exec")
    );
    assert_eq!(
        fingerprint.attributes.get("os").map(String::as_str),
        Some(std::env::consts::OS)
    );
    assert!(fingerprint.attributes.contains_key("python"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_outlives_its_plugin_and_is_re_adopted_by_the_next_one() {
    let base = Base::new();
    let first = exec_runtime(base.path());
    let ctx = context(
        base.path(),
        &[
            "sh",
            "-c",
            "trap 'exit 0' TERM; echo ready; while true; do sleep 0.1; done",
        ],
        &[],
    );
    first.start(&ctx).await.unwrap();
    wait_for_output(&ctx.stdout_path, "ready").await;
    let plugin = first.plugin_pid().expect("the plugin is running");
    first.shutdown().await;
    assert_eq!(first.plugin_pid(), None);
    assert!(!alive(plugin), "shutdown left the plugin running");
    let error = first.fingerprint().await.unwrap_err().to_string();
    assert!(error.contains("shut down"), "{error}");

    // As after an agent restart: a new runtime, a new plugin process.
    let second = exec_runtime(base.path());
    assert_eq!(second.recover(&ctx).await.unwrap(), Recovered::Adopted);
    assert_eq!(second.list().await.unwrap(), vec![ctx.task_id.clone()]);
    assert_eq!(
        second
            .stop(&ctx.task_id, Duration::from_secs(5))
            .await
            .unwrap(),
        StopOutcome::Graceful
    );
    // Not our child, so how it ended is unknown; but it has ended.
    match wait(&second, &ctx.task_id).await {
        ExitStatus::Unknown(why) => assert!(why.contains("exit status is unknown"), "{why}"),
        other => panic!("expected an unknown status, got {other:?}"),
    }

    let never = context(base.path(), &["true"], &[]);
    assert_eq!(second.recover(&never).await.unwrap(), Recovered::Gone);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_cannot_start_says_why() {
    let base = Base::new();
    let script = base.path().join("broken-plugin");
    std::fs::write(
        &script,
        "#!/bin/sh\necho 'cannot start: no config file' >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let rt = PluginRuntime::new(config(base.path(), "broken", script));
    let error = rt.fingerprint().await.unwrap_err().to_string();
    assert!(
        error.contains("plugin broken could not be started")
            && error.contains("exited with code 1")
            && error.contains("cannot start: no config file"),
        "{error}"
    );
    // Tried again (after the backoff) on the next request, and failing the same way.
    let error = rt.fingerprint().await.unwrap_err().to_string();
    assert!(error.contains("exited with code 1"), "{error}");

    let rt = PluginRuntime::new(config(
        base.path(),
        "missing",
        base.path().join("no-such-plugin"),
    ));
    let error = rt.fingerprint().await.unwrap_err().to_string();
    assert!(
        error.contains("plugin missing could not be started") && error.contains("no-such-plugin"),
        "{error}"
    );
}
