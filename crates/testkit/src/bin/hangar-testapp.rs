//! `hangar-testapp`: a small HTTP app whose behaviour is controlled by
//! environment variables, so end-to-end tests and benchmarks can simulate model
//! servers that set up slowly, fail setup, turn unhealthy, crash, hold memory,
//! stream, ignore SIGTERM, or be cancelled mid-call, without shipping a real
//! model.
//!
//! Environment (the platform sets `PORT`, `HANGAR_APP`, `HANGAR_REVISION`,
//! `HANGAR_RUNNER_ID`; flags count as set when `1` or `true`):
//! - `PORT`: listen on `127.0.0.1:$PORT` (required; `0` picks a free port).
//! - `SETUP_SECONDS` (float, default 0): the health route answers 503 until
//!   this long after start.
//! - `FAIL_SETUP`: after the setup delay, print `setup failed: simulated
//!   failure` to stderr and exit with code 3.
//! - `FAIL_SETUP_IF_EXISTS=PATH`: as `FAIL_SETUP` when that file exists at start.
//! - `SETUP_UNTIL_EXISTS=PATH`: the health route also answers 503 until that
//!   file exists, so a test can hold runners in setup and release them.
//! - `HEALTH_NEVER`: the health route always answers 503.
//! - `HEALTH_PATH` (default `/health`): the health route's path.
//! - `UNHEALTHY_AFTER=N`: once N non-health calls have been answered with a
//!   2xx status, the health route answers 500 forever.
//! - `CRASH_AFTER=N`: the (N+1)th non-health call to arrive waits until N
//!   calls have been answered, then exits with code 42 without answering, so
//!   exactly N calls succeed.
//! - `DELAY_MS` (default 0): delay of generic calls without `delay_ms`.
//! - `FAIL_EVERY=N`: every Nth generic call without `status` answers 500.
//! - `IGNORE_SIGTERM`: SIGTERM is ignored (the platform must SIGKILL).
//! - `QUIET`: no output line per call (for benchmarks).
//!
//! Routes: the health route; `GET /env`; `POST /echo` (streams the body back);
//! `GET /stream?chunks=N&interval_ms=M`; `GET /mem?mb=N`; `GET /exit?code=N`;
//! `POST` to any path ending in `/cancel`; anything else answers a JSON
//! description of the call, after `delay_ms` and with status `status` when
//! those query parameters are given.
//!
//! A call's request id is its `x-fal-request-id` header, else its
//! `x-hangar-request-id`. A `POST .../cancel` marks its request id cancelled
//! and answers `{"cancelled": "<id>"}` (400 without an id). A generic call
//! whose id is cancelled while it waits out `delay_ms` stops at once (checked
//! every 10 ms) and answers 499 `{"detail": "cancelled", "error_type":
//! "request_cancelled"}`.
//!
//! stdout gets `testapp listening on 127.0.0.1:PORT`, `working on <id>` when
//! a generic call starts (`-` without an id), `cancel requested for <id>`,
//! `call <id> stopped: cancelled`, and one `METHOD /path -> STATUS` line per
//! request; everything else goes to stderr. Each line is written (and so
//! flushed) as a whole, so a platform reading the pipe sees it at once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::signal::unix::{Signal, SignalKind, signal};

/// Exit code of a simulated crash (`CRASH_AFTER`).
const CRASH_EXIT_CODE: i32 = 42;
/// Exit code of a simulated setup failure (`FAIL_SETUP`).
const SETUP_FAILED_EXIT_CODE: i32 = 3;
const MIB: usize = 1 << 20;
/// How often a delayed call looks whether it has been cancelled.
const CANCEL_CHECK: Duration = Duration::from_millis(10);

/// Memory taken by `/mem`; global so it is only given back when the process
/// exits, like a model loaded into memory.
static HELD: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

struct Config {
    port: u16,
    setup: Duration,
    fail_setup: bool,
    setup_until: Option<PathBuf>,
    health_never: bool,
    health_path: String,
    unhealthy_after: Option<u64>,
    crash_after: Option<u64>,
    delay_ms: u64,
    fail_every: Option<u64>,
    ignore_sigterm: bool,
    quiet: bool,
}

impl Config {
    fn from_env() -> Config {
        let Some(port) = env_parse::<u16>("PORT") else {
            fail("PORT is not set");
        };
        let setup_seconds = env_parse::<f64>("SETUP_SECONDS").unwrap_or(0.0);
        let setup = Duration::try_from_secs_f64(setup_seconds).unwrap_or_else(|_| {
            fail(&format!("SETUP_SECONDS must be a non-negative number of seconds, got {setup_seconds}"))
        });
        let health_path = std::env::var("HEALTH_PATH").unwrap_or_else(|_| "/health".to_owned());
        if !health_path.starts_with('/') {
            fail(&format!("HEALTH_PATH must start with '/', got {health_path:?}"));
        }
        Config {
            port,
            setup,
            // FAIL_SETUP_IF_EXISTS lets a test break (and mend) the starts of new
            // runners of one revision while the running ones go on.
            fail_setup: env_flag("FAIL_SETUP")
                || std::env::var_os("FAIL_SETUP_IF_EXISTS").is_some_and(|p| std::path::Path::new(&p).exists()),
            setup_until: std::env::var_os("SETUP_UNTIL_EXISTS").filter(|p| !p.is_empty()).map(PathBuf::from),
            health_never: env_flag("HEALTH_NEVER"),
            health_path,
            unhealthy_after: env_parse("UNHEALTHY_AFTER"),
            crash_after: env_parse("CRASH_AFTER"),
            delay_ms: env_parse("DELAY_MS").unwrap_or(0),
            fail_every: env_parse::<u64>("FAIL_EVERY").filter(|n| *n > 0),
            ignore_sigterm: env_flag("IGNORE_SIGTERM"),
            quiet: env_flag("QUIET"),
        }
    }
}

/// Reads an optional variable; a value that does not parse is a test bug, so
/// it stops the app loudly instead of being ignored.
fn env_parse<T: FromStr>(name: &str) -> Option<T> {
    let value = std::env::var(name).ok().filter(|v| !v.trim().is_empty())?;
    match value.trim().parse() {
        Ok(parsed) => Some(parsed),
        Err(_) => fail(&format!("{name} has an invalid value {value:?}")),
    }
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| matches!(v.trim(), "1" | "true" | "yes"))
}

fn fail(message: &str) -> ! {
    eprintln!("testapp: {message}");
    std::process::exit(1)
}

/// Writes one line to stdout. Stdout is line-buffered even into a pipe, so the
/// line goes out at once; a closed stdout (the platform gone) is no reason to
/// fail a call, unlike with `println!`, which would panic.
fn say(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

struct App {
    config: Config,
    started: Instant,
    app: Option<String>,
    revision: Option<String>,
    runner: Option<String>,
    /// Non-health calls that arrived; gives each call its sequence number.
    arrived: AtomicU64,
    /// Non-health calls whose handler has finished (or was dropped).
    answered: AtomicU64,
    /// Non-health calls answered with a 2xx status, for `UNHEALTHY_AFTER`.
    succeeded: AtomicU64,
    /// Request ids whose cancellation was asked for.
    cancelled: Mutex<HashSet<String>>,
}

impl App {
    fn is_cancelled(&self, id: &str) -> bool {
        self.cancelled.lock().unwrap_or_else(|e| e.into_inner()).contains(id)
    }
}

/// Counts a call as answered even when its handler is dropped (client gone),
/// so a `CRASH_AFTER` call waiting for the others cannot wait forever.
struct AnsweredGuard<'a>(&'a AtomicU64);

impl Drop for AnsweredGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

// Single-threaded: the app only sleeps and shuffles bytes, and one thread
// keeps start-up fast and memory low when benchmarks run many runners.
#[tokio::main(flavor = "current_thread")]
async fn main() {
    let config = Config::from_env();

    // Signal handlers go in before the listener exists, so a SIGTERM sent as
    // soon as the runner looks alive is never handled by the default action
    // (which would kill the process even with IGNORE_SIGTERM).
    let term = signal(SignalKind::terminate()).unwrap_or_else(|e| fail(&format!("SIGTERM: {e}")));
    let int = signal(SignalKind::interrupt()).unwrap_or_else(|e| fail(&format!("SIGINT: {e}")));

    let listener = match tokio::net::TcpListener::bind(("127.0.0.1", config.port)).await {
        Ok(listener) => listener,
        Err(e) => fail(&format!("cannot listen on 127.0.0.1:{}: {e}", config.port)),
    };
    let port = listener.local_addr().map_or(config.port, |addr| addr.port());

    let ignore_sigterm = config.ignore_sigterm;
    let app = Arc::new(App {
        config,
        started: Instant::now(),
        app: std::env::var("HANGAR_APP").ok(),
        revision: std::env::var("HANGAR_REVISION").ok(),
        runner: std::env::var("HANGAR_RUNNER_ID").ok(),
        arrived: AtomicU64::new(0),
        answered: AtomicU64::new(0),
        succeeded: AtomicU64::new(0),
        cancelled: Mutex::new(HashSet::new()),
    });
    start_setup(&app.config);

    say(format_args!("testapp listening on 127.0.0.1:{port}"));
    let router = Router::new().fallback(handle).with_state(app);
    let served = axum::serve(listener, router).with_graceful_shutdown(shutdown_signal(term, int, ignore_sigterm)).await;
    if let Err(e) = served {
        fail(&format!("server error: {e}"));
    }
    eprintln!("testapp stopped");
}

/// Reports setup on stderr, as a real app's setup logs would appear, and
/// carries out `FAIL_SETUP` once the setup time has passed.
fn start_setup(config: &Config) {
    if let Some(path) = &config.setup_until {
        eprintln!("testapp: setting up until {} exists", path.display());
    }
    if config.setup.is_zero() && !config.fail_setup {
        return;
    }
    eprintln!("testapp: setting up for {:.3}s", config.setup.as_secs_f64());
    let (setup, fail_setup) = (config.setup, config.fail_setup);
    tokio::spawn(async move {
        tokio::time::sleep(setup).await;
        if fail_setup {
            eprintln!("setup failed: simulated failure");
            std::process::exit(SETUP_FAILED_EXIT_CODE);
        }
        eprintln!("testapp: setup complete");
    });
}

/// Resolves on the first SIGTERM (unless ignored) or SIGINT; axum then stops
/// accepting and lets in-flight requests finish.
async fn shutdown_signal(mut term: Signal, mut int: Signal, ignore_sigterm: bool) {
    loop {
        tokio::select! {
            _ = term.recv() => {
                if ignore_sigterm {
                    eprintln!("testapp: ignoring SIGTERM (IGNORE_SIGTERM)");
                    continue;
                }
                break;
            }
            _ = int.recv() => break,
        }
    }
    eprintln!("testapp stopping");
}

/// One handler for every request: the health path is configurable, so routes
/// are matched here rather than in a static router.
async fn handle(State(app): State<Arc<App>>, req: Request) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let response = if path == app.config.health_path {
        health(&app)
    } else {
        let call = app.arrived.fetch_add(1, Ordering::SeqCst) + 1;
        let _answered = AnsweredGuard(&app.answered);
        if let Some(limit) = app.config.crash_after.filter(|&limit| call > limit) {
            crash(&app, limit).await;
        }
        let response = route(&app, call, req).await;
        if response.status().is_success() {
            app.succeeded.fetch_add(1, Ordering::SeqCst);
        }
        response
    };
    if !app.config.quiet {
        say(format_args!("{method} {path} -> {}", response.status().as_u16()));
    }
    response
}

/// Waits for the first `limit` calls to be answered, so exactly `limit` calls
/// succeed even when clients send concurrently, then dies like a crash.
async fn crash(app: &App, limit: u64) -> ! {
    while app.answered.load(Ordering::SeqCst) < limit {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A handler returning does not mean its bytes are on the wire yet; give
    // the last answered responses a moment to be written.
    tokio::time::sleep(Duration::from_millis(20)).await;
    eprintln!("testapp: crashing after {limit} calls (CRASH_AFTER)");
    std::process::exit(CRASH_EXIT_CODE)
}

fn health(app: &App) -> Response {
    let config = &app.config;
    let waiting_for_file = config.setup_until.as_ref().is_some_and(|path| !path.exists());
    if config.health_never || config.fail_setup || app.started.elapsed() < config.setup || waiting_for_file {
        return (StatusCode::SERVICE_UNAVAILABLE, json_body(json!({"status": "setting up"}))).into_response();
    }
    if config.unhealthy_after.is_some_and(|limit| app.succeeded.load(Ordering::SeqCst) >= limit) {
        return (StatusCode::INTERNAL_SERVER_ERROR, json_body(json!({"status": "unhealthy"}))).into_response();
    }
    json_body(json!({"status": "ok"})).into_response()
}

async fn route(app: &App, call: u64, req: Request) -> Response {
    let query = match Query::<HashMap<String, String>>::try_from_uri(req.uri()) {
        Ok(Query(query)) => query,
        Err(e) => return bad_request(&format!("bad query: {e}")),
    };
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/env") => env_vars(),
        (&Method::POST, "/echo") => echo(req),
        (&Method::GET, "/stream") => stream(&query),
        (&Method::GET, "/mem") => hold_memory(&query).await,
        (&Method::GET, "/exit") => exit(&query),
        (&Method::POST, path) if path.ends_with("/cancel") => cancel(app, req.headers()),
        _ => describe(app, call, &query, req).await,
    }
}

fn env_vars() -> Response {
    let vars: BTreeMap<String, String> = std::env::vars_os()
        .map(|(k, v)| (k.to_string_lossy().into_owned(), v.to_string_lossy().into_owned()))
        .collect();
    json_body(json!(vars)).into_response()
}

/// Streams the body back chunk by chunk, so tests can check that the platform
/// does not buffer large or slow bodies.
fn echo(req: Request) -> Response {
    let body = Body::from_stream(req.into_body().into_data_stream());
    ([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response()
}

fn stream(query: &HashMap<String, String>) -> Response {
    let (chunks, interval_ms) = match (query_param::<u64>(query, "chunks"), query_param::<u64>(query, "interval_ms")) {
        (Ok(chunks), Ok(interval_ms)) => (chunks.unwrap_or(5), interval_ms.unwrap_or(100)),
        (Err(e), _) | (_, Err(e)) => return bad_request(&e),
    };
    let interval = Duration::from_millis(interval_ms);
    let body = futures_util::stream::unfold(0, move |i| async move {
        if i >= chunks {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(interval).await;
        }
        Some((Ok::<_, std::convert::Infallible>(format!("chunk {i}\n")), i + 1))
    });
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], Body::from_stream(body)).into_response()
}

async fn hold_memory(query: &HashMap<String, String>) -> Response {
    let mb = match query_param::<usize>(query, "mb") {
        Ok(mb) => mb.unwrap_or(0),
        Err(e) => return bad_request(&e),
    };
    let Some(bytes) = mb.checked_mul(MIB) else {
        return bad_request("mb is too large");
    };
    // Writing every byte makes the pages resident, so the memory shows up in
    // RSS and cgroup accounting; off the async thread because it can be slow.
    let held = tokio::task::spawn_blocking(move || {
        let mut block = Vec::new();
        block.try_reserve_exact(bytes).ok()?;
        block.resize(bytes, 0x5a_u8);
        let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
        held.push(block);
        Some(held.iter().map(Vec::len).sum::<usize>() / MIB)
    })
    .await;
    match held {
        Ok(Some(total)) => json_body(json!({"held_mb": total})).into_response(),
        _ => (StatusCode::INSUFFICIENT_STORAGE, json_body(json!({"error": format!("cannot allocate {mb} MiB")})))
            .into_response(),
    }
}

fn exit(query: &HashMap<String, String>) -> Response {
    match query_param::<i32>(query, "code") {
        Ok(code) => {
            let code = code.unwrap_or(0);
            eprintln!("testapp: exiting with code {code} (/exit)");
            std::process::exit(code)
        }
        Err(e) => bad_request(&e),
    }
}

/// A call's request id, as the platform forwards it.
fn request_id(headers: &HeaderMap) -> Option<String> {
    ["x-fal-request-id", "x-hangar-request-id"]
        .into_iter()
        .find_map(|name| headers.get(name)?.to_str().ok().filter(|id| !id.is_empty()).map(str::to_owned))
}

fn cancel(app: &App, headers: &HeaderMap) -> Response {
    let Some(id) = request_id(headers) else {
        return bad_request("no x-fal-request-id or x-hangar-request-id header");
    };
    app.cancelled.lock().unwrap_or_else(|e| e.into_inner()).insert(id.clone());
    say(format_args!("cancel requested for {id}"));
    json_body(json!({"cancelled": id})).into_response()
}

/// 499, the status (nginx's "client closed request") that tells the platform
/// the call stopped because it was cancelled.
fn cancelled_response() -> Response {
    let status = StatusCode::from_u16(499).expect("499 is within the valid status range");
    (status, json_body(json!({"detail": "cancelled", "error_type": "request_cancelled"}))).into_response()
}

/// Waits `delay`, looking every few milliseconds whether the call `id` was
/// cancelled meanwhile; returns false, at once, if it was.
async fn wait_unless_cancelled(app: &App, id: Option<&str>, delay: Duration) -> bool {
    let deadline = Instant::now() + delay;
    loop {
        if id.is_some_and(|id| app.is_cancelled(id)) {
            return false;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return true;
        }
        tokio::time::sleep(left.min(CANCEL_CHECK)).await;
    }
}

/// The generic call: describes itself so tests can see which runner answered
/// and what arrived.
async fn describe(app: &App, call: u64, query: &HashMap<String, String>, req: Request) -> Response {
    let id = request_id(req.headers());
    if !app.config.quiet {
        say(format_args!("working on {}", id.as_deref().unwrap_or("-")));
    }
    let delay_ms = match query_param::<u64>(query, "delay_ms") {
        Ok(delay) => delay.unwrap_or(app.config.delay_ms),
        Err(e) => return bad_request(&e),
    };
    let status = match query_param::<u16>(query, "status") {
        Ok(None) if app.config.fail_every.is_some_and(|n| call.is_multiple_of(n)) => StatusCode::INTERNAL_SERVER_ERROR,
        Ok(None) => StatusCode::OK,
        Ok(Some(code)) => match StatusCode::from_u16(code) {
            Ok(status) => status,
            Err(_) => return bad_request(&format!("invalid status {code}")),
        },
        Err(e) => return bad_request(&e),
    };
    if delay_ms > 0 && !wait_unless_cancelled(app, id.as_deref(), Duration::from_millis(delay_ms)).await {
        say(format_args!("call {} stopped: cancelled", id.as_deref().unwrap_or("-")));
        return cancelled_response();
    }
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let raw_query = req.uri().query().unwrap_or("").to_owned();
    let body_len = match axum::body::to_bytes(req.into_body(), usize::MAX).await {
        Ok(body) => body.len(),
        Err(e) => return bad_request(&format!("cannot read body: {e}")),
    };
    let description = json!({
        "app": app.app,
        "revision": app.revision,
        "runner": app.runner,
        "pid": std::process::id(),
        "method": method,
        "path": path,
        "query": raw_query,
        "body_len": body_len,
        "call": call,
    });
    (status, json_body(description)).into_response()
}

fn query_param<T: FromStr>(query: &HashMap<String, String>, name: &str) -> Result<Option<T>, String> {
    query
        .get(name)
        .map(|value| value.parse().map_err(|_| format!("query parameter {name} has an invalid value {value:?}")))
        .transpose()
}

fn bad_request(message: &str) -> Response {
    (StatusCode::BAD_REQUEST, json_body(json!({"error": message}))).into_response()
}

/// JSON with a trailing newline, so curl output in manual checks stays tidy.
fn json_body(value: Value) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], format!("{value}\n"))
}
