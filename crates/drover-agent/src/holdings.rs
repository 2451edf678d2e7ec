//! What the node holds for all its tasks, which the task manager owns and the prepare
//! steps draw on: the task users, the pool of task directories, the queue of retired
//! ones, the artifact cache and the Python environments.
//!
//! It is a module of its own so that the prepare steps get exactly these parts and not
//! the task manager that runs them.

use crate::artifacts::ArtifactCache;
use crate::dirpool::DirPool;
use crate::users::TaskUsers;
use drover_core::platform::{BinaryPlatform, NodePlatform, Platform, runs_emulated, runs_on};
use drover_core::protocol::TaskAssignment;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// The parts of the node that tasks' preparations take from and give back to.
pub(crate) struct Holdings {
    /// The users process tasks run as; `None` runs them as the agent's own user.
    pub users: Option<Arc<TaskUsers>>,
    pub pool: DirPool,
    pub retired: RetireQueue,
    pub artifacts: ArtifactSupport,
    /// What vertex replicas need: the buffer calls' link, NATS connections, counters.
    pub vertices: Arc<crate::vertex::VertexSupport>,
}

/// Directories of finished tasks waiting to be recycled, oldest first, each with when
/// it was retired.
pub(crate) type RetireQueue = Arc<Mutex<VecDeque<(std::time::Instant, PathBuf)>>>;

/// What the task manager needs to give tasks their artifacts and runtime environments.
pub struct ArtifactSupport {
    /// Artifact blobs and working_dir archives, by digest.
    pub cache: Arc<ArtifactCache>,
    /// The node's Python environments.
    pub python: Arc<crate::pyenv::PythonEnvs>,
    /// This node's platform, to check a file before it is run; `None` when the machine
    /// is one Drover does not know, and then no check is made.
    pub node: Option<NodePlatform>,
    /// The platforms this node runs through an emulator, each with the emulator's
    /// resolved executable.
    pub emulate: Vec<(Platform, PathBuf)>,
}

impl ArtifactSupport {
    /// The emulator a binary needs here: `None` when the node runs it natively (or it
    /// runs nowhere here, which the format check reports), else the emulated platform
    /// and its emulator.
    pub(crate) fn emulator(&self, binary: &BinaryPlatform) -> Option<(&Platform, &PathBuf)> {
        if self
            .node
            .as_ref()
            .is_some_and(|n| runs_on(binary, n).is_some())
        {
            return None;
        }
        let platforms: Vec<Platform> = self.emulate.iter().map(|(p, _)| p.clone()).collect();
        let found = runs_emulated(binary, &platforms)?;
        self.emulate
            .iter()
            .find(|(p, _)| p == found)
            .map(|(p, i)| (p, i))
    }

    /// What a task's status says when its artifact runs under emulation.
    pub(crate) fn emulation_note(&self, a: &TaskAssignment, verb: &str) -> Option<String> {
        let art = a.artifact.as_ref()?;
        let (platform, interpreter) = self.emulator(&art.variant.platform)?;
        let name = interpreter
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| interpreter.display().to_string());
        Some(format!("{verb} {platform} under emulation ({name})"))
    }
}
