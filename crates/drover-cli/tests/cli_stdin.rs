//! `drover run` forwards its stdin, when it is a pipe or a file, as the job's input:
//! read whole, uploaded as a blob, and given to every task (and every retry) as its
//! standard input.

mod common;
use common::*;
use std::io::Write;
use std::process::{Output, Stdio};
use std::time::Duration;

/// Runs `drover ARGS` with `input` written to its stdin through a pipe.
fn run_piped(home: &Home, args: &[&str], input: &[u8]) -> Output {
    let mut cmd = home.cmd(args);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawning drover");
    let mut pipe = child.stdin.take().expect("stdin is piped");
    let input = input.to_vec();
    // Written from a thread so that a drover that stops reading (input over the cap)
    // cannot block the test; the broken pipe it then gets is expected.
    let writer = std::thread::spawn(move || {
        let _ = pipe.write_all(&input);
    });
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("drover did not finish within 120s")
        .expect("waiting for drover");
    writer.join().expect("the writer thread");
    out
}

#[test]
fn piped_stdin_reaches_the_task() {
    let home = Home::new();
    let out = run_piped(&home, &["run", "--", "cat"], b"x\n");
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), "x\n");

    let out = run_piped(&home, &["run", "--", "wc", "-l"], b"a\nb\n");
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "2");
}

#[test]
fn binary_stdin_round_trips_byte_for_byte() {
    let home = Home::new();
    // Every byte value, NULs and invalid UTF-8 included, over a few MiB so the upload
    // and the agent's download go in many pieces.
    let input: Vec<u8> = (0..(3 << 20) + 17)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .chain([0, 0, 0xff, b'\n', 0])
        .collect();
    let expected = drover_core::artifact::Digest::of(&input);
    let out = run_piped(&home, &["run", "--", "sha256sum"], &input);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert_eq!(
        stdout(&out).split_whitespace().next(),
        Some(expected.hex()),
        "stderr: {}",
        stderr(&out)
    );
}

#[test]
fn a_file_as_stdin_is_sent_and_an_empty_or_refused_stdin_is_dev_null() {
    let home = Home::new();
    let file = write(home.path(), "input.txt", "from a file\n");
    let mut cmd = home.cmd(&["run", "--", "cat"]);
    cmd.stdin(std::fs::File::open(&file).unwrap());
    let out = run_with_timeout(cmd, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), "from a file\n");

    // Empty input behaves as /dev/null always did: the task reads an immediate end.
    let probe = "cat; echo end; test -c /proc/self/fd/0 && echo null";
    let out = run_piped(&home, &["run", "--", "sh", "-c", probe], b"");
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), "end\nnull\n");

    // --no-stdin leaves piped input unread.
    let out = run_piped(
        &home,
        &["run", "--no-stdin", "--", "sh", "-c", probe],
        b"not for the task\n",
    );
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), "end\nnull\n");

    let out = home.run(&["run", "--stdin", "--no-stdin", "--", "true"]);
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr(&out));
    assert!(stderr(&out).contains("--no-stdin"), "{}", stderr(&out));
}

#[test]
fn input_over_the_cap_is_refused_with_what_to_do_instead() {
    let home = Home::new();
    let cap = drover_core::spec::MAX_STDIN_BYTES as usize;
    let out = run_piped(&home, &["run", "--", "wc", "-c"], &vec![b'x'; cap + 1]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("stdin: more than the 64Mi") && err.contains("artifact"),
        "{err}"
    );
    assert_eq!(stdout(&out), "");

    // A file says its size, so it is refused before it is read.
    let big = home.path().join("big");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(cap as u64 + 1)
        .unwrap();
    let mut cmd = home.cmd(&["run", "--", "wc", "-c"]);
    cmd.stdin(std::fs::File::open(&big).unwrap());
    let out = run_with_timeout(cmd, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("stdin: {} bytes, more than the 64Mi", cap + 1)),
        "{}",
        stderr(&out)
    );

    // Exactly the cap is accepted.
    let out = run_piped(&home, &["run", "--", "wc", "-c"], &vec![b'x'; cap]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out).trim(), cap.to_string());
}

#[test]
fn a_retried_task_reads_the_same_input_again() {
    let home = Home::new();
    // The first attempt reads its input and fails; the retry must see all of it again.
    let script =
        r#"read line; echo "attempt $DROVER_TASK_ATTEMPT: $line"; [ "$DROVER_TASK_ATTEMPT" != 0 ]"#;
    let out = run_piped(
        &home,
        &["run", "--retries", "1", "--", "sh", "-c", script],
        b"the input\n",
    );
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "attempt 0: the input\nattempt 1: the input\n",
        "stderr: {}",
        stderr(&out)
    );
}

#[test]
fn stdin_against_a_running_cluster_is_kept_with_the_job_and_removed_with_it() {
    let home = Home::new();
    let (mut up, _) = home.spawn(&["up", "--listen", "127.0.0.1:0"], "drover is up at");
    let out = run_piped(
        &home,
        &["run", "--name", "fed", "--", "cat"],
        b"kept with the job\n",
    );
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), "kept with the job\n");

    let shown = home.run(&["job", "status", "fed", "-o", "json"]);
    assert!(shown.status.success(), "{}", stderr(&shown));
    let view = json(&shown);
    let input = &view["job"]["spec"]["stdin"];
    let expected = drover_core::artifact::Digest::of(b"kept with the job\n");
    assert_eq!(input["blob"], expected.to_string(), "{view}");
    assert_eq!(input["size"], 18, "{view}");
    let stored = format!("controller/blobs/sha256/{}", expected.hex());
    assert!(
        find_file(home.path(), &stored).is_some(),
        "the input is not stored as the blob {stored}"
    );

    // Removing the job removes its input from the controller.
    let out = home.run(&["job", "rm", "fed"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        find_file(home.path(), &stored).is_none(),
        "the input outlived its job"
    );
    up.terminate();
}

/// A file under `dir` whose path ends with `tail`.
fn find_file(dir: &std::path::Path, tail: &str) -> Option<std::path::PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.ends_with(tail) {
            return Some(p);
        }
        if e.file_type().is_ok_and(|t| t.is_dir())
            && let Some(found) = find_file(&p, tail)
        {
            return Some(found);
        }
    }
    None
}

#[test]
fn piped_stdin_reaches_a_container() {
    let image = drover_testkit::images::busybox_image().unwrap();
    let home = Home::new();
    let out = run_piped(
        &home,
        &[
            "run",
            "--image",
            &image,
            "--",
            "/bin/sh",
            "-c",
            "wc -l; echo done",
        ],
        b"a\nb\nc\n",
    );
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert_eq!(
        stdout(&out).split_whitespace().collect::<Vec<_>>(),
        ["3", "done"]
    );
}
