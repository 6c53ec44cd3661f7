//! The server on PostgreSQL instead of the embedded SQLite store: the same deploys and
//! calls, and what it stored is there after a restart. The database is made for the
//! test on the server `HANGAR_TEST_PG_URL` names (an admin URL); without it the test
//! fails rather than pass unchecked.

use testkit::Http;
use tokio_postgres::NoTls;

use crate::{app_url, revisions, runtime, server_with, testapp_dir};

const PG_URL_VAR: &str = "HANGAR_TEST_PG_URL";

#[test]
fn a_server_on_postgres_deploys_serves_and_keeps_its_apps_across_a_restart() {
    let admin_url = std::env::var(PG_URL_VAR).unwrap_or_else(|_| {
        panic!(
            "{PG_URL_VAR} is not set: this test runs the server on PostgreSQL. Start a server and set it to an \
             admin URL, e.g. {PG_URL_VAR}=postgres://postgres@127.0.0.1:55432/postgres"
        )
    });
    let name = format!("hangar_e2e_{}", uuid::Uuid::new_v4().simple());
    admin(&admin_url, &format!("CREATE DATABASE {name}"));
    let (server_part, query) = admin_url.split_once('?').map_or((admin_url.as_str(), None), |(b, q)| (b, Some(q)));
    let authority = server_part.find("://").map_or(0, |i| i + 3);
    let base = server_part[authority..].find('/').map_or(server_part, |slash| &server_part[..authority + slash]);
    let url = match query {
        Some(query) => format!("{base}/{name}?{query}"),
        None => format!("{base}/{name}"),
    };

    let mut server = server_with(&["--database-url", &url]);
    let app = testapp_dir("onpg", "");
    let deployed = server.run(&["deploy", app.path_str(), "--auth", "public", "--json"]).ok().json();
    assert_eq!(deployed["status"], "deployed");
    assert_eq!(Http::new().get(&app_url(&server, "onpg", "/"), None).status, 200);
    assert!(!server.data_dir().join("hangar.db").exists(), "the embedded store is left alone");

    server.stop();
    server.restart();
    let revs = revisions(&server, "onpg");
    assert_eq!((revs.len(), &revs[0]["id"], &revs[0]["current"]), (1, &deployed["revision"], &serde_json::json!(true)));
    assert_eq!(Http::new().get(&app_url(&server, "onpg", "/"), None).status, 200);
    drop(server);
    admin(&admin_url, &format!("DROP DATABASE {name} WITH (FORCE)"));
}

fn admin(url: &str, sql: &str) {
    runtime().block_on(async {
        let (client, connection) =
            tokio_postgres::connect(url, NoTls).await.unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
        tokio::spawn(connection);
        client.batch_execute(sql).await.unwrap();
    });
}
