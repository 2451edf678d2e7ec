//! The embedded buffer's throughput: one writer and one reader task moving `n` 256-byte
//! messages in batches of 500 through a durable buffer (append, fetch, ack, every append
//! and ack synced), against the same bytes through a Unix socket pair in the same run.

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use drover_buffer::{BufferBackend, BufferConfig, BufferError, BufferName, EmbeddedBackend};
use drover_buffer::{Message, MessageId};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

const SIZE: usize = 256;
const BATCH: usize = 500;

/// Seconds to move `n` messages' bytes through a Unix socket pair, in batch-sized writes:
/// the ceiling for anything that hands bytes from one place to another on this machine.
pub(crate) fn raw_pipe(n: usize) -> Result<f64> {
    let (mut tx, mut rx) = std::os::unix::net::UnixStream::pair()?;
    let total = n * SIZE;
    let block = super::noise(SIZE * BATCH, 7);
    let t0 = Instant::now();
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let mut left = total;
        while left > 0 {
            let len = left.min(block.len());
            tx.write_all(&block[..len])?;
            left -= len;
        }
        Ok(())
    });
    let mut buf = vec![0; SIZE * BATCH];
    let mut got = 0;
    while got < total {
        let read = rx.read(&mut buf)?;
        if read == 0 {
            bail!("the socket pair closed after {got} of {total} bytes");
        }
        got += read;
    }
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("the pipe writer panicked"))??;
    Ok(t0.elapsed().as_secs_f64())
}

/// Seconds for one writer and one reader task to move `n` messages through an embedded
/// buffer in a temporary directory, each keeping up to `depth` appends (or acks) in
/// flight: at 1, every batch waits for its own sync; above 1, group commit lets
/// concurrent calls share one.
async fn embedded(n: usize, depth: usize) -> Result<f64> {
    let dir = super::bench_tempdir()?;
    let backend = EmbeddedBackend::open(dir.path().join("buffers"))?;
    let name = BufferName::new("bench", "pipe", "map", 0)?;
    let config = BufferConfig {
        max_length: 100_000,
        ..BufferConfig::default()
    };
    let buffer = backend.open(&name, &config).await?;
    // Distinct bytes per message, sliced from one block so that making them costs
    // nothing measurable.
    let block = Bytes::from(super::noise(1 << 20, 3));
    let slots = block.len() / SIZE;

    let t0 = Instant::now();
    let writer = {
        let buffer = buffer.clone();
        tokio::spawn(async move {
            let mut in_flight = tokio::task::JoinSet::new();
            for first in (0..n).step_by(BATCH) {
                let batch: Vec<Message> = (first..(first + BATCH).min(n))
                    .map(|i| {
                        let at = (i % slots) * SIZE;
                        Message {
                            id: MessageId(i as u128),
                            key: Bytes::new(),
                            event_time: i as i64,
                            payload: block.slice(at..at + SIZE),
                        }
                    })
                    .collect();
                if in_flight.len() >= depth
                    && let Some(done) = in_flight.join_next().await
                {
                    done??;
                }
                let buffer = buffer.clone();
                in_flight.spawn(async move {
                    loop {
                        match buffer.append(&batch).await {
                            Ok(_) => return Ok(()),
                            // Back-pressure: the reader is behind; wait as a writer would.
                            Err(BufferError::Full { .. }) => {
                                tokio::time::sleep(Duration::from_millis(1)).await
                            }
                            Err(e) => return Err(anyhow::Error::from(e)),
                        }
                    }
                });
            }
            while let Some(done) = in_flight.join_next().await {
                done??;
            }
            Ok::<_, anyhow::Error>(())
        })
    };
    let mut seen = vec![false; n];
    let mut received = 0;
    let mut acks = tokio::task::JoinSet::new();
    while received < n {
        let got = buffer.fetch(BATCH, Duration::from_secs(10)).await?;
        if got.is_empty() {
            bail!("the reader waited 10 s with {received} of {n} messages received");
        }
        for d in &got {
            // Nothing is redelivered in this run, so every id comes exactly once;
            // checked so a fast figure cannot come from skipped or repeated messages.
            let i = usize::try_from(d.message.id.0).unwrap_or(usize::MAX);
            if i >= n || seen[i] || d.message.payload.len() != SIZE {
                bail!("unexpected or repeated message {}", d.message.id);
            }
            seen[i] = true;
        }
        received += got.len();
        if acks.len() >= depth
            && let Some(done) = acks.join_next().await
        {
            done??;
        }
        let tags: Vec<_> = got.iter().map(|d| d.tag).collect();
        let buffer = buffer.clone();
        acks.spawn(async move { buffer.ack(&tags).await });
    }
    while let Some(done) = acks.join_next().await {
        done??;
    }
    writer.await.context("the writer task")??;
    let secs = t0.elapsed().as_secs_f64();
    let stats = buffer.stats().await?;
    if !stats.is_drained() || stats.acked_total != n as u64 {
        bail!("after the run the buffer is not drained: {stats:?}");
    }
    backend.delete(&name).await?;
    Ok(secs)
}

pub async fn run(n: usize) -> Result<()> {
    let pipe = raw_pipe(n)?;
    let mb = (n * SIZE) as f64 / 1e6;
    println!(
        "buffer ({n} messages of {SIZE} bytes in batches of {BATCH}, one writer and one reader task, in process, every append and ack synced to disk):"
    );
    println!(
        "  raw Unix socket pair                 {:10.0} msgs/s  {:7.1} MB/s   (baseline, bytes only)",
        n as f64 / pipe,
        mb / pipe
    );
    for depth in [1, 4] {
        let secs = embedded(n, depth).await?;
        println!(
            "  embedded append+fetch+ack, {depth} in flight {:10.0} msgs/s  {:7.1} MB/s   {:.1}% of the pipe",
            n as f64 / secs,
            mb / secs,
            100.0 * pipe / secs
        );
    }
    Ok(())
}
