//! The error every API handler answers with: one of core's [`ErrorCode`]s and a
//! message, rendered as an [`ErrorBody`] with the code's HTTP status. A module of its
//! own so that the handlers' modules (routes, artifacts, tenants, auth, retention)
//! depend on it and not on each other.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use drover_core::api::{ErrorBody, ErrorCode};

#[derive(Debug)]
pub(crate) struct ApiError {
    code: ErrorCode,
    message: String,
}

impl ApiError {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }

    pub(crate) fn not_found(what: &str) -> Self {
        ApiError::new(ErrorCode::NotFound, format!("{what} not found"))
    }
}

impl From<drover_store::StoreError> for ApiError {
    fn from(e: drover_store::StoreError) -> Self {
        if let drover_store::StoreError::Conflict(m) = e {
            return ApiError::new(ErrorCode::Exists, m);
        }
        ApiError::new(ErrorCode::StoreUnavailable, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // Every code has a valid status; the fallback only guards the conversion.
        let status =
            StatusCode::from_u16(self.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (
            status,
            Json(ErrorBody {
                error: self.message,
                code: self.code.to_string(),
            }),
        )
            .into_response()
    }
}

pub(crate) type ApiResult<T> = Result<T, ApiError>;
