-- Pipelines, one row per project and name (the current version), and their vertices,
-- which only the pipeline controller writes.
CREATE TABLE IF NOT EXISTS pipelines (
    project TEXT NOT NULL,
    name TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (project, name)
);

CREATE TABLE IF NOT EXISTS vertices (
    project TEXT NOT NULL,
    pipeline TEXT NOT NULL,
    name TEXT NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (project, pipeline, name)
);
