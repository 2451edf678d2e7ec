//! The runtime contract: one data-driven set of lifecycle cases, run through a real
//! controller and agent against every runtime (`process`, `docker` on the real engine,
//! and `plugin:exec`, the example Python plugin). The rest of Drover never looks behind
//! the `Runtime` trait, so each runtime must end every case the same way.

use drover_core::TaskState;
use drover_core::state::JobStatus;
use drover_testkit::{AgentOptions, TestCluster, wait_for};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// The secret each test puts in its own (the agent's) environment; no task may see it.
const SECRET: &str = "CONTRACT_SECRET";

#[derive(Clone, Copy, Debug)]
enum Flavor {
    Process,
    Docker,
    Plugin,
}

impl Flavor {
    fn agent(self) -> AgentOptions {
        let mut opts = AgentOptions::named("contract");
        match self {
            Flavor::Process => {}
            Flavor::Docker => opts.docker = true,
            Flavor::Plugin => opts
                .plugins
                .push(("exec".into(), drover_testkit::example_plugin("exec"))),
        }
        opts
    }

    /// The spec lines that choose this runtime.
    fn header(self) -> String {
        match self {
            Flavor::Process => "runtime: process\n".into(),
            Flavor::Docker => format!(
                "runtime: docker\nimage: {}\npull: never\n",
                drover_testkit::images::busybox_image().expect("the test image")
            ),
            Flavor::Plugin => "runtime: plugin:exec\n".into(),
        }
    }
}

/// What a case must end with.
struct Expect {
    job: JobStatus,
    task: TaskState,
    code: Option<i32>,
    /// Each must appear in the task's reason.
    reason: &'static [&'static str],
    /// Each must appear in the job's logs.
    logs: &'static [&'static str],
}

struct Case {
    name: &'static str,
    /// The spec lines after the runtime's; `/bin/sh` exists in every runtime's world.
    spec: &'static str,
    /// Stop the job once its logs contain this line (and, for a running task, its
    /// resource use is sampled and exported in the runtime-neutral metrics).
    stop_when: Option<&'static str>,
    expect: Expect,
}

const CASES: &[Case] = &[
    Case {
        name: "succeeds",
        spec: "count: 2\ncommand: [/bin/sh, -c, 'echo out-$DROVER_TASK_INDEX; echo err-$DROVER_TASK_INDEX >&2']\n",
        stop_when: None,
        expect: Expect {
            job: JobStatus::Complete,
            task: TaskState::Succeeded,
            code: Some(0),
            reason: &[],
            logs: &["out-0", "out-1", "err-0", "err-1"],
        },
    },
    Case {
        name: "fails",
        spec: "command: [/bin/sh, -c, 'echo failing; exit 3']\nrestart: { attempts: 0 }\n",
        stop_when: None,
        expect: Expect {
            job: JobStatus::Failed,
            task: TaskState::Failed,
            code: Some(3),
            reason: &["exited with code 3"],
            logs: &["failing"],
        },
    },
    Case {
        name: "env",
        spec: "command: [/bin/sh, -c, 'echo \"greeting=$GREETING secret=${CONTRACT_SECRET:-none} job=$DROVER_JOB\"']\nenv: { GREETING: hello }\n",
        stop_when: None,
        expect: Expect {
            job: JobStatus::Complete,
            task: TaskState::Succeeded,
            code: Some(0),
            reason: &[],
            logs: &["greeting=hello secret=none job=contract-env"],
        },
    },
    Case {
        name: "graceful",
        spec: "kind: service\nstop_grace: 10s\ncommand: [/bin/sh, -c, 'trap \"echo bye; exit 0\" TERM; echo ready; while true; do sleep 0.1; done']\n",
        stop_when: Some("ready"),
        expect: Expect {
            job: JobStatus::Stopped,
            task: TaskState::Stopped,
            code: None,
            reason: &["stopped by user", "ended after SIGTERM"],
            logs: &["bye"],
        },
    },
    Case {
        name: "forced",
        spec: "kind: service\nstop_grace: 300ms\ncommand: [/bin/sh, -c, 'trap \"\" TERM; echo ready; while true; do sleep 0.1; done']\n",
        stop_when: Some("ready"),
        expect: Expect {
            job: JobStatus::Stopped,
            task: TaskState::Stopped,
            code: None,
            reason: &["stopped by user", "killed with SIGKILL"],
            logs: &[],
        },
    },
];

async fn keeps_the_contract(flavor: Flavor) {
    // SAFETY: nextest runs each test in its own process, and this runs before any other
    // thread of the test reads the environment.
    unsafe { std::env::set_var(SECRET, "s3cret") };
    let c = TestCluster::start().await.unwrap();
    let _agent = c.agent(flavor.agent()).await.unwrap();
    let api = c.api();
    let header = flavor.header();
    for case in CASES {
        let job = format!("contract-{}", case.name);
        api.apply_yaml(&format!("name: {job}\n{header}{}", case.spec))
            .await
            .unwrap_or_else(|e| panic!("{flavor:?}/{}: {e}", case.name));
        if let Some(line) = case.stop_when {
            wait_for(
                &format!("{flavor:?}/{}: {line:?}", case.name),
                T,
                async || api.logs(&job).await.is_ok_and(|l| l.contains(line)),
            )
            .await
            .unwrap();
            wait_for(
                &format!("{flavor:?}/{}: usage in metrics", case.name),
                T,
                async || {
                    let sampled = api.tasks(&job).await.is_ok_and(|t| {
                        t.iter()
                            .any(|t| t.usage.is_some_and(|u| u.memory_bytes > 0))
                    });
                    let metric = format!("drover_job_memory_bytes{{job=\"{job}\"}}");
                    sampled && api.metrics().await.is_ok_and(|m| m.contains(&metric))
                },
            )
            .await
            .unwrap();
            api.stop(&job).await.unwrap();
        }
        let (view, tasks) = api
            .wait_final(&job, T)
            .await
            .unwrap_or_else(|e| panic!("{flavor:?}/{}: {e}", case.name));
        let at = format!("{flavor:?}/{}", case.name);
        assert_eq!(view.job.status, case.expect.job, "{at}: {:?}", view.job);
        for t in &tasks {
            assert_eq!(t.task.state, case.expect.task, "{at}: {:?}", t.task);
            if let Some(code) = case.expect.code {
                assert_eq!(
                    t.task.exit.as_ref().and_then(|e| e.code),
                    Some(code),
                    "{at}: {:?}",
                    t.task
                );
            }
            for needle in case.expect.reason {
                assert!(
                    t.task.reason.contains(needle),
                    "{at}: reason {:?} lacks {needle:?}",
                    t.task.reason
                );
            }
        }
        let logs = api.logs(&job).await.unwrap();
        for needle in case.expect.logs {
            assert!(logs.contains(needle), "{at}: logs lack {needle:?}: {logs}");
        }
        assert!(!logs.contains("s3cret"), "{at}: the agent's secret leaked");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_process_runtime_keeps_the_contract() {
    keeps_the_contract(Flavor::Process).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_docker_runtime_keeps_the_contract() {
    keeps_the_contract(Flavor::Docker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plugin_runtime_keeps_the_contract() {
    keeps_the_contract(Flavor::Plugin).await;
}
