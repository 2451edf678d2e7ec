//! `drover-bench pipeline`: a pipeline end to end on `drover up`, as a user runs it:
//! `drover pipeline apply` of the built-in generator → the Rust SDK's identity map → the
//! Rust SDK's counting sink (`tally_sink`), 256-byte messages, on the embedded buffers
//! and on NATS. Measured in the same run: a raw Unix socket pair moving the same bytes
//! (the ceiling of any local data path) and raw JetStream publish + fetch + ack on the
//! same NATS server.
//!
//! The rate is read at the sink, from the wall-clock times of its first and last batch,
//! so process start-up and the time to notice the end are left out. Latency is event
//! time (set by the generator) to arrival at the sink, at a steady rate well below
//! saturation; at full speed it is only the buffers' depth divided by the rate.
//!
//! Then on the embedded pipeline: how long a pause of a drained pipeline takes (pause
//! issued → phase `paused`), and how long from `resume` to the first message at the new
//! sink replica.

use super::{Server, drover_bin};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const SIZE: usize = 256;

/// One summary line of the sink.
#[derive(Clone, Copy, Debug, Default)]
struct Tally {
    received: u64,
    p50_ms: u64,
    p99_ms: u64,
    first_ms: i64,
    last_ms: i64,
}

impl Tally {
    fn parse(line: &str) -> Option<Tally> {
        let rest = &line[line.find("tally ")? + 6..];
        let mut t = Tally::default();
        for field in rest.split_whitespace() {
            let (k, v) = field.split_once('=')?;
            match k {
                "received" => t.received = v.parse().ok()?,
                "p50_ms" => t.p50_ms = v.parse().ok()?,
                "p99_ms" => t.p99_ms = v.parse().ok()?,
                "first_ms" => t.first_ms = v.parse().ok()?,
                "last_ms" => t.last_ms = v.parse().ok()?,
                _ => {}
            }
        }
        Some(t)
    }

    fn rate(&self) -> f64 {
        let secs = (self.last_ms - self.first_ms).max(1) as f64 / 1000.0;
        self.received as f64 / secs
    }
}

fn example(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .context("bench binary has no directory")?
        .join("examples")
        .join(name);
    if !path.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p drover-pipeline --examples` (scripts/bench.sh does)",
            path.display()
        );
    }
    Ok(path)
}

/// The CLI, configured for `server` by the `drover up` it runs.
fn cli(server: &Server, args: &[&str]) -> Result<String> {
    let out = Command::new(drover_bin()?)
        .args(args)
        .env("HOME", server.home.path())
        .env("XDG_CONFIG_HOME", server.home.path().join("config"))
        .env_remove("DROVER_SERVER")
        .env_remove("DROVER_TOKEN")
        .output()?;
    if !out.status.success() {
        bail!(
            "drover {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

struct Bench<'a> {
    server: &'a Server,
    name: &'a str,
}

impl Bench<'_> {
    /// Applies the benchmark pipeline; the spec's highest rate, a million a second, is
    /// more than the machine moves, so the generator is never what holds it back.
    fn apply(&self, backend: &str, rate: u64, total: u64) -> Result<()> {
        let spec = format!(
            r#"name: {name}
vertices:
  - name: gen
    source: {{ generator: {{ rate: {rate}, message_size: {SIZE}, total: {total} }} }}
  - name: map
    map: {{ run: {{ command: [{map:?}] }} }}
  - name: out
    sink: {{ run: {{ command: [{sink:?}] }} }}
edges:
  - {{ from: gen, to: map }}
  - {{ from: map, to: out }}
buffer: {{ backend: {backend} }}
"#,
            name = self.name,
            map = example("identity_map")?.display().to_string(),
            sink = example("tally_sink")?.display().to_string(),
        );
        let path = self.server.home.path().join(format!("{}.yaml", self.name));
        std::fs::write(&path, spec)?;
        cli(self.server, &["pipeline", "apply", "-f", path_str(&path)?])?;
        Ok(())
    }

    /// The sink's latest summary lines, newest last.
    fn tallies(&self) -> Result<Vec<Tally>> {
        let job = format!("{}-out", self.name);
        let logs = cli(self.server, &["logs", &job])?;
        Ok(logs.lines().filter_map(Tally::parse).collect())
    }

    /// Waits until a sink replica has received `n` messages; returns its summary.
    fn wait_received(&self, n: u64, limit: Duration) -> Result<Tally> {
        let deadline = Instant::now() + limit;
        loop {
            // The sink's job appears a moment after the pipeline does, so a failed read
            // is only remembered, for the message should the wait run out.
            let last = match self.tallies() {
                Ok(tallies) => match tallies.into_iter().rfind(|t| t.received >= n) {
                    Some(t) => return Ok(t),
                    None => String::new(),
                },
                Err(e) => format!(" (last read: {e})"),
            };
            if Instant::now() > deadline {
                bail!("the sink did not receive {n} messages within {limit:?}{last}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn phase(&self) -> Result<String> {
        let out = cli(
            self.server,
            &["pipeline", "status", self.name, "-o", "json"],
        )?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        Ok(v["pipeline"]["status"]["phase"]
            .as_str()
            .unwrap_or_default()
            .to_string())
    }

    fn wait_phase(&self, want: &str, limit: Duration) -> Result<Duration> {
        let t0 = Instant::now();
        while self.phase()? != want {
            if t0.elapsed() > limit {
                bail!("pipeline {} not {want} within {limit:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(t0.elapsed())
    }

    fn delete(&self) -> Result<()> {
        cli(self.server, &["pipeline", "delete", self.name])?;
        let t0 = Instant::now();
        while cli(self.server, &["pipeline", "ls", "-o", "json"])?.contains(self.name) {
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("pipeline {} not deleted within 60 s", self.name);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("a temporary path that is not UTF-8")
}

/// Throughput and latency of one backend.
fn measure(server: &Server, backend: &str, n: u64) -> Result<(Tally, Tally)> {
    let fast = Bench {
        server,
        name: "bench-fast",
    };
    fast.apply(backend, 1_000_000, n)?;
    let throughput = fast.wait_received(n, Duration::from_secs(600))?;
    fast.delete()?;
    let steady = Bench {
        server,
        name: "bench-steady",
    };
    let (rate, secs) = (10_000, 5);
    steady.apply(backend, rate, rate * secs)?;
    let latency = steady.wait_received(rate * secs, Duration::from_secs(120))?;
    steady.delete()?;
    Ok((throughput, latency))
}

pub async fn run(n: u64) -> Result<()> {
    let pipe = super::buffer::raw_pipe(n as usize)?;
    let nats = super::buffer_nats::nats_server::NatsServer::try_start()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let payloads: Vec<bytes::Bytes> = (0..n)
        .map(|i| bytes::Bytes::from(vec![(i % 251) as u8; SIZE]))
        .collect();
    let raw_nats = super::buffer_nats::raw(&nats.url(), 0, &payloads).await?;
    println!(
        "pipeline ({n} messages of {SIZE} bytes: generator -> identity map (Rust SDK) -> counting sink (Rust SDK), on drover up):"
    );
    println!(
        "  raw Unix socket pair, bytes only          {:10.0} msgs/s   (ceiling)",
        n as f64 / pipe
    );
    println!(
        "  raw JetStream publish + fetch + ack       {:10.0} msgs/s   (NATS baseline)",
        n as f64 / raw_nats
    );
    let server = Server::start_with("up", &["--nats", &nats.url()])?;
    for backend in ["embedded", "nats"] {
        let (fast, steady) = measure(&server, backend, n)?;
        let versus = if backend == "nats" {
            format!(
                "  {:.2}x raw JetStream",
                fast.rate() / (n as f64 / raw_nats)
            )
        } else {
            String::new()
        };
        println!(
            "  {backend:<9} end to end                  {:10.0} msgs/s{versus}",
            fast.rate()
        );
        println!(
            "  {backend:<9} latency at 10k msgs/s       p50 {} ms, p99 {} ms (at full speed: p50 {} ms, p99 {} ms)",
            steady.p50_ms, steady.p99_ms, fast.p50_ms, fast.p99_ms
        );
    }

    // The lifecycle, on the embedded backend: a steady stream, paused once drained.
    let life = Bench {
        server: &server,
        name: "bench-life",
    };
    life.apply("embedded", 5_000, 1_000_000)?;
    life.wait_received(5_000, Duration::from_secs(120))?;
    let t0 = Instant::now();
    cli(&server, &["pipeline", "pause", life.name])?;
    life.wait_phase("paused", Duration::from_secs(120))?;
    let pause = t0.elapsed();
    let resumed_at = now_ms();
    cli(&server, &["pipeline", "resume", life.name])?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let first = loop {
        if let Some(t) = life
            .tallies()
            .unwrap_or_default()
            .into_iter()
            .find(|t| t.first_ms >= resumed_at)
        {
            break t.first_ms - resumed_at;
        }
        if Instant::now() > deadline {
            bail!("no message reached the sink within 120 s of resuming");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    println!(
        "  pause of a flowing pipeline (5k msgs/s) until paused, drained: {:.0} ms",
        pause.as_secs_f64() * 1000.0
    );
    println!("  resume until the first message at the sink: {first} ms");
    life.delete()?;
    Ok(())
}
