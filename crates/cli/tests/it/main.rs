//! End-to-end tests: the real `hangar` binary as server and as CLI, over real HTTP,
//! with a real SQLite store in a temporary data dir (and once on PostgreSQL).

mod access;
mod archives;
mod auth;
mod crash;
mod dashboard;
mod deploy;
mod examples;
mod exec;
mod gateway;
mod gpus;
mod login;
mod manifest;
mod metrics;
mod openapi;
mod postgres;
mod queue;
mod revisions;
mod sandbox;
mod scaling;
mod servers;
mod slurm;
mod switching;
mod tls;
mod traffic;

use testkit::{AppDir, TestServer};

const BIN: &str = env!("CARGO_BIN_EXE_hangar");

/// Flags that make runner health checks and back-offs quick enough for tests.
const FAST: &[&str] = &["--health-interval", "0.2", "--backoff-base", "0.3"];

fn server() -> TestServer {
    TestServer::start_with(BIN, FAST)
}

/// A server with more flags than [`FAST`].
fn server_with(extra: &[&str]) -> TestServer {
    TestServer::start_with(BIN, &[FAST, extra].concat())
}

/// Fails, showing the first few, if any of a prober's calls failed.
pub(crate) fn assert_no_failures(report: &testkit::ProbeReport) {
    assert!(
        report.failures.is_empty(),
        "{} of {} calls failed: {:?}",
        report.failures.len(),
        report.sent,
        &report.failures[..report.failures.len().min(5)]
    );
}

/// The controllable test app's binary.
fn testapp() -> String {
    testkit::testapp_bin(BIN).display().to_string()
}

/// A test-app app whose build step is `build` (a shell script).
fn app_with_build(name: &str, build: &str) -> AppDir {
    testapp_dir(name, &format!("build = [\"sh\", \"-c\", {build:?}]\n"))
}

/// A test-app app with more manifest lines (top-level keys first, then tables).
fn testapp_dir(name: &str, extra: &str) -> AppDir {
    AppDir::new(&format!("name = \"{name}\"\ncommand = [{:?}]\n{extra}", testapp()))
}

/// `bin` of the virtualenv `target/VENV` that `scripts/test.sh` makes from `requirements`,
/// or the path in the environment variable `var` when it is set.
fn venv_bin(var: &str, venv: &str, bin: &str, requirements: &str) -> std::path::PathBuf {
    let path = std::env::var_os(var).map(std::path::PathBuf::from).unwrap_or_else(|| {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../../target/{venv}/bin/{bin}"))
    });
    assert!(
        path.exists(),
        "{} is missing: scripts/test.sh makes it (python3 -m venv target/{venv} && \
         target/{venv}/bin/pip install -r {requirements})",
        path.display()
    );
    path
}

/// A copy of `examples/echo-python` in a temp dir, so a test can change it.
fn echo_example() -> AppDir {
    example("echo-python", "")
}

/// A copy of the files of `examples/NAME` in a temp dir, with `manifest_tail` after its
/// manifest (tables, which come last).
fn example(name: &str, manifest_tail: &str) -> AppDir {
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples").join(name);
    let manifest = std::fs::read_to_string(source.join("hangar.toml")).unwrap();
    let app = AppDir::new(&format!("{manifest}{manifest_tail}"));
    for entry in std::fs::read_dir(&source).unwrap() {
        let entry = entry.unwrap();
        let file = entry.file_name().into_string().unwrap();
        if entry.file_type().unwrap().is_file() && file != "hangar.toml" {
            app.write(&file, &std::fs::read_to_string(entry.path()).unwrap());
        }
    }
    app
}

/// `apps list-rev APP --json`.
fn revisions(server: &TestServer, app: &str) -> Vec<serde_json::Value> {
    let out = server.run(&["apps", "list-rev", app, "--json"]).ok();
    out.json().as_array().unwrap().clone()
}

/// Number of files in the artifact store.
fn artifact_count(server: &TestServer) -> usize {
    std::fs::read_dir(server.data_dir().join("artifacts/sha256")).unwrap().count()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// `apps runners APP --json` (live runners; add filters in `extra`).
fn runners(server: &TestServer, app: &str, extra: &[&str]) -> Vec<serde_json::Value> {
    let out = server.run(&[&["apps", "runners", app, "--json"], extra].concat()).ok();
    out.json().as_array().unwrap().clone()
}

/// The URL of `path` of `app` through the gateway.
fn app_url(server: &TestServer, app: &str, path: &str) -> String {
    format!("{}/default/{app}{path}", server.gateway_url)
}
