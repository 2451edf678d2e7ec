//! The controller's in-memory view of the store, with the indexes the scheduler and the
//! API need. It is only changed through [`State::apply`], after the same change has been
//! committed to the store, so memory never holds anything the store would not give back.

use drover_core::api::{JobView, NodeView, TaskView};
use drover_core::artifact::Artifact;
use drover_core::pipeline::{Pipeline, Vertex};
use drover_core::spec::Resources;
use drover_core::state::{Job, Node, NodeStatus, Task};
use drover_core::{JobId, NodeId, ProjectId, TaskId, TaskState};
use drover_store::{Change, Snapshot};
use std::collections::{BTreeMap, HashMap, HashSet};

/// A node plus what is placed on it, derived from the tasks.
#[derive(Clone, Debug)]
pub struct NodeEntry {
    pub node: Node,
    pub allocated: Resources,
    pub tasks: HashSet<TaskId>,
}

/// A sum of cores rounded to a millionth: adding and removing tasks' `0.1`s in binary
/// floating point drifts (`0.30000000000000004`), which `node ls -o json` would show
/// and the drift would grow over a node's life.
fn micro_cores(cpu: f64) -> f64 {
    (cpu * 1e6).round() / 1e6
}

/// Why a job's pending tasks were not placed in the last scheduling pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingReason {
    pub text: String,
    /// Every ready node failed for a reason that waiting will not change (runtime,
    /// platform, constraints, too little capacity in all): the job is blocked until a
    /// node that fits joins.
    pub blocked: bool,
}

#[derive(Default)]
pub struct State {
    pub jobs: HashMap<JobId, Job>,
    /// The current (newest) version of each job name in each project.
    pub current: HashMap<(ProjectId, String), JobId>,
    /// Every stored version of each job name, so removing the current one finds the
    /// one before it without a scan.
    pub versions: HashMap<(ProjectId, String), BTreeMap<u32, JobId>>,
    /// Job versions by the idempotency key of the request that made them.
    pub by_key: HashMap<(ProjectId, String), JobId>,
    pub tasks: HashMap<TaskId, Task>,
    pub tasks_by_job: HashMap<JobId, Vec<TaskId>>,
    pub nodes: HashMap<NodeId, NodeEntry>,
    /// Tasks waiting for a node, in submission order.
    pub pending: std::collections::BTreeSet<(i64, TaskId)>,
    /// Why pending tasks of a job could not be placed, from the last scheduling pass.
    /// Kept in memory only: it is recomputed on every pass.
    pub pending_reasons: HashMap<JobId, PendingReason>,
    /// Commands for each node that the agent has not acknowledged yet. Derived again
    /// from the tasks whenever an agent connects, so it need not be stored.
    pub outbox: HashMap<NodeId, BTreeMap<u64, OutCommand>>,
    /// Seqs in `outbox` never handed to a connection yet, so sending new commands does
    /// not walk every command still waiting for an ack.
    pub unsent: HashMap<NodeId, std::collections::VecDeque<u64>>,
    pub next_cmd_seq: u64,
    /// Where the scheduler's rotating window over the nodes starts next.
    pub cursor: usize,
    /// The latest resource sample of each running task, from its agent's heartbeats.
    /// Kept in memory only: a sample is stale within seconds anyway.
    pub usage: HashMap<TaskId, drover_core::state::TaskUsage>,
    /// Whether `usage` changed since the metrics last showed it.
    pub usage_dirty: bool,
    /// The indexes of each job that have a succeeded task. A set rather than a count:
    /// an original and its replacement can both succeed when their reports cross, and
    /// the index must still count once.
    pub succeeded: HashMap<JobId, HashSet<u32>>,
    /// Job indexes with more than one live task: an original whose node is unreachable
    /// or just came back, and its replacement. Ends of these tasks are reconciled (the
    /// surplus copy is stopped); every other index has one live task and skips that
    /// work. Kept in memory and rebuilt from the tasks at start-up.
    pub doubled: HashSet<(JobId, u32)>,
    /// The version of each job name whose rollout is in progress (a running service
    /// replacing its old tasks). Derived from the jobs, kept by [`State::apply`].
    pub rolling: HashMap<(ProjectId, String), JobId>,
    /// Rolling jobs one of whose tasks (of any version) changed since their rollout was
    /// last moved on: looked at once per batch of agent events rather than per event.
    /// Only a hint, kept in memory: the liveness pass moves every rollout on anyway.
    pub rollouts_due: HashSet<JobId>,
    /// Artifact versions by project, name and version.
    pub artifacts: HashMap<(ProjectId, String, String), Artifact>,
    /// Every project, `default` included.
    pub projects: BTreeMap<ProjectId, drover_core::auth::Project>,
    /// Pipelines by project and name.
    pub pipelines: BTreeMap<(ProjectId, String), Pipeline>,
    /// Vertices by project, pipeline and name.
    pub vertices: BTreeMap<(ProjectId, String, String), Vertex>,
}

/// A command waiting for an agent's acknowledgement, serialised once when queued so
/// that sending (and resending) it copies no structures.
#[derive(Clone, Debug)]
pub struct OutCommand {
    pub frame: std::sync::Arc<str>,
    /// When it was last handed to the connection; `None` if never.
    pub sent_at: Option<std::time::Instant>,
}

/// A task that still runs, or is meant to: not finished and not being stopped.
pub fn is_live(t: &Task) -> bool {
    !t.state.is_terminal() && !t.desired_stop
}

fn counts_on_node(t: &Task) -> bool {
    t.node_id.is_some() && !t.state.is_terminal()
}

impl State {
    pub fn from_snapshot(snap: Snapshot) -> State {
        let mut s = State::default();
        for j in snap.jobs {
            s.apply(Change::Job(j));
        }
        for n in snap.nodes {
            s.apply(Change::Node(n));
        }
        for t in snap.tasks {
            s.apply(Change::Task(t));
        }
        for a in snap.artifacts {
            s.apply(Change::Artifact(a));
        }
        for p in snap.projects {
            s.apply(Change::Project(p));
        }
        for p in snap.pipelines {
            s.apply(Change::Pipeline(p));
        }
        for v in snap.vertices {
            s.apply(Change::Vertex(v));
        }
        let mut live: HashMap<(JobId, u32), u32> = HashMap::new();
        for t in s.tasks.values().filter(|t| is_live(t)) {
            *live.entry((t.job_id.clone(), t.index)).or_default() += 1;
        }
        s.doubled = live
            .into_iter()
            .filter(|(_, n)| *n > 1)
            .map(|(k, _)| k)
            .collect();
        s
    }

    /// The other live tasks of `t`'s job and index.
    pub fn live_siblings(&self, t: &Task) -> Vec<Task> {
        self.job_tasks(&t.job_id)
            .filter(|o| o.index == t.index && o.id != t.id && is_live(o))
            .cloned()
            .collect()
    }

    /// Whether `node` is known but unreachable (silent past the node timeout).
    pub fn unreachable(&self, node: Option<&NodeId>) -> bool {
        node.and_then(|n| self.nodes.get(n))
            .is_some_and(|e| e.node.unreachable_since.is_some())
    }

    /// Applies a committed change to memory, keeping every index consistent.
    pub fn apply(&mut self, change: Change) {
        match change {
            Change::Job(j) => {
                let key = (j.project.clone(), j.name.clone());
                let newer = match self.current.get(&key).and_then(|id| self.jobs.get(id)) {
                    Some(cur) => cur.version <= j.version,
                    None => true,
                };
                self.versions
                    .entry(key.clone())
                    .or_default()
                    .insert(j.version, j.id.clone());
                if newer {
                    self.current.insert(key, j.id.clone());
                }
                if let Some(k) = &j.idempotency_key {
                    self.by_key
                        .insert((j.project.clone(), k.clone()), j.id.clone());
                }
                let rolls =
                    !j.status.is_final() && j.rollout.as_ref().is_some_and(|r| r.in_progress());
                let name = (j.project.clone(), j.name.clone());
                if rolls {
                    self.rolling.insert(name, j.id.clone());
                } else if self.rolling.get(&name) == Some(&j.id) {
                    self.rolling.remove(&name);
                }
                self.jobs.insert(j.id.clone(), j);
            }
            Change::Node(n) => match self.nodes.get_mut(&n.id) {
                Some(e) => e.node = n,
                None => {
                    self.nodes.insert(
                        n.id.clone(),
                        NodeEntry {
                            node: n,
                            allocated: Resources {
                                cpu: 0.0,
                                memory: Default::default(),
                            },
                            tasks: HashSet::new(),
                        },
                    );
                }
            },
            Change::Task(t) => {
                let old = self.tasks.get(&t.id).cloned();
                // At most one task per index of a batch job can succeed (a replacement
                // exists only after a failure or loss, which is final), so this counts
                // the job's succeeded indexes.
                let newly_succeeded = t.state == TaskState::Succeeded
                    && old.as_ref().is_none_or(|o| {
                        o.state != TaskState::Succeeded && o.state.can_move_to(t.state)
                    });
                if newly_succeeded {
                    self.succeeded
                        .entry(t.job_id.clone())
                        .or_default()
                        .insert(t.index);
                }
                if let Some(old) = &old {
                    // The same rule the store enforces; a change the store skipped must
                    // be skipped here too.
                    if !t.state.replaces(old.state) {
                        return;
                    }
                    if counts_on_node(old) {
                        self.release(old);
                    }
                    if old.state == TaskState::Pending {
                        self.pending.remove(&(old.created_at, old.id.clone()));
                    }
                } else {
                    self.tasks_by_job
                        .entry(t.job_id.clone())
                        .or_default()
                        .push(t.id.clone());
                }
                if counts_on_node(&t) {
                    self.reserve(&t);
                }
                if t.state == TaskState::Pending {
                    self.pending.insert((t.created_at, t.id.clone()));
                }
                self.tasks.insert(t.id.clone(), t);
            }
            // Tokens live in the controller's token cache, which every request reads
            // without taking the state lock.
            Change::Token(_) => {}
            Change::Project(p) => {
                self.projects.entry(p.name.clone()).or_insert(p);
            }
            Change::Artifact(a) => {
                let key = (a.project.clone(), a.name.clone(), a.version.clone());
                self.artifacts.insert(key, a);
            }
            Change::DeleteArtifact {
                project,
                name,
                version,
            } => {
                self.artifacts.remove(&(project, name, version));
            }
            Change::Pipeline(p) => {
                self.pipelines
                    .insert((p.project.clone(), p.name.clone()), p);
            }
            Change::Vertex(v) => {
                let key = (
                    v.project.clone(),
                    v.spec.pipeline.clone(),
                    v.spec.name.clone(),
                );
                self.vertices.insert(key, v);
            }
            Change::DeletePipeline { project, name } => {
                self.pipelines.remove(&(project, name));
            }
            Change::DeleteVertex {
                project,
                pipeline,
                name,
            } => {
                self.vertices.remove(&(project, pipeline, name));
            }
            Change::DeleteJob(id) => self.remove_job(&id),
            Change::DeleteTask(id) => self.remove_task(&id),
            Change::DeleteNode(id) => {
                // Its tasks keep their records, with the node's id as history; a
                // removal by an admin ended those still on it in the same commit.
                self.nodes.remove(&id);
                self.outbox.remove(&id);
                self.unsent.remove(&id);
            }
        }
    }

    /// Forgets a job version and its tasks, and every index that names them.
    fn remove_job(&mut self, id: &JobId) {
        // The list is taken first, so each task's removal has no list to edit.
        for t in self.tasks_by_job.remove(id).unwrap_or_default() {
            self.remove_task(&t);
        }
        self.succeeded.remove(id);
        self.pending_reasons.remove(id);
        self.doubled.retain(|(j, _)| j != id);
        let Some(job) = self.jobs.remove(id) else {
            return;
        };
        if let Some(k) = &job.idempotency_key {
            let key = (job.project.clone(), k.clone());
            if self.by_key.get(&key) == Some(id) {
                self.by_key.remove(&key);
            }
        }
        let name = (job.project.clone(), job.name.clone());
        if self.rolling.get(&name) == Some(id) {
            self.rolling.remove(&name);
        }
        self.rollouts_due.remove(id);
        let mut emptied = false;
        if let Some(v) = self.versions.get_mut(&name) {
            v.remove(&job.version);
            emptied = v.is_empty();
            if self.current.get(&name) == Some(id) {
                match v.values().next_back() {
                    Some(prev) => {
                        self.current.insert(name.clone(), prev.clone());
                    }
                    None => {
                        self.current.remove(&name);
                    }
                }
            }
        }
        if emptied {
            self.versions.remove(&name);
        }
    }

    /// Forgets one task and every index that names it.
    fn remove_task(&mut self, id: &TaskId) {
        let Some(t) = self.tasks.remove(id) else {
            return;
        };
        if counts_on_node(&t) {
            self.release(&t);
        }
        if t.state == TaskState::Pending {
            self.pending.remove(&(t.created_at, t.id.clone()));
        }
        if let Some(list) = self.tasks_by_job.get_mut(&t.job_id) {
            list.retain(|x| x != id);
        }
        self.usage.remove(id);
    }

    fn demand(&self, t: &Task) -> Resources {
        self.jobs
            .get(&t.job_id)
            .map(|j| j.spec.resources)
            .unwrap_or(Resources {
                cpu: 0.0,
                memory: Default::default(),
            })
    }

    fn reserve(&mut self, t: &Task) {
        let d = self.demand(t);
        if let Some(n) = t.node_id.as_ref().and_then(|n| self.nodes.get_mut(n)) {
            n.allocated.cpu = micro_cores(n.allocated.cpu + d.cpu);
            n.allocated.memory.0 += d.memory.0;
            n.tasks.insert(t.id.clone());
        }
    }

    fn release(&mut self, t: &Task) {
        let d = self.demand(t);
        if let Some(n) = t.node_id.as_ref().and_then(|n| self.nodes.get_mut(n)) {
            n.allocated.cpu = micro_cores(n.allocated.cpu - d.cpu).max(0.0);
            n.allocated.memory.0 = n.allocated.memory.0.saturating_sub(d.memory.0);
            n.tasks.remove(&t.id);
        }
    }

    /// The job version a request with this idempotency key made, if it was made within
    /// the window.
    pub fn job_by_key(&self, project: &ProjectId, key: &str, now: i64) -> Option<&Job> {
        self.by_key
            .get(&(project.clone(), key.to_string()))
            .and_then(|id| self.jobs.get(id))
            .filter(|j| now.saturating_sub(j.created_at) < drover_core::api::IDEMPOTENCY_WINDOW_MS)
    }

    pub fn job_by_name(&self, project: &ProjectId, name: &str) -> Option<&Job> {
        self.current
            .get(&(project.clone(), name.to_string()))
            .and_then(|id| self.jobs.get(id))
    }

    pub fn job_tasks(&self, job: &JobId) -> impl Iterator<Item = &Task> {
        self.tasks_by_job
            .get(job)
            .into_iter()
            .flatten()
            .filter_map(|id| self.tasks.get(id))
    }

    /// The versions of `job`'s name older than it that still run: those a rollout to
    /// it (or to a version before it) has not replaced yet. Empty for any job that was
    /// not rolled out.
    pub fn older_running(&self, job: &Job) -> Vec<&Job> {
        self.versions
            .get(&(job.project.clone(), job.name.clone()))
            .into_iter()
            .flat_map(|v| v.range(..job.version))
            .filter_map(|(_, id)| self.jobs.get(id))
            .filter(|j| !j.status.is_final())
            .collect()
    }

    /// The tasks of older versions of `job`'s name that have not ended: during a
    /// rollout the old tasks left, and after a replacement or a stop those still
    /// stopping.
    pub fn older_live_tasks(&self, job: &Job) -> Vec<&Task> {
        self.versions
            .get(&(job.project.clone(), job.name.clone()))
            .into_iter()
            .flat_map(|v| v.range(..job.version))
            .flat_map(|(_, id)| self.job_tasks(id))
            .filter(|t| !t.state.is_terminal())
            .collect()
    }

    pub fn job_view(&self, job: &Job) -> JobView {
        let mut task_states = BTreeMap::new();
        for t in self.job_tasks(&job.id) {
            *task_states.entry(t.state).or_insert(0) += 1;
        }
        // During a rollout the old tasks left are part of what the job runs.
        if self.current.get(&(job.project.clone(), job.name.clone())) == Some(&job.id) {
            for t in self.older_live_tasks(job) {
                *task_states.entry(t.state).or_insert(0) += 1;
            }
        }
        let has_pending = task_states.contains_key(&TaskState::Pending);
        let pending = self.pending_reasons.get(&job.id).filter(|_| has_pending);
        let blocked = pending.is_some_and(|p| p.blocked);
        JobView {
            job: job.clone(),
            task_states,
            pending_reason: pending.map(|p| p.text.clone()),
            state: Some(drover_core::api::JobState::of(
                job,
                self.job_tasks(&job.id),
                blocked,
            )),
        }
    }

    pub fn task_view(&self, t: &Task) -> TaskView {
        self.view_of(t, t.clone())
    }

    /// The view of a task without its timeline, for listings: a timeline holds up to
    /// [`Task::MAX_EVENTS`] events, which a list of thousands of tasks should not carry.
    pub fn task_view_brief(&self, t: &Task) -> TaskView {
        self.view_of(t, t.without_events())
    }

    fn view_of(&self, t: &Task, task: Task) -> TaskView {
        TaskView {
            unknown: !t.state.is_terminal() && self.unreachable(t.node_id.as_ref()),
            task,
            node_name: t
                .node_id
                .as_ref()
                .and_then(|n| self.nodes.get(n))
                .map(|n| n.node.info.name.clone()),
            usage: self.usage.get(&t.id).copied(),
            pending_reason: self
                .pending_reasons
                .get(&t.job_id)
                .filter(|_| t.state == TaskState::Pending)
                .map(|p| p.text.clone()),
            version: self.jobs.get(&t.job_id).map(|j| j.version),
        }
    }

    /// The vertices of one pipeline, by name.
    pub fn vertices_of<'a>(
        &'a self,
        project: &'a ProjectId,
        pipeline: &'a str,
    ) -> impl Iterator<Item = &'a Vertex> + 'a {
        self.vertices
            .iter()
            .filter(move |((p, pl, _), _)| p == project && pl == pipeline)
            .map(|(_, v)| v)
    }

    pub fn node_view(&self, e: &NodeEntry) -> NodeView {
        NodeView {
            node: e.node.clone(),
            allocated: e.allocated,
            tasks: e.tasks.len() as u32,
        }
    }

    pub fn ready_nodes(&self) -> usize {
        self.nodes
            .values()
            .filter(|n| n.node.status == NodeStatus::Ready)
            .count()
    }
}
