//! TLS between `drover server`, its agents and the CLI, through the built binary: the
//! server makes its certificate once and prints its fingerprint, an agent pinning that
//! fingerprint joins and runs work while one pinning another is turned away naming
//! both, and a client trusts the server through --ca or the pin, or is told how to.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Extracts the `https://...` URL from a line.
fn https_url_in(line: &str) -> String {
    let start = line.find("https://").expect("an https URL in the line");
    line[start..].split_whitespace().next().unwrap().to_string()
}

/// The first `sha256:` fingerprint in `text`.
fn fingerprint_in(text: &str) -> String {
    let start = text.find("sha256:").expect("a fingerprint in the text");
    text[start..start + 7 + 64].to_string()
}

/// A `drover server` serving TLS from `dir`, with its URL and printed fingerprint.
struct TlsServer {
    daemon: Daemon,
    url: String,
    fingerprint: String,
    dir: PathBuf,
}

impl TlsServer {
    fn start(home: &Home, dir: &Path, extra: &[&str]) -> TlsServer {
        let mut args = vec![
            "server",
            "--data-dir",
            dir.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        // The join instructions come after the address; they carry the fingerprint.
        let (daemon, _) = home.spawn(&args, "drover agent --server");
        let log = daemon.log();
        let listening = log
            .lines()
            .find(|l| l.contains("listening on"))
            .expect("a listening line")
            .to_string();
        TlsServer {
            url: https_url_in(&listening),
            fingerprint: fingerprint_in(&log),
            daemon,
            dir: dir.to_path_buf(),
        }
    }

    fn token(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name))
            .unwrap()
            .trim()
            .to_string()
    }

    /// A client command with the server and admin token in the environment.
    fn cli(&self, home: &Home, args: &[&str]) -> std::process::Output {
        let mut cmd = home.cmd(args);
        cmd.env("DROVER_SERVER", &self.url)
            .env("DROVER_TOKEN", self.token("admin-token"));
        run_with_timeout(cmd, Duration::from_secs(60))
    }

    fn agent(&self, home: &Home, name: &str, pin: &str, ready: &str) -> Daemon {
        let dir = home.path().join(format!("agent-{name}"));
        let mut cmd = home.cmd(&[
            "agent",
            "--server",
            &self.url,
            "--server-fingerprint",
            pin,
            "--join-token-file",
            self.dir.join("join-token").to_str().unwrap(),
            "--data-dir",
            dir.to_str().unwrap(),
            "--name",
            name,
        ]);
        cmd.env("DROVER_LOG", "info");
        spawn_cmd(cmd, ready).0
    }
}

#[test]
fn a_server_makes_its_certificate_once_and_an_agent_pinning_it_runs_work() {
    let home = Home::new();
    let dir = home.path().join("server");
    let mut server = TlsServer::start(&home, &dir, &[]);
    assert!(
        server.url.starts_with("https://127.0.0.1:"),
        "{}",
        server.url
    );
    let cert = dir.join("tls").join("cert.pem");
    let key = dir.join("tls").join("key.pem");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the key is its owner's only: {mode:o}");
    }
    // What the server printed is the certificate it keeps.
    let text = std::fs::read_to_string(&cert).unwrap();
    assert!(text.contains("BEGIN CERTIFICATE"), "{text}");

    let _agent = server.agent(&home, "pinned", &server.fingerprint, "connected to");
    let out = server.cli(
        &home,
        &[
            "--ca",
            cert.to_str().unwrap(),
            "run",
            "--",
            "sh",
            "-c",
            "echo hello over tls",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("hello over tls"), "{}", stdout(&out));
    // A local program goes up as an artifact, which the agent downloads over HTTPS
    // trusting the server by the same pin.
    let script = write(
        home.path(),
        "hello.sh",
        "#!/bin/sh\necho artifact over tls\n",
    );
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let out = server.cli(
        &home,
        &[
            "--ca",
            cert.to_str().unwrap(),
            "run",
            script.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("artifact over tls"),
        "{}",
        stdout(&out)
    );

    // A restart serves the same certificate: agents' pins stay good.
    server.daemon.terminate();
    let again = TlsServer::start(&home, &dir, &[]);
    assert_eq!(again.fingerprint, server.fingerprint);

    // A certificate given with --tls-cert and --tls-key is served as it is, and no other
    // is generated.
    drop(again);
    let other = home.path().join("other");
    let given = TlsServer::start(
        &home,
        &other,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    assert_eq!(given.fingerprint, server.fingerprint);
    assert!(!other.join("tls").exists());
}

#[test]
fn an_agent_pinning_another_fingerprint_is_refused_naming_both() {
    let home = Home::new();
    let server = TlsServer::start(&home, &home.path().join("server"), &[]);
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let agent = server.agent(&home, "impostor-pin", &wrong, "not the pinned");
    let log = agent.log();
    assert!(
        log.contains(&server.fingerprint) && log.contains(&wrong),
        "the refusal names what was presented and what was pinned:\n{log}"
    );
    let out = server.cli(
        &home,
        &[
            "--server-fingerprint",
            &server.fingerprint,
            "-o",
            "json",
            "node",
            "ls",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(json(&out), serde_json::json!([]), "no node joined");
}

#[test]
fn a_client_trusts_the_server_by_ca_or_pin_or_is_told_how() {
    let home = Home::new();
    let server = TlsServer::start(&home, &home.path().join("server"), &[]);
    let cert = server.dir.join("tls").join("cert.pem");

    let out = server.cli(&home, &["job", "ls"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("--ca") && err.contains("--server-fingerprint") && err.contains("not trusted"),
        "the error says how to trust the server: {err}"
    );

    let out = server.cli(&home, &["--ca", cert.to_str().unwrap(), "job", "ls"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let mut cmd = home.cmd(&["job", "ls"]);
    cmd.env("DROVER_SERVER", &server.url)
        .env("DROVER_TOKEN", server.token("admin-token"))
        .env("DROVER_SERVER_FINGERPRINT", &server.fingerprint);
    let out = run_with_timeout(cmd, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // A pin that is not a fingerprint is a usage error naming the flag.
    let out = server.cli(&home, &["--server-fingerprint", "abc", "job", "ls"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--server-fingerprint"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_client_that_never_starts_the_tls_handshake_is_closed_at_the_header_timeout() {
    use std::io::Read;
    let home = Home::new();
    let server = TlsServer::start(
        &home,
        &home.path().join("server"),
        &["--header-read-timeout", "1s"],
    );
    let addr = server.url.trim_start_matches("https://").to_string();
    let mut silent = std::net::TcpStream::connect(&addr).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let start = std::time::Instant::now();
    let mut buf = [0u8; 64];
    match silent.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!(
            "expected the connection closed, got {other:?} after {:?}",
            start.elapsed()
        ),
    }
    let after = start.elapsed();
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_secs(3),
        "closed after {after:?}; the timeout is 1s"
    );
}
