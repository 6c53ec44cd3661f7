//! Packing a directory and unpacking the result gives back the files that
//! should be deployed, and packing is deterministic.

use std::collections::BTreeMap;
use std::fs::{self, File, FileTimes, Permissions};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::{Duration, SystemTime};

use archive::{Limits, PackError, pack, unpack};

const LIMITS: Limits = Limits { max_unpacked_bytes: 1 << 20, max_entries: 1000 };

/// Creates an app directory with something of every kind that `pack` has to
/// handle.
fn make_app() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    fs::write(root.join("server.py"), "print('hi')\n").unwrap();
    fs::write(root.join("run.sh"), "#!/bin/sh\nexec python3 server.py\n").unwrap();
    fs::set_permissions(root.join("run.sh"), Permissions::from_mode(0o700)).unwrap();
    fs::create_dir(root.join("sub")).unwrap();
    fs::write(root.join("sub/x.txt"), "x").unwrap();
    fs::write(root.join("sub/debug.log"), "ignored").unwrap();
    fs::write(root.join(".hidden"), "secret-ish").unwrap();
    symlink("server.py", root.join("link")).unwrap();
    fs::write(root.join(".gitignore"), "*.log\n").unwrap();
    fs::write(root.join("app.log"), "ignored").unwrap();
    fs::write(root.join(".hangarignore"), "data/\n").unwrap();
    fs::create_dir(root.join("data")).unwrap();
    fs::write(root.join("data/big.bin"), [0u8; 100]).unwrap();
    fs::create_dir_all(root.join(".git/objects")).unwrap();
    fs::write(root.join(".git/HEAD"), "ref: refs/heads/main\n").unwrap();
    dir
}

/// Describes every entry under `dir` as path -> kind, mode and content.
fn tree(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let rel = path.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        let meta = fs::symlink_metadata(&path).unwrap();
        let mode = meta.permissions().mode() & 0o7777;
        if meta.file_type().is_symlink() {
            let target = fs::read_link(&path).unwrap();
            out.insert(rel, format!("symlink -> {}", target.display()));
        } else if meta.is_dir() {
            out.insert(rel, format!("dir {mode:o}"));
            walk(root, &path, out);
        } else {
            let content = fs::read_to_string(&path).unwrap();
            out.insert(rel, format!("file {mode:o} {content:?}"));
        }
    }
}

#[test]
fn pack_then_unpack_gives_the_deployable_files() {
    let app = make_app();
    let packed = pack(app.path()).unwrap();
    assert_eq!(packed.files, 7);
    let expected_bytes = [
        "print('hi')\n".len(),
        "#!/bin/sh\nexec python3 server.py\n".len(),
        "x".len(),
        "secret-ish".len(),
        "*.log\n".len(),
        "data/\n".len(),
    ]
    .iter()
    .sum::<usize>() as u64;
    assert_eq!(packed.unpacked_bytes, expected_bytes);

    let dest = tempfile::tempdir().unwrap();
    let unpacked = unpack(packed.bytes.as_slice(), dest.path(), &LIMITS).unwrap();
    assert_eq!(unpacked.files, 7);
    assert_eq!(unpacked.bytes, expected_bytes);

    let expected: BTreeMap<String, String> = [
        (".gitignore", r#"file 644 "*.log\n""#),
        (".hangarignore", r#"file 644 "data/\n""#),
        (".hidden", r#"file 644 "secret-ish""#),
        ("link", "symlink -> server.py"),
        ("run.sh", r##"file 755 "#!/bin/sh\nexec python3 server.py\n""##),
        ("server.py", r#"file 644 "print('hi')\n""#),
        ("sub", "dir 755"),
        ("sub/x.txt", r#"file 644 "x""#),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(tree(dest.path()), expected);
}

#[test]
fn archive_entries_are_sorted_and_normalised() {
    let app = make_app();
    let packed = pack(app.path()).unwrap();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(packed.bytes.as_slice()));
    let mut paths = Vec::new();
    for entry in archive.entries().unwrap() {
        let entry = entry.unwrap();
        let header = entry.header();
        assert_eq!(header.mtime().unwrap(), 0);
        assert_eq!(header.uid().unwrap(), 0);
        assert_eq!(header.gid().unwrap(), 0);
        assert_eq!(header.username().unwrap(), Some(""));
        assert_eq!(header.groupname().unwrap(), Some(""));
        paths.push(entry.path().unwrap().to_string_lossy().into_owned());
    }
    assert_eq!(paths, [".gitignore", ".hangarignore", ".hidden", "link", "run.sh", "server.py", "sub", "sub/x.txt"]);
    // The gzip header's mtime field (bytes 4..8) is zero.
    assert_eq!(&packed.bytes[4..8], &[0, 0, 0, 0]);
}

#[test]
fn packing_is_deterministic() {
    let app = make_app();
    let first = pack(app.path()).unwrap();
    let second = pack(app.path()).unwrap();
    assert_eq!(first.bytes, second.bytes);

    // Timestamps and permission bits beyond "executable or not" must not
    // change the archive.
    let later = SystemTime::now() + Duration::from_secs(3600);
    for path in ["server.py", "run.sh", "sub/x.txt"] {
        let file = File::options().write(true).open(app.path().join(path)).unwrap();
        file.set_times(FileTimes::new().set_modified(later).set_accessed(later)).unwrap();
    }
    fs::set_permissions(app.path().join("server.py"), Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(app.path().join("run.sh"), Permissions::from_mode(0o751)).unwrap();
    let third = pack(app.path()).unwrap();
    assert_eq!(first.bytes, third.bytes);

    // The same files in a different directory give the same bytes too.
    let other = make_app();
    assert_eq!(pack(other.path()).unwrap().bytes, first.bytes);

    // But a content change does change them.
    fs::write(app.path().join("server.py"), "print('bye')\n").unwrap();
    assert_ne!(pack(app.path()).unwrap().bytes, first.bytes);
}

#[test]
fn special_files_are_refused_when_packing() {
    let app = make_app();
    let socket = app.path().join("sub/app.sock");
    let _listener = UnixListener::bind(&socket).unwrap();
    let err = pack(app.path()).unwrap_err();
    assert!(matches!(&err, PackError::SpecialFile(p) if *p == socket), "{err:?}");
    assert!(err.to_string().contains("app.sock"), "{err}");

    // An ignored special file is fine, since it is never looked at.
    fs::write(app.path().join(".hangarignore"), "data/\n*.sock\n").unwrap();
    pack(app.path()).unwrap();
}

#[test]
fn packing_a_missing_directory_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let err = pack(&missing).unwrap_err();
    assert!(matches!(&err, PackError::Io { path, .. } if *path == missing), "{err:?}");
    assert!(err.to_string().contains("nope"), "{err}");

    let file = dir.path().join("file");
    fs::write(&file, "x").unwrap();
    assert!(matches!(pack(&file), Err(PackError::Io { .. })));
}

#[test]
fn long_paths_and_empty_directories_survive() {
    let dir = tempfile::tempdir().unwrap();
    let long = "a".repeat(120);
    fs::create_dir_all(dir.path().join(&long).join("empty")).unwrap();
    fs::write(dir.path().join(&long).join("f.txt"), "long").unwrap();
    symlink(format!("{long}/f.txt"), dir.path().join("l")).unwrap();
    let packed = pack(dir.path()).unwrap();

    let dest = tempfile::tempdir().unwrap();
    unpack(packed.bytes.as_slice(), dest.path(), &LIMITS).unwrap();
    assert!(dest.path().join(&long).join("empty").is_dir());
    assert_eq!(fs::read_to_string(dest.path().join("l")).unwrap(), "long");
}
