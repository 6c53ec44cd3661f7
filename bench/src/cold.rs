//! P2: what a cold start costs beyond the app's own time to become healthy.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use testkit::TestServer;

use crate::stats::Percentiles;

pub(crate) struct Cold {
    pub(crate) runs: u32,
    pub(crate) own: Percentiles,
    pub(crate) first_byte: Percentiles,
    /// The same, from a server started with `--sandbox none`.
    pub(crate) unconfined: Percentiles,
}

impl Cold {
    /// First byte of a cold call minus the app's own start, at p50.
    pub(crate) fn overhead(&self) -> Duration {
        self.first_byte.p50.saturating_sub(self.own.p50)
    }

    /// What the sandbox adds to a cold call, at p50.
    pub(crate) fn sandbox_cost(&self) -> Duration {
        self.first_byte.p50.saturating_sub(self.unconfined.p50)
    }
}

/// First byte of a call to an app with no runner, against the test app's own time
/// from process start to a passing health check (measured here by starting it by hand,
/// interleaved with the cold calls so both see the same machine), and against the same
/// call to `unconfined`, a server that runs its runners without a sandbox.
pub(crate) async fn cold_start(
    server: &TestServer,
    unconfined: &TestServer,
    testapp: &Path,
    runs: u32,
) -> anyhow::Result<Cold> {
    let client = reqwest::Client::new();
    let (mut own, mut first_byte, mut plain) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        own.push(own_time_to_healthy(&client, testapp).await?);
        let name = format!("cold{i}");
        first_byte.push(cold_call(&client, server, testapp, &name).await?);
        plain.push(cold_call(&client, unconfined, testapp, &name).await?);
    }
    let (own, first_byte, unconfined) = (Percentiles::of(own), Percentiles::of(first_byte), Percentiles::of(plain));
    Ok(Cold { runs, own, first_byte, unconfined })
}

/// First byte of a cold call to the same apps on `local` (runners as local processes)
/// and on `slurm` (runners as jobs of a Slurm cluster), alternating: p50 and p99 of each.
pub(crate) async fn cold_on_slurm(
    local: &TestServer,
    slurm: &TestServer,
    testapp: &Path,
    runs: u32,
) -> anyhow::Result<(Percentiles, Percentiles)> {
    let client = reqwest::Client::new();
    let (mut here, mut there) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let name = format!("cold{i}");
        here.push(cold_call(&client, local, testapp, &name).await?);
        there.push(cold_call(&client, slurm, testapp, &name).await?);
    }
    Ok((Percentiles::of(here), Percentiles::of(there)))
}

/// Deploys `name` with no runner and times its first call to the first byte.
async fn cold_call(
    client: &reqwest::Client,
    server: &TestServer,
    testapp: &Path,
    name: &str,
) -> anyhow::Result<Duration> {
    // Recreate starts no runner: the first call is a cold start. keep_alive 1 lets the
    // runner go soon, so the runs do not pile up runners.
    crate::deploy(server, testapp, name, "[scaling]\nkeep_alive = 1\n", &["--strategy", "recreate"])?;
    let start = Instant::now();
    let response = client.get(format!("{}/default/{name}/", server.gateway_url)).send().await?;
    let elapsed = start.elapsed();
    if !response.status().is_success() {
        bail!("cold call to {name} answered {}", response.status());
    }
    Ok(elapsed)
}

/// Starts the test app by hand and times it from spawn to its first passing health check.
pub(crate) async fn own_time_to_healthy(client: &reqwest::Client, testapp: &Path) -> anyhow::Result<Duration> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let start = Instant::now();
    let mut child = tokio::process::Command::new(testapp)
        .env("PORT", port.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let url = format!("http://127.0.0.1:{port}/health");
    let healthy = loop {
        if let Ok(r) = client.get(&url).send().await
            && r.status().is_success()
        {
            break start.elapsed();
        }
        if start.elapsed() > Duration::from_secs(10) {
            bail!("the test app did not become healthy");
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    };
    child.kill().await?;
    Ok(healthy)
}
