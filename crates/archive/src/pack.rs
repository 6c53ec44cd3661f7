//! Deterministic packing of an app directory into a gzip'd tar.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use flate2::{Compression, GzBuilder};
use ignore::WalkBuilder;
use tar::{EntryType, Header};

/// The name of the hangar-specific ignore file, which works like `.gitignore`
/// but only affects what gets deployed.
const HANGAR_IGNORE: &str = ".hangarignore";

/// The result of [`pack`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packed {
    /// The gzip'd tar archive.
    pub bytes: Vec<u8>,
    /// How many regular files and symlinks the archive holds.
    pub files: u64,
    /// The total size of the regular files in the archive, before compression.
    pub unpacked_bytes: u64,
}

/// Why [`pack`] failed.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    /// A file or directory could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The path that could not be read.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The directory contains a fifo, socket or device file, which cannot be
    /// deployed.
    #[error(
        "{} is a fifo, socket or device file; only files, directories and symlinks can be deployed",
        .0.display()
    )]
    SpecialFile(PathBuf),
    /// Walking the directory (or reading an ignore file) failed.
    #[error("cannot list the app directory: {0}")]
    Walk(#[from] ignore::Error),
}

/// Packs `dir` into a deterministic gzip'd tar: the same files always give
/// the same bytes.
///
/// Entries are sorted by path and carry no timestamps, owners or
/// umask-dependent permissions: mtime is 0, uid and gid are 0, user and group
/// names are empty, and the mode is 0o755 for directories and for files with
/// any exec bit set, 0o644 for other files. The gzip header has mtime 0 too.
///
/// `.gitignore` files (also outside a git repository, and also in the parent
/// directories of `dir`, as git would do for a subdirectory of a repository),
/// `.ignore` and `.hangarignore` files are honoured. The user's global git
/// excludes file is deliberately not, because it differs between machines and
/// would make the archive depend on who packed it. Hidden files are included,
/// but `.git` never is. Symlinks are stored as symlinks, never followed.
/// Fifos, sockets and device files are an error naming the file.
///
/// Paths in the archive are relative to `dir` and have no leading `./`.
pub fn pack(dir: &Path) -> Result<Packed, PackError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PackError::Io { path, source }
    };

    let meta = fs::metadata(dir).map_err(io_err(dir))?;
    if !meta.is_dir() {
        return Err(PackError::Io {
            path: dir.to_path_buf(),
            source: io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
        });
    }

    let entries = collect(dir)?;

    // The gzip header's mtime and OS byte are fixed so that the compressed
    // bytes, not just the tar inside, are reproducible.
    let encoder = GzBuilder::new().mtime(0).operating_system(255).write(Vec::new(), Compression::default());
    let mut builder = tar::Builder::new(encoder);
    let mut files = 0u64;
    let mut unpacked_bytes = 0u64;

    for (rel, path) in &entries {
        // The type is read again here rather than remembered from the walk,
        // so that it matches the data we are about to read.
        let meta = fs::symlink_metadata(path).map_err(io_err(path))?;
        let kind = meta.file_type();
        if kind.is_dir() {
            let mut header = header(EntryType::Directory, 0o755);
            builder.append_data(&mut header, rel, io::empty()).map_err(io_err(path))?;
        } else if kind.is_symlink() {
            let target = fs::read_link(path).map_err(io_err(path))?;
            // Symlink permissions mean nothing on Linux; 0o777 is what
            // `ls -l` shows for every symlink, so that is what we record.
            let mut header = header(EntryType::Symlink, 0o777);
            builder.append_link(&mut header, rel, &target).map_err(io_err(path))?;
            files += 1;
        } else if kind.is_file() {
            let file = File::open(path).map_err(io_err(path))?;
            // The size and mode come from the opened file, so that a file
            // replaced between the walk and now is still archived
            // consistently.
            let meta = file.metadata().map_err(io_err(path))?;
            if !meta.is_file() {
                return Err(PackError::SpecialFile(path.clone()));
            }
            let mode = if meta.permissions().mode() & 0o111 != 0 { 0o755 } else { 0o644 };
            let size = meta.len();
            let mut header = header(EntryType::Regular, mode);
            header.set_size(size);
            let data = ExactReader { inner: file.take(size), remaining: size };
            builder.append_data(&mut header, rel, data).map_err(io_err(path))?;
            files += 1;
            unpacked_bytes += size;
        } else {
            return Err(PackError::SpecialFile(path.clone()));
        }
    }

    let encoder = builder.into_inner().map_err(io_err(dir))?;
    let bytes = encoder.finish().map_err(io_err(dir))?;
    Ok(Packed { bytes, files, unpacked_bytes })
}

/// Walks `dir` honouring the ignore files and returns every entry to pack as
/// (path relative to `dir`, full path), sorted by relative path.
fn collect(dir: &Path) -> Result<Vec<(PathBuf, PathBuf)>, PackError> {
    let mut walker = WalkBuilder::new(dir);
    walker
        .hidden(false)
        .require_git(false)
        .git_global(false)
        .follow_links(false)
        .add_custom_ignore_filename(HANGAR_IGNORE)
        .filter_entry(|entry| !(entry.depth() > 0 && entry.file_name() == ".git"));

    let mut entries = Vec::new();
    for entry in walker.build() {
        let entry = entry?;
        if entry.depth() == 0 {
            continue;
        }
        let path = entry.into_path();
        let rel = path.strip_prefix(dir).expect("the walker only yields paths below its root").to_path_buf();
        // Special files are reported before anything is archived, so that
        // the user hears about them even if something else fails later.
        let meta = fs::symlink_metadata(&path).map_err(|source| PackError::Io { path: path.clone(), source })?;
        let kind = meta.file_type();
        if !(kind.is_file() || kind.is_dir() || kind.is_symlink()) {
            return Err(PackError::SpecialFile(path));
        }
        entries.push((rel, path));
    }
    // Sorting by the raw bytes of the whole path gives a total order that
    // does not depend on the walker's (filesystem-dependent) order, and puts
    // every directory before its contents because a prefix sorts first.
    entries.sort_by(|(a, _), (b, _)| a.as_os_str().as_bytes().cmp(b.as_os_str().as_bytes()));
    Ok(entries)
}

/// Returns a header with every field that could vary between machines or
/// runs fixed to a constant.
fn header(kind: EntryType, mode: u32) -> Header {
    let mut header = Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header.set_size(0);
    header
}

/// Reads exactly `remaining` bytes from `inner`, failing if it ends early.
///
/// The tar builder pads whatever it reads to the size in the header without
/// checking it, so a file that shrinks while being packed would otherwise
/// produce a corrupt archive instead of an error.
struct ExactReader<R> {
    inner: R,
    remaining: u64,
}

impl<R: Read> Read for ExactReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.remaining > 0 && !buf.is_empty() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the file shrank while it was being packed"));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}
