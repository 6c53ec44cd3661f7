//! Data-driven tests of [`decide`]: each case is one line of input and a
//! one-line snapshot of the decision, so that a case can be checked by hand
//! against the scaling rule.

use std::time::Duration;

use expect_test::{Expect, expect};
use model::ids::RunnerId;
use uuid::Uuid;

use super::{Observed, Phase, Policy, Runner, decide};

/// The policy every case starts from: no floor, a generous cap, no buffer, one
/// call per runner, a 10s keep-alive and no scaling delay, so that each case
/// only has to override the setting it is about.
fn base_policy() -> Policy {
    Policy {
        min_concurrency: 0,
        max_concurrency: 10,
        concurrency_buffer: 0,
        concurrency_buffer_perc: 0,
        max_multiplexing: 1,
        keep_alive: Duration::from_secs(10),
        scaling_delay: Duration::ZERO,
    }
}

/// Runner ids are fixed so that snapshots are stable; `r{n}` is built from the
/// UUID `n` and printed back under that name.
fn id(n: u128) -> RunnerId {
    RunnerId(Uuid::from_u128(n))
}

fn name(id: RunnerId) -> String {
    format!("r{}", id.0.as_u128())
}

fn pending(n: u128) -> Runner {
    Runner { id: id(n), phase: Phase::Pending }
}

fn setup(n: u128) -> Runner {
    Runner { id: id(n), phase: Phase::Setup }
}

fn crashed(n: u128) -> Runner {
    Runner { id: id(n), phase: Phase::CrashBackoff }
}

fn busy(n: u128) -> Runner {
    Runner { id: id(n), phase: Phase::Ready { idle_for: None } }
}

fn idle(n: u128, secs: u64) -> Runner {
    Runner { id: id(n), phase: Phase::Ready { idle_for: Some(Duration::from_secs(secs)) } }
}

/// Runs one case. `queued` holds each queued call's age in seconds.
fn check(overrides: impl FnOnce(&mut Policy), in_flight: u32, queued: &[u64], runners: &[Runner], expect: Expect) {
    let mut policy = base_policy();
    overrides(&mut policy);
    let queued: Vec<Duration> = queued.iter().map(|&s| Duration::from_secs(s)).collect();
    let decision = decide(&policy, &Observed { in_flight, queued: &queued, runners });
    let stop: Vec<String> = decision.stop.iter().map(|&id| name(id)).collect();
    let actual = format!(
        "wanted={} start={} stop=[{}] recheck={:?}",
        decision.wanted,
        decision.start,
        stop.join(" "),
        decision.recheck_in
    );
    expect.assert_eq(&actual);
}

fn defaults(_: &mut Policy) {}

#[test]
fn nothing_to_do() {
    check(defaults, 0, &[], &[], expect!["wanted=0 start=0 stop=[] recheck=None"]);
    check(defaults, 2, &[], &[busy(1), busy(2)], expect!["wanted=2 start=0 stop=[] recheck=None"]);
}

#[test]
fn scales_from_zero_on_one_queued_call() {
    check(defaults, 0, &[0], &[], expect!["wanted=1 start=1 stop=[] recheck=None"]);
}

#[test]
fn min_concurrency_is_kept_without_load() {
    check(|p| p.min_concurrency = 2, 0, &[], &[], expect!["wanted=2 start=2 stop=[] recheck=None"]);
    check(
        |p| p.min_concurrency = 2,
        0,
        &[],
        &[idle(1, 100), idle(2, 100)],
        expect!["wanted=2 start=0 stop=[] recheck=None"],
    );
}

#[test]
fn max_concurrency_caps() {
    check(|p| p.max_concurrency = 3, 5, &[0, 0], &[busy(1)], expect!["wanted=3 start=2 stop=[] recheck=None"]);
}

#[test]
fn multiplexing_divides_rounding_up() {
    check(|p| p.max_multiplexing = 2, 5, &[], &[], expect!["wanted=3 start=3 stop=[] recheck=None"]);
    check(|p| p.max_multiplexing = 2, 4, &[], &[], expect!["wanted=2 start=2 stop=[] recheck=None"]);
}

#[test]
fn max_multiplexing_zero_is_treated_as_one() {
    check(|p| p.max_multiplexing = 0, 3, &[], &[], expect!["wanted=3 start=3 stop=[] recheck=None"]);
}

#[test]
fn fixed_buffer() {
    check(|p| p.concurrency_buffer = 2, 0, &[], &[], expect!["wanted=2 start=2 stop=[] recheck=None"]);
    check(|p| p.concurrency_buffer = 2, 3, &[], &[busy(1)], expect!["wanted=5 start=4 stop=[] recheck=None"]);
}

#[test]
fn percentage_buffer_rounds_up() {
    check(|p| p.concurrency_buffer_perc = 20, 6, &[], &[], expect!["wanted=8 start=8 stop=[] recheck=None"]);
    check(|p| p.concurrency_buffer_perc = 50, 4, &[], &[], expect!["wanted=6 start=6 stop=[] recheck=None"]);
    check(|p| p.concurrency_buffer_perc = 50, 0, &[], &[], expect!["wanted=0 start=0 stop=[] recheck=None"]);
}

#[test]
fn larger_buffer_wins() {
    check(
        |p| {
            p.concurrency_buffer = 1;
            p.concurrency_buffer_perc = 50;
        },
        4,
        &[],
        &[],
        expect!["wanted=6 start=6 stop=[] recheck=None"],
    );
    check(
        |p| {
            p.concurrency_buffer = 4;
            p.concurrency_buffer_perc = 50;
        },
        4,
        &[],
        &[],
        expect!["wanted=8 start=8 stop=[] recheck=None"],
    );
}

#[test]
fn scaling_delay_counts_only_old_queued_calls() {
    let delay = |p: &mut Policy| p.scaling_delay = Duration::from_secs(5);
    check(delay, 0, &[1, 3], &[], expect!["wanted=0 start=0 stop=[] recheck=Some(2s)"]);
    check(delay, 0, &[5, 7, 2], &[], expect!["wanted=2 start=2 stop=[] recheck=Some(3s)"]);
    check(delay, 1, &[], &[busy(1)], expect!["wanted=1 start=0 stop=[] recheck=None"]);
}

#[test]
fn keep_alive_stops_only_long_idle_runners() {
    check(defaults, 0, &[], &[idle(1, 4)], expect!["wanted=0 start=0 stop=[] recheck=Some(6s)"]);
    check(defaults, 0, &[], &[idle(1, 10)], expect!["wanted=0 start=0 stop=[r1] recheck=None"]);
    check(defaults, 0, &[], &[idle(1, 30)], expect!["wanted=0 start=0 stop=[r1] recheck=None"]);
}

#[test]
fn idle_runner_without_surplus_needs_no_recheck() {
    check(|p| p.min_concurrency = 1, 0, &[], &[idle(1, 4)], expect!["wanted=1 start=0 stop=[] recheck=None"]);
}

#[test]
fn busy_runners_are_never_stopped() {
    check(defaults, 0, &[], &[busy(1), busy(2)], expect!["wanted=0 start=0 stop=[] recheck=None"]);
}

#[test]
fn setup_runners_are_never_stopped() {
    check(defaults, 0, &[], &[setup(1), idle(2, 30)], expect!["wanted=0 start=0 stop=[r2] recheck=None"]);
}

#[test]
fn surplus_pending_runners_are_stopped_first() {
    check(defaults, 1, &[], &[idle(1, 30), pending(2), busy(3)], expect!["wanted=1 start=0 stop=[r2 r1] recheck=None"]);
}

#[test]
fn crashed_runners_are_stopped_before_pending_ones() {
    check(defaults, 1, &[], &[busy(1), pending(2), crashed(3)], expect!["wanted=1 start=0 stop=[r3 r2] recheck=None"]);
    check(
        defaults,
        0,
        &[],
        &[pending(1), crashed(2), idle(3, 30), crashed(4)],
        expect!["wanted=0 start=0 stop=[r2 r4 r1 r3] recheck=None"],
    );
}

#[test]
fn longest_idle_runner_is_stopped_first() {
    check(
        defaults,
        1,
        &[],
        &[idle(1, 20), idle(2, 50), busy(3), idle(4, 30)],
        expect!["wanted=1 start=0 stop=[r2 r4 r1] recheck=None"],
    );
    check(
        defaults,
        1,
        &[],
        &[idle(1, 20), idle(2, 20), busy(3)],
        expect!["wanted=1 start=0 stop=[r1 r2] recheck=None"],
    );
}

#[test]
fn surplus_limits_how_many_are_stopped() {
    check(
        |p| p.min_concurrency = 2,
        0,
        &[],
        &[idle(1, 20), idle(2, 40), idle(3, 30), idle(4, 10)],
        expect!["wanted=2 start=0 stop=[r2 r3] recheck=None"],
    );
}

#[test]
fn min_above_max_lets_max_win() {
    check(
        |p| {
            p.min_concurrency = 5;
            p.max_concurrency = 2;
        },
        0,
        &[],
        &[],
        expect!["wanted=2 start=2 stop=[] recheck=None"],
    );
}

#[test]
fn recheck_is_the_earliest_pending_deadline() {
    let delay = |p: &mut Policy| p.scaling_delay = Duration::from_secs(5);
    // An idle runner reaching keep_alive comes first.
    check(delay, 0, &[2], &[idle(1, 6), idle(2, 8)], expect!["wanted=0 start=0 stop=[] recheck=Some(2s)"]);
    // A queued call reaching scaling_delay comes first.
    check(delay, 0, &[4], &[idle(1, 8)], expect!["wanted=0 start=0 stop=[] recheck=Some(1s)"]);
    // Busy runners count towards the surplus but have no deadline of their own.
    check(delay, 1, &[], &[busy(1), busy(2), idle(3, 7)], expect!["wanted=1 start=0 stop=[] recheck=Some(3s)"]);
}
