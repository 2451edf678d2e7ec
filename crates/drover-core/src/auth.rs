//! Projects (tenants), the roles a token can have, and the API's views of both.

use crate::Millis;
use crate::ids::ProjectId;
use serde::{Deserialize, Serialize};

/// The header a cluster admin sets to act inside one project; a project token may set it
/// only to its own project.
pub const PROJECT_HEADER: &str = "drover-project";

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything, in every project, plus the cluster's own things: projects, nodes'
    /// environment caches, metrics.
    Cluster,
    /// Everything inside its project, including creating and revoking its tokens.
    Admin,
    /// Read and change the objects of its project.
    Write,
    /// Read the objects of its project.
    Read,
    /// Join the cluster as an agent; nothing else.
    Agent,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Cluster,
        Role::Admin,
        Role::Write,
        Role::Read,
        Role::Agent,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Cluster => "cluster",
            Role::Admin => "admin",
            Role::Write => "write",
            Role::Read => "read",
            Role::Agent => "agent",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// Whether a token of this role serves the whole cluster rather than one project:
    /// the cluster admin's and the agents' join tokens. Only a cluster admin sees,
    /// makes or revokes these, whatever project they are filed under.
    pub fn is_cluster_level(self) -> bool {
        matches!(self, Role::Cluster | Role::Agent)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A tenant: jobs, tasks, artifacts and tokens each belong to exactly one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Project {
    pub name: ProjectId,
    pub created_at: Millis,
}

/// The body of `POST /v1/projects`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewProject {
    pub name: String,
}

/// The body of `POST /v1/tokens`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    /// The token's project; the caller's own when absent.
    #[serde(default)]
    pub project: Option<String>,
    pub role: Role,
    /// A label to recognise the token by in listings; not secret.
    #[serde(default)]
    pub name: Option<String>,
}

/// A token as listings show it: never its secret.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenView {
    /// A short public identifier (the first hex digits of the secret's SHA-256), used to
    /// revoke the token.
    pub id: String,
    pub name: String,
    pub project: ProjectId,
    pub role: Role,
    pub created_at: Millis,
    pub revoked: bool,
}

/// The answer to `POST /v1/tokens`: the only time the secret is shown.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CreatedToken {
    pub token: String,
    #[serde(flatten)]
    pub view: TokenView,
}

/// The longest project name: a DNS label, so it can name things outside Drover too.
pub const MAX_PROJECT_NAME: usize = 63;

/// Checks a project name: 1 to 63 lowercase letters, digits and '-', not starting or
/// ending with '-'.
pub fn parse_project_name(s: &str) -> Result<ProjectId, String> {
    let ok_chars = s
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if s.is_empty()
        || s.len() > MAX_PROJECT_NAME
        || !ok_chars
        || s.starts_with('-')
        || s.ends_with('-')
    {
        return Err(format!(
            "project name {s:?}: expected 1 to {MAX_PROJECT_NAME} lowercase letters, digits and '-', not starting or ending with '-'"
        ));
    }
    Ok(ProjectId(s.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_names_are_dns_labels() {
        for good in ["a", "team-a", "x1", &"a".repeat(63)] {
            assert!(parse_project_name(good).is_ok(), "{good}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a b", "ü", &"a".repeat(64)] {
            let e = parse_project_name(bad).unwrap_err();
            assert!(e.contains("project name"), "{bad}: {e}");
        }
    }

    #[test]
    fn roles_round_trip_through_their_names() {
        for r in Role::ALL {
            assert_eq!(Role::parse(r.as_str()), Some(r));
            assert_eq!(
                serde_json::to_string(&r).unwrap(),
                format!("\"{}\"", r.as_str())
            );
        }
        assert_eq!(Role::parse("root"), None);
    }
}
