//! Per-node Python virtual environments for `runtime_env.python.requirements`.
//!
//! An environment is keyed by a hash of the node interpreter's `sys.version` and the
//! requirements as given, so two jobs pinning different versions of one package get two
//! environments, and every job with the same list shares one. It is built once per node,
//! in place at `<dir>/<key>` (a virtual environment is not relocatable, so it cannot be
//! built elsewhere and renamed), with `python -m venv` and the environment's own pip.
//!
//! A build writes `.drover-env.json` (what the environment holds) and then the marker
//! [`COMPLETE_MARKER`], last: a directory without the marker is a build cut short, which
//! is deleted and built again. Builds of one key are single-flight within the process
//! (callers wait for the build in progress) and across processes sharing the directory
//! (an advisory lock on `<dir>/<key>.lock` is held while building).
//!
//! A failed build is remembered for a while, so a broken requirement does not run pip
//! again for every task that asks for it. [`EnvLease`]s pin an environment: after each
//! build, unleased environments are evicted, least recently used first, until the
//! complete ones fit the size limit.
//!
//! Leases are counted within one process only: two agent processes sharing a directory
//! never build an environment at the same time, but one may evict an environment the
//! other is using.
//!
//! The bookkeeping (single flight within the process, leases, eviction, remembered
//! failures, reopening) is the agent's generic cache (`cache.rs`); this module says how
//! an environment is built, where it lives, how it goes and how a complete one is told
//! from a partial one.

use crate::cache::{self, Built, Cache, Entry, Eviction, Found, Joined, Kind, Policy, Report};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::fmt;
use std::io::{self, Write as _};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The file a build writes last; an environment directory without it is incomplete.
pub const COMPLETE_MARKER: &str = ".drover-complete";

/// What an environment holds, written before the marker.
pub const METADATA_FILE: &str = ".drover-env.json";

/// The requirements file handed to pip, kept in the environment for reference.
const REQUIREMENTS_FILE: &str = ".drover-requirements.txt";

/// Directories being deleted are first renamed to a name with this prefix, so a new
/// build of the same key never meets a half-deleted directory.
const TRASH_PREFIX: &str = ".trash-";

/// The number of hex digits in a key: the first 16 bytes of a sha256.
const KEY_HEX_LEN: usize = 32;

/// The version of the metadata file's layout.
const METADATA_FORMAT: u32 = 1;

/// How many lines of a failed step's output go into its error.
const TAIL_LINES: usize = 20;

/// Longer lines are cut in an error, so one runaway line cannot swamp the message.
const TAIL_LINE_CHARS: usize = 400;

/// How much of a failed step's output is kept to find its last lines in.
const STEP_CAPTURE_BYTES: usize = 64 * 1024;

/// How many times pip is bootstrapped into a new environment before the build fails.
const ENSUREPIP_ATTEMPTS: u32 = 2;

/// How much of a build's output is kept to copy into the logs of the tasks that waited
/// for it; the end of the output is kept, since that is where pip explains a failure.
const SHARED_CAPTURE_BYTES: usize = 256 * 1024;

/// The longest the interpreter may take to print its version.
const VERSION_TIMEOUT: Duration = Duration::from_secs(30);

/// How often a lock held by another process is tried again.
const LOCK_POLL: Duration = Duration::from_millis(100);

/// How long a killed build's processes may take to disappear before the partial
/// environment is deleted anyway.
const GROUP_EXIT_WAIT: Duration = Duration::from_secs(5);

/// How long output is still read after a step's process exits. A grandchild that
/// inherited the pipes could otherwise hold the build open indefinitely.
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

/// How long past its deadline the caller that started a build waits for the build to
/// report: killing the build's processes and deleting its partial environment.
const CLEANUP_GRACE: Duration = Duration::from_secs(60);

/// Variables of the agent's environment that builds see. Builds run code chosen by a
/// job's author (a package's build backend), so they get only what pip, compilers and
/// the interpreter need, plus the operator's `PIP_*` settings, and never the agent's
/// other variables.
const PASSED_VARIABLES: &[&str] = &[
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TMPDIR",
    "TZ",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "all_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "CC",
    "CXX",
    "CFLAGS",
    "CXXFLAGS",
    "CPPFLAGS",
    "LDFLAGS",
    "PKG_CONFIG_PATH",
];

/// Prefixes of passed variables: pip's own settings, and pyenv's, whose shims need them
/// to find the interpreter the operator chose.
const PASSED_PREFIXES: &[&str] = &["PIP_", "PYENV_"];

/// pip settings that would install somewhere other than the environment being built.
const REFUSED_PIP_VARIABLES: &[&str] = &["PIP_USER", "PIP_TARGET", "PIP_PREFIX", "PIP_ROOT"];

#[derive(Clone, Debug)]
pub struct PythonEnvConfig {
    /// Where environments live, e.g. `<agent data>/envs/python`; created when missing.
    pub dir: PathBuf,
    /// The node's interpreter: a path, or a bare name looked up in the agent's `PATH`.
    pub python: PathBuf,
    /// Unleased environments are evicted, least recently used first, after a build that
    /// takes the complete ones past this many bytes.
    pub max_bytes: u64,
    /// How long a failed build is remembered: within it, asking for the same
    /// environment fails at once with the same error.
    pub failure_memory: Duration,
}

impl PythonEnvConfig {
    /// A config with `python3` from `PATH`, a 5 GiB limit and failures remembered for a
    /// minute.
    pub fn new(dir: PathBuf) -> Self {
        PythonEnvConfig {
            dir,
            python: PathBuf::from("python3"),
            max_bytes: 5 << 30,
            failure_memory: Duration::from_secs(60),
        }
    }
}

/// Why an environment could not be had. Every message names the requirements (or the
/// offending entry) and says what to do. It is `Clone` because one build's failure is
/// reported to every task that waited for it, and remembered.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EnvError {
    #[error(
        "requirements[{index}] = {requirement:?} is not accepted: {why}. Give one pip requirement specifier per entry, such as \"six==1.16.0\"."
    )]
    InvalidRequirement {
        index: usize,
        requirement: String,
        why: String,
    },
    #[error(
        "the node's Python interpreter {python:?} could not be used: {why}. Install Python 3 with its venv module on this node, or point the agent at a working interpreter."
    )]
    Interpreter { python: PathBuf, why: String },
    #[error(
        "building the Python environment {key} for {requirements:?} did not finish within the setup_timeout of {}: {doing} was stopped and the partial environment removed. Raise runtime_env.setup_timeout, or pin requirements that have wheels for this node so nothing is compiled.",
        humanize(*timeout)
    )]
    Timeout {
        key: String,
        requirements: Vec<String>,
        timeout: Duration,
        doing: String,
    },
    #[error(
        "the Python environment {key} for {requirements:?} was not ready within the setup_timeout of {}: {doing}. Raise runtime_env.setup_timeout, or try again once that build has finished.",
        humanize(*timeout)
    )]
    Waited {
        key: String,
        requirements: Vec<String>,
        timeout: Duration,
        doing: String,
    },
    #[error(
        "building the Python environment {key} for {requirements:?} failed: {step}. Its last lines were:\n{tail}\n{advice}"
    )]
    Failed {
        key: String,
        requirements: Vec<String>,
        /// What failed and how, e.g. "installing the requirements with pip exited with
        /// status 1".
        step: String,
        tail: String,
        /// What to do about it, which depends on the step that failed.
        advice: String,
    },
    #[error(
        "the Python environment {key} for {requirements:?} failed to build {} ago and is not built again until {} from now, so a broken requirement does not rerun pip for every task; change the requirements, or wait and retry. The failure was: {error}",
        humanize(*ago),
        humanize(*retry_in)
    )]
    Remembered {
        key: String,
        requirements: Vec<String>,
        ago: Duration,
        retry_in: Duration,
        error: Box<EnvError>,
    },
    #[error(
        "the Python environment {key} for {requirements:?} could not be prepared: {what}: {source}. Check the agent's Python environment directory and the space left on its disk."
    )]
    Io {
        key: String,
        requirements: Vec<String>,
        what: String,
        source: Arc<io::Error>,
    },
    #[error(
        "the build of the Python environment {key} for {requirements:?} stopped before it reported; this is a bug in the agent, and asking again starts a new build."
    )]
    Abandoned {
        key: String,
        requirements: Vec<String>,
    },
}

/// One environment as [`PythonEnvs::list`] and [`PythonEnvs::prune`] report it.
pub use drover_core::state::EnvInfo;

/// The metadata file of a complete environment.
#[derive(Debug, Serialize, Deserialize)]
struct Metadata {
    format: u32,
    key: String,
    requirements: Vec<String>,
    /// The interpreter's full `sys.version`.
    python_version: String,
    size: u64,
    created_ms: u64,
}

/// What the cache keeps about a complete environment besides its size and use.
struct EnvMeta {
    requirements: Vec<String>,
    /// The interpreter's version number, e.g. `3.11.7`.
    python: String,
}

impl EnvMeta {
    fn of(meta: Metadata) -> EnvMeta {
        EnvMeta {
            python: short_version(&meta.python_version),
            requirements: meta.requirements,
        }
    }
}

fn info(key: &str, env: &Entry<EnvMeta>) -> EnvInfo {
    EnvInfo {
        key: key.to_string(),
        requirements: env.meta.requirements.clone(),
        python: env.meta.python.clone(),
        size: env.size,
        last_used_ms: unix_ms(env.last_used),
        in_use: env.leases,
    }
}

pub struct PythonEnvs {
    cache: Arc<Cache<Envs>>,
    /// The interpreter's `sys.version`, asked once per process; a failure is not kept,
    /// so a node whose interpreter is installed later needs no agent restart.
    version: tokio::sync::OnceCell<String>,
}

/// The environments on disk, as the generic cache sees them: how one is built, found
/// and removed.
struct Envs {
    cfg: PythonEnvConfig,
    builds: AtomicU64,
    /// Makes the names of directories being deleted unique.
    trash: AtomicU64,
}

impl PythonEnvs {
    /// Opens the cache in `cfg.dir`: creates the directory, deletes environments a crash
    /// left incomplete and leftovers of deletions, and adopts the complete environments,
    /// least recently used first by the time their marker was last touched. An
    /// incomplete environment that another process is building (its lock is held) is
    /// left to that process.
    pub fn new(cfg: PythonEnvConfig) -> io::Result<Arc<PythonEnvs>> {
        // An environment costs a pip run to make again, so one past the limit is kept
        // until a build needs the room; a task that used one until now makes it recent.
        let policy = Policy {
            limit: cfg.max_bytes,
            eviction: Eviction::AfterBuild,
            release_is_use: true,
        };
        let envs = Envs {
            cfg,
            builds: AtomicU64::new(0),
            trash: AtomicU64::new(0),
        };
        Ok(Arc::new(PythonEnvs {
            cache: Cache::open(envs, policy)?,
            version: tokio::sync::OnceCell::new(),
        }))
    }

    fn cfg(&self) -> &PythonEnvConfig {
        &self.cache.kind().cfg
    }

    /// The key these requirements have on this node, without building anything.
    pub async fn key(&self, requirements: &[String]) -> Result<String, EnvError> {
        let reqs = validate(requirements)?;
        let version = self.python_version().await?;
        Ok(env_key(&version, &reqs))
    }

    /// Returns a lease on a ready environment for exactly these requirements, building
    /// it if needed. Build output (venv creation and pip) is appended to `log`, created
    /// when missing. Concurrent calls for one environment share one build; a caller
    /// that waited gets a note and a copy of the build's output in its own log.
    ///
    /// The build runs in its own tokio task, bounded by the `timeout` of the call that
    /// started it: a caller that gives up does not stop it for the others.
    pub async fn ensure(
        &self,
        requirements: &[String],
        log: &Path,
        timeout: Duration,
    ) -> Result<EnvLease, EnvError> {
        let deadline = Instant::now() + timeout;
        let reqs = validate(requirements)?;
        let version = match tokio::time::timeout_at(deadline, self.python_version()).await {
            Ok(v) => v?,
            Err(_) => {
                return Err(EnvError::Interpreter {
                    python: self.cfg().python.clone(),
                    why: format!(
                        "it did not print its version within the setup_timeout of {}",
                        humanize(timeout)
                    ),
                });
            }
        };
        let key = env_key(&version, &reqs);
        let mut log = LogFile::new(log);
        loop {
            let build = Build {
                requirements: reqs.clone(),
                version: version.clone(),
                log: log.path.clone(),
                deadline,
                timeout,
            };
            let waiting = match self.cache.join(&key, build) {
                Joined::Ready(lease) => {
                    touch_marker(lease.path());
                    log.line(&format!(
                        "using the cached Python environment {key} for {reqs:?}"
                    ))
                    .await;
                    return Ok(EnvLease(lease));
                }
                Joined::Remembered(r) => {
                    let err = EnvError::Remembered {
                        key,
                        requirements: reqs,
                        ago: r.ago,
                        retry_in: r.retry_in,
                        error: Box::new(r.error),
                    };
                    log.line(&err.to_string()).await;
                    return Err(err);
                }
                Joined::Waiting(waiting) => waiting,
            };
            // The caller whose call started the build; the build writes to its log.
            let builder = waiting.started();
            if !builder {
                log.line(&format!(
                    "waiting for a build by another task of the Python environment {key} for {reqs:?}"
                ))
                .await;
            }
            // The build enforces the deadline of the call that started it, then kills
            // and deletes what it started, which takes a moment more; that call waits
            // for its report rather than leave before the cleanup is done.
            let wait_until = if builder {
                deadline + CLEANUP_GRACE
            } else {
                deadline
            };
            let (result, output) =
                match tokio::time::timeout_at(wait_until, waiting.outcome()).await {
                    Ok(Some(outcome)) => outcome,
                    Ok(None) => {
                        return Err(EnvError::Abandoned {
                            key,
                            requirements: reqs,
                        });
                    }
                    Err(_) => {
                        let err = EnvError::Waited {
                            key: key.clone(),
                            requirements: reqs.clone(),
                            timeout,
                            doing: if builder {
                                "its build is still cleaning up after the timeout".into()
                            } else {
                                "another task's build of it is still running and goes on".into()
                            },
                        };
                        log.line(&err.to_string()).await;
                        return Err(err);
                    }
                };
            if !builder {
                log.line("the build by another task ended; its output was:")
                    .await;
                log.write(&output).await;
            }
            match result {
                // The build was bounded by the timeout of the task that started it; this
                // caller may allow longer, and tries again with its own.
                Err(EnvError::Timeout { .. } | EnvError::Waited { .. })
                    if !builder && Instant::now() < deadline =>
                {
                    continue;
                }
                Ok(lease) => {
                    if !builder {
                        log.line(&format!("using the Python environment {key}"))
                            .await;
                    }
                    return Ok(EnvLease(lease));
                }
                Err(e) => {
                    if !builder {
                        log.line(&e.to_string()).await;
                    }
                    return Err(e);
                }
            }
        }
    }

    /// A lease on the environment for these requirements when it is already on this
    /// node; `None` when it is not (it is never built here). A restarted agent uses it
    /// for a task it adopts, so the environment the task runs in cannot be pruned or
    /// evicted under it.
    pub async fn lease_cached(
        &self,
        requirements: &[String],
    ) -> Result<Option<EnvLease>, EnvError> {
        let key = self.key(requirements).await?;
        Ok(self.cache.lease_existing(&key).map(EnvLease))
    }

    /// The complete environments, by key.
    pub fn list(&self) -> Vec<EnvInfo> {
        let mut out = self.cache.list(|k, e| info(k, e));
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }

    /// Removes every environment without a lease and returns what it removed.
    pub async fn prune(&self) -> Vec<EnvInfo> {
        let mut removed: Vec<EnvInfo> = self
            .cache
            .prune()
            .await
            .iter()
            .map(|(k, e)| info(k, e))
            .collect();
        removed.sort_by(|a, b| a.key.cmp(&b.key));
        removed
    }

    /// How many builds this process started; a cached environment, a shared build or a
    /// remembered failure starts none.
    pub fn builds(&self) -> u64 {
        self.cache.kind().builds.load(Ordering::Relaxed)
    }

    /// The interpreter's `sys.version`, asked once per process.
    async fn python_version(&self) -> Result<String, EnvError> {
        self.version
            .get_or_try_init(|| query_version(&self.cfg().python))
            .await
            .cloned()
    }
}

impl Kind for Envs {
    const NAME: &'static str = "python envs";
    type Key = String;
    type Meta = EnvMeta;
    type Request = Build;
    type Error = EnvError;
    /// The end of the build's output, for the logs of the callers other than the one
    /// whose log the build wrote to.
    type Note = Arc<Vec<u8>>;

    fn path(&self, key: &String) -> PathBuf {
        self.cfg.dir.join(key)
    }

    fn scan(&self) -> io::Result<Vec<Found<Envs>>> {
        let dir = &self.cfg.dir;
        std::fs::create_dir_all(dir)?;
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let path = entry.path();
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if name.starts_with(TRASH_PREFIX) {
                remove_tree(&path);
                continue;
            }
            if !is_key(&name) || !entry.file_type()?.is_dir() {
                // Lock files and anything the operator put here are left alone.
                continue;
            }
            match load_complete(&path, &name) {
                Some((meta, used)) => found.push(Found {
                    key: name,
                    size: meta.size,
                    meta: EnvMeta::of(meta),
                    last_used: UNIX_EPOCH + Duration::from_millis(used),
                }),
                None => match try_lock_file(dir, &name) {
                    Ok(Some(_lock)) => {
                        tracing::info!(
                            "python envs: removing {}, which a build left incomplete",
                            path.display()
                        );
                        remove_tree(&path);
                    }
                    Ok(None) => tracing::info!(
                        "python envs: leaving {} to the process that is building it",
                        path.display()
                    ),
                    Err(e) => tracing::warn!("python envs: locking {name}: {e}"),
                },
            }
        }
        Ok(found)
    }

    async fn build(&self, key: &String, b: Build) -> Report<Envs> {
        let mut out = Output::new(&b.log);
        let result = self.build_env(key, &b, &mut out).await;
        if let Err(e) = &result {
            out.line(&e.to_string()).await;
        }
        (result, Arc::new(out.tail.buf))
    }

    /// Only a build that ran and failed is remembered, so a broken requirement does not
    /// run pip again for every task that asks for it; a timeout or an I/O error says
    /// nothing about the requirements.
    fn remember(&self, error: &EnvError) -> Option<Duration> {
        matches!(error, EnvError::Failed { .. }).then_some(self.cfg.failure_memory)
    }

    /// Moves an environment's directory out of the way, to be deleted outside the
    /// cache's lock. The rename is atomic, so a new build of the same key starts from
    /// nothing even while the old files are still being deleted.
    fn remove(&self, key: &String) -> Option<PathBuf> {
        let root = self.cfg.dir.join(key);
        let n = self.trash.fetch_add(1, Ordering::Relaxed);
        let trash = self
            .cfg
            .dir
            .join(format!("{TRASH_PREFIX}{key}-{}-{n}", std::process::id()));
        match std::fs::rename(&root, &trash) {
            Ok(()) => Some(trash),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => {
                tracing::warn!("python envs: removing {}: {e}", root.display());
                None
            }
        }
    }

    fn delete(leftover: &Path) {
        remove_tree(leftover);
    }
}

impl Envs {
    /// Takes the cross-process lock, then adopts an environment another process
    /// finished meanwhile, or builds it.
    async fn build_env(
        &self,
        key: &str,
        b: &Build,
        out: &mut Output,
    ) -> Result<Built<EnvMeta>, EnvError> {
        let io_err = |what: String, e: io::Error| EnvError::Io {
            key: key.to_string(),
            requirements: b.requirements.clone(),
            what,
            source: Arc::new(e),
        };
        let lock_path = self.cfg.dir.join(format!("{key}.lock"));
        let _lock = loop {
            match try_lock_file(&self.cfg.dir, key) {
                Ok(Some(file)) => break file,
                Ok(None) => {}
                Err(e) => return Err(io_err(format!("locking {}", lock_path.display()), e)),
            }
            if Instant::now() + LOCK_POLL >= b.deadline {
                return Err(EnvError::Waited {
                    key: key.to_string(),
                    requirements: b.requirements.clone(),
                    timeout: b.timeout,
                    doing: format!(
                        "another agent process sharing {} is still building it (it holds {})",
                        self.cfg.dir.display(),
                        lock_path.display()
                    ),
                });
            }
            tokio::time::sleep(LOCK_POLL).await;
        };
        let root = self.cfg.dir.join(key);
        let (r, k) = (root.clone(), key.to_string());
        let adopted = tokio::task::spawn_blocking(move || load_complete(&r, &k))
            .await
            .ok()
            .flatten();
        if let Some((meta, _)) = adopted {
            out.line(&format!(
                "another agent process built the Python environment {key} for {:?}; using it",
                b.requirements
            ))
            .await;
            return Ok(Built {
                size: meta.size,
                meta: EnvMeta::of(meta),
            });
        }
        // Whatever is there is a build cut short, and the lock says nobody is working
        // on it now.
        delete(&root)
            .await
            .map_err(|e| io_err(format!("removing the incomplete {}", root.display()), e))?;
        self.builds.fetch_add(1, Ordering::Relaxed);
        let python = short_version(&b.version);
        out.line(&format!(
            "building the Python environment {key} for {:?} with {} (Python {python})",
            b.requirements,
            self.cfg.python.display()
        ))
        .await;
        let started = Instant::now();
        let result = self.run_build(key, b, &root, &python, out).await;
        match &result {
            Ok(built) => {
                out.line(&format!(
                    "built the Python environment {key} ({} bytes) in {:.1}s",
                    built.size,
                    started.elapsed().as_secs_f64()
                ))
                .await;
            }
            Err(_) => {
                if let Err(err) = delete(&root).await {
                    tracing::warn!(
                        "python envs: removing the partial {}: {err}",
                        root.display()
                    );
                }
            }
        }
        result
    }

    async fn run_build(
        &self,
        key: &str,
        b: &Build,
        root: &Path,
        python: &str,
        out: &mut Output,
    ) -> Result<Built<EnvMeta>, EnvError> {
        let io_err = |what: String, e: io::Error| EnvError::Io {
            key: key.to_string(),
            requirements: b.requirements.clone(),
            what,
            source: Arc::new(e),
        };
        const VENV: &str = "creating the virtual environment with python -m venv";
        const PIP: &str = "installing the requirements with pip";
        let step_err = |step: &'static str, e: StepError| match e {
            StepError::Timeout => EnvError::Timeout {
                key: key.to_string(),
                requirements: b.requirements.clone(),
                timeout: b.timeout,
                doing: step.to_string(),
            },
            StepError::Exit { status, tail } => EnvError::Failed {
                key: key.to_string(),
                requirements: b.requirements.clone(),
                step: format!("{step} {}", describe_status(status)),
                tail,
                advice: if step == VENV {
                    format!(
                        "Check that the node's Python ({}) has its venv and ensurepip modules; on Debian and Ubuntu they come with the python3-venv package.",
                        self.cfg.python.display()
                    )
                } else {
                    format!(
                        "Check that every requirement names a package and version that exist and install with Python {python} on this node."
                    )
                },
            },
            StepError::Io(e) => io_err(step.to_string(), e),
        };

        // No --system-site-packages: the environment sees only what it installs. Pip is
        // bootstrapped as a step of its own because `venv` hides what ensurepip printed
        // when it fails, which left a failed build with nothing to go on.
        let mut venv = Command::new(&self.cfg.python);
        venv.arg("-m").arg("venv").arg("--without-pip").arg(root);
        self.run_step(venv, out, b.deadline)
            .await
            .map_err(|e| step_err(VENV, e))?;
        // Ensurepip only installs the wheel Python ships with, so a failure is not about
        // the job's requirements; one was seen once under heavy parallel load and not
        // again, so it gets a second try before the build is failed.
        let mut attempt = 1;
        loop {
            let mut pip_boot = Command::new(root.join("bin").join("python"));
            pip_boot.args(["-m", "ensurepip", "--default-pip"]);
            match self.run_step(pip_boot, out, b.deadline).await {
                Ok(()) => break,
                Err(StepError::Exit { status, .. }) if attempt < ENSUREPIP_ATTEMPTS => {
                    out.line(&format!(
                        "ensurepip {}; trying once more",
                        describe_status(status)
                    ))
                    .await;
                    attempt += 1;
                }
                Err(e) => return Err(step_err(VENV, e)),
            }
        }

        let req_file = root.join(REQUIREMENTS_FILE);
        let mut text = b.requirements.join("\n");
        text.push('\n');
        tokio::fs::write(&req_file, text)
            .await
            .map_err(|e| io_err(format!("writing {}", req_file.display()), e))?;

        // The cache is off so that nothing outside the cache directory is written, and
        // so a node's disk holds each package once, in the environment that uses it.
        let mut pip = Command::new(root.join("bin").join("python"));
        pip.args([
            "-m",
            "pip",
            "install",
            "--no-input",
            "--disable-pip-version-check",
            "--no-cache-dir",
            "--no-warn-script-location",
            "-r",
        ])
        .arg(&req_file);
        self.run_step(pip, out, b.deadline)
            .await
            .map_err(|e| step_err(PIP, e))?;

        let meta = Metadata {
            format: METADATA_FORMAT,
            key: key.to_string(),
            requirements: b.requirements.clone(),
            python_version: b.version.clone(),
            size: 0,
            created_ms: now_ms(),
        };
        let r = root.to_path_buf();
        let finished = tokio::task::spawn_blocking(move || finish(&r, meta))
            .await
            .unwrap_or_else(|e| Err(io::Error::other(format!("the task panicked: {e}"))));
        let size = finished.map_err(|e| {
            io_err(
                format!("recording the finished environment in {}", root.display()),
                e,
            )
        })?;
        Ok(Built {
            meta: EnvMeta {
                requirements: b.requirements.clone(),
                python: python.to_string(),
            },
            size,
        })
    }

    /// Runs one step of a build in its own process group, copying its output to the
    /// log as it comes. At the deadline the whole group is killed, and this returns once
    /// it is gone, so nothing writes into the environment while it is deleted.
    async fn run_step(
        &self,
        mut cmd: Command,
        out: &mut Output,
        deadline: Instant,
    ) -> Result<(), StepError> {
        let shown = show_command(&cmd);
        if Instant::now() >= deadline {
            return Err(StepError::Timeout);
        }
        build_environment(&mut cmd);
        cmd.current_dir(&self.cfg.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        out.line(&format!("$ {shown}")).await;
        let mut child = cmd.spawn().map_err(|e| {
            StepError::Io(io::Error::new(e.kind(), format!("starting {shown}: {e}")))
        })?;
        let pgid = child.id().and_then(|p| i32::try_from(p).ok());
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(64);
        let mut readers = Vec::new();
        if let Some(stdout) = child.stdout.take() {
            readers.push(tokio::spawn(forward(stdout, tx.clone())));
        }
        if let Some(stderr) = child.stderr.take() {
            readers.push(tokio::spawn(forward(stderr, tx.clone())));
        }
        drop(tx);
        let mut step = Tail::new(STEP_CAPTURE_BYTES);
        let status = loop {
            tokio::select! {
                Some(chunk) = rx.recv() => {
                    out.write(&chunk).await;
                    step.push(&chunk);
                }
                status = child.wait() => break status,
                _ = tokio::time::sleep_until(deadline) => {
                    // The child has not been reaped (its wait did not complete), so its
                    // pid still names its process group and cannot have been reused.
                    if let Some(pgid) = pgid {
                        // SAFETY: kill has no memory-safety preconditions.
                        unsafe { libc::kill(-pgid, libc::SIGKILL) };
                    }
                    if let Err(e) = child.start_kill() {
                        tracing::warn!("python envs: killing {shown} after the setup_timeout: {e}");
                    }
                    match tokio::time::timeout(GROUP_EXIT_WAIT, child.wait()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => tracing::warn!("python envs: reaping {shown} after killing it: {e}"),
                        Err(_) => tracing::warn!(
                            "python envs: {shown} did not exit within {}s of SIGKILL",
                            GROUP_EXIT_WAIT.as_secs()
                        ),
                    }
                    if let Some(pgid) = pgid {
                        wait_group_gone(pgid).await;
                    }
                    readers.iter().for_each(|r| r.abort());
                    out.line("the setup_timeout expired; the build's processes were killed").await;
                    return Err(StepError::Timeout);
                }
            }
        };
        // What is still in the pipes belongs to this step; a grandchild that keeps them
        // open is not waited for past the grace period.
        let grace = Instant::now() + OUTPUT_GRACE;
        while let Ok(Some(chunk)) = tokio::time::timeout_at(grace, rx.recv()).await {
            out.write(&chunk).await;
            step.push(&chunk);
        }
        readers.iter().for_each(|r| r.abort());
        let status = status.map_err(|e| {
            StepError::Io(io::Error::new(
                e.kind(),
                format!("waiting for {shown}: {e}"),
            ))
        })?;
        if status.success() {
            Ok(())
        } else {
            Err(StepError::Exit {
                status,
                tail: step.last_lines(TAIL_LINES),
            })
        }
    }
}

/// What one build needs to know besides its key.
struct Build {
    requirements: Vec<String>,
    version: String,
    log: PathBuf,
    deadline: Instant,
    timeout: Duration,
}

enum StepError {
    Timeout,
    Exit { status: ExitStatus, tail: String },
    Io(io::Error),
}

/// A ready environment pinned for a task: it is not evicted or pruned while a lease on
/// it lives. Dropping the lease releases it, which counts as a use.
pub struct EnvLease(cache::Lease<Envs>);

impl EnvLease {
    pub fn key(&self) -> &str {
        self.0.key()
    }

    /// The virtual environment's directory. Do not write to it: it is shared with every
    /// task that uses the same requirements.
    pub fn root(&self) -> &Path {
        self.0.path()
    }

    /// The variables a task gets: `VIRTUAL_ENV`, and `PATH` with the environment's
    /// `bin` first, before `base_path` (the task's own `PATH`, possibly empty).
    pub fn env_vars(&self, base_path: &str) -> Vec<(String, String)> {
        let bin = self.root().join("bin").to_string_lossy().into_owned();
        let path = if base_path.is_empty() {
            bin
        } else {
            format!("{bin}:{base_path}")
        };
        vec![
            (
                "VIRTUAL_ENV".to_string(),
                self.root().to_string_lossy().into_owned(),
            ),
            ("PATH".to_string(), path),
        ]
    }
}

impl fmt::Debug for EnvLease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnvLease")
            .field("key", &self.key())
            .field("root", &self.root())
            .finish()
    }
}

/// Checks the requirements and returns them trimmed, in their order. An entry must be
/// a requirement specifier: a pip option (`--index-url`, `-e`) could point pip
/// somewhere the node's operator did not intend, and a line break, a trailing
/// backslash (which joins lines) or `${` (which pip fills from the environment) could
/// smuggle one in through the requirements file.
fn validate(requirements: &[String]) -> Result<Vec<String>, EnvError> {
    requirements
        .iter()
        .enumerate()
        .map(|(index, r)| {
            let bad = |why: String| EnvError::InvalidRequirement {
                index,
                requirement: r.clone(),
                why,
            };
            drover_core::spec::validate_requirement(r).map_err(bad)?;
            let t = r.trim();
            if t.ends_with('\\') {
                return Err(bad(
                    "it ends with a backslash, which would join it to the next line".into(),
                ));
            }
            if t.contains("${") {
                return Err(bad(
                    "it contains \"${\", which pip would fill in from the node's environment"
                        .into(),
                ));
            }
            Ok(t.to_string())
        })
        .collect()
}

/// The hex sha256 (first 16 bytes) of the interpreter's version and the requirements.
/// Each part is length-prefixed, so no two different lists hash the same input.
fn env_key(version: &str, requirements: &[String]) -> String {
    let mut h = Sha256::new();
    h.update(b"drover python env v1\n");
    for part in std::iter::once(version).chain(requirements.iter().map(String::as_str)) {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    hex::encode(&h.finalize()[..KEY_HEX_LEN / 2])
}

fn is_key(name: &str) -> bool {
    name.len() == KEY_HEX_LEN && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `3.11.7` out of `3.11.7 (main, ...) [GCC ...]`.
fn short_version(version: &str) -> String {
    version
        .split_whitespace()
        .next()
        .unwrap_or(version)
        .to_string()
}

/// Runs the interpreter once to learn its `sys.version`.
async fn query_version(python: &PathBuf) -> Result<String, EnvError> {
    let fail = |why: String| EnvError::Interpreter {
        python: python.clone(),
        why,
    };
    let mut cmd = Command::new(python);
    cmd.args(["-c", "import sys; print(sys.version.replace('\\n', ' '))"]);
    build_environment(&mut cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let run = tokio::time::timeout(VERSION_TIMEOUT, cmd.output());
    let out = match run.await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => return Err(fail(format!("running it failed: {e}"))),
        Err(_) => {
            return Err(fail(format!(
                "it did not print its version within {}",
                humanize(VERSION_TIMEOUT)
            )));
        }
    };
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || version.is_empty() {
        return Err(fail(format!(
            "asking its version {}: {}",
            describe_status(out.status),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(version)
}

/// Gives a build step only the variables listed in [`PASSED_VARIABLES`] and
/// [`PASSED_PREFIXES`], since what it runs is partly chosen by a job's author.
fn build_environment(cmd: &mut Command) {
    cmd.env_clear();
    for (name, value) in std::env::vars_os() {
        let Some(n) = name.to_str() else { continue };
        let passed = PASSED_VARIABLES.contains(&n)
            || (PASSED_PREFIXES.iter().any(|p| n.starts_with(p))
                && !REFUSED_PIP_VARIABLES.contains(&n));
        if passed {
            cmd.env(&name, &value);
        }
    }
    // The user's own site-packages must not leak into what venv or pip see.
    cmd.env("PYTHONNOUSERSITE", "1");
}

/// The command as a person would type it, for the log.
fn show_command(cmd: &Command) -> String {
    let std = cmd.as_std();
    std::iter::once(std.get_program())
        .chain(std.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn describe_status(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        _ => format!("ended with {status}"),
    }
}

/// Copies one pipe into the channel until it ends or nobody listens.
async fn forward(mut r: impl AsyncRead + Unpin, tx: mpsc::Sender<Vec<u8>>) {
    let mut buf = vec![0u8; 8192];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tx.send(buf[..n].to_vec()).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Waits, up to [`GROUP_EXIT_WAIT`], until no live process is left in a killed
/// process group. Zombies do not count: they write nothing, and which process reaps
/// them is not ours to decide.
async fn wait_group_gone(pgid: i32) {
    let until = Instant::now() + GROUP_EXIT_WAIT;
    loop {
        let alive = tokio::task::spawn_blocking(move || group_alive(pgid))
            .await
            .unwrap_or(false);
        if !alive {
            return;
        }
        if Instant::now() >= until {
            tracing::warn!(
                "python envs: processes of the killed build group {pgid} are still alive after {}",
                humanize(GROUP_EXIT_WAIT)
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether any process that is not a zombie belongs to the process group, read from
/// `/proc/<pid>/stat`.
fn group_alive(pgid: i32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|e| {
        let name = e.file_name();
        if !name
            .to_str()
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        {
            return false;
        }
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            return false;
        };
        // The command name is in parentheses and may contain spaces, so the fields are
        // counted from the last closing parenthesis: state, ppid, pgrp.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            return false;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next();
        let pgrp = fields.nth(1).and_then(|f| f.parse::<i32>().ok());
        pgrp == Some(pgid) && state != Some("Z") && state != Some("X")
    })
}

/// Opens `<dir>/<key>.lock` and tries to lock it exclusively without waiting: the
/// locked file when it was free, `None` when another holder has it.
fn try_lock_file(dir: &Path, key: &str) -> io::Result<Option<std::fs::File>> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(format!("{key}.lock")))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// The metadata of a complete environment and when it was last used (unix ms), or
/// `None` when it is incomplete or its metadata cannot be read.
fn load_complete(root: &Path, key: &str) -> Option<(Metadata, u64)> {
    let marker = std::fs::metadata(root.join(COMPLETE_MARKER)).ok()?;
    let text = std::fs::read(root.join(METADATA_FILE)).ok()?;
    let meta: Metadata = match serde_json::from_slice(&text) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!("python envs: {}: {e}", root.join(METADATA_FILE).display());
            return None;
        }
    };
    if meta.format != METADATA_FORMAT || meta.key != key {
        return None;
    }
    let used = marker
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(meta.created_ms, |d| d.as_millis() as u64);
    Some((meta, used))
}

/// Records a built environment: its size, its metadata, then the marker. Everything is
/// flushed to disk before the marker is written, so after a crash a marker always
/// stands for a whole environment.
fn finish(root: &Path, mut meta: Metadata) -> io::Result<u64> {
    let size = dir_size(root)?;
    meta.size = size;
    let json = serde_json::to_vec_pretty(&meta).map_err(io::Error::other)?;
    let mut file = std::fs::File::create(root.join(METADATA_FILE))?;
    file.write_all(&json)?;
    file.sync_all()?;
    // pip does not sync what it writes; one syncfs covers all of it.
    // SAFETY: the descriptor is open for the duration of the call.
    if unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&file)) } != 0 {
        return Err(io::Error::last_os_error());
    }
    std::fs::File::create(root.join(COMPLETE_MARKER))?.sync_all()?;
    std::fs::File::open(root)?.sync_all()?;
    Ok(size)
}

/// Bytes on disk under `root`, without following symbolic links.
fn dir_size(root: &Path) -> io::Result<u64> {
    let mut total = 0u64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            total += meta.blocks() * 512;
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok(total)
}

/// Marks an environment as just used, so a restarted agent evicts least recently used
/// first too. Best effort: only the order of eviction depends on it.
fn touch_marker(root: &Path) {
    let marker = root.join(COMPLETE_MARKER);
    tokio::task::spawn_blocking(move || {
        let touched = std::fs::OpenOptions::new()
            .write(true)
            .open(&marker)
            .and_then(|f| f.set_modified(SystemTime::now()));
        if let Err(e) = touched {
            tracing::debug!("python envs: touching {}: {e}", marker.display());
        }
    });
}

/// Deletes a directory tree off the async threads.
async fn delete(path: &Path) -> io::Result<()> {
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&p) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    })
    .await
    .unwrap_or_else(|e| Err(io::Error::other(format!("the task panicked: {e}"))))
}

fn remove_tree(path: &Path) {
    match std::fs::remove_dir_all(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!("python envs: removing {}: {e}", path.display()),
    }
}

fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A duration as people read it in a message: `50ms`, `2.5s`, `10m0s`.
fn humanize(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else if d < Duration::from_secs(60) {
        let s = format!("{:.1}", d.as_secs_f64());
        format!("{}s", s.trim_end_matches(".0"))
    } else {
        format!("{}m{}s", d.as_secs() / 60, d.as_secs() % 60)
    }
}

/// The end of a stream of output, at most `cap` bytes.
struct Tail {
    buf: Vec<u8>,
    cap: usize,
}

impl Tail {
    fn new(cap: usize) -> Self {
        Tail {
            buf: Vec::new(),
            cap,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() > self.cap {
            let cut = self.buf.len() - self.cap;
            self.buf.drain(..cut);
        }
    }

    /// The last `n` non-blank lines, each indented and cut to a readable length.
    fn last_lines(&self, n: usize) -> String {
        let text = String::from_utf8_lossy(&self.buf);
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim_end)
            .filter(|l| !l.trim().is_empty())
            .collect();
        if lines.is_empty() {
            return "  (it printed nothing)".into();
        }
        lines[lines.len().saturating_sub(n)..]
            .iter()
            .map(|l| {
                if l.chars().count() > TAIL_LINE_CHARS {
                    let cut: String = l.chars().take(TAIL_LINE_CHARS).collect();
                    format!("  {cut}...")
                } else {
                    format!("  {l}")
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A task's log, opened for appending on first use. Failing to write it never fails a
/// build: the environment is what the task needs, and the error is logged by the agent.
struct LogFile {
    path: PathBuf,
    file: Option<tokio::fs::File>,
    broken: bool,
}

impl LogFile {
    fn new(path: &Path) -> Self {
        LogFile {
            path: path.to_path_buf(),
            file: None,
            broken: false,
        }
    }

    async fn write(&mut self, bytes: &[u8]) {
        if self.broken || bytes.is_empty() {
            return;
        }
        if self.file.is_none() {
            let opened = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .await;
            match opened {
                Ok(f) => self.file = Some(f),
                Err(e) => {
                    tracing::warn!("python envs: opening {}: {e}", self.path.display());
                    self.broken = true;
                    return;
                }
            }
        }
        // Flushed at once: a tokio file finishes a write in the background otherwise,
        // and the log must hold each line by the time the call that wrote it returns.
        if let Some(f) = self.file.as_mut()
            && let Err(e) = async {
                f.write_all(bytes).await?;
                f.flush().await
            }
            .await
        {
            tracing::warn!("python envs: writing {}: {e}", self.path.display());
            self.broken = true;
        }
    }

    /// Writes one line of the agent's own, marked so it stands out from pip's output.
    async fn line(&mut self, text: &str) {
        self.write(format!("drover: {text}\n").as_bytes()).await;
    }
}

/// A build's output: written to the log of the task that started it as it comes, and
/// its end kept for the tasks that waited.
struct Output {
    log: LogFile,
    tail: Tail,
}

impl Output {
    fn new(log: &Path) -> Self {
        Output {
            log: LogFile::new(log),
            tail: Tail::new(SHARED_CAPTURE_BYTES),
        }
    }

    async fn write(&mut self, bytes: &[u8]) {
        self.log.write(bytes).await;
        self.tail.push(bytes);
    }

    async fn line(&mut self, text: &str) {
        self.write(format!("drover: {text}\n").as_bytes()).await;
    }
}
