//! What hangar says to Slurm and reads back from it, through its commands (`sbatch`,
//! `squeue`, `scancel`): the arguments that ask for a runner's resources, and the state
//! of the jobs hangar submitted. The backend that drives runners as jobs builds on this.
//!
//! The commands rather than slurmrestd: they come with every Slurm install (the
//! `slurm-client` package), authenticate through the cluster's munge like any user's
//! command, and their text output is stable across versions, where slurmrestd needs a
//! daemon, tokens, and an OpenAPI version per Slurm release.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use model::ids::RunnerId;
use model::records::OutputLine;
use netns::Endpoint;
use tokio::sync::{Notify, broadcast, mpsc, watch};
use tokio::time::Instant;

use crate::remote::{AgentReport, Agents, TOKEN_VAR, URL_VAR, WireLine, agent_spec, pack_code};
use crate::runner::{
    Event, LogFile, Order, Phase, RunnerBackend, RunnerHandle, RunnerLaunch, TAP_CAPACITY, Taps, probe, read_log_file,
};

/// The prefix of the name of every job hangar submits; the rest is the runner's id.
pub const JOB_PREFIX: &str = "hangar-";

/// Where and how jobs are submitted: the `[slurm]` section of the server's config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlurmSettings {
    pub partition: String,
    pub account: Option<String>,
    pub qos: Option<String>,
    /// More `sbatch` arguments, given as they are.
    pub extra_args: Vec<String>,
}

/// What one runner asks of the cluster.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobRequest {
    /// The runner's id, in the job's name.
    pub runner: String,
    pub gpus: u32,
    /// Memory for the whole job, in MiB.
    pub memory_mb: Option<u64>,
    /// CPUs' worth of time; Slurm gives whole CPUs, so this is rounded up.
    pub cpus: Option<f64>,
}

impl JobRequest {
    /// The `sbatch` arguments for this runner under `settings` (the script comes after).
    pub fn sbatch_args(&self, settings: &SlurmSettings) -> Vec<String> {
        let mut args = vec![
            "--parsable".to_owned(),
            format!("--job-name={JOB_PREFIX}{}", self.runner),
            format!("--partition={}", settings.partition),
            // A lost runner is replaced by hangar, not rerun by Slurm.
            "--no-requeue".to_owned(),
            "--nodes=1".to_owned(),
            "--ntasks=1".to_owned(),
        ];
        if let Some(account) = &settings.account {
            args.push(format!("--account={account}"));
        }
        if let Some(qos) = &settings.qos {
            args.push(format!("--qos={qos}"));
        }
        if self.gpus > 0 {
            args.push(format!("--gres=gpu:{}", self.gpus));
        }
        if let Some(mb) = self.memory_mb {
            args.push(format!("--mem={mb}M"));
        }
        if let Some(cpus) = self.cpus {
            args.push(format!("--cpus-per-task={}", (cpus.ceil() as u64).max(1)));
        }
        args.extend(settings.extra_args.iter().cloned());
        args
    }
}

/// Where a job is, as `squeue` tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    /// Waiting in the cluster's queue, with Slurm's reason (`Resources`, `Priority`, …).
    Pending { reason: String },
    /// Started (or starting) on `node`.
    Running { node: String },
    /// Done, failed, cancelled, preempted, or its node failed: the runner is lost.
    Ended { state: String, reason: String },
}

/// The jobs of hangar's runners in the output of
/// `squeue -h -o '%i|%j|%T|%r|%N'`, by runner id. Other users' jobs, and lines that do
/// not parse, are left out.
pub fn parse_squeue(text: &str) -> BTreeMap<String, (String, JobState)> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.trim().splitn(5, '|');
            let (job, name, state, reason, node) =
                (fields.next()?, fields.next()?, fields.next()?, fields.next()?, fields.next().unwrap_or(""));
            let runner = name.strip_prefix(JOB_PREFIX)?;
            if job.is_empty() || runner.is_empty() {
                return None;
            }
            let reason = if reason == "None" { String::new() } else { reason.to_owned() };
            let state = match state {
                "PENDING" | "REQUEUED" | "REQUEUE_HOLD" | "RESV_DEL_HOLD" | "SUSPENDED" => JobState::Pending { reason },
                // A completing job's processes are still being ended: its end is the
                // state it has next.
                "RUNNING" | "CONFIGURING" | "COMPLETING" => JobState::Running { node: node.to_owned() },
                other => JobState::Ended { state: other.to_owned(), reason },
            };
            Some((runner.to_owned(), (job.to_owned(), state)))
        })
        .collect()
}

/// Where the cluster is and how its jobs reach the server: the rest of `[slurm]`.
#[derive(Debug, Clone)]
pub struct SlurmConfig {
    pub settings: SlurmSettings,
    /// The URL the nodes reach the server's API at.
    pub server_url: String,
    /// The `hangar` binary on the nodes, which runs the agent.
    pub launcher: PathBuf,
    /// Where the agent keeps code and caches on a node.
    pub node_dir: PathBuf,
    /// The comment on every job this server submits, which tells its jobs from other
    /// servers' sharing the cluster (`hangar:<server id>`).
    pub owner: String,
    /// How runners are confined on their node: in the bwrap sandbox with these host
    /// paths readable, as the server's own would be, or (`None`) not at all.
    pub sandbox: Option<Vec<PathBuf>>,
}

/// The jobs `squeue` listed last, by runner id.
#[derive(Debug, Default)]
struct Listed {
    jobs: BTreeMap<String, (String, JobState)>,
    /// Whether this listing came from a `squeue` that worked.
    fresh: bool,
}

/// How often the jobs of live runners are looked at.
const POLL_EVERY: Duration = Duration::from_millis(250);

/// How long a Slurm command may take before the cluster counts as unreachable.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a submitted job may be missing from `squeue` before it counts as gone
/// (a job is listed as soon as `sbatch` has returned, so this is only a safeguard).
const UNLISTED_GRACE: Duration = Duration::from_secs(30);

/// Runners as Slurm jobs, one job per runner: the cluster places them with their GPUs,
/// and the agent in each job (`hangar agent`) runs the runner on its node.
pub struct SlurmJobs {
    inner: Arc<Inner>,
}

struct Inner {
    config: SlurmConfig,
    /// `<dir>/<runner id>/runner.log` holds each runner's output, as its agent sends it.
    dir: PathBuf,
    log_limit: u64,
    agents: Arc<Agents>,
    taps: Taps,
    listed: watch::Receiver<Arc<Listed>>,
    /// Runners being watched; `squeue` runs only while there are some.
    watching: AtomicUsize,
    wake_poller: Notify,
    /// One revision's code is packed at a time, and once.
    packing: tokio::sync::Mutex<()>,
}

impl SlurmJobs {
    /// Checks that the cluster can be used (the commands are there, it answers, the
    /// partition exists) and starts watching its queue. The error says what is wrong.
    pub async fn connect(config: SlurmConfig, dir: PathBuf, log_limit: u64) -> Result<SlurmJobs, String> {
        if config.settings.partition.is_empty() {
            return Err("the Slurm backend needs a partition ([slurm] partition, or --slurm-partition)".to_owned());
        }
        command_output("sbatch", &["--version"]).await?;
        let partitions = command_output("sinfo", &["-h", "-o", "%P"]).await?;
        let known: Vec<&str> = partitions.lines().map(|p| p.trim().trim_end_matches('*')).collect();
        if !known.contains(&config.settings.partition.as_str()) {
            return Err(format!(
                "partition {:?} is not in the Slurm cluster (it has: {})",
                config.settings.partition,
                known.join(", ")
            ));
        }
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let (publish, listed) = watch::channel(Arc::new(Listed::default()));
        let inner = Arc::new(Inner {
            config,
            dir,
            log_limit,
            agents: Arc::default(),
            taps: Taps::default(),
            listed,
            watching: AtomicUsize::new(0),
            wake_poller: Notify::new(),
            packing: tokio::sync::Mutex::new(()),
        });
        tokio::spawn(poll(Arc::downgrade(&inner), publish));
        Ok(SlurmJobs { inner })
    }

    /// The agents of this backend's runners, for the server's API to answer.
    pub fn agents(&self) -> Arc<Agents> {
        self.inner.agents.clone()
    }

    /// Cancels every job an earlier run of this server submitted (its comment is this
    /// server's): their runners are not this run's, and new ones replace them. Returns
    /// how many were cancelled.
    pub async fn cancel_leftovers(&self) -> Result<usize, String> {
        let text = command_output("squeue", &["--me", "-h", "-o", "%i|%j|%k"]).await?;
        let owner = &self.inner.config.owner;
        let leftovers: Vec<&str> = text
            .lines()
            .filter_map(|line| {
                let mut fields = line.trim().splitn(3, '|');
                let (job, name, comment) = (fields.next()?, fields.next()?, fields.next()?);
                (name.starts_with(JOB_PREFIX) && comment == owner).then_some(job)
            })
            .collect();
        if !leftovers.is_empty() {
            let mut args = vec!["--signal=KILL", "--full"];
            args.extend(&leftovers);
            let _ = command_output("scancel", &args).await;
            command_output("scancel", &leftovers).await?;
        }
        Ok(leftovers.len())
    }
}

/// Runs a Slurm command and returns its standard output; the error names the command
/// and says what it printed, or that it is not installed.
async fn command_output(program: &str, args: &[&str]) -> Result<String, String> {
    command_with_input(program, args, None).await
}

async fn command_with_input(program: &str, args: &[&str], input: Option<&str>) -> Result<String, String> {
    use tokio::io::AsyncWriteExt;
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            format!("the Slurm commands are not installed here: {program} was not found (Debian: slurm-client)")
        }
        _ => format!("cannot run {program}: {e}"),
    })?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(input.as_bytes()).await.map_err(|e| format!("cannot write to {program}: {e}"))?;
    }
    let output = tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| format!("{program} did not answer within {COMMAND_TIMEOUT:?}: the cluster is unreachable"))?
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let said = stderr.trim().lines().last().unwrap_or("").trim();
        return Err(if said.is_empty() {
            format!("{program} failed ({})", output.status)
        } else {
            format!("{program} failed: {said}")
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Lists the jobs of hangar's runners every [`POLL_EVERY`] while any is watched, until
/// the backend is gone.
async fn poll(inner: Weak<Inner>, publish: watch::Sender<Arc<Listed>>) {
    loop {
        let Some(strong) = inner.upgrade() else { return };
        if strong.watching.load(Ordering::SeqCst) == 0 {
            // Looked at again now and then, so that a backend that is gone ends this.
            let _ = tokio::time::timeout(Duration::from_secs(5), strong.wake_poller.notified()).await;
            continue;
        }
        drop(strong);
        let listed = match command_output("squeue", &["--me", "-h", "-t", "all", "-o", "%i|%j|%T|%r|%N"]).await {
            Ok(text) => Listed { jobs: parse_squeue(&text), fresh: true },
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the cluster's jobs");
                Listed { jobs: BTreeMap::new(), fresh: false }
            }
        };
        let _ = publish.send(Arc::new(listed));
        tokio::time::sleep(POLL_EVERY).await;
    }
}

impl Inner {
    /// The code of `launch` packed for the nodes, and its digest.
    async fn pack(&self, launch: &RunnerLaunch) -> Result<(PathBuf, String), String> {
        let code = launch.confinement.code.clone();
        let archive = code.with_file_name("code.tar.gz");
        let _packing = self.packing.lock().await;
        let at = archive.clone();
        let digest = tokio::task::spawn_blocking(move || pack_code(&code, &at))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("its code could not be packed for the cluster: {e}"))?;
        Ok((archive, digest))
    }

    /// Submits the runner's job, whose agent holds `token`. Returns the job's id.
    async fn submit(&self, launch: &RunnerLaunch, token: &str) -> Result<String, String> {
        let request = JobRequest {
            runner: launch.id.to_string(),
            gpus: launch.gpu_count,
            memory_mb: launch.limits.memory.map(|bytes| bytes.div_ceil(1024 * 1024)),
            cpus: launch.limits.cpus,
        };
        let mut args = request.sbatch_args(&self.config.settings);
        args.extend([
            format!("--comment={}", self.config.owner),
            // Nothing of the server's environment goes to the node; the agent fetches
            // the runner's, secrets and all, with its token.
            "--export=NONE".to_owned(),
            // The agent sends the runner's output to the server; a node keeps nothing.
            "--output=/dev/null".to_owned(),
            "--chdir=/".to_owned(),
        ]);
        let script = format!(
            "#!/bin/sh\nexport PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\nexport {URL_VAR}={}\n\
             export {TOKEN_VAR}={}\nexec {} agent --node-dir {}\n",
            shell_quote(&self.config.server_url),
            shell_quote(token),
            shell_quote(&self.config.launcher.to_string_lossy()),
            shell_quote(&self.config.node_dir.to_string_lossy()),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = command_with_input("sbatch", &args, Some(&script))
            .await
            .map_err(|e| format!("the cluster did not take its job: {e}"))?;
        // `--parsable` prints `<id>` or `<id>;<cluster>`.
        let job = out.trim().split(';').next().unwrap_or("").to_owned();
        if job.is_empty() || !job.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("sbatch printed {:?}, not a job id", out.trim()));
        }
        Ok(job)
    }
}

/// `text` quoted for a POSIX shell.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

impl RunnerBackend for SlurmJobs {
    fn exec(
        &self,
        id: RunnerId,
        command: &[String],
        tty: Option<model::records::TermSize>,
    ) -> std::io::Result<crate::ExecSession> {
        self.inner.agents.exec(id, command, tty).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, format!("runner {id} has no agent running"))
        })
    }

    fn launch(&self, launch: RunnerLaunch, events: mpsc::UnboundedSender<Event>) -> std::io::Result<RunnerHandle> {
        let runner_dir = self.inner.dir.join(launch.id.to_string());
        std::fs::create_dir_all(&runner_dir)?;
        let log = LogFile::open(runner_dir.join("runner.log"), self.inner.log_limit)?;
        let (tap, _) = broadcast::channel(TAP_CAPACITY);
        self.inner.taps.lock().unwrap_or_else(|e| e.into_inner()).insert(launch.id, tap.clone());
        // No address until the job has started and its agent has said where it is.
        let (handle, orders) = RunnerHandle::new(launch.id, Endpoint::host(SocketAddr::from(([0, 0, 0, 0], 0))));
        self.inner.watching.fetch_add(1, Ordering::SeqCst);
        self.inner.wake_poller.notify_one();
        let watch = JobWatch { inner: self.inner.clone(), launch, events, orders, log, tap };
        tokio::spawn(watch.run());
        Ok(handle)
    }

    fn read_log(&self, id: RunnerId, offset: u64) -> std::io::Result<(String, u64)> {
        read_log_file(&self.inner.dir.join(id.to_string()).join("runner.log"), offset)
    }

    fn subscribe_output(&self, id: RunnerId) -> Option<broadcast::Receiver<Arc<OutputLine>>> {
        self.inner.taps.lock().unwrap_or_else(|e| e.into_inner()).get(&id).map(broadcast::Sender::subscribe)
    }

    fn cluster(&self) -> Option<&'static str> {
        Some("slurm")
    }
}

/// The task that follows one runner's job from submission to its end.
struct JobWatch {
    inner: Arc<Inner>,
    launch: RunnerLaunch,
    events: mpsc::UnboundedSender<Event>,
    orders: mpsc::UnboundedReceiver<Order>,
    log: LogFile,
    tap: broadcast::Sender<Arc<OutputLine>>,
}

/// How a runner's job ended, for [`Event::Exited`].
struct Ending {
    phase: Phase,
    requested: bool,
    reason: String,
}

impl JobWatch {
    async fn run(mut self) {
        let id = self.launch.id;
        let ending = self.follow().await;
        self.inner.agents.remove(id);
        self.inner.taps.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        self.inner.watching.fetch_sub(1, Ordering::SeqCst);
        let _ = self.events.send(Event::Exited {
            id,
            phase: ending.phase,
            requested: ending.requested,
            reason: ending.reason,
        });
    }

    async fn follow(&mut self) -> Ending {
        let id = self.launch.id;
        let setup = |requested, reason| Ending { phase: Phase::Setup, requested, reason };
        let packed = tokio::select! {
            packed = self.inner.pack(&self.launch) => packed,
            _ = self.orders.recv() => return setup(true, "stopped before its job was submitted".to_owned()),
        };
        let (archive, digest) = match packed {
            Ok(packed) => packed,
            Err(reason) => return setup(false, reason),
        };
        let (reports_tx, mut reports) = mpsc::unbounded_channel();
        let token = self.inner.agents.register(
            agent_spec(&self.launch, digest, self.inner.config.sandbox.clone()),
            archive,
            reports_tx,
        );
        let job = match self.inner.submit(&self.launch, &token).await {
            Ok(job) => job,
            Err(reason) => return setup(false, reason),
        };
        tracing::info!(runner = %id, job, "runner submitted to Slurm");

        let far = Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
        let submitted = Instant::now();
        let mut listed = self.inner.listed.clone();
        let mut phase = Phase::Setup;
        let mut addr: Option<Endpoint> = None;
        let mut waiting_for: Option<String> = None;
        let mut seen = false;
        // Why the runner is on its way out: by order, or because it failed.
        let mut ending: Option<(bool, String)> = None;
        let mut agent_said: Option<String> = None;
        let mut kill_at: Option<Instant> = None;
        let mut setup_deadline = far;
        let mut next_probe = far;
        let mut setup_interval = Duration::from_millis(2);
        let mut failures = 0u32;
        let ended = loop {
            tokio::select! {
                changed = listed.changed() => {
                    if changed.is_err() {
                        break "the server stopped watching the cluster".to_owned();
                    }
                    let now = listed.borrow_and_update().clone();
                    if !now.fresh {
                        continue;
                    }
                    match now.jobs.get(&id.to_string()) {
                        Some((_, JobState::Pending { reason })) => {
                            seen = true;
                            let reason = if reason.is_empty() { "not started yet".to_owned() } else { reason.clone() };
                            if ending.is_none() && waiting_for.as_ref() != Some(&reason) {
                                waiting_for = Some(reason.clone());
                                let _ = self.events.send(Event::Waiting { id, reason });
                            }
                        }
                        Some((_, JobState::Running { .. })) => seen = true,
                        Some((_, JobState::Ended { state, reason })) => {
                            let reason = if reason.is_empty() { String::new() } else { format!(" ({reason})") };
                            break format!("its Slurm job {job} ended: {state}{reason}");
                        }
                        None if seen || submitted.elapsed() > UNLISTED_GRACE => {
                            break format!("its Slurm job {job} is no longer in the cluster's queue");
                        }
                        None => {}
                    }
                }
                report = reports.recv() => match report {
                    Some(AgentReport::Listening { addr: at, node, gpus }) if addr.is_none() => {
                        tracing::info!(runner = %id, job, %node, addr = %at, since_submitted = ?submitted.elapsed(), "runner's job started");
                        let endpoint = Endpoint::host(at);
                        addr = Some(endpoint.clone());
                        let _ = self.events.send(Event::Placed { id, addr: endpoint, node, gpus });
                        setup_deadline = Instant::now() + self.launch.startup_timeout;
                        next_probe = Instant::now() + setup_interval;
                    }
                    Some(AgentReport::Listening { .. }) => {}
                    Some(AgentReport::Output { lines }) => self.write(lines),
                    Some(AgentReport::Exited { reason, .. } | AgentReport::Failed { reason }) => {
                        agent_said = Some(reason);
                    }
                    None => {}
                },
                order = self.orders.recv(), if ending.as_ref().is_none_or(|(requested, _)| !requested) => {
                    match order {
                        Some(Order::Stop { grace }) if addr.is_some() => {
                            // The agent passes SIGTERM on to the app; the job is killed
                            // once the grace period is over.
                            let _ = command_output("scancel", &["--batch", "--signal=TERM", &job]).await;
                            kill_at = Some(Instant::now() + grace);
                            ending = Some((true, format!("stopped (SIGTERM, {grace:?} grace)")));
                        }
                        Some(Order::Stop { .. }) => {
                            cancel(&job).await;
                            ending = Some((true, "stopped before it started".to_owned()));
                        }
                        Some(Order::Kill) => {
                            cancel(&job).await;
                            ending = Some((true, "killed".to_owned()));
                        }
                        None => {
                            cancel(&job).await;
                            ending = Some((true, "killed (no owner left)".to_owned()));
                        }
                    }
                }
                () = tokio::time::sleep_until(kill_at.unwrap_or(far)), if kill_at.is_some() => {
                    kill_at = None;
                    cancel(&job).await;
                    if let Some((_, reason)) = &mut ending {
                        reason.push_str("; killed after the grace period");
                    }
                }
                () = tokio::time::sleep_until(next_probe), if ending.is_none() && addr.is_some() => {
                    let healthy = match &addr {
                        Some(addr) => probe(addr, &self.launch.health_path, self.launch.health.probe_timeout).await,
                        None => false,
                    };
                    next_probe = far;
                    match phase {
                        Phase::Setup if healthy => {
                            phase = Phase::Serving;
                            tracing::info!(runner = %id, job, since_submitted = ?submitted.elapsed(), "runner is healthy");
                            let _ = self.events.send(Event::Healthy { id });
                            next_probe = Instant::now() + self.launch.health.interval;
                        }
                        Phase::Setup if Instant::now() >= setup_deadline => {
                            cancel(&job).await;
                            ending = Some((false, format!(
                                "health check of {} did not pass within the startup timeout of {:?}",
                                self.launch.health_path, self.launch.startup_timeout
                            )));
                        }
                        Phase::Setup => {
                            setup_interval = (setup_interval * 3 / 2).min(Duration::from_millis(100));
                            next_probe = Instant::now() + setup_interval;
                        }
                        Phase::Serving if healthy => {
                            failures = 0;
                            next_probe = Instant::now() + self.launch.health.interval;
                        }
                        Phase::Serving => {
                            failures += 1;
                            if failures >= self.launch.health.failure_threshold {
                                let reason = format!("{failures} health checks in a row failed");
                                let _ = self.events.send(Event::Unhealthy { id, reason: reason.clone() });
                                cancel(&job).await;
                                ending = Some((false, reason));
                            } else {
                                next_probe = Instant::now() + self.launch.health.interval;
                            }
                        }
                    }
                }
            }
        };
        // The agent's last words may still be on their way.
        while let Ok(report) = reports.try_recv() {
            match report {
                AgentReport::Output { lines } => self.write(lines),
                AgentReport::Exited { reason, .. } | AgentReport::Failed { reason } => agent_said = Some(reason),
                AgentReport::Listening { .. } => {}
            }
        }
        tracing::info!(runner = %id, job, %ended, "runner's Slurm job ended");
        match ending {
            Some((requested, reason)) => Ending { phase, requested, reason },
            None => {
                // What the cluster says comes first: a node that failed explains a
                // runner that its agent saw stopped.
                let reason = match agent_said {
                    Some(said) => format!("{ended}; the runner: {said}"),
                    None => ended,
                };
                Ending { phase, requested: false, reason }
            }
        }
    }

    /// Writes lines the agent sent to the runner's log and its tap.
    fn write(&mut self, lines: Vec<WireLine>) {
        for line in lines {
            let stream = if line.stderr { "stderr" } else { "stdout" };
            self.log.append(line.at, stream, &line.line);
            if self.tap.receiver_count() > 0 {
                let _ = self.tap.send(Arc::new(OutputLine { at: line.at, stream, line: line.line }));
            }
        }
    }
}

/// Ends a job now: SIGKILL to everything of it, and its cancellation.
async fn cancel(job: &str) {
    let _ = command_output("scancel", &["--signal=KILL", "--full", job]).await;
    if let Err(e) = command_output("scancel", &[job]).await {
        tracing::warn!(job, error = %e, "cannot cancel a runner's Slurm job");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runner_asks_for_its_gpus_memory_and_cpus() {
        let settings = SlurmSettings {
            partition: "gpu".to_owned(),
            account: Some("ml".to_owned()),
            qos: None,
            extra_args: vec!["--time=1-00:00:00".to_owned()],
        };
        let cases = [
            (JobRequest { runner: "r1".to_owned(), ..JobRequest::default() }, vec![]),
            (
                JobRequest { runner: "r2".to_owned(), gpus: 2, memory_mb: Some(16000), cpus: Some(1.5) },
                vec!["--gres=gpu:2", "--mem=16000M", "--cpus-per-task=2"],
            ),
            (
                JobRequest { runner: "r3".to_owned(), cpus: Some(0.25), ..JobRequest::default() },
                vec!["--cpus-per-task=1"],
            ),
        ];
        for (request, resources) in cases {
            let args = request.sbatch_args(&settings);
            let mut want = vec![
                "--parsable".to_owned(),
                format!("--job-name=hangar-{}", request.runner),
                "--partition=gpu".to_owned(),
                "--no-requeue".to_owned(),
                "--nodes=1".to_owned(),
                "--ntasks=1".to_owned(),
                "--account=ml".to_owned(),
            ];
            want.extend(resources.into_iter().map(str::to_owned));
            want.push("--time=1-00:00:00".to_owned());
            assert_eq!(args, want, "{request:?}");
        }
    }

    #[test]
    fn squeue_lines_become_runner_states() {
        let text = "\
101|hangar-r1|PENDING|Resources|
102|hangar-r2|RUNNING|None|n2
103|hangar-r3|NODE_FAIL|NodeDown|n1
104|train-big|RUNNING|None|n3
105|hangar-r5|CANCELLED|None|
106|hangar-r6|PREEMPTED|None|n1
108|hangar-r8|COMPLETING|None|n2
not a line
107|hangar-|RUNNING|None|n1
";
        let jobs = parse_squeue(text);
        let want: BTreeMap<String, (String, JobState)> = [
            ("r1", "101", JobState::Pending { reason: "Resources".to_owned() }),
            ("r2", "102", JobState::Running { node: "n2".to_owned() }),
            ("r3", "103", JobState::Ended { state: "NODE_FAIL".to_owned(), reason: "NodeDown".to_owned() }),
            ("r5", "105", JobState::Ended { state: "CANCELLED".to_owned(), reason: String::new() }),
            ("r6", "106", JobState::Ended { state: "PREEMPTED".to_owned(), reason: String::new() }),
            ("r8", "108", JobState::Running { node: "n2".to_owned() }),
        ]
        .into_iter()
        .map(|(runner, job, state)| (runner.to_owned(), (job.to_owned(), state)))
        .collect();
        assert_eq!(jobs, want);
    }
}
