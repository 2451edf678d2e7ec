//! A source of the numbers 0, 1, 2... up to the limit in COUNTER_LIMIT (unbounded
//! without it). Each message's id is its number (8 bytes, little-endian); each
//! acknowledgement is printed on stdout as "acked 0 1 2".

use drover_pipeline::{Source, SourceMessage};
use std::io::Write;
use std::time::Duration;

struct Counter {
    next: u64,
    limit: u64,
}

impl Source for Counter {
    fn read(&mut self, max: usize, wait: Duration) -> Result<Vec<SourceMessage>, String> {
        let end = self.limit.min(self.next + max as u64);
        if self.next == end {
            // Nothing more will come; waiting as asked keeps the agent from spinning.
            std::thread::sleep(wait);
        }
        let messages = (self.next..end)
            .map(|n| {
                SourceMessage::new(n.to_le_bytes(), n.to_string())
                    .key(if n % 2 == 0 { "even" } else { "odd" })
                    .event_time(1_700_000_000_000 + n as i64)
            })
            .collect();
        self.next = end;
        Ok(messages)
    }

    fn ack(&mut self, ids: &[Vec<u8>]) -> Result<(), String> {
        let mut line = String::from("acked");
        for id in ids {
            let n: [u8; 8] = id
                .as_slice()
                .try_into()
                .map_err(|_| format!("an id of {} bytes is not this source's", id.len()))?;
            line.push_str(&format!(" {}", u64::from_le_bytes(n)));
        }
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}")
            .and_then(|()| out.flush())
            .map_err(|e| format!("writing to stdout: {e}"))
    }
}

fn main() {
    let limit = match std::env::var("COUNTER_LIMIT") {
        Ok(v) => match v.parse() {
            Ok(n) => n,
            Err(e) => {
                eprintln!("counter_source: COUNTER_LIMIT={v:?} is not a count: {e}");
                std::process::exit(2);
            }
        },
        Err(_) => u64::MAX,
    };
    if let Err(e) = drover_pipeline::source(Counter { next: 0, limit }) {
        eprintln!("counter_source: {e}");
        std::process::exit(1);
    }
}
