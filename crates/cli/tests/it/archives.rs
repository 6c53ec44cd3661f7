//! Hostile uploads, sent straight to the API (the CLI never makes them): each is
//! refused with a message naming the entry, creates nothing, and writes nothing
//! outside its revision's directory.

use api::wire::DeployParams;
use testkit::TestServer;

use crate::{runtime, server};

const MANIFEST: &[u8] = b"name = \"hostile\"\ncommand = [\"python3\", \"s.py\"]\n";

enum Entry<'a> {
    File(&'a str, &'a [u8]),
    Symlink(&'a str, &'a str),
    HardLink(&'a str, &'a str),
    CharDevice(&'a str),
}

/// Builds a gzip'd tar byte by byte, so that names the `tar` crate would refuse to
/// write (`..`, absolute paths) can be made.
fn hostile_archive(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    for entry in std::iter::once(&Entry::File("hangar.toml", MANIFEST)).chain(entries) {
        let mut header = tar::Header::new_gnu();
        let (path, data, kind, link): (&str, &[u8], tar::EntryType, Option<&str>) = match entry {
            Entry::File(p, d) => (p, d, tar::EntryType::Regular, None),
            Entry::Symlink(p, t) => (p, b"", tar::EntryType::Symlink, Some(t)),
            Entry::HardLink(p, t) => (p, b"", tar::EntryType::Link, Some(t)),
            Entry::CharDevice(p) => (p, b"", tar::EntryType::Char, None),
        };
        let name = &mut header.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        if let Some(link) = link {
            header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        header.set_entry_type(kind);
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append(&header, data).unwrap();
    }
    builder.into_inner().unwrap().finish().unwrap()
}

fn upload(server: &TestServer, archive: Vec<u8>) -> api::client::ClientError {
    runtime()
        .block_on(server.client().deploy(&DeployParams::default(), archive))
        .expect_err("the upload must be refused")
}

/// Every file under `dir`.
fn files_under(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if entry.file_type().unwrap().is_dir() {
                stack.push(path.clone());
            }
            out.push(path.strip_prefix(dir).unwrap().display().to_string());
        }
    }
    out.sort();
    out
}

#[test]
fn hostile_archives_are_refused_naming_the_entry() {
    let server = server();
    let before = files_under(&server.data_dir());
    let cases: Vec<(Vec<Entry<'_>>, &str, &str)> = vec![
        (vec![Entry::File("../evil.txt", b"x")], "invalid_archive", "\"../evil.txt\""),
        (vec![Entry::File("sub/../../evil.txt", b"x")], "invalid_archive", "sub/../../evil.txt"),
        (vec![Entry::File("/tmp/hangar-evil.txt", b"x")], "invalid_archive", "absolute path"),
        (vec![Entry::Symlink("passwd", "/etc/passwd")], "invalid_archive", "\"passwd\" is a symlink"),
        (vec![Entry::Symlink("up", "../../../../etc/passwd")], "invalid_archive", "outside the app directory"),
        (vec![Entry::HardLink("hl", "../../etc/passwd")], "invalid_archive", "\"hl\" is a hard link"),
        (vec![Entry::CharDevice("dev")], "invalid_archive", "character device"),
    ];
    for (entries, code, message) in cases {
        let err = upload(&server, hostile_archive(&entries));
        assert_eq!(err.code(), Some(code), "{err}");
        assert_eq!(err.status(), Some(400));
        assert!(err.to_string().contains(message), "expected {message:?} in {err}");
    }
    assert!(!std::path::Path::new("/tmp/hangar-evil.txt").exists());
    // Nothing was created or left behind: no app, no revision dir, no artifact, and no
    // file anywhere in (or next to) the data dir that was not there before.
    assert_eq!(files_under(&server.data_dir()), before);
    assert!(!server.data_dir().join("../evil.txt").exists());
    assert_eq!(server.run(&["apps", "list", "--json"]).ok().json(), serde_json::json!([]));
}

#[test]
fn oversize_archives_are_refused() {
    let server = crate::server_with(&["--max-unpacked-bytes", "100000", "--max-upload-bytes", "50000"]);
    // Compresses well: small upload, large when unpacked.
    let zeros = vec![0u8; 200_000];
    let err = upload(&server, hostile_archive(&[Entry::File("weights.bin", &zeros)]));
    assert_eq!(err.code(), Some("archive_too_large"), "{err}");
    assert_eq!(err.status(), Some(413));
    assert!(err.to_string().contains("100000"), "{err}");
    // Does not compress: the upload itself is too large.
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let noise: Vec<u8> = (0..90_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let err = upload(&server, hostile_archive(&[Entry::File("noise.bin", &noise)]));
    assert_eq!(err.code(), Some("archive_too_large"), "{err}");
    assert!(err.to_string().contains("50000"), "{err}");
    assert_eq!(crate::artifact_count(&server), 0);
    assert_eq!(std::fs::read_dir(server.data_dir().join("revisions")).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(server.data_dir().join("tmp")).unwrap().count(), 0);
}

#[test]
fn garbage_uploads_are_refused() {
    let server = server();
    let err = upload(&server, b"this is not a tarball".to_vec());
    assert_eq!(err.code(), Some("invalid_archive"), "{err}");
    let err = upload(&server, Vec::new());
    assert_eq!(err.code(), Some("invalid_archive"), "{err}");
}

/// Through the CLI: a symlink in the app directory that points outside it.
#[test]
fn cli_deploy_of_a_symlink_leaving_the_tree_fails() {
    let server = server();
    let app = crate::app_with_build("links", "true");
    std::os::unix::fs::symlink("/etc/passwd", app.path().join("passwd")).unwrap();
    let out = server.run(&["deploy", app.path_str()]).failed();
    assert!(out.stderr.contains("\"passwd\" is a symlink") && out.stderr.contains("/etc/passwd"), "{}", out.stderr);
}
