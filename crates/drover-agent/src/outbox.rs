//! The agent's outbox: task events waiting for the controller's acknowledgement.
//!
//! Every event is appended to a file before it is sent, and replayed after a reconnect
//! until the controller acknowledges it. The file is written (not fsynced) before the
//! send, so it survives the agent process being killed; a machine that loses power
//! loses its tasks too, and the controller marks them lost.

use drover_core::protocol::AgentEvent;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::io::{BufRead, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

#[derive(Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum Line {
    /// Written at the top of a compacted file, so seq numbers never go back even when
    /// every event has been acknowledged.
    NextSeq {
        next: u64,
    },
    Event(AgentEvent),
    /// Everything up to `seq` was acknowledged (appended between compactions).
    Acked {
        seq: u64,
    },
}

pub struct Outbox {
    path: PathBuf,
    file: std::fs::File,
    events: VecDeque<AgentEvent>,
    next_seq: u64,
    acked_since_compaction: usize,
}

/// Rewrite the file after this many acknowledgements, to keep it small.
const COMPACT_EVERY: usize = 256;

impl Outbox {
    pub fn open(dir: &Path) -> std::io::Result<Outbox> {
        let path = dir.join("outbox.jsonl");
        let mut events = VecDeque::new();
        let mut next_seq = 1;
        if let Ok(f) = std::fs::File::open(&path) {
            for line in std::io::BufReader::new(f).lines() {
                let line = line?;
                // A torn last line (the agent died mid-write) is skipped; that event
                // was never sent, and the task state it described is re-derived when
                // the task is recovered.
                match serde_json::from_str::<Line>(&line) {
                    Ok(Line::NextSeq { next }) => next_seq = next_seq.max(next),
                    Ok(Line::Event(e)) => {
                        next_seq = next_seq.max(e.seq + 1);
                        events.push_back(e);
                    }
                    Ok(Line::Acked { seq }) => {
                        next_seq = next_seq.max(seq + 1);
                        events.retain(|e: &AgentEvent| e.seq > seq);
                    }
                    Err(_) => continue,
                }
            }
        }
        let mut ob = Outbox {
            // Every task's states and reasons are in it: readable by the agent alone,
            // since tasks may run as other users of the same machine.
            file: std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&path)?,
            path,
            events,
            next_seq,
            acked_since_compaction: 0,
        };
        ob.compact()?;
        Ok(ob)
    }

    /// Records an event (assigning its seq) and returns it for sending.
    pub fn push(&mut self, mut event: AgentEvent) -> std::io::Result<AgentEvent> {
        event.seq = self.next_seq;
        self.next_seq += 1;
        let mut line =
            serde_json::to_vec(&Line::Event(event.clone())).map_err(std::io::Error::other)?;
        line.push(b'\n');
        self.file.write_all(&line)?;
        self.events.push_back(event.clone());
        Ok(event)
    }

    /// Drops every event up to and including `seq`.
    pub fn ack(&mut self, seq: u64) -> std::io::Result<()> {
        while self.events.front().is_some_and(|e| e.seq <= seq) {
            self.events.pop_front();
            self.acked_since_compaction += 1;
        }
        // A controller whose store was reset may ack a seq this agent never reached;
        // moving past it keeps new events from looking like replays.
        self.next_seq = self.next_seq.max(seq + 1);
        if self.acked_since_compaction >= COMPACT_EVERY
            || (self.events.is_empty() && self.acked_since_compaction > 0)
        {
            self.compact()?;
        } else if self.acked_since_compaction > 0 {
            let mut line =
                serde_json::to_vec(&Line::Acked { seq }).map_err(std::io::Error::other)?;
            line.push(b'\n');
            self.file.write_all(&line)?;
        }
        Ok(())
    }

    /// Events not yet acknowledged, oldest first.
    pub fn pending(&self) -> impl Iterator<Item = &AgentEvent> {
        self.events.iter()
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    fn compact(&mut self) -> std::io::Result<()> {
        let tmp = self.path.with_extension("tmp");
        {
            let mut f = std::io::BufWriter::new(
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)?,
            );
            serde_json::to_writer(
                &mut f,
                &Line::NextSeq {
                    next: self.next_seq,
                },
            )
            .map_err(std::io::Error::other)?;
            f.write_all(b"\n")?;
            for e in &self.events {
                serde_json::to_writer(&mut f, &Line::Event(e.clone()))
                    .map_err(std::io::Error::other)?;
                f.write_all(b"\n")?;
            }
            f.flush()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        self.file = std::fs::OpenOptions::new().append(true).open(&self.path)?;
        self.acked_since_compaction = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_core::{TaskId, TaskState};

    fn ev(state: TaskState) -> AgentEvent {
        AgentEvent {
            seq: 0,
            task_id: TaskId::from("task-1"),
            state,
            reason: String::new(),
            exit: None,
            at: 1,
            ports: Vec::new(),
        }
    }

    #[test]
    fn unacked_events_survive_a_restart_and_seqs_never_repeat() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut ob = Outbox::open(dir.path()).unwrap();
            assert_eq!(ob.push(ev(TaskState::Preparing)).unwrap().seq, 1);
            assert_eq!(ob.push(ev(TaskState::Running)).unwrap().seq, 2);
            assert_eq!(ob.push(ev(TaskState::Succeeded)).unwrap().seq, 3);
            ob.ack(1).unwrap();
        }
        let mut ob = Outbox::open(dir.path()).unwrap();
        let seqs: Vec<u64> = ob.pending().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![2, 3]);
        ob.ack(3).unwrap();
        assert!(ob.is_empty());
        drop(ob);
        // Everything acknowledged and compacted away: the next seq still moves on.
        let mut ob = Outbox::open(dir.path()).unwrap();
        assert_eq!(ob.push(ev(TaskState::Running)).unwrap().seq, 4);
    }

    #[test]
    fn a_torn_last_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut ob = Outbox::open(dir.path()).unwrap();
            ob.push(ev(TaskState::Running)).unwrap();
        }
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("outbox.jsonl"))
            .unwrap();
        f.write_all(b"{\"t\":\"event\",\"seq\":").unwrap();
        let ob = Outbox::open(dir.path()).unwrap();
        assert_eq!(ob.len(), 1);
    }
}
