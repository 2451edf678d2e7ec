//! Drover's durable store.
//!
//! The controller is the only writer. It keeps its working state in memory and writes
//! every change through [`Store::commit`] before acknowledging it, so that after a crash
//! [`Store::load`] gives back everything that was acknowledged. The store enforces the
//! task state machine's forward-only rule on its own as well: a commit can never move a
//! stored task backwards or out of a terminal state.

pub mod contract;
mod sqlite;

pub use sqlite::{Durability, SqliteConfig, SqliteStore};

use async_trait::async_trait;
use drover_core::artifact::Artifact;
use drover_core::auth::{Project, TokenView};
use drover_core::pipeline::{Pipeline, Vertex};
use drover_core::state::{Job, Node, Task};
use drover_core::{JobId, Millis, NodeId, ProjectId, TaskId};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Db(#[from] sqlx::Error),
    #[error("store migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("store: corrupt record {id}: {error}")]
    Corrupt { id: String, error: String },
    /// The commit would overwrite something that may only be written once (an artifact
    /// version); nothing in the commit was written.
    #[error("store: {0}")]
    Conflict(String),
    #[error("store: {0}")]
    Other(String),
}

/// One write; a commit applies a batch of them in one transaction.
// Changes live only for the length of one commit, so boxing the larger variants would
// cost an allocation each for no memory saved.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Change {
    Job(Job),
    Task(Task),
    Node(Node),
    /// A token, new or changed (revoked); tokens are never deleted, so a revoked one
    /// stays listed.
    Token(TokenRecord),
    /// A new project. Projects are not renamed or removed.
    Project(Project),
    /// A new artifact version. Artifacts are immutable: if the same project, name and
    /// version is already stored, the whole commit fails with [`StoreError::Conflict`].
    Artifact(Artifact),
    /// Removes an artifact version; removing one that is not stored changes nothing.
    DeleteArtifact {
        project: ProjectId,
        name: String,
        version: String,
    },
    /// Removes a job version and every task of it (garbage collection of finished
    /// work). Deletions are applied after every other change of the commit, so a task
    /// written and deleted by one commit is gone.
    DeleteJob(JobId),
    /// Removes one task (an old attempt of a job that goes on).
    DeleteTask(TaskId),
    /// Removes a node registration; its tasks keep the node's id as history.
    DeleteNode(NodeId),
    /// A pipeline, new or changed; one is stored per project and name.
    Pipeline(Pipeline),
    /// A vertex, new or changed; one is stored per project, pipeline and name.
    Vertex(Vertex),
    /// Removes a pipeline; its vertices are removed by their own changes.
    DeletePipeline {
        project: ProjectId,
        name: String,
    },
    /// Removes one vertex of a pipeline.
    DeleteVertex {
        project: ProjectId,
        pipeline: String,
        name: String,
    },
}

/// Everything the controller needs to rebuild its state at start-up.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub jobs: Vec<Job>,
    pub tasks: Vec<Task>,
    pub nodes: Vec<Node>,
    pub artifacts: Vec<Artifact>,
    pub projects: Vec<Project>,
    pub tokens: Vec<TokenRecord>,
    pub pipelines: Vec<Pipeline>,
    pub vertices: Vec<Vertex>,
}

pub use drover_core::auth::Role;

/// A stored token. Only the SHA-256 of the secret is kept.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub hash: String,
    pub project: ProjectId,
    pub role: Role,
    pub name: String,
    pub created_at: Millis,
    pub revoked: bool,
}

/// The hex SHA-256 of a token secret, the form in which tokens are stored and looked up.
impl TokenRecord {
    /// The token's public identifier: the first hex digits of its hash, which say
    /// nothing about the secret.
    pub fn id(&self) -> &str {
        self.hash.get(..TOKEN_ID_LEN).unwrap_or(&self.hash)
    }

    pub fn view(&self) -> TokenView {
        TokenView {
            id: self.id().to_string(),
            name: self.name.clone(),
            project: self.project.clone(),
            role: self.role,
            created_at: self.created_at,
            revoked: self.revoked,
        }
    }
}

/// How many hex digits of a token's hash make its public id: 48 bits, so two tokens of
/// one cluster sharing an id is beyond likely.
pub const TOKEN_ID_LEN: usize = 12;

pub fn hash_token(secret: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(secret.as_bytes()))
}

#[async_trait]
pub trait Store: Send + Sync {
    /// Reads everything back, as at start-up.
    async fn load(&self) -> Result<Snapshot, StoreError>;

    /// Applies all changes in one transaction: all of them are durable, or none.
    /// Task changes that would move a stored task backwards are skipped.
    async fn commit(&self, changes: &[Change]) -> Result<(), StoreError>;
}
