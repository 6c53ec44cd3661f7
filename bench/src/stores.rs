//! P6: the store on PostgreSQL against SQLite, through the real server as a user would
//! meet it. Two servers run side by side, one on the embedded SQLite store in its data
//! dir and one on a database of a private PostgreSQL cluster on the same machine
//! (`testkit::pg::PgCluster`, with PostgreSQL's own durability turned back on: see
//! [`durable`]), and every figure is taken on both, alternating, so that the ratio
//! PostgreSQL ÷ SQLite is what counts:
//!
//! - list-rev: `GET /v1/apps/{app}/revisions` (the newest 100) on an app with
//!   [`REVISIONS`] revisions, from [`LIST_CLIENTS`] clients at once for a fixed time: a
//!   read path;
//! - deploy: a deploy of a small app with `--strategy recreate`, [`DEPLOYS`] times on
//!   each, through the API as `hangar deploy` makes it, from the upload until the
//!   revision is deployed: the write path of an operator's command;
//! - queue submit: `POST /queue/{team}/{app}` of a public app from [`QUEUE_CLIENTS`]
//!   clients at once for a fixed time. A submission is acknowledged (202) only once it
//!   is stored, so its latency is the store's insert. The app's runner answers at once
//!   and takes every request, so that the backlog stays short (each submission counts
//!   the requests ahead of it, which would otherwise grow with the backlog) and every
//!   request also goes through the rest of the queue's write path, started and
//!   completed, each one transaction, while the submissions go on.
//!
//! As in P5, the revisions are written with the store's own `insert_revision` while the
//! server is stopped (on PostgreSQL through `Store::open_postgres`).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use model::ids::RevisionId;
use testkit::TestServer;
use testkit::pg::PgCluster;

use crate::stats::Percentiles;

/// Revisions of the listed app.
pub(crate) const REVISIONS: usize = 1000;
/// Clients listing at once.
pub(crate) const LIST_CLIENTS: usize = 4;
/// Deploys timed on each store.
pub(crate) const DEPLOYS: usize = 20;
/// Clients submitting to the queue at once.
pub(crate) const QUEUE_CLIENTS: usize = 16;

/// The app listed, and the one the queue serves.
const LISTED: &str = "many";
const QUEUED: &str = "queued";

/// Calls made from several clients for a fixed time.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Load {
    pub(crate) calls: usize,
    pub(crate) per_s: f64,
    pub(crate) latency: Percentiles,
}

/// The figures of one store.
pub(crate) struct Backend {
    pub(crate) list: Load,
    /// Wall time of one `hangar deploy`.
    pub(crate) deploy: Percentiles,
    pub(crate) deploys_per_s: f64,
    pub(crate) submit: Load,
    /// Requests still waiting when the last round of submissions ended (the most of
    /// any round).
    pub(crate) backlog: u64,
    /// Requests completed per second, from the first submission until the last request
    /// of the round was completed.
    pub(crate) completed_per_s: f64,
}

pub(crate) struct Stores {
    pub(crate) postgres_version: String,
    pub(crate) rounds: u32,
    pub(crate) seconds: u32,
    /// The machine's cores, which everything here shares.
    pub(crate) cores: usize,
    pub(crate) sqlite: Backend,
    pub(crate) postgres: Backend,
}

impl Stores {
    /// PostgreSQL's figure ÷ SQLite's.
    pub(crate) fn ratio(postgres: f64, sqlite: f64) -> f64 {
        postgres / sqlite.max(1e-12)
    }
}

/// Measures both stores: `rounds` rounds of `seconds` s of each load (the stores take
/// turns, the first one alternating from round to round), and [`DEPLOYS`] deploys each,
/// alternating.
pub(crate) async fn stores(hangar: &str, testapp: &Path, rounds: u32, seconds: u32) -> anyhow::Result<Stores> {
    let cluster = PgCluster::start();
    durable(&cluster).await?;
    let postgres_version = cluster.psql("postgres", "SHOW server_version").trim().to_owned();
    let url = cluster.create_database("hangar_bench");
    let flags = ["--machine-type", "cpu=64"];
    let mut sqlite = TestServer::start_with(hangar, &flags);
    if sqlite.database_url().is_some() {
        bail!("HANGAR_TEST_STORE=postgres put the SQLite server on PostgreSQL; unset it");
    }
    let mut postgres = TestServer::start_with(hangar, &[&flags[..], &["--database-url", url.as_str()]].concat());
    seed_revisions(&mut sqlite, testapp).await?;
    seed_revisions(&mut postgres, testapp).await?;
    let queued = "env = { QUIET = \"1\" }\n[scaling]\nmin_concurrency = 1\nmax_concurrency = 1\nkeep_alive = 600\n\
                  [runner]\nmax_multiplexing = 64\n";
    for server in [&sqlite, &postgres] {
        crate::deploy(server, testapp, QUEUED, queued, &[])?;
        // The runner is up once a call comes back from it.
        let http = reqwest::Client::new();
        let answer = http.get(format!("{}/default/{QUEUED}/", server.gateway_url)).send().await?;
        if !answer.status().is_success() {
            bail!("the queue's app answered {}", answer.status());
        }
    }
    let servers = [&sqlite, &postgres];
    let window = Duration::from_secs(seconds.into());

    let mut list = [Vec::new(), Vec::new()];
    let mut submit = [Vec::new(), Vec::new()];
    let mut backlog = [0, 0];
    let mut completed = [(0usize, Duration::ZERO), (0usize, Duration::ZERO)];
    for round in 0..rounds as usize {
        for turn in 0..2 {
            let i = (round + turn) % 2;
            list[i].push(list_load(servers[i], window).await?);
        }
        for turn in 0..2 {
            let i = (round + turn) % 2;
            let (load, waiting, took) = submit_load(servers[i], window).await?;
            backlog[i] = backlog[i].max(waiting);
            // And the one that asked for the backlog.
            completed[i].0 += load.0.len() + 1;
            completed[i].1 += took;
            submit[i].push(load);
        }
    }

    let mut deploys = [Vec::new(), Vec::new()];
    for n in 0..DEPLOYS {
        for turn in 0..2 {
            let i = (n + turn) % 2;
            deploys[i].push(timed_deploy(servers[i], testapp, n).await?);
        }
    }

    let backend = |i: usize| {
        let total: Duration = deploys[i].iter().sum();
        Backend {
            list: pooled(&list[i]),
            deploys_per_s: deploys[i].len() as f64 / total.as_secs_f64().max(1e-9),
            deploy: Percentiles::of(deploys[i].clone()),
            submit: pooled(&submit[i]),
            backlog: backlog[i],
            completed_per_s: completed[i].0 as f64 / completed[i].1.as_secs_f64().max(1e-9),
        }
    };
    let (sqlite_figures, postgres_figures) = (backend(0), backend(1));
    drop(sqlite);
    // The server goes before its database's cluster.
    drop(postgres);
    drop(cluster);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Ok(Stores { postgres_version, rounds, seconds, cores, sqlite: sqlite_figures, postgres: postgres_figures })
}

/// Turns PostgreSQL's durability back on. The private cluster is set up for tests, speed
/// over durability (`fsync`, `synchronous_commit` and `full_page_writes` off), while the
/// store on SQLite syncs every commit (WAL, `synchronous = FULL`). With PostgreSQL's
/// defaults back, a stored write means the same on both: on disk before it is
/// acknowledged.
async fn durable(cluster: &PgCluster) -> anyhow::Result<()> {
    const SETTINGS: [&str; 3] = ["fsync", "synchronous_commit", "full_page_writes"];
    for setting in SETTINGS {
        // ALTER SYSTEM runs alone, outside a transaction.
        cluster.psql("postgres", &format!("ALTER SYSTEM SET {setting} = on"));
    }
    cluster.psql("postgres", "SELECT pg_reload_conf()");
    // The reload is a signal; a new connection sees it once the postmaster has read it.
    let deadline = Instant::now() + Duration::from_secs(10);
    for setting in SETTINGS {
        while cluster.psql("postgres", &format!("SHOW {setting}")).trim() != "on" {
            if Instant::now() > deadline {
                bail!("PostgreSQL did not take {setting} = on");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

/// Deploys the listed app once and gives it [`REVISIONS`] revisions in all: copies of
/// the deployed one under new ids, a millisecond apart, written while the server is
/// stopped, into whichever store it runs on.
async fn seed_revisions(server: &mut TestServer, testapp: &Path) -> anyhow::Result<()> {
    crate::deploy(server, testapp, LISTED, "", &["--strategy", "recreate"])?;
    let deployed = server.client().list_revisions(LISTED).await?;
    let template_id: RevisionId = deployed.first().context("no deployed revision")?.id.parse()?;
    server.stop();
    let store = match server.database_url() {
        Some(url) => store::Store::open_postgres(url).await?,
        None => store::Store::open_sqlite(&server.data_dir().join("hangar.db")).await?,
    };
    let template = store.revision(template_id).await?.context("the deployed revision")?;
    for i in 1..REVISIONS {
        let mut copy = template.clone();
        copy.id = RevisionId::new();
        copy.created_at = template.created_at - time::Duration::milliseconds(i as i64);
        store.insert_revision(copy).await?;
    }
    drop(store);
    server.restart();
    Ok(())
}

/// [`LIST_CLIENTS`] clients listing the newest 100 revisions, each one call after the
/// other, for `window`: the latency of every call, to the last byte, and the time until
/// the last one was answered.
async fn list_load(server: &TestServer, window: Duration) -> anyhow::Result<(Vec<Duration>, Duration)> {
    let url = format!("{}/v1/apps/{LISTED}/revisions", server.api_url);
    let key = format!("Key {}", server.root_key);
    let client = reqwest::Client::new();
    // One call to check what is listed (and to warm the caches).
    let listed: Vec<serde_json::Value> =
        client.get(&url).header("authorization", &key).send().await?.error_for_status()?.json().await?;
    if listed.len() != 100 {
        bail!("{url} listed {} revisions, not 100", listed.len());
    }
    let start = Instant::now();
    let end = start + window;
    let tasks: Vec<_> = (0..LIST_CLIENTS)
        .map(|_| {
            let (client, url, key) = (client.clone(), url.clone(), key.clone());
            tokio::spawn(async move {
                let mut times = Vec::new();
                while Instant::now() < end {
                    let start = Instant::now();
                    let response = client.get(&url).header("authorization", &key).send().await?;
                    let status = response.status();
                    response.bytes().await?;
                    if !status.is_success() {
                        bail!("{url} answered {status}");
                    }
                    times.push(start.elapsed());
                }
                anyhow::Ok(times)
            })
        })
        .collect();
    let mut times = Vec::new();
    for task in tasks {
        times.extend(task.await??);
    }
    Ok((times, start.elapsed()))
}

/// [`QUEUE_CLIENTS`] clients submitting to the queue, each one submission after the
/// other, for `window`: the latency of every acknowledged (202) submission and the time
/// until the last one was acknowledged, the requests still waiting at the end (the queue
/// position of one more submission), and the time from the start until that one is
/// completed.
async fn submit_load(
    server: &TestServer,
    window: Duration,
) -> anyhow::Result<((Vec<Duration>, Duration), u64, Duration)> {
    let url = format!("{}/queue/default/{QUEUED}", server.gateway_url);
    let client = reqwest::Client::new();
    let start = Instant::now();
    let end = start + window;
    let tasks: Vec<_> = (0..QUEUE_CLIENTS)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                let mut times = Vec::new();
                while Instant::now() < end {
                    let sent = Instant::now();
                    let response = client.post(&url).body(r#"{"prompt":"hello"}"#).send().await?;
                    let status = response.status();
                    response.bytes().await?;
                    if status != reqwest::StatusCode::ACCEPTED {
                        bail!("POST {url} answered {status}");
                    }
                    times.push(sent.elapsed());
                }
                anyhow::Ok(times)
            })
        })
        .collect();
    let mut times = Vec::new();
    for task in tasks {
        times.extend(task.await??);
    }
    let submitted = start.elapsed();
    let last: serde_json::Value = client.post(&url).body("{}").send().await?.error_for_status()?.json().await?;
    let waiting = last["queue_position"].as_u64().context("a submission without queue_position")?;
    let status_url = last["status_url"].as_str().context("a submission without status_url")?;
    // Its URLs name the host the call went to, which is the gateway's.
    let drained = Instant::now() + Duration::from_secs(300);
    loop {
        let status: serde_json::Value = client.get(status_url).send().await?.error_for_status()?.json().await?;
        if status["status"] == "COMPLETED" {
            break;
        }
        if Instant::now() > drained {
            bail!("the queue of {QUEUED} did not drain in 300 s ({waiting} waiting at the end)");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(((times, submitted), waiting, start.elapsed()))
}

/// One deploy of a small app with `--strategy recreate` (a new revision each time),
/// through the API as `hangar deploy` makes it: from the upload of the packed app until
/// the revision has left `deploying`, asked every 2 ms. (The CLI itself asks every
/// 250 ms, which would round most deploys up to a quarter of a second.) Recreate starts
/// no runner, so this is the server's work: the revision, the code blob, the app and
/// its event in the store.
async fn timed_deploy(server: &TestServer, testapp: &Path, n: usize) -> anyhow::Result<Duration> {
    let app = crate::app_dir(testapp, "deployed", &format!("env = {{ V = \"{n}\" }}\n"));
    let packed = archive::pack(app.path())?;
    let params = api::wire::DeployParams {
        app_name: None,
        auth: Some("public".to_owned()),
        strategy: Some("recreate".to_owned()),
        reset_scale: false,
        message: None,
        guard: false,
        annotations: None,
    };
    let api = server.client();
    let start = Instant::now();
    let deployed = api.deploy(&params, packed.bytes).await?;
    let status = loop {
        let revision = api.get_revision(&deployed.app, &deployed.revision).await?;
        if revision.status != "deploying" {
            break revision.status;
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!("deploy {n} was still deploying after 60 s");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let took = start.elapsed();
    if status != "deployed" {
        bail!("deploy {n} ended {status}");
    }
    Ok(took)
}

/// The rounds' calls together: their percentiles, and calls per second over the time
/// the rounds took.
fn pooled(rounds: &[(Vec<Duration>, Duration)]) -> Load {
    let samples: Vec<Duration> = rounds.iter().flat_map(|(times, _)| times).copied().collect();
    let seconds: f64 = rounds.iter().map(|(_, took)| took.as_secs_f64()).sum();
    Load { calls: samples.len(), per_s: samples.len() as f64 / seconds.max(1e-9), latency: Percentiles::of(samples) }
}
