//! Prometheus metrics, served at `/metrics` in the text exposition format.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

pub struct Metrics {
    registry: Registry,
    pub tasks: Family<StateLabel, Gauge>,
    pub connected_agents: Gauge,
    pub nodes_ready: Gauge,
    /// Seconds from a task becoming placeable to its placement.
    pub scheduling_latency: Histogram,
    /// Seconds one scheduling pass takes.
    pub scheduling_pass: Histogram,
    /// Seconds spent choosing nodes for a batch of tasks (without the commit).
    pub placement: Histogram,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("drover");
        let tasks = Family::<StateLabel, Gauge>::default();
        let connected_agents = Gauge::default();
        let nodes_ready = Gauge::default();
        let buckets = [
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
        ];
        let scheduling_latency = Histogram::new(buckets);
        let scheduling_pass = Histogram::new(buckets);
        let placement = Histogram::new(buckets);
        registry.register("tasks", "Tasks by state", tasks.clone());
        registry.register(
            "connected_agents",
            "Agents with an open connection",
            connected_agents.clone(),
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
        Metrics {
            registry,
            tasks,
            connected_agents,
            nodes_ready,
            scheduling_latency,
            scheduling_pass,
            placement,
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
