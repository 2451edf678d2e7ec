//! The HTTP API's authentication, errors and metrics, and the agent protocol's rules,
//! spoken by a hand-driven fake agent so every message can be chosen.

use drover_core::protocol::{AgentMessage, Command, ControllerMessage, PROTOCOL_VERSION};
use drover_core::quantity::Dur;
use drover_core::spec::RuntimeKind;
use drover_core::state::{Job, Task};
use drover_core::{JobKind, JobSpec, ProjectId, TaskState};
use drover_store::{Change, Durability, SqliteConfig, SqliteStore, Store};
use drover_testkit::fake_agent::{FakeAgent, event};
use drover_testkit::{AgentOptions, Api, JOIN_TOKEN, TestCluster, wait_for};
use futures_util::{SinkExt, StreamExt};
use reqwest::Method;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

const T: Duration = Duration::from_secs(20);

/// A well-formed blob path, so that only the token decides the answer.
const BLOB: &str =
    "/v1/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000";

/// A concrete path for one of the controller's route patterns.
fn concrete(pattern: &str) -> String {
    if pattern == "/v1/blobs/{digest}" {
        return BLOB.to_string();
    }
    pattern
        .split('/')
        .map(|seg| if seg.starts_with('{') { "x" } else { seg })
        .collect::<Vec<_>>()
        .join("/")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_api_route_needs_a_valid_token_and_says_so_in_json() {
    let c = TestCluster::start().await.unwrap();
    for token in ["", "not-a-token"] {
        let api = Api::new(&c.url, token);
        // The controller's own list of its routes, so a route added without
        // authentication fails here.
        for (method, pattern) in drover_controller::ROUTES {
            let path = &concrete(pattern);
            let (status, body) = api
                .raw(Method::from_bytes(method.as_bytes()).unwrap(), path, None)
                .await
                .unwrap();
            assert_eq!(status, 401, "{method} {path} with token {token:?}: {body}");
            // A HEAD answer has no body to say why.
            if *method == "HEAD" {
                continue;
            }
            let err: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(err["code"], "unauthorized", "{body}");
        }
    }
    // A join token admits agents, not API calls.
    let api = Api::new(&c.url, JOIN_TOKEN);
    let (status, _) = api.raw(Method::GET, "/v1/jobs", None).await.unwrap();
    assert_eq!(status, 403);
    // Health needs no token.
    let (status, body) = Api::new(&c.url, "")
        .raw(Method::GET, "/health", None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_spec_is_refused_with_the_field_and_nothing_is_stored() {
    let c = TestCluster::start().await.unwrap();
    let api = c.api();
    for (body, needle) in [
        (r#"{"name":"x","command":["true"],"count":"two"}"#, "count"),
        (
            r#"{"name":"x","command":[],"count":1}"#,
            "command: required",
        ),
        (
            r#"{"name":"x","command":["true"],"colour":1}"#,
            "unknown field `colour`",
        ),
        ("not json", "expected"),
        // A bare number is seconds; this one is far past any grace the controller's
        // deadline arithmetic could hold, and must be refused rather than wrap.
        (
            r#"{"name":"x","command":["true"],"stop_grace":18446744073709551615}"#,
            "stop_grace: expected at most 1h",
        ),
        (
            r#"{"name":"x","command":["true"],"stop_grace":"100y"}"#,
            "stop_grace: expected at most 1h, got 100years",
        ),
    ] {
        let (status, text) = api
            .raw(Method::POST, "/v1/jobs", Some(body.as_bytes().to_vec()))
            .await
            .unwrap();
        assert_eq!(status, 400, "{body}: {text}");
        let err: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(err["code"], "invalid_spec");
        assert!(err["error"].as_str().unwrap().contains(needle), "{text}");
    }
    let (_, jobs) = api.raw(Method::GET, "/v1/jobs", None).await.unwrap();
    assert_eq!(jobs, "[]");
}

/// Every JSON body the API reads is one value and nothing more: data after it is refused
/// with 400, and nothing is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_body_with_data_after_it_is_refused_and_nothing_is_created() {
    let c = TestCluster::start().await.unwrap();
    let api = c.api();
    let (_, before) = api.raw(Method::GET, "/v1/tokens", None).await.unwrap();
    for (path, body, needle) in [
        (
            "/v1/jobs",
            r#"{"name":"x","command":["true"]} not json"#,
            "unexpected data after the job spec",
        ),
        (
            "/v1/jobs",
            r#"{"name":"x","command":["true"]}{}"#,
            "unexpected data",
        ),
        (
            "/v1/projects",
            r#"{"name":"p"} not json"#,
            "trailing characters",
        ),
        (
            "/v1/tokens",
            r#"{"project":"default","role":"read"} not json"#,
            "trailing characters",
        ),
    ] {
        let (status, text) = api
            .raw(Method::POST, path, Some(body.as_bytes().to_vec()))
            .await
            .unwrap();
        assert_eq!(status, 400, "{path} {body}: {text}");
        let err: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(
            err["error"].as_str().unwrap().contains(needle),
            "{path} {body}: {text}"
        );
    }
    // Whitespace after the value is not data.
    let (status, text) = api
        .raw(
            Method::POST,
            "/v1/jobs",
            Some(br#"{"name":"y","kind":"service","runtime":"mock"} "#.to_vec()),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{text}");
    let (_, jobs) = api.raw(Method::GET, "/v1/jobs", None).await.unwrap();
    let jobs: Vec<serde_json::Value> = serde_json::from_str(&jobs).unwrap();
    let names: Vec<&str> = jobs.iter().filter_map(|j| j["name"].as_str()).collect();
    assert_eq!(names, ["y"], "only the well-formed job was created");
    let (_, projects) = api.raw(Method::GET, "/v1/projects", None).await.unwrap();
    assert!(!projects.contains(r#""p""#), "{projects}");
    let (_, after) = api.raw(Method::GET, "/v1/tokens", None).await.unwrap();
    assert_eq!(before, after, "no token was created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_report_tasks_by_state_and_connected_agents() {
    let c = TestCluster::start().await.unwrap();
    let _a = c.agent(AgentOptions::named("n1")).await.unwrap();
    let api = c.api();
    api.apply_yaml("name: m\nkind: service\nruntime: mock\ncount: 2\n")
        .await
        .unwrap();
    api.wait_job("m", T, |_, t| {
        t.iter()
            .filter(|t| t.task.state == TaskState::Running)
            .count()
            == 2
    })
    .await
    .unwrap();
    let (status, text) = api.raw(Method::GET, "/metrics", None).await.unwrap();
    assert_eq!(status, 200);
    assert!(text.contains("drover_tasks{state=\"running\"} 2"), "{text}");
    assert!(text.contains("drover_connected_agents 1"), "{text}");
    assert!(
        text.contains("drover_scheduling_latency_seconds_count 2"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_and_stale_agent_events_change_nothing() {
    let c = TestCluster::start().await.unwrap();
    let api = c.api();
    let mut agent = FakeAgent::connect(&c.url, JOIN_TOKEN).await.unwrap();
    agent.send(&FakeAgent::hello(PROTOCOL_VERSION)).await;
    assert!(matches!(
        agent.recv().await,
        Some(ControllerMessage::Welcome {
            last_event_seq: 0,
            ..
        })
    ));
    api.apply_yaml("name: fake-job\nruntime: mock\n")
        .await
        .unwrap();
    let task = agent.next_start().await;
    agent.send(&event(1, &task, TaskState::Running, None)).await;
    agent
        .send(&event(2, &task, TaskState::Failed, Some(9)))
        .await;
    // A replay of seq 2 with different content, and a stale state with a new seq.
    agent
        .send(&event(2, &task, TaskState::Succeeded, Some(0)))
        .await;
    agent.send(&event(3, &task, TaskState::Running, None)).await;
    agent
        .send(&event(4, &task, TaskState::Succeeded, Some(0)))
        .await;
    wait_for("the events to be acknowledged", T, async || {
        matches!(
            agent.recv().await,
            Some(ControllerMessage::EventAck { seq: 4 })
        )
    })
    .await
    .unwrap();
    let tasks = api.tasks("fake-job").await.unwrap();
    let t = tasks.iter().find(|t| t.task.id == task).unwrap();
    assert_eq!(t.task.state, TaskState::Failed);
    assert_eq!(t.task.exit.as_ref().and_then(|e| e.code), Some(9));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_handshake_is_checked() {
    let c = TestCluster::start().await.unwrap();
    // A wrong join token is refused at the upgrade.
    assert!(FakeAgent::connect(&c.url, "wrong").await.is_err());
    // Another protocol version is refused with a reason.
    let mut agent = FakeAgent::connect(&c.url, JOIN_TOKEN).await.unwrap();
    agent.send(&FakeAgent::hello(PROTOCOL_VERSION + 1)).await;
    match agent.recv().await {
        Some(ControllerMessage::Reject { reason }) => {
            assert!(reason.contains("protocol version"), "{reason}")
        }
        other => panic!("expected a reject, got {other:?}"),
    }
    // Garbage instead of a hello is refused too.
    let mut agent = FakeAgent::connect(&c.url, JOIN_TOKEN).await.unwrap();
    agent
        .ws
        .send(Message::Text("{\"nonsense\":1}".into()))
        .await
        .unwrap();
    assert!(matches!(
        agent.recv().await,
        Some(ControllerMessage::Reject { .. })
    ));
    assert_eq!(c.controller.connected_agents(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_an_agent_never_starts_fails_at_the_controllers_deadline_and_is_forgotten() {
    let c = TestCluster::start_with(drover_testkit::ClusterOptions {
        start_deadline: Duration::from_millis(500),
        ..Default::default()
    })
    .await
    .unwrap();
    let api = c.api();
    // An agent that acknowledges the start and then never reports anything.
    let mut agent = FakeAgent::joined(&c.url).await;
    api.apply_yaml("name: ignored\nruntime: mock\nrestart: { attempts: 0 }\n")
        .await
        .unwrap();
    let task = agent.next_start().await;
    // Heartbeats keep the node alive, so only the start deadline can end the task.
    let forgotten = agent.heartbeat_until_forget().await;
    assert_eq!(
        forgotten, task,
        "the agent is told to drop the task it never started"
    );
    let (job, tasks) = api.wait_final("ignored", T).await.unwrap();
    assert_eq!(job.job.status, drover_core::state::JobStatus::Failed);
    assert!(
        tasks[0]
            .task
            .reason
            .contains("deadline exceeded in state scheduled"),
        "{}",
        tasks[0].task.reason
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_whose_stop_is_never_reported_is_lost_at_the_stop_deadline_and_forgotten() {
    let c = TestCluster::start_with(drover_testkit::ClusterOptions {
        stop_deadline: Duration::from_millis(500),
        ..Default::default()
    })
    .await
    .unwrap();
    let api = c.api();
    let mut agent = FakeAgent::joined(&c.url).await;
    api.apply_yaml("name: stuck\nkind: service\nruntime: mock\nstop_grace: 100ms\n")
        .await
        .unwrap();
    let task = agent.next_start().await;
    agent.send(&event(1, &task, TaskState::Running, None)).await;
    api.wait_job("stuck", T, |_, t| t[0].task.state == TaskState::Running)
        .await
        .unwrap();
    api.stop("stuck").await.unwrap();
    // The agent acknowledges the stop, says it is stopping, and then never reports the end.
    loop {
        if let Some(ControllerMessage::Command {
            seq,
            command: Command::Stop { task_id, .. },
        }) = agent.recv().await
        {
            assert_eq!(task_id, task);
            agent.send(&AgentMessage::CommandAck { seq }).await;
            break;
        }
    }
    agent
        .send(&event(2, &task, TaskState::Stopping, None))
        .await;
    let started = std::time::Instant::now();
    let forgotten = agent.heartbeat_until_forget().await;
    assert_eq!(
        forgotten, task,
        "the agent is told to kill and drop the task"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "the task had its grace plus the deadline: {:?}",
        started.elapsed()
    );
    let (_, tasks) = api.wait_final("stuck", T).await.unwrap();
    assert_eq!(tasks[0].task.state, TaskState::Lost);
    assert!(
        tasks[0]
            .task
            .reason
            .contains("deadline exceeded in state stopping"),
        "{}",
        tasks[0].task.reason
    );
}

/// A spec stored before durations were bounded may hold any grace, and the controller
/// must treat a huge one as huge. Before its deadline arithmetic saturated, a grace of
/// u64::MAX seconds wrapped to minus one second, and a task asked to stop was declared
/// lost (and its agent told to drop it) at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_spec_with_an_unbounded_grace_does_not_cut_the_stop_short() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = SqliteStore::open(&SqliteConfig {
            path: Some(dir.path().join("drover.db")),
            durability: Durability::Process,
        })
        .await
        .unwrap();
        let mut spec = JobSpec::new("legacy", Vec::new());
        spec.kind = JobKind::Service;
        spec.runtime = RuntimeKind::Mock;
        spec.stop_grace = Dur::from_secs(u64::MAX);
        assert!(spec.validate().is_err(), "only a stored spec can hold this");
        let now = drover_core::now_millis();
        let job = Job::new(ProjectId::default(), spec, 1, now);
        let task = Task::pending(&job, 0, 0, now, 0);
        store
            .commit(&[Change::Job(job), Change::Task(task)])
            .await
            .unwrap();
    }
    let c = TestCluster::start_in(
        dir,
        drover_testkit::ClusterOptions {
            stop_deadline: Duration::from_millis(500),
            ..Default::default()
        },
        "127.0.0.1:0",
    )
    .await
    .unwrap();
    let api = c.api();
    let mut agent = FakeAgent::joined(&c.url).await;
    let task = agent.next_start().await;
    agent.send(&event(1, &task, TaskState::Running, None)).await;
    api.wait_job("legacy", T, |_, t| t[0].task.state == TaskState::Running)
        .await
        .unwrap();
    api.stop("legacy").await.unwrap();
    loop {
        if let Some(ControllerMessage::Command {
            seq,
            command: Command::Stop {
                task_id, grace_ms, ..
            },
        }) = agent.recv().await
        {
            assert_eq!(task_id, task);
            assert_eq!(grace_ms, u64::MAX, "the grace saturates rather than wraps");
            agent.send(&AgentMessage::CommandAck { seq }).await;
            break;
        }
    }
    agent
        .send(&event(2, &task, TaskState::Stopping, None))
        .await;
    // Several liveness passes and four times the stop deadline, heartbeating so that
    // only the stop deadline could end the task.
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < until {
        agent
            .send(&AgentMessage::Heartbeat {
                at: 0,
                usage: Vec::new(),
                envs: None,
            })
            .await;
        if let Ok(Some(Ok(Message::Text(t)))) =
            tokio::time::timeout(Duration::from_millis(200), agent.ws.next()).await
        {
            let m: ControllerMessage = serde_json::from_str(&t).unwrap();
            assert!(
                !matches!(
                    m,
                    ControllerMessage::Command {
                        command: Command::Forget { .. },
                        ..
                    }
                ),
                "the task was dropped before its grace ran out"
            );
        }
    }
    let tasks = api.tasks("legacy").await.unwrap();
    assert_eq!(
        tasks[0].task.state,
        TaskState::Stopping,
        "{:?}",
        tasks[0].task
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artifact_no_node_runs_waits_and_is_placed_when_a_matching_node_joins() {
    let c = TestCluster::start().await.unwrap();
    let api = c.api();
    let _linux = c.agent(AgentOptions::named("linux")).await.unwrap();
    let macho = b"\xcf\xfa\xed\xfe a darwin build".to_vec();
    api.push_artifact("mac", &[("darwin/arm64", macho.as_slice())])
        .await
        .unwrap();
    api.apply_yaml("name: mac\nartifact: mac:1\nrestart: { attempts: 0 }\n")
        .await
        .unwrap();
    let (job, _) = api
        .wait_job("mac", T, |j, _| j.pending_reason.is_some())
        .await
        .unwrap();
    let reason = job.pending_reason.unwrap();
    assert!(
        reason.contains("artifact mac:1 has darwin/arm64; nodes: linux/"),
        "{reason}"
    );

    // A darwin/arm64 node joins (this Linux machine cannot run a real one, so it is
    // spoken for by the protocol): the waiting task is placed there, with that build.
    let mut mac = FakeAgent::connect(&c.url, JOIN_TOKEN).await.unwrap();
    mac.send(&FakeAgent::hello_as(
        PROTOCOL_VERSION,
        "darwin/arm64",
        RuntimeKind::Process,
    ))
    .await;
    assert!(matches!(
        mac.recv().await,
        Some(ControllerMessage::Welcome { .. })
    ));
    let a = mac.next_assignment().await;
    let artifact = a.artifact.expect("the assignment names the artifact");
    assert_eq!(artifact.reference.to_string(), "mac:1");
    assert_eq!(artifact.variant.platform.to_string(), "darwin/arm64");
    assert_eq!(
        artifact.variant.digest.to_string(),
        drover_testkit::digest_of(&macho)
    );
    mac.send(&event(1, &a.task_id, TaskState::Running, None))
        .await;
    mac.send(&event(2, &a.task_id, TaskState::Succeeded, Some(0)))
        .await;
    let (job, tasks) = api.wait_final("mac", T).await.unwrap();
    assert_eq!(
        job.job.status,
        drover_core::state::JobStatus::Complete,
        "{:?}",
        job.job
    );
    assert_eq!(
        tasks[0].task.node_id.as_ref().map(|n| n.as_str()),
        Some("node-fake-darwin-arm64")
    );
}
