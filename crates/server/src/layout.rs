//! Where things live in the data dir. Everything the server writes is under it:
//!
//! ```text
//! hangar.db                      the embedded store (SQLite, WAL)
//! admin.key                      the root key, mode 0600, written on first start
//! server.json                    the addresses this run listens on
//! tmp/                           uploads in progress; emptied at start
//! artifacts/sha256/<hex>.tar.gz  uploaded code, by content digest, stored once
//! revisions/<id>/app/            a revision's unpacked and built code
//! revisions/<id>/build.log       its build output
//! revisions/<id>/build.pid       the build's process group while it runs
//! runners/<id>/runner.log        a runner's output (rotated), kept while it is listed
//! runners/<id>/pid               its process group while it runs
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
