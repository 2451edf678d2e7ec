//! Docker and plugin runtimes as a user reaches them: flags of the built binary.

mod common;
use common::*;
use std::time::Duration;

#[test]
fn run_with_an_image_runs_the_command_in_a_container() {
    let image = drover_testkit::images::busybox_image().unwrap();
    let home = Home::new();
    let out = home.run(&[
        "run",
        "--image",
        &image,
        "--env",
        "WHO=container",
        "--",
        "/bin/sh",
        "-c",
        "echo hi from $WHO; exit 4",
    ]);
    assert_eq!(out.status.code(), Some(4), "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), "hi from container\n");
}

#[test]
fn up_with_a_plugin_offers_it_and_runs_jobs_through_it() {
    let home = Home::new();
    let plugin = drover_testkit::example_plugin("exec");
    let flag = format!("exec={}", plugin.display());
    let (mut up, _) = home.spawn(
        &["up", "--listen", "127.0.0.1:0", "--plugin", &flag],
        "drover is up at",
    );
    wait_until(
        "the agent to offer the plugin and docker",
        Duration::from_secs(30),
        || {
            let n = json(&home.run(&["node", "ls", "-o", "json"]));
            n[0]["info"]["runtimes"].as_array().is_some_and(|r| {
                r.iter().any(|r| r == "plugin:exec") && r.iter().any(|r| r == "docker")
            })
        },
    );
    let nodes = json(&home.run(&["node", "ls", "-o", "json"]));
    assert!(
        nodes[0]["info"]["attributes"]["docker.version"]
            .as_str()
            .is_some_and(|v| !v.is_empty()),
        "the engine's version is reported: {nodes}"
    );
    let table = stdout(&home.run(&["node", "ls"]));
    assert!(table.contains("plugin:exec"), "{table}");
    let job = write(
        home.path(),
        "job.yaml",
        "name: via-plugin\nruntime: plugin:exec\ncommand: [sh, -c, 'echo through the plugin $DROVER_TASK_INDEX']\n",
    );
    let out = home.run(&["job", "apply", "-f", job.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_until("the job to complete", Duration::from_secs(30), || {
        json(&home.run(&["job", "status", "via-plugin", "-o", "json"]))["job"]["status"]
            == "complete"
    });
    let logs = home.run(&["logs", "via-plugin"]);
    assert_eq!(stdout(&logs), "through the plugin 0\n");
    up.terminate();
}

#[test]
fn bad_runtime_flags_are_refused_clearly() {
    let home = Home::new();
    let out = home.run(&["up", "--plugin", "nopath"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("KEY=VALUE"), "{}", stderr(&out));
    let out = home.run(&[
        "up",
        "--listen",
        "127.0.0.1:0",
        "--plugin",
        "ghost=/no/such/plugin",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("--plugin ghost=/no/such/plugin"),
        "the message names the flag: {err}"
    );
}
