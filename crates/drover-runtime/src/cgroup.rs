//! A cgroup per process task: its memory limit and CPU quota are enforced by the kernel,
//! and everything it started can be found and killed, including processes that left
//! its process group or session (`setsid daemon &`).
//!
//! Two drivers sit behind [`Cgroups`]: the unified hierarchy (cgroup v2: `cgroup.kill`,
//! `memory.max`, `cpu.max`, `memory.events`) and the legacy one (cgroup v1: a cgroup in
//! each of the freezer, pids, memory and cpu hierarchies that are mounted; the freezer
//! stops every process before they are killed, so none can fork away meanwhile). Which
//! one a node has is detected once, when the runtime is made.
//!
//! Every task's cgroup is `drover/<scope>/<task id>` under the agent's own cgroup (v1)
//! or the root of the unified hierarchy (v2), where `<scope>` is the node's id: agents
//! sharing a machine never touch each other's cgroups.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What a task's cgroup limits.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Limits {
    /// The most memory (including the page cache it fills) before the kernel kills it.
    pub memory_bytes: Option<u64>,
    /// CPU cores it may use, as a quota per scheduling period.
    pub cpu: Option<f64>,
}

/// The CFS period quotas are given in: 100 ms, the kernel's default.
const CPU_PERIOD_US: u64 = 100_000;

/// The smallest quota the kernel accepts, 1 ms per period.
const MIN_CPU_QUOTA_US: u64 = 1_000;

/// How long a kill may take to empty a cgroup before it is reported as failed.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the freezer may take to freeze a cgroup before the kill goes on anyway.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(2);

/// A way to give tasks cgroups of their own on this node.
pub trait Cgroups: Send + Sync {
    /// `v1` or `v2`, for the node's attributes.
    fn version(&self) -> &'static str;

    /// Creates the task's cgroup with its limits, and returns the `cgroup.procs` files
    /// its first process writes itself into.
    fn create(&self, task: &str, limits: &Limits) -> io::Result<Vec<PathBuf>>;

    /// The processes in the task's cgroup; empty when it has none (or no cgroup).
    fn pids(&self, task: &str) -> io::Result<Vec<i32>>;

    /// Kills every process in the task's cgroup and waits, bounded, until none is left.
    fn kill(&self, task: &str) -> io::Result<()>;

    /// How many processes of the task the kernel killed for exceeding its memory limit.
    fn oom_kills(&self, task: &str) -> u64;

    /// Removes the task's cgroup, which must have no process left; a missing one is
    /// already removed.
    fn remove(&self, task: &str) -> io::Result<()>;

    /// The tasks that have a cgroup here, found by name.
    fn list(&self) -> io::Result<Vec<String>>;
}

/// Finds the cgroup hierarchy this machine has and returns a driver for it, or says why
/// tasks cannot have cgroups here (not root, nothing mounted, nothing writable).
pub fn detect(scope: &str) -> Result<Box<dyn Cgroups>, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("the agent is not root, so it cannot make cgroups".into());
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("reading /proc/self/mountinfo: {e}"))?;
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("reading /proc/self/cgroup: {e}"))?;
    let mounts = parse_mounts(&mounts);
    // A unified hierarchy that has the memory controller is the whole of cgroup v2;
    // in a hybrid set-up the controllers are on the v1 hierarchies instead.
    if let Some(root) = mounts
        .iter()
        .find(|m| m.v2 && has_controller_v2(&m.path, "memory"))
    {
        let driver = V2::new(&root.path, scope)?;
        return Ok(Box::new(driver));
    }
    let own = parse_own_cgroups(&own);
    let driver = V1::new(&mounts, &own, scope)?;
    Ok(Box::new(driver))
}

/// One cgroup file system mount.
#[derive(Debug, PartialEq)]
struct Mount {
    path: PathBuf,
    v2: bool,
    /// The controllers of a v1 hierarchy (its super options), or `name=...`.
    options: Vec<String>,
}

/// Reads the cgroup mounts from `/proc/self/mountinfo`: the mount point is field 5, and
/// the file system type and super options follow the ` - ` separator.
fn parse_mounts(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (head, tail) = line.split_once(" - ")?;
            let path = head.split_whitespace().nth(4)?;
            let mut tail = tail.split_whitespace();
            let fstype = tail.next()?;
            let _source = tail.next();
            let options = tail.next().unwrap_or("");
            let v2 = match fstype {
                "cgroup2" => true,
                "cgroup" => false,
                _ => return None,
            };
            Some(Mount {
                path: PathBuf::from(unescape_mount_path(path)),
                v2,
                options: options.split(',').map(str::to_string).collect(),
            })
        })
        .collect()
}

/// Mount points in mountinfo have spaces and a few other characters written as octal
/// escapes (`\040`).
fn unescape_mount_path(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(Ok(v)) = s.get(i + 1..i + 4).map(|o| u8::from_str_radix(o, 8))
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The agent's own cgroup in each v1 hierarchy, by controller, from `/proc/self/cgroup`
/// (`ID:CONTROLLERS:PATH`).
fn parse_own_cgroups(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        for c in controllers.split(',').filter(|c| !c.is_empty()) {
            out.push((c.to_string(), path.to_string()));
        }
    }
    out
}

fn has_controller_v2(root: &Path, controller: &str) -> bool {
    std::fs::read_to_string(root.join("cgroup.controllers"))
        .is_ok_and(|s| s.split_whitespace().any(|c| c == controller))
}

fn write(path: &Path, value: &str) -> io::Result<()> {
    std::fs::write(path, value).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("writing {value:?} to {}: {e}", path.display()),
        )
    })
}

fn read_pids(procs: &Path) -> io::Result<Vec<i32>> {
    match std::fs::read_to_string(procs) {
        Ok(text) => Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// A named counter in a flat keyed file such as `memory.events` (`oom_kill 1`).
fn read_counter(path: &Path, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(char::is_whitespace)?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

/// Removes a cgroup directory; a missing one is already removed. A cgroup's directory
/// holds only the kernel's files, which `rmdir` removes with it.
fn remove_dir(path: &Path) -> io::Result<()> {
    match std::fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("removing {}: {e}", path.display()),
        )),
    }
}

/// The task cgroups (directories) under `parent`.
fn list_dir(parent: &Path) -> io::Result<Vec<String>> {
    let entries = match std::fs::read_dir(parent) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for e in entries {
        let e = e?;
        if e.file_type()?.is_dir()
            && let Some(name) = e.file_name().to_str()
        {
            out.push(name.to_string());
        }
    }
    Ok(out)
}

/// Sends SIGKILL to every process in a cgroup until it is empty, for a hierarchy with
/// neither `cgroup.kill` nor a freezer: a process forked meanwhile is found the next
/// round.
fn kill_until_empty(procs: &Path, deadline: Instant) -> io::Result<()> {
    loop {
        let pids = read_pids(procs)?;
        if pids.is_empty() {
            return Ok(());
        }
        for pid in pids {
            // SAFETY: kill has no memory-safety preconditions. A pid that ended since it
            // was read fails with ESRCH, which is what we want anyway.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        if Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("processes were still in {} after SIGKILL", procs.display()),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits, bounded, until a cgroup has no process left.
fn wait_empty(procs: &Path, deadline: Instant) -> io::Result<()> {
    while !read_pids(procs)?.is_empty() {
        if Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("processes were still in {} after the kill", procs.display()),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn cpu_quota_us(cpu: f64) -> u64 {
    ((cpu * CPU_PERIOD_US as f64).round() as u64).max(MIN_CPU_QUOTA_US)
}

/// The unified hierarchy (cgroup v2).
struct V2 {
    /// `<root>/drover/<scope>`, under which each task has its cgroup.
    parent: PathBuf,
}

impl V2 {
    fn new(root: &Path, scope: &str) -> Result<V2, String> {
        // Task cgroups hang off the root: a cgroup with processes in it (like the
        // agent's own) cannot hand controllers to children, the root alone can.
        let top = root.join("drover");
        let parent = top.join(scope);
        let setup = || -> io::Result<()> {
            std::fs::create_dir_all(&parent)?;
            for dir in [root, top.as_path()] {
                write(&dir.join("cgroup.subtree_control"), "+memory +cpu +pids")?;
            }
            write(&parent.join("cgroup.subtree_control"), "+memory +cpu +pids")
        };
        setup().map_err(|e| format!("cgroup v2 at {}: {e}", root.display()))?;
        Ok(V2 { parent })
    }

    fn dir(&self, task: &str) -> PathBuf {
        self.parent.join(task)
    }
}

impl Cgroups for V2 {
    fn version(&self) -> &'static str {
        "v2"
    }

    fn create(&self, task: &str, limits: &Limits) -> io::Result<Vec<PathBuf>> {
        let dir = self.dir(task);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        if let Some(bytes) = limits.memory_bytes {
            write(&dir.join("memory.max"), &bytes.to_string())?;
            // Past its limit a task is killed, not swapped out to go on slowly.
            if dir.join("memory.swap.max").exists() {
                write(&dir.join("memory.swap.max"), "0")?;
            }
        }
        if let Some(cpu) = limits.cpu {
            write(
                &dir.join("cpu.max"),
                &format!("{} {CPU_PERIOD_US}", cpu_quota_us(cpu)),
            )?;
        }
        Ok(vec![dir.join("cgroup.procs")])
    }

    fn pids(&self, task: &str) -> io::Result<Vec<i32>> {
        read_pids(&self.dir(task).join("cgroup.procs"))
    }

    fn kill(&self, task: &str) -> io::Result<()> {
        let dir = self.dir(task);
        let procs = dir.join("cgroup.procs");
        let deadline = Instant::now() + KILL_TIMEOUT;
        if !dir.exists() {
            return Ok(());
        }
        // cgroup.kill (Linux 5.14) kills every process in the cgroup at once, forks
        // included; an older kernel is served by killing until it is empty.
        match write(&dir.join("cgroup.kill"), "1") {
            Ok(()) => wait_empty(&procs, deadline),
            Err(_) => kill_until_empty(&procs, deadline),
        }
    }

    fn oom_kills(&self, task: &str) -> u64 {
        read_counter(&self.dir(task).join("memory.events"), "oom_kill").unwrap_or(0)
    }

    fn remove(&self, task: &str) -> io::Result<()> {
        remove_dir(&self.dir(task))
    }

    fn list(&self) -> io::Result<Vec<String>> {
        list_dir(&self.parent)
    }
}

/// The legacy hierarchies (cgroup v1): one directory per task in each hierarchy used.
struct V1 {
    /// `<mount>/<agent's cgroup>/drover/<scope>` in the freezer hierarchy, if mounted.
    freezer: Option<PathBuf>,
    /// The same in the pids hierarchy.
    pids: Option<PathBuf>,
    memory: Option<PathBuf>,
    cpu: Option<PathBuf>,
}

impl V1 {
    fn new(mounts: &[Mount], own: &[(String, String)], scope: &str) -> Result<V1, String> {
        let parent = |controller: &str| -> Result<Option<PathBuf>, String> {
            let Some(m) = mounts
                .iter()
                .find(|m| !m.v2 && m.options.iter().any(|o| o == controller))
            else {
                return Ok(None);
            };
            // Under the agent's own cgroup, so the limits of whatever runs the agent
            // (a container, a service) still hold for its tasks. Where that path is not
            // visible (another cgroup namespace), the hierarchy's root is used.
            let own_path = own
                .iter()
                .find(|(c, _)| c == controller)
                .map(|(_, p)| p.trim_start_matches('/'))
                .unwrap_or("");
            let base = if m.path.join(own_path).is_dir() {
                m.path.join(own_path)
            } else {
                m.path.clone()
            };
            let parent = base.join("drover").join(scope);
            std::fs::create_dir_all(&parent).map_err(|e| {
                format!("cgroup v1 {controller}: creating {}: {e}", parent.display())
            })?;
            Ok(Some(parent))
        };
        let v1 = V1 {
            freezer: parent("freezer")?,
            pids: parent("pids")?,
            memory: parent("memory")?,
            cpu: parent("cpu")?,
        };
        if v1.freezer.is_none() && v1.pids.is_none() && v1.memory.is_none() {
            return Err(
                "no cgroup hierarchy is mounted (neither v2 nor v1 freezer, pids or memory)".into(),
            );
        }
        Ok(v1)
    }

    fn parents(&self) -> impl Iterator<Item = &PathBuf> {
        [&self.freezer, &self.pids, &self.memory, &self.cpu]
            .into_iter()
            .flatten()
    }

    /// The hierarchy whose membership says which processes are the task's: the freezer
    /// when there is one, since it also stops them for the kill.
    fn tracking(&self) -> &PathBuf {
        // `new` refuses a set-up with none of the three, so one is always there.
        self.freezer
            .as_ref()
            .or(self.pids.as_ref())
            .or(self.memory.as_ref())
            .unwrap_or_else(|| unreachable!("V1::new requires a freezer, pids or memory hierarchy"))
    }
}

impl Cgroups for V1 {
    fn version(&self) -> &'static str {
        "v1"
    }

    fn create(&self, task: &str, limits: &Limits) -> io::Result<Vec<PathBuf>> {
        let mut procs = Vec::new();
        for parent in self.parents() {
            let dir = parent.join(task);
            match std::fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("creating {}: {e}", dir.display()),
                    ));
                }
            }
            procs.push(dir.join("cgroup.procs"));
        }
        if let (Some(parent), Some(bytes)) = (&self.memory, limits.memory_bytes) {
            let dir = parent.join(task);
            write(&dir.join("memory.limit_in_bytes"), &bytes.to_string())?;
            // With swap accounting, memory plus swap is capped at the same figure, so a
            // task past its limit is killed rather than swapped out. It must be set after
            // the memory limit, which it may never be below.
            let memsw = dir.join("memory.memsw.limit_in_bytes");
            if memsw.exists() {
                write(&memsw, &bytes.to_string())?;
            }
        }
        if let (Some(parent), Some(cpu)) = (&self.cpu, limits.cpu) {
            let dir = parent.join(task);
            write(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
            write(
                &dir.join("cpu.cfs_quota_us"),
                &cpu_quota_us(cpu).to_string(),
            )?;
        }
        Ok(procs)
    }

    fn pids(&self, task: &str) -> io::Result<Vec<i32>> {
        read_pids(&self.tracking().join(task).join("cgroup.procs"))
    }

    fn kill(&self, task: &str) -> io::Result<()> {
        let deadline = Instant::now() + KILL_TIMEOUT;
        let Some(freezer) = &self.freezer else {
            return kill_until_empty(&self.tracking().join(task).join("cgroup.procs"), deadline);
        };
        let dir = freezer.join(task);
        if !dir.exists() {
            return Ok(());
        }
        let state = dir.join("freezer.state");
        let procs = dir.join("cgroup.procs");
        // Frozen, no process can fork or exit while the list is read and each is sent
        // SIGKILL, which is delivered once the cgroup thaws.
        write(&state, "FROZEN")?;
        let freeze_deadline = Instant::now() + FREEZE_TIMEOUT;
        while std::fs::read_to_string(&state).is_ok_and(|s| s.trim() != "FROZEN")
            && Instant::now() < freeze_deadline
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        let killed = read_pids(&procs).map(|pids| {
            for pid in pids {
                // SAFETY: kill has no memory-safety preconditions; a frozen process
                // cannot have ended and had its pid reused.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        });
        let thawed = write(&state, "THAWED");
        killed?;
        thawed?;
        // Anything that got past a freeze that did not finish in time goes now.
        kill_until_empty(&procs, deadline)
    }

    fn oom_kills(&self, task: &str) -> u64 {
        let Some(memory) = &self.memory else {
            return 0;
        };
        // `oom_kill` is in memory.oom_control from Linux 4.13.
        read_counter(&memory.join(task).join("memory.oom_control"), "oom_kill").unwrap_or(0)
    }

    fn remove(&self, task: &str) -> io::Result<()> {
        let mut first_error = None;
        for parent in self.parents() {
            if let Err(e) = remove_dir(&parent.join(task)) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn list(&self) -> io::Result<Vec<String>> {
        let mut all = std::collections::BTreeSet::new();
        for parent in self.parents() {
            all.extend(list_dir(parent)?);
        }
        Ok(all.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_and_own_cgroups_are_parsed() {
        let info = "\
30 25 0:26 / /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory
31 25 0:27 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
32 25 0:28 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
33 25 0:29 / /my\\040dir rw - ext4 /dev/vda rw
";
        let mounts = parse_mounts(info);
        assert_eq!(mounts.len(), 3);
        assert_eq!(mounts[0].path, Path::new("/sys/fs/cgroup/memory"));
        assert!(mounts[0].options.contains(&"memory".to_string()));
        assert!(mounts[1].options.contains(&"cpu".to_string()));
        assert!(mounts[2].v2);
        assert_eq!(unescape_mount_path("/my\\040dir"), "/my dir");
        let own = parse_own_cgroups("4:memory:/process_api/x\n1:cpu,cpuacct:/\n0::/\n");
        assert!(own.contains(&("memory".into(), "/process_api/x".into())));
        assert!(own.contains(&("cpuacct".into(), "/".into())));
    }

    #[test]
    fn counters_are_read_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("memory.oom_control");
        std::fs::write(&f, "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n").unwrap();
        assert_eq!(read_counter(&f, "oom_kill"), Some(2));
        assert_eq!(read_counter(&f, "nope"), None);
        assert_eq!(cpu_quota_us(0.5), 50_000);
        assert_eq!(cpu_quota_us(0.001), MIN_CPU_QUOTA_US);
    }
}
