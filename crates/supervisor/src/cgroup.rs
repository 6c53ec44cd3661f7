//! Kernel-enforced limits: every runner and build in a cgroup of its own, under the
//! server's, with its machine type's memory limit, a limit on its number of processes
//! and, where the machine type says so, a CPU quota.
//!
//! The kernel's interface is the cgroup filesystem, and that is all this uses: a
//! directory per group and per hierarchy, a few files written to set its limits and
//! read to see them hit. Both layouts are supported:
//!
//! - **v1** (one hierarchy per controller, as on this project's own machines): a group
//!   is a directory in each of the `memory`, `pids` and `cpu` hierarchies, under the
//!   server's own cgroup there.
//! - **v2** (the unified hierarchy, the default of current distributions): one
//!   directory. The kernel lets only a cgroup without processes of its own hand
//!   controllers to its children, so the server first moves itself into a leaf
//!   (`<its cgroup>/hangar-server`) and enables the controllers on its own cgroup, the
//!   way a delegated systemd service does.
//!
//! A process joins its group before anything of the app runs: in a sandbox, bwrap's
//! process inside it is moved while it waits to be let go ([`Group::join`]); without
//! one, the process writes `0` to the group's `cgroup.procs`, opened beforehand, between
//! fork and exec. Everything the app starts, however it forks, is in the group from its
//! first instruction, and a fork bomb meets the pids limit inside it.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// What a group may use. `None` is no limit of that kind.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    /// Memory, in bytes, for all its processes together (swap included, where there is swap).
    pub memory: Option<u64>,
    /// Processes and threads, all of them together.
    pub pids: Option<u64>,
    /// CPUs' worth of time per second (`1.5`: one and a half CPUs).
    pub cpus: Option<f64>,
}

/// The processes a group holds (and threads) when nobody says: a fork bomb stops here,
/// and a model server's thread pools, sized by the machine's cores, fit well below it.
pub const DEFAULT_PIDS_LIMIT: u64 = 4096;

/// The period CPU quotas are counted over, in microseconds (the kernel's default).
const CPU_PERIOD_US: u64 = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

impl Version {
    pub fn name(self) -> &'static str {
        match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        }
    }
}

/// Where this server makes its groups.
#[derive(Debug, Clone)]
pub struct Cgroups {
    version: Version,
    /// v1: the server's own cgroup in each hierarchy it can write; v2: its cgroup.
    memory: Option<PathBuf>,
    pids: Option<PathBuf>,
    cpu: Option<PathBuf>,
    /// Removals of groups whose last processes were still ending; awaited on shutdown.
    removals: tokio_util::task::TaskTracker,
}

/// How the names of the groups of runners and builds begin.
const GROUP_PREFIXES: [&str; 2] = ["hangar-runner-", "hangar-build-"];

/// The controllers groups are made with.
const CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

impl Cgroups {
    /// The cgroups of this machine, once it is clear that this server may make groups
    /// in them. The error says why not, for the log.
    pub fn detect() -> Result<Cgroups, String> {
        let own =
            std::fs::read_to_string("/proc/self/cgroup").map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
        let mounts = parse_mounts(&mounts);
        let own = parse_own(&own);
        let cgroups = match v2_dir(&own, &mounts) {
            Some(dir) => Cgroups::v2(dir)?,
            None => Cgroups::v1(&own, &mounts)?,
        };
        cgroups.probe()?;
        Ok(cgroups)
    }

    fn v1(own: &[(Vec<String>, String)], mounts: &[CgroupMount]) -> Result<Cgroups, String> {
        let dir = |controller: &str| {
            let (_, path) = own.iter().find(|(controllers, _)| controllers.iter().any(|c| c == controller))?;
            let mount = mounts.iter().find(|m| !m.v2 && m.options.iter().any(|o| o == controller))?;
            Some(mount.dir_of(path))
        };
        let cgroups = Cgroups {
            version: Version::V1,
            memory: dir("memory"),
            pids: dir("pids"),
            cpu: dir("cpu"),
            removals: Default::default(),
        };
        if cgroups.memory.is_none() && cgroups.pids.is_none() {
            return Err("the machine has neither a memory nor a pids cgroup controller".to_owned());
        }
        Ok(cgroups)
    }

    fn v2(dir: PathBuf) -> Result<Cgroups, String> {
        let available = read(&dir.join("cgroup.controllers"));
        let has = |c: &str| available.split_whitespace().any(|a| a == c);
        if !has("memory") || !has("pids") {
            return Err(format!("the memory and pids controllers are not delegated to {}", dir.display()));
        }
        let enabled = read(&dir.join("cgroup.subtree_control"));
        let missing: Vec<&str> =
            CONTROLLERS.iter().copied().filter(|c| has(c) && !enabled.split_whitespace().any(|e| e == *c)).collect();
        if !missing.is_empty() {
            // Only a cgroup without processes of its own may enable controllers for its
            // children: the server's processes move to a leaf first.
            let leaf = dir.join("hangar-server");
            std::fs::create_dir_all(&leaf).map_err(|e| format!("cannot create {}: {e}", leaf.display()))?;
            for pid in read(&dir.join("cgroup.procs")).split_whitespace() {
                // A process that ended meanwhile is no longer there to move.
                let _ = std::fs::write(leaf.join("cgroup.procs"), pid);
            }
            let change: Vec<String> = missing.iter().map(|c| format!("+{c}")).collect();
            std::fs::write(dir.join("cgroup.subtree_control"), change.join(" "))
                .map_err(|e| format!("cannot enable {} for {}: {e}", missing.join(", "), dir.display()))?;
        }
        let cpu = has("cpu").then(|| dir.clone());
        Ok(Cgroups {
            version: Version::V2,
            memory: Some(dir.clone()),
            pids: Some(dir),
            cpu,
            removals: Default::default(),
        })
    }

    /// Makes and removes a group, which is what every start will do.
    fn probe(&self) -> Result<(), String> {
        let group = self
            .create(&format!("hangar-probe-{}", std::process::id()), &Limits { pids: Some(16), ..Limits::default() })
            .map_err(|e| format!("cannot make a cgroup: {e}"))?;
        group.remove_now();
        Ok(())
    }

    pub fn version(&self) -> Version {
        self.version
    }

    /// Makes the group `name` with `limits`. The process that is to run in it joins it
    /// with [`Group::join_fds`].
    pub(crate) fn create(&self, name: &str, limits: &Limits) -> std::io::Result<Group> {
        let mut group =
            Group { dirs: Vec::new(), procs: Vec::new(), memory: None, pids: None, removals: self.removals.clone() };
        // On v1 a group is in only the hierarchies whose limits it has: each move of a
        // process into a cgroup can cost the kernel an RCU grace period.
        let at = |parent: &Option<PathBuf>, limited: bool| {
            parent.as_ref().filter(|_| limited || self.version == Version::V2).map(|p| p.join(name))
        };
        let memory = at(&self.memory, limits.memory.is_some());
        let pids = at(&self.pids, limits.pids.is_some());
        let cpu = at(&self.cpu, limits.cpus.is_some());
        for dir in [&memory, &pids, &cpu].into_iter().flatten() {
            if group.dirs.contains(dir) {
                continue;
            }
            match std::fs::create_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(std::io::Error::new(e.kind(), format!("{}: {e}", dir.display()))),
            }
            group.dirs.push(dir.clone());
        }
        match self.version {
            Version::V1 => {
                if let (Some(dir), Some(bytes)) = (&memory, limits.memory) {
                    write(dir, "memory.limit_in_bytes", bytes)?;
                    // Without swap accounting the file is not there, and swap is not counted.
                    let _ = write(dir, "memory.memsw.limit_in_bytes", bytes);
                }
                if let (Some(dir), Some(n)) = (&pids, limits.pids) {
                    write(dir, "pids.max", n)?;
                }
                if let (Some(dir), Some(cpus)) = (&cpu, limits.cpus) {
                    write(dir, "cpu.cfs_period_us", CPU_PERIOD_US)?;
                    write(dir, "cpu.cfs_quota_us", cpu_quota(cpus))?;
                }
                group.memory = memory.filter(|_| limits.memory.is_some()).map(|d| d.join("memory.oom_control"));
            }
            Version::V2 => {
                if let (Some(dir), Some(bytes)) = (&memory, limits.memory) {
                    write(dir, "memory.max", bytes)?;
                    let _ = write(dir, "memory.swap.max", 0);
                    // Over the limit, the whole group is killed, not one process of it.
                    let _ = write(dir, "memory.oom.group", 1);
                }
                if let Some(dir) = &pids {
                    write(dir, "pids.max", limits.pids.map_or("max".to_owned(), |n| n.to_string()))?;
                }
                if let (Some(dir), Some(cpus)) = (&cpu, limits.cpus) {
                    write(dir, "cpu.max", format!("{} {CPU_PERIOD_US}", cpu_quota(cpus)))?;
                }
                group.memory = memory.filter(|_| limits.memory.is_some()).map(|d| d.join("memory.events"));
            }
        }
        group.pids = pids.map(|d| d.join("pids.events"));
        for dir in &group.dirs {
            let procs = std::fs::OpenOptions::new().write(true).open(dir.join("cgroup.procs"))?;
            group.procs.push(procs.into());
        }
        Ok(group)
    }

    /// Ends whatever is left in the group `name` (of a server that was killed) and
    /// removes it. Returns how many processes were found in it.
    pub(crate) fn end_leftover(&self, name: &str) -> usize {
        let group = Group {
            dirs: self.parents().map(|p| p.join(name)).filter(|d| d.is_dir()).collect(),
            procs: Vec::new(),
            memory: None,
            pids: None,
            removals: self.removals.clone(),
        };
        let found = group.processes().len();
        group.kill_all();
        group.remove_now();
        found
    }

    /// Removes the empty groups of runners and builds that were made more than `age`
    /// ago: ones a server could not remove before it exited, while their last processes
    /// were still ending. A younger empty group may be one another server, sharing this
    /// cgroup, has just made for a process about to join it. Returns how many went.
    pub fn sweep_empty(&self, age: Duration) -> usize {
        let mut removed = 0;
        for parent in self.parents() {
            let Ok(entries) = std::fs::read_dir(parent) else { continue };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if !GROUP_PREFIXES.iter().any(|prefix| name.starts_with(prefix)) {
                    continue;
                }
                let old = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|made| made.elapsed().is_ok_and(|a| a >= age));
                // The kernel refuses to remove a group that still has processes.
                if old && std::fs::remove_dir(entry.path()).is_ok() {
                    removed += 1;
                }
            }
        }
        removed
    }

    /// Waits, at most `within`, for the groups still being removed to go: for a server
    /// that is about to exit, whose runners have all ended.
    pub async fn settle(&self, within: Duration) {
        self.removals.close();
        let _ = tokio::time::timeout(within, self.removals.wait()).await;
    }

    /// One directory per hierarchy groups are made in (v2: one).
    fn parents(&self) -> impl Iterator<Item = &PathBuf> {
        let mut parents: Vec<&PathBuf> = [&self.memory, &self.pids, &self.cpu].into_iter().flatten().collect();
        parents.dedup();
        parents.into_iter()
    }
}

/// One runner's or build's cgroup.
#[derive(Debug)]
pub(crate) struct Group {
    dirs: Vec<PathBuf>,
    /// Each directory's `cgroup.procs`, open for writing.
    procs: Vec<OwnedFd>,
    /// Where the kernel counts the processes it killed for the memory limit.
    memory: Option<PathBuf>,
    /// Where the kernel counts the forks the pids limit refused.
    pids: Option<PathBuf>,
    /// Where its removal goes when its processes have not all ended yet.
    removals: tokio_util::task::TaskTracker,
}

impl Group {
    /// Descriptors a child writes `0` to, between fork and exec, to join the group.
    pub(crate) fn join_fds(&self) -> Vec<RawFd> {
        self.procs.iter().map(AsRawFd::as_raw_fd).collect()
    }

    /// Whether the memory limit is the kernel's to enforce.
    pub(crate) fn limits_memory(&self) -> bool {
        self.memory.is_some()
    }

    /// Processes the kernel has killed because the group was over its memory limit.
    pub(crate) fn oom_kills(&self) -> u64 {
        // v1's memory.oom_control and v2's memory.events both count them as oom_kill.
        self.memory.as_ref().map_or(0, |file| counter(&read(file), "oom_kill"))
    }

    /// Forks the kernel has refused because the group had its limit of processes.
    pub(crate) fn forks_refused(&self) -> u64 {
        self.pids.as_ref().map_or(0, |file| counter(&read(file), "max"))
    }

    /// The processes in the group, in any of its hierarchies.
    pub(crate) fn processes(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self
            .dirs
            .iter()
            .flat_map(|dir| {
                read(&dir.join("cgroup.procs")).split_whitespace().filter_map(|p| p.parse().ok()).collect::<Vec<u32>>()
            })
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// SIGKILL to every process in the group, until none is left to kill (a process
    /// may fork while the others are being killed).
    pub(crate) fn kill_all(&self) {
        for _ in 0..64 {
            let pids = self.processes();
            if pids.is_empty() {
                return;
            }
            for pid in pids {
                if let Ok(pid) = i32::try_from(pid) {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
                }
            }
        }
    }

    /// Moves the processes `pids` into the group (a thread group each, in every
    /// hierarchy). Blocks: the kernel may wait for an RCU grace period.
    pub(crate) fn join(&self, pids: &[u32]) -> std::io::Result<()> {
        for procs in &self.procs {
            for pid in pids {
                nix::unistd::write(procs, pid.to_string().as_bytes())?;
            }
        }
        Ok(())
    }

    /// Removes the group once its processes have ended, giving them `within` to go.
    pub(crate) async fn remove(&self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            self.kill_all();
            if self.try_remove() || tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if let Some(dir) = self.dirs.iter().find(|d| d.exists()) {
            tracing::warn!(cgroup = %dir.display(), "a cgroup could not be removed; its processes did not end");
        }
    }

    /// Removes the group: at once if its processes have ended, otherwise in a task that
    /// gives them `within` to go, which a server that is stopping waits for
    /// ([`Cgroups::settle`]). One that is killed first leaves an empty group, which its
    /// next start sweeps away ([`Cgroups::sweep_empty`]).
    pub(crate) fn remove_soon(self: Arc<Self>, within: Duration) {
        self.kill_all();
        if !self.try_remove() {
            let removals = self.removals.clone();
            removals.spawn(async move { self.remove(within).await });
        }
    }

    /// Removes the group if it is empty; for a start-up that has no runtime yet.
    fn remove_now(&self) {
        for _ in 0..200 {
            if self.try_remove() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Removes each directory of the group that is empty; true once none is left.
    fn try_remove(&self) -> bool {
        self.dirs.iter().all(|dir| match std::fs::remove_dir(dir) {
            Ok(()) => true,
            Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        })
    }
}

/// The quota for `cpus` CPUs, in microseconds per [`CPU_PERIOD_US`] (at least the
/// kernel's minimum of one millisecond).
fn cpu_quota(cpus: f64) -> u64 {
    ((cpus * CPU_PERIOD_US as f64).round() as u64).max(1000)
}

fn write(dir: &Path, file: &str, value: impl ToString) -> std::io::Result<()> {
    std::fs::write(dir.join(file), value.to_string())
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot write {}: {e}", dir.join(file).display())))
}

fn read(file: &Path) -> String {
    std::fs::read_to_string(file).unwrap_or_default()
}

/// The number after `name` in a `name value` list such as `memory.events`.
fn counter(text: &str, name: &str) -> u64 {
    text.lines()
        .filter_map(|line| line.split_once(' '))
        .find(|(key, _)| *key == name)
        .and_then(|(_, value)| value.trim().parse().ok())
        .unwrap_or(0)
}

/// A cgroup filesystem mounted in this process's mount namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CgroupMount {
    /// The cgroup the mount shows at its mount point (`/` unless in a cgroup namespace).
    root: String,
    at: PathBuf,
    v2: bool,
    /// The super block's options: for v1, the controllers of the hierarchy.
    options: Vec<String>,
}

impl CgroupMount {
    /// The directory of cgroup `path` in this mount.
    fn dir_of(&self, path: &str) -> PathBuf {
        let relative = path.strip_prefix(self.root.trim_end_matches('/')).unwrap_or(path);
        self.at.join(relative.trim_start_matches('/'))
    }
}

/// The cgroup mounts in `/proc/self/mountinfo`.
fn parse_mounts(mountinfo: &str) -> Vec<CgroupMount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            let (root, at) = (left.get(3)?, left.get(4)?);
            let (kind, options) = (right.first()?, right.get(2).copied().unwrap_or(""));
            if *kind != "cgroup" && *kind != "cgroup2" {
                return None;
            }
            Some(CgroupMount {
                root: unescape(root),
                at: PathBuf::from(unescape(at)),
                v2: *kind == "cgroup2",
                options: options.split(',').map(str::to_owned).collect(),
            })
        })
        .collect()
}

/// mountinfo writes spaces and a few other characters in paths as octal escapes.
fn unescape(field: &str) -> String {
    let mut out = String::new();
    let mut chars = field.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = chars.by_ref().take(3).collect();
            match u8::from_str_radix(&code, 8) {
                Ok(byte) => out.push(char::from(byte)),
                Err(_) => {
                    out.push('\\');
                    out.push_str(&code);
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The lines of `/proc/self/cgroup`: each hierarchy's controllers and this process's
/// cgroup in it (v2's line has no controllers).
fn parse_own(text: &str) -> Vec<(Vec<String>, String)> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.splitn(3, ':');
            let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
            let controllers = controllers.split(',').filter(|c| !c.is_empty()).map(str::to_owned).collect();
            Some((controllers, path.to_owned()))
        })
        .collect()
}

/// The server's own directory in the unified hierarchy, when that hierarchy has the
/// memory and pids controllers (all v2, not v1's hybrid layout with an empty v2).
fn v2_dir(own: &[(Vec<String>, String)], mounts: &[CgroupMount]) -> Option<PathBuf> {
    let (_, path) = own.iter().find(|(controllers, path)| controllers.is_empty() && path.starts_with('/'))?;
    let mount = mounts.iter().find(|m| m.v2)?;
    let dir = mount.dir_of(path);
    // A server moved into its leaf by an earlier start makes its groups beside it.
    let dir = if dir.ends_with("hangar-server") { dir.parent()?.to_owned() } else { dir };
    let available = read(&dir.join("cgroup.controllers"));
    let has = |c: &str| available.split_whitespace().any(|a| a == c);
    (has("memory") && has("pids")).then_some(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID_MOUNTS: &str = "\
35 26 0:30 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs rw,mode=755
36 35 0:31 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
37 35 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
38 35 0:33 /docker/abc /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
39 35 0:34 / /sys/fs/cgroup/cpu\\040x rw,relatime - cgroup cgroup rw,cpu,cpuacct
";

    #[test]
    fn cgroup_mounts_are_read_from_mountinfo() {
        let mounts = parse_mounts(HYBRID_MOUNTS);
        assert_eq!(mounts.len(), 4, "{mounts:?}");
        assert!(mounts[0].v2);
        assert_eq!(mounts[1].options, ["rw", "memory"]);
        assert_eq!(mounts[3].at, Path::new("/sys/fs/cgroup/cpu x"));
        assert_eq!(mounts[3].options, ["rw", "cpu", "cpuacct"]);
    }

    #[test]
    fn a_cgroup_path_is_found_under_the_mount_that_shows_it() {
        let mounts = parse_mounts(HYBRID_MOUNTS);
        let cases = [
            (&mounts[1], "/process_api/d6", "/sys/fs/cgroup/memory/process_api/d6"),
            (&mounts[1], "/", "/sys/fs/cgroup/memory"),
            // A mount of a sub-tree shows the cgroups below its root.
            (&mounts[2], "/docker/abc/inner", "/sys/fs/cgroup/pids/inner"),
            (&mounts[2], "/docker/abc", "/sys/fs/cgroup/pids"),
        ];
        for (mount, path, dir) in cases {
            assert_eq!(mount.dir_of(path), Path::new(dir), "{path}");
        }
    }

    #[test]
    fn own_cgroups_are_read_per_hierarchy() {
        let own = parse_own("9:name=systemd:/\n4:memory:/process_api/d6\n1:cpu,cpuacct:/\n0::/user.slice/x.scope\n");
        assert_eq!(own.len(), 4);
        assert_eq!(own[1], (vec!["memory".to_owned()], "/process_api/d6".to_owned()));
        assert_eq!(own[2].0, ["cpu", "cpuacct"]);
        assert_eq!(own[3], (vec![], "/user.slice/x.scope".to_owned()));
    }

    #[test]
    fn counters_are_read_by_name() {
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        let v2 = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 1\n";
        let cases = [(v1, "oom_kill", 3), (v2, "oom_kill", 1), (v2, "max", 12), ("max 0\n", "max", 0), ("", "max", 0)];
        for (text, name, want) in cases {
            assert_eq!(counter(text, name), want, "{name} in {text:?}");
        }
    }

    #[test]
    fn cpu_quotas_are_per_period_and_never_below_the_kernels_minimum() {
        let cases = [(1.5, 150_000), (1.0, 100_000), (0.25, 25_000), (0.001, 1000), (8.0, 800_000)];
        for (cpus, quota) in cases {
            assert_eq!(cpu_quota(cpus), quota, "{cpus}");
        }
    }
}
