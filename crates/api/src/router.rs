//! The control API's HTTP surface: routes, authentication and JSON. What each route does
//! is the [`ControlPlane`]'s business; this module only turns HTTP into calls on it and
//! its answers back into HTTP.

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use model::records::TermSize;
use model::revision::KeyScope;
use serde::Deserialize;
use utoipa::{IntoParams, OpenApi as _};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::error::{ApiError, ErrorCode};
use crate::exec::ExecStreams;
use crate::extract::{JsonBody, MAX_JSON_BODY_BYTES, PathParams, QueryParams};
use crate::openapi;
use crate::wire::{
    AppJson, CacheJson, ChartsJson, CreateKeyRequest, CreateTeamRequest, CreatedKeyJson, CreatedTeamJson, DeployJson,
    DeployParams, GpuJson, GuardRequest, HealthJson, HistoryJson, KeyJson, LogChunk, QueueJson, RevisionJson,
    RevisionList, RevisionsQuery, RolloutJson, RolloutRequest, RunnerJson, RunnersQuery, ScaleJson, ScaleRequest,
    SecretJson, SetRevRequest, SetSecretsRequest, TeamJson, TrafficRequest,
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
    /// The server's metrics in OpenMetrics 1.0 (with its closing `# EOF`).
    fn metrics(&self) -> String;
    /// Apps the server could not load (and does not serve), as `team/app: why`.
    fn problems(&self) -> Vec<String>;
    /// Whether `/metrics` answers without a key (`--metrics-public`).
    fn metrics_public(&self) -> bool;
    /// How deployed code is confined: `bwrap`, or `none`.
    fn sandbox(&self) -> &'static str;
    /// How runners' limits are enforced: `cgroup-v1`, `cgroup-v2`, or `none`.
    fn limits(&self) -> &'static str;
    /// Checks the `Authorization` header and resolves the team the request acts for.
    fn authenticate(
        &self,
        authorization: Option<&str>,
        team: Option<&str>,
    ) -> impl Future<Output = Result<Caller, ApiError>> + Send;
    fn list_apps(&self, caller: &Caller) -> impl Future<Output = Result<Vec<AppJson>, ApiError>> + Send;
    fn get_app(&self, caller: &Caller, app: &str) -> impl Future<Output = Result<AppJson, ApiError>> + Send;
    fn delete_app(&self, caller: &Caller, app: &str) -> impl Future<Output = Result<(), ApiError>> + Send;
    /// The size of the app's cache directory, or, with `clear`, empties it.
    fn app_cache(
        &self,
        caller: &Caller,
        app: &str,
        clear: bool,
    ) -> impl Future<Output = Result<CacheJson, ApiError>> + Send;
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
    /// Splits the app's new calls between its current revision and others (no shares:
    /// ends the split).
    fn traffic(
        &self,
        caller: &Caller,
        app: &str,
        request: TrafficRequest,
    ) -> impl Future<Output = Result<AppJson, ApiError>> + Send;
    /// Changes how the app's guard judges revisions.
    fn guard(
        &self,
        caller: &Caller,
        app: &str,
        request: GuardRequest,
    ) -> impl Future<Output = Result<AppJson, ApiError>> + Send;
    /// The app's queue requests by status.
    fn queue(&self, caller: &Caller, app: &str) -> impl Future<Output = Result<QueueJson, ApiError>> + Send;
    /// Cancels every waiting queue request of the app.
    fn flush_queue(&self, caller: &Caller, app: &str) -> impl Future<Output = Result<QueueJson, ApiError>> + Send;
    /// The app's last hour, for the dashboard's charts.
    fn charts(&self, caller: &Caller, app: &str) -> impl Future<Output = Result<ChartsJson, ApiError>> + Send;
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
    /// Whether the caller may run commands in `runner` (asked before its connection is
    /// upgraded, so that a refusal is a plain HTTP error).
    fn exec_allowed(&self, caller: &Caller, runner: &str) -> impl Future<Output = Result<(), ApiError>> + Send;
    /// Starts `command` inside `runner`, with a terminal of `tty`'s size when given.
    fn exec(
        &self,
        caller: &Caller,
        runner: &str,
        command: Vec<String>,
        tty: Option<TermSize>,
    ) -> impl Future<Output = Result<ExecStreams, ApiError>> + Send;
    /// The server's GPUs; holders are named only where they are the caller's team's.
    fn list_gpus(&self, caller: &Caller) -> impl Future<Output = Result<Vec<GpuJson>, ApiError>> + Send;
}

/// Builds the control API router, and the OpenAPI document that describes it from the
/// handlers' own descriptions, served at `GET /v1/openapi.json`.
pub fn router<C: ControlPlane>(control: Arc<C>) -> Router {
    let mut v1 = OpenApiRouter::default()
        .routes(routes!(list_apps))
        .routes(routes!(get_app, delete_app))
        .routes(routes!(get_cache, clear_cache))
        .routes(routes!(list_revisions))
        .routes(routes!(get_revision, delete_revision))
        .routes(routes!(revision_log))
        .routes(routes!(history))
        .routes(routes!(deploy))
        .routes(routes!(scale))
        .routes(routes!(set_rev))
        .routes(routes!(traffic))
        .routes(routes!(guard))
        .routes(routes!(app_queue))
        .routes(routes!(flush_queue))
        .routes(routes!(charts))
        .routes(routes!(rollout))
        .routes(routes!(suspend))
        .routes(routes!(resume))
        .routes(routes!(app_runners))
        .routes(routes!(runners))
        .routes(routes!(list_teams, create_team))
        .routes(routes!(list_keys, create_key))
        .routes(routes!(revoke_key))
        .routes(routes!(list_secrets, set_secrets))
        .routes(routes!(unset_secret))
        .routes(routes!(stop_runner))
        .routes(routes!(kill_runner))
        .routes(routes!(runner_log))
        .routes(routes!(exec_runner))
        .routes(routes!(gpus));
    // Exactly the routes that the key is checked on are documented as needing it.
    openapi::require_key(v1.get_openapi_mut());
    let v1 = v1.route_layer(middleware::from_fn_with_state(control.clone(), authenticate::<C>));
    let (router, document) = OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(healthz))
        .routes(routes!(metrics))
        .routes(routes!(openapi_json))
        .merge(v1)
        .split_for_parts();
    let document = OpenApiJson(Bytes::from(openapi::finish(document).to_string()));
    router
        .fallback(|| async { ApiError::new(ErrorCode::NotFound, "no such API route") })
        // axum adds the `Allow` header that lists the methods the route takes.
        .method_not_allowed_fallback(|| async {
            ApiError::new(ErrorCode::MethodNotAllowed, "this route does not take that method; see the Allow header")
        })
        .layer(Extension(document))
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY_BYTES))
        .with_state(control)
}

/// The OpenAPI document, serialized once when the router is built.
#[derive(Clone)]
struct OpenApiJson(Bytes);

/// Whether the server is up.
#[utoipa::path(get, path = "/healthz", tag = "server", responses((status = OK, body = HealthJson)))]
async fn healthz<C: ControlPlane>(State(c): State<Arc<C>>) -> Json<HealthJson> {
    let sandbox = c.sandbox();
    let mut warnings: Vec<String> = Vec::new();
    if sandbox == "none" {
        warnings.push("deployed code runs unconfined, as the server's user (--sandbox none)".to_owned());
    }
    // Anyone may read this: it says how many, and where their names and reasons are.
    match c.problems().len() {
        0 => {}
        n => warnings.push(format!(
            "{n} app{} could not be loaded and {} not served (their problem is in `hangar apps list` and the server's log)",
            if n == 1 { "" } else { "s" },
            if n == 1 { "is" } else { "are" }
        )),
    }
    let warning = (!warnings.is_empty()).then(|| warnings.join("; "));
    Json(HealthJson { status: "ok".to_owned(), sandbox: sandbox.to_owned(), limits: c.limits().to_owned(), warning })
}

/// The server's metrics: in OpenMetrics 1.0 when the scraper's `Accept` prefers it (as
/// Prometheus's does), else in the Prometheus text format 0.0.4. The root key sees every
/// series; a team's key only the series of its own apps. (A server started with
/// `--metrics-public` answers everything to anyone.)
#[utoipa::path(
    get, path = "/metrics", tag = "server",
    security(("api_key" = [])),
    params(("Accept" = Option<String>, Header, description = "`application/openmetrics-text` for OpenMetrics")),
    responses((status = OK, description = "The metrics, in the format the scraper prefers", content(
        (String = "text/plain"),
        (String = "application/openmetrics-text"),
    )))
)]
async fn metrics<C: ControlPlane>(State(c): State<Arc<C>>, headers: HeaderMap) -> Response {
    let text = if c.metrics_public() {
        c.metrics()
    } else {
        let authorization = headers.get(header::AUTHORIZATION).map(|v| v.to_str().unwrap_or("\u{fffd}"));
        match c.authenticate(authorization, None).await {
            Ok(caller) if caller.scope == KeyScope::Root => c.metrics(),
            Ok(caller) => team_series(&c.metrics(), &caller.team),
            Err(e) => return e.into_response(),
        }
    };
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    if crate::exposition::wants_openmetrics(accept) {
        ([(header::CONTENT_TYPE, crate::exposition::OPENMETRICS)], text).into_response()
    } else {
        let text = crate::exposition::prometheus_text(&text);
        ([(header::CONTENT_TYPE, crate::exposition::PROMETHEUS_TEXT)], text).into_response()
    }
}

/// The lines of an OpenMetrics exposition that a team may see: the families' descriptions, and
/// the samples of its own apps (their `app` label is `team/app`). Samples without an
/// app (the server's own) are left out.
fn team_series(text: &str, team: &str) -> String {
    let own = format!("app=\"{team}/");
    text.lines().filter(|line| line.starts_with('#') || line.contains(&own)).flat_map(|line| [line, "\n"]).collect()
}

/// This document: the control API in OpenAPI 3.1. It needs no key.
#[utoipa::path(
    get, path = "/v1/openapi.json", tag = "server",
    responses((status = OK, description = "The OpenAPI document", body = Object))
)]
async fn openapi_json(Extension(OpenApiJson(document)): Extension<OpenApiJson>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], document).into_response()
}

async fn authenticate<C: ControlPlane>(State(control): State<Arc<C>>, mut request: Request, next: Next) -> Response {
    // A layer of the server's in front of the router may have checked the key already
    // (its extensions are the server's own; a client cannot set them).
    if request.extensions().get::<Caller>().is_some() {
        return next.run(request).await;
    }
    let headers = request.headers();
    let authorization = match headers.get(header::AUTHORIZATION).map(|v| v.to_str()) {
        None => None,
        Some(Ok(value)) => Some(value.to_owned()),
        Some(Err(_)) => {
            return ApiError::new(
                ErrorCode::Unauthorized,
                "the Authorization header holds characters other than visible ASCII: \
                 expected 'Key <id>:<secret>'",
            )
            .into_response();
        }
    };
    // A team header that is not text cannot name a team. It is refused, but only once
    // the key has been checked, so that a caller without a valid key learns nothing more.
    let (team, bad_team) = match headers.get(TEAM_HEADER).map(|v| v.to_str()) {
        None => (None, false),
        Some(Ok(value)) => (Some(value.to_owned()), false),
        Some(Err(_)) => (None, true),
    };
    match control.authenticate(authorization.as_deref(), team.as_deref()).await {
        Ok(_) if bad_team => ApiError::new(
            ErrorCode::InvalidRequest,
            "the X-Hangar-Team header holds characters other than visible ASCII, so it names no team",
        )
        .into_response(),
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(e) => e.into_response(),
    }
}

/// The path of an app.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
struct AppPath {
    /// The app's name.
    #[param(pattern = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
    app: String,
}

/// The path of a revision of an app.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
struct RevisionPath {
    /// The app's name.
    #[param(pattern = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
    app: String,
    /// The revision's id, or a prefix of it that only it has.
    #[param(pattern = r"^[0-9a-fA-F-]{1,36}$")]
    rev: String,
}

/// The path of a runner.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
struct RunnerPath {
    /// The runner's id, or a prefix of it that only it has.
    #[param(pattern = r"^[0-9a-fA-F-]{1,36}$")]
    id: String,
}

/// The path of a key.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
struct KeyPath {
    /// The key's id (the part of the key before the ':').
    id: String,
}

/// The path of a secret.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
struct SecretPath {
    /// The secret's name.
    #[param(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$")]
    name: String,
}

/// Where to read a log from.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct LogQuery {
    /// The byte offset to read from: 0, or the `next_offset` of the previous chunk.
    #[serde(default, deserialize_with = "crate::wire::whole_number::query")]
    offset: u64,
}

/// How to stop a runner.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct StopQuery {
    /// Start the runner's replacement before draining it.
    #[serde(default)]
    replace: bool,
}

/// The team's apps.
#[utoipa::path(get, path = "/v1/apps", tag = "apps", responses((status = OK, body = Vec<AppJson>)))]
async fn list_apps<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<AppJson>>, ApiError> {
    c.list_apps(&caller).await.map(Json)
}

/// One app.
#[utoipa::path(get, path = "/v1/apps/{app}", tag = "apps", params(AppPath), responses((status = OK, body = AppJson)))]
async fn get_app<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    PathParams(path): PathParams<AppPath>,
) -> Result<Json<AppJson>, ApiError> {
    c.get_app(&caller, &path.app).await.map(Json)
}

/// The app's cache directory: how many files and bytes it holds.
#[utoipa::path(get, path = "/v1/apps/{app}/cache", tag = "apps", params(AppPath), responses((status = OK, body = CacheJson)))]
async fn get_cache<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    PathParams(path): PathParams<AppPath>,
) -> Result<Json<CacheJson>, ApiError> {
    c.app_cache(&caller, &path.app, false).await.map(Json)
}

/// Empties the app's cache directory (runners that run keep running; new ones start
/// with it empty).
#[utoipa::path(delete, path = "/v1/apps/{app}/cache", tag = "apps", params(AppPath), responses((status = OK, body = CacheJson)))]
async fn clear_cache<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    PathParams(path): PathParams<AppPath>,
) -> Result<Json<CacheJson>, ApiError> {
    c.app_cache(&caller, &path.app, true).await.map(Json)
}

/// Deletes an app: its runners, revisions and history.
#[utoipa::path(
    delete, path = "/v1/apps/{app}", tag = "apps", params(AppPath),
    responses((status = NO_CONTENT, description = "The app is gone"))
)]
async fn delete_app<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    PathParams(path): PathParams<AppPath>,
) -> Result<StatusCode, ApiError> {
    c.delete_app(&caller, &path.app).await.map(|()| StatusCode::NO_CONTENT)
}

/// Uploads an app archive and starts a deploy. The answer comes once the revision
/// exists; the build goes on in the background (follow its log).
#[utoipa::path(
    post, path = "/v1/deploys", tag = "apps", params(DeployParams),
    request_body(content = inline(openapi::Archive), content_type = "application/gzip",
        description = "A gzipped tar of the app's directory, with `hangar.toml` at its root"),
    responses((status = ACCEPTED, description = "The revision is being deployed", body = DeployJson))
)]
async fn deploy<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    QueryParams(params): QueryParams<DeployParams>,
    body: Body,
) -> Result<(StatusCode, Json<DeployJson>), ApiError> {
    c.deploy(&caller, params, body).await.map(|d| (StatusCode::ACCEPTED, Json(d)))
}

/// The app's revisions, newest first; the current one is always among them.
#[utoipa::path(
    get, path = "/v1/apps/{app}/revisions", tag = "apps", params(AppPath, RevisionsQuery),
    responses((status = OK, body = Vec<RevisionJson>,
        headers(("X-Total-Count" = u64, description = "How many revisions the app has in all"))))
)]
async fn list_revisions<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    PathParams(path): PathParams<AppPath>,
    QueryParams(query): QueryParams<RevisionsQuery>,
) -> Result<impl IntoResponse, ApiError> {
    if query.limit == Some(0) {
        return Err(ApiError::new(ErrorCode::InvalidRequest, "limit must be at least 1"));
    }
    let list = c.list_revisions(&caller, &path.app, query).await?;
    Ok(([(crate::wire::TOTAL_COUNT_HEADER, list.total.to_string())], Json(list.revisions)))
}

/// One revision.
#[utoipa::path(
    get, path = "/v1/apps/{app}/revisions/{rev}", tag = "apps", params(RevisionPath),
    responses((status = OK, body = RevisionJson))
)]
async fn get_revision<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    PathParams(path): PathParams<RevisionPath>,
) -> Result<Json<RevisionJson>, ApiError> {
    c.get_revision(&caller, &path.app, &path.rev).await.map(Json)
}

/// A piece of a revision's build log.
#[utoipa::path(
    get, path = "/v1/apps/{app}/revisions/{rev}/log", tag = "apps", params(RevisionPath, LogQuery),
    responses((status = OK, body = LogChunk))
)]
async fn revision_log<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    PathParams(path): PathParams<RevisionPath>,
    QueryParams(query): QueryParams<LogQuery>,
) -> Result<Json<LogChunk>, ApiError> {
    c.revision_log(&caller, &path.app, &path.rev, query.offset).await.map(Json)
}

/// Deletes a revision that is not the current one.
#[utoipa::path(
    delete, path = "/v1/apps/{app}/revisions/{rev}", tag = "apps", params(RevisionPath),
    responses((status = OK, description = "The deleted revision", body = RevisionJson))
)]
async fn delete_revision<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    PathParams(path): PathParams<RevisionPath>,
) -> Result<Json<RevisionJson>, ApiError> {
    c.delete_revision(&caller, &path.app, &path.rev).await.map(Json)
}

/// The app's history: deploys, switches, scaling and more.
#[utoipa::path(
    get, path = "/v1/apps/{app}/history", tag = "apps", params(AppPath),
    responses((status = OK, body = Vec<HistoryJson>))
)]
async fn history<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    PathParams(path): PathParams<AppPath>,
) -> Result<Json<Vec<HistoryJson>>, ApiError> {
    c.history(&caller, &path.app).await.map(Json)
}

/// Changes an app's scaling values at once, without restarting its runners.
#[utoipa::path(
    post, path = "/v1/apps/{app}/scale", tag = "apps", params(AppPath), request_body = ScaleRequest,
    responses((status = OK, body = ScaleJson))
)]
async fn scale<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    PathParams(path): PathParams<AppPath>,
    JsonBody(request): JsonBody<ScaleRequest>,
) -> Result<Json<ScaleJson>, ApiError> {
    c.scale(&caller, &path.app, request).await.map(Json)
}

/// Sends shares of the app's new calls to other Deployed revisions (canaries), the
/// current revision taking the rest; no shares end the split. Calls already running
/// finish where they are.
#[utoipa::path(
    post, path = "/v1/apps/{app}/traffic", tag = "apps", params(AppPath), request_body = TrafficRequest,
    responses((status = OK, body = AppJson))
)]
async fn traffic<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    PathParams(path): PathParams<AppPath>,
    JsonBody(request): JsonBody<TrafficRequest>,
) -> Result<Json<AppJson>, ApiError> {
    c.traffic(&caller, &path.app, request).await.map(Json)
}

/// Changes how the app's guard judges a revision after a guarded switch (or a guarded
/// canary): its window and thresholds, and whether every deploy and set-rev is guarded.
#[utoipa::path(
    post, path = "/v1/apps/{app}/guard", tag = "apps", params(AppPath), request_body = GuardRequest,
    responses((status = OK, body = AppJson))
)]
async fn guard<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    PathParams(path): PathParams<AppPath>,
    JsonBody(request): JsonBody<GuardRequest>,
) -> Result<Json<AppJson>, ApiError> {
    c.guard(&caller, &path.app, request).await.map(Json)
}

/// The app's durable queue: its requests by status, and the oldest waiting one's age.
#[utoipa::path(get, path = "/v1/apps/{app}/queue", tag = "apps", params(AppPath), responses((status = OK, body = QueueJson)))]
async fn app_queue<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    PathParams(path): PathParams<AppPath>,
) -> Result<Json<QueueJson>, ApiError> {
    c.queue(&caller, &path.app).await.map(Json)
}

/// Cancels every waiting request of the app's queue (running ones go on); answers the
/// queue afterwards, with how many were cancelled.
#[utoipa::path(
    post, path = "/v1/apps/{app}/queue/flush", tag = "apps", params(AppPath),
    responses((status = OK, body = QueueJson))
)]
async fn flush_queue<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    PathParams(path): PathParams<AppPath>,
) -> Result<Json<QueueJson>, ApiError> {
    c.flush_queue(&caller, &path.app).await.map(Json)
}

/// The app's last hour on the server running it, a point per sample interval: calls
/// and 5xx answers per second by revision, p50 and p95 latency, runners by state, calls
/// waiting and cold starts.
#[utoipa::path(get, path = "/v1/apps/{app}/charts", tag = "apps", params(AppPath), responses((status = OK, body = ChartsJson)))]
async fn charts<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    PathParams(path): PathParams<AppPath>,
) -> Result<Json<ChartsJson>, ApiError> {
    c.charts(&caller, &path.app).await.map(Json)
}

/// Makes another Deployed revision the current one (rollback or roll forward).
#[utoipa::path(
    post, path = "/v1/apps/{app}/set-rev", tag = "apps", params(AppPath), request_body = SetRevRequest,
    responses((status = OK, body = AppJson))
)]
async fn set_rev<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    PathParams(path): PathParams<AppPath>,
    JsonBody(request): JsonBody<SetRevRequest>,
) -> Result<Json<AppJson>, ApiError> {
    c.set_rev(&caller, &path.app, request).await.map(Json)
}

/// Replaces every runner of the app, on the same revision.
#[utoipa::path(
    post, path = "/v1/apps/{app}/rollout", tag = "apps", params(AppPath), request_body = RolloutRequest,
    responses((status = OK, body = RolloutJson))
)]
async fn rollout<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    PathParams(path): PathParams<AppPath>,
    JsonBody(request): JsonBody<RolloutRequest>,
) -> Result<Json<RolloutJson>, ApiError> {
    c.rollout(&caller, &path.app, request).await.map(Json)
}

/// Suspends an app: its runners stop and calls are refused until it is resumed.
#[utoipa::path(
    post, path = "/v1/apps/{app}/suspend", tag = "apps", params(AppPath),
    responses((status = OK, body = AppJson))
)]
async fn suspend<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    PathParams(path): PathParams<AppPath>,
) -> Result<Json<AppJson>, ApiError> {
    c.suspend(&caller, &path.app, true).await.map(Json)
}

/// Resumes a suspended app.
#[utoipa::path(
    post, path = "/v1/apps/{app}/resume", tag = "apps", params(AppPath),
    responses((status = OK, body = AppJson))
)]
async fn resume<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    PathParams(path): PathParams<AppPath>,
) -> Result<Json<AppJson>, ApiError> {
    c.suspend(&caller, &path.app, false).await.map(Json)
}

/// Every team (root key only).
#[utoipa::path(get, path = "/v1/teams", tag = "access", responses((status = OK, body = Vec<TeamJson>)))]
async fn list_teams<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<TeamJson>>, ApiError> {
    c.list_teams(&caller).await.map(Json)
}

/// Creates a team and its first admin key (root key only).
#[utoipa::path(
    post, path = "/v1/teams", tag = "access", request_body = CreateTeamRequest,
    responses((status = CREATED, body = CreatedTeamJson))
)]
async fn create_team<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    JsonBody(request): JsonBody<CreateTeamRequest>,
) -> Result<(StatusCode, Json<CreatedTeamJson>), ApiError> {
    c.create_team(&caller, request).await.map(|t| (StatusCode::CREATED, Json(t)))
}

/// The team's keys, revoked ones too; never their secrets.
#[utoipa::path(get, path = "/v1/keys", tag = "access", responses((status = OK, body = Vec<KeyJson>)))]
async fn list_keys<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<KeyJson>>, ApiError> {
    c.list_keys(&caller).await.map(Json)
}

/// Creates a key for the team; its secret is in this answer only.
#[utoipa::path(
    post, path = "/v1/keys", tag = "access", request_body = CreateKeyRequest,
    responses((status = CREATED, body = CreatedKeyJson))
)]
async fn create_key<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    JsonBody(request): JsonBody<CreateKeyRequest>,
) -> Result<(StatusCode, Json<CreatedKeyJson>), ApiError> {
    c.create_key(&caller, request).await.map(|k| (StatusCode::CREATED, Json(k)))
}

/// Revokes a key: it is refused from now on.
#[utoipa::path(
    delete, path = "/v1/keys/{id}", tag = "access", params(KeyPath),
    responses((status = OK, description = "The revoked key", body = KeyJson))
)]
async fn revoke_key<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    PathParams(path): PathParams<KeyPath>,
) -> Result<Json<KeyJson>, ApiError> {
    c.revoke_key(&caller, &path.id).await.map(Json)
}

/// The team's secrets: names and times, never values.
#[utoipa::path(get, path = "/v1/secrets", tag = "access", responses((status = OK, body = Vec<SecretJson>)))]
async fn list_secrets<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<SecretJson>>, ApiError> {
    c.list_secrets(&caller).await.map(Json)
}

/// Sets secrets, all or none; runners started from now on get them.
#[utoipa::path(
    put, path = "/v1/secrets", tag = "access", request_body = SetSecretsRequest,
    responses((status = OK, description = "The secrets set", body = Vec<SecretJson>))
)]
async fn set_secrets<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    JsonBody(request): JsonBody<SetSecretsRequest>,
) -> Result<Json<Vec<SecretJson>>, ApiError> {
    c.set_secrets(&caller, request).await.map(Json)
}

/// Removes a secret.
#[utoipa::path(
    delete, path = "/v1/secrets/{name}", tag = "access", params(SecretPath),
    responses((status = NO_CONTENT, description = "The secret is gone"))
)]
async fn unset_secret<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    PathParams(path): PathParams<SecretPath>,
) -> Result<StatusCode, ApiError> {
    c.unset_secret(&caller, &path.name).await.map(|()| StatusCode::NO_CONTENT)
}

/// The app's runners.
#[utoipa::path(
    get, path = "/v1/apps/{app}/runners", tag = "runners", params(AppPath, RunnersQuery),
    responses((status = OK, body = Vec<RunnerJson>))
)]
async fn app_runners<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    PathParams(path): PathParams<AppPath>,
    QueryParams(query): QueryParams<RunnersQuery>,
) -> Result<Json<Vec<RunnerJson>>, ApiError> {
    c.list_runners(&caller, Some(&path.app), query).await.map(Json)
}

/// The runners of every app of the team.
#[utoipa::path(
    get, path = "/v1/runners", tag = "runners", params(RunnersQuery),
    responses((status = OK, body = Vec<RunnerJson>))
)]
async fn runners<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    QueryParams(query): QueryParams<RunnersQuery>,
) -> Result<Json<Vec<RunnerJson>>, ApiError> {
    c.list_runners(&caller, None, query).await.map(Json)
}

/// Drains and stops a runner.
#[utoipa::path(
    post, path = "/v1/runners/{id}/stop", tag = "runners", params(RunnerPath, StopQuery),
    responses((status = OK, body = RunnerJson))
)]
async fn stop_runner<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    PathParams(path): PathParams<RunnerPath>,
    QueryParams(query): QueryParams<StopQuery>,
) -> Result<Json<RunnerJson>, ApiError> {
    c.stop_runner(&caller, &path.id, query.replace).await.map(Json)
}

/// Kills a runner at once, without draining it.
#[utoipa::path(
    post, path = "/v1/runners/{id}/kill", tag = "runners", params(RunnerPath),
    responses((status = OK, body = RunnerJson))
)]
async fn kill_runner<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    PathParams(path): PathParams<RunnerPath>,
) -> Result<Json<RunnerJson>, ApiError> {
    c.kill_runner(&caller, &path.id).await.map(Json)
}

/// Runs a command inside a runner, as its own processes run: in its sandbox, as its
/// uid, with its environment and GPUs. The connection is a WebSocket: the client's
/// first text message is an `ExecClientMessage` `start`, later ones `resize` or `eof`,
/// and its binary messages are the command's standard input; the server's binary
/// messages are the command's output (first byte 1 for stdout, 2 for stderr), and its
/// last text message an `ExecServerMessage`: `exit` with the status, or `error`. The
/// command is killed if the connection closes first. Admin keys only; each command run
/// is recorded in the app's history.
#[utoipa::path(
    get, path = "/v1/runners/{id}/exec", tag = "runners", params(RunnerPath),
    responses((status = SWITCHING_PROTOCOLS, description = "The connection is now the command's WebSocket"))
)]
async fn exec_runner<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    PathParams(path): PathParams<RunnerPath>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    c.exec_allowed(&caller, &path.id).await?;
    let upgrade = upgrade.map_err(|e| {
        ApiError::new(ErrorCode::InvalidRequest, format!("this route runs a command over a WebSocket: {e}"))
    })?;
    Ok(upgrade.on_upgrade(move |socket| crate::exec::serve(c, caller, path.id, socket)))
}

/// The server's GPUs: which runner of which app holds each, and what it is doing.
#[utoipa::path(
    get, path = "/v1/gpus", tag = "runners",
    responses((status = OK, body = Vec<GpuJson>))
)]
async fn gpus<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<GpuJson>>, ApiError> {
    c.list_gpus(&caller).await.map(Json)
}

/// A piece of a runner's log (what it printed).
#[utoipa::path(
    get, path = "/v1/runners/{id}/log", tag = "runners", params(RunnerPath, LogQuery),
    responses((status = OK, body = LogChunk))
)]
async fn runner_log<C: ControlPlane>(
    State(c): State<Arc<C>>,
    Extension(caller): Extension<Caller>,
    PathParams(path): PathParams<RunnerPath>,
    QueryParams(query): QueryParams<LogQuery>,
) -> Result<Json<LogChunk>, ApiError> {
    c.runner_log(&caller, &path.id, query.offset).await.map(Json)
}
