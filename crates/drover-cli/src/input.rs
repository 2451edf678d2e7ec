//! `drover run`'s standard input, read whole and sent as the job's `stdin`.
//!
//! Input is data, not a stream: it is read to its end before the job is submitted,
//! uploaded as a blob of the caller's project, and named in the spec, so every task of
//! the job (and every retry, rescheduling or adoption by a restarted agent) reads the
//! same bytes, and the CLI need not stay connected for the task to have them. So it is
//! bounded ([`drover_core::spec::MAX_STDIN_BYTES`]); bigger input belongs in an
//! artifact.
//!
//! What is read: a pipe or a regular file, unless `--no-stdin`; a terminal only with
//! `--stdin`. Anything else (`/dev/null`, another character device, a socket) is left
//! alone, so `drover run` from a script, CI or the benchmarks, whose stdin is usually
//! `/dev/null`, costs nothing more than before. Empty input is no input: the task gets
//! `/dev/null` as it would have without any.

use anyhow::{Context, Result};
use drover_core::artifact::Digest;
use drover_core::quantity::ByteSize;
use drover_core::spec::MAX_STDIN_BYTES;
use std::io::{self, IsTerminal, Read, Seek, Write};
use std::time::Duration;

/// Whether `drover run` reads its stdin, from `-i/--stdin` and `--no-stdin`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Read a pipe or a regular file; leave a terminal and anything else alone.
    Auto,
    /// Read whatever stdin is, a terminal too (until Ctrl-D).
    Always,
    /// Never read it.
    Never,
}

/// Input read from stdin, kept in a temporary file until it is uploaded.
pub struct Input {
    pub file: tempfile::NamedTempFile,
    pub digest: Digest,
    pub size: u64,
}

/// After this long without the end of its input, `drover run` says what it is waiting
/// for, since a pipe nobody closes would otherwise look like a hang.
const NOTE_AFTER: Duration = Duration::from_secs(3);

/// Reads stdin to its end when `mode` says so and it is input; `None` when there is
/// none (not read, or empty).
pub async fn read(mode: Mode) -> Result<Option<Input>> {
    let Some(known) = should_read(mode)? else {
        return Ok(None);
    };
    if let Some(size) = known
        && size > MAX_STDIN_BYTES
    {
        return Err(too_big(Some(size)));
    }
    let reading = tokio::task::spawn_blocking(read_all);
    tokio::pin!(reading);
    let read = tokio::select! {
        r = &mut reading => r,
        () = tokio::time::sleep(NOTE_AFTER) => {
            // A note only: with stderr closed there is nowhere to say it.
            if let Err(e) = writeln!(
                io::stderr(),
                "drover: reading stdin to send to the task (end it with Ctrl-D, or run with --no-stdin or </dev/null)"
            ) {
                tracing::debug!("cannot write the note about stdin: {e}");
            }
            (&mut reading).await
        }
    };
    read.context("reading stdin stopped")?
}

/// Whether to read stdin, and its size when it is a regular file (so that input over
/// the cap is refused before it is read); `None` to leave it alone.
fn should_read(mode: Mode) -> Result<Option<Option<u64>>> {
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileTypeExt;
    if mode == Mode::Never {
        return Ok(None);
    }
    let stdin = io::stdin();
    // A closed stdin (no file descriptor 0) has nothing to read whatever the mode.
    let Ok(fd) = stdin.as_fd().try_clone_to_owned() else {
        return Ok(None);
    };
    let meta = std::fs::File::from(fd)
        .metadata()
        .context("looking at stdin")?;
    let kind = meta.file_type();
    let size = kind.is_file().then_some(meta.len());
    if mode == Mode::Always {
        return Ok(Some(size));
    }
    if stdin.is_terminal() {
        return Ok(None);
    }
    Ok((kind.is_fifo() || kind.is_file()).then_some(size))
}

/// Copies stdin into a temporary file, hashing it on the way, up to one byte past the
/// cap (which is then refused).
fn read_all() -> Result<Option<Input>> {
    let mut file = tempfile::Builder::new()
        .prefix("drover-stdin-")
        .tempfile()
        .context("creating a temporary file for stdin")?;
    let mut hasher = Digest::hasher();
    let mut limited = io::stdin().lock().take(MAX_STDIN_BYTES + 1);
    let mut buf = vec![0u8; 256 << 10];
    let mut size: u64 = 0;
    loop {
        let n = match limited.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("reading stdin"),
        };
        size += n as u64;
        if size > MAX_STDIN_BYTES {
            return Err(too_big(None));
        }
        let piece = &buf[..n];
        hasher
            .write_all(piece)
            .context("hashing stdin (cannot fail)")?;
        file.write_all(piece).with_context(|| {
            format!(
                "writing stdin to the temporary file {}",
                file.path().display()
            )
        })?;
    }
    if size == 0 {
        return Ok(None);
    }
    file.flush().context("writing stdin to a temporary file")?;
    file.rewind()
        .context("rewinding the temporary file holding stdin")?;
    Ok(Some(Input {
        file,
        digest: hasher.finish(),
        size,
    }))
}

/// The refusal of input over the cap; `size` when it is known (a regular file).
fn too_big(size: Option<u64>) -> anyhow::Error {
    let what = match size {
        Some(n) => format!("{n} bytes, more"),
        None => "more".into(),
    };
    anyhow::anyhow!(
        "stdin: {what} than the {} drover run sends to a task; give bigger input as an artifact (drover artifact push) or a runtime_env.working_dir, or pass --no-stdin to send none",
        ByteSize(MAX_STDIN_BYTES)
    )
}
