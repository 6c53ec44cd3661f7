//! Extractors that answer a malformed request with the API's JSON error body.
//!
//! axum's own `Path`, `Query` and `Json` reject a request with a plain-text body; these
//! wrappers run them and turn their rejections into an [`ApiError`] that names what was
//! wrong, so that every answer of the API, good or bad, is JSON.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::{Json, RequestExt};
use serde::de::DeserializeOwned;

use crate::error::{ApiError, ErrorCode};

/// The largest JSON request body taken (axum's default body limit); a larger one is
/// answered 413.
pub(crate) const MAX_JSON_BODY_BYTES: usize = 2 << 20;

/// The path parameters of a route, deserialized into `T`.
pub(crate) struct PathParams<T>(pub(crate) T);

impl<S, T> FromRequestParts<S> for PathParams<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(PathParams(value)),
            Err(rejection) => Err(path_rejection(rejection)),
        }
    }
}

fn path_rejection(rejection: PathRejection) -> ApiError {
    match rejection {
        PathRejection::FailedToDeserializePathParams(e) => {
            ApiError::new(ErrorCode::InvalidRequest, format!("bad path parameter: {}", e.body_text()))
        }
        // A route whose handler expects parameters its path does not have: our mistake.
        other => ApiError::internal(other.body_text()),
    }
}

/// The query string of a request, deserialized into `T`.
pub(crate) struct QueryParams<T>(pub(crate) T);

impl<S, T> FromRequestParts<S> for QueryParams<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(QueryParams(value)),
            Err(rejection) => Err(query_rejection(rejection)),
        }
    }
}

fn query_rejection(rejection: QueryRejection) -> ApiError {
    ApiError::new(ErrorCode::InvalidRequest, format!("bad query string: {}", rejection.body_text()))
}

/// A JSON request body (`Content-Type: application/json`), deserialized into `T`.
pub(crate) struct JsonBody<T>(pub(crate) T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    T: DeserializeOwned + 'static,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, _state: &S) -> Result<Self, ApiError> {
        match request.extract::<Json<T>, _>().await {
            Ok(Json(value)) => Ok(JsonBody(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("the request body is larger than {} MiB", MAX_JSON_BODY_BYTES >> 20),
        ),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::new(
            ErrorCode::UnsupportedMediaType,
            "the request body must be JSON, sent with 'Content-Type: application/json'",
        ),
        _ => ApiError::new(ErrorCode::InvalidRequest, format!("bad request body: {}", rejection.body_text())),
    }
}
