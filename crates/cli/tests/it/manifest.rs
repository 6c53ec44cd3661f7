use testkit::AppDir;

use crate::server;

/// Each bad manifest is refused with a message naming the key and its line, and
/// nothing is created.
#[test]
fn bad_manifests_are_refused_naming_key_and_line() {
    let server = server();
    let cases: &[(&str, &str)] = &[
        ("name = \"a\"\ncommand = [\"x\"]\ncolour = \"blue\"\n", "hangar.toml:3: colour: unknown key"),
        ("name = \"a\"\ncommand = [\"x\"]\n[scaling]\nkeep_alive = \"long\"\n", "hangar.toml:4: scaling.keep_alive"),
        ("name = \"a\"\ncommand = [\"x\"]\n[scaling]\nkeep_alive = -5\n", "hangar.toml:4: scaling.keep_alive"),
        (
            "name = \"a\"\ncommand = [\"x\"]\n[scaling]\nmin_concurrency = 5\nmax_concurrency = 2\n",
            "scaling.min_concurrency",
        ),
        ("name = \"a\"\ncommand = []\n", "hangar.toml:2: command"),
        ("name = \"a\"\ncommand = [\"x\"]\n[runner]\nmax_multiplexing = 0\n", "hangar.toml:4: runner.max_multiplexing"),
        ("name = \"a\"\ncommand = [\"x\"\n", "hangar.toml:2: invalid TOML"),
    ];
    for (manifest, expected) in cases {
        let app = AppDir::new(manifest);
        let out = server.run(&["deploy", app.path_str()]).failed();
        assert!(out.stderr.contains(expected), "manifest:\n{manifest}\nexpected {expected:?} in:\n{}", out.stderr);
    }
    // Every bad key is reported in one go.
    let app = AppDir::new("name = \"a\"\ncommand = [\"x\"]\nfoo = 1\n[scaling]\nkeep_alive = -1\n[runner]\nbar = 2\n");
    let out = server.run(&["deploy", app.path_str()]).failed();
    for expected in ["hangar.toml:3: foo", "hangar.toml:5: scaling.keep_alive", "hangar.toml:7: runner.bar"] {
        assert!(out.stderr.contains(expected), "expected {expected:?} in:\n{}", out.stderr);
    }
    let apps = server.run(&["apps", "list", "--json"]).ok().json();
    assert_eq!(apps, serde_json::json!([]), "a refused manifest creates nothing");
}

/// Only the server knows its machine types, so this one is refused after upload, still
/// with the line, and still creating nothing.
#[test]
fn unknown_machine_type_is_refused_by_the_server() {
    let server = server();
    let app = AppDir::new("name = \"a\"\ncommand = [\"x\"]\n[runner]\nmachine_type = \"gpu-h100\"\n");
    let out = server.run(&["deploy", app.path_str()]).failed();
    assert!(out.stderr.contains("hangar.toml:4: runner.machine_type"), "{}", out.stderr);
    assert!(out.stderr.contains("gpu-h100"), "{}", out.stderr);
    assert_eq!(server.run(&["apps", "list", "--json"]).ok().json(), serde_json::json!([]));
    assert_eq!(crate::artifact_count(&server), 0, "the refused upload is not kept");
    assert_eq!(std::fs::read_dir(server.data_dir().join("revisions")).unwrap().count(), 0);
}

/// Machine types come from the server's config file.
#[test]
fn machine_types_come_from_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hangar.toml");
    std::fs::write(&config, "[machine_types.gpu-small]\ncapacity = 1\n").unwrap();
    let server = crate::server_with(&["--config", config.to_str().unwrap()]);
    let app = AppDir::new("name = \"g\"\ncommand = [\"x\"]\n[runner]\nmachine_type = \"gpu-small\"\n");
    server.run(&["deploy", app.path_str(), "--strategy", "recreate"]).ok();
    let cpu = AppDir::new("name = \"c\"\ncommand = [\"x\"]\n");
    server.run(&["deploy", cpu.path_str(), "--strategy", "recreate"]).ok();
}

#[test]
fn missing_name_and_missing_manifest_are_explained() {
    let server = server();
    let app = AppDir::new("command = [\"x\"]\n");
    let out = server.run(&["deploy", app.path_str()]).failed();
    assert!(out.stderr.contains("--app-name"), "{}", out.stderr);
    let empty = tempfile::tempdir().unwrap();
    let out = server.run(&["deploy", empty.path().to_str().unwrap()]).failed();
    assert!(out.stderr.contains("hangar.toml"), "{}", out.stderr);
    let out = server.run(&["deploy", app.path_str(), "--app-name", "Bad_Name"]).failed();
    assert!(out.stderr.contains("Bad_Name"), "{}", out.stderr);
}
