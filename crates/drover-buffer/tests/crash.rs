//! A real crash: this test binary runs itself again as a child that appends and acks
//! messages, printing each append and ack as it returns `Ok`, and is killed with
//! SIGKILL mid-way. Reopening the buffer must find every message whose append returned
//! and none whose ack returned. Three rounds run on the same directory, so recovery
//! after a crash is itself crashed into.

use bytes::Bytes;
use drover_buffer::{BufferBackend, BufferConfig, BufferName, EmbeddedBackend};
use drover_buffer::{Message, MessageId};
use std::collections::{BTreeSet, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const CHILD_DIR: &str = "DROVER_BUFFER_CRASH_DIR";
const CHILD_ROUND: &str = "DROVER_BUFFER_CRASH_ROUND";
const BATCH: u128 = 100;

fn name() -> BufferName {
    BufferName::new("crash", "pipe", "sink", 0).unwrap()
}

fn payload(id: u128) -> Bytes {
    Bytes::from(format!("{id:>256}"))
}

fn say(line: String) {
    let mut out = std::io::stdout().lock();
    out.write_all(line.as_bytes()).unwrap();
    out.write_all(b"\n").unwrap();
    out.flush().unwrap();
}

/// The child's work; a no-op unless the parent started this binary for it.
#[test]
fn crash_child() {
    let (Some(dir), Some(round)) = (std::env::var_os(CHILD_DIR), std::env::var_os(CHILD_ROUND))
    else {
        return;
    };
    let round: u128 = round.to_str().unwrap().parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let backend = EmbeddedBackend::open(dir.into()).unwrap();
        let buffer = backend
            .open(&name(), &BufferConfig::default())
            .await
            .unwrap();
        let reader = buffer.clone();
        tokio::spawn(async move {
            loop {
                let got = reader.fetch(150, Duration::from_millis(100)).await.unwrap();
                if got.is_empty() {
                    continue;
                }
                // Acks every other delivery, so that some stay pending too.
                let acked: Vec<_> = got.iter().step_by(2).collect();
                let tags: Vec<_> = acked.iter().map(|d| d.tag).collect();
                let ids: Vec<String> = acked.iter().map(|d| d.message.id.0.to_string()).collect();
                let ids = ids.join(",");
                // Said before acking too: a message acked just before the kill, with no
                // time to say so, is gone rightly, and the parent must know it was tried.
                say(format!("CRASH acking {ids}"));
                reader.ack(&tags).await.unwrap();
                say(format!("CRASH acked {ids}"));
            }
        });
        for batch in 0u128.. {
            let first = round * 1_000_000 + batch * BATCH;
            let messages: Vec<Message> = (first..first + BATCH)
                .map(|id| Message {
                    id: MessageId(id),
                    key: Bytes::new(),
                    event_time: id as i64,
                    payload: payload(id),
                })
                .collect();
            // A full buffer (the reader is slower) is waited out, as a writer would.
            loop {
                match buffer.append(&messages).await {
                    Ok(_) => break,
                    Err(drover_buffer::BufferError::Full { .. }) => {
                        tokio::time::sleep(Duration::from_millis(10)).await
                    }
                    Err(e) => panic!("append: {e}"),
                }
            }
            say(format!("CRASH appended {first}"));
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_writer_loses_no_appended_message_and_redelivers_no_acked_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut appended: BTreeSet<u128> = BTreeSet::new();
    let mut acked: HashSet<u128> = HashSet::new();
    let mut acking: HashSet<u128> = HashSet::new();
    for round in 0..3u32 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_DIR, dir.path())
            .env(CHILD_ROUND, round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let lines = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // libtest may have begun the line with the test's name.
                let Some(at) = line.find("CRASH ") else {
                    continue;
                };
                let line = line[at..].to_string();
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Kills it once it has done a fair amount of both, at a different point each round.
        let (mut appends, mut acks) = (0, 0);
        let deadline = Instant::now() + Duration::from_secs(60);
        let want = 40 + 25 * round as usize;
        let mut claims = Vec::new();
        while appends < want || acks < want / 4 {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| panic!("round {round}: the child made too little progress"));
            appends += usize::from(line.starts_with("CRASH appended"));
            acks += usize::from(line.starts_with("CRASH acked"));
            claims.push(line);
        }
        child.kill().unwrap();
        child.wait().unwrap();
        lines.join().unwrap();
        // Lines printed before the kill are claims too.
        claims.extend(rx.try_iter());
        for line in claims {
            if let Some(first) = line.strip_prefix("CRASH appended ") {
                let first: u128 = first.parse().unwrap();
                appended.extend(first..first + BATCH);
            } else if let Some(ids) = line.strip_prefix("CRASH acked ") {
                acked.extend(ids.split(',').map(|id| id.parse::<u128>().unwrap()));
            } else if let Some(ids) = line.strip_prefix("CRASH acking ") {
                acking.extend(ids.split(',').map(|id| id.parse::<u128>().unwrap()));
            }
        }

        let backend = EmbeddedBackend::open(dir.path().to_path_buf()).unwrap();
        let buffer = backend
            .open(&name(), &BufferConfig::default())
            .await
            .unwrap();
        let mut found = HashSet::new();
        loop {
            let got = buffer.fetch(10_000, Duration::ZERO).await.unwrap();
            if got.is_empty() {
                break;
            }
            for d in got {
                let id = d.message.id.0;
                assert_eq!(
                    d.message.payload,
                    payload(id),
                    "round {round}: message {id}"
                );
                assert!(found.insert(id), "round {round}: {id} delivered twice");
                assert!(
                    !acked.contains(&id),
                    "round {round}: {id} was acked and came back"
                );
            }
        }
        let lost: Vec<_> = appended
            .iter()
            .filter(|id| !found.contains(id) && !acking.contains(id))
            .collect();
        assert!(
            lost.is_empty(),
            "round {round}: lost {} appended messages, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(5)]
        );
        assert!(
            !found.is_empty() && !acked.is_empty(),
            "round {round}: nothing to check"
        );
    }
}

/// A controller restart reopens the buffer while agents still hold deliveries of the
/// old opening. Their late acknowledgements must not land on the new opening's
/// deliveries (tags numbered from the same start would), or a message never processed
/// would be acknowledged and lost.
#[tokio::test]
async fn an_ack_from_before_a_reopening_acknowledges_nothing_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let messages: Vec<Message> = (1..=3u128)
        .map(|id| Message {
            id: MessageId(id),
            key: Bytes::new(),
            event_time: 0,
            payload: payload(id),
        })
        .collect();
    let old_tags: Vec<_> = {
        let backend = EmbeddedBackend::open(dir.path().to_path_buf()).unwrap();
        let buffer = backend
            .open(&name(), &BufferConfig::default())
            .await
            .unwrap();
        buffer.append(&messages).await.unwrap();
        let got = buffer.fetch(3, Duration::ZERO).await.unwrap();
        got.iter().map(|d| d.tag).collect()
    };
    assert_eq!(old_tags.len(), 3);

    let backend = EmbeddedBackend::open(dir.path().to_path_buf()).unwrap();
    let buffer = backend
        .open(&name(), &BufferConfig::default())
        .await
        .unwrap();
    // The leases did not survive the restart: all three are delivered again.
    let again = buffer.fetch(3, Duration::ZERO).await.unwrap();
    assert_eq!(again.len(), 3);
    buffer.ack(&old_tags).await.unwrap();
    buffer.nack(&old_tags, Duration::ZERO).await.unwrap();
    let stats = buffer.stats().await.unwrap();
    assert_eq!(
        (stats.unacked, stats.pending, stats.acked_total),
        (3, 0, 0),
        "stale tags touched the new deliveries"
    );
    let tags: Vec<_> = again.iter().map(|d| d.tag).collect();
    buffer.ack(&tags).await.unwrap();
    assert_eq!(buffer.stats().await.unwrap().acked_total, 3);
}
