//! The guard's judgement: whether a revision that has just taken an app's calls answers
//! clearly worse than the one it replaced (or, for a canary, than the current one). Pure:
//! the controller gives it both revisions' figures and carries out what it says.

use std::time::Duration;

use gateway::Figures;
use model::records::GuardSettings;

/// Fewer calls than this say nothing yet: one failed call of three is no verdict.
pub(crate) const MIN_CALLS: u64 = 20;

/// A p95 this close to the old one is never a trip, whatever the ratio: on a loaded
/// machine a 2 ms call can take 5 ms.
pub(crate) const P95_FLOOR: Duration = Duration::from_millis(50);

/// Why the new revision's figures (`after`) are worse than the old one's (`before`) by
/// more than the settings allow, or `None` while they are not (or too few calls came).
pub(crate) fn verdict(settings: &GuardSettings, before: &Figures, after: &Figures) -> Option<String> {
    if after.calls < MIN_CALLS {
        return None;
    }
    let (old, new) = (before.error_share() * 100.0, after.error_share() * 100.0);
    if new - old > f64::from(settings.max_error_increase) {
        return Some(format!(
            "answered 5xx to {new:.1}% of {} calls, against {old:.1}% of {} before (at most {} points more allowed)",
            after.calls, before.calls, settings.max_error_increase
        ));
    }
    if before.calls < MIN_CALLS {
        return None;
    }
    let (Some(old), Some(new)) = (before.p95(), after.p95()) else { return None };
    let allowed = old.mul_f64(f64::from(settings.max_p95_ratio) / 100.0);
    if new > allowed && new.saturating_sub(old) >= P95_FLOOR {
        return Some(format!(
            "had a p95 of {} ms over {} calls, against {} ms before (at most {}% allowed)",
            new.as_millis(),
            after.calls,
            old.as_millis(),
            settings.max_p95_ratio
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(calls: u64, errors: u64, p95_ms: u64) -> Figures {
        Figures::summary(calls, errors, Some(Duration::from_millis(p95_ms)))
    }

    #[test]
    fn a_revision_trips_only_when_clearly_worse_than_the_one_before() {
        let settings = GuardSettings::default();
        let cases: &[(&str, Figures, Figures, Option<&str>)] = &[
            ("healthy as before", figures(1000, 1, 10), figures(500, 0, 10), None),
            ("half its calls fail", figures(1000, 0, 10), figures(100, 50, 10), Some("5xx to 50.0%")),
            ("a little worse is allowed", figures(1000, 10, 10), figures(100, 5, 10), None),
            ("just past the allowance", figures(1000, 10, 10), figures(100, 7, 10), Some("5xx to 7.0%")),
            ("too few calls yet", figures(1000, 0, 10), figures(19, 19, 10), None),
            ("no calls before, many fail now", Figures::default(), figures(40, 20, 10), Some("5xx to 50.0%")),
            ("much slower", figures(1000, 0, 100), figures(100, 0, 400), Some("p95 of")),
            ("slower, but within the ratio", figures(1000, 0, 100), figures(100, 0, 180), None),
            ("thrice as slow but only by a few ms", figures(1000, 0, 2), figures(100, 0, 6), None),
            ("no baseline for latency", figures(5, 0, 10), figures(100, 0, 900), None),
        ];
        for (what, before, after, want) in cases {
            let got = verdict(&settings, before, after);
            match want {
                None => assert_eq!(got, None, "{what}"),
                Some(part) => assert!(got.as_deref().is_some_and(|g| g.contains(part)), "{what}: {got:?}"),
            }
        }
        let strict = GuardSettings { max_error_increase: 0, max_p95_ratio: 110, ..settings };
        assert!(verdict(&strict, &figures(1000, 0, 100), &figures(100, 1, 10)).is_some(), "any 5xx more trips");
        assert!(verdict(&strict, &figures(1000, 0, 100), &figures(100, 0, 160)).is_some());
    }
}
