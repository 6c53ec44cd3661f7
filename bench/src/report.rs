//! BENCHMARKS.md and the JSON the plot is drawn from.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::cold::Cold;
use crate::fast_runner::{self, FastRunner};
use crate::listing::Listing;
use crate::proxies::{CONNECTIONS, FIXED_RATE, Proxies};
use crate::stats::{ms, ms_f};
use crate::stores::{self, Stores};
use crate::switching::{RATE, Switching};

pub(crate) struct Results {
    pub(crate) machine: Machine,
    pub(crate) p1: Proxies,
    pub(crate) p1_fast: FastRunner,
    pub(crate) p2: Cold,
    pub(crate) p34: Switching,
    pub(crate) p5: Listing,
    pub(crate) p6: Stores,
    pub(crate) p7: Vec<crate::failover::Failover>,
}

/// What the figures were measured on and with.
pub(crate) struct Machine {
    date: String,
    cpu: String,
    cores: usize,
    memory: String,
    kernel: String,
    rustc: String,
    nginx: String,
    oha: String,
    commit: String,
}

impl Machine {
    pub(crate) fn describe(oha: &Path, nginx: &Path) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let field = |text: &str, name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
                .unwrap_or_else(|| "unknown".to_owned())
        };
        let memory = field(&meminfo, "MemTotal")
            .trim_end_matches(" kB")
            .parse::<u64>()
            .map(|kb| format!("{:.1} GiB", kb as f64 / (1024.0 * 1024.0)))
            .unwrap_or_else(|_| "unknown".to_owned());
        Machine {
            date: time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            cpu: field(&cpuinfo, "model name"),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory,
            kernel: output(Command::new("uname").arg("-r")),
            rustc: output(Command::new("rustc").arg("--version")),
            // nginx prints its version to stderr.
            nginx: output(Command::new(nginx).arg("-v")).trim_start_matches("nginx version: ").to_owned(),
            oha: output(Command::new(oha).arg("--version")),
            commit: output(Command::new("git").args(["rev-parse", "--short", "HEAD"])),
        }
    }
}

/// A command's first line of output (stdout, else stderr).
fn output(command: &mut Command) -> String {
    match command.output() {
        Ok(out) => {
            let text = if out.stdout.is_empty() { out.stderr } else { out.stdout };
            String::from_utf8_lossy(&text).lines().next().unwrap_or("").trim().to_owned()
        }
        Err(_) => "unknown".to_owned(),
    }
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "**missed**" }
}

pub(crate) fn markdown(r: &Results) -> String {
    let m = &r.machine;
    let (direct, nginx, hangar) = (r.p1.get("direct"), r.p1.get("nginx"), r.p1.get("hangar"));
    let sandboxed = r.p1.get(crate::proxies::SANDBOXED);
    let sandbox_ratio = sandboxed.max_rps / hangar.max_rps.max(1e-9);
    let rps_ratio = hangar.max_rps / nginx.max_rps.max(1e-9);
    let cpu_ratio = match (hangar.cpu_per_call, nginx.cpu_per_call) {
        (Some(h), Some(n)) => {
            format!("hangar ÷ nginx {:.2}", h.total().as_secs_f64() / n.total().as_secs_f64().max(1e-12))
        }
        _ => "not measured".to_owned(),
    };
    let added_p50 = hangar.p50.saturating_sub(direct.p50);
    let added_p99 = hangar.p99.saturating_sub(direct.p99);
    let nginx_added_p50 = nginx.p50.saturating_sub(direct.p50);
    let nginx_added_p99 = nginx.p99.saturating_sub(direct.p99);
    let mut out = format!(
        "# Benchmarks\n\n\
         Reproduce with `bench/run.sh` (release build; it starts hangar, the workspace test app\n\
         as the runner, and nginx; `oha` drives the load). Written by the last run:\n\n\
         - date: {date}, commit {commit}\n\
         - machine: {cpu}, {cores} cores, {memory}, Linux {kernel} (shared with other work, so\n  \
           read the ratios and differences, taken within one run, rather than absolute times)\n\
         - {rustc}; nginx {nginx}; {oha}\n\n\
         ![P1 and P4](docs/benchmarks.png)\n\n\
         ## P1: a proxy hop\n\n\
         One runner of the test app (`max_multiplexing = 1024`, quiet) called straight on its port,\n\
         through nginx ({nginx}, `worker_processes auto`, keep-alive upstream, no access log) and\n\
         through hangar's gateway, on a server started with `--sandbox none` (so that the runner\n\
         listens on the machine's loopback, where nginx and oha reach it); and the same app on a\n\
         second, sandboxed server (the default), whose runner is in a network namespace of its\n\
         own that only the gateway connects into. Each figure is the median of {rounds} rounds (the order rotates\n\
         each round) of {secs} s runs: the most calls per second with {conns} connections, and\n\
         latency at a fixed {fixed} calls/s (16 connections, oha's latency correction). Load\n\
         generator, proxies and runner share the {cores} cores.\n\n\
         The proxy's CPU time per call (user + system, from `/proc` during the throughput runs)\n\
         is also shown: unlike calls per second it hardly moves with the other work on the machine.\n\n\
         | | max calls/s | proxy CPU per call (user + system) | p50 at {fixed}/s | p99 at {fixed}/s |\n|---|---|---|---|---|\n",
        date = m.date,
        commit = m.commit,
        cpu = m.cpu,
        cores = m.cores,
        memory = m.memory,
        kernel = m.kernel,
        rustc = m.rustc,
        nginx = m.nginx,
        oha = m.oha,
        rounds = r.p1.rounds,
        secs = r.p1.seconds,
        conns = CONNECTIONS,
        fixed = FIXED_RATE,
    );
    for f in &r.p1.figures {
        let cpu = f.cpu_per_call.map_or("—".to_owned(), |c| {
            format!("{:.1} µs ({:.1} + {:.1})", micros(c.total()), micros(c.user), micros(c.system))
        });
        out.push_str(&format!("| {} | {:.0} | {cpu} | {} | {} |\n", f.name, f.max_rps, ms(f.p50), ms(f.p99)));
    }
    out.push_str(&format!(
        "\n| target | figure | |\n|---|---|---|\n\
         | hangar calls/s ÷ nginx calls/s ≥ 1.0 | **{rps_ratio:.2}** (CPU per call: {cpu_ratio}) | {} |\n\
         | sandboxed runner's calls/s ÷ unconfined runner's (unchanged: ≥ 0.95) | **{sandbox_ratio:.2}** | {} |\n\
         | hangar p50 − direct p50 ≤ 0.2 ms | **{}** (nginx: {}) | {} |\n\
         | hangar p99 − direct p99 ≤ 1 ms | **{}** (nginx: {}) | {} |\n",
        verdict(rps_ratio >= 1.0),
        verdict(sandbox_ratio >= 0.95),
        ms(added_p50),
        ms(nginx_added_p50),
        verdict(added_p50.as_secs_f64() <= 0.0002),
        ms(added_p99),
        ms(nginx_added_p99),
        verdict(added_p99.as_secs_f64() <= 0.001),
    ));

    out.push_str(&fast_runner_table(&r.p1_fast));

    let c = &r.p2;
    out.push_str(&format!(
        "\n## P2: cold start\n\n\
         {runs} apps deployed with `--strategy recreate` (so no runner), each called once: the time to\n\
         the first byte of that call, against the test app's own time from process start to a\n\
         passing health check, measured by starting it by hand before each cold call. The same\n\
         cold calls go, alternating, to a second server started with `--sandbox none`: the\n\
         difference is what the sandbox (bwrap, setpriv, a network namespace, slirp4netns, a\n\
         cgroup) adds to a start.\n\n\
         | | p50 | p99 |\n|---|---|---|\n\
         | the test app's own start to healthy | {} | {} |\n\
         | first byte of a cold call, sandboxed (the default) | {} | {} |\n\
         | first byte of a cold call, `--sandbox none` | {} | {} |\n\n\
         Overhead (p50 first byte, sandboxed − p50 own start): **{}**; target ≤ 25 ms: {}. \
         The sandbox's share (sandboxed − `--sandbox none`, p50): {}.\n",
        ms(c.own.p50),
        ms(c.own.p99),
        ms(c.first_byte.p50),
        ms(c.first_byte.p99),
        ms(c.unconfined.p50),
        ms(c.unconfined.p99),
        ms(c.overhead()),
        verdict(c.overhead().as_secs_f64() <= 0.025),
        ms(c.sandbox_cost()),
        runs = c.runs,
    ));

    let s = &r.p34;
    let rolling_overhead = s.rolling.p50.saturating_sub(s.own_start);
    out.push_str(&format!(
        "\n## P3: switching time\n\n\
         How long `apps set-rev` takes to return, without load, alternating between two revisions.\n\
         A rolling switch waits for a runner of the target to be set up, so its figure is set\n\
         against the test app's own start-to-healthy time ({own}, measured by hand in the same loop).\n\n\
         | | runs | p50 | p99 |\n|---|---|---|---|\n\
         | recreate | {rn} | {r50} | {r99} |\n\
         | rolling | {ln} | {l50} | {l99} |\n\n\
         Recreate p99 ≤ 10 ms: **{r99}**, {rv}. Rolling p50 − own start ≤ 100 ms: **{ro}**, {lv}.\n",
        own = ms(s.own_start),
        rn = s.recreate_runs,
        r50 = ms(s.recreate.p50),
        r99 = ms(s.recreate.p99),
        rv = verdict(s.recreate.p99.as_secs_f64() <= 0.010),
        ln = s.rolling_runs,
        l50 = ms(s.rolling.p50),
        l99 = ms(s.rolling.p99),
        ro = ms(rolling_overhead),
        lv = verdict(rolling_overhead.as_secs_f64() <= 0.100),
    ));

    out.push_str(&format!(
        "\n## P4: calls during operations\n\n\
         Calls at {RATE}/s (each takes 5 ms in the app; `min_concurrency = 2`, `max_multiplexing = 8`)\n\
         while operations run one after another. Each operation's window runs from its start until\n\
         it is done, and at least 1 s. Steady p95 (the 2 s before the first operation): {steady}.\n\
         Calls sent: {sent}; failed: **{failed}** (target 0: {fv}).\n\n\
         | operation | calls | p95 | ÷ steady p95 (target ≤ 1.1) |\n|---|---|---|---|\n",
        steady = ms(s.steady_p95),
        sent = s.sent,
        failed = s.failed,
        fv = verdict(s.failed == 0),
    ));
    for (name, n, p95) in &s.during {
        let ratio = p95.as_secs_f64() / s.steady_p95.as_secs_f64().max(1e-9);
        out.push_str(&format!("| {name} | {n} | {} | **{ratio:.2}** {} |\n", ms(*p95), verdict(ratio <= 1.1)));
    }

    let l = &r.p5;
    out.push_str(&format!(
        "\n## P5: listing and the CLI\n\n\
         An app with {n} revisions (one deployed, the rest written with the store's own\n\
         `insert_revision` while the server was stopped). A listing shows the newest 100 (and the\n\
         current one) unless asked for `--all`. `GET /v1/apps/many/revisions` to the last byte\n\
         ({api_runs} runs each), and whole `hangar` processes, start to exit ({cli_runs} runs each).\n\n\
         | | p50 | p99 | target | |\n|---|---|---|---|---|\n\
         | API: list revisions (newest 100 of {n}) | {a50} | {a99} | ≤ 20 ms | {av} |\n\
         | API: list all {n} revisions (`?all=true`) | {f50} | {f99} | | |\n\
         | `hangar apps list-rev many` | {r50} | {r99} | ≤ 50 ms | {rv} |\n\
         | `hangar apps list` | {c50} | {c99} | ≤ 50 ms | {cv} |\n",
        n = l.revisions,
        api_runs = l.api_runs,
        cli_runs = l.cli_runs,
        a50 = ms(l.api.p50),
        a99 = ms(l.api.p99),
        av = verdict(l.api.p50.as_secs_f64() <= 0.020),
        f50 = ms(l.api_all.p50),
        f99 = ms(l.api_all.p99),
        r50 = ms(l.cli_list_rev.p50),
        r99 = ms(l.cli_list_rev.p99),
        rv = verdict(l.cli_list_rev.p50.as_secs_f64() <= 0.050),
        c50 = ms(l.cli_list.p50),
        c99 = ms(l.cli_list.p99),
        cv = verdict(l.cli_list.p50.as_secs_f64() <= 0.050),
    ));
    out.push_str(&stores_table(&r.p6));
    out.push_str(&failover_table(&r.p7));
    out.push('\n');
    out.push_str(include_str!("../FIXES.md"));
    out
}

/// The P6 section: the store on PostgreSQL against SQLite. `--stores-only` prints it.
pub(crate) fn stores_table(p: &Stores) -> String {
    let (q, g) = (&p.sqlite, &p.postgres);
    let mut out = format!(
        "\n## P6: the store on PostgreSQL against SQLite\n\n\
         Two servers side by side, one on the embedded SQLite store (the default) and one on a\n\
         database of a private PostgreSQL {version} cluster on the same machine\n\
         (`scripts/pg/cluster.sh`, reached over TCP on 127.0.0.1), measured in turns through the\n\
         API and the gateway as a user would. Both sync every commit to disk: SQLite in WAL mode\n\
         with `synchronous = FULL` (hangar's setting), PostgreSQL with its defaults (`fsync`,\n\
         `synchronous_commit` and `full_page_writes` on, which the test cluster turns off and\n\
         the benchmark turns back on). Load generator, both servers, their runners and PostgreSQL\n\
         share the {cores} cores, so read the ratios. `bench/run.sh --stores-only` prints this\n\
         section; the full `bench/run.sh` writes it here.\n\n\
         - list-rev: `GET /v1/apps/many/revisions` (the newest 100 of {revisions} revisions, written\n  \
           with the store's own `insert_revision` while the server was stopped), to the last byte,\n  \
           from {list_clients} clients at once, each one call after the other; {rounds} rounds of {secs} s on each store.\n\
         - deploy: a small app deployed with `--strategy recreate` (a new revision each time; recreate\n  \
           starts no runner), {deploys} times on each store, alternating, through the API as `hangar deploy`\n  \
           makes it: from the upload until the revision is deployed, asked every 2 ms (the CLI\n  \
           asks every 250 ms, which would round most deploys up to a quarter of a second).\n\
         - queue submit: `POST /queue/default/queued` of a public app from {queue_clients} clients at once,\n  \
           {rounds} rounds of {secs} s on each store. A submission is acknowledged (202) only once it is\n  \
           stored. The app's one runner (`max_multiplexing = 64`) answers at once and takes every\n  \
           request, so that the backlog stays short (each submission counts the requests ahead of\n  \
           it) and every request is also started and completed in the store while submissions go\n  \
           on: the queue's whole write path, not the insert alone. Completed/s runs from a round's\n  \
           first submission until its last request is completed.\n\n\
         | | SQLite | PostgreSQL | PostgreSQL ÷ SQLite |\n|---|---|---|---|\n",
        version = p.postgres_version,
        cores = p.cores,
        revisions = stores::REVISIONS,
        list_clients = stores::LIST_CLIENTS,
        rounds = p.rounds,
        secs = p.seconds,
        deploys = stores::DEPLOYS,
        queue_clients = stores::QUEUE_CLIENTS,
    );
    let rate = |name: &str, q: f64, g: f64, digits: usize| {
        format!("| {name} | {q:.digits$} | {g:.digits$} | **{:.2}** |\n", Stores::ratio(g, q))
    };
    let time = |name: &str, q: Duration, g: Duration| {
        format!("| {name} | {} | {} | **{:.2}** |\n", ms(q), ms(g), Stores::ratio(g.as_secs_f64(), q.as_secs_f64()))
    };
    out.push_str(&rate("list-rev: calls/s", q.list.per_s, g.list.per_s, 0));
    out.push_str(&time("list-rev: p50", q.list.latency.p50, g.list.latency.p50));
    out.push_str(&time("list-rev: p99", q.list.latency.p99, g.list.latency.p99));
    out.push_str(&rate("deploy: deploys/s", q.deploys_per_s, g.deploys_per_s, 1));
    out.push_str(&time("deploy: p50", q.deploy.p50, g.deploy.p50));
    out.push_str(&time("deploy: p99", q.deploy.p99, g.deploy.p99));
    out.push_str(&rate("queue submit: acknowledged/s", q.submit.per_s, g.submit.per_s, 0));
    out.push_str(&time("queue submit: p50", q.submit.latency.p50, g.submit.latency.p50));
    out.push_str(&time("queue submit: p99", q.submit.latency.p99, g.submit.latency.p99));
    out.push_str(&rate("queue: completed/s", q.completed_per_s, g.completed_per_s, 0));
    out.push_str(&format!(
        "\nCalls: list-rev {} on SQLite, {} on PostgreSQL; queue submissions {} and {}. The most\n\
         requests still waiting when a round of submissions ended: {} on SQLite, {} on PostgreSQL.\n",
        q.list.calls, g.list.calls, q.submit.calls, g.submit.calls, q.backlog, g.backlog,
    ));
    out
}

/// The P7 section: the failover window. `--failover-only` prints it.
pub(crate) fn failover_table(p: &[crate::failover::Failover]) -> String {
    let mut out = String::from(
        "\n## P7: failover of servers sharing a PostgreSQL store\n\n\
         Three servers on one database of a private PostgreSQL cluster; an app made through the\n\
         first runs there with one runner kept up; calls go through the second, one after\n\
         another; the first is killed (SIGKILL). Calls wait while no server runs the app and\n\
         are then served by the one that took it over, so the longest call after the kill is\n\
         the window. Fresh servers each round (`bench/run.sh --failover-only` prints this).\n\n\
         | `--lease-ttl` | rounds | window: each | longest | failed calls |\n|---|---|---|---|---|\n",
    );
    for f in p {
        let each: Vec<String> = f.windows.iter().map(|w| format!("{:.2} s", w.as_secs_f64())).collect();
        let longest = f.windows.iter().max().copied().unwrap_or_default();
        out.push_str(&format!(
            "| {} s | {} | {} | **{:.2} s** | {} |\n",
            f.ttl_s,
            f.windows.len(),
            each.join(", "),
            longest.as_secs_f64(),
            f.failed
        ));
    }
    out.push_str(
        "\nThe window is what was left of the dead server's lease since its last renewal (by the\n\
         database's clock), up to a tenth of the lease time until another server looks, and the\n\
         new runner's start. No call failed: they waited within their start deadline.\n",
    );
    out
}

/// The figures as JSON, for the plot.
pub(crate) fn json(r: &Results) -> Value {
    let p6: Vec<Value> = [("sqlite", &r.p6.sqlite), ("postgres", &r.p6.postgres)]
        .iter()
        .map(|(name, b)| {
            json!({
                "store": name,
                "list_rev_per_s": b.list.per_s, "list_rev_p50_ms": ms_f(b.list.latency.p50),
                "list_rev_p99_ms": ms_f(b.list.latency.p99),
                "deploy_p50_ms": ms_f(b.deploy.p50), "deploy_p99_ms": ms_f(b.deploy.p99),
                "deploys_per_s": b.deploys_per_s,
                "submit_per_s": b.submit.per_s, "submit_p50_ms": ms_f(b.submit.latency.p50),
                "submit_p99_ms": ms_f(b.submit.latency.p99), "completed_per_s": b.completed_per_s,
            })
        })
        .collect();
    json!({
        "p1": r.p1.figures.iter().map(|f| json!({
            "name": f.name, "max_rps": f.max_rps, "p50_ms": ms_f(f.p50), "p99_ms": ms_f(f.p99),
            "cpu_us_per_call": f.cpu_per_call.map(|c| micros(c.total())),
        })).collect::<Vec<_>>(),
        "p1_fixed_rate": FIXED_RATE,
        "p1_fast": r.p1_fast.contenders.iter().map(|c| json!({
            "name": c.name, "p50_ms": ms_f(c.p50), "p99_ms": ms_f(c.p99),
            "loads": c.loads.iter().map(|l| json!({
                "tool": l.tool, "connections": l.connections, "rps": l.rps,
                "cpu_us_per_call": l.cpu.map(|c| micros(c.total())),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "p1_idle": r.p1_fast.idle.iter().map(|i| json!({
            "name": i.name, "bytes_per_connection": i.bytes_per_connection,
            "rps_alone": i.rps_alone, "rps_holding": i.rps_holding,
        })).collect::<Vec<_>>(),
        "p4_steady_p95_ms": ms_f(r.p34.steady_p95),
        "p4": r.p34.during.iter().map(|(name, n, p95)| json!({
            "name": name, "calls": n, "p95_ms": ms_f(*p95),
        })).collect::<Vec<_>>(),
        "p2_overhead_ms": ms_f(r.p2.overhead()),
        "p2_sandbox_cost_ms": ms_f(r.p2.sandbox_cost()),
        "p5_api_p50_ms": ms_f(r.p5.api.p50),
        "p6": p6,
        "p7": r.p7.iter().map(|f| json!({
            "lease_ttl_s": f.ttl_s,
            "windows_s": f.windows.iter().map(Duration::as_secs_f64).collect::<Vec<_>>(),
            "failed": f.failed,
        })).collect::<Vec<_>>(),
    })
}

/// P1 with the fast runner: calls per second and CPU per call by load, latency at a fixed
/// rate, idle connections, and the targets.
pub(crate) fn fast_runner_table(f: &FastRunner) -> String {
    let loads: Vec<(&str, u32)> = f.contenders[0].loads.iter().map(|l| (l.tool, l.connections)).collect();
    let columns: Vec<String> = loads.iter().map(|(tool, c)| format!("{tool}, {c} conns")).collect();
    let mut out = format!(
        "\n### P1 with a fast runner\n\n\
         The runner is nginx serving a 17-byte static file (`examples/static-nginx`, one worker),\n\
         deployed as a hangar app on the `--sandbox none` server; a runner this fast leaves the\n\
         proxy's own cost per call to show. It is called straight, through nginx as a reverse\n\
         proxy (one worker, and `auto`: one per core; keep-alive upstream, no access log, no limit\n\
         on calls per connection) and through hangar's gateway. Each figure is the median of\n\
         {rounds} rounds (the order rotates each round) of {secs} s runs of `wrk -t1` and of `oha`;\n\
         the proxy's CPU per call (user + system, from `/proc`) is in brackets.\n\n\
         | | {} | p50 at {fixed}/s | p99 at {fixed}/s |\n|---|{}---|---|\n",
        columns.join(" | "),
        "---|".repeat(columns.len()),
        rounds = f.rounds,
        secs = f.seconds,
        fixed = FIXED_RATE,
    );
    for c in &f.contenders {
        let cells: Vec<String> = c
            .loads
            .iter()
            .map(|l| match l.cpu {
                Some(cpu) => format!("{:.0} ({:.1} µs)", l.rps, micros(cpu.total())),
                None => format!("{:.0}", l.rps),
            })
            .collect();
        out.push_str(&format!("| {} | {} | {} | {} |\n", c.name, cells.join(" | "), ms(c.p50), ms(c.p99)));
    }
    let hangar = f.get("hangar");
    let nginxes = [f.get(fast_runner::NGINX_ONE), f.get(fast_runner::NGINX_AUTO)];
    out.push_str("\n| target (against the better nginx of the two, per load) | figure | |\n|---|---|---|\n");
    for (tool, connections) in &loads {
        let mine = hangar.load(tool, *connections);
        let best_rps = nginxes.iter().map(|n| n.load(tool, *connections).rps).fold(0.0, f64::max);
        let ratio = mine.rps / best_rps.max(1e-9);
        out.push_str(&format!(
            "| {tool}, {connections} conns: hangar calls/s ÷ nginx's ≥ 1.1 | **{ratio:.2}** | {} |\n",
            verdict(ratio >= 1.1)
        ));
    }
    for (tool, connections) in &loads {
        let cpu = |l: &fast_runner::Load| l.cpu.map_or(f64::INFINITY, |c| micros(c.total()));
        let mine = cpu(hangar.load(tool, *connections));
        let best = nginxes.iter().map(|n| cpu(n.load(tool, *connections))).fold(f64::INFINITY, f64::min);
        let ratio = mine / best;
        out.push_str(&format!(
            "| {tool}, {connections} conns: hangar CPU per call ÷ nginx's ≤ 0.9 | **{ratio:.2}** ({mine:.1} µs against {best:.1} µs) | {} |\n",
            verdict(ratio <= 0.9)
        ));
    }
    let direct = f.get("direct");
    let added = hangar.p50.saturating_sub(direct.p50);
    let nginx_added = nginxes.iter().map(|n| n.p50.saturating_sub(direct.p50)).min().unwrap_or_default();
    out.push_str(&format!(
        "| hangar p50 − direct p50 at {FIXED_RATE}/s ≤ 0.1 ms | **{}** (nginx: {}) | {} |\n",
        ms(added),
        ms(nginx_added),
        verdict(added.as_secs_f64() <= 0.0001)
    ));
    out.push_str(&format!(
        "\n{held} idle keep-alive connections, each of which has made one call, held open while\n\
         `wrk -t1 -c32` runs {secs} s: the proxy's resident memory grown per connection, and\n\
         calls per second against the same run without them.\n\n\
         | | memory per idle connection | calls/s, 32 connections | with {held} idle held | ratio |\n\
         |---|---|---|---|---|\n",
        held = fast_runner::IDLE,
        secs = f.seconds,
    ));
    for i in &f.idle {
        out.push_str(&format!(
            "| {} | {:.1} KiB | {:.0} | {:.0} | {:.2} |\n",
            i.name,
            i.bytes_per_connection / 1024.0,
            i.rps_alone,
            i.rps_holding,
            i.rps_holding / i.rps_alone.max(1e-9)
        ));
    }
    out
}
