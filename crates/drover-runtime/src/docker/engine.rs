//! Talking to the Docker engine: connecting, negotiating the API version, and turning
//! the client's errors into ones that say what went wrong in Drover's terms.

use crate::RuntimeError;
use bollard::Docker;
use bollard::errors::Error as BollardError;
use std::fmt;
use std::future::Future;
use std::time::Duration;

/// The engine's socket when no host is configured.
pub(super) const DEFAULT_SOCKET: &str = "/var/run/docker.sock";

/// What went wrong with one request to the engine.
#[derive(Debug)]
pub(super) enum EngineError {
    /// The engine answered 404: no such container, image or exec.
    NotFound(String),
    /// The engine answered 409, e.g. a container that is not running.
    Conflict(String),
    /// Any other answer from the engine that is an error.
    Refused { status: u16, message: String },
    /// The engine did not answer within the limit.
    Timeout { address: String, limit: Duration },
    /// The engine could not be reached, or the exchange broke off.
    Unreachable { address: String, message: String },
}

impl fmt::Display for EngineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EngineError::NotFound(m) | EngineError::Conflict(m) => f.write_str(m),
            EngineError::Refused { status, message } => {
                write!(f, "{message} (engine status {status})")
            }
            EngineError::Timeout { address, limit } => write!(
                f,
                "the Docker engine at {address} did not answer within {:.1}s",
                limit.as_secs_f64()
            ),
            EngineError::Unreachable { address, message } => {
                write!(f, "cannot reach the Docker engine at {address}: {message}")
            }
        }
    }
}

impl EngineError {
    pub(super) fn from_bollard(address: &str, e: BollardError) -> EngineError {
        match e {
            BollardError::DockerResponseServerError {
                status_code: 404,
                message,
            } => EngineError::NotFound(message),
            BollardError::DockerResponseServerError {
                status_code: 409,
                message,
            } => EngineError::Conflict(message),
            BollardError::DockerResponseServerError {
                status_code,
                message,
            } => EngineError::Refused {
                status: status_code,
                message,
            },
            // A pull reports its failure inside the progress stream rather than as a
            // status code; it is the engine's answer, not a broken connection.
            BollardError::DockerStreamError { error } => EngineError::Refused {
                status: 200,
                message: error,
            },
            other => EngineError::Unreachable {
                address: address.to_string(),
                message: other.to_string(),
            },
        }
    }

    /// Whether the engine itself is the problem (down, hung, unreachable) rather than
    /// the request.
    pub(super) fn is_unavailable(&self) -> bool {
        matches!(
            self,
            EngineError::Timeout { .. } | EngineError::Unreachable { .. }
        )
    }

    /// A runtime error for a failed step of starting a task, described by `doing`.
    pub(super) fn start(self, doing: impl fmt::Display) -> RuntimeError {
        if self.is_unavailable() {
            RuntimeError::Unavailable(format!("{doing}: {self}"))
        } else {
            RuntimeError::Start(format!("{doing}: {self}"))
        }
    }

    /// A runtime error for any other failed step, described by `doing`.
    pub(super) fn other(self, doing: impl fmt::Display) -> RuntimeError {
        if self.is_unavailable() {
            RuntimeError::Unavailable(format!("{doing}: {self}"))
        } else {
            RuntimeError::Other(format!("{doing}: {self}"))
        }
    }
}

/// Runs one request to the engine, giving up after `limit`.
pub(super) async fn call<T>(
    address: &str,
    limit: Duration,
    request: impl Future<Output = Result<T, BollardError>>,
) -> Result<T, EngineError> {
    match tokio::time::timeout(limit, request).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(EngineError::from_bollard(address, e)),
        Err(_) => Err(EngineError::Timeout {
            address: address.to_string(),
            limit,
        }),
    }
}

/// The address as shown in messages, e.g. `unix:///var/run/docker.sock`.
pub(super) fn display_address(host: Option<&str>) -> String {
    match host {
        None => format!("unix://{DEFAULT_SOCKET}"),
        Some(h) if h.starts_with('/') => format!("unix://{h}"),
        Some(h) => h.to_string(),
    }
}

/// Makes a client for `host` (no request is sent yet). `request_timeout` bounds the wait
/// for each response's headers inside the client; callers bound whole requests
/// themselves with [`call`].
pub(super) fn connect(
    host: Option<&str>,
    request_timeout: Duration,
) -> Result<Docker, EngineError> {
    let address = display_address(host);
    // The client counts whole seconds; rounding up keeps a sub-second setting from
    // becoming "no time at all".
    let secs = request_timeout.as_secs_f64().ceil().max(1.0) as u64;
    let version = bollard::API_DEFAULT_VERSION;
    let result = match host {
        None => Docker::connect_with_unix(DEFAULT_SOCKET, secs, version),
        Some(h) if h.starts_with("unix://") || h.starts_with('/') => {
            Docker::connect_with_unix(h, secs, version)
        }
        Some(h) if h.starts_with("tcp://") || h.starts_with("http://") => {
            Docker::connect_with_http(h, secs, version)
        }
        Some(h) => {
            return Err(EngineError::Unreachable {
                address,
                message: format!(
                    "unsupported Docker host {h:?}; expected unix:///path/to/docker.sock or tcp://host:port"
                ),
            });
        }
    };
    result.map_err(|e| match e {
        BollardError::SocketNotFoundError(path) => EngineError::Unreachable {
            address: address.clone(),
            message: format!("no socket at {path} (is the Docker engine running?)"),
        },
        other => EngineError::from_bollard(&address, other),
    })
}
