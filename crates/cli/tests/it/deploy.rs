use crate::{app_with_build, artifact_count, echo_example, revisions, server};

#[test]
fn deploys_make_immutable_revisions_and_identical_code_is_stored_once() {
    let server = server();
    let app = echo_example();

    let first = server.run(&["deploy", app.path_str(), "--message", "first", "--json"]).ok();
    let first = first.json();
    assert_eq!(first["app"], "echo");
    assert_eq!(first["status"], "deployed");
    let revs = revisions(&server, "echo");
    assert_eq!(revs.len(), 1);
    assert_eq!(revs[0]["id"], first["revision"]);
    assert_eq!(revs[0]["status"], "deployed");
    assert_eq!(revs[0]["current"], true);
    assert_eq!(revs[0]["message"], "first");
    let created = revs[0]["created_at"].as_str().unwrap();
    assert!(time::OffsetDateTime::parse(created, &time::format_description::well_known::Rfc3339).is_ok(), "{created}");
    // People see the creation time and the badges too.
    let table = server.run(&["apps", "list-rev", "echo"]).ok().stdout;
    assert!(table.contains("Deployed") && table.contains("Current") && table.contains(&created[..10]), "{table}");

    app.write("server.py", &format!("{}\n# changed\n", std::fs::read_to_string(app.path().join("server.py")).unwrap()));
    let second = server.run(&["deploy", app.path_str(), "--json"]).ok().json();
    let revs = revisions(&server, "echo");
    assert_eq!(revs.len(), 2);
    assert_eq!(revs[0]["id"], second["revision"], "newest first");
    assert_eq!(revs[0]["current"], true);
    assert_eq!(revs[1]["id"], first["revision"]);
    assert_eq!(revs[1]["current"], false);
    assert_eq!(revs[1]["status"], "deployed");
    assert_eq!(artifact_count(&server), 2);

    let third = server.run(&["deploy", app.path_str(), "--json"]).ok().json();
    assert_ne!(third["revision"], second["revision"]);
    assert_eq!(revisions(&server, "echo").len(), 3);
    assert_eq!(artifact_count(&server), 2, "identical code must be stored once");

    let apps = server.run(&["apps", "list", "--json"]).ok().json();
    let echo = &apps[0];
    assert_eq!(echo["name"], "echo");
    assert_eq!(echo["team"], "default");
    assert_eq!(echo["revision"], third["revision"]);
    for field in [
        "auth",
        "runners",
        "keep_alive",
        "min_concurrency",
        "max_concurrency",
        "concurrency_buffer",
        "concurrency_buffer_perc",
        "scaling_delay",
        "request_timeout",
        "max_multiplexing",
        "startup_timeout",
        "machine_type",
        "suspended",
    ] {
        assert!(!echo[field].is_null(), "apps list --json lacks {field}: {echo}");
    }
    assert_eq!(echo["max_multiplexing"], 4, "from the example's manifest");
}

#[test]
fn rolling_deploy_starts_a_runner_first_and_recreate_switches_at_once() {
    let server = server();
    let app = app_with_build("notes", "true");
    let first = server.run(&["deploy", app.path_str(), "--strategy", "rolling", "--json"]).ok().json();
    // The rolling deploy made the revision current only once a runner of it was set up,
    // and that runner now serves.
    let apps = server.run(&["apps", "list", "--json"]).ok().json();
    assert_eq!(apps[0]["runners"], 1);
    assert_eq!(revisions(&server, "notes")[0]["runners"], 1);

    let out = server.run(&["deploy", app.path_str(), "--strategy", "recreate", "--json"]).ok();
    assert!(out.stderr.contains("recreate"), "{}", out.stderr);
    let second = out.json();
    let revs = revisions(&server, "notes");
    assert_eq!(revs[0]["id"], second["revision"]);
    assert_eq!(revs[0]["current"], true);
    assert_eq!(revs[0]["runners"], 0, "recreate starts no runner");
    assert_eq!(revs[1]["id"], first["revision"]);
    testkit::wait_until("the old revision's runner to stop", || {
        (revisions(&server, "notes")[1]["runners"] == 0).then_some(())
    });

    let history = server.run(&["apps", "history", "notes", "--json"]).ok().json();
    assert_eq!(history.as_array().unwrap().len(), 2);
    assert_eq!(history[0]["action"], "deploy");
    assert!(history[0]["details"].as_str().unwrap().contains("recreate"));
    assert!(history[1]["details"].as_str().unwrap().contains("rolling"));
    assert!(!history[0]["key_id"].as_str().unwrap().is_empty());
}

#[test]
fn failed_build_keeps_reason_and_log_and_leaves_alias_alone() {
    let server = server();
    let good = app_with_build("svc", "echo building fine");
    let first = server.run(&["deploy", good.path_str(), "--json"]).ok().json();

    let bad = app_with_build("svc", "echo compiling the model; echo 'no such module' >&2; exit 3");
    let out = server.run(&["deploy", bad.path_str()]).failed();
    assert!(out.stderr.contains("compiling the model"), "the build log is streamed: {}", out.stderr);
    assert!(out.stderr.contains("no such module"), "{}", out.stderr);
    assert!(out.stderr.contains("failed") && out.stderr.contains("exit status: 3"), "{}", out.stderr);

    let revs = revisions(&server, "svc");
    assert_eq!(revs.len(), 2);
    assert_eq!(revs[0]["status"], "failed");
    assert_eq!(revs[0]["current"], false);
    assert!(revs[0]["failure"].as_str().unwrap().contains("exit status: 3"), "{:?}", revs[0]);
    assert_eq!(revs[1]["id"], first["revision"]);
    assert_eq!(revs[1]["current"], true, "the alias stays on the good revision");
    let app = server.run(&["apps", "list", "--json"]).ok().json();
    assert_eq!(app[0]["revision"], first["revision"]);

    let history = server.run(&["apps", "history", "svc", "--json"]).ok().json();
    assert_eq!(history[0]["action"], "deploy_failed");
}

#[test]
fn build_that_runs_too_long_is_stopped_and_fails() {
    let server = crate::server_with(&["--build-timeout", "1"]);
    let app = app_with_build("slow", "sleep 30");
    let out = server.run(&["deploy", app.path_str()]).failed();
    assert!(out.stderr.contains("timed out after 1s"), "{}", out.stderr);
    let revs = revisions(&server, "slow");
    assert_eq!(revs[0]["status"], "failed");
    assert_eq!(revs[0]["failure"], "build timed out after 1s");
}

#[test]
fn detach_returns_while_deploying_and_the_deploy_finishes() {
    let server = server();
    let app = app_with_build("later", "sleep 1");
    let out = server.run(&["deploy", app.path_str(), "--detach", "--json"]).ok().json();
    assert_eq!(out["status"], "deploying");
    testkit::wait_until("the detached deploy to finish", || {
        let revs = revisions(&server, "later");
        (revs[0]["status"] == "deployed").then_some(())
    });
}

#[test]
fn app_name_flag_overrides_the_manifest_and_scaling_survives_redeploys() {
    let server = server();
    let app = crate::testapp_dir("orig", "[scaling]\nkeep_alive = 5\n[runner]\nmax_multiplexing = 2\n");
    server.run(&["deploy", app.path_str(), "--app-name", "renamed", "--auth", "public"]).ok();
    let apps = server.run(&["apps", "list", "--json"]).ok().json();
    assert_eq!(apps.as_array().unwrap().len(), 1);
    assert_eq!(apps[0]["name"], "renamed");
    assert_eq!(apps[0]["auth"], "public");
    assert_eq!(apps[0]["keep_alive"], 5);

    // A new manifest: code-specific values follow it at once; runtime-tunable ones stay
    // until --reset-scale.
    let manifest = std::fs::read_to_string(app.path().join("hangar.toml")).unwrap();
    app.write("hangar.toml", &manifest.replace("keep_alive = 5", "keep_alive = 99").replace("= 2", "= 7"));
    server.run(&["deploy", app.path_str(), "--app-name", "renamed"]).ok();
    let apps = server.run(&["apps", "list", "--json"]).ok().json();
    assert_eq!(apps[0]["keep_alive"], 5);
    assert_eq!(apps[0]["max_multiplexing"], 7);
    assert_eq!(apps[0]["auth"], "public", "auth is kept when not given");
    server.run(&["deploy", app.path_str(), "--app-name", "renamed", "--reset-scale"]).ok();
    let apps = server.run(&["apps", "list", "--json"]).ok().json();
    assert_eq!(apps[0]["keep_alive"], 99);
}

#[test]
fn ignored_files_are_not_uploaded() {
    let server = server();
    let app = app_with_build("ign", "test -f kept.txt && test ! -e secret.log && test ! -e data/big.bin");
    app.write(".gitignore", "*.log\n").write(".hangarignore", "data/\n");
    app.write("kept.txt", "yes").write("secret.log", "no").write("data/big.bin", "no");
    server.run(&["deploy", app.path_str()]).ok();
}

#[test]
fn completion_scripts_are_printed() {
    let server = server();
    for shell in ["bash", "zsh", "fish"] {
        let out = server.run(&["completion", shell]).ok();
        assert!(out.stdout.contains("hangar"), "{shell}: {}", out.stdout);
    }
    server.run(&["completion", "tcsh-nope"]).failed();
}

/// Deploys of one app take turns: their builds never overlap, every one becomes current
/// in turn, and the history lists them in order.
#[test]
fn concurrent_deploys_of_one_app_are_serialized() {
    let server = server();
    // Each build notes when it started and ended in its own code (it may write only there).
    let script = "date +%s%N > started; sleep 0.3; date +%s%N > ended";
    let apps: Vec<_> = (0..4)
        .map(|i| {
            let app = app_with_build("busy", script);
            app.write("version.txt", &i.to_string());
            app
        })
        .collect();
    let outputs: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = apps
            .iter()
            .map(|app| scope.spawn(|| server.run(&["deploy", app.path_str(), "--output", "json"]).ok().json()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let read = |dir: &std::path::Path, name: &str| -> u128 {
        std::fs::read_to_string(dir.join("app").join(name)).unwrap().trim().parse().unwrap()
    };
    let mut builds: Vec<(u128, u128)> = std::fs::read_dir(server.data_dir().join("revisions"))
        .unwrap()
        .flatten()
        .map(|rev| (read(&rev.path(), "started"), read(&rev.path(), "ended")))
        .collect();
    builds.sort();
    assert_eq!(builds.len(), 4);
    assert!(builds.windows(2).all(|w| w[0].1 <= w[1].0), "builds overlapped: {builds:?}");
    assert!(outputs.iter().all(|o| o["status"] == "deployed"));

    let revs = revisions(&server, "busy");
    assert_eq!(revs.len(), 4);
    assert_eq!(revs.iter().filter(|r| r["current"] == true).count(), 1);
    let history = server.run(&["apps", "history", "busy", "--json"]).ok().json();
    let deployed: Vec<_> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["details"].as_str().unwrap().split(' ').nth(1).unwrap().to_owned())
        .collect();
    assert_eq!(deployed.len(), 4);
    // The newest history entry is the revision that ended up current.
    assert_eq!(deployed[0], revs.iter().find(|r| r["current"] == true).unwrap()["id"].as_str().unwrap());
}

#[test]
fn a_build_log_past_its_limit_says_where_it_was_cut_and_the_build_goes_on() {
    let server = crate::server_with(&["--build-log-limit", "2000"]);
    let app = app_with_build("chatty", "yes compiling | head -c 50000; echo finished-$((40 + 2)) >&2");
    let out = server.run(&["deploy", app.path_str()]).ok();
    assert!(out.stderr.contains("compiling\ncompiling\n"), "the start of the log is kept: {}", out.stderr);
    assert!(out.stderr.contains("the build log was cut here, at its limit of 2000 bytes"), "{}", out.stderr);
    assert!(!out.stderr.contains("finished-42"), "nothing past the limit is kept: {}", out.stderr);
    assert!(out.stderr.len() < 5000, "{} bytes of log", out.stderr.len());
    assert_eq!(revisions(&server, "chatty")[0]["status"], "deployed");
}

#[test]
fn annotations_are_kept_with_the_revision_and_bad_ones_change_nothing() {
    let server = server();
    let app = crate::testapp_dir("noted", "");
    let out = server
        .run(&["deploy", app.path_str(), "--annotation", "git=3f2a1b", "--annotation", "deployed-by=ci/main", "--json"])
        .ok();
    let revision = out.json()["revision"].as_str().unwrap().to_owned();
    let listed = revisions(&server, "noted");
    assert_eq!(listed[0]["id"], revision.as_str());
    assert_eq!(listed[0]["annotations"], serde_json::json!({"git": "3f2a1b", "deployed-by": "ci/main"}));
    let table = server.run(&["apps", "list-rev", "noted"]).ok();
    assert!(table.stdout.contains("git=3f2a1b") && table.stdout.contains("ANNOTATIONS"), "{}", table.stdout);

    for (bad, why) in [
        (vec!["--annotation", "novalue"], "KEY=VALUE"),
        (vec!["--annotation", "a b=x"], "annotation key"),
        (vec!["--annotation", "k=1", "--annotation", "k=2"], "twice"),
    ] {
        let out = server.run(&[&["deploy", app.path_str()][..], &bad].concat()).failed();
        assert!(out.stderr.contains(why), "{bad:?}: {}", out.stderr);
    }
    assert_eq!(revisions(&server, "noted").len(), 1, "a refused deploy makes no revision");
}

#[test]
fn runner_secrets_limit_what_runners_get_and_an_unknown_name_is_refused() {
    let server = server();
    server.run(&["secrets", "set", "HF_TOKEN=hf_1", "DB_URL=postgres://x"]).ok();
    let app = crate::testapp_dir("picky-secrets", "[runner]\nsecrets = [\"HF_TOKEN\"]\n");
    server.run(&["deploy", app.path_str(), "--auth", "public"]).ok();
    let env = testkit::Http::new().get(&crate::app_url(&server, "picky-secrets", "/env"), None).json();
    assert_eq!(env["HF_TOKEN"], "hf_1", "{env}");
    assert!(env.get("DB_URL").is_none(), "a secret it does not name stays out: {env}");

    let unknown = crate::testapp_dir("picky-secrets", "[runner]\nsecrets = [\"HF_TOKEN\", \"NOPE\"]\n");
    let out = server.run(&["deploy", unknown.path_str()]).failed();
    assert!(out.stderr.contains("runner.secrets") && out.stderr.contains("NOPE"), "{}", out.stderr);
    assert_eq!(revisions(&server, "picky-secrets").len(), 1, "a refused deploy makes no revision");

    // Without the key, every secret of the team comes in.
    let all = crate::testapp_dir("all-secrets", "");
    server.run(&["deploy", all.path_str(), "--auth", "public"]).ok();
    let env = testkit::Http::new().get(&crate::app_url(&server, "all-secrets", "/env"), None).json();
    assert_eq!((env["HF_TOKEN"].as_str(), env["DB_URL"].as_str()), (Some("hf_1"), Some("postgres://x")), "{env}");
}
