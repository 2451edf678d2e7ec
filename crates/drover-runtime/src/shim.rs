//! The task shim: a tiny supervisor the process runtime puts between itself and a task's
//! program, so that the program's exit status survives an agent restart.
//!
//! The agent runs `drover __shim --status-file <dir>/exit-status -- <argv...>` as the
//! leader of the task's process group. The shim ignores the polite stop signals itself
//! (the group signal reaches the program directly), runs the program, waits for it and
//! records how it ended in the status file before exiting. A later agent, which is not the
//! program's parent and so cannot collect its exit status, reads that file instead.
//!
//! # Status file format
//!
//! One small JSON object, written atomically (a temporary file renamed over the target):
//!
//! - `{"code":3}`: the program exited with code 3;
//! - `{"signal":"SIGTERM"}`: the program was ended by that signal;
//! - `{"code":127,"error":"..."}`: the program could not be started; `error` says why.
//!
//! Readers ignore fields they do not know, so fields can be added later.

use crate::ExitStatus;
use crate::sandbox::Confinement;
use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::io;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};

/// The hidden subcommand of the `drover` binary that runs [`run_shim`].
pub const SUBCOMMAND: &str = "__shim";

/// The exit code the shim reports when the program could not be started, as shells do.
pub const SPAWN_FAILED_CODE: i32 = 127;

/// The signals the shim ignores so that it outlives the program it records. The program
/// gets them back at their defaults before it starts.
const SHIELDED_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// The on-disk form of a status; see the module documentation.
#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
struct StatusRecord {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    signal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// What the shim is asked to do: run `argv`, confined, and record how it ended.
#[derive(Debug)]
pub struct ShimArgs {
    pub status_file: PathBuf,
    pub argv: Vec<String>,
    confinement: Confinement,
}

/// The arguments (after the binary itself) that make `drover` run as the shim for
/// `argv`, confining it as `confinement` says.
pub(crate) fn command_args(
    status_file: &Path,
    confinement: &Confinement,
    argv: &[String],
) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        SUBCOMMAND.into(),
        "--status-file".into(),
        status_file.as_os_str().to_owned(),
    ];
    args.extend(confinement.shim_args());
    args.push("--".into());
    args.extend(argv.iter().map(OsString::from));
    args
}

/// Parses the arguments that follow [`SUBCOMMAND`]:
/// `--status-file FILE [--cgroup PROCS_FILE]... [--hide-proc] [--user UID:GID] -- ARGV...`.
/// Returns what to run, or a message saying what is wrong.
pub fn parse_args(args: &[String]) -> Result<ShimArgs, String> {
    const USAGE: &str = "usage: drover __shim --status-file FILE [--cgroup FILE]... [--hide-proc] [--user UID:GID] -- PROGRAM [ARGS...]";
    let [flag, file, rest @ ..] = args else {
        return Err(USAGE.to_string());
    };
    if flag != "--status-file" {
        return Err(USAGE.to_string());
    }
    let mut confinement = Confinement::default();
    let mut rest = rest;
    loop {
        match rest {
            [sep, argv @ ..] if sep == "--" => {
                if argv.is_empty() {
                    return Err(format!("no program given; {USAGE}"));
                }
                return Ok(ShimArgs {
                    status_file: PathBuf::from(file),
                    argv: argv.to_vec(),
                    confinement,
                });
            }
            _ => match confinement.parse_shim_option(rest)? {
                Some(taken) => rest = &rest[taken..],
                None => return Err(USAGE.to_string()),
            },
        }
    }
}

/// Runs the program to completion as the task shim, records how it ended in the status
/// file, and returns the exit code the shim itself should exit with (128 + the signal
/// number when the program was killed by a signal, like a shell).
///
/// The shim joins the task's cgroups itself, so that killing them ends it too; the
/// program alone gets the rest of the confinement (its own `/proc`, its user), while the
/// shim keeps the privileges it needs to write the status file where the task cannot
/// forge it.
///
/// This changes the signal dispositions of the calling process, so it must only be
/// called from a process that exists to be the shim.
pub fn run_shim(shim: &ShimArgs) -> i32 {
    let status_file = shim.status_file.as_path();
    for sig in SHIELDED_SIGNALS {
        // SAFETY: installing SIG_IGN involves no handler code, so nothing can run
        // concurrently with anything; the shim is single-threaded here anyway.
        unsafe {
            libc::signal(sig, libc::SIG_IGN);
        }
    }
    // SAFETY: the shim is a process of its own that exists to run this task, and joining
    // cgroups makes only system calls.
    if let Err(e) = unsafe { shim.confinement.cgroups_only().enter() } {
        return spawn_failed(status_file, format!("cannot join the task's cgroup: {e}"));
    }

    let Some((program, args)) = shim.argv.split_first() else {
        return spawn_failed(status_file, "no program given".to_string());
    };
    let mut cmd = std::process::Command::new(program);
    cmd.args(args);
    let confinement = shim.confinement.without_cgroups();
    // SAFETY: the closure only calls `signal` and the confinement's system calls, all
    // async-signal-safe, so it is fine to run between fork and exec. Ignored
    // dispositions survive exec, so without the reset the program could not be stopped
    // with SIGTERM.
    unsafe {
        cmd.pre_exec(move || {
            for sig in SHIELDED_SIGNALS {
                if libc::signal(sig, libc::SIG_DFL) == libc::SIG_ERR {
                    return Err(io::Error::last_os_error());
                }
            }
            confinement.enter()
        });
    }
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => return spawn_failed(status_file, format!("cannot run {program:?}: {e}")),
    };
    // `Child::wait` retries on EINTR itself, so an error here means the child is not
    // ours to wait for, which cannot happen for a child we just spawned; it is still
    // recorded rather than unwrapped so that the agent gets a reason.
    let (record, code) = match child.wait() {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => (
                StatusRecord {
                    code: Some(code),
                    ..StatusRecord::default()
                },
                code,
            ),
            (None, Some(signo)) => (
                StatusRecord {
                    signal: Some(signal_name(signo)),
                    ..StatusRecord::default()
                },
                128 + signo,
            ),
            (None, None) => (
                StatusRecord {
                    error: Some(format!(
                        "the program ended with an unrecognised status {status:?}"
                    )),
                    ..StatusRecord::default()
                },
                1,
            ),
        },
        Err(e) => (
            StatusRecord {
                error: Some(format!("waiting for the program failed: {e}")),
                ..StatusRecord::default()
            },
            1,
        ),
    };
    if let Err(e) = write_record(status_file, &record) {
        eprintln!("drover shim: cannot write {}: {e}", status_file.display());
    }
    code
}

/// Records a failure to start the program and returns the shim's exit code for it.
fn spawn_failed(status_file: &Path, message: String) -> i32 {
    eprintln!("drover shim: {message}");
    let record = StatusRecord {
        code: Some(SPAWN_FAILED_CODE),
        signal: None,
        error: Some(message),
    };
    if let Err(e) = write_record(status_file, &record) {
        eprintln!("drover shim: cannot write {}: {e}", status_file.display());
    }
    SPAWN_FAILED_CODE
}

/// Writes `status` to `path` atomically, in the format [`read_status`] reads.
pub fn write_status(path: &Path, status: &ExitStatus) -> io::Result<()> {
    let record = match status {
        ExitStatus::Exited(code) => StatusRecord {
            code: Some(*code),
            ..StatusRecord::default()
        },
        ExitStatus::Signaled(name) => StatusRecord {
            signal: Some(name.clone()),
            ..StatusRecord::default()
        },
        // The shim sees a memory kill only as SIGKILL; this arm exists for completeness.
        ExitStatus::OutOfMemory(code) => StatusRecord {
            code: *code,
            signal: code.is_none().then(|| "SIGKILL".to_string()),
            ..StatusRecord::default()
        },
        ExitStatus::Unknown(why) => StatusRecord {
            error: Some(why.clone()),
            ..StatusRecord::default()
        },
    };
    write_record(path, &record)
}

fn write_record(path: &Path, record: &StatusRecord) -> io::Result<()> {
    let json = serde_json::to_vec(record).map_err(io::Error::other)?;
    write_record_file(path, &json)
}

/// Writes a small record to a new file with one `write`. Each record file is written
/// once per task, and its readers treat a short or malformed file as missing, so the
/// temporary file and rename of an atomic replace would buy nothing here; skipping them
/// saves two of the handful of inode operations every task start costs, which on ext4
/// are what a burst of short tasks spends much of its time on.
///
/// A symbolic link at `path` is refused rather than followed: the shim and the agent
/// write these files with privileges the task (which may share the directory as an
/// unprivileged user) does not have, and must never write through a link it planted.
pub(crate) fn write_record_file(path: &Path, contents: &[u8]) -> io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    f.write_all(contents)
}

/// Reads a status file written by the shim. `None` when it is missing or unreadable, so
/// that the caller falls back to what it knows itself.
pub fn read_status(path: &Path) -> Option<ExitStatus> {
    let bytes = std::fs::read(path).ok()?;
    let record: StatusRecord = serde_json::from_slice(&bytes).ok()?;
    match (record.code, record.signal, record.error) {
        (Some(code), _, _) => Some(ExitStatus::Exited(code)),
        (None, Some(signal), _) => Some(ExitStatus::Signaled(signal)),
        (None, None, Some(why)) => Some(ExitStatus::Unknown(why)),
        (None, None, None) => None,
    }
}

/// The conventional name of a signal number, like `SIGTERM`; unnamed ones (real-time
/// signals) are written `signal N`.
pub fn signal_name(signo: i32) -> String {
    match nix::sys::signal::Signal::try_from(signo) {
        Ok(sig) => sig.as_str().to_string(),
        Err(_) => format!("signal {signo}"),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The name of the test below, which acts as the shim when the test binary is run
    /// with [`SUBCOMMAND`] among its arguments (see [`shim_wrapper`]).
    const ENTRY_TEST: &str = "shim::tests::shim_entry_point";

    /// Not a test of its own: when the test binary is started by [`shim_wrapper`], this
    /// runs the shim and exits with its code, so that the shim can be tested end to end in
    /// a process of its own (it changes signal dispositions, which must not happen in the
    /// process running the other tests). Run normally, it does nothing.
    #[test]
    fn shim_entry_point() {
        let args: Vec<String> = std::env::args().collect();
        let Some(pos) = args.iter().position(|a| a == SUBCOMMAND) else {
            return;
        };
        let code = match parse_args(&args[pos + 1..]) {
            Ok(shim) => run_shim(&shim),
            Err(e) => {
                eprintln!("{e}");
                2
            }
        };
        std::process::exit(code);
    }

    /// Writes a script into `dir` that runs this test binary as the shim with the
    /// arguments it is given, for use as `ProcessConfig::shim`. The test harness treats
    /// everything after `--` as name filters, and with `--exact` only the entry test
    /// matches.
    pub(crate) fn shim_wrapper(dir: &Path) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let exe = std::env::current_exe().expect("the test binary has a path");
        let script = format!(
            "#!/bin/sh\nexec '{}' --exact {ENTRY_TEST} --nocapture --test-threads=1 --quiet -- \"$@\"\n",
            exe.display()
        );
        let path = dir.join("shim.sh");
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn run_wrapped(dir: &Path, argv: &[&str]) -> (std::process::ExitStatus, PathBuf) {
        let wrapper = shim_wrapper(dir);
        let status_file = dir.join("exit-status");
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        let status = std::process::Command::new(&wrapper)
            .args(command_args(&status_file, &Confinement::default(), &argv))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        (status, status_file)
    }

    #[test]
    fn statuses_round_trip_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exit-status");
        for status in [
            ExitStatus::Exited(0),
            ExitStatus::Exited(3),
            ExitStatus::Signaled("SIGTERM".into()),
            ExitStatus::Unknown("why".into()),
        ] {
            write_status(&path, &status).unwrap();
            assert_eq!(read_status(&path), Some(status));
        }
        assert!(!dir.path().join("exit-status.tmp").exists());
    }

    #[test]
    fn the_documented_format_is_what_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let cases = [
            (r#"{"code":3}"#, Some(ExitStatus::Exited(3))),
            (
                r#"{"signal":"SIGKILL"}"#,
                Some(ExitStatus::Signaled("SIGKILL".into())),
            ),
            (
                r#"{"code":127,"error":"nope","later":1}"#,
                Some(ExitStatus::Exited(127)),
            ),
            (r#"{}"#, None),
            ("{\"code\":", None),
        ];
        for (text, want) in cases {
            std::fs::write(&path, text).unwrap();
            assert_eq!(read_status(&path), want, "{text}");
        }
        assert_eq!(read_status(&dir.path().join("missing")), None);
        write_status(&path, &ExitStatus::Exited(3)).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), r#"{"code":3}"#);
    }

    #[test]
    fn arguments_round_trip() {
        let argv = vec!["sh".to_string(), "-c".to_string(), "--".to_string()];
        let confinement = Confinement::new(
            &[PathBuf::from("/sys/fs/cgroup/t/cgroup.procs")],
            true,
            Some(crate::sandbox::TaskUser::private(200_001)),
        )
        .unwrap();
        let args: Vec<String> = command_args(Path::new("/t/exit-status"), &confinement, &argv)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(args[0], SUBCOMMAND);
        let parsed = parse_args(&args[1..]).unwrap();
        assert_eq!(parsed.status_file, Path::new("/t/exit-status"));
        assert_eq!(parsed.argv, argv);
        assert_eq!(parsed.confinement.shim_args(), confinement.shim_args());
        assert!(
            parse_args(&[
                "--status-file".into(),
                "f".into(),
                "--user".into(),
                "x".into(),
                "--".into(),
                "true".into()
            ])
            .is_err()
        );
        assert!(parse_args(&["--status-file".into(), "f".into(), "--".into()]).is_err());
        assert!(parse_args(&["x".into()]).is_err());
    }

    #[test]
    fn signal_names_are_conventional() {
        assert_eq!(signal_name(libc::SIGTERM), "SIGTERM");
        assert_eq!(signal_name(libc::SIGKILL), "SIGKILL");
        assert_eq!(signal_name(1000), "signal 1000");
    }

    #[test]
    fn the_shim_records_the_exit_code() {
        let dir = tempfile::tempdir().unwrap();
        let (status, file) = run_wrapped(dir.path(), &["sh", "-c", "exit 3"]);
        assert_eq!(status.code(), Some(3));
        assert_eq!(read_status(&file), Some(ExitStatus::Exited(3)));
    }

    #[test]
    fn the_shim_records_a_signal_and_the_program_gets_sigterm_despite_the_shim() {
        let dir = tempfile::tempdir().unwrap();
        // The program signals itself: if the shim's ignored disposition leaked into it,
        // it would survive and exit 0 instead.
        let (status, file) = run_wrapped(dir.path(), &["sh", "-c", "kill -TERM $$; exit 0"]);
        assert_eq!(status.code(), Some(128 + libc::SIGTERM));
        assert_eq!(
            read_status(&file),
            Some(ExitStatus::Signaled("SIGTERM".into()))
        );
    }

    #[test]
    fn the_shim_records_a_program_that_cannot_start() {
        let dir = tempfile::tempdir().unwrap();
        let (status, file) = run_wrapped(dir.path(), &["drover-no-such-program"]);
        assert_eq!(status.code(), Some(SPAWN_FAILED_CODE));
        assert_eq!(
            read_status(&file),
            Some(ExitStatus::Exited(SPAWN_FAILED_CODE))
        );
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.contains("drover-no-such-program"), "{text}");
    }
}
