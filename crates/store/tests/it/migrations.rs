//! Opening a store: the schema is made once, even by servers starting together, and
//! what was written is there after a reopen.

use store::{Store, StoreError};
use tokio_postgres::NoTls;

use crate::backend::{PgDatabase, sqlite};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_starting_together_migrate_once() {
    let db = PgDatabase::create().await;
    let opens: Vec<_> = (0..6)
        .map(|_| {
            let url = db.url.clone();
            tokio::spawn(async move { Store::open_postgres(&url).await.unwrap() })
        })
        .collect();
    let mut stores = Vec::new();
    for open in opens {
        stores.push(open.await.unwrap());
    }
    stores[0].create_team("t").await.unwrap();
    assert!(stores[5].team_by_name("t").await.unwrap().is_some(), "one database");
    drop(stores);
    let reopened = db.open().await;
    assert!(reopened.team_by_name("t").await.unwrap().is_some(), "a reopen keeps the data");
    drop(reopened);

    let (client, connection) = tokio_postgres::connect(&db.url, NoTls).await.unwrap();
    tokio::spawn(connection);
    let versions: Vec<i64> = client
        .query("SELECT version FROM schema_migrations ORDER BY version", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, [1, 2, 3, 4, 5], "each migration applied once");
    drop(client);
    db.drop().await;
}

#[tokio::test]
async fn a_reopened_sqlite_store_keeps_its_data() {
    let (dir, store) = sqlite().await;
    store.create_team("t").await.unwrap();
    drop(store);
    let reopened = Store::open_sqlite(&dir.path().join("db.sqlite")).await.unwrap();
    assert!(reopened.team_by_name("t").await.unwrap().is_some());
}

#[tokio::test]
async fn a_postgres_server_that_is_not_there_is_a_postgres_error() {
    // Port 1 on loopback: nothing listens there.
    let err = Store::open_postgres("postgres://postgres@127.0.0.1:1/none").await.err().unwrap();
    assert!(matches!(err, StoreError::Postgres(_)), "{err:?}");
    assert!(err.to_string().starts_with("PostgreSQL: "), "{err}");
    let err = Store::open_postgres("not a url").await.err().unwrap();
    assert!(matches!(err, StoreError::Postgres(_)), "{err:?}");
}
