//! The NATS JetStream backend against a real `nats-server -js` (see
//! `support/nats_server.rs`; `scripts/test.sh` installs the binary).

#![cfg(feature = "nats")]

#[path = "support/nats_server.rs"]
mod nats_server;

use bytes::Bytes;
use drover_buffer::nats::{NatsBackend, NatsOptions};
use drover_buffer::{
    Appended, Buffer, BufferBackend, BufferConfig, BufferError, BufferName, BufferStats, Delivery,
    Message, MessageId,
};
use nats_server::NatsServer;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn name(vertex: &str) -> BufferName {
    BufferName::new("default", "etl", vertex, 0).unwrap()
}

fn message(id: u128) -> Message {
    Message {
        id: MessageId(id),
        key: Bytes::from(format!("key-{id}")),
        event_time: 1_700_000_000_000 + id as i64,
        payload: Bytes::from(format!("payload {id}")),
    }
}

fn messages(ids: impl IntoIterator<Item = u128>) -> Vec<Message> {
    ids.into_iter().map(message).collect()
}

fn ids(deliveries: &[Delivery]) -> Vec<u128> {
    deliveries.iter().map(|d| d.message.id.0).collect()
}

fn options() -> NatsOptions {
    NatsOptions {
        request_timeout: Duration::from_secs(2),
        max_reconnect_delay: Duration::from_millis(200),
        ..NatsOptions::default()
    }
}

async fn connect(server: &NatsServer) -> NatsBackend {
    NatsBackend::connect(&server.url(), options())
        .await
        .expect("connecting to the test server")
}

async fn open(config: BufferConfig) -> (NatsServer, NatsBackend, Arc<dyn Buffer>) {
    let server = NatsServer::start();
    let backend = connect(&server).await;
    let buffer = backend.open(&name("map"), &config).await.unwrap();
    (server, backend, buffer)
}

/// The buffer's stats once `done` holds, polled for up to 5 s; the last ones if it
/// never does, for the caller's assertion to show.
async fn eventually(buffer: &dyn Buffer, done: impl Fn(&BufferStats) -> bool) -> BufferStats {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stats = buffer.stats().await.unwrap();
        if done(&stats) || Instant::now() >= deadline {
            return stats;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Nothing comes back within a second, and the counts say the buffer is empty.
async fn assert_settled(buffer: &dyn Buffer) {
    let late = buffer.fetch(10, Duration::from_secs(1)).await.unwrap();
    assert!(late.is_empty(), "delivered again: {:?}", ids(&late));
    let stats = eventually(buffer, BufferStats::is_drained).await;
    assert!(stats.is_drained(), "{stats:?}");
}

#[tokio::test]
async fn appended_messages_are_fetched_in_order_and_gone_once_acked() {
    let (_server, _backend, buffer) = open(BufferConfig::default()).await;
    let batch = messages(1..=10);
    assert_eq!(
        buffer.append(&batch).await.unwrap(),
        Appended {
            written: 10,
            duplicates: 0
        }
    );
    let got = buffer.fetch(100, Duration::from_secs(1)).await.unwrap();
    let fetched: Vec<Message> = got.iter().map(|d| d.message.clone()).collect();
    assert_eq!(fetched, batch, "every field round-trips, oldest first");
    assert!(got.iter().all(|d| d.redeliveries == 0));
    let tags: HashSet<_> = got.iter().map(|d| d.tag).collect();
    assert_eq!(tags.len(), 10, "each delivery has its own tag");

    let tags: Vec<_> = got.iter().map(|d| d.tag).collect();
    buffer.ack(&tags).await.unwrap();
    // A second ack of the same tags is not an error.
    buffer.ack(&tags).await.unwrap();
    assert_settled(&*buffer).await;
    let stats = buffer.stats().await.unwrap();
    assert_eq!((stats.written_total, stats.acked_total), (10, 10));
}

#[tokio::test]
async fn fetch_waits_for_the_first_message_and_returns_when_one_comes() {
    let (_server, _backend, buffer) = open(BufferConfig::default()).await;
    let t0 = Instant::now();
    assert!(
        buffer
            .fetch(10, Duration::from_millis(300))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(t0.elapsed() >= Duration::from_millis(250), "it waited");

    let writer = buffer.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        writer.append(&messages(1..=3)).await.unwrap();
    });
    let t0 = Instant::now();
    let got = buffer.fetch(100, Duration::from_secs(10)).await.unwrap();
    assert!(!got.is_empty());
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "a batch smaller than max returns when it comes, not at the end of the wait"
    );
}

#[tokio::test]
async fn duplicates_are_dropped_inside_a_batch_and_across_retries() {
    let (_server, _backend, buffer) = open(BufferConfig::default()).await;
    let batch = messages([1, 2, 1, 3]);
    assert_eq!(
        buffer.append(&batch).await.unwrap(),
        Appended {
            written: 3,
            duplicates: 1
        }
    );
    // A writer's retry after a lost answer.
    assert_eq!(
        buffer.append(&batch).await.unwrap(),
        Appended {
            written: 0,
            duplicates: 4
        }
    );
    let got = buffer.fetch(100, Duration::from_millis(500)).await.unwrap();
    assert_eq!(ids(&got), [1, 2, 3]);
    let stats = buffer.stats().await.unwrap();
    assert_eq!(stats.duplicates_total, 5);
    assert_eq!(stats.written_total, 3);

    // Acked messages stay remembered for the window: writing one again is still a
    // duplicate.
    let tags: Vec<_> = got.iter().map(|d| d.tag).collect();
    buffer.ack(&tags).await.unwrap();
    assert_eq!(
        buffer.append(&messages([2, 4])).await.unwrap(),
        Appended {
            written: 1,
            duplicates: 1
        }
    );
}

#[tokio::test]
async fn a_full_buffer_refuses_appends_until_messages_are_acked() {
    let config = BufferConfig {
        max_length: 10,
        usage_limit: 0.5,
        ..BufferConfig::default()
    };
    let (_server, _backend, buffer) = open(config).await;
    buffer.append(&messages(1..=5)).await.unwrap();
    match buffer.append(&messages([6])).await {
        Err(BufferError::Full { pending, limit, .. }) => assert_eq!((pending, limit), (5, 5)),
        other => panic!("expected Full, got {other:?}"),
    }
    let got = buffer.fetch(2, Duration::from_secs(1)).await.unwrap();
    // Fetched but not acked still counts.
    assert!(matches!(
        buffer.append(&messages([6])).await,
        Err(BufferError::Full { .. })
    ));
    let tags: Vec<_> = got.iter().map(|d| d.tag).collect();
    buffer.ack(&tags).await.unwrap();
    assert_eq!(buffer.append(&messages([6])).await.unwrap().written, 1);
    // The consumer's pending count follows the stream a moment after the publish ack.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let pending = buffer.stats().await.unwrap().pending;
        if pending == 4 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "pending stayed at {pending}, expected 4"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn the_stream_stops_a_batch_at_max_length() {
    let config = BufferConfig {
        max_length: 10,
        usage_limit: 0.5,
        ..BufferConfig::default()
    };
    let (_server, _backend, buffer) = open(config).await;
    // Admitted below the usage limit, the batch overshoots it; the stream's max_msgs
    // with discard-new keeps the first 10 and refuses the rest.
    match buffer.append(&messages(1..=25)).await {
        Err(BufferError::Full { .. }) => {}
        other => panic!("expected Full, got {other:?}"),
    }
    let stats = buffer.stats().await.unwrap();
    assert_eq!(stats.pending, 10);
    assert!((stats.usage - 1.0).abs() < 1e-9, "{stats:?}");
    let got = buffer.fetch(100, Duration::from_millis(500)).await.unwrap();
    assert_eq!(ids(&got), (1..=10).collect::<Vec<_>>());
}

#[tokio::test]
async fn an_unacked_message_comes_back_when_its_lease_ends() {
    let config = BufferConfig {
        lease: Duration::from_millis(500),
        ..BufferConfig::default()
    };
    let (_server, _backend, buffer) = open(config).await;
    buffer.append(&messages([7])).await.unwrap();
    let first = buffer.fetch(1, Duration::from_secs(1)).await.unwrap();
    assert_eq!(ids(&first), [7]);
    assert!(
        buffer
            .fetch(1, Duration::from_millis(200))
            .await
            .unwrap()
            .is_empty(),
        "leased, so not delivered to anyone else"
    );
    let again = buffer.fetch(1, Duration::from_secs(3)).await.unwrap();
    assert_eq!(ids(&again), [7]);
    assert_eq!(again[0].redeliveries, 1);
    assert_ne!(again[0].tag, first[0].tag);
    // Acking the expired delivery is not an error; acking the new one settles it.
    buffer.ack(&[first[0].tag]).await.unwrap();
    buffer.ack(&[again[0].tag]).await.unwrap();
    assert_settled(&*buffer).await;
}

#[tokio::test]
async fn a_nacked_message_comes_back_after_its_delay() {
    let (_server, _backend, buffer) = open(BufferConfig::default()).await;
    buffer.append(&messages([1, 2])).await.unwrap();
    let got = buffer.fetch(2, Duration::from_secs(1)).await.unwrap();
    let t0 = Instant::now();
    buffer
        .nack(&[got[0].tag], Duration::from_millis(800))
        .await
        .unwrap();
    buffer.nack(&[got[1].tag], Duration::ZERO).await.unwrap();
    let now = buffer.fetch(2, Duration::from_millis(300)).await.unwrap();
    assert_eq!(ids(&now), [2], "no delay: back at once; 1 waits");
    assert_eq!(now[0].redeliveries, 1);
    let later = buffer.fetch(2, Duration::from_secs(3)).await.unwrap();
    assert_eq!(ids(&later), [1]);
    assert!(
        t0.elapsed() >= Duration::from_millis(750),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(later[0].redeliveries, 1);
}

#[tokio::test]
async fn keep_alive_holds_a_lease_past_its_end() {
    let config = BufferConfig {
        lease: Duration::from_millis(600),
        ..BufferConfig::default()
    };
    let (_server, _backend, buffer) = open(config).await;
    buffer.append(&messages([1])).await.unwrap();
    let got = buffer.fetch(1, Duration::from_secs(1)).await.unwrap();
    // Three times the lease, renewed every half lease: never redelivered.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        buffer.keep_alive(&[got[0].tag]).await.unwrap();
        assert!(buffer.fetch(1, Duration::ZERO).await.unwrap().is_empty());
    }
    buffer.ack(&[got[0].tag]).await.unwrap();
    assert_settled(&*buffer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_readers_never_get_the_same_message() {
    let server = NatsServer::start();
    let writer = connect(&server).await;
    let buffer = writer
        .open(&name("map"), &BufferConfig::default())
        .await
        .unwrap();
    let total = 2000u128;
    for chunk in (0..total).collect::<Vec<_>>().chunks(500) {
        buffer
            .append(&messages(chunk.iter().copied()))
            .await
            .unwrap();
    }
    // Each reader has its own connection, as two processes would; both are ready
    // before either starts, so neither can drain the buffer alone by starting first.
    let mut buffers = Vec::new();
    for _ in 0..2 {
        let backend = connect(&server).await;
        buffers.push(
            backend
                .open(&name("map"), &BufferConfig::default())
                .await
                .unwrap(),
        );
    }
    let start = Arc::new(tokio::sync::Barrier::new(2));
    let mut readers = Vec::new();
    for buffer in buffers {
        let start = start.clone();
        readers.push(tokio::spawn(async move {
            start.wait().await;
            let mut seen = Vec::new();
            loop {
                let got = buffer.fetch(37, Duration::from_millis(300)).await.unwrap();
                if got.is_empty() {
                    return seen;
                }
                seen.extend(ids(&got));
                let tags: Vec<_> = got.iter().map(|d| d.tag).collect();
                buffer.ack(&tags).await.unwrap();
            }
        }));
    }
    let mut all = Vec::new();
    let mut counts = Vec::new();
    for reader in readers {
        let seen = reader.await.unwrap();
        counts.push(seen.len());
        all.extend(seen);
    }
    let unique: HashSet<_> = all.iter().copied().collect();
    assert_eq!(all.len(), unique.len(), "a message went to both readers");
    assert_eq!(unique.len(), total as usize);
    assert!(
        counts.iter().all(|&n| n > 0),
        "both readers got work: {counts:?}"
    );
}

#[tokio::test]
async fn stats_count_pending_unacked_and_totals() {
    let config = BufferConfig {
        max_length: 100,
        ..BufferConfig::default()
    };
    let (_server, _backend, buffer) = open(config).await;
    buffer.append(&messages(1..=5)).await.unwrap();
    let got = buffer.fetch(2, Duration::from_secs(1)).await.unwrap();
    let stats = buffer.stats().await.unwrap();
    assert_eq!((stats.pending, stats.unacked), (3, 2), "{stats:?}");
    assert_eq!((stats.written_total, stats.acked_total), (5, 0));
    assert!((stats.usage - 0.05).abs() < 1e-9, "{stats:?}");
    buffer.ack(&[got[0].tag]).await.unwrap();
    // The server applies an ack a moment after it has it.
    let stats = eventually(&*buffer, |s| s.unacked == 1).await;
    assert_eq!((stats.pending, stats.unacked), (3, 1), "{stats:?}");
    assert_eq!((stats.written_total, stats.acked_total), (5, 1));
    assert!((stats.usage - 0.04).abs() < 1e-9, "{stats:?}");
}

#[tokio::test]
async fn reopening_keeps_messages_and_takes_the_new_config() {
    let (server, backend, buffer) = open(BufferConfig::default()).await;
    buffer.append(&messages(1..=3)).await.unwrap();
    drop(buffer);
    let config = BufferConfig {
        lease: Duration::from_millis(300),
        max_length: 4,
        usage_limit: 1.0,
        ..BufferConfig::default()
    };
    let again = backend.open(&name("map"), &config).await.unwrap();
    assert_eq!(again.append(&messages(4..=9)).await.ok(), None, "new limit");
    let got = again.fetch(10, Duration::from_secs(1)).await.unwrap();
    assert_eq!(ids(&got), [1, 2, 3, 4]);
    // The new lease: back after 300 ms, not 30 s.
    let back = again.fetch(10, Duration::from_secs(3)).await.unwrap();
    assert_eq!(back.len(), 4);
    drop(server);
}

#[tokio::test]
async fn list_shows_drover_buffers_and_delete_removes_them() {
    let server = NatsServer::start();
    let backend = connect(&server).await;
    let (a, b) = (name("a"), BufferName::new("other", "p", "sink", 3).unwrap());
    for n in [&a, &b] {
        let buffer = backend.open(n, &BufferConfig::default()).await.unwrap();
        buffer.append(&messages([1])).await.unwrap();
    }
    // A stream that is not Drover's is not listed.
    let client = drover_buffer::nats::async_nats::connect(server.url())
        .await
        .unwrap();
    drover_buffer::nats::async_nats::jetstream::new(client)
        .create_stream(drover_buffer::nats::async_nats::jetstream::stream::Config {
            name: "ORDERS".into(),
            subjects: vec!["orders.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let mut expected = vec![a.clone(), b.clone()];
    expected.sort();
    assert_eq!(backend.list().await.unwrap(), expected);

    backend.delete(&a).await.unwrap();
    assert_eq!(backend.list().await.unwrap(), std::slice::from_ref(&b));
    backend.delete(&a).await.unwrap();
    // Opened again, it starts empty.
    let fresh = backend.open(&a, &BufferConfig::default()).await.unwrap();
    assert!(fresh.stats().await.unwrap().is_drained());
    assert_eq!(fresh.stats().await.unwrap().written_total, 0);
}

#[tokio::test]
async fn no_acknowledged_append_is_lost_when_the_server_dies_and_comes_back() {
    let mut server = NatsServer::start();
    let backend = connect(&server).await;
    // Room for everything the writer manages in the test's seconds.
    let config = BufferConfig {
        max_length: 10_000_000,
        ..BufferConfig::default()
    };
    let buffer = backend.open(&name("map"), &config).await.unwrap();
    let writer = buffer.clone();
    let written = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let written_by_writer = written.clone();
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let writing = tokio::spawn(async move {
        let (mut acknowledged, mut failures) = (Vec::new(), 0usize);
        let mut next = 0u128;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !*stop_rx.borrow_and_update() && Instant::now() < deadline {
            let batch = messages(next..next + 50);
            let t0 = Instant::now();
            match writer.append(&batch).await {
                Ok(_) => {
                    acknowledged.extend(next..next + 50);
                    next += 50;
                    written_by_writer.store(acknowledged.len(), Ordering::Relaxed);
                }
                Err(BufferError::Backend(err)) => {
                    // Bounded by the request timeout (with room for the publish and the
                    // ack wait), and the same batch is retried: nothing is skipped.
                    assert!(t0.elapsed() < Duration::from_secs(6), "{err}");
                    failures += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(other) => panic!("expected Backend during the outage, got {other}"),
            }
        }
        (acknowledged, failures)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.restart().unwrap();
    let before = written.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop_tx.send(true).unwrap();
    let (acknowledged, failures) = writing.await.unwrap();
    assert!(failures > 0, "the outage was seen");
    assert!(
        acknowledged.len() > before,
        "writes succeed again after the restart ({before} before it, {} in all)",
        acknowledged.len()
    );

    let mut fetched = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while fetched.len() < acknowledged.len() && Instant::now() < deadline {
        match buffer.fetch(500, Duration::from_millis(500)).await {
            Ok(got) => {
                let tags: Vec<_> = got.iter().map(|d| d.tag).collect();
                fetched.extend(ids(&got));
                buffer.ack(&tags).await.unwrap();
            }
            Err(err) => panic!("fetch after the restart: {err}"),
        }
    }
    let lost: Vec<_> = acknowledged
        .iter()
        .filter(|id| !fetched.contains(id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged appends lost, e.g. {:?}",
        lost.len(),
        acknowledged.len(),
        &lost[..lost.len().min(5)]
    );
}

/// The same behavioural suite the embedded backend passes: every backend behaves alike
/// to the data plane above it.
#[tokio::test]
async fn the_nats_backend_passes_the_buffer_contract() {
    let server = NatsServer::start();
    let backend = connect(&server).await;
    let failures = drover_buffer::contract::run(&backend, "contract").await;
    assert!(
        failures.is_empty(),
        "contract cases failed on NATS:\n{}",
        failures
            .iter()
            .map(|(case, why)| format!("{case}: {why}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
