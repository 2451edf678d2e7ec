//! `drover artifact` against `drover up`, driven through the built binary.

mod common;
use common::*;
use serde_json::Value;

/// What `/bin/true` is detected as on the machine running the tests.
fn true_platform() -> Option<&'static str> {
    if cfg!(all(
        target_os = "linux",
        target_arch = "x86_64",
        target_env = "gnu"
    )) {
        Some("linux/amd64+gnu")
    } else if cfg!(all(
        target_os = "linux",
        target_arch = "aarch64",
        target_env = "gnu"
    )) {
        Some("linux/arm64+gnu")
    } else {
        None
    }
}

fn platforms(artifact: &Value) -> Vec<String> {
    artifact["variants"]
        .as_array()
        .unwrap_or_else(|| panic!("no variants in {artifact}"))
        .iter()
        .map(|v| v["platform"].as_str().unwrap().to_string())
        .collect()
}

/// The controller's blob directory under a `drover up` in `home`.
fn blob_files(home: &Home) -> Vec<String> {
    let dir = home.path().join("data/drover/controller/blobs/sha256");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn push_ls_inspect_and_rm_a_binary_and_a_script() {
    let home = Home::new();
    let (_up, _) = home.spawn(
        &["up", "--listen", "127.0.0.1:0", "--no-docker"],
        "drover is up at",
    );
    let script = write(home.path(), "hello.sh", "#!/bin/sh\necho hello\n");
    let script = script.to_str().unwrap();
    let out = home.run(&["artifact", "push", "hello:1.0", "/bin/true", script]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("pushed hello:1.0 (2 variants)"), "{text}");
    assert!(text.contains("any"), "{text}");
    assert!(text.contains("sent"), "{text}");
    if let Some(p) = true_platform() {
        assert!(text.contains(p), "{text}");
    }
    // Not a terminal: no progress bar, and nothing on stderr.
    assert_eq!(stderr(&out), "");

    let true_digest = drover_testkit::digest_of(&std::fs::read("/bin/true").unwrap());
    let script_digest = drover_testkit::digest_of(&std::fs::read(script).unwrap());

    let list = json(&home.run(&["artifact", "ls", "-o", "json"]));
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["name"], "hello");
    assert_eq!(list[0]["version"], "1.0");
    let out = home.run(&["artifact", "ls"]);
    assert!(stdout(&out).contains("hello"), "{}", stdout(&out));

    let shown = json(&home.run(&["artifact", "inspect", "hello:1.0", "-o", "json"]));
    assert_eq!(shown, list[0]);
    let ps = platforms(&shown);
    assert_eq!(ps.len(), 2, "{shown}");
    assert_eq!(ps[1], "any");
    assert!(ps[0].starts_with("linux/"), "{shown}");
    if let Some(p) = true_platform() {
        assert_eq!(ps[0], p);
    }
    assert_eq!(shown["variants"][0]["digest"], true_digest.as_str());
    assert_eq!(shown["variants"][1]["digest"], script_digest.as_str());
    assert_eq!(
        shown["variants"][1]["size"],
        std::fs::metadata(script).unwrap().len()
    );
    let out = home.run(&["artifact", "inspect", "hello:1.0"]);
    assert!(stdout(&out).contains(&script_digest), "{}", stdout(&out));

    // The same version again is refused: versions are immutable.
    let out = home.run(&["artifact", "push", "hello:1.0", script]);
    assert_eq!(out.status.code(), Some(1), "stdout: {}", stdout(&out));
    assert!(
        stderr(&out).contains("hello:1.0 already exists"),
        "{}",
        stderr(&out)
    );

    // A new version with the same script sends nothing: the blob is there.
    let out = home.run(&["artifact", "push", "hello:1.1", script, "-o", "json"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert_eq!(platforms(&json(&out)), vec!["any"]);
    let out = home.run(&["artifact", "push", "hello:1.2", script]);
    assert!(stdout(&out).contains("already stored"), "{}", stdout(&out));

    // Removing 1.0 keeps the script's blob (1.1 uses it) and removes /bin/true's.
    let out = home.run(&["artifact", "rm", "hello:1.0"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), "artifact hello:1.0 removed\n");
    let out = home.run(&["artifact", "inspect", "hello:1.0"]);
    assert_eq!(out.status.code(), Some(4), "stderr: {}", stderr(&out));
    assert!(stderr(&out).contains("not found"), "{}", stderr(&out));
    assert_eq!(
        blob_files(&home),
        vec![script_digest["sha256:".len()..].to_string()]
    );
    let out = home.run(&["artifact", "rm", "hello:1.0"]);
    assert_eq!(out.status.code(), Some(4), "stderr: {}", stderr(&out));
    for v in ["hello:1.1", "hello:1.2"] {
        let out = home.run(&["artifact", "rm", v]);
        assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    }
    assert_eq!(blob_files(&home), Vec::<String>::new());
}

#[test]
fn push_says_clearly_what_it_cannot_do() {
    let home = Home::new();
    let (_up, _) = home.spawn(
        &["up", "--listen", "127.0.0.1:0", "--no-docker"],
        "drover is up at",
    );
    let data = write(home.path(), "weights.bin", "not an executable");
    let data = data.to_str().unwrap();
    let a = write(home.path(), "a.sh", "#!/bin/sh\necho a\n");
    let b = write(home.path(), "b.sh", "#!/bin/sh\necho b\n");

    // A usage mistake is exit code 2, with the expected form.
    let out = home.run(&["artifact", "push", "no-version", data]);
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr(&out));
    assert!(stderr(&out).contains("NAME:VERSION"), "{}", stderr(&out));
    let out = home.run(&["artifact", "push", "x:1"]);
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr(&out));

    // A file whose platform cannot be told says how to name it.
    let out = home.run(&["artifact", "push", "x:1", data]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("cannot tell which platform") && err.contains("@any"),
        "{err}"
    );

    let out = home.run(&["artifact", "push", "x:1", &format!("{data}@linux/amd65")]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    assert!(stderr(&out).contains("not a platform"), "{}", stderr(&out));

    let out = home.run(&[
        "artifact",
        "push",
        "x:1",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    assert!(
        stderr(&out).contains("are both for any"),
        "{}",
        stderr(&out)
    );

    let out = home.run(&["artifact", "push", "x:1", "/no/such/file"]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    assert!(stderr(&out).contains("/no/such/file"), "{}", stderr(&out));

    // Nothing was created by any of those.
    let list = json(&home.run(&["artifact", "ls", "-o", "json"]));
    assert_eq!(list, Value::Array(Vec::new()));

    // Named platforms are taken as given.
    let out = home.run(&[
        "artifact",
        "push",
        "model:7",
        &format!("{data}@linux/arm64"),
        &format!("{}@linux/amd64/v2+gnu", a.to_str().unwrap()),
        "-o",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert_eq!(
        platforms(&json(&out)),
        vec!["linux/arm64", "linux/amd64/v2+gnu"]
    );

    let out = home.run(&["artifact", "inspect", "model:8"]);
    assert_eq!(out.status.code(), Some(4), "stderr: {}", stderr(&out));
}

#[test]
fn artifact_help_teaches_the_platform_syntax() {
    let home = Home::new();
    let out = home.run(&["artifact", "push", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    for needle in ["FILE@linux/arm64", "@any", "immutable", "Examples:"] {
        assert!(text.contains(needle), "{needle} not in:\n{text}");
    }
}

/// `drover run ./binary -- args` from a shell with no CLI config, only the server and a
/// token in the environment: the binary is uploaded once (by content) and run.
#[test]
fn run_uploads_a_local_binary_and_runs_it_with_its_arguments() {
    let server = Home::new();
    let (mut up, line) = server.spawn(&["up", "--listen", "127.0.0.1:0"], "drover is up at");
    let url = url_in(&line);
    let token = std::fs::read_to_string(server.path().join("data/drover/admin-token"))
        .unwrap()
        .trim()
        .to_string();
    let user = Home::new();
    let prog = user.path().join("greet");
    std::fs::write(&prog, "#!/bin/sh\necho \"greetings, $1\"\nexit ${2:-0}\n").unwrap();
    let run = |args: &[&str]| {
        let mut cmd = user.cmd(args);
        cmd.env("DROVER_SERVER", &url).env("DROVER_TOKEN", &token);
        run_with_timeout(cmd, std::time::Duration::from_secs(60))
    };
    // A `#!` script is detected as platform-independent, so any node may run it.
    let prog_arg = prog.to_str().unwrap();
    let out = run(&["run", prog_arg, "--", "world"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "greetings, world\n");
    let out = run(&["run", prog_arg, "--", "again", "3"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(stdout(&out), "greetings, again\n");
    // The same content was uploaded once: one artifact version, one blob.
    let list = run(&["artifact", "ls", "-o", "json"]);
    let list: Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(blob_files(&server).len(), 1);
    up.terminate();
}
