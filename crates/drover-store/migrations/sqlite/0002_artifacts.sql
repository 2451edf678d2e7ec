-- Artifact versions. They are immutable, so the key is the whole identity and a second
-- insert of the same version fails instead of replacing the first.
CREATE TABLE IF NOT EXISTS artifacts (
    project TEXT NOT NULL,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    data TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (project, name, version)
);
