//! The store's behaviour, checked on both backends: every test is a function of a fresh
//! `Store`, run once on SQLite in a temp dir and once on PostgreSQL in a database made
//! for it on the server `HANGAR_TEST_PG_URL` names.

/// Runs each named `async fn(Store)` of the module on both backends.
macro_rules! on_both_backends {
    ($($test:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let (_dir, store) = crate::backend::sqlite().await;
                    super::$test(store).await;
                }
            )+
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let db = crate::backend::PgDatabase::create().await;
                    super::$test(db.open().await).await;
                    db.drop().await;
                }
            )+
        }
    };
}

mod accounts;
mod apps;
mod backend;
mod fleet;
mod migrations;
mod queue;
mod revisions;

use model::ids::RevisionId;
use model::manifest::{RunnerSpec, Scaling};
use model::records::{App, Revision, Team};
use model::revision::{AuthMode, RevisionStatus};
use store::{NewApp, NewHistory, Store};
use time::OffsetDateTime;
use uuid::Uuid;

/// A time at the store's precision (milliseconds), so records compare equal after a
/// round trip.
fn at_millis(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).unwrap()
}

fn now_millis() -> OffsetDateTime {
    at_millis((OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64)
}

async fn team(store: &Store, name: &str) -> Team {
    store.create_team(name).await.unwrap()
}

fn new_app(team_id: Uuid, name: &str) -> NewApp {
    NewApp {
        team_id,
        name: name.to_owned(),
        auth: AuthMode::Private,
        scaling: Scaling::default(),
        runner: RunnerSpec::default(),
    }
}

async fn app(store: &Store, name: &str) -> App {
    let team = team(store, &format!("team-of-{name}")).await;
    store.create_app(new_app(team.id, name)).await.unwrap()
}

fn revision(app_id: Uuid, status: RevisionStatus, artifact: &str) -> Revision {
    Revision {
        id: RevisionId(Uuid::now_v7()),
        app_id,
        status,
        artifact: artifact.to_owned(),
        manifest: "[app]\nname = \"x\"\n".to_owned(),
        runner: RunnerSpec { num_gpus: Some(2), ..RunnerSpec::default() },
        message: Some("first".to_owned()),
        failure: None,
        created_at: now_millis(),
        annotations: vec![("git".to_owned(), "3f2a".to_owned()), ("note".to_owned(), "a=b, c".to_owned())],
    }
}

fn history(app_id: Uuid, action: &str) -> NewHistory {
    NewHistory {
        app_id,
        action: action.to_owned(),
        key_id: Some("key-1".to_owned()),
        details: format!("{action} done"),
    }
}
