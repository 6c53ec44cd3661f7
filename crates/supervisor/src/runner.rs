//! Runners as local processes: start one in its revision's directory, watch its health,
//! keep its output as a bounded log, and stop it (SIGTERM to its process group, SIGKILL
//! after the grace period) or kill it when told.
//!
//! Each runner is watched by one task that owns its process. The task reports what
//! happens as [`Event`]s on the channel given at launch, and takes orders through the
//! [`RunnerHandle`]. It always ends with exactly one [`Event::Exited`], after which no
//! process of the runner's group is left.
//!
//! A runner's output goes to its log and, for whoever asks, to a live tap
//! ([`RunnerBackend::subscribe_output`]), so that a runner's lines can be attached to
//! the call it is serving.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use model::ids::RunnerId;
use model::records::{OutputLine, TermSize};
use netns::Endpoint;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;

use crate::cgroup::{Group, Limits};
use crate::exec::{ExecSession, ExecTarget, ExecTargets};
use crate::group::{kill_group, signal_group};
use crate::sandbox::{Confinement, Sandbox, Started};

/// How a runner's health is watched once it is up.
#[derive(Debug, Clone)]
pub struct HealthPolicy {
    /// Time between checks while the runner serves.
    pub interval: Duration,
    /// Consecutive failed checks after which a serving runner is given up.
    pub failure_threshold: u32,
    /// How long one check may take.
    pub probe_timeout: Duration,
    /// After the runner is first healthy, failed checks do not count for this long.
    pub start_period: Duration,
}

/// Everything needed to start one runner.
#[derive(Debug, Clone)]
pub struct RunnerLaunch {
    pub id: RunnerId,
    /// The machine type whose room it holds (its limits are in `limits`).
    pub machine_type: String,
    /// The whole GPUs it needs: those in `confinement.devices` for a local runner; a
    /// cluster finds them for a remote one.
    pub gpu_count: u32,
    pub command: Vec<String>,
    /// What it may see: its revision's code (its working directory), its cache, its uid.
    pub confinement: Confinement,
    /// The runner's environment, apart from `PORT`, which the backend chooses. Nothing
    /// of the server's own environment is inherited.
    pub env: Vec<(String, String)>,
    pub health_path: String,
    pub startup_timeout: Duration,
    pub health: HealthPolicy,
    /// What its processes may use together (its machine type's limits). Enforced by the
    /// kernel where the server has cgroups; otherwise the memory limit is checked by
    /// measuring, and a runner found over it is killed.
    pub limits: Limits,
}

/// Where a runner was in its life when its process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Setup,
    Serving,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The health check passed for the first time: the runner may take calls.
    Healthy { id: RunnerId },
    /// A serving runner failed `failure_threshold` checks in a row; it is being killed.
    Unhealthy { id: RunnerId, reason: String },
    /// A runner that a cluster places waits in the cluster's queue, for `reason`
    /// (Slurm's: `Resources`, `Priority`, …).
    Waiting { id: RunnerId, reason: String },
    /// A runner that a cluster placed has started on `node` with the cluster's `gpus`:
    /// health checks and calls go to `addr` from now on.
    Placed { id: RunnerId, addr: Endpoint, node: String, gpus: Vec<String> },
    /// The process has ended and its group is gone. `requested` is true when it was
    /// stopped or killed on order; `reason` says what happened in words for people.
    Exited { id: RunnerId, phase: Phase, requested: bool, reason: String },
}

impl Event {
    pub fn runner(&self) -> RunnerId {
        match self {
            Event::Healthy { id }
            | Event::Unhealthy { id, .. }
            | Event::Waiting { id, .. }
            | Event::Placed { id, .. }
            | Event::Exited { id, .. } => *id,
        }
    }
}

/// What a backend is told to do with a runner, through its [`RunnerHandle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// End it gracefully: SIGTERM now, SIGKILL once `grace` has passed.
    Stop { grace: Duration },
    /// End it now.
    Kill,
}

/// Orders for one running runner. Dropping it does not stop the runner.
#[derive(Debug, Clone)]
pub struct RunnerHandle {
    pub id: RunnerId,
    /// Where the runner serves HTTP (in a sandbox: on the loopback of its own network
    /// namespace, which only the server can reach).
    pub addr: Endpoint,
    orders: mpsc::UnboundedSender<Order>,
}

impl RunnerHandle {
    /// A handle for a runner serving at `addr`, and the receiving end of its orders,
    /// for the backend that runs it.
    pub fn new(id: RunnerId, addr: Endpoint) -> (RunnerHandle, mpsc::UnboundedReceiver<Order>) {
        let (orders, rx) = mpsc::unbounded_channel();
        (RunnerHandle { id, addr, orders }, rx)
    }

    /// SIGTERM to the runner's process group now, SIGKILL after `grace`.
    pub fn stop(&self, grace: Duration) {
        let _ = self.orders.send(Order::Stop { grace });
    }

    /// SIGKILL to the runner's process group now.
    pub fn kill(&self) {
        let _ = self.orders.send(Order::Kill);
    }
}

/// Something that can run runners. Local processes today; runners as Kubernetes Pods
/// would be another implementation.
pub trait RunnerBackend: Send + Sync + 'static {
    /// Starts a runner and begins watching it; events go to `events`.
    fn launch(&self, launch: RunnerLaunch, events: mpsc::UnboundedSender<Event>) -> std::io::Result<RunnerHandle>;

    /// The last `lines` lines of a runner's log (all of it when `None`), oldest first,
    /// starting after byte `offset`; returns the text and the offset to read from next.
    fn read_log(&self, id: RunnerId, offset: u64) -> std::io::Result<(String, u64)>;

    /// A live tap of a runner's output: every line it writes to stdout or stderr from
    /// now on, in the order each stream wrote them, stamped with the time its log entry
    /// carries. `None` when the runner is unknown or has ended (once [`Event::Exited`]
    /// has been sent). The receiver is closed once the runner's output has ended; a
    /// receiver that falls more than the backend's buffer behind loses the oldest lines
    /// (`RecvError::Lagged`) rather than slowing the runner down.
    fn subscribe_output(&self, id: RunnerId) -> Option<broadcast::Receiver<Arc<OutputLine>>>;

    /// Runs `command` inside the runner `id`, as its own processes run (its sandbox, its
    /// uid, its environment, its GPUs), with a terminal of `tty`'s size when given.
    /// `NotFound` when the runner is unknown, not started yet or ended; `Unsupported`
    /// where this backend cannot reach its runners' sandboxes.
    fn exec(&self, id: RunnerId, command: &[String], tty: Option<TermSize>) -> std::io::Result<ExecSession> {
        let _ = (id, command, tty);
        Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "this backend cannot run commands in its runners"))
    }

    /// The workload manager that places runners and holds their GPUs (`slurm`), or
    /// `None` when this server does. A cluster's runner is launched with only its count
    /// of GPUs, may wait in the cluster's queue ([`Event::Waiting`]), and gets its
    /// address when it has started ([`Event::Placed`]).
    fn cluster(&self) -> Option<&'static str> {
        None
    }
}

/// Lines a tap holds for its slowest receiver before that receiver starts losing them.
pub(crate) const TAP_CAPACITY: usize = 1024;

/// The live taps of the runners that have not ended yet.
pub(crate) type Taps = Arc<Mutex<HashMap<RunnerId, broadcast::Sender<Arc<OutputLine>>>>>;

/// Runners as child processes of this server.
pub struct LocalProcesses {
    /// `<dir>/<runner id>/` holds each runner's log and, while it runs, its pid file.
    dir: PathBuf,
    /// A log is rotated (one older file kept) when it reaches this size.
    log_limit: u64,
    taps: Taps,
    /// The runners commands may be run in.
    execs: ExecTargets,
    sandbox: Arc<Sandbox>,
    /// Whether its runners are killed by the kernel when this process ends.
    die_with_this_process: bool,
}

impl LocalProcesses {
    pub fn new(dir: PathBuf, log_limit: u64, sandbox: Arc<Sandbox>) -> LocalProcesses {
        LocalProcesses {
            dir,
            log_limit,
            taps: Taps::default(),
            execs: ExecTargets::default(),
            sandbox,
            die_with_this_process: false,
        }
    }

    /// Runners that the kernel kills when this process ends, however it ends: for an
    /// agent on a cluster's node, whose runner nobody would end otherwise (the cluster
    /// tracks the agent's processes, and a runner whose agent was killed first is
    /// nobody's child any more). Runners must then be launched from threads that live
    /// as long as the process.
    pub fn dying_with_this_process(mut self) -> LocalProcesses {
        self.die_with_this_process = true;
        self
    }

    pub fn sandbox(&self) -> &Sandbox {
        &self.sandbox
    }

    /// Ends every runner process group an earlier run of the server left behind (found
    /// by the pid files under the runners directory), if its working directory is
    /// inside `within`, and whatever is left in those runners' cgroups. Returns how many
    /// were ended.
    pub fn reap_leftovers(&self, within: &Path) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return 0 };
        let cgroups = self.sandbox.cgroups();
        entries
            .flatten()
            .filter(|e| {
                let ended = crate::group::end_leftover(&e.path().join("pid"), within);
                let name = group_name(&e.file_name().to_string_lossy());
                let in_cgroup = cgroups.is_some_and(|c| c.end_leftover(&name) > 0);
                ended || in_cgroup
            })
            .count()
    }

    fn log_path(&self, id: RunnerId) -> PathBuf {
        self.dir.join(id.to_string()).join("runner.log")
    }
}

impl RunnerBackend for LocalProcesses {
    fn launch(&self, launch: RunnerLaunch, events: mpsc::UnboundedSender<Event>) -> std::io::Result<RunnerHandle> {
        let runner_dir = self.dir.join(launch.id.to_string());
        std::fs::create_dir_all(&runner_dir)?;
        if let Some(cache) = &launch.confinement.cache {
            self.sandbox.prepare_dir(cache, launch.confinement.uid)?;
        }
        let log = Arc::new(Mutex::new(LogFile::open(self.log_path(launch.id), self.log_limit)?));
        let port = free_port()?;
        let loopback = SocketAddr::from(([127, 0, 0, 1], port));
        let addr = if self.sandbox.is_on() { Endpoint::isolated(loopback) } else { Endpoint::host(loopback) };
        let mut wrapped = self.sandbox.wrap(&launch.command, &launch.confinement)?;
        let group = self.sandbox.group(&group_name(&launch.id.to_string()), &launch.limits)?;
        let mut command = self.sandbox.command(&wrapped, &launch.confinement.code, group.as_deref());
        if self.die_with_this_process {
            crate::sandbox::die_with_this_process(&mut command);
        }
        let child = command
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .env("PORT", port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match child {
            Ok(child) => child,
            Err(e) => {
                if let Some(group) = group {
                    group.remove_soon(Duration::from_secs(1));
                }
                return Err(e);
            }
        };
        // The child has its copies; the parent's must go, so that reads see the end.
        wrapped.keep.clear();
        let pgid = child.id().unwrap_or(0);
        // In a sandbox: once bwrap has said which process is the sandbox's first, its
        // network namespace is known and gets its way out; then the command starts.
        let sandbox_pid = match (wrapped.info.take(), wrapped.block.take()) {
            (Some(info), Some(block)) => {
                let (sandbox, addr, group) = (self.sandbox.clone(), addr.clone(), group.clone());
                Some(tokio::spawn(async move {
                    let started = sandbox.start(pgid, info, block, group).await;
                    if let Some(pid) = started.first
                        && !addr.enter(pid)
                    {
                        tracing::warn!(pid, "a runner's network namespace could not be opened");
                    }
                    started
                }))
            }
            _ => None,
        };
        std::fs::write(runner_dir.join("pid"), pgid.to_string())?;
        // The tap is registered before any line is read, and only once nothing can
        // fail any more, so that the watch task is always there to remove it.
        let (tap, _) = broadcast::channel(TAP_CAPACITY);
        self.taps.lock().unwrap_or_else(|e| e.into_inner()).insert(launch.id, tap.clone());
        if let Some(stdout) = child.stdout.take() {
            tokio::spawn(pump(stdout, "stdout", log.clone(), tap.clone()));
        }
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(pump(stderr, "stderr", log.clone(), tap));
        }
        // What a command run in it gets: the runner's own environment.
        let mut env = launch.env.clone();
        env.push(("PORT".to_owned(), port.to_string()));
        if self.sandbox.is_on() {
            let added = crate::sandbox::sandbox_env(&launch.confinement);
            env.extend(added.into_iter().map(|(k, v)| (k.to_owned(), v.to_owned())));
        }
        let exec = ExecTarget {
            first: None,
            uid: launch.confinement.uid,
            code: launch.confinement.code.clone(),
            env,
            group: group.clone(),
        };
        // Unsandboxed, it can be reached at once; in a sandbox, once that has started.
        let exec = match self.sandbox.is_on() {
            true => Some(exec),
            false => {
                self.execs.lock().unwrap_or_else(|e| e.into_inner()).insert(launch.id, Arc::new(exec));
                None
            }
        };
        let (handle, order_rx) = RunnerHandle::new(launch.id, addr.clone());
        let watch = Watch {
            launch,
            addr,
            pgid,
            pid_file: runner_dir.join("pid"),
            log,
            events,
            orders: order_rx,
            taps: self.taps.clone(),
            execs: self.execs.clone(),
            exec,
            sandbox_pid,
            first: None,
            network: None,
            group,
        };
        tokio::spawn(watch.run(child));
        Ok(handle)
    }

    fn read_log(&self, id: RunnerId, offset: u64) -> std::io::Result<(String, u64)> {
        read_log_file(&self.log_path(id), offset)
    }

    fn subscribe_output(&self, id: RunnerId) -> Option<broadcast::Receiver<Arc<OutputLine>>> {
        self.taps.lock().unwrap_or_else(|e| e.into_inner()).get(&id).map(broadcast::Sender::subscribe)
    }

    fn exec(&self, id: RunnerId, command: &[String], tty: Option<TermSize>) -> std::io::Result<ExecSession> {
        let target = self.execs.lock().unwrap_or_else(|e| e.into_inner()).get(&id).cloned();
        let Some(target) = target else {
            return Err(std::io::Error::new(std::io::ErrorKind::NotFound, format!("runner {id} is not running here")));
        };
        crate::exec::start(&self.sandbox, &target, command, tty)
    }
}

/// A log's text from byte `offset` on (at most 256 KiB of it), and the offset to read
/// from next.
pub(crate) fn read_log_file(path: &Path, offset: u64) -> std::io::Result<(String, u64)> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    // A rotated log is shorter than the offset the reader had; start over.
    let offset = if offset > len { 0 } else { offset };
    file.seek(SeekFrom::Start(offset))?;
    let mut buf = Vec::new();
    file.take(256 * 1024).read_to_end(&mut buf)?;
    Ok((String::from_utf8_lossy(&buf).into_owned(), offset + buf.len() as u64))
}

/// Picks a free loopback port for a runner by binding port 0 and letting it go.
fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port())
}

/// The task that owns one runner's process.
struct Watch {
    launch: RunnerLaunch,
    addr: Endpoint,
    pgid: u32,
    pid_file: PathBuf,
    log: Arc<Mutex<LogFile>>,
    events: mpsc::UnboundedSender<Event>,
    orders: mpsc::UnboundedReceiver<Order>,
    /// Where this runner's tap is registered; removed when the runner has ended.
    taps: Taps,
    /// Where it is registered for commands to be run in (once its sandbox has started,
    /// from `exec`); removed when it ends.
    execs: ExecTargets,
    exec: Option<ExecTarget>,
    /// In a sandbox: the pid of its first process (bwrap's reaper in the sandbox's pid
    /// namespace), once bwrap has told it.
    sandbox_pid: Option<tokio::task::JoinHandle<Started>>,
    first: Option<u32>,
    /// slirp4netns, the sandbox's way out, while the runner lives.
    network: Option<crate::sandbox::Network>,
    /// Its cgroup, where the server has cgroups.
    group: Option<Arc<Group>>,
}

/// The cgroup of runner `id`.
fn group_name(id: &str) -> String {
    format!("hangar-runner-{id}")
}

/// A runner in setup is checked soon after it starts, then less and less often up to
/// this interval: a quick app is found set up within milliseconds (cold starts stay
/// short), and a slow one is not flooded with checks.
const SETUP_PROBE_INTERVAL: Duration = Duration::from_millis(100);
const FIRST_SETUP_PROBE: Duration = Duration::from_millis(2);

/// How often a runner's limits are checked: its cgroup's counters read, or, without
/// one, its memory measured.
const LIMITS_CHECK_INTERVAL: Duration = Duration::from_millis(250);

const MIB: u64 = 1024 * 1024;

impl Watch {
    async fn run(mut self, mut child: tokio::process::Child) {
        let id = self.launch.id;
        let mut phase = Phase::Setup;
        let setup_deadline = Instant::now() + self.launch.startup_timeout;
        let mut setup_interval = FIRST_SETUP_PROBE;
        let mut next_probe = Instant::now() + setup_interval;
        let mut failures = 0u32;
        let mut serving_since = Instant::now();
        // Set when the runner is on its way out: by order, or because it failed.
        let mut ending: Option<(bool, String)> = None;
        let mut kill_at: Option<Instant> = None;
        let far = Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
        let mut next_limits_check = Instant::now() + LIMITS_CHECK_INTERVAL;
        let checks_limits = self.group.is_some() || self.launch.limits.memory.is_some();

        let mut pending = self.sandbox_pid.take();
        let status = loop {
            tokio::select! {
                status = child.wait() => break status,
                started = async { pending.as_mut().expect("guarded").await }, if pending.is_some() => {
                    pending = None;
                    if let Some(reason) = self.started(started.unwrap_or_default())
                        && ending.is_none()
                    {
                        ending = Some((false, reason));
                    }
                }
                order = self.orders.recv(), if ending.as_ref().is_none_or(|(requested, _)| !requested) => {
                    match order {
                        Some(Order::Stop { grace }) => {
                            self.terminate(&mut pending).await;
                            kill_at = Some(Instant::now() + grace);
                            ending = Some((true, format!("stopped (SIGTERM, {grace:?} grace)")));
                        }
                        Some(Order::Kill) => {
                            self.kill_all();
                            ending = Some((true, "killed".to_owned()));
                        }
                        // Every handle is gone: nobody can stop it any more, so stop it now.
                        None => {
                            self.kill_all();
                            ending = Some((true, "killed (no owner left)".to_owned()));
                        }
                    }
                }
                () = tokio::time::sleep_until(kill_at.unwrap_or(far)), if kill_at.is_some() => {
                    self.kill_all();
                    kill_at = None;
                    if let Some((_, reason)) = &mut ending {
                        reason.push_str("; killed after the grace period");
                    }
                }
                () = tokio::time::sleep_until(next_limits_check), if ending.is_none() && checks_limits => {
                    next_limits_check = Instant::now() + LIMITS_CHECK_INTERVAL;
                    if let Some(reason) = self.over_limits(child.id()) {
                        self.kill_all();
                        ending = Some((false, reason));
                    }
                }
                () = tokio::time::sleep_until(next_probe), if ending.is_none() => {
                    let healthy = self.probe().await;
                    match phase {
                        Phase::Setup if healthy => {
                            phase = Phase::Serving;
                            serving_since = Instant::now();
                            let _ = self.events.send(Event::Healthy { id });
                            next_probe = Instant::now() + self.launch.health.interval;
                        }
                        Phase::Setup if Instant::now() >= setup_deadline => {
                            self.kill_all();
                            ending = Some((false, format!(
                                "health check of {} did not pass within the startup timeout of {:?}",
                                self.launch.health_path, self.launch.startup_timeout
                            )));
                        }
                        Phase::Setup => {
                            setup_interval = (setup_interval * 3 / 2).min(SETUP_PROBE_INTERVAL);
                            next_probe = Instant::now() + setup_interval;
                        }
                        Phase::Serving if healthy => {
                            failures = 0;
                            next_probe = Instant::now() + self.launch.health.interval;
                        }
                        Phase::Serving if serving_since.elapsed() < self.launch.health.start_period => {
                            next_probe = Instant::now() + self.launch.health.interval;
                        }
                        Phase::Serving => {
                            failures += 1;
                            if failures >= self.launch.health.failure_threshold {
                                let reason = format!("{failures} health checks in a row failed");
                                let _ = self.events.send(Event::Unhealthy { id, reason: reason.clone() });
                                self.kill_all();
                                ending = Some((false, reason));
                            } else {
                                next_probe = Instant::now() + self.launch.health.interval;
                            }
                        }
                    }
                }
            }
        };
        // Whatever the leader did, nothing of its group or its sandbox may outlive it.
        if let Some(started) = pending.take()
            && let Ok(Ok(started)) = tokio::time::timeout(Duration::from_secs(1), started).await
            && let Some(reason) = self.started(started)
            && ending.is_none()
        {
            ending = Some((false, reason));
        }
        self.kill_all();
        // Dropping it ends slirp4netns (it is killed, and its exit pipe closes).
        self.network = None;
        let _ = std::fs::remove_file(&self.pid_file);
        // A runner the kernel's OOM killer ended before a check saw it still gets the reason.
        let ending = ending.or_else(|| self.over_limits(None).map(|reason| (false, reason)));
        // The sandbox's last processes end on their own soon after its first; their group
        // goes once they have, without holding up whoever waits for the runner to end.
        if let Some(group) = self.group.take() {
            group.remove_soon(Duration::from_secs(5));
        }
        let (requested, reason) = match (ending, status) {
            (Some(ending), _) => ending,
            (None, Ok(status)) => (false, format!("exited with {status}{}", self.last_output())),
            (None, Err(e)) => (false, format!("could not be waited for: {e}")),
        };
        // Removed before Exited is reported, so that whoever sees Exited finds no tap.
        // Receivers already subscribed keep getting the lines still in the pipes; they
        // see the tap closed once both pumps have drained them.
        self.taps.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        self.execs.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        let _ = self.events.send(Event::Exited { id, phase, requested, reason });
    }

    /// SIGTERM to the runner: to its process group, or, in a sandbox, to the processes
    /// its first one looks after (the app's, not bwrap's, which would end at once).
    async fn terminate(&mut self, pending: &mut Option<tokio::task::JoinHandle<Started>>) {
        if let Some(started) = pending.take() {
            // Stopped on purpose: why its start failed, if it did, matters no more.
            let _ = self.started(started.await.unwrap_or_default());
        }
        match self.first {
            Some(first) => crate::group::signal_children(first, nix::sys::signal::Signal::SIGTERM),
            None => signal_group(self.pgid, nix::sys::signal::Signal::SIGTERM),
        }
    }

    /// Keeps what its sandbox's start found; returns why the runner cannot run, if so.
    fn started(&mut self, started: Started) -> Option<String> {
        self.first = started.first;
        self.network = started.network;
        if let Some(mut exec) = self.exec.take()
            && started.error.is_none()
            && started.first.is_some()
        {
            exec.first = started.first;
            self.execs.lock().unwrap_or_else(|e| e.into_inner()).insert(self.launch.id, Arc::new(exec));
        }
        started.error.map(|e| format!("its sandbox could not start: {e}"))
    }

    /// SIGKILL to every process of the runner, in and out of its sandbox and its cgroup.
    fn kill_all(&self) {
        kill_group(self.pgid);
        if let Some(first) = self.first {
            crate::group::kill_sandbox(first, self.pgid);
        }
        if let Some(group) = &self.group {
            group.kill_all();
        }
    }

    /// Why the runner must end because of its limits, if it must: the kernel killed one
    /// of its processes for memory, or refused it a fork at its limit of processes, or
    /// (without a cgroup) its processes, measured from `pid` down, use too much memory.
    fn over_limits(&self, pid: Option<u32>) -> Option<String> {
        let limits = &self.launch.limits;
        match &self.group {
            Some(group) => {
                if group.oom_kills() > 0 {
                    let limit = limits.memory.unwrap_or(0) / MIB;
                    return Some(format!(
                        "over its machine type's limit of {limit} MiB of memory (the kernel's OOM killer ended a process)"
                    ));
                }
                if group.forks_refused() > 0 {
                    let limit = limits.pids.map_or_else(|| "its".to_owned(), |n| n.to_string());
                    return Some(format!("reached the limit of {limit} processes and threads (a fork bomb?)"));
                }
                if group.limits_memory() {
                    return None;
                }
            }
            None if pid.is_none() => return None,
            None => {}
        }
        let limit = limits.memory?;
        let used = crate::group::resident_memory(pid?);
        (used > limit)
            .then(|| format!("used {} MiB of memory, over its machine type's limit of {} MiB", used / MIB, limit / MIB))
    }

    async fn probe(&self) -> bool {
        probe(&self.addr, &self.launch.health_path, self.launch.health.probe_timeout).await
    }

    /// The runner's last lines of output, to explain why it ended.
    fn last_output(&self) -> String {
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if log.recent.is_empty() {
            String::new()
        } else {
            format!("; last output: {}", log.recent.iter().cloned().collect::<Vec<_>>().join(" | "))
        }
    }
}

/// Whether one health check of the runner at `addr` answers 200 within `timeout`.
pub(crate) async fn probe(addr: &Endpoint, path: &str, timeout: Duration) -> bool {
    matches!(
        tokio::time::timeout(timeout, check_health(addr, path)).await,
        Ok(Ok(status)) if status == hyper::StatusCode::OK
    )
}

/// One health check, over a connection of its own.
async fn check_health(
    addr: &Endpoint,
    path: &str,
) -> Result<hyper::StatusCode, Box<dyn std::error::Error + Send + Sync>> {
    let stream = addr.connect().await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let connection = tokio::spawn(connection);
    let request =
        hyper::Request::get(path).header(hyper::header::HOST, addr.addr.to_string()).body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await;
    connection.abort();
    Ok(response?.status())
}

/// Copies a stream of the runner's output into its log, a line at a time, and hands
/// each line to the runner's tap when someone is listening.
async fn pump(
    stream: impl AsyncRead + Unpin,
    name: &'static str,
    log: Arc<Mutex<LogFile>>,
    tap: broadcast::Sender<Arc<OutputLine>>,
) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let at = time::OffsetDateTime::now_utc();
        log.lock().unwrap_or_else(|e| e.into_inner()).append(at, name, &line);
        // Nobody listening is the common case: then a line costs nothing more.
        if tap.receiver_count() > 0 {
            let _ = tap.send(Arc::new(OutputLine { at, stream: name, line }));
        }
    }
}

/// A runner's log: one timestamped line per line of output, rotated at a size limit
/// so that a chatty runner cannot fill the disk.
pub(crate) struct LogFile {
    path: PathBuf,
    file: std::fs::File,
    written: u64,
    limit: u64,
    /// The last few lines, for error messages.
    pub(crate) recent: VecDeque<String>,
}

impl LogFile {
    pub(crate) fn open(path: PathBuf, limit: u64) -> std::io::Result<LogFile> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
        let written = file.metadata()?.len();
        Ok(LogFile { path, file, written, limit, recent: VecDeque::new() })
    }

    pub(crate) fn append(&mut self, at: time::OffsetDateTime, stream: &str, line: &str) {
        use std::io::Write;
        let now = at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
        let entry = format!("{now} {stream} {line}\n");
        if self.written + entry.len() as u64 > self.limit {
            let _ = std::fs::rename(&self.path, self.path.with_extension("log.1"));
            if let Ok(file) = std::fs::OpenOptions::new().create(true).append(true).open(&self.path) {
                self.file = file;
                self.written = 0;
            }
        }
        if self.file.write_all(entry.as_bytes()).is_ok() {
            self.written += entry.len() as u64;
        }
        if self.recent.len() == 3 {
            self.recent.pop_front();
        }
        self.recent.push_back(line.chars().take(300).collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_are_timestamped_and_rotated_at_their_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("runner.log");
        let mut log = LogFile::open(path.clone(), 200).unwrap();
        for i in 0..20 {
            log.append(time::OffsetDateTime::now_utc(), "stdout", &format!("line {i}"));
        }
        let current = std::fs::read_to_string(&path).unwrap();
        let older = std::fs::read_to_string(path.with_extension("log.1")).unwrap();
        assert!(current.len() <= 200 && older.len() <= 200, "{} and {} bytes", current.len(), older.len());
        assert!(current.ends_with(" stdout line 19\n"), "{current}");
        let first = current.lines().next().unwrap();
        assert!(
            time::OffsetDateTime::parse(
                first.split(' ').next().unwrap(),
                &time::format_description::well_known::Rfc3339
            )
            .is_ok()
        );
        assert_eq!(log.recent.len(), 3);
    }

    #[tokio::test]
    async fn a_tap_hands_out_each_line_with_its_stream_until_the_runner_ends() {
        let dir = tempfile::tempdir().unwrap();
        let backend = LocalProcesses::new(dir.path().join("runners"), 1 << 20, Arc::new(Sandbox::none()));
        let id = RunnerId::new();
        // The runner waits for a file before it speaks, so the test can subscribe first.
        let go = dir.path().join("go");
        let script =
            format!("while [ ! -e '{}' ]; do sleep 0.01; done; echo one; echo two >&2; echo three", go.display());
        let launch = shell_runner(id, dir.path(), script);
        let (events, mut events_rx) = mpsc::unbounded_channel();
        // Held to the end: a runner whose every handle is gone is killed.
        let _handle = backend.launch(launch, events).unwrap();
        assert!(backend.subscribe_output(RunnerId::new()).is_none());
        let mut tap = backend.subscribe_output(id).unwrap();
        std::fs::write(&go, "").unwrap();

        let mut lines = Vec::new();
        loop {
            match tokio::time::timeout(Duration::from_secs(30), tap.recv()).await.expect("the tap was not closed") {
                Ok(line) => lines.push(line),
                Err(broadcast::error::RecvError::Closed) => break,
                Err(e) => panic!("{e}"),
            }
        }
        // Each stream keeps its order; the two streams may interleave either way.
        let of =
            |stream: &str| lines.iter().filter(|l| l.stream == stream).map(|l| l.line.as_str()).collect::<Vec<_>>();
        assert_eq!(of("stdout"), ["one", "three"]);
        assert_eq!(of("stderr"), ["two"]);
        assert_eq!(lines.len(), 3, "{lines:?}");
        // A line carries the timestamp its log entry has.
        let log = std::fs::read_to_string(backend.log_path(id)).unwrap();
        let at = lines[0].at.format(&time::format_description::well_known::Rfc3339).unwrap();
        let entry = format!("{at} {} {}", lines[0].stream, lines[0].line);
        assert!(log.lines().any(|l| l == entry), "{entry:?} not in {log:?}");

        let exited = tokio::time::timeout(Duration::from_secs(30), events_rx.recv()).await.unwrap().unwrap();
        assert!(matches!(exited, Event::Exited { requested: false, .. }), "{exited:?}");
        assert!(backend.subscribe_output(id).is_none());
    }

    /// A runner that runs `script` with `/bin/sh` in `dir`.
    fn shell_runner(id: RunnerId, dir: &Path, script: String) -> RunnerLaunch {
        RunnerLaunch {
            id,
            machine_type: "cpu".to_owned(),
            gpu_count: 0,
            command: vec!["/bin/sh".to_owned(), "-c".to_owned(), script],
            confinement: Confinement {
                uid: 0,
                code: dir.to_owned(),
                code_writable: false,
                cache: None,
                home_cache: None,
                devices: Vec::new(),
            },
            env: vec![("PATH".to_owned(), std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".to_owned()))],
            health_path: "/health".to_owned(),
            startup_timeout: Duration::from_secs(60),
            health: HealthPolicy {
                interval: Duration::from_secs(1),
                failure_threshold: 3,
                probe_timeout: Duration::from_secs(1),
                start_period: Duration::ZERO,
            },
            limits: Limits::default(),
        }
    }

    #[tokio::test]
    async fn a_runner_whose_processes_use_more_than_its_memory_limit_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let backend = LocalProcesses::new(dir.path().join("runners"), 1 << 20, Arc::new(Sandbox::none()));
        let id = RunnerId::new();
        // The memory is held by a child of the runner's first process, and it keeps
        // growing, so the limit must count descendants to stop it.
        let script = "python3 -c 'import time\nheld = []\nwhile True:\n    held.append(b\"x\" * (8 << 20))\n    \
                      time.sleep(0.01)'; echo done"
            .to_owned();
        let limits = Limits { memory: Some(64 * MIB), ..Limits::default() };
        let launch = RunnerLaunch { limits, ..shell_runner(id, dir.path(), script) };
        let (events, mut events_rx) = mpsc::unbounded_channel();
        let _handle = backend.launch(launch, events).unwrap();
        let exited = tokio::time::timeout(Duration::from_secs(60), events_rx.recv()).await.unwrap().unwrap();
        let Event::Exited { requested: false, reason, .. } = exited else { panic!("{exited:?}") };
        assert!(reason.contains("over its machine type's limit of 64 MiB"), "{reason}");
        let log = std::fs::read_to_string(backend.log_path(id)).unwrap();
        assert!(!log.contains("done"), "the whole group was killed, not just the child: {log}");
    }
}
