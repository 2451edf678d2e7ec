//! A pipeline's replicas run as jobs on a real controller and agent: the built
//! `drover __vertex generator`, the Python SDK's example map and `drover __vertex log`,
//! each a service job whose spec carries its vertex's plane, as the vertex controller
//! makes them. The agent serves each replica's data plane, and the buffers are reached
//! through the controller (embedded) or directly (NATS). Every generated message must
//! reach the log sink's task output exactly once, upper-cased.

use drover_core::pipeline::vertex::VertexSpec;
use drover_testkit::{AgentOptions, ClusterOptions, TestCluster};

#[path = "../../drover-buffer/tests/support/nats_server.rs"]
mod nats_server;
use std::path::{Path, PathBuf};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_drover");

fn sdk() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../sdk/python")
        .canonicalize()
        .unwrap()
}

/// One vertex of the test pipeline `demo` in project `default`, as the pipeline
/// controller would write it.
fn vertex(
    backend: &str,
    name: &str,
    role: serde_json::Value,
    extra: serde_json::Value,
) -> VertexSpec {
    let mut v = serde_json::json!({
        "pipeline": "demo",
        "name": name,
        "role": role,
        // Small enough that the fast generator meets back-pressure on the way.
        "buffer": {"backend": backend, "max_length": 2000, "usage_limit": 0.8},
        "scale": {"min": 1, "max": 1},
        "replicas": 1,
        "lifecycle": {"desired_phase": "running"},
        "generation": 1,
    });
    for (k, val) in extra.as_object().unwrap() {
        v[k] = val.clone();
    }
    serde_json::from_value(v).unwrap()
}

fn embedded_buffer_exists(cluster: &TestCluster) -> bool {
    cluster
        .dir
        .path()
        .join("controller/buffers/default.demo.upper.0")
        .exists()
}

const JOBS: [&str; 3] = ["demo-gen", "demo-upper", "demo-log"];

/// Starts an agent that can run built-ins and submits generator (`rate` a second, 0
/// for no limit, `total` in all) -> upper map -> log on `backend`.
async fn start_pipeline(
    cluster: &TestCluster,
    backend: &str,
    rate: u64,
    total: usize,
) -> drover_agent::Agent {
    let mut opts = AgentOptions::named("plane");
    opts.self_exe = Some(PathBuf::from(BIN));
    let agent = cluster.agent(opts).await.unwrap();
    let upper = "default.demo.upper.0";
    let log = "default.demo.log.0";
    let vertices = [
        vertex(
            backend,
            "gen",
            serde_json::json!({"source": {"generator": {"rate": rate, "message_size": 32, "total": total}}}),
            serde_json::json!({"outputs": [{"to": "upper", "buffers": [upper]}]}),
        ),
        vertex(
            backend,
            "upper",
            serde_json::json!({"map": {"run": {
                "runtime": "process",
                "command": ["python3", sdk().join("examples/upper_map.py")],
                "env": {"PYTHONPATH": sdk(), "PYTHONDONTWRITEBYTECODE": "1"},
            }}}),
            serde_json::json!({
                "inputs": [upper],
                "outputs": [{"to": "log", "buffers": [log], "condition": {"tags": {"any": ["upper"]}}}],
            }),
        ),
        vertex(
            backend,
            "log",
            serde_json::json!({"sink": {"log": {}}}),
            serde_json::json!({"inputs": [log]}),
        ),
    ];
    for v in &vertices {
        let spec = v.job_spec().unwrap();
        cluster.submit_vertex_job(&spec).await.unwrap();
    }
    agent
}

/// The log sink's output once it has at least `lines` lines; fails after `timeout`
/// with what each job's tasks say.
async fn log_with(api: &drover_testkit::Api, lines: usize, timeout: Duration) -> String {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let out = api.logs("demo-log").await.unwrap();
        if out.lines().count() >= lines {
            return out;
        }
        if tokio::time::Instant::now() > deadline {
            let mut why = String::new();
            for job in JOBS {
                let tasks = api.tasks(job).await.unwrap();
                let prep = api.prepare_logs(job).await.unwrap_or_default();
                let logs = api.logs(job).await.unwrap_or_default();
                let tail: String = logs.lines().rev().take(5).collect::<Vec<_>>().join("\n");
                let states: Vec<_> = tasks
                    .iter()
                    .map(|t| (t.task.state, t.task.reason.clone()))
                    .collect();
                why.push_str(&format!(
                    "\n{job}: {states:?}\nprepare: {prep}\noutput tail: {tail}"
                ));
            }
            panic!(
                "after {timeout:?} the log sink has {} of {lines} lines{why}",
                out.lines().count()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Checks that the log holds each of the `total` generated messages, upper-cased, at
/// most `doubled` of them twice (none without failures; delivery is at-least-once, so
/// a sink's batches in flight when something fails are written again), and that the
/// sink's agent reported them acknowledged.
async fn check_log(
    api: &drover_testkit::Api,
    total: usize,
    (doubled, most): (usize, u32),
    timeout: Duration,
) {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut output = log_with(api, total, timeout).await;
    // Repeats count toward the lines, so the last messages may still be on their way
    // when the log first has enough lines: wait until each has arrived.
    let seen = loop {
        let mut seen = vec![0u32; total];
        for line in output.lines() {
            // `G0-17...` padded with dots to 32 bytes, upper-cased by the map.
            let seq: usize = line
                .strip_prefix("G0-")
                .and_then(|rest| rest.trim_end_matches('.').parse().ok())
                .unwrap_or_else(|| panic!("not an upper-cased generated message: {line:?}"));
            assert_eq!(line.len(), 32, "{line:?}");
            seen[seq] += 1;
        }
        let missing: Vec<usize> = (0..total).filter(|i| seen[*i] == 0).collect();
        if missing.is_empty() {
            break seen;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "missing after {timeout:?}: {:?}",
            &missing[..missing.len().min(20)]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        output = api.logs("demo-log").await.unwrap();
    };
    let twice = seen.iter().filter(|n| **n > 1).count();
    let worst = seen.iter().copied().max().unwrap_or(0);
    assert!(
        twice <= doubled && worst <= most,
        "{twice} messages logged more than once, one {worst} times (at most {doubled} repeated, each at most {most} times, allowed)"
    );
    eprintln!("{twice} of {total} messages logged twice");

    // The replicas' counts reach the controller in heartbeats: the sink's agent
    // reports every message acknowledged.
    api.wait_job("demo-log", Duration::from_secs(10), |_, tasks| {
        tasks.iter().any(|t| {
            t.usage
                .and_then(|u| u.plane)
                .is_some_and(|p| p.acked >= total as u64)
        })
    })
    .await
    .unwrap();
}

/// Stops the jobs (so no replica outlives the test) and the agent.
async fn stop_pipeline(api: &drover_testkit::Api, agent: drover_agent::Agent) {
    for job in JOBS {
        api.stop(job).await.unwrap();
    }
    for job in JOBS {
        api.wait_final(job, Duration::from_secs(30)).await.unwrap();
    }
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn generator_map_log_jobs_deliver_every_message_through_embedded_buffers() {
    let cluster = TestCluster::start().await.unwrap();
    let agent = start_pipeline(&cluster, "embedded", 0, 3_000).await;
    check_log(&cluster.api(), 3_000, (0, 1), Duration::from_secs(90)).await;
    stop_pipeline(&cluster.api(), agent).await;
    // The buffers are the controller's, in its data directory.
    assert!(embedded_buffer_exists(&cluster));
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn generator_map_log_jobs_deliver_every_message_through_nats() {
    let nats = nats_server::NatsServer::start();
    let cluster = TestCluster::start_with(ClusterOptions {
        nats_url: Some(nats.url()),
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    let agent = start_pipeline(&cluster, "nats", 0, 3_000).await;
    check_log(&cluster.api(), 3_000, (0, 1), Duration::from_secs(90)).await;
    stop_pipeline(&cluster.api(), agent).await;
    // The agent wrote to NATS itself; nothing went through the controller's buffers.
    assert!(!embedded_buffer_exists(&cluster));
    cluster.stop().await;
}

/// The controller restarts while messages flow through its embedded buffers: the
/// agent's buffer calls fail fast while it is away, the data planes retry until it is
/// back (on the same address and data directory), and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_controller_restart_mid_stream_loses_nothing() {
    let cluster = TestCluster::start().await.unwrap();
    let total = 6_000;
    // About three seconds of messages, so the restart lands in the middle.
    let agent = start_pipeline(&cluster, "embedded", 2_000, total).await;
    log_with(&cluster.api(), 500, Duration::from_secs(60)).await;

    let addr = cluster.url.trim_start_matches("http://").to_string();
    let dir = cluster.stop().await;
    drover_testkit::wait_for(
        "the old listener to close",
        Duration::from_secs(20),
        async || std::net::TcpListener::bind(&addr).is_ok(),
    )
    .await
    .unwrap();
    // Away long enough for calls in flight to fail and be retried.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cluster = TestCluster::start_in(dir, ClusterOptions::default(), &addr)
        .await
        .unwrap();
    let api = cluster.api();
    // What the sink held unacknowledged at the restart (its window of four batches of
    // at most 500) may be delivered again, once; nothing else may. (A generator whose
    // replica ended on a buffer call cut short by the shutdown started its sequence
    // again under new ids, which logged hundreds a second and third time.)
    check_log(&api, total, (4 * 500, 2), Duration::from_secs(90)).await;
    stop_pipeline(&api, agent).await;
    cluster.stop().await;
}
