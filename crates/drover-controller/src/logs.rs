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

use drover_core::TaskId;
use drover_core::protocol::LogStream;
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

#[derive(Clone, Copy, Debug)]
struct Segment {
    /// The stream offset of the segment's first byte.
    base: u64,
    len: u64,
}

/// One stream's segments, oldest first.
#[derive(Debug, Default)]
struct Stream {
    segments: Vec<Segment>,
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
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let Some(base) = name
                .to_str()
                .and_then(|n| n.strip_prefix(&prefix))
                .and_then(|n| n.strip_suffix(".log"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            segments.push(Segment {
                base,
                len: entry.metadata()?.len(),
            });
        }
        segments.sort_by_key(|s| s.base);
        Ok(Stream { segments })
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

    /// Stores the new part of a chunk, keeping at most `cap` bytes of the stream.
    pub fn append(
        &self,
        task: &TaskId,
        stream: LogStream,
        offset: u64,
        data: &[u8],
        cap: u64,
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
            while !fresh.is_empty() {
                let full = s.segments.last().is_none_or(|l| l.len >= segment_cap);
                if full {
                    self.start_segment(task, stream, s)?;
                }
                let Some(last) = s.segments.last_mut() else {
                    return Err(io::Error::other("no log segment after starting one"));
                };
                let room = usize::try_from(segment_cap - last.len.min(segment_cap))
                    .unwrap_or(usize::MAX)
                    .max(1);
                let (now, rest) = fresh.split_at(room.min(fresh.len()));
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(self.segment_path(task, stream, last.base))?;
                f.write_all(now)?;
                last.len += now.len() as u64;
                self.stored(now.len() as u64);
                fresh = rest;
            }
            Ok(Appended::Stored)
        })
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
        s.segments.push(Segment { base, len: 0 });
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
        logs.append(&t, LogStream::Stdout, 0, b"a\nb\nc\n", BIG)
            .unwrap();
        assert_eq!(tail(0), 6);
        assert_eq!(tail(1), 4);
        assert_eq!(tail(2), 2);
        assert_eq!(tail(3), 0);
        assert_eq!(tail(10), 0);
        logs.append(&t, LogStream::Stdout, 6, b"partial", BIG)
            .unwrap();
        assert_eq!(tail(1), 6, "an unfinished last line counts");
        assert_eq!(tail(2), 4);
        // Lines longer than the read window, and a stream whose start the cap dropped.
        let u = TaskId::from("task-long");
        let long = vec![b'x'; 200 * 1024];
        let mut off = 0;
        for _ in 0..3 {
            logs.append(&u, LogStream::Stdout, off, &long, 600 * 1024)
                .unwrap();
            off += long.len() as u64;
            logs.append(&u, LogStream::Stdout, off, b"\n", 600 * 1024)
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
            logs.append(&t, out, 0, b"hello ", BIG).unwrap(),
            Appended::Stored
        );
        assert_eq!(
            logs.append(&t, out, 0, b"hello ", BIG).unwrap(),
            Appended::Duplicate
        );
        // A chunk overlapping what is stored adds only its new tail.
        assert_eq!(
            logs.append(&t, out, 3, b"lo world", BIG).unwrap(),
            Appended::Stored
        );
        assert_eq!(
            logs.append(&t, out, 50, b"x", BIG).unwrap(),
            Appended::Gap { have: 11 }
        );
        assert_eq!(read_all(&logs, &t, 0).data, b"hello world");
        assert_eq!(
            logs.read_from(&t, LogStream::Stderr, 0, 100).unwrap().data,
            b""
        );
        assert_eq!(bytes.get(), 11);
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
                logs.append(&t, LogStream::Stdout, off as u64, chunk, cap)
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
            logs.append(&t, LogStream::Stdout, 0, &text[..10], cap)
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
        logs.append(&t, LogStream::Stdout, 11, b"more\n", BIG)
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
            logs.append(t, LogStream::Stderr, 0, b"12345", BIG).unwrap();
        }
        assert_eq!(bytes.get(), 12);
        let known: HashSet<TaskId> = [keep.clone()].into();
        assert_eq!(logs.remove_unknown(&known), 2);
        assert_eq!(logs.size_of(&keep, LogStream::Stderr), 5);
        assert_eq!(logs.size_of(&gone, LogStream::Stderr), 0);
        assert_eq!(bytes.get(), 5);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
