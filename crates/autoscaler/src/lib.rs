//! The autoscaler's pure scaling decision: given an app's scaling policy and a
//! snapshot of its load and runners, [`decide`] says how many runners the app
//! should have, how many to start and which ones to stop. It reads no clock,
//! does no I/O and is not async; the caller measures how long calls have been
//! queued and runners have been idle and passes those ages in as
//! [`Duration`]s. That keeps every scaling rule testable as plain data, and
//! leaves the caller free to run the decision at every change and on a tick.

use std::time::Duration;

use model::ids::RunnerId;

#[cfg(test)]
mod tests;

/// An app's scaling settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The number of runners kept even when there is no traffic.
    pub min_concurrency: u32,
    /// The most runners that may exist at once; it wins over `min_concurrency`
    /// if the two are misconfigured.
    pub max_concurrency: u32,
    /// Spare runners kept on top of what current traffic needs.
    pub concurrency_buffer: u32,
    /// Spare runners as a whole percentage (0..=1000) of the current calls.
    pub concurrency_buffer_perc: u32,
    /// How many calls one runner serves at once; 0 is treated as 1.
    pub max_multiplexing: u32,
    /// How long a runner must have been idle before it may be stopped.
    pub keep_alive: Duration,
    /// How long a queued call must have waited before it counts as demand.
    pub scaling_delay: Duration,
}

/// Where a runner is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for machine capacity; no process yet.
    Pending,
    /// Process started, not yet healthy.
    Setup,
    /// Healthy and taking calls; `idle_for` is Some when it has no call in flight.
    Ready { idle_for: Option<Duration> },
    /// Its last start failed; waiting to be tried again.
    CrashBackoff,
}

/// One of the app's runners as the autoscaler sees it.
///
/// Runners that are draining or terminating are not passed in: they no longer
/// count towards the app's runners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Runner {
    /// The runner's id, which the decision names when it stops the runner.
    pub id: RunnerId,
    /// Where the runner is in its life.
    pub phase: Phase,
}

/// A snapshot of an app's load and runners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed<'a> {
    /// The number of calls being served right now.
    pub in_flight: u32,
    /// How long each queued call has waited so far.
    pub queued: &'a [Duration],
    /// The app's runners that are not draining or terminating.
    pub runners: &'a [Runner],
}

/// What the caller should do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The number of runners the app should have.
    pub wanted: u32,
    /// How many new runners to start now.
    pub start: u32,
    /// Runners to stop now (gracefully), in order.
    pub stop: Vec<RunnerId>,
    /// When, at the latest, to decide again even if nothing happens (a queued call
    /// reaching scaling_delay, an idle runner reaching keep_alive); None if nothing is
    /// pending on time.
    pub recheck_in: Option<Duration>,
}

/// Decides how many runners the app should have and what to do to get there.
///
/// `wanted = clamp(ceil(load / max_multiplexing) + buffer, min_concurrency,
/// max_concurrency)`, where `load` is the calls in flight plus the queued calls
/// that have waited at least `scaling_delay`, and `buffer` is the larger of
/// `concurrency_buffer` and `ceil(concurrency_buffer_perc% × load)`.
///
/// Missing runners are started at once. Surplus runners are stopped cheapest
/// first: crashed ones, then pending ones, then ready ones idle for at least
/// `keep_alive`, longest idle first. Runners in setup and busy runners are
/// never stopped, because that would throw away work already paid for.
pub fn decide(policy: &Policy, observed: &Observed<'_>) -> Decision {
    let counted_queued = observed.queued.iter().filter(|&&age| age >= policy.scaling_delay).count();
    let wanted = wanted(policy, u64::from(observed.in_flight) + counted_queued as u64);

    // Saturating, because more runners than fit in a u32 is nonsense anyway,
    // and the comparison with `wanted` stays right.
    let active = u32::try_from(observed.runners.len()).unwrap_or(u32::MAX);
    let start = wanted.saturating_sub(active);
    let surplus = active.saturating_sub(wanted) as usize;
    let stop = if surplus > 0 { choose_stops(policy, observed.runners, surplus) } else { Vec::new() };

    Decision { wanted, start, stop, recheck_in: recheck_in(policy, observed, surplus > 0) }
}

/// Computes the clamped number of runners for `load` calls. All arithmetic is in
/// u64 so that neither the sum nor the percentage can overflow.
fn wanted(policy: &Policy, load: u64) -> u32 {
    // A multiplexing of 0 is a misconfiguration; serving one call per runner is
    // the safe reading and avoids dividing by zero.
    let mux = u64::from(policy.max_multiplexing.max(1));
    let needed = load.div_ceil(mux);
    let perc_buffer = (u64::from(policy.concurrency_buffer_perc) * load).div_ceil(100);
    let buffer = u64::from(policy.concurrency_buffer).max(perc_buffer);
    // The cap is applied last so that `max_concurrency` wins when it is below
    // `min_concurrency`; it also makes the result fit in a u32.
    let wanted = (needed + buffer).max(u64::from(policy.min_concurrency)).min(u64::from(policy.max_concurrency));
    u32::try_from(wanted).unwrap_or(u32::MAX)
}

/// Picks up to `surplus` runners to stop, cheapest to lose first.
fn choose_stops(policy: &Policy, runners: &[Runner], surplus: usize) -> Vec<RunnerId> {
    // Crashed and pending runners serve nothing and have no process worth
    // keeping, so stopping them costs nothing.
    let crashed = runners.iter().filter(|r| r.phase == Phase::CrashBackoff);
    let pending = runners.iter().filter(|r| r.phase == Phase::Pending);
    let mut idle: Vec<(&Runner, Duration)> = runners
        .iter()
        .filter_map(|r| match r.phase {
            Phase::Ready { idle_for: Some(idle_for) } if idle_for >= policy.keep_alive => Some((r, idle_for)),
            _ => None,
        })
        .collect();
    // The longest idle runner is the least likely to be needed soon. The sort is
    // stable, so ties keep the caller's order and the result is deterministic.
    idle.sort_by_key(|&(_, idle_for)| std::cmp::Reverse(idle_for));

    crashed.chain(pending).chain(idle.into_iter().map(|(r, _)| r)).take(surplus).map(|r| r.id).collect()
}

/// The earliest moment at which the decision could change with no new event.
fn recheck_in(policy: &Policy, observed: &Observed<'_>, has_surplus: bool) -> Option<Duration> {
    let queued =
        observed.queued.iter().filter(|&&age| age < policy.scaling_delay).map(|&age| policy.scaling_delay - age);
    // A runner reaching keep_alive only matters when there are more runners than
    // wanted. This is judged before this decision's stops take effect, which can
    // ask for a recheck that turns out to change nothing; an extra wake-up is
    // cheap, whereas a missed one would keep an idle runner alive too long.
    let idle = observed.runners.iter().filter(|_| has_surplus).filter_map(|r| match r.phase {
        Phase::Ready { idle_for: Some(idle_for) } if idle_for < policy.keep_alive => Some(policy.keep_alive - idle_for),
        _ => None,
    });
    queued.chain(idle).min()
}
