//! Commands run inside a running runner (`hangar runners exec` and `shell`): in its
//! sandbox's namespaces (util-linux's `nsenter`, aimed at the sandbox's first process),
//! its cgroup, as its team's uid with no capabilities (`setpriv`, as the runner itself),
//! in its code directory, with its environment. The command sees what the runner sees:
//! the same files, processes, network and GPUs, and nothing more.
//!
//! With a terminal, the command gets a pseudo-terminal of its own as its controlling
//! terminal (`setsid --ctty`), which the client resizes; without one, three pipes.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use model::ids::RunnerId;
use model::records::{ExecInput, ExecOutput, TermSize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::cgroup::Group;
use crate::sandbox::Sandbox;

/// What a command run in a runner needs to know of it.
#[derive(Debug)]
pub(crate) struct ExecTarget {
    /// The sandbox's first process, whose namespaces the command enters; `None` for a
    /// runner that is not sandboxed.
    pub(crate) first: Option<u32>,
    pub(crate) uid: u32,
    /// Its code directory outside the sandbox (where an unsandboxed command runs).
    pub(crate) code: PathBuf,
    /// Its whole environment, as its command got it.
    pub(crate) env: Vec<(String, String)>,
    pub(crate) group: Option<Arc<Group>>,
}

/// The runners a command may be run in, by id: those whose sandbox has started and
/// that have not ended.
pub(crate) type ExecTargets = Arc<Mutex<HashMap<RunnerId, Arc<ExecTarget>>>>;

/// A command running in a runner. Sending on `input` feeds it; `output` gives what it
/// writes and, last, [`ExecOutput::Exited`]. Dropping `input` kills it.
#[derive(Debug)]
pub struct ExecSession {
    pub input: mpsc::Sender<ExecInput>,
    pub output: mpsc::Receiver<ExecOutput>,
}

/// How long a command's output may go on being read after the command has ended (a
/// background process of it may hold its output open).
const DRAIN: Duration = Duration::from_secs(2);

/// Starts `command` in the runner `target`, with a terminal of `tty`'s size if given.
pub(crate) fn start(
    sandbox: &Sandbox,
    target: &ExecTarget,
    command: &[String],
    tty: Option<TermSize>,
) -> std::io::Result<ExecSession> {
    let (program, args) = sandbox.exec_args(target, command, tty.is_some())?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).env_clear().envs(target.env.iter().map(|(k, v)| (k, v))).current_dir(&target.code);
    // With a terminal, `setsid` makes the command a session (and group) of its own.
    if tty.is_none() {
        cmd.process_group(0);
    }
    crate::sandbox::join_at_exec(&mut cmd, target.group.as_deref());
    let (input, input_rx) = mpsc::channel(64);
    let (output_tx, output) = mpsc::channel(64);
    match tty {
        None => {
            cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
            let mut child = cmd.spawn()?;
            let stdin = child.stdin.take().map(|s| Box::new(s) as Box<dyn AsyncWrite + Send + Unpin>);
            let pumps = [
                child.stdout.take().map(|s| pump(s, output_tx.clone(), ExecOutput::Stdout)),
                child.stderr.take().map(|s| pump(s, output_tx.clone(), ExecOutput::Stderr)),
            ];
            tokio::spawn(watch(child, stdin, None, pumps.into_iter().flatten().collect(), input_rx, output_tx));
        }
        Some(size) => {
            let (master, slave) = open_pty(size)?;
            cmd.stdin(Stdio::from(slave.try_clone()?)).stdout(Stdio::from(slave.try_clone()?));
            cmd.stderr(Stdio::from(slave));
            let child = cmd.spawn()?;
            // The command has its copies of the terminal; ours, which `cmd` holds, would
            // keep it open after the command's end.
            drop(cmd);
            let reader = tokio::fs::File::from_std(std::fs::File::from(master.try_clone()?));
            let writer = tokio::fs::File::from_std(std::fs::File::from(master.try_clone()?));
            let pumps = vec![pump(reader, output_tx.clone(), ExecOutput::Stdout)];
            tokio::spawn(watch(child, Some(Box::new(writer)), Some(master), pumps, input_rx, output_tx));
        }
    }
    Ok(ExecSession { input, output })
}

/// A new pseudo-terminal of `size`: its controlling side and the command's side.
fn open_pty(size: TermSize) -> std::io::Result<(OwnedFd, OwnedFd)> {
    use rustix::pty::OpenptFlags;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::OpenOptionsExt;
    let master = rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    rustix::pty::grantpt(&master)?;
    rustix::pty::unlockpt(&master)?;
    let name = rustix::pty::ptsname(&master, Vec::new())?;
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_NOCTTY | nix::libc::O_CLOEXEC)
        .open(std::ffi::OsStr::from_bytes(name.as_bytes()))?;
    resize(&master, size)?;
    Ok((master, OwnedFd::from(slave)))
}

/// Tells the terminal `master` controls its new size.
fn resize(master: &OwnedFd, size: TermSize) -> std::io::Result<()> {
    let winsize = rustix::termios::Winsize { ws_row: size.rows, ws_col: size.cols, ws_xpixel: 0, ws_ypixel: 0 };
    Ok(rustix::termios::tcsetwinsize(master, winsize)?)
}

/// Forwards what `from` gives as `wrap`ped output until it ends (a terminal's end reads
/// as an error once its last user has closed it).
fn pump<R: AsyncRead + Send + Unpin + 'static>(
    mut from: R,
    to: mpsc::Sender<ExecOutput>,
    wrap: fn(Vec<u8>) -> ExecOutput,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            if to.send(wrap(buf[..n].to_vec())).await.is_err() {
                return;
            }
        }
    })
}

/// Feeds the command its input until it ends, then reports its status once its output
/// has been read; kills it if the client goes.
async fn watch(
    mut child: tokio::process::Child,
    mut stdin: Option<Box<dyn AsyncWrite + Send + Unpin>>,
    terminal: Option<OwnedFd>,
    pumps: Vec<tokio::task::JoinHandle<()>>,
    mut input: mpsc::Receiver<ExecInput>,
    output: mpsc::Sender<ExecOutput>,
) {
    let pgid = child.id();
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            message = input.recv() => match message {
                Some(ExecInput::Stdin(bytes)) => {
                    if let Some(writer) = stdin.as_mut()
                        && (writer.write_all(&bytes).await.is_err() || writer.flush().await.is_err())
                    {
                        stdin = None;
                    }
                }
                // A terminal ends its input with the end-of-file character, which the
                // client sends as it comes.
                Some(ExecInput::Eof) if terminal.is_none() => stdin = None,
                Some(ExecInput::Eof) => {}
                Some(ExecInput::Resize(size)) => {
                    if let Some(terminal) = &terminal {
                        let _ = resize(terminal, size);
                    }
                }
                None => {
                    // The client is gone: nobody is left to see it, so it ends.
                    if let Some(pgid) = pgid {
                        crate::group::kill_group(pgid);
                    }
                    break child.wait().await;
                }
            },
        }
    };
    drop(stdin);
    for pump in pumps {
        let _ = tokio::time::timeout(DRAIN, pump).await;
    }
    drop(terminal);
    let code = match status {
        Ok(status) => exit_code(status),
        Err(_) => 255,
    };
    let _ = output.send(ExecOutput::Exited(code)).await;
}

/// A status as a shell gives it: the exit code, or 128 + the signal that ended it.
fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status.code().or_else(|| status.signal().map(|s| 128 + s)).unwrap_or(255)
}
