//! A task's preparation, as a list of steps run in order before the task starts.
//!
//! Each step puts one thing in place for the task (its user, its directory, its
//! socket, its config file, its working_dir, its Python environment, its artifact,
//! the runtime's own preparation), adds what that thing gives the task's launch to the
//! launch (an environment variable, the user it runs as), and returns a [`StepGuard`]
//! that undoes it. The guards are kept in a [`Guards`] stack, so that however the task
//! ends (a later step failed, the deadline passed, it ran and exited, the agent is
//! shutting down) everything is undone newest first.
//!
//! A new step is one type implementing [`PrepareStep`] and one entry in
//! [`steps::STEPS`].
//!
//! The plumbing here is generic over the context the steps are given only so that it
//! can be tested with steps that need no node; the agent's steps all take a
//! [`steps::PrepareContext`].

pub(crate) mod steps;

pub(crate) use steps::CONTAINER_WORK_DIR;

use async_trait::async_trait;

/// One step of a task's preparation.
#[async_trait]
pub(crate) trait PrepareStep<Cx: Send>: Send + Sync {
    /// The step's name, for the agent's own log.
    fn name(&self) -> &'static str;

    /// Puts the step's part of the task in place, adds what it gives the launch to the
    /// context's launch, and returns the guard that undoes it. A step that fails leaves
    /// nothing of its own behind: it undoes its own partial work before returning the
    /// error, since no guard of its exists yet to do it.
    async fn prepare(&self, cx: &mut Cx) -> Result<StepGuard, PrepareError>;

    /// For a running task that a restarted agent adopts, whose preparation an earlier
    /// agent process did: puts back what lives only as long as an agent process (a
    /// served socket, a cache lease). Most steps left everything on disk and have
    /// nothing to redo.
    async fn readopt(&self, _cx: &mut Cx) -> Result<StepGuard, PrepareError> {
        Ok(StepGuard::nothing())
    }
}

/// Why a step failed: the task's failure reason, exactly as the task reports it.
#[derive(Debug)]
pub(crate) struct PrepareError {
    /// The step that failed, filled in by the runner.
    pub step: &'static str,
    pub reason: String,
}

impl From<String> for PrepareError {
    fn from(reason: String) -> PrepareError {
        PrepareError { step: "", reason }
    }
}

impl std::fmt::Display for PrepareError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// How long what a step put in place must last.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lasts {
    /// Until the task's run is over: undone as soon as it has ended (or failed).
    Run,
    /// Until the task is retired, once the controller has its end and its logs: the
    /// task's directory (which holds those logs) and the user that owns it.
    UntilRetired,
}

/// What undoes one step's work. Undoing runs the step's closure; a guard dropped
/// without being undone only drops the closure (and so whatever it holds, a lease or a
/// served socket), which never frees anything that must last until retirement.
pub(crate) struct StepGuard {
    lasts: Lasts,
    undo: Option<Box<dyn FnOnce() + Send>>,
    /// What the step did, for the task's timeline (`working_dir unpacked: 12 files`),
    /// when it did something a user waits for; reported once the step is done.
    note: Option<String>,
}

impl StepGuard {
    /// A guard for a step that put nothing in place that needs undoing (a file in the
    /// task's directory goes with the directory).
    pub fn nothing() -> StepGuard {
        StepGuard {
            lasts: Lasts::Run,
            undo: None,
            note: None,
        }
    }

    /// This guard, with what its step did for the task's timeline.
    pub fn noting(mut self, note: impl Into<String>) -> StepGuard {
        self.note = Some(note.into());
        self
    }

    /// A guard that runs `undo` once the task's run is over.
    pub fn for_run(undo: impl FnOnce() + Send + 'static) -> StepGuard {
        StepGuard {
            lasts: Lasts::Run,
            undo: Some(Box::new(undo)),
            note: None,
        }
    }

    /// A guard that keeps `value` (a lease, a served socket) for as long as the task
    /// runs, and drops it once the run is over.
    pub fn holding<T: Send + 'static>(value: T) -> StepGuard {
        StepGuard::for_run(move || drop(value))
    }

    /// A guard that runs `undo` only once the task is retired.
    pub fn until_retired(undo: impl FnOnce() + Send + 'static) -> StepGuard {
        StepGuard {
            lasts: Lasts::UntilRetired,
            undo: Some(Box::new(undo)),
            note: None,
        }
    }

    fn undo(self) {
        if let Some(undo) = self.undo {
            undo();
        }
    }
}

/// The guards of a task's steps, oldest first.
#[derive(Default)]
pub(crate) struct Guards(Vec<StepGuard>);

impl Guards {
    pub fn push(&mut self, guard: StepGuard) {
        self.0.push(guard);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Puts `newer` on top of these.
    pub fn append(&mut self, mut newer: Guards) {
        self.0.append(&mut newer.0);
    }

    /// At the end of the task's run: undoes, newest first, every guard down to the
    /// newest one that must last until the task is retired, and hands back the rest
    /// (that one and all older ones), which the caller keeps until then. Stopping
    /// there keeps the order: nothing is undone before a step newer than it.
    #[must_use = "the guards handed back must be kept until the task is retired, then undone"]
    pub fn end_run(&mut self) -> Guards {
        while self.0.last().is_some_and(|g| g.lasts == Lasts::Run) {
            if let Some(guard) = self.0.pop() {
                guard.undo();
            }
        }
        Guards(std::mem::take(&mut self.0))
    }

    /// Undoes every guard, newest first.
    pub fn undo_all(mut self) {
        while let Some(guard) = self.0.pop() {
            guard.undo();
        }
    }
}

impl Drop for Guards {
    /// Guards dropped without being undone (a panicking task) are dropped newest first
    /// all the same, so what they hold is released in the same order.
    fn drop(&mut self) {
        while let Some(guard) = self.0.pop() {
            drop(guard);
        }
    }
}

/// Runs `steps` in order, pushing each one's guard onto `guards`, until one fails, and
/// hands each step's note (what it did, for the task's timeline) to `done` as it ends.
/// The guards are the caller's, outside this future, so that what was done before a
/// deadline cut the preparation short is still undone; the caller undoes them with
/// [`Guards::end_run`] whenever the task ends, failed here or not.
pub(crate) async fn prepare_all<Cx: Send>(
    steps: &[&dyn PrepareStep<Cx>],
    cx: &mut Cx,
    guards: &mut Guards,
    done: &mut (dyn FnMut(&str) + Send),
) -> Result<(), PrepareError> {
    for step in steps {
        match step.prepare(cx).await {
            Ok(mut guard) => {
                if let Some(note) = guard.note.take() {
                    done(&note);
                }
                guards.push(guard);
            }
            Err(mut e) => {
                e.step = step.name();
                return Err(e);
            }
        }
    }
    Ok(())
}

/// Runs every step's [`PrepareStep::readopt`], pushing each one's guard onto `guards`.
/// A failure does not stop the others: the task is already running, and losing what
/// one step offers it is better than abandoning it. The failures are returned for the
/// caller to log.
pub(crate) async fn readopt_all<Cx: Send>(
    steps: &[&dyn PrepareStep<Cx>],
    cx: &mut Cx,
    guards: &mut Guards,
) -> Vec<PrepareError> {
    let mut failed = Vec::new();
    for step in steps {
        match step.readopt(cx).await {
            Ok(guard) => guards.push(guard),
            Err(mut e) => {
                e.step = step.name();
                failed.push(e);
            }
        }
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// What the test steps did, in order; shared with their guards' undo closures.
    type Journal = Arc<Mutex<Vec<String>>>;

    /// A step that records its preparation and its undoing in the journal, and fails
    /// (or never finishes) when told to.
    struct Step {
        name: &'static str,
        lasts: Lasts,
        outcome: Outcome,
    }

    #[derive(PartialEq)]
    enum Outcome {
        Succeeds,
        Fails,
        Hangs,
        FailsToReadopt,
    }

    fn step(name: &'static str, lasts: Lasts, outcome: Outcome) -> Step {
        Step {
            name,
            lasts,
            outcome,
        }
    }

    fn record(journal: &Journal, line: String) {
        journal.lock().unwrap().push(line);
    }

    impl Step {
        fn guard(&self, journal: &Journal) -> StepGuard {
            let (journal, name) = (journal.clone(), self.name);
            let undo = move || record(&journal, format!("undo {name}"));
            let guard = match self.lasts {
                Lasts::Run => StepGuard::for_run(undo),
                Lasts::UntilRetired => StepGuard::until_retired(undo),
            };
            guard.noting(format!("{name} done"))
        }
    }

    #[async_trait]
    impl PrepareStep<Journal> for Step {
        fn name(&self) -> &'static str {
            self.name
        }

        async fn prepare(&self, journal: &mut Journal) -> Result<StepGuard, PrepareError> {
            record(journal, format!("prepare {}", self.name));
            match self.outcome {
                Outcome::Fails => Err(format!("{} failed", self.name).into()),
                Outcome::Hangs => std::future::pending().await,
                Outcome::Succeeds | Outcome::FailsToReadopt => Ok(self.guard(journal)),
            }
        }

        async fn readopt(&self, journal: &mut Journal) -> Result<StepGuard, PrepareError> {
            record(journal, format!("readopt {}", self.name));
            if self.outcome == Outcome::FailsToReadopt {
                return Err(format!("{} could not be readopted", self.name).into());
            }
            Ok(self.guard(journal))
        }
    }

    fn lines(journal: &Journal) -> Vec<String> {
        journal.lock().unwrap().clone()
    }

    #[tokio::test]
    async fn a_failed_step_undoes_the_earlier_steps_newest_first() {
        let (a, b, c, d) = (
            step("a", Lasts::Run, Outcome::Succeeds),
            step("b", Lasts::Run, Outcome::Succeeds),
            step("c", Lasts::Run, Outcome::Fails),
            step("d", Lasts::Run, Outcome::Succeeds),
        );
        let steps: [&dyn PrepareStep<Journal>; 4] = [&a, &b, &c, &d];
        let mut journal = Journal::default();
        let mut guards = Guards::default();
        let mut notes = Vec::new();
        let err = prepare_all(&steps, &mut journal, &mut guards, &mut |n| {
            notes.push(n.to_string())
        })
        .await
        .unwrap_err();
        assert_eq!((err.step, err.reason.as_str()), ("c", "c failed"));
        // Each step that finished said what it did, in order; the failed one did not.
        assert_eq!(notes, ["a done", "b done"]);
        let kept = guards.end_run();
        assert!(kept.is_empty());
        assert_eq!(
            lines(&journal),
            ["prepare a", "prepare b", "prepare c", "undo b", "undo a"]
        );
    }

    #[tokio::test]
    async fn a_finished_task_undoes_every_step_and_its_directory_last() {
        let (home, a, b) = (
            step("home", Lasts::UntilRetired, Outcome::Succeeds),
            step("a", Lasts::Run, Outcome::Succeeds),
            step("b", Lasts::Run, Outcome::Succeeds),
        );
        let steps: [&dyn PrepareStep<Journal>; 3] = [&home, &a, &b];
        let mut journal = Journal::default();
        let mut guards = Guards::default();
        prepare_all(&steps, &mut journal, &mut guards, &mut |_| {})
            .await
            .unwrap();
        // The run is over: what lasts only as long as the run goes at once.
        let kept = guards.end_run();
        assert_eq!(
            lines(&journal),
            ["prepare home", "prepare a", "prepare b", "undo b", "undo a"]
        );
        assert!(!kept.is_empty());
        // The task is retired: the directory goes too.
        kept.undo_all();
        assert_eq!(
            lines(&journal).last().map(String::as_str),
            Some("undo home")
        );
        assert_eq!(lines(&journal).len(), 6);
    }

    #[tokio::test]
    async fn a_guard_that_lasts_until_retired_holds_back_the_older_ones() {
        // Nothing older is undone before something newer, even when the newer one
        // must wait for the task's retirement.
        let (a, home, b) = (
            step("a", Lasts::Run, Outcome::Succeeds),
            step("home", Lasts::UntilRetired, Outcome::Succeeds),
            step("b", Lasts::Run, Outcome::Succeeds),
        );
        let steps: [&dyn PrepareStep<Journal>; 3] = [&a, &home, &b];
        let mut journal = Journal::default();
        let mut guards = Guards::default();
        prepare_all(&steps, &mut journal, &mut guards, &mut |_| {})
            .await
            .unwrap();
        let kept = guards.end_run();
        assert_eq!(
            lines(&journal),
            ["prepare a", "prepare home", "prepare b", "undo b"]
        );
        kept.undo_all();
        assert_eq!(lines(&journal)[4..], ["undo home", "undo a"]);
    }

    #[tokio::test]
    async fn a_deadline_that_cuts_a_step_short_still_undoes_the_earlier_ones() {
        let (a, b, c) = (
            step("a", Lasts::UntilRetired, Outcome::Succeeds),
            step("b", Lasts::Run, Outcome::Succeeds),
            step("c", Lasts::Run, Outcome::Hangs),
        );
        let steps: [&dyn PrepareStep<Journal>; 3] = [&a, &b, &c];
        let mut journal = Journal::default();
        let mut guards = Guards::default();
        let timed = tokio::time::timeout(
            Duration::from_millis(20),
            prepare_all(&steps, &mut journal, &mut guards, &mut |_| {}),
        )
        .await;
        assert!(timed.is_err(), "the hanging step cannot have finished");
        let kept = guards.end_run();
        kept.undo_all();
        assert_eq!(
            lines(&journal),
            ["prepare a", "prepare b", "prepare c", "undo b", "undo a"]
        );
    }

    #[tokio::test]
    async fn readopting_goes_on_past_a_step_that_fails() {
        let (a, b, c) = (
            step("a", Lasts::UntilRetired, Outcome::Succeeds),
            step("b", Lasts::Run, Outcome::FailsToReadopt),
            step("c", Lasts::Run, Outcome::Succeeds),
        );
        let steps: [&dyn PrepareStep<Journal>; 3] = [&a, &b, &c];
        let mut journal = Journal::default();
        let mut guards = Guards::default();
        let failed = readopt_all(&steps, &mut journal, &mut guards).await;
        assert_eq!(failed.len(), 1);
        assert_eq!(
            (failed[0].step, failed[0].reason.as_str()),
            ("b", "b could not be readopted")
        );
        guards.end_run().undo_all();
        assert_eq!(
            lines(&journal),
            ["readopt a", "readopt b", "readopt c", "undo c", "undo a"]
        );
    }

    #[test]
    fn a_guard_dropped_without_undoing_never_runs_a_retirement() {
        let journal = Journal::default();
        let mut guards = Guards::default();
        let j = journal.clone();
        guards.push(StepGuard::until_retired(move || {
            record(&j, "undo home".into())
        }));
        drop(guards);
        assert!(lines(&journal).is_empty());
    }
}
