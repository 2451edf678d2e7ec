//! The behaviour every [`BufferBackend`] must show, as a table of cases any backend's
//! tests can run: `contract::run(&backend, "project").await` returns the failures.
//!
//! The cases use only the traits, so they hold for the embedded backend and the NATS
//! one alike; their timings are generous (leases of hundreds of milliseconds, waits of
//! seconds) so that a backend over a network passes on a loaded machine.

use crate::{Buffer, BufferBackend, BufferConfig, BufferError, BufferName, Message, MessageId};
use bytes::Bytes;
use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

type Outcome = Result<(), String>;
type CaseFuture<'a> = Pin<Box<dyn Future<Output = Outcome> + Send + 'a>>;
/// One case: given the backend and a fresh buffer name, checks one behaviour.
pub type Case = for<'a> fn(&'a dyn BufferBackend, BufferName) -> CaseFuture<'a>;

/// Every case, by a name that is also its buffer's vertex label.
pub const CASES: &[(&str, Case)] = &[
    ("append-fetch-ack", append_fetch_ack),
    ("dedup", dedup),
    ("dedup-window-ends", dedup_window_ends),
    ("full-then-accepted", full_then_accepted),
    ("fetch-waits", fetch_waits),
    ("lease-expiry", lease_expiry),
    ("nack-delay", nack_delay),
    ("keep-alive", keep_alive),
    ("ack-is-idempotent", ack_is_idempotent),
    ("concurrent-readers", concurrent_readers),
    ("stats-counts", stats_counts),
    ("reopen-keeps-messages", reopen_keeps_messages),
    ("delete-and-list", delete_and_list),
];

/// Runs every case on a buffer of its own under `project` (deleted before and after),
/// one after another, and returns the failures as `(case, what went wrong)`.
pub async fn run(backend: &dyn BufferBackend, project: &str) -> Vec<(String, String)> {
    let mut failures = Vec::new();
    for (case, check) in CASES {
        let outcome = match BufferName::new(project, "contract", case, 0) {
            Ok(name) => run_one(backend, name, *check).await,
            Err(e) => Err(format!("bad buffer name: {e}")),
        };
        if let Err(e) = outcome {
            failures.push((case.to_string(), e));
        }
    }
    failures
}

async fn run_one(backend: &dyn BufferBackend, name: BufferName, check: Case) -> Outcome {
    backend
        .delete(&name)
        .await
        .map_err(|e| format!("deleting before: {e}"))?;
    // A case that hangs is a failure, not a stuck test run.
    let outcome = tokio::time::timeout(Duration::from_secs(60), check(backend, name.clone()))
        .await
        .unwrap_or_else(|_| Err("timed out after 60 s".into()));
    backend
        .delete(&name)
        .await
        .map_err(|e| format!("deleting after: {e}"))?;
    outcome
}

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

fn msg(i: u128) -> Message {
    Message {
        id: MessageId(i),
        key: Bytes::from(format!("key-{}", i % 7)),
        event_time: 1_700_000_000_000 + i as i64,
        payload: Bytes::from(format!("payload of message {i}")),
    }
}

fn msgs(range: std::ops::Range<u128>) -> Vec<Message> {
    range.map(msg).collect()
}

fn short_lease() -> BufferConfig {
    BufferConfig {
        lease: Duration::from_millis(300),
        ..BufferConfig::default()
    }
}

fn e(what: &str, err: BufferError) -> String {
    format!("{what}: {err}")
}

async fn open(
    backend: &dyn BufferBackend,
    name: &BufferName,
    config: &BufferConfig,
) -> Result<Arc<dyn Buffer>, String> {
    backend.open(name, config).await.map_err(|x| e("open", x))
}

/// Fetches until `n` deliveries came or `within` passed.
/// The buffer's stats once `settled` holds for them, read again for up to 2 s, else the
/// last reading for the case's message. A networked backend (NATS) may count an
/// acknowledgement a moment after accepting it; the trait promises the ack, and the
/// counts catching up with it soon after.
async fn stats_when(
    buf: &dyn Buffer,
    settled: impl Fn(&crate::BufferStats) -> bool,
) -> Result<crate::BufferStats, String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let stats = buf.stats().await.map_err(|x| e("stats", x))?;
        if settled(&stats) || tokio::time::Instant::now() >= deadline {
            return Ok(stats);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn fetch_n(
    buffer: &dyn Buffer,
    n: usize,
    within: Duration,
) -> Result<Vec<crate::Delivery>, String> {
    let until = Instant::now() + within;
    let mut out = Vec::new();
    while out.len() < n && Instant::now() < until {
        let wait = until.saturating_duration_since(Instant::now());
        out.extend(
            buffer
                .fetch(n - out.len(), wait)
                .await
                .map_err(|x| e("fetch", x))?,
        );
    }
    Ok(out)
}

fn append_fetch_ack(b: &dyn BufferBackend, name: BufferName) -> CaseFuture<'_> {
    Box::pin(async move {
        let buf = open(b, &name, &BufferConfig::default()).await?;
        let batch = msgs(0..10);
        let appended = buf.append(&batch).await.map_err(|x| e("append", x))?;
        ensure!(
            appended.written == 10 && appended.duplicates == 0,
            "append said {appended:?}"
        );
        let got = fetch_n(&*buf, 10, Duration::from_secs(5)).await?;
        let messages: Vec<Message> = got.iter().map(|d| d.message.clone()).collect();
        ensure!(
            messages == batch,
            "fetched {messages:?}, expected the batch in order"
        );
        ensure!(
            got.iter().all(|d| d.redeliveries == 0),
            "first deliveries counted as redeliveries"
        );
        let tags: Vec<_> = got.iter().map(|d| d.tag).collect();
        ensure!(
            tags.iter().collect::<HashSet<_>>().len() == 10,
            "delivery tags repeat: {tags:?}"
        );
        buf.ack(&tags).await.map_err(|x| e("ack", x))?;
        let again = buf
            .fetch(10, Duration::from_millis(500))
            .await
            .map_err(|x| e("fetch", x))?;
        ensure!(
            again.is_empty(),
            "acked messages delivered again: {again:?}"
        );
        let done =
            |s: &crate::BufferStats| s.is_drained() && s.acked_total == 10 && s.written_total == 10;
        let stats = stats_when(&*buf, done).await?;
        ensure!(done(&stats), "stats after acking all: {stats:?}");
        let empty = buf.append(&[]).await.map_err(|x| e("empty append", x))?;
        ensure!(
            empty.written == 0 && empty.duplicates == 0,
            "an empty append said {empty:?}"
        );
        Ok(())
    })
}

fn dedup(b: &dyn BufferBackend, name: BufferName) -> CaseFuture<'_> {
    Box::pin(async move {
        let buf = open(b, &name, &BufferConfig::default()).await?;
        // (batch of ids, expected written, expected duplicates)
        let steps: [(&[u128], usize, usize); 4] = [
            (&[1, 2, 1], 2, 1),
            (&[2, 3], 1, 1),
            (&[1, 2, 3], 0, 3),
            (&[4, 4, 4, 5], 2, 2),
        ];
        for (ids, written, dups) in steps {
            let batch: Vec<Message> = ids.iter().map(|&i| msg(i)).collect();
            let a = buf.append(&batch).await.map_err(|x| e("append", x))?;
            ensure!(
                a.written == written && a.duplicates == dups,
                "appending {ids:?} said {a:?}, expected {written} written and {dups} duplicates"
            );
        }
        let got = fetch_n(&*buf, 5, Duration::from_secs(5)).await?;
        let ids: Vec<u128> = got.iter().map(|d| d.message.id.0).collect();
        ensure!(
            ids == [1, 2, 3, 4, 5],
            "fetched ids {ids:?}, expected each once in order"
        );
        // An acked message's id is still remembered inside the window.
        buf.ack(&got.iter().map(|d| d.tag).collect::<Vec<_>>())
            .await
            .map_err(|x| e("ack", x))?;
        let a = buf.append(&[msg(1)]).await.map_err(|x| e("append", x))?;
        ensure!(
            a.written == 0 && a.duplicates == 1,
            "re-appending an acked id said {a:?}"
        );
        let stats = buf.stats().await.map_err(|x| e("stats", x))?;
        ensure!(
            stats.duplicates_total == 8 && stats.written_total == 5,
            "stats {stats:?}: expected 8 duplicates and 5 written"
        );
        Ok(())
    })
}

fn dedup_window_ends(b: &dyn BufferBackend, name: BufferName) -> CaseFuture<'_> {
    Box::pin(async move {
        let config = BufferConfig {
            dedup_window: Duration::from_millis(500),
            ..BufferConfig::default()
        };
        let buf = open(b, &name, &config).await?;
        buf.append(&[msg(1)]).await.map_err(|x| e("append", x))?;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let a = buf.append(&[msg(1)]).await.map_err(|x| e("append", x))?;
        ensure!(
            a.written == 1,
            "an id written 1.5 s before, with a 0.5 s window, was dropped: {a:?}"
        );
        Ok(())
    })
}

fn full_then_accepted(b: &dyn BufferBackend, name: BufferName) -> CaseFuture<'_> {
    Box::pin(async move {
        let config = BufferConfig {
            max_length: 10,
            usage_limit: 0.5,
            ..BufferConfig::default()
        };
        let buf = open(b, &name, &config).await?;
        buf.append(&msgs(0..5))
            .await
            .map_err(|x| e("append to the limit", x))?;
        match buf.append(&[msg(5)]).await {
            Err(BufferError::Full {
                limit: 5,
                pending: 5,
                ..
            }) => {}
            other => {
                return Err(format!(
                    "appending at the limit gave {other:?}, expected Full of 5"
                ));
            }
        }
        // Delivered but unacked messages still count against the limit.
        let got = fetch_n(&*buf, 2, Duration::from_secs(5)).await?;
        ensure!(got.len() == 2, "fetched {} of 2", got.len());
        ensure!(
            matches!(buf.append(&[msg(5)]).await, Err(BufferError::Full { .. })),
            "unacked messages did not count against the limit"
        );
        buf.ack(&got.iter().map(|d| d.tag).collect::<Vec<_>>())
            .await
            .map_err(|x| e("ack", x))?;
        let a = buf
            .append(&[msg(5)])
            .await
            .map_err(|x| e("append after acks", x))?;
        ensure!(a.written == 1, "append after acks said {a:?}");
        // The refused message was not remembered as written.
        let all = fetch_n(&*buf, 4, Duration::from_secs(5)).await?;
        let ids: Vec<u128> = all.iter().map(|d| d.message.id.0).collect();
        ensure!(ids == [2, 3, 4, 5], "after back-pressure fetched {ids:?}");
        Ok(())
    })
}

fn fetch_waits(b: &dyn BufferBackend, name: BufferName) -> CaseFuture<'_> {
    Box::pin(async move {
        let buf = open(b, &name, &BufferConfig::default()).await?;
        let t0 = Instant::now();
        let none = buf
            .fetch(10, Duration::from_millis(400))
            .await
            .map_err(|x| e("fetch", x))?;
        let took = t0.elapsed();
        ensure!(none.is_empty(), "an empty buffer delivered {none:?}");
        ensure!(
            took >= Duration::from_millis(350) && took < Duration::from_secs(3),
            "an empty fetch waiting 400 ms returned after {took:?}"
        );
        let writer = buf.clone();
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            writer.append(&[msg(1)]).await
        });
        let t0 = Instant::now();
        let got = buf
            .fetch(10, Duration::from_secs(10))
            .await
            .map_err(|x| e("fetch", x))?;
        let took = t0.elapsed();
        late.await
            .map_err(|x| format!("writer task: {x}"))?
            .map_err(|x| e("late append", x))?;
        ensure!(got.len() == 1, "a waiting fetch got {got:?}");
        ensure!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(5),
            "a waiting fetch returned after {took:?}, expected soon after the append at 300 ms"
        );
        Ok(())
    })
}

fn lease_expiry(b: &dyn BufferBackend, name: BufferName) -> CaseFuture<'_> {
    Box::pin(async move {
        let buf = open(b, &name, &short_lease()).await?;
        buf.append(&[msg(1)]).await.map_err(|x| e("append", x))?;
        let first = fetch_n(&*buf, 1, Duration::from_secs(5)).await?;
        ensure!(first.len() == 1, "no first delivery");
        let t0 = Instant::now();
        let second = buf
            .fetch(1, Duration::from_secs(10))
            .await
            .map_err(|x| e("fetch", x))?;
        let took = t0.elapsed();
        ensure!(
            second.len() == 1 && second[0].message == first[0].message,
            "the expired lease was not redelivered: {second:?}"
        );
        ensure!(
            took >= Duration::from_millis(200),
            "redelivered after {took:?}, before the 300 ms lease ended"
        );
        ensure!(
            second[0].redeliveries == 1,
            "redeliveries {} on the second delivery",
            second[0].redeliveries
        );
        ensure!(
            second[0].tag != first[0].tag,
            "the redelivery reused the tag"
        );
        // Acking the stale delivery is not an error; acking the live one ends it.
        buf.ack(&[first[0].tag])
            .await
            .map_err(|x| e("ack of an expired tag", x))?;
        buf.ack(&[second[0].tag]).await.map_err(|x| e("ack", x))?;
        let later = buf
            .fetch(1, Duration::from_millis(800))
            .await
            .map_err(|x| e("fetch", x))?;
        ensure!(later.is_empty(), "delivered after the ack: {later:?}");
        Ok(())
    })
}

fn nack_delay(b: &dyn BufferBackend, name: BufferName) -> CaseFuture<'_> {
    Box::pin(async move {
        let buf = open(b, &name, &BufferConfig::default()).await?;
        buf.append(&msgs(1..3)).await.map_err(|x| e("append", x))?;
        let got = fetch_n(&*buf, 2, Duration::from_secs(5)).await?;
        ensure!(got.len() == 2, "fetched {} of 2", got.len());
        buf.nack(&[got[0].tag], Duration::from_millis(600))
            .await
            .map_err(|x| e("nack", x))?;
        buf.nack(&[got[1].tag], Duration::ZERO)
            .await
            .map_err(|x| e("nack", x))?;
        let now = buf
            .fetch(2, Duration::from_millis(200))
            .await
            .map_err(|x| e("fetch", x))?;
        ensure!(
            now.len() == 1 && now[0].message.id == MessageId(2),
            "right after the nacks fetched {now:?}, expected only the undelayed message"
        );
        ensure!(
            now[0].redeliveries == 1,
            "a nacked message came back with redeliveries {}",
            now[0].redeliveries
        );
        let t0 = Instant::now();
        let delayed = buf
            .fetch(2, Duration::from_secs(10))
            .await
            .map_err(|x| e("fetch", x))?;
        let took = t0.elapsed();
        ensure!(
            delayed.len() == 1 && delayed[0].message.id == MessageId(1),
            "the delayed message came back as {delayed:?}"
        );
        ensure!(
            took >= Duration::from_millis(250),
            "the 600 ms delay ended {took:?} after a fetch at about 200 ms"
        );
        Ok(())
    })
}

fn keep_alive(b: &dyn BufferBackend, name: BufferName) -> CaseFuture<'_> {
    Box::pin(async move {
        let config = BufferConfig {
            lease: Duration::from_millis(600),
            ..BufferConfig::default()
        };
        let buf = open(b, &name, &config).await?;
        buf.append(&[msg(1)]).await.map_err(|x| e("append", x))?;
        let got = fetch_n(&*buf, 1, Duration::from_secs(5)).await?;
        ensure!(got.len() == 1, "no delivery");
        // Kept alive every 200 ms for 1.8 s: three leases' worth, never redelivered.
        for _ in 0..9 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            buf.keep_alive(&[got[0].tag])
                .await
                .map_err(|x| e("keep_alive", x))?;
            let early = buf
                .fetch(1, Duration::ZERO)
                .await
                .map_err(|x| e("fetch", x))?;
            ensure!(early.is_empty(), "redelivered while kept alive: {early:?}");
        }
        let later = buf
            .fetch(1, Duration::from_secs(10))
            .await
            .map_err(|x| e("fetch", x))?;
        ensure!(
            later.len() == 1,
            "not redelivered once no longer kept alive"
        );
        Ok(())
    })
}

fn ack_is_idempotent(b: &dyn BufferBackend, name: BufferName) -> CaseFuture<'_> {
    Box::pin(async move {
        let buf = open(b, &name, &BufferConfig::default()).await?;
        buf.append(&msgs(0..3)).await.map_err(|x| e("append", x))?;
        let got = fetch_n(&*buf, 3, Duration::from_secs(5)).await?;
        let tags: Vec<_> = got.iter().map(|d| d.tag).collect();
        buf.ack(&tags[..2]).await.map_err(|x| e("ack", x))?;
        buf.ack(&tags[..2]).await.map_err(|x| e("second ack", x))?;
        buf.ack(&tags).await.map_err(|x| e("overlapping ack", x))?;
        let done = |s: &crate::BufferStats| s.is_drained() && s.acked_total == 3;
        let stats = stats_when(&*buf, done).await?;
        ensure!(done(&stats), "after repeated acks: {stats:?}");
        Ok(())
    })
}

fn concurrent_readers(b: &dyn BufferBackend, name: BufferName) -> CaseFuture<'_> {
    Box::pin(async move {
        const N: u128 = 3000;
        let buf = open(b, &name, &BufferConfig::default()).await?;
        let mut writers = Vec::new();
        for w in 0..3u128 {
            let buf = buf.clone();
            writers.push(tokio::spawn(async move {
                for chunk in 0..10u128 {
                    let from = w * 1000 + chunk * 100;
                    buf.append(&msgs(from..from + 100)).await?;
                }
                Ok::<_, BufferError>(())
            }));
        }
        // Readers stop at the first empty fetch after every writer has finished.
        let writing = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let mut readers = Vec::new();
        for _ in 0..4 {
            let (buf, writing) = (buf.clone(), writing.clone());
            readers.push(tokio::spawn(async move {
                let mut seen = Vec::new();
                loop {
                    let still_writing = writing.load(std::sync::atomic::Ordering::SeqCst);
                    let got = buf.fetch(64, Duration::from_millis(500)).await?;
                    if got.is_empty() && !still_writing {
                        return Ok::<_, BufferError>(seen);
                    }
                    buf.ack(&got.iter().map(|d| d.tag).collect::<Vec<_>>())
                        .await?;
                    seen.extend(got.into_iter().map(|d| d.message.id.0));
                }
            }));
        }
        for w in writers {
            w.await
                .map_err(|x| format!("writer: {x}"))?
                .map_err(|x| e("append", x))?;
        }
        writing.store(false, std::sync::atomic::Ordering::SeqCst);
        let mut all = Vec::new();
        for r in readers {
            all.extend(
                r.await
                    .map_err(|x| format!("reader: {x}"))?
                    .map_err(|x| e("reader", x))?,
            );
        }
        let distinct: HashSet<u128> = all.iter().copied().collect();
        ensure!(
            all.len() == distinct.len(),
            "{} deliveries of {} distinct messages: some went to two readers",
            all.len(),
            distinct.len()
        );
        ensure!(
            distinct == (0..N).collect::<HashSet<_>>(),
            "readers got {} of {N} messages",
            distinct.len()
        );
        Ok(())
    })
}

fn stats_counts(b: &dyn BufferBackend, name: BufferName) -> CaseFuture<'_> {
    Box::pin(async move {
        let config = BufferConfig {
            max_length: 100,
            ..BufferConfig::default()
        };
        let buf = open(b, &name, &config).await?;
        let empty = buf.stats().await.map_err(|x| e("stats", x))?;
        ensure!(
            empty == crate::BufferStats::default(),
            "a new buffer's stats: {empty:?}"
        );
        buf.append(&[msg(1), msg(2), msg(2), msg(3), msg(4)])
            .await
            .map_err(|x| e("append", x))?;
        let got = fetch_n(&*buf, 2, Duration::from_secs(5)).await?;
        buf.ack(&[got[0].tag]).await.map_err(|x| e("ack", x))?;
        let expected = crate::BufferStats {
            pending: 2,
            unacked: 1,
            usage: 0.03,
            acked_total: 1,
            written_total: 4,
            duplicates_total: 1,
        };
        let matches = |s: &crate::BufferStats| {
            s.pending == expected.pending
                && s.unacked == expected.unacked
                && s.acked_total == expected.acked_total
                && s.written_total == expected.written_total
                && s.duplicates_total == expected.duplicates_total
                && (s.usage - expected.usage).abs() < 1e-9
        };
        let s = stats_when(&*buf, matches).await?;
        ensure!(matches(&s), "stats {s:?}, expected {expected:?}");
        Ok(())
    })
}

fn reopen_keeps_messages(b: &dyn BufferBackend, name: BufferName) -> CaseFuture<'_> {
    Box::pin(async move {
        let buf = open(b, &name, &BufferConfig::default()).await?;
        buf.append(&msgs(0..4)).await.map_err(|x| e("append", x))?;
        let got = fetch_n(&*buf, 2, Duration::from_secs(5)).await?;
        buf.ack(&got.iter().map(|d| d.tag).collect::<Vec<_>>())
            .await
            .map_err(|x| e("ack", x))?;
        // Opening again, with a new config, keeps the messages and takes the config.
        let small = BufferConfig {
            max_length: 2,
            usage_limit: 1.0,
            ..BufferConfig::default()
        };
        let again = open(b, &name, &small).await?;
        let s = again.stats().await.map_err(|x| e("stats", x))?;
        ensure!(
            s.pending == 2 && s.acked_total == 2,
            "after reopening: {s:?}"
        );
        ensure!(
            matches!(again.append(&[msg(9)]).await, Err(BufferError::Full { .. })),
            "the reopened buffer kept its old limit"
        );
        let rest = fetch_n(&*again, 2, Duration::from_secs(5)).await?;
        let ids: Vec<u128> = rest.iter().map(|d| d.message.id.0).collect();
        ensure!(ids == [2, 3], "after reopening fetched {ids:?}");
        Ok(())
    })
}

fn delete_and_list(b: &dyn BufferBackend, name: BufferName) -> CaseFuture<'_> {
    Box::pin(async move {
        let other = BufferName::new(
            name.as_str().split('.').next().unwrap_or("x"),
            "contract",
            "delete-and-list-other",
            3,
        )
        .map_err(|x| e("name", x))?;
        b.delete(&other).await.map_err(|x| e("delete", x))?;
        let buf = open(b, &name, &BufferConfig::default()).await?;
        buf.append(&[msg(1)]).await.map_err(|x| e("append", x))?;
        open(b, &other, &BufferConfig::default()).await?;
        let listed = b.list().await.map_err(|x| e("list", x))?;
        ensure!(
            listed.contains(&name) && listed.contains(&other),
            "list {listed:?} lacks the two buffers"
        );
        b.delete(&other).await.map_err(|x| e("delete", x))?;
        b.delete(&other).await.map_err(|x| e("second delete", x))?;
        let listed = b.list().await.map_err(|x| e("list", x))?;
        ensure!(
            listed.contains(&name) && !listed.contains(&other),
            "after the delete, list is {listed:?}"
        );
        b.delete(&name).await.map_err(|x| e("delete", x))?;
        ensure!(
            buf.append(&[msg(2)]).await.is_err(),
            "a deleted buffer still took an append"
        );
        let fresh = open(b, &name, &BufferConfig::default()).await?;
        let s = fresh.stats().await.map_err(|x| e("stats", x))?;
        ensure!(
            s.written_total == 0 && s.pending == 0,
            "a buffer created after a delete had {s:?}"
        );
        Ok(())
    })
}
