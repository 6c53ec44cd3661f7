//! `hangar`: the one binary. `hangar server` runs the server; every other command is a
//! thin client of the control API.

mod access;
mod apps;
mod config;
mod context;
mod deploy;
mod exec;
mod login;
mod logs;
mod output;
mod runners;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

use crate::context::Context;

#[derive(Debug, Parser)]
#[command(name = "hangar", version, about = "Serve HTTP apps from immutable revisions", propagate_version = true)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, clap::Args)]
struct GlobalArgs {
    /// URL of the hangar control API [default: the profile's, else the local server's, else
    /// http://127.0.0.1:8700]
    #[arg(long, global = true, env = "HANGAR_URL")]
    url: Option<String>,
    /// API key as <id>:<secret> [default: the profile's key, else the local server's
    /// admin.key, each only for its own URL]
    #[arg(long, global = true, env = "HANGAR_KEY", hide_env_values = true)]
    key: Option<String>,
    /// Use this profile of the config file (see `hangar login`) [default: the current one]
    #[arg(long, global = true, env = "HANGAR_PROFILE")]
    profile: Option<String>,
    /// Act for this team (root keys may act for any team)
    #[arg(long, global = true, env = "HANGAR_TEAM")]
    team: Option<String>,
    /// Output format
    #[arg(long, global = true, value_enum, default_value_t = output::Format::Pretty)]
    output: output::Format,
    /// Same as --output json
    #[arg(long, global = true)]
    json: bool,
    /// Show the full chain of causes of an error
    #[arg(long, global = true)]
    debug: bool,
}

impl std::fmt::Debug for GlobalArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GlobalArgs")
            .field("url", &self.url)
            .field("key", &self.key.as_ref().map(|_| api::wire::REDACTED))
            .field("profile", &self.profile)
            .field("team", &self.team)
            .field("output", &self.output)
            .field("json", &self.json)
            .field("debug", &self.debug)
            .finish()
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the hangar server (control API, gateway, deploys)
    Server(Box<server::ServerArgs>),
    /// Check a key against a server and save both as a profile (--profile, else
    /// "default") in ~/.config/hangar/config.toml
    ///
    /// The key is read from stdin with --key-stdin, else taken from --key (or HANGAR_KEY),
    /// else asked for on the terminal without echo. The URL is --url (or HANGAR_URL), else
    /// the profile's own when it is logged in to again, else the local server's. The
    /// first profile saved becomes the current one; `hangar profile use` switches.
    Login(login::LoginArgs),
    /// The saved profiles of servers and keys
    #[command(subcommand)]
    Profile(login::ProfileCommand),
    /// Deploy the app in PATH as a new revision
    Deploy(deploy::DeployArgs),
    /// Manage apps and their revisions
    #[command(subcommand)]
    Apps(apps::AppsCommand),
    /// See and manage runners
    #[command(subcommand)]
    Runners(runners::RunnersCommand),
    /// The server's GPUs: which runner of which app holds each
    Gpus,
    /// Teams (root key only)
    #[command(subcommand)]
    Teams(access::TeamsCommand),
    /// API keys of the team
    #[command(subcommand)]
    Keys(access::KeysCommand),
    /// Secrets of the team, given to runners as environment variables
    #[command(subcommand)]
    Secrets(access::SecretsCommand),
    /// Run one runner of a cluster's job on this node (what a Slurm job of hangar runs;
    /// it takes its server's URL and its token from HANGAR_AGENT_URL and
    /// HANGAR_AGENT_TOKEN)
    #[command(hide = true)]
    Agent {
        /// Where code and caches are kept on this node
        #[arg(long, default_value = "/var/tmp/hangar-node")]
        node_dir: std::path::PathBuf,
    },
    /// Print a shell completion script
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// mimalloc: the gateway's hot path allocates a little per call, and glibc's malloc
/// showed up at about a tenth of the server's time under load (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let debug = cli.global.debug;
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            if debug {
                eprintln!("error: {e:?}");
            } else {
                eprintln!("error: {e:#}");
            }
            if let Some(hint) = hint(&e) {
                eprintln!("hint: {hint}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let command = match cli.command {
        Command::Server(args) => {
            let config = server::Config::load(&args)?;
            server::init_logging(config.log_format);
            runtime()?.block_on(server::run(config))?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::Agent { node_dir } => {
            let url = std::env::var(supervisor::remote::URL_VAR)
                .map_err(|_| anyhow::anyhow!("{} is not set", supervisor::remote::URL_VAR))?;
            let token = std::env::var(supervisor::remote::TOKEN_VAR)
                .map_err(|_| anyhow::anyhow!("{} is not set", supervisor::remote::TOKEN_VAR))?;
            runtime()?.block_on(supervisor::remote::run_agent(url, token, node_dir)).map_err(anyhow::Error::msg)?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::Completion { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "hangar", &mut script);
            output::write_stdout(&script);
            return Ok(ExitCode::SUCCESS);
        }
        Command::Login(args) => return runtime()?.block_on(login::login(&cli.global, args)),
        Command::Profile(command) => return login::profile(&cli.global, command),
        client_command => client_command,
    };
    // Every other command is a client of the control API.
    let cx = Context::new(&cli.global)?;
    let runtime = runtime()?;
    match command {
        Command::Deploy(args) => runtime.block_on(deploy::run(&cx, args)),
        Command::Apps(command) => runtime.block_on(apps::run(&cx, command)),
        Command::Runners(command) => runtime.block_on(runners::run(&cx, command)),
        Command::Gpus => runtime.block_on(runners::gpus(&cx)),
        Command::Teams(command) => runtime.block_on(access::teams(&cx, command)),
        Command::Keys(command) => runtime.block_on(access::keys(&cx, command)),
        Command::Secrets(command) => runtime.block_on(access::secrets(&cx, command)),
        Command::Server(_)
        | Command::Agent { .. }
        | Command::Completion { .. }
        | Command::Login(_)
        | Command::Profile(_) => unreachable!("handled above"),
    }
}

/// A next step for the errors people most often meet.
fn hint(e: &anyhow::Error) -> Option<&'static str> {
    match e.downcast_ref::<api::client::ClientError>()? {
        api::client::ClientError::Api { status: 401, .. } => Some(
            "run `hangar login`, or pass --key or set HANGAR_KEY to <id>:<secret>; the root key is in the server's <data-dir>/admin.key",
        ),
        api::client::ClientError::Connect { .. } => {
            Some("start one with `hangar server`, or point --url / HANGAR_URL at a running one")
        }
        _ => None,
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}
