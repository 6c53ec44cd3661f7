//! Runners on other machines: what a cluster backend ([`crate::slurm`], and any that
//! follows) shares with the agent that runs a runner on its node.
//!
//! The server packs a revision's built files once ([`pack_code`]) and registers each
//! remote runner with [`Agents`], which gives it a token of its own. The agent on the
//! node (`hangar agent`, [`run_agent`]) uses that token, and nothing else, to
//!
//! - fetch what it is to run ([`AgentSpec`]) and the code by its digest, which it
//!   checks, unpacks and keeps per node;
//! - run the runner as a local runner of the node ([`crate::LocalProcesses`], in the
//!   same sandbox when the node has one), listening on a free port of the node that
//!   forwards to the app;
//! - tell the server that address, the GPUs the cluster gave it and the node
//!   ([`AgentReport::Listening`]), stream the runner's output, and say how it ended.
//!
//! Nothing here assumes a shared filesystem or loopback: the server reaches the agent
//! at the address it reported, and the agent the server at the URL it was given.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use model::ids::RunnerId;
use model::records::OutputLine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::runner::{Event, HealthPolicy, LocalProcesses, RunnerBackend, RunnerLaunch};
use crate::sandbox::{Confinement, Sandbox};

/// The environment variables the job gives the agent: where the server is, and the
/// runner's token.
pub const URL_VAR: &str = "HANGAR_AGENT_URL";
pub const TOKEN_VAR: &str = "HANGAR_AGENT_TOKEN";

/// The API paths the agent uses, under the server's API address.
pub const SPEC_PATH: &str = "/v1/agent/spec";
pub const CODE_PATH: &str = "/v1/agent/code";
pub const REPORT_PATH: &str = "/v1/agent/report";

/// Everything the agent needs to run its runner, apart from the code.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AgentSpec {
    /// The runner's id.
    pub runner: String,
    /// The app's id: its cache on the node is kept under it.
    pub app: String,
    pub machine_type: String,
    /// `sha256:<hex>` of the code archive.
    pub digest: String,
    pub command: Vec<String>,
    pub env: Vec<(String, String)>,
    pub uid: u32,
    pub health_path: String,
    pub startup_timeout_ms: u64,
    pub health_interval_ms: u64,
    pub probe_timeout_ms: u64,
    pub failure_threshold: u32,
    #[serde(default)]
    pub start_period_ms: u64,
    pub memory: Option<u64>,
    pub pids: Option<u64>,
    pub cpus: Option<f64>,
    /// How the runner is confined, as the server's own runners are: in the bwrap
    /// sandbox, with these host paths readable in it, or (`None`) not at all.
    pub sandbox: Option<Vec<PathBuf>>,
}

/// One line of a runner's output, as the agent sends it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WireLine {
    #[serde(with = "time::serde::rfc3339")]
    pub at: time::OffsetDateTime,
    pub stderr: bool,
    pub line: String,
}

/// What the agent tells the server.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AgentReport {
    /// The runner's process has started; calls and health checks go to `addr`.
    Listening {
        addr: SocketAddr,
        node: String,
        /// The GPUs the cluster gave the job, as the node numbers them.
        gpus: Vec<String>,
    },
    /// Lines of output, oldest first; also sent empty, as a sign of life.
    Output { lines: Vec<WireLine> },
    /// The runner has ended, and why; the agent exits next.
    Exited { serving: bool, reason: String },
    /// The agent could not start the runner.
    Failed { reason: String },
}

/// A remote runner the server knows, as its agent's token finds it.
pub struct Remote {
    pub spec: AgentSpec,
    /// The code archive the digest names.
    pub archive: PathBuf,
    reports: mpsc::UnboundedSender<AgentReport>,
    /// Commands waiting for its agent to run them.
    pub execs: Arc<crate::remote_exec::ExecQueue>,
}

/// The remote runners whose agents may talk to the server, by the SHA-256 of their
/// token: the tokens themselves are never kept, and a lookup by hash does not reveal a
/// token through timing.
#[derive(Default)]
pub struct Agents {
    by_token: Mutex<HashMap<[u8; 32], Arc<Remote>>>,
}

impl Agents {
    /// Registers a runner; its reports go to `reports`. Returns the agent's token.
    pub fn register(&self, spec: AgentSpec, archive: PathBuf, reports: mpsc::UnboundedSender<AgentReport>) -> String {
        let token = hex::encode(rand::random::<[u8; 32]>());
        let remote = Arc::new(Remote { spec, archive, reports, execs: Arc::default() });
        self.lock().insert(hash(&token), remote);
        token
    }

    /// The runner whose agent holds `token`.
    pub fn find(&self, token: &str) -> Option<Arc<Remote>> {
        self.lock().get(&hash(token)).cloned()
    }

    /// Hands a report to the runner's watcher; false when the token is unknown (the
    /// runner has ended, or the server restarted), which tells the agent to stop.
    pub fn report(&self, token: &str, report: AgentReport) -> bool {
        self.find(token).is_some_and(|remote| remote.reports.send(report).is_ok())
    }

    /// Sends `command` to runner `id`'s agent to run; `None` when no agent of it is known.
    pub(crate) fn exec(
        &self,
        id: RunnerId,
        command: &[String],
        tty: Option<model::records::TermSize>,
    ) -> Option<crate::ExecSession> {
        let id = id.to_string();
        let remote = self.lock().values().find(|r| r.spec.runner == id).cloned()?;
        Some(remote.execs.push(command, tty))
    }

    /// Forgets runner `id`: its agent's token stops working.
    pub fn remove(&self, id: RunnerId) {
        let id = id.to_string();
        self.lock().retain(|_, remote| remote.spec.runner != id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Arc<Remote>>> {
        self.by_token.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The spec for an agent to run `launch`, whose code is in the archive `digest` names.
pub fn agent_spec(launch: &RunnerLaunch, digest: String, sandbox: Option<Vec<PathBuf>>) -> AgentSpec {
    let app = launch
        .confinement
        .cache
        .as_ref()
        .and_then(|c| c.file_name())
        .map_or_else(|| "app".to_owned(), |n| n.to_string_lossy().into_owned());
    AgentSpec {
        runner: launch.id.to_string(),
        app,
        machine_type: launch.machine_type.clone(),
        digest,
        command: launch.command.clone(),
        env: launch.env.clone(),
        uid: launch.confinement.uid,
        health_path: launch.health_path.clone(),
        startup_timeout_ms: launch.startup_timeout.as_millis() as u64,
        health_interval_ms: launch.health.interval.as_millis() as u64,
        probe_timeout_ms: launch.health.probe_timeout.as_millis() as u64,
        failure_threshold: launch.health.failure_threshold,
        start_period_ms: launch.health.start_period.as_millis() as u64,
        memory: launch.limits.memory,
        pids: launch.limits.pids,
        cpus: launch.limits.cpus,
        sandbox,
    }
}

/// Packs the built files in `code` into `archive` (a gzip'd tar, symlinks kept as
/// they are, built files and all: nothing is left out as an upload leaves out ignored
/// files), once: an archive already there is reused. Returns its digest,
/// `sha256:<hex>`. Blocking.
pub fn pack_code(code: &Path, archive: &Path) -> std::io::Result<String> {
    let digest_file = archive.with_extension("sha256");
    if let (true, Ok(digest)) = (archive.exists(), std::fs::read_to_string(&digest_file)) {
        return Ok(digest);
    }
    let partial = archive.with_extension(format!("partial-{}", std::process::id()));
    let file = std::fs::File::create(&partial)?;
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(file, flate2::Compression::fast()));
    builder.follow_symlinks(false);
    builder.append_dir_all(".", code)?;
    builder.into_inner()?.finish()?.sync_all()?;
    let digest = file_digest(&partial)?;
    std::fs::rename(&partial, archive)?;
    std::fs::write(&digest_file, &digest)?;
    Ok(digest)
}

/// Unpacks `archive`, made by [`pack_code`], into `dest`, which must not exist yet:
/// into a staging directory beside it first, then renamed into place, so that `dest`
/// is either absent or whole. Files keep their modes, and their owners where this runs
/// as root. If another unpacking put `dest` there first, that copy is kept. Blocking.
pub fn unpack_code(archive: &Path, dest: &Path) -> std::io::Result<()> {
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let staging =
        dest.with_file_name(format!(".{name}.{}-{}", std::process::id(), hex::encode(rand::random::<[u8; 4]>())));
    let unpacked = (|| {
        std::fs::create_dir_all(&staging)?;
        let mut unpacking = tar::Archive::new(flate2::read::GzDecoder::new(std::fs::File::open(archive)?));
        unpacking.set_preserve_permissions(true);
        unpacking.set_preserve_ownerships(nix::unistd::geteuid().is_root());
        unpacking.unpack(&staging)?;
        std::fs::write(staging.join(".complete"), "")
    })();
    if let Err(e) = unpacked {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    if std::fs::rename(&staging, dest).is_err() {
        let _ = std::fs::remove_dir_all(&staging);
        if !dest.join(".complete").exists() {
            return Err(std::io::Error::other(format!("cannot put the code in {}", dest.display())));
        }
    }
    Ok(())
}

/// `sha256:<hex>` of the file at `path`. Blocking.
pub fn file_digest(path: &Path) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    std::io::copy(&mut std::fs::File::open(path)?, &mut hasher)?;
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}

/// How the agent reaches the server.
struct ServerLink {
    http: reqwest::Client,
    url: String,
    token: String,
}

impl ServerLink {
    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, format!("{}{path}", self.url.trim_end_matches('/'))).bearer_auth(&self.token)
    }

    /// Sends a report. `Ok(false)`: the server does not know this runner any more.
    async fn report(&self, report: &AgentReport) -> Result<bool, String> {
        let response = self
            .request(reqwest::Method::POST, REPORT_PATH)
            .json(report)
            .send()
            .await
            .map_err(|e| format!("cannot reach the server at {}: {e}", self.url))?;
        match response.status() {
            s if s.is_success() => Ok(true),
            reqwest::StatusCode::UNAUTHORIZED | reqwest::StatusCode::NOT_FOUND => Ok(false),
            s => Err(format!("the server answered {s} to a report")),
        }
    }
}

/// How long the agent goes on without reaching the server before it gives its runner
/// up: a server that is gone for good has replaced it, or will end the job when it
/// comes back.
const SERVER_LOST_AFTER: Duration = Duration::from_secs(60);

/// How often output is sent, and a sign of life when there is none.
const OUTPUT_EVERY: Duration = Duration::from_millis(100);
const ALIVE_EVERY: Duration = Duration::from_secs(5);

/// The agent: runs one runner on this node for the server at `url`, with the token
/// the server gave the job, keeping code and caches under `node_dir`. Returns once
/// the runner has ended, or with why it could not run it.
pub async fn run_agent(url: String, token: String, node_dir: PathBuf) -> Result<(), String> {
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| format!("cannot make an HTTP client: {e}"))?;
    let link = Arc::new(ServerLink { http, url: url.clone(), token });
    let response = link
        .request(reqwest::Method::GET, SPEC_PATH)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(|e| format!("cannot get the runner's spec from {url}: {e}"))?;
    let spec: AgentSpec = response.json().await.map_err(|e| format!("the runner's spec is not valid: {e}"))?;
    match start_runner(&link, &spec, &node_dir).await {
        Ok(()) => Ok(()),
        Err(reason) => {
            let _ = link.report(&AgentReport::Failed { reason: reason.clone() }).await;
            Err(reason)
        }
    }
}

async fn start_runner(link: &Arc<ServerLink>, spec: &AgentSpec, node_dir: &Path) -> Result<(), String> {
    let id: RunnerId = spec.runner.parse().map_err(|e| format!("the runner's spec is not valid: {e}"))?;
    let code = fetch_code(link, &spec.digest, node_dir).await?;
    // The same sandbox as a local runner's where this node has it.
    let sandbox = match &spec.sandbox {
        Some(paths) => match Sandbox::bwrap(paths.iter().filter(|p| p.exists()).cloned().collect()) {
            Ok(sandbox) => match crate::Cgroups::detect() {
                Ok(cgroups) => sandbox.with_cgroups(cgroups),
                Err(_) => sandbox,
            },
            Err(e) => {
                eprintln!("hangar agent: this node cannot sandbox the runner ({e}); it runs unconfined");
                Sandbox::none()
            }
        },
        None => Sandbox::none(),
    };
    let sandbox = Arc::new(sandbox);
    // Launched from this function, which `hangar agent` runs on its main thread.
    let backend =
        Arc::new(LocalProcesses::new(node_dir.join("runners"), 16 << 20, sandbox.clone()).dying_with_this_process());
    let gpus = job_gpus();
    let given = crate::Gpus::given(&gpus).unwrap_or_else(|_| crate::Gpus::none());
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| gpus.join(","));
    let mut env: Vec<(String, String)> = spec
        .env
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "CUDA_VISIBLE_DEVICES" | "NVIDIA_VISIBLE_DEVICES" | "HANGAR_GPUS"))
        .cloned()
        .collect();
    env.push(("CUDA_VISIBLE_DEVICES".to_owned(), visible.clone()));
    env.push(("NVIDIA_VISIBLE_DEVICES".to_owned(), visible));
    env.push(("HANGAR_GPUS".to_owned(), gpus.join(",")));
    let launch = RunnerLaunch {
        id,
        machine_type: spec.machine_type.clone(),
        gpu_count: gpus.len() as u32,
        command: spec.command.clone(),
        confinement: Confinement {
            uid: spec.uid,
            code,
            code_writable: false,
            cache: Some(node_dir.join("caches").join(&spec.app)),
            home_cache: None,
            devices: crate::device_nodes(given.all()),
        },
        env,
        health_path: spec.health_path.clone(),
        startup_timeout: Duration::from_millis(spec.startup_timeout_ms),
        health: HealthPolicy {
            interval: Duration::from_millis(spec.health_interval_ms),
            failure_threshold: spec.failure_threshold,
            probe_timeout: Duration::from_millis(spec.probe_timeout_ms),
            start_period: Duration::from_millis(spec.start_period_ms),
        },
        limits: crate::Limits { memory: spec.memory, pids: spec.pids, cpus: spec.cpus },
    };
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let handle = backend.launch(launch, events_tx).map_err(|e| format!("the runner could not be started: {e}"))?;
    let mut output = backend.subscribe_output(id);

    // Calls reach the app through a port of this node that forwards to it.
    let listener =
        tokio::net::TcpListener::bind(("0.0.0.0", 0)).await.map_err(|e| format!("cannot listen on this node: {e}"))?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let (ip, server) =
        own_address(&link.url).map_err(|e| format!("cannot tell this node's address toward the server: {e}"))?;
    let target = handle.addr.clone();
    // Commands run in the runner (`runners exec`) come by asking the server for them.
    let execs = tokio::spawn(crate::remote_exec::serve_orders(
        link.http.clone(),
        link.url.clone(),
        link.token.clone(),
        backend.clone(),
        id,
    ));
    let forwarder = tokio::spawn(async move {
        while let Ok((mut client, peer)) = listener.accept().await {
            // Only the server calls the runner, as only it can reach a local one: the
            // port is open on the node's network, and auth is the gateway's.
            if peer.ip() != server {
                continue;
            }
            let target = target.clone();
            tokio::spawn(async move {
                let _ = client.set_nodelay(true);
                if let Ok(mut app) = target.connect().await {
                    let _ = app.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut app).await;
                }
            });
        }
    });
    let node = std::env::var("SLURMD_NODENAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_owned()))
        .unwrap_or_default();
    let listening = AgentReport::Listening { addr: SocketAddr::new(ip, port), node, gpus };
    if !link.report(&listening).await? {
        handle.kill();
    }

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("cannot watch for SIGTERM: {e}"))?;
    let mut lines = Vec::new();
    let mut flush = tokio::time::interval(OUTPUT_EVERY);
    let mut last_sent = tokio::time::Instant::now();
    let mut unreachable_since: Option<tokio::time::Instant> = None;
    let mut serving = false;
    let ended = loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(Event::Healthy { .. }) => serving = true,
                Some(Event::Unhealthy { .. } | Event::Waiting { .. } | Event::Placed { .. }) => {}
                Some(Event::Exited { reason, .. }) => break reason,
                None => break "the runner's watcher ended".to_owned(),
            },
            line = async { output.as_mut().expect("guarded").recv().await }, if output.is_some() => match line {
                Ok(line) => lines.push(wire(&line)),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => lines.push(WireLine {
                    at: time::OffsetDateTime::now_utc(),
                    stderr: true,
                    line: format!("[hangar agent: {n} lines of output were lost]"),
                }),
                Err(tokio::sync::broadcast::error::RecvError::Closed) => output = None,
            },
            _ = terminate.recv() => {
                // The server's stop: the runner gets its SIGTERM; the server kills the job
                // when its grace period is over.
                handle.stop(Duration::from_secs(24 * 3600));
            }
            _ = flush.tick() => {
                if lines.is_empty() && last_sent.elapsed() < ALIVE_EVERY {
                    continue;
                }
                let report = AgentReport::Output { lines: std::mem::take(&mut lines) };
                match link.report(&report).await {
                    Ok(true) => unreachable_since = None,
                    Ok(false) => handle.kill(),
                    Err(e) => {
                        let since = *unreachable_since.get_or_insert_with(tokio::time::Instant::now);
                        if since.elapsed() > SERVER_LOST_AFTER {
                            eprintln!("hangar agent: {e}; giving the runner up");
                            handle.kill();
                        }
                    }
                }
                last_sent = tokio::time::Instant::now();
            }
        }
    };
    forwarder.abort();
    execs.abort();
    // What the app wrote last is still in the tap.
    if let Some(mut output) = output {
        while let Ok(line) = output.try_recv() {
            lines.push(wire(&line));
        }
    }
    if !lines.is_empty() {
        let _ = link.report(&AgentReport::Output { lines }).await;
    }
    let _ = link.report(&AgentReport::Exited { serving, reason: ended }).await;
    Ok(())
}

fn wire(line: &OutputLine) -> WireLine {
    WireLine { at: line.at, stderr: line.stream == "stderr", line: line.line.clone() }
}

/// The GPUs the cluster gave this job, as the node numbers them (Slurm's
/// `SLURM_JOB_GPUS`, or its `CUDA_VISIBLE_DEVICES`).
fn job_gpus() -> Vec<String> {
    std::env::var("SLURM_JOB_GPUS")
        .or_else(|_| std::env::var("CUDA_VISIBLE_DEVICES"))
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|g| !g.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The address of this node on the way to the server at `url` (the one the server can
/// reach it at), and the server's.
fn own_address(url: &str) -> std::io::Result<(std::net::IpAddr, std::net::IpAddr)> {
    let parsed = reqwest::Url::parse(url).map_err(std::io::Error::other)?;
    let host = parsed.host_str().ok_or_else(|| std::io::Error::other("the server URL has no host"))?;
    let port = parsed.port_or_known_default().unwrap_or(80);
    let server = std::net::ToSocketAddrs::to_socket_addrs(&(host.trim_matches(['[', ']']), port))?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("{host} has no address")))?;
    let socket = std::net::UdpSocket::bind(if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
    socket.connect(server)?;
    Ok((socket.local_addr()?.ip(), server.ip()))
}

/// The code the digest names, in this node's cache: fetched from the server, checked
/// against the digest, and unpacked once; later runners of the revision on this node
/// find it there.
async fn fetch_code(link: &ServerLink, digest: &str, node_dir: &Path) -> Result<PathBuf, String> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| format!("the code's digest {digest:?} is not sha256:<hex>"))?;
    let code_root = node_dir.join("code");
    let dest = code_root.join(hex);
    if dest.join(".complete").exists() {
        return Ok(dest);
    }
    std::fs::create_dir_all(&code_root).map_err(|e| format!("cannot create {}: {e}", code_root.display()))?;
    let unique = format!("{}-{}", std::process::id(), hex::encode(rand::random::<[u8; 4]>()));
    let download = code_root.join(format!(".{hex}.{unique}.tar.gz"));
    let result = download_to(link, &download).await;
    let checked = result.and_then(|got| {
        if got == digest { Ok(()) } else { Err(format!("the code fetched has digest {got}, not {digest}")) }
    });
    if let Err(e) = checked {
        let _ = std::fs::remove_file(&download);
        return Err(e);
    }
    // Another runner of the revision may have put it there first: then its copy is used.
    let unpacked = tokio::task::spawn_blocking({
        let (download, dest) = (download.clone(), dest.clone());
        move || unpack_code(&download, &dest)
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r.map_err(|e| format!("cannot unpack the code: {e}")));
    let _ = std::fs::remove_file(&download);
    unpacked.map(|()| dest)
}

/// Streams the code into `path`, hashing it on the way. Returns its digest.
async fn download_to(link: &ServerLink, path: &Path) -> Result<String, String> {
    use tokio::io::AsyncWriteExt;
    let mut response = link
        .request(reqwest::Method::GET, CODE_PATH)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(|e| format!("cannot fetch the code: {e}"))?;
    let mut file = tokio::fs::File::create(path).await.map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    let mut hasher = Sha256::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| format!("fetching the code failed: {e}"))? {
        hasher.update(&chunk);
        file.write_all(&chunk).await.map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    file.flush().await.map_err(|e| e.to_string())?;
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_finds_its_runner_until_it_is_removed_and_reports_reach_its_watcher() {
        let agents = Agents::default();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let runner = RunnerId::new();
        let spec = AgentSpec {
            runner: runner.to_string(),
            app: "a".to_owned(),
            machine_type: "cpu".to_owned(),
            digest: "sha256:00".to_owned(),
            command: vec!["true".to_owned()],
            env: Vec::new(),
            uid: 0,
            health_path: "/health".to_owned(),
            startup_timeout_ms: 1,
            health_interval_ms: 1,
            probe_timeout_ms: 1,
            failure_threshold: 1,
            start_period_ms: 0,
            memory: None,
            pids: None,
            cpus: None,
            sandbox: None,
        };
        let token = agents.register(spec, PathBuf::from("/nowhere"), tx);
        assert_eq!(token.len(), 64);
        assert!(agents.find("not the token").is_none());
        assert_eq!(agents.find(&token).unwrap().spec.runner, runner.to_string());
        let report = AgentReport::Output { lines: Vec::new() };
        assert!(agents.report(&token, report.clone()));
        assert_eq!(rx.try_recv().unwrap(), report);
        agents.remove(runner);
        assert!(agents.find(&token).is_none());
        assert!(!agents.report(&token, report));
    }

    #[test]
    fn packed_code_keeps_its_links_and_modes_and_is_packed_once() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let code = dir.path().join("app");
        std::fs::create_dir_all(code.join("bin")).unwrap();
        std::fs::write(code.join("bin/run"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(code.join("bin/run"), std::fs::Permissions::from_mode(0o755)).unwrap();
        // A virtualenv's interpreter is a link out of the app, and must stay one.
        std::os::unix::fs::symlink("/usr/bin/python3", code.join("bin/python")).unwrap();
        let archive = dir.path().join("code.tar.gz");
        let digest = pack_code(&code, &archive).unwrap();
        assert_eq!(digest, file_digest(&archive).unwrap());
        std::fs::write(code.join("later"), "not packed: the archive is reused").unwrap();
        assert_eq!(pack_code(&code, &archive).unwrap(), digest);

        let out = dir.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        let mut unpacking = tar::Archive::new(flate2::read::GzDecoder::new(std::fs::File::open(&archive).unwrap()));
        unpacking.set_preserve_permissions(true);
        unpacking.unpack(&out).unwrap();
        assert_eq!(std::fs::read_link(out.join("bin/python")).unwrap(), PathBuf::from("/usr/bin/python3"));
        assert_eq!(std::fs::metadata(out.join("bin/run")).unwrap().permissions().mode() & 0o777, 0o755);
        assert!(!out.join("later").exists());
    }
}
