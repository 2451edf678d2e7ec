//! Helpers for tests that drive the built `drover` binary the way a user would.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_drover");

/// A user's home: separate config and data dirs, so tests never see each other's (or
/// the machine's) Drover config.
pub struct Home {
    pub dir: tempfile::TempDir,
}

impl Default for Home {
    fn default() -> Self {
        Home::new()
    }
}

impl Home {
    pub fn new() -> Home {
        let dir = tempfile::tempdir().unwrap();
        // Like a user's home on most systems, others may pass through it (not list it):
        // an agent run as root runs its tasks as users of their own, who must reach
        // their directories under the data dir in here.
        std::fs::set_permissions(
            dir.path(),
            <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o711),
        )
        .unwrap();
        Home { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A `drover` command in this home, with no DROVER_* variables from outside.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args)
            .env_remove("DROVER_SERVER")
            .env_remove("DROVER_TOKEN")
            .env_remove("DROVER_PROJECT")
            .env_remove("DROVER_JOIN_TOKEN")
            .env_remove("DROVER_NATS")
            .env_remove("DROVER_LOG")
            .env("HOME", self.path())
            .env("XDG_CONFIG_HOME", self.path().join("config"))
            .env("XDG_DATA_HOME", self.path().join("data"))
            .stdin(Stdio::null());
        c
    }

    /// Runs a command to completion, failing the test if it takes longer than 60 s.
    pub fn run(&self, args: &[&str]) -> Output {
        run_with_timeout(self.cmd(args), Duration::from_secs(60))
    }

    /// Starts a long-running command (`up`, `server`, `agent`) and waits until a line of
    /// its stderr contains `ready`; returns the process and that line.
    pub fn spawn(&self, args: &[&str], ready: &str) -> (Daemon, String) {
        spawn_cmd(self.cmd(args), ready)
    }
}

pub fn run_with_timeout(mut cmd: Command, limit: Duration) -> Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    finish_within(cmd, limit)
}

/// Runs a command whose stdio the caller has set up to completion, failing the test if
/// it takes longer than `limit`.
pub fn finish_within(mut cmd: Command, limit: Duration) -> Output {
    let child = cmd.spawn().expect("spawning drover");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.expect("waiting for drover"),
        Err(_) => panic!("drover did not finish within {limit:?}"),
    }
}

/// A background drover process, killed (SIGKILL) when dropped.
pub struct Daemon {
    pub child: Child,
    pub log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Daemon {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn terminate(&mut self) {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
    }

    /// Stops the process with SIGSTOP: it holds its connections but says nothing, as a
    /// hung or partitioned machine would.
    pub fn freeze(&self) {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGSTOP);
        }
    }

    /// Resumes a frozen process with SIGCONT.
    pub fn thaw(&self) {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGCONT);
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn spawn_cmd(mut cmd: Command, ready: &str) -> (Daemon, String) {
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawning drover");
    let stderr = child.stderr.take().unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let (tx, rx) = mpsc::channel();
    let ready = ready.to_string();
    let log2 = log.clone();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            log2.lock().unwrap().push_str(&format!("{line}\n"));
            if !sent && line.contains(&ready) {
                sent = true;
                let _ = tx.send(line);
            }
        }
    });
    let daemon = Daemon { child, log };
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(line) => (daemon, line),
        Err(_) => panic!(
            "drover did not say {:?} within 30s; its log:\n{}",
            "ready",
            daemon.log()
        ),
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Extracts the `http://...` URL from a line.
pub fn url_in(line: &str) -> String {
    let start = line.find("http://").expect("a URL in the line");
    line[start..].split_whitespace().next().unwrap().to_string()
}

/// Polls until `f` is true, failing after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", stdout(o), stderr(o)))
}

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

pub fn pid_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

/// How long `Up` waits for its agent, and for every task to end when it is dropped.
const UP_WAIT: Duration = Duration::from_secs(60);

/// A `drover up` cluster in its own home, with the CLI config pointing at it.
pub struct Up {
    pub home: Home,
    /// The URL it serves.
    pub url: String,
    /// The arguments it was started with, for a restart.
    args: Vec<String>,
    _up: Daemon,
}

impl Drop for Up {
    fn drop(&mut self) {
        self.stop_everything();
    }
}

impl Up {
    pub fn start() -> Up {
        Up::start_with(&[])
    }

    /// `drover up` with these arguments added.
    pub fn start_with(extra: &[&str]) -> Up {
        let home = Home::new();
        let mut args = vec!["up", "--listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        let (up, line) = home.spawn(&args, "drover is up at");
        wait_for_local_agent(&home);
        Up {
            home,
            url: url_in(&line),
            args: args.iter().map(|a| a.to_string()).collect(),
            _up: up,
        }
    }

    /// Kills `drover up` (controller and agent) with SIGKILL and starts it again on the
    /// same data dir, with the same arguments; the tasks it started keep running and the
    /// new agent adopts them.
    pub fn restart_after_kill9(mut self) -> Up {
        self._up.kill9();
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let (up, line) = self.home.spawn(&args, "drover is up at");
        self._up = up;
        self.url = url_in(&line);
        wait_for_local_agent(&self.home);
        self
    }

    /// Kills every job's tasks. An agent killed with its `drover up` leaves its tasks
    /// running (a restarted agent adopts them), so a test that ended without stopping
    /// its services would leave their processes behind.
    pub fn stop_everything(&self) {
        // Pipelines first: their controller would start their vertices' jobs again.
        let pipelines = self.home.run(&["pipeline", "ls", "-o", "json"]);
        if let Ok(list) = serde_json::from_slice::<serde_json::Value>(&pipelines.stdout) {
            for p in list.as_array().into_iter().flatten() {
                if let Some(name) = p["name"].as_str() {
                    self.home.run(&["pipeline", "delete", name]);
                }
            }
        }
        let jobs = self.home.run(&["job", "ls", "-o", "json"]);
        let Ok(jobs) = serde_json::from_slice::<serde_json::Value>(&jobs.stdout) else {
            return;
        };
        for j in jobs.as_array().into_iter().flatten() {
            if let Some(name) = j["name"].as_str() {
                self.home.run(&["job", "stop", "--force", "--detach", name]);
            }
        }
        let deadline = Instant::now() + UP_WAIT;
        while Instant::now() < deadline {
            let tasks = self.home.run(&["task", "ls", "--all", "-o", "json"]);
            let live = serde_json::from_slice::<serde_json::Value>(&tasks.stdout)
                .ok()
                .and_then(|t| t.as_array().cloned())
                .unwrap_or_default()
                .iter()
                .any(|t| {
                    !["succeeded", "failed", "stopped", "lost"]
                        .contains(&t["state"].as_str().unwrap_or(""))
                });
            if !live {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn job_status(&self, name: &str) -> String {
        let out = self.home.run(&["job", "status", name, "-o", "json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        json(&out)["job"]["status"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

/// Waits until `drover up`'s own agent is the one ready node.
fn wait_for_local_agent(home: &Home) {
    wait_until("the local agent to be ready", UP_WAIT, || {
        let n = json(&home.run(&["node", "ls", "-o", "json"]));
        n.as_array()
            .is_some_and(|a| a.len() == 1 && a[0]["status"] == "ready")
    });
}
