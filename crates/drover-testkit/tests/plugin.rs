//! The plugin runtime through a real controller and agent, where a plugin's crash must
//! reach users as a clear task failure and the service must come back on a restarted
//! plugin.

use drover_core::TaskState;
use drover_testkit::{AgentOptions, TestCluster, wait_for};
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_crash_fails_its_tasks_clearly_and_the_restarted_plugin_runs_the_service() {
    // A copy at a path of this test's own, so killing "the plugin" by its command line
    // cannot touch another test's plugin.
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("drover-plugin-crashy");
    std::fs::copy(drover_testkit::example_plugin("exec"), &plugin).unwrap();
    let c = TestCluster::start().await.unwrap();
    let mut opts = AgentOptions::named("p1");
    opts.plugins.push(("exec".into(), plugin.clone()));
    let _agent = c.agent(opts).await.unwrap();
    let api = c.api();
    api.apply_yaml(
        "name: svc\nkind: service\nruntime: plugin:exec\nrestart: { delay: 100ms }\ncommand: [sh, -c, 'echo up; while true; do sleep 0.1; done']\n",
    )
    .await
    .unwrap();
    let (_, tasks) = api.wait_running("svc", T).await.unwrap();
    let first = tasks[0].task.id.clone();

    let killed = std::process::Command::new("pkill")
        .args(["-KILL", "-f", plugin.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(killed.success(), "the plugin process was found and killed");

    let (_, tasks) = api
        .wait_job("svc", T, |_, t| {
            let crashed = t
                .iter()
                .any(|t| t.task.id == first && t.task.state.is_terminal());
            let replaced = t
                .iter()
                .any(|t| t.task.id != first && t.task.state == TaskState::Running);
            crashed && replaced
        })
        .await
        .unwrap();
    let old = tasks.iter().find(|t| t.task.id == first).unwrap();
    assert_eq!(old.task.state, TaskState::Failed, "{:?}", old.task);
    assert!(
        old.task.reason.contains("plugin exec crashed"),
        "the reason names the plugin and the crash: {}",
        old.task.reason
    );
    // The replacement runs on a restarted plugin and produces output.
    wait_for("the replacement's output", T, async || {
        api.logs("svc")
            .await
            .is_ok_and(|l| l.matches("up").count() >= 2)
    })
    .await
    .unwrap();
    api.stop("svc").await.unwrap();
    api.wait_final("svc", T).await.unwrap();
}
