//! Explicit emulation: an agent told it can run linux/arm64 through qemu gets arm64-only
//! artifacts, but only when no node runs a build natively, and the task says it ran
//! under emulation.

use drover_core::state::JobStatus;
use drover_testkit::{AgentOptions, TestCluster};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

const HELLO_C: &str = r#"
#include <stdio.h>
int main(void) {
#if defined(__aarch64__)
    puts("arch=arm64");
#elif defined(__x86_64__)
    puts("arch=amd64");
#else
    puts("arch=other");
#endif
    return 0;
}
"#;

/// Whether a program is on `PATH`.
fn have(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

/// Compiles the hello program statically with `compiler` into `dir/out`.
fn compile(compiler: &str, dir: &Path, out: &str) -> Vec<u8> {
    let src = dir.join("hello.c");
    std::fs::write(&src, HELLO_C).unwrap();
    let bin: PathBuf = dir.join(out);
    let status = Command::new(compiler)
        .args(["-static", "-O1", "-o"])
        .arg(&bin)
        .arg(&src)
        .status()
        .unwrap();
    assert!(status.success(), "{compiler} failed");
    std::fs::read(bin).unwrap()
}

fn emulating(name: &str) -> AgentOptions {
    let mut opts = AgentOptions::named(name).label("kind", name);
    opts.emulate = vec![(
        "linux/arm64".parse().unwrap(),
        PathBuf::from("qemu-aarch64-static"),
    )];
    opts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arm64_builds_run_under_emulation_only_where_no_native_build_fits() {
    if std::env::consts::ARCH != "x86_64" {
        eprintln!("skipping: this test builds amd64 natively and emulates arm64");
        return;
    }
    let missing: Vec<&str> = ["gcc", "aarch64-linux-gnu-gcc", "qemu-aarch64-static"]
        .into_iter()
        .filter(|p| !have(p))
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "skipping: {} not installed (scripts/test.sh installs gcc-aarch64-linux-gnu and qemu-user-static)",
            missing.join(", ")
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let arm = compile("aarch64-linux-gnu-gcc", dir.path(), "hello-arm64");
    let amd = compile("gcc", dir.path(), "hello-amd64");

    let c = TestCluster::start().await.unwrap();
    let native = c
        .agent(AgentOptions::named("native").label("kind", "native"))
        .await
        .unwrap();
    let emu = c.agent(emulating("emu")).await.unwrap();
    let api = c.api();
    api.push_artifact("hello", &[("linux/arm64", &arm), ("linux/amd64", &amd)])
        .await
        .unwrap();
    // The same arm64 build as `hello`'s, so re-sending it must be answered cleanly.
    let arm_only = arm.clone();
    api.push_artifact("armonly", &[("linux/arm64", &arm_only)])
        .await
        .unwrap();

    // (a) The native node runs the amd64 build.
    api.apply_yaml(
        "name: on-native\nartifact: hello:1\nrestart: { attempts: 0 }\n\
         constraints: [{ key: label.kind, op: eq, value: native }]\n",
    )
    .await
    .unwrap();
    let (job, tasks) = api.wait_final("on-native", T).await.unwrap();
    assert_eq!(job.job.status, JobStatus::Complete, "{:?}", job.job);
    assert_eq!(tasks[0].task.node_id.as_ref(), Some(native.node_id()));
    let logs = api.logs("on-native").await.unwrap();
    assert!(logs.contains("arch=amd64"), "{logs}");

    // (b) Only an arm64 build: the emulating node runs it through qemu and says so.
    api.apply_yaml("name: arm\nartifact: armonly:1\nrestart: { attempts: 0 }\n")
        .await
        .unwrap();
    let (job, tasks) = api.wait_final("arm", T).await.unwrap();
    assert_eq!(job.job.status, JobStatus::Complete, "{:?}", job.job);
    assert_eq!(tasks[0].task.node_id.as_ref(), Some(emu.node_id()));
    let logs = api.logs("arm").await.unwrap();
    assert!(logs.contains("arch=arm64"), "{logs}");
    let reason = &tasks[0].task.reason;
    assert!(
        reason.contains("linux/arm64 under emulation (qemu-aarch64-static)"),
        "{reason}"
    );

    // A command that runs the artifact by name goes through the emulator too.
    api.apply_yaml(
        "name: arm-cmd\nartifact: armonly:1\ncommand: [./armonly, x]\nrestart: { attempts: 0 }\n",
    )
    .await
    .unwrap();
    let (job, _) = api.wait_final("arm-cmd", T).await.unwrap();
    assert_eq!(job.job.status, JobStatus::Complete, "{:?}", job.job);
    assert!(api.logs("arm-cmd").await.unwrap().contains("arch=arm64"));

    // A build nobody runs: the reason shows what the nodes emulate.
    // Bytes of its own, for the same reason.
    api.push_artifact("riscv", &[("linux/riscv64", b"#!/bin/false\n")])
        .await
        .unwrap();
    api.apply_yaml("name: riscv\nartifact: riscv:1\n")
        .await
        .unwrap();
    let (job, _) = api
        .wait_job("riscv", T, |j, _| j.pending_reason.is_some())
        .await
        .unwrap();
    let reason = job.pending_reason.unwrap();
    assert!(reason.contains("(emulates linux/arm64)"), "{reason}");
    native.shutdown().await;
    emu.shutdown().await;

    // (c) With only a native node, the arm64-only artifact waits and says why.
    let c = TestCluster::start().await.unwrap();
    let native = c.agent(AgentOptions::named("native")).await.unwrap();
    let api = c.api();
    api.push_artifact("armonly", &[("linux/arm64", &arm_only)])
        .await
        .unwrap();
    api.apply_yaml("name: arm\nartifact: armonly:1\n")
        .await
        .unwrap();
    let (job, _) = api
        .wait_job("arm", T, |j, _| j.pending_reason.is_some())
        .await
        .unwrap();
    let reason = job.pending_reason.unwrap();
    assert!(
        reason.contains("artifact armonly:1 has linux/arm64; nodes: linux/amd64"),
        "{reason}"
    );
    assert!(!reason.contains("emulates"), "{reason}");
    native.shutdown().await;
}
