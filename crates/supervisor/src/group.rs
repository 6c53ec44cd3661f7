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

/// Reads the pid of a sandbox's first process from bwrap's info pipe, on the blocking
/// pool: `None` if bwrap ended without telling it.
pub(crate) fn read_child_pid(info: std::os::fd::OwnedFd) -> tokio::task::JoinHandle<Option<u32>> {
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut file = std::fs::File::from(info);
        let mut text = String::new();
        let mut buf = [0u8; 512];
        loop {
            match file.read(&mut buf) {
                Ok(0) | Err(_) => return None,
                Ok(n) => {
                    text.push_str(&String::from_utf8_lossy(&buf[..n]));
                    if let Some(pid) = crate::sandbox::parse_child_pid(&text).filter(|_| text.contains('}')) {
                        return Some(pid);
                    }
                }
            }
        }
    })
}

/// The process group of `pid`, from `/proc`.
fn process_group(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The process group is the third field after the command name.
    stat.rsplit_once(')')?.1.split_whitespace().nth(2)?.parse::<u32>().ok()
}

/// The children of `pid`, from `/proc`: each is listed under the thread that started it.
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| list.split_whitespace().filter_map(|c| c.parse::<u32>().ok()).collect::<Vec<_>>())
        .collect()
}

/// Sends `signal` to every child of `pid` (in a sandbox: the processes its reaper
/// looks after, which are the app's).
pub(crate) fn signal_children(pid: u32, signal: Signal) {
    for child in children(pid) {
        if let Ok(child) = i32::try_from(child) {
            let _ = nix::sys::signal::kill(Pid::from_raw(child), signal);
        }
    }
}

/// Ends a sandbox by killing its first process, the init of its pid namespace: the
/// kernel then kills every process in the namespace, however it forked or whichever
/// session it made. `pgid` is the group the sandbox was started in; a pid that no
/// longer belongs to it (reused by the system) is left alone.
pub(crate) fn kill_sandbox(first: u32, pgid: u32) {
    if process_group(first) == Some(pgid)
        && let Ok(first) = i32::try_from(first)
    {
        let _ = nix::sys::signal::kill(Pid::from_raw(first), Signal::SIGKILL);
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

/// The variable that names the revision in the environment of every process the
/// supervisor starts for it (builds and runners).
pub const REVISION_VAR: &str = "HANGAR_REVISION";

/// Ends every process left from an earlier run of the server that started it for one of
/// the revisions under `revisions` (a directory per revision id), found by the
/// [`REVISION_VAR`] in its environment, with its whole process group. This finds what
/// pid files cannot: a process started in the moment before the server that started
/// it was killed, before its pid file was written. Revision ids are unique, so no
/// process of another server, or anything else, is touched. Call it before starting
/// anything. Returns how many were ended.
pub fn end_strays(revisions: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(revisions) else { return 0 };
    let ours: std::collections::HashSet<String> =
        entries.flatten().filter_map(|e| e.file_name().into_string().ok()).collect();
    if ours.is_empty() {
        return 0;
    }
    let Ok(processes) = std::fs::read_dir("/proc") else { return 0 };
    let me = std::process::id();
    let mut ended = 0;
    for pid in processes.flatten().filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok()) {
        if pid == me {
            continue;
        }
        // Other users' processes cannot be read, and are not ours anyway.
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else { continue };
        let revision = environ
            .split(|b| *b == 0)
            .find_map(|var| var.strip_prefix(REVISION_VAR.as_bytes())?.strip_prefix(b"="))
            .and_then(|id| std::str::from_utf8(id).ok());
        if !revision.is_some_and(|id| ours.contains(id)) {
            continue;
        }
        let pgid = process_group(pid);
        tracing::warn!(pid, revision, "ending a process left behind by an earlier server run");
        if let Some(pgid) = pgid.filter(|g| *g != nix::unistd::getpgrp().as_raw() as u32) {
            kill_group(pgid);
        }
        if let Ok(pid) = i32::try_from(pid) {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        ended += 1;
    }
    ended
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
        pending.extend(children(pid));
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strays_of_this_servers_revisions_are_ended_and_others_left_alone() {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        let (ours, theirs) = (uuid_like(1), uuid_like(2));
        std::fs::create_dir_all(dir.path().join(&ours)).unwrap();
        let start = |revision: &str| {
            std::process::Command::new("sleep").arg("60").env(REVISION_VAR, revision).process_group(0).spawn().unwrap()
        };
        let (mut stray, mut other) = (start(&ours), start(&theirs));
        // Until it has called exec, a child shows its parent's environment: wait until
        // both show their own.
        for (child, revision) in [(&stray, &ours), (&other, &theirs)] {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            let var = format!("{REVISION_VAR}={revision}").into_bytes();
            while !std::fs::read(format!("/proc/{}/environ", child.id()))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == var.as_slice()))
            {
                assert!(std::time::Instant::now() < deadline, "the test's process never started");
                std::thread::yield_now();
            }
        }

        assert_eq!(end_strays(dir.path()), 1);
        let status = stray.wait().unwrap();
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9));
        assert!(other.try_wait().unwrap().is_none(), "a process of another revision was touched");
        other.kill().unwrap();
        other.wait().unwrap();
    }

    /// A made-up revision id, unique to this test run.
    fn uuid_like(n: u32) -> String {
        format!("{:08x}-test-{n}-{}", std::process::id(), std::time::UNIX_EPOCH.elapsed().unwrap().as_nanos())
    }
}
