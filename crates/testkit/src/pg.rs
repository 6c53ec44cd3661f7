//! A real, private PostgreSQL cluster for tests: [`PgCluster`] runs
//! `scripts/pg/cluster.sh` in a temporary directory (one postgres on 127.0.0.1 and
//! a unix socket in that directory, trust auth, superuser `postgres`), makes fresh
//! databases in it, runs SQL through `psql`, and stops it when dropped. See
//! `scripts/pg/README.md` for what the cluster is and how it behaves.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::cluster::ClusterDir;

/// A running private PostgreSQL cluster with its own directory.
pub struct PgCluster {
    cluster: ClusterDir,
    port: u16,
}

impl PgCluster {
    /// Starts a cluster and waits until it accepts connections. Fails the test with
    /// the script's output if it does not start.
    pub fn start() -> PgCluster {
        // The socket lives in the directory. tempfile makes it 0700. As root the script
        // runs postgres as the `postgres` user (postgres refuses to run as root) and hands
        // it the directory; 0755 lets that user, and clients of any user, reach it either
        // way.
        let cluster = ClusterDir::start("pg", "hp-", "log/postgres.log", |dir| {
            std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .expect("cannot chmod the cluster's dir");
        });
        let port = cluster.var("HANGAR_PG_PORT");
        let port = port.parse().unwrap_or_else(|_| panic!("HANGAR_PG_PORT is not a port: {port:?}"));
        PgCluster { cluster, port }
    }

    /// The cluster's directory: `data/`, `log/postgres.log`, `pids`, `env` and the
    /// server's unix socket.
    pub fn dir(&self) -> &Path {
        self.cluster.path()
    }

    /// The port the server listens on, on 127.0.0.1 (and the socket's number).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The superuser's URL of the `postgres` database:
    /// `postgres://postgres@127.0.0.1:PORT/postgres`. No password is needed.
    pub fn url(&self) -> String {
        self.var("HANGAR_PG_URL")
    }

    /// Makes a new, empty database `name` and returns its URL,
    /// `postgres://postgres@127.0.0.1:PORT/NAME`. The name is lower-case letters,
    /// digits and `_`, not starting with a digit, so that it needs no quoting in SQL
    /// or in a URL.
    #[track_caller]
    pub fn create_database(&self, name: &str) -> String {
        assert!(is_plain_name(name), "not a plain database name: {name:?}");
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        self.database_url(name)
    }

    /// The URL of database `db` of this cluster (which need not exist yet).
    pub fn database_url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Runs `sql` (one or more statements) in database `db` as the superuser, through
    /// the socket, and returns what psql prints unaligned and without headers
    /// (`psql -Atc`): one line per row, columns separated by `|`. Fails the test with
    /// psql's stderr if a statement fails.
    #[track_caller]
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = self
            .command("psql")
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-d", db, "-c", sql])
            .output()
            .unwrap_or_else(|e| panic!("cannot run psql: {e}"));
        assert!(
            out.status.success(),
            "psql -d {db} -c {sql:?} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A PostgreSQL client program (`psql`, `pg_dump`, `createdb`, …) of the
    /// cluster's version, with `PGHOST` (the socket's directory), `PGPORT` and
    /// `PGUSER` set for this cluster.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new(Path::new(&self.var("HANGAR_PG_BIN")).join(program));
        command
            .env("PGHOST", self.var("HANGAR_PG_HOST"))
            .env("PGPORT", self.port.to_string())
            .env("PGUSER", "postgres")
            // No password is asked for, nor any taken from the caller's settings.
            .env_remove("PGPASSWORD")
            .env_remove("PGSERVICE")
            .env_remove("PGDATABASE")
            .stdin(Stdio::null());
        command
    }

    fn var(&self, key: &str) -> String {
        self.cluster.var(key)
    }
}

/// A name that PostgreSQL takes as it is, unquoted and not folded, and that a URL
/// holds as it is: lower-case ASCII letters, digits and `_`, not starting with a
/// digit, at most 63 bytes (PostgreSQL's limit).
fn is_plain_name(name: &str) -> bool {
    let plain = name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    plain && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_') && name.len() <= 63
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names() {
        for name in ["kit_a", "_x", "store_test_17", &"a".repeat(63)] {
            assert!(is_plain_name(name), "{name:?}");
        }
        for name in ["", "1db", "Kit", "a-b", "a b", "a;drop", "ü", &"a".repeat(64)] {
            assert!(!is_plain_name(name), "{name:?}");
        }
    }
}
