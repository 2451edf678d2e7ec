//! `drover run` and the client commands, driven through the built binary.

mod common;
use common::*;
use std::time::Duration;

#[test]
fn run_with_nothing_configured_uses_an_embedded_cluster_and_streams_output() {
    let home = Home::new();
    let out = home.run(&["run", "--", "sh", "-c", "echo hello; echo oops >&2"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), "hello\n");
    assert!(stderr(&out).contains("oops"), "{}", stderr(&out));
}

#[test]
fn run_exits_with_the_tasks_exit_code() {
    let home = Home::new();
    let out = home.run(&["run", "--", "sh", "-c", "exit 3"]);
    assert_eq!(out.status.code(), Some(3), "stderr: {}", stderr(&out));
    let out = home.run(&["run", "--", "sh", "-c", "kill -9 $$"]);
    assert_eq!(out.status.code(), Some(137), "stderr: {}", stderr(&out));
}

#[test]
fn run_count_and_env() {
    let home = Home::new();
    let out = home.run(&[
        "run",
        "--count",
        "3",
        "--env",
        "GREETING=hi",
        "--",
        "sh",
        "-c",
        "echo $GREETING $DROVER_TASK_INDEX",
    ]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let mut lines: Vec<String> = stdout(&out).lines().map(str::to_string).collect();
    lines.sort();
    assert_eq!(lines, vec!["hi 0", "hi 1", "hi 2"]);
}

#[test]
fn run_rejects_bad_flags_clearly() {
    let home = Home::new();
    let out = home.run(&["run", "--env", "NOEQUALS", "--", "true"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("KEY=VALUE"), "{}", stderr(&out));
    let out = home.run(&["run", "--memory", "12Zb", "--", "true"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("--memory"), "{}", stderr(&out));
    for cmd in [&["up"][..], &["agent", "--join-token", "x"]] {
        let args = [cmd, &["--artifact-cache-size", "lots"]].concat();
        let out = home.run(&args);
        assert_eq!(out.status.code(), Some(2), "{cmd:?}");
        let err = stderr(&out);
        assert!(
            err.contains("--artifact-cache-size") && err.contains("expected a size like"),
            "{cmd:?}: {err}"
        );
    }
}

#[test]
fn client_commands_without_a_server_say_how_to_get_one() {
    let home = Home::new();
    let out = home.run(&["job", "ls"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("drover up"), "{}", stderr(&out));
}

#[test]
fn up_configures_the_cli_and_every_client_command_works() {
    let home = Home::new();
    let (mut up, _) = home.spawn(&["up", "--listen", "127.0.0.1:0"], "drover is up at");
    // The CLI config now points at the server.
    let nodes = home.run(&["node", "ls", "-o", "json"]);
    assert!(nodes.status.success(), "{}", stderr(&nodes));
    wait_until(
        "the local agent to register",
        Duration::from_secs(20),
        || {
            let n = json(&home.run(&["node", "ls", "-o", "json"]));
            n.as_array()
                .is_some_and(|a| a.len() == 1 && a[0]["status"] == "ready")
        },
    );
    // The node says what keeps its process tasks apart: as root, users and cgroups of
    // their own; otherwise nothing, which the table shows too.
    let nodes = json(&home.run(&["node", "ls", "-o", "json"]));
    let isolation = nodes[0]["info"]["attributes"]["process.isolation"].clone();
    let root =
        std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0);
    if root {
        assert_eq!(isolation, "user+cgroup", "{nodes}");
    } else {
        assert_eq!(isolation, "none", "{nodes}");
    }
    let table = stdout(&home.run(&["node", "ls"]));
    assert!(
        table.contains("ISOLATION") && table.contains(isolation.as_str().unwrap_or("?")),
        "{table}"
    );
    let job = write(
        home.path(),
        "job.yaml",
        "name: greeter\nkind: service\ncommand: [sh, -c, 'echo hello from $DROVER_TASK_INDEX; exec sleep 30']\nstop_grace: 2s\n",
    );
    let out = home.run(&["job", "apply", "-f", job.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("greeter created"), "{}", stdout(&out));

    wait_until("the task to run and print", Duration::from_secs(20), || {
        let logs = home.run(&["logs", "greeter"]);
        stdout(&logs).contains("hello from 0")
    });
    let jobs = json(&home.run(&["job", "ls", "-o", "json"]));
    assert_eq!(jobs[0]["name"], "greeter");
    assert_eq!(jobs[0]["status"], "running");
    let table = stdout(&home.run(&["job", "ls"]));
    assert!(
        table.contains("NAME") && table.contains("greeter"),
        "{table}"
    );
    let tasks = json(&home.run(&["task", "ls", "-o", "json"]));
    assert_eq!(tasks[0]["state"], "running");
    let status = stdout(&home.run(&["job", "status", "greeter"]));
    assert!(status.contains("state:    running"), "{status}");

    // `logs -f` follows until the task ends, which the stop below causes.
    let mut follow = home.cmd(&["logs", "-f", "greeter"]);
    follow.stdout(std::process::Stdio::piped());
    let follower = follow.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let out = home.run(&["job", "stop", "greeter"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(follower.wait_with_output());
    });
    let followed = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("logs -f did not end when the job stopped")
        .unwrap();
    assert!(String::from_utf8_lossy(&followed.stdout).contains("hello from 0"));

    let tasks = json(&home.run(&["task", "ls", "--job", "greeter", "-o", "json"]));
    assert_eq!(tasks[0]["state"], "stopped");
    assert_eq!(tasks[0]["exit"]["signal"], "SIGTERM");

    // drover run against the running cluster.
    let out = home.run(&["run", "--", "echo", "hi"]);
    assert_eq!(stdout(&out), "hi\n");

    // Flags and environment variables override the config file.
    let out = home.run(&["job", "ls", "--token", "wrong"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("invalid or revoked token"),
        "{}",
        stderr(&out)
    );
    let mut cmd = home.cmd(&["job", "ls"]);
    cmd.env("DROVER_SERVER", "http://127.0.0.1:9");
    let out = run_with_timeout(cmd, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot reach the Drover server at http://127.0.0.1:9"),
        "{}",
        stderr(&out)
    );

    // Unknown names exit 4.
    let out = home.run(&["job", "status", "nope"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    up.terminate();
}

#[test]
fn a_bad_spec_names_file_line_and_field_and_nothing_is_stored() {
    let home = Home::new();
    let (_up, _) = home.spawn(&["up", "--listen", "127.0.0.1:0"], "drover is up at");
    let bad = write(
        home.path(),
        "bad.yaml",
        "name: bad\ncommand: [x]\ncount: lots\n",
    );
    let out = home.run(&["job", "apply", "-f", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("bad.yaml:3:8: count: expected a whole number, 0 or more, found lots"),
        "{err}"
    );
    let missing = home.run(&["job", "apply", "-f", "/nonexistent/job.yaml"]);
    assert!(
        stderr(&missing).contains("reading /nonexistent/job.yaml"),
        "{}",
        stderr(&missing)
    );
    let jobs = json(&home.run(&["job", "ls", "-o", "json"]));
    assert_eq!(jobs, serde_json::json!([]));
}

#[test]
fn completions_are_generated() {
    let home = Home::new();
    let out = home.run(&["completions", "bash"]);
    assert!(out.status.success());
    assert!(stdout(&out).contains("drover"), "{}", stdout(&out));
}

#[test]
fn run_service_keeps_restarting_until_interrupted() {
    let home = Home::new();
    let mut cmd = home.cmd(&["run", "--service", "--", "sh", "-c", "echo up; sleep 0.2"]);
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    // The service restarts after each exit: "up" is printed again and again.
    for _ in 0..3 {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the service to print up");
        assert_eq!(line, "up");
    }
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(child.wait());
    });
    let status = done_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("drover run to end after Ctrl-C")
        .unwrap();
    assert_eq!(status.code(), Some(130));
}

#[test]
fn server_logs_can_be_json_lines() {
    let home = Home::new();
    let mut cmd = home.cmd(&["up", "--listen", "127.0.0.1:0"]);
    cmd.env("DROVER_LOG_FORMAT", "json")
        .env("DROVER_LOG", "info");
    let (mut up, _) = spawn_cmd(cmd, "drover is up at");
    wait_until(
        "a structured log line about the agent",
        Duration::from_secs(20),
        || {
            up.log().lines().any(|l| {
                serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| {
                    v["fields"]["message"] == "agent connected" && v["level"] == "INFO"
                })
            })
        },
    );
    up.terminate();
}

#[test]
fn applying_a_finished_job_again_changes_nothing_and_rerun_runs_it_again() {
    let home = Home::new();
    let (_up, _) = home.spawn(&["up", "--listen", "127.0.0.1:0"], "drover is up at");
    // Tasks may run as users of their own, so the file they count runs in is theirs to
    // append to.
    let runs = home.path().join("runs");
    std::fs::write(&runs, "").unwrap();
    std::fs::set_permissions(
        &runs,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o666),
    )
    .unwrap();
    let job = write(
        home.path(),
        "job.yaml",
        &format!(
            "name: nightly\ncommand: [sh, -c, 'echo run >> {}']\n",
            runs.display()
        ),
    );
    let file = job.to_str().unwrap();
    let out = home.run(&["job", "apply", "-f", file, "--idempotency-key", "k-1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let finished = || {
        json(&home.run(&["job", "status", "nightly", "-o", "json"]))["job"]["status"] == "complete"
    };
    wait_until("the job to complete", Duration::from_secs(20), finished);
    // The same request again (a retry, say) gets the first answer.
    let out = home.run(&["job", "apply", "-f", file, "--idempotency-key", "k-1"]);
    assert!(
        stdout(&out).contains("nightly created (version 1)"),
        "{}",
        stdout(&out)
    );
    // Without a key, the unchanged spec of a finished job changes nothing either, and
    // the CLI says how to run it again.
    let out = home.run(&["job", "apply", "-f", file]);
    let text = stdout(&out);
    assert!(text.contains("nightly unchanged (version 1)"), "{text}");
    assert!(text.contains("drover job rerun nightly"), "{text}");
    let out = home.run(&["job", "rerun", "nightly"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("re-run as version 2"),
        "{}",
        stdout(&out)
    );
    wait_until("the rerun to complete", Duration::from_secs(20), finished);
    assert_eq!(std::fs::read_to_string(&runs).unwrap(), "run\nrun\n");
    // A running job is not rerun.
    let svc = write(
        home.path(),
        "svc.yaml",
        "name: svc\nkind: service\ncommand: [sleep, '30']\nstop_grace: 1s\n",
    );
    assert!(
        home.run(&["job", "apply", "-f", svc.to_str().unwrap()])
            .status
            .success()
    );
    let out = home.run(&["job", "rerun", "svc"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("still running"), "{}", stderr(&out));
    assert!(home.run(&["job", "stop", "svc"]).status.success());
}
