//! The fleet: every app's controller, and what they share (the store, the runner
//! backend, machine capacity, the gateway). The control plane asks the fleet for an
//! app's controller and sends it commands; it never touches runners itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use gateway::{AppRoute, Gateway, RouteConfig};
use model::records::{App, RunnerInfo};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use store::Store;
use supervisor::{RunnerBackend, Sandbox};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::config::Config;
use crate::controller::{Command, Controller};
use crate::layout::Layout;
use crate::owners::{Acquired, Owners};
use crate::placement::Capacity;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct StateLabels {
    pub(crate) app: String,
    pub(crate) state: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct AppLabels {
    pub(crate) app: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct GpuLabels {
    pub(crate) gpu: String,
    /// The app holding it (`team/app`); empty while it is free.
    pub(crate) app: String,
}

/// What the fleet counts, for `/metrics`.
#[derive(Default)]
pub(crate) struct FleetMetrics {
    pub(crate) runners: Family<StateLabels, Gauge>,
    pub(crate) queued: Family<AppLabels, Gauge>,
    pub(crate) cold_starts: Family<AppLabels, Counter>,
    gpu_held: Family<GpuLabels, Gauge>,
    gpu_utilization: Family<GpuLabels, Gauge>,
    gpu_memory_used: Family<GpuLabels, Gauge>,
}

impl FleetMetrics {
    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register("hangar_runners", "Runners by app and state", self.runners.clone());
        registry.register("hangar_queue_length", "Calls waiting for a runner, by app", self.queued.clone());
        registry.register(
            "hangar_cold_starts",
            "Runners started while calls waited and no runner of the app was set up",
            self.cold_starts.clone(),
        );
        registry.register("hangar_gpu_held", "1 for each GPU a runner holds, by GPU and app", self.gpu_held.clone());
        registry.register(
            "hangar_gpu_utilization_percent",
            "Percent of the last sample period a kernel ran on the GPU, by GPU and the app holding it (NVML)",
            self.gpu_utilization.clone(),
        );
        registry.register(
            "hangar_gpu_memory_used_bytes",
            "GPU memory in use, by GPU and the app holding it (NVML)",
            self.gpu_memory_used.clone(),
        );
    }
}

impl Shared {
    /// Brings the GPU series up to date: who holds each GPU and, where NVML is there,
    /// what it is doing. Called before each scrape.
    pub(crate) fn refresh_gpu_metrics(&self) {
        let m = &self.metrics;
        // A GPU's holder changes: last scrape's series for it go.
        m.gpu_held.clear();
        m.gpu_utilization.clear();
        m.gpu_memory_used.clear();
        for (gpu, holder) in self.gpus.all().iter().zip(self.capacity.holders()) {
            let labels =
                GpuLabels { gpu: gpu.id.clone(), app: holder.as_ref().map_or_else(String::new, |h| h.1.clone()) };
            m.gpu_held.get_or_create(&labels).set(i64::from(holder.is_some()));
            if let Some(usage) = self.gpus.usage(gpu) {
                m.gpu_utilization.get_or_create(&labels).set(i64::from(usage.utilization));
                m.gpu_memory_used.get_or_create(&labels).set(i64::try_from(usage.memory_used).unwrap_or(i64::MAX));
            }
        }
    }
}

/// Shared by every controller.
pub(crate) struct Shared {
    pub(crate) store: Store,
    /// Where runners run.
    pub(crate) backend: Arc<dyn RunnerBackend>,
    /// What builds (and local runners) are confined by.
    pub(crate) sandbox: Arc<Sandbox>,
    pub(crate) capacity: Capacity,
    /// The GPUs runners are given places in.
    pub(crate) gpus: Arc<supervisor::Gpus>,
    pub(crate) config: Arc<Config>,
    pub(crate) layout: Layout,
    pub(crate) gateway: Arc<Gateway>,
    pub(crate) metrics: FleetMetrics,
    pub(crate) secrets: crate::secrets::SecretBox,
    /// Which apps this server runs, where servers share the store.
    pub(crate) owners: Owners,
}

impl Shared {
    /// The lease the app's controller writes under (`None` where this server is alone).
    pub(crate) fn fence(&self, app_id: Uuid) -> Option<store::Fence> {
        self.owners.fence(app_id)
    }
}

/// A running controller, as others reach it.
#[derive(Clone)]
pub(crate) struct ControllerHandle {
    commands: mpsc::UnboundedSender<Command>,
    pub(crate) view: Arc<Mutex<Vec<RunnerInfo>>>,
    /// The app's team and name, as the gateway knows its route.
    team: String,
    app: String,
    route: Arc<AppRoute>,
    /// The app's last hour, for the dashboard's charts.
    charts: Arc<Mutex<crate::charts::History>>,
}

impl ControllerHandle {
    /// Sends a command; false if the controller has ended.
    pub(crate) fn send(&self, command: Command) -> bool {
        self.commands.send(command).is_ok()
    }

    pub(crate) fn runners(&self) -> Vec<RunnerInfo> {
        self.view.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The app's chart points of the last hour, oldest first.
    pub(crate) fn chart_points(&self) -> Vec<crate::charts::Point> {
        self.charts.lock().unwrap_or_else(|e| e.into_inner()).points().cloned().collect()
    }

    /// Reads the app's counters now: the same ones `/metrics` shows.
    fn chart_reading(&self, metrics: &FleetMetrics) -> crate::charts::Reading {
        let runners = self.runners();
        let label = AppLabels { app: format!("{}/{}", self.team, self.app) };
        crate::charts::Reading {
            at: tokio::time::Instant::now(),
            unix_ms: crate::charts::unix_ms_now(),
            revisions: self.route.all_figures(),
            runners: crate::charts::STATES.map(|state| runners.iter().filter(|r| r.state == state).count() as u32),
            queued: self.route.snapshot().queued.len() as u32,
            cold_starts: metrics.cold_starts.get_or_create(&label).get(),
        }
    }
}

pub(crate) struct Fleet {
    pub(crate) shared: Arc<Shared>,
    controllers: Mutex<HashMap<Uuid, ControllerHandle>>,
    /// Set at shutdown: no controller starts after it.
    closed: std::sync::atomic::AtomicBool,
    /// Apps whose controller could not be loaded, by id: `team/app` and why.
    problems: Mutex<HashMap<Uuid, (String, String)>>,
    /// The queue, whose requests of an app go wherever the app goes.
    queue: std::sync::OnceLock<Arc<queue::Queue>>,
    /// Apps taken over whose queue requests are to be taken up once their route is
    /// there (a request's task waits in its app's route).
    adopting: Mutex<std::collections::HashSet<Uuid>>,
}

impl Fleet {
    pub(crate) fn new(shared: Arc<Shared>) -> Fleet {
        Fleet {
            shared,
            controllers: Mutex::default(),
            closed: Default::default(),
            problems: Mutex::default(),
            queue: std::sync::OnceLock::new(),
            adopting: Mutex::default(),
        }
    }

    pub(crate) fn set_queue(&self, queue: Arc<queue::Queue>) {
        let _ = self.queue.set(queue);
    }

    pub(crate) fn queue(&self) -> Option<&Arc<queue::Queue>> {
        self.queue.get()
    }

    /// Makes this server the one that runs the app, where servers share the store:
    /// it takes the app's lease if nobody holds it, and then takes up what the server
    /// that ran it before left unfinished (its deploys in progress fail as interrupted;
    /// its queue requests are worked on here once its controller runs). Fails if
    /// another server runs it.
    pub(crate) async fn claim(&self, app_id: Uuid) -> anyhow::Result<()> {
        if self.shared.owners.acquire(app_id).await? == Acquired::Taken {
            for (revision, _) in self.shared.store.fail_interrupted_deploys(Some(app_id)).await? {
                tracing::warn!(revision = %revision.id, "deploy was interrupted: the server running it stopped");
            }
            self.adopting.lock().unwrap_or_else(|e| e.into_inner()).insert(app_id);
        }
        Ok(())
    }

    /// Stops running an app here (it has gone to another server): its queue requests'
    /// tasks end, and its runners drain and stop in the background.
    pub(crate) fn stop(&self, app_id: Uuid) {
        if let Some(queue) = self.queue.get() {
            queue.release(app_id);
        }
        let handle = self.controllers.lock().unwrap_or_else(|e| e.into_inner()).remove(&app_id);
        if let Some(handle) = handle {
            self.shared.gateway.unregister(&handle.team, &handle.app);
            let (reply, _done) = oneshot::channel();
            handle.send(Command::Shutdown { reply });
        }
    }

    /// Why the app's controller could not be loaded, if it could not.
    pub(crate) fn problem(&self, app_id: Uuid) -> Option<String> {
        self.problems.lock().unwrap_or_else(|e| e.into_inner()).get(&app_id).map(|(_, why)| why.clone())
    }

    /// Every app that could not be loaded, as `team/app: why`.
    pub(crate) fn problems(&self) -> Vec<String> {
        let problems = self.problems.lock().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<String> = problems.values().map(|(app, why)| format!("{app}: {why}")).collect();
        all.sort();
        all
    }

    /// The app's controller, started if it is not running yet.
    pub(crate) async fn controller(&self, app: &App, team: &str) -> anyhow::Result<ControllerHandle> {
        if let Some(handle) = self.get(app.id) {
            return Ok(handle);
        }
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            anyhow::bail!("the server is shutting down");
        }
        self.claim(app.id).await?;
        let route = AppRoute::new(
            app.team_id,
            app.id,
            app.name.clone(),
            RouteConfig {
                auth: app.auth,
                request_timeout: std::time::Duration::from_secs(app.scaling.request_timeout),
                suspended: app.suspended,
            },
        );
        let (tx, rx) = mpsc::unbounded_channel();
        let view = Arc::new(Mutex::new(Vec::new()));
        let loaded = Controller::load(app.clone(), team, route.clone(), self.shared.clone(), view.clone()).await;
        let controller = {
            let mut problems = self.problems.lock().unwrap_or_else(|e| e.into_inner());
            match loaded {
                Ok(controller) => {
                    problems.remove(&app.id);
                    controller
                }
                Err(e) => {
                    problems.insert(app.id, (format!("{team}/{}", app.name), format!("{e:#}")));
                    return Err(e);
                }
            }
        };
        let handle = ControllerHandle {
            commands: tx,
            view,
            team: team.to_owned(),
            app: app.name.clone(),
            route: route.clone(),
            charts: Arc::default(),
        };
        {
            let mut controllers = self.controllers.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(existing) = controllers.get(&app.id) {
                return Ok(existing.clone());
            }
            controllers.insert(app.id, handle.clone());
        }
        self.shared.gateway.register(team, route);
        tokio::spawn(controller.run(rx));
        let adopt = self.adopting.lock().unwrap_or_else(|e| e.into_inner()).remove(&app.id);
        if let (true, Some(queue)) = (adopt, self.queue.get())
            && let Err(e) = queue.adopt(app.id).await
        {
            tracing::error!(app = %app.name, error = %e, "cannot take up the app's queue requests");
        }
        Ok(handle)
    }

    /// Adds a reading of every app this server runs to its chart history.
    pub(crate) fn sample_charts(&self) {
        let handles: Vec<ControllerHandle> =
            self.controllers.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        for handle in handles {
            let reading = handle.chart_reading(&self.shared.metrics);
            handle.charts.lock().unwrap_or_else(|e| e.into_inner()).record(reading);
        }
    }

    pub(crate) fn get(&self, app_id: Uuid) -> Option<ControllerHandle> {
        self.controllers.lock().unwrap_or_else(|e| e.into_inner()).get(&app_id).cloned()
    }

    /// The runners of an app (none if its controller is not running).
    pub(crate) fn runners(&self, app_id: Uuid) -> Vec<RunnerInfo> {
        self.get(app_id).map(|h| h.runners()).unwrap_or_default()
    }

    /// How many runners the app has, wherever it runs: here, or as the server running it
    /// last said.
    pub(crate) fn runners_anywhere(&self, app_id: Uuid) -> u32 {
        match self.get(app_id) {
            Some(_) => self.live_runners(app_id, None),
            None => self.shared.owners.runners_elsewhere(app_id).unwrap_or(0),
        }
    }

    /// How many runners of the app (of one revision, if given) have not ended.
    pub(crate) fn live_runners(&self, app_id: Uuid, revision: Option<model::ids::RevisionId>) -> u32 {
        let runners = self.runners(app_id);
        runners.iter().filter(|r| !r.state.is_terminal() && revision.is_none_or(|rev| r.revision == rev)).count() as u32
    }

    /// Stops an app's controller and all its runners, and takes it off the gateway.
    pub(crate) async fn remove(&self, app_id: Uuid, team: &str, app: &str) {
        self.shared.gateway.unregister(team, app);
        let handle = self.controllers.lock().unwrap_or_else(|e| e.into_inner()).remove(&app_id);
        if let Some(handle) = handle {
            let (reply, done) = oneshot::channel();
            if handle.send(Command::Shutdown { reply }) {
                let _ = done.await;
            }
        }
    }

    /// Stops every controller (and so every runner), draining calls first.
    pub(crate) async fn shutdown(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        let handles: Vec<_> = self.controllers.lock().unwrap_or_else(|e| e.into_inner()).drain().collect();
        let mut waits = Vec::new();
        for (_, handle) in handles {
            let (reply, done) = oneshot::channel();
            if handle.send(Command::Shutdown { reply }) {
                waits.push(done);
            }
        }
        for done in waits {
            let _ = done.await;
        }
    }
}
