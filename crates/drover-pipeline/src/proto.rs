//! The pipeline data protocol, version 1 (`docs/data-protocol.md`).
//!
//! After a one-line JSON handshake ([`Hello`], [`HelloReply`]) the task socket carries
//! binary frames both ways: a `u32` little-endian length of the rest, a `u8` [`Kind`] and
//! the body. This module holds the typed [`Frame`]s and their codec over byte buffers,
//! with no I/O of its own, so that the agent (with tokio) and the SDK (with std) share
//! it; [`read_frame`] and [`write_frame`] are thin helpers over `std::io`.
//!
//! Decoding trusts nothing: every length and count is checked against the bytes that
//! are actually there before anything is allocated for it, so a hostile length field
//! costs an error, never a panic or a large allocation.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::{Read, Write};

/// The protocol version this module speaks.
pub const VERSION: u32 = 1;

/// The largest frame, counted without its 4-byte length prefix. A peer that announces
/// a longer one is broken or hostile, and the connection cannot be resynchronised.
pub const MAX_FRAME: usize = 64 << 20;

/// The longest handshake line either side accepts, newline included (the task socket's
/// own request limit).
pub const MAX_HANDSHAKE_LINE: usize = 64 << 10;

/// The batch size an agent offers when it has no reason to choose another.
pub const DEFAULT_MAX_BATCH: u32 = 500;

/// A message's 16-byte id as the agent's buffers know it (a `u128`, little-endian).
pub type MessageId = [u8; 16];

/// A frame's kind byte. The numbers are part of the protocol and never change meaning.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    MapRequest = 1,
    MapResponse = 2,
    SinkRequest = 3,
    SinkResponse = 4,
    ReadRequest = 5,
    ReadResponse = 6,
    AckRequest = 7,
    AckResponse = 8,
    Error = 9,
}

impl Kind {
    /// The kind a byte names, or `None` for a byte version 1 does not know.
    pub fn from_byte(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::MapRequest,
            2 => Kind::MapResponse,
            3 => Kind::SinkRequest,
            4 => Kind::SinkResponse,
            5 => Kind::ReadRequest,
            6 => Kind::ReadResponse,
            7 => Kind::AckRequest,
            8 => Kind::AckResponse,
            9 => Kind::Error,
            _ => return None,
        })
    }

    /// Whether the agent sends this kind (the program sends the others).
    pub fn from_agent(self) -> bool {
        matches!(
            self,
            Kind::MapRequest | Kind::SinkRequest | Kind::ReadRequest | Kind::AckRequest
        )
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// What a program's connection serves, named in its handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Source,
    Map,
    Sink,
}

impl Role {
    /// The request kinds the agent may send a program of this role.
    pub fn accepts(self, kind: Kind) -> bool {
        match self {
            Role::Map => kind == Kind::MapRequest,
            Role::Sink => kind == Kind::SinkRequest,
            Role::Source => matches!(kind, Kind::ReadRequest | Kind::AckRequest),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Source => "source",
            Role::Map => "map",
            Role::Sink => "sink",
        })
    }
}

/// A message handed to a map or a sink.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InMessage {
    pub id: MessageId,
    /// Milliseconds since the Unix epoch, as the source said.
    pub event_time: i64,
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
}

/// One message a map produces from its input.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Output {
    pub key: Vec<u8>,
    /// Which conditional edges the message follows: an edge without a condition takes
    /// every message, one with a condition the messages whose tags satisfy it.
    pub tags: Vec<String>,
    pub payload: Vec<u8>,
}

impl Output {
    /// An output carrying `payload`, with no key and no tags.
    pub fn new(payload: impl Into<Vec<u8>>) -> Output {
        Output {
            key: Vec::new(),
            tags: Vec::new(),
            payload: payload.into(),
        }
    }

    /// Sets the output's key.
    pub fn key(mut self, key: impl Into<Vec<u8>>) -> Output {
        self.key = key.into();
        self
    }

    /// Sets the output's tags.
    pub fn tags<I, S>(mut self, tags: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.tags = tags.into_iter().map(Into::into).collect();
        self
    }
}

/// One message a source read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceMessage {
    /// The source's own id or offset for the message (may be empty); it comes back to
    /// the source when the message is acknowledged.
    pub id: Vec<u8>,
    /// Milliseconds since the Unix epoch.
    pub event_time: i64,
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
}

impl SourceMessage {
    /// A message with the source's `id` and `payload`, no key and event time 0.
    pub fn new(id: impl Into<Vec<u8>>, payload: impl Into<Vec<u8>>) -> SourceMessage {
        SourceMessage {
            id: id.into(),
            event_time: 0,
            key: Vec::new(),
            payload: payload.into(),
        }
    }

    /// Sets the message's key.
    pub fn key(mut self, key: impl Into<Vec<u8>>) -> SourceMessage {
        self.key = key.into();
        self
    }

    /// Sets the message's event time, in milliseconds since the Unix epoch.
    pub fn event_time(mut self, ms: i64) -> SourceMessage {
        self.event_time = ms;
        self
    }
}

/// One frame of the protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Agent → map: a batch to transform.
    MapRequest {
        batch: u64,
        messages: Vec<InMessage>,
    },
    /// Map → agent: for each input message, in order, its outputs.
    MapResponse {
        batch: u64,
        results: Vec<Vec<Output>>,
    },
    /// Agent → sink: a batch to write.
    SinkRequest {
        batch: u64,
        messages: Vec<InMessage>,
    },
    /// Sink → agent: for each input message, in order, whether it was written.
    SinkResponse {
        batch: u64,
        statuses: Vec<Result<(), String>>,
    },
    /// Agent → source: read at most `max` messages, waiting at most `wait_ms` for them.
    ReadRequest { batch: u64, max: u32, wait_ms: u32 },
    /// Source → agent: what it read.
    ReadResponse {
        batch: u64,
        messages: Vec<SourceMessage>,
    },
    /// Agent → source: the messages of the ReadResponse `batch` are durably written.
    AckRequest { batch: u64 },
    /// Source → agent: the acknowledgement of `batch` has been passed on.
    AckResponse { batch: u64 },
    /// Program → agent: the program cannot go on, and says why.
    Error { message: String },
}

impl Frame {
    pub fn kind(&self) -> Kind {
        match self {
            Frame::MapRequest { .. } => Kind::MapRequest,
            Frame::MapResponse { .. } => Kind::MapResponse,
            Frame::SinkRequest { .. } => Kind::SinkRequest,
            Frame::SinkResponse { .. } => Kind::SinkResponse,
            Frame::ReadRequest { .. } => Kind::ReadRequest,
            Frame::ReadResponse { .. } => Kind::ReadResponse,
            Frame::AckRequest { .. } => Kind::AckRequest,
            Frame::AckResponse { .. } => Kind::AckResponse,
            Frame::Error { .. } => Kind::Error,
        }
    }

    /// The batch id the frame carries (every kind but `Error` has one).
    pub fn batch(&self) -> Option<u64> {
        match self {
            Frame::MapRequest { batch, .. }
            | Frame::MapResponse { batch, .. }
            | Frame::SinkRequest { batch, .. }
            | Frame::SinkResponse { batch, .. }
            | Frame::ReadRequest { batch, .. }
            | Frame::ReadResponse { batch, .. }
            | Frame::AckRequest { batch }
            | Frame::AckResponse { batch } => Some(*batch),
            Frame::Error { .. } => None,
        }
    }
}

/// Where in a frame a problem is: the field, and the message, output and tag it belongs
/// to when it is inside one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: &'static str,
    pub message: Option<u32>,
    pub output: Option<u32>,
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(m) = self.message {
            write!(f, "message {m}, ")?;
        }
        if let Some(o) = self.output {
            write!(f, "output {o}, ")?;
        }
        f.write_str(self.name)
    }
}

/// A breach of the protocol, in a frame or in the order of frames. Each message names
/// the frame, the field and what was expected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("frame length {len} is over the limit of {MAX_FRAME} bytes")]
    FrameTooLong { len: u64 },
    #[error("frame length 0: a frame holds at least its kind byte")]
    EmptyFrame,
    #[error("unknown frame kind {0}; protocol version 1 has kinds 1 to 9")]
    UnknownKind(u8),
    #[error("{kind} frame: {field} needs {need} bytes but only {left} remain in the frame")]
    Truncated {
        kind: Kind,
        field: Field,
        need: u64,
        left: usize,
    },
    #[error(
        "{kind} frame: {field} is {count}, which cannot fit: each takes at least {min_each} bytes and only {left} remain"
    )]
    CountTooLarge {
        kind: Kind,
        field: Field,
        count: u32,
        min_each: usize,
        left: usize,
    },
    #[error("{kind} frame: {extra} bytes left over after its last field")]
    TrailingBytes { kind: Kind, extra: usize },
    #[error("{kind} frame: {field} is not valid UTF-8")]
    NotUtf8 { kind: Kind, field: Field },
    #[error("{kind} frame: {field} is {value}; expected 0 (ok) or 1 (failed)")]
    BadStatus { kind: Kind, field: Field, value: u8 },
    #[error("{kind} frame: {field} holds {len}, over the most the protocol can carry ({max})")]
    TooMany {
        kind: Kind,
        field: Field,
        len: usize,
        max: usize,
    },
    #[error("AckRequest for batch {batch}, which was never read or is already acknowledged")]
    UnknownAck { batch: u64 },
    #[error("{kind} frame for batch {batch}, which has no request outstanding")]
    UnknownBatch { kind: Kind, batch: u64 },
    #[error("{got} frame for batch {batch}, whose request was a {sent}; expected a {expected}")]
    WrongKind {
        batch: u64,
        sent: Kind,
        got: Kind,
        expected: Kind,
    },
    #[error("{kind} for batch {batch} answers {got} messages; its request carried {expected}")]
    CountMismatch {
        kind: Kind,
        batch: u64,
        expected: u32,
        got: usize,
    },
    #[error("ReadResponse for batch {batch} carries {got} messages; its ReadRequest allowed {max}")]
    OverRead { batch: u64, max: u32, got: usize },
    #[error("a {kind} for batch {batch} is already outstanding")]
    DuplicateBatch { kind: Kind, batch: u64 },
    #[error("{limit} requests are already outstanding; wait for a response before sending more")]
    TooManyOutstanding { limit: usize },
    #[error("a {kind} frame is not a response the agent waits for")]
    NotAResponse { kind: Kind },
    #[error("a {kind} frame is not a request the agent sends")]
    NotARequest { kind: Kind },
    #[error("handshake: {0}")]
    Handshake(String),
}

/// The smallest encoding of one entry of each counted list, which bounds how many
/// entries a frame's remaining bytes can hold.
const MIN_IN_MESSAGE: usize = 16 + 8 + 4 + 4;
const MIN_SOURCE_MESSAGE: usize = 4 + 8 + 4 + 4;
const MIN_MAP_RESULT: usize = 4;
const MIN_OUTPUT: usize = 4 + 2 + 4;
const MIN_TAG: usize = 4;
const MIN_STATUS: usize = 1;

/// Which index a counted list's entries take in error messages.
#[derive(Clone, Copy)]
enum Level {
    Message,
    Output,
}

/// Reads a frame's body field by field, keeping the position for error messages.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    kind: Kind,
    message: Option<u32>,
    output: Option<u32>,
}

impl<'a> Reader<'a> {
    fn field(&self, name: &'static str) -> Field {
        Field {
            name,
            message: self.message,
            output: self.output,
        }
    }

    fn left(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: u64, name: &'static str) -> Result<&'a [u8], ProtoError> {
        let left = self.left();
        if n > left as u64 {
            return Err(ProtoError::Truncated {
                kind: self.kind,
                field: self.field(name),
                need: n,
                left,
            });
        }
        // `n <= left`, which is a usize, so the cast cannot truncate.
        let n = n as usize;
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, name: &'static str) -> Result<[u8; N], ProtoError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N as u64, name)?);
        Ok(a)
    }

    fn u8(&mut self, name: &'static str) -> Result<u8, ProtoError> {
        Ok(self.array::<1>(name)?[0])
    }

    fn u16(&mut self, name: &'static str) -> Result<u16, ProtoError> {
        Ok(u16::from_le_bytes(self.array(name)?))
    }

    fn u32(&mut self, name: &'static str) -> Result<u32, ProtoError> {
        Ok(u32::from_le_bytes(self.array(name)?))
    }

    fn u64(&mut self, name: &'static str) -> Result<u64, ProtoError> {
        Ok(u64::from_le_bytes(self.array(name)?))
    }

    fn i64(&mut self, name: &'static str) -> Result<i64, ProtoError> {
        Ok(i64::from_le_bytes(self.array(name)?))
    }

    fn bytes(&mut self, name: &'static str) -> Result<&'a [u8], ProtoError> {
        let len = self.u32(name)?;
        self.take(u64::from(len), name)
    }

    fn string(&mut self, name: &'static str) -> Result<String, ProtoError> {
        let b = self.bytes(name)?;
        String::from_utf8(b.to_vec()).map_err(|_| ProtoError::NotUtf8 {
            kind: self.kind,
            field: self.field(name),
        })
    }

    /// A count of entries each at least `min_each` bytes long, refused when the rest of
    /// the frame could not hold that many, so that it can size an allocation safely.
    fn count(
        &mut self,
        name: &'static str,
        min_each: usize,
        wide: bool,
    ) -> Result<u32, ProtoError> {
        let count = if wide {
            self.u32(name)?
        } else {
            u32::from(self.u16(name)?)
        };
        let left = self.left();
        if (count as u64).saturating_mul(min_each as u64) > left as u64 {
            return Err(ProtoError::CountTooLarge {
                kind: self.kind,
                field: self.field(name),
                count,
                min_each,
                left,
            });
        }
        Ok(count)
    }

    /// A `u32`-counted list whose entries (messages, or a message's outputs, as `level`
    /// says) are read by `item`, with each entry's index kept for error messages.
    fn list<T>(
        &mut self,
        level: Level,
        min_each: usize,
        mut item: impl FnMut(&mut Self) -> Result<T, ProtoError>,
    ) -> Result<Vec<T>, ProtoError> {
        let name = match level {
            Level::Message => "count",
            Level::Output => "output count",
        };
        let count = self.count(name, min_each, true)?;
        let mut items = Vec::with_capacity(count as usize);
        for i in 0..count {
            self.at(level, Some(i));
            items.push(item(self)?);
        }
        self.at(level, None);
        Ok(items)
    }

    fn at(&mut self, level: Level, index: Option<u32>) {
        match level {
            Level::Message => self.message = index,
            Level::Output => self.output = index,
        }
    }

    fn in_messages(&mut self) -> Result<Vec<InMessage>, ProtoError> {
        self.list(Level::Message, MIN_IN_MESSAGE, |r| {
            Ok(InMessage {
                id: r.array("id")?,
                event_time: r.i64("event_time")?,
                key: r.bytes("key")?.to_vec(),
                payload: r.bytes("payload")?.to_vec(),
            })
        })
    }

    fn output(&mut self) -> Result<Output, ProtoError> {
        let key = self.bytes("key")?.to_vec();
        let tag_count = self.count("tag count", MIN_TAG, false)?;
        let mut tags = Vec::with_capacity(tag_count as usize);
        for _ in 0..tag_count {
            tags.push(self.string("tag")?);
        }
        let payload = self.bytes("payload")?.to_vec();
        Ok(Output { key, tags, payload })
    }

    fn status(&mut self) -> Result<Result<(), String>, ProtoError> {
        match self.u8("status")? {
            0 => Ok(Ok(())),
            1 => Ok(Err(self.string("error")?)),
            value => Err(ProtoError::BadStatus {
                kind: self.kind,
                field: self.field("status"),
                value,
            }),
        }
    }

    fn finish(self) -> Result<(), ProtoError> {
        match self.left() {
            0 => Ok(()),
            extra => Err(ProtoError::TrailingBytes {
                kind: self.kind,
                extra,
            }),
        }
    }
}

/// The length of the frame at the start of `buf`, prefix included, once its 4-byte
/// prefix is there (`None` before); an announced length over [`MAX_FRAME`] or of 0 is
/// an error at once, without waiting for the bytes.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, ProtoError> {
    let Some(prefix) = buf.first_chunk::<4>() else {
        return Ok(None);
    };
    let len = u32::from_le_bytes(*prefix);
    check_len(len)?;
    Ok(Some(4 + len as usize))
}

fn check_len(len: u32) -> Result<(), ProtoError> {
    if len == 0 {
        return Err(ProtoError::EmptyFrame);
    }
    if len as usize > MAX_FRAME {
        return Err(ProtoError::FrameTooLong {
            len: u64::from(len),
        });
    }
    Ok(())
}

/// Decodes the frame at the start of `buf`: `None` while `buf` does not yet hold all
/// of it, else the frame and how many bytes of `buf` it took.
pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, ProtoError> {
    let Some(total) = frame_len(buf)? else {
        return Ok(None);
    };
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some((decode_body(&buf[4..total])?, total)))
}

/// Decodes a frame from its bytes after the length prefix: the kind byte and the body.
pub fn decode_body(bytes: &[u8]) -> Result<Frame, ProtoError> {
    let (&kind_byte, body) = bytes.split_first().ok_or(ProtoError::EmptyFrame)?;
    let kind = Kind::from_byte(kind_byte).ok_or(ProtoError::UnknownKind(kind_byte))?;
    let mut r = Reader {
        buf: body,
        pos: 0,
        kind,
        message: None,
        output: None,
    };
    let frame = match kind {
        Kind::MapRequest | Kind::SinkRequest => {
            let batch = r.u64("batch id")?;
            let messages = r.in_messages()?;
            if kind == Kind::MapRequest {
                Frame::MapRequest { batch, messages }
            } else {
                Frame::SinkRequest { batch, messages }
            }
        }
        Kind::MapResponse => Frame::MapResponse {
            batch: r.u64("batch id")?,
            results: r.list(Level::Message, MIN_MAP_RESULT, |r| {
                r.list(Level::Output, MIN_OUTPUT, Reader::output)
            })?,
        },
        Kind::SinkResponse => Frame::SinkResponse {
            batch: r.u64("batch id")?,
            statuses: r.list(Level::Message, MIN_STATUS, Reader::status)?,
        },
        Kind::ReadRequest => Frame::ReadRequest {
            batch: r.u64("batch id")?,
            max: r.u32("max messages")?,
            wait_ms: r.u32("wait ms")?,
        },
        Kind::ReadResponse => Frame::ReadResponse {
            batch: r.u64("batch id")?,
            messages: r.list(Level::Message, MIN_SOURCE_MESSAGE, |r| {
                Ok(SourceMessage {
                    id: r.bytes("id")?.to_vec(),
                    event_time: r.i64("event_time")?,
                    key: r.bytes("key")?.to_vec(),
                    payload: r.bytes("payload")?.to_vec(),
                })
            })?,
        },
        Kind::AckRequest => Frame::AckRequest {
            batch: r.u64("batch id")?,
        },
        Kind::AckResponse => Frame::AckResponse {
            batch: r.u64("batch id")?,
        },
        Kind::Error => Frame::Error {
            message: r.string("message")?,
        },
    };
    r.finish()?;
    Ok(frame)
}

/// Appends frames' encodings to a buffer, checking every length and count against what
/// the protocol can carry.
struct Writer<'a> {
    out: &'a mut Vec<u8>,
    kind: Kind,
    message: Option<u32>,
    output: Option<u32>,
}

impl Writer<'_> {
    fn field(&self, name: &'static str) -> Field {
        Field {
            name,
            message: self.message,
            output: self.output,
        }
    }

    fn too_many(&self, name: &'static str, len: usize, max: usize) -> ProtoError {
        ProtoError::TooMany {
            kind: self.kind,
            field: self.field(name),
            len,
            max,
        }
    }

    fn put(&mut self, b: &[u8]) {
        self.out.extend_from_slice(b);
    }

    /// A `u32` count (or length), refused past `max`, which is never above `u32::MAX`.
    fn count32(&mut self, name: &'static str, len: usize, max: usize) -> Result<(), ProtoError> {
        let n = u32::try_from(len)
            .ok()
            .filter(|&n| n as usize <= max)
            .ok_or_else(|| self.too_many(name, len, max))?;
        self.put(&n.to_le_bytes());
        Ok(())
    }

    fn bytes(&mut self, name: &'static str, b: &[u8]) -> Result<(), ProtoError> {
        // Nothing longer than a frame can be in one, so this is refused before it is
        // copied.
        self.count32(name, b.len(), MAX_FRAME)?;
        self.put(b);
        Ok(())
    }

    fn in_messages(&mut self, messages: &[InMessage]) -> Result<(), ProtoError> {
        self.count32("count", messages.len(), MAX_FRAME / MIN_IN_MESSAGE)?;
        for (i, m) in messages.iter().enumerate() {
            self.message = Some(i as u32);
            self.put(&m.id);
            self.put(&m.event_time.to_le_bytes());
            self.bytes("key", &m.key)?;
            self.bytes("payload", &m.payload)?;
        }
        self.message = None;
        Ok(())
    }

    fn body(&mut self, frame: &Frame) -> Result<(), ProtoError> {
        if let Some(batch) = frame.batch() {
            self.put(&batch.to_le_bytes());
        }
        match frame {
            Frame::MapRequest { messages, .. } | Frame::SinkRequest { messages, .. } => {
                self.in_messages(messages)?;
            }
            Frame::MapResponse { results, .. } => {
                self.count32("count", results.len(), MAX_FRAME / MIN_MAP_RESULT)?;
                for (i, outputs) in results.iter().enumerate() {
                    self.message = Some(i as u32);
                    self.count32("output count", outputs.len(), MAX_FRAME / MIN_OUTPUT)?;
                    for (o, out) in outputs.iter().enumerate() {
                        self.output = Some(o as u32);
                        self.bytes("key", &out.key)?;
                        let tags = u16::try_from(out.tags.len())
                            .map_err(|_| self.too_many("tag count", out.tags.len(), 65535))?;
                        self.put(&tags.to_le_bytes());
                        for tag in &out.tags {
                            self.bytes("tag", tag.as_bytes())?;
                        }
                        self.bytes("payload", &out.payload)?;
                    }
                    self.output = None;
                }
            }
            Frame::SinkResponse { statuses, .. } => {
                self.count32("count", statuses.len(), MAX_FRAME / MIN_STATUS)?;
                for (i, status) in statuses.iter().enumerate() {
                    self.message = Some(i as u32);
                    match status {
                        Ok(()) => self.put(&[0]),
                        Err(e) => {
                            self.put(&[1]);
                            self.bytes("error", e.as_bytes())?;
                        }
                    }
                }
            }
            Frame::ReadRequest { max, wait_ms, .. } => {
                self.put(&max.to_le_bytes());
                self.put(&wait_ms.to_le_bytes());
            }
            Frame::ReadResponse { messages, .. } => {
                self.count32("count", messages.len(), MAX_FRAME / MIN_SOURCE_MESSAGE)?;
                for (i, m) in messages.iter().enumerate() {
                    self.message = Some(i as u32);
                    self.bytes("id", &m.id)?;
                    self.put(&m.event_time.to_le_bytes());
                    self.bytes("key", &m.key)?;
                    self.bytes("payload", &m.payload)?;
                }
            }
            Frame::AckRequest { .. } | Frame::AckResponse { .. } => {}
            Frame::Error { message } => self.bytes("message", message.as_bytes())?,
        }
        self.message = None;
        Ok(())
    }
}

/// Appends the encoding of `frame` (length prefix included) to `out`. A frame that
/// would be longer than [`MAX_FRAME`], or a list longer than its count can say, is an
/// error, and `out` is left as it was.
pub fn encode(frame: &Frame, out: &mut Vec<u8>) -> Result<(), ProtoError> {
    let start = out.len();
    out.extend_from_slice(&[0, 0, 0, 0, frame.kind() as u8]);
    let mut w = Writer {
        out,
        kind: frame.kind(),
        message: None,
        output: None,
    };
    if let Err(e) = w.body(frame) {
        out.truncate(start);
        return Err(e);
    }
    let len = out.len() - start - 4;
    if len > MAX_FRAME {
        out.truncate(start);
        return Err(ProtoError::FrameTooLong { len: len as u64 });
    }
    // `len <= MAX_FRAME`, which fits in a u32.
    out[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(())
}

/// A frame could not be read or written: the connection failed, or what came over it
/// is not the protocol.
#[derive(Debug, thiserror::Error)]
pub enum FrameIoError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Proto(#[from] ProtoError),
}

/// Reads one frame: `None` when the peer closed the connection between frames, an
/// `UnexpectedEof` error when it closed inside one. `scratch` is reused for the
/// frame's bytes, so a loop reading frames allocates only as they grow. Memory follows
/// the bytes that arrive, never the announced length alone.
pub fn read_frame<R: Read>(
    r: &mut R,
    scratch: &mut Vec<u8>,
) -> Result<Option<Frame>, FrameIoError> {
    let mut prefix = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut prefix[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the connection closed inside a frame's length prefix",
                )
                .into());
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_le_bytes(prefix);
    check_len(len)?;
    scratch.clear();
    r.take(u64::from(len)).read_to_end(scratch)?;
    if scratch.len() < len as usize {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!(
                "the connection closed inside a frame: {} of its {len} bytes arrived",
                scratch.len()
            ),
        )
        .into());
    }
    Ok(Some(decode_body(scratch)?))
}

/// Encodes `frame` into `scratch` (cleared first) and writes it with one `write_all`.
pub fn write_frame<W: Write>(
    w: &mut W,
    frame: &Frame,
    scratch: &mut Vec<u8>,
) -> Result<(), FrameIoError> {
    scratch.clear();
    encode(frame, scratch)?;
    w.write_all(scratch)?;
    Ok(())
}

/// The program's handshake line: `{"op":"data","version":1,"role":"map"}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version: u32,
    pub role: Role,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct HelloWire {
    op: String,
    version: u32,
    role: Role,
}

impl Hello {
    /// The line to send, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        let wire = HelloWire {
            op: "data".into(),
            version: self.version,
            role: self.role,
        };
        // A struct of a string, a number and a unit enum always serialises.
        let mut line = serde_json::to_vec(&wire).unwrap_or_default();
        line.push(b'\n');
        line
    }

    /// Parses a handshake line (without or with its newline).
    pub fn parse(line: &[u8]) -> Result<Hello, ProtoError> {
        let wire: HelloWire = serde_json::from_slice(line.trim_ascii()).map_err(|e| {
            ProtoError::Handshake(format!(
                "{e}; expected {{\"op\":\"data\",\"version\":1,\"role\":\"source\"|\"map\"|\"sink\"}}"
            ))
        })?;
        if wire.op != "data" {
            return Err(ProtoError::Handshake(format!(
                "op is {:?}; expected \"data\"",
                wire.op
            )));
        }
        Ok(Hello {
            version: wire.version,
            role: wire.role,
        })
    }
}

/// The agent's answer to a [`Hello`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HelloReply {
    /// Frames follow. `max_batch` is the most messages the agent puts in one request.
    Ok { version: u32, max_batch: u32 },
    /// The agent will not serve this connection, and says why.
    Refused { error: String },
}

impl HelloReply {
    /// The line to send, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        let value = match self {
            HelloReply::Ok { version, max_batch } => serde_json::json!({
                "ok": true, "version": version, "max_batch": max_batch,
            }),
            HelloReply::Refused { error } => serde_json::json!({ "ok": false, "error": error }),
        };
        // A JSON value always serialises.
        let mut line = serde_json::to_vec(&value).unwrap_or_default();
        line.push(b'\n');
        line
    }

    /// Parses the agent's answer. Fields this version does not know are ignored, so an
    /// agent may add some.
    pub fn parse(line: &[u8]) -> Result<HelloReply, ProtoError> {
        let bad = |what: String| ProtoError::Handshake(format!("the agent's answer {what}"));
        let value: serde_json::Value = serde_json::from_slice(line.trim_ascii())
            .map_err(|e| bad(format!("is not JSON ({e})")))?;
        match value.get("ok").and_then(serde_json::Value::as_bool) {
            Some(true) => {
                let num = |name: &str| {
                    value
                        .get(name)
                        .and_then(serde_json::Value::as_u64)
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| bad(format!("has no {name} that is a u32: {value}")))
                };
                let max_batch = num("max_batch")?;
                if max_batch == 0 {
                    return Err(bad("has max_batch 0; expected at least 1".into()));
                }
                Ok(HelloReply::Ok {
                    version: num("version")?,
                    max_batch,
                })
            }
            Some(false) => Ok(HelloReply::Refused {
                error: value
                    .get("error")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or("no reason given")
                    .to_string(),
            }),
            None => Err(bad(format!("has no boolean \"ok\": {value}"))),
        }
    }
}

/// What the agent remembers of a request it sent, to check the response.
#[derive(Clone, Copy, Debug)]
struct Sent {
    kind: Kind,
    count: u32,
}

/// The agent's side of pipelining: the requests outstanding on one connection, so that
/// every response can be checked against its request (known batch, matching kind, the
/// same message count, a read no larger than asked). Bounded: a request past `limit`
/// outstanding is refused, which is the agent's back-pressure on itself.
#[derive(Debug)]
pub struct Outstanding {
    requests: HashMap<u64, Sent>,
    acks: HashSet<u64>,
    limit: usize,
}

impl Outstanding {
    pub fn new(limit: usize) -> Outstanding {
        Outstanding {
            requests: HashMap::new(),
            acks: HashSet::new(),
            limit,
        }
    }

    /// How many requests await a response.
    pub fn len(&self) -> usize {
        self.requests.len() + self.acks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records a request about to be sent; refuses one that is not a request, reuses
    /// an outstanding batch id or goes past the limit.
    pub fn sent(&mut self, frame: &Frame) -> Result<(), ProtoError> {
        let kind = frame.kind();
        let (batch, count) = match frame {
            Frame::MapRequest { batch, messages } | Frame::SinkRequest { batch, messages } => {
                (*batch, messages.len() as u32)
            }
            Frame::ReadRequest { batch, max, .. } => (*batch, *max),
            Frame::AckRequest { batch } => (*batch, 0),
            _ => return Err(ProtoError::NotARequest { kind }),
        };
        if self.len() >= self.limit {
            return Err(ProtoError::TooManyOutstanding { limit: self.limit });
        }
        let fresh = if kind == Kind::AckRequest {
            self.acks.insert(batch)
        } else {
            match self.requests.entry(batch) {
                std::collections::hash_map::Entry::Occupied(_) => false,
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(Sent { kind, count });
                    true
                }
            }
        };
        if fresh {
            Ok(())
        } else {
            Err(ProtoError::DuplicateBatch { kind, batch })
        }
    }

    /// Checks a response against its request and forgets the request. `Error` frames
    /// are not responses; the caller handles them before.
    pub fn received(&mut self, frame: &Frame) -> Result<(), ProtoError> {
        let kind = frame.kind();
        let (batch, expected, got) = match frame {
            Frame::MapResponse { batch, results } => (*batch, Kind::MapRequest, results.len()),
            Frame::SinkResponse { batch, statuses } => (*batch, Kind::SinkRequest, statuses.len()),
            Frame::ReadResponse { batch, messages } => (*batch, Kind::ReadRequest, messages.len()),
            Frame::AckResponse { batch } => {
                return if self.acks.remove(batch) {
                    Ok(())
                } else {
                    Err(ProtoError::UnknownBatch {
                        kind,
                        batch: *batch,
                    })
                };
            }
            _ => return Err(ProtoError::NotAResponse { kind }),
        };
        let sent = *self
            .requests
            .get(&batch)
            .ok_or(ProtoError::UnknownBatch { kind, batch })?;
        if sent.kind != expected {
            return Err(ProtoError::WrongKind {
                batch,
                sent: sent.kind,
                got: kind,
                expected: response_to(sent.kind),
            });
        }
        if kind == Kind::ReadResponse {
            if got > sent.count as usize {
                return Err(ProtoError::OverRead {
                    batch,
                    max: sent.count,
                    got,
                });
            }
        } else if got != sent.count as usize {
            return Err(ProtoError::CountMismatch {
                kind,
                batch,
                expected: sent.count,
                got,
            });
        }
        self.requests.remove(&batch);
        Ok(())
    }
}

/// The response kind that answers a request kind.
fn response_to(kind: Kind) -> Kind {
    match kind {
        Kind::MapRequest => Kind::MapResponse,
        Kind::SinkRequest => Kind::SinkResponse,
        Kind::ReadRequest => Kind::ReadResponse,
        Kind::AckRequest => Kind::AckResponse,
        other => other,
    }
}

#[cfg(test)]
mod tests;
