//! hangar's benchmarks, against what a user would otherwise run, in one run on one
//! machine:
//!
//! - P1 ([`proxies`]): the most calls per second, and latency at a fixed rate, for a
//!   runner called directly, through nginx, and through hangar's gateway (load by `oha`);
//! - P2 ([`cold`]): what a cold start costs beyond the app's own start;
//! - P3 and P4 ([`switching`]): how long switching revisions takes, and what deploys,
//!   set-revs and rollouts do to calls flowing meanwhile;
//! - P5 ([`listing`]): listing 10,000 revisions, and the wall time of CLI commands.
//!
//! Every figure is set against a baseline measured in the same run, because this
//! machine is shared and absolute figures drift. `bench/run.sh` builds everything in
//! release mode, finds or installs nginx and oha, runs this, and plots the result.

mod cold;
mod listing;
mod proxies;
mod report;
mod stats;
mod switching;

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use testkit::{AppDir, TestServer};

struct Args {
    hangar: String,
    oha: PathBuf,
    nginx: PathBuf,
    out: PathBuf,
    json: PathBuf,
    rounds: u32,
    seconds: u32,
    cold_starts: u32,
}

const USAGE: &str = "flags: --hangar PATH --oha PATH --nginx PATH --out FILE.md --json FILE.json \
                     --rounds N --seconds N --cold-starts N [--p5-only]";

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        hangar: "target/release/hangar".to_owned(),
        oha: PathBuf::from("oha"),
        nginx: PathBuf::from("nginx"),
        out: PathBuf::from("BENCHMARKS.md"),
        json: PathBuf::from("target/bench/results.json"),
        rounds: 3,
        seconds: 5,
        cold_starts: 30,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value; {USAGE}"));
        match flag.as_str() {
            "--hangar" => args.hangar = value()?,
            "--oha" => args.oha = PathBuf::from(value()?),
            "--nginx" => args.nginx = PathBuf::from(value()?),
            "--out" => args.out = PathBuf::from(value()?),
            "--json" => args.json = PathBuf::from(value()?),
            "--rounds" => args.rounds = value()?.parse()?,
            "--seconds" => args.seconds = value()?.parse()?,
            "--cold-starts" => args.cold_starts = value()?.parse()?,
            "--p5-only" => {
                // For working on listing speed: prints P5 and writes nothing.
                let hangar = std::fs::canonicalize(&args.hangar)?.display().to_string();
                let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
                let p5 = runtime.block_on(listing::listing(&hangar, &testkit::testapp_bin(&hangar)))?;
                eprintln!(
                    "API p50 {} p99 {}; all p50 {}; CLI list-rev p50 {}; list p50 {}",
                    stats::ms(p5.api.p50),
                    stats::ms(p5.api.p99),
                    stats::ms(p5.api_all.p50),
                    stats::ms(p5.cli_list_rev.p50),
                    stats::ms(p5.cli_list.p50)
                );
                std::process::exit(0);
            }
            other => bail!("unknown flag {other}; {USAGE}"),
        }
    }
    if args.rounds == 0 || args.seconds == 0 || args.cold_starts == 0 {
        bail!("--rounds, --seconds and --cold-starts must be at least 1");
    }
    Ok(args)
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let hangar = std::fs::canonicalize(&args.hangar).with_context(|| format!("no hangar binary at {}", args.hangar))?;
    let hangar = hangar.to_str().context("path is not UTF-8")?.to_owned();
    let testapp = testkit::testapp_bin(&hangar);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let machine = report::Machine::describe(&args.oha, &args.nginx);

    let server = TestServer::start_with(&hangar, &["--machine-type", "cpu=64"]);
    let settings = proxies::Settings {
        oha: args.oha.clone(),
        nginx: args.nginx.clone(),
        rounds: args.rounds,
        seconds: args.seconds,
    };
    eprintln!("P1: direct, nginx and hangar under oha ({} rounds)", args.rounds);
    let p1 = runtime.block_on(proxies::compare(&server, &testapp, &settings))?;
    eprintln!("P2: {} cold starts", args.cold_starts);
    let p2 = runtime.block_on(cold::cold_start(&server, &testapp, args.cold_starts))?;
    eprintln!("P3, P4: switching under load");
    let p34 = runtime.block_on(switching::switching(&server, &testapp))?;
    drop(server);
    eprintln!("P5: {} revisions", listing::REVISIONS);
    let p5 = runtime.block_on(listing::listing(&hangar, &testapp))?;

    let results = report::Results { machine, p1, p2, p34, p5 };
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
