//! One app's routing state: its current revision and any split of its traffic, its
//! runners' call slots, and the fair queue of calls waiting for a slot.
//!
//! Each call is for one revision: the one it pins (`X-Hangar-Revision`), or else the
//! one the split picks (the current revision when there is no split). Calls take a
//! [`Lease`] on a slot of a runner of that revision and give it back when dropped (when
//! the response body has ended). A freed slot goes straight to the oldest call waiting
//! for that revision, so each revision's queue is first-in, first-out and no new call
//! overtakes one that waits. The
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

use crate::metrics::{Figures, RevisionFigures};
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
    split: Split,
    runners: Vec<Slot>,
    /// Calls waiting for a slot, by the revision they are for.
    lanes: Vec<Lane>,
    next_waiter: u64,
    /// Calls holding a slot, on any runner (also one since removed).
    in_flight: u32,
    /// Each revision's calls so far, for the app's guard.
    figures: Vec<(RevisionId, Arc<RevisionFigures>)>,
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
    /// It named its revision; otherwise it follows the split wherever that goes.
    pinned: bool,
    tx: oneshot::Sender<Lease>,
}

/// The calls waiting for runners of one revision, oldest first.
struct Lane {
    revision: RevisionId,
    queue: VecDeque<Waiter>,
}

/// Which revision each unpinned call goes to: shares in percent of other revisions,
/// the current one taking the rest, dealt by smooth weighted round robin (as nginx
/// weighs its upstreams), so that any run of 100 calls divides exactly.
#[derive(Default)]
struct Split {
    shares: Vec<(RevisionId, u8)>,
    /// Each revision's running credit, the current revision's last.
    credit: Vec<i32>,
}

impl Split {
    /// The revision for the next unpinned call.
    fn pick(&mut self, current: RevisionId) -> RevisionId {
        if self.shares.is_empty() {
            return current;
        }
        let rest = 100 - self.shares.iter().map(|(_, p)| i32::from(*p)).sum::<i32>();
        let weights = self.shares.iter().map(|(_, p)| i32::from(*p)).chain(std::iter::once(rest));
        for (credit, weight) in self.credit.iter_mut().zip(weights) {
            *credit += weight;
        }
        // On a tie the later one, so the current revision, which is last, goes first.
        let (best, _) = self.credit.iter().enumerate().max_by_key(|(i, c)| (**c, *i)).expect("one or more");
        self.credit[best] -= 100;
        self.shares.get(best).map_or(current, |(revision, _)| *revision)
    }

    fn has(&self, revision: RevisionId) -> bool {
        self.shares.iter().any(|(r, _)| *r == revision)
    }
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
    /// Its revision's figures, shared by the revision's runners.
    pub(crate) figures: Arc<RevisionFigures>,
}

impl SlotLabels {
    fn new(id: RunnerId, revision: RevisionId, addr: SocketAddr, figures: Arc<RevisionFigures>) -> SlotLabels {
        let value = |s: String| http::HeaderValue::from_str(&s).unwrap_or(http::HeaderValue::from_static("-"));
        SlotLabels {
            host: value(addr.to_string()),
            runner: value(id.to_string()),
            revision: value(revision.to_string()),
            revision_label: Arc::new(revision.to_string()),
            series: Arc::default(),
            figures,
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
    /// The revision each of those calls waits for.
    pub queued_for: Vec<RevisionId>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotView {
    pub id: RunnerId,
    pub revision: RevisionId,
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

    /// How long each call waiting for runners of `revision` has waited.
    pub fn queued_on(&self, revision: RevisionId) -> Vec<Duration> {
        self.queued.iter().zip(&self.queued_for).filter(|(_, r)| **r == revision).map(|(d, _)| *d).collect()
    }

    /// The calls in flight on runners of `revision`.
    pub fn in_flight_on(&self, revision: RevisionId) -> u32 {
        self.runners.iter().filter(|r| r.revision == revision).map(|r| r.in_flight).sum()
    }

    /// Revisions with calls waiting for them, each once.
    pub fn waited_for(&self) -> Vec<RevisionId> {
        let mut revisions = self.queued_for.clone();
        revisions.sort_unstable();
        revisions.dedup();
        revisions
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
                split: Split::default(),
                runners: Vec::new(),
                lanes: Vec::new(),
                next_waiter: 0,
                in_flight: 0,
                figures: Vec::new(),
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
        let current = state.revision?;
        if state.closed || state.config.suspended {
            return None;
        }
        let revision = state.split.pick(current);
        if state.lanes.iter().any(|l| l.revision == revision) {
            return None;
        }
        self.take_slot(&mut state, revision)
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

    /// Points the app at a revision: from now on only its runners get calls that pin
    /// no other.
    pub fn set_revision(self: &Arc<Self>, revision: Option<RevisionId>) {
        let mut state = self.state();
        state.revision = revision;
        Self::follow_split(&mut state);
        self.dispatch(&mut state);
        drop(state);
        self.generation.send_modify(|g| *g += 1);
        self.interleave();
    }

    /// Sends these shares (percent) of new calls that pin no revision to other
    /// revisions; the current revision takes the rest. Empty: it takes them all.
    /// Calls already waiting for a revision that no longer has a share wait for the
    /// current one instead, in their turn.
    pub fn set_split(self: &Arc<Self>, shares: Vec<(RevisionId, u8)>) {
        let mut state = self.state();
        state.split = Split { credit: vec![0; shares.len() + 1], shares };
        Self::follow_split(&mut state);
        self.dispatch(&mut state);
        drop(state);
        self.generation.send_modify(|g| *g += 1);
        self.interleave();
    }

    /// The calls `revision` has answered through this route so far.
    pub fn figures(&self, revision: RevisionId) -> Figures {
        Self::figures_of(&mut self.state(), revision).read()
    }

    /// The calls of every revision that has had any through this route so far.
    pub fn all_figures(&self) -> Vec<(RevisionId, Figures)> {
        self.state().figures.iter().map(|(revision, figures)| (*revision, figures.read())).collect()
    }

    fn figures_of(state: &mut RouteState, revision: RevisionId) -> Arc<RevisionFigures> {
        if let Some((_, figures)) = state.figures.iter().find(|(r, _)| *r == revision) {
            return figures.clone();
        }
        let figures = Arc::new(RevisionFigures::default());
        state.figures.push((revision, figures.clone()));
        figures
    }

    /// The shares of the split now in force.
    pub fn split(&self) -> Vec<(RevisionId, u8)> {
        self.state().split.shares.clone()
    }

    /// Moves unpinned waiting calls whose revision is neither current nor in the split
    /// to the current revision's queue, keeping the order they came in.
    fn follow_split(state: &mut RouteState) {
        let Some(current) = state.revision else { return };
        let mut moved: Vec<Waiter> = Vec::new();
        for lane in &mut state.lanes {
            if lane.revision == current || state.split.has(lane.revision) {
                continue;
            }
            let (go, stay): (VecDeque<Waiter>, VecDeque<Waiter>) = lane.queue.drain(..).partition(|w| !w.pinned);
            lane.queue = stay;
            moved.extend(go);
        }
        if moved.is_empty() {
            return;
        }
        let lane = Self::lane(state, current);
        moved.extend(lane.queue.drain(..));
        moved.sort_by_key(|w| w.id);
        lane.queue = moved.into();
        state.lanes.retain(|l| !l.queue.is_empty());
    }

    /// The queue of calls for `revision`, made if there is none.
    fn lane(state: &mut RouteState, revision: RevisionId) -> &mut Lane {
        let at = match state.lanes.iter().position(|l| l.revision == revision) {
            Some(at) => at,
            None => {
                state.lanes.push(Lane { revision, queue: VecDeque::new() });
                state.lanes.len() - 1
            }
        };
        &mut state.lanes[at]
    }

    /// The app is gone: waiting calls give up with [`AcquireError::Gone`].
    pub fn close(&self) {
        let mut state = self.state();
        state.closed = true;
        state.lanes.clear();
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
        let figures = Self::figures_of(&mut state, revision);
        state.runners.push(Slot {
            id,
            revision,
            labels: SlotLabels::new(id, revision, addr.addr, figures),
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
        let waiting = || {
            state.lanes.iter().flat_map(|l| l.queue.iter().map(|w| (l.revision, w))).filter(|(_, w)| !w.tx.is_closed())
        };
        let snapshot = RouteSnapshot {
            runners: state
                .runners
                .iter()
                .map(|s| SlotView {
                    id: s.id,
                    revision: s.revision,
                    in_flight: s.in_flight,
                    accepting: s.accepting,
                    idle_for: s.idle_since.map(|t| now.saturating_duration_since(t)),
                    timed_out: s.timed_out,
                })
                .collect(),
            queued: waiting().map(|(_, w)| now - w.enqueued).collect(),
            queued_for: waiting().map(|(revision, _)| revision).collect(),
        };
        drop(state);
        self.interleave();
        snapshot
    }

    /// Takes a slot for one call, waiting in the queue until `deadline` if none is free:
    /// on a runner of `pin`, or else of the revision the split picks.
    pub async fn acquire(self: &Arc<Self>, deadline: Instant, pin: Option<RevisionId>) -> Result<Lease, AcquireError> {
        let (id, rx) = {
            let mut state = self.state();
            if state.closed {
                return Err(AcquireError::Gone);
            }
            if state.config.suspended {
                return Err(AcquireError::Suspended);
            }
            let Some(current) = state.revision else {
                return Err(AcquireError::NoRevision);
            };
            let revision = pin.unwrap_or_else(|| state.split.pick(current));
            if !state.lanes.iter().any(|l| l.revision == revision)
                && let Some(lease) = self.take_slot(&mut state, revision)
            {
                return Ok(lease);
            }
            let (tx, rx) = oneshot::channel();
            let id = state.next_waiter;
            state.next_waiter += 1;
            let waiter = Waiter { id, enqueued: Instant::now(), pinned: pin.is_some(), tx };
            Self::lane(&mut state, revision).queue.push_back(waiter);
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
                let mut state = self.state();
                // It may have been moved to another revision's queue meanwhile.
                for lane in &mut state.lanes {
                    lane.queue.retain(|w| w.id != id);
                }
                state.lanes.retain(|l| !l.queue.is_empty());
                drop(state);
                self.changed.notify_one();
                Err(AcquireError::Deadline)
            }
        }
    }

    /// Like [`acquire`](Self::acquire), but while the app is suspended or has no
    /// revision the call keeps waiting (until `deadline`) instead of failing: queued
    /// requests outlive a suspension.
    pub async fn acquire_waiting(
        self: &Arc<Self>,
        deadline: Instant,
        pin: Option<RevisionId>,
    ) -> Result<Lease, AcquireError> {
        loop {
            let mut generation = self.generation.subscribe();
            match self.acquire(deadline, pin).await {
                Err(AcquireError::Suspended | AcquireError::NoRevision) => {
                    if tokio::time::timeout_at(deadline, generation.changed()).await.is_err() {
                        return Err(AcquireError::Deadline);
                    }
                }
                other => return other,
            }
        }
    }

    /// A free slot on a runner of `revision`: on the busiest runner that still has one,
    /// the longest-serving of those on a tie. Packing calls onto as few runners
    /// as they fit lets the others go idle, so that the autoscaler can stop them once
    /// load falls; spreading calls evenly would keep every runner just busy enough to
    /// live forever.
    fn take_slot(self: &Arc<Self>, state: &mut RouteState, revision: RevisionId) -> Option<Lease> {
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
            state.lanes.clear();
            return;
        }
        for at in 0..state.lanes.len() {
            self.dispatch_lane(state, at);
        }
        state.lanes.retain(|l| !l.queue.is_empty());
    }

    /// Hands free slots of one revision's runners to the calls waiting for them.
    fn dispatch_lane(self: &Arc<Self>, state: &mut RouteState, at: usize) {
        let revision = state.lanes[at].revision;
        while let Some(front) = state.lanes[at].queue.front() {
            if front.tx.is_closed() {
                state.lanes[at].queue.pop_front();
                continue;
            }
            let Some(lease) = self.take_slot(state, revision) else { break };
            let waiter = state.lanes[at].queue.pop_front().expect("the queue has a front");
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
            leases.push(route.acquire(later(), None).await.unwrap());
        }
        let on: Vec<RunnerId> = leases.iter().map(|l| l.runner).collect();
        assert_eq!(on, [a, a, a, b], "the longest-serving runner fills first; a full one takes no more");
        leases.remove(0);
        leases.push(route.acquire(later(), None).await.unwrap());
        assert_eq!(leases[3].runner, a, "of two runners with room, the busier takes the call");
        leases.push(route.acquire(later(), None).await.unwrap());
        leases.push(route.acquire(later(), None).await.unwrap());
        let snapshot = route.snapshot();
        assert_eq!(snapshot.runner(a).unwrap().in_flight, 3);
        assert_eq!(snapshot.runner(b).unwrap().in_flight, 3);
        let err = route.acquire(Instant::now() + Duration::from_millis(20), None).await.err();
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
        let lease = route.acquire(later(), None).await.unwrap();
        assert_eq!(lease.runner, a);
        route.stop_routing(a);
        assert_eq!(before.runner(a).unwrap().in_flight, 0, "the snapshot misses the call");
        assert_eq!(route.in_flight(a), 1, "counted now, the call is there");
        // No call reaches it any more; once its call ends, 0 is final.
        let other = route.acquire(later(), None).await.unwrap();
        assert_eq!(other.runner, b);
        drop(lease);
        assert_eq!(route.in_flight(a), 0);
        assert_eq!(route.in_flight(RunnerId(Uuid::from_u128(99))), 0, "an unknown runner has none");
    }

    #[tokio::test]
    async fn waiting_calls_are_served_first_in_first_out() {
        let route = route();
        add(&route, 10, 1);
        let held = route.acquire(later(), None).await.unwrap();
        let (order_tx, mut order_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut waiters = Vec::new();
        for n in 0..5 {
            let (waiter_route, order_tx) = (route.clone(), order_tx.clone());
            waiters.push(tokio::spawn(async move {
                let lease = waiter_route.acquire(later(), None).await.unwrap();
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
            async move { route.acquire(later(), None).await.map(|l| l.runner) }
        });
        while route.snapshot().queued.is_empty() {
            tokio::task::yield_now().await;
        }
        let a = add(&route, 10, 1);
        assert_eq!(waiting.await.unwrap(), Ok(a));
        route.stop_routing(a);
        add(&route, 11, 1);
        let lease = route.acquire(later(), None).await.unwrap();
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
            async move { route.acquire_waiting(later(), None).await.map(|l| l.runner) }
        });
        tokio::task::yield_now().await;
        let a = add(&route, 10, 1);
        route.configure(RouteConfig { suspended: false, ..suspended });
        assert_eq!(waiting.await.unwrap(), Ok(a), "it is served once the app is resumed");

        let _busy = route.acquire(later(), None).await;
        let waiting = tokio::spawn({
            let route = route.clone();
            async move { route.acquire_waiting(later(), None).await.map(|l| l.runner) }
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
        assert_eq!(route.acquire(later(), None).await.err(), Some(AcquireError::NoRevision));
        route.set_revision(Some(RevisionId(Uuid::from_u128(1))));
        route.configure(RouteConfig {
            auth: AuthMode::Public,
            request_timeout: Duration::from_secs(1),
            suspended: true,
        });
        assert_eq!(route.acquire(later(), None).await.err(), Some(AcquireError::Suspended));
    }

    fn add_of(route: &Arc<AppRoute>, n: u128, revision: u128, max: u32) -> RunnerId {
        let id = RunnerId(Uuid::from_u128(n));
        route.add_runner(
            id,
            RevisionId(Uuid::from_u128(revision)),
            Endpoint::host(SocketAddr::from(([127, 0, 0, 1], 1))),
            max,
        );
        id
    }

    #[test]
    fn a_split_deals_every_run_of_a_hundred_calls_exactly() {
        const A: RevisionId = RevisionId(Uuid::from_u128(2));
        const B: RevisionId = RevisionId(Uuid::from_u128(3));
        let (current, a, b) = (RevisionId(Uuid::from_u128(1)), A, B);
        type Shares = &'static [(RevisionId, u8)];
        let (a_10, a_20, a_1, a_99) = (&[(A, 10), (B, 5)], &[(A, 20)], &[(A, 1)], &[(A, 99)]);
        let cases: [(Shares, usize, usize); 5] =
            [(&[], 0, 0), (a_20, 20, 0), (a_1, 1, 0), (a_10, 10, 5), (a_99, 99, 0)];
        for (shares, want_a, want_b) in cases {
            let mut split = Split { shares: shares.to_vec(), credit: vec![0; shares.len() + 1] };
            for round in 0..3 {
                let picks: Vec<RevisionId> = (0..100).map(|_| split.pick(current)).collect();
                let count = |r| picks.iter().filter(|p| **p == r).count();
                assert_eq!(
                    (count(a), count(b), count(current)),
                    (want_a, want_b, 100 - want_a - want_b),
                    "{shares:?} round {round}"
                );
            }
        }
        // Spread out, not in a block: a 20 % share gets one of every 5 calls.
        let mut split = Split { shares: vec![(a, 20)], credit: vec![0; 2] };
        let picks: Vec<bool> = (0..10).map(|_| split.pick(current) == a).collect();
        assert_eq!(picks.iter().filter(|p| **p).count(), 2);
        assert!(picks.windows(2).all(|w| !(w[0] && w[1])), "{picks:?}");
    }

    #[tokio::test]
    async fn pinned_calls_wait_for_their_revision_without_holding_up_the_others() {
        let route = route();
        let current = add_of(&route, 10, 1, 4);
        let pinned_rev = RevisionId(Uuid::from_u128(2));
        let waiting = tokio::spawn({
            let route = route.clone();
            async move { route.acquire(later(), Some(pinned_rev)).await.map(|l| (l.runner, l.revision)) }
        });
        while route.snapshot().queued.is_empty() {
            tokio::task::yield_now().await;
        }
        assert_eq!(route.snapshot().queued_for, [pinned_rev]);
        assert_eq!(route.snapshot().waited_for(), [pinned_rev]);
        let unpinned = route.acquire(later(), None).await.unwrap();
        assert_eq!(unpinned.runner, current, "an unpinned call passes the pinned one waiting");
        let other = add_of(&route, 11, 2, 1);
        assert_eq!(waiting.await.unwrap(), Ok((other, pinned_rev)));
        let snapshot = route.snapshot();
        assert_eq!((snapshot.in_flight_on(RevisionId(Uuid::from_u128(1))), snapshot.in_flight_on(pinned_rev)), (1, 0));
        // Its runner takes only calls pinned to it.
        drop(unpinned);
        for _ in 0..3 {
            assert_eq!(route.acquire(later(), None).await.unwrap().runner, current);
        }
    }

    #[tokio::test]
    async fn calls_waiting_for_a_canary_go_to_the_current_revision_when_the_split_ends() {
        let route = route();
        let canary = RevisionId(Uuid::from_u128(2));
        let current = add_of(&route, 10, 1, 1);
        route.set_split(vec![(canary, 50)]);
        let held = route.acquire(later(), None).await.unwrap();
        let mut waiting = Vec::new();
        for n in 0..4 {
            let route2 = route.clone();
            waiting.push(tokio::spawn(async move { route2.acquire(later(), None).await.map(|l| l.revision) }));
            while route.snapshot().queued.len() < n + 1 {
                tokio::task::yield_now().await;
            }
        }
        let pinned = tokio::spawn({
            let route = route.clone();
            async move { route.acquire(Instant::now() + Duration::from_millis(50), Some(canary)).await.map(|l| l.revision) }
        });
        while route.snapshot().queued.len() < 5 {
            tokio::task::yield_now().await;
        }
        assert_eq!(route.snapshot().queued_on(canary).len(), 3, "two by the split, one pinned");
        route.set_split(Vec::new());
        assert_eq!(route.snapshot().queued_on(canary).len(), 1, "only the pinned call still waits for the canary");
        assert_eq!(route.split(), []);
        drop(held);
        for call in waiting {
            // Served one by one by the current revision's runner, as each frees it.
            assert_eq!(call.await.unwrap(), Ok(RevisionId(Uuid::from_u128(1))));
        }
        assert_eq!(pinned.await.unwrap(), Err(AcquireError::Deadline));
        let _ = current;
    }
}
