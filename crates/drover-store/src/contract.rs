//! What every [`Store`] must do, as checks any implementation runs against itself.
//!
//! An implementation provides a [`Reopen`] (a way to open the same store again, as a
//! restarted controller would) and calls [`store_contract!`](crate::store_contract) in
//! its tests, which makes one test per check. The controller relies on exactly these
//! behaviours and nothing else of a store.

use crate::{Change, Role, Store, StoreError, TokenRecord, hash_token};
use async_trait::async_trait;
use drover_core::artifact::{Artifact, Digest, Variant};
use drover_core::state::{Exit, Job, JobStatus, Task};
use drover_core::{JobId, JobSpec, ProjectId, TaskId, TaskState};
use std::sync::Arc;

/// Opens the store under test; each call opens the same data again.
#[async_trait]
pub trait Reopen: Send + Sync {
    async fn open(&self) -> Arc<dyn Store>;
}

/// Makes one `#[tokio::test]` per contract check, each on a fresh store made by
/// `$fresh` (an expression giving a [`Reopen`]).
#[macro_export]
macro_rules! store_contract {
    ($fresh:expr) => {
        $crate::store_contract!(@tests $fresh;
            committed_objects_survive_reopening,
            tasks_never_move_backwards,
            every_pair_of_task_states_is_settled_as_core_says,
            deleting_a_job_takes_its_tasks_and_deletions_come_last,
            artifacts_are_stored_listed_and_deleted,
            an_existing_artifact_version_is_never_overwritten,
            pipelines_and_vertices_are_stored_updated_and_deleted,
        );
    };
    (@tests $fresh:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                $crate::contract::$name(&$fresh).await;
            }
        )*
    };
}

fn job(id: &str, status: JobStatus) -> Job {
    Job {
        id: JobId::from(id),
        project: ProjectId::default(),
        name: "j".into(),
        version: 1,
        spec: JobSpec::new("j", vec!["true".into()]),
        status,
        reason: String::new(),
        exit: None,
        created_at: 1,
        updated_at: 1,
        idempotency_key: None,
        rollout: None,
    }
}

fn task(id: &str, state: TaskState) -> Task {
    Task {
        id: TaskId::from(id),
        project: ProjectId::default(),
        job_id: JobId::from("job-1"),
        job_name: "j".into(),
        index: 0,
        attempt: 0,
        state,
        node_id: None,
        reason: String::new(),
        exit: None,
        desired_stop: false,
        stop_forced: false,
        not_before: 0,
        created_at: 1,
        updated_at: 1,
        ports: Vec::new(),
        events: Vec::new(),
    }
}

fn artifact(project: &str, name: &str, version: &str) -> Artifact {
    Artifact {
        project: ProjectId(project.to_string()),
        name: name.into(),
        version: version.into(),
        variants: vec![
            Variant {
                platform: "linux/amd64+gnu".parse().expect("a platform"),
                digest: Digest::of_hex(&"a".repeat(64)).expect("a digest"),
                size: 10,
            },
            Variant {
                platform: "any".parse().expect("a platform"),
                digest: Digest::of_hex(&"b".repeat(64)).expect("a digest"),
                size: 20,
            },
        ],
        created_at: 5,
    }
}

async fn commit(store: &Arc<dyn Store>, changes: &[Change]) {
    store.commit(changes).await.expect("commit");
}

async fn tasks(store: &Arc<dyn Store>) -> Vec<Task> {
    let mut t = store.load().await.expect("load").tasks;
    t.sort_by(|a, b| a.id.cmp(&b.id));
    t
}

pub async fn committed_objects_survive_reopening(s: &dyn Reopen) {
    let token = TokenRecord {
        hash: hash_token("secret"),
        project: ProjectId::default(),
        role: Role::Admin,
        name: "admin".into(),
        created_at: 1,
        revoked: false,
    };
    let j = job("job-1", JobStatus::Running);
    {
        let store = s.open().await;
        commit(
            &store,
            &[
                Change::Job(j.clone()),
                Change::Task(task("task-1", TaskState::Running)),
                Change::Token(token.clone()),
            ],
        )
        .await;
    }
    let snap = s.open().await.load().await.expect("load");
    assert_eq!(snap.jobs, vec![j]);
    assert_eq!(snap.tasks, vec![task("task-1", TaskState::Running)]);
    assert_eq!(snap.tokens, vec![token]);
}

pub async fn tasks_never_move_backwards(s: &dyn Reopen) {
    let store = s.open().await;
    let mut done = task("task-1", TaskState::Failed);
    done.exit = Some(Exit {
        code: Some(3),
        signal: None,
    });
    commit(&store, &[Change::Task(task("task-1", TaskState::Running))]).await;
    commit(&store, &[Change::Task(done.clone())]).await;
    // Within one commit too, the furthest state wins whatever the order.
    let other = task("task-2", TaskState::Succeeded);
    let stale = task("task-2", TaskState::Running);
    commit(&store, &[Change::Task(other.clone()), Change::Task(stale)]).await;
    // A stale running event and a late different terminal state change nothing.
    commit(&store, &[Change::Task(task("task-1", TaskState::Running))]).await;
    commit(
        &store,
        &[Change::Task(task("task-1", TaskState::Succeeded))],
    )
    .await;
    assert_eq!(tasks(&store).await, vec![done, other]);
}

/// For every stored state and every state written over it, the store keeps what
/// [`TaskState::replaces`] says, in separate commits and within one commit.
pub async fn every_pair_of_task_states_is_settled_as_core_says(s: &dyn Reopen) {
    let store = s.open().await;
    let mut separate = Vec::new();
    let mut together = Vec::new();
    let mut expected = Vec::new();
    for (i, old) in TaskState::ALL.into_iter().enumerate() {
        for (j, new) in TaskState::ALL.into_iter().enumerate() {
            let id = |which: &str| format!("task-{which}{i}x{j}");
            let mut first = task(&id("s"), old);
            first.reason = "first".into();
            let mut second = task(&id("s"), new);
            second.reason = "second".into();
            separate.push((first, second));
            let mut first = task(&id("t"), old);
            first.reason = "first".into();
            let mut second = task(&id("t"), new);
            second.reason = "second".into();
            together.push((first, second));
            let wins = if new.replaces(old) { "second" } else { "first" };
            expected.push((id("s"), wins));
            expected.push((id("t"), wins));
        }
    }
    let firsts: Vec<Change> = separate
        .iter()
        .map(|(f, _)| Change::Task(f.clone()))
        .collect();
    commit(&store, &firsts).await;
    let seconds: Vec<Change> = separate
        .iter()
        .map(|(_, s)| Change::Task(s.clone()))
        .collect();
    commit(&store, &seconds).await;
    let both: Vec<Change> = together
        .iter()
        .flat_map(|(f, s)| [Change::Task(f.clone()), Change::Task(s.clone())])
        .collect();
    commit(&store, &both).await;
    let stored: std::collections::HashMap<String, String> = tasks(&store)
        .await
        .into_iter()
        .map(|t| (t.id.to_string(), t.reason))
        .collect();
    for (id, wins) in expected {
        assert_eq!(stored.get(&id).map(String::as_str), Some(wins), "task {id}");
    }
}

pub async fn deleting_a_job_takes_its_tasks_and_deletions_come_last(s: &dyn Reopen) {
    let task_of = |id: &str, job: &str| {
        let mut t = task(id, TaskState::Succeeded);
        t.job_id = JobId::from(job);
        t
    };
    let store = s.open().await;
    commit(
        &store,
        &[
            Change::Job(job("job-1", JobStatus::Complete)),
            Change::Job(job("job-2", JobStatus::Complete)),
            Change::Task(task_of("task-1", "job-1")),
            Change::Task(task_of("task-2", "job-1")),
            Change::Task(task_of("task-3", "job-2")),
            Change::Task(task_of("task-4", "job-2")),
        ],
    )
    .await;
    commit(
        &store,
        &[
            Change::DeleteJob(JobId::from("job-1")),
            Change::DeleteTask(TaskId::from("task-3")),
            // Written and deleted in one commit: deleted.
            Change::Task(task_of("task-5", "job-2")),
            Change::DeleteTask(TaskId::from("task-5")),
        ],
    )
    .await;
    let snap = s.open().await.load().await.expect("load");
    assert_eq!(snap.jobs, vec![job("job-2", JobStatus::Complete)]);
    let ids: Vec<&str> = snap.tasks.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(ids, vec!["task-4"]);
}

pub async fn artifacts_are_stored_listed_and_deleted(s: &dyn Reopen) {
    let a1 = artifact("default", "app", "1");
    let a2 = artifact("default", "app", "2");
    // The same name and version in another project is another artifact.
    let other = artifact("other", "app", "1");
    {
        let store = s.open().await;
        commit(
            &store,
            &[
                Change::Artifact(a1.clone()),
                Change::Artifact(a2.clone()),
                Change::Artifact(other.clone()),
            ],
        )
        .await;
    }
    let store = s.open().await;
    assert_eq!(
        store.load().await.expect("load").artifacts,
        vec![a1.clone(), a2.clone(), other.clone()]
    );
    let delete = |name: &str| Change::DeleteArtifact {
        project: ProjectId::default(),
        name: name.into(),
        version: "1".into(),
    };
    commit(&store, &[delete("app")]).await;
    // Deleting what is not there changes nothing and is no error.
    commit(&store, &[delete("nope")]).await;
    assert_eq!(store.load().await.expect("load").artifacts, vec![a2, other]);
}

pub async fn an_existing_artifact_version_is_never_overwritten(s: &dyn Reopen) {
    let store = s.open().await;
    let first = artifact("default", "app", "1");
    commit(&store, &[Change::Artifact(first.clone())]).await;
    let mut second = first.clone();
    second.variants.truncate(1);
    second.created_at = 9;
    // The conflict fails the whole commit: the task beside it is not written either.
    let err = store
        .commit(&[
            Change::Task(task("task-1", TaskState::Pending)),
            Change::Artifact(second),
        ])
        .await
        .expect_err("a second insert of a version fails");
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert!(
        err.to_string().contains("artifact app:1 already exists"),
        "{err}"
    );
    let snap = store.load().await.expect("load");
    assert_eq!(snap.artifacts, vec![first]);
    assert!(snap.tasks.is_empty());
    // A delete and a new insert of the same version in one commit is a replacement the
    // controller chose to make, and is allowed.
    let again = artifact("default", "app", "1");
    commit(
        &store,
        &[
            Change::DeleteArtifact {
                project: ProjectId::default(),
                name: "app".into(),
                version: "1".into(),
            },
            Change::Artifact(again.clone()),
        ],
    )
    .await;
    assert_eq!(store.load().await.expect("load").artifacts, vec![again]);
}

fn pipeline(project: &str, name: &str, version: u32) -> drover_core::pipeline::Pipeline {
    let yaml = format!(
        "name: {name}\nvertices:\n  - {{ name: src, source: {{ http: {{}} }} }}\n  - {{ name: out, sink: {{ log: {{}} }} }}\nedges: [{{ from: src, to: out }}]\n"
    );
    drover_core::pipeline::Pipeline {
        project: ProjectId(project.to_string()),
        name: name.into(),
        version,
        spec: drover_core::pipeline::PipelineSpec::from_yaml(&yaml, "p.yaml").expect("a spec"),
        status: Default::default(),
        request: None,
        created_at: 1,
        updated_at: 1,
    }
}

fn vertex(p: &drover_core::pipeline::Pipeline, name: &str) -> drover_core::pipeline::Vertex {
    drover_core::pipeline::Vertex {
        project: p.project.clone(),
        spec: p
            .spec
            .vertex_spec(&p.project, name, 1, Default::default(), 1)
            .expect("a vertex of the spec"),
        status: Default::default(),
    }
}

/// Pipelines are kept one per project and name, vertices one per project, pipeline
/// and name; a later write replaces an earlier one, and deletions remove exactly the
/// named object.
pub async fn pipelines_and_vertices_are_stored_updated_and_deleted(s: &dyn Reopen) {
    let a1 = pipeline("alpha", "etl", 1);
    let b1 = pipeline("beta", "etl", 1);
    {
        let store = s.open().await;
        commit(
            &store,
            &[
                Change::Pipeline(a1.clone()),
                Change::Pipeline(b1.clone()),
                Change::Vertex(vertex(&a1, "src")),
                Change::Vertex(vertex(&a1, "out")),
                Change::Vertex(vertex(&b1, "src")),
            ],
        )
        .await;
    }
    let mut a2 = pipeline("alpha", "etl", 2);
    a2.request = Some(drover_core::pipeline::LifecycleRequest::Resume { slow: true });
    let mut out2 = vertex(&a1, "out");
    out2.spec.generation = 2;
    out2.status.observed_replicas = 1;
    {
        let store = s.open().await;
        commit(
            &store,
            &[
                Change::Pipeline(a2.clone()),
                Change::Vertex(out2.clone()),
                Change::DeleteVertex {
                    project: ProjectId("beta".into()),
                    pipeline: "etl".into(),
                    name: "src".into(),
                },
                Change::DeletePipeline {
                    project: ProjectId("beta".into()),
                    name: "etl".into(),
                },
            ],
        )
        .await;
    }
    let snap = s.open().await.load().await.expect("load");
    assert_eq!(snap.pipelines, vec![a2]);
    assert_eq!(snap.vertices, vec![out2, vertex(&a1, "src")]);
}
