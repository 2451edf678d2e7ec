//! Projects and tokens through the built binary against `drover up`: the cluster admin
//! makes a project and a token for it, the token's holder runs work there and sees
//! nothing else, and a revoked token stops working.

mod common;
use common::*;

fn names(v: &serde_json::Value, key: &str) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected a list: {v}"))
        .iter()
        .map(|x| x[key].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn a_project_token_runs_work_in_its_project_sees_nothing_else_and_can_be_revoked() {
    let home = Home::new();
    let (_up, line) = home.spawn(
        &["up", "--listen", "127.0.0.1:0", "--no-docker"],
        "drover is up at",
    );
    let url = url_in(&line);

    // The cluster admin (the token `drover up` wrote to the config) makes a project.
    let out = home.run(&["project", "create", "team-a"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = home.run(&["project", "create", "team-a"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));
    let out = home.run(&["project", "create", "Team_A"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("name: project name"),
        "{}",
        stderr(&out)
    );

    // `token create` prints the secret alone on stdout, for `$(...)`.
    let out = home.run(&[
        "token",
        "create",
        "--project",
        "team-a",
        "--role",
        "write",
        "--name",
        "ci",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let token = stdout(&out);
    assert_eq!(token.lines().count(), 1, "{token:?}");
    let token = token.trim().to_string();
    assert!(token.starts_with("drv_"), "{token}");
    let out = home.run(&["token", "create", "--project", "nope", "--role", "read"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));

    // The admin runs a job in the default project.
    let out = home.run(&[
        "run",
        "--name",
        "d-job",
        "--",
        "sh",
        "-c",
        "echo in default",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // team-a's token, given the way a script would give it.
    let as_a = |args: &[&str]| {
        let mut c = home.cmd(args);
        c.env("DROVER_SERVER", &url).env("DROVER_TOKEN", &token);
        run_with_timeout(c, std::time::Duration::from_secs(60))
    };
    let out = as_a(&["run", "--name", "a-job", "--", "sh", "-c", "echo in team a"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("in team a"));
    let jobs = json(&as_a(&["job", "ls", "-o", "json"]));
    assert_eq!(names(&jobs, "name"), ["a-job"]);
    assert_eq!(jobs[0]["project"], "team-a");
    let out = as_a(&["logs", "d-job"]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "another project's job is not found"
    );
    let out = as_a(&["job", "stop", "d-job"]);
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(
        names(&json(&as_a(&["project", "ls", "-o", "json"])), "name"),
        ["team-a"]
    );
    // Managing tokens needs a project admin; naming another project is refused.
    assert_eq!(as_a(&["token", "ls"]).status.code(), Some(5));
    let out = as_a(&["job", "ls", "--project", "default"]);
    assert_eq!(out.status.code(), Some(5));
    assert!(
        stderr(&out).contains("belongs to project team-a"),
        "{}",
        stderr(&out)
    );

    // The cluster admin sees both projects, or one when it names it.
    let all = json(&home.run(&["job", "ls", "-o", "json"]));
    let mut all_names = names(&all, "name");
    all_names.sort();
    assert_eq!(all_names, ["a-job", "d-job"]);
    let only_a = json(&home.run(&["job", "ls", "--project", "team-a", "-o", "json"]));
    assert_eq!(names(&only_a, "name"), ["a-job"]);
    let table = stdout(&home.run(&["token", "ls"]));
    assert!(
        table.contains("ci") && table.contains("team-a") && table.contains("write"),
        "{table}"
    );
    assert!(!table.contains(&token), "listings never show a secret");

    // Revoked, the token is refused from its next command on.
    let tokens = json(&home.run(&["token", "ls", "-o", "json"]));
    let id = tokens
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "ci")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let out = home.run(&["token", "revoke", &id]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = as_a(&["job", "ls"]);
    assert_eq!(out.status.code(), Some(5));
    assert!(stderr(&out).contains("revoked"), "{}", stderr(&out));
}
