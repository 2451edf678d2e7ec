//! Rolling updates: what the next step of a service's rollout is, decided from the
//! state alone.
//!
//! A new version of a running service keeps the old version's tasks running and
//! replaces them a few indexes at a time (the spec's `update`): for an index taken, the
//! old task is stopped and the new version's task is started once the old one has
//! ended, so a rollout needs no room beyond the service's own; the index is done when
//! its new task has been running for `update.min_healthy_time`, and the next index is
//! taken. Indexes the old versions did not run are started at once; old tasks at
//! indexes past the new count are stopped at once. A new task that fails before its
//! index is done, or a new version no node can run, fails the rollout: nothing more is
//! replaced and the old tasks still running keep running, until the user applies again
//! (a new rollout from whatever runs) or stops the job.
//!
//! Everything here is read from the state, and the rollout's progress is kept on the
//! new version's job record, so a restarted controller carries on where it was. `ops`
//! carries out the steps decided here.

use crate::state::{State, is_live};
use drover_core::state::{Job, RolloutState, Task};
use drover_core::{JobId, Millis, TaskId, TaskState};
use std::collections::BTreeMap;

/// What moving a rollout on takes.
#[derive(Debug, Default)]
pub(crate) struct Step {
    /// The job with its rollout moved on, when the rollout changed.
    pub job: Option<Job>,
    /// Old tasks to stop, each with the reason it is given.
    pub stop: Vec<(TaskId, String)>,
    /// Indexes that get their first task of the new version.
    pub start: Vec<u32>,
    /// When the rollout completed: the older versions it replaced, to be marked stopped.
    pub retire: Vec<JobId>,
}

impl Step {
    fn is_empty(&self) -> bool {
        self.job.is_none()
            && self.stop.is_empty()
            && self.start.is_empty()
            && self.retire.is_empty()
    }
}

/// The next step of `job_id`'s rollout at `now`, or `None` when there is nothing to do
/// (no rollout in progress, a job that is not the current version or has ended, or a
/// rollout waiting on its tasks).
pub(crate) fn step(state: &State, job_id: &JobId, now: Millis) -> Option<Step> {
    let job = state.jobs.get(job_id)?;
    let before = job.rollout.as_ref().filter(|r| r.in_progress())?;
    if job.status.is_final()
        || state.current.get(&(job.project.clone(), job.name.clone())) != Some(job_id)
    {
        return None;
    }
    let mut r = before.clone();
    let mut step = Step::default();
    let version = job.version;
    let count = job.spec.count;
    let policy = job.spec.update_policy();
    let olds = state.older_running(job);

    // The old tasks not yet ended, by index.
    let mut old_at: BTreeMap<u32, Vec<&Task>> = BTreeMap::new();
    for o in &olds {
        for t in state.job_tasks(&o.id).filter(|t| !t.state.is_terminal()) {
            old_at.entry(t.index).or_default().push(t);
        }
    }
    // The newest task of the new version at each index, and the first of its tasks that
    // ended on its own before its index was done.
    let mut new_at: BTreeMap<u32, &Task> = BTreeMap::new();
    let mut failed: Option<&Task> = None;
    let mut pending = false;
    for t in state.job_tasks(job_id) {
        pending |= t.state == TaskState::Pending;
        let newer = new_at
            .get(&t.index)
            .is_none_or(|n| (t.attempt, t.created_at) > (n.attempt, n.created_at));
        if newer {
            new_at.insert(t.index, t);
        }
        let failure = matches!(
            t.state,
            TaskState::Failed | TaskState::Lost | TaskState::Succeeded
        ) && !t.desired_stop
            && t.index < count
            && !r.done.contains(&t.index);
        if failure && failed.is_none_or(|f| t.updated_at < f.updated_at) {
            failed = Some(t);
        }
    }
    // The scheduler's verdict is recomputed on every pass, so it is as current as the
    // tasks: a new version no ready node could ever run would hold its index down for
    // good.
    let blocked = state
        .pending_reasons
        .get(job_id)
        .filter(|p| p.blocked && pending)
        .map(|p| format!("version {version} cannot be placed: {}", p.text));
    if let Some(why) = failed.map(describe).or(blocked) {
        r.state = RolloutState::Failed;
        r.reason = format!("rollout to version {version} failed: {why}");
        r.finished_at = Some(now);
        step.job = Some(Job {
            rollout: Some(r),
            updated_at: now,
            ..job.clone()
        });
        return Some(step);
    }

    // Indexes whose new task has run long enough are done. A task on a node that stopped
    // answering is only believed to run, so it does not count.
    let healthy = i64::try_from(policy.min_healthy_time.as_millis()).unwrap_or(i64::MAX);
    for (i, t) in &new_at {
        if *i < count
            && t.state == TaskState::Running
            && !t.desired_stop
            && !state.unreachable(t.node_id.as_ref())
            && now.saturating_sub(t.updated_at) >= healthy
            && r.done.insert(*i)
        {
            r.in_flight.remove(i);
        }
    }

    let stop_old = |step: &mut Step, i: u32, why: &str| {
        for t in old_at.get(&i).into_iter().flatten() {
            if is_live(t) {
                step.stop.push((t.id.clone(), why.to_string()));
            }
        }
    };
    // The new version runs fewer tasks: the old ones past its count go now.
    let past: Vec<u32> = old_at.range(count..).map(|(i, _)| *i).collect();
    for i in past {
        stop_old(
            &mut step,
            i,
            &format!("version {version} runs {count} task(s), not this index"),
        );
    }
    let replaced = format!("replaced by version {version} (rolling update)");
    // An index in flight gets its new task once its old ones have ended. An old task
    // still live there (one restarted meanwhile) is stopped as well.
    for i in r.in_flight.clone() {
        stop_old(&mut step, i, &replaced);
        if old_at.get(&i).is_none_or(Vec::is_empty) && !new_at.contains_key(&i) {
            step.start.push(i);
        }
    }
    // Indexes no old version runs replace nothing, so they start at once and take no
    // slot.
    for i in 0..count {
        if !r.done.contains(&i)
            && !r.in_flight.contains(&i)
            && !new_at.contains_key(&i)
            && !old_at.contains_key(&i)
        {
            step.start.push(i);
        }
    }
    // Free slots take the lowest indexes still running an old task.
    let slots = policy.max_parallel as usize;
    for (&i, _) in old_at.range(..count) {
        if r.in_flight.len() >= slots {
            break;
        }
        if r.done.contains(&i) || r.in_flight.contains(&i) || new_at.contains_key(&i) {
            continue;
        }
        r.in_flight.insert(i);
        stop_old(&mut step, i, &replaced);
    }

    if (0..count).all(|i| r.done.contains(&i)) {
        r.state = RolloutState::Complete;
        r.in_flight.clear();
        r.finished_at = Some(now);
        step.retire = olds.iter().map(|o| o.id.clone()).collect();
    }
    if &r != before {
        step.job = Some(Job {
            rollout: Some(r),
            updated_at: now,
            ..job.clone()
        });
    }
    (!step.is_empty()).then_some(step)
}

/// A new task's end in a sentence for the rollout's failure: "web[1] exited with code
/// 1".
fn describe(t: &Task) -> String {
    let who = format!("{}[{}]", t.job_name, t.index);
    match (t.state, t.reason.as_str()) {
        (_, r) if r.starts_with("exited") || r.starts_with("killed") => format!("{who} {r}"),
        (TaskState::Succeeded, _) => {
            format!("{who} exited with code 0, and a service's task must keep running")
        }
        (s, "") => format!("{who} {s}"),
        (TaskState::Lost, r) => format!("{who} was lost: {r}"),
        (s, r) => format!("{who} {s}: {r}"),
    }
}
