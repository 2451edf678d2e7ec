//! Crashes and losses, with real `drover server` and `drover agent` processes killed
//! with SIGKILL: nothing acknowledged is lost and no task is left running untracked.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

/// A controller and the means to start agents against it, all as separate processes.
struct Fleet {
    home: Home,
    server: Option<Daemon>,
    url: String,
    listen: String,
    node_timeout: &'static str,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Fleet {
    fn start() -> Fleet {
        Fleet::start_with("2s")
    }

    /// A fleet whose server finds a node unreachable after `node_timeout` of silence.
    fn start_with(node_timeout: &'static str) -> Fleet {
        let home = Home::new();
        let listen = format!("127.0.0.1:{}", free_port());
        let mut f = Fleet {
            home,
            server: None,
            url: String::new(),
            listen,
            node_timeout,
        };
        f.start_server();
        f
    }

    fn server_dir(&self) -> PathBuf {
        self.home.path().join("server")
    }

    fn start_server(&mut self) {
        let dir = self.server_dir();
        let (d, line) = self.home.spawn(
            &[
                "server",
                "--insecure-http",
                "--data-dir",
                dir.to_str().unwrap(),
                "--listen",
                &self.listen,
                "--heartbeat-interval",
                "200ms",
                "--node-timeout",
                self.node_timeout,
            ],
            "listening on",
        );
        self.url = url_in(&line);
        self.server = Some(d);
    }

    fn token(&self, name: &str) -> String {
        std::fs::read_to_string(self.server_dir().join(name)).unwrap()
    }

    fn agent(&self, name: &str) -> Daemon {
        let dir = self.home.path().join(format!("agent-{name}"));
        let join = self.token("join-token");
        let mut cmd = self.home.cmd(&[
            "agent",
            "--server",
            &self.url,
            "--join-token",
            &join,
            "--data-dir",
            dir.to_str().unwrap(),
            "--name",
            name,
        ]);
        cmd.env("DROVER_LOG", "info");
        spawn_cmd(cmd, "connected to").0
    }

    /// A client command against this fleet, with the server and token from the
    /// environment as a script would pass them.
    fn cli(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = self.home.cmd(args);
        cmd.env("DROVER_SERVER", &self.url)
            .env("DROVER_TOKEN", self.token("admin-token"));
        run_with_timeout(cmd, Duration::from_secs(60))
    }

    fn apply(&self, yaml: &str) {
        let file = write(self.home.path(), "job.yaml", yaml);
        // Detached: these tests apply jobs while agents come and go, and watch the
        // outcome themselves.
        let out = self.cli(&["job", "apply", "--detach", "-f", file.to_str().unwrap()]);
        assert!(out.status.success(), "{}", stderr(&out));
    }

    fn tasks(&self, job: &str) -> Vec<serde_json::Value> {
        let out = self.cli(&["task", "ls", "--job", job, "-o", "json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        json(&out).as_array().cloned().unwrap_or_default()
    }

    fn job(&self, job: &str) -> serde_json::Value {
        json(&self.cli(&["job", "status", job, "-o", "json"]))["job"].clone()
    }

    fn logs(&self, job: &str) -> String {
        stdout(&self.cli(&["logs", job]))
    }

    fn node_status(&self, name: &str) -> String {
        let nodes = json(&self.cli(&["node", "ls", "-o", "json"]));
        nodes
            .as_array()
            .and_then(|a| a.iter().find(|n| n["info"]["name"] == name))
            .map(|n| n["status"].as_str().unwrap_or("").to_string())
            .unwrap_or_default()
    }

    /// Waits for the job's only running task and returns (task id, pid it printed).
    fn running_task(&self, job: &str) -> (String, i32) {
        let mut found = None;
        wait_until("a running task that printed its pid", T, || {
            let running: Vec<_> = self
                .tasks(job)
                .into_iter()
                .filter(|t| t["state"] == "running")
                .collect();
            if running.len() != 1 {
                return false;
            }
            let id = running[0]["id"].as_str().unwrap().to_string();
            let out = self.cli(&["logs", &id]);
            let pid = stdout(&out)
                .lines()
                .filter_map(|l| l.strip_prefix("pid "))
                .filter_map(|p| p.trim().parse::<i32>().ok())
                .next_back();
            found = pid.map(|p| (id, p));
            found.is_some()
        });
        found.unwrap()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // Tasks run in their own sessions and would outlive the test; end them.
        let _ = Command::new("pkill")
            .args([
                "-9",
                "-f",
                &format!("drover-test-marker-{}", self.home.path().display()),
            ])
            .status();
    }
}

fn service(name: &str, home: &Path) -> String {
    // The marker in the command lets the fleet's drop find stray processes.
    format!(
        "name: {name}\nkind: service\ncommand: [sh, -c, 'echo pid $$; exec sleep 120 # drover-test-marker-{}']\nstop_grace: 2s\nrestart: {{ delay: 100ms }}\n",
        home.display()
    )
}

#[test]
fn an_agent_killed_with_sigkill_re_adopts_its_running_task() {
    let fleet = Fleet::start();
    let mut agent = fleet.agent("n1");
    fleet.apply(&service("adoptee", fleet.home.path()));
    let (task, pid) = fleet.running_task("adoptee");

    agent.kill9();
    assert!(pid_alive(pid), "the task must survive its agent");
    let _agent = fleet.agent("n1");
    std::thread::sleep(Duration::from_millis(500));
    let tasks = fleet.tasks("adoptee");
    assert_eq!(tasks.len(), 1, "no replacement task: {tasks:?}");
    assert_eq!(tasks[0]["id"], task.as_str());
    assert_eq!(tasks[0]["state"], "running");
    assert!(pid_alive(pid));

    // The re-adopted task is fully under control: a stop ends it and records SIGTERM.
    assert!(fleet.cli(&["job", "stop", "adoptee"]).status.success());
    wait_until("the task to stop", T, || {
        fleet.tasks("adoptee")[0]["state"] == "stopped"
    });
    assert_eq!(fleet.tasks("adoptee")[0]["exit"]["signal"], "SIGTERM");
    wait_until("the process to end", T, || !pid_alive(pid));
}

#[test]
fn a_task_that_ends_while_its_agent_is_down_is_reported_with_its_exit_code() {
    let fleet = Fleet::start();
    let mut agent = fleet.agent("n1");
    fleet.apply("name: ender\ncommand: [sh, -c, 'echo started; sleep 1.5; exit 7']\nrestart: { attempts: 0 }\n");
    wait_until("the task to run", T, || {
        fleet
            .tasks("ender")
            .first()
            .is_some_and(|t| t["state"] == "running")
    });
    agent.kill9();
    std::thread::sleep(Duration::from_millis(2000));
    let _agent = fleet.agent("n1");
    wait_until("the job to fail", T, || {
        fleet.job("ender")["status"] == "failed"
    });
    let job = fleet.job("ender");
    assert_eq!(job["exit"]["code"], 7, "{job}");
    assert!(fleet.logs("ender").contains("started"));
}

#[test]
fn a_controller_killed_with_sigkill_loses_nothing_and_tasks_keep_running() {
    let mut fleet = Fleet::start();
    let _agent = fleet.agent("n1");
    fleet.apply(&service("survivor", fleet.home.path()));
    let (task, pid) = fleet.running_task("survivor");
    // Acknowledged just before the crash.
    fleet.apply("name: late\ncommand: [sh, -c, 'echo late ran']\n");

    fleet.server.as_mut().unwrap().kill9();
    assert!(pid_alive(pid));
    std::thread::sleep(Duration::from_millis(300));
    fleet.start_server();

    wait_until("the agent to reconnect", T, || {
        fleet.node_status("n1") == "ready"
    });
    let tasks = fleet.tasks("survivor");
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    assert_eq!(tasks[0]["id"], task.as_str());
    assert_eq!(tasks[0]["state"], "running");
    assert!(pid_alive(pid));
    wait_until("the late job to complete", T, || {
        fleet.job("late")["status"] == "complete"
    });
    let late = fleet.logs("late");
    assert!(
        late.contains("late ran"),
        "logs: {late:?}; tasks: {:?}; server log: {}",
        fleet.tasks("late"),
        fleet.server.as_ref().unwrap().log()
    );
    assert!(fleet.cli(&["job", "stop", "survivor"]).status.success());
    wait_until("the process to end", T, || !pid_alive(pid));
}

/// A file outside any task's directory that tasks append a line to each time they run,
/// so a test can count runs. Tasks may run as users of their own (an agent run as root
/// gives each one), so it is made writable by all first.
fn runs_file(fleet: &Fleet) -> std::path::PathBuf {
    let runs = fleet.home.path().join("runs");
    std::fs::write(&runs, "").unwrap();
    std::fs::set_permissions(
        &runs,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o666),
    )
    .unwrap();
    runs
}

/// The tasks of `job` as (id, node name, state, unknown).
fn task_rows(fleet: &Fleet, job: &str) -> Vec<(String, String, String, bool)> {
    fleet
        .tasks(job)
        .into_iter()
        .map(|t| {
            (
                t["id"].as_str().unwrap_or_default().to_string(),
                t["node_name"].as_str().unwrap_or_default().to_string(),
                t["state"].as_str().unwrap_or_default().to_string(),
                t["unknown"].as_bool().unwrap_or(false),
            )
        })
        .collect()
}

/// The pids a job's tasks printed (`pid N` lines), by task id.
fn printed_pids(fleet: &Fleet, task: &str) -> Vec<i32> {
    stdout(&fleet.cli(&["logs", task]))
        .lines()
        .filter_map(|l| l.strip_prefix("pid "))
        .filter_map(|p| p.trim().parse().ok())
        .collect()
}

#[test]
fn an_agent_restarted_after_its_service_was_replaced_keeps_the_original_and_stops_the_copy() {
    let fleet = Fleet::start();
    let mut a = fleet.agent("a");
    let mut b = fleet.agent("b");
    wait_until("both nodes", T, || {
        fleet.node_status("a") == "ready" && fleet.node_status("b") == "ready"
    });
    // Placement may pick either node; the test kills whichever agent got the task.
    let spec = format!(
        "{}disconnect: {{ lost_after: 1s }}\n",
        service("mover", fleet.home.path())
    );
    fleet.apply(&spec);
    let (first, pid) = fleet.running_task("mover");
    let first_node = fleet.tasks("mover")[0]["node_name"]
        .as_str()
        .unwrap()
        .to_string();
    if first_node == "a" {
        a.kill9()
    } else {
        b.kill9()
    }
    wait_until("the node to be unreachable and its task unknown", T, || {
        fleet.node_status(&first_node) == "disconnected"
            && task_rows(&fleet, "mover")
                .iter()
                .any(|(id, _, state, unknown)| id == &first && state == "running" && *unknown)
    });
    wait_until("a replacement to run elsewhere", T, || {
        task_rows(&fleet, "mover")
            .iter()
            .any(|(id, node, state, _)| id != &first && node != &first_node && state == "running")
    });
    let copy = task_rows(&fleet, "mover")
        .into_iter()
        .find(|(id, ..)| id != &first)
        .unwrap()
        .0;
    assert!(
        pid_alive(pid),
        "the original still runs on the unreachable node"
    );
    // The agent comes back and re-adopts the original: the original stays, the copy
    // is stopped, and one instance runs.
    let _back = fleet.agent(&first_node);
    wait_until("the copy to be stopped", T, || {
        task_rows(&fleet, "mover")
            .iter()
            .any(|(id, _, state, _)| id == &copy && state == "stopped")
    });
    let rows = task_rows(&fleet, "mover");
    let running: Vec<_> = rows.iter().filter(|r| r.2 == "running").collect();
    assert_eq!(running.len(), 1, "{rows:?}");
    assert_eq!(running[0].0, first, "{rows:?}");
    assert!(!running[0].3, "the original is known again: {rows:?}");
    assert!(pid_alive(pid), "the original was kept");
    for copy_pid in printed_pids(&fleet, &copy) {
        wait_until("the copy's process to end", T, || !pid_alive(copy_pid));
    }
}

#[test]
fn a_batch_task_that_finishes_while_its_agent_is_frozen_is_not_run_again() {
    let fleet = Fleet::start();
    let agent = fleet.agent("n1");
    let runs = runs_file(&fleet);
    fleet.apply(&format!(
        "name: once\ncommand: [sh, -c, 'echo run >> {}; sleep 4; echo finished']\n",
        runs.display()
    ));
    wait_until("the task to run", T, || {
        fleet
            .tasks("once")
            .first()
            .is_some_and(|t| t["state"] == "running")
    });
    // Frozen past the node timeout (2 s), while the task finishes with exit 0.
    agent.freeze();
    wait_until("the task to be unknown", T, || {
        task_rows(&fleet, "once").iter().any(|r| r.3)
    });
    std::thread::sleep(Duration::from_secs(5));
    let rows = task_rows(&fleet, "once");
    assert_eq!(rows.len(), 1, "no replacement before lost_after: {rows:?}");
    agent.thaw();
    wait_until("the job to complete", T, || {
        fleet.job("once")["status"] == "complete"
    });
    let rows = task_rows(&fleet, "once");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].2, "succeeded", "{rows:?}");
    assert_eq!(std::fs::read_to_string(&runs).unwrap(), "run\n", "ran once");
    assert!(fleet.logs("once").contains("finished"));
}

#[test]
fn a_service_never_runs_more_than_its_count_once_a_frozen_node_returns() {
    let fleet = Fleet::start();
    let a = fleet.agent("a");
    let b = fleet.agent("b");
    wait_until("both nodes", T, || {
        fleet.node_status("a") == "ready" && fleet.node_status("b") == "ready"
    });
    let spec = format!(
        "{}count: 2\ndisconnect: {{ lost_after: 1s }}\n",
        service("pair", fleet.home.path())
    );
    fleet.apply(&spec);
    wait_until("two running tasks", T, || {
        task_rows(&fleet, "pair")
            .iter()
            .filter(|r| r.2 == "running")
            .count()
            == 2
    });
    // Freeze the node of task 0; its task gets a replacement, which may land anywhere
    // but the frozen node.
    let rows = task_rows(&fleet, "pair");
    let frozen_node = rows[0].1.clone();
    let frozen = if frozen_node == "a" { &a } else { &b };
    let originals: Vec<String> = rows
        .iter()
        .filter(|r| r.1 == frozen_node)
        .map(|r| r.0.clone())
        .collect();
    frozen.freeze();
    wait_until("replacements for the frozen node's tasks", T, || {
        task_rows(&fleet, "pair")
            .iter()
            .filter(|r| r.2 == "running" && !r.3 && r.1 != frozen_node)
            .count()
            == 2
    });
    frozen.thaw();
    wait_until("the count to be back to two", T, || {
        let rows = task_rows(&fleet, "pair");
        rows.iter().filter(|r| r.2 == "running").count() == 2
            && rows.iter().all(|r| !r.3)
            && rows.iter().filter(|r| r.2 == "stopped").count() == originals.len()
    });
    let rows = task_rows(&fleet, "pair");
    for o in &originals {
        assert!(
            rows.iter().any(|r| &r.0 == o && r.2 == "running"),
            "the original {o} is kept: {rows:?}"
        );
    }
    // Processes, not only records: exactly two task processes run.
    let alive: Vec<i32> = rows
        .iter()
        .flat_map(|r| printed_pids(&fleet, &r.0))
        .filter(|p| pid_alive(*p))
        .collect();
    wait_until("the stopped copies' processes to end", T, || {
        alive.iter().filter(|p| pid_alive(**p)).count() == 2
    });
}

#[test]
fn with_on_lost_fail_a_task_on_a_frozen_node_fails_the_job_instead_of_running_twice() {
    let fleet = Fleet::start();
    let a = fleet.agent("a");
    let b = fleet.agent("b");
    wait_until("both nodes", T, || {
        fleet.node_status("a") == "ready" && fleet.node_status("b") == "ready"
    });
    let runs = runs_file(&fleet);
    fleet.apply(&format!(
        "name: careful\ncommand: [sh, -c, 'echo run >> {}; echo pid $$; exec sleep 120 # drover-test-marker-{}']\ndisconnect: {{ lost_after: 1s, on_lost: fail }}\n",
        runs.display(),
        fleet.home.path().display()
    ));
    let (task, pid) = fleet.running_task("careful");
    let node = task_rows(&fleet, "careful")[0].1.clone();
    let frozen = if node == "a" { &a } else { &b };
    frozen.freeze();
    wait_until("the job to fail", T, || {
        fleet.job("careful")["status"] == "failed"
    });
    let job = fleet.job("careful");
    let reason = job["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("on_lost is fail"), "{job}");
    let rows = task_rows(&fleet, "careful");
    assert_eq!(rows.len(), 1, "never a second copy: {rows:?}");
    assert_eq!(rows[0].2, "lost", "{rows:?}");
    assert_eq!(std::fs::read_to_string(&runs).unwrap(), "run\n");
    // When the node returns it is told to drop the task, so nothing runs untracked.
    frozen.thaw();
    wait_until("the lost task's process to be killed", T, || {
        !pid_alive(pid)
    });
    assert_eq!(task_rows(&fleet, "careful")[0].0, task);
}

/// A task that ignores SIGTERM under an hour's grace: `drover job stop` leaves it
/// stopping, and `drover job stop --force`, given while its agent is down, is still forced
/// when the agent returns and re-adopts the task: it is killed at once.
#[test]
fn a_forced_stop_given_while_the_agent_is_down_kills_the_task_when_it_returns() {
    // The node must not be declared lost while its agent is down, which would end the
    // task another way.
    let fleet = Fleet::start_with("60s");
    let mut agent = fleet.agent("n1");
    fleet.apply(&format!(
        "name: deaf\nkind: service\ncommand: [sh, -c, 'trap \"\" TERM; echo pid $$; while true; do sleep 0.1; done # drover-test-marker-{}']\nstop_grace: 1h\n",
        fleet.home.path().display()
    ));
    let (_, pid) = fleet.running_task("deaf");
    let out = fleet.cli(&["job", "stop", "--detach", "deaf"]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_until("the task to be stopping", T, || {
        fleet.tasks("deaf")[0]["state"] == "stopping"
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(pid_alive(pid), "the trap holds against SIGTERM");

    agent.kill9();
    let out = fleet.cli(&["job", "stop", "--force", "--detach", "deaf"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("killed now"), "{}", stdout(&out));
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        pid_alive(pid),
        "nothing can kill it while its agent is down"
    );

    let _agent = fleet.agent("n1");
    wait_until("the process to be killed", Duration::from_secs(10), || {
        !pid_alive(pid)
    });
    wait_until("the task to be stopped", T, || {
        fleet.tasks("deaf")[0]["state"] == "stopped"
    });
    let task = &fleet.tasks("deaf")[0];
    assert!(
        task["reason"].as_str().unwrap_or("").contains("forced"),
        "{task}"
    );
}

/// The pids of the processes whose command line is exactly `argv`.
fn processes(argv: &[&str]) -> Vec<i32> {
    let want = argv.join("\0") + "\0";
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == want.as_bytes()))
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// A node whose agent is gone is removed with `drover node rm`, its task is lost and
/// replaced, and a connected node is refused with a reason. When the agent comes back
/// it registers again, stops the task it was running and runs the replacement. Capped
/// output says, on stderr, where it was dropped.
#[test]
fn node_rm_removes_a_gone_agents_node_and_capped_logs_say_what_was_dropped() {
    // A duration no other test uses, to find this test's processes.
    const SLEEP: [&str; 2] = ["sleep", "613"];
    let fleet = Fleet::start();
    let mut a = fleet.agent("a1");
    fleet.apply(
        "name: chatty\nkind: service\ncommand: [sh, -c, 'seq 1 100000; exec sleep 613']\nstop_grace: 1s\nlogs:\n  max_size: 64Ki\n",
    );
    wait_until("the output to be shipped", T, || {
        stdout(&fleet.cli(&["logs", "chatty"])).ends_with("\n100000\n")
    });
    let logs = fleet.cli(&["logs", "chatty"]);
    assert!(
        stdout(&logs).len() <= 64 << 10,
        "{} bytes",
        stdout(&logs).len()
    );
    assert!(
        stderr(&logs).contains("bytes of stdout dropped here: the job's logs.max_size"),
        "{}",
        stderr(&logs)
    );

    let refused = fleet.cli(&["node", "rm", "a1"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        stderr(&refused).contains("is connected; stop its agent first"),
        "{}",
        stderr(&refused)
    );
    let missing = fleet.cli(&["node", "rm", "nope"]);
    assert_eq!(missing.status.code(), Some(4), "{}", stderr(&missing));

    let old = fleet.tasks("chatty")[0]["id"].as_str().unwrap().to_string();
    wait_until("the task's process to run", T, || {
        processes(&SLEEP).len() == 1
    });
    let original = processes(&SLEEP)[0];
    a.kill9();
    // The server notices the closed connection; until then the node counts as connected.
    wait_until("the node to be removed", T, || {
        fleet.cli(&["node", "rm", "a1"]).status.success()
    });
    let nodes = json(&fleet.cli(&["node", "ls", "-o", "json"]));
    assert_eq!(nodes.as_array().map(Vec::len), Some(0), "{nodes}");
    let tasks = fleet.tasks("chatty");
    let lost = tasks.iter().find(|t| t["id"] == old.as_str()).unwrap();
    assert_eq!(lost["state"], "lost", "{tasks:?}");
    assert!(
        lost["reason"]
            .as_str()
            .unwrap()
            .contains("node a1 was removed by an admin"),
        "{lost}"
    );
    assert_eq!(tasks.len(), 2, "a replacement waits for a node: {tasks:?}");

    // The agent comes back with its data dir: its node registers again, the task it
    // still runs is stopped (the controller has it as lost), and the replacement runs.
    let _a = fleet.agent("a1");
    wait_until("the replacement to run, alone", T, || {
        let tasks = fleet.tasks("chatty");
        tasks
            .iter()
            .any(|t| t["state"] == "running" && t["id"] != old.as_str())
            && processes(&SLEEP).len() == 1
            && !processes(&SLEEP).contains(&original)
    });
    let out = fleet.cli(&["job", "stop", "chatty"]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_until("every process of the job to end", T, || {
        processes(&SLEEP).is_empty()
    });
}
