//! `drover job plan` and `drover job apply --dry-run` through the built binary against
//! `drover up`: each says what applying would do (create, unchanged, update with the
//! changed fields, scale) and whether the cluster can place the tasks, exits 0 for no
//! changes and 2 for changes, and changes nothing; a plan in one project never shows
//! another project's job of the same name.

mod common;
use common::*;
use std::io::Write;
use std::process::{Output, Stdio};
use std::time::Duration;

impl Up {
    fn run(&self, args: &[&str]) -> Output {
        self.home.run(args)
    }

    /// Writes a spec file and returns its path.
    fn spec(&self, name: &str, yaml: &str) -> String {
        write(self.home.path(), name, yaml)
            .to_str()
            .unwrap()
            .to_string()
    }
}

/// Asserts a command's exit code, showing its output when it differs.
fn exits(out: &Output, code: i32, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: stdout:\n{}\nstderr:\n{}",
        stdout(out),
        stderr(out)
    );
}

/// Every task of every version: (id, state, version's job id), sorted.
fn all_tasks(up: &Up) -> Vec<(String, String, String)> {
    let tasks = json(&up.run(&["task", "ls", "--all", "-o", "json"]));
    let mut list: Vec<_> = tasks
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["id"].as_str().unwrap().to_string(),
                t["state"].as_str().unwrap().to_string(),
                t["job_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    list.sort();
    list
}

const WEB: &str =
    "name: web\nkind: service\ncommand: [sleep, '300']\nenv: {GREETING: hi}\nstop_grace: 1s\n";

#[test]
fn a_plan_says_what_applying_would_do_and_changes_nothing() {
    let up = Up::start_with(&["--no-docker"]);

    // A new job: created, and it fits on the one node.
    let web = up.spec("web.yaml", WEB);
    let out = up.run(&["job", "plan", "-f", &web]);
    exits(&out, 2, "plan of a new job");
    let text = stdout(&out);
    assert!(
        text.contains("create job web (version 1, 1 task)"),
        "{text}"
    );
    assert!(
        text.contains("placement: the task can be placed now (on "),
        "{text}"
    );
    let plan = json(&up.run(&["job", "plan", "-f", &web, "-o", "json"]));
    assert_eq!(plan["action"], "create", "{plan}");
    assert_eq!(plan["placement"]["verdict"], "fits", "{plan}");
    assert_eq!(plan["placement"]["placed"], 1, "{plan}");
    // Nothing was made.
    exits(
        &up.run(&["job", "status", "web"]),
        4,
        "status of a planned job",
    );

    let out = up.run(&["job", "apply", "-f", &web]);
    exits(&out, 0, "apply");
    let before = all_tasks(&up);
    assert_eq!(before.len(), 1, "{before:?}");

    // The same spec again: nothing to do, exit 0, from a file or from stdin.
    let out = up.run(&["job", "plan", "-f", &web]);
    exits(&out, 0, "plan of an unchanged spec");
    assert!(stdout(&out).contains("job web is unchanged (version 1)"));
    let mut piped = up.home.cmd(&["job", "plan", "-f", "-"]);
    piped
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = piped.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(WEB.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    exits(&out, 0, "plan from stdin");

    // A changed command and variable: an update, with each field's old and new value.
    let changed = up.spec(
        "changed.yaml",
        &WEB.replace("'300'", "'301'")
            .replace("{GREETING: hi}", "{GREETING: hello, EXTRA: x}"),
    );
    for args in [
        &["job", "plan", "-f", &changed][..],
        &["job", "apply", "--dry-run", "-f", &changed],
    ] {
        let out = up.run(args);
        exits(&out, 2, &args.join(" "));
        let text = stdout(&out);
        assert!(
            text.contains(
                "update job web to version 2 (1 task), replacing every task of version 1"
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"~ command: ["sleep","300"] → ["sleep","301"]"#),
            "{text}"
        );
        assert!(text.contains(r#"~ env.GREETING: "hi" → "hello""#), "{text}");
        assert!(text.contains(r#"+ env.EXTRA: "x""#), "{text}");
    }
    let plan = json(&up.run(&["job", "plan", "-f", &changed, "-o", "json"]));
    assert_eq!(
        (&plan["action"], &plan["current_version"], &plan["version"]),
        (&"update".into(), &1.into(), &2.into()),
        "{plan}"
    );
    let paths: Vec<&str> = plan["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["command", "env.EXTRA", "env.GREETING"], "{plan}");

    // A count change alone of a running service scales it in place.
    let more = up.spec("more.yaml", &format!("{WEB}count: 3\n"));
    let out = up.run(&["job", "plan", "-f", &more]);
    exits(&out, 2, "plan of a count change");
    let text = stdout(&out);
    assert!(
        text.contains("scale job web from 1 to 3 in place (version 1): 2 tasks start"),
        "{text}"
    );
    assert!(text.contains("~ count: 1 → 3"), "{text}");
    let plan = json(&up.run(&["job", "plan", "-f", &more, "-o", "json"]));
    assert_eq!(plan["action"], "scale", "{plan}");
    assert_eq!(plan["scale"], serde_json::json!({"from": 1, "to": 3}));
    assert_eq!(
        (
            &plan["placement"]["tasks"],
            &plan["placement"]["first_index"]
        ),
        (&2.into(), &1.into()),
        "{plan}"
    );

    // More cores than any node has: blocked, visibly, with the scheduler's reason.
    let huge = up.spec("huge.yaml", &format!("{WEB}resources: {{cpu: 64}}\n"));
    let out = up.run(&["job", "plan", "-f", &huge]);
    exits(&out, 2, "plan of a job too big for the cluster");
    let text = stdout(&out);
    assert!(
        text.contains("placement: BLOCKED: the task cannot be placed on any node in the cluster"),
        "{text}"
    );
    assert!(
        text.contains("1 node is too small (the task needs cpu 64"),
        "{text}"
    );
    let plan = json(&up.run(&["job", "plan", "-f", &huge, "-o", "json"]));
    assert_eq!(plan["placement"]["verdict"], "blocked", "{plan}");

    // Two tasks that each need all the node has free (what web holds is counted): the
    // first fits, the second would wait for room, which is not blocked.
    let nodes = json(&up.run(&["node", "ls", "-o", "json"]));
    let free = nodes[0]["info"]["capacity"]["cpu"].as_f64().unwrap()
        - nodes[0]["allocated"]["cpu"].as_f64().unwrap();
    assert!(free > 0.5, "{nodes}");
    let hog = up.spec(
        "hog.yaml",
        &format!("name: hog\ncount: 2\ncommand: ['true']\nresources: {{cpu: {free}}}\n"),
    );
    let out = up.run(&["job", "plan", "-f", &hog]);
    exits(&out, 2, "plan of a job that fills the node");
    let text = stdout(&out);
    assert!(
        text.contains("placement: 1 of 2 tasks can be placed now; 1 would wait as pending:"),
        "{text}"
    );
    assert!(text.contains("1 node lacks free resources"), "{text}");
    let plan = json(&up.run(&["job", "plan", "-f", &hog, "-o", "json"]));
    assert_eq!(plan["placement"]["verdict"], "waits", "{plan}");

    // None of it changed anything: the same version, the same tasks, no new job.
    let view = json(&up.run(&["job", "status", "web", "-o", "json"]));
    assert_eq!(view["job"]["version"], 1, "{view}");
    assert_eq!(view["job"]["spec"]["count"], 1, "{view}");
    assert_eq!(all_tasks(&up), before);
    exits(
        &up.run(&["job", "status", "hog"]),
        4,
        "status of a planned job",
    );

    // Errors exit 1, never 2 (which would read as "changes"), usage errors included.
    exits(
        &up.run(&["job", "plan", "-f", "/no/such/file.yaml"]),
        1,
        "plan of a missing file",
    );
    exits(
        &up.run(&["job", "plan", "-f", &web, "--no-such-flag"]),
        1,
        "plan with a wrong flag",
    );
    exits(
        &up.run(&["job", "apply", "--dry-run", "--detach", "-f", &web]),
        1,
        "a dry run with --detach",
    );
    let bad = up.spec("bad.yaml", "name: web\ncount: three\ncommand: [x]\n");
    let out = up.run(&["job", "plan", "-f", &bad]);
    exits(&out, 1, "plan of an invalid spec");
    assert!(stderr(&out).contains("count: expected a whole number"));
}

#[test]
fn a_plan_in_one_project_never_shows_another_projects_job() {
    let up = Up::start_with(&["--no-docker"]);
    // The cluster admin's default project has a job `shared` with a secret in its env.
    let theirs = up.spec(
        "theirs.yaml",
        "name: shared\nkind: service\ncommand: [sleep, '300']\nenv: {SECRET: default-secret}\nstop_grace: 1s\n",
    );
    exits(
        &up.run(&["job", "apply", "-f", &theirs]),
        0,
        "apply in default",
    );
    exits(
        &up.run(&["project", "create", "team-a"]),
        0,
        "project create",
    );
    let out = up.run(&["token", "create", "--project", "team-a", "--role", "write"]);
    exits(&out, 0, "token create");
    let token = stdout(&out).trim().to_string();

    // team-a plans its own `shared`: a job to create, compared with nothing.
    let mine = up.spec(
        "mine.yaml",
        "name: shared\nkind: service\ncommand: [sleep, '301']\nenv: {SECRET: team-a-secret}\n",
    );
    let as_a = |args: &[&str]| {
        let mut c = up.home.cmd(args);
        c.env("DROVER_SERVER", &up.url).env("DROVER_TOKEN", &token);
        run_with_timeout(c, Duration::from_secs(60))
    };
    for args in [
        &["job", "plan", "-f", &mine][..],
        &["job", "plan", "-f", &mine, "-o", "json"],
        &["job", "apply", "--dry-run", "-f", &theirs],
    ] {
        let out = as_a(args);
        exits(&out, 2, &args.join(" "));
        let text = stdout(&out);
        assert!(!text.contains("default-secret"), "{args:?}: {text}");
        assert!(!text.contains("\"default\""), "{args:?}: {text}");
        assert!(
            text.contains("create job shared (version 1")
                || text.contains("\"action\": \"create\""),
            "{args:?}: {text}"
        );
    }
    // The cluster admin acting in team-a sees the same.
    let out = up.run(&["job", "plan", "--project", "team-a", "-f", &mine]);
    exits(&out, 2, "admin plan in team-a");
    assert!(stdout(&out).contains("create job shared (version 1"));
    // In its own project the job is there to update.
    let out = up.run(&["job", "plan", "-f", &mine]);
    exits(&out, 2, "plan in default");
    assert!(
        stdout(&out).contains(r#"~ env.SECRET: "default-secret" → "team-a-secret""#),
        "{}",
        stdout(&out)
    );
}

#[test]
fn an_update_that_needs_the_room_its_current_tasks_hold_fits_once_they_stop() {
    let up = Up::start_with(&["--no-docker"]);
    // A service that takes all the node has free, less a little.
    let nodes = json(&up.run(&["node", "ls", "-o", "json"]));
    let free = nodes[0]["info"]["capacity"]["cpu"].as_f64().unwrap()
        - nodes[0]["allocated"]["cpu"].as_f64().unwrap();
    let cpu = ((free - 0.1) * 10.0).floor() / 10.0;
    assert!(cpu > 0.5, "{nodes}");
    let yaml = format!(
        "name: big\nkind: service\ncommand: [sleep, '300']\nresources: {{cpu: {cpu}}}\nstop_grace: 1s\n"
    );
    let big = up.spec("big.yaml", &yaml);
    exits(&up.run(&["job", "apply", "-f", &big]), 0, "apply");
    // Its next version needs the same room, which version 1 holds until it stops.
    let next = up.spec("next.yaml", &format!("{yaml}env: {{V: '2'}}\n"));
    let out = up.run(&["job", "plan", "-f", &next]);
    exits(&out, 2, "plan of an update");
    let text = stdout(&out);
    assert!(
        text.contains("placement: 0 of 1 task can be placed now; 1 would wait as pending:"),
        "{text}"
    );
    assert!(
        text.contains(
            "(they fit once the tasks of version 1 have stopped, which applying asks first)"
        ),
        "{text}"
    );
    let plan = json(&up.run(&["job", "plan", "-f", &next, "-o", "json"]));
    assert_eq!(plan["placement"]["verdict"], "waits", "{plan}");
    assert_eq!(
        plan["placement"]["fits_after_current_stops"], true,
        "{plan}"
    );
    // Two such tasks do not fit even then.
    let two = up.spec("two.yaml", &format!("{yaml}env: {{V: '2'}}\ncount: 2\n"));
    let plan = json(&up.run(&["job", "plan", "-f", &two, "-o", "json"]));
    assert_eq!(plan["placement"]["verdict"], "waits", "{plan}");
    assert!(
        plan["placement"]["fits_after_current_stops"].is_null(),
        "{plan}"
    );
}
