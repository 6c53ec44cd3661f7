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
    let server = server_with(&["--gpus", "g0,g1", "--config", config_file.to_str().unwrap()]);
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
