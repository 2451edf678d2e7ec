//! The SQLite store: one file, WAL journal, every commit one transaction.

use crate::{Change, Snapshot, Store, StoreError};
use async_trait::async_trait;
use drover_core::TaskState;
use drover_core::artifact::Artifact;
use drover_core::state::{Job, Node, Task};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};
use std::path::PathBuf;
use std::time::Duration;

/// How hard a commit tries to survive a crash.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// fsync on every commit: survives power loss. The default.
    #[default]
    Full,
    /// fsync at WAL checkpoints only: survives the controller being killed (the data is
    /// in the OS's cache), not the machine losing power. For benchmarks and tests.
    Process,
}

#[derive(Clone, Debug)]
pub struct SqliteConfig {
    /// The database file; created if missing. `None` means an in-memory database.
    pub path: Option<PathBuf>,
    pub durability: Durability,
}

/// Rows per multi-row task upsert: 8 parameters each stays well under SQLite's limit
/// of 32,766 bound parameters per statement.
const TASK_ROWS_PER_STATEMENT: usize = 500;

pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    pub async fn open(config: &SqliteConfig) -> Result<Self, StoreError> {
        let base = match &config.path {
            Some(p) => SqliteConnectOptions::new()
                .filename(p)
                .create_if_missing(true),
            // A single shared in-memory database; with more than one connection each
            // would otherwise see its own empty database.
            None => SqliteConnectOptions::new()
                .in_memory(true)
                .shared_cache(true),
        };
        let opts = base
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match config.durability {
                Durability::Full => SqliteSynchronous::Full,
                Durability::Process => SqliteSynchronous::Normal,
            })
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        // The controller is the only writer and serialises its commits, so one
        // connection is enough and avoids SQLite's writer lock contention entirely.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(opts)
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        Ok(SqliteStore { pool })
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Other(format!("encoding record: {e}")))
}

fn from_json<T: serde::de::DeserializeOwned>(id: &str, text: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt {
        id: id.to_string(),
        error: e.to_string(),
    })
}

#[async_trait]
impl Store for SqliteStore {
    async fn load(&self) -> Result<Snapshot, StoreError> {
        let mut snap = Snapshot::default();
        for row in sqlx::query("SELECT id, data FROM jobs")
            .fetch_all(&self.pool)
            .await?
        {
            let id: String = row.get(0);
            snap.jobs.push(from_json::<Job>(&id, row.get(1))?);
        }
        for row in sqlx::query("SELECT id, data FROM tasks")
            .fetch_all(&self.pool)
            .await?
        {
            let id: String = row.get(0);
            snap.tasks.push(from_json::<Task>(&id, row.get(1))?);
        }
        for row in sqlx::query("SELECT id, data FROM nodes")
            .fetch_all(&self.pool)
            .await?
        {
            let id: String = row.get(0);
            snap.nodes.push(from_json::<Node>(&id, row.get(1))?);
        }
        for row in sqlx::query(
            "SELECT project, name, version, data FROM artifacts \
             ORDER BY project, name, created_at, version",
        )
        .fetch_all(&self.pool)
        .await?
        {
            let (project, name, version): (String, String, String) =
                (row.get(0), row.get(1), row.get(2));
            let id = format!("artifact {project}/{name}:{version}");
            snap.artifacts.push(from_json::<Artifact>(&id, row.get(3))?);
        }
        for row in sqlx::query("SELECT name, data FROM projects ORDER BY name")
            .fetch_all(&self.pool)
            .await?
        {
            let name: String = row.get(0);
            snap.projects
                .push(from_json(&format!("project {name}"), row.get(1))?);
        }
        for row in sqlx::query("SELECT hash, data FROM tokens")
            .fetch_all(&self.pool)
            .await?
        {
            let hash: String = row.get(0);
            snap.tokens.push(from_json(&hash, row.get(1))?);
        }
        for row in sqlx::query("SELECT project, name, data FROM pipelines ORDER BY project, name")
            .fetch_all(&self.pool)
            .await?
        {
            let (project, name): (String, String) = (row.get(0), row.get(1));
            let id = format!("pipeline {project}/{name}");
            snap.pipelines.push(from_json(&id, row.get(2))?);
        }
        for row in sqlx::query(
            "SELECT project, pipeline, name, data FROM vertices ORDER BY project, pipeline, name",
        )
        .fetch_all(&self.pool)
        .await?
        {
            let (project, pipeline, name): (String, String, String) =
                (row.get(0), row.get(1), row.get(2));
            let id = format!("vertex {project}/{pipeline}/{name}");
            snap.vertices.push(from_json(&id, row.get(3))?);
        }
        Ok(snap)
    }

    async fn commit(&self, changes: &[Change]) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for change in changes {
            match change {
                Change::Job(j) => {
                    sqlx::query(
                        "INSERT INTO jobs (id, project, name, version, status, data, updated_at) \
                         VALUES (?, ?, ?, ?, ?, ?, ?) \
                         ON CONFLICT(id) DO UPDATE SET status = excluded.status, \
                         data = excluded.data, updated_at = excluded.updated_at",
                    )
                    .bind(j.id.as_str())
                    .bind(j.project.as_str())
                    .bind(&j.name)
                    .bind(j.version as i64)
                    .bind(j.status.as_str())
                    .bind(to_json(j)?)
                    .bind(j.updated_at)
                    .execute(&mut *tx)
                    .await?;
                }
                // Tasks are written below, many rows per statement.
                Change::Task(_) => {}
                Change::Node(n) => {
                    sqlx::query(
                        "INSERT INTO nodes (id, status, data) VALUES (?, ?, ?) \
                         ON CONFLICT(id) DO UPDATE SET status = excluded.status, data = excluded.data",
                    )
                    .bind(n.id.as_str())
                    .bind(n.status.to_string())
                    .bind(to_json(n)?)
                    .execute(&mut *tx)
                    .await?;
                }
                Change::Token(t) => {
                    sqlx::query(
                        "INSERT INTO tokens (hash, project, role, data) VALUES (?, ?, ?, ?) \
                         ON CONFLICT(hash) DO UPDATE SET role = excluded.role, data = excluded.data",
                    )
                    .bind(&t.hash)
                    .bind(t.project.as_str())
                    .bind(t.role.as_str())
                    .bind(to_json(t)?)
                    .execute(&mut *tx)
                    .await?;
                }
                Change::Project(p) => {
                    sqlx::query(
                        "INSERT INTO projects (name, data) VALUES (?, ?) \
                         ON CONFLICT(name) DO NOTHING",
                    )
                    .bind(p.name.as_str())
                    .bind(to_json(p)?)
                    .execute(&mut *tx)
                    .await?;
                }
                Change::Artifact(a) => {
                    // No upsert: an artifact version is written once. A second insert
                    // fails the statement, and dropping the transaction rolls back the
                    // whole commit.
                    let inserted = sqlx::query(
                        "INSERT INTO artifacts (project, name, version, data, created_at) \
                         VALUES (?, ?, ?, ?, ?)",
                    )
                    .bind(a.project.as_str())
                    .bind(&a.name)
                    .bind(&a.version)
                    .bind(to_json(a)?)
                    .bind(a.created_at)
                    .execute(&mut *tx)
                    .await;
                    match inserted {
                        Ok(_) => {}
                        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                            return Err(StoreError::Conflict(format!(
                                "artifact {}:{} already exists in project {}; artifact versions are immutable",
                                a.name, a.version, a.project
                            )));
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                Change::DeleteArtifact {
                    project,
                    name,
                    version,
                } => {
                    sqlx::query(
                        "DELETE FROM artifacts WHERE project = ? AND name = ? AND version = ?",
                    )
                    .bind(project.as_str())
                    .bind(name)
                    .bind(version)
                    .execute(&mut *tx)
                    .await?;
                }
                Change::Pipeline(p) => {
                    sqlx::query(
                        "INSERT INTO pipelines (project, name, data) VALUES (?, ?, ?) \
                         ON CONFLICT(project, name) DO UPDATE SET data = excluded.data",
                    )
                    .bind(p.project.as_str())
                    .bind(&p.name)
                    .bind(to_json(p)?)
                    .execute(&mut *tx)
                    .await?;
                }
                Change::Vertex(v) => {
                    sqlx::query(
                        "INSERT INTO vertices (project, pipeline, name, data) VALUES (?, ?, ?, ?) \
                         ON CONFLICT(project, pipeline, name) DO UPDATE SET data = excluded.data",
                    )
                    .bind(v.project.as_str())
                    .bind(&v.spec.pipeline)
                    .bind(&v.spec.name)
                    .bind(to_json(v)?)
                    .execute(&mut *tx)
                    .await?;
                }
                // Applied below, after the task upserts.
                Change::DeleteJob(_)
                | Change::DeleteTask(_)
                | Change::DeleteNode(_)
                | Change::DeletePipeline { .. }
                | Change::DeleteVertex { .. } => {}
            }
        }
        // One change per task survives: the furthest along, and of equals the last (a
        // multi-row upsert may not touch a row twice). One multi-row upsert per chunk
        // replaces a statement per row: each statement is a round trip to SQLite's
        // thread, which dominated large commits.
        let mut latest: std::collections::HashMap<&str, &Task> = std::collections::HashMap::new();
        let mut order: Vec<&str> = Vec::new();
        for c in changes {
            if let Change::Task(t) = c {
                match latest.get(t.id.as_str()) {
                    None => {
                        order.push(t.id.as_str());
                        latest.insert(t.id.as_str(), t);
                    }
                    Some(prev) if t.state.replaces(prev.state) => {
                        latest.insert(t.id.as_str(), t);
                    }
                    Some(_) => {}
                }
            }
        }
        let tasks: Vec<&Task> = order
            .iter()
            .filter_map(|id| latest.get(id).copied())
            .collect();
        for chunk in tasks.chunks(TASK_ROWS_PER_STATEMENT) {
            let mut rows = Vec::with_capacity(chunk.len());
            for t in chunk {
                rows.push((*t, to_json(*t)?));
            }
            let mut qb = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                "INSERT INTO tasks (id, project, job_id, state, state_rank, node_id, data, updated_at) ",
            );
            qb.push_values(rows.iter(), |mut b, (t, json)| {
                b.push_bind(t.id.as_str())
                    .push_bind(t.project.as_str())
                    .push_bind(t.job_id.as_str())
                    .push_bind(t.state.as_str())
                    .push_bind(t.state.rank() as i64)
                    .push_bind(t.node_id.as_ref().map(|n| n.as_str()))
                    .push_bind(json.as_str())
                    .push_bind(t.updated_at);
            });
            // The WHERE clause is `TaskState::replaces` in SQL, so the database holds to
            // it against any writer: terminal rows never change, and a lower rank never
            // overwrites a higher one. The store contract checks the two agree for
            // every pair of states.
            qb.push(format!(
                " ON CONFLICT(id) DO UPDATE SET state = excluded.state, \
                 state_rank = excluded.state_rank, node_id = excluded.node_id, \
                 data = excluded.data, updated_at = excluded.updated_at \
                 WHERE tasks.state_rank < {} AND excluded.state_rank >= tasks.state_rank",
                TaskState::TERMINAL_RANK
            ));
            qb.build().execute(&mut *tx).await?;
        }
        for change in changes {
            match change {
                Change::DeleteJob(id) => {
                    sqlx::query("DELETE FROM tasks WHERE job_id = ?")
                        .bind(id.as_str())
                        .execute(&mut *tx)
                        .await?;
                    sqlx::query("DELETE FROM jobs WHERE id = ?")
                        .bind(id.as_str())
                        .execute(&mut *tx)
                        .await?;
                }
                Change::DeleteTask(id) => {
                    sqlx::query("DELETE FROM tasks WHERE id = ?")
                        .bind(id.as_str())
                        .execute(&mut *tx)
                        .await?;
                }
                Change::DeleteNode(id) => {
                    sqlx::query("DELETE FROM nodes WHERE id = ?")
                        .bind(id.as_str())
                        .execute(&mut *tx)
                        .await?;
                }
                Change::DeletePipeline { project, name } => {
                    sqlx::query("DELETE FROM pipelines WHERE project = ? AND name = ?")
                        .bind(project.as_str())
                        .bind(name)
                        .execute(&mut *tx)
                        .await?;
                }
                Change::DeleteVertex {
                    project,
                    pipeline,
                    name,
                } => {
                    sqlx::query(
                        "DELETE FROM vertices WHERE project = ? AND pipeline = ? AND name = ?",
                    )
                    .bind(project.as_str())
                    .bind(pipeline)
                    .bind(name)
                    .execute(&mut *tx)
                    .await?;
                }
                _ => {}
            }
        }
        tx.commit().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::Reopen;
    use std::sync::Arc;

    /// A SQLite store in a temporary directory, opened afresh on every call, as a
    /// restarted controller would.
    struct Sqlite(tempfile::TempDir);

    #[async_trait]
    impl Reopen for Sqlite {
        async fn open(&self) -> Arc<dyn Store> {
            Arc::new(
                SqliteStore::open(&SqliteConfig {
                    path: Some(self.0.path().join("drover.db")),
                    durability: Durability::Full,
                })
                .await
                .expect("opening the SQLite store"),
            )
        }
    }

    fn fresh() -> Sqlite {
        Sqlite(tempfile::tempdir().expect("a temporary directory"))
    }

    crate::store_contract!(fresh());
}

#[cfg(test)]
mod timing {
    use super::*;
    use drover_core::{JobId, ProjectId, TaskId, TaskState};

    #[tokio::test]
    #[ignore = "a timing probe, not a test"]
    async fn commit_1000_tasks() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&SqliteConfig {
            path: Some(dir.path().join("d.db")),
            durability: Durability::Full,
        })
        .await
        .unwrap();
        for round in 0..5 {
            let changes: Vec<Change> = (0..1000)
                .map(|i| {
                    Change::Task(Task {
                        id: TaskId::generate(),
                        project: ProjectId::default(),
                        job_id: JobId::from("job-1"),
                        job_name: "j".into(),
                        index: i,
                        attempt: 0,
                        state: TaskState::Pending,
                        node_id: None,
                        reason: String::new(),
                        exit: None,
                        desired_stop: false,
                        stop_forced: false,
                        not_before: 0,
                        created_at: 1,
                        updated_at: 1,
                        ports: Vec::new(),
                        events: Vec::new(),
                    })
                })
                .collect();
            let t0 = std::time::Instant::now();
            store.commit(&changes).await.unwrap();
            eprintln!("round {round}: {:?}", t0.elapsed());
        }
    }
}
