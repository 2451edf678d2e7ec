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
fn vertex(backend: &str, name: &str, role: serde_json::Value, extra: serde_json::Value) -> VertexSpec {
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

/// Runs generator -> upper map -> log on `backend` and checks the log sink's output.
async fn run_pipeline(cluster: &TestCluster, backend: &str, total: usize) {
    let mut opts = AgentOptions::named("plane");
    opts.self_exe = Some(PathBuf::from(BIN));
    let agent = cluster.agent(opts).await.unwrap();
    let upper = "default.demo.upper.0";
    let log = "default.demo.log.0";
    let vertices = [
        vertex(
            backend,
            "gen",
            serde_json::json!({"source": {"generator": {"rate": 0, "message_size": 32, "total": total}}}),
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
    let api = cluster.api();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let output = loop {
        let out = api.logs("demo-log").await.unwrap();
        if out.lines().count() >= total {
            break out;
        }
        if tokio::time::Instant::now() > deadline {
            let mut why = String::new();
            for job in ["demo-gen", "demo-upper", "demo-log"] {
                let tasks = api.tasks(job).await.unwrap();
                let prep = api.prepare_logs(job).await.unwrap_or_default();
                let logs = api.logs(job).await.unwrap_or_default();
                let tail: String = logs.lines().rev().take(5).collect::<Vec<_>>().join("\n");
                why.push_str(&format!(
                    "\n{job}: {}\nprepare: {prep}\noutput tail: {tail}",
                    serde_json::to_string(&tasks.iter().map(|t| (&t.task.state, &t.task.reason)).collect::<Vec<_>>()).unwrap()
                ));
            }
            panic!(
                "after 90 s the log sink has {} of {total} lines{why}",
                out.lines().count()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
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
    assert!(missing.is_empty(), "missing: {:?}", &missing[..missing.len().min(20)]);
    assert!(seen.iter().all(|n| *n == 1), "a message was logged twice");

    // The replicas' counts reach the controller in heartbeats: the sink's agent
    // reports every message acknowledged.
    let (_, tasks) = api
        .wait_job("demo-log", Duration::from_secs(10), |_, tasks| {
            tasks.iter().any(|t| {
                t.usage
                    .and_then(|u| u.plane)
                    .is_some_and(|p| p.acked >= total as u64)
            })
        })
        .await
        .unwrap();
    assert_eq!(tasks.len(), 1);
    for job in ["demo-gen", "demo-upper", "demo-log"] {
        api.stop(job).await.unwrap();
    }
    for job in ["demo-gen", "demo-upper", "demo-log"] {
        api.wait_final(job, Duration::from_secs(30)).await.unwrap();
    }
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn generator_map_log_jobs_deliver_every_message_through_embedded_buffers() {
    let cluster = TestCluster::start().await.unwrap();
    run_pipeline(&cluster, "embedded", 3_000).await;
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
    run_pipeline(&cluster, "nats", 3_000).await;
    // The agent wrote to NATS itself; nothing went through the controller's buffers.
    assert!(!embedded_buffer_exists(&cluster));
    cluster.stop().await;
}
