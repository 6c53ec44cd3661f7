//! The OpenAPI document of the control API, schemathesis run against it, and the
//! regression tests of what that run found: malformed requests answered with the JSON
//! error body and a 4xx, never a plain-text rejection or a 500.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use serde_json::{Value, json};
use testkit::{Http, Reply, TestServer};

use crate::{app_with_build, runtime, server, testapp_dir};

/// The seed of the schemathesis run, so that every run tries the same cases. Another
/// seed tries others (`HANGAR_SCHEMATHESIS_SEED`), which is how to look for more.
const SEED: &str = "1";

/// `tests/openapi`: schemathesis's settings and hooks.
fn openapi_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/openapi")
}

/// The schemathesis of the virtualenv `scripts/test.sh` makes.
fn schemathesis() -> PathBuf {
    crate::venv_bin("HANGAR_SCHEMATHESIS", "schemathesis-venv", "schemathesis", "tests/openapi/requirements.txt")
}

fn url(server: &TestServer, path: &str) -> String {
    format!("{}{path}", server.api_url)
}

/// Fails unless `reply` is the API's JSON error body with `status` and `code`; returns
/// its message.
#[track_caller]
fn api_error(reply: &Reply, status: u16, code: &str) -> String {
    assert_eq!(reply.status, status, "{}", reply.text());
    assert_eq!(reply.header("content-type").as_deref(), Some("application/json"), "{}", reply.text());
    let body = reply.json();
    assert_eq!(body["error"]["code"], code, "{body}");
    body["error"]["message"].as_str().expect("an error message").to_owned()
}

/// A request whose headers may hold any bytes, which `Http` (taking `&str`) cannot send.
fn get_with_raw_header(url: &str, key: Option<&str>, name: &str, value: &[u8]) -> Reply {
    let value = reqwest::header::HeaderValue::from_bytes(value).expect("a header value");
    runtime().block_on(async {
        let mut request = reqwest::Client::new().get(url).header(name, value);
        if let Some(key) = key {
            request = request.header("authorization", format!("Key {key}"));
        }
        let response = request.send().await.expect("the request is answered");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.bytes().await.expect("a body").to_vec();
        Reply { status, headers, body }
    })
}

#[test]
fn the_document_describes_every_operation_and_needs_no_key() {
    let server = server();
    let http = Http::new();
    let reply = http.get(&url(&server, "/v1/openapi.json"), None);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("content-type").as_deref(), Some("application/json"));
    let document = reply.json();
    assert_eq!(document["openapi"], "3.1.0");
    assert_eq!(
        document["components"]["securitySchemes"]["api_key"],
        json!({"type": "apiKey", "in": "header", "name": "Authorization",
               "description": document["components"]["securitySchemes"]["api_key"]["description"]})
    );
    let mut operations = Vec::new();
    for (path, item) in document["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().expect("a path item") {
            operations.push(format!("{} {path}", method.to_uppercase()));
            // /metrics takes a key unless the server was started with --metrics-public.
            let public = (!path.starts_with("/v1/") && path != "/metrics") || path == "/v1/openapi.json";
            let security = &operation["security"];
            if public {
                assert!(security.is_null(), "{method} {path} is public but says it needs {security}");
            } else {
                assert_eq!(security, &json!([{"api_key": []}]), "{method} {path}");
            }
            // Every error is the JSON error body.
            for range in ["4XX", "5XX"] {
                assert_eq!(operation["responses"][range]["$ref"], "#/components/responses/Error", "{method} {path}");
            }
        }
    }
    // A sample of each kind; the router is built from the documented handlers, so the
    // rest cannot be missing.
    for expected in [
        "GET /healthz",
        "GET /v1/apps",
        "POST /v1/apps/{app}/traffic",
        "POST /v1/deploys",
        "PUT /v1/secrets",
        "GET /v1/apps/{app}/charts",
    ] {
        assert!(operations.iter().any(|o| o == expected), "{expected} is not documented: {operations:?}");
    }
    assert_eq!(operations.len(), 39, "{operations:#?}");
}

/// schemathesis generates requests from the document, valid and invalid ones, and checks
/// every answer: no 5xx, statuses, content types, headers and bodies as documented,
/// invalid requests refused, valid ones taken, authentication enforced, 405 with
/// `Allow` for other methods. Any failure fails the test.
#[test]
fn schemathesis_finds_no_failure_in_the_api() {
    let server = server();
    // Something for the listings to show, so that their answers are checked too.
    let app = testapp_dir("fixture", "");
    server.run(&["deploy", app.path_str()]).ok();
    server.run(&["secrets", "set", "GREETING=hello"]).ok();
    let key = server.run(&["keys", "create", "--scope", "admin", "--desc", "schemathesis", "--json"]).ok().json();
    let home = tempfile::tempdir().unwrap();
    let seed = std::env::var("HANGAR_SCHEMATHESIS_SEED").unwrap_or_else(|_| SEED.to_owned());
    let started = Instant::now();
    let out = testkit::run_command(
        Command::new(schemathesis())
            .arg("--config-file")
            .arg(openapi_dir().join("schemathesis.toml"))
            .arg("--no-color")
            .args(["run", &url(&server, "/v1/openapi.json"), "--seed", &seed])
            .arg("--header")
            .arg(format!("Authorization: Key {}", key["key"].as_str().unwrap()))
            // schemathesis and hypothesis keep files in the working directory.
            .current_dir(home.path())
            .env("HOME", home.path())
            .env("SCHEMATHESIS_HOOKS", openapi_dir().join("hooks.py"))
            .env("HANGAR_OPENAPI_KEY_ID", key["id"].as_str().unwrap())
            .stdin(Stdio::null()),
    );
    let report = format!("{}\n{}", out.stdout, out.stderr);
    assert!(out.success(), "schemathesis found failures (seed {seed}):\n{report}");
    // "Selected: 29/29", "Tested: 29", "1229 generated, 1229 passed, 34 skipped"
    let figure = |label: &str| {
        let line = report.lines().find_map(|l| l.trim().strip_prefix(label)).unwrap_or_default();
        line.trim().to_owned()
    };
    let operations = figure("Tested:");
    assert_eq!(figure("Selected:"), format!("{operations}/{operations}"), "not every operation was tested:\n{report}");
    let cases = report.lines().find(|l| l.contains(" generated, ")).unwrap_or_default().trim();
    assert!(cases.contains(" passed") && !cases.contains("fail"), "{report}");
    eprintln!("schemathesis, seed {seed}: {operations} operations, {cases}, in {:.1?}", started.elapsed());
}

#[test]
fn malformed_paths_queries_and_bodies_get_the_json_error_body() {
    let server = server();
    let http = Http::new();
    let key = Some(server.root_key.as_str());
    let send = |method: &str, path: &str, headers: &[(&str, &str)], body: &str| {
        http.send(method, &url(&server, path), key, headers, body.as_bytes().to_vec())
    };
    let json = [("content-type", "application/json")];

    // A path parameter that is not UTF-8 once decoded.
    let message = api_error(&send("GET", "/v1/apps/%FF", &[], ""), 400, "invalid_request");
    assert!(message.contains("`app`"), "{message}");
    // A query parameter of the wrong type.
    let message = api_error(&send("GET", "/v1/apps/x/revisions?limit=many", &[], ""), 400, "invalid_request");
    assert!(message.contains("limit"), "{message}");
    let message = api_error(&send("GET", "/v1/runners?since=-1", &[], ""), 400, "invalid_request");
    assert!(message.contains("since"), "{message}");
    // A body that is not JSON, or JSON of the wrong shape.
    let message = api_error(&send("POST", "/v1/keys", &json, "{"), 400, "invalid_request");
    assert!(message.contains("EOF"), "{message}");
    let message =
        api_error(&send("POST", "/v1/keys", &json, r#"{"scope": "api", "description": 5}"#), 400, "invalid_request");
    assert!(message.contains("description"), "{message}");
    let message =
        api_error(&send("POST", "/v1/keys", &json, r#"{"scope": "api", "colour": "red"}"#), 400, "invalid_request");
    assert!(message.contains("colour"), "{message}");
    // A body without its content type.
    let message = api_error(&send("POST", "/v1/keys", &[], r#"{"scope": "api"}"#), 415, "unsupported_media_type");
    assert!(message.contains("application/json"), "{message}");
    // No such route.
    api_error(&send("GET", "/v1/nothing-here", &[], ""), 404, "not_found");
}

#[test]
fn a_json_body_over_2_mib_is_refused_with_413() {
    let server = server();
    let create_key = |body: Vec<u8>| {
        Http::new().send(
            "POST",
            &url(&server, "/v1/keys"),
            Some(&server.root_key),
            &[("content-type", "application/json")],
            body,
        )
    };
    let description = "x".repeat(3 << 20);
    let body = serde_json::to_vec(&json!({"scope": "api", "description": description})).unwrap();
    let reply = create_key(body);
    let message = api_error(&reply, 413, "payload_too_large");
    assert!(message.contains("2 MiB"), "{message}");
    // Just under the limit is read (and then refused for what it says).
    let body = serde_json::to_vec(&json!({"scope": "api", "description": "x".repeat((2 << 20) - 100)})).unwrap();
    let reply = create_key(body);
    let message = api_error(&reply, 400, "invalid_request");
    assert!(message.contains("longer than 500 characters"), "{message}");
}

#[test]
fn a_method_a_route_does_not_take_is_405_with_allow() {
    let server = server();
    let http = Http::new();
    for (method, path, allow) in [
        ("PUT", "/v1/apps", "GET,HEAD"),
        ("PATCH", "/v1/keys", "GET,HEAD,POST"),
        ("POST", "/healthz", "GET,HEAD"),
        ("DELETE", "/v1/openapi.json", "GET,HEAD"),
    ] {
        let reply = http.send(method, &url(&server, path), Some(&server.root_key), &[], Vec::new());
        api_error(&reply, 405, "method_not_allowed");
        assert_eq!(reply.header("allow").as_deref(), Some(allow), "{method} {path}");
    }
}

#[test]
fn a_team_header_that_is_not_ascii_is_refused_with_400() {
    let server = server();
    let apps = url(&server, "/v1/apps");
    let reply = get_with_raw_header(&apps, Some(&server.root_key), "x-hangar-team", b"t\xc3\xa9am");
    let message = api_error(&reply, 400, "invalid_request");
    assert!(message.contains("X-Hangar-Team"), "{message}");
    // Without a valid key, the key is what is wrong.
    let reply = get_with_raw_header(&apps, None, "x-hangar-team", b"t\xc3\xa9am");
    api_error(&reply, 401, "unauthorized");
    // An Authorization header that is not ASCII is no key either.
    let reply = get_with_raw_header(&apps, None, "authorization", b"Key \xc3\xa9:secret");
    let message = api_error(&reply, 401, "unauthorized");
    assert!(message.contains("Authorization"), "{message}");
    // An ASCII team that does not exist is named as such.
    let reply = get_with_raw_header(&apps, Some(&server.root_key), "x-hangar-team", b"nobody");
    api_error(&reply, 404, "team_not_found");
}

#[test]
fn key_descriptions_are_limited_in_characters_not_bytes() {
    let server = server();
    let client = server.client();
    let runtime = runtime();
    // 500 characters of two bytes each: within the limit the document states.
    let longest = "é".repeat(500);
    let key = runtime.block_on(client.create_key("api", Some(longest.clone()))).expect("500 characters are taken");
    let listed = runtime.block_on(client.list_keys()).unwrap();
    let listed = listed.iter().find(|k| k.id == key.id).expect("the new key is listed");
    assert_eq!(listed.description.as_deref(), Some(longest.as_str()));
    let err = runtime.block_on(client.create_key("api", Some("é".repeat(501)))).unwrap_err();
    assert_eq!((err.status(), err.code()), (Some(400), Some("invalid_request")), "{err}");
    assert!(err.to_string().contains("longer than 500 characters"), "{err}");
}

#[test]
fn a_build_log_offset_past_the_end_reads_nothing() {
    let server = server();
    let app = app_with_build("logged", "echo building");
    server.run(&["deploy", app.path_str()]).ok();
    let revision = crate::revisions(&server, "logged")[0]["id"].as_str().unwrap().to_owned();
    let http = Http::new();
    let log = |offset: &str| {
        http.get(
            &url(&server, &format!("/v1/apps/logged/revisions/{revision}/log?offset={offset}")),
            Some(&server.root_key),
        )
    };
    let start = log("0").json();
    assert!(start["data"].as_str().unwrap().contains("building"), "{start}");
    // Offsets a file cannot seek to (past i64::MAX) once answered 500.
    for offset in [i64::MAX as u64 - 1, i64::MAX as u64, i64::MAX as u64 + 1, u64::MAX] {
        let reply = log(&offset.to_string());
        assert_eq!(reply.status, 200, "offset {offset}: {}", reply.text());
        assert_eq!(reply.json(), json!({"data": "", "next_offset": offset}), "offset {offset}");
    }
    // Past u64, it is no offset at all.
    let message = api_error(&log("18446744073709551616"), 400, "invalid_request");
    assert!(message.contains("offset"), "{message}");
}

#[test]
fn scale_takes_whole_numbers_written_with_a_zero_fraction() {
    let server = server();
    let app = testapp_dir("scaled", "");
    server.run(&["deploy", app.path_str()]).ok();
    let http = Http::new();
    let scale = |body: &str| {
        http.send(
            "POST",
            &url(&server, "/v1/apps/scaled/scale"),
            Some(&server.root_key),
            &[("content-type", "application/json")],
            body.as_bytes().to_vec(),
        )
    };
    // 30.0 is the JSON number 30, and an integer to JSON Schema.
    let reply = scale(r#"{"keep_alive": 30.0, "max_multiplexing": 2.0}"#);
    assert_eq!(reply.status, 200, "{}", reply.text());
    let scaled: Value = reply.json();
    assert_eq!((scaled["app"]["keep_alive"].as_u64(), scaled["app"]["max_multiplexing"].as_u64()), (Some(30), Some(2)));
    // A fraction, a sign, a string or a value past the type's range is not a whole number.
    for (body, named) in [
        (r#"{"keep_alive": 30.5}"#, "keep_alive"),
        (r#"{"keep_alive": -1}"#, "keep_alive"),
        (r#"{"keep_alive": "30"}"#, "keep_alive"),
        (r#"{"min_concurrency": 4294967296}"#, "min_concurrency"),
        (r#"{"min_concurrency": 1e10}"#, "min_concurrency"),
    ] {
        let message = api_error(&scale(body), 400, "invalid_request");
        assert!(message.contains(named), "{body}: {message}");
    }
    // Query strings read whole numbers the same way.
    let get = |path: &str| http.get(&url(&server, path), Some(&server.root_key));
    for path in
        ["/v1/apps/scaled/revisions?limit=287.0", "/v1/runners?since=6e1", "/v1/apps/scaled/revisions?limit=287"]
    {
        let reply = get(path);
        assert_eq!(reply.status, 200, "{path}: {}", reply.text());
    }
    let revision =
        server.run(&["apps", "list-rev", "scaled", "--json"]).ok().json()[0]["id"].as_str().unwrap().to_owned();
    let reply = get(&format!("/v1/apps/scaled/revisions/{revision}/log?offset=0.0"));
    assert_eq!(reply.status, 200, "{}", reply.text());
    for (path, named) in [
        ("/v1/apps/scaled/revisions?limit=287.5", "limit"),
        ("/v1/apps/scaled/revisions?limit=-3", "limit"),
        ("/v1/runners?since=1e30", "since"),
        ("/v1/runners?since=ten", "since"),
    ] {
        let message = api_error(&get(path), 400, "invalid_request");
        assert!(message.contains(named), "{path}: {message}");
    }
}

#[test]
fn runner_state_filters_take_spaces_around_commas_only() {
    let server = server();
    let http = Http::new();
    let runners = |state: &str| http.get(&url(&server, &format!("/v1/runners?state={state}")), Some(&server.root_key));
    let reply = runners("idle%20,%20running");
    assert_eq!(reply.status, 200, "{}", reply.text());
    let message = api_error(&runners("idle,%09running"), 400, "invalid_request");
    assert!(message.contains("unknown runner state"), "{message}");
}

/// `hangar keys list | head -1`: once the reader has gone, the CLI ends quietly
/// instead of panicking on the broken pipe. The pipe's read end is closed before the
/// command starts, so that its first write fails every time.
#[test]
fn the_cli_ends_quietly_when_its_reader_has_gone() {
    let server = server();
    for args in [&["keys", "list"][..], &["apps", "list", "--json"], &["completion", "bash"]] {
        let (reader, writer) = nix::unistd::pipe().expect("a pipe");
        drop(reader);
        let out = server.cli().args(args).stdout(Stdio::from(writer)).stderr(Stdio::piped()).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "hangar {args:?} (stderr: {stderr})");
        assert!(stderr.is_empty(), "hangar {args:?} said: {stderr}");
    }
}

/// What a server at `url` answers to `request`, sent as raw bytes: its status and body.
fn raw(url: &str, request: &[u8]) -> (u16, String, String) {
    use std::io::{Read, Write};
    let addr = url.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    stream.write_all(request).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head.to_ascii_lowercase(), body.to_owned())
}

#[test]
fn requests_hyper_cannot_read_get_the_json_error_body_on_both_listeners() {
    let server = server();
    let long = format!("GET /{} HTTP/1.1\r\nhost: x\r\n\r\n", "a".repeat(70_000));
    let many: String = (0..150).map(|n| format!("x-header-{n}: {n}\r\n")).collect();
    let many = format!("GET /default/web/ HTTP/1.1\r\nhost: x\r\n{many}\r\n");
    let cases = [
        (long.as_bytes(), 414, "uri_too_long"),
        (many.as_bytes(), 431, "headers_too_large"),
        (&b"NOT HTTP AT ALL\r\n\r\n"[..], 400, "invalid_request"),
    ];
    for url in [&server.api_url, &server.gateway_url] {
        for (request, status, code) in cases {
            let (got, head, body) = raw(url, request);
            assert_eq!(got, status, "{url}: {head}\n{body}");
            assert!(head.contains("content-type: application/json"), "{url}: {head}");
            let body: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{url}: {e}: {body:?}"));
            assert_eq!(body["error"]["code"], code, "{url}: {body}");
            assert!(!body["error"]["message"].as_str().unwrap().is_empty());
        }
    }
    // A request that hyper reads is answered as before, and the connection goes on.
    let reply = Http::new().get(&format!("{}/healthz", server.api_url), None);
    assert_eq!(reply.status, 200);
}
