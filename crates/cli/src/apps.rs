//! `hangar apps …`: list apps, their revisions and history; delete revisions and apps.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;

use crate::context::Context;
use crate::output::{current_badge, short, status_badge, success, when};

#[derive(Debug, Subcommand)]
pub(crate) enum AppsCommand {
    /// List the team's apps
    List,
    /// List an app's revisions, newest first
    ListRev { app: String },
    /// Delete a revision that is not current (frees its files)
    DeleteRev {
        app: String,
        /// Revision id or any unique prefix of it
        #[arg(value_parser = clap::builder::NonEmptyStringValueParser::new())]
        revision: String,
    },
    /// Delete an app with all its revisions and history
    Delete { app: String },
    /// Show every change made to an app, newest first
    History { app: String },
}

pub(crate) async fn run(cx: &Context, command: AppsCommand) -> anyhow::Result<ExitCode> {
    let client = &cx.client;
    let out = &cx.out;
    match command {
        AppsCommand::List => {
            let apps = client.list_apps().await?;
            if out.is_json() {
                return json(cx, &apps);
            }
            if apps.is_empty() {
                println!("No apps yet. Deploy one with `hangar deploy PATH`.");
            }
            out.table(
                &["APP", "REVISION", "AUTH", "RUNNERS", "MIN", "MAX", "KEEP ALIVE", "MACHINE"],
                apps.iter()
                    .map(|a| {
                        vec![
                            a.name.clone(),
                            a.revision.as_deref().map_or_else(|| "-".to_owned(), short),
                            a.auth.clone(),
                            a.runners.to_string(),
                            a.min_concurrency.to_string(),
                            a.max_concurrency.to_string(),
                            format!("{}s", a.keep_alive),
                            a.machine_type.clone(),
                        ]
                    })
                    .collect(),
            );
        }
        AppsCommand::ListRev { app } => {
            let revisions = client.list_revisions(&app).await?;
            if out.is_json() {
                return json(cx, &revisions);
            }
            if revisions.is_empty() {
                println!("App {app} has no revisions.");
            }
            out.table(
                &["REVISION", "STATUS", "", "CREATED", "MESSAGE", "MACHINE", "MULTIPLEXING", "FAILURE"],
                revisions
                    .iter()
                    .map(|r| {
                        vec![
                            short(&r.id),
                            status_badge(&r.status),
                            current_badge(r.current),
                            when(&r.created_at),
                            r.message.clone().unwrap_or_default(),
                            r.machine_type.clone(),
                            r.max_multiplexing.to_string(),
                            r.failure.clone().unwrap_or_default(),
                        ]
                    })
                    .collect(),
            );
        }
        AppsCommand::DeleteRev { app, revision } => {
            let deleted = client.delete_revision(&app, &revision).await?;
            if out.is_json() {
                return json(cx, &deleted);
            }
            println!("{}", success(format!("Deleted revision {} of {app}", deleted.id)));
        }
        AppsCommand::Delete { app } => {
            client.delete_app(&app).await?;
            if out.is_json() {
                return json(cx, &serde_json::json!({ "app": app, "deleted": true }));
            }
            println!("{}", success(format!("Deleted app {app} and all its revisions")));
        }
        AppsCommand::History { app } => {
            let entries = client.history(&app).await?;
            if out.is_json() {
                return json(cx, &entries);
            }
            out.table(
                &["AT", "ACTION", "KEY", "DETAILS"],
                entries
                    .iter()
                    .map(|h| {
                        vec![when(&h.at), h.action.clone(), h.key_id.clone().unwrap_or_default(), h.details.clone()]
                    })
                    .collect(),
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn json<T: serde::Serialize>(cx: &Context, value: &T) -> anyhow::Result<ExitCode> {
    cx.out.json(value).context("cannot print JSON")?;
    Ok(ExitCode::SUCCESS)
}
