//! The sandbox every runner and build runs in, built on bubblewrap (`bwrap`, the
//! sandbox Flatpak uses) and util-linux's `setpriv`: no namespace code of our own.
//!
//! The server runs `bwrap` as root, so that it can mount what the sandbox needs from
//! anywhere in the data dir; inside, `setpriv` drops to the team's own uid with no
//! capabilities, an empty bounding set and `no_new_privs` before the app's command
//! runs. The sandbox has its own pid, IPC, UTS and mount namespaces, and, unless it is
//! told to share the server's, its own network namespace (see [`crate::netns`]):
//!
//! ```text
//! /usr /etc /bin /lib* /sbin   the system, read-only
//! <extra paths>                read-only, where the server's settings name them
//! /app                         the revision's code: read-only for runners, writable for builds
//! /cache                       the app's cache (HANGAR_CACHE_DIR), writable, kept across runners
//! /home/hangar                 HOME, private, gone with the sandbox (builds: .cache is the team's)
//! /tmp                         private, gone with the sandbox
//! /proc /dev                   its own
//! ```
//!
//! Nothing else of the machine or the data dir is there: no keys, no database, no
//! other revision, cache or log.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::cgroup::{Cgroups, Group, Limits};

/// Whether processes run sandboxed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxMode {
    /// bubblewrap namespaces and a uid per team.
    Bwrap,
    /// No sandbox: deployed code runs as the server's user, with its rights.
    None,
}

impl std::str::FromStr for SandboxMode {
    type Err = String;

    fn from_str(s: &str) -> Result<SandboxMode, String> {
        match s {
            "bwrap" => Ok(SandboxMode::Bwrap),
            "none" => Ok(SandboxMode::None),
            other => Err(format!("sandbox {other:?} is not one of: bwrap, none")),
        }
    }
}

/// Where things are inside the sandbox.
pub const CODE_DIR: &str = "/app";
pub const CACHE_DIR: &str = "/cache";
pub(crate) const HOME_DIR: &str = "/home/hangar";

/// Sandboxed processes run as `UID_BASE + n` for a team-specific `n` below `UID_RANGE`:
/// above the ranges that distributions give people and `/etc/subuid`'s first users, and
/// below 2^21, the largest uid an ustar archive can record (so that tools that pack
/// what they built keep working).
pub(crate) const UID_BASE: u32 = 2_000_000;
pub(crate) const UID_RANGE: u32 = 65_536;

/// The uid (and gid) a team's builds and runners run as.
pub fn team_uid(team: &[u8; 16]) -> u32 {
    // The team id is a random UUID: any four of its bytes are evenly spread.
    UID_BASE + u32::from_le_bytes([team[12], team[13], team[14], team[15]]) % UID_RANGE
}

/// How processes are confined on this server.
#[derive(Debug, Clone)]
pub struct Sandbox {
    mode: SandboxMode,
    /// The system directories, as mounts of the host's.
    system: Vec<Mount>,
    /// Host paths the server's settings make visible read-only at the same place.
    extra: Vec<PathBuf>,
    /// The tools, found on the server's PATH when the sandbox was set up.
    bwrap: PathBuf,
    setpriv: PathBuf,
    slirp4netns: PathBuf,
    /// What runs a command in a runner's sandbox ([`crate::exec`]), and gives it a
    /// terminal: `nsenter` is only needed with the sandbox on.
    nsenter: PathBuf,
    setsid: PathBuf,
    /// Where runners and builds get their kernel-enforced limits, where this server
    /// may make cgroups.
    cgroups: Option<Arc<Cgroups>>,
}

/// How a host directory appears in the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Mount {
    ReadOnly(PathBuf),
    /// A symlink to `target` at `at` (`/bin -> usr/bin` on merged-/usr systems).
    Symlink {
        at: PathBuf,
        target: PathBuf,
    },
}

/// What one sandboxed process may see and use.
#[derive(Debug, Clone)]
pub struct Confinement {
    /// The uid and gid it runs as.
    pub uid: u32,
    /// The code, at [`CODE_DIR`], its working directory.
    pub code: PathBuf,
    pub code_writable: bool,
    /// Writable at [`CACHE_DIR`].
    pub cache: Option<PathBuf>,
    /// Writable at `HOME/.cache` (a build's cache of downloads).
    pub home_cache: Option<PathBuf>,
    /// Device nodes it may use (its GPUs'), each at `/dev/<its name>`.
    pub devices: Vec<PathBuf>,
}

/// A command ready to run, sandboxed or not.
#[derive(Debug)]
pub(crate) struct Wrapped {
    pub program: OsString,
    pub args: Vec<OsString>,
    /// Descriptors the child must keep across exec; the parent closes them once the
    /// child has started.
    pub keep: Vec<OwnedFd>,
    /// Where bwrap tells the pid of the sandbox's first process (`{"child-pid": N}`).
    pub info: Option<OwnedFd>,
    /// Writing a byte here lets the sandboxed command start (once its network is up).
    pub block: Option<OwnedFd>,
}

impl Wrapped {
    /// The raw numbers of [`Wrapped::keep`], for the child to clear their close-on-exec flag.
    pub(crate) fn keep_raw(&self) -> Vec<RawFd> {
        self.keep.iter().map(AsRawFd::as_raw_fd).collect()
    }
}

impl Sandbox {
    /// No sandbox.
    pub fn none() -> Sandbox {
        Sandbox {
            mode: SandboxMode::None,
            system: Vec::new(),
            extra: Vec::new(),
            bwrap: PathBuf::new(),
            setpriv: PathBuf::new(),
            slirp4netns: PathBuf::new(),
            nsenter: PathBuf::new(),
            setsid: find_program("setsid").unwrap_or_else(|| PathBuf::from("setsid")),
            cgroups: None,
        }
    }

    /// The bubblewrap sandbox, after checking that it works here: the tools are there,
    /// the server may use them, and a sandboxed process really starts. The error says
    /// how to make it work, or how to turn it off.
    pub fn bwrap(extra: Vec<PathBuf>) -> Result<Sandbox, String> {
        for path in &extra {
            if !path.is_absolute() || !path.exists() {
                return Err(format!("sandbox path {} must be an absolute path that exists", path.display()));
            }
        }
        const INSTALL: &str = "(Debian: apt-get install bubblewrap util-linux slirp4netns), or start the server with \
                               --sandbox none to run deployed code unconfined";
        let find = |tool: &str, package: &str| {
            find_program(tool)
                .ok_or_else(|| format!("{tool} is not installed (it comes with {package}); install it {INSTALL}"))
        };
        let sandbox = Sandbox {
            mode: SandboxMode::Bwrap,
            system: system_mounts(Path::new("/")),
            extra,
            bwrap: find("bwrap", "bubblewrap")?,
            setpriv: find("setpriv", "util-linux")?,
            slirp4netns: find("slirp4netns", "slirp4netns")?,
            nsenter: find("nsenter", "util-linux")?,
            setsid: find("setsid", "util-linux")?,
            cgroups: None,
        };
        sandbox.check()?;
        Ok(sandbox)
    }

    /// Limits runners and builds through `cgroups` from now on.
    pub fn with_cgroups(mut self, cgroups: Cgroups) -> Sandbox {
        self.cgroups = Some(Arc::new(cgroups));
        self
    }

    /// The cgroup hierarchy limits are kept with, if any.
    pub fn cgroups(&self) -> Option<&Cgroups> {
        self.cgroups.as_deref()
    }

    /// A cgroup named `name` with `limits`, for a process about to start; `None` where
    /// this server has no cgroups to use.
    pub(crate) fn group(&self, name: &str, limits: &Limits) -> std::io::Result<Option<Arc<Group>>> {
        Ok(self.cgroups.as_ref().map(|c| c.create(name, limits)).transpose()?.map(Arc::new))
    }

    pub fn mode(&self) -> SandboxMode {
        self.mode
    }

    pub fn is_on(&self) -> bool {
        self.mode == SandboxMode::Bwrap
    }

    /// Makes `dir` (and its parents) a directory that a sandboxed process of `uid` may
    /// write and nobody else but the server may read.
    pub fn prepare_dir(&self, dir: &Path, uid: u32) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir)?;
        if self.is_on() {
            std::os::unix::fs::chown(dir, Some(uid), Some(uid))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        Ok(())
    }

    /// Gives everything under `dir` to `uid`, so that its build may change it.
    pub fn hand_over(&self, dir: &Path, uid: u32) -> std::io::Result<()> {
        if !self.is_on() {
            return Ok(());
        }
        std::os::unix::fs::lchown(dir, Some(uid), Some(uid))?;
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                self.hand_over(&entry.path(), uid)?;
            } else {
                std::os::unix::fs::lchown(entry.path(), Some(uid), Some(uid))?;
            }
        }
        Ok(())
    }

    /// The program and arguments that run `command` confined as `confinement` says.
    pub(crate) fn wrap(&self, command: &[String], confinement: &Confinement) -> std::io::Result<Wrapped> {
        let Some((program, args)) = command.split_first() else {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "the command is empty"));
        };
        if !self.is_on() {
            let args = args.iter().map(OsString::from).collect();
            return Ok(Wrapped { program: program.into(), args, keep: Vec::new(), info: None, block: None });
        }
        let pipe = || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC);
        let (info_read, info_write) = pipe()?;
        let (block_read, block_write) = pipe()?;
        // The sandbox's resolver is slirp4netns's, which forwards to the machine's.
        let (resolv_read, resolv_write) = pipe()?;
        nix::unistd::write(&resolv_write, format!("nameserver {SLIRP_DNS}\n").as_bytes())?;
        drop(resolv_write);
        let fds = Fds { info: info_write.as_raw_fd(), block: block_read.as_raw_fd(), resolv: resolv_read.as_raw_fd() };
        let args = self.bwrap_args(command, confinement, Some(fds));
        Ok(Wrapped {
            program: self.bwrap.clone().into(),
            args,
            keep: vec![info_write, block_read, resolv_read],
            info: Some(info_read),
            block: Some(block_write),
        })
    }

    /// A command that runs `wrapped`, in `cwd` (outside the sandbox), with a cleared
    /// environment, in `group` before anything of it runs: unsandboxed, it joins between
    /// fork and exec; sandboxed, [`Sandbox::start`] moves it while it waits to be let go.
    /// The caller adds the environment and its stdio.
    pub(crate) fn command(&self, wrapped: &Wrapped, cwd: &Path, group: Option<&Group>) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(&wrapped.program);
        command.args(&wrapped.args).current_dir(cwd).env_clear().process_group(0);
        let join_at_exec = group.filter(|_| wrapped.block.is_none()).map(Group::join_fds).unwrap_or_default();
        prepare_child(&mut command, wrapped.keep_raw(), join_at_exec);
        command
    }

    /// Lets the sandboxed command of a process started as `wrapped` (in process group
    /// `pgid`) start, once it is ready to: bwrap has said which process is the sandbox's
    /// first (`info`), the sandbox's processes are in `group`, and its network is up.
    /// Until the command is let go (a byte on `block`), nothing of the app has run. The
    /// cgroup is joined here, not between fork and exec, because the kernel may make a
    /// move into a cgroup wait for an RCU grace period (milliseconds): here that wait
    /// overlaps slirp4netns's start instead of adding to it.
    pub(crate) async fn start(&self, pgid: u32, info: OwnedFd, block: OwnedFd, group: Option<Arc<Group>>) -> Started {
        let Some(pid) = crate::group::read_child_pid(info).await.ok().flatten() else {
            // bwrap ended before it started the sandbox; waiting for it says how.
            return Started::default();
        };
        // Only bwrap's process in the sandbox, blocked: the app's processes will be its
        // descendants. (bwrap's outer process, outside, runs nothing of the app.)
        let joining = group.map(|group| tokio::task::spawn_blocking(move || group.join(&[pid])));
        let network = self.connect_network(pid, pgid).await;
        if let Some(joining) = joining
            && let Err(e) = joining.await.unwrap_or_else(|e| Err(std::io::Error::other(e)))
        {
            // The command must not run unlimited: it never starts.
            crate::group::kill_group(pgid);
            return Started { first: Some(pid), network: None, error: Some(format!("could not join its cgroup: {e}")) };
        }
        let network = match network {
            Ok(network) => network,
            Err(e) => {
                crate::group::kill_group(pgid);
                return Started {
                    first: Some(pid),
                    network: None,
                    error: Some(format!("its sandbox got no network: {e}")),
                };
            }
        };
        if let Err(e) = nix::unistd::write(&block, b"go") {
            return Started { first: Some(pid), network: None, error: Some(format!("could not be let go: {e}")) };
        }
        Started { first: Some(pid), network: Some(network), error: None }
    }

    /// Gives the sandbox whose first process is `pid` its network: slirp4netns, in the
    /// sandbox's process group `pgid`, connects the sandbox's namespace to the outside
    /// through a user-mode TCP/IP stack that refuses the machine's loopback, so that
    /// outbound connections work and no local service (nor another runner) can be
    /// reached. The returned process must live as long as the sandbox.
    async fn connect_network(&self, pid: u32, pgid: u32) -> std::io::Result<Network> {
        // slirp4netns configures the namespace it is pointed at: never the server's own.
        let namespace = |path: String| std::fs::metadata(path).map(|m| std::os::unix::fs::MetadataExt::ino(&m));
        if namespace(format!("/proc/{pid}/ns/net"))? == namespace("/proc/self/ns/net".to_owned())? {
            return Err(std::io::Error::other("the sandbox has no network namespace of its own"));
        }
        // bwrap brings the sandbox's loopback up itself, and fails if it is up already:
        // slirp4netns, which brings it up too, starts only after that.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while !loopback_is_up(pid) {
            if tokio::time::Instant::now() >= deadline {
                return Err(std::io::Error::other("the sandbox's loopback did not come up"));
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let pipe = || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC);
        let (ready_read, ready_write) = pipe()?;
        // slirp4netns ends when this pipe closes: with the runner, or with the server.
        let (exit_read, exit_write) = pipe()?;
        let mut command = tokio::process::Command::new(&self.slirp4netns);
        command
            .args(["--configure", "--mtu=65520", "--disable-host-loopback", "--enable-sandbox", "--enable-seccomp"])
            .arg(format!("--ready-fd={}", ready_write.as_raw_fd()))
            .arg(format!("--exit-fd={}", exit_read.as_raw_fd()))
            .arg(pid.to_string())
            .arg("tap0")
            .env_clear()
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(i32::try_from(pgid).unwrap_or(0))
            .kill_on_drop(true);
        prepare_child(&mut command, vec![ready_write.as_raw_fd(), exit_read.as_raw_fd()], Vec::new());
        let child = command.spawn()?;
        drop((ready_write, exit_read));
        let ready = tokio::task::spawn_blocking(move || {
            let mut byte = [0u8; 1];
            nix::unistd::read(&ready_read, &mut byte)
        });
        match ready.await {
            Ok(Ok(1)) => {}
            _ => return Err(std::io::Error::other("slirp4netns did not set up the sandbox's network")),
        }
        Ok(Network { _process: child, _exit: exit_write })
    }
}

/// What [`Sandbox::start`] found. On an `error`, the sandbox's process group has been
/// killed.
#[derive(Debug, Default)]
pub(crate) struct Started {
    /// The sandbox's first process (bwrap's reaper, in its pid namespace).
    pub first: Option<u32>,
    pub network: Option<Network>,
    pub error: Option<String>,
}

/// A sandbox's way out: slirp4netns, which ends when this is dropped.
#[derive(Debug)]
pub(crate) struct Network {
    _process: tokio::process::Child,
    _exit: OwnedFd,
}

/// Whether the loopback of process `pid`'s network namespace has its address, which
/// bwrap gives it as it sets the sandbox up.
fn loopback_is_up(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/net/fib_trie")).is_ok_and(|trie| trie.contains("127.0.0.1"))
}

/// What the sandbox adds to a process's environment.
pub(crate) fn sandbox_env(confinement: &Confinement) -> Vec<(&'static str, &'static str)> {
    let mut env = vec![("HOME", HOME_DIR), ("TMPDIR", "/tmp"), ("USER", "hangar"), ("LOGNAME", "hangar")];
    if confinement.cache.is_some() {
        env.push(("HANGAR_CACHE_DIR", CACHE_DIR));
    }
    env
}

/// Has the child started by `command` join `group` before it runs anything.
pub(crate) fn join_at_exec(command: &mut tokio::process::Command, group: Option<&Group>) {
    prepare_child(command, Vec::new(), group.map(Group::join_fds).unwrap_or_default());
}

/// The descriptors bwrap is told of.
#[derive(Debug, Clone, Copy)]
struct Fds {
    info: RawFd,
    block: RawFd,
    resolv: RawFd,
}

/// The address of slirp4netns's DNS forwarder, as the sandbox sees it.
const SLIRP_DNS: &str = "10.0.2.3";

/// Lets the child started by `command` keep `keep` across exec, and has it join the
/// cgroup whose `cgroup.procs` descriptors are `join` before it runs anything.
/// Has the kernel kill the child started by `command` (SIGKILL) when this process ends,
/// however it ends. The kernel sends it when the *thread* that started the child ends:
/// only for children started from threads that live as long as the process (a tokio
/// worker's, not the blocking pool's).
pub(crate) fn die_with_this_process(command: &mut tokio::process::Command) {
    let parent = std::process::id();
    #[allow(unsafe_code)]
    // SAFETY: between fork and exec only `prctl` and `getppid` run, which are
    // async-signal-safe system calls; nothing allocates.
    unsafe {
        command.pre_exec(move || {
            if nix::libc::prctl(nix::libc::PR_SET_PDEATHSIG, nix::libc::SIGKILL, 0, 0, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have ended before the signal was asked for.
            if u32::try_from(nix::libc::getppid()).ok() != Some(parent) {
                return Err(std::io::Error::other("the parent process has ended"));
            }
            Ok(())
        });
    }
}

fn prepare_child(command: &mut tokio::process::Command, keep: Vec<RawFd>, join: Vec<RawFd>) {
    if keep.is_empty() && join.is_empty() {
        return;
    }
    // The one place that needs `unsafe`: the standard library has no other way to hand
    // a child a descriptor beyond stdio, or to run anything between fork and exec.
    #[allow(unsafe_code)]
    // SAFETY: between fork and exec only `write` and `fcntl` run, which are
    // async-signal-safe, on descriptors the parent keeps open until the child has
    // started; nothing allocates.
    unsafe {
        command.pre_exec(move || {
            for fd in &join {
                if nix::libc::write(*fd, b"0".as_ptr().cast(), 1) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for fd in &keep {
                if nix::libc::fcntl(*fd, nix::libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

impl Sandbox {
    /// bwrap's arguments for `command` under `confinement`.
    fn bwrap_args(&self, command: &[String], confinement: &Confinement, fds: Option<Fds>) -> Vec<OsString> {
        let mut args = Args::default();
        args.flags(&["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try", "--unshare-net"]);
        args.flags(&["--die-with-parent"]);
        args.pair("--hostname", "hangar");
        for mount in &self.system {
            match mount {
                Mount::ReadOnly(path) => args.triple("--ro-bind", path, path),
                Mount::Symlink { at, target } => args.triple("--symlink", target, at),
            }
        }
        args.flags(&["--proc", "/proc", "--dev", "/dev"]);
        // Its own GPUs' nodes, and nothing of the other GPUs.
        for device in &confinement.devices {
            if let Some(name) = device.file_name() {
                args.triple("--dev-bind", device, Path::new("/dev").join(name));
            }
        }
        args.flags(&["--perms", "1777", "--tmpfs", "/tmp"]);
        args.flags(&["--perms", "1777", "--tmpfs", HOME_DIR]);
        // After the tmpfs mounts, so that a path under /tmp is not hidden by them; with
        // directories above it that the sandbox's uid may pass through (bwrap would
        // give them the modes they have outside, which may shut it out).
        for path in &self.extra {
            let mut above: Vec<&Path> = path.ancestors().skip(1).filter(|p| p.parent().is_some()).collect();
            above.reverse();
            for dir in above {
                args.flags(&["--perms", "0755"]);
                args.pair("--dir", dir);
            }
            args.triple("--ro-bind", path, path);
        }
        let bind = if confinement.code_writable { "--bind" } else { "--ro-bind" };
        args.triple(bind, &confinement.code, CODE_DIR);
        if let Some(cache) = &confinement.cache {
            args.triple("--bind", cache, CACHE_DIR);
        }
        if let Some(cache) = &confinement.home_cache {
            args.triple("--bind", cache, format!("{HOME_DIR}/.cache"));
        }
        args.pair("--chdir", CODE_DIR);
        for (name, value) in sandbox_env(confinement) {
            args.triple("--setenv", name, value);
        }
        if let Some(fds) = fds {
            // Readable by all, as the machine's is (bwrap would make it 0600, root's).
            args.pair("--perms", "0644");
            args.pair("--ro-bind-data", fds.resolv.to_string());
            args.0.push("/etc/resolv.conf".into());
            args.pair("--info-fd", fds.info.to_string());
            args.pair("--block-fd", fds.block.to_string());
        }
        args.0.push("--".into());
        self.drop_privileges(&mut args, confinement.uid);
        args.0.extend(command.iter().map(OsString::from));
        args.0
    }

    /// `setpriv` and its arguments: to `uid`, with no capabilities, for good.
    fn drop_privileges(&self, args: &mut Args, uid: u32) {
        let uid = uid.to_string();
        args.0.push(self.setpriv.clone().into());
        args.flags(&["--reuid", &uid, "--regid", &uid, "--clear-groups"]);
        args.flags(&["--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]);
    }

    /// The program and arguments that run `command` in the runner `target`, as its
    /// own processes run: in its namespaces, entered through its sandbox's first
    /// process (whose root and `/app` become the command's), then as its uid with no
    /// capabilities; with `tty`, as a session of its own whose controlling terminal is
    /// its standard input. Every tool is named by its absolute path on the machine (the
    /// runner's `PATH` may lead into its code), and the sandbox's `/usr` is the machine's.
    pub(crate) fn exec_args(
        &self,
        target: &crate::exec::ExecTarget,
        command: &[String],
        tty: bool,
    ) -> std::io::Result<(OsString, Vec<OsString>)> {
        if command.is_empty() {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "the command is empty"));
        }
        let mut args = Args::default();
        if tty {
            args.0.push(self.setsid.clone().into());
            args.flags(&["--ctty"]);
        }
        match target.first {
            Some(first) => {
                args.0.push(self.nsenter.clone().into());
                args.pair("--target", first.to_string());
                args.flags(&["--mount", "--pid", "--ipc", "--uts", "--net", "--cgroup", "--root"]);
                args.0.push(format!("--wd=/proc/{first}/root{CODE_DIR}").into());
                args.0.push("--".into());
                self.drop_privileges(&mut args, target.uid);
            }
            None if !self.is_on() => {}
            None => return Err(std::io::Error::other("the runner's sandbox has not started")),
        }
        args.0.extend(command.iter().map(OsString::from));
        let mut all = args.0.into_iter();
        let program = all.next().unwrap_or_default();
        Ok((program, all.collect()))
    }

    /// Starts a sandboxed process that must see what a runner sees and not more.
    fn check(&self) -> Result<(), String> {
        const HOW: &str = "install bubblewrap and util-linux (Debian: apt-get install bubblewrap util-linux), \
                           or start the server with --sandbox none to run deployed code unconfined";
        if !nix::unistd::geteuid().is_root() {
            return Err(format!(
                "the sandbox needs the server to run as root, to give deployed code a uid of its own; {HOW}"
            ));
        }
        let probe = tempfile_dir().map_err(|e| format!("cannot make a directory to test the sandbox: {e}"))?;
        let confinement = Confinement {
            uid: UID_BASE,
            code: probe.clone(),
            code_writable: false,
            cache: None,
            home_cache: None,
            devices: Vec::new(),
        };
        // As a runner: not root, and its code read-only.
        let script = "test \"$(id -u)\" != 0 && test -r hangar-probe && ! touch hangar-probe 2>/dev/null";
        let command = ["/bin/sh".to_owned(), "-c".to_owned(), script.to_owned()];
        let _ = std::fs::write(probe.join("hangar-probe"), "");
        let output = std::process::Command::new(&self.bwrap)
            .args(self.bwrap_args(&command, &confinement, None))
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(std::process::Stdio::null())
            .output();
        let _ = std::fs::remove_dir_all(&probe);
        match output {
            Err(e) => Err(format!("bwrap could not be started ({e}); {HOW}")),
            Ok(out) if out.status.success() => Ok(()),
            Ok(out) => Err(format!(
                "a test sandbox failed ({}): {}; {HOW}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
        }
    }
}

/// The program `name` on the server's PATH.
fn find_program(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// A fresh directory for the start-up check, readable by the sandbox's uid.
fn tempfile_dir() -> std::io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("hangar-sandbox-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The system directories under `root` as the sandbox mounts them: `/usr` and `/etc`
/// read-only, and `/bin`, `/sbin` and the `/lib` directories as they are there
/// (symlinks into `/usr` on merged-/usr systems, else read-only too).
fn system_mounts(root: &Path) -> Vec<Mount> {
    let mut mounts = Vec::new();
    for name in ["usr", "etc", "bin", "sbin", "lib", "lib32", "lib64", "libx32"] {
        let host = root.join(name);
        let at = Path::new("/").join(name);
        match std::fs::symlink_metadata(&host) {
            Ok(meta) if meta.file_type().is_symlink() => {
                if let Ok(target) = std::fs::read_link(&host) {
                    mounts.push(Mount::Symlink { at, target });
                }
            }
            Ok(meta) if meta.is_dir() => mounts.push(Mount::ReadOnly(at)),
            _ => {}
        }
    }
    mounts
}

/// An argument list being built.
#[derive(Default)]
struct Args(Vec<OsString>);

impl Args {
    fn flags(&mut self, flags: &[&str]) {
        self.0.extend(flags.iter().map(OsString::from));
    }

    fn pair(&mut self, flag: &str, value: impl Into<OsString>) {
        self.0.push(flag.into());
        self.0.push(value.into());
    }

    fn triple(&mut self, flag: &str, a: impl AsRef<std::ffi::OsStr>, b: impl AsRef<std::ffi::OsStr>) {
        self.0.push(flag.into());
        self.0.push(a.as_ref().to_owned());
        self.0.push(b.as_ref().to_owned());
    }
}

/// The pid of the sandbox's first process, from what bwrap writes to its info fd:
/// `{ "child-pid": 1234, … }`.
pub(crate) fn parse_child_pid(info: &str) -> Option<u32> {
    let rest = info.split_once("\"child-pid\"")?.1.trim_start().strip_prefix(':')?.trim_start();
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok().filter(|pid| *pid > 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_pids_are_read_from_what_bwrap_writes() {
        let cases: &[(&str, Option<u32>)] = &[
            ("{\n    \"child-pid\": 4242\n}\n", Some(4242)),
            ("{\"child-pid\":17,\"cgroup-namespace\":4026531835}", Some(17)),
            ("{\"child-pid\": 1}", None),
            ("{\"child-pid\": \"x\"}", None),
            ("{\"pid\": 12}", None),
            ("", None),
        ];
        for (info, want) in cases {
            assert_eq!(parse_child_pid(info), *want, "{info:?}");
        }
    }

    #[test]
    fn team_uids_stay_inside_their_range() {
        let cases: &[([u8; 16], u32)] = &[
            ([0; 16], UID_BASE),
            ([0xff; 16], UID_BASE + UID_RANGE - 1),
            ([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], UID_BASE + 1),
            ([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0], UID_BASE),
        ];
        for (team, want) in cases {
            assert_eq!(team_uid(team), *want, "{team:?}");
        }
        const { assert!(UID_BASE + UID_RANGE < 1 << 21) };
    }

    #[test]
    fn system_directories_are_mounted_as_they_are() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("usr/bin")).unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::create_dir_all(root.path().join("lib64")).unwrap();
        std::os::unix::fs::symlink("usr/bin", root.path().join("bin")).unwrap();
        assert_eq!(
            system_mounts(root.path()),
            [
                Mount::ReadOnly("/usr".into()),
                Mount::ReadOnly("/etc".into()),
                Mount::Symlink { at: "/bin".into(), target: "usr/bin".into() },
                Mount::ReadOnly("/lib64".into()),
            ]
        );
    }

    #[test]
    fn a_command_run_in_a_runner_enters_its_namespaces_then_drops_to_its_uid() {
        let mut sandbox = Sandbox::none();
        sandbox.mode = SandboxMode::Bwrap;
        sandbox.nsenter = "/usr/bin/nsenter".into();
        sandbox.setsid = "/usr/bin/setsid".into();
        sandbox.setpriv = "/usr/bin/setpriv".into();
        let target = |first| crate::exec::ExecTarget {
            first,
            uid: 2_000_007,
            code: "/data/revisions/r1/app".into(),
            env: Vec::new(),
            group: None,
        };
        let command = ["ls".to_owned(), "-l".to_owned()];
        let line = |sandbox: &Sandbox, first, tty| {
            let (program, args) = sandbox.exec_args(&target(first), &command, tty).unwrap();
            std::iter::once(program).chain(args).map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ")
        };
        let table = [
            (
                Some(42),
                false,
                "/usr/bin/nsenter --target 42 --mount --pid --ipc --uts --net --cgroup --root \
                               --wd=/proc/42/root/app -- /usr/bin/setpriv --reuid 2000007 --regid 2000007 \
                               --clear-groups --inh-caps=-all --bounding-set=-all --no-new-privs -- ls -l",
            ),
            (
                Some(42),
                true,
                "/usr/bin/setsid --ctty /usr/bin/nsenter --target 42 --mount --pid --ipc --uts --net \
                              --cgroup --root --wd=/proc/42/root/app -- /usr/bin/setpriv --reuid 2000007 --regid \
                              2000007 --clear-groups --inh-caps=-all --bounding-set=-all --no-new-privs -- ls -l",
            ),
        ];
        for (first, tty, expected) in table {
            assert_eq!(line(&sandbox, first, tty), expected.split_whitespace().collect::<Vec<_>>().join(" "));
        }
        // A sandbox that has not started cannot be entered; without a sandbox, the
        // command runs as it is.
        assert!(sandbox.exec_args(&target(None), &command, false).is_err());
        let mut none = Sandbox::none();
        none.setsid = "/usr/bin/setsid".into();
        assert_eq!(line(&none, None, false), "ls -l");
        assert_eq!(line(&none, None, true), "/usr/bin/setsid --ctty ls -l");
        assert!(none.exec_args(&target(None), &[], false).is_err());
    }

    #[test]
    fn a_runner_gets_its_code_read_only_and_a_build_writable() {
        let sandbox = Sandbox {
            mode: SandboxMode::Bwrap,
            system: vec![Mount::ReadOnly("/usr".into())],
            extra: vec!["/opt/tools".into()],
            bwrap: "/usr/bin/bwrap".into(),
            setpriv: "/usr/bin/setpriv".into(),
            slirp4netns: "/usr/bin/slirp4netns".into(),
            nsenter: "/usr/bin/nsenter".into(),
            setsid: "/usr/bin/setsid".into(),
            cgroups: None,
        };
        let runner = Confinement {
            uid: 2_000_007,
            code: "/data/revisions/r1/app".into(),
            code_writable: false,
            cache: Some("/data/caches/a1".into()),
            home_cache: None,
            devices: vec!["/dev/nvidia2".into(), "/tmp/fake/nvidiactl".into()],
        };
        let args = sandbox.bwrap_args(
            &["python3".to_owned(), "server.py".to_owned()],
            &runner,
            Some(Fds { info: 5, block: 6, resolv: 7 }),
        );
        let text: Vec<&str> = args.iter().map(|a| a.to_str().unwrap()).collect();
        let has = |window: &[&str]| text.windows(window.len()).any(|w| w == window);
        assert!(has(&["--ro-bind", "/data/revisions/r1/app", CODE_DIR]), "{text:?}");
        assert!(has(&["--bind", "/data/caches/a1", CACHE_DIR]));
        assert!(has(&["--setenv", "HANGAR_CACHE_DIR", CACHE_DIR]));
        assert!(has(&["--ro-bind", "/opt/tools", "/opt/tools"]));
        assert!(has(&["--info-fd", "5"]) && has(&["--block-fd", "6"]));
        assert!(has(&["--perms", "0644", "--ro-bind-data", "7", "/etc/resolv.conf"]) && has(&["--unshare-net"]));
        assert!(has(&["--reuid", "2000007", "--regid", "2000007"]));
        // Its GPU's nodes, after the sandbox's own /dev, which would hide them.
        let dev = text.windows(2).position(|w| w == ["--dev", "/dev"]).unwrap();
        let gpu = text.windows(3).position(|w| w == ["--dev-bind", "/dev/nvidia2", "/dev/nvidia2"]).unwrap();
        assert!(dev < gpu && has(&["--dev-bind", "/tmp/fake/nvidiactl", "/dev/nvidiactl"]), "{text:?}");
        assert!(text.ends_with(&["--no-new-privs", "--", "python3", "server.py"]));
        assert!(!text.iter().any(|a| a.starts_with("/data/")
            && !a.starts_with("/data/revisions/r1/app")
            && !a.starts_with("/data/caches/a1")));

        let build = Confinement {
            code_writable: true,
            cache: None,
            home_cache: Some("/data/build-caches/t1".into()),
            devices: Vec::new(),
            ..runner
        };
        let args = sandbox.bwrap_args(&["make".to_owned()], &build, None);
        let text: Vec<&str> = args.iter().map(|a| a.to_str().unwrap()).collect();
        let has = |window: &[&str]| text.windows(window.len()).any(|w| w == window);
        assert!(has(&["--bind", "/data/revisions/r1/app", CODE_DIR]));
        assert!(has(&["--bind", "/data/build-caches/t1", "/home/hangar/.cache"]));
        assert!(!text.contains(&"HANGAR_CACHE_DIR"));
    }
}
