//! Running an app's `build` command for a new revision.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::cgroup::{DEFAULT_PIDS_LIMIT, Limits};
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
    /// Stdout and stderr are appended here, up to `log_limit` bytes; past that the log
    /// says where it was cut, and the rest of the output is dropped.
    pub log: &'a Path,
    pub log_limit: u64,
    /// Names the build's cgroup (unique among the builds running on the machine).
    pub name: String,
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
    // A fork bomb in a build stays in its own cgroup, as a runner's does.
    let limits = Limits { pids: Some(DEFAULT_PIDS_LIMIT), ..Limits::default() };
    let group = spec.sandbox.group(&group_name(&spec.name), &limits)?;
    // Stdout and stderr share one pipe, so that the log keeps their order.
    let (output, output_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let mut command = spec.sandbox.command(&wrapped, &spec.confinement.code, group.as_deref());
    command
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(output_write.try_clone()?)
        .stderr(output_write)
        .kill_on_drop(true);
    let started = Instant::now();
    let spawned = command.spawn();
    // The command holds the pipe's writing end: it goes, so that the log sees the end.
    drop(command);
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            if let Some(group) = group {
                group.remove(Duration::from_secs(1)).await;
            }
            return Ok(BuildOutcome::Failed { reason: format!("build command {program:?} could not be started: {e}") });
        }
    };
    let limit = spec.log_limit;
    let copy = tokio::task::spawn_blocking(move || copy_capped(std::fs::File::from(output), log, limit));
    wrapped.keep.clear();
    let pgid = child.id().unwrap_or(0);
    std::fs::write(spec.pid_file, pgid.to_string())?;
    // In a sandbox, the build starts once its network is up (package installs need it).
    let mut _network = None;
    if let (Some(info), Some(block)) = (wrapped.info.take(), wrapped.block.take()) {
        let started = spec.sandbox.start(pgid, info, block, group.clone()).await;
        if let Some(e) = started.error {
            let _ = child.wait().await;
            if let Some(group) = &group {
                group.remove(Duration::from_secs(5)).await;
            }
            let _ = std::fs::remove_file(spec.pid_file);
            return Ok(BuildOutcome::Failed { reason: format!("the build's sandbox could not start: {e}") });
        }
        _network = started.network;
    }
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
    if let Some(group) = group {
        group.remove(Duration::from_secs(5)).await;
    }
    // Everything that could write to the log has ended; what it wrote is in the log.
    if let Ok(Ok(Err(e))) = tokio::time::timeout(Duration::from_secs(5), copy).await {
        tracing::warn!(error = %e, "a build's output could not all be logged");
    }
    let _ = std::fs::remove_file(spec.pid_file);
    Ok(outcome)
}

/// The cgroup of the build named `name`.
fn group_name(name: &str) -> String {
    format!("hangar-build-{name}")
}

/// Ends whatever an interrupted build named `name` left in its cgroup, and removes it.
pub fn end_leftover_build(sandbox: &Sandbox, name: &str) {
    if let Some(cgroups) = sandbox.cgroups() {
        cgroups.end_leftover(&group_name(name));
    }
}

/// Copies `from` to `to` until `from` ends, keeping at most `limit` bytes; past that,
/// `to` says where it was cut and the rest is read and dropped (the build goes on).
fn copy_capped(mut from: impl std::io::Read, mut to: impl std::io::Write, limit: u64) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut kept = 0u64;
    let mut cut = false;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(kept),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let room = usize::try_from(limit - kept).unwrap_or(usize::MAX).min(n);
        to.write_all(&buf[..room])?;
        kept += room as u64;
        if room < n && !cut {
            cut = true;
            writeln!(
                to,
                "\n[hangar] the build log was cut here, at its limit of {limit} bytes; the build went on, \
                 and the rest of its output is not kept"
            )?;
        }
    }
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
                devices: Vec::new(),
            },
            env: vec![("PATH".to_owned(), "/usr/bin:/bin".to_owned()), ("GREETING".to_owned(), "hi".to_owned())],
            log: &dir.join("build.log"),
            log_limit: 1 << 20,
            name: "test".to_owned(),
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

    #[test]
    fn a_log_past_its_limit_says_where_it_was_cut_and_keeps_nothing_after() {
        let cases: [(&[u8], u64, &str); 3] = [
            (b"short", 100, "short"),
            (b"exactly10!", 10, "exactly10!"),
            (b"0123456789abcdef", 10, "0123456789\n[hangar] the build log was cut here, at its limit of 10 bytes"),
        ];
        for (input, limit, want) in cases {
            let mut log = Vec::new();
            let kept = copy_capped(input, &mut log, limit).unwrap();
            let log = String::from_utf8(log).unwrap();
            assert!(log.starts_with(want), "{log:?}");
            assert_eq!(kept, (input.len() as u64).min(limit));
            assert_eq!(log.matches("[hangar]").count(), usize::from(input.len() as u64 > limit));
        }
    }

    #[tokio::test]
    async fn a_chatty_build_is_logged_up_to_the_limit_and_still_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let spec = BuildSpec {
            command: &sh("yes building | head -c 100000; echo done >&2"),
            sandbox: &Sandbox::none(),
            confinement: Confinement {
                uid: 0,
                code: dir.path().to_owned(),
                code_writable: true,
                cache: None,
                home_cache: None,
                devices: Vec::new(),
            },
            env: vec![("PATH".to_owned(), "/usr/bin:/bin".to_owned())],
            log: &dir.path().join("build.log"),
            log_limit: 1000,
            name: "chatty".to_owned(),
            pid_file: &dir.path().join("build.pid"),
            timeout: Duration::from_secs(30),
        };
        let out = run_build(spec, CancellationToken::new()).await.unwrap();
        assert!(matches!(out, BuildOutcome::Succeeded { .. }), "{out:?}");
        let log = std::fs::read_to_string(dir.path().join("build.log")).unwrap();
        assert!(log.starts_with("building\nbuilding\n"), "{log}");
        assert!(log.contains("cut here, at its limit of 1000 bytes"), "{log}");
        assert!(!log.contains("done"), "{log}");
        assert!(log.len() < 1200, "{} bytes", log.len());
    }
}
