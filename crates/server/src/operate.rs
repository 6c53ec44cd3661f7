//! Operations on running apps: listing, stopping and killing runners, reading their
//! logs, and changing an app's scaling values.

use api::error::{ApiError, ErrorCode};
use api::router::Caller;
use api::wire::{
    AppJson, GuardRequest, LogChunk, RolloutJson, RunnerJson, RunnersQuery, ScaleJson, ScaleRequest, SetRevRequest,
    TrafficRequest,
};
use model::ids::{RunnerId, is_id_prefix};
use model::lifecycle::{RevisionEvent, revision_next};
use model::manifest::{MAX_SECONDS, Manifest};
use model::records::{App, GuardSettings, GuardWatch, Revision, RunnerInfo, TermSize, TrafficShare};
use model::revision::{AuthMode, RevisionStatus, RunnerState, Strategy};
use store::NewHistory;
use time::OffsetDateTime;
use tokio::sync::oneshot;

use crate::control::{Control, internal};
use crate::controller::{Activate, Command};
use crate::placement::Need;

impl Control {
    /// The GPUs a cluster gave the live runners the caller may see (its team's; every
    /// team's for a root key), each as its node numbers it.
    pub(crate) async fn cluster_gpus(&self, caller: &Caller) -> Result<Vec<api::wire::GpuJson>, ApiError> {
        let root = caller.scope == model::revision::KeyScope::Root;
        let teams =
            self.store.list_teams().await.map_err(internal)?.into_iter().filter(|t| root || t.id == caller.team_id);
        let mut gpus = Vec::new();
        for team in teams {
            for app in self.store.list_apps(team.id).await.map_err(internal)? {
                for runner in self.fleet.runners(app.id).into_iter().filter(|r| !r.state.is_terminal()) {
                    for gpu in &runner.gpus {
                        gpus.push(api::wire::GpuJson {
                            id: gpu.clone(),
                            index: gpu.parse().unwrap_or(0),
                            name: None,
                            memory: None,
                            held: true,
                            app: Some(format!("{}/{}", team.name, app.name)),
                            runner: Some(runner.id.to_string()),
                            utilization: None,
                            memory_used: None,
                            node: runner.node.clone(),
                        });
                    }
                }
            }
        }
        gpus.sort_by(|a, b| (&a.node, a.index).cmp(&(&b.node, b.index)));
        Ok(gpus)
    }

    pub(crate) async fn runners_json(
        &self,
        caller: &Caller,
        app: Option<&str>,
        query: RunnersQuery,
    ) -> Result<Vec<RunnerJson>, ApiError> {
        let states = match &query.state {
            Some(list) => Some(
                // Spaces around the commas are fine; other white space is not (the
                // OpenAPI document states the list's pattern).
                list.split(',')
                    .map(|s| {
                        RunnerState::parse(s.trim_matches(' ')).ok_or_else(|| {
                            ApiError::new(
                                ErrorCode::InvalidRequest,
                                format!(
                                    "unknown runner state {s:?}; states are: {}",
                                    RunnerState::ALL.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                                ),
                            )
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            None => None,
        };
        let apps = match app {
            Some(name) => vec![self.find_app(caller, name).await?],
            None => self.store.list_apps(caller.team_id).await.map_err(internal)?,
        };
        let cutoff =
            query.since.map(|s| OffsetDateTime::now_utc() - std::time::Duration::from_secs(s.min(MAX_SECONDS)));
        let mut runners: Vec<RunnerInfo> = apps
            .iter()
            .flat_map(|a| self.fleet.runners(a.id))
            .filter(|r| match &states {
                Some(states) => states.contains(&r.state),
                // `--since` asks for the runners that ended in its window too.
                None => !r.state.is_terminal() || cutoff.is_some(),
            })
            .filter(|r| !r.state.is_terminal() || cutoff.is_some_and(|c| r.ended_at.is_some_and(|t| t >= c)))
            .collect();
        runners.sort_by(|a, b| (&a.app, a.started_at).cmp(&(&b.app, b.started_at)));
        Ok(runners.iter().map(RunnerJson::new).collect())
    }

    /// Finds a runner of the caller's team by id or unique prefix.
    async fn find_runner(&self, caller: &Caller, prefix: &str) -> Result<(App, RunnerInfo), ApiError> {
        if !is_id_prefix(prefix) {
            return Err(ApiError::new(
                ErrorCode::InvalidRequest,
                format!("{prefix:?} is not a runner id or a prefix of one (hex digits and '-')"),
            ));
        }
        let prefix = prefix.to_ascii_lowercase();
        let mut found = Vec::new();
        for app in self.store.list_apps(caller.team_id).await.map_err(internal)? {
            for runner in self.fleet.runners(app.id) {
                if runner.id.to_string().starts_with(&prefix) {
                    found.push((app.clone(), runner));
                }
            }
        }
        match found.len() {
            0 => Err(ApiError::new(ErrorCode::RunnerNotFound, format!("no runner matches {prefix:?}"))),
            1 => Ok(found.remove(0)),
            n => Err(ApiError::new(
                ErrorCode::AmbiguousRunner,
                format!("{prefix:?} matches {n} runners; give more of the id"),
            )),
        }
    }

    pub(crate) async fn stop_or_kill(
        &self,
        caller: &Caller,
        prefix: &str,
        kill: Option<bool>,
    ) -> Result<RunnerJson, ApiError> {
        let (app, runner) = self.find_runner(caller, prefix).await?;
        let controller = self.fleet.get(app.id).ok_or_else(|| not_running(runner.id))?;
        let (reply, answer) = oneshot::channel();
        let command = match kill {
            None => Command::KillRunner { id: runner.id, reply },
            Some(replace) => Command::StopRunner { id: runner.id, replace, reply },
        };
        if !controller.send(command) {
            return Err(not_running(runner.id));
        }
        answer.await.map_err(|_| not_running(runner.id))?.map_err(|e| ApiError::new(ErrorCode::Conflict, e))?;
        let action = match kill {
            None => "runner_kill",
            Some(true) => "runner_replace",
            Some(false) => "runner_stop",
        };
        self.store
            .add_history(NewHistory {
                app_id: app.id,
                action: action.to_owned(),
                key_id: Some(caller.key_id.clone()),
                details: format!("runner {} of revision {}", runner.id, runner.revision),
            })
            .await
            .map_err(internal)?;
        let now = self.fleet.runners(app.id).into_iter().find(|r| r.id == runner.id).unwrap_or(runner);
        Ok(RunnerJson::new(&now))
    }

    pub(crate) async fn runner_log_chunk(
        &self,
        caller: &Caller,
        prefix: &str,
        offset: u64,
    ) -> Result<LogChunk, ApiError> {
        let (_, runner) = self.find_runner(caller, prefix).await?;
        let backend = self.fleet.shared.backend.clone();
        let read = tokio::task::spawn_blocking(move || backend.read_log(runner.id, offset))
            .await
            .map_err(ApiError::internal)?;
        match read {
            Ok((data, next_offset)) => Ok(LogChunk { data, next_offset }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(LogChunk { data: String::new(), next_offset: 0 }),
            Err(e) => Err(ApiError::internal(e)),
        }
    }

    /// The caller's runner `prefix`, if a command may be run in it now.
    pub(crate) async fn exec_runner_check(&self, caller: &Caller, prefix: &str) -> Result<(App, RunnerInfo), ApiError> {
        let (app, runner) = self.find_runner(caller, prefix).await?;
        if runner.state.is_terminal() {
            return Err(ApiError::new(ErrorCode::Conflict, format!("runner {} has ended", runner.id)));
        }
        Ok((app, runner))
    }

    /// Starts `command` in the caller's runner `prefix`, and records that in the app's
    /// history.
    pub(crate) async fn exec_in_runner(
        &self,
        caller: &Caller,
        prefix: &str,
        command: Vec<String>,
        tty: Option<TermSize>,
    ) -> Result<api::exec::ExecStreams, ApiError> {
        check_exec(&command, tty)?;
        let (app, runner) = self.exec_runner_check(caller, prefix).await?;
        let session = match self.fleet.shared.backend.exec(runner.id, &command, tty) {
            Ok(session) => session,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let why = format!("runner {} is not running yet, or has ended", runner.id);
                return Err(ApiError::new(ErrorCode::Conflict, why));
            }
            Err(e) => return Err(ApiError::internal(format!("runner {}: a command could not start: {e}", runner.id))),
        };
        let shown = shell_words(&command);
        let terminal = if tty.is_some() { " (with a terminal)" } else { "" };
        self.store
            .add_history(NewHistory {
                app_id: app.id,
                action: "runner_exec".to_owned(),
                key_id: Some(caller.key_id.clone()),
                details: format!("runner {} of revision {}: {shown}{terminal}", runner.id, runner.revision),
            })
            .await
            .map_err(internal)?;
        Ok(api::exec::ExecStreams { input: session.input, output: session.output })
    }

    pub(crate) async fn scale_app(
        &self,
        caller: &Caller,
        name: &str,
        request: ScaleRequest,
    ) -> Result<ScaleJson, ApiError> {
        let _guard = self.lock_app(caller.team_id, name).await;
        let app = self.find_app(caller, name).await?;
        let mut scaling = app.scaling.clone();
        let mut runner = app.runner.clone();
        let mut changed = Vec::new();
        let mut warnings = Vec::new();
        let invalid = |m: String| ApiError::new(ErrorCode::InvalidRequest, m);
        if request == ScaleRequest::default() {
            return Err(invalid("no values given: name at least one value to change".to_owned()));
        }
        macro_rules! set {
            ($target:expr, $value:expr, $name:literal, $min:expr, $max:expr) => {
                if let Some(v) = $value {
                    if !($min..=$max).contains(&v) {
                        return Err(invalid(format!("{} must be between {} and {}, got {v}", $name, $min, $max)));
                    }
                    if $target != v {
                        $target = v;
                        changed.push($name.to_owned());
                    }
                }
            };
        }
        set!(scaling.keep_alive, request.keep_alive, "keep_alive", 0, MAX_SECONDS);
        set!(scaling.min_concurrency, request.min_concurrency, "min_concurrency", 0, u32::MAX);
        set!(scaling.max_concurrency, request.max_concurrency, "max_concurrency", 0, u32::MAX);
        set!(scaling.concurrency_buffer, request.concurrency_buffer, "concurrency_buffer", 0, u32::MAX);
        set!(scaling.concurrency_buffer_perc, request.concurrency_buffer_perc, "concurrency_buffer_perc", 0, 1000);
        set!(scaling.scaling_delay, request.scaling_delay, "scaling_delay", 0, MAX_SECONDS);
        set!(scaling.request_timeout, request.request_timeout, "request_timeout", 1, MAX_SECONDS);
        set!(runner.max_multiplexing, request.max_multiplexing, "max_multiplexing", 1, u32::MAX);
        set!(runner.startup_timeout, request.startup_timeout, "startup_timeout", 1, MAX_SECONDS);
        if let Some(machine_type) = request.machine_type {
            let machine_type =
                model::manifest::machine_type_list(&machine_type).map(str::trim).collect::<Vec<_>>().join(",");
            let known = |m: &&str| self.config.machine_types.contains_key(*m);
            if let Some(unknown) = model::manifest::machine_type_list(&machine_type).find(|m| !known(m)) {
                return Err(invalid(format!(
                    "unknown machine type {unknown:?} (this server defines: {})",
                    self.config.machine_types.keys().cloned().collect::<Vec<_>>().join(", ")
                )));
            }
            let need = Need { machine_types: &machine_type, num_gpus: runner.num_gpus };
            if let Some(why) = self.fleet.shared.capacity.never_fits(need) {
                return Err(invalid(format!("machine_type {machine_type:?}: this server cannot run it: {why}")));
            }
            if runner.machine_type != machine_type {
                runner.machine_type = machine_type;
                changed.push("machine_type".to_owned());
            }
        }
        if scaling.min_concurrency > scaling.max_concurrency {
            return Err(invalid(format!(
                "min_concurrency ({}) must not exceed max_concurrency ({})",
                scaling.min_concurrency, scaling.max_concurrency
            )));
        }
        for name in
            changed.iter().filter(|n| matches!(n.as_str(), "max_multiplexing" | "startup_timeout" | "machine_type"))
        {
            warnings.push(format!(
                "{name} is code-specific: the next deploy or set-rev resets it to that revision's manifest value"
            ));
        }
        if !changed.is_empty() {
            let details = changed
                .iter()
                .map(|n| format!("{n}={}", value_of(n, &scaling, &runner)))
                .collect::<Vec<_>>()
                .join(", ");
            self.store
                .update_app_values(
                    app.id,
                    scaling,
                    runner,
                    NewHistory {
                        app_id: app.id,
                        action: "scale".to_owned(),
                        key_id: Some(caller.key_id.clone()),
                        details,
                    },
                )
                .await
                .map_err(internal)?;
        }
        let app = self.find_app(caller, name).await?;
        self.configure(&app).await;
        let runners = self.fleet.live_runners(app.id, None);
        Ok(ScaleJson { app: AppJson::new(&app, &caller.team, runners), changed, warnings })
    }
}

fn value_of(name: &str, s: &model::manifest::Scaling, r: &model::manifest::RunnerSpec) -> String {
    match name {
        "keep_alive" => s.keep_alive.to_string(),
        "min_concurrency" => s.min_concurrency.to_string(),
        "max_concurrency" => s.max_concurrency.to_string(),
        "concurrency_buffer" => s.concurrency_buffer.to_string(),
        "concurrency_buffer_perc" => s.concurrency_buffer_perc.to_string(),
        "scaling_delay" => s.scaling_delay.to_string(),
        "request_timeout" => s.request_timeout.to_string(),
        "max_multiplexing" => r.max_multiplexing.to_string(),
        "startup_timeout" => r.startup_timeout.to_string(),
        "machine_type" => r.machine_type.clone(),
        _ => String::new(),
    }
}

/// The most arguments, and bytes of them, a command run in a runner may have.
const MAX_EXEC_ARGS: usize = 1024;
const MAX_EXEC_BYTES: usize = 64 * 1024;
/// The largest terminal, in rows or columns, a command may be given.
const MAX_TERM_CELLS: u16 = 4096;

/// Refuses a command that cannot be run: none, too long, with a NUL byte (which no
/// argument can carry), or a terminal of no size.
fn check_exec(command: &[String], tty: Option<TermSize>) -> Result<(), ApiError> {
    let invalid = |m: String| Err(ApiError::new(ErrorCode::InvalidRequest, m));
    if command.first().is_none_or(String::is_empty) {
        return invalid("command must name a program to run".to_owned());
    }
    if command.len() > MAX_EXEC_ARGS || command.iter().map(String::len).sum::<usize>() > MAX_EXEC_BYTES {
        return invalid(format!("command must have at most {MAX_EXEC_ARGS} arguments and {MAX_EXEC_BYTES} bytes"));
    }
    if let Some(at) = command.iter().position(|a| a.contains('\0')) {
        return invalid(format!("command argument {at} contains a NUL byte"));
    }
    if let Some(size) = tty
        && !(1..=MAX_TERM_CELLS).contains(&size.rows) | !(1..=MAX_TERM_CELLS).contains(&size.cols)
    {
        return invalid(format!(
            "the terminal must have 1 to {MAX_TERM_CELLS} rows and columns, got {}x{}",
            size.rows, size.cols
        ));
    }
    Ok(())
}

/// A command as a shell would take it, each argument quoted where it needs to be, cut
/// short past 200 characters: for the history.
fn shell_words(command: &[String]) -> String {
    let quoted: Vec<String> = command
        .iter()
        .map(|a| {
            let plain = !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
            if plain { a.clone() } else { format!("'{}'", a.replace('\'', r"'\''")) }
        })
        .collect();
    let text = quoted.join(" ");
    match text.char_indices().nth(200) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text,
    }
}

fn not_running(id: RunnerId) -> ApiError {
    ApiError::new(ErrorCode::Conflict, format!("runner {id} is not running"))
}

impl Control {
    pub(crate) async fn set_revision(
        &self,
        caller: &Caller,
        name: &str,
        request: SetRevRequest,
    ) -> Result<AppJson, ApiError> {
        let strategy = parse_choice("strategy", request.strategy.as_deref(), Strategy::parse, "rolling, recreate")?
            .unwrap_or_default();
        let auth = parse_choice("auth", request.auth.as_deref(), AuthMode::parse, "private, public, shared")?;
        // Checked once before waiting for the app's lock, so that a hopeless request
        // (say, for the revision a deploy is still building) is refused at once, and
        // again under the lock, where the answer counts.
        self.switchable(caller, name, &request.revision).await?;
        let guard = self.lock_app(caller.team_id, name).await;
        let (app, revision) = self.switchable(caller, name, &request.revision).await?;
        let conflict = |m: String| ApiError::new(ErrorCode::Conflict, m);
        let machine_types: Vec<&str> = self.config.machine_types.keys().map(String::as_str).collect();
        let manifest = Manifest::parse(&revision.manifest, Some(&machine_types))
            .map_err(|e| conflict(format!("revision {} cannot run on this server any more: {e}", revision.id)))?;
        if let Some(why) = self.fleet.shared.capacity.never_fits(Need::of(&manifest.runner)) {
            return Err(conflict(format!("revision {} cannot run on this server: {why}", revision.id)));
        }
        let from = app.current_revision.map_or_else(|| "none".to_owned(), |r| r.to_string());
        let mut details = format!("revision {from} -> {} ({})", revision.id, strategy.as_str());
        if let Some(auth) = auth {
            details.push_str(&format!("; auth {}", auth.as_str()));
        }
        let controller = self.fleet.controller(&app, &caller.team).await.map_err(ApiError::internal)?;
        crate::code::ensure(&self.fleet.shared, revision.id)
            .await
            .map_err(|e| conflict(format!("revision {} cannot run on this server: {e:#}", revision.id)))?;
        let (reply, answer) = oneshot::channel();
        let sent = controller.send(Command::Activate(Box::new(Activate {
            revision: revision.clone(),
            manifest,
            strategy,
            scaling: None,
            auth,
            guard: request.guard,
            history: NewHistory {
                app_id: app.id,
                action: "set_rev".to_owned(),
                key_id: Some(caller.key_id.clone()),
                details,
            },
            reply,
        })));
        // The switch is seen through, and the app stays locked until the controller has
        // answered and the outcome is recorded, whether or not the caller is still there
        // (a client that gave up drops this request, not the switch).
        let (store, app_id, key_id, revision_id) = (self.store.clone(), app.id, caller.key_id.clone(), revision.id);
        let outcome = tokio::spawn(async move {
            let _guard = guard;
            let result = if sent {
                answer.await.unwrap_or_else(|_| Err("interrupted".to_owned()))
            } else {
                Err("interrupted".to_owned())
            };
            if let Err(reason) = &result {
                store
                    .add_history(NewHistory {
                        app_id,
                        action: "set_rev_failed".to_owned(),
                        key_id: Some(key_id),
                        details: format!("revision {revision_id} did not come up: {reason}"),
                    })
                    .await?;
            }
            Ok::<_, store::StoreError>(result)
        });
        let result = outcome.await.map_err(ApiError::internal)?.map_err(internal)?;
        if let Err(reason) = result {
            return Err(conflict(format!(
                "revision {} did not come up, so app {name:?} stays on revision {from}: {reason}",
                revision.id
            )));
        }
        let app = self.find_app(caller, name).await?;
        Ok(AppJson::new(&app, &caller.team, self.fleet.live_runners(app.id, None)))
    }

    /// Has the app's controller, if it runs here, take the app's values as they now are
    /// in the store, and waits until it has.
    async fn configure(&self, app: &App) {
        if let Some(controller) = self.fleet.get(app.id) {
            let (reply, done) = oneshot::channel();
            if controller.send(Command::Configure { app: Box::new(app.clone()), reply }) {
                let _ = done.await;
            }
        }
    }

    /// Sets the app's traffic split: each share to a Deployed revision other than the
    /// current one, which takes the rest. No shares end the split. Calls in flight go
    /// on where they are; new ones follow the new split at once.
    pub(crate) async fn set_traffic(
        &self,
        caller: &Caller,
        name: &str,
        request: TrafficRequest,
    ) -> Result<AppJson, ApiError> {
        let _guard = self.lock_app(caller.team_id, name).await;
        let app = self.find_app(caller, name).await?;
        let invalid = |m: String| ApiError::new(ErrorCode::InvalidRequest, m);
        let conflict = |m: String| ApiError::new(ErrorCode::Conflict, m);
        if app.suspended {
            return Err(conflict(format!("app {name:?} is suspended; resume it first (hangar apps resume {name})")));
        }
        let Some(current) = app.current_revision else {
            return Err(conflict(format!("app {name:?} has no current revision to split calls with")));
        };
        if request.guard && request.shares.len() != 1 {
            return Err(invalid(format!(
                "the guard watches one canary at a time; {} shares were given",
                request.shares.len()
            )));
        }
        let machine_types: Vec<&str> = self.config.machine_types.keys().map(String::as_str).collect();
        let mut shares: Vec<TrafficShare> = Vec::new();
        for share in &request.shares {
            if !(1..=99).contains(&share.percent) {
                return Err(invalid(format!(
                    "the share of revision {:?} must be between 1 and 99 percent, got {}",
                    share.revision, share.percent
                )));
            }
            let revision = self.find_revision(&app, &share.revision).await?;
            if revision.id == current {
                return Err(conflict(format!(
                    "revision {} is the current revision of app {name:?}: it takes the calls the shares leave",
                    revision.id
                )));
            }
            if revision.status != RevisionStatus::Deployed {
                return Err(conflict(format!(
                    "revision {} is {}; only a Deployed revision can take a share of the calls",
                    revision.id,
                    revision.status.as_str()
                )));
            }
            if shares.iter().any(|s| s.revision == revision.id) {
                return Err(invalid(format!("revision {} is named twice", revision.id)));
            }
            let manifest = Manifest::parse(&revision.manifest, Some(&machine_types))
                .map_err(|e| conflict(format!("revision {} cannot run on this server any more: {e}", revision.id)))?;
            if let Some(why) = self.fleet.shared.capacity.never_fits(Need::of(&manifest.runner)) {
                return Err(conflict(format!("revision {} cannot run on this server: {why}", revision.id)));
            }
            shares.push(TrafficShare { revision: revision.id, percent: share.percent });
        }
        let given: u32 = shares.iter().map(|s| u32::from(s.percent)).sum();
        if given > 99 {
            return Err(invalid(format!(
                "the shares add up to {given} percent; they must leave the current revision at least 1"
            )));
        }
        let details = if shares.is_empty() {
            format!("split ended: revision {current} takes every call")
        } else {
            let named: Vec<String> = shares.iter().map(|s| format!("{}={}%", s.revision, s.percent)).collect();
            format!("{}; revision {current} (current) takes {}%", named.join(", "), 100 - given)
        };
        let history =
            NewHistory { app_id: app.id, action: "traffic".to_owned(), key_id: Some(caller.key_id.clone()), details };
        self.store.set_traffic(app.id, &shares, history).await.map_err(|e| match e {
            store::StoreError::Conflict(m) => conflict(m),
            e => internal(e),
        })?;
        // A guarded canary is watched from now on; a canary's watch ends with its share.
        let watch = match (&shares[..], request.guard || app.guard.enabled) {
            ([one], true) => Some(GuardWatch {
                revision: one.revision,
                previous: None,
                until: OffsetDateTime::now_utc() + std::time::Duration::from_secs(app.guard.window),
                baseline_calls: 0,
                baseline_errors: 0,
                baseline_p95_micros: None,
            }),
            _ => None,
        };
        let canary_watched = app.guard_watch.as_ref().is_some_and(|w| w.previous.is_none());
        if watch.is_some() || canary_watched {
            let history = watch.as_ref().map(|w| NewHistory {
                app_id: app.id,
                action: "guard_watch".to_owned(),
                key_id: Some(caller.key_id.clone()),
                details: format!(
                    "watching canary {} for {} s against the current revision",
                    w.revision, app.guard.window
                ),
            });
            self.store.set_guard_watch(app.id, watch, history).await.map_err(internal)?;
        }
        let app = self.find_app(caller, name).await?;
        self.configure(&app).await;
        Ok(AppJson::new(&app, &caller.team, self.fleet.live_runners(app.id, None)))
    }

    /// Changes how the app's guard judges revisions; what it watches now goes on.
    pub(crate) async fn set_guard(
        &self,
        caller: &Caller,
        name: &str,
        request: GuardRequest,
    ) -> Result<AppJson, ApiError> {
        let _guard = self.lock_app(caller.team_id, name).await;
        let app = self.find_app(caller, name).await?;
        let invalid = |m: String| ApiError::new(ErrorCode::InvalidRequest, m);
        if request == GuardRequest::default() {
            return Err(invalid(
                "no values given: name at least one of enabled, window, max_error_increase, max_p95_ratio".to_owned(),
            ));
        }
        let mut guard: GuardSettings = app.guard;
        let mut changed = Vec::new();
        if let Some(enabled) = request.enabled {
            guard.enabled = enabled;
            changed.push(format!("enabled={enabled}"));
        }
        if let Some(window) = request.window {
            if !(1..=86_400).contains(&window) {
                return Err(invalid(format!("window must be between 1 and 86400 seconds, got {window}")));
            }
            guard.window = window;
            changed.push(format!("window={window}"));
        }
        if let Some(points) = request.max_error_increase {
            if points > 100 {
                return Err(invalid(format!("max_error_increase must be between 0 and 100 points, got {points}")));
            }
            guard.max_error_increase = points;
            changed.push(format!("max_error_increase={points}"));
        }
        if let Some(ratio) = request.max_p95_ratio {
            if !(100..=100_000).contains(&ratio) {
                return Err(invalid(format!("max_p95_ratio must be between 100 and 100000 percent, got {ratio}")));
            }
            guard.max_p95_ratio = ratio;
            changed.push(format!("max_p95_ratio={ratio}"));
        }
        let history = NewHistory {
            app_id: app.id,
            action: "guard".to_owned(),
            key_id: Some(caller.key_id.clone()),
            details: changed.join(", "),
        };
        self.store.set_guard(app.id, guard, history).await.map_err(internal)?;
        let app = self.find_app(caller, name).await?;
        self.configure(&app).await;
        Ok(AppJson::new(&app, &caller.team, self.fleet.live_runners(app.id, None)))
    }

    /// The app and the revision `prefix` names, if that revision may become current.
    async fn switchable(&self, caller: &Caller, name: &str, prefix: &str) -> Result<(App, Revision), ApiError> {
        let app = self.find_app(caller, name).await?;
        let conflict = |m: String| ApiError::new(ErrorCode::Conflict, m);
        if app.suspended {
            return Err(conflict(format!("app {name:?} is suspended; resume it first (hangar apps resume {name})")));
        }
        let revision = self.find_revision(&app, prefix).await?;
        if app.current_revision == Some(revision.id) {
            return Err(conflict(format!("revision {} is already the current revision of app {name:?}", revision.id)));
        }
        // A Deploying revision becomes current only through its own deploy.
        if revision_next(revision.status, RevisionEvent::MadeCurrent).is_none()
            || revision.status == RevisionStatus::Deploying
        {
            let why = match revision.status {
                RevisionStatus::Failed => {
                    format!("failed ({})", revision.failure.as_deref().unwrap_or("no reason recorded"))
                }
                other => format!("is {}", other.as_str()),
            };
            return Err(conflict(format!(
                "revision {} {why}; only a Deployed revision can be made current",
                revision.id
            )));
        }
        Ok((app, revision))
    }

    pub(crate) async fn rollout_app(&self, caller: &Caller, name: &str, force: bool) -> Result<RolloutJson, ApiError> {
        let _guard = self.lock_app(caller.team_id, name).await;
        let app = self.find_app(caller, name).await?;
        let conflict = |m: String| ApiError::new(ErrorCode::Conflict, m);
        let Some(revision) = app.current_revision else {
            return Err(conflict(format!("app {name:?} has no current revision to roll out")));
        };
        if app.suspended {
            return Err(conflict(format!("app {name:?} is suspended; it has no runners to roll out")));
        }
        let controller = self.fleet.controller(&app, &caller.team).await.map_err(ApiError::internal)?;
        let (reply, answer) = oneshot::channel();
        if !controller.send(Command::Rollout { force, reply }) {
            return Err(ApiError::internal("the app's controller has ended"));
        }
        let runners = answer.await.map_err(|_| ApiError::internal("the app's controller has ended"))?;
        let details = if force {
            format!("forced rollout of revision {revision}: {} runners killed", runners.len())
        } else {
            format!("graceful rollout of revision {revision}: {} runners replaced", runners.len())
        };
        self.store
            .add_history(NewHistory {
                app_id: app.id,
                action: "rollout".to_owned(),
                key_id: Some(caller.key_id.clone()),
                details,
            })
            .await
            .map_err(internal)?;
        Ok(RolloutJson {
            app: app.name,
            revision: revision.to_string(),
            runners: runners.iter().map(|r| r.to_string()).collect(),
            force,
        })
    }

    pub(crate) async fn suspend_app(&self, caller: &Caller, name: &str, suspend: bool) -> Result<AppJson, ApiError> {
        let _guard = self.lock_app(caller.team_id, name).await;
        let app = self.find_app(caller, name).await?;
        if app.suspended == suspend {
            let state = if suspend { "already suspended" } else { "not suspended" };
            return Err(ApiError::new(ErrorCode::Conflict, format!("app {name:?} is {state}")));
        }
        let action = if suspend { "suspend" } else { "resume" };
        let details = match app.current_revision {
            Some(revision) => format!("app {action}ed on revision {revision}"),
            None => format!("app {action}ed"),
        };
        self.store
            .set_suspended(
                app.id,
                suspend,
                NewHistory { app_id: app.id, action: action.to_owned(), key_id: Some(caller.key_id.clone()), details },
            )
            .await
            .map_err(internal)?;
        let app = self.find_app(caller, name).await?;
        if app.current_revision.is_some() {
            let controller = self.fleet.controller(&app, &caller.team).await.map_err(ApiError::internal)?;
            let (reply, done) = oneshot::channel();
            if controller.send(Command::Configure { app: Box::new(app.clone()), reply }) {
                let _ = done.await;
            }
        }
        Ok(AppJson::new(&app, &caller.team, self.fleet.live_runners(app.id, None)))
    }
}

pub(crate) fn parse_choice<T>(
    name: &str,
    value: Option<&str>,
    parse: fn(&str) -> Option<T>,
    choices: &str,
) -> Result<Option<T>, ApiError> {
    match value {
        None => Ok(None),
        Some(v) => parse(v)
            .map(Some)
            .ok_or_else(|| ApiError::new(ErrorCode::InvalidRequest, format!("{name} {v:?} is not one of: {choices}"))),
    }
}
