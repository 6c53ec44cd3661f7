//! Which server runs each app, where several share one PostgreSQL store.
//!
//! Each app has one lease in the store (owner, epoch, expiry by the database's clock).
//! The server holding it runs the app's controller, its runners and its queue requests;
//! the others forward its calls and its API requests there (`gateway::forward`). Every
//! server renews its leases every [`Owners::tick`], well inside their time to live, and
//! looks for apps nobody holds: those of a server that died (its leases ran out) or left
//! (it released them on its way out). It takes such apps while it runs fewer than its
//! share (the apps over the servers alive, rounded up), so apps spread over the servers.
//!
//! A server counts a lease as its own only until the time to live has passed since it
//! last asked to renew it, by its own clock: it stops the app's work then even if the
//! store cannot be reached to tell it so, and the store itself refuses the app's
//! activations under a lease that has passed on (the [`Fence`]).
//!
//! A server alone on its store (SQLite) runs every app and takes no leases.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use gateway::forward::{Elsewhere, Located, Locator};
use store::{Fence, Store};
use tokio::time::Instant;
use uuid::Uuid;

/// What this server knows of who runs which app.
pub(crate) struct Owners {
    shared: Option<SharedStore>,
}

struct SharedStore {
    store: Store,
    me: String,
    ttl: Duration,
    api: SocketAddr,
    gateway: SocketAddr,
    /// The leases this server holds, and until when it may count on each.
    held: Mutex<HashMap<Uuid, Held>>,
    /// The apps this server does not run, by `team/app`.
    elsewhere: RwLock<HashMap<String, Located>>,
    /// Every app with a current revision, by `team/app`, as last seen.
    ids: RwLock<HashMap<String, Uuid>>,
    /// The other servers alive.
    others: RwLock<Vec<Arc<Elsewhere>>>,
    /// How many runners the apps that run elsewhere have, as their servers last said.
    runners_elsewhere: RwLock<HashMap<Uuid, u32>>,
    /// What this server last published of its own apps' runners.
    published: Mutex<HashMap<Uuid, u32>>,
    /// Apps this server holds but could not load: not waited for.
    broken: Mutex<HashSet<Uuid>>,
}

#[derive(Debug, Clone, Copy)]
struct Held {
    epoch: i64,
    until: Instant,
}

/// What [`Owners::acquire`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Acquired {
    /// This server held it already (or is alone on its store).
    Held,
    /// This server has just taken it: what the last owner left unfinished is its now.
    Taken,
}

impl Owners {
    /// A server alone on its store: it runs every app.
    pub(crate) fn alone() -> Owners {
        Owners { shared: None }
    }

    /// A server among others on `store`, as `me`, answering at `api` and `gateway`.
    pub(crate) fn shared(store: Store, me: String, ttl: Duration, api: SocketAddr, gateway: SocketAddr) -> Owners {
        Owners {
            shared: Some(SharedStore {
                store,
                me,
                ttl,
                api,
                gateway,
                held: Mutex::default(),
                elsewhere: RwLock::default(),
                ids: RwLock::default(),
                others: RwLock::default(),
                runners_elsewhere: RwLock::default(),
                published: Mutex::default(),
                broken: Mutex::default(),
            }),
        }
    }

    pub(crate) fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// How often leases are renewed and free apps looked for: a tenth of the time to
    /// live, between 100 ms and a second.
    pub(crate) fn tick(&self) -> Duration {
        self.shared
            .as_ref()
            .map_or(Duration::from_secs(1), |s| (s.ttl / 10).clamp(Duration::from_millis(100), Duration::from_secs(1)))
    }

    /// The lease the app's writes are made under: `None` for a server alone on its
    /// store. A server that does not hold the app's lease gets a fence no write passes.
    pub(crate) fn fence(&self, app_id: Uuid) -> Option<Fence> {
        let shared = self.shared.as_ref()?;
        let epoch = shared.held(app_id).map_or(-1, |h| h.epoch);
        Some(Fence { owner: shared.me.clone(), epoch })
    }

    /// Makes sure this server holds the app's lease, taking it if nobody does. Fails
    /// with the server that holds it, where that is known.
    pub(crate) async fn acquire(&self, app_id: Uuid) -> anyhow::Result<Acquired> {
        let Some(shared) = &self.shared else { return Ok(Acquired::Held) };
        if shared.held(app_id).is_some() {
            return Ok(Acquired::Held);
        }
        let asked = Instant::now();
        match shared.store.take_lease(app_id, &shared.me, shared.ttl).await? {
            Some(epoch) => {
                shared.lock().insert(app_id, Held { epoch, until: asked + shared.ttl });
                tracing::info!(app = %app_id, epoch, "took the app's lease");
                Ok(Acquired::Taken)
            }
            None => anyhow::bail!("another server runs the app; send its requests there"),
        }
    }

    /// Every server alive and every lease, as the store has them now: renews this
    /// server's leases and says which it lost, which apps other servers run, and which
    /// free apps it should take (up to its share).
    pub(crate) async fn survey(&self, apps: &[(Uuid, String)], running: HashMap<Uuid, u32>) -> anyhow::Result<Survey> {
        let Some(shared) = &self.shared else { return Ok(Survey::default()) };
        let asked = Instant::now();
        let servers = shared
            .store
            .announce_server(
                &shared.me,
                &format!("http://{}", shared.api),
                &format!("http://{}", shared.gateway),
                shared.ttl,
            )
            .await?;
        let renewed: HashMap<Uuid, i64> =
            shared.store.renew_leases(&shared.me, shared.ttl).await?.into_iter().collect();
        let mut lost = Vec::new();
        {
            let mut held = shared.lock();
            held.retain(|app, h| match renewed.get(app) {
                Some(&epoch) if epoch == h.epoch => {
                    h.until = asked + shared.ttl;
                    true
                }
                // Taken (by a deploy, say) after this renewal was asked for.
                _ if h.until > asked + shared.ttl => true,
                _ => {
                    lost.push(*app);
                    false
                }
            });
        }
        let changed: Vec<(Uuid, u32)> = {
            let mut published = shared.published.lock().unwrap_or_else(|e| e.into_inner());
            let changed =
                running.iter().filter(|(app, n)| published.get(*app) != Some(*n)).map(|(a, n)| (*a, *n)).collect();
            *published = running;
            changed
        };
        if !changed.is_empty() {
            shared.store.publish_runners(&shared.me, changed).await?;
        }
        let leases = shared.store.leases().await?;
        *shared.runners_elsewhere.write().unwrap_or_else(|e| e.into_inner()) =
            leases.iter().filter(|l| l.live && l.owner != shared.me).map(|l| (l.app_id, l.runners)).collect();
        let by_id: HashMap<&str, &store::ServerRecord> = servers.iter().map(|s| (s.id.as_str(), s)).collect();
        let names: HashMap<Uuid, &str> = apps.iter().map(|(id, name)| (*id, name.as_str())).collect();
        let mut elsewhere = HashMap::new();
        let mut owned: HashSet<Uuid> = HashSet::new();
        for lease in leases.iter().filter(|l| l.live) {
            owned.insert(lease.app_id);
            if lease.owner == shared.me {
                continue;
            }
            let Some(name) = names.get(&lease.app_id) else { continue };
            let Some(server) = by_id.get(lease.owner.as_str()) else {
                elsewhere.insert((*name).to_owned(), Located::Nowhere);
                continue;
            };
            if let (Some(api), Some(gateway)) = (address(&server.api_url), address(&server.gateway_url)) {
                let owner = Elsewhere { server: server.id.clone(), api, gateway };
                elsewhere.insert((*name).to_owned(), Located::Elsewhere(Arc::new(owner)));
            }
        }
        for (id, name) in apps {
            if !owned.contains(id) {
                elsewhere.insert(name.clone(), Located::Nowhere);
            }
        }
        *shared.elsewhere.write().unwrap_or_else(|e| e.into_inner()) = elsewhere;
        *shared.ids.write().unwrap_or_else(|e| e.into_inner()) =
            apps.iter().map(|(id, name)| (name.clone(), *id)).collect();
        let others = servers
            .iter()
            .filter(|s| s.id != shared.me)
            .filter_map(|s| {
                let (api, gateway) = (address(&s.api_url)?, address(&s.gateway_url)?);
                Some(Arc::new(Elsewhere { server: s.id.clone(), api, gateway }))
            })
            .collect();
        *shared.others.write().unwrap_or_else(|e| e.into_inner()) = others;

        let share = apps.len().div_ceil(servers.len().max(1));
        let mut free: Vec<Uuid> = apps.iter().map(|(id, _)| *id).filter(|id| !owned.contains(id)).collect();
        // Each server tries the free apps in an order of its own, so that servers
        // looking at once mostly try different ones.
        free.sort_by_key(|id| {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            (id, &shared.me).hash(&mut hasher);
            hasher.finish()
        });
        let room = share.saturating_sub(shared.lock().len());
        free.truncate(room);
        Ok(Survey { lost, free, servers: servers.len() })
    }

    /// The apps this server holds whose lease it can no longer count on (the store has
    /// not renewed it for the time to live): it must stop their work now.
    pub(crate) fn expired(&self) -> Vec<Uuid> {
        let Some(shared) = &self.shared else { return Vec::new() };
        let now = Instant::now();
        let mut held = shared.lock();
        let gone: Vec<Uuid> = held.iter().filter(|(_, h)| h.until <= now).map(|(app, _)| *app).collect();
        for app in &gone {
            held.remove(app);
        }
        gone
    }

    /// This server is leaving: it gives up every lease at once, and the others take
    /// its apps on their next look.
    pub(crate) async fn retire(&self) {
        let Some(shared) = &self.shared else { return };
        shared.lock().clear();
        match shared.store.retire_server(&shared.me).await {
            Ok(n) => tracing::info!(apps = n, "handed this server's apps over to the others"),
            Err(e) => tracing::warn!(error = %e, "cannot hand the apps over; their leases run out by themselves"),
        }
    }

    /// Whether any server other than this one holds each of `apps`' leases now.
    pub(crate) async fn all_taken(&self, apps: &[Uuid]) -> bool {
        let Some(shared) = &self.shared else { return true };
        let Ok(leases) = shared.store.leases().await else { return false };
        apps.iter().all(|app| leases.iter().any(|l| l.app_id == *app && l.live && l.owner != shared.me))
    }

    /// Where `team/app` runs, when it is not here. An app this server has just taken,
    /// whose route is not there yet, is nowhere for the moment: its calls wait for it.
    pub(crate) fn elsewhere(&self, team_and_app: &str) -> Option<Located> {
        let shared = self.shared.as_ref()?;
        if let Some(located) = shared.elsewhere.read().unwrap_or_else(|e| e.into_inner()).get(team_and_app) {
            return Some(located.clone());
        }
        let id = *shared.ids.read().unwrap_or_else(|e| e.into_inner()).get(team_and_app)?;
        let broken = shared.broken.lock().unwrap_or_else(|e| e.into_inner()).contains(&id);
        (shared.lock().contains_key(&id) && !broken).then_some(Located::Nowhere)
    }

    /// The app, whose lease this server holds, could not be loaded here.
    pub(crate) fn mark_broken(&self, app_id: Uuid) {
        if let Some(shared) = &self.shared {
            shared.broken.lock().unwrap_or_else(|e| e.into_inner()).insert(app_id);
        }
    }

    /// How many runners the app has on the server running it, when that is another.
    pub(crate) fn runners_elsewhere(&self, app_id: Uuid) -> Option<u32> {
        let shared = self.shared.as_ref()?;
        shared.runners_elsewhere.read().unwrap_or_else(|e| e.into_inner()).get(&app_id).copied()
    }

    /// The other servers alive, as last seen.
    pub(crate) fn others(&self) -> Vec<Arc<Elsewhere>> {
        self.shared.as_ref().map_or_else(Vec::new, |s| s.others.read().unwrap_or_else(|e| e.into_inner()).clone())
    }

    pub(crate) fn me(&self) -> &str {
        self.shared.as_ref().map_or("", |s| s.me.as_str())
    }
}

impl SharedStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Held>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn held(&self, app_id: Uuid) -> Option<Held> {
        self.lock().get(&app_id).copied().filter(|h| h.until > Instant::now())
    }
}

/// What one look at the store found.
#[derive(Debug, Default)]
pub(crate) struct Survey {
    /// Apps whose lease this server has lost.
    pub(crate) lost: Vec<Uuid>,
    /// Apps nobody holds, that this server should try to take.
    pub(crate) free: Vec<Uuid>,
    /// Servers alive.
    pub(crate) servers: usize,
}

/// The address in `http://host:port`.
fn address(url: &str) -> Option<SocketAddr> {
    url.strip_prefix("http://")?.trim_end_matches('/').parse().ok()
}

/// The gateway asks the fleet's owners where an app runs.
pub(crate) struct GatewayLocator(pub(crate) Arc<crate::fleet::Fleet>);

impl Locator for GatewayLocator {
    fn locate(&self, team_and_app: &str) -> Option<Located> {
        self.0.shared.owners.elsewhere(team_and_app)
    }

    fn me(&self) -> &str {
        self.0.shared.owners.me()
    }
}

impl Owners {
    /// The apps whose leases this server holds.
    pub(crate) fn held(&self) -> Vec<Uuid> {
        self.shared.as_ref().map_or_else(Vec::new, |s| s.lock().keys().copied().collect())
    }
}

/// Keeps this server's share of the apps, until `stop`: every tick it renews its
/// leases, stops the apps it lost, and takes free ones up to its share.
pub(crate) async fn keep_leases(control: Arc<crate::control::Control>, stop: tokio_util::sync::CancellationToken) {
    let fleet = &control.fleet;
    let owners = &fleet.shared.owners;
    // Released leases are announced (LISTEN/NOTIFY), so that their apps are taken at
    // once; the tick is the fallback, and the only way where the listening fails.
    let mut changes = match control.store.listen_leases().await {
        Ok(changes) => Some(changes),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for released leases; looking every tick");
            None
        }
    };
    loop {
        for app in owners.expired() {
            tracing::warn!(app = %app, "the app's lease could not be renewed in time; it stops here");
            fleet.stop(app);
        }
        look_now(&control).await;
        let announced = async {
            match changes.as_mut() {
                Some(changes) => changes.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = tokio::time::sleep(owners.tick()) => {}
            released = announced => tracing::debug!(released, "leases released; looking now"),
            () = stop.cancelled() => return,
        }
    }
}

/// One look at the store, its failure logged.
pub(crate) async fn look_now(control: &crate::control::Control) {
    if let Err(e) = look(control).await {
        tracing::warn!(error = %format!("{e:#}"), "cannot renew the apps' leases; trying again");
    }
}

/// One look at the store: renew, stop what was lost, take what is free.
async fn look(control: &crate::control::Control) -> anyhow::Result<()> {
    let fleet = &control.fleet;
    let mut apps = Vec::new();
    for team in control.store.list_teams().await? {
        // Every app has an owner, those with no revision yet too: the owner is who
        // fails a first deploy its last server was in the middle of.
        for app in control.store.list_apps(team.id).await? {
            apps.push((app, team.name.clone()));
        }
    }
    let names: Vec<(Uuid, String)> = apps.iter().map(|(app, team)| (app.id, format!("{team}/{}", app.name))).collect();
    let running = fleet.shared.owners.held().into_iter().map(|app| (app, fleet.live_runners(app, None))).collect();
    let survey = fleet.shared.owners.survey(&names, running).await?;
    for app in survey.lost {
        tracing::warn!(app = %app, "another server has taken the app over; it stops here");
        fleet.stop(app);
    }
    for id in survey.free {
        let Some((app, team)) = apps.iter().find(|(app, _)| app.id == id) else { continue };
        match fleet.controller(app, team).await {
            Ok(_) => tracing::info!(app = %app.name, team = %team, servers = survey.servers, "runs the app here now"),
            // This server holds the app but cannot run it: the app keeps its problem
            // (in listings and /healthz) and is not served, as on a server alone, rather
            // than pass from server to server every tick.
            Err(e) if fleet.problem(app.id).is_some() => {
                fleet.shared.owners.mark_broken(app.id);
                tracing::error!(app = %app.name, team = %team, error = %format!("{e:#}"), "cannot load an app; it is not served");
            }
            Err(e) => tracing::debug!(app = %app.name, error = %format!("{e:#}"), "did not take the app"),
        }
    }
    Ok(())
}

/// Sends an API request about an app that another server runs to that server (deploys,
/// operations, listings of its runners and logs all need the server that runs it), and
/// lets every other request through. Only where servers share the store.
pub(crate) async fn to_owner(
    axum::extract::State(control): axum::extract::State<Arc<crate::control::Control>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use api::router::ControlPlane;
    let owners = &control.fleet.shared.owners;
    if !owners.is_shared() || gateway::forward::was_forwarded(&request) {
        return next.run(request).await;
    }
    if request.uri().path().starts_with("/v1/runners/") {
        return to_runners_server(&control, request, next).await;
    }
    let Some(name) = app_of(request.uri()).map(str::to_owned) else { return next.run(request).await };
    let (key, team) = {
        let header = |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        (header("authorization"), header(api::router::TEAM_HEADER))
    };
    let caller = control.authenticate(key.as_deref(), team.as_deref()).await;
    let Ok(caller) = caller else { return next.run(request).await };
    match owners.elsewhere(&format!("{}/{name}", caller.team)) {
        Some(Located::Elsewhere(owner)) => {
            gateway::forward::forward(owner.api, &owner.server, owners.me(), request).await
        }
        _ => {
            // Answered here: the router need not check the key again.
            let mut request = request;
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
    }
}

/// A request about one runner (`/v1/runners/{id}/…`) is answered here if this server
/// has the runner, else by the other server that has it: each is asked in turn until
/// one does not answer 404.
async fn to_runners_server(
    control: &crate::control::Control,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::body::Body;
    use axum::response::IntoResponse;
    let (parts, body) = request.into_parts();
    let Ok(body) = axum::body::to_bytes(body, 1 << 20).await else {
        return api::error::ApiError::new(
            api::error::ErrorCode::PayloadTooLarge,
            "a runner request's body is at most 1 MiB",
        )
        .into_response();
    };
    // The other servers get the request as it came; this one as axum routed it (with
    // its path parameters among the extensions).
    let (method, uri, headers) = (parts.method.clone(), parts.uri.clone(), parts.headers.clone());
    let again = |body: Body| {
        let mut request = axum::http::Request::new(body);
        *request.method_mut() = method.clone();
        *request.uri_mut() = uri.clone();
        *request.headers_mut() = headers.clone();
        request
    };
    let here = next.run(axum::http::Request::from_parts(parts, Body::from(body.clone()))).await;
    if here.status() != axum::http::StatusCode::NOT_FOUND {
        return here;
    }
    let owners = &control.fleet.shared.owners;
    for other in owners.others() {
        let there =
            gateway::forward::forward(other.api, &other.server, owners.me(), again(Body::from(body.clone()))).await;
        if there.status() != axum::http::StatusCode::NOT_FOUND
            && there.status() != axum::http::StatusCode::SERVICE_UNAVAILABLE
        {
            return there;
        }
    }
    here
}

/// The app an API request is about: `/v1/apps/{app}[/...]`, or a deploy's `app_name`.
fn app_of(uri: &axum::http::Uri) -> Option<&str> {
    let path = uri.path();
    if let Some(rest) = path.strip_prefix("/v1/apps/") {
        return rest.split('/').next().filter(|name| !name.is_empty());
    }
    if path == "/v1/deploys" {
        return uri.query()?.split('&').find_map(|pair| pair.strip_prefix("app_name=")).filter(|n| !n.is_empty());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_app_an_api_request_is_about_comes_from_its_path_or_a_deploys_app_name() {
        let cases: &[(&str, Option<&str>)] = &[
            ("/v1/apps/web", Some("web")),
            ("/v1/apps/web/", Some("web")),
            ("/v1/apps/web/set-rev", Some("web")),
            ("/v1/apps/web/revisions/1234/log?follow=true", Some("web")),
            ("/v1/apps/", None),
            ("/v1/apps", None),
            ("/v1/apps//runners", None),
            ("/v1/deploys?app_name=web&auth=public", Some("web")),
            ("/v1/deploys?auth=public&app_name=api", Some("api")),
            ("/v1/deploys?auth=public", None),
            ("/v1/deploys?app_name=", None),
            ("/v1/deploys", None),
            ("/v1/runners/abcd/log", None),
            ("/v1/keys", None),
            ("/healthz", None),
        ];
        for (uri, want) in cases {
            let uri: axum::http::Uri = uri.parse().unwrap();
            assert_eq!(app_of(&uri), *want, "{uri}");
        }
    }

    #[test]
    fn a_servers_address_is_read_from_its_http_url_only() {
        let cases: &[(&str, Option<&str>)] = &[
            ("http://127.0.0.1:8700", Some("127.0.0.1:8700")),
            ("http://127.0.0.1:8700/", Some("127.0.0.1:8700")),
            ("http://[::1]:8701", Some("[::1]:8701")),
            ("https://127.0.0.1:8700", None),
            ("http://localhost:8700", None),
            ("127.0.0.1:8700", None),
            ("", None),
        ];
        for (url, want) in cases {
            assert_eq!(address(url), want.map(|a| a.parse().unwrap()), "{url}");
        }
    }
}
