//! Runners as jobs of a real Slurm cluster: each test starts a private one
//! (`testkit::slurm`: munged, slurmctld and three slurmd on loopback, `n1` with two fake
//! GPUs, `n2` and `n3` with one each) and a server whose runner backend is Slurm.

use std::collections::BTreeSet;
use std::io::BufRead;
use std::process::{Command, Stdio};

use serde_json::{Value, json};
use testkit::slurm::SlurmCluster;
use testkit::{Http, TestServer, wait_until};

use crate::sandbox::processes_of;
use crate::{BIN, FAST, app_url, runners, switching, testapp_dir};

fn server_on(cluster: &SlurmCluster) -> TestServer {
    cluster.server(BIN, FAST)
}

/// The runners of `app` that serve (idle or running).
fn serving(server: &TestServer, app: &str) -> Vec<Value> {
    runners(server, app, &[]).into_iter().filter(|r| r["state"] == "idle" || r["state"] == "running").collect()
}

/// The runner ids in the names of the cluster's hangar jobs that have not ended.
fn live_job_runners(cluster: &SlurmCluster) -> BTreeSet<String> {
    cluster.live_jobs().iter().filter_map(|j| j.name.strip_prefix("hangar-").map(str::to_owned)).collect()
}

#[test]
fn no_call_fails_through_deploys_set_revs_and_scale_down_on_slurm() {
    let cluster = SlurmCluster::start();
    let server = server_on(&cluster);
    switching::no_call_fails_through_deploys_set_revs_and_scale_down_on(&server);
    // Every live runner is a live job of the cluster, and the other way round (looked at
    // until they agree: runners still scale down).
    wait_until("the jobs to match the runners", || {
        let live: BTreeSet<String> =
            runners(&server, "live", &[]).iter().map(|r| r["id"].as_str().unwrap().to_owned()).collect();
        (live_job_runners(&cluster) == live).then_some(())
    });
}

#[test]
fn graceful_rollout_replaces_every_runner_without_losing_capacity_or_calls_on_slurm() {
    let cluster = SlurmCluster::start();
    let server = server_on(&cluster);
    switching::graceful_rollout_replaces_every_runner_without_losing_capacity_or_calls_on(&server);
}

#[test]
fn forced_rollout_cuts_calls_in_flight_with_a_clear_error_and_then_serves_on_slurm() {
    let cluster = SlurmCluster::start();
    let server = server_on(&cluster);
    switching::forced_rollout_cuts_calls_in_flight_with_a_clear_error_and_then_serves_on(&server);
}

#[test]
fn gpu_runners_get_the_clusters_gpus_on_every_node_and_one_too_many_waits_with_slurms_reason() {
    let cluster = SlurmCluster::start();
    let server = server_on(&cluster);
    // Four GPUs in the cluster; a call at a time per runner, and load for five runners.
    let app = testapp_dir("gpu", "[runner]\nnum_gpus = 1\nmax_multiplexing = 1\n[scaling]\nmax_concurrency = 5\n");
    server.run(&["deploy", app.path_str(), "--auth", "public"]).ok();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        for _ in 0..6 {
            scope.spawn(|| {
                let http = Http::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    http.get(&app_url(&server, "gpu", "/?delay_ms=1000"), None);
                }
            });
        }
        // The load stops however the checks end.
        struct Stop<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let _stop = Stop(&stop);
        gpus_under_load(&cluster, &server);
    });
}

/// The checks of the test above, while the load runs.
fn gpus_under_load(cluster: &SlurmCluster, server: &TestServer) {
    let (placed, waiting) = wait_until("four runners up and one waiting", || {
        let rs = runners(server, "gpu", &[]);
        let placed: Vec<Value> =
            rs.iter().filter(|r| r["state"] == "idle" || r["state"] == "running").cloned().collect();
        let waiting: Vec<Value> = rs.iter().filter(|r| r["state"] == "pending").cloned().collect();
        (placed.len() == 4 && waiting.len() == 1).then_some((placed, waiting))
    });
    let held: BTreeSet<(String, String)> = placed
        .iter()
        .map(|r| {
            let gpus = r["gpus"].as_array().unwrap();
            assert_eq!(gpus.len(), 1, "{r}");
            (r["node"].as_str().unwrap().to_owned(), gpus[0].as_str().unwrap().to_owned())
        })
        .collect();
    let want: BTreeSet<(String, String)> = [("n1", "0"), ("n1", "1"), ("n2", "0"), ("n3", "0")]
        .iter()
        .map(|(n, g)| (n.to_string(), g.to_string()))
        .collect();
    assert_eq!(held, want, "each of the cluster's GPUs is held once");
    // `hangar gpus` shows the same: the GPUs the cluster gave the runners, by node.
    let listed = server.run(&["gpus", "--json"]).ok().json();
    let listed: BTreeSet<(String, String)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            assert_eq!(g["app"], "default/gpu", "{g}");
            (g["node"].as_str().unwrap().to_owned(), g["id"].as_str().unwrap().to_owned())
        })
        .collect();
    assert_eq!(listed, want);
    let reason = waiting[0]["reason"].as_str().unwrap();
    assert!(reason.starts_with("waiting in the cluster's queue: "), "{reason}");
    assert!(reason.contains("Resources") || reason.contains("Priority"), "{reason}");
    // The job waits in Slurm's queue for what the runner said.
    let job = format!("hangar-{}", waiting[0]["id"].as_str().unwrap());
    let pending = cluster.live_jobs().into_iter().find(|j| j.name == job).expect("the waiting runner's job");
    assert_eq!(pending.state, "PENDING");

    // A runner is told the GPUs the cluster gave its job.
    let http = Http::new();
    let mut seen = BTreeSet::new();
    wait_until("calls that reached two runners", || {
        let reply = http.get(&app_url(server, "gpu", "/env"), None);
        assert_eq!(reply.status, 200, "{}", reply.text());
        let env = reply.json();
        let runner = reply.header("x-hangar-runner-id").unwrap();
        let listed = placed.iter().find(|r| r["id"] == runner.as_str()).expect("a placed runner answered");
        assert_eq!(env["HANGAR_GPUS"], listed["gpus"][0], "{env}");
        assert!(!env["CUDA_VISIBLE_DEVICES"].as_str().unwrap_or("").is_empty(), "{env}");
        seen.insert(runner);
        (!seen.is_empty()).then_some(())
    });

    // One of them ends: another runner gets its GPU, and no GPU is held twice.
    let gone = placed[0]["id"].as_str().unwrap();
    server.run(&["runners", "kill", &gone[..8]]).ok();
    wait_until("four runners on the four GPUs again", || {
        let rs = runners(server, "gpu", &[]);
        let serving: Vec<&Value> = rs.iter().filter(|r| r["state"] == "idle" || r["state"] == "running").collect();
        let held: BTreeSet<(String, String)> = serving
            .iter()
            .map(|r| (r["node"].as_str().unwrap_or("").to_owned(), r["gpus"][0].as_str().unwrap_or("").to_owned()))
            .collect();
        (serving.len() == 4 && held == want && serving.iter().all(|r| r["id"] != gone)).then_some(())
    });
}

#[test]
fn a_node_that_goes_down_has_its_runners_replaced_elsewhere_and_no_queue_request_is_lost() {
    let cluster = SlurmCluster::start();
    let server = server_on(&cluster);
    let app = testapp_dir("sturdy", "[runner]\nmax_multiplexing = 4\n[scaling]\nmin_concurrency = 2\n");
    server.run(&["deploy", app.path_str(), "--auth", "public"]).ok();
    let before = wait_until("two runners", || {
        let rs = serving(&server, "sturdy");
        (rs.len() == 2).then_some(rs)
    });
    let down = before[0]["node"].as_str().unwrap().to_owned();
    let on_down: BTreeSet<String> =
        before.iter().filter(|r| r["node"] == down.as_str()).map(|r| r["id"].as_str().unwrap().to_owned()).collect();

    let http = Http::new();
    let submitted: Vec<Value> = (0..16)
        .map(|n| crate::queue::submit(&http, &server, "sturdy", &format!("/work?delay_ms=1500&n={n}"), &json!({})))
        .collect();
    wait_until("requests to be running", || {
        submitted.iter().any(|r| crate::queue::status(&http, &server, r)["status"] == "IN_PROGRESS").then_some(())
    });
    cluster.set_node_down(&down);

    for (n, request) in submitted.iter().enumerate() {
        let status = crate::queue::completed(&http, &server, request);
        assert_eq!(status["error"], Value::Null, "request {n} failed: {status}");
        let reply = crate::queue::result(&http, &server, request);
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    // The requests took more runners than the minimum; all of them are on other nodes.
    let after = wait_until("runners on the other nodes", || {
        let rs = serving(&server, "sturdy");
        (rs.len() >= 2 && rs.iter().all(|r| r["node"] != down.as_str())).then_some(rs)
    });
    assert!(after.iter().all(|r| !on_down.contains(r["id"].as_str().unwrap())), "{after:?}");
    let lost = runners(&server, "sturdy", &["--state", "terminated", "--since", "1h"]);
    let lost: Vec<&Value> = lost.iter().filter(|r| on_down.contains(r["id"].as_str().unwrap())).collect();
    assert_eq!(lost.len(), on_down.len(), "{lost:?}");
    assert!(lost.iter().all(|r| r["reason"].as_str().unwrap().contains("NODE_FAIL")), "{lost:?}");
    // Sync calls go on working.
    for _ in 0..10 {
        let reply = http.get(&app_url(&server, "sturdy", "/"), None);
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
}

#[test]
fn after_a_kill_9_and_a_restart_every_hangar_job_is_one_the_server_knows() {
    let cluster = SlurmCluster::start();
    let mut server = server_on(&cluster);
    let app = testapp_dir("kept", "[scaling]\nmin_concurrency = 2\n");
    server.run(&["deploy", app.path_str(), "--auth", "public"]).ok();
    // Runners waiting in the cluster's queue have jobs too.
    let greedy = testapp_dir("greedy", "[runner]\nnum_gpus = 2\n[scaling]\nmin_concurrency = 2\n");
    server.run(&["deploy", greedy.path_str(), "--auth", "public"]).ok();
    wait_until("runners up and one waiting", || {
        let up = serving(&server, "kept").len() == 2;
        let waiting = runners(&server, "greedy", &[]).iter().any(|r| r["state"] == "pending");
        (up && waiting).then_some(())
    });
    let old = live_job_runners(&cluster);
    assert!(old.len() >= 4, "{old:?}");

    server.kill();
    server.restart();
    let known = || -> BTreeSet<String> {
        ["kept", "greedy"]
            .iter()
            .flat_map(|app| runners(&server, app, &[]))
            .map(|r| r["id"].as_str().unwrap().to_owned())
            .collect()
    };
    wait_until("the jobs to be the new runners' only", || {
        let jobs = live_job_runners(&cluster);
        let ours = known();
        (serving(&server, "kept").len() == 2 && jobs == ours && jobs.is_disjoint(&old)).then_some(())
    });
}

#[test]
fn a_job_the_cluster_cannot_run_says_why_and_other_apps_go_on() {
    let cluster = SlurmCluster::start();
    let server = server_on(&cluster);
    let fine = testapp_dir("fine", "[scaling]\nmin_concurrency = 1\n");
    server.run(&["deploy", fine.path_str(), "--auth", "public"]).ok();
    // No node has three GPUs: the deploy is accepted (the cluster decides), and its
    // runner does not set up, saying why.
    let huge = testapp_dir("huge", "[runner]\nnum_gpus = 3\n");
    let out = server.run(&["deploy", huge.path_str(), "--auth", "public", "--json"]);
    assert!(!out.success(), "{out:?}");
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(text.contains("sbatch failed"), "{text}");
    assert!(text.contains("Requested node configuration is not available"), "{text}");
    let reply = Http::new().get(&app_url(&server, "fine", "/"), None);
    assert_eq!(reply.status, 200, "{}", reply.text());
}

#[test]
fn runners_logs_follow_a_slurm_runner() {
    let cluster = SlurmCluster::start();
    let server = server_on(&cluster);
    let app = testapp_dir("chatty", "[scaling]\nmin_concurrency = 1\n");
    server.run(&["deploy", app.path_str(), "--auth", "public"]).ok();
    let runner = wait_until("a runner", || serving(&server, "chatty").pop());
    let id = runner["id"].as_str().unwrap().to_owned();
    let mut follow = server
        .cli()
        .args(["runners", "logs", &id[..8], "-f"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = follow.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let http = Http::new();
    let mut lines = Vec::new();
    wait_until("the call's line in the followed log", || {
        let reply = http.get(&app_url(&server, "chatty", "/followed-call"), None);
        assert_eq!(reply.status, 200, "{}", reply.text());
        lines.extend(rx.try_iter());
        lines.iter().any(|l| l.contains("GET /followed-call -> 200")).then_some(())
    });
    let _ = follow.kill();
    let _ = follow.wait();
    let log = server.run(&["runners", "logs", &id[..8]]).ok().stdout;
    assert!(log.contains("testapp listening on"), "{log}");
    // A command runs in the runner on its node, through its agent: in the runner's
    // sandbox and environment, its input, output and status carried both ways.
    let script = "read line; echo \"got $line in $PWD for $HANGAR_RUNNER_ID as $(id -u)\"; echo oops >&2; exit 3";
    let mut exec = server
        .cli()
        .args(["runners", "exec", &id[..8], "--", "sh", "-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut exec.stdin.take().unwrap(), b"hello\n").unwrap();
    let done = exec.wait_with_output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&done.stdout), String::from_utf8_lossy(&done.stderr));
    assert_eq!(done.status.code(), Some(3), "{stdout}{stderr}");
    assert!(stdout.starts_with(&format!("got hello in /app for {id} as 2")), "{stdout}");
    assert_eq!(stderr.trim(), "oops");
    let out = server.run(&["runners", "exec", "-t", &id[..8], "--", "sh", "-c", "test -t 0 && stty size"]).ok();
    assert_eq!(out.stdout.trim(), "24 80");

    // The node's port takes calls from the server's address only: from another one the
    // connection is closed unanswered.
    let output = server.output();
    let started = output.lines().find(|l| l.contains("runner's job started") && l.contains(&id)).unwrap();
    let addr: std::net::SocketAddr =
        started.split("addr=").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
    let socket = answer_to_a_call_from_another_address(addr);
    assert_eq!(socket, 0, "a caller from another address got {socket} bytes of an answer");
}

/// Connects to `addr` from 127.0.0.2, sends a request and returns how many bytes came
/// back before the connection closed.
fn answer_to_a_call_from_another_address(addr: std::net::SocketAddr) -> usize {
    use std::io::{Read, Write};
    let socket = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Stream,
        nix::sys::socket::SockFlag::empty(),
        None,
    )
    .unwrap();
    let from = nix::sys::socket::SockaddrIn::new(127, 0, 0, 2, 0);
    nix::sys::socket::bind(std::os::fd::AsRawFd::as_raw_fd(&socket), &from).unwrap();
    let to = nix::sys::socket::SockaddrIn::from(match addr {
        std::net::SocketAddr::V4(v4) => v4,
        std::net::SocketAddr::V6(_) => panic!("a v4 address"),
    });
    nix::sys::socket::connect(std::os::fd::AsRawFd::as_raw_fd(&socket), &to).unwrap();
    let mut stream = std::net::TcpStream::from(socket);
    stream.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    let _ = stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    answer.len()
}

/// Runs `hangar server` with `args` and `env`, which must fail to start; returns what
/// it printed.
fn refused_start(dir: &std::path::Path, args: &[&str], env: &[(&str, String)]) -> String {
    let mut child = Command::new(BIN)
        .args(["server", "--api-addr", "127.0.0.1:0", "--gateway-addr", "127.0.0.1:0", "--data-dir"])
        .arg(dir.join("data"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_until("the server to give up", || child.try_wait().unwrap());
    let out = child.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!status.success(), "the server started: {text}");
    text
}

#[test]
fn a_cluster_that_cannot_be_used_stops_the_server_at_start_with_why() {
    let cluster = SlurmCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let conf = ("SLURM_CONF", cluster.conf());
    let slurm = |partition: &'static str| vec!["--runner-backend", "slurm", "--slurm-partition", partition];

    let text = refused_start(dir.path(), &slurm("nope"), std::slice::from_ref(&conf));
    assert!(text.contains("partition \"nope\" is not in the Slurm cluster (it has: hangar)"), "{text}");

    let text = refused_start(dir.path(), &["--runner-backend", "slurm"], std::slice::from_ref(&conf));
    assert!(text.contains("the Slurm runner backend needs a partition"), "{text}");

    let text = refused_start(dir.path(), &["--runner-backend", "kubernetes"], std::slice::from_ref(&conf));
    assert!(text.contains("runner backend \"kubernetes\" is not one of: local, slurm"), "{text}");

    // No Slurm commands on the PATH (and so no sandbox tools either).
    let no_path = ("PATH", dir.path().display().to_string());
    let args = [slurm("hangar"), vec!["--sandbox", "none"]].concat();
    let text = refused_start(dir.path(), &args, &[conf.clone(), no_path]);
    assert!(text.contains("the Slurm commands are not installed here: sbatch was not found"), "{text}");

    // A cluster whose controller does not answer.
    let dead = cluster.dir().join("dead.conf");
    let original = std::fs::read_to_string(cluster.conf()).unwrap();
    let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let moved: String = original
        .lines()
        .map(|l| if l.starts_with("SlurmctldPort=") { format!("SlurmctldPort={unused}") } else { l.to_owned() })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&dead, moved).unwrap();
    let text = refused_start(dir.path(), &slurm("hangar"), &[("SLURM_CONF", dead.display().to_string())]);
    assert!(text.contains("Unable to contact slurm controller"), "{text}");
    assert!(text.contains("cannot use the Slurm cluster"), "{text}");

    // Nothing was started in the cluster.
    assert!(cluster.jobs().is_empty(), "{:?}", cluster.jobs());
}

#[test]
fn a_rollout_and_rolling_switches_of_an_app_holding_every_gpu_make_room_and_fail_no_call() {
    let cluster = SlurmCluster::start();
    let server = server_on(&cluster);
    // Four runners of one GPU each hold all four of the cluster's GPUs: a new runner
    // waits in the cluster's queue until an old one has gone.
    let manifest =
        "[scaling]\nmin_concurrency = 4\nmax_concurrency = 4\n[runner]\nnum_gpus = 1\nmax_multiplexing = 8\n";
    let app = testapp_dir("wide", manifest);
    server.run(&["deploy", app.path_str(), "--auth", "public"]).ok();
    let first = wait_until("four runners", || {
        let rs = serving(&server, "wide");
        (rs.len() == 4).then_some(rs)
    });
    let first_rev = first[0]["revision"].as_str().unwrap().to_owned();
    let prober = testkit::Prober::start(&app_url(&server, "wide", "/"), None, 20);

    server.run(&["apps", "rollout", "wide"]).ok();
    wait_until("every runner replaced", || {
        let rs = serving(&server, "wide");
        (rs.len() == 4 && rs.iter().all(|r| !first.iter().any(|f| f["id"] == r["id"]))).then_some(())
    });
    let second = server.run(&["deploy", app.path_str(), "--json"]).ok().json();
    let second_rev = second["revision"].as_str().unwrap().to_owned();
    server.run(&["apps", "set-rev", "wide", &first_rev[..8]]).ok();
    wait_until("four runners of the first revision", || {
        let rs = serving(&server, "wide");
        (rs.len() == 4 && rs.iter().all(|r| r["revision"] == first_rev.as_str())).then_some(())
    });
    let report = prober.finish();
    assert!(report.sent > 0 && report.failures.is_empty(), "{report:?}");
    assert_ne!(first_rev, second_rev);
}

#[test]
fn a_job_cancelled_outside_hangar_is_a_lost_runner_and_is_replaced() {
    let cluster = SlurmCluster::start();
    let server = server_on(&cluster);
    let app = testapp_dir("cancelled", "[scaling]\nmin_concurrency = 1\n");
    server.run(&["deploy", app.path_str(), "--auth", "public"]).ok();
    let runner = wait_until("a runner", || serving(&server, "cancelled").pop());
    let id = runner["id"].as_str().unwrap().to_owned();
    let name = format!("hangar-{id}");
    let job = cluster.live_jobs().into_iter().find(|j| j.name == name).expect("the runner's job");
    let out = cluster.command("scancel").arg(&job.id).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let lost = wait_until("the runner to be lost", || {
        let ended = runners(&server, "cancelled", &["--state", "terminated", "--since", "1h"]);
        ended.into_iter().find(|r| r["id"] == id.as_str())
    });
    let reason = lost["reason"].as_str().unwrap();
    assert!(reason.contains("ended unexpectedly") && reason.contains("CANCELLED"), "{reason}");
    wait_until("no process of the cancelled job's runner", || processes_of(&id).is_empty().then_some(()));
    let replacement = wait_until("a replacement", || serving(&server, "cancelled").pop());
    assert_ne!(replacement["id"], id.as_str());
    let reply = Http::new().get(&app_url(&server, "cancelled", "/"), None);
    assert_eq!(reply.status, 200, "{}", reply.text());

    // An agent killed outright (the node's out of memory, or Slurm's SIGKILL reaching it
    // first) takes its runner with it: nothing is left on the node.
    let id = replacement["id"].as_str().unwrap().to_owned();
    let agent = wait_until("the replacement's agent", || {
        processes_of(&id).into_iter().find_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let parent: i32 = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
            let cmdline = std::fs::read(format!("/proc/{parent}/cmdline")).ok()?;
            cmdline.split(|b| *b == 0).any(|arg| arg == b"agent").then_some(parent)
        })
    });
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_until("no process of the killed agent's runner", || processes_of(&id).is_empty().then_some(()));
    wait_until("another replacement", || serving(&server, "cancelled").into_iter().find(|r| r["id"] != id.as_str()));
}
