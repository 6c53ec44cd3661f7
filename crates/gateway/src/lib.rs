//! The gateway: the data plane that carries calls to apps. `ANY /{team}/{app}[/path]`
//! is checked against the app's auth mode, waits for a free slot on a set-up runner of
//! the current revision (see [`route`]), and is proxied to it with both bodies
//! streaming. The gateway knows nothing of SQL or processes: the server registers one
//! [`AppRoute`] per app and its controller keeps the route's runners up to date.

mod body;
mod chunked;
pub mod conn;
mod fast;
pub mod forward;
mod metrics;
mod pool;
pub mod route;
mod upstream;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use api::error::{ApiError, ErrorCode};
use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use model::ids::{RevisionId, RunnerId};
use model::revision::AuthMode;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use metrics::{CallLabels, Figures, Metrics};
pub use route::{AcquireError, AppRoute, CutOff, Lease, RouteConfig, RouteSnapshot, SlotView};
pub use upstream::UpstreamBody;

use crate::body::LeaseBody;

/// The header a caller sets to bound how long a call may wait for a runner (seconds).
pub const START_TIMEOUT_HEADER: &str = "x-hangar-request-timeout";
/// The same, as `fal_client` spells it (its `start_timeout` argument), so that its code
/// keeps working unchanged.
pub const FAL_START_TIMEOUT_HEADER: &str = "x-fal-request-timeout";
pub const REQUEST_ID_HEADER: &str = "x-hangar-request-id";
pub const RUNNER_ID_HEADER: &str = "x-hangar-runner-id";
pub const REVISION_HEADER: &str = "x-hangar-revision";

/// Who a key belongs to, as far as calling apps goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyOwner {
    pub team_id: Uuid,
    /// Root keys may call any team's apps.
    pub root: bool,
}

/// Answers the durable queue's requests (`/queue/...`), which the gateway hands over
/// whole. `secure` says whether the call came over TLS, for the URLs it hands out.
pub trait QueueHandler: Send + Sync + 'static {
    fn handle(self: Arc<Self>, request: Request, secure: bool) -> Pin<Box<dyn Future<Output = Response> + Send>>;
}

/// Why a call sent to a runner got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// The connection failed or broke: the runner is gone, or going. Nothing was
    /// answered, so the call may be sent again elsewhere.
    Lost(Option<CutOff>),
    /// It ran past the app's request timeout; the runner has been flagged.
    Timeout,
}

/// Finds the revision a call pins with [`REVISION_HEADER`]. The server implements it
/// over its store.
pub trait RevisionFinder: Send + Sync + 'static {
    /// The Deployed revision of the route's app whose id starts with `prefix`, or the
    /// error its caller gets: a 4xx naming what was wrong.
    fn deployed<'a>(
        &'a self,
        route: &'a AppRoute,
        prefix: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<RevisionId, ApiError>> + Send + 'a>>;
}

/// Checks the keys callers present. The server implements it over its store.
pub trait Authenticator: Send + Sync + 'static {
    /// The owner of the key in an `Authorization` header, or `None` if the key is
    /// malformed, unknown or revoked.
    fn owner<'a>(&'a self, authorization: &'a str) -> Pin<Box<dyn Future<Output = Option<KeyOwner>> + Send + 'a>>;
}

pub struct Gateway {
    /// By `team/app`, the way the path spells it, so a call finds its route without
    /// allocating.
    routes: RwLock<HashMap<String, Arc<AppRoute>, foldhash::fast::RandomState>>,
    auth: Arc<dyn Authenticator>,
    queue: OnceLock<Arc<dyn QueueHandler>>,
    /// Where servers share a store: which runs the apps this one does not.
    locator: OnceLock<Arc<dyn forward::Locator>>,
    /// Finds pinned revisions; without one, a call that pins a revision is refused.
    revisions: OnceLock<Arc<dyn RevisionFinder>>,
    default_start_timeout: Duration,
    /// How long a connection may sit idle, and take to send a request's headers.
    timeouts: conn::Timeouts,
    pub metrics: Metrics,
}

impl Gateway {
    pub fn new(
        auth: Arc<dyn Authenticator>,
        default_start_timeout: Duration,
        timeouts: conn::Timeouts,
    ) -> Arc<Gateway> {
        Arc::new(Gateway {
            routes: RwLock::default(),
            auth,
            queue: OnceLock::new(),
            locator: OnceLock::new(),
            revisions: OnceLock::new(),
            default_start_timeout,
            timeouts,
            metrics: Metrics::default(),
        })
    }

    /// How connections are served: HTTP/1.1, with hyper's header timer as a backstop to
    /// the connection's own timeouts (see [`conn`]).
    fn http1(&self) -> hyper::server::conn::http1::Builder {
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(self.timeouts.hyper_backstop());
        builder
    }

    pub fn register(&self, team: &str, route: Arc<AppRoute>) {
        let key = format!("{team}/{}", route.app);
        let _ = route.label.set(Arc::new(key.clone()));
        self.routes.write().unwrap_or_else(|e| e.into_inner()).insert(key, route);
    }

    /// Forgets an app. Calls waiting for one of its runners give up.
    pub fn unregister(&self, team: &str, app: &str) {
        let removed = self.routes.write().unwrap_or_else(|e| e.into_inner()).remove(&format!("{team}/{app}"));
        if let Some(route) = removed {
            route.close();
        }
    }

    /// Hands `/queue/...` calls to `handler` from now on. Without one they get 404.
    pub fn set_queue(&self, handler: Arc<dyn QueueHandler>) {
        let _ = self.queue.set(handler);
    }

    /// Forwards calls for apps this server does not run to the server `locator` names.
    pub fn set_locator(&self, locator: Arc<dyn forward::Locator>) {
        let _ = self.locator.set(locator);
    }

    /// Finds the revisions calls pin with `finder` from now on.
    pub fn set_revision_finder(&self, finder: Arc<dyn RevisionFinder>) {
        let _ = self.revisions.set(finder);
    }

    /// The revision a call pins with [`REVISION_HEADER`], if it pins one: a Deployed
    /// revision of the route's app, found by a prefix of its id.
    pub async fn pinned(&self, route: &AppRoute, headers: &HeaderMap) -> Result<Option<RevisionId>, ApiError> {
        let Some(value) = headers.get(REVISION_HEADER) else { return Ok(None) };
        let prefix = value.to_str().map(str::trim).unwrap_or("");
        if prefix.is_empty() {
            return Err(ApiError::new(
                ErrorCode::InvalidRequest,
                format!("{REVISION_HEADER} must name a revision by its id or a prefix of it"),
            ));
        }
        // The current revision, named in full, needs no lookup.
        if let Some(current) = route.revision()
            && current.to_string() == prefix
        {
            return Ok(Some(current));
        }
        let Some(finder) = self.revisions.get() else {
            return Err(ApiError::new(ErrorCode::RevisionNotFound, format!("no revision matches {prefix:?}")));
        };
        finder.deployed(route, prefix).await.map(Some)
    }

    /// Where to send `request` instead of answering it here: the server that runs its
    /// app, when that is another (and the call has not been forwarded already).
    fn elsewhere(&self, request: &Request) -> Option<(forward::Located, &dyn forward::Locator)> {
        let locator = self.locator.get()?;
        let team_and_app = call_app(request.uri().path())?;
        if self.routes.read().unwrap_or_else(|e| e.into_inner()).contains_key(team_and_app) {
            return None;
        }
        let located = locator.locate(team_and_app)?;
        // A forwarded call is not passed on again; but one that came just before this
        // server has the app's route (it has just taken the app) waits for it.
        if forward::was_forwarded(request) && matches!(located, forward::Located::Elsewhere(_)) {
            return None;
        }
        Some((located, locator.as_ref()))
    }

    /// The default start deadline of calls that do not set one.
    pub fn default_start_timeout(&self) -> Duration {
        self.default_start_timeout
    }

    /// The route of `team/app`.
    pub fn route(&self, team_and_app: &str) -> Option<Arc<AppRoute>> {
        self.routes.read().unwrap_or_else(|e| e.into_inner()).get(team_and_app).cloned()
    }

    /// Serves calls on `listener` until `shutdown` is cancelled, then lets the calls in
    /// flight finish. HTTP/1.1, on the gateway's own path for the common calls
    /// ([`fast`]) and on hyper for the rest, without a router in between: this is the
    /// hot path of every call.
    ///
    /// With `tls`, every connection is TLS (rustls); without, plain HTTP.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
        shutdown: CancellationToken,
    ) {
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        let graceful = GracefulShutdown::new();
        loop {
            let (stream, _) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: wait a moment, go on.
                        tracing::warn!(error = %e, "gateway cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = shutdown.cancelled() => break,
            };
            // Calls are small request/response exchanges: send each write at once.
            let _ = stream.set_nodelay(true);
            let secure = acceptor.is_some();
            let Some(acceptor) = acceptor.clone() else {
                let connection = self.clone().connection(stream, secure, graceful.watcher(), shutdown.clone());
                tokio::spawn(connection);
                continue;
            };
            // The TLS handshake runs in the connection's own task, so a slow or broken
            // client never holds up the accept loop.
            let (watcher, closing) = (graceful.watcher(), shutdown.clone());
            let gateway = self.clone();
            tokio::spawn(async move {
                let stream = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => return tracing::debug!(error = %e, "TLS handshake failed"),
                    Err(_) => return tracing::debug!("TLS handshake timed out"),
                };
                gateway.connection(stream, secure, watcher, closing).await;
            });
        }
        graceful.shutdown().await;
    }

    /// Serves the calls of one connection until the client closes it or it sits idle, or
    /// sends a request's headers, for too long: on the gateway's own path ([`fast`]) while
    /// its calls are the common kind, then on hyper's. `graceful` keeps the server's
    /// shutdown waiting for it; `closing` says that shutdown has begun.
    fn connection<S>(
        self: Arc<Self>,
        stream: S,
        secure: bool,
        graceful: hyper_util::server::graceful::Watcher,
        closing: CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let timeouts = self.timeouts;
        async move {
            let (activity, stream) = timeouts.watch(stream);
            let fast = fast::serve(&self, stream, &activity, &closing);
            let stream = match timeouts.serve(&activity, fast, Some(&closing)).await {
                Some(fast::Ended::HandOver(mut stream, read)) => {
                    stream.unread(read);
                    stream
                }
                Some(fast::Ended::Done) => return,
                None => return tracing::debug!("gateway connection closed: idle, or its headers too slow"),
            };
            let http1 = self.http1();
            let service = hyper::service::service_fn({
                let activity = activity.clone();
                move |request: http::Request<Incoming>| {
                    activity.request_started();
                    let (gateway, activity) = (self.clone(), activity.clone());
                    async move {
                        let answer = call(gateway, request.map(Body::new), secure).await;
                        Ok::<_, std::convert::Infallible>(answer.map(|body| conn::Answer::new(body, activity)))
                    }
                }
            });
            let connection = graceful.watch(http1.serve_connection(TokioIo::new(stream), service));
            match timeouts.serve(&activity, connection, None).await {
                Some(Err(e)) => tracing::debug!(error = %e, "gateway connection ended with an error"),
                None => tracing::debug!("gateway connection closed: idle, or its headers too slow"),
                Some(Ok(())) => {}
            }
        }
    }

    /// Serves calls on `listener` with `threads` threads, each with a single-threaded
    /// runtime of its own that accepts connections and carries their calls to runners,
    /// the way nginx runs one event loop per worker: a call and the upstream connection
    /// it uses stay on one thread, so it never waits for a wake-up across threads.
    /// Resolves when every thread has stopped, after `shutdown` and the calls in flight.
    pub async fn serve_threads(
        self: Arc<Self>,
        listener: std::net::TcpListener,
        threads: usize,
        tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> std::io::Result<()> {
        listener.set_nonblocking(true)?;
        let mut done = Vec::new();
        for n in 0..threads.max(1) {
            let (listener, gateway, tls, shutdown) =
                (listener.try_clone()?, self.clone(), tls.clone(), shutdown.clone());
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            std::thread::Builder::new().name(format!("gateway-{n}")).spawn(move || {
                runtime.block_on(async move {
                    match TcpListener::from_std(listener) {
                        Ok(listener) => gateway.serve(listener, tls, shutdown).await,
                        Err(e) => tracing::error!(error = %e, "a gateway thread cannot listen"),
                    }
                });
                drop(tx);
            })?;
            done.push(rx);
        }
        for rx in done {
            let _ = rx.await;
        }
        Ok(())
    }

    /// Checks that the caller's key may call the app `team/app` (its route), under its
    /// auth mode. A caller who may not call it learns nothing of whether it exists: with
    /// no valid key the answer is 401, whether or not there is such an app; with another
    /// team's key to a private app it is the 404 of an app that does not exist.
    pub async fn authorize(&self, team_and_app: &str, headers: &HeaderMap) -> Result<Arc<AppRoute>, ApiError> {
        let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        self.authorize_key(self.route(team_and_app), team_and_app, authorization).await
    }

    /// [`authorize`](Self::authorize), given the app's route (if there is one here) and
    /// the `Authorization` header's value.
    async fn authorize_key(
        &self,
        route: Option<Arc<AppRoute>>,
        team_and_app: &str,
        authorization: Option<&str>,
    ) -> Result<Arc<AppRoute>, ApiError> {
        let auth = route.as_ref().map(|r| r.config().auth);
        if let (Some(route), Some(AuthMode::Public)) = (&route, auth) {
            return Ok(route.clone());
        }
        let Some(authorization) = authorization else {
            return Err(ApiError::new(
                ErrorCode::Unauthorized,
                format!("app {team_and_app} needs an API key: send 'Authorization: Key <id>:<secret>'"),
            ));
        };
        let Some(owner) = self.auth.owner(authorization).await else {
            return Err(ApiError::new(ErrorCode::Unauthorized, "invalid or revoked API key"));
        };
        let not_found = || ApiError::new(ErrorCode::AppNotFound, format!("app {team_and_app} not found"));
        let route = route.ok_or_else(not_found)?;
        match auth {
            Some(AuthMode::Public | AuthMode::Shared) => Ok(route),
            Some(AuthMode::Private) if owner.root || owner.team_id == route.team_id => Ok(route),
            _ => Err(not_found()),
        }
    }

    /// Sends a call to the runner holding `runner`'s slot and waits for the head of its
    /// answer until `deadline` (the app's request timeout).
    pub async fn send(
        &self,
        route: &AppRoute,
        runner: RunnerId,
        addr: &netns::Endpoint,
        request: http::Request<Body>,
        deadline: Instant,
    ) -> Result<http::Response<UpstreamBody>, SendError> {
        let timer = std::pin::pin!(tokio::time::sleep_until(deadline));
        self.send_until(route, runner, addr, request, timer).await
    }

    /// [`send`](Self::send), bounded by a timer the caller keeps for the body.
    async fn send_until(
        &self,
        route: &AppRoute,
        runner: RunnerId,
        addr: &netns::Endpoint,
        request: http::Request<Body>,
        timer: Pin<&mut tokio::time::Sleep>,
    ) -> Result<http::Response<UpstreamBody>, SendError> {
        tokio::select! {
            sent = upstream::send(addr, request) => sent.map_err(|e| {
                tracing::debug!(runner = %runner, error = %e, "call to runner failed");
                SendError::Lost(route.cut_reason(runner))
            }),
            () = timer => {
                route.flag_timed_out(runner);
                Err(SendError::Timeout)
            }
        }
    }
}

/// Sends `request` straight to the runner at `endpoint`, outside any slot (a cancel
/// notice, say), and answers the status of its reply.
pub async fn notify_runner(
    endpoint: &netns::Endpoint,
    request: http::Request<Body>,
) -> Result<http::StatusCode, String> {
    let response = upstream::send(endpoint, request).await.map_err(|e| e.to_string())?;
    Ok(response.status())
}

/// Headers that belong to one hop and are never forwarded.
const HOP_BY_HOP: &[HeaderName] = &[
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::HOST,
    // The platform's key is for the platform, not for the app.
    header::AUTHORIZATION,
];

/// The request to send to the runner at `host` for a call to `path_and_query` (the
/// part after `/{team}/{app}`): the caller's headers without the hop-by-hop ones, the
/// platform's key and its start deadline, plus the call's id.
pub fn upstream_request(
    host: &HeaderValue,
    method: http::Method,
    path_and_query: &str,
    caller_headers: &HeaderMap,
    body: Body,
    request_id: &HeaderValue,
) -> Result<http::Request<Body>, ApiError> {
    let uri = http::Uri::try_from(path_and_query)
        .map_err(|e| ApiError::new(ErrorCode::InvalidRequest, format!("invalid path {path_and_query:?}: {e}")))?;
    let mut upstream = http::Request::new(body);
    *upstream.method_mut() = method;
    *upstream.uri_mut() = uri;
    let headers = upstream.headers_mut();
    headers.reserve(caller_headers.len() + 2);
    for (name, value) in caller_headers {
        if forwarded(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    headers.insert(header::HOST, host.clone());
    headers.insert(REQUEST_ID_HEADER, request_id.clone());
    Ok(upstream)
}

/// Whether a caller's header goes on to the runner.
pub fn forwarded(name: &HeaderName) -> bool {
    !HOP_BY_HOP.contains(name) && name.as_str() != START_TIMEOUT_HEADER && name.as_str() != FAL_START_TIMEOUT_HEADER
}

async fn call(gateway: Arc<Gateway>, request: Request, secure: bool) -> Response {
    let request = match relay(&gateway, request).await {
        Ok(answer) => return answer,
        Err(here) => here,
    };
    if request.uri().path().starts_with("/queue/") {
        return match gateway.queue.get() {
            Some(queue) => queue.clone().handle(request, secure).await,
            None => ApiError::new(ErrorCode::NotFound, "this gateway has no queue").into_response(),
        };
    }
    let mut id = [0; uuid::fmt::Hyphenated::LENGTH];
    let request_id = HeaderValue::from_bytes(Uuid::new_v4().hyphenated().encode_lower(&mut id).as_bytes())
        .unwrap_or(HeaderValue::from_static("-"));
    let mut response = match proxy(&gateway, request, &request_id).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    };
    response.headers_mut().insert(REQUEST_ID_HEADER, request_id);
    response
}

/// Sends a call for an app that another server runs there. While no server runs the
/// app (the one that did has died or left, and another is taking it over), or the one
/// that does cannot be reached, the call waits, within its start deadline, as it would
/// for a runner to start. Gives the call back when it is this server's to answer.
async fn relay(gateway: &Gateway, mut request: Request) -> Result<Response, Request> {
    let Some(first) = gateway.elsewhere(&request) else { return Err(request) };
    let wait = start_timeout(request.headers(), gateway.default_start_timeout).unwrap_or(gateway.default_start_timeout);
    let deadline = Instant::now() + wait;
    let mut located = Some(first);
    loop {
        let last = match located {
            None => return Err(request),
            Some((forward::Located::Elsewhere(owner), locator)) => {
                match forward::try_forward(owner.gateway, &owner.server, locator.me(), request).await {
                    Ok(answer) => return Ok(answer),
                    Err((back, unavailable)) => {
                        request = back;
                        unavailable
                    }
                }
            }
            Some((forward::Located::Nowhere, _)) => forward::nowhere(request.uri().path()),
        };
        if Instant::now() >= deadline {
            return Ok(last);
        }
        tokio::time::sleep(RELAY_RETRY).await;
        located = gateway.elsewhere(&request);
    }
}

/// The `team/app` a call (`/{team}/{app}…`) or a queue call (`/queue/{team}/{app}…`) is
/// for.
fn call_app(path: &str) -> Option<&str> {
    let path = path.strip_prefix("/queue").filter(|rest| rest.starts_with('/')).unwrap_or(path);
    Some(AppPath::parse(path)?.team_and_app)
}

/// How often a call waiting for an app's new server looks again.
const RELAY_RETRY: Duration = Duration::from_millis(25);

/// A call's path, `/{team}/{app}[/rest]`, split where its slashes are. Exactly one
/// slash comes first: `//team/app` names no app (an empty team), as does any path with an
/// empty team or app segment; nothing is decoded or normalised, so a name is matched as
/// it was sent.
#[derive(Debug, PartialEq, Eq)]
struct AppPath<'a> {
    /// `team/app`, the route's key.
    team_and_app: &'a str,
    team: &'a str,
    app: &'a str,
    /// What the runner sees: empty, or from the slash after the app on.
    rest: &'a str,
}

impl<'a> AppPath<'a> {
    fn parse(path: &'a str) -> Option<AppPath<'a>> {
        // Byte searches: `/` is ASCII, and this runs for every call.
        let slash = |s: &str| s.bytes().position(|b| b == b'/');
        let after = path.strip_prefix('/')?;
        let at = slash(after)?;
        let (team, tail) = (&after[..at], &after[at + 1..]);
        let (app, rest) = slash(tail).map_or((tail, ""), |at| tail.split_at(at));
        if team.is_empty() || app.is_empty() {
            return None;
        }
        let team_and_app = &after[..team.len() + 1 + app.len()];
        Some(AppPath { team_and_app, team, app, rest })
    }
}

async fn proxy(gateway: &Gateway, request: Request, request_id: &HeaderValue) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    let path = request.uri().path().to_owned();
    let Some(AppPath { team_and_app, team, app, rest }) = AppPath::parse(&path) else {
        return Err(ApiError::new(ErrorCode::NotFound, "call an app at /{team}/{app}[/path]"));
    };
    let route = gateway.authorize(team_and_app, request.headers()).await?;
    let config = route.config();
    let start_timeout = start_timeout(request.headers(), gateway.default_start_timeout)?;
    let pin = gateway.pinned(&route, request.headers()).await?;

    let lease =
        route.acquire(arrived + start_timeout, pin).await.map_err(|e| acquire_error(e, team, app, start_timeout))?;
    let app_label = route.label.get().cloned().unwrap_or_else(|| Arc::new(team_and_app.to_owned()));

    let (parts, body) = request.into_parts();
    // The runner sees the path after `/{team}/{app}`, and the query.
    let target = match (rest, parts.uri.query()) {
        ("", None) => "/".to_owned(),
        ("", Some(query)) => format!("/?{query}"),
        (rest, None) => rest.to_owned(),
        (rest, Some(query)) => format!("{rest}?{query}"),
    };
    let upstream = upstream_request(&lease.labels.host, parts.method, &target, &parts.headers, body, request_id)?;

    // One timer bounds both the wait for the answer and its body.
    let mut timer = Box::pin(tokio::time::sleep(config.request_timeout));
    let runner = lease.runner;
    let response = match gateway.send_until(&route, runner, &lease.addr, upstream, timer.as_mut()).await {
        Ok(response) => response,
        Err(SendError::Lost(cut)) => {
            gateway.metrics.record(&app_label, &lease.labels, 503, arrived.elapsed());
            return Err(lost_error(cut, runner, team, app));
        }
        Err(SendError::Timeout) => {
            gateway.metrics.record(&app_label, &lease.labels, 504, arrived.elapsed());
            return Err(ApiError::new(
                ErrorCode::RequestTimeout,
                format!("the call ran longer than the app's request_timeout of {:?}", config.request_timeout),
            ));
        }
    };
    gateway.metrics.record(&app_label, &lease.labels, response.status().as_u16(), arrived.elapsed());
    let (mut parts, incoming) = response.into_parts();
    for name in HOP_BY_HOP {
        parts.headers.remove(name);
    }
    parts.headers.insert(RUNNER_ID_HEADER, lease.labels.runner.clone());
    parts.headers.insert(REVISION_HEADER, lease.labels.revision.clone());
    Ok(Response::from_parts(parts, Body::new(LeaseBody::new(incoming, lease, timer))))
}

/// Why a call got no slot, as its caller is told.
fn acquire_error(e: AcquireError, team: &str, app: &str, start_timeout: Duration) -> ApiError {
    match e {
        AcquireError::NoRevision => {
            ApiError::new(ErrorCode::NoRevision, format!("app {team}/{app} has no deployed revision"))
        }
        AcquireError::Suspended => {
            ApiError::new(ErrorCode::Suspended, format!("app {team}/{app} is suspended; resume it to call it"))
        }
        AcquireError::Gone => ApiError::new(ErrorCode::AppNotFound, format!("app {team}/{app} not found")),
        AcquireError::Deadline => ApiError::new(
            ErrorCode::StartTimeout,
            format!(
                "the call did not start within its start deadline of {start_timeout:?} \
                 (set with the {START_TIMEOUT_HEADER} header); no runner of {team}/{app} was free"
            ),
        ),
    }
}

/// A call whose runner went away before it answered, as its caller is told.
fn lost_error(cut: Option<CutOff>, runner: RunnerId, team: &str, app: &str) -> ApiError {
    match cut {
        Some(CutOff::ForcedRollout) => ApiError::new(
            ErrorCode::RolloutForced,
            format!("the call was cut off by a forced rollout of {team}/{app}; send it again"),
        ),
        Some(CutOff::Killed) => {
            ApiError::new(ErrorCode::RunnerLost, format!("runner {runner} of {team}/{app} was killed during the call"))
        }
        None => ApiError::new(
            ErrorCode::RunnerLost,
            format!("runner {runner} of {team}/{app} stopped before answering the call"),
        ),
    }
}

/// The call's start deadline from its header, else the server's default.
pub fn start_timeout(headers: &HeaderMap, default: Duration) -> Result<Duration, ApiError> {
    let value = headers.get(START_TIMEOUT_HEADER).or_else(|| headers.get(FAL_START_TIMEOUT_HEADER));
    parse_start_timeout(value.map(HeaderValue::as_bytes), default)
}

/// [`start_timeout`] from the header's value, if the call sent one.
fn parse_start_timeout(value: Option<&[u8]>, default: Duration) -> Result<Duration, ApiError> {
    let Some(value) = value else {
        return Ok(default);
    };
    std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0 && *s <= 86_400.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidRequest,
                format!(
                    "{START_TIMEOUT_HEADER} must be a number of seconds between 0 and 86400, got {:?}",
                    String::from_utf8_lossy(value)
                ),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_path_is_split_where_its_slashes_are() {
        let app = |team_and_app, team, app, rest| Some(AppPath { team_and_app, team, app, rest });
        let cases = [
            ("/default/echo", app("default/echo", "default", "echo", "")),
            ("/default/echo/", app("default/echo", "default", "echo", "/")),
            ("/default/echo/a/b//c", app("default/echo", "default", "echo", "/a/b//c")),
            ("/t/é/x", app("t/é", "t", "é", "/x")),
            ("/é/ü", app("é/ü", "é", "ü", "")),
            ("/def%61ult/echo", app("def%61ult/echo", "def%61ult", "echo", "")),
            // No app named: an empty team or app, a leading double slash, one segment.
            ("//a/é", None),
            ("//default/echo", None),
            ("/default//echo", None),
            ("/default/", None),
            ("/default", None),
            ("/", None),
            ("", None),
            ("default/echo", None),
        ];
        for (path, want) in cases {
            assert_eq!(AppPath::parse(path), want, "{path:?}");
        }
    }

    #[test]
    fn a_call_and_a_queue_call_name_their_app_alike() {
        let cases: &[(&str, Option<&str>)] = &[
            ("/default/web", Some("default/web")),
            ("/default/web/predict?x=1", Some("default/web")),
            ("/queue/default/web", Some("default/web")),
            ("/queue/default/web/requests/1234/status", Some("default/web")),
            // Every `/queue/…` path is the queue's, as the gateway routes it.
            ("/queue/web", None),
            ("/queuex/default/web", Some("queuex/default")),
            ("/queue", None),
            ("/queue/", None),
            ("/", None),
            ("//web", None),
        ];
        for (path, want) in cases {
            assert_eq!(call_app(path), *want, "{path}");
        }
    }
}
