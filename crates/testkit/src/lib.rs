//! Test support: [`TestServer`] runs the real `hangar` binary as a server on
//! 127.0.0.1:0 with a temporary data dir, and hands out a typed API client and
//! ready-to-run CLI commands pointed at it. [`slurm::SlurmCluster`] runs a
//! private Slurm cluster for tests of the Slurm runner backend, and
//! [`pg::PgCluster`] a private PostgreSQL cluster for tests of the store and of
//! the server on PostgreSQL. Tests wait for conditions with [`wait_until`], never
//! for a fixed time.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use api::client::Client;

mod cluster;
pub mod pg;
pub mod slurm;

/// How long a test waits for a condition before it fails. Generous, because CI
/// machines are small and busy; a passing test does not wait this long.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// A running `hangar server` with its own data dir.
pub struct TestServer {
    bin: PathBuf,
    dir: tempfile::TempDir,
    extra_args: Vec<String>,
    /// More environment for the server process.
    env: Vec<(String, String)>,
    child: Option<Child>,
    pub api_url: String,
    pub gateway_url: String,
    pub root_key: String,
}

impl TestServer {
    /// Starts the server binary `bin` (use `env!("CARGO_BIN_EXE_hangar")`).
    pub fn start(bin: &str) -> TestServer {
        TestServer::start_with(bin, &[])
    }

    /// Starts the server with extra `hangar server` flags.
    pub fn start_with(bin: &str, extra_args: &[&str]) -> TestServer {
        TestServer::start_with_env(bin, extra_args, &[])
    }

    /// Starts the server with extra flags and environment variables. With
    /// `HANGAR_TEST_STORE=postgres`, its store is a fresh database of the PostgreSQL
    /// server `HANGAR_TEST_PG_URL` names (unless the flags name a database already).
    pub fn start_with_env(bin: &str, extra_args: &[&str], env: &[(String, String)]) -> TestServer {
        let mut extra_args: Vec<&str> = extra_args.to_vec();
        let database;
        if std::env::var("HANGAR_TEST_STORE").as_deref() == Ok("postgres") && !extra_args.contains(&"--database-url") {
            database = fresh_postgres_database();
            extra_args.extend(["--database-url", database.as_str()]);
        }
        let extra_args = extra_args.as_slice();
        let dir = tempfile::Builder::new().prefix("hangar-test-").tempdir().expect("cannot make a temp dir");
        let mut server = TestServer {
            bin: PathBuf::from(bin),
            dir,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            env: env.to_vec(),
            child: None,
            api_url: String::new(),
            gateway_url: String::new(),
            root_key: String::new(),
        };
        server.spawn().expect("the server did not start");
        server
    }

    /// Starts the first of several servers sharing one store: always on a fresh
    /// PostgreSQL database (of the server `HANGAR_TEST_PG_URL` names). Start the others
    /// with [`join`](Self::join).
    pub fn start_shared(bin: &str, extra_args: &[&str]) -> TestServer {
        let database = fresh_postgres_database();
        TestServer::start_with(bin, &[&["--database-url", database.as_str()], extra_args].concat())
    }

    /// Starts another server on this one's PostgreSQL store, with `extra_args`. It
    /// shares the store's root key and the secret key, as an operator's servers would.
    pub fn join(&self, extra_args: &[&str]) -> TestServer {
        let url = self.database_url().expect("only a server on PostgreSQL can share its store").to_owned();
        let dir = tempfile::Builder::new().prefix("hangar-test-").tempdir().expect("cannot make a temp dir");
        let mut server = TestServer {
            bin: self.bin.clone(),
            dir,
            extra_args: [&["--database-url", url.as_str()], extra_args]
                .concat()
                .iter()
                .map(|s| s.to_string())
                .collect(),
            env: self.env.clone(),
            child: None,
            api_url: String::new(),
            gateway_url: String::new(),
            root_key: String::new(),
        };
        std::fs::create_dir_all(server.data_dir()).expect("cannot make the data dir");
        for file in ["admin.key", "secret.key"] {
            std::fs::copy(self.data_dir().join(file), server.data_dir().join(file))
                .unwrap_or_else(|e| panic!("cannot copy {file}: {e}"));
        }
        server.spawn().expect("the server did not start");
        server
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The PostgreSQL database the server keeps its store in, when it is not the
    /// embedded SQLite one.
    pub fn database_url(&self) -> Option<&str> {
        let at = self.extra_args.iter().position(|a| a == "--database-url")?;
        self.extra_args.get(at + 1).map(String::as_str)
    }

    /// Runs one SQL statement on the server's store (SQLite in its data dir, or its
    /// PostgreSQL database), as an operator or a damaged disk could; returns how many
    /// rows it changed. For tests of what the server makes of such changes.
    pub fn execute_in_store(&self, sql: &str) -> u64 {
        let Some(url) = self.database_url() else {
            let db = rusqlite::Connection::open(self.data_dir().join("hangar.db")).expect("cannot open the store");
            return db.execute(sql, []).unwrap_or_else(|e| panic!("{sql}: {e}")) as u64;
        };
        let out = Command::new("psql")
            .arg(url)
            .args(["-X", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .expect("cannot run psql");
        assert!(out.status.success(), "{sql}: {}", String::from_utf8_lossy(&out.stderr));
        // psql says what it did: `UPDATE 1`.
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace().last().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{sql}: {text}"))
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A directory that the server's sandboxed runners can read (at the same path): the
    /// place for files a test uses to steer its test app.
    pub fn shared_dir(&self) -> PathBuf {
        self.dir.path().join("shared")
    }

    /// Everything the server has written to stdout and stderr, across restarts.
    pub fn output(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let endpoints = self.data_dir().join("server.json");
        let _ = std::fs::remove_file(&endpoints);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path())?;
        std::fs::create_dir_all(self.shared_dir())?;
        // Sandboxed runners see the test app (built beside the server) and the shared dir.
        let binaries = self.bin.parent().context("the server binary has no directory")?;
        let child = Command::new(&self.bin)
            .arg("server")
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--api-addr", "127.0.0.1:0", "--gateway-addr", "127.0.0.1:0"])
            .arg("--sandbox-ro-path")
            .arg(binaries)
            .arg("--sandbox-ro-path")
            .arg(self.shared_dir())
            .args(&self.extra_args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("HANGAR_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start the hangar binary")?;
        self.child = Some(child);
        let text = wait_until("the server to write server.json", || {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("the server exited early ({status}):\n{}", self.output());
            }
            std::fs::read_to_string(&endpoints).ok()
        });
        let json: serde_json::Value = serde_json::from_str(&text)?;
        self.api_url = json["api"].as_str().context("server.json has no api")?.to_owned();
        self.gateway_url = json["gateway"].as_str().context("server.json has no gateway")?.to_owned();
        self.root_key = std::fs::read_to_string(self.data_dir().join("admin.key"))?.trim().to_owned();
        let url = format!("{}/healthz", self.api_url);
        wait_until("the API to answer /healthz", || http_ok(&url).then_some(()));
        Ok(())
    }

    /// A client of the API with the root key.
    pub fn client(&self) -> Client {
        self.client_with(Some(&self.root_key))
    }

    pub fn client_with(&self, key: Option<&str>) -> Client {
        Client::new(&self.api_url, key.map(str::to_owned), None)
    }

    /// A `hangar` command pointed at this server with the root key.
    pub fn cli(&self) -> Command {
        let mut command = Command::new(&self.bin);
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.dir.path())
            .env("HANGAR_URL", &self.api_url)
            .env("HANGAR_KEY", &self.root_key)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
        command
    }

    /// Runs a CLI command to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        run_command(self.cli().args(args))
    }

    /// Kills the server with SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server with SIGTERM and waits for it to exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("the server is not running");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        child.wait().expect("cannot wait for the server")
    }

    /// Starts the server again on the same data dir (after [`kill`](Self::kill) or
    /// [`stop`](Self::stop)).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the server is still running");
        self.spawn().expect("the server did not restart");
    }
}

impl Drop for TestServer {
    /// Stops the server gracefully, so that it stops its runners too; a server that
    /// does not exit in time is killed.
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A failing test shows what the server said, which is otherwise lost with its
            // temporary directory.
            let output = self.output();
            let lines: Vec<&str> = output.lines().collect();
            eprintln!("--- the server's last log lines ---");
            for line in &lines[lines.len().saturating_sub(200)..] {
                eprintln!("{line}");
            }
        }
        let Some(mut child) = self.child.take() else { return };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A new, empty database on the PostgreSQL server of `HANGAR_TEST_PG_URL` (an admin
/// URL such as `postgres://postgres@127.0.0.1:PORT/postgres`), made with `psql`; returns
/// its URL.
fn fresh_postgres_database() -> String {
    let admin = std::env::var("HANGAR_TEST_PG_URL")
        .expect("HANGAR_TEST_STORE=postgres needs HANGAR_TEST_PG_URL, an admin URL of a PostgreSQL server");
    let name = format!(
        "hangar_e2e_{}_{}",
        std::process::id(),
        NEXT_DATABASE.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    );
    let out = Command::new("psql")
        .arg(&admin)
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", &format!("CREATE DATABASE {name}")])
        .stdin(Stdio::null())
        .output()
        .expect("cannot run psql");
    assert!(out.status.success(), "cannot create database {name}: {}", String::from_utf8_lossy(&out.stderr));
    let (base, query) = admin.split_once('?').map_or((admin.as_str(), None), |(b, q)| (b, Some(q)));
    let base = base.rsplit_once('/').map_or(base, |(server, _)| server);
    match query {
        Some(query) => format!("{base}/{name}?{query}"),
        None => format!("{base}/{name}"),
    }
}

static NEXT_DATABASE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The result of a finished CLI command.
#[derive(Debug)]
pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == 0
    }

    /// Fails the test with the command's output unless it succeeded.
    #[track_caller]
    pub fn ok(self) -> Output {
        assert!(self.success(), "command failed ({}):\nstdout:\n{}\nstderr:\n{}", self.code, self.stdout, self.stderr);
        self
    }

    /// Fails the test unless the command failed.
    #[track_caller]
    pub fn failed(self) -> Output {
        assert!(!self.success(), "command unexpectedly succeeded:\nstdout:\n{}\nstderr:\n{}", self.stdout, self.stderr);
        self
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", self.stdout))
    }
}

pub fn run_command(command: &mut Command) -> Output {
    let out = command.output().expect("cannot run the command");
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Polls `check` until it returns `Some`, or fails the test after [`DEADLINE`].
#[track_caller]
pub fn wait_until<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        if start.elapsed() > DEADLINE {
            panic!("timed out after {DEADLINE:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A minimal blocking HTTP GET, so waiting for the server needs no runtime.
fn http_ok(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("http://") else { return false };
    let (host, path) = rest.split_once('/').map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")));
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(host) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    if write!(stream, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.1 200")
}

/// The pid, on this machine, of the test app process that gave `reply` (its `pid` and
/// `runner`). In a sandbox the app has a pid namespace of its own and sees its own pid
/// as a small number; the process is found by its runner id and that pid.
pub fn host_pid(reply: &serde_json::Value) -> i32 {
    let (Some(inner), Some(runner)) = (reply["pid"].as_i64(), reply["runner"].as_str()) else {
        panic!("not a test app's reply: {reply}");
    };
    let needle = format!("HANGAR_RUNNER_ID={runner}");
    let found = std::fs::read_dir("/proc").into_iter().flatten().flatten().find_map(|entry| {
        let pid = entry.file_name().to_str()?.parse::<i32>().ok()?;
        let environ = std::fs::read(entry.path().join("environ")).ok()?;
        if !environ.split(|b| *b == 0).any(|var| var == needle.as_bytes()) {
            return None;
        }
        // `NSpid:` lists the pid in each pid namespace, this machine's first.
        let status = std::fs::read_to_string(entry.path().join("status")).ok()?;
        let nspid = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
        (nspid.split_whitespace().last()?.parse::<i64>().ok()? == inner).then_some(pid)
    });
    found.unwrap_or_else(|| panic!("no process of runner {runner} has pid {inner}"))
}

/// The controllable test app (`hangar-testapp`), built next to the `hangar` binary
/// `hangar_bin`.
pub fn testapp_bin(hangar_bin: &str) -> PathBuf {
    let path = Path::new(hangar_bin).with_file_name("hangar-testapp");
    assert!(path.exists(), "{} is missing: build the workspace (cargo build --workspace)", path.display());
    path
}

/// A temporary app directory with a manifest and any other files.
pub struct AppDir {
    dir: tempfile::TempDir,
}

impl AppDir {
    pub fn new(manifest: &str) -> AppDir {
        let dir = tempfile::Builder::new().prefix("hangar-app-").tempdir().expect("cannot make a temp dir");
        std::fs::write(dir.path().join("hangar.toml"), manifest).expect("cannot write the manifest");
        AppDir { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn path_str(&self) -> &str {
        self.dir.path().to_str().expect("temp paths are UTF-8")
    }

    pub fn write(&self, name: &str, contents: &str) -> &AppDir {
        let path = self.dir.path().join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("cannot make a directory");
        }
        std::fs::write(path, contents).expect("cannot write a file");
        self
    }
}

/// Fails unless `path` is absent.
pub fn assert_absent(path: &Path) {
    assert!(!path.exists(), "{} should not exist", path.display());
}

/// An HTTP answer, read whole.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
    }
}

/// A plain HTTP client for calling apps through the gateway, blocking.
pub struct Http {
    runtime: tokio::runtime::Runtime,
    client: reqwest::Client,
}

impl Default for Http {
    fn default() -> Http {
        Http::new()
    }
}

impl Http {
    pub fn new() -> Http {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        Http { runtime, client: reqwest::Client::new() }
    }

    /// Sends a request; `key` goes in `Authorization: Key …`.
    pub fn send(&self, method: &str, url: &str, key: Option<&str>, headers: &[(&str, &str)], body: Vec<u8>) -> Reply {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("a valid method");
        let mut request = self.client.request(method, url).body(body);
        if let Some(key) = key {
            request = request.header("authorization", format!("Key {key}"));
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        self.runtime.block_on(async {
            let response = request.send().await.unwrap_or_else(|e| panic!("request to {url} failed: {e}"));
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            let body = response.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
            Reply { status, headers, body }
        })
    }

    pub fn get(&self, url: &str, key: Option<&str>) -> Reply {
        self.send("GET", url, key, &[], Vec::new())
    }
}

/// What a [`Prober`] saw.
#[derive(Debug, Default, Clone)]
pub struct ProbeReport {
    pub sent: u64,
    pub ok: u64,
    /// Every failed call: its status (0 when no answer came) and body.
    pub failures: Vec<(u16, String)>,
}

/// Sends calls at a fixed rate in the background during an operation, and records
/// every failure with its status and body.
pub struct Prober {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<ProbeReport>>,
}

impl Prober {
    /// Starts calling `url` (with `key`) `rate` times a second.
    pub fn start(url: &str, key: Option<&str>, rate: u32) -> Prober {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (url, key, flag) = (url.to_owned(), key.map(str::to_owned), stop.clone());
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            runtime.block_on(probe(url, key, rate, flag))
        });
        Prober { stop, thread: Some(thread) }
    }

    /// Stops sending, waits for the calls in flight, and reports.
    pub fn finish(mut self) -> ProbeReport {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.take().expect("finished once").join().expect("the prober panicked")
    }
}

async fn probe(
    url: String,
    key: Option<String>,
    rate: u32,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> ProbeReport {
    let client = reqwest::Client::new();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut calls = tokio::task::JoinSet::new();
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        tick.tick().await;
        let mut request = client.get(&url);
        if let Some(key) = &key {
            request = request.header("authorization", format!("Key {key}"));
        }
        calls.spawn(async move {
            match request.send().await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let body = response.text().await.unwrap_or_default();
                    (status, body)
                }
                Err(e) => (0, e.to_string()),
            }
        });
    }
    let mut report = ProbeReport::default();
    while let Some(result) = calls.join_next().await {
        let (status, body) = result.unwrap_or((0, "the call task panicked".to_owned()));
        report.sent += 1;
        if status == 200 {
            report.ok += 1;
        } else {
            report.failures.push((status, body));
        }
    }
    report
}
