//! The simulated runner backend, and the world it shares with the simulated calls: which
//! runners have processes, which calls hold a slot on which runner, and what went wrong.
//!
//! A runner here is a task on the paused clock. Its setup takes a drawn time and then
//! passes, fails or never finishes (the startup timeout ends it, as the local backend's
//! does); once serving it lives until it is ordered to end or the schedule crashes it or
//! fails its health checks. It reports the same [`Event`]s, in the same order, as a
//! local process would.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use gateway::{AppRoute, Lease};
use model::ids::RunnerId;
use model::records::OutputLine;
use netns::Endpoint;
use supervisor::{Event, Order, Phase, RunnerBackend, RunnerHandle, RunnerLaunch};
use tokio::sync::{broadcast, mpsc};

/// What the schedule does to a runner from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fault {
    /// Its process ends by itself.
    Crash,
    /// Its health checks fail; the backend reports it and kills it.
    Unhealthy,
}

struct SimRunner {
    machine_type: String,
    /// The GPUs it was given (`CUDA_VISIBLE_DEVICES`).
    gpus: Vec<String>,
    /// Set once its health check has passed.
    healthy: bool,
    /// The first order it was given.
    ordered: Option<Order>,
    /// Set once its process has ended (before `Exited` is sent).
    ended: bool,
    faults: mpsc::UnboundedSender<Fault>,
}

/// A call holding a slot.
struct Call {
    runner: RunnerId,
    /// Freed when the call ends (dropped).
    _lease: Lease,
}

/// Everything the simulated parts share. Locked only for moments, never across an await.
pub(super) struct World {
    pub(super) rng: fastrand::Rng,
    runners: HashMap<RunnerId, SimRunner>,
    /// In the order they were launched, for picking one by number.
    launched: Vec<RunnerId>,
    calls: BTreeMap<u64, Call>,
    next_call: u64,
    /// Runner processes alive, by machine type.
    alive: BTreeMap<String, u32>,
    capacity: BTreeMap<String, u32>,
    /// Which runner process holds each GPU.
    gpu_holders: BTreeMap<String, RunnerId>,
    /// Broken invariants, in the order they were seen.
    pub(super) violations: Vec<String>,
    /// Whether calls may start and end at the route's interleaving points.
    pub(super) interleave: bool,
}

pub(super) type SharedWorld = Arc<Mutex<World>>;

pub(super) fn lock(world: &SharedWorld) -> MutexGuard<'_, World> {
    world.lock().unwrap_or_else(|e| e.into_inner())
}

impl World {
    pub(super) fn new(seed: u64, capacity: BTreeMap<String, u32>) -> SharedWorld {
        Arc::new(Mutex::new(World {
            rng: fastrand::Rng::with_seed(seed),
            runners: HashMap::new(),
            launched: Vec::new(),
            calls: BTreeMap::new(),
            next_call: 0,
            alive: BTreeMap::new(),
            capacity,
            gpu_holders: BTreeMap::new(),
            violations: Vec::new(),
            interleave: true,
        }))
    }

    fn violation(&mut self, what: String) {
        self.violations.push(what);
    }

    fn calls_on(&self, id: RunnerId) -> usize {
        self.calls.values().filter(|c| c.runner == id).count()
    }

    /// Calls holding a slot now.
    pub(super) fn calls(&self) -> usize {
        self.calls.len()
    }

    /// Runners whose process has not ended.
    pub(super) fn alive(&self) -> Vec<RunnerId> {
        self.launched.iter().copied().filter(|id| !self.runners[id].ended).collect()
    }

    /// The `pick`-th runner with a live process, counting round.
    pub(super) fn pick_alive(&self, pick: u32) -> Option<RunnerId> {
        let alive = self.alive();
        (!alive.is_empty()).then(|| alive[pick as usize % alive.len()])
    }

    /// A call has been given a slot: it must be on a runner that is set up and has not
    /// been told to end. Returns the call's number, or `None` when the runner's process
    /// has already crashed (the call fails at once, as it would on a dead socket).
    pub(super) fn admit(&mut self, lease: Lease) -> Option<u64> {
        let id = lease.runner;
        let Some(runner) = self.runners.get(&id) else {
            self.violation(format!("a call went to runner {id}, which was never started"));
            return None;
        };
        let (ordered, healthy, ended) = (runner.ordered, runner.healthy, runner.ended);
        if let Some(order) = ordered {
            self.violation(format!("a call went to runner {id} after it was told to end ({order:?})"));
        } else if !healthy {
            self.violation(format!("a call went to runner {id} before its health check passed"));
        }
        if ended {
            return None;
        }
        let n = self.next_call;
        self.next_call += 1;
        self.calls.insert(n, Call { runner: id, _lease: lease });
        Some(n)
    }

    /// Ends call `n` (frees its slot), if it has not ended.
    pub(super) fn end_call(&mut self, n: u64) {
        self.calls.remove(&n);
    }

    /// Ends the `pick`-th call in flight, if there is one.
    pub(super) fn end_some_call(&mut self, pick: u64) {
        if let Some(&n) = self.calls.keys().nth(pick as usize % self.calls.len().max(1)) {
            self.calls.remove(&n);
        }
    }

    pub(super) fn fault(&self, id: RunnerId, fault: Fault) {
        if let Some(runner) = self.runners.get(&id) {
            let _ = runner.faults.send(fault);
        }
    }

    /// The process of runner `id` has ended: its calls fail, its room is free.
    fn ended(&mut self, id: RunnerId) {
        let runner = self.runners.get_mut(&id).expect("ended runners were launched");
        runner.ended = true;
        let machine_type = runner.machine_type.clone();
        for gpu in runner.gpus.clone() {
            if self.gpu_holders.get(&gpu) == Some(&id) {
                self.gpu_holders.remove(&gpu);
            }
        }
        *self.alive.entry(machine_type).or_default() -= 1;
        self.calls.retain(|_, c| c.runner != id);
    }
}

/// Starts a call at one of the route's interleaving points, as a call on another of the
/// gateway's threads could: it takes a slot now if one is free, and holds it for a drawn
/// time.
pub(super) fn interleaved_call(world: &SharedWorld, route: &Arc<AppRoute>) {
    let mut w = lock(world);
    if !w.interleave {
        return;
    }
    match w.rng.u8(0..8) {
        0 | 1 => {
            // A call that would have to wait is not started here: waiting is what the
            // schedule's own calls do.
            let Some(lease) = route.try_acquire() else { return };
            let hold = Duration::from_millis(w.rng.u64(1..3000));
            if let Some(n) = w.admit(lease) {
                let world = world.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(hold).await;
                    lock(&world).end_call(n);
                });
            }
        }
        2 => {
            let pick = w.rng.u64(..);
            w.end_some_call(pick);
        }
        _ => {}
    }
}

/// Runners as tasks on the paused clock.
pub(super) struct SimBackend {
    pub(super) world: SharedWorld,
}

/// How a runner's setup goes, drawn at launch.
enum Setup {
    Passes(Duration),
    Fails(Duration),
    Hangs,
}

impl RunnerBackend for SimBackend {
    fn launch(&self, launch: RunnerLaunch, events: mpsc::UnboundedSender<Event>) -> std::io::Result<RunnerHandle> {
        let id = launch.id;
        let (faults, fault_rx) = mpsc::unbounded_channel();
        let setup = {
            let mut w = lock(&self.world);
            let alive = w.alive.entry(launch.machine_type.clone()).or_default();
            *alive += 1;
            let alive = *alive;
            let capacity = w.capacity.get(&launch.machine_type).copied().unwrap_or(0);
            if alive > capacity {
                w.violation(format!(
                    "runner {id} started as the {alive}th process of machine type {:?}, which has room for {capacity}",
                    launch.machine_type
                ));
            }
            let gpus: Vec<String> = launch
                .env
                .iter()
                .find(|(k, _)| k == "CUDA_VISIBLE_DEVICES")
                .map(|(_, v)| v.split(',').filter(|g| !g.is_empty()).map(str::to_owned).collect())
                .unwrap_or_default();
            for gpu in &gpus {
                if let Some(holder) = w.gpu_holders.insert(gpu.clone(), id) {
                    w.violation(format!("runner {id} was given GPU {gpu}, which runner {holder} still holds"));
                }
            }
            w.runners.insert(
                id,
                SimRunner {
                    machine_type: launch.machine_type.clone(),
                    gpus,
                    healthy: false,
                    ordered: None,
                    ended: false,
                    faults,
                },
            );
            w.launched.push(id);
            match w.rng.u8(0..20) {
                0..=1 => Setup::Fails(Duration::from_millis(w.rng.u64(0..2000))),
                2 => Setup::Hangs,
                3 => Setup::Passes(Duration::from_millis(w.rng.u64(2000..8000))),
                _ => Setup::Passes(Duration::from_millis(w.rng.u64(0..1500))),
            }
        };
        let addr = Endpoint::host(SocketAddr::from(([127, 0, 0, 1], 1)));
        let (handle, orders) = RunnerHandle::new(id, addr);
        let runner = Runner { world: self.world.clone(), id, events, orders, faults: fault_rx };
        tokio::spawn(runner.run(setup, launch.startup_timeout));
        Ok(handle)
    }

    fn read_log(&self, _id: RunnerId, _offset: u64) -> std::io::Result<(String, u64)> {
        Ok((String::new(), 0))
    }

    fn subscribe_output(&self, _id: RunnerId) -> Option<broadcast::Receiver<Arc<OutputLine>>> {
        None
    }
}

/// One simulated runner's life.
struct Runner {
    world: SharedWorld,
    id: RunnerId,
    events: mpsc::UnboundedSender<Event>,
    orders: mpsc::UnboundedReceiver<Order>,
    faults: mpsc::UnboundedReceiver<Fault>,
}

impl Runner {
    async fn run(mut self, setup: Setup, startup_timeout: Duration) {
        let (ready_in, fails) = match setup {
            Setup::Passes(d) => (d, false),
            Setup::Fails(d) => (d, true),
            Setup::Hangs => (Duration::MAX, false),
        };
        let until = ready_in.min(startup_timeout);
        tokio::select! {
            () = tokio::time::sleep(until) => {
                if ready_in > startup_timeout {
                    return self.exit(Phase::Setup, false, "health check did not pass within the startup timeout");
                }
                if fails {
                    return self.exit(Phase::Setup, false, "exited with exit status: 1");
                }
                lock(&self.world).runners.get_mut(&self.id).expect("launched").healthy = true;
                let _ = self.events.send(Event::Healthy { id: self.id });
            }
            order = self.orders.recv() => return self.obey(Phase::Setup, order).await,
            Some(_) = self.faults.recv() => return self.exit(Phase::Setup, false, "crashed during setup"),
        }
        // A closed fault channel only disables its branch.
        tokio::select! {
            order = self.orders.recv() => self.obey(Phase::Serving, order).await,
            Some(fault) = self.faults.recv() => match fault {
                Fault::Crash => self.exit(Phase::Serving, false, "exited with signal: 9 (SIGKILL)"),
                Fault::Unhealthy => {
                    let reason = "3 health checks in a row failed";
                    let _ = self.events.send(Event::Unhealthy { id: self.id, reason: reason.to_owned() });
                    self.exit(Phase::Serving, false, reason);
                }
            },
        }
    }

    /// Carries out an order: a graceful stop must find no call in flight.
    async fn obey(mut self, phase: Phase, order: Option<Order>) {
        let order = order.unwrap_or(Order::Kill);
        {
            let mut w = lock(&self.world);
            let calls = w.calls_on(self.id);
            if matches!(order, Order::Stop { .. }) && calls > 0 {
                w.violation(format!("runner {} was told to stop gracefully with {calls} calls in flight", self.id));
            }
            w.runners.get_mut(&self.id).expect("launched").ordered.get_or_insert(order);
        }
        if let Order::Stop { grace } = order {
            // It takes a while to shut down, unless it is killed first.
            let takes = Duration::from_millis(lock(&self.world).rng.u64(0..3000)).min(grace);
            tokio::select! {
                () = tokio::time::sleep(takes) => {}
                Some(Order::Kill) = self.orders.recv() => {}
            }
        }
        self.exit(phase, true, "stopped");
    }

    fn exit(self, phase: Phase, requested: bool, reason: &str) {
        lock(&self.world).ended(self.id);
        let _ = self.events.send(Event::Exited { id: self.id, phase, requested, reason: reason.to_owned() });
    }
}
