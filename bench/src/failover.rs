//! P7: the failover window of several servers on one PostgreSQL store. Three servers
//! share a database of a private PostgreSQL cluster; an app made through the first runs
//! there with one runner kept up. Calls go through the second, one after another; the
//! first server is killed (SIGKILL), and the figure is the longest any call then took:
//! calls wait while no server runs the app (its lease runs out, another server takes it
//! and starts a runner) and are then served, so the longest wait is the window. Failed
//! calls are counted too. Each lease time is measured in fresh servers each round.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use testkit::TestServer;
use testkit::pg::PgCluster;

/// One lease time's rounds.
pub(crate) struct Failover {
    pub(crate) ttl_s: f64,
    pub(crate) windows: Vec<Duration>,
    pub(crate) failed: usize,
}

/// Lease times measured: the default, and a short one.
pub(crate) const TTLS: &[f64] = &[10.0, 2.0];

pub(crate) fn failover(hangar: &str, testapp: &Path, rounds: u32) -> anyhow::Result<Vec<Failover>> {
    let cluster = PgCluster::start();
    let mut all = Vec::new();
    for (t, ttl) in TTLS.iter().enumerate() {
        let mut figures = Failover { ttl_s: *ttl, windows: Vec::new(), failed: 0 };
        for round in 0..rounds {
            let url = cluster.create_database(&format!("failover_{t}_{round}"));
            let ttl = ttl.to_string();
            let flags = ["--database-url", url.as_str(), "--lease-ttl", ttl.as_str()];
            let mut a = TestServer::start_with(hangar, &flags);
            let b = a.join(&flags[2..]);
            let _c = a.join(&flags[2..]);
            crate::deploy(&a, testapp, "web", "[scaling]\nmin_concurrency = 1\n", &[])?;
            let (window, failed) = kill_and_time(&mut a, &b)?;
            eprintln!("P7: lease {ttl} s, round {}: {:.2} s, {failed} failed", round + 1, window.as_secs_f64());
            figures.windows.push(window);
            figures.failed += failed;
        }
        all.push(figures);
    }
    Ok(all)
}

/// Kills `owner` and calls through `other` until 20 calls in a row answer quickly;
/// returns the longest call and how many failed.
fn kill_and_time(owner: &mut TestServer, other: &TestServer) -> anyhow::Result<(Duration, usize)> {
    let http = testkit::Http::new();
    let url = format!("{}/default/web/", other.gateway_url);
    let served = Instant::now();
    while http.get(&url, None).status != 200 {
        if served.elapsed() > Duration::from_secs(60) {
            bail!("the app never answered through the second server");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    owner.kill();
    let killed = Instant::now();
    let (mut longest, mut failed, mut quick) = (Duration::ZERO, 0, 0);
    while quick < 20 {
        let sent = Instant::now();
        let status = http.get(&url, None).status;
        let took = sent.elapsed();
        longest = longest.max(took);
        if status != 200 {
            failed += 1;
        }
        quick = if status == 200 && took < Duration::from_millis(200) && longest > took { quick + 1 } else { 0 };
        if killed.elapsed() > Duration::from_secs(120) {
            bail!("the app was not taken over within 120 s");
        }
    }
    Ok((longest, failed))
}
