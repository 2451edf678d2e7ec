//! What the controller forgets, and when: finished jobs with their tasks and logs, old
//! attempts of tasks that were replaced, nodes lost long ago, and nodes an admin
//! removes. Without it, every job ever run and every node that ever said hello would
//! stay in memory, in the store and on disk.

use crate::error::ApiError;
use crate::state::State;
use crate::{Inner, Tx};
use drover_core::api::ErrorCode;
use drover_core::api::{IDEMPOTENCY_WINDOW_MS, NodeView, RemovedJob};
use drover_core::state::{Job, NodeStatus};
use drover_core::{JobId, NodeId, TaskId, TaskState};
use drover_store::Change;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// How long finished work and lost nodes are kept.
#[derive(Clone, Debug)]
pub struct Retention {
    /// A finished job version (its tasks all ended) is removed, with its tasks and
    /// their logs, this long after it last changed.
    pub finished_jobs: Duration,
    /// At most this many finished job versions are kept; past it the oldest go early,
    /// so a client submitting without pause cannot fill the controller's memory.
    pub max_finished_jobs: usize,
    /// Of the ended attempts that were replaced by a newer attempt of the same task,
    /// at most this many are kept per task index (and none past `finished_jobs`).
    pub attempts_kept: usize,
    /// A lost node with no tasks left is removed this long after it was last seen.
    pub lost_nodes: Duration,
    /// How often the collection runs.
    pub interval: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            finished_jobs: Duration::from_secs(24 * 3600),
            max_finished_jobs: 10_000,
            attempts_kept: 10,
            lost_nodes: Duration::from_secs(24 * 3600),
            interval: Duration::from_secs(60),
        }
    }
}

/// What one collection removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Collected {
    pub jobs: usize,
    pub tasks: usize,
    pub nodes: usize,
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The changes that forget what `r` no longer keeps at `now`, and the tasks whose logs
/// go with them. Pure, so the rules are tested without a controller.
pub(crate) fn plan(state: &State, r: &Retention, now: i64) -> (Vec<Change>, Vec<TaskId>) {
    let keep_for = millis(r.finished_jobs);
    let mut changes = Vec::new();
    let mut gone_tasks = Vec::new();

    // Finished job versions, oldest first. A job whose idempotency key is still in its
    // window stays, so a client retrying its request gets the job back instead of a
    // second run.
    let mut finished: Vec<(i64, &JobId, i64)> = state
        .jobs
        .values()
        .filter(|j| j.status.is_final())
        .filter(|j| {
            j.idempotency_key.is_none() || now.saturating_sub(j.created_at) >= IDEMPOTENCY_WINDOW_MS
        })
        .filter(|j| state.job_tasks(&j.id).all(|t| t.state.is_terminal()))
        // The job's own `retention` when it sets one, else the controller's.
        .map(|j| {
            let keep = j.spec.retention.map_or(keep_for, |d| {
                i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
            });
            (j.updated_at, &j.id, keep)
        })
        .collect();
    finished.sort();
    let surplus = finished.len().saturating_sub(r.max_finished_jobs);
    let mut removed_jobs = std::collections::HashSet::new();
    for (i, (updated, id, keep)) in finished.iter().enumerate() {
        if i < surplus || now.saturating_sub(*updated) > *keep {
            gone_tasks.extend(state.job_tasks(id).map(|t| t.id.clone()));
            changes.push(Change::DeleteJob((*id).clone()));
            removed_jobs.insert(*id);
        }
    }

    // Ended attempts that a newer attempt of the same index replaced. A succeeded one
    // is kept whatever its age: the job's record of which indexes succeeded is rebuilt
    // from the tasks at start-up, and forgetting one would run that index again.
    for (job, ids) in &state.tasks_by_job {
        if removed_jobs.contains(job) {
            continue;
        }
        let mut by_index: HashMap<u32, Vec<(u32, &TaskId, i64, TaskState)>> = HashMap::new();
        for t in ids.iter().filter_map(|id| state.tasks.get(id)) {
            by_index
                .entry(t.index)
                .or_default()
                .push((t.attempt, &t.id, t.updated_at, t.state));
        }
        for mut attempts in by_index.into_values() {
            if attempts.len() < 2 {
                continue;
            }
            // Newest first; the newest attempt is the task's present and always stays.
            attempts.sort_by_key(|a| std::cmp::Reverse(a.0));
            let mut kept = 0;
            for (_, id, updated, st) in attempts.into_iter().skip(1) {
                if !st.is_terminal() || st == TaskState::Succeeded {
                    continue;
                }
                kept += 1;
                if kept > r.attempts_kept || now.saturating_sub(updated) > keep_for {
                    gone_tasks.push(id.clone());
                    changes.push(Change::DeleteTask(id.clone()));
                }
            }
        }
    }

    let lost_for = millis(r.lost_nodes);
    for e in state.nodes.values() {
        if e.node.status == NodeStatus::Lost
            && e.tasks.is_empty()
            && now.saturating_sub(e.node.last_seen) > lost_for
        {
            changes.push(Change::DeleteNode(e.node.id.clone()));
        }
    }
    (changes, gone_tasks)
}

impl Inner {
    /// Removes what the retention settings no longer keep; the logs of removed tasks
    /// are deleted once the store has forgotten the tasks.
    pub(crate) async fn collect_garbage(&self) -> Collected {
        let (collected, gone_tasks) = {
            let mut state = self.state.lock().await;
            let state = &mut *state;
            let (changes, gone_tasks) = plan(state, &self.cfg.retention, self.now());
            if changes.is_empty() {
                return Collected::default();
            }
            let mut collected = Collected::default();
            let mut tx = Tx::default();
            for c in changes {
                match &c {
                    Change::DeleteJob(_) => collected.jobs += 1,
                    Change::DeleteTask(_) => collected.tasks += 1,
                    Change::DeleteNode(id) => {
                        collected.nodes += 1;
                        self.forget_node_envs(id);
                    }
                    _ => {}
                }
                tx.put(state, c);
            }
            if let Err(e) = self.commit(state, tx).await {
                // The commit reloaded the state from the store, so nothing is half
                // forgotten; the next collection tries again.
                tracing::warn!("removing finished jobs and lost nodes: {e}");
                return Collected::default();
            }
            (collected, gone_tasks)
        };
        for t in &gone_tasks {
            self.logs.remove(t);
        }
        tracing::info!(
            jobs = collected.jobs,
            old_attempts = collected.tasks,
            tasks = gone_tasks.len(),
            nodes = collected.nodes,
            "removed finished work and lost nodes past their retention"
        );
        collected
    }

    fn forget_node_envs(&self, id: &NodeId) {
        self.node_envs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// Removes a node at an admin's request. A connected node is refused (its agent
    /// would register again at once); tasks still on a silent node are lost, which
    /// replaces them where their job allows. `node` is a node id or a node name that
    /// only one node has.
    pub(crate) async fn remove_node(&self, node: &str) -> Result<NodeView, ApiError> {
        let mut state = self.state.lock().await;
        let state = &mut *state;
        let id = find_node(state, node)?;
        if self.sessions_lock().contains_key(&id) {
            let name = state
                .nodes
                .get(&id)
                .map_or(node.to_string(), |e| e.node.info.name.clone());
            return Err(ApiError::new(
                ErrorCode::Connected,
                format!(
                    "node {name} ({id}) is connected; stop its agent first, or it registers again at once"
                ),
            ));
        }
        let Some(entry) = state.nodes.get(&id) else {
            return Err(ApiError::not_found(&format!("node {node:?}")));
        };
        let view = state.node_view(entry);
        let reason = format!("node {} was removed by an admin", entry.node.info.name);
        let on_it: Vec<TaskId> = entry.tasks.iter().cloned().collect();
        let mut tx = Tx::default();
        for t in &on_it {
            self.advance_task(state, &mut tx, t, TaskState::Lost, &reason, None);
        }
        tx.put(state, Change::DeleteNode(id.clone()));
        self.commit(state, tx).await.map_err(|e| {
            ApiError::new(
                ErrorCode::StoreUnavailable,
                format!("removing node {id}: {e}"),
            )
        })?;
        self.forget_node_envs(&id);
        self.schedule.notify_one();
        tracing::info!(node = %id, name = %view.node.info.name, tasks = on_it.len(), "node removed by an admin");
        Ok(view)
    }
}

impl Inner {
    /// Removes every version of a finished job, with its tasks and their logs, at its
    /// user's request (`drover job rm`). A job still running, or still stopping, is
    /// refused: stopping it first makes what runs on the nodes end before its record.
    pub(crate) async fn remove_job(&self, job: &Job) -> Result<RemovedJob, ApiError> {
        let (removed, gone_tasks) = {
            let mut state = self.state.lock().await;
            let state = &mut *state;
            let versions: Vec<JobId> = state
                .jobs
                .values()
                .filter(|j| j.project == job.project && j.name == job.name)
                .map(|j| j.id.clone())
                .collect();
            for id in &versions {
                let live = state.jobs.get(id).is_some_and(|j| !j.status.is_final())
                    || state.job_tasks(id).any(|t| !t.state.is_terminal());
                if live {
                    return Err(ApiError::new(
                        ErrorCode::InUse,
                        format!(
                            "job {} is still running or stopping; stop it first (`drover job stop {}`), then remove it",
                            job.name, job.name
                        ),
                    ));
                }
            }
            let mut tx = Tx::default();
            let mut gone_tasks = Vec::new();
            for id in &versions {
                gone_tasks.extend(state.job_tasks(id).map(|t| t.id.clone()));
                tx.put(state, Change::DeleteJob(id.clone()));
            }
            self.commit(state, tx).await.map_err(|e| {
                ApiError::new(
                    ErrorCode::StoreUnavailable,
                    format!("removing job {}: {e}", job.name),
                )
            })?;
            let removed = RemovedJob {
                name: job.name.clone(),
                project: job.project.clone(),
                versions: versions.len(),
                tasks: gone_tasks.len(),
            };
            (removed, gone_tasks)
        };
        // Once the store has forgotten the tasks, as the retention collection does.
        for t in &gone_tasks {
            self.logs.remove(t);
        }
        tracing::info!(job = %removed.name, versions = removed.versions, "job removed by its user");
        Ok(removed)
    }
}

/// The id of the node named by `node`: its id, or a name only one node has.
fn find_node(state: &State, node: &str) -> Result<NodeId, ApiError> {
    if let Ok(id) = NodeId::parse(node)
        && state.nodes.contains_key(&id)
    {
        return Ok(id);
    }
    let named: Vec<&NodeId> = state
        .nodes
        .values()
        .filter(|e| e.node.info.name == node)
        .map(|e| &e.node.id)
        .collect();
    match named.as_slice() {
        [] => Err(ApiError::not_found(&format!("node {node:?}"))),
        [one] => Ok((*one).clone()),
        many => {
            let mut ids: Vec<&str> = many.iter().map(|i| i.as_str()).collect();
            ids.sort();
            Err(ApiError::new(
                ErrorCode::Ambiguous,
                format!(
                    "{} nodes are named {node:?}; give one of their ids: {}",
                    ids.len(),
                    ids.join(", ")
                ),
            ))
        }
    }
}

/// Collects garbage once per interval until shutdown.
pub(crate) async fn gc_loop(inner: Arc<Inner>) {
    let period = inner.cfg.retention.interval.max(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        inner.collect_garbage().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_core::JobSpec;
    use drover_core::state::{Job, JobStatus, Task};

    const HOUR: i64 = 3600 * 1000;

    fn job(name: &str, status: JobStatus, updated_at: i64) -> Job {
        Job {
            id: JobId::from(format!("job-{name}").as_str()),
            project: Default::default(),
            name: name.into(),
            version: 1,
            spec: JobSpec::new(name, vec!["true".into()]),
            status,
            reason: String::new(),
            exit: None,
            created_at: 0,
            updated_at,
            idempotency_key: None,
            rollout: None,
        }
    }

    fn task(j: &Job, index: u32, attempt: u32, state: TaskState, updated_at: i64) -> Task {
        let mut t = Task::pending(j, index, attempt, 0, 0);
        t.id = TaskId::from(format!("task-{}-{index}-{attempt}", j.name).as_str());
        t.state = state;
        t.updated_at = updated_at;
        t
    }

    fn state_of(jobs: &[Job], tasks: &[Task]) -> State {
        let mut s = State::default();
        for j in jobs {
            s.apply(Change::Job(j.clone()));
        }
        for t in tasks {
            s.apply(Change::Task(t.clone()));
        }
        s
    }

    fn removed(changes: &[Change]) -> Vec<String> {
        let mut out: Vec<String> = changes
            .iter()
            .map(|c| match c {
                Change::DeleteJob(id) => id.to_string(),
                Change::DeleteTask(id) => id.to_string(),
                Change::DeleteNode(id) => id.to_string(),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn a_job_that_sets_its_own_retention_is_kept_that_long() {
        let now = 100 * HOUR;
        let mut short = job("short", JobStatus::Complete, now - 2 * HOUR);
        short.spec.retention = Some(drover_core::quantity::Dur::from_secs(3600));
        let mut long = job("long", JobStatus::Complete, now - 30 * HOUR);
        long.spec.retention = Some(drover_core::quantity::Dur::from_secs(48 * 3600));
        let plain = job("plain", JobStatus::Complete, now - 2 * HOUR);
        let s = state_of(&[short, long, plain], &[]);
        let (changes, _) = plan(&s, &Retention::default(), now);
        assert_eq!(removed(&changes), vec!["job-short"]);
    }

    #[test]
    fn finished_jobs_go_after_their_retention_and_the_oldest_go_past_the_limit() {
        let now = 100 * HOUR;
        let old = job("old", JobStatus::Complete, now - 25 * HOUR);
        let recent = job("recent", JobStatus::Failed, now - HOUR);
        let running = job("running", JobStatus::Running, 0);
        // Final, but a task has not ended yet (a stop in progress): kept.
        let stopping = job("stopping", JobStatus::Stopped, 0);
        let mut keyed = job("keyed", JobStatus::Complete, now - 25 * HOUR);
        keyed.idempotency_key = Some("k".into());
        keyed.created_at = now - 23 * HOUR;
        let tasks = [
            task(&old, 0, 0, TaskState::Succeeded, 0),
            task(&recent, 0, 0, TaskState::Failed, 0),
            task(&running, 0, 0, TaskState::Running, 0),
            task(&stopping, 0, 0, TaskState::Stopping, 0),
        ];
        let s = state_of(&[old, recent, running, stopping, keyed], &tasks);
        let r = Retention::default();
        let (changes, logs) = plan(&s, &r, now);
        assert_eq!(removed(&changes), vec!["job-old"]);
        assert_eq!(logs, vec![TaskId::from("task-old-0-0")]);

        // Past its window the key no longer protects the job.
        let (changes, _) = plan(&s, &r, now + 2 * HOUR);
        assert_eq!(removed(&changes), vec!["job-keyed", "job-old"]);

        // With room for one finished job, the older of the two in retention goes too.
        let r = Retention {
            max_finished_jobs: 1,
            ..Retention::default()
        };
        let (changes, _) = plan(&s, &r, now);
        assert_eq!(removed(&changes), vec!["job-old"]);
        let r = Retention {
            max_finished_jobs: 0,
            ..Retention::default()
        };
        let (changes, _) = plan(&s, &r, now);
        assert_eq!(removed(&changes), vec!["job-old", "job-recent"]);
    }

    #[test]
    fn replaced_attempts_go_but_a_succeeded_one_and_the_newest_stay() {
        let now = 100 * HOUR;
        let svc = job("svc", JobStatus::Running, 0);
        let mut tasks = Vec::new();
        // Index 0 crash-looped: attempts 0..=13 failed, attempt 14 runs.
        for a in 0..14 {
            tasks.push(task(&svc, 0, a, TaskState::Failed, now - HOUR));
        }
        tasks.push(task(&svc, 0, 14, TaskState::Running, now));
        // Index 1: an old succeeded original and its stopped replacement, both old.
        tasks.push(task(&svc, 1, 0, TaskState::Succeeded, now - 30 * HOUR));
        tasks.push(task(&svc, 1, 1, TaskState::Failed, now - 30 * HOUR));
        tasks.push(task(&svc, 1, 2, TaskState::Running, now));
        let s = state_of(&[svc], &tasks);
        let (changes, logs) = plan(&s, &Retention::default(), now);
        // The 10 newest ended attempts of index 0 stay; of index 1 the failed one goes.
        let mut want: Vec<String> = (0..4).map(|a| format!("task-svc-0-{a}")).collect();
        want.push("task-svc-1-1".into());
        want.sort();
        assert_eq!(removed(&changes), want);
        assert_eq!(logs.len(), want.len());
    }
}
