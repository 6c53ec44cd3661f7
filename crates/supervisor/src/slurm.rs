//! What hangar says to Slurm and reads back from it, through its commands (`sbatch`,
//! `squeue`, `scancel`): the arguments that ask for a runner's resources, and the state
//! of the jobs hangar submitted. The backend that drives runners as jobs builds on this.
//!
//! The commands rather than slurmrestd: they come with every Slurm install (the
//! `slurm-client` package), authenticate through the cluster's munge like any user's
//! command, and their text output is stable across versions, where slurmrestd needs a
//! daemon, tokens, and an OpenAPI version per Slurm release.

use std::collections::BTreeMap;

/// The prefix of the name of every job hangar submits; the rest is the runner's id.
pub const JOB_PREFIX: &str = "hangar-";

/// Where and how jobs are submitted: the `[slurm]` section of the server's config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlurmSettings {
    pub partition: String,
    pub account: Option<String>,
    pub qos: Option<String>,
    /// More `sbatch` arguments, given as they are.
    pub extra_args: Vec<String>,
}

/// What one runner asks of the cluster.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobRequest {
    /// The runner's id, in the job's name.
    pub runner: String,
    pub gpus: u32,
    /// Memory for the whole job, in MiB.
    pub memory_mb: Option<u64>,
    /// CPUs' worth of time; Slurm gives whole CPUs, so this is rounded up.
    pub cpus: Option<f64>,
}

impl JobRequest {
    /// The `sbatch` arguments for this runner under `settings` (the script comes after).
    pub fn sbatch_args(&self, settings: &SlurmSettings) -> Vec<String> {
        let mut args = vec![
            "--parsable".to_owned(),
            format!("--job-name={JOB_PREFIX}{}", self.runner),
            format!("--partition={}", settings.partition),
            // A lost runner is replaced by hangar, not rerun by Slurm.
            "--no-requeue".to_owned(),
            "--nodes=1".to_owned(),
            "--ntasks=1".to_owned(),
        ];
        if let Some(account) = &settings.account {
            args.push(format!("--account={account}"));
        }
        if let Some(qos) = &settings.qos {
            args.push(format!("--qos={qos}"));
        }
        if self.gpus > 0 {
            args.push(format!("--gres=gpu:{}", self.gpus));
        }
        if let Some(mb) = self.memory_mb {
            args.push(format!("--mem={mb}M"));
        }
        if let Some(cpus) = self.cpus {
            args.push(format!("--cpus-per-task={}", (cpus.ceil() as u64).max(1)));
        }
        args.extend(settings.extra_args.iter().cloned());
        args
    }
}

/// Where a job is, as `squeue` tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    /// Waiting in the cluster's queue, with Slurm's reason (`Resources`, `Priority`, …).
    Pending { reason: String },
    /// Started (or starting) on `node`.
    Running { node: String },
    /// Done, failed, cancelled, preempted, or its node failed: the runner is lost.
    Ended { state: String, reason: String },
}

/// The jobs of hangar's runners in the output of
/// `squeue -h -o '%i|%j|%T|%r|%N'`, by runner id. Other users' jobs, and lines that do
/// not parse, are left out.
pub fn parse_squeue(text: &str) -> BTreeMap<String, (String, JobState)> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.trim().splitn(5, '|');
            let (job, name, state, reason, node) =
                (fields.next()?, fields.next()?, fields.next()?, fields.next()?, fields.next().unwrap_or(""));
            let runner = name.strip_prefix(JOB_PREFIX)?;
            if job.is_empty() || runner.is_empty() {
                return None;
            }
            let reason = if reason == "None" { String::new() } else { reason.to_owned() };
            let state = match state {
                "PENDING" | "REQUEUED" | "REQUEUE_HOLD" | "RESV_DEL_HOLD" | "SUSPENDED" => JobState::Pending { reason },
                "RUNNING" | "CONFIGURING" => JobState::Running { node: node.to_owned() },
                other => JobState::Ended { state: other.to_owned(), reason },
            };
            Some((runner.to_owned(), (job.to_owned(), state)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runner_asks_for_its_gpus_memory_and_cpus() {
        let settings = SlurmSettings {
            partition: "gpu".to_owned(),
            account: Some("ml".to_owned()),
            qos: None,
            extra_args: vec!["--time=1-00:00:00".to_owned()],
        };
        let cases = [
            (JobRequest { runner: "r1".to_owned(), ..JobRequest::default() }, vec![]),
            (
                JobRequest { runner: "r2".to_owned(), gpus: 2, memory_mb: Some(16000), cpus: Some(1.5) },
                vec!["--gres=gpu:2", "--mem=16000M", "--cpus-per-task=2"],
            ),
            (
                JobRequest { runner: "r3".to_owned(), cpus: Some(0.25), ..JobRequest::default() },
                vec!["--cpus-per-task=1"],
            ),
        ];
        for (request, resources) in cases {
            let args = request.sbatch_args(&settings);
            let mut want = vec![
                "--parsable".to_owned(),
                format!("--job-name=hangar-{}", request.runner),
                "--partition=gpu".to_owned(),
                "--no-requeue".to_owned(),
                "--nodes=1".to_owned(),
                "--ntasks=1".to_owned(),
                "--account=ml".to_owned(),
            ];
            want.extend(resources.into_iter().map(str::to_owned));
            want.push("--time=1-00:00:00".to_owned());
            assert_eq!(args, want, "{request:?}");
        }
    }

    #[test]
    fn squeue_lines_become_runner_states() {
        let text = "\
101|hangar-r1|PENDING|Resources|
102|hangar-r2|RUNNING|None|n2
103|hangar-r3|NODE_FAIL|NodeDown|n1
104|train-big|RUNNING|None|n3
105|hangar-r5|CANCELLED|None|
106|hangar-r6|PREEMPTED|None|n1
not a line
107|hangar-|RUNNING|None|n1
";
        let jobs = parse_squeue(text);
        let want: BTreeMap<String, (String, JobState)> = [
            ("r1", "101", JobState::Pending { reason: "Resources".to_owned() }),
            ("r2", "102", JobState::Running { node: "n2".to_owned() }),
            ("r3", "103", JobState::Ended { state: "NODE_FAIL".to_owned(), reason: "NodeDown".to_owned() }),
            ("r5", "105", JobState::Ended { state: "CANCELLED".to_owned(), reason: String::new() }),
            ("r6", "106", JobState::Ended { state: "PREEMPTED".to_owned(), reason: String::new() }),
        ]
        .into_iter()
        .map(|(runner, job, state)| (runner.to_owned(), (job.to_owned(), state)))
        .collect();
        assert_eq!(jobs, want);
    }
}
