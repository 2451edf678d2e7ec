//! A map that upper-cases each message, keeps its key, tags it "upper", and drops
//! empty messages.

use drover_pipeline::Output;

fn main() {
    let served = drover_pipeline::map(|msg| {
        if msg.payload.is_empty() {
            return vec![];
        }
        vec![
            Output::new(msg.payload.to_ascii_uppercase())
                .key(msg.key)
                .tags(["upper"]),
        ]
    });
    if let Err(e) = served {
        eprintln!("uppercase_map: {e}");
        std::process::exit(1);
    }
}
