//! What several servers sharing one store need of it: who is there (`servers`), which
//! of them runs each app's controller (one lease per app: owner, epoch, expiry), and the
//! built code of each revision, so that whichever server runs an app can run it.
//!
//! A lease's expiry is reckoned by the database's clock (PostgreSQL's
//! `clock_timestamp()`), never a server's, so servers whose clocks disagree still agree
//! on who owns what. Taking a lease over bumps its epoch; a write made under a lease
//! ([`Fence`]) is refused once the lease has expired or passed to another server.

use std::path::Path;
use std::time::Duration;

use model::ids::RevisionId;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::{Backend, Result, Store, StoreError};

/// A server as the others find it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerRecord {
    pub id: String,
    /// Where its control API and its gateway answer (`http://host:port`).
    pub api_url: String,
    pub gateway_url: String,
    pub started_at: OffsetDateTime,
    /// Its last heartbeat, by the database's clock.
    pub seen_at: OffsetDateTime,
}

/// An app's lease: the server running its controller, and since when (`epoch`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub app_id: Uuid,
    pub owner: String,
    pub epoch: i64,
    /// Whether it is still in force, by the database's clock.
    pub live: bool,
    /// How many runners of the app its owner last said it runs.
    pub runners: u32,
}

/// The lease a write is made under: it is made only while that lease is the app's and in
/// force, so a server that has lost an app cannot change it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub owner: String,
    pub epoch: i64,
}

/// Announcements that leases were released (a server left, or gave an app up), for the
/// other servers to look at once rather than at their next tick. Only PostgreSQL has
/// them (LISTEN/NOTIFY); elsewhere [`next`](Self::next) never returns.
pub struct LeaseChanges {
    pub(crate) changes: tokio::sync::mpsc::UnboundedReceiver<String>,
    /// The listening connection's client: the connection ends when it is dropped.
    pub(crate) _client: Option<tokio_postgres::Client>,
}

impl LeaseChanges {
    /// The next announcement (what was released: a server's or an app's id). Pending
    /// for ever once the listening connection has ended: polling takes over then.
    pub async fn next(&mut self) -> String {
        match self.changes.recv().await {
            Some(change) => change,
            None => std::future::pending().await,
        }
    }
}

/// The files of a revision the store keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevisionFile {
    /// Its built files, packed (`supervisor::remote::pack_code`).
    Code,
    /// The archive it was deployed from.
    Upload,
}

impl RevisionFile {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RevisionFile::Code => "code",
            RevisionFile::Upload => "upload",
        }
    }
}

/// Parts a revision's files are stored in, at most this many bytes each.
pub(crate) const CODE_PART: usize = 1 << 20;

/// Milliseconds of a lease's time to live.
pub(crate) fn ttl_ms(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 2)
}

pub(crate) fn fenced(app_id: Uuid, fence: &Fence) -> StoreError {
    StoreError::Fenced(format!(
        "app {app_id}'s lease (epoch {}) is no longer held by server {}",
        fence.epoch, fence.owner
    ))
}

impl Store {
    /// Says this server is here (and where), now; returns every server seen within `ttl`,
    /// this one included, oldest first. Servers not seen for a long time are forgotten.
    pub async fn announce_server(
        &self,
        id: &str,
        api_url: &str,
        gateway_url: &str,
        ttl: Duration,
    ) -> Result<Vec<ServerRecord>> {
        on_backend!(self, [id, api_url, gateway_url], db => db.announce_server(id, api_url, gateway_url, ttl_ms(ttl)))
    }

    /// This server is leaving: its row goes, and its leases end now, so that the others
    /// can take its apps at once.
    pub async fn retire_server(&self, id: &str) -> Result<u64> {
        on_backend!(self, [id], db => db.retire_server(id))
    }

    /// Extends every lease `owner` still holds by `ttl`. Returns them with their epochs;
    /// a lease that expired meanwhile is not renewed (another server may have it now).
    pub async fn renew_leases(&self, owner: &str, ttl: Duration) -> Result<Vec<(Uuid, i64)>> {
        on_backend!(self, [owner], db => db.renew_leases(owner, ttl_ms(ttl)))
    }

    /// Takes the app's lease for `owner` for `ttl` if nobody holds it (never taken,
    /// expired, or released), with the next epoch. `None` if another server holds it or
    /// the app is gone.
    pub async fn take_lease(&self, app_id: Uuid, owner: &str, ttl: Duration) -> Result<Option<i64>> {
        on_backend!(self, [owner], db => db.take_lease(app_id, owner, ttl_ms(ttl)))
    }

    /// Ends the lease now, if `fence` still holds it; false otherwise.
    pub async fn release_lease(&self, app_id: Uuid, fence: Fence) -> Result<bool> {
        on_backend!(self, [], db => db.release_lease(app_id, &fence))
    }

    /// Records how many runners `owner` runs of each app it holds, for the other
    /// servers' listings.
    pub async fn publish_runners(&self, owner: &str, counts: Vec<(Uuid, u32)>) -> Result<()> {
        on_backend!(self, [owner], db => db.publish_runners(owner, &counts))
    }

    /// Listens for leases being released (PostgreSQL's LISTEN/NOTIFY, on a connection
    /// of its own).
    pub async fn listen_leases(&self) -> Result<LeaseChanges> {
        match &*self.backend {
            Backend::Sqlite(_) => {
                let (_tx, changes) = tokio::sync::mpsc::unbounded_channel();
                Ok(LeaseChanges { changes, _client: None })
            }
            Backend::Postgres(db) => db.listen_leases().await,
        }
    }

    /// Every app's lease.
    pub async fn leases(&self) -> Result<Vec<Lease>> {
        on_backend!(self, [], db => db.leases())
    }

    /// Stores the file at `path`, the revision's built code or its upload, with its
    /// digest (replacing what was stored for it before). It goes with the revision.
    pub async fn put_revision_file(
        &self,
        revision: RevisionId,
        kind: RevisionFile,
        digest: &str,
        path: &Path,
    ) -> Result<()> {
        on_backend!(self, [digest, path], db => db.put_revision_file(revision, kind, digest, path))
    }

    /// Writes the revision's stored file of `kind` to `path` and returns its digest as
    /// stored; `None` (and no file) if none is stored.
    pub async fn revision_file(&self, revision: RevisionId, kind: RevisionFile, path: &Path) -> Result<Option<String>> {
        on_backend!(self, [path], db => db.revision_file(revision, kind, path))
    }
}
