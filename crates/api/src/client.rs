//! A typed client of the control API, used by the CLI and the tests.

use reqwest::{Method, RequestBuilder, Response};
use serde::de::DeserializeOwned;

use crate::error::ErrorBody;
use crate::router::TEAM_HEADER;
use crate::wire::{
    AppJson, CacheJson, ChartsJson, CreateKeyRequest, CreateTeamRequest, CreatedKeyJson, CreatedTeamJson, DeployJson,
    DeployParams, GpuJson, GuardRequest, HealthJson, HistoryJson, KeyJson, LogChunk, QueueJson, RevisionJson,
    RevisionList, RevisionsQuery, RolloutJson, RolloutRequest, RunnerJson, RunnersQuery, ScaleJson, ScaleRequest,
    SecretJson, SetRevRequest, SetSecretsRequest, TeamJson, TrafficRequest,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an API error.
    #[error("{message}")]
    Api { status: u16, code: String, message: String },
    #[error("cannot reach the hangar server at {url}: {source}")]
    Connect { url: String, source: reqwest::Error },
    #[error("request to {url} failed: {source}")]
    Transport { url: String, source: reqwest::Error },
    #[error("unexpected answer from {url} (HTTP {status}): {detail}")]
    Unexpected { url: String, status: u16, detail: String },
    /// A WebSocket (`runners exec`) could not be opened or broke.
    #[error("the connection to {url} failed: {detail}")]
    Socket { url: String, detail: String },
}

impl ClientError {
    /// The API error code, if the server answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } | ClientError::Unexpected { status, .. } => Some(*status),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// A successful answer's JSON body.
async fn decode<T: DeserializeOwned>(response: Response) -> Result<T> {
    let url = response.url().to_string();
    let status = response.status().as_u16();
    let body = response.bytes().await.map_err(|source| ClientError::Transport { url: url.clone(), source })?;
    serde_json::from_slice(&body).map_err(|e| ClientError::Unexpected { url, status, detail: e.to_string() })
}

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    key: Option<String>,
    team: Option<String>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let key = self.key.as_ref().map(|_| crate::wire::REDACTED);
        f.debug_struct("Client").field("base", &self.base).field("key", &key).field("team", &self.team).finish()
    }
}

impl Client {
    /// `base` is the API's root URL, e.g. `http://127.0.0.1:8700`; `key` is
    /// `<id>:<secret>`; `team` acts for another team (root keys).
    pub fn new(base: &str, key: Option<String>, team: Option<String>) -> Client {
        // Loading the system's root certificates takes a few milliseconds of every CLI
        // command; a plain-HTTP server needs none.
        let http = reqwest::Client::builder()
            .tls_built_in_root_certs(base.starts_with("https://"))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Client { http, base: base.trim_end_matches('/').to_owned(), key, team }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The key and team headers every request carries.
    pub(crate) fn auth_headers(&self) -> Vec<(&'static str, String)> {
        let mut headers = Vec::new();
        if let Some(key) = &self.key {
            headers.push(("authorization", format!("Key {key}")));
        }
        if let Some(team) = &self.team {
            headers.push((TEAM_HEADER, team.clone()));
        }
        headers
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let mut req = self.http.request(method, format!("{}{}", self.base, path));
        if let Some(key) = &self.key {
            req = req.header(reqwest::header::AUTHORIZATION, format!("Key {key}"));
        }
        if let Some(team) = &self.team {
            req = req.header(TEAM_HEADER, team);
        }
        req
    }

    async fn send(&self, req: RequestBuilder) -> Result<Response> {
        let req = req.build().map_err(|source| ClientError::Transport { url: self.base.clone(), source })?;
        let url = req.url().to_string();
        let response = self.http.execute(req).await.map_err(|source| {
            if source.is_connect() {
                ClientError::Connect { url: self.base.clone(), source }
            } else {
                ClientError::Transport { url: url.clone(), source }
            }
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.bytes().await.map_err(|source| ClientError::Transport { url: url.clone(), source })?;
        Err(match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(e) => ClientError::Api { status: status.as_u16(), code: e.error.code, message: e.error.message },
            Err(_) => ClientError::Unexpected {
                url,
                status: status.as_u16(),
                detail: String::from_utf8_lossy(&body).chars().take(200).collect(),
            },
        })
    }

    async fn json<T: DeserializeOwned>(&self, req: RequestBuilder) -> Result<T> {
        decode(self.send(req).await?).await
    }

    pub async fn health(&self) -> Result<HealthJson> {
        self.json(self.request(Method::GET, "/healthz")).await
    }

    pub async fn gpus(&self) -> Result<Vec<GpuJson>> {
        self.json(self.request(Method::GET, "/v1/gpus")).await
    }

    pub async fn list_apps(&self) -> Result<Vec<AppJson>> {
        self.json(self.request(Method::GET, "/v1/apps")).await
    }

    pub async fn get_app(&self, app: &str) -> Result<AppJson> {
        self.json(self.request(Method::GET, &format!("/v1/apps/{}", seg(app)))).await
    }

    /// The app's cache directory; with `clear`, emptied first.
    pub async fn app_cache(&self, app: &str, clear: bool) -> Result<CacheJson> {
        let method = if clear { Method::DELETE } else { Method::GET };
        self.json(self.request(method, &format!("/v1/apps/{}/cache", seg(app)))).await
    }

    pub async fn delete_app(&self, app: &str) -> Result<()> {
        self.send(self.request(Method::DELETE, &format!("/v1/apps/{}", seg(app)))).await.map(drop)
    }

    /// Uploads a packed app (a gzip'd tar) and starts a deploy.
    pub async fn deploy(&self, params: &DeployParams, archive: impl Into<reqwest::Body>) -> Result<DeployJson> {
        let req = self
            .request(Method::POST, "/v1/deploys")
            .query(params)
            .header(reqwest::header::CONTENT_TYPE, "application/gzip")
            .body(archive);
        self.json(req).await
    }

    /// The app's newest revisions (the server's default page).
    pub async fn list_revisions(&self, app: &str) -> Result<Vec<RevisionJson>> {
        Ok(self.list_revisions_page(app, &RevisionsQuery::default()).await?.revisions)
    }

    /// A page of the app's revisions, and how many it has in all.
    pub async fn list_revisions_page(&self, app: &str, query: &RevisionsQuery) -> Result<RevisionList> {
        let response =
            self.send(self.request(Method::GET, &format!("/v1/apps/{}/revisions", seg(app))).query(query)).await?;
        let total = response.headers().get(crate::wire::TOTAL_COUNT_HEADER).and_then(|v| v.to_str().ok()?.parse().ok());
        let revisions: Vec<RevisionJson> = decode(response).await?;
        let total = total.unwrap_or(revisions.len() as u64);
        Ok(RevisionList { revisions, total })
    }

    pub async fn get_revision(&self, app: &str, revision: &str) -> Result<RevisionJson> {
        self.json(self.request(Method::GET, &format!("/v1/apps/{}/revisions/{}", seg(app), seg(revision)))).await
    }

    pub async fn revision_log(&self, app: &str, revision: &str, offset: u64) -> Result<LogChunk> {
        let path = format!("/v1/apps/{}/revisions/{}/log", seg(app), seg(revision));
        self.json(self.request(Method::GET, &path).query(&[("offset", offset)])).await
    }

    pub async fn delete_revision(&self, app: &str, revision: &str) -> Result<RevisionJson> {
        self.json(self.request(Method::DELETE, &format!("/v1/apps/{}/revisions/{}", seg(app), seg(revision)))).await
    }

    pub async fn history(&self, app: &str) -> Result<Vec<HistoryJson>> {
        self.json(self.request(Method::GET, &format!("/v1/apps/{}/history", seg(app)))).await
    }
}

impl Client {
    pub async fn list_teams(&self) -> Result<Vec<TeamJson>> {
        self.json(self.request(Method::GET, "/v1/teams")).await
    }

    pub async fn create_team(&self, name: &str) -> Result<CreatedTeamJson> {
        let request = CreateTeamRequest { name: name.to_owned() };
        self.json(self.request(Method::POST, "/v1/teams").json(&request)).await
    }

    pub async fn list_keys(&self) -> Result<Vec<KeyJson>> {
        self.json(self.request(Method::GET, "/v1/keys")).await
    }

    pub async fn create_key(&self, scope: &str, description: Option<String>) -> Result<CreatedKeyJson> {
        let request = CreateKeyRequest { scope: scope.to_owned(), description };
        self.json(self.request(Method::POST, "/v1/keys").json(&request)).await
    }

    pub async fn revoke_key(&self, id: &str) -> Result<KeyJson> {
        self.json(self.request(Method::DELETE, &format!("/v1/keys/{}", seg(id)))).await
    }

    pub async fn list_secrets(&self) -> Result<Vec<SecretJson>> {
        self.json(self.request(Method::GET, "/v1/secrets")).await
    }

    pub async fn set_secrets(&self, values: std::collections::BTreeMap<String, String>) -> Result<Vec<SecretJson>> {
        let request = SetSecretsRequest { values };
        self.json(self.request(Method::PUT, "/v1/secrets").json(&request)).await
    }

    pub async fn unset_secret(&self, name: &str) -> Result<()> {
        self.send(self.request(Method::DELETE, &format!("/v1/secrets/{}", seg(name)))).await.map(drop)
    }

    pub async fn set_rev(&self, app: &str, request: &SetRevRequest) -> Result<AppJson> {
        self.json(self.request(Method::POST, &format!("/v1/apps/{}/set-rev", seg(app))).json(request)).await
    }

    /// Sets the app's traffic split (no shares: ends it).
    pub async fn traffic(&self, app: &str, request: &TrafficRequest) -> Result<AppJson> {
        self.json(self.request(Method::POST, &format!("/v1/apps/{}/traffic", seg(app))).json(request)).await
    }

    /// Changes how the app's guard judges revisions.
    pub async fn guard(&self, app: &str, request: &GuardRequest) -> Result<AppJson> {
        self.json(self.request(Method::POST, &format!("/v1/apps/{}/guard", seg(app))).json(request)).await
    }

    pub async fn queue(&self, app: &str) -> Result<QueueJson> {
        self.json(self.request(Method::GET, &format!("/v1/apps/{}/queue", seg(app)))).await
    }

    pub async fn flush_queue(&self, app: &str) -> Result<QueueJson> {
        self.json(self.request(Method::POST, &format!("/v1/apps/{}/queue/flush", seg(app)))).await
    }

    /// The app's last hour, as the dashboard's charts draw it.
    pub async fn charts(&self, app: &str) -> Result<ChartsJson> {
        self.json(self.request(Method::GET, &format!("/v1/apps/{}/charts", seg(app)))).await
    }

    pub async fn rollout(&self, app: &str, force: bool) -> Result<RolloutJson> {
        let request = RolloutRequest { force };
        self.json(self.request(Method::POST, &format!("/v1/apps/{}/rollout", seg(app))).json(&request)).await
    }

    /// Suspends (`true`) or resumes an app.
    pub async fn suspend(&self, app: &str, suspend: bool) -> Result<AppJson> {
        let verb = if suspend { "suspend" } else { "resume" };
        self.json(self.request(Method::POST, &format!("/v1/apps/{}/{verb}", seg(app)))).await
    }

    pub async fn scale(&self, app: &str, request: &ScaleRequest) -> Result<ScaleJson> {
        self.json(self.request(Method::POST, &format!("/v1/apps/{}/scale", seg(app))).json(request)).await
    }

    /// The runners of `app`, or of every app of the team when `None`.
    pub async fn runners(&self, app: Option<&str>, query: &RunnersQuery) -> Result<Vec<RunnerJson>> {
        let path = match app {
            Some(app) => format!("/v1/apps/{}/runners", seg(app)),
            None => "/v1/runners".to_owned(),
        };
        self.json(self.request(Method::GET, &path).query(query)).await
    }

    pub async fn stop_runner(&self, runner: &str, replace: bool) -> Result<RunnerJson> {
        let path = format!("/v1/runners/{}/stop", seg(runner));
        self.json(self.request(Method::POST, &path).query(&[("replace", replace)])).await
    }

    pub async fn kill_runner(&self, runner: &str) -> Result<RunnerJson> {
        self.json(self.request(Method::POST, &format!("/v1/runners/{}/kill", seg(runner)))).await
    }

    pub async fn runner_log(&self, runner: &str, offset: u64) -> Result<LogChunk> {
        let path = format!("/v1/runners/{}/log", seg(runner));
        self.json(self.request(Method::GET, &path).query(&[("offset", offset)])).await
    }
}

/// Escapes one path segment, so a name can never change which route is called.
pub(crate) fn seg(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}
