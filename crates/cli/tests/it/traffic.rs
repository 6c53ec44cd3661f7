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
