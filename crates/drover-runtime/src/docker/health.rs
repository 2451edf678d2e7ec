//! Health probes for containers: HTTP and TCP against the host port published for the
//! probed container port, and commands run inside the container with `docker exec`.

use super::engine::call;
use bollard::Docker;
use bollard::exec::{CreateExecOptions, StartExecOptions};
use drover_core::spec::HealthCheck;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How often a running probe command is checked for having finished.
const EXEC_POLL: Duration = Duration::from_millis(50);

/// How long a TCP probe waits, after connecting, to see whether the connection is cut
/// at once. Docker's userland proxy accepts every connection to a published port and
/// closes it straight away when nothing listens in the container, so a bare connect
/// would pass before the task listens.
const TCP_SETTLE: Duration = Duration::from_millis(150);

/// One probe, resolved to where it goes.
#[derive(Clone, Debug)]
pub(super) enum Probe {
    Http {
        /// The probed container port, for messages.
        port: u16,
        /// The host address published for it, where the probe goes.
        addr: SocketAddr,
        path: String,
    },
    Tcp {
        port: u16,
        addr: SocketAddr,
    },
    Command(Vec<String>),
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Probe::Http { port, addr, path } => {
                write!(
                    f,
                    "HTTP GET {path} on container port {port}, published at {addr}"
                )
            }
            Probe::Tcp { port, addr } => {
                write!(
                    f,
                    "TCP connect to container port {port}, published at {addr}"
                )
            }
            Probe::Command(argv) => write!(f, "command {argv:?}"),
        }
    }
}

impl Probe {
    /// Resolves the health check's probe; `host_port` maps a container port to the host
    /// port published for it.
    pub fn resolve(
        check: &HealthCheck,
        ip: IpAddr,
        host_port: impl Fn(u16) -> Option<u16>,
    ) -> Result<Probe, String> {
        let published =
            |port: u16, kind: &str| {
                host_port(port).map(|p| SocketAddr::new(ip, p)).ok_or_else(|| {
                format!(
                    "health.{kind}.port {port} has no published host port; list it in ports \
                     so the Docker runtime can probe it"
                )
            })
            };
        if let Some(http) = &check.http {
            Ok(Probe::Http {
                port: http.port,
                addr: published(http.port, "http")?,
                path: http.path.clone(),
            })
        } else if let Some(tcp) = &check.tcp {
            Ok(Probe::Tcp {
                port: tcp.port,
                addr: published(tcp.port, "tcp")?,
            })
        } else if !check.command.is_empty() {
            Ok(Probe::Command(check.command.clone()))
        } else {
            Err("health: give one of http, tcp or command".into())
        }
    }

    /// Runs the probe once, within `timeout`; the error says why it did not pass.
    pub async fn run(
        &self,
        docker: &Docker,
        address: &str,
        container: &str,
        timeout: Duration,
    ) -> Result<(), String> {
        let attempt = async {
            match self {
                Probe::Http { addr, path, .. } => http_probe(*addr, path).await,
                Probe::Tcp { addr, .. } => tcp_probe(*addr).await,
                Probe::Command(argv) => {
                    command_probe(docker, address, container, argv, timeout).await
                }
            }
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(format!(
                "no answer within the probe timeout of {:.1}s",
                timeout.as_secs_f64()
            )),
        }
    }
}

async fn http_probe(addr: SocketAddr, path: &str) -> Result<(), String> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    // HTTP/1.0 with `Connection: close`: the answer's status line is all that is needed.
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: drover-health\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("cannot send the request: {e}"))?;
    let mut head = Vec::with_capacity(128);
    let mut buf = [0u8; 256];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 1024 {
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| format!("cannot read the answer: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    if head.is_empty() {
        return Err("the connection was closed without an answer".into());
    }
    let text = String::from_utf8_lossy(&head);
    let line = text.lines().next().unwrap_or_default();
    let status: Option<u16> = line
        .strip_prefix("HTTP/")
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok());
    match status {
        Some(code) if (200..400).contains(&code) => Ok(()),
        Some(code) => Err(format!("answered with status {code}")),
        None => Err(format!("the answer is not HTTP: {line:?}")),
    }
}

async fn tcp_probe(addr: SocketAddr) -> Result<(), String> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let mut buf = [0u8; 1];
    match tokio::time::timeout(TCP_SETTLE, stream.read(&mut buf)).await {
        // Still open with nothing said, or a greeting: something listens.
        Err(_) | Ok(Ok(1..)) => Ok(()),
        Ok(Ok(_)) => {
            Err("the connection was closed at once (nothing listens in the container)".into())
        }
        Ok(Err(e)) => Err(format!("the connection failed: {e}")),
    }
}

async fn command_probe(
    docker: &Docker,
    address: &str,
    container: &str,
    argv: &[String],
    timeout: Duration,
) -> Result<(), String> {
    let exec = call(
        address,
        timeout,
        docker.create_exec(
            container,
            CreateExecOptions {
                cmd: Some(argv.to_vec()),
                attach_stdout: Some(false),
                attach_stderr: Some(false),
                ..Default::default()
            },
        ),
    )
    .await
    .map_err(|e| format!("cannot create the exec: {e}"))?;
    call(
        address,
        timeout,
        docker.start_exec(
            &exec.id,
            Some(StartExecOptions {
                detach: true,
                ..Default::default()
            }),
        ),
    )
    .await
    .map_err(|e| format!("cannot start the command: {e}"))?;
    // The caller's timeout bounds this loop. A command still running then is left to
    // finish on its own: the engine has no way to kill an exec.
    loop {
        let info = call(address, timeout, docker.inspect_exec(&exec.id))
            .await
            .map_err(|e| format!("cannot inspect the command: {e}"))?;
        if info.running != Some(true) {
            return match info.exit_code {
                Some(0) => Ok(()),
                Some(code) => Err(format!("exited with code {code}")),
                None => Err("ended without an exit code".into()),
            };
        }
        tokio::time::sleep(EXEC_POLL).await;
    }
}
