//! Identifiers for revisions and runners.
//!
//! Ids are random (UUIDv4) so that any short prefix of one is as good as any other
//! for telling it apart: people type the first few characters. Listings order by
//! creation time, which the records carry.

use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

/// The error returned when a string is not a full UUID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} id {input:?}: expected a full UUID")]
pub struct ParseIdError {
    /// Which kind of id was being parsed, e.g. "revision".
    pub kind: &'static str,
    /// The rejected input.
    pub input: String,
}

/// Defines a newtype around [`Uuid`] so that revision and runner ids cannot
/// be mixed up, while sharing one implementation of creation, display and
/// parsing.
macro_rules! uuid_id {
    ($(#[$meta:meta])* $name:ident, $kind:literal) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub Uuid);

        impl $name {
            /// Creates a fresh, random id.
            // A `Default` impl would hand out a new random id from
            // `Default::default()`, which is surprising, so `new` stands alone.
            #[allow(clippy::new_without_default)]
            pub fn new() -> Self {
                Self(Uuid::new_v4())
            }

            /// The first 8 hex digits, for display in tables and logs.
            ///
            /// This is a prefix of the full id, so it can be fed back to a
            /// prefix lookup. Ids are random, so two of one app's revisions
            /// share it only by rare chance; lookups report an ambiguous prefix.
            pub fn short(&self) -> String {
                let mut hex = self.0.simple().to_string();
                hex.truncate(8);
                hex
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0.hyphenated(), f)
            }
        }

        impl FromStr for $name {
            type Err = ParseIdError;

            /// Parses a full UUID in any form the `uuid` crate accepts
            /// (hyphenated, plain hex, braced or URN).
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self).map_err(|_| ParseIdError {
                    kind: $kind,
                    input: s.to_owned(),
                })
            }
        }

        impl From<Uuid> for $name {
            fn from(uuid: Uuid) -> Self {
                Self(uuid)
            }
        }
    };
}

uuid_id!(
    /// Identifies one immutable revision of an app.
    RevisionId,
    "revision"
);

uuid_id!(
    /// Identifies one running instance (process) of a revision.
    RunnerId,
    "runner"
);

/// Whether `s` could be the beginning of an id as displayed: 1 to 36
/// characters of hex digits and '-'.
///
/// Callers use this to decide whether a command-line argument should be
/// looked up as an id prefix rather than, say, an app name.
pub fn is_id_prefix(s: &str) -> bool {
    (1..=36).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

#[cfg(test)]
mod tests {
    use expect_test::expect;

    use super::*;

    const FIXED: &str = "0190c1a2-3b4c-7d5e-8f60-718293a4b5c6";

    #[test]
    fn display_is_full_hyphenated_uuid() {
        let id: RevisionId = FIXED.parse().unwrap();
        assert_eq!(id.to_string(), FIXED);
        assert_eq!(format!("{}", RunnerId(id.0)), FIXED);
    }

    #[test]
    fn short_is_a_prefix_of_display() {
        let id: RevisionId = FIXED.parse().unwrap();
        expect!["0190c1a2"].assert_eq(&id.short());

        let fresh = RunnerId::new();
        assert_eq!(fresh.short().len(), 8);
        assert!(fresh.to_string().starts_with(&fresh.short()));
        assert!(is_id_prefix(&fresh.short()));
    }

    #[test]
    fn parse_accepts_plain_hex_and_round_trips() {
        let id: RevisionId = "0190c1a23b4c7d5e8f60718293a4b5c6".parse().unwrap();
        assert_eq!(id.to_string(), FIXED);

        let fresh = RevisionId::new();
        assert_eq!(fresh.to_string().parse::<RevisionId>().unwrap(), fresh);
    }

    #[test]
    fn parse_rejects_prefixes_and_garbage() {
        let errors: Vec<String> =
            ["0190c1a2", "", "not-a-uuid"].iter().map(|s| s.parse::<RevisionId>().unwrap_err().to_string()).collect();
        expect![[r#"
            [
                "invalid revision id \"0190c1a2\": expected a full UUID",
                "invalid revision id \"\": expected a full UUID",
                "invalid revision id \"not-a-uuid\": expected a full UUID",
            ]
        "#]]
        .assert_debug_eq(&errors);
        expect![[r#"invalid runner id "x": expected a full UUID"#]]
            .assert_eq(&"x".parse::<RunnerId>().unwrap_err().to_string());
    }

    #[test]
    fn new_ids_are_random_v4_uuids() {
        let a = RevisionId::new();
        let b = RevisionId::new();
        assert_ne!(a, b);
        assert_eq!(a.0.get_version_num(), 4);
    }

    #[test]
    fn id_prefixes() {
        for ok in ["0", "0190c1a2", "0190C1A2-3b", FIXED] {
            assert!(is_id_prefix(ok), "{ok:?} should be an id prefix");
        }
        let too_long = format!("{FIXED}0");
        for bad in ["", "echo", "0190c1a2 ", "g", too_long.as_str()] {
            assert!(!is_id_prefix(bad), "{bad:?} should not be an id prefix");
        }
    }
}
