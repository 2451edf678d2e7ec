//! A pool of emptied task directories, reused instead of deleted and created again.
//!
//! Every short task used to cost a directory and half a dozen files created, then
//! deleted. On ext4, creating an inode scans past every inode freed in the last few
//! seconds in the same block group (`recently_deleted`); with thousands of short tasks
//! that scan took a third of the agent's CPU. A finished task's directory is therefore
//! emptied (the files every task has are truncated and kept, anything else the task
//! left is removed) and parked under `.free/`; the next task takes it with one rename.
//! In steady state a task start allocates no inode at all.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Files nearly every task has; they are truncated, not removed, when a directory is
/// recycled, so the next task reuses their inodes. Runtimes must treat an empty one as
/// absent.
const KEPT: &[&str] = &[
    "task.json",
    "stdout.log",
    "stderr.log",
    "pid",
    "exit-status",
];

/// The name of the pool's directory inside the tasks directory. Names starting with a
/// dot are never task ids.
pub const FREE_DIR: &str = ".free";

pub struct DirPool {
    free_root: PathBuf,
    free: Mutex<Vec<PathBuf>>,
    next: AtomicU64,
    /// At most this many directories are parked; more are deleted.
    cap: usize,
}

impl DirPool {
    /// Opens the pool in `tasks_dir`, adopting directories parked by an earlier agent.
    pub fn open(tasks_dir: &Path, cap: usize) -> io::Result<DirPool> {
        let free_root = tasks_dir.join(FREE_DIR);
        std::fs::create_dir_all(&free_root)?;
        let mut free = Vec::new();
        let mut next = 0u64;
        for e in std::fs::read_dir(&free_root)?.flatten() {
            let path = e.path();
            if let Some(n) = e.file_name().to_str().and_then(|n| n.parse::<u64>().ok()) {
                next = next.max(n + 1);
                free.push(path);
            } else {
                // Not one of ours (a rename cut short, say): it cannot be trusted empty.
                crate::cleanup::remove_dir_all(&path, "a directory the pool cannot trust");
            }
        }
        free.truncate(cap);
        Ok(DirPool {
            free_root,
            free: Mutex::new(free),
            next: AtomicU64::new(next),
            cap,
        })
    }

    fn free(&self) -> std::sync::MutexGuard<'_, Vec<PathBuf>> {
        self.free.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn parked(&self) -> usize {
        self.free().len()
    }

    /// Makes `dest` an empty task directory: a parked one renamed into place when there
    /// is one, else a new one.
    pub fn take(&self, dest: &Path) -> io::Result<()> {
        while let Some(dir) = self.free().pop() {
            match std::fs::rename(&dir, dest) {
                Ok(()) => return Ok(()),
                // Gone or unusable: try the next, and in the end make a new one.
                Err(e) => tracing::debug!("reusing {}: {e}", dir.display()),
            }
        }
        std::fs::create_dir_all(dest)
    }

    /// Empties a finished task's directory and parks it, or deletes it when the pool is
    /// full or emptying fails.
    pub fn give(&self, dir: &Path) {
        if self.parked() >= self.cap {
            crate::cleanup::remove_dir_all(dir, "a finished task's directory");
            return;
        }
        match empty_for_reuse(dir) {
            Ok(()) => {}
            // A task that failed before it had a directory has none to give.
            Err(_) if matches!(std::fs::symlink_metadata(dir), Err(e) if e.kind() == io::ErrorKind::NotFound) =>
            {
                return;
            }
            Err(e) => {
                tracing::warn!(
                    "emptying {} for reuse: {e}; deleting it instead",
                    dir.display()
                );
                crate::cleanup::remove_dir_all(dir, "a finished task's directory");
                return;
            }
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let parked = self.free_root.join(n.to_string());
        match std::fs::rename(dir, &parked) {
            Ok(()) => self.free().push(parked),
            Err(e) => {
                tracing::warn!(
                    "parking {} for reuse: {e}; deleting it instead",
                    dir.display()
                );
                crate::cleanup::remove_dir_all(dir, "a finished task's directory");
            }
        }
    }
}

/// Truncates the kept files and removes everything else in `dir`. Only regular files
/// are truncated: a task could have replaced `stdout.log` with a symlink, and opening
/// that for writing would truncate whatever it points at.
fn empty_for_reuse(dir: &Path) -> io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let path = e.path();
        let ty = e.file_type()?;
        let kept = e.file_name().to_str().is_some_and(|n| KEPT.contains(&n));
        if kept && ty.is_file() {
            let f = std::fs::OpenOptions::new().write(true).open(&path)?;
            if f.metadata()?.len() > 0 {
                f.set_len(0)?;
            }
        } else if ty.is_dir() {
            std::fs::remove_dir_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_recycled_directory_keeps_its_file_inodes_but_nothing_of_their_content() {
        let root = tempfile::tempdir().unwrap();
        let pool = DirPool::open(root.path(), 4).unwrap();
        let a = root.path().join("task-a");
        pool.take(&a).unwrap();
        std::fs::write(a.join("stdout.log"), "secret output").unwrap();
        std::fs::write(a.join("left-behind.txt"), "junk").unwrap();
        std::fs::create_dir(a.join("cache")).unwrap();
        std::fs::write(a.join("cache/x"), "junk").unwrap();
        // A symlink named like a kept file must be removed, not followed.
        let outside = root.path().join("outside.txt");
        std::fs::write(&outside, "keep me").unwrap();
        std::os::unix::fs::symlink(&outside, a.join("stderr.log")).unwrap();
        let inode = std::fs::metadata(a.join("stdout.log")).unwrap().ino();

        pool.give(&a);
        assert!(!a.exists());
        assert_eq!(pool.parked(), 1);
        let b = root.path().join("task-b");
        pool.take(&b).unwrap();
        let names: Vec<String> = std::fs::read_dir(&b)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["stdout.log".to_string()]);
        assert_eq!(std::fs::read(b.join("stdout.log")).unwrap(), b"");
        assert_eq!(
            std::fs::metadata(b.join("stdout.log")).unwrap().ino(),
            inode
        );
        assert_eq!(std::fs::read_to_string(&outside).unwrap(), "keep me");
    }

    #[test]
    fn parked_directories_survive_a_restart_and_the_cap_holds() {
        let root = tempfile::tempdir().unwrap();
        let pool = DirPool::open(root.path(), 2).unwrap();
        for i in 0..3 {
            let d = root.path().join(format!("t{i}"));
            pool.take(&d).unwrap();
            pool.give(&d);
        }
        // Each give followed a take of the same parked directory, so one is parked.
        assert_eq!(pool.parked(), 1);
        let dirs: Vec<PathBuf> = (0..3).map(|i| root.path().join(format!("u{i}"))).collect();
        for d in &dirs {
            std::fs::create_dir(d).unwrap();
        }
        for d in &dirs {
            pool.give(d);
        }
        assert_eq!(pool.parked(), 2, "the pool never holds more than its cap");
        drop(pool);
        let again = DirPool::open(root.path(), 2).unwrap();
        assert_eq!(again.parked(), 2);
        let d = root.path().join("v");
        again.take(&d).unwrap();
        assert!(d.is_dir());
        assert_eq!(again.parked(), 1);
    }
}
