//! `hangar login` and `hangar profile`: keeping a server's URL and a key for it in the
//! config file (see `config.rs`), so that a remote server needs no environment.

use std::io::{IsTerminal, Read};
use std::process::ExitCode;

use api::client::{Client, ClientError};
use clap::Subcommand;
use serde::Serialize;

use crate::GlobalArgs;
use crate::config::{self, Config, DEFAULT_PROFILE, Profile};
use crate::context::{self, printer};
use crate::output::{current_badge, out, success};

#[derive(Debug, clap::Args)]
pub(crate) struct LoginArgs {
    /// Read the key from stdin (one line) instead of asking for it
    #[arg(long)]
    key_stdin: bool,
}

#[derive(Debug, Subcommand)]
pub(crate) enum ProfileCommand {
    /// The saved profiles: name, URL, key id, and which one is current
    List,
    /// Make NAME the profile that commands use when no --profile names one
    Use { name: String },
    /// Forget the profile NAME and its key
    Delete { name: String },
}

/// What `profile list --json` prints for each profile: never the key's secret.
#[derive(Serialize)]
struct ProfileJson<'a> {
    name: &'a str,
    url: &'a str,
    key_id: &'a str,
    current: bool,
}

/// Checks the key against the server and, only if the server accepts it, saves the URL
/// and the key as a profile. The profile becomes the current one when there is none yet;
/// otherwise `hangar profile use` switches, so that logging in to a second server does
/// not quietly send the next command meant for the first one there.
pub(crate) async fn login(global: &GlobalArgs, args: LoginArgs) -> anyhow::Result<ExitCode> {
    let out = printer(global);
    let path = config_path()?;
    let mut config = Config::load(&path)?;
    let name = global.profile.clone().unwrap_or_else(|| DEFAULT_PROFILE.to_owned());
    config::check_name(&name)?;
    // Logging in again to a profile keeps its URL unless another is given.
    let url = match (&global.url, config.profiles.get(&name)) {
        (Some(url), _) => url.clone(),
        (None, Some(profile)) => profile.url.clone(),
        (None, None) => context::local_or_default_url(),
    };
    let url = url.trim_end_matches('/').to_owned();
    check_server(&url).await?;
    let key = read_key(global, &args, &url)?;
    let scope = check_key(&url, &key).await?;

    let make_current = config.current.as_ref().is_none_or(|c| !config.profiles.contains_key(c));
    let profile = Profile { url: url.clone(), key };
    let key_id = profile.key_id().to_owned();
    config.profiles.insert(name.clone(), profile);
    if make_current {
        config.current = Some(name.clone());
    }
    config.save(&path)?;

    if out.is_json() {
        let current = config.current.as_deref() == Some(name.as_str());
        out.json(&ProfileJson { name: &name, url: &url, key_id: &key_id, current })?;
    } else {
        let scope = scope.map(|s| format!(", scope {s}")).unwrap_or_default();
        out!("{}", success(format!("Logged in to {url} with key {key_id}{scope}")));
        out!("Saved as profile {name} in {}", path.display());
        match config.current.as_deref() {
            Some(current) if current != name => {
                out!("The current profile is still {current}; `hangar profile use {name}` switches to this one");
            }
            _ => {}
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The key, from stdin with `--key-stdin`, else `--key` (or `HANGAR_KEY`), else asked for
/// on the terminal without echo.
fn read_key(global: &GlobalArgs, args: &LoginArgs, url: &str) -> anyhow::Result<String> {
    let key = if args.key_stdin {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| anyhow::anyhow!("cannot read the key from stdin: {e}"))?;
        text.lines().next().unwrap_or_default().trim().to_owned()
    } else if let Some(key) = &global.key {
        key.trim().to_owned()
    } else if std::io::stdin().is_terminal() && std::io::stderr().is_terminal() {
        let term = console::Term::stderr();
        term.write_str(&format!("API key for {url} (<id>:<secret>): "))?;
        term.read_secure_line()?.trim().to_owned()
    } else {
        anyhow::bail!("no key given: pass --key, pipe it in with --key-stdin, or run `hangar login` in a terminal");
    };
    anyhow::ensure!(!key.is_empty(), "the key is empty");
    Ok(key)
}

/// That `url` is a hangar server: its `/healthz` answers as hangar's does.
async fn check_server(url: &str) -> anyhow::Result<()> {
    match Client::new(url, None, None).health().await {
        Ok(_) => Ok(()),
        Err(e @ (ClientError::Connect { .. } | ClientError::Transport { .. })) => {
            anyhow::bail!("could not reach a server at {url} (nothing was saved): {}", root_cause(&e))
        }
        Err(e) => anyhow::bail!("{url} does not answer like a hangar server (nothing was saved): {e}"),
    }
}

/// The innermost cause of a transport error ("Connection refused"), which says more than
/// the layers of "error sending request" around it.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

/// That the server accepts the key; its scope, when the key may list the team's keys.
async fn check_key(url: &str, key: &str) -> anyhow::Result<Option<String>> {
    let client = Client::new(url, Some(key.to_owned()), None);
    match client.list_apps().await {
        Ok(_) => {}
        // The server knows the key but does not let it list apps: an `api` key, which may
        // only call apps. It is the key of a team all the same.
        Err(ClientError::Api { status: 403, .. }) => return Ok(Some("api".to_owned())),
        Err(ClientError::Api { status: 401, message, .. }) => {
            anyhow::bail!("the server at {url} refused the key (nothing was saved): {message}")
        }
        Err(e) => anyhow::bail!("cannot check the key at {url} (nothing was saved): {e}"),
    }
    // There is no "who am I" call; an admin key sees itself among the team's keys.
    let id = key.split_once(':').map_or("", |(id, _)| id);
    let keys = client.list_keys().await.unwrap_or_default();
    Ok(keys.into_iter().find(|k| k.id == id).map(|k| k.scope))
}

pub(crate) fn profile(global: &GlobalArgs, command: ProfileCommand) -> anyhow::Result<ExitCode> {
    let out = printer(global);
    let path = config_path()?;
    let mut config = Config::load(&path)?;
    match command {
        ProfileCommand::List => {
            let current = config.current.as_deref();
            let profiles: Vec<ProfileJson> = config
                .profiles
                .iter()
                .map(|(name, p)| ProfileJson { name, url: &p.url, key_id: p.key_id(), current: current == Some(name) })
                .collect();
            if out.is_json() {
                out.json(&profiles)?;
            } else if profiles.is_empty() {
                out!("No profiles yet: `hangar login` makes one");
            } else {
                let rows = profiles
                    .iter()
                    .map(|p| vec![p.name.to_owned(), p.url.to_owned(), p.key_id.to_owned(), current_badge(p.current)])
                    .collect();
                out.table(&["NAME", "URL", "KEY", ""], rows);
            }
        }
        ProfileCommand::Use { name } => {
            config.profile(&name)?;
            config.current = Some(name.clone());
            config.save(&path)?;
            out.say(success(format!("Commands now use profile {name}")));
        }
        ProfileCommand::Delete { name } => {
            if config.profiles.remove(&name).is_none() {
                return Err(config.unknown(&name));
            }
            // With the current profile gone, none is current until `profile use` or the
            // next login picks one: guessing another could send commands to the wrong server.
            let was_current = config.current.as_deref() == Some(name.as_str());
            if was_current {
                config.current = None;
            }
            config.save(&path)?;
            out.say(success(format!("Deleted profile {name}")));
            if was_current && !config.profiles.is_empty() {
                out.say("No profile is current now: `hangar profile use NAME` picks one");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn config_path() -> anyhow::Result<std::path::PathBuf> {
    config::path()
        .ok_or_else(|| anyhow::anyhow!("cannot find the config file: neither XDG_CONFIG_HOME nor HOME is set"))
}
