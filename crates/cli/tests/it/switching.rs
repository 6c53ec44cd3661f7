//! Switching revisions, rollouts and suspend, under live traffic.

use testkit::{Http, Prober, wait_until};

use crate::{app_url, app_with_build, assert_no_failures, revisions, runners, server, testapp_dir};

/// Deploys the test app as `name` with `extra` manifest lines; returns the revision id.
fn deploy(server: &testkit::TestServer, name: &str, extra: &str, flags: &[&str]) -> String {
    let app = testapp_dir(name, extra);
    let out = server.run(&[&["deploy", app.path_str(), "--auth", "public", "--json"], flags].concat()).ok();
    out.json()["revision"].as_str().unwrap().to_owned()
}

fn current(server: &testkit::TestServer, app: &str) -> String {
    let revs = revisions(server, app);
    revs.iter().find(|r| r["current"] == true).expect("a current revision")["id"].as_str().unwrap().to_owned()
}

#[test]
fn no_call_fails_through_deploys_set_revs_and_scale_down() {
    no_call_fails_through_deploys_set_revs_and_scale_down_on(&server());
}

/// The test itself, on `server` (local runners above; Slurm jobs in `slurm`).
pub(crate) fn no_call_fails_through_deploys_set_revs_and_scale_down_on(server: &testkit::TestServer) {
    let v1 = deploy(server, "live", "env = { V = \"1\" }\n[runner]\nmax_multiplexing = 8\n", &[]);
    let prober = Prober::start(&app_url(server, "live", "/"), None, 200);

    let v2 =
        deploy(server, "live", "env = { V = \"2\" }\n[runner]\nmax_multiplexing = 8\n", &["--strategy", "rolling"]);
    assert_eq!(current(server, "live"), v2);
    for i in 0..10 {
        let target = if i % 2 == 0 { &v1 } else { &v2 };
        server.run(&["apps", "set-rev", "live", &target[..8]]).ok();
        assert_eq!(&current(server, "live"), target);
    }
    server.run(&["apps", "set-rev", "live", &v1, "--strategy", "recreate"]).ok();
    assert_eq!(current(server, "live"), v1);
    server.run(&["apps", "scale", "live", "--min-concurrency", "3"]).ok();
    // At least three: the switches' calls may have scaled it up further (a Slurm job
    // takes a second to start, and calls wait meanwhile).
    wait_until("three runners", || (runners(server, "live", &[]).len() >= 3).then_some(()));
    server.run(&["apps", "scale", "live", "--min-concurrency", "1", "--keep-alive", "1"]).ok();
    // Calls pack onto the fewest runners they fit, so the spare ones go idle and stop even
    // while the prober runs. How many the calls need depends on how loaded the machine
    // is; on a quiet one, one runner takes them all.
    wait_until("the scale-down", || (runners(server, "live", &[]).len() < 3).then_some(()));

    let report = prober.finish();
    assert_no_failures(&report);
    assert!(report.ok > 200, "{report:?}");
    let history = server.run(&["apps", "history", "live", "--json"]).ok().json();
    let actions: Vec<&str> = history.as_array().unwrap().iter().map(|h| h["action"].as_str().unwrap()).collect();
    assert_eq!(actions.iter().filter(|a| **a == "set_rev").count(), 11, "{actions:?}");
}

#[test]
fn graceful_rollout_replaces_every_runner_without_losing_capacity_or_calls() {
    graceful_rollout_replaces_every_runner_without_losing_capacity_or_calls_on(&server());
}

/// The test itself, on `server` (local runners above; Slurm jobs in `slurm`).
pub(crate) fn graceful_rollout_replaces_every_runner_without_losing_capacity_or_calls_on(server: &testkit::TestServer) {
    // Replacements take a moment to set up, so that a rollout that let the old runners go
    // before their replacements were ready would show here.
    let revision = deploy(
        server,
        "roll",
        "env = { SETUP_SECONDS = \"0.6\" }\n[scaling]\nmin_concurrency = 2\n[runner]\nmax_multiplexing = 16\n",
        &[],
    );
    let before = wait_until("two set-up runners", || {
        let rs = runners(server, "roll", &[]);
        (rs.iter().filter(|r| r["state"] == "idle" || r["state"] == "running").count() == 2).then_some(rs)
    });
    let old: Vec<String> = before.iter().map(|r| r["id"].as_str().unwrap().to_owned()).collect();
    // 200 calls a second of 50 ms each: about ten in flight at any moment.
    let prober = Prober::start(&app_url(server, "roll", "/?delay_ms=50"), None, 200);
    wait_until("calls in flight", || runners(server, "roll", &[]).iter().any(|r| r["in_flight"] != 0).then_some(()));

    let out = server.run(&["apps", "rollout", "roll", "--json"]).ok().json();
    assert_eq!(out["runners"].as_array().unwrap().len(), 2);
    let mut fewest = usize::MAX;
    let mut marked = false;
    let after = wait_until("every runner replaced", || {
        let rs = runners(server, "roll", &[]);
        let set_up = rs.iter().filter(|r| r["state"] == "idle" || r["state"] == "running").count();
        fewest = fewest.min(set_up);
        marked |= rs.iter().any(|r| r["replacing"] == true);
        let fresh = rs.iter().all(|r| !old.iter().any(|o| r["id"] == o.as_str()));
        (fresh && set_up == 2).then_some(rs)
    });
    let report = prober.finish();
    assert!(fewest >= 2, "set-up runners dipped to {fewest} during the rollout");
    assert!(marked, "runners being replaced were marked");
    assert!(report.failures.is_empty(), "calls failed: {:?}", report.failures);
    assert!(report.ok > 20, "{report:?}");
    assert!(after.iter().all(|r| r["revision"] == revision.as_str()), "the revision did not change");
    assert_eq!(current(server, "roll"), revision);
    let history = server.run(&["apps", "history", "roll", "--json"]).ok().json();
    assert_eq!(history[0]["action"], "rollout");
}

#[test]
fn forced_rollout_cuts_calls_in_flight_with_a_clear_error_and_then_serves() {
    forced_rollout_cuts_calls_in_flight_with_a_clear_error_and_then_serves_on(&server());
}

/// The test itself, on `server` (local runners above; Slurm jobs in `slurm`).
pub(crate) fn forced_rollout_cuts_calls_in_flight_with_a_clear_error_and_then_serves_on(server: &testkit::TestServer) {
    deploy(server, "hard", "[scaling]\nmin_concurrency = 1\n[runner]\nmax_multiplexing = 4\n", &[]);
    let old = runners(server, "hard", &[])[0]["id"].as_str().unwrap().to_owned();
    let url = app_url(server, "hard", "/?delay_ms=5000");
    std::thread::scope(|scope| {
        let calls: Vec<_> = (0..3).map(|_| scope.spawn(|| Http::new().get(&url, None))).collect();
        wait_until("three calls in flight", || {
            runners(server, "hard", &[]).iter().any(|r| r["in_flight"] == 3).then_some(())
        });
        server.run(&["apps", "rollout", "hard", "--force"]).ok();
        for call in calls {
            let reply = call.join().unwrap();
            assert_eq!(reply.status, 503, "{}", reply.text());
            assert_eq!(reply.json()["error"]["code"], "rollout_forced", "{}", reply.text());
        }
    });
    let reply = Http::new().get(&app_url(server, "hard", "/"), None);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_ne!(reply.header("x-hangar-runner-id").unwrap(), old);
}

#[test]
fn set_rev_refuses_what_cannot_become_current_and_changes_nothing() {
    let server = server();
    let good = deploy(&server, "picky", "", &[]);
    let failed_app = app_with_build("picky", "exit 1");
    server.run(&["deploy", failed_app.path_str()]).failed();
    let failed = revisions(&server, "picky")[0]["id"].as_str().unwrap().to_owned();
    let slow = app_with_build("picky", "sleep 30");
    let deploying = server.run(&["deploy", slow.path_str(), "--detach", "--json"]).ok().json();
    let deploying = deploying["revision"].as_str().unwrap().to_owned();
    let history_before = server.run(&["apps", "history", "picky", "--json"]).ok().json();

    for (revision, expected) in [
        (failed.as_str(), "only a Deployed revision"),
        (deploying.as_str(), "is deploying"),
        (good.as_str(), "already the current revision"),
        ("0000000", "no revision matching"),
    ] {
        let out = server.run(&["apps", "set-rev", "picky", revision]).failed();
        assert!(out.stderr.contains(expected), "{revision}: {}", out.stderr);
    }
    assert_eq!(current(&server, "picky"), good);
    assert_eq!(server.run(&["apps", "history", "picky", "--json"]).ok().json(), history_before);
}

#[test]
fn rolling_set_rev_to_a_revision_that_no_longer_comes_up_leaves_the_alias() {
    let server = server();
    let flag_path = server.shared_dir().join("broken");
    let old = deploy(
        &server,
        "fickle",
        &format!("env = {{ FAIL_SETUP_IF_EXISTS = {:?} }}\n", flag_path.to_str().unwrap()),
        &[],
    );
    let new = deploy(&server, "fickle", "", &[]);
    std::fs::write(&flag_path, "x").unwrap();
    let out = server.run(&["apps", "set-rev", "fickle", &old]).failed();
    assert!(out.stderr.contains("did not come up") && out.stderr.contains("exit status: 3"), "{}", out.stderr);
    assert_eq!(current(&server, "fickle"), new);
    assert_eq!(revisions(&server, "fickle")[1]["status"], "deployed", "it was healthy once: still Deployed");
    assert_eq!(Http::new().get(&app_url(&server, "fickle", "/"), None).status, 200);
}

#[test]
fn set_rev_keeps_runtime_values_and_takes_code_specific_ones_from_the_target() {
    let server = server();
    let v1 = deploy(&server, "params", "[runner]\nmax_multiplexing = 2\nstartup_timeout = 30\n", &[]);
    deploy(&server, "params", "[runner]\nmax_multiplexing = 5\nstartup_timeout = 40\n", &[]);
    server
        .run(&["apps", "scale", "params", "--keep-alive", "77", "--min-concurrency", "1", "--max-concurrency", "7"])
        .ok();
    server.run(&["apps", "set-rev", "params", &v1]).ok();
    let app = &server.run(&["apps", "list", "--json"]).ok().json()[0];
    assert_eq!(app["revision"], v1.as_str());
    assert_eq!(app["keep_alive"], 77);
    assert_eq!(app["min_concurrency"], 1);
    assert_eq!(app["max_concurrency"], 7);
    assert_eq!(app["max_multiplexing"], 2);
    assert_eq!(app["startup_timeout"], 30);
    assert_eq!(app["machine_type"], "cpu");
}

#[test]
fn concurrent_operations_on_one_app_leave_it_consistent() {
    let server = server();
    let v1 = deploy(&server, "busy", "[scaling]\nmin_concurrency = 1\n", &[]);
    let v2 = deploy(&server, "busy", "[scaling]\nmin_concurrency = 1\n", &[]);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for i in 0..6 {
                let target = if i % 2 == 0 { &v1 } else { &v2 };
                let _ = server.run(&["apps", "set-rev", "busy", target]);
            }
        });
        scope.spawn(|| {
            for _ in 0..4 {
                server.run(&["apps", "rollout", "busy"]).ok();
            }
        });
        scope.spawn(|| {
            for _ in 0..2 {
                let app = testapp_dir("busy", "[scaling]\nmin_concurrency = 1\n");
                server.run(&["deploy", app.path_str()]).ok();
            }
        });
    });
    let revs = revisions(&server, "busy");
    let current: Vec<_> = revs.iter().filter(|r| r["current"] == true).collect();
    assert_eq!(current.len(), 1);
    assert_eq!(current[0]["status"], "deployed");
    let history = server.run(&["apps", "history", "busy", "--json"]).ok().json();
    let times: Vec<&str> = history.as_array().unwrap().iter().map(|h| h["at"].as_str().unwrap()).collect();
    let mut sorted = times.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(times, sorted, "history is newest first");
    let last_switch =
        history.as_array().unwrap().iter().find(|h| h["action"] == "set_rev" || h["action"] == "deploy").unwrap();
    assert!(last_switch["details"].as_str().unwrap().contains(current[0]["id"].as_str().unwrap()), "{last_switch}");
    wait_until("the app to serve from its current revision", || {
        let reply = Http::new().get(&app_url(&server, "busy", "/"), None);
        (reply.status == 200 && reply.header("x-hangar-revision").as_deref() == current[0]["id"].as_str()).then_some(())
    });
}

#[test]
fn a_suspended_app_runs_nothing_and_answers_503_until_resumed() {
    let server = server();
    let revision = deploy(&server, "nap", "[scaling]\nmin_concurrency = 2\n", &[]);
    wait_until("two runners", || (runners(&server, "nap", &[]).len() == 2).then_some(()));
    server.run(&["apps", "suspend", "nap"]).ok();
    wait_until("no runner", || runners(&server, "nap", &[]).is_empty().then_some(()));
    let reply = Http::new().get(&app_url(&server, "nap", "/"), None);
    assert_eq!(reply.status, 503);
    assert_eq!(reply.json()["error"]["code"], "suspended");
    assert_eq!(revisions(&server, "nap")[0]["status"], "suspended");
    assert_eq!(server.run(&["apps", "list", "--json"]).ok().json()[0]["suspended"], true);
    server.run(&["apps", "suspend", "nap"]).failed();

    server.run(&["apps", "resume", "nap"]).ok();
    assert_eq!(revisions(&server, "nap")[0]["status"], "deployed");
    let reply = Http::new().get(&app_url(&server, "nap", "/"), None);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("x-hangar-revision").unwrap(), revision);
    let history = server.run(&["apps", "history", "nap", "--json"]).ok().json();
    assert_eq!(history[0]["action"], "resume");
    assert_eq!(history[1]["action"], "suspend");
}

#[test]
fn a_set_rev_whose_client_gave_up_is_seen_through_and_its_revision_cannot_be_deleted_meanwhile() {
    let mut server = server();
    // Revision A takes a while to set up; B is current.
    let a = deploy(&server, "flip", "env = { SETUP_SECONDS = \"2\" }\n[scaling]\nmin_concurrency = 1\n", &[]);
    let b = deploy(&server, "flip", "[scaling]\nmin_concurrency = 1\n", &[]);
    assert_eq!(current(&server, "flip"), b);

    // A rolling set-rev to A, whose client goes away (Ctrl-C) while A's runner sets up.
    let mut client =
        server.cli().args(["apps", "set-rev", "flip", &a]).stdout(std::process::Stdio::null()).spawn().unwrap();
    wait_until("a runner of A setting up", || {
        runners(&server, "flip", &[]).iter().any(|r| r["revision"] == a.as_str()).then_some(())
    });
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(client.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let _ = client.wait();

    // The switch goes on; deleting its revision waits for it, and then A is current.
    let deleted = server.run(&["apps", "delete-rev", "flip", &a]);
    assert!(!deleted.success(), "the revision being switched to was deleted: {}", deleted.stdout);
    assert_eq!(current(&server, "flip"), a);
    let history = server.run(&["apps", "history", "flip", "--json"]).ok().json();
    assert_eq!(history[0]["action"], "set_rev", "{history}");

    // The alias is at a revision that exists: the server starts again and serves.
    server.kill();
    server.restart();
    let reply = Http::new().get(&app_url(&server, "flip", "/"), Some(&server.root_key));
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("x-hangar-revision").as_deref(), Some(a.as_str()));
}
