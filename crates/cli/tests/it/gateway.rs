//! Calls through the gateway: routing, headers, auth, deadlines, streaming, and what
//! happens when runners die.

use std::time::Duration;

use testkit::{Http, Prober, wait_until};

use crate::{app_url, echo_example, revisions, runners, server, server_with, testapp_dir};

#[test]
fn the_example_answers_through_the_gateway_naming_runner_and_revision() {
    let server = server();
    let app = echo_example();
    let deployed = server.run(&["deploy", app.path_str(), "--json"]).ok().json();
    let http = Http::new();

    let reply = http.send("POST", &app_url(&server, "echo", "/hello?x=1"), Some(&server.root_key), &[], b"hi".to_vec());
    assert_eq!(reply.status, 200, "{}", reply.text());
    let body = reply.json();
    assert_eq!(body["path"], "/hello?x=1");
    assert_eq!(body["body"], "hi");
    assert_eq!(body["app"], "echo");
    assert_eq!(reply.header("x-hangar-revision").as_deref(), deployed["revision"].as_str());
    let runner = reply.header("x-hangar-runner-id").expect("the runner is named");
    assert_eq!(body["runner"], runner.as_str(), "the runner got HANGAR_RUNNER_ID");
    assert!(reply.header("x-hangar-request-id").is_some());
    let listed = runners(&server, "echo", &[]);
    assert!(listed.iter().any(|r| r["id"] == runner.as_str()), "{listed:?}");

    // The runner turns idle a moment after its call is answered.
    let metrics = wait_until("the runner to be idle in the metrics", || {
        let metrics = http.get(&format!("{}/metrics", server.api_url), Some(&server.root_key)).text();
        metrics.contains("hangar_runners{app=\"default/echo\",state=\"idle\"} 1").then_some(metrics)
    });
    assert!(metrics.contains("hangar_calls_total{app=\"default/echo\""), "{metrics}");
    assert!(metrics.contains("hangar_call_duration_seconds_bucket"), "{metrics}");
}

#[test]
fn auth_modes_decide_who_may_call() {
    let server = server();
    let http = Http::new();
    let (id, _) = server.root_key.split_once(':').unwrap();
    let wrong = format!("{id}:{}", "f".repeat(64));
    for (name, auth) in [("priv", "private"), ("pub", "public"), ("shr", "shared")] {
        let app = testapp_dir(name, "");
        server.run(&["deploy", app.path_str(), "--auth", auth]).ok();
    }
    let status = |app: &str, key: Option<&str>| http.get(&app_url(&server, app, "/"), key).status;
    assert_eq!(status("priv", None), 401);
    assert_eq!(status("priv", Some(&wrong)), 401);
    assert_eq!(status("priv", Some(&server.root_key)), 200);
    assert_eq!(status("pub", None), 200);
    assert_eq!(status("shr", None), 401);
    assert_eq!(status("shr", Some(&wrong)), 401);
    assert_eq!(status("shr", Some(&server.root_key)), 200);

    let reply = http.get(&app_url(&server, "priv", "/"), None);
    assert_eq!(reply.json()["error"]["code"], "unauthorized");
    let reply = http.get(&app_url(&server, "nope", "/"), Some(&server.root_key));
    assert_eq!(reply.status, 404);
    assert_eq!(reply.json()["error"]["code"], "app_not_found");

    // Who may not call an app learns nothing of whether it exists: without a valid key
    // the answers to a private app and to no app are the same, and so they are with
    // another team's key.
    let body = |app: &str, key: Option<&str>| {
        let reply = http.get(&app_url(&server, app, "/"), key);
        (reply.status, reply.json()["error"].to_string().replace(app, "APP"))
    };
    for key in [None, Some(wrong.as_str())] {
        assert_eq!(body("priv", key), body("nope", key), "{key:?}");
        assert_eq!(body("shr", key), body("nope", key), "{key:?}");
        assert_eq!(body("priv", key).0, 401);
    }
    let other =
        server.run(&["teams", "create", "other", "--json"]).ok().json()["key"]["key"].as_str().unwrap().to_owned();
    assert_eq!(body("priv", Some(&other)), body("nope", Some(&other)));
    assert_eq!(body("priv", Some(&other)).0, 404);
    assert_eq!(body("shr", Some(&other)).0, 200);
}

#[test]
fn a_call_from_zero_waits_for_setup_and_the_start_deadline_is_kept() {
    let server = server();
    let http = Http::new();
    // Recreate starts no runner: the first call finds none.
    let slow = testapp_dir("slow", "env = { SETUP_SECONDS = \"5\" }\n");
    server.run(&["deploy", slow.path_str(), "--strategy", "recreate", "--auth", "public"]).ok();
    assert!(runners(&server, "slow", &[]).is_empty());
    let reply = http.send("GET", &app_url(&server, "slow", "/"), None, &[("x-hangar-request-timeout", "1")], vec![]);
    assert_eq!(reply.status, 504, "{}", reply.text());
    assert_eq!(reply.json()["error"]["code"], "start_timeout");
    assert!(reply.text().contains("start deadline of 1s"), "{}", reply.text());
    // fal_client's spelling of the header works the same.
    let reply = http.send("GET", &app_url(&server, "slow", "/"), None, &[("x-fal-request-timeout", "1.5")], vec![]);
    assert_eq!(reply.status, 504, "{}", reply.text());
    assert!(reply.text().contains("start deadline of 1.5s"), "{}", reply.text());

    let quick = testapp_dir("quick", "env = { SETUP_SECONDS = \"1\" }\n");
    server.run(&["deploy", quick.path_str(), "--strategy", "recreate", "--auth", "public"]).ok();
    assert!(runners(&server, "quick", &[]).is_empty());
    let reply = http.get(&app_url(&server, "quick", "/first"), None);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["path"], "/first");

    let reply =
        http.send("GET", &app_url(&server, "quick", "/"), None, &[("x-hangar-request-timeout", "soon")], vec![]);
    assert_eq!(reply.status, 400, "{}", reply.text());
}

#[test]
fn a_call_past_request_timeout_gets_504_and_its_runner_is_let_go() {
    let server = server();
    let http = Http::new();
    let app = testapp_dir("stuck", "[scaling]\nrequest_timeout = 1\n");
    server.run(&["deploy", app.path_str(), "--auth", "public"]).ok();
    let reply = http.get(&app_url(&server, "stuck", "/?delay_ms=4000"), None);
    assert_eq!(reply.status, 504, "{}", reply.text());
    assert_eq!(reply.json()["error"]["code"], "request_timeout");
    let runner = reply.header("x-hangar-runner-id");
    assert!(runner.is_none(), "the 504 is the gateway's, not the runner's");
    wait_until("the stuck runner to be let go", || {
        let ended = runners(&server, "stuck", &["--state", "draining,terminating,terminated", "--since", "1m"]);
        (!ended.is_empty()).then_some(())
    });
    // A fresh runner serves the next call.
    assert_eq!(http.get(&app_url(&server, "stuck", "/"), None).status, 200);
}

#[test]
fn bodies_stream_both_ways() {
    let server = server();
    let http = Http::new();
    let app = testapp_dir("pipe", "");
    server.run(&["deploy", app.path_str(), "--auth", "public"]).ok();
    let payload: Vec<u8> = (0..4_000_000u32).map(|i| (i % 251) as u8).collect();
    let reply = http.send("POST", &app_url(&server, "pipe", "/echo"), None, &[], payload.clone());
    assert_eq!(reply.status, 200);
    assert!(reply.body == payload, "the echoed body differs ({} bytes back)", reply.body.len());
    let reply = http.get(&app_url(&server, "pipe", "/stream?chunks=3&interval_ms=50"), None);
    assert_eq!(reply.text(), "chunk 0\nchunk 1\nchunk 2\n");
}

#[test]
fn a_killed_runner_is_replaced_and_failing_starts_back_off_without_touching_serving_runners() {
    let server = server();
    let http = Http::new();
    let flag_path = server.shared_dir().join("broken").to_str().unwrap().to_owned();
    let app = testapp_dir(
        "sturdy",
        &format!("env = {{ FAIL_SETUP_IF_EXISTS = {flag_path:?} }}\n[scaling]\nmin_concurrency = 2\n"),
    );
    server.run(&["deploy", app.path_str(), "--auth", "public"]).ok();
    let idle = |n: usize| {
        move |server: &testkit::TestServer| {
            let rs = runners(server, "sturdy", &[]);
            (rs.iter().filter(|r| r["state"] == "idle").count() == n).then_some(rs)
        }
    };
    let before = wait_until("two idle runners", || idle(2)(&server));

    // From now on new runners of this revision fail to set up.
    std::fs::write(&flag_path, "broken").unwrap();
    let victim = http.get(&app_url(&server, "sturdy", "/"), None).json();
    let pid = testkit::host_pid(&victim);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    // A call sent in the moment between the kill and the server noticing it can still
    // be routed to the dead runner (and get 503 runner_lost); what is tested here is
    // what follows, so the calls start once the server has taken the runner out.
    let victim_id = victim["runner"].as_str().unwrap().to_owned();
    wait_until("the server to notice the kill", || {
        (!runners(&server, "sturdy", &[]).iter().any(|r| r["id"] == victim_id.as_str())).then_some(())
    });

    let prober = Prober::start(&app_url(&server, "sturdy", "/"), None, 20);
    let backoff = wait_until("a runner in crash_backoff", || {
        runners(&server, "sturdy", &[]).into_iter().find(|r| r["state"] == "crash_backoff")
    });
    // It keeps failing, and backing off, while the other runner serves on.
    wait_until("a second failed attempt", || {
        runners(&server, "sturdy", &[])
            .into_iter()
            .find(|r| r["state"] == "crash_backoff" && r["id"] != backoff["id"])
            .map(drop)
    });
    assert!(backoff["reason"].as_str().unwrap().contains("exit status: 3"), "{backoff}");
    // Mend the app: the next attempt succeeds and two runners serve again.
    std::fs::remove_file(&flag_path).unwrap();
    let after = wait_until("two idle runners again", || idle(2)(&server));
    let report = prober.finish();
    assert!(report.failures.is_empty(), "calls failed while a runner backed off: {:?}", report.failures);
    assert!(report.ok > 10, "{report:?}");

    let victim_id = victim_id.as_str();
    assert!(before.iter().any(|r| r["id"] == victim_id));
    assert!(!after.iter().any(|r| r["id"] == victim_id), "the killed runner was replaced");
    let ended = runners(&server, "sturdy", &["--state", "terminated", "--since", "1h"]);
    let killed = ended.iter().find(|r| r["id"] == victim_id).expect("the killed runner is listed as terminated");
    assert!(killed["reason"].as_str().unwrap().contains("unexpectedly"), "{killed}");
}

#[test]
fn a_deploy_that_never_gets_healthy_fails_and_calls_never_notice() {
    let server = server();
    let good = testapp_dir("steady", "[scaling]\nmin_concurrency = 1\n");
    let first = server.run(&["deploy", good.path_str(), "--auth", "public", "--json"]).ok().json();
    let prober = Prober::start(&app_url(&server, "steady", "/"), None, 50);
    let bad = testapp_dir("steady", "env = { HEALTH_NEVER = \"1\" }\n[runner]\nstartup_timeout = 2\n");
    let out = server.run(&["deploy", bad.path_str()]).failed();
    let report = prober.finish();
    assert!(out.stderr.contains("startup timeout"), "{}", out.stderr);
    assert!(report.failures.is_empty(), "calls failed during the deploy: {:?}", report.failures);
    assert!(report.ok > 50, "{report:?}");
    let revs = revisions(&server, "steady");
    assert_eq!(revs[0]["status"], "failed");
    assert!(revs[0]["failure"].as_str().unwrap().contains("startup timeout"), "{}", revs[0]);
    assert_eq!(revs[1]["id"], first["revision"]);
    assert_eq!(revs[1]["current"], true);
}

#[test]
fn after_a_server_crash_no_runner_of_the_old_run_survives_and_apps_serve_again() {
    let mut server = server();
    let http = Http::new();
    let app = testapp_dir("phoenix", "[scaling]\nmin_concurrency = 1\n");
    server.run(&["deploy", app.path_str(), "--auth", "public"]).ok();
    let pid = testkit::host_pid(&http.get(&app_url(&server, "phoenix", "/"), None).json());
    let alive = |pid: i32| std::path::Path::new(&format!("/proc/{pid}")).exists();

    server.kill();
    server.restart();
    wait_until("the old runner to be ended", || (!alive(pid)).then_some(()));
    let reply = http.get(&app_url(&server, "phoenix", "/"), None);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_ne!(testkit::host_pid(&reply.json()), pid);
}

#[test]
fn graceful_shutdown_stops_every_runner() {
    let mut server = server();
    let http = Http::new();
    let app = testapp_dir("tidy", "[scaling]\nmin_concurrency = 2\n");
    server.run(&["deploy", app.path_str(), "--auth", "public"]).ok();
    wait_until("two runners", || (runners(&server, "tidy", &[]).len() == 2).then_some(()));
    let pid = testkit::host_pid(&http.get(&app_url(&server, "tidy", "/"), None).json());
    let status = server.stop();
    assert!(status.success());
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(stat.is_empty(), "a runner outlived the server: {stat}\n{}", server.output());
}

#[test]
fn unknown_machine_type_capacity_keeps_runners_pending() {
    // One cpu slot: a second app's runner waits in pending until the first is gone.
    let server = server_with(&["--machine-type", "cpu=1"]);
    let a = testapp_dir("first", "[scaling]\nmin_concurrency = 1\n");
    server.run(&["deploy", a.path_str()]).ok();
    let b = testapp_dir("second", "[scaling]\nmin_concurrency = 1\n");
    server.run(&["deploy", b.path_str(), "--strategy", "recreate"]).ok();
    wait_until("the second app's runner to wait for room", || {
        runners(&server, "second", &[]).iter().any(|r| r["state"] == "pending").then_some(())
    });
    server.run(&["apps", "delete", "first"]).ok();
    wait_until("the second app's runner to start", || {
        runners(&server, "second", &[]).iter().any(|r| r["state"] == "idle").then_some(())
    });
    let _ = Duration::ZERO;
}

#[test]
fn a_runner_that_fails_its_health_checks_is_replaced() {
    let server = server();
    let http = Http::new();
    let app = testapp_dir("flaky", "env = { UNHEALTHY_AFTER = \"1\" }\n[scaling]\nmin_concurrency = 1\n");
    server.run(&["deploy", app.path_str(), "--auth", "public"]).ok();
    let first = http.get(&app_url(&server, "flaky", "/"), None).json()["runner"].as_str().unwrap().to_owned();
    let ended = wait_until("the unhealthy runner to be given up", || {
        runners(&server, "flaky", &["--state", "terminated", "--since", "1m"])
            .into_iter()
            .find(|r| r["id"] == first.as_str())
    });
    assert!(ended["reason"].as_str().unwrap().contains("health checks in a row failed"), "{ended}");
    wait_until("a new runner", || {
        runners(&server, "flaky", &[]).iter().any(|r| r["state"] == "idle" && r["id"] != first.as_str()).then_some(())
    });
}

#[test]
fn a_runner_over_its_machine_types_memory_limit_is_killed_and_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hangar.toml");
    std::fs::write(&config, "[machine_types.small]\ncapacity = 4\nmemory_limit_mb = 128\n").unwrap();
    let server = server_with(&["--config", config.to_str().unwrap()]);
    let app = testapp_dir("hungry", "[runner]\nmachine_type = \"small\"\n[scaling]\nmin_concurrency = 1\n");
    server.run(&["deploy", app.path_str(), "--auth", "public"]).ok();
    let http = Http::new();
    let reply = http.get(&app_url(&server, "hungry", "/mem?mb=16"), None);
    assert_eq!(reply.status, 200, "{}", reply.text());
    let first = reply.header("x-hangar-runner-id").unwrap();

    // Far over the limit: the runner is killed, whether or not it answered first.
    let reply = http.get(&app_url(&server, "hungry", "/mem?mb=400"), None);
    assert!(matches!(reply.status, 200 | 503), "{} {}", reply.status, reply.text());
    let ended = wait_until("the runner to be ended for its memory", || {
        runners(&server, "hungry", &["--state", "terminated", "--since", "1h"])
            .into_iter()
            .find(|r| r["id"] == first.as_str())
    });
    let reason = ended["reason"].as_str().unwrap();
    assert!(reason.contains("over its machine type's limit of 128 MiB"), "{ended}");

    // The app is not taken down: another runner takes its place and serves.
    wait_until("a new runner", || {
        runners(&server, "hungry", &[]).iter().any(|r| r["state"] == "idle" && r["id"] != first.as_str()).then_some(())
    });
    let reply = http.get(&app_url(&server, "hungry", "/"), None);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_ne!(reply.header("x-hangar-runner-id").as_deref(), Some(first.as_str()));
}

#[test]
fn a_runner_that_hangs_is_given_up_and_replaced() {
    let server = server();
    let http = Http::new();
    let app = testapp_dir("frozen", "[scaling]\nmin_concurrency = 1\n");
    server.run(&["deploy", app.path_str(), "--auth", "public"]).ok();
    let victim = http.get(&app_url(&server, "frozen", "/"), None).json();
    let (pid, first) = (testkit::host_pid(&victim), victim["runner"].as_str().unwrap().to_owned());
    // Stopped, the process neither answers nor exits: health checks time out.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGSTOP).unwrap();
    let ended = wait_until("the hung runner to be given up", || {
        runners(&server, "frozen", &["--state", "terminated", "--since", "1m"])
            .into_iter()
            .find(|r| r["id"] == first.as_str())
    });
    assert!(ended["reason"].as_str().unwrap().contains("health checks in a row failed"), "{ended}");
    assert!(!process_alive(pid), "the hung process was ended");
    wait_until("a new runner", || {
        runners(&server, "frozen", &[]).iter().any(|r| r["state"] == "idle" && r["id"] != first.as_str()).then_some(())
    });
    let reply = http.get(&app_url(&server, "frozen", "/"), None);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_ne!(reply.json()["runner"], first.as_str());
}

/// Whether `pid` is a process that has not ended (a zombie has).
fn process_alive(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()).is_some_and(|state| state != "Z")
}

#[test]
fn connections_to_runners_that_were_replaced_are_closed() {
    let server = server();
    let http = Http::new();
    let app = testapp_dir("turnover", "[scaling]\nmin_concurrency = 1\nmax_concurrency = 1\n");
    server.run(&["deploy", app.path_str(), "--auth", "public"]).ok();
    let url = app_url(&server, "turnover", "/");
    let pid = server.pid().unwrap();
    let open_files = || std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    assert_eq!(http.get(&url, None).status, 200);
    let before = open_files();

    // Every rollout replaces the runner: a new address, and the old one's pooled
    // connections are of no use any more.
    for _ in 0..10 {
        server.run(&["apps", "rollout", "turnover"]).ok();
        assert_eq!(http.get(&url, None).status, 200);
    }
    // Calls keep going; the gateway's pools drop what the stopped runners closed.
    let after = wait_until("the server's open files to come back down", || {
        assert_eq!(http.get(&url, None).status, 200);
        let now = open_files();
        (now <= before + 4).then_some(now)
    });
    assert!(after <= before + 4, "{before} open files before, {after} after");
}

/// Sends `request` as raw bytes on a connection of its own and returns the status and
/// body of the answer (status 0 when none came).
fn raw_call(server: &testkit::TestServer, request: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let addr = server.gateway_url.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    stream.write_all(request).unwrap();
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    let reply = String::from_utf8_lossy(&reply).into_owned();
    let status = reply.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = reply.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

#[test]
fn hostile_and_malformed_call_paths_get_a_json_error_and_the_gateway_serves_on() {
    let server = server();
    let app = testapp_dir("echo", "");
    server.run(&["deploy", app.path_str(), "--auth", "public"]).ok();
    let paths: [&[u8]; 8] = [
        b"//a/\xc3\xa9",
        b"//default/echo",
        b"/default//echo",
        b"/default",
        b"/",
        b"/\xc3\xa9/\xc3\xbc/x",
        b"/default/echo%00",
        b"/def%61ult/echo",
    ];
    for path in paths {
        let request = [b"GET ".as_slice(), path, b" HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"].concat();
        let (status, body) = raw_call(&server, &request);
        let shown = String::from_utf8_lossy(path);
        // 404 where no app is named; 401 where one is, for a caller with no key (who
        // learns nothing of whether it exists).
        assert!(matches!(status, 401 | 404), "{shown}: {status} {body}");
        let error: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{shown}: {e}: {body}"));
        assert!(error["error"]["message"].is_string(), "{shown}: {body}");
    }
    // Bytes that are not a valid request target are refused before any app is looked up.
    let (status, _) = raw_call(&server, b"GET /default/\xff\xfe HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    assert!((400..500).contains(&status), "{status}");
    // The gateway still serves, the rest of the path reaching the runner as sent.
    let reply = Http::new().get(&app_url(&server, "echo", "/a//b?x=1"), None);
    assert_eq!(reply.status, 200, "{}", reply.text());
}

/// Whether the server has closed `stream` (or answered and closed it) by `deadline`.
fn closed_by_server(stream: &mut std::net::TcpStream, deadline: std::time::Instant) -> bool {
    use std::io::Read;
    let mut buf = [0u8; 4096];
    while std::time::Instant::now() < deadline {
        stream.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(_) => return true,
        }
    }
    false
}

#[test]
fn half_sent_requests_are_dropped_after_their_timeouts_and_do_not_hold_up_other_calls() {
    use std::io::Write;
    let server = server_with(&["--header-read-timeout", "1", "--idle-timeout", "8", "--body-read-timeout", "1"]);
    let app = testapp_dir("steady", "[scaling]\nmin_concurrency = 1\n");
    server.run(&["deploy", app.path_str(), "--auth", "public"]).ok();
    let connect = |url: &str| std::net::TcpStream::connect(url.trim_start_matches("http://")).unwrap();
    let request = |path: &str| format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n");
    // A keep-alive connection on each listener that has had its answer and now waits.
    let mut kept = Vec::new();
    for (url, path) in [(&server.api_url, "/healthz"), (&server.gateway_url, "/default/steady/")] {
        let mut stream = connect(url);
        stream.write_all(request(path).as_bytes()).unwrap();
        assert!(read_answer(&mut stream).starts_with("HTTP/1.1 200"));
        kept.push((stream, path));
    }
    // Headers that never end, on both listeners, and a connection that sends nothing.
    let mut stalled = Vec::new();
    for url in [&server.api_url, &server.gateway_url] {
        for _ in 0..50 {
            let mut stream = connect(url);
            stream.write_all(b"GET /default/steady/ HTTP/1.1\r\nhost: x\r\nx-slow: ").unwrap();
            stalled.push(stream);
        }
    }
    // An upload whose body stops coming.
    let mut upload = connect(&server.api_url);
    let head = format!(
        "POST /v1/deploys?app_name=steady HTTP/1.1\r\nhost: x\r\nauthorization: Key {}\r\n\
         content-type: application/gzip\r\ncontent-length: 100000\r\n\r\n",
        server.root_key
    );
    upload.write_all(head.as_bytes()).unwrap();
    upload.write_all(&[0x1f, 0x8b]).unwrap();

    // Meanwhile other calls are served.
    let reply = Http::new().get(&app_url(&server, "steady", "/"), None);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(Http::new().get(&format!("{}/healthz", server.api_url), None).status, 200);

    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    for (i, stream) in stalled.iter_mut().enumerate() {
        assert!(closed_by_server(stream, deadline), "stalled connection {i} is still open");
    }
    assert!(closed_by_server(&mut upload, deadline), "the stalled upload is still open");
    // The waiting keep-alive connections have now been idle longer than a header may
    // take, and are still open: idle has its own, longer timeout.
    for (stream, path) in &mut kept {
        stream.write_all(request(path).as_bytes()).unwrap();
        assert!(read_answer(stream).starts_with("HTTP/1.1 200"), "the idle connection to {path} was closed");
    }
    // Until that runs out too, as it does for a connection that never sends a byte.
    let mut silent: Vec<_> = [&server.api_url, &server.gateway_url].map(|url| connect(url)).into();
    for (i, stream) in kept.iter_mut().map(|(s, _)| s).chain(&mut silent).enumerate() {
        assert!(closed_by_server(stream, deadline), "idle connection {i} is still open");
    }
    let reply = Http::new().get(&app_url(&server, "steady", "/"), None);
    assert_eq!(reply.status, 200, "{}", reply.text());
}

/// Reads one answer's head and a body with a content-length from `stream`, as text.
fn read_answer(stream: &mut std::net::TcpStream) -> String {
    use std::io::Read;
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while !answer.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).unwrap() == 0 {
            break;
        }
        answer.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&answer).into_owned();
    let length = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).unwrap();
    head + &String::from_utf8_lossy(&body)
}

#[test]
fn metrics_take_a_key_and_a_teams_key_sees_only_its_own_apps() {
    let server = server();
    let http = Http::new();
    let other =
        server.run(&["teams", "create", "other", "--json"]).ok().json()["key"]["key"].as_str().unwrap().to_owned();
    server.run(&["deploy", testapp_dir("mine", "").path_str(), "--auth", "public"]).ok();
    server.run(&["--team", "other", "deploy", testapp_dir("theirs", "").path_str(), "--auth", "public"]).ok();
    for (team, app) in [("default", "mine"), ("other", "theirs")] {
        let reply = http.get(&format!("{}/{team}/{app}/", server.gateway_url), None);
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    let url = format!("{}/metrics", server.api_url);
    let reply = http.get(&url, None);
    assert_eq!((reply.status, reply.json()["error"]["code"].as_str()), (401, Some("unauthorized")), "{}", reply.text());

    let all = http.get(&url, Some(&server.root_key)).text();
    assert!(all.contains("app=\"default/mine\"") && all.contains("app=\"other/theirs\""), "{all}");
    let own = http.get(&url, Some(&other)).text();
    assert!(own.contains("hangar_calls_total{app=\"other/theirs\""), "{own}");
    assert!(!own.contains("default/"), "a team's key sees another team's series: {own}");
    assert!(own.contains("# TYPE hangar_calls"), "{own}");

    // --metrics-public opens it again.
    let public = crate::server_with(&["--metrics-public"]);
    assert_eq!(http.get(&format!("{}/metrics", public.api_url), None).status, 200);
}

/// One answer read off a raw connection: status, headers (names lowercased) and body,
/// decoded when chunked.
struct RawAnswer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawAnswer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// Reads one answer from `reader`; `head_only` for the answer to a HEAD request.
fn read_raw_answer(reader: &mut impl std::io::BufRead, head_only: bool) -> RawAnswer {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let status = line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status in {line:?}"));
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        let Some((name, value)) = line.trim_end().split_once(':') else { break };
        headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
    }
    let mut answer = RawAnswer { status, headers, body: Vec::new() };
    if head_only {
        return answer;
    }
    if answer.header("transfer-encoding") == Some("chunked") {
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            let size = usize::from_str_radix(line.trim_end().split(';').next().unwrap(), 16).unwrap();
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).unwrap();
            if size == 0 {
                break;
            }
            answer.body.extend_from_slice(&chunk[..size]);
        }
    } else {
        let length: usize = answer.header("content-length").map_or(0, |v| v.parse().unwrap());
        answer.body = vec![0; length];
        reader.read_exact(&mut answer.body).unwrap();
    }
    answer
}

#[test]
fn one_kept_alive_connection_carries_every_kind_of_call_in_turn() {
    use std::io::{BufReader, Read, Write};
    let server = server();
    let app = testapp_dir("turns", "[scaling]\nmin_concurrency = 1\n");
    server.run(&["deploy", app.path_str(), "--auth", "public"]).ok();
    let mut stream = std::net::TcpStream::connect(server.gateway_url.trim_start_matches("http://")).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let get = |path: &str| format!("GET /default/turns{path} HTTP/1.1\r\nhost: x\r\n\r\n");

    // A plain call: the runner sees the path after the app, and the answer names runner,
    // revision and call.
    stream.write_all(get("/a/b?x=1").as_bytes()).unwrap();
    let first = read_raw_answer(&mut reader, false);
    assert_eq!(first.status, 200);
    let seen: serde_json::Value = serde_json::from_slice(&first.body).unwrap();
    assert_eq!(seen["path"], "/a/b", "{seen}");
    for name in ["x-hangar-runner-id", "x-hangar-revision", "x-hangar-request-id"] {
        assert!(first.header(name).is_some_and(|v| !v.is_empty()), "{name} missing: {:?}", first.headers);
    }
    // Two calls sent at once are answered in order, each with its own id.
    stream.write_all(format!("{}{}", get("/one"), get("/two")).as_bytes()).unwrap();
    let (one, two) = (read_raw_answer(&mut reader, false), read_raw_answer(&mut reader, false));
    let path = |a: &RawAnswer| serde_json::from_slice::<serde_json::Value>(&a.body).unwrap()["path"].clone();
    assert_eq!((path(&one), path(&two)), ("/one".into(), "/two".into()));
    assert_ne!(one.header("x-hangar-request-id"), two.header("x-hangar-request-id"));
    // HEAD gets a head and no body; the next answer on the connection is still whole.
    stream.write_all(b"HEAD /default/turns/h HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    assert_eq!(read_raw_answer(&mut reader, true).status, 200);
    // A streamed answer comes chunked, as the runner sent it.
    stream.write_all(get("/stream?chunks=3&interval_ms=20").as_bytes()).unwrap();
    let streamed = read_raw_answer(&mut reader, false);
    assert_eq!(String::from_utf8_lossy(&streamed.body), "chunk 0\nchunk 1\nchunk 2\n");
    // A small body of known length, and then a chunked one, are echoed.
    let body = vec![b'z'; 3000];
    let post = format!("POST /default/turns/echo HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n", body.len());
    stream.write_all(&[post.as_bytes(), &body].concat()).unwrap();
    assert_eq!(read_raw_answer(&mut reader, false).body, body);
    // A call refused is answered, and the connection serves on.
    stream.write_all(b"GET /default/turns/ HTTP/1.1\r\nhost: x\r\nx-hangar-request-timeout: soon\r\n\r\n").unwrap();
    let refused = read_raw_answer(&mut reader, false);
    assert_eq!(refused.status, 400);
    let error: serde_json::Value = serde_json::from_slice(&refused.body).unwrap();
    assert_eq!(error["error"]["code"], "invalid_request", "{error}");
    // A chunked upload; then an unknown app, and a plain call, on the same connection.
    stream
        .write_all(b"POST /default/turns/echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
        .unwrap();
    assert_eq!(read_raw_answer(&mut reader, false).body, b"abcde");
    stream.write_all(b"GET /default/nothing/ HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    assert_eq!(read_raw_answer(&mut reader, false).status, 401);
    stream.write_all(get("/again").as_bytes()).unwrap();
    assert_eq!(path(&read_raw_answer(&mut reader, false)), "/again");

    // A caller that asks to close gets its answer, then the end of the connection: first
    // thing on a connection, and after a chunked upload.
    let close = b"GET /default/turns/last HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";
    let upload = b"POST /default/turns/echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n";
    for before in [&b""[..], &upload[..]] {
        let mut stream = std::net::TcpStream::connect(server.gateway_url.trim_start_matches("http://")).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        stream.write_all(&[before, &close[..]].concat()).unwrap();
        if !before.is_empty() {
            assert_eq!(read_raw_answer(&mut reader, false).status, 200);
        }
        assert_eq!(read_raw_answer(&mut reader, false).status, 200);
        let mut rest = Vec::new();
        assert_eq!(reader.read_to_end(&mut rest).unwrap(), 0, "more after the last answer: {rest:?}");
    }
}

#[test]
fn a_revisions_health_settings_take_the_place_of_the_servers() {
    let server = server();
    let http = Http::new();
    let manifest = "env = { UNHEALTHY_AFTER = \"1\" }\n[scaling]\nmin_concurrency = 1\n\
                    [runner]\nhealth_interval = 1\nhealth_failure_threshold = 2\nhealth_start_period = 2\n";
    let app = testapp_dir("strict", manifest);
    server.run(&["deploy", app.path_str(), "--auth", "public"]).ok();
    let first = http.get(&app_url(&server, "strict", "/"), None).json()["runner"].as_str().unwrap().to_owned();
    let ended = wait_until("the unhealthy runner to be given up", || {
        runners(&server, "strict", &["--state", "terminated", "--since", "1m"])
            .into_iter()
            .find(|r| r["id"] == first.as_str())
    });
    // Its own threshold, not the server's, and only after its start period and an interval.
    assert!(ended["reason"].as_str().unwrap().contains("2 health checks in a row failed"), "{ended}");
    assert!(ended["uptime"].as_u64().unwrap() >= 3, "failed checks in the start period do not count: {ended}");
}

#[test]
fn app_logs_merge_the_runners_lines_and_filter_them_by_text_and_time() {
    let server = server();
    let http = Http::new();
    let app = testapp_dir("chatty", "[scaling]\nmin_concurrency = 2\n");
    server.run(&["deploy", app.path_str(), "--auth", "public"]).ok();
    wait_until("two runners", || (runners(&server, "chatty", &["--state", "idle"]).len() == 2).then_some(()));
    let before = time::OffsetDateTime::now_utc() - Duration::from_secs(3600);
    for n in 0..4 {
        let reply = http.send(
            "GET",
            &app_url(&server, "chatty", "/"),
            None,
            &[("x-fal-request-id", &format!("call-{n}"))],
            vec![],
        );
        assert_eq!(reply.status, 200);
    }
    let ids: Vec<String> =
        runners(&server, "chatty", &[]).iter().map(|r| r["id"].as_str().unwrap().to_owned()).collect();
    let all = server.run(&["apps", "logs", "chatty"]).ok().stdout;
    for id in &ids {
        assert!(all.lines().any(|l| l.starts_with(&id[..8])), "every runner's lines, marked: {all}");
    }
    let times: Vec<&str> = all.lines().map(|l| l.split(' ').nth(1).unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "merged by time: {all}");

    let found = server.run(&["apps", "logs", "chatty", "--search", "working on call-"]).ok().stdout;
    assert_eq!(found.lines().count(), 4, "{found}");
    let early = before.format(&time::format_description::well_known::Rfc3339).unwrap();
    assert_eq!(server.run(&["apps", "logs", "chatty", "--until", &early]).ok().stdout, "", "nothing before the deploy");
    assert_eq!(
        server.run(&["apps", "logs", "chatty", "--since", "1h", "--search", "call-2"]).ok().stdout.lines().count(),
        1
    );
    let out = server.run(&["apps", "logs", "chatty", "--since", "yesterday"]).failed();
    assert!(out.stderr.contains("neither a duration"), "{}", out.stderr);

    // One runner's lines, filtered the same way.
    let runner_id = found.lines().next().unwrap().split(' ').next().unwrap().to_owned();
    let one = server.run(&["runners", "logs", &runner_id, "--search", "working on"]).ok().stdout;
    assert!(!one.is_empty() && one.lines().all(|l| l.contains("working on")), "{one}");

    // Following: a new call's line comes while the command runs.
    let mut follow = server
        .cli()
        .args(["apps", "logs", "chatty", "-f", "--search", "call-new"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    http.send("GET", &app_url(&server, "chatty", "/"), None, &[("x-fal-request-id", "call-new")], vec![]);
    let line = rx.recv_timeout(Duration::from_secs(30)).expect("the new line, while following");
    assert!(line.contains("working on call-new"), "{line}");
    follow.kill().unwrap();
    follow.wait().unwrap();
}
