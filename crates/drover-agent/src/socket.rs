//! The task socket: a Unix socket per process task, named by `DROVER_SOCKET`, over which
//! the task asks its agent for what concerns it. The protocol is one JSON object per
//! line each way (docs/task-socket.md); today it answers `config` and `info`, and it is
//! where readiness and the pipeline data protocol will go.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

/// The variable naming the socket's path in a task's environment.
pub const ENV_VAR: &str = "DROVER_SOCKET";

/// The socket's name inside the task's directory.
pub const SOCKET_FILE: &str = "drover.sock";

/// A Unix socket path must fit in `sun_path` (108 bytes on Linux, with its NUL); a task
/// directory deeper than this gets its socket in a short directory under the system's
/// temporary directory instead.
const MAX_SOCKET_PATH: usize = 100;

/// The longest request line; anything longer is refused and the connection closed.
pub const MAX_REQUEST: usize = 64 << 10;

/// How many connections one task may hold open at once.
pub const MAX_CONNECTIONS: usize = 16;

/// Where the socket of the task whose directory is `dir` lives. The same task always
/// gets the same path, so an agent that adopts a running task serves it where the task
/// was told to look.
pub fn socket_path(dir: &Path) -> PathBuf {
    let inside = dir.join(SOCKET_FILE);
    if inside.as_os_str().len() <= MAX_SOCKET_PATH {
        return inside;
    }
    use sha2::Digest;
    let hash = hex::encode(sha2::Sha256::digest(dir.as_os_str().as_encoded_bytes()));
    std::env::temp_dir()
        .join("drover-sockets")
        .join(format!("{}.sock", &hash[..32]))
}

/// The directory, holding nothing but the task's socket, that is bound into a task's
/// container. A directory rather than the socket file: a bind of a file keeps the file
/// it found, so after an agent restart replaced the socket the container would still
/// see the old one; a bound directory shows whatever is in it now. The directory stays
/// while the agent is away (a removed one would leave the container bound to it); it
/// goes with the task directory.
pub fn container_socket_dir(dir: &Path) -> PathBuf {
    let inside = dir.join(CONTAINER_SOCKET_DIR);
    if inside.join(SOCKET_FILE).as_os_str().len() <= MAX_SOCKET_PATH {
        return inside;
    }
    use sha2::Digest;
    let hash = hex::encode(sha2::Sha256::digest(dir.as_os_str().as_encoded_bytes()));
    std::env::temp_dir()
        .join("drover-sockets")
        .join(&hash[..32])
}

/// The name of that directory in the task directory, and where it appears under the
/// container's `/run/drover`.
pub const CONTAINER_SOCKET_DIR: &str = "socket";

/// What the socket tells its task.
#[derive(Clone, Debug, Serialize)]
pub struct TaskFacts {
    pub task_id: String,
    pub job: String,
    pub job_id: String,
    pub project: String,
    pub index: u32,
    pub attempt: u32,
    /// The job's runtime_env.config, or nothing.
    #[serde(skip)]
    pub config: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum Request {
    Config,
    Info,
}

/// A served socket. Dropping it stops the server, closes its connections and removes
/// the socket file.
pub struct TaskSocket {
    path: PathBuf,
    stop: CancellationToken,
}

impl TaskSocket {
    /// Binds the socket at `path` (replacing a stale file from an earlier agent) and
    /// serves it until dropped.
    pub fn bind(path: &Path, facts: TaskFacts) -> std::io::Result<TaskSocket> {
        TaskSocket::bind_with(path, facts, None)
    }

    /// [`TaskSocket::bind`] for a pipeline vertex's replica, whose program may switch a
    /// connection to the data protocol, served by `data`.
    pub fn bind_with(
        path: &Path,
        facts: TaskFacts,
        data: Option<Arc<DataEndpoint>>,
    ) -> std::io::Result<TaskSocket> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(path)?;
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, Arc::new(facts), data, stop.clone()));
        Ok(TaskSocket {
            path: path.to_path_buf(),
            stop,
        })
    }
}

impl TaskSocket {
    /// Lets only `uid` (the task's own user) connect: the socket becomes theirs, with
    /// no access for anyone else. Connecting needs write permission on the socket.
    pub fn restrict_to(&self, uid: u32, gid: u32) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::os::unix::fs::lchown(&self.path, Some(uid), Some(gid))?;
        std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o600))
    }
}

impl Drop for TaskSocket {
    fn drop(&mut self) {
        self.stop.cancel();
        crate::cleanup::remove_file(&self.path, "the task socket");
    }
}

/// What a vertex replica's data connections are served with: the role its program
/// must announce, and the buffers it reads and writes.
pub struct DataEndpoint {
    pub role: drover_pipeline::proto::Role,
    pub plane: crate::dataplane::Plane,
}

async fn serve(
    listener: UnixListener,
    facts: Arc<TaskFacts>,
    data: Option<Arc<DataEndpoint>>,
    stop: CancellationToken,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let conn = tokio::select! {
            _ = stop.cancelled() => return,
            c = listener.accept() => c,
        };
        let mut stream = match conn {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("task socket: accepting a connection: {e}");
                // An error here (too many open files) is usually brief; pausing keeps a
                // persistent one from spinning.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            let msg = error_line(&format!(
                "too many connections: a task may hold at most {MAX_CONNECTIONS} open"
            ));
            tokio::spawn(async move {
                if stream.write_all(&msg).await.is_err() {
                    // The task already closed the connection it was being refused on,
                    // so there is nobody left to tell.
                }
            });
            continue;
        };
        let facts = facts.clone();
        let data = data.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            connection(stream, &facts, data.as_deref(), &stop).await;
            drop(permit);
        });
    }
}

fn error_line(message: &str) -> Vec<u8> {
    let mut v = serde_json::to_vec(&serde_json::json!({ "ok": false, "error": message }))
        .unwrap_or_default();
    v.push(b'\n');
    v
}

fn answer(facts: &TaskFacts, line: &[u8]) -> Vec<u8> {
    let req: Request = match serde_json::from_slice(line) {
        Ok(r) => r,
        Err(e) => {
            return error_line(&format!(
                "bad request: {e}; expected one JSON object per line, such as {{\"op\":\"config\"}} or {{\"op\":\"info\"}}"
            ));
        }
    };
    let value = match req {
        Request::Config => serde_json::json!({
            "ok": true,
            "format": drover_core::protocol::CONFIG_FORMAT_JSON,
            "config": facts.config,
        }),
        Request::Info => {
            let mut v = serde_json::to_value(facts).unwrap_or_default();
            v["ok"] = true.into();
            v
        }
    };
    let mut out = serde_json::to_vec(&value).unwrap_or_default();
    out.push(b'\n');
    out
}

async fn connection(
    stream: UnixStream,
    facts: &TaskFacts,
    data: Option<&DataEndpoint>,
    stop: &CancellationToken,
) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        // Reading through `take` bounds a line without a newline to MAX_REQUEST + 1
        // bytes of memory.
        let mut limited = (&mut reader).take(MAX_REQUEST as u64 + 1);
        let read = tokio::select! {
            _ = stop.cancelled() => return,
            r = limited.read_until(b'\n', &mut line) => r,
        };
        let Ok(n) = read else { return };
        if n == 0 {
            return;
        }
        if line.len() > MAX_REQUEST {
            let msg = error_line(&format!(
                "request longer than {MAX_REQUEST} bytes; closing the connection"
            ));
            if write.write_all(&msg).await.is_err() {
                // The task already closed the connection being closed on it, so there
                // is nobody left to tell.
            }
            return;
        }
        let trimmed = line.trim_ascii();
        if trimmed.is_empty() {
            continue;
        }
        if wants_data(trimmed) {
            // The rest of the connection is the data protocol's; what the reader has
            // buffered past this line belongs to it.
            let stream = tokio::io::join(reader, write);
            data_connection(trimmed, stream, data, stop).await;
            return;
        }
        let reply = answer(facts, trimmed);
        let answered = tokio::select! {
            _ = stop.cancelled() => return,
            r = write.write_all(&reply) => r,
        };
        if answered.is_err() {
            return;
        }
    }
}

/// Whether a request line asks to switch to the data protocol (`"op":"data"`).
fn wants_data(line: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Op<'a> {
        #[serde(borrow)]
        op: std::borrow::Cow<'a, str>,
    }
    serde_json::from_slice::<Op>(line).is_ok_and(|o| o.op == "data")
}

/// Answers a data handshake and, when it is accepted, serves the data protocol on the
/// connection until it ends. A replica whose data plane fails is reported in the
/// agent's log; its program sees the connection close and its task ends by itself.
async fn data_connection<S>(
    line: &[u8],
    mut stream: S,
    data: Option<&DataEndpoint>,
    stop: &CancellationToken,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    use drover_pipeline::proto::{self, Hello, HelloReply};
    let refuse = |error: String| HelloReply::Refused { error }.to_line();
    let (reply, hello) = match (Hello::parse(line), data) {
        (Err(e), _) => (refuse(e.to_string()), None),
        (Ok(_), None) => (
            refuse(
                "this task is not a pipeline vertex's replica, so it has no data to serve".into(),
            ),
            None,
        ),
        (Ok(h), Some(_)) if h.version != proto::VERSION => (
            refuse(format!(
                "data protocol version {} is not spoken here; this agent speaks version {}",
                h.version,
                proto::VERSION
            )),
            None,
        ),
        (Ok(h), Some(d)) if h.role != d.role => (
            refuse(format!(
                "the program connected as a {}, but this vertex is a {}",
                h.role, d.role
            )),
            None,
        ),
        (Ok(h), Some(d)) => (
            HelloReply::Ok {
                version: proto::VERSION,
                max_batch: d.plane.config.max_batch,
            }
            .to_line(),
            Some(h),
        ),
    };
    if stream.write_all(&reply).await.is_err() {
        return;
    }
    let (Some(hello), Some(d)) = (hello, data) else {
        return;
    };
    if let Err(e) = crate::dataplane::serve(&d.plane, hello.role, d.role, stream, stop).await {
        tracing::warn!(vertex = %d.plane.identity, "data connection ended: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> TaskFacts {
        TaskFacts {
            task_id: "task-1".into(),
            job: "j".into(),
            job_id: "job-1".into(),
            project: "default".into(),
            index: 2,
            attempt: 0,
            config: Some(serde_json::json!({ "greeting": "héllo", "n": [1, 2] })),
        }
    }

    async fn ask(stream: &mut UnixStream, line: &str) -> serde_json::Value {
        stream.write_all(line.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        loop {
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte).await.unwrap();
            if byte[0] == b'\n' {
                break;
            }
            buf.push(byte[0]);
        }
        serde_json::from_slice(&buf).unwrap()
    }

    #[tokio::test]
    async fn answers_config_and_info_and_names_the_problem_with_a_bad_request() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path());
        let sock = TaskSocket::bind(&path, facts()).unwrap();
        let mut s = UnixStream::connect(&path).await.unwrap();
        let v = ask(&mut s, "{\"op\":\"config\"}\n").await;
        assert_eq!(v["ok"], true);
        assert_eq!(v["config"], facts().config.unwrap());
        // Several requests on one connection, blank lines skipped.
        let v = ask(&mut s, "\n{\"op\":\"info\"}\n").await;
        assert_eq!(
            (v["task_id"].as_str(), v["index"].as_u64()),
            (Some("task-1"), Some(2))
        );
        let v = ask(&mut s, "{\"op\":\"launch\"}\n").await;
        assert_eq!(v["ok"], false);
        assert!(v["error"].as_str().unwrap().contains("launch"), "{v}");
        let v = ask(&mut s, "not json\n").await;
        assert!(v["error"].as_str().unwrap().contains("bad request"), "{v}");
        // Dropping the socket removes it and ends its connections.
        drop(sock);
        assert!(!path.exists());
        let mut rest = Vec::new();
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0);
    }

    #[tokio::test]
    async fn an_overlong_request_is_refused_and_connections_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path());
        let _sock = TaskSocket::bind(&path, facts()).unwrap();
        let mut s = UnixStream::connect(&path).await.unwrap();
        let long = format!("{}\n", "x".repeat(MAX_REQUEST + 10));
        let v = ask(&mut s, &long).await;
        assert!(v["error"].as_str().unwrap().contains("longer than"), "{v}");

        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let mut c = UnixStream::connect(&path).await.unwrap();
            // Each answers, so each holds a slot.
            assert_eq!(ask(&mut c, "{\"op\":\"info\"}\n").await["ok"], true);
            held.push(c);
        }
        let mut extra = UnixStream::connect(&path).await.unwrap();
        let mut text = String::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            extra.read_to_string(&mut text),
        )
        .await
        .unwrap()
        .unwrap();
        assert!(text.contains("too many connections"), "{text}");
    }

    #[test]
    fn a_deep_task_directory_gets_a_short_socket_path() {
        let short = socket_path(Path::new("/d/tasks/task-1"));
        assert_eq!(short, Path::new("/d/tasks/task-1/drover.sock"));
        let deep = Path::new("/").join("x".repeat(120));
        let p = socket_path(&deep);
        assert!(p.as_os_str().len() <= MAX_SOCKET_PATH, "{}", p.display());
        assert_eq!(p, socket_path(&deep), "the same directory, the same path");
        assert_ne!(p, socket_path(&deep.join("other")));
    }
}
