//! Jobs that run artifacts: each node gets the variant that runs there, from its cache,
//! or the job waits with a reason that says why no node can run it.

use drover_core::TaskState;
use drover_core::state::JobStatus;
use drover_testkit::{AgentOptions, TestCluster};
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

/// A static amd64 ELF with its machine field changed to arm64: a file this node must
/// refuse to run, found by its header.
fn arm64_elf() -> Vec<u8> {
    let mut bytes = std::fs::read("/bin/busybox").expect("the static busybox (busybox-static)");
    bytes[18..20].copy_from_slice(&183u16.to_le_bytes());
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_the_variant_for_their_node_from_the_cache_or_wait_with_a_reason() {
    let c = TestCluster::start().await.unwrap();
    let agent = c.agent(AgentOptions::named("n1")).await.unwrap();
    let api = c.api();
    let script = b"#!/bin/sh\necho \"hello from $(basename $DROVER_ARTIFACT) arg=$1\"\n".to_vec();
    api.push_artifact("hello", &[("any", script.as_slice())])
        .await
        .unwrap();

    // With no command the artifact itself runs; with one, the command can call it.
    api.apply_yaml("name: run-it\ncount: 2\nartifact: hello:1\n")
        .await
        .unwrap();
    let (job, _) = api.wait_final("run-it", T).await.unwrap();
    assert_eq!(job.job.status, JobStatus::Complete, "{:?}", job.job);
    let logs = api.logs("run-it").await.unwrap();
    assert_eq!(logs.matches("hello from hello arg=").count(), 2, "{logs}");
    api.apply_yaml("name: call-it\nartifact: hello:1\ncommand: [./hello, x]\n")
        .await
        .unwrap();
    let (job, _) = api.wait_final("call-it", T).await.unwrap();
    assert_eq!(job.job.status, JobStatus::Complete, "{:?}", job.job);
    assert!(
        api.logs("call-it")
            .await
            .unwrap()
            .contains("hello from hello arg=x")
    );
    assert_eq!(
        agent.artifact_downloads(),
        1,
        "three tasks of one artifact, one download"
    );

    // The node's own build: /bin/true is a glibc amd64 executable.
    api.push_artifact(
        "native",
        &[(
            "linux/amd64+gnu",
            std::fs::read("/bin/true").unwrap().as_slice(),
        )],
    )
    .await
    .unwrap();
    api.apply_yaml("name: native\nartifact: native:1\nrestart: { attempts: 0 }\n")
        .await
        .unwrap();
    let (job, _) = api.wait_final("native", T).await.unwrap();
    assert_eq!(job.job.status, JobStatus::Complete, "{:?}", job.job);

    // Only a build for another machine waits with a reason: tests/api.rs, where a fake
    // darwin node can join.

    // A file whose header contradicts its declared platform fails with a clear reason
    // instead of "exec format error".
    api.push_artifact("liar", &[("linux/amd64", arm64_elf().as_slice())])
        .await
        .unwrap();
    api.apply_yaml("name: liar\nartifact: liar:1\nrestart: { attempts: 0 }\n")
        .await
        .unwrap();
    let (job, tasks) = api.wait_final("liar", T).await.unwrap();
    assert_eq!(job.job.status, JobStatus::Failed);
    assert_eq!(tasks[0].task.state, TaskState::Failed);
    assert!(
        tasks[0].task.reason.contains("built for linux/arm64"),
        "{}",
        tasks[0].task.reason
    );
}
