//! Buffer calls on the agent connection are checked against who sends them: a node
//! may use a pipeline buffer only while it runs a replica of a vertex that reads or
//! writes it. And vertex replicas go only to agents that say they can serve them.

use bytes::Bytes;
use drover_buffer::BufferError;
use drover_buffer::remote::{self, Call, Op, Reply};
use drover_core::JobSpec;
use drover_core::protocol::{AgentMessage, PROTOCOL_VERSION};
use drover_core::spec::RuntimeKind;
use drover_testkit::fake_agent::FakeAgent;
use drover_testkit::{JOIN_TOKEN, TestCluster};
use std::time::Duration;

/// A fake agent on `platform` offering the process runtime, saying it serves vertex
/// replicas or not.
async fn agent(url: &str, platform: &str, vertices: bool) -> FakeAgent {
    let mut a = FakeAgent::connect(url, JOIN_TOKEN).await.unwrap();
    let mut hello = FakeAgent::hello_as(PROTOCOL_VERSION, platform, RuntimeKind::Process);
    if let AgentMessage::Hello(h) = &mut hello
        && vertices
    {
        h.info
            .attributes
            .insert("process.vertex".into(), "true".into());
    }
    a.send(&hello).await;
    assert!(a.recv().await.is_some(), "no welcome");
    a
}

fn stats(id: u64, buffer: &str) -> Bytes {
    remote::encode_call(&Call {
        id,
        buffer: buffer.into(),
        op: Op::Stats,
    })
}

/// The log sink of pipeline `demo`, reading `default.demo.out.0`.
fn sink_job() -> JobSpec {
    let v: drover_core::pipeline::vertex::VertexSpec = serde_json::from_value(serde_json::json!({
        "pipeline": "demo",
        "name": "out",
        "role": {"sink": {"log": {}}},
        "inputs": ["default.demo.out.0"],
        "buffer": {"backend": "embedded", "max_length": 100, "usage_limit": 0.8},
        "scale": {"min": 1, "max": 1},
        "replicas": 1,
        "lifecycle": {"desired_phase": "running"},
        "generation": 1,
    }))
    .unwrap();
    v.job_spec().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_node_running_a_vertex_replica_may_use_its_buffers() {
    let c = TestCluster::start().await.unwrap();
    let api = c.api();
    // A node whose agent cannot serve vertex replicas is never given one.
    let mut old = agent(&c.url, "linux/arm64", false).await;
    c.submit_vertex_job(&sink_job()).await.unwrap();
    let (_, tasks) = api
        .wait_job("demo-out", Duration::from_secs(20), |_, t| {
            t.iter().any(|t| {
                t.pending_reason
                    .as_deref()
                    .is_some_and(|r| r.contains("pipeline vertex replicas"))
            })
        })
        .await
        .unwrap();
    assert_eq!(tasks.len(), 1);

    // A node that can gets it, and may use the buffer its replica reads.
    let mut runner = agent(&c.url, "linux/amd64", true).await;
    let a = runner.next_assignment().await;
    assert_eq!(a.job_name, "demo-out");
    assert!(a.spec.vertex.is_some());
    assert_eq!(
        a.nats_url, None,
        "embedded buffers go through the controller"
    );
    let answer = runner.buffer_call(stats(11, "default.demo.out.0")).await;
    assert_eq!(answer.id, 11);
    match answer.result {
        Ok(Reply::Stats(s)) => assert!(s.is_drained()),
        other => panic!("stats of its own input: {other:?}"),
    }

    // Not a buffer its replica does not name, even in the same pipeline.
    let answer = runner.buffer_call(stats(12, "default.demo.other.0")).await;
    assert_eq!(answer.id, 12);
    let e = answer.result.unwrap_err();
    assert!(matches!(e, BufferError::Invalid(_)), "{e}");
    assert!(
        e.to_string()
            .contains("node-fake-linux-amd64 may not use buffer default.demo.other.0"),
        "{e}"
    );

    // Nor the other node, which runs no replica at all; appends included.
    let append = remote::encode_call(&Call {
        id: 13,
        buffer: "default.demo.out.0".into(),
        op: Op::Append(vec![drover_buffer::Message {
            id: drover_buffer::MessageId(1),
            key: Bytes::new(),
            event_time: 0,
            payload: Bytes::from_static(b"smuggled"),
        }]),
    });
    let answer = old.buffer_call(append).await;
    let e = answer.result.unwrap_err();
    assert!(
        e.to_string()
            .contains("node-fake-linux-arm64 may not use buffer default.demo.out.0"),
        "{e}"
    );
    // Garbage is answered with why, and the connection goes on.
    let mut garbage = stats(14, "default.demo.out.0").to_vec();
    garbage.truncate(garbage.len() - 2);
    let answer = old.buffer_call(Bytes::from(garbage)).await;
    assert_eq!(answer.id, 14);
    let e = answer.result.unwrap_err();
    assert!(e.to_string().contains("buffer frame"), "{e}");
    let answer = runner.buffer_call(stats(15, "default.demo.out.0")).await;
    match answer.result {
        Ok(Reply::Stats(s)) => assert_eq!(s.written_total, 0, "the smuggled append was written"),
        other => panic!("{other:?}"),
    }

    // Once the vertex's job is stopped and its replica has ended, its node may no
    // longer use the buffer.
    api.stop("demo-out").await.unwrap();
    runner
        .send(&drover_testkit::fake_agent::event(
            1,
            &a.task_id,
            drover_core::TaskState::Stopped,
            None,
        ))
        .await;
    api.wait_final("demo-out", Duration::from_secs(20))
        .await
        .unwrap();
    let answer = runner.buffer_call(stats(16, "default.demo.out.0")).await;
    assert!(answer.result.is_err(), "{:?}", answer.result);
    c.stop().await;
}
