-- Projects (tenants). `default` is created by the controller at start-up.
CREATE TABLE IF NOT EXISTS projects (
    name TEXT PRIMARY KEY,
    data TEXT NOT NULL
);

-- Before projects, the only admin tokens were the bootstrap ones, and they could do
-- everything in every project: that is the cluster role now, while "admin" means the
-- admin of one project.
UPDATE tokens
SET role = 'cluster', data = json_set(data, '$.role', 'cluster')
WHERE role = 'admin';
