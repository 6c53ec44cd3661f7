//! Where each test's store lives: a temp dir for SQLite, a database of its own for
//! PostgreSQL.

use store::Store;
use tokio_postgres::NoTls;

const PG_URL_VAR: &str = "HANGAR_TEST_PG_URL";

pub(crate) async fn sqlite() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("db.sqlite")).await.unwrap();
    (dir, store)
}

/// A database made for one test on the PostgreSQL server of `HANGAR_TEST_PG_URL`, and
/// dropped when the test has passed (a failed one's is kept, to look into).
pub(crate) struct PgDatabase {
    admin_url: String,
    name: String,
    pub(crate) url: String,
}

impl PgDatabase {
    pub(crate) async fn create() -> PgDatabase {
        let Ok(admin_url) = std::env::var(PG_URL_VAR) else {
            // Never skipped: a run without PostgreSQL would pass without checking half
            // of what it claims to.
            panic!(
                "{PG_URL_VAR} is not set: the store's tests also run on PostgreSQL. Start a server and set it \
                 to an admin URL, e.g. {PG_URL_VAR}=postgres://postgres@127.0.0.1:55432/postgres"
            );
        };
        let name = format!("hangar_test_{}", uuid::Uuid::new_v4().simple());
        admin(&admin_url).await.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
        let url = with_database(&admin_url, &name);
        PgDatabase { admin_url, name, url }
    }

    pub(crate) async fn open(&self) -> Store {
        Store::open_postgres(&self.url).await.unwrap()
    }

    pub(crate) async fn drop(self) {
        admin(&self.admin_url).await.batch_execute(&format!("DROP DATABASE {} WITH (FORCE)", self.name)).await.unwrap();
    }
}

async fn admin(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {PG_URL_VAR}={url}: {e}"));
    tokio::spawn(connection);
    client
}

/// The URL `url` with its database replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url.split_once('?').map_or((url, None), |(b, q)| (b, Some(q)));
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let server = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{server}/{name}?{query}"),
        None => format!("{server}/{name}"),
    }
}
