//! Runners come and go with load, within the app's scaling values.

use std::collections::BTreeSet;

use testkit::{Http, wait_until};

use crate::{app_url, runners, server, testapp_dir};

#[test]
fn runners_grow_with_concurrent_calls_and_shrink_after_keep_alive() {
    let server = server();
    let app = testapp_dir(
        "elastic",
        "env = { SETUP_SECONDS = \"0.7\" }\n[scaling]\nmin_concurrency = 1\nmax_concurrency = 3\nkeep_alive = 2\n\
         [runner]\nmax_multiplexing = 1\n",
    );
    server.run(&["deploy", app.path_str(), "--auth", "public"]).ok();
    assert_eq!(runners(&server, "elastic", &[]).len(), 1);

    let url = app_url(&server, "elastic", "/?delay_ms=2500");
    let mut seen_states = BTreeSet::new();
    let mut most = 0;
    let statuses = std::thread::scope(|scope| {
        let calls: Vec<_> = (0..4).map(|_| scope.spawn(|| Http::new().get(&url, None).status)).collect();
        while !calls.iter().all(|c| c.is_finished()) {
            let rs = runners(&server, "elastic", &[]);
            most = most.max(rs.len());
            seen_states.extend(rs.iter().map(|r| r["state"].as_str().unwrap().to_owned()));
        }
        calls.into_iter().map(|c| c.join().unwrap()).collect::<Vec<_>>()
    });
    assert_eq!(statuses, vec![200; 4], "every call is served, the fourth after waiting");
    assert_eq!(most, 3, "runners grow to max_concurrency and no further");
    for state in ["setup", "running"] {
        assert!(seen_states.contains(state), "apps runners showed {seen_states:?}");
    }

    wait_until("runners to shrink back to min_concurrency", || {
        let rs = runners(&server, "elastic", &[]);
        seen_states.extend(rs.iter().map(|r| r["state"].as_str().unwrap().to_owned()));
        (rs.len() == 1 && rs[0]["state"] == "idle").then_some(())
    });
    let ended = runners(&server, "elastic", &["--state", "terminated", "--since", "5m"]);
    assert_eq!(ended.len(), 2, "{ended:?}");
    assert!(ended.iter().all(|r| r["reason"] == "scaled down"), "{ended:?}");
}

#[test]
fn scale_changes_values_at_once_and_warns_about_code_specific_ones() {
    let server = server();
    let app = testapp_dir("tune", "[scaling]\nmin_concurrency = 0\n");
    server.run(&["deploy", app.path_str(), "--auth", "public"]).ok();
    let out = server.run(&["apps", "scale", "tune"]).failed();
    assert!(out.stderr.contains("no values given"), "{}", out.stderr);

    let out = server.run(&["apps", "scale", "tune", "--min-concurrency", "2", "--max-multiplexing", "3"]).ok();
    assert!(out.stderr.contains("max_multiplexing is code-specific"), "{}", out.stderr);
    let apps = server.run(&["apps", "list", "--json"]).ok().json();
    assert_eq!(apps[0]["min_concurrency"], 2);
    assert_eq!(apps[0]["max_multiplexing"], 3);
    wait_until("min_concurrency runners", || (runners(&server, "tune", &[]).len() == 2).then_some(()));

    let out = server.run(&["apps", "scale", "tune", "--min-concurrency", "20", "--max-concurrency", "3"]).failed();
    assert!(out.stderr.contains("min_concurrency (20) must not exceed max_concurrency (3)"), "{}", out.stderr);
    let out = server.run(&["apps", "scale", "tune", "--machine-type", "gpu-x"]).failed();
    assert!(out.stderr.contains("unknown machine type"), "{}", out.stderr);
    let apps = server.run(&["apps", "list", "--json"]).ok().json();
    assert_eq!(apps[0]["min_concurrency"], 2, "refused changes change nothing");
    let history = server.run(&["apps", "history", "tune", "--json"]).ok().json();
    assert_eq!(history[0]["action"], "scale");
    assert!(history[0]["details"].as_str().unwrap().contains("min_concurrency=2"));
}

#[test]
fn runners_can_be_stopped_replaced_killed_and_their_logs_read() {
    let server = server();
    let http = Http::new();
    let app = testapp_dir("ops", "[scaling]\nmin_concurrency = 1\n");
    server.run(&["deploy", app.path_str(), "--auth", "public"]).ok();
    assert_eq!(http.get(&app_url(&server, "ops", "/logged"), None).status, 200);
    let first = runners(&server, "ops", &[])[0]["id"].as_str().unwrap().to_owned();

    let logs = server.run(&["runners", "logs", &first[..8]]).ok().stdout;
    assert!(logs.contains("testapp listening"), "{logs}");
    assert!(logs.contains("GET /logged -> 200"), "{logs}");
    let last = server.run(&["runners", "logs", &first[..8], "-n", "1"]).ok().stdout;
    assert_eq!(last.lines().count(), 1, "{last}");

    let out = server.run(&["runners", "stop", &first[..8], "--replace", "--json"]).ok().json();
    assert_eq!(out["id"], first.as_str());
    let second = wait_until("a replacement to serve and the old runner to go", || {
        let rs = runners(&server, "ops", &[]);
        (rs.len() == 1 && rs[0]["id"] != first.as_str() && rs[0]["state"] == "idle")
            .then(|| rs[0]["id"].as_str().unwrap().to_owned())
    });
    let listed = server.run(&["runners", "list", "--json"]).ok().json();
    assert_eq!(listed[0]["id"], second.as_str());

    server.run(&["runners", "kill", &second]).ok();
    let history = server.run(&["apps", "history", "ops", "--json"]).ok().json();
    assert_eq!(history[0]["action"], "runner_kill");
    assert_eq!(history[1]["action"], "runner_replace");
    let out = server.run(&["runners", "kill", "ffffffff"]).failed();
    assert!(out.stderr.contains("no runner matches"), "{}", out.stderr);
}

#[test]
fn after_a_restart_an_apps_minimum_comes_up_at_once_not_when_the_controller_next_wakes() {
    let mut server = server();
    let app = testapp_dir("steady", "[scaling]\nmin_concurrency = 2\n");
    server.run(&["deploy", app.path_str(), "--auth", "public"]).ok();
    let first = wait_until("two runners", || {
        let rs = runners(&server, "steady", &[]);
        (rs.len() == 2).then_some(rs)
    });
    // A runner that ended is listed with --since, in any state, and not without it.
    let killed = first[0]["id"].as_str().unwrap().to_owned();
    server.run(&["runners", "kill", &killed[..8]]).ok();
    let ended = wait_until("the killed runner in the listing with --since", || {
        runners(&server, "steady", &["--since", "1h"]).into_iter().find(|r| r["id"] == killed.as_str())
    });
    assert_eq!(ended["state"], "terminated", "{ended}");
    assert!(runners(&server, "steady", &[]).iter().all(|r| r["id"] != killed.as_str()));
    server.stop();
    server.restart();
    // An idle controller sleeps 30 s between looks; the minimum must not wait for one.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let up = runners(&server, "steady", &[]).iter().filter(|r| r["state"] == "idle").count();
        if up == 2 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{up} of 2 runners 20 s after the restart");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
