//! The agent's connection to its controller: dials the controller's websocket, says
//! hello, replays what the controller has not acknowledged, then pumps heartbeats,
//! events, log chunks and commands until the connection drops, and dials again with a
//! jittered backoff.
//!
//! The connection only carries messages: every decision about a task is the task
//! manager's, which it calls for commands and acknowledgements and reads for events.

use crate::tasks::TaskManager;
use crate::{AgentConfig, AgentError, pyenv};
use drover_core::protocol::{
    AGENT_CONNECT_PATH, AgentMessage, Command, ControllerMessage, Hello, JOIN_TOKEN_HEADER,
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use drover_core::state::NodeInfo;
use drover_core::{NodeId, TaskId, now_millis};
use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::sync::CancellationToken;

/// The longest the agent waits for a finished session's websocket to close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) fn connect_url(server: &str) -> Result<String, AgentError> {
    let base = server.trim_end_matches('/');
    let ws = if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}")
    } else if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else {
        return Err(AgentError::ServerUrl(server.to_string()));
    };
    Ok(format!("{ws}{AGENT_CONNECT_PATH}"))
}

pub(crate) struct Connection {
    /// The newest protocol version offered at hello: this build's, or lower after a
    /// controller that checks for its own version exactly (protocol 1) said which it
    /// speaks.
    hello_version: std::sync::atomic::AtomicU32,
    url: String,
    /// Set for a `wss://` URL.
    tls: Option<drover_tls::ClientTls>,
    cfg: AgentConfig,
    node_id: NodeId,
    info: NodeInfo,
    manager: Arc<TaskManager>,
    shutdown: CancellationToken,
}

/// Why a session ended.
enum SessionEnd {
    /// The connection dropped or failed; try again soon.
    Dropped(String),
    /// The controller refused us; try again, but slowly.
    Rejected(String),
    /// The controller refused the join token. Before this agent process was ever let
    /// in, that is a mistake in its config that waiting will not fix: the agent stops.
    TokenRefused,
    /// The server's certificate was not trusted (nothing, not even the join token, was
    /// sent); try again slowly, since only its operator or ours can fix it.
    Untrusted(String),
    Shutdown,
}

impl Connection {
    /// A connection that offers this build's protocol version first.
    pub(crate) fn new(
        url: String,
        tls: Option<drover_tls::ClientTls>,
        cfg: AgentConfig,
        node_id: NodeId,
        info: NodeInfo,
        manager: Arc<TaskManager>,
        shutdown: CancellationToken,
    ) -> Connection {
        Connection {
            hello_version: std::sync::atomic::AtomicU32::new(PROTOCOL_VERSION),
            url,
            tls,
            cfg,
            node_id,
            info,
            manager,
            shutdown,
        }
    }

    /// Connects, and reconnects whenever the connection ends, until the agent shuts
    /// down. Ends with an error when the controller refuses the join token before ever
    /// letting this agent process in; a token refused later (revoked while the agent
    /// runs) is retried slowly, like any other refusal, so that an operator can restore
    /// it without restarting every agent.
    pub(crate) async fn run(self) -> Result<(), String> {
        let mut backoff = Duration::from_millis(100);
        let mut ever_welcomed = false;
        loop {
            if self.shutdown.is_cancelled() {
                return Ok(());
            }
            let (end, was_welcomed) = self.session().await;
            ever_welcomed |= was_welcomed;
            match end {
                SessionEnd::Shutdown => return Ok(()),
                SessionEnd::TokenRefused if !ever_welcomed => {
                    return Err(format!(
                        "the controller at {} did not accept the join token: check --join-token (or {}), e.g. against the server's DATA_DIR/join-token",
                        self.cfg.server,
                        crate::JOIN_TOKEN_ENV_NAME
                    ));
                }
                SessionEnd::TokenRefused => {
                    tracing::error!(
                        "the controller refused this agent: the join token was not accepted"
                    );
                    backoff = self.cfg.max_backoff;
                }
                SessionEnd::Dropped(why) => tracing::warn!("controller connection: {why}"),
                SessionEnd::Rejected(why) => {
                    tracing::error!("the controller refused this agent: {why}");
                    backoff = self.cfg.max_backoff;
                }
                SessionEnd::Untrusted(why) => {
                    tracing::error!("not connecting to {}: {why}", self.cfg.server);
                    backoff = self.cfg.max_backoff;
                }
            }
            if was_welcomed {
                backoff = Duration::from_millis(100);
            }
            // Jitter spreads out a fleet that lost the controller at the same moment.
            let jitter = rand::random_range(0.5..1.0);
            let wait = backoff.mul_f64(jitter);
            tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(wait) => {}
            }
            backoff = (backoff * 2).min(self.cfg.max_backoff);
        }
    }

    async fn session(&self) -> (SessionEnd, bool) {
        let mut req = match self.url.as_str().into_client_request() {
            Ok(r) => r,
            Err(e) => {
                return (
                    SessionEnd::Rejected(format!("bad URL {}: {e}", self.url)),
                    false,
                );
            }
        };
        match self.cfg.join_token.parse() {
            Ok(v) => {
                req.headers_mut().insert(JOIN_TOKEN_HEADER, v);
            }
            Err(_) => {
                return (
                    SessionEnd::Rejected(
                        "the join token contains characters not allowed in a header".into(),
                    ),
                    false,
                );
            }
        }
        let connect = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async_tls_with_config(
                req,
                // A small read buffer: tungstenite zeroes it before every read.
                Some(
                    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
                        .read_buffer_size(8 * 1024),
                ),
                true,
                self.tls
                    .as_ref()
                    .map(|t| tokio_tungstenite::Connector::Rustls(t.config())),
            ),
        );
        let ws = tokio::select! {
            _ = self.shutdown.cancelled() => return (SessionEnd::Shutdown, false),
            r = connect => match r {
                Ok(Ok((ws, _))) => ws,
                Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) if resp.status().as_u16() == 401 => {
                    return (SessionEnd::TokenRefused, false);
                }
                Ok(Err(e)) => {
                    // The handshake's own error says little ("invalid peer certificate");
                    // the verifier kept a sentence saying which certificate and why.
                    if let Some(why) = self.tls.as_ref().and_then(|t| t.take_refusal()) {
                        return (SessionEnd::Untrusted(why), false);
                    }
                    return (SessionEnd::Dropped(format!("connecting to {}: {e}", self.url)), false);
                }
                Err(_) => return (SessionEnd::Dropped(format!("connecting to {}: timed out", self.url)), false),
            },
        };
        let (mut sink, mut stream) = ws.split();
        let offered = self
            .hello_version
            .load(std::sync::atomic::Ordering::Relaxed);
        let hello = AgentMessage::Hello(Hello {
            protocol_version: offered,
            min_protocol_version: Some(MIN_PROTOCOL_VERSION),
            node_id: self.node_id.clone(),
            info: self.info.clone(),
            known_tasks: self.manager.known(),
        });
        if let Err(e) = send(&mut sink, &hello).await {
            return (SessionEnd::Dropped(e), false);
        }
        let welcome = tokio::time::timeout(Duration::from_secs(10), stream.next()).await;
        let (heartbeat_ms, last_seq) = match welcome {
            Ok(Some(Ok(Message::Text(t)))) => match serde_json::from_str::<ControllerMessage>(&t) {
                Ok(ControllerMessage::Welcome {
                    heartbeat_interval_ms,
                    last_event_seq,
                    ..
                }) => (heartbeat_interval_ms, last_event_seq),
                Ok(ControllerMessage::Reject { reason }) => {
                    // A version 1 controller accepts only its own version and says which
                    // that is; this agent speaks it too, so it offers that next time.
                    if let Some(v) = older_version_asked(&reason)
                        && v < offered
                    {
                        tracing::info!("the controller speaks protocol version {v}; offering it");
                        self.hello_version
                            .store(v, std::sync::atomic::Ordering::Relaxed);
                        return (
                            SessionEnd::Dropped(format!(
                                "protocol version {offered} refused: {reason}"
                            )),
                            false,
                        );
                    }
                    return (SessionEnd::Rejected(reason), false);
                }
                other => {
                    return (
                        SessionEnd::Dropped(format!("expected a welcome, got {other:?}")),
                        false,
                    );
                }
            },
            Ok(Some(Ok(other))) => {
                return (
                    SessionEnd::Dropped(format!("expected a welcome, got {other:?}")),
                    false,
                );
            }
            Ok(Some(Err(e))) => return (SessionEnd::Dropped(e.to_string()), false),
            Ok(None) => {
                return (
                    SessionEnd::Dropped("closed before the welcome".into()),
                    false,
                );
            }
            Err(_) => return (SessionEnd::Dropped("no welcome within 10s".into()), false),
        };
        tracing::info!(node = %self.node_id, "connected to {}", self.cfg.server);
        self.manager.on_ack(last_seq);
        let (tx, mut rx) = mpsc::channel::<AgentMessage>(4096);
        self.manager.link.set(Some(tx));
        // Buffer calls of this node's vertex replicas go out as binary frames on this
        // connection, and their answers come back on it.
        let buffers = self.manager.holdings.vertices.link.clone();
        let (calls_tx, mut calls_rx) =
            mpsc::channel::<bytes::Bytes>(crate::vertex::MAX_PENDING_CALLS);
        buffers.set(Some(calls_tx));
        // Output first, then events: whoever sees a task's end must have its output.
        // Shipping queues whatever was written while disconnected; the probes let the
        // controller ask again for anything it lost.
        self.manager.ship_logs_after_reconnect();
        while let Ok(msg) = rx.try_recv() {
            if let Err(e) = send(&mut sink, &msg).await {
                self.manager.link.set(None);
                buffers.set(None);
                return (SessionEnd::Dropped(e), true);
            }
        }
        // Replay everything the controller has not acknowledged, before anything new.
        let mut sent_upto = last_seq;
        for ev in self.manager.pending_events() {
            sent_upto = sent_upto.max(ev.seq);
            if let Err(e) = send(&mut sink, &AgentMessage::Event(ev)).await {
                self.manager.link.set(None);
                buffers.set(None);
                return (SessionEnd::Dropped(e), true);
            }
        }
        let end = self
            .pump(
                &mut sink,
                &mut stream,
                &mut rx,
                &mut calls_rx,
                Duration::from_millis(heartbeat_ms.max(50)),
                sent_upto,
            )
            .await;
        self.manager.link.set(None);
        buffers.set(None);
        // The session is over and why was said above; a close that fails or does not
        // finish (the connection is usually already broken) changes nothing, so it is
        // only noted.
        match tokio::time::timeout(CLOSE_TIMEOUT, sink.close()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!("closing the controller connection: {e}"),
            Err(_) => tracing::debug!("closing the controller connection timed out"),
        }
        (end, true)
    }

    async fn pump<S, R>(
        &self,
        sink: &mut S,
        stream: &mut R,
        rx: &mut mpsc::Receiver<AgentMessage>,
        calls: &mut mpsc::Receiver<bytes::Bytes>,
        heartbeat: Duration,
        mut sent_upto: u64,
    ) -> SessionEnd
    where
        S: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
        R: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
            + Unpin,
    {
        let mut beat = tokio::time::interval(heartbeat);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Without anything from the controller for this long, assume the connection is
        // dead (a half-open TCP connection never reports an error by itself).
        let silence = heartbeat * 10 + Duration::from_secs(5);
        let mut last_heard = tokio::time::Instant::now();
        // Events normally go out once and are acknowledged within a round trip. If the
        // outbox has not shrunk for a few heartbeats, send what is in it again; the
        // controller ignores seqs it already applied.
        let mut stale_beats = 0u32;
        // The environments last reported on this connection; `None` sends them on the
        // first heartbeat, so a controller that restarted learns them again.
        let mut last_envs: Option<Vec<pyenv::EnvInfo>> = None;
        let mut last_unacked = usize::MAX;
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return SessionEnd::Shutdown,
                _ = beat.tick() => {
                    if last_heard.elapsed() > silence {
                        return SessionEnd::Dropped(format!("nothing from the controller for {}s", silence.as_secs()));
                    }
                    let envs = self.manager.python_envs().list();
                    let changed = last_envs.as_ref() != Some(&envs);
                    let beat = AgentMessage::Heartbeat {
                        at: now_millis(),
                        usage: self.manager.usage_samples(),
                        envs: changed.then(|| envs.clone()),
                    };
                    if changed {
                        last_envs = Some(envs);
                    }
                    if let Err(e) = send(sink, &beat).await {
                        return SessionEnd::Dropped(e);
                    }
                    let unacked = self.manager.unacked();
                    stale_beats = if unacked > 0 && unacked >= last_unacked { stale_beats + 1 } else { 0 };
                    last_unacked = unacked;
                    if stale_beats >= 3 {
                        stale_beats = 0;
                        tracing::debug!("re-sending {unacked} unacknowledged events");
                        for ev in self.manager.pending_events() {
                            if let Err(e) = send(sink, &AgentMessage::Event(ev)).await {
                                return SessionEnd::Dropped(e);
                            }
                        }
                    }
                }
                _ = self.manager.events_ready.notified() => {
                    // Queued output goes first: a task's last output is queued before
                    // its terminal event is written.
                    while let Ok(msg) = rx.try_recv() {
                        if let Err(e) = send(sink, &msg).await {
                            return SessionEnd::Dropped(e);
                        }
                    }
                    for ev in self.manager.events_after(sent_upto) {
                        sent_upto = ev.seq;
                        if let Err(e) = send(sink, &AgentMessage::Event(ev)).await {
                            return SessionEnd::Dropped(e);
                        }
                    }
                }
                call = calls.recv() => {
                    // The link holds a sender while connected, so this queue stays open.
                    let Some(frame) = call else { continue };
                    if let Err(e) = send_frame(sink, Message::Binary(frame)).await {
                        return SessionEnd::Dropped(e);
                    }
                }
                out = rx.recv() => {
                    let Some(msg) = out else { return SessionEnd::Dropped("send queue closed".into()) };
                    if let Err(e) = send(sink, &msg).await {
                        return SessionEnd::Dropped(e);
                    }
                }
                incoming = stream.next() => {
                    last_heard = tokio::time::Instant::now();
                    let text = match incoming {
                        Some(Ok(Message::Text(t))) => t,
                        Some(Ok(Message::Binary(frame))) => {
                            self.manager.holdings.vertices.link.deliver(frame);
                            continue;
                        }
                        Some(Ok(Message::Close(_))) | None => return SessionEnd::Dropped("the controller closed the connection".into()),
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => return SessionEnd::Dropped(e.to_string()),
                    };
                    match serde_json::from_str::<ControllerMessage>(&text) {
                        Ok(ControllerMessage::Command { seq, command: Command::Unknown }) => {
                            // Acknowledged so that it is not sent again, and answered so that
                            // the controller can say why nothing happened.
                            let reason = format!(
                                "a command this agent ({}, protocol {PROTOCOL_VERSION}) does not know; upgrade the agent",
                                env!("CARGO_PKG_VERSION")
                            );
                            for msg in [AgentMessage::CommandAck { seq }, AgentMessage::Unsupported { seq, reason }] {
                                if let Err(e) = send(sink, &msg).await {
                                    return SessionEnd::Dropped(e);
                                }
                            }
                        }
                        Ok(ControllerMessage::Command { seq, command }) => {
                            self.manager.handle(command);
                            if let Err(e) = send(sink, &AgentMessage::CommandAck { seq }).await {
                                return SessionEnd::Dropped(e);
                            }
                        }
                        Ok(ControllerMessage::EventAck { seq }) => self.manager.on_ack(seq),
                        Ok(ControllerMessage::LogResync { task_id, stream, offset }) => self.manager.resync_log(&task_id, stream, offset),
                        Ok(ControllerMessage::Reject { reason }) => return SessionEnd::Rejected(reason),
                        Ok(ControllerMessage::Welcome { .. }) => {}
                        Ok(ControllerMessage::Unknown) => tracing::debug!("ignoring a message type this agent does not know"),
                        Err(e) => match undecodable_start(&text) {
                            // A Start this agent cannot read (a newer controller's) fails
                            // its task with the reason, rather than leaving it scheduled
                            // until the controller's start deadline.
                            Some((seq, task)) => {
                                let reason = format!(
                                    "this agent ({}) cannot read the task's Start command: {e}; upgrade the agent",
                                    env!("CARGO_PKG_VERSION")
                                );
                                self.manager.refuse_start(&task, &reason);
                                if let Err(e) = send(sink, &AgentMessage::CommandAck { seq }).await {
                                    return SessionEnd::Dropped(e);
                                }
                            }
                            None => tracing::warn!("ignoring a malformed controller message: {e}"),
                        },
                    }
                }
            }
        }
    }
}

/// The version a protocol 1 controller's refusal names ("... this controller speaks N;
/// ..."), when this build speaks it too.
fn older_version_asked(reason: &str) -> Option<u32> {
    let rest = reason.split("this controller speaks ").nth(1)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let v: u32 = digits.parse().ok()?;
    (MIN_PROTOCOL_VERSION..PROTOCOL_VERSION)
        .contains(&v)
        .then_some(v)
}

/// The sequence number and task of a Start command that did not decode, if the message
/// is recognisably one.
fn undecodable_start(text: &str) -> Option<(u64, TaskId)> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    if v["type"] != "command" || v["command"]["kind"] != "start" {
        return None;
    }
    let seq = v["seq"].as_u64()?;
    let task = v["command"]["task_id"].as_str()?;
    Some((seq, TaskId::parse(task).ok()?))
}

async fn send<S>(sink: &mut S, msg: &AgentMessage) -> Result<(), String>
where
    S: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    let text = serde_json::to_string(msg).map_err(|e| e.to_string())?;
    send_frame(sink, Message::Text(text.into())).await
}

async fn send_frame<S>(sink: &mut S, frame: Message) -> Result<(), String>
where
    S: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    // A controller that stops reading fills the socket and the send waits; without a
    // bound the whole connection loop (and the silence check in it) would wait too.
    // Giving up drops the connection, and the next one replays what was not acked.
    match tokio::time::timeout(SEND_TIMEOUT, sink.send(frame)).await {
        Ok(sent) => sent.map_err(|e| e.to_string()),
        Err(_) => Err(format!(
            "the controller took no message for {}s",
            SEND_TIMEOUT.as_secs()
        )),
    }
}

/// The longest one message may wait to be taken by the connection.
const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
