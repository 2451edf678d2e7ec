//! Rolling updates with real processes: a running service's new version replaces its
//! tasks one index at a time, a rollout whose new task fails stops and says so, and a
//! restarted controller carries a rollout on where it was.

use drover_core::api::{JobState, JobView, TaskView};
use drover_core::state::{JobStatus, RolloutState};
use drover_core::{JobId, TaskState};
use drover_testkit::{AgentOptions, Api, ClusterOptions, TestCluster};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

/// A service of `count` tasks that prints `word` and runs until stopped, rolled out one
/// index at a time with each new task running `healthy` before the next.
fn spec(count: u32, word: &str, healthy: &str) -> String {
    format!(
        "name: web\nkind: service\ncount: {count}\ncommand: [sh, -c, 'echo {word}; exec sleep 600']\nstop_grace: 1s\nupdate: {{ max_parallel: 1, min_healthy_time: {healthy} }}\n"
    )
}

/// The running tasks of job web's version `job`, by index: task id.
fn running_of(tasks: &[TaskView], job: &JobId) -> BTreeMap<u32, String> {
    tasks
        .iter()
        .filter(|t| &t.task.job_id == job && serves(t))
        .map(|t| (t.task.index, t.task.id.to_string()))
        .collect()
}

/// A task that runs and is not being stopped.
fn serves(t: &TaskView) -> bool {
    t.task.state == TaskState::Running && !t.task.desired_stop
}

/// Every version of job web, newest first.
async fn versions(api: &Api) -> Vec<JobView> {
    let (status, text) = api
        .raw(reqwest::Method::GET, "/v1/jobs/web/versions", None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

async fn start_v1(api: &Api, count: u32) -> (JobView, BTreeMap<u32, String>) {
    let created = api.apply_yaml(&spec(count, "one", "1s")).await.unwrap();
    assert_eq!(created.result, "created");
    let (job, tasks) = api
        .wait_job("web", T, |_, t| {
            t.iter().filter(|t| serves(t)).count() == count as usize
        })
        .await
        .unwrap();
    let running = running_of(&tasks, &job.job.id);
    (job, running)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_version_replaces_the_tasks_one_index_at_a_time() {
    let c = TestCluster::start().await.unwrap();
    let _agent = c.agent(AgentOptions::named("n1")).await.unwrap();
    let api = c.api();
    let (v1, old) = start_v1(&api, 3).await;

    let began = Instant::now();
    let applied = api.apply_yaml(&spec(3, "two", "1s")).await.unwrap();
    assert_eq!(
        (applied.result.as_str(), applied.job.job.version),
        ("rolling out version 2", 2)
    );
    let v2 = applied.job.job.id.clone();
    // Watch the whole rollout: never more than one index without a serving task, never
    // more than one index in flight, and old and new tasks side by side on the way.
    let mut mixed = false;
    let mut progress = Vec::new();
    let job = loop {
        let job = api.job("web").await.unwrap();
        let tasks = api.tasks("web").await.unwrap();
        let served: std::collections::BTreeSet<u32> = tasks
            .iter()
            .filter(|t| serves(t))
            .map(|t| t.task.index)
            .collect();
        assert!(
            served.len() >= 2,
            "after {:?} only indexes {served:?} serve: {}",
            began.elapsed(),
            serde_json::to_string_pretty(&tasks).unwrap()
        );
        let r = job
            .job
            .rollout
            .clone()
            .expect("the new version has a rollout");
        assert!(r.in_flight.len() <= 1, "{r:?}");
        let old_left = running_of(&tasks, &v1.job.id).len();
        let new_now = running_of(&tasks, &v2).len();
        mixed |= old_left > 0 && new_now > 0;
        if progress.last() != Some(&r.done.len()) {
            progress.push(r.done.len());
        }
        if r.state != RolloutState::InProgress {
            break job;
        }
        assert_eq!(job.state, Some(JobState::RollingOut));
        assert!(began.elapsed() < T, "the rollout did not finish: {r:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let r = job.job.rollout.clone().unwrap();
    assert_eq!(r.state, RolloutState::Complete, "{r:?}");
    assert!(mixed, "old and new tasks never ran side by side");
    assert_eq!(progress, [0, 1, 2, 3], "one index after another");
    // Three indexes, each new task running a second before the next is taken.
    assert!(
        began.elapsed() >= Duration::from_secs(3),
        "{:?}",
        began.elapsed()
    );

    let tasks = api.tasks("web").await.unwrap();
    let new = running_of(&tasks, &v2);
    assert_eq!(
        new.len(),
        3,
        "{}",
        serde_json::to_string_pretty(&tasks).unwrap()
    );
    assert!(new.values().all(|id| !old.values().any(|o| o == id)));
    assert!(
        tasks.iter().all(|t| t.task.job_id == v2),
        "the old version's tasks are history once the rollout is done"
    );
    assert_eq!(job.state, Some(JobState::Running));
    let all = versions(&api).await;
    assert_eq!(all[1].job.status, JobStatus::Stopped);
    assert_eq!(all[1].job.reason, "replaced by version 2");
    assert_eq!(api.logs("web").await.unwrap(), "two\ntwo\ntwo\n");

    api.stop_forced("web").await.unwrap();
    api.wait_final("web", T).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_whose_new_task_fails_stops_and_keeps_the_old_tasks() {
    let c = TestCluster::start().await.unwrap();
    let _agent = c.agent(AgentOptions::named("n1")).await.unwrap();
    let api = c.api();
    let (v1, old) = start_v1(&api, 3).await;

    let broken = "name: web\nkind: service\ncount: 3\ncommand: [sh, -c, 'exit 1']\nstop_grace: 1s\nupdate: { max_parallel: 1, min_healthy_time: 1s }\n";
    let applied = api.apply_yaml(broken).await.unwrap();
    assert_eq!(applied.result, "rolling out version 2");
    let (job, _) = api
        .wait_job("web", T, |j, _| {
            j.job
                .rollout
                .as_ref()
                .is_some_and(|r| r.state != RolloutState::InProgress)
        })
        .await
        .unwrap();
    let r = job.job.rollout.clone().unwrap();
    assert_eq!(r.state, RolloutState::Failed, "{r:?}");
    assert_eq!(
        r.reason,
        "rollout to version 2 failed: web[0] exited with code 1"
    );
    assert_eq!(job.state, Some(JobState::RolloutFailed));
    assert_eq!(job.job.status, JobStatus::Running);

    // Nothing more is replaced: the old tasks of indexes 1 and 2 are the same processes
    // a while later, and only index 0's was stopped.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let tasks = api.tasks("web").await.unwrap();
    let left = running_of(&tasks, &v1.job.id);
    assert_eq!(
        left,
        old.clone().into_iter().filter(|(i, _)| *i > 0).collect(),
        "{}",
        serde_json::to_string_pretty(&tasks).unwrap()
    );
    let job = api.job("web").await.unwrap();
    assert_eq!(
        job.job.rollout.as_ref().map(|r| r.state),
        Some(RolloutState::Failed)
    );
    assert_eq!(
        versions(&api).await[1].job.status,
        JobStatus::Running,
        "the old version still runs"
    );

    // Applying a fixed spec rolls out from whatever runs: the old tasks and the failing
    // index alike.
    let fixed = api.apply_yaml(&spec(3, "three", "500ms")).await.unwrap();
    assert_eq!(fixed.result, "rolling out version 3");
    let (job, tasks) = api
        .wait_job("web", T, |j, _| {
            j.job
                .rollout
                .as_ref()
                .is_some_and(|r| r.state != RolloutState::InProgress)
        })
        .await
        .unwrap();
    assert_eq!(
        job.job.rollout.as_ref().map(|r| r.state),
        Some(RolloutState::Complete),
        "{}",
        serde_json::to_string_pretty(&job).unwrap()
    );
    assert_eq!(running_of(&tasks, &job.job.id).len(), 3);
    let all = versions(&api).await;
    for old in &all[1..] {
        assert_eq!(
            (old.job.status, old.job.reason.as_str()),
            (JobStatus::Stopped, "replaced by version 3"),
            "version {}",
            old.job.version
        );
    }

    api.stop_forced("web").await.unwrap();
    api.wait_final("web", T).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_controller_carries_a_rollout_on() {
    let c = TestCluster::start().await.unwrap();
    let _agent = c.agent(AgentOptions::named("n1")).await.unwrap();
    let api = c.api();
    let (_, old) = start_v1(&api, 3).await;
    let applied = api.apply_yaml(&spec(3, "two", "2s")).await.unwrap();
    let v2 = applied.job.job.id.clone();
    // Stop the controller once index 0 is done and index 1 is on its way.
    let (job, tasks) = api
        .wait_job("web", T, |j, _| {
            j.job.rollout.as_ref().is_some_and(|r| r.done.len() == 1)
        })
        .await
        .unwrap();
    let first = running_of(&tasks, &v2);
    assert!(first.contains_key(&0), "{job:?}");

    let addr = c.url.trim_start_matches("http://").to_string();
    let dir = c.stop().await;
    // The stopped server may hold its listener while it drains its connections; the
    // new one needs the same address, which the agent keeps dialling.
    drover_testkit::wait_for("the old listener to close", T, async || {
        std::net::TcpListener::bind(&addr).is_ok()
    })
    .await
    .unwrap();
    let c = TestCluster::start_in(dir, ClusterOptions::default(), &addr)
        .await
        .unwrap();
    let api = c.api();
    let job = api.job("web").await.unwrap();
    let r = job.job.rollout.clone().unwrap();
    assert_eq!(
        (r.state, r.done.len()),
        (RolloutState::InProgress, 1),
        "the rollout's progress was kept: {r:?}"
    );

    let (job, tasks) = api
        .wait_job("web", T, |j, _| {
            j.job
                .rollout
                .as_ref()
                .is_some_and(|r| r.state != RolloutState::InProgress)
        })
        .await
        .unwrap();
    assert_eq!(
        job.job.rollout.as_ref().map(|r| r.state),
        Some(RolloutState::Complete)
    );
    let new = running_of(&tasks, &v2);
    assert_eq!(
        new.len(),
        3,
        "{}",
        serde_json::to_string_pretty(&tasks).unwrap()
    );
    assert_eq!(
        new[&0], first[&0],
        "index 0, done before the restart, was left alone"
    );
    assert!(new.values().all(|id| !old.values().any(|o| o == id)));
    assert_eq!(versions(&api).await[1].job.status, JobStatus::Stopped);

    api.stop_forced("web").await.unwrap();
    api.wait_final("web", T).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_no_node_can_run_fails_its_rollout_and_a_stop_ends_every_version() {
    let c = TestCluster::start().await.unwrap();
    let _agent = c.agent(AgentOptions::named("n1")).await.unwrap();
    let api = c.api();
    let (v1, old) = start_v1(&api, 2).await;

    // More cores than the only node has: the new task of index 0 can never be placed.
    let huge = "name: web\nkind: service\ncount: 2\ncommand: [sleep, '600']\nresources: { cpu: 64 }\nstop_grace: 1s\nupdate: { min_healthy_time: 1s }\n";
    assert_eq!(
        api.apply_yaml(huge).await.unwrap().result,
        "rolling out version 2"
    );
    let (job, tasks) = api
        .wait_job("web", T, |j, _| {
            j.job
                .rollout
                .as_ref()
                .is_some_and(|r| r.state != RolloutState::InProgress)
        })
        .await
        .unwrap();
    let r = job.job.rollout.clone().unwrap();
    assert_eq!(r.state, RolloutState::Failed, "{r:?}");
    assert!(
        r.reason
            .starts_with("rollout to version 2 failed: version 2 cannot be placed: "),
        "{}",
        r.reason
    );
    assert_eq!(job.state, Some(JobState::RolloutFailed));
    assert_eq!(
        running_of(&tasks, &v1.job.id),
        old.into_iter().filter(|(i, _)| *i == 1).collect(),
        "index 1 keeps its old task"
    );

    // Stopping the job stops the old version's tasks left as well.
    api.stop("web").await.unwrap();
    api.wait_final("web", T).await.unwrap();
    let (status, text) = api
        .raw(reqwest::Method::GET, "/v1/tasks?job=web&versions=all", None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{text}");
    let all: Vec<TaskView> = serde_json::from_str(&text).unwrap();
    assert!(
        all.iter().all(|t| t.task.state.is_terminal()),
        "{}",
        serde_json::to_string_pretty(&all).unwrap()
    );
    for v in versions(&api).await {
        assert_eq!(
            v.job.status,
            JobStatus::Stopped,
            "version {}",
            v.job.version
        );
    }
}
