//! The agent gateway's defences and its connection upkeep: what one agent sends is
//! checked against what its node runs, ids are checked before they touch a file name,
//! and a healthy idle connection is kept, not recycled.

use drover_core::TaskState;
use drover_core::protocol::{AgentMessage, ControllerMessage, LogChunk, LogStream};
use drover_core::spec::RuntimeKind;
use drover_testkit::fake_agent::{FakeAgent, event};
use drover_testkit::{AgentOptions, JOIN_TOKEN, TestCluster, wait_for};
use futures_util::SinkExt;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

const T: Duration = Duration::from_secs(20);

/// A log message as raw JSON, so that the task id can be anything at all.
fn raw_log(task_id: &str, data: &[u8]) -> String {
    use base64::Engine as _;
    serde_json::json!({
        "type": "log",
        "task_id": task_id,
        "stream": "stdout",
        "offset": 0,
        "data": base64::engine::general_purpose::STANDARD.encode(data),
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_writes_no_file_outside_the_logs_and_nothing_into_another_nodes_task() {
    let c = TestCluster::start().await.unwrap();
    let api = c.api();
    // Node A runs the task; node B is the attacker, on another platform so that the
    // constraint below keeps the task off it.
    let mut a = FakeAgent::connect(&c.url, JOIN_TOKEN).await.unwrap();
    a.send(&FakeAgent::hello_as(
        drover_core::protocol::PROTOCOL_VERSION,
        "linux/amd64",
        RuntimeKind::Mock,
    ))
    .await;
    assert!(matches!(
        a.recv().await,
        Some(ControllerMessage::Welcome { .. })
    ));
    let mut b = FakeAgent::connect(&c.url, JOIN_TOKEN).await.unwrap();
    b.send(&FakeAgent::hello_as(
        drover_core::protocol::PROTOCOL_VERSION,
        "linux/arm64",
        RuntimeKind::Mock,
    ))
    .await;
    assert!(matches!(
        b.recv().await,
        Some(ControllerMessage::Welcome { .. })
    ));
    api.apply_yaml(
        "name: victim\nkind: service\nruntime: mock\nconstraints: [{ key: platform, value: linux/amd64 }]\n",
    )
    .await
    .unwrap();
    let task = a.next_start().await;
    a.send(&event(1, &task, TaskState::Running, None)).await;
    a.send(&AgentMessage::Log(LogChunk {
        task_id: task.clone(),
        stream: LogStream::Stdout,
        offset: 0,
        data: b"real output\n".to_vec(),
        at: None,
    }))
    .await;
    wait_for("the task to run with its output", T, async || {
        api.logs("victim")
            .await
            .is_ok_and(|l| l.contains("real output"))
    })
    .await
    .unwrap();

    // Ids that would name files outside the controller's logs directory.
    let unique = format!("drover-escape-{}", std::process::id());
    let escapes = [
        format!("../../../../../../../../tmp/{unique}-rel"),
        format!("/tmp/{unique}-abs"),
        format!("task-../../../../../../../../tmp/{unique}-pfx"),
    ];
    for id in &escapes {
        b.ws.send(Message::Text(raw_log(id, b"owned\n").into()))
            .await
            .unwrap();
    }
    // Another node's task: both its output and its state are out of B's reach.
    b.ws.send(Message::Text(
        raw_log(task.as_str(), b"injected by another node\n").into(),
    ))
    .await
    .unwrap();
    b.send(&event(1, &task, TaskState::Failed, Some(1))).await;
    // The gateway handles one connection's messages in order, so the ack of B's event
    // means everything B sent before it has been dealt with.
    wait_for("B's event to be acknowledged", T, async || {
        matches!(b.recv().await, Some(ControllerMessage::EventAck { .. }))
    })
    .await
    .unwrap();

    for id in &escapes {
        let leaf = id.rsplit('/').next().unwrap();
        for stream in ["stdout", "stderr"] {
            let path = std::path::PathBuf::from("/tmp").join(format!("{leaf}.{stream}.log"));
            assert!(!path.exists(), "{} was written", path.display());
        }
    }
    let logs_dir = c.dir.path().join("controller").join("logs");
    for entry in std::fs::read_dir(&logs_dir).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().to_string();
        assert!(
            name.starts_with(task.as_str()),
            "an unexpected file in the logs directory: {name}"
        );
    }
    let logs = api.logs("victim").await.unwrap();
    assert!(!logs.contains("injected"), "{logs}");
    assert!(logs.contains("real output"), "{logs}");
    let tasks = api.tasks("victim").await.unwrap();
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    assert_eq!(tasks[0].task.state, TaskState::Running);

    // The rightful node still writes its task's output.
    a.send(&AgentMessage::Log(LogChunk {
        task_id: task.clone(),
        stream: LogStream::Stdout,
        offset: 12,
        data: b"more output\n".to_vec(),
        at: None,
    }))
    .await;
    wait_for("A's second chunk", T, async || {
        api.logs("victim")
            .await
            .is_ok_and(|l| l.contains("more output"))
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_agent_keeps_one_connection() {
    // The agent gives up on a connection after ten heartbeats plus five seconds of
    // silence (7 s here); an idle cluster is held for more than three of those.
    let c = TestCluster::start().await.unwrap();
    let _agent = c.agent(AgentOptions::named("idle")).await.unwrap();
    let api = c.api();
    wait_for("the node to be ready", T, async || {
        api.nodes().await.is_ok_and(|n| n.len() == 1)
    })
    .await
    .unwrap();
    let sessions = async || -> u64 {
        let text = api.metrics().await.unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("drover_agent_sessions_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no agent sessions counter in {text}"))
    };
    assert_eq!(sessions().await, 1);
    tokio::time::sleep(Duration::from_secs(25)).await;
    assert_eq!(sessions().await, 1, "the idle agent reconnected");
    assert_eq!(c.controller.connected_agents(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_agent_is_welcomed_at_version_1_and_runs_a_job() {
    let c = TestCluster::start().await.unwrap();
    let api = c.api();
    // Exactly what a version 1 agent sends: one version, no range.
    let mut old = FakeAgent::connect(&c.url, JOIN_TOKEN).await.unwrap();
    old.send(&FakeAgent::hello(1)).await;
    match old.recv().await {
        Some(ControllerMessage::Welcome {
            protocol_version, ..
        }) => assert_eq!(protocol_version, 1),
        other => panic!("expected a welcome, got {other:?}"),
    }
    api.apply_yaml("name: legacy\nruntime: mock\n")
        .await
        .unwrap();
    let task = old.next_start().await;
    old.send(&event(1, &task, TaskState::Running, None)).await;
    old.send(&event(2, &task, TaskState::Succeeded, Some(0)))
        .await;
    let (job, _) = api.wait_final("legacy", T).await.unwrap();
    assert_eq!(job.job.status, drover_core::state::JobStatus::Complete);
    let nodes = api.nodes().await.unwrap();
    assert_eq!(nodes[0].node.protocol_version, 1);
}
