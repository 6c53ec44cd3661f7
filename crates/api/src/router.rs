//! The control API's HTTP surface: routes, authentication and JSON. What each route does
//! is the [`ControlPlane`]'s business; this module only turns HTTP into calls on it and
//! its answers back into HTTP.

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json};
use model::revision::KeyScope;
use serde::Deserialize;
use uuid::Uuid;

use crate::error::{ApiError, ErrorCode};
use crate::wire::{
    AppJson, CreateKeyRequest, CreateTeamRequest, CreatedKeyJson, CreatedTeamJson, DeployJson, DeployParams,
    HealthJson, HistoryJson, KeyJson, LogChunk, RevisionJson, RevisionList, RevisionsQuery, RolloutJson,
    RolloutRequest, RunnerJson, RunnersQuery, ScaleJson, ScaleRequest, SecretJson, SetRevRequest, SetSecretsRequest,
    TeamJson,
};

/// The header a caller uses to act for a team other than its key's own (root keys only).
pub const TEAM_HEADER: &str = "x-hangar-team";

/// Who is calling and for which team, established once per request by
/// [`ControlPlane::authenticate`].
#[derive(Debug, Clone)]
pub struct Caller {
    pub key_id: String,
    pub scope: KeyScope,
    /// The team the request acts for.
    pub team_id: Uuid,
    pub team: String,
}

/// Everything the control API can do. The server implements it; the router calls it.
pub trait ControlPlane: Send + Sync + 'static {
    /// Prometheus text exposition of the server's metrics.
    fn metrics(&self) -> String;
    /// Checks the `Authorization` header and resolves the team the request acts for.
    fn authenticate(
        &self,
        authorization: Option<&str>,
        team: Option<&str>,
    ) -> impl Future<Output = Result<Caller, ApiError>> + Send;
    fn list_apps(&self, caller: &Caller) -> impl Future<Output = Result<Vec<AppJson>, ApiError>> + Send;
    fn get_app(&self, caller: &Caller, app: &str) -> impl Future<Output = Result<AppJson, ApiError>> + Send;
    fn delete_app(&self, caller: &Caller, app: &str) -> impl Future<Output = Result<(), ApiError>> + Send;
    /// Receives an uploaded archive and starts a deploy; answers once the revision exists.
    fn deploy(
        &self,
        caller: &Caller,
        params: DeployParams,
        archive: Body,
    ) -> impl Future<Output = Result<DeployJson, ApiError>> + Send;
    /// The app's newest revisions, newest first, with the current one always among them.
    fn list_revisions(
        &self,
        caller: &Caller,
        app: &str,
        query: RevisionsQuery,
    ) -> impl Future<Output = Result<RevisionList, ApiError>> + Send;
    fn get_revision(
        &self,
        caller: &Caller,
        app: &str,
        revision: &str,
    ) -> impl Future<Output = Result<RevisionJson, ApiError>> + Send;
    fn revision_log(
        &self,
        caller: &Caller,
        app: &str,
        revision: &str,
        offset: u64,
    ) -> impl Future<Output = Result<LogChunk, ApiError>> + Send;
    fn delete_revision(
        &self,
        caller: &Caller,
        app: &str,
        revision: &str,
    ) -> impl Future<Output = Result<RevisionJson, ApiError>> + Send;
    fn history(&self, caller: &Caller, app: &str) -> impl Future<Output = Result<Vec<HistoryJson>, ApiError>> + Send;
    /// Changes an app's scaling values at once, without restarting runners.
    fn scale(
        &self,
        caller: &Caller,
        app: &str,
        request: ScaleRequest,
    ) -> impl Future<Output = Result<ScaleJson, ApiError>> + Send;
    /// Makes another Deployed revision current (rollback or roll forward).
    fn set_rev(
        &self,
        caller: &Caller,
        app: &str,
        request: SetRevRequest,
    ) -> impl Future<Output = Result<AppJson, ApiError>> + Send;
    /// Replaces every runner of the app, same revision.
    fn rollout(
        &self,
        caller: &Caller,
        app: &str,
        request: RolloutRequest,
    ) -> impl Future<Output = Result<RolloutJson, ApiError>> + Send;
    /// Suspends (`true`) or resumes an app.
    fn suspend(
        &self,
        caller: &Caller,
        app: &str,
        suspend: bool,
    ) -> impl Future<Output = Result<AppJson, ApiError>> + Send;
    fn list_teams(&self, caller: &Caller) -> impl Future<Output = Result<Vec<TeamJson>, ApiError>> + Send;
    /// Creates a team and its first admin key (root keys only).
    fn create_team(
        &self,
        caller: &Caller,
        request: CreateTeamRequest,
    ) -> impl Future<Output = Result<CreatedTeamJson, ApiError>> + Send;
    fn list_keys(&self, caller: &Caller) -> impl Future<Output = Result<Vec<KeyJson>, ApiError>> + Send;
    fn create_key(
        &self,
        caller: &Caller,
        request: CreateKeyRequest,
    ) -> impl Future<Output = Result<CreatedKeyJson, ApiError>> + Send;
    fn revoke_key(&self, caller: &Caller, id: &str) -> impl Future<Output = Result<KeyJson, ApiError>> + Send;
    /// The team's secrets: names and times, never values.
    fn list_secrets(&self, caller: &Caller) -> impl Future<Output = Result<Vec<SecretJson>, ApiError>> + Send;
    fn set_secrets(
        &self,
        caller: &Caller,
        request: SetSecretsRequest,
    ) -> impl Future<Output = Result<Vec<SecretJson>, ApiError>> + Send;
    fn unset_secret(&self, caller: &Caller, name: &str) -> impl Future<Output = Result<(), ApiError>> + Send;
    /// The runners of one app, or of every app of the team.
    fn list_runners(
        &self,
        caller: &Caller,
        app: Option<&str>,
        query: RunnersQuery,
    ) -> impl Future<Output = Result<Vec<RunnerJson>, ApiError>> + Send;
    /// Drains and stops a runner (`replace`: its replacement is set up first).
    fn stop_runner(
        &self,
        caller: &Caller,
        runner: &str,
        replace: bool,
    ) -> impl Future<Output = Result<RunnerJson, ApiError>> + Send;
    fn kill_runner(&self, caller: &Caller, runner: &str) -> impl Future<Output = Result<RunnerJson, ApiError>> + Send;
    fn runner_log(
        &self,
        caller: &Caller,
        runner: &str,
        offset: u64,
    ) -> impl Future<Output = Result<LogChunk, ApiError>> + Send;
}

/// Builds the control API router.
pub fn router<C: ControlPlane>(control: Arc<C>) -> Router {
    let v1 = Router::new()
        .route("/apps", get(list_apps::<C>))
        .route("/apps/{app}", get(get_app::<C>).delete(delete_app::<C>))
        .route("/apps/{app}/revisions", get(list_revisions::<C>))
        .route("/apps/{app}/revisions/{rev}", get(get_revision::<C>).delete(delete_revision::<C>))
        .route("/apps/{app}/revisions/{rev}/log", get(revision_log::<C>))
        .route("/apps/{app}/history", get(history::<C>))
        .route("/deploys", axum::routing::post(deploy::<C>))
        .route("/apps/{app}/scale", axum::routing::post(scale::<C>))
        .route("/apps/{app}/set-rev", axum::routing::post(set_rev::<C>))
        .route("/apps/{app}/rollout", axum::routing::post(rollout::<C>))
        .route("/apps/{app}/suspend", axum::routing::post(suspend::<C>))
        .route("/apps/{app}/resume", axum::routing::post(resume::<C>))
        .route("/apps/{app}/runners", get(app_runners::<C>))
        .route("/runners", get(runners::<C>))
        .route("/teams", get(list_teams::<C>).post(create_team::<C>))
        .route("/keys", get(list_keys::<C>).post(create_key::<C>))
        .route("/keys/{id}", axum::routing::delete(revoke_key::<C>))
        .route("/secrets", get(list_secrets::<C>).put(set_secrets::<C>))
        .route("/secrets/{name}", axum::routing::delete(unset_secret::<C>))
        .route("/runners/{id}/stop", axum::routing::post(stop_runner::<C>))
        .route("/runners/{id}/kill", axum::routing::post(kill_runner::<C>))
        .route("/runners/{id}/log", get(runner_log::<C>))
        .route_layer(middleware::from_fn_with_state(control.clone(), authenticate::<C>));
    Router::new()
        .route("/healthz", get(|| async { Json(HealthJson { status: "ok".to_owned() }) }))
        .route("/metrics", get(metrics::<C>))
        .nest("/v1", v1)
        .fallback(|| async { ApiError::new(ErrorCode::NotFound, "no such API route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(ErrorCode::InvalidRequest, "this route does not take that method")
        })
        .with_state(control)
}

async fn metrics<C: ControlPlane>(State(c): State<Arc<C>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], c.metrics()).into_response()
}

async fn authenticate<C: ControlPlane>(State(control): State<Arc<C>>, mut request: Request, next: Next) -> Response {
    let headers = request.headers();
    let authorization = header_str(headers, header::AUTHORIZATION.as_str());
    let team = header_str(headers, TEAM_HEADER);
    match control.authenticate(authorization.as_deref(), team.as_deref()).await {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(e) => e.into_response(),
    }
}

fn header_str(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

async fn list_apps<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<AppJson>>, ApiError> {
    c.list_apps(&caller).await.map(Json)
}

async fn get_app<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    Path(app): Path<String>,
) -> Result<Json<AppJson>, ApiError> {
    c.get_app(&caller, &app).await.map(Json)
}

async fn delete_app<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    Path(app): Path<String>,
) -> Result<StatusCode, ApiError> {
    c.delete_app(&caller, &app).await.map(|()| StatusCode::NO_CONTENT)
}

async fn deploy<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    params: Result<Query<DeployParams>, QueryRejection>,
    body: Body,
) -> Result<(StatusCode, Json<DeployJson>), ApiError> {
    let Query(params) = params.map_err(bad_query)?;
    c.deploy(&caller, params, body).await.map(|d| (StatusCode::ACCEPTED, Json(d)))
}

async fn list_revisions<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    Path(app): Path<String>,
    query: Result<Query<RevisionsQuery>, QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Query(query) = query.map_err(bad_query)?;
    if query.limit == Some(0) {
        return Err(ApiError::new(ErrorCode::InvalidRequest, "limit must be at least 1"));
    }
    let list = c.list_revisions(&caller, &app, query).await?;
    Ok(([(crate::wire::TOTAL_COUNT_HEADER, list.total.to_string())], Json(list.revisions)))
}

async fn get_revision<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    Path((app, rev)): Path<(String, String)>,
) -> Result<Json<RevisionJson>, ApiError> {
    c.get_revision(&caller, &app, &rev).await.map(Json)
}

#[derive(Debug, Deserialize)]
struct LogQuery {
    #[serde(default)]
    offset: u64,
}

async fn revision_log<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    Path((app, rev)): Path<(String, String)>,
    query: Result<Query<LogQuery>, QueryRejection>,
) -> Result<Json<LogChunk>, ApiError> {
    let Query(query) = query.map_err(bad_query)?;
    c.revision_log(&caller, &app, &rev, query.offset).await.map(Json)
}

async fn delete_revision<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    Path((app, rev)): Path<(String, String)>,
) -> Result<Json<RevisionJson>, ApiError> {
    c.delete_revision(&caller, &app, &rev).await.map(Json)
}

async fn history<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    Path(app): Path<String>,
) -> Result<Json<Vec<HistoryJson>>, ApiError> {
    c.history(&caller, &app).await.map(Json)
}

async fn scale<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    Path(app): Path<String>,
    request: Result<Json<ScaleRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<ScaleJson>, ApiError> {
    let Json(request) = request.map_err(bad_json)?;
    c.scale(&caller, &app, request).await.map(Json)
}

async fn set_rev<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    Path(app): Path<String>,
    request: Result<Json<SetRevRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<AppJson>, ApiError> {
    let Json(request) = request.map_err(bad_json)?;
    c.set_rev(&caller, &app, request).await.map(Json)
}

async fn rollout<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    Path(app): Path<String>,
    request: Result<Json<RolloutRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<RolloutJson>, ApiError> {
    let Json(request) = request.map_err(bad_json)?;
    c.rollout(&caller, &app, request).await.map(Json)
}

async fn suspend<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    Path(app): Path<String>,
) -> Result<Json<AppJson>, ApiError> {
    c.suspend(&caller, &app, true).await.map(Json)
}

async fn resume<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    Path(app): Path<String>,
) -> Result<Json<AppJson>, ApiError> {
    c.suspend(&caller, &app, false).await.map(Json)
}

async fn list_teams<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<TeamJson>>, ApiError> {
    c.list_teams(&caller).await.map(Json)
}

async fn create_team<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    request: Result<Json<CreateTeamRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<CreatedTeamJson>), ApiError> {
    let Json(request) = request.map_err(bad_json)?;
    c.create_team(&caller, request).await.map(|t| (StatusCode::CREATED, Json(t)))
}

async fn list_keys<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<KeyJson>>, ApiError> {
    c.list_keys(&caller).await.map(Json)
}

async fn create_key<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    request: Result<Json<CreateKeyRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<CreatedKeyJson>), ApiError> {
    let Json(request) = request.map_err(bad_json)?;
    c.create_key(&caller, request).await.map(|k| (StatusCode::CREATED, Json(k)))
}

async fn revoke_key<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<KeyJson>, ApiError> {
    c.revoke_key(&caller, &id).await.map(Json)
}

async fn list_secrets<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<SecretJson>>, ApiError> {
    c.list_secrets(&caller).await.map(Json)
}

async fn set_secrets<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    request: Result<Json<SetSecretsRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Vec<SecretJson>>, ApiError> {
    let Json(request) = request.map_err(bad_json)?;
    c.set_secrets(&caller, request).await.map(Json)
}

async fn unset_secret<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    c.unset_secret(&caller, &name).await.map(|()| StatusCode::NO_CONTENT)
}

fn bad_json(rejection: axum::extract::rejection::JsonRejection) -> ApiError {
    ApiError::new(ErrorCode::InvalidRequest, format!("bad request body: {}", rejection.body_text()))
}

async fn app_runners<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    Path(app): Path<String>,
    query: Result<Query<RunnersQuery>, QueryRejection>,
) -> Result<Json<Vec<RunnerJson>>, ApiError> {
    let Query(query) = query.map_err(bad_query)?;
    c.list_runners(&caller, Some(&app), query).await.map(Json)
}

async fn runners<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<RunnersQuery>, QueryRejection>,
) -> Result<Json<Vec<RunnerJson>>, ApiError> {
    let Query(query) = query.map_err(bad_query)?;
    c.list_runners(&caller, None, query).await.map(Json)
}

#[derive(Debug, Deserialize)]
struct StopQuery {
    #[serde(default)]
    replace: bool,
}

async fn stop_runner<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    query: Result<Query<StopQuery>, QueryRejection>,
) -> Result<Json<RunnerJson>, ApiError> {
    let Query(query) = query.map_err(bad_query)?;
    c.stop_runner(&caller, &id, query.replace).await.map(Json)
}

async fn kill_runner<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<RunnerJson>, ApiError> {
    c.kill_runner(&caller, &id).await.map(Json)
}

async fn runner_log<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    query: Result<Query<LogQuery>, QueryRejection>,
) -> Result<Json<LogChunk>, ApiError> {
    let Query(query) = query.map_err(bad_query)?;
    c.runner_log(&caller, &id, query.offset).await.map(Json)
}

fn bad_query(rejection: QueryRejection) -> ApiError {
    ApiError::new(ErrorCode::InvalidRequest, format!("bad query string: {}", rejection.body_text()))
}
