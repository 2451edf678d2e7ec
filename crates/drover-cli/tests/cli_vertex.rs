//! A pipeline's data path with every part real but the controller: the built
//! `drover __vertex generator`, the Python SDK's example map and `drover __vertex log`,
//! each a process on its own task socket, joined by the agent's data plane through
//! embedded buffers on disk. Every message the generator makes reaches the log once.

use drover_agent::dataplane::{PlaneConfig, Route};
use drover_buffer::embedded::EmbeddedBackend;
use drover_buffer::{Buffer, BufferBackend, BufferConfig, BufferName};
use drover_core::pipeline::spec::TagCondition;
use drover_pipeline::proto::Role;
use drover_testkit::vertex::{Replica, ReplicaSpec};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_drover");

/// One vertex replica of the test's pipeline, its program started on its socket.
fn replica(
    dir: &Path,
    name: &str,
    role: Role,
    input: Option<Arc<dyn Buffer>>,
    routes: Vec<Route>,
    program: &mut tokio::process::Command,
) -> Replica {
    let spec = ReplicaSpec {
        name,
        project: "default",
        role,
        input,
        routes,
        config: PlaneConfig {
            answer_timeout: Duration::from_secs(10),
            ..PlaneConfig::default()
        },
    };
    spec.start(dir, program).unwrap()
}

fn sdk() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../sdk/python")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generator_to_python_map_to_log_delivers_every_message_once() {
    let dir = tempfile::tempdir().unwrap();
    let backend = EmbeddedBackend::open(dir.path().join("buffers")).unwrap();
    let config = BufferConfig {
        // Small enough that the fast generator meets back-pressure on the way.
        max_length: 2_000,
        ..BufferConfig::default()
    };
    let buffer = |vertex: &str| {
        let name = BufferName::new("default", "demo", vertex, 0).unwrap();
        let (backend, config) = (&backend, &config);
        async move { backend.open(&name, config).await.unwrap() }
    };
    let (to_upper, to_log) = (buffer("upper").await, buffer("log").await);
    let total = 5_000;
    let log_file = dir.path().join("log.out");

    let _gen = replica(
        dir.path(),
        "gen",
        Role::Source,
        None,
        vec![Route {
            condition: None,
            partitions: vec![to_upper.clone()],
        }],
        tokio::process::Command::new(BIN).args([
            "__vertex",
            "generator",
            "--rate",
            "0",
            "--size",
            "32",
            "--total",
            &total.to_string(),
        ]),
    );
    let _map = replica(
        dir.path(),
        "upper",
        Role::Map,
        Some(to_upper.clone()),
        vec![Route {
            condition: Some(TagCondition::Any(vec!["upper".into()])),
            partitions: vec![to_log.clone()],
        }],
        tokio::process::Command::new("python3")
            .arg(sdk().join("examples/upper_map.py"))
            .env("PYTHONPATH", sdk())
            .env("PYTHONDONTWRITEBYTECODE", "1"),
    );
    let mut log = replica(
        dir.path(),
        "log",
        Role::Sink,
        Some(to_log.clone()),
        vec![],
        tokio::process::Command::new(BIN)
            .args(["__vertex", "log"])
            .stdout(std::fs::File::create(&log_file).unwrap()),
    );

    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let lines = std::fs::read_to_string(&log_file).unwrap_or_default();
        let n = lines.lines().count();
        let drained = to_upper.stats().await.unwrap().is_drained()
            && to_log.stats().await.unwrap().is_drained();
        if n >= total && drained {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "after 60 s the log has {n} of {total} lines; upper {:?}, log {:?}",
            to_upper.stats().await.unwrap(),
            to_log.stats().await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    log.child.kill().await.unwrap();
    let lines = std::fs::read_to_string(&log_file).unwrap();
    let mut seen = vec![0u32; total];
    for line in lines.lines() {
        // `G0-17...` padded with dots to 32 bytes, upper-cased by the map.
        let seq: usize = line
            .strip_prefix("G0-")
            .and_then(|rest| rest.trim_end_matches('.').parse().ok())
            .unwrap_or_else(|| panic!("not a generated message: {line:?}"));
        assert_eq!(line.len(), 32, "{line:?}");
        seen[seq] += 1;
    }
    let missing: Vec<usize> = (0..total).filter(|i| seen[*i] == 0).collect();
    let doubled = seen.iter().filter(|n| **n > 1).count();
    assert!(
        missing.is_empty(),
        "missing: {:?}",
        &missing[..missing.len().min(20)]
    );
    assert_eq!(doubled, 0, "messages logged twice");
}
