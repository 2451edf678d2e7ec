//! Artifacts and their blobs through the HTTP API: verified, streamed, deduplicated
//! uploads, immutable versions, and blobs collected once no artifact needs them.

use drover_testkit::{Api, ClusterOptions, JOIN_TOKEN, TestCluster, digest_of, wait_for};
use reqwest::Method;
use serde_json::{Value, json};
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

/// Deterministic bytes that do not compress or repeat in any useful way.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn error_of(body: &str) -> (String, String) {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    (
        v["code"].as_str().unwrap_or_default().to_string(),
        v["error"].as_str().unwrap_or_default().to_string(),
    )
}

/// Uploads `data` and returns its digest.
async fn upload(api: &Api, data: &[u8]) -> String {
    let d = digest_of(data);
    let (status, body) = api.put_blob(&d, data.to_vec()).await.unwrap();
    assert!(status == 201 || status == 200, "PUT {d}: {status} {body}");
    d
}

fn new_artifact(name: &str, version: &str, variants: &[(&str, &str, usize)]) -> Value {
    let variants: Vec<Value> = variants
        .iter()
        .map(|(platform, digest, size)| json!({"platform": platform, "digest": digest, "size": size}))
        .collect();
    json!({"name": name, "version": version, "variants": variants})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_mib_blob_round_trips_and_a_second_upload_is_deduplicated() {
    let c = TestCluster::start().await.unwrap();
    let api = c.api();
    let data = noise(5 << 20, 1);
    let d = digest_of(&data);
    assert_eq!(api.head_blob(&d).await.unwrap().0, 404);
    // Clients learn the size limit before they send anything.
    let resp = reqwest::Client::new()
        .head(format!("{}/v1/blobs/{d}", c.url))
        .bearer_auth(&api.token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.headers()[drover_core::api::MAX_BLOB_SIZE_HEADER],
        (2u64 << 30).to_string().as_str()
    );

    let (status, body) = api.put_blob(&d, data.clone()).await.unwrap();
    assert_eq!(status, 201, "{body}");
    let info: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["digest"], d.as_str());
    assert_eq!(info["size"], data.len());
    assert_eq!(info["created"], true);

    assert_eq!(
        api.head_blob(&d).await.unwrap(),
        (200, Some(data.len() as u64))
    );
    let (status, got) = api.get_blob(&d).await.unwrap();
    assert_eq!(status, 200);
    assert!(got == data, "the downloaded blob differs from the upload");

    // Uploading the same digest again succeeds without rewriting.
    let (status, body) = api.put_blob(&d, data.clone()).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let info: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["created"], false);
    assert_eq!(
        c.blob_files().unwrap(),
        vec![d["sha256:".len()..].to_string()]
    );

    // Agents download with their join token; they may not upload or see artifacts.
    let agent = Api::new(&c.url, JOIN_TOKEN);
    let (status, got) = agent.get_blob(&d).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(got.len(), data.len());
    assert_eq!(agent.head_blob(&d).await.unwrap().0, 200);
    // (A small body: a server refusing an upload without reading it closes the
    // connection, and a client still sending a large one may see the reset first.)
    assert_eq!(agent.put_blob(&d, Vec::new()).await.unwrap().0, 403);
    let (status, _) = agent.raw(Method::GET, "/v1/artifacts", None).await.unwrap();
    assert_eq!(status, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_or_broken_upload_leaves_nothing_visible() {
    let c = TestCluster::start().await.unwrap();
    let api = c.api();
    let data = noise(3 << 20, 2);
    let d = digest_of(&data);

    let mut tampered = data.clone();
    tampered[1 << 20] ^= 1;
    let (status, body) = api.put_blob(&d, tampered).await.unwrap();
    assert_eq!(status, 400, "{body}");
    let (code, msg) = error_of(&body);
    assert_eq!(code, "digest_mismatch");
    assert!(
        msg.contains(&d) && msg.contains("nothing was stored"),
        "{msg}"
    );
    assert_eq!(api.head_blob(&d).await.unwrap().0, 404);
    assert_eq!(c.blob_files().unwrap(), Vec::<String>::new());

    // A connection that breaks off part-way: the client's body stream fails after 1 MiB.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![
        Ok(data[..1 << 20].to_vec()),
        Err(std::io::Error::other("the client gave up")),
    ];
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    // The client sees a broken request, or the server's refusal if it answered first.
    if let Ok((status, text)) = api.put_blob_body(&d, body).await {
        assert!(status >= 400, "{status} {text}");
    }
    wait_for("the unfinished upload to be removed", T, async || {
        c.blob_files().unwrap().is_empty()
    })
    .await
    .unwrap();
    assert_eq!(api.head_blob(&d).await.unwrap().0, 404);

    // A malformed digest is refused before anything is read.
    let (status, body) = api.put_blob("sha256:abc", b"x".to_vec()).await.unwrap();
    assert_eq!(status, 400, "{body}");
    assert_eq!(error_of(&body).0, "invalid_digest");

    // The complete, correct upload still works afterwards.
    assert_eq!(api.put_blob(&d, data).await.unwrap().0, 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifacts_need_their_blobs_and_versions_are_immutable() {
    let c = TestCluster::start().await.unwrap();
    let api = c.api();
    let bin = noise(100_000, 3);
    let script = b"#!/bin/sh\necho hi\n".to_vec();
    let bin_d = upload(&api, &bin).await;
    let script_d = digest_of(&script);

    // The script's blob is not uploaded yet: the error names that variant.
    let body = new_artifact(
        "app",
        "1.0",
        &[
            ("linux/amd64+gnu", &bin_d, bin.len()),
            ("any", &script_d, script.len()),
        ],
    );
    let (status, text) = api.create_artifact(&body).await.unwrap();
    assert_eq!(status, 400, "{text}");
    let (code, msg) = error_of(&text);
    assert_eq!(code, "missing_blob");
    assert!(
        msg.contains("variants[1] (any)") && msg.contains(&script_d),
        "{msg}"
    );
    assert!(!msg.contains("variants[0]"), "{msg}");

    upload(&api, &script).await;
    let (status, text) = api.create_artifact(&body).await.unwrap();
    assert_eq!(status, 201, "{text}");
    let created: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(created["name"], "app");
    assert_eq!(created["version"], "1.0");
    assert_eq!(created["project"], "default");
    assert_eq!(created["variants"][0]["platform"], "linux/amd64+gnu");

    // The same version again is a conflict, whatever it holds.
    let other = new_artifact("app", "1.0", &[("any", &script_d, script.len())]);
    let (status, text) = api.create_artifact(&other).await.unwrap();
    assert_eq!(status, 409, "{text}");
    let (code, msg) = error_of(&text);
    assert_eq!(code, "exists");
    assert!(msg.contains("app:1.0 already exists"), "{msg}");

    // A size that is not the blob's, a platform offered twice, a bad name, bad JSON.
    for (body, needle) in [
        (
            new_artifact("app", "2", &[("any", &script_d, 5)]),
            "is 18 bytes, not 5",
        ),
        (
            new_artifact(
                "app",
                "2",
                &[("any", &script_d, script.len()), ("any", &bin_d, bin.len())],
            ),
            "variants[1].platform: any is offered twice",
        ),
        (
            new_artifact("../app", "2", &[("any", &script_d, script.len())]),
            "name and version are 1-128",
        ),
        (
            json!({"name": "app", "version": "2", "variants": [{"platform": "linux/amd65", "digest": script_d, "size": 18}]}),
            "amd65",
        ),
        (json!({"name": "app"}), "missing field"),
    ] {
        let (status, text) = api.create_artifact(&body).await.unwrap();
        assert_eq!(status, 400, "{body}: {text}");
        let (_, msg) = error_of(&text);
        assert!(msg.contains(needle), "{body}: {msg}");
    }

    // Listing and showing; an unknown version is 404.
    let (status, text) = api.raw(Method::GET, "/v1/artifacts", None).await.unwrap();
    assert_eq!(status, 200, "{text}");
    let list: Vec<Value> = serde_json::from_str(&text).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0], created);
    let (status, text) = api
        .raw(Method::GET, "/v1/artifacts/app/1.0", None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{text}");
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), created);
    let (status, text) = api
        .raw(Method::GET, "/v1/artifacts/app/9", None)
        .await
        .unwrap();
    assert_eq!(status, 404, "{text}");
    assert_eq!(error_of(&text).0, "not_found");

    // Artifacts survive a controller restart.
    let dir = c.stop().await;
    let c = TestCluster::start_in(dir, ClusterOptions::default(), "127.0.0.1:0")
        .await
        .unwrap();
    let (status, text) = c
        .api()
        .raw(Method::GET, "/v1/artifacts/app/1.0", None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{text}");
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), created);
    let (status, text) = c.api().create_artifact(&body).await.unwrap();
    assert_eq!(status, 409, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_artifact_collects_the_blobs_only_it_used() {
    let c = TestCluster::start().await.unwrap();
    let api = c.api();
    let only_a = noise(2 << 20, 4);
    let shared = noise(1 << 20, 5);
    let in_progress = noise(1000, 6);
    let only_a_d = upload(&api, &only_a).await;
    let shared_d = upload(&api, &shared).await;
    let (status, text) = api
        .create_artifact(&new_artifact(
            "a",
            "1",
            &[
                ("linux/amd64", &only_a_d, only_a.len()),
                ("linux/arm64", &shared_d, shared.len()),
            ],
        ))
        .await
        .unwrap();
    assert_eq!(status, 201, "{text}");
    let (status, text) = api
        .create_artifact(&new_artifact(
            "b",
            "1",
            &[("linux/arm64", &shared_d, shared.len())],
        ))
        .await
        .unwrap();
    assert_eq!(status, 201, "{text}");
    // A blob uploaded for a push whose artifact is not created yet.
    let in_progress_d = upload(&api, &in_progress).await;

    // An artifact an unfinished job uses cannot be deleted.
    api.apply_yaml("name: uses-a\nartifact: a:1\n")
        .await
        .unwrap();
    let (status, text) = api
        .raw(Method::DELETE, "/v1/artifacts/a/1", None)
        .await
        .unwrap();
    assert_eq!(status, 409, "{text}");
    let (code, msg) = error_of(&text);
    assert_eq!(code, "in_use");
    assert!(msg.contains("uses-a"), "{msg}");
    api.stop("uses-a").await.unwrap();
    api.wait_final("uses-a", T).await.unwrap();

    let (status, text) = api
        .raw(Method::DELETE, "/v1/artifacts/a/1", None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{text}");
    let (status, _) = api
        .raw(Method::GET, "/v1/artifacts/a/1", None)
        .await
        .unwrap();
    assert_eq!(status, 404);
    assert_eq!(api.head_blob(&only_a_d).await.unwrap().0, 404);
    assert_eq!(api.head_blob(&shared_d).await.unwrap().0, 200);
    assert_eq!(api.head_blob(&in_progress_d).await.unwrap().0, 200);

    let (status, text) = api
        .raw(Method::DELETE, "/v1/artifacts/b/1", None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{text}");
    assert_eq!(api.head_blob(&shared_d).await.unwrap().0, 404);
    // Still within its grace period: the push may yet create its artifact.
    assert_eq!(api.head_blob(&in_progress_d).await.unwrap().0, 200);
    assert_eq!(
        c.blob_files().unwrap(),
        vec![in_progress_d["sha256:".len()..].to_string()]
    );

    // Deleting it again is 404.
    let (status, _) = api
        .raw(Method::DELETE, "/v1/artifacts/b/1", None)
        .await
        .unwrap();
    assert_eq!(status, 404);
}
