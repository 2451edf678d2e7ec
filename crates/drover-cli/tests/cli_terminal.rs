//! What `drover` shows on a real terminal: the commands run inside tmux, whose screen the
//! tests read, because spinners, screen redraws and Ctrl-C only happen there.

mod common;

use common::{BIN, Up, write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A tmux server of the test's own (its socket in a temporary directory), running one
/// command in a 120×40 window.
struct Terminal {
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Terminal {
    /// Runs `args` as `drover` in `up`'s home on a new terminal. When the command ends,
    /// the window stays, with `[exit CODE]` under its output.
    fn run(up: &Up, args: &[&str]) -> Terminal {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("tmux.sock");
        let home = up.home.path();
        let quoted: Vec<String> = args.iter().map(|a| shell_quote(a)).collect();
        // A clean environment, as a new login would have, but for the home's config. The
        // shell traps Ctrl-C's SIGINT (which reaches the whole foreground group) so that
        // it lives on to print the exit code; a trap, unlike an ignored signal, is not
        // passed on to `drover`.
        let script = format!(
            "trap 'true' INT; env -i PATH={path} TERM=xterm-256color HOME={home} XDG_CONFIG_HOME={config} \
             XDG_DATA_HOME={data} {bin} {args}; echo \"[exit $?]\"; exec sleep 600",
            path = shell_quote(&std::env::var("PATH").unwrap_or_default()),
            home = shell_quote(&home.display().to_string()),
            config = shell_quote(&home.join("config").display().to_string()),
            data = shell_quote(&home.join("data").display().to_string()),
            bin = shell_quote(BIN),
            args = quoted.join(" "),
        );
        let t = Terminal { socket, _dir: dir };
        t.tmux(&[
            "new-session",
            "-d",
            "-x",
            "120",
            "-y",
            "40",
            "sh",
            "-c",
            &script,
        ]);
        t
    }

    fn tmux(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("running tmux (the tests install it)");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// What the window shows now.
    fn screen(&self) -> String {
        self.tmux(&["capture-pane", "-p"])
    }

    /// Reads the screen every 50 ms until `done` holds for it, and returns every
    /// distinct screen seen on the way; fails with the last one after `limit`.
    fn watch_until(&self, limit: Duration, done: impl Fn(&str) -> bool) -> Vec<String> {
        let deadline = Instant::now() + limit;
        let mut seen: Vec<String> = Vec::new();
        loop {
            let screen = self.screen();
            if seen.last() != Some(&screen) {
                seen.push(screen.clone());
            }
            if done(&screen) {
                return seen;
            }
            assert!(
                Instant::now() < deadline,
                "the terminal did not get there within {limit:?}; it shows:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn keys(&self, keys: &str) {
        self.tmux(&["send-keys", keys]);
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        // Ends the window's processes too (tmux hangs them up).
        let out = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .arg("kill-server")
            .output();
        if let Err(e) = out {
            eprintln!("stopping the test's tmux: {e}");
        }
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn exited(screen: &str) -> Option<i32> {
    let at = screen.find("[exit ")?;
    screen[at + 6..].split(']').next()?.parse().ok()
}

fn lines_with<'a>(screen: &'a str, needle: &str) -> Vec<&'a str> {
    screen.lines().filter(|l| l.contains(needle)).collect()
}

#[test]
fn run_on_a_terminal_says_why_it_waits_and_ctrl_c_stops_the_job() {
    let up = Up::start();
    let term = Terminal::run(
        &up,
        &["run", "--name", "big", "--cpu", "64", "--", "echo", "never"],
    );
    // Not a blank screen: the reason the task waits, at once.
    let seen = term.watch_until(Duration::from_secs(20), |s| s.contains("drover: waiting:"));
    let screen = seen.last().unwrap();
    assert!(
        screen.contains("cpu"),
        "the reason names what is lacking:\n{screen}"
    );
    // Ctrl-C from the terminal (SIGINT to its foreground process group) ends `run`
    // with 130 and stops the job.
    term.keys("C-c");
    let seen = term.watch_until(Duration::from_secs(20), |s| exited(s).is_some());
    let screen = seen.last().unwrap();
    assert_eq!(exited(screen), Some(130), "{screen}");
    assert!(!screen.contains("never\n"), "{screen}");
    let status = up.job_status("big");
    assert!(
        ["stopped", "failed"].contains(&status.as_str()),
        "the job was left {status}"
    );
}

#[test]
fn apply_shows_a_spinner_while_it_waits_and_clears_it_when_done() {
    let up = Up::start();
    // A rolling update that waits 3 s on each new task, so the wait is long enough to
    // see.
    let spec = |greeting: &str| {
        format!(
            "name: slow\nkind: service\ncommand: [sleep, \"600\"]\nenv: {{ GREETING: {greeting} }}\n\
             update: {{ max_parallel: 1, min_healthy_time: 3s }}\n"
        )
    };
    let first = write(up.home.path(), "v1.yaml", &spec("hello"));
    let out = up.home.run(&["job", "apply", "-f", &path(&first)]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let spec = write(up.home.path(), "v2.yaml", &spec("bonjour"));
    let term = Terminal::run(&up, &["job", "apply", "-f", &path(&spec)]);
    let seen = term.watch_until(Duration::from_secs(60), |s| exited(s).is_some());
    let last = seen.last().unwrap();
    assert_eq!(exited(last), Some(0), "{last}");
    // While it waited, one line said where the rollout was (the spinner's), redrawn in
    // place rather than printed again and again.
    let progress = "tasks updated;";
    let waiting: Vec<&String> = seen
        .iter()
        .filter(|s| exited(s).is_none() && s.contains(progress))
        .collect();
    assert!(
        !waiting.is_empty(),
        "no progress was shown while waiting; screens:\n{}",
        seen.join("\n----\n")
    );
    for screen in &waiting {
        assert_eq!(lines_with(screen, progress).len(), 1, "{screen}");
    }
    // When it is done the spinner is gone and the outcome stays.
    assert!(lines_with(last, progress).is_empty(), "{last}");
    assert!(last.contains("rolling out version 2"), "{last}");
}

#[test]
fn task_ls_watch_redraws_one_screen_until_ctrl_c() {
    let up = Up::start();
    let term = Terminal::run(&up, &["task", "ls", "--watch"]);
    // An empty cluster first; then a job started elsewhere appears on the same screen.
    term.watch_until(Duration::from_secs(20), |s| s.contains("ID"));
    let out = up.home.run(&[
        "job",
        "apply",
        "--detach",
        "-f",
        &path(&write(
            up.home.path(),
            "sleeper.yaml",
            "name: sleeper\nkind: service\ncommand: [sleep, \"600\"]\n",
        )),
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let seen = term.watch_until(Duration::from_secs(20), |s| {
        s.contains("sleeper") && s.contains("running")
    });
    for screen in &seen {
        // Redrawn, never scrolled: the header is on each screen once.
        assert!(lines_with(screen, "ID").len() <= 1, "{screen}");
    }
    term.keys("C-c");
    let seen = term.watch_until(Duration::from_secs(10), |s| exited(s).is_some());
    assert_eq!(exited(seen.last().unwrap()), Some(0));
}

fn path(p: &Path) -> String {
    p.display().to_string()
}
