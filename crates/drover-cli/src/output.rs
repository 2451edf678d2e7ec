//! Listings as readable tables or as JSON (`-o json`).

use anyhow::Result;
use clap::ValueEnum;
use comfy_table::{Table, presets};
use drover_core::api::{
    JobView, NodeView, PlacementVerdict, PlanAction, PlanResponse, ScaleChange, TaskView,
};
use drover_core::artifact::{Artifact, Digest, Variant};
use drover_core::state::{Exit, RolloutState};
use drover_core::{Millis, now_millis};
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// The reader of the command's output went away (a pipe into `head` closed). The
/// command ends quietly and successfully, as `ls | head -1` does: it is not an error of
/// the command's, and a script with `pipefail` must not see it as one.
#[derive(Debug, thiserror::Error)]
#[error("the reader of the output went away")]
pub struct ReaderGone;

/// Whether `e` says the output's reader went away.
pub fn is_reader_gone(e: &anyhow::Error) -> bool {
    e.downcast_ref::<ReaderGone>().is_some()
}

/// Writes `bytes` to `w` and flushes it; a closed pipe becomes [`ReaderGone`].
pub fn write_to(mut w: impl std::io::Write, bytes: &[u8], what: &str) -> Result<()> {
    match w.write_all(bytes).and_then(|()| w.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(ReaderGone.into()),
        Err(e) => Err(anyhow::anyhow!("writing to {what}: {e}")),
    }
}

/// Writes text to stdout; see [`write_to`].
pub fn out(text: &str) -> Result<()> {
    write_to(std::io::stdout().lock(), text.as_bytes(), "stdout")
}

/// `println!` that returns an error instead of panicking when stdout is closed.
#[macro_export]
macro_rules! outln {
    () => {
        $crate::output::out("\n")
    };
    ($($arg:tt)*) => {
        $crate::output::out(&format!("{}\n", format_args!($($arg)*)))
    };
}

/// Resolves once stdout is a pipe whose reader has closed it. A follow that prints
/// nothing for a while (`drover logs -f JOB | head -2` on a quiet task) would otherwise
/// only learn it at its next write; on a terminal or a file it never resolves.
pub async fn stdout_closed() {
    loop {
        let mut fd = libc::pollfd {
            fd: libc::STDOUT_FILENO,
            events: 0,
            revents: 0,
        };
        // SAFETY: one valid pollfd, a zero timeout; poll only reads and writes it. A
        // pipe's write end reports POLLERR once its read end is closed.
        let n = unsafe { libc::poll(&mut fd, 1, 0) };
        if n > 0 && fd.revents & (libc::POLLERR | libc::POLLHUP) != 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// Prints `v` as pretty JSON, with its times as RFC 3339 (see [`times_as_rfc3339`]).
pub fn json<T: Serialize>(v: &T) -> Result<()> {
    let mut value = serde_json::to_value(v)?;
    times_as_rfc3339(&mut value);
    outln!("{}", serde_json::to_string_pretty(&value)?)?;
    Ok(())
}

/// The fields of the API's objects that hold a time, as milliseconds since the epoch.
const TIME_FIELDS: &[&str] = &[
    "at",
    "created_at",
    "finished_at",
    "last_seen",
    "not_before",
    "registered_at",
    "started_at",
    "unreachable_since",
    "updated_at",
];

/// Fields whose keys are the user's own (a spec's env, labels or config), so a key that
/// looks like a time there is not one.
const USER_FIELDS: &[&str] = &["spec", "env", "labels", "config"];

/// Rewrites the times in `v` from milliseconds since the epoch, as the API sends them,
/// to RFC 3339 with milliseconds in UTC (`2026-12-03T10:00:00.123Z`), which people and
/// `jq`'s `fromdate` read without arithmetic. The API keeps milliseconds, which older
/// clients read; the CLI's JSON is for people and scripts, as kubectl's is.
pub fn times_as_rfc3339(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            for (key, field) in map.iter_mut() {
                if TIME_FIELDS.contains(&key.as_str()) {
                    if let Some(ms) = field.as_i64() {
                        *field = drover_core::logtime::format_rfc3339_millis(ms).into();
                    }
                } else if !USER_FIELDS.contains(&key.as_str()) {
                    times_as_rfc3339(field);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(times_as_rfc3339),
        _ => {}
    }
}

pub(crate) fn table(headers: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING);
    t.set_header(headers.to_vec());
    t
}

pub(crate) fn print(t: Table) -> Result<()> {
    // comfy-table pads every line to the table's width; trailing spaces only get in the
    // way of grep and copy-paste.
    let mut text = String::new();
    for line in t.to_string().lines() {
        text.push_str(line.trim_end());
        text.push('\n');
    }
    out(&text)
}

pub(crate) fn age(at: Millis) -> String {
    let secs = ((now_millis() - at).max(0) / 1000) as u64;
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn exit_text(e: &Option<Exit>) -> String {
    match e {
        Some(Exit { code: Some(c), .. }) => c.to_string(),
        Some(Exit {
            signal: Some(s), ..
        }) => s.clone(),
        _ => String::new(),
    }
}

pub fn jobs(out: Output, jobs: &[JobView]) -> Result<()> {
    if out == Output::Json {
        return json(&jobs);
    }
    // A cluster admin's listing spans projects: which one a row is in then matters.
    let projects = several_projects(jobs.iter().map(|j| &j.job.project));
    let mut headers = vec!["NAME", "KIND", "STATUS", "TASKS", "VERSION", "AGE"];
    if projects {
        headers.insert(0, "PROJECT");
    }
    let mut t = table(&headers);
    for j in jobs {
        let summary: Vec<String> = j
            .task_states
            .iter()
            .map(|(s, n)| format!("{n} {s}"))
            .collect();
        let mut row = vec![
            j.job.name.clone(),
            j.job.spec.kind.to_string(),
            job_state(j),
            summary.join(", "),
            j.job.version.to_string(),
            age(j.job.created_at),
        ];
        if projects {
            row.insert(0, j.job.project.to_string());
        }
        t.add_row(row);
    }
    print(t)
}

/// `drover job history`: each version, newest first, with what changed from the one
/// before it (the top-level spec fields that differ).
pub fn history(out: Output, versions: &[JobView]) -> Result<()> {
    if out == Output::Json {
        return json(&versions);
    }
    let mut t = table(&["VERSION", "STATUS", "CREATED", "CHANGED", "REASON"]);
    for (i, v) in versions.iter().enumerate() {
        let changed = match versions.get(i + 1) {
            Some(before) => changed_fields(&before.job.spec, &v.job.spec),
            None => "(first kept)".to_string(),
        };
        t.add_row(vec![
            v.job.version.to_string(),
            job_state(v),
            format!("{} ago", age(v.job.created_at)),
            changed,
            one_line(&v.job.reason),
        ]);
    }
    print(t)
}

/// `drover job plan`: what applying would do, each changed field (`~ path: old → new`,
/// `+ path: new`, `- path: old`) and whether the tasks that would start can be placed.
/// `packed` names the local working_dir the CLI packed but did not upload.
pub fn plan(p: &PlanResponse, packed: Option<&str>) -> Result<()> {
    let name = &p.name;
    let placement = &p.placement;
    let current = p.current_version.unwrap_or_default();
    let what = match (p.action, p.scale) {
        (PlanAction::Create, _) => format!(
            "create job {name} (version 1, {})",
            count(placement.tasks, "task")
        ),
        (PlanAction::Update, _) => format!(
            "update job {name} to version {} ({}), replacing every task of version {current}",
            p.version,
            count(placement.tasks, "task")
        ),
        (PlanAction::Scale, Some(ScaleChange { from, to })) if to > from => format!(
            "scale job {name} from {from} to {to} in place (version {}): {} {}, the others keep running",
            p.version,
            count(to - from, "task"),
            if to - from == 1 { "starts" } else { "start" }
        ),
        (PlanAction::Scale, Some(ScaleChange { from, to })) => format!(
            "scale job {name} from {from} to {to} in place (version {}): {} {}, the others keep running",
            p.version,
            count(from - to, "task"),
            if from - to == 1 { "stops" } else { "stop" }
        ),
        (PlanAction::Unchanged, _) => format!(
            "job {name} is unchanged (version {}): applying does nothing",
            p.version
        ),
        (PlanAction::Rerun, _) => format!(
            "re-run job {name} as version {} ({})",
            p.version,
            count(placement.tasks, "task")
        ),
        (action, _) => format!("job {name}: {action} (version {})", p.version),
    };
    outln!("{what}")?;
    if !p.changes.is_empty() {
        outln!()?;
        for c in &p.changes {
            match (&c.old, &c.new) {
                (Some(old), Some(new)) => {
                    outln!("  ~ {}: {} → {}", c.path, short_json(old), short_json(new))?
                }
                (None, Some(new)) => outln!("  + {}: {}", c.path, short_json(new))?,
                (Some(old), None) => outln!("  - {}: {}", c.path, short_json(old))?,
                (None, None) => outln!("  ~ {}", c.path)?,
            }
        }
    }
    let waiting = placement.tasks.saturating_sub(placement.placed);
    let on = placement
        .nodes
        .iter()
        .map(|(node, n)| format!("{node} ×{n}"))
        .collect::<Vec<_>>()
        .join(", ");
    let reason = placement.reason.as_deref().unwrap_or("no reason given");
    let line = match placement.verdict {
        PlacementVerdict::Nothing => None,
        PlacementVerdict::Fits => Some(format!(
            "placement: {} can be placed now (on {on})",
            if placement.tasks == 1 {
                "the task".to_string()
            } else {
                format!("all {} tasks", placement.tasks)
            }
        )),
        PlacementVerdict::Waits => Some(format!(
            "placement: {} of {} can be placed now; {} would wait as pending: {reason}{}",
            placement.placed,
            count(placement.tasks, "task"),
            waiting,
            if placement.fits_after_current_stops {
                format!(
                    " (they fit once the tasks of version {current} have stopped, which applying asks first)"
                )
            } else {
                String::new()
            }
        )),
        PlacementVerdict::Blocked => Some(format!(
            "placement: BLOCKED: {} cannot be placed on any node in the cluster, and would stay pending until a node that fits joins: {reason}",
            if waiting == 1 {
                "the task".to_string()
            } else {
                format!("{waiting} tasks")
            }
        )),
        PlacementVerdict::Unknown => Some(format!("placement: {reason}")),
    };
    if let Some(line) = line {
        outln!()?;
        outln!("{line}")?;
    }
    if let Some(digest) = &p.missing_blob {
        match packed {
            Some(dir) => outln!("{dir} is uploaded when the job is applied")?,
            None => outln!(
                "warning: runtime_env.working_dir {digest} has not been uploaded, so applying this spec would be refused"
            )?,
        }
    }
    Ok(())
}

/// "1 task", "3 tasks".
fn count(n: u32, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// A value as compact JSON, cut to one line of at most 80 characters for a plan's
/// lines (`-o json` keeps it whole).
fn short_json(v: &serde_json::Value) -> String {
    const MAX: usize = 80;
    let text = v.to_string();
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

/// The top-level spec fields that differ between two versions, e.g. `command, env`:
/// the first part of each path the plan's field diff gives.
fn changed_fields(before: &drover_core::JobSpec, after: &drover_core::JobSpec) -> String {
    let mut changed: Vec<String> = drover_core::api::spec_changes(before, after)
        .into_iter()
        .map(|c| {
            let end = c.path.find(['.', '[']).unwrap_or(c.path.len());
            c.path[..end].to_string()
        })
        .collect();
    changed.sort();
    changed.dedup();
    if changed.is_empty() {
        "(same spec: a rerun)".to_string()
    } else {
        changed.join(", ")
    }
}

/// Whether a listing holds rows of more than one project.
fn several_projects<'a>(mut projects: impl Iterator<Item = &'a drover_core::ProjectId>) -> bool {
    let Some(first) = projects.next() else {
        return false;
    };
    projects.any(|p| p != first)
}

/// What a job is doing: the server's state when it says one, else its status.
pub fn job_state(j: &JobView) -> String {
    match j.state {
        Some(s) => s.to_string(),
        None => j.job.status.to_string(),
    }
}

/// A reason cut to one line for a table (its first, at most 100 characters); `status`
/// and JSON keep it whole.
fn one_line(reason: &str) -> String {
    cut_line(reason, 100)
}

/// The first line of `text`, at most `max` characters of it, marked with `…` (one or
/// two characters more) when anything was cut.
fn cut_line(text: &str, max: usize) -> String {
    let first = text.lines().next().unwrap_or("");
    let more = first.len() < text.trim_end().len();
    match first.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &first[..cut]),
        None if more => format!("{first} …"),
        None => first.to_string(),
    }
}

/// Which attempts of each task index a task listing shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempts {
    /// The latest attempt of each index, with how many times it was restarted.
    Latest,
    /// Every attempt, one row each.
    All,
}

pub fn tasks(out: Output, tasks: &[TaskView], attempts: Attempts) -> Result<()> {
    if out == Output::Json {
        return json(&tasks);
    }
    // Earlier attempts of each index, to count restarts and to leave out.
    let mut latest: std::collections::HashMap<(&drover_core::JobId, u32), (u32, usize)> =
        std::collections::HashMap::new();
    for v in tasks {
        let e = latest
            .entry((&v.task.job_id, v.task.index))
            .or_insert((v.task.attempt, 0));
        e.0 = e.0.max(v.task.attempt);
        e.1 += 1;
    }
    let projects = several_projects(tasks.iter().map(|v| &v.task.project));
    // A listing with tasks of several versions of one job (a rollout under way, or
    // `--all`) says which version each row is; others have no use for the column.
    let mut versions: std::collections::HashMap<
        (&drover_core::ProjectId, &str),
        &drover_core::JobId,
    > = std::collections::HashMap::new();
    let several_versions = tasks.iter().any(|v| {
        let first = versions
            .entry((&v.task.project, v.task.job_name.as_str()))
            .or_insert(&v.task.job_id);
        *first != &v.task.job_id
    });
    let mut headers = vec![
        "ID", "JOB", "INDEX", "STATE", "RESTARTS", "NODE", "PORTS", "EXIT", "AGE", "REASON",
    ];
    if several_versions {
        headers.push("VERSION");
    }
    if projects {
        headers.insert(1, "PROJECT");
    }
    let mut t = table(&headers);
    for v in tasks {
        let task = &v.task;
        let (newest, count) = latest[&(&task.job_id, task.index)];
        if attempts == Attempts::Latest && task.attempt != newest {
            continue;
        }
        let reason = match &v.pending_reason {
            Some(why) if task.reason.is_empty() => why.as_str(),
            _ => task.reason.as_str(),
        };
        // A task that has ended holds no ports any more.
        let ports = if task.state.is_terminal() {
            String::new()
        } else {
            task.ports
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut row = vec![
            task.id.short().to_string(),
            task.job_name.clone(),
            task.index.to_string(),
            // A task on an unreachable node shows its last known state beside the fact
            // that it is only that.
            if v.unknown {
                format!("unknown ({})", task.state)
            } else {
                task.state.to_string()
            },
            (count - 1).to_string(),
            v.node_name.clone().unwrap_or_default(),
            ports,
            exit_text(&task.exit),
            age(task.created_at),
            one_line(reason),
        ];
        if several_versions {
            row.push(v.version.map_or_else(|| "?".to_string(), |n| n.to_string()));
        }
        if projects {
            row.insert(1, task.project.to_string());
        }
        t.add_row(row);
    }
    print(t)
}

pub fn envs(out: Output, envs: &[drover_core::api::NodeEnvView]) -> Result<()> {
    if out == Output::Json {
        return json(&envs);
    }
    let mut t = table(&[
        "NODE",
        "KIND",
        "KEY",
        "PYTHON",
        "REQUIREMENTS",
        "SIZE",
        "USED",
        "IN USE",
    ]);
    for e in envs {
        t.add_row(vec![
            e.node_name.clone(),
            e.kind.clone(),
            e.env.key.clone(),
            e.env.python.clone(),
            e.env.requirements.join(" "),
            size(e.env.size),
            age(i64::try_from(e.env.last_used_ms).unwrap_or(i64::MAX)),
            e.env.in_use.to_string(),
        ]);
    }
    print(t)
}

pub fn nodes(out: Output, nodes: &[NodeView]) -> Result<()> {
    if out == Output::Json {
        return json(&nodes);
    }
    let mut t = table(&[
        "ID",
        "NAME",
        "STATUS",
        "PLATFORM",
        "LIBC",
        "RUNTIMES",
        "CPU",
        "MEMORY",
        "TASKS",
        "LABELS",
        "ISOLATION",
    ]);
    for n in nodes {
        let info = &n.node.info;
        // A runtime's version, when its fingerprint gave one, says which engine runs it.
        let runtimes: Vec<String> = info
            .runtimes
            .iter()
            .map(|r| match info.attributes.get(&format!("{r}.version")) {
                Some(v) => format!("{r} {v}"),
                None => r.to_string(),
            })
            .collect();
        let labels: Vec<String> = info
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        t.add_row(vec![
            n.node.id.to_string(),
            info.name.clone(),
            n.node.status.to_string(),
            info.platform.clone(),
            // Agents that predate libc reporting leave it out.
            info.libc
                .as_ref()
                .map_or_else(|| "-".to_string(), |l| l.to_string()),
            runtimes.join(","),
            format!("{:.1}/{:.1}", n.allocated.cpu, info.capacity.cpu),
            format!(
                "{}/{}",
                size(n.allocated.memory.0),
                size(info.capacity.memory.0)
            ),
            n.tasks.to_string(),
            labels.join(","),
            // What keeps the node's process tasks apart (users, cgroups, both or none);
            // agents that predate it, or offer no process runtime, leave it out.
            info.attributes
                .get("process.isolation")
                .cloned()
                .unwrap_or_else(|| "-".to_string()),
        ]);
    }
    print(t)
}

pub fn job_status(
    out: Output,
    job: &JobView,
    task_list: &[TaskView],
    limit: EventLimit,
) -> Result<()> {
    if out == Output::Json {
        #[derive(Serialize)]
        struct Status<'a> {
            job: &'a JobView,
            tasks: &'a [TaskView],
        }
        return json(&Status {
            job,
            tasks: task_list,
        });
    }
    let j = &job.job;
    outln!("name:     {}", j.name)?;
    outln!("id:       {}", j.id)?;
    outln!("kind:     {}", j.spec.kind)?;
    outln!("state:    {}", job_state(job))?;
    if !j.reason.is_empty() {
        outln!("reason:   {}", j.reason)?;
    }
    if let Some(e) = &j.exit {
        outln!("exit:     {}", exit_text(&Some(e.clone())))?;
    }
    outln!("version:  {}", j.version)?;
    if let Some(r) = j.rollout.as_ref().filter(|_| !j.status.is_final()) {
        match r.state {
            RolloutState::InProgress => {
                let policy = j.spec.update_policy();
                outln!(
                    "rollout:  from version {}: {}/{} tasks updated ({} at a time, each running {} before the next)",
                    r.from_version,
                    r.updated(j.spec.count),
                    j.spec.count,
                    policy.max_parallel,
                    policy.min_healthy_time
                )?;
            }
            RolloutState::Failed => outln!("rollout:  {}", r.reason)?,
            _ => {}
        }
    }
    outln!("count:    {}", j.spec.count)?;
    outln!("runtime:  {}", j.spec.runtime)?;
    outln!("command:  {}", j.spec.command.join(" "))?;
    if let Some(p) = &job.pending_reason {
        outln!("pending:  {p}")?;
    }
    outln!()?;
    tasks(out, task_list, Attempts::Latest)?;
    timeline(task_list, limit)
}

/// How many events a timeline shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventLimit {
    /// Only the latest this many.
    Latest(usize),
    All,
}

/// How wide a timeline line may be: the message is cut to what is left of it.
const TIMELINE_WIDTH: usize = 100;

/// The tasks' events as one timeline, newest last: when (`12s ago`), the task index and
/// what happened. Earlier attempts of an index are in it too, since restarts are what
/// it is read for. Nothing is printed when no task has an event (a server that
/// predates timelines sends none).
fn timeline(task_list: &[TaskView], limit: EventLimit) -> Result<()> {
    let mut lines: Vec<(Millis, u32, &str)> = task_list
        .iter()
        .flat_map(|v| v.task.events.iter().map(|e| (e.at, v.task.index, e.text())))
        .collect();
    if lines.is_empty() {
        return Ok(());
    }
    // A stable sort: events of the same millisecond stay in each task's order, and the
    // tasks in the listing's (index, then attempt).
    lines.sort_by_key(|(at, _, _)| *at);
    let total = lines.len();
    let shown = match limit {
        EventLimit::All => total,
        EventLimit::Latest(n) => n.min(total),
    };
    outln!()?;
    if shown < total {
        outln!(
            "EVENTS (newest last; the latest {shown} of {total}: --events all or -o json shows every one)"
        )?;
    } else {
        outln!("EVENTS (newest last)")?;
    }
    let when: Vec<String> = lines[total - shown..]
        .iter()
        .map(|(at, _, _)| format!("{} ago", age(*at)))
        .collect();
    let when_width = when.iter().map(String::len).max().unwrap_or(0);
    let index_width = lines[total - shown..]
        .iter()
        .map(|(_, i, _)| i.to_string().len() + 2)
        .max()
        .unwrap_or(0);
    let mut text = String::new();
    for (w, (_, index, message)) in when.iter().zip(&lines[total - shown..]) {
        let index = format!("[{index}]");
        // Indented by one, like the task table above it.
        let lead = format!(" {w:>when_width$}  {index:<index_width$}  ");
        // Two characters are kept for the mark of a cut message.
        let room = TIMELINE_WIDTH
            .saturating_sub(lead.chars().count() + 2)
            .max(20);
        text.push_str(&lead);
        text.push_str(&cut_line(message, room));
        text.push('\n');
    }
    out(&text)
}

/// `drover task status`: one task and its whole story.
pub fn task_status(out: Output, v: &TaskView, limit: EventLimit) -> Result<()> {
    if out == Output::Json {
        return json(v);
    }
    let t = &v.task;
    outln!("id:       {}", t.id)?;
    outln!("job:      {}", t.job_name)?;
    outln!("index:    {}", t.index)?;
    outln!("attempt:  {}", t.attempt)?;
    let state = if v.unknown {
        format!("unknown ({}): its node is unreachable", t.state)
    } else {
        t.state.to_string()
    };
    outln!("state:    {state}")?;
    if let Some(n) = &v.node_name {
        outln!("node:     {n}")?;
    }
    let reason = match &v.pending_reason {
        Some(why) if t.reason.is_empty() => why.as_str(),
        _ => t.reason.as_str(),
    };
    if !reason.is_empty() {
        outln!("reason:   {reason}")?;
    }
    if let Some(e) = &t.exit {
        outln!("exit:     {e}")?;
    }
    if !t.ports.is_empty() && !t.state.is_terminal() {
        let ports: Vec<String> = t.ports.iter().map(|p| p.to_string()).collect();
        outln!("ports:    {}", ports.join(","))?;
    }
    outln!("created:  {} ago", age(t.created_at))?;
    timeline(std::slice::from_ref(v), limit)
}

/// A byte count for people: `512 B`, `38.9 KiB`, `1.5 GiB`.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A digest short enough for a table, like a short commit hash: `sha256:` and 12 digits.
pub fn short_digest(d: &Digest) -> String {
    format!("sha256:{}", &d.hex()[..12])
}

/// The bytes an artifact stores: each distinct blob counted once, since the variants of a
/// universal binary share one.
fn stored_size(a: &Artifact) -> u64 {
    let mut seen = std::collections::HashSet::new();
    a.variants
        .iter()
        .filter(|v| seen.insert(&v.digest))
        .map(|v| v.size)
        .sum()
}

pub fn artifacts(out: Output, list: &[Artifact]) -> Result<()> {
    if out == Output::Json {
        return json(&list);
    }
    let mut t = table(&["NAME", "VERSION", "PLATFORMS", "SIZE", "AGE"]);
    for a in list {
        let platforms: Vec<String> = a.variants.iter().map(|v| v.platform.to_string()).collect();
        t.add_row(vec![
            a.name.clone(),
            a.version.clone(),
            platforms.join(","),
            size(stored_size(a)),
            age(a.created_at),
        ]);
    }
    print(t)
}

pub fn artifact(out: Output, a: &Artifact) -> Result<()> {
    if out == Output::Json {
        return json(a);
    }
    outln!("name:     {}", a.name)?;
    outln!("version:  {}", a.version)?;
    outln!("project:  {}", a.project)?;
    outln!("created:  {} ago", age(a.created_at))?;
    outln!("size:     {}", size(stored_size(a)))?;
    outln!()?;
    let mut t = table(&["PLATFORM", "DIGEST", "SIZE"]);
    for v in &a.variants {
        t.add_row(vec![
            v.platform.to_string(),
            v.digest.to_string(),
            size(v.size),
        ]);
    }
    print(t)
}

/// One variant of a push, for its summary.
pub struct Pushed {
    pub variant: Variant,
    pub file: String,
    /// Whether this push sent the bytes, or the controller had them already.
    pub uploaded: bool,
}

pub fn pushed(out: Output, a: &Artifact, variants: &[Pushed]) -> Result<()> {
    if out == Output::Json {
        return json(a);
    }
    let mut t = table(&["PLATFORM", "DIGEST", "SIZE", "FILE", "UPLOAD"]);
    for p in variants {
        t.add_row(vec![
            p.variant.platform.to_string(),
            short_digest(&p.variant.digest),
            size(p.variant.size),
            p.file.clone(),
            if p.uploaded { "sent" } else { "already stored" }.to_string(),
        ]);
    }
    print(t)?;
    outln!(
        "pushed {} ({} variant{})",
        a.reference(),
        a.variants.len(),
        if a.variants.len() == 1 { "" } else { "s" }
    )?;
    Ok(())
}

pub fn projects(out: Output, projects: &[drover_core::auth::Project]) -> Result<()> {
    if out == Output::Json {
        return json(&projects);
    }
    let mut t = table(&["NAME", "AGE"]);
    for p in projects {
        t.add_row(vec![p.name.to_string(), age(p.created_at)]);
    }
    print(t)
}

pub fn tokens(out: Output, tokens: &[drover_core::auth::TokenView]) -> Result<()> {
    if out == Output::Json {
        return json(&tokens);
    }
    let mut t = table(&["ID", "NAME", "PROJECT", "ROLE", "STATUS", "AGE"]);
    for tok in tokens {
        t.add_row(vec![
            tok.id.clone(),
            tok.name.clone(),
            tok.project.to_string(),
            tok.role.to_string(),
            if tok.revoked { "revoked" } else { "active" }.to_string(),
            age(tok.created_at),
        ]);
    }
    print(t)
}

/// `drover context ls`: names, servers and projects, never tokens.
pub fn contexts(out: Output, cfg: &crate::config::CliConfig) -> Result<()> {
    #[derive(Serialize)]
    struct Row<'a> {
        name: &'a str,
        current: bool,
        server: Option<&'a str>,
        project: Option<&'a str>,
    }
    let rows: Vec<Row> = cfg
        .contexts
        .iter()
        .map(|(name, c)| Row {
            name,
            current: cfg.current_context.as_deref() == Some(name.as_str()),
            server: c.server.as_deref(),
            project: c.project.as_deref(),
        })
        .collect();
    if out == Output::Json {
        return json(&rows);
    }
    let mut t = table(&["CURRENT", "NAME", "SERVER", "PROJECT"]);
    for r in &rows {
        t.add_row(vec![
            if r.current { "*" } else { "" }.to_string(),
            r.name.to_string(),
            r.server.unwrap_or("").to_string(),
            r.project.unwrap_or("").to_string(),
        ]);
    }
    print(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_people_write_them() {
        assert_eq!(size(0), "0 B");
        assert_eq!(size(1023), "1023 B");
        assert_eq!(size(1024), "1.0 KiB");
        assert_eq!(size(39_800), "38.9 KiB");
        assert_eq!(size(3 << 30), "3.0 GiB");
    }

    #[test]
    fn json_times_are_rfc3339_but_the_users_own_keys_are_kept() {
        let mut v = serde_json::json!({
            "job": {"created_at": 1_764_756_000_123_i64, "spec": {"env": {"created_at": 5}}},
            "tasks": [{
                "started_at": 1_764_756_001_000_i64,
                "finished_at": null,
                "events": [{"at": 0, "message": "placed"}],
                "labels": {"updated_at": 7},
                "count": 3
            }]
        });
        times_as_rfc3339(&mut v);
        assert_eq!(v["job"]["created_at"], "2025-12-03T10:00:00.123Z");
        assert_eq!(v["job"]["spec"]["env"]["created_at"], 5);
        assert_eq!(v["tasks"][0]["started_at"], "2025-12-03T10:00:01.000Z");
        assert_eq!(v["tasks"][0]["finished_at"], serde_json::Value::Null);
        assert_eq!(v["tasks"][0]["events"][0]["at"], "1970-01-01T00:00:00.000Z");
        assert_eq!(v["tasks"][0]["labels"]["updated_at"], 7);
        assert_eq!(v["tasks"][0]["count"], 3);
    }
}
