//! Round-trip throughput of the Rust identity map over the task socket: 256-byte
//! messages in batches of 500, with the agent's side encoding every request and
//! decoding every response through `proto`, as the agent will. Ignored by default, since
//! it measures rather than checks; run it in release:
//!
//! ```sh
//! cargo build --release -p drover-pipeline --examples
//! cargo test --release -p drover-pipeline --test throughput -- --ignored --nocapture
//! ```
//!
//! `DROVER_BENCH_MESSAGES` sets how many messages each run sends (2,000,000 by default).

mod common;

use common::{Agent, example, finish, python_code, start};
use drover_pipeline::proto::{self, Frame, InMessage, Role};
use std::process::Command;
use std::time::Instant;

const BATCH: usize = 500;
const PAYLOAD: usize = 256;

/// Sends `batches` batches with at most `window` unanswered at once and returns the
/// messages per second of the whole run.
fn run(program: Command, batches: u64, window: usize) -> f64 {
    let agent = Agent::new();
    let child = start(program, &agent);
    let (mut reader, mut writer) = agent.accept(Role::Map).into_parts();
    let (credit, credits) = std::sync::mpsc::sync_channel::<()>(window);
    for _ in 0..window {
        credit.send(()).unwrap();
    }
    let started = Instant::now();
    let sender = std::thread::spawn(move || {
        let mut buf = Vec::new();
        for batch in 0..batches {
            credits.recv().unwrap();
            let messages = (0..BATCH)
                .map(|i| InMessage {
                    id: ((batch << 32) | i as u64)
                        .to_le_bytes()
                        .repeat(2)
                        .try_into()
                        .unwrap(),
                    event_time: i as i64,
                    key: Vec::new(),
                    payload: vec![b'x'; PAYLOAD],
                })
                .collect();
            proto::write_frame(
                &mut writer,
                &Frame::MapRequest { batch, messages },
                &mut buf,
            )
            .unwrap();
        }
        writer
    });
    let mut scratch = Vec::new();
    for expected in 0..batches {
        let frame = proto::read_frame(&mut reader, &mut scratch)
            .unwrap()
            .unwrap();
        let Frame::MapResponse { batch, results } = frame else {
            panic!("expected a MapResponse, got {frame:?}");
        };
        assert_eq!((batch, results.len()), (expected, BATCH));
        assert_eq!(results[BATCH - 1][0].payload.len(), PAYLOAD);
        if credit.send(()).is_err() {
            // The sender has sent every batch and dropped its end: it needs no more
            // credit, and the remaining responses are still read.
        }
    }
    let elapsed = started.elapsed();
    drop(sender.join().unwrap());
    drop(reader);
    let (status, _, stderr) = finish(child);
    assert!(status.success(), "{stderr}");
    (batches * BATCH as u64) as f64 / elapsed.as_secs_f64()
}

#[test]
#[ignore = "a measurement; run in release with --ignored --nocapture"]
fn identity_map_round_trip_throughput() {
    let messages: u64 = std::env::var("DROVER_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000_000);
    let batches = messages.div_ceil(BATCH as u64);
    let report = |what: &str, window: usize, rate: f64| {
        println!(
            "{what} identity map, {PAYLOAD}-byte messages, batches of {BATCH}, {window} in flight: {rate:.0} msgs/s ({:.0} MB/s of payload each way)",
            rate * PAYLOAD as f64 / 1e6
        );
    };
    for window in [1, 4] {
        let rate = run(Command::new(example("identity_map")), batches, window);
        report("Rust", window, rate);
    }
    // The Python SDK, for comparison, on a tenth of the messages.
    let (python, _dir) = python_code(
        "import drover_pipeline as dp\ndp.map(lambda m: [dp.Output(m.payload, key=m.key)])\n",
    );
    report("Python", 1, run(python, batches.div_ceil(10), 1));
}
