//! Placement: runtimes, constraints, resources, spreading and pending reasons. These use
//! the mock runtime on several in-process agents, so placement is the only variable.

use drover_core::TaskState;
use drover_core::api::JobState;
use drover_testkit::{AgentOptions, TestCluster, wait_for};
use std::collections::HashMap;
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

async fn fleet(nodes: &[(&str, &str)]) -> (TestCluster, Vec<drover_agent::Agent>) {
    let c = TestCluster::start().await.unwrap();
    let mut agents = Vec::new();
    for (name, zone) in nodes {
        let mut opts = AgentOptions::named(name).label("zone", zone);
        opts.capacity = drover_core::spec::Resources {
            cpu: 2.0,
            memory: drover_core::quantity::ByteSize(1 << 30),
        };
        agents.push(c.agent(opts).await.unwrap());
    }
    let api = c.api();
    let n = nodes.len();
    wait_for("agents to register", T, async || {
        api.nodes().await.map(|v| v.len() == n).unwrap_or(false)
    })
    .await
    .unwrap();
    (c, agents)
}

fn placement(tasks: &[drover_core::api::TaskView]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for t in tasks.iter().filter(|t| !t.task.state.is_terminal()) {
        *m.entry(t.node_name.clone().unwrap_or_default())
            .or_insert(0) += 1;
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_of_a_job_are_spread_across_nodes() {
    let (c, _a) = fleet(&[("n1", "a"), ("n2", "a"), ("n3", "b")]).await;
    let api = c.api();
    api.apply_yaml("name: spread\nkind: service\nruntime: mock\ncount: 6\nresources: { cpu: 0.1, memory: 16Mi }\n").await.unwrap();
    let (_, tasks) = api
        .wait_job("spread", T, |_, t| {
            t.iter()
                .filter(|t| t.task.state == TaskState::Running)
                .count()
                == 6
        })
        .await
        .unwrap();
    let p = placement(&tasks);
    assert_eq!(p.len(), 3, "{p:?}");
    assert!(p.values().all(|n| *n == 2), "{p:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn constraints_select_nodes_by_label() {
    let (c, _a) = fleet(&[("n1", "a"), ("n2", "b"), ("n3", "b")]).await;
    let api = c.api();
    api.apply_yaml("name: pinned\nkind: service\nruntime: mock\ncount: 4\nresources: { cpu: 0.1, memory: 16Mi }\nconstraints: [{ key: label.zone, value: b }]\n")
        .await
        .unwrap();
    let (_, tasks) = api
        .wait_job("pinned", T, |_, t| {
            t.iter()
                .filter(|t| t.task.state == TaskState::Running)
                .count()
                == 4
        })
        .await
        .unwrap();
    let p = placement(&tasks);
    assert_eq!(p.get("n1"), None, "{p:?}");
    assert_eq!(p.get("n2"), Some(&2));
    api.apply_yaml("name: by-name\nkind: service\nruntime: mock\nconstraints: [{ key: name, op: in, values: [n1] }]\n").await.unwrap();
    let (_, tasks) = api.wait_running("by-name", T).await.unwrap();
    assert_eq!(tasks[0].node_name.as_deref(), Some("n1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_fits_nowhere_stays_pending_with_a_reason_until_resources_free_up() {
    let (c, _a) = fleet(&[("n1", "a")]).await;
    let api = c.api();
    // Fills the only node's 2 cores.
    api.apply_yaml("name: big\nkind: service\nruntime: mock\nresources: { cpu: 2, memory: 64Mi }\nstop_grace: 1s\n").await.unwrap();
    api.wait_running("big", T).await.unwrap();
    api.apply_yaml("name: waiting\nruntime: mock\nresources: { cpu: 1, memory: 64Mi }\nmock: { exit_after: 10ms }\n").await.unwrap();
    let (job, _) = api
        .wait_job("waiting", T, |j, _| j.pending_reason.is_some())
        .await
        .unwrap();
    let reason = job.pending_reason.clone().unwrap();
    assert!(
        reason.contains("1 node lacks free resources (the task needs cpu 1, memory 64Mi)"),
        "{reason}"
    );
    // Room frees up as tasks end, so the job waits rather than being blocked.
    assert_eq!(job.state, Some(JobState::Pending));
    // Impossible constraints and a missing runtime are named too.
    api.apply_yaml(
        "name: nowhere\nruntime: mock\nconstraints: [{ key: label.zone, value: mars }]\n",
    )
    .await
    .unwrap();
    let (job, _) = api
        .wait_job("nowhere", T, |j, _| j.pending_reason.is_some())
        .await
        .unwrap();
    let reason = job.pending_reason.clone().unwrap();
    assert!(
        reason.contains("1 node fails the constraints (label.zone == mars)"),
        "{reason}"
    );
    assert_eq!(job.state, Some(JobState::Blocked));
    api.apply_yaml("name: nodocker\nruntime: docker\nimage: local/x:1\n")
        .await
        .unwrap();
    let (job, _) = api
        .wait_job("nodocker", T, |j, _| j.pending_reason.is_some())
        .await
        .unwrap();
    let reason = job.pending_reason.clone().unwrap();
    assert!(reason.contains("1 node lacks runtime docker"), "{reason}");
    assert_eq!(job.state, Some(JobState::Blocked));
    // More than the node has in all can never fit: blocked, not waiting for room.
    api.apply_yaml("name: huge\nruntime: mock\nresources: { cpu: 64 }\n")
        .await
        .unwrap();
    let (job, _) = api
        .wait_job("huge", T, |j, _| j.pending_reason.is_some())
        .await
        .unwrap();
    let reason = job.pending_reason.clone().unwrap();
    assert!(
        reason.contains("1 node is too small (the task needs cpu 64"),
        "{reason}"
    );
    assert_eq!(job.state, Some(JobState::Blocked));
    // Stopping the big job releases its resources and the waiting job runs.
    api.stop("big").await.unwrap();
    let (job, _) = api.wait_final("waiting", T).await.unwrap();
    assert_eq!(job.job.status, drover_core::state::JobStatus::Complete);
    let nodes = api.nodes().await.unwrap();
    assert!(
        nodes[0].allocated.cpu.abs() < 1e-9,
        "resources are released when tasks end: {:?}",
        nodes[0].allocated
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_waits_for_a_matching_node_to_join() {
    let (c, _a) = fleet(&[("n1", "a")]).await;
    let api = c.api();
    api.apply_yaml("name: later\nruntime: mock\nconstraints: [{ key: label.zone, value: c }]\nmock: { exit_after: 10ms }\n").await.unwrap();
    api.wait_job("later", T, |j, _| j.pending_reason.is_some())
        .await
        .unwrap();
    let _c = c
        .agent(AgentOptions::named("n9").label("zone", "c"))
        .await
        .unwrap();
    let (job, tasks) = api.wait_final("later", T).await.unwrap();
    assert_eq!(job.job.status, drover_core::state::JobStatus::Complete);
    assert_eq!(tasks[0].node_name.as_deref(), Some("n9"));
}
