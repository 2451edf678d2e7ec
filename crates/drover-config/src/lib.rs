//! Reads the config object a Drover job ships with its tasks.
//!
//! A job's `runtime_env.config` (any YAML or JSON object) reaches each of its tasks as a
//! JSON file whose path is in the `DROVER_CONFIG` variable, and over the task socket
//! (`DROVER_SOCKET`) the agent serves to each process task. This crate is the one call a
//! task needs ([`load`] from the file, [`load_from_socket`] from the agent):
//!
//! ```no_run
//! #[derive(serde::Deserialize)]
//! struct Settings {
//!     greeting: String,
//!     retries: u32,
//! }
//! let settings: Settings = drover_config::load().expect("the job's config");
//! println!("{}", settings.greeting);
//! ```
//!
//! It depends on nothing of Drover's, so a task's program pulls in only serde.

use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};

/// The variable holding the config file's path.
pub const ENV_VAR: &str = "DROVER_CONFIG";

/// The variable holding the task socket's path.
pub const SOCKET_VAR: &str = "DROVER_SOCKET";

/// Why the config could not be read. Each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "{ENV_VAR} is not set: this program is not running as a Drover task, or its job has no runtime_env.config"
    )]
    NotSet,
    #[error("reading the job's config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the job's config {path} does not fit the expected type: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{SOCKET_VAR} is not set: this program is not running as a Drover process task")]
    NoSocket,
    #[error("asking the task socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the task socket {path} answered: {message}")]
    Refused { path: PathBuf, message: String },
}

/// Reads the job's config into `T` (any type serde can deserialize, or
/// `serde_json::Value` to take it as it is).
pub fn load<T: DeserializeOwned>() -> Result<T, ConfigError> {
    let path = std::env::var_os(ENV_VAR).ok_or(ConfigError::NotSet)?;
    load_from(Path::new(&path))
}

/// Like [`load`], but `None` when the job has no config (the variable is not set).
pub fn load_optional<T: DeserializeOwned>() -> Result<Option<T>, ConfigError> {
    match load() {
        Err(ConfigError::NotSet) => Ok(None),
        other => other.map(Some),
    }
}

/// Reads a config file at `path`; for tests of a task's program, say.
pub fn load_from<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let bytes = std::fs::read(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|source| ConfigError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

/// Asks the agent for the job's config over the task socket (`DROVER_SOCKET`), and
/// reads it into `T`. A job without a config gives JSON `null`, which an `Option<T>`
/// takes as `None`.
pub fn load_from_socket<T: DeserializeOwned>() -> Result<T, ConfigError> {
    let path = std::env::var_os(SOCKET_VAR).ok_or(ConfigError::NoSocket)?;
    load_from_socket_at(Path::new(&path))
}

/// Like [`load_from_socket`], with the socket's path given.
pub fn load_from_socket_at<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    use std::io::{BufRead, Write};
    let io = |source| ConfigError::Socket {
        path: path.to_path_buf(),
        source,
    };
    let mut stream = std::os::unix::net::UnixStream::connect(path).map_err(io)?;
    // The agent answers at once; a bound keeps a wedged one from hanging the task.
    let limit = Some(std::time::Duration::from_secs(10));
    stream.set_read_timeout(limit).map_err(io)?;
    stream.set_write_timeout(limit).map_err(io)?;
    stream.write_all(b"{\"op\":\"config\"}\n").map_err(io)?;
    let mut line = String::new();
    std::io::BufReader::new(stream)
        .read_line(&mut line)
        .map_err(io)?;
    let reply: serde_json::Value =
        serde_json::from_str(&line).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
    if reply["ok"] != serde_json::Value::Bool(true) {
        return Err(ConfigError::Refused {
            path: path.to_path_buf(),
            message: reply["error"]
                .as_str()
                .unwrap_or("no reason given")
                .to_string(),
        });
    }
    serde_json::from_value(reply["config"].clone()).map_err(|source| ConfigError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Deserialize)]
    struct Settings {
        name: String,
        sizes: Vec<u32>,
    }

    #[test]
    fn reads_a_typed_config_and_names_the_file_when_it_does_not_fit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, r#"{"name":"ünï","sizes":[1,2,3]}"#).unwrap();
        let s: Settings = load_from(&path).unwrap();
        assert_eq!(
            s,
            Settings {
                name: "ünï".into(),
                sizes: vec![1, 2, 3]
            }
        );
        std::fs::write(&path, r#"{"name":1}"#).unwrap();
        let err = load_from::<Settings>(&path).unwrap_err().to_string();
        assert!(
            err.contains("config.json") && err.contains("expected"),
            "{err}"
        );
        let err = load_from::<Settings>(&dir.path().join("missing.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.json"), "{err}");
    }
}
