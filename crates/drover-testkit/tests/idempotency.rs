//! Submissions that are safe to repeat: a request retried with its idempotency key is
//! carried out once, across a controller restart too, and a finished job runs again
//! only when asked to.

use drover_core::auth::Role;
use drover_core::state::JobStatus;
use drover_testkit::{ADMIN_TOKEN, AgentOptions, ClusterOptions, TestCluster};
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

/// A submission as raw HTTP: (status, body as JSON).
async fn submit(
    url: &str,
    token: &str,
    key: Option<&str>,
    query: &str,
    spec: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let mut req = reqwest::Client::new()
        .post(format!("{url}/v1/jobs{query}"))
        .bearer_auth(token)
        .json(spec);
    if let Some(k) = key {
        req = req.header("Idempotency-Key", k);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

/// A batch job that appends a line to `runs` each time one of its tasks runs.
fn counting_job(name: &str, runs: &std::path::Path) -> serde_json::Value {
    serde_json::json!({
        "name": name,
        "command": ["sh", "-c", format!("echo run >> {}", runs.display())],
    })
}

/// A file that tasks, which may run as users of their own, can append to.
fn runs_file(c: &TestCluster) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let runs = c.dir.path().join("runs");
    std::fs::write(&runs, "").unwrap();
    std::fs::set_permissions(&runs, std::fs::Permissions::from_mode(0o666)).unwrap();
    runs
}

fn runs_of(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_submission_runs_once_even_across_a_controller_restart() {
    let c = TestCluster::start().await.unwrap();
    let _agent = c.agent(AgentOptions::named("n1")).await.unwrap();
    let runs = runs_file(&c);
    let spec = counting_job("once", &runs);

    let (status, first) = submit(&c.url, ADMIN_TOKEN, Some("key-1"), "", &spec).await;
    assert_eq!(status, 201, "{first}");
    assert!(first["job"]["id"].is_string(), "{first}");
    c.api().wait_final("once", T).await.unwrap();
    // The answer was lost, say: the client sends the same request again.
    let (status, again) = submit(&c.url, ADMIN_TOKEN, Some("key-1"), "", &spec).await;
    assert_eq!(status, 201, "{again}");
    assert_eq!(again["result"], "created");
    assert_eq!(
        again["job"]["id"], first["job"]["id"],
        "the first answer again: {again}"
    );

    // The key is kept with the job, so a restarted controller still knows it.
    let dir = c.stop().await;
    let c = TestCluster::start_in(dir, ClusterOptions::default(), "127.0.0.1:0")
        .await
        .unwrap();
    let _agent = c.agent(AgentOptions::named("n1")).await.unwrap();
    let (status, after) = submit(&c.url, ADMIN_TOKEN, Some("key-1"), "", &spec).await;
    assert_eq!(status, 201, "{after}");
    assert_eq!(after["job"]["id"], first["job"]["id"], "{after}");
    assert_eq!(after["job"]["version"], 1);

    // The same key for another request is a mistake, and is refused.
    let mut other = spec.clone();
    other["command"] = serde_json::json!(["true"]);
    let (status, err) = submit(&c.url, ADMIN_TOKEN, Some("key-1"), "", &other).await;
    assert_eq!(status, 422, "{err}");
    assert_eq!(err["code"], "idempotency_key_reused");
    // A key must be something a header can carry sensibly.
    let long = "k".repeat(300);
    let (status, err) = submit(&c.url, ADMIN_TOKEN, Some(&long), "", &spec).await;
    assert_eq!(status, 400, "{err}");
    assert!(
        err["error"].as_str().unwrap().contains("idempotency-key"),
        "{err}"
    );

    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(runs_of(&runs), 1, "the job ran once");
    let job = c.api().job("once").await.unwrap();
    assert_eq!(job.job.version, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_finished_job_runs_again_only_when_asked_and_keys_are_per_project() {
    let c = TestCluster::start().await.unwrap();
    let _agent = c.agent(AgentOptions::named("n1")).await.unwrap();
    let api = c.api();
    let runs = runs_file(&c);
    let spec = counting_job("nightly", &runs);
    let (status, _) = submit(&c.url, ADMIN_TOKEN, None, "", &spec).await;
    assert_eq!(status, 201);
    let (job, _) = api.wait_final("nightly", T).await.unwrap();
    assert_eq!(job.job.status, JobStatus::Complete);

    // Resubmitting the same spec changes nothing, even though the job has finished.
    let (status, same) = submit(&c.url, ADMIN_TOKEN, None, "", &spec).await;
    assert_eq!(status, 200, "{same}");
    assert_eq!(same["result"], "unchanged");
    assert_eq!(same["job"]["version"], 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(runs_of(&runs), 1);

    // A rerun is explicit.
    let (status, rerun) = submit(&c.url, ADMIN_TOKEN, None, "?rerun=true", &spec).await;
    assert_eq!(status, 200, "{rerun}");
    assert_eq!(rerun["result"], "updated");
    assert_eq!(rerun["job"]["version"], 2);
    api.wait_job("nightly", T, |j, _| j.job.status == JobStatus::Complete)
        .await
        .unwrap();
    assert_eq!(runs_of(&runs), 2);
    let (status, err) = submit(&c.url, ADMIN_TOKEN, None, "?rerun=maybe", &spec).await;
    assert_eq!(status, 400, "{err}");

    // Two projects may use the same key without meeting.
    api.create_project("beta").await.unwrap();
    let beta = api.create_token("beta", Role::Write).await.unwrap().token;
    let (status, a) = submit(
        &c.url,
        ADMIN_TOKEN,
        Some("shared"),
        "",
        &counting_job("k1", &runs),
    )
    .await;
    assert_eq!(status, 201, "{a}");
    let (status, b) = submit(
        &c.url,
        &beta,
        Some("shared"),
        "",
        &counting_job("k2", &runs),
    )
    .await;
    assert_eq!(status, 201, "{b}");
    assert_ne!(a["job"]["id"], b["job"]["id"]);
    assert_eq!(b["job"]["project"], "beta");
}
