//! The `mock` runtime: tasks that exist only in memory and behave as their job's
//! [`MockScript`] says. Used by tests and by the scheduler benchmark, which simulates
//! thousands of nodes and 100k tasks in one process, so a task costs one small map entry
//! and no task or thread of its own: its scripted exit is computed lazily from a
//! deadline by whoever looks at it, with tokio timers for those who wait.

use crate::{
    ExitStatus, Fingerprint, Recovered, Runtime, RuntimeError, Started, StopOutcome, TaskContext,
};
use async_trait::async_trait;
use drover_core::TaskId;
use drover_core::spec::{MockScript, RuntimeKind};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// Runs scripted, in-memory tasks.
#[derive(Default)]
pub struct MockRuntime {
    tasks: Mutex<HashMap<TaskId, Arc<MockTask>>>,
}

/// One running (or ended) mock task.
struct MockTask {
    status: watch::Sender<Option<ExitStatus>>,
    /// When the task ends on its own; `None` runs until stopped.
    exit_at: Option<Instant>,
    exit_code: i32,
    ignore_stop: bool,
}

impl MockTask {
    /// Records how the task ended unless it already has; returns whether this call did.
    fn finish(&self, status: ExitStatus) -> bool {
        self.status.send_if_modified(|current| {
            if current.is_some() {
                return false;
            }
            *current = Some(status);
            true
        })
    }

    /// Applies the scripted exit if its time has come; returns whether the task has ended.
    fn settle(&self) -> bool {
        if let Some(at) = self.exit_at
            && Instant::now() >= at
        {
            self.finish(ExitStatus::Exited(self.exit_code));
        }
        self.status.borrow().is_some()
    }

    /// Resolves at the scripted exit, or never.
    async fn scripted_exit(&self) {
        match self.exit_at {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    }

    fn current(&self) -> Option<ExitStatus> {
        self.status.borrow().clone()
    }
}

impl MockRuntime {
    pub fn new() -> Self {
        Self::default()
    }

    fn tasks(&self) -> std::sync::MutexGuard<'_, HashMap<TaskId, Arc<MockTask>>> {
        // The map is only touched by short, non-panicking sections, so a poisoned lock
        // still holds consistent data and is safe to keep using.
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn task(&self, id: &TaskId) -> Result<Arc<MockTask>, RuntimeError> {
        self.tasks()
            .get(id)
            .cloned()
            .ok_or_else(|| RuntimeError::UnknownTask(id.clone()))
    }

    /// How many tasks the runtime currently holds (started and not destroyed).
    pub fn len(&self) -> usize {
        self.tasks().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait]
impl Runtime for MockRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Mock
    }

    async fn fingerprint(&self) -> Result<Fingerprint, RuntimeError> {
        Ok(Fingerprint {
            kind: RuntimeKind::Mock,
            attributes: BTreeMap::new(),
        })
    }

    async fn prepare(&self, ctx: &TaskContext) -> Result<(), RuntimeError> {
        if let Some(script) = &ctx.spec.mock
            && !script.prepare_latency.0.is_zero()
        {
            tokio::time::sleep(script.prepare_latency.0).await;
        }
        Ok(())
    }

    async fn start(&self, ctx: &TaskContext) -> Result<Started, RuntimeError> {
        let script = ctx.spec.mock.clone().unwrap_or_default();
        let MockScript {
            prepare_latency: _,
            start_latency,
            exit_after,
            exit_code,
            fail_start,
            ignore_stop,
        } = script;
        if !start_latency.0.is_zero() {
            tokio::time::sleep(start_latency.0).await;
        }
        if let Some(message) = fail_start {
            return Err(RuntimeError::Start(message));
        }
        let task = MockTask {
            status: watch::Sender::new(None),
            exit_at: exit_after.map(|d| Instant::now() + d.0),
            exit_code,
            ignore_stop,
        };
        self.tasks().insert(ctx.task_id.clone(), Arc::new(task));
        Ok(Started::default())
    }

    async fn wait(&self, id: &TaskId) -> Result<ExitStatus, RuntimeError> {
        let task = self.task(id)?;
        let mut status = task.status.subscribe();
        tokio::select! {
            // The sender lives in `task`, which this future holds, so the channel cannot
            // close while waiting.
            _ = status.wait_for(Option::is_some) => {}
            _ = task.scripted_exit() => {
                task.finish(ExitStatus::Exited(task.exit_code));
            }
        }
        task.current()
            .ok_or_else(|| RuntimeError::Other("the mock task ended without a status".into()))
    }

    async fn stop(&self, id: &TaskId, grace: Duration) -> Result<StopOutcome, RuntimeError> {
        let task = self.task(id)?;
        if task.settle() {
            return Ok(StopOutcome::AlreadyExited);
        }
        if !task.ignore_stop {
            return Ok(if task.finish(ExitStatus::Signaled("SIGTERM".into())) {
                StopOutcome::Graceful
            } else {
                // A concurrent stop got there first.
                outcome_of(task.current())
            });
        }
        // It ignores SIGTERM: it ends on its own within the grace period, or is killed
        // when the grace runs out (unless a concurrent stop ends it first).
        let kill_at = Instant::now() + grace;
        let mut status = task.status.subscribe();
        tokio::select! {
            _ = status.wait_for(Option::is_some) => return Ok(outcome_of(task.current())),
            _ = tokio::time::sleep_until(kill_at) => {}
            _ = task.scripted_exit() => {}
        }
        if task.settle() {
            return Ok(
                if task.current() == Some(ExitStatus::Exited(task.exit_code)) {
                    StopOutcome::Graceful
                } else {
                    outcome_of(task.current())
                },
            );
        }
        task.finish(ExitStatus::Signaled("SIGKILL".into()));
        Ok(outcome_of(task.current()))
    }

    async fn destroy(&self, id: &TaskId) -> Result<(), RuntimeError> {
        self.tasks().remove(id);
        Ok(())
    }

    async fn recover(&self, _ctx: &TaskContext) -> Result<Recovered, RuntimeError> {
        // Nothing in memory survives the agent, so there is never anything to re-attach.
        Ok(Recovered::Gone)
    }
}

/// The outcome to report for a task a stop found ended by some other caller.
fn outcome_of(status: Option<ExitStatus>) -> StopOutcome {
    match status {
        Some(ExitStatus::Signaled(s)) if s == "SIGKILL" => StopOutcome::Killed,
        _ => StopOutcome::Graceful,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_core::quantity::Dur;
    use drover_core::spec::JobSpec;

    fn context(script: Option<MockScript>) -> TaskContext {
        let json = serde_json::json!({ "name": "m", "runtime": "mock" });
        let mut spec = JobSpec::from_json(json.to_string().as_bytes()).unwrap();
        spec.mock = script;
        TaskContext {
            task_id: TaskId::generate(),
            job_name: "m".into(),
            job_id: drover_core::JobId::from("job-m"),
            index: 0,
            spec,
            dir: "/nonexistent".into(),
            env: BTreeMap::new(),
            stdout_path: "/nonexistent/out".into(),
            stderr_path: "/nonexistent/err".into(),
            user: None,
            stdin: None,
            mounts: Vec::new(),
            workdir: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_exits_as_scripted() {
        let rt = MockRuntime::new();
        let ctx = context(Some(MockScript {
            start_latency: Dur::from_millis(200),
            exit_after: Some(Dur::from_secs(5)),
            exit_code: 7,
            ..MockScript::default()
        }));
        let begun = Instant::now();
        rt.start(&ctx).await.unwrap();
        assert_eq!(begun.elapsed(), Duration::from_millis(200));
        let (a, b) = tokio::join!(rt.wait(&ctx.task_id), rt.wait(&ctx.task_id));
        assert_eq!(a.unwrap(), ExitStatus::Exited(7));
        assert_eq!(b.unwrap(), ExitStatus::Exited(7));
        assert_eq!(begun.elapsed(), Duration::from_millis(5200));
        let outcome = rt.stop(&ctx.task_id, Duration::from_secs(1)).await.unwrap();
        assert_eq!(outcome, StopOutcome::AlreadyExited);
        rt.destroy(&ctx.task_id).await.unwrap();
        assert!(rt.is_empty());
        assert_eq!(rt.recover(&ctx).await.unwrap(), Recovered::Gone);
    }

    #[tokio::test(start_paused = true)]
    async fn an_exit_that_nobody_waited_for_is_seen_by_stop() {
        let rt = MockRuntime::new();
        let ctx = context(Some(MockScript {
            exit_after: Some(Dur::from_secs(1)),
            exit_code: 2,
            ..MockScript::default()
        }));
        rt.start(&ctx).await.unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let outcome = rt.stop(&ctx.task_id, Duration::from_secs(1)).await.unwrap();
        assert_eq!(outcome, StopOutcome::AlreadyExited);
        assert_eq!(rt.wait(&ctx.task_id).await.unwrap(), ExitStatus::Exited(2));
    }

    #[tokio::test]
    async fn a_scripted_start_failure_is_a_start_error() {
        let rt = MockRuntime::new();
        let ctx = context(Some(MockScript {
            fail_start: Some("no luck".into()),
            ..MockScript::default()
        }));
        let err = rt.start(&ctx).await.unwrap_err();
        assert!(
            matches!(&err, RuntimeError::Start(m) if m == "no luck"),
            "{err}"
        );
        assert!(matches!(
            rt.wait(&ctx.task_id).await,
            Err(RuntimeError::UnknownTask(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_is_graceful_unless_the_task_ignores_it() {
        let rt = Arc::new(MockRuntime::new());
        let ctx = context(None);
        rt.start(&ctx).await.unwrap();
        let waiter = {
            let rt = rt.clone();
            let id = ctx.task_id.clone();
            tokio::spawn(async move { rt.wait(&id).await })
        };
        let begun = Instant::now();
        let outcome = rt
            .stop(&ctx.task_id, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(outcome, StopOutcome::Graceful);
        assert_eq!(begun.elapsed(), Duration::ZERO);
        assert_eq!(
            waiter.await.unwrap().unwrap(),
            ExitStatus::Signaled("SIGTERM".into())
        );

        let ctx = context(Some(MockScript {
            ignore_stop: true,
            ..MockScript::default()
        }));
        rt.start(&ctx).await.unwrap();
        let begun = Instant::now();
        let outcome = rt
            .stop(&ctx.task_id, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(outcome, StopOutcome::Killed);
        assert_eq!(begun.elapsed(), Duration::from_secs(10));
        assert_eq!(
            rt.wait(&ctx.task_id).await.unwrap(),
            ExitStatus::Signaled("SIGKILL".into())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_ignoring_stop_that_exits_within_the_grace_is_graceful() {
        let rt = MockRuntime::new();
        let ctx = context(Some(MockScript {
            ignore_stop: true,
            exit_after: Some(Dur::from_secs(3)),
            exit_code: 0,
            ..MockScript::default()
        }));
        rt.start(&ctx).await.unwrap();
        let outcome = rt
            .stop(&ctx.task_id, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(outcome, StopOutcome::Graceful);
        assert_eq!(rt.wait(&ctx.task_id).await.unwrap(), ExitStatus::Exited(0));
    }

    #[tokio::test]
    async fn many_tasks_are_cheap() {
        let rt = MockRuntime::new();
        let ctx = context(None);
        let started = std::time::Instant::now();
        for _ in 0..100_000 {
            let mut ctx = ctx.clone();
            ctx.task_id = TaskId::generate();
            rt.start(&ctx).await.unwrap();
        }
        assert_eq!(rt.len(), 100_000);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
    }
}
