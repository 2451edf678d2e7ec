//! `drover pipeline ...` through the built binary against `drover up`: a bad file is
//! refused with its line before anything is sent; apply, ls, status, pause, resume,
//! send and delete work, and every listing's `-o json` parses.

mod common;
use common::*;
use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

const ETL: &str = "name: etl
vertices:
  - name: src
    source: { run: { runtime: process, command: [sleep, '600'] } }
  - name: out
    sink: { run: { runtime: process, command: [sleep, '600'] } }
    scale: { min: 1, max: 3 }
edges:
  - { from: src, to: out }
";

const WEB: &str = "name: web
vertices:
  - { name: in, source: { http: {} } }
  - { name: out, sink: { run: { runtime: process, command: [sleep, '600'] } } }
edges:
  - { from: in, to: out }
";

fn ok(out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: stdout:\n{}\nstderr:\n{}",
        stdout(out),
        stderr(out)
    );
}

fn status(up: &Up, name: &str) -> serde_json::Value {
    let out = up.home.run(&["pipeline", "status", name, "-o", "json"]);
    ok(&out, "pipeline status");
    json(&out)
}

fn wait_phase(up: &Up, name: &str, phase: &str) {
    wait_until(&format!("{name} {phase}"), T, || {
        status(up, name)["pipeline"]["status"]["phase"] == phase
    });
}

#[test]
fn pipelines_are_applied_inspected_paused_resumed_fed_and_deleted_from_the_cli() {
    let up = Up::start();
    let dir = up.home.path();

    // A mistake is reported with the file, line and field, and nothing is sent.
    let bad = write(dir, "bad.yaml", &ETL.replace("to: out", "to: nowhere"));
    let out = up
        .home
        .run(&["pipeline", "apply", "-f", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("bad.yaml:9:"), "{err}");
    assert!(err.contains("edges[0].to"), "{err}");
    let ls = json(&up.home.run(&["pipeline", "ls", "-o", "json"]));
    assert_eq!(ls, serde_json::json!([]));

    let etl = write(dir, "etl.yaml", ETL);
    let out = up
        .home
        .run(&["pipeline", "apply", "-f", etl.to_str().unwrap()]);
    ok(&out, "apply");
    assert!(
        stdout(&out).contains("pipeline etl created (version 1)"),
        "{}",
        stdout(&out)
    );
    let out = up.home.run(&[
        "pipeline",
        "apply",
        "-f",
        etl.to_str().unwrap(),
        "-o",
        "json",
    ]);
    ok(&out, "apply again");
    assert_eq!(json(&out)["result"], "unchanged");

    wait_until("etl's replicas to run", T, || {
        let s = status(&up, "etl");
        s["vertices"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["running_replicas"] == 1)
    });
    let ls = json(&up.home.run(&["pipeline", "ls", "-o", "json"]));
    assert_eq!(ls[0]["name"], "etl");
    assert_eq!(ls[0]["phase"], "running");
    let table = stdout(&up.home.run(&["pipeline", "status", "etl"]));
    assert!(
        table.contains("VERTEX") && table.contains("sink/run"),
        "{table}"
    );

    ok(&up.home.run(&["pipeline", "pause", "etl"]), "pause");
    wait_phase(&up, "etl", "paused");
    let s = status(&up, "etl");
    assert_eq!(s["pipeline"]["status"]["drained_on_pause"], true, "{s}");
    ok(
        &up.home.run(&["pipeline", "resume", "etl", "--slow"]),
        "resume",
    );
    wait_phase(&up, "etl", "running");

    // An http source takes messages from arguments and from standard input; they
    // wait in the sink's buffer, which is a plain sleep that never reads.
    let web = write(dir, "web.yaml", WEB);
    ok(
        &up.home
            .run(&["pipeline", "apply", "-f", web.to_str().unwrap()]),
        "apply web",
    );
    wait_phase(&up, "web", "running");
    ok(
        &up.home
            .run(&["pipeline", "send", "web", "in", "a", "b", "--key", "k"]),
        "send",
    );
    let mut child = up
        .home
        .cmd(&["pipeline", "send", "web", "in", "-", "-o", "json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"x\ny\nz\n").unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    let out = rx.recv_timeout(T).expect("send finishes").unwrap();
    ok(&out, "send from stdin");
    assert_eq!(json(&out)["ids"].as_array().unwrap().len(), 3);
    let s = status(&up, "web");
    let pending: u64 = s["vertices"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|v| v["buffers"].as_array().unwrap().clone())
        .map(|b| b["pending"].as_u64().unwrap())
        .sum();
    assert_eq!(pending, 5, "{s}");
    let out = up.home.run(&["pipeline", "send", "web", "out", "a"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not an http source"),
        "{}",
        stderr(&out)
    );

    for name in ["etl", "web"] {
        ok(&up.home.run(&["pipeline", "delete", name]), "delete");
    }
    wait_until("both pipelines to be removed", T, || {
        json(&up.home.run(&["pipeline", "ls", "-o", "json"])) == serde_json::json!([])
    });
    let jobs = json(&up.home.run(&["job", "ls", "-o", "json"]));
    assert_eq!(
        jobs,
        serde_json::json!([]),
        "the vertices' jobs are removed"
    );
}
