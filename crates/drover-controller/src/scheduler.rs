//! The scheduler: places pending tasks on ready nodes that have the runtime, the free
//! resources and satisfy the constraints, spreading each job's tasks across nodes.
//!
//! One pass takes a batch of placeable tasks, places them in memory, commits every
//! placement in one transaction and only then tells the agents, so a placement an agent
//! acts on is always durable.

use crate::state::{NodeEntry, State};
use crate::{Inner, Tx};
use drover_core::api::{PlacementPlan, PlacementVerdict};
use drover_core::artifact::{ArtifactRef, Variant};
use drover_core::platform::{
    BinaryPlatform, Libc, LibcKind, NodePlatform, Platform, select, select_emulated,
};
use drover_core::protocol::{AssignedArtifact, Command, EncodedConfig, TaskAssignment};
use drover_core::quantity::ByteSize;
use drover_core::spec::{Constraint, ConstraintKey, ConstraintOp, JobSpec, Resources};
use drover_core::state::{NodeInfo, NodeStatus, Task};
use drover_core::{JobId, NodeId, ProjectId, TaskId, TaskState};
use drover_store::Change;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The most tasks placed in one pass (and so in one transaction).
pub const BATCH: usize = 4096;

/// How many feasible nodes are scored for one task. Scoring every node of a large
/// fleet for every task costs more than it gains; a rotating window keeps placement
/// spread out and cheap.
const CANDIDATES: usize = 32;

pub(crate) async fn run(inner: Arc<Inner>) {
    loop {
        let placed = inner.schedule_pass().await;
        if placed >= BATCH {
            // More may be waiting; go again without sleeping.
            continue;
        }
        tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            _ = inner.schedule.notified() => {}
            // Restart delays end without anyone notifying, so look again regularly.
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

fn attribute<'a>(node: &'a NodeEntry, key: &ConstraintKey) -> Option<&'a str> {
    let info = &node.node.info;
    match key {
        ConstraintKey::Platform => Some(info.platform.as_str()),
        ConstraintKey::Os => Some(info.os()),
        ConstraintKey::Arch => Some(info.arch()),
        ConstraintKey::Name => Some(info.name.as_str()),
        ConstraintKey::Label(l) => info.labels.get(l).map(String::as_str),
    }
}

/// Whether a node satisfies a constraint. A `platform` constraint asks whether the node
/// can run that platform, so `linux/amd64` matches every amd64 Linux node whatever its
/// level, and `linux/amd64/v2` a node at v2 or above; other keys compare text.
fn holds(node: &NodeEntry, c: &Constraint) -> bool {
    if c.key != ConstraintKey::Platform {
        return c.matches(attribute(node, &c.key));
    }
    let info = &node.node.info;
    let runs = |want: &str| node_runs(info, want);
    match c.op {
        ConstraintOp::Eq => c.value.as_deref().is_some_and(runs),
        ConstraintOp::Ne => !c.value.as_deref().is_some_and(runs),
        ConstraintOp::In => c.values.iter().any(|v| runs(v)),
        ConstraintOp::NotIn => !c.values.iter().any(|v| runs(v)),
        ConstraintOp::Exists => true,
    }
}

fn node_runs(info: &NodeInfo, want: &str) -> bool {
    if info.platform == want || info.os_arch() == want {
        return true;
    }
    match (info.parsed_platform(), want.parse::<Platform>()) {
        (Some(node), Ok(want)) => node.fallbacks().contains(&want),
        _ => false,
    }
}

/// The variant of an artifact a node gets: the best match for its platform and libc, or
/// else the best one for a platform it emulates. The scheduler only places a task on a
/// node through emulation when the node runs no variant natively, so this is always the
/// variant the scheduler chose.
pub(crate) fn variant_for(
    state: &State,
    project: &ProjectId,
    r: &ArtifactRef,
    info: &NodeInfo,
) -> Option<Variant> {
    let a = state
        .artifacts
        .get(&(project.clone(), r.name.clone(), r.version.clone()))?;
    pick(&a.variants, info)
        .or_else(|| pick_emulated(&a.variants, info))
        .cloned()
}

fn pick<'a>(variants: &'a [Variant], info: &NodeInfo) -> Option<&'a Variant> {
    let node = NodePlatform {
        platform: info.parsed_platform()?,
        libc: info.libc.clone().unwrap_or(Libc {
            kind: LibcKind::Unknown,
            version: None,
        }),
    };
    let offered: Vec<BinaryPlatform> = variants.iter().map(|v| v.platform.clone()).collect();
    let chosen = select(&offered, &node)?;
    variants.iter().find(|v| &v.platform == chosen)
}

/// The variant a node runs through one of its emulators, if it has any.
fn pick_emulated<'a>(variants: &'a [Variant], info: &NodeInfo) -> Option<&'a Variant> {
    if info.emulates.is_empty() {
        return None;
    }
    let offered: Vec<BinaryPlatform> = variants.iter().map(|v| v.platform.clone()).collect();
    let chosen = select_emulated(&offered, &info.emulates)?;
    variants.iter().find(|v| &v.platform == chosen)
}

/// How a node may run a job's artifact: natively, or (in the scheduler's second pass,
/// when no node runs it natively) through an emulator.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Execution {
    Native,
    Emulated,
}

/// Why a node cannot take a task, for the pending reason.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Misfit {
    Runtime,
    /// No variant of the job's artifact runs on the node.
    Platform,
    Constraint,
    /// The node's whole capacity is less than one task needs: it never fits there.
    Capacity,
    /// The node has the capacity, but not free now.
    Resources,
    /// The job has `stdin` and the node's agent does not give the runtime's tasks their
    /// input (an agent older than the field, or a runtime that cannot).
    Stdin,
    /// The job is a pipeline vertex's and the node's agent cannot serve its replicas
    /// (an agent older than pipelines, or a runtime it has no data plane for).
    Vertex,
}

/// Whether a task of `spec` fits on a node that has `allocated` taken (its entry's
/// allocation in a scheduling pass; in a plan, also the tasks the plan has placed so
/// far, which the entry does not hold).
fn fits_given(
    node: &NodeEntry,
    allocated: Resources,
    spec: &JobSpec,
    variants: Option<&[Variant]>,
    how: Execution,
) -> Result<(), Misfit> {
    if !node.node.info.runtimes.contains(&spec.runtime) {
        return Err(Misfit::Runtime);
    }
    if spec.stdin.is_some() && !node.node.info.takes_stdin(&spec.runtime) {
        return Err(Misfit::Stdin);
    }
    if spec.vertex.is_some() && !node.node.info.runs_vertices(&spec.runtime) {
        return Err(Misfit::Vertex);
    }
    if let Some(vs) = variants {
        let info = &node.node.info;
        let runs = match how {
            Execution::Native => pick(vs, info).is_some(),
            Execution::Emulated => pick(vs, info).is_none() && pick_emulated(vs, info).is_some(),
        };
        if !runs {
            return Err(Misfit::Platform);
        }
    }
    if !spec.constraints.iter().all(|c| holds(node, c)) {
        return Err(Misfit::Constraint);
    }
    let cap = node.node.info.capacity;
    let need = spec.resources;
    if need.cpu > cap.cpu + 1e-9 || need.memory.0 > cap.memory.0 {
        return Err(Misfit::Capacity);
    }
    if allocated.cpu + need.cpu > cap.cpu + 1e-9
        || allocated.memory.0 + need.memory.0 > cap.memory.0
    {
        return Err(Misfit::Resources);
    }
    Ok(())
}

impl Inner {
    /// Places up to [`BATCH`] tasks; returns how many it placed.
    pub(crate) async fn schedule_pass(&self) -> usize {
        let mut state = self.state.lock().await;
        // Timed from holding the lock: the pass's own work, not time spent waiting.
        let started = Instant::now();
        let state = &mut *state;
        let now = self.now();
        let due: Vec<TaskId> = state
            .pending
            .iter()
            .filter(|(_, id)| state.tasks.get(id).is_some_and(|t| t.not_before <= now))
            .take(BATCH)
            .map(|(_, id)| id.clone())
            .collect();
        if due.is_empty() {
            return 0;
        }
        let mut tx = Tx::default();
        let placed = self.place(state, &mut tx, due, now);
        let n = placed.len();
        if n == 0 {
            return 0;
        }
        if let Err(e) = self.commit(state, tx).await {
            tracing::error!("storing placements: {e}");
            return 0;
        }
        self.dispatch(state, placed);
        self.metrics
            .scheduling_pass
            .observe(started.elapsed().as_secs_f64());
        n
    }

    /// Places the given pending tasks where they fit, recording each placement in `tx`
    /// and the reasons for those that fit nowhere. Returns the placements; the caller
    /// commits them and then sends the Start commands.
    pub(crate) fn place(
        &self,
        state: &mut State,
        tx: &mut Tx,
        due: Vec<TaskId>,
        now: i64,
    ) -> Vec<(NodeId, Task)> {
        let started = Instant::now();
        let mut ready: Vec<NodeId> = state
            .nodes
            .values()
            .filter(|e| e.node.status == NodeStatus::Ready)
            .map(|e| e.node.id.clone())
            .collect();
        ready.sort();
        let mut placed: Vec<(NodeId, Task)> = Vec::new();
        // How many live tasks each job has on each node, filled in per job on first use.
        let mut spread: HashMap<JobId, HashMap<NodeId, u32>> = HashMap::new();
        let mut misfits: HashMap<JobId, HashMap<Misfit, u32>> = HashMap::new();
        let mut specs: HashMap<JobId, std::sync::Arc<JobSpec>> = HashMap::new();
        // The variants of each job's artifact, looked up once per pass; an artifact that
        // no longer exists offers none.
        let mut offers: HashMap<JobId, Option<std::sync::Arc<Vec<Variant>>>> = HashMap::new();
        for id in due {
            let Some(task) = state.tasks.get(&id).cloned() else {
                continue;
            };
            // One copy of each job's spec per pass, not one per task.
            let spec = match specs.get(&task.job_id) {
                Some(s) => s.clone(),
                None => match state.jobs.get(&task.job_id) {
                    Some(job) => {
                        let s = std::sync::Arc::new(job.spec.clone());
                        specs.insert(task.job_id.clone(), s.clone());
                        s
                    }
                    None => continue,
                },
            };
            // Jobs without an artifact, the common case, skip the lookup entirely.
            let variants = match &spec.artifact {
                None => None,
                Some(r) => offers
                    .entry(task.job_id.clone())
                    .or_insert_with(|| {
                        let job = state.jobs.get(&task.job_id)?;
                        let key = (job.project.clone(), r.name.clone(), r.version.clone());
                        Some(std::sync::Arc::new(
                            state
                                .artifacts
                                .get(&key)
                                .map(|a| a.variants.clone())
                                .unwrap_or_default(),
                        ))
                    })
                    .clone(),
            };
            let counts = spread.entry(task.job_id.clone()).or_insert_with(|| {
                let mut m = HashMap::new();
                for t in state.job_tasks(&task.job_id) {
                    if let Some(n) = &t.node_id
                        && !t.state.is_terminal()
                    {
                        *m.entry(n.clone()).or_insert(0) += 1;
                    }
                }
                m
            });
            let variants = variants.as_deref().map(Vec::as_slice);
            let chosen = choose(
                state,
                &ready,
                state.cursor,
                &spec,
                variants,
                counts,
                |_, e| e.allocated,
            );
            match chosen {
                Ok(node_id) => {
                    state.cursor = state.cursor.wrapping_add(1);
                    *counts.entry(node_id.clone()).or_insert(0) += 1;
                    let mut t = task;
                    let ready_at = t.not_before.max(t.created_at);
                    t.state = TaskState::Scheduled;
                    t.node_id = Some(node_id.clone());
                    t.reason = String::new();
                    t.updated_at = now;
                    let name = state
                        .nodes
                        .get(&node_id)
                        .map_or(node_id.as_str(), |e| e.node.info.name.as_str());
                    t.record(
                        now,
                        drover_core::state::TaskEventKind::Placed,
                        format!("placed on node {name}"),
                    );
                    self.metrics
                        .scheduling_latency
                        .observe(((now - ready_at).max(0) as f64) / 1000.0);
                    tx.put(state, Change::Task(t.clone()));
                    placed.push((node_id, t));
                }
                Err(why) => {
                    let agg = misfits.entry(task.job_id.clone()).or_default();
                    for (m, n) in why {
                        *agg.entry(m).or_insert(0) = (*agg.get(&m).unwrap_or(&0)).max(n);
                    }
                    agg.entry(Misfit::Runtime).or_insert(0);
                }
            }
        }
        for (job_id, why) in misfits {
            let reason = crate::state::PendingReason {
                text: pending_reason(state, &job_id, &why, ready.len()),
                blocked: blocked(&why, ready.len()),
            };
            if state.pending_reasons.get(&job_id) != Some(&reason) {
                state.pending_reasons.insert(job_id, reason);
                // Followers (`drover run`, `logs -f`) show the reason as it changes;
                // nothing was committed, so nothing else would wake them.
                self.bump();
            }
        }
        self.metrics
            .placement
            .observe(started.elapsed().as_secs_f64());
        placed
    }

    /// Queues and sends the Start commands of committed placements.
    pub(crate) fn dispatch(&self, state: &mut State, placed: Vec<(NodeId, Task)>) {
        for (node, t) in placed {
            if let Some(cmd) = start_command(state, &t, self.buffers.nats_url.as_deref()) {
                self.enqueue(state, &node, cmd);
            }
        }
        self.flush_all(state);
    }
}

/// Whether a task that fits no node is blocked: every ready node fails it for a reason
/// waiting will not change. Room frees up as tasks end; nothing else changes by waiting.
/// Blocked needs a reason found on some node, not only the absence of one.
fn blocked(why: &HashMap<Misfit, u32>, ready: usize) -> bool {
    ready > 0 && why.values().any(|n| *n > 0) && why.get(&Misfit::Resources).is_none_or(|n| *n == 0)
}

/// Finds the node a task goes to among the `ready` ones (a rotating window from
/// `cursor`), or counts, per reason, the nodes that cannot take it. `allocated` says
/// what a node holds: its entry's allocation for the scheduler, more for a plan that
/// has placed tasks of its own.
fn choose(
    state: &State,
    ready: &[NodeId],
    cursor: usize,
    spec: &JobSpec,
    variants: Option<&[Variant]>,
    counts: &HashMap<NodeId, u32>,
    allocated: impl Fn(&NodeId, &NodeEntry) -> Resources,
) -> Result<NodeId, HashMap<Misfit, u32>> {
    let mut best: Option<(u32, f64, NodeId)> = None;
    let mut why: HashMap<Misfit, u32> = HashMap::new();
    // Nodes that run no variant natively; they are looked at again, for an emulated
    // variant, only when no node at all runs one natively.
    let mut foreign: Vec<NodeId> = Vec::new();
    let mut seen = 0;
    for k in 0..ready.len() {
        let node_id = &ready[(cursor + k) % ready.len()];
        let Some(entry) = state.nodes.get(node_id) else {
            continue;
        };
        let held = allocated(node_id, entry);
        match fits_given(entry, held, spec, variants, Execution::Native) {
            Ok(()) => {
                consider(entry, held, node_id, counts, &mut best);
                seen += 1;
                if seen >= CANDIDATES || best.as_ref().is_some_and(|b| b.0 == 0 && b.1 == 0.0) {
                    break;
                }
            }
            Err(Misfit::Platform) => foreign.push(node_id.clone()),
            Err(m) => *why.entry(m).or_insert(0) += 1,
        }
    }
    if best.is_none() {
        for node_id in &foreign {
            let Some(entry) = state.nodes.get(node_id) else {
                continue;
            };
            let held = allocated(node_id, entry);
            match fits_given(entry, held, spec, variants, Execution::Emulated) {
                Ok(()) => consider(entry, held, node_id, counts, &mut best),
                Err(m) => *why.entry(m).or_insert(0) += 1,
            }
        }
    }
    match best {
        Some((_, _, node_id)) => Ok(node_id),
        None => Err(why),
    }
}

/// Scores a node that fits a task and keeps it in `best` if it is the best so far: fewest
/// tasks of the same job, then least loaded.
fn consider(
    entry: &NodeEntry,
    allocated: Resources,
    node_id: &NodeId,
    counts: &HashMap<NodeId, u32>,
    best: &mut Option<(u32, f64, NodeId)>,
) {
    let cap = entry.node.info.capacity;
    let load = allocated.cpu / cap.cpu.max(1e-9)
        + allocated.memory.0 as f64 / (cap.memory.0.max(1) as f64);
    let same_job = counts.get(node_id).copied().unwrap_or(0);
    if best
        .as_ref()
        .is_none_or(|(c, l, _)| (same_job, load) < (*c, *l))
    {
        *best = Some((same_job, load, node_id.clone()));
    }
}

/// Where the tasks a plan would start would go now: `tasks` tasks of `spec` from index
/// `first`, placed one after another as the scheduler would place them, each counting
/// against its node for the next. `spread_of` is the job whose live tasks the new ones
/// spread away from (a scale keeps its current tasks); `replaced` is the job an update
/// stops, whose resources are still held (its tasks stop first), but which tells whether
/// tasks that wait fit once it has stopped.
pub(crate) fn plan_placement(
    state: &State,
    project: &ProjectId,
    spec: &JobSpec,
    first: u32,
    tasks: u32,
    spread_of: Option<&JobId>,
    replaced: Option<&JobId>,
) -> PlacementPlan {
    let mut ready: Vec<NodeId> = state
        .nodes
        .values()
        .filter(|e| e.node.status == NodeStatus::Ready)
        .map(|e| e.node.id.clone())
        .collect();
    ready.sort();
    // A missing artifact offers no variant, as in a scheduling pass.
    let variants: Option<Vec<Variant>> = spec.artifact.as_ref().map(|r| {
        state
            .artifacts
            .get(&(project.clone(), r.name.clone(), r.version.clone()))
            .map(|a| a.variants.clone())
            .unwrap_or_default()
    });
    let mut counts: HashMap<NodeId, u32> = HashMap::new();
    for t in spread_of.into_iter().flat_map(|j| state.job_tasks(j)) {
        if let Some(n) = &t.node_id
            && !t.state.is_terminal()
        {
            *counts.entry(n.clone()).or_insert(0) += 1;
        }
    }
    let no_change = HashMap::new();
    let (placed, nodes, why) = simulate(
        state,
        &ready,
        spec,
        variants.as_deref(),
        counts.clone(),
        tasks,
        &no_change,
    );
    let mut plan = PlacementPlan {
        tasks,
        first_index: first,
        placed,
        nodes,
        verdict: PlacementVerdict::Fits,
        reason: None,
        fits_after_current_stops: false,
    };
    if tasks == 0 {
        plan.verdict = PlacementVerdict::Nothing;
        return plan;
    }
    let Some(why) = why else {
        return plan;
    };
    plan.reason = Some(misfit_text(state, project, spec, &why, ready.len()));
    if blocked(&why, ready.len()) {
        plan.verdict = PlacementVerdict::Blocked;
        return plan;
    }
    plan.verdict = PlacementVerdict::Waits;
    // What the replaced version's tasks hold on each node, as the node's allocation
    // counts them (placed and not yet ended).
    let mut freed: HashMap<NodeId, Resources> = HashMap::new();
    if let Some(old) = replaced.and_then(|j| state.jobs.get(j)) {
        for t in state.job_tasks(&old.id) {
            if let Some(n) = &t.node_id
                && !t.state.is_terminal()
            {
                let f = freed.entry(n.clone()).or_insert(Resources {
                    cpu: 0.0,
                    memory: Default::default(),
                });
                *f = plus(*f, old.spec.resources);
            }
        }
    }
    if !freed.is_empty() {
        let (_, _, why) = simulate(
            state,
            &ready,
            spec,
            variants.as_deref(),
            counts,
            tasks,
            &freed,
        );
        plan.fits_after_current_stops = why.is_none();
    }
    plan
}

/// Places `tasks` identical tasks one after another, as if `freed` were no longer held
/// on each node. Returns how many fit, where, and why the first that did not fit failed
/// (every later one fails alike: the nodes only fill up).
fn simulate(
    state: &State,
    ready: &[NodeId],
    spec: &JobSpec,
    variants: Option<&[Variant]>,
    mut counts: HashMap<NodeId, u32>,
    tasks: u32,
    freed: &HashMap<NodeId, Resources>,
) -> (u32, BTreeMap<String, u32>, Option<HashMap<Misfit, u32>>) {
    let mut added: HashMap<NodeId, Resources> = HashMap::new();
    let mut nodes: BTreeMap<String, u32> = BTreeMap::new();
    let mut cursor = state.cursor;
    for placed in 0..tasks {
        let held = |id: &NodeId, e: &NodeEntry| {
            let mut r = e.allocated;
            if let Some(f) = freed.get(id) {
                r = minus(r, *f);
            }
            if let Some(a) = added.get(id) {
                r = plus(r, *a);
            }
            r
        };
        match choose(state, ready, cursor, spec, variants, &counts, held) {
            Ok(node_id) => {
                cursor = cursor.wrapping_add(1);
                *counts.entry(node_id.clone()).or_insert(0) += 1;
                let a = added.entry(node_id.clone()).or_insert(Resources {
                    cpu: 0.0,
                    memory: Default::default(),
                });
                *a = plus(*a, spec.resources);
                if let Some(e) = state.nodes.get(&node_id) {
                    *nodes.entry(e.node.info.name.clone()).or_insert(0) += 1;
                }
            }
            Err(why) => return (placed, nodes, Some(why)),
        }
    }
    (tasks, nodes, None)
}

fn plus(a: Resources, b: Resources) -> Resources {
    Resources {
        cpu: a.cpu + b.cpu,
        memory: ByteSize(a.memory.0.saturating_add(b.memory.0)),
    }
}

fn minus(a: Resources, b: Resources) -> Resources {
    Resources {
        cpu: (a.cpu - b.cpu).max(0.0),
        memory: ByteSize(a.memory.0.saturating_sub(b.memory.0)),
    }
}

/// Names what a job's artifact offers and what the ready nodes are, e.g.
/// "artifact app:1.2 has linux/arm64, darwin/arm64; nodes: linux/amd64/v3+gnu ×3", with
/// the platforms a node emulates after its count ("(emulates linux/riscv64)").
fn artifact_misfit(state: &State, project: &ProjectId, spec: &JobSpec) -> String {
    let Some(r) = &spec.artifact else {
        return String::new();
    };
    let key = (project.clone(), r.name.clone(), r.version.clone());
    let offered = match state.artifacts.get(&key) {
        Some(a) => a
            .variants
            .iter()
            .map(|v| v.platform.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        None => return format!("artifact {r} does not exist"),
    };
    let mut nodes: std::collections::BTreeMap<(String, String), u32> = Default::default();
    for e in state.nodes.values() {
        if e.node.status == NodeStatus::Ready {
            let info = &e.node.info;
            let libc = info
                .libc
                .as_ref()
                .map(|l| format!("+{}", l.kind))
                .unwrap_or_default();
            let emulates = if info.emulates.is_empty() {
                String::new()
            } else {
                let list: Vec<String> = info.emulates.iter().map(Platform::to_string).collect();
                format!(" (emulates {})", list.join(", "))
            };
            *nodes
                .entry((format!("{}{libc}", info.platform), emulates))
                .or_default() += 1;
        }
    }
    let nodes: Vec<String> = nodes
        .iter()
        .map(|((p, emulates), n)| format!("{p} ×{n}{emulates}"))
        .collect();
    format!("artifact {r} has {offered}; nodes: {}", nodes.join(", "))
}

fn pending_reason(
    state: &State,
    job_id: &JobId,
    why: &HashMap<Misfit, u32>,
    ready: usize,
) -> String {
    let Some(job) = state.jobs.get(job_id) else {
        return String::new();
    };
    misfit_text(state, &job.project, &job.spec, why, ready)
}

/// Says why a task of `spec` in `project` fits no node, from the count of nodes that
/// refused it for each reason.
fn misfit_text(
    state: &State,
    project: &ProjectId,
    spec: &JobSpec,
    why: &HashMap<Misfit, u32>,
    ready: usize,
) -> String {
    if ready == 0 {
        return "no ready nodes".into();
    }
    // "1 node lacks", "2 nodes lack".
    let nodes = |n: u32, one: &str, many: &str| {
        if n == 1 {
            format!("1 node {one}")
        } else {
            format!("{n} nodes {many}")
        }
    };
    let mut parts = Vec::new();
    for (m, n) in {
        let mut v: Vec<_> = why.iter().filter(|(_, n)| **n > 0).collect();
        v.sort();
        v
    } {
        parts.push(match m {
            Misfit::Runtime => {
                let lack = nodes(*n, "lacks", "lack");
                format!("{lack} runtime {}", spec.runtime)
            }
            Misfit::Constraint => {
                let fail = nodes(*n, "fails", "fail");
                let list: Vec<String> = spec.constraints.iter().map(|c| c.to_string()).collect();
                format!("{fail} the constraints ({})", list.join(", "))
            }
            Misfit::Platform => artifact_misfit(state, project, spec),
            Misfit::Capacity => format!(
                "{} (the task needs cpu {}, memory {})",
                nodes(*n, "is too small", "are too small"),
                spec.resources.cpu,
                spec.resources.memory
            ),
            Misfit::Resources => format!(
                "{} free resources (the task needs cpu {}, memory {})",
                nodes(*n, "lacks", "lack"),
                spec.resources.cpu,
                spec.resources.memory
            ),
            Misfit::Stdin => format!(
                "{} give runtime {}'s tasks their stdin (an agent too old for it, or a runtime that cannot)",
                nodes(*n, "cannot", "cannot"),
                spec.runtime
            ),
            Misfit::Vertex => format!(
                "{} serve runtime {}'s tasks as pipeline vertex replicas (an agent too old for pipelines, or a runtime it has no data plane for)",
                nodes(*n, "cannot", "cannot"),
                spec.runtime
            ),
        });
    }
    if parts.is_empty() {
        format!("waiting for a node ({ready} ready)")
    } else {
        format!("no node can run it: {}", parts.join(", "))
    }
}

/// The Start command for a placed task: its spec, the artifact variant for its node
/// and its config.
pub(crate) fn start_command(state: &State, t: &Task, nats_url: Option<&str>) -> Option<Command> {
    let job = state.jobs.get(&t.job_id)?;
    let artifact = match &job.spec.artifact {
        Some(r) => {
            // The scheduler placed the task only where a variant matches, so one does;
            // should the artifact have been deleted since, the task is not started.
            let node = state.nodes.get(t.node_id.as_ref()?)?;
            let variant = variant_for(state, &job.project, r, &node.node.info)?;
            Some(AssignedArtifact {
                reference: r.clone(),
                variant,
            })
        }
        None => None,
    };
    let mut spec = job.spec.clone();
    // The config travels beside the spec in its versioned encoding.
    let config = spec.runtime_env.config.take().map(EncodedConfig::encode);
    // A replica whose buffers are in NATS reaches them itself, at the server the
    // controller was configured with; embedded buffers go through this connection.
    let nats_url = spec
        .vertex
        .as_deref()
        .filter(|v| v.buffer.backend == drover_core::pipeline::spec::BufferBackend::Nats)
        .and(nats_url)
        .map(str::to_string);
    Some(Command::Start(Box::new(TaskAssignment {
        task_id: t.id.clone(),
        job_id: job.id.clone(),
        project: job.project.clone(),
        job_name: job.name.clone(),
        index: t.index,
        attempt: t.attempt,
        spec,
        artifact,
        config,
        nats_url,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(platform: &str, emulates: &[&str]) -> NodeInfo {
        let mut info: NodeInfo = serde_json::from_value(serde_json::json!({
            "name": "n",
            "platform": platform,
            "runtimes": ["process"],
            "capacity": {"cpu": 1.0, "memory": "1Gi"},
        }))
        .unwrap();
        info.emulates = emulates.iter().map(|p| p.parse().unwrap()).collect();
        info
    }

    fn variants(platforms: &[&str]) -> Vec<Variant> {
        platforms
            .iter()
            .enumerate()
            .map(|(i, p)| Variant {
                platform: p.parse().unwrap(),
                digest: drover_core::artifact::Digest::of_hex(&format!("{i:064x}")).unwrap(),
                size: 1,
            })
            .collect()
    }

    fn chosen(vs: &[Variant], info: &NodeInfo) -> Option<String> {
        pick(vs, info)
            .or_else(|| pick_emulated(vs, info))
            .map(|v| v.platform.to_string())
    }

    #[test]
    fn a_native_variant_is_preferred_over_an_emulated_one() {
        let emu = node("linux/amd64/v3", &["linux/arm64"]);
        let both = variants(&["linux/arm64", "linux/amd64"]);
        assert_eq!(chosen(&both, &emu).as_deref(), Some("linux/amd64"));
        // The emulated variant is the only choice when none runs natively, and then
        // only in the scheduler's second pass.
        let arm = variants(&["linux/arm64"]);
        assert_eq!(chosen(&arm, &emu).as_deref(), Some("linux/arm64"));
        assert!(pick(&arm, &emu).is_none());
        // Without an emulator, or for a build that needs the emulated machine's libc,
        // nothing runs.
        assert_eq!(chosen(&arm, &node("linux/amd64/v3", &[])), None);
        assert_eq!(chosen(&variants(&["linux/arm64+gnu"]), &emu), None);
    }

    #[test]
    fn an_emulating_node_fits_only_when_no_variant_runs_natively() {
        let entry = |info: NodeInfo| NodeEntry {
            node: drover_core::state::Node {
                id: NodeId::from("n"),
                info,
                status: NodeStatus::Ready,
                last_seen: 0,
                last_event_seq: 0,
                registered_at: 0,
                unreachable_since: None,
                protocol_version: 0,
            },
            allocated: Default::default(),
            tasks: Default::default(),
        };
        let spec: JobSpec = serde_json::from_value(serde_json::json!({
            "name": "j",
            "runtime": "process",
            "artifact": "a:1",
        }))
        .unwrap();
        let emu = entry(node("linux/amd64/v3", &["linux/arm64"]));
        let arm = variants(&["linux/arm64"]);
        let both = variants(&["linux/arm64", "linux/amd64"]);
        assert!(fits_given(&emu, emu.allocated, &spec, Some(&arm), Execution::Native).is_err());
        assert!(fits_given(&emu, emu.allocated, &spec, Some(&arm), Execution::Emulated).is_ok());
        assert!(fits_given(&emu, emu.allocated, &spec, Some(&both), Execution::Native).is_ok());
        assert!(fits_given(&emu, emu.allocated, &spec, Some(&both), Execution::Emulated).is_err());
    }
}
