//! Pipelines end to end, the way a user runs them: `drover up`, `drover pipeline apply`
//! of a generator → Python map → Rust sink, and the lifecycle commands, with every part
//! real: the built-in generator as `drover __vertex`, the Python SDK's example map, the
//! Rust SDK's `tally_sink` example, the agent's data plane, and the embedded buffers on
//! the controller's disk (or a real NATS server).
//!
//! The sink appends each record it receives to a file before acknowledging it, so a test
//! reads exactly what arrived, across restarts of anything.

mod common;

#[path = "../../drover-buffer/tests/support/nats_server.rs"]
mod nats_server;

use common::{Home, Up, json, stderr, stdout, wait_until, write};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The Rust SDK's example sink, built on first use when the test command did not build
/// it already.
fn tally_sink() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = Path::new(common::BIN).parent().unwrap();
            let path = dir.join("examples").join("tally_sink");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let out = Command::new(cargo)
                .args(["build", "-p", "drover-pipeline", "--example", "tally_sink"])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .output()
                .unwrap();
            assert!(
                out.status.success() && path.is_file(),
                "building tally_sink: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            path
        })
        .clone()
}

fn sdk() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../sdk/python")
        .canonicalize()
        .unwrap()
}

/// A directory every task user may write to, for the sink's record file.
fn shared_dir(home: &Home) -> PathBuf {
    let dir = home.path().join("shared");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(
        &dir,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o777),
    )
    .unwrap();
    dir
}

/// An empty file in the shared directory for a sink's records. Every replica runs as a
/// user of its own, and a replica started again (after a pause, a crash) is a new one:
/// each must be able to append.
fn records_file(home: &Home, name: &str) -> PathBuf {
    let path = shared_dir(home).join(name);
    std::fs::write(&path, "").unwrap();
    std::fs::set_permissions(
        &path,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o666),
    )
    .unwrap();
    path
}

/// What a test pipeline looks like.
struct Demo {
    name: &'static str,
    total: u64,
    rate: u64,
    /// `embedded` or `nats`.
    backend: &'static str,
    /// The map's command, instead of the Python SDK's upper-casing example.
    map_command: Option<Vec<String>>,
    /// The map's `scale`, when not the default.
    map_scale: &'static str,
    /// The map's `constraints`.
    map_constraints: &'static str,
    extra: &'static str,
}

impl Demo {
    fn new(name: &'static str, total: u64) -> Demo {
        Demo {
            name,
            total,
            rate: 5_000,
            backend: "embedded",
            map_command: None,
            map_scale: "{ min: 1, max: 1 }",
            map_constraints: "[]",
            extra: "",
        }
    }

    /// Writes the spec beside the records file; returns the spec's path and the file.
    fn write(&self, home: &Home) -> (PathBuf, PathBuf) {
        let records = records_file(home, &format!("{}.records", self.name));
        let map_command = self
            .map_command
            .clone()
            .unwrap_or_else(|| vec!["python3".into(), "examples/upper_map.py".into()]);
        let spec = format!(
            r#"name: {name}
vertices:
  - name: gen
    source: {{ generator: {{ rate: {rate}, message_size: 32, total: {total} }} }}
  - name: upper
    map:
      run:
        command: {map_command:?}
        env: {{ PYTHONPATH: "." }}
        runtime_env: {{ working_dir: {sdk:?} }}
        constraints: {map_constraints}
    scale: {map_scale}
  - name: out
    sink:
      run:
        command: [{tally:?}, --out, {records:?}]
edges:
  - {{ from: gen, to: upper }}
  - {{ from: upper, to: out }}
buffer: {{ backend: {backend} }}
{extra}"#,
            name = self.name,
            rate = self.rate,
            total = self.total,
            sdk = sdk().display().to_string(),
            tally = tally_sink().display().to_string(),
            records = records.display().to_string(),
            backend = self.backend,
            map_scale = self.map_scale,
            map_constraints = self.map_constraints,
            extra = self.extra,
        );
        (
            write(home.path(), &format!("{}.yaml", self.name), &spec),
            records,
        )
    }
}

/// The records in the sink's file: each distinct one, and how many lines in all.
fn records(path: &Path) -> (HashSet<String>, usize) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("record "))
        .collect();
    (lines.iter().map(|s| s.to_string()).collect(), lines.len())
}

/// What the generator's single replica makes, upper-cased by the map.
fn expected(total: u64) -> HashSet<String> {
    (0..total).map(|i| format!("G0-{i}")).collect()
}

/// Waits until the sink has every record, then says how many arrived twice.
fn wait_for_every_record(records_file: &Path, total: u64, limit: Duration) -> usize {
    wait_until("every record at the sink", limit, || {
        records(records_file).0.len() as u64 >= total
    });
    let (seen, lines) = records(records_file);
    let want = expected(total);
    let missing: Vec<_> = want.difference(&seen).take(5).collect();
    assert!(missing.is_empty(), "missing at the sink, e.g. {missing:?}");
    let strange: Vec<_> = seen.difference(&want).take(5).collect();
    assert!(strange.is_empty(), "records nobody made: {strange:?}");
    lines - seen.len()
}

fn apply(home: &Home, spec: &Path) {
    let out = home.run(&["pipeline", "apply", "-f", spec.to_str().unwrap()]);
    assert!(out.status.success(), "apply: {}", stderr(&out));
}

fn status(home: &Home, name: &str) -> serde_json::Value {
    let out = home.run(&["pipeline", "status", name, "-o", "json"]);
    assert!(out.status.success(), "status: {}", stderr(&out));
    json(&out)
}

fn phase(home: &Home, name: &str) -> String {
    status(home, name)["pipeline"]["status"]["phase"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn wait_phase(home: &Home, name: &str, want: &str, limit: Duration) {
    wait_until(&format!("pipeline {name} to be {want}"), limit, || {
        phase(home, name) == want
    });
}

/// Deletes every pipeline, so `Up`'s clean-up finds only jobs no controller restarts.
fn delete_pipelines(home: &Home) {
    let out = home.run(&["pipeline", "ls", "-o", "json"]);
    let Ok(list) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
        return;
    };
    for p in list.as_array().into_iter().flatten() {
        if let Some(name) = p["name"].as_str() {
            home.run(&["pipeline", "delete", name]);
        }
    }
    wait_until("every pipeline deleted", Duration::from_secs(60), || {
        let out = home.run(&["pipeline", "ls", "-o", "json"]);
        json(&out).as_array().is_some_and(|a| a.is_empty())
    });
}

#[test]
fn generator_python_map_rust_sink_delivers_every_message_on_embedded_buffers() {
    let up = Up::start();
    let demo = Demo::new("etl", 5_000);
    let (spec, records_file) = demo.write(&up.home);
    apply(&up.home, &spec);
    let doubled = wait_for_every_record(&records_file, demo.total, Duration::from_secs(120));
    eprintln!("{doubled} records arrived more than once");
    let st = status(&up.home, "etl");
    assert_eq!(st["pipeline"]["status"]["phase"], "running", "{st:#}");
    delete_pipelines(&up.home);
}

#[test]
fn the_same_pipeline_on_nats_delivers_every_message() {
    let nats = nats_server::NatsServer::start();
    let up = Up::start_with(&["--nats", &nats.url()]);
    let mut demo = Demo::new("etl-nats", 5_000);
    demo.backend = "nats";
    let (spec, records_file) = demo.write(&up.home);
    apply(&up.home, &spec);
    let doubled = wait_for_every_record(&records_file, demo.total, Duration::from_secs(120));
    eprintln!("{doubled} records arrived more than once");
    delete_pipelines(&up.home);
}

#[test]
fn a_nats_pipeline_is_refused_by_a_controller_without_nats() {
    let up = Up::start();
    let mut demo = Demo::new("nonats", 10);
    demo.backend = "nats";
    let (spec, _) = demo.write(&up.home);
    let out = up
        .home
        .run(&["pipeline", "apply", "-f", spec.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--nats"), "{}", stderr(&out));
    let ls = json(&up.home.run(&["pipeline", "ls", "-o", "json"]));
    assert_eq!(ls.as_array().map(Vec::len), Some(0), "{ls:#}");
}

#[test]
fn pause_drains_every_buffer_and_resume_goes_on_from_there() {
    let up = Up::start();
    let mut demo = Demo::new("pausing", 20_000);
    // Slow enough that the pause lands mid-stream.
    demo.rate = 2_000;
    let (spec, records_file) = demo.write(&up.home);
    apply(&up.home, &spec);
    wait_until(
        "the first records at the sink",
        Duration::from_secs(60),
        || !records(&records_file).0.is_empty(),
    );
    let out = up.home.run(&["pipeline", "pause", "pausing"]);
    assert!(out.status.success(), "pause: {}", stderr(&out));
    wait_phase(&up.home, "pausing", "paused", Duration::from_secs(60));
    let st = status(&up.home, "pausing");
    assert_eq!(st["pipeline"]["status"]["drained_on_pause"], true, "{st:#}");
    // Drained: what the sink has now is everything the source made before it paused,
    // and nothing more arrives while paused.
    let (at_pause, _) = records(&records_file);
    assert!(
        (at_pause.len() as u64) < demo.total,
        "the pause came too late"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(records(&records_file).0.len(), at_pause.len());
    // A second pause of a paused pipeline completes at once.
    let out = up.home.run(&["pipeline", "pause", "pausing"]);
    assert!(out.status.success(), "second pause: {}", stderr(&out));
    wait_phase(&up.home, "pausing", "paused", Duration::from_secs(10));

    let out = up.home.run(&["pipeline", "resume", "pausing"]);
    assert!(out.status.success(), "resume: {}", stderr(&out));
    wait_phase(&up.home, "pausing", "running", Duration::from_secs(30));
    wait_for_every_record(&records_file, demo.total, Duration::from_secs(120));
    delete_pipelines(&up.home);
}

#[test]
fn a_map_that_never_answers_ends_the_pause_at_its_grace() {
    let up = Up::start();
    let mut demo = Demo::new("stuck", 100);
    // A program that connects to nothing and sleeps: whatever reaches its buffer stays
    // there, so the pause cannot drain.
    demo.map_command = Some(vec!["sleep".into(), "600".into()]);
    demo.extra = "lifecycle: { pause_grace: 3s }\n";
    let (spec, _) = demo.write(&up.home);
    apply(&up.home, &spec);
    wait_until(
        "messages waiting for the map",
        Duration::from_secs(60),
        || {
            let st = status(&up.home, "stuck");
            pending_of(&st, "upper") > 0
        },
    );
    let started = std::time::Instant::now();
    let out = up.home.run(&["pipeline", "pause", "stuck"]);
    assert!(out.status.success(), "pause: {}", stderr(&out));
    wait_phase(&up.home, "stuck", "paused", Duration::from_secs(30));
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "paused before the grace"
    );
    let st = status(&up.home, "stuck");
    assert_eq!(
        st["pipeline"]["status"]["drained_on_pause"], false,
        "{st:#}"
    );
    delete_pipelines(&up.home);
}

/// The pending count of a vertex's input buffers, from `status -o json`.
fn pending_of(status: &serde_json::Value, vertex: &str) -> u64 {
    let mut by_vertex: BTreeMap<String, u64> = BTreeMap::new();
    for v in status["vertices"].as_array().into_iter().flatten() {
        let name = v["name"].as_str().unwrap_or_default().to_string();
        let pending = v["buffers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| b["pending"].as_u64())
            .sum();
        by_vertex.insert(name, pending);
    }
    by_vertex.get(vertex).copied().unwrap_or(0)
}

#[test]
fn a_controller_killed_mid_stream_loses_no_message() {
    let up = Up::start();
    let mut demo = Demo::new("crash", 20_000);
    demo.rate = 4_000;
    let (spec, records_file) = demo.write(&up.home);
    apply(&up.home, &spec);
    wait_until(
        "the first records at the sink",
        Duration::from_secs(60),
        || records(&records_file).0.len() > 1_000,
    );
    let up = up.restart_after_kill9();
    let doubled = wait_for_every_record(&records_file, demo.total, Duration::from_secs(180));
    eprintln!("{doubled} records arrived more than once after the crash");
    delete_pipelines(&up.home);
}

#[test]
fn a_bad_pipeline_is_refused_with_its_file_and_line_and_nothing_is_stored() {
    let up = Up::start();
    let spec = write(
        up.home.path(),
        "bad.yaml",
        "name: bad\nvertices:\n  - name: a\n    sink: { log: {} }\n  - name: b\n    source: { generator: {} }\nedges:\n  - { from: a, to: b }\n",
    );
    let out = up
        .home
        .run(&["pipeline", "apply", "-f", spec.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(err.contains("bad.yaml"), "{err}");
    let ls = json(&up.home.run(&["pipeline", "ls", "-o", "json"]));
    assert_eq!(ls.as_array().map(Vec::len), Some(0), "{ls:#}");
}

/// A map that takes 2 ms a message: about 500 messages a second per replica.
const SLOW_SINK: &str = "import time, drover_pipeline as dp\n\
def slow(batch):\n    time.sleep(0.01 * len(batch))\n    return [None] * len(batch)\n\
dp.sink(slow)\n";

const SLOW_MAP: &str = "import time, drover_pipeline as dp\n\
def slow(m):\n    time.sleep(0.002)\n    return [dp.Output(m.payload.upper(), key=m.key)]\n\
dp.map(slow)\n";

/// One vertex of `status -o json`, or null.
fn vertex_of(status: &serde_json::Value, vertex: &str) -> serde_json::Value {
    status["vertices"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == vertex)
        .cloned()
        .unwrap_or_default()
}

/// A vertex's desired replicas and the autoscaler's last reason, from `status -o json`.
fn scaling_of(status: &serde_json::Value, vertex: &str) -> (u64, String) {
    let v = vertex_of(status, vertex);
    (
        v["desired_replicas"].as_u64().unwrap_or(0),
        v["last_scale"]["reason"].as_str().unwrap_or("").to_string(),
    )
}

/// A vertex's desired replicas and the autoscaler's latest decision (a hold included),
/// from `status -o json`.
fn decision_of(status: &serde_json::Value, vertex: &str) -> (u64, String) {
    let v = vertex_of(status, vertex);
    (
        v["desired_replicas"].as_u64().unwrap_or(0),
        v["scale_decision"].as_str().unwrap_or("").to_string(),
    )
}

#[test]
fn a_slow_map_scales_up_to_max_and_back_to_zero_when_the_source_is_done() {
    let up = Up::start();
    let mut demo = Demo::new("scaling", 12_000);
    // Four times what one replica of the slow map does.
    demo.rate = 2_000;
    demo.map_command = Some(vec!["python3".into(), "-c".into(), SLOW_MAP.into()]);
    demo.map_scale = "{ min: 0, max: 3, scale_up_cooldown: 1s, scale_down_cooldown: 1s, \
                      target_processing_seconds: 1s, zero_after: 2s }";
    let (spec, records_file) = demo.write(&up.home);
    apply(&up.home, &spec);
    let mut reasons = Vec::new();
    wait_until(
        "the slow map to scale up to 3",
        Duration::from_secs(90),
        || {
            let (replicas, reason) = scaling_of(&status(&up.home, "scaling"), "upper");
            // Printed as they change, so a run that times out shows what was decided.
            if reasons.last() != Some(&reason) {
                eprintln!("replicas {replicas}: {reason}");
                reasons.push(reason);
            }
            replicas == 3
        },
    );
    assert!(
        reasons.iter().any(|r| r.contains("scaled up")),
        "no reason says why: {reasons:?}"
    );
    wait_for_every_record(&records_file, demo.total, Duration::from_secs(120));
    wait_until(
        "the map to go back to zero",
        Duration::from_secs(90),
        || scaling_of(&status(&up.home, "scaling"), "upper").0 == 0,
    );
    delete_pipelines(&up.home);
}

#[test]
fn back_pressure_downstream_holds_the_maps_scale_up() {
    let up = Up::start();
    // The sink writes 100 messages a second, so its buffer fills to its usage limit;
    // the map, whose backlog would want three replicas at the rate the sink lets it go,
    // must hold at one, since more would only wait on the same full buffer.
    let spec = format!(
        r#"name: held
vertices:
  - name: gen
    source: {{ generator: {{ rate: 5000, message_size: 16, total: 100000 }} }}
  - name: upper
    map:
      run:
        command: [python3, examples/upper_map.py]
        env: {{ PYTHONPATH: "." }}
        runtime_env: {{ working_dir: {sdk:?} }}
    scale: {{ min: 1, max: 3, scale_up_cooldown: 1s, scale_down_cooldown: 1s, target_processing_seconds: 1s }}
  - name: out
    sink:
      run:
        command: [python3, -c, {slow_sink:?}]
        env: {{ PYTHONPATH: "." }}
        runtime_env: {{ working_dir: {sdk:?} }}
edges:
  - {{ from: gen, to: upper }}
  - {{ from: upper, to: out }}
buffer: {{ max_length: 2000, usage_limit: 0.5 }}
"#,
        sdk = sdk().display().to_string(),
        slow_sink = SLOW_SINK,
    );
    let path = write(up.home.path(), "held.yaml", &spec);
    apply(&up.home, &path);
    let mut seen = Vec::new();
    let mut most = 0;
    wait_until(
        "the map's scale-up to be held by the full sink buffer",
        Duration::from_secs(90),
        || {
            let (replicas, reason) = decision_of(&status(&up.home, "held"), "upper");
            most = most.max(replicas);
            if seen.last() != Some(&reason) {
                eprintln!("replicas {replicas}: {reason}");
                seen.push(reason.clone());
            }
            reason.contains("(wants") && reason.contains("default.held.out.0 is full")
        },
    );
    // And it stays at one while the sink holds everything back.
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < until {
        let (replicas, reason) = decision_of(&status(&up.home, "held"), "upper");
        most = most.max(replicas);
        if seen.last() != Some(&reason) {
            eprintln!("replicas {replicas}: {reason}");
            seen.push(reason);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(most, 1, "the map scaled up under back-pressure: {seen:?}");
    delete_pipelines(&up.home);
}

#[test]
fn edges_route_by_the_tags_the_map_gives() {
    let up = Up::start();
    let (tagged, untagged) = (
        records_file(&up.home, "tagged.records"),
        records_file(&up.home, "untagged.records"),
    );
    let total = 1_000;
    // The example map tags every message it upper-cases `upper`: all of them take the
    // edge that wants the tag, none the edge that refuses it.
    let spec = format!(
        r#"name: routes
vertices:
  - name: gen
    source: {{ generator: {{ rate: 5000, message_size: 16, total: {total} }} }}
  - name: upper
    map:
      run:
        command: [python3, examples/upper_map.py]
        env: {{ PYTHONPATH: "." }}
        runtime_env: {{ working_dir: {sdk:?} }}
  - name: tagged
    sink: {{ run: {{ command: [{tally:?}, --out, {tagged:?}] }} }}
  - name: untagged
    sink: {{ run: {{ command: [{tally:?}, --out, {untagged:?}] }} }}
edges:
  - {{ from: gen, to: upper }}
  - {{ from: upper, to: tagged, condition: {{ tags: {{ any: [upper] }} }} }}
  - {{ from: upper, to: untagged, condition: {{ tags: {{ none: [upper] }} }} }}
"#,
        sdk = sdk().display().to_string(),
        tally = tally_sink().display().to_string(),
        tagged = tagged.display().to_string(),
        untagged = untagged.display().to_string(),
    );
    let path = write(up.home.path(), "routes.yaml", &spec);
    apply(&up.home, &path);
    wait_for_every_record(&tagged, total, Duration::from_secs(60));
    // The other edge's sink has run all along and received nothing.
    let st = status(&up.home, "routes");
    assert_eq!(pending_of(&st, "untagged"), 0, "{st:#}");
    assert!(records(&untagged).0.is_empty());
    delete_pipelines(&up.home);
}

#[test]
fn an_agent_killed_mid_stream_loses_no_message() {
    let up = Up::start();
    let join = std::fs::read_to_string(up.home.path().join("data/drover/join-token")).unwrap();
    let worker_dir = up.home.path().join("worker");
    // A second node, the only one the map may run on, so killing it kills the agent
    // that serves the map's data plane and nothing else.
    let start_worker = || {
        let mut cmd = up.home.cmd(&[
            "agent",
            "--server",
            &up.url,
            "--join-token",
            join.trim(),
            "--data-dir",
            worker_dir.to_str().unwrap(),
            "--name",
            "worker",
            "--label",
            "role=worker",
        ]);
        cmd.env("DROVER_LOG", "info");
        common::spawn_cmd(cmd, "connected to").0
    };
    let mut worker = start_worker();
    let mut demo = Demo::new("agentcrash", 20_000);
    demo.rate = 4_000;
    demo.map_constraints = "[{ key: label.role, value: worker }]";
    let (spec, records_file) = demo.write(&up.home);
    apply(&up.home, &spec);
    wait_until(
        "the first records at the sink",
        Duration::from_secs(60),
        || records(&records_file).0.len() > 1_000,
    );
    worker.kill9();
    let worker = start_worker();
    // What the killed agent held was leased to it for 30 s; the controller gives it back
    // when the agent's connection drops, so everything arrives well before the lease
    // would have ended.
    let killed_at = std::time::Instant::now();
    let doubled = wait_for_every_record(&records_file, demo.total, Duration::from_secs(25));
    eprintln!(
        "every record arrived {:.1} s after the kill",
        killed_at.elapsed().as_secs_f64()
    );
    eprintln!("{doubled} records arrived more than once after the agent's crash");
    delete_pipelines(&up.home);
    drop(worker);
}
