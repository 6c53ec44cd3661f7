//! One controller per app: the only writer of the app's runners and alias. Deploys,
//! `runners stop`/`kill`, `apps scale`, crashes, health failures and load all arrive
//! here, as [`Command`]s from the control plane or [`Event`]s from the supervisor, and
//! every change of runners happens in [`Controller::reconcile`], which compares what
//! is with what should be (level-triggered) after each of them and on a short tick.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use autoscaler::{Decision, Observed, Phase as ScalePhase, Policy, Runner as ScaleRunner};
use gateway::{AppRoute, CutOff, Figures, RouteConfig, RouteSnapshot};
use model::ids::{RevisionId, RunnerId};
use model::lifecycle::{self, RunnerEffect, RunnerEvent};
use model::manifest::{Manifest, RunnerSpec, Scaling};
use model::records::{App, GuardWatch, Revision, RunnerInfo, TrafficShare};
use model::revision::{AuthMode, RunnerState, Strategy};
use store::{Activation, NewHistory};
use supervisor::{Event, HealthPolicy, Phase, RunnerHandle, RunnerLaunch};
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::fleet::{AppLabels, Shared, StateLabels};
use crate::placement::{Capacity, Need, Placement};

/// How often a controller looks again when nothing has happened.
/// The longest a controller sleeps when nothing is due: what changes without an event
/// (ended runners aging out of the listing) can wait this long. Everything else wakes
/// it: commands, runner events, route changes (calls arriving, finishing, timing out),
/// freed capacity, and the deadlines it keeps (back-offs, activations, the autoscaler's
/// next recheck).
const IDLE_WAKE: Duration = Duration::from_secs(30);

/// While calls are in flight, the controller looks again this often: load and idle time
/// change with every call, and calls do not wake it one by one.
const BUSY_TICK: Duration = Duration::from_millis(200);
/// Longest back-off between attempts to start a failing runner.
const MAX_BACKOFF: Duration = Duration::from_secs(600);
/// How long ended runners stay listed (`--since`).
const KEEP_ENDED: Duration = Duration::from_secs(3600);
/// The most ended runners kept per app.
const MAX_ENDED: usize = 200;

pub(crate) enum Command {
    /// Make a built revision current.
    Activate(Box<Activate>),
    /// Change the app's scaling values (the store is already updated).
    Configure { app: Box<App>, reply: oneshot::Sender<()> },
    /// Drain and stop one runner; with `replace`, start its replacement first.
    StopRunner { id: RunnerId, replace: bool, reply: oneshot::Sender<Result<(), String>> },
    /// Kill one runner at once.
    KillRunner { id: RunnerId, reply: oneshot::Sender<Result<(), String>> },
    /// Replace every runner (graceful: set up a replacement first where there is room;
    /// force: kill them all now). Answers with the runners being replaced.
    Rollout { force: bool, reply: oneshot::Sender<Vec<RunnerId>> },
    /// Stop every runner (draining first) and end.
    Shutdown { reply: oneshot::Sender<()> },
}

pub(crate) struct Activate {
    pub(crate) revision: Revision,
    pub(crate) manifest: Manifest,
    pub(crate) strategy: Strategy,
    /// Runtime-tunable values to install, or `None` to keep the app's.
    pub(crate) scaling: Option<Scaling>,
    pub(crate) auth: Option<AuthMode>,
    /// Watch the revision after the switch (so does the app's guard setting).
    pub(crate) guard: bool,
    pub(crate) history: NewHistory,
    /// `Err` carries the reason the revision failed.
    pub(crate) reply: oneshot::Sender<Result<(), String>>,
}

struct Runner {
    id: RunnerId,
    revision: RevisionId,
    manifest: Arc<Manifest>,
    state: RunnerState,
    handle: Option<RunnerHandle>,
    started_at: OffsetDateTime,
    ended_at: Option<OffsetDateTime>,
    /// While in CrashBackoff: when to try again.
    retry_at: Option<Instant>,
    /// Marked to be replaced; `replacement` is the runner that takes over.
    replacing: bool,
    replacement: Option<RunnerId>,
    /// Its room on a machine type and its GPUs, from its start until its process ended.
    capacity: Option<Placement>,
    /// Where it was placed (kept once it has ended, for listings): the machine type
    /// and its GPUs' ids.
    placed: Option<(String, Vec<String>)>,
    /// The cluster's node it was placed on, for a runner a cluster placed.
    node: Option<String>,
    /// Launched, and waiting in the cluster's queue for what `reason` says: shown as
    /// Pending.
    queued: bool,
    reason: Option<String>,
}

impl Runner {
    fn new(revision: RevisionId, manifest: Arc<Manifest>) -> Runner {
        Runner {
            id: RunnerId::new(),
            revision,
            manifest,
            state: RunnerState::Pending,
            handle: None,
            started_at: OffsetDateTime::now_utc(),
            ended_at: None,
            retry_at: None,
            replacing: false,
            replacement: None,
            capacity: None,
            placed: None,
            node: None,
            queued: false,
            reason: None,
        }
    }

    fn is_live(&self) -> bool {
        !matches!(self.state, RunnerState::Terminated)
    }

    fn is_set_up(&self) -> bool {
        matches!(self.state, RunnerState::Idle | RunnerState::Running)
    }

    /// Waiting for room: in this server's placer, or in the cluster's queue for its
    /// resources (other jobs hold them).
    fn waits_for_room(&self, capacity: &Capacity) -> bool {
        match self.state {
            RunnerState::Pending => !capacity.has_room(Need::of(&self.manifest.runner)),
            RunnerState::Setup => self.queued && self.reason.as_deref().is_some_and(|r| r.contains(QUEUED_FOR_ROOM)),
            _ => false,
        }
    }
}

/// Slurm's reason for a job that waits until other jobs free what it asks for.
const QUEUED_FOR_ROOM: &str = "Resources";

/// A rolling activation waiting for its first runner to be set up.
struct PendingActivation {
    activate: Activate,
    runner: RunnerId,
    deadline: Instant,
}

pub(crate) struct Controller {
    app: App,
    team: String,
    route: Arc<AppRoute>,
    shared: Arc<Shared>,
    view: Arc<Mutex<Vec<RunnerInfo>>>,
    current: Option<(RevisionId, Arc<Manifest>)>,
    /// Other revisions that take calls: those with a share of the split, and those that
    /// calls pin. Each scales on its own calls; one with neither a share nor runners
    /// left is forgotten.
    others: Vec<(RevisionId, Arc<Manifest>)>,
    runners: Vec<Runner>,
    pending: Option<PendingActivation>,
    /// Failed starts in a row of the current revision, for the back-off.
    failures: u32,
    events_tx: mpsc::UnboundedSender<Event>,
    events: mpsc::UnboundedReceiver<Event>,
    /// Set once the controller is winding down; holds who waits for the end.
    shutting_down: Option<Vec<oneshot::Sender<()>>>,
    /// When the autoscaler wants to decide again with no new event.
    recheck_at: Option<Instant>,
    /// Whether calls were in flight or waiting when the controller last looked.
    loaded: bool,
    /// What the guard watches, with the figures it counts from.
    watch: Option<Watch>,
}

/// A revision the guard watches: what the store keeps of it, and the figures of the
/// watched revision (and, for a canary, of the current one) when the watch began here.
struct Watch {
    stored: GuardWatch,
    start: Figures,
    current_start: Figures,
}

impl Controller {
    /// Prepares the controller of `app`, reading its current revision.
    pub(crate) async fn load(
        app: App,
        team: &str,
        route: Arc<AppRoute>,
        shared: Arc<Shared>,
        view: Arc<Mutex<Vec<RunnerInfo>>>,
    ) -> anyhow::Result<Controller> {
        let current = match app.current_revision {
            Some(id) => Some((id, load_revision(&shared, &app, id).await?)),
            None => None,
        };
        route.set_revision(current.as_ref().map(|(id, _)| *id));
        route.set_split(app.traffic.iter().map(|s| (s.revision, s.percent)).collect());
        let watch = app.guard_watch.clone().map(|stored| Watch::begin(&route, stored, current.as_ref().map(|c| c.0)));
        let (events_tx, events) = mpsc::unbounded_channel();
        Ok(Controller {
            app,
            team: team.to_owned(),
            route,
            shared,
            view,
            current,
            others: Vec::new(),
            runners: Vec::new(),
            pending: None,
            failures: 0,
            events_tx,
            events,
            shutting_down: None,
            recheck_at: None,
            loaded: false,
            watch,
        })
    }

    pub(crate) async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let shared = self.shared.clone();
        let route = self.route.clone();
        let mut orphaned = false;
        // A controller started with the server brings its app's minimum up at once, not
        // when something first happens.
        self.reconcile().await;
        self.publish();
        loop {
            let wake_at = self.wake_at();
            tokio::select! {
                command = commands.recv(), if !orphaned => match command {
                    Some(command) => self.command(command).await,
                    // Nobody can reach this controller any more: wind down.
                    None => {
                        orphaned = true;
                        self.begin_shutdown(None);
                    }
                },
                Some(event) = self.events.recv() => self.event(event).await,
                () = route.changed() => {}
                () = route.became_busy(), if !self.loaded => {}
                () = shared.capacity.freed() => {}
                () = tokio::time::sleep_until(wake_at) => {}
            }
            self.reconcile().await;
            self.publish();
            if self.shutting_down.is_some() && !self.runners.iter().any(Runner::is_live) {
                for reply in self.shutting_down.take().into_iter().flatten() {
                    let _ = reply.send(());
                }
                return;
            }
        }
    }

    /// The next moment something falls due: a back-off running out, an activation's
    /// deadline, the autoscaler's recheck; at the latest [`IDLE_WAKE`] from now.
    fn wake_at(&self) -> Instant {
        let retries = self.runners.iter().filter(|r| r.state == RunnerState::CrashBackoff).filter_map(|r| r.retry_at);
        // The deadline counts only while its runner waits for room: once it is setting
        // up, its own startup timeout ends the wait.
        let deadline = self.pending.as_ref().filter(|_| self.candidate_waits_for_room()).map(|p| p.deadline);
        let latest = Instant::now() + if self.loaded { BUSY_TICK } else { IDLE_WAKE };
        retries.chain(deadline).chain(self.recheck_at).fold(latest, Instant::min)
    }

    /// Whether the runner a rolling switch waits for is still waiting for room.
    fn candidate_waits_for_room(&self) -> bool {
        let candidate = self.pending.as_ref().map(|p| p.runner);
        self.runners.iter().any(|r| Some(r.id) == candidate && r.state == RunnerState::Pending)
    }

    async fn command(&mut self, command: Command) {
        match command {
            Command::Activate(activate) => self.activate(*activate).await,
            Command::Configure { app, reply } => {
                self.set_app(*app);
                let _ = reply.send(());
            }
            Command::StopRunner { id, replace, reply } => {
                let _ = reply.send(self.stop_runner(id, replace));
            }
            Command::KillRunner { id, reply } => {
                let result = match self.runners.iter_mut().find(|r| r.id == id && r.is_live()) {
                    Some(runner) => {
                        self.route.cut_off(id, CutOff::Killed);
                        kill(&self.route, &self.shared.capacity, runner, "killed on request");
                        Ok(())
                    }
                    None => Err(format!("runner {id} is not running")),
                };
                let _ = reply.send(result);
            }
            Command::Rollout { force, reply } => {
                let _ = reply.send(self.rollout(force));
            }
            Command::Shutdown { reply } => self.begin_shutdown(Some(reply)),
        }
    }

    /// Takes the app's values as they now are in the store. Runners keep running; a new
    /// max_multiplexing applies to the current revision's runners at once.
    fn set_app(&mut self, app: App) {
        self.route.configure(RouteConfig {
            auth: app.auth,
            request_timeout: Duration::from_secs(app.scaling.request_timeout),
            suspended: app.suspended,
        });
        if app.traffic != self.app.traffic {
            self.route.set_split(app.traffic.iter().map(|s| (s.revision, s.percent)).collect());
        }
        // A watch begun elsewhere (a guarded canary) is taken on; one ended, dropped.
        if app.guard_watch.as_ref() != self.watch.as_ref().map(|w| &w.stored) {
            let current = self.current.as_ref().map(|c| c.0);
            self.watch = app.guard_watch.clone().map(|stored| Watch::begin(&self.route, stored, current));
        }
        if let Some((revision, _)) = &self.current {
            for runner in self.runners.iter().filter(|r| r.revision == *revision && r.is_set_up()) {
                self.route.set_runner_max(runner.id, app.runner.max_multiplexing);
            }
        }
        self.app = app;
    }

    fn stop_runner(&mut self, id: RunnerId, replace: bool) -> Result<(), String> {
        let Some(index) = self.runners.iter().position(|r| r.id == id && r.is_live()) else {
            return Err(format!("runner {id} is not running"));
        };
        if replace {
            self.replace(index);
        } else {
            begin_drain(&self.route, &self.shared.capacity, &mut self.runners[index], "stopped on request");
        }
        Ok(())
    }

    /// Marks a runner for replacement. A set-up runner of a revision that takes calls
    /// keeps serving until its replacement is set up (or finds no room); any other
    /// runner just goes, and the autoscaler starts what is needed.
    fn replace(&mut self, index: usize) {
        let serving = self.serves(self.runners[index].revision);
        let runner = &mut self.runners[index];
        runner.replacing = true;
        if serving && runner.is_set_up() {
            let replacement = Runner::new(runner.revision, runner.manifest.clone());
            runner.replacement = Some(replacement.id);
            self.runners.push(replacement);
        } else {
            begin_drain(&self.route, &self.shared.capacity, runner, "replaced");
        }
    }

    /// Whether runners of `revision` take calls: it is current, has a share of the
    /// split, or calls pin it.
    fn serves(&self, revision: RevisionId) -> bool {
        self.current.as_ref().is_some_and(|(r, _)| *r == revision) || self.others.iter().any(|(r, _)| *r == revision)
    }

    /// Takes on the revisions that now take calls besides the current one (a share of
    /// the split, calls waiting that pin it), and forgets those that have none of that
    /// and no runners left.
    async fn follow_traffic(&mut self, snapshot: &RouteSnapshot) {
        let current = self.current.as_ref().map(|(r, _)| *r);
        let shared_out = self.app.traffic.iter().map(|s| s.revision);
        let wanted: Vec<RevisionId> = shared_out.chain(snapshot.waited_for()).collect();
        for revision in wanted {
            if Some(revision) == current || self.others.iter().any(|(r, _)| *r == revision) {
                continue;
            }
            match load_revision(&self.shared, &self.app, revision).await {
                Ok(manifest) => self.others.push((revision, manifest)),
                Err(e) => tracing::warn!(app = %self.app.name, %revision, error = %e, "cannot serve a revision"),
            }
        }
        let (traffic, runners) = (&self.app.traffic, &self.runners);
        self.others.retain(|(revision, _)| {
            Some(*revision) != current
                && (traffic.iter().any(|s| s.revision == *revision)
                    || !snapshot.queued_on(*revision).is_empty()
                    || runners.iter().any(|r| r.revision == *revision && r.is_live()))
        });
    }

    /// Replaces every live runner, except the one a rolling switch waits for: that one
    /// is being started anyway.
    fn rollout(&mut self, force: bool) -> Vec<RunnerId> {
        let candidate = self.pending.as_ref().map(|p| p.runner);
        let old: Vec<usize> = (0..self.runners.len())
            .filter(|&i| {
                let r = &self.runners[i];
                r.is_live()
                    && !matches!(r.state, RunnerState::Draining | RunnerState::Terminating)
                    && Some(r.id) != candidate
            })
            .collect();
        let ids = old.iter().map(|&i| self.runners[i].id).collect();
        for index in old {
            if force {
                let runner = &mut self.runners[index];
                runner.replacing = true;
                self.route.cut_off(runner.id, CutOff::ForcedRollout);
                kill(&self.route, &self.shared.capacity, runner, "killed by a forced rollout");
            } else {
                self.replace(index);
            }
        }
        ids
    }

    fn begin_shutdown(&mut self, reply: Option<oneshot::Sender<()>>) {
        if let Some(pending) = self.pending.take() {
            let _ = pending.activate.reply.send(Err("interrupted".to_owned()));
        }
        for runner in &mut self.runners {
            begin_drain(&self.route, &self.shared.capacity, runner, "the server is shutting down");
        }
        self.route.set_revision(None);
        self.shutting_down.get_or_insert_with(Vec::new).extend(reply);
    }

    async fn activate(&mut self, activate: Activate) {
        if self.shutting_down.is_some() {
            let _ = activate.reply.send(Err("interrupted".to_owned()));
            return;
        }
        // A newer activation supersedes one still waiting (deploys are serialized, so
        // this only happens after a server-side abort of the older one).
        if let Some(pending) = self.pending.take() {
            let _ = pending.activate.reply.send(Err("superseded by a newer deploy".to_owned()));
        }
        match activate.strategy {
            Strategy::Recreate => self.commit(activate, None).await,
            Strategy::Rolling => {
                let manifest = Arc::new(activate.manifest.clone());
                let runner = Runner::new(activate.revision.id, manifest);
                let startup = Duration::from_secs(activate.revision.runner.startup_timeout);
                self.pending =
                    Some(PendingActivation { runner: runner.id, deadline: Instant::now() + startup, activate });
                self.runners.push(runner);
            }
        }
    }

    /// Makes the activation's revision current: in the store first (one transaction),
    /// then on the gateway. With `first_runner`, that set-up runner starts serving.
    async fn commit(&mut self, activate: Activate, first_runner: Option<RunnerId>) {
        let Activate { revision, manifest, scaling, auth, guard, history, reply, .. } = activate;
        let previous = self.current.as_ref().map(|c| c.0).filter(|p| *p != revision.id);
        let activation = Activation {
            app_id: self.app.id,
            revision: revision.id,
            runner: manifest.runner.clone(),
            scaling,
            auth,
            fence: self.shared.fence(self.app.id),
        };
        if let Err(e) = self.shared.store.activate_revision(activation, history).await {
            tracing::error!(app = %self.app.name, error = %e, "cannot record the new current revision");
            let _ = reply.send(Err(format!("the new revision could not be recorded: {e}")));
            return;
        }
        match self.shared.store.app_by_name(self.app.team_id, &self.app.name).await {
            Ok(Some(app)) => self.set_app(app),
            Ok(None) | Err(_) => tracing::warn!(app = %self.app.name, "cannot re-read the app after activation"),
        }
        let manifest = Arc::new(manifest);
        self.current = Some((revision.id, manifest));
        self.failures = 0;
        self.route.set_revision(Some(revision.id));
        if let Some(id) = first_runner
            && let Some(runner) = self.runners.iter().find(|r| r.id == id)
            && let Some(handle) = &runner.handle
        {
            self.route.add_runner(id, revision.id, handle.addr.clone(), revision.runner.max_multiplexing);
        }
        tracing::info!(app = %self.app.name, revision = %revision.id, "revision is current");
        let _ = reply.send(Ok(()));
        self.watch_switch(revision.id, previous, guard).await;
    }

    /// After a switch to `revision`: a guarded one is watched against the revision it
    /// replaced (with that one's figures so far); any other ends what was watched.
    async fn watch_switch(&mut self, revision: RevisionId, previous: Option<RevisionId>, asked: bool) {
        let guarded = asked || self.app.guard.enabled;
        let watch = match previous {
            Some(previous) if guarded => {
                // The previous revision's figures up to the switch (no call reaches it
                // since) are what the new one is judged against.
                let baseline = self.route.figures(previous);
                let until = OffsetDateTime::now_utc() + Duration::from_secs(self.app.guard.window);
                Some(GuardWatch {
                    revision,
                    previous: Some(previous),
                    until,
                    baseline_calls: baseline.calls,
                    baseline_errors: baseline.errors,
                    baseline_p95_micros: baseline.p95().map(|d| d.as_micros() as u64),
                })
            }
            _ => None,
        };
        if watch.is_none() && self.watch.is_none() {
            return;
        }
        let history = watch.as_ref().map(|w| NewHistory {
            app_id: self.app.id,
            action: "guard_watch".to_owned(),
            key_id: None,
            details: format!(
                "watching revision {revision} for {} s against revision {} ({} calls, {:.1}% 5xx before)",
                self.app.guard.window,
                w.previous.map_or_else(String::new, |p| p.to_string()),
                w.baseline_calls,
                if w.baseline_calls == 0 { 0.0 } else { w.baseline_errors as f64 * 100.0 / w.baseline_calls as f64 }
            ),
        });
        if let Err(e) = self.shared.store.set_guard_watch(self.app.id, watch.clone(), history).await {
            tracing::error!(app = %self.app.name, error = %e, "cannot record what the guard watches");
        }
        self.app.guard_watch = watch.clone();
        let current = self.current.as_ref().map(|c| c.0);
        self.watch = watch.map(|stored| Watch::begin(&self.route, stored, current));
    }

    /// Judges the watched revision: back to the previous revision (or the canary's share
    /// ended) when it is clearly worse, the watch ended when its window has passed.
    async fn check_guard(&mut self) {
        let Some(watch) = &self.watch else { return };
        let stored = watch.stored.clone();
        let after = self.route.figures(stored.revision).since(&watch.start);
        let current = self.current.as_ref().map(|c| c.0);
        let before = match stored.previous {
            Some(_) => Figures::summary(
                stored.baseline_calls,
                stored.baseline_errors,
                stored.baseline_p95_micros.map(Duration::from_micros),
            ),
            None => current.map(|c| self.route.figures(c).since(&watch.current_start)).unwrap_or_default(),
        };
        let verdict = crate::guard::verdict(&self.app.guard, &before, &after);
        let over = OffsetDateTime::now_utc() >= stored.until;
        if verdict.is_none() && !over {
            return;
        }
        self.watch = None;
        self.app.guard_watch = None;
        let app_id = self.app.id;
        let entry =
            |action: &str, details: String| NewHistory { app_id, action: action.to_owned(), key_id: None, details };
        let Some(why) = verdict else {
            let held = entry(
                "guard_passed",
                format!(
                    "revision {} held through the guard's window: {:.1}% 5xx of {} calls",
                    stored.revision,
                    after.error_share() * 100.0,
                    after.calls
                ),
            );
            if let Err(e) = self.shared.store.set_guard_watch(app_id, None, Some(held)).await {
                tracing::error!(app = %self.app.name, error = %e, "cannot end the guard's watch");
            }
            return;
        };
        tracing::warn!(app = %self.app.name, revision = %stored.revision, %why, "the guard tripped");
        match stored.previous {
            Some(previous) => self.guard_rollback(stored.revision, previous, why).await,
            None => self.guard_end_canary(stored.revision, why).await,
        }
    }

    /// Sets the alias back to `previous` (rolling), recording why.
    async fn guard_rollback(&mut self, revision: RevisionId, previous: RevisionId, why: String) {
        let details = format!("revision {revision} {why}; back to revision {previous}");
        let tripped = NewHistory {
            app_id: self.app.id,
            action: "guard_tripped".to_owned(),
            key_id: None,
            details: details.clone(),
        };
        if let Err(e) = self.shared.store.set_guard_watch(self.app.id, None, Some(tripped)).await {
            tracing::error!(app = %self.app.name, error = %e, "cannot record the guard's trip");
        }
        let target = match self.shared.store.revision(previous).await {
            Ok(Some(target)) => target,
            other => {
                tracing::error!(app = %self.app.name, %previous, ?other, "the guard cannot go back: no such revision");
                return;
            }
        };
        let manifest = match Manifest::parse(&target.manifest, None) {
            Ok(manifest) => manifest,
            Err(e) => return tracing::error!(app = %self.app.name, error = %e, "the guard cannot go back"),
        };
        let (reply, answer) = oneshot::channel();
        let name = self.app.name.clone();
        tokio::spawn(async move {
            if let Ok(Err(reason)) = answer.await {
                tracing::error!(app = %name, %reason, "the guard's switch back did not come up");
            }
        });
        let history = NewHistory {
            app_id: self.app.id,
            action: "set_rev".to_owned(),
            key_id: None,
            details: format!("revision {revision} -> {previous} (rolling), by the guard: {why}"),
        };
        let activate = Activate {
            revision: target,
            manifest,
            strategy: Strategy::Rolling,
            scaling: None,
            auth: None,
            guard: false,
            history,
            reply,
        };
        self.activate(activate).await;
    }

    /// Ends a watched canary's share of the calls, recording why.
    async fn guard_end_canary(&mut self, revision: RevisionId, why: String) {
        let shares: Vec<TrafficShare> = self.app.traffic.iter().filter(|s| s.revision != revision).copied().collect();
        let details = format!("canary {revision} {why}; its share ended");
        let tripped = NewHistory { app_id: self.app.id, action: "guard_tripped".to_owned(), key_id: None, details };
        let ended = async {
            self.shared.store.set_traffic(self.app.id, &shares, tripped).await?;
            self.shared.store.set_guard_watch(self.app.id, None, None).await
        };
        if let Err(e) = ended.await {
            tracing::error!(app = %self.app.name, error = %e, "cannot end the canary's share");
            return;
        }
        match self.shared.store.app_by_name(self.app.team_id, &self.app.name).await {
            Ok(Some(app)) => self.set_app(app),
            _ => tracing::warn!(app = %self.app.name, "cannot re-read the app after ending a canary"),
        }
    }

    async fn event(&mut self, event: Event) {
        let id = event.runner();
        let Some(index) = self.runners.iter().position(|r| r.id == id) else { return };
        match event {
            Event::Healthy { .. } => {
                let runner = &mut self.runners[index];
                if !apply(&self.route, &self.shared.capacity, runner, RunnerEvent::Healthy, "") {
                    return;
                }
                // Routing is done here rather than by `apply`: only a runner of a
                // revision that takes calls (or the one a rolling switch waits for)
                // gets them.
                let revision = runner.revision;
                let addr = runner.handle.as_ref().map(|h| h.addr.clone());
                let max = match &self.current {
                    Some((rev, _)) if *rev == revision => self.app.runner.max_multiplexing,
                    _ => runner.manifest.runner.max_multiplexing,
                };
                if self.pending.as_ref().is_some_and(|p| p.runner == id) {
                    let pending = self.pending.take().expect("checked above");
                    self.commit(pending.activate, Some(id)).await;
                } else if self.serves(revision) {
                    if self.current.as_ref().is_some_and(|(rev, _)| *rev == revision) {
                        self.failures = 0;
                    }
                    if let Some(addr) = addr {
                        self.route.add_runner(id, revision, addr, max);
                    }
                }
            }
            Event::Waiting { reason, .. } => {
                let runner = &mut self.runners[index];
                if runner.state == RunnerState::Setup {
                    runner.queued = true;
                    runner.reason = Some(format!("waiting in the cluster's queue: {reason}"));
                }
            }
            Event::Placed { addr, node, gpus, .. } => {
                let runner = &mut self.runners[index];
                if let Some(handle) = &mut runner.handle {
                    handle.addr = addr;
                }
                if let Some(placed) = &mut runner.placed {
                    placed.1 = gpus;
                }
                runner.node = Some(node);
                if runner.queued {
                    runner.queued = false;
                    runner.reason = None;
                }
            }
            Event::Unhealthy { reason, .. } => {
                apply(&self.route, &self.shared.capacity, &mut self.runners[index], RunnerEvent::Unhealthy, &reason);
            }
            Event::Exited { phase, requested, reason, .. } => {
                let runner = &mut self.runners[index];
                let was_ending = matches!(runner.state, RunnerState::Draining | RunnerState::Terminating);
                if requested || was_ending {
                    // Why it was stopped says more than how (the signal).
                    let reason = runner.reason.clone().unwrap_or(reason);
                    apply(&self.route, &self.shared.capacity, runner, RunnerEvent::Exited { requested: true }, &reason);
                } else if phase == Phase::Setup {
                    self.setup_failed(index, reason);
                } else {
                    tracing::warn!(app = %self.app.name, runner = %id, %reason, "runner ended unexpectedly");
                    let reason = format!("ended unexpectedly: {reason}");
                    apply(
                        &self.route,
                        &self.shared.capacity,
                        runner,
                        RunnerEvent::Exited { requested: false },
                        &reason,
                    );
                }
            }
        }
    }

    /// A runner could not be started or ended during setup. The runner a rolling
    /// switch waits for fails the switch; any other is tried again after a back-off.
    fn setup_failed(&mut self, index: usize, reason: String) {
        let id = self.runners[index].id;
        tracing::warn!(app = %self.app.name, runner = %id, %reason, "runner failed to set up");
        let candidate = self.pending.as_ref().is_some_and(|p| p.runner == id);
        if candidate || self.shutting_down.is_some() {
            let runner = &mut self.runners[index];
            let event = match runner.state {
                RunnerState::Setup => RunnerEvent::Exited { requested: false },
                _ => RunnerEvent::Kill,
            };
            apply(&self.route, &self.shared.capacity, runner, event, &reason);
            if candidate {
                let pending = self.pending.take().expect("checked above");
                let _ = pending.activate.reply.send(Err(format!("runner {id} did not set up: {reason}")));
            }
            return;
        }
        self.failures += 1;
        let delay = self.shared.config.backoff_base.saturating_mul(self.failures).min(MAX_BACKOFF);
        let runner = &mut self.runners[index];
        let reason = format!("{reason}; next attempt in {delay:?}");
        if apply(&self.route, &self.shared.capacity, runner, RunnerEvent::SetupFailed, &reason) {
            runner.retry_at = Some(Instant::now() + delay);
        }
    }

    /// Brings the runners in line with what should be.
    async fn reconcile(&mut self) {
        let snapshot = self.route.snapshot();
        let now = Instant::now();
        self.loaded = snapshot.in_flight() > 0 || !snapshot.queued.is_empty();
        if self.shutting_down.is_none() {
            self.follow_traffic(&snapshot).await;
            self.check_guard().await;
        }

        // A call ran past the request timeout: its runner may be stuck; let it go.
        for runner in &mut self.runners {
            if runner.is_set_up() && snapshot.runner(runner.id).is_some_and(|s| s.timed_out) {
                begin_drain(&self.route, &self.shared.capacity, runner, "a call ran past the request timeout");
            }
        }

        // A rolling activation whose runner never found room gives up in time.
        if let Some(pending) = &self.pending
            && now >= pending.deadline
            && self.candidate_waits_for_room()
        {
            let pending = self.pending.take().expect("checked above");
            let reason = format!(
                "no room for a runner on machine type {:?} within the startup timeout",
                pending.activate.revision.runner.machine_type
            );
            if let Some(runner) = self.runners.iter_mut().find(|r| r.id == pending.runner) {
                apply(&self.route, &self.shared.capacity, runner, RunnerEvent::Kill, &reason);
            }
            let _ = pending.activate.reply.send(Err(reason));
        }

        // The runner a rolling switch waits for was stopped or killed on request before
        // it was set up: the switch fails rather than waiting for it forever.
        if let Some(pending) = &self.pending {
            let runner = self.runners.iter().find(|r| r.id == pending.runner);
            let ended = runner.is_none_or(|r| {
                matches!(r.state, RunnerState::Draining | RunnerState::Terminating | RunnerState::Terminated)
            });
            if ended {
                let why = runner.and_then(|r| r.reason.clone()).unwrap_or_else(|| "on request".to_owned());
                let reason = format!("its first runner {} was ended before it was set up ({why})", pending.runner);
                let pending = self.pending.take().expect("checked above");
                let _ = pending.activate.reply.send(Err(reason));
            }
        }

        self.make_room_for_candidate(&snapshot);
        self.replace_marked();
        if self.shutting_down.is_none() {
            self.autoscale(&snapshot);
        }
        // Runners of a revision that no longer takes calls leave.
        let candidate = self.pending.as_ref().map(|p| p.runner);
        let leaving: Vec<usize> = (0..self.runners.len())
            .filter(|&i| !self.serves(self.runners[i].revision) && Some(self.runners[i].id) != candidate)
            .collect();
        for index in leaving {
            let runner = &mut self.runners[index];
            begin_drain(&self.route, &self.shared.capacity, runner, "its revision is no longer current");
        }

        // Draining runners with nothing in flight are told to stop. Their calls are
        // counted now, not from the snapshot: a call may have taken a slot between the
        // snapshot and the moment routing to the runner stopped.
        for runner in &mut self.runners {
            if runner.state == RunnerState::Draining && self.route.in_flight(runner.id) == 0 {
                apply(&self.route, &self.shared.capacity, runner, RunnerEvent::Drained, "");
            }
        }

        // Back-offs that have run out: try again, as a new runner.
        let mut retries = Vec::new();
        for runner in &mut self.runners {
            if self.shutting_down.is_some() {
                break;
            }
            if runner.state == RunnerState::CrashBackoff && runner.retry_at.is_some_and(|t| now >= t) {
                apply(&self.route, &self.shared.capacity, runner, RunnerEvent::RetryDue, "");
                retries.push((runner.id, Runner::new(runner.revision, runner.manifest.clone())));
            }
        }
        for (old, new) in retries {
            // A runner waiting for this one as its replacement now waits for the retry.
            for runner in &mut self.runners {
                if runner.replacement == Some(old) {
                    runner.replacement = Some(new.id);
                }
            }
            self.runners.push(new);
        }

        if self.runners.iter().any(|r| r.state == RunnerState::Pending) {
            // Secrets are read as they are now at every start: this is how a changed
            // secret reaches runners (through a rollout).
            let secrets = self.team_secrets().await;
            self.start_pending(&secrets);
        }
        self.forget_old();
    }

    /// The runner a rolling switch waits for finds no room (its GPUs, say, are all held):
    /// one runner of the revision it replaces, on a machine type it could use, drains
    /// to make some, as a rollout's runner hands over when its replacement finds none.
    /// Its calls finish; new ones wait for the new revision's runner.
    fn make_room_for_candidate(&mut self, snapshot: &RouteSnapshot) {
        let Some(pending) = &self.pending else { return };
        let Some(candidate) = self.runners.iter().find(|r| r.id == pending.runner) else { return };
        if !candidate.waits_for_room(&self.shared.capacity) {
            return;
        }
        let (revision, spec) = (candidate.revision, candidate.manifest.clone());
        let usable =
            |r: &Runner| r.capacity.as_ref().is_some_and(|p| spec.runner.machine_types().any(|t| t == p.machine_type));
        let making_room = self.runners.iter().any(|r| {
            r.revision != revision && matches!(r.state, RunnerState::Draining | RunnerState::Terminating) && usable(r)
        });
        if making_room {
            return;
        }
        let in_flight = |r: &Runner| snapshot.runner(r.id).map_or(0, |s| s.in_flight);
        if let Some(runner) = self
            .runners
            .iter_mut()
            .filter(|r| r.revision != revision && r.is_set_up() && usable(r))
            .min_by_key(|r| in_flight(r))
        {
            begin_drain(&self.route, &self.shared.capacity, runner, "making room for the new revision's runner");
        }
    }

    /// Runners marked for replacement hand over to their replacement once it is set
    /// up, or right away when the replacement cannot find room (then calls wait in the
    /// queue instead of capacity being exceeded).
    fn replace_marked(&mut self) {
        let states: Vec<(RunnerId, RunnerState, bool)> =
            self.runners.iter().map(|r| (r.id, r.state, r.waits_for_room(&self.shared.capacity))).collect();
        let state_of = |id: RunnerId| states.iter().find(|(r, ..)| *r == id).map(|(_, s, waits)| (*s, *waits));
        for runner in &mut self.runners {
            if !runner.replacing || !runner.is_set_up() {
                continue;
            }
            let handover = match runner.replacement.and_then(state_of) {
                Some((RunnerState::Idle | RunnerState::Running, _)) => true,
                // A replacement waiting for room (here, or in the cluster's queue) gets it
                // only when this runner goes; one that will find room is started in this
                // same pass, so wait for it.
                Some((RunnerState::Pending, _)) => !self.shared.capacity.has_room(Need::of(&self.app.runner)),
                Some((_, true)) => true,
                Some((RunnerState::Terminated, _)) | None => true,
                Some(_) => false,
            };
            if handover {
                begin_drain(&self.route, &self.shared.capacity, runner, "replaced");
            }
        }
    }

    fn autoscale(&mut self, snapshot: &RouteSnapshot) {
        self.recheck_at = None;
        let Some((current, manifest)) = self.current.clone() else { return };
        if self.app.suspended {
            for runner in &mut self.runners {
                begin_drain(&self.route, &self.shared.capacity, runner, "the app is suspended");
            }
            return;
        }
        // Calls in flight on runners of no other revision (those of a revision being
        // replaced, say) are the current revision's load.
        let others = self.others.clone();
        let elsewhere: u32 = others.iter().map(|(rev, _)| snapshot.in_flight_on(*rev)).sum();
        let in_flight = snapshot.in_flight().saturating_sub(elsewhere);
        self.scale(current, &manifest, self.policy(), in_flight, &snapshot.queued_on(current), snapshot);
        for (revision, manifest) in others {
            let mut policy = self.policy();
            policy.max_multiplexing = manifest.runner.max_multiplexing;
            // A revision only calls pin keeps no runner waiting for them.
            if !self.app.traffic.iter().any(|s| s.revision == revision) {
                policy.min_concurrency = 0;
                policy.concurrency_buffer = 0;
                policy.concurrency_buffer_perc = 0;
            }
            let queued = snapshot.queued_on(revision);
            self.scale(revision, &manifest, policy, snapshot.in_flight_on(revision), &queued, snapshot);
        }
    }

    /// Starts and stops runners of one revision as the autoscaler decides for its load.
    fn scale(
        &mut self,
        revision: RevisionId,
        manifest: &Arc<Manifest>,
        policy: Policy,
        in_flight: u32,
        queued: &[Duration],
        snapshot: &RouteSnapshot,
    ) {
        // The runner a rolling switch waits for is the switch's, not the autoscaler's,
        // even when its revision takes calls already (a canary being made current).
        let candidate = self.pending.as_ref().map(|p| p.runner);
        let counted: Vec<ScaleRunner> = self
            .runners
            .iter()
            .filter(|r| r.revision == revision && !r.replacing && Some(r.id) != candidate)
            .filter_map(|r| {
                let phase = match r.state {
                    RunnerState::Pending => ScalePhase::Pending,
                    RunnerState::Setup => ScalePhase::Setup,
                    RunnerState::CrashBackoff => ScalePhase::CrashBackoff,
                    RunnerState::Idle | RunnerState::Running => {
                        ScalePhase::Ready { idle_for: snapshot.runner(r.id).and_then(|s| s.idle_for) }
                    }
                    _ => return None,
                };
                Some(ScaleRunner { id: r.id, phase })
            })
            .collect();
        let decision: Decision = autoscaler::decide(&policy, &Observed { in_flight, queued, runners: &counted });
        if let Some(after) = decision.recheck_in {
            let at = Instant::now() + after;
            self.recheck_at = Some(self.recheck_at.map_or(at, |t| t.min(at)));
        }
        let no_runner_up = !self.runners.iter().any(|r| r.revision == revision && r.is_set_up());
        for _ in 0..decision.start {
            if no_runner_up && !queued.is_empty() {
                self.shared.metrics.cold_starts.get_or_create(&AppLabels { app: self.label() }).inc();
            }
            self.runners.push(Runner::new(revision, manifest.clone()));
        }
        for id in decision.stop {
            if let Some(runner) = self.runners.iter_mut().find(|r| r.id == id) {
                begin_drain(&self.route, &self.shared.capacity, runner, "scaled down");
            }
        }
    }

    fn policy(&self) -> Policy {
        let s = &self.app.scaling;
        let r: &RunnerSpec = &self.app.runner;
        Policy {
            min_concurrency: s.min_concurrency,
            max_concurrency: s.max_concurrency,
            concurrency_buffer: s.concurrency_buffer,
            concurrency_buffer_perc: s.concurrency_buffer_perc,
            max_multiplexing: r.max_multiplexing,
            keep_alive: Duration::from_secs(s.keep_alive),
            scaling_delay: Duration::from_secs(s.scaling_delay),
        }
    }

    /// The team's secrets, opened. One that cannot be read is left out, loudly.
    async fn team_secrets(&self) -> Vec<(String, String)> {
        let stored = match self.shared.store.secrets(self.app.team_id).await {
            Ok(stored) => stored,
            Err(e) => {
                tracing::error!(app = %self.app.name, error = %e, "cannot read the team's secrets");
                return Vec::new();
            }
        };
        stored
            .iter()
            .filter_map(|s| match self.shared.secrets.open(self.app.team_id, &s.name, &s.nonce, &s.ciphertext) {
                Ok(value) => Some((s.name.clone(), value)),
                Err(e) => {
                    tracing::error!(app = %self.app.name, error = %e, "a secret is left out of new runners");
                    None
                }
            })
            .collect()
    }

    /// Starts the processes of Pending runners that find room on their machine type.
    fn start_pending(&mut self, secrets: &[(String, String)]) {
        for index in 0..self.runners.len() {
            if self.runners[index].state != RunnerState::Pending {
                continue;
            }
            let spec = self.runner_spec(index).clone();
            let label = self.label();
            let runner = &mut self.runners[index];
            let placement = match self.shared.capacity.try_place(Need::of(&spec), runner.id, &label) {
                Ok(placement) => placement,
                Err(waiting) => {
                    runner.reason = Some(waiting);
                    continue;
                }
            };
            let gpus: Vec<supervisor::Gpu> =
                placement.gpus.iter().filter_map(|&place| self.shared.gpus.all().get(place).cloned()).collect();
            runner.reason = None;
            runner.placed = Some((placement.machine_type.clone(), gpus.iter().map(|g| g.id.clone()).collect()));
            runner.capacity = Some(placement.clone());
            let mut launch = self.launch_spec(index, placement.machine_type, &gpus, secrets);
            launch.gpu_count = placement.gpu_count;
            match self.shared.backend.launch(launch, self.events_tx.clone()) {
                Ok(handle) => {
                    let runner = &mut self.runners[index];
                    runner.handle = Some(handle);
                    runner.started_at = OffsetDateTime::now_utc();
                    apply(&self.route, &self.shared.capacity, runner, RunnerEvent::Launched, "");
                }
                Err(e) => self.setup_failed(index, format!("could not be started: {e}")),
            }
        }
    }

    /// What a runner is placed by: its revision's settings, except that the current
    /// revision follows the app's (which `apps scale` may have changed).
    fn runner_spec(&self, index: usize) -> &RunnerSpec {
        let runner = &self.runners[index];
        if self.current.as_ref().is_some_and(|(rev, _)| *rev == runner.revision) {
            &self.app.runner
        } else {
            &runner.manifest.runner
        }
    }

    /// The runner's command and environment: a few host variables, the manifest's env,
    /// the team's secrets, then the platform's own variables (which nothing overrides).
    fn launch_spec(
        &self,
        index: usize,
        machine_type: String,
        gpus: &[supervisor::Gpu],
        secrets: &[(String, String)],
    ) -> RunnerLaunch {
        let runner = &self.runners[index];
        let manifest = &runner.manifest;
        let is_current = self.current.as_ref().is_some_and(|(rev, _)| *rev == runner.revision);
        let startup_timeout =
            if is_current { self.app.runner.startup_timeout } else { manifest.runner.startup_timeout };
        let mut env: Vec<(String, String)> = ["PATH", "HOME", "LANG", "LC_ALL", "TMPDIR"]
            .iter()
            .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
            .collect();
        env.extend(manifest.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        // Only the secrets its manifest names, when it names any.
        let wanted = |name: &String| manifest.secrets.as_ref().is_none_or(|list| list.contains(name));
        env.extend(secrets.iter().filter(|(name, _)| wanted(name)).cloned());
        env.push(("HANGAR_APP".to_owned(), self.app.name.clone()));
        env.push((supervisor::REVISION_VAR.to_owned(), runner.revision.to_string()));
        env.push(("HANGAR_RUNNER_ID".to_owned(), runner.id.to_string()));
        // Its GPUs, and only those (none: empty, so that CUDA sees none).
        let gpu_ids = gpus.iter().map(|g| g.id.as_str()).collect::<Vec<_>>().join(",");
        for var in ["CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "HANGAR_GPUS"] {
            env.push((var.to_owned(), gpu_ids.clone()));
        }
        let config = &self.shared.config;
        let limits =
            config.machine_types.get(&machine_type).map(crate::config::MachineType::limits).unwrap_or_default();
        RunnerLaunch {
            id: runner.id,
            machine_type,
            gpu_count: gpus.len() as u32,
            command: manifest.command.clone(),
            confinement: supervisor::Confinement {
                uid: supervisor::team_uid(self.app.team_id.as_bytes()),
                code: self.shared.layout.revision_code(runner.revision),
                code_writable: false,
                cache: Some(self.shared.layout.app_cache(self.app.id)),
                home_cache: None,
                devices: supervisor::device_nodes(gpus),
            },
            env,
            health_path: manifest.health_path.clone(),
            startup_timeout: Duration::from_secs(startup_timeout),
            health: health_policy(&manifest.health, config),
            limits,
        }
    }

    /// Drops ended runners that are old, keeping the listing bounded.
    fn forget_old(&mut self) {
        let cutoff = OffsetDateTime::now_utc() - KEEP_ENDED;
        self.runners.retain(|r| r.is_live() || r.ended_at.is_some_and(|t| t > cutoff));
        let ended = self.runners.iter().filter(|r| !r.is_live()).count();
        if ended > MAX_ENDED {
            let mut drop = ended - MAX_ENDED;
            self.runners.retain(|r| {
                if drop > 0 && !r.is_live() {
                    drop -= 1;
                    false
                } else {
                    true
                }
            });
        }
    }

    fn label(&self) -> String {
        format!("{}/{}", self.team, self.app.name)
    }

    /// Publishes the runners for listings and metrics.
    fn publish(&self) {
        let snapshot = self.route.snapshot();
        let keep_alive = Duration::from_secs(self.app.scaling.keep_alive);
        let live = self.runners.iter().filter(|r| r.is_set_up()).count() as u32;
        let infos: Vec<RunnerInfo> = self
            .runners
            .iter()
            .map(|r| {
                let slot = snapshot.runner(r.id);
                let in_flight = slot.map_or(0, |s| s.in_flight);
                let state = match r.state {
                    RunnerState::Setup if r.queued => RunnerState::Pending,
                    RunnerState::Idle | RunnerState::Running if in_flight > 0 => RunnerState::Running,
                    RunnerState::Idle | RunnerState::Running => RunnerState::Idle,
                    other => other,
                };
                let expires_in = match (state, slot.and_then(|s| s.idle_for)) {
                    (RunnerState::Idle, Some(idle)) if live > self.app.scaling.min_concurrency => {
                        Some(keep_alive.saturating_sub(idle))
                    }
                    _ => None,
                };
                RunnerInfo {
                    id: r.id,
                    app: self.app.name.clone(),
                    revision: r.revision,
                    machine_type: r
                        .placed
                        .as_ref()
                        .map_or_else(|| r.manifest.runner.machine_type.clone(), |p| p.0.clone()),
                    gpus: r.placed.as_ref().map_or_else(Vec::new, |p| p.1.clone()),
                    node: r.node.clone(),
                    state,
                    in_flight,
                    expires_in,
                    started_at: r.started_at,
                    ended_at: r.ended_at,
                    replacing: r.replacing,
                    reason: r.reason.clone(),
                }
            })
            .collect();
        let app = self.label();
        for state in RunnerState::ALL {
            let n = infos.iter().filter(|i| i.state == *state).count() as i64;
            self.shared
                .metrics
                .runners
                .get_or_create(&StateLabels { app: app.clone(), state: state.as_str().to_owned() })
                .set(n);
        }
        self.shared.metrics.queued.get_or_create(&AppLabels { app }).set(snapshot.queued.len() as i64);
        *self.view.lock().unwrap_or_else(|e| e.into_inner()) = infos;
    }
}

/// Moves a runner through its lifecycle (`model::lifecycle`) and carries out what the
/// transition calls for; `reason`, if not empty, says why for listings. Routing a runner
/// that became healthy is left to the caller, which knows whether its revision is
/// current. Returns false, changing nothing, when the event means nothing in the
/// runner's state.
fn apply(route: &AppRoute, capacity: &Capacity, runner: &mut Runner, event: RunnerEvent, reason: &str) -> bool {
    let Some((state, effects)) = lifecycle::next(runner.state, event) else { return false };
    runner.state = state;
    for effect in effects {
        match effect {
            RunnerEffect::Route => {}
            RunnerEffect::StopRouting => route.stop_routing(runner.id),
            RunnerEffect::Unroute => route.remove_runner(runner.id),
            RunnerEffect::SignalStop => {
                if let Some(handle) = &runner.handle {
                    handle.stop(Duration::from_secs(runner.manifest.runner.termination_grace_period));
                }
            }
            RunnerEffect::SignalKill => {
                if let Some(handle) = &runner.handle {
                    handle.kill();
                }
            }
            RunnerEffect::ReleaseCapacity => {
                if let Some(placement) = runner.capacity.take() {
                    capacity.release(&placement);
                }
            }
        }
    }
    if !reason.is_empty() {
        runner.reason = Some(reason.to_owned());
    }
    if state == RunnerState::Terminated {
        runner.ended_at = Some(OffsetDateTime::now_utc());
        runner.retry_at = None;
        runner.handle = None;
        // A runner that ends without its process having ended (it never had one)
        // holds no room either.
        if let Some(placement) = runner.capacity.take() {
            capacity.release(&placement);
        }
    }
    true
}

/// Stops routing new calls to a runner; it stops once its calls are done. A runner
/// without a process ends at once.
fn begin_drain(route: &AppRoute, capacity: &Capacity, runner: &mut Runner, reason: &str) {
    apply(route, capacity, runner, RunnerEvent::Drain, reason);
}

/// Kills a runner now; its calls in flight fail.
fn kill(route: &AppRoute, capacity: &Capacity, runner: &mut Runner, reason: &str) {
    apply(route, capacity, runner, RunnerEvent::Kill, reason);
}

/// A revision of `app`, with its code here and its manifest read.
async fn load_revision(shared: &Shared, app: &App, id: RevisionId) -> anyhow::Result<Arc<Manifest>> {
    crate::code::ensure(shared, id).await?;
    let revision =
        shared.store.revision(id).await?.ok_or_else(|| anyhow::anyhow!("app {} has no revision {id}", app.name))?;
    let manifest = Manifest::parse(&revision.manifest, None)
        .map_err(|e| anyhow::anyhow!("revision {id} has an unreadable manifest: {e}"))?;
    Ok(Arc::new(manifest))
}

impl Watch {
    /// Begins watching here: what comes after now is counted.
    fn begin(route: &AppRoute, stored: GuardWatch, current: Option<RevisionId>) -> Watch {
        let start = route.figures(stored.revision);
        let current_start = current.map(|c| route.figures(c)).unwrap_or_default();
        Watch { stored, start, current_start }
    }
}

/// A revision's health checks: its manifest's settings, else the server's.
fn health_policy(health: &model::manifest::HealthSettings, config: &crate::config::Config) -> HealthPolicy {
    let interval = health.interval.map_or(config.health_interval, Duration::from_secs);
    HealthPolicy {
        interval,
        failure_threshold: health.failure_threshold.unwrap_or(config.failure_threshold),
        probe_timeout: health.timeout.map_or_else(|| interval.min(Duration::from_secs(10)), Duration::from_secs),
        start_period: Duration::from_secs(health.start_period.unwrap_or(0)),
    }
}
