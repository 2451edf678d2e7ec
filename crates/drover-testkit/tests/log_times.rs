//! The times of task output through the API: chunks an agent stamps keep the agent's
//! time (held to the controller's clock), an older agent's are stamped on arrival,
//! replays add no time, and the log streams' `since` and `timestamps` parameters start
//! and split the output by those times, with errors naming a wrong parameter.

use drover_core::logtime::{format_rfc3339_millis, parse_rfc3339};
use drover_core::protocol::{AgentMessage, LogChunk, LogStream};
use drover_core::{Millis, TaskId, TaskState, now_millis};
use drover_testkit::fake_agent::{FakeAgent, event};
use drover_testkit::{Api, TestCluster, wait_for};
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

fn chunk(task: &TaskId, offset: u64, data: &str, at: Option<Millis>) -> AgentMessage {
    AgentMessage::Log(LogChunk {
        task_id: task.clone(),
        stream: LogStream::Stdout,
        offset,
        data: data.as_bytes().to_vec(),
        at,
    })
}

/// The log events of a stream as (data, time) pairs, the time as the JSON had it.
async fn events(api: &Api, query: &str) -> Vec<(String, Option<String>)> {
    let (status, text) = api
        .raw(
            reqwest::Method::GET,
            &format!("/v1/jobs/ticks/logs?{query}"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{query}: {text}");
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["type"] == "log")
        .map(|v| {
            (
                v["data"].as_str().unwrap().to_string(),
                v["time"].as_str().map(str::to_string),
            )
        })
        .collect()
}

async fn text(api: &Api, query: &str) -> String {
    events(api, query).await.into_iter().map(|e| e.0).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_streams_start_at_a_time_and_carry_the_times_of_their_chunks() {
    let c = TestCluster::start().await.unwrap();
    let api = c.api();
    let mut a = FakeAgent::joined(&c.url).await;
    api.apply_yaml("name: ticks\nruntime: mock\n")
        .await
        .unwrap();
    let task = a.next_start().await;
    a.send(&event(1, &task, TaskState::Running, None)).await;

    let start = now_millis();
    let first = start - 120_000;
    let second = start - 60_000;
    a.send(&chunk(&task, 0, "first\n", Some(first))).await;
    a.send(&chunk(&task, 6, "second\n", Some(second))).await;
    // An older agent's chunk has no time: the controller's arrival time stands in.
    a.send(&chunk(&task, 13, "third\n", None)).await;
    // Chunks handled in one batch share the arrival time; these are apart.
    wait_for("the third chunk", T, async || {
        api.logs("ticks").await.is_ok_and(|l| l.contains("third"))
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    // An agent whose clock runs ahead is held to the controller's.
    a.send(&chunk(&task, 19, "fourth\n", Some(start + 3_600_000)))
        .await;
    // A replay, stamped anew, changes no time.
    a.send(&chunk(&task, 0, "first\n", Some(start))).await;
    wait_for("the output", T, async || {
        api.logs("ticks").await.is_ok_and(|l| l.contains("fourth"))
    })
    .await
    .unwrap();
    let end = now_millis();

    let timed = events(&api, "timestamps=true").await;
    let data: Vec<&str> = timed.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(
        data,
        ["first\n", "second\n", "third\n", "fourth\n"],
        "{timed:?}"
    );
    let times: Vec<Millis> = timed
        .iter()
        .map(|e| parse_rfc3339(e.1.as_deref().expect("a time")).unwrap())
        .collect();
    assert_eq!(times[0], first);
    assert_eq!(times[1], second);
    for t in &times[2..] {
        assert!((start..=end).contains(t), "{t} not in {start}..={end}");
    }
    assert_eq!(
        timed[0].1.as_deref(),
        Some(format_rfc3339_millis(first).as_str())
    );

    // A client that asks for neither gets what it always did: the output whole, in
    // one event, with no time.
    let plain = events(&api, "").await;
    assert_eq!(plain.len(), 1, "{plain:?}");
    assert_eq!(plain[0], ("first\nsecond\nthird\nfourth\n".into(), None));

    // `since` as a time, and as a duration before now by the controller's clock.
    let between = format_rfc3339_millis(first + 1);
    assert_eq!(
        text(&api, &format!("since={between}")).await,
        "second\nthird\nfourth\n"
    );
    assert_eq!(text(&api, "since=90s").await, "second\nthird\nfourth\n");
    assert_eq!(text(&api, "since=30000ms").await, "third\nfourth\n");
    assert_eq!(
        text(
            &api,
            &format!("since={}", format_rfc3339_millis(end + 60_000))
        )
        .await,
        ""
    );
    // With `tail`, the last lines of what is after `since`.
    assert_eq!(
        text(&api, &format!("since={between}&tail=2")).await,
        "third\nfourth\n"
    );
    assert_eq!(
        text(&api, "since=90s&tail=5").await,
        "second\nthird\nfourth\n"
    );
    // A time with an offset, its `+` escaped as a client must.
    let with_offset = between.replace('Z', "%2B00:00");
    assert_eq!(
        text(&api, &format!("since={with_offset}")).await,
        "second\nthird\nfourth\n"
    );

    // Wrong values are refused, naming the parameter.
    for (query, name) in [
        ("since=yesterday", "since:"),
        ("since=2026-13-01T00:00:00Z", "since:"),
        ("timestamps=maybe", "timestamps"),
        ("tail=some", "tail"),
    ] {
        let (status, body) = api
            .raw(
                reqwest::Method::GET,
                &format!("/v1/jobs/ticks/logs?{query}"),
                None,
            )
            .await
            .unwrap();
        assert_eq!(status, 400, "{query}: {body}");
        assert!(body.contains(name), "{query}: {body}");
    }
    let (_, body) = api
        .raw(reqwest::Method::GET, "/v1/jobs/ticks/logs?since=x", None)
        .await
        .unwrap();
    assert!(
        body.contains("a duration like 10m") && body.contains("RFC 3339"),
        "{body}"
    );

    // Following from a time later than all stored output: output that comes later but
    // was read earlier (an agent whose clock is behind) is still skipped, and what is
    // read after the time is shown.
    let since = format_rfc3339_millis(now_millis());
    let follow = {
        let api = api.clone();
        tokio::spawn(async move { text(&api, &format!("follow=true&since={since}")).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.send(&chunk(&task, 26, "late but old\n", Some(first + 5)))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.send(&chunk(&task, 39, "new\n", None)).await;
    a.send(&event(2, &task, TaskState::Succeeded, Some(0)))
        .await;
    let followed = tokio::time::timeout(T, follow).await.unwrap().unwrap();
    assert_eq!(followed, "new\n");
}
