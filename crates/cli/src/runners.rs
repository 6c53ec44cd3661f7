//! `hangar runners …` and `hangar apps runners`: see, stop, kill runners and read their
//! logs.

use std::process::ExitCode;
use std::time::Duration;

use api::wire::{RunnerJson, RunnersQuery};
use clap::Subcommand;
use console::Style;

use crate::context::Context;
use crate::output::{out, short, success, write_stdout};

#[derive(Debug, Subcommand)]
pub(crate) enum RunnersCommand {
    /// List the team's runners
    List(Filter),
    /// Drain a runner (it finishes its calls) and stop it
    Stop {
        /// Runner id or any unique prefix of it
        id: String,
        /// Start and set up a replacement before this one stops taking calls
        #[arg(long)]
        replace: bool,
    },
    /// Kill a runner at once (its calls in flight fail)
    Kill {
        /// Runner id or any unique prefix of it
        id: String,
    },
    /// Show a runner's output
    Logs {
        /// Runner id or any unique prefix of it
        id: String,
        /// Keep printing new output until the runner ends
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines
        #[arg(short = 'n', long)]
        lines: Option<usize>,
        #[command(flatten)]
        filter: crate::logs::LogFilter,
    },
    /// Run a command inside a runner: its sandbox, files, environment and GPUs. Exits
    /// with the command's status. Admin keys only; recorded in the app's history
    #[command(
        after_help = "Examples:\n  hangar runners exec 3f2a -- python -c 'import torch; print(torch.cuda.is_available())'\n  \
                            hangar runners exec -t 3f2a -- top"
    )]
    Exec {
        /// Runner id or any unique prefix of it
        id: String,
        /// Give the command a terminal (for interactive programs); this one is then
        /// passed through as it is (raw mode)
        #[arg(short, long)]
        tty: bool,
        /// The program and its arguments, after `--`
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// Open a shell inside a runner (bash where it has it, else sh), with a terminal
    /// when this is one
    Shell {
        /// Runner id or any unique prefix of it
        id: String,
    },
}

/// Which runners to show.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Filter {
    /// Only runners in these states (pending, setup, idle, running, draining,
    /// terminating, terminated, crash_backoff)
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    state: Vec<String>,
    /// Also show runners that ended within this long (e.g. 10m, 1h)
    #[arg(long, value_parser = humantime::parse_duration)]
    since: Option<Duration>,
}

impl Filter {
    fn query(&self) -> RunnersQuery {
        RunnersQuery {
            state: (!self.state.is_empty()).then(|| self.state.join(",")),
            since: self.since.map(|d| d.as_secs().max(1)),
        }
    }
}

pub(crate) async fn list(cx: &Context, app: Option<&str>, filter: &Filter) -> anyhow::Result<ExitCode> {
    let runners = cx.client.runners(app, &filter.query()).await?;
    if cx.out.is_json() {
        cx.out.json(&runners)?;
        return Ok(ExitCode::SUCCESS);
    }
    if runners.is_empty() {
        out!("No runners.");
    }
    // Runners a cluster placed show their node with their machine type.
    let machine = |r: &RunnerJson| match &r.node {
        Some(node) => format!("{}@{node}", r.machine_type),
        None => r.machine_type.clone(),
    };
    cx.out.table(
        &["RUNNER", "APP", "REVISION", "MACHINE", "GPUS", "STATE", "IN FLIGHT", "EXPIRES IN", "UPTIME", ""],
        runners
            .iter()
            .map(|r| {
                vec![
                    short(&r.id),
                    r.app.clone(),
                    short(&r.revision),
                    machine(r),
                    r.gpus.join(","),
                    state_badge(&r.state),
                    r.in_flight.to_string(),
                    r.expires_in.map(|s| format!("{s}s")).unwrap_or_default(),
                    humantime::format_duration(Duration::from_secs(r.uptime)).to_string(),
                    if r.replacing { "replacing".to_owned() } else { String::new() },
                ]
            })
            .collect(),
    );
    Ok(ExitCode::SUCCESS)
}

/// `hangar gpus`: each GPU, who holds it, and what it is doing where NVML can say.
pub(crate) async fn gpus(cx: &Context) -> anyhow::Result<ExitCode> {
    let gpus = cx.client.gpus().await?;
    if cx.out.is_json() {
        cx.out.json(&gpus)?;
        return Ok(ExitCode::SUCCESS);
    }
    if gpus.is_empty() {
        out!(
            "No GPUs: the server found none (see its log) and none were given with --gpus; on a cluster, no runner \
             holds one."
        );
    }
    let mib = |bytes: Option<u64>| bytes.map(|b| format!("{} MiB", b >> 20)).unwrap_or_default();
    cx.out.table(
        &["GPU", "INDEX", "NAME", "MEMORY", "APP", "RUNNER", "UTILIZATION", "MEMORY USED"],
        gpus.iter()
            .map(|g| {
                let app = match (&g.app, g.held) {
                    (Some(app), _) => app.clone(),
                    (None, true) => "(another team's)".to_owned(),
                    (None, false) => "free".to_owned(),
                };
                let id = match &g.node {
                    Some(node) => format!("{node}:{}", g.id),
                    None => g.id.clone(),
                };
                vec![
                    id,
                    g.index.to_string(),
                    g.name.clone().unwrap_or_default(),
                    mib(g.memory),
                    app,
                    g.runner.as_deref().map(short).unwrap_or_default(),
                    g.utilization.map(|u| format!("{u}%")).unwrap_or_default(),
                    mib(g.memory_used),
                ]
            })
            .collect(),
    );
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn run(cx: &Context, command: RunnersCommand) -> anyhow::Result<ExitCode> {
    match command {
        RunnersCommand::List(filter) => list(cx, None, &filter).await,
        RunnersCommand::Stop { id, replace } => {
            let runner = cx.client.stop_runner(&id, replace).await?;
            done(cx, &runner, if replace { "is being replaced" } else { "is draining and will stop" })
        }
        RunnersCommand::Kill { id } => {
            let runner = cx.client.kill_runner(&id).await?;
            done(cx, &runner, "was killed")
        }
        RunnersCommand::Logs { id, follow, lines, filter } => logs(cx, &id, follow, lines, &filter).await,
        RunnersCommand::Exec { id, tty, command } => crate::exec::exec(cx, &id, command, tty).await,
        RunnersCommand::Shell { id } => {
            use std::io::IsTerminal;
            let shell = crate::exec::SHELL.map(str::to_owned).to_vec();
            crate::exec::exec(cx, &id, shell, std::io::stdin().is_terminal()).await
        }
    }
}

fn done(cx: &Context, runner: &RunnerJson, what: &str) -> anyhow::Result<ExitCode> {
    if cx.out.is_json() {
        cx.out.json(runner)?;
    } else {
        out!("{}", success(format!("Runner {} of {} {what}", runner.id, runner.app)));
    }
    Ok(ExitCode::SUCCESS)
}

async fn logs(
    cx: &Context,
    id: &str,
    follow: bool,
    lines: Option<usize>,
    filter: &crate::logs::LogFilter,
) -> anyhow::Result<ExitCode> {
    let mut offset = 0;
    let mut text = String::new();
    loop {
        let chunk = cx.client.runner_log(id, offset).await?;
        if chunk.data.is_empty() {
            break;
        }
        text.push_str(&chunk.data);
        offset = chunk.next_offset;
    }
    let all: Vec<&str> = text.lines().filter(|l| filter.keeps(l)).collect();
    let from = lines.map_or(0, |n| all.len().saturating_sub(n));
    for line in &all[from..] {
        out!("{line}");
    }
    if !follow {
        return Ok(ExitCode::SUCCESS);
    }
    loop {
        let chunk = cx.client.runner_log(id, offset).await?;
        if chunk.data.is_empty() {
            let query = RunnersQuery { state: Some("terminated".to_owned()), since: Some(24 * 3600) };
            let ended = cx.client.runners(None, &query).await?.iter().any(|r| r.id.starts_with(id));
            if ended {
                return Ok(ExitCode::SUCCESS);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        // Whole lines only, so that each is filtered whole; the rest is read again.
        let whole = chunk.data.rfind('\n').map_or(0, |i| i + 1);
        let kept: String = chunk.data[..whole].lines().filter(|l| filter.keeps(l)).map(|l| format!("{l}\n")).collect();
        write_stdout(kept.as_bytes());
        offset = chunk.next_offset - (chunk.data.len() - whole) as u64;
    }
}

fn state_badge(state: &str) -> String {
    let style = match state {
        "idle" | "running" => Style::new().green(),
        "setup" | "pending" => Style::new().yellow(),
        "crash_backoff" => Style::new().red(),
        _ => Style::new().dim(),
    };
    style.apply_to(state).to_string()
}
