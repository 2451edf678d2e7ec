//! Task logs as the controller keeps them: one append-only file per task and stream,
//! filled from the chunks agents push, at the byte offsets the agent's own files have.

use drover_core::TaskId;
use drover_core::protocol::LogStream;
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
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

pub struct LogStore {
    dir: PathBuf,
    /// Stored length per file, so appends need no stat call.
    sizes: Mutex<HashMap<(TaskId, LogStream), u64>>,
}

impl LogStore {
    pub fn new(dir: PathBuf) -> std::io::Result<LogStore> {
        std::fs::create_dir_all(&dir)?;
        Ok(LogStore {
            dir,
            sizes: Mutex::new(HashMap::new()),
        })
    }

    pub fn path(&self, task: &TaskId, stream: LogStream) -> PathBuf {
        self.dir
            .join(format!("{}.{}.log", task.as_str(), stream.as_str()))
    }

    fn size(&self, task: &TaskId, stream: LogStream) -> u64 {
        std::fs::metadata(self.path(task, stream))
            .map(|m| m.len())
            .unwrap_or(0)
    }

    pub fn append(
        &self,
        task: &TaskId,
        stream: LogStream,
        offset: u64,
        data: &[u8],
    ) -> std::io::Result<Appended> {
        // The lock covers the whole append so that two chunks of one file never
        // interleave; log volume is small next to the cost of a task, so one lock is fine.
        let mut sizes = self.sizes.lock().unwrap_or_else(|p| p.into_inner());
        let key = (task.clone(), stream);
        let have = match sizes.get(&key) {
            Some(s) => *s,
            None => self.size(task, stream),
        };
        let end = offset + data.len() as u64;
        if offset > have {
            return Ok(Appended::Gap { have });
        }
        if end <= have {
            return Ok(Appended::Duplicate);
        }
        let fresh = &data[(have - offset) as usize..];
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path(task, stream))?;
        f.write_all(fresh)?;
        sizes.insert(key, end);
        Ok(Appended::Stored)
    }

    /// How many bytes of a stream are stored. Served from memory after the first look,
    /// so a follower can check many tasks for new output without touching the disk.
    pub fn size_of(&self, task: &TaskId, stream: LogStream) -> u64 {
        let mut sizes = self.sizes.lock().unwrap_or_else(|p| p.into_inner());
        let key = (task.clone(), stream);
        if let Some(s) = sizes.get(&key) {
            return *s;
        }
        let s = self.size(task, stream);
        sizes.insert(key, s);
        s
    }

    /// The bytes of one stream from `offset` on, at most `max` of them.
    pub fn read_from(
        &self,
        task: &TaskId,
        stream: LogStream,
        offset: u64,
        max: usize,
    ) -> std::io::Result<Vec<u8>> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = match std::fs::File::open(self.path(task, stream)) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        f.seek(SeekFrom::Start(offset))?;
        let mut buf = Vec::new();
        f.take(max as u64).read_to_end(&mut buf)?;
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replays_are_dropped_and_gaps_reported() {
        let dir = tempfile::tempdir().unwrap();
        let logs = LogStore::new(dir.path().to_path_buf()).unwrap();
        let t = TaskId::from("task-1");
        assert_eq!(
            logs.append(&t, LogStream::Stdout, 0, b"hello ").unwrap(),
            Appended::Stored
        );
        assert_eq!(
            logs.append(&t, LogStream::Stdout, 0, b"hello ").unwrap(),
            Appended::Duplicate
        );
        // A chunk overlapping what is stored adds only its new tail.
        assert_eq!(
            logs.append(&t, LogStream::Stdout, 3, b"lo world").unwrap(),
            Appended::Stored
        );
        assert_eq!(
            logs.append(&t, LogStream::Stdout, 50, b"x").unwrap(),
            Appended::Gap { have: 11 }
        );
        assert_eq!(
            logs.read_from(&t, LogStream::Stdout, 0, 100).unwrap(),
            b"hello world"
        );
        assert_eq!(logs.read_from(&t, LogStream::Stderr, 0, 100).unwrap(), b"");
    }
}
