//! Hostile archives must be refused with the right error, and must not
//! write anything outside the destination directory.

use std::cell::Cell;
use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use archive::{Limits, UnpackError, unpack};
use flate2::Compression;
use flate2::write::GzEncoder;
use tar::{EntryType, Header};
use tempfile::TempDir;

const LIMITS: Limits = Limits { max_unpacked_bytes: 1 << 20, max_entries: 1000 };

/// A temporary directory holding the (empty) destination and a sibling
/// sentinel directory that no archive may touch.
struct Sandbox {
    root: TempDir,
    dest: PathBuf,
}

impl Sandbox {
    fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("dest");
        fs::create_dir(&dest).unwrap();
        fs::create_dir(root.path().join("sentinel")).unwrap();
        fs::write(root.path().join("sentinel/keep.txt"), "keep").unwrap();
        Sandbox { root, dest }
    }

    fn root(&self) -> &Path {
        self.root.path()
    }

    fn unpack(&self, archive: &[u8], limits: &Limits) -> Result<archive::Unpacked, UnpackError> {
        unpack(archive, &self.dest, limits)
    }

    /// Asserts that the root still holds exactly the destination and the
    /// untouched sentinel.
    fn assert_nothing_outside(&self) {
        assert_eq!(names(self.root()), set(&["dest", "sentinel"]));
        assert_eq!(names(&self.root().join("sentinel")), set(&["keep.txt"]));
        assert_eq!(fs::read_to_string(self.root().join("sentinel/keep.txt")).unwrap(), "keep");
    }
}

fn names(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Builds a tar with raw headers, bypassing the path checks that
/// `Header::set_path` and `Builder::append_data` would apply.
struct RawTar {
    builder: Option<tar::Builder<Vec<u8>>>,
}

impl RawTar {
    fn new() -> Self {
        RawTar { builder: Some(tar::Builder::new(Vec::new())) }
    }

    fn entry(self, name: &str, kind: EntryType, link: &str, data: &[u8], mode: u32) -> Self {
        self.entry_with(name.as_bytes(), kind, link.as_bytes(), data, mode, |_| {})
    }

    /// Appends an entry whose header `edit` may change after it is filled
    /// in, before its checksum is computed.
    fn entry_with(
        mut self,
        name: &[u8],
        kind: EntryType,
        link: &[u8],
        data: &[u8],
        mode: u32,
        edit: impl FnOnce(&mut Header),
    ) -> Self {
        let mut header = Header::new_gnu();
        let old = header.as_old_mut();
        assert!(name.len() < old.name.len() && link.len() < old.linkname.len());
        old.name[..name.len()].copy_from_slice(name);
        old.linkname[..link.len()].copy_from_slice(link);
        header.set_entry_type(kind);
        header.set_size(data.len() as u64);
        header.set_mode(mode);
        header.set_mtime(0);
        edit(&mut header);
        header.set_cksum();
        self.builder.as_mut().unwrap().append(&header, data).unwrap();
        self
    }

    /// Appends an entry whose name and link target, of any length and
    /// content, are stored in GNU long-name and long-link records.
    fn long_entry(self, name: &[u8], kind: EntryType, link: &[u8], data: &[u8]) -> Self {
        let mut tar =
            self.entry_with(b"././@LongLink", EntryType::GNULongName, b"", &nul_terminated(name), 0o644, |_| {});
        if !link.is_empty() {
            tar = tar.entry_with(b"././@LongLink", EntryType::GNULongLink, b"", &nul_terminated(link), 0o644, |_| {});
        }
        tar.entry_with(b"placeholder", kind, b"placeholder", data, 0o644, |_| {})
    }

    fn file(self, name: &str, data: &[u8]) -> Self {
        self.entry(name, EntryType::Regular, "", data, 0o644)
    }

    fn dir(self, name: &str) -> Self {
        self.entry(name, EntryType::Directory, "", b"", 0o755)
    }

    fn symlink(self, name: &str, target: &str) -> Self {
        self.entry(name, EntryType::Symlink, target, b"", 0o777)
    }

    fn hard_link(self, name: &str, target: &str) -> Self {
        self.entry(name, EntryType::Link, target, b"", 0o644)
    }

    fn tar(mut self) -> Vec<u8> {
        self.builder.take().unwrap().into_inner().unwrap()
    }

    fn gz(self) -> Vec<u8> {
        gzip(&self.tar())
    }
}

fn nul_terminated(bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    out.push(0);
    out
}

/// One pax extension record, `<length> <key>=<value>\n`, where the length
/// counts the whole record including its own digits.
fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let rest = key.len() + value.len() + 3;
    let mut len = rest + 1;
    while len != rest + len.to_string().len() {
        len = rest + len.to_string().len();
    }
    let mut record = format!("{len} {key}=").into_bytes();
    record.extend_from_slice(value);
    record.push(b'\n');
    record
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

#[test]
fn parent_dir_entry_is_refused() {
    let sandbox = Sandbox::new();
    let archive = RawTar::new().file("../evil", b"evil").gz();
    let err = sandbox.unpack(&archive, &LIMITS).unwrap_err();
    assert!(matches!(&err, UnpackError::ParentDir(p) if p == "../evil"), "{err:?}");
    assert_eq!(err.to_string(), r#"archive entry "../evil" leaves the app directory (contains "..")"#);
    sandbox.assert_nothing_outside();
}

#[test]
fn nested_parent_dir_entry_is_refused() {
    let sandbox = Sandbox::new();
    let archive = RawTar::new().dir("a").file("a/../../evil", b"evil").gz();
    let err = sandbox.unpack(&archive, &LIMITS).unwrap_err();
    assert!(matches!(&err, UnpackError::ParentDir(p) if p == "a/../../evil"), "{err:?}");
    sandbox.assert_nothing_outside();
}

#[test]
fn absolute_entry_is_refused() {
    let sandbox = Sandbox::new();
    let target = sandbox.root().join("evil");
    let name = target.to_str().unwrap();
    let archive = RawTar::new().file(name, b"evil").gz();
    let err = sandbox.unpack(&archive, &LIMITS).unwrap_err();
    assert!(matches!(&err, UnpackError::AbsolutePath(p) if p == name), "{err:?}");
    assert!(!target.exists());
    sandbox.assert_nothing_outside();

    let err = Sandbox::new().unpack(&RawTar::new().file("/etc/x", b"x").gz(), &LIMITS).unwrap_err();
    assert_eq!(err.to_string(), r#"archive entry "/etc/x" has an absolute path"#);
}

#[test]
fn absolute_symlink_is_refused() {
    let sandbox = Sandbox::new();
    let archive = RawTar::new().symlink("link", "/etc/passwd").gz();
    let err = sandbox.unpack(&archive, &LIMITS).unwrap_err();
    assert!(
        matches!(&err, UnpackError::LinkEscapes { path, target } if path == "link" && target == "/etc/passwd"),
        "{err:?}"
    );
    assert_eq!(err.to_string(), r#"archive entry "link" is a symlink to "/etc/passwd", outside the app directory"#);
    assert!(names(&sandbox.dest).is_empty());
    sandbox.assert_nothing_outside();
}

#[test]
fn relative_symlink_outside_is_refused() {
    let sandbox = Sandbox::new();
    let archive = RawTar::new().dir("sub").symlink("sub/ok", "../x").symlink("sub/link", "../../outside").gz();
    let err = sandbox.unpack(&archive, &LIMITS).unwrap_err();
    assert!(matches!(&err, UnpackError::LinkEscapes { path, .. } if path == "sub/link"), "{err:?}");
    sandbox.assert_nothing_outside();

    let sandbox = Sandbox::new();
    let archive = RawTar::new().symlink("outside", "../outside").gz();
    let err = sandbox.unpack(&archive, &LIMITS).unwrap_err();
    assert!(matches!(err, UnpackError::LinkEscapes { .. }), "{err:?}");
    sandbox.assert_nothing_outside();
}

#[test]
fn symlink_through_symlink_to_parent_is_refused() {
    // `a/b/s1 -> ../..` resolves to the app directory itself, which is fine,
    // but `s2 -> a/b/s1/..` then physically resolves to its parent even
    // though it looks harmless lexically.
    let sandbox = Sandbox::new();
    let archive = RawTar::new().dir("a").dir("a/b").symlink("a/b/s1", "../..").symlink("s2", "a/b/s1/..").gz();
    let err = sandbox.unpack(&archive, &LIMITS).unwrap_err();
    assert!(
        matches!(&err, UnpackError::LinkEscapes { path, target } if path == "s2" && target == "a/b/s1/.."),
        "{err:?}"
    );
    sandbox.assert_nothing_outside();
}

#[test]
fn symlink_made_unsafe_by_a_later_symlink_is_refused() {
    // Here `s2` is checked before `a/b/s1` exists, so only the final check
    // after every entry is written can catch it.
    let sandbox = Sandbox::new();
    let archive = RawTar::new().dir("a").dir("a/b").symlink("s2", "a/b/s1/..").symlink("a/b/s1", "../..").gz();
    let err = sandbox.unpack(&archive, &LIMITS).unwrap_err();
    assert!(matches!(&err, UnpackError::LinkEscapes { path, .. } if path == "s2"), "{err:?}");
    sandbox.assert_nothing_outside();
}

#[test]
fn symlink_loop_is_refused() {
    let sandbox = Sandbox::new();
    let archive = RawTar::new().symlink("a", "b/x").symlink("b", "a/y").gz();
    let err = sandbox.unpack(&archive, &LIMITS).unwrap_err();
    assert!(matches!(err, UnpackError::SymlinkLoop { .. }), "{err:?}");
    sandbox.assert_nothing_outside();
}

#[test]
fn exponential_symlink_chain_is_cut_off() {
    // Each link names the previous one twice, so resolving the last one
    // naively would take 2^60 steps; the shared budget stops it quickly.
    let mut tar = RawTar::new().dir("d").symlink("d/l0", ".");
    for i in 1..60 {
        let prev = format!("l{}", i - 1);
        tar = tar.symlink(&format!("d/l{i}"), &format!("{prev}/{prev}"));
    }
    let sandbox = Sandbox::new();
    let err = sandbox.unpack(&tar.gz(), &LIMITS).unwrap_err();
    assert!(matches!(err, UnpackError::SymlinkLoop { .. }), "{err:?}");
    sandbox.assert_nothing_outside();
}

#[test]
fn symlink_to_parent_dir_is_refused() {
    let sandbox = Sandbox::new();
    let archive = RawTar::new().symlink("d", "..").file("d/evil", b"evil").gz();
    let err = sandbox.unpack(&archive, &LIMITS).unwrap_err();
    assert!(matches!(&err, UnpackError::LinkEscapes { path, .. } if path == "d"), "{err:?}");
    sandbox.assert_nothing_outside();
}

#[test]
fn file_through_inner_symlink_is_refused() {
    let sandbox = Sandbox::new();
    let archive = RawTar::new().dir("sub").symlink("d", "sub").file("d/x", b"x").gz();
    let err = sandbox.unpack(&archive, &LIMITS).unwrap_err();
    assert!(matches!(&err, UnpackError::ThroughSymlink { path, link } if path == "d/x" && link == "d"), "{err:?}");
    assert!(!sandbox.dest.join("sub/x").exists());
    sandbox.assert_nothing_outside();
}

#[test]
fn entry_replacing_a_symlink_is_refused() {
    for tar in [
        RawTar::new().symlink("s", "x").file("s", b"x"),
        RawTar::new().symlink("s", "x").dir("s"),
        RawTar::new().symlink("s", "x").symlink("s", "y"),
    ] {
        let sandbox = Sandbox::new();
        let err = sandbox.unpack(&tar.gz(), &LIMITS).unwrap_err();
        assert!(matches!(err, UnpackError::ThroughSymlink { .. }), "{err:?}");
        sandbox.assert_nothing_outside();
    }
}

#[test]
fn hard_link_outside_is_refused() {
    let sandbox = Sandbox::new();
    let archive = RawTar::new().hard_link("hl", "../../etc/passwd").gz();
    let err = sandbox.unpack(&archive, &LIMITS).unwrap_err();
    assert!(
        matches!(&err, UnpackError::HardLinkEscapes { path, target } if path == "hl" && target == "../../etc/passwd"),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        r#"archive entry "hl" is a hard link to "../../etc/passwd", outside the app directory"#
    );
    sandbox.assert_nothing_outside();

    let sandbox = Sandbox::new();
    let err = sandbox.unpack(&RawTar::new().hard_link("hl", "/etc/passwd").gz(), &LIMITS).unwrap_err();
    assert!(matches!(err, UnpackError::HardLinkEscapes { .. }), "{err:?}");
    sandbox.assert_nothing_outside();
}

#[test]
fn hard_link_through_symlink_is_refused() {
    let sandbox = Sandbox::new();
    let archive = RawTar::new().dir("sub").file("sub/f", b"f").symlink("d", "sub").hard_link("hl", "d/f").gz();
    let err = sandbox.unpack(&archive, &LIMITS).unwrap_err();
    assert!(matches!(&err, UnpackError::ThroughSymlink { path, link } if path == "hl" && link == "d"), "{err:?}");
    assert!(!sandbox.dest.join("hl").exists());
    sandbox.assert_nothing_outside();

    // A hard link to the symlink itself would link the symlink, not a file.
    let sandbox = Sandbox::new();
    let archive = RawTar::new().file("f", b"f").symlink("s", "f").hard_link("hl", "s").gz();
    let err = sandbox.unpack(&archive, &LIMITS).unwrap_err();
    assert!(matches!(err, UnpackError::ThroughSymlink { .. }), "{err:?}");
    sandbox.assert_nothing_outside();
}

#[test]
fn hard_link_to_missing_file_is_refused() {
    let sandbox = Sandbox::new();
    let archive = RawTar::new().hard_link("hl", "missing").gz();
    let err = sandbox.unpack(&archive, &LIMITS).unwrap_err();
    assert!(matches!(err, UnpackError::Corrupt(_)), "{err:?}");
    sandbox.assert_nothing_outside();
}

#[test]
fn hard_link_inside_is_allowed() {
    let sandbox = Sandbox::new();
    let archive = RawTar::new().dir("sub").file("sub/f", b"hello").hard_link("hl", "./sub/f").gz();
    let unpacked = sandbox.unpack(&archive, &LIMITS).unwrap();
    assert_eq!(unpacked.files, 2);
    assert_eq!(unpacked.bytes, 5);
    assert_eq!(fs::read(sandbox.dest.join("hl")).unwrap(), b"hello");
    sandbox.assert_nothing_outside();
}

#[test]
fn special_files_are_refused() {
    for (kind, name) in [
        (EntryType::Char, "character device"),
        (EntryType::Block, "block device"),
        (EntryType::Fifo, "fifo"),
        (EntryType::new(b'Z'), "entry of an unsupported type"),
    ] {
        let sandbox = Sandbox::new();
        let archive = RawTar::new().entry("dev", kind, "", b"", 0o644).gz();
        let err = sandbox.unpack(&archive, &LIMITS).unwrap_err();
        assert!(matches!(&err, UnpackError::SpecialFile { path, kind } if path == "dev" && *kind == name), "{err:?}");
        assert!(names(&sandbox.dest).is_empty());
        sandbox.assert_nothing_outside();
    }
    let err =
        Sandbox::new().unpack(&RawTar::new().entry("dev", EntryType::Char, "", b"", 0o644).gz(), &LIMITS).unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"archive entry "dev" is a character device; only files, directories and links are allowed"#
    );
}

#[test]
fn oversized_file_is_refused() {
    let limits = Limits { max_unpacked_bytes: 1000, max_entries: 100 };
    let sandbox = Sandbox::new();
    let archive = RawTar::new().file("big", &[7u8; 5000]).gz();
    let err = sandbox.unpack(&archive, &limits).unwrap_err();
    assert!(matches!(err, UnpackError::TooLarge { limit: 1000 }), "{err:?}");
    assert!(fs::metadata(sandbox.dest.join("big")).unwrap().len() <= 1000);
    sandbox.assert_nothing_outside();

    let err = Sandbox::new().unpack(&RawTar::new().file("big", &[0u8; 1_048_577]).gz(), &LIMITS).unwrap_err();
    assert_eq!(err.to_string(), "archive unpacks to more than 1048576 bytes (the server's limit)");
}

#[test]
fn total_size_is_limited_across_files() {
    let limits = Limits { max_unpacked_bytes: 1000, max_entries: 100 };
    let sandbox = Sandbox::new();
    let archive = RawTar::new().file("a", &[1u8; 600]).file("b", &[2u8; 600]).gz();
    let err = sandbox.unpack(&archive, &limits).unwrap_err();
    assert!(matches!(err, UnpackError::TooLarge { limit: 1000 }), "{err:?}");
    sandbox.assert_nothing_outside();
}

#[test]
fn data_hidden_in_non_file_entries_is_limited() {
    // Directory entries with data are skipped rather than written, so the
    // decompressed stream has to be bounded separately.
    let limits = Limits { max_unpacked_bytes: 1000, max_entries: 3 };
    let sandbox = Sandbox::new();
    let archive = RawTar::new().entry("d", EntryType::Directory, "", &vec![0u8; 4 << 20], 0o755).gz();
    let err = sandbox.unpack(&archive, &limits).unwrap_err();
    assert!(matches!(err, UnpackError::TooLarge { limit: 1000 }), "{err:?}");
    sandbox.assert_nothing_outside();

    // Each entry has its own allowance for such data, so even with the
    // server's limit of a million entries one entry cannot make it read
    // far.
    let limits = Limits { max_unpacked_bytes: 1000, max_entries: 1_000_000 };
    let sandbox = Sandbox::new();
    let read = Cell::new(0);
    let err = unpack(CountingReader { data: &archive, read: &read }, &sandbox.dest, &limits).unwrap_err();
    assert!(matches!(err, UnpackError::TooLarge { limit: 1000 }), "{err:?}");
    assert!(read.get() < archive.len() / 16, "read {} of {} compressed bytes", read.get(), archive.len());
    sandbox.assert_nothing_outside();
}

#[test]
fn too_many_entries_are_refused() {
    let limits = Limits { max_unpacked_bytes: 1 << 20, max_entries: 3 };
    let mut tar = RawTar::new();
    for i in 0..5 {
        tar = tar.file(&format!("f{i}"), b"x");
    }
    let sandbox = Sandbox::new();
    let err = sandbox.unpack(&tar.gz(), &limits).unwrap_err();
    assert!(matches!(err, UnpackError::TooManyEntries { limit: 3 }), "{err:?}");
    assert_eq!(names(&sandbox.dest), set(&["f0", "f1", "f2"]));
    sandbox.assert_nothing_outside();
}

#[test]
fn garbage_is_corrupt() {
    let sandbox = Sandbox::new();
    for archive in [b"definitely not gzip".to_vec(), gzip(&[0xAB; 2000]), Vec::new()] {
        let err = sandbox.unpack(&archive, &LIMITS).unwrap_err();
        assert!(matches!(err, UnpackError::Corrupt(_)), "{err:?}");
    }

    // A header whose checksum does not match is refused too.
    let mut tar = RawTar::new().file("f", b"x").tar();
    tar[0] = b'g';
    let err = sandbox.unpack(&gzip(&tar), &LIMITS).unwrap_err();
    assert!(matches!(err, UnpackError::Corrupt(_)), "{err:?}");

    // So is an archive cut off in the middle of a file.
    let tar = RawTar::new().file("f", &[1u8; 4000]).tar();
    let err = sandbox.unpack(&gzip(&tar[..2000]), &LIMITS).unwrap_err();
    assert!(matches!(err, UnpackError::Corrupt(_)), "{err:?}");
    sandbox.assert_nothing_outside();
}

#[test]
fn odd_but_harmless_entries_are_accepted() {
    let sandbox = Sandbox::new();
    let archive = RawTar::new()
        .dir("./")
        .file("./a.txt", b"a")
        .file("x/./y//z.txt", b"z")
        .entry("old/", EntryType::Regular, "", b"", 0o755)
        .entry("run", EntryType::Regular, "", b"#!", 0o4711)
        .entry("g", EntryType::XGlobalHeader, "", b"", 0o644)
        .symlink("up", "x/y/../..")
        .symlink("x/y/back", "../../a.txt")
        .symlink("dangling", "nowhere/at/all")
        .gz();
    let unpacked = sandbox.unpack(&archive, &LIMITS).unwrap();
    assert_eq!(unpacked.files, 6);
    assert_eq!(unpacked.bytes, 4);
    assert_eq!(names(&sandbox.dest), set(&["a.txt", "dangling", "old", "run", "up", "x"]));
    assert!(sandbox.dest.join("old").is_dir());
    assert_eq!(fs::read(sandbox.dest.join("x/y/z.txt")).unwrap(), b"z");
    assert_eq!(fs::read(sandbox.dest.join("x/y/back")).unwrap(), b"a");
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(sandbox.dest.join("run")).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o755);
    sandbox.assert_nothing_outside();
}

#[test]
fn later_file_replaces_earlier_file() {
    let sandbox = Sandbox::new();
    let archive = RawTar::new().file("f", b"one").file("f", b"two").gz();
    sandbox.unpack(&archive, &LIMITS).unwrap();
    assert_eq!(fs::read(sandbox.dest.join("f")).unwrap(), b"two");

    let sandbox = Sandbox::new();
    let archive = RawTar::new().file("f", b"one").file("f/g", b"two").gz();
    let err = sandbox.unpack(&archive, &LIMITS).unwrap_err();
    assert!(matches!(&err, UnpackError::Conflict { path, existing } if path == "f/g" && existing == "f"), "{err:?}");
}

/// Asserts that an error message has no control characters, which could
/// drive the terminal it is printed on.
fn assert_printable(err: &UnpackError) {
    let message = err.to_string();
    assert!(!message.chars().any(char::is_control), "{message:?}");
}

#[test]
fn control_characters_in_names_are_escaped_in_errors() {
    // The tar crate's messages about malformed header fields quote the
    // entry's name, and the field, as they are.
    let name = b"\x1b[2J\x1b]0;owned\x07";
    // Each of these header fields is made a non-number with control
    // characters in it; the checksum is fixed up after the others.
    for (field, range) in [("mode", 100..108), ("size", 124..136), ("cksum", 148..156)] {
        let mut tar = RawTar::new().entry_with(name, EntryType::Regular, b"", b"x", 0o644, |_| {}).tar();
        tar[range.clone()].fill(0);
        tar[range.start..range.start + 7].copy_from_slice(b"\x1b[31m\x07\x08");
        if field != "cksum" {
            let mut header = Header::new_old();
            header.as_mut_bytes().copy_from_slice(&tar[..512]);
            header.set_cksum();
            tar[..512].copy_from_slice(header.as_bytes());
        }
        let sandbox = Sandbox::new();
        let err = sandbox.unpack(&gzip(&tar), &LIMITS).unwrap_err();
        assert!(matches!(err, UnpackError::Corrupt(_)), "{field}: {err:?}");
        assert_printable(&err);
        assert!(err.to_string().contains(r"\u{1b}[31m"), "{field}: {err}");
        sandbox.assert_nothing_outside();
    }

    // Names are quoted with their control characters escaped in every
    // other error.
    let sandbox = Sandbox::new();
    let err = sandbox.unpack(&RawTar::new().file("../\x1b[2J", b"x").gz(), &LIMITS).unwrap_err();
    assert_eq!(err.to_string(), r#"archive entry "../\u{1b}[2J" leaves the app directory (contains "..")"#);
    let err = sandbox.unpack(&RawTar::new().symlink("l\r", "/\x1b[2J").gz(), &LIMITS).unwrap_err();
    assert_eq!(err.to_string(), r#"archive entry "l\r" is a symlink to "/\u{1b}[2J", outside the app directory"#);
}

#[test]
fn overlong_names_are_refused() {
    // The whole path may be at most 4095 bytes once joined to the app
    // directory's own path.
    let sandbox = Sandbox::new();
    let max = 4095 - sandbox.dest.as_os_str().len() - 1;
    struct Case {
        name: Vec<u8>,
        kind: EntryType,
        link: Vec<u8>,
        what: &'static str,
        max: usize,
    }
    let long_path = ["dir"; 1100].join("/").into_bytes();
    let cases = [
        Case { name: vec![b'n'; 256], kind: EntryType::Regular, link: vec![], what: "a path", max },
        Case {
            name: format!("d/{}/f", "n".repeat(300)).into_bytes(),
            kind: EntryType::Directory,
            link: vec![],
            what: "a path",
            max,
        },
        Case { name: long_path.clone(), kind: EntryType::Regular, link: vec![], what: "a path", max },
        Case {
            name: b"link".to_vec(),
            kind: EntryType::Symlink,
            link: vec![b't'; 4096],
            what: "a link target",
            max: 4095,
        },
        Case {
            name: b"link".to_vec(),
            kind: EntryType::Symlink,
            link: vec![b't'; 256],
            what: "a link target",
            max: 4095,
        },
        Case { name: b"hard".to_vec(), kind: EntryType::Link, link: long_path, what: "a link target", max },
    ];
    for Case { name, kind, link, what, max } in cases {
        let sandbox = Sandbox::new();
        let archive = RawTar::new().long_entry(&name, kind, &link, b"").gz();
        let err = sandbox.unpack(&archive, &LIMITS).unwrap_err();
        let expected = String::from_utf8(name.clone()).unwrap();
        assert!(
            matches!(&err, UnpackError::NameTooLong { path, what: w, max: m } if *path == expected && *w == what && *m == max),
            "{err:?}"
        );
        assert_printable(&err);
        assert!(names(&sandbox.dest).is_empty());
        sandbox.assert_nothing_outside();
    }

    // The message names the entry, cut short.
    let err = sandbox.unpack(&RawTar::new().long_entry(&[b'n'; 300], EntryType::Regular, b"", b"").gz(), &LIMITS);
    let shown = "n".repeat(100);
    assert_eq!(
        err.unwrap_err().to_string(),
        format!(
            "archive entry \"{shown}\"... (300 bytes) has a path longer than the filesystem allows \
             (at most 255 bytes per component and {max} in all)"
        )
    );

    // Right up to the limits is fine.
    let sandbox = Sandbox::new();
    let longest = "n".repeat(255);
    let archive = RawTar::new()
        .long_entry(longest.as_bytes(), EntryType::Regular, b"", b"x")
        .long_entry(b"link", EntryType::Symlink, longest.as_bytes(), b"")
        .long_entry(b"hard", EntryType::Link, longest.as_bytes(), b"")
        .gz();
    let unpacked = sandbox.unpack(&archive, &LIMITS).unwrap();
    assert_eq!(unpacked.files, 3);
    assert_eq!(fs::read(sandbox.dest.join("link")).unwrap(), b"x");
    assert_eq!(fs::read(sandbox.dest.join("hard")).unwrap(), b"x");
}

#[test]
fn nul_bytes_in_names_are_corrupt() {
    // The classic header ends names at the first NUL, but GNU long-name
    // records and pax headers can carry one inside a name.
    let cases = [
        RawTar::new().long_entry(b"a\0b", EntryType::Regular, b"", b"x"),
        RawTar::new().long_entry(b"a\0", EntryType::Directory, b"", b""),
        RawTar::new().long_entry(b"link", EntryType::Symlink, b"a\0/b", b""),
        RawTar::new().file("a", b"x").long_entry(b"hard", EntryType::Link, b"a\0", b""),
        RawTar::new()
            .entry_with(b"pax", EntryType::XHeader, b"", &pax_record("path", b"p\0q"), 0o644, |_| {})
            .file("f", b"x"),
    ];
    for (i, tar) in cases.into_iter().enumerate() {
        let sandbox = Sandbox::new();
        let err = sandbox.unpack(&tar.gz(), &LIMITS).unwrap_err();
        assert!(matches!(&err, UnpackError::Corrupt(m) if m.contains("NUL byte")), "case {i}: {err:?}");
        assert_printable(&err);
        assert!(names(&sandbox.dest).iter().all(|n| n == "a"), "case {i}");
        sandbox.assert_nothing_outside();
    }
    let err = Sandbox::new().unpack(&RawTar::new().long_entry(b"a\0b", EntryType::Regular, b"", b"").gz(), &LIMITS);
    assert_eq!(err.unwrap_err().to_string(), r#"corrupt archive: entry "a\0b" has a NUL byte in its name"#);
}

#[test]
fn hard_link_to_itself_keeps_the_file() {
    // GNU tar writes this for a file that is named twice when archiving.
    for (name, target) in [("f", "f"), ("d/f", "d/./f"), ("./d/f", "d//f")] {
        let sandbox = Sandbox::new();
        let archive = RawTar::new().dir("d").file("f", b"data").file("d/f", b"data").hard_link(name, target).gz();
        let unpacked = sandbox.unpack(&archive, &LIMITS).unwrap();
        assert_eq!(unpacked.files, 2, "{name} -> {target}");
        assert_eq!(fs::read(sandbox.dest.join("f")).unwrap(), b"data");
        assert_eq!(fs::read(sandbox.dest.join("d/f")).unwrap(), b"data");
        sandbox.assert_nothing_outside();
    }
}

/// A reader that counts the bytes read from it and hands out at most 512
/// at a time, so that the count shows how far a reader above it got.
struct CountingReader<'a> {
    data: &'a [u8],
    read: &'a Cell<usize>,
}

impl Read for CountingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(512).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        self.read.set(self.read.get() + n);
        Ok(n)
    }
}

#[test]
fn decompression_bomb_stops_at_the_limit() {
    // 64 MiB of zeros in one file compress to about 64 KiB.
    let mut header = Header::new_gnu();
    header.set_path("bomb").unwrap();
    header.set_size(64 << 20);
    header.set_mode(0o644);
    header.set_cksum();
    let mut encoder = GzEncoder::new(Vec::new(), Compression::best());
    encoder.write_all(header.as_bytes()).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..64 {
        encoder.write_all(&zeros).unwrap();
    }
    encoder.write_all(&[0u8; 1024]).unwrap();
    let bomb = encoder.finish().unwrap();

    let limits = Limits { max_unpacked_bytes: 1 << 20, max_entries: 1000 };
    let sandbox = Sandbox::new();
    let read = Cell::new(0);
    let err = unpack(CountingReader { data: &bomb, read: &read }, &sandbox.dest, &limits).unwrap_err();
    assert!(matches!(err, UnpackError::TooLarge { limit } if limit == 1 << 20), "{err:?}");
    assert!(fs::metadata(sandbox.dest.join("bomb")).unwrap().len() <= 1 << 20);
    // It stopped soon after the first MiB, having read a small part of
    // the compressed archive.
    assert!(read.get() < bomb.len() / 16, "read {} of {} compressed bytes", read.get(), bomb.len());
    sandbox.assert_nothing_outside();
}
