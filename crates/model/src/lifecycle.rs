//! Lifecycles as pure transition functions. For a runner: given its state and what
//! happened, the next state and what must be done about it; the app's controller
//! applies the effects (route, signal) and keeps the state, so every change of a
//! runner's state is decided here, in one table. For a revision: which status an event
//! leads to, and so whether the event is allowed at all.

use crate::revision::{RevisionStatus, RunnerState};

/// What can happen to a revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevisionEvent {
    /// It becomes the app's current revision (after its build, or by set-rev).
    MadeCurrent,
    /// Its build failed, its manifest was refused, or its first runner never set up.
    Failed,
    /// The server stopped while it was deploying.
    Interrupted,
    /// Its app was suspended while it was current.
    Suspended,
    /// Its app was resumed.
    Resumed,
}

/// The status a revision moves to, or `None` when the event is not allowed in its
/// status (a Failed revision never becomes current, say).
pub fn revision_next(status: RevisionStatus, event: RevisionEvent) -> Option<RevisionStatus> {
    use RevisionEvent as E;
    use RevisionStatus as S;
    match (status, event) {
        (S::Deploying | S::Deployed, E::MadeCurrent) => Some(S::Deployed),
        (S::Deploying, E::Failed | E::Interrupted) => Some(S::Failed),
        (S::Deployed, E::Suspended) => Some(S::Suspended),
        (S::Suspended, E::Resumed) => Some(S::Deployed),
        _ => None,
    }
}

/// What can happen to a runner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunnerEvent {
    /// Its process was started (it found room on its machine type).
    Launched,
    /// Its health check passed for the first time.
    Healthy,
    /// It should go: no new calls, finish the ones it has, then stop.
    Drain,
    /// A draining runner has no call left.
    Drained,
    /// It must stop at once.
    Kill,
    /// It failed its health checks while serving (the supervisor is killing it).
    Unhealthy,
    /// Its process ended. `requested`: stopped or killed on order.
    Exited { requested: bool },
    /// Its start failed (it could not be started, or ended during setup, not on order);
    /// it will be tried again.
    SetupFailed,
    /// Its back-off ran out: it ends, and a new runner takes its place.
    RetryDue,
}

/// What the controller must do when a runner changes state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunnerEffect {
    /// Start giving it calls.
    Route,
    /// Give it no new calls; calls in flight go on.
    StopRouting,
    /// Forget it on the gateway; calls in flight will fail.
    Unroute,
    /// SIGTERM now, SIGKILL after the grace period.
    SignalStop,
    /// SIGKILL now.
    SignalKill,
    /// Give back its place on its machine type.
    ReleaseCapacity,
}

/// The next state and its effects, or `None` when the event means nothing in this
/// state (an event that arrives late, say) and the runner stays as it is.
pub fn next(state: RunnerState, event: RunnerEvent) -> Option<(RunnerState, &'static [RunnerEffect])> {
    use RunnerEffect::*;
    use RunnerEvent as E;
    use RunnerState as S;
    let to = match (state, event) {
        (S::Pending, E::Launched) => (S::Setup, &[][..]),
        (S::Setup, E::Healthy) => (S::Idle, &[Route][..]),
        (S::Idle | S::Running, E::Drain) => (S::Draining, &[StopRouting][..]),
        (S::Setup, E::Drain) => (S::Terminating, &[SignalStop][..]),
        (S::Pending | S::CrashBackoff, E::Drain | E::Kill) => (S::Terminated, &[][..]),
        (S::Draining, E::Drained) => (S::Terminating, &[Unroute, SignalStop][..]),
        (S::Setup | S::Idle | S::Running | S::Draining | S::Terminating, E::Kill) => {
            (S::Terminating, &[Unroute, SignalKill][..])
        }
        (S::Idle | S::Running | S::Draining, E::Unhealthy) => (S::Terminating, &[Unroute][..]),
        (S::Pending | S::Setup, E::SetupFailed) => (S::CrashBackoff, &[ReleaseCapacity][..]),
        (S::Setup | S::Idle | S::Running | S::Draining | S::Terminating, E::Exited { .. }) => {
            (S::Terminated, &[Unroute, ReleaseCapacity][..])
        }
        (S::CrashBackoff, E::RetryDue) => (S::Terminated, &[][..]),
        _ => return None,
    };
    Some(to)
}

#[cfg(test)]
mod tests {
    use expect_test::{Expect, expect};

    use super::*;

    fn check(state: RunnerState, event: RunnerEvent, expect: Expect) {
        let actual = match next(state, event) {
            Some((to, effects)) => format!("{} {effects:?}", to.as_str()),
            None => "ignored".to_owned(),
        };
        expect.assert_eq(&actual);
    }

    #[test]
    fn transitions() {
        use RunnerEvent as E;
        use RunnerState as S;
        check(S::Pending, E::Launched, expect!["setup []"]);
        check(S::Setup, E::Healthy, expect!["idle [Route]"]);
        check(S::Idle, E::Drain, expect!["draining [StopRouting]"]);
        check(S::Running, E::Drain, expect!["draining [StopRouting]"]);
        check(S::Setup, E::Drain, expect!["terminating [SignalStop]"]);
        check(S::Pending, E::Drain, expect!["terminated []"]);
        check(S::CrashBackoff, E::Drain, expect!["terminated []"]);
        check(S::Draining, E::Drain, expect!["ignored"]);
        check(S::Draining, E::Drained, expect!["terminating [Unroute, SignalStop]"]);
        check(S::Idle, E::Drained, expect!["ignored"]);
        check(S::Running, E::Kill, expect!["terminating [Unroute, SignalKill]"]);
        check(S::Draining, E::Kill, expect!["terminating [Unroute, SignalKill]"]);
        check(S::Pending, E::Kill, expect!["terminated []"]);
        check(S::Terminated, E::Kill, expect!["ignored"]);
        check(S::Running, E::Unhealthy, expect!["terminating [Unroute]"]);
        check(S::Setup, E::SetupFailed, expect!["crash_backoff [ReleaseCapacity]"]);
        check(S::Pending, E::SetupFailed, expect!["crash_backoff [ReleaseCapacity]"]);
        check(S::Idle, E::SetupFailed, expect!["ignored"]);
        check(S::Running, E::Exited { requested: false }, expect!["terminated [Unroute, ReleaseCapacity]"]);
        check(S::Terminating, E::Exited { requested: true }, expect!["terminated [Unroute, ReleaseCapacity]"]);
        check(S::Terminated, E::Exited { requested: true }, expect!["ignored"]);
        check(S::CrashBackoff, E::RetryDue, expect!["terminated []"]);
        check(S::Idle, E::RetryDue, expect!["ignored"]);
        check(S::Idle, E::Healthy, expect!["ignored"]);
    }

    #[test]
    fn revision_transitions() {
        use RevisionEvent as E;
        use RevisionStatus as S;
        let cases = [
            (S::Deploying, E::MadeCurrent, Some(S::Deployed)),
            (S::Deployed, E::MadeCurrent, Some(S::Deployed)),
            (S::Failed, E::MadeCurrent, None),
            (S::Suspended, E::MadeCurrent, None),
            (S::Deploying, E::Failed, Some(S::Failed)),
            (S::Deploying, E::Interrupted, Some(S::Failed)),
            (S::Deployed, E::Failed, None),
            (S::Deployed, E::Suspended, Some(S::Suspended)),
            (S::Failed, E::Suspended, None),
            (S::Suspended, E::Resumed, Some(S::Deployed)),
            (S::Deployed, E::Resumed, None),
        ];
        for (status, event, expected) in cases {
            assert_eq!(revision_next(status, event), expected, "{status:?} + {event:?}");
        }
    }

    #[test]
    fn terminated_is_final() {
        use RunnerEvent as E;
        for event in [
            E::Launched,
            E::Healthy,
            E::Drain,
            E::Drained,
            E::Kill,
            E::Unhealthy,
            E::Exited { requested: false },
            E::SetupFailed,
            E::RetryDue,
        ] {
            assert_eq!(next(RunnerState::Terminated, event), None, "{event:?}");
        }
    }
}
