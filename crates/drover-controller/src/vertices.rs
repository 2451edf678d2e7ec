//! The vertex controller's decision, as a pure function of one vertex and what was
//! observed of it, and the message rates it keeps per vertex.
//!
//! [`reconcile`] takes the vertex object and an observation of the vertex's own job,
//! replicas and buffers: nothing in either can reach the pipeline. Whether a vertex
//! runs is decided from what the pipeline controller wrote into the vertex alone, so a
//! pipeline half-way through a change never leaves its vertices acting on a state that
//! is not yet theirs (see `drover_core::pipeline::vertex`).

use drover_core::pipeline::autoscale::Observation;
use drover_core::pipeline::vertex::{Vertex, VertexStatus, autoscale, desired_replicas};
use drover_core::pipeline::{DesiredPhase, Rates};
use drover_core::{JobSpec, Millis};
use std::collections::VecDeque;

/// The vertex's job as observed: its current version's spec and whether it has
/// finished (stopped).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct JobObs {
    pub spec: JobSpec,
    pub finished: bool,
}

/// What the vertex controller observed of one vertex.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct VertexObs {
    /// The vertex's job, if it has one.
    pub job: Option<JobObs>,
    /// Its replicas running now.
    pub running: u32,
    /// Its input backlog, processing rate and back-pressure, for the autoscaler.
    pub scale: Observation,
    pub now: Millis,
}

/// What to do with the vertex's job.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum JobAction {
    Nothing,
    /// Apply this spec; `rerun` runs an unchanged spec of a stopped job again.
    Apply {
        spec: Box<JobSpec>,
        rerun: bool,
    },
    /// Stop the job: the vertex should have no replicas.
    Stop,
}

/// The vertex controller's answer for one vertex.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Plan {
    /// The replicas to keep in the vertex's spec (the autoscaler's choice).
    pub replicas: u32,
    pub status: VertexStatus,
    pub job: JobAction,
    /// The autoscaler's reason this round, a hold included; `None` when it did not run.
    pub decision: Option<String>,
}

/// Decides one vertex from the vertex alone: paused means no replicas, running means
/// its replicas (moved by the autoscaler) within `min..=max`; the job is applied with
/// that count, or stopped at zero. An `http` source has no job.
pub(crate) fn reconcile(vertex: &Vertex, obs: &VertexObs) -> Plan {
    let mut spec = vertex.spec.clone();
    let mut status = vertex.status.clone();
    let has_job = spec.job_spec().is_some();
    // The autoscaler moves only a running vertex that has replicas to move.
    let mut decision = None;
    if has_job && spec.lifecycle.desired_phase == DesiredPhase::Running {
        let (replicas, next, why) = autoscale(&spec, &status, &obs.scale, obs.now);
        spec.replicas = replicas;
        status = next;
        decision = Some(why);
    }
    let desired = desired_replicas(&spec);
    let job = match (spec.job_spec(), &obs.job) {
        (None, _) => JobAction::Nothing,
        (Some(_), Some(j)) if desired == 0 && !j.finished => JobAction::Stop,
        (Some(_), _) if desired == 0 => JobAction::Nothing,
        (Some(want), None) => JobAction::Apply {
            spec: Box::new(want),
            rerun: false,
        },
        (Some(want), Some(j)) if j.finished => JobAction::Apply {
            spec: Box::new(want),
            rerun: true,
        },
        (Some(want), Some(j)) if j.spec != want => JobAction::Apply {
            spec: Box::new(want),
            rerun: false,
        },
        (Some(_), Some(_)) => JobAction::Nothing,
    };
    status.observed_replicas = obs.running;
    status.observed_generation = spec.generation;
    Plan {
        replicas: spec.replicas,
        status,
        job,
        decision,
    }
}

/// How often a vertex's counts are sampled for its rates.
pub(crate) const SAMPLE_EVERY_MS: Millis = 5_000;
/// The longest window a rate is given over.
const LONGEST_WINDOW_MS: Millis = 15 * 60_000;

/// One sample of a vertex's cumulative counts, summed over its replicas.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Sample {
    pub at: Millis,
    pub read: u64,
    pub written: u64,
    /// Writes downstream refused because the buffer was full.
    pub backpressured: u64,
}

/// A vertex's recent samples, oldest first: at most one per [`SAMPLE_EVERY_MS`] and
/// none older than the longest window (plus one sample to measure it from), so the
/// ring is bounded. Observations only; a restarted controller starts afresh.
#[derive(Clone, Debug, Default)]
pub(crate) struct Ring {
    samples: VecDeque<Sample>,
}

impl Ring {
    pub(crate) fn push(&mut self, s: Sample) {
        // Between samples the newest counts replace the newest sample, so a rate is
        // always measured up to the latest counts while the samples before it stay at
        // least a sampling interval apart (two per interval at most).
        let n = self.samples.len();
        if n >= 2
            && let Some(before) = self.samples.get(n - 2)
            && s.at - before.at < SAMPLE_EVERY_MS
        {
            self.samples.pop_back();
        }
        self.samples.push_back(s);
        while self
            .samples
            .get(1)
            .is_some_and(|second| s.at - second.at >= LONGEST_WINDOW_MS)
        {
            self.samples.pop_front();
        }
    }

    /// Whether the vertex's writes were pushed back (refused by a full buffer) between
    /// the newest sample and the one before it, a sampling interval or so ago. A
    /// buffer's fill level swings as its reader takes and acknowledges batches, so
    /// what the writers met says more than one reading of the level.
    pub(crate) fn pushed_back_lately(&self) -> bool {
        let n = self.samples.len();
        match (self.samples.get(n.wrapping_sub(2)), self.samples.back()) {
            (Some(before), Some(last)) if n >= 2 => last.backpressured > before.backpressured,
            _ => false,
        }
    }

    /// Messages per second read and written over the last 1, 5 and 15 minutes, each
    /// over as much of its window as has been observed; `None` before two samples at
    /// least a second apart. Counts that fell (a replica restarted and counts anew)
    /// give 0 rather than a negative rate.
    pub(crate) fn rates(&self) -> (Rates, Rates) {
        let mut read = Rates::default();
        let mut written = Rates::default();
        let Some(last) = self.samples.back() else {
            return (read, written);
        };
        for (window, r, w) in [
            (60_000, &mut read.m1, &mut written.m1),
            (5 * 60_000, &mut read.m5, &mut written.m5),
            (15 * 60_000, &mut read.m15, &mut written.m15),
        ] {
            let Some(first) = self.samples.iter().find(|s| last.at - s.at <= window) else {
                continue;
            };
            let secs = (last.at - first.at) as f64 / 1000.0;
            if secs < 1.0 {
                continue;
            }
            *r = Some(last.read.saturating_sub(first.read) as f64 / secs);
            *w = Some(last.written.saturating_sub(first.written) as f64 / secs);
        }
        (read, written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_core::ProjectId;
    use drover_core::pipeline::PipelineSpec;

    /// A vertex built from a spec text alone, with no pipeline object anywhere: the
    /// vertex controller's decision is made from this and the observation, and the
    /// types of both give it no way to reach a pipeline.
    fn vertex(scale: &str, phase: DesiredPhase, replicas: u32) -> Vertex {
        let yaml = format!(
            "name: etl\nvertices:\n  - {{ name: src, source: {{ run: {{ command: [sleep, '600'] }} }} }}\n  - {{ name: work, map: {{ run: {{ command: [sleep, '600'] }} }}, scale: {scale} }}\n  - {{ name: out, sink: {{ log: {{}} }} }}\nedges: [{{ from: src, to: work }}, {{ from: work, to: out }}]\n"
        );
        let p = PipelineSpec::from_yaml(&yaml, "etl.yaml").unwrap();
        let project = ProjectId::default();
        Vertex {
            project: project.clone(),
            spec: p.vertex_spec(&project, "work", replicas, phase, 7).unwrap(),
            status: VertexStatus::default(),
        }
    }

    fn job(v: &Vertex, count: u32, finished: bool) -> Option<JobObs> {
        let mut spec = v.spec.job_spec().unwrap();
        spec.count = count;
        Some(JobObs { spec, finished })
    }

    fn said(p: &Plan) -> String {
        match &p.job {
            JobAction::Nothing => format!("{} nothing", p.replicas),
            JobAction::Stop => format!("{} stop", p.replicas),
            JobAction::Apply { spec, rerun } => {
                format!(
                    "{} apply {}{}",
                    p.replicas,
                    spec.count,
                    if *rerun { " rerun" } else { "" }
                )
            }
        }
    }

    /// (scale, phase, spec replicas, the job's count and whether it finished, what the
    /// plan says).
    type Case = (
        &'static str,
        DesiredPhase,
        u32,
        Option<(u32, bool)>,
        &'static str,
    );

    #[test]
    fn a_vertex_is_reconciled_from_itself_alone() {
        use DesiredPhase::{Paused, Running};
        let idle = Observation {
            pending: Some(0),
            unacked: 0,
            rate_per_replica: None,
            backpressure: None,
        };
        // (scale, phase, spec replicas, job count and finished, expected)
        let cases: &[Case] = &[
            // Running, no job yet: created with the replicas.
            ("{ min: 1, max: 5 }", Running, 3, None, "3 apply 3"),
            // Running at the count already: nothing to do.
            (
                "{ min: 1, max: 5 }",
                Running,
                3,
                Some((3, false)),
                "3 nothing",
            ),
            // Replicas outside min..max are held within them.
            (
                "{ min: 2, max: 5 }",
                Running,
                9,
                Some((9, false)),
                "5 apply 5",
            ),
            // Paused: the running job is stopped, the replicas kept for the resume.
            ("{ min: 1, max: 5 }", Paused, 3, Some((3, false)), "3 stop"),
            // Paused and already stopped: nothing.
            (
                "{ min: 1, max: 5 }",
                Paused,
                3,
                Some((3, true)),
                "3 nothing",
            ),
            // Paused with no job ever made: nothing is made.
            ("{ min: 1, max: 5 }", Paused, 3, None, "3 nothing"),
            // Resumed: the stopped job is run again.
            (
                "{ min: 1, max: 5 }",
                Running,
                3,
                Some((3, true)),
                "3 apply 3 rerun",
            ),
            // max 0: never a replica, never a job.
            ("{ min: 0, max: 0 }", Running, 0, None, "0 nothing"),
        ];
        for (scale, phase, replicas, j, want) in cases {
            let v = vertex(scale, *phase, *replicas);
            let obs = VertexObs {
                job: j.and_then(|(n, f)| job(&v, n, f)),
                running: 0,
                scale: idle.clone(),
                now: 1_000_000,
            };
            let plan = reconcile(&v, &obs);
            assert_eq!(said(&plan), *want, "{scale} {phase} {replicas} {j:?}");
            assert_eq!(plan.status.observed_generation, 7);
        }
    }

    #[test]
    fn an_http_source_has_no_job_and_the_autoscaler_leaves_it() {
        let yaml = "name: web\nvertices:\n  - { name: in, source: { http: {} } }\n  - { name: out, sink: { log: {} } }\nedges: [{ from: in, to: out }]\n";
        let p = PipelineSpec::from_yaml(yaml, "web.yaml").unwrap();
        let project = ProjectId::default();
        let v = Vertex {
            project: project.clone(),
            spec: p
                .vertex_spec(&project, "in", 1, DesiredPhase::Running, 1)
                .unwrap(),
            status: VertexStatus::default(),
        };
        let plan = reconcile(&v, &VertexObs::default());
        assert_eq!(plan.job, JobAction::Nothing);
        assert_eq!(plan.replicas, 1);
        assert!(plan.status.last_scale.is_none());
    }

    #[test]
    fn the_autoscaler_moves_a_running_vertex_and_records_why() {
        let v = vertex(
            "{ min: 1, max: 10, scale_up_cooldown: 0s, replicas_per_step: 10 }",
            DesiredPhase::Running,
            1,
        );
        let busy = Observation {
            pending: Some(10_000),
            unacked: 0,
            rate_per_replica: Some(100.0),
            backpressure: None,
        };
        let obs = VertexObs {
            job: job(&v, 1, false),
            running: 1,
            scale: busy.clone(),
            now: 1_000_000,
        };
        let plan = reconcile(&v, &obs);
        assert!(plan.replicas > 1, "{plan:?}");
        assert!(plan.status.last_scale.is_some(), "{plan:?}");
        assert_eq!(plan.job, {
            let mut s = v.spec.job_spec().unwrap();
            s.count = plan.replicas;
            JobAction::Apply {
                spec: Box::new(s),
                rerun: false,
            }
        });
        // Never while paused, however busy.
        let paused = vertex("{ min: 1, max: 10 }", DesiredPhase::Paused, 1);
        let plan = reconcile(
            &paused,
            &VertexObs {
                job: job(&paused, 1, true),
                ..obs
            },
        );
        assert_eq!((plan.replicas, &plan.job), (1, &JobAction::Nothing));
        assert!(plan.status.last_scale.is_none());
    }

    #[test]
    fn pushed_back_lately_compares_the_newest_two_samples() {
        let mut ring = Ring::default();
        let sample = |at: Millis, backpressured: u64| Sample {
            at,
            read: 0,
            written: 0,
            backpressured,
        };
        assert!(!ring.pushed_back_lately(), "no samples");
        ring.push(sample(0, 3));
        assert!(!ring.pushed_back_lately(), "one sample");
        ring.push(sample(5_000, 7));
        assert!(
            ring.pushed_back_lately(),
            "refused writes since the last sample"
        );
        ring.push(sample(10_000, 7));
        assert!(!ring.pushed_back_lately(), "none since");
    }

    #[test]
    fn rates_come_from_the_counts_over_each_window() {
        let mut ring = Ring::default();
        assert_eq!(ring.rates().0, Rates::default());
        for i in 0..=120 {
            // 10 read and 5 written per second, sampled every 5 s for 10 minutes.
            let at = i * 5_000;
            ring.push(Sample {
                at,
                read: (at / 100) as u64,
                written: (at / 200) as u64,
                backpressured: 0,
            });
        }
        let (r, w) = ring.rates();
        assert_eq!(r.m1, Some(10.0));
        assert_eq!(r.m5, Some(10.0));
        assert_eq!(r.m15, Some(10.0));
        assert_eq!(w.m1, Some(5.0));
        // A restarted replica's counts start again: no negative rate.
        ring.push(Sample {
            at: 605_000,
            read: 0,
            written: 0,
            backpressured: 0,
        });
        assert_eq!(ring.rates().0.m1, Some(0.0));
        // Bounded: never much more than the longest window of samples.
        for i in 0..10_000 {
            ring.push(Sample {
                at: 800_000 + i * 5_000,
                read: 0,
                written: 0,
                backpressured: 0,
            });
        }
        assert!(ring.samples.len() <= 182, "{}", ring.samples.len());
    }
}
