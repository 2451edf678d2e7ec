//! `drover-bench buffer-nats`: messages moved through the NATS buffer backend (append,
//! fetch, ack), against raw async-nats JetStream publish + pull fetch + ack of the same
//! messages on the same server in the same run.
//!
//! Each side runs a writer and a reader at once, as a pipeline's two vertices would, and
//! the time is from the first write to the last ack. The rounds alternate (raw, Drover,
//! raw, Drover) so a drift in the machine's speed falls on both; the best round of each
//! is reported.

#[path = "../../drover-buffer/tests/support/nats_server.rs"]
pub(crate) mod nats_server;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use drover_buffer::nats::async_nats::jetstream::{self, consumer::pull, stream};
use drover_buffer::nats::{NatsBackend, NatsOptions, async_nats};
use drover_buffer::{BufferBackend, BufferConfig, BufferError, BufferName, Message, MessageId};
use futures_util::StreamExt;
use std::time::{Duration, Instant};

const PAYLOAD: usize = 256;
const BATCH: usize = 500;
const ROUNDS: usize = 2;
/// How long one side may take before the benchmark gives up on it.
const SIDE_TIMEOUT: Duration = Duration::from_secs(600);

pub async fn run(count: usize) -> Result<()> {
    let server = match nats_server::NatsServer::try_start() {
        Ok(server) => server,
        Err(err) => bail!("{err}"),
    };
    let url = server.url();
    let payloads: Vec<Bytes> = (0..count)
        .map(|i| Bytes::from(vec![(i % 251) as u8; PAYLOAD]))
        .collect();
    let (mut raw_best, mut drover_best) = (f64::MAX, f64::MAX);
    for round in 0..ROUNDS {
        let raw_secs = tokio::time::timeout(SIDE_TIMEOUT, raw(&url, round, &payloads))
            .await
            .context("the raw JetStream side timed out")??;
        let drover_secs = tokio::time::timeout(SIDE_TIMEOUT, drover(&url, round, &payloads))
            .await
            .context("the NatsBackend side timed out")??;
        raw_best = raw_best.min(raw_secs);
        drover_best = drover_best.min(drover_secs);
    }
    let rate = |secs: f64| count as f64 / secs;
    println!(
        "buffer-nats ({count} messages of {PAYLOAD} bytes in batches of {BATCH}, writer and reader at once, nats-server {}, best of {ROUNDS}):",
        server_version()
    );
    println!(
        "  raw async-nats JetStream publish + fetch + ack  {:9.0} msgs/s   (baseline)",
        rate(raw_best)
    );
    println!(
        "  NatsBackend append + fetch + ack                {:9.0} msgs/s   {:.2}x the baseline",
        rate(drover_best),
        raw_best / drover_best
    );
    Ok(())
}

fn server_version() -> String {
    nats_server::binary()
        .ok()
        .and_then(|bin| {
            std::process::Command::new(bin)
                .arg("--version")
                .output()
                .ok()
        })
        .map(|out| {
            let text = String::from_utf8_lossy(&out.stdout);
            // It prints `nats-server: v2.15.1`.
            let version = text.trim();
            version
                .strip_prefix("nats-server: ")
                .unwrap_or(version)
                .to_string()
        })
        .unwrap_or_else(|| "(unknown version)".into())
}

/// The messages through [`NatsBackend`]; returns the seconds taken.
async fn drover(url: &str, round: usize, payloads: &[Bytes]) -> Result<f64> {
    let backend = NatsBackend::connect(url, NatsOptions::default()).await?;
    let name = BufferName::new("bench", "nats", &format!("round-{round}"), 0)?;
    // Room for every message, so the figure is the buffer's speed rather than a reader
    // that falls behind; the back-pressure check still runs on every append.
    let config = BufferConfig {
        max_length: payloads.len() as u64 * 2,
        ..BufferConfig::default()
    };
    let writer = backend.open(&name, &config).await?;
    let reader = backend.open(&name, &config).await?;
    let batches: Vec<Vec<Message>> = payloads
        .chunks(BATCH)
        .enumerate()
        .map(|(b, chunk)| {
            chunk
                .iter()
                .enumerate()
                .map(|(i, payload)| Message {
                    id: MessageId((round * payloads.len() + b * BATCH + i) as u128),
                    key: Bytes::new(),
                    event_time: 0,
                    payload: payload.clone(),
                })
                .collect()
        })
        .collect();
    let total = payloads.len();
    let t0 = Instant::now();
    let write = tokio::spawn(async move {
        for batch in &batches {
            loop {
                match writer.append(batch).await {
                    Ok(_) => break,
                    Err(BufferError::Full { .. }) => {
                        tokio::time::sleep(Duration::from_millis(1)).await
                    }
                    Err(err) => return Err(anyhow::Error::from(err)),
                }
            }
        }
        Ok(())
    });
    let mut received = 0;
    while received < total {
        let got = reader.fetch(BATCH, Duration::from_secs(5)).await?;
        if got.is_empty() {
            bail!("NatsBackend: no message for 5 s after {received} of {total}");
        }
        received += got.len();
        let tags: Vec<_> = got.iter().map(|d| d.tag).collect();
        reader.ack(&tags).await?;
    }
    let secs = t0.elapsed().as_secs_f64();
    write.await??;
    if let Err(err) = backend.delete(&name).await {
        eprintln!("deleting the benchmark buffer {name}: {err}");
    }
    Ok(secs)
}

/// The same messages through async-nats directly: publishes with a message id (so the
/// server does the same de-duplication work), all acks of a batch awaited after its
/// publishes, a pull consumer fetched in batches and acked with a flush per batch.
pub(crate) async fn raw(url: &str, round: usize, payloads: &[Bytes]) -> Result<f64> {
    let client = async_nats::connect(url).await?;
    let js = jetstream::new(client.clone());
    let name = format!("RAW_{round}");
    let subject = format!("raw.{round}");
    let stream = js
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?;
    let consumer: jetstream::consumer::PullConsumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("raw".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await?;
    let payloads = payloads.to_vec();
    let total = payloads.len();
    let t0 = Instant::now();
    let writer_js = js.clone();
    let write = tokio::spawn(async move {
        for (b, chunk) in payloads.chunks(BATCH).enumerate() {
            let mut acks = Vec::with_capacity(chunk.len());
            for (i, payload) in chunk.iter().enumerate() {
                let publish = jetstream::message::PublishMessage::build()
                    .payload(payload.clone())
                    .message_id(format!("{round}-{b}-{i}"));
                acks.push(writer_js.send_publish(subject.clone(), publish).await?);
            }
            for ack in acks {
                ack.await?;
            }
        }
        Ok::<_, anyhow::Error>(())
    });
    let mut received = 0;
    while received < total {
        let mut batch = consumer
            .fetch()
            .max_messages(BATCH)
            .expires(Duration::from_millis(20))
            .messages()
            .await
            .map_err(|err| anyhow::anyhow!("fetching: {err}"))?;
        let mut got = 0;
        while let Some(message) = batch.next().await {
            let message = message.map_err(|err| anyhow::anyhow!("fetching: {err}"))?;
            message
                .ack()
                .await
                .map_err(|err| anyhow::anyhow!("acking: {err}"))?;
            got += 1;
        }
        if got == 0 {
            // The writer is behind; wait for the next message as a reader would.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        client.flush().await?;
        received += got;
    }
    let secs = t0.elapsed().as_secs_f64();
    write.await??;
    if let Err(err) = js.delete_stream(&name).await {
        eprintln!("deleting the benchmark stream {name}: {err}");
    }
    Ok(secs)
}
