//! hangar's benchmarks, against what a user would otherwise run, in one run on one
//! machine:
//!
//! - P1 ([`proxies`]): the most calls per second, and latency at a fixed rate, for a
//!   runner called directly, through nginx, and through hangar's gateway (load by `oha`);
//!   and the same with a fast runner, nginx serving a static file ([`fast_runner`], load by
//!   `wrk` and `oha`), with what holding 10,000 idle connections costs;
//! - P2 ([`cold`]): what a cold start costs beyond the app's own start;
//! - P3 and P4 ([`switching`]): how long switching revisions takes, and what deploys,
//!   set-revs and rollouts do to calls flowing meanwhile;
//! - P5 ([`listing`]): listing 10,000 revisions, and the wall time of CLI commands;
//! - P6 ([`stores`]): the store on PostgreSQL against SQLite: listing, deploys and queue
//!   submissions through the real server on each.
//!
//! Every figure is set against a baseline measured in the same run, because this
//! machine is shared and absolute figures drift. `bench/run.sh` builds everything in
//! release mode, finds or installs nginx and oha, runs this, and plots the result. P6
//! starts a private PostgreSQL cluster (`scripts/pg/cluster.sh`, which installs Debian's
//! postgresql when it is missing).

mod cold;
mod failover;
mod fast_runner;
mod listing;
mod proxies;
mod report;
mod stats;
mod stores;
mod switching;

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Parser;
use testkit::{AppDir, TestServer};

/// Measures hangar against a runner called directly and through nginx, cold starts,
/// switching revisions under load, listing many revisions and the store on PostgreSQL
/// against SQLite; writes BENCHMARKS.md.
#[derive(Parser)]
#[command(name = "hangar-bench")]
struct Args {
    /// The `hangar` binary (the test app is taken from beside it).
    #[arg(long, default_value = "target/release/hangar")]
    hangar: String,
    /// The `oha` load generator.
    #[arg(long, default_value = "oha")]
    oha: PathBuf,
    /// The `wrk` load generator.
    #[arg(long, default_value = "wrk")]
    wrk: PathBuf,
    /// The `nginx` binary, run as a reverse proxy to the same runner.
    #[arg(long, default_value = "nginx")]
    nginx: PathBuf,
    /// Where to write the report.
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: PathBuf,
    /// Where to write the figures for the plot.
    #[arg(long, default_value = "target/bench/results.json")]
    json: PathBuf,
    /// Rounds of each throughput measurement.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Seconds of each round.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    seconds: u32,
    /// How many cold starts to time.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..))]
    cold_starts: u32,
    /// Only measure P1 with the fast runner, print the figures and write nothing.
    #[arg(long)]
    p1_only: bool,
    /// Only time the listings (P5), print the figures and write nothing.
    #[arg(long)]
    p5_only: bool,
    /// Only time cold starts through a private Slurm cluster against local runners,
    /// print the figures and write nothing (`--cold-starts` of each).
    #[arg(long)]
    slurm_only: bool,
    /// Only measure the store on PostgreSQL against SQLite (P6), print the figures and
    /// write nothing (`--rounds` rounds of `--seconds` s of each load).
    #[arg(long)]
    stores_only: bool,
    /// Only measure the failover window of servers sharing a store (P7), print the
    /// figures and write nothing (`--rounds` kills per lease time).
    #[arg(long)]
    failover_only: bool,
}

/// Cold starts through Slurm against local ones, in one run.
fn slurm_only(hangar: &str, runs: u32) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let testapp = testkit::testapp_bin(hangar);
    let cluster = testkit::slurm::SlurmCluster::start();
    let slurm = cluster.server(hangar, &["--machine-type", "cpu=64"]);
    let local = TestServer::start_with(hangar, &["--machine-type", "cpu=64"]);
    let (here, there) = runtime.block_on(cold::cold_on_slurm(&local, &slurm, &testapp, runs))?;
    eprintln!(
        "{runs} cold starts, first byte: local p50 {} p99 {}; Slurm p50 {} p99 {}",
        stats::ms(here.p50),
        stats::ms(here.p99),
        stats::ms(there.p50),
        stats::ms(there.p99)
    );
    Ok(())
}

/// Times the listings alone, for working on their speed.
fn p5_only(hangar: &str) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let p5 = runtime.block_on(listing::listing(hangar, &testkit::testapp_bin(hangar)))?;
    eprintln!(
        "API p50 {} p99 {}; all p50 {}; CLI list-rev p50 {}; list p50 {}",
        stats::ms(p5.api.p50),
        stats::ms(p5.api.p99),
        stats::ms(p5.api_all.p50),
        stats::ms(p5.cli_list_rev.p50),
        stats::ms(p5.cli_list.p50)
    );
    Ok(())
}

/// The store on PostgreSQL against SQLite alone.
fn stores_only(hangar: &str, rounds: u32, seconds: u32) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let p6 = runtime.block_on(stores::stores(hangar, &testkit::testapp_bin(hangar), rounds, seconds))?;
    print!("{}", report::stores_table(&p6));
    Ok(())
}

/// Lets this process, and the servers and proxies it starts, open as many files as the
/// system allows: holding 10,000 connections takes more than the usual soft limit.
fn raise_open_files() -> anyhow::Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    raise_open_files()?;
    let hangar = std::fs::canonicalize(&args.hangar).with_context(|| format!("no hangar binary at {}", args.hangar))?;
    let hangar = hangar.to_str().context("path is not UTF-8")?.to_owned();
    if args.p5_only {
        return p5_only(&hangar);
    }
    let settings = proxies::Settings {
        oha: args.oha.clone(),
        wrk: args.wrk.clone(),
        nginx: args.nginx.clone(),
        rounds: args.rounds,
        seconds: args.seconds,
    };
    if args.p1_only {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let unconfined = TestServer::start_with(&hangar, &["--machine-type", "cpu=64", "--sandbox", "none"]);
        let fast = runtime.block_on(fast_runner::compare(&unconfined, &settings))?;
        print!("{}", report::fast_runner_table(&fast));
        return Ok(());
    }
    if args.slurm_only {
        return slurm_only(&hangar, args.cold_starts);
    }
    if args.stores_only {
        return stores_only(&hangar, args.rounds, args.seconds);
    }
    if args.failover_only {
        let p7 = failover::failover(&hangar, &testkit::testapp_bin(&hangar), args.rounds)?;
        print!("{}", report::failover_table(&p7));
        return Ok(());
    }
    let testapp = testkit::testapp_bin(&hangar);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let machine = report::Machine::describe(&args.oha, &args.nginx);

    let server = TestServer::start_with(&hangar, &["--machine-type", "cpu=64"]);
    let unconfined = TestServer::start_with(&hangar, &["--machine-type", "cpu=64", "--sandbox", "none"]);
    eprintln!("P1: direct, nginx and hangar under oha ({} rounds)", args.rounds);
    let p1 = runtime.block_on(proxies::compare(&unconfined, &server, &testapp, &settings))?;
    eprintln!("P1 with a fast runner: direct, nginx and hangar under wrk and oha");
    let p1_fast = runtime.block_on(fast_runner::compare(&unconfined, &settings))?;
    eprintln!("P2: {} cold starts", args.cold_starts);
    let p2 = runtime.block_on(cold::cold_start(&server, &unconfined, &testapp, args.cold_starts))?;
    drop(unconfined);
    eprintln!("P3, P4: switching under load");
    let p34 = runtime.block_on(switching::switching(&server, &testapp))?;
    drop(server);
    eprintln!("P5: {} revisions", listing::REVISIONS);
    let p5 = runtime.block_on(listing::listing(&hangar, &testapp))?;
    eprintln!("P6: the store on PostgreSQL against SQLite");
    let p6 = runtime.block_on(stores::stores(&hangar, &testapp, args.rounds, args.seconds))?;

    eprintln!("P7: the failover window of servers sharing a store");
    let p7 = failover::failover(&hangar, &testapp, args.rounds)?;

    let results = report::Results { machine, p1, p1_fast, p2, p34, p5, p6, p7 };
    let markdown = report::markdown(&results);
    print!("{markdown}");
    std::fs::write(&args.out, markdown).with_context(|| format!("cannot write {}", args.out.display()))?;
    if let Some(dir) = args.json.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(&report::json(&results))?)
        .with_context(|| format!("cannot write {}", args.json.display()))?;
    Ok(())
}

/// An app directory of the test app with `extra` manifest lines.
fn app_dir(testapp: &Path, name: &str, extra: &str) -> AppDir {
    AppDir::new(&format!("name = \"{name}\"\ncommand = [{:?}]\n{extra}", testapp.display().to_string()))
}

/// `hangar deploy` of a test-app app, public.
fn deploy(server: &TestServer, testapp: &Path, name: &str, extra: &str, flags: &[&str]) -> anyhow::Result<()> {
    let app = app_dir(testapp, name, extra);
    let out = server.run(&[&["deploy", app.path_str(), "--auth", "public"], flags].concat());
    if !out.success() {
        bail!("deploy of {name} failed: {}", out.stderr);
    }
    Ok(())
}
