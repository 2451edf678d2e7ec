//! The on-disk format of an embedded buffer and its recovery.
//!
//! A buffer's directory holds segment files `seg-<first seq>.log` with one record per
//! written message, and `acks.log` with the ranges of sequence numbers acknowledged.
//! Every record of both is framed the same way: a little-endian `u32` body length, the
//! body's CRC-32C as a `u32`, then the body. A frame whose length runs past the end of
//! the file or whose checksum does not match is a write torn by a crash; recovery
//! truncates the file there and warns, because nothing after it was ever acknowledged
//! to a writer as durable.

use crate::{BufferError, Message, MessageId};
use bytes::Bytes;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A segment is rolled once it holds this many bytes, so that fully acknowledged
/// messages free their disk space in steps of this size.
pub(super) const SEGMENT_BYTES: u64 = 64 << 20;
/// The ack log is rewritten with only the ranges still needed once it grows past this.
pub(super) const ACK_LOG_COMPACT_BYTES: u64 = 4 << 20;
/// No valid record is larger; a bigger length is corruption, not a reason to allocate.
const MAX_RECORD_BYTES: usize = 256 << 20;
/// Ranges per record of a compacted ack log, to keep each record well under the limit.
const RANGES_PER_RECORD: usize = 65_536;
const FRAME_HEADER: usize = 8;
/// seq, id, event time, written time, key length.
const MESSAGE_FIXED: usize = 8 + 16 + 8 + 8 + 4;
pub(super) const ACK_LOG: &str = "acks.log";

/// Turns an I/O error into the backend error, naming the file and what was being done.
pub(super) fn io_err(path: &Path, what: &str, err: std::io::Error) -> BufferError {
    BufferError::Backend(format!("{what} {}: {err}", path.display()))
}

pub(super) fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("seg-{first_seq:020}.log"))
}

fn parse_segment_name(name: &str) -> Option<u64> {
    name.strip_prefix("seg-")?
        .strip_suffix(".log")?
        .parse()
        .ok()
}

fn frame(buf: &mut [u8], body_start: usize) {
    let body = &buf[body_start + FRAME_HEADER..];
    // Every body is far below 4 GiB: messages are bounded by MAX_RECORD_BYTES on the
    // way in and ack records by RANGES_PER_RECORD.
    let len = body.len() as u32;
    let crc = crc32c::crc32c(body);
    buf[body_start..body_start + 4].copy_from_slice(&len.to_le_bytes());
    buf[body_start + 4..body_start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Whether a message fits in one record.
pub(super) fn check_size(message: &Message) -> Result<(), BufferError> {
    let size = MESSAGE_FIXED + message.key.len() + message.payload.len();
    if size > MAX_RECORD_BYTES {
        return Err(BufferError::Invalid(format!(
            "message {}: {size} bytes of key and payload, expected at most {MAX_RECORD_BYTES}",
            message.id
        )));
    }
    Ok(())
}

/// Appends the framed record of one message to `buf`.
pub(super) fn encode_message(buf: &mut Vec<u8>, seq: u64, written_ms: i64, message: &Message) {
    let start = buf.len();
    buf.extend_from_slice(&[0; FRAME_HEADER]);
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(&message.id.0.to_le_bytes());
    buf.extend_from_slice(&message.event_time.to_le_bytes());
    buf.extend_from_slice(&written_ms.to_le_bytes());
    // check_size bounds the key far below 4 GiB.
    buf.extend_from_slice(&(message.key.len() as u32).to_le_bytes());
    buf.extend_from_slice(&message.key);
    buf.extend_from_slice(&message.payload);
    frame(buf, start);
}

/// Appends ack records to `buf`: the buffer's duplicate count (so that it survives a
/// restart) and half-open ranges of acknowledged sequence numbers.
pub(super) fn encode_acks(buf: &mut Vec<u8>, duplicates_total: u64, ranges: &[(u64, u64)]) {
    let mut chunks = ranges.chunks(RANGES_PER_RECORD).peekable();
    if chunks.peek().is_none() {
        // Still written, to carry the duplicate count.
        encode_ack_record(buf, duplicates_total, &[]);
    }
    for chunk in chunks {
        encode_ack_record(buf, duplicates_total, chunk);
    }
}

fn encode_ack_record(buf: &mut Vec<u8>, duplicates_total: u64, ranges: &[(u64, u64)]) {
    let start = buf.len();
    buf.extend_from_slice(&[0; FRAME_HEADER]);
    buf.extend_from_slice(&duplicates_total.to_le_bytes());
    for (from, to) in ranges {
        buf.extend_from_slice(&from.to_le_bytes());
        buf.extend_from_slice(&to.to_le_bytes());
    }
    frame(buf, start);
}

/// Sorted sequence numbers as half-open ranges of consecutive ones.
pub(super) fn ranges_of(sorted: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &seq in sorted {
        match out.last_mut() {
            Some((_, to)) if *to == seq => *to += 1,
            _ => out.push((seq, seq + 1)),
        }
    }
    out
}

/// The valid framed bodies at the start of `data`, and the length of that valid prefix.
fn frames(data: &[u8]) -> (Vec<&[u8]>, usize) {
    let mut bodies = Vec::new();
    let mut pos = 0;
    while data.len() - pos >= FRAME_HEADER {
        let len = u32::from_le_bytes([data[pos], data[pos + 1], data[pos + 2], data[pos + 3]]);
        let crc = u32::from_le_bytes([data[pos + 4], data[pos + 5], data[pos + 6], data[pos + 7]]);
        let len = len as usize;
        let end = pos + FRAME_HEADER + len;
        if len > MAX_RECORD_BYTES || end > data.len() {
            break;
        }
        let body = &data[pos + FRAME_HEADER..end];
        if crc32c::crc32c(body) != crc {
            break;
        }
        bodies.push(body);
        pos = end;
    }
    (bodies, pos)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// A message record read back: its sequence number, when it was written and the message.
pub(super) struct Record {
    pub seq: u64,
    pub written_ms: i64,
    pub message: Message,
}

fn decode_message(body: &[u8]) -> Option<Record> {
    if body.len() < MESSAGE_FIXED {
        return None;
    }
    let seq = u64_at(body, 0);
    let mut id = [0; 16];
    id.copy_from_slice(&body[8..24]);
    let event_time = u64_at(body, 24) as i64;
    let written_ms = u64_at(body, 32) as i64;
    let key_len = u32::from_le_bytes([body[40], body[41], body[42], body[43]]) as usize;
    let rest = &body[MESSAGE_FIXED..];
    if key_len > rest.len() {
        return None;
    }
    Some(Record {
        seq,
        written_ms,
        message: Message {
            id: MessageId(u128::from_le_bytes(id)),
            key: Bytes::copy_from_slice(&rest[..key_len]),
            event_time,
            // Copied rather than sliced from the file's bytes, so a pending message does
            // not keep its whole segment in memory.
            payload: Bytes::copy_from_slice(&rest[key_len..]),
        },
    })
}

fn decode_acks(body: &[u8]) -> Option<(u64, Vec<(u64, u64)>)> {
    if body.len() < 8 || !(body.len() - 8).is_multiple_of(16) {
        return None;
    }
    let dups = u64_at(body, 0);
    let ranges = body[8..]
        .chunks_exact(16)
        .map(|c| (u64_at(c, 0), u64_at(c, 8)))
        .collect();
    Some((dups, ranges))
}

/// Cuts a file back to its valid prefix after a torn or corrupt record, with a warning.
fn truncate_torn(path: &Path, valid: usize, len: usize) -> Result<(), BufferError> {
    tracing::warn!(
        file = %path.display(),
        valid_bytes = valid,
        dropped_bytes = len - valid,
        "torn or corrupt record (a write cut short by a crash); truncating the file to its last valid record"
    );
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| io_err(path, "opening to truncate", e))?;
    file.set_len(valid as u64)
        .map_err(|e| io_err(path, "truncating", e))?;
    file.sync_all().map_err(|e| io_err(path, "syncing", e))
}

pub(super) fn sync_dir(dir: &Path) -> Result<(), BufferError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(dir, "syncing directory", e))
}

/// One segment file as the buffer tracks it.
#[derive(Clone, Debug)]
pub(super) struct SegmentInfo {
    pub first_seq: u64,
    /// When its newest record was written (ms since the epoch): a segment is kept for
    /// the de-duplication window after that, so a restart still knows its ids.
    pub last_write_ms: i64,
}

/// The file a buffer appends records to, with its size so far.
pub(super) struct Appender {
    pub path: PathBuf,
    pub file: File,
    pub len: u64,
}

impl Appender {
    pub fn open(path: PathBuf) -> Result<Appender, BufferError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| io_err(&path, "opening", e))?;
        let len = file
            .metadata()
            .map_err(|e| io_err(&path, "reading the size of", e))?
            .len();
        Ok(Appender { path, file, len })
    }

    /// Writes and syncs `buf`: once this returns, the bytes survive a crash.
    pub fn write_synced(&mut self, buf: &[u8]) -> Result<(), BufferError> {
        self.file
            .write_all(buf)
            .map_err(|e| io_err(&self.path, "writing", e))?;
        self.file
            .sync_data()
            .map_err(|e| io_err(&self.path, "syncing", e))?;
        self.len += buf.len() as u64;
        Ok(())
    }
}

/// Everything recovery found in a buffer's directory.
pub(super) struct Recovered {
    /// Messages written and not acknowledged, by sequence number.
    pub pending: BTreeMap<u64, (i64, Message)>,
    /// Ids written inside the de-duplication window, oldest first.
    pub recent: Vec<(i64, MessageId)>,
    pub next_seq: u64,
    pub duplicates_total: u64,
    pub segments: Vec<SegmentInfo>,
    pub segment: Appender,
    pub acks: Appender,
}

/// Reads a buffer's directory back: the ack log first, then every segment in order,
/// truncating torn tails. Creates the directory and a first segment when there are none.
pub(super) fn recover(dir: &Path, window_start_ms: i64) -> Result<Recovered, BufferError> {
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, "creating", e))?;

    let ack_path = dir.join(ACK_LOG);
    let mut acked: Vec<(u64, u64)> = Vec::new();
    let mut duplicates_total = 0;
    match std::fs::read(&ack_path) {
        Ok(data) => {
            let (bodies, valid) = frames(&data);
            let mut good = 0;
            for body in bodies {
                let Some((dups, ranges)) = decode_acks(body) else {
                    break;
                };
                duplicates_total = dups;
                acked.extend(ranges);
                good += FRAME_HEADER + body.len();
            }
            if good < data.len() {
                truncate_torn(&ack_path, good.min(valid), data.len())?;
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&ack_path, "reading", e)),
    }
    acked.sort_unstable();
    let acked = merge(acked);
    let is_acked = |seq: u64| {
        let i = acked.partition_point(|&(from, _)| from <= seq);
        i > 0 && seq < acked[i - 1].1
    };

    let mut firsts = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io_err(dir, "listing", e))? {
        let entry = entry.map_err(|e| io_err(dir, "listing", e))?;
        if let Some(first) = entry.file_name().to_str().and_then(parse_segment_name) {
            firsts.push(first);
        }
    }
    firsts.sort_unstable();

    let mut pending = BTreeMap::new();
    let mut recent = Vec::new();
    let mut segments = Vec::new();
    let mut next_seq = acked.last().map_or(0, |&(_, to)| to);
    for &first in &firsts {
        let path = segment_path(dir, first);
        let data = std::fs::read(&path).map_err(|e| io_err(&path, "reading", e))?;
        let (bodies, _) = frames(&data);
        let mut good = 0;
        let mut last_write_ms = 0;
        next_seq = next_seq.max(first);
        for body in bodies {
            let Some(record) = decode_message(body) else {
                break;
            };
            good += FRAME_HEADER + body.len();
            next_seq = next_seq.max(record.seq + 1);
            last_write_ms = record.written_ms;
            if record.written_ms >= window_start_ms {
                recent.push((record.written_ms, record.message.id));
            }
            if !is_acked(record.seq) {
                pending.insert(record.seq, (record.written_ms, record.message));
            }
        }
        if good < data.len() {
            truncate_torn(&path, good, data.len())?;
        }
        segments.push(SegmentInfo {
            first_seq: first,
            last_write_ms,
        });
    }

    let segment = match segments.last() {
        Some(last) => Appender::open(segment_path(dir, last.first_seq))?,
        None => {
            let appender = Appender::open(segment_path(dir, next_seq))?;
            sync_dir(dir)?;
            segments.push(SegmentInfo {
                first_seq: next_seq,
                last_write_ms: 0,
            });
            appender
        }
    };
    let acks = Appender::open(ack_path)?;
    Ok(Recovered {
        pending,
        recent,
        next_seq,
        duplicates_total,
        segments,
        segment,
        acks,
    })
}

/// Sorted half-open ranges with overlapping and touching ones joined.
fn merge(sorted: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(sorted.len());
    for (from, to) in sorted {
        match out.last_mut() {
            Some((_, end)) if from <= *end => *end = (*end).max(to),
            _ => out.push((from, to)),
        }
    }
    out
}

/// Replaces the ack log with one holding only `ranges`, atomically (write a new file,
/// sync it, rename it over the old one, sync the directory), and opens it for appending.
pub(super) fn rewrite_ack_log(
    dir: &Path,
    duplicates_total: u64,
    ranges: &[(u64, u64)],
) -> Result<Appender, BufferError> {
    let tmp = dir.join("acks.log.tmp");
    let mut buf = Vec::with_capacity(16 * ranges.len() + 64);
    encode_acks(&mut buf, duplicates_total, ranges);
    let mut file = File::create(&tmp).map_err(|e| io_err(&tmp, "creating", e))?;
    file.write_all(&buf)
        .and_then(|()| file.sync_all())
        .map_err(|e| io_err(&tmp, "writing", e))?;
    let path = dir.join(ACK_LOG);
    std::fs::rename(&tmp, &path).map_err(|e| io_err(&path, "replacing", e))?;
    sync_dir(dir)?;
    Appender::open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(i: u128, payload: &str) -> Message {
        Message {
            id: MessageId(i),
            key: Bytes::from_static(b"k"),
            event_time: -5,
            payload: Bytes::copy_from_slice(payload.as_bytes()),
        }
    }

    #[test]
    fn message_records_round_trip() {
        let mut buf = Vec::new();
        encode_message(&mut buf, 7, 1234, &message(99, "hello"));
        encode_message(&mut buf, 8, 1235, &message(100, ""));
        let (bodies, valid) = frames(&buf);
        assert_eq!(valid, buf.len());
        let records: Vec<Record> = bodies.into_iter().filter_map(decode_message).collect();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].seq, 7);
        assert_eq!(records[0].written_ms, 1234);
        assert_eq!(records[0].message, message(99, "hello"));
        assert_eq!(records[1].message, message(100, ""));
    }

    #[test]
    fn a_torn_or_corrupt_tail_ends_the_valid_prefix() {
        let mut buf = Vec::new();
        encode_message(&mut buf, 0, 1, &message(1, "first"));
        let first_len = buf.len();
        encode_message(&mut buf, 1, 1, &message(2, "second"));
        // Each case damages the second record; only the first must remain.
        type Damage = fn(&mut Vec<u8>);
        let cases: [(&str, Damage); 3] = [
            ("cut short", |b| b.truncate(b.len() - 3)),
            ("flipped payload byte", |b| {
                let n = b.len();
                b[n - 1] ^= 0x40;
            }),
            ("header only", |b| b.truncate(b.len() - 20)),
        ];
        for (what, damage) in cases {
            let mut torn = buf.clone();
            damage(&mut torn);
            let (bodies, valid) = frames(&torn);
            assert_eq!(bodies.len(), 1, "{what}");
            assert_eq!(valid, first_len, "{what}");
        }
    }

    #[test]
    fn ranges_are_built_and_merged() {
        assert_eq!(ranges_of(&[1, 2, 3, 5, 7, 8]), vec![(1, 4), (5, 6), (7, 9)]);
        assert_eq!(ranges_of(&[]), vec![]);
        assert_eq!(
            merge(vec![(0, 2), (1, 3), (3, 4), (6, 7)]),
            vec![(0, 4), (6, 7)]
        );
        let mut buf = Vec::new();
        encode_acks(&mut buf, 3, &[(1, 4), (9, 10)]);
        let (bodies, _) = frames(&buf);
        assert_eq!(decode_acks(bodies[0]), Some((3, vec![(1, 4), (9, 10)])));
    }
}
