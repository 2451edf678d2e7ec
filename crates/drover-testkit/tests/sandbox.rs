//! What keeps process tasks apart on a node and stops them from outliving their end,
//! with a real controller, a real agent and real processes: each task runs as a user of
//! its own, with a `/proc` that shows only its own processes, in a cgroup of its own
//! that enforces its memory and CPU and is killed whole when it ends.
//!
//! These need root (to switch users and make cgroups), as CI has; run otherwise, each
//! test prints why it did nothing and passes.

use drover_core::auth::Role;
use drover_core::state::JobStatus;
use drover_testkit::{AgentOptions, Api, TestCluster};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The longest any single wait may take before the test fails instead of hanging.
const T: Duration = Duration::from_secs(60);

/// A Python environment build fetches from the package index, which takes longer.
const BUILD: Duration = Duration::from_secs(240);

/// Whether this test process runs as root; `/proc/self` belongs to the caller.
fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Skips the calling test, saying why, unless it runs as root.
macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("skipped: needs root (tasks run as other users and get cgroups only then)");
            return;
        }
    };
}

/// The data dir of the test agent `name`.
fn agent_dir(c: &TestCluster, name: &str) -> PathBuf {
    c.dir.path().join("agents").join(name)
}

/// Creates `project` and returns a client with a write token of it.
async fn project_api(c: &TestCluster, project: &str) -> Api {
    let admin = c.api();
    admin.create_project(project).await.unwrap();
    let token = admin.create_token(project, Role::Write).await.unwrap();
    Api::new(&c.url, &token.token)
}

/// The pids of every process whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<i32> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(marker) {
            found.push(pid);
        }
    }
    found
}

/// The directories of the cgroups `pid` is in, in each v1 hierarchy mounted under
/// /sys/fs/cgroup or in the unified one, leaving out the root cgroups.
fn cgroup_dirs(pid: i32) -> Vec<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            if !path.contains("/drover/") {
                return None;
            }
            let path = path.trim_start_matches('/');
            let controller = controllers.split(',').next().unwrap_or("");
            let dir = if controller.is_empty() {
                Path::new("/sys/fs/cgroup").join(path)
            } else {
                Path::new("/sys/fs/cgroup").join(controller).join(path)
            };
            dir.is_dir().then_some(dir)
        })
        .collect()
}

/// Two projects' tasks on one node: B's task looks everywhere a neighbour's secrets
/// could be (every process's environment, the sibling task directories, A's directory,
/// its config and logs) and finds nothing of A; it cannot write into the artifact
/// cache, the Python environments or its own installed artifact either. Everything a
/// task needs of its own (its directory, config, socket, artifact, Python environment)
/// still works as its own user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_finds_nothing_of_another_projects_task_on_the_same_node() {
    require_root!();
    let c = TestCluster::start().await.unwrap();
    let _agent = c
        .agent(AgentOptions {
            mock: false,
            ..AgentOptions::named("shared")
        })
        .await
        .unwrap();
    let data = agent_dir(&c, "shared");
    let alpha = project_api(&c, "alpha").await;
    let beta = project_api(&c, "beta").await;

    // A holds a secret in its environment, its config and its own output, and keeps
    // running while B looks.
    alpha
        .apply_yaml(
            r#"
name: holder
kind: service
command: ["sh", "-c", "echo \"$SECRET\"; cat \"$DROVER_CONFIG\"; echo; echo ready; exec sleep 120"]
env: { SECRET: alpha-env-s3cr3t }
runtime_env:
  config: { password: alpha-config-s3cr3t }
"#,
        )
        .await
        .unwrap();
    alpha.wait_running("holder", T).await.unwrap();
    drover_testkit::wait_for("A's output", T, async || {
        alpha
            .logs("holder")
            .await
            .unwrap_or_default()
            .contains("ready")
    })
    .await
    .unwrap();
    let a_out = alpha.logs("holder").await.unwrap();
    assert!(
        a_out.contains("alpha-env-s3cr3t") && a_out.contains("alpha-config-s3cr3t"),
        "A sees its own secrets: {a_out}"
    );
    let a_task = alpha.tasks("holder").await.unwrap()[0].task.id.clone();
    let a_dir = data.join("tasks").join(a_task.as_str());

    beta.push_artifact("tool", &[("any", b"#!/bin/sh\necho tool ran\n".as_slice())])
        .await
        .unwrap();
    let probe = format!(
        r#"
echo "ids $(id -u) $(id -g) [$(id -G)]"
echo "home $HOME"
for f in /proc/[0-9]*/environ; do tr '\0' '\n' < "$f" 2>/dev/null; done | grep s3cr3t
echo "pids seen: $(ls /proc | grep -c '^[0-9]')"
ls -a "$DROVER_TASK_DIR/.." 2>&1
for d in "$DROVER_TASK_DIR"/../*/; do cat "$d/config.json" "$d/stdout.log" 2>&1; done
ls -a {a_dir} 2>&1
cat {a_dir}/config.json {a_dir}/stdout.log {a_dir}/task.json 2>&1
echo x > {data}/artifacts/planted 2>/dev/null && echo WROTE the artifact cache
ls {data}/artifacts 2>&1
echo x > {data}/envs/python/planted 2>/dev/null && echo WROTE the env cache
echo x >> "$VIRTUAL_ENV/bin/python" 2>/dev/null && echo WROTE the python env
touch "$VIRTUAL_ENV/planted" 2>/dev/null && echo WROTE the python env dir
echo x >> "$DROVER_ARTIFACT" 2>/dev/null && echo WROTE the artifact
chmod u+w "$DROVER_ARTIFACT" 2>/dev/null && echo CHMOD the artifact
"$DROVER_ARTIFACT"
python -c "import six; print('six', six.__version__)"
echo mine > own-file && cat own-file
cat "$DROVER_CONFIG"; echo
python -c "
import json, os, socket
s = socket.socket(socket.AF_UNIX); s.connect(os.environ['DROVER_SOCKET'])
s.sendall(b'{{\"op\":\"info\"}}\n'); print('socket', json.loads(s.makefile().readline())['project'])
"
echo probe done
"#,
        a_dir = a_dir.display(),
        data = data.display(),
    );
    let spec = serde_json::json!({
        "name": "prober",
        "command": ["sh", "-c", probe],
        "artifact": "tool:1",
        "runtime_env": {
            "config": { "mine": "beta-config" },
            "python": { "requirements": ["six==1.16.0"] },
            "setup_timeout": "200s",
        },
    });
    let (status, body) = beta
        .raw(
            reqwest::Method::POST,
            "/v1/jobs",
            Some(serde_json::to_vec(&spec).unwrap()),
        )
        .await
        .unwrap();
    assert!((200..300).contains(&status), "{status} {body}");
    let (job, tasks) = beta.wait_final("prober", BUILD).await.unwrap();
    let out = beta.logs("prober").await.unwrap();
    assert_eq!(
        job.job.status,
        JobStatus::Complete,
        "{:?} {:?}\n{out}",
        job.job,
        tasks[0].task.reason
    );
    assert!(out.contains("probe done"), "{out}");
    assert!(!out.contains("s3cr3t"), "B found A's secrets:\n{out}");
    assert!(!out.contains("WROTE"), "B wrote into shared caches:\n{out}");
    assert!(
        !out.contains("CHMOD"),
        "B made its artifact writable:\n{out}"
    );
    // B runs as a user of its own, with a private group and no other.
    let ids = out.lines().find(|l| l.starts_with("ids ")).unwrap();
    let fields: Vec<&str> = ids.split_whitespace().collect();
    let uid: u32 = fields[1].parse().unwrap();
    assert!((200_000..=265_535).contains(&uid), "{ids}");
    assert_eq!(fields[2], fields[1], "{ids}");
    assert_eq!(ids.split_once('[').unwrap().1, format!("{uid}]"), "{ids}");
    // Its /proc shows its own few processes, not the node's.
    let seen: usize = out
        .lines()
        .find_map(|l| l.strip_prefix("pids seen: "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(seen < 10, "B sees {seen} processes:\n{out}");
    // Its own things all work as its own user.
    for own in [
        "tool ran",
        "six 1.16.0",
        "mine\n",
        "beta-config",
        "socket beta",
        &format!("home {}", data.join("tasks").display()),
    ] {
        assert!(out.contains(own), "{own:?} missing:\n{out}");
    }
    // Nothing was planted where A (or the agent) would find it.
    assert!(!data.join("artifacts/planted").exists());
    assert!(!data.join("envs/python/planted").exists());

    // The node says how its process tasks are kept apart.
    let nodes = c.api().nodes().await.unwrap();
    let attrs = &nodes[0].node.info.attributes;
    assert!(attrs["process.isolation"].starts_with("user"), "{attrs:?}");
    alpha.stop("holder").await.unwrap();
}

/// A process a task detaches from its session (`setsid ... &`) is still the task's: it
/// is gone as soon as the task is reported stopped, and gone when a task that left it
/// behind ends by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_a_task_started_outlives_it() {
    require_root!();
    let c = TestCluster::start().await.unwrap();
    let _agent = c
        .agent(AgentOptions {
            mock: false,
            ..AgentOptions::named("n")
        })
        .await
        .unwrap();
    let api = c.api();
    let stopped_marker = format!("drover-detached-{}", std::process::id());
    api.apply_yaml(&format!(
        r#"
name: detacher
kind: service
command: ["sh", "-c", "setsid sh -c 'sleep 1000; echo {stopped_marker}' & echo started; exec sleep 1000"]
"#
    ))
    .await
    .unwrap();
    drover_testkit::wait_for("the detached process", T, async || {
        !processes_with(&stopped_marker).is_empty()
    })
    .await
    .unwrap();
    api.stop("detacher").await.unwrap();
    let (job, _) = api.wait_final("detacher", T).await.unwrap();
    assert_eq!(job.job.status, JobStatus::Stopped, "{:?}", job.job);
    let left = processes_with(&stopped_marker);
    assert!(left.is_empty(), "still running after the stop: {left:?}");

    // A batch task that exits 0 with a detached process still running.
    let ended_marker = format!("drover-left-behind-{}", std::process::id());
    api.apply_yaml(&format!(
        r#"
name: leaver
command: ["sh", "-c", "setsid sh -c 'sleep 1000; echo {ended_marker}' & sleep 0.5; echo bye"]
"#
    ))
    .await
    .unwrap();
    let (job, _) = api.wait_final("leaver", T).await.unwrap();
    assert_eq!(job.job.status, JobStatus::Complete, "{:?}", job.job);
    let left = processes_with(&ended_marker);
    assert!(
        left.is_empty(),
        "still running after the task ended: {left:?}"
    );
}

/// `resources.memory` is a limit, not only a reservation: a task that allocates far
/// more is killed, and its reason says it ran out of memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_past_its_memory_limit_is_killed_out_of_memory() {
    require_root!();
    let c = TestCluster::start().await.unwrap();
    let _agent = c
        .agent(AgentOptions {
            mock: false,
            ..AgentOptions::named("n")
        })
        .await
        .unwrap();
    let api = c.api();
    api.apply_yaml(
        r#"
name: hog
command: ["python3", "-c", "x = b'\\x01' * (300 << 20); print('allocated', len(x))"]
resources: { memory: 32Mi }
"#,
    )
    .await
    .unwrap();
    let (job, tasks) = api.wait_final("hog", T).await.unwrap();
    let out = api.logs("hog").await.unwrap();
    assert_eq!(job.job.status, JobStatus::Failed, "{:?}\n{out}", job.job);
    let reason = &tasks[0].task.reason;
    assert!(reason.contains("out of memory"), "{reason}");
    assert!(!out.contains("allocated"), "{out}");
}

/// `resources.cpu` is a quota: a task that spins for a second of wall time on a fifth
/// of a core gets about a fifth of a second of CPU, not the whole second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_gets_no_more_cpu_than_its_quota() {
    require_root!();
    let c = TestCluster::start().await.unwrap();
    let _agent = c
        .agent(AgentOptions {
            mock: false,
            ..AgentOptions::named("n")
        })
        .await
        .unwrap();
    let api = c.api();
    api.apply_yaml(
        r#"
name: spinner
command: ["python3", "-c", "import os, time\nt = time.time()\nwhile time.time() - t < 1.5: pass\nprint('cpu', os.times().user + os.times().system)"]
resources: { cpu: 0.2 }
"#,
    )
    .await
    .unwrap();
    let (job, _) = api.wait_final("spinner", T).await.unwrap();
    let out = api.logs("spinner").await.unwrap();
    assert_eq!(job.job.status, JobStatus::Complete, "{:?}\n{out}", job.job);
    let cpu: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("cpu "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Unlimited, it would use about 1.5 s; at 0.2 of a core about 0.3 s.
    assert!(
        cpu < 0.7,
        "used {cpu} s of CPU in 1.5 s on a 0.2 core quota"
    );
}

/// A task the agent no longer knows of after a restart (its directory gone) is an
/// orphan: its cgroup, and everything still running in it, is removed when the agent
/// starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphaned_cgroup_is_removed_when_the_agent_starts() {
    require_root!();
    let c = TestCluster::start().await.unwrap();
    let opts = AgentOptions {
        mock: false,
        ..AgentOptions::named("n")
    };
    let agent = c.agent(opts.clone()).await.unwrap();
    let api = c.api();
    let marker = format!("drover-orphan-{}", std::process::id());
    api.apply_yaml(&format!(
        r#"
name: orphan
kind: service
command: ["sh", "-c", "setsid sh -c 'sleep 1000; echo {marker}' & exec sleep 1000"]
"#
    ))
    .await
    .unwrap();
    drover_testkit::wait_for("the orphan's process", T, async || {
        !processes_with(&marker).is_empty()
    })
    .await
    .unwrap();
    let pid = processes_with(&marker)[0];
    let cgroups = cgroup_dirs(pid);
    assert!(!cgroups.is_empty(), "the task is in no cgroup of Drover's");
    let task = api.tasks("orphan").await.unwrap()[0].task.id.clone();
    agent.shutdown().await;
    // The agent left the task running, as after a crash; now it loses its record.
    std::fs::remove_dir_all(agent_dir(&c, "n").join("tasks").join(task.as_str())).unwrap();
    let _agent = c.agent(opts).await.unwrap();
    let left = processes_with(&marker);
    assert!(left.is_empty(), "the orphan still runs: {left:?}");
    for dir in cgroups {
        assert!(!dir.exists(), "{} was left behind", dir.display());
    }
}
