//! runtime_env through the built binary against `drover up`: a working_dir packed from a
//! local directory, the preparing log, and the node's environment cache.

mod common;
use common::*;
use std::time::Duration;

/// Waits for a job to end and returns its status.
fn final_status(home: &Home, job: &str) -> String {
    let mut status = String::new();
    wait_until(
        &format!("job {job} to end"),
        Duration::from_secs(240),
        || {
            let view = json(&home.run(&["job", "status", job, "-o", "json"]));
            status = view["job"]["status"].as_str().unwrap_or("").to_string();
            status != "running"
        },
    );
    status
}

#[test]
fn a_working_dir_is_packed_honouring_ignore_files_and_runs_in_the_task() {
    let home = Home::new();
    let (_up, _) = home.spawn(
        &["up", "--listen", "127.0.0.1:0", "--no-docker"],
        "drover is up at",
    );
    let project = home.path().join("project");
    std::fs::create_dir_all(project.join("app/build")).unwrap();
    write(&project, "app/main.sh", "echo main ran\nls -a | sort\n");
    write(&project, "app/.gitignore", "build/\n*.log\n");
    write(&project, "app/.droverignore", "secret.txt\n");
    write(&project, "app/secret.txt", "do not ship\n");
    write(&project, "app/debug.log", "noise\n");
    write(&project, "app/build/out.bin", "artefact\n");
    write(&project, "app/kept.txt", "kept\n");
    let job = write(
        &project,
        "job.yaml",
        "name: wd\ncommand: [\"sh\", \"main.sh\"]\nruntime_env:\n  working_dir: app\n  config: { mode: fast }\n",
    );
    let out = home.run(&["job", "apply", "-f", job.to_str().unwrap(), "-o", "json"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let applied = json(&out);
    let digest = applied["job"]["spec"]["runtime_env"]["working_dir"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(digest.starts_with("sha256:"), "{applied}");
    assert_eq!(final_status(&home, "wd"), "complete");
    let logs = stdout(&home.run(&["logs", "wd"]));
    assert!(logs.contains("main ran"), "{logs}");
    for shipped in [
        "main.sh",
        "kept.txt",
        ".gitignore",
        ".droverignore",
        "config.json",
    ] {
        assert!(
            logs.lines().any(|l| l == shipped),
            "{shipped} missing: {logs}"
        );
    }
    for ignored in ["secret.txt", "debug.log", "build"] {
        assert!(
            !logs.lines().any(|l| l == ignored),
            "{ignored} was shipped: {logs}"
        );
    }
    let prepare = stdout(&home.run(&["logs", "wd", "--prepare"]))
        + &stderr(&home.run(&["logs", "wd", "--prepare"]));
    assert!(prepare.contains("working_dir unpacked: "), "{prepare}");
    // The step is in the task's timeline too, between preparing and starting.
    let status = stdout(&home.run(&["job", "status", "wd", "--events", "all"]));
    let at = |what: &str| {
        status
            .find(what)
            .unwrap_or_else(|| panic!("{what:?} missing from:\n{status}"))
    };
    assert!(
        at("preparing") < at("working_dir unpacked: ")
            && at("working_dir unpacked: ") < at("starting"),
        "{status}"
    );

    // The same directory packs to the same archive (the same digest), which the
    // controller has, so nothing is uploaded again.
    let out = home.run(&["job", "apply", "-f", job.to_str().unwrap(), "-o", "json"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let again = json(&out);
    assert_eq!(
        again["job"]["spec"]["runtime_env"]["working_dir"],
        digest.as_str()
    );

    // A directory that is not there is named.
    let bad = write(
        &project,
        "bad.yaml",
        "name: bad\ncommand: [\"true\"]\nruntime_env: { working_dir: nowhere }\n",
    );
    let out = home.run(&["job", "apply", "-f", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("working_dir") && stderr(&out).contains("nowhere"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn env_ls_shows_a_nodes_python_environments_and_prune_removes_unused_ones() {
    let home = Home::new();
    let (_up, _) = home.spawn(
        &["up", "--listen", "127.0.0.1:0", "--no-docker"],
        "drover is up at",
    );
    let job = write(
        home.path(),
        "py.yaml",
        "name: py\ncommand: [\"python\", \"-c\", \"import six; print(six.__version__)\"]\nruntime_env:\n  python: { requirements: [\"six==1.16.0\"] }\n",
    );
    let out = home.run(&["job", "apply", "-f", job.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert_eq!(final_status(&home, "py"), "complete");
    assert_eq!(stdout(&home.run(&["logs", "py"])).trim(), "1.16.0");
    let prepare = stderr(&home.run(&["logs", "py", "--prepare"]));
    assert!(prepare.to_lowercase().contains("six"), "{prepare}");

    let mut envs = serde_json::Value::Null;
    // The agent reports its environments in heartbeats, and hands the task's lease back
    // after the task's end is sent, so a report from while the task ran (in use by it)
    // can still be the latest when the job is already complete.
    wait_until(
        "the node to report its environment, no longer in use",
        Duration::from_secs(20),
        || {
            envs = json(&home.run(&["env", "ls", "-o", "json"]));
            envs.as_array()
                .is_some_and(|a| a.len() == 1 && a[0]["in_use"] == 0)
        },
    );
    let env = &envs[0];
    assert_eq!(env["kind"], "python");
    assert_eq!(env["requirements"], serde_json::json!(["six==1.16.0"]));
    assert!(env["size"].as_u64().unwrap() > 0, "{env}");
    assert_eq!(env["in_use"], 0);
    let table = stdout(&home.run(&["env", "ls"]));
    assert!(
        table.contains("six==1.16.0") && table.contains("python"),
        "{table}"
    );

    let out = home.run(&["env", "prune"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    wait_until(
        "the environment to be pruned",
        Duration::from_secs(30),
        || {
            json(&home.run(&["env", "ls", "-o", "json"]))
                .as_array()
                .is_some_and(|a| a.is_empty())
        },
    );
    let out = home.run(&["env", "ls", "--node", "no-such-node"]);
    assert_eq!(out.status.code(), Some(4), "not found");
    assert!(stderr(&out).contains("no-such-node"), "{}", stderr(&out));
}
