//! A sink that prints each message's key and payload as a line on stdout, and refuses
//! empty messages.

use std::io::Write;

fn main() {
    let mut out = std::io::stdout().lock();
    let served = drover_pipeline::sink(|batch| {
        batch
            .iter()
            .map(|msg| {
                if msg.payload.is_empty() {
                    return Err("an empty message has nothing to print".to_string());
                }
                let key = String::from_utf8_lossy(msg.key);
                let payload = String::from_utf8_lossy(msg.payload);
                writeln!(out, "{key}={payload}")
                    .and_then(|()| out.flush())
                    .map_err(|e| format!("writing to stdout: {e}"))
            })
            .collect()
    });
    if let Err(e) = served {
        eprintln!("print_sink: {e}");
        std::process::exit(1);
    }
}
