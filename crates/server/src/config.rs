//! Server settings. Each can be given as a flag, a `HANGAR_*` environment variable or a
//! key in the TOML file named by `--config`; a flag or variable wins over the file,
//! the file over the default.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;

/// `hangar server` flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServerArgs {
    /// Where the database, artifacts, revisions and the root key live
    /// [default: $XDG_DATA_HOME/hangar or ~/.local/share/hangar]
    #[arg(long, env = "HANGAR_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address of the control API and dashboard [default: 127.0.0.1:8700]
    #[arg(long, env = "HANGAR_API_ADDR")]
    pub api_addr: Option<SocketAddr>,
    /// Address of the gateway that serves calls to apps [default: 127.0.0.1:8701]
    #[arg(long, env = "HANGAR_GATEWAY_ADDR")]
    pub gateway_addr: Option<SocketAddr>,
    /// Database to use: the embedded SQLite store in the data dir (the default, or any
    /// `sqlite:` URL), or PostgreSQL (`postgres://user[:password]@host[:port]/db`); the data
    /// dir still holds artifacts, revisions and keys. One server per database for now
    /// (each server takes what is left in progress at its start as interrupted)
    #[arg(long, env = "HANGAR_DATABASE_URL")]
    pub database_url: Option<String>,
    /// A TOML file with any of these settings (keys as the flags, with '_' for '-')
    #[arg(long, env = "HANGAR_CONFIG")]
    pub config: Option<PathBuf>,
    /// Largest accepted upload, in bytes [default: 1 GiB]
    #[arg(long, env = "HANGAR_MAX_UPLOAD_BYTES")]
    pub max_upload_bytes: Option<u64>,
    /// Largest size an upload may unpack to, in bytes [default: 4 GiB]
    #[arg(long, env = "HANGAR_MAX_UNPACKED_BYTES")]
    pub max_unpacked_bytes: Option<u64>,
    /// Seconds a revision's build command may run [default: 1800]
    #[arg(long, env = "HANGAR_BUILD_TIMEOUT")]
    pub build_timeout: Option<u64>,
    /// Bytes of a build's output its log keeps; past that the log says where it was
    /// cut [default: 10 MiB]
    #[arg(long, env = "HANGAR_BUILD_LOG_LIMIT")]
    pub build_log_limit: Option<u64>,
    /// A machine type as NAME=CAPACITY (runners of it this server may run at once),
    /// repeatable or comma-separated; a type the config file has keeps its limits
    /// [default: cpu=4 × the number of CPUs]
    #[arg(long = "machine-type", env = "HANGAR_MACHINE_TYPES", value_delimiter = ',')]
    pub machine_types: Vec<String>,
    /// The GPUs runners may be given, as ID or ID=DEVICE, comma-separated, instead of
    /// the ones NVML finds [default: every GPU NVML finds]
    #[arg(long, env = "HANGAR_GPUS", value_delimiter = ',')]
    pub gpus: Vec<String>,
    /// Log format: text or json [default: text]
    #[arg(long, env = "HANGAR_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// PEM certificate chain for TLS on the gateway (with --tls-key)
    #[arg(long, env = "HANGAR_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS on the gateway (with --tls-cert)
    #[arg(long, env = "HANGAR_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Seconds a call may wait for a runner when it does not say (X-Hangar-Request-Timeout)
    /// [default: 300]
    #[arg(long, env = "HANGAR_START_TIMEOUT")]
    pub start_timeout: Option<f64>,
    /// Seconds a connection (API or gateway) may take to send a request's headers, from
    /// their first byte [default: 30]
    #[arg(long, env = "HANGAR_HEADER_READ_TIMEOUT")]
    pub header_read_timeout: Option<f64>,
    /// Seconds a connection (API or gateway) may wait for its next request, after an
    /// answer or when new, before it is closed [default: 60]
    #[arg(long, env = "HANGAR_IDLE_TIMEOUT")]
    pub idle_timeout: Option<f64>,
    /// Seconds an API request's body (an upload) may go without sending any data before
    /// it is dropped [default: 60]
    #[arg(long, env = "HANGAR_BODY_READ_TIMEOUT")]
    pub body_read_timeout: Option<f64>,
    /// Let webhooks go to loopback, link-local, private and this server's own addresses
    /// (refused by default: a caller of a public app could make the server call into its
    /// own machine or network)
    #[arg(long, env = "HANGAR_WEBHOOK_ALLOW_PRIVATE")]
    pub webhook_allow_private: bool,
    /// Serve /metrics to anyone, without a key (by default it takes one: the root key
    /// sees every series, a team's key its own apps')
    #[arg(long, env = "HANGAR_METRICS_PUBLIC")]
    pub metrics_public: bool,
    /// Seconds between health checks of a serving runner [default: 5]
    #[arg(long, env = "HANGAR_HEALTH_INTERVAL")]
    pub health_interval: Option<f64>,
    /// Failed health checks in a row after which a serving runner is replaced [default: 3]
    #[arg(long, env = "HANGAR_FAILURE_THRESHOLD")]
    pub failure_threshold: Option<u32>,
    /// Seconds of the first back-off after a failed runner start; it grows by this much
    /// each time, up to 10 minutes [default: 30]
    #[arg(long, env = "HANGAR_BACKOFF_BASE")]
    pub backoff_base: Option<f64>,
    /// Largest body a queue request may have (413 above), and largest result kept, in
    /// bytes [default: 16 MiB]
    #[arg(long, env = "HANGAR_QUEUE_MAX_PAYLOAD")]
    pub queue_max_payload: Option<u64>,
    /// Seconds a completed queue request's result is kept [default: 86400]
    #[arg(long, env = "HANGAR_QUEUE_RETENTION")]
    pub queue_retention: Option<f64>,
    /// Times a queue request may lose its runner before it fails [default: 3]
    #[arg(long, env = "HANGAR_QUEUE_MAX_ATTEMPTS")]
    pub queue_max_attempts: Option<u32>,
    /// How deployed code runs: bwrap (a sandbox per runner and build) or none (as the
    /// server's user, unconfined) [default: bwrap]
    #[arg(long, env = "HANGAR_SANDBOX")]
    pub sandbox: Option<String>,
    /// A host path that sandboxed code may read, at the same place (an interpreter
    /// outside /usr, for example); repeatable or comma-separated
    #[arg(long = "sandbox-ro-path", env = "HANGAR_SANDBOX_RO_PATHS", value_delimiter = ',')]
    pub sandbox_ro_paths: Vec<PathBuf>,
    /// Where runners run: local (processes of this server) or slurm (one job per runner
    /// on a Slurm cluster; see the config file's [slurm] section) [default: local]
    #[arg(long, env = "HANGAR_RUNNER_BACKEND")]
    pub runner_backend: Option<String>,
    /// The Slurm partition runners' jobs go to (the [slurm] section's partition)
    #[arg(long, env = "HANGAR_SLURM_PARTITION")]
    pub slurm_partition: Option<String>,
    /// Seconds an app's lease lasts where servers share a PostgreSQL store: a server
    /// that stops renewing it (it died) loses its apps to the others this long after
    /// its last renewal [default: 10]
    #[arg(long, env = "HANGAR_LEASE_TTL")]
    pub lease_ttl: Option<f64>,
    /// Seconds between the readings of the dashboard's charts (at least 1; the charts
    /// keep an hour of them) [default: 5]
    #[arg(long, env = "HANGAR_CHART_INTERVAL", hide = true)]
    pub chart_interval: Option<f64>,
}

/// The config file: the same settings as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    api_addr: Option<SocketAddr>,
    gateway_addr: Option<SocketAddr>,
    database_url: Option<String>,
    lease_ttl: Option<f64>,
    chart_interval: Option<f64>,
    max_upload_bytes: Option<u64>,
    max_unpacked_bytes: Option<u64>,
    build_timeout: Option<u64>,
    build_log_limit: Option<u64>,
    log_format: Option<String>,
    start_timeout: Option<f64>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    health_interval: Option<f64>,
    header_read_timeout: Option<f64>,
    idle_timeout: Option<f64>,
    body_read_timeout: Option<f64>,
    metrics_public: Option<bool>,
    webhook_allow_private: Option<bool>,
    failure_threshold: Option<u32>,
    backoff_base: Option<f64>,
    queue_max_payload: Option<u64>,
    queue_retention: Option<f64>,
    queue_max_attempts: Option<u32>,
    sandbox: Option<String>,
    #[serde(default)]
    sandbox_ro_paths: Vec<PathBuf>,
    #[serde(default)]
    machine_types: BTreeMap<String, MachineTypeConfig>,
    gpus: Option<Vec<String>>,
    runner_backend: Option<String>,
    slurm: Option<SlurmFileConfig>,
}

/// The `[slurm]` section.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SlurmFileConfig {
    partition: Option<String>,
    account: Option<String>,
    qos: Option<String>,
    #[serde(default)]
    extra_args: Vec<String>,
    server_url: Option<String>,
    launcher: Option<PathBuf>,
    node_dir: Option<PathBuf>,
}

/// Where runners run.
#[derive(Debug, Clone, PartialEq)]
pub enum RunnerBackendKind {
    /// Processes of this server.
    Local,
    /// Jobs of a Slurm cluster.
    Slurm(SlurmSection),
}

/// How runners become Slurm jobs.
#[derive(Debug, Clone, PartialEq)]
pub struct SlurmSection {
    pub settings: supervisor::slurm::SlurmSettings,
    /// The URL nodes reach this server's API at [default: http:// and the API address].
    pub server_url: Option<String>,
    /// The `hangar` binary on the nodes [default: this binary's path].
    pub launcher: Option<PathBuf>,
    /// Where the agent keeps code and caches on a node [default: /var/tmp/hangar-node].
    pub node_dir: PathBuf,
}

fn runner_backend(args: &ServerArgs, file: &mut FileConfig) -> anyhow::Result<RunnerBackendKind> {
    let section = file.slurm.take();
    match args.runner_backend.as_deref().or(file.runner_backend.as_deref()).unwrap_or("local") {
        "local" => Ok(RunnerBackendKind::Local),
        "slurm" => {
            let section = section.unwrap_or_default();
            let partition = args.slurm_partition.clone().or(section.partition).unwrap_or_default();
            if partition.trim().is_empty() {
                bail!("the Slurm runner backend needs a partition: [slurm] partition = \"…\" or --slurm-partition");
            }
            if let Some(url) = &section.server_url
                && !(url.starts_with("http://") || url.starts_with("https://"))
            {
                bail!("[slurm] server_url {url:?} must be an http:// or https:// URL");
            }
            if let Some(arg) = section.extra_args.iter().find(|a| !a.starts_with('-')) {
                bail!("[slurm] extra_args: {arg:?} is not an sbatch option (they start with -)");
            }
            Ok(RunnerBackendKind::Slurm(SlurmSection {
                settings: supervisor::slurm::SlurmSettings {
                    partition: partition.trim().to_owned(),
                    account: section.account,
                    qos: section.qos,
                    extra_args: section.extra_args,
                },
                server_url: section.server_url,
                launcher: section.launcher,
                node_dir: section.node_dir.unwrap_or_else(|| PathBuf::from("/var/tmp/hangar-node")),
            }))
        }
        other => bail!("runner backend {other:?} is not one of: local, slurm"),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct MachineTypeConfig {
    capacity: u32,
    memory_limit_mb: Option<u64>,
    cpus: Option<f64>,
    pids_limit: Option<u64>,
    gpus: Option<u32>,
    gpu_name: Option<String>,
}

/// A kind of machine runners can ask for, how many runners of it fit on this server,
/// and what each of them may use.
#[derive(Debug, Clone, PartialEq)]
pub struct MachineType {
    pub capacity: u32,
    pub memory_limit_mb: Option<u64>,
    /// CPUs' worth of time a runner may use (`1.5`); no limit when `None`.
    pub cpus: Option<f64>,
    /// Processes and threads a runner may have together.
    pub pids_limit: u64,
    /// Whole GPUs each runner of it holds, unless its manifest says `num_gpus`.
    pub gpus: u32,
    /// Its GPUs are ones whose name contains this (`H100`), when set.
    pub gpu_name: Option<String>,
}

impl MachineType {
    /// `capacity` runners at once, with no limits but the default one on processes.
    pub fn with_capacity(capacity: u32) -> MachineType {
        MachineType {
            capacity,
            memory_limit_mb: None,
            cpus: None,
            pids_limit: supervisor::DEFAULT_PIDS_LIMIT,
            gpus: 0,
            gpu_name: None,
        }
    }

    /// What a runner of this type may use, for its cgroup.
    pub fn limits(&self) -> supervisor::Limits {
        supervisor::Limits {
            memory: self.memory_limit_mb.map(|mb| mb.saturating_mul(1024 * 1024)),
            pids: Some(self.pids_limit),
            cpus: self.cpus,
        }
    }
}

/// The fewest processes a runner may be limited to: the sandbox itself takes a few.
const MIN_PIDS_LIMIT: u64 = 16;

fn machine_type(name: &str, m: MachineTypeConfig) -> anyhow::Result<MachineType> {
    if let Some(cpus) = m.cpus
        && !(cpus.is_finite() && (0.01..=100_000.0).contains(&cpus))
    {
        bail!("machine type {name:?}: cpus must be a number of CPUs of at least 0.01, got {cpus}");
    }
    if let Some(n) = m.pids_limit
        && n < MIN_PIDS_LIMIT
    {
        bail!("machine type {name:?}: pids_limit must be at least {MIN_PIDS_LIMIT}, got {n}");
    }
    Ok(MachineType {
        capacity: m.capacity,
        memory_limit_mb: m.memory_limit_mb,
        cpus: m.cpus,
        pids_limit: m.pids_limit.unwrap_or(supervisor::DEFAULT_PIDS_LIMIT),
        gpus: m.gpus.unwrap_or(0),
        gpu_name: m.gpu_name.map(|n| n.trim().to_owned()).filter(|n| !n.is_empty()),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The settings the server runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub api_addr: SocketAddr,
    pub gateway_addr: SocketAddr,
    pub max_upload_bytes: u64,
    pub max_unpacked_bytes: u64,
    pub build_timeout: Duration,
    pub build_log_limit: u64,
    pub machine_types: BTreeMap<String, MachineType>,
    pub log_format: LogFormat,
    pub start_timeout: Duration,
    pub health_interval: Duration,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub body_read_timeout: Duration,
    pub metrics_public: bool,
    pub webhook_allow_private: bool,
    pub failure_threshold: u32,
    pub backoff_base: Duration,
    /// Certificate chain and key files for TLS on the gateway.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub queue_max_payload: u64,
    pub queue_retention: Duration,
    pub queue_max_attempts: u32,
    pub sandbox: supervisor::SandboxMode,
    /// Host paths sandboxed code may read.
    pub sandbox_ro_paths: Vec<PathBuf>,
    /// The GPUs given instead of detecting them (`--gpus`); `None`: detect.
    pub gpus: Option<Vec<String>>,
    pub runner_backend: RunnerBackendKind,
    pub database: Database,
    /// How long an app's lease lasts without renewal, where servers share the store.
    pub lease_ttl: Duration,
    /// How often the dashboard's charts read the counters.
    pub chart_interval: Duration,
}

/// Where the data dir is when nobody says: `$XDG_DATA_HOME/hangar`, else
/// `~/.local/share/hangar`, else `./hangar-data`.
pub fn default_data_dir() -> PathBuf {
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(xdg).join("hangar");
    }
    match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(home) => PathBuf::from(home).join(".local/share/hangar"),
        None => PathBuf::from("hangar-data"),
    }
}

impl Config {
    /// How long a connection to either listener may sit idle, or take over a request's
    /// headers.
    pub fn connection_timeouts(&self) -> gateway::conn::Timeouts {
        gateway::conn::Timeouts { header_read: self.header_read_timeout, idle: self.idle_timeout }
    }

    pub fn load(args: &ServerArgs) -> anyhow::Result<Config> {
        let mut file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let runner_backend = runner_backend(args, &mut file)?;
        let database = match args.database_url.clone().or(file.database_url.take()) {
            None => Database::Embedded,
            Some(url) if url.starts_with("sqlite:") => Database::Embedded,
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => Database::Postgres(url),
            Some(url) => bail!(
                "database URL {:?} is not supported: use the embedded SQLite store (no URL, or sqlite:) or \
                 PostgreSQL (postgres://...)",
                redacted(&url)
            ),
        };
        let mut machine_types = BTreeMap::new();
        for (name, m) in file.machine_types {
            let machine = machine_type(&name, m)?;
            machine_types.insert(name, machine);
        }
        for spec in &args.machine_types {
            let (name, capacity) = parse_machine_type(spec)?;
            // The flag sets how many; the limits the file gives the type stay.
            machine_types.entry(name).or_insert_with(|| MachineType::with_capacity(capacity)).capacity = capacity;
        }
        if !machine_types.contains_key("cpu") {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
            machine_types.insert("cpu".to_owned(), MachineType::with_capacity(cpus.max(1) * 4));
        }
        for name in machine_types.keys() {
            model::manifest::validate_app_name(name)
                .map_err(|e| anyhow::anyhow!("machine type {name:?} is not a valid name: {e}"))?;
        }
        let log_format = match args.log_format.as_deref().or(file.log_format.as_deref()).unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => bail!("log format {other:?} is not one of: text, json"),
        };
        Ok(Config {
            data_dir: args.data_dir.clone().or(file.data_dir).unwrap_or_else(default_data_dir),
            api_addr: args.api_addr.or(file.api_addr).unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8700))),
            gateway_addr: args.gateway_addr.or(file.gateway_addr).unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8701))),
            max_upload_bytes: args.max_upload_bytes.or(file.max_upload_bytes).unwrap_or(1 << 30),
            max_unpacked_bytes: args.max_unpacked_bytes.or(file.max_unpacked_bytes).unwrap_or(4 << 30),
            build_timeout: Duration::from_secs(args.build_timeout.or(file.build_timeout).unwrap_or(1800)),
            build_log_limit: match args.build_log_limit.or(file.build_log_limit).unwrap_or(10 << 20) {
                0 => bail!("build_log_limit must be at least 1 byte"),
                n => n,
            },
            machine_types,
            log_format,
            start_timeout: seconds("start_timeout", args.start_timeout.or(file.start_timeout), 300.0)?,
            health_interval: seconds("health_interval", args.health_interval.or(file.health_interval), 5.0)?,
            header_read_timeout: seconds(
                "header_read_timeout",
                args.header_read_timeout.or(file.header_read_timeout),
                30.0,
            )?,
            idle_timeout: seconds("idle_timeout", args.idle_timeout.or(file.idle_timeout), 60.0)?,
            metrics_public: args.metrics_public || file.metrics_public.unwrap_or(false),
            webhook_allow_private: args.webhook_allow_private || file.webhook_allow_private.unwrap_or(false),
            body_read_timeout: seconds("body_read_timeout", args.body_read_timeout.or(file.body_read_timeout), 60.0)?,
            failure_threshold: args.failure_threshold.or(file.failure_threshold).unwrap_or(3).max(1),
            backoff_base: seconds("backoff_base", args.backoff_base.or(file.backoff_base), 30.0)?,
            tls: match (args.tls_cert.clone().or(file.tls_cert), args.tls_key.clone().or(file.tls_key)) {
                (Some(cert), Some(key)) => Some((cert, key)),
                (None, None) => None,
                _ => bail!("TLS needs both --tls-cert and --tls-key"),
            },
            queue_max_payload: match args.queue_max_payload.or(file.queue_max_payload).unwrap_or(16 << 20) {
                0 => bail!("queue_max_payload must be at least 1 byte"),
                n => n.min(1 << 32),
            },
            queue_retention: seconds("queue_retention", args.queue_retention.or(file.queue_retention), 86400.0)?,
            queue_max_attempts: match args.queue_max_attempts.or(file.queue_max_attempts).unwrap_or(3) {
                0 => bail!("queue_max_attempts must be at least 1"),
                n => n,
            },
            sandbox: args
                .sandbox
                .as_deref()
                .or(file.sandbox.as_deref())
                .unwrap_or("bwrap")
                .parse()
                .map_err(anyhow::Error::msg)?,
            gpus: if args.gpus.is_empty() { file.gpus } else { Some(args.gpus.clone()) },
            sandbox_ro_paths: if args.sandbox_ro_paths.is_empty() {
                file.sandbox_ro_paths
            } else {
                args.sandbox_ro_paths.clone()
            },
            runner_backend,
            database,
            lease_ttl: match seconds("lease_ttl", args.lease_ttl.or(file.lease_ttl), 10.0)? {
                ttl if ttl < Duration::from_millis(500) => bail!("lease_ttl must be at least 0.5 seconds"),
                ttl => ttl,
            },
            chart_interval: match seconds("chart_interval", args.chart_interval.or(file.chart_interval), 5.0)? {
                every if every < Duration::from_secs(1) => bail!("chart_interval must be at least 1 second"),
                every => every,
            },
        })
    }
}

/// Where the store keeps its tables.
#[derive(Clone, PartialEq, Eq)]
pub enum Database {
    /// SQLite in the data dir.
    Embedded,
    /// A PostgreSQL server, by its URL.
    Postgres(String),
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Database::Embedded => f.write_str("Embedded"),
            // The URL may hold a password, and the config is logged.
            Database::Postgres(url) => f.debug_tuple("Postgres").field(&redacted(url)).finish(),
        }
    }
}

/// A database URL without the password it may hold.
pub(crate) fn redacted(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else { return url.to_owned() };
    let rest = &url[scheme_end..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => match rest[..at].find(':') {
            Some(colon) => format!("{}{}:***{}", &url[..scheme_end], &rest[..colon], &rest[at..]),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// A setting in seconds, which must be positive and finite.
fn seconds(name: &str, value: Option<f64>, default: f64) -> anyhow::Result<Duration> {
    let value = value.unwrap_or(default);
    if !(value.is_finite() && value > 0.0 && value < 1e9) {
        bail!("{name} must be a positive number of seconds, got {value}");
    }
    Ok(Duration::from_secs_f64(value))
}

fn read_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("config file {} is invalid", path.display()))
}

fn parse_machine_type(spec: &str) -> anyhow::Result<(String, u32)> {
    let Some((name, capacity)) = spec.split_once('=') else {
        bail!("machine type {spec:?} must look like NAME=CAPACITY, e.g. cpu=8");
    };
    let capacity = capacity
        .trim()
        .parse::<u32>()
        .with_context(|| format!("machine type {spec:?}: capacity {capacity:?} is not a whole number"))?;
    Ok((name.trim().to_owned(), capacity))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_is_sqlite_by_default_or_postgres_by_url_and_nothing_else() {
        let load = |url: Option<&str>| {
            Config::load(&ServerArgs { database_url: url.map(str::to_owned), ..ServerArgs::default() })
                .map(|c| c.database)
                .map_err(|e| e.to_string())
        };
        assert_eq!(load(None), Ok(Database::Embedded));
        assert_eq!(load(Some("sqlite:hangar.db")), Ok(Database::Embedded));
        let url = "postgres://hangar:s3cret@db:5432/hangar";
        assert_eq!(load(Some(url)), Ok(Database::Postgres(url.to_owned())));
        assert_eq!(
            format!("{:?}", Database::Postgres(url.to_owned())),
            "Postgres(\"postgres://hangar:***@db:5432/hangar\")"
        );
        assert_eq!(load(Some("postgresql://db/hangar")), Ok(Database::Postgres("postgresql://db/hangar".to_owned())));
        let refused = load(Some("mysql://root:pw@db/hangar")).unwrap_err();
        assert!(refused.contains("\"mysql://root:***@db/hangar\" is not supported"), "{refused}");
    }

    #[test]
    fn a_machine_type_flag_sets_its_capacity_and_keeps_the_files_limits() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hangar.toml");
        std::fs::write(&file, "[machine_types.cpu]\ncapacity = 2\nmemory_limit_mb = 512\ncpus = 1.5\n").unwrap();
        let args = ServerArgs {
            config: Some(file),
            machine_types: vec!["cpu=8".to_owned(), "gpu=1".to_owned()],
            ..ServerArgs::default()
        };
        let config = Config::load(&args).unwrap();
        let cpu = &config.machine_types["cpu"];
        assert_eq!((cpu.capacity, cpu.memory_limit_mb, cpu.cpus), (8, Some(512), Some(1.5)));
        assert_eq!(config.machine_types["gpu"], MachineType::with_capacity(1));
    }

    #[test]
    fn gpus_come_from_the_flag_then_the_file_and_machine_types_say_how_many() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hangar.toml");
        std::fs::write(
            &file,
            "gpus = [\"0\", \"1\"]\n[machine_types.h100]\ncapacity = 2\ngpus = 2\ngpu_name = \" H100 \"\n",
        )
        .unwrap();
        let from_file = Config::load(&ServerArgs { config: Some(file.clone()), ..ServerArgs::default() }).unwrap();
        assert_eq!(from_file.gpus, Some(vec!["0".to_owned(), "1".to_owned()]));
        let h100 = &from_file.machine_types["h100"];
        assert_eq!((h100.gpus, h100.gpu_name.as_deref()), (2, Some("H100")));
        assert_eq!(from_file.machine_types["cpu"].gpus, 0);
        let args = ServerArgs { config: Some(file), gpus: vec!["g7".to_owned()], ..ServerArgs::default() };
        assert_eq!(Config::load(&args).unwrap().gpus, Some(vec!["g7".to_owned()]));
        assert_eq!(Config::load(&ServerArgs::default()).unwrap().gpus, None, "none given: detect");
    }

    #[test]
    fn the_runner_backend_and_its_slurm_section_are_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let load = |file: &str, flags: &[&str]| {
            let path = dir.path().join("hangar.toml");
            std::fs::write(&path, file).unwrap();
            let args = ServerArgs {
                config: Some(path),
                runner_backend: flags.first().map(|s| s.to_string()),
                slurm_partition: flags.get(1).map(|s| s.to_string()),
                ..ServerArgs::default()
            };
            Config::load(&args).map(|c| c.runner_backend).map_err(|e| format!("{e:#}"))
        };
        let slurm = |partition: &str, account: Option<&str>, extra: &[&str]| {
            RunnerBackendKind::Slurm(SlurmSection {
                settings: supervisor::slurm::SlurmSettings {
                    partition: partition.to_owned(),
                    account: account.map(str::to_owned),
                    qos: None,
                    extra_args: extra.iter().map(|s| s.to_string()).collect(),
                },
                server_url: None,
                launcher: None,
                node_dir: PathBuf::from("/var/tmp/hangar-node"),
            })
        };
        let cases: [(&str, &[&str], Result<RunnerBackendKind, &str>); 7] = [
            ("", &[], Ok(RunnerBackendKind::Local)),
            ("[slurm]\npartition = \"gpu\"\n", &[], Ok(RunnerBackendKind::Local)),
            (
                "runner_backend = \"slurm\"\n[slurm]\npartition = \"gpu\"\naccount = \"ml\"\nextra_args = [\"--time=1:00:00\"]\n",
                &[],
                Ok(slurm("gpu", Some("ml"), &["--time=1:00:00"])),
            ),
            // The flags win over the file.
            ("[slurm]\npartition = \"gpu\"\n", &["slurm", "debug"], Ok(slurm("debug", None, &[]))),
            ("", &["slurm"], Err("the Slurm runner backend needs a partition")),
            ("runner_backend = \"k8s\"\n", &[], Err("runner backend \"k8s\" is not one of: local, slurm")),
            (
                "[slurm]\npartition = \"gpu\"\nextra_args = [\"oops\"]\n",
                &["slurm"],
                Err("\"oops\" is not an sbatch option"),
            ),
        ];
        for (file, flags, want) in cases {
            match (load(file, flags), want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{file} {flags:?}"),
                (Err(got), Err(want)) => assert!(got.contains(want), "{file} {flags:?}: {got}"),
                (got, want) => panic!("{file} {flags:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn a_machine_types_limits_are_checked_and_given_to_its_runners() {
        let cases: [(&str, Result<supervisor::Limits, &str>); 6] = [
            (
                "capacity = 2",
                Ok(supervisor::Limits { memory: None, pids: Some(supervisor::DEFAULT_PIDS_LIMIT), cpus: None }),
            ),
            (
                "capacity = 2\nmemory_limit_mb = 512\ncpus = 1.5\npids_limit = 100",
                Ok(supervisor::Limits { memory: Some(512 << 20), pids: Some(100), cpus: Some(1.5) }),
            ),
            ("capacity = 2\ncpus = 0", Err("cpus must be a number of CPUs of at least 0.01, got 0")),
            ("capacity = 2\ncpus = -1.0", Err("cpus must be a number of CPUs of at least 0.01, got -1")),
            ("capacity = 2\ncpus = nan", Err("cpus must be a number of CPUs of at least 0.01, got NaN")),
            ("capacity = 2\npids_limit = 3", Err("pids_limit must be at least 16, got 3")),
        ];
        for (toml_text, want) in cases {
            let parsed: MachineTypeConfig = toml::from_str(toml_text).unwrap();
            let got = machine_type("small", parsed).map(|m| m.limits()).map_err(|e| e.to_string());
            match want {
                Ok(limits) => assert_eq!(got.as_ref(), Ok(&limits), "{toml_text}"),
                Err(message) => {
                    let error = got.unwrap_err();
                    assert!(error.starts_with("machine type \"small\": ") && error.ends_with(message), "{error}");
                }
            }
        }
    }
}
