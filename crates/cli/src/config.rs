//! The CLI's own config file: the profiles `hangar login` saves (a server's URL and a key
//! for it) and which one is current.
//!
//! It lives at `$XDG_CONFIG_HOME/hangar/config.toml` (else `~/.config/hangar/config.toml`)
//! and holds secrets, so it is written with mode 0600 in a directory of mode 0700, and
//! always whole: a temporary file in the same directory, renamed over the old one, so a
//! crash or a full disk never leaves half a file behind.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// The profile `hangar login` saves to when no `--profile` is given.
pub(crate) const DEFAULT_PROFILE: &str = "default";

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    /// The profile commands use when no `--profile` (or `HANGAR_PROFILE`) names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) current: Option<String>,
    #[serde(default)]
    pub(crate) profiles: BTreeMap<String, Profile>,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Profile {
    pub(crate) url: String,
    /// `<id>:<secret>`.
    pub(crate) key: String,
}

impl std::fmt::Debug for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Profile").field("url", &self.url).field("key", &api::wire::REDACTED).finish()
    }
}

impl Profile {
    /// The key's id, the part that is safe to show.
    pub(crate) fn key_id(&self) -> &str {
        self.key.split_once(':').map_or("", |(id, _)| id)
    }
}

/// Where the config file is, or None when neither `XDG_CONFIG_HOME` nor `HOME` is set.
pub(crate) fn path() -> Option<PathBuf> {
    // The XDG spec says a relative XDG_CONFIG_HOME is to be ignored.
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").filter(|h| !h.is_empty()).map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("hangar").join("config.toml"))
}

impl Config {
    /// The config at `path`; an empty one when there is no file yet.
    pub(crate) fn load(path: &Path) -> anyhow::Result<Config> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Config::default()),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        toml::from_str(&text).with_context(|| format!("{} is not a valid hangar config", path.display()))
    }

    /// Writes the config to `path` atomically, readable by its owner only.
    pub(crate) fn save(&self, path: &Path) -> anyhow::Result<()> {
        let dir = path.parent().context("the config path has no directory")?;
        create_private_dir(dir)?;
        let text = toml::to_string(self).context("cannot write the config as TOML")?;
        // tempfile creates the file with mode 0600, so the key is never readable by others,
        // not even for a moment.
        let mut file = tempfile::NamedTempFile::new_in(dir)
            .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
        file.write_all(text.as_bytes())
            .and_then(|()| file.as_file().sync_all())
            .with_context(|| format!("cannot write {}", file.path().display()))?;
        file.persist(path).with_context(|| format!("cannot replace {}", path.display()))?;
        Ok(())
    }

    /// The profile named `name`, or an error that lists the ones there are.
    pub(crate) fn profile(&self, name: &str) -> anyhow::Result<&Profile> {
        self.profiles.get(name).ok_or_else(|| self.unknown(name))
    }

    pub(crate) fn unknown(&self, name: &str) -> anyhow::Error {
        if self.profiles.is_empty() {
            anyhow::anyhow!("no profile named {name:?}: there are no profiles yet (make one with `hangar login`)")
        } else {
            let names: Vec<&str> = self.profiles.keys().map(String::as_str).collect();
            anyhow::anyhow!("no profile named {name:?} (there are: {})", names.join(", "))
        }
    }
}

/// Creates `dir` (and its parents) if missing, and makes it private to its owner. Only
/// hangar's own directory is made private: its parents (`~/.config`) belong to everyone's
/// tools.
fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("cannot make {} private", dir.display()))
        }
        Err(e) => Err(e).with_context(|| format!("cannot create {}", dir.display())),
    }
}

/// Profile names: letters, digits, `-`, `_` and `.`, so that they read well in a table
/// and need no quoting in a shell or in TOML.
pub(crate) fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    anyhow::ensure!(ok, "profile name {name:?} is not valid: use up to 64 letters, digits, '-', '_' or '.'");
    Ok(())
}
