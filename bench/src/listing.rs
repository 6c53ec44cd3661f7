//! P5: listing an app with 10,000 revisions, and the wall time of CLI commands.
//!
//! Deploying 10,000 times would take an hour, so the revisions are written with the
//! store's own `insert_revision` while the server is stopped: copies of one real,
//! deployed revision under new ids, a millisecond apart. Then the server starts again
//! and is asked for them through the API and the CLI, as a user would.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use model::ids::RevisionId;
use testkit::TestServer;

use crate::stats::Percentiles;

pub(crate) const REVISIONS: usize = 10_000;

pub(crate) struct Listing {
    pub(crate) revisions: usize,
    /// `GET /v1/apps/{app}/revisions` (the newest 100), to the last byte.
    pub(crate) api: Percentiles,
    /// The same with `?all=true`: every revision.
    pub(crate) api_all: Percentiles,
    pub(crate) api_runs: usize,
    /// `hangar apps list-rev APP`, process start to exit.
    pub(crate) cli_list_rev: Percentiles,
    /// `hangar apps list`, process start to exit.
    pub(crate) cli_list: Percentiles,
    pub(crate) cli_runs: usize,
}

pub(crate) async fn listing(hangar: &str, testapp: &Path) -> anyhow::Result<Listing> {
    let mut server = TestServer::start(hangar);
    crate::deploy(&server, testapp, "many", "", &["--strategy", "recreate"])?;
    let api = server.client();
    let deployed = api.list_revisions("many").await?;
    let template_id: RevisionId = deployed[0].id.parse().context("a revision id")?;
    server.stop();

    let store = store::Store::open_sqlite(&server.data_dir().join("hangar.db")).await?;
    let template = store.revision(template_id).await?.context("the deployed revision")?;
    for i in 1..REVISIONS {
        let mut copy = template.clone();
        copy.id = RevisionId::new();
        copy.created_at = template.created_at - time::Duration::milliseconds(i as i64);
        store.insert_revision(copy).await?;
    }
    drop(store);
    server.restart();

    let client = reqwest::Client::new();
    let url = format!("{}/v1/apps/many/revisions", server.api_url);
    let timed = |url: String, expected: usize| {
        let client = client.clone();
        let key = server.root_key.clone();
        async move {
            let mut times = Vec::new();
            for i in 0..33 {
                let start = Instant::now();
                let response = client.get(&url).header("authorization", format!("Key {key}")).send().await?;
                let body = response.bytes().await?;
                let took = start.elapsed();
                if i == 0 {
                    let listed: Vec<serde_json::Value> = serde_json::from_slice(&body)?;
                    if listed.len() != expected {
                        bail!("{url} listed {} revisions, not {expected}", listed.len());
                    }
                }
                // The first three warm the caches.
                if i >= 3 {
                    times.push(took);
                }
            }
            anyhow::Ok(times)
        }
    };
    let api_times = timed(url.clone(), 100).await?;
    let api_all = timed(format!("{url}?all=true"), REVISIONS).await?;

    let cli = |args: &[&str]| -> anyhow::Result<Duration> {
        let start = Instant::now();
        let out = testkit::run_command(server.cli().args(args));
        let took = start.elapsed();
        if !out.success() {
            bail!("hangar {} failed: {}", args.join(" "), out.stderr);
        }
        Ok(took)
    };
    let runs = 20;
    let (mut list_rev, mut list) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        list_rev.push(cli(&["apps", "list-rev", "many"])?);
        list.push(cli(&["apps", "list"])?);
    }
    Ok(Listing {
        revisions: REVISIONS,
        api_runs: api_times.len(),
        api: Percentiles::of(api_times),
        api_all: Percentiles::of(api_all),
        cli_list_rev: Percentiles::of(list_rev),
        cli_list: Percentiles::of(list),
        cli_runs: runs,
    })
}
