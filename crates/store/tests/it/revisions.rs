//! Revisions: their list, their lookups by prefix, activation, failure and deletion.

use model::ids::RevisionId;
use model::manifest::{RunnerSpec, Scaling};
use model::records::{GuardSettings, GuardWatch, Revision, TrafficShare};
use model::revision::{AuthMode, RevisionStatus};
use store::{Activation, Store, StoreError};
use uuid::Uuid;

use crate::{app, at_millis, history, revision};

fn with_id(mut rev: Revision, id: &str) -> Revision {
    rev.id = RevisionId(Uuid::parse_str(id).unwrap());
    rev
}

async fn revisions_are_listed_newest_first_with_a_limit(store: Store) {
    let web = app(&store, "web").await;
    let other = app(&store, "other").await;
    let mut made = Vec::new();
    // The third and fourth share a millisecond: the later insert counts as newer.
    for (i, ms) in [1_000, 2_000, 3_000, 3_000, 2_500].into_iter().enumerate() {
        let mut rev = revision(web.id, RevisionStatus::Deployed, &format!("art-{i}"));
        rev.created_at = at_millis(ms);
        rev.message = (i % 2 == 0).then(|| format!("message {i}"));
        store.insert_revision(rev.clone()).await.unwrap();
        made.push(rev);
    }
    store.insert_revision(revision(other.id, RevisionStatus::Deployed, "x")).await.unwrap();
    let newest_first = [&made[3], &made[2], &made[4], &made[1], &made[0]].map(Clone::clone);

    assert_eq!(store.list_revisions(web.id, None).await.unwrap(), newest_first);
    assert_eq!(store.list_revisions(web.id, Some(2)).await.unwrap(), newest_first[..2]);
    assert_eq!(store.list_revisions(web.id, Some(0)).await.unwrap(), []);
    assert_eq!(store.list_revisions(web.id, Some(100)).await.unwrap().len(), 5);
    assert_eq!(store.count_revisions(web.id).await.unwrap(), 5);
    assert_eq!(store.count_revisions(Uuid::new_v4()).await.unwrap(), 0);
    assert_eq!(store.revision(made[2].id).await.unwrap(), Some(made[2].clone()));
    assert_eq!(store.revision(RevisionId(Uuid::new_v4())).await.unwrap(), None);
}

async fn revisions_are_found_by_a_prefix_of_their_id(store: Store) {
    let web = app(&store, "web").await;
    let other = app(&store, "other").await;
    let a = with_id(revision(web.id, RevisionStatus::Deployed, "a"), "abcd0000-0000-7000-8000-000000000001");
    let mut b = with_id(revision(web.id, RevisionStatus::Failed, "b"), "abcd1111-0000-7000-8000-000000000002");
    b.created_at = a.created_at + time::Duration::seconds(1);
    let elsewhere = with_id(revision(other.id, RevisionStatus::Deployed, "c"), "abcd2222-0000-7000-8000-000000000003");
    for rev in [&a, &b, &elsewhere] {
        store.insert_revision(rev.clone()).await.unwrap();
    }
    assert_eq!(store.revisions_by_prefix(web.id, "abcd").await.unwrap(), [b.clone(), a.clone()]);
    assert_eq!(store.revisions_by_prefix(web.id, "ABCD1").await.unwrap(), [b.clone()], "any case");
    assert_eq!(
        store.revisions_by_prefix(web.id, "abcd0000-0").await.unwrap(),
        std::slice::from_ref(&a),
        "hyphens count"
    );
    assert_eq!(store.revisions_by_prefix(web.id, "abcd00000").await.unwrap(), []);
    assert_eq!(store.revisions_by_prefix(web.id, "abcd2").await.unwrap(), [], "another app's");
    assert_eq!(store.revisions_by_prefix(web.id, "%").await.unwrap(), [], "no wildcards");
    assert_eq!(store.revisions_by_prefix(web.id, "").await.unwrap().len(), 2);
}

async fn a_failed_revision_keeps_its_reason_and_a_deleted_one_frees_its_artifact(store: Store) {
    let web = app(&store, "web").await;
    let first = revision(web.id, RevisionStatus::Deploying, "shared");
    let second = revision(web.id, RevisionStatus::Deployed, "shared");
    let own = revision(web.id, RevisionStatus::Deployed, "own");
    for rev in [&first, &second, &own] {
        store.insert_revision(rev.clone()).await.unwrap();
    }
    store.fail_revision(first.id, "health check timed out").await.unwrap();
    let failed = store.revision(first.id).await.unwrap().unwrap();
    assert_eq!((failed.status, failed.failure.as_deref()), (RevisionStatus::Failed, Some("health check timed out")));

    assert_eq!(store.delete_revision(first.id).await.unwrap(), None, "another revision uses its artifact");
    assert_eq!(store.delete_revision(own.id).await.unwrap(), Some("own".to_owned()));
    assert_eq!(store.delete_revision(own.id).await.unwrap(), None, "deleted once");
    assert_eq!(store.delete_revision(second.id).await.unwrap(), Some("shared".to_owned()));
    assert_eq!(store.count_revisions(web.id).await.unwrap(), 0);
    assert!(store.artifacts_in_use().await.unwrap().is_empty());
}

async fn activation_moves_the_alias_and_takes_the_revisions_values(store: Store) {
    let web = app(&store, "web").await;
    let mut rev = revision(web.id, RevisionStatus::Deploying, "a");
    rev.runner = RunnerSpec { max_multiplexing: 8, num_gpus: Some(1), ..RunnerSpec::default() };
    rev.failure = Some("an earlier try".to_owned());
    store.insert_revision(rev.clone()).await.unwrap();
    let scaling = Scaling { min_concurrency: 1, ..Scaling::default() };
    let activation = Activation {
        app_id: web.id,
        revision: rev.id,
        runner: rev.runner.clone(),
        scaling: Some(scaling.clone()),
        auth: Some(AuthMode::Public),
        fence: None,
    };
    store.activate_revision(activation, history(web.id, "deploy")).await.unwrap();

    let live = store.revision(rev.id).await.unwrap().unwrap();
    assert_eq!((live.status, live.failure), (RevisionStatus::Deployed, None));
    let after = store.app_by_name(web.team_id, "web").await.unwrap().unwrap();
    assert_eq!(after.current_revision, Some(rev.id));
    assert_eq!((after.runner, after.scaling, after.auth), (rev.runner.clone(), scaling.clone(), AuthMode::Public));
    let actions: Vec<_> = store.list_history(web.id).await.unwrap().into_iter().map(|h| h.action).collect();
    assert_eq!(actions, ["deploy"]);

    // Without runtime values or auth, the app keeps its own.
    let next = revision(web.id, RevisionStatus::Deploying, "b");
    store.insert_revision(next.clone()).await.unwrap();
    let keep = Activation {
        app_id: web.id,
        revision: next.id,
        runner: next.runner.clone(),
        scaling: None,
        auth: None,
        fence: None,
    };
    store.activate_revision(keep, history(web.id, "deploy")).await.unwrap();
    let after = store.app_by_name(web.team_id, "web").await.unwrap().unwrap();
    assert_eq!((after.current_revision, after.scaling, after.auth), (Some(next.id), scaling, AuthMode::Public));
}

async fn activation_of_a_revision_that_may_not_go_live_is_a_conflict(store: Store) {
    let web = app(&store, "web").await;
    let other = app(&store, "other").await;
    let deleted = revision(web.id, RevisionStatus::Deploying, "a");
    let failed = revision(web.id, RevisionStatus::Failed, "b");
    let foreign = revision(other.id, RevisionStatus::Deploying, "c");
    for rev in [&deleted, &failed, &foreign] {
        store.insert_revision(rev.clone()).await.unwrap();
    }
    store.delete_revision(deleted.id).await.unwrap();
    for rev in [&deleted, &failed, &foreign] {
        let activation = Activation {
            app_id: web.id,
            revision: rev.id,
            runner: RunnerSpec { max_multiplexing: 77, ..RunnerSpec::default() },
            scaling: None,
            auth: Some(AuthMode::Public),
            fence: None,
        };
        let err = store.activate_revision(activation, history(web.id, "deploy")).await.unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    }
    // Nothing changed: no alias, no values, no history.
    assert_eq!(store.app_by_name(web.team_id, "web").await.unwrap().unwrap(), web);
    assert!(store.list_history(web.id).await.unwrap().is_empty());
    assert_eq!(store.revision(foreign.id).await.unwrap().unwrap().status, RevisionStatus::Deploying);
}

async fn activation_of_a_revision_whose_app_is_gone_is_a_conflict(store: Store) {
    let web = app(&store, "web").await;
    let rev = revision(web.id, RevisionStatus::Deploying, "a");
    store.insert_revision(rev.clone()).await.unwrap();
    store.delete_app(web.id).await.unwrap();
    let activation =
        Activation { app_id: web.id, revision: rev.id, runner: rev.runner, scaling: None, auth: None, fence: None };
    let err = store.activate_revision(activation, history(web.id, "deploy")).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
}

async fn deploys_left_deploying_fail_as_interrupted(store: Store) {
    let web = app(&store, "web").await;
    let api = app(&store, "api").await;
    let stuck = revision(web.id, RevisionStatus::Deploying, "a");
    let stuck_too = revision(api.id, RevisionStatus::Deploying, "b");
    let live = revision(web.id, RevisionStatus::Deployed, "c");
    for rev in [&stuck, &stuck_too, &live] {
        store.insert_revision(rev.clone()).await.unwrap();
    }
    let mut changed = store.fail_interrupted_deploys(None).await.unwrap();
    changed.sort_by_key(|(rev, _)| rev.id.0);
    let mut expected: Vec<_> = [(&stuck, web.id), (&stuck_too, api.id)]
        .into_iter()
        .map(|(rev, app)| {
            (Revision { status: RevisionStatus::Failed, failure: Some("interrupted".to_owned()), ..rev.clone() }, app)
        })
        .collect();
    expected.sort_by_key(|(rev, _)| rev.id.0);
    assert_eq!(changed, expected);
    assert_eq!(
        store.revision(stuck.id).await.unwrap(),
        Some(expected.iter().find(|(r, _)| r.id == stuck.id).unwrap().0.clone())
    );
    assert_eq!(store.revision(live.id).await.unwrap().unwrap().status, RevisionStatus::Deployed);
    let history = store.list_history(web.id).await.unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].action, "deploy_failed");
    assert!(history[0].details.contains(&stuck.id.to_string()));
    assert!(store.fail_interrupted_deploys(None).await.unwrap().is_empty(), "once");
}

async fn artifacts_in_use_are_each_named_once(store: Store) {
    let web = app(&store, "web").await;
    let api = app(&store, "api").await;
    for (app, artifact) in [(web.id, "b"), (web.id, "a"), (api.id, "b"), (api.id, "c")] {
        store.insert_revision(revision(app, RevisionStatus::Deployed, artifact)).await.unwrap();
    }
    let mut in_use = store.artifacts_in_use().await.unwrap();
    in_use.sort();
    assert_eq!(in_use, ["a", "b", "c"]);
}

async fn a_split_names_deployed_revisions_other_than_the_current_and_a_switch_ends_it(store: Store) {
    let web = app(&store, "web").await;
    let other = app(&store, "other").await;
    let [current, canary, second] = [0, 1, 2].map(|i| revision(web.id, RevisionStatus::Deployed, &format!("a{i}")));
    let failed = revision(web.id, RevisionStatus::Failed, "f");
    let elsewhere = revision(other.id, RevisionStatus::Deployed, "e");
    for rev in [&current, &canary, &second, &failed, &elsewhere] {
        store.insert_revision(rev.clone()).await.unwrap();
    }
    let activate = |rev: &Revision| Activation {
        app_id: web.id,
        revision: rev.id,
        runner: rev.runner.clone(),
        scaling: None,
        auth: None,
        fence: None,
    };
    store.activate_revision(activate(&current), history(web.id, "deploy")).await.unwrap();
    let split = [TrafficShare { revision: canary.id, percent: 10 }, TrafficShare { revision: second.id, percent: 5 }];
    store.set_traffic(web.id, &split, history(web.id, "traffic")).await.unwrap();
    let read = store.app_by_name(web.team_id, "web").await.unwrap().unwrap();
    assert_eq!(read.traffic, split, "kept in order");
    assert_eq!(store.list_apps(web.team_id).await.unwrap()[0].traffic, split);

    for refused in [&current, &failed, &elsewhere] {
        let one = [TrafficShare { revision: refused.id, percent: 10 }];
        let err = store.set_traffic(web.id, &one, history(web.id, "traffic")).await.unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    }
    let unknown = [TrafficShare { revision: RevisionId(Uuid::new_v4()), percent: 1 }];
    assert!(matches!(
        store.set_traffic(web.id, &unknown, history(web.id, "traffic")).await,
        Err(StoreError::Conflict(_))
    ));
    let read = store.app_by_name(web.team_id, "web").await.unwrap().unwrap();
    assert_eq!(read.traffic, split, "a refused split changes nothing");
    let actions: Vec<String> = store.list_history(web.id).await.unwrap().into_iter().map(|h| h.action).collect();
    assert_eq!(actions.iter().filter(|a| *a == "traffic").count(), 1, "{actions:?}");

    store.activate_revision(activate(&second), history(web.id, "set-rev")).await.unwrap();
    let read = store.app_by_name(web.team_id, "web").await.unwrap().unwrap();
    assert_eq!((read.current_revision, read.traffic), (Some(second.id), vec![]), "a switch ends the split");
    store.set_traffic(web.id, &split[..1], history(web.id, "traffic")).await.unwrap();
    store.set_traffic(web.id, &[], history(web.id, "traffic")).await.unwrap();
    assert_eq!(store.app_by_name(web.team_id, "web").await.unwrap().unwrap().traffic, []);
}

async fn the_guard_keeps_its_settings_and_what_it_watches(store: Store) {
    let web = app(&store, "web").await;
    assert_eq!((web.guard, web.guard_watch.clone()), (GuardSettings::default(), None), "off, with defaults");
    let settings = GuardSettings { enabled: true, window: 60, max_error_increase: 2, max_p95_ratio: 150 };
    store.set_guard(web.id, settings, history(web.id, "guard")).await.unwrap();
    let read = store.app_by_name(web.team_id, "web").await.unwrap().unwrap();
    assert_eq!(read.guard, settings);

    let watch = GuardWatch {
        revision: RevisionId(Uuid::new_v4()),
        previous: Some(RevisionId(Uuid::new_v4())),
        until: at_millis(1_900_000_000_123),
        baseline_calls: 1234,
        baseline_errors: 5,
        baseline_p95_micros: Some(18_500),
    };
    store.set_guard_watch(web.id, Some(watch.clone()), None).await.unwrap();
    assert_eq!(store.app_by_name(web.team_id, "web").await.unwrap().unwrap().guard_watch, Some(watch.clone()));
    let canary = GuardWatch { previous: None, baseline_p95_micros: None, ..watch };
    store.set_guard_watch(web.id, Some(canary.clone()), None).await.unwrap();
    assert_eq!(store.list_apps(web.team_id).await.unwrap()[0].guard_watch, Some(canary));
    store.set_guard_watch(web.id, None, Some(history(web.id, "guard_passed"))).await.unwrap();
    assert_eq!(store.app_by_name(web.team_id, "web").await.unwrap().unwrap().guard_watch, None);
    let actions: Vec<String> = store.list_history(web.id).await.unwrap().into_iter().map(|h| h.action).collect();
    assert!(actions.contains(&"guard".to_owned()) && actions.contains(&"guard_passed".to_owned()), "{actions:?}");
}

on_both_backends!(
    revisions_are_listed_newest_first_with_a_limit,
    revisions_are_found_by_a_prefix_of_their_id,
    a_failed_revision_keeps_its_reason_and_a_deleted_one_frees_its_artifact,
    activation_moves_the_alias_and_takes_the_revisions_values,
    activation_of_a_revision_that_may_not_go_live_is_a_conflict,
    activation_of_a_revision_whose_app_is_gone_is_a_conflict,
    deploys_left_deploying_fail_as_interrupted,
    artifacts_in_use_are_each_named_once,
    a_split_names_deployed_revisions_other_than_the_current_and_a_switch_ends_it,
    the_guard_keeps_its_settings_and_what_it_watches,
);
