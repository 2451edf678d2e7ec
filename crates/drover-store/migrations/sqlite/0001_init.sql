-- Each object is kept as JSON in `data`, with the columns the store filters or
-- enforces rules on pulled out beside it.
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    project TEXT NOT NULL,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    status TEXT NOT NULL,
    data TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_name ON jobs (project, name);

CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    project TEXT NOT NULL,
    job_id TEXT NOT NULL,
    state TEXT NOT NULL,
    state_rank INTEGER NOT NULL,
    node_id TEXT,
    data TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_by_job ON tasks (job_id);

CREATE TABLE IF NOT EXISTS nodes (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    data TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS tokens (
    hash TEXT PRIMARY KEY,
    project TEXT NOT NULL,
    role TEXT NOT NULL,
    data TEXT NOT NULL
);
