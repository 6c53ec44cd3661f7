//! What the fuzz targets share: the checks each one runs on an input, and
//! the structured archive description that `unpack_entries` builds tars
//! from. Beyond "no panic", the checks assert what the code promises: a
//! manifest error is one printable line, and an unpack, whatever the
//! archive, writes nothing outside its destination, never more file data
//! than the limit, and reports errors that are safe to print.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use arbitrary::Arbitrary;
use archive::{Limits, UnpackError, unpack};
use flate2::Compression;
use flate2::write::GzEncoder;
use model::Manifest;
use tar::{EntryType, Header};

/// The machine types the manifest target passes as the server's.
const MACHINE_TYPES: &[&str] = &["cpu", "gpu-a10"];

/// Parses `data` as a manifest, with and without the server's machine types,
/// and checks that every error is one line of printable text.
pub fn check_manifest(data: &[u8]) {
    let Ok(source) = std::str::from_utf8(data) else {
        return;
    };
    for machine_types in [None, Some(MACHINE_TYPES)] {
        match Manifest::parse(source, machine_types) {
            Ok(manifest) => {
                assert!(!manifest.command.is_empty(), "a valid manifest has a command");
                assert!(manifest.scaling.min_concurrency <= manifest.scaling.max_concurrency);
            }
            Err(errors) => {
                assert!(!errors.0.is_empty(), "an error list is never empty");
                for error in &errors.0 {
                    let line = error.to_string();
                    assert!(!line.chars().any(char::is_control), "manifest error is not printable: {line:?}");
                }
            }
        }
    }
}

/// The directory under which scratch directories are made: the
/// `HANGAR_FUZZ_SCRATCH` environment variable if set (scripts/fuzz.sh sets
/// it and removes it afterwards), else `/dev/shm`, a tmpfs, so that
/// millions of unpacks do not wear a disk.
pub fn scratch_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("HANGAR_FUZZ_SCRATCH") {
        return PathBuf::from(dir);
    }
    let shm = Path::new("/dev/shm");
    if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() }
}

/// Unpacks `archive` into a fresh scratch directory with `limits` and checks
/// what it did, whether it succeeded or not. The scratch directory is
/// removed before returning.
pub fn check_unpack(archive: &[u8], limits: &Limits) {
    let root = tempfile::Builder::new().prefix("hangar-fuzz-").tempdir_in(scratch_root()).expect("scratch dir");
    let dest = root.path().join("dest");
    let outside = root.path().join("outside");
    fs::create_dir(&dest).expect("dest dir");
    fs::create_dir(&outside).expect("sentinel dir");
    fs::write(outside.join("keep"), b"keep").expect("sentinel file");

    let result = unpack(archive, &dest, limits);

    // Nothing outside `dest` was created, changed or linked to.
    let entries: BTreeSet<_> = fs::read_dir(root.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(entries, BTreeSet::from(["dest".into(), "outside".into()]), "unpack wrote beside dest");
    let outside_entries: Vec<_> = fs::read_dir(&outside).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(outside_entries, ["keep"], "unpack wrote outside dest");
    let keep = outside.join("keep");
    assert_eq!(fs::read(&keep).unwrap(), b"keep", "unpack changed a file outside dest");
    assert_eq!(fs::metadata(&keep).unwrap().nlink(), 1, "unpack hard-linked a file outside dest");

    // Never more file data on disk than the limit, even when unpack failed.
    let tree = walk(&dest);
    assert!(
        tree.file_bytes <= limits.max_unpacked_bytes,
        "{} bytes on disk, over the limit of {}",
        tree.file_bytes,
        limits.max_unpacked_bytes
    );

    match result {
        Ok(unpacked) => {
            assert!(unpacked.bytes <= limits.max_unpacked_bytes);
            assert!(unpacked.files <= limits.max_entries);
            // Every symlink that resolves at all resolves inside `dest`.
            let real_dest = fs::canonicalize(&dest).unwrap();
            for link in &tree.symlinks {
                if let Ok(target) = fs::canonicalize(link) {
                    assert!(target.starts_with(&real_dest), "{link:?} resolves to {target:?}, outside dest");
                }
            }
        }
        Err(error) => check_error(&error),
    }
}

/// Checks that an error message is one line without control characters, so
/// that it is safe to print in a terminal.
fn check_error(error: &UnpackError) {
    let message = error.to_string();
    assert!(!message.chars().any(char::is_control), "unpack error is not printable: {message:?}");
}

/// What [`walk`] found under a directory.
#[derive(Default)]
struct Tree {
    /// The bytes of the regular files, each inode counted once.
    file_bytes: u64,
    /// The paths of the symlinks.
    symlinks: Vec<PathBuf>,
}

/// Walks `dir` without following symlinks.
fn walk(dir: &Path) -> Tree {
    let mut tree = Tree::default();
    let mut inodes = BTreeSet::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = fs::symlink_metadata(&path).unwrap();
            if meta.file_type().is_symlink() {
                tree.symlinks.push(path);
            } else if meta.is_dir() {
                pending.push(path);
            } else if meta.is_file() {
                if inodes.insert(meta.ino()) {
                    tree.file_bytes += meta.len();
                }
            } else {
                panic!("unpack created {path:?}, which is neither a file, a directory nor a symlink");
            }
        }
    }
    tree
}

/// An archive described entry by entry, for the `unpack_entries` target:
/// random bytes decode into a sequence of plausible entries (with names
/// from a small vocabulary, so that entries clash and link to each other),
/// which reaches deeper into the unpacker than random gzip bytes do.
#[derive(Debug, Arbitrary)]
pub struct ArchiveSpec {
    /// Picks the limits to unpack with and whether the tar is cut short;
    /// see [`ArchiveSpec::limits`] and [`ArchiveSpec::to_tar_gz`].
    pub flags: u8,
    /// The entries, in archive order.
    pub entries: Vec<EntrySpec>,
    /// Where the tar stream is cut, if it is.
    pub truncate_at: u16,
}

/// One archive entry.
#[derive(Debug, Arbitrary)]
pub struct EntrySpec {
    /// The entry's path.
    pub path: PathSpec,
    /// What the entry is.
    pub kind: KindSpec,
    /// How the path and link target are stored.
    pub encoding: NameEncoding,
    /// The mode bits in the header.
    pub mode: u16,
}

/// A path built from components.
#[derive(Debug, Arbitrary, Clone)]
pub struct PathSpec {
    /// The path starts with '/' when the low four bits are all set, and
    /// ends with '/' when the high four are: one time in sixteen each, so
    /// that most archives get past their first entries.
    pub flags: u8,
    /// The components, joined with '/'.
    pub parts: Vec<Part>,
}

/// One path component.
#[derive(Debug, Arbitrary, Clone)]
pub enum Part {
    /// `a`, `b` and `c`: a small vocabulary, so that paths collide.
    A,
    /// `b`
    B,
    /// `c`
    C,
    /// `.`
    Dot,
    /// `..`
    DotDot,
    /// An empty component, giving `//`.
    Empty,
    /// `x` repeated 1 to 512 times, around the 255-byte limit of a name.
    Long(u16),
    /// Any bytes, including '/', NUL, control characters and invalid UTF-8.
    Raw(Vec<u8>),
}

/// What an entry is.
#[derive(Debug, Arbitrary)]
pub enum KindSpec {
    /// A regular file.
    File(DataSpec),
    /// A directory.
    Dir,
    /// A directory entry that carries data, which tar skips.
    DirWithData(DataSpec),
    /// A symlink to the path.
    Symlink(PathSpec),
    /// A hard link to the path.
    HardLink(PathSpec),
    /// An entry of any type byte (fifo, device, sparse, stray extension
    /// records and unknown types), with a link target and data.
    Other {
        /// The type byte.
        type_byte: u8,
        /// The link target field.
        target: PathSpec,
        /// The entry's data.
        data: DataSpec,
    },
}

/// An entry's data: some bytes, repeated to reach sizes around the limits.
#[derive(Debug, Arbitrary)]
pub struct DataSpec {
    /// The bytes.
    pub bytes: Vec<u8>,
    /// How many times they are repeated: `repeat + 1` times, except that
    /// 255 fills 256 KiB, past every limit the targets use.
    pub repeat: u8,
}

/// How names longer than the 100 bytes of the classic header are stored.
#[derive(Debug, Arbitrary, Clone, Copy)]
pub enum NameEncoding {
    /// Cut to fit the classic header fields.
    Classic,
    /// GNU long-name and long-link records, when needed.
    GnuLong,
    /// A pax extension header with `path` and `linkpath`.
    Pax,
}

/// The most data one [`DataSpec`] expands to.
const MAX_DATA: usize = 256 * 1024;

impl DataSpec {
    /// The data's bytes.
    pub fn bytes(&self) -> Vec<u8> {
        if self.bytes.is_empty() {
            return Vec::new();
        }
        let fill = MAX_DATA.div_ceil(self.bytes.len());
        let times = if self.repeat == u8::MAX { fill } else { (usize::from(self.repeat) + 1).min(fill) };
        let mut data = self.bytes.repeat(times);
        data.truncate(MAX_DATA);
        data
    }
}

impl Part {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Part::A => b"a".to_vec(),
            Part::B => b"b".to_vec(),
            Part::C => b"c".to_vec(),
            Part::Dot => b".".to_vec(),
            Part::DotDot => b"..".to_vec(),
            Part::Empty => Vec::new(),
            Part::Long(n) => vec![b'x'; usize::from(*n % 512) + 1],
            Part::Raw(bytes) => bytes.clone(),
        }
    }
}

impl PathSpec {
    /// The path's bytes.
    pub fn bytes(&self) -> Vec<u8> {
        let mut path = Vec::new();
        if self.flags & 0x0f == 0x0f {
            path.push(b'/');
        }
        for (i, part) in self.parts.iter().enumerate() {
            // An empty first part would make the path absolute.
            if i > 0 && !path.is_empty() {
                path.push(b'/');
            }
            path.extend(part.bytes());
        }
        if self.flags & 0xf0 == 0xf0 && !path.is_empty() {
            path.push(b'/');
        }
        path
    }
}

impl ArchiveSpec {
    /// The limits to unpack with: mostly 64 KiB and 64 entries, and one time
    /// in sixteen each, no file data at all, a single entry, or larger ones.
    /// (A choice among equals would end most archives at a tight limit
    /// before their later entries are reached.)
    pub fn limits(&self) -> Limits {
        match self.flags & 0x0f {
            0 => Limits { max_unpacked_bytes: 0, max_entries: 8 },
            1 => Limits { max_unpacked_bytes: 1000, max_entries: 1 },
            2 => Limits { max_unpacked_bytes: 1 << 20, max_entries: 256 },
            _ => Limits { max_unpacked_bytes: 64 * 1024, max_entries: 64 },
        }
    }

    /// The archive as a gzip'd tar, cut at `truncate_at` bytes (before
    /// compression) one time in sixteen.
    pub fn to_tar_gz(&self) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for entry in &self.entries {
            entry.append_to(&mut builder);
        }
        let mut tar = builder.into_inner().expect("writing to a Vec cannot fail");
        if self.flags & 0xf0 == 0xf0 {
            tar.truncate(usize::from(self.truncate_at));
        }
        gzip(&tar)
    }
}

impl EntrySpec {
    fn append_to(&self, builder: &mut tar::Builder<Vec<u8>>) {
        let name = self.path.bytes();
        let (kind, link, data) = match &self.kind {
            KindSpec::File(data) => (EntryType::Regular, Vec::new(), data.bytes()),
            KindSpec::Dir => (EntryType::Directory, Vec::new(), Vec::new()),
            KindSpec::DirWithData(data) => (EntryType::Directory, Vec::new(), data.bytes()),
            KindSpec::Symlink(target) => (EntryType::Symlink, target.bytes(), Vec::new()),
            KindSpec::HardLink(target) => (EntryType::Link, target.bytes(), Vec::new()),
            KindSpec::Other { type_byte, target, data } => (EntryType::new(*type_byte), target.bytes(), data.bytes()),
        };
        match self.encoding {
            NameEncoding::Classic => {}
            NameEncoding::GnuLong => {
                if name.len() > 100 {
                    append_raw(builder, b"././@LongLink", EntryType::GNULongName, b"", &nul_terminated(&name), 0o644);
                }
                if link.len() > 100 {
                    append_raw(builder, b"././@LongLink", EntryType::GNULongLink, b"", &nul_terminated(&link), 0o644);
                }
            }
            NameEncoding::Pax => {
                let mut records = pax_record(b"path", &name);
                if !link.is_empty() {
                    records.extend(pax_record(b"linkpath", &link));
                }
                append_raw(builder, b"pax", EntryType::XHeader, b"", &records, 0o644);
            }
        }
        append_raw(builder, &name, kind, &link, &data, u32::from(self.mode));
    }
}

/// Appends an entry with a hand-filled header, so that any name, link and
/// type can be written (`tar::Builder`'s own methods refuse `..` and
/// absolute paths). Names and links are cut to the header's fields.
pub fn append_raw(
    builder: &mut tar::Builder<Vec<u8>>,
    name: &[u8],
    kind: EntryType,
    link: &[u8],
    data: &[u8],
    mode: u32,
) {
    let mut header = Header::new_gnu();
    let old = header.as_old_mut();
    let name = &name[..name.len().min(old.name.len())];
    let link = &link[..link.len().min(old.linkname.len())];
    old.name[..name.len()].copy_from_slice(name);
    old.linkname[..link.len()].copy_from_slice(link);
    header.set_entry_type(kind);
    header.set_size(data.len() as u64);
    header.set_mode(mode);
    header.set_mtime(0);
    header.set_cksum();
    builder.append(&header, data).expect("writing to a Vec cannot fail");
}

fn nul_terminated(bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    out.push(0);
    out
}

/// One pax record, `<length> <key>=<value>\n`, where the length counts the
/// whole record including its own digits.
pub fn pax_record(key: &[u8], value: &[u8]) -> Vec<u8> {
    let rest = key.len() + value.len() + 3; // ' ', '=' and '\n'
    let mut len = rest + 1;
    while len != rest + len.to_string().len() {
        len = rest + len.to_string().len();
    }
    let mut record = format!("{len} ").into_bytes();
    record.extend_from_slice(key);
    record.push(b'=');
    record.extend_from_slice(value);
    record.push(b'\n');
    record
}

/// Compresses `data` with gzip.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
    encoder.write_all(data).expect("writing to a Vec cannot fail");
    encoder.finish().expect("writing to a Vec cannot fail")
}
