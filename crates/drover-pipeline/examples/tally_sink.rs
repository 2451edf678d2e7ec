//! A sink that counts what reaches it, for tests and benchmarks: how many messages
//! arrived, how many distinct records (a record is named by its payload up to the first
//! `.`, which is how the generator pads), how many arrived twice, and the latency from
//! each message's event time to its arrival.
//!
//! It prints one summary line after every batch (a batch is up to a few hundred
//! messages, so this stays a few hundred lines a second at full speed):
//!
//! ```text
//! tally received=5000 distinct=5000 duplicates=0 p50_ms=3 p99_ms=12 first_ms=... last_ms=...
//! ```
//!
//! `first_ms` and `last_ms` are the wall-clock times (milliseconds since the epoch) of
//! the first and the latest batch, so a benchmark reads the rate at the sink from them
//! however late it reads the line.
//!
//! With `--list`, it also prints each distinct record once, as `record G0-17`, so a test
//! can say which ones are missing. With `--out FILE`, those lines go to FILE instead,
//! appended and flushed before the batch is acknowledged, so they outlive a restart of
//! the replica (whose counts start again from zero).

use std::collections::HashSet;
use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

/// Latencies are counted per millisecond up to a minute; anything slower counts as a
/// minute, which is already far past any figure worth reading.
const LATENCY_BUCKETS: usize = 60_000;

struct Tally {
    received: u64,
    seen: HashSet<Vec<u8>>,
    latency_ms: Vec<u64>,
    list: bool,
    first_ms: Option<i64>,
    last_ms: i64,
}

impl Tally {
    fn add(
        &mut self,
        payload: &[u8],
        event_time: i64,
        now_ms: i64,
        out: &mut impl Write,
    ) -> std::io::Result<()> {
        self.received += 1;
        self.first_ms.get_or_insert(now_ms);
        self.last_ms = now_ms;
        let record = payload.split(|b| *b == b'.').next().unwrap_or(payload);
        if self.seen.insert(record.to_vec()) && self.list {
            // A record that is not text is printed as lossy text: this is a test tool.
            writeln!(out, "record {}", String::from_utf8_lossy(record))?;
        }
        let ms = usize::try_from(now_ms.saturating_sub(event_time).max(0)).unwrap_or(usize::MAX);
        self.latency_ms[ms.min(LATENCY_BUCKETS - 1)] += 1;
        Ok(())
    }

    fn percentile(&self, p: f64) -> usize {
        let total: u64 = self.latency_ms.iter().sum();
        let want = ((total as f64) * p).ceil() as u64;
        let mut acc = 0;
        for (ms, n) in self.latency_ms.iter().enumerate() {
            acc += n;
            if acc >= want.max(1) {
                return ms;
            }
        }
        0
    }

    fn summary(&self, out: &mut impl Write) -> std::io::Result<()> {
        let distinct = self.seen.len() as u64;
        writeln!(
            out,
            "tally received={} distinct={} duplicates={} p50_ms={} p99_ms={} first_ms={} last_ms={}",
            self.received,
            distinct,
            self.received - distinct,
            self.percentile(0.5),
            self.percentile(0.99),
            self.first_ms.unwrap_or(0),
            self.last_ms,
        )?;
        out.flush()
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Records going to a file are always listed: that is what the file is for.
    let list = args.iter().any(|a| a == "--list" || a == "--out");
    let out_file = args
        .iter()
        .position(|a| a == "--out")
        .map(|i| args.get(i + 1).cloned());
    let mut records: Box<dyn Write> = match out_file {
        None => Box::new(std::io::stdout()),
        Some(None) => {
            eprintln!("tally_sink: --out needs a file");
            std::process::exit(2);
        }
        Some(Some(path)) => match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
        {
            Ok(f) => Box::new(f),
            Err(e) => {
                eprintln!("tally_sink: opening {path}: {e}");
                std::process::exit(1);
            }
        },
    };
    let mut tally = Tally {
        received: 0,
        seen: HashSet::new(),
        latency_ms: vec![0; LATENCY_BUCKETS],
        list,
        first_ms: None,
        last_ms: 0,
    };
    let mut out = std::io::stdout().lock();
    let served = drover_pipeline::sink(|batch| {
        let now = now_ms();
        let written = batch
            .iter()
            .try_for_each(|msg| tally.add(msg.payload, msg.event_time, now, &mut records))
            .and_then(|()| records.flush())
            .and_then(|()| tally.summary(&mut out));
        match written {
            Ok(()) => batch.iter().map(|_| Ok(())).collect(),
            // Failing the batch gives it back to the buffer, so nothing is counted as
            // delivered that the summary could not report.
            Err(e) => batch
                .iter()
                .map(|_| Err(format!("writing the tally: {e}")))
                .collect(),
        }
    });
    if let Err(e) = served {
        eprintln!("tally_sink: {e}");
        std::process::exit(1);
    }
}
