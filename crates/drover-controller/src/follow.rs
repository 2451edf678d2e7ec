//! Log and state streams for `drover logs [-f]` and `drover run`: newline-delimited JSON
//! [`StreamEvent`]s, read from the controller's log files and task states.
//!
//! A follower keeps its own byte offsets and last-seen states and re-reads whenever the
//! controller's change counter moves, so a slow reader can never lose anything to a full
//! queue: it just reads more at once.

use crate::Inner;
use bytes::Bytes;
use drover_core::api::StreamEvent;
use drover_core::protocol::LogStream;
use drover_core::state::JobStatus;
use drover_core::{JobId, Millis, TaskId, TaskState};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

/// What a stream follows.
#[derive(Clone, Debug)]
pub(crate) enum Target {
    Job(JobId),
    Task(TaskId),
}

/// The most log bytes read from one file per step, so one chatty task cannot starve
/// the others in the same stream.
const READ_MAX: usize = 256 * 1024;
const KEEPALIVE: Duration = Duration::from_secs(10);

/// What a stream carries and from where.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StreamOptions {
    /// Keep going as output comes, until the target ends.
    pub follow: bool,
    pub streams: &'static [LogStream],
    /// Start each stream of the tasks there at the start of its last this many lines
    /// (`drover logs --tail N`); tasks that appear later are read from their start.
    pub tail: Option<u64>,
    /// Start each stream at its first line read at or after this time (`drover logs
    /// --since`); with `tail` too, at the later of the two starts.
    pub since: Option<Millis>,
    /// Split the output at the times of the stream's time index and give each event
    /// its `time` (`drover logs --timestamps`, and `-o json`).
    pub timestamps: bool,
}

struct Follower {
    inner: Arc<Inner>,
    target: Target,
    follow: bool,
    streams: &'static [LogStream],
    /// Until the first step has placed every stream at its tail.
    tail: Option<u64>,
    since: Option<Millis>,
    /// The streams already placed at or after `since`. The others are looked up again
    /// whenever they have new output, which may still be older than `since`.
    since_found: HashSet<(TaskId, LogStream)>,
    timestamps: bool,
    offsets: HashMap<(TaskId, LogStream), u64>,
    /// The state and reason last sent for each task; a change of either is sent.
    states: HashMap<TaskId, (TaskState, String)>,
    rx: tokio::sync::watch::Receiver<u64>,
    done: bool,
}

/// What a follower needs of a task: id, index, state, reason and exit.
type Seen = (
    TaskId,
    u32,
    TaskState,
    String,
    Option<drover_core::state::Exit>,
);

/// A task as a follower sees it. A pending task's reason is why its job's tasks are not
/// placed yet, which the scheduler keeps per job, so `drover run` and `logs -f` can say
/// what they wait for.
fn seen(state: &crate::state::State, t: &drover_core::state::Task) -> Seen {
    let reason = match state.pending_reasons.get(&t.job_id) {
        Some(why) if t.state == TaskState::Pending => why.text.clone(),
        _ => t.reason.clone(),
    };
    (t.id.clone(), t.index, t.state, reason, t.exit.clone())
}

struct Snapshot {
    tasks: Vec<Seen>,
    finished: Option<StreamEvent>,
}

impl Follower {
    async fn snapshot(&self) -> Snapshot {
        let state = self.inner.state.lock().await;
        let mut tasks = Vec::new();
        let mut finished = None;
        match &self.target {
            Target::Job(job_id) => {
                let mut all_terminal = true;
                for t in state.job_tasks(job_id) {
                    all_terminal &= t.state.is_terminal();
                    tasks.push(seen(&state, t));
                }
                if let Some(job) = state.jobs.get(job_id)
                    && job.status.is_final()
                    && all_terminal
                {
                    finished = Some(StreamEvent::Job {
                        job_id: job.id.clone(),
                        status: job.status,
                        reason: job.reason.clone(),
                        exit: job.exit.clone(),
                    });
                }
            }
            Target::Task(id) => {
                if let Some(t) = state.tasks.get(id) {
                    tasks.push(seen(&state, t));
                    if t.state.is_terminal() {
                        let status = if t.state == TaskState::Succeeded {
                            JobStatus::Complete
                        } else {
                            JobStatus::Failed
                        };
                        finished = Some(StreamEvent::Job {
                            job_id: t.job_id.clone(),
                            status,
                            reason: t.reason.clone(),
                            exit: t.exit.clone(),
                        });
                    }
                }
            }
        }
        tasks.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
        Snapshot { tasks, finished }
    }

    /// Everything new since the last step, and whether the stream is finished.
    async fn step(&mut self) -> (Vec<StreamEvent>, bool) {
        // States are read before logs: an agent ships a task's last output before its
        // terminal event, so once a terminal state is seen its logs are all on disk.
        let snap = self.snapshot().await;
        let mut out = Vec::new();
        let mut more_logs = false;
        for (id, index, state, reason, exit) in &snap.tasks {
            for &stream in self.streams {
                let key = (id.clone(), stream);
                if let Some(lines) = self.tail
                    && !self.offsets.contains_key(&key)
                {
                    match self.inner.logs.tail_offset(id, stream, lines) {
                        Ok(at) => {
                            self.offsets.insert(key.clone(), at);
                        }
                        Err(e) => tracing::warn!(task = %id, "finding the log's tail: {e}"),
                    }
                }
                let mut off = self.offsets.get(&key).copied().unwrap_or(0);
                let size = self.inner.logs.size_of(id, stream);
                if size <= off {
                    continue;
                }
                if let Some(at) = self.since
                    && !self.since_found.contains(&key)
                {
                    match self.inner.logs.since_offset(id, stream, at) {
                        Ok(start) => {
                            if start.found {
                                self.since_found.insert(key.clone());
                            }
                            off = off.max(start.offset);
                            self.offsets.insert(key.clone(), off);
                        }
                        Err(e) => {
                            // Times unknown: the output is shown rather than lost.
                            tracing::warn!(task = %id, "finding where --since starts: {e}");
                            self.since_found.insert(key.clone());
                        }
                    }
                    if size <= off {
                        continue;
                    }
                }
                match self.inner.logs.read_from(id, stream, off, READ_MAX) {
                    Ok(read) if !read.data.is_empty() => {
                        more_logs |= read.data.len() == READ_MAX;
                        self.offsets
                            .insert(key, read.start + read.data.len() as u64);
                        let times = if self.timestamps {
                            self.times(id, stream, read.start, read.data.len())
                        } else {
                            vec![(read.start, None)]
                        };
                        let mut dropped = read.start - off;
                        for (start, end, time) in pieces(&read.data, read.start, &times) {
                            out.push(StreamEvent::Log {
                                task_id: id.clone(),
                                index: *index,
                                stream,
                                offset: read.start + start as u64,
                                data: String::from_utf8_lossy(&read.data[start..end]).into_owned(),
                                dropped,
                                time,
                            });
                            dropped = 0;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(task = %id, "reading log: {e}"),
                }
            }
            let changed = self
                .states
                .get(id)
                .is_none_or(|(s, r)| s != state || r != reason);
            if changed {
                self.states.insert(id.clone(), (*state, reason.clone()));
                out.push(StreamEvent::Task {
                    task_id: id.clone(),
                    index: *index,
                    state: *state,
                    reason: reason.clone(),
                    exit: exit.clone(),
                });
            }
        }
        // Tasks that appear from now on are new: their output is read from its start.
        self.tail = None;
        let finished = if more_logs { None } else { snap.finished };
        match finished {
            Some(ev) => {
                out.push(ev);
                (out, true)
            }
            None => (out, !self.follow && !more_logs),
        }
    }
}

impl Follower {
    /// The times of `len` bytes of a stream from `start`, as [`crate::logs::LogStore::times`]
    /// gives them; unknown when the index cannot be read.
    fn times(
        &self,
        id: &TaskId,
        stream: LogStream,
        start: u64,
        len: usize,
    ) -> Vec<(u64, Option<Millis>)> {
        match self.inner.logs.times(id, stream, start, start + len as u64) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(task = %id, "reading the times of a log: {e}");
                vec![(start, None)]
            }
        }
    }
}

/// Splits `data`, which starts at stream offset `base`, where its time changes: the
/// byte ranges of the pieces with the time of each. A split that would fall inside a
/// UTF-8 character moves to its end, so every piece reads as the text it holds.
fn pieces(
    data: &[u8],
    base: u64,
    times: &[(u64, Option<Millis>)],
) -> Vec<(usize, usize, Option<Millis>)> {
    let mut out: Vec<(usize, usize, Option<Millis>)> = Vec::new();
    for (offset, time) in times {
        let mut at = usize::try_from(offset.saturating_sub(base))
            .unwrap_or(usize::MAX)
            .min(data.len());
        // Continuation bytes are 0b10xxxxxx; a character has at most three of them.
        let mut moved = 0;
        while at < data.len() && data[at] & 0xC0 == 0x80 && moved < 3 {
            at += 1;
            moved += 1;
        }
        match out.last_mut() {
            None => out.push((0, at, *time)),
            Some(last) if at > last.0 => {
                last.1 = at;
                out.push((at, at, *time));
            }
            // At the same place as the piece before: the later time wins, as the
            // piece's first byte was read then.
            Some(last) => last.2 = *time,
        }
    }
    if let Some(last) = out.last_mut() {
        last.1 = data.len();
    }
    out.retain(|(start, end, _)| end > start);
    out
}

fn encode(events: &[StreamEvent]) -> Bytes {
    let mut buf = Vec::new();
    for e in events {
        // Serialising these plain types cannot fail.
        if serde_json::to_writer(&mut buf, e).is_ok() {
            buf.push(b'\n');
        }
    }
    Bytes::from(buf)
}

/// Which of a task's logs a stream carries.
pub(crate) const OUTPUT: &[LogStream] = &[LogStream::Stdout, LogStream::Stderr];
pub(crate) const PREPARE: &[LogStream] = &[LogStream::Prepare];
pub(crate) const ALL: &[LogStream] = &[LogStream::Prepare, LogStream::Stdout, LogStream::Stderr];

pub(crate) fn stream(inner: Arc<Inner>, target: Target, opts: StreamOptions) -> axum::body::Body {
    let rx = inner.changed.subscribe();
    let f = Follower {
        inner,
        target,
        follow: opts.follow,
        streams: opts.streams,
        tail: opts.tail,
        since: opts.since,
        since_found: HashSet::new(),
        timestamps: opts.timestamps,
        offsets: HashMap::new(),
        states: HashMap::new(),
        rx,
        done: false,
    };
    let s = futures_util::stream::unfold(f, |mut f| async move {
        loop {
            if f.done {
                return None;
            }
            let shutdown = f.inner.shutdown.clone();
            f.rx.borrow_and_update();
            let (events, done) = f.step().await;
            f.done = done;
            if !events.is_empty() || done {
                return Some((Ok::<Bytes, std::io::Error>(encode(&events)), f));
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                r = f.rx.changed() => if r.is_err() { return None },
                _ = tokio::time::sleep(KEEPALIVE) => {
                    let ev = StreamEvent::Keepalive { at: drover_core::now_millis() };
                    return Some((Ok(encode(&[ev])), f));
                }
            }
        }
    });
    axum::body::Body::from_stream(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_split_where_its_time_changes_and_never_inside_a_character() {
        let data = "ab\nçd\n".as_bytes();
        // Times from offset 100; the split at 104 falls inside `ç` (bytes 103 and 104)
        // and moves to its end.
        let times = [(100, Some(1)), (103, Some(2)), (104, None), (106, Some(3))];
        let got = pieces(data, 100, &times);
        assert_eq!(
            got,
            [
                (0, 3, Some(1)),
                (3, 5, Some(2)),
                (5, 6, None),
                (6, 7, Some(3))
            ]
        );
        assert!(
            got.iter()
                .all(|(a, b, _)| std::str::from_utf8(&data[*a..*b]).is_ok())
        );
        // Two times at one place after the move: the later one holds.
        let times = [(100, Some(1)), (104, Some(2)), (105, Some(3))];
        assert_eq!(
            pieces(data, 100, &times),
            [(0, 5, Some(1)), (5, 7, Some(3))]
        );
        assert_eq!(pieces(data, 100, &[(100, None)]), [(0, 7, None)]);
        assert_eq!(pieces(b"", 5, &[(5, Some(1))]), []);
    }
}
