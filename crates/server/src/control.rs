//! The control plane: what each control-API operation does. It checks who may do it,
//! serializes operations on one app, and keeps the store and the files of the data dir
//! in step.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use api::error::{ApiError, ErrorCode};
use api::router::{Caller, ControlPlane};
use api::wire::{
    AppJson, ChartPointJson, ChartsJson, CreateKeyRequest, CreateTeamRequest, CreatedKeyJson, CreatedTeamJson,
    DEFAULT_REVISION_LIMIT, DeployJson, DeployParams, GpuJson, GuardRequest, HistoryJson, KeyJson, LogChunk, QueueJson,
    RevisionJson, RevisionList, RevisionRateJson, RevisionsQuery, RolloutJson, RolloutRequest, RunnerCountsJson,
    RunnerJson, RunnersQuery, ScaleJson, ScaleRequest, SecretJson, SetRevRequest, SetSecretsRequest, TeamJson,
    TrafficRequest,
};
use axum::body::Body;
use model::ids::is_id_prefix;
use model::records::{App, Revision};
use model::revision::KeyScope;
use store::{NewHistory, Store, StoreError};
use tokio::sync::OwnedMutexGuard;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::auth;
use crate::config::Config;
use crate::fleet::Fleet;
use crate::layout::Layout;

pub(crate) struct Control {
    pub(crate) store: Store,
    pub(crate) fleet: Arc<Fleet>,
    registry: prometheus_client::registry::Registry,
    pub(crate) config: Arc<Config>,
    pub(crate) layout: Layout,
    app_locks: AppLocks,
    /// Held while an artifact is stored or freed, so that a deploy never finds an
    /// artifact that a concurrent delete is about to remove.
    pub(crate) artifact_lock: tokio::sync::Mutex<()>,
    /// Cancelled when the server shuts down; background deploys stop.
    pub(crate) shutdown: CancellationToken,
    /// Background deploys, so that shutdown can wait for them to wind up.
    pub(crate) tasks: TaskTracker,
}

/// One lock per app (by team and name, so that an app's first deploy is serialized
/// too). Operations on one app take turns; operations on different apps do not wait on
/// each other.
#[derive(Default)]
struct AppLocks {
    locks: Mutex<HashMap<AppKey, Arc<tokio::sync::Mutex<()>>>>,
}

/// An app by team id and name.
type AppKey = (Uuid, String);

impl AppLocks {
    async fn lock(&self, team_id: Uuid, app: &str) -> OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
            // Forget locks nobody holds or waits for, so the map does not grow forever.
            locks.retain(|_, l| Arc::strong_count(l) > 1);
            locks.entry((team_id, app.to_owned())).or_default().clone()
        };
        lock.lock_owned().await
    }
}

impl Control {
    pub(crate) fn new(
        store: Store,
        config: Arc<Config>,
        layout: Layout,
        fleet: Arc<Fleet>,
        registry: prometheus_client::registry::Registry,
    ) -> Control {
        Control {
            store,
            fleet,
            registry,
            config,
            layout,
            app_locks: AppLocks::default(),
            artifact_lock: tokio::sync::Mutex::new(()),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        }
    }

    pub(crate) async fn lock_app(&self, team_id: Uuid, app: &str) -> OwnedMutexGuard<()> {
        self.app_locks.lock(team_id, app).await
    }

    /// Looks an app up in the caller's team.
    pub(crate) async fn find_app(&self, caller: &Caller, name: &str) -> Result<App, ApiError> {
        self.store.app_by_name(caller.team_id, name).await.map_err(internal)?.ok_or_else(|| {
            ApiError::new(ErrorCode::AppNotFound, format!("app {name:?} not found in team {:?}", caller.team))
        })
    }

    /// The app's queue as the API shows it.
    async fn queue_json(&self, app: &App, cancelled: Option<u64>) -> Result<QueueJson, ApiError> {
        let counts = self.store.queue_counts(app.id).await.map_err(internal)?;
        let now = time::OffsetDateTime::now_utc();
        Ok(QueueJson {
            in_queue: counts.in_queue,
            in_progress: counts.in_progress,
            completed: counts.completed,
            oldest_waiting_seconds: counts.oldest_waiting.map(|t| (now - t).as_seconds_f64().max(0.0)),
            cancelled,
        })
    }

    /// Finds the one revision of `app` whose id starts with `prefix`.
    pub(crate) async fn find_revision(&self, app: &App, prefix: &str) -> Result<Revision, ApiError> {
        revision_by_prefix(&self.store, app.id, &app.name, prefix).await
    }

    /// Removes an artifact's file; the caller has made sure no revision uses it.
    pub(crate) async fn free_artifact(&self, artifact: &str) {
        let Some(path) = self.layout.artifact(artifact) else { return };
        if let Err(e) = tokio::fs::remove_file(&path).await
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove artifact");
        }
    }
}

pub(crate) async fn remove_dir_logged(path: &std::path::Path) {
    if let Err(e) = tokio::fs::remove_dir_all(path).await
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove directory");
    }
}

pub(crate) fn internal(e: StoreError) -> ApiError {
    ApiError::internal(e)
}

/// Only keys that manage the team (admin, root) may change or inspect its apps.
fn require_manage(caller: &Caller) -> Result<(), ApiError> {
    if auth::may_manage(caller.scope) {
        Ok(())
    } else {
        Err(ApiError::new(ErrorCode::Forbidden, "this key can only call apps; managing them needs an admin key"))
    }
}

impl ControlPlane for Control {
    fn sandbox(&self) -> &'static str {
        match self.config.sandbox {
            supervisor::SandboxMode::Bwrap => "bwrap",
            supervisor::SandboxMode::None => "none",
        }
    }

    fn problems(&self) -> Vec<String> {
        self.fleet.problems()
    }

    fn metrics_public(&self) -> bool {
        self.config.metrics_public
    }

    fn limits(&self) -> &'static str {
        match self.fleet.shared.sandbox.cgroups().map(supervisor::Cgroups::version) {
            Some(supervisor::CgroupVersion::V1) => "cgroup-v1",
            Some(supervisor::CgroupVersion::V2) => "cgroup-v2",
            None => "none",
        }
    }

    fn metrics(&self) -> String {
        self.fleet.shared.refresh_gpu_metrics();
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        text
    }

    async fn authenticate(&self, authorization: Option<&str>, team: Option<&str>) -> Result<Caller, ApiError> {
        let unauthorized = |why: &str| ApiError::new(ErrorCode::Unauthorized, why.to_owned());
        let Some(header) = authorization else {
            return Err(unauthorized("missing API key: send 'Authorization: Key <id>:<secret>'"));
        };
        if auth::parse_authorization(header).is_none() {
            return Err(unauthorized("malformed API key in the Authorization header: expected 'Key <id>:<secret>'"));
        }
        let Some(key) = auth::verify(&self.store, header).await.map_err(internal)? else {
            return Err(unauthorized("invalid or revoked API key"));
        };
        let own = self
            .store
            .team_by_id(key.team_id)
            .await
            .map_err(internal)?
            .ok_or_else(|| ApiError::internal(format!("key {} belongs to a team that does not exist", key.id)))?;
        let team = match team {
            None => own,
            Some(name) if name == own.name => own,
            Some(name) if key.scope == KeyScope::Root => self
                .store
                .team_by_name(name)
                .await
                .map_err(internal)?
                .ok_or_else(|| ApiError::new(ErrorCode::TeamNotFound, format!("team {name:?} does not exist")))?,
            Some(name) => {
                return Err(ApiError::new(ErrorCode::Forbidden, format!("this key cannot act for team {name:?}")));
            }
        };
        Ok(Caller { key_id: key.id, scope: key.scope, team_id: team.id, team: team.name })
    }

    async fn list_apps(&self, caller: &Caller) -> Result<Vec<AppJson>, ApiError> {
        require_manage(caller)?;
        let apps = self.store.list_apps(caller.team_id).await.map_err(internal)?;
        Ok(apps
            .iter()
            .map(|app| {
                AppJson::new(app, &caller.team, self.fleet.runners_anywhere(app.id))
                    .with_problem(self.fleet.problem(app.id))
            })
            .collect())
    }

    async fn get_app(&self, caller: &Caller, app: &str) -> Result<AppJson, ApiError> {
        require_manage(caller)?;
        let app = self.find_app(caller, app).await?;
        Ok(AppJson::new(&app, &caller.team, self.fleet.live_runners(app.id, None))
            .with_problem(self.fleet.problem(app.id)))
    }

    async fn delete_app(&self, caller: &Caller, name: &str) -> Result<(), ApiError> {
        require_manage(caller)?;
        let _guard = self.lock_app(caller.team_id, name).await;
        let app = self.find_app(caller, name).await?;
        let revisions = self.store.list_revisions(app.id, None).await.map_err(internal)?;
        self.fleet.remove(app.id, &caller.team, &app.name).await;
        let _artifacts = self.artifact_lock.lock().await;
        let orphaned = self.store.delete_app(app.id).await.map_err(internal)?;
        for revision in &revisions {
            remove_dir_logged(&self.layout.revision(revision.id)).await;
        }
        for artifact in &orphaned {
            self.free_artifact(artifact).await;
        }
        remove_dir_logged(&self.layout.app_cache(app.id)).await;
        tracing::info!(team = %caller.team, app = %name, key = %caller.key_id, "app deleted");
        Ok(())
    }

    async fn app_cache(&self, caller: &Caller, name: &str, clear: bool) -> Result<api::wire::CacheJson, ApiError> {
        require_manage(caller)?;
        let app = self.find_app(caller, name).await?;
        let dir = self.layout.app_cache(app.id);
        let (files, bytes) = tokio::task::spawn_blocking(move || crate::layout::measure_dir(&dir, clear))
            .await
            .map_err(ApiError::internal)?
            .map_err(ApiError::internal)?;
        if clear {
            tracing::info!(team = %caller.team, app = %name, files, bytes, key = %caller.key_id, "app cache cleared");
        }
        Ok(api::wire::CacheJson { app: app.name, files, bytes, cleared: clear })
    }

    async fn deploy(&self, caller: &Caller, params: DeployParams, archive: Body) -> Result<DeployJson, ApiError> {
        require_manage(caller)?;
        self.start_deploy(caller, params, archive).await
    }

    async fn list_revisions(
        &self,
        caller: &Caller,
        app: &str,
        query: RevisionsQuery,
    ) -> Result<RevisionList, ApiError> {
        require_manage(caller)?;
        let app = self.find_app(caller, app).await?;
        let limit = if query.all { None } else { Some(query.limit.unwrap_or(DEFAULT_REVISION_LIMIT)) };
        let mut revisions = self.store.list_revisions(app.id, limit).await.map_err(internal)?;
        let total = match limit {
            Some(limit) if revisions.len() as u64 >= u64::from(limit) => {
                self.store.count_revisions(app.id).await.map_err(internal)?
            }
            _ => revisions.len() as u64,
        };
        // The current revision is always shown, even when it is older than the page.
        if let Some(current) = app.current_revision
            && !revisions.iter().any(|r| r.id == current)
            && let Some(revision) = self.store.revision(current).await.map_err(internal)?
        {
            revisions.push(revision);
        }
        // The app's runners, counted by revision once, not once per revision.
        let mut live = std::collections::HashMap::new();
        for runner in self.fleet.runners(app.id).iter().filter(|r| !r.state.is_terminal()) {
            *live.entry(runner.revision).or_insert(0u32) += 1;
        }
        let revisions = revisions
            .iter()
            .map(|r| {
                let runners = live.get(&r.id).copied().unwrap_or(0);
                RevisionJson::new(r, &app, runners)
            })
            .collect();
        Ok(RevisionList { revisions, total })
    }

    async fn get_revision(&self, caller: &Caller, app: &str, revision: &str) -> Result<RevisionJson, ApiError> {
        require_manage(caller)?;
        let app = self.find_app(caller, app).await?;
        let rev = self.find_revision(&app, revision).await?;
        Ok(RevisionJson::new(&rev, &app, self.fleet.live_runners(app.id, Some(rev.id))))
    }

    async fn revision_log(
        &self,
        caller: &Caller,
        app: &str,
        revision: &str,
        offset: u64,
    ) -> Result<LogChunk, ApiError> {
        require_manage(caller)?;
        let app = self.find_app(caller, app).await?;
        let rev = self.find_revision(&app, revision).await?;
        read_log_chunk(&self.layout.build_log(rev.id), offset).await
    }

    async fn delete_revision(&self, caller: &Caller, app: &str, revision: &str) -> Result<RevisionJson, ApiError> {
        require_manage(caller)?;
        let _guard = self.lock_app(caller.team_id, app).await;
        let app = self.find_app(caller, app).await?;
        let rev = self.find_revision(&app, revision).await?;
        if app.current_revision == Some(rev.id) {
            return Err(ApiError::new(
                ErrorCode::CurrentRevision,
                format!(
                    "revision {} is the current revision of app {:?} and cannot be deleted; \
                     switch the app to another revision first (hangar apps set-rev {} REV)",
                    rev.id, app.name, app.name
                ),
            ));
        }
        if app.traffic.iter().any(|s| s.revision == rev.id) {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!(
                    "revision {} takes a share of app {:?}'s calls and cannot be deleted; \
                     end the split first (hangar apps traffic {} --clear)",
                    rev.id, app.name, app.name
                ),
            ));
        }
        let _artifacts = self.artifact_lock.lock().await;
        let orphaned = self.store.delete_revision(rev.id).await.map_err(internal)?;
        self.store
            .add_history(NewHistory {
                app_id: app.id,
                action: "delete_rev".to_owned(),
                key_id: Some(caller.key_id.clone()),
                details: format!("revision {} deleted ({})", rev.id, rev.status.as_str()),
            })
            .await
            .map_err(internal)?;
        remove_dir_logged(&self.layout.revision(rev.id)).await;
        if let Some(artifact) = orphaned {
            self.free_artifact(&artifact).await;
        }
        Ok(RevisionJson::new(&rev, &App { current_revision: None, traffic: Vec::new(), ..app }, 0))
    }

    async fn scale(&self, caller: &Caller, app: &str, request: ScaleRequest) -> Result<ScaleJson, ApiError> {
        require_manage(caller)?;
        self.scale_app(caller, app, request).await
    }

    async fn list_runners(
        &self,
        caller: &Caller,
        app: Option<&str>,
        query: RunnersQuery,
    ) -> Result<Vec<RunnerJson>, ApiError> {
        require_manage(caller)?;
        self.runners_json(caller, app, query).await
    }

    async fn stop_runner(&self, caller: &Caller, runner: &str, replace: bool) -> Result<RunnerJson, ApiError> {
        require_manage(caller)?;
        self.stop_or_kill(caller, runner, Some(replace)).await
    }

    async fn kill_runner(&self, caller: &Caller, runner: &str) -> Result<RunnerJson, ApiError> {
        require_manage(caller)?;
        self.stop_or_kill(caller, runner, None).await
    }

    async fn runner_log(&self, caller: &Caller, runner: &str, offset: u64) -> Result<LogChunk, ApiError> {
        require_manage(caller)?;
        self.runner_log_chunk(caller, runner, offset).await
    }

    async fn exec_allowed(&self, caller: &Caller, runner: &str) -> Result<(), ApiError> {
        require_manage(caller)?;
        self.exec_runner_check(caller, runner).await.map(|_| ())
    }

    async fn exec(
        &self,
        caller: &Caller,
        runner: &str,
        command: Vec<String>,
        tty: Option<model::records::TermSize>,
    ) -> Result<api::exec::ExecStreams, ApiError> {
        require_manage(caller)?;
        self.exec_in_runner(caller, runner, command, tty).await
    }

    async fn list_gpus(&self, caller: &Caller) -> Result<Vec<GpuJson>, ApiError> {
        require_manage(caller)?;
        let shared = &self.fleet.shared;
        if shared.backend.cluster().is_some() {
            return self.cluster_gpus(caller).await;
        }
        let holders = shared.capacity.holders();
        let own = format!("{}/", caller.team);
        let gpus = shared.gpus.all().iter().zip(holders).map(|(gpu, holder)| {
            let usage = shared.gpus.usage(gpu);
            // Another team's app is not named, only that the GPU is taken.
            let seen = holder.as_ref().filter(|(_, app)| caller.scope == KeyScope::Root || app.starts_with(&own));
            GpuJson {
                id: gpu.id.clone(),
                index: gpu.index,
                name: gpu.name.clone(),
                memory: gpu.memory,
                held: holder.is_some(),
                app: seen.map(|(_, app)| app.clone()),
                runner: seen.map(|(runner, _)| runner.to_string()),
                utilization: usage.map(|u| u.utilization),
                memory_used: usage.map(|u| u.memory_used),
                node: None,
            }
        });
        Ok(gpus.collect())
    }

    async fn set_rev(&self, caller: &Caller, app: &str, request: SetRevRequest) -> Result<AppJson, ApiError> {
        require_manage(caller)?;
        self.set_revision(caller, app, request).await
    }

    async fn traffic(&self, caller: &Caller, app: &str, request: TrafficRequest) -> Result<AppJson, ApiError> {
        require_manage(caller)?;
        self.set_traffic(caller, app, request).await
    }

    async fn guard(&self, caller: &Caller, app: &str, request: GuardRequest) -> Result<AppJson, ApiError> {
        require_manage(caller)?;
        self.set_guard(caller, app, request).await
    }

    async fn queue(&self, caller: &Caller, app: &str) -> Result<QueueJson, ApiError> {
        require_manage(caller)?;
        let app = self.find_app(caller, app).await?;
        self.queue_json(&app, None).await
    }

    async fn charts(&self, caller: &Caller, app: &str) -> Result<ChartsJson, ApiError> {
        require_manage(caller)?;
        let app = self.find_app(caller, app).await?;
        // An app this server does not run (it has no revision yet) has no history.
        let points = self.fleet.get(app.id).map(|h| h.chart_points()).unwrap_or_default();
        Ok(ChartsJson {
            interval_seconds: self.config.chart_interval.as_secs_f64(),
            points: points.iter().map(chart_point_json).collect(),
        })
    }

    async fn flush_queue(&self, caller: &Caller, name: &str) -> Result<QueueJson, ApiError> {
        require_manage(caller)?;
        let _guard = self.lock_app(caller.team_id, name).await;
        let app = self.find_app(caller, name).await?;
        let queue = self.fleet.queue().ok_or_else(|| ApiError::internal("the queue is not running"))?;
        let cancelled = queue.flush(app.id).await.map_err(internal)?;
        let history = NewHistory {
            app_id: app.id,
            action: "queue_flush".to_owned(),
            key_id: Some(caller.key_id.clone()),
            details: format!("{cancelled} waiting requests cancelled"),
        };
        self.store.add_history(history).await.map_err(internal)?;
        self.queue_json(&app, Some(cancelled)).await
    }

    async fn rollout(&self, caller: &Caller, app: &str, request: RolloutRequest) -> Result<RolloutJson, ApiError> {
        require_manage(caller)?;
        self.rollout_app(caller, app, request.force).await
    }

    async fn suspend(&self, caller: &Caller, app: &str, suspend: bool) -> Result<AppJson, ApiError> {
        require_manage(caller)?;
        self.suspend_app(caller, app, suspend).await
    }

    async fn list_teams(&self, caller: &Caller) -> Result<Vec<TeamJson>, ApiError> {
        self.teams(caller).await
    }

    async fn create_team(&self, caller: &Caller, request: CreateTeamRequest) -> Result<CreatedTeamJson, ApiError> {
        self.new_team(caller, &request.name).await
    }

    async fn list_keys(&self, caller: &Caller) -> Result<Vec<KeyJson>, ApiError> {
        require_manage(caller)?;
        self.keys(caller).await
    }

    async fn create_key(&self, caller: &Caller, request: CreateKeyRequest) -> Result<CreatedKeyJson, ApiError> {
        require_manage(caller)?;
        self.new_key(caller, &request.scope, request.description).await
    }

    async fn revoke_key(&self, caller: &Caller, id: &str) -> Result<KeyJson, ApiError> {
        require_manage(caller)?;
        self.revoke(caller, id).await
    }

    async fn list_secrets(&self, caller: &Caller) -> Result<Vec<SecretJson>, ApiError> {
        require_manage(caller)?;
        self.secret_list(caller).await
    }

    async fn set_secrets(&self, caller: &Caller, request: SetSecretsRequest) -> Result<Vec<SecretJson>, ApiError> {
        require_manage(caller)?;
        self.secret_set(caller, request.values).await
    }

    async fn unset_secret(&self, caller: &Caller, name: &str) -> Result<(), ApiError> {
        require_manage(caller)?;
        self.secret_unset(caller, name).await
    }

    async fn history(&self, caller: &Caller, app: &str) -> Result<Vec<HistoryJson>, ApiError> {
        require_manage(caller)?;
        let app = self.find_app(caller, app).await?;
        let entries = self.store.list_history(app.id).await.map_err(internal)?;
        Ok(entries.iter().map(HistoryJson::from).collect())
    }
}

/// Reads at most 64 KiB of a log from `offset`. An offset at or past the end (any `u64`)
/// reads nothing: the log may grow there yet.
async fn read_log_chunk(path: &std::path::Path, offset: u64) -> Result<LogChunk, ApiError> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let nothing = LogChunk { data: String::new(), next_offset: offset };
    let mut file = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(nothing),
        Err(e) => return Err(ApiError::internal(format!("cannot open {}: {e}", path.display()))),
    };
    let len = file.metadata().await.map_err(ApiError::internal)?.len();
    // Seeking past i64::MAX fails, so an offset past the end is answered without seeking.
    if offset >= len {
        return Ok(nothing);
    }
    file.seek(std::io::SeekFrom::Start(offset)).await.map_err(ApiError::internal)?;
    let mut buf = Vec::new();
    file.take(64 * 1024).read_to_end(&mut buf).await.map_err(ApiError::internal)?;
    let next_offset = offset + buf.len() as u64;
    Ok(LogChunk { data: String::from_utf8_lossy(&buf).into_owned(), next_offset })
}

/// The one revision of the app `app_id` (called `name`) whose id starts with `prefix`.
pub(crate) async fn revision_by_prefix(
    store: &Store,
    app_id: Uuid,
    name: &str,
    prefix: &str,
) -> Result<Revision, ApiError> {
    if !is_id_prefix(prefix) {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            format!("{prefix:?} is not a revision id or a prefix of one (hex digits and '-')"),
        ));
    }
    let mut found = store.revisions_by_prefix(app_id, prefix).await.map_err(internal)?;
    match found.len() {
        0 => {
            Err(ApiError::new(ErrorCode::RevisionNotFound, format!("app {name:?} has no revision matching {prefix:?}")))
        }
        1 => Ok(found.remove(0)),
        n => Err(ApiError::new(
            ErrorCode::AmbiguousRevision,
            format!(
                "{prefix:?} matches {n} revisions of app {name:?} ({}); give more of the id",
                found.iter().map(|r| r.id.to_string()).collect::<Vec<_>>().join(", ")
            ),
        )),
    }
}

/// Finds the revisions that calls through the gateway pin.
pub(crate) struct GatewayRevisions {
    pub(crate) store: Store,
}

impl gateway::RevisionFinder for GatewayRevisions {
    fn deployed<'a>(
        &'a self,
        route: &'a gateway::AppRoute,
        prefix: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<model::ids::RevisionId, ApiError>> + Send + 'a>>
    {
        Box::pin(async move {
            let revision = revision_by_prefix(&self.store, route.app_id, &route.app, prefix).await?;
            match revision.status {
                model::revision::RevisionStatus::Deployed => Ok(revision.id),
                status => Err(ApiError::new(
                    ErrorCode::Conflict,
                    format!(
                        "revision {} of app {:?} is {}; only a deployed revision can be called",
                        revision.id,
                        route.app,
                        status.as_str()
                    ),
                )),
            }
        })
    }
}

/// A chart point as the API shows it.
fn chart_point_json(point: &crate::charts::Point) -> ChartPointJson {
    use model::revision::RunnerState;
    let runners =
        |state: RunnerState| crate::charts::STATES.iter().position(|s| *s == state).map_or(0, |i| point.runners[i]);
    let ms = |d: Option<std::time::Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
    ChartPointJson {
        t: point.unix_ms,
        revisions: point
            .rates
            .iter()
            .map(|r| RevisionRateJson {
                revision: r.revision.to_string(),
                calls_per_s: r.calls_per_s,
                errors_per_s: r.errors_per_s,
            })
            .collect(),
        p50_ms: ms(point.p50),
        p95_ms: ms(point.p95),
        runners: RunnerCountsJson {
            pending: runners(RunnerState::Pending),
            setup: runners(RunnerState::Setup),
            idle: runners(RunnerState::Idle),
            running: runners(RunnerState::Running),
            draining: runners(RunnerState::Draining),
            terminating: runners(RunnerState::Terminating),
            crash_backoff: runners(RunnerState::CrashBackoff),
        },
        queued: point.queued,
        cold_starts: point.cold_starts,
    }
}
