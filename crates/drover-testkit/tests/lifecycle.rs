//! Task lifecycle end to end: a real controller, real agents, real processes.

use drover_core::TaskState;
use drover_core::state::JobStatus;
use drover_testkit::{AgentOptions, TestCluster, wait_for};
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

async fn cluster_with_agent() -> (TestCluster, drover_agent::Agent) {
    let c = TestCluster::start().await.unwrap();
    let a = c.agent(AgentOptions::named("n1")).await.unwrap();
    let api = c.api();
    wait_for("the agent to register", T, async || {
        api.nodes().await.map(|n| n.len() == 1).unwrap_or(false)
    })
    .await
    .unwrap();
    (c, a)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_job_runs_every_task_with_its_index_and_variables() {
    let (c, _a) = cluster_with_agent().await;
    let api = c.api();
    api.apply_yaml(
        r#"
name: hello
count: 3
command: ["sh", "-c", "echo task=$DROVER_TASK_INDEX job=$DROVER_JOB greeting=$GREETING id=$DROVER_TASK_ID"]
env: { GREETING: bonjour }
"#,
    )
    .await
    .unwrap();
    let (job, tasks) = api.wait_final("hello", T).await.unwrap();
    assert_eq!(job.job.status, JobStatus::Complete);
    assert_eq!(tasks.len(), 3);
    let logs = api.logs("hello").await.unwrap();
    for t in &tasks {
        let line = format!(
            "task={} job=hello greeting=bonjour id={}",
            t.task.index, t.task.id
        );
        assert!(logs.contains(&line), "missing {line:?} in {logs:?}");
        assert_eq!(t.task.state, TaskState::Succeeded);
        assert_eq!(t.task.exit.as_ref().and_then(|e| e.code), Some(0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_batch_task_is_retried_then_fails_the_job_with_its_exit_code() {
    let (c, _a) = cluster_with_agent().await;
    let api = c.api();
    api.apply_yaml(
        r#"
name: flaky
command: ["sh", "-c", "echo attempt $DROVER_TASK_ATTEMPT; exit 3"]
restart: { attempts: 2, delay: 50ms }
"#,
    )
    .await
    .unwrap();
    let (job, tasks) = api.wait_final("flaky", T).await.unwrap();
    assert_eq!(job.job.status, JobStatus::Failed);
    assert_eq!(job.job.exit.as_ref().and_then(|e| e.code), Some(3));
    assert!(
        job.job.reason.contains("failed after 3 attempts"),
        "{}",
        job.job.reason
    );
    assert!(
        job.job.reason.contains("exited with code 3"),
        "{}",
        job.job.reason
    );
    assert_eq!(tasks.len(), 3, "one try and two retries");
    let logs = api.logs("flaky").await.unwrap();
    for n in 0..3 {
        assert!(logs.contains(&format!("attempt {n}")), "{logs}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_that_succeeds_completes_the_job() {
    let (c, _a) = cluster_with_agent().await;
    let api = c.api();
    // Fails on the first attempt only.
    api.apply_yaml(
        r#"
name: second-time
command: ["sh", "-c", "test $DROVER_TASK_ATTEMPT -ge 1"]
restart: { attempts: 3, delay: 50ms }
"#,
    )
    .await
    .unwrap();
    let (job, tasks) = api.wait_final("second-time", T).await.unwrap();
    assert_eq!(job.job.status, JobStatus::Complete);
    assert_eq!(
        tasks
            .iter()
            .filter(|t| t.task.state == TaskState::Failed)
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_task_is_restarted_when_it_exits() {
    let (c, _a) = cluster_with_agent().await;
    let api = c.api();
    api.apply_yaml(
        r#"
name: blinker
kind: service
command: ["sh", "-c", "echo up; sleep 0.2"]
restart: { delay: 50ms, max_delay: 100ms }
"#,
    )
    .await
    .unwrap();
    api.wait_job("blinker", T, |_, t| {
        t.iter()
            .filter(|t| t.task.state == TaskState::Succeeded)
            .count()
            >= 2
    })
    .await
    .unwrap();
    api.stop("blinker").await.unwrap();
    let (job, tasks) = api.wait_final("blinker", T).await.unwrap();
    assert_eq!(job.job.status, JobStatus::Stopped);
    assert!(tasks.iter().all(|t| t.task.index == 0));
    assert!(tasks.iter().map(|t| t.task.attempt).max().unwrap() >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_sends_sigterm_and_records_it() {
    let (c, _a) = cluster_with_agent().await;
    let api = c.api();
    api.apply_yaml("name: sleepy\nkind: service\ncommand: [sleep, '30']\nstop_grace: 5s\n")
        .await
        .unwrap();
    api.wait_running("sleepy", T).await.unwrap();
    let started = std::time::Instant::now();
    api.stop("sleepy").await.unwrap();
    let (_, tasks) = api.wait_final("sleepy", T).await.unwrap();
    let t = &tasks[0].task;
    assert_eq!(t.state, TaskState::Stopped);
    assert_eq!(
        t.exit.as_ref().and_then(|e| e.signal.clone()).as_deref(),
        Some("SIGTERM")
    );
    assert!(t.reason.contains("ended after SIGTERM"), "{}", t.reason);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "a graceful stop must not wait out the grace period"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_that_ignores_sigterm_is_killed_after_the_grace_period() {
    let (c, _a) = cluster_with_agent().await;
    let api = c.api();
    api.apply_yaml(
        r#"
name: stubborn
kind: service
command: ["sh", "-c", "trap '' TERM; echo ready; while true; do sleep 0.05; done"]
stop_grace: 700ms
"#,
    )
    .await
    .unwrap();
    api.wait_running("stubborn", T).await.unwrap();
    wait_for("the task to print ready", T, async || {
        api.logs("stubborn")
            .await
            .map(|l| l.contains("ready"))
            .unwrap_or(false)
    })
    .await
    .unwrap();
    let started = std::time::Instant::now();
    api.stop("stubborn").await.unwrap();
    let (_, tasks) = api.wait_final("stubborn", T).await.unwrap();
    let elapsed = started.elapsed();
    let t = &tasks[0].task;
    assert_eq!(t.state, TaskState::Stopped);
    assert_eq!(
        t.exit.as_ref().and_then(|e| e.signal.clone()).as_deref(),
        Some("SIGKILL")
    );
    assert!(t.reason.contains("SIGKILL"), "{}", t.reason);
    assert!(
        elapsed >= Duration::from_millis(700),
        "killed before the grace period ended: {elapsed:?}"
    );
}

/// Kills a task's process group when the test ends, so that a task which ignores SIGTERM
/// does not outlive a failed test.
struct KillGroupOnDrop(u32);

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-9", "--", &format!("-{}", self.0)])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// A task that ignores SIGTERM and has an hour's grace cannot be ended by a plain stop
/// in any useful time; a forced stop kills it at once, even while it is already stopping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_stop_kills_a_task_already_stopping_under_a_long_grace() {
    let (c, _a) = cluster_with_agent().await;
    let api = c.api();
    api.apply_yaml(
        r#"
name: deaf
kind: service
command: ["sh", "-c", "trap '' TERM; echo ready $$; while true; do sleep 0.1; done"]
stop_grace: 1h
"#,
    )
    .await
    .unwrap();
    wait_for("the task to print ready", T, async || {
        api.logs("deaf")
            .await
            .map(|l| l.contains("ready"))
            .unwrap_or(false)
    })
    .await
    .unwrap();
    let logs = api.logs("deaf").await.unwrap();
    let pid: u32 = logs.trim().trim_start_matches("ready ").parse().unwrap();
    let _reaper = KillGroupOnDrop(pid);
    api.stop("deaf").await.unwrap();
    api.wait_job("deaf", T, |_, t| t[0].task.state == TaskState::Stopping)
        .await
        .unwrap();
    // The trap holds: a plain stop leaves it stopping.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let tasks = api.tasks("deaf").await.unwrap();
    assert_eq!(tasks[0].task.state, TaskState::Stopping, "{:?}", tasks[0]);

    // A malformed force is refused, naming the parameter, and changes nothing.
    for (query, needle) in [
        ("force=yes", "force: expected true or false, got \"yes\""),
        ("forse=true", "query parameter \"forse\": unknown"),
    ] {
        let path = format!("/v1/jobs/deaf/stop?{query}");
        let (status, text) = api.raw(reqwest::Method::POST, &path, None).await.unwrap();
        assert_eq!(status, 400, "{query}: {text}");
        let err: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(
            err["error"].as_str().unwrap_or("").contains(needle),
            "{query}: {text}"
        );
    }
    let tasks = api.tasks("deaf").await.unwrap();
    assert_eq!(tasks[0].task.state, TaskState::Stopping, "{:?}", tasks[0]);

    let started = std::time::Instant::now();
    api.stop_forced("deaf").await.unwrap();
    let (_, tasks) = api.wait_final("deaf", T).await.unwrap();
    let elapsed = started.elapsed();
    let t = &tasks[0].task;
    assert_eq!(t.state, TaskState::Stopped);
    assert_eq!(
        t.exit.as_ref().and_then(|e| e.signal.clone()).as_deref(),
        Some("SIGKILL")
    );
    assert!(
        t.reason.contains("forced") && t.reason.contains("killed with SIGKILL at once"),
        "{}",
        t.reason
    );
    assert!(
        elapsed < Duration::from_secs(5),
        "the forced stop took {elapsed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_own_environment_does_not_leak_into_tasks() {
    // The agent runs in this process, so this variable is in the agent's environment.
    // SAFETY: set before any task is started; no other thread of this test reads it.
    unsafe { std::env::set_var("AGENT_ONLY_SECRET", "hunter2") };
    let (c, _a) = cluster_with_agent().await;
    let api = c.api();
    api.apply_yaml("name: envcheck\ncommand: [sh, -c, 'env']\nenv: { DECLARED: yes }\n")
        .await
        .unwrap();
    api.wait_final("envcheck", T).await.unwrap();
    let logs = api.logs("envcheck").await.unwrap();
    assert!(logs.contains("DECLARED=yes"), "{logs}");
    assert!(logs.contains("DROVER_TASK_INDEX=0"), "{logs}");
    assert!(
        !logs.contains("hunter2"),
        "the agent's secret leaked: {logs}"
    );
    // A process task's HOME is its own directory, never the agent's.
    let var = |name: &str| {
        logs.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .map(str::to_string)
    };
    assert_eq!(var("HOME"), var("DROVER_TASK_DIR"), "{logs}");
    let names: Vec<&str> = logs
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .collect();
    for n in names {
        assert!(
            n.starts_with("DROVER_")
                || ["DECLARED", "PATH", "HOME", "PWD", "SHLVL", "_"].contains(&n),
            "unexpected variable {n} in {logs}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_program_fails_the_task_with_a_clear_reason() {
    let (c, _a) = cluster_with_agent().await;
    let api = c.api();
    api.apply_yaml("name: typo\ncommand: [no-such-program-xyz]\nrestart: { attempts: 0 }\n")
        .await
        .unwrap();
    let (job, tasks) = api.wait_final("typo", T).await.unwrap();
    assert_eq!(job.job.status, JobStatus::Failed);
    assert!(
        tasks[0].task.reason.contains("no-such-program-xyz"),
        "{}",
        tasks[0].task.reason
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reapplying_a_changed_spec_replaces_the_tasks_and_an_unchanged_one_does_nothing() {
    let (c, _a) = cluster_with_agent().await;
    let api = c.api();
    let v1 = "name: web\nkind: service\ncommand: [sleep, '30']\nstop_grace: 1s\n";
    assert_eq!(api.apply_yaml(v1).await.unwrap().result, "created");
    api.wait_running("web", T).await.unwrap();
    assert_eq!(api.apply_yaml(v1).await.unwrap().result, "unchanged");
    let v2 = "name: web\nkind: service\ncommand: [sleep, '31']\nstop_grace: 1s\n";
    let r = api.apply_yaml(v2).await.unwrap();
    assert_eq!(r.result, "rolling out version 2");
    assert_eq!(r.job.job.version, 2);
    api.wait_job("web", T, |j, t| {
        j.job.version == 2 && t.iter().any(|t| t.task.state == TaskState::Running)
    })
    .await
    .unwrap();
    api.stop("web").await.unwrap();
    api.wait_final("web", T).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_a_job_stops_every_one_of_its_tasks() {
    let (c, _a) = cluster_with_agent().await;
    let api = c.api();
    api.apply_yaml(
        r#"
name: pair
kind: service
count: 2
command: ["sh", "-c", "trap 'echo got term; exit 0' TERM; echo started; while true; do sleep 0.1; done"]
stop_grace: 3s
"#,
    )
    .await
    .unwrap();
    api.wait_job("pair", T, |_, t| {
        t.iter()
            .filter(|t| t.task.state == TaskState::Running)
            .count()
            == 2
    })
    .await
    .unwrap();
    wait_for("both tasks to print", T, async || {
        api.logs("pair")
            .await
            .map(|l| l.matches("started").count() == 2)
            .unwrap_or(false)
    })
    .await
    .unwrap();
    api.stop("pair").await.unwrap();
    let (_, tasks) = api
        .wait_final("pair", Duration::from_secs(10))
        .await
        .unwrap();
    for t in tasks {
        assert_eq!(t.task.state, TaskState::Stopped, "{:?}", t.task);
        assert_eq!(
            t.task.exit.as_ref().and_then(|e| e.code),
            Some(0),
            "{:?}",
            t.task
        );
    }
}

/// A prepare or start that overruns the agent's limit fails the task with a reason
/// naming the step, well before the step itself would have finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prepare_or_start_that_overruns_its_deadline_fails_the_task() {
    let short = Duration::from_millis(300);
    let cases = [
        (
            drover_agent::TaskLimits {
                prepare_timeout: short,
                ..Default::default()
            },
            "prepare_latency: 5s",
            "prepare did not finish within",
        ),
        (
            drover_agent::TaskLimits {
                start_timeout: short,
                ..Default::default()
            },
            "start_latency: 5s",
            "start did not finish within",
        ),
    ];
    let c = TestCluster::start().await.unwrap();
    let api = c.api();
    for (i, (limits, script, want)) in cases.into_iter().enumerate() {
        let mut opts = AgentOptions::named(&format!("slow-{i}")).label("case", &i.to_string());
        opts.limits = Some(limits);
        let _a = c.agent(opts).await.unwrap();
        let name = format!("hangs-{i}");
        api.apply_yaml(&format!(
            "name: {name}\nruntime: mock\nmock: {{ {script} }}\nrestart: {{ attempts: 0 }}\nconstraints: [{{ key: label.case, value: '{i}' }}]\n"
        ))
        .await
        .unwrap();
        let started = std::time::Instant::now();
        let (job, tasks) = api.wait_final(&name, T).await.unwrap();
        assert_eq!(job.job.status, JobStatus::Failed, "{script}");
        assert!(
            tasks[0].task.reason.contains(want),
            "{script}: {}",
            tasks[0].task.reason
        );
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{script}: the deadline, not the step, ended it"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_past_the_log_size_cap_is_rotated_on_the_node_and_kept_whole_on_the_controller() {
    let c = TestCluster::start().await.unwrap();
    let mut opts = AgentOptions::named("n1");
    opts.limits = Some(drover_agent::TaskLimits {
        log_max_bytes: 4096,
        // The node's copy of the logs is inspected after the task ends.
        keep_finished_for: Duration::from_secs(60),
        ..Default::default()
    });
    let _a = c.agent(opts).await.unwrap();
    let api = c.api();
    // 2,000 numbered lines (about 20 KB) at a pace the shipper keeps up with, so each
    // file fills, is shipped and is rotated several times.
    api.apply_yaml(
        "name: chatty\ncommand: [sh, -c, 'i=0; while [ $i -lt 2000 ]; do echo line-$i; i=$((i+1)); if [ $((i % 200)) -eq 0 ]; then sleep 0.2; fi; done']\n",
    )
    .await
    .unwrap();
    let (job, tasks) = api.wait_final("chatty", T).await.unwrap();
    assert_eq!(job.job.status, JobStatus::Complete);
    let logs = api.logs("chatty").await.unwrap();
    let lines: Vec<&str> = logs.lines().collect();
    let expected: Vec<String> = (0..2000).map(|i| format!("line-{i}")).collect();
    assert_eq!(lines, expected, "every line, once, in order");
    let dir = c
        .dir
        .path()
        .join("agents/n1/tasks")
        .join(tasks[0].task.id.as_str());
    assert!(
        dir.join("stdout.log.1").exists(),
        "the node's copy was rotated"
    );
    assert!(std::fs::metadata(dir.join("stdout.log")).unwrap().len() < 8192);
}
