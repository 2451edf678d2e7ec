//! A pipeline's data path, end to end but for the controller: `drover __vertex
//! generator` → the Rust SDK's identity map → `drover __vertex blackhole`, each a real
//! process on its own task socket, joined by the agent's data plane through embedded
//! buffers on disk. Measured against the same bytes through a raw Unix socket pair in
//! the same run.
//!
//! What it leaves out, and the full `pipeline` benchmark adds once pipelines run through
//! the controller: the agents' connections to the controller's buffers.

use anyhow::{Context, Result, bail};
use drover_agent::dataplane::{PlaneConfig, Route};
use drover_buffer::{Buffer, BufferBackend, BufferConfig, BufferName, EmbeddedBackend};
use drover_pipeline::proto::Role;
use drover_testkit::vertex::{Replica, ReplicaSpec};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const SIZE: usize = 256;

/// The identity map built from the SDK's examples, beside this binary.
fn identity_map() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let map = exe
        .parent()
        .context("bench binary has no directory")?
        .join("examples/identity_map");
    if !map.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p drover-pipeline --examples` (scripts/bench.sh does)",
            map.display()
        );
    }
    Ok(map)
}

/// One replica of the benchmark's pipeline, writing to `output` when given.
fn replica(
    dir: &Path,
    name: &str,
    role: Role,
    input: Option<Arc<dyn Buffer>>,
    output: Option<Arc<dyn Buffer>>,
    window: usize,
    program: &mut tokio::process::Command,
) -> Result<Replica> {
    let spec = ReplicaSpec {
        name,
        project: "bench",
        role,
        input,
        routes: output
            .into_iter()
            .map(|b| Route {
                condition: None,
                partitions: vec![b],
            })
            .collect(),
        config: PlaneConfig {
            window,
            ..PlaneConfig::default()
        },
    };
    Ok(spec.start(dir, program.stdout(std::process::Stdio::null()))?)
}

/// Seconds for `n` messages to go from the generator to the blackhole, with `window`
/// batches outstanding on each replica's connection.
async fn through(n: usize, window: usize) -> Result<f64> {
    let dir = super::bench_tempdir()?;
    let backend = EmbeddedBackend::open(dir.path().join("buffers"))?;
    let config = BufferConfig {
        max_length: 100_000,
        ..BufferConfig::default()
    };
    let to_map = backend
        .open(&BufferName::new("bench", "pipe", "map", 0)?, &config)
        .await?;
    let to_sink = backend
        .open(&BufferName::new("bench", "pipe", "sink", 0)?, &config)
        .await?;
    let drover = super::drover_bin()?;
    let started = Instant::now();
    let mut generator = replica(
        dir.path(),
        "gen",
        Role::Source,
        None,
        Some(to_map.clone()),
        window,
        tokio::process::Command::new(&drover).args([
            "__vertex",
            "generator",
            "--rate",
            "0",
            "--size",
            &SIZE.to_string(),
            "--total",
            &n.to_string(),
        ]),
    )?;
    let mut map = replica(
        dir.path(),
        "map",
        Role::Map,
        Some(to_map),
        Some(to_sink.clone()),
        window,
        &mut tokio::process::Command::new(identity_map()?),
    )?;
    let mut sink = replica(
        dir.path(),
        "sink",
        Role::Sink,
        Some(to_sink),
        None,
        window,
        tokio::process::Command::new(&drover).args(["__vertex", "blackhole"]),
    )?;
    let deadline = started + Duration::from_secs(300);
    while sink.counters.acked.load(Ordering::Relaxed) < n as u64 {
        if Instant::now() > deadline {
            bail!(
                "only {} of {n} messages reached the sink within 300 s (map read {})",
                sink.counters.acked.load(Ordering::Relaxed),
                map.counters.read.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    for r in [&mut generator, &mut map, &mut sink] {
        if let Err(e) = r.child.kill().await {
            eprintln!("stopping a replica: {e}");
        }
    }
    Ok(secs)
}

pub async fn run(n: usize) -> Result<()> {
    let pipe = super::buffer::raw_pipe(n)?;
    let mb = (n * SIZE) as f64 / 1e6;
    println!(
        "data path ({n} messages of {SIZE} bytes: generator -> identity map (Rust SDK) -> blackhole, real processes, agent data plane, embedded buffers on disk; no controller hop yet):"
    );
    println!(
        "  raw Unix socket pair        {:10.0} msgs/s  {:7.1} MB/s   (baseline, bytes only)",
        n as f64 / pipe,
        mb / pipe
    );
    for window in [1, 4] {
        let secs = through(n, window).await?;
        println!(
            "  end to end, window {window}         {:10.0} msgs/s  {:7.1} MB/s   (including process start-up)",
            n as f64 / secs,
            mb / secs,
        );
    }
    Ok(())
}
