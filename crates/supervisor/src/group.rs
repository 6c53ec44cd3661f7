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

/// The resident memory, in bytes, of the process `pid` and every process descended from
/// it, read from `/proc`. Processes that end while they are being read count as nothing.
pub(crate) fn resident_memory(pid: u32) -> u64 {
    use nix::unistd::{SysconfVar, sysconf};
    let page = sysconf(SysconfVar::PAGE_SIZE).ok().flatten().map_or(4096, |p| p as u64);
    let mut total = 0;
    let mut pending = vec![pid];
    // A process cannot be its own descendant, but pids are reused: the bound keeps a
    // race with a reused pid from looping.
    let mut seen = std::collections::HashSet::new();
    while let Some(pid) = pending.pop() {
        if pid == 0 || !seen.insert(pid) || seen.len() > 10_000 {
            continue;
        }
        // The fields after the command name, which is in parentheses and may hold
        // spaces: rss (in pages) is the 24th field of the line, so the 22nd here.
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            && let Some((_, rest)) = stat.rsplit_once(')')
            && let Some(pages) = rest.split_whitespace().nth(21).and_then(|v| v.parse::<u64>().ok())
        {
            total += pages * page;
        }
        // Children are listed under the thread that started them.
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { continue };
        for task in tasks.flatten() {
            if let Ok(children) = std::fs::read_to_string(task.path().join("children")) {
                pending.extend(children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
            }
        }
    }
    total
}
