//! Removing what the agent no longer needs. Nothing that follows depends on whether it
//! worked, so a failure is logged, naming what was left behind and why, rather than
//! returned; something already gone is what was wanted and is not reported.

use std::io::ErrorKind;
use std::path::Path;

/// Removes the file `path`; `what` says what it is, for the log.
pub(crate) fn remove_file(path: &Path, what: &str) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => tracing::warn!("removing {what} {}: {e}", path.display()),
    }
}

/// Removes the directory `path` and everything in it; `what` says what it is, for the
/// log.
pub(crate) fn remove_dir_all(path: &Path, what: &str) {
    match std::fs::remove_dir_all(path) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => tracing::warn!("removing {what} {}: {e}", path.display()),
    }
}
