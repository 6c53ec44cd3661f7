//! `hangar login` and profiles: what is saved, what is refused, and which URL and key a
//! command ends up using (flags, then environment, then the profile, then the local
//! server's files).

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use testkit::{Output, TestServer, run_command};

use crate::{BIN, server};

/// A user's machine: a home, a config dir and a local data dir, all temporary, and no
/// HANGAR_URL or HANGAR_KEY.
struct Machine {
    dir: tempfile::TempDir,
}

impl Machine {
    fn new() -> Machine {
        Machine { dir: tempfile::Builder::new().prefix("hangar-login-").tempdir().unwrap() }
    }

    fn config_home(&self) -> PathBuf {
        self.dir.path().join("xdg")
    }

    fn config_file(&self) -> PathBuf {
        self.config_home().join("hangar/config.toml")
    }

    /// A `hangar` command on this machine whose local server's files are in `data_dir`.
    fn hangar_with_local(&self, data_dir: &Path) -> Command {
        let mut command = Command::new(BIN);
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.dir.path())
            .env("XDG_CONFIG_HOME", self.config_home())
            .env("HANGAR_DATA_DIR", data_dir)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
        command
    }

    /// A `hangar` command on this machine, with no local server.
    fn hangar(&self) -> Command {
        self.hangar_with_local(&self.dir.path().join("no-local-server"))
    }

    fn run(&self, args: &[&str]) -> Output {
        run_command(self.hangar().args(args))
    }

    /// `hangar login --url URL --key KEY [--profile NAME]`.
    fn login(&self, url: &str, key: &str, profile: Option<&str>) -> Output {
        let mut command = self.hangar();
        command.args(["login", "--url", url, "--key", key]);
        if let Some(profile) = profile {
            command.args(["--profile", profile]);
        }
        run_command(&mut command)
    }

    fn config(&self) -> toml::Table {
        toml::from_str(&std::fs::read_to_string(self.config_file()).unwrap()).unwrap()
    }
}

/// Runs `command` with `input` on its stdin.
fn run_with_stdin(command: &mut Command, input: &str) -> Output {
    let mut child = command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A server whose team has a secret named `marker`, so that `secrets list` tells which
/// server (or team) a command reached.
fn marked_server(marker: &str) -> TestServer {
    let server = server();
    server.run(&["secrets", "set", &format!("{marker}=1")]).ok();
    server
}

/// The names of the secrets `output` (of `secrets list --json`) lists.
fn secrets(output: Output) -> Vec<String> {
    let output = output.ok();
    output.json().as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap().to_owned()).collect()
}

fn secret_of(key: &str) -> &str {
    key.split_once(':').unwrap().1
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn login_saves_a_private_profile_that_later_commands_use() {
    let a = marked_server("ON_A");
    let machine = Machine::new();

    let mut login = machine.hangar();
    login.args(["login", "--url", &a.api_url, "--key-stdin"]);
    let out = run_with_stdin(&mut login, &format!("{}\n", a.root_key)).ok();
    assert!(!out.stdout.contains(secret_of(&a.root_key)) && !out.stderr.contains(secret_of(&a.root_key)), "{out:?}");
    assert_eq!(mode(&machine.config_file()), 0o600);
    assert_eq!(mode(machine.config_file().parent().unwrap()), 0o700);
    let config = machine.config();
    assert_eq!(config["current"].as_str(), Some("default"));
    assert_eq!(config["profiles"]["default"]["url"].as_str(), Some(a.api_url.as_str()));
    assert_eq!(config["profiles"]["default"]["key"].as_str(), Some(a.root_key.as_str()));

    // No URL or key in the environment: the profile is enough.
    assert_eq!(secrets(machine.run(&["secrets", "list", "--json"])), ["ON_A"]);

    // --key saves another profile; the first stays current.
    let team = a.run(&["teams", "create", "bravo", "--json"]).ok().json();
    let bravo_key = team["key"]["key"].as_str().unwrap();
    let out = machine.login(&a.api_url, bravo_key, Some("bravo")).ok();
    assert!(out.stdout.contains("profile use bravo"), "{out:?}");
    let bravo_id = bravo_key.split_once(':').unwrap().0;
    assert!(out.stdout.contains(&format!("with key {bravo_id}, scope admin")), "{out:?}");
    assert!(!out.stdout.contains(secret_of(bravo_key)), "{out:?}");
    assert_eq!(mode(&machine.config_file()), 0o600);
    let config = machine.config();
    assert_eq!(config["current"].as_str(), Some("default"));
    assert_eq!(config["profiles"]["bravo"]["key"].as_str(), Some(bravo_key));
    assert_eq!(secrets(machine.run(&["secrets", "list", "--json"])), ["ON_A"]);
    assert!(secrets(machine.run(&["secrets", "list", "--json", "--profile", "bravo"])).is_empty());

    // An api key may only call apps, but the server knows it: it is saved too.
    let api_key =
        a.run(&["keys", "create", "--scope", "api", "--json"]).ok().json()["key"].as_str().unwrap().to_owned();
    let out = machine.login(&a.api_url, &api_key, Some("caller")).ok();
    assert!(out.stdout.contains("scope api"), "{out:?}");
    assert_eq!(machine.config()["profiles"]["caller"]["key"].as_str(), Some(api_key.as_str()));

    // Logging in again to the current profile keeps its URL and says nothing of switching.
    let mut again = machine.hangar();
    again.args(["login", "--key", &a.root_key]);
    let out = run_command(&mut again).ok();
    assert!(out.stdout.contains(&format!("Logged in to {}", a.api_url)), "{out:?}");
    assert!(!out.stdout.contains("profile use"), "{out:?}");

    // Without XDG_CONFIG_HOME the file is in ~/.config.
    let mut login = machine.hangar();
    login.env_remove("XDG_CONFIG_HOME").args(["login", "--url", &a.api_url, "--key", &a.root_key]);
    run_command(&mut login).ok();
    let home_file = machine.dir.path().join(".config/hangar/config.toml");
    assert_eq!(mode(&home_file), 0o600);
    let mut list = machine.hangar();
    list.env_remove("XDG_CONFIG_HOME").args(["secrets", "list", "--json"]);
    assert_eq!(secrets(run_command(&mut list)), ["ON_A"]);
}

#[test]
fn login_says_whether_the_url_or_the_key_was_wrong_and_saves_nothing() {
    let a = server();
    let machine = Machine::new();

    let bad_key = "0000000000000000:not-a-secret-of-this-server";
    let out = machine.login(&a.api_url, bad_key, None).failed();
    assert!(out.stderr.contains("refused the key"), "{}", out.stderr);
    assert!(out.stderr.contains("nothing was saved"), "{}", out.stderr);
    assert!(!out.stderr.contains("not-a-secret"), "{}", out.stderr);
    testkit::assert_absent(&machine.config_file());

    // A port nothing listens on: bound for a moment, then let go.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out = machine.login(&format!("http://127.0.0.1:{port}"), &a.root_key, None).failed();
    assert!(out.stderr.contains("could not reach a server"), "{}", out.stderr);
    assert!(!out.stderr.contains("refused the key"), "{}", out.stderr);
    testkit::assert_absent(&machine.config_file());

    // Something listens, but not hangar's control API (the gateway answers unknown paths).
    let out = machine.login(&a.gateway_url, &a.root_key, None).failed();
    assert!(out.stderr.contains("does not answer like a hangar server"), "{}", out.stderr);
    testkit::assert_absent(&machine.config_file());

    // Once a profile is saved, a failed login leaves the file as it was.
    machine.login(&a.api_url, &a.root_key, None).ok();
    let before = std::fs::read(machine.config_file()).unwrap();
    machine.login(&a.api_url, bad_key, Some("other")).failed();
    assert_eq!(std::fs::read(machine.config_file()).unwrap(), before);

    // No key and no terminal: a clear error, not a hang.
    let out = machine.run(&["login", "--url", &a.api_url, "--profile", "other"]).failed();
    assert!(out.stderr.contains("no key given"), "{}", out.stderr);
    assert_eq!(std::fs::read(machine.config_file()).unwrap(), before);
}

#[test]
fn profiles_on_two_servers_are_listed_chosen_and_deleted() {
    let a = marked_server("ON_A");
    let b = marked_server("ON_B");
    let machine = Machine::new();
    machine.login(&a.api_url, &a.root_key, None).ok();
    machine.login(&b.api_url, &b.root_key, Some("b")).ok();

    let list = machine.run(&["profile", "list", "--json"]).ok();
    assert!(!list.stdout.contains(secret_of(&a.root_key)) && !list.stdout.contains(secret_of(&b.root_key)));
    let a_id = a.root_key.split_once(':').unwrap().0;
    let b_id = b.root_key.split_once(':').unwrap().0;
    assert_eq!(
        list.json(),
        serde_json::json!([
            {"name": "b", "url": b.api_url, "key_id": b_id, "current": false},
            {"name": "default", "url": a.api_url, "key_id": a_id, "current": true},
        ])
    );
    let table = machine.run(&["profile", "list"]).ok().stdout;
    assert!(!table.contains(secret_of(&a.root_key)) && !table.contains(secret_of(&b.root_key)), "{table}");
    let current_line = table.lines().find(|l| l.contains("Current")).unwrap();
    assert!(current_line.trim_start().starts_with("default") && current_line.contains(&a.api_url), "{table}");

    let list_secrets = |profile_env: Option<&str>, args: &[&str]| {
        let mut command = machine.hangar();
        if let Some(profile) = profile_env {
            command.env("HANGAR_PROFILE", profile);
        }
        secrets(run_command(command.args(["secrets", "list", "--json"]).args(args)))
    };
    assert_eq!(list_secrets(None, &[]), ["ON_A"]);
    assert_eq!(list_secrets(None, &["--profile", "b"]), ["ON_B"]);
    assert_eq!(list_secrets(Some("b"), &[]), ["ON_B"]);
    // The flag beats the environment.
    assert_eq!(list_secrets(Some("b"), &["--profile", "default"]), ["ON_A"]);

    // A profile that does not exist is an error wherever it is named.
    for out in [
        machine.run(&["secrets", "list", "--profile", "nope"]),
        run_command(machine.hangar().env("HANGAR_PROFILE", "nope").args(["secrets", "list"])),
        machine.run(&["profile", "use", "nope"]),
        machine.run(&["profile", "delete", "nope"]),
    ] {
        let out = out.failed();
        assert!(out.stderr.contains("no profile named \"nope\" (there are: b, default)"), "{}", out.stderr);
    }

    machine.run(&["profile", "use", "b"]).ok();
    assert_eq!(list_secrets(None, &[]), ["ON_B"]);
    assert_eq!(machine.config()["current"].as_str(), Some("b"));

    // Deleting the current profile leaves none current; the other stays.
    let out = machine.run(&["profile", "delete", "b"]).ok();
    assert!(out.stdout.contains("No profile is current"), "{}", out.stdout);
    let list = machine.run(&["profile", "list", "--json"]).ok().json();
    assert_eq!(list, serde_json::json!([{"name": "default", "url": a.api_url, "key_id": a_id, "current": false}]));
    machine.run(&["profile", "use", "default"]).ok();
    assert_eq!(list_secrets(None, &[]), ["ON_A"]);
    machine.run(&["profile", "delete", "default"]).ok();
    let out = machine.run(&["profile", "list"]).ok();
    assert!(out.stdout.contains("No profiles yet"), "{}", out.stdout);
}

#[test]
fn flags_beat_the_environment_which_beats_the_profile_which_beats_the_local_files() {
    let a = marked_server("ON_A");
    let b = marked_server("ON_B");
    let machine = Machine::new();
    machine.login(&a.api_url, &a.root_key, None).ok();
    // The local server is B: its server.json and admin.key are in its data dir.
    let on_this_machine = |env: &[(&str, &str)], args: &[&str]| {
        let mut command = machine.hangar_with_local(&b.data_dir());
        command.envs(env.iter().copied()).args(["secrets", "list", "--json"]).args(args);
        run_command(&mut command)
    };

    // The profile (A) beats the local files (B).
    assert_eq!(secrets(on_this_machine(&[], &[])), ["ON_A"]);
    // The environment (B) beats the profile (A).
    let env_b = [("HANGAR_URL", b.api_url.as_str()), ("HANGAR_KEY", b.root_key.as_str())];
    assert_eq!(secrets(on_this_machine(&env_b, &[])), ["ON_B"]);
    // The flags (A) beat the environment (B).
    assert_eq!(secrets(on_this_machine(&env_b, &["--url", &a.api_url, "--key", &a.root_key])), ["ON_A"]);
    // And key by key: the flag's key beats the environment's.
    let team = a.run(&["teams", "create", "bravo", "--json"]).ok().json();
    let bravo_key = team["key"]["key"].as_str().unwrap();
    a.run(&["secrets", "set", "ON_BRAVO=1", "--team", "bravo"]).ok();
    let env_a = [("HANGAR_URL", a.api_url.as_str()), ("HANGAR_KEY", a.root_key.as_str())];
    assert_eq!(secrets(on_this_machine(&env_a, &["--key", bravo_key])), ["ON_BRAVO"]);
    // A key found in a profile or in the local files only goes to its own server: with
    // the URL of B from the environment, neither the profile's key (of A) nor the local
    // root key (of A) is sent, and B refuses the call.
    let to_b_from_a = || {
        let mut command = machine.hangar_with_local(&a.data_dir());
        command.env("HANGAR_URL", &b.api_url).args(["secrets", "list"]);
        command
    };
    let out = run_command(&mut to_b_from_a()).failed();
    assert!(out.stderr.contains("hint: run `hangar login`"), "{}", out.stderr);
    machine.run(&["profile", "delete", "default"]).ok();
    let out = run_command(&mut to_b_from_a()).failed();
    assert!(out.stderr.contains("hint: run `hangar login`"), "{}", out.stderr);

    // With no profile, the local files (B) are used.
    assert_eq!(secrets(on_this_machine(&[], &[])), ["ON_B"]);
}

/// On a terminal, `login` asks for the key and does not echo it. The test plays the
/// terminal: it types the key only once the prompt is shown and echo is off, so that
/// nothing it types can be echoed or flushed before `login` reads it.
#[test]
fn login_on_a_terminal_asks_for_the_key_without_echo() {
    use nix::sys::termios::{LocalFlags, tcgetattr};
    use std::io::Read;
    use std::sync::{Arc, Mutex};

    let a = marked_server("ON_A");
    let machine = Machine::new();
    let pty = nix::pty::openpty(None, None).unwrap();
    let mut command = machine.hangar();
    command
        .args(["login", "--url", &a.api_url])
        .stdin(Stdio::from(pty.slave.try_clone().unwrap()))
        .stdout(Stdio::from(pty.slave.try_clone().unwrap()))
        .stderr(Stdio::from(pty.slave.try_clone().unwrap()));
    let mut child = command.spawn().unwrap();
    // Only the child may hold the terminal's other end (the command keeps copies too),
    // so that reading ends when the child does.
    drop(command);
    drop(pty.slave);

    // Everything the terminal shows, read as it comes (the read ends with an error once
    // the child has gone and the terminal has no writer left).
    let shown = Arc::new(Mutex::new(Vec::new()));
    let mut master = std::fs::File::from(pty.master);
    let mut typing = master.try_clone().unwrap();
    let reader = std::thread::spawn({
        let shown = shown.clone();
        move || {
            let mut buf = [0u8; 1024];
            while let Ok(n @ 1..) = master.read(&mut buf) {
                shown.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        }
    });
    let text = || String::from_utf8_lossy(&shown.lock().unwrap()).into_owned();
    testkit::wait_until("the key prompt, with echo off", || {
        let echo_off = !tcgetattr(&typing).unwrap().local_flags.contains(LocalFlags::ECHO);
        (text().contains(&format!("API key for {}", a.api_url)) && echo_off).then_some(())
    });
    typing.write_all(format!("{}\n", a.root_key).as_bytes()).unwrap();
    assert!(child.wait().unwrap().success(), "{}", text());
    drop(typing);
    reader.join().unwrap();

    let shown = text();
    assert!(shown.contains("Logged in to"), "{shown}");
    assert!(!shown.contains(secret_of(&a.root_key)), "the key was echoed: {shown}");
    assert_eq!(machine.config()["profiles"]["default"]["key"].as_str(), Some(a.root_key.as_str()));
    assert_eq!(secrets(machine.run(&["secrets", "list", "--json"])), ["ON_A"]);
}

#[test]
fn a_broken_config_file_is_named_and_a_url_and_key_given_do_without_it() {
    let a = marked_server("ON_A");
    let machine = Machine::new();
    std::fs::create_dir_all(machine.config_file().parent().unwrap()).unwrap();
    std::fs::write(machine.config_file(), "current = \"default\"\n[profiles.default]\nurl = 1\n").unwrap();

    let out = machine.run(&["secrets", "list"]).failed();
    let named = format!("{} is not a valid hangar config", machine.config_file().display());
    assert!(out.stderr.contains(&named), "{}", out.stderr);
    assert!(machine.login(&a.api_url, &a.root_key, None).failed().stderr.contains(&named));

    let mut command = machine.hangar();
    command.env("HANGAR_URL", &a.api_url).env("HANGAR_KEY", &a.root_key).args(["secrets", "list", "--json"]);
    assert_eq!(secrets(run_command(&mut command)), ["ON_A"]);
}
