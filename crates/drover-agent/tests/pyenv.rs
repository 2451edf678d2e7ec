//! The per-node cache of Python virtual environments, against the node's real `python3`
//! and pip installing from the package index: isolation of two versions of one package,
//! reuse, single flight, remembered failures, timeouts that leave nothing running,
//! eviction, pruning and reopening.
//!
//! `six` is used throughout because it is one small pure-Python file.

use drover_agent::pyenv::{COMPLETE_MARKER, EnvError, EnvLease, PythonEnvConfig, PythonEnvs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Generous: a build creates a venv (with pip) and downloads from the index.
const BUILD: Duration = Duration::from_secs(300);

fn reqs(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn open(dir: &Path, tweak: impl FnOnce(&mut PythonEnvConfig)) -> Arc<PythonEnvs> {
    let mut cfg = PythonEnvConfig::new(dir.to_path_buf());
    tweak(&mut cfg);
    PythonEnvs::new(cfg).expect("opening the env cache")
}

async fn ensure(envs: &Arc<PythonEnvs>, list: &[&str], log: &Path) -> EnvLease {
    match envs.ensure(&reqs(list), log, BUILD).await {
        Ok(lease) => lease,
        Err(e) => panic!(
            "ensure {list:?}: {e}\nlog:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        ),
    }
}

/// Runs the environment's own interpreter with a snippet and returns what it printed.
async fn run_python(root: &Path, code: &str) -> String {
    let out = tokio::process::Command::new(root.join("bin/python"))
        .args(["-c", code])
        .env_clear()
        .output()
        .await
        .expect("running the env's python");
    assert!(
        out.status.success(),
        "python -c {code:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Live (not zombie) processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("reading /proc").flatten() {
        let path = entry.path();
        let Ok(cmdline) = std::fs::read(path.join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let stat = std::fs::read_to_string(path.join("stat")).unwrap_or_default();
        let zombie = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|s| s == "Z" || s == "X");
        if cmdline.contains(needle) && !zombie {
            found.push(format!("{}: {cmdline}", path.display()));
        }
    }
    found
}

fn log_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_versions_of_one_package_are_isolated_and_reused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("envs");
    let envs = open(&dir, |_| {});
    let log = tmp.path().join("preparing.log");

    // Two different environments build side by side.
    let log_new = tmp.path().join("new.log");
    let (old, new) = tokio::join!(
        ensure(&envs, &["six==1.15.0"], &log),
        ensure(&envs, &["  six==1.16.0  "], &log_new)
    );
    assert_eq!(envs.builds(), 2);
    assert_ne!(old.key(), new.key());
    assert_eq!(old.root(), dir.join(old.key()));
    assert_eq!(new.root(), dir.join(new.key()));
    let code = "import six; print(six.__version__)";
    assert_eq!(run_python(old.root(), code).await, "1.15.0");
    assert_eq!(run_python(new.root(), code).await, "1.16.0");
    // The package comes from the environment itself, which does not see the system's
    // site-packages.
    let file = run_python(new.root(), "import six; print(six.__file__)").await;
    assert!(
        Path::new(&file).starts_with(new.root()),
        "six imported from {file}, outside {}",
        new.root().display()
    );
    let isolated = run_python(
        old.root(),
        "import sys, site; print(sys.prefix != sys.base_prefix, any(p.startswith(sys.base_prefix) for p in site.getsitepackages()))",
    )
    .await;
    assert_eq!(isolated, "True False");
    let cfg = std::fs::read_to_string(old.root().join("pyvenv.cfg")).unwrap();
    assert!(
        cfg.contains("include-system-site-packages = false"),
        "pyvenv.cfg:\n{cfg}"
    );
    // Each build's output went to the log of the task that asked for it.
    let text = log_of(&log);
    assert!(text.contains("-m venv"), "log:\n{text}");
    assert!(
        text.contains("Successfully installed six-1.15.0"),
        "log:\n{text}"
    );
    let text = log_of(&log_new);
    assert!(
        text.contains("Successfully installed six-1.16.0"),
        "log:\n{text}"
    );
    assert!(!text.contains("six-1.15.0"), "log:\n{text}");

    // The same requirements again: the same environment, and no build.
    let again = ensure(&envs, &["six==1.15.0"], &log).await;
    assert_eq!(again.key(), old.key());
    assert_eq!(again.root(), old.root());
    assert_eq!(envs.builds(), 2);
    assert!(log_of(&log).contains(&format!(
        "using the cached Python environment {}",
        old.key()
    )));

    let listed = envs.list();
    assert_eq!(listed.len(), 2);
    let info = listed.iter().find(|i| i.key == old.key()).unwrap();
    assert_eq!(info.requirements, reqs(&["six==1.15.0"]));
    assert_eq!(info.in_use, 2);
    assert!(info.size > 100_000, "a venv with pip is bigger: {info:?}");
    assert!(info.python.starts_with("3."), "{info:?}");
    let info = listed.iter().find(|i| i.key == new.key()).unwrap();
    assert_eq!(info.requirements, reqs(&["six==1.16.0"]), "kept trimmed");
    drop(again);
    let info = envs
        .list()
        .into_iter()
        .find(|i| i.key == old.key())
        .unwrap();
    assert_eq!(info.in_use, 1);

    // A task's PATH finds the environment's python first.
    let vars = old.env_vars("/usr/bin:/bin");
    let found = tokio::process::Command::new("/bin/sh")
        .args(["-c", "command -v python; echo $VIRTUAL_ENV"])
        .env_clear()
        .envs(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .await
        .unwrap();
    let found = String::from_utf8_lossy(&found.stdout).to_string();
    assert_eq!(
        found,
        format!(
            "{}\n{}\n",
            old.root().join("bin/python").display(),
            old.root().display()
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_one_build() {
    let tmp = tempfile::tempdir().unwrap();
    let envs = open(&tmp.path().join("envs"), |_| {});
    let logs: Vec<PathBuf> = (0..4)
        .map(|i| tmp.path().join(format!("task-{i}.log")))
        .collect();
    let tasks: Vec<_> = logs
        .iter()
        .map(|log| {
            let envs = envs.clone();
            let log = log.clone();
            tokio::spawn(async move { envs.ensure(&reqs(&["six==1.14.0"]), &log, BUILD).await })
        })
        .collect();
    let mut leases = Vec::new();
    for t in tasks {
        leases.push(t.await.unwrap().expect("every task gets the environment"));
    }
    assert_eq!(envs.builds(), 1, "one build for all four tasks");
    assert!(leases.iter().all(|l| l.key() == leases[0].key()));
    let listed = envs.list();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].in_use, 4);
    assert_eq!(
        run_python(leases[0].root(), "import six; print(six.__version__)").await,
        "1.14.0"
    );

    // One log shows the build as it ran; the others say they waited, and have a copy.
    let texts: Vec<String> = logs.iter().map(|l| log_of(l)).collect();
    let waited: Vec<&String> = texts
        .iter()
        .filter(|t| t.contains("waiting for a build by another task"))
        .collect();
    assert_eq!(waited.len(), 3, "logs:\n{texts:#?}");
    for t in &texts {
        assert!(t.contains("Successfully installed six-1.14.0"), "log:\n{t}");
    }
    drop(leases);
    assert_eq!(envs.list()[0].in_use, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_build_is_remembered_then_retried() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("envs");
    let memory = Duration::from_secs(3);
    let envs = open(&dir, |c| c.failure_memory = memory);
    let log = tmp.path().join("preparing.log");
    let bad = reqs(&["drover-no-such-package-zz9==1.0"]);
    let key = envs.key(&bad).await.unwrap();

    let err = envs.ensure(&bad, &log, BUILD).await.unwrap_err();
    let failed_at = Instant::now();
    let msg = err.to_string();
    assert!(matches!(err, EnvError::Failed { .. }), "{err:?}");
    assert!(msg.contains("drover-no-such-package-zz9==1.0"), "{msg}");
    assert!(
        msg.contains("No matching distribution found"),
        "pip's words: {msg}"
    );
    assert!(msg.contains(&key), "{msg}");
    assert_eq!(envs.builds(), 1);
    assert!(!dir.join(&key).exists(), "the partial env is deleted");
    assert!(envs.list().is_empty());
    assert!(log_of(&log).contains("No matching distribution found"));

    // Within the memory: the same error at once, and no pip.
    let started = Instant::now();
    let again = envs.ensure(&bad, &log, BUILD).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(matches!(again, EnvError::Remembered { .. }), "{again:?}");
    let msg = again.to_string();
    assert!(msg.contains("not built again until"), "{msg}");
    assert!(msg.contains("No matching distribution found"), "{msg}");
    assert_eq!(envs.builds(), 1);

    // Past it: built (and failing) again.
    tokio::time::sleep((failed_at + memory).saturating_duration_since(Instant::now())).await;
    let retried = envs.ensure(&bad, &log, BUILD).await.unwrap_err();
    assert!(matches!(retried, EnvError::Failed { .. }), "{retried:?}");
    assert_eq!(envs.builds(), 2);
    assert!(!dir.join(&key).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_kills_the_build_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("envs");
    let envs = open(&dir, |_| {});
    let log = tmp.path().join("preparing.log");
    let list = reqs(&["six==1.13.0"]);
    // Learns the interpreter's version, so the timeouts below are the build's own.
    let key = envs.key(&list).await.unwrap();
    let needle = dir.to_string_lossy().to_string();

    // A tiny timeout, and one long enough for venv to be installing pip in a child
    // process of its own: both must leave no process and no directory behind.
    for (i, timeout) in [Duration::from_millis(50), Duration::from_millis(1500)]
        .into_iter()
        .enumerate()
    {
        let started = Instant::now();
        let err = envs.ensure(&list, &log, timeout).await.unwrap_err();
        assert!(
            started.elapsed() < timeout + Duration::from_secs(6),
            "returned after {:?}",
            started.elapsed()
        );
        assert!(matches!(err, EnvError::Timeout { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("setup_timeout"), "{msg}");
        assert!(msg.contains("six==1.13.0"), "{msg}");
        assert!(!dir.join(&key).exists(), "no env dir is left behind");
        assert_eq!(envs.builds(), i as u64 + 1, "a timeout is not remembered");
        let left = processes_mentioning(&needle);
        assert!(left.is_empty(), "still running: {left:#?}");
    }
    // The longer timeout struck while venv was running, so its process group was
    // killed rather than never started.
    let text = log_of(&log);
    assert!(text.contains("processes were killed"), "log:\n{text}");
    assert!(envs.list().is_empty());
    assert!(log_of(&log).contains("-m venv"));

    // Another process holding the build lock: this one waits for it, up to its timeout,
    // and builds nothing.
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(format!("{key}.lock")))
        .unwrap();
    lock.lock().unwrap();
    let err = envs
        .ensure(&list, &log, Duration::from_millis(600))
        .await
        .unwrap_err();
    assert!(matches!(err, EnvError::Waited { .. }), "{err:?}");
    assert!(err.to_string().contains("another agent process"), "{err}");
    assert_eq!(envs.builds(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_pruning_and_reopening() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("envs");
    // Any environment is over this limit, so every build evicts what it can.
    let tiny = |c: &mut PythonEnvConfig| c.max_bytes = 1;
    let envs = open(&dir, tiny);
    let log = tmp.path().join("preparing.log");

    // a and b are built side by side while both are leased, so neither build may evict
    // the other.
    let log_b = tmp.path().join("b.log");
    let (a, b) = tokio::join!(
        ensure(&envs, &["six==1.15.0"], &log),
        ensure(&envs, &["six==1.16.0"], &log_b)
    );
    assert_eq!(envs.builds(), 2);
    assert_eq!(envs.list().len(), 2, "leased envs are never evicted");
    let root_a = a.root().to_path_buf();
    let (key_b, root_b) = (b.key().to_string(), b.root().to_path_buf());
    drop(a);

    // Building c evicts a, which nobody uses now; b is leased and c just built: both
    // stay.
    let c = ensure(&envs, &["six==1.14.0"], &log).await;
    let (key_c, root_c) = (c.key().to_string(), c.root().to_path_buf());
    assert!(!root_a.exists(), "the unleased env was evicted");
    assert!(root_b.exists() && root_c.exists());
    let mut keys: Vec<String> = envs.list().into_iter().map(|i| i.key).collect();
    let mut want = vec![key_b.clone(), key_c.clone()];
    keys.sort();
    want.sort();
    assert_eq!(keys, want);
    assert_eq!(
        run_python(&root_b, "import six; print(six.__version__)").await,
        "1.16.0"
    );

    // Prune removes the unleased c and keeps the leased b.
    drop(c);
    let removed = envs.prune().await;
    assert_eq!(
        removed.iter().map(|i| i.key.clone()).collect::<Vec<_>>(),
        vec![key_c.clone()]
    );
    assert_eq!(removed[0].requirements, reqs(&["six==1.14.0"]));
    assert!(!root_c.exists());
    assert!(root_b.exists());
    assert_eq!(envs.list().len(), 1);
    assert_eq!(envs.builds(), 3);
    drop(b);
    drop(envs);

    // A restarted agent finds the complete env and uses it without building.
    let reopened = open(&dir, tiny);
    let listed = reopened.list();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].key, key_b);
    assert_eq!(listed[0].requirements, reqs(&["six==1.16.0"]));
    assert!(listed[0].size > 0);
    let b = ensure(&reopened, &["six==1.16.0"], &log).await;
    assert_eq!(b.key(), key_b);
    assert_eq!(reopened.builds(), 0);
    assert_eq!(
        run_python(b.root(), "import six; print(six.__version__)").await,
        "1.16.0"
    );
    drop(b);
    drop(reopened);

    // An env whose build never wrote its marker is incomplete, and deleted on opening.
    std::fs::remove_file(root_b.join(COMPLETE_MARKER)).unwrap();
    let reopened = open(&dir, tiny);
    assert!(reopened.list().is_empty());
    assert!(!root_b.exists());
    // Nothing is left but lock files.
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        assert!(name.ends_with(".lock"), "left over: {name}");
    }
}

#[tokio::test]
async fn invalid_requirements_are_refused_without_running_anything() {
    let tmp = tempfile::tempdir().unwrap();
    // An interpreter that does not exist: had anything been run, the error would say
    // so instead of naming the requirement.
    let envs = open(&tmp.path().join("envs"), |c| {
        c.python = PathBuf::from("/nonexistent/python3")
    });
    let log = tmp.path().join("preparing.log");
    for (list, index, bad) in [
        (vec!["six==1.16.0", ""], 1, "\"\""),
        (
            vec!["--index-url=http://x", "six"],
            0,
            "--index-url=http://x",
        ),
        (vec!["a\nb"], 0, "a\\nb"),
        (vec!["six", "-e ."], 1, "-e ."),
        (
            vec!["six @ https://example.invalid/${PIP_INDEX_URL}"],
            0,
            "${PIP_INDEX_URL}",
        ),
    ] {
        let err = envs
            .ensure(&reqs(&list), &log, Duration::from_secs(5))
            .await
            .unwrap_err();
        match &err {
            EnvError::InvalidRequirement { index: i, .. } => assert_eq!(*i, index, "{err}"),
            other => panic!("{list:?}: expected InvalidRequirement, got {other:?}"),
        }
        let msg = err.to_string();
        assert!(msg.contains(&format!("requirements[{index}]")), "{msg}");
        assert!(msg.contains(bad), "{msg} should name {bad}");
    }
    assert_eq!(envs.builds(), 0);
    assert!(!log.exists(), "nothing was logged, since nothing ran");

    // Valid requirements do reach the interpreter, which is missing.
    let err = envs
        .ensure(&reqs(&["six==1.16.0"]), &log, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(matches!(err, EnvError::Interpreter { .. }), "{err:?}");
    assert!(err.to_string().contains("/nonexistent/python3"), "{err}");
    assert_eq!(envs.builds(), 0);
}
