//! `hangar apps …`: list apps, their revisions and history; delete revisions and apps.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;

use crate::context::Context;
use crate::output::{current_badge, out, short, status_badge, success, when};

#[derive(Debug, Subcommand)]
pub(crate) enum AppsCommand {
    /// List the team's apps
    List,
    /// List an app's revisions, newest first
    ListRev {
        app: String,
        /// Show the newest N revisions [default: 100]; the current one is always shown
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..), conflicts_with = "all")]
        limit: Option<u32>,
        /// Show every revision
        #[arg(long)]
        all: bool,
    },
    /// Delete a revision that is not current (frees its files)
    DeleteRev {
        app: String,
        /// Revision id or any unique prefix of it
        #[arg(value_parser = clap::builder::NonEmptyStringValueParser::new())]
        revision: String,
    },
    /// Delete an app with all its revisions, history and cache
    Delete { app: String },
    /// Show the size of an app's cache (HANGAR_CACHE_DIR, kept across runners and revisions)
    Cache {
        app: String,
        /// Empty it (running runners keep running)
        #[arg(long)]
        clear: bool,
    },
    /// Show every change made to an app, newest first
    History { app: String },
    /// List an app's runners
    Runners {
        app: String,
        #[command(flatten)]
        filter: crate::runners::Filter,
    },
    /// Change an app's scaling values now, without restarting runners
    Scale(ScaleArgs),
    /// Switch the app to another Deployed revision (roll back or forward; no rebuild)
    SetRev {
        app: String,
        /// Revision id or any unique prefix of it
        #[arg(value_parser = clap::builder::NonEmptyStringValueParser::new())]
        revision: String,
        /// rolling: start a runner of REVISION and switch once it is set up;
        /// recreate: switch now, the next call starts a runner
        #[arg(long, value_parser = ["rolling", "recreate"])]
        strategy: Option<String>,
        /// Change who may call the app at the same time
        #[arg(long, value_parser = ["private", "public", "shared"])]
        auth: Option<String>,
        /// Watch REVISION after the switch and go back by itself if it answers clearly
        /// worse than the one before (see `apps guard`)
        #[arg(long)]
        guard: bool,
    },
    /// Send shares of the app's new calls to other Deployed revisions (canaries); the
    /// current revision takes the rest. A set-rev, or --clear, ends the split
    Traffic {
        app: String,
        /// REVISION=PERCENT, the revision by id or any unique prefix, e.g. 7f3a=10
        #[arg(value_name = "REVISION=PERCENT", required_unless_present = "clear", conflicts_with = "clear")]
        shares: Vec<String>,
        /// End the split: the current revision takes every call
        #[arg(long)]
        clear: bool,
        /// Watch the canary (one only) and end its share by itself if it answers clearly
        /// worse than the current revision meanwhile
        #[arg(long, conflicts_with = "clear")]
        guard: bool,
    },
    /// Show the output of the app's runners (ended ones too, for an hour), merged by time
    /// and each line marked with its runner
    Logs {
        app: String,
        /// Keep printing new lines as they come
        #[arg(short, long)]
        follow: bool,
        #[command(flatten)]
        filter: crate::logs::LogFilter,
    },
    /// Show the app's durable queue: requests by status and the oldest waiting one's age
    Queue {
        app: String,
        /// Cancel every waiting request (running ones go on)
        #[arg(long)]
        flush: bool,
        /// Flush without asking
        #[arg(long, requires = "flush")]
        yes: bool,
    },
    /// Show or change how the app's guard judges a revision after a guarded switch (or a
    /// guarded canary), and whether every deploy and set-rev is guarded
    Guard(GuardArgs),
    /// Restart every runner of the app (same revision, fresh secrets and settings)
    Rollout {
        app: String,
        /// Kill the runners at once instead of letting them finish their calls
        #[arg(long)]
        force: bool,
    },
    /// Stop every runner and refuse calls until resumed
    Suspend { app: String },
    /// Serve a suspended app again
    Resume { app: String },
}

#[derive(Debug, clap::Args)]
pub(crate) struct GuardArgs {
    app: String,
    /// Guard every deploy and set-rev, not only those given --guard
    #[arg(long, conflicts_with = "off")]
    on: bool,
    /// Guard only deploys and set-revs given --guard
    #[arg(long)]
    off: bool,
    /// Seconds after a switch during which the guard watches [default: 300]
    #[arg(long)]
    window: Option<u64>,
    /// Percentage points by which the new revision's share of 5xx may exceed the old
    /// one's [default: 5]
    #[arg(long)]
    max_error_increase: Option<u32>,
    /// Percent of the old revision's p95 the new one's may reach [default: 200, twice]
    #[arg(long)]
    max_p95_ratio: Option<u32>,
}

#[derive(Debug, clap::Args)]
pub(crate) struct ScaleArgs {
    app: String,
    /// Seconds an idle runner stays up
    #[arg(long)]
    keep_alive: Option<u64>,
    /// Runners kept up at all times
    #[arg(long)]
    min_concurrency: Option<u32>,
    /// Most runners at once
    #[arg(long)]
    max_concurrency: Option<u32>,
    /// Spare runners above demand
    #[arg(long)]
    concurrency_buffer: Option<u32>,
    /// Spare runners as a percentage of demand
    #[arg(long)]
    concurrency_buffer_perc: Option<u32>,
    /// Seconds a queued call waits before it asks for a new runner
    #[arg(long)]
    scaling_delay: Option<u64>,
    /// Seconds a call may run
    #[arg(long)]
    request_timeout: Option<u64>,
    /// Calls one runner takes at once (code-specific: reset by the next deploy or set-rev)
    #[arg(long)]
    max_multiplexing: Option<u32>,
    /// Seconds a runner may take to set up (code-specific)
    #[arg(long)]
    startup_timeout: Option<u64>,
    /// Machine type of new runners (code-specific)
    #[arg(long)]
    machine_type: Option<String>,
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
                out!("No apps yet. Deploy one with `hangar deploy PATH`.");
            }
            out.table(
                &["APP", "REVISION", "AUTH", "RUNNERS", "MIN", "MAX", "KEEP ALIVE", "MACHINE", "SPLIT", "GUARD"],
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
                            split_text(&a.traffic),
                            a.guard.watching.as_deref().map_or_else(
                                || if a.guard.enabled { "on".to_owned() } else { "-".to_owned() },
                                |w| format!("watching {}", short(w)),
                            ),
                        ]
                    })
                    .collect(),
            );
        }
        AppsCommand::ListRev { app, limit, all } => {
            let list = client.list_revisions_page(&app, &api::wire::RevisionsQuery { limit, all }).await?;
            let revisions = list.revisions;
            if out.is_json() {
                return json(cx, &revisions);
            }
            if revisions.is_empty() {
                out!("App {app} has no revisions.");
            }
            let shown = revisions.len() as u64;
            if shown < list.total {
                eprintln!("Showing {shown} of {} revisions, newest first; --all shows every one.", list.total);
            }
            out.table(
                &[
                    "REVISION",
                    "STATUS",
                    "",
                    "TRAFFIC",
                    "CREATED",
                    "MESSAGE",
                    "ANNOTATIONS",
                    "MACHINE",
                    "MULTIPLEXING",
                    "FAILURE",
                ],
                revisions
                    .iter()
                    .map(|r| {
                        vec![
                            short(&r.id),
                            status_badge(&r.status),
                            current_badge(r.current),
                            if r.traffic > 0 { format!("{}%", r.traffic) } else { String::new() },
                            when(&r.created_at),
                            r.message.clone().unwrap_or_default(),
                            r.annotations.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", "),
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
            out!("{}", success(format!("Deleted revision {} of {app}", deleted.id)));
        }
        AppsCommand::Cache { app, clear } => {
            let cache = client.app_cache(&app, clear).await?;
            if out.is_json() {
                return json(cx, &cache);
            }
            let size = format!("{} files, {} bytes", cache.files, cache.bytes);
            if clear {
                out!("{}", success(format!("Cleared the cache of {app} ({size} removed)")));
            } else {
                out!("Cache of {app}: {size}");
            }
        }
        AppsCommand::Delete { app } => {
            client.delete_app(&app).await?;
            if out.is_json() {
                return json(cx, &serde_json::json!({ "app": app, "deleted": true }));
            }
            out!("{}", success(format!("Deleted app {app} and all its revisions")));
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
        AppsCommand::Runners { app, filter } => return crate::runners::list(cx, Some(&app), &filter).await,
        AppsCommand::SetRev { app, revision, strategy, auth, guard } => {
            let request = api::wire::SetRevRequest { revision, strategy: strategy.clone(), auth, guard };
            let updated = client.set_rev(&app, &request).await?;
            if out.is_json() {
                return json(cx, &updated);
            }
            let revision = updated.revision.unwrap_or_default();
            out!(
                "{}",
                success(format!("{app} now serves revision {revision} ({})", strategy.as_deref().unwrap_or("rolling")))
            );
        }
        AppsCommand::Traffic { app, shares, clear, guard } => {
            let shares = if clear { Vec::new() } else { parse_shares(&shares)? };
            let updated = client.traffic(&app, &api::wire::TrafficRequest { shares, guard }).await?;
            if out.is_json() {
                return json(cx, &updated);
            }
            let current = updated.revision.as_deref().map_or_else(|| "-".to_owned(), short);
            if updated.traffic.is_empty() {
                out!("{}", success(format!("{app}: split ended; revision {current} takes every call")));
            } else {
                let rest = 100 - updated.traffic.iter().map(|s| u32::from(s.percent)).sum::<u32>();
                out!(
                    "{}",
                    success(format!("{app}: {}, revision {current} (current) {rest}%", split_text(&updated.traffic)))
                );
            }
        }
        AppsCommand::Rollout { app, force } => {
            let rollout = client.rollout(&app, force).await?;
            if out.is_json() {
                return json(cx, &rollout);
            }
            let n = rollout.runners.len();
            if force {
                out!("{}", success(format!("Killed {n} runners of {app}; new ones start as calls arrive")));
            } else {
                out!(
                    "{}",
                    success(format!(
                        "Replacing {n} runners of {app}; each keeps serving until its replacement is set up"
                    ))
                );
            }
        }
        AppsCommand::Suspend { app } => {
            let updated = client.suspend(&app, true).await?;
            if out.is_json() {
                return json(cx, &updated);
            }
            out!(
                "{}",
                success(format!(
                    "Suspended {app}: its runners stop and calls get 503 until `hangar apps resume {app}`"
                ))
            );
        }
        AppsCommand::Resume { app } => {
            let updated = client.suspend(&app, false).await?;
            if out.is_json() {
                return json(cx, &updated);
            }
            out!("{}", success(format!("Resumed {app}")));
        }
        AppsCommand::Scale(args) => return scale(cx, args).await,
        AppsCommand::Guard(args) => return guard(cx, args).await,
        AppsCommand::Logs { app, follow, filter } => return crate::logs::app_logs(cx, &app, &filter, follow).await,
        AppsCommand::Queue { app, flush, yes } => return queue(cx, &app, flush, yes).await,
    }
    Ok(ExitCode::SUCCESS)
}

async fn scale(cx: &Context, args: ScaleArgs) -> anyhow::Result<ExitCode> {
    let request = api::wire::ScaleRequest {
        keep_alive: args.keep_alive,
        min_concurrency: args.min_concurrency,
        max_concurrency: args.max_concurrency,
        concurrency_buffer: args.concurrency_buffer,
        concurrency_buffer_perc: args.concurrency_buffer_perc,
        scaling_delay: args.scaling_delay,
        request_timeout: args.request_timeout,
        max_multiplexing: args.max_multiplexing,
        startup_timeout: args.startup_timeout,
        machine_type: args.machine_type,
    };
    if request == api::wire::ScaleRequest::default() {
        anyhow::bail!(
            "no values given, nothing changed: pass at least one of --keep-alive, --min-concurrency, … (see --help)"
        );
    }
    let result = cx.client.scale(&args.app, &request).await?;
    for warning in &result.warnings {
        eprintln!("warning: {warning}");
    }
    if cx.out.is_json() {
        return json(cx, &result);
    }
    if result.changed.is_empty() {
        out!("Nothing changed: {} already has these values", args.app);
    } else {
        out!("{}", success(format!("{}: changed {}", args.app, result.changed.join(", "))));
    }
    Ok(ExitCode::SUCCESS)
}

/// `REVISION=PERCENT` arguments as shares, or what is wrong with the first bad one.
fn parse_shares(args: &[String]) -> anyhow::Result<Vec<api::wire::TrafficShareJson>> {
    args.iter()
        .map(|arg| {
            let (revision, percent) = arg
                .split_once('=')
                .filter(|(r, _)| !r.is_empty())
                .ok_or_else(|| anyhow::anyhow!("{arg:?} is not REVISION=PERCENT (say 7f3a=10)"))?;
            let percent = percent
                .trim_end_matches('%')
                .parse::<u8>()
                .ok()
                .filter(|p| (1..=99).contains(p))
                .ok_or_else(|| anyhow::anyhow!("{arg:?}: the percent must be a whole number from 1 to 99"))?;
            Ok(api::wire::TrafficShareJson { revision: revision.to_owned(), percent })
        })
        .collect()
}

/// A split as `7f3a1b2c=10%, 0c9d8e7f=5%`, or `-` for none.
fn split_text(shares: &[api::wire::TrafficShareJson]) -> String {
    if shares.is_empty() {
        return "-".to_owned();
    }
    shares.iter().map(|s| format!("{}={}%", short(&s.revision), s.percent)).collect::<Vec<_>>().join(", ")
}

async fn queue(cx: &Context, app: &str, flush: bool, yes: bool) -> anyhow::Result<ExitCode> {
    let mut queue = cx.client.queue(app).await?;
    if flush {
        if !yes && !confirm(&format!("Cancel the {} waiting requests of {app}?", queue.in_queue))? {
            anyhow::bail!("nothing cancelled");
        }
        queue = cx.client.flush_queue(app).await?;
    }
    if cx.out.is_json() {
        return json(cx, &queue);
    }
    if let Some(n) = queue.cancelled {
        out!("{}", success(format!("Cancelled {n} waiting requests of {app}")));
    }
    let oldest = queue.oldest_waiting_seconds.map_or_else(|| "-".to_owned(), |s| format!("{s:.1} s"));
    cx.out.table(
        &["IN QUEUE", "IN PROGRESS", "COMPLETED", "OLDEST WAITING"],
        vec![vec![queue.in_queue.to_string(), queue.in_progress.to_string(), queue.completed.to_string(), oldest]],
    );
    Ok(ExitCode::SUCCESS)
}

/// Asks `question` on the terminal; without one, refuses (pass --yes instead).
fn confirm(question: &str) -> anyhow::Result<bool> {
    use std::io::{BufRead, IsTerminal, Write};
    if !std::io::stdin().is_terminal() {
        anyhow::bail!("{question} Not asked, as there is no terminal: pass --yes to confirm");
    }
    eprint!("{question} [y/N] ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

async fn guard(cx: &Context, args: GuardArgs) -> anyhow::Result<ExitCode> {
    let enabled = match (args.on, args.off) {
        (true, _) => Some(true),
        (_, true) => Some(false),
        _ => None,
    };
    let request = api::wire::GuardRequest {
        enabled,
        window: args.window,
        max_error_increase: args.max_error_increase,
        max_p95_ratio: args.max_p95_ratio,
    };
    let app = if request == api::wire::GuardRequest::default() {
        cx.client.get_app(&args.app).await?
    } else {
        cx.client.guard(&args.app, &request).await?
    };
    if cx.out.is_json() {
        return json(cx, &app.guard);
    }
    let g = &app.guard;
    out!(
        "Guard of {}: {}, window {} s, at most {} points more 5xx, p95 at most {}% of before",
        args.app,
        if g.enabled { "every switch" } else { "switches given --guard" },
        g.window,
        g.max_error_increase,
        g.max_p95_ratio
    );
    if let Some(watching) = &g.watching {
        let back =
            g.previous.as_deref().map_or_else(|| "its share ends".to_owned(), |p| format!("back to {}", short(p)));
        out!(
            "Watching {} until {} (if it trips: {back})",
            short(watching),
            g.until.as_deref().map(when).unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn json<T: serde::Serialize>(cx: &Context, value: &T) -> anyhow::Result<ExitCode> {
    cx.out.json(value).context("cannot print JSON")?;
    Ok(ExitCode::SUCCESS)
}
