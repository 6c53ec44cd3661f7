//! The server: the composition root. It checks that deployed code can be sandboxed,
//! opens the store, makes the first team and root key on a fresh data dir, repairs what
//! a crashed run left behind, starts a controller per app, and serves the control API,
//! the dashboard and the gateway (calls to apps, and the queue) until it is told to
//! stop. What each API operation does is in `control` and `deploy`; how processes run is
//! the `supervisor`'s business.

mod access;
mod agent;
mod auth;
mod charts;
mod code;
mod config;
mod control;
mod controller;
mod deploy;
mod fleet;
mod guard;
mod layout;
mod operate;
mod owners;
mod placement;
mod secrets;
#[cfg(test)]
mod sim;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use model::records::Key;
use model::revision::KeyScope;
use store::Store;
use tokio::net::TcpListener;

pub use config::{Config, Database, LogFormat, MachineType, ServerArgs, default_data_dir};

use control::Control;
use layout::Layout;

/// Sets up logging as the config says. Call once, before [`run`].
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HANGAR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tower_http=warn"));
    use std::io::IsTerminal;
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(colour);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Runs the server until SIGINT or SIGTERM, then shuts down gracefully.
pub async fn run(config: Config) -> anyhow::Result<()> {
    // Settings that can be wrong are checked before anything is touched.
    let tls = config.tls.as_ref().map(|(cert, key)| tls_config(cert, key)).transpose()?;
    let sandbox = match config.sandbox {
        supervisor::SandboxMode::Bwrap => {
            let sandbox = supervisor::Sandbox::bwrap(config.sandbox_ro_paths.clone())
                .map_err(|e| anyhow::anyhow!("cannot sandbox deployed code: {e}"))?;
            tracing::info!(
                read_only_paths = ?config.sandbox_ro_paths,
                "sandbox: bwrap (every runner and build in its own namespaces, as its team's uid)"
            );
            sandbox
        }
        supervisor::SandboxMode::None => {
            tracing::warn!("sandbox: none -- deployed code runs unconfined as the server's user and can read its keys");
            supervisor::Sandbox::none()
        }
    };
    let sandbox = match supervisor::Cgroups::detect() {
        Ok(cgroups) => {
            tracing::info!(
                version = cgroups.version().name(),
                "limits: cgroups (each runner's memory, processes and CPU as its machine type says, each build's processes)"
            );
            sandbox.with_cgroups(cgroups)
        }
        Err(reason) => {
            tracing::warn!(
                %reason,
                "limits: no cgroups -- memory limits are checked by measuring runners every 250 ms, and there is no \
                 limit on processes or CPU"
            );
            sandbox
        }
    };
    let layout = Layout::new(config.data_dir.clone());
    prepare_data_dir(&layout)?;
    let store = match &config.database {
        config::Database::Embedded => Store::open_sqlite(&layout.database())
            .await
            .with_context(|| format!("cannot open the store at {}", layout.database().display()))?,
        config::Database::Postgres(url) => Store::open_postgres(url)
            .await
            .with_context(|| format!("cannot open the store at {}", config::redacted(url)))?,
    };
    bootstrap(&store, &layout).await?;

    // Runner processes an earlier run left behind (it crashed, or was killed) are
    // ended before anything else starts; their logs go with them.
    let sandbox = Arc::new(sandbox);
    let backend = Arc::new(supervisor::LocalProcesses::new(layout.runners(), RUNNER_LOG_BYTES, sandbox.clone()));
    let reaped = backend.reap_leftovers(layout.root()) + supervisor::end_strays(&layout.revisions());
    if reaped > 0 {
        tracing::warn!(count = reaped, "ended runner processes left behind by an earlier run");
    }
    if let Some(swept) = sandbox.cgroups().map(|c| c.sweep_empty(LEFTOVER_CGROUP_AGE)).filter(|n| *n > 0) {
        tracing::info!(count = swept, "removed empty cgroups left behind by an earlier run");
    }
    let _ = std::fs::remove_dir_all(layout.runners());
    std::fs::create_dir_all(layout.runners())
        .with_context(|| format!("cannot create {}", layout.runners().display()))?;

    // Bound before runners start: a cluster's runners reach the server at its API address.
    let api_listener = TcpListener::bind(config.api_addr)
        .await
        .with_context(|| format!("cannot listen on the API address {}", config.api_addr))?;
    let gateway_listener = TcpListener::bind(config.gateway_addr)
        .await
        .with_context(|| format!("cannot listen on the gateway address {}", config.gateway_addr))?;
    let api_addr = api_listener.local_addr()?;
    let gateway_addr = gateway_listener.local_addr()?;

    let gpus = Arc::new(find_gpus(&config)?);
    let (backend, agents): (Arc<dyn supervisor::RunnerBackend>, _) = match &config.runner_backend {
        config::RunnerBackendKind::Local => (backend, None),
        config::RunnerBackendKind::Slurm(section) => {
            let jobs = slurm_backend(section, &layout, api_addr, config.sandbox, &config.sandbox_ro_paths).await?;
            let agents = jobs.agents();
            (Arc::new(jobs), Some(agents))
        }
    };
    // Where servers share the store, each app runs on one of them at a time.
    let owners = match &config.database {
        config::Database::Embedded => owners::Owners::alone(),
        config::Database::Postgres(_) => {
            let me = server_id(&layout)?;
            let owners = owners::Owners::shared(
                store.clone(),
                me.clone(),
                config.lease_ttl,
                advertised(api_addr),
                advertised(gateway_addr),
            );
            // Leases an earlier run of this server held are given up, to be taken again
            // (by this run or another server) with a new epoch.
            owners.retire().await;
            tracing::info!(server = %me, lease_ttl = ?config.lease_ttl, "store shared with other servers: each app runs on one of them");
            if config.tls.is_some() {
                tracing::warn!(
                    "the gateway speaks TLS, but servers sharing a store forward calls to each other's gateways in \
                     plain HTTP: calls for this server's apps that reach another server will fail; serve TLS in \
                     front of the gateways instead"
                );
            }
            owners
        }
    };
    let shared_store = owners.is_shared();
    let config = Arc::new(config);
    let control = assemble(config.clone(), store.clone(), layout.clone(), sandbox, backend, gpus, owners)?;
    check_secrets(&store, &control.fleet.shared.secrets).await?;
    let gateway = control.fleet.shared.gateway.clone();
    let output = Arc::new(RunnerOutput(control.fleet.shared.backend.clone()));
    recover(&control).await?;
    let own = own_addresses(&[config.api_addr, config.gateway_addr]);
    let queue =
        queue::Queue::new(store, gateway.clone(), queue_config(&config, own), output, control.shutdown.child_token());
    control.fleet.set_queue(queue.clone());
    let leases = tokio_util::sync::CancellationToken::new();
    let keeping = if shared_store {
        // The other servers' apps are theirs: this one takes its share of the free ones
        // (with their queue requests) as it looks at the leases, starting now.
        gateway.set_locator(Arc::new(owners::GatewayLocator(control.fleet.clone())));
        // One look before listening, so that the apps this server takes at start are
        // served from its first call, as a lone server's are.
        owners::look_now(&control).await;
        Some(tokio::spawn(owners::keep_leases(control.clone(), leases.clone())))
    } else {
        start_controllers(&control).await?;
        None
    };
    tokio::spawn(charts::sample(control.fleet.clone(), config.chart_interval, control.shutdown.child_token()));
    queue.start(!shared_store).await.context("cannot resume the queue")?;
    gateway.set_queue(queue.clone());

    write_endpoints(&layout, api_addr, gateway_addr, config.tls.is_some())?;
    tracing::info!(api = %api_addr, gateway = %gateway_addr, data_dir = %layout.root().display(), "hangar server listening");

    let shutdown = control.shutdown.clone();
    let mut api_app = api::router::router(control.clone())
        .layer(axum::middleware::from_fn_with_state(control.clone(), owners::to_owner))
        .merge(dashboard());
    if let Some(agents) = agents {
        api_app = api_app.merge(agent::routes(agents, shutdown.clone()));
    }
    let api_app = api_app
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(config.body_read_timeout))
        .layer(tower_http::trace::TraceLayer::new_for_http());
    let api_server = serve_api(api_listener, api_app, config.connection_timeouts(), shutdown.clone());
    let gateway_threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let gateway_server =
        gateway.clone().serve_threads(gateway_listener.into_std()?, gateway_threads, tls, shutdown.clone());

    let signals = tokio::spawn({
        let (shutdown, control) = (shutdown.clone(), control.clone());
        async move {
            wait_for_signal().await;
            tracing::info!("shutting down");
            if let Some(keeping) = keeping {
                leases.cancel();
                let _ = keeping.await;
                hand_over(&control).await;
            }
            shutdown.cancel();
        }
    });
    let (api_result, gateway_result) = tokio::join!(api_server, gateway_server);
    signals.abort();
    api_result.context("API server failed")?;
    gateway_result.context("gateway failed")?;

    // Queue requests in progress stay so and are queued again on the next start.
    queue.shutdown().await;
    // Background deploys see the cancellation, stop their builds and record the
    // revision as Failed ("interrupted") before the process exits.
    control.fleet.shutdown().await;
    // The runners have ended; their cgroups go before the process does.
    if let Some(cgroups) = control.fleet.shared.sandbox.cgroups() {
        cgroups.settle(Duration::from_secs(5)).await;
    }
    control.tasks.close();
    control.tasks.wait().await;
    tracing::info!("stopped");
    Ok(())
}

/// Runners as jobs of the Slurm cluster `section` describes, after checking that it can
/// be used, and with every job an earlier run of this server left in it cancelled.
async fn slurm_backend(
    section: &config::SlurmSection,
    layout: &Layout,
    api_addr: SocketAddr,
    sandbox: supervisor::SandboxMode,
    ro_paths: &[std::path::PathBuf],
) -> anyhow::Result<supervisor::slurm::SlurmJobs> {
    let server_url = match &section.server_url {
        Some(url) => url.clone(),
        None if api_addr.ip().is_unspecified() => {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            format!("http://{}:{}", host.trim(), api_addr.port())
        }
        None => format!("http://{api_addr}"),
    };
    let launcher = match &section.launcher {
        Some(path) => path.clone(),
        None => std::env::current_exe().context("cannot tell where this binary is, for the nodes")?,
    };
    let config = supervisor::slurm::SlurmConfig {
        settings: section.settings.clone(),
        server_url: server_url.clone(),
        launcher,
        node_dir: section.node_dir.clone(),
        owner: format!("hangar:{}", server_id(layout)?),
        sandbox: match sandbox {
            supervisor::SandboxMode::Bwrap => Some(ro_paths.to_vec()),
            supervisor::SandboxMode::None => None,
        },
    };
    let jobs = supervisor::slurm::SlurmJobs::connect(config, layout.runners(), RUNNER_LOG_BYTES)
        .await
        .map_err(|e| anyhow::anyhow!("cannot use the Slurm cluster: {e}"))?;
    let cancelled =
        jobs.cancel_leftovers().await.map_err(|e| anyhow::anyhow!("cannot list the Slurm cluster's jobs: {e}"))?;
    if cancelled > 0 {
        tracing::warn!(count = cancelled, "cancelled Slurm jobs left behind by an earlier run");
    }
    tracing::info!(
        partition = %section.settings.partition,
        %server_url,
        "runners: Slurm jobs (the cluster places them with their GPUs)"
    );
    Ok(jobs)
}

/// This data dir's server id, made on first use: it marks the server's Slurm jobs.
fn server_id(layout: &Layout) -> anyhow::Result<String> {
    let path = layout.server_id();
    if let Ok(id) = std::fs::read_to_string(&path)
        && !id.trim().is_empty()
    {
        return Ok(id.trim().to_owned());
    }
    let id = uuid::Uuid::new_v4().to_string();
    std::fs::write(&path, &id).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(id)
}

/// The GPUs runners are given: the ones `--gpus` names, or else the ones NVML finds.
fn find_gpus(config: &Config) -> anyhow::Result<supervisor::Gpus> {
    let gpus = match &config.gpus {
        Some(given) => supervisor::Gpus::given(given).map_err(|e| anyhow::anyhow!("--gpus: {e}"))?,
        None => supervisor::Gpus::detect(),
    };
    let found: Vec<String> = gpus
        .all()
        .iter()
        .map(|g| match &g.name {
            Some(name) => format!("{} {name} ({})", g.index, g.id),
            None => g.id.clone(),
        })
        .collect();
    tracing::info!(source = gpus.source(), count = found.len(), gpus = ?found, "GPUs");
    let asking: Vec<&String> = config.machine_types.iter().filter(|(_, m)| m.gpus > 0).map(|(n, _)| n).collect();
    if found.is_empty() && !asking.is_empty() {
        tracing::warn!(machine_types = ?asking, "machine types give runners GPUs, but this server has none");
    }
    Ok(gpus)
}

/// The gateway, the fleet of controllers and the control plane, wired together over
/// `store` and a runner backend.
fn assemble(
    config: Arc<Config>,
    store: Store,
    layout: Layout,
    sandbox: Arc<supervisor::Sandbox>,
    backend: Arc<dyn supervisor::RunnerBackend>,
    gpus: Arc<supervisor::Gpus>,
    owners: owners::Owners,
) -> anyhow::Result<Arc<Control>> {
    let gateway = gateway::Gateway::new(
        Arc::new(auth::GatewayKeys { store: store.clone() }),
        config.start_timeout,
        config.connection_timeouts(),
    );
    gateway.set_revision_finder(Arc::new(control::GatewayRevisions { store: store.clone() }));
    let cluster = backend.cluster().is_some();
    let shared = Arc::new(fleet::Shared {
        store: store.clone(),
        backend,
        sandbox,
        capacity: placement::Capacity::new(&config, gpus.all(), cluster),
        gpus,
        config: config.clone(),
        layout: layout.clone(),
        gateway: gateway.clone(),
        metrics: fleet::FleetMetrics::default(),
        secrets: secrets::SecretBox::load(&layout).context("cannot load the secret key")?,
        owners,
    });
    let mut registry = prometheus_client::registry::Registry::default();
    gateway.metrics.register(&mut registry);
    shared.metrics.register(&mut registry);
    let fleet = Arc::new(fleet::Fleet::new(shared));
    Ok(Arc::new(Control::new(store, config, layout, fleet, registry)))
}

/// Gives this server's apps to the others before it stops serving: it releases their
/// leases and keeps serving their calls until another server has taken each (or a few
/// seconds have passed), so that calls forwarded meanwhile still find runners.
async fn hand_over(control: &Control) {
    let owners = &control.fleet.shared.owners;
    let apps = owners.held();
    owners.retire().await;
    if apps.is_empty() {
        return;
    }
    let deadline = tokio::time::Instant::now() + HANDOVER_WAIT;
    while !owners.all_taken(&apps).await {
        if tokio::time::Instant::now() >= deadline {
            tracing::info!("no other server took every app in time; their leases are free for the next one");
            return;
        }
        tokio::time::sleep(owners.tick() / 2).await;
    }
    // The others' gateways learn of the new owners on their next look.
    tokio::time::sleep(owners.tick()).await;
}

/// How long a stopping server waits for the others to take its apps.
const HANDOVER_WAIT: Duration = Duration::from_secs(5);

/// The address other servers reach a listener at: the one it is bound to, or, bound to
/// every address, the machine's first that is not loopback.
fn advertised(bound: SocketAddr) -> SocketAddr {
    if !bound.ip().is_unspecified() {
        return bound;
    }
    let ip = own_addresses(&[bound]).into_iter().find(|ip| !ip.is_loopback()).unwrap_or(bound.ip());
    SocketAddr::new(ip, bound.port())
}

fn queue_config(config: &Config, own: Vec<std::net::IpAddr>) -> queue::QueueConfig {
    queue::QueueConfig {
        max_payload: usize::try_from(config.queue_max_payload).unwrap_or(usize::MAX),
        retention: config.queue_retention,
        max_attempts: config.queue_max_attempts,
        webhook_policy: queue::WebhookPolicy { allow_private: config.webhook_allow_private, own },
        ..queue::QueueConfig::default()
    }
}

/// The addresses this server answers on: those it listens on, and, for a listener on
/// every address, those of the machine's interfaces.
fn own_addresses(listening: &[SocketAddr]) -> Vec<std::net::IpAddr> {
    let mut own: Vec<std::net::IpAddr> = listening.iter().map(|a| a.ip()).filter(|ip| !ip.is_unspecified()).collect();
    if listening.iter().any(|a| a.ip().is_unspecified())
        && let Ok(interfaces) = nix::ifaddrs::getifaddrs()
    {
        for interface in interfaces {
            let address = interface.address;
            if let Some(v4) = address.as_ref().and_then(|a| a.as_sockaddr_in()) {
                own.push(std::net::IpAddr::V4(v4.ip()));
            } else if let Some(v6) = address.as_ref().and_then(|a| a.as_sockaddr_in6()) {
                own.push(std::net::IpAddr::V6(v6.ip()));
            }
        }
    }
    own
}

/// What runners print, for the logs of the queue requests they work on.
struct RunnerOutput(Arc<dyn supervisor::RunnerBackend>);

impl queue::RunnerOutput for RunnerOutput {
    fn subscribe(
        &self,
        runner: model::ids::RunnerId,
    ) -> Option<tokio::sync::broadcast::Receiver<Arc<model::records::OutputLine>>> {
        self.0.subscribe_output(runner)
    }
}

/// The dashboard: one page, embedded in the binary, that signs in with a key and uses
/// only the public API, with the same auth as the CLI.
fn dashboard() -> axum::Router {
    const PAGE: &str = include_str!("../assets/dashboard.html");
    axum::Router::new().route(
        "/",
        axum::routing::get(|| async {
            ([(axum::http::header::CACHE_CONTROL, "no-cache")], axum::response::Html(PAGE))
        }),
    )
}

/// The gateway's TLS settings from a PEM certificate chain and private key.
fn tls_config(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<Arc<tokio_rustls::rustls::ServerConfig>> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("cannot read the TLS certificate {}", cert.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{} holds no PEM certificate", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("cannot read the TLS private key {}", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("no TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the TLS certificate and key do not fit together")?;
    Ok(Arc::new(config))
}

/// A runner's log is rotated at this size (one older file is kept).
const RUNNER_LOG_BYTES: u64 = 8 << 20;

/// Empty runner and build cgroups older than this are an earlier run's, and go at start
/// (a younger one may be another server's, about to be joined).
const LEFTOVER_CGROUP_AGE: Duration = Duration::from_secs(60);

/// Starts the controller of every app that has a current revision, so that its
/// `min_concurrency` runners come up and calls find it.
async fn start_controllers(control: &Control) -> anyhow::Result<()> {
    for team in control.store.list_teams().await? {
        for app in control.store.list_apps(team.id).await? {
            // One app that cannot be loaded does not keep the others from being served:
            // its problem is logged, and shown in its listing and in /healthz.
            if app.current_revision.is_some()
                && let Err(e) = control.fleet.controller(&app, &team.name).await
            {
                tracing::error!(app = %app.name, team = %team.name, error = %format!("{e:#}"), "cannot load an app; it is not served");
            }
        }
    }
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler cannot fail");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn prepare_data_dir(layout: &Layout) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let root = layout.root();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)
        .with_context(|| format!("cannot create the data dir {}", root.display()))?;
    // Uploads that were in flight when an earlier run stopped are of no use now.
    let _ = std::fs::remove_dir_all(layout.tmp());
    for dir in [layout.tmp(), layout.artifacts(), layout.revisions()] {
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    Ok(())
}

/// On a fresh data dir: creates team `default` and the root key, and writes the key to
/// `admin.key` (mode 0600), the only place it is ever shown.
async fn bootstrap(store: &Store, layout: &Layout) -> anyhow::Result<()> {
    let team = match store.team_by_name("default").await? {
        Some(team) => team,
        None => store.create_team("default").await?,
    };
    if store.count_keys(KeyScope::Root).await? > 0 {
        return Ok(());
    }
    let key = auth::generate_key();
    // Write the file first: a crash between the two steps must not leave a root key
    // that nobody can read.
    write_private(&layout.admin_key(), &format!("{}\n", key.full))?;
    store
        .create_key(
            Key {
                id: key.id.clone(),
                team_id: team.id,
                scope: KeyScope::Root,
                description: Some("root key made on first start".to_owned()),
                created_at: time::OffsetDateTime::now_utc(),
                revoked_at: None,
            },
            key.secret_hash,
        )
        .await?;
    tracing::info!(key_id = %key.id, path = %layout.admin_key().display(), "created team \"default\" and the root key");
    Ok(())
}

/// Refuses to start with a secret key that cannot open the stored secrets (another
/// key than the one they were sealed with): runners would start without them.
async fn check_secrets(store: &Store, secrets: &secrets::SecretBox) -> anyhow::Result<()> {
    for team in store.list_teams().await? {
        for secret in store.secrets(team.id).await? {
            if let Err(e) = secrets.open(team.id, &secret.name, &secret.nonce, &secret.ciphertext) {
                anyhow::bail!(
                    "{e} (team {:?}): start the server with the secret key the secrets were stored with \
                     (HANGAR_SECRET_KEY, or secret.key in the data dir)",
                    team.name
                );
            }
        }
    }
    Ok(())
}

/// Writes a file only its owner can read, atomically.
pub(crate) fn write_private(path: &std::path::Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Serves the control API on `listener` until `shutdown`, then lets the requests in
/// flight finish. A connection idle longer than `timeouts.idle`, or slower than
/// `timeouts.header_read` to send a request's headers, is closed.
async fn serve_api(
    listener: TcpListener,
    app: axum::Router,
    timeouts: gateway::conn::Timeouts,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    use tower::ServiceExt;
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "the API cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let (activity, stream) = timeouts.watch(stream);
        let service = hyper::service::service_fn({
            let (app, activity) = (app.clone(), activity.clone());
            move |request: hyper::Request<hyper::body::Incoming>| {
                activity.request_started();
                let activity = activity.clone();
                let answer = app.clone().oneshot(request.map(axum::body::Body::new));
                async move { answer.await.map(|answer| answer.map(|body| gateway::conn::Answer::new(body, activity))) }
            }
        });
        let mut builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
        builder.http1().timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(timeouts.hyper_backstop());
        // `runners exec` turns its connection into a WebSocket.
        let connection = builder
            .http1_only()
            .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            match timeouts.serve(&activity, connection, None).await {
                Some(Err(e)) => tracing::debug!(error = %e, "an API connection ended with an error"),
                None => tracing::debug!("an API connection closed: idle, or its headers too slow"),
                Some(Ok(())) => {}
            }
        });
    }
    graceful.shutdown().await;
    Ok(())
}

/// Repairs what a run that stopped abruptly left behind: deploys it was in the middle
/// of become Failed ("interrupted") and their builds are ended; revision directories
/// and artifacts that no revision owns are removed.
async fn recover(control: &Control) -> anyhow::Result<()> {
    let layout = &control.layout;
    // Where servers share the store, another server's deploys are its own business: a
    // server fails those of the apps it takes over, when it takes them.
    let interrupted = match control.fleet.shared.owners.is_shared() {
        true => Vec::new(),
        false => control.store.fail_interrupted_deploys(None).await?,
    };
    for (revision, _app) in interrupted {
        tracing::warn!(revision = %revision.id, "deploy was interrupted by a server stop; marked failed");
        supervisor::end_leftover(&layout.build_pid(revision.id), &layout.revision_code(revision.id));
        supervisor::end_leftover_build(&control.fleet.shared.sandbox, &revision.id.to_string());
    }
    let in_use = control.store.artifacts_in_use().await?;
    if let Ok(entries) = std::fs::read_dir(layout.artifacts()) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let digest = format!("sha256:{}", name.trim_end_matches(".tar.gz"));
            if !in_use.contains(&digest) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(layout.revisions()) {
        for entry in entries.flatten() {
            let id = entry.file_name().to_string_lossy().parse::<model::ids::RevisionId>();
            let known = match id {
                Ok(id) => control.store.revision(id).await?.is_some(),
                Err(_) => false,
            };
            if !known {
                control::remove_dir_logged(&entry.path()).await;
            }
        }
    }
    Ok(())
}

fn write_endpoints(layout: &Layout, api: SocketAddr, gateway: SocketAddr, tls: bool) -> anyhow::Result<()> {
    let scheme = if tls { "https" } else { "http" };
    let json = serde_json::json!({ "api": format!("http://{api}"), "gateway": format!("{scheme}://{gateway}") });
    let path = layout.endpoints();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, json.to_string()).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
