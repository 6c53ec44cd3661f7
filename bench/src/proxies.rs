//! P1: one runner of the test app, called three ways (straight to its port, through
//! nginx as a reverse proxy, through hangar's gateway), loaded by `oha`: the most calls
//! per second each way, and latency at a fixed 1,000 calls per second.
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

pub(crate) struct Settings {
    pub(crate) oha: PathBuf,
    pub(crate) nginx: PathBuf,
    pub(crate) rounds: u32,
    pub(crate) seconds: u32,
}

/// What one contender did, as medians over the rounds.
#[derive(Debug, Clone)]
pub(crate) struct Figures {
    pub(crate) name: &'static str,
    pub(crate) max_rps: f64,
    pub(crate) p50: Duration,
    pub(crate) p99: Duration,
}

pub(crate) struct Proxies {
    pub(crate) rounds: u32,
    pub(crate) seconds: u32,
    /// Direct, nginx, hangar, in that order.
    pub(crate) figures: Vec<Figures>,
}

impl Proxies {
    pub(crate) fn get(&self, name: &str) -> &Figures {
        self.figures.iter().find(|f| f.name == name).expect("a measured contender")
    }
}

pub(crate) async fn compare(server: &TestServer, testapp: &Path, settings: &Settings) -> anyhow::Result<Proxies> {
    crate::deploy(
        server,
        testapp,
        "bench",
        "env = { QUIET = \"1\" }\n[scaling]\nmin_concurrency = 1\nmax_concurrency = 1\n\
         [runner]\nmax_multiplexing = 1024\n",
        &[],
    )?;
    let via_gateway = format!("{}/default/bench/", server.gateway_url);
    let env: serde_json::Value = reqwest::get(format!("{via_gateway}env")).await?.json().await?;
    let port: u16 = env["PORT"].as_str().context("the runner has no PORT")?.parse()?;
    let nginx = Nginx::start(&settings.nginx, port)?;
    let targets = [
        ("direct", format!("http://127.0.0.1:{port}/")),
        ("nginx", format!("http://{}/", nginx.addr)),
        ("hangar", via_gateway),
    ];
    // Warm every path.
    for (_, url) in &targets {
        oha(&settings.oha, url, &["-n", "2000", "-c", "8"])?;
    }
    let mut samples: Vec<(Vec<f64>, Vec<Duration>, Vec<Duration>)> = vec![Default::default(); targets.len()];
    let secs = format!("{}s", settings.seconds);
    for round in 0..settings.rounds as usize {
        for k in 0..targets.len() {
            let i = (k + round) % targets.len();
            let url = &targets[i].1;
            let max = oha(&settings.oha, url, &["-z", &secs, "-c", &CONNECTIONS.to_string()])?;
            let fixed = oha(
                &settings.oha,
                url,
                &["-z", &secs, "-c", "16", "-q", &FIXED_RATE.to_string(), "--latency-correction"],
            )?;
            samples[i].0.push(max.rps);
            samples[i].1.push(fixed.p50);
            samples[i].2.push(fixed.p99);
        }
    }
    drop(nginx);
    let figures = targets
        .iter()
        .zip(samples)
        .map(|((name, _), (rps, p50, p99))| Figures {
            name,
            max_rps: median_f64(rps),
            p50: median(p50),
            p99: median(p99),
        })
        .collect();
    Ok(Proxies { rounds: settings.rounds, seconds: settings.seconds, figures })
}

struct Run {
    rps: f64,
    p50: Duration,
    p99: Duration,
}

/// Runs oha against `url` and reads its JSON summary. A run with any failed call fails.
fn oha(oha: &Path, url: &str, args: &[&str]) -> anyhow::Result<Run> {
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
    Ok(Run {
        rps: summary["requestsPerSec"].as_f64().unwrap_or(0.0),
        p50: seconds(&json["latencyPercentiles"]["p50"]),
        p99: seconds(&json["latencyPercentiles"]["p99"]),
    })
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

fn median_f64(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// nginx from the system, as a reverse proxy to the runner: keep-alive connections to
/// it, no access log, one worker per core; the usual production settings.
struct Nginx {
    child: Child,
    addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl Nginx {
    fn start(nginx: &Path, upstream_port: u16) -> anyhow::Result<Nginx> {
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let prefix = dir.path().display();
        let config = format!(
            "worker_processes auto;\n\
             error_log {prefix}/error.log warn;\n\
             pid {prefix}/nginx.pid;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n\
               access_log off;\n\
               client_body_temp_path {prefix}/body;\n\
               proxy_temp_path {prefix}/proxy;\n\
               fastcgi_temp_path {prefix}/fastcgi;\n\
               uwsgi_temp_path {prefix}/uwsgi;\n\
               scgi_temp_path {prefix}/scgi;\n\
               upstream runner {{ server 127.0.0.1:{upstream_port}; keepalive 128; }}\n\
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
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGQUIT is nginx's graceful stop; its workers go with the master.
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGQUIT);
        let _ = self.child.wait();
    }
}
