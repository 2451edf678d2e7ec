//! Plans (`POST /v1/plan`): what applying a spec would do, worked out under the state
//! lock from the rule apply itself follows ([`decide_in`]) and the scheduler's own fit
//! logic ([`plan_placement`]), without changing anything: nothing is stored or
//! committed, no task is made, no version or idempotency key is used.

use crate::Inner;
use crate::ops::{Decision, decide_in};
use crate::scheduler::plan_placement;
use drover_core::api::{PlanAction, PlanResponse, ScaleChange, spec_changes};
use drover_core::{JobSpec, ProjectId};

impl Inner {
    /// Plans applying `spec` in `project`. `rerun` is apply's `rerun=true`;
    /// `missing_blob` is the working_dir blob the caller has not uploaded, which the
    /// handler found.
    pub(crate) async fn plan_job(
        &self,
        project: ProjectId,
        spec: JobSpec,
        rerun: bool,
        missing_blob: Option<String>,
    ) -> PlanResponse {
        let state = self.state.lock().await;
        let current = state.job_by_name(&project, &spec.name);
        let decision = decide_in(&state, current, &spec, rerun);
        let current_version = current.map(|j| j.version);
        // What starts: the tasks of every index for a new version, the new indexes of
        // a scale up, nothing otherwise.
        let (action, version, first, tasks) = match decision {
            Decision::Create => (PlanAction::Create, 1, 0, spec.count),
            Decision::Unchanged => (PlanAction::Unchanged, current_version.unwrap_or(1), 0, 0),
            Decision::Scale { from, to } => (
                PlanAction::Scale,
                current_version.unwrap_or(1),
                from,
                to.saturating_sub(from),
            ),
            Decision::Update { version } => (PlanAction::Update, version, 0, spec.count),
            Decision::Rerun { version } => (PlanAction::Rerun, version, 0, spec.count),
        };
        let scaled = matches!(decision, Decision::Scale { .. });
        // A scale's new tasks spread away from the ones that keep running; an update's
        // replace the current version's, which still hold their resources until they
        // have stopped (a finished version holds nothing).
        let id = current.map(|j| &j.id);
        let replaced = current
            .filter(|j| !j.status.is_final() && !scaled)
            .map(|j| &j.id);
        let placement = plan_placement(
            &state,
            &project,
            &spec,
            first,
            tasks,
            id.filter(|_| scaled),
            replaced,
        );
        PlanResponse {
            name: spec.name.clone(),
            changes: current
                .map(|c| spec_changes(&c.spec, &spec))
                .unwrap_or_default(),
            project,
            action,
            current_version,
            version,
            scale: match decision {
                Decision::Scale { from, to } => Some(ScaleChange { from, to }),
                _ => None,
            },
            placement,
            missing_blob,
        }
    }
}
