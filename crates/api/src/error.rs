//! The one table of API errors. Every error the API returns has a stable snake_case
//! code and exactly one HTTP status; the body is `{"error": {"code", "message"}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

/// Every error code the API can return. Adding one means adding its row to both
/// matches below; there is deliberately no catch-all arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    Unauthorized,
    Forbidden,
    NotFound,
    TeamNotFound,
    AppNotFound,
    RevisionNotFound,
    AmbiguousRevision,
    InvalidRequest,
    MethodNotAllowed,
    UnsupportedMediaType,
    InvalidManifest,
    InvalidArchive,
    ArchiveTooLarge,
    CurrentRevision,
    Conflict,
    RunnerNotFound,
    AmbiguousRunner,
    NoRevision,
    Suspended,
    RunnerLost,
    RolloutForced,
    /// The server that runs the app does not answer (another takes it over within the
    /// lease time).
    OwnerUnavailable,
    StartTimeout,
    RequestTimeout,
    RequestNotFound,
    PayloadTooLarge,
    /// A request target longer than the server reads.
    UriTooLong,
    /// A request head (its line and headers) larger than the server reads.
    HeadersTooLarge,
    AlreadyCompleted,
    NotCompleted,
    RequestCancelled,
    ResultTooLarge,
    Internal,
}

impl ErrorCode {
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::TeamNotFound => StatusCode::NOT_FOUND,
            ErrorCode::AppNotFound => StatusCode::NOT_FOUND,
            ErrorCode::RevisionNotFound => StatusCode::NOT_FOUND,
            ErrorCode::AmbiguousRevision => StatusCode::BAD_REQUEST,
            ErrorCode::InvalidRequest => StatusCode::BAD_REQUEST,
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::InvalidManifest => StatusCode::BAD_REQUEST,
            ErrorCode::InvalidArchive => StatusCode::BAD_REQUEST,
            ErrorCode::ArchiveTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::CurrentRevision => StatusCode::CONFLICT,
            ErrorCode::Conflict => StatusCode::CONFLICT,
            ErrorCode::RunnerNotFound => StatusCode::NOT_FOUND,
            ErrorCode::AmbiguousRunner => StatusCode::BAD_REQUEST,
            ErrorCode::NoRevision => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Suspended => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::RunnerLost => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::RolloutForced => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::OwnerUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::StartTimeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorCode::RequestTimeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorCode::RequestNotFound => StatusCode::NOT_FOUND,
            ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::UriTooLong => StatusCode::URI_TOO_LONG,
            ErrorCode::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ErrorCode::AlreadyCompleted => StatusCode::BAD_REQUEST,
            ErrorCode::NotCompleted => StatusCode::BAD_REQUEST,
            ErrorCode::RequestCancelled => StatusCode::BAD_REQUEST,
            ErrorCode::ResultTooLarge => StatusCode::BAD_GATEWAY,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::TeamNotFound => "team_not_found",
            ErrorCode::AppNotFound => "app_not_found",
            ErrorCode::RevisionNotFound => "revision_not_found",
            ErrorCode::AmbiguousRevision => "ambiguous_revision",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::InvalidManifest => "invalid_manifest",
            ErrorCode::InvalidArchive => "invalid_archive",
            ErrorCode::ArchiveTooLarge => "archive_too_large",
            ErrorCode::CurrentRevision => "current_revision",
            ErrorCode::Conflict => "conflict",
            ErrorCode::RunnerNotFound => "runner_not_found",
            ErrorCode::AmbiguousRunner => "ambiguous_runner",
            ErrorCode::NoRevision => "no_revision",
            ErrorCode::Suspended => "suspended",
            ErrorCode::RunnerLost => "runner_lost",
            ErrorCode::RolloutForced => "rollout_forced",
            ErrorCode::OwnerUnavailable => "owner_unavailable",
            ErrorCode::StartTimeout => "start_timeout",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::RequestNotFound => "request_not_found",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::UriTooLong => "uri_too_long",
            ErrorCode::HeadersTooLarge => "headers_too_large",
            ErrorCode::AlreadyCompleted => "already_completed",
            ErrorCode::NotCompleted => "not_completed",
            ErrorCode::RequestCancelled => "request_cancelled",
            ErrorCode::ResultTooLarge => "result_too_large",
            ErrorCode::Internal => "internal",
        }
    }

    pub const ALL: &[ErrorCode] = &[
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::TeamNotFound,
        ErrorCode::AppNotFound,
        ErrorCode::RevisionNotFound,
        ErrorCode::AmbiguousRevision,
        ErrorCode::InvalidRequest,
        ErrorCode::MethodNotAllowed,
        ErrorCode::UnsupportedMediaType,
        ErrorCode::InvalidManifest,
        ErrorCode::InvalidArchive,
        ErrorCode::ArchiveTooLarge,
        ErrorCode::CurrentRevision,
        ErrorCode::Conflict,
        ErrorCode::RunnerNotFound,
        ErrorCode::AmbiguousRunner,
        ErrorCode::NoRevision,
        ErrorCode::Suspended,
        ErrorCode::RunnerLost,
        ErrorCode::RolloutForced,
        ErrorCode::OwnerUnavailable,
        ErrorCode::StartTimeout,
        ErrorCode::RequestTimeout,
        ErrorCode::RequestNotFound,
        ErrorCode::PayloadTooLarge,
        ErrorCode::UriTooLong,
        ErrorCode::HeadersTooLarge,
        ErrorCode::AlreadyCompleted,
        ErrorCode::NotCompleted,
        ErrorCode::RequestCancelled,
        ErrorCode::ResultTooLarge,
        ErrorCode::Internal,
    ];
}

/// An error as the API answers it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError { code, message: message.into() }
    }

    /// An internal failure: the cause is logged, the client gets a generic message so
    /// nothing about the server's insides leaks.
    pub fn internal(cause: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %cause, "internal error");
        ApiError::new(ErrorCode::Internal, "internal server error; see the server log")
    }
}

/// The JSON error body. `detail` and `error_type` repeat the message and the code under
/// the names `fal_client` reads, so its exceptions carry them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
    /// The message again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub detail: Option<String>,
    /// The code again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub error_type: Option<String>,
}

/// What went wrong: a stable code for programs and a message for people.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// One of the API's error codes; each has exactly one HTTP status.
    #[schema(schema_with = error_code_schema)]
    pub code: String,
    /// What was wrong, naming the value or the thing concerned.
    pub message: String,
}

/// The `code` of an error body: a string from the table above.
fn error_code_schema() -> utoipa::openapi::schema::Object {
    utoipa::openapi::schema::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some(ErrorCode::ALL.iter().map(|c| c.as_str())))
        .build()
}

impl ApiError {
    /// The JSON body this error is answered with, as bytes.
    pub fn json(&self) -> Vec<u8> {
        serde_json::to_vec(&self.body()).unwrap_or_default()
    }

    /// The JSON body this error is answered with.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            detail: Some(self.message.clone()),
            error_type: Some(self.code.as_str().to_owned()),
            error: ErrorDetail { code: self.code.as_str().to_owned(), message: self.message.clone() },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.code.status(), axum::Json(self.body())).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_snake_case_with_error_statuses() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            let name = code.as_str();
            assert!(seen.insert(name), "duplicate code {name}");
            assert!(name.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{name} is not snake_case");
            assert!(code.status().is_client_error() || code.status().is_server_error());
        }
    }

    #[tokio::test]
    async fn error_body_is_the_documented_json() {
        let response = ApiError::new(ErrorCode::AppNotFound, "app \"x\" not found").into_response();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16).await.unwrap();
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "error": {"code": "app_not_found", "message": "app \"x\" not found"},
                "detail": "app \"x\" not found",
                "error_type": "app_not_found",
            })
        );
    }
}
