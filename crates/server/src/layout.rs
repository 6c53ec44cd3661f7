//! Where things live in the data dir. Everything the server writes is under it:
//!
//! ```text
//! hangar.db                      the embedded store (SQLite, WAL)
//! admin.key                      the root key, mode 0600, written on first start
//! server.json                    the addresses this run listens on
//! server.id                      this server's id, on the Slurm jobs it submits
//! tmp/                           uploads in progress; emptied at start
//! artifacts/sha256/<hex>.tar.gz  uploaded code, by content digest, stored once
//! revisions/<id>/app/            a revision's unpacked and built code
//! revisions/<id>/build.log       its build output
//! revisions/<id>/build.pid       the build's process group while it runs
//! revisions/<id>/code.tar.gz     its built code, packed for a cluster's nodes (+ .sha256)
//! runners/<id>/runner.log        a runner's output (rotated), kept while it is listed
//! runners/<id>/pid               its process group while it runs
//! caches/<app id>/               an app's cache (HANGAR_CACHE_DIR), kept across runners
//! build-caches/<team id>/        a team's build cache (HOME/.cache of its builds)
//! ```

use std::path::{Path, PathBuf};

use model::ids::RevisionId;

#[derive(Debug, Clone)]
pub(crate) struct Layout {
    root: PathBuf,
}

impl Layout {
    pub(crate) fn new(root: PathBuf) -> Layout {
        Layout { root }
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn database(&self) -> PathBuf {
        self.root.join("hangar.db")
    }

    pub(crate) fn admin_key(&self) -> PathBuf {
        self.root.join("admin.key")
    }

    /// This server's id, which marks the jobs it submits to a cluster.
    pub(crate) fn server_id(&self) -> PathBuf {
        self.root.join("server.id")
    }

    pub(crate) fn endpoints(&self) -> PathBuf {
        self.root.join("server.json")
    }

    pub(crate) fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }

    pub(crate) fn artifacts(&self) -> PathBuf {
        self.root.join("artifacts").join("sha256")
    }

    /// The file of an artifact named `sha256:<hex>`, or `None` for a name that is not
    /// one (so a stored name can never point outside the artifacts directory).
    pub(crate) fn artifact(&self, digest: &str) -> Option<PathBuf> {
        let hex = digest.strip_prefix("sha256:")?;
        (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| self.artifacts().join(format!("{hex}.tar.gz")))
    }

    pub(crate) fn revisions(&self) -> PathBuf {
        self.root.join("revisions")
    }

    pub(crate) fn runners(&self) -> PathBuf {
        self.root.join("runners")
    }

    /// An app's cache: writable by its runners, kept across runners, rollouts and
    /// revisions, removed with the app.
    pub(crate) fn app_cache(&self, app: uuid::Uuid) -> PathBuf {
        self.root.join("caches").join(app.to_string())
    }

    /// A team's build cache, the `HOME/.cache` of its builds: downloads are reused
    /// across deploys, and never shared with another team.
    pub(crate) fn build_cache(&self, team: uuid::Uuid) -> PathBuf {
        self.root.join("build-caches").join(team.to_string())
    }

    pub(crate) fn revision(&self, id: RevisionId) -> PathBuf {
        self.revisions().join(id.to_string())
    }

    pub(crate) fn revision_code(&self, id: RevisionId) -> PathBuf {
        self.revision(id).join("app")
    }

    pub(crate) fn build_log(&self, id: RevisionId) -> PathBuf {
        self.revision(id).join("build.log")
    }

    pub(crate) fn build_pid(&self, id: RevisionId) -> PathBuf {
        self.revision(id).join("build.pid")
    }
}

/// The files under `dir` and their size in bytes, symlinks counted as files and not
/// followed; with `clear`, each is removed as it is counted (`dir` itself stays). A
/// missing `dir` holds nothing.
pub(crate) fn measure_dir(dir: &Path, clear: bool) -> std::io::Result<(u64, u64)> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, 0)),
        Err(e) => return Err(e),
    };
    let (mut files, mut bytes) = (0, 0);
    for entry in entries {
        let entry = entry?;
        let meta = entry.path().symlink_metadata()?;
        if meta.is_dir() {
            let (f, b) = measure_dir(&entry.path(), clear)?;
            files += f;
            bytes += b;
            if clear {
                std::fs::remove_dir(entry.path())?;
            }
        } else {
            files += 1;
            bytes += meta.len();
            if clear {
                std::fs::remove_file(entry.path())?;
            }
        }
    }
    Ok((files, bytes))
}
