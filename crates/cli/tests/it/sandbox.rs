//! Deployed code is untrusted: every runner and build runs in a sandbox (bubblewrap, a
//! uid per team) and can reach nothing of the server or of other teams.

use serde_json::Value;
use testkit::{AppDir, Http, TestServer, wait_until};

use crate::{runners, server, testapp_dir};

/// An app that tries what hostile code would, and says how each try went: `"ok"`, or
/// the name of the Python exception it got.
const HOSTILE: &str = r#"
import json, os, socket, subprocess, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

def attempt(action):
    try:
        action()
        return "ok"
    except Exception as e:
        return type(e).__name__

def read(path):
    with open(path, "rb") as f:
        f.read(1)

def write(path, text):
    with open(path, "w") as f:
        f.write(text)

def cached():
    with open(os.path.join(os.environ["HANGAR_CACHE_DIR"], "weights.bin")) as f:
        return f.read()

def connect(port):
    # Whoever answers there says which runner it is.
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    return json.loads(reply.split(b"\r\n\r\n", 1)[1])["runner"]

def hog():
    # Grows by 8 MiB every few milliseconds, each page written, until something stops it.
    held = []
    while True:
        held.append(b"x" * (8 << 20))
        time.sleep(0.005)

FORK_BOMB = """
import os, time
while True:
    try:
        os.fork()
    except OSError:
        time.sleep(0.01)
"""

def busy(seconds):
    # The share of one CPU this process gets while it spins for `seconds`.
    wall, cpu = time.monotonic(), time.process_time()
    while time.monotonic() - wall < seconds:
        pass
    return (time.process_time() - cpu) / (time.monotonic() - wall)

def reach(port):
    try:
        return {"connect": "ok", "runner": connect(port)}
    except Exception as e:
        return {"connect": type(e).__name__}

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        path, _, arg = self.path.partition("?")
        if path == "/probe":
            targets = json.loads(os.environ.get("TARGETS", "[]"))
            body = {
                "uid": os.getuid(),
                "cwd": os.getcwd(),
                "read": {t: attempt(lambda t=t: read(t)) for t in targets},
                "list": {t: attempt(lambda t=t: os.listdir(t)) for t in targets},
                "write_code": attempt(lambda: write("hacked.txt", "x")),
                "signal_server": attempt(lambda: os.kill(int(os.environ["SERVER_PID"]), 0)),
                "tmp": attempt(lambda: write("/tmp/scratch", "x")),
                "home": attempt(lambda: write(os.path.join(os.environ["HOME"], "scratch"), "x")),
                # What a resolver needs to find the way to a download.
                "resolver": attempt(lambda: read("/etc/resolv.conf")),
            }
        elif path == "/cache/write":
            write(os.path.join(os.environ["HANGAR_CACHE_DIR"], "weights.bin"), os.environ["HANGAR_REVISION"])
            body = {}
        elif path == "/cache/read":
            body = {"read": attempt(cached)}
            if body["read"] == "ok":
                body["content"] = cached()
        elif path == "/connect":
            body = reach(int(arg))
        elif path == "/spawn":
            subprocess.Popen(["setsid", "sleep", "1000"])
            body = {}
        elif path == "/hog":
            threading.Thread(target=hog, daemon=True).start()
            body = {}
        elif path == "/forkbomb":
            subprocess.Popen(["python3", "-c", FORK_BOMB])
            body = {}
        elif path == "/busy":
            body = {"share": busy(float(arg))}
        else:
            body = {"runner": os.environ.get("HANGAR_RUNNER_ID"), "pid": os.getpid(), "port": int(os.environ["PORT"])}
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"#;

/// The hostile app as `name`, with `extra` manifest lines after `command`.
fn hostile(name: &str, extra: &str) -> AppDir {
    let app = AppDir::new(&format!(
        "name = \"{name}\"\ncommand = [\"python3\", \"hostile.py\"]\nhealth_path = \"/\"\n{extra}"
    ));
    app.write("hostile.py", HOSTILE);
    app
}

fn get(http: &Http, server: &TestServer, team: &str, app: &str, path: &str) -> Value {
    let reply = http.get(&format!("{}/{team}/{app}{path}", server.gateway_url), None);
    assert_eq!(reply.status, 200, "{path}: {}", reply.text());
    reply.json()
}

/// Processes on this machine whose environment names `runner`.
pub(crate) fn processes_of(runner: &str) -> Vec<u32> {
    let needle = format!("HANGAR_RUNNER_ID={runner}");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|var| var == needle.as_bytes()))
        })
        .collect()
}

/// Processes whose command line is `setsid sleep 1000`'s `sleep 1000`.
fn sleepers() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == b"sleep\x001000\x00"))
        .collect()
}

#[test]
fn a_hostile_app_of_another_team_reads_no_key_no_database_and_no_other_code() {
    let server = server();
    let http = Http::new();
    let data = server.data_dir();
    // The default team's app, with a revision and a cache of its own.
    let victim = testapp_dir("victim", "[scaling]\nmin_concurrency = 1\n");
    server.run(&["deploy", victim.path_str(), "--auth", "public"]).ok();
    let victim_rev = crate::revisions(&server, "victim")[0]["id"].as_str().unwrap().to_owned();
    let caches: Vec<String> =
        std::fs::read_dir(data.join("caches")).unwrap().flatten().map(|e| e.path().display().to_string()).collect();
    assert_eq!(caches.len(), 1, "the victim's cache dir exists: {caches:?}");

    server.run(&["teams", "create", "evil"]).ok();
    let mut targets: Vec<String> = ["admin.key", "secret.key", "hangar.db"]
        .iter()
        .flat_map(|f| [data.join(f).display().to_string(), format!("../../../{f}")])
        .collect();
    let victim_code = data.join("revisions").join(&victim_rev).join("app");
    targets.push(victim_code.join("hangar.toml").display().to_string());
    targets.push(victim_code.display().to_string());
    targets.push(data.join("revisions").display().to_string());
    targets.push(data.join("runners").display().to_string());
    targets.extend(caches.iter().cloned());
    let env = serde_json::json!({ "TARGETS": serde_json::to_string(&targets).unwrap(),
                                  "SERVER_PID": server.pid().unwrap().to_string() });
    let env = env.as_object().unwrap().iter().map(|(k, v)| format!("{k} = {v}")).collect::<Vec<_>>().join(", ");
    let app = hostile("prowler", &format!("env = {{ {env} }}\n"));
    server.run(&["--team", "evil", "deploy", app.path_str(), "--auth", "public"]).ok();

    let probe = get(&http, &server, "evil", "prowler", "/probe");
    assert_ne!(probe["uid"], 0, "{probe}");
    assert_eq!(probe["cwd"], "/app");
    for target in &targets {
        assert_ne!(probe["read"][target], "ok", "read {target}: {probe}");
        assert_ne!(probe["list"][target], "ok", "listed {target}: {probe}");
    }
    assert_ne!(probe["write_code"], "ok", "{probe}");
    assert_eq!(probe["signal_server"], "ProcessLookupError", "{probe}");
    // What is its own to write it may write.
    assert_eq!((&probe["tmp"], &probe["home"]), (&Value::from("ok"), &Value::from("ok")), "{probe}");
    assert_eq!(probe["resolver"], "ok", "{probe}");
    assert!(
        std::fs::read_dir(data.join("revisions")).unwrap().flatten().all(|r| !r.path().join("app/hacked.txt").exists())
    );
    // The victim still serves.
    assert!(get(&http, &server, "default", "victim", "/")["runner"].is_string());
}

#[test]
fn the_cache_dir_is_kept_across_revisions_of_an_app_and_not_shared_with_another() {
    let server = server();
    let http = Http::new();
    server.run(&["deploy", hostile("keeper", "").path_str(), "--auth", "public"]).ok();
    get(&http, &server, "default", "keeper", "/cache/write");
    let first = crate::revisions(&server, "keeper")[0]["id"].as_str().unwrap().to_owned();

    // A second revision, with other code, reads what the first wrote.
    let second = hostile("keeper", "env = { VERSION = \"2\" }\n");
    server.run(&["deploy", second.path_str()]).ok();
    let read = get(&http, &server, "default", "keeper", "/cache/read");
    assert_eq!(read, serde_json::json!({ "read": "ok", "content": first }));

    // Another app has a cache of its own, empty.
    server.run(&["deploy", hostile("stranger", "").path_str(), "--auth", "public"]).ok();
    let read = get(&http, &server, "default", "stranger", "/cache/read");
    assert_eq!(read["read"], "FileNotFoundError", "{read}");

    // Clearing empties it; deleting the app removes it.
    server.run(&["apps", "cache", "keeper", "--clear"]).ok();
    let read = get(&http, &server, "default", "keeper", "/cache/read");
    assert_eq!(read["read"], "FileNotFoundError", "{read}");
    let before = std::fs::read_dir(server.data_dir().join("caches")).unwrap().count();
    server.run(&["apps", "delete", "stranger"]).ok();
    assert_eq!(std::fs::read_dir(server.data_dir().join("caches")).unwrap().count(), before - 1);
}

#[test]
fn a_grandchild_that_left_its_session_ends_with_its_runner() {
    let mut server = server();
    let http = Http::new();
    server.run(&["deploy", hostile("forker", "[scaling]\nmin_concurrency = 1\n").path_str(), "--auth", "public"]).ok();
    let spawn = |server: &TestServer| {
        let before = sleepers().len();
        let runner = get(&http, server, "default", "forker", "/")["runner"].as_str().unwrap().to_owned();
        get(&http, server, "default", "forker", "/spawn");
        wait_until("the grandchild to run", || (sleepers().len() > before).then_some(()));
        runner
    };

    // runners stop
    let runner = spawn(&server);
    server.run(&["runners", "stop", &runner[..8]]).ok();
    wait_until("the runner's processes to end", || processes_of(&runner).is_empty().then_some(()));
    assert!(sleepers().is_empty(), "the grandchild outlived `runners stop`");

    // apps rollout --force
    let runner = spawn(&server);
    server.run(&["apps", "rollout", "forker", "--force"]).ok();
    wait_until("the runner's processes to end", || processes_of(&runner).is_empty().then_some(()));
    assert!(sleepers().is_empty(), "the grandchild outlived a forced rollout");

    // kill -9 of the server, then a restart
    let runner = spawn(&server);
    server.kill();
    server.restart();
    wait_until("the old runner's processes to end", || processes_of(&runner).is_empty().then_some(()));
    wait_until("no grandchild left", || sleepers().is_empty().then_some(()));
    assert!(!runners(&server, "forker", &[]).iter().any(|r| r["id"] == runner.as_str()));
}

#[test]
fn a_runner_of_one_team_cannot_connect_to_a_runner_of_another() {
    let server = server();
    let http = Http::new();
    server.run(&["deploy", hostile("target", "[scaling]\nmin_concurrency = 1\n").path_str(), "--auth", "public"]).ok();
    server.run(&["teams", "create", "intruder"]).ok();
    server.run(&["--team", "intruder", "deploy", hostile("scanner", "").path_str(), "--auth", "public"]).ok();

    let target = get(&http, &server, "default", "target", "/");
    let port = target["port"].as_u64().unwrap();
    // The port is the target's: it reaches itself there.
    let own = get(&http, &server, "default", "target", &format!("/connect?{port}"));
    assert_eq!((&own["connect"], &own["runner"]), (&Value::from("ok"), &target["runner"]), "{own}");
    // The scanner reaches no runner there, or only itself, should it listen on the same
    // port number in its own namespace.
    let scanner = get(&http, &server, "intruder", "scanner", "/")["runner"].clone();
    let other = get(&http, &server, "intruder", "scanner", &format!("/connect?{port}"));
    assert!(other["connect"] == "ConnectionRefusedError" || other["runner"] == scanner, "{other}");
    // Nor anything of the server: its API and gateway listen on this machine's loopback.
    for url in [&server.api_url, &server.gateway_url] {
        let port = url.rsplit(':').next().unwrap();
        let reply = get(&http, &server, "intruder", "scanner", &format!("/connect?{port}"));
        assert!(reply["connect"] == "ConnectionRefusedError" || reply["runner"] == scanner, "{url}: {reply}");
    }
    // The target still serves through the gateway, the only way in.
    assert_eq!(get(&http, &server, "default", "target", "/")["port"], port);
}

/// A server whose machine type `small` has tight limits.
fn server_with_small_machines(limits: &str) -> (TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hangar.toml");
    std::fs::write(&config, format!("[machine_types.small]\ncapacity = 4\n{limits}")).unwrap();
    (crate::server_with(&["--config", config.to_str().unwrap()]), dir)
}

/// The runner of `app` that is serving now, once there is one other than `not`.
fn serving_runner(server: &TestServer, app: &str, not: Option<&str>) -> String {
    wait_until("a serving runner", || {
        runners(server, app, &[])
            .into_iter()
            .find(|r| r["state"] == "idle" && Some(r["id"].as_str().unwrap()) != not)
            .map(|r| r["id"].as_str().unwrap().to_owned())
    })
}

/// Why `runner` of `app` ended, once it has.
fn end_reason(server: &TestServer, app: &str, runner: &str) -> String {
    let ended = wait_until("the runner to end", || {
        runners(server, app, &["--state", "terminated", "--since", "1h"]).into_iter().find(|r| r["id"] == runner)
    });
    ended["reason"].as_str().unwrap().to_owned()
}

#[test]
fn memory_over_the_limit_and_a_fork_bomb_are_contained_while_other_apps_are_served() {
    let (server, _config) = server_with_small_machines("memory_limit_mb = 128\npids_limit = 64\n");
    let http = Http::new();
    let steady = testapp_dir("steady", "[scaling]\nmin_concurrency = 1\n");
    server.run(&["deploy", steady.path_str(), "--auth", "public"]).ok();
    let greedy = hostile("greedy", "[runner]\nmachine_type = \"small\"\n[scaling]\nmin_concurrency = 1\n");
    server.run(&["deploy", greedy.path_str(), "--auth", "public"]).ok();
    let prober = testkit::Prober::start(&format!("{}/default/steady/", server.gateway_url), None, 20);

    // Memory: the kernel stops the runner at its limit, and the server replaces it.
    let first = serving_runner(&server, "greedy", None);
    get(&http, &server, "default", "greedy", "/hog");
    let reason = end_reason(&server, "greedy", &first);
    assert!(reason.contains("over its machine type's limit of 128 MiB of memory"), "{reason}");
    assert!(processes_of(&first).is_empty(), "a process of the runner outlived it");

    // A fork bomb: it meets the limit inside its own runner, which is replaced.
    let second = serving_runner(&server, "greedy", Some(&first));
    get(&http, &server, "default", "greedy", "/forkbomb");
    let reason = end_reason(&server, "greedy", &second);
    assert!(reason.contains("reached the limit of 64 processes"), "{reason}");
    wait_until("the bomb's processes to end", || processes_of(&second).is_empty().then_some(()));
    let third = serving_runner(&server, "greedy", Some(&second));
    assert_ne!(third, first);
    assert_eq!(get(&http, &server, "default", "greedy", "/")["runner"], third.as_str());

    let report = prober.finish();
    assert!(report.sent > 0 && report.failures.is_empty(), "{report:?}");
}

/// The cgroup directories named `name` beside this process's own (where the server it
/// starts makes its groups), in each hierarchy that has one.
fn cgroups_named(name: &str) -> Vec<std::path::PathBuf> {
    own_cgroup_dirs().into_iter().map(|dir| dir.join(name)).filter(|dir| dir.is_dir()).collect()
}

/// This process's cgroup directory in each mounted hierarchy groups are made in (v1:
/// memory's, pids' and cpu's; v2: the one).
fn own_cgroup_dirs() -> Vec<std::path::PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    own.lines()
        .filter_map(|line| {
            let (_, rest) = line.split_once(':')?;
            let (controllers, path) = rest.split_once(':')?;
            if !controllers.is_empty() && !controllers.split(',').any(|c| ["memory", "pids", "cpu"].contains(&c)) {
                return None;
            }
            let hierarchy = if controllers.is_empty() { "" } else { controllers };
            let dir = std::path::Path::new("/sys/fs/cgroup").join(hierarchy).join(path.trim_start_matches('/'));
            (dir.join("cgroup.procs").exists()).then_some(dir)
        })
        .collect()
}

#[test]
fn a_runners_cgroup_goes_with_it_and_empty_ones_an_earlier_run_left_are_swept_at_start() {
    // What a server killed while its runners' last processes were ending leaves behind:
    // empty groups. An hour-old one is swept; a young one may be another server's.
    let (stale, young) =
        (format!("hangar-runner-stale-{}", std::process::id()), format!("hangar-runner-young-{}", std::process::id()));
    let dirs = own_cgroup_dirs();
    assert!(!dirs.is_empty(), "this machine has no cgroups");
    for dir in &dirs {
        std::fs::create_dir(dir.join(&stale)).unwrap();
        let made = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        std::fs::File::open(dir.join(&stale)).unwrap().set_modified(made).unwrap();
        std::fs::create_dir(dir.join(&young)).unwrap();
    }
    let mut server = server();
    assert!(cgroups_named(&stale).is_empty(), "an earlier run's empty cgroup was kept");
    assert_eq!(cgroups_named(&young).len(), dirs.len(), "a young cgroup was removed");
    for dir in cgroups_named(&young) {
        std::fs::remove_dir(dir).unwrap();
    }

    let app = testapp_dir("grouped", "");
    server.run(&["deploy", app.path_str(), "--auth", "public"]).ok();
    let reply = Http::new().get(&format!("{}/default/grouped/", server.gateway_url), None);
    assert_eq!(reply.status, 200, "{}", reply.text());
    let group = format!("hangar-runner-{}", reply.header("x-hangar-runner-id").unwrap());
    assert!(!cgroups_named(&group).is_empty(), "the runner has no cgroup");
    // A server that stops removes its runners' groups before it exits.
    assert!(server.stop().success());
    assert_eq!(cgroups_named(&group), Vec::<std::path::PathBuf>::new(), "the runner's cgroup outlived the server");
}

#[test]
fn a_machine_types_cpus_cap_the_time_a_runner_gets() {
    let (server, _config) = server_with_small_machines("cpus = 0.25\n");
    let app = hostile("spinner", "[runner]\nmachine_type = \"small\"\n");
    server.run(&["deploy", app.path_str(), "--auth", "public"]).ok();
    // However idle the machine, a quarter of a CPU is all it gets (a loaded machine
    // may give it less).
    let share = get(&Http::new(), &server, "default", "spinner", "/busy?1.0")["share"].as_f64().unwrap();
    assert!(share < 0.4, "the runner got {share:.2} of a CPU");
}

#[test]
fn the_server_says_when_deployed_code_runs_unconfined() {
    let server = crate::server_with(&["--sandbox", "none"]);
    let health = Http::new().get(&format!("{}/healthz", server.api_url), None).json();
    assert_eq!(health["sandbox"], "none");
    assert!(health["warning"].as_str().unwrap().contains("unconfined"), "{health}");
    assert!(server.output().contains("sandbox: none"), "{}", server.output());

    let sandboxed = crate::server();
    let health = Http::new().get(&format!("{}/healthz", sandboxed.api_url), None).json();
    assert_eq!(health, serde_json::json!({ "status": "ok", "sandbox": "bwrap", "limits": "cgroup-v1" }));
}

/// A server that cannot sandbox refuses to start (fail closed) and says what to do.
#[test]
fn a_server_that_cannot_sandbox_refuses_to_start_and_says_how_to_fix_it() {
    let dir = tempfile::tempdir().unwrap();
    let start = |env_path: &str, extra: &[&str]| {
        std::process::Command::new(crate::BIN)
            .args(["server", "--api-addr", "127.0.0.1:0", "--gateway-addr", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(extra)
            .env("PATH", env_path)
            .env("HOME", dir.path())
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    // No bwrap on the PATH.
    let out = start(dir.path().to_str().unwrap(), &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("bwrap is not installed") && stderr.contains("--sandbox none"), "{stderr}");
    assert!(!dir.path().join("data/server.json").exists());
    // A path for the sandbox that is not absolute, and an unknown mode.
    let path = std::env::var("PATH").unwrap();
    let out = start(&path, &["--sandbox-ro-path", "relative/dir"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be an absolute path"), "{out:?}");
    let out = start(&path, &["--sandbox", "chroot"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not one of: bwrap, none"), "{out:?}");
}

#[test]
fn a_build_installs_packages_and_its_teams_cache_is_kept_for_its_next_builds_only() {
    let server = server();
    server.run(&["teams", "create", "other"]).ok();
    let deploy = |team: &str, build: &str| {
        let app = crate::testapp_dir("installer", &format!("build = [\"sh\", \"-c\", {build:?}]\n"));
        server.run(&["--team", team, "deploy", app.path_str()]).ok().stderr
    };
    // (The log starts with the command itself: what it prints must differ from its text.)
    let look = "echo \"cache-state: $(cat \"$HOME/.cache/note\" 2>/dev/null || echo empty)\"";
    // A real install from the package index (the build has the network); what it
    // leaves in HOME/.cache, where pip keeps its downloads, is the team's.
    let first = deploy(
        "default",
        &format!(
            "{look}; python3 -m venv .venv && .venv/bin/pip install --no-deps --progress-bar off six==1.16.0 \
             && echo six > \"$HOME/.cache/note\""
        ),
    );
    assert!(first.contains("cache-state: empty"), "{first}");
    assert!(first.contains("Successfully installed six-1.16.0"), "{first}");
    // The team's next build finds it; another team's build has a cache of its own.
    let second = deploy("default", look);
    assert!(second.contains("cache-state: six"), "{second}");
    let other = deploy("other", look);
    assert!(other.contains("cache-state: empty"), "{other}");
}
