use std::os::unix::fs::PermissionsExt;

use api::wire::DeployParams;

use crate::{app_with_build, runtime, server};

#[test]
fn admin_key_is_private_to_its_owner() {
    let server = server();
    let mode = std::fs::metadata(server.data_dir().join("admin.key")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // Only a hash is stored: the secret does not appear in the database.
    let secret = server.root_key.split_once(':').unwrap().1;
    for file in ["hangar.db", "hangar.db-wal"] {
        let bytes = std::fs::read(server.data_dir().join(file)).unwrap_or_default();
        assert!(!String::from_utf8_lossy(&bytes).contains(secret), "{file} holds the secret");
    }
}

#[test]
fn missing_or_wrong_keys_get_401_and_change_nothing() {
    let server = server();
    let app = app_with_build("locked", "true");
    let (id, _) = server.root_key.split_once(':').unwrap();
    let wrong = format!("{id}:{}", "0".repeat(64));

    for key in [None, Some(wrong.as_str()), Some("garbage"), Some("nobody:secret")] {
        let client = server.client_with(key);
        let rt = runtime();
        let err = rt.block_on(client.list_apps()).expect_err("must be refused");
        assert_eq!(err.status(), Some(401), "{key:?}: {err}");
        assert_eq!(err.code(), Some("unauthorized"));
        let packed = archive::pack(app.path()).unwrap();
        let err = rt.block_on(client.deploy(&DeployParams::default(), packed.bytes)).expect_err("must be refused");
        assert_eq!(err.status(), Some(401), "{key:?}: {err}");

        let mut cli = server.cli();
        match key {
            Some(k) => cli.env("HANGAR_KEY", k),
            None => cli.env_remove("HANGAR_KEY"),
        };
        let out = testkit::run_command(cli.args(["deploy", app.path_str()])).failed();
        assert!(out.stderr.contains("API key"), "{}", out.stderr);
    }
    assert_eq!(server.run(&["apps", "list", "--json"]).ok().json(), serde_json::json!([]));
    assert_eq!(crate::artifact_count(&server), 0);
}

#[test]
fn bearer_header_works_too() {
    let server = server();
    let url = format!("{}/v1/apps", server.api_url);
    let status = runtime().block_on(async {
        reqwest::Client::new().get(&url).bearer_auth(&server.root_key).send().await.unwrap().status().as_u16()
    });
    assert_eq!(status, 200);
}

#[test]
fn healthz_needs_no_key_and_errors_are_json() {
    let server = server();
    let rt = runtime();
    assert_eq!(rt.block_on(server.client_with(None).health()).unwrap().status, "ok");
    let err = rt.block_on(server.client().get_app("missing")).unwrap_err();
    assert_eq!(err.status(), Some(404));
    assert_eq!(err.code(), Some("app_not_found"));
    let err = rt.block_on(server.client_with(None).get_app("missing")).unwrap_err();
    assert_eq!(err.status(), Some(401), "auth is checked before anything else");
}

#[test]
fn team_flag_selects_the_team_for_root_keys() {
    let server = server();
    server.run(&["apps", "list", "--team", "default"]).ok();
    let out = server.run(&["apps", "list", "--team", "nope"]).failed();
    assert!(out.stderr.contains("team \"nope\" does not exist"), "{}", out.stderr);
}

#[test]
fn unreachable_server_is_explained() {
    let server = server();
    let out =
        testkit::run_command(server.cli().env("HANGAR_URL", "http://127.0.0.1:9").args(["apps", "list"])).failed();
    assert!(out.stderr.contains("cannot reach the hangar server") && out.stderr.contains("hint:"), "{}", out.stderr);
}
