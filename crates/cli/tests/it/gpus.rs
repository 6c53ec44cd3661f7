//! GPUs: each runner gets whole GPUs of its own, machine types say how many, and the
//! views show who holds what. This machine has no GPU: the server is given GPU ids with
//! `--gpus` (or, for the sandbox's device nodes, ids with stand-in device files).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;
use testkit::{AppDir, Http, TestServer, wait_until};

use crate::{app_url, runners, testapp_dir};

/// A server with the GPUs `gpus` and machine types from `types` (config file lines).
fn gpu_server(gpus: &str, types: &str) -> (TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hangar.toml");
    std::fs::write(&config, types).unwrap();
    let server = crate::server_with(&["--config", config.to_str().unwrap(), "--gpus", gpus]);
    (server, dir)
}

/// What the processes of `runner` were started with, by variable.
fn environment_of(runner: &str) -> Option<BTreeMap<String, String>> {
    let needle = format!("HANGAR_RUNNER_ID={runner}");
    std::fs::read_dir("/proc").unwrap().flatten().find_map(|entry| {
        let env = std::fs::read(entry.path().join("environ")).ok()?;
        let vars: Vec<&[u8]> = env.split(|b| *b == 0).collect();
        vars.contains(&needle.as_bytes()).then(|| {
            vars.iter()
                .filter_map(|v| std::str::from_utf8(v).ok()?.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect()
        })
    })
}

/// `hangar gpus --json`.
fn gpus(server: &TestServer) -> Vec<Value> {
    server.run(&["gpus", "--json"]).ok().json().as_array().unwrap().clone()
}

/// The GPUs of the live runners of `apps`, checking that no GPU is held twice.
fn holders(server: &TestServer, apps: &[&str]) -> BTreeMap<String, String> {
    let mut held = BTreeMap::new();
    for app in apps {
        for runner in runners(server, app, &[]) {
            if runner["state"] == "terminated" {
                continue;
            }
            for gpu in runner["gpus"].as_array().unwrap() {
                let id = runner["id"].as_str().unwrap().to_owned();
                if let Some(other) = held.insert(gpu.as_str().unwrap().to_owned(), id.clone()) {
                    panic!("GPU {gpu} is held by runners {other} and {id} at once");
                }
            }
        }
    }
    held
}

#[test]
fn each_runner_gets_its_own_gpu_and_one_more_waits_until_a_gpu_is_free() {
    let (server, _dir) = gpu_server("g0,g1,g2", "[machine_types.gpu]\ncapacity = 8\ngpus = 1\n");
    let app = testapp_dir(
        "vision",
        "[scaling]\nmax_concurrency = 4\nkeep_alive = 1\n[runner]\nmachine_type = \"gpu\"\nmax_multiplexing = 1\n",
    );
    server.run(&["deploy", app.path_str(), "--auth", "public"]).ok();

    // Four slow calls at once: four runners wanted, three GPUs.
    // Long enough that the three are still busy when the fourth is seen waiting, on a
    // loaded machine too.
    let url = app_url(&server, "vision", "/?delay_ms=8000");
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || Http::new().get(&url, None).status)
        })
        .collect();
    let (set_up, pending) = wait_until("three runners set up and a fourth pending", || {
        let all = runners(&server, "vision", &[]);
        let set_up: Vec<Value> = all.iter().filter(|r| r["state"] == "running").cloned().collect();
        let pending: Vec<Value> = all.iter().filter(|r| r["state"] == "pending").cloned().collect();
        (set_up.len() == 3 && pending.len() == 1).then_some((set_up, pending))
    });
    assert_eq!(pending[0]["reason"], "needs 1 GPU; 0 free", "{pending:?}");
    assert_eq!(pending[0]["gpus"], serde_json::json!([]));
    let mut seen = BTreeSet::new();
    for runner in &set_up {
        let id = runner["id"].as_str().unwrap();
        let env = environment_of(id).expect("the runner's process is there");
        let gpus = runner["gpus"].as_array().unwrap();
        assert_eq!(gpus.len(), 1, "{runner}");
        assert_eq!(env["CUDA_VISIBLE_DEVICES"], gpus[0].as_str().unwrap(), "{runner}");
        assert_eq!(env["NVIDIA_VISIBLE_DEVICES"], env["CUDA_VISIBLE_DEVICES"]);
        assert_eq!(env["HANGAR_GPUS"], env["CUDA_VISIBLE_DEVICES"]);
        seen.insert(env["CUDA_VISIBLE_DEVICES"].clone());
    }
    assert_eq!(seen, BTreeSet::from(["g0".to_owned(), "g1".to_owned(), "g2".to_owned()]));

    // Who holds what, in each view.
    let listed = gpus(&server);
    assert_eq!(listed.len(), 3);
    for gpu in &listed {
        assert_eq!(gpu["held"], true, "{gpu}");
        assert_eq!(gpu["app"], "default/vision", "{gpu}");
        let holder = set_up.iter().find(|r| r["gpus"][0] == gpu["id"]).expect("a runner holds it");
        assert_eq!(gpu["runner"], holder["id"]);
    }
    let metrics = Http::new().get(&format!("{}/metrics", server.api_url), Some(&server.root_key)).text();
    for id in ["g0", "g1", "g2"] {
        let line = format!("hangar_gpu_held{{gpu=\"{id}\",app=\"default/vision\"}} 1");
        assert!(metrics.contains(&line), "{line} not in:\n{metrics}");
    }
    let table = server.run(&["gpus"]).ok().stdout;
    assert!(table.contains("g1") && table.contains("default/vision"), "{table}");

    for call in calls {
        assert_eq!(call.join().unwrap(), 200);
    }
    // Once the load is gone the runners go, and their GPUs are free for the next ones.
    wait_until("every GPU to be free", || gpus(&server).iter().all(|g| g["held"] == false).then_some(()));
    let reply = Http::new().get(&app_url(&server, "vision", "/"), None);
    assert_eq!(reply.status, 200);
    let runner = reply.header("x-hangar-runner-id").unwrap();
    let env = environment_of(&runner).expect("the runner's process is there");
    assert!(["g0", "g1", "g2"].contains(&env["CUDA_VISIBLE_DEVICES"].as_str()), "{env:?}");
}

#[test]
fn gpus_are_never_held_twice_through_a_rollout_and_a_rolling_set_rev() {
    let (server, _dir) = gpu_server("g0,g1,g2", "[machine_types.gpu]\ncapacity = 8\ngpus = 1\n");
    let manifest =
        "[scaling]\nmin_concurrency = 1\nmax_concurrency = 1\n[runner]\nmachine_type = \"gpu\"\nmax_multiplexing = 8\n";
    let big = testapp_dir("big", &format!("{manifest}num_gpus = 2\n"));
    server.run(&["deploy", big.path_str(), "--auth", "public"]).ok();
    let small = testapp_dir("small", manifest);
    server.run(&["deploy", small.path_str(), "--auth", "public"]).ok();
    let held = wait_until("both apps' runners to hold their GPUs", || {
        let held = holders(&server, &["big", "small"]);
        (held.len() == 3).then_some(held)
    });
    let big_runner = runners(&server, "big", &[]).into_iter().find(|r| r["state"] == "idle").unwrap();
    assert_eq!(big_runner["gpus"].as_array().unwrap().len(), 2, "{big_runner}");
    let env = environment_of(big_runner["id"].as_str().unwrap()).unwrap();
    let mut visible: Vec<&str> = env["CUDA_VISIBLE_DEVICES"].split(',').collect();
    visible.sort_unstable();
    visible.dedup();
    assert_eq!(visible.len(), 2, "{env:?}");
    assert_eq!(held.values().collect::<BTreeSet<_>>().len(), 2, "{held:?}");

    // No spare GPUs: the rollout and the set-rev drain first, and no call fails.
    let prober = testkit::Prober::start(&app_url(&server, "big", "/"), None, 20);
    let first = revisions(&server, "big");
    let old = big_runner["id"].as_str().unwrap().to_owned();
    let rollout = server.cli().args(["apps", "rollout", "big"]).spawn().unwrap();
    assert!(poll_until_done(&server, rollout).success());
    let replacement = poll_until_serving(&server, &old);
    server.run(&["deploy", big.path_str()]).ok();
    let rev = first[0]["id"].as_str().unwrap().to_owned();
    let set_rev = server.cli().args(["apps", "set-rev", "big", &rev]).spawn().unwrap();
    assert!(poll_until_done(&server, set_rev).success());
    poll_until_serving(&server, &replacement);
    let report = prober.finish();
    assert!(report.sent > 0 && report.failures.is_empty(), "{report:?}");
    let history = server.run(&["apps", "runners", "big", "--json", "--state", "terminated", "--since", "1h"]).ok();
    let ended = history.json().as_array().unwrap().len();
    assert!(ended >= 3, "the rollout and the two switches replaced the runner each time: {ended} ended");
}

/// Waits for `child` (a CLI command), checking at every poll that no GPU is held twice.
fn poll_until_done(server: &TestServer, mut child: std::process::Child) -> std::process::ExitStatus {
    wait_until("the command to finish, with no GPU held twice meanwhile", || {
        holders(server, &["big", "small"]);
        child.try_wait().unwrap()
    })
}

/// Waits, checking at every poll that no GPU is held twice, until `old` has ended and
/// another runner of the big app serves with two GPUs; returns that runner.
fn poll_until_serving(server: &TestServer, old: &str) -> String {
    wait_until("a new runner of big with two GPUs, with no GPU held twice meanwhile", || {
        let held = holders(server, &["big", "small"]);
        let live = runners(server, "big", &[]);
        let new = live.iter().find(|r| r["state"] == "idle" || r["state"] == "running")?;
        let gone = !live.iter().any(|r| r["id"] == old);
        (gone && new["id"] != old && held.len() == 3 && new["gpus"].as_array()?.len() == 2)
            .then(|| new["id"].as_str().unwrap().to_owned())
    })
}

/// `apps list-rev APP --json`, newest first.
fn revisions(server: &TestServer, app: &str) -> Vec<Value> {
    crate::revisions(server, app)
}

#[test]
fn a_runner_starts_on_the_next_machine_type_when_the_first_is_full() {
    let (server, _dir) =
        gpu_server("g0", "[machine_types.h100]\ncapacity = 1\ngpus = 1\n[machine_types.a10]\ncapacity = 1\ngpus = 0\n");
    let app = testapp_dir(
        "fallback",
        "[scaling]\nmin_concurrency = 2\nmax_concurrency = 2\n[runner]\nmachine_type = [\"h100\", \"a10\"]\n",
    );
    server.run(&["deploy", app.path_str(), "--auth", "public"]).ok();
    let placed = wait_until("two runners set up", || {
        let placed: BTreeMap<String, Value> = runners(&server, "fallback", &[])
            .into_iter()
            .filter(|r| r["state"] == "idle")
            .map(|r| (r["machine_type"].as_str().unwrap().to_owned(), r["gpus"].clone()))
            .collect();
        (placed.len() == 2).then_some(placed)
    });
    assert_eq!(placed["h100"], serde_json::json!(["g0"]));
    assert_eq!(placed["a10"], serde_json::json!([]));
}

#[test]
fn more_gpus_than_the_server_has_are_refused_at_deploy_with_both_numbers() {
    let (server, _dir) = gpu_server("g0,g1,g2", "[machine_types.gpu]\ncapacity = 8\ngpus = 1\n");
    let app = testapp_dir("huge", "[runner]\nmachine_type = \"gpu\"\nnum_gpus = 5\n");
    let out = server.run(&["deploy", app.path_str()]).failed();
    let stderr = &out.stderr;
    assert!(stderr.contains("a runner asks for 5 GPUs and this server has 3"), "{stderr}");
    assert!(server.run(&["apps", "list", "--json"]).ok().json().as_array().unwrap().is_empty());
    // `apps scale` may not move an app onto a type it could never run on either.
    let (server, _dir) =
        gpu_server("g0", "[machine_types.pair]\ncapacity = 1\ngpus = 2\n[machine_types.one]\ncapacity = 1\ngpus = 1\n");
    let app = testapp_dir("moving", "[runner]\nmachine_type = \"one\"\n");
    server.run(&["deploy", app.path_str()]).ok();
    let out = server.run(&["apps", "scale", "moving", "--machine-type", "pair"]).failed();
    assert!(out.stderr.contains("a runner asks for 2 GPUs and this server has 1"), "{}", out.stderr);
}

#[test]
fn a_set_rev_to_a_revision_that_asks_for_more_gpus_than_the_server_now_has_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hangar.toml");
    let types = "[machine_types.gpu]\ncapacity = 4\ngpus = 1\n";
    std::fs::write(&config, format!("gpus = [\"g0\", \"g1\", \"g2\"]\n{types}")).unwrap();
    let mut server = crate::server_with(&["--config", config.to_str().unwrap()]);
    assert!(server.output().contains("GPUs") && server.output().contains("g2"), "{}", server.output());
    let app = testapp_dir("wide", "[runner]\nmachine_type = \"gpu\"\nnum_gpus = 3\n");
    server.run(&["deploy", app.path_str()]).ok();
    let wide = crate::revisions(&server, "wide")[0]["id"].as_str().unwrap().to_owned();
    let narrow = testapp_dir("wide", "[runner]\nmachine_type = \"gpu\"\n");
    server.run(&["deploy", narrow.path_str()]).ok();

    // The machine now has one GPU for hangar.
    server.stop();
    std::fs::write(&config, format!("gpus = [\"g0\"]\n{types}")).unwrap();
    server.restart();
    let out = server.run(&["apps", "set-rev", "wide", &wide]).failed();
    assert!(out.stderr.contains("a runner asks for 3 GPUs and this server has 1"), "{}", out.stderr);
    let current: Vec<Value> = crate::revisions(&server, "wide").into_iter().filter(|r| r["current"] == true).collect();
    assert_ne!(current[0]["id"], wide.as_str(), "nothing changed");
}

/// An app that answers with the names in its `/dev`.
fn dev_lister(name: &str, manifest: &str) -> AppDir {
    let app = AppDir::new(&format!(
        "name = \"{name}\"\ncommand = [\"python3\", \"server.py\"]\nhealth_path = \"/\"\n{manifest}"
    ));
    app.write(
        "server.py",
        r#"
import json, os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps(sorted(os.listdir("/dev"))).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"#,
    );
    app
}

/// Without a GPU here, the GPUs' device nodes are stand-in files the server is told
/// about (`--gpus ID=DEVICE`); the sandbox binds them the way it binds real ones.
#[test]
fn a_sandboxed_runner_sees_only_its_own_gpus_device_nodes() {
    let dev = tempfile::tempdir().unwrap();
    for node in ["nvidia0", "nvidia1", "nvidia2", "nvidiactl", "nvidia-uvm"] {
        std::fs::write(dev.path().join(node), "").unwrap();
    }
    let given: Vec<String> =
        (0..3).map(|n| format!("GPU-{n}={}", dev.path().join(format!("nvidia{n}")).display())).collect();
    let (server, _dir) = gpu_server(&given.join(","), "[machine_types.gpu]\ncapacity = 4\ngpus = 1\n");
    let cpu = dev_lister("plain", "");
    server.run(&["deploy", cpu.path_str(), "--auth", "public"]).ok();
    let gpu = dev_lister("accelerated", "[runner]\nmachine_type = \"gpu\"\nnum_gpus = 2\n");
    server.run(&["deploy", gpu.path_str(), "--auth", "public"]).ok();

    let nvidia = |app: &str| -> Vec<String> {
        let reply = Http::new().get(&app_url(&server, app, "/"), None);
        assert_eq!(reply.status, 200, "{}", reply.text());
        let names: Vec<String> = serde_json::from_str(&reply.text()).unwrap();
        names.into_iter().filter(|n| n.starts_with("nvidia")).collect()
    };
    assert_eq!(nvidia("plain"), Vec::<String>::new(), "a runner without GPUs sees no GPU nodes");
    let held: Vec<String> =
        gpus(&server).iter().filter(|g| g["held"] == true).map(|g| format!("nvidia{}", g["index"])).collect();
    assert_eq!(held.len(), 2);
    let mut want = [held, vec!["nvidia-uvm".to_owned(), "nvidiactl".to_owned()]].concat();
    want.sort();
    assert_eq!(nvidia("accelerated"), want);
    // A command run in the runner sees the same GPUs: their nodes, and their ids.
    let runner = &runners(&server, "accelerated", &[])[0];
    let id = runner["id"].as_str().unwrap();
    let script = "ls /dev | grep '^nvidia' | sort; echo \"$CUDA_VISIBLE_DEVICES\"";
    let out = server.run(&["runners", "exec", id, "--", "sh", "-c", script]).ok();
    let mut lines: Vec<String> = out.stdout.lines().map(str::to_owned).collect();
    let visible = lines.pop().unwrap();
    lines.sort();
    assert_eq!(lines, want, "the command sees the runner's GPU nodes");
    let ids: Vec<&str> = runner["gpus"].as_array().unwrap().iter().map(|g| g.as_str().unwrap()).collect();
    assert_eq!(visible, ids.join(","), "and its GPUs' ids");
}
