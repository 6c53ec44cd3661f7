//! A deterministic simulation of the control loop.
//!
//! One app's controller and route, with the real control plane in front of them (its
//! locks, the store in a temp dir, deploys of real archives), run on a paused clock
//! against simulated runners ([`runners`]). A seed draws a schedule of steps: deploys,
//! set-revs and rollouts of both strategies, scale changes, suspensions, stops, kills,
//! crashes, failing health checks, calls, API requests whose clients go away, and waits.
//! Runners' setups are drawn too (quick, slow, failing, never finishing), and at every
//! point where the controller lets go of the route's lock a call may start or end, as
//! one on another of the gateway's threads could.
//!
//! After every step the invariants are checked:
//! - the alias is only ever at an existing, Deployed revision of the app;
//! - no call goes to a runner that is not set up or has been told to end;
//! - no runner is told to stop gracefully while it has calls in flight;
//! - no machine type ever has more runner processes than its capacity;
//! - every runner process is one its controller knows is live;
//! - history is in order, and its activations chain up to the current revision.
//!
//! At the end the schedule's requests must all have been answered, and once the app's
//! controller is shut down no process may be left.
//!
//! A failing seed is shrunk to the fewest steps that still fail, and printed with the
//! line that replays it: `SEED=<seed> [KEEP=<steps>] cargo test -p server sim::`.
//! `SIM_SEEDS=<n>` changes how many seeds each test runs.

mod runners;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use api::error::{ApiError, ErrorCode};
use api::router::{Caller, ControlPlane};
use api::wire::{DeployParams, RolloutRequest, ScaleRequest, SetRevRequest};
use gateway::AppRoute;
use model::revision::{KeyScope, RevisionStatus};
use runners::{Fault, SharedWorld, SimBackend, World, lock};
use tokio::task::JoinHandle;

use crate::config::{Config, ServerArgs};
use crate::control::Control;
use crate::layout::Layout;

const APP: &str = "app";

/// One step of a schedule. Each carries its own draws, so that removing steps while
/// shrinking leaves the others as they were.
#[derive(Debug, Clone)]
enum Step {
    Deploy {
        variant: usize,
        recreate: bool,
    },
    SetRev {
        pick: u32,
        recreate: bool,
    },
    /// With `recent`, the revision the last set-rev named (what a user who gave up on a
    /// switch goes on to delete).
    DeleteRev {
        pick: u32,
        recent: bool,
    },
    Rollout {
        force: bool,
    },
    Scale {
        min: u32,
        max: u32,
        keep_alive: u64,
        multiplexing: u32,
    },
    Suspend {
        suspend: bool,
    },
    StopRunner {
        pick: u32,
        replace: bool,
    },
    KillRunner {
        pick: u32,
    },
    Fault {
        pick: u32,
        fault: Fault,
    },
    Calls {
        count: u32,
        hold_ms: u64,
    },
    /// The client of an API request still waiting for its answer goes away: the latest
    /// one's, or any one's.
    DropRequest {
        pick: u32,
        latest: bool,
    },
    Wait {
        ms: u64,
    },
}

fn schedule(seed: u64) -> Vec<Step> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let len = rng.usize(10..60);
    let mut steps = vec![Step::Deploy { variant: rng.usize(..VARIANTS.len()), recreate: rng.bool() }];
    while steps.len() < len {
        let step = match rng.u8(0..100) {
            0..=7 => Step::Deploy { variant: rng.usize(..VARIANTS.len()), recreate: rng.u8(0..4) == 0 },
            8..=14 => Step::SetRev { pick: rng.u32(..), recreate: rng.u8(0..4) == 0 },
            15..=17 => {
                // A user gives up on a switch (Ctrl-C) and deletes the revision it named.
                steps.push(Step::SetRev { pick: rng.u32(..), recreate: false });
                steps.push(Step::Wait { ms: rng.u64(1..1000) });
                steps.push(Step::DropRequest { pick: 0, latest: true });
                Step::DeleteRev { pick: 0, recent: true }
            }
            18..=21 => Step::DeleteRev { pick: rng.u32(..), recent: rng.bool() },
            22..=27 => Step::Rollout { force: rng.u8(0..4) == 0 },
            28..=33 => Step::Scale {
                min: rng.u32(0..3),
                max: rng.u32(2..5),
                keep_alive: rng.u64(0..20),
                multiplexing: rng.u32(1..4),
            },
            34..=35 => Step::Suspend { suspend: rng.bool() },
            36..=39 => Step::StopRunner { pick: rng.u32(..), replace: rng.bool() },
            40..=41 => Step::KillRunner { pick: rng.u32(..) },
            42..=45 => {
                Step::Fault { pick: rng.u32(..), fault: if rng.bool() { Fault::Crash } else { Fault::Unhealthy } }
            }
            46..=65 => Step::Calls { count: rng.u32(1..6), hold_ms: rng.u64(1..4000) },
            66..=71 => Step::DropRequest { pick: rng.u32(..), latest: rng.bool() },
            _ => Step::Wait { ms: rng.u64(1..5000) },
        };
        steps.push(step);
    }
    steps
}

/// The manifests deploys draw from: three machine types (one with a GPU per runner),
/// different multiplexing, two GPUs a runner, and a list of types.
const VARIANTS: &[&str] = &[
    "machine_type = \"small\"\nmax_multiplexing = 1",
    "machine_type = \"small\"\nmax_multiplexing = 3",
    "machine_type = \"large\"\nmax_multiplexing = 2",
    "machine_type = \"gpu\"\nmax_multiplexing = 2",
    "machine_type = [\"gpu\", \"large\"]\nnum_gpus = 2\nmax_multiplexing = 1",
];

const CAPACITY: &[(&str, u32)] = &[("small", 3), ("large", 2), ("gpu", 4)];

/// The GPUs of the simulated server: fewer than the `gpu` type's room, so that GPUs are
/// what runners of it wait for.
const GPUS: &[&str] = &["g0", "g1", "g2"];

/// The archive of each variant, packed once.
fn archive(variant: usize) -> Vec<u8> {
    static PACKED: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    let packed = PACKED.get_or_init(|| {
        VARIANTS
            .iter()
            .map(|runner| {
                let dir = tempfile::tempdir().expect("a temp dir");
                let manifest = format!(
                    "name = \"{APP}\"\ncommand = [\"serve\"]\n\n[scaling]\nkeep_alive = 5\nmax_concurrency = 4\n\
                     request_timeout = 600\n\n[runner]\n{runner}\nstartup_timeout = 10\ntermination_grace_period = 2\n"
                );
                std::fs::write(dir.path().join("hangar.toml"), manifest).expect("the manifest is written");
                archive::pack(dir.path()).expect("the app packs").bytes
            })
            .collect()
    });
    packed[variant].clone()
}

/// What a run found: the broken invariants, in order (empty when all held).
type Outcome = Vec<String>;

/// The server's parts around one app, on the paused clock.
struct Sim {
    control: Arc<Control>,
    world: SharedWorld,
    caller: Caller,
    /// API requests not yet answered, with what they were.
    requests: Vec<(String, JoinHandle<Result<(), ApiError>>)>,
    route: Option<Arc<AppRoute>>,
    /// The revision the last set-rev named.
    last_target: Option<String>,
    _dir: tempfile::TempDir,
}

impl Sim {
    async fn new(seed: u64) -> Sim {
        let dir = tempfile::Builder::new().prefix("hangar-sim-").tempdir_in(scratch()).expect("a temp dir");
        let args = ServerArgs {
            data_dir: Some(dir.path().to_owned()),
            machine_types: CAPACITY.iter().map(|(name, n)| format!("{name}={n}")).collect(),
            config: Some(dir.path().join("hangar.toml")),
            gpus: GPUS.iter().map(|g| g.to_string()).collect(),
            sandbox: Some("none".to_owned()),
            backoff_base: Some(1.0),
            ..ServerArgs::default()
        };
        std::fs::write(dir.path().join("hangar.toml"), "[machine_types.gpu]\ncapacity = 4\ngpus = 1\n")
            .expect("the config file is written");
        let config = Arc::new(Config::load(&args).expect("the simulation's config is valid"));
        let layout = Layout::new(config.data_dir.clone());
        crate::prepare_data_dir(&layout).expect("the data dir is made");
        let store = store::Store::open_sqlite(&layout.database()).await.expect("the store opens");
        crate::bootstrap(&store, &layout).await.expect("the first team is made");
        let team = store.team_by_name("default").await.expect("the store answers").expect("the team exists");
        let world = World::new(seed, CAPACITY.iter().map(|(name, n)| (name.to_string(), *n)).collect());
        let backend = Arc::new(SimBackend { world: world.clone() });
        let sandbox = Arc::new(supervisor::Sandbox::none());
        let gpus = supervisor::Gpus::given(&config.gpus.clone().unwrap_or_default()).expect("the GPUs are valid");
        let control =
            crate::assemble(config, store, layout, sandbox, backend, Arc::new(gpus), crate::owners::Owners::alone())
                .expect("the server's parts assemble");
        let caller = Caller { key_id: "sim".to_owned(), scope: KeyScope::Admin, team_id: team.id, team: team.name };
        Sim { control, world, caller, requests: Vec::new(), route: None, last_target: None, _dir: dir }
    }

    /// Starts an API request as a client would; it runs until answered or dropped.
    fn request<F>(&mut self, what: String, op: impl FnOnce(Arc<Control>, Caller) -> F)
    where
        F: Future<Output = Result<(), ApiError>> + Send + 'static,
    {
        let task = tokio::spawn(op(self.control.clone(), self.caller.clone()));
        self.requests.push((what, task));
    }

    async fn step(&mut self, step: &Step) {
        match *step {
            Step::Deploy { variant, recreate } => {
                let params = DeployParams { strategy: Some(strategy(recreate)), ..DeployParams::default() };
                self.request(format!("deploy of variant {variant}"), move |c, caller| async move {
                    c.deploy(&caller, params, axum::body::Body::from(archive(variant))).await.map(drop)
                });
            }
            Step::SetRev { pick, recreate } => {
                let Some(revision) = self.pick_revision(pick).await else { return };
                self.last_target = Some(revision.clone());
                let request = SetRevRequest { revision, strategy: Some(strategy(recreate)), auth: None, guard: false };
                self.request(format!("set-rev {}", request.revision), move |c, caller| async move {
                    c.set_rev(&caller, APP, request).await.map(drop)
                });
            }
            Step::DeleteRev { pick, recent } => {
                let picked = if recent { self.last_target.clone() } else { self.pick_revision(pick).await };
                let Some(revision) = picked else { return };
                self.request(format!("delete-rev {revision}"), move |c, caller| async move {
                    c.delete_revision(&caller, APP, &revision).await.map(drop)
                });
            }
            Step::Rollout { force } => {
                self.request(format!("rollout (force: {force})"), move |c, caller| async move {
                    c.rollout(&caller, APP, RolloutRequest { force }).await.map(drop)
                });
            }
            Step::Scale { min, max, keep_alive, multiplexing } => {
                let request = ScaleRequest {
                    min_concurrency: Some(min),
                    max_concurrency: Some(max.max(min)),
                    keep_alive: Some(keep_alive),
                    max_multiplexing: Some(multiplexing),
                    ..ScaleRequest::default()
                };
                self.request("scale".to_owned(), move |c, caller| async move {
                    c.scale(&caller, APP, request).await.map(drop)
                });
            }
            Step::Suspend { suspend } => {
                self.request(format!("suspend: {suspend}"), move |c, caller| async move {
                    c.suspend(&caller, APP, suspend).await.map(drop)
                });
            }
            Step::StopRunner { pick, replace } => {
                let Some(id) = lock(&self.world).pick_alive(pick) else { return };
                self.request(format!("stop runner {id} (replace: {replace})"), move |c, caller| async move {
                    c.stop_runner(&caller, &id.to_string(), replace).await.map(drop)
                });
            }
            Step::KillRunner { pick } => {
                let Some(id) = lock(&self.world).pick_alive(pick) else { return };
                self.request(format!("kill runner {id}"), move |c, caller| async move {
                    c.kill_runner(&caller, &id.to_string()).await.map(drop)
                });
            }
            Step::Fault { pick, fault } => {
                let w = lock(&self.world);
                if let Some(id) = w.pick_alive(pick) {
                    w.fault(id, fault);
                }
            }
            Step::Calls { count, hold_ms } => {
                let Some(route) = self.route.clone() else { return };
                for i in 0..count {
                    let (route, world) = (route.clone(), self.world.clone());
                    let hold = Duration::from_millis(hold_ms * u64::from(i + 1) / u64::from(count));
                    tokio::spawn(async move {
                        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
                        let Ok(lease) = route.acquire(deadline, None).await else { return };
                        let Some(n) = lock(&world).admit(lease) else { return };
                        tokio::time::sleep(hold).await;
                        lock(&world).end_call(n);
                    });
                }
            }
            Step::DropRequest { pick, latest } => {
                self.requests.retain(|(_, task)| !task.is_finished());
                if !self.requests.is_empty() {
                    let n = if latest { self.requests.len() - 1 } else { pick as usize % self.requests.len() };
                    let (_, task) = self.requests.remove(n);
                    task.abort();
                }
            }
            Step::Wait { ms } => tokio::time::sleep(Duration::from_millis(ms)).await,
        }
    }

    /// The id of the app's `pick`-th revision, counting round.
    async fn pick_revision(&self, pick: u32) -> Option<String> {
        let app = self.control.store.app_by_name(self.caller.team_id, APP).await.ok()??;
        let revisions = self.control.store.list_revisions(app.id, None).await.ok()?;
        (!revisions.is_empty()).then(|| revisions[pick as usize % revisions.len()].id.to_string())
    }

    /// Lets whatever the step set off run: tasks run until all of them wait on the clock.
    async fn settle(&mut self) {
        tokio::time::sleep(Duration::from_millis(1)).await;
        if self.route.is_none()
            && let Some(route) = self.control.fleet.shared.gateway.route(&format!("{}/{APP}", self.caller.team))
        {
            let (world, weak) = (self.world.clone(), Arc::downgrade(&route));
            route.set_interleave(Box::new(move || {
                if let Some(route) = weak.upgrade() {
                    runners::interleaved_call(&world, &route);
                }
            }));
            self.route = Some(route);
        }
    }

    /// Checks the invariants that hold at every moment; what breaks is recorded.
    async fn check(&mut self) {
        // First what needs no waiting, so that nothing moves in between.
        let live_in_view: Vec<_> = self
            .app_id()
            .await
            .map(|id| self.control.fleet.runners(id))
            .unwrap_or_default()
            .into_iter()
            .filter(|r| !r.state.is_terminal())
            .map(|r| r.id)
            .collect();
        {
            let mut w = lock(&self.world);
            let lost: Vec<String> =
                w.alive().into_iter().filter(|id| !live_in_view.contains(id)).map(|id| id.to_string()).collect();
            if !lost.is_empty() {
                w.violations.push(format!("runner processes their controller does not list as live: {lost:?}"));
            }
        }
        let store = &self.control.store;
        let Ok(Some(app)) = store.app_by_name(self.caller.team_id, APP).await else { return };
        let mut broken = Vec::new();
        if let Some(current) = app.current_revision {
            match store.revision(current).await {
                Ok(Some(rev)) if rev.app_id != app.id => {
                    broken.push(format!("the alias is at {current}, not the app's"))
                }
                Ok(Some(rev))
                    if rev.status == RevisionStatus::Deployed
                        || (app.suspended && rev.status == RevisionStatus::Suspended) => {}
                Ok(Some(rev)) => broken.push(format!("the alias is at {current}, which is {}", rev.status.as_str())),
                Ok(None) => broken.push(format!("the alias is at {current}, which does not exist")),
                Err(e) => broken.push(format!("the store cannot read revision {current}: {e}")),
            }
        }
        // Newest first, as listings show it. The alias is read again after: a switch
        // that lands in between makes the two disagree without anything being wrong.
        let mut history = store.list_history(app.id).await.unwrap_or_default();
        history.reverse();
        let again = store.app_by_name(self.caller.team_id, APP).await.ok().flatten();
        if again.is_some_and(|a| a.current_revision == app.current_revision) {
            broken.extend(history_problem(&history, app.current_revision.map(|r| r.to_string())));
        }
        lock(&self.world).violations.extend(broken);
    }

    async fn app_id(&self) -> Option<uuid::Uuid> {
        self.control.store.app_by_name(self.caller.team_id, APP).await.ok()?.map(|a| a.id)
    }

    /// After the schedule: every request answers, calls end, and once the app's
    /// controller has shut down no runner process is left.
    async fn finish(&mut self) {
        let trace = std::env::var_os("SIM_TRACE").is_some();
        for minute in 0..60 {
            tokio::time::sleep(Duration::from_secs(60)).await;
            if trace {
                let w = lock(&self.world);
                eprintln!("finish: minute {minute}, {} calls, runners {:?}", w.calls(), w.alive());
            }
        }
        for (what, task) in std::mem::take(&mut self.requests) {
            if !task.is_finished() {
                lock(&self.world).violations.push(format!("{what} was not answered within an hour"));
                task.abort();
            } else if let Ok(Err(e)) = task.await
                && e.code == ErrorCode::Internal
            {
                lock(&self.world).violations.push(format!("{what} failed inside the server: {}", e.message));
            }
        }
        if let Some(route) = &self.route
            && let Ok(Some(app)) = self.control.store.app_by_name(self.caller.team_id, APP).await
            && route.revision() != app.current_revision
        {
            lock(&self.world).violations.push(format!(
                "the gateway routes to revision {:?} while the store's alias is at {:?}",
                route.revision(),
                app.current_revision
            ));
        }
        let shutdown = self.control.fleet.shutdown();
        if tokio::time::timeout(Duration::from_secs(3600), shutdown).await.is_err() {
            lock(&self.world).violations.push("the app's controller did not shut down within an hour".to_owned());
        }
        let mut w = lock(&self.world);
        let left = w.alive();
        if !left.is_empty() {
            w.violations.push(format!("runner processes left after shutdown: {left:?}"));
        }
        if w.calls() > 0 {
            let n = w.calls();
            w.violations.push(format!("{n} calls still hold a slot after shutdown"));
        }
    }
}

fn strategy(recreate: bool) -> String {
    if recreate { "recreate" } else { "rolling" }.to_owned()
}

/// Whether history (oldest first) is in time order and its activations (deploys and set-revs that
/// made a revision current) chain from one revision to the next, ending at `current`.
fn history_problem(history: &[model::records::HistoryEntry], current: Option<String>) -> Option<String> {
    if let Some(w) = history.windows(2).find(|w| w[1].at < w[0].at) {
        return Some(format!("history goes back in time: {:?} after {:?}", w[1].details, w[0].details));
    }
    let mut at: Option<String> = None;
    for entry in history {
        let target = match entry.action.as_str() {
            "deploy" => entry.details.strip_prefix("revision ").and_then(|d| d.split(' ').next()),
            "set_rev" => {
                let d = entry.details.strip_prefix("revision ")?;
                let (from, rest) = d.split_once(" -> ")?;
                if from != at.as_deref().unwrap_or("none") {
                    return Some(format!("history has a switch from {from} while the alias was at {at:?}"));
                }
                rest.split(' ').next()
            }
            _ => continue,
        };
        at = target.map(str::to_owned);
    }
    (at != current).then(|| format!("history's last activation is {at:?}, but the alias is at {current:?}"))
}

/// Where the simulations' data dirs go: memory if the machine has it there.
fn scratch() -> std::path::PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() { shm.to_owned() } else { std::env::temp_dir() }
}

/// Runs `steps` (those whose index is in `keep`, if given) with `seed` on a fresh
/// world and paused clock.
fn run(seed: u64, steps: &[Step], keep: Option<&[usize]>) -> Outcome {
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().expect("a runtime");
    runtime.block_on(async {
        let mut sim = Sim::new(seed).await;
        let trace = std::env::var_os("SIM_TRACE").is_some();
        let start = tokio::time::Instant::now();
        for (i, step) in steps.iter().enumerate() {
            if keep.is_some_and(|k| !k.contains(&i)) {
                continue;
            }
            if trace {
                eprintln!("[{:>9.3}s] {i}: {step:?}", start.elapsed().as_secs_f64());
            }
            sim.step(step).await;
            sim.settle().await;
            sim.check().await;
            if !lock(&sim.world).violations.is_empty() {
                break;
            }
        }
        if lock(&sim.world).violations.is_empty() {
            sim.finish().await;
        }
        std::mem::take(&mut lock(&sim.world).violations)
    })
}

/// The fewest steps of a failing schedule that still fail, found by removing chunks,
/// then single steps, while the run keeps failing.
fn shrink(seed: u64, steps: &[Step]) -> (Vec<usize>, Outcome) {
    let mut keep: Vec<usize> = (0..steps.len()).collect();
    let mut outcome = run(seed, steps, Some(&keep));
    let mut chunk = keep.len() / 2;
    // Shrinking gives up after a while: a long schedule is still a failing one.
    let give_up = std::time::Instant::now() + Duration::from_secs(60);
    let more = || std::time::Instant::now() < give_up;
    while chunk >= 1 && more() {
        let mut start = 0;
        let mut removed_any = false;
        while start < keep.len() && more() {
            let candidate: Vec<usize> =
                keep.iter().enumerate().filter(|(i, _)| *i < start || *i >= start + chunk).map(|(_, s)| *s).collect();
            let found = run(seed, steps, Some(&candidate));
            if !found.is_empty() {
                keep = candidate;
                outcome = found;
                removed_any = true;
            } else {
                start += chunk;
            }
        }
        if !removed_any || chunk == 1 {
            chunk /= 2;
        }
    }
    (keep, outcome)
}

/// Runs seeds `first..first + count` (or only `SEED`), failing with the shortest
/// schedule found for the first seed that breaks an invariant.
fn run_seeds(first: u64, count: u64) {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let seeds: Vec<u64> = match env("SEED") {
        Some(seed) => vec![seed.parse().expect("SEED is a number")],
        None => {
            let count = env("SIM_SEEDS").map_or(count, |n| n.parse().expect("SIM_SEEDS is a number"));
            (first..first + count).collect()
        }
    };
    let keep: Option<Vec<usize>> =
        env("KEEP").map(|k| k.split(',').map(|i| i.trim().parse().expect("KEEP is a list of step numbers")).collect());
    for seed in seeds {
        let steps = schedule(seed);
        let outcome = run(seed, &steps, keep.as_deref());
        if outcome.is_empty() {
            continue;
        }
        eprintln!("seed {seed} fails: {}; shrinking its schedule", outcome.join("; "));
        let (kept, shrunk) =
            if keep.is_some() { (keep.clone().unwrap_or_default(), outcome) } else { shrink(seed, &steps) };
        let listing: Vec<String> = kept.iter().map(|&i| format!("  {i}: {:?}", steps[i])).collect();
        let keep_arg = kept.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
        panic!(
            "seed {seed} breaks the control loop's invariants:\n  {}\nshortest failing schedule ({} of {} steps):\n{}\n\
             replay: SEED={seed} KEEP={keep_arg} cargo test -p server sim::",
            shrunk.join("\n  "),
            kept.len(),
            steps.len(),
            listing.join("\n")
        );
    }
}

#[test]
fn history_chain_is_checked() {
    use model::records::HistoryEntry;
    let at = time::OffsetDateTime::UNIX_EPOCH;
    let entry = |action: &str, details: &str| HistoryEntry {
        at,
        action: action.to_owned(),
        key_id: None,
        details: details.to_owned(),
    };
    let good = [entry("deploy", "revision a deployed (rolling)"), entry("set_rev", "revision a -> b (rolling)")];
    assert_eq!(history_problem(&good, Some("b".to_owned())), None);
    assert!(history_problem(&good, Some("a".to_owned())).is_some());
    let skipped = [entry("deploy", "revision a deployed (rolling)"), entry("set_rev", "revision c -> b (rolling)")];
    assert!(history_problem(&skipped, Some("b".to_owned())).is_some());
}

// The seeds are split over several tests so that the test runner spreads them over
// the machine's cores.
#[test]
fn control_loop_seeds_0() {
    run_seeds(0, 250);
}

#[test]
fn control_loop_seeds_1() {
    run_seeds(250, 250);
}

#[test]
fn control_loop_seeds_2() {
    run_seeds(500, 250);
}

#[test]
fn control_loop_seeds_3() {
    run_seeds(750, 250);
}
