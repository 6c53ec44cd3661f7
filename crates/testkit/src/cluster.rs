//! What the private clusters for tests ([`crate::slurm`], [`crate::pg`]) share: a short
//! temporary directory that `scripts/<kind>/cluster.sh start` fills, the variables its
//! `env` file exports, and the stop, by the script and so by PID, when dropped.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A running cluster's directory.
pub(crate) struct ClusterDir {
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
    /// `slurm` or `pg`: which `scripts/<kind>/cluster.sh` runs it.
    kind: &'static str,
    /// The log, under the directory, whose tail a failing test shows.
    log: &'static str,
}

impl ClusterDir {
    /// Makes the directory (in /tmp whatever TMPDIR says, named `<prefix>XXXXXX`: a unix
    /// socket lives in it, and a socket's path is short), lets `prepare` set it up, and
    /// starts the cluster in it. Fails the test with the script's output if it does not
    /// start.
    pub(crate) fn start(
        kind: &'static str,
        prefix: &str,
        log: &'static str,
        prepare: impl FnOnce(&Path),
    ) -> ClusterDir {
        let dir = tempfile::Builder::new().prefix(prefix).tempdir_in("/tmp").expect("cannot make a temp dir");
        assert!(dir.path().as_os_str().len() <= 40, "the cluster's dir is too long: {}", dir.path().display());
        prepare(dir.path());
        let out = Command::new(script(kind))
            .arg("start")
            .arg(dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run scripts/{kind}/cluster.sh: {e}"));
        assert!(
            out.status.success(),
            "scripts/{kind}/cluster.sh start {} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            dir.path().display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        let env_file = dir.path().join("env");
        let text =
            std::fs::read_to_string(&env_file).unwrap_or_else(|e| panic!("cannot read {}: {e}", env_file.display()));
        ClusterDir { env: parse_env(&text), dir, kind, log }
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    /// What the `env` file exports.
    pub(crate) fn env(&self) -> &[(String, String)] {
        &self.env
    }

    /// One variable of the `env` file, which must be there.
    pub(crate) fn var(&self, key: &str) -> String {
        let value = self.env.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        value.unwrap_or_else(|| panic!("{} has no {key}", self.dir.path().join("env").display()))
    }
}

impl Drop for ClusterDir {
    /// Stops the cluster and waits until it has. A failure to stop is reported, not
    /// raised, so that it does not hide the test's own failure.
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A failing test shows what the cluster said, which is otherwise lost with the
            // temporary directory.
            let log = std::fs::read_to_string(self.dir.path().join(self.log)).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!("--- the last lines of {} ---", self.log);
            for line in &lines[lines.len().saturating_sub(50)..] {
                eprintln!("{line}");
            }
        }
        let kind = self.kind;
        let out = Command::new(script(kind)).arg("stop").arg(self.dir.path()).stdin(Stdio::null()).output();
        match out {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "scripts/{kind}/cluster.sh stop {} failed ({}):\n{}",
                self.dir.path().display(),
                out.status,
                String::from_utf8_lossy(&out.stderr),
            ),
            Err(e) => eprintln!("cannot run scripts/{kind}/cluster.sh stop: {e}"),
        }
    }
}

fn script(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../../scripts/{kind}/cluster.sh"))
}

/// The `export KEY=VALUE` lines of a cluster's `env` file.
pub(crate) fn parse_env(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("export ")?.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_lines() {
        let env = parse_env("export SLURM_CONF=/tmp/hs-1/slurm.conf\nexport HANGAR_SLURM_NODES=n1,n2,n3\n\n");
        assert_eq!(
            env,
            [
                ("SLURM_CONF".to_owned(), "/tmp/hs-1/slurm.conf".to_owned()),
                ("HANGAR_SLURM_NODES".to_owned(), "n1,n2,n3".to_owned()),
            ]
        );
    }
}
