//! Waiting on a task's exit status, published once by the runtime's watcher on a
//! `watch` channel, so every `wait` caller and a concurrent `stop` see the same status.
//! Shared by the process, docker and plugin runtimes.

use crate::{ExitStatus, RuntimeError};
use std::time::Duration;
use tokio::sync::watch;

/// Waits until the task's status is known. An error means the watcher went away (the
/// task was destroyed) without publishing one.
pub(crate) async fn wait_status(
    status: &mut watch::Receiver<Option<ExitStatus>>,
) -> Result<ExitStatus, RuntimeError> {
    match status.wait_for(Option::is_some).await {
        Ok(value) => Ok(value.clone().unwrap_or_else(|| {
            // `wait_for` only returns once the predicate holds.
            ExitStatus::Unknown("no status".into())
        })),
        Err(_) => Err(RuntimeError::Other(
            "the task was destroyed before its status was known".into(),
        )),
    }
}

/// Waits, at most `limit`, for the status of a task known to have ended; `what` names
/// it in the error ("the container", "task X").
pub(crate) async fn settle(
    status: &mut watch::Receiver<Option<ExitStatus>>,
    limit: Duration,
    what: &str,
) -> Result<ExitStatus, RuntimeError> {
    match tokio::time::timeout(limit, wait_status(status)).await {
        Ok(result) => result,
        Err(_) => Err(RuntimeError::Other(format!(
            "{what} ended but its status was not known within {}s",
            limit.as_secs()
        ))),
    }
}
