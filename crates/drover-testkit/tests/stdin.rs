//! A job's `stdin`: a blob of the job's project, checked at apply, given only to
//! nodes whose agent hands it to the task, and read by the task as its standard input.

use drover_core::api::JobState;
use drover_core::auth::Role;
use drover_core::protocol::{ControllerMessage, PROTOCOL_VERSION};
use drover_core::spec::{MAX_STDIN_BYTES, RuntimeKind};
use drover_testkit::fake_agent::FakeAgent;
use drover_testkit::{AgentOptions, Api, JOIN_TOKEN, TestCluster, digest_of};
use reqwest::Method;
use serde_json::{Value, json};
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

fn error_of(body: &str) -> (String, String) {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    (
        v["code"].as_str().unwrap_or_default().to_string(),
        v["error"].as_str().unwrap_or_default().to_string(),
    )
}

/// Applies a process job `name` running `command` with `stdin` as given.
async fn apply(api: &Api, name: &str, command: &[&str], stdin: Value) -> (u16, String) {
    apply_spec(
        api,
        json!({ "name": name, "command": command, "stdin": stdin, "restart": { "attempts": 0 } }),
    )
    .await
}

async fn apply_spec(api: &Api, spec: Value) -> (u16, String) {
    api.raw(
        Method::POST,
        "/v1/jobs",
        Some(spec.to_string().into_bytes()),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_is_a_blob_of_the_jobs_project_checked_at_apply() {
    let c = TestCluster::start().await.unwrap();
    let admin = c.api();
    admin.create_project("alpha").await.unwrap();
    admin.create_project("beta").await.unwrap();
    let alpha = Api::new(
        &c.url,
        &admin
            .create_token("alpha", Role::Write)
            .await
            .unwrap()
            .token,
    );
    let beta = Api::new(
        &c.url,
        &admin.create_token("beta", Role::Write).await.unwrap().token,
    );
    let input = b"alpha's secret input\n".to_vec();
    let d = digest_of(&input);
    let (status, text) = alpha.put_blob(&d, input.clone()).await.unwrap();
    assert!((200..300).contains(&status), "{status} {text}");
    let stdin = json!({ "blob": d, "size": input.len() });
    let (status, text) = apply(&alpha, "fed", &["cat"], stdin.clone()).await;
    assert_eq!(status, 201, "{text}");

    // Another project can neither read the input nor name it in a job of its own.
    assert_eq!(beta.get_blob(&d).await.unwrap().0, 404);
    let (status, text) = apply(&beta, "fed", &["cat"], stdin.clone()).await;
    assert_eq!(status, 400, "{text}");
    let (code, msg) = error_of(&text);
    assert_eq!(code, "missing_blob", "{msg}");
    assert!(
        msg.contains("stdin.blob") && msg.contains("has not been uploaded"),
        "{msg}"
    );

    // A size other than the blob's is refused at once, not by every node later.
    let (status, text) = apply(
        &alpha,
        "wrong-size",
        &["cat"],
        json!({ "blob": d, "size": input.len() + 1 }),
    )
    .await;
    assert_eq!(status, 400, "{text}");
    let (code, msg) = error_of(&text);
    assert_eq!(code, "invalid_spec", "{msg}");
    assert!(
        msg.contains(&format!(
            "stdin.size: blob {d} has {} bytes, not {}",
            input.len(),
            input.len() + 1
        )),
        "{msg}"
    );

    for (size, name) in [(0, "empty"), (MAX_STDIN_BYTES + 1, "huge")] {
        let (status, text) =
            apply(&alpha, name, &["cat"], json!({ "blob": d, "size": size })).await;
        assert_eq!(status, 400, "{text}");
        let (_, msg) = error_of(&text);
        assert!(
            msg.contains("stdin.size: expected 1 to 67108864 bytes (64Mi)"),
            "{msg}"
        );
    }
    let (status, text) = apply_spec(
        &alpha,
        json!({ "name": "mocked", "runtime": "mock", "stdin": stdin }),
    )
    .await;
    assert_eq!(status, 400, "{text}");
    assert!(error_of(&text).1.contains("stdin: runtime mock"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_waits_for_a_node_that_gives_it_and_the_task_reads_it() {
    let c = TestCluster::start().await.unwrap();
    let api = c.api();
    // A node whose agent predates `stdin` (it reports no `process.stdin`): the job must
    // not go there, where its task would read /dev/null instead.
    let mut old = FakeAgent::connect(&c.url, JOIN_TOKEN).await.unwrap();
    old.send(&FakeAgent::hello_as(
        PROTOCOL_VERSION,
        "linux/amd64",
        RuntimeKind::Process,
    ))
    .await;
    assert!(matches!(
        old.recv().await,
        Some(ControllerMessage::Welcome { .. })
    ));
    let input = b"line one\nline two\n\0binary tail".to_vec();
    let d = digest_of(&input);
    api.put_blob(&d, input.clone()).await.unwrap();
    let (status, text) = apply(
        &api,
        "fed",
        &["od", "-An", "-c"],
        json!({ "blob": d, "size": input.len() }),
    )
    .await;
    assert_eq!(status, 201, "{text}");
    let (job, _) = api
        .wait_job("fed", T, |j, _| j.pending_reason.is_some())
        .await
        .unwrap();
    let reason = job.pending_reason.unwrap_or_default();
    assert!(
        reason.contains("1 node cannot give runtime process's tasks their stdin"),
        "{reason}"
    );
    assert_eq!(job.state, Some(JobState::Blocked), "{reason}");

    // A current agent joins: the task is placed there and reads the input.
    let _agent = c.agent(AgentOptions::named("current")).await.unwrap();
    let (job, _) = api.wait_final("fed", T).await.unwrap();
    assert_eq!(job.job.status.to_string(), "complete", "{:?}", job.job);
    let logs = api.logs("fed").await.unwrap();
    let expected = String::from_utf8(
        std::process::Command::new("od")
            .args(["-An", "-c"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                child.stdin.take().unwrap().write_all(&input)?;
                child.wait_with_output()
            })
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert_eq!(logs, expected);
}
