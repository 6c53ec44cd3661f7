//! Process groups and the pid files that let a restarted server end a crashed run's
//! leftovers.

use std::path::Path;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// Sends SIGKILL to the process group `pgid`. A group that is already gone is fine.
pub(crate) fn kill_group(pgid: u32) {
    signal_group(pgid, Signal::SIGKILL);
}

/// Sends `signal` to the process group `pgid`, if it still exists.
pub(crate) fn signal_group(pgid: u32, signal: Signal) {
    if let Ok(pgid) = i32::try_from(pgid)
        && pgid > 1
    {
        let _ = killpg(Pid::from_raw(pgid), signal);
    }
}

/// Ends the process group recorded in `pid_file` by an earlier run of the server, if
/// it still runs, and removes the file. The group is only killed if its leader's
/// working directory is inside `dir`, so a pid that the system has since given to an
/// unrelated process is left alone. Returns whether something was killed.
pub fn end_leftover(pid_file: &Path, dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(pid_file) else { return false };
    let _ = std::fs::remove_file(pid_file);
    let Ok(pid) = text.trim().parse::<u32>() else { return false };
    let Ok(cwd) = std::fs::read_link(format!("/proc/{pid}/cwd")) else { return false };
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_owned());
    if !cwd.starts_with(&dir) {
        return false;
    }
    tracing::warn!(pid, dir = %dir.display(), "ending a process left behind by an earlier server run");
    kill_group(pid);
    true
}
