//! A job's runtime_env end to end, with a real controller, a real agent and real
//! processes: the environment a task sees, its config, its files and its Python
//! environment.

use drover_core::TaskState;
use drover_core::state::JobStatus;
use drover_testkit::{AgentOptions, TestCluster, digest_of};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The longest any single wait may take before the test fails instead of hanging.
const T: Duration = Duration::from_secs(60);

/// A Python environment build fetches from the package index, which takes longer.
const BUILD: Duration = Duration::from_secs(240);

fn sdk_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../sdk/python")
}

/// Runs a batch job to its end and returns its output, failing the test (with the
/// job's reason) when it does not succeed.
async fn output_of(api: &drover_testkit::Api, name: &str, yaml: &str, within: Duration) -> String {
    api.apply_yaml(yaml).await.unwrap();
    let (job, tasks) = api.wait_final(name, within).await.unwrap();
    assert_eq!(
        job.job.status,
        JobStatus::Complete,
        "{name}: {:?} {:?}",
        job.job,
        tasks.iter().map(|t| &t.task.reason).collect::<Vec<_>>()
    );
    api.logs(name).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_sees_only_its_declared_environment() {
    // The agent runs in this process, so this is the agent's own environment.
    // SAFETY: nextest runs each test in its own process, and no other thread of this
    // test reads the environment while it is changed, before the cluster starts.
    unsafe { std::env::set_var("DROVER_TEST_AGENT_SECRET", "hunter2") };
    let c = TestCluster::start().await.unwrap();
    let _agent = c.agent(AgentOptions::named("env")).await.unwrap();
    let api = c.api();
    let out = output_of(
        &api,
        "envs",
        r#"
name: envs
command: ["env"]
env: { FROM_JOB: "job", BOTH: "job" }
runtime_env:
  env: { FROM_RUNTIME_ENV: "yes", BOTH: "runtime_env" }
"#,
        T,
    )
    .await;
    let vars: Vec<(&str, &str)> = out.lines().filter_map(|l| l.split_once('=')).collect();
    let get = |k: &str| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| *v);
    assert_eq!(get("FROM_JOB"), Some("job"));
    assert_eq!(get("FROM_RUNTIME_ENV"), Some("yes"));
    assert_eq!(get("BOTH"), Some("runtime_env"), "runtime_env.env wins");
    assert_eq!(get("DROVER_JOB"), Some("envs"));
    assert!(get("DROVER_CONFIG").is_none(), "no config, no variable");
    assert!(!out.contains("hunter2"), "the agent's secret leaked: {out}");
    // A process task's HOME is its own directory, never the agent's.
    assert_eq!(get("HOME"), get("DROVER_TASK_DIR"), "{out}");
    // Nothing else: the declared variables, Drover's, a fixed PATH and that HOME (plus
    // what the shell adds for itself, which `env` as a direct child does not have).
    for (name, _) in &vars {
        assert!(
            name.starts_with("DROVER_")
                || ["FROM_JOB", "FROM_RUNTIME_ENV", "BOTH", "PATH", "HOME"].contains(name),
            "unexpected variable {name} in {out}"
        );
    }
}

/// A config with everything JSON can hold, and YAML's way of writing it.
const CONFIG_YAML: &str = r#"
    name: "ünïcødé ✓ 日本語"
    count: 42
    negative: -7
    big: 9007199254740993
    ratio: 0.1
    tiny: 1.5e-300
    flags: [true, false, null]
    nested:
      list: [1, "two", {three: 3}, [4, [5]]]
      empty_map: {}
      empty_list: []
      "key with spaces": "value: with colon"
"#;

fn config_json() -> serde_json::Value {
    serde_json::json!({
        "name": "ünïcødé ✓ 日本語",
        "count": 42,
        "negative": -7,
        "big": 9007199254740993u64,
        "ratio": 0.1,
        "tiny": 1.5e-300,
        "flags": [true, false, null],
        "nested": {
            "list": [1, "two", {"three": 3}, [4, [5]]],
            "empty_map": {},
            "empty_list": [],
            "key with spaces": "value: with colon",
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nested_config_round_trips_exactly_and_each_job_sees_its_own() {
    let c = TestCluster::start().await.unwrap();
    let _agent = c.agent(AgentOptions::named("config")).await.unwrap();
    let api = c.api();
    let yaml = format!(
        "name: conf\ncommand: [\"sh\", \"-c\", \"cat \\\"$DROVER_CONFIG\\\"\"]\nruntime_env:\n  config:{}",
        CONFIG_YAML.replace("\n    ", "\n      ")
    );
    let out = output_of(&api, "conf", &yaml, T).await;
    let got: serde_json::Value = serde_json::from_str(&out).expect("the file is JSON");
    assert_eq!(got, config_json(), "the file as the task read it: {out}");

    // The Python helper reads the same object in one call. (No bytecode is written,
    // since the helper lives in the source tree.)
    let py = format!(
        r#"
name: conf-py
env: {{ PYTHONDONTWRITEBYTECODE: "1" }}
command: ["python3", "-c", "import sys, json; sys.path.insert(0, '{}'); import drover_config; print(json.dumps([drover_config.load(), drover_config.from_socket(), drover_config.task_info()], ensure_ascii=False))"]
runtime_env:
  config:{}"#,
        sdk_dir().display(),
        CONFIG_YAML
    );
    let out = output_of(&api, "conf-py", &py, T).await;
    let got: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        got[0],
        config_json(),
        "through drover_config.py's file: {out}"
    );
    assert_eq!(got[1], config_json(), "over the task socket: {out}");
    let task = &api.tasks("conf-py").await.unwrap()[0].task;
    assert_eq!(got[2]["task_id"], task.id.as_str(), "{out}");
    assert_eq!(got[2]["job"], "conf-py", "{out}");

    // Two jobs, two configs: each task reads its own.
    for (job, value) in [("left", "L"), ("right", "R")] {
        api.apply_yaml(&format!(
            "name: {job}\ncommand: [\"sh\", \"-c\", \"cat \\\"$DROVER_CONFIG\\\"\"]\nruntime_env:\n  config: {{ side: {value} }}\n"
        ))
        .await
        .unwrap();
    }
    for (job, value) in [("left", "L"), ("right", "R")] {
        let (j, _) = api.wait_final(job, T).await.unwrap();
        assert_eq!(j.job.status, JobStatus::Complete);
        let got: serde_json::Value = serde_json::from_str(&api.logs(job).await.unwrap()).unwrap();
        assert_eq!(got, serde_json::json!({ "side": value }));
    }

    // A changed config makes a new version whose task reads the new one.
    let service = |v: u32| {
        format!(
            "name: svc\nkind: service\ncommand: [\"sh\", \"-c\", \"cat \\\"$DROVER_CONFIG\\\"; echo; exec sleep 60\"]\nruntime_env:\n  config: {{ version: {v} }}\n"
        )
    };
    api.apply_yaml(&service(1)).await.unwrap();
    api.wait_job("svc", T, |_, ts| {
        ts.iter().any(|t| t.task.state == TaskState::Running)
    })
    .await
    .unwrap();
    let applied = api.apply_yaml(&service(2)).await.unwrap();
    assert_eq!(applied.result, "rolling out version 2");
    let logs = drover_testkit::wait_for("the new config in the logs", T, async || {
        api.logs("svc")
            .await
            .is_ok_and(|l| l.contains(r#"{"version":2}"#))
    })
    .await;
    assert!(logs.is_ok(), "{:?}", api.logs("svc").await);
    let view = api.job("svc").await.unwrap();
    assert_eq!(view.job.version, 2);
    assert_eq!(
        view.job.spec.runtime_env.config,
        Some(serde_json::json!({ "version": 2 }))
    );
    api.stop("svc").await.unwrap();
}

/// A gzip'd tar archive with the given (path, content) entries, written with raw header
/// names so that paths the tar crate would refuse (`../x`) can be made.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_working_dir_is_unpacked_into_the_task_and_an_escaping_one_is_refused() {
    let c = TestCluster::start().await.unwrap();
    let agent = c.agent(AgentOptions::named("files")).await.unwrap();
    let api = c.api();

    let good = drover_testkit::tar_gz(&[
        (
            "app/run.sh",
            b"echo running from $(pwd | sed 's|.*/||')\ncat app/data.txt\n",
        ),
        ("app/data.txt", b"the data\n"),
    ]);
    let digest = digest_of(&good);
    let (status, body) = api.put_blob(&digest, good).await.unwrap();
    assert!(status == 200 || status == 201, "{status} {body}");
    let out = output_of(
        &api,
        "files",
        &format!(
            "name: files\ncommand: [\"sh\", \"app/run.sh\"]\nruntime_env: {{ working_dir: \"{digest}\" }}\n"
        ),
        T,
    )
    .await;
    assert!(out.contains("the data"), "{out}");
    let prepare = api.prepare_logs("files").await.unwrap();
    assert!(
        prepare.contains("working_dir unpacked: 2 files"),
        "{prepare}"
    );

    // A digest the controller does not have is refused at submission.
    let missing = digest_of(b"never uploaded");
    let err = api
        .apply_yaml(&format!(
            "name: nope\ncommand: [\"true\"]\nruntime_env: {{ working_dir: \"{missing}\" }}\n"
        ))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("runtime_env.working_dir") && err.contains("has not been uploaded"),
        "{err}"
    );

    // An archive that would write outside the task's directory fails the task, and
    // writes nothing anywhere, not even its harmless first entry.
    let evil = drover_testkit::tar_gz(&[("harmless.txt", b"x"), ("../../escaped.txt", b"gotcha")]);
    let digest = digest_of(&evil);
    api.put_blob(&digest, evil).await.unwrap();
    api.apply_yaml(&format!(
        "name: evil\ncommand: [\"true\"]\nrestart: {{ attempts: 0 }}\nruntime_env: {{ working_dir: \"{digest}\" }}\n"
    ))
    .await
    .unwrap();
    let (job, tasks) = api.wait_final("evil", T).await.unwrap();
    assert_eq!(job.job.status, JobStatus::Failed);
    let reason = &tasks[0].task.reason;
    assert!(
        reason.contains("runtime_env.working_dir") && reason.contains("../../escaped.txt"),
        "{reason}"
    );
    let data_dir = c.dir.path().join("agents").join("files");
    let found: Vec<PathBuf> = walk(c.dir.path())
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n == "escaped.txt" || n == "harmless.txt")
        })
        .collect();
    assert!(
        found.is_empty(),
        "written: {found:?} (agent data in {data_dir:?})"
    );
    drop(agent);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_pinning_different_versions_of_a_package_each_get_their_own_environment() {
    let c = TestCluster::start().await.unwrap();
    let agent = c.agent(AgentOptions::named("python")).await.unwrap();
    let api = c.api();
    let job = |name: &str, version: &str| {
        format!(
            r#"
name: {name}
command: ["python", "-c", "import six, sys; print(six.__version__, sys.prefix != sys.base_prefix)"]
runtime_env:
  python: {{ requirements: ["six=={version}"] }}
  setup_timeout: 200s
"#
        )
    };
    // Both at once, on one node.
    api.apply_yaml(&job("old-six", "1.15.0")).await.unwrap();
    api.apply_yaml(&job("new-six", "1.16.0")).await.unwrap();
    for (name, version) in [("old-six", "1.15.0"), ("new-six", "1.16.0")] {
        let (j, tasks) = api.wait_final(name, BUILD).await.unwrap();
        assert_eq!(
            j.job.status,
            JobStatus::Complete,
            "{name}: {:?} {}",
            j.job,
            tasks[0].task.reason
        );
        let out = api.logs(name).await.unwrap();
        assert_eq!(out.trim(), format!("{version} True"), "{name}");
        let prepare = api.prepare_logs(name).await.unwrap();
        assert!(
            !prepare.is_empty(),
            "{name}: the build's output is in the prepare log"
        );
    }
    let builds = agent.python_envs().builds();
    assert_eq!(builds, 2);
    // The same requirements again: the cached environment, no build.
    let out = output_of(&api, "old-six-again", &job("old-six-again", "1.15.0"), T).await;
    assert_eq!(out.trim(), "1.15.0 True");
    assert_eq!(agent.python_envs().builds(), builds, "it was rebuilt");
    assert_eq!(agent.python_envs().list().len(), 2);

    // A requirement that cannot be installed fails the task with pip's complaint.
    api.apply_yaml(
        r#"
name: broken
command: ["python", "-c", "pass"]
restart: { attempts: 0 }
runtime_env:
  python: { requirements: ["drover-no-such-package-zz9==1.0"] }
"#,
    )
    .await
    .unwrap();
    let (j, tasks) = api.wait_final("broken", BUILD).await.unwrap();
    assert_eq!(j.job.status, JobStatus::Failed);
    let reason = &tasks[0].task.reason;
    assert!(
        reason.contains("runtime_env.python") && reason.contains("drover-no-such-package-zz9"),
        "{reason}"
    );
}

/// A restarted agent that adopts a running task leases the task's Python environment
/// again, so a prune after the restart leaves it alone and the task can still import
/// from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopted_task_keeps_its_python_environment_through_a_prune() {
    let c = TestCluster::start().await.unwrap();
    let opts = AgentOptions::named("readopt");
    let data_dir = c.dir.path().join("agents").join(&opts.name);
    let agent = c.agent(opts.clone()).await.unwrap();
    let api = c.api();
    api.apply_yaml(
        r#"
name: held
restart: { attempts: 0 }
command: ["sh", "-c", "echo ready; while [ ! -e \"$DROVER_TASK_DIR/go\" ]; do sleep 0.1; done; python -c 'import six; print(six.__version__)'"]
runtime_env:
  python: { requirements: ["six==1.16.0"] }
  setup_timeout: 200s
"#,
    )
    .await
    .unwrap();
    let (_, tasks) = api.wait_running("held", BUILD).await.unwrap();
    let task_id = tasks[0].task.id.clone();
    assert_eq!(agent.python_envs().list()[0].in_use, 1);

    // The task's process outlives its agent; the new agent process adopts it.
    agent.shutdown().await;
    let agent = drover_testkit::start_agent(&c.url, data_dir.clone(), opts)
        .await
        .unwrap();
    // The adopted task's preparation is taken back in its own tokio task, just after
    // the agent starts.
    let start = std::time::Instant::now();
    loop {
        let envs = agent.python_envs().list();
        assert_eq!(envs.len(), 1, "{envs:?}");
        if envs[0].in_use == 1 {
            break;
        }
        assert!(
            start.elapsed() < T,
            "the adopted task does not lease its environment: {envs:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pruned = agent.python_envs().prune().await;
    assert!(
        pruned.is_empty(),
        "pruned an environment in use: {pruned:?}"
    );
    assert_eq!(agent.python_envs().list().len(), 1);

    std::fs::write(
        data_dir.join("tasks").join(task_id.to_string()).join("go"),
        b"",
    )
    .unwrap();
    // How the task ended is not checked: an in-process test agent runs tasks without
    // the shim that records an exit status for a later agent (the CLI tests cover
    // that), so only what the task printed after the prune is the proof.
    api.wait_final("held", T).await.unwrap();
    assert_eq!(api.logs("held").await.unwrap().trim(), "ready\n1.16.0");
    // Once the task has ended its lease is handed back, and a prune may remove it.
    wait_until_unused(&agent).await;
    assert_eq!(agent.python_envs().prune().await.len(), 1);
}

/// Waits until no task holds a Python environment of the agent's.
async fn wait_until_unused(agent: &drover_agent::Agent) {
    let start = std::time::Instant::now();
    while agent.python_envs().list().iter().any(|e| e.in_use > 0) {
        assert!(start.elapsed() < T, "an environment stays in use");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The Rust helper asks the agent's real task socket, and reads a job without a config
/// as `None`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_helper_reads_the_config_over_the_task_socket() {
    use drover_agent::socket::{TaskFacts, TaskSocket, socket_path};
    let dir = tempfile::tempdir().unwrap();
    let facts = |config| TaskFacts {
        task_id: "task-x".into(),
        job: "j".into(),
        job_id: "job-x".into(),
        project: "default".into(),
        index: 0,
        attempt: 0,
        config,
    };
    let path = socket_path(dir.path());
    let sock = TaskSocket::bind(&path, facts(Some(config_json()))).unwrap();
    let p = path.clone();
    let got: serde_json::Value =
        tokio::task::spawn_blocking(move || drover_config::load_from_socket_at(&p))
            .await
            .unwrap()
            .unwrap();
    assert_eq!(got, config_json());
    drop(sock);

    let _sock = TaskSocket::bind(&path, facts(None)).unwrap();
    let p = path.clone();
    let none: Option<serde_json::Value> =
        tokio::task::spawn_blocking(move || drover_config::load_from_socket_at(&p))
            .await
            .unwrap()
            .unwrap();
    assert_eq!(none, None);
}
