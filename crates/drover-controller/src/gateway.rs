//! The agent gateway: one WebSocket per agent. The agent speaks first (hello); then
//! the controller's commands and acks go out through a bounded queue while the agent's
//! events, logs and heartbeats come in.

use crate::Inner;
use axum::extract::ws::{Message, WebSocket};
use drover_core::protocol::{
    AgentEvent, AgentMessage, ControllerMessage, Hello, LogChunk, negotiate,
};
use drover_core::{NodeId, TaskId};
use futures_util::{FutureExt, SinkExt, StreamExt};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// How many messages may wait for one agent's connection before senders back off.
const QUEUE: usize = 4096;

/// The most agent messages handled in one go (and so events in one commit).
const BATCH: usize = 512;

async fn send_direct(ws: &mut WebSocket, msg: &ControllerMessage) {
    if let Ok(text) = serde_json::to_string(msg)
        && let Err(e) = ws.send(Message::Text(text.into())).await
    {
        tracing::debug!("telling an agent why it is refused: {e}");
    }
}

pub(crate) async fn serve(inner: Arc<Inner>, mut ws: WebSocket) {
    // The first message must be a hello, and soon.
    let first = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
    let hello: Hello = match first {
        Ok(Some(Ok(Message::Text(t)))) => match serde_json::from_str::<AgentMessage>(&t) {
            Ok(AgentMessage::Hello(h)) => h,
            Ok(_) => {
                send_direct(
                    &mut ws,
                    &ControllerMessage::Reject {
                        reason: "the first message must be a hello".into(),
                    },
                )
                .await;
                return;
            }
            Err(e) => {
                send_direct(
                    &mut ws,
                    &ControllerMessage::Reject {
                        reason: format!("bad hello: {e}"),
                    },
                )
                .await;
                return;
            }
        },
        _ => return,
    };
    let offered_min = hello.min_protocol_version.unwrap_or(hello.protocol_version);
    let version = match negotiate(offered_min, hello.protocol_version) {
        Ok(v) => v,
        Err(reason) => {
            send_direct(&mut ws, &ControllerMessage::Reject { reason }).await;
            return;
        }
    };
    let conn_id = inner
        .next_conn
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let node_id = hello.node_id.clone();
    let (tx, mut rx) = mpsc::channel::<std::sync::Arc<str>>(QUEUE);
    match inner.on_hello(&hello, version, conn_id, tx.clone()).await {
        Ok(()) => {}
        Err(e) => {
            send_direct(
                &mut ws,
                &ControllerMessage::Reject {
                    reason: format!("registration failed: {e}"),
                },
            )
            .await;
            return;
        }
    };
    tracing::info!(node = %node_id, name = %hello.info.name, "agent connected");

    let (mut sink, mut stream) = ws.split();
    // The agent takes a long silence for a dead connection, so an idle connection gets
    // a ping every heartbeat interval. Agents of every version read a ping as a sign of
    // life, and their WebSocket library answers it by itself.
    let ping_every = inner.cfg.heartbeat_interval;
    // Buffer answers go out on the same connection as binary frames, from a queue of
    // their own so that a burst of them never holds up commands and acks.
    let (answers_tx, mut answers_rx) =
        mpsc::channel::<bytes::Bytes>(crate::buffer_calls::ANSWER_QUEUE);
    let calls = crate::buffer_calls::CallServer::new(inner.clone(), node_id.clone(), answers_tx);
    let writer = tokio::spawn(async move {
        loop {
            let first = tokio::select! {
                t = rx.recv() => match t {
                    Some(text) => Message::Text(text.as_ref().into()),
                    None => break,
                },
                a = answers_rx.recv() => match a {
                    Some(frame) => Message::Binary(frame),
                    // The call server lives as long as the reader; this ends with it.
                    None => break,
                },
                _ = tokio::time::sleep(ping_every) => {
                    if sink.send(Message::Ping(Default::default())).await.is_err() {
                        break;
                    }
                    continue;
                }
            };
            // Feed what is queued and flush once, rather than a flush per message.
            if sink.feed(first).await.is_err() {
                break;
            }
            let mut failed = false;
            while let Ok(more) = rx.try_recv() {
                if sink
                    .feed(Message::Text(more.as_ref().into()))
                    .await
                    .is_err()
                {
                    failed = true;
                    break;
                }
            }
            while !failed && let Ok(frame) = answers_rx.try_recv() {
                failed = sink.feed(Message::Binary(frame)).await.is_err();
            }
            if failed || sink.flush().await.is_err() {
                break;
            }
        }
        if let Err(e) = sink.close().await {
            tracing::debug!("closing an agent connection: {e}");
        }
    });

    // Tasks this connection's node has been confirmed to own, so that log chunks are
    // checked against the state without taking its lock for every chunk. A task never
    // moves to another node (a replacement is a new task), so a yes stays true.
    let mut owned = OwnedTasks::default();
    let idle_limit = inner.cfg.node_timeout;
    let shutdown = inner.shutdown.clone();
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => break,
            n = tokio::time::timeout(idle_limit, stream.next()) => n,
        };
        let first = match next {
            Ok(Some(Ok(m))) => m,
            // Silence past the lost timeout, an error or a close all end the session.
            _ => break,
        };
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match stream.next().now_or_never() {
                Some(Some(Ok(m))) => batch.push(m),
                _ => break,
            }
        }
        if !handle_batch(&inner, &node_id, &tx, &calls, &mut owned, batch).await {
            break;
        }
        if tx.is_closed() {
            break;
        }
    }
    drop(tx);
    // What the connection's replicas held goes back to the buffers, in the background
    // since it waits for the calls still running.
    tokio::spawn(calls.release());
    writer.abort();
    inner.on_disconnect(&node_id, conn_id).await;
    tracing::info!(node = %node_id, "agent disconnected");
}

/// The tasks one connection's node is known to own, with the cap on each one's stored
/// output; bounded, since a long-lived connection sees tasks come and go.
#[derive(Default)]
struct OwnedTasks(HashMap<TaskId, u64>);

impl OwnedTasks {
    const MAX: usize = 16_384;

    /// Keeps only the chunks of tasks assigned to `node_id`, asking the state about
    /// tasks not confirmed yet, and pairs each with its task's log cap; the others are
    /// dropped with a warning, since a node must not write into another node's (or
    /// another project's) task output.
    async fn filter(
        &mut self,
        inner: &Inner,
        node_id: &NodeId,
        chunks: Vec<LogChunk>,
    ) -> Vec<(LogChunk, u64)> {
        let unknown: Vec<&TaskId> = chunks
            .iter()
            .map(|c| &c.task_id)
            .filter(|t| !self.0.contains_key(*t))
            .collect();
        if !unknown.is_empty() {
            let state = inner.state.lock().await;
            let confirmed: Vec<(TaskId, u64)> = unknown
                .into_iter()
                .filter_map(|id| {
                    let t = state.tasks.get(id)?;
                    if t.node_id.as_ref() != Some(node_id) {
                        return None;
                    }
                    let cap = state
                        .jobs
                        .get(&t.job_id)
                        .map_or(drover_core::spec::DEFAULT_LOG_MAX_SIZE, |j| {
                            j.spec.logs.max_size()
                        });
                    Some((id.clone(), cap.0))
                })
                .collect();
            drop(state);
            if self.0.len() + confirmed.len() > Self::MAX {
                self.0.clear();
            }
            self.0.extend(confirmed);
        }
        chunks
            .into_iter()
            .filter_map(|c| match self.0.get(&c.task_id) {
                Some(cap) => Some((c, *cap)),
                None => {
                    tracing::warn!(node = %node_id, task = %c.task_id, "dropping output for a task this node does not run");
                    None
                }
            })
            .collect()
    }
}

/// Handles a batch of messages; returns false when the connection should close.
async fn handle_batch(
    inner: &Arc<Inner>,
    node_id: &NodeId,
    tx: &mpsc::Sender<std::sync::Arc<str>>,
    calls: &crate::buffer_calls::CallServer,
    owned: &mut OwnedTasks,
    batch: Vec<Message>,
) -> bool {
    let mut events: Vec<AgentEvent> = Vec::new();
    let mut acks: Vec<u64> = Vec::new();
    let mut heartbeat = false;
    let mut usage = Vec::new();
    let mut chunks: Vec<LogChunk> = Vec::new();
    for m in batch {
        let text = match m {
            Message::Text(t) => t,
            Message::Binary(frame) => {
                calls.accept(frame);
                continue;
            }
            Message::Close(_) => return false,
            _ => continue,
        };
        let msg = match serde_json::from_str::<AgentMessage>(&text) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(node = %node_id, "ignoring a malformed agent message: {e}");
                continue;
            }
        };
        match msg {
            AgentMessage::Heartbeat { usage: u, envs, .. } => {
                heartbeat = true;
                usage = u;
                if let Some(envs) = envs {
                    inner.set_node_envs(node_id, envs);
                }
            }
            AgentMessage::Event(e) => events.push(e),
            AgentMessage::CommandAck { seq } => acks.push(seq),
            AgentMessage::Log(chunk) => chunks.push(chunk),
            AgentMessage::Hello(_) => tracing::warn!(node = %node_id, "ignoring a second hello"),
            AgentMessage::Unsupported { seq, reason } => {
                // The agent acknowledged the command too; it is not sent again.
                tracing::warn!(node = %node_id, seq, "the agent cannot carry out a command: {reason}");
                acks.push(seq);
            }
            AgentMessage::Unknown => {
                tracing::debug!(node = %node_id, "ignoring a message type this controller does not know")
            }
        }
    }
    if !chunks.is_empty() {
        for (chunk, cap) in owned.filter(inner, node_id, chunks).await {
            store_chunk(inner, tx, chunk, cap);
        }
    }
    if !acks.is_empty() {
        inner.on_command_acks(node_id, &acks).await;
    }
    if !events.is_empty() {
        match inner.on_events(node_id, &events).await {
            // The ack goes out only after the commit, so an acknowledged event is stored.
            Ok(seq) => {
                let ack = crate::frame(&ControllerMessage::EventAck { seq });
                if tx.send(ack).await.is_err() {
                    // The connection is closing; the agent replays unacknowledged events
                    // on its next one, and they are applied once.
                    tracing::debug!(node = %node_id, seq, "event ack not sent: the connection closed");
                }
            }
            Err(e) => {
                tracing::error!(node = %node_id, "storing agent events: {e}; the agent will replay them")
            }
        }
    }
    if heartbeat && (events.is_empty() || !usage.is_empty()) {
        inner.on_heartbeat(node_id, usage).await;
    }
    if heartbeat {
        inner.reconcile_if_returned(node_id).await;
    }
    true
}

/// Appends one checked chunk to its task's log, asking the agent to resend from the end
/// of what is stored when the chunk leaves a gap.
fn store_chunk(inner: &Inner, tx: &mpsc::Sender<std::sync::Arc<str>>, chunk: LogChunk, cap: u64) {
    let task = &chunk.task_id;
    // The agent's time, when it sends one, is when it read the bytes; it is held to
    // this controller's clock, since bytes cannot have been written after they arrived
    // and an agent's clock running ahead would otherwise put them in the future.
    let now = drover_core::now_millis();
    let at = chunk.at.map_or(now, |at| at.min(now));
    match inner
        .logs
        .append(task, chunk.stream, chunk.offset, &chunk.data, cap, at)
    {
        Ok(crate::logs::Appended::Stored) => inner.bump(),
        Ok(crate::logs::Appended::Duplicate) => {}
        Ok(crate::logs::Appended::Gap { have }) => {
            let resync = crate::frame(&ControllerMessage::LogResync {
                task_id: task.clone(),
                stream: chunk.stream,
                offset: have,
            });
            // A full queue is harmless: the agent's next chunk finds the same gap.
            if tx.try_send(resync).is_err() {
                tracing::debug!(task = %task, "log resync not queued: the connection is busy");
            }
        }
        Err(e) => tracing::warn!(task = %task, "storing log chunk: {e}"),
    }
}
