//! Packing a local `working_dir` into a deterministic archive, uploaded once as a
//! content-addressed blob and unpacked by the agent into each task's directory.
//!
//! The same directory content always gives the same bytes, so the same digest, and an
//! unchanged directory is not uploaded again: entries are sorted by path, and times,
//! owners and all mode bits but the execute bit are left out.
//!
//! What goes in honours `.gitignore` files (in a git repository or not) and
//! `.droverignore` files (the same syntax), never `.git/`. Only regular files,
//! directories and symlinks that stay inside the directory are packed; anything else is
//! an error naming the file, since the agent would refuse it or the job would not find
//! it where it expects.

use anyhow::{Context, Result, anyhow, bail};
use drover_core::artifact::{Digest, DigestHasher};
use drover_core::quantity::ByteSize;
use flate2::{Compression, GzBuilder};
use std::collections::BTreeMap;
use std::fs;
use std::io::{self, BufWriter, Read, Seek, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use tar::{EntryType, Header};

/// The ignore file for what a job does not need but git should keep (gitignore syntax).
pub const IGNORE_FILE: &str = ".droverignore";

/// The gzip level: fixed, since the digest depends on it.
const GZIP_LEVEL: u32 = 6;

/// How much of a directory may be packed.
#[derive(Clone, Debug)]
pub struct PackLimits {
    /// The most bytes of file content, uncompressed.
    pub max_bytes: u64,
    /// The most entries: files, directories and symlinks.
    pub max_files: u64,
}

impl Default for PackLimits {
    fn default() -> Self {
        PackLimits {
            max_bytes: 1 << 30,
            max_files: 100_000,
        }
    }
}

/// A packed directory.
#[derive(Debug)]
pub struct Packed {
    /// The `.tar.gz`, positioned at its start; deleted when dropped.
    pub file: tempfile::NamedTempFile,
    /// `sha256:<64 hex digits>` of the archive's bytes.
    pub digest: String,
    /// The archive's size in bytes.
    pub size: u64,
    /// Regular files and symlinks packed (directories are not counted).
    pub files: u64,
    /// The content of the regular files, in bytes.
    pub bytes: u64,
}

/// What an entry is, as read from the directory.
enum Kind {
    Dir,
    File { size: u64, executable: bool },
    Symlink { target: String },
}

struct Item {
    /// The path in the archive: relative, `/`-separated.
    rel: String,
    /// The path on disk.
    path: PathBuf,
    kind: Kind,
}

/// Packs `dir` into a deterministic gzip-compressed tar archive in a temporary file.
pub fn pack_dir(dir: &Path, limits: &PackLimits) -> Result<Packed> {
    let meta = fs::metadata(dir)
        .map_err(|e| anyhow!("working_dir {}: {e}; expected a directory", dir.display()))?;
    if !meta.is_dir() {
        bail!(
            "working_dir {}: not a directory; expected a directory to pack",
            dir.display()
        );
    }
    let mut items = collect(dir, limits)?;
    // Sorted by their bytes, which puts every directory before what it holds.
    items.sort_by(|a, b| a.rel.cmp(&b.rel));
    check_links(dir, &items)?;
    write(dir, &items)
}

/// Walks `dir` by the ignore rules and reads what each entry is, within the limits.
fn collect(dir: &Path, limits: &PackLimits) -> Result<Vec<Item>> {
    let mut walk = ignore::WalkBuilder::new(dir);
    walk.standard_filters(false)
        .hidden(false)
        .git_ignore(true)
        .require_git(false)
        .parents(false)
        .git_global(false)
        .git_exclude(false)
        // ripgrep's `.ignore` files are not a convention a job's author expects here.
        .ignore(false)
        .add_custom_ignore_filename(IGNORE_FILE)
        .follow_links(false)
        .filter_entry(|e| e.depth() == 0 || e.file_name() != ".git");
    let too_many = || {
        anyhow!(
            "working_dir {}: more than {} files and directories to pack, which is the limit; \
             list what the job does not need in {IGNORE_FILE} (gitignore syntax)",
            dir.display(),
            limits.max_files
        )
    };
    let mut items = Vec::new();
    let mut bytes = 0u64;
    for entry in walk.build() {
        let entry = entry.with_context(|| format!("packing working_dir {}", dir.display()))?;
        if let Some(err) = entry.error() {
            // A broken ignore file would pack what its author meant to leave out.
            bail!("packing working_dir {}: {err}", dir.display());
        }
        if entry.depth() == 0 {
            continue;
        }
        let path = entry.path().to_path_buf();
        let rel = path
            .strip_prefix(dir)
            .with_context(|| {
                format!(
                    "{} was found while walking {}, but is not inside it",
                    path.display(),
                    dir.display()
                )
            })?
            .to_str()
            .ok_or_else(|| {
                anyhow!(
                    "{}: the path is not valid UTF-8; working_dir paths must be UTF-8",
                    path.display()
                )
            })?
            .to_string();
        let meta = fs::symlink_metadata(&path).with_context(|| format!("{}", path.display()))?;
        let ft = meta.file_type();
        let kind = if ft.is_dir() {
            Kind::Dir
        } else if ft.is_file() {
            bytes += meta.len();
            if bytes > limits.max_bytes {
                bail!(
                    "working_dir {}: more than {} of files to pack, which is the limit; list \
                     what the job does not need in {IGNORE_FILE} (gitignore syntax)",
                    dir.display(),
                    show_bytes(limits.max_bytes)
                );
            }
            Kind::File {
                size: meta.len(),
                executable: meta.permissions().mode() & 0o111 != 0,
            }
        } else if ft.is_symlink() {
            let target = fs::read_link(&path)
                .with_context(|| format!("reading the symlink {}", path.display()))?;
            let target = target.to_str().ok_or_else(|| {
                anyhow!(
                    "{}: the symlink's target {} is not valid UTF-8; working_dir paths must be \
                     UTF-8",
                    path.display(),
                    target.display()
                )
            })?;
            Kind::Symlink {
                target: target.to_string(),
            }
        } else {
            let what = if ft.is_fifo() {
                "a fifo"
            } else if ft.is_socket() {
                "a socket"
            } else if ft.is_char_device() {
                "a character device"
            } else if ft.is_block_device() {
                "a block device"
            } else {
                "of an unknown type"
            };
            bail!(
                "{} is {what}; a working_dir can hold only regular files, directories and \
                 symlinks (list it in {IGNORE_FILE} to leave it out)",
                path.display()
            );
        };
        items.push(Item { rel, path, kind });
        if items.len() as u64 > limits.max_files {
            return Err(too_many());
        }
    }
    Ok(items)
}

/// Refuses symlinks the agent would refuse: absolute targets and targets that leave the
/// directory, with the agent's own rule (which follows the other symlinks packed).
fn check_links(dir: &Path, items: &[Item]) -> Result<()> {
    let links: BTreeMap<String, String> = items
        .iter()
        .filter_map(|i| match &i.kind {
            Kind::Symlink { target } => Some((i.rel.clone(), target.clone())),
            _ => None,
        })
        .collect();
    let root = format!("working_dir {}", dir.display());
    drover_core::symlinks::check_symlinks(&links, &root).map_err(|escape| {
        anyhow!(
            "{} is a symlink to {:?}, which {} (list it in {IGNORE_FILE} to leave it out)",
            dir.join(&escape.link).display(),
            escape.target,
            escape.reason,
        )
    })
}

/// Writes the archive into a temporary file, hashing it on the way.
fn write(dir: &Path, items: &[Item]) -> Result<Packed> {
    let mut file = tempfile::Builder::new()
        .prefix("drover-working-dir-")
        .suffix(".tar.gz")
        .tempfile()
        .context("creating a temporary file for the working_dir archive")?;
    let tmp = file.path().to_path_buf();
    let written = |e: io::Error| anyhow!("writing the working_dir archive {}: {e}", tmp.display());
    let out = Hashing {
        inner: BufWriter::new(file.as_file()),
        hash: Digest::hasher(),
    };
    // No name and no time in the gzip header, so equal content gives equal bytes.
    let gz = GzBuilder::new()
        .mtime(0)
        .write(out, Compression::new(GZIP_LEVEL));
    let mut tar = tar::Builder::new(gz);
    let (mut files, mut bytes) = (0u64, 0u64);
    for item in items {
        match &item.kind {
            Kind::Dir => {
                let mut h = header(EntryType::Directory, 0o755, 0);
                tar.append_data(&mut h, format!("{}/", item.rel), io::empty())
                    .map_err(written)?;
            }
            Kind::File { size, executable } => {
                let mode = if *executable { 0o755 } else { 0o644 };
                let mut h = header(EntryType::Regular, mode, *size);
                let opened = fs::File::open(&item.path)
                    .with_context(|| format!("reading {}", item.path.display()))?;
                let mut data = Exact {
                    inner: opened,
                    left: *size,
                };
                tar.append_data(&mut h, &item.rel, &mut data)
                    .map_err(|e| anyhow!("packing {}: {e}", item.path.display()))?;
                // The header promised `size` bytes; a file that grew since it was read
                // would be packed cut short, so it is an error too.
                let mut more = [0u8; 1];
                let grew = data
                    .inner
                    .read(&mut more)
                    .with_context(|| format!("reading {}", item.path.display()))?;
                if grew > 0 {
                    bail!(
                        "{} changed while it was being packed (it had {size} bytes)",
                        item.path.display()
                    );
                }
                files += 1;
                bytes += size;
            }
            Kind::Symlink { target } => {
                let mut h = header(EntryType::Symlink, 0o777, 0);
                tar.append_link(&mut h, &item.rel, target)
                    .map_err(|e| anyhow!("packing the symlink {}: {e}", item.path.display()))?;
                files += 1;
            }
        }
    }
    let gz = tar.into_inner().map_err(written)?;
    let Hashing { inner, hash } = gz.finish().map_err(written)?;
    inner.into_inner().map_err(|e| written(e.into_error()))?;
    let size = hash.hashed();
    let digest = hash.finish().to_string();
    file.as_file_mut()
        .rewind()
        .map_err(|e| anyhow!("rewinding the working_dir archive {}: {e}", tmp.display()))?;
    tracing::debug!(
        dir = %dir.display(),
        %digest,
        size,
        files,
        bytes,
        "packed the working_dir"
    );
    Ok(Packed {
        file,
        digest,
        size,
        files,
        bytes,
    })
}

/// A byte count for messages: `1073741824 bytes (1Gi)`, or just `450 bytes`.
fn show_bytes(n: u64) -> String {
    let short = ByteSize(n).to_string();
    if short == n.to_string() {
        format!("{n} bytes")
    } else {
        format!("{n} bytes ({short})")
    }
}

/// A header with nothing in it that varies between machines or over time.
fn header(ty: EntryType, mode: u32, size: u64) -> Header {
    // A GNU header starts zeroed: empty user and group names, no device numbers.
    let mut h = Header::new_gnu();
    h.set_entry_type(ty);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h
}

/// Reads exactly `left` bytes of a file, failing if it ends sooner: the tar builder
/// pads short content silently, which would shift every entry after it.
struct Exact {
    inner: fs::File,
    left: u64,
}

impl Read for Exact {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "the file shrank while it was being packed ({} bytes missing)",
                    self.left
                ),
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Passes writes on while hashing them; the hasher counts them too.
struct Hashing<W> {
    inner: W,
    hash: DigestHasher,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_agent::unpack::{UnpackLimits, unpack};
    use std::os::unix::fs::symlink;
    use std::time::{Duration, SystemTime};

    /// The paths in an archive, in order, with a type letter and the mode.
    fn listing(packed: &Packed) -> Vec<(String, char, u32)> {
        let file = fs::File::open(packed.file.path()).unwrap();
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(file));
        ar.entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                let ty = match h.entry_type() {
                    EntryType::Directory => 'd',
                    EntryType::Symlink => 'l',
                    EntryType::Regular => 'f',
                    other => panic!("unexpected {other:?}"),
                };
                let path = String::from_utf8(e.path_bytes().into_owned()).unwrap();
                (path, ty, h.mode().unwrap())
            })
            .collect()
    }

    fn names(packed: &Packed) -> Vec<String> {
        listing(packed).into_iter().map(|(p, _, _)| p).collect()
    }

    fn put(dir: &Path, rel: &str, content: &str) {
        let p = dir.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, content).unwrap();
    }

    #[test]
    fn honours_ignore_files() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        put(dir, ".gitignore", "*.log\n/build/\n");
        put(dir, "a.log", "x");
        put(dir, "build/out", "x");
        put(dir, "src/main.py", "print()");
        put(dir, "src/.gitignore", "cache/\n");
        put(dir, "src/cache/blob", "x");
        put(dir, "src/deep/x.log", "x");
        put(dir, ".droverignore", "data/\n");
        put(dir, "data/big.csv", "x");
        put(dir, ".git/HEAD", "ref: refs/heads/main");
        put(dir, "sub/.git/config", "x");
        put(dir, ".env.example", "A=1");
        let p = pack_dir(dir, &PackLimits::default()).unwrap();
        assert_eq!(
            names(&p),
            [
                ".droverignore",
                ".env.example",
                ".gitignore",
                "src/",
                "src/.gitignore",
                "src/deep/",
                "src/main.py",
                "sub/",
            ]
        );
        assert_eq!(p.files, 5);
        assert!(p.digest.starts_with("sha256:") && p.digest.len() == 7 + 64);
        assert_eq!(p.size, fs::metadata(p.file.path()).unwrap().len());
        let mut bytes = Vec::new();
        p.file.as_file().read_to_end(&mut bytes).unwrap();
        assert_eq!(
            Digest::of(&bytes).to_string(),
            p.digest,
            "the file is positioned at its start and hashes to the digest"
        );
    }

    #[test]
    fn ignore_files_outside_dir_are_not_used() {
        let d = tempfile::tempdir().unwrap();
        put(d.path(), ".gitignore", "*.txt\n");
        put(d.path(), "job/a.txt", "x");
        let p = pack_dir(&d.path().join("job"), &PackLimits::default()).unwrap();
        assert_eq!(names(&p), ["a.txt"]);
    }

    #[test]
    fn same_content_same_digest() {
        let make = |root: &Path| {
            put(root, "b.txt", "bee");
            put(root, "a/z.txt", "zed");
            put(root, "a/y/x.txt", "ex");
            symlink("a/z.txt", root.join("link")).unwrap();
        };
        let one = tempfile::tempdir().unwrap();
        make(one.path());
        let first = pack_dir(one.path(), &PackLimits::default()).unwrap();
        let again = pack_dir(one.path(), &PackLimits::default()).unwrap();
        assert_eq!(first.digest, again.digest);
        // Other times, another place.
        let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        for f in ["b.txt", "a/z.txt", "a/y/x.txt"] {
            fs::File::options()
                .write(true)
                .open(one.path().join(f))
                .unwrap()
                .set_modified(old)
                .unwrap();
        }
        let touched = pack_dir(one.path(), &PackLimits::default()).unwrap();
        assert_eq!(first.digest, touched.digest);
        let two = tempfile::tempdir().unwrap();
        make(two.path());
        let elsewhere = pack_dir(two.path(), &PackLimits::default()).unwrap();
        assert_eq!(first.digest, elsewhere.digest);
        // Different content, different digest.
        put(two.path(), "b.txt", "bee!");
        let changed = pack_dir(two.path(), &PackLimits::default()).unwrap();
        assert_ne!(first.digest, changed.digest);
    }

    #[test]
    fn only_the_execute_bit_is_kept() {
        let d = tempfile::tempdir().unwrap();
        put(d.path(), "run.sh", "#!/bin/sh\n");
        put(d.path(), "data", "x");
        put(d.path(), "sub/f", "x");
        let mode = |p: &str, m: u32| {
            fs::set_permissions(d.path().join(p), fs::Permissions::from_mode(m)).unwrap()
        };
        mode("run.sh", 0o4710);
        mode("data", 0o600);
        mode("sub", 0o700);
        let p = pack_dir(d.path(), &PackLimits::default()).unwrap();
        assert_eq!(
            listing(&p),
            [
                ("data".into(), 'f', 0o644),
                ("run.sh".into(), 'f', 0o755),
                ("sub/".into(), 'd', 0o755),
                ("sub/f".into(), 'f', 0o644),
            ]
        );
    }

    #[test]
    fn symlinks_inside_are_kept_and_escaping_ones_refused() {
        let d = tempfile::tempdir().unwrap();
        put(d.path(), "a/target", "x");
        symlink("a/target", d.path().join("ok")).unwrap();
        symlink("../ok", d.path().join("a/up")).unwrap();
        let p = pack_dir(d.path(), &PackLimits::default()).unwrap();
        assert!(listing(&p).contains(&("a/up".into(), 'l', 0o777)));

        symlink("../../etc/passwd", d.path().join("a/out")).unwrap();
        let err = pack_dir(d.path(), &PackLimits::default()).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("a/out") && msg.contains("../../etc/passwd"),
            "{msg}"
        );
        fs::remove_file(d.path().join("a/out")).unwrap();

        symlink("/etc/passwd", d.path().join("abs")).unwrap();
        let msg = format!(
            "{:#}",
            pack_dir(d.path(), &PackLimits::default()).unwrap_err()
        );
        assert!(msg.contains("abs") && msg.contains("/etc/passwd"), "{msg}");
        fs::remove_file(d.path().join("abs")).unwrap();

        // An ignored escaping link is not packed, so it is not an error.
        symlink("/etc", d.path().join("ignored")).unwrap();
        put(d.path(), ".droverignore", "/ignored\n");
        pack_dir(d.path(), &PackLimits::default()).unwrap();
    }

    #[test]
    fn fifo_is_refused() {
        let d = tempfile::tempdir().unwrap();
        put(d.path(), "ok", "x");
        let fifo = d.path().join("pipe");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let msg = format!(
            "{:#}",
            pack_dir(d.path(), &PackLimits::default()).unwrap_err()
        );
        assert!(msg.contains("pipe") && msg.contains("fifo"), "{msg}");
    }

    #[test]
    fn missing_or_file_dir_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let missing = d.path().join("nope");
        let msg = format!(
            "{:#}",
            pack_dir(&missing, &PackLimits::default()).unwrap_err()
        );
        assert!(msg.contains("nope"), "{msg}");
        put(d.path(), "file", "x");
        let msg = format!(
            "{:#}",
            pack_dir(&d.path().join("file"), &PackLimits::default()).unwrap_err()
        );
        assert!(
            msg.contains("file") && msg.contains("not a directory"),
            "{msg}"
        );
    }

    #[test]
    fn limits_are_enforced() {
        let d = tempfile::tempdir().unwrap();
        for i in 0..5 {
            put(d.path(), &format!("f{i}"), &"x".repeat(100));
        }
        let small = PackLimits {
            max_bytes: 450,
            max_files: 100,
        };
        let msg = format!("{:#}", pack_dir(d.path(), &small).unwrap_err());
        assert!(
            msg.contains("450") && msg.contains(".droverignore"),
            "{msg}"
        );
        let few = PackLimits {
            max_bytes: 1 << 20,
            max_files: 4,
        };
        let msg = format!("{:#}", pack_dir(d.path(), &few).unwrap_err());
        assert!(
            msg.contains("more than 4") && msg.contains(".droverignore"),
            "{msg}"
        );
        let enough = PackLimits {
            max_bytes: 500,
            max_files: 5,
        };
        let p = pack_dir(d.path(), &enough).unwrap();
        assert_eq!((p.files, p.bytes), (5, 500));
    }

    #[test]
    fn round_trips_through_the_agent() {
        let d = tempfile::tempdir().unwrap();
        let long = format!("{}/{}.txt", "d".repeat(80), "é".repeat(40));
        put(d.path(), &long, "long");
        put(d.path(), "bin/tool", "#!/bin/sh\n");
        fs::set_permissions(d.path().join("bin/tool"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::create_dir(d.path().join("empty")).unwrap();
        symlink("bin/tool", d.path().join("tool")).unwrap();
        let p = pack_dir(d.path(), &PackLimits::default()).unwrap();
        let out = tempfile::tempdir().unwrap();
        let got = unpack(p.file.path(), out.path(), &UnpackLimits::default()).unwrap();
        assert_eq!((got.files, got.bytes), (p.files, p.bytes));
        assert_eq!(fs::read(out.path().join(&long)).unwrap(), b"long");
        assert_eq!(fs::read(out.path().join("tool")).unwrap(), b"#!/bin/sh\n");
        let mode = fs::metadata(out.path().join("bin/tool"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        assert!(out.path().join("empty").is_dir());
    }
}
