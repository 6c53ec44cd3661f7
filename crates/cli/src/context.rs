//! What every client command needs: the API client (URL, key, team) and how to print.
//!
//! The URL and the key come from, in this order: the flags, the environment
//! (`HANGAR_URL`, `HANGAR_KEY`), the chosen profile of the config file (`--profile`,
//! `HANGAR_PROFILE`, else the current one), and the files of a server on this machine.
//! A key found in a profile or in the local server's files is only ever sent to the URL
//! it was saved with, never to a URL someone else runs.

use std::path::PathBuf;

use api::client::Client;

use crate::GlobalArgs;
use crate::config::{self, Config, Profile};
use crate::output::{Format, Printer};

/// Where the API is when nothing says otherwise.
const DEFAULT_URL: &str = "http://127.0.0.1:8700";

pub(crate) struct Context {
    pub(crate) client: Client,
    pub(crate) out: Printer,
}

impl Context {
    pub(crate) fn new(global: &GlobalArgs) -> anyhow::Result<Context> {
        let (url, key) = resolve(global)?;
        Ok(Context { client: Client::new(&url, key, global.team.clone()), out: printer(global) })
    }
}

pub(crate) fn printer(global: &GlobalArgs) -> Printer {
    Printer::new(if global.json { Format::Json } else { global.output })
}

/// The URL and key a command uses, by the order of precedence above.
pub(crate) fn resolve(global: &GlobalArgs) -> anyhow::Result<(String, Option<String>)> {
    // A URL and a key from flags or the environment need no profile, so that a script
    // that sets both is not stopped by a config file it does not use.
    let profile = match (&global.profile, &global.url, &global.key) {
        (None, Some(_), Some(_)) => None,
        _ => chosen_profile(global)?,
    };
    let local = local_data_dir();
    let local_url = local_endpoint(&local);
    let url = global
        .url
        .clone()
        .or_else(|| profile.as_ref().map(|p| p.url.clone()))
        .or_else(|| local_url.clone())
        .unwrap_or_else(|| DEFAULT_URL.to_owned());
    let key = match &global.key {
        Some(key) => Some(key.clone()),
        None => match &profile {
            Some(p) if same_url(&p.url, &url) => Some(p.key.clone()),
            _ if same_url(local_url.as_deref().unwrap_or(DEFAULT_URL), &url) => local_key(&local),
            _ => None,
        },
    };
    Ok((url, key))
}

/// The profile `--profile` (or `HANGAR_PROFILE`) names, which must exist, else the
/// current one, if any.
fn chosen_profile(global: &GlobalArgs) -> anyhow::Result<Option<Profile>> {
    let Some(path) = config::path() else {
        anyhow::ensure!(
            global.profile.is_none(),
            "cannot find the config file: neither XDG_CONFIG_HOME nor HOME is set"
        );
        return Ok(None);
    };
    let config = Config::load(&path)?;
    match &global.profile {
        Some(name) => Ok(Some(config.profile(name)?.clone())),
        None => Ok(config.current.as_ref().and_then(|name| config.profiles.get(name)).cloned()),
    }
}

/// Where `hangar login` goes when no URL is given: the local server, else the default.
pub(crate) fn local_or_default_url() -> String {
    local_endpoint(&local_data_dir()).unwrap_or_else(|| DEFAULT_URL.to_owned())
}

fn same_url(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

/// The data dir of a server on this machine, for picking up its address and root key
/// when none is given: a single-user install then needs no set-up at all.
fn local_data_dir() -> PathBuf {
    std::env::var_os("HANGAR_DATA_DIR").map(PathBuf::from).unwrap_or_else(server::default_data_dir)
}

fn local_endpoint(data_dir: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(data_dir.join("server.json")).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json.get("api")?.as_str().map(str::to_owned)
}

fn local_key(data_dir: &std::path::Path) -> Option<String> {
    let key = std::fs::read_to_string(data_dir.join("admin.key")).ok()?;
    Some(key.trim().to_owned()).filter(|k| !k.is_empty())
}
