//! What confines a process task on its node: the unprivileged user it runs as, its own
//! view of `/proc`, and the cgroups it is put in.
//!
//! All of it is applied by the task's first process itself, between fork and exec (or by
//! the shim for the program it runs), while it still has the agent's privileges: it
//! joins its cgroups, gets a mount namespace with a `/proc` that shows only its own
//! user's processes, and then drops to its user with no supplementary groups. Everything
//! it starts later inherits all three, so nothing it starts escapes them.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The unprivileged identity a task runs as. The agent gives each task a uid of its own
/// and a private group with the same number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TaskUser {
    pub uid: u32,
    pub gid: u32,
}

impl TaskUser {
    /// A task user whose private group has the same number as the user.
    pub fn private(uid: u32) -> TaskUser {
        TaskUser { uid, gid: uid }
    }
}

/// Everything a task's first process does to confine itself before it runs the task's
/// program, prepared before the fork so that the child only makes system calls.
#[derive(Clone, Debug, Default)]
pub(crate) struct Confinement {
    /// `cgroup.procs` files the process writes itself into.
    cgroup_procs: Vec<CString>,
    /// Whether it mounts its own `/proc` that hides other users' processes.
    hide_proc: bool,
    /// The user it becomes, with no supplementary groups.
    user: Option<TaskUser>,
}

impl Confinement {
    pub(crate) fn new(
        cgroup_procs: &[PathBuf],
        hide_proc: bool,
        user: Option<TaskUser>,
    ) -> io::Result<Confinement> {
        let cgroup_procs = cgroup_procs
            .iter()
            .map(|p| c_path(p))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Confinement {
            cgroup_procs,
            hide_proc,
            user,
        })
    }

    /// Applies the confinement to the calling process.
    ///
    /// # Safety
    ///
    /// Meant for the child between fork and exec: it only makes async-signal-safe system
    /// calls on data prepared beforehand, and allocates nothing. It changes the calling
    /// process's cgroups, mount namespace and credentials for good, so it must only be
    /// called in a process that exists to run a task.
    pub(crate) unsafe fn enter(&self) -> io::Result<()> {
        for file in &self.cgroup_procs {
            // SAFETY: `file` is a valid NUL-terminated path; open, write and close are
            // async-signal-safe. "0" names the writing process itself.
            unsafe {
                let fd = libc::open(file.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                let err = io::Error::last_os_error();
                libc::close(fd);
                if written != 1 {
                    return Err(err);
                }
            }
        }
        if self.hide_proc {
            // SAFETY: as above, plain system calls on static NUL-terminated strings.
            unsafe { mount_hidden_proc()? };
        }
        if let Some(user) = self.user {
            // SAFETY: as above. The group goes first: once the uid is dropped, the
            // process may no longer change its groups.
            unsafe {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(user.gid) != 0
                    || libc::setuid(user.uid) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
        }
        Ok(())
    }

    /// The shim's arguments that make it apply this confinement: the cgroups to itself
    /// (so the shim is in them too), the rest to the program it runs.
    pub(crate) fn shim_args(&self) -> Vec<std::ffi::OsString> {
        let mut args = Vec::new();
        for file in &self.cgroup_procs {
            args.push("--cgroup".into());
            args.push(std::ffi::OsStr::from_bytes(file.as_bytes()).to_owned());
        }
        if self.hide_proc {
            args.push("--hide-proc".into());
        }
        if let Some(user) = self.user {
            args.push("--user".into());
            args.push(format!("{}:{}", user.uid, user.gid).into());
        }
        args
    }

    /// Parses one of [`Confinement::shim_args`]'s options at the front of `args`;
    /// returns how many arguments it took, or `None` when the first is not one.
    pub(crate) fn parse_shim_option(&mut self, args: &[String]) -> Result<Option<usize>, String> {
        match args {
            [flag, file, ..] if flag == "--cgroup" => {
                self.cgroup_procs
                    .push(c_path(Path::new(file)).map_err(|e| e.to_string())?);
                Ok(Some(2))
            }
            [flag, ..] if flag == "--hide-proc" => {
                self.hide_proc = true;
                Ok(Some(1))
            }
            [flag, ids, ..] if flag == "--user" => {
                let parsed = ids.split_once(':').and_then(|(u, g)| {
                    Some(TaskUser {
                        uid: u.parse().ok()?,
                        gid: g.parse().ok()?,
                    })
                });
                match parsed {
                    Some(user) => {
                        self.user = Some(user);
                        Ok(Some(2))
                    }
                    None => Err(format!("--user {ids:?}: expected UID:GID")),
                }
            }
            _ => Ok(None),
        }
    }

    /// The same confinement without its cgroups: what the shim, already in them, applies
    /// to its program.
    pub(crate) fn without_cgroups(&self) -> Confinement {
        Confinement {
            cgroup_procs: Vec::new(),
            hide_proc: self.hide_proc,
            user: self.user,
        }
    }

    /// The confinement's cgroups alone: what the shim applies to itself.
    pub(crate) fn cgroups_only(&self) -> Confinement {
        Confinement {
            cgroup_procs: self.cgroup_procs.clone(),
            hide_proc: false,
            user: None,
        }
    }
}

/// Gives the calling process a mount namespace of its own whose `/proc` shows only the
/// processes of its own user.
///
/// # Safety
///
/// Async-signal-safe; see [`Confinement::enter`].
unsafe fn mount_hidden_proc() -> io::Result<()> {
    let root = c"/";
    let proc_dir = c"/proc";
    let proc_type = c"proc";
    // Hides every other user's processes (Linux 5.8 and later).
    let options = c"hidepid=invisible";
    // SAFETY: plain system calls with valid NUL-terminated strings.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(io::Error::last_os_error());
        }
        // Private first, so the new mount stays in this namespace instead of propagating
        // back to the host's.
        if libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        if libc::mount(
            proc_type.as_ptr(),
            proc_dir.as_ptr(),
            proc_type.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            options.as_ptr().cast(),
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn c_path(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} contains a NUL byte", p.display()),
        )
    })
}

/// Whether this process may give a task its own hidden `/proc`: it tries, once, in a
/// short-lived child. Needs root (CAP_SYS_ADMIN) and a kernel with `hidepid=invisible`;
/// some containers forbid mounts even to root.
pub fn can_hide_proc() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return false;
    }
    use std::os::unix::process::CommandExt;
    let Some(true_bin) = ["/bin/true", "/usr/bin/true"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
    else {
        return false;
    };
    let mut cmd = std::process::Command::new(true_bin);
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: the closure only makes async-signal-safe system calls.
    unsafe {
        cmd.pre_exec(|| mount_hidden_proc());
    }
    match cmd.status() {
        Ok(status) => status.success(),
        Err(e) => {
            tracing::info!("tasks cannot get a /proc of their own here: {e}");
            false
        }
    }
}
