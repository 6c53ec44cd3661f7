//! Commands run inside runners over a WebSocket (`GET /v1/runners/{id}/exec`): the
//! server's side, which carries messages between the socket and the command's
//! [`ExecStreams`], and the client's ([`ExecConnection`]).
//!
//! The client's text messages are [`ExecClientMessage`]s (`start` first), its binary
//! messages the command's standard input; the server's binary messages are the
//! command's output, their first byte naming the stream, and its last text message an
//! [`ExecServerMessage`].

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use futures_util::{SinkExt, StreamExt};
use model::records::{ExecInput, ExecOutput, TermSize};
use tokio::sync::mpsc;

use crate::error::{ApiError, ErrorCode};
use crate::router::{Caller, ControlPlane};
use crate::wire::{EXEC_STDERR, EXEC_STDOUT, ExecClientMessage, ExecServerMessage};

/// A command running in a runner, as the control plane hands it to the socket: what
/// goes to it, and what it gives back, [`ExecOutput::Exited`] last. Dropping `input`
/// ends it.
#[derive(Debug)]
pub struct ExecStreams {
    pub input: mpsc::Sender<ExecInput>,
    pub output: mpsc::Receiver<ExecOutput>,
}

/// How long a client has, once upgraded, to say what to run.
const START_WITHIN: Duration = Duration::from_secs(30);

/// How long a client has to answer the server's closing of the connection.
const CLOSE_WITHIN: Duration = Duration::from_secs(5);

/// The terminal's size when the client gives none.
const DEFAULT_SIZE: TermSize = TermSize { rows: 24, cols: 80 };

/// Serves one exec connection: reads what to run, starts it, and carries its input and
/// output until it ends (or the client goes, which ends it).
pub(crate) async fn serve<C: ControlPlane>(control: Arc<C>, caller: Caller, runner: String, mut socket: WebSocket) {
    let start = match tokio::time::timeout(START_WITHIN, socket.recv()).await {
        Ok(Some(Ok(Message::Text(text)))) => {
            serde_json::from_str::<ExecClientMessage>(&text).map_err(|e| e.to_string())
        }
        Ok(Some(Ok(_))) => Err("it is not a text message".to_owned()),
        Ok(_) => return,
        Err(_) => Err(format!("none came within {START_WITHIN:?}")),
    };
    let (command, tty) = match start {
        Ok(ExecClientMessage::Start { command, tty, rows, cols }) => {
            let size = TermSize { rows: rows.unwrap_or(DEFAULT_SIZE.rows), cols: cols.unwrap_or(DEFAULT_SIZE.cols) };
            (command, tty.then_some(size))
        }
        Ok(_) => return refuse(socket, invalid("the first message must be a start message")).await,
        Err(why) => {
            let message =
                format!("the first message must be {{\"type\": \"start\", \"command\": [...], \"tty\": false}}: {why}");
            return refuse(socket, invalid(&message)).await;
        }
    };
    let ExecStreams { input, mut output } = match control.exec(&caller, &runner, command, tty).await {
        Ok(streams) => streams,
        Err(e) => return refuse(socket, e).await,
    };
    let (mut sink, mut stream) = socket.split();
    loop {
        tokio::select! {
            message = stream.next() => {
                let forward = match message {
                    Some(Ok(Message::Binary(bytes))) => ExecInput::Stdin(bytes.to_vec()),
                    Some(Ok(Message::Text(text))) => match serde_json::from_str::<ExecClientMessage>(&text) {
                        Ok(ExecClientMessage::Resize { rows, cols }) => ExecInput::Resize(TermSize { rows, cols }),
                        Ok(ExecClientMessage::Eof) => ExecInput::Eof,
                        // A second start, or something else: not understood, and ignored.
                        _ => continue,
                    },
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    // The client has gone: dropping `input` ends the command.
                    Some(Ok(Message::Close(_)) | Err(_)) | None => return,
                };
                // The command may have ended, its status still on its way: that is
                // what counts, not this input.
                let _ = input.send(forward).await;
            }
            out = output.recv() => {
                let message = match out {
                    Some(ExecOutput::Stdout(bytes)) => framed(EXEC_STDOUT, bytes),
                    Some(ExecOutput::Stderr(bytes)) => framed(EXEC_STDERR, bytes),
                    Some(ExecOutput::Exited(code)) => {
                        let _ = sink.send(text(&ExecServerMessage::Exit { code })).await;
                        let _ = sink.send(Message::Close(None)).await;
                        // Closed when the client has answered: a socket dropped with its
                        // messages unread would be reset, and the client could lose the
                        // status before it read it.
                        let _ = tokio::time::timeout(CLOSE_WITHIN, async {
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

fn invalid(message: &str) -> ApiError {
    ApiError::new(ErrorCode::InvalidRequest, message)
}

/// Tells the client why its command did not run, and closes.
async fn refuse(mut socket: WebSocket, error: ApiError) {
    let error = ExecServerMessage::Error { code: error.code.as_str().to_owned(), message: error.message };
    let _ = socket.send(text(&error)).await;
    let _ = socket.send(Message::Close(None)).await;
    let _ = tokio::time::timeout(CLOSE_WITHIN, async { while let Some(Ok(_)) = socket.recv().await {} }).await;
}

fn text(message: &ExecServerMessage) -> Message {
    Message::Text(serde_json::to_string(message).unwrap_or_default().into())
}

fn framed(stream: u8, bytes: Vec<u8>) -> Message {
    let mut framed = Vec::with_capacity(bytes.len() + 1);
    framed.push(stream);
    framed.extend_from_slice(&bytes);
    Message::Binary(framed.into())
}

type ClientSocket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A command running in a runner, as the client sees it: what goes to it
/// ([`ExecWriter`]) and what comes back ([`ExecReader`]), usable at the same time.
pub struct ExecConnection {
    pub writer: ExecWriter,
    pub reader: ExecReader,
}

pub struct ExecWriter {
    sink: futures_util::stream::SplitSink<ClientSocket, tokio_tungstenite::tungstenite::Message>,
    url: String,
}

pub struct ExecReader {
    stream: futures_util::stream::SplitStream<ClientSocket>,
    url: String,
}

/// What comes back from a command running in a runner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// It ended with this status (the last event).
    Exited(i32),
}

impl crate::client::Client {
    /// Starts `command` in `runner`, with a terminal of `tty`'s size when given.
    pub async fn exec(
        &self,
        runner: &str,
        command: Vec<String>,
        tty: Option<TermSize>,
    ) -> crate::client::Result<ExecConnection> {
        use crate::client::ClientError;
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let base = self.base_url();
        let url = match base.split_once("://") {
            Some(("http", rest)) => format!("ws://{rest}/v1/runners/{}/exec", crate::client::seg(runner)),
            _ => {
                return Err(ClientError::Socket {
                    url: base.to_owned(),
                    detail: "runners exec reaches the API over plain http:// only".to_owned(),
                });
            }
        };
        let socket_error = |detail: String| ClientError::Socket { url: url.clone(), detail };
        let mut request = url.as_str().into_client_request().map_err(|e| socket_error(e.to_string()))?;
        for (name, value) in self.auth_headers() {
            let value = value.parse().map_err(|_| socket_error(format!("the {name} header is not valid")))?;
            request.headers_mut().insert(name, value);
        }
        let (mut socket, _) = match tokio_tungstenite::connect_async(request).await {
            Ok(connected) => connected,
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                let status = response.status().as_u16();
                let body = response.body().clone().unwrap_or_default();
                return Err(match serde_json::from_slice::<crate::error::ErrorBody>(&body) {
                    Ok(e) => ClientError::Api { status, code: e.error.code, message: e.error.message },
                    Err(_) => ClientError::Unexpected {
                        url,
                        status,
                        detail: String::from_utf8_lossy(&body).chars().take(200).collect(),
                    },
                });
            }
            Err(tokio_tungstenite::tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                return Err(socket_error(format!("cannot reach the hangar server: {e}")));
            }
            Err(e) => return Err(socket_error(e.to_string())),
        };
        let start = ExecClientMessage::Start {
            command,
            tty: tty.is_some(),
            rows: tty.map(|t| t.rows),
            cols: tty.map(|t| t.cols),
        };
        let start = serde_json::to_string(&start).map_err(|e| socket_error(e.to_string()))?;
        socket.send(start.into()).await.map_err(|e| socket_error(e.to_string()))?;
        let (sink, stream) = socket.split();
        Ok(ExecConnection { writer: ExecWriter { sink, url: url.clone() }, reader: ExecReader { stream, url } })
    }
}

impl ExecWriter {
    /// Sends the command its input, the end of it, or its terminal's new size.
    pub async fn send(&mut self, input: ExecInput) -> crate::client::Result<()> {
        use tokio_tungstenite::tungstenite::Message as M;
        let message = match input {
            ExecInput::Stdin(bytes) => M::Binary(bytes.into()),
            ExecInput::Eof => M::Text(r#"{"type":"eof"}"#.into()),
            ExecInput::Resize(size) => {
                let resize = ExecClientMessage::Resize { rows: size.rows, cols: size.cols };
                M::Text(serde_json::to_string(&resize).unwrap_or_default().into())
            }
        };
        self.sink
            .send(message)
            .await
            .map_err(|e| crate::client::ClientError::Socket { url: self.url.clone(), detail: e.to_string() })
    }
}

impl ExecReader {
    /// What the command gives next: output, then its end. An error when it could not
    /// start (the API's error) or the connection broke before it ended.
    pub async fn next(&mut self) -> crate::client::Result<ExecEvent> {
        use crate::client::ClientError;
        use tokio_tungstenite::tungstenite::Message as M;
        loop {
            let message = match self.stream.next().await {
                Some(Ok(message)) => message,
                Some(Err(e)) => return Err(ClientError::Socket { url: self.url.clone(), detail: e.to_string() }),
                None => {
                    return Err(ClientError::Socket {
                        url: self.url.clone(),
                        detail: "the server closed the connection before the command ended".to_owned(),
                    });
                }
            };
            match message {
                M::Binary(bytes) => match bytes.split_first() {
                    Some((&EXEC_STDOUT, rest)) => return Ok(ExecEvent::Stdout(rest.to_vec())),
                    Some((&EXEC_STDERR, rest)) => return Ok(ExecEvent::Stderr(rest.to_vec())),
                    _ => continue,
                },
                M::Text(text) => match serde_json::from_str::<ExecServerMessage>(&text) {
                    Ok(ExecServerMessage::Exit { code }) => return Ok(ExecEvent::Exited(code)),
                    Ok(ExecServerMessage::Error { code, message }) => {
                        let status = crate::error::ErrorCode::ALL
                            .iter()
                            .find(|c| c.as_str() == code)
                            .map_or(500, |c| c.status().as_u16());
                        return Err(ClientError::Api { status, code, message });
                    }
                    Err(_) => continue,
                },
                M::Close(_) => {
                    return Err(ClientError::Socket {
                        url: self.url.clone(),
                        detail: "the server closed the connection before the command ended".to_owned(),
                    });
                }
                _ => continue,
            }
        }
    }
}
