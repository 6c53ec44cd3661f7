//! The small closed sets of states and modes attached to revisions and keys.
//!
//! Each enum has a stable lowercase spelling (`as_str` / `parse`) that is used
//! wherever the value leaves the process: the database, the API and the CLI.

/// Defines a fieldless enum together with its stable string spelling, so the
/// `as_str` and `parse` tables cannot drift apart.
macro_rules! string_enum {
    (
        $(#[$meta:meta])*
        $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident => $text:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];

            /// The stable lowercase spelling.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text),+
                }
            }

            /// The inverse of `as_str`; matching is exact (case-sensitive).
            pub fn parse(s: &str) -> Option<Self> {
                match s {
                    $($text => Some(Self::$variant),)+
                    _ => None,
                }
            }
        }
    };
}

string_enum! {
    /// Where a revision is in its lifecycle.
    RevisionStatus {
        /// Being built and started; not yet serving traffic.
        Deploying => "deploying",
        /// Healthy and eligible to serve traffic.
        Deployed => "deployed",
        /// The build or the first start failed.
        Failed => "failed",
        /// Deliberately stopped; keeps its artefacts but serves nothing.
        Suspended => "suspended",
    }
}

impl RevisionStatus {
    /// A capitalised form for human-facing output.
    pub fn label(self) -> &'static str {
        match self {
            Self::Deploying => "Deploying",
            Self::Deployed => "Deployed",
            Self::Failed => "Failed",
            Self::Suspended => "Suspended",
        }
    }
}

string_enum! {
    /// Who may call an app's HTTP endpoints.
    #[derive(Default)]
    AuthMode {
        /// Callers holding a key of the app's team (or the root key).
        #[default]
        Private => "private",
        /// Anyone, with no key.
        Public => "public",
        /// Callers holding any valid key of this server, of any team.
        Shared => "shared",
    }
}

string_enum! {
    /// How a new revision replaces the previous one.
    #[derive(Default)]
    Strategy {
        /// Start the new revision first and switch traffic once it is healthy.
        #[default]
        Rolling => "rolling",
        /// Switch traffic at once, without waiting for a runner of the new revision (the
        /// next call starts one), and let the old revision's runners go.
        Recreate => "recreate",
    }
}

string_enum! {
    /// What an API key is allowed to do.
    KeyScope {
        /// The bootstrap key; may do everything, including managing admins.
        Root => "root",
        /// May manage apps and keys.
        Admin => "admin",
        /// May only call apps.
        Api => "api",
    }
}

#[cfg(test)]
mod tests {
    use expect_test::expect;

    use super::*;

    #[test]
    fn spellings_round_trip() {
        for &s in RevisionStatus::ALL {
            assert_eq!(RevisionStatus::parse(s.as_str()), Some(s));
        }
        for &m in AuthMode::ALL {
            assert_eq!(AuthMode::parse(m.as_str()), Some(m));
        }
        for &s in Strategy::ALL {
            assert_eq!(Strategy::parse(s.as_str()), Some(s));
        }
        for &k in KeyScope::ALL {
            assert_eq!(KeyScope::parse(k.as_str()), Some(k));
        }
    }

    #[test]
    fn spellings() {
        let all: Vec<String> = RevisionStatus::ALL
            .iter()
            .map(|s| format!("{} {}", s.as_str(), s.label()))
            .chain(AuthMode::ALL.iter().map(|m| m.as_str().to_owned()))
            .chain(Strategy::ALL.iter().map(|s| s.as_str().to_owned()))
            .chain(KeyScope::ALL.iter().map(|k| k.as_str().to_owned()))
            .collect();
        expect![[r#"
            [
                "deploying Deploying",
                "deployed Deployed",
                "failed Failed",
                "suspended Suspended",
                "private",
                "public",
                "shared",
                "rolling",
                "recreate",
                "root",
                "admin",
                "api",
            ]
        "#]]
        .assert_debug_eq(&all);
    }

    #[test]
    fn parse_is_exact() {
        assert_eq!(RevisionStatus::parse("Deployed"), None);
        assert_eq!(AuthMode::parse(" public"), None);
        assert_eq!(KeyScope::parse(""), None);
    }

    #[test]
    fn defaults() {
        assert_eq!(AuthMode::default(), AuthMode::Private);
        assert_eq!(Strategy::default(), Strategy::Rolling);
    }
}

string_enum! {
    /// Where a runner is in its life.
    RunnerState {
        /// Waiting for room on its machine type; no process yet.
        Pending => "pending",
        /// Process started, health check not yet passed.
        Setup => "setup",
        /// Set up, no call in flight.
        Idle => "idle",
        /// Set up, at least one call in flight.
        Running => "running",
        /// Takes no new calls; finishing the ones it has.
        Draining => "draining",
        /// Signalled to stop; waiting for the process to end.
        Terminating => "terminating",
        /// Gone.
        Terminated => "terminated",
        /// Its start failed; it is tried again after a growing delay.
        CrashBackoff => "crash_backoff",
    }
}

impl RunnerState {
    /// Whether the runner has ended for good.
    pub fn is_terminal(self) -> bool {
        self == RunnerState::Terminated
    }
}

string_enum! {
    /// Where a request in the durable queue is.
    QueueState {
        /// Accepted and stored; waiting for a runner.
        InQueue => "in_queue",
        /// Sent to a runner, which has not answered yet.
        InProgress => "in_progress",
        /// Answered, failed for good, or cancelled; its result is kept.
        Completed => "completed",
    }
}

string_enum! {
    /// Where the delivery of a queue request's result to its webhook is.
    WebhookState {
        Pending => "pending",
        Delivered => "delivered",
        /// Every delivery attempt failed.
        Failed => "failed",
    }
}
