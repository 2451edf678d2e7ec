//! Projects and tokens over HTTP: creating and listing projects (cluster admin), and
//! creating, listing and revoking tokens (a project's admins, or the cluster admin).
//! Cluster-level tokens (cluster admin and join tokens) are the cluster admin's alone,
//! and the last active cluster admin token cannot be revoked.

use crate::auth::{Action, Principal, forbidden, no_such_project};
use crate::error::{ApiError, ApiResult};
use crate::{Inner, Tx};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use drover_core::ProjectId;
use drover_core::api::ErrorCode;
use drover_core::auth::{
    CreatedToken, NewProject, NewToken, Project, Role, TokenView, parse_project_name,
};
use drover_store::{Change, Store, StoreError, TokenRecord, hash_token};
use std::sync::Arc;

type Shared = State<Arc<Inner>>;

fn bad_request(code: ErrorCode, message: String) -> ApiError {
    ApiError::new(code, message)
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> ApiResult<T> {
    serde_json::from_slice(body)
        .map_err(|e| bad_request(ErrorCode::InvalidRequest, format!("{what}: {e}")))
}

pub(crate) async fn create_project(
    State(inner): Shared,
    Extension(p): Extension<Principal>,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    p.require(Action::Cluster)?;
    let new: NewProject = parse_body(&body, "invalid project")?;
    let name = parse_project_name(new.name.trim()).map_err(|e| {
        bad_request(
            ErrorCode::InvalidRequest,
            format!("invalid project: name: {e}"),
        )
    })?;
    let mut state = inner.state.lock().await;
    if state.projects.contains_key(&name) {
        return Err(ApiError::new(
            ErrorCode::Exists,
            format!("project {name} already exists"),
        ));
    }
    let project = Project {
        name,
        created_at: inner.now(),
    };
    let mut tx = Tx::default();
    tx.put(&mut state, Change::Project(project.clone()));
    inner.commit(&mut state, tx).await?;
    tracing::info!(project = %project.name, "project created");
    Ok((StatusCode::CREATED, Json(project)).into_response())
}

/// Every project for the cluster admin; the caller's own for anyone else.
pub(crate) async fn list_projects(
    State(inner): Shared,
    Extension(p): Extension<Principal>,
) -> ApiResult<Json<Vec<Project>>> {
    p.require(Action::Read)?;
    let state = inner.state.lock().await;
    Ok(Json(
        state
            .projects
            .values()
            .filter(|proj| p.sees(&proj.name))
            .cloned()
            .collect(),
    ))
}

/// A new random secret: 192 bits, with a prefix that says what it is when it turns up
/// in a log or a leaked file.
fn new_secret() -> String {
    let bytes: [u8; 24] = rand::random();
    format!("drv_{}", hex::encode(bytes))
}

pub(crate) async fn create_token(
    State(inner): Shared,
    Extension(p): Extension<Principal>,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    p.require(Action::ManageTokens)?;
    let new: NewToken = parse_body(&body, "invalid token request")?;
    let project = match new.project.as_deref().map(str::trim) {
        Some(name) if !name.is_empty() => ProjectId(name.to_string()),
        _ => p.project.clone(),
    };
    // A project admin makes tokens for its own project only, and never for a project
    // it cannot see (answered as not found, like every other object of another project).
    if !p.sees(&project) {
        return Err(ApiError::not_found(&format!("project \"{project}\"")));
    }
    match new.role {
        Role::Admin | Role::Write | Role::Read => {}
        Role::Cluster | Role::Agent if p.is_cluster_admin() => {}
        other => {
            return Err(forbidden(format!(
                "role: only a cluster admin may create {other} tokens; a project admin may create admin, write or read"
            )));
        }
    }
    let name = new
        .name
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| format!("{}-{}", project, new.role));
    if name.len() > 200 || name.chars().any(char::is_control) {
        return Err(bad_request(ErrorCode::InvalidRequest,
            "invalid token request: name: expected at most 200 characters and no control characters".into(),
        ));
    }
    let mut state = inner.state.lock().await;
    if !state.projects.contains_key(&project) {
        return Err(no_such_project(&project));
    }
    let secret = new_secret();
    let record = TokenRecord {
        hash: hash_token(&secret),
        project,
        role: new.role,
        name,
        created_at: inner.now(),
        revoked: false,
    };
    let mut tx = Tx::default();
    tx.put(&mut state, Change::Token(record.clone()));
    inner.commit(&mut state, tx).await?;
    inner.remember_token(record.clone());
    tracing::info!(token = record.id(), project = %record.project, role = %record.role, "token created");
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            token: secret,
            view: record.view(),
        }),
    )
        .into_response())
}

pub(crate) async fn list_tokens(
    State(inner): Shared,
    Extension(p): Extension<Principal>,
) -> ApiResult<Json<Vec<TokenView>>> {
    p.require(Action::ManageTokens)?;
    let mut list: Vec<TokenView> = inner
        .all_tokens()
        .into_iter()
        .filter(|t| p.sees_token(t))
        .map(|t| t.view())
        .collect();
    list.sort_by(|a, b| (&a.project, a.created_at, &a.id).cmp(&(&b.project, b.created_at, &b.id)));
    Ok(Json(list))
}

/// Revokes a token by its id. It stays listed, marked revoked; the next request made
/// with it is refused. A token the caller may not see answers 404, exactly as an
/// unknown id does. The last active cluster-admin token is never revoked: without one
/// nothing could manage the cluster again short of `--reset-admin-token` on its host.
pub(crate) async fn revoke_token(
    State(inner): Shared,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<Json<TokenView>> {
    p.require(Action::ManageTokens)?;
    // Every creation and revocation changes the tokens while holding the state lock, so
    // under it the count of active cluster-admin tokens below cannot change before this
    // revocation is committed: two revocations racing for the last two cannot both pass.
    let mut state = inner.state.lock().await;
    let tokens = inner.all_tokens();
    let found = tokens
        .iter()
        .find(|t| t.id() == id && p.sees_token(t))
        .cloned()
        .ok_or_else(|| ApiError::not_found(&format!("token {id:?}")))?;
    if found.revoked {
        return Ok(Json(found.view()));
    }
    if found.role == Role::Cluster {
        let active = tokens
            .iter()
            .filter(|t| t.role == Role::Cluster && !t.revoked)
            .count();
        if active <= 1 {
            return Err(ApiError::new(
                ErrorCode::LastClusterAdmin,
                format!(
                    "token {id} is the last active cluster admin token; revoking it would leave nothing able to manage the cluster. Create another first (`drover token create --role cluster`), then revoke this one"
                ),
            ));
        }
    }
    let revoked = TokenRecord {
        revoked: true,
        ..found
    };
    let mut tx = Tx::default();
    tx.put(&mut state, Change::Token(revoked.clone()));
    inner.commit(&mut state, tx).await?;
    inner.remember_token(revoked.clone());
    tracing::info!(token = revoked.id(), project = %revoked.project, role = %revoked.role, "token revoked");
    Ok(Json(revoked.view()))
}

/// Makes a new cluster-admin secret and stores it, hashed, as an active cluster token,
/// writing straight to the store. This is the way back into a cluster whose
/// cluster-admin tokens were all revoked or lost, so it asks for no token: whoever can
/// open the controller's store (its host and data directory) already holds everything.
/// A running controller answers requests from the tokens it loaded at start-up, so it
/// accepts the new secret only after it restarts.
pub async fn reset_admin_token(store: &dyn Store) -> Result<(String, TokenRecord), StoreError> {
    let secret = new_secret();
    let record = TokenRecord {
        hash: hash_token(&secret),
        project: ProjectId::default(),
        role: Role::Cluster,
        name: "admin-reset".into(),
        created_at: drover_core::now_millis(),
        revoked: false,
    };
    store.commit(&[Change::Token(record.clone())]).await?;
    tracing::info!(token = record.id(), "cluster admin token reset");
    Ok((secret, record))
}
