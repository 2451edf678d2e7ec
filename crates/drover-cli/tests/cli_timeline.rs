//! `drover job status` and `drover task status` show what happened to a job's tasks, as
//! a timeline a user reads: placed, started, exited, restarted and why, health passed.

mod common;
use common::*;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

impl Up {
    fn run(&self, args: &[&str]) -> std::process::Output {
        let out = self.home.run(args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        out
    }

    fn apply(&self, name: &str, yaml: &str) {
        let job = write(self.home.path(), &format!("{name}.yaml"), yaml);
        self.run(&["job", "apply", "--detach", "-f", job.to_str().unwrap()]);
    }

    /// Stops a job and waits until its tasks have ended.
    fn stop(&self, name: &str) {
        self.run(&["job", "stop", "--force", name]);
    }
}

/// The positions of `wanted`, in order, in `text`; fails naming the first one missing
/// or out of order.
fn in_order(text: &str, wanted: &[&str]) {
    let mut from = 0;
    for w in wanted {
        match text[from..].find(w) {
            Some(i) => from += i + w.len(),
            None => panic!("{w:?} missing, or not after {wanted:?}'s earlier lines, in:\n{text}"),
        }
    }
}

#[test]
fn job_status_shows_a_crashing_service_placed_started_exited_and_restarted_with_why() {
    let up = Up::start();
    up.apply(
        "crashes",
        "name: crashes\nkind: service\ncommand: [sh, -c, 'sleep 0.5; exit 1']\nrestart: { delay: 1s, backoff: 1 }\n",
    );
    // The second attempt has been made and has run: the first one's end and the
    // restart are both behind it.
    wait_until("a restarted attempt to start", T, || {
        let s = json(&up.run(&["job", "status", "crashes", "-o", "json"]));
        s["tasks"].as_array().is_some_and(|ts| {
            ts.iter().any(|t| {
                t["attempt"] == 1
                    && t["events"]
                        .as_array()
                        .is_some_and(|es| es.iter().any(|e| e["kind"] == "started"))
            })
        })
    });

    let table = stdout(&up.run(&["job", "status", "crashes"]));
    let events = table
        .split_once("EVENTS (newest last")
        .unwrap_or_else(|| panic!("no timeline under the task table:\n{table}"))
        .1;
    in_order(
        events,
        &[
            "[0]  placed on node ",
            "[0]  preparing",
            "[0]  starting",
            "[0]  started",
            "[0]  exited with code 1",
            "[0]  restart 1 after exit code 1, back-off 1s",
            "[0]  placed on node ",
            "[0]  started",
        ],
    );
    for line in events.lines() {
        assert!(
            line.chars().count() <= 100,
            "a line wider than 100 columns: {line:?}"
        );
    }
    assert!(
        events
            .lines()
            .skip(1)
            .all(|l| l.trim_start().contains(" ago  [0]  ")),
        "each line says when and which index:\n{events}"
    );

    // JSON has the same events, typed, with their times in milliseconds.
    let status = json(&up.run(&["job", "status", "crashes", "-o", "json"]));
    let tasks = status["tasks"].as_array().unwrap();
    let first = tasks.iter().find(|t| t["attempt"] == 0).unwrap();
    let kinds: Vec<&str> = first["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["placed", "preparing", "starting", "started", "exited"],
        "{first}"
    );
    let second = tasks.iter().find(|t| t["attempt"] == 1).unwrap();
    assert_eq!(second["events"][0]["kind"], "restart", "{second}");
    // Times in JSON are RFC 3339 in UTC with milliseconds, always 24 characters, so
    // they also sort as text.
    let restarted = second["events"][0]["at"].as_str().unwrap();
    let exited = first["events"][4]["at"].as_str().unwrap();
    for time in [restarted, exited, second["created_at"].as_str().unwrap()] {
        assert!(
            time.len() == 24 && time.ends_with('Z') && time.as_bytes()[10] == b'T',
            "{time}"
        );
    }
    assert!(restarted >= exited, "{restarted} < {exited}");

    // Listings of many tasks leave the timelines out.
    let listing = json(&up.run(&["task", "ls", "--all", "-o", "json"]));
    assert!(
        listing
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t.get("events").is_none()),
        "{listing}"
    );

    // A shorter timeline says how to see all of it.
    let short = stdout(&up.run(&["job", "status", "crashes", "--events", "2"]));
    let (_, events) = short.split_once("EVENTS").unwrap();
    assert!(events.contains("--events all"), "{short}");
    assert_eq!(
        events.lines().filter(|l| l.contains(" ago ")).count(),
        2,
        "{short}"
    );
    let bad = up
        .home
        .run(&["job", "status", "crashes", "--events", "lots"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("--events"), "{}", stderr(&bad));

    // One task's own story, by a prefix of its id.
    let id = first["id"].as_str().unwrap();
    let one = stdout(&up.run(&["task", "status", &id[..id.len() - 2]]));
    assert!(one.contains(&format!("id:       {id}")), "{one}");
    in_order(
        &one,
        &[
            "attempt:  0",
            "[0]  placed on node ",
            "[0]  exited with code 1",
        ],
    );
    assert!(
        !one.contains("restart 1"),
        "only this attempt's events: {one}"
    );

    up.stop("crashes");
    let stopped = stdout(&up.run(&["job", "status", "crashes", "--events", "all"]));
    assert!(stopped.contains("stopped by user"), "{stopped}");
}

#[test]
fn job_status_shows_a_health_check_passing() {
    let image = drover_testkit::images::busybox_image().unwrap();
    let up = Up::start();
    up.apply(
        "healthy",
        &format!(
            "name: healthy\nkind: service\nruntime: docker\nimage: {image}\npull: never\n\
             command: [/bin/busybox, sleep, '300']\n\
             health: {{ command: [/bin/true], interval: 200ms }}\n"
        ),
    );
    wait_until("the service to run", T, || {
        let s = json(&up.run(&["job", "status", "healthy", "-o", "json"]));
        s["tasks"][0]["state"] == "running"
    });
    let table = stdout(&up.run(&["job", "status", "healthy"]));
    in_order(
        &table,
        &[
            "EVENTS (newest last)",
            "[0]  placed on node ",
            "[0]  started",
            "[0]  health check passed (command /bin/true)",
        ],
    );
    up.stop("healthy");
}
