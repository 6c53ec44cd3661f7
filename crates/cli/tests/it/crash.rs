//! A server that stops in the middle of a deploy, by crash or by request.

use std::path::Path;

use testkit::{TestServer, wait_until};

use crate::{app_with_build, revisions, server};

/// Pids of processes whose working directory is inside `dir`.
fn processes_in(dir: &Path) -> Vec<u32> {
    let dir = dir.canonicalize().unwrap();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(&dir)))
        .collect()
}

/// Starts a deploy whose build runs for a long time and waits until it is building.
fn start_long_deploy(server: &TestServer) -> String {
    let app = app_with_build("crashy", "sleep 120");
    let out = server.run(&["deploy", app.path_str(), "--detach", "--json"]).ok().json();
    let revision = out["revision"].as_str().unwrap().to_owned();
    wait_until("the build to be running", || (!processes_in(&server.data_dir()).is_empty()).then_some(()));
    assert_eq!(revisions(server, "crashy")[0]["status"], "deploying");
    revision
}

#[test]
fn sigkill_mid_deploy_leaves_no_revision_deploying_and_no_process_behind() {
    let mut server = server();
    let revision = start_long_deploy(&server);

    server.kill();
    server.restart();

    let revs = revisions(&server, "crashy");
    assert_eq!(revs.len(), 1);
    assert_eq!(revs[0]["id"], revision.as_str());
    assert_eq!(revs[0]["status"], "failed");
    assert_eq!(revs[0]["failure"], "interrupted");
    assert_eq!(revs[0]["current"], false);
    wait_until("the orphaned build to be ended", || processes_in(&server.data_dir()).is_empty().then_some(()));

    // The store is sound: the app takes a new deploy.
    let app = app_with_build("crashy", "true");
    server.run(&["deploy", app.path_str()]).ok();
    assert_eq!(revisions(&server, "crashy")[0]["status"], "deployed");
}

#[test]
fn sigterm_mid_deploy_stops_the_build_and_exits_cleanly() {
    let mut server = server();
    start_long_deploy(&server);

    let status = server.stop();
    assert!(status.success(), "graceful shutdown exits 0, got {status}");
    assert!(processes_in(&server.data_dir()).is_empty(), "the build was stopped with the server");

    server.restart();
    let revs = revisions(&server, "crashy");
    assert_eq!(revs[0]["status"], "failed");
    assert_eq!(revs[0]["failure"], "interrupted");
}

#[test]
fn a_process_started_for_a_revision_just_before_a_crash_is_ended_without_its_pid_file() {
    // A server killed between starting a runner and writing its pid file leaves a
    // process no pid file names; the restart finds it by the revision in its
    // environment. Made here by hand: a process of a real revision, with no pid file,
    // that has left the data dir.
    let mut server = server();
    let app = crate::testapp_dir("strays", "");
    let revision =
        server.run(&["deploy", app.path_str(), "--json"]).ok().json()["revision"].as_str().unwrap().to_owned();
    let mut stray = std::process::Command::new("sleep")
        .arg("600")
        .current_dir("/")
        .env("HANGAR_REVISION", &revision)
        .spawn()
        .unwrap();
    let mut bystander = std::process::Command::new("sleep")
        .arg("600")
        .env("HANGAR_REVISION", "a-revision-of-another-server")
        .spawn()
        .unwrap();

    server.kill();
    server.restart();
    let ended = wait_until("the stray to be ended", || stray.try_wait().unwrap());
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&ended), Some(9));
    assert!(bystander.try_wait().unwrap().is_none(), "a process of another server was touched");
    bystander.kill().unwrap();
    bystander.wait().unwrap();
    assert!(server.output().contains("ending a process left behind"), "{}", server.output());
}

#[test]
fn a_few_crash_trials_come_back_clean() {
    // The crash trials (`reliability/run.sh crash`) run 50; a few here keep them honest
    // between runs. The program is built with the workspace's binaries.
    let trials = std::path::Path::new(crate::BIN).with_file_name("hangar-crash-trials");
    assert!(trials.exists(), "{} is missing: build the workspace's binaries", trials.display());
    let out = testkit::run_command(std::process::Command::new(&trials).args([
        "--hangar",
        crate::BIN,
        "--trials",
        "3",
        "--seed",
        "1",
    ]));
    assert!(out.success(), "{}\n{}", out.stdout, out.stderr);
    assert!(out.stdout.contains("3 of 3 trials clean"), "{}", out.stdout);
}

#[test]
fn a_server_that_cannot_load_one_app_serves_the_others_and_says_which() {
    let mut server = crate::server();
    for name in ["healthy", "broken"] {
        server.run(&["deploy", crate::testapp_dir(name, "").path_str(), "--auth", "public"]).ok();
    }
    // While the server is down, the broken app's revision is damaged on disk.
    server.kill();
    let changed = server.execute_in_store(
        "UPDATE revisions SET manifest = 'not [valid toml' WHERE app_id = (SELECT id FROM apps WHERE name = 'broken')",
    );
    assert_eq!(changed, 1);
    server.restart();

    let http = testkit::Http::new();
    assert_eq!(http.get(&crate::app_url(&server, "healthy", "/"), None).status, 200);
    let apps = server.run(&["apps", "list", "--json"]).ok().json();
    let problem = |name: &str| apps.as_array().unwrap().iter().find(|a| a["name"] == name).unwrap()["problem"].clone();
    assert!(problem("broken").as_str().is_some_and(|p| p.contains("unreadable manifest")), "{apps}");
    assert!(problem("healthy").is_null(), "{apps}");
    let health = http.get(&format!("{}/healthz", server.api_url), None).json();
    assert!(health["warning"].as_str().is_some_and(|w| w.contains("1 app could not be loaded")), "{health}");
    assert!(server.output().contains("cannot load an app"), "the log says so");
}
