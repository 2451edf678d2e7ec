//! Drover's core vocabulary: identifiers, job specs, the task state machine and the
//! messages that cross the wire between the CLI, the controller and the agents.
//!
//! This crate performs no I/O. Everything here is plain data plus the pure rules that
//! govern it, so every other crate can depend on it and tests can exercise the rules
//! without starting anything.

pub mod api;
pub mod artifact;
pub mod auth;
pub mod ids;
pub mod logtime;
pub mod pipeline;
pub mod plane;
pub mod platform;
pub mod protocol;
pub mod quantity;
pub mod spec;
pub mod state;
pub mod symlinks;

pub use ids::{JobId, NodeId, ProjectId, TaskId};

/// This build's version, as Cargo knows it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub use spec::{JobKind, JobSpec, RuntimeKind, SpecError};
pub use state::TaskState;

/// Milliseconds since the Unix epoch, the one timestamp format used on the wire and in
/// the store, so that no crate has to agree on a time library.
pub type Millis = i64;

/// The current wall-clock time in milliseconds since the Unix epoch.
pub fn now_millis() -> Millis {
    // A clock before 1970 is a broken machine; treating it as the epoch keeps every
    // timestamp non-negative instead of panicking.
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

/// A duration in [`Millis`], saturating at `Millis::MAX` instead of wrapping, so that
/// `timestamp.saturating_add(duration_millis(d))` is never earlier than `timestamp`.
pub fn duration_millis(d: std::time::Duration) -> Millis {
    Millis::try_from(d.as_millis()).unwrap_or(Millis::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn duration_millis_saturates_instead_of_wrapping() {
        assert_eq!(duration_millis(Duration::from_millis(1500)), 1500);
        assert_eq!(duration_millis(Duration::from_secs(u64::MAX)), Millis::MAX);
        assert_eq!(
            now_millis().saturating_add(duration_millis(Duration::MAX)),
            Millis::MAX
        );
    }
}
