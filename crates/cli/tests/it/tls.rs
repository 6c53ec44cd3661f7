//! TLS on the gateway.

use std::path::{Path, PathBuf};

use crate::{server_with, testapp_dir};

/// A self-signed certificate for localhost and 127.0.0.1, and its key, as PEM files in
/// `dir`; the certificate is its own CA.
pub(crate) fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

/// Calls `url` with Python's standard library, trusting `ca`; prints status and body.
fn python_get(url: &str, ca: &std::path::Path) -> testkit::Output {
    let script = "import ssl, sys, urllib.request\n\
                  ctx = ssl.create_default_context(cafile=sys.argv[2])\n\
                  r = urllib.request.urlopen(sys.argv[1], context=ctx, timeout=30)\n\
                  print(r.status, r.read().decode())\n";
    testkit::run_command(std::process::Command::new("python3").args(["-c", script, url, ca.to_str().unwrap()]))
}

#[test]
fn the_gateway_serves_https_with_the_given_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = crate::tls::self_signed(dir.path());

    let server = server_with(&["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()]);
    assert!(server.gateway_url.starts_with("https://"), "{}", server.gateway_url);
    let app = testapp_dir("secure", "");
    server.run(&["deploy", app.path_str(), "--auth", "public"]).ok();

    let out = python_get(&format!("{}/default/secure/hello", server.gateway_url), &cert);
    assert!(out.success(), "{}", out.stderr);
    assert!(out.stdout.starts_with("200 ") && out.stdout.contains("\"path\":\"/hello\""), "{}", out.stdout);
    // Plain HTTP to the TLS port gets no answer.
    let plain = server.gateway_url.replace("https://", "http://");
    let out = python_get(&format!("{plain}/default/secure/hello"), &cert);
    assert!(!out.success());
}

#[test]
fn tls_settings_are_checked_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let bin = crate::BIN;
    let run = |args: &[&str]| {
        testkit::run_command(
            std::process::Command::new(bin)
                .args(["server", "--data-dir", dir.path().join("data").to_str().unwrap()])
                .args(["--api-addr", "127.0.0.1:0", "--gateway-addr", "127.0.0.1:0"])
                .args(args),
        )
    };
    let out = run(&["--tls-cert", "/nonexistent.pem"]).failed();
    assert!(out.stderr.contains("TLS needs both --tls-cert and --tls-key"), "{}", out.stderr);
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let out = run(&["--tls-cert", garbage.to_str().unwrap(), "--tls-key", garbage.to_str().unwrap()]).failed();
    assert!(out.stderr.contains("garbage.pem"), "{}", out.stderr);
}
