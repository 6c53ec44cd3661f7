//! `hangar runners exec` and `shell`: a command inside a runner's sandbox, as its own
//! processes run, with its exit status passed back.

use std::io::Write;
use std::process::Stdio;

use testkit::{TestServer, wait_until};

use crate::{runners, server, testapp_dir};

/// A server with one set-up runner of app `web`, which has the team's secret
/// `HF_TOKEN` and `V = "1"` in its environment; returns the runner's id.
fn serving() -> (TestServer, String) {
    let server = server();
    server.run(&["secrets", "set", "HF_TOKEN=hf-secret-value"]).ok();
    let app = testapp_dir("web", "env = { V = \"1\" }\n[scaling]\nmin_concurrency = 1\n");
    server.run(&["deploy", app.path_str()]).ok();
    let id = wait_until("a set-up runner", || {
        runners(&server, "web", &[]).iter().find(|r| r["state"] == "idle").map(|r| r["id"].as_str().unwrap().to_owned())
    });
    (server, id)
}

#[test]
fn a_command_runs_in_the_runners_sandbox_with_its_environment_and_its_status_comes_back() {
    let (server, id) = serving();
    let data_dir = server.data_dir().display().to_string();
    let server_pid = server.pid().unwrap();
    let script = format!(
        "id -u; pwd; echo \"V=$V TOKEN=$HF_TOKEN PORT=$PORT\"; \
         cat {data_dir}/admin.key 2>/dev/null || echo no-admin-key; \
         test -e /proc/{server_pid}/environ && echo sees-the-server || echo no-server; \
         ls /proc | grep -c '^[0-9]'; \
         for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done | grep -c hangar-testapp; \
         echo oops >&2; exit 7"
    );
    let out = server.run(&["runners", "exec", &id[..8], "--", "sh", "-c", &script]);
    assert_eq!(out.code, 7, "the command's status is the CLI's: {out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    let uid: u32 = lines[0].parse().unwrap();
    assert!(uid >= 2_000_000, "it runs as the team's uid, not root: {uid}");
    assert_eq!(lines[1], "/app", "in the runner's code directory");
    assert!(lines[2].starts_with("V=1 TOKEN=hf-secret-value PORT="), "the runner's environment: {}", lines[2]);
    assert!(lines[2].len() > "V=1 TOKEN=hf-secret-value PORT=".len(), "with its port: {}", lines[2]);
    assert_eq!(lines[3], "no-admin-key", "nothing of the data dir");
    assert_eq!(lines[4], "no-server", "none of the machine's processes");
    let processes: usize = lines[5].parse().unwrap();
    assert!(processes < 12, "only the sandbox's processes: {processes}");
    assert!(lines[6].parse::<usize>().unwrap() >= 1, "the runner's own app is there: {:?}", lines);
    assert_eq!(out.stderr.trim(), "oops", "stderr comes back as stderr");

    // Standard input goes in, and its end ends `cat`.
    let mut child = server
        .cli()
        .args(["runners", "exec", &id, "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"hello\nworld\n").unwrap();
    let done = child.wait_with_output().unwrap();
    assert!(done.status.success());
    assert_eq!(String::from_utf8_lossy(&done.stdout), "hello\nworld\n");

    // A terminal when asked: the command sees one, of the size given (24 x 80 without
    // a terminal here).
    let out = server.run(&["runners", "exec", "-t", &id, "--", "sh", "-c", "test -t 0 && test -t 1 && stty size"]).ok();
    assert_eq!(out.stdout.trim(), "24 80");

    // Each command is in the app's history, with the key that ran it.
    let history = server.run(&["apps", "history", "web", "--json"]).ok().json();
    let execs: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["action"] == "runner_exec")
        .map(|h| h["details"].as_str().unwrap())
        .collect();
    assert_eq!(execs.len(), 3, "{history}");
    assert!(execs.iter().any(|d| d.contains("cat") && d.contains(&id)), "{execs:?}");
    assert!(execs.iter().any(|d| d.contains("'test -t 0") && d.contains("(with a terminal)")), "{execs:?}");

    // A program that is not there: 127, as a shell says.
    let out = server.run(&["runners", "exec", &id, "--", "no-such-program"]);
    assert_eq!(out.code, 127, "{out:?}");
}

#[test]
fn only_admin_keys_of_the_runners_team_reach_it_and_bad_requests_change_nothing() {
    let (server, id) = serving();
    let api_key =
        server.run(&["keys", "create", "--scope", "api", "--json"]).ok().json()["key"].as_str().unwrap().to_owned();
    let out = testkit::run_command(server.cli().env("HANGAR_KEY", &api_key).args(["runners", "exec", &id, "--", "id"]));
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("admin key"), "{}", out.stderr);
    let other = server.run(&["teams", "create", "other", "--json"]).ok().json();
    let other_admin = other["key"]["key"].as_str().unwrap();
    let out =
        testkit::run_command(server.cli().env("HANGAR_KEY", other_admin).args(["runners", "exec", &id, "--", "id"]));
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("no runner matches"), "another team's runner is not found: {}", out.stderr);
    let out = server.run(&["runners", "exec", "ffffffff", "--", "id"]).failed();
    assert!(out.stderr.contains("no runner matches"), "{}", out.stderr);
    // What no argument can carry, and a terminal of no size, are refused before anything runs.
    let rt = crate::runtime();
    let client = server.client();
    let nul = rt.block_on(client.exec(&id, vec!["echo".to_owned(), "a\0b".to_owned()], None));
    let nul = rt.block_on(async { nul.unwrap().reader.next().await }).unwrap_err();
    assert_eq!(nul.code(), Some("invalid_request"), "{nul}");
    assert!(nul.to_string().contains("NUL"), "{nul}");
    let size = Some(model::records::TermSize { rows: 0, cols: 80 });
    let tiny = rt.block_on(client.exec(&id, vec!["sh".to_owned()], size));
    let tiny = rt.block_on(async { tiny.unwrap().reader.next().await }).unwrap_err();
    assert!(tiny.to_string().contains("rows and columns"), "{tiny}");
    // None of those ran anything: no history of them.
    let history = server.run(&["apps", "history", "web", "--json"]).ok().json();
    assert!(!history.to_string().contains("runner_exec"), "{history}");
}

#[test]
fn a_command_ends_when_its_client_goes_and_a_shell_reads_commands() {
    let (server, id) = serving();
    let mut client = server.cli().args(["runners", "exec", &id, "--", "sleep", "1000"]).spawn().unwrap();
    let sleeping = || {
        let out = server.run(&["runners", "exec", &id, "--", "sh", "-c", "ps -eo args 2>/dev/null || \
                                                                        for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done"]);
        out.stdout.lines().filter(|l| l.trim() == "sleep 1000").count()
    };
    wait_until("the command to run", || (sleeping() == 1).then_some(()));
    client.kill().unwrap();
    client.wait().unwrap();
    wait_until("the command to end with its client", || (sleeping() == 0).then_some(()));

    // `runners shell` without a terminal reads its commands from standard input.
    let mut shell =
        server.cli().args(["runners", "shell", &id]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    shell.stdin.take().unwrap().write_all(b"echo \"in $PWD as $(id -u)\"\nexit 3\n").unwrap();
    let done = shell.wait_with_output().unwrap();
    assert_eq!(done.status.code(), Some(3));
    let text = String::from_utf8_lossy(&done.stdout);
    assert!(text.starts_with("in /app as 2"), "{text}");
}

#[test]
fn in_a_real_terminal_the_command_gets_its_size_and_an_interactive_shell_its_keys() {
    let (server, id) = serving();
    // util-linux's `script` gives the CLI a terminal of its own, as a person's would be.
    let in_terminal = |inner: &str, input: &[u8]| {
        let mut child = std::process::Command::new("script")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HANGAR_URL", &server.api_url)
            .env("HANGAR_KEY", &server.root_key)
            .args(["-q", "-e", "-c", inner, "/dev/null"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        drop(stdin);
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let bin = crate::BIN;
    let (code, text) = in_terminal(&format!("stty rows 30 cols 100; {bin} runners exec -t {id} -- stty size"), b"");
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("30 100"), "the command's terminal is as big as this one: {text:?}");
    let keys = b"echo \"answer $((6 * 7))\"\rexit 5\r";
    let (code, text) = in_terminal(&format!("{bin} runners shell {id}"), keys);
    assert_eq!(code, Some(5), "the shell's status: {text}");
    assert!(text.contains("answer 42"), "the shell ran what was typed: {text:?}");
}
