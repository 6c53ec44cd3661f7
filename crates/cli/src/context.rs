//! What every client command needs: the API client (URL, key, team) and how to print.

use std::path::PathBuf;

use api::client::Client;

use crate::GlobalArgs;
use crate::output::{Format, Printer};

pub(crate) struct Context {
    pub(crate) client: Client,
    pub(crate) out: Printer,
}

impl Context {
    pub(crate) fn new(global: &GlobalArgs) -> anyhow::Result<Context> {
        let format = if global.json { Format::Json } else { global.output };
        let local = local_data_dir();
        let local_url = local_endpoint(&local).unwrap_or_else(|| "http://127.0.0.1:8700".to_owned());
        let url = global.url.clone().unwrap_or_else(|| local_url.clone());
        // The local root key is only ever sent to the local server, never to a URL
        // someone else runs.
        let key = match &global.key {
            Some(key) => Some(key.clone()),
            None if url.trim_end_matches('/') == local_url.trim_end_matches('/') => local_key(&local),
            None => None,
        };
        Ok(Context { client: Client::new(&url, key, global.team.clone()), out: Printer::new(format) })
    }
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
