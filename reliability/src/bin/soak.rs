//! A soak: the server runs for a while under moderate load (calls at a steady rate and
//! queue submissions) with a rollout and a set-rev every so often, and its resident
//! memory, open files and runner processes are sampled throughout. It passes when they
//! stay flat (the last stretch of the run is not above the first, after warm-up, by more
//! than a small margin), no call failed and every queue request completed.
//!
//! Writes the samples as a Markdown table (`--out`) and prints the summary.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use reliability::{open_files, process_trees_in, resident_kib, revisions, testapp};
use testkit::{Http, Prober, TestServer, wait_until};

#[derive(Parser)]
#[command(about = "Run the server under load with rollouts and set-revs, and watch that nothing grows")]
struct Args {
    /// The `hangar` binary (the test app is taken from beside it).
    #[arg(long, default_value = "target/release/hangar")]
    hangar: String,
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 300)]
    seconds: u64,
    /// Calls per second through the gateway.
    #[arg(long, default_value_t = 100)]
    rate: u32,
    /// Seconds between operations (alternately a rollout and a set-rev).
    #[arg(long, default_value_t = 15)]
    every: u64,
    /// Where to write the samples.
    #[arg(long, default_value = "target/reliability/soak.md")]
    out: std::path::PathBuf,
}

const APP: &str = "soak";
const SCALING: &str = "[scaling]\nmin_concurrency = 2\nmax_concurrency = 4\nkeep_alive = 10\n\
                       [runner]\nmax_multiplexing = 8\n";
/// Seconds between samples.
const SAMPLE_EVERY: u64 = 5;
/// Growth allowed for memory: the last window's mean over the most the server held up
/// to the end of the first window (the allocator gives memory back now and then, so a
/// first window's mean alone may catch it at a low).
const MEMORY_MARGIN: f64 = 1.15;
/// Open files allowed above the first window (connections come and go).
const FILES_MARGIN: usize = 16;

struct Sample {
    at: Duration,
    rss_kib: u64,
    files: usize,
    runner_processes: usize,
    operation: String,
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    args.hangar = std::fs::canonicalize(&args.hangar)
        .with_context(|| format!("no hangar binary at {}", args.hangar))?
        .display()
        .to_string();
    let server = TestServer::start(&args.hangar);
    let pid = server.pid().context("the server is not running")?;
    let http = Http::new();
    let mut revision_ids = Vec::new();
    for generation in 0..2 {
        let app = testapp(&args.hangar, APP, generation, SCALING);
        let out = server.run(&["deploy", app.path_str(), "--auth", "public", "--json"]);
        if !out.success() {
            bail!("deploy failed: {}", out.stderr);
        }
        revision_ids.push(out.json()["revision"].as_str().context("deploy names no revision")?.to_owned());
    }
    println!("soak: {} s at {} calls/s, an operation every {} s", args.seconds, args.rate, args.every);

    let prober = Prober::start(&format!("{}/default/{APP}/work?delay_ms=5", server.gateway_url), None, args.rate);
    let started = Instant::now();
    let mut samples: Vec<Sample> = Vec::new();
    let mut queued = Vec::new();
    let mut next_operation = Duration::from_secs(args.every);
    let mut operations = 0u32;
    let mut next_sample = Duration::ZERO;
    while started.elapsed() < Duration::from_secs(args.seconds) {
        let mut operation = String::new();
        if started.elapsed() >= next_operation {
            operations += 1;
            operation = if operations % 2 == 1 {
                server.run(&["apps", "rollout", APP]).ok();
                "rollout".to_owned()
            } else {
                // The second deploy is current at first: the first set-rev goes back.
                let target = &revision_ids[(operations as usize / 2 + 1) % 2];
                server.run(&["apps", "set-rev", APP, target]).ok();
                format!("set-rev {}", &target[..8])
            };
            next_operation += Duration::from_secs(args.every);
        }
        // A queue request a second.
        let reply = http.send(
            "POST",
            &format!("{}/queue/default/{APP}/work?n={}", server.gateway_url, queued.len()),
            None,
            &[],
            b"{}".to_vec(),
        );
        if reply.status == 202 {
            queued.push((queued.len(), reply.json()["request_id"].as_str().unwrap_or_default().to_owned()));
        } else {
            bail!("a queue submission was refused: {} {}", reply.status, reply.text());
        }
        if started.elapsed() >= next_sample || !operation.is_empty() {
            samples.push(Sample {
                at: started.elapsed(),
                rss_kib: resident_kib(pid).context("the server is gone")?,
                files: open_files(pid).context("the server is gone")?,
                runner_processes: process_trees_in(&server.data_dir()),
                operation,
            });
            next_sample = started.elapsed() + Duration::from_secs(SAMPLE_EVERY);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let report = prober.finish();
    for (n, id) in &queued {
        let url = format!("{}/queue/default/{APP}/requests/{id}", server.gateway_url);
        let status = wait_until("a queue request to complete", || {
            let reply = http.get(&format!("{url}/status"), None);
            (reply.json()["status"] == "COMPLETED").then_some(reply.json())
        });
        let result = http.get(&url, None);
        if !status["error"].is_null() || result.json()["query"] != format!("n={n}") {
            bail!("queue request {id} failed or has a wrong result: {status} {}", result.text());
        }
    }
    let listed = revisions(&http, &server, APP)?.len();
    write_report(&args, &samples, report.sent, report.failures.len(), queued.len(), listed)
}

fn write_report(
    args: &Args,
    samples: &[Sample],
    calls: u64,
    failed: usize,
    queued: usize,
    revisions: usize,
) -> anyhow::Result<()> {
    // The first window starts after a minute of warm-up (or a fifth of the run), the
    // last is the final fifth.
    let warm = Duration::from_secs((args.seconds / 5).min(60));
    let window = Duration::from_secs(args.seconds / 5);
    let first: Vec<&Sample> = samples.iter().filter(|s| s.at >= warm && s.at < warm + window).collect();
    let last: Vec<&Sample> =
        samples.iter().filter(|s| s.at >= Duration::from_secs(args.seconds).saturating_sub(window)).collect();
    let mean =
        |set: &[&Sample], f: fn(&Sample) -> u64| set.iter().map(|s| f(s)).sum::<u64>() as f64 / set.len().max(1) as f64;
    let max = |set: &[&Sample], f: fn(&Sample) -> u64| set.iter().map(|s| f(s)).max().unwrap_or(0);
    let held_early = samples.iter().filter(|s| s.at < warm + window).map(|s| s.rss_kib).max().unwrap_or(0);
    let rss = (mean(&first, |s| s.rss_kib), mean(&last, |s| s.rss_kib));
    let files = (max(&first, |s| s.files as u64), max(&last, |s| s.files as u64));
    let runners = (max(&first, |s| s.runner_processes as u64), max(&last, |s| s.runner_processes as u64));
    let rss_ratio = rss.1 / (held_early as f64).max(rss.0).max(1.0);
    let flat_memory = rss_ratio <= MEMORY_MARGIN;
    let flat_files = files.1 <= files.0 + FILES_MARGIN as u64;
    let flat_runners = runners.1 <= runners.0.max(4);

    let mut out = String::new();
    writeln!(
        out,
        "Soak of {} s at {} calls/s (each 5 ms in the app) plus a queue request a second, with a \
         rollout or a set-rev every {} s.\n",
        args.seconds, args.rate, args.every
    )?;
    writeln!(out, "| | first window | last window | |\n|---|---|---|---|")?;
    writeln!(
        out,
        "| server resident memory (mean) | {:.1} MiB (most until then: {:.1} MiB) | {:.1} MiB | ×{rss_ratio:.2} of the \
         most ({}) |",
        rss.0 / 1024.0,
        held_early as f64 / 1024.0,
        rss.1 / 1024.0,
        if flat_memory { "flat" } else { "**grows**" }
    )?;
    writeln!(
        out,
        "| server open files (max) | {} | {} | {} |",
        files.0,
        files.1,
        if flat_files { "flat" } else { "**grows**" }
    )?;
    writeln!(
        out,
        "| runner processes (max) | {} | {} | {} |",
        runners.0,
        runners.1,
        if flat_runners { "flat" } else { "**grows**" }
    )?;
    writeln!(
        out,
        "\nCalls: {calls} sent, {failed} failed. Queue requests: {queued}, every one completed with its \
         result. Revisions listed at the end: {revisions}.\n"
    )?;
    writeln!(out, "| at | resident memory | open files | runner processes | operation |\n|---|---|---|---|---|")?;
    for s in samples {
        writeln!(
            out,
            "| {:.0} s | {:.1} MiB | {} | {} | {} |",
            s.at.as_secs_f64(),
            s.rss_kib as f64 / 1024.0,
            s.files,
            s.runner_processes,
            s.operation
        )?;
    }
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, &out)?;
    println!("{out}");
    println!("samples written to {}", args.out.display());
    if failed > 0 || !flat_memory || !flat_files || !flat_runners {
        bail!(
            "the soak is not clean: {failed} failed calls, memory ×{rss_ratio:.2}, files {files:?}, runners {runners:?}"
        );
    }
    Ok(())
}
