//! The agent's side of its controller connection, as the rest of the agent sees it:
//! a way to send a message now if connected, without waiting.

use drover_core::protocol::AgentMessage;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

#[derive(Clone, Default)]
pub struct Link {
    tx: Arc<Mutex<Option<mpsc::Sender<AgentMessage>>>>,
}

impl Link {
    /// Queues a message on the current connection. Returns false when there is no
    /// connection or its queue is full; callers keep what they could not send (events
    /// stay in the outbox, log offsets do not advance) and send it again later.
    pub fn send(&self, msg: AgentMessage) -> bool {
        let guard = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        match guard.as_ref() {
            Some(tx) => tx.try_send(msg).is_ok(),
            None => false,
        }
    }

    pub fn set(&self, tx: Option<mpsc::Sender<AgentMessage>>) {
        *self.tx.lock().unwrap_or_else(|p| p.into_inner()) = tx;
    }

    pub fn is_connected(&self) -> bool {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }
}
