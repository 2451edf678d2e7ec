//! The vertices a pipeline can use without code of its own: the `generator` source and
//! the `log` and `blackhole` sinks. They are ordinary programs of the data protocol,
//! built on this SDK like a user's, so the agent runs them the way it runs any vertex.

use crate::{Datum, Source, SourceMessage};
use std::io::Write;
use std::time::{Duration, Instant};

/// The `generator` source: messages of `size` bytes at `rate` a second (0: as fast as
/// the agent asks), stopping after `total` when set.
///
/// Each message says which replica made it and its number, `g<replica>-<seq>`, padded
/// to `size` with `.` (a size smaller than that text gives the text alone), so a sink
/// can tell exactly which messages arrived. Its id for the agent is that pair and the
/// moment the process started: a message the agent re-reads from the same process
/// after a failure is recognised downstream as the same, while a generator started
/// again (after a pause, a crash) makes new messages, as a generator should, rather
/// than ones the buffers would drop as duplicates of the last run's.
#[derive(Debug)]
pub struct Generator {
    rate: u64,
    size: usize,
    total: Option<u64>,
    replica: u32,
    next: u64,
    started: Instant,
    /// Nanoseconds since the epoch when this generator started, in every id it makes.
    run: u64,
}

/// What a generator is told by its vertex's spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GeneratorConfig {
    /// Messages a second; 0 is no limit.
    pub rate: u64,
    /// Each message's size in bytes.
    pub size: usize,
    /// How many messages in all, or no end.
    pub total: Option<u64>,
    /// Which replica of the vertex this is (its task index), so replicas make
    /// different messages.
    pub replica: u32,
}

impl Generator {
    pub fn new(cfg: GeneratorConfig) -> Generator {
        Generator {
            rate: cfg.rate,
            size: cfg.size,
            total: cfg.total,
            replica: cfg.replica,
            next: 0,
            started: Instant::now(),
            run: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
        }
    }

    /// How many messages the rate allows by now, counted from the start, so that a
    /// slow read is caught up on rather than lost.
    fn allowed_by_now(&self) -> u64 {
        if self.rate == 0 {
            return u64::MAX;
        }
        let elapsed = self.started.elapsed().as_secs_f64();
        (elapsed * self.rate as f64) as u64
    }

    fn message(&self, seq: u64, now_ms: i64) -> SourceMessage {
        let mut payload = format!("g{}-{}", self.replica, seq).into_bytes();
        if payload.len() < self.size {
            payload.resize(self.size, b'.');
        }
        let mut id = Vec::with_capacity(20);
        id.extend_from_slice(&self.run.to_le_bytes());
        id.extend_from_slice(&self.replica.to_le_bytes());
        id.extend_from_slice(&seq.to_le_bytes());
        SourceMessage::new(id, payload).event_time(now_ms)
    }
}

impl Source for Generator {
    fn read(&mut self, max: usize, wait: Duration) -> Result<Vec<SourceMessage>, String> {
        let end = self.total.unwrap_or(u64::MAX);
        let mut allowed = self.allowed_by_now().min(end);
        if allowed <= self.next {
            if self.next >= end {
                // Done for good; waiting as asked keeps the agent from spinning.
                std::thread::sleep(wait);
                return Ok(Vec::new());
            }
            // Sleep until the next message is due, or as long as the agent waits.
            let due = Duration::from_secs_f64((self.next + 1) as f64 / self.rate as f64);
            let until = due.saturating_sub(self.started.elapsed()).min(wait);
            std::thread::sleep(until);
            allowed = self.allowed_by_now().min(end);
        }
        let upto = allowed.min(self.next.saturating_add(max as u64));
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let batch = (self.next..upto)
            .map(|seq| self.message(seq, now_ms))
            .collect();
        self.next = self.next.max(upto);
        Ok(batch)
    }

    fn ack(&mut self, _ids: &[Vec<u8>]) -> Result<(), String> {
        // A generator keeps no offsets to commit.
        Ok(())
    }
}

/// The `log` sink: writes each message's payload as a line to `out` (the task's
/// stdout, so `drover logs` shows it), bytes that are not UTF-8 replaced.
pub fn log_batch(out: &mut impl Write, batch: &[Datum]) -> Vec<Result<(), String>> {
    let mut text = String::new();
    for m in batch {
        text.push_str(&String::from_utf8_lossy(m.payload));
        text.push('\n');
    }
    // One write for the whole batch; a failure fails every message of it, which the
    // agent then delivers again.
    let written = out
        .write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| format!("writing to the log: {e}"));
    batch.iter().map(|_| written.clone()).collect()
}

/// The `blackhole` sink: takes every message and does nothing with it, for measuring
/// what comes before it.
pub fn blackhole_batch(batch: &[Datum]) -> Vec<Result<(), String>> {
    vec![Ok(()); batch.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generator(rate: u64, size: usize, total: Option<u64>) -> Generator {
        Generator::new(GeneratorConfig {
            rate,
            size,
            total,
            replica: 3,
        })
    }

    #[test]
    fn messages_say_who_made_them_and_have_their_size() {
        let mut g = generator(0, 16, Some(5));
        let batch = g.read(10, Duration::ZERO).unwrap();
        assert_eq!(batch.len(), 5);
        assert_eq!(batch[4].payload, b"g3-4............");
        assert_eq!(batch[4].id[8..], [3, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(batch[4].id[..8], batch[0].id[..8], "one run, one prefix");
        // Done: nothing more, however often it is asked.
        assert!(g.read(10, Duration::ZERO).unwrap().is_empty());
        let small = generator(0, 2, Some(1)).read(1, Duration::ZERO).unwrap();
        assert_eq!(small[0].payload, b"g3-0");
        // A generator started again makes the same records under new ids, so the
        // buffers do not drop them as the last run's duplicates.
        std::thread::sleep(Duration::from_millis(1));
        let again = generator(0, 16, Some(5)).read(10, Duration::ZERO).unwrap();
        assert_eq!(again[4].payload, batch[4].payload);
        assert_ne!(again[4].id, batch[4].id);
    }

    #[test]
    fn the_rate_is_kept_over_time() {
        let mut g = generator(2_000, 8, None);
        let started = Instant::now();
        let mut got = 0;
        while started.elapsed() < Duration::from_millis(500) {
            got += g.read(100, Duration::from_millis(50)).unwrap().len();
        }
        let expected = (started.elapsed().as_secs_f64() * 2_000.0) as usize;
        assert!(
            got <= expected + 1 && got + 150 >= expected,
            "{got} messages in {:?}, expected about {expected}",
            started.elapsed()
        );
    }

    #[test]
    fn the_log_sink_writes_a_line_per_message_and_fails_the_batch_it_cannot_write() {
        let payloads: [&[u8]; 2] = [b"one", b"tw\xffo"];
        let batch: Vec<Datum> = payloads
            .iter()
            .map(|p| Datum {
                id: [0; 16],
                event_time: 0,
                key: b"",
                payload: p,
            })
            .collect();
        let mut out = Vec::new();
        assert_eq!(log_batch(&mut out, &batch), vec![Ok(()), Ok(())]);
        assert_eq!(String::from_utf8(out).unwrap(), "one\ntw\u{fffd}o\n");
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("disk full"))
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let failed = log_batch(&mut Broken, &batch);
        assert!(
            failed
                .iter()
                .all(|r| r.as_ref().is_err_and(|e| e.contains("disk full")))
        );
        assert_eq!(blackhole_batch(&batch), vec![Ok(()), Ok(())]);
    }
}
