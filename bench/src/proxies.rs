//! P1: one runner of the test app, called three ways (straight to its port, through
//! nginx as a reverse proxy, through hangar's gateway), loaded by `oha`: the most calls
//! per second each way, and latency at a fixed 1,000 calls per second. During the
//! throughput runs it also reads the proxy's CPU time from `/proc`, per call: a figure
//! the other work on a shared machine moves far less than calls per second.
//!
//! The three are measured in rounds, the order rotating each round, and each figure is
//! the median over the rounds, so that a noisy moment on this shared machine does not
//! land on one contender only.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use testkit::TestServer;

/// Calls per second of the fixed-rate latency runs.
pub(crate) const FIXED_RATE: u32 = 1000;
/// Connections of the throughput runs.
pub(crate) const CONNECTIONS: u32 = 32;

/// The load generators and nginx of both parts of P1, and how long each measures.
pub(crate) struct Settings {
    pub(crate) oha: PathBuf,
    /// Only the fast runner's part uses wrk.
    pub(crate) wrk: PathBuf,
    pub(crate) nginx: PathBuf,
    pub(crate) rounds: u32,
    pub(crate) seconds: u32,
}

/// What one contender did, as medians over the rounds.
#[derive(Debug, Clone)]
pub(crate) struct Figures {
    pub(crate) name: &'static str,
    pub(crate) max_rps: f64,
    /// User and system CPU time of the proxy's processes per call, in the throughput runs
    /// (none for direct calls).
    pub(crate) cpu_per_call: Option<Cpu>,
    pub(crate) p50: Duration,
    pub(crate) p99: Duration,
}

pub(crate) struct Proxies {
    pub(crate) rounds: u32,
    pub(crate) seconds: u32,
    /// Direct, nginx, hangar, in that order.
    pub(crate) figures: Vec<Figures>,
}

/// CPU time per call, split as the kernel accounts it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cpu {
    pub(crate) user: Duration,
    pub(crate) system: Duration,
}

impl Cpu {
    pub(crate) fn total(&self) -> Duration {
        self.user + self.system
    }
}

impl Proxies {
    pub(crate) fn get(&self, name: &str) -> &Figures {
        self.figures.iter().find(|f| f.name == name).expect("a measured contender")
    }
}

/// The name of the figures of the gateway in front of a sandboxed runner.
pub(crate) const SANDBOXED: &str = "hangar, sandboxed runner";

/// The runner of `unconfined` (a server started with `--sandbox none`, whose runner
/// listens on the machine's loopback) called straight, through nginx and through that
/// server's gateway; and the same app on `sandboxed`, whose runner only its gateway can
/// reach.
pub(crate) async fn compare(
    unconfined: &TestServer,
    sandboxed: &TestServer,
    testapp: &Path,
    settings: &Settings,
) -> anyhow::Result<Proxies> {
    for server in [unconfined, sandboxed] {
        crate::deploy(
            server,
            testapp,
            "bench",
            "env = { QUIET = \"1\" }\n[scaling]\nmin_concurrency = 1\nmax_concurrency = 1\n\
             [runner]\nmax_multiplexing = 1024\n",
            &[],
        )?;
    }
    let via_gateway = format!("{}/default/bench/", unconfined.gateway_url);
    let via_sandboxed = format!("{}/default/bench/", sandboxed.gateway_url);
    let env: serde_json::Value = reqwest::get(format!("{via_gateway}env")).await?.json().await?;
    let port: u16 = env["PORT"].as_str().context("the runner has no PORT")?.parse()?;
    let nginx = Nginx::start(&settings.nginx, port, "auto")?;
    let urls = [format!("http://127.0.0.1:{port}/"), format!("http://{}/", nginx.addr), via_gateway, via_sandboxed];
    // Warm every path (which also has nginx's workers running by the time they are listed).
    for url in &urls {
        oha(&settings.oha, url, &["-n", "2000", "-c", "8"])?;
    }
    let hangar_pid = unconfined.pid().context("the server is not running")?;
    let sandboxed_pid = sandboxed.pid().context("the sandboxed server is not running")?;
    let [direct, via_nginx, via_hangar, via_sandboxed] = urls;
    let targets = [
        ("direct", direct, vec![]),
        ("nginx", via_nginx, nginx.pids()),
        ("hangar", via_hangar, vec![hangar_pid]),
        (SANDBOXED, via_sandboxed, vec![sandboxed_pid]),
    ];
    let mut samples: Vec<Samples> = vec![Default::default(); targets.len()];
    let secs = format!("{}s", settings.seconds);
    for round in 0..settings.rounds as usize {
        for k in 0..targets.len() {
            let i = (k + round) % targets.len();
            let (_, url, pids) = &targets[i];
            let before = cpu_ticks(pids)?;
            let max = oha(&settings.oha, url, &["-z", &secs, "-c", &CONNECTIONS.to_string()])?;
            let after = cpu_ticks(pids)?;
            let fixed = oha(
                &settings.oha,
                url,
                &["-z", &secs, "-c", "16", "-q", &FIXED_RATE.to_string(), "--latency-correction"],
            )?;
            samples[i].rps.push(max.rps);
            if !pids.is_empty() {
                samples[i].cpu.push(per_call(before, after, max.calls));
            }
            samples[i].p50.push(fixed.p50);
            samples[i].p99.push(fixed.p99);
        }
    }
    drop(nginx);
    let figures = targets
        .iter()
        .zip(samples)
        .map(|((name, _, _), s)| Figures {
            name,
            max_rps: median_f64(s.rps),
            cpu_per_call: (!s.cpu.is_empty()).then(|| Cpu {
                user: median(s.cpu.iter().map(|c| c.user).collect()),
                system: median(s.cpu.iter().map(|c| c.system).collect()),
            }),
            p50: median(s.p50),
            p99: median(s.p99),
        })
        .collect();
    Ok(Proxies { rounds: settings.rounds, seconds: settings.seconds, figures })
}

#[derive(Clone, Default)]
struct Samples {
    rps: Vec<f64>,
    cpu: Vec<Cpu>,
    p50: Vec<Duration>,
    p99: Vec<Duration>,
}

/// User and system clock ticks used so far by the processes `pids`, from `/proc`.
pub(crate) fn cpu_ticks(pids: &[u32]) -> anyhow::Result<(u64, u64)> {
    let mut total = (0, 0);
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // The fields after the command name, which is in parentheses and may hold spaces:
        // utime and stime are the 14th and 15th of the line, so the 12th and 13th here.
        let rest = stat.rsplit_once(')').context("a malformed /proc stat line")?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field =
            |i: usize| -> anyhow::Result<u64> { Ok(fields.get(i).context("a short /proc stat line")?.parse()?) };
        total.0 += field(11)?;
        total.1 += field(12)?;
    }
    Ok(total)
}

pub(crate) fn per_call(before: (u64, u64), after: (u64, u64), calls: u64) -> Cpu {
    let ticks_per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
    let each = |ticks: u64| Duration::from_secs_f64(ticks as f64 / ticks_per_second / calls.max(1) as f64);
    Cpu { user: each(after.0 - before.0), system: each(after.1 - before.1) }
}

pub(crate) struct Run {
    pub(crate) rps: f64,
    pub(crate) calls: u64,
    pub(crate) p50: Duration,
    pub(crate) p99: Duration,
}

/// Runs oha against `url` and reads its JSON summary. A run with any failed call fails.
pub(crate) fn oha(oha: &Path, url: &str, args: &[&str]) -> anyhow::Result<Run> {
    let out = Command::new(oha)
        .args(args)
        .args(["--no-tui", "-w", "--output-format", "json", url])
        .output()
        .with_context(|| format!("cannot run {}", oha.display()))?;
    if !out.status.success() {
        bail!("oha {} {url} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("oha's output is not JSON: {}", String::from_utf8_lossy(&out.stdout)))?;
    let summary = &json["summary"];
    let rate = summary["successRate"].as_f64().unwrap_or(0.0);
    if rate < 1.0 {
        bail!("{url}: only {:.4} of the calls succeeded: {}", rate, json["statusCodeDistribution"]);
    }
    let seconds = |v: &serde_json::Value| Duration::from_secs_f64(v.as_f64().unwrap_or(0.0));
    let calls = json["statusCodeDistribution"]
        .as_object()
        .map_or(0, |codes| codes.values().filter_map(serde_json::Value::as_u64).sum());
    Ok(Run {
        rps: summary["requestsPerSec"].as_f64().unwrap_or(0.0),
        calls,
        p50: seconds(&json["latencyPercentiles"]["p50"]),
        p99: seconds(&json["latencyPercentiles"]["p99"]),
    })
}

pub(crate) fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

pub(crate) fn median_f64(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// nginx from the system, as a reverse proxy to the runner: keep-alive connections to
/// it, no access log, `workers` workers (`auto`: one per core); the usual production
/// settings, with no limit on calls per connection that would make the load reconnect.
pub(crate) struct Nginx {
    child: Child,
    pub(crate) addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl Nginx {
    pub(crate) fn start(nginx: &Path, upstream_port: u16, workers: &str) -> anyhow::Result<Nginx> {
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let prefix = dir.path().display();
        let config = format!(
            "worker_processes {workers};\n\
             worker_rlimit_nofile 65536;\n\
             error_log {prefix}/error.log warn;\n\
             pid {prefix}/nginx.pid;\n\
             events {{ worker_connections 16384; }}\n\
             http {{\n\
               access_log off;\n\
               keepalive_requests 1000000;\n\
               client_body_temp_path {prefix}/body;\n\
               proxy_temp_path {prefix}/proxy;\n\
               fastcgi_temp_path {prefix}/fastcgi;\n\
               uwsgi_temp_path {prefix}/uwsgi;\n\
               scgi_temp_path {prefix}/scgi;\n\
               upstream runner {{ server 127.0.0.1:{upstream_port}; keepalive 128; keepalive_requests 1000000; }}\n\
               server {{\n\
                 listen {addr};\n\
                 location / {{\n\
                   proxy_pass http://runner;\n\
                   proxy_http_version 1.1;\n\
                   proxy_set_header Connection \"\";\n\
                 }}\n\
               }}\n\
             }}\n"
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, config)?;
        let child = Command::new(nginx)
            .args(["-p", &prefix.to_string(), "-c", &path.display().to_string(), "-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", nginx.display()))?;
        let nginx = Nginx { child, addr, _dir: dir };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            if std::time::Instant::now() > deadline {
                bail!("nginx did not start listening on {addr}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(nginx)
    }

    /// The master process and its workers.
    pub(crate) fn pids(&self) -> Vec<u32> {
        let master = self.child.id();
        let children = std::fs::read_to_string(format!("/proc/{master}/task/{master}/children")).unwrap_or_default();
        std::iter::once(master).chain(children.split_whitespace().filter_map(|p| p.parse().ok())).collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGQUIT is nginx's graceful stop; its workers go with the master.
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGQUIT);
        let _ = self.child.wait();
    }
}
