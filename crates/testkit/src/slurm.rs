//! A real, private Slurm cluster for tests: [`SlurmCluster`] runs
//! `scripts/slurm/cluster.sh` in a temporary directory (one munged, one slurmctld
//! and three slurmd on 127.0.0.1: `n1` with `gpu:2`, `n2` and `n3` with `gpu:1`,
//! all in one partition), hands out Slurm commands pointed at it, and stops it
//! when dropped. See `scripts/slurm/README.md` for what the cluster is and how it
//! behaves.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::cluster::ClusterDir;

/// A running private Slurm cluster with its own directory.
pub struct SlurmCluster {
    cluster: ClusterDir,
}

/// One job as `squeue` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub id: String,
    pub name: String,
    /// Slurm's long state name: `PENDING`, `RUNNING`, `COMPLETED`, `NODE_FAIL`, …
    pub state: String,
    /// Why the job is pending or ended as it did (`Resources`, `BeginTime`,
    /// `NodeDown`, …); `None` when there is no reason.
    pub reason: String,
    /// The nodes the job runs or ran on, empty while it has none.
    pub node: String,
}

impl SlurmCluster {
    /// Starts a cluster and waits until its three nodes are idle. Fails the test with
    /// the script's output if it does not start.
    pub fn start() -> SlurmCluster {
        // The munge socket lives in the directory.
        SlurmCluster { cluster: ClusterDir::start("slurm", "hs-", "log/slurmctld.log", |_| {}) }
    }

    /// The cluster's directory: its config, logs (`log/`) and `pids`.
    pub fn dir(&self) -> &Path {
        self.cluster.path()
    }

    /// What `DIR/env` exports: `SLURM_CONF`, `HANGAR_SLURM_PARTITION`,
    /// `HANGAR_SLURM_NODES` and the like.
    pub fn env(&self) -> &[(String, String)] {
        self.cluster.env()
    }

    /// The path of the cluster's `slurm.conf` (`SLURM_CONF`), all that a Slurm client
    /// needs to find it.
    pub fn conf(&self) -> String {
        self.var("SLURM_CONF")
    }

    /// A `hangar server` whose runners are jobs of this cluster, with extra flags. The
    /// server must be dropped before the cluster (declare it after).
    pub fn server(&self, bin: &str, extra_args: &[&str]) -> crate::TestServer {
        let config = self.dir().join("hangar.toml");
        let node_dir = self.dir().join("node");
        std::fs::write(
            &config,
            format!(
                "runner_backend = \"slurm\"\n[slurm]\npartition = {:?}\nnode_dir = {:?}\n",
                self.partition(),
                node_dir.display().to_string()
            ),
        )
        .expect("cannot write the server's config");
        let config = config.display().to_string();
        let args = [&["--config", config.as_str()], extra_args].concat();
        crate::TestServer::start_with_env(bin, &args, &[("SLURM_CONF".to_owned(), self.conf())])
    }

    /// The partition that holds every node (also the default one).
    pub fn partition(&self) -> String {
        self.var("HANGAR_SLURM_PARTITION")
    }

    /// A command (`sbatch`, `squeue`, `scontrol`, `scancel`, `sinfo`, …) that talks to
    /// this cluster. It runs in the cluster's directory, because a batch job writes
    /// its `slurm-ID.out` where it was submitted unless told otherwise.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command.envs(self.env().iter().map(|(k, v)| (k, v))).current_dir(self.dir()).stdin(Stdio::null());
        command
    }

    /// Every job that `squeue` knows, in any state. A job that has ended stays listed
    /// for `MinJobAge` (5 s) after it ends, then it is gone.
    pub fn jobs(&self) -> Vec<Job> {
        self.squeue("all")
    }

    /// The jobs that are waiting or running: pending, running, configuring or
    /// completing.
    pub fn live_jobs(&self) -> Vec<Job> {
        self.squeue("PENDING,RUNNING,CONFIGURING,COMPLETING")
    }

    /// Sets `node` DOWN at once, as an admin would. Its running jobs are requeued, or
    /// end in `NODE_FAIL` if submitted with `--no-requeue`; it stays down until
    /// [`resume_node`](Self::resume_node).
    pub fn set_node_down(&self, node: &str) {
        self.run_ok("scontrol", &["update", &format!("nodename={node}"), "state=down", "reason=test"]);
    }

    /// Brings `node` back into service after [`set_node_down`](Self::set_node_down).
    pub fn resume_node(&self, node: &str) {
        self.run_ok("scontrol", &["update", &format!("nodename={node}"), "state=resume"]);
    }

    fn squeue(&self, states: &str) -> Vec<Job> {
        let out = self.run_ok("squeue", &["-h", "-t", states, "-o", "%i|%j|%T|%r|%N"]);
        out.lines().filter(|line| !line.trim().is_empty()).map(parse_job).collect()
    }

    /// Runs `program` with `args` against this cluster and returns its stdout; fails
    /// the test with its stderr unless it succeeds.
    #[track_caller]
    fn run_ok(&self, program: &str, args: &[&str]) -> String {
        let out = self.command(program).args(args).output().unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {} failed ({}):\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn var(&self, key: &str) -> String {
        self.cluster.var(key)
    }
}

/// One line of `squeue -o '%i|%j|%T|%r|%N'`. The name is the only field that can
/// hold a `|`, so it is what lies between the first and the last three.
fn parse_job(line: &str) -> Job {
    let (id, rest) = line.split_once('|').unwrap_or((line, ""));
    let tail: Vec<&str> = rest.rsplitn(4, '|').collect();
    let [node, reason, state, name] = tail[..] else {
        panic!("not a line of squeue -o '%i|%j|%T|%r|%N': {line:?}");
    };
    Job {
        id: id.trim().to_owned(),
        name: name.to_owned(),
        state: state.trim().to_owned(),
        reason: reason.trim().to_owned(),
        node: node.trim().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squeue_lines() {
        let job = |id: &str, name: &str, state: &str, reason: &str, node: &str| Job {
            id: id.into(),
            name: name.into(),
            state: state.into(),
            reason: reason.into(),
            node: node.into(),
        };
        assert_eq!(parse_job("5|kit-test|COMPLETED|None|n1"), job("5", "kit-test", "COMPLETED", "None", "n1"));
        assert_eq!(parse_job("6|wait|PENDING|Resources|"), job("6", "wait", "PENDING", "Resources", ""));
        assert_eq!(parse_job("7|a|b|RUNNING|None|n[1-2]"), job("7", "a|b", "RUNNING", "None", "n[1-2]"));
    }

    #[test]
    #[should_panic(expected = "not a line of squeue")]
    fn a_short_squeue_line() {
        parse_job("5|kit-test|COMPLETED");
    }
}
