//! The durable queue: `/queue/{team}/{app}` on the gateway, driven over HTTP and with
//! the unmodified `fal-client` package.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};
use testkit::{Http, Reply, TestServer, wait_until};

use crate::{echo_example, server, server_with, testapp_dir};

/// `{gateway}/queue/default/{app}{path}`.
pub(crate) fn queue_url(server: &TestServer, app: &str, path: &str) -> String {
    format!("{}/queue/default/{app}{path}", server.gateway_url)
}

pub(crate) fn submit(http: &Http, server: &TestServer, app: &str, path: &str, body: &Value) -> Value {
    let reply = http.send(
        "POST",
        &queue_url(server, app, path),
        Some(&server.root_key),
        &[("content-type", "application/json")],
        body.to_string().into_bytes(),
    );
    assert_eq!(reply.status, 202, "{}", reply.text());
    reply.json()
}

pub(crate) fn status(http: &Http, server: &TestServer, submitted: &Value) -> Value {
    let reply = http.get(submitted["status_url"].as_str().unwrap(), Some(&server.root_key));
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json()
}

pub(crate) fn completed(http: &Http, server: &TestServer, submitted: &Value) -> Value {
    wait_until("the request to complete", || {
        let status = status(http, server, submitted);
        (status["status"] == "COMPLETED").then_some(status)
    })
}

pub(crate) fn result(http: &Http, server: &TestServer, submitted: &Value) -> Reply {
    http.get(submitted["response_url"].as_str().unwrap(), Some(&server.root_key))
}

/// The python of the virtualenv `scripts/test.sh` makes with fal-client in it.
fn fal_python() -> PathBuf {
    crate::venv_bin("HANGAR_FAL_PYTHON", "fal-venv", "python", "tests/fal/requirements.txt")
}

#[test]
fn fal_client_works_unchanged_against_the_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = crate::tls::self_signed(dir.path());
    let server = server_with(&["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()]);
    let app = echo_example();
    let manifest = std::fs::read_to_string(app.path().join("hangar.toml")).unwrap();
    app.write("hangar.toml", &manifest.replace("SETUP_SECONDS = \"2\"", "SETUP_SECONDS = \"0.2\""));
    server.run(&["deploy", app.path_str()]).ok();
    let api_key =
        server.run(&["keys", "create", "--scope", "api", "--json"]).ok().json()["key"].as_str().unwrap().to_owned();

    let host = server.gateway_url.trim_start_matches("https://").to_owned();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fal/fal_compat.py");
    let out = testkit::run_command(
        std::process::Command::new(fal_python())
            .arg(script)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", dir.path())
            .env("APP", "default/echo")
            .env("FAL_KEY", &api_key)
            .env("FAL_RUN_HOST", &host)
            .env("FAL_QUEUE_RUN_HOST", format!("{host}/queue"))
            .env("SSL_CERT_FILE", &cert),
    );
    assert!(out.success(), "fal-client checks failed:\n{}\n{}\nserver:\n{}", out.stdout, out.stderr, server.output());
    assert!(out.stdout.contains("all fal-client checks passed"), "{}", out.stdout);
}

#[test]
fn a_thousand_queued_requests_survive_a_sigkill_of_the_server() {
    let mut server = server();
    let open = server.shared_dir().join("open");
    std::fs::write(&open, "").unwrap();
    // Runners stay in setup while the gate file is missing.
    let app = testapp_dir(
        "bulk",
        &format!(
            "env = {{ SETUP_UNTIL_EXISTS = {:?} }}\n[scaling]\nkeep_alive = 1\nmax_concurrency = 2\n\
             [runner]\nmax_multiplexing = 16\n",
            open.to_str().unwrap()
        ),
    );
    server.run(&["deploy", app.path_str()]).ok();
    std::fs::remove_file(&open).unwrap();
    wait_until("the app to scale to zero", || crate::runners(&server, "bulk", &[]).is_empty().then_some(()));

    let http = Http::new();
    let ids: Vec<String> = (0..1000)
        .map(|n| submit(&http, &server, "bulk", "/echo", &json!({ "n": n }))["request_id"].as_str().unwrap().to_owned())
        .collect();
    let last = by_id(&http, &server, "bulk", &ids[999], "/status");
    assert_eq!((last["status"].as_str(), last["queue_position"].as_u64()), (Some("IN_QUEUE"), Some(999)), "{last}");

    server.kill();
    server.restart();
    std::fs::write(&open, "").unwrap();
    for (n, id) in ids.iter().enumerate() {
        let status = wait_until("every request to complete", || {
            let status = by_id(&http, &server, "bulk", id, "/status");
            (status["status"] == "COMPLETED").then_some(status)
        });
        assert_eq!(status["error"], Value::Null, "{status}");
        let reply = http.get(&queue_url(&server, "bulk", &format!("/requests/{id}")), Some(&server.root_key));
        assert_eq!((reply.status, reply.json()), (200, json!({ "n": n })), "request {n}");
    }
}

/// `GET /queue/default/{app}/requests/{id}{rest}` as JSON, with the root key.
fn by_id(http: &Http, server: &TestServer, app: &str, id: &str, rest: &str) -> Value {
    let reply = http.get(&queue_url(server, app, &format!("/requests/{id}{rest}")), Some(&server.root_key));
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json()
}

#[test]
fn a_forced_rollout_in_the_middle_of_queue_traffic_fails_no_request() {
    let server = server();
    let app =
        testapp_dir("rolled", "[scaling]\nmin_concurrency = 2\nmax_concurrency = 3\n[runner]\nmax_multiplexing = 4\n");
    server.run(&["deploy", app.path_str()]).ok();
    let http = Http::new();
    // Calls of a second each, so that on a loaded machine the first are still running
    // when the rollout comes, however long submitting them took.
    let mut submitted: Vec<Value> =
        (0..40).map(|n| submit(&http, &server, "rolled", &format!("/work?delay_ms=1000&n={n}"), &json!({}))).collect();
    wait_until("requests to be running", || {
        submitted.iter().any(|r| status(&http, &server, r)["status"] == "IN_PROGRESS").then_some(())
    });
    server.run(&["apps", "rollout", "rolled", "--force"]).ok();
    submitted
        .extend((40..60).map(|n| submit(&http, &server, "rolled", &format!("/work?delay_ms=300&n={n}"), &json!({}))));

    let mut retried = 0;
    for (n, request) in submitted.iter().enumerate() {
        let status = completed(&http, &server, request);
        assert_eq!(status["error"], Value::Null, "request {n} failed: {status}");
        let reply = result(&http, &server, request);
        assert_eq!(reply.status, 200, "{}", reply.text());
        let delay = if n < 40 { 1000 } else { 300 };
        assert_eq!(reply.json()["query"], format!("delay_ms={delay}&n={n}"));
        let attempts = status["attempts"].as_array().unwrap();
        if attempts.len() > 1 {
            retried += 1;
            let first = attempts[0]["outcome"].as_str().unwrap();
            assert!(first.contains("forced rollout"), "{status}");
        }
    }
    assert!(retried > 0, "no request was in flight during the rollout; the test proved nothing");
}

#[test]
fn cancel_keeps_a_waiting_request_from_running_and_tells_a_running_one() {
    let server = server();
    let app =
        testapp_dir("cancel", "[scaling]\nmin_concurrency = 1\nmax_concurrency = 1\n[runner]\nmax_multiplexing = 1\n");
    server.run(&["deploy", app.path_str()]).ok();
    let http = Http::new();
    let running = submit(&http, &server, "cancel", "/slow?delay_ms=60000", &json!({}));
    wait_until("the first request to run", || {
        (status(&http, &server, &running)["status"] == "IN_PROGRESS").then_some(())
    });
    let waiting = submit(&http, &server, "cancel", "/never", &json!({}));
    let before = status(&http, &server, &waiting);
    assert_eq!((before["status"].as_str(), before["queue_position"].as_u64()), (Some("IN_QUEUE"), Some(0)));

    let cancel = |request: &Value| {
        http.send("PUT", request["cancel_url"].as_str().unwrap(), Some(&server.root_key), &[], vec![])
    };
    let reply = cancel(&waiting);
    assert_eq!((reply.status, reply.json()["status"].as_str()), (202, Some("CANCELLATION_REQUESTED")));
    let after = status(&http, &server, &waiting);
    assert_eq!(
        (after["status"].as_str(), after["error_type"].as_str()),
        (Some("COMPLETED"), Some("request_cancelled"))
    );
    assert_eq!(after["attempts"], json!([]), "a request cancelled while waiting never runs");
    let reply = result(&http, &server, &waiting);
    assert_eq!((reply.status, reply.json()["error"]["code"].as_str()), (400, Some("request_cancelled")));

    let reply = cancel(&running);
    assert_eq!(reply.status, 202, "{}", reply.text());
    let done = completed(&http, &server, &running);
    assert_eq!(done["error_type"], "request_cancelled", "{done}");
    assert_eq!(done["cancel_requested"], true);
    assert_eq!(result(&http, &server, &running).status, 499, "the app's own answer to the cancel");
    let id = running["request_id"].as_str().unwrap();
    let with_logs =
        http.get(&format!("{}?logs=1", running["status_url"].as_str().unwrap()), Some(&server.root_key)).json();
    let lines: Vec<&str> =
        with_logs["logs"].as_array().unwrap().iter().map(|l| l["message"].as_str().unwrap()).collect();
    assert!(lines.contains(&format!("cancel requested for {id}").as_str()), "the runner was told: {lines:?}");

    let runner = crate::runners(&server, "cancel", &[])[0]["id"].as_str().unwrap().to_owned();
    let log = server.run(&["runners", "logs", &runner]).ok().stdout;
    let never = waiting["request_id"].as_str().unwrap();
    assert!(!log.contains(never), "the cancelled request reached the runner:\n{log}");
    let reply = cancel(&running);
    assert_eq!((reply.status, reply.json()["error"]["code"].as_str()), (400, Some("already_completed")));
}

#[test]
fn the_queue_api_checks_what_it_is_given_streams_status_and_calls_webhooks() {
    // The webhook below listens on this machine's loopback, which only a server that
    // allows private webhook addresses may call.
    let server = server_with(&["--queue-max-payload", "1000", "--queue-retention", "3", "--webhook-allow-private"]);
    let app = testapp_dir("contract", "");
    server.run(&["deploy", app.path_str()]).ok();
    let http = Http::new();
    let key = Some(server.root_key.as_str());

    let big = http.send("POST", &queue_url(&server, "contract", "/echo"), key, &[], vec![b'x'; 2000]);
    assert_eq!((big.status, big.json()["error"]["code"].as_str()), (413, Some("payload_too_large")), "{}", big.text());
    let nobody = http.send("POST", &queue_url(&server, "contract", "/echo"), None, &[], vec![]);
    assert_eq!(nobody.status, 401);
    let other =
        server.run(&["teams", "create", "other", "--json"]).ok().json()["key"]["key"].as_str().unwrap().to_owned();
    let stranger = http.send("POST", &queue_url(&server, "contract", "/echo"), Some(&other), &[], vec![]);
    // Another team's key finds no such app (nor learns that it exists).
    assert_eq!(stranger.status, 404, "{}", stranger.text());
    let missing = http.get(&queue_url(&server, "contract", &format!("/requests/{}/status", uuid::Uuid::new_v4())), key);
    assert_eq!((missing.status, missing.json()["error"]["code"].as_str()), (404, Some("request_not_found")));
    let bad_hook =
        http.send("POST", &queue_url(&server, "contract", "/echo?fal_webhook=ftp%3A%2F%2Fx"), key, &[], vec![]);
    assert_eq!(bad_hook.status, 400, "{}", bad_hook.text());

    // A result asked for too early; then the status as server-sent events.
    let slow = submit(&http, &server, "contract", "/slow?delay_ms=800", &json!({}));
    let early = result(&http, &server, &slow);
    assert_eq!((early.status, early.json()["error"]["code"].as_str()), (400, Some("not_completed")));
    let stream = http.get(&format!("{}/stream", slow["status_url"].as_str().unwrap()), key);
    assert_eq!(stream.header("content-type").as_deref(), Some("text/event-stream"));
    let events: Vec<Value> = stream
        .text()
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .map(|data| serde_json::from_str(data).unwrap())
        .collect();
    let states: Vec<&str> = events.iter().map(|e| e["status"].as_str().unwrap()).collect();
    assert!(states.contains(&"IN_PROGRESS") && states.last() == Some(&"COMPLETED"), "{states:?}");

    // The webhook gets the result.
    let hook = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hook_url = format!("http://{}/done", hook.local_addr().unwrap());
    let received = std::thread::spawn(move || receive_one_post(&hook));
    let encoded: String = hook_url.bytes().map(|b| format!("%{b:02X}")).collect();
    let hooked =
        submit(&http, &server, "contract", &format!("/echo?fal_webhook={encoded}"), &json!({ "hello": "hook" }));
    let delivered = received.join().unwrap();
    assert_eq!(delivered["request_id"], hooked["request_id"]);
    assert_eq!((delivered["status"].as_str(), &delivered["payload"]), (Some("OK"), &json!({ "hello": "hook" })));

    // Results are kept for the retention time, then gone.
    completed(&http, &server, &hooked);
    wait_until("the result to expire", || {
        let reply = http.get(hooked["status_url"].as_str().unwrap(), key);
        (reply.status == 404).then_some(())
    });
}

/// Accepts one HTTP POST on `listener`, answers 200, and returns its JSON body.
fn receive_one_post(listener: &std::net::TcpListener) -> Value {
    use std::io::{BufRead, BufReader, Read, Write};
    listener.set_nonblocking(false).unwrap();
    let (mut stream, _) = listener.accept().unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").unwrap();
    serde_json::from_slice(&body).unwrap()
}

#[test]
fn queued_requests_wait_through_a_suspension_and_a_graceful_restart() {
    let mut server = server();
    let app = testapp_dir("paused", "[scaling]\nmax_concurrency = 1\n[runner]\nmax_multiplexing = 1\n");
    server.run(&["deploy", app.path_str()]).ok();
    let http = Http::new();
    server.run(&["apps", "suspend", "paused"]).ok();
    let refused = http.send("POST", &queue_url(&server, "paused", "/echo"), Some(&server.root_key), &[], vec![]);
    assert_eq!((refused.status, refused.json()["error"]["code"].as_str()), (503, Some("suspended")));
    server.run(&["apps", "resume", "paused"]).ok();
    let ids: Vec<String> = (0..5)
        .map(|n| {
            let submitted = submit(&http, &server, "paused", "/work?delay_ms=400", &json!({ "n": n }));
            submitted["request_id"].as_str().unwrap().to_owned()
        })
        .collect();
    server.run(&["apps", "suspend", "paused"]).ok();

    // A status stream is open while the server stops: it ends, and the server exits.
    let mut stream = open_stream(&server, &format!("/queue/default/paused/requests/{}/status/stream", ids[4]));
    let stopping = std::thread::spawn(move || {
        let status = server.stop();
        (server, status)
    });
    wait_until("the server to stop while a stream is open", || stopping.is_finished().then_some(()));
    let (mut server, status) = stopping.join().unwrap();
    assert!(status.success(), "{}", server.output());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stream, &mut rest).expect("the stream ends with the server");

    server.restart();
    let waiting = by_id(&http, &server, "paused", &ids[4], "/status");
    assert_eq!(waiting["status"], "IN_QUEUE", "it waits while the app is suspended: {waiting}");
    server.run(&["apps", "resume", "paused"]).ok();
    for id in &ids {
        let status = wait_until("every request to complete", || {
            let status = by_id(&http, &server, "paused", id, "/status");
            (status["status"] == "COMPLETED").then_some(status)
        });
        assert_eq!(status["error"], Value::Null, "{status}");
    }
}

/// Opens a server-sent-events stream on the gateway and reads until its first event.
fn open_stream(server: &TestServer, path: &str) -> std::net::TcpStream {
    use std::io::{Read, Write};
    let addr = server.gateway_url.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Key {}\r\n\r\n", server.root_key);
    stream.write_all(request.as_bytes()).unwrap();
    let mut seen = Vec::new();
    let mut buf = [0; 4096];
    while !String::from_utf8_lossy(&seen).contains("data:") {
        let n = stream.read(&mut buf).expect("the stream sends its first event");
        assert!(n > 0, "the stream closed early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    stream
}

#[test]
fn webhooks_into_the_machine_or_its_networks_are_refused_and_redirects_not_followed() {
    let server = server();
    server.run(&["deploy", testapp_dir("hooked", "").path_str(), "--auth", "public"]).ok();
    let http = Http::new();
    let hook = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = hook.local_addr().unwrap().port();
    let api_port = server.api_url.rsplit(':').next().unwrap().to_owned();
    let cases = [
        (format!("http://127.0.0.1:{port}/done"), "loopback"),
        (format!("http://localhost:{port}/done"), "loopback"),
        (format!("http://127.0.0.1:{api_port}/v1/apps"), "loopback"),
        (format!("http://[::1]:{port}/"), "loopback"),
        ("http://169.254.169.254/latest/meta-data/".to_owned(), "link-local"),
        ("http://10.0.0.1/".to_owned(), "private"),
        ("http://192.168.1.1:8080/".to_owned(), "private"),
    ];
    for (url, rule) in cases {
        let encoded: String = url.bytes().map(|b| format!("%{b:02X}")).collect();
        let reply = http.send(
            "POST",
            &queue_url(&server, "hooked", &format!("/echo?fal_webhook={encoded}")),
            None,
            &[],
            b"{}".to_vec(),
        );
        assert_eq!(reply.status, 400, "{url}: {}", reply.text());
        let message = reply.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(message.contains(rule) && message.contains("--webhook-allow-private"), "{url}: {message}");
    }

    // With private addresses allowed, a webhook that answers with a redirect is not followed.
    let open = server_with(&["--webhook-allow-private"]);
    open.run(&["deploy", testapp_dir("hooked", "").path_str(), "--auth", "public"]).ok();
    let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    target.set_nonblocking(true).unwrap();
    let redirect_to = format!("http://{}/stolen", target.local_addr().unwrap());
    let redirected = std::thread::spawn(move || answer_twice_with_redirect(&hook, &redirect_to));
    let url = format!("http://127.0.0.1:{port}/done");
    let encoded: String = url.bytes().map(|b| format!("%{b:02X}")).collect();
    let hooked = submit(&http, &open, "hooked", &format!("/echo?fal_webhook={encoded}"), &json!({ "x": 1 }));
    completed(&http, &open, &hooked);
    // A redirect is an answer that did not take the result: the queue tries again later
    // (the second request), and the redirect's target has seen nothing by then.
    redirected.join().unwrap();
    assert!(matches!(target.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock));
}

/// Accepts two HTTP requests on `listener` (a delivery and its retry) and answers each
/// with a redirect to `location`.
fn answer_twice_with_redirect(listener: &std::net::TcpListener, location: &str) {
    for _ in 0..2 {
        answer_with_redirect(listener, location);
    }
}

fn answer_with_redirect(listener: &std::net::TcpListener, location: &str) {
    use std::io::{BufRead, BufReader, Write};
    let (mut stream, _) = listener.accept().unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
        line.clear();
    }
    let answer = format!(
        "HTTP/1.1 307 Temporary Redirect\r\nlocation: {location}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    );
    stream.write_all(answer.as_bytes()).unwrap();
}

#[test]
fn apps_queue_counts_requests_and_a_flush_cancels_only_the_waiting_ones() {
    let server = server();
    let app =
        testapp_dir("backlog", "[scaling]\nmin_concurrency = 1\nmax_concurrency = 1\n[runner]\nmax_multiplexing = 1\n");
    server.run(&["deploy", app.path_str()]).ok();
    let http = Http::new();
    let running = submit(&http, &server, "backlog", "/slow?delay_ms=60000", &json!({}));
    wait_until("the first request to run", || {
        (status(&http, &server, &running)["status"] == "IN_PROGRESS").then_some(())
    });
    let waiting: Vec<Value> = (0..4).map(|_| submit(&http, &server, "backlog", "/later", &json!({}))).collect();
    let queue = server.run(&["apps", "queue", "backlog", "--json"]).ok().json();
    assert_eq!((queue["in_queue"].as_u64(), queue["in_progress"].as_u64()), (Some(4), Some(1)), "{queue}");
    assert!(queue["oldest_waiting_seconds"].as_f64().unwrap() >= 0.0, "{queue}");
    let table = server.run(&["apps", "queue", "backlog"]).ok().stdout;
    assert!(table.contains("IN QUEUE") && table.contains("OLDEST WAITING"), "{table}");

    // Without --yes and with no terminal to ask on, nothing is cancelled.
    let out = server.run(&["apps", "queue", "backlog", "--flush"]).failed();
    assert!(out.stderr.contains("--yes"), "{}", out.stderr);
    assert_eq!(server.run(&["apps", "queue", "backlog", "--json"]).ok().json()["in_queue"], 4);

    let flushed = server.run(&["apps", "queue", "backlog", "--flush", "--yes", "--json"]).ok().json();
    assert_eq!((flushed["cancelled"].as_u64(), flushed["in_queue"].as_u64()), (Some(4), Some(0)), "{flushed}");
    assert_eq!(flushed["in_progress"], 1, "the running request goes on");
    assert_eq!(flushed["oldest_waiting_seconds"], Value::Null);
    for request in &waiting {
        let done = status(&http, &server, request);
        assert_eq!(
            (done["status"].as_str(), done["error_type"].as_str()),
            (Some("COMPLETED"), Some("request_cancelled"))
        );
    }
    assert_eq!(status(&http, &server, &running)["status"], "IN_PROGRESS");
    let history = server.run(&["apps", "history", "backlog", "--json"]).ok().json();
    assert_eq!(history[0]["action"], "queue_flush");
    assert!(history[0]["details"].as_str().unwrap().contains("4 waiting requests"), "{history}");
}
