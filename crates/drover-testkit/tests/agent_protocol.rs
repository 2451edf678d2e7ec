//! The real agent against a hand-driven fake controller, so the controller's side of
//! every message can be chosen.

use drover_core::TaskState;
use drover_core::protocol::{AgentMessage, ControllerMessage, PROTOCOL_VERSION};
use drover_testkit::{AgentOptions, start_agent};
use futures_util::{SinkExt, StreamExt};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_command_the_agent_cannot_read_fails_its_task_with_the_reason_and_is_acked() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let _agent = start_agent(&url, dir.path().to_path_buf(), AgentOptions::named("old"))
        .await
        .unwrap();
    let (tcp, _) = tokio::time::timeout(T, listener.accept())
        .await
        .unwrap()
        .unwrap();
    let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
    let next = async |ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>| loop {
        match tokio::time::timeout(T, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            Message::Text(t) => return serde_json::from_str::<AgentMessage>(&t).unwrap(),
            _ => continue,
        }
    };
    let AgentMessage::Hello(hello) = next(&mut ws).await else {
        panic!("the first message is not a hello");
    };
    let welcome = ControllerMessage::Welcome {
        protocol_version: PROTOCOL_VERSION,
        node_id: hello.node_id,
        heartbeat_interval_ms: 1000,
        last_event_seq: 0,
    };
    ws.send(Message::Text(
        serde_json::to_string(&welcome).unwrap().into(),
    ))
    .await
    .unwrap();
    // A Start from a (hypothetical) newer controller: recognisably a Start for task-x,
    // but with a field this agent reads differently.
    let start = r#"{"type":"command","seq":7,"command":{"kind":"start","task_id":"task-x","index":"first"}}"#;
    ws.send(Message::Text(start.into())).await.unwrap();
    let (mut acked, mut failed) = (false, None);
    while !(acked && failed.is_some()) {
        match next(&mut ws).await {
            AgentMessage::CommandAck { seq: 7 } => acked = true,
            AgentMessage::Event(e) if e.task_id.as_str() == "task-x" => {
                assert_eq!(e.state, TaskState::Failed);
                failed = Some(e.reason);
            }
            _ => {}
        }
    }
    let reason = failed.unwrap();
    assert!(
        reason.contains("cannot read the task's Start command")
            && reason.contains("upgrade the agent"),
        "{reason}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_joins_a_version_1_controller_and_answers_commands_it_does_not_know() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let _agent = start_agent(&url, dir.path().to_path_buf(), AgentOptions::named("new"))
        .await
        .unwrap();
    type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;
    let next = async |ws: &mut Ws| loop {
        match tokio::time::timeout(T, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            Message::Text(t) => return serde_json::from_str::<AgentMessage>(&t).unwrap(),
            _ => continue,
        }
    };
    let send = async |ws: &mut Ws, text: String| ws.send(Message::Text(text.into())).await.unwrap();
    // A version 1 controller: it takes only its own version, and says so as it did.
    let mut ws = loop {
        let (tcp, _) = tokio::time::timeout(T, listener.accept())
            .await
            .unwrap()
            .unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        let AgentMessage::Hello(hello) = next(&mut ws).await else {
            panic!("the first message is not a hello");
        };
        if hello.protocol_version == 1 {
            let welcome = serde_json::json!({
                "type": "welcome", "protocol_version": 1, "node_id": hello.node_id,
                "heartbeat_interval_ms": 1000, "last_event_seq": 0,
            });
            send(&mut ws, welcome.to_string()).await;
            break ws;
        }
        let reason = format!(
            "agent speaks protocol version {}, this controller speaks 1; upgrade the older one",
            hello.protocol_version
        );
        send(
            &mut ws,
            serde_json::json!({"type": "reject", "reason": reason}).to_string(),
        )
        .await;
    };
    // A command from a newer controller: acknowledged, and answered as unsupported.
    send(
        &mut ws,
        r#"{"type":"command","seq":3,"command":{"kind":"drain","task_id":"task-1"}}"#.into(),
    )
    .await;
    // Then a version 1 Start for a mock task, which the agent runs.
    let start = serde_json::json!({
        "type": "command", "seq": 4,
        "command": {"kind": "start", "task_id": "task-v1", "job_id": "job-1", "project": "default",
                    "job_name": "j", "index": 0, "attempt": 0,
                    "spec": {"name": "j", "runtime": "mock"}},
    });
    send(&mut ws, start.to_string()).await;
    let (mut acked, mut unsupported, mut running) = (Vec::new(), None, false);
    while !(acked.len() >= 2 && unsupported.is_some() && running) {
        match next(&mut ws).await {
            AgentMessage::CommandAck { seq } => acked.push(seq),
            AgentMessage::Unsupported { seq, reason } => unsupported = Some((seq, reason)),
            AgentMessage::Event(e) if e.task_id.as_str() == "task-v1" => {
                running |= e.state == TaskState::Running
            }
            _ => {}
        }
    }
    assert!(acked.contains(&3) && acked.contains(&4), "{acked:?}");
    let (seq, reason) = unsupported.unwrap();
    assert_eq!(seq, 3);
    assert!(reason.contains("upgrade the agent"), "{reason}");
}
