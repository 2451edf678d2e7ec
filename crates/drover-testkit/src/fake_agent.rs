//! A fake agent for protocol tests: it sends exactly the messages a test chooses, so
//! the controller's handling of every message (including wrong and hostile ones) can be
//! driven by hand.

use crate::JOIN_TOKEN;
use drover_core::protocol::{
    AGENT_CONNECT_PATH, AgentEvent, AgentMessage, Command, ControllerMessage, Hello,
    JOIN_TOKEN_HEADER, PROTOCOL_VERSION,
};
use drover_core::spec::{Resources, RuntimeKind};
use drover_core::state::{Exit, NodeInfo};
use drover_core::{NodeId, TaskId, TaskState};
use futures_util::{SinkExt, StreamExt};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// How long the fake agent waits for any one message.
const T: Duration = Duration::from_secs(20);

/// A fake agent: sends exactly what the test says.
pub struct FakeAgent {
    pub ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
}

impl FakeAgent {
    pub async fn connect(
        url: &str,
        token: &str,
    ) -> Result<FakeAgent, tokio_tungstenite::tungstenite::Error> {
        let mut req = format!("{}{AGENT_CONNECT_PATH}", url.replace("http://", "ws://"))
            .into_client_request()?;
        req.headers_mut()
            .insert(JOIN_TOKEN_HEADER, token.parse().unwrap());
        let (ws, _) = tokio_tungstenite::connect_async(req).await?;
        Ok(FakeAgent { ws })
    }

    pub async fn send(&mut self, m: &AgentMessage) {
        self.ws
            .send(Message::Text(serde_json::to_string(m).unwrap().into()))
            .await
            .unwrap();
    }

    pub async fn recv(&mut self) -> Option<ControllerMessage> {
        loop {
            match tokio::time::timeout(T, self.ws.next()).await.ok()?? {
                Ok(Message::Text(t)) => return Some(serde_json::from_str(&t).unwrap()),
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => continue,
            }
        }
    }

    /// Connects with the join token and says hello; returns once welcomed.
    pub async fn joined(url: &str) -> FakeAgent {
        let mut agent = FakeAgent::connect(url, JOIN_TOKEN).await.unwrap();
        agent.send(&FakeAgent::hello(PROTOCOL_VERSION)).await;
        assert!(matches!(
            agent.recv().await,
            Some(ControllerMessage::Welcome { .. })
        ));
        agent
    }

    /// Waits for the next Start command, acknowledges it and returns its task.
    pub async fn next_start(&mut self) -> TaskId {
        self.next_assignment().await.task_id
    }

    /// Waits for the next Start command, acknowledges it and returns it.
    pub async fn next_assignment(&mut self) -> drover_core::protocol::TaskAssignment {
        loop {
            if let ControllerMessage::Command {
                seq,
                command: Command::Start(a),
            } = self.recv().await.expect("a command")
            {
                self.send(&AgentMessage::CommandAck { seq }).await;
                return *a;
            }
        }
    }

    /// Sends heartbeats (so the node stays alive) until a Forget command arrives, and
    /// returns its task.
    pub async fn heartbeat_until_forget(&mut self) -> TaskId {
        let deadline = tokio::time::Instant::now() + T;
        loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no Forget within {T:?}"
            );
            self.send(&AgentMessage::Heartbeat {
                at: 0,
                usage: Vec::new(),
                envs: None,
            })
            .await;
            match tokio::time::timeout(Duration::from_millis(200), self.ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    if let ControllerMessage::Command {
                        seq,
                        command: Command::Forget { task_id },
                    } = serde_json::from_str(&t).unwrap()
                    {
                        self.send(&AgentMessage::CommandAck { seq }).await;
                        return task_id;
                    }
                }
                Ok(None) | Ok(Some(Err(_))) => panic!("connection closed"),
                _ => {}
            }
        }
    }

    /// Sends a buffer call as a binary frame and returns the answer with its id,
    /// skipping any other message meanwhile.
    pub async fn buffer_call(&mut self, frame: bytes::Bytes) -> drover_buffer::remote::Answer {
        self.ws.send(Message::Binary(frame)).await.unwrap();
        loop {
            match tokio::time::timeout(T, self.ws.next()).await {
                Ok(Some(Ok(Message::Binary(b)))) => {
                    return drover_buffer::remote::decode_answer(&b).unwrap();
                }
                Ok(Some(Ok(_))) => continue,
                other => panic!("no buffer answer: {other:?}"),
            }
        }
    }

    pub fn hello(version: u32) -> AgentMessage {
        FakeAgent::hello_as(version, "linux/amd64", RuntimeKind::Mock)
    }

    /// A hello from a node of `platform` offering `runtime`.
    pub fn hello_as(version: u32, platform: &str, runtime: RuntimeKind) -> AgentMessage {
        AgentMessage::Hello(Hello {
            protocol_version: version,
            min_protocol_version: None,
            node_id: NodeId::from(format!("node-fake-{}", platform.replace('/', "-")).as_str()),
            info: NodeInfo {
                name: "fake".into(),
                platform: platform.into(),
                labels: Default::default(),
                runtimes: vec![runtime],
                capacity: Resources {
                    cpu: 4.0,
                    memory: drover_core::quantity::ByteSize(1 << 30),
                },
                agent_version: "test".into(),
                attributes: Default::default(),
                libc: None,
                uname: None,
                agent_arch: String::new(),
                emulates: Vec::new(),
            },
            known_tasks: vec![],
        })
    }
}

pub fn event(seq: u64, task: &TaskId, state: TaskState, code: Option<i32>) -> AgentMessage {
    AgentMessage::Event(AgentEvent {
        seq,
        task_id: task.clone(),
        state,
        reason: String::new(),
        exit: code.map(|c| Exit {
            code: Some(c),
            signal: None,
        }),
        at: 0,
        ports: Vec::new(),
    })
}
