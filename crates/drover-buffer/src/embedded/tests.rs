use super::*;
use crate::{BufferStats, Message, MessageId};
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;

fn msg(i: u128) -> Message {
    Message {
        id: MessageId(i),
        key: Bytes::new(),
        event_time: i as i64,
        payload: Bytes::from(vec![(i % 251) as u8; 100]),
    }
}

fn name(vertex: &str) -> BufferName {
    BufferName::new("test", "pipe", vertex, 0).unwrap()
}

async fn fetch_all(buffer: &dyn Buffer, n: usize) -> Vec<crate::Delivery> {
    let mut out = Vec::new();
    while out.len() < n {
        let got = buffer
            .fetch(n - out.len(), Duration::from_millis(300))
            .await
            .unwrap();
        if got.is_empty() {
            break;
        }
        out.extend(got);
    }
    out
}

/// A backend on `dir` with the test buffer "v" opened in it.
async fn open_v(
    dir: &std::path::Path,
    config: &BufferConfig,
) -> (EmbeddedBackend, Arc<dyn Buffer>) {
    let backend = EmbeddedBackend::open(dir.to_path_buf()).unwrap();
    let buf = backend.open(&name("v"), config).await.unwrap();
    (backend, buf)
}

fn ids(deliveries: &[crate::Delivery]) -> Vec<u128> {
    deliveries.iter().map(|d| d.message.id.0).collect()
}

fn tags(deliveries: &[crate::Delivery]) -> Vec<DeliveryTag> {
    deliveries.iter().map(|d| d.tag).collect()
}

use crate::DeliveryTag;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_backend_passes_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let backend = EmbeddedBackend::open(dir.path().to_path_buf()).unwrap();
    let failures = crate::contract::run(&backend, "contract").await;
    assert!(failures.is_empty(), "contract failures: {failures:#?}");
}

#[tokio::test]
async fn a_restart_keeps_pending_forgets_acked_and_remembers_ids() {
    let dir = tempfile::tempdir().unwrap();
    let config = BufferConfig::default();
    {
        let (_backend, buf) = open_v(dir.path(), &config).await;
        buf.append(&(0..10).map(msg).collect::<Vec<_>>())
            .await
            .unwrap();
        buf.append(&[msg(3), msg(10)]).await.unwrap();
        let got = fetch_all(&*buf, 6).await;
        // Acks 0..4; 4 and 5 stay leased (unacked) when the process goes.
        buf.ack(&tags(&got[..4])).await.unwrap();
    }
    let (_backend, buf) = open_v(dir.path(), &config).await;
    let stats = buf.stats().await.unwrap();
    assert_eq!(
        stats,
        BufferStats {
            pending: 7,
            unacked: 0,
            usage: 7.0 / 30_000.0,
            acked_total: 4,
            written_total: 11,
            duplicates_total: 1,
        },
        "the duplicate count rides on the ack log, written after the duplicate"
    );
    let rest = fetch_all(&*buf, 100).await;
    assert_eq!(ids(&rest), vec![4, 5, 6, 7, 8, 9, 10]);
    // Every id, acked or not, is still inside the window after the restart.
    let again = buf
        .append(&(0..11).map(msg).collect::<Vec<_>>())
        .await
        .unwrap();
    assert_eq!((again.written, again.duplicates), (0, 11));
    let new = buf.append(&[msg(11)]).await.unwrap();
    assert_eq!(new.written, 1);
}

#[tokio::test]
async fn a_torn_tail_is_truncated_with_the_rest_kept() {
    // (what is done to the end of the segment, messages expected back)
    type Damage = fn(&mut Vec<u8>);
    let cases: [(&str, Damage, usize); 4] = [
        ("last record cut short", |b| b.truncate(b.len() - 7), 4),
        ("garbage appended", |b| b.extend_from_slice(&[0xff; 13]), 5),
        ("last byte flipped", |b| *b.last_mut().unwrap() ^= 1, 4),
        ("half a header", |b| b.extend_from_slice(&[9, 0, 0]), 5),
    ];
    for (what, damage, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        {
            let (_backend, buf) = open_v(dir.path(), &BufferConfig::default()).await;
            buf.append(&(0..5).map(msg).collect::<Vec<_>>())
                .await
                .unwrap();
        }
        let seg = log::segment_path(&dir.path().join("test.pipe.v.0"), 0);
        let mut bytes = std::fs::read(&seg).unwrap();
        damage(&mut bytes);
        std::fs::write(&seg, &bytes).unwrap();

        let (_backend, buf) = open_v(dir.path(), &BufferConfig::default()).await;
        let got = fetch_all(&*buf, 10).await;
        assert_eq!(
            ids(&got),
            (0..expected as u128).collect::<Vec<_>>(),
            "{what}"
        );
        // The log goes on cleanly after the cut: a new message survives another restart.
        buf.append(&[msg(100)]).await.unwrap();
        drop((buf, _backend));
        let (_backend, buf) = open_v(dir.path(), &BufferConfig::default()).await;
        let got = fetch_all(&*buf, 10).await;
        assert_eq!(
            got.len(),
            expected + 1,
            "{what}: after writing past the cut"
        );
        assert_eq!(got.last().unwrap().message, msg(100), "{what}");
    }
}

#[tokio::test]
async fn a_torn_ack_log_is_truncated_and_the_unrecorded_acks_redelivered() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (_backend, buf) = open_v(dir.path(), &BufferConfig::default()).await;
        buf.append(&(0..4).map(msg).collect::<Vec<_>>())
            .await
            .unwrap();
        let got = fetch_all(&*buf, 4).await;
        buf.ack(&tags(&got[..1])).await.unwrap();
        buf.ack(&tags(&got[1..2])).await.unwrap();
    }
    let acks = dir.path().join("test.pipe.v.0").join(log::ACK_LOG);
    let mut bytes = std::fs::read(&acks).unwrap();
    bytes.truncate(bytes.len() - 1);
    std::fs::write(&acks, &bytes).unwrap();
    let (_backend, buf) = open_v(dir.path(), &BufferConfig::default()).await;
    assert_eq!(ids(&fetch_all(&*buf, 10).await), vec![1, 2, 3]);
}

#[tokio::test]
async fn acked_segments_are_deleted_and_the_ack_log_compacted() {
    let dir = tempfile::tempdir().unwrap();
    let config = BufferConfig {
        dedup_window: Duration::ZERO,
        ..BufferConfig::default()
    };
    let backend = EmbeddedBackend::open(dir.path().to_path_buf())
        .unwrap()
        .with_file_sizes(4096, 512);
    let buf = backend.open(&name("v"), &config).await.unwrap();
    let bufdir = dir.path().join("test.pipe.v.0");
    let segments = || {
        std::fs::read_dir(&bufdir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("seg-")
            })
            .count()
    };
    for round in 0..20u128 {
        buf.append(&(round * 10..round * 10 + 10).map(msg).collect::<Vec<_>>())
            .await
            .unwrap();
    }
    let before = segments();
    assert!(
        before > 5,
        "200 messages of ~150 bytes in 4 KiB segments made {before}"
    );
    // Acks every message but one early one, one at a time so the ack log grows.
    let got = fetch_all(&*buf, 200).await;
    for d in &got[..] {
        if d.message.id.0 != 50 {
            buf.ack(&[d.tag]).await.unwrap();
        }
    }
    let ack_len = std::fs::metadata(bufdir.join(log::ACK_LOG)).unwrap().len();
    assert!(
        ack_len < 1024,
        "the ack log was not compacted: {ack_len} bytes"
    );
    // Segments go oldest first, so the one holding message 50 keeps those after it;
    // only the first segment (messages 0 to 29) is gone.
    assert_eq!(segments(), before - 1);
    // A restart still knows which messages in the kept segments were acked.
    drop((buf, backend));
    let backend = EmbeddedBackend::open(dir.path().to_path_buf())
        .unwrap()
        .with_file_sizes(4096, 512);
    let buf = backend.open(&name("v"), &config).await.unwrap();
    let last = fetch_all(&*buf, 10).await;
    assert_eq!(ids(&last), vec![50]);
    let stats = buf.stats().await.unwrap();
    assert_eq!((stats.written_total, stats.acked_total), (200, 199));
    buf.ack(&tags(&last)).await.unwrap();
    assert_eq!(segments(), 1, "all acked: only the open segment is left");
    // Sequence numbers go on from where they were, even with every old segment gone.
    drop((buf, backend));
    let (_backend, buf) = open_v(dir.path(), &config).await;
    buf.append(&[msg(1000)]).await.unwrap();
    let stats = buf.stats().await.unwrap();
    assert_eq!(
        (stats.written_total, stats.acked_total, stats.pending),
        (201, 200, 1)
    );
}

#[tokio::test]
async fn list_skips_what_is_not_a_buffer() {
    let dir = tempfile::tempdir().unwrap();
    let backend = EmbeddedBackend::open(dir.path().to_path_buf()).unwrap();
    backend
        .open(&name("a"), &BufferConfig::default())
        .await
        .unwrap();
    for stray in ["Upper.x.y.0", "a.b.c", "a.b.c.01", "a.b.c.d", "lost+found"] {
        std::fs::create_dir(dir.path().join(stray)).unwrap();
    }
    std::fs::write(dir.path().join("test.pipe.file.0"), b"").unwrap();
    assert_eq!(backend.list().await.unwrap(), vec![name("a")]);
}

#[test]
fn directory_names_parse_back_exactly() {
    let cases = [
        ("p.q.v-1.0", true),
        ("p.q.v.4294967295", true),
        ("p.q.v.4294967296", false),
        ("p.q.v.01", false),
        ("p.q.v", false),
        ("p.q.v.0.1", false),
        ("P.q.v.0", false),
        ("p..v.0", false),
    ];
    for (dir_name, ok) in cases {
        assert_eq!(parse_name(dir_name).is_some(), ok, "{dir_name}");
    }
}

#[tokio::test]
async fn the_dedup_window_holds_at_most_its_cap_of_ids() {
    let dir = tempfile::tempdir().unwrap();
    let config = BufferConfig {
        dedup_max_ids: 10,
        ..BufferConfig::default()
    };
    let (_backend, buf) = open_v(dir.path(), &config).await;
    for i in 0..20u128 {
        let appended = buf.append(&[msg(i)]).await.unwrap();
        assert_eq!(appended.written, 1, "message {i}");
    }
    // The ten newest ids are remembered; the older ones were forgotten early, inside
    // their time window, to keep the cap.
    let again = buf.append(&[msg(19)]).await.unwrap();
    assert_eq!((again.written, again.duplicates), (0, 1));
    let again = buf.append(&[msg(15)]).await.unwrap();
    assert_eq!((again.written, again.duplicates), (0, 1));
    let old = buf.append(&[msg(0)]).await.unwrap();
    assert_eq!((old.written, old.duplicates), (1, 0));
}
