//! The controller's connection limits, driven over real loopback sockets: clients that
//! trickle or withhold their headers are cut off at the header timeout, idle keep-alive
//! connections are closed, connections over the per-address cap are closed at once,
//! and none of this touches an agent's WebSocket or a log follower's stream.

use drover_testkit::{AgentOptions, ClusterOptions, TestCluster, wait_for};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A complete request that keeps its connection open afterwards.
const HEALTH: &[u8] = b"GET /health HTTP/1.1\r\nHost: drover\r\n\r\n";

fn host(url: &str) -> String {
    url.trim_start_matches("http://").to_string()
}

/// Reads until the server closes the connection, or fails the test after `limit`.
/// Returns what was read and how long the close took.
async fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, Duration) {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(limit.saturating_sub(start.elapsed()), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (got, start.elapsed()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!(
                "the connection was still open after {limit:?}; read so far: {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
}

/// Sends one request on an open connection and reads its answer's status line.
async fn status_of_request(s: &mut TcpStream) -> String {
    s.write_all(HEALTH).await.expect("sending a request");
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("an answer within 5s")
            .expect("reading the answer");
        assert!(
            n > 0,
            "closed before answering: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    text.lines().next().unwrap_or_default().to_string()
}

fn short_timeout(header_read_timeout: Duration) -> ClusterOptions {
    ClusterOptions {
        header_read_timeout,
        ..ClusterOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_trickling_its_headers_is_cut_off_at_the_header_timeout() {
    let timeout = Duration::from_secs(1);
    let c = TestCluster::start_with(short_timeout(timeout))
        .await
        .unwrap();
    let s = TcpStream::connect(host(&c.url)).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let start = Instant::now();
    wr.write_all(b"GET /health HTTP/1.1\r\nHost: dr")
        .await
        .unwrap();
    // One more header line every 200 ms, each arriving well within any per-read
    // timeout: only a limit on the whole header block stops this client.
    let trickle = tokio::spawn(async move {
        for i in 0..50 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if wr
                .write_all(format!("over\r\nX-Slow-{i}: dr").as_bytes())
                .await
                .is_err()
            {
                return i;
            }
        }
        50
    });
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(Duration::from_secs(5), rd.read(&mut buf)).await;
    let elapsed = start.elapsed();
    trickle.abort();
    match closed {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!(
            "expected the connection closed, got an answer: {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(_) => panic!("a client trickling its headers was still connected after 5s"),
    }
    assert!(
        elapsed >= timeout - Duration::from_millis(100) && elapsed < timeout * 3,
        "closed after {elapsed:?}; the header timeout is {timeout:?}"
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_idle_keep_alive_connections_are_closed_at_the_timeout() {
    let timeout = Duration::from_secs(1);
    let c = TestCluster::start_with(short_timeout(timeout))
        .await
        .unwrap();
    // A connection that never says anything.
    let mut silent = TcpStream::connect(host(&c.url)).await.unwrap();
    // One that makes a request, gets its answer and then keeps the connection idle.
    let mut idle = TcpStream::connect(host(&c.url)).await.unwrap();
    let status = status_of_request(&mut idle).await;
    assert!(status.contains("200"), "{status}");
    let (got, after) = read_until_closed(&mut silent, timeout * 3).await;
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    assert!(after >= timeout - Duration::from_millis(100), "{after:?}");
    let (got, _) = read_until_closed(&mut idle, timeout * 3).await;
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_per_address_cap_are_closed_at_once() {
    let cap = 8;
    let c = TestCluster::start_with(ClusterOptions {
        max_connections_per_ip: cap,
        // Long enough that no connection here is closed for idling.
        header_read_timeout: Duration::from_secs(60),
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    let addr = host(&c.url);
    let mut held = Vec::new();
    for _ in 0..cap {
        held.push(TcpStream::connect(&addr).await.unwrap());
    }
    // The kernel completes the handshake before the server accepts, so connecting
    // succeeds; the server then closes the connection without a word.
    for _ in 0..3 {
        let mut excess = TcpStream::connect(&addr).await.unwrap();
        let (got, after) = read_until_closed(&mut excess, Duration::from_secs(2)).await;
        assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
        assert!(
            after < Duration::from_secs(1),
            "closed only after {after:?}"
        );
    }
    // The connections held within the cap were untouched and still answer.
    for s in &mut held {
        let status = status_of_request(s).await;
        assert!(status.contains("200"), "{status}");
    }
    // Once some close, their places are free again for new ones.
    held.truncate(cap - 3);
    let api = c.api();
    wait_for(
        "a freed place to take a new request",
        Duration::from_secs(5),
        async || {
            let Ok(mut s) = TcpStream::connect(&addr).await else {
                return false;
            };
            s.write_all(HEALTH).await.is_ok() && {
                let mut buf = [0u8; 64];
                matches!(
                    tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await,
                    Ok(Ok(n)) if n > 0 && buf[..n].starts_with(b"HTTP/1.1 200")
                )
            }
        },
    )
    .await
    .unwrap();
    // At least the three above; a retry of the wait may have been early too.
    let metrics = api.metrics().await.unwrap();
    let refused: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("drover_http_connections_refused_total{reason=\"per_ip\"} "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no per_ip refusal count in {metrics}"));
    assert!(refused >= 3, "{refused} refused");
    drop(held);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_and_a_log_follower_outlive_the_idle_timeout() {
    let timeout = Duration::from_millis(500);
    let c = TestCluster::start_with(short_timeout(timeout))
        .await
        .unwrap();
    let api = c.api();
    let agent = c.agent(AgentOptions::named("steady")).await.unwrap();
    wait_for(
        "the agent to connect",
        Duration::from_secs(10),
        async || c.controller.connected_agents() == 1,
    )
    .await
    .unwrap();
    api.apply_yaml(
        "name: ticker\nkind: service\ncommand: [sh, -c, 'while true; do echo tick; sleep 0.2; done']\n",
    )
    .await
    .unwrap();
    // Follow the job's output for six header timeouts: the answer is one long body,
    // which the timeout must not cut.
    let resp = reqwest::Client::new()
        .get(format!("{}/v1/jobs/ticker/logs?follow=true", c.url))
        .bearer_auth(&api.token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let start = Instant::now();
    let mut ticks = 0usize;
    let mut ticks_late = 0usize;
    while start.elapsed() < timeout * 6 {
        use futures_util::StreamExt;
        let chunk = tokio::time::timeout(Duration::from_secs(5), body.next())
            .await
            .expect("the follow stream went silent for 5s");
        let chunk = chunk
            .unwrap_or_else(|| panic!("the follow stream ended after {:?}", start.elapsed()))
            .expect("reading the follow stream");
        let n = String::from_utf8_lossy(&chunk).matches("tick").count();
        ticks += n;
        if start.elapsed() > timeout * 4 {
            ticks_late += n;
        }
    }
    assert!(
        ticks > 0 && ticks_late > 0,
        "{ticks} ticks, {ticks_late} late"
    );
    // The agent's WebSocket stayed the one it opened: a reconnect would count a session.
    assert!(agent.is_connected());
    let metrics = api.metrics().await.unwrap();
    assert!(
        metrics.contains("drover_agent_sessions_total 1\n"),
        "the agent reconnected: {metrics}"
    );
    api.stop("ticker").await.unwrap();
    agent.shutdown().await;
    c.stop().await;
}
