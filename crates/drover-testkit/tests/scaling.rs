//! Changing a running service's count alone scales it in place, with real processes:
//! the tasks that keep running are the same processes, not restarted ones.

use drover_core::TaskState;
use drover_testkit::{AgentOptions, TestCluster};
use std::collections::BTreeMap;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

fn spec(count: u32, word: &str) -> String {
    format!(
        "name: web\nkind: service\ncount: {count}\ncommand: [sh, -c, 'echo {word}; exec sleep 600']\nstop_grace: 1s\n"
    )
}

/// The running tasks of job web, by index: (task id, attempt).
async fn running(api: &drover_testkit::Api, want: usize) -> BTreeMap<u32, (String, u32)> {
    let (_, tasks) = api
        .wait_job("web", T, |_, t| {
            let running = t
                .iter()
                .filter(|t| t.task.state == TaskState::Running)
                .count();
            let live = t.iter().filter(|t| !t.task.state.is_terminal()).count();
            running == want && live == want
        })
        .await
        .unwrap();
    tasks
        .iter()
        .filter(|t| t.task.state == TaskState::Running)
        .map(|t| (t.task.index, (t.task.id.to_string(), t.task.attempt)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_count_change_alone_adds_or_stops_tasks_and_leaves_the_rest_running() {
    let c = TestCluster::start().await.unwrap();
    let _agent = c.agent(AgentOptions::named("n1")).await.unwrap();
    let api = c.api();
    assert_eq!(
        api.apply_yaml(&spec(2, "hi")).await.unwrap().result,
        "created"
    );
    let two = running(&api, 2).await;

    let up = api.apply_yaml(&spec(3, "hi")).await.unwrap();
    assert_eq!((up.result.as_str(), up.job.job.version), ("scaled", 1));
    let three = running(&api, 3).await;
    // Three tasks of 0.1 cores each: exactly 0.3 reserved, not 0.30000000000000004.
    let nodes = serde_json::to_value(api.nodes().await.unwrap()).unwrap();
    assert_eq!(nodes[0]["allocated"]["cpu"].to_string(), "0.3", "{nodes}");
    assert_eq!(three[&0], two[&0], "index 0 kept running");
    assert_eq!(three[&1], two[&1], "index 1 kept running");

    let down = api.apply_yaml(&spec(1, "hi")).await.unwrap();
    assert_eq!((down.result.as_str(), down.job.job.version), ("scaled", 1));
    let one = running(&api, 1).await;
    assert_eq!(one[&0], two[&0], "index 0 kept running");
    let tasks = api.tasks("web").await.unwrap();
    for t in tasks.iter().filter(|t| t.task.index > 0) {
        assert_eq!(t.task.state, TaskState::Stopped, "{:?}", t.task);
        assert!(
            t.task.reason.starts_with("scaled from 3 to 1"),
            "{}",
            t.task.reason
        );
    }
    // Stopped indexes stay stopped: nothing restarts them.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(running(&api, 1).await[&0], two[&0]);

    // Any other change is a new version, rolled out, and its tasks are new.
    let changed = api.apply_yaml(&spec(1, "bye")).await.unwrap();
    assert_eq!(
        (changed.result.as_str(), changed.job.job.version),
        ("rolling out version 2", 2)
    );
    let v2 = changed.job.job.id.clone();
    let (_, tasks) = api
        .wait_job("web", T, |_, t| {
            t.iter()
                .any(|t| t.task.job_id == v2 && t.task.state == TaskState::Running)
        })
        .await
        .unwrap();
    assert!(
        tasks
            .iter()
            .all(|t| t.task.id.to_string() != two[&0].0 || t.task.desired_stop)
    );

    // An in-process agent's tasks outlive the test unless stopped.
    api.stop_forced("web").await.unwrap();
    api.wait_final("web", T).await.unwrap();
}
