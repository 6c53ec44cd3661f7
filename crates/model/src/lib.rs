//! Hangar's domain model: the identifiers of revisions and runners, the
//! states and modes a revision can be in, and the `hangar.toml` app manifest
//! together with its parsing and validation. The crate is deliberately pure
//! (no I/O, no async runtime, no database, no HTTP and no serialisation
//! framework) so that the CLI, the API server and the store can all share one
//! definition of what a valid app looks like without pulling in each other's
//! dependencies.

pub mod ids;
pub mod lifecycle;
pub mod manifest;
pub mod records;
pub mod revision;

pub use ids::{ParseIdError, RevisionId, RunnerId, is_id_prefix};
pub use manifest::{
    MANIFEST_FILE, Manifest, ManifestError, ManifestErrors, RunnerSpec, Scaling, validate_app_name, validate_env_name,
};
pub use revision::{AuthMode, KeyScope, QueueState, RevisionStatus, Strategy, WebhookState};
