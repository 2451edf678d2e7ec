//! Buffers reached through someone else: the binary codec an agent and its controller
//! use to carry buffer calls over their WebSocket, a [`RemoteBuffer`] that implements
//! [`Buffer`] by sending calls through a [`CallTransport`], and [`execute`], which the
//! side holding the buffers runs for each decoded call.
//!
//! Every frame starts with the codec's version and what it is (a call or an answer),
//! then the call's id, so answers can be matched to calls in any order. Integers are
//! little-endian; byte strings are a `u32` length and the bytes; a buffer name is a
//! `u8` length and its bytes. Decoding takes untrusted input: every length is checked
//! against what is left and against the limits below, and a bad frame is an error
//! naming what was wrong, never a panic.
//!
//! Errors keep their kind across the wire, so a full buffer is still
//! [`BufferError::Full`] to the writer, which waits on it rather than failing.

use crate::{
    Appended, Buffer, BufferError, BufferName, BufferStats, Delivery, DeliveryTag, Message,
    MessageId,
};
use async_trait::async_trait;
use bytes::{BufMut, Bytes, BytesMut};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The codec's version, the first byte of every frame.
pub const VERSION: u8 = 1;

/// The largest frame either side sends or accepts. A batch bigger than this is split
/// into several appends by [`RemoteBuffer`], and a fetch answer is cut short of it.
pub const MAX_FRAME: usize = 16 << 20;

/// The most messages (or delivery tags) in one call or answer.
pub const MAX_ITEMS: usize = 10_000;

/// The longest a fetch may ask to wait; longer waits are refused, so a caller cannot
/// make the serving side hold a call open for long.
pub const MAX_WAIT: Duration = Duration::from_secs(30);

/// The longest buffer name a frame may carry.
pub const MAX_NAME: usize = 255;

/// The longest error text a frame carries; longer texts are cut.
const MAX_TEXT: usize = 4096;

/// What goes in a frame's second byte.
const KIND_CALL: u8 = 1;
const KIND_ANSWER: u8 = 2;

/// The bytes of a frame's header: version, kind and id.
const HEADER: usize = 1 + 1 + 8;

/// Gives calls ids unique in this process, and so on every connection it makes.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A fresh call id.
pub fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// What a call asks of its buffer.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    Append(Vec<Message>),
    Fetch {
        max: u32,
        wait: Duration,
    },
    Ack(Vec<DeliveryTag>),
    Nack {
        tags: Vec<DeliveryTag>,
        delay: Duration,
    },
    KeepAlive(Vec<DeliveryTag>),
    Stats,
}

impl Op {
    fn code(&self) -> u8 {
        match self {
            Op::Append(_) => 1,
            Op::Fetch { .. } => 2,
            Op::Ack(_) => 3,
            Op::Nack { .. } => 4,
            Op::KeepAlive(_) => 5,
            Op::Stats => 6,
        }
    }

    /// The operation's name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Append(_) => "append",
            Op::Fetch { .. } => "fetch",
            Op::Ack(_) => "ack",
            Op::Nack { .. } => "nack",
            Op::KeepAlive(_) => "keep_alive",
            Op::Stats => "stats",
        }
    }
}

/// One call: its id, the buffer's name as the caller gave it (the serving side checks
/// it) and the operation.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    pub id: u64,
    pub buffer: String,
    pub op: Op,
}

/// What a call returned.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    Appended(Appended),
    Fetched(Vec<Delivery>),
    /// Ack, nack and keep-alive return nothing.
    Done,
    Stats(BufferStats),
}

/// A call's answer: its id and the result.
#[derive(Debug)]
pub struct Answer {
    pub id: u64,
    pub result: Result<Reply, BufferError>,
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("buffer frame of {0} bytes is over the limit of {MAX_FRAME}")]
    TooBig(usize),
    #[error("buffer frame ends early: {0} needs more bytes")]
    Truncated(&'static str),
    #[error("buffer frame version {0}, expected {VERSION}")]
    Version(u8),
    #[error("buffer frame is a {got}, expected a {want}")]
    Kind {
        got: &'static str,
        want: &'static str,
    },
    #[error("buffer frame: {0}")]
    Invalid(String),
    #[error("buffer frame has {0} bytes left over after its content")]
    Trailing(usize),
}

impl From<DecodeError> for BufferError {
    fn from(e: DecodeError) -> BufferError {
        BufferError::Invalid(e.to_string())
    }
}

fn kind_name(kind: u8) -> &'static str {
    match kind {
        KIND_CALL => "call",
        KIND_ANSWER => "answer",
        _ => "frame of unknown kind",
    }
}

/// Reads the id of a frame of either kind without decoding the rest, so that a frame
/// whose body is bad can still be answered (or its caller told).
pub fn frame_id(frame: &[u8]) -> Option<u64> {
    let id = frame.get(2..HEADER)?;
    Some(u64::from_le_bytes(id.try_into().ok()?))
}

// ---- encoding ----

fn header(out: &mut BytesMut, kind: u8, id: u64) {
    out.put_u8(VERSION);
    out.put_u8(kind);
    out.put_u64_le(id);
}

fn put_bytes(out: &mut BytesMut, b: &[u8]) {
    // Lengths are checked by the callers against MAX_FRAME, far below u32::MAX.
    out.put_u32_le(b.len() as u32);
    out.put_slice(b);
}

fn put_name(out: &mut BytesMut, name: &str) {
    // A name over MAX_NAME is cut here and refused by the receiver, which names it.
    let b = &name.as_bytes()[..name.len().min(MAX_NAME)];
    out.put_u8(b.len() as u8);
    out.put_slice(b);
}

fn put_text(out: &mut BytesMut, text: &str) {
    let mut end = text.len().min(MAX_TEXT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    put_bytes(out, &text.as_bytes()[..end]);
}

fn put_message(out: &mut BytesMut, m: &Message) {
    out.put_u128_le(m.id.0);
    put_bytes(out, &m.key);
    out.put_i64_le(m.event_time);
    put_bytes(out, &m.payload);
}

fn message_size(m: &Message) -> usize {
    16 + 4 + m.key.len() + 8 + 4 + m.payload.len()
}

fn put_tags(out: &mut BytesMut, tags: &[DeliveryTag]) {
    out.put_u32_le(tags.len() as u32);
    for t in tags {
        out.put_u64_le(t.0);
    }
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// Encodes a call.
pub fn encode_call(call: &Call) -> Bytes {
    let mut out = BytesMut::with_capacity(64);
    header(&mut out, KIND_CALL, call.id);
    put_name(&mut out, &call.buffer);
    out.put_u8(call.op.code());
    match &call.op {
        Op::Append(messages) => {
            out.reserve(messages.iter().map(message_size).sum::<usize>() + 4);
            out.put_u32_le(messages.len() as u32);
            for m in messages {
                put_message(&mut out, m);
            }
        }
        Op::Fetch { max, wait } => {
            out.put_u32_le(*max);
            out.put_u32_le(millis(*wait));
        }
        Op::Ack(tags) | Op::KeepAlive(tags) => put_tags(&mut out, tags),
        Op::Nack { tags, delay } => {
            put_tags(&mut out, tags);
            out.put_u32_le(millis(*delay));
        }
        Op::Stats => {}
    }
    out.freeze()
}

const ERR_FULL: u8 = 1;
const ERR_NOT_FOUND: u8 = 2;
const ERR_INVALID: u8 = 3;
const ERR_BACKEND: u8 = 4;

const REPLY_APPENDED: u8 = 1;
const REPLY_FETCHED: u8 = 2;
const REPLY_DONE: u8 = 3;
const REPLY_STATS: u8 = 4;

/// Encodes an answer.
pub fn encode_answer(answer: &Answer) -> Bytes {
    let mut out = BytesMut::with_capacity(64);
    header(&mut out, KIND_ANSWER, answer.id);
    match &answer.result {
        Ok(reply) => {
            out.put_u8(0);
            match reply {
                Reply::Appended(a) => {
                    out.put_u8(REPLY_APPENDED);
                    out.put_u64_le(a.written as u64);
                    out.put_u64_le(a.duplicates as u64);
                }
                Reply::Fetched(ds) => {
                    out.put_u8(REPLY_FETCHED);
                    out.put_u32_le(ds.len() as u32);
                    for d in ds {
                        out.put_u64_le(d.tag.0);
                        out.put_u32_le(d.redeliveries);
                        put_message(&mut out, &d.message);
                    }
                }
                Reply::Done => out.put_u8(REPLY_DONE),
                Reply::Stats(s) => {
                    out.put_u8(REPLY_STATS);
                    out.put_u64_le(s.pending);
                    out.put_u64_le(s.unacked);
                    out.put_f64_le(s.usage);
                    out.put_u64_le(s.acked_total);
                    out.put_u64_le(s.written_total);
                    out.put_u64_le(s.duplicates_total);
                }
            }
        }
        Err(e) => {
            out.put_u8(1);
            match e {
                BufferError::Full {
                    name,
                    pending,
                    limit,
                } => {
                    out.put_u8(ERR_FULL);
                    put_name(&mut out, name.as_str());
                    out.put_u64_le(*pending);
                    out.put_u64_le(*limit);
                }
                BufferError::NotFound(name) => {
                    out.put_u8(ERR_NOT_FOUND);
                    put_name(&mut out, name.as_str());
                }
                BufferError::Invalid(text) => {
                    out.put_u8(ERR_INVALID);
                    put_text(&mut out, text);
                }
                BufferError::Backend(text) => {
                    out.put_u8(ERR_BACKEND);
                    put_text(&mut out, text);
                }
            }
        }
    }
    out.freeze()
}

// ---- decoding ----

/// A cursor over an untrusted frame: every read checks what is left.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated(what));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let b = self.take(N, what)?;
        // `take` returned exactly N bytes.
        b.try_into().map_err(|_| DecodeError::Truncated(what))
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        Ok(i64::from_le_bytes(self.array(what)?))
    }

    fn u128(&mut self, what: &'static str) -> Result<u128, DecodeError> {
        Ok(u128::from_le_bytes(self.array(what)?))
    }

    fn f64(&mut self, what: &'static str) -> Result<f64, DecodeError> {
        Ok(f64::from_le_bytes(self.array(what)?))
    }

    /// A length-prefixed byte string, copied out of the frame.
    fn bytes(&mut self, what: &'static str) -> Result<Bytes, DecodeError> {
        let len = self.u32(what)? as usize;
        Ok(Bytes::copy_from_slice(self.take(len, what)?))
    }

    fn name(&mut self) -> Result<String, DecodeError> {
        let len = self.u8("the buffer name")? as usize;
        let b = self.take(len, "the buffer name")?;
        let name = std::str::from_utf8(b)
            .map_err(|_| DecodeError::Invalid("the buffer name is not UTF-8".into()))?;
        if name.is_empty() {
            return Err(DecodeError::Invalid("the buffer name is empty".into()));
        }
        Ok(name.to_string())
    }

    fn text(&mut self) -> Result<String, DecodeError> {
        let b = self.bytes("the error text")?;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }

    /// A count of items, each at least `min_size` bytes: refused above [`MAX_ITEMS`]
    /// or above what the rest of the frame could hold, before anything is allocated.
    fn count(&mut self, what: &'static str, min_size: usize) -> Result<usize, DecodeError> {
        let n = self.u32(what)? as usize;
        if n > MAX_ITEMS {
            return Err(DecodeError::Invalid(format!(
                "{what}: {n} items, over the limit of {MAX_ITEMS}"
            )));
        }
        if n.saturating_mul(min_size) > self.buf.len() {
            return Err(DecodeError::Truncated(what));
        }
        Ok(n)
    }

    fn message(&mut self) -> Result<Message, DecodeError> {
        Ok(Message {
            id: MessageId(self.u128("a message id")?),
            key: self.bytes("a message key")?,
            event_time: self.i64("a message event time")?,
            payload: self.bytes("a message payload")?,
        })
    }

    fn tags(&mut self) -> Result<Vec<DeliveryTag>, DecodeError> {
        let n = self.count("delivery tags", 8)?;
        (0..n)
            .map(|_| Ok(DeliveryTag(self.u64("a delivery tag")?)))
            .collect()
    }

    fn done(&self) -> Result<(), DecodeError> {
        match self.buf.len() {
            0 => Ok(()),
            n => Err(DecodeError::Trailing(n)),
        }
    }
}

fn open(frame: &[u8], want: u8) -> Result<(Reader<'_>, u64), DecodeError> {
    if frame.len() > MAX_FRAME {
        return Err(DecodeError::TooBig(frame.len()));
    }
    let mut r = Reader { buf: frame };
    let version = r.u8("the version")?;
    if version != VERSION {
        return Err(DecodeError::Version(version));
    }
    let kind = r.u8("the frame kind")?;
    if kind != want {
        return Err(DecodeError::Kind {
            got: kind_name(kind),
            want: kind_name(want),
        });
    }
    let id = r.u64("the call id")?;
    Ok((r, id))
}

/// Decodes a call, checking every size against the limits.
pub fn decode_call(frame: &[u8]) -> Result<Call, DecodeError> {
    let (mut r, id) = open(frame, KIND_CALL)?;
    let buffer = r.name()?;
    let op = match r.u8("the operation")? {
        1 => {
            let n = r.count("messages", 16 + 4 + 8 + 4)?;
            let messages = (0..n).map(|_| r.message()).collect::<Result<_, _>>()?;
            Op::Append(messages)
        }
        2 => {
            let max = r.u32("the fetch's max")?;
            if max == 0 || max as usize > MAX_ITEMS {
                return Err(DecodeError::Invalid(format!(
                    "fetch max: expected 1 to {MAX_ITEMS}, got {max}"
                )));
            }
            let wait = Duration::from_millis(u64::from(r.u32("the fetch's wait")?));
            if wait > MAX_WAIT {
                return Err(DecodeError::Invalid(format!(
                    "fetch wait: at most {MAX_WAIT:?}, got {wait:?}"
                )));
            }
            Op::Fetch { max, wait }
        }
        3 => Op::Ack(r.tags()?),
        4 => {
            let tags = r.tags()?;
            let delay = Duration::from_millis(u64::from(r.u32("the nack's delay")?));
            Op::Nack { tags, delay }
        }
        5 => Op::KeepAlive(r.tags()?),
        6 => Op::Stats,
        other => {
            return Err(DecodeError::Invalid(format!("unknown operation {other}")));
        }
    };
    r.done()?;
    Ok(Call { id, buffer, op })
}

/// Decodes an answer; the error it carries, if any, keeps its kind.
pub fn decode_answer(frame: &[u8]) -> Result<Answer, DecodeError> {
    let (mut r, id) = open(frame, KIND_ANSWER)?;
    let result = match r.u8("the answer's status")? {
        0 => Ok(match r.u8("the reply kind")? {
            REPLY_APPENDED => Reply::Appended(Appended {
                written: r.u64("the written count")? as usize,
                duplicates: r.u64("the duplicate count")? as usize,
            }),
            REPLY_FETCHED => {
                let n = r.count("deliveries", 8 + 4 + 16 + 4 + 8 + 4)?;
                let ds = (0..n)
                    .map(|_| {
                        Ok(Delivery {
                            tag: DeliveryTag(r.u64("a delivery tag")?),
                            redeliveries: r.u32("a redelivery count")?,
                            message: r.message()?,
                        })
                    })
                    .collect::<Result<_, DecodeError>>()?;
                Reply::Fetched(ds)
            }
            REPLY_DONE => Reply::Done,
            REPLY_STATS => Reply::Stats(BufferStats {
                pending: r.u64("stats")?,
                unacked: r.u64("stats")?,
                usage: r.f64("stats")?,
                acked_total: r.u64("stats")?,
                written_total: r.u64("stats")?,
                duplicates_total: r.u64("stats")?,
            }),
            other => return Err(DecodeError::Invalid(format!("unknown reply kind {other}"))),
        }),
        1 => Err(match r.u8("the error kind")? {
            ERR_FULL => {
                let name = r.name()?;
                BufferError::Full {
                    name: parse_name(&name)?,
                    pending: r.u64("the pending count")?,
                    limit: r.u64("the limit")?,
                }
            }
            ERR_NOT_FOUND => BufferError::NotFound(parse_name(&r.name()?)?),
            ERR_INVALID => BufferError::Invalid(r.text()?),
            ERR_BACKEND => BufferError::Backend(r.text()?),
            other => return Err(DecodeError::Invalid(format!("unknown error kind {other}"))),
        }),
        other => return Err(DecodeError::Invalid(format!("unknown status {other}"))),
    };
    r.done()?;
    Ok(Answer { id, result })
}

/// Reads a buffer's name as [`BufferName`] spells it (`project.pipeline.vertex.N`).
pub fn parse_name(name: &str) -> Result<BufferName, DecodeError> {
    let bad = || {
        DecodeError::Invalid(format!(
            "buffer name {name:?}: expected project.pipeline.vertex.partition"
        ))
    };
    let mut parts = name.split('.');
    let (Some(project), Some(pipeline), Some(vertex), Some(partition), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(bad());
    };
    let partition: u32 = partition.parse().map_err(|_| bad())?;
    BufferName::new(project, pipeline, vertex, partition)
        .map_err(|e| DecodeError::Invalid(format!("buffer name {name:?}: {e}")))
}

// ---- serving ----

/// The encoded size a fetch answer may reach before the rest of its deliveries are
/// given back, leaving room for the frame's header.
const MAX_ANSWER_BODY: usize = MAX_FRAME - 1024;

/// Carries out one call on its buffer, as the side holding the buffer does for each
/// call it accepted. A fetch whose deliveries would not fit in one frame returns the
/// ones that do and gives the others back at once, to be fetched by the next call.
pub async fn execute(buffer: &dyn Buffer, op: Op) -> Result<Reply, BufferError> {
    match op {
        Op::Append(messages) => buffer.append(&messages).await.map(Reply::Appended),
        Op::Fetch { max, wait } => {
            let mut ds = buffer.fetch(max as usize, wait.min(MAX_WAIT)).await?;
            let mut size = 0usize;
            let fits = ds
                .iter()
                .position(|d| {
                    size += 12 + message_size(&d.message);
                    size > MAX_ANSWER_BODY
                })
                .unwrap_or(ds.len())
                // At least one delivery goes back to the caller, however large, so a
                // single huge message still moves (the appender bounded it already).
                .max(1)
                .min(ds.len());
            let rest: Vec<DeliveryTag> = ds.drain(fits..).map(|d| d.tag).collect();
            if !rest.is_empty() {
                buffer.nack(&rest, Duration::ZERO).await?;
            }
            Ok(Reply::Fetched(ds))
        }
        Op::Ack(tags) => buffer.ack(&tags).await.map(|()| Reply::Done),
        Op::Nack { tags, delay } => buffer.nack(&tags, delay).await.map(|()| Reply::Done),
        Op::KeepAlive(tags) => buffer.keep_alive(&tags).await.map(|()| Reply::Done),
        Op::Stats => buffer.stats().await.map(Reply::Stats),
    }
}

// ---- the client ----

/// How encoded calls reach the side holding the buffers, and answers come back.
#[async_trait]
pub trait CallTransport: Send + Sync {
    /// Sends the call `frame` (whose id is `id`) and returns its answer's frame. Fails
    /// with [`BufferError::Backend`] when the call could not be sent or no answer came
    /// in time; the call may or may not have happened, and retrying it is safe.
    async fn call(&self, id: u64, frame: Bytes) -> Result<Bytes, BufferError>;
}

/// A buffer held elsewhere, reached by calls through a transport.
pub struct RemoteBuffer {
    name: BufferName,
    transport: Arc<dyn CallTransport>,
}

impl RemoteBuffer {
    pub fn new(name: BufferName, transport: Arc<dyn CallTransport>) -> RemoteBuffer {
        RemoteBuffer { name, transport }
    }

    async fn call(&self, op: Op) -> Result<Reply, BufferError> {
        let id = next_id();
        let what = op.name();
        let frame = encode_call(&Call {
            id,
            buffer: self.name.as_str().to_string(),
            op,
        });
        let answer = decode_answer(&self.transport.call(id, frame).await?)?;
        if answer.id != id {
            return Err(BufferError::Backend(format!(
                "{what} on {}: the answer is to call {}, not {id}",
                self.name, answer.id
            )));
        }
        answer.result
    }

    fn unexpected(&self, what: &str, got: &Reply) -> BufferError {
        BufferError::Backend(format!(
            "{what} on {}: unexpected answer {got:?}",
            self.name
        ))
    }

    /// The messages of `batch` in groups that each fit in one frame.
    fn chunks(batch: &[Message]) -> Vec<&[Message]> {
        let budget = MAX_FRAME - 1024;
        let mut out = Vec::new();
        let (mut start, mut size) = (0, 0);
        for (i, m) in batch.iter().enumerate() {
            let s = message_size(m);
            if i > start && (size + s > budget || i - start >= MAX_ITEMS) {
                out.push(&batch[start..i]);
                (start, size) = (i, 0);
            }
            size += s;
        }
        if start < batch.len() {
            out.push(&batch[start..]);
        }
        out
    }

    fn tag_call(&self, tags: &[DeliveryTag], op: fn(Vec<DeliveryTag>) -> Op) -> Vec<Op> {
        tags.chunks(MAX_ITEMS).map(|c| op(c.to_vec())).collect()
    }

    async fn done(&self, ops: Vec<Op>) -> Result<(), BufferError> {
        for op in ops {
            let what = op.name();
            match self.call(op).await? {
                Reply::Done => {}
                other => return Err(self.unexpected(what, &other)),
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Buffer for RemoteBuffer {
    fn name(&self) -> &BufferName {
        &self.name
    }

    async fn append(&self, batch: &[Message]) -> Result<Appended, BufferError> {
        let mut total = Appended::default();
        // A batch over one frame goes as several appends; one refused as full stops
        // the rest, and the writer retries the whole batch, whose ids make the parts
        // already written duplicates rather than copies.
        for chunk in Self::chunks(batch) {
            let message = match chunk {
                [one] if message_size(one) > MAX_FRAME - 1024 => {
                    return Err(BufferError::Invalid(format!(
                        "a message of {} bytes does not fit in a buffer call of at most {MAX_FRAME}",
                        message_size(one)
                    )));
                }
                _ => chunk.to_vec(),
            };
            match self.call(Op::Append(message)).await? {
                Reply::Appended(a) => {
                    total.written += a.written;
                    total.duplicates += a.duplicates;
                }
                other => return Err(self.unexpected("append", &other)),
            }
        }
        Ok(total)
    }

    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BufferError> {
        let max = u32::try_from(max.clamp(1, MAX_ITEMS)).unwrap_or(1);
        match self
            .call(Op::Fetch {
                max,
                wait: wait.min(MAX_WAIT),
            })
            .await?
        {
            Reply::Fetched(ds) => Ok(ds),
            other => Err(self.unexpected("fetch", &other)),
        }
    }

    async fn ack(&self, tags: &[DeliveryTag]) -> Result<(), BufferError> {
        self.done(self.tag_call(tags, Op::Ack)).await
    }

    async fn nack(&self, tags: &[DeliveryTag], delay: Duration) -> Result<(), BufferError> {
        let ops = tags
            .chunks(MAX_ITEMS)
            .map(|c| Op::Nack {
                tags: c.to_vec(),
                delay,
            })
            .collect();
        self.done(ops).await
    }

    async fn keep_alive(&self, tags: &[DeliveryTag]) -> Result<(), BufferError> {
        self.done(self.tag_call(tags, Op::KeepAlive)).await
    }

    async fn stats(&self) -> Result<BufferStats, BufferError> {
        match self.call(Op::Stats).await? {
            Reply::Stats(s) => Ok(s),
            other => Err(self.unexpected("stats", &other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(i: u8) -> Message {
        Message {
            id: MessageId(u128::from(i) << 100 | 7),
            key: Bytes::from(vec![i; usize::from(i % 3)]),
            event_time: -5 + i64::from(i),
            payload: Bytes::from(vec![i; usize::from(i)]),
        }
    }

    fn calls() -> Vec<Call> {
        let tags = vec![DeliveryTag(1), DeliveryTag(u64::MAX)];
        [
            Op::Append((0..20).map(msg).collect()),
            Op::Append(Vec::new()),
            Op::Fetch {
                max: 500,
                wait: Duration::from_millis(200),
            },
            Op::Ack(tags.clone()),
            Op::Nack {
                tags: tags.clone(),
                delay: Duration::from_secs(1),
            },
            Op::KeepAlive(tags),
            Op::Stats,
        ]
        .into_iter()
        .enumerate()
        .map(|(i, op)| Call {
            id: i as u64 * 1_000_003,
            buffer: "default.etl.map-1.0".into(),
            op,
        })
        .collect()
    }

    fn answers() -> Vec<Answer> {
        let name = BufferName::new("p", "q", "r", 3).unwrap();
        let results = vec![
            Ok(Reply::Appended(Appended {
                written: 5,
                duplicates: 2,
            })),
            Ok(Reply::Fetched(
                (0..10)
                    .map(|i| Delivery {
                        tag: DeliveryTag(u64::from(i) + 9),
                        redeliveries: u32::from(i),
                        message: msg(i),
                    })
                    .collect(),
            )),
            Ok(Reply::Done),
            Ok(Reply::Stats(BufferStats {
                pending: 1,
                unacked: 2,
                usage: 0.25,
                acked_total: 3,
                written_total: 4,
                duplicates_total: 5,
            })),
            Err(BufferError::Full {
                name: name.clone(),
                pending: 10,
                limit: 8,
            }),
            Err(BufferError::NotFound(name)),
            Err(BufferError::Invalid("bad".into())),
            Err(BufferError::Backend("disk on fire".into())),
        ];
        results
            .into_iter()
            .enumerate()
            .map(|(i, result)| Answer {
                id: i as u64,
                result,
            })
            .collect()
    }

    fn same(a: &Answer, b: &Answer) -> bool {
        a.id == b.id
            && match (&a.result, &b.result) {
                (Ok(x), Ok(y)) => x == y,
                (Err(x), Err(y)) => x.to_string() == y.to_string(),
                _ => false,
            }
    }

    #[test]
    fn calls_and_answers_round_trip() {
        for call in calls() {
            let frame = encode_call(&call);
            assert_eq!(frame_id(&frame), Some(call.id));
            assert_eq!(decode_call(&frame).unwrap(), call);
        }
        for answer in answers() {
            let back = decode_answer(&encode_answer(&answer)).unwrap();
            assert!(same(&back, &answer), "{answer:?} came back as {back:?}");
        }
        // Full keeps its kind, so a writer still waits on it.
        let full = decode_answer(&encode_answer(&answers().remove(4))).unwrap();
        assert!(matches!(
            full.result,
            Err(BufferError::Full { limit: 8, .. })
        ));
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        for call in calls() {
            let frame = encode_call(&call);
            for cut in 0..frame.len() {
                assert!(decode_call(&frame[..cut]).is_err(), "{call:?} cut at {cut}");
            }
            let mut longer = frame.to_vec();
            longer.push(0);
            assert_eq!(decode_call(&longer), Err(DecodeError::Trailing(1)));
        }
        for answer in answers() {
            let frame = encode_answer(&answer);
            for cut in 0..frame.len() {
                assert!(decode_answer(&frame[..cut]).is_err(), "cut at {cut}");
            }
        }
    }

    #[test]
    fn garbage_is_refused_with_a_reason() {
        // A cheap deterministic generator: varied garbage, the same on every run.
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        for len in 0..2_000 {
            let frame: Vec<u8> = (0..len % 300)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            // Most garbage fails; whatever decodes must have been well-formed.
            let _ = decode_call(&frame).map(|c| encode_call(&c));
            let _ = decode_answer(&frame);
            // With a valid header the body is what gets checked.
            let mut framed = vec![VERSION, KIND_CALL];
            framed.extend_from_slice(&frame);
            let _ = decode_call(&framed);
        }
        let mut bad_version = encode_call(&calls()[0]).to_vec();
        bad_version[0] = 9;
        assert_eq!(decode_call(&bad_version), Err(DecodeError::Version(9)));
        assert_eq!(
            decode_answer(&encode_call(&calls()[0])).unwrap_err(),
            DecodeError::Kind {
                got: "call",
                want: "answer"
            }
        );
    }

    #[test]
    fn limits_are_enforced_before_allocating() {
        // A count claiming a billion messages in a tiny frame.
        let mut frame = BytesMut::new();
        header(&mut frame, KIND_CALL, 1);
        put_name(&mut frame, "a.b.c.0");
        frame.put_u8(1);
        frame.put_u32_le(1_000_000_000);
        let e = decode_call(&frame).unwrap_err();
        assert!(e.to_string().contains("over the limit of 10000"), "{e}");
        // A long fetch wait.
        let call = Call {
            id: 1,
            buffer: "a.b.c.0".into(),
            op: Op::Fetch {
                max: 1,
                wait: Duration::from_secs(31),
            },
        };
        let e = decode_call(&encode_call(&call)).unwrap_err();
        assert!(e.to_string().contains("fetch wait"), "{e}");
        let big = vec![0u8; MAX_FRAME + 1];
        assert_eq!(decode_call(&big), Err(DecodeError::TooBig(MAX_FRAME + 1)));
        // A payload length past the end of the frame.
        let mut frame = BytesMut::new();
        header(&mut frame, KIND_CALL, 1);
        put_name(&mut frame, "a.b.c.0");
        frame.put_u8(1);
        frame.put_u32_le(1);
        frame.put_u128_le(1);
        frame.put_u32_le(u32::MAX);
        frame.put_slice(&[0; 40]);
        assert!(matches!(
            decode_call(&frame),
            Err(DecodeError::Truncated("a message key"))
        ));
    }

    #[test]
    fn names_parse_as_buffer_names() {
        assert_eq!(
            parse_name("default.etl.map-1.2").unwrap(),
            BufferName::new("default", "etl", "map-1", 2).unwrap()
        );
        for bad in ["", "a.b.c", "a.b.c.d", "a.b.c.0.1", "A.b.c.0", "a..c.0"] {
            assert!(parse_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn big_batches_are_split_to_fit_frames() {
        let big = Message {
            payload: Bytes::from(vec![0u8; 6 << 20]),
            ..msg(1)
        };
        let batch = vec![big.clone(), big.clone(), big.clone(), msg(2)];
        let chunks = RemoteBuffer::chunks(&batch);
        assert_eq!(chunks.iter().map(|c| c.len()).collect::<Vec<_>>(), [2, 2]);
        let many: Vec<Message> = (0..MAX_ITEMS + 5).map(|i| msg(i as u8)).collect();
        let chunks = RemoteBuffer::chunks(&many);
        assert_eq!(chunks.iter().map(|c| c.len()).sum::<usize>(), many.len());
        assert!(chunks.iter().all(|c| c.len() <= MAX_ITEMS));
    }
}
