//! Safe unpacking of `runtime_env.working_dir` archives: gzip-compressed tar archives
//! that the CLI packed from a user's directory and the agent unpacks into a task's
//! directory.
//!
//! The archive comes from a user, so nothing in it is trusted. Unpacking takes two
//! passes over it. The first reads the whole archive and checks every entry: its path
//! (relative, no `..`, UTF-8, not through a symlink of the archive), its type (regular
//! file, directory, symlink or hard link), its link target (inside the task directory,
//! following the archive's other symlinks as the kernel would), and the totals against
//! the node's limits. Only when every entry passed does the second pass write anything,
//! so a refused archive leaves the destination as it found it.
//!
//! The second pass writes files itself rather than through the tar crate's unpacking, so
//! the rules above are the only ones that apply: files are created with `O_EXCL` and
//! `O_NOFOLLOW` (never through a symlink that was already there), modes are 0o755 or
//! 0o644 by the archive's execute bit (never setuid, setgid or sticky), owners and mtimes
//! are not kept.

use flate2::read::GzDecoder;
use std::cell::Cell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use tar::EntryType;

/// What a node accepts from one archive.
#[derive(Clone, Debug)]
pub struct UnpackLimits {
    /// The most content the entries may declare in total, uncompressed.
    pub max_bytes: u64,
    /// The most entries (files, directories and links) an archive may have.
    pub max_entries: u64,
}

impl Default for UnpackLimits {
    fn default() -> Self {
        UnpackLimits {
            max_bytes: 4 << 30,
            max_entries: 200_000,
        }
    }
}

/// What was unpacked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Unpacked {
    /// Entries that are not directories: regular files, hard links and symlinks.
    pub files: u64,
    /// The content of the regular files, in bytes.
    pub bytes: u64,
}

/// Why an archive was refused or could not be unpacked. Every message names the archive
/// entry or the file concerned.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("working_dir archive {}: {error}", archive.display())]
    Open { archive: PathBuf, error: io::Error },
    #[error("working_dir archive {} is corrupt or truncated: {error}", archive.display())]
    Corrupt { archive: PathBuf, error: io::Error },
    /// An entry broke one of the rules; nothing was written.
    #[error("working_dir archive: entry {path:?} {reason}")]
    Entry { path: String, reason: String },
    #[error(
        "working_dir archive: more than {limit} entries, which is this node's limit; \
         leave out what the job does not need with .droverignore"
    )]
    TooManyEntries { limit: u64 },
    #[error(
        "working_dir archive: its entries up to {path:?} declare more than {limit} bytes, \
         which is this node's limit; leave out what the job does not need with .droverignore"
    )]
    TooLarge { limit: u64, path: String },
    #[error(
        "working_dir archive: more than {limit} bytes after decompression, far more than \
         its entries can account for"
    )]
    Decompressed { limit: u64 },
    /// The second pass read something other than what the first pass checked.
    #[error(
        "working_dir archive {} changed while it was being unpacked (at entry {path:?}); \
         the task directory may hold part of it",
        archive.display()
    )]
    Changed { archive: PathBuf, path: String },
    #[error("working_dir destination {}: {reason}", dest.display())]
    Dest { dest: PathBuf, reason: String },
    /// Writing failed after every entry was checked, so the destination may hold part of
    /// the archive.
    #[error("unpacking the working_dir archive: {what} {}: {error}", path.display())]
    Write {
        path: PathBuf,
        what: &'static str,
        error: io::Error,
    },
}

/// The longest file name Linux accepts (`NAME_MAX`).
const MAX_NAME: usize = 255;

/// The longest path Linux accepts, counting its terminating NUL (`PATH_MAX`).
const MAX_PATH: usize = 4096;

/// Decompressed bytes an entry may take beyond its declared content: its header, the
/// padding of its content to 512 bytes, and GNU long-name, long-link and pax headers
/// for paths and targets up to `MAX_PATH`.
const ENTRY_OVERHEAD: u64 = 16 * 1024;

/// Decompressed bytes an archive may take beyond its entries: the end-of-archive blocks
/// and the padding that tar writers add after them.
const ARCHIVE_OVERHEAD: u64 = 1 << 20;

/// The piece size for copying file contents out of the archive.
const COPY_BUFFER: usize = 64 * 1024;

/// Unpacks a gzip-compressed tar archive into `dest` (an existing, normally empty
/// directory).
///
/// The whole archive is checked before anything is written; a refused archive writes
/// nothing. An I/O error while writing (a full disk, say) can leave part of the archive
/// in `dest`, which the caller removes with the task directory.
pub fn unpack(archive: &Path, dest: &Path, limits: &UnpackLimits) -> Result<Unpacked, UnpackError> {
    match fs::metadata(dest) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(UnpackError::Dest {
                dest: dest.to_path_buf(),
                reason: "not a directory; expected the task's directory".into(),
            });
        }
        Err(e) => {
            return Err(UnpackError::Dest {
                dest: dest.to_path_buf(),
                reason: format!("{e}; expected the task's existing directory"),
            });
        }
    }
    let plan = scan(archive, dest, limits)?;
    extract(archive, dest, limits, &plan)
}

// The symlink rule lives in core, so the CLI checks a directory when it packs it without
// depending on the agent.
pub use drover_core::symlinks::{SymlinkEscape, check_symlinks};

/// What an entry makes.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Kind {
    Dir,
    File {
        size: u64,
        executable: bool,
    },
    Symlink {
        target: String,
    },
    /// A hard link to an earlier regular file, by its path in the archive.
    HardLink {
        target: String,
    },
}

/// An entry that passed the checks.
#[derive(Debug)]
struct Planned {
    /// The path as the archive has it, to recognise the entry in the second pass.
    raw: Vec<u8>,
    /// The checked path: its components joined with `/`.
    path: String,
    kind: Kind,
}

/// What a path of the archive is, as far as the entries read so far say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Node {
    /// A directory that only appears as the parent of other entries.
    ImpliedDir,
    Dir,
    /// A regular file or a hard link to one.
    File,
    Symlink,
}

/// Limits the decompressed bytes read, so that a small archive cannot make the agent
/// decompress without end (a gzip bomb past the end-of-archive blocks, or huge headers).
struct Budget<R> {
    inner: R,
    left: u64,
    /// Set when the budget ran out, to tell that error apart from a corrupt archive
    /// (the tar crate passes read errors on without a way to recognise them).
    exceeded: Rc<Cell<bool>>,
}

impl<R: Read> Read for Budget<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n as u64 > self.left {
            self.exceeded.set(true);
            return Err(io::Error::other(
                "more decompressed data than the entries account for",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// An archive file, decompressed, within the budget.
type Reader = Budget<GzDecoder<BufReader<fs::File>>>;

/// Opens the archive for one pass: the file, decompressed, within the budget.
fn open(
    archive: &Path,
    limits: &UnpackLimits,
) -> Result<(tar::Archive<Reader>, Rc<Cell<bool>>), UnpackError> {
    let file = fs::File::open(archive).map_err(|error| UnpackError::Open {
        archive: archive.to_path_buf(),
        error,
    })?;
    let exceeded = Rc::new(Cell::new(false));
    let budget = Budget {
        inner: GzDecoder::new(BufReader::new(file)),
        left: budget(limits),
        exceeded: exceeded.clone(),
    };
    Ok((tar::Archive::new(budget), exceeded))
}

fn budget(limits: &UnpackLimits) -> u64 {
    limits
        .max_bytes
        .saturating_add(limits.max_entries.saturating_mul(ENTRY_OVERHEAD))
        .saturating_add(ARCHIVE_OVERHEAD)
}

/// Turns a read error into the right refusal: over the budget, or corrupt.
fn read_error(
    archive: &Path,
    limits: &UnpackLimits,
    exceeded: &Cell<bool>,
    error: io::Error,
) -> UnpackError {
    if exceeded.get() {
        UnpackError::Decompressed {
            limit: budget(limits),
        }
    } else {
        UnpackError::Corrupt {
            archive: archive.to_path_buf(),
            error,
        }
    }
}

/// The first pass: reads the whole archive and checks every entry, writing nothing.
fn scan(archive: &Path, dest: &Path, limits: &UnpackLimits) -> Result<Vec<Planned>, UnpackError> {
    let (mut ar, exceeded) = open(archive, limits)?;
    let fail = |e: io::Error| read_error(archive, limits, &exceeded, e);
    // Paths are checked against PATH_MAX as they will be written, under `dest`.
    let room = MAX_PATH.saturating_sub(dest.as_os_str().len() + 2);
    let mut plan = Vec::new();
    let mut tree: HashMap<String, Node> = HashMap::new();
    let mut symlinks: BTreeMap<String, String> = BTreeMap::new();
    let mut entries = 0u64;
    let mut declared = 0u64;
    for entry in ar.entries().map_err(&fail)? {
        let entry = entry.map_err(&fail)?;
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        entries += 1;
        if entries > limits.max_entries {
            return Err(UnpackError::TooManyEntries {
                limit: limits.max_entries,
            });
        }
        declared = declared.saturating_add(entry.size());
        if declared > limits.max_bytes {
            return Err(UnpackError::TooLarge {
                limit: limits.max_bytes,
                path: shown,
            });
        }
        let refuse = |reason: String| UnpackError::Entry {
            path: shown.clone(),
            reason,
        };
        let ty = entry.header().entry_type();
        if ty == EntryType::XGlobalHeader {
            // Global pax headers (`git archive` writes one) only carry metadata such as
            // a commit id; nothing here reads them.
            continue;
        }
        let components = checked_path(&raw, room).map_err(&refuse)?;
        if components.is_empty() {
            if ty == EntryType::Directory {
                // `tar -C dir .` writes `./` for the directory itself, which exists.
                continue;
            }
            return Err(refuse(
                "names the task directory itself; expected a file inside it".into(),
            ));
        }
        let path = components.join("/");
        let (kind, node) = match ty {
            EntryType::Regular => {
                let mode = entry
                    .header()
                    .mode()
                    .map_err(|e| refuse(format!("has an unreadable mode: {e}")))?;
                let kind = Kind::File {
                    size: entry.size(),
                    executable: mode & 0o111 != 0,
                };
                (kind, Node::File)
            }
            EntryType::Directory => (Kind::Dir, Node::Dir),
            EntryType::Symlink => {
                let target = link_target(&entry, "symlink").map_err(&refuse)?;
                if target.starts_with('/') {
                    return Err(refuse(format!(
                        "is a symlink to {target:?}, an absolute path; only relative links \
                         inside the task directory are allowed"
                    )));
                }
                if target.len() >= MAX_PATH {
                    return Err(refuse(format!(
                        "is a symlink whose target is longer than {} bytes",
                        MAX_PATH - 1
                    )));
                }
                symlinks.insert(path.clone(), target.clone());
                (Kind::Symlink { target }, Node::Symlink)
            }
            EntryType::Link => {
                let target = link_target(&entry, "hard link").map_err(&refuse)?;
                let target_path = checked_path(target.as_bytes(), room)
                    .map_err(|why| refuse(format!("is a hard link to {target:?}, which {why}")))?
                    .join("/");
                if tree.get(&target_path) != Some(&Node::File) {
                    return Err(refuse(format!(
                        "is a hard link to {target:?}, which is not an earlier regular file \
                         of the archive"
                    )));
                }
                (
                    Kind::HardLink {
                        target: target_path,
                    },
                    Node::File,
                )
            }
            other => return Err(refuse(format!("is {}", describe(other)))),
        };
        place(&mut tree, &components, node).map_err(&refuse)?;
        plan.push(Planned { raw, path, kind });
    }
    // Symlinks are checked once all of them are known: whether a target stays inside
    // depends on the links it goes through, which may come later in the archive.
    if let Err(escape) = check_symlinks(&symlinks, "the task directory") {
        return Err(UnpackError::Entry {
            path: escape.link,
            reason: format!(
                "is a symlink to {:?}, which {}",
                escape.target, escape.reason
            ),
        });
    }
    // Reading on to the end of the gzip stream checks its length and checksum, so a
    // truncated or altered archive is refused even when its tar blocks happen to end
    // early.
    io::copy(&mut ar.into_inner(), &mut io::sink()).map_err(&fail)?;
    Ok(plan)
}

/// An entry type the archive may not have, for messages.
fn describe(ty: EntryType) -> String {
    let what = match ty {
        EntryType::Char => "a character device",
        EntryType::Block => "a block device",
        EntryType::Fifo => "a fifo",
        EntryType::GNUSparse => "a sparse file",
        EntryType::Continuous => "a contiguous file",
        other => {
            return format!(
                "of unsupported type {:?}; expected a regular file, directory, symlink or \
                 hard link",
                other.as_byte() as char
            );
        }
    };
    format!("{what}; expected a regular file, directory, symlink or hard link")
}

/// The target of a symlink or hard link entry, as UTF-8.
fn link_target<R: Read>(entry: &tar::Entry<'_, R>, what: &str) -> Result<String, String> {
    let Some(bytes) = entry.link_name_bytes() else {
        return Err(format!("is a {what} without a target"));
    };
    if bytes.is_empty() {
        return Err(format!("is a {what} with an empty target"));
    }
    String::from_utf8(bytes.into_owned()).map_err(|e| {
        format!(
            "is a {what} to {:?}, which is not valid UTF-8",
            String::from_utf8_lossy(e.as_bytes())
        )
    })
}

/// Checks an archive path and returns its components (none for the archive's root).
/// `room` is how long the path may be under the destination.
fn checked_path(raw: &[u8], room: usize) -> Result<Vec<String>, String> {
    if raw.is_empty() {
        return Err("has an empty path".into());
    }
    let Ok(text) = std::str::from_utf8(raw) else {
        return Err("has a path that is not valid UTF-8".into());
    };
    if text.starts_with('/') {
        return Err("is an absolute path; expected a path relative to the task directory".into());
    }
    let mut components = Vec::new();
    for c in text.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err("leaves the task directory (.. component)".into()),
            name if name.len() > MAX_NAME => {
                return Err(format!("has a name longer than {MAX_NAME} bytes"));
            }
            name => components.push(name.to_string()),
        }
    }
    let len = components.iter().map(|c| c.len() + 1).sum::<usize>();
    if len > room {
        return Err(format!(
            "has a path too long to create in the task directory (over {room} bytes)"
        ));
    }
    Ok(components)
}

/// Records an entry in the tree of the entries read so far, refusing duplicates and
/// paths that go through a file or a symlink of the archive.
fn place(
    tree: &mut HashMap<String, Node>,
    components: &[String],
    node: Node,
) -> Result<(), String> {
    let mut prefix = String::new();
    for c in &components[..components.len() - 1] {
        if !prefix.is_empty() {
            prefix.push('/');
        }
        prefix.push_str(c);
        match tree.get(&prefix) {
            None => {
                tree.insert(prefix.clone(), Node::ImpliedDir);
            }
            Some(Node::ImpliedDir | Node::Dir) => {}
            Some(Node::Symlink) => {
                return Err(format!(
                    "goes through {prefix:?}, a symlink earlier in the archive; paths through \
                     symlinks are not allowed"
                ));
            }
            Some(Node::File) => {
                return Err(format!(
                    "goes through {prefix:?}, a file earlier in the archive; expected a directory"
                ));
            }
        }
    }
    let path = components.join("/");
    match (tree.get(&path), node) {
        (None, _) => {
            tree.insert(path, node);
            Ok(())
        }
        (Some(Node::ImpliedDir), Node::Dir) => {
            tree.insert(path, Node::Dir);
            Ok(())
        }
        (Some(Node::ImpliedDir), _) => {
            Err("is not a directory, but earlier entries of the archive are inside it".into())
        }
        (Some(_), _) => Err("appears more than once in the archive".into()),
    }
}

/// The second pass: writes what the first pass checked. Each entry is compared with
/// what the first pass saw, so an archive that changed in between is caught before its
/// new entries are written.
fn extract(
    archive: &Path,
    dest: &Path,
    limits: &UnpackLimits,
    plan: &[Planned],
) -> Result<Unpacked, UnpackError> {
    let (mut ar, exceeded) = open(archive, limits)?;
    let fail = |e: io::Error| read_error(archive, limits, &exceeded, e);
    let mut dirs = Dirs {
        dest,
        made: HashSet::new(),
    };
    let mut done = Unpacked::default();
    let mut next = plan.iter();
    for entry in ar.entries().map_err(&fail)? {
        let mut entry = entry.map_err(&fail)?;
        let raw = entry.path_bytes().into_owned();
        let ty = entry.header().entry_type();
        let changed = || UnpackError::Changed {
            archive: archive.to_path_buf(),
            path: String::from_utf8_lossy(&raw).into_owned(),
        };
        if ty == EntryType::XGlobalHeader {
            continue;
        }
        if ty == EntryType::Directory && checked_path(&raw, usize::MAX).is_ok_and(|c| c.is_empty())
        {
            // The archive's root, skipped by the first pass too.
            continue;
        }
        let Some(planned) = next.next() else {
            return Err(changed());
        };
        if planned.raw != raw || !same_kind(&planned.kind, &entry) {
            return Err(changed());
        }
        let path = dest.join(&planned.path);
        let parent = planned.path.rsplit_once('/').map(|(p, _)| p);
        if let Some(parent) = parent {
            dirs.make(parent)?;
        }
        match &planned.kind {
            Kind::Dir => dirs.make(&planned.path)?,
            Kind::File { size, executable } => {
                let mode = if *executable { 0o755 } else { 0o644 };
                let file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)
                    .map_err(write_error(&path, "creating"))?;
                let copied = copy(&mut entry, &file, *size, &path, &fail)?;
                if copied != *size {
                    return Err(changed());
                }
                // The mode given at creation is narrowed by the umask; this sets it
                // exactly, on the open file so no symlink is followed.
                file.set_permissions(fs::Permissions::from_mode(mode))
                    .map_err(write_error(&path, "setting the mode of"))?;
                done.files += 1;
                done.bytes += size;
            }
            Kind::Symlink { target } => {
                std::os::unix::fs::symlink(target, &path)
                    .map_err(write_error(&path, "creating the symlink"))?;
                done.files += 1;
            }
            Kind::HardLink { target } => {
                // `link(2)` does not follow a symlink at the source, and the first pass
                // made sure the source is a regular file written earlier.
                fs::hard_link(dest.join(target), &path)
                    .map_err(write_error(&path, "creating the hard link"))?;
                done.files += 1;
            }
        }
    }
    if next.next().is_some() {
        return Err(UnpackError::Changed {
            archive: archive.to_path_buf(),
            path: "(the end of the archive)".into(),
        });
    }
    Ok(done)
}

/// Copies up to `size` bytes of an entry's content into `file`, telling read errors
/// (the archive's) from write errors (the destination's). Returns the bytes copied.
fn copy(
    entry: &mut impl Read,
    file: &fs::File,
    size: u64,
    path: &Path,
    fail: &impl Fn(io::Error) -> UnpackError,
) -> Result<u64, UnpackError> {
    let mut out = BufWriter::with_capacity(COPY_BUFFER, file);
    let mut buf = vec![0u8; COPY_BUFFER];
    let mut copied = 0u64;
    while copied < size {
        let want = buf
            .len()
            .min(usize::try_from(size - copied).unwrap_or(usize::MAX));
        let n = match entry.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(fail(e)),
        };
        out.write_all(&buf[..n])
            .map_err(write_error(path, "writing"))?;
        copied += n as u64;
    }
    out.flush().map_err(write_error(path, "writing"))?;
    Ok(copied)
}

/// Whether a second-pass entry is what the first pass planned for it.
fn same_kind<R: Read>(kind: &Kind, entry: &tar::Entry<'_, R>) -> bool {
    let ty = entry.header().entry_type();
    let link = entry.link_name_bytes();
    let link = link.as_deref();
    match kind {
        Kind::Dir => ty == EntryType::Directory,
        Kind::File { size, executable } => {
            ty == EntryType::Regular
                && entry.size() == *size
                && entry
                    .header()
                    .mode()
                    .is_ok_and(|m| (m & 0o111 != 0) == *executable)
        }
        Kind::Symlink { target } => ty == EntryType::Symlink && link == Some(target.as_bytes()),
        Kind::HardLink { target } => {
            ty == EntryType::Link
                && link
                    .and_then(|l| checked_path(l, usize::MAX).ok())
                    .is_some_and(|c| c.join("/") == *target)
        }
    }
}

fn write_error(path: &Path, what: &'static str) -> impl FnOnce(io::Error) -> UnpackError {
    let path = path.to_path_buf();
    move |error| UnpackError::Write { path, what, error }
}

/// The directories made under the destination, so each is checked and made once.
struct Dirs<'a> {
    dest: &'a Path,
    made: HashSet<String>,
}

impl Dirs<'_> {
    /// Makes the directory `rel` (a checked path) and its parents, with mode 0o755.
    /// Something other than a directory already in the way, a symlink above all, is an
    /// error: it is never followed.
    fn make(&mut self, rel: &str) -> Result<(), UnpackError> {
        if self.made.contains(rel) {
            return Ok(());
        }
        let mut prefix = String::new();
        for c in rel.split('/') {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(c);
            if self.made.contains(&prefix) {
                continue;
            }
            let path = self.dest.join(&prefix);
            match fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(UnpackError::Write {
                        path,
                        what: "making the directory",
                        error: io::Error::new(
                            io::ErrorKind::AlreadyExists,
                            "something other than a directory is already there",
                        ),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::DirBuilder::new()
                        .mode(0o755)
                        .create(&path)
                        .map_err(write_error(&path, "making the directory"))?;
                    // Sets the mode exactly (the umask narrowed it), through a handle
                    // opened without following symlinks.
                    let dir = fs::OpenOptions::new()
                        .read(true)
                        .custom_flags(libc::O_NOFOLLOW | libc::O_DIRECTORY)
                        .open(&path)
                        .map_err(write_error(&path, "opening the directory"))?;
                    dir.set_permissions(fs::Permissions::from_mode(0o755))
                        .map_err(write_error(&path, "setting the mode of"))?;
                }
                Err(e) => return Err(write_error(&path, "making the directory")(e)),
            }
            self.made.insert(prefix.clone());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::Compression;
    use flate2::write::GzEncoder;
    use std::os::unix::fs::MetadataExt;
    use tar::Header;

    /// One entry of a test archive, written with raw header fields so that archives the
    /// tar crate's builder refuses to make can be made.
    struct Raw<'a> {
        name: &'a [u8],
        ty: EntryType,
        link: &'a [u8],
        data: &'a [u8],
        mode: u32,
    }

    fn file<'a>(name: &'a str, data: &'a [u8]) -> Raw<'a> {
        Raw {
            name: name.as_bytes(),
            ty: EntryType::Regular,
            link: b"",
            data,
            mode: 0o644,
        }
    }

    fn dir(name: &str) -> Raw<'_> {
        Raw {
            name: name.as_bytes(),
            ty: EntryType::Directory,
            link: b"",
            data: b"",
            mode: 0o755,
        }
    }

    fn symlink<'a>(name: &'a str, target: &'a str) -> Raw<'a> {
        Raw {
            name: name.as_bytes(),
            ty: EntryType::Symlink,
            link: target.as_bytes(),
            data: b"",
            mode: 0o777,
        }
    }

    fn hardlink<'a>(name: &'a str, target: &'a str) -> Raw<'a> {
        Raw {
            ty: EntryType::Link,
            ..symlink(name, target)
        }
    }

    fn raw_tar(entries: &[Raw<'_>]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = Header::new_gnu();
            let old = h.as_old_mut();
            old.name[..e.name.len()].copy_from_slice(e.name);
            old.linkname[..e.link.len()].copy_from_slice(e.link);
            h.set_entry_type(e.ty);
            h.set_mode(e.mode);
            h.set_size(e.data.len() as u64);
            h.set_mtime(0);
            h.set_cksum();
            b.append(&h, e.data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn gzip(tar: &[u8]) -> Vec<u8> {
        let mut gz = GzEncoder::new(Vec::new(), Compression::default());
        gz.write_all(tar).unwrap();
        gz.finish().unwrap()
    }

    /// A task directory `dest` inside a parent that also holds a sentinel directory,
    /// and the archive beside them.
    struct Scene {
        _root: tempfile::TempDir,
        parent: PathBuf,
        dest: PathBuf,
        archive: PathBuf,
    }

    fn scene(archive: &[u8]) -> Scene {
        let root = tempfile::tempdir().unwrap();
        let parent = root.path().join("tasks");
        let dest = parent.join("task");
        fs::create_dir_all(&dest).unwrap();
        fs::create_dir_all(parent.join("sentinel/sub")).unwrap();
        fs::write(parent.join("sentinel/keep"), b"keep").unwrap();
        let archive_path = root.path().join("wd.tar.gz");
        fs::write(&archive_path, archive).unwrap();
        Scene {
            parent,
            dest,
            archive: archive_path,
            _root: root,
        }
    }

    /// Every path under `dir` with its type and content, to compare before and after.
    fn listing(dir: &Path) -> Vec<(PathBuf, String)> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                let m = fs::symlink_metadata(&p).unwrap();
                let what = if m.is_dir() {
                    stack.push(p.clone());
                    "dir".to_string()
                } else if m.file_type().is_symlink() {
                    format!("link {:?}", fs::read_link(&p).unwrap())
                } else {
                    format!("file {:?}", fs::read(&p).unwrap())
                };
                out.push((p, what));
            }
        }
        out.sort();
        out
    }

    /// Unpacks an archive that must be refused and checks that nothing was written:
    /// `dest` is still empty and the rest of its parent unchanged. Returns the message.
    fn refused(archive: &[u8]) -> String {
        let s = scene(archive);
        let before = listing(&s.parent);
        let err = unpack(&s.archive, &s.dest, &UnpackLimits::default())
            .expect_err("the archive must be refused");
        assert_eq!(listing(&s.parent), before, "{err}");
        assert_eq!(fs::read_dir(&s.dest).unwrap().count(), 0, "{err}");
        err.to_string()
    }

    #[test]
    fn dotdot_is_refused_and_nothing_is_written() {
        // A valid entry comes first: it must not be written either.
        let msg = refused(&gzip(&raw_tar(&[
            file("ok.txt", b"fine"),
            file("../evil", b"x"),
        ])));
        assert_eq!(
            msg,
            "working_dir archive: entry \"../evil\" leaves the task directory (.. component)"
        );
    }

    #[test]
    fn absolute_path_is_refused() {
        let msg = refused(&gzip(&raw_tar(&[file("/etc/evil", b"x")])));
        assert!(
            msg.contains("\"/etc/evil\"") && msg.contains("absolute"),
            "{msg}"
        );
    }

    #[test]
    fn dotdot_in_the_middle_is_refused() {
        let msg = refused(&gzip(&raw_tar(&[dir("a/"), file("a/../../evil", b"x")])));
        assert!(
            msg.contains("\"a/../../evil\"") && msg.contains(".."),
            "{msg}"
        );
    }

    #[test]
    fn absolute_symlink_is_refused() {
        let msg = refused(&gzip(&raw_tar(&[symlink("x", "/etc")])));
        assert!(
            msg.contains("entry \"x\"") && msg.contains("\"/etc\""),
            "{msg}"
        );
    }

    #[test]
    fn escaping_symlink_is_refused() {
        let msg = refused(&gzip(&raw_tar(&[symlink("x", "../..")])));
        assert!(
            msg.contains("entry \"x\"") && msg.contains("leaves the task directory"),
            "{msg}"
        );
        // From a subdirectory, one `..` is fine but two leave.
        let msg = refused(&gzip(&raw_tar(&[
            dir("a/"),
            symlink("a/up", ".."),
            symlink("a/out", "../../x"),
        ])));
        assert!(msg.contains("entry \"a/out\""), "{msg}");
    }

    #[test]
    fn symlink_chain_that_escapes_is_refused() {
        // Each target stays inside when read on its own, but `s/u` is the root, so
        // `s/u/..` is the root's parent.
        let msg = refused(&gzip(&raw_tar(&[
            dir("d/"),
            symlink("d/u", ".."),
            symlink("s", "d"),
            symlink("t", "s/u/.."),
        ])));
        assert!(
            msg.contains("entry \"t\"") && msg.contains("through the symlink"),
            "{msg}"
        );
    }

    #[test]
    fn path_through_symlink_is_refused() {
        let msg = refused(&gzip(&raw_tar(&[
            dir("sub/"),
            symlink("link", "sub"),
            file("link/file", b"x"),
        ])));
        assert!(
            msg.contains("entry \"link/file\"") && msg.contains("symlink"),
            "{msg}"
        );
        // The other order: a directory used by earlier entries cannot become a link.
        let msg = refused(&gzip(&raw_tar(&[
            dir("sub/"),
            file("link/file", b"x"),
            symlink("link", "sub"),
        ])));
        assert!(msg.contains("entry \"link\""), "{msg}");
    }

    #[test]
    fn hard_link_out_is_refused() {
        let msg = refused(&gzip(&raw_tar(&[hardlink("h", "../x")])));
        assert!(
            msg.contains("entry \"h\"") && msg.contains("\"../x\""),
            "{msg}"
        );
        let msg = refused(&gzip(&raw_tar(&[hardlink("h", "/etc/passwd")])));
        assert!(msg.contains("entry \"h\""), "{msg}");
        // Only to an earlier regular file.
        let msg = refused(&gzip(&raw_tar(&[
            hardlink("h", "later"),
            file("later", b"x"),
        ])));
        assert!(
            msg.contains("entry \"h\"") && msg.contains("earlier"),
            "{msg}"
        );
        let msg = refused(&gzip(&raw_tar(&[dir("d/"), hardlink("h", "d")])));
        assert!(msg.contains("entry \"h\""), "{msg}");
    }

    #[test]
    fn special_files_are_refused() {
        for (ty, what) in [
            (EntryType::Fifo, "fifo"),
            (EntryType::Char, "character device"),
            (EntryType::Block, "block device"),
        ] {
            let msg = refused(&gzip(&raw_tar(&[
                file("ok", b"x"),
                Raw {
                    ty,
                    ..file("dev", b"")
                },
            ])));
            assert!(msg.contains("entry \"dev\"") && msg.contains(what), "{msg}");
        }
    }

    #[test]
    fn duplicate_path_is_refused() {
        let msg = refused(&gzip(&raw_tar(&[file("a", b"1"), file("./a", b"2")])));
        assert!(
            msg.contains("entry \"./a\"") && msg.contains("more than once"),
            "{msg}"
        );
        let msg = refused(&gzip(&raw_tar(&[dir("a/"), dir("a")])));
        assert!(msg.contains("more than once"), "{msg}");
        // A file where earlier entries need a directory.
        let msg = refused(&gzip(&raw_tar(&[file("a/b", b"1"), file("a", b"2")])));
        assert!(msg.contains("entry \"a\""), "{msg}");
    }

    #[test]
    fn empty_and_non_utf8_paths_are_refused() {
        let msg = refused(&gzip(&raw_tar(&[file("", b"x")])));
        assert!(msg.contains("empty path"), "{msg}");
        let msg = refused(&gzip(&raw_tar(&[Raw {
            name: b"bad\xff",
            ..file("", b"x")
        }])));
        assert!(msg.contains("UTF-8") && msg.contains("bad"), "{msg}");
    }

    #[test]
    fn limits_are_enforced_before_writing() {
        let s = scene(&gzip(&raw_tar(&[
            file("a", &[1; 600]),
            file("b", &[2; 600]),
        ])));
        let limits = UnpackLimits {
            max_bytes: 1000,
            max_entries: 10,
        };
        let err = unpack(&s.archive, &s.dest, &limits).unwrap_err();
        assert!(
            matches!(err, UnpackError::TooLarge { limit: 1000, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("\"b\""), "{err}");
        let limits = UnpackLimits {
            max_bytes: 10_000,
            max_entries: 1,
        };
        let err = unpack(&s.archive, &s.dest, &limits).unwrap_err();
        assert!(
            matches!(err, UnpackError::TooManyEntries { limit: 1 }),
            "{err}"
        );
        assert_eq!(fs::read_dir(&s.dest).unwrap().count(), 0);
    }

    #[test]
    fn decompression_is_bounded() {
        // An archive whose gzip stream goes on with zeros long after the tar blocks end.
        let mut tar = raw_tar(&[file("a", b"x")]);
        tar.resize(tar.len() + (4 << 20), 0);
        let s = scene(&gzip(&tar));
        let limits = UnpackLimits {
            max_bytes: 1 << 20,
            max_entries: 10,
        };
        let err = unpack(&s.archive, &s.dest, &limits).unwrap_err();
        assert!(matches!(err, UnpackError::Decompressed { .. }), "{err}");
        assert_eq!(fs::read_dir(&s.dest).unwrap().count(), 0);
    }

    #[test]
    fn truncated_archive_is_refused() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7919 % 251) as u8).collect();
        let whole = gzip(&raw_tar(&[file("first", b"1"), file("big", &data)]));
        let msg = refused(&whole[..whole.len() / 2]);
        assert!(msg.contains("corrupt or truncated"), "{msg}");
        // Cut just before the gzip trailer: the tar blocks are whole, the checksum is not.
        let msg = refused(&whole[..whole.len() - 4]);
        assert!(msg.contains("corrupt or truncated"), "{msg}");
        let msg = refused(b"not a gzip stream at all");
        assert!(msg.contains("corrupt or truncated"), "{msg}");
    }

    #[test]
    fn dest_must_be_a_directory() {
        let s = scene(&gzip(&raw_tar(&[file("a", b"x")])));
        let err = unpack(
            &s.archive,
            &s.dest.join("missing"),
            &UnpackLimits::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn unpacks_a_tree() {
        let long = format!("{}/{}.txt", "d".repeat(90), "f".repeat(60));
        let long_target = format!("../{}", "t".repeat(120));
        let mut b = tar::Builder::new(Vec::new());
        let mut add = |path: &str, ty: EntryType, mode: u32, data: &[u8], link: Option<&str>| {
            let mut h = Header::new_gnu();
            h.set_entry_type(ty);
            h.set_mode(mode);
            h.set_size(data.len() as u64);
            match link {
                // The builder writes GNU long-name and long-link entries as needed.
                Some(l) => b.append_link(&mut h, path, l).unwrap(),
                None => b.append_data(&mut h, path, data).unwrap(),
            }
        };
        add("a/", EntryType::Directory, 0o700, b"", None);
        add("a/b/c/deep.txt", EntryType::Regular, 0o600, b"deep", None);
        add("run.sh", EntryType::Regular, 0o4775, b"#!/bin/sh\n", None);
        add(
            "a/b/link",
            EntryType::Symlink,
            0o777,
            b"",
            Some("../../run.sh"),
        );
        add("a/hard", EntryType::Link, 0o644, b"", Some("run.sh"));
        add(&long, EntryType::Regular, 0o644, b"long", None);
        add(
            "d/long-link",
            EntryType::Symlink,
            0o777,
            b"",
            Some(&long_target),
        );
        add(
            "données/ünïcødé-文件.txt",
            EntryType::Regular,
            0o644,
            b"u",
            None,
        );
        let archive = gzip(&b.into_inner().unwrap());
        let s = scene(&archive);
        let before = listing(&s.parent.join("sentinel"));
        let got = unpack(&s.archive, &s.dest, &UnpackLimits::default()).unwrap();
        assert_eq!(
            got,
            Unpacked {
                files: 7,
                bytes: 4 + 10 + 4 + 1
            }
        );
        let d = &s.dest;
        assert_eq!(fs::read(d.join("a/b/c/deep.txt")).unwrap(), b"deep");
        let mode = |p: &str| fs::symlink_metadata(d.join(p)).unwrap().mode() & 0o7777;
        assert_eq!(mode("run.sh"), 0o755, "setuid is dropped, the x bit kept");
        assert_eq!(mode("a/b/c/deep.txt"), 0o644);
        assert_eq!(mode("a"), 0o755);
        assert_eq!(mode("a/b"), 0o755);
        assert_eq!(
            fs::read_link(d.join("a/b/link")).unwrap(),
            Path::new("../../run.sh")
        );
        assert_eq!(fs::read(d.join("a/b/link")).unwrap(), b"#!/bin/sh\n");
        let run = fs::metadata(d.join("run.sh")).unwrap();
        let hard = fs::metadata(d.join("a/hard")).unwrap();
        assert_eq!(run.ino(), hard.ino());
        assert_eq!(fs::read(d.join(&long)).unwrap(), b"long");
        assert_eq!(
            fs::read_link(d.join("d/long-link")).unwrap(),
            Path::new(&long_target)
        );
        assert_eq!(fs::read(d.join("données/ünïcødé-文件.txt")).unwrap(), b"u");
        assert_eq!(listing(&s.parent.join("sentinel")), before);
    }

    #[test]
    fn accepts_what_tar_writes_for_a_directory() {
        // `tar -C dir .` names the root `./`, and `git archive` starts with a global pax
        // header; both are fine.
        let mut b = tar::Builder::new(Vec::new());
        let mut g = Header::new_ustar();
        g.set_entry_type(EntryType::XGlobalHeader);
        let pax = b"52 comment=0123456789012345678901234567890123456789\n";
        g.set_size(pax.len() as u64);
        g.set_path("pax_global_header").unwrap();
        g.set_cksum();
        b.append(&g, &pax[..]).unwrap();
        let tar = b.into_inner().unwrap();
        let mut tar = tar[..tar.len() - 1024].to_vec();
        tar.extend(raw_tar(&[dir("./"), file("./x", b"x")]));
        let s = scene(&gzip(&tar));
        let got = unpack(&s.archive, &s.dest, &UnpackLimits::default()).unwrap();
        assert_eq!(got, Unpacked { files: 1, bytes: 1 });
        assert_eq!(fs::read(s.dest.join("x")).unwrap(), b"x");
    }

    /// A regular file whose path is given by a pax header, with `name` in the ustar
    /// header itself.
    fn pax_file(pax_path: &str, name: &str) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([("path", pax_path.as_bytes())])
            .unwrap();
        let tar = b.into_inner().unwrap();
        let mut tar = tar[..tar.len() - 1024].to_vec();
        tar.extend(raw_tar(&[file(name, b"pax")]));
        tar
    }

    #[test]
    fn pax_paths_are_used_and_checked() {
        let long = format!("{}/{}", "p".repeat(150), "q".repeat(150));
        let s = scene(&gzip(&pax_file(&long, "short")));
        unpack(&s.archive, &s.dest, &UnpackLimits::default()).unwrap();
        assert_eq!(fs::read(s.dest.join(&long)).unwrap(), b"pax");
        assert!(!s.dest.join("short").exists());
        // The pax path is the one checked, not the harmless name beside it.
        let msg = refused(&gzip(&pax_file("../evil", "ok")));
        assert!(msg.contains("entry \"../evil\""), "{msg}");
    }

    #[test]
    fn does_not_follow_a_symlink_already_in_dest() {
        let s = scene(&gzip(&raw_tar(&[file("a/f", b"x")])));
        std::os::unix::fs::symlink(s.parent.join("sentinel"), s.dest.join("a")).unwrap();
        let before = listing(&s.parent.join("sentinel"));
        let err = unpack(&s.archive, &s.dest, &UnpackLimits::default()).unwrap_err();
        assert!(matches!(err, UnpackError::Write { .. }), "{err}");
        assert_eq!(listing(&s.parent.join("sentinel")), before);
    }

    #[test]
    fn check_symlinks_follows_chains() {
        let links = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect::<BTreeMap<_, _>>()
        };
        // npm workspaces: a package linked into node_modules, and a bin through it.
        let root = "the tree";
        assert_eq!(
            check_symlinks(
                &links(&[
                    ("node_modules/pkg", "../packages/pkg"),
                    ("node_modules/.bin/cli", "../pkg/bin/cli.js"),
                ]),
                root
            ),
            Ok(())
        );
        let err = check_symlinks(&links(&[("a", "b"), ("b", "a")]), root).unwrap_err();
        assert!(err.reason.contains("loop"), "{err}");
        let err = check_symlinks(&links(&[("up", "."), ("x", "up/up/..")]), root).unwrap_err();
        assert_eq!(err.link, "x");
        assert_eq!(err.reason, "leaves the tree through the symlink \"up\"");
    }
}
