//! A map that passes every message on unchanged: the pipeline benchmark's vertex, whose
//! own work is nothing, so it measures the data path alone.

use drover_pipeline::Output;

fn main() {
    let served = drover_pipeline::map(|msg| vec![Output::new(msg.payload).key(msg.key)]);
    if let Err(e) = served {
        eprintln!("identity_map: {e}");
        std::process::exit(1);
    }
}
