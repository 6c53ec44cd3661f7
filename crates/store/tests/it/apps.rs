//! Apps, their values and their history.

use model::manifest::{RunnerSpec, Scaling};
use model::revision::{AuthMode, RevisionStatus};
use store::{Activation, NewHistory, Store, StoreError};

use crate::{app, history, new_app, now_millis, revision, team};

async fn an_app_is_created_found_and_listed_by_name(store: Store) {
    let t = team(&store, "t").await;
    let before = now_millis();
    let mut wanted = new_app(t.id, "web");
    wanted.auth = AuthMode::Shared;
    wanted.scaling = Scaling { keep_alive: u64::from(u32::MAX) + 7, max_concurrency: u32::MAX, ..Scaling::default() };
    wanted.runner = RunnerSpec { num_gpus: Some(3), machine_type: "gpu-a,gpu-b".to_owned(), ..RunnerSpec::default() };
    let web = store.create_app(wanted).await.unwrap();
    assert!(web.created_at >= before && web.current_revision.is_none() && !web.suspended);
    let api = store.create_app(new_app(t.id, "Api")).await.unwrap();
    let batch = store.create_app(new_app(t.id, "batch")).await.unwrap();

    assert_eq!(store.app_by_name(t.id, "web").await.unwrap(), Some(web.clone()));
    assert_eq!(store.app_by_name(t.id, "nope").await.unwrap(), None);
    assert_eq!(store.list_apps(t.id).await.unwrap(), [api, batch, web]);
    let other = team(&store, "other").await;
    assert!(store.list_apps(other.id).await.unwrap().is_empty());
}

async fn an_app_name_is_taken_once_per_team(store: Store) {
    let t = team(&store, "t").await;
    let other = team(&store, "other").await;
    store.create_app(new_app(t.id, "web")).await.unwrap();
    let err = store.create_app(new_app(t.id, "web")).await.unwrap_err();
    assert!(matches!(err, StoreError::AlreadyExists(ref what) if what == "app \"web\""), "{err:?}");
    store.create_app(new_app(other.id, "web")).await.unwrap();
    assert_eq!(store.list_apps(t.id).await.unwrap().len(), 1);
}

async fn an_app_of_an_unknown_team_is_refused(store: Store) {
    assert!(store.create_app(new_app(uuid::Uuid::new_v4(), "web")).await.is_err());
}

async fn deleting_an_app_frees_only_the_artifacts_no_one_else_uses(store: Store) {
    let web = app(&store, "web").await;
    let api = app(&store, "api").await;
    for artifact in ["own-1", "own-1", "own-2", "shared"] {
        store.insert_revision(revision(web.id, RevisionStatus::Deployed, artifact)).await.unwrap();
    }
    store.insert_revision(revision(api.id, RevisionStatus::Deployed, "shared")).await.unwrap();
    store.add_history(history(web.id, "deploy")).await.unwrap();

    let mut freed = store.delete_app(web.id).await.unwrap();
    freed.sort();
    assert_eq!(freed, ["own-1", "own-2"]);
    assert!(store.list_revisions(web.id, None).await.unwrap().is_empty());
    assert!(store.list_history(web.id).await.unwrap().is_empty());
    assert!(store.app_by_name(web.team_id, "web").await.unwrap().is_none());
    assert_eq!(store.artifacts_in_use().await.unwrap(), ["shared"]);
    assert!(store.delete_app(web.id).await.unwrap().is_empty(), "a deleted app has nothing left");
}

async fn app_values_change_with_their_history_in_one_step(store: Store) {
    let web = app(&store, "web").await;
    let scaling = Scaling { min_concurrency: 2, max_concurrency: 9, scaling_delay: 30, ..Scaling::default() };
    let runner =
        RunnerSpec { max_multiplexing: 4, num_gpus: None, termination_grace_period: 99, ..RunnerSpec::default() };
    store.update_app_values(web.id, scaling.clone(), runner.clone(), history(web.id, "scale")).await.unwrap();
    let after = store.app_by_name(web.team_id, "web").await.unwrap().unwrap();
    assert_eq!((after.scaling, after.runner), (scaling, runner));
    let actions: Vec<_> = store.list_history(web.id).await.unwrap().into_iter().map(|h| h.action).collect();
    assert_eq!(actions, ["scale"]);
}

async fn history_is_listed_newest_first(store: Store) {
    let web = app(&store, "web").await;
    let other = app(&store, "other").await;
    let before = now_millis();
    for action in ["deploy", "scale", "suspend"] {
        store.add_history(history(web.id, action)).await.unwrap();
    }
    store
        .add_history(NewHistory { app_id: other.id, action: "x".to_owned(), key_id: None, details: String::new() })
        .await
        .unwrap();
    let entries = store.list_history(web.id).await.unwrap();
    let actions: Vec<_> = entries.iter().map(|h| h.action.as_str()).collect();
    assert_eq!(actions, ["suspend", "scale", "deploy"]);
    assert_eq!((entries[0].key_id.as_deref(), entries[0].details.as_str()), (Some("key-1"), "suspend done"));
    assert!(entries.iter().all(|h| h.at >= before));
    let other_entries = store.list_history(other.id).await.unwrap();
    assert_eq!((other_entries.len(), other_entries[0].key_id.as_deref()), (1, None));
}

async fn suspending_shows_on_the_app_and_its_current_revision(store: Store) {
    let web = app(&store, "web").await;
    let rev = revision(web.id, RevisionStatus::Deploying, "a");
    store.insert_revision(rev.clone()).await.unwrap();
    let activation = Activation {
        app_id: web.id,
        revision: rev.id,
        runner: rev.runner.clone(),
        scaling: None,
        auth: None,
        fence: None,
    };
    store.activate_revision(activation, history(web.id, "deploy")).await.unwrap();

    store.set_suspended(web.id, true, history(web.id, "suspend")).await.unwrap();
    assert!(store.app_by_name(web.team_id, "web").await.unwrap().unwrap().suspended);
    assert_eq!(store.revision(rev.id).await.unwrap().unwrap().status, RevisionStatus::Suspended);
    store.set_suspended(web.id, false, history(web.id, "resume")).await.unwrap();
    assert!(!store.app_by_name(web.team_id, "web").await.unwrap().unwrap().suspended);
    assert_eq!(store.revision(rev.id).await.unwrap().unwrap().status, RevisionStatus::Deployed);
    let actions: Vec<_> = store.list_history(web.id).await.unwrap().into_iter().map(|h| h.action).collect();
    assert_eq!(actions, ["resume", "suspend", "deploy"]);
}

on_both_backends!(
    an_app_is_created_found_and_listed_by_name,
    an_app_name_is_taken_once_per_team,
    an_app_of_an_unknown_team_is_refused,
    deleting_an_app_frees_only_the_artifacts_no_one_else_uses,
    app_values_change_with_their_history_in_one_step,
    history_is_listed_newest_first,
    suspending_shows_on_the_app_and_its_current_revision,
);
