//! One embedded buffer: its state in memory and the group-committed writes to its logs.
//!
//! All bookkeeping sits behind one short-held mutex (`State`). Writes go to the disk in
//! groups: an append or ack encodes its records into the state's staging buffer and
//! then waits for a sync that covers it. Whoever takes a log's I/O lock first becomes
//! the leader, writes and syncs everything staged so far, and so answers every caller
//! that staged before it; the others find their records already durable. Appended
//! messages become visible to readers only once durable, so a reader never acks a
//! message that a crash could take back.

use super::log::{self, Appender, SegmentInfo};
use crate::{
    Appended, Buffer, BufferConfig, BufferError, BufferName, BufferStats, Delivery, DeliveryTag,
    Message, MessageId,
};
use async_trait::async_trait;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Milliseconds since the Unix epoch: what the logs record, so that the
/// de-duplication window can be rebuilt across a restart.
pub(super) fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn window_ms(config: &BufferConfig) -> i64 {
    i64::try_from(config.dedup_window.as_millis()).unwrap_or(i64::MAX)
}

struct Entry {
    message: Message,
    /// How many times it has been delivered.
    deliveries: u32,
    /// Its current lease, if it is delivered and not yet acked or given back.
    tag: Option<DeliveryTag>,
}

struct Lease {
    seq: u64,
    deadline: Instant,
}

/// Records waiting for the next sync of one log, and which sync covers them.
#[derive(Default)]
struct Staging {
    buf: Vec<u8>,
    /// The number of the sync that will write `buf`.
    next_sync: u64,
    /// The number of the last sync that completed.
    synced: u64,
}

impl Staging {
    /// The sync a caller that just staged (or read) something must wait for.
    fn wait_for(&self) -> u64 {
        if self.buf.is_empty() {
            // The sync in progress, if any, may carry records this caller relies on
            // (another caller's ack of the same tag); with none, this is `synced`.
            self.next_sync - 1
        } else {
            self.next_sync
        }
    }
}

struct State {
    config: BufferConfig,
    deleted: bool,
    /// Set when a write or sync failed: what is on disk is then unknown, so the buffer
    /// refuses everything until it is opened again and recovered from its files.
    failed: Option<String>,
    /// Every message written and not acked (staged, pending or leased), by sequence.
    entries: BTreeMap<u64, Entry>,
    /// Durable messages never delivered, in order: all newer than those in `redo`.
    fresh: VecDeque<u64>,
    /// Messages due again (lease ended or given back), oldest first.
    redo: BTreeSet<u64>,
    /// Messages given back with a delay, by when they are due.
    delayed: BTreeSet<(Instant, u64)>,
    leases: HashMap<DeliveryTag, Lease>,
    deadlines: BTreeSet<(Instant, DeliveryTag)>,
    /// Ids written inside the window and when, with the same in write order for pruning.
    dedup: HashMap<MessageId, i64>,
    dedup_order: VecDeque<(i64, MessageId)>,
    next_seq: u64,
    next_tag: u64,
    duplicates_total: u64,
    segments: VecDeque<SegmentInfo>,
    /// Message records waiting for a sync, and the first sequence number among them.
    seg: Staging,
    seg_first: u64,
    acks: Staging,
    /// The lowest sequence number acked in `acks.buf`: its segment must stay until then.
    acks_min: u64,
}

impl State {
    fn usable(&self, name: &BufferName) -> Result<(), BufferError> {
        if self.deleted {
            return Err(BufferError::NotFound(name.clone()));
        }
        if let Some(err) = &self.failed {
            return Err(BufferError::Backend(format!(
                "buffer {name} failed earlier ({err}); open it again to recover"
            )));
        }
        Ok(())
    }

    /// Forgets ids written before the window, and the oldest beyond the most it may
    /// remember (leaving room for a batch of `incoming` more).
    fn prune_dedup(&mut self, now_ms: i64, incoming: usize) {
        let start = now_ms.saturating_sub(window_ms(&self.config));
        let keep = self.config.dedup_max_ids.saturating_sub(incoming);
        while let Some(&(ms, id)) = self.dedup_order.front() {
            if ms >= start && self.dedup_order.len() <= keep {
                break;
            }
            self.dedup_order.pop_front();
            // The id may have been written again after its window ended; only the
            // entry of this write goes.
            if self.dedup.get(&id) == Some(&ms) {
                self.dedup.remove(&id);
            }
        }
    }

    /// Makes messages whose lease ended or whose delay passed due again.
    fn sweep(&mut self, now: Instant) {
        while let Some(&(deadline, tag)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_first();
            if let Some(lease) = self.leases.remove(&tag) {
                if let Some(entry) = self.entries.get_mut(&lease.seq) {
                    entry.tag = None;
                }
                self.redo.insert(lease.seq);
            }
        }
        while let Some(&(due, seq)) = self.delayed.first() {
            if due > now {
                break;
            }
            self.delayed.pop_first();
            if self.entries.contains_key(&seq) {
                self.redo.insert(seq);
            }
        }
    }

    /// When the next lease ends or delayed message is due, if any.
    fn next_event(&self) -> Option<Instant> {
        let lease = self.deadlines.first().map(|&(at, _)| at);
        let delay = self.delayed.first().map(|&(at, _)| at);
        match (lease, delay) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn take(&mut self, max: usize, now: Instant) -> Vec<Delivery> {
        let mut out = Vec::new();
        let lease = self.config.lease;
        while out.len() < max {
            let Some(seq) = self.redo.pop_first().or_else(|| self.fresh.pop_front()) else {
                break;
            };
            let Some(entry) = self.entries.get_mut(&seq) else {
                continue;
            };
            let tag = DeliveryTag(self.next_tag);
            self.next_tag += 1;
            let deadline = now + lease;
            entry.tag = Some(tag);
            out.push(Delivery {
                tag,
                redeliveries: entry.deliveries,
                message: entry.message.clone(),
            });
            entry.deliveries = entry.deliveries.saturating_add(1);
            self.leases.insert(tag, Lease { seq, deadline });
            self.deadlines.insert((deadline, tag));
        }
        out
    }

    /// Ends the leases of `tags`, returning the sequence numbers they held.
    fn release(&mut self, tags: &[DeliveryTag]) -> Vec<u64> {
        let mut seqs = Vec::with_capacity(tags.len());
        for tag in tags {
            if let Some(lease) = self.leases.remove(tag) {
                self.deadlines.remove(&(lease.deadline, *tag));
                if let Some(entry) = self.entries.get_mut(&lease.seq) {
                    entry.tag = None;
                }
                seqs.push(lease.seq);
            }
        }
        seqs
    }

    /// The lowest sequence number whose record must stay on disk.
    fn floor(&self) -> u64 {
        let mut floor = self.next_seq;
        if let Some((&seq, _)) = self.entries.first_key_value() {
            floor = floor.min(seq);
        }
        if !self.acks.buf.is_empty() {
            floor = floor.min(self.acks_min);
        }
        floor
    }
}

/// When a buffer's files are rolled or rewritten.
#[derive(Clone, Copy, Debug)]
pub(super) struct Sizes {
    /// A segment at least this big is closed and a new one started.
    pub segment: u64,
    /// An ack log bigger than this is rewritten with only the ranges still needed.
    pub ack_log: u64,
}

pub(super) struct EmbeddedBuffer {
    name: BufferName,
    dir: PathBuf,
    sizes: Sizes,
    state: Mutex<State>,
    /// Wakes fetches waiting for messages when some become due, or the buffer goes.
    notify: Notify,
    /// The open segment; holding this lock makes a task the segment log's sync leader.
    segment: tokio::sync::Mutex<Option<Appender>>,
    /// The ack log, likewise.
    acks: tokio::sync::Mutex<Option<Appender>>,
}

impl EmbeddedBuffer {
    /// Opens the buffer in `dir`, recovering whatever its files hold.
    pub(super) fn open(
        name: BufferName,
        dir: PathBuf,
        config: BufferConfig,
        sizes: Sizes,
    ) -> Result<EmbeddedBuffer, BufferError> {
        let now_ms = wall_ms();
        let recovered = log::recover(&dir, now_ms.saturating_sub(window_ms(&config)))?;
        let mut entries = BTreeMap::new();
        let mut fresh = VecDeque::with_capacity(recovered.pending.len());
        for (seq, (_, message)) in recovered.pending {
            entries.insert(
                seq,
                Entry {
                    message,
                    deliveries: 0,
                    tag: None,
                },
            );
            fresh.push_back(seq);
        }
        let mut dedup = HashMap::with_capacity(recovered.recent.len());
        for &(ms, id) in &recovered.recent {
            dedup.insert(id, ms);
        }
        let state = State {
            config,
            deleted: false,
            failed: None,
            entries,
            fresh,
            redo: BTreeSet::new(),
            delayed: BTreeSet::new(),
            leases: HashMap::new(),
            deadlines: BTreeSet::new(),
            dedup,
            dedup_order: recovered.recent.into(),
            next_seq: recovered.next_seq,
            // Tags start at a random point for every opening, never at 1: an agent
            // that acknowledges (or gives back) a delivery made before a controller
            // restart, or before the buffer was reopened, would otherwise hit the tag
            // the new opening gave to another message, and acknowledge a message never
            // processed. Each opening's tags are a short run in a 2^63 space.
            next_tag: rand::random::<u64>() >> 1,
            duplicates_total: recovered.duplicates_total,
            segments: recovered.segments.into(),
            seg: Staging {
                next_sync: 1,
                ..Staging::default()
            },
            seg_first: recovered.next_seq,
            acks: Staging {
                next_sync: 1,
                ..Staging::default()
            },
            acks_min: u64::MAX,
        };
        Ok(EmbeddedBuffer {
            name,
            dir,
            sizes,
            state: Mutex::new(state),
            notify: Notify::new(),
            segment: tokio::sync::Mutex::new(Some(recovered.segment)),
            acks: tokio::sync::Mutex::new(Some(recovered.acks)),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves counts that may be off but no broken
        // invariant that matters more than staying available, so a poisoned lock is
        // taken over rather than spread.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn set_config(&self, config: &BufferConfig) {
        self.lock().config = config.clone();
    }

    pub(super) fn is_failed(&self) -> bool {
        self.lock().failed.is_some()
    }

    /// Marks the buffer deleted (every call then answers NotFound), wakes its waiting
    /// readers and waits for any sync in progress, so its directory can go.
    pub(super) async fn close(&self) {
        self.lock().deleted = true;
        self.notify.notify_waiters();
        self.segment.lock().await.take();
        self.acks.lock().await.take();
    }

    fn fail(&self, err: &BufferError) {
        tracing::error!(buffer = %self.name, error = %err, "buffer write failed; it refuses calls until opened again");
        self.lock().failed = Some(err.to_string());
        self.notify.notify_waiters();
    }

    /// Runs a blocking write on the blocking pool, taking the appender out of its lock
    /// slot and putting it back after.
    async fn blocking<T: Send + 'static>(
        &self,
        slot: &mut Option<Appender>,
        work: impl FnOnce(&mut Appender) -> Result<T, BufferError> + Send + 'static,
    ) -> Result<T, BufferError> {
        let Some(mut appender) = slot.take() else {
            return Err(BufferError::NotFound(self.name.clone()));
        };
        let joined = tokio::task::spawn_blocking(move || {
            let out = work(&mut appender);
            (appender, out)
        })
        .await;
        match joined {
            Ok((appender, out)) => {
                *slot = Some(appender);
                out
            }
            Err(e) => Err(BufferError::Backend(format!(
                "buffer {}: a log write task failed: {e}",
                self.name
            ))),
        }
    }

    /// Returns once sync number `target` of the segment log has completed, leading a
    /// sync itself when no one else has.
    async fn sync_segments(&self, target: u64) -> Result<(), BufferError> {
        let mut slot = self.segment.lock().await;
        let (buf, first, end, sync_no) = {
            let mut state = self.lock();
            if state.seg.synced >= target {
                return Ok(());
            }
            state.usable(&self.name)?;
            let buf = std::mem::take(&mut state.seg.buf);
            let first = state.seg_first;
            state.seg_first = state.next_seq;
            let sync_no = state.seg.next_sync;
            state.seg.next_sync += 1;
            (buf, first, state.next_seq, sync_no)
        };
        let dir = self.dir.clone();
        let segment_bytes = self.sizes.segment;
        let written = self
            .blocking(&mut slot, move |appender| {
                let rolled = appender.len >= segment_bytes;
                if rolled {
                    *appender = Appender::open(log::segment_path(&dir, first))?;
                    log::sync_dir(&dir)?;
                }
                appender.write_synced(&buf)?;
                Ok(rolled)
            })
            .await;
        let rolled = match written {
            Ok(rolled) => rolled,
            Err(err) => {
                self.fail(&err);
                return Err(err);
            }
        };
        {
            let mut state = self.lock();
            let now_ms = wall_ms();
            if rolled {
                state.segments.push_back(SegmentInfo {
                    first_seq: first,
                    last_write_ms: now_ms,
                });
            } else if let Some(last) = state.segments.back_mut() {
                last.last_write_ms = now_ms;
            }
            state.seg.synced = sync_no;
            for seq in first..end {
                if state.entries.contains_key(&seq) {
                    state.fresh.push_back(seq);
                }
            }
        }
        self.notify.notify_waiters();
        Ok(())
    }

    /// Returns once sync number `target` of the ack log has completed; the leader then
    /// also deletes segments no longer needed and compacts the ack log.
    async fn sync_acks(&self, target: u64) -> Result<(), BufferError> {
        let mut slot = self.acks.lock().await;
        let (buf, sync_no) = {
            let mut state = self.lock();
            if state.acks.synced >= target {
                return Ok(());
            }
            state.usable(&self.name)?;
            let buf = std::mem::take(&mut state.acks.buf);
            state.acks_min = u64::MAX;
            let sync_no = state.acks.next_sync;
            state.acks.next_sync += 1;
            (buf, sync_no)
        };
        let written = self
            .blocking(&mut slot, move |appender| appender.write_synced(&buf))
            .await;
        if let Err(err) = written {
            self.fail(&err);
            return Err(err);
        }
        let (doomed, compaction) = {
            let mut state = self.lock();
            state.acks.synced = sync_no;
            let floor = state.floor();
            let keep_after = wall_ms().saturating_sub(window_ms(&state.config));
            let mut doomed = Vec::new();
            // A segment goes once every message in it is acked (the next one starts at
            // or below the floor) and its ids have left the de-duplication window.
            while state.segments.len() >= 2
                && state.segments[1].first_seq <= floor
                && state.segments[0].last_write_ms < keep_after
            {
                if let Some(segment) = state.segments.pop_front() {
                    doomed.push(segment);
                }
            }
            let too_big = slot.as_ref().map(|a| a.len).unwrap_or(0) > self.sizes.ack_log;
            let compaction = too_big.then(|| {
                // The acked ranges still worth keeping: those in segments still on disk,
                // which are all sequence numbers there not held in `entries`.
                let low = state
                    .segments
                    .front()
                    .map_or(state.next_seq, |s| s.first_seq);
                let held: Vec<u64> = state.entries.range(low..).map(|(&s, _)| s).collect();
                let mut ranges = Vec::new();
                let mut from = low;
                for seq in held {
                    if seq > from {
                        ranges.push((from, seq));
                    }
                    from = seq + 1;
                }
                if state.next_seq > from {
                    ranges.push((from, state.next_seq));
                }
                (state.duplicates_total, ranges)
            });
            (doomed, compaction)
        };
        if doomed.is_empty() && compaction.is_none() {
            return Ok(());
        }
        let dir = self.dir.clone();
        let kept = self
            .blocking(&mut slot, move |appender| {
                let mut kept = Vec::new();
                for segment in doomed {
                    let path = log::segment_path(&dir, segment.first_seq);
                    match std::fs::remove_file(&path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => {
                            tracing::warn!(file = %path.display(), error = %e, "could not delete a fully acked segment; will retry");
                            kept.push(segment);
                        }
                    }
                }
                // A segment that could not be deleted still needs its acks on record.
                if let (Some((dups, ranges)), true) = (compaction, kept.is_empty()) {
                    *appender = log::rewrite_ack_log(&dir, dups, &ranges)?;
                }
                Ok(kept)
            })
            .await;
        match kept {
            Ok(kept) => {
                let mut state = self.lock();
                for segment in kept.into_iter().rev() {
                    state.segments.push_front(segment);
                }
                Ok(())
            }
            Err(err) => {
                self.fail(&err);
                Err(err)
            }
        }
    }
}

#[async_trait]
impl Buffer for EmbeddedBuffer {
    fn name(&self) -> &BufferName {
        &self.name
    }

    async fn append(&self, batch: &[Message]) -> Result<Appended, BufferError> {
        for message in batch {
            log::check_size(message)?;
        }
        let (appended, target) = {
            let mut guard = self.lock();
            let state = &mut *guard;
            state.usable(&self.name)?;
            let now_ms = wall_ms();
            state.prune_dedup(now_ms, batch.len());
            let limit = state.config.limit();
            let held = state.entries.len() as u64;
            if !batch.is_empty() && held >= limit {
                return Err(BufferError::Full {
                    name: self.name.clone(),
                    pending: held,
                    limit,
                });
            }
            let mut appended = Appended::default();
            for message in batch {
                if state.dedup.contains_key(&message.id) {
                    appended.duplicates += 1;
                    continue;
                }
                state.dedup.insert(message.id, now_ms);
                state.dedup_order.push_back((now_ms, message.id));
                let seq = state.next_seq;
                state.next_seq += 1;
                log::encode_message(&mut state.seg.buf, seq, now_ms, message);
                state.entries.insert(
                    seq,
                    Entry {
                        message: message.clone(),
                        deliveries: 0,
                        tag: None,
                    },
                );
                appended.written += 1;
            }
            state.duplicates_total += appended.duplicates as u64;
            // A duplicate's first write may still be waiting for its sync, so even an
            // all-duplicate batch waits for whatever is staged.
            (appended, state.seg.wait_for())
        };
        self.sync_segments(target).await?;
        Ok(appended)
    }

    async fn fetch(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BufferError> {
        let until = Instant::now() + wait;
        loop {
            // Registered before looking, so a wake-up between the look and the wait is
            // not missed.
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let wake = {
                let mut state = self.lock();
                state.usable(&self.name)?;
                let now = Instant::now();
                state.sweep(now);
                let out = state.take(max, now);
                if !out.is_empty() || max == 0 || now >= until {
                    return Ok(out);
                }
                state.next_event().map_or(until, |at| at.min(until))
            };
            // Either a notification or the time of the next lease end, delay or the
            // caller's deadline: both mean look again.
            if tokio::time::timeout_at(wake, notified).await.is_err() {
                continue;
            }
        }
    }

    async fn ack(&self, tags: &[DeliveryTag]) -> Result<(), BufferError> {
        let target = {
            let mut guard = self.lock();
            let state = &mut *guard;
            state.usable(&self.name)?;
            let mut seqs = state.release(tags);
            for seq in &seqs {
                state.entries.remove(seq);
            }
            if !seqs.is_empty() {
                seqs.sort_unstable();
                state.acks_min = state.acks_min.min(seqs[0]);
                let dups = state.duplicates_total;
                log::encode_acks(&mut state.acks.buf, dups, &log::ranges_of(&seqs));
            }
            // Waits for acks of the same tags staged by another call, so an idempotent
            // repeat does not answer before the first one is durable.
            state.acks.wait_for()
        };
        self.sync_acks(target).await
    }

    async fn nack(&self, tags: &[DeliveryTag], delay: Duration) -> Result<(), BufferError> {
        {
            let mut state = self.lock();
            state.usable(&self.name)?;
            let seqs = state.release(tags);
            let due = Instant::now() + delay;
            for seq in seqs {
                if delay.is_zero() {
                    state.redo.insert(seq);
                } else {
                    state.delayed.insert((due, seq));
                }
            }
        }
        // Waiting fetches recompute when to wake (or take the messages now).
        self.notify.notify_waiters();
        Ok(())
    }

    async fn keep_alive(&self, tags: &[DeliveryTag]) -> Result<(), BufferError> {
        let mut guard = self.lock();
        let state = &mut *guard;
        state.usable(&self.name)?;
        let deadline = Instant::now() + state.config.lease;
        for tag in tags {
            if let Some(lease) = state.leases.get_mut(tag) {
                state.deadlines.remove(&(lease.deadline, *tag));
                lease.deadline = deadline;
                state.deadlines.insert((deadline, *tag));
            }
        }
        Ok(())
    }

    async fn stats(&self) -> Result<BufferStats, BufferError> {
        let mut state = self.lock();
        state.usable(&self.name)?;
        state.sweep(Instant::now());
        let held = state.entries.len() as u64;
        let unacked = state.leases.len() as u64;
        Ok(BufferStats {
            pending: held - unacked,
            unacked,
            usage: held as f64 / state.config.max_length.max(1) as f64,
            acked_total: state.next_seq - held,
            written_total: state.next_seq,
            duplicates_total: state.duplicates_total,
        })
    }
}

/// Shared with the backend, which keeps one instance per open buffer.
pub(super) type Handle = Arc<EmbeddedBuffer>;
