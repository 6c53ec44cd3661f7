//! One app's routing state: its current revision, its runners' call slots, and the fair
//! queue of calls waiting for a slot.
//!
//! Calls take a [`Lease`] on a runner's slot and give it back when dropped (when the
//! response body has ended). A freed slot goes straight to the oldest waiting call, so
//! the queue is first-in, first-out and no new call overtakes one that waits. The
//! app's controller adds and removes runners here and is woken through
//! [`AppRoute::changed`] whenever demand or occupancy moves, then reads a
//! [`RouteSnapshot`] to decide.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use model::ids::{RevisionId, RunnerId};
use model::revision::AuthMode;
use netns::Endpoint;
use tokio::sync::{Notify, oneshot, watch};
use tokio::time::Instant;
use uuid::Uuid;

/// What the gateway needs to know about how an app is called.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    pub auth: AuthMode,
    /// A call running longer than this is answered 504 and its runner is flagged.
    pub request_timeout: Duration,
    /// When set, calls are refused with 503 `suspended`.
    pub suspended: bool,
}

pub struct AppRoute {
    pub team_id: Uuid,
    pub app_id: Uuid,
    pub app: String,
    /// `team/app`, the app's label in the gateway's metrics; set when registered.
    pub(crate) label: std::sync::OnceLock<Arc<String>>,
    state: Mutex<RouteState>,
    changed: Notify,
    /// Notified when a call starts on an app that had none in flight.
    busy: Notify,
    /// Bumped whenever the app's revision, settings or registration change, for calls
    /// that wait through a suspension (see [`AppRoute::acquire_waiting`]).
    generation: watch::Sender<u64>,
    #[cfg(feature = "sim")]
    interleave: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
}

/// Why a runner was cut off with calls in flight, so those calls can say so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutOff {
    ForcedRollout,
    Killed,
}

/// How many cut-off runners are remembered; their calls fail within moments.
const REMEMBERED_CUTS: usize = 256;

struct RouteState {
    config: RouteConfig,
    /// The app is gone; nothing will be served any more.
    closed: bool,
    cut: VecDeque<(RunnerId, CutOff)>,
    revision: Option<RevisionId>,
    runners: Vec<Slot>,
    queue: VecDeque<Waiter>,
    next_waiter: u64,
    /// Calls holding a slot, on any runner (also one since removed).
    in_flight: u32,
}

struct Slot {
    id: RunnerId,
    revision: RevisionId,
    addr: Endpoint,
    /// Header values and a metrics label made once, not per call.
    labels: SlotLabels,
    max: u32,
    in_flight: u32,
    accepting: bool,
    idle_since: Option<Instant>,
    timed_out: bool,
}

struct Waiter {
    id: u64,
    enqueued: Instant,
    tx: oneshot::Sender<Lease>,
}

/// A held call slot on one runner. Dropping it frees the slot.
pub struct Lease {
    route: Arc<AppRoute>,
    pub runner: RunnerId,
    pub revision: RevisionId,
    pub addr: Endpoint,
    /// The runner's address as a Host header, and other values made once per runner.
    pub labels: SlotLabels,
    armed: bool,
}

impl Lease {
    /// Records that the call holding this lease ran past the request timeout.
    pub(crate) fn flag_timed_out(&self) {
        self.route.flag_timed_out(self.runner);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.armed {
            self.route.release(self.runner);
        }
    }
}

/// What calls to one runner send and record, made once when the runner is added.
#[derive(Debug, Clone)]
pub struct SlotLabels {
    /// Its address, as the Host header of calls to it.
    pub host: http::HeaderValue,
    pub runner: http::HeaderValue,
    pub revision: http::HeaderValue,
    /// The revision, as a metrics label.
    pub revision_label: Arc<String>,
    /// Its calls' metrics series, once looked up.
    pub(crate) series: Arc<crate::metrics::SeriesCache>,
}

impl SlotLabels {
    fn new(id: RunnerId, revision: RevisionId, addr: SocketAddr) -> SlotLabels {
        let value = |s: String| http::HeaderValue::from_str(&s).unwrap_or(http::HeaderValue::from_static("-"));
        SlotLabels {
            host: value(addr.to_string()),
            runner: value(id.to_string()),
            revision: value(revision.to_string()),
            revision_label: Arc::new(revision.to_string()),
            series: Arc::default(),
        }
    }
}

/// Why a call could not get a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcquireError {
    NoRevision,
    Suspended,
    /// The start deadline passed while the call waited.
    Deadline,
    /// The app was deleted.
    Gone,
}

/// What the controller sees of the app's traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSnapshot {
    pub runners: Vec<SlotView>,
    /// How long each queued call has waited.
    pub queued: Vec<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotView {
    pub id: RunnerId,
    pub in_flight: u32,
    pub accepting: bool,
    /// How long it has had no call, if it has none.
    pub idle_for: Option<Duration>,
    /// A call on it ran past the request timeout.
    pub timed_out: bool,
}

impl RouteSnapshot {
    pub fn in_flight(&self) -> u32 {
        self.runners.iter().map(|r| r.in_flight).sum()
    }

    pub fn runner(&self, id: RunnerId) -> Option<&SlotView> {
        self.runners.iter().find(|r| r.id == id)
    }
}

impl AppRoute {
    pub fn new(team_id: Uuid, app_id: Uuid, app: String, config: RouteConfig) -> Arc<AppRoute> {
        Arc::new(AppRoute {
            team_id,
            app_id,
            app,
            label: std::sync::OnceLock::new(),
            state: Mutex::new(RouteState {
                config,
                closed: false,
                cut: VecDeque::new(),
                revision: None,
                runners: Vec::new(),
                queue: VecDeque::new(),
                next_waiter: 0,
                in_flight: 0,
            }),
            changed: Notify::new(),
            busy: Notify::new(),
            generation: watch::Sender::new(0),
            #[cfg(feature = "sim")]
            interleave: std::sync::OnceLock::new(),
        })
    }

    /// Lets a simulation act as the gateway's other threads would: `f` runs each time
    /// one of the controller's operations on the route has let go of its lock, which is
    /// where a call on another thread may take or free a slot.
    #[cfg(feature = "sim")]
    pub fn set_interleave(&self, f: Box<dyn Fn() + Send + Sync>) {
        let _ = self.interleave.set(f);
    }

    /// A free slot now, if one is free and no call waits; nothing is queued otherwise.
    #[cfg(feature = "sim")]
    pub fn try_acquire(self: &Arc<Self>) -> Option<Lease> {
        let mut state = self.state();
        if state.closed || state.config.suspended || !state.queue.is_empty() {
            return None;
        }
        self.take_slot(&mut state)
    }

    /// Where another thread may act between two of the controller's steps.
    fn interleave(&self) {
        #[cfg(feature = "sim")]
        if let Some(f) = self.interleave.get() {
            f();
        }
    }

    fn state(&self) -> MutexGuard<'_, RouteState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Resolves when something the controller cares about has changed since the last
    /// time it was woken (a call queued, a slot freed, a timeout).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Resolves when a call has started on the app while it had none in flight. A
    /// controller that saw no load sleeps until something is due; this wakes it when
    /// load begins, without waking it for every call.
    pub async fn became_busy(&self) {
        self.busy.notified().await;
    }

    pub fn config(&self) -> RouteConfig {
        self.state().config.clone()
    }

    pub fn configure(self: &Arc<Self>, config: RouteConfig) {
        let mut state = self.state();
        state.config = config;
        self.dispatch(&mut state);
        drop(state);
        self.generation.send_modify(|g| *g += 1);
        self.interleave();
    }

    /// Points the app at a revision: from now on only its runners get calls.
    pub fn set_revision(self: &Arc<Self>, revision: Option<RevisionId>) {
        let mut state = self.state();
        state.revision = revision;
        self.dispatch(&mut state);
        drop(state);
        self.generation.send_modify(|g| *g += 1);
        self.interleave();
    }

    /// The app is gone: waiting calls give up with [`AcquireError::Gone`].
    pub fn close(&self) {
        let mut state = self.state();
        state.closed = true;
        state.queue.clear();
        drop(state);
        self.generation.send_modify(|g| *g += 1);
    }

    pub fn revision(&self) -> Option<RevisionId> {
        self.state().revision
    }

    /// Adds a set-up runner that takes up to `max` calls at once.
    pub fn add_runner(self: &Arc<Self>, id: RunnerId, revision: RevisionId, addr: Endpoint, max: u32) {
        let mut state = self.state();
        state.runners.retain(|s| s.id != id);
        state.runners.push(Slot {
            id,
            revision,
            labels: SlotLabels::new(id, revision, addr.addr),
            addr,
            max: max.max(1),
            in_flight: 0,
            accepting: true,
            idle_since: Some(Instant::now()),
            timed_out: false,
        });
        self.dispatch(&mut state);
        drop(state);
        self.interleave();
    }

    /// Changes how many calls a runner takes at once.
    pub fn set_runner_max(self: &Arc<Self>, id: RunnerId, max: u32) {
        let mut state = self.state();
        if let Some(slot) = state.runners.iter_mut().find(|s| s.id == id) {
            slot.max = max.max(1);
        }
        self.dispatch(&mut state);
        drop(state);
        self.interleave();
    }

    /// Stops giving the runner new calls; the ones it has go on.
    /// The calls runner `id` has in flight now (0 once it is gone), read under the lock
    /// that [`stop_routing`](Self::stop_routing) takes: once a runner has stopped
    /// accepting, a 0 here is final, which a snapshot taken before that is not.
    pub fn in_flight(&self, id: RunnerId) -> u32 {
        let n = self.state().runners.iter().find(|s| s.id == id).map_or(0, |s| s.in_flight);
        self.interleave();
        n
    }

    pub fn stop_routing(&self, id: RunnerId) {
        if let Some(slot) = self.state().runners.iter_mut().find(|s| s.id == id) {
            slot.accepting = false;
        }
        self.interleave();
    }

    /// Takes a runner out at once because it is being killed, remembering why so that
    /// its calls in flight can tell their callers.
    pub fn cut_off(&self, id: RunnerId, why: CutOff) {
        let mut state = self.state();
        state.runners.retain(|s| s.id != id);
        if state.cut.len() == REMEMBERED_CUTS {
            state.cut.pop_front();
        }
        state.cut.push_back((id, why));
        drop(state);
        self.interleave();
    }

    /// Why a runner was cut off, if it was.
    pub fn cut_reason(&self, id: RunnerId) -> Option<CutOff> {
        self.state().cut.iter().rev().find(|(r, _)| *r == id).map(|(_, why)| *why)
    }

    /// Forgets a runner. Calls still holding its slots finish or fail on their own.
    pub fn remove_runner(&self, id: RunnerId) {
        self.state().runners.retain(|s| s.id != id);
        self.interleave();
    }

    /// Whether runner `id` is among those that take calls.
    pub fn has_runner(&self, id: RunnerId) -> bool {
        self.state().runners.iter().any(|s| s.id == id)
    }

    /// Records that a call on `id` ran past the request timeout.
    pub fn flag_timed_out(&self, id: RunnerId) {
        if let Some(slot) = self.state().runners.iter_mut().find(|s| s.id == id) {
            slot.timed_out = true;
        }
        self.changed.notify_one();
    }

    pub fn snapshot(&self) -> RouteSnapshot {
        let state = self.state();
        let now = Instant::now();
        let snapshot = RouteSnapshot {
            runners: state
                .runners
                .iter()
                .map(|s| SlotView {
                    id: s.id,
                    in_flight: s.in_flight,
                    accepting: s.accepting,
                    idle_for: s.idle_since.map(|t| now.saturating_duration_since(t)),
                    timed_out: s.timed_out,
                })
                .collect(),
            queued: state.queue.iter().filter(|w| !w.tx.is_closed()).map(|w| now - w.enqueued).collect(),
        };
        drop(state);
        self.interleave();
        snapshot
    }

    /// Takes a slot for one call, waiting in the queue until `deadline` if none is free.
    pub async fn acquire(self: &Arc<Self>, deadline: Instant) -> Result<Lease, AcquireError> {
        let (id, rx) = {
            let mut state = self.state();
            if state.closed {
                return Err(AcquireError::Gone);
            }
            if state.config.suspended {
                return Err(AcquireError::Suspended);
            }
            if state.revision.is_none() {
                return Err(AcquireError::NoRevision);
            }
            if state.queue.is_empty()
                && let Some(lease) = self.take_slot(&mut state)
            {
                return Ok(lease);
            }
            let (tx, rx) = oneshot::channel();
            let id = state.next_waiter;
            state.next_waiter += 1;
            state.queue.push_back(Waiter { id, enqueued: Instant::now(), tx });
            (id, rx)
        };
        self.changed.notify_one();
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(lease)) => Ok(lease),
            // The sender is dropped only when the route gives up on its waiters.
            Ok(Err(_)) if self.state().closed => Err(AcquireError::Gone),
            Ok(Err(_)) if self.state().config.suspended => Err(AcquireError::Suspended),
            Ok(Err(_)) => Err(AcquireError::NoRevision),
            Err(_) => {
                self.state().queue.retain(|w| w.id != id);
                self.changed.notify_one();
                Err(AcquireError::Deadline)
            }
        }
    }

    /// Like [`acquire`](Self::acquire), but while the app is suspended or has no
    /// revision the call keeps waiting (until `deadline`) instead of failing: queued
    /// requests outlive a suspension.
    pub async fn acquire_waiting(self: &Arc<Self>, deadline: Instant) -> Result<Lease, AcquireError> {
        loop {
            let mut generation = self.generation.subscribe();
            match self.acquire(deadline).await {
                Err(AcquireError::Suspended | AcquireError::NoRevision) => {
                    if tokio::time::timeout_at(deadline, generation.changed()).await.is_err() {
                        return Err(AcquireError::Deadline);
                    }
                }
                other => return other,
            }
        }
    }

    /// A free slot on a runner of the current revision: on the busiest runner that still
    /// has one, the longest-serving of those on a tie. Packing calls onto as few runners
    /// as they fit lets the others go idle, so that the autoscaler can stop them once
    /// load falls; spreading calls evenly would keep every runner just busy enough to
    /// live forever.
    fn take_slot(self: &Arc<Self>, state: &mut RouteState) -> Option<Lease> {
        let revision = state.revision?;
        let (_, slot) = state
            .runners
            .iter_mut()
            .enumerate()
            .filter(|(_, s)| s.accepting && s.revision == revision && s.in_flight < s.max)
            .max_by_key(|(order, s)| (s.in_flight, std::cmp::Reverse(*order)))?;
        slot.in_flight += 1;
        slot.idle_since = None;
        state.in_flight += 1;
        if state.in_flight == 1 {
            self.busy.notify_one();
        }
        Some(Lease {
            route: self.clone(),
            runner: slot.id,
            revision: slot.revision,
            addr: slot.addr.clone(),
            labels: slot.labels.clone(),
            armed: true,
        })
    }

    fn release(self: &Arc<Self>, id: RunnerId) {
        let mut state = self.state();
        // The controller is woken only when it has something to do now: a draining
        // runner has finished its last call. Idle time and load it reads on its own
        // tick, so the hot path of every call does not wake it.
        let mut drained = false;
        state.in_flight = state.in_flight.saturating_sub(1);
        if let Some(slot) = state.runners.iter_mut().find(|s| s.id == id) {
            slot.in_flight = slot.in_flight.saturating_sub(1);
            if slot.in_flight == 0 {
                slot.idle_since = Some(Instant::now());
                drained = !slot.accepting;
            }
        }
        self.dispatch(&mut state);
        drop(state);
        if drained {
            self.changed.notify_one();
        }
    }

    /// Hands free slots to waiting calls, oldest first.
    fn dispatch(self: &Arc<Self>, state: &mut RouteState) {
        if state.config.suspended {
            // Dropping the senders tells the waiters to give up.
            state.queue.clear();
            return;
        }
        while let Some(front) = state.queue.front() {
            if front.tx.is_closed() {
                state.queue.pop_front();
                continue;
            }
            let Some(lease) = self.take_slot(state) else { break };
            let waiter = state.queue.pop_front().expect("the queue has a front");
            if let Err(mut lease) = waiter.tx.send(lease) {
                // The caller gave up at this very moment: give the slot back without
                // re-entering this lock, and offer it to the next waiter.
                lease.armed = false;
                if let Some(slot) = state.runners.iter_mut().find(|s| s.id == lease.runner) {
                    slot.in_flight -= 1;
                    if slot.in_flight == 0 {
                        slot.idle_since = Some(Instant::now());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route() -> Arc<AppRoute> {
        let config = RouteConfig { auth: AuthMode::Public, request_timeout: Duration::from_secs(60), suspended: false };
        let route = AppRoute::new(Uuid::nil(), Uuid::nil(), "app".to_owned(), config);
        route.set_revision(Some(RevisionId(Uuid::from_u128(1))));
        route
    }

    fn add(route: &Arc<AppRoute>, n: u128, max: u32) -> RunnerId {
        let id = RunnerId(Uuid::from_u128(n));
        route.add_runner(
            id,
            RevisionId(Uuid::from_u128(1)),
            Endpoint::host(SocketAddr::from(([127, 0, 0, 1], 1))),
            max,
        );
        id
    }

    fn later() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    #[tokio::test]
    async fn calls_fill_the_busiest_runner_first_and_slots_are_bounded() {
        let route = route();
        let a = add(&route, 10, 3);
        let b = add(&route, 11, 3);
        let mut leases = Vec::new();
        for _ in 0..4 {
            leases.push(route.acquire(later()).await.unwrap());
        }
        let on: Vec<RunnerId> = leases.iter().map(|l| l.runner).collect();
        assert_eq!(on, [a, a, a, b], "the longest-serving runner fills first; a full one takes no more");
        leases.remove(0);
        leases.push(route.acquire(later()).await.unwrap());
        assert_eq!(leases[3].runner, a, "of two runners with room, the busier takes the call");
        leases.push(route.acquire(later()).await.unwrap());
        leases.push(route.acquire(later()).await.unwrap());
        let snapshot = route.snapshot();
        assert_eq!(snapshot.runner(a).unwrap().in_flight, 3);
        assert_eq!(snapshot.runner(b).unwrap().in_flight, 3);
        let err = route.acquire(Instant::now() + Duration::from_millis(20)).await.err();
        assert_eq!(err, Some(AcquireError::Deadline), "no slot is free");
        assert!(route.snapshot().queued.is_empty(), "a call that gave up leaves the queue");
        leases.pop();
        assert_eq!(route.snapshot().in_flight(), 5);
    }

    #[tokio::test]
    async fn a_call_that_took_a_slot_after_a_snapshot_is_counted_once_routing_stops() {
        let route = route();
        let a = add(&route, 10, 4);
        let b = add(&route, 11, 4);
        // What the controller saw, then a call that came in before routing stopped.
        let before = route.snapshot();
        let lease = route.acquire(later()).await.unwrap();
        assert_eq!(lease.runner, a);
        route.stop_routing(a);
        assert_eq!(before.runner(a).unwrap().in_flight, 0, "the snapshot misses the call");
        assert_eq!(route.in_flight(a), 1, "counted now, the call is there");
        // No call reaches it any more; once its call ends, 0 is final.
        let other = route.acquire(later()).await.unwrap();
        assert_eq!(other.runner, b);
        drop(lease);
        assert_eq!(route.in_flight(a), 0);
        assert_eq!(route.in_flight(RunnerId(Uuid::from_u128(99))), 0, "an unknown runner has none");
    }

    #[tokio::test]
    async fn waiting_calls_are_served_first_in_first_out() {
        let route = route();
        add(&route, 10, 1);
        let held = route.acquire(later()).await.unwrap();
        let (order_tx, mut order_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut waiters = Vec::new();
        for n in 0..5 {
            let (waiter_route, order_tx) = (route.clone(), order_tx.clone());
            waiters.push(tokio::spawn(async move {
                let lease = waiter_route.acquire(later()).await.unwrap();
                order_tx.send(n).unwrap();
                tokio::task::yield_now().await;
                drop(lease);
            }));
            // Let each waiter join the queue before the next.
            while route.snapshot().queued.len() < n + 1 {
                tokio::task::yield_now().await;
            }
        }
        drop(held);
        for waiter in waiters {
            waiter.await.unwrap();
        }
        let order: Vec<_> = std::iter::from_fn(|| order_rx.try_recv().ok()).collect();
        assert_eq!(order, vec![0, 1, 2, 3, 4]);
    }

    #[tokio::test]
    async fn a_new_runner_takes_waiting_calls_and_draining_runners_take_none() {
        let route = route();
        let waiting = tokio::spawn({
            let route = route.clone();
            async move { route.acquire(later()).await.map(|l| l.runner) }
        });
        while route.snapshot().queued.is_empty() {
            tokio::task::yield_now().await;
        }
        let a = add(&route, 10, 1);
        assert_eq!(waiting.await.unwrap(), Ok(a));
        route.stop_routing(a);
        add(&route, 11, 1);
        let lease = route.acquire(later()).await.unwrap();
        assert_eq!(lease.runner, RunnerId(Uuid::from_u128(11)));
    }

    #[tokio::test]
    async fn waiting_calls_outlast_a_suspension_and_give_up_when_the_app_goes() {
        let route = route();
        let suspended =
            RouteConfig { auth: AuthMode::Public, request_timeout: Duration::from_secs(1), suspended: true };
        route.configure(suspended.clone());
        let waiting = tokio::spawn({
            let route = route.clone();
            async move { route.acquire_waiting(later()).await.map(|l| l.runner) }
        });
        tokio::task::yield_now().await;
        let a = add(&route, 10, 1);
        route.configure(RouteConfig { suspended: false, ..suspended });
        assert_eq!(waiting.await.unwrap(), Ok(a), "it is served once the app is resumed");

        let _busy = route.acquire(later()).await;
        let waiting = tokio::spawn({
            let route = route.clone();
            async move { route.acquire_waiting(later()).await.map(|l| l.runner) }
        });
        while route.snapshot().queued.is_empty() {
            tokio::task::yield_now().await;
        }
        route.close();
        assert_eq!(waiting.await.unwrap(), Err(AcquireError::Gone));
    }

    #[tokio::test]
    async fn suspended_and_revisionless_apps_refuse_at_once() {
        let route = route();
        route.set_revision(None);
        assert_eq!(route.acquire(later()).await.err(), Some(AcquireError::NoRevision));
        route.set_revision(Some(RevisionId(Uuid::from_u128(1))));
        route.configure(RouteConfig {
            auth: AuthMode::Public,
            request_timeout: Duration::from_secs(1),
            suspended: true,
        });
        assert_eq!(route.acquire(later()).await.err(), Some(AcquireError::Suspended));
    }
}
