//! The supervisor: the only crate that starts processes: an app's `build` command, run
//! once per revision at deploy, and runners (long-lived app processes with health
//! checks, logs, stops and limits), behind a backend interface ([`RunnerBackend`]) so
//! that runners elsewhere (a cluster) can sit beside local processes. Every build and
//! runner runs in a sandbox ([`Sandbox`]) and a cgroup of its own ([`Cgroups`]).
//!
//! Every process it starts gets its own process group, so that stopping it stops
//! everything it spawned, and leaves a pid file, so that a server that crashed can find
//! and end what it left behind when it starts again.

mod build;
mod cgroup;
mod exec;
mod gpu;
mod group;
pub mod remote;
pub mod remote_exec;
mod runner;
mod sandbox;
pub mod slurm;

pub use build::{BuildOutcome, BuildSpec, end_leftover_build, run_build};
pub use cgroup::{Cgroups, DEFAULT_PIDS_LIMIT, Limits, Version as CgroupVersion};
pub use exec::ExecSession;
pub use gpu::{Gpu, GpuUsage, Gpus, device_nodes};
pub use group::{REVISION_VAR, end_leftover, end_strays};
/// What [`RunnerBackend::subscribe_output`] hands out. It lives in `model`, so that a crate
/// that consumes runners' output need not depend on the supervisor.
pub use model::records::OutputLine;
pub use runner::{Event, HealthPolicy, LocalProcesses, Order, Phase, RunnerBackend, RunnerHandle, RunnerLaunch};
pub use sandbox::{CACHE_DIR, CODE_DIR, Confinement, Sandbox, SandboxMode, team_uid};
