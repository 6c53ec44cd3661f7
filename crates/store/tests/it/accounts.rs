//! Teams, keys and secrets.

use model::records::Key;
use model::revision::KeyScope;
use store::{Store, StoreError};

use crate::{at_millis, now_millis, team};

async fn teams_are_found_by_name_and_id_and_listed_by_name(store: Store) {
    let b = team(&store, "b-team").await;
    let upper = team(&store, "Zeta").await;
    let a = team(&store, "a-team").await;
    assert_eq!(store.team_by_name("b-team").await.unwrap(), Some(b.clone()));
    assert_eq!(store.team_by_id(a.id).await.unwrap(), Some(a.clone()));
    assert_eq!(store.team_by_name("nobody").await.unwrap(), None);
    assert_eq!(store.team_by_id(uuid::Uuid::new_v4()).await.unwrap(), None);
    // Byte order, whatever the database's locale: upper case sorts before lower case.
    assert_eq!(store.list_teams().await.unwrap(), [upper, a, b]);
}

async fn a_team_name_is_taken_once(store: Store) {
    team(&store, "one").await;
    let err = store.create_team("one").await.unwrap_err();
    assert!(matches!(err, StoreError::AlreadyExists(ref what) if what == "team \"one\""), "{err:?}");
    team(&store, "One").await;
    assert_eq!(store.list_teams().await.unwrap().len(), 2);
}

fn key(id: &str, team_id: uuid::Uuid, scope: KeyScope, created_ms: i64) -> Key {
    Key {
        id: id.to_owned(),
        team_id,
        scope,
        description: Some(format!("key {id}")),
        created_at: at_millis(created_ms),
        revoked_at: None,
    }
}

async fn keys_are_created_found_listed_revoked_and_counted(store: Store) {
    let t = team(&store, "t").await;
    let other = team(&store, "other").await;
    let second = key("k2", t.id, KeyScope::Api, 2_000);
    let first = Key { description: None, ..key("k1", t.id, KeyScope::Admin, 1_000) };
    let same_ms = key("k3", t.id, KeyScope::Api, 2_000);
    store.create_key(second.clone(), "hash-2".to_owned()).await.unwrap();
    store.create_key(first.clone(), "hash-1".to_owned()).await.unwrap();
    store.create_key(same_ms.clone(), "hash-3".to_owned()).await.unwrap();
    store.create_key(key("o1", other.id, KeyScope::Api, 500), "hash-o".to_owned()).await.unwrap();

    let found = store.key_by_id("k2").await.unwrap().unwrap();
    assert_eq!((found.key, found.secret_hash.as_str()), (second.clone(), "hash-2"));
    assert!(store.key_by_id("nope").await.unwrap().is_none());
    assert!(store.create_key(first.clone(), "again".to_owned()).await.is_err(), "a key id is taken once");

    // Oldest first; keys made in the same millisecond in the order they were made.
    assert_eq!(store.list_keys(t.id).await.unwrap(), [first.clone(), second.clone(), same_ms.clone()]);
    assert_eq!(store.count_keys(KeyScope::Api).await.unwrap(), 3);
    assert_eq!(store.count_keys(KeyScope::Admin).await.unwrap(), 1);
    assert_eq!(store.count_keys(KeyScope::Root).await.unwrap(), 0);

    let before = now_millis();
    assert!(store.revoke_key("k2").await.unwrap());
    assert!(!store.revoke_key("k2").await.unwrap(), "revoked once");
    assert!(!store.revoke_key("nope").await.unwrap());
    let revoked = store.key_by_id("k2").await.unwrap().unwrap().key;
    assert!(revoked.revoked_at.unwrap() >= before);
    assert_eq!(store.list_keys(t.id).await.unwrap().len(), 3, "revoked keys are still listed");
    assert_eq!(store.count_keys(KeyScope::Api).await.unwrap(), 3, "and counted");
}

async fn secrets_are_stored_replaced_listed_and_deleted(store: Store) {
    let t = team(&store, "t").await;
    let other = team(&store, "other").await;
    let start = now_millis();
    store.put_secret(t.id, "TOKEN", vec![1; 12], vec![9, 0, 255]).await.unwrap();
    store.put_secret(t.id, "API_KEY", vec![2; 12], vec![]).await.unwrap();
    store.put_secret(t.id, "api_key", vec![3; 12], vec![3]).await.unwrap();
    store.put_secret(other.id, "TOKEN", vec![4; 12], vec![4]).await.unwrap();

    let names: Vec<_> = store.secrets(t.id).await.unwrap().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["API_KEY", "TOKEN", "api_key"]);
    let token = store.secrets(t.id).await.unwrap().into_iter().find(|s| s.name == "TOKEN").unwrap();
    assert_eq!((token.nonce, token.ciphertext), (vec![1; 12], vec![9, 0, 255]));
    assert!(token.created_at >= start && token.updated_at == token.created_at);

    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    store.put_secret(t.id, "TOKEN", vec![5; 12], vec![5, 5]).await.unwrap();
    let replaced = store.secrets(t.id).await.unwrap().into_iter().find(|s| s.name == "TOKEN").unwrap();
    assert_eq!((replaced.nonce, replaced.ciphertext), (vec![5; 12], vec![5, 5]));
    assert_eq!(replaced.created_at, token.created_at, "a replaced secret keeps its creation time");
    assert!(replaced.updated_at > token.updated_at);

    assert!(store.delete_secret(t.id, "TOKEN").await.unwrap());
    assert!(!store.delete_secret(t.id, "TOKEN").await.unwrap());
    assert_eq!(store.secrets(t.id).await.unwrap().len(), 2);
    assert_eq!(store.secrets(other.id).await.unwrap().len(), 1, "another team's secret is its own");
}

on_both_backends!(
    teams_are_found_by_name_and_id_and_listed_by_name,
    a_team_name_is_taken_once,
    keys_are_created_found_listed_revoked_and_counted,
    secrets_are_stored_replaced_listed_and_deleted,
);
