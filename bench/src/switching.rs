//! P3 and P4: how long switching revisions takes, and what operations do to the latency
//! of calls flowing meanwhile.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use testkit::TestServer;

use crate::cold::own_time_to_healthy;
use crate::stats::Percentiles;

/// Calls per second during the operations.
pub(crate) const RATE: u32 = 500;

pub(crate) struct Switching {
    pub(crate) steady_p95: Duration,
    /// Each operation: its name, the calls sent while it ran and their p95.
    pub(crate) during: Vec<(&'static str, usize, Duration)>,
    pub(crate) sent: usize,
    pub(crate) failed: usize,
    pub(crate) recreate: Percentiles,
    pub(crate) recreate_runs: usize,
    pub(crate) rolling: Percentiles,
    pub(crate) rolling_runs: usize,
    /// The target's own start-to-healthy time, which a rolling set-rev must wait out.
    pub(crate) own_start: Duration,
}

/// One call of the background load: when it was sent, how long it took, whether it
/// succeeded.
type Sample = (Instant, Duration, bool);

pub(crate) async fn switching(server: &TestServer, testapp: &Path) -> anyhow::Result<Switching> {
    let app = "switch";
    // Revision `v` of the app; the revisions differ only in an environment variable.
    let version = |v: u32| {
        format!(
            "env = {{ QUIET = \"1\", V = \"{v}\" }}\n[scaling]\nmin_concurrency = 2\nkeep_alive = 2\n\
             [runner]\nmax_multiplexing = 8\n"
        )
    };
    crate::deploy(server, testapp, app, &version(1), &[])?;
    let api = server.client();
    let v1 = api.list_revisions(app).await?[0].id.clone();
    crate::deploy(server, testapp, app, &version(2), &[])?;
    let v2 = api.list_revisions(app).await?[0].id.clone();

    let url = format!("{}/default/{app}/?delay_ms=5", server.gateway_url);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let load = tokio::spawn(load(url, stop_rx));

    // Each operation's window lasts at least a second from its start, so that it holds
    // enough calls for a p95 and takes in what follows the operation (draining).
    let mut windows: Vec<(&'static str, Instant, Instant)> = Vec::new();
    async fn settle(start: Instant) {
        tokio::time::sleep_until((start + Duration::from_secs(1)).into()).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    windows.push(("steady state", Instant::now() - Duration::from_secs(2), Instant::now()));

    // The deploy runs the CLI, a blocking child process, off the runtime's threads.
    let v3 = crate::app_dir(testapp, app, &version(3));
    let mut deploy = server.cli();
    deploy.args(["deploy", v3.path_str(), "--auth", "public"]);
    let start = Instant::now();
    let out = tokio::task::spawn_blocking(move || testkit::run_command(&mut deploy)).await?;
    if !out.success() {
        bail!("the rolling deploy failed: {}", out.stderr);
    }
    settle(start).await;
    windows.push(("rolling deploy", start, Instant::now()));

    let start = Instant::now();
    api.set_rev(app, &api::wire::SetRevRequest { revision: v1.clone(), strategy: None, auth: None, guard: false })
        .await?;
    settle(start).await;
    windows.push(("rolling set-rev", start, Instant::now()));

    let start = Instant::now();
    api.rollout(app, false).await?;
    wait_for(|| async { all_replaced(&api, app).await }).await?;
    settle(start).await;
    windows.push(("graceful rollout (until every runner is replaced)", start, Instant::now()));

    let start = Instant::now();
    api.set_rev(
        app,
        &api::wire::SetRevRequest { revision: v2.clone(), strategy: Some("recreate".into()), auth: None, guard: false },
    )
    .await?;
    settle(start).await;
    windows.push(("recreate set-rev", start, Instant::now()));

    let _ = stop_tx.send(true);
    let samples = load.await?;
    let p95_in = |from: Instant, to: Instant| {
        let in_window: Vec<Duration> =
            samples.iter().filter(|(t, _, _)| *t >= from && *t <= to).map(|(_, l, _)| *l).collect();
        (in_window.len(), Percentiles::of(in_window).p95)
    };
    let (_, steady_p95) = p95_in(windows[0].1, windows[0].2);
    let during = windows[1..]
        .iter()
        .map(|(name, from, to)| {
            let (n, p95) = p95_in(*from, *to);
            (*name, n, p95)
        })
        .collect();
    let failed = samples.iter().filter(|(_, _, ok)| !ok).count();

    // Switch times, without load, alternating between the two revisions.
    let (mut recreate, mut rolling) = (Vec::new(), Vec::new());
    for i in 0..40 {
        let target = if i % 2 == 0 { &v1 } else { &v2 };
        let request = api::wire::SetRevRequest {
            revision: target.clone(),
            strategy: Some("recreate".into()),
            auth: None,
            guard: false,
        };
        let start = Instant::now();
        api.set_rev(app, &request).await?;
        recreate.push(start.elapsed());
    }
    let client = reqwest::Client::new();
    let mut own = Vec::new();
    for i in 0..10 {
        own.push(own_time_to_healthy(&client, testapp).await?);
        let target = if i % 2 == 0 { &v1 } else { &v2 };
        let start = Instant::now();
        api.set_rev(
            app,
            &api::wire::SetRevRequest { revision: target.clone(), strategy: None, auth: None, guard: false },
        )
        .await?;
        rolling.push(start.elapsed());
    }
    Ok(Switching {
        steady_p95,
        during,
        sent: samples.len(),
        failed,
        recreate_runs: recreate.len(),
        recreate: Percentiles::of(recreate),
        rolling_runs: rolling.len(),
        rolling: Percentiles::of(rolling),
        own_start: Percentiles::of(own).p50,
    })
}

/// Calls `url` at [`RATE`] until told to stop.
async fn load(url: String, mut stop: tokio::sync::watch::Receiver<bool>) -> Vec<Sample> {
    let client = reqwest::Client::new();
    let mut calls = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(RATE)));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        let (client, url) = (client.clone(), url.clone());
        calls.spawn(async move {
            let sent = Instant::now();
            let ok = match client.get(&url).send().await {
                Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                Err(_) => false,
            };
            (sent, sent.elapsed(), ok)
        });
    }
    let mut samples = Vec::new();
    while let Some(Ok(sample)) = calls.join_next().await {
        samples.push(sample);
    }
    samples
}

async fn all_replaced(api: &api::client::Client, app: &str) -> anyhow::Result<bool> {
    let runners = api.runners(Some(app), &Default::default()).await?;
    Ok(!runners.iter().any(|r| r.replacing) && runners.iter().all(|r| r.state == "idle" || r.state == "running"))
}

async fn wait_for<F, Fut>(mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let start = Instant::now();
    while !check().await? {
        if start.elapsed() > Duration::from_secs(60) {
            bail!("timed out waiting");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
