//! The controller's operations: applying and stopping jobs, reacting to agent events,
//! node registration and liveness, and the command outbox to agents.

use crate::state::{OutCommand, State};
use crate::{Inner, Tx};
use drover_core::api::ApplyResponse;
use drover_core::protocol::{AgentEvent, Command, ControllerMessage, Hello, UsageSample};
use drover_core::spec::HealthCheck;
use drover_core::spec::OnLost;
use drover_core::state::{
    Exit, Job, JobStatus, Node, NodeStatus, Rollout, RolloutState, Task, TaskEventKind,
};
use drover_core::{JobId, JobKind, JobSpec, NodeId, ProjectId, TaskId, TaskState, duration_millis};
use drover_store::{Change, StoreError};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How a submission is carried out.
#[derive(Clone, Debug, Default)]
pub(crate) struct ApplyOptions {
    /// The request's `Idempotency-Key`: a repeat with it gets the first answer.
    pub idempotency_key: Option<String>,
    /// Run an unchanged spec again when its job has finished (`drover job rerun`).
    pub rerun: bool,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ApplyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    KeyReused(String),
}

/// What applying a spec does to the job of its name: the one rule, which both
/// [`Inner::apply_job`] carries out and the plan (`POST /v1/plan`) reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// No job has the name: version 1.
    Create,
    /// The same spec as the current version: nothing changes.
    Unchanged,
    /// A running service whose spec differs only in its count: tasks are added or
    /// stopped in place.
    Scale { from: u32, to: u32 },
    /// Any other change: a new version whose tasks replace the current one's.
    Update { version: u32 },
    /// The unchanged spec of a finished job, run again as a new version because it was
    /// asked for (`drover job rerun`).
    Rerun { version: u32 },
}

/// Decides what applying `spec` does, given the current version of its job (if any).
pub(crate) fn decide(current: Option<&Job>, spec: &JobSpec, rerun: bool) -> Decision {
    let Some(cur) = current else {
        return Decision::Create;
    };
    let version = cur.version + 1;
    // The same spec again changes nothing, running or finished: running an unchanged
    // finished job again is asked for explicitly (`drover job rerun`), never a side
    // effect of a resubmission.
    if cur.spec == *spec {
        return if rerun && cur.status.is_final() {
            Decision::Rerun { version }
        } else {
            Decision::Unchanged
        };
    }
    // A running service whose spec changes only in its count is scaled in place:
    // tasks are added or stopped, and those that keep running are left alone (a new
    // version would restart every one of them).
    if !cur.status.is_final()
        && cur.spec.kind == JobKind::Service
        && cur.spec.count != spec.count
        && (JobSpec {
            count: cur.spec.count,
            ..spec.clone()
        }) == cur.spec
    {
        return Decision::Scale {
            from: cur.spec.count,
            to: spec.count,
        };
    }
    Decision::Update { version }
}

/// [`decide`] for a job as the state holds it: a count change is a new version, not a
/// scaling, while a rollout has left older versions running (scaling would touch only
/// the current version's tasks). Applying and planning both decide through this.
pub(crate) fn decide_in(
    state: &State,
    current: Option<&Job>,
    spec: &JobSpec,
    rerun: bool,
) -> Decision {
    match (decide(current, spec, rerun), current) {
        (Decision::Scale { .. }, Some(cur)) if !state.older_running(cur).is_empty() => {
            Decision::Update {
                version: cur.version + 1,
            }
        }
        (d, _) => d,
    }
}

impl Inner {
    /// Creates a job, or a new version of it when the spec changed (or the previous one
    /// has finished). A running service's new version is rolled out (see
    /// [`crate::rollout`]); any other new version replaces the old one's tasks at once.
    /// Returns once the result is durably stored.
    pub(crate) async fn apply_job(
        &self,
        project: ProjectId,
        spec: JobSpec,
        how: ApplyOptions,
    ) -> Result<ApplyResponse, ApplyError> {
        let mut state = self.state.lock().await;
        let state = &mut *state;
        let mut tx = Tx::default();
        let now = self.now();
        if let Some(key) = &how.idempotency_key
            && let Some(first) = state.job_by_key(&project, key, now)
        {
            // A retry of a request that was carried out: the first answer again,
            // whatever has happened to the job since.
            if first.spec != spec {
                return Err(ApplyError::KeyReused(format!(
                    "idempotency key {key:?} was used for a different spec of job {} (version {}); use a new key for a new request",
                    first.name, first.version
                )));
            }
            let result = if first.version == 1 {
                "created"
            } else {
                "updated"
            };
            return Ok(ApplyResponse {
                job: state.job_view(first),
                result: result.into(),
            });
        }
        let existing = state.job_by_name(&project, &spec.name).cloned();
        // Unchanged and Scale are only ever decided for a job that exists.
        let decision = decide_in(state, existing.as_ref(), &spec, how.rerun);
        if let (Decision::Unchanged, Some(cur)) = (decision, &existing) {
            return Ok(ApplyResponse {
                job: state.job_view(cur),
                result: "unchanged".into(),
            });
        }
        if let (Decision::Scale { to, .. }, Some(cur)) = (decision, &existing) {
            let job = self.scale(state, &mut tx, cur, to, now);
            self.commit(state, tx).await?;
            self.flush_all(state);
            self.schedule.notify_one();
            return Ok(ApplyResponse {
                job: state.job_view(&job),
                result: "scaled".into(),
            });
        }
        let version = existing.as_ref().map(|j| j.version + 1).unwrap_or(1);
        // A running service that stays a service is rolled over to the new version a
        // few tasks at a time; anything else is replaced at once.
        let running = existing.as_ref().filter(|cur| !cur.status.is_final());
        let rolls = spec.kind == JobKind::Service
            && running.is_some_and(|cur| cur.spec.kind == JobKind::Service);
        if let Some(cur) = running {
            if rolls {
                // The versions that run keep running: the new rollout replaces their
                // tasks, and takes over from a rollout still under way.
                if let Some(r) = cur.rollout.as_ref().filter(|r| r.in_progress()) {
                    let mut r = r.clone();
                    r.state = RolloutState::Stopped;
                    r.reason = format!("superseded by version {version}");
                    r.finished_at = Some(now);
                    let prev = Job {
                        rollout: Some(r),
                        updated_at: now,
                        ..cur.clone()
                    };
                    tx.put(state, Change::Job(prev));
                }
            } else {
                let mut replaced: Vec<JobId> = state
                    .older_running(cur)
                    .into_iter()
                    .map(|j| j.id.clone())
                    .collect();
                replaced.push(cur.id.clone());
                for id in replaced {
                    self.retire(state, &mut tx, &id, version, now);
                }
            }
        }
        let job = Job {
            idempotency_key: how.idempotency_key,
            rollout: running
                .filter(|_| rolls)
                .map(|cur| Rollout::start(cur.version, now)),
            ..Job::new(project.clone(), spec, version, now)
        };
        tx.put(state, Change::Job(job.clone()));
        if rolls {
            self.step_rollout(state, &mut tx, &job.id, now);
            self.commit(state, tx).await?;
            self.flush_all(state);
            self.schedule.notify_one();
            tracing::info!(job = %job.name, version, "rolling out");
            let job = state.jobs.get(&job.id).unwrap_or(&job);
            return Ok(ApplyResponse {
                job: state.job_view(job),
                result: format!("rolling out version {version}"),
            });
        }
        let mut ids = Vec::with_capacity(job.spec.count as usize);
        for index in 0..job.spec.count {
            let t = Task::pending(&job, index, 0, now, now);
            ids.push(t.id.clone());
            tx.put(state, Change::Task(t));
        }
        // Placing the new tasks in the same transaction saves a commit and a scheduler
        // wake-up on the path from submit to running; what fits nowhere stays pending
        // for the scheduler, as usual.
        let placed = if ids.len() <= crate::scheduler::BATCH {
            self.place(state, &mut tx, ids, now)
        } else {
            Vec::new()
        };
        self.commit(state, tx).await?;
        self.dispatch(state, placed);
        tracing::debug!(job = %job.name, "job stored");
        self.flush_all(state);
        self.schedule.notify_one();
        let result = if version == 1 { "created" } else { "updated" };
        Ok(ApplyResponse {
            job: state.job_view(&job),
            result: result.into(),
        })
    }

    /// Sets a running service's count: indexes past the new count have their tasks
    /// stopped, new indexes get pending tasks. Returns the job as it is now.
    fn scale(&self, state: &mut State, tx: &mut Tx, cur: &Job, count: u32, now: i64) -> Job {
        let mut job = cur.clone();
        let from = job.spec.count;
        job.spec.count = count;
        job.updated_at = now;
        tx.put(state, Change::Job(job.clone()));
        let surplus: Vec<Task> = state
            .job_tasks(&job.id)
            .filter(|t| t.index >= count && !t.state.is_terminal())
            .cloned()
            .collect();
        let reason = format!("scaled from {from} to {count}");
        for t in surplus {
            self.stop_task(state, tx, t, &reason, false);
        }
        for index in from..count {
            let mut t = Task::pending(&job, index, 0, now, now);
            t.record(
                now,
                TaskEventKind::Created,
                format!("added when the job was scaled from {from} to {count}"),
            );
            tx.put(state, Change::Task(t));
        }
        tracing::info!(job = %job.name, from, to = count, "scaled");
        job
    }

    /// A version replaced by `version` is stopped, with its tasks.
    fn retire(&self, state: &mut State, tx: &mut Tx, id: &JobId, version: u32, now: i64) {
        let Some(old) = state.jobs.get(id) else {
            return;
        };
        let old = Job {
            status: JobStatus::Stopped,
            reason: format!("replaced by version {version}"),
            updated_at: now,
            ..old.clone()
        };
        tx.put(state, Change::Job(old));
        self.stop_tasks_of(
            state,
            tx,
            id,
            &format!("job updated to version {version}"),
            false,
        );
    }

    /// Moves a job's rollout on as far as it goes now (see [`crate::rollout`]): stops
    /// the old tasks it takes, starts new ones where the old have ended, and retires the
    /// old versions when it completes.
    fn step_rollout(&self, state: &mut State, tx: &mut Tx, job_id: &JobId, now: i64) {
        // A step changes the state the next one reads (a pending old task stopped at
        // once frees its index now), so a few steps are taken together; more than this
        // are never needed, since each step only acts on what the one before did.
        for _ in 0..4 {
            let Some(step) = crate::rollout::step(state, job_id, now) else {
                return;
            };
            let version = match &step.job {
                Some(job) => {
                    if let Some(r) = &job.rollout {
                        tracing::info!(job = %job.name, version = job.version, state = %r.state, updated = r.updated(job.spec.count), "rollout moved on");
                    }
                    let version = job.version;
                    tx.put(state, Change::Job(job.clone()));
                    version
                }
                None => state.jobs.get(job_id).map_or(0, |j| j.version),
            };
            for (id, reason) in step.stop {
                if let Some(t) = state.tasks.get(&id).cloned() {
                    self.stop_task(state, tx, t, &reason, false);
                }
            }
            if !step.start.is_empty()
                && let Some(job) = state.jobs.get(job_id).cloned()
            {
                for index in step.start {
                    tx.put(state, Change::Task(Task::pending(&job, index, 0, now, now)));
                }
                self.schedule.notify_one();
            }
            for id in step.retire {
                self.retire(state, tx, &id, version, now);
            }
        }
    }

    /// Moves on the rollouts whose tasks changed (`due`), or every rollout in progress.
    fn step_rollouts(&self, state: &mut State, tx: &mut Tx, all: bool) {
        let due: Vec<JobId> = if all {
            state.rollouts_due.clear();
            state.rolling.values().cloned().collect()
        } else {
            state.rollouts_due.drain().collect()
        };
        let now = self.now();
        for id in due {
            self.step_rollout(state, tx, &id, now);
        }
    }

    /// Stops every task of the named job and marks it stopped. A forced stop gives the
    /// tasks no grace, including those already stopping under a longer one.
    pub(crate) async fn stop_job(
        &self,
        job_id: &JobId,
        force: bool,
    ) -> Result<Option<Job>, StoreError> {
        let mut state = self.state.lock().await;
        let state = &mut *state;
        let Some(mut job) = state.jobs.get(job_id).cloned() else {
            return Ok(None);
        };
        let mut tx = Tx::default();
        let now = self.now();
        // The versions a rollout has not replaced yet run beside this one, and stop with
        // it.
        let older: Vec<Job> = state.older_running(&job).into_iter().cloned().collect();
        if job.status == JobStatus::Running {
            job.status = JobStatus::Stopped;
            job.reason = "stopped by user".into();
            job.updated_at = now;
            if let Some(r) = job.rollout.as_mut().filter(|r| r.in_progress()) {
                r.state = RolloutState::Stopped;
                r.reason = "the job was stopped".into();
                r.finished_at = Some(now);
            }
            tx.put(state, Change::Job(job.clone()));
        }
        let reason = if force {
            "stopped by user (forced)"
        } else {
            "stopped by user"
        };
        for mut old in older {
            old.status = JobStatus::Stopped;
            old.reason = "stopped by user".into();
            old.updated_at = now;
            let id = old.id.clone();
            tx.put(state, Change::Job(old));
            self.stop_tasks_of(state, &mut tx, &id, reason, force);
        }
        self.stop_tasks_of(state, &mut tx, job_id, reason, force);
        self.commit(state, tx).await?;
        self.flush_all(state);
        Ok(Some(job))
    }

    /// Pending tasks end at once; placed ones are asked to stop through their agent.
    /// `force` asks again, with no grace, even those already asked.
    fn stop_tasks_of(
        &self,
        state: &mut State,
        tx: &mut Tx,
        job_id: &JobId,
        reason: &str,
        force: bool,
    ) {
        let tasks: Vec<Task> = state
            .job_tasks(job_id)
            .filter(|t| !t.state.is_terminal())
            .cloned()
            .collect();
        for t in tasks {
            self.stop_task(state, tx, t, reason, force);
        }
    }

    /// Stops one task: a task on no node ends at once, a placed one is asked to stop
    /// through its agent (once, or again with no grace when `force` is new; the command
    /// is re-sent until acknowledged).
    fn stop_task(&self, state: &mut State, tx: &mut Tx, mut t: Task, reason: &str, force: bool) {
        let now = self.now();
        if t.state == TaskState::Pending || t.node_id.is_none() {
            if t.advance(TaskState::Stopped, reason, None, now) {
                tx.put(state, Change::Task(t));
            }
            return;
        }
        let asked = t.desired_stop && (t.stop_forced || !force);
        if asked || t.state.is_terminal() {
            return;
        }
        t.desired_stop = true;
        t.stop_forced |= force;
        t.updated_at = now;
        let how = if force {
            "stop requested (forced)"
        } else {
            "stop requested"
        };
        t.record(
            now,
            TaskEventKind::StopRequested,
            format!("{how}: {reason}"),
        );
        // Kept so that a stop re-sent after the agent reconnects gives the same reason.
        t.reason = reason.to_string();
        let grace = stop_grace_ms(state, &t);
        let node = t.node_id.clone();
        let id = t.id.clone();
        tx.put(state, Change::Task(t));
        if let Some(node) = node {
            self.enqueue(
                state,
                &node,
                Command::Stop {
                    task_id: id,
                    grace_ms: grace,
                    reason: reason.to_string(),
                },
            );
        }
    }

    /// Decides what follows a task's end: a retry, a restart, or the job's completion.
    fn on_task_terminal(&self, state: &mut State, tx: &mut Tx, task: &Task) {
        // An index with an original and its replacement first settles which copy
        // stands; a copy still live then takes the place of a retry or restart.
        let sibling_lives = state.doubled.contains(&(task.job_id.clone(), task.index))
            && self.settle_doubled(state, tx, task);
        let Some(job) = state.jobs.get(&task.job_id) else {
            return;
        };
        if job.status.is_final() || task.desired_stop {
            return;
        }
        // A copy of an index that another copy already finished needs nothing more.
        if job.spec.kind == JobKind::Batch
            && task.state != TaskState::Succeeded
            && state
                .succeeded
                .get(&job.id)
                .is_some_and(|done| done.contains(&task.index))
        {
            return;
        }
        if task.state == TaskState::Lost && job.spec.disconnect.on_lost == OnLost::Fail {
            let mut job = job.clone();
            job.status = JobStatus::Failed;
            job.reason = format!(
                "task {} was lost and the job's disconnect.on_lost is fail, so it is not run again: {}",
                task.index, task.reason
            );
            job.updated_at = self.now();
            let id = job.id.clone();
            tx.put(state, Change::Job(job));
            self.stop_tasks_of(state, tx, &id, "another task of the job was lost", false);
            return;
        }
        // The common end of a batch task is checked against a running count, without
        // copying the job or walking its tasks: with a thousand tasks in a job, a walk
        // per task made finishing the job quadratic.
        if job.spec.kind == JobKind::Batch && task.state == TaskState::Succeeded {
            let done = state.succeeded.get(&job.id).map_or(0, |d| d.len() as u32);
            if done < job.spec.count {
                return;
            }
        }
        let mut job = job.clone();
        let now = self.now();
        let policy = job.spec.restart;
        match job.spec.kind {
            JobKind::Batch => {
                if task.state == TaskState::Succeeded {
                    // Only reached once every index has succeeded (checked above).
                    job.status = JobStatus::Complete;
                    job.exit = Some(Exit {
                        code: Some(0),
                        signal: None,
                    });
                    job.updated_at = now;
                    tx.put(state, Change::Job(job));
                    return;
                }
                // A lost task is not the program's fault, so it does not use up a retry.
                let failures = state
                    .job_tasks(&job.id)
                    .filter(|t| {
                        t.index == task.index
                            && matches!(t.state, TaskState::Failed | TaskState::Stopped)
                    })
                    .count() as u32;
                if task.state != TaskState::Lost && failures > policy.attempts {
                    job.status = JobStatus::Failed;
                    job.reason = format!(
                        "task {} failed after {} attempt{}: {}",
                        task.index,
                        failures,
                        if failures == 1 { "" } else { "s" },
                        task.reason
                    );
                    job.exit = task.exit.clone();
                    job.updated_at = now;
                    let id = job.id.clone();
                    tx.put(state, Change::Job(job));
                    self.stop_tasks_of(state, tx, &id, "another task of the job failed", false);
                    return;
                }
                if sibling_lives {
                    return;
                }
                let delay = if task.state == TaskState::Lost {
                    Duration::ZERO
                } else {
                    policy.delay_for(failures)
                };
                let mut t = Task::pending(
                    &job,
                    task.index,
                    task.attempt + 1,
                    now,
                    now.saturating_add(duration_millis(delay)),
                );
                t.record(now, TaskEventKind::Restart, restart_message(task, delay));
                tx.put(state, Change::Task(t));
            }
            JobKind::Service => {
                // An index past the count was scaled away: it is not restarted.
                if sibling_lives || task.index >= job.spec.count {
                    return;
                }
                let delay = if task.state == TaskState::Lost {
                    Duration::ZERO
                } else {
                    policy.delay_for(
                        task.attempt
                            .saturating_add(1)
                            .min(policy.attempts.max(1) + 8),
                    )
                };
                let mut t = Task::pending(
                    &job,
                    task.index,
                    task.attempt + 1,
                    now,
                    now.saturating_add(duration_millis(delay)),
                );
                t.reason = format!("restarting after task {} ended: {}", task.id, task.reason);
                t.record(now, TaskEventKind::Restart, restart_message(task, delay));
                tx.put(state, Change::Task(t));
            }
        }
        self.schedule.notify_one();
    }

    /// One of two live copies of an index ended (see [`State::doubled`]). A success
    /// settles the index: the other copy is lost if its node is still unreachable, or
    /// stopped. Any other end leaves the other copy to carry on. Returns whether a live
    /// copy remains.
    fn settle_doubled(&self, state: &mut State, tx: &mut Tx, ended: &Task) -> bool {
        let key = (ended.job_id.clone(), ended.index);
        let siblings = state.live_siblings(ended);
        if siblings.len() <= 1 || ended.state == TaskState::Succeeded {
            state.doubled.remove(&key);
        }
        if ended.state != TaskState::Succeeded {
            return !siblings.is_empty();
        }
        for s in siblings {
            if state.unreachable(s.node_id.as_ref()) {
                let reason = format!(
                    "superseded: task {} of the same index succeeded while this task's node was unreachable",
                    ended.id
                );
                self.advance_task(state, tx, &s.id, TaskState::Lost, &reason, None);
            } else {
                let reason = format!("superseded: task {} of the same index succeeded", ended.id);
                self.stop_task(state, tx, s, &reason, false);
            }
        }
        false
    }

    /// Moves a task forward (if that is a forward move) and follows up on its end.
    pub(crate) fn advance_task(
        &self,
        state: &mut State,
        tx: &mut Tx,
        id: &TaskId,
        next: TaskState,
        reason: &str,
        exit: Option<Exit>,
    ) {
        self.move_task(state, tx, id, |t, now| t.advance(next, reason, exit, now));
    }

    /// [`Inner::advance_task`] for a move an agent reported: the task's timeline records
    /// when the agent saw it (a replayed event may be minutes old).
    fn advance_task_reported(&self, state: &mut State, tx: &mut Tx, ev: &AgentEvent) {
        self.move_task(state, tx, &ev.task_id, |t, now| {
            t.advance_reported(ev.state, &ev.reason, ev.exit.clone(), now, ev.at)
        });
    }

    /// Moves a task with `advance` (given the task and the time now), which says
    /// whether it moved; a move is stored and its end followed up on.
    fn move_task(
        &self,
        state: &mut State,
        tx: &mut Tx,
        id: &TaskId,
        advance: impl FnOnce(&mut Task, i64) -> bool,
    ) {
        let Some(mut t) = state.tasks.get(id).cloned() else {
            return;
        };
        let now = self.now();
        if !advance(&mut t, now) {
            return;
        }
        // A task with a health check is reported running only once a probe passed, so
        // its start is also the check's first pass.
        if t.state == TaskState::Running
            && let Some(h) = state
                .jobs
                .get(&t.job_id)
                .and_then(|j| j.spec.health.as_ref())
        {
            let at = t.events.last().map_or(now, |e| e.at);
            t.record(
                at,
                TaskEventKind::HealthPassed,
                format!("health check passed ({})", probe_text(h)),
            );
        }
        if let Some(rolling) = state.rolling.get(&(t.project.clone(), t.job_name.clone())) {
            state.rollouts_due.insert(rolling.clone());
        }
        tx.put(state, Change::Task(t.clone()));
        if t.state.is_terminal() {
            state.usage_dirty |= state.usage.remove(&t.id).is_some();
            self.on_task_terminal(state, tx, &t);
        }
    }

    /// Registers (or re-registers) a node and reconciles its tasks with the agent's.
    pub(crate) async fn on_hello(
        &self,
        hello: &Hello,
        protocol_version: u32,
        conn_id: u64,
        out: tokio::sync::mpsc::Sender<std::sync::Arc<str>>,
    ) -> Result<(), StoreError> {
        let mut state = self.state.lock().await;
        let state = &mut *state;
        let mut tx = Tx::default();
        let now = self.now();
        let node_id = hello.node_id.clone();
        let node = match state.nodes.get(&node_id) {
            Some(e) => {
                let mut n = e.node.clone();
                n.info = hello.info.clone();
                n.status = NodeStatus::Ready;
                n.last_seen = now;
                n.protocol_version = protocol_version;
                // Its tasks were unknown; once the agent has replayed what happened to
                // them (before its first heartbeat), copies made meanwhile are settled.
                if n.unreachable_since.take().is_some() {
                    self.returning_lock().insert(node_id.clone());
                }
                n
            }
            None => Node {
                id: node_id.clone(),
                info: hello.info.clone(),
                status: NodeStatus::Ready,
                last_seen: now,
                last_event_seq: 0,
                registered_at: now,
                unreachable_since: None,
                protocol_version,
            },
        };
        let last_event_seq = node.last_event_seq;
        tx.put(state, Change::Node(node));

        let known: HashSet<&TaskId> = hello.known_tasks.iter().collect();
        let on_node: Vec<Task> = state
            .tasks
            .values()
            .filter(|t| t.node_id.as_ref() == Some(&node_id) && !t.state.is_terminal())
            .cloned()
            .collect();
        for t in &on_node {
            if !known.contains(&t.id)
                && t.state == TaskState::Scheduled
                && state.doubled.contains(&(t.job_id.clone(), t.index))
            {
                // Its start never reached the agent and a replacement runs elsewhere:
                // it ends here rather than start late beside its replacement.
                if let Some(task) = state.tasks.get_mut(&t.id) {
                    task.desired_stop = true;
                }
                self.advance_task(
                    state,
                    &mut tx,
                    &t.id,
                    TaskState::Stopped,
                    "replaced while its node was unreachable, before it started",
                    None,
                );
                continue;
            }
            if !known.contains(&t.id) && t.state != TaskState::Scheduled {
                self.advance_task(
                    state,
                    &mut tx,
                    &t.id,
                    TaskState::Lost,
                    "the agent restarted and no longer had this task",
                    None,
                );
            }
        }
        let mut forget = Vec::new();
        for id in &hello.known_tasks {
            let owned = state
                .tasks
                .get(id)
                .is_some_and(|t| t.node_id.as_ref() == Some(&node_id) && !t.state.is_terminal());
            if !owned {
                forget.push(id.clone());
            }
        }
        self.commit(state, tx).await?;

        // Rebuild this node's commands from the tasks: whatever the agent has not done
        // yet is asked for again, so nothing depends on earlier sends having arrived.
        state.outbox.remove(&node_id);
        state.unsent.remove(&node_id);
        let tasks_now: Vec<Task> = state
            .tasks
            .values()
            .filter(|t| t.node_id.as_ref() == Some(&node_id) && !t.state.is_terminal())
            .cloned()
            .collect();
        for t in tasks_now {
            if t.desired_stop {
                let grace = stop_grace_ms(state, &t);
                self.enqueue(
                    state,
                    &node_id,
                    Command::Stop {
                        task_id: t.id.clone(),
                        grace_ms: grace,
                        reason: t.reason.clone(),
                    },
                );
            } else if t.state == TaskState::Scheduled
                && let Some(cmd) =
                    crate::scheduler::start_command(state, &t, self.buffers.nats_url.as_deref())
            {
                self.enqueue(state, &node_id, cmd);
            }
        }
        for id in forget {
            self.enqueue(state, &node_id, Command::Forget { task_id: id });
        }
        // The welcome must be the first message the agent reads, before any command, so
        // it is queued before the session becomes visible to senders.
        let welcome = crate::frame(&ControllerMessage::Welcome {
            protocol_version,
            node_id: node_id.clone(),
            heartbeat_interval_ms: self.cfg.heartbeat_interval.as_millis() as u64,
            last_event_seq,
        });
        // The queue is new and empty, so only a connection already gone refuses it.
        if out.try_send(welcome).is_err() {
            tracing::debug!(node = %node_id, "welcome not sent: the connection closed");
        }
        {
            let mut sessions = self.sessions_lock();
            sessions.insert(node_id.clone(), crate::Session { conn_id, tx: out });
            self.metrics.connected_agents.set(sessions.len() as i64);
            self.metrics.agent_sessions.inc();
        }
        self.flush_all(state);
        self.schedule.notify_one();
        Ok(())
    }

    /// Applies a batch of agent events in one commit; returns the seq to acknowledge.
    pub(crate) async fn on_events(
        &self,
        node_id: &NodeId,
        events: &[AgentEvent],
    ) -> Result<u64, StoreError> {
        let mut state = self.state.lock().await;
        let state = &mut *state;
        let Some(entry) = state.nodes.get(node_id) else {
            return Ok(0);
        };
        let mut node = entry.node.clone();
        let mut tx = Tx::default();
        for ev in events {
            if ev.seq <= node.last_event_seq {
                continue;
            }
            node.last_event_seq = ev.seq;
            let owned = state
                .tasks
                .get(&ev.task_id)
                .is_some_and(|t| t.node_id.as_ref() == Some(node_id));
            if owned {
                if !ev.ports.is_empty()
                    && let Some(t) = state.tasks.get_mut(&ev.task_id)
                    && t.state.can_move_to(ev.state)
                {
                    // Stored with the state change below, in the same transaction.
                    t.ports = ev.ports.clone();
                }
                self.advance_task_reported(state, &mut tx, ev);
            }
        }
        // A task's change can move its job's rollout on (an old task ended, a new one
        // failed), in the same commit as the change.
        self.step_rollouts(state, &mut tx, false);
        let seq = node.last_event_seq;
        node.last_seen = self.now();
        tx.put(state, Change::Node(node));
        self.commit(state, tx).await?;
        self.flush_all(state);
        Ok(seq)
    }

    /// Settles a node that came back after being unreachable, at its first heartbeat
    /// (by then the agent has replayed every event it held). For each of its tasks whose
    /// index got a replacement meanwhile, one copy stays: the original if it had started
    /// (so a service never exceeds its count and a batch task is not run twice), else
    /// the replacement.
    pub(crate) async fn reconcile_if_returned(&self, node_id: &NodeId) {
        if !self.returning_lock().remove(node_id) {
            return;
        }
        let mut state = self.state.lock().await;
        let state = &mut *state;
        let mut tx = Tx::default();
        let tasks: Vec<Task> = state
            .nodes
            .get(node_id)
            .map(|e| {
                e.tasks
                    .iter()
                    .filter_map(|id| state.tasks.get(id))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        for t in tasks {
            if !crate::state::is_live(&t) || !state.doubled.contains(&(t.job_id.clone(), t.index)) {
                continue;
            }
            let siblings = state.live_siblings(&t);
            if t.state == TaskState::Scheduled {
                let reason = "replaced while its node was unreachable, before it started";
                self.stop_task(state, &mut tx, t, reason, false);
                continue;
            }
            let reason = format!("the original task {} came back with its node", t.id);
            for s in siblings {
                self.stop_task(state, &mut tx, s, &reason, false);
            }
        }
        if let Err(e) = self.commit(state, tx).await {
            // The stops are not lost: the node is marked again so the next heartbeat
            // retries.
            tracing::error!(node = %node_id, "settling the tasks of a returning node: {e}");
            self.returning_lock().insert(node_id.clone());
        }
        self.flush_all(state);
    }

    pub(crate) async fn on_heartbeat(&self, node_id: &NodeId, usage: Vec<UsageSample>) {
        let mut state = self.state.lock().await;
        let state = &mut *state;
        let now = self.now();
        if let Some(e) = state.nodes.get_mut(node_id) {
            e.node.last_seen = now;
        }
        if usage.is_empty() {
            return;
        }
        for s in usage {
            // Only samples of running tasks this node owns count; a late sample of a task
            // that ended or moved would otherwise linger.
            let owned = state
                .tasks
                .get(&s.task_id)
                .is_some_and(|t| t.node_id.as_ref() == Some(node_id) && !t.state.is_terminal());
            if owned {
                state.usage.insert(s.task_id, s.usage);
                state.usage_dirty = true;
            }
        }
    }

    /// Sets the per-job usage gauges from the latest samples. Called from the liveness
    /// pass, not per heartbeat, so a large fleet's heartbeats do not each walk every
    /// running task.
    fn publish_usage(&self, state: &mut State) {
        if !state.usage_dirty {
            return;
        }
        state.usage_dirty = false;
        let mut per_job: HashMap<&str, (f64, u64)> = HashMap::new();
        for (id, u) in &state.usage {
            if let Some(t) = state.tasks.get(id) {
                let e = per_job.entry(t.job_name.as_str()).or_default();
                e.0 += u.cpu_seconds;
                e.1 += u.memory_bytes;
            }
        }
        self.metrics.publish_usage(&per_job);
    }

    pub(crate) async fn on_command_acks(&self, node_id: &NodeId, seqs: &[u64]) {
        let mut state = self.state.lock().await;
        if let Some(q) = state.outbox.get_mut(node_id) {
            for seq in seqs {
                q.remove(seq);
            }
        }
    }

    /// Keeps the environments a node reported.
    pub(crate) fn set_node_envs(&self, node: &NodeId, envs: Vec<drover_core::state::EnvInfo>) {
        self.node_envs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node.clone(), envs);
    }

    /// The connection `conn_id` closed. Its node stays until the lost timeout.
    pub(crate) async fn on_disconnect(&self, node_id: &NodeId, conn_id: u64) {
        {
            let mut sessions = self.sessions_lock();
            if sessions.get(node_id).is_some_and(|s| s.conn_id == conn_id) {
                sessions.remove(node_id);
            } else {
                return;
            }
            self.metrics.connected_agents.set(sessions.len() as i64);
        }
        let mut state = self.state.lock().await;
        let state = &mut *state;
        if let Some(e) = state.nodes.get(node_id)
            && e.node.status == NodeStatus::Ready
        {
            let mut n = e.node.clone();
            n.status = NodeStatus::Disconnected;
            let mut tx = Tx::default();
            tx.put(state, Change::Node(n));
            if let Err(e) = self.commit(state, tx).await {
                tracing::warn!("recording the disconnect of {node_id}: {e}");
            }
        }
    }

    /// Queues a command for a node; [`Inner::flush_all`] sends it.
    pub(crate) fn enqueue(&self, state: &mut State, node: &NodeId, command: Command) {
        state.next_cmd_seq += 1;
        let seq = state.next_cmd_seq;
        let frame = crate::frame(&ControllerMessage::Command { seq, command });
        state.outbox.entry(node.clone()).or_default().insert(
            seq,
            OutCommand {
                frame,
                sent_at: None,
            },
        );
        state.unsent.entry(node.clone()).or_default().push_back(seq);
    }

    /// Sends every command that was never sent, to connected nodes.
    pub(crate) fn flush_all(&self, state: &mut State) {
        let sessions = self.sessions_lock();
        let State { outbox, unsent, .. } = state;
        for (node, seqs) in unsent.iter_mut() {
            let Some(session) = sessions.get(node) else {
                continue;
            };
            let Some(queue) = outbox.get_mut(node) else {
                seqs.clear();
                continue;
            };
            while let Some(seq) = seqs.front().copied() {
                let Some(cmd) = queue.get_mut(&seq) else {
                    seqs.pop_front();
                    continue;
                };
                // A full connection queue is not an error: the command stays queued
                // and goes with the next flush or the resend timer.
                if session.tx.try_send(cmd.frame.clone()).is_err() {
                    break;
                }
                cmd.sent_at = Some(Instant::now());
                seqs.pop_front();
            }
        }
        unsent.retain(|_, q| !q.is_empty());
    }

    /// Sends again every command that was sent too long ago without an ack.
    fn resend_stale(&self, state: &mut State) {
        let sessions = self.sessions_lock();
        let resend = self.cfg.command_resend_after;
        for (node, queue) in state.outbox.iter_mut() {
            let Some(session) = sessions.get(node) else {
                continue;
            };
            for cmd in queue.values_mut() {
                if cmd.sent_at.is_none_or(|t| t.elapsed() < resend) {
                    continue;
                }
                if session.tx.try_send(cmd.frame.clone()).is_err() {
                    break;
                }
                cmd.sent_at = Some(Instant::now());
            }
        }
    }

    /// One liveness pass: lost nodes, task deadlines and command resends.
    async fn liveness_pass(&self) {
        let mut state = self.state.lock().await;
        let state = &mut *state;
        let now = self.now();
        let mut tx = Tx::default();
        self.mark_unreachable(state, &mut tx, now);
        self.replace_unknown(state, &mut tx, now);
        let start_deadline = duration_millis(self.cfg.start_deadline);
        let stop_deadline = duration_millis(self.cfg.stop_deadline);
        let overdue: Vec<(TaskId, TaskState, Option<NodeId>, bool)> = state
            .tasks
            .values()
            .filter(|t| {
                // A task on an unreachable node is unknown, not late: its job's
                // `disconnect` rules decide what happens to it. A stop asked of it still
                // has its deadline, since nothing else would end it.
                if !t.desired_stop && state.unreachable(t.node_id.as_ref()) {
                    return false;
                }
                let spec = state.jobs.get(&t.job_id).map(|j| &j.spec);
                let limit = if t.state == TaskState::Stopping
                    || (t.desired_stop && !t.state.is_terminal() && t.node_id.is_some())
                {
                    // A stop request, or the agent's report that it is stopping, sets
                    // `updated_at`; the task then has its grace plus the margin.
                    let grace = i64::try_from(stop_grace_ms(state, t)).unwrap_or(i64::MAX);
                    grace.saturating_add(stop_deadline)
                } else {
                    match t.state {
                        TaskState::Scheduled | TaskState::Preparing | TaskState::Starting => {
                            // A health check may keep a start going up to its own deadline.
                            let health = spec.and_then(|s| s.health.as_ref()).map_or(0, |h| {
                                duration_millis(h.start_deadline.0).saturating_add(30_000)
                            });
                            start_deadline.max(health)
                        }
                        _ => return false,
                    }
                };
                now - t.updated_at > limit
            })
            .map(|t| {
                let stopping = t.state == TaskState::Stopping || t.desired_stop;
                (t.id.clone(), t.state, t.node_id.clone(), stopping)
            })
            .collect();
        for (id, st, node, stopping) in overdue {
            // A task that was asked to stop but never reported its end may still be
            // running somewhere: it is lost, not failed, and its agent is told to kill it.
            let (next, reason) = if stopping {
                (
                    TaskState::Lost,
                    format!(
                        "deadline exceeded in state {st}: the agent did not report the stop within the grace period plus {}s",
                        stop_deadline / 1000
                    ),
                )
            } else {
                (
                    TaskState::Failed,
                    format!("deadline exceeded in state {st}"),
                )
            };
            self.advance_task(state, &mut tx, &id, next, &reason, None);
            if let Some(node) = node {
                self.enqueue(state, &node, Command::Forget { task_id: id });
            }
        }
        // A new task's healthy time runs out without any event, so every rollout in
        // progress is looked at on each pass.
        self.step_rollouts(state, &mut tx, true);
        if let Err(e) = self.commit(state, tx).await {
            tracing::error!("liveness pass: {e}");
        }
        self.flush_all(state);
        self.resend_stale(state);
        self.publish_usage(state);
        let ready = state.ready_nodes();
        self.metrics.nodes_ready.set(ready as i64);
    }
}

impl Inner {
    /// Nodes silent past the node timeout become unreachable (their tasks unknown), and
    /// nodes unreachable past `node_gone_after` are lost with the tasks still on them.
    fn mark_unreachable(&self, state: &mut State, tx: &mut Tx, now: i64) {
        let timeout = duration_millis(self.cfg.node_timeout);
        let gone = duration_millis(self.cfg.node_gone_after);
        let silent: Vec<Node> = state
            .nodes
            .values()
            .filter(|e| {
                e.node.status != NodeStatus::Lost
                    && e.node.unreachable_since.is_none()
                    && now.saturating_sub(e.node.last_seen) > timeout
            })
            .map(|e| e.node.clone())
            .collect();
        for mut node in silent {
            tracing::warn!(node = %node.id, name = %node.info.name, "node unreachable: no heartbeat; its tasks are unknown");
            node.status = NodeStatus::Disconnected;
            node.unreachable_since = Some(now);
            let id = node.id.clone();
            tx.put(state, Change::Node(node));
            state.outbox.remove(&id);
            state.unsent.remove(&id);
            self.sessions_lock().remove(&id);
        }
        let departed: Vec<Node> = state
            .nodes
            .values()
            .filter(|e| {
                e.node.status != NodeStatus::Lost
                    && e.node
                        .unreachable_since
                        .is_some_and(|u| now.saturating_sub(u) > gone)
            })
            .map(|e| e.node.clone())
            .collect();
        for mut node in departed {
            tracing::warn!(node = %node.id, name = %node.info.name, "node lost: unreachable for too long");
            node.status = NodeStatus::Lost;
            let id = node.id.clone();
            let name = node.info.name.clone();
            tx.put(state, Change::Node(node));
            let tasks: Vec<TaskId> = state
                .nodes
                .get(&id)
                .map(|e| e.tasks.iter().cloned().collect())
                .unwrap_or_default();
            let reason = format!(
                "node {name} did not come back within {}",
                humantime::format_duration(self.cfg.node_gone_after)
            );
            for t in tasks {
                self.advance_task(state, tx, &t, TaskState::Lost, &reason, None);
            }
        }
    }

    /// Tasks unknown for longer than their job's `disconnect.lost_after` are replaced
    /// (a second live copy of the index, recorded in [`State::doubled`]), or with
    /// `on_lost: fail` lost, which fails the job.
    fn replace_unknown(&self, state: &mut State, tx: &mut Tx, now: i64) {
        let mut due: Vec<(TaskId, String)> = Vec::new();
        for e in state.nodes.values() {
            let Some(since) = e.node.unreachable_since else {
                continue;
            };
            if e.node.status == NodeStatus::Lost {
                continue;
            }
            for id in &e.tasks {
                let Some(t) = state.tasks.get(id) else {
                    continue;
                };
                if !crate::state::is_live(t) || state.doubled.contains(&(t.job_id.clone(), t.index))
                {
                    continue;
                }
                let Some(job) = state.jobs.get(&t.job_id) else {
                    continue;
                };
                let wait = job.spec.lost_after();
                if job.status.is_final() || now.saturating_sub(since) < duration_millis(wait) {
                    continue;
                }
                due.push((
                    t.id.clone(),
                    format!(
                        "node {} unreachable for {}",
                        e.node.info.name,
                        humantime::format_duration(wait)
                    ),
                ));
            }
        }
        for (id, why) in due {
            let Some(t) = state.tasks.get(&id).cloned() else {
                continue;
            };
            let Some(job) = state.jobs.get(&t.job_id).cloned() else {
                continue;
            };
            if job.spec.disconnect.on_lost == OnLost::Fail
                || (job.spec.kind == JobKind::Service && t.index >= job.spec.count)
            {
                self.advance_task(state, tx, &id, TaskState::Lost, &why, None);
                continue;
            }
            let mut r = Task::pending(&job, t.index, t.attempt + 1, now, now);
            r.reason = format!("replaces task {}: {why}", t.id);
            r.record(now, TaskEventKind::Replacement, r.reason.clone());
            tracing::info!(task = %t.id, replacement = %r.id, "replacing a task on an unreachable node");
            state.doubled.insert((t.job_id.clone(), t.index));
            tx.put(state, Change::Task(r));
            self.schedule.notify_one();
        }
    }
}

/// Runs liveness passes until shutdown.
pub(crate) async fn liveness_loop(inner: Arc<Inner>) {
    let period =
        (inner.cfg.heartbeat_interval / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            _ = tokio::time::sleep(period) => inner.liveness_pass().await,
        }
    }
}

/// The grace a task asked to stop is given: none when the stop was forced, else its
/// job's `stop_grace`.
fn stop_grace_ms(state: &State, t: &Task) -> u64 {
    if t.stop_forced {
        return 0;
    }
    state
        .jobs
        .get(&t.job_id)
        .map_or(5000, |j| j.spec.stop_grace.as_millis())
}

/// The first event of a new attempt of an index, saying why it exists: `restart 2 after
/// exit code 1, back-off 4s`.
fn restart_message(ended: &Task, delay: Duration) -> String {
    let attempt = ended.attempt.saturating_add(1);
    let cause = match (ended.state, &ended.exit) {
        (TaskState::Lost, _) => format!("task {} was lost: {}", ended.id, ended.reason),
        (_, Some(Exit { code: Some(c), .. })) => format!("exit code {c}"),
        (
            _,
            Some(Exit {
                signal: Some(s), ..
            }),
        ) => s.clone(),
        _ if ended.reason.is_empty() => format!("task {} {}", ended.id, ended.state),
        _ => ended.reason.clone(),
    };
    if delay.is_zero() {
        format!("restart {attempt} after {cause}, no back-off")
    } else {
        format!(
            "restart {attempt} after {cause}, back-off {}",
            humantime::format_duration(delay)
        )
    }
}

/// A health check in a few words: `http port 8000 /healthz`, `tcp port 5432`,
/// `command pg_isready`.
fn probe_text(h: &HealthCheck) -> String {
    if let Some(p) = &h.http {
        format!("http port {} {}", p.port, p.path)
    } else if let Some(p) = &h.tcp {
        format!("tcp port {}", p.port)
    } else {
        format!("command {}", h.command.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::{Decision, decide};
    use drover_core::state::{Job, JobStatus};
    use drover_core::{JobKind, JobSpec, ProjectId};

    fn job(kind: JobKind, count: u32, status: JobStatus) -> Job {
        let mut spec = JobSpec::new("j", vec!["true".into()]);
        spec.kind = kind;
        spec.count = count;
        Job {
            status,
            ..Job::new(ProjectId::default(), spec, 4, 0)
        }
    }

    #[test]
    fn one_rule_decides_what_an_apply_does() {
        let svc = job(JobKind::Service, 2, JobStatus::Running);
        let same = svc.spec.clone();
        assert_eq!(decide(None, &same, false), Decision::Create);
        assert_eq!(decide(Some(&svc), &same, false), Decision::Unchanged);
        // A rerun is for finished jobs only; a running one is left alone.
        assert_eq!(decide(Some(&svc), &same, true), Decision::Unchanged);
        let more = JobSpec {
            count: 5,
            ..same.clone()
        };
        assert_eq!(
            decide(Some(&svc), &more, false),
            Decision::Scale { from: 2, to: 5 }
        );
        let other = JobSpec {
            count: 5,
            command: vec!["false".into()],
            ..same.clone()
        };
        assert_eq!(
            decide(Some(&svc), &other, false),
            Decision::Update { version: 5 }
        );
        // A stopped service's count change, and any batch job's, is a new version.
        let stopped = job(JobKind::Service, 2, JobStatus::Stopped);
        assert_eq!(
            decide(Some(&stopped), &more, false),
            Decision::Update { version: 5 }
        );
        let batch = job(JobKind::Batch, 2, JobStatus::Complete);
        let batch_more = JobSpec {
            count: 5,
            ..batch.spec.clone()
        };
        assert_eq!(
            decide(Some(&batch), &batch_more, false),
            Decision::Update { version: 5 }
        );
        assert_eq!(
            decide(Some(&batch), &batch.spec, false),
            Decision::Unchanged
        );
        assert_eq!(
            decide(Some(&batch), &batch.spec, true),
            Decision::Rerun { version: 5 }
        );
    }
}
