//! Prometheus metrics, served at `/metrics` in the text exposition format.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabel {
    pub job: String,
}

pub struct Metrics {
    registry: Registry,
    /// CPU seconds used by each job's running tasks, summed, as last sampled.
    pub job_cpu_seconds: Family<JobLabel, Gauge<f64, AtomicU64>>,
    /// Resident memory of each job's running tasks, summed, as last sampled.
    pub job_memory_bytes: Family<JobLabel, Gauge>,
    pub tasks: Family<StateLabel, Gauge>,
    pub connected_agents: Gauge,
    /// Agent connections welcomed since start: on a healthy idle cluster it stays at the
    /// number of nodes, and a rising count means agents keep reconnecting.
    pub agent_sessions: Counter,
    pub nodes_ready: Gauge,
    /// Seconds from a task becoming placeable to its placement.
    pub scheduling_latency: Histogram,
    /// Seconds one scheduling pass takes.
    pub scheduling_pass: Histogram,
    /// Seconds spent choosing nodes for a batch of tasks (without the commit).
    pub placement: Histogram,
    /// HTTP connections open right now (API clients, log followers and agents).
    pub http_connections: Gauge,
    /// Connections closed as soon as they were accepted, by the limit they were over
    /// (`per_ip` or `total`); a rising count means a client opens more than it should.
    pub http_connections_refused: Family<ReasonLabel, Counter>,
    /// Bytes of task output the controller stores, all tasks together.
    pub log_bytes: Gauge,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("drover");
        let tasks = Family::<StateLabel, Gauge>::default();
        let connected_agents = Gauge::default();
        let nodes_ready = Gauge::default();
        let agent_sessions = Counter::default();
        let buckets = [
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
        ];
        let scheduling_latency = Histogram::new(buckets);
        let scheduling_pass = Histogram::new(buckets);
        let placement = Histogram::new(buckets);
        registry.register("tasks", "Tasks by state", tasks.clone());
        let log_bytes = Gauge::default();
        registry.register(
            "log_bytes",
            "Bytes of task output stored by the controller",
            log_bytes.clone(),
        );
        registry.register(
            "connected_agents",
            "Agents with an open connection",
            connected_agents.clone(),
        );
        registry.register(
            "agent_sessions",
            "Agent connections welcomed since the controller started",
            agent_sessions.clone(),
        );
        registry.register(
            "nodes_ready",
            "Nodes in the ready state",
            nodes_ready.clone(),
        );
        registry.register(
            "scheduling_latency_seconds",
            "Time from a task becoming placeable to its placement",
            scheduling_latency.clone(),
        );
        registry.register(
            "scheduling_pass_seconds",
            "Duration of one scheduling pass",
            scheduling_pass.clone(),
        );
        registry.register(
            "placement_seconds",
            "Time spent choosing nodes for a batch of tasks, without the commit",
            placement.clone(),
        );
        let job_cpu_seconds = Family::<JobLabel, Gauge<f64, AtomicU64>>::default();
        let job_memory_bytes = Family::<JobLabel, Gauge>::default();
        registry.register(
            "job_cpu_seconds",
            "CPU time used by a job's running tasks, summed over them, whatever their runtime",
            job_cpu_seconds.clone(),
        );
        registry.register(
            "job_memory_bytes",
            "Resident memory of a job's running tasks, summed over them, whatever their runtime",
            job_memory_bytes.clone(),
        );
        let http_connections = Gauge::default();
        let http_connections_refused = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "http_connections",
            "HTTP connections open, agents' included",
            http_connections.clone(),
        );
        registry.register(
            "http_connections_refused",
            "Connections closed on accept for being over a connection limit, by limit",
            http_connections_refused.clone(),
        );
        Metrics {
            registry,
            http_connections,
            http_connections_refused,
            log_bytes,
            job_cpu_seconds,
            job_memory_bytes,
            tasks,
            connected_agents,
            agent_sessions,
            nodes_ready,
            scheduling_latency,
            scheduling_pass,
            placement,
        }
    }

    /// Replaces the per-job usage gauges, so a job without running tasks drops out.
    pub fn publish_usage(&self, per_job: &std::collections::HashMap<&str, (f64, u64)>) {
        self.job_cpu_seconds.clear();
        self.job_memory_bytes.clear();
        for (job, (cpu, mem)) in per_job {
            let l = JobLabel {
                job: job.to_string(),
            };
            self.job_cpu_seconds.get_or_create(&l).set(*cpu);
            self.job_memory_bytes
                .get_or_create(&l)
                .set(i64::try_from(*mem).unwrap_or(i64::MAX));
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; an error here would be a bug in the encoder.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!("encoding metrics: {e}");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
