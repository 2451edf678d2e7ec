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
pub mod platform;
pub mod protocol;
pub mod quantity;
pub mod spec;
pub mod state;

pub use ids::{JobId, NodeId, ProjectId, TaskId};
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
