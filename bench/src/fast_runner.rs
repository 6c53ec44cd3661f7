//! P1 with a fast runner: nginx serving a small static file (`examples/static-nginx`),
//! deployed as a hangar app, called straight, through nginx as a reverse proxy (one
//! worker, and one per core) and through hangar's gateway. A runner this fast leaves the
//! proxy's own cost per call to show: the slower the runner, the less it does.
//!
//! Each contender is loaded by both `wrk` and `oha`, at 32 and 256 connections, in
//! rounds whose order rotates; each figure is the median over the rounds. The proxy's
//! CPU time per call is read from `/proc`. Then latency at a fixed 1,000 calls per
//! second, and what holding 10,000 idle keep-alive connections costs each proxy: memory
//! per connection, and calls per second from 32 busy connections meanwhile.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use testkit::TestServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::proxies::{Cpu, FIXED_RATE, Nginx, Settings, cpu_ticks, median, median_f64, oha, per_call};

/// The connection counts of the throughput runs.
pub(crate) const CONNECTIONS: [u32; 2] = [32, 256];
/// Idle keep-alive connections held in the last part.
pub(crate) const IDLE: usize = 10_000;

/// One contender's figures, medians over the rounds.
#[derive(Debug, Clone)]
pub(crate) struct Contender {
    pub(crate) name: &'static str,
    /// By load generator and connections.
    pub(crate) loads: Vec<Load>,
    pub(crate) p50: Duration,
    pub(crate) p99: Duration,
}

#[derive(Debug, Clone)]
pub(crate) struct Load {
    pub(crate) tool: &'static str,
    pub(crate) connections: u32,
    pub(crate) rps: f64,
    /// The proxy's CPU time per call (none for direct calls).
    pub(crate) cpu: Option<Cpu>,
}

impl Contender {
    pub(crate) fn load(&self, tool: &str, connections: u32) -> &Load {
        self.loads.iter().find(|l| l.tool == tool && l.connections == connections).expect("a measured load")
    }
}

/// Holding idle connections: what each proxy's memory grew by, per connection, and
/// calls per second from 32 busy connections with and without them.
#[derive(Debug, Clone)]
pub(crate) struct Idle {
    pub(crate) name: &'static str,
    pub(crate) bytes_per_connection: f64,
    pub(crate) rps_alone: f64,
    pub(crate) rps_holding: f64,
}

pub(crate) struct FastRunner {
    pub(crate) rounds: u32,
    pub(crate) seconds: u32,
    pub(crate) contenders: Vec<Contender>,
    pub(crate) idle: Vec<Idle>,
}

impl FastRunner {
    pub(crate) fn get(&self, name: &str) -> &Contender {
        self.contenders.iter().find(|c| c.name == name).expect("a measured contender")
    }
}

pub(crate) const NGINX_ONE: &str = "nginx, 1 worker";
pub(crate) const NGINX_AUTO: &str = "nginx, a worker per core";

/// The app directory of the fast runner.
fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/static-nginx")
}

/// Measures the fast runner on `unconfined`, a server started with `--sandbox none` (its
/// runner listens on the machine's loopback, where nginx and the load reach it).
pub(crate) async fn compare(unconfined: &TestServer, settings: &Settings) -> anyhow::Result<FastRunner> {
    let dir = example();
    let out = unconfined.run(&["deploy", dir.to_str().context("a non-UTF-8 path")?, "--auth", "public"]);
    if !out.success() {
        bail!("deploy of the static-nginx example failed: {}", out.stderr);
    }
    let out = unconfined.run(&["apps", "scale", "static-nginx", "--min-concurrency", "1", "--keep-alive", "3600"]);
    if !out.success() {
        bail!("scaling static-nginx failed: {}", out.stderr);
    }
    let via_hangar = format!("{}/default/static-nginx/", unconfined.gateway_url);
    let port: u16 = reqwest::get(format!("{via_hangar}port")).await?.text().await?.trim().parse()?;
    let one = Nginx::start(&settings.nginx, port, "1")?;
    let auto = Nginx::start(&settings.nginx, port, "auto")?;
    let urls = [
        format!("http://127.0.0.1:{port}/"),
        format!("http://{}/", one.addr),
        format!("http://{}/", auto.addr),
        via_hangar,
    ];
    for url in &urls {
        oha(&settings.oha, url, &["-n", "2000", "-c", "8"])?;
    }
    let hangar_pid = unconfined.pid().context("the server is not running")?;
    let [direct, via_one, via_auto, via_hangar] = urls;
    let targets = [
        ("direct", direct, vec![]),
        (NGINX_ONE, via_one, one.pids()),
        (NGINX_AUTO, via_auto, auto.pids()),
        ("hangar", via_hangar, vec![hangar_pid]),
    ];
    let loads: Vec<(&'static str, u32)> =
        ["wrk", "oha"].into_iter().flat_map(|tool| CONNECTIONS.map(|c| (tool, c))).collect();
    // samples[contender][load]: calls/s and CPU per call, one per round.
    let mut rps = vec![vec![Vec::new(); loads.len()]; targets.len()];
    let mut cpu = vec![vec![Vec::new(); loads.len()]; targets.len()];
    let (mut p50, mut p99) = (vec![Vec::new(); targets.len()], vec![Vec::new(); targets.len()]);
    let secs = settings.seconds;
    for round in 0..settings.rounds as usize {
        for k in 0..targets.len() {
            let i = (k + round) % targets.len();
            let (_, url, pids) = &targets[i];
            for (j, (tool, connections)) in loads.iter().enumerate() {
                let before = cpu_ticks(pids)?;
                let (calls, per_s) = match *tool {
                    "wrk" => wrk(&settings.wrk, url, *connections, secs)?,
                    _ => {
                        let run =
                            oha(&settings.oha, url, &["-z", &format!("{secs}s"), "-c", &connections.to_string()])?;
                        (run.calls, run.rps)
                    }
                };
                let after = cpu_ticks(pids)?;
                rps[i][j].push(per_s);
                if !pids.is_empty() {
                    cpu[i][j].push(per_call(before, after, calls));
                }
            }
            let fixed = oha(
                &settings.oha,
                url,
                &["-z", &format!("{secs}s"), "-c", "16", "-q", &FIXED_RATE.to_string(), "--latency-correction"],
            )?;
            p50[i].push(fixed.p50);
            p99[i].push(fixed.p99);
        }
    }
    let contenders = targets
        .iter()
        .enumerate()
        .map(|(i, (name, _, _))| Contender {
            name,
            loads: loads
                .iter()
                .enumerate()
                .map(|(j, (tool, connections))| Load {
                    tool,
                    connections: *connections,
                    rps: median_f64(rps[i][j].clone()),
                    cpu: (!cpu[i][j].is_empty()).then(|| Cpu {
                        user: median(cpu[i][j].iter().map(|c| c.user).collect()),
                        system: median(cpu[i][j].iter().map(|c| c.system).collect()),
                    }),
                })
                .collect(),
            p50: median(p50[i].clone()),
            p99: median(p99[i].clone()),
        })
        .collect();

    let mut idle = Vec::new();
    for (name, addr, path, pids) in [
        (
            "hangar",
            unconfined.gateway_url.trim_start_matches("http://").to_owned(),
            "/default/static-nginx/",
            vec![hangar_pid],
        ),
        (NGINX_AUTO, auto.addr.to_string(), "/", auto.pids()),
    ] {
        let url = format!("http://{addr}{path}");
        let (_, rps_alone) = wrk(&settings.wrk, &url, 32, secs)?;
        let before = rss(&pids)?;
        let held = hold(&addr, path, IDLE).await?;
        let grown = rss(&pids)?.saturating_sub(before);
        let (_, rps_holding) = wrk(&settings.wrk, &url, 32, secs)?;
        drop(held);
        idle.push(Idle { name, bytes_per_connection: grown as f64 / IDLE as f64, rps_alone, rps_holding });
    }
    Ok(FastRunner { rounds: settings.rounds, seconds: settings.seconds, contenders, idle })
}

/// Runs `wrk -t1` against `url` and reads its summary: calls made, and calls per second.
/// A run with any failed call or socket error fails.
fn wrk(wrk: &Path, url: &str, connections: u32, seconds: u32) -> anyhow::Result<(u64, f64)> {
    let out = Command::new(wrk)
        .args(["-t1", &format!("-c{connections}"), &format!("-d{seconds}s"), url])
        .output()
        .with_context(|| format!("cannot run {}", wrk.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.contains("Non-2xx") || text.contains("Socket errors") {
        bail!("wrk -c{connections} {url} failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    let calls = text
        .lines()
        .find_map(|l| l.trim().strip_suffix("read").and_then(|l| l.split_whitespace().next()?.parse().ok()))
        .context("wrk printed no call count")?;
    let per_s = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:").and_then(|v| v.trim().parse().ok()))
        .context("wrk printed no calls per second")?;
    Ok((calls, per_s))
}

/// Resident memory of the processes `pids`, in bytes.
fn rss(pids: &[u32]) -> anyhow::Result<u64> {
    let mut total = 0;
    for pid in pids {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmRSS in /proc status")?;
        total += kib * 1024;
    }
    Ok(total)
}

/// Opens `n` connections to `addr`, makes one call on each so that each is a kept-alive
/// connection that has served, and returns them open and idle.
async fn hold(addr: &str, path: &str, n: usize) -> anyhow::Result<Vec<tokio::net::TcpStream>> {
    let request = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\n\r\n");
    let mut held = Vec::with_capacity(n);
    let mut opening = tokio::task::JoinSet::new();
    for i in 0..n {
        let (addr, request) = (addr.to_owned(), request.clone());
        opening.spawn(async move {
            let mut stream = tokio::net::TcpStream::connect(&addr).await?;
            stream.write_all(request.as_bytes()).await?;
            let mut answer = Vec::new();
            let mut buf = [0u8; 4096];
            // The static file's answer is small: its head and body come in one read.
            while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
                let read = stream.read(&mut buf).await?;
                if read == 0 {
                    anyhow::bail!("the connection closed before its answer");
                }
                answer.extend_from_slice(&buf[..read]);
            }
            anyhow::Ok(stream)
        });
        if opening.len() >= 64 || i + 1 == n {
            while let Some(opened) = opening.join_next().await {
                held.push(opened??);
            }
        }
    }
    Ok(held)
}
