//! Waiting until a job reaches what a command asked of it (`job apply`, `job stop`), as
//! `nomad job run` and `kubectl rollout status` do: live progress on a terminal, the
//! pending reason while tasks wait, and a deadline.

use crate::client::Client;
use anyhow::{Result, bail};
use drover_core::api::{JobState, JobView, TaskView};
use drover_core::spec::JobKind;
use drover_core::state::RolloutState;
use drover_core::{TaskId, TaskState};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// How often the job is looked at while waiting.
const POLL: Duration = Duration::from_millis(250);

/// How long a service's tasks must have run, seen by this wait, before they count as
/// started: a task that crashes right after it starts is running for a moment, and an
/// apply must not report that as success. (Nomad's `min_healthy_time`, kept short.)
const MIN_RUNNING: Duration = Duration::from_secs(1);

/// With a server too old to say a job is crash-looping: after this many failed attempts
/// of the current version while waiting for a service to run, the wait gives up and
/// says why; the controller goes on restarting it.
const FAILED_ATTEMPTS: usize = 3;

/// What a command waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Goal {
    /// Every task has ended (`job stop`).
    Stopped,
    /// What an applied job should reach: a service's tasks all running (and healthy,
    /// where it has a health check, since such a task is `running` only once a probe
    /// passes); a batch job's tasks all placed on nodes, or the job finished.
    Applied,
}

/// How a wait ended, when the goal was reached.
pub struct Reached {
    pub job: JobView,
    pub tasks: Vec<TaskView>,
}

/// Waits until `name` reaches `goal`, or fails with what it is stuck on when `timeout`
/// passes first or a service keeps failing to start.
pub async fn wait(c: &Client, name: &str, goal: Goal, timeout: Duration) -> Result<Reached> {
    let progress = Progress::new();
    let start = Instant::now();
    // When this wait first saw each task running; a task that stops running leaves.
    let mut running_since: BTreeMap<TaskId, Instant> = BTreeMap::new();
    loop {
        let job = c.job(name).await?;
        let tasks = c.tasks(Some(name)).await?;
        let now = Instant::now();
        running_since.retain(|id, _| {
            tasks
                .iter()
                .any(|t| &t.task.id == id && t.task.state == TaskState::Running)
        });
        for t in tasks.iter().filter(|t| t.task.state == TaskState::Running) {
            running_since.entry(t.task.id.clone()).or_insert(now);
        }
        let goal_of = goal_for(goal, &job);
        match check(goal_of, &job, &tasks) {
            Check::Reached
                if goal_of == Target::Running
                    && running_since
                        .values()
                        .filter(|since| now.duration_since(**since) >= MIN_RUNNING)
                        .count()
                        < job.job.spec.count as usize => {}
            Check::Reached => {
                progress.done();
                return Ok(Reached { job, tasks });
            }
            Check::Failing(why) => {
                progress.done();
                bail!("{why}");
            }
            Check::Waiting => {}
        }
        let summary = summarise(&job, &tasks);
        if start.elapsed() >= timeout {
            progress.done();
            bail!(
                "job {name} did not {} within {}: {summary}; it goes on (`drover job status {name}`), and --timeout waits longer",
                goal_of.verb(),
                humantime::format_duration(timeout)
            );
        }
        progress.show(&format!("job {name}: {summary}"));
        tokio::time::sleep(POLL).await;
    }
}

/// What the wait checks for this job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Stopped,
    Running,
    Placed,
}

impl Target {
    fn verb(self) -> &'static str {
        match self {
            Target::Stopped => "stop",
            Target::Running => "run",
            Target::Placed => "get its tasks placed",
        }
    }
}

fn goal_for(goal: Goal, job: &JobView) -> Target {
    match (goal, job.job.spec.kind) {
        (Goal::Stopped, _) => Target::Stopped,
        (Goal::Applied, JobKind::Service) => Target::Running,
        (Goal::Applied, JobKind::Batch) => Target::Placed,
    }
}

enum Check {
    Reached,
    Waiting,
    Failing(String),
}

/// Whether the job has reached `target`, from one look at it and its tasks.
fn check(target: Target, job: &JobView, tasks: &[TaskView]) -> Check {
    let j = &job.job;
    match (target, job.state) {
        (Target::Placed | Target::Running, Some(JobState::Blocked)) => {
            let why = job
                .pending_reason
                .as_deref()
                .unwrap_or("no node can run it");
            return Check::Failing(format!(
                "job {} is blocked: {why}; it stays queued until a node that can run it joins (`drover job stop {}` drops it)",
                j.name, j.name
            ));
        }
        (Target::Running, Some(JobState::CrashLooping)) => {
            let last = latest_failure(tasks)
                .map(|t| format!(": task {} {}", t.task.index, t.task.reason))
                .unwrap_or_default();
            return Check::Failing(format!(
                "job {} is crash-looping{last}; the controller keeps restarting it with back-off (`drover logs {}`)",
                j.name, j.name
            ));
        }
        _ => {}
    }
    // While a service rolls out a new version, it has reached what was applied only
    // once every index runs the new version; a rollout that failed will not get there.
    if target == Target::Running
        && !j.status.is_final()
        && let Some(r) = &j.rollout
    {
        match r.state {
            RolloutState::InProgress => return Check::Waiting,
            RolloutState::Failed => {
                return Check::Failing(format!(
                    "{}; the old tasks not replaced keep running: fix the spec and apply it again, or go back with `drover job revert {} {}`",
                    r.reason, j.name, r.from_version
                ));
            }
            _ => {}
        }
    }
    let all_ended = tasks.iter().all(|t| t.task.state.is_terminal());
    match target {
        Target::Stopped => {
            if j.status.is_final() && all_ended {
                Check::Reached
            } else {
                Check::Waiting
            }
        }
        Target::Placed => {
            let placed = tasks
                .iter()
                .all(|t| t.task.state != TaskState::Pending || t.task.desired_stop);
            if (j.status.is_final() && all_ended) || (!tasks.is_empty() && placed) {
                Check::Reached
            } else {
                Check::Waiting
            }
        }
        Target::Running => {
            if j.status.is_final() {
                let why = if j.reason.is_empty() {
                    String::new()
                } else {
                    format!(": {}", j.reason)
                };
                return Check::Failing(format!("job {} {}{why}", j.name, j.status));
            }
            // A server that derives the job's state said above whether it crash-loops;
            // counting failures across indexes would also count ones since recovered.
            let failed = tasks
                .iter()
                .filter(|t| t.task.state == TaskState::Failed)
                .count();
            if job.state.is_none() && failed >= FAILED_ATTEMPTS {
                let last = latest_failure(tasks)
                    .map(|t| format!("; the latest, task {}: {}", t.task.index, t.task.reason))
                    .unwrap_or_default();
                return Check::Failing(format!(
                    "job {} is failing to start: {failed} attempts failed{last}; the controller keeps restarting it (`drover logs {}`)",
                    j.name, j.name
                ));
            }
            let running = tasks
                .iter()
                .filter(|t| t.task.state == TaskState::Running)
                .count();
            if running >= j.spec.count as usize {
                Check::Reached
            } else {
                Check::Waiting
            }
        }
    }
}

/// The attempt that failed last.
fn latest_failure(tasks: &[TaskView]) -> Option<&TaskView> {
    tasks
        .iter()
        .filter(|t| t.task.state == TaskState::Failed)
        .max_by_key(|t| t.task.updated_at)
}

/// A line on where the job's tasks are: `1/2 running, 1 pending (waiting: ...)`.
pub fn summarise(job: &JobView, tasks: &[TaskView]) -> String {
    let mut by_state: BTreeMap<TaskState, usize> = BTreeMap::new();
    for t in tasks {
        *by_state.entry(t.task.state).or_insert(0) += 1;
    }
    let running = by_state.remove(&TaskState::Running).unwrap_or(0);
    let mut parts = vec![format!("{running}/{} running", job.job.spec.count)];
    parts.extend(by_state.iter().map(|(s, n)| format!("{n} {s}")));
    let mut line = parts.join(", ");
    let j = &job.job;
    if let Some(r) = j.rollout.as_ref().filter(|r| r.in_progress())
        && !j.status.is_final()
    {
        line = format!(
            "rolling out version {}: {}/{} tasks updated; {line}",
            j.version,
            r.updated(j.spec.count),
            j.spec.count
        );
    }
    if let Some(why) = &job.pending_reason {
        line.push_str(&format!(" (waiting: {why})"));
    }
    line
}

/// A spinner on stderr when it is a terminal; nothing otherwise, so logs and scripts
/// get only the outcome.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    fn new() -> Progress {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {wide_msg}") {
                bar.set_style(style);
            }
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        Progress { bar }
    }

    fn show(&self, line: &str) {
        if let Some(bar) = &self.bar {
            bar.set_message(line.to_string());
        }
    }

    fn done(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_core::ProjectId;
    use drover_core::spec::JobSpec;
    use drover_core::state::{Job, JobStatus, Task};

    fn job(kind: JobKind, count: u32, status: JobStatus) -> JobView {
        let mut spec = JobSpec::new("web", vec!["true".into()]);
        spec.kind = kind;
        spec.count = count;
        let job = Job {
            status,
            ..Job::new(ProjectId::default_project(), spec, 1, 0)
        };
        JobView {
            job,
            task_states: BTreeMap::new(),
            pending_reason: None,
            state: None,
        }
    }

    fn tasks(job: &JobView, states: &[TaskState]) -> Vec<TaskView> {
        states
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let t = Task {
                    state: *s,
                    created_at: i as i64,
                    updated_at: i as i64,
                    ..Task::pending(&job.job, i as u32, 0, 0, 0)
                };
                TaskView {
                    task: t,
                    node_name: None,
                    usage: None,
                    unknown: false,
                    pending_reason: None,
                    version: None,
                }
            })
            .collect()
    }

    fn reached(goal: Goal, job: &JobView, states: &[TaskState]) -> &'static str {
        match check(goal_for(goal, job), job, &tasks(job, states)) {
            Check::Reached => "reached",
            Check::Waiting => "waiting",
            Check::Failing(_) => "failing",
        }
    }

    #[test]
    fn each_kind_of_job_is_waited_for_until_its_own_goal() {
        use TaskState::*;
        let svc = job(JobKind::Service, 2, JobStatus::Running);
        assert_eq!(reached(Goal::Applied, &svc, &[Running, Pending]), "waiting");
        assert_eq!(reached(Goal::Applied, &svc, &[Running, Running]), "reached");
        assert_eq!(
            reached(
                Goal::Applied,
                &svc,
                &[Failed, Failed, Failed, Pending, Pending]
            ),
            "failing"
        );
        let batch = job(JobKind::Batch, 2, JobStatus::Running);
        assert_eq!(
            reached(Goal::Applied, &batch, &[Scheduled, Pending]),
            "waiting"
        );
        assert_eq!(
            reached(Goal::Applied, &batch, &[Preparing, Succeeded]),
            "reached"
        );
        assert_eq!(reached(Goal::Applied, &batch, &[]), "waiting");
        let done = job(JobKind::Batch, 1, JobStatus::Complete);
        assert_eq!(reached(Goal::Applied, &done, &[Succeeded]), "reached");
        assert_eq!(
            reached(Goal::Stopped, &svc, &[Stopping, Stopped]),
            "waiting"
        );
        let stopped = job(JobKind::Service, 2, JobStatus::Stopped);
        assert_eq!(
            reached(Goal::Stopped, &stopped, &[Stopping, Stopped]),
            "waiting"
        );
        assert_eq!(
            reached(Goal::Stopped, &stopped, &[Stopped, Stopped]),
            "reached"
        );
        assert_eq!(reached(Goal::Applied, &stopped, &[Stopped]), "failing");
        // A rollout is waited for until its last index is done, and fails the wait when
        // it fails, whatever the tasks look like meanwhile.
        let mut rolling = svc.clone();
        rolling.job.rollout = Some(drover_core::state::Rollout::start(1, 0));
        assert_eq!(
            reached(Goal::Applied, &rolling, &[Running, Running]),
            "waiting"
        );
        assert!(
            summarise(&rolling, &tasks(&rolling, &[Running, Running]))
                .starts_with("rolling out version 1: 0/2 tasks updated; 2/2 running")
        );
        if let Some(r) = rolling.job.rollout.as_mut() {
            r.state = RolloutState::Failed;
        }
        assert_eq!(
            reached(Goal::Applied, &rolling, &[Running, Running]),
            "failing"
        );
        if let Some(r) = rolling.job.rollout.as_mut() {
            r.state = RolloutState::Complete;
        }
        assert_eq!(
            reached(Goal::Applied, &rolling, &[Running, Running]),
            "reached"
        );
        // A server that says the job's state is trusted: failures since recovered from
        // do not fail the wait.
        let recovered = JobView {
            state: Some(JobState::Running),
            ..svc.clone()
        };
        assert_eq!(
            reached(
                Goal::Applied,
                &recovered,
                &[Failed, Failed, Failed, Running, Running]
            ),
            "reached"
        );
    }
}
