//! Several servers on one PostgreSQL store: any of them takes deploys, operations and
//! calls for any app, each app runs on one of them, and when that one dies or stops
//! another takes the app over.

use std::time::{Duration, Instant};

use serde_json::json;
use testkit::{Http, Prober, TestServer, wait_until};

use crate::queue::{completed, submit};
use crate::{BIN, FAST, app_url, assert_no_failures, revisions, testapp_dir};

/// A short lease, so that failover takes seconds.
const TTL: &str = "2";

fn three_servers() -> (TestServer, TestServer, TestServer) {
    let flags = [FAST, &["--lease-ttl", TTL]].concat();
    let a = TestServer::start_shared(BIN, &flags);
    let b = a.join(&flags);
    let c = a.join(&flags);
    (a, b, c)
}

fn deploy(server: &TestServer, name: &str, extra: &str, flags: &[&str]) -> String {
    let app = testapp_dir(name, extra);
    let out = server.run(&[&["deploy", app.path_str(), "--auth", "public", "--json"], flags].concat()).ok();
    assert_eq!(out.json()["status"], "deployed", "{}", out.stdout);
    out.json()["revision"].as_str().unwrap().to_owned()
}

fn current(server: &TestServer, app: &str) -> String {
    let revs = revisions(server, app);
    revs.iter().find(|r| r["current"] == true).expect("a current revision")["id"].as_str().unwrap().to_owned()
}

/// Waits until a call to `app` through `server` answers 200, and returns its body.
fn until_served(server: &TestServer, app: &str) -> serde_json::Value {
    let http = Http::new();
    wait_until(&format!("{app} to answer through {}", server.gateway_url), || {
        let reply = http.get(&app_url(server, app, "/"), None);
        (reply.status == 200).then(|| reply.json())
    })
}

#[test]
fn three_servers_take_deploys_calls_and_set_revs_through_any_of_them_with_no_failed_call() {
    let (a, b, c) = three_servers();
    let v1 = deploy(&a, "web", "env = { V = \"1\" }\n[runner]\nmax_multiplexing = 8\n", &[]);
    assert_eq!(until_served(&b, "web")["revision"], v1.as_str());
    until_served(&c, "web");
    let prober = Prober::start(&app_url(&b, "web", "/"), None, 100);

    // A rolling deploy through A, a rolling set-rev through C, and back.
    let v2 = deploy(&a, "web", "env = { V = \"2\" }\n[runner]\nmax_multiplexing = 8\n", &["--strategy", "rolling"]);
    assert_eq!(current(&c, "web"), v2);
    assert_eq!(until_served(&b, "web")["revision"], v2.as_str());
    c.run(&["apps", "set-rev", "web", &v1[..8]]).ok();
    assert_eq!(current(&b, "web"), v1);
    assert_eq!(until_served(&c, "web")["revision"], v1.as_str());
    c.run(&["apps", "set-rev", "web", &v2[..8], "--strategy", "rolling"]).ok();
    assert_eq!(current(&a, "web"), v2);
    let report = prober.finish();
    assert_no_failures(&report);
    assert!(report.ok > 20, "{report:?}");

    // The app runs on one server: every server lists the same runners.
    let listed = |s: &TestServer| {
        let out = s.run(&["apps", "runners", "web", "--json"]).ok().json();
        let mut ids: Vec<String> =
            out.as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap().to_owned()).collect();
        ids.sort();
        ids
    };
    let on_a = listed(&a);
    assert!(!on_a.is_empty());
    assert_eq!(listed(&b), on_a);
    assert_eq!(listed(&c), on_a);
    // Listings count its runners on every server, and a runner's log is found through
    // any of them.
    wait_until("apps list through C to count the runners", || {
        let apps = c.run(&["apps", "list", "--json"]).ok().json();
        (apps[0]["runners"] == on_a.len()).then_some(())
    });
    let log = c.run(&["runners", "logs", &on_a[0]]).ok();
    assert!(log.success(), "{}", log.stderr);
    let history = b.run(&["apps", "history", "web", "--json"]).ok().json();
    let actions: Vec<&str> = history.as_array().unwrap().iter().map(|h| h["action"].as_str().unwrap()).collect();
    assert_eq!(actions.iter().filter(|a| **a == "set_rev").count(), 2, "{actions:?}");
}

#[test]
fn when_the_server_running_an_app_is_killed_another_takes_it_over_within_the_lease_and_no_queue_request_is_lost() {
    let (mut a, b, c) = three_servers();
    // Made through A, so A runs it; one runner is kept up.
    let rev = deploy(&a, "web", "[scaling]\nmin_concurrency = 1\n[runner]\nmax_multiplexing = 16\n", &[]);
    until_served(&b, "web");
    let http = Http::new();
    let requests: Vec<_> =
        (0..12).map(|i| submit(&http, &b, "web", "/work?delay_ms=700", &json!({ "n": i }))).collect();
    // Some of them are running on A's runner when A dies.
    wait_until("a queue request to start", || {
        let status = http.get(requests[0]["status_url"].as_str().unwrap(), Some(&b.root_key));
        (status.json()["status"] != "IN_QUEUE").then_some(())
    });

    let killed = Instant::now();
    a.kill();
    // Calls through B wait while no server runs the app, and are then served by the
    // server that took it over: none fails. The longest wait is the failover window.
    let mut longest = Duration::ZERO;
    let mut served_after = 0;
    while served_after < 20 {
        let sent = Instant::now();
        let reply = http.get(&app_url(&b, "web", "/"), None);
        assert_eq!(reply.status, 200, "a call failed {:?} after the kill: {}", killed.elapsed(), reply.text());
        let took = sent.elapsed();
        longest = longest.max(took);
        if longest > Duration::from_secs(1) {
            served_after += 1;
        }
        assert!(killed.elapsed() < Duration::from_secs(60), "the app was not taken over");
    }
    eprintln!("failover window: the longest call after the kill took {:.2} s", longest.as_secs_f64());
    assert!(longest < Duration::from_secs(20), "a call waited {longest:?}");
    assert_eq!(until_served(&c, "web")["path"], "/");

    // The server that took it over has the revision's built code and its upload, from
    // the store: A, which built it, is gone.
    let has = |s: &TestServer| {
        let code = s.data_dir().join("revisions").join(&rev).join("app");
        let uploads = std::fs::read_dir(s.data_dir().join("artifacts/sha256")).map_or(0, |d| d.count());
        code.is_dir() && uploads == 1
    };
    assert!(has(&b) || has(&c), "no server has the code and upload of {rev}");

    // Every queue request completes (at least once), whichever server it ended on.
    for request in &requests {
        let status = completed(&http, &c, request);
        let result = http.get(request["response_url"].as_str().unwrap(), Some(&c.root_key));
        assert_eq!(result.status, 200, "{status} {}", result.text());
    }
}

#[test]
fn a_server_that_stops_hands_its_apps_over_and_no_call_fails() {
    let (mut a, b, c) = three_servers();
    deploy(&a, "web", "[runner]\nmax_multiplexing = 8\n", &[]);
    until_served(&b, "web");
    let prober = Prober::start(&app_url(&b, "web", "/"), None, 100);
    let started = Instant::now();
    assert!(a.stop().success());
    eprintln!("the stop took {:.2} s", started.elapsed().as_secs_f64());
    until_served(&c, "web");
    // Long enough for the calls to run on the new owner for a while.
    let settled = Instant::now();
    wait_until("a few seconds of calls on the new owner", || {
        (settled.elapsed() > Duration::from_secs(2)).then_some(())
    });
    let report = prober.finish();
    assert_no_failures(&report);
    assert!(report.ok > 100, "{report:?}");
}

#[test]
fn apps_spread_over_the_servers_that_take_them() {
    let flags = [FAST, &["--lease-ttl", TTL]].concat();
    let mut a = TestServer::start_shared(BIN, &flags);
    for name in ["s1", "s2", "s3", "s4"] {
        deploy(&a, name, "", &[]);
    }
    // A leaves; the two others share its four apps.
    let b = a.join(&flags);
    let c = a.join(&flags);
    a.stop();
    for name in ["s1", "s2", "s3", "s4"] {
        until_served(&b, name);
        until_served(&c, name);
    }
    let count = |s: &TestServer| s.output().matches("runs the app here now").count();
    wait_until("two apps each", || (count(&b) == 2 && count(&c) == 2).then_some(()));
}
