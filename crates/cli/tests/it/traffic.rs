//! Traffic control: calls that pin a revision, and a split of new calls between the
//! current revision and canaries, under live traffic and across a restart.

use serde_json::{Value, json};
use testkit::{Http, Prober, TestServer, wait_until};

use crate::queue::{completed, result, submit};
use crate::{app_url, assert_no_failures, revisions, runners, server, testapp_dir};

/// Deploys the test app as `name` (`V` in its environment, so each deploy is a new
/// revision); returns the revision id.
fn deploy(server: &TestServer, name: &str, v: u32, flags: &[&str]) -> String {
    let app = testapp_dir(name, &format!("env = {{ V = \"{v}\" }}\n[runner]\nmax_multiplexing = 16\n"));
    let out = server.run(&[&["deploy", app.path_str(), "--json"], flags].concat()).ok();
    out.json()["revision"].as_str().unwrap().to_owned()
}

/// A call to `app` as `root` would make it, pinned to `pin` if given: its status, and the
/// revision that answered (by its header, and by what the runner says of itself).
fn call(http: &Http, server: &TestServer, app: &str, pin: Option<&str>) -> (u16, Option<String>, Value) {
    let headers: Vec<(&str, &str)> = pin.map(|p| ("x-hangar-revision", p)).into_iter().collect();
    let reply = http.send("GET", &app_url(server, app, "/"), Some(&server.root_key), &headers, Vec::new());
    let body = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
    (reply.status, reply.header("x-hangar-revision"), body)
}

fn app_json(server: &TestServer, app: &str) -> Value {
    let apps = server.run(&["apps", "list", "--json"]).ok().json();
    apps.as_array().unwrap().iter().find(|a| a["name"] == app).unwrap().clone()
}

#[test]
fn pinned_calls_reach_their_revision_while_the_rest_reach_the_current_one() {
    let server = server();
    let v1 = deploy(&server, "pins", 1, &[]);
    let v2 = deploy(&server, "pins", 2, &[]);
    server.run(&["apps", "scale", "pins", "--keep-alive", "2"]).ok();
    let http = Http::new();
    let prober = Prober::start(&app_url(&server, "pins", "/"), Some(&server.root_key), 50);

    for _ in 0..20 {
        let (status, header, body) = call(&http, &server, "pins", Some(&v1[..8]));
        assert_eq!((status, header.as_deref(), body["revision"].as_str()), (200, Some(&*v1), Some(&*v1)), "{body}");
        let (status, header, _) = call(&http, &server, "pins", None);
        assert_eq!((status, header.as_deref()), (200, Some(&*v2)));
    }
    // The whole id, and the current revision pinned, work too.
    assert_eq!(call(&http, &server, "pins", Some(&v1)).1.as_deref(), Some(&*v1));
    assert_eq!(call(&http, &server, "pins", Some(&v2[..6])).1.as_deref(), Some(&*v2));
    let live: Vec<String> =
        runners(&server, "pins", &[]).iter().map(|r| r["revision"].as_str().unwrap().to_owned()).collect();
    assert!(live.contains(&v1) && live.contains(&v2), "each revision has its runner: {live:?}");

    // A queue submission pinned to v1 runs there; one not pinned runs on v2.
    let pinned = http.send(
        "POST",
        &format!("{}/queue/default/pins/", server.gateway_url),
        Some(&server.root_key),
        &[("content-type", "application/json"), ("x-hangar-revision", &v1[..8])],
        b"{}".to_vec(),
    );
    assert_eq!(pinned.status, 202, "{}", pinned.text());
    let pinned = pinned.json();
    let unpinned = submit(&http, &server, "pins", "/", &json!({}));
    completed(&http, &server, &pinned);
    completed(&http, &server, &unpinned);
    assert_eq!(result(&http, &server, &pinned).json()["revision"].as_str(), Some(&*v1));
    assert_eq!(result(&http, &server, &unpinned).json()["revision"].as_str(), Some(&*v2));

    let report = prober.finish();
    assert_no_failures(&report);
    // Nothing pins v1 any more: its runner goes after keep_alive, v2's stays.
    wait_until("v1's runner to stop", || {
        let live = runners(&server, "pins", &[]);
        live.iter().all(|r| r["revision"] != v1.as_str()).then_some(())
    });
}

#[test]
fn a_pin_that_names_no_deployed_revision_is_refused_clearly() {
    let server = server();
    let v1 = deploy(&server, "picky", 1, &[]);
    let broken = testapp_dir("picky", "env = { FAIL_SETUP = \"1\" }\n");
    server.run(&["deploy", broken.path_str()]).failed();
    let failed = revisions(&server, "picky").iter().find(|r| r["status"] == "failed").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let http = Http::new();
    let cases: &[(&str, u16, &str)] = &[
        ("ffffffff", 404, "revision_not_found"),
        (&failed[..8], 409, "conflict"),
        ("not-hex!", 400, "invalid_request"),
        ("", 400, "invalid_request"),
    ];
    for &(pin, status, code) in cases {
        let reply = http.send(
            "GET",
            &app_url(&server, "picky", "/"),
            Some(&server.root_key),
            &[("x-hangar-revision", pin)],
            vec![],
        );
        assert_eq!(reply.status, status, "{pin:?}: {}", reply.text());
        assert_eq!(reply.json()["error"]["code"], code, "{pin:?}: {}", reply.text());
        // The queue refuses it alike, and stores nothing.
        let queued = http.send(
            "POST",
            &format!("{}/queue/default/picky/", server.gateway_url),
            Some(&server.root_key),
            &[("x-hangar-revision", pin)],
            b"{}".to_vec(),
        );
        assert_eq!(queued.status, status, "queue {pin:?}: {}", queued.text());
    }
    // A pin needs the same key as any call of the app: without one, 401 before anything.
    let reply = http.send("GET", &app_url(&server, "picky", "/"), None, &[("x-hangar-revision", &v1[..8])], vec![]);
    assert_eq!(reply.status, 401, "{}", reply.text());
    assert_eq!(call(&http, &server, "picky", Some(&v1[..8])).0, 200);
}

#[test]
fn a_split_divides_calls_and_changing_or_ending_it_fails_none() {
    let mut server = server();
    let v1 = deploy(&server, "canary", 1, &["--auth", "public"]);
    let v2 = deploy(&server, "canary", 2, &["--auth", "public"]);
    let http = Http::new();

    // Refused splits change nothing.
    for (args, why) in [
        (vec![format!("{}=10", &v2[..8])], "the current revision"),
        (vec![format!("{}=0", &v1[..8])], "a share of 0"),
        (vec![format!("{}=100", &v1[..8])], "a share of 100"),
        (vec!["ffffffff=10".to_owned()], "an unknown revision"),
        (vec![format!("{}=60", &v1[..8]), format!("{}=50", &v1)], "the same revision twice"),
        (vec![format!("{}", &v1[..8])], "no percent"),
    ] {
        let out = server
            .run(&[&["apps", "traffic", "canary"][..], &args.iter().map(String::as_str).collect::<Vec<_>>()].concat())
            .failed();
        assert!(!out.stderr.is_empty(), "{why}");
        assert_eq!(app_json(&server, "canary")["traffic"], json!([]), "{why}");
    }

    let out = server.run(&["apps", "traffic", "canary", &format!("{}=20", &v1[..8])]).ok();
    assert!(out.stdout.contains("20%"), "{}", out.stdout);
    assert_eq!(app_json(&server, "canary")["traffic"], json!([{"revision": v1, "percent": 20}]));
    let listed = revisions(&server, "canary");
    let share = |id: &str| listed.iter().find(|r| r["id"] == id).unwrap()["traffic"].as_u64().unwrap();
    assert_eq!((share(&v1), share(&v2)), (20, 80));

    let mut on_v1 = 0;
    for _ in 0..1000 {
        let (status, revision, _) = call(&http, &server, "canary", None);
        assert_eq!(status, 200);
        on_v1 += usize::from(revision.as_deref() == Some(&*v1));
    }
    assert!((170..=230).contains(&on_v1), "{on_v1} of 1000 calls reached the canary (20 %)");

    // Queued calls follow the split too.
    let submitted: Vec<Value> = (0..10).map(|_| submit(&http, &server, "canary", "/", &json!({}))).collect();
    let queued_on: Vec<String> = submitted
        .iter()
        .map(|s| {
            completed(&http, &server, s);
            result(&http, &server, s).json()["revision"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(queued_on.iter().filter(|r| **r == v1).count(), 2, "{queued_on:?}");

    // The split survives a restart.
    server.stop();
    server.restart();
    assert_eq!(app_json(&server, "canary")["traffic"], json!([{"revision": v1, "percent": 20}]));
    let after: Vec<Option<String>> = (0..10).map(|_| call(&http, &server, "canary", None).1).collect();
    assert_eq!(after.iter().filter(|r| r.as_deref() == Some(&*v1)).count(), 2, "{after:?}");

    // Changing the split, ending it, and a set-rev (which ends it too) fail no call.
    let prober = Prober::start(&app_url(&server, "canary", "/"), None, 100);
    for pct in ["50", "5", "90"] {
        server.run(&["apps", "traffic", "canary", &format!("{}={pct}", &v1[..8])]).ok();
        wait_until("calls on both revisions", || {
            let seen: Vec<Option<String>> = (0..20).map(|_| call(&http, &server, "canary", None).1).collect();
            (seen.contains(&Some(v1.clone())) && seen.contains(&Some(v2.clone()))).then_some(())
        });
    }
    server.run(&["apps", "traffic", "canary", "--clear"]).ok();
    assert_eq!(app_json(&server, "canary")["traffic"], json!([]));
    assert!((0..50).all(|_| call(&http, &server, "canary", None).1.as_deref() == Some(&*v2)));
    server.run(&["apps", "traffic", "canary", &format!("{}=30", &v1[..8])]).ok();
    server.run(&["apps", "set-rev", "canary", &v1[..8]]).ok();
    assert_eq!(app_json(&server, "canary")["traffic"], json!([]), "a set-rev ends the split");
    assert!((0..50).all(|_| call(&http, &server, "canary", None).1.as_deref() == Some(&*v1)));
    let report = prober.finish();
    assert_no_failures(&report);
    assert!(report.ok >= 20, "{report:?}");

    let history = server.run(&["apps", "history", "canary", "--json"]).ok().json();
    let actions: Vec<&str> = history.as_array().unwrap().iter().map(|h| h["action"].as_str().unwrap()).collect();
    assert_eq!(actions.iter().filter(|a| **a == "traffic").count(), 6, "{actions:?}");
    // A revision with a share cannot be deleted.
    server.run(&["apps", "traffic", "canary", &format!("{}=10", &v2[..8])]).ok();
    let out = server.run(&["apps", "delete-rev", "canary", &v2[..8]]).failed();
    assert!(out.stderr.contains("--clear"), "{}", out.stderr);
}

fn current(server: &TestServer, app: &str) -> String {
    app_json(server, app)["revision"].as_str().unwrap().to_owned()
}

fn history_of(server: &TestServer, app: &str) -> Vec<(String, String)> {
    let history = server.run(&["apps", "history", app, "--json"]).ok().json();
    history
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (h["action"].as_str().unwrap().to_owned(), h["details"].as_str().unwrap().to_owned()))
        .collect()
}

/// Deploys a test app whose every second call answers 500.
fn deploy_failing(server: &TestServer, name: &str, v: u32, flags: &[&str]) -> String {
    let app = testapp_dir(name, &format!("env = {{ V = \"{v}\", FAIL_EVERY = \"2\" }}\n"));
    let out = server.run(&[&["deploy", app.path_str(), "--json"], flags].concat()).ok();
    out.json()["revision"].as_str().unwrap().to_owned()
}

#[test]
fn a_revision_that_fails_half_its_calls_trips_the_guard_and_the_alias_goes_back() {
    let server = server();
    let v1 = deploy(&server, "guarded", 1, &["--auth", "public"]);
    let http = Http::new();
    for _ in 0..50 {
        assert_eq!(call(&http, &server, "guarded", None).0, 200);
    }
    server.run(&["apps", "guard", "guarded", "--window", "120"]).ok();
    for bad in [&["--window", "0"][..], &["--max-p95-ratio", "50"], &["--max-error-increase", "101"]] {
        let out = server.run(&[&["apps", "guard", "guarded"][..], bad].concat()).failed();
        assert!(out.stderr.contains(&bad[0][2..].replace('-', "_")), "{bad:?}: {}", out.stderr);
    }
    let guard = &app_json(&server, "guarded")["guard"];
    assert_eq!(
        (guard["window"].as_u64(), guard["max_p95_ratio"].as_u64()),
        (Some(120), Some(200)),
        "unchanged: {guard}"
    );
    let v2 = deploy_failing(&server, "guarded", 2, &["--guard"]);
    assert_eq!(current(&server, "guarded"), v2);
    let guard = &app_json(&server, "guarded")["guard"];
    assert_eq!((guard["watching"].as_str(), guard["previous"].as_str()), (Some(&*v2), Some(&*v1)), "{guard}");

    let prober = Prober::start(&app_url(&server, "guarded", "/"), None, 50);
    wait_until("the guard to set the alias back", || (current(&server, "guarded") == v1).then_some(()));
    let report = prober.finish();
    assert!(report.failures.iter().all(|(status, _)| *status == 500), "only the bad revision's own 500s: {report:?}");
    assert_eq!(app_json(&server, "guarded")["guard"]["watching"], Value::Null);
    let history = history_of(&server, "guarded");
    let tripped = history.iter().find(|(a, _)| a == "guard_tripped").expect("the trip is recorded");
    assert!(tripped.1.contains(&v2) && tripped.1.contains("5xx") && tripped.1.contains(&v1), "{tripped:?}");
    assert!(history.iter().any(|(a, d)| a == "set_rev" && d.contains("by the guard")), "{history:?}");
    let shown = server.run(&["apps", "history", "guarded"]).ok();
    assert!(shown.stdout.contains("guard_tripped"), "{}", shown.stdout);
    // Calls reach v1 again.
    wait_until("calls on v1", || (call(&http, &server, "guarded", None).1.as_deref() == Some(&*v1)).then_some(()));
}

#[test]
fn a_healthy_revision_never_trips_the_guard_and_a_watch_survives_a_restart() {
    let mut server = server();
    deploy(&server, "steady", 1, &["--auth", "public"]);
    let http = Http::new();
    for _ in 0..50 {
        assert_eq!(call(&http, &server, "steady", None).0, 200);
    }
    // Every switch is guarded now, for 4 s.
    server.run(&["apps", "guard", "steady", "--on", "--window", "4"]).ok();
    let v2 = deploy(&server, "steady", 2, &[]);
    assert_eq!(app_json(&server, "steady")["guard"]["watching"].as_str(), Some(&*v2));
    let prober = Prober::start(&app_url(&server, "steady", "/"), None, 50);
    wait_until("the window to pass", || app_json(&server, "steady")["guard"]["watching"].is_null().then_some(()));
    let report = prober.finish();
    assert_no_failures(&report);
    assert_eq!(current(&server, "steady"), v2, "a healthy revision stays");
    assert!(history_of(&server, "steady").iter().any(|(a, d)| a == "guard_passed" && d.contains(&v2)));
    assert!(!history_of(&server, "steady").iter().any(|(a, _)| a == "guard_tripped"));

    // A watch with no calls yet goes on after a restart, and trips then.
    server.run(&["apps", "guard", "steady", "--window", "600"]).ok();
    let v3 = deploy_failing(&server, "steady", 3, &[]);
    assert_eq!(app_json(&server, "steady")["guard"]["watching"].as_str(), Some(&*v3));
    server.stop();
    server.restart();
    let guard = &app_json(&server, "steady")["guard"];
    assert_eq!((guard["watching"].as_str(), guard["previous"].as_str()), (Some(&*v3), Some(&*v2)), "{guard}");
    let prober = Prober::start(&app_url(&server, "steady", "/"), None, 50);
    wait_until("the guard to set the alias back", || (current(&server, "steady") == v2).then_some(()));
    prober.finish();
}

#[test]
fn a_guarded_canary_that_fails_loses_its_share_and_the_current_revision_keeps_serving() {
    let server = server();
    let v1 = deploy_failing(&server, "trial", 1, &["--auth", "public"]);
    let v2 = deploy(&server, "trial", 2, &[]);
    let out = server.run(&["apps", "traffic", "trial", &format!("{}=50", &v1[..8]), "--guard"]).ok();
    assert!(out.stdout.contains("50%"), "{}", out.stdout);
    let guard = &app_json(&server, "trial")["guard"];
    assert_eq!((guard["watching"].as_str(), guard["previous"].as_str()), (Some(&*v1), None), "{guard}");
    let refused = server
        .run(&["apps", "traffic", "trial", &format!("{}=10", &v1[..8]), &format!("{}=10", &v2[..8]), "--guard"])
        .failed();
    assert!(refused.stderr.contains("one canary"), "{}", refused.stderr);

    let prober = Prober::start(&app_url(&server, "trial", "/"), None, 50);
    wait_until("the canary's share to end", || {
        app_json(&server, "trial")["traffic"].as_array().unwrap().is_empty().then_some(())
    });
    prober.finish();
    assert_eq!(current(&server, "trial"), v2);
    assert_eq!(app_json(&server, "trial")["guard"]["watching"], Value::Null);
    let history = history_of(&server, "trial");
    assert!(
        history.iter().any(|(a, d)| a == "guard_tripped" && d.contains("canary") && d.contains(&v1)),
        "{history:?}"
    );
    let http = Http::new();
    assert!((0..20).all(|_| call(&http, &server, "trial", None).1.as_deref() == Some(&*v2)));
}
