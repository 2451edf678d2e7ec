//! Copying a container's output into the task's log files.
//!
//! The agent ships task output from files (see the log shipper), so a container's
//! stdout and stderr are followed through the engine's logs API and appended to the
//! task's `stdout` and `stderr` files. Each frame comes with the engine's timestamp; the
//! last one copied is recorded in the task directory so that a restarted agent resumes
//! where the previous one stopped instead of copying everything again.

use super::engine::{EngineError, call};
use bollard::Docker;
use bollard::container::LogOutput;
use bollard::query_parameters::LogsOptionsBuilder;
use futures_util::StreamExt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};
use tokio::time::Instant;

/// The file in the task directory holding the engine timestamp of the last log frame
/// copied into the task's files.
pub(super) const POSITION_FILE: &str = "docker-log-position";

/// How long after copying a frame its position is recorded at the latest. Recording
/// after every frame would double the writes of a chatty task; the cost of the delay is
/// that an agent dying in between copies up to this much output twice after it restarts.
const POSITION_EVERY: Duration = Duration::from_millis(200);

/// The wait before following again after the logs stream broke off (e.g. the engine
/// restarted) while the container was still running.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// How many times a broken logs stream is followed again before giving up.
const MAX_RETRIES: u32 = 30;

/// An engine timestamp: seconds and nanoseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Stamp {
    pub secs: i64,
    pub nanos: u32,
}

/// Where the task's output goes.
#[derive(Clone, Debug)]
pub(super) struct LogTarget {
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    pub position: PathBuf,
}

/// Where to start copying from.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Resume {
    /// Ask the engine for frames from this second on (0: from the start).
    pub since: i64,
    /// Skip frames stamped at or before this; they were copied already.
    pub after: Option<Stamp>,
    /// For stderr, when the position recorded it apart from stdout's (`after` is then
    /// stdout's).
    pub stderr_after: Option<Stamp>,
}

impl Resume {
    /// Where a restarted agent resumes copying the output of the task in `target`.
    ///
    /// With a recorded position, copying resumes right after the last frame copied
    /// (frames stamped in the same nanosecond as it would be skipped, which is as rare
    /// as it is harmless). Without one (the previous agent died before recording any),
    /// the log files' modification time is the best guess: the newest frame copied was
    /// stamped before the file was last written, so resuming from that second repeats
    /// at most the frames of that second, while starting from the beginning would
    /// repeat everything. Empty files mean nothing was copied: start from the beginning.
    pub fn for_recovery(target: &LogTarget) -> Resume {
        if let Some((out, err)) = std::fs::read_to_string(&target.position)
            .ok()
            .and_then(|s| parse_position(s.trim()))
        {
            // From the older of the two positions: the engine's `since` is shared by
            // the streams, and the stamps skip what each had copied.
            let since = match (out, err) {
                (Some(o), Some(e)) => o.secs.min(e.secs),
                _ => 0,
            };
            return Resume {
                since,
                after: out,
                stderr_after: err,
            };
        }
        let newest = [&target.stdout, &target.stderr]
            .into_iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .filter(|m| m.len() > 0)
            .filter_map(|m| m.modified().ok())
            .max();
        match newest.and_then(|t| t.duration_since(UNIX_EPOCH).ok()) {
            Some(d) => Resume {
                since: d.as_secs() as i64,
                after: None,
                stderr_after: None,
            },
            None => Resume::default(),
        }
    }
}

/// Copies the container's output into the task's files until the logs stream ends (when
/// the container has stopped and all its output was sent) or, with `follow` false, once
/// the output so far is copied.
pub(super) async fn copy_logs(
    docker: Docker,
    address: String,
    container: String,
    target: LogTarget,
    resume: Resume,
    mut follow: bool,
) {
    let mut copier = match Copier::open(&target, [resume.after, resume.stderr_after]) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(%container, %e, "cannot open the task's log files; its output is not copied");
            return;
        }
    };
    let mut retries = 0;
    loop {
        let since = match copier.last {
            [Some(o), Some(e)] => o.secs.min(e.secs),
            _ => resume.since,
        };
        let options = LogsOptionsBuilder::new()
            .follow(follow)
            .stdout(true)
            .stderr(true)
            .timestamps(true)
            // The engine takes whole seconds here; frames before the exact position are
            // skipped by their stamps.
            .since(i32::try_from(since).unwrap_or(0))
            .build();
        let mut stream = docker.logs(&container, Some(options));
        let mut record_at: Option<Instant> = None;
        let outcome = loop {
            let next = async {
                match record_at {
                    Some(at) => tokio::time::timeout_at(at, stream.next()).await.ok(),
                    None => Some(stream.next().await),
                }
            };
            match next.await {
                // The moment to record the position came while waiting for output.
                None => {
                    copier.record();
                    record_at = None;
                }
                Some(None) => break Ok(()),
                Some(Some(Ok(frame))) => {
                    if let Err(e) = copier.copy(frame) {
                        tracing::warn!(%container, %e, "cannot write the task's output; stopping the copy");
                        copier.record();
                        return;
                    }
                    let at = *record_at.get_or_insert_with(|| Instant::now() + POSITION_EVERY);
                    if Instant::now() >= at {
                        copier.record();
                        record_at = None;
                    }
                }
                Some(Some(Err(e))) => break Err(EngineError::from_bollard(&address, e)),
            }
        };
        copier.record();
        match outcome {
            Ok(()) => return,
            Err(EngineError::NotFound(_)) => return,
            Err(e) => {
                retries += 1;
                if !follow || retries > MAX_RETRIES {
                    tracing::warn!(%container, %e, "the container's logs stream failed; its remaining output is not copied");
                    return;
                }
                tracing::debug!(%container, %e, "the container's logs stream broke off; following again");
                tokio::time::sleep(RETRY_AFTER).await;
                // A container that is gone or has stopped has nothing more to send
                // beyond what a last, non-following read returns.
                let running = call(
                    &address,
                    Duration::from_secs(10),
                    docker.inspect_container(&container, None),
                )
                .await
                .ok()
                .and_then(|i| i.state.and_then(|s| s.running));
                if running == Some(false) {
                    // One more pass without follow picks up the tail of the output.
                    follow = false;
                }
            }
        }
    }
}

/// Appends frames to the task's files, remembering the stamp of the last one of each
/// stream. The two are kept apart because the engine stamps each stream as it reads
/// it, so a stderr line may come after a stdout line stamped later than it; one
/// position for both would skip that line as copied already.
struct Copier {
    stdout: File,
    stderr: File,
    position: PathBuf,
    /// The stamp of the last frame copied (or skipped as already copied), for stdout
    /// and for stderr.
    last: [Option<Stamp>; 2],
    /// The text of `last` as the engine wrote it, for the position file.
    last_text: [Option<String>; 2],
    /// Whether `last` changed since it was recorded.
    dirty: bool,
}

impl Copier {
    fn open(target: &LogTarget, after: [Option<Stamp>; 2]) -> io::Result<Copier> {
        Ok(Copier {
            stdout: open_append(&target.stdout)?,
            stderr: open_append(&target.stderr)?,
            position: target.position.clone(),
            last: after,
            last_text: after.map(|a| a.map(format_stamp)),
            dirty: false,
        })
    }

    /// Appends one frame's text to its file, unless it was copied before.
    fn copy(&mut self, frame: LogOutput) -> io::Result<()> {
        let (file, stream, message) = match frame {
            LogOutput::StdOut { message } | LogOutput::Console { message } => {
                (&mut self.stdout, 0, message)
            }
            LogOutput::StdErr { message } => (&mut self.stderr, 1, message),
            LogOutput::StdIn { .. } => return Ok(()),
        };
        let (stamp, text) = split_stamp(&message);
        if let Some((stamp, raw)) = stamp {
            if self.last[stream].is_some_and(|last| stamp <= last) {
                return Ok(());
            }
            self.last[stream] = Some(stamp);
            self.last_text[stream] = Some(raw.to_string());
            self.dirty = true;
        }
        // Plain blocking writes: appends to a local file are short, and keeping them in
        // order with the position record matters more than not blocking a worker for
        // that long.
        file.write_all(text)
    }

    /// Records the position of the last frame copied. The frames are written before the
    /// position, so a crash in between copies some output twice rather than losing it.
    fn record(&mut self) {
        if !self.dirty {
            return;
        }
        if self.last_text.iter().all(Option::is_none) {
            return;
        }
        // `STDOUT STDERR`, `-` for a stream with nothing copied yet.
        let [out, err] = self
            .last_text
            .clone()
            .map(|t| t.unwrap_or_else(|| "-".into()));
        let text = format!("{out} {err}");
        if let Err(e) = write_atomically(&self.position, &text) {
            tracing::debug!(path = %self.position.display(), %e, "cannot record the log position");
            return;
        }
        self.dirty = false;
    }
}

impl Drop for Copier {
    /// Records the position when copying ends for any reason, including the agent
    /// shutting down (which aborts the copy), so the next agent resumes exactly.
    fn drop(&mut self) {
        self.record();
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// Replaces `path` with `text` so that a reader never sees half of it.
fn write_atomically(path: &Path, text: &str) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// Splits `<RFC 3339 stamp> <text>` as the engine sends frames with timestamps on; a
/// frame without a readable stamp is all text.
fn split_stamp(message: &[u8]) -> (Option<(Stamp, &str)>, &[u8]) {
    let Some(space) = message.iter().take(64).position(|&b| b == b' ') else {
        return (None, message);
    };
    let Ok(raw) = std::str::from_utf8(&message[..space]) else {
        return (None, message);
    };
    match parse_stamp(raw) {
        Some(stamp) => (Some((stamp, raw)), &message[space + 1..]),
        None => (None, message),
    }
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`.
/// Reads the position file: `STDOUT STDERR` stamps (`-` for none), or one stamp for
/// both, as agents before the two were kept apart wrote it.
fn parse_position(s: &str) -> Option<(Option<Stamp>, Option<Stamp>)> {
    let one = |t: &str| {
        if t == "-" {
            Some(None)
        } else {
            parse_stamp(t).map(Some)
        }
    };
    match s.split_whitespace().collect::<Vec<_>>()[..] {
        [both] => parse_stamp(both).map(|b| (Some(b), Some(b))),
        [out, err] => Some((one(out)?, one(err)?)),
        _ => None,
    }
}

/// A stamp as the engine writes it (RFC 3339, nanoseconds, UTC), for a position
/// recorded from a stamp rather than from the engine's text.
fn format_stamp(stamp: Stamp) -> String {
    let at = UNIX_EPOCH + Duration::new(u64::try_from(stamp.secs).unwrap_or(0), stamp.nanos);
    humantime::format_rfc3339_nanos(at).to_string()
}

pub(super) fn parse_stamp(s: &str) -> Option<Stamp> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' {
        return None;
    }
    if b[16] != b':' {
        return None;
    }
    let num = |from: usize, to: usize| -> Option<i64> {
        let part = s.get(from..to)?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    let (year, month, day) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (hour, minute, second) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    let mut i = 19;
    let mut nanos: u32 = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let digits = &s[start..i];
        if digits.is_empty() {
            return None;
        }
        // Only the first nine digits matter; pad to nanoseconds.
        let mut padded: String = digits.chars().take(9).collect();
        while padded.len() < 9 {
            padded.push('0');
        }
        nanos = padded.parse().ok()?;
    }
    let offset_secs = match s.get(i..)? {
        "Z" | "z" => 0,
        zone if zone.len() == 6 && (zone.starts_with('+') || zone.starts_with('-')) => {
            let sign = if zone.starts_with('-') { -1 } else { 1 };
            let h = num(i + 1, i + 3)?;
            if b[i + 3] != b':' {
                return None;
            }
            let m = num(i + 4, i + 6)?;
            sign * (h * 3600 + m * 60)
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_secs;
    Some(Stamp { secs, nanos })
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_stamps_parse_to_unix_time() {
        assert_eq!(
            parse_stamp("1970-01-01T00:00:00Z"),
            Some(Stamp { secs: 0, nanos: 0 })
        );
        assert_eq!(
            parse_stamp("2024-02-29T12:34:56.123456789Z"),
            Some(Stamp {
                secs: 1_709_210_096,
                nanos: 123_456_789
            })
        );
        assert_eq!(
            parse_stamp("2024-02-29T14:34:56.5+02:00"),
            Some(Stamp {
                secs: 1_709_210_096,
                nanos: 500_000_000
            })
        );
        assert_eq!(parse_stamp("not a stamp at all"), None);
        assert_eq!(parse_stamp("2024-13-01T00:00:00Z"), None);
    }

    #[test]
    fn frames_are_split_into_stamp_and_text() {
        let (stamp, text) = split_stamp(b"2024-02-29T12:34:56.000000001Z hello world\n");
        assert_eq!(
            stamp.map(|(s, _)| s),
            Some(Stamp {
                secs: 1_709_210_096,
                nanos: 1
            })
        );
        assert_eq!(text, b"hello world\n");
        let (stamp, text) = split_stamp(b"no stamp here\n");
        assert!(stamp.is_none());
        assert_eq!(text, b"no stamp here\n");
    }

    #[test]
    fn recovery_resumes_after_the_recorded_position() {
        let dir = tempfile::tempdir().unwrap();
        let target = LogTarget {
            stdout: dir.path().join("stdout"),
            stderr: dir.path().join("stderr"),
            position: dir.path().join(POSITION_FILE),
        };
        let fresh = Resume::for_recovery(&target);
        assert_eq!(
            (fresh.since, fresh.after, fresh.stderr_after),
            (0, None, None)
        );

        std::fs::write(&target.stdout, "copied\n").unwrap();
        let guessed = Resume::for_recovery(&target);
        assert!(guessed.since > 1_700_000_000 && guessed.after.is_none());

        std::fs::write(&target.position, "2024-02-29T12:34:56.000000001Z").unwrap();
        let recorded = Resume::for_recovery(&target);
        assert_eq!(recorded.since, 1_709_210_096);
        assert_eq!(
            recorded.after,
            Some(Stamp {
                secs: 1_709_210_096,
                nanos: 1
            })
        );
    }

    #[test]
    fn copied_frames_are_not_copied_again() {
        let dir = tempfile::tempdir().unwrap();
        let target = LogTarget {
            stdout: dir.path().join("stdout"),
            stderr: dir.path().join("stderr"),
            position: dir.path().join(POSITION_FILE),
        };
        let after = parse_stamp("2024-01-01T00:00:01Z");
        let mut copier = Copier::open(&target, [after, after]).unwrap();
        for (line, err) in [
            ("2024-01-01T00:00:00.5Z old\n", false),
            ("2024-01-01T00:00:01Z same\n", false),
            ("2024-01-01T00:00:01.000000001Z new\n", false),
            ("2024-01-01T00:00:02Z oops\n", true),
        ] {
            let message = line.as_bytes().to_vec().into();
            let frame = if err {
                LogOutput::StdErr { message }
            } else {
                LogOutput::StdOut { message }
            };
            copier.copy(frame).unwrap();
        }
        copier.record();
        assert_eq!(std::fs::read_to_string(&target.stdout).unwrap(), "new\n");
        assert_eq!(std::fs::read_to_string(&target.stderr).unwrap(), "oops\n");
        assert_eq!(
            std::fs::read_to_string(&target.position).unwrap(),
            "2024-01-01T00:00:01.000000001Z 2024-01-01T00:00:02Z"
        );
    }

    #[test]
    fn a_stderr_line_stamped_before_the_last_stdout_line_is_still_copied() {
        let dir = tempfile::tempdir().unwrap();
        let target = LogTarget {
            stdout: dir.path().join("stdout"),
            stderr: dir.path().join("stderr"),
            position: dir.path().join(POSITION_FILE),
        };
        let mut copier = Copier::open(&target, [None, None]).unwrap();
        // The engine read "out" from stdout after "err" from stderr, but sent it first.
        copier
            .copy(LogOutput::StdOut {
                message: b"2024-01-01T00:00:02Z out\n".to_vec().into(),
            })
            .unwrap();
        copier
            .copy(LogOutput::StdErr {
                message: b"2024-01-01T00:00:01Z err\n".to_vec().into(),
            })
            .unwrap();
        copier.record();
        assert_eq!(std::fs::read_to_string(&target.stderr).unwrap(), "err\n");
        // A restart resumes each stream after its own last line, from the older second.
        let resume = Resume::for_recovery(&target);
        assert_eq!(resume.since, 1_704_067_201);
        assert_eq!(resume.after, parse_stamp("2024-01-01T00:00:02Z"));
        assert_eq!(resume.stderr_after, parse_stamp("2024-01-01T00:00:01Z"));
        // A position an older agent wrote (one stamp) stands for both streams.
        std::fs::write(&target.position, "2024-01-01T00:00:03Z").unwrap();
        let old = Resume::for_recovery(&target);
        assert_eq!(
            (old.after, old.stderr_after),
            (
                parse_stamp("2024-01-01T00:00:03Z"),
                parse_stamp("2024-01-01T00:00:03Z")
            )
        );
        // Nothing copied from stderr yet: it starts from the beginning.
        std::fs::write(&target.position, "2024-01-01T00:00:03Z -").unwrap();
        let half = Resume::for_recovery(&target);
        assert_eq!((half.since, half.stderr_after), (0, None));
    }
}
