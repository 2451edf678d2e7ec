//! The content-addressed blob store: one file per blob at `<dir>/<hex>`, where `<dir>` is
//! `<data dir>/blobs/sha256`.
//!
//! An upload streams into a temporary file in the same directory while it is hashed, so
//! no blob is ever held whole in memory. Only when the body has ended and its SHA-256 is
//! the digest the client named is the file synced and renamed into place; a rename within
//! one directory is atomic, so a reader sees a whole, verified blob or none. Anything
//! else (a mismatch, a body cut off, a size over the limit, the request dropped) removes
//! the temporary file.
//!
//! Blobs are shared by every artifact that names their digest. Which of them are still
//! needed is decided by the caller ([`BlobStore::collect`] takes the referenced set);
//! this module only knows the files.

use bytes::Bytes;
use drover_core::artifact::Digest;
use futures_util::{Stream, StreamExt};
use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use tokio::io::AsyncWriteExt;

/// Temporary upload files start with this, which no digest's hex does.
const TEMP_PREFIX: &str = ".upload-";

/// An upload that sends nothing for this long is abandoned, so a stalled client cannot
/// hold a temporary file (and a connection) for ever.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Writes to the temporary file go through a buffer this large: far fewer trips to the
/// blocking pool than one per network chunk.
const WRITE_BUFFER: usize = 256 << 10;

/// The outcome of a successful [`BlobStore::put`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    /// The blob was written.
    Created,
    /// The blob was already there; the body was only checked against the digest.
    Existed,
}

#[derive(Debug, thiserror::Error)]
pub enum PutError {
    #[error("the blob is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("the uploaded bytes hash to {actual}, not to {expected} named in the URL")]
    Mismatch { expected: Digest, actual: Digest },
    #[error("the upload ended early: {0}")]
    Body(String),
    #[error("writing the blob: {0}")]
    Io(#[from] io::Error),
}

/// One stored blob, as [`BlobStore::list`] finds it.
#[derive(Clone, Debug)]
pub struct BlobEntry {
    pub digest: Digest,
    pub size: u64,
    pub modified: SystemTime,
}

pub struct BlobStore {
    dir: PathBuf,
    max_size: u64,
    /// Held shared while an artifact's blobs are checked and the artifact committed, and
    /// exclusively while garbage is collected, so that no blob is removed between an
    /// artifact finding it and the artifact being stored.
    pub(crate) gc_lock: tokio::sync::RwLock<()>,
}

/// Removes a temporary file when dropped, unless it was renamed into place. A drop covers
/// every way an upload can end early, including the request's future being cancelled.
struct TempFile {
    path: Option<PathBuf>,
}

impl TempFile {
    fn disarm(&mut self) {
        self.path = None;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.path.take()
            && let Err(e) = std::fs::remove_file(&p)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!("removing the unfinished upload {}: {e}", p.display());
        }
    }
}

impl BlobStore {
    /// Opens (creating if needed) the store in `dir`. Temporary files left by a previous
    /// run are removed: no upload can be in progress before the server is listening.
    pub fn open(dir: PathBuf, max_size: u64) -> io::Result<BlobStore> {
        std::fs::create_dir_all(&dir)?;
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                std::fs::remove_file(entry.path())?;
            }
        }
        Ok(BlobStore {
            dir,
            max_size,
            gc_lock: tokio::sync::RwLock::new(()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn max_size(&self) -> u64 {
        self.max_size
    }

    fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(digest.hex())
    }

    /// The blob's size, or `None` if it is not stored.
    pub async fn size(&self, digest: &Digest) -> io::Result<Option<u64>> {
        match tokio::fs::metadata(self.path(digest)).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Opens the blob for reading, with its size. An open file stays readable even if the
    /// blob is collected meanwhile, so a download in progress is never cut short.
    pub async fn open_blob(&self, digest: &Digest) -> io::Result<Option<(tokio::fs::File, u64)>> {
        match tokio::fs::File::open(self.path(digest)).await {
            Ok(f) => {
                let size = f.metadata().await?.len();
                Ok(Some((f, size)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Stores the body as the blob `digest`. `declared` is the request's length, if it
    /// gave one, so an oversized upload is refused before any of it is read.
    pub async fn put<S, E>(
        &self,
        digest: &Digest,
        declared: Option<u64>,
        mut body: S,
    ) -> Result<Stored, PutError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        if declared.is_some_and(|n| n > self.max_size) {
            return Err(PutError::TooLarge {
                limit: self.max_size,
            });
        }
        let dest = self.path(digest);
        if tokio::fs::try_exists(&dest).await? {
            // A fresh modification time marks the blob as wanted by a push in progress,
            // which garbage collection leaves alone until its artifact is created.
            touch(&dest).await?;
            // The body is read, hashed and dropped. Hashed, because an upload is how a
            // project proves it has the bytes before it may use a blob another project
            // stored; read to its end, because answering before the client has finished
            // sending would leave its pooled connection broken for its next request.
            let mut hasher = Digest::hasher();
            let mut seen = 0u64;
            loop {
                let next = tokio::time::timeout(IDLE_TIMEOUT, body.next())
                    .await
                    .map_err(|_| {
                        PutError::Body(format!("no data for {}s", IDLE_TIMEOUT.as_secs()))
                    })?;
                let Some(chunk) = next else { break };
                let chunk = chunk.map_err(|e| PutError::Body(e.to_string()))?;
                seen += chunk.len() as u64;
                if seen > self.max_size {
                    return Err(PutError::TooLarge {
                        limit: self.max_size,
                    });
                }
                hasher.update(&chunk);
            }
            let actual = hasher.finish();
            if &actual != digest {
                return Err(PutError::Mismatch {
                    expected: digest.clone(),
                    actual,
                });
            }
            return Ok(Stored::Existed);
        }
        let temp_path = self.dir.join(format!(
            "{TEMP_PREFIX}{}-{:016x}",
            digest.hex(),
            rand::random::<u64>()
        ));
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp_path)
            .await?;
        let mut temp = TempFile {
            path: Some(temp_path.clone()),
        };
        let mut out = tokio::io::BufWriter::with_capacity(WRITE_BUFFER, file);
        let mut hasher = Digest::hasher();
        let mut total = 0u64;
        loop {
            let next = tokio::time::timeout(IDLE_TIMEOUT, body.next())
                .await
                .map_err(|_| PutError::Body(format!("no data for {}s", IDLE_TIMEOUT.as_secs())))?;
            let Some(chunk) = next else { break };
            let chunk = chunk.map_err(|e| PutError::Body(e.to_string()))?;
            total += chunk.len() as u64;
            if total > self.max_size {
                return Err(PutError::TooLarge {
                    limit: self.max_size,
                });
            }
            hasher.update(&chunk);
            out.write_all(&chunk).await?;
        }
        let actual = hasher.finish();
        if &actual != digest {
            return Err(PutError::Mismatch {
                expected: digest.clone(),
                actual,
            });
        }
        out.flush().await?;
        let file = out.into_inner();
        file.sync_all().await?;
        drop(file);
        tokio::fs::rename(&temp_path, &dest).await?;
        temp.disarm();
        // The rename is durable only once the directory is synced too; an artifact that
        // names this blob must never outlive it in a crash.
        tokio::fs::File::open(&self.dir).await?.sync_all().await?;
        Ok(Stored::Created)
    }

    /// Every stored blob. Temporary files and anything else that is not a blob are
    /// skipped.
    pub async fn list(&self) -> io::Result<Vec<BlobEntry>> {
        let mut out = Vec::new();
        let mut dir = tokio::fs::read_dir(&self.dir).await?;
        while let Some(entry) = dir.next_entry().await? {
            let Ok(digest) = Digest::of_hex(&entry.file_name().to_string_lossy()) else {
                continue;
            };
            let meta = match entry.metadata().await {
                Ok(m) => m,
                // Removed since the directory was read.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            out.push(BlobEntry {
                digest,
                size: meta.len(),
                modified: meta.modified()?,
            });
        }
        Ok(out)
    }

    /// Removes the blobs no artifact needs and returns their digests. A blob that is not
    /// `referenced` goes if it was last written longer than `grace` ago, or if it is in
    /// `released` (blobs of a deleted artifact, with when that artifact was created) and
    /// has not been written since. Anything newer may belong to a push in progress, whose
    /// artifact does not exist yet. Temporary files older than `grace` are abandoned
    /// uploads and go too.
    pub async fn collect(
        &self,
        referenced: &HashSet<Digest>,
        released: &HashMap<Digest, SystemTime>,
        grace: Duration,
    ) -> io::Result<Vec<Digest>> {
        let now = SystemTime::now();
        let old = |t: SystemTime| now.duration_since(t).is_ok_and(|age| age > grace);
        let mut removed = Vec::new();
        for blob in self.list().await? {
            if referenced.contains(&blob.digest) {
                continue;
            }
            let released_unchanged = released
                .get(&blob.digest)
                .is_some_and(|at| blob.modified <= *at);
            if !(released_unchanged || old(blob.modified)) {
                continue;
            }
            match tokio::fs::remove_file(self.path(&blob.digest)).await {
                Ok(()) => removed.push(blob.digest),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        let mut dir = tokio::fs::read_dir(&self.dir).await?;
        while let Some(entry) = dir.next_entry().await? {
            if !entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                continue;
            }
            // An upload in progress writes at least once a minute (or is abandoned), so
            // a temporary file untouched for the whole grace period is left over.
            if let Ok(m) = entry.metadata().await
                && m.modified().is_ok_and(old)
                && let Err(e) = tokio::fs::remove_file(entry.path()).await
                && e.kind() != io::ErrorKind::NotFound
            {
                return Err(e);
            }
        }
        Ok(removed)
    }
}

/// Sets a file's modification time to now.
async fn touch(path: &Path) -> io::Result<()> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || std::fs::File::open(&path)?.set_modified(SystemTime::now()))
        .await
        .map_err(io::Error::other)?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(data: &[u8], size: usize) -> Vec<Result<Bytes, String>> {
        data.chunks(size)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect()
    }

    /// Every file in the store's directory, temporary or not.
    fn files(store: &BlobStore) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(store.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn open(dir: &tempfile::TempDir, max: u64) -> BlobStore {
        BlobStore::open(dir.path().join("blobs/sha256"), max).unwrap()
    }

    #[tokio::test]
    async fn a_verified_upload_is_stored_and_a_second_one_is_checked_but_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir, 1 << 20);
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let d = Digest::of(&data);
        let body = futures_util::stream::iter(chunks(&data, 7000));
        assert_eq!(
            store.put(&d, Some(data.len() as u64), body).await.unwrap(),
            Stored::Created
        );
        assert_eq!(store.size(&d).await.unwrap(), Some(data.len() as u64));
        assert_eq!(std::fs::read(store.path(&d)).unwrap(), data);
        // A second upload of the same bytes is hashed, not written again.
        let again = futures_util::stream::iter(chunks(&data, 9000));
        assert_eq!(store.put(&d, None, again).await.unwrap(), Stored::Existed);
        assert_eq!(files(&store), vec![d.hex().to_string()]);
        // Naming a stored digest without sending its bytes proves nothing: other bytes,
        // or a body that fails, are refused, and the stored blob is untouched.
        let other = futures_util::stream::iter(chunks(b"not the bytes", 5));
        assert!(matches!(
            store.put(&d, None, other).await,
            Err(PutError::Mismatch { .. })
        ));
        let failing = futures_util::stream::iter(vec![Err::<Bytes, _>("cut off")]);
        assert!(matches!(
            store.put(&d, None, failing).await,
            Err(PutError::Body(_))
        ));
        assert_eq!(std::fs::read(store.path(&d)).unwrap(), data);
    }

    #[tokio::test]
    async fn a_mismatch_a_cut_off_body_or_an_oversized_one_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir, 1000);
        let data = vec![7u8; 600];
        let d = Digest::of(&data);

        let tampered = {
            let mut t = data.clone();
            t[300] = 8;
            t
        };
        let err = store
            .put(&d, None, futures_util::stream::iter(chunks(&tampered, 100)))
            .await
            .unwrap_err();
        assert!(matches!(err, PutError::Mismatch { .. }), "{err}");
        assert!(err.to_string().contains(d.as_str()), "{err}");

        let mut cut = chunks(&data, 100);
        cut.truncate(3);
        cut.push(Err("connection reset".into()));
        let err = store
            .put(&d, None, futures_util::stream::iter(cut))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("connection reset"), "{err}");

        let big = vec![1u8; 1500];
        let big_d = Digest::of(&big);
        let err = store
            .put(
                &big_d,
                Some(1500),
                futures_util::stream::iter(chunks(&big, 100)),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, PutError::TooLarge { limit: 1000 }), "{err}");
        // Without a declared length the limit is found while streaming.
        let err = store
            .put(&big_d, None, futures_util::stream::iter(chunks(&big, 100)))
            .await
            .unwrap_err();
        assert!(matches!(err, PutError::TooLarge { .. }), "{err}");

        assert_eq!(store.size(&d).await.unwrap(), None);
        assert!(files(&store).is_empty(), "{:?}", files(&store));
    }

    #[tokio::test]
    async fn a_cancelled_upload_removes_its_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir, 1 << 20);
        let d = Digest::of(b"never finished");
        // A body that sends one chunk and then nothing: the put is dropped mid-upload,
        // as when the server drops a request's future.
        let body = futures_util::stream::iter(vec![Ok::<_, String>(Bytes::from_static(b"x"))])
            .chain(futures_util::stream::pending());
        let put = store.put(&d, None, Box::pin(body));
        assert!(
            tokio::time::timeout(Duration::from_millis(200), put)
                .await
                .is_err()
        );
        assert!(files(&store).is_empty(), "{:?}", files(&store));
    }

    #[tokio::test]
    async fn leftover_temporary_files_are_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir, 1 << 20);
        std::fs::write(store.dir().join(format!("{TEMP_PREFIX}abc-1")), b"partial").unwrap();
        drop(store);
        let store = open(&dir, 1 << 20);
        assert!(files(&store).is_empty(), "{:?}", files(&store));
    }

    #[tokio::test]
    async fn collection_keeps_referenced_and_recent_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir, 1 << 20);
        let put = async |data: &[u8]| {
            let d = Digest::of(data);
            store
                .put(&d, None, futures_util::stream::iter(chunks(data, 10)))
                .await
                .unwrap();
            d
        };
        let kept = put(b"referenced").await;
        let recent = put(b"a push in progress").await;
        let released = put(b"of a deleted artifact").await;
        let old = put(b"abandoned long ago").await;
        let hour_ago = SystemTime::now() - Duration::from_secs(3600);
        for d in [&kept, &old] {
            std::fs::File::open(store.path(d))
                .unwrap()
                .set_modified(hour_ago - Duration::from_secs(1))
                .unwrap();
        }
        std::fs::write(store.dir().join(format!("{TEMP_PREFIX}x-1")), b"").unwrap();
        std::fs::File::open(store.dir().join(format!("{TEMP_PREFIX}x-1")))
            .unwrap()
            .set_modified(hour_ago - Duration::from_secs(1))
            .unwrap();
        std::fs::write(store.dir().join(format!("{TEMP_PREFIX}y-1")), b"").unwrap();

        let referenced: HashSet<Digest> = [kept.clone()].into();
        let released_map: HashMap<Digest, SystemTime> =
            [(released.clone(), SystemTime::now())].into();
        let mut removed = store
            .collect(&referenced, &released_map, Duration::from_secs(3600))
            .await
            .unwrap();
        removed.sort();
        let mut want = vec![released.clone(), old.clone()];
        want.sort();
        assert_eq!(removed, want);
        let mut left = vec![kept.hex().to_string(), recent.hex().to_string()];
        left.push(format!("{TEMP_PREFIX}y-1"));
        left.sort();
        assert_eq!(files(&store), left);

        // A released blob uploaded again after its artifact was created is wanted by a
        // new push, and stays.
        let again = put(b"pushed again").await;
        let before = SystemTime::now() - Duration::from_secs(10);
        let released_map: HashMap<Digest, SystemTime> = [(again.clone(), before)].into();
        let removed = store
            .collect(&referenced, &released_map, Duration::from_secs(3600))
            .await
            .unwrap();
        assert!(removed.is_empty(), "{removed:?}");
    }
}
