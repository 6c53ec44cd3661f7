//! What the reliability programs share: looking at the processes a server left, checking
//! its store, and deploying the workspace's test app.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use testkit::{AppDir, TestServer};

/// Pids of the live processes whose working directory is inside `dir`: a server's
/// runners and builds run in its data dir. Zombies (ended, not yet reaped) are left out.
pub fn processes_in(dir: &Path) -> Vec<u32> {
    let Ok(dir) = dir.canonicalize() else { return Vec::new() };
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(&dir)))
        .filter(|pid| alive(*pid))
        .collect()
}

/// The process trees among [`processes_in`] `dir`: those whose parent is not one of them.
/// A sandboxed runner is one tree (bwrap, and for a moment while its sandbox is set up,
/// bwrap's own processes, which still stand in the revision's directory).
pub fn process_trees_in(dir: &Path) -> usize {
    let pids = processes_in(dir);
    pids.iter().filter(|pid| parent(**pid).is_none_or(|p| !pids.contains(&p))).count()
}

/// The parent of `pid`.
fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

/// Whether `pid` is a process that has not ended.
pub fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // The state follows the command name, which is in parentheses and may hold spaces.
    stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()).is_some_and(|state| state != "Z")
}

/// The resident memory of `pid`, in KiB.
pub fn resident_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// How many files `pid` has open.
pub fn open_files(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// Checks the server's store. SQLite is checked as SQLite itself does: every page and
/// index (`integrity_check`) and every foreign key. PostgreSQL enforces its constraints
/// itself and recovers from its own log, so what is left to see is that it answers and
/// that every table of the store reads.
pub fn check_store(server: &TestServer) -> anyhow::Result<()> {
    let Some(url) = server.database_url() else { return check_sqlite(&server.data_dir()) };
    let tables = ["teams", "keys", "secrets", "apps", "revisions", "history", "queue_requests", "queue_attempts"];
    let sql: String = tables.iter().map(|t| format!("SELECT count(*) FROM {t};")).collect();
    let out = std::process::Command::new("psql")
        .arg(url)
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", &sql])
        .output()
        .context("cannot run psql")?;
    if !out.status.success() {
        bail!("PostgreSQL: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn check_sqlite(data_dir: &Path) -> anyhow::Result<()> {
    let path = data_dir.join("hangar.db");
    let db = rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("cannot open {}", path.display()))?;
    db.busy_timeout(Duration::from_secs(10))?;
    let integrity: Vec<String> =
        db.prepare("PRAGMA integrity_check")?.query_map([], |row| row.get(0))?.collect::<Result<_, _>>()?;
    if integrity != ["ok"] {
        bail!("integrity_check: {}", integrity.join("; "));
    }
    let broken = db.prepare("PRAGMA foreign_key_check")?.query_map([], |_| Ok(()))?.count();
    if broken > 0 {
        bail!("foreign_key_check: {broken} rows point at nothing");
    }
    Ok(())
}

/// The test app as `name`, with `extra` manifest lines; `generation` goes into its
/// environment, so that every generation is a revision of its own.
pub fn testapp(server_bin: &str, name: &str, generation: u64, extra: &str) -> AppDir {
    let command = testkit::testapp_bin(server_bin);
    AppDir::new(&format!(
        "name = \"{name}\"\ncommand = [{:?}]\nenv = {{ GENERATION = \"{generation}\", QUIET = \"1\" }}\n{extra}",
        command.display().to_string()
    ))
}

/// The revisions of `app`, all of them, as the API lists them.
pub fn revisions(http: &testkit::Http, server: &TestServer, app: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let url = format!("{}/v1/apps/{app}/revisions?all=true", server.api_url);
    let reply = http.get(&url, Some(&server.root_key));
    if reply.status != 200 {
        bail!("listing the revisions of {app} gave {}: {}", reply.status, reply.text());
    }
    let list: Vec<serde_json::Value> = serde_json::from_slice(&reply.body)?;
    Ok(list)
}
