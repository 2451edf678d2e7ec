//! Serves a Drover pipeline vertex from a program: a map, a sink or a source.
//!
//! Each replica of a pipeline vertex is a task whose program is the user's code. The
//! agent on its node reads messages from the pipeline's buffers and hands them to the
//! program in batches over the task socket (`DROVER_SOCKET`), then writes the answers
//! downstream. A program calls one function, which serves until the agent closes the
//! connection:
//!
//! ```no_run
//! use drover_pipeline::Output;
//! drover_pipeline::map(|msg| vec![Output::new(msg.payload.to_ascii_uppercase())])
//!     .expect("serving the map");
//! ```
//!
//! [`sink`] takes a batch and answers each message's fate; [`source`] takes a [`Source`]
//! whose reads and acknowledgements the agent drives. The wire format is the
//! [`proto`] module's (`docs/data-protocol.md`); it is batched and binary, so a
//! program costs one read and one write per batch, not per message.
//!
//! It depends on nothing of Drover's and on no async runtime.

pub mod builtin;
pub mod proto;

use proto::{Frame, FrameIoError, Hello, HelloReply, InMessage, Kind, ProtoError, Role};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use proto::{Output, SourceMessage};

/// The variable holding the task socket's path.
pub const SOCKET_VAR: &str = "DROVER_SOCKET";

/// How long the agent has to answer the handshake, and to take a response off the
/// socket: it answers at once when it is well, so a longer wait means it is wedged.
/// Waiting for the next request has no bound, since an idle pipeline sends none; the
/// agent closes the socket (and stops the task) when the vertex ends.
const AGENT_TIMEOUT: Duration = Duration::from_secs(30);

/// The most read batches a source keeps unacknowledged. The agent acknowledges a batch
/// once it is written downstream, so more than this means it has stopped doing so.
pub const MAX_UNACKED_BATCHES: usize = 4096;

/// Room for a few whole batches at once, so that reading a batch takes few syscalls.
const READ_BUFFER: usize = 1 << 20;

/// A message handed to a map or a sink, borrowed from the batch it came in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Datum<'a> {
    /// The message's id in the pipeline's buffers.
    pub id: [u8; 16],
    pub key: &'a [u8],
    /// Milliseconds since the Unix epoch, as the source said.
    pub event_time: i64,
    pub payload: &'a [u8],
}

impl<'a> From<&'a InMessage> for Datum<'a> {
    fn from(m: &'a InMessage) -> Datum<'a> {
        Datum {
            id: m.id,
            key: &m.key,
            event_time: m.event_time,
            payload: &m.payload,
        }
    }
}

/// A source of messages, driven by the agent.
pub trait Source {
    /// Returns at most `max` messages, waiting at most about `wait` for the first one
    /// (and returning none when nothing came). An error ends the program: the agent is
    /// told why.
    fn read(&mut self, max: usize, wait: Duration) -> Result<Vec<SourceMessage>, String>;

    /// The messages with these ids (from earlier reads) are durably written
    /// downstream, so the source may forget them (commit an offset, delete a file...).
    /// Messages read but never acknowledged were not written: a source that starts
    /// again from its last acknowledged position delivers each message at least once.
    fn ack(&mut self, ids: &[Vec<u8>]) -> Result<(), String>;
}

/// Why serving stopped. Each message names the socket and what went wrong.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("{SOCKET_VAR} is not set: this program is not running as a Drover pipeline vertex")]
    NoSocket,
    #[error("connecting to the task socket {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent at {path} refused the data connection: {message}")]
    Refused { path: PathBuf, message: String },
    #[error("the agent at {path} speaks data protocol version {version}; this SDK speaks 1")]
    Version { path: PathBuf, version: u32 },
    #[error("the connection to the agent at {path} failed: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent at {path} broke the data protocol: {source}")]
    Protocol {
        path: PathBuf,
        #[source]
        source: ProtoError,
    },
    #[error("the agent at {path} sent a {kind} frame, which a {role} does not take")]
    Unexpected {
        path: PathBuf,
        kind: Kind,
        role: Role,
    },
    #[error("the program failed: {0}")]
    Program(String),
}

/// Serves a map: `f` turns each message into any number of outputs (none filters it
/// out). Blocks until the agent closes the connection.
pub fn map<F>(f: F) -> Result<(), PipelineError>
where
    F: FnMut(&Datum<'_>) -> Vec<Output>,
{
    map_at(&socket_from_env()?, f)
}

/// Like [`map`], with the socket's path given.
pub fn map_at<F>(path: &Path, mut f: F) -> Result<(), PipelineError>
where
    F: FnMut(&Datum<'_>) -> Vec<Output>,
{
    let mut session = Session::open(path, Role::Map)?;
    while let Some(frame) = session.next()? {
        let Frame::MapRequest { batch, messages } = frame else {
            return Err(session.unexpected(frame.kind()));
        };
        let results = messages.iter().map(|m| f(&Datum::from(m))).collect();
        session.send(&Frame::MapResponse { batch, results })?;
    }
    Ok(())
}

/// Serves a sink: `f` writes a batch and answers, for each message in order, whether
/// it was written. Blocks until the agent closes the connection.
pub fn sink<F>(f: F) -> Result<(), PipelineError>
where
    F: FnMut(&[Datum<'_>]) -> Vec<Result<(), String>>,
{
    sink_at(&socket_from_env()?, f)
}

/// Like [`sink`], with the socket's path given.
pub fn sink_at<F>(path: &Path, mut f: F) -> Result<(), PipelineError>
where
    F: FnMut(&[Datum<'_>]) -> Vec<Result<(), String>>,
{
    let mut session = Session::open(path, Role::Sink)?;
    while let Some(frame) = session.next()? {
        let Frame::SinkRequest { batch, messages } = frame else {
            return Err(session.unexpected(frame.kind()));
        };
        let data: Vec<Datum<'_>> = messages.iter().map(Datum::from).collect();
        let statuses = f(&data);
        if statuses.len() != messages.len() {
            return Err(session.fail(format!(
                "the sink function answered {} results for a batch of {} messages; it must answer one per message",
                statuses.len(),
                messages.len()
            )));
        }
        session.send(&Frame::SinkResponse { batch, statuses })?;
    }
    Ok(())
}

/// Serves a source: the agent asks it to read and, once what it read is written
/// downstream, to acknowledge. Blocks until the agent closes the connection.
pub fn source<S: Source>(s: S) -> Result<(), PipelineError> {
    source_at(&socket_from_env()?, s)
}

/// Like [`source`], with the socket's path given.
pub fn source_at<S: Source>(path: &Path, mut s: S) -> Result<(), PipelineError> {
    let mut session = Session::open(path, Role::Source)?;
    // The ids of each batch read and not yet acknowledged, to hand back to the source.
    let mut unacked: HashMap<u64, Vec<Vec<u8>>> = HashMap::new();
    while let Some(frame) = session.next()? {
        match frame {
            Frame::ReadRequest {
                batch,
                max,
                wait_ms,
            } => {
                if unacked.contains_key(&batch) {
                    return Err(session.protocol(ProtoError::DuplicateBatch {
                        kind: Kind::ReadRequest,
                        batch,
                    }));
                }
                if unacked.len() >= MAX_UNACKED_BATCHES {
                    return Err(session.fail(format!(
                        "the agent left {MAX_UNACKED_BATCHES} read batches unacknowledged; a source keeps no more"
                    )));
                }
                let max = max as usize;
                let messages = match s.read(max, Duration::from_millis(u64::from(wait_ms))) {
                    Ok(m) => m,
                    Err(e) => return Err(session.fail(format!("the source's read failed: {e}"))),
                };
                if messages.len() > max {
                    return Err(session.fail(format!(
                        "the source's read returned {} messages when at most {max} were asked for",
                        messages.len()
                    )));
                }
                unacked.insert(batch, messages.iter().map(|m| m.id.clone()).collect());
                session.send(&Frame::ReadResponse { batch, messages })?;
            }
            Frame::AckRequest { batch } => {
                let Some(ids) = unacked.remove(&batch) else {
                    return Err(session.protocol(ProtoError::UnknownAck { batch }));
                };
                if !ids.is_empty()
                    && let Err(e) = s.ack(&ids)
                {
                    return Err(session.fail(format!("the source's ack failed: {e}")));
                }
                session.send(&Frame::AckResponse { batch })?;
            }
            other => return Err(session.unexpected(other.kind())),
        }
    }
    Ok(())
}

fn socket_from_env() -> Result<PathBuf, PipelineError> {
    std::env::var_os(SOCKET_VAR)
        .map(PathBuf::from)
        .ok_or(PipelineError::NoSocket)
}

/// One data connection to the agent, past its handshake.
struct Session {
    path: PathBuf,
    role: Role,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    in_buf: Vec<u8>,
    out_buf: Vec<u8>,
}

impl Session {
    fn open(path: &Path, role: Role) -> Result<Session, PipelineError> {
        let connect = |source| PipelineError::Connect {
            path: path.to_path_buf(),
            source,
        };
        let stream = UnixStream::connect(path).map_err(connect)?;
        let writer = stream.try_clone().map_err(connect)?;
        let mut session = Session {
            path: path.to_path_buf(),
            role,
            reader: BufReader::with_capacity(READ_BUFFER, stream),
            writer,
            in_buf: Vec::new(),
            out_buf: Vec::new(),
        };
        session.handshake()?;
        Ok(session)
    }

    fn io(&self, source: std::io::Error) -> PipelineError {
        PipelineError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn handshake(&mut self) -> Result<(), PipelineError> {
        let stream = self.reader.get_ref();
        stream
            .set_read_timeout(Some(AGENT_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(AGENT_TIMEOUT)))
            .map_err(|e| self.io(e))?;
        let hello = Hello {
            version: proto::VERSION,
            role: self.role,
        };
        self.writer
            .write_all(&hello.to_line())
            .map_err(|e| self.io(e))?;
        // The line is read through the same buffered reader as the frames after it,
        // since the agent may send its first request right behind its answer.
        let mut line = Vec::new();
        (&mut self.reader)
            .take(proto::MAX_HANDSHAKE_LINE as u64)
            .read_until(b'\n', &mut line)
            .map_err(|e| self.io(e))?;
        if !line.ends_with(b"\n") {
            return Err(self.broken(ProtoError::Handshake(format!(
                "the agent's answer ended after {} bytes without a newline",
                line.len()
            ))));
        }
        match HelloReply::parse(&line).map_err(|e| self.broken(e))? {
            HelloReply::Ok { version, .. } if version != proto::VERSION => {
                Err(PipelineError::Version {
                    path: self.path.clone(),
                    version,
                })
            }
            HelloReply::Ok { .. } => {
                // Requests may be far apart; only writes stay bounded.
                self.reader
                    .get_ref()
                    .set_read_timeout(None)
                    .map_err(|e| self.io(e))
            }
            HelloReply::Refused { error } => Err(PipelineError::Refused {
                path: self.path.clone(),
                message: error,
            }),
        }
    }

    /// The next frame, or `None` once the agent has closed the connection. Only
    /// requests for this program's role come back; anything else is an error, and the
    /// agent is told.
    fn next(&mut self) -> Result<Option<Frame>, PipelineError> {
        match proto::read_frame(&mut self.reader, &mut self.in_buf) {
            Ok(Some(frame)) if self.role.accepts(frame.kind()) => Ok(Some(frame)),
            Ok(Some(frame)) => Err(self.unexpected(frame.kind())),
            Ok(None) => Ok(None),
            Err(FrameIoError::Io(e)) => Err(self.io(e)),
            Err(FrameIoError::Proto(e)) => Err(self.protocol(e)),
        }
    }

    /// Encodes `frame` and writes it with one write.
    fn send(&mut self, frame: &Frame) -> Result<(), PipelineError> {
        match proto::write_frame(&mut self.writer, frame, &mut self.out_buf) {
            Ok(()) => Ok(()),
            Err(FrameIoError::Io(e)) => Err(self.io(e)),
            Err(FrameIoError::Proto(e)) => Err(self.fail(format!(
                "its answer to batch {} cannot be sent: {e}",
                frame.batch().unwrap_or_default()
            ))),
        }
    }

    /// Tells the agent, with an `Error` frame, that the program cannot go on, and
    /// returns the error to end with.
    fn tell(&mut self, message: String) {
        let frame = Frame::Error { message };
        if let Err(e) = proto::write_frame(&mut self.writer, &frame, &mut self.out_buf) {
            // The program is ending with its own error either way; the agent will see
            // the connection close instead of the reason.
            eprintln!("drover-pipeline: could not tell the agent why the program stops: {e}");
        }
    }

    fn fail(&mut self, message: String) -> PipelineError {
        self.tell(message.clone());
        PipelineError::Program(message)
    }

    /// The agent broke the protocol before frames began, when there is nobody to tell.
    fn broken(&self, source: ProtoError) -> PipelineError {
        PipelineError::Protocol {
            path: self.path.clone(),
            source,
        }
    }

    /// The agent broke the protocol; it is told how before the connection ends.
    fn protocol(&mut self, source: ProtoError) -> PipelineError {
        self.tell(format!(
            "the program could not read the agent's frames: {source}"
        ));
        self.broken(source)
    }

    fn unexpected(&mut self, kind: Kind) -> PipelineError {
        self.tell(format!(
            "a {} program does not take {kind} frames",
            self.role
        ));
        PipelineError::Unexpected {
            path: self.path.clone(),
            kind,
            role: self.role,
        }
    }
}
