//! What the controller keeps and for how long: capped task output, finished jobs and
//! their logs removed after their retention, lost nodes removed on their own, and
//! `DELETE /v1/nodes/{node}` for a node an admin knows is gone. Against a real
//! controller with its SQLite store, real process tasks and a fake agent where the test
//! must control exactly what a node says.

use drover_controller::Retention;
use drover_core::TaskState;
use drover_core::protocol::AgentMessage;
use drover_core::state::JobStatus;
use drover_testkit::fake_agent::{FakeAgent, event};
use drover_testkit::*;
use std::path::Path;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

/// Bytes of the regular files under `path`.
fn disk_usage(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if meta.is_file() {
        return meta.len();
    }
    std::fs::read_dir(path)
        .map(|entries| entries.flatten().map(|e| disk_usage(&e.path())).sum())
        .unwrap_or(0)
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_writes_without_end_keeps_only_its_latest_output() {
    let c = TestCluster::start().await.unwrap();
    let _agent = c.agent(AgentOptions::named("n1")).await.unwrap();
    let api = c.api();
    // About 2.3 MB of numbered lines against a cap of 256 KiB per stream.
    api.apply_yaml("name: chatty\ncommand: [seq, 1, 300000]\nlogs:\n  max_size: 256Ki\n")
        .await
        .unwrap();
    let (job, tasks) = api.wait_final("chatty", T).await.unwrap();
    assert_eq!(job.job.status, JobStatus::Complete, "{tasks:?}");
    let task = &tasks[0].task.id;

    let logs = api.logs("chatty").await.unwrap();
    assert!(
        logs.ends_with("\n299999\n300000\n"),
        "the end is kept: {} bytes ending {:?}",
        logs.len(),
        &logs[logs.len().saturating_sub(200)..]
    );
    assert!(
        (128 << 10..=256 << 10).contains(&logs.len()),
        "{} bytes kept",
        logs.len()
    );
    // What is kept is the latest output, in order, with nothing from the start.
    let lines: Vec<&str> = logs.lines().skip(1).collect();
    let first: u64 = lines[0].parse().unwrap();
    assert!(first > 200_000, "kept from line {first}");
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l.parse::<u64>().unwrap(), first + i as u64);
    }

    // The stream says where output was dropped, once.
    let (_, text) = api
        .raw(reqwest::Method::GET, "/v1/jobs/chatty/logs", None)
        .await
        .unwrap();
    let dropped: Vec<u64> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["dropped"].as_u64())
        .collect();
    assert_eq!(dropped.len(), 1, "{dropped:?}");
    let written = (1..=300_000u64)
        .map(|n| n.to_string().len() as u64 + 1)
        .sum::<u64>();
    assert_eq!(dropped[0] + logs.len() as u64, written);

    // On the controller's disk, the task's logs take no more than the cap, and the
    // metric counts them.
    let dir = c
        .dir
        .path()
        .join("controller")
        .join("logs")
        .join(task.as_str());
    let on_disk = disk_usage(&dir);
    assert!(on_disk <= 256 << 10, "{on_disk} bytes in {}", dir.display());
    let m = api.metrics().await.unwrap();
    let counted = metric(&m, "drover_log_bytes").expect("drover_log_bytes");
    assert_eq!(
        counted as u64,
        disk_usage(&c.dir.path().join("controller").join("logs"))
    );

    // A cap outside the accepted range is refused at apply, naming the field.
    let err = api
        .apply_yaml("name: tiny\ncommand: [true]\nlogs:\n  max_size: 1Ki\n")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("logs.max_size"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_are_removed_with_their_tasks_and_logs_after_their_retention() {
    let opts = ClusterOptions {
        retention: Retention {
            finished_jobs: Duration::from_secs(2),
            interval: Duration::from_millis(200),
            ..Default::default()
        },
        ..Default::default()
    };
    let c = TestCluster::start_with(opts.clone()).await.unwrap();
    let agent = c.agent(AgentOptions::named("n1")).await.unwrap();
    let api = c.api();
    api.apply_yaml("name: done\ncommand: [sh, -c, 'echo finished work']\n")
        .await
        .unwrap();
    api.apply_yaml("name: svc\nkind: service\ncommand: [sleep, '60']\nstop_grace: 1s\n")
        .await
        .unwrap();
    let (_, tasks) = api.wait_final("done", T).await.unwrap();
    let task = tasks[0].task.id.clone();
    assert!(api.logs("done").await.unwrap().contains("finished work"));
    let logs_dir = c.dir.path().join("controller").join("logs");
    assert!(logs_dir.join(task.as_str()).exists());

    wait_for("the finished job to be removed", T, async || {
        api.job("done").await.is_err()
    })
    .await
    .unwrap();
    assert!(!logs_dir.join(task.as_str()).exists(), "its logs went too");
    let (status, _) = api
        .raw(reqwest::Method::GET, &format!("/v1/tasks/{task}"), None)
        .await
        .unwrap();
    assert_eq!(status, 404);
    // A service that still runs is not finished, however old.
    let svc = api.job("svc").await.unwrap();
    assert_eq!(svc.job.status, JobStatus::Running);

    // After a restart, the store has forgotten it as well.
    drop(agent);
    let dir = c.stop().await;
    let c = TestCluster::start_in(dir, opts, "127.0.0.1:0")
        .await
        .unwrap();
    let api = c.api();
    assert!(api.job("done").await.is_err());
    assert!(api.job("svc").await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_nodes_are_removed_after_their_retention() {
    let c = TestCluster::start_with(ClusterOptions {
        heartbeat: Duration::from_millis(100),
        node_timeout: Duration::from_millis(500),
        node_gone_after: Duration::from_millis(500),
        retention: Retention {
            lost_nodes: Duration::from_secs(2),
            interval: Duration::from_millis(200),
            ..Default::default()
        },
        ..Default::default()
    })
    .await
    .unwrap();
    let api = c.api();
    let fake = FakeAgent::joined(&c.url).await;
    assert_eq!(api.nodes().await.unwrap().len(), 1);
    drop(fake);
    wait_for("the silent node to be lost", T, async || {
        api.nodes()
            .await
            .unwrap()
            .iter()
            .all(|n| n.node.status.to_string() == "lost")
    })
    .await
    .unwrap();
    wait_for("the lost node to be removed", T, async || {
        api.nodes().await.unwrap().is_empty()
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_removes_a_silent_node_and_its_tasks_are_replaced() {
    let c = TestCluster::start().await.unwrap();
    let api = c.api();
    let mut fake = FakeAgent::joined(&c.url).await;
    api.apply_yaml("name: web\nkind: service\nruntime: mock\n")
        .await
        .unwrap();
    let task = fake.next_start().await;
    fake.send(&event(1, &task, TaskState::Running, None)).await;
    api.wait_running("web", T).await.unwrap();
    let node = api.nodes().await.unwrap()[0].node.clone();

    // Connected: refused, and nothing changes.
    let path = format!("/v1/nodes/{}", node.info.name);
    let (status, body) = api.raw(reqwest::Method::DELETE, &path, None).await.unwrap();
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("stop its agent first"), "{body}");
    // Unknown names are 404.
    let (status, _) = api
        .raw(reqwest::Method::DELETE, "/v1/nodes/no-such-node", None)
        .await
        .unwrap();
    assert_eq!(status, 404);

    // Once its connection is gone it may be removed, by id as well as by name.
    fake.send(&AgentMessage::Heartbeat {
        at: 0,
        usage: Vec::new(),
        envs: None,
    })
    .await;
    drop(fake);
    let by_id = format!("/v1/nodes/{}", node.id);
    wait_for("the removal to be accepted", T, async || {
        api.raw(reqwest::Method::DELETE, &by_id, None)
            .await
            .unwrap()
            .0
            == 200
    })
    .await
    .unwrap();
    assert!(api.nodes().await.unwrap().is_empty());
    let (_, tasks) = api.wait_job("web", T, |_, t| t.len() == 2).await.unwrap();
    let old = tasks.iter().find(|t| t.task.id == task).unwrap();
    assert_eq!(old.task.state, TaskState::Lost);
    assert!(
        old.task.reason.contains("was removed by an admin"),
        "{}",
        old.task.reason
    );
    let new = tasks.iter().find(|t| t.task.id != task).unwrap();
    assert_eq!(
        new.task.state,
        TaskState::Pending,
        "the service is replaced"
    );

    // A node that comes back after its removal registers again.
    let _again = FakeAgent::joined(&c.url).await;
    let nodes = api.nodes().await.unwrap();
    assert_eq!(nodes.len(), 1);
}
