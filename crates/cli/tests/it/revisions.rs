use crate::{app_with_build, artifact_count, revisions, server};

#[test]
fn current_revision_cannot_be_deleted_and_others_free_their_files() {
    let server = server();
    let a = app_with_build("rev", "echo one");
    let first = server.run(&["deploy", a.path_str(), "--json"]).ok().json();
    let b = app_with_build("rev", "echo two");
    let second = server.run(&["deploy", b.path_str(), "--json"]).ok().json();
    // The same code as the first: shares its artifact.
    let third = server.run(&["deploy", a.path_str(), "--json"]).ok().json();
    assert_eq!(artifact_count(&server), 2);
    let third_id = third["revision"].as_str().unwrap();
    let second_id = second["revision"].as_str().unwrap();
    let first_id = first["revision"].as_str().unwrap();

    let out = server.run(&["apps", "delete-rev", "rev", &third_id[..8]]).failed();
    assert!(out.stderr.contains("current revision") && out.stderr.contains("switch"), "{}", out.stderr);
    assert_eq!(revisions(&server, "rev").len(), 3, "the refusal changes nothing");

    // Deleting the second frees its artifact: nothing else uses that code. A short
    // prefix is enough to name it.
    let second_dir = server.data_dir().join("revisions").join(second_id);
    assert!(second_dir.exists());
    server.run(&["apps", "delete-rev", "rev", &second_id[..6]]).ok();
    assert!(!second_dir.exists());
    assert_eq!(artifact_count(&server), 1);

    // Deleting the first keeps the artifact the third still uses.
    server.run(&["apps", "delete-rev", "rev", first_id]).ok();
    assert_eq!(artifact_count(&server), 1);
    let revs = revisions(&server, "rev");
    assert_eq!(revs.len(), 1);
    assert_eq!(revs[0]["id"], third_id);

    let history = server.run(&["apps", "history", "rev", "--json"]).ok().json();
    assert_eq!(history[0]["action"], "delete_rev");
    assert!(history[0]["details"].as_str().unwrap().contains(first_id));
}

#[test]
fn unknown_and_ambiguous_prefixes_are_explained() {
    let server = server();
    let a = app_with_build("pre", "true");
    server.run(&["deploy", a.path_str()]).ok();
    server.run(&["deploy", a.path_str()]).ok();
    let out = server.run(&["apps", "delete-rev", "pre", "zzz"]).failed();
    assert!(out.stderr.contains("not a revision id"), "{}", out.stderr);
    let revs = revisions(&server, "pre");
    let out = server.run(&["apps", "delete-rev", "pre", "00000000-0000"]).failed();
    assert!(out.stderr.contains("no revision matching"), "{}", out.stderr);
    let out = server.run(&["apps", "delete-rev", "nope", revs[0]["id"].as_str().unwrap()]).failed();
    assert!(out.stderr.contains("app \"nope\" not found"), "{}", out.stderr);
    let out = server.run(&["apps", "delete-rev", "pre", ""]).failed();
    assert!(out.stderr.contains("REVISION"), "{}", out.stderr);
    assert_eq!(revisions(&server, "pre").len(), 2);
}

#[test]
fn deleting_an_app_removes_its_revisions_and_files() {
    let server = server();
    let a = app_with_build("gone", "true");
    server.run(&["deploy", a.path_str()]).ok();
    server.run(&["apps", "delete", "gone"]).ok();
    assert_eq!(server.run(&["apps", "list", "--json"]).ok().json(), serde_json::json!([]));
    assert_eq!(artifact_count(&server), 0);
    assert_eq!(std::fs::read_dir(server.data_dir().join("revisions")).unwrap().count(), 0);
    server.run(&["apps", "list-rev", "gone"]).failed();
}
