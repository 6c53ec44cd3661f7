//! Crash trials: the server is killed with SIGKILL at a random moment while deploys,
//! set-revs, rollouts, queue submissions and calls run against it, then started again
//! on the same data dir, and checked:
//!
//! - the store passes SQLite's `integrity_check` and `foreign_key_check`;
//! - no process of the killed run (runner or build) outlives the restart;
//! - no revision is left Deploying, and the app's alias points at a Deployed revision;
//! - every queue request the server accepted (answered 202) completes, with its own
//!   result, and the app answers calls again.
//!
//! Every trial is reported on its own line; the program exits non-zero after the first
//! trial that breaks one of these. `--seed` makes a run's moments repeatable.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use reliability::{check_store, processes_in, revisions, testapp};
use serde_json::Value;
use testkit::{Http, TestServer, wait_until};

#[derive(Parser)]
#[command(about = "SIGKILL the server at random moments under mixed traffic and check what it comes back to")]
struct Args {
    /// The `hangar` binary (the test app is taken from beside it).
    #[arg(long, default_value = "target/debug/hangar")]
    hangar: String,
    /// How many trials to run.
    #[arg(long, default_value_t = 50)]
    trials: u32,
    /// Seed of the random moments and choices (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// The longest time, in milliseconds, that traffic runs before the kill.
    #[arg(long, default_value_t = 3000)]
    max_kill_after_ms: u64,
}

const APP: &str = "trial";
/// Scaling of the trial app: one runner kept, a few more under load, quick to set up.
const SCALING: &str = "[scaling]\nmin_concurrency = 1\nmax_concurrency = 3\nkeep_alive = 5\n\
                       [runner]\nmax_multiplexing = 4\n";

/// A queue request the server accepted, and what its result must say.
#[derive(Debug, Clone)]
struct Accepted {
    id: String,
    query: String,
}

impl Accepted {
    /// Its result's URL at the gateway of the server as it runs now (each start listens
    /// on new ports).
    fn result_url(&self, server: &TestServer) -> String {
        format!("{}/queue/default/{APP}/requests/{}", server.gateway_url, self.id)
    }

    fn status_url(&self, server: &TestServer) -> String {
        format!("{}/status", self.result_url(server))
    }
}

/// What the traffic of one trial did.
#[derive(Debug, Default)]
struct Traffic {
    accepted: Vec<Accepted>,
    /// Operations started, by kind.
    started: std::collections::BTreeMap<&'static str, u32>,
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    // Runners start in their revision's directory: the test app needs an absolute path.
    args.hangar = std::fs::canonicalize(&args.hangar)
        .with_context(|| format!("no hangar binary at {}", args.hangar))?
        .display()
        .to_string();
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    println!("crash trials: {} trials, seed {seed}, server {}", args.trials, args.hangar);
    let mut rng = fastrand::Rng::with_seed(seed);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mut server = TestServer::start(&args.hangar);
    for generation in 0..2 {
        let app = testapp(&args.hangar, APP, generation, SCALING);
        let out = server.run(&["deploy", app.path_str(), "--auth", "public"]);
        if !out.success() {
            bail!("the first deploys failed: {}", out.stderr);
        }
    }
    let http = Http::new();
    let mut generation = 2;
    let mut all_accepted = Vec::new();
    let started = Instant::now();
    for trial in 1..=args.trials {
        let kill_after = Duration::from_millis(rng.u64(100..=args.max_kill_after_ms.max(100)));
        let stop = Arc::new(AtomicBool::new(false));
        let traffic = Arc::new(Mutex::new(Traffic::default()));
        let tasks = runtime.block_on(async {
            spawn_traffic(&server, &args.hangar, &mut generation, rng.u64(..), stop.clone(), traffic.clone())
        });
        // The random moment of the crash; the traffic runs meanwhile.
        std::thread::sleep(kill_after);
        server.kill();
        let leftovers = processes_in(&server.data_dir());
        stop.store(true, Ordering::SeqCst);
        runtime.block_on(async {
            for task in tasks {
                let _ = task.await;
            }
        });
        let traffic = std::mem::take(&mut *traffic.lock().unwrap_or_else(|e| e.into_inner()));

        server.restart();
        let result = check(&server, &http, &leftovers, &traffic.accepted);
        let ops: Vec<String> = traffic.started.iter().map(|(op, n)| format!("{n} {op}")).collect();
        let line = format!(
            "trial {trial:>2}: killed after {:>4} ms ({}), {} queue requests accepted, {} processes left by the killed run",
            kill_after.as_millis(),
            ops.join(", "),
            traffic.accepted.len(),
            leftovers.len(),
        );
        match result {
            Ok(()) => println!("{line}: clean"),
            Err(e) => {
                println!("{line}: FAILED: {e:#}");
                println!("server output:\n{}", server.output());
                bail!("trial {trial} of seed {seed} failed: {e:#}");
            }
        }
        all_accepted.extend(traffic.accepted);
    }
    // Nothing accepted in an earlier trial went missing in a later one.
    for request in &all_accepted {
        let status = http.get(&request.status_url(&server), Some(&server.root_key));
        if status.status != 200 || status.json()["status"] != "COMPLETED" {
            bail!("queue request {} is gone or not completed at the end: {}", request.id, status.text());
        }
    }
    println!(
        "{} of {} trials clean in {:.0} s; {} queue requests accepted, every one completed with its result",
        args.trials,
        args.trials,
        started.elapsed().as_secs_f64(),
        all_accepted.len()
    );
    Ok(())
}

/// Starts the trial's traffic: a deployer, a switcher, a roller, a queue submitter and a
/// caller, each looping until `stop`, at random paces seeded by `seed`.
fn spawn_traffic(
    server: &TestServer,
    hangar: &str,
    generation: &mut u64,
    seed: u64,
    stop: Arc<AtomicBool>,
    traffic: Arc<Mutex<Traffic>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    let cli = |args: Vec<String>| {
        let mut command = tokio::process::Command::from(server.cli());
        command.args(args).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
        command
    };
    let count = {
        let traffic = traffic.clone();
        move |op: &'static str| *traffic.lock().unwrap_or_else(|e| e.into_inner()).started.entry(op).or_default() += 1
    };

    // Deploys of new generations, rolling or recreate. The app dirs live until the
    // task ends.
    let apps: Vec<_> = (0..4)
        .map(|i| {
            *generation += 1;
            // Half of them have a build step, so that some kills land in a build.
            let build = if i % 2 == 1 { "build = [\"sh\", \"-c\", \"sleep 0.3\"]\n" } else { "" };
            testapp(hangar, APP, *generation, &format!("{build}{SCALING}"))
        })
        .collect();
    let commands: Vec<_> = apps
        .iter()
        .enumerate()
        .map(|(i, app)| {
            let strategy = if i % 2 == 0 { "rolling" } else { "recreate" };
            cli(vec!["deploy".into(), app.path_str().into(), "--strategy".into(), strategy.into()])
        })
        .collect();
    let (flag, counter) = (stop.clone(), count.clone());
    let mut rng = fastrand::Rng::with_seed(seed);
    let pause = rng.u64(0..300);
    tasks.push(tokio::spawn(async move {
        let _apps = apps;
        tokio::time::sleep(Duration::from_millis(pause)).await;
        for mut command in commands {
            if flag.load(Ordering::SeqCst) {
                break;
            }
            counter("deploys");
            let _ = command.status().await;
        }
    }));

    // Set-revs to a random deployed revision, with either strategy.
    let (flag, counter, api, key) = (stop.clone(), count.clone(), server.api_url.clone(), server.root_key.clone());
    let base = server.cli();
    let mut rng = fastrand::Rng::with_seed(seed ^ 1);
    tasks.push(tokio::spawn(async move {
        let client = reqwest::Client::new();
        while !flag.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(rng.u64(50..400))).await;
            let Ok(reply) = client
                .get(format!("{api}/v1/apps/{APP}/revisions?all=true"))
                .header("authorization", format!("Key {key}"))
                .send()
                .await
            else {
                continue;
            };
            let Ok(list) = reply.json::<Vec<Value>>().await else { continue };
            let deployed: Vec<&str> =
                list.iter().filter(|r| r["status"] == "deployed").filter_map(|r| r["id"].as_str()).collect();
            if deployed.is_empty() {
                continue;
            }
            let target = deployed[rng.usize(..deployed.len())].to_owned();
            let strategy = if rng.bool() { "rolling" } else { "recreate" };
            counter("set-revs");
            let mut command = tokio::process::Command::from(clone_command(&base));
            command.args(["apps", "set-rev", APP, &target, "--strategy", strategy]);
            let _ = command.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).status().await;
        }
    }));

    // Rollouts, graceful or forced.
    let (flag, counter, base) = (stop.clone(), count.clone(), server.cli());
    let mut rng = fastrand::Rng::with_seed(seed ^ 2);
    tasks.push(tokio::spawn(async move {
        while !flag.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(rng.u64(100..800))).await;
            let mut command = tokio::process::Command::from(clone_command(&base));
            command.args(["apps", "rollout", APP]);
            if rng.bool() {
                command.arg("--force");
            }
            counter("rollouts");
            let _ = command.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).status().await;
        }
    }));

    // Queue submissions; the ones answered 202 are accepted and must complete.
    let (flag, counter, gateway) = (stop.clone(), count.clone(), server.gateway_url.clone());
    let traffic_queue = traffic.clone();
    let mut rng = fastrand::Rng::with_seed(seed ^ 3);
    tasks.push(tokio::spawn(async move {
        let client = reqwest::Client::new();
        while !flag.load(Ordering::SeqCst) {
            let query = format!("delay_ms={}&n={}", rng.u64(0..200), rng.u64(..));
            counter("queue submits");
            let submitted = client.post(format!("{gateway}/queue/default/{APP}/work?{query}")).body("{}").send().await;
            // Refused, or sent to a server that is gone: not accepted.
            let Some(reply) = submitted.ok().filter(|r| r.status().as_u16() == 202) else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let Ok(json) = reply.json::<Value>().await else { continue };
            let Some(id) = json["request_id"].as_str() else { continue };
            let accepted = Accepted { id: id.to_owned(), query };
            traffic_queue.lock().unwrap_or_else(|e| e.into_inner()).accepted.push(accepted);
            tokio::time::sleep(Duration::from_millis(rng.u64(5..40))).await;
        }
    }));

    // Plain calls through the gateway.
    let (flag, counter, gateway) = (stop, count, server.gateway_url.clone());
    tasks.push(tokio::spawn(async move {
        let client = reqwest::Client::new();
        while !flag.load(Ordering::SeqCst) {
            counter("calls");
            let _ = client.get(format!("{gateway}/default/{APP}/")).send().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }));
    tasks
}

/// A copy of `command`'s program, arguments and environment, for another run.
fn clone_command(command: &std::process::Command) -> std::process::Command {
    let mut copy = std::process::Command::new(command.get_program());
    copy.args(command.get_args()).env_clear();
    for (name, value) in command.get_envs() {
        if let Some(value) = value {
            copy.env(name, value);
        }
    }
    copy.stdin(std::process::Stdio::null());
    copy
}

/// What must hold once the server is back.
fn check(server: &TestServer, http: &Http, leftovers: &[u32], accepted: &[Accepted]) -> anyhow::Result<()> {
    check_store(server).context("the store")?;

    // No revision stuck Deploying: the restarted server has settled every interrupted
    // deploy before it answers.
    let list = revisions(http, server, APP)?;
    if let Some(stuck) = list.iter().find(|r| r["status"] == "deploying") {
        bail!("revision {} is still deploying after the restart", stuck["id"]);
    }
    let app = http.get(&format!("{}/v1/apps/{APP}", server.api_url), Some(&server.root_key)).json();
    let current = app["revision"].as_str().context("the app has no current revision")?;
    let status = list.iter().find(|r| r["id"] == current).map(|r| r["status"].clone());
    if status != Some(Value::from("deployed")) {
        bail!("the alias points at revision {current}, which is {status:?}");
    }

    // Nothing of the killed run survives it for long: the restart ends what it finds.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let alive: Vec<u32> = leftovers.iter().copied().filter(|pid| reliability::alive(*pid)).collect();
        if alive.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            bail!("processes of the killed run are still alive 30 s after the restart: {alive:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    // Every accepted queue request completes with its own result.
    for request in accepted {
        let status = wait_until(&format!("queue request {} to complete", request.id), || {
            let reply = http.get(&request.status_url(server), Some(&server.root_key));
            (reply.status != 200 || reply.json()["status"] == "COMPLETED").then_some(reply)
        });
        if status.status != 200 {
            bail!("accepted queue request {} is lost: {} {}", request.id, status.status, status.text());
        }
        let status = status.json();
        if !status["error"].is_null() {
            bail!("queue request {} failed: {status}", request.id);
        }
        let result = http.get(&request.result_url(server), Some(&server.root_key));
        if result.status != 200 || result.json()["query"] != request.query.as_str() {
            bail!("queue request {} has a wrong result: {} {}", request.id, result.status, result.text());
        }
    }

    // And the app serves again.
    let url = format!("{}/default/{APP}/", server.gateway_url);
    wait_until("the app to answer a call", || (http.get(&url, None).status == 200).then_some(()));
    Ok(())
}
