//! `drover logs --since` and `--timestamps` through the built binary, against a real
//! process task whose two lines are seconds apart.

mod common;
use common::*;
use drover_core::Millis;
use drover_core::logtime::{format_rfc3339_millis, parse_rfc3339};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

impl Up {
    /// Runs `drover logs ARGS` and returns its stdout, failing on an error.
    fn logs(&self, args: &[&str]) -> String {
        let mut all = vec!["logs"];
        all.extend_from_slice(args);
        let out = self.home.run(&all);
        assert!(out.status.success(), "{all:?}: {}", stderr(&out));
        stdout(&out)
    }
}

fn now() -> Millis {
    drover_core::now_millis()
}

/// The time before each line of `--timestamps` output, checked to be RFC 3339 with
/// milliseconds, and the rest of the line.
fn timed_lines(text: &str) -> Vec<(Millis, String)> {
    text.lines()
        .map(|l| {
            let (time, rest) = l
                .split_once(' ')
                .unwrap_or_else(|| panic!("no time: {l:?}"));
            assert_eq!(time.len(), 24, "{time}");
            assert!(time.ends_with('Z') && time.as_bytes()[19] == b'.', "{time}");
            let at = parse_rfc3339(time).unwrap_or_else(|e| panic!("{e}"));
            (at, rest.to_string())
        })
        .collect()
}

#[test]
fn logs_start_at_a_time_and_show_when_each_line_was_written() {
    let up = Up::start();
    let h = &up.home;
    let before = now();
    let spec = write(
        h.path(),
        "ticks.yaml",
        "name: ticks\ncommand: [sh, -c, 'echo first; sleep 3; echo second']\n",
    );
    let out = h.run(&["job", "apply", "--detach", "-f", spec.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));

    // Right after the second line, the last two seconds hold it alone.
    wait_until("the second line", T, || {
        up.logs(&["ticks"]).contains("second")
    });
    let seen = Instant::now();
    let recent = up.logs(&["--since", "2s", "ticks"]);
    assert!(
        seen.elapsed() < Duration::from_secs(2),
        "the machine is too slow for this check: {:?} between seeing the line and asking",
        seen.elapsed()
    );
    assert_eq!(recent, "second\n");
    wait_until("the job to complete", T, || {
        up.job_status("ticks") == "complete"
    });
    let after = now();

    // A time before the job shows both.
    let early = format_rfc3339_millis(before - 1_000);
    assert_eq!(up.logs(&["--since", &early, "ticks"]), "first\nsecond\n");

    // Each line after its time, in order, within the test's window and as far apart
    // as the task slept.
    let timed = timed_lines(&up.logs(&["--timestamps", "ticks"]));
    let texts: Vec<&str> = timed.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(texts, ["first", "second"], "{timed:?}");
    let (t1, t2) = (timed[0].0, timed[1].0);
    for t in [t1, t2] {
        assert!(
            (before..=after).contains(&t),
            "{t} not in {before}..={after}"
        );
    }
    assert!(t2 - t1 >= 2_500, "{t1} and {t2} are closer than the sleep");
    assert_eq!(timed_lines(&up.logs(&["-t", "ticks"])), timed);

    // Between the two times, by the clock of the times themselves: the second alone,
    // with -f too, and with --tail what is after --since is what is tailed.
    let mid = format_rfc3339_millis((t1 + t2) / 2);
    assert_eq!(up.logs(&["--since", &mid, "ticks"]), "second\n");
    assert_eq!(up.logs(&["-f", "--since", &mid, "ticks"]), "second\n");
    assert_eq!(
        up.logs(&["--since", &early, "--tail", "1", "ticks"]),
        "second\n"
    );
    assert_eq!(
        up.logs(&["--since", &mid, "--tail", "5", "ticks"]),
        "second\n"
    );
    // An offset other than Z is understood.
    let mid_offset = format_rfc3339_millis((t1 + t2) / 2).replace('Z', "+00:00");
    assert_eq!(up.logs(&["--since", &mid_offset, "ticks"]), "second\n");

    // JSON gives each chunk its time.
    let ndjson = up.logs(&["-o", "json", "ticks"]);
    let chunks: Vec<serde_json::Value> = ndjson
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .filter(|v: &serde_json::Value| v["type"] == "log")
        .collect();
    let data: String = chunks.iter().map(|c| c["data"].as_str().unwrap()).collect();
    assert_eq!(data, "first\nsecond\n");
    let times: Vec<Millis> = chunks
        .iter()
        .map(|c| parse_rfc3339(c["time"].as_str().expect("a time")).unwrap())
        .collect();
    assert_eq!(times, [t1, t2], "{ndjson}");

    // A wrong --since names the flag and both forms.
    for bad in ["yesterday", "2026-13-01T00:00:00Z", "10"] {
        let out = h.run(&["logs", "--since", bad, "ticks"]);
        assert_eq!(out.status.code(), Some(2), "{bad}");
        let err = stderr(&out);
        assert!(
            err.contains("--since")
                && err.contains("duration like 10m")
                && err.contains("RFC 3339"),
            "{bad}: {err}"
        );
    }
}

#[test]
fn timestamps_come_after_the_index_of_each_task() {
    let up = Up::start();
    let h = &up.home;
    let before = now();
    let spec = write(
        h.path(),
        "pair.yaml",
        "name: pair\ncount: 2\ncommand: [sh, -c, 'echo one; echo two']\n",
    );
    let out = h.run(&["job", "apply", "--detach", "-f", spec.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_until("the job to complete", T, || {
        up.job_status("pair") == "complete"
    });
    let after = now();
    let text = up.logs(&["-t", "pair"]);
    let mut lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    lines.sort_unstable();
    for (line, (index, word)) in lines
        .iter()
        .zip([(0, "one"), (0, "two"), (1, "one"), (1, "two")])
    {
        let rest = line
            .strip_prefix(&format!("[{index}] "))
            .unwrap_or_else(|| panic!("{line}"));
        let timed = timed_lines(rest);
        assert_eq!(timed[0].1, word, "{line}");
        assert!((before..=after).contains(&timed[0].0), "{line}");
    }
}
