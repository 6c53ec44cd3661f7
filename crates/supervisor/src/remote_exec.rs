//! Commands run in a cluster's runners (`runners exec` on a runner of a Slurm job). The
//! agent only ever calls the server, so a command goes to it the same way: the agent
//! keeps asking for commands to run (`GET /v1/agent/execs`, which waits until there is
//! one), runs each in its runner as a local runner's is run ([`crate::exec`]), and
//! carries its input and output over a WebSocket it opens to the server
//! (`/v1/agent/exec/{session}`), which the server joins to the client's.
//!
//! On the agent's socket the server's binary messages are standard input and its text
//! messages [`ExecControl`]s (`eof`, `resize`); the agent's binary messages are output,
//! their first byte naming the stream (1 stdout, 2 stderr), and its last text message
//! `exit`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use model::records::{ExecInput, ExecOutput, TermSize};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc};
use tokio_tungstenite::tungstenite::Message;

use crate::exec::ExecSession;

pub const EXECS_PATH: &str = "/v1/agent/execs";
/// Followed by the session's id.
pub const EXEC_PATH: &str = "/v1/agent/exec/";

/// A command for an agent to run in its runner.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExecOrder {
    pub session: String,
    pub command: Vec<String>,
    /// The terminal's size, when it gets one.
    pub rows: Option<u16>,
    pub cols: Option<u16>,
}

/// The text messages of an agent's exec socket.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecControl {
    Eof,
    Resize { rows: u16, cols: u16 },
    Exit { code: i32 },
}

/// The first byte of an output message: its stream.
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;

/// How long a command waits for its runner's agent to take it.
const TAKEN_WITHIN: Duration = Duration::from_secs(30);

/// A command on its way to an agent: what it was asked, and the ends of its session
/// that the agent's socket is joined to.
struct Waiting {
    order: ExecOrder,
    asked: bool,
    input: mpsc::Receiver<ExecInput>,
    output: mpsc::Sender<ExecOutput>,
}

/// The commands waiting for one runner's agent.
#[derive(Default)]
pub struct ExecQueue {
    waiting: Mutex<Vec<Waiting>>,
    asked: Notify,
}

impl ExecQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Waiting>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `command` for the agent, and returns its session as the client sees it.
    /// If the agent has not taken it within [`TAKEN_WITHIN`], it ends with why.
    pub(crate) fn push(self: &Arc<Self>, command: &[String], tty: Option<TermSize>) -> ExecSession {
        let (input, input_rx) = mpsc::channel(64);
        let (output_tx, output) = mpsc::channel(64);
        let session = hex::encode(rand::random::<[u8; 16]>());
        let order = ExecOrder {
            session: session.clone(),
            command: command.to_vec(),
            rows: tty.map(|t| t.rows),
            cols: tty.map(|t| t.cols),
        };
        self.lock().push(Waiting { order, asked: false, input: input_rx, output: output_tx });
        self.asked.notify_waiters();
        let queue = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(TAKEN_WITHIN).await;
            let left = {
                let mut waiting = queue.lock();
                let at = waiting.iter().position(|w| w.order.session == session);
                at.map(|at| waiting.remove(at))
            };
            if let Some(left) = left {
                let why = format!("the runner's agent did not take the command within {TAKEN_WITHIN:?}\n");
                let _ = left.output.send(ExecOutput::Stderr(why.into_bytes())).await;
                let _ = left.output.send(ExecOutput::Exited(255)).await;
            }
        });
        ExecSession { input, output }
    }

    /// The commands the agent has not been told of yet, waiting up to `within` for one.
    pub async fn next_orders(&self, within: Duration) -> Vec<ExecOrder> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let asked = self.asked.notified();
            let orders: Vec<ExecOrder> = self
                .lock()
                .iter_mut()
                .filter(|w| !w.asked)
                .map(|w| {
                    w.asked = true;
                    w.order.clone()
                })
                .collect();
            if !orders.is_empty() || tokio::time::timeout_at(deadline, asked).await.is_err() {
                return orders;
            }
        }
    }

    /// The ends of session `session`'s client side, for the agent's socket.
    pub fn take(&self, session: &str) -> Option<(mpsc::Receiver<ExecInput>, mpsc::Sender<ExecOutput>)> {
        let mut waiting = self.lock();
        let at = waiting.iter().position(|w| w.order.session == session && w.asked)?;
        let taken = waiting.remove(at);
        Some((taken.input, taken.output))
    }
}

/// `message` as the text it travels as.
pub fn control(message: &ExecControl) -> String {
    serde_json::to_string(message).unwrap_or_default()
}

/// The agent's side: asks the server for commands to run in runner `id` of `backend`
/// until this task is ended, and runs each.
pub(crate) async fn serve_orders(
    http: reqwest::Client,
    url: String,
    token: String,
    backend: Arc<crate::LocalProcesses>,
    id: model::ids::RunnerId,
) {
    use crate::RunnerBackend;
    let base = url.trim_end_matches('/').to_owned();
    loop {
        let asked = http.get(format!("{base}{EXECS_PATH}")).bearer_auth(&token).timeout(Duration::from_secs(60)).send();
        let orders: Vec<ExecOrder> = match asked.await {
            Ok(response) if response.status().is_success() => response.json().await.unwrap_or_default(),
            _ => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        for order in orders {
            let tty = order.rows.zip(order.cols).map(|(rows, cols)| TermSize { rows, cols });
            let session = backend.exec(id, &order.command, tty);
            let socket = base.replacen("http://", "ws://", 1) + EXEC_PATH + &order.session;
            tokio::spawn(run_order(socket, token.clone(), session));
        }
    }
}

/// Joins a command's session to its socket on the server.
async fn run_order(url: String, token: String, session: std::io::Result<ExecSession>) {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let Ok(mut request) = url.as_str().into_client_request() else { return };
    let Ok(bearer) = format!("Bearer {token}").parse() else { return };
    request.headers_mut().insert("authorization", bearer);
    let Ok((socket, _)) = tokio_tungstenite::connect_async(request).await else { return };
    let (mut sink, mut stream) = socket.split();
    let framed = |stream: u8, bytes: Vec<u8>| Message::Binary([&[stream][..], &bytes].concat().into());
    let exit = |code| Message::Text(control(&ExecControl::Exit { code }).into());
    let ExecSession { input, mut output } = match session {
        Ok(session) => session,
        Err(e) => {
            let why = format!("the command could not start in the runner: {e}\n");
            let _ = sink.send(framed(STDERR, why.into_bytes())).await;
            let _ = sink.send(exit(255)).await;
            return;
        }
    };
    loop {
        tokio::select! {
            message = stream.next() => {
                let forward = match message {
                    Some(Ok(Message::Binary(bytes))) => ExecInput::Stdin(bytes.to_vec()),
                    Some(Ok(Message::Text(text))) => match serde_json::from_str(&text) {
                        Ok(ExecControl::Eof) => ExecInput::Eof,
                        Ok(ExecControl::Resize { rows, cols }) => ExecInput::Resize(TermSize { rows, cols }),
                        _ => continue,
                    },
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                    // The client has gone: dropping `input` ends the command.
                    _ => return,
                };
                let _ = input.send(forward).await;
            }
            out = output.recv() => {
                let message = match out {
                    Some(ExecOutput::Stdout(bytes)) => framed(STDOUT, bytes),
                    Some(ExecOutput::Stderr(bytes)) => framed(STDERR, bytes),
                    Some(ExecOutput::Exited(code)) => {
                        let _ = sink.send(exit(code)).await;
                        let _ = sink.send(Message::Close(None)).await;
                        // Until the server has answered the close, so nothing is lost.
                        let _ = tokio::time::timeout(Duration::from_secs(5), async {
                            while let Some(Ok(_)) = stream.next().await {}
                        })
                        .await;
                        return;
                    }
                    None => return,
                };
                if sink.send(message).await.is_err() {
                    return;
                }
            }
        }
    }
}
