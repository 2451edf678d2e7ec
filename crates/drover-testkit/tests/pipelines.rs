//! Pipelines end to end: a real controller and agent, vertices that run plain programs
//! (`sleep`), so these tests exercise the pipeline and vertex controllers and not the
//! data plane.

use drover_core::TaskState;
use drover_core::pipeline::{
    PipelineApplied, PipelinePhase, PipelineSpec, PipelineSummary, PipelineView,
};
use drover_testkit::{AgentOptions, Api, ClusterOptions, TestCluster, wait_for};
use reqwest::Method;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

async fn call(api: &Api, method: Method, path: &str, body: Option<Vec<u8>>) -> (u16, String) {
    api.raw(method.clone(), path, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// POSTs a pipeline spec (any JSON, so a test can send a bad one) and returns the
/// status and body.
async fn post_pipeline(api: &Api, spec: &impl serde::Serialize) -> (u16, String) {
    let body = serde_json::to_vec(spec).unwrap();
    call(api, Method::POST, "/v1/pipelines", Some(body)).await
}

async fn apply(api: &Api, yaml: &str) -> PipelineApplied {
    let spec = PipelineSpec::from_yaml(yaml, "p.yaml").unwrap();
    let (status, body) = post_pipeline(api, &spec).await;
    assert!(status == 200 || status == 201, "{status}: {body}");
    serde_json::from_str(&body).unwrap()
}

async fn view(api: &Api, name: &str) -> PipelineView {
    let (status, body) = call(api, Method::GET, &format!("/v1/pipelines/{name}"), None).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

async fn post(api: &Api, path: &str) -> PipelineSummary {
    let (status, body) = call(api, Method::POST, path, None).await;
    assert_eq!(status, 200, "POST {path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// Polls the pipeline's status until `f` holds, failing with the last one seen.
async fn wait_view(
    api: &Api,
    name: &str,
    what: &str,
    f: impl Fn(&PipelineView) -> bool,
) -> PipelineView {
    let start = Instant::now();
    loop {
        let v = view(api, name).await;
        if f(&v) {
            return v;
        }
        if start.elapsed() > T {
            panic!(
                "timed out waiting for {what}; last seen: {}",
                serde_json::to_string_pretty(&v).unwrap()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The tasks of a vertex's job that are running, and those not ended.
async fn replicas(api: &Api, job: &str) -> (usize, usize) {
    let (status, body) = call(api, Method::GET, &format!("/v1/tasks?job={job}"), None).await;
    if status == 404 {
        return (0, 0);
    }
    assert_eq!(status, 200, "{body}");
    let tasks: Vec<drover_core::api::TaskView> = serde_json::from_str(&body).unwrap();
    let running = tasks
        .iter()
        .filter(|t| t.task.state == TaskState::Running)
        .count();
    let live = tasks.iter().filter(|t| !t.task.state.is_terminal()).count();
    (running, live)
}

async fn wait_replicas(api: &Api, job: &str, running: usize, live: usize) {
    let mut last = (0, 0);
    let ok = wait_for(&format!("{job} at {running} running"), T, async || {
        last = replicas(api, job).await;
        last == (running, live)
    })
    .await;
    assert!(
        ok.is_ok(),
        "{job}: wanted ({running}, {live}), last {last:?}"
    );
}

fn etl(work_scale: &str) -> String {
    format!(
        "name: etl
vertices:
  - {{ name: src, source: {{ run: {{ runtime: process, command: [sleep, '600'] }} }} }}
  - {{ name: work, map: {{ run: {{ runtime: process, command: [sleep, '600'] }} }}, scale: {work_scale} }}
  - {{ name: idle, map: {{ run: {{ runtime: process, command: [sleep, '600'] }} }}, scale: {{ min: 0, max: 0 }} }}
  - {{ name: out, sink: {{ run: {{ runtime: process, command: [sleep, '600'] }} }} }}
edges:
  - {{ from: src, to: work }}
  - {{ from: src, to: idle }}
  - {{ from: work, to: out }}
  - {{ from: idle, to: out }}
lifecycle: {{ pause_grace: 20s }}
"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_runs_pauses_resumes_and_is_deleted() {
    let c = TestCluster::start().await.unwrap();
    let _agent = c.agent(AgentOptions::named("n1")).await.unwrap();
    let api = c.api();

    let applied = apply(&api, &etl("{ min: 2, max: 3 }")).await;
    assert_eq!(
        (applied.result.as_str(), applied.pipeline.version),
        ("created", 1)
    );
    wait_replicas(&api, "etl-src", 1, 1).await;
    wait_replicas(&api, "etl-work", 2, 2).await;
    wait_replicas(&api, "etl-out", 1, 1).await;
    let v = wait_view(&api, "etl", "running", |v| {
        v.pipeline.status.phase == PipelinePhase::Running
            && v.vertices
                .iter()
                .find(|x| x.name == "work")
                .unwrap()
                .running_replicas
                == 2
    })
    .await;
    let idle = v.vertices.iter().find(|x| x.name == "idle").unwrap();
    assert_eq!((idle.desired_replicas, idle.running_replicas), (0, 0));
    // A vertex with max 0 never gets a job.
    assert_eq!(
        call(&api, Method::GET, "/v1/jobs/etl-idle", None).await.0,
        404
    );

    // The same spec again changes nothing; a changed one is a new version, and the
    // running vertex keeps its replicas (2 is within the new 1..3).
    let again = apply(&api, &etl("{ min: 2, max: 3 }")).await;
    assert_eq!(
        (again.result.as_str(), again.pipeline.version),
        ("unchanged", 1)
    );
    let changed = apply(&api, &etl("{ min: 1, max: 3 }")).await;
    assert_eq!(
        (changed.result.as_str(), changed.pipeline.version),
        ("updated", 2)
    );

    // Pause: no buffer was ever created, so the pause drains at once and every replica
    // stops.
    post(&api, "/v1/pipelines/etl/pause").await;
    let v = wait_view(&api, "etl", "paused", |v| {
        v.pipeline.status.phase == PipelinePhase::Paused
    })
    .await;
    assert!(
        v.pipeline.status.drained_on_pause,
        "{:?}",
        v.pipeline.status
    );
    assert_eq!(
        v.pipeline.status.replicas_before_pause.get("work"),
        Some(&2)
    );
    for job in ["etl-src", "etl-work", "etl-out"] {
        wait_replicas(&api, job, 0, 0).await;
    }
    // Pausing a paused pipeline changes nothing.
    let again = post(&api, "/v1/pipelines/etl/pause").await;
    assert_eq!(again.phase, PipelinePhase::Paused);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(replicas(&api, "etl-work").await, (0, 0));

    // Resume: the replicas from before the pause.
    post(&api, "/v1/pipelines/etl/resume").await;
    wait_replicas(&api, "etl-work", 2, 2).await;
    wait_replicas(&api, "etl-src", 1, 1).await;
    wait_view(&api, "etl", "running again", |v| {
        v.pipeline.status.phase == PipelinePhase::Running && v.pipeline.request.is_none()
    })
    .await;

    // Pause and resume slowly: each vertex at its scale.min.
    post(&api, "/v1/pipelines/etl/pause").await;
    wait_view(&api, "etl", "paused", |v| {
        v.pipeline.status.phase == PipelinePhase::Paused
    })
    .await;
    wait_replicas(&api, "etl-work", 0, 0).await;
    post(&api, "/v1/pipelines/etl/resume?slow=true").await;
    wait_replicas(&api, "etl-work", 1, 1).await;
    let v = wait_view(&api, "etl", "running slowly", |v| {
        v.pipeline.status.phase == PipelinePhase::Running
    })
    .await;
    assert!(
        v.pipeline.status.reason.contains("slowly"),
        "{:?}",
        v.pipeline.status
    );
    let (status, body) = call(&api, Method::POST, "/v1/pipelines/etl/resume?fast=1", None).await;
    assert_eq!(status, 400, "{body}");

    // -o json of ls parses, and shows the pipeline.
    let (status, body) = call(&api, Method::GET, "/v1/pipelines", None).await;
    assert_eq!(status, 200);
    let ls: Vec<PipelineSummary> = serde_json::from_str(&body).unwrap();
    assert_eq!(ls.len(), 1);
    assert_eq!((ls[0].name.as_str(), ls[0].version), ("etl", 2));

    // Delete: the vertices' jobs, the vertices and the pipeline go.
    let (status, body) = call(&api, Method::DELETE, "/v1/pipelines/etl", None).await;
    assert_eq!(status, 200, "{body}");
    let gone = wait_for("the pipeline to be removed", T, async || {
        call(&api, Method::GET, "/v1/pipelines/etl", None).await.0 == 404
    })
    .await;
    assert!(gone.is_ok());
    for job in ["etl-src", "etl-work", "etl-out"] {
        assert_eq!(
            call(&api, Method::GET, &format!("/v1/jobs/{job}"), None)
                .await
                .0,
            404,
            "{job} removed"
        );
    }
    let (_, body) = call(&api, Method::GET, "/v1/pipelines", None).await;
    assert_eq!(body.trim(), "[]");
}

const WEB: &str = "name: web
vertices:
  - { name: in, source: { http: {} } }
  - { name: work, sink: { run: { runtime: process, command: [sleep, '600'] } }, partitions: 2 }
edges:
  - { from: in, to: work }
lifecycle: { pause_grace: 6s }
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_messages_wait_in_the_buffer_and_a_restart_mid_pause_keeps_its_grace() {
    let c = TestCluster::start().await.unwrap();
    let _agent = c.agent(AgentOptions::named("n1")).await.unwrap();
    let api = c.api();
    apply(&api, WEB).await;
    wait_replicas(&api, "web-work", 1, 1).await;
    // The http source has no replicas: no job at all.
    assert_eq!(
        call(&api, Method::GET, "/v1/jobs/web-in", None).await.0,
        404
    );

    let msgs = serde_json::json!({ "messages": [
        { "data": "a" }, { "data": "b" }, { "key": "k", "data": "c" },
        { "data": "d" }, { "data": "e" },
    ]});
    let path = "/v1/pipelines/web/vertices/in/messages";
    let (status, body) = call(
        &api,
        Method::POST,
        path,
        Some(serde_json::to_vec(&msgs).unwrap()),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let accepted: drover_core::pipeline::HttpAccepted = serde_json::from_str(&body).unwrap();
    assert_eq!((accepted.ids.len(), accepted.written), (5, 5));
    // Only an http source takes messages; a bad body is refused with why.
    let (status, body) = call(
        &api,
        Method::POST,
        "/v1/pipelines/web/vertices/work/messages",
        Some(serde_json::to_vec(&msgs).unwrap()),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("not an http source"), "{body}");
    let (status, body) = call(&api, Method::POST, path, Some(b"{\"msgs\":[]}".to_vec())).await;
    assert_eq!(status, 400, "{body}");

    // Status counts them, pending in the work vertex's two buffers.
    let v = view(&api, "web").await;
    let work = v.vertices.iter().find(|x| x.name == "work").unwrap();
    assert_eq!(work.buffers.len(), 2);
    let pending: u64 = work.buffers.iter().map(|b| b.pending.unwrap()).sum();
    assert_eq!(pending, 5, "{work:?}");
    let inv = v.vertices.iter().find(|x| x.name == "in").unwrap();
    assert_eq!(inv.kind, "source/http");

    // Pause: the map never reads (it is a plain sleep), so the pause waits out its
    // grace. The controller is restarted in the middle of it.
    post(&api, "/v1/pipelines/web/pause").await;
    let pausing = wait_view(&api, "web", "pausing", |v| {
        v.pipeline.status.phase == PipelinePhase::Pausing
    })
    .await;
    let started = pausing.pipeline.status.pause_started_at.unwrap();
    assert!(
        pausing.pipeline.status.reason.contains("to drain"),
        "{:?}",
        pausing.pipeline.status
    );
    // While pausing, the source takes nothing more.
    let (status, body) = call(
        &api,
        Method::POST,
        path,
        Some(serde_json::to_vec(&msgs).unwrap()),
    )
    .await;
    assert_eq!(status, 409, "{body}");

    let addr = c.url.trim_start_matches("http://").to_string();
    let dir = c.stop().await;
    wait_for("the old listener to close", T, async || {
        std::net::TcpListener::bind(&addr).is_ok()
    })
    .await
    .unwrap();
    let c = TestCluster::start_in(dir, ClusterOptions::default(), &addr)
        .await
        .unwrap();
    let api = c.api();
    let v = view(&api, "web").await;
    assert_eq!(
        v.pipeline.status.pause_started_at,
        Some(started),
        "{:?}",
        v.pipeline.status
    );
    let v = wait_view(&api, "web", "paused at the grace", |v| {
        v.pipeline.status.phase == PipelinePhase::Paused
    })
    .await;
    let now = drover_core::now_millis();
    assert!(
        now - started >= 6_000,
        "paused after its grace, counted from before the restart"
    );
    assert!(
        now - started < 20_000,
        "not a grace restarted from the restart: {}",
        now - started
    );
    assert!(
        !v.pipeline.status.drained_on_pause,
        "{:?}",
        v.pipeline.status
    );
    assert!(
        v.pipeline.status.reason.contains("grace"),
        "{:?}",
        v.pipeline.status
    );
    wait_replicas(&api, "web-work", 0, 0).await;

    // Delete removes the buffers too.
    let buffers = c.dir.path().join("controller").join("buffers");
    let holds = |needle: &str| {
        walk(&buffers)
            .iter()
            .any(|p| p.to_string_lossy().contains(needle))
    };
    assert!(holds("web.work"), "the buffers exist before the delete");
    call(&api, Method::DELETE, "/v1/pipelines/web", None).await;
    wait_for("the pipeline to be removed", T, async || {
        call(&api, Method::GET, "/v1/pipelines/web", None).await.0 == 404
    })
    .await
    .unwrap();
    assert!(!holds("web.work"), "the buffers are deleted");
    assert_eq!(
        call(&api, Method::GET, "/v1/jobs/web-work", None).await.0,
        404
    );
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_pipelines_and_vertex_jobs_are_refused_and_nothing_is_stored() {
    let c = TestCluster::start().await.unwrap();
    let api = c.api();
    let cases = [
        (
            serde_json::json!({ "name": "x", "vertices": [{ "name": "a", "source": { "http": {} } }], "edges": [{ "from": "a", "to": "b" }] }),
            "edges[0].to",
        ),
        (
            serde_json::json!({ "name": "Bad_Name", "vertices": [{ "name": "a", "source": { "http": {} } }] }),
            "name",
        ),
        (
            serde_json::json!({ "name": "x", "vertices": [{ "name": "a", "source": { "http": {} }, "scale": { "min": 3, "max": 1 } }] }),
            "vertices[0].scale.min",
        ),
        // No NATS server was given to this controller.
        (
            serde_json::json!({ "name": "x", "vertices": [
                { "name": "a", "source": { "http": {} } },
                { "name": "b", "sink": { "log": {} } }],
              "edges": [{ "from": "a", "to": "b" }],
              "buffer": { "backend": "nats" } }),
            "buffer.backend: nats needs the controller started with --nats URL",
        ),
    ];
    for (body, needle) in cases {
        let (status, text) = post_pipeline(&api, &body).await;
        assert_eq!(status, 400, "{text}");
        assert!(text.contains(needle), "{needle}: {text}");
        assert!(text.contains("invalid_spec"), "{text}");
    }
    let (_, body) = call(&api, Method::GET, "/v1/pipelines", None).await;
    assert_eq!(body.trim(), "[]");

    // A job spec carrying a vertex plane is the pipeline controller's alone.
    let spec = PipelineSpec::from_yaml(&etl("{ min: 1, max: 1 }"), "p.yaml").unwrap();
    let project = drover_core::ProjectId::default();
    let vertex = spec
        .vertex_spec(&project, "work", 1, Default::default(), 1)
        .unwrap();
    let job = vertex.job_spec().unwrap();
    for route in ["/v1/jobs", "/v1/plan"] {
        let (status, text) = call(
            &api,
            Method::POST,
            route,
            Some(serde_json::to_vec(&job).unwrap()),
        )
        .await;
        assert_eq!(status, 400, "{text}");
        assert!(
            text.contains("vertex: set by the pipeline controller; submit a pipeline instead"),
            "{text}"
        );
    }
    assert_eq!(
        call(&api, Method::GET, "/v1/jobs/etl-work", None).await.0,
        404
    );

    // A vertex's job may not take a user's job's name, nor another pipeline's vertex's.
    api.apply_yaml("name: clash-src\nruntime: process\ncommand: ['true']\n")
        .await
        .unwrap();
    let clash = |name: &str, vertex: &str| {
        serde_json::json!({ "name": name, "vertices": [
            { "name": vertex, "source": { "run": { "runtime": "process", "command": ["sleep", "600"] } } },
            { "name": "out", "sink": { "run": { "runtime": "process", "command": ["sleep", "600"] } }, "scale": { "min": 0, "max": 0 } }],
          "edges": [{ "from": vertex, "to": "out" }] })
    };
    let (status, text) = post_pipeline(&api, &clash("clash", "src")).await;
    assert_eq!(status, 409, "{text}");
    assert!(
        text.contains("vertices[0].name") && text.contains("clash-src"),
        "{text}"
    );
    // Pipeline p with vertex q-src and pipeline p-q with vertex src are both p-q-src.
    let (status, text) = post_pipeline(&api, &clash("p", "q-src")).await;
    assert_eq!(status, 201, "{text}");
    wait_for("p's vertex job", T, async || {
        call(&api, Method::GET, "/v1/jobs/p-q-src", None).await.0 == 200
    })
    .await
    .unwrap();
    let (status, text) = post_pipeline(&api, &clash("p-q", "src")).await;
    assert_eq!(status, 409, "{text}");
    assert!(
        text.contains("p-q-src") && text.contains("pipeline p;"),
        "{text}"
    );
    // And a user's job may not replace a vertex's.
    let (status, text) = call(
        &api,
        Method::POST,
        "/v1/jobs",
        Some(br#"{"name":"p-q-src","command":["true"],"runtime":"process"}"#.to_vec()),
    )
    .await;
    assert_eq!(status, 409, "{text}");
    assert!(text.contains("runs vertex q-src of pipeline p"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vertex_no_node_can_run_fails_the_pipeline_with_the_reason() {
    let c = TestCluster::start().await.unwrap();
    let _agent = c.agent(AgentOptions::named("n1")).await.unwrap();
    let api = c.api();
    apply(
        &api,
        "name: big
vertices:
  - { name: src, source: { run: { runtime: process, command: [sleep, '600'] } } }
  - { name: out, sink: { run: { runtime: process, command: [sleep, '600'], resources: { cpu: 64 } } } }
edges: [{ from: src, to: out }]
",
    )
    .await;
    let v = wait_view(&api, "big", "failed", |v| {
        v.pipeline.status.phase == PipelinePhase::Failed
    })
    .await;
    assert!(
        v.pipeline.status.reason.starts_with("vertex out: "),
        "{:?}",
        v.pipeline.status
    );
    // The pipeline still deletes, taking the vertex that never ran with it.
    call(&api, Method::DELETE, "/v1/pipelines/big", None).await;
    wait_for("the pipeline to be removed", T, async || {
        call(&api, Method::GET, "/v1/pipelines/big", None).await.0 == 404
    })
    .await
    .unwrap();
    assert_eq!(
        call(&api, Method::GET, "/v1/jobs/big-out", None).await.0,
        404
    );
}

#[path = "../../drover-buffer/tests/support/nats_server.rs"]
mod nats_server;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_backed_pipeline_keeps_its_messages_in_jetstream_and_deletes_them() {
    let nats = nats_server::NatsServer::start();
    let c = TestCluster::start_with(ClusterOptions {
        nats_url: Some(nats.url()),
        ..ClusterOptions::default()
    })
    .await
    .unwrap();
    let _agent = c.agent(AgentOptions::named("n1")).await.unwrap();
    let api = c.api();
    apply(&api, &format!("{WEB}buffer: {{ backend: nats }}\n")).await;
    wait_replicas(&api, "web-work", 1, 1).await;
    let msgs =
        serde_json::json!({ "messages": [{ "data": "a" }, { "data": "b" }, { "data": "c" }] });
    let path = "/v1/pipelines/web/vertices/in/messages";
    let (status, body) = call(
        &api,
        Method::POST,
        path,
        Some(serde_json::to_vec(&msgs).unwrap()),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v = view(&api, "web").await;
    let work = v.vertices.iter().find(|x| x.name == "work").unwrap();
    let pending: u64 = work.buffers.iter().map(|b| b.pending.unwrap()).sum();
    assert_eq!(pending, 3, "{work:?}");
    // The buffers are JetStream's, not the embedded backend's.
    let embedded = c.dir.path().join("controller").join("buffers");
    assert!(
        !walk(&embedded)
            .iter()
            .any(|p| p.to_string_lossy().contains("web.work"))
    );

    // Deleting removes the streams: a pipeline of the same name starts empty.
    call(&api, Method::DELETE, "/v1/pipelines/web", None).await;
    wait_for("the pipeline to be removed", T, async || {
        call(&api, Method::GET, "/v1/pipelines/web", None).await.0 == 404
    })
    .await
    .unwrap();
    apply(&api, &format!("{WEB}buffer: {{ backend: nats }}\n")).await;
    let v = view(&api, "web").await;
    let work = v.vertices.iter().find(|x| x.name == "work").unwrap();
    assert!(work.buffers.iter().all(|b| !b.exists), "{work:?}");
    call(&api, Method::DELETE, "/v1/pipelines/web", None).await;
    wait_for("the pipeline to be removed", T, async || {
        call(&api, Method::GET, "/v1/pipelines/web", None).await.0 == 404
    })
    .await
    .unwrap();
}
