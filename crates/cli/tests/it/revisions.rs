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

#[test]
fn listings_show_the_newest_revisions_and_always_the_current_one() {
    let server = server();
    let ids: Vec<String> = (0..4)
        .map(|n| {
            let app = app_with_build("paged", &format!("echo {n}"));
            server.run(&["deploy", app.path_str(), "--json"]).ok().json()["revision"].as_str().unwrap().to_owned()
        })
        .collect();
    let listed = |args: &[&str]| -> Vec<String> {
        let out = server.run(&[&["apps", "list-rev", "paged", "--json"], args].concat()).ok();
        out.json().as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(listed(&["--limit", "2"]), [ids[3].clone(), ids[2].clone()]);
    server.run(&["apps", "set-rev", "paged", &ids[0][..8], "--strategy", "recreate"]).ok();
    assert_eq!(listed(&["--limit", "2"]), [ids[3].clone(), ids[2].clone(), ids[0].clone()], "the current one too");
    assert_eq!(listed(&["--all"]).len(), 4);
    assert_eq!(listed(&[]).len(), 4, "the default page holds 100");
    let table = server.run(&["apps", "list-rev", "paged", "--limit", "1"]).ok();
    assert!(table.stderr.contains("Showing 2 of 4 revisions"), "{}", table.stderr);

    let http = testkit::Http::new();
    let url = format!("{}/v1/apps/paged/revisions?limit=1", server.api_url);
    let reply = http.get(&url, Some(&server.root_key));
    assert_eq!(reply.header("x-total-count").as_deref(), Some("4"));
    let zero = http.get(&url.replace("limit=1", "limit=0"), Some(&server.root_key));
    assert_eq!((zero.status, zero.json()["error"]["code"].as_str()), (400, Some("invalid_request")));
    server.run(&["apps", "list-rev", "paged", "--limit", "0"]).failed();
}
