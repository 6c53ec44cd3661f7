//! `hangar teams …`, `hangar keys …`, `hangar secrets …`.

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::bail;
use clap::Subcommand;

use crate::context::Context;
use crate::output::{out, success, when};

#[derive(Debug, Subcommand)]
pub(crate) enum TeamsCommand {
    /// Create a team and print its first admin key (root key only)
    Create { name: String },
    /// List the teams (root key only)
    List,
}

#[derive(Debug, Subcommand)]
pub(crate) enum KeysCommand {
    /// Create a key and print it (it is shown this once)
    Create {
        /// admin: manage the team's apps, secrets and keys; api: only call apps
        #[arg(long, value_parser = ["admin", "api"])]
        scope: String,
        /// What the key is for
        #[arg(long)]
        desc: Option<String>,
    },
    /// List the team's keys (never their secrets)
    List,
    /// Revoke a key; it is refused from its next call on
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
pub(crate) enum SecretsCommand {
    /// Set secrets: NAME=VALUE… (or NAME VALUE); runners started from now on get them
    Set {
        #[arg(required = true, num_args = 1..)]
        values: Vec<String>,
    },
    /// List the team's secrets: names and times, never values
    List,
    /// Remove a secret
    Unset { name: String },
}

pub(crate) async fn teams(cx: &Context, command: TeamsCommand) -> anyhow::Result<ExitCode> {
    match command {
        TeamsCommand::Create { name } => {
            let created = cx.client.create_team(&name).await?;
            if cx.out.is_json() {
                cx.out.json(&created)?;
            } else {
                out!("{}", success(format!("Created team {name}")));
                out!("Its admin key (shown only now): {}", created.key.key);
            }
        }
        TeamsCommand::List => {
            let teams = cx.client.list_teams().await?;
            if cx.out.is_json() {
                cx.out.json(&teams)?;
            } else {
                cx.out.table(
                    &["TEAM", "CREATED"],
                    teams.iter().map(|t| vec![t.name.clone(), when(&t.created_at)]).collect(),
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn keys(cx: &Context, command: KeysCommand) -> anyhow::Result<ExitCode> {
    match command {
        KeysCommand::Create { scope, desc } => {
            let created = cx.client.create_key(&scope, desc).await?;
            if cx.out.is_json() {
                cx.out.json(&created)?;
            } else {
                out!("{}", success(format!("Created {scope} key {}", created.id)));
                out!("Key (shown only now): {}", created.key);
            }
        }
        KeysCommand::List => {
            let keys = cx.client.list_keys().await?;
            if cx.out.is_json() {
                cx.out.json(&keys)?;
            } else {
                cx.out.table(
                    &["KEY", "SCOPE", "CREATED", "REVOKED", "DESCRIPTION"],
                    keys.iter()
                        .map(|k| {
                            vec![
                                k.id.clone(),
                                k.scope.clone(),
                                when(&k.created_at),
                                k.revoked_at.as_deref().map(when).unwrap_or_default(),
                                k.description.clone().unwrap_or_default(),
                            ]
                        })
                        .collect(),
                );
            }
        }
        KeysCommand::Revoke { id } => {
            let key = cx.client.revoke_key(&id).await?;
            if cx.out.is_json() {
                cx.out.json(&key)?;
            } else {
                out!("{}", success(format!("Revoked key {}", key.id)));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn secrets(cx: &Context, command: SecretsCommand) -> anyhow::Result<ExitCode> {
    match command {
        SecretsCommand::Set { values } => {
            let values = parse_assignments(&values)?;
            let names: Vec<String> = values.keys().cloned().collect();
            let set = cx.client.set_secrets(values).await?;
            if cx.out.is_json() {
                cx.out.json(&set)?;
            } else {
                out!("{}", success(format!("Set {}", names.join(", "))));
                out!("Running runners keep the old values; `hangar apps rollout APP` gives them the new ones.");
            }
        }
        SecretsCommand::List => {
            let secrets = cx.client.list_secrets().await?;
            if cx.out.is_json() {
                cx.out.json(&secrets)?;
            } else {
                cx.out.table(
                    &["NAME", "CREATED", "UPDATED"],
                    secrets.iter().map(|s| vec![s.name.clone(), when(&s.created_at), when(&s.updated_at)]).collect(),
                );
            }
        }
        SecretsCommand::Unset { name } => {
            cx.client.unset_secret(&name).await?;
            if cx.out.is_json() {
                cx.out.json(&serde_json::json!({ "name": name, "unset": true }))?;
            } else {
                out!("{}", success(format!("Unset {name}")));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `NAME=VALUE…`, or exactly `NAME VALUE`.
fn parse_assignments(args: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    if let [name, value] = args
        && !name.contains('=')
    {
        return Ok(BTreeMap::from([(name.clone(), value.clone())]));
    }
    let mut values = BTreeMap::new();
    for arg in args {
        let Some((name, value)) = arg.split_once('=') else {
            bail!("{arg:?} is not NAME=VALUE (or give exactly NAME VALUE)");
        };
        values.insert(name.to_owned(), value.to_owned());
    }
    Ok(values)
}
