//! Safe unpacking of untrusted gzip'd tars into a revision directory.

use std::cell::Cell;
use std::ffi::OsString;
use std::fs::{self, DirBuilder, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

use flate2::read::GzDecoder;
use tar::EntryType;

/// How many symlinks one path resolution may expand in total, the same limit
/// Linux applies (MAXSYMLINKS) before failing with ELOOP.
const MAX_SYMLINK_EXPANSIONS: u32 = 40;

/// How many bytes of tar structure (the header block, padding, any GNU
/// long-name or pax extension records, and data that directory and link
/// entries carry but that is skipped) each entry may add to the
/// decompressed stream besides its file data. It is generous, because it
/// only exists to bound the work and memory a gzip bomb can cause.
const PER_ENTRY_OVERHEAD: u64 = 64 * 1024;

/// The most bytes one path component may have (NAME_MAX on Linux).
const MAX_NAME_BYTES: usize = 255;

/// The most bytes a path may have (PATH_MAX on Linux, less the NUL that
/// ends it in a system call). A symlink's target has the same limit.
const MAX_PATH_BYTES: usize = 4095;

/// How many characters of a name an error message shows before cutting it
/// short.
const MAX_NAME_SHOWN: usize = 100;

/// The server's limits on what one archive may unpack to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The most bytes of file data the archive may unpack to.
    pub max_unpacked_bytes: u64,
    /// The most entries (files, directories and links) the archive may hold.
    pub max_entries: u64,
}

/// What [`unpack`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unpacked {
    /// How many regular files, symlinks and hard links were created.
    pub files: u64,
    /// How many bytes of file data were written.
    pub bytes: u64,
}

/// Why [`unpack`] refused or failed to unpack an archive.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// An entry's path is absolute.
    #[error("archive entry {0:?} has an absolute path")]
    AbsolutePath(String),
    /// An entry's path contains a `..` component.
    #[error("archive entry {0:?} leaves the app directory (contains \"..\")")]
    ParentDir(String),
    /// A symlink points outside the destination directory.
    #[error("archive entry {path:?} is a symlink to {target:?}, outside the app directory")]
    LinkEscapes {
        /// The symlink's path in the archive.
        path: String,
        /// The symlink's target.
        target: String,
    },
    /// A symlink cannot be resolved because it expands too many symlinks,
    /// which usually means it is part of a loop.
    #[error(
        "archive entry {path:?} is a symlink to {target:?}, which cannot be resolved (too many levels of symlinks)"
    )]
    SymlinkLoop {
        /// The symlink's path in the archive.
        path: String,
        /// The symlink's target.
        target: String,
    },
    /// A hard link points outside the destination directory.
    #[error("archive entry {path:?} is a hard link to {target:?}, outside the app directory")]
    HardLinkEscapes {
        /// The hard link's path in the archive.
        path: String,
        /// The hard link's target.
        target: String,
    },
    /// An entry would be written, or a hard link resolved, through a symlink
    /// unpacked earlier.
    #[error(
        "archive entry {path:?} goes through the symlink {link:?}; entries may not be written or linked through symlinks"
    )]
    ThroughSymlink {
        /// The entry's path in the archive.
        path: String,
        /// The symlink it would go through, relative to the app directory.
        link: String,
    },
    /// An entry would replace, or be created inside, an earlier entry of a
    /// different type, such as a file inside a file or a file replacing a
    /// directory.
    #[error("archive entry {path:?} clashes with {existing:?}, an earlier entry of a different type")]
    Conflict {
        /// The entry's path in the archive.
        path: String,
        /// The path it clashes with, relative to the app directory.
        existing: String,
    },
    /// An entry is a device, fifo or another type that an app never needs.
    #[error("archive entry {path:?} is a {kind}; only files, directories and links are allowed")]
    SpecialFile {
        /// The entry's path in the archive.
        path: String,
        /// A human-readable name of the entry's type, such as "fifo".
        kind: &'static str,
    },
    /// The archive unpacks to more bytes than allowed.
    #[error("archive unpacks to more than {limit} bytes (the server's limit)")]
    TooLarge {
        /// The limit that was exceeded.
        limit: u64,
    },
    /// The archive has more entries than allowed.
    #[error("archive has more than {limit} entries (the server's limit)")]
    TooManyEntries {
        /// The limit that was exceeded.
        limit: u64,
    },
    /// An entry's path, or a link's target, is longer than the filesystem
    /// allows: a component has more than 255 bytes, or the whole is longer
    /// than `max` bytes (the system's limit of 4095, less the length of the
    /// app directory's own path for entry paths and hard link targets).
    #[error(
        "archive entry {} has {what} longer than the filesystem allows (at most 255 bytes per component and {max} in all)",
        abbreviated(.path)
    )]
    NameTooLong {
        /// The entry's path in the archive.
        path: String,
        /// What is too long: "a path" or "a link target".
        what: &'static str,
        /// The most bytes allowed for the whole.
        max: usize,
    },
    /// The archive is not a gzip'd tar, is truncated, or is malformed, for
    /// example an entry's name has a NUL byte. The message has control
    /// characters escaped.
    #[error("corrupt archive: {0}")]
    Corrupt(String),
    /// Writing an entry to disk failed.
    #[error("cannot unpack archive entry {path:?}: {source}")]
    Io {
        /// The entry's path in the archive.
        path: String,
        /// The underlying error.
        source: io::Error,
    },
}

/// Unpacks a gzip'd tar into `dest`, which must be an existing, empty
/// directory, refusing anything that could write or point outside it.
///
/// Only regular files, directories, symlinks and hard links are allowed.
/// Entries may not have absolute paths or `..` components, nothing is ever
/// written through a symlink, symlinks must resolve (physically, following
/// the symlinks in the archive) to a path inside `dest`, and hard links must
/// name a regular file unpacked earlier. Files get mode 0o755 if the archive
/// gives them any exec bit and 0o644 otherwise; directories get 0o755.
///
/// On error, `dest` may hold a partial (and possibly unsafe, since symlinks
/// are checked a second time only after every entry is written) unpack; the
/// caller must delete it rather than use it.
pub fn unpack(archive: impl Read, dest: &Path, limits: &Limits) -> Result<Unpacked, UnpackError> {
    // Bounding the decompressed stream, and not only the file data written,
    // matters because the tar crate reads data it skips (for directories and
    // links) and long-name records (into memory) without limit, so a small
    // gzip bomb could otherwise cost unbounded time or memory. Each entry
    // gets its own allowance for what is not file data, rather than the
    // archive one for all its entries, so that a single entry cannot spend
    // the allowance of a million.
    let budget = Rc::new(StreamBudget { remaining: Cell::new(PER_ENTRY_OVERHEAD), tripped: Cell::new(false) });
    let reader = LimitedReader { inner: GzDecoder::new(archive), budget: Rc::clone(&budget) };
    let stream_error = |err: io::Error| {
        if budget.tripped.get() {
            UnpackError::TooLarge { limit: limits.max_unpacked_bytes }
        } else {
            UnpackError::Corrupt(format!("not a valid gzip'd tar ({})", printable(&err.to_string())))
        }
    };

    let mut archive = tar::Archive::new(reader);
    let mut state = State {
        dest,
        limits,
        max_path: MAX_PATH_BYTES.saturating_sub(dest.as_os_str().len() + 1),
        budget: &budget,
        unpacked: Unpacked { files: 0, bytes: 0 },
        symlinks: Vec::new(),
        entries: 0,
    };
    let mut buf = vec![0u8; 64 * 1024];

    for entry in archive.entries().map_err(&stream_error)? {
        let mut entry = entry.map_err(&stream_error)?;
        // What the tar crate reads from here to the next entry: this
        // entry's data if it is skipped, its padding, and the next header.
        budget.allow(PER_ENTRY_OVERHEAD);
        state.entries += 1;
        if state.entries > limits.max_entries {
            return Err(UnpackError::TooManyEntries { limit: limits.max_entries });
        }

        let raw = entry.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&raw).into_owned();
        let kind = entry.header().entry_type();

        // Extension headers carry metadata that the tar crate has already
        // applied (or, for global headers, that we do not need); they are
        // not files.
        if matches!(kind, EntryType::XGlobalHeader | EntryType::XHeader) {
            continue;
        }

        let path = entry.path().map_err(&stream_error)?.into_owned();
        let components = relative_components(&path, &name, state.max_path)?;
        if components.is_empty() {
            continue;
        }

        match kind {
            // Old tars mark directories as regular files whose name ends in
            // a slash, so those are treated as directories.
            EntryType::Regular | EntryType::Continuous if raw.ends_with(b"/") => {
                state.directory(&components, &name)?;
            }
            EntryType::Regular | EntryType::Continuous => {
                let mode = entry
                    .header()
                    .mode()
                    .map_err(|err| UnpackError::Corrupt(format!("entry {name:?}: {}", printable(&err.to_string()))))?;
                state.file(&components, &name, mode, &mut entry, &mut buf, &stream_error)?;
            }
            EntryType::Directory => state.directory(&components, &name)?,
            EntryType::Symlink => {
                let target = link_target(&entry, &name, &stream_error)?;
                check_symlink_target(&target, &name)?;
                state.symlink(components, name, target)?;
            }
            EntryType::Link => {
                let target = link_target(&entry, &name, &stream_error)?;
                state.hard_link(&components, &name, &target)?;
            }
            other => {
                return Err(UnpackError::SpecialFile { path: name, kind: kind_name(other) });
            }
        }
    }

    // A symlink that was safe when it was created can become unsafe when a
    // later entry creates a symlink it resolves through (for example
    // `s2 -> a/b/s1/..` followed by `a/b/s1 -> ../..`), so every symlink is
    // checked again now that the tree is complete.
    for link in &state.symlinks {
        check_symlink(dest, &link.components, &link.name, &link.target)?;
    }

    Ok(state.unpacked)
}

/// A symlink that was unpacked, remembered for the final check.
struct Symlink {
    components: Vec<OsString>,
    name: String,
    target: PathBuf,
}

/// The progress of one [`unpack`] call.
struct State<'a> {
    dest: &'a Path,
    limits: &'a Limits,
    /// The longest path, relative to `dest`, that the system can open.
    max_path: usize,
    budget: &'a StreamBudget,
    unpacked: Unpacked,
    symlinks: Vec<Symlink>,
    entries: u64,
}

impl State<'_> {
    fn directory(&mut self, components: &[OsString], name: &str) -> Result<(), UnpackError> {
        make_dirs(self.dest, components, name)
    }

    fn file(
        &mut self,
        components: &[OsString],
        name: &str,
        mode: u32,
        entry: &mut impl Read,
        buf: &mut [u8],
        stream_error: &impl Fn(io::Error) -> UnpackError,
    ) -> Result<(), UnpackError> {
        let limit = self.limits.max_unpacked_bytes;
        let path = prepare_leaf(self.dest, components, name)?;
        let mode = if mode & 0o111 != 0 { 0o755 } else { 0o644 };
        let io_err = |source| UnpackError::Io { path: name.to_owned(), source };
        // `create_new` (O_EXCL) also refuses to follow a symlink at the path,
        // which backs up the check in `prepare_leaf`.
        let mut file = OpenOptions::new().write(true).create_new(true).mode(mode).open(&path).map_err(io_err)?;
        // The mode passed to open is reduced by the umask, so it is set
        // again to get the same permissions on every server.
        file.set_permissions(Permissions::from_mode(mode)).map_err(io_err)?;

        // The bytes are counted as they are written rather than trusted from
        // the header, so that the limit holds whatever the archive claims.
        // The stream may yield no more than the limit leaves, so an entry
        // that claims more fails with `TooLarge` as it reaches it.
        self.budget.allow(limit.saturating_sub(self.unpacked.bytes));
        loop {
            let n = match entry.read(buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(stream_error(err)),
            };
            self.unpacked.bytes += n as u64;
            if self.unpacked.bytes > limit {
                return Err(UnpackError::TooLarge { limit });
            }
            file.write_all(&buf[..n]).map_err(io_err)?;
        }
        // The padding after the data and the next header.
        self.budget.allow(PER_ENTRY_OVERHEAD);
        self.unpacked.files += 1;
        Ok(())
    }

    fn symlink(&mut self, components: Vec<OsString>, name: String, target: PathBuf) -> Result<(), UnpackError> {
        check_symlink(self.dest, &components, &name, &target)?;
        let path = prepare_leaf(self.dest, &components, &name)?;
        std::os::unix::fs::symlink(&target, &path).map_err(|source| UnpackError::Io { path: name.clone(), source })?;
        self.unpacked.files += 1;
        self.symlinks.push(Symlink { components, name, target });
        Ok(())
    }

    fn hard_link(&mut self, components: &[OsString], name: &str, target: &Path) -> Result<(), UnpackError> {
        let escapes =
            || UnpackError::HardLinkEscapes { path: name.to_owned(), target: target.to_string_lossy().into_owned() };
        if has_nul(target) {
            return Err(nul_in_name(name, "link target"));
        }
        let mut target_components = Vec::new();
        for component in target.components() {
            match component {
                Component::Normal(part) => target_components.push(part.to_owned()),
                Component::CurDir => {}
                Component::RootDir | Component::Prefix(_) | Component::ParentDir => {
                    return Err(escapes());
                }
            }
        }
        check_length(&target_components, name, "a link target", self.max_path)?;
        let not_a_file = || {
            UnpackError::Corrupt(format!(
                "entry {name:?} is a hard link to {:?}, which is not a regular file earlier in the archive",
                target.to_string_lossy()
            ))
        };
        if target_components.is_empty() {
            return Err(not_a_file());
        }

        // Every component, including the last, is checked without following
        // symlinks, so the link can only name a file that physically lives
        // inside `dest`.
        let mut source = self.dest.to_path_buf();
        for (i, part) in target_components.iter().enumerate() {
            source.push(part);
            let meta = match fs::symlink_metadata(&source) {
                Ok(meta) => meta,
                Err(err) if is_missing(&err) => return Err(not_a_file()),
                Err(source) => {
                    return Err(UnpackError::Io { path: name.to_owned(), source });
                }
            };
            if meta.file_type().is_symlink() {
                return Err(UnpackError::ThroughSymlink {
                    path: name.to_owned(),
                    link: display(&target_components[..=i]),
                });
            }
            let last = i + 1 == target_components.len();
            if last && !meta.is_file() {
                return Err(not_a_file());
            }
        }

        // GNU tar writes a file named twice when it was created as the file
        // and then a hard link to itself. Removing the path to make room
        // for the link, as below, would lose the file, and linking it to
        // itself would change nothing anyway.
        if target_components == components {
            return Ok(());
        }

        let path = prepare_leaf(self.dest, components, name)?;
        fs::hard_link(&source, &path).map_err(|source| UnpackError::Io { path: name.to_owned(), source })?;
        self.unpacked.files += 1;
        Ok(())
    }
}

/// Splits an entry's path into its normal components, refusing absolute
/// paths, `..`, NUL bytes and paths longer than `max_path` bytes (or with a
/// component longer than the system allows) once normalised. An empty
/// result means the entry names `dest` itself.
fn relative_components(path: &Path, name: &str, max_path: usize) -> Result<Vec<OsString>, UnpackError> {
    // The system cannot take a NUL in a path, and a name cut at the NUL
    // would not be the name the archive gives.
    if has_nul(path) {
        return Err(nul_in_name(name, "name"));
    }
    let mut components = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => components.push(part.to_owned()),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err(UnpackError::AbsolutePath(name.to_owned()));
            }
            Component::ParentDir => return Err(UnpackError::ParentDir(name.to_owned())),
        }
    }
    check_length(&components, name, "a path", max_path)?;
    Ok(components)
}

/// Refuses a path whose components, joined with '/', are longer than `max`
/// bytes, or one of which is longer than a file name may be.
fn check_length(components: &[OsString], name: &str, what: &'static str, max: usize) -> Result<(), UnpackError> {
    let too_long = || UnpackError::NameTooLong { path: name.to_owned(), what, max };
    if components.iter().any(|c| c.len() > MAX_NAME_BYTES) {
        return Err(too_long());
    }
    let joined = components.iter().map(|c| c.len()).sum::<usize>() + components.len().saturating_sub(1);
    if joined > max {
        return Err(too_long());
    }
    Ok(())
}

/// Refuses a symlink target that the system would not store, or that could
/// never resolve: a NUL byte, more than 4095 bytes, or a component longer
/// than a file name may be. Where it points is checked later.
fn check_symlink_target(target: &Path, name: &str) -> Result<(), UnpackError> {
    if has_nul(target) {
        return Err(nul_in_name(name, "link target"));
    }
    let too_long = || UnpackError::NameTooLong { path: name.to_owned(), what: "a link target", max: MAX_PATH_BYTES };
    if target.as_os_str().len() > MAX_PATH_BYTES {
        return Err(too_long());
    }
    if target.components().any(|c| c.as_os_str().len() > MAX_NAME_BYTES) {
        return Err(too_long());
    }
    Ok(())
}

fn has_nul(path: &Path) -> bool {
    path.as_os_str().as_bytes().contains(&0)
}

/// The error for a NUL byte in an entry's name or link target.
fn nul_in_name(name: &str, what: &str) -> UnpackError {
    UnpackError::Corrupt(format!("entry {name:?} has a NUL byte in its {what}"))
}

/// Returns a link entry's target, which every symlink and hard link must
/// have.
fn link_target<R: Read>(
    entry: &tar::Entry<'_, R>,
    name: &str,
    stream_error: &impl Fn(io::Error) -> UnpackError,
) -> Result<PathBuf, UnpackError> {
    match entry.link_name().map_err(stream_error)? {
        Some(target) if !target.as_os_str().is_empty() => Ok(target.into_owned()),
        _ => Err(UnpackError::Corrupt(format!("entry {name:?} is a link without a target"))),
    }
}

/// Creates `dest/components...` as directories, one level at a time, so that
/// an existing symlink on the way is refused instead of followed (which
/// `create_dir_all` would do).
fn make_dirs(dest: &Path, components: &[OsString], name: &str) -> Result<(), UnpackError> {
    let mut path = dest.to_path_buf();
    for (i, part) in components.iter().enumerate() {
        path.push(part);
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(UnpackError::ThroughSymlink { path: name.to_owned(), link: display(&components[..=i]) });
            }
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(UnpackError::Conflict { path: name.to_owned(), existing: display(&components[..=i]) });
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                let io_err = |source| UnpackError::Io { path: name.to_owned(), source };
                DirBuilder::new().mode(0o755).create(&path).map_err(io_err)?;
                // The umask may have removed bits from the mode above.
                fs::set_permissions(&path, Permissions::from_mode(0o755)).map_err(io_err)?;
            }
            Err(source) => {
                return Err(UnpackError::Io { path: name.to_owned(), source });
            }
        }
    }
    Ok(())
}

/// Makes sure the parent directories of a non-directory entry exist and that
/// nothing but an earlier regular file is at its path (which is removed,
/// since a later entry for the same path replaces an earlier one in tar).
/// Returns the full path to create.
fn prepare_leaf(dest: &Path, components: &[OsString], name: &str) -> Result<PathBuf, UnpackError> {
    let (_, parents) = components.split_last().expect("empty paths are skipped before this point");
    make_dirs(dest, parents, name)?;
    let path = components.iter().fold(dest.to_path_buf(), |p, c| p.join(c));
    let io_err = |source| UnpackError::Io { path: name.to_owned(), source };
    match fs::symlink_metadata(&path) {
        Ok(meta) if meta.file_type().is_symlink() => {
            Err(UnpackError::ThroughSymlink { path: name.to_owned(), link: display(components) })
        }
        Ok(meta) if meta.is_file() => {
            fs::remove_file(&path).map_err(io_err)?;
            Ok(path)
        }
        Ok(_) => Err(UnpackError::Conflict { path: name.to_owned(), existing: display(components) }),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(path),
        Err(source) => Err(io_err(source)),
    }
}

/// Checks that the symlink at `dest/components...` with `target` resolves
/// to a path inside `dest`, given the symlinks that exist there now.
fn check_symlink(dest: &Path, components: &[OsString], name: &str, target: &Path) -> Result<(), UnpackError> {
    let (_, parent) = components.split_last().expect("empty paths are skipped before this point");
    let mut stack = parent.to_vec();
    let mut budget = MAX_SYMLINK_EXPANSIONS;
    resolve(dest, &mut stack, target, &mut budget).map_err(|err| match err {
        Unresolvable::Escapes => {
            UnpackError::LinkEscapes { path: name.to_owned(), target: target.to_string_lossy().into_owned() }
        }
        Unresolvable::Loop => {
            UnpackError::SymlinkLoop { path: name.to_owned(), target: target.to_string_lossy().into_owned() }
        }
        Unresolvable::Io(source) => UnpackError::Io { path: name.to_owned(), source },
    })
}

/// Why [`resolve`] could not place a path inside `dest`.
enum Unresolvable {
    Escapes,
    Loop,
    Io(io::Error),
}

/// Resolves `target` the way the kernel would, starting from the directory
/// `dest/stack...` and following the symlinks that exist under `dest`, and
/// leaves the result in `stack`. Fails if the path would leave `dest`.
///
/// Components that do not exist are taken lexically: the kernel would fail
/// to resolve them, so they cannot lead anywhere, and if a later entry
/// creates them the final check in [`unpack`] sees it. `budget` counts the
/// symlink expansions left, shared across the recursion so that nested links
/// cannot make the work grow exponentially.
fn resolve(dest: &Path, stack: &mut Vec<OsString>, target: &Path, budget: &mut u32) -> Result<(), Unresolvable> {
    for component in target.components() {
        match component {
            Component::RootDir | Component::Prefix(_) => return Err(Unresolvable::Escapes),
            Component::CurDir => {}
            Component::ParentDir => {
                if stack.pop().is_none() {
                    return Err(Unresolvable::Escapes);
                }
            }
            Component::Normal(part) => {
                stack.push(part.to_owned());
                let here = stack.iter().fold(dest.to_path_buf(), |p, c| p.join(c));
                // Every entry's path is short enough for the system to open,
                // and nothing is created through a symlink, so nothing
                // exists at a longer path: it is missing, like below. (The
                // system would refuse to look it up at all.)
                if here.as_os_str().len() > MAX_PATH_BYTES {
                    continue;
                }
                match fs::symlink_metadata(&here) {
                    Ok(meta) if meta.file_type().is_symlink() => {
                        if *budget == 0 {
                            return Err(Unresolvable::Loop);
                        }
                        *budget -= 1;
                        let next = fs::read_link(&here).map_err(Unresolvable::Io)?;
                        stack.pop();
                        resolve(dest, stack, &next, budget)?;
                    }
                    Ok(_) => {}
                    Err(err) if is_missing(&err) => {}
                    Err(err) => return Err(Unresolvable::Io(err)),
                }
            }
        }
    }
    Ok(())
}

/// Whether an error means the path does not exist (or cannot, because a
/// parent is not a directory).
fn is_missing(err: &io::Error) -> bool {
    matches!(err.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory)
}

/// Joins path components for use in an error message.
fn display(components: &[OsString]) -> String {
    components.iter().map(|c| c.to_string_lossy()).collect::<Vec<_>>().join("/")
}

/// Escapes control characters and other characters that are not printable,
/// the way `{:?}` does but without quoting, so that text from an archive
/// (such as the tar crate's messages, which quote entry names) cannot drive
/// the terminal an error message is printed on.
fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '"' | '\'' | '\\' => out.push(c),
            _ => out.extend(c.escape_debug()),
        }
    }
    out
}

/// An entry's name quoted for an error message and, if it is long, cut
/// short with its length in bytes.
fn abbreviated(name: &str) -> String {
    match name.char_indices().nth(MAX_NAME_SHOWN) {
        Some((end, _)) => format!("{:?}... ({} bytes)", &name[..end], name.len()),
        None => format!("{name:?}"),
    }
}

/// A human-readable name for an entry type that [`unpack`] refuses.
fn kind_name(kind: EntryType) -> &'static str {
    match kind {
        EntryType::Char => "character device",
        EntryType::Block => "block device",
        EntryType::Fifo => "fifo",
        EntryType::GNUSparse => "sparse file",
        EntryType::GNULongName | EntryType::GNULongLink => "stray GNU long-name record",
        _ => "entry of an unsupported type",
    }
}

/// How many more bytes [`unpack`] lets the tar crate read from the
/// decompressed stream, which it sets as it goes, and whether a read went
/// past that.
struct StreamBudget {
    remaining: Cell<u64>,
    tripped: Cell<bool>,
}

impl StreamBudget {
    /// Lets exactly `bytes` more bytes be read, whatever was left before.
    fn allow(&self, bytes: u64) {
        self.remaining.set(bytes);
    }
}

/// Reads from `inner` no more than the budget allows, then fails and records
/// that it did in the budget, so the caller can report the failure as
/// [`UnpackError::TooLarge`] even though the tar crate wraps the error.
struct LimitedReader<R> {
    inner: R,
    budget: Rc<StreamBudget>,
}

impl<R: Read> Read for LimitedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let remaining = self.budget.remaining.get();
        if remaining == 0 {
            // A read of zero bytes from the decompressor means a clean end
            // of stream, which is not over the limit; only data beyond the
            // limit is.
            let mut probe = [0u8; 1];
            if self.inner.read(&mut probe)? == 0 {
                return Ok(0);
            }
            self.budget.tripped.set(true);
            return Err(io::Error::other("the decompressed archive exceeds the server's limit"));
        }
        let max = usize::try_from(remaining).unwrap_or(usize::MAX).min(buf.len());
        let n = self.inner.read(&mut buf[..max])?;
        self.budget.remaining.set(remaining - n as u64);
        Ok(n)
    }
}
