//! Who is calling and what they may do: the bearer-token middleware that turns a
//! request into a [`Principal`], and the one role × action table every handler asks.
//! Rules about who may see or change what live here and nowhere else; a handler parses
//! its input, asks [`Principal::require`] (and [`Principal::sees`] for each object), and
//! renders the answer.

use crate::Inner;
use crate::error::{ApiError, ApiResult};
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use drover_core::ProjectId;
use drover_core::api::ErrorCode;
use drover_core::auth::PROJECT_HEADER;
use drover_store::{Role, TokenRecord, hash_token};
use std::sync::Arc;

/// Who is calling, from their token.
#[derive(Clone, Debug)]
pub struct Principal {
    /// The project the caller acts in: its token's, or for a cluster admin the one named
    /// by the `drover-project` header (else `default`).
    pub project: ProjectId,
    pub role: Role,
    /// Whether a cluster admin named a project, which narrows what it sees to that one.
    pub pinned: bool,
}

/// What a request does, as far as permission goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Action {
    /// Read the objects of the caller's project: jobs, tasks, logs, artifacts, nodes.
    Read,
    /// Change them: submit and stop jobs, push and delete artifacts, upload blobs.
    Write,
    /// Create, list and revoke the tokens of the caller's project.
    ManageTokens,
    /// The cluster's own things: projects, nodes, their environment caches, metrics.
    Cluster,
    /// Download a blob: users of the project that may use it, and agents fetching
    /// what their tasks need.
    ReadBlobs,
    /// Connect an agent to the agent gateway.
    Join,
}

impl Action {
    #[cfg(test)]
    pub(crate) const ALL: [Action; 6] = [
        Action::Read,
        Action::Write,
        Action::ManageTokens,
        Action::Cluster,
        Action::ReadBlobs,
        Action::Join,
    ];
}

/// The table: which roles may do each action, and what the others are told. A match,
/// so an action added to [`Action`] cannot be left out of it.
fn rule(action: Action) -> (&'static [Role], &'static str) {
    match action {
        Action::Read => (
            &[Role::Cluster, Role::Admin, Role::Write, Role::Read],
            "a join token can only connect agents and download blobs",
        ),
        Action::Write => (
            &[Role::Cluster, Role::Admin, Role::Write],
            "this token may only read",
        ),
        Action::ManageTokens => (
            &[Role::Cluster, Role::Admin],
            "only a project admin or cluster admin token may manage tokens",
        ),
        Action::Cluster => (&[Role::Cluster], "only a cluster admin token may do this"),
        Action::ReadBlobs => (
            &[
                Role::Cluster,
                Role::Admin,
                Role::Write,
                Role::Read,
                Role::Agent,
            ],
            "this token may not read blobs",
        ),
        Action::Join => (
            &[Role::Agent, Role::Cluster],
            "only a join token or the cluster admin's may connect an agent",
        ),
    }
}

/// Whether `role` may do `action`, and if not, why.
pub(crate) fn allows(role: Role, action: Action) -> Result<(), &'static str> {
    let (roles, refusal) = rule(action);
    if roles.contains(&role) {
        return Ok(());
    }
    // A join token may do nothing but join and fetch blobs; saying so helps the
    // operator who pasted the wrong token more than the action's own refusal.
    if role == Role::Agent {
        return Err("a join token can only connect agents and download blobs");
    }
    Err(refusal)
}

pub(crate) fn forbidden(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::Forbidden, message)
}

/// The answer for a project that does not exist, saying how to make it.
pub(crate) fn no_such_project(project: &ProjectId) -> ApiError {
    ApiError::not_found(&format!(
        "project \"{project}\" (create it with `drover project create {project}`)"
    ))
}

impl Principal {
    /// Refuses the request with 403 unless the caller's role may do `action`.
    pub(crate) fn require(&self, action: Action) -> Result<(), ApiError> {
        allows(self.role, action).map_err(forbidden)
    }

    /// Whether the caller may see an object of `project`. Everything a caller may not
    /// see answers as if it did not exist (404), so one project cannot even learn the
    /// names another uses.
    pub(crate) fn sees(&self, project: &ProjectId) -> bool {
        (self.role == Role::Cluster && !self.pinned) || &self.project == project
    }

    pub(crate) fn is_cluster_admin(&self) -> bool {
        self.role == Role::Cluster
    }

    /// Whether the caller may see (and so list or revoke) a token. Cluster-level tokens
    /// (the cluster admin's and the join tokens) are filed under project `default`, but
    /// they open the whole cluster, so a project admin, even of `default`, must not see
    /// them: otherwise it could revoke them and lock the cluster admin out.
    pub(crate) fn sees_token(&self, t: &TokenRecord) -> bool {
        self.sees(&t.project) && (!t.role.is_cluster_level() || self.is_cluster_admin())
    }

    /// Whether the caller may read any blob rather than only its project's: agents fetch
    /// every project's, and a cluster admin sees all.
    pub(crate) fn reads_all_blobs(&self) -> bool {
        matches!(self.role, Role::Agent) || (self.role == Role::Cluster && !self.pinned)
    }
}

impl Inner {
    /// Finds a token by its secret. Every token is in memory from start-up on, and
    /// creation and revocation keep it current.
    fn lookup_token(&self, secret: &str) -> Option<TokenRecord> {
        let hash = hash_token(secret);
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&hash)
            .cloned()
    }

    /// Records a committed token, new or changed.
    pub(crate) fn remember_token(&self, t: TokenRecord) {
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(t.hash.clone(), t);
    }

    /// Checks the token an agent connects with.
    pub(crate) fn check_join_token(&self, secret: &str) -> Result<(), ApiError> {
        match self.lookup_token(secret) {
            Some(t) if !t.revoked && allows(t.role, Action::Join).is_ok() => Ok(()),
            _ => Err(ApiError::new(ErrorCode::Unauthorized, "invalid join token")),
        }
    }

    pub(crate) fn all_tokens(&self) -> Vec<TokenRecord> {
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

/// The middleware in front of every authenticated route: a bearer token, and the
/// project header a cluster admin may add, become the request's [`Principal`].
pub(crate) async fn authenticate(
    State(inner): State<Arc<Inner>>,
    mut req: Request,
    next: Next,
) -> Response {
    let secret = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .map(str::to_string);
    let Some(secret) = secret else {
        return ApiError::new(
            ErrorCode::Unauthorized,
            "missing bearer token: pass --token or set DROVER_TOKEN",
        )
        .into_response();
    };
    let asked = match req.headers().get(PROJECT_HEADER).map(|v| v.to_str()) {
        None => None,
        Some(Ok(v)) if !v.trim().is_empty() => Some(v.trim().to_string()),
        Some(_) => {
            return ApiError::new(
                ErrorCode::InvalidProject,
                format!("header {PROJECT_HEADER}: expected a project name"),
            )
            .into_response();
        }
    };
    match inner.lookup_token(&secret) {
        Some(t) if !t.revoked => {
            let principal = match principal_for(&inner, &t, asked).await {
                Ok(p) => p,
                Err(e) => return e.into_response(),
            };
            req.extensions_mut().insert(principal);
            next.run(req).await
        }
        _ => ApiError::new(ErrorCode::Unauthorized, "invalid or revoked token").into_response(),
    }
}

/// Who a valid token's holder is, in the project they asked for.
async fn principal_for(
    inner: &Inner,
    t: &TokenRecord,
    asked: Option<String>,
) -> ApiResult<Principal> {
    let own = Principal {
        project: t.project.clone(),
        role: t.role,
        pinned: false,
    };
    match asked {
        None => Ok(own),
        // A project token acts only in its own project, and is not told whether the
        // other one exists.
        Some(asked) if t.role != Role::Cluster => {
            if asked == t.project.as_str() {
                Ok(own)
            } else {
                Err(forbidden(format!(
                    "this token belongs to project {}; it cannot act in project {asked}",
                    t.project
                )))
            }
        }
        Some(asked) => {
            let project = ProjectId(asked);
            if !inner.state.lock().await.projects.contains_key(&project) {
                return Err(no_such_project(&project));
            }
            Ok(Principal {
                project,
                pinned: true,
                ..own
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole table spelled out, so a change to who may do what shows up here.
    #[test]
    fn the_role_action_table() {
        use Action::*;
        let expect: [(Role, &[Action]); 5] = [
            (
                Role::Cluster,
                &[Read, Write, ManageTokens, Cluster, ReadBlobs, Join],
            ),
            (Role::Admin, &[Read, Write, ManageTokens, ReadBlobs]),
            (Role::Write, &[Read, Write, ReadBlobs]),
            (Role::Read, &[Read, ReadBlobs]),
            (Role::Agent, &[ReadBlobs, Join]),
        ];
        for (role, may) in expect {
            for action in Action::ALL {
                assert_eq!(
                    allows(role, action).is_ok(),
                    may.contains(&action),
                    "{role:?} {action:?}"
                );
            }
        }
        assert_eq!(
            allows(Role::Agent, Write),
            Err("a join token can only connect agents and download blobs")
        );
        assert_eq!(allows(Role::Read, Write), Err("this token may only read"));
    }
}
