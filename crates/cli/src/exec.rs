//! `hangar runners exec` and `hangar runners shell`: a command inside a runner, with
//! this terminal as its own when it has one (raw mode, its size followed), and its
//! exit status as this command's.

use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;

use api::exec::{ExecEvent, ExecWriter};
use model::records::{ExecInput, TermSize};
use tokio::sync::mpsc;

use crate::context::Context;

/// What `runners shell` runs: bash where the runner's image has it, else sh.
pub(crate) const SHELL: [&str; 3] =
    ["/bin/sh", "-c", "if command -v bash >/dev/null 2>&1; then exec bash; else exec sh; fi"];

/// Runs `command` in runner `id`, with a terminal when `tty`; returns its exit status.
pub(crate) async fn exec(cx: &Context, id: &str, command: Vec<String>, tty: bool) -> anyhow::Result<ExitCode> {
    let local = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    let size = tty.then(|| terminal_size(local));
    let connection = cx.client.exec(id, command, size).await?;
    let (mut writer, mut reader) = (connection.writer, connection.reader);
    // From here on this terminal is the command's, until the guard goes.
    let _raw = (tty && local).then(RawMode::enter).transpose()?;
    let mut input = read_stdin();
    let mut resized = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())?;
    let mut input_open = true;
    let code = loop {
        tokio::select! {
            chunk = input.recv(), if input_open => match chunk {
                Some(bytes) => send(&mut writer, ExecInput::Stdin(bytes)).await,
                None => {
                    input_open = false;
                    send(&mut writer, ExecInput::Eof).await;
                }
            },
            _ = resized.recv(), if tty => send(&mut writer, ExecInput::Resize(terminal_size(local))).await,
            event = reader.next() => match event? {
                ExecEvent::Stdout(bytes) => write_all(&mut std::io::stdout(), &bytes),
                ExecEvent::Stderr(bytes) => write_all(&mut std::io::stderr(), &bytes),
                ExecEvent::Exited(code) => break code,
            },
        }
    };
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(255)))
}

/// Sends `input` on; a connection that has broken says so on the reading side.
async fn send(writer: &mut ExecWriter, input: ExecInput) {
    let _ = writer.send(input).await;
}

fn write_all(out: &mut impl Write, bytes: &[u8]) {
    let _ = out.write_all(bytes).and_then(|()| out.flush());
}

/// This terminal's size, or 24 × 80 where there is none.
fn terminal_size(local: bool) -> TermSize {
    match crossterm::terminal::size() {
        Ok((cols, rows)) if local && rows > 0 && cols > 0 => TermSize { rows, cols },
        _ => TermSize { rows: 24, cols: 80 },
    }
}

/// Standard input as it comes, read on a thread of its own (a read cannot be
/// cancelled, and this one must not hold the process up when the command has ended).
/// The channel closes at its end.
fn read_stdin() -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel(16);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(n @ 1..) = stdin.read(&mut buf) {
            if tx.blocking_send(buf[..n].to_vec()).is_err() {
                return;
            }
        }
    });
    rx
}

/// This terminal in raw mode (every key goes to the command as typed), until dropped.
struct RawMode;

impl RawMode {
    fn enter() -> anyhow::Result<RawMode> {
        crossterm::terminal::enable_raw_mode()?;
        Ok(RawMode)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = crossterm::terminal::disable_raw_mode();
    }
}
