//! A fake agent for the SDKs' tests: it binds a task socket in a temporary directory,
//! starts a program (a child process, or a thread running the SDK) pointed at it with
//! `DROVER_SOCKET`, and plays the agent's side of the data protocol with the `proto`
//! module, checking every response against its request.

#![allow(dead_code)]

use drover_pipeline::proto::{self, Frame, FrameIoError, Hello, HelloReply, Outstanding, Role};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long any single step of a test may take before it fails with what it saw.
pub const STEP: Duration = Duration::from_secs(30);

pub struct Agent {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
    listener: UnixListener,
}

impl Agent {
    pub fn new() -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("drover.sock");
        let listener = UnixListener::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        Agent {
            _dir: dir,
            path,
            listener,
        }
    }

    /// Waits for the program's connection and reads its handshake line.
    pub fn accept_hello(&self) -> (Conn, Hello) {
        let deadline = Instant::now() + STEP;
        let stream = loop {
            match self.listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(
                        Instant::now() < deadline,
                        "no program connected within {STEP:?}"
                    );
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("accepting: {e}"),
            }
        };
        stream.set_nonblocking(false).unwrap();
        stream.set_read_timeout(Some(STEP)).unwrap();
        stream.set_write_timeout(Some(STEP)).unwrap();
        let writer = stream.try_clone().unwrap();
        let mut reader = BufReader::new(stream);
        let mut line = Vec::new();
        (&mut reader)
            .take(proto::MAX_HANDSHAKE_LINE as u64)
            .read_until(b'\n', &mut line)
            .unwrap();
        let hello = Hello::parse(&line).unwrap();
        let conn = Conn {
            reader,
            writer,
            scratch: Vec::new(),
            outstanding: Outstanding::new(64),
        };
        (conn, hello)
    }

    /// Accepts the program, checks it asked for `role` in version 1, and answers ok.
    pub fn accept(&self, role: Role) -> Conn {
        let (mut conn, hello) = self.accept_hello();
        assert_eq!(hello, Hello { version: 1, role });
        conn.write_raw(
            &HelloReply::Ok {
                version: 1,
                max_batch: proto::DEFAULT_MAX_BATCH,
            }
            .to_line(),
        );
        conn
    }
}

pub struct Conn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    scratch: Vec<u8>,
    outstanding: Outstanding,
}

impl Conn {
    pub fn write_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
    }

    /// Sends a request, remembering it so that its response is checked.
    pub fn send(&mut self, frame: &Frame) {
        self.outstanding.sent(frame).unwrap();
        let mut buf = Vec::new();
        proto::write_frame(&mut self.writer, frame, &mut buf).unwrap();
    }

    /// The next frame, checked against its request: `Err` with the protocol error's
    /// text when the program broke the protocol (garbage, a wrong count...), `Ok(None)`
    /// when it closed the connection. `Error` frames come back as they are.
    pub fn recv(&mut self) -> Result<Option<Frame>, String> {
        let frame = match proto::read_frame(&mut self.reader, &mut self.scratch) {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(None),
            Err(FrameIoError::Proto(e)) => return Err(e.to_string()),
            Err(FrameIoError::Io(e)) => panic!("reading from the program: {e}"),
        };
        if let Frame::Error { .. } = frame {
            return Ok(Some(frame));
        }
        self.outstanding
            .received(&frame)
            .map_err(|e| e.to_string())?;
        Ok(Some(frame))
    }

    /// The next frame, which must be a valid response or error.
    pub fn expect(&mut self) -> Frame {
        match self.recv() {
            Ok(Some(f)) => f,
            Ok(None) => panic!("the program closed the connection"),
            Err(e) => panic!("the program broke the protocol: {e}"),
        }
    }

    /// Expects an `Error` frame and returns its message.
    pub fn expect_error(&mut self) -> String {
        match self.expect() {
            Frame::Error { message } => message,
            other => panic!("expected an Error frame, got {other:?}"),
        }
    }

    /// The connection's two halves, for a test that reads and writes on separate
    /// threads (and so checks responses itself).
    pub fn into_parts(self) -> (BufReader<UnixStream>, UnixStream) {
        (self.reader, self.writer)
    }

    /// Closes the agent's side, which tells the program to stop.
    pub fn close(self) {
        drop(self);
    }
}

/// The path of one of this crate's examples, built beside the test binary.
pub fn example(name: &str) -> PathBuf {
    // Test binaries live in target/<profile>/deps; examples in target/<profile>/examples.
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name);
    assert!(
        path.exists(),
        "{} is not built: a plain `cargo test -p drover-pipeline` (or nextest) builds the examples, a run of one --test does not (`cargo build -p drover-pipeline --examples` first)",
        path.display()
    );
    path
}

/// The repository's `sdk/python` directory.
pub fn python_sdk() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../sdk/python")
        .canonicalize()
        .unwrap()
}

/// `python3` running `script` with the Python SDK importable.
pub fn python(script: &Path) -> Command {
    let mut c = Command::new("python3");
    // No bytecode caches written into the source tree by a test run.
    c.arg(script)
        .env("PYTHONPATH", python_sdk())
        .env("PYTHONDONTWRITEBYTECODE", "1");
    c
}

/// `python3` running the source code `code`, written to a file in a temporary directory.
pub fn python_code(code: &str) -> (Command, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("program.py");
    std::fs::write(&script, code).unwrap();
    (python(&script), dir)
}

/// Starts `cmd` against the agent's socket, with its output captured.
pub fn start(mut cmd: Command, agent: &Agent) -> Child {
    cmd.env("DROVER_SOCKET", &agent.path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"))
}

/// Waits (bounded) for the child to end, returning its status, stdout and stderr.
pub fn finish(mut child: Child) -> (std::process::ExitStatus, String, String) {
    let deadline = Instant::now() + STEP;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the program did not end within {STEP:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status, stdout, stderr)
}

/// A map or sink input message.
pub fn input(n: u8, key: &str, payload: &str) -> proto::InMessage {
    proto::InMessage {
        id: [n; 16],
        event_time: 1_700_000_000_000 + i64::from(n),
        key: key.as_bytes().to_vec(),
        payload: payload.as_bytes().to_vec(),
    }
}

/// A source's read request.
pub fn read(batch: u64, max: u32, wait_ms: u32) -> Frame {
    Frame::ReadRequest {
        batch,
        max,
        wait_ms,
    }
}
