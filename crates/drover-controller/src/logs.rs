//! Task logs as the controller keeps them, filled from the chunks agents push at the
//! byte offsets the agent's own files have.
//!
//! Each task has a directory, and each of its streams is kept as at most two segment
//! files named by the stream offset of their first byte (`stdout.0.log`,
//! `stdout.33554432.log`). A segment holds at most half of the stream's cap; when the
//! newest is full a new one is started and the oldest beyond two is deleted, so a
//! stream never takes more than its cap and always keeps its latest output. Offsets
//! stay those of the whole stream, so agents, followers and replays never need to know
//! that anything was dropped; a reader asking for dropped bytes is told where the kept
//! output starts. Because a segment's name carries its offset, a crash at any point of
//! a rotation leaves files that read back consistently.
//!
//! Beside each segment is its time index (`stdout.0.idx`): marks of 16 bytes, each the
//! stream offset of a chunk's first new byte and the time the agent read it, for
//! `drover logs --since` and `--timestamps`. A mark is added only for a chunk that
//! stores new bytes at a later time than the stream's last mark (and one at each
//! segment's base), so replays add nothing; a segment keeps at most [`max_marks`] of
//! them, thinned by merging the closest in time when full; and an index goes with its
//! segment. The index is written after the bytes it describes, so a crash loses at
//! most a mark (those bytes then show the time before) or leaves half a mark, which is
//! cut off when the stream is next read. An index that is missing or damaged makes the
//! times of its segment unknown: shown without a time, and never skipped by `--since`.

use drover_core::protocol::LogStream;
use drover_core::{Millis, TaskId};
use prometheus_client::metrics::gauge::Gauge;
use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// What an append did with a chunk.
#[derive(Debug, PartialEq, Eq)]
pub enum Appended {
    /// New bytes were stored.
    Stored,
    /// Everything in it was stored already (a replay).
    Duplicate,
    /// It starts past what is stored: the bytes in between must be sent first.
    Gap { have: u64 },
}

/// Bytes read from a stream.
#[derive(Debug, PartialEq, Eq)]
pub struct ReadBack {
    /// The stream offset of `data`'s first byte. It is past the offset asked for when
    /// the bytes in between were dropped by the stream's cap.
    pub start: u64,
    pub data: Vec<u8>,
}

/// One entry of a time index: the bytes from `offset` on (up to the next mark) were
/// read from the task's file at `at`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark {
    pub offset: u64,
    pub at: Millis,
}

/// The bytes of one mark on disk: the offset and the time, little-endian.
const MARK_LEN: u64 = 16;

/// Where a `--since` starts reading a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SinceStart {
    pub offset: u64,
    /// Whether anything stored is at or after the time (or of unknown time). When not,
    /// `offset` is the stream's end and output still to come may be older than the
    /// time too, so the lookup is made again when it comes.
    pub found: bool,
}

#[derive(Clone, Copy, Debug)]
struct Segment {
    /// The stream offset of the segment's first byte.
    base: u64,
    len: u64,
    /// How many marks its time index holds.
    marks: u64,
    /// Its time index could not be written: no more marks go to it, so that the
    /// bytes after the failure read as older rather than in a damaged order.
    unindexed: bool,
}

/// One stream's segments, oldest first.
#[derive(Debug, Default)]
struct Stream {
    segments: Vec<Segment>,
    /// The time of the stream's newest mark: a chunk is marked only when it is later.
    last_at: Option<Millis>,
}

impl Stream {
    fn end(&self) -> u64 {
        self.segments.last().map_or(0, |s| s.base + s.len)
    }

    fn start(&self) -> u64 {
        self.segments.first().map_or(0, |s| s.base)
    }
}

pub struct LogStore {
    dir: PathBuf,
    /// Each stream's segments, read from the disk on first use, so appends need no
    /// listing or stat call.
    streams: Mutex<HashMap<(TaskId, LogStream), Stream>>,
    /// Bytes stored for all tasks, as `drover_log_bytes`.
    bytes: Gauge,
}

/// How many segments a stream keeps: the one being written and the one before it.
const SEGMENTS_KEPT: usize = 2;

/// The most marks a segment of `segment_cap` bytes keeps: one per 256 bytes, at most
/// 4,096, so its index takes at most a sixteenth of the segment (2 KiB of a 32 KiB
/// segment, 64 KiB of the default 32 MiB). A segment too small for one mark (only
/// tests make such) has no index.
fn max_marks(segment_cap: u64) -> u64 {
    (segment_cap / 256).min(4096)
}

/// The bytes of output a segment of `segment_cap` holds: what its index may take is
/// kept free, so that a stream with its indexes stays within its cap.
fn segment_data_cap(segment_cap: u64) -> u64 {
    (segment_cap - max_marks(segment_cap) * MARK_LEN).max(1)
}

/// Reads a time index's bytes for a segment from `base` to `end`. Marks at or past
/// `end` end the reading (they describe bytes written after the caller looked), as does
/// half a mark (one being written, or cut by a crash). Returns the marks and how many
/// bytes they took, or `None` when the index is damaged: offsets not increasing inside
/// the segment, or times going backwards.
fn parse_marks(bytes: &[u8], base: u64, end: u64) -> Option<(Vec<Mark>, u64)> {
    let mut marks: Vec<Mark> = Vec::new();
    for rec in bytes.chunks_exact(MARK_LEN as usize) {
        let (o, t) = rec.split_at(8);
        // `chunks_exact` gives slices of 16 bytes, split into two of 8.
        let offset = u64::from_le_bytes(o.try_into().ok()?);
        let at = i64::from_le_bytes(t.try_into().ok()?);
        if offset >= end {
            break;
        }
        let in_order = marks.last().is_none_or(|l| offset > l.offset && at >= l.at);
        if offset < base || at < 0 || !in_order {
            return None;
        }
        marks.push(Mark { offset, at });
    }
    let used = marks.len() as u64 * MARK_LEN;
    Some((marks, used))
}

/// At most `keep` of `marks`, the first always among them: those closest in time to
/// the one kept before them are merged into it, the smallest gap doubling until few
/// enough are left. Bursts thus collapse first and long quiet gaps are kept.
fn thin(marks: &[Mark], keep: usize) -> Vec<Mark> {
    let mut gap: Millis = 1;
    loop {
        let mut kept: Vec<Mark> = Vec::with_capacity(keep);
        for m in marks {
            if kept.last().is_none_or(|l| m.at - l.at >= gap) {
                kept.push(*m);
            }
        }
        if kept.len() <= keep.max(1) {
            return kept;
        }
        gap = gap.saturating_mul(2);
    }
}

fn encode_marks(marks: &[Mark]) -> Vec<u8> {
    let mut out = Vec::with_capacity(marks.len() * MARK_LEN as usize);
    for m in marks {
        out.extend_from_slice(&m.offset.to_le_bytes());
        out.extend_from_slice(&m.at.to_le_bytes());
    }
    out
}

/// A segment's marks as a reader sees them, with the part of the stream it holds.
struct SegmentMarks {
    base: u64,
    end: u64,
    /// Empty when its index is missing or damaged: times unknown.
    marks: Vec<Mark>,
}

impl SegmentMarks {
    /// The time of the byte at `offset`, inside this segment: that of the last mark at
    /// or before it; unknown before the first.
    fn time_at(&self, offset: u64) -> Option<Millis> {
        self.marks
            .iter()
            .take_while(|m| m.offset <= offset)
            .last()
            .map(|m| m.at)
    }
}

impl LogStore {
    /// Opens the logs directory; `bytes` is set to what it holds and kept up to date.
    pub fn new(dir: PathBuf, bytes: Gauge) -> io::Result<LogStore> {
        std::fs::create_dir_all(&dir)?;
        let total = disk_usage(&dir)?;
        bytes.set(i64::try_from(total).unwrap_or(i64::MAX));
        Ok(LogStore {
            dir,
            streams: Mutex::new(HashMap::new()),
            bytes,
        })
    }

    /// Counts bytes written. The gauge's previous value, which it returns, is not needed.
    fn stored(&self, n: u64) {
        self.bytes.inc_by(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Counts bytes deleted.
    fn freed(&self, n: u64) {
        self.bytes.dec_by(i64::try_from(n).unwrap_or(i64::MAX));
    }

    fn task_dir(&self, task: &TaskId) -> PathBuf {
        self.dir.join(task.as_str())
    }

    fn segment_path(&self, task: &TaskId, stream: LogStream, base: u64) -> PathBuf {
        self.task_dir(task)
            .join(format!("{}.{base}.log", stream.as_str()))
    }

    /// The time index of the segment starting at `base`.
    fn index_path(&self, task: &TaskId, stream: LogStream, base: u64) -> PathBuf {
        self.task_dir(task)
            .join(format!("{}.{base}.idx", stream.as_str()))
    }

    /// Where controllers before segments kept a stream: one file, from offset 0.
    fn legacy_path(&self, task: &TaskId, stream: LogStream) -> PathBuf {
        self.dir
            .join(format!("{}.{}.log", task.as_str(), stream.as_str()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(TaskId, LogStream), Stream>> {
        // A panic while holding the lock leaves at worst a stale size, which the next
        // append's gap check corrects, so a poisoned lock is still usable.
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads a stream's segments from the disk, moving a file of the old layout into
    /// the new one first.
    fn load(&self, task: &TaskId, stream: LogStream) -> io::Result<Stream> {
        let legacy = self.legacy_path(task, stream);
        if legacy.exists() {
            std::fs::create_dir_all(self.task_dir(task))?;
            std::fs::rename(&legacy, self.segment_path(task, stream, 0))?;
        }
        let entries = match std::fs::read_dir(self.task_dir(task)) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Stream::default()),
            Err(e) => return Err(e),
        };
        let prefix = format!("{}.", stream.as_str());
        let mut segments = Vec::new();
        let mut indexes = Vec::new();
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
                continue;
            };
            let base = |suffix: &str| rest.strip_suffix(suffix)?.parse::<u64>().ok();
            if let Some(base) = base(".log") {
                segments.push(Segment {
                    base,
                    len: entry.metadata()?.len(),
                    marks: 0,
                    unindexed: false,
                });
            } else if let Some(base) = base(".idx") {
                indexes.push(base);
            } else if base(".idx.tmp").is_some() {
                // A thinned index a crash left before its rename: the index it was
                // to replace is still whole.
                self.remove_logged(task, &entry.path());
            }
        }
        segments.sort_by_key(|s| s.base);
        // An index whose segment went (a crash between the two deletions of a
        // rotation) describes nothing.
        for base in indexes {
            if !segments.iter().any(|s| s.base == base) {
                self.remove_logged(task, &self.index_path(task, stream, base));
            }
        }
        let mut last_at = None;
        for seg in &mut segments {
            if let Some(at) = self.load_marks(task, stream, seg) {
                last_at = Some(at);
            }
        }
        Ok(Stream { segments, last_at })
    }

    /// Deletes a file, counting its bytes as freed and logging a failure, which only
    /// leaves the file for the task's removal.
    fn remove_logged(&self, task: &TaskId, path: &Path) {
        let len = std::fs::metadata(path).map_or(0, |m| m.len());
        match std::fs::remove_file(path) {
            Ok(()) => self.freed(len),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(task = %task, "removing {}: {e}", path.display()),
        }
    }

    /// Reads a segment's time index to learn how many marks it has and the time of the
    /// last, cutting off half a mark left by a crash. A damaged index is emptied (the
    /// segment's times become unknown, and new marks start it again); one that cannot
    /// be read or cut leaves the segment unindexed. Neither is an error: the output
    /// itself is unharmed.
    fn load_marks(&self, task: &TaskId, stream: LogStream, seg: &mut Segment) -> Option<Millis> {
        let path = self.index_path(task, stream, seg.base);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(task = %task, "reading the time index {}: {e}; the times of that output are unknown", path.display());
                seg.unindexed = true;
                return None;
            }
        };
        let whole = bytes.len() as u64 / MARK_LEN * MARK_LEN;
        let (marks, keep) = match parse_marks(&bytes, seg.base, seg.base + seg.len) {
            Some((marks, used)) if used == whole => (marks, used),
            _ => {
                tracing::warn!(task = %task, "the time index {} is damaged; the times of that output are unknown", path.display());
                (Vec::new(), 0)
            }
        };
        if keep < bytes.len() as u64 {
            let cut = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_len(keep));
            match cut {
                Ok(()) => self.freed(bytes.len() as u64 - keep),
                Err(e) => {
                    tracing::warn!(task = %task, "cutting the time index {}: {e}; the times of that output are unknown", path.display());
                    seg.unindexed = true;
                    return None;
                }
            }
        }
        seg.marks = marks.len() as u64;
        marks.last().map(|m| m.at)
    }

    fn with_stream<T>(
        &self,
        task: &TaskId,
        stream: LogStream,
        f: impl FnOnce(&mut Stream) -> io::Result<T>,
    ) -> io::Result<T> {
        let mut streams = self.lock();
        let key = (task.clone(), stream);
        if !streams.contains_key(&key) {
            let loaded = self.load(task, stream)?;
            streams.insert(key.clone(), loaded);
        }
        match streams.get_mut(&key) {
            Some(s) => f(s),
            // Inserted just above, under the same lock.
            None => Err(io::Error::other("log stream vanished under its lock")),
        }
    }

    /// Stores the new part of a chunk, keeping at most `cap` bytes of the stream; `at`
    /// is when its bytes were read from the task's file, for the time index.
    pub fn append(
        &self,
        task: &TaskId,
        stream: LogStream,
        offset: u64,
        data: &[u8],
        cap: u64,
        at: Millis,
    ) -> io::Result<Appended> {
        // The lock covers the whole append so that two chunks of one stream never
        // interleave; log volume is small next to the cost of a task, so one lock is fine.
        self.with_stream(task, stream, |s| {
            let have = s.end();
            let end = offset.saturating_add(data.len() as u64);
            if offset > have {
                return Ok(Appended::Gap { have });
            }
            if end <= have {
                return Ok(Appended::Duplicate);
            }
            // `have - offset` is below `data.len()`, as `offset <= have < end`.
            let mut fresh = &data[(have - offset) as usize..];
            let segment_cap = (cap / 2).max(1);
            let data_cap = segment_data_cap(segment_cap);
            let mut first = true;
            while !fresh.is_empty() {
                let full = s.segments.last().is_none_or(|l| l.len >= data_cap);
                if full {
                    self.start_segment(task, stream, s)?;
                }
                let Some(last) = s.segments.last_mut() else {
                    return Err(io::Error::other("no log segment after starting one"));
                };
                let room = usize::try_from(data_cap - last.len.min(data_cap))
                    .unwrap_or(usize::MAX)
                    .max(1);
                let (now, rest) = fresh.split_at(room.min(fresh.len()));
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(self.segment_path(task, stream, last.base))?;
                let piece_at = last.base + last.len;
                let segment_start = last.len == 0;
                f.write_all(now)?;
                last.len += now.len() as u64;
                self.stored(now.len() as u64);
                fresh = rest;
                // The chunk's first new byte is marked, and the first byte of each
                // segment, so that every segment's times start at its base.
                if first || segment_start {
                    self.mark(task, stream, s, piece_at, at, segment_start, segment_cap);
                }
                first = false;
            }
            Ok(Appended::Stored)
        })
    }

    /// Adds a mark for the bytes from `offset` on to the newest segment's time index,
    /// unless the stream's last mark is as late (a segment's first mark is added anyway,
    /// at the later of the two times). A full index is thinned first. A failure is
    /// logged and leaves the segment unindexed; the bytes are stored either way.
    #[allow(clippy::too_many_arguments)]
    fn mark(
        &self,
        task: &TaskId,
        stream: LogStream,
        s: &mut Stream,
        offset: u64,
        at: Millis,
        segment_start: bool,
        segment_cap: u64,
    ) {
        let at = match s.last_at {
            Some(last) if at <= last && !segment_start => return,
            Some(last) => at.max(last),
            None => at,
        };
        let Some(seg) = s.segments.last_mut() else {
            return;
        };
        if seg.unindexed {
            return;
        }
        let limit = max_marks(segment_cap);
        if limit < 2 {
            // No room to thin into: the segment is too small to be indexed.
            return;
        }
        let path = self.index_path(task, stream, seg.base);
        if seg.marks >= limit
            && let Err(e) = self.thin_index(task, &path, seg, limit / 2)
        {
            tracing::warn!(task = %task, "thinning the time index {}: {e}; later output of that segment shows earlier times", path.display());
            seg.unindexed = true;
            return;
        }
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(&encode_marks(&[Mark { offset, at }])));
        match written {
            Ok(()) => {
                seg.marks += 1;
                s.last_at = Some(at);
                self.stored(MARK_LEN);
            }
            Err(e) => {
                tracing::warn!(task = %task, "writing the time index {}: {e}; later output of that segment shows earlier times", path.display());
                seg.unindexed = true;
            }
        }
    }

    /// Rewrites a segment's full time index with at most `keep` marks. The new index is
    /// written beside it and renamed over it, so a crash leaves one whole index or the
    /// other.
    fn thin_index(
        &self,
        task: &TaskId,
        path: &Path,
        seg: &mut Segment,
        keep: u64,
    ) -> io::Result<()> {
        let bytes = std::fs::read(path)?;
        let marks = parse_marks(&bytes, seg.base, seg.base + seg.len)
            .map(|(m, _)| m)
            .unwrap_or_default();
        let kept = thin(&marks, usize::try_from(keep).unwrap_or(usize::MAX));
        let tmp = path.with_extension("idx.tmp");
        let encoded = encode_marks(&kept);
        let replaced = std::fs::write(&tmp, &encoded).and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = replaced {
            self.remove_logged(task, &tmp);
            return Err(e);
        }
        self.freed(bytes.len() as u64);
        self.stored(encoded.len() as u64);
        seg.marks = kept.len() as u64;
        Ok(())
    }

    /// Starts a segment at the stream's end and deletes those past [`SEGMENTS_KEPT`].
    /// The new file is created before any old one is deleted, so a crash between the
    /// two keeps more than the cap for a moment and never loses the end.
    fn start_segment(&self, task: &TaskId, stream: LogStream, s: &mut Stream) -> io::Result<()> {
        let base = s.end();
        std::fs::create_dir_all(self.task_dir(task))?;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.segment_path(task, stream, base))?;
        s.segments.push(Segment {
            base,
            len: 0,
            marks: 0,
            unindexed: false,
        });
        while s.segments.len() > SEGMENTS_KEPT {
            let old = s.segments.remove(0);
            let path = self.segment_path(task, stream, old.base);
            match std::fs::remove_file(&path) {
                Ok(()) => self.freed(old.len),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    // The stream goes on without it; the file is left for the task's
                    // removal to take.
                    tracing::warn!(task = %task, "dropping the oldest log segment {}: {e}", path.display());
                }
            }
            // After its segment, so a crash in between leaves an index that the next
            // load removes, never a segment whose times are lost.
            self.remove_logged(task, &self.index_path(task, stream, old.base));
        }
        Ok(())
    }

    /// The stream offset just past the last stored byte. Served from memory after the
    /// first look, so a follower can check many tasks for new output without touching
    /// the disk.
    pub fn size_of(&self, task: &TaskId, stream: LogStream) -> u64 {
        match self.with_stream(task, stream, |s| Ok(s.end())) {
            Ok(end) => end,
            Err(e) => {
                tracing::warn!(task = %task, "reading the log of stream {}: {e}", stream.as_str());
                0
            }
        }
    }

    /// Up to `max` bytes of one stream from `offset` on, or from where the kept output
    /// starts if the cap dropped the bytes at `offset`.
    pub fn read_from(
        &self,
        task: &TaskId,
        stream: LogStream,
        offset: u64,
        max: usize,
    ) -> io::Result<ReadBack> {
        // The files are opened under the lock, so a rotation cannot delete one between
        // choosing it and opening it; reading an open file is safe even if it is
        // deleted afterwards.
        let opened = self.with_stream(task, stream, |s| {
            let start = offset.max(s.start());
            let mut files = Vec::new();
            for g in s.segments.iter().filter(|g| g.base + g.len > start) {
                let f = std::fs::File::open(self.segment_path(task, stream, g.base))?;
                files.push((f, *g));
            }
            Ok((start, files))
        })?;
        let (start, files) = opened;
        let mut data = Vec::new();
        let mut at = start;
        for (mut f, seg) in files {
            if data.len() >= max || seg.base > at {
                // Full, or segments that do not follow on (a file removed by hand).
                break;
            }
            f.seek(SeekFrom::Start(at - seg.base))?;
            let want = ((max - data.len()) as u64).min(seg.base + seg.len - at);
            let got = f.take(want).read_to_end(&mut data)?;
            at += got as u64;
            if (got as u64) < want {
                // The segment is shorter than recorded (cut by hand, say): what
                // follows would not be contiguous, so the read stops here.
                break;
            }
        }
        if data.is_empty() {
            return Ok(ReadBack {
                start: offset,
                data,
            });
        }
        Ok(ReadBack { start, data })
    }

    /// The marks of the segments holding bytes of `from..to`. The index files are opened
    /// under the lock, as in [`LogStore::read_from`], and read after it; marks past the
    /// end a segment had then are left out, as are the marks of a damaged index.
    fn segment_marks(
        &self,
        task: &TaskId,
        stream: LogStream,
        from: u64,
        to: u64,
    ) -> io::Result<Vec<SegmentMarks>> {
        let opened = self.with_stream(task, stream, |s| {
            let mut files = Vec::new();
            for g in &s.segments {
                if g.base + g.len <= from || g.base >= to {
                    continue;
                }
                let file = match std::fs::File::open(self.index_path(task, stream, g.base)) {
                    Ok(f) => Some(f),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                    Err(e) => return Err(e),
                };
                files.push((file, *g));
            }
            Ok(files)
        })?;
        let mut out = Vec::with_capacity(opened.len());
        for (file, g) in opened {
            let end = g.base + g.len;
            let mut bytes = Vec::new();
            if let Some(mut f) = file {
                f.read_to_end(&mut bytes)?;
            }
            let marks = parse_marks(&bytes, g.base, end)
                .map(|(m, _)| m)
                .unwrap_or_default();
            out.push(SegmentMarks {
                base: g.base,
                end,
                marks,
            });
        }
        Ok(out)
    }

    /// The times of the bytes `from..to` of a stream, as the offsets where a time starts:
    /// the first is `from`, and each next one has a different time. `None` is a time
    /// unknown (no index, a damaged one, or bytes stored before the first mark).
    pub fn times(
        &self,
        task: &TaskId,
        stream: LogStream,
        from: u64,
        to: u64,
    ) -> io::Result<Vec<(u64, Option<Millis>)>> {
        let mut out: Vec<(u64, Option<Millis>)> = Vec::new();
        let mut push = |offset: u64, at: Option<Millis>| {
            if out.last().is_none_or(|(_, last)| *last != at) {
                out.push((offset.max(from), at));
            }
        };
        for g in self.segment_marks(task, stream, from, to)? {
            let start = from.max(g.base);
            let stop = to.min(g.end);
            if start >= stop {
                continue;
            }
            push(start, g.time_at(start));
            for m in g
                .marks
                .iter()
                .filter(|m| m.offset > start && m.offset < stop)
            {
                push(m.offset, Some(m.at));
            }
        }
        if out.is_empty() {
            out.push((from, None));
        }
        // The first time covers `from` even when the segments began after it.
        out[0].0 = from;
        Ok(out)
    }

    /// Where `drover logs --since` starts a stream: the first line that begins in a chunk
    /// read at or after `at`. Bytes of unknown time are never skipped: the start is
    /// then the first of them.
    pub fn since_offset(
        &self,
        task: &TaskId,
        stream: LogStream,
        at: Millis,
    ) -> io::Result<SinceStart> {
        let segments = self.segment_marks(task, stream, 0, u64::MAX)?;
        for g in &segments {
            if g.end <= g.base {
                continue;
            }
            if g.marks.first().is_none_or(|m| m.offset > g.base) {
                return Ok(SinceStart {
                    offset: g.base,
                    found: true,
                });
            }
            if let Some(m) = g.marks.iter().find(|m| m.at >= at) {
                return Ok(SinceStart {
                    offset: self.line_start_from(task, stream, m.offset)?,
                    found: true,
                });
            }
        }
        Ok(SinceStart {
            offset: segments.last().map_or(0, |g| g.end),
            found: false,
        })
    }

    /// `offset` if a line starts there, else where the next one does. A line that
    /// began before `offset` belongs to an earlier time; an unfinished one is shown
    /// from `offset` rather than hidden.
    fn line_start_from(&self, task: &TaskId, stream: LogStream, offset: u64) -> io::Result<u64> {
        const WINDOW: usize = 64 * 1024;
        if offset == 0 {
            return Ok(0);
        }
        let before = self.read_from(task, stream, offset - 1, 1)?;
        if before.start != offset - 1 || before.data == b"\n" {
            // A newline before it, or the bytes before it were dropped.
            return Ok(offset);
        }
        let mut at = offset;
        loop {
            let read = self.read_from(task, stream, at, WINDOW)?;
            if read.data.is_empty() {
                return Ok(offset);
            }
            if let Some(i) = read.data.iter().position(|b| *b == b'\n') {
                return Ok(read.start + i as u64 + 1);
            }
            at = read.start + read.data.len() as u64;
        }
    }

    /// Where the last `lines` lines of a stream start (`drover logs --tail N`): the
    /// stream's end for 0, where the kept output starts when it holds fewer. A last line
    /// without its newline counts as a line. Reads backwards a window at a time, so a
    /// tail of a large stream reads only about what it returns.
    pub fn tail_offset(&self, task: &TaskId, stream: LogStream, lines: u64) -> io::Result<u64> {
        const WINDOW: u64 = 64 * 1024;
        let end = self.size_of(task, stream);
        if lines == 0 || end == 0 {
            return Ok(end);
        }
        let mut seen = 0u64;
        let mut pos = end;
        loop {
            let from = pos.saturating_sub(WINDOW);
            let read = self.read_from(task, stream, from, (pos - from) as usize)?;
            if read.data.is_empty() || read.start >= pos {
                // Nothing kept before `pos`: the tail is all that is left.
                return Ok(pos);
            }
            let window = &read.data[..(pos - read.start).min(read.data.len() as u64) as usize];
            for (i, b) in window.iter().enumerate().rev() {
                let at = read.start + i as u64;
                // The newline that ends the stream ends its last line; it starts none.
                if *b != b'\n' || at + 1 == end {
                    continue;
                }
                seen += 1;
                if seen == lines {
                    return Ok(at + 1);
                }
            }
            if read.start == 0 || read.start > from {
                // The stream's beginning, or the first byte its cap kept.
                return Ok(read.start);
            }
            pos = read.start;
        }
    }

    /// Deletes every stream of a task.
    pub fn remove(&self, task: &TaskId) {
        let mut streams = self.lock();
        streams.retain(|(t, _), _| t != task);
        self.remove_files(task);
    }

    fn remove_files(&self, task: &TaskId) {
        let dir = self.task_dir(task);
        let freed = disk_usage(&dir).unwrap_or(0);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => self.freed(freed),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(task = %task, "removing the logs in {}: {e}", dir.display()),
        }
        for stream in [LogStream::Stdout, LogStream::Stderr, LogStream::Prepare] {
            let legacy = self.legacy_path(task, stream);
            let len = std::fs::metadata(&legacy).map_or(0, |m| m.len());
            match std::fs::remove_file(&legacy) {
                Ok(()) => self.freed(len),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(task = %task, "removing the log {}: {e}", legacy.display())
                }
            }
        }
    }

    /// Deletes the logs of every task not in `known`: those of tasks removed while the
    /// controller was down, or whose removal failed part-way. Returns how many tasks'
    /// logs went.
    pub fn remove_unknown(&self, known: &HashSet<TaskId>) -> usize {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!("listing the logs in {}: {e}", self.dir.display());
                return 0;
            }
        };
        let mut orphans = HashSet::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            // A task directory, or an old-layout `TASK.STREAM.log` file.
            let id = name.split('.').next().unwrap_or(name);
            let Ok(id) = TaskId::parse(id) else { continue };
            if !known.contains(&id) {
                orphans.insert(id);
            }
        }
        for id in &orphans {
            self.remove(id);
        }
        orphans.len()
    }
}

/// The bytes of the regular files under `path`, which may be a file or a directory.
fn disk_usage(path: &Path) -> io::Result<u64> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    if meta.is_file() {
        return Ok(meta.len());
    }
    if !meta.is_dir() {
        return Ok(0);
    }
    let mut total = 0;
    for entry in std::fs::read_dir(path)? {
        total += disk_usage(&entry?.path())?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BIG: u64 = 1 << 30;
    /// A time for chunks whose time a test does not look at.
    const AT: Millis = 1_000;

    fn open(dir: &Path) -> (LogStore, Gauge) {
        let g = Gauge::default();
        (LogStore::new(dir.to_path_buf(), g.clone()).unwrap(), g)
    }

    #[test]
    fn a_tail_starts_at_the_nth_line_from_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let (logs, _) = open(dir.path());
        let t = TaskId::from("task-tail");
        let tail = |n| logs.tail_offset(&t, LogStream::Stdout, n).unwrap();
        assert_eq!(tail(3), 0, "an empty stream");
        logs.append(&t, LogStream::Stdout, 0, b"a\nb\nc\n", BIG, AT)
            .unwrap();
        assert_eq!(tail(0), 6);
        assert_eq!(tail(1), 4);
        assert_eq!(tail(2), 2);
        assert_eq!(tail(3), 0);
        assert_eq!(tail(10), 0);
        logs.append(&t, LogStream::Stdout, 6, b"partial", BIG, AT)
            .unwrap();
        assert_eq!(tail(1), 6, "an unfinished last line counts");
        assert_eq!(tail(2), 4);
        // Lines longer than the read window, and a stream whose start the cap dropped.
        let u = TaskId::from("task-long");
        let long = vec![b'x'; 200 * 1024];
        let mut off = 0;
        for _ in 0..3 {
            logs.append(&u, LogStream::Stdout, off, &long, 600 * 1024, AT)
                .unwrap();
            off += long.len() as u64;
            logs.append(&u, LogStream::Stdout, off, b"\n", 600 * 1024, AT)
                .unwrap();
            off += 1;
        }
        let one_line = long.len() as u64 + 1;
        assert_eq!(
            logs.tail_offset(&u, LogStream::Stdout, 1).unwrap(),
            off - one_line
        );
        let kept = logs.read_from(&u, LogStream::Stdout, 0, 1).unwrap().start;
        assert!(kept > 0, "the cap dropped the start");
        assert_eq!(logs.tail_offset(&u, LogStream::Stdout, 99).unwrap(), kept);
    }

    fn on_disk(dir: &Path) -> i64 {
        disk_usage(dir).unwrap() as i64
    }

    fn read_all(logs: &LogStore, t: &TaskId, from: u64) -> ReadBack {
        let mut out = ReadBack {
            start: 0,
            data: Vec::new(),
        };
        let mut off = from;
        let mut first = true;
        loop {
            let r = logs.read_from(t, LogStream::Stdout, off, 7).unwrap();
            if first {
                out.start = r.start;
                first = false;
            }
            if r.data.is_empty() {
                return out;
            }
            off = r.start + r.data.len() as u64;
            out.data.extend(r.data);
        }
    }

    #[test]
    fn replays_are_dropped_and_gaps_reported() {
        let dir = tempfile::tempdir().unwrap();
        let (logs, bytes) = open(dir.path());
        let t = TaskId::from("task-1");
        let out = LogStream::Stdout;
        assert_eq!(
            logs.append(&t, out, 0, b"hello ", BIG, AT).unwrap(),
            Appended::Stored
        );
        assert_eq!(
            logs.append(&t, out, 0, b"hello ", BIG, AT).unwrap(),
            Appended::Duplicate
        );
        // A chunk overlapping what is stored adds only its new tail.
        assert_eq!(
            logs.append(&t, out, 3, b"lo world", BIG, AT).unwrap(),
            Appended::Stored
        );
        assert_eq!(
            logs.append(&t, out, 50, b"x", BIG, AT).unwrap(),
            Appended::Gap { have: 11 }
        );
        assert_eq!(read_all(&logs, &t, 0).data, b"hello world");
        assert_eq!(
            logs.read_from(&t, LogStream::Stderr, 0, 100).unwrap().data,
            b""
        );
        // The output and the one mark of its time index, as on the disk.
        assert_eq!(bytes.get(), 11 + MARK_LEN as i64);
        assert_eq!(bytes.get(), on_disk(dir.path()));
    }

    #[test]
    fn a_capped_stream_keeps_its_latest_output_and_says_where_it_starts() {
        let dir = tempfile::tempdir().unwrap();
        let (logs, bytes) = open(dir.path());
        let t = TaskId::from("task-1");
        let cap = 20;
        let text: Vec<u8> = (0..100u8).map(|i| b'a' + i % 26).collect();
        // Chunks of uneven sizes, some larger than a segment.
        let mut off = 0;
        for len in [3usize, 17, 1, 25, 4, 30, 20] {
            let chunk = &text[off..off + len];
            assert_eq!(
                logs.append(&t, LogStream::Stdout, off as u64, chunk, cap, AT)
                    .unwrap(),
                Appended::Stored
            );
            off += len;
        }
        assert_eq!(off, 100);
        assert_eq!(logs.size_of(&t, LogStream::Stdout), 100);
        let kept = read_all(&logs, &t, 0);
        assert!(kept.data.len() as u64 <= cap, "{} kept", kept.data.len());
        assert!(
            kept.data.len() as u64 >= cap / 2,
            "{} kept",
            kept.data.len()
        );
        assert_eq!(kept.start + kept.data.len() as u64, 100);
        assert_eq!(kept.data, &text[kept.start as usize..]);
        assert_eq!(bytes.get(), kept.data.len() as i64);
        // A reader already past the dropped part reads on as before.
        assert_eq!(read_all(&logs, &t, 95).data, &text[95..]);
        // Replays of dropped output are not stored again.
        assert_eq!(
            logs.append(&t, LogStream::Stdout, 0, &text[..10], cap, AT)
                .unwrap(),
            Appended::Duplicate
        );

        // What a new controller process reads back is the same.
        drop(logs);
        let (again, bytes) = open(dir.path());
        assert_eq!(bytes.get(), kept.data.len() as i64);
        assert_eq!(again.size_of(&t, LogStream::Stdout), 100);
        assert_eq!(read_all(&again, &t, 0), kept);
    }

    #[test]
    fn a_log_of_the_old_layout_is_read_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let t = TaskId::from("task-9");
        std::fs::write(dir.path().join("task-9.stdout.log"), b"old output\n").unwrap();
        let (logs, bytes) = open(dir.path());
        assert_eq!(bytes.get(), 11);
        assert_eq!(read_all(&logs, &t, 0).data, b"old output\n");
        logs.append(&t, LogStream::Stdout, 11, b"more\n", BIG, AT)
            .unwrap();
        assert_eq!(read_all(&logs, &t, 0).data, b"old output\nmore\n");
        logs.remove(&t);
        assert_eq!(bytes.get(), 0);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert_eq!(read_all(&logs, &t, 0).data, b"");
    }

    #[test]
    fn logs_of_unknown_tasks_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("task-old.stdout.log"), b"xy").unwrap();
        let (logs, bytes) = open(dir.path());
        let keep = TaskId::from("task-keep");
        let gone = TaskId::from("task-gone");
        for t in [&keep, &gone] {
            logs.append(t, LogStream::Stderr, 0, b"12345", BIG, AT)
                .unwrap();
        }
        assert_eq!(bytes.get(), on_disk(dir.path()));
        let known: HashSet<TaskId> = [keep.clone()].into();
        assert_eq!(logs.remove_unknown(&known), 2);
        assert_eq!(logs.size_of(&keep, LogStream::Stderr), 5);
        assert_eq!(logs.size_of(&gone, LogStream::Stderr), 0);
        assert_eq!(bytes.get(), 5 + MARK_LEN as i64);
        assert_eq!(bytes.get(), on_disk(dir.path()));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    fn idx_files(dir: &Path, t: &TaskId) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = std::fs::read_dir(dir.join(t.as_str()))
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_name().to_str().unwrap().contains(".idx"))
            .map(|e| {
                let name = e.file_name().to_str().unwrap().to_string();
                (name, e.metadata().unwrap().len())
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn each_chunk_of_new_bytes_is_marked_with_its_time_and_replays_add_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (logs, bytes) = open(dir.path());
        let t = TaskId::from("task-t");
        let out = LogStream::Stdout;
        logs.append(&t, out, 0, b"one\n", BIG, 100).unwrap();
        logs.append(&t, out, 4, b"two\n", BIG, 200).unwrap();
        // A replay, even stamped later, is stored already: no mark.
        assert_eq!(
            logs.append(&t, out, 0, b"one\ntwo\n", BIG, 300).unwrap(),
            Appended::Duplicate
        );
        // An overlapping chunk is marked at its first new byte.
        logs.append(&t, out, 6, b"o\nthree\n", BIG, 400).unwrap();
        // Output read in the same millisecond, or stamped earlier (an agent's clock
        // stepping back), adds no mark: times never go backwards.
        logs.append(&t, out, 14, b"four\n", BIG, 400).unwrap();
        logs.append(&t, out, 19, b"five\n", BIG, 350).unwrap();
        let end = logs.size_of(&t, out);
        assert_eq!(end, 24);
        assert_eq!(
            logs.times(&t, out, 0, end).unwrap(),
            [(0, Some(100)), (4, Some(200)), (8, Some(400))]
        );
        // A range inside a chunk has the chunk's time from its first byte.
        assert_eq!(
            logs.times(&t, out, 5, 10).unwrap(),
            [(5, Some(200)), (8, Some(400))]
        );
        assert_eq!(
            idx_files(dir.path(), &t),
            [("stdout.0.idx".to_string(), 3 * MARK_LEN)]
        );
        assert_eq!(bytes.get(), on_disk(dir.path()));
        // A new controller process reads the same times, and marks on after them.
        drop(logs);
        let (again, _) = open(dir.path());
        assert_eq!(
            again.times(&t, out, 0, end).unwrap(),
            [(0, Some(100)), (4, Some(200)), (8, Some(400))]
        );
        again.append(&t, out, 24, b"six\n", BIG, 399).unwrap();
        again.append(&t, out, 28, b"seven\n", BIG, 500).unwrap();
        assert_eq!(
            again.times(&t, out, 20, 34).unwrap(),
            [(20, Some(400)), (28, Some(500))]
        );
    }

    #[test]
    fn since_starts_at_the_first_line_of_a_chunk_at_or_after_the_time() {
        let dir = tempfile::tempdir().unwrap();
        let (logs, _) = open(dir.path());
        let t = TaskId::from("task-s");
        let out = LogStream::Stdout;
        logs.append(&t, out, 0, b"a\n", BIG, 100).unwrap();
        logs.append(&t, out, 2, b"b\n", BIG, 200).unwrap();
        // A line written in two chunks belongs to the time of its first byte.
        logs.append(&t, out, 4, b"c1 ", BIG, 300).unwrap();
        logs.append(&t, out, 7, b"c2\nd\n", BIG, 400).unwrap();
        let since = |at| logs.since_offset(&t, out, at).unwrap();
        let found = |offset| SinceStart {
            offset,
            found: true,
        };
        assert_eq!(since(0), found(0));
        assert_eq!(since(100), found(0));
        assert_eq!(since(150), found(2));
        assert_eq!(since(200), found(2));
        assert_eq!(since(250), found(4));
        assert_eq!(since(301), found(10), "the line begun at 300 is skipped");
        assert_eq!(
            since(401),
            SinceStart {
                offset: 12,
                found: false
            },
            "everything is older: the end, to look again when more comes"
        );
        // An unfinished line begun before the time is shown from the chunk on.
        logs.append(&t, out, 12, b"e", BIG, 500).unwrap();
        logs.append(&t, out, 13, b"f", BIG, 600).unwrap();
        assert_eq!(since(550), found(13));
        // An empty stream has nothing yet.
        assert_eq!(
            logs.since_offset(&t, LogStream::Stderr, 0).unwrap(),
            SinceStart {
                offset: 0,
                found: false
            }
        );
    }

    #[test]
    fn a_rotation_drops_the_index_with_its_segment_and_a_full_index_is_thinned() {
        let dir = tempfile::tempdir().unwrap();
        let (logs, bytes) = open(dir.path());
        let t = TaskId::from("task-r");
        let out = LogStream::Stdout;
        // The smallest cap a job may have: segments of 32 KiB, 128 marks each.
        let cap = 64 * 1024;
        let limit = max_marks(cap / 2);
        assert_eq!(limit, 128);
        let line = b"0123456789abcdef0123456789abcde\n";
        let mut off = 0u64;
        let mut at = 1_000;
        for _ in 0..10_000 {
            logs.append(&t, out, off, line, cap, at).unwrap();
            off += line.len() as u64;
            at += 10;
        }
        let files = idx_files(dir.path(), &t);
        assert_eq!(files.len(), 2, "one index per kept segment: {files:?}");
        for (name, len) in &files {
            assert!(*len <= limit * MARK_LEN, "{name}: {len} bytes");
            // Thinning halves the marks at least and the doubling gap may take more,
            // but it keeps a useful number.
            assert!(*len >= limit / 4 * MARK_LEN, "{name} was thinned to {len}");
        }
        // The stream with its indexes stays within its cap, and the gauge says so.
        assert!(on_disk(dir.path()) <= cap as i64, "{}", on_disk(dir.path()));
        assert_eq!(bytes.get(), on_disk(dir.path()));
        // Each kept segment's times start at its base, and the times only grow.
        let kept = logs.read_from(&t, out, 0, 1).unwrap().start;
        assert!(kept > 0);
        let times = logs.times(&t, out, kept, off).unwrap();
        assert_eq!(times[0].0, kept);
        assert!(times.iter().all(|(_, at)| at.is_some()), "{times:?}");
        assert!(times.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1));
        // Thinned, the marks are coarser but still find about the right place: the
        // bytes skipped are all older than the time asked for, up to one merged gap.
        let mid = at - 10 * 300;
        let start = logs.since_offset(&t, out, mid).unwrap();
        assert!(start.found);
        let line_time = 1_000 + (start.offset / line.len() as u64) as i64 * 10;
        assert!(line_time >= mid, "{line_time} < {mid}");
        assert!(line_time - mid < 10 * 300, "{line_time} is far past {mid}");
    }

    #[test]
    fn a_damaged_or_missing_index_makes_times_unknown_and_never_hides_output() {
        let dir = tempfile::tempdir().unwrap();
        let t = TaskId::from("task-d");
        let out = LogStream::Stdout;
        let idx = dir.path().join("task-d").join("stdout.0.idx");
        {
            let (logs, _) = open(dir.path());
            logs.append(&t, out, 0, b"old\n", BIG, 100).unwrap();
            logs.append(&t, out, 4, b"older\n", BIG, 200).unwrap();
        }
        // Half a mark, as a crash in the middle of writing one leaves: cut off, and the
        // whole marks before it are kept.
        let mut f = std::fs::OpenOptions::new().append(true).open(&idx).unwrap();
        f.write_all(&[7; 9]).unwrap();
        drop(f);
        {
            let (logs, bytes) = open(dir.path());
            assert_eq!(
                logs.times(&t, out, 0, 10).unwrap(),
                [(0, Some(100)), (4, Some(200))]
            );
            assert_eq!(std::fs::metadata(&idx).unwrap().len(), 2 * MARK_LEN);
            assert_eq!(bytes.get(), on_disk(dir.path()));
        }
        // A mark out of order after good ones: the whole index is untrusted, since the
        // output after the good marks would otherwise take their (earlier) times and
        // be skipped by --since.
        let mut damaged = std::fs::read(&idx).unwrap();
        damaged.extend(encode_marks(&[Mark { offset: 1, at: 900 }]));
        std::fs::write(&idx, &damaged).unwrap();
        {
            let (logs, _) = open(dir.path());
            assert_eq!(logs.times(&t, out, 0, 10).unwrap(), [(0, None)]);
            assert_eq!(std::fs::metadata(&idx).unwrap().len(), 0);
        }
        // Garbage: the segment's times are unknown, --since shows all of it, and new
        // output is marked again.
        std::fs::write(&idx, [0xAB; 48]).unwrap();
        let (logs, bytes) = open(dir.path());
        assert_eq!(logs.times(&t, out, 0, 10).unwrap(), [(0, None)]);
        assert_eq!(
            logs.since_offset(&t, out, 150).unwrap(),
            SinceStart {
                offset: 0,
                found: true
            }
        );
        logs.append(&t, out, 10, b"new\n", BIG, 300).unwrap();
        assert_eq!(
            logs.times(&t, out, 0, 14).unwrap(),
            [(0, None), (10, Some(300))]
        );
        assert_eq!(bytes.get(), on_disk(dir.path()));
        // No index at all (output stored before times were kept): the same.
        std::fs::remove_file(&idx).unwrap();
        let (logs, _) = open(dir.path());
        assert_eq!(logs.times(&t, out, 0, 14).unwrap(), [(0, None)]);
        assert!(logs.since_offset(&t, out, 1_000).unwrap().found);
        assert_eq!(read_all(&logs, &t, 0).data, b"old\nolder\nnew\n");
    }

    #[test]
    fn leftovers_of_a_crash_in_the_index_are_removed_on_load() {
        let dir = tempfile::tempdir().unwrap();
        let t = TaskId::from("task-c");
        {
            let (logs, _) = open(dir.path());
            logs.append(&t, LogStream::Stdout, 0, b"x\n", BIG, 100)
                .unwrap();
        }
        let task_dir = dir.path().join("task-c");
        // A thinned index not yet renamed into place, and the index of a segment whose
        // rotation deleted the segment but not yet its index.
        std::fs::write(task_dir.join("stdout.0.idx.tmp"), [1; 16]).unwrap();
        std::fs::write(task_dir.join("stdout.99.idx"), [1; 16]).unwrap();
        let (logs, bytes) = open(dir.path());
        assert_eq!(
            logs.times(&t, LogStream::Stdout, 0, 2).unwrap(),
            [(0, Some(100))]
        );
        assert_eq!(
            idx_files(dir.path(), &t),
            [("stdout.0.idx".to_string(), MARK_LEN)]
        );
        assert_eq!(bytes.get(), on_disk(dir.path()));
    }

    #[test]
    fn thinning_merges_the_closest_times_first_and_keeps_the_first() {
        let m = |offset, at| Mark { offset, at };
        let marks = [
            m(0, 0),
            m(1, 1),
            m(2, 2),
            m(3, 1000),
            m(4, 1001),
            m(5, 5000),
        ];
        assert_eq!(thin(&marks, 6), marks);
        assert_eq!(thin(&marks, 3), [m(0, 0), m(3, 1000), m(5, 5000)]);
        assert_eq!(thin(&marks, 1), [m(0, 0)]);
        assert_eq!(thin(&[], 4), []);
    }
}
