//! `drover __vertex KIND [FLAGS]`: the built-in pipeline vertices (the `generator`
//! source, the `log` and `blackhole` sinks), run as a vertex replica's program. Like
//! the process runtime's shim, it is a hidden entry point of this binary that starts
//! no async runtime: it speaks the data protocol over `DROVER_SOCKET` with the Rust SDK,
//! exactly as a user's program would.

use drover_pipeline::builtin::{self, Generator, GeneratorConfig};

/// The hidden subcommand's name.
pub const SUBCOMMAND: &str = "__vertex";

/// Runs the built-in named by `args` (what follows the subcommand) until the agent
/// closes the connection; returns the process's exit code.
pub fn run(args: &[String]) -> i32 {
    match serve(args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("drover {SUBCOMMAND}: {e}");
            if e.starts_with("usage") { 2 } else { 1 }
        }
    }
}

fn serve(args: &[String]) -> Result<(), String> {
    let (kind, flags) = args.split_first().ok_or_else(|| usage("no vertex named"))?;
    match kind.as_str() {
        "generator" => {
            let cfg = generator_config(flags)?;
            drover_pipeline::source(Generator::new(cfg)).map_err(|e| e.to_string())
        }
        "log" => {
            no_flags(kind, flags)?;
            let mut out = std::io::stdout();
            drover_pipeline::sink(|batch| builtin::log_batch(&mut out, batch))
                .map_err(|e| e.to_string())
        }
        "blackhole" => {
            no_flags(kind, flags)?;
            drover_pipeline::sink(builtin::blackhole_batch).map_err(|e| e.to_string())
        }
        other => Err(usage(&format!("no built-in vertex {other:?}"))),
    }
}

fn usage(what: &str) -> String {
    format!(
        "usage: {what}; expected `drover {SUBCOMMAND} generator [--rate N] [--size BYTES] [--total N]`, `log` or `blackhole`"
    )
}

fn no_flags(kind: &str, flags: &[String]) -> Result<(), String> {
    match flags.first() {
        None => Ok(()),
        Some(f) => Err(usage(&format!("{kind} takes no flags, got {f:?}"))),
    }
}

/// Reads the generator's flags; the replica is the task's index, from the
/// `DROVER_TASK_INDEX` every task is given.
fn generator_config(flags: &[String]) -> Result<GeneratorConfig, String> {
    let mut cfg = GeneratorConfig {
        rate: 1_000,
        size: 256,
        total: None,
        replica: 0,
    };
    if let Ok(index) = std::env::var("DROVER_TASK_INDEX") {
        cfg.replica = index
            .parse()
            .map_err(|_| format!("DROVER_TASK_INDEX={index:?} is not a task index"))?;
    }
    let mut it = flags.iter();
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .ok_or_else(|| usage(&format!("{flag} needs a value")))?;
        let number = |what: &str| {
            value
                .parse::<u64>()
                .map_err(|_| usage(&format!("{flag}: expected {what}, got {value:?}")))
        };
        match flag.as_str() {
            "--rate" => cfg.rate = number("messages a second (0 for no limit)")?,
            "--size" => {
                let size = number("a size in bytes")?;
                cfg.size = usize::try_from(size)
                    .ok()
                    .filter(|s| *s <= 1 << 20)
                    .ok_or_else(|| usage(&format!("--size: at most 1 MiB, got {size}")))?;
            }
            "--total" => cfg.total = Some(number("a count of messages")?),
            other => return Err(usage(&format!("unknown flag {other:?}"))),
        }
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn generator_flags_are_read_and_bad_ones_named() {
        let cfg = generator_config(&args("--rate 0 --size 64 --total 10")).unwrap();
        assert_eq!((cfg.rate, cfg.size, cfg.total), (0, 64, Some(10)));
        for (bad, says) in [
            ("--rate fast", "--rate: expected messages a second"),
            ("--size 9999999", "--size: at most 1 MiB"),
            ("--total", "--total needs a value"),
            ("--colour red", "unknown flag \"--colour\""),
        ] {
            let e = generator_config(&args(bad)).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
        assert!(
            serve(&args("teleport"))
                .unwrap_err()
                .contains("no built-in vertex \"teleport\"")
        );
        assert!(
            serve(&args("log --loud"))
                .unwrap_err()
                .contains("log takes no flags")
        );
        assert_eq!(run(&args("")), 2);
    }
}
