//! Day-two use of the CLI through the built binary: commands end quietly when their
//! reader goes away, `drover run` treats SIGTERM and SIGHUP as Ctrl-C and leaves nothing
//! behind, and a job that waits says why.

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

/// Runs `cmd` with a stdout whose reader is already gone, as `drover ... | head -1`
/// leaves it once `head` has its line, and returns how it ended and its stderr.
fn with_reader_gone(mut cmd: Command, limit: Duration) -> (std::process::ExitStatus, String) {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    cmd.stdout(writer).stderr(Stdio::piped());
    let out = finish_within(cmd, limit);
    (out.status, stderr(&out))
}

fn assert_quiet_end(what: &str, status: std::process::ExitStatus, err: &str) {
    assert_eq!(status.code(), Some(0), "{what}: {status:?}, stderr: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("Broken pipe") && !err.contains("error"),
        "{what}: {err}"
    );
}

#[test]
fn every_command_ends_quietly_when_its_reader_goes_away() {
    let up = Up::start();
    let h = &up.home;
    let apply = |file: &str, yaml: &str| {
        let path = write(h.path(), file, yaml);
        let out = h.run(&["job", "apply", "-f", path.to_str().unwrap()]);
        assert!(out.status.success(), "{}", stderr(&out));
    };
    apply(
        "chatty.yaml",
        "name: chatty\nkind: service\ncommand: [sh, -c, 'while true; do echo tick; sleep 0.1; done']\nstop_grace: 1s\n",
    );
    apply(
        "quiet.yaml",
        "name: quiet\nkind: service\ncommand: [sh, -c, 'echo once; exec sleep 600']\nstop_grace: 1s\n",
    );
    wait_until("both jobs to print", T, || {
        stdout(&h.run(&["logs", "chatty"])).contains("tick")
            && stdout(&h.run(&["logs", "quiet"])).contains("once")
    });

    for args in [
        &["job", "status", "chatty"][..],
        &["job", "ls"],
        &["task", "ls"],
        &["task", "ls", "-o", "json"],
        &["node", "ls"],
        &["completions", "zsh"],
        &["completions", "bash"],
        // A follow of a task that prints all the time fails its next write...
        &["logs", "-f", "chatty"],
        // ...and one of a task that prints nothing more notices the closed pipe itself.
        &["logs", "-f", "quiet"],
    ] {
        let (status, err) = with_reader_gone(h.cmd(args), T);
        assert_quiet_end(&args.join(" "), status, &err);
    }
}

/// Starts `drover run` with piped output; returns the child and a channel of its
/// stdout and stderr lines, each prefixed with `out: ` or `err: `.
fn spawn_run(cmd: &mut Command) -> (Child, mpsc::Receiver<String>) {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let (tx, rx) = mpsc::channel();
    for (prefix, pipe) in [
        (
            "out: ",
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        ),
        ("err: ", Box::new(child.stderr.take().unwrap())),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = tx.send(format!("{prefix}{line}"));
            }
        });
    }
    (child, rx)
}

/// Waits for a line containing `want`, failing with every line seen.
fn expect_line(rx: &mpsc::Receiver<String>, want: &str) -> String {
    let deadline = Instant::now() + T;
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(want) => return line,
            Ok(line) => seen.push(line),
            Err(_) => break,
        }
    }
    panic!("no line with {want:?} within {T:?}; saw: {seen:#?}");
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

fn wait_exit(mut child: Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + T;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "drover run did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn pid_in(line: &str) -> i32 {
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
fn sigterm_and_sighup_stop_a_throwaway_run_and_leave_nothing_behind() {
    for (sig, code) in [(libc::SIGTERM, 143), (libc::SIGHUP, 129)] {
        let home = Home::new();
        let tmp = home.path().join("tmp");
        std::fs::create_dir(&tmp).unwrap();
        let mut cmd = home.cmd(&["run", "--", "sh", "-c", "echo pid $$; exec sleep 600"]);
        cmd.env("TMPDIR", &tmp);
        let (child, rx) = spawn_run(&mut cmd);
        let pid = pid_in(&expect_line(&rx, "out: pid "));
        assert!(pid_alive(pid));
        let entries = std::fs::read_dir(&tmp).unwrap().count();
        assert_eq!(entries, 1, "the throwaway cluster lives in TMPDIR");

        signal(&child, sig);
        let status = wait_exit(child);
        assert_eq!(status.code(), Some(code), "signal {sig}");
        assert!(
            !pid_alive(pid),
            "signal {sig}: the task's process outlived drover run"
        );
        let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().collect();
        assert!(left.is_empty(), "signal {sig}: left behind {left:?}");
    }
}

#[test]
fn a_run_says_why_it_waits_and_sigterm_stops_its_job() {
    let up = Up::start();
    let (child, rx) = spawn_run(&mut up.home.cmd(&[
        "run", "--name", "huge", "--cpu", "64", "--", "echo", "never",
    ]));
    let line = expect_line(&rx, "err: drover: waiting:");
    assert!(line.contains("cpu 64"), "{line}");
    // A follow of the same job says it too.
    let (logs, logs_rx) = spawn_run(&mut up.home.cmd(&["logs", "-f", "huge"]));
    let line = expect_line(&logs_rx, "err: drover: waiting:");
    assert!(line.contains("cpu 64"), "{line}");

    signal(&child, libc::SIGTERM);
    assert_eq!(wait_exit(child).code(), Some(143));
    assert_eq!(up.job_status("huge"), "stopped");
    // The follow ends with the job.
    assert!(wait_exit(logs).success());
}

#[test]
fn a_run_whose_reader_goes_away_stops_its_job() {
    let up = Up::start();
    let cmd = up.home.cmd(&[
        "run",
        "--name",
        "talker",
        "--",
        "sh",
        "-c",
        "while true; do echo tick; sleep 0.1; done",
    ]);
    let (status, err) = with_reader_gone(cmd, T);
    assert_quiet_end("run", status, &err);
    wait_until("the job to stop", T, || {
        up.job_status("talker") == "stopped"
    });
}

#[test]
fn run_replaces_a_job_of_another_kind_only_when_asked() {
    let up = Up::start();
    let h = &up.home;
    let web = write(
        h.path(),
        "web.yaml",
        "name: web\nkind: service\ncommand: [sh, -c, 'exec sleep 600']\nstop_grace: 1s\n",
    );
    assert!(
        h.run(&["job", "apply", "-f", web.to_str().unwrap()])
            .status
            .success()
    );
    let refused = h.run(&["run", "--name", "web", "--", "echo", "x"]);
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    let err = stderr(&refused);
    assert!(
        err.contains("job web is a service job") && err.contains("--replace"),
        "{err}"
    );
    let status = json(&h.run(&["job", "status", "web", "-o", "json"]));
    assert_eq!(status["job"]["version"], 1, "{status}");
    assert_eq!(status["job"]["spec"]["kind"], "service", "{status}");

    // With --replace it becomes a batch job; a run of the same kind and runtime after
    // that needs no flag and is a new version, as before.
    let replaced = h.run(&["run", "--name", "web", "--replace", "--", "echo", "x"]);
    assert!(replaced.status.success(), "{}", stderr(&replaced));
    assert_eq!(stdout(&replaced), "x\n");
    let again = h.run(&["run", "--name", "web", "--", "echo", "y"]);
    assert!(again.status.success(), "{}", stderr(&again));
    let status = json(&h.run(&["job", "status", "web", "-o", "json"]));
    assert_eq!(status["job"]["version"], 3, "{status}");
}

#[test]
fn apply_and_stop_wait_until_the_job_gets_there_unless_detached() {
    let up = Up::start();
    let h = &up.home;
    let apply = |file: &str, yaml: &str, extra: &[&str]| {
        let path = write(h.path(), file, yaml);
        let mut args = vec!["job", "apply", "-f", path.to_str().unwrap()];
        args.extend_from_slice(extra);
        h.run(&args)
    };
    let web =
        "name: web\nkind: service\ncount: 2\ncommand: [sh, -c, 'exec sleep 600']\nstop_grace: 1s\n";
    let out = apply("web.yaml", web, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("job web: 2/2 running"),
        "{}",
        stdout(&out)
    );
    // Running when apply returned, not some time after.
    let tasks = json(&h.run(&["task", "ls", "--job", "web", "-o", "json"]));
    let running = tasks
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["state"] == "running")
        .count();
    assert_eq!(running, 2, "{tasks}");
    // Memory in units people read: two tasks of the default 64Mi.
    let nodes = stdout(&h.run(&["node", "ls"]));
    assert!(
        nodes.contains(" 128.0 MiB/") && !nodes.contains("Ki "),
        "{nodes}"
    );

    let out = h.run(&["job", "stop", "web"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "job web stopped\n");
    let tasks = json(&h.run(&["task", "ls", "--job", "web", "-o", "json"]));
    assert!(
        tasks
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["state"] == "stopped"),
        "{tasks}"
    );
    let out = h.run(&["job", "stop", "web"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "job web has already stopped\n");

    // A job no node can ever run: the wait ends at once and says why; the job stays
    // queued. One that waits for room gives up at its timeout.
    let huge = "name: huge\nkind: service\nresources: { cpu: 64 }\ncommand: [sleep, '600']\n";
    let out = apply("huge.yaml", huge, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(
            "job huge is blocked: no node can run it: 1 node is too small (the task needs cpu 64"
        ),
        "{err}"
    );
    assert_eq!(up.job_status("huge"), "running");
    let listing = stdout(&h.run(&["job", "ls"]));
    assert!(
        listing
            .lines()
            .any(|l| l.trim_start().starts_with("huge ") && l.contains(" blocked ")),
        "{listing}"
    );
    let cores = json(&h.run(&["node", "ls", "-o", "json"]))[0]["info"]["capacity"]["cpu"]
        .as_f64()
        .unwrap();
    let fills = format!(
        "name: fills\nkind: service\nresources: {{ cpu: {cores} }}\ncommand: [sleep, '600']\nstop_grace: 1s\n"
    );
    assert!(apply("fills.yaml", &fills, &[]).status.success());
    let start = Instant::now();
    let out = apply(
        "room.yaml",
        "name: room\nkind: service\nresources: { cpu: 1 }\ncommand: [sleep, '600']\n",
        &["--timeout", "2s"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("job room did not run within 2s") && err.contains("lacks free resources"),
        "{err}"
    );
    assert!(start.elapsed() < Duration::from_secs(20));
    assert!(h.run(&["job", "stop", "fills"]).status.success());
    let out = apply(
        "huge2.yaml",
        &huge.replace("name: huge", "name: huge2"),
        &["--detach"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "job huge2 created (version 1)\n");

    // A service that cannot start: the wait ends when its attempts keep failing.
    let crash = "name: crash\nkind: service\ncommand: [sh, -c, 'echo boom >&2; exit 3']\nrestart: { delay: 100ms }\n";
    let out = apply("crash.yaml", crash, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("job crash is crash-looping: task 0 exited with code 3"),
        "{}",
        stderr(&out)
    );
    // One row per task index, with its restarts; every attempt with --all.
    let rows = stdout(&h.run(&["task", "ls", "--job", "crash"]));
    let rows: Vec<&str> = rows.lines().skip(1).collect();
    assert_eq!(rows.len(), 1, "{rows:?}");
    let all = stdout(&h.run(&["task", "ls", "--job", "crash", "--all"]));
    let attempts = all.lines().skip(1).count();
    assert!(attempts >= 3, "{all}");
    let restarts: usize = rows[0].split_whitespace().nth(4).unwrap().parse().unwrap();
    assert!(restarts >= 2, "{rows:?}");
}

fn names_in(listing: &serde_json::Value, field: &str) -> Vec<String> {
    listing
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v[field].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn each_up_adds_a_context_and_every_command_can_pick_one() {
    let home = Home::new();
    let port_of = |line: &str| url_in(line).rsplit(':').next().unwrap().to_string();
    let (_up1, line1) = home.spawn(&["up", "--listen", "127.0.0.1:0"], "drover is up at");
    let first = format!("local-{}", port_of(&line1));
    let d2 = home.path().join("second");
    let (_up2, line2) = home.spawn(
        &[
            "up",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            d2.to_str().unwrap(),
        ],
        "drover is up at",
    );
    let second = format!("local-{}", port_of(&line2));
    let contexts = json(&home.run(&["context", "ls", "-o", "json"]));
    assert_eq!(names_in(&contexts, "name").len(), 2, "{contexts}");
    let current: Vec<_> = contexts
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["current"] == true)
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        current,
        std::slice::from_ref(&second),
        "the latest up is the current context"
    );
    assert!(
        !contexts.to_string().contains("drv_"),
        "no token in a listing: {contexts}"
    );

    // A job on the second cluster; the first, still running, is reachable by name.
    let out = home.run(&["run", "--name", "on-two", "--", "true"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let jobs = |extra: &[&str], env: Option<&str>| {
        let mut args = vec!["job", "ls", "-o", "json"];
        args.extend_from_slice(extra);
        let mut cmd = home.cmd(&args);
        if let Some(ctx) = env {
            cmd.env("DROVER_CONTEXT", ctx);
        }
        let out = run_with_timeout(cmd, T);
        assert!(out.status.success(), "{}", stderr(&out));
        names_in(&json(&out), "name")
    };
    assert_eq!(jobs(&[], None), ["on-two"]);
    assert!(jobs(&["--context", &first], None).is_empty());
    assert!(jobs(&[], Some(&first)).is_empty());
    assert!(home.run(&["context", "use", &first]).status.success());
    assert!(jobs(&[], None).is_empty());

    assert!(
        home.run(&["context", "rename", &first, "one"])
            .status
            .success()
    );
    assert!(jobs(&["--context", "one"], None).is_empty());
    assert!(home.run(&["context", "rm", "one"]).status.success());
    let out = home.run(&["--context", "one", "job", "ls"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no context named \"one\"") && stderr(&out).contains(&second),
        "{}",
        stderr(&out)
    );

    // Errors in plain words: no Rust debug text, no YAML library jargon.
    let out = home.run(&["--context", &second, "--project", "nope", "job", "ls"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("project \"nope\"") && !stderr(&out).contains("ProjectId"),
        "{}",
        stderr(&out)
    );
    let bad = write(
        home.path(),
        "bad.yaml",
        "name: bad\ncount: three\ncommand: echo hi\n",
    );
    let out = home.run(&[
        "--context",
        &second,
        "job",
        "apply",
        "-f",
        bad.to_str().unwrap(),
    ]);
    assert!(
        stderr(&out)
            .contains("bad.yaml:2:8: count: expected a whole number, 0 or more, found three"),
        "{}",
        stderr(&out)
    );

    // A token made with --save is a context of its own, in the token's project.
    assert!(
        home.run(&["--context", &second, "project", "create", "team-a"])
            .status
            .success()
    );
    let out = home.run(&[
        "--context",
        &second,
        "--project",
        "team-a",
        "token",
        "create",
        "--role",
        "write",
        "--save",
        "team-a",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = home.run(&["run", "--name", "in-a", "--", "true"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let listing = json(&home.run(&["--context", &second, "job", "ls", "-o", "json"]));
    let in_a = listing
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["name"] == "in-a")
        .unwrap_or_else(|| panic!("{listing}"));
    assert_eq!(in_a["project"], "team-a");

    // A config file from before contexts still works, as one context.
    let old = Home::new();
    let token = std::fs::read_to_string(d2.join("admin-token")).unwrap();
    std::fs::create_dir_all(old.path().join("config/drover")).unwrap();
    write(
        &old.path().join("config/drover"),
        "config.yaml",
        &format!("server: {}\ntoken: {}\n", url_in(&line2), token.trim()),
    );
    let out = old.run(&["job", "ls", "-o", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(names_in(&json(&out), "name").contains(&"on-two".to_string()));
    let listed = json(&old.run(&["context", "ls", "-o", "json"]));
    assert_eq!(names_in(&listed, "name"), ["default"]);
}

#[test]
fn an_agent_whose_join_token_is_refused_exits_with_the_reason() {
    let home = Home::new();
    let data = home.path().join("server");
    let (_server, line) = home.spawn(
        &[
            "server",
            "--insecure-http",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
        ],
        "listening on",
    );
    let agent_dir = home.path().join("agent");
    let mut cmd = home.cmd(&[
        "agent",
        "--server",
        &url_in(&line),
        "--data-dir",
        agent_dir.to_str().unwrap(),
    ]);
    cmd.env("DROVER_JOIN_TOKEN", "drj_not-the-token");
    let out = run_with_timeout(cmd, T);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("did not accept the join token"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn logs_take_a_tail_a_task_index_and_json_and_specs_come_from_stdin() {
    let up = Up::start();
    let h = &up.home;
    let mut apply = h.cmd(&["job", "apply", "-f", "-"]);
    apply
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = apply.spawn().unwrap();
    std::io::Write::write_all(
        &mut child.stdin.take().unwrap(),
        b"name: lines\ncount: 2\ncommand: [sh, -c, 'for i in 1 2 3 4 5; do echo line $i; done']\n",
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    wait_until("the job to complete", T, || {
        up.job_status("lines") == "complete"
    });

    let all = stdout(&h.run(&["logs", "lines"]));
    for index in 0..2 {
        let own: Vec<&str> = all
            .lines()
            .filter(|l| l.starts_with(&format!("[{index}] ")))
            .collect();
        assert_eq!(own.len(), 5, "task {index}: {all}");
        assert_eq!(own[4], format!("[{index}] line 5"));
    }
    assert_eq!(all.lines().count(), 10, "{all}");
    let tail = stdout(&h.run(&["logs", "--tail", "2", "lines"]));
    let mut tail: Vec<&str> = tail.lines().collect();
    tail.sort_unstable();
    assert_eq!(
        tail,
        ["[0] line 4", "[0] line 5", "[1] line 4", "[1] line 5"]
    );
    assert_eq!(
        stdout(&h.run(&["logs", "lines/1"])),
        "line 1\nline 2\nline 3\nline 4\nline 5\n"
    );
    let out = h.run(&["logs", "lines/7"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("job lines has no task of index 7 (its indexes: 0, 1)"),
        "{}",
        stderr(&out)
    );
    let ndjson = stdout(&h.run(&["logs", "-o", "json", "lines/0"]));
    let text: String = ndjson
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("{e}: {l}"))
        })
        .filter_map(|v| v["data"].as_str().map(str::to_string))
        .collect();
    assert_eq!(text, "line 1\nline 2\nline 3\nline 4\nline 5\n");

    // Task ids can be typed: tables show 8 random digits, any unique prefix names a
    // task (with or without `task-`), and a prefix several tasks share lists them.
    let table = stdout(&h.run(&["task", "ls", "--job", "lines"]));
    let tasks = json(&h.run(&["task", "ls", "--job", "lines", "-o", "json"]));
    let tasks = tasks.as_array().unwrap();
    assert_eq!(tasks.len(), 2, "{tasks:?}");
    for t in tasks {
        let id = t["id"].as_str().unwrap();
        assert_eq!(id.len(), "task-".len() + 16, "{id}");
        assert!(table.contains(&format!("{} ", &id[..13])), "{table}");
        assert!(!table.contains(id), "the whole id in the table: {table}");
        let bare = &id["task-".len()..13];
        let logs = h.run(&["logs", bare]);
        assert_eq!(
            stdout(&logs),
            "line 1\nline 2\nline 3\nline 4\nline 5\n",
            "{}",
            stderr(&logs)
        );
    }
    let out = h.run(&["logs", "task-"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("task id prefix \"task-\" matches 2 tasks"),
        "{err}"
    );
    for t in tasks {
        let named = format!("{} (lines/{})", t["id"].as_str().unwrap(), t["index"]);
        assert!(err.contains(&named), "{named} not in: {err}");
    }

    // A command without JSON output refuses -o json.
    let out = h.run(&["run", "-o", "json", "--", "true"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("has no JSON output"),
        "{}",
        stderr(&out)
    );

    // -f with --tail 0 starts at the end: the first line it prints is a new one.
    let counter = write(
        h.path(),
        "counter.yaml",
        "name: counter\nkind: service\ncommand: [sh, -c, 'i=0; while true; do echo n $i; i=$((i+1)); sleep 0.05; done']\nstop_grace: 1s\n",
    );
    assert!(
        h.run(&["job", "apply", "-f", counter.to_str().unwrap()])
            .status
            .success()
    );
    wait_until("the counter to pass 20", T, || {
        stdout(&h.run(&["logs", "counter"])).contains("n 20\n")
    });
    let (mut follow, rx) = spawn_run(&mut h.cmd(&["logs", "-f", "--tail", "0", "counter"]));
    let first = expect_line(&rx, "out: n ");
    let n: u64 = first.trim_start_matches("out: n ").parse().unwrap();
    assert!(n > 20, "followed from the start: {first}");
    follow.kill().unwrap();
    follow.wait().unwrap();
}

#[test]
fn version_prints_the_client_and_the_server_with_their_commits() {
    let up = Up::start();
    let out = up.home.run(&["version", "-o", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v = json(&out);
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    assert_eq!(v["client"]["commit"], head.as_str(), "{v}");
    assert_eq!(v["server"], v["client"], "the same build serves: {v}");
    assert_eq!(v["client"]["version"], env!("CARGO_PKG_VERSION"));
    let text = stdout(&up.home.run(&["version"]));
    assert!(
        text.starts_with(&format!(
            "client: drover {} (commit {head})\nserver: drover ",
            env!("CARGO_PKG_VERSION")
        )),
        "{text}"
    );
}

#[test]
fn finished_jobs_can_be_removed_and_one_off_runs_do_not_pile_up() {
    let up = Up::start();
    let h = &up.home;
    let out = h.run(&["run", "--", "echo", "a"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = h.run(&["run", "--name", "named", "--", "echo", "b"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let jobs = json(&h.run(&["job", "ls", "-o", "json"]));
    for j in jobs.as_array().unwrap() {
        let retention = &j["spec"]["retention"];
        if j["name"] == "named" {
            assert!(retention.is_null(), "{j}");
        } else {
            assert!(j["name"].as_str().unwrap().starts_with("run-"), "{j}");
            assert!(
                !retention.is_null(),
                "a one-off run is kept for a while only: {j}"
            );
        }
    }

    let out = h.run(&["run", "--rm", "--name", "gone", "--", "echo", "c"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "c\n");
    assert_eq!(h.run(&["job", "status", "gone"]).status.code(), Some(4));

    // A running job is refused; once stopped, every version goes, with its logs.
    let svc = |word: &str| {
        format!(
            "name: svc\nkind: service\ncommand: [sh, -c, 'echo {word}; exec sleep 600']\nstop_grace: 1s\n"
        )
    };
    for word in ["one", "two"] {
        let file = write(h.path(), "svc.yaml", &svc(word));
        assert!(
            h.run(&["job", "apply", "-f", file.to_str().unwrap()])
                .status
                .success()
        );
    }
    let out = h.run(&["job", "rm", "svc"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("stop it first"), "{}", stderr(&out));
    assert!(h.run(&["job", "stop", "svc"]).status.success());
    let out = h.run(&["job", "rm", "svc"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "removed job svc (2 versions, 2 tasks)\n");
    assert_eq!(h.run(&["job", "status", "svc"]).status.code(), Some(4));
    assert_eq!(h.run(&["logs", "svc"]).status.code(), Some(4));
}

#[test]
fn watch_shows_a_listing_again_until_the_job_ends_or_ctrl_c() {
    let up = Up::start();
    let h = &up.home;
    let batch = write(
        h.path(),
        "nap.yaml",
        "name: nap\ncommand: [sh, -c, 'sleep 2']\n",
    );
    assert!(
        h.run(&["job", "apply", "-f", batch.to_str().unwrap()])
            .status
            .success()
    );
    // It ends by itself once the job has, with the final state shown last.
    let out = h.run(&["job", "status", "--watch", "nap"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let showings: Vec<&str> = text.split("--- ").filter(|s| !s.is_empty()).collect();
    assert!(showings.len() >= 2, "{text}");
    assert!(
        showings.last().unwrap().contains("state:    succeeded"),
        "{text}"
    );
    assert!(showings[0].contains("state:    running"), "{text}");

    // A task listing goes on until Ctrl-C.
    let (child, rx) = spawn_run(&mut h.cmd(&["task", "ls", "--watch", "--job", "nap"]));
    for _ in 0..3 {
        expect_line(&rx, "out: --- ");
    }
    signal(&child, libc::SIGINT);
    assert!(wait_exit(child).success());
}

#[test]
fn listings_across_projects_show_the_project_and_a_shared_name_asks_which() {
    let up = Up::start();
    let h = &up.home;
    for p in ["pa", "pb"] {
        assert!(h.run(&["project", "create", p]).status.success());
        let out = h.run(&["--project", p, "run", "--name", "web", "--", "true"]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let out = h.run(&["job", "status", "web"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("job \"web\" exists in projects pa, pb; say which with --project"),
        "{}",
        stderr(&out)
    );
    assert!(
        h.run(&["--project", "pa", "job", "status", "web"])
            .status
            .success()
    );
    let jobs = stdout(&h.run(&["job", "ls"]));
    let header = jobs.lines().next().unwrap_or_default();
    assert!(header.trim_start().starts_with("PROJECT"), "{jobs}");
    assert!(jobs.contains(" pa ") && jobs.contains(" pb "), "{jobs}");
    let tasks = stdout(&h.run(&["task", "ls"]));
    assert!(
        tasks
            .lines()
            .next()
            .unwrap_or_default()
            .contains(" PROJECT "),
        "{tasks}"
    );
    // Within one project there is nothing to tell apart.
    let one = stdout(&h.run(&["--project", "pa", "job", "ls"]));
    assert!(!one.contains("PROJECT"), "{one}");
}

#[test]
fn history_lists_the_versions_and_revert_applies_an_earlier_one() {
    let up = Up::start();
    let h = &up.home;
    for word in ["one", "two"] {
        let file = write(
            h.path(),
            "svc.yaml",
            &format!(
                "name: svc\nkind: service\ncommand: [sh, -c, 'echo {word}; exec sleep 600']\nstop_grace: 1s\nupdate: {{ min_healthy_time: 1s }}\n"
            ),
        );
        assert!(
            h.run(&["job", "apply", "-f", file.to_str().unwrap()])
                .status
                .success()
        );
    }
    let out = h.run(&["job", "revert", "svc", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("job svc: rolling out version 3 (the spec of version 1)"),
        "{}",
        stdout(&out)
    );
    wait_until("the reverted task to print", T, || {
        stdout(&h.run(&["logs", "svc"])) == "one\n"
    });

    let history = stdout(&h.run(&["job", "history", "svc"]));
    let rows: Vec<Vec<&str>> = history
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    let summary: Vec<(&str, &str)> = rows.iter().map(|r| (r[0], r[1])).collect();
    assert_eq!(
        summary,
        [("3", "running"), ("2", "stopped"), ("1", "stopped")],
        "{history}"
    );
    assert!(
        rows[0].contains(&"command") && rows[1].contains(&"command"),
        "{history}"
    );
    let versions = json(&h.run(&["job", "history", "svc", "-o", "json"]));
    assert_eq!(
        versions[2]["spec"], versions[0]["spec"],
        "version 3 is version 1's spec"
    );

    // Earlier versions' tasks are listed only when asked for.
    let count = |args: &[&str]| json(&h.run(args)).as_array().map_or(0, Vec::len);
    assert_eq!(count(&["task", "ls", "--job", "svc", "-o", "json"]), 1);
    assert_eq!(
        count(&["task", "ls", "--job", "svc", "--all", "-o", "json"]),
        3
    );

    let out = h.run(&["job", "revert", "svc", "9"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no version 9 kept (it has: 3, 2, 1)"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn apply_waits_for_a_rollout_and_fails_with_the_reason_when_a_new_task_fails() {
    let up = Up::start();
    let h = &up.home;
    let spec = |cmd: &str| {
        format!(
            "name: web\nkind: service\ncount: 3\ncommand: [sh, -c, '{cmd}']\nstop_grace: 1s\nupdate: {{ max_parallel: 1, min_healthy_time: 1s }}\n"
        )
    };
    let apply = |cmd: &str| {
        let file = write(h.path(), "web.yaml", &spec(cmd));
        run_with_timeout(
            h.cmd(&["job", "apply", "-f", file.to_str().unwrap()]),
            Duration::from_secs(90),
        )
    };
    let out = apply("echo one; exec sleep 600");
    assert!(out.status.success(), "{}", stderr(&out));

    // A new version rolls over one task at a time, each running a second before the
    // next, and apply returns once the last has.
    let began = Instant::now();
    let out = apply("echo two; exec sleep 600");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        began.elapsed() >= Duration::from_secs(3),
        "{:?}",
        began.elapsed()
    );
    let said = stdout(&out);
    assert!(
        said.starts_with("job web: rolling out version 2 (from version 1)\n"),
        "{said}"
    );
    assert!(
        said.contains("job web: version 2 rolled out: 3/3 running"),
        "{said}"
    );

    // A new version whose task fails stops after its first index, and apply says why.
    let out = apply("exit 1");
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(
        err.contains("rollout to version 3 failed: web[0] exited with code 1; the old tasks not replaced keep running"),
        "{err}"
    );
    assert!(err.contains("drover job revert web 2"), "{err}");
    let status = stdout(&h.run(&["job", "status", "web"]));
    assert!(status.contains("state:    rollout-failed\n"), "{status}");
    assert!(
        status.contains("rollout:  rollout to version 3 failed: web[0] exited with code 1\n"),
        "{status}"
    );
    // The two old tasks not replaced still run, listed beside the new version's.
    let tasks = json(&h.run(&["task", "ls", "--job", "web", "-o", "json"]));
    let running: Vec<(u64, u64)> = tasks
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["state"] == "running")
        .map(|t| (t["index"].as_u64().unwrap(), t["version"].as_u64().unwrap()))
        .collect();
    assert_eq!(running, [(1, 2), (2, 2)], "{tasks}");
    let table = stdout(&h.run(&["task", "ls", "--job", "web"]));
    assert!(
        table
            .lines()
            .next()
            .unwrap_or_default()
            .ends_with("VERSION"),
        "{table}"
    );
}
