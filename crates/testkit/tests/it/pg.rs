use testkit::pg::PgCluster;
use testkit::run_command;

/// Two databases made in the private cluster are separate, its URLs reach it over
/// TCP, and dropping the cluster ends the server it started.
#[test]
fn two_databases_are_separate_and_drop_ends_the_server() {
    let cluster = PgCluster::start();
    let port = cluster.port();
    assert_eq!(cluster.url(), format!("postgres://postgres@127.0.0.1:{port}/postgres"));

    let a = cluster.create_database("kit_a");
    let b = cluster.create_database("kit_b");
    assert_eq!(a, format!("postgres://postgres@127.0.0.1:{port}/kit_a"));
    assert_eq!(b, format!("postgres://postgres@127.0.0.1:{port}/kit_b"));

    cluster.psql("kit_a", "CREATE TABLE runner (id int PRIMARY KEY, name text); INSERT INTO runner VALUES (1, 'ü');");
    assert_eq!(cluster.psql("kit_a", "SELECT id, name FROM runner"), "1|ü\n");
    let tables = "SELECT count(*) FROM pg_tables WHERE tablename = 'runner'";
    assert_eq!(cluster.psql("kit_a", tables), "1\n");
    assert_eq!(cluster.psql("kit_b", tables), "0\n");

    // The returned URL works as it is, over TCP (the store connects this way).
    let out =
        run_command(cluster.command("psql").args(["-X", "-Atc", "SELECT current_database(), inet_server_addr()", &b]));
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout, "kit_b|127.0.0.1\n");
    assert_eq!(cluster.psql("postgres", "SHOW server_encoding"), "UTF8\n");

    let pids = std::fs::read_to_string(cluster.dir().join("pids")).unwrap();
    let servers: Vec<i32> = pids
        .lines()
        .map(|line| {
            let (pid, name) = line.split_once(' ').unwrap();
            assert_eq!(name, "postgres", "{pids}");
            pid.parse().unwrap()
        })
        .collect();
    assert_eq!(servers.len(), 1, "{pids}");
    let dir = cluster.dir().to_owned();
    drop(cluster);
    for pid in servers {
        assert!(!is_running(pid), "postgres (pid {pid}) is still running after the cluster was dropped");
    }
    assert!(!dir.exists(), "{} is left behind", dir.display());
}

/// Whether `pid` is a live postgres. A zombie is not: it has exited, and only waits
/// for init to reap it.
fn is_running(pid: i32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return false };
    let field = |key: &str| status.lines().find_map(|l| l.strip_prefix(key)).map(str::trim).unwrap_or("");
    field("Name:") == "postgres" && !field("State:").starts_with('Z')
}
