//! Servers sharing a store: their heartbeats, the one lease per app, writes fenced by
//! it, and revisions' built code.

use std::time::{Duration, Instant};

use model::ids::RevisionId;
use model::revision::RevisionStatus;
use store::{Activation, Fence, RevisionFile, Store, StoreError};

use crate::{app, history, revision};

const LONG: Duration = Duration::from_secs(60);
const SHORT: Duration = Duration::from_millis(300);

/// Waits, with a deadline, until the app's lease is no longer in force.
async fn until_expired(store: &Store, app_id: uuid::Uuid) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let leases = store.leases().await.unwrap();
        if leases.iter().any(|l| l.app_id == app_id && !l.live) {
            return;
        }
        assert!(Instant::now() < deadline, "the lease never expired: {leases:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn activation(app_id: uuid::Uuid, revision: RevisionId, fence: Option<Fence>) -> Activation {
    Activation { app_id, revision, runner: Default::default(), scaling: None, auth: None, fence }
}

async fn one_server_holds_an_apps_lease_until_it_expires_and_the_next_has_a_higher_epoch(store: Store) {
    let web = app(&store, "web").await;
    assert_eq!(store.take_lease(web.id, "a", SHORT).await.unwrap(), Some(1));
    assert_eq!(store.take_lease(web.id, "b", SHORT).await.unwrap(), None, "a holds it");
    assert_eq!(store.take_lease(web.id, "a", SHORT).await.unwrap(), None, "even a takes it only once");
    assert_eq!(store.renew_leases("a", SHORT).await.unwrap(), [(web.id, 1)]);
    assert!(store.renew_leases("b", SHORT).await.unwrap().is_empty());

    until_expired(&store, web.id).await;
    assert!(store.renew_leases("a", LONG).await.unwrap().is_empty(), "an expired lease is not renewed");
    assert_eq!(store.take_lease(web.id, "b", LONG).await.unwrap(), Some(2));
    let leases = store.leases().await.unwrap();
    assert_eq!(leases.len(), 1);
    assert_eq!((leases[0].owner.as_str(), leases[0].epoch, leases[0].live), ("b", 2, true));
}

async fn a_stale_owners_fenced_write_is_refused_and_changes_nothing(store: Store) {
    let web = app(&store, "web").await;
    let first = revision(web.id, RevisionStatus::Deploying, "sha256:1");
    let second = revision(web.id, RevisionStatus::Deploying, "sha256:2");
    store.insert_revision(first.clone()).await.unwrap();
    store.insert_revision(second.clone()).await.unwrap();
    let epoch = store.take_lease(web.id, "a", SHORT).await.unwrap().unwrap();
    let stale = Fence { owner: "a".to_owned(), epoch };
    store
        .activate_revision(activation(web.id, first.id, Some(stale.clone())), history(web.id, "deploy"))
        .await
        .unwrap();

    until_expired(&store, web.id).await;
    let epoch = store.take_lease(web.id, "b", LONG).await.unwrap().unwrap();
    let history_before = store.list_history(web.id).await.unwrap();
    let err = store
        .activate_revision(activation(web.id, second.id, Some(stale.clone())), history(web.id, "set_rev"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Fenced(_)), "{err:?}");
    let after = store.app_by_name(web.team_id, "web").await.unwrap().unwrap();
    assert_eq!(after.current_revision, Some(first.id), "the alias did not move");
    assert_eq!(store.revision(second.id).await.unwrap().unwrap().status, RevisionStatus::Deploying);
    assert_eq!(store.list_history(web.id).await.unwrap(), history_before);
    assert!(!store.release_lease(web.id, stale).await.unwrap(), "nor can it release what it lost");

    let owner = Fence { owner: "b".to_owned(), epoch };
    store.activate_revision(activation(web.id, second.id, Some(owner)), history(web.id, "set_rev")).await.unwrap();
    let after = store.app_by_name(web.team_id, "web").await.unwrap().unwrap();
    assert_eq!(after.current_revision, Some(second.id));
}

async fn a_released_lease_is_taken_at_once_and_a_retired_server_frees_all_of_its(store: Store) {
    let web = app(&store, "web").await;
    let api = app(&store, "api").await;
    let epoch = store.take_lease(web.id, "a", LONG).await.unwrap().unwrap();
    store.take_lease(api.id, "a", LONG).await.unwrap().unwrap();
    assert!(store.release_lease(web.id, Fence { owner: "a".to_owned(), epoch }).await.unwrap());
    assert_eq!(store.take_lease(web.id, "b", LONG).await.unwrap(), Some(2));
    assert_eq!(store.take_lease(api.id, "b", LONG).await.unwrap(), None);

    store.announce_server("a", "http://a:1", "http://a:2", LONG).await.unwrap();
    assert_eq!(store.retire_server("a").await.unwrap(), 1);
    assert_eq!(store.take_lease(api.id, "b", LONG).await.unwrap(), Some(2));
    let servers = store.announce_server("b", "http://b:1", "http://b:2", LONG).await.unwrap();
    assert_eq!(servers.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), ["b"]);
}

async fn servers_see_each_other_until_one_stops_announcing(store: Store) {
    let servers = store.announce_server("a", "http://127.0.0.1:1", "http://127.0.0.1:2", SHORT).await.unwrap();
    assert_eq!(servers.len(), 1);
    assert_eq!(
        (servers[0].api_url.as_str(), servers[0].gateway_url.as_str()),
        ("http://127.0.0.1:1", "http://127.0.0.1:2")
    );
    let servers = store.announce_server("b", "http://127.0.0.1:3", "http://127.0.0.1:4", SHORT).await.unwrap();
    assert_eq!(servers.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), ["a", "b"], "oldest first");
    // b keeps announcing; a does not.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let servers = store.announce_server("b", "http://127.0.0.1:3", "http://127.0.0.1:4", SHORT).await.unwrap();
        if servers.iter().map(|s| s.id.as_str()).eq(["b"]) {
            break;
        }
        assert!(Instant::now() < deadline, "a never dropped out: {servers:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn servers_racing_for_a_lease_get_it_once(store: Store) {
    let web = app(&store, "web").await;
    let takes = (0..8).map(|n| {
        let store = store.clone();
        tokio::spawn(async move { store.take_lease(web.id, &format!("s{n}"), LONG).await.unwrap() })
    });
    let mut won = Vec::new();
    for take in takes {
        won.extend(take.await.unwrap());
    }
    assert_eq!(won, [1]);
}

async fn a_deleted_apps_lease_goes_with_it_and_cannot_be_taken(store: Store) {
    let web = app(&store, "web").await;
    store.take_lease(web.id, "a", LONG).await.unwrap().unwrap();
    store.delete_app(web.id).await.unwrap();
    assert!(store.leases().await.unwrap().is_empty());
    assert_eq!(store.take_lease(web.id, "a", LONG).await.unwrap(), None);
}

async fn a_revisions_code_is_stored_in_parts_read_back_whole_and_goes_with_it(store: Store) {
    let web = app(&store, "web").await;
    let rev = revision(web.id, RevisionStatus::Deploying, "sha256:1");
    store.insert_revision(rev.clone()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let code: Vec<u8> = (0..(2 << 20) + 12345).map(|i: u32| (i * 7 % 251) as u8).collect();
    std::fs::write(dir.path().join("in"), &code).unwrap();
    let out = dir.path().join("out");
    assert_eq!(store.revision_file(rev.id, RevisionFile::Code, &out).await.unwrap(), None);
    assert!(!out.exists());

    store.put_revision_file(rev.id, RevisionFile::Code, "sha256:abc", &dir.path().join("in")).await.unwrap();
    assert_eq!(store.revision_file(rev.id, RevisionFile::Code, &out).await.unwrap().as_deref(), Some("sha256:abc"));
    assert!(std::fs::read(&out).unwrap() == code, "the same bytes");
    std::fs::write(dir.path().join("in"), b"again").unwrap();
    store.put_revision_file(rev.id, RevisionFile::Code, "sha256:def", &dir.path().join("in")).await.unwrap();
    assert_eq!(store.revision_file(rev.id, RevisionFile::Code, &out).await.unwrap().as_deref(), Some("sha256:def"));
    assert_eq!(std::fs::read(&out).unwrap(), b"again");

    // The upload is kept beside it, apart.
    std::fs::write(dir.path().join("up"), b"the upload").unwrap();
    store.put_revision_file(rev.id, RevisionFile::Upload, "sha256:up", &dir.path().join("up")).await.unwrap();
    let up = dir.path().join("up-out");
    assert_eq!(store.revision_file(rev.id, RevisionFile::Upload, &up).await.unwrap().as_deref(), Some("sha256:up"));
    assert_eq!(std::fs::read(&up).unwrap(), b"the upload");
    assert_eq!(store.revision_file(rev.id, RevisionFile::Code, &out).await.unwrap().as_deref(), Some("sha256:def"));

    store.delete_revision(rev.id).await.unwrap();
    std::fs::remove_file(&out).unwrap();
    assert_eq!(store.revision_file(rev.id, RevisionFile::Code, &out).await.unwrap(), None);
    assert_eq!(store.revision_file(rev.id, RevisionFile::Upload, &up).await.unwrap(), None);
}

on_both_backends!(
    one_server_holds_an_apps_lease_until_it_expires_and_the_next_has_a_higher_epoch,
    a_stale_owners_fenced_write_is_refused_and_changes_nothing,
    a_released_lease_is_taken_at_once_and_a_retired_server_frees_all_of_its,
    servers_see_each_other_until_one_stops_announcing,
    servers_racing_for_a_lease_get_it_once,
    a_deleted_apps_lease_goes_with_it_and_cannot_be_taken,
    a_revisions_code_is_stored_in_parts_read_back_whole_and_goes_with_it,
);
