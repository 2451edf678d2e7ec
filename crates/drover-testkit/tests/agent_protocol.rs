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
