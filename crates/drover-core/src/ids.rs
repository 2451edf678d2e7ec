//! Newtype identifiers, so a task id can never be passed where a node id is expected.
//!
//! Ids arrive from outside (agent messages, API paths, files an agent keeps) and end up
//! in file names and log lines, so every id read through serde or [`std::str::FromStr`]
//! is checked: its own prefix, then 1 to [`MAX_ID_SUFFIX`] characters of `a-z`, `0-9`,
//! `-` and `_`. A task id like `../../etc/x` never gets past the edge.

use serde::{Deserialize, Deserializer, Serialize};
use std::fmt;

/// The longest part of an id after its prefix. Generated ids use 32 hex digits, task
/// ids 16.
pub const MAX_ID_SUFFIX: usize = 64;

/// How many hex digits of a task id tables show. Task ids are random, so a few digits
/// tell apart the tasks a person looks at, as with container ids; any unique prefix
/// names a task.
pub const SHORT_TASK_ID_DIGITS: usize = 8;

/// Why a string is not an id of the wanted kind.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "{what}: expected {prefix}- then 1 to {MAX_ID_SUFFIX} characters of a-z, 0-9, '-' or '_', got {got:?}"
)]
pub struct IdError {
    pub what: &'static str,
    pub prefix: &'static str,
    pub got: String,
}

/// Checks `s` against the id rules for `prefix`.
fn check_id(what: &'static str, prefix: &'static str, s: &str) -> Result<(), IdError> {
    let ok = s
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('-'))
        .is_some_and(|suffix| {
            !suffix.is_empty()
                && suffix.len() <= MAX_ID_SUFFIX
                && suffix
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(())
    } else {
        // A hostile value may be huge; the error quotes only its start.
        let got: String = s.chars().take(80).collect();
        Err(IdError { what, prefix, got })
    }
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $prefix:literal, $what:literal, $suffix:expr) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            /// A new, unique identifier.
            pub fn generate() -> Self {
                Self(format!("{}-{}", $prefix, $suffix))
            }

            /// Parses an id that came from outside, refusing anything but a well-formed
            /// id of this kind.
            pub fn parse(s: &str) -> Result<Self, IdError> {
                check_id($what, $prefix, s)?;
                Ok(Self(s.to_string()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;

            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        /// Wraps a string this program made or already checked, without checking it
        /// again; for anything from outside use `parse`.
        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_string())
            }
        }
    };
}

id_type!(
    /// Identifies one version of a job.
    JobId, "job", "job id", time_ordered()
);
id_type!(
    /// Identifies one placed instance of a job.
    TaskId, "task", "task id", random_hex()
);
id_type!(
    /// Identifies a node. Agents generate theirs once and keep it in their data dir.
    NodeId, "node", "node id", time_ordered()
);

/// 32 hex digits that sort by creation time.
fn time_ordered() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

/// 16 random hex digits (64 bits). Task ids are typed by people, and time-ordered ids
/// made in the same millisecond share most of their digits (the tasks of one job shared
/// 28 of 32), so they are random instead: a prefix of 8 digits almost always names one
/// task, and ordering comes from the task's `created_at`, never from its id.
fn random_hex() -> String {
    format!("{:016x}", rand::random::<u64>())
}

impl TaskId {
    /// The id as tables show it: the prefix and the first [`SHORT_TASK_ID_DIGITS`]
    /// digits of a random id. Ids made before task ids were random (32 time-ordered
    /// digits, which tasks of one job mostly share) are shown whole.
    pub fn short(&self) -> &str {
        let random = self
            .0
            .strip_prefix("task-")
            .is_some_and(|s| s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit()));
        if random {
            &self.0[..5 + SHORT_TASK_ID_DIGITS]
        } else {
            &self.0
        }
    }
}

/// A tenant. Every stored object carries one; `default` always exists.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ProjectId(pub String);

impl ProjectId {
    pub const DEFAULT: &'static str = "default";

    pub fn default_project() -> Self {
        Self(Self::DEFAULT.to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for ProjectId {
    fn default() -> Self {
        Self::default_project()
    }
}

impl fmt::Display for ProjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_unique_and_prefixed() {
        let a = TaskId::generate();
        let b = TaskId::generate();
        assert_ne!(a, b);
        assert!(a.as_str().starts_with("task-"));
        assert!(NodeId::generate().as_str().starts_with("node-"));
        assert_eq!(TaskId::parse(a.as_str()).unwrap(), a);
        assert_eq!(a.as_str().len(), "task-".len() + 16);
        assert!(JobId::generate().as_str().starts_with("job-"));
    }

    #[test]
    fn short_task_ids_cut_only_random_ones() {
        let random = TaskId::from("task-3f2a9c1b00d4e5f6");
        assert_eq!(random.short(), "task-3f2a9c1b");
        let old = TaskId::from("task-019ae3f2b8c07d11a2b3c4d5e6f70819");
        assert_eq!(old.short(), old.as_str());
        assert_eq!(TaskId::from("task-1").short(), "task-1");
    }

    #[test]
    fn ids_from_outside_are_checked_at_the_edge() {
        for good in ["task-1", "task-0193abc_x-y"] {
            assert!(TaskId::parse(good).is_ok(), "{good}");
            let json = format!("{good:?}");
            assert!(serde_json::from_str::<TaskId>(&json).is_ok(), "{json}");
        }
        let long = format!("task-{}", "a".repeat(MAX_ID_SUFFIX + 1));
        for bad in [
            "",
            "task-",
            "task",
            "node-1",
            "/tmp/x",
            "../../../../tmp/x",
            "task-../../x",
            "task-a/b",
            "task-A",
            "task-a b",
            "task-a\0",
            long.as_str(),
        ] {
            let err = TaskId::parse(bad).unwrap_err().to_string();
            assert!(err.starts_with("task id: expected task-"), "{bad}: {err}");
            let json = serde_json::to_string(bad).unwrap();
            assert!(serde_json::from_str::<TaskId>(&json).is_err(), "{json}");
        }
        assert!(NodeId::parse("node-fake-linux-amd64").is_ok());
        assert!(NodeId::parse("task-1").is_err());
        assert!(JobId::parse("job-1").is_ok());
    }
}
