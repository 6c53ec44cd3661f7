//! Teams, keys and secrets: who may do what, and secrets reaching runners.

use std::collections::BTreeMap;

use api::client::Client;
use testkit::{Http, TestServer, wait_until};

use crate::{app_url, runners, runtime, server, testapp_dir};

/// A key of each kind, and the apps of team A.
struct World {
    server: TestServer,
    a_admin: String,
    a_api: String,
    b_admin: String,
    revoked: String,
}

fn world() -> World {
    let server = server();
    let team_a = server.run(&["teams", "create", "alpha", "--json"]).ok().json();
    let a_admin = team_a["key"]["key"].as_str().unwrap().to_owned();
    let team_b = server.run(&["teams", "create", "bravo", "--json"]).ok().json();
    let b_admin = team_b["key"]["key"].as_str().unwrap().to_owned();
    let as_a = |args: &[&str]| testkit::run_command(server.cli().env("HANGAR_KEY", &a_admin).args(args));
    let a_api = as_a(&["keys", "create", "--scope", "api", "--json"]).ok().json()["key"].as_str().unwrap().to_owned();
    let revoked = as_a(&["keys", "create", "--scope", "admin", "--json"]).ok().json();
    as_a(&["keys", "revoke", revoked["id"].as_str().unwrap()]).ok();
    for (name, auth) in [("priv", "private"), ("pub", "public"), ("shr", "shared")] {
        let app = testapp_dir(name, "");
        as_a(&["deploy", app.path_str(), "--auth", auth]).ok();
    }
    World { server, a_admin, a_api, b_admin, revoked: revoked["key"].as_str().unwrap().to_owned() }
}

/// Whether an operation succeeded (Some(true)), was refused with 401/403 (Some(false)),
/// or failed otherwise (None: a test bug).
fn allowed<T>(result: Result<T, api::client::ClientError>) -> Option<bool> {
    match result {
        Ok(_) => Some(true),
        Err(e) if matches!(e.status(), Some(401 | 403)) => Some(false),
        Err(e) if e.status() == Some(404) => Some(false),
        Err(e) => panic!("unexpected error: {e}"),
    }
}

/// Whether a probe got past authentication and authorization to the operation itself.
/// Probes use arguments that make an allowed operation fail harmlessly (an unknown
/// revision, a bad archive), so the matrix changes nothing it should not.
fn reached<T>(result: Result<T, api::client::ClientError>) -> Option<bool> {
    match result {
        Ok(_) => Some(true),
        Err(e) => match e.code() {
            Some("unauthorized" | "forbidden" | "app_not_found" | "team_not_found") => Some(false),
            Some(_) => Some(true),
            None => panic!("unexpected error: {e}"),
        },
    }
}

/// Whether an app listing was allowed and includes team A's private app.
fn sees_priv(listing: Result<Vec<api::wire::AppJson>, api::client::ClientError>) -> Option<bool> {
    match listing {
        Ok(apps) => Some(apps.iter().any(|a| a.name == "priv")),
        Err(e) => allowed::<()>(Err(e)),
    }
}

#[test]
fn the_access_matrix_holds() {
    let w = world();
    let rt = runtime();
    let keys: [(&str, Option<&str>); 6] = [
        ("root", Some(&w.server.root_key)),
        ("A admin", Some(&w.a_admin)),
        ("A api", Some(&w.a_api)),
        ("B admin", Some(&w.b_admin)),
        ("no key", None),
        ("revoked", Some(&w.revoked)),
    ];
    // Team A's things, seen through each key. Root acts for team A with --team.
    let client = |key: Option<&str>, root: bool| {
        Client::new(&w.server.api_url, key.map(str::to_owned), root.then(|| "alpha".to_owned()))
    };
    let http = Http::new();
    let mut table = Vec::new();
    for (who, key) in keys {
        let c = client(key, who == "root");
        let ops: Vec<(&str, Option<bool>)> = vec![
            ("apps list (sees priv)", sees_priv(rt.block_on(c.list_apps()))),
            ("list-rev priv", allowed(rt.block_on(c.list_revisions("priv")))),
            ("history priv", allowed(rt.block_on(c.history("priv")))),
            ("runners priv", allowed(rt.block_on(c.runners(Some("priv"), &Default::default())))),
            (
                "scale priv",
                allowed(rt.block_on(
                    c.scale("priv", &api::wire::ScaleRequest { keep_alive: Some(61), ..Default::default() }),
                )),
            ),
            ("keys list", allowed(rt.block_on(c.list_keys()))),
            ("secrets list", allowed(rt.block_on(c.list_secrets()))),
            (
                "secrets set",
                allowed(rt.block_on(c.set_secrets(BTreeMap::from([("PROBE".to_owned(), "x".to_owned())])))),
            ),
            ("teams list", allowed(rt.block_on(c.list_teams()))),
            (
                "deploy",
                reached(rt.block_on(c.deploy(
                    &api::wire::DeployParams { app_name: Some("priv".to_owned()), ..Default::default() },
                    b"not an archive".to_vec(),
                ))),
            ),
            (
                "set-rev priv",
                reached(rt.block_on(
                    c.set_rev("priv", &api::wire::SetRevRequest { revision: "0000".to_owned(), ..Default::default() }),
                )),
            ),
            ("delete-rev priv", reached(rt.block_on(c.delete_revision("priv", "0000")))),
            ("rollout priv", reached(rt.block_on(c.rollout("priv", false)))),
            ("resume priv", reached(rt.block_on(c.suspend("priv", false)))),
            ("runners kill", reached(rt.block_on(c.kill_runner("ffffffff")))),
            ("runner logs", reached(rt.block_on(c.runner_log("ffffffff", 0)))),
            ("runners exec", reached(rt.block_on(c.exec("ffffffff", vec!["true".to_owned()], None)))),
            ("keys create", reached(rt.block_on(c.create_key("root", None)))),
            ("keys revoke", reached(rt.block_on(c.revoke_key("nokey")))),
            ("secrets unset", reached(rt.block_on(c.unset_secret("NOPE")))),
            ("teams create", reached(rt.block_on(c.create_team("Bad Name")))),
        ];
        let call =
            |app: &str| http.get(&app_url(&w.server, app, "/").replace("/default/", "/alpha/"), key).status == 200;
        let mut row: Vec<String> =
            ops.iter().map(|(op, ok)| format!("{op}={}", ok.map_or("?".to_owned(), |b| b.to_string()))).collect();
        row.push(format!("call priv={}", call("priv")));
        row.push(format!("call pub={}", call("pub")));
        row.push(format!("call shr={}", call("shr")));
        table.push(format!("{who}: {}", row.join(" ")));
    }
    let expected = [
        "root: apps list (sees priv)=true list-rev priv=true history priv=true runners priv=true scale priv=true keys list=true secrets list=true secrets set=true teams list=true deploy=true set-rev priv=true delete-rev priv=true rollout priv=true resume priv=true runners kill=true runner logs=true runners exec=true keys create=true keys revoke=true secrets unset=true teams create=true call priv=true call pub=true call shr=true",
        "A admin: apps list (sees priv)=true list-rev priv=true history priv=true runners priv=true scale priv=true keys list=true secrets list=true secrets set=true teams list=false deploy=true set-rev priv=true delete-rev priv=true rollout priv=true resume priv=true runners kill=true runner logs=true runners exec=true keys create=true keys revoke=true secrets unset=true teams create=false call priv=true call pub=true call shr=true",
        "A api: apps list (sees priv)=false list-rev priv=false history priv=false runners priv=false scale priv=false keys list=false secrets list=false secrets set=false teams list=false deploy=false set-rev priv=false delete-rev priv=false rollout priv=false resume priv=false runners kill=false runner logs=false runners exec=false keys create=false keys revoke=false secrets unset=false teams create=false call priv=true call pub=true call shr=true",
        "B admin: apps list (sees priv)=false list-rev priv=false history priv=false runners priv=false scale priv=false keys list=true secrets list=true secrets set=true teams list=false deploy=true set-rev priv=false delete-rev priv=false rollout priv=false resume priv=false runners kill=true runner logs=true runners exec=true keys create=true keys revoke=true secrets unset=true teams create=false call priv=false call pub=true call shr=true",
        "no key: apps list (sees priv)=false list-rev priv=false history priv=false runners priv=false scale priv=false keys list=false secrets list=false secrets set=false teams list=false deploy=false set-rev priv=false delete-rev priv=false rollout priv=false resume priv=false runners kill=false runner logs=false runners exec=false keys create=false keys revoke=false secrets unset=false teams create=false call priv=false call pub=true call shr=false",
        "revoked: apps list (sees priv)=false list-rev priv=false history priv=false runners priv=false scale priv=false keys list=false secrets list=false secrets set=false teams list=false deploy=false set-rev priv=false delete-rev priv=false rollout priv=false resume priv=false runners kill=false runner logs=false runners exec=false keys create=false keys revoke=false secrets unset=false teams create=false call priv=false call pub=true call shr=false",
    ];
    assert_eq!(table, expected, "\n{}", table.join("\n"));
    // B admin "reaches" runner and key operations only within team B (the runner and
    // key it names do not exist there); team A's apps it cannot even find.
    // Team B's own secrets and keys are its own: B's PROBE did not land in A.
    let a_secrets = rt.block_on(client(Some(&w.a_admin), false).list_secrets()).unwrap();
    assert_eq!(a_secrets.len(), 1, "only A's own and root's (acting for A) write");
    let b_keys = rt.block_on(client(Some(&w.b_admin), false).list_keys()).unwrap();
    assert_eq!(b_keys.len(), 1);
    // Refused changes changed nothing: keep_alive was set only by root and A admin.
    let app = rt.block_on(client(Some(&w.a_admin), false).get_app("priv")).unwrap();
    assert_eq!(app.keep_alive, 61);
}

#[test]
fn a_revoked_key_is_refused_on_its_next_call() {
    let server = server();
    let key = server.run(&["keys", "create", "--scope", "admin", "--json"]).ok().json();
    let full = key["key"].as_str().unwrap();
    let id = key["id"].as_str().unwrap();
    let with_key = |args: &[&str]| testkit::run_command(server.cli().env("HANGAR_KEY", full).args(args));
    with_key(&["apps", "list"]).ok();
    server.run(&["keys", "revoke", id]).ok();
    let out = with_key(&["apps", "list"]).failed();
    assert!(out.stderr.contains("invalid or revoked"), "{}", out.stderr);
    let listed = server.run(&["keys", "list", "--json"]).ok().json();
    let entry = listed.as_array().unwrap().iter().find(|k| k["id"] == id).unwrap().clone();
    assert!(entry["revoked_at"].is_string());
    assert!(!listed.to_string().contains(full.split_once(':').unwrap().1), "keys list never shows a secret");
}

#[test]
fn secrets_reach_new_runners_through_a_rollout_and_never_show() {
    let server = server();
    let http = Http::new();
    let value_one = "first-value-8c1e0d";
    let value_two = "second-value-4b7f2a";
    server.run(&["secrets", "set", &format!("API_TOKEN={value_one}")]).ok();
    let app = testapp_dir("env", "[scaling]\nmin_concurrency = 1\n");
    server.run(&["deploy", app.path_str(), "--auth", "public"]).ok();
    let env = http.get(&app_url(&server, "env", "/env"), None).json();
    assert_eq!(env["API_TOKEN"], value_one);
    assert!(env.get("HANGAR_SECRET_KEY").is_none());

    let out = server.run(&["secrets", "set", "API_TOKEN", value_two]).ok();
    assert!(!out.stdout.contains(value_two));
    let env = http.get(&app_url(&server, "env", "/env"), None).json();
    assert_eq!(env["API_TOKEN"], value_one, "running runners keep the old value");

    let history = server.run(&["apps", "history", "env", "--json"]).ok();
    assert_eq!(history.json()[0]["action"], "secrets_set");
    assert!(history.stdout.contains("API_TOKEN") && !history.stdout.contains(value_two), "{}", history.stdout);
    let old = runners(&server, "env", &[])[0]["id"].as_str().unwrap().to_owned();
    server.run(&["apps", "rollout", "env"]).ok();
    wait_until("the rollout", || {
        let rs = runners(&server, "env", &[]);
        (rs.len() == 1 && rs[0]["id"] != old.as_str() && rs[0]["state"] == "idle").then_some(())
    });
    let env = http.get(&app_url(&server, "env", "/env"), None).json();
    assert_eq!(env["API_TOKEN"], value_two);

    let listed = server.run(&["secrets", "list", "--json"]).ok();
    let json = listed.json();
    assert_eq!(json[0]["name"], "API_TOKEN");
    assert!(json[0]["created_at"].is_string() && json[0]["updated_at"].is_string());
    for text in [listed.stdout.clone(), server.run(&["secrets", "list"]).ok().stdout] {
        assert!(!text.contains(value_one) && !text.contains(value_two), "{text}");
    }
    let out = server.run(&["secrets", "set", "BAD-NAME=x"]).failed();
    assert!(out.stderr.contains("BAD-NAME"), "{}", out.stderr);
    let out = server.run(&["secrets", "set", "HANGAR_APP=x"]).failed();
    assert!(out.stderr.contains("reserved"), "{}", out.stderr);
    server.run(&["secrets", "unset", "API_TOKEN"]).ok();
    server.run(&["secrets", "unset", "API_TOKEN"]).failed();

    // The values appear nowhere in the data dir (database, WAL, logs) nor in the
    // server's output.
    let mut stack = vec![server.data_dir()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                let text = String::from_utf8_lossy(&bytes);
                for value in [value_one, value_two] {
                    assert!(!text.contains(value), "{} holds a secret value", path.display());
                }
            }
        }
    }
    let output = server.output();
    assert!(!output.contains(value_one) && !output.contains(value_two), "the server printed a secret");
}

#[test]
fn teams_need_the_root_key_and_names_are_checked() {
    let server = server();
    let team = server.run(&["teams", "create", "gamma", "--json"]).ok().json();
    let key = team["key"]["key"].as_str().unwrap();
    let out = testkit::run_command(server.cli().env("HANGAR_KEY", key).args(["teams", "create", "delta"])).failed();
    assert!(out.stderr.contains("root key"), "{}", out.stderr);
    server.run(&["teams", "create", "gamma"]).failed();
    server.run(&["teams", "create", "Bad Name"]).failed();
    let teams = server.run(&["teams", "list", "--json"]).ok().json();
    let names: Vec<&str> = teams.as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["default", "gamma"]);
}

#[test]
fn a_server_whose_secret_key_cannot_open_the_stored_secrets_refuses_to_start_and_says_why() {
    let mut server = server();
    server.run(&["secrets", "set", "HF_TOKEN=sealed-value-2f9c"]).ok();
    server.stop();
    let mut other = std::process::Command::new(crate::BIN)
        .args(["server", "--api-addr", "127.0.0.1:0", "--gateway-addr", "127.0.0.1:0", "--data-dir"])
        .arg(server.data_dir())
        .args(server.database_url().map(|url| ["--database-url", url]).into_iter().flatten())
        .env("HANGAR_SECRET_KEY", "11".repeat(32))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_until("the server to refuse", || other.try_wait().unwrap());
    let out = other.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("secret HF_TOKEN cannot be opened with this server's secret key"), "{stderr}");
    assert!(stderr.contains("start the server with the secret key the secrets were stored with"), "{stderr}");
    assert!(!stderr.contains("sealed-value-2f9c"));
    // With its own key it starts, and the secret is there.
    server.restart();
    let listed = server.run(&["secrets", "list", "--json"]).ok().json();
    assert_eq!(listed[0]["name"], "HF_TOKEN", "{listed}");
}
