//! Running an app's `build` command for a new revision.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::group::kill_group;
use crate::sandbox::{Confinement, Sandbox};

/// What to run, where, and where its output goes.
#[derive(Debug)]
pub struct BuildSpec<'a> {
    pub command: &'a [String],
    pub sandbox: &'a Sandbox,
    /// The revision's directory (writable: the command runs there and may change it),
    /// the uid, and the team's build cache.
    pub confinement: Confinement,
    /// The complete environment of the command (nothing is inherited).
    pub env: Vec<(String, String)>,
    /// Stdout and stderr are appended here.
    pub log: &'a Path,
    /// Holds the process group id while the build runs.
    pub pid_file: &'a Path,
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildOutcome {
    Succeeded {
        elapsed: Duration,
    },
    /// The build could not start, exited unsuccessfully or ran out of time; the reason
    /// says which, in words for the user.
    Failed {
        reason: String,
    },
    /// The server is shutting down; the build was stopped.
    Cancelled,
}

/// Runs the build to completion, its timeout, or `cancel`. Whatever the outcome, no
/// process of the build's group is left running afterwards.
pub async fn run_build(spec: BuildSpec<'_>, cancel: CancellationToken) -> std::io::Result<BuildOutcome> {
    let Some(program) = spec.command.first() else {
        return Ok(BuildOutcome::Failed { reason: "the build command is empty".to_owned() });
    };
    let log = std::fs::OpenOptions::new().create(true).append(true).open(spec.log)?;
    let mut wrapped = spec.sandbox.wrap(spec.command, &spec.confinement)?;
    let mut command = spec.sandbox.command(&wrapped, &spec.confinement.code);
    command
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true);
    let started = Instant::now();
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            return Ok(BuildOutcome::Failed { reason: format!("build command {program:?} could not be started: {e}") });
        }
    };
    wrapped.keep.clear();
    let pgid = child.id().unwrap_or(0);
    std::fs::write(spec.pid_file, pgid.to_string())?;
    // In a sandbox, the build starts once its network is up (package installs need it).
    let _network = match (wrapped.info.take(), wrapped.block.take()) {
        (Some(info), Some(block)) => match crate::group::read_child_pid(info).await.ok().flatten() {
            Some(pid) => match spec.sandbox.connect_network(pid, pgid, block).await {
                Ok(network) => Some(network),
                Err(e) => {
                    kill_group(pgid);
                    let _ = child.wait().await;
                    let _ = std::fs::remove_file(spec.pid_file);
                    return Ok(BuildOutcome::Failed { reason: format!("the build's sandbox got no network: {e}") });
                }
            },
            // bwrap ended before it started the sandbox; waiting says how.
            None => None,
        },
        _ => None,
    };
    let outcome = tokio::select! {
        status = child.wait() => {
            let status = status?;
            if status.success() {
                BuildOutcome::Succeeded { elapsed: started.elapsed() }
            } else {
                BuildOutcome::Failed { reason: format!("build command failed ({status}); see the build log") }
            }
        }
        () = tokio::time::sleep(spec.timeout) => BuildOutcome::Failed {
            reason: format!("build timed out after {:?}", spec.timeout),
        },
        () = cancel.cancelled() => BuildOutcome::Cancelled,
    };
    // Also ends anything the build left running in the background.
    kill_group(pgid);
    let _ = child.wait().await;
    let _ = std::fs::remove_file(spec.pid_file);
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Vec<String> {
        vec!["/bin/sh".to_owned(), "-c".to_owned(), script.to_owned()]
    }

    async fn build(dir: &Path, command: &[String], timeout: Duration) -> BuildOutcome {
        let spec = BuildSpec {
            command,
            sandbox: &Sandbox::none(),
            confinement: Confinement {
                uid: 0,
                code: dir.to_owned(),
                code_writable: true,
                cache: None,
                home_cache: None,
            },
            env: vec![("PATH".to_owned(), "/usr/bin:/bin".to_owned()), ("GREETING".to_owned(), "hi".to_owned())],
            log: &dir.join("build.log"),
            pid_file: &dir.join("build.pid"),
            timeout,
        };
        run_build(spec, CancellationToken::new()).await.unwrap()
    }

    #[tokio::test]
    async fn success_logs_output_and_sees_only_the_given_env() {
        let dir = tempfile::tempdir().unwrap();
        let out = build(dir.path(), &sh("echo $GREETING; echo ${HOME:-nohome} >&2"), Duration::from_secs(30)).await;
        assert!(matches!(out, BuildOutcome::Succeeded { .. }), "{out:?}");
        assert_eq!(std::fs::read_to_string(dir.path().join("build.log")).unwrap(), "hi\nnohome\n");
        assert!(!dir.path().join("build.pid").exists());
    }

    #[tokio::test]
    async fn failure_and_missing_program_and_timeout_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let out = build(dir.path(), &sh("exit 3"), Duration::from_secs(30)).await;
        assert_eq!(
            out,
            BuildOutcome::Failed { reason: "build command failed (exit status: 3); see the build log".to_owned() }
        );
        let out = build(dir.path(), &["/nonexistent/tool".to_owned()], Duration::from_secs(30)).await;
        assert!(matches!(&out, BuildOutcome::Failed { reason } if reason.contains("could not be started")), "{out:?}");
        let out = build(dir.path(), &sh("sleep 30"), Duration::from_millis(200)).await;
        assert_eq!(out, BuildOutcome::Failed { reason: "build timed out after 200ms".to_owned() });
    }
}
