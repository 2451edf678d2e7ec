//! Ships a task's stdout and stderr files to the controller.
//!
//! The runtime writes the files directly (so a task survives an agent restart); the
//! shipper tails them and sends chunks at logical byte offsets, which count every byte
//! the task ever wrote to the stream. When a file grows past the size cap and has been
//! fully shipped, it is rotated copy-then-truncate: its content moves to `NAME.1` and
//! the file starts again at zero, with the logical offset carried on in `logpos.json`.
//! A rotation is skipped when the file grew during the copy, so only bytes written in
//! the instant between a size check and the truncation can be lost: the known price of
//! rotating a file that another process keeps open.

use crate::link::Link;
use drover_core::TaskId;
use drover_core::protocol::{AgentMessage, LogChunk, LogStream};
use serde::{Deserialize, Serialize};
use std::io::{Read, Seek, SeekFrom, Write as _};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The most bytes in one chunk.
const CHUNK: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
struct Pos {
    /// Logical bytes rotated away before the current file's first byte.
    base: u64,
    /// Logical offset shipped so far.
    #[serde(skip)]
    sent: u64,
}

pub struct LogShipper {
    task_id: TaskId,
    dir: PathBuf,
    max_bytes: u64,
    pos: Mutex<[Pos; 3]>,
    link: Link,
}

const STREAMS: [LogStream; 3] = [LogStream::Stdout, LogStream::Stderr, LogStream::Prepare];

fn idx(s: LogStream) -> usize {
    match s {
        LogStream::Stdout => 0,
        LogStream::Stderr => 1,
        LogStream::Prepare => 2,
    }
}

pub fn log_path(dir: &Path, stream: LogStream) -> PathBuf {
    dir.join(format!("{}.log", stream.as_str()))
}

impl LogShipper {
    /// A shipper that starts from the beginning of what is on disk; the controller drops
    /// what it already has.
    pub fn new(task_id: TaskId, dir: PathBuf, max_bytes: u64, link: Link) -> LogShipper {
        // A position file of an older agent (two streams) does not parse; shipping
        // then starts from the beginning, and the controller drops what it has.
        let saved: [Pos; 3] = std::fs::read(dir.join("logpos.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let pos = saved.map(|p| Pos {
            base: p.base,
            sent: p.base,
        });
        LogShipper {
            task_id,
            dir,
            max_bytes: max_bytes.max(1024),
            pos: Mutex::new(pos),
            link,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, [Pos; 3]> {
        self.pos.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends what is new; returns true if it sent anything.
    pub fn tick(&self) -> bool {
        let mut sent_any = false;
        for stream in STREAMS {
            loop {
                match self.ship_once(stream) {
                    Ok(true) => sent_any = true,
                    Ok(false) => break,
                    Err(e) => {
                        tracing::debug!(task = %self.task_id, "shipping {}: {e}", stream.as_str());
                        break;
                    }
                }
            }
        }
        sent_any
    }

    fn ship_once(&self, stream: LogStream) -> std::io::Result<bool> {
        let path = log_path(&self.dir, stream);
        let mut pos = self.lock();
        let p = &mut pos[idx(stream)];
        // Never through a symbolic link: the task, which may run as another user in the
        // same directory, could point one at a file only the agent may read.
        let mut f = match open_nofollow(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        let size = f.metadata()?.len();
        let file_off = p.sent.saturating_sub(p.base);
        if size > file_off {
            f.seek(SeekFrom::Start(file_off))?;
            let mut buf = Vec::with_capacity(CHUNK.min((size - file_off) as usize));
            (&mut f).take(CHUNK as u64).read_to_end(&mut buf)?;
            if buf.is_empty() {
                return Ok(false);
            }
            let n = buf.len() as u64;
            let chunk = LogChunk {
                task_id: self.task_id.clone(),
                stream,
                offset: p.sent,
                data: buf,
                // Stamped as read: the bytes were written since the last look, so this
                // is their time to within a tick, which is all `drover logs --since`
                // and `--timestamps` claim.
                at: Some(drover_core::now_millis()),
            };
            if !self.link.send(AgentMessage::Log(chunk)) {
                return Ok(false);
            }
            p.sent += n;
            return Ok(true);
        }
        if size >= self.max_bytes && file_off >= size {
            // Everything in the file has been shipped: rotate it.
            {
                let mut from = open_nofollow(&path)?;
                let mut to = create_nofollow(&path.with_extension("log.1"))?;
                std::io::copy(&mut from, &mut to)?;
            }
            let f = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)?;
            // Bytes the task wrote while the copy ran would be lost by the truncation:
            // when there are any, ship them first and rotate on a later tick. This
            // shrinks the unavoidable window to the two calls below.
            if f.metadata()?.len() != size {
                return Ok(false);
            }
            f.set_len(0)?;
            p.base += size;
            p.sent = p.base;
            let bases: [Pos; 3] = *pos;
            let saved = create_nofollow(&self.dir.join("logpos.json"))
                .and_then(|mut f| f.write_all(&serde_json::to_vec(&bases).unwrap_or_default()));
            if let Err(e) = saved {
                // Only a restarted agent reads it, to resume at the right offsets; losing
                // it re-ships some output, which the controller ignores by offset.
                tracing::debug!(task = %self.task_id, "saving log positions: {e}");
            }
        }
        Ok(false)
    }

    /// The controller has the stream only up to `offset`: send from there again.
    pub fn resync(&self, stream: LogStream, offset: u64) {
        let mut pos = self.lock();
        let p = &mut pos[idx(stream)];
        p.sent = offset.max(p.base);
    }

    /// After a reconnect: an empty chunk at the shipped offset lets the controller say
    /// whether it is missing anything (it answers with a resync when it is).
    pub fn probe(&self) {
        let pos = *self.lock();
        for stream in STREAMS {
            let chunk = LogChunk {
                task_id: self.task_id.clone(),
                stream,
                offset: pos[idx(stream)].sent,
                data: Vec::new(),
                // A probe carries no bytes, so no time either.
                at: None,
            };
            self.link.send(AgentMessage::Log(chunk));
        }
    }
}

/// Opens a file for reading, refusing a symbolic link.
fn open_nofollow(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Creates or truncates a file for writing, refusing a symbolic link.
fn create_nofollow(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use tokio::sync::mpsc;

    fn collect(rx: &mut mpsc::Receiver<AgentMessage>) -> Vec<LogChunk> {
        let mut out = Vec::new();
        while let Ok(AgentMessage::Log(c)) = rx.try_recv() {
            out.push(c);
        }
        out
    }

    #[test]
    fn ships_new_bytes_and_rotates_past_the_cap_keeping_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let link = Link::default();
        let (tx, mut rx) = mpsc::channel(100);
        link.set(Some(tx));
        let ship = LogShipper::new(TaskId::from("task-1"), dir.path().to_path_buf(), 1024, link);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path(dir.path(), LogStream::Stdout))
            .unwrap();
        f.write_all(&[b'a'; 1500]).unwrap();
        ship.tick();
        let chunks = collect(&mut rx);
        assert_eq!(chunks.iter().map(|c| c.data.len()).sum::<usize>(), 1500);
        assert!(
            chunks.iter().all(|c| c.at.is_some_and(|t| t > 0)),
            "every chunk is stamped with when it was read"
        );
        // Fully shipped and over the cap: the next tick rotates.
        ship.tick();
        assert_eq!(
            std::fs::metadata(log_path(dir.path(), LogStream::Stdout))
                .unwrap()
                .len(),
            0
        );
        assert!(dir.path().join("stdout.log.1").exists());
        f.write_all(b"more").unwrap();
        ship.tick();
        let chunks = collect(&mut rx);
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].offset, 1500, "offsets continue across rotation");
        assert_eq!(chunks[0].data, b"more");
        // A new shipper (an agent restart) resumes from the rotated base.
        let (tx2, mut rx2) = mpsc::channel(100);
        let link2 = Link::default();
        link2.set(Some(tx2));
        let again = LogShipper::new(
            TaskId::from("task-1"),
            dir.path().to_path_buf(),
            1024,
            link2,
        );
        again.tick();
        let chunks = collect(&mut rx2);
        assert_eq!(chunks[0].offset, 1500);
    }

    #[test]
    fn nothing_is_lost_while_disconnected() {
        let dir = tempfile::tempdir().unwrap();
        let link = Link::default();
        let ship = LogShipper::new(
            TaskId::from("task-1"),
            dir.path().to_path_buf(),
            1 << 20,
            link.clone(),
        );
        std::fs::write(log_path(dir.path(), LogStream::Stderr), b"while away").unwrap();
        assert!(!ship.tick());
        let (tx, mut rx) = mpsc::channel(100);
        link.set(Some(tx));
        assert!(ship.tick());
        assert_eq!(collect(&mut rx)[0].data, b"while away");
    }
}
