//! `/metrics` as scrapers read it: the Prometheus text format 0.0.4 that `promtool`
//! checks, and OpenMetrics for a scraper that asks, as a real Prometheus does.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{Value, json};
use testkit::{Http, TestServer, wait_until};

use crate::queue::{completed, submit};
use crate::{app_url, server, testapp_dir};

/// A server whose app has served calls (one a 500), a queue request and a cold start.
fn busy_server() -> TestServer {
    let server = server();
    // No runner is kept idle: the first call starts one.
    let app = testapp_dir("web", "env = { FAIL_EVERY = \"3\" }\n[scaling]\nkeep_alive = 0\n");
    server.run(&["deploy", app.path_str()]).ok();
    wait_until("the deploy's runner to stop", || crate::runners(&server, "web", &[]).is_empty().then_some(()));
    let http = Http::new();
    for _ in 0..3 {
        http.get(&app_url(&server, "web", "/"), Some(&server.root_key));
    }
    let submitted = submit(&http, &server, "web", "/", &json!({"prompt": "hi"}));
    completed(&http, &server, &submitted);
    server
}

/// What `promtool check metrics` says of `text`: its exit status and its complaints.
fn promtool(text: &str) -> (i32, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is missing: scripts/test.sh installs it (Debian package prometheus)");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), said)
}

fn scrape(server: &TestServer, accept: Option<&str>) -> (String, String) {
    let headers: Vec<(&str, &str)> = accept.map(|a| ("accept", a)).into_iter().collect();
    let url = format!("{}/metrics", server.api_url);
    let reply = Http::new().send("GET", &url, Some(&server.root_key), &headers, Vec::new());
    assert_eq!(reply.status, 200, "{}", reply.text());
    (reply.header("content-type").unwrap_or_default(), reply.text())
}

#[test]
fn promtool_passes_the_prometheus_text_format_and_openmetrics_comes_when_asked() {
    let server = busy_server();
    let (kind, text) = scrape(&server, None);
    assert_eq!(kind, "text/plain; version=0.0.4; charset=utf-8");
    for series in ["hangar_calls_total{", "hangar_cold_starts_total{", "hangar_call_duration_seconds_bucket{"] {
        assert!(text.contains(series), "{series} not in:\n{text}");
    }
    assert!(text.contains("# TYPE hangar_calls_total counter"), "{text}");
    assert!(!text.contains("# EOF"), "{text}");
    assert_eq!(promtool(&text), (0, String::new()), "promtool on:\n{text}");
    // A team's own view is valid too.
    let key =
        server.run(&["keys", "create", "--scope", "admin", "--json"]).ok().json()["key"].as_str().unwrap().to_owned();
    let reply = Http::new().get(&format!("{}/metrics", server.api_url), Some(&key));
    assert_eq!(promtool(&reply.text()), (0, String::new()), "promtool on:\n{}", reply.text());

    let (kind, open) = scrape(&server, Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5"));
    assert_eq!(kind, "application/openmetrics-text; version=1.0.0; charset=utf-8");
    assert!(open.ends_with("# EOF\n"), "{open}");
    assert!(open.contains("# TYPE hangar_calls counter\n"), "{open}");
    // promtool reads only the 0.0.4 format: on OpenMetrics its one complaint is that a
    // counter's `_total` samples are not the family its help names, which is how
    // OpenMetrics names them. Nothing else is wrong, and it parses.
    let (code, said) = promtool(&open);
    let complaints: Vec<&str> = said.lines().filter(|l| !l.ends_with("_total no help text")).collect();
    assert!(code == 0 || code == 3, "promtool could not parse OpenMetrics ({code}): {said}");
    assert!(complaints.is_empty(), "{said}");
}

/// A free port on the loopback.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn a_real_prometheus_scrapes_openmetrics_and_reads_the_counters_as_counters() {
    let server = busy_server();
    let dir = tempfile::tempdir().unwrap();
    let target = server.api_url.trim_start_matches("http://");
    let config = format!(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: hangar\n    authorization:\n      type: Key\n      \
         credentials: {}\n    static_configs:\n      - targets: ['{target}']\n",
        server.root_key
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    let port = free_port();
    let _prometheus = Stopped(
        Command::new("prometheus")
            .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus is missing: scripts/test.sh installs it (Debian package prometheus)"),
    );
    let api = format!("http://127.0.0.1:{port}/api/v1");
    let http = Http::new();
    let get = |path: &str| -> Option<Value> {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        let reply = http.get(&format!("{api}/{path}"), None);
        (reply.status == 200).then(|| reply.json())
    };
    let counter = wait_until("Prometheus to have scraped the counters", || {
        let metadata = get("metadata?metric=hangar_calls")?;
        metadata["data"]["hangar_calls"].as_array().filter(|m| !m.is_empty()).cloned()
    });
    assert_eq!(counter[0]["type"], "counter", "{counter:?}");
    let targets = get("targets").unwrap();
    let target = &targets["data"]["activeTargets"][0];
    assert_eq!(target["health"], "up", "{target}");
    let calls = wait_until("the calls in a query", || {
        let query = get("query?query=sum(hangar_calls_total)")?;
        query["data"]["result"][0]["value"][1].as_str()?.parse::<f64>().ok()
    });
    assert!(calls >= 3.0, "three calls at least: {calls}");
    let cold = get("metadata?metric=hangar_cold_starts").unwrap();
    assert_eq!(cold["data"]["hangar_cold_starts"][0]["type"], "counter", "{cold}");
}

/// A process that is killed (by its pid) when the test ends, however it ends.
struct Stopped(std::process::Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
