//! The dashboard in a real browser: Debian's Chromium driven by Playwright
//! (`tests/browser/dashboard.mjs`), against the real server.

use std::path::Path;

use crate::{app_with_build, revisions, server_with, testapp_dir};

#[test]
fn the_dashboard_shows_versions_rolls_back_deletes_and_rolls_out() {
    // Its runners each hold one of two GPUs (ids given: this machine has none).
    let config = tempfile::tempdir().unwrap();
    std::fs::write(config.path().join("hangar.toml"), "[machine_types.gpu]\ncapacity = 4\ngpus = 1\n").unwrap();
    let config_file = config.path().join("hangar.toml");
    let server = server_with(&["--gpus", "g0,g1", "--config", config_file.to_str().unwrap(), "--chart-interval", "1"]);
    let deploy = |extra: &str, flags: &[&str]| {
        let app =
            testapp_dir("web", &format!("{extra}[scaling]\nmin_concurrency = 1\n[runner]\nmachine_type = \"gpu\"\n"));
        let out = server.run(&[&["deploy", app.path_str(), "--json"][..], flags].concat()).ok().json();
        out["revision"].as_str().unwrap().to_owned()
    };
    let v1 = deploy("env = { V = \"1\" }\n", &[]);
    let v2 = deploy("env = { V = \"2\" }\n", &["--annotation", "git=3f2a1b", "--annotation", "ticket=OPS-7"]);
    let broken = app_with_build("web", "exit 1");
    server.run(&["deploy", broken.path_str(), "--message", "broken build"]).failed();
    let v3 = deploy("env = { V = \"3\" }\n", &[]);
    // A canary that fails half its calls trips the guard, which ends its share.
    let failing = testapp_dir("web", "env = { V = \"0\", FAIL_EVERY = \"2\" }\n");
    let v0 = server.run(&["deploy", failing.path_str(), "--json"]).ok().json()["revision"].as_str().unwrap().to_owned();
    server.run(&["apps", "set-rev", "web", &v3]).ok();
    server.run(&["apps", "traffic", "web", &format!("{}=50", &v0[..8]), "--guard"]).ok();
    let http = testkit::Http::new();
    testkit::wait_until("the guard to end the canary's share", || {
        for _ in 0..10 {
            http.get(&crate::app_url(&server, "web", "/"), Some(&server.root_key));
        }
        let apps = server.run(&["apps", "list", "--json"]).ok().json();
        apps[0]["traffic"].as_array().unwrap().is_empty().then_some(())
    });
    // The failed canary's runner would stay until keep_alive; the Runners view below
    // is about the GPU runners.
    for runner in crate::runners(&server, "web", &[]).iter().filter(|r| r["revision"] == v0.as_str()) {
        server.run(&["runners", "stop", runner["id"].as_str().unwrap()]).ok();
    }
    testkit::wait_until("the canary's runner to stop", || {
        crate::runners(&server, "web", &[]).iter().all(|r| r["revision"] != v0.as_str()).then_some(())
    });
    server.run(&["apps", "traffic", "web", &format!("{}=10", &v1[..8])]).ok();
    let cli_revisions = revisions(&server, "web");

    let browser_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/browser");
    let mut node = std::process::Command::new("node");
    node.arg("dashboard.mjs")
        .current_dir(&browser_dir)
        .env("HANGAR_URL", &server.api_url)
        .env("HANGAR_KEY", &server.root_key)
        .env("GATEWAY_URL", &server.gateway_url)
        .env("APP", "web")
        .env("RECREATE_TO", &v1)
        .env("ROLLING_TO", &v2)
        .env("DELETE", &v3);
    if let Some(dir) = std::env::var_os("HANGAR_SCREENSHOTS") {
        node.env("SCREENSHOTS", dir);
    }
    let out = testkit::run_command(&mut node);
    assert!(out.success(), "the browser run failed:\n{}\n{}", out.stdout, out.stderr);
    let seen: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("the browser run prints JSON");

    assert!(seen["apps"].as_array().unwrap().iter().any(|a| a == "web"), "{seen}");
    let guard = seen["guard"].as_str().unwrap();
    assert!(guard.contains("for 300 s") && !guard.contains("Watching"), "the guard's settings: {guard}");
    assert!(guard.contains("Tripped") && guard.contains(&v0), "the guard's trip: {guard}");
    // The badges match what the CLI lists, and the buttons are where they belong.
    let versions = seen["versions"].as_array().unwrap();
    assert_eq!(versions.len(), cli_revisions.len());
    for (shown, listed) in versions.iter().zip(&cli_revisions) {
        assert_eq!(shown["id"], listed["id"]);
        assert_eq!(shown["status"], listed["status"]);
        assert_eq!(shown["current"], listed["current"]);
        let traffic = listed["traffic"].as_u64().unwrap();
        let want = if traffic > 0 { format!("{traffic} %") } else { String::new() };
        assert_eq!(shown["traffic"], want.as_str(), "the split is shown: {shown}");
        let notes: Vec<String> = listed["annotations"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap()))
            .collect();
        assert_eq!(shown["annotations"], serde_json::json!(notes), "the annotations are shown: {shown}");
        let current = listed["current"] == true;
        assert_eq!(shown["delete"], !current, "Delete on every non-current revision, never the current: {shown}");
        assert_eq!(shown["rollback"], !current && listed["status"] == "deployed", "{shown}");
    }

    let current = |rows: &serde_json::Value| {
        rows.as_array().unwrap().iter().find(|r| r["current"] == true).unwrap()["id"].as_str().unwrap().to_owned()
    };
    assert_eq!(current(&seen["after_rollbacks"]), v2);
    assert!(!seen["after_delete"].as_array().unwrap().iter().any(|r| r["id"] == v3.as_str()));
    assert!(!seen["runners_after"].as_array().unwrap().is_empty());
    let log = seen["runner_log"].as_str().unwrap();
    assert!(log.contains("testapp listening on") && log.contains("GET /health"), "the live log view: {log}");
    // The Runners view shows the GPU each runner holds.
    let gpus = seen["runner_gpus"].as_array().unwrap();
    assert!(!gpus.is_empty() && gpus.iter().all(|g| g == "g0" || g == "g1"), "{seen}");

    // The four charts draw lines over the calls made so far (the guard's among them), and
    // their numbers showed the calls made while the page was watched.
    let charts = seen["charts"].as_array().unwrap();
    let names: Vec<&str> = charts.iter().map(|c| c["chart"].as_str().unwrap()).collect();
    assert_eq!(names, ["calls", "latency", "runners", "queue"], "{seen}");
    for chart in charts {
        assert!(chart["lines"].as_u64().unwrap() >= 1 && chart["points"].as_u64().unwrap() >= 1, "{chart}");
        assert!(chart["segments"].as_u64().unwrap() >= 1, "a line between points: {chart}");
    }
    assert!(charts[0]["lines"].as_u64().unwrap() >= 4, "calls and 5xx of the canary and the others: {seen}");
    let numbers = &seen["chart_numbers"];
    let calls = numbers["calls"].as_object().unwrap();
    assert!(calls.iter().any(|(name, v)| name.ends_with("calls/s") && v.as_f64().unwrap() > 0.0), "{numbers}");
    assert!(calls.keys().any(|name| name.starts_with(&v0[..8])), "the canary's calls are charted: {numbers}");
    assert!(numbers["latency"]["p95 ms"].as_f64().unwrap() > 0.0, "{numbers}");
    assert!(numbers["latency"]["p50 ms"].as_f64().unwrap() > 0.0, "{numbers}");
    let runners: f64 = numbers["runners"].as_object().unwrap().values().map(|v| v.as_f64().unwrap()).sum();
    assert!(runners >= 1.0, "{numbers}");

    // The server agrees.
    let revs = revisions(&server, "web");
    assert_eq!(revs.iter().find(|r| r["current"] == true).unwrap()["id"], v2.as_str());
    assert!(!revs.iter().any(|r| r["id"] == v3.as_str()));
    let history = server.run(&["apps", "history", "web", "--json"]).ok().json();
    let entries = history.as_array().unwrap();
    assert_eq!(entries[0]["action"], "rollout");
    assert_eq!(entries[1]["action"], "delete_rev");
    assert!(entries[2]["details"].as_str().unwrap().contains(&format!("-> {v2} (rolling)")), "{}", entries[2]);
    assert!(entries[3]["details"].as_str().unwrap().contains(&format!("-> {v1} (recreate)")), "{}", entries[3]);
    let _ = v1;
    let annotated = revs.iter().find(|r| r["id"] == v2.as_str()).unwrap();
    assert_eq!(annotated["annotations"], serde_json::json!({"git": "3f2a1b", "ticket": "OPS-7"}));
}

/// The charts' history through the API: calls made to an app show as points of their
/// revision, with their 5xx, latency, the cold start and the calls that waited for it.
#[test]
fn the_dashboard_charts_show_an_apps_calls_runners_and_queue() {
    let server = server_with(&["--chart-interval", "1"]);
    // A file the runners' sandbox sees too.
    let ready = server.shared_dir().join("ready");
    std::fs::write(&ready, "").unwrap();
    let app = testapp_dir(
        "web",
        &format!(
            "env = {{ FAIL_EVERY = \"4\", SETUP_UNTIL_EXISTS = {:?} }}\n[scaling]\nmax_concurrency = 1\n",
            ready.to_str().unwrap()
        ),
    );
    let rev = server.run(&["deploy", app.path_str(), "--json"]).ok().json()["revision"].as_str().unwrap().to_owned();
    let other_team = server.run(&["teams", "create", "bravo", "--json"]).ok().json();
    let other_admin = other_team["key"]["key"].as_str().unwrap().to_owned();
    let api_key = server.run(&["keys", "create", "--scope", "api", "--json"]).ok().json();
    let api_key = api_key["key"].as_str().unwrap().to_owned();

    let rt = crate::runtime();
    let client = |key: &str| api::client::Client::new(&server.api_url, Some(key.to_owned()), None);
    let charts = || rt.block_on(client(&server.root_key).charts("web")).unwrap();
    // Another team's key finds no such app; a key that can only call apps may not look.
    let refused = rt.block_on(client(&other_admin).charts("web")).unwrap_err();
    assert_eq!((refused.status(), refused.code()), (Some(404), Some("app_not_found")), "{refused}");
    let refused = rt.block_on(client(&api_key).charts("web")).unwrap_err();
    assert_eq!((refused.status(), refused.code()), (Some(403), Some("forbidden")), "{refused}");
    assert_eq!(charts().interval_seconds, 1.0);

    // No runner is up, and the next one stays in setup until `ready` exists again: the
    // calls wait, and their runner is a cold start.
    for runner in crate::runners(&server, "web", &[]) {
        server.run(&["runners", "stop", runner["id"].as_str().unwrap()]).ok();
    }
    std::fs::remove_file(&ready).unwrap();
    testkit::wait_until("the app's runner to stop", || crate::runners(&server, "web", &[]).is_empty().then_some(()));
    testkit::wait_until("a point after the runner stopped", || {
        charts().points.last().is_some_and(|p| p.runners == Default::default()).then_some(())
    });
    let url = crate::app_url(&server, "web", "/");
    let waiting: Vec<_> = (0..8)
        .map(|_| {
            let (url, key) = (url.clone(), server.root_key.clone());
            std::thread::spawn(move || testkit::Http::new().get(&url, Some(&key)).status)
        })
        .collect();
    let queued = testkit::wait_until("a point with the calls waiting for a runner in setup", || {
        charts().points.into_iter().find(|p| p.queued == 8 && p.runners.setup == 1)
    });
    assert!(queued.revisions.is_empty() && queued.p50_ms.is_none(), "no call has been answered yet: {queued:?}");
    std::fs::write(&ready, "").unwrap();
    let mut statuses: Vec<u16> = waiting.into_iter().map(|t| t.join().unwrap()).collect();
    let http = testkit::Http::new();
    statuses.extend((0..12).map(|_| http.get(&url, Some(&server.root_key)).status));
    assert_eq!(statuses.iter().filter(|s| **s == 500).count(), 5, "every fourth call fails: {statuses:?}");

    // The points add up to the calls made, all of them the revision's.
    let seen = testkit::wait_until("the points to count every call", || {
        let seen = charts();
        let calls: f64 = seen.points.iter().flat_map(|p| &p.revisions).map(|r| r.calls_per_s).sum();
        (calls * seen.interval_seconds > 19.0).then_some(seen)
    });
    let rates: Vec<_> = seen.points.iter().flat_map(|p| &p.revisions).collect();
    assert!(rates.iter().all(|r| r.revision == rev), "{rates:?}");
    let total = |f: fn(&api::wire::RevisionRateJson) -> f64| rates.iter().map(|r| f(r)).sum::<f64>();
    assert!((total(|r| r.calls_per_s) - 20.0).abs() < 2.0, "{seen:?}");
    assert!((total(|r| r.errors_per_s) - 5.0).abs() < 1.0, "{seen:?}");
    for point in seen.points.iter().filter(|p| !p.revisions.is_empty()) {
        let (p50, p95) = (point.p50_ms.unwrap(), point.p95_ms.unwrap());
        assert!(p50 > 0.0 && p50 <= p95, "{point:?}");
    }
    assert_eq!(seen.points.iter().map(|p| p.cold_starts).sum::<u64>(), 1, "{seen:?}");
    let last = seen.points.last().unwrap();
    assert_eq!((last.runners.idle + last.runners.running, last.queued), (1, 0), "{last:?}");
    let times: Vec<i64> = seen.points.iter().map(|p| p.t).collect();
    assert!(times.windows(2).all(|w| w[0] < w[1]), "oldest first: {times:?}");
}
