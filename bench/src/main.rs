//! The gateway benchmark: how much latency the gateway adds over calling a runner
//! directly, and how much a cold start costs beyond the app's own time to become
//! healthy. Both are measured in one run against the real server and the real test
//! app, as differences to a baseline taken in the same run, because this machine is
//! shared and absolute figures drift.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use testkit::{AppDir, TestServer};

struct Args {
    hangar: String,
    out: Option<PathBuf>,
    rate: u32,
    seconds: u32,
    cold_starts: u32,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args =
        Args { hangar: "target/release/hangar".to_owned(), out: None, rate: 200, seconds: 10, cold_starts: 10 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--hangar" => args.hangar = value()?,
            "--out" => args.out = Some(PathBuf::from(value()?)),
            "--rate" => args.rate = value()?.parse()?,
            "--seconds" => args.seconds = value()?.parse()?,
            "--cold-starts" => args.cold_starts = value()?.parse()?,
            other => {
                bail!("unknown flag {other}; flags: --hangar PATH --out FILE --rate N --seconds N --cold-starts N")
            }
        }
    }
    Ok(args)
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let hangar = std::fs::canonicalize(&args.hangar).with_context(|| format!("no hangar binary at {}", args.hangar))?;
    let hangar = hangar.to_str().context("path is not UTF-8")?.to_owned();
    let testapp = testkit::testapp_bin(&hangar);
    let server = TestServer::start_with(&hangar, &["--machine-type", "cpu=64"]);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;

    let latency = runtime.block_on(added_latency(&server, &testapp, args.rate, args.seconds))?;
    let cold = runtime.block_on(cold_start(&server, &testapp, args.cold_starts))?;
    let switching = runtime.block_on(switching(&server, &testapp))?;

    let mut report = render(&args, &latency, &cold);
    report.push_str(&render_switching(&switching));
    print!("{report}");
    if let Some(out) = &args.out {
        std::fs::write(out, &report).with_context(|| format!("cannot write {}", out.display()))?;
    }
    Ok(())
}

fn deploy(
    server: &TestServer,
    testapp: &std::path::Path,
    name: &str,
    extra: &str,
    flags: &[&str],
) -> anyhow::Result<()> {
    let app = AppDir::new(&format!("name = \"{name}\"\ncommand = [{:?}]\n{extra}", testapp.display().to_string()));
    let out = server.run(&[&["deploy", app.path_str(), "--auth", "public"], flags].concat());
    if !out.success() {
        bail!("deploy of {name} failed: {}", out.stderr);
    }
    Ok(())
}

struct Latency {
    pairs: usize,
    direct: Percentiles,
    gateway: Percentiles,
    added: Percentiles,
}

#[derive(Clone, Copy)]
struct Percentiles {
    p50: Duration,
    p99: Duration,
}

fn percentiles(mut samples: Vec<Duration>) -> Percentiles {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    Percentiles { p50: at(0.5), p99: at(0.99) }
}

/// Calls the same runner directly and through the gateway, alternately, at a fixed
/// rate; each pair is measured back to back so both see the same machine.
async fn added_latency(
    server: &TestServer,
    testapp: &std::path::Path,
    rate: u32,
    seconds: u32,
) -> anyhow::Result<Latency> {
    deploy(
        server,
        testapp,
        "bench",
        "[scaling]\nmin_concurrency = 1\nmax_concurrency = 1\n[runner]\nmax_multiplexing = 64\n",
        &[],
    )?;
    let client = reqwest::Client::builder().pool_max_idle_per_host(4).build()?;
    let via_gateway = format!("{}/default/bench/", server.gateway_url);
    let env: serde_json::Value = client.get(format!("{via_gateway}env")).send().await?.json().await?;
    let port = env["PORT"].as_str().context("the runner has no PORT")?;
    let direct = format!("http://127.0.0.1:{port}/");

    async fn timed(client: &reqwest::Client, url: &str) -> anyhow::Result<Duration> {
        let start = Instant::now();
        let response = client.get(url).send().await?;
        if !response.status().is_success() {
            bail!("{url} answered {}", response.status());
        }
        response.bytes().await?;
        Ok(start.elapsed())
    }
    // Warm both paths' connections and the runner.
    for _ in 0..200 {
        timed(&client, &direct).await?;
        timed(&client, &via_gateway).await?;
    }
    let (mut d, mut g, mut added) = (Vec::new(), Vec::new(), Vec::new());
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for i in 0..rate * seconds {
        tick.tick().await;
        let (a, b) = if i % 2 == 0 {
            let a = timed(&client, &direct).await?;
            (a, timed(&client, &via_gateway).await?)
        } else {
            let b = timed(&client, &via_gateway).await?;
            (timed(&client, &direct).await?, b)
        };
        d.push(a);
        g.push(b);
        added.push(b.saturating_sub(a));
    }
    Ok(Latency { pairs: d.len(), direct: percentiles(d), gateway: percentiles(g), added: percentiles(added) })
}

struct Cold {
    runs: u32,
    own: Percentiles,
    first_byte: Percentiles,
}

/// First byte of a call to an app with no runner, against the test app's own time
/// from process start to a passing health check (measured here by starting it by hand).
async fn cold_start(server: &TestServer, testapp: &std::path::Path, runs: u32) -> anyhow::Result<Cold> {
    let client = reqwest::Client::new();
    let mut own = Vec::new();
    for _ in 0..runs {
        own.push(own_time_to_healthy(&client, testapp).await?);
    }
    let mut first_byte = Vec::new();
    for i in 0..runs {
        let name = format!("cold{i}");
        // Recreate starts no runner: the first call is a cold start.
        deploy(server, testapp, &name, "", &["--strategy", "recreate"])?;
        let start = Instant::now();
        let response = client.get(format!("{}/default/{name}/", server.gateway_url)).send().await?;
        first_byte.push(start.elapsed());
        if !response.status().is_success() {
            bail!("cold call to {name} answered {}", response.status());
        }
    }
    Ok(Cold { runs, own: percentiles(own), first_byte: percentiles(first_byte) })
}

async fn own_time_to_healthy(client: &reqwest::Client, testapp: &std::path::Path) -> anyhow::Result<Duration> {
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

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

fn render(args: &Args, l: &Latency, c: &Cold) -> String {
    let now =
        time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
    let cold_overhead = c.first_byte.p50.saturating_sub(c.own.p50);
    format!(
        "# Benchmarks\n\n\
         Reproduce with `bench/run.sh` (release build; flags `--rate`, `--seconds`, `--cold-starts`).\n\
         Last run: {now}, on the 2-core development machine (shared, so read the ratios and\n\
         differences, which are taken within one run, rather than absolute times).\n\n\
         ## Gateway latency\n\n\
         {pairs} pairs of calls at {rate} pairs/s for {secs} s to one runner of the test app\n\
         (`max_multiplexing = 64`, so no call waits): one call straight to the runner's port, one\n\
         through the gateway, back to back in alternating order. Times are to the last body byte.\n\n\
         | | p50 | p99 |\n|---|---|---|\n\
         | direct to the runner | {dp50} | {dp99} |\n\
         | through the gateway | {gp50} | {gp99} |\n\
         | added by the gateway (per pair) | **{ap50}** | **{ap99}** |\n\n\
         Target: ≤ 0.2 ms added at p50.\n\n\
         ## Cold start\n\n\
         {runs} apps deployed with `--strategy recreate` (no runner), each called once; the time to\n\
         the first byte of that call against the test app's own time from process start to a\n\
         passing health check, measured by starting it directly {runs} times in the same run.\n\n\
         | | p50 | p99 |\n|---|---|---|\n\
         | test app's own start to healthy | {op50} | {op99} |\n\
         | first byte of a cold call | {fp50} | {fp99} |\n\n\
         Cold-start overhead (p50 first byte − p50 own start): **{overhead}**. Target: ≤ 25 ms.\n",
        pairs = l.pairs,
        rate = args.rate,
        secs = args.seconds,
        dp50 = ms(l.direct.p50),
        dp99 = ms(l.direct.p99),
        gp50 = ms(l.gateway.p50),
        gp99 = ms(l.gateway.p99),
        ap50 = ms(l.added.p50),
        ap99 = ms(l.added.p99),
        runs = c.runs,
        op50 = ms(c.own.p50),
        op99 = ms(c.own.p99),
        fp50 = ms(c.first_byte.p50),
        fp99 = ms(c.first_byte.p99),
        overhead = ms(cold_overhead),
    )
}

struct Switching {
    rate: u32,
    steady_p95: Duration,
    /// p95 of the calls sent while each operation ran.
    during: Vec<(&'static str, Duration, usize)>,
    failed: usize,
    recreate: Percentiles,
    recreate_runs: usize,
    rolling: Percentiles,
    rolling_runs: usize,
    own_start: Duration,
}

/// Latency under live operations, and how long switching revisions takes.
async fn switching(server: &TestServer, testapp: &std::path::Path) -> anyhow::Result<Switching> {
    let app = "switch";
    let extra = "[scaling]\nmin_concurrency = 2\nkeep_alive = 2\n[runner]\nmax_multiplexing = 8\n";
    deploy(server, testapp, app, extra, &[])?;
    let url = format!("{}/default/{app}/?delay_ms=5", server.gateway_url);
    let rate = 200;
    let client = reqwest::Client::new();
    let api = server.client();
    let revs = api.list_revisions(app).await?;
    let v1 = revs[0].id.clone();
    deploy(server, testapp, app, &format!("env = {{ V = \"2\" }}\n{extra}"), &[])?;
    let v2 = api.list_revisions(app).await?[0].id.clone();

    // Load at a fixed rate in the background; each sample is (sent at, latency, ok).
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let load = tokio::spawn({
        let client = client.clone();
        async move {
            let mut samples = Vec::new();
            let mut calls = tokio::task::JoinSet::new();
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop_rx.changed() => break,
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
            while let Some(Ok(sample)) = calls.join_next().await {
                samples.push(sample);
            }
            samples
        }
    });
    // Each operation's window lasts at least a second from its start, so that it holds
    // enough calls for a p95 and takes in what follows the operation (draining).
    let mut windows: Vec<(&'static str, Instant, Instant)> = Vec::new();
    async fn settle(start: Instant) {
        tokio::time::sleep_until((start + Duration::from_secs(1)).into()).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let steady_start = Instant::now() - Duration::from_secs(2);
    windows.push(("steady state (2 s before the first operation)", steady_start, Instant::now()));
    let start = Instant::now();
    api.set_rev(app, &api::wire::SetRevRequest { revision: v1.clone(), strategy: None, auth: None }).await?;
    settle(start).await;
    windows.push(("rolling set-rev", start, Instant::now()));
    let start = Instant::now();
    api.set_rev(app, &api::wire::SetRevRequest { revision: v2.clone(), strategy: Some("recreate".into()), auth: None })
        .await?;
    settle(start).await;
    windows.push(("recreate set-rev", start, Instant::now()));
    let start = Instant::now();
    api.rollout(app, false).await?;
    wait_for(|| async { all_replaced(&api, app).await }).await?;
    settle(start).await;
    windows.push(("graceful rollout (until every runner is replaced)", start, Instant::now()));
    let start = Instant::now();
    api.scale(app, &api::wire::ScaleRequest { min_concurrency: Some(4), ..Default::default() }).await?;
    wait_for(|| async {
        Ok(api
            .runners(Some(app), &Default::default())
            .await?
            .iter()
            .filter(|r| r.state == "idle" || r.state == "running")
            .count()
            >= 4)
    })
    .await?;
    // Under steady load no runner stays idle for long (calls go to the emptiest one), so
    // the scale-down uses keep_alive = 0: a runner goes as soon as it has no call.
    api.scale(app, &api::wire::ScaleRequest { min_concurrency: Some(1), keep_alive: Some(0), ..Default::default() })
        .await?;
    wait_for(|| async { Ok(api.runners(Some(app), &Default::default()).await?.len() <= 2) }).await?;
    settle(start).await;
    windows.push(("scale up to 4, then down (keep_alive 0)", start, Instant::now()));
    let _ = stop_tx.send(true);
    let samples = load.await?;

    let p95_in = |from: Instant, to: Instant| {
        let in_window: Vec<Duration> =
            samples.iter().filter(|(t, _, _)| *t >= from && *t <= to).map(|(_, l, _)| *l).collect();
        let n = in_window.len();
        (if n == 0 { Duration::ZERO } else { percentile(in_window, 0.95) }, n)
    };
    let (steady_p95, _) = p95_in(windows[0].1, windows[0].2);
    let during = windows[1..]
        .iter()
        .map(|(name, from, to)| {
            let (p95, n) = p95_in(*from, *to);
            (*name, p95, n)
        })
        .collect();
    let failed = samples.iter().filter(|(_, _, ok)| !ok).count();

    // Switch times, without load.
    let mut recreate = Vec::new();
    let mut rolling = Vec::new();
    for i in 0..20 {
        let target = if i % 2 == 0 { &v1 } else { &v2 };
        let start = Instant::now();
        api.set_rev(
            app,
            &api::wire::SetRevRequest { revision: target.clone(), strategy: Some("recreate".into()), auth: None },
        )
        .await?;
        recreate.push(start.elapsed());
    }
    for i in 0..10 {
        let target = if i % 2 == 0 { &v1 } else { &v2 };
        let start = Instant::now();
        api.set_rev(app, &api::wire::SetRevRequest { revision: target.clone(), strategy: None, auth: None }).await?;
        rolling.push(start.elapsed());
    }
    let mut own = Vec::new();
    for _ in 0..10 {
        own.push(own_time_to_healthy(&client, testapp).await?);
    }
    Ok(Switching {
        rate,
        steady_p95,
        during,
        failed,
        recreate_runs: recreate.len(),
        recreate: percentiles(recreate),
        rolling_runs: rolling.len(),
        rolling: percentiles(rolling),
        own_start: percentile(own, 0.5),
    })
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

fn percentile(mut samples: Vec<Duration>, q: f64) -> Duration {
    samples.sort();
    samples[((samples.len() - 1) as f64 * q).round() as usize]
}

fn render_switching(s: &Switching) -> String {
    let mut out = format!(
        "\n## Latency during operations\n\n\
         Calls at {rate}/s (each taking 5 ms in the app; `min_concurrency = 2`, `max_multiplexing = 8`)\n\
         while operations run one after another; each operation's window runs from its start until it\n\
         is done, and at least 1 s. Steady-state p95: {steady}. Failed calls: **{failed}**.\n\n\
         | operation | calls | p95 | ÷ steady p95 |\n|---|---|---|---|\n",
        rate = s.rate,
        steady = ms(s.steady_p95),
        failed = s.failed,
    );
    for (name, p95, n) in &s.during {
        let ratio = p95.as_secs_f64() / s.steady_p95.as_secs_f64().max(1e-9);
        out.push_str(&format!("| {name} | {n} | {} | {ratio:.2} |\n", ms(*p95)));
    }
    out.push_str(&format!(
        "\nTarget: ≤ 1.1.\n\n## Switching time\n\n\
         Time for `apps set-rev` to return, without load, alternating between two revisions.\n\n\
         | | runs | p50 | p99 |\n|---|---|---|---|\n\
         | recreate | {rn} | {r50} | **{r99}** |\n\
         | rolling | {ln} | {l50} | {l99} |\n\n\
         Recreate target: ≤ 10 ms p99. Rolling set-rev minus the target's own start-to-healthy time\n\
         ({own}, measured directly): **{rolling_overhead}** at p50 (target ≤ 100 ms).\n",
        rn = s.recreate_runs,
        r50 = ms(s.recreate.p50),
        r99 = ms(s.recreate.p99),
        ln = s.rolling_runs,
        l50 = ms(s.rolling.p50),
        l99 = ms(s.rolling.p99),
        own = ms(s.own_start),
        rolling_overhead = ms(s.rolling.p50.saturating_sub(s.own_start)),
    ));
    out
}
