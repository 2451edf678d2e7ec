//! Projects and tokens through the built binary against `drover up`: the cluster admin
//! makes a project and a token for it, the token's holder runs work there and sees
//! nothing else, and a revoked token stops working. Against `drover server`: nobody can
//! lock the cluster admin out, `--reset-admin-token` lets the host back in when every
//! cluster admin token is gone anyway, and agents take their join token from the
//! environment or a file instead of the command line.

mod common;
use common::*;
use std::path::Path;
use std::process::Output;

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

/// Starts `drover server` on `dir` and returns it with its URL.
fn server(home: &Home, dir: &Path) -> (Daemon, String) {
    let (d, line) = home.spawn(
        &[
            "server",
            "--insecure-http",
            "--data-dir",
            dir.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        "listening on",
    );
    (d, url_in(&line))
}

/// A client command with the server and token in the environment, as a script gives them.
fn as_token(home: &Home, url: &str, token: &str, args: &[&str]) -> Output {
    let mut c = home.cmd(args);
    c.env("DROVER_SERVER", url).env("DROVER_TOKEN", token);
    run_with_timeout(c, std::time::Duration::from_secs(60))
}

fn read_token(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_string()
}

/// The id of the one token in a `token ls -o json` listing with this role and name.
fn token_id(list: &serde_json::Value, role: &str, name: &str) -> String {
    list.as_array()
        .unwrap_or_else(|| panic!("expected a list: {list}"))
        .iter()
        .find(|t| t["role"] == role && t["name"] == name)
        .unwrap_or_else(|| panic!("no {role} token named {name} in {list}"))["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Marks every cluster admin token in the server's store revoked, as a store from before
/// the last one was protected could be, or as good as, when the only active one's
/// secret is lost.
fn revoke_every_cluster_token(dir: &Path) {
    use drover_store::{Change, Durability, Role, SqliteConfig, SqliteStore, Store};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = SqliteStore::open(&SqliteConfig {
            path: Some(dir.join("drover.db")),
            durability: Durability::Full,
        })
        .await
        .unwrap();
        let changes: Vec<Change> = store
            .load()
            .await
            .unwrap()
            .tokens
            .into_iter()
            .filter(|t| t.role == Role::Cluster)
            .map(|t| Change::Token(drover_store::TokenRecord { revoked: true, ..t }))
            .collect();
        assert!(!changes.is_empty());
        store.commit(&changes).await.unwrap();
    });
}

#[test]
fn the_cluster_admin_cannot_be_locked_out_and_reset_admin_token_lets_the_host_back_in() {
    let home = Home::new();
    let dir = home.path().join("server");
    let (mut srv, url) = server(&home, &dir);
    let admin = read_token(&dir.join("admin-token"));
    let list = json(&as_token(
        &home,
        &url,
        &admin,
        &["token", "ls", "-o", "json"],
    ));
    let admin_id = token_id(&list, "cluster", "admin");
    let join_id = token_id(&list, "agent", "join");

    // An admin of project default sees neither cluster-level token and cannot revoke
    // them: they are not found, as if they did not exist.
    let out = as_token(&home, &url, &admin, &["token", "create", "--role", "admin"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let default_admin = stdout(&out).trim().to_string();
    let list = json(&as_token(
        &home,
        &url,
        &default_admin,
        &["token", "ls", "-o", "json"],
    ));
    let roles: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["admin"], "{list}");
    for id in [&admin_id, &join_id] {
        let out = as_token(&home, &url, &default_admin, &["token", "revoke", id]);
        assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    }

    // The last cluster admin token cannot be revoked; the error says what to do instead.
    let out = as_token(&home, &url, &admin, &["token", "revoke", &admin_id]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("drover token create --role cluster"),
        "{}",
        stderr(&out)
    );
    // With a second one, the first and the join token can go; the second then cannot.
    let out = as_token(
        &home,
        &url,
        &admin,
        &["token", "create", "--role", "cluster", "--name", "second"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let second = stdout(&out).trim().to_string();
    for id in [&admin_id, &join_id] {
        let out = as_token(&home, &url, &second, &["token", "revoke", id]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    }
    let list = json(&as_token(
        &home,
        &url,
        &second,
        &["token", "ls", "-o", "json"],
    ));
    let second_id = token_id(&list, "cluster", "second");
    let out = as_token(&home, &url, &second, &["token", "revoke", &second_id]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    srv.terminate();

    // Now lose the second one as well: no cluster admin token is left, and a restart
    // brings none back (the revoked secret in admin-token stays revoked).
    revoke_every_cluster_token(&dir);
    let (mut srv, url) = server(&home, &dir);
    for token in [&admin, &second] {
        let out = as_token(&home, &url, token, &["job", "ls"]);
        assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    }
    srv.terminate();

    // On the host, with the data dir and no token, the reset makes a new one.
    let out = home.run(&[
        "server",
        "--reset-admin-token",
        "--data-dir",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let file = dir.join("admin-token");
    assert!(
        stderr(&out).contains(&file.display().to_string()),
        "it says where the token is: {}",
        stderr(&out)
    );
    let reset = read_token(&file);
    assert!(reset.starts_with("drv_") && reset != admin, "{reset}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "only the owner may read the token file");

    // The restarted server takes it as a cluster admin; the old secrets stay refused.
    let (_srv, url) = server(&home, &dir);
    let list = json(&as_token(
        &home,
        &url,
        &reset,
        &["token", "ls", "-o", "json"],
    ));
    let active: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["role"] == "cluster" && t["revoked"] == false)
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(active, ["admin-reset"], "{list}");
    let out = as_token(&home, &url, &reset, &["project", "create", "after-reset"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = as_token(&home, &url, &admin, &["job", "ls"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
}

#[test]
fn an_agent_takes_its_join_token_from_the_environment_or_a_file() {
    let home = Home::new();
    let dir = home.path().join("server");
    let (_srv, url) = server(&home, &dir);
    let admin = read_token(&dir.join("admin-token"));
    let join = read_token(&dir.join("join-token"));
    let agent = |name: &str, extra: &[&str]| {
        let data = home.path().join(format!("agent-{name}"));
        let mut args = vec![
            "agent",
            "--server",
            &url,
            "--name",
            name,
            "--no-docker",
            "--data-dir",
            data.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        home.cmd(&args)
    };

    // Only the environment variable: nothing secret on the command line.
    let mut cmd = agent("env-node", &[]);
    cmd.env("DROVER_JOIN_TOKEN", &join);
    let (_env_agent, _) = spawn_cmd(cmd, "connected to");
    // A file, with the surrounding whitespace an editor or `echo` leaves.
    let file = write(home.path(), "join-token", &format!("  {join}\n"));
    let cmd = agent("file-node", &["--join-token-file", file.to_str().unwrap()]);
    let (_file_agent, _) = spawn_cmd(cmd, "connected to");
    wait_until(
        "both agents in `drover node ls`",
        std::time::Duration::from_secs(30),
        || {
            let nodes = json(&as_token(
                &home,
                &url,
                &admin,
                &["node", "ls", "-o", "json"],
            ));
            let mut ready: Vec<String> = nodes
                .as_array()
                .unwrap()
                .iter()
                .filter(|n| n["status"] == "ready")
                .map(|n| n["info"]["name"].as_str().unwrap().to_string())
                .collect();
            ready.sort();
            ready == ["env-node", "file-node"]
        },
    );

    // A file that is missing or empty is a usage error naming it; so is no token at all.
    let missing = home.path().join("no-such-dir").join("join-token");
    let empty = write(home.path(), "empty-token", " \n");
    for path in [&missing, &empty] {
        let arg = path.to_str().unwrap();
        let out = run_with_timeout(
            agent("bad", &["--join-token-file", arg]),
            std::time::Duration::from_secs(60),
        );
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(stderr(&out).contains(arg), "{}", stderr(&out));
    }
    let out = run_with_timeout(agent("bad", &[]), std::time::Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--join-token-file") && stderr(&out).contains("DROVER_JOIN_TOKEN"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn up_takes_reset_admin_token_too_and_puts_the_new_token_in_the_cli_config() {
    let home = Home::new();
    let up = |home: &Home| {
        home.spawn(
            &["up", "--listen", "127.0.0.1:0", "--no-docker"],
            "drover is up at",
        )
        .0
    };
    let data = home.path().join("data").join("drover");
    let mut d = up(&home);
    let out = home.run(&["job", "ls"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    d.terminate();
    revoke_every_cluster_token(&data.join("controller"));
    let mut d = up(&home);
    let out = home.run(&["job", "ls"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    d.terminate();

    let out = home.run(&["up", "--reset-admin-token"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let file = data.join("admin-token");
    assert!(
        stderr(&out).contains(&file.display().to_string()),
        "{}",
        stderr(&out)
    );
    let _d = up(&home);
    let out = home.run(&["token", "ls", "-o", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("admin-reset"), "{}", stdout(&out));
}
