//! The agent's cache of artifact blobs: content-addressed files downloaded from the
//! controller, verified against their digest, shared by the tasks that run them and
//! evicted least recently used beyond a size limit.
//!
//! A blob is a file in the cache directory named by its digest's 64 hex digits. It gets
//! that name only after its bytes were hashed, matched and synced to disk, so a name is
//! proof of content: a reopened cache trusts the names without reading the files again.
//! A download in progress writes a `.partial-*` file beside them, which a reopened cache
//! removes.
//!
//! A [`Lease`] pins a blob: a blob with live leases is never evicted. Tasks get their
//! executable through [`install`], normally a hard link, so a blob evicted from the cache
//! lives on (without counting against the limit) in the task directories that use it.

use drover_core::api::ErrorBody;
use drover_core::artifact::Digest;
use futures_util::StreamExt;
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};
use tokio::sync::oneshot;

/// The prefix of a download's temporary file; blob names are hex digits, so no blob
/// ever starts with it.
const PARTIAL_PREFIX: &str = ".partial-";

/// How much of an error response is read for its message.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// How many received pieces of a download may wait for the writer.
const WRITE_QUEUE: usize = 16;

/// The size of the writes a download makes.
const WRITE_BUFFER: usize = 1 << 20;

/// Blobs and installed executables get this mode.
const EXECUTABLE: u32 = 0o755;

#[derive(Clone, Debug)]
pub struct CacheConfig {
    /// Where the blobs are kept; created when missing.
    pub dir: PathBuf,
    /// Unleased blobs are evicted, least recently used first, beyond this many bytes.
    pub limit_bytes: u64,
    /// The controller's base URL, `http://host:port`.
    pub server: String,
    /// The bearer token for the controller's blob API.
    pub token: String,
    /// The longest wait for each step of a download: connecting, the response's
    /// headers, and each piece of the body. A slow but steady download of a big blob is
    /// never cut short; a stalled one is.
    pub timeout: Duration,
    /// How an `https://` controller's certificate is trusted; reqwest's own default
    /// (the system's roots) when `None`.
    pub tls: Option<Arc<drover_tls::rustls::ClientConfig>>,
}

/// Why a blob could not be had. Every error names the blob. It is `Clone` because one
/// download's failure is reported to every caller that waited for it.
#[derive(Clone, Debug, thiserror::Error)]
pub enum CacheError {
    #[error(
        "blob {digest} from the controller did not match its digest (its content hashes to {actual})"
    )]
    Mismatch { digest: Digest, actual: String },
    #[error("blob {digest} from the controller is larger than the expected {expected} bytes")]
    TooLarge { digest: Digest, expected: u64 },
    #[error("blob {digest} from the controller ended after {got} of the expected {expected} bytes")]
    TooSmall {
        digest: Digest,
        expected: u64,
        got: u64,
    },
    #[error("blob {digest}: the controller answered HTTP {status}: {message}")]
    Status {
        digest: Digest,
        status: u16,
        message: String,
    },
    #[error("blob {digest}: {what} timed out after {after:?}")]
    Timeout {
        digest: Digest,
        what: &'static str,
        after: Duration,
    },
    #[error("blob {digest}: {what}: {message}")]
    Http {
        digest: Digest,
        what: &'static str,
        message: String,
    },
    #[error("blob {digest}: {what}: {source}")]
    Io {
        digest: Digest,
        what: String,
        source: Arc<io::Error>,
    },
    #[error("blob {digest}: the download stopped before it finished")]
    Abandoned { digest: Digest },
}

/// What a download must deliver.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Exactly this many bytes (an artifact variant states its size).
    Exactly(u64),
    /// What the controller says, up to this many bytes.
    AtMost(u64),
}

/// One blob in the cache.
struct Blob {
    size: u64,
    leases: usize,
    /// The cache's clock at the last use; the smallest is evicted first.
    last_used: u64,
}

/// Callers waiting for one download, each told the outcome on its own channel.
type Waiters = Vec<oneshot::Sender<Result<Lease, CacheError>>>;

#[derive(Default)]
struct State {
    blobs: HashMap<Digest, Blob>,
    /// Downloads in progress. A digest is here or in `blobs`, never both.
    pending: HashMap<Digest, Waiters>,
    /// The sum of the sizes in `blobs`.
    bytes: u64,
    /// A counter rather than a time: it orders uses exactly and cannot go backwards.
    clock: u64,
}

pub struct ArtifactCache {
    cfg: CacheConfig,
    client: reqwest::Client,
    state: Mutex<State>,
    downloads: AtomicU64,
    /// Makes each download's temporary file name unique.
    partials: AtomicU64,
}

impl ArtifactCache {
    /// Opens the cache in `cfg.dir`, adopting the blobs already there (least recently
    /// used first by modification time) and removing partial downloads left by an
    /// earlier agent. Files whose names are not digests are left alone.
    pub fn open(cfg: CacheConfig) -> io::Result<Arc<ArtifactCache>> {
        std::fs::create_dir_all(&cfg.dir)?;
        let mut found = Vec::new();
        for e in std::fs::read_dir(&cfg.dir)? {
            let e = e?;
            let name = e.file_name();
            let Some(name) = name.to_str() else {
                tracing::warn!("artifact cache: ignoring {}", e.path().display());
                continue;
            };
            if name.starts_with(PARTIAL_PREFIX) {
                // A download cut short by a crash: its content was never verified.
                if let Err(err) = std::fs::remove_file(e.path()) {
                    tracing::warn!("artifact cache: removing {}: {err}", e.path().display());
                }
                continue;
            }
            let meta = e.metadata()?;
            match Digest::of_hex(name) {
                Ok(digest) if meta.is_file() => {
                    let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                    found.push((mtime, digest, meta.len()));
                }
                _ => tracing::warn!(
                    "artifact cache: ignoring {}, which is not a blob",
                    e.path().display()
                ),
            }
        }
        found.sort_by_key(|a| a.0);
        let mut state = State::default();
        for (_, digest, size) in found {
            state.clock += 1;
            state.bytes += size;
            let blob = Blob {
                size,
                leases: 0,
                last_used: state.clock,
            };
            state.blobs.insert(digest, blob);
        }
        state.evict(&cfg.dir, cfg.limit_bytes);
        let mut builder = reqwest::Client::builder()
            .connect_timeout(cfg.timeout)
            // Closed before the controller's own idle timeout (10 s by default) closes
            // it, so a download never starts on a connection the server is closing.
            .pool_idle_timeout(Duration::from_secs(5));
        if let Some(tls) = &cfg.tls {
            builder = builder.tls_backend_preconfigured(tls.as_ref().clone());
        }
        let client = builder
            .build()
            .map_err(|e| io::Error::other(format!("building the HTTP client: {e}")))?;
        Ok(Arc::new(ArtifactCache {
            cfg,
            client,
            state: Mutex::new(state),
            downloads: AtomicU64::new(0),
            partials: AtomicU64::new(0),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is consistent between statements that touch it, so a panic
        // elsewhere while it was held leaves nothing half done.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Returns a lease on the verified local file for `digest`, downloading it from
    /// `GET {server}/v1/blobs/{digest}` when it is not cached. Concurrent calls for one
    /// digest share one download. `size` is what the download must deliver (the first
    /// caller's, when calls share a download); a cached blob is identified by its
    /// digest alone.
    ///
    /// The download runs in its own task: a caller that gives up does not cut it short
    /// for the others, and what it fetched is cached all the same.
    pub async fn get(self: &Arc<Self>, digest: &Digest, size: u64) -> Result<Lease, CacheError> {
        self.get_expecting(digest, Expect::Exactly(size)).await
    }

    /// Like [`ArtifactCache::get`] for a blob whose size the caller does not know (a
    /// job's working_dir archive): the controller's answer says it, and it may be at
    /// most `max` bytes.
    pub async fn get_up_to(
        self: &Arc<Self>,
        digest: &Digest,
        max: u64,
    ) -> Result<Lease, CacheError> {
        self.get_expecting(digest, Expect::AtMost(max)).await
    }

    async fn get_expecting(
        self: &Arc<Self>,
        digest: &Digest,
        size: Expect,
    ) -> Result<Lease, CacheError> {
        let rx = {
            let mut st = self.lock();
            if let Some(lease) = st.lease(self, digest) {
                return Ok(lease);
            }
            let (tx, rx) = oneshot::channel();
            if let Some(waiters) = st.pending.get_mut(digest) {
                waiters.push(tx);
            } else {
                st.pending.insert(digest.clone(), vec![tx]);
                self.downloads.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(self.clone().download(digest.clone(), size));
            }
            rx
        };
        rx.await.unwrap_or_else(|_| {
            Err(CacheError::Abandoned {
                digest: digest.clone(),
            })
        })
    }

    /// How many downloads were started; a cache hit or a shared download starts none.
    pub fn downloads(&self) -> u64 {
        self.downloads.load(Ordering::Relaxed)
    }

    /// The total size of the cached blobs.
    pub fn cached_bytes(&self) -> u64 {
        self.lock().bytes
    }

    /// Downloads a blob and hands the outcome to everyone waiting for it.
    async fn download(self: Arc<Self>, digest: Digest, size: Expect) {
        // Should this task panic or be dropped with its runtime, the guard takes the
        // waiters out so they fail rather than wait forever.
        let mut guard = PendingGuard {
            cache: &self,
            digest: Some(&digest),
        };
        let result = self.fetch(&digest, size).await;
        let replies: Vec<_> = {
            let mut st = self.lock();
            let waiters = st.pending.remove(&digest).unwrap_or_default();
            guard.digest = None;
            match result {
                Ok(size) => {
                    st.bytes += size;
                    st.clock += 1;
                    // Used now even when every caller gave up meanwhile: it is the most
                    // recently wanted blob.
                    let blob = Blob {
                        size,
                        leases: 0,
                        last_used: st.clock,
                    };
                    st.blobs.insert(digest.clone(), blob);
                    // Leases are taken before evicting, under the same lock, so the new
                    // blob cannot be evicted before its waiters have it.
                    let replies = waiters
                        .into_iter()
                        .filter_map(|tx| st.lease(&self, &digest).map(|l| (tx, Ok(l))))
                        .collect();
                    st.evict(&self.cfg.dir, self.cfg.limit_bytes);
                    replies
                }
                Err(e) => {
                    tracing::warn!("artifact cache: {e}");
                    waiters.into_iter().map(|tx| (tx, Err(e.clone()))).collect()
                }
            }
        };
        // Sent without the lock: a caller that gave up hands its lease back here, and
        // dropping a lease takes the lock.
        for (tx, reply) in replies {
            if tx.send(reply).is_err() {
                // The caller gave up waiting. The lease it was sent comes back here and is
                // dropped, outside the lock, which is how it is handed back.
            }
        }
    }

    /// Streams the blob into a temporary file while hashing it, and moves the file into
    /// place only when size and digest match. Returns its size.
    async fn fetch(&self, digest: &Digest, expect: Expect) -> Result<u64, CacheError> {
        let after = self.cfg.timeout;
        let timeout = |what| CacheError::Timeout {
            digest: digest.clone(),
            what,
            after,
        };
        let http = |what, e: reqwest::Error| CacheError::Http {
            digest: digest.clone(),
            what,
            message: error_chain(&e),
        };
        let url = format!(
            "{}/v1/blobs/{digest}",
            self.cfg.server.trim_end_matches('/')
        );
        let request = self.client.get(&url).bearer_auth(&self.cfg.token).send();
        let resp = tokio::time::timeout(after, request)
            .await
            .map_err(|_| timeout("waiting for the controller to answer"))?
            .map_err(|e| http("requesting it from the controller", e))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(CacheError::Status {
                digest: digest.clone(),
                status: status.as_u16(),
                message: error_message(resp, after).await,
            });
        }
        let size = match (expect, resp.content_length()) {
            (Expect::Exactly(size), Some(len)) if len > size => {
                return Err(CacheError::TooLarge {
                    digest: digest.clone(),
                    expected: size,
                });
            }
            (Expect::Exactly(size), Some(len)) if len < size => {
                return Err(CacheError::TooSmall {
                    digest: digest.clone(),
                    expected: size,
                    got: len,
                });
            }
            (Expect::Exactly(size), _) => size,
            (Expect::AtMost(max), Some(len)) if len > max => {
                return Err(CacheError::TooLarge {
                    digest: digest.clone(),
                    expected: max,
                });
            }
            (Expect::AtMost(_), Some(len)) => len,
            // The controller always says how long a blob is; without it, the download
            // would have no bound to be checked against.
            (Expect::AtMost(_), None) => {
                return Err(CacheError::Http {
                    digest: digest.clone(),
                    what: "reading the controller's answer",
                    message: "it did not give the blob's length".into(),
                });
            }
        };

        let n = self.partials.fetch_add(1, Ordering::Relaxed);
        let partial = Partial(
            self.cfg
                .dir
                .join(format!("{PARTIAL_PREFIX}{}-{n}", digest.hex())),
        );
        let io_err = |what: &str, path: &Path, e: io::Error| CacheError::Io {
            digest: digest.clone(),
            what: format!("{what} {}", path.display()),
            source: Arc::new(e),
        };
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(EXECUTABLE)
            .open(&partial.0)
            .await
            .map_err(|e| io_err("creating", &partial.0, e))?
            .into_std()
            .await;
        // Hashing and writing run on a blocking thread fed through a bounded queue, so
        // they overlap with receiving and each piece costs no hand-off to the blocking
        // pool of its own; writes go out in large pieces.
        let (tx, mut rx) = tokio::sync::mpsc::channel(WRITE_QUEUE);
        let writer = tokio::task::spawn_blocking(move || -> io::Result<Digest> {
            use std::io::Write as _;
            let mut hasher = Digest::hasher();
            let mut out = io::BufWriter::with_capacity(WRITE_BUFFER, &file);
            while let Some(chunk) = rx.blocking_recv() {
                let chunk: bytes::Bytes = chunk;
                hasher.update(&chunk);
                out.write_all(&chunk)?;
            }
            out.flush()?;
            drop(out);
            // The umask may have narrowed the mode given at creation.
            file.set_permissions(std::fs::Permissions::from_mode(EXECUTABLE))?;
            // Synced before it is named: a name must never stand for unverified bytes,
            // even after a crash.
            file.sync_all()?;
            Ok(hasher.finish())
        });
        let mut got = 0u64;
        let mut body = resp.bytes_stream();
        loop {
            let chunk = match tokio::time::timeout(after, body.next()).await {
                Err(_) => return Err(timeout("waiting for more of the download")),
                Ok(None) => break,
                Ok(Some(Err(e))) => return Err(http("downloading it", e)),
                Ok(Some(Ok(chunk))) => chunk,
            };
            got += chunk.len() as u64;
            if got > size {
                return Err(CacheError::TooLarge {
                    digest: digest.clone(),
                    expected: size,
                });
            }
            // A closed queue means the writer failed; its error is read below.
            if tx.send(chunk).await.is_err() {
                break;
            }
        }
        drop(tx);
        let written = writer.await.map_err(|e| CacheError::Io {
            digest: digest.clone(),
            what: format!("writing {}", partial.0.display()),
            source: Arc::new(io::Error::other(e.to_string())),
        })?;
        let actual = written.map_err(|e| io_err("writing", &partial.0, e))?;
        if got < size {
            return Err(CacheError::TooSmall {
                digest: digest.clone(),
                expected: size,
                got,
            });
        }
        if &actual != digest {
            return Err(CacheError::Mismatch {
                digest: digest.clone(),
                actual: actual.to_string(),
            });
        }
        let path = self.cfg.dir.join(digest.hex());
        tokio::fs::rename(&partial.0, &path)
            .await
            .map_err(|e| io_err("moving the download to", &path, e))?;
        partial.keep();
        Ok(size)
    }
}

impl State {
    /// A lease on a cached blob, which counts as a use.
    fn lease(&mut self, cache: &Arc<ArtifactCache>, digest: &Digest) -> Option<Lease> {
        self.clock += 1;
        let blob = self.blobs.get_mut(digest)?;
        blob.leases += 1;
        blob.last_used = self.clock;
        Some(Lease {
            cache: cache.clone(),
            digest: digest.clone(),
            path: cache.cfg.dir.join(digest.hex()),
        })
    }

    /// Removes unleased blobs, least recently used first, until the cache fits `limit`
    /// or only leased blobs are left. Files are removed under the lock, so a new
    /// download of the same digest cannot be moved into place before the old file goes.
    fn evict(&mut self, dir: &Path, limit: u64) {
        while self.bytes > limit {
            let victim = self
                .blobs
                .iter()
                .filter(|(_, b)| b.leases == 0)
                .min_by_key(|(_, b)| b.last_used)
                .map(|(d, _)| d.clone());
            let Some(digest) = victim else { break };
            let path = dir.join(digest.hex());
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                // Forgotten all the same, so eviction moves on; the file is adopted
                // again when the cache is next opened.
                Err(e) => tracing::warn!("artifact cache: evicting {}: {e}", path.display()),
            }
            if let Some(blob) = self.blobs.remove(&digest) {
                self.bytes -= blob.size;
            }
        }
    }
}

/// Takes a download's waiters out of the pending table when the download ends without
/// reporting, so they are told it was abandoned.
struct PendingGuard<'a> {
    cache: &'a ArtifactCache,
    digest: Option<&'a Digest>,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if let Some(digest) = self.digest {
            let waiters = self.cache.lock().pending.remove(digest);
            // Dropped without the lock, closing the channels the callers wait on.
            drop(waiters);
        }
    }
}

/// A download's temporary file, removed unless it was moved into place.
struct Partial(PathBuf);

impl Partial {
    fn keep(mut self) {
        self.0 = PathBuf::new();
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.0.as_os_str().is_empty() {
            crate::cleanup::remove_file(&self.0, "a download that was not kept");
        }
    }
}

/// A blob pinned in the cache: it is not evicted while a lease on it lives.
pub struct Lease {
    cache: Arc<ArtifactCache>,
    digest: Digest,
    path: PathBuf,
}

impl Lease {
    /// The blob's file. Do not write to it: it is shared with every task that uses it.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn digest(&self) -> &Digest {
        &self.digest
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("digest", &self.digest)
            .field("path", &self.path)
            .finish()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut st = self.cache.lock();
        if let Some(blob) = st.blobs.get_mut(&self.digest) {
            blob.leases = blob.leases.saturating_sub(1);
        }
        // A blob kept over the limit only because it was leased goes now.
        st.evict(&self.cache.cfg.dir, self.cache.cfg.limit_bytes);
    }
}

/// Puts a leased blob into a task directory as the executable file `dest`: a hard link
/// when the cache and the task directory share a file system (cheap, no copy), else a
/// copy; mode 0755. A file already at `dest` is replaced, so a retried preparation
/// works.
pub fn install(lease: &Lease, dest: &Path) -> io::Result<()> {
    match std::fs::remove_file(dest) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("replacing {}: {e}", dest.display()),
            ));
        }
    }
    // Any failure to link (another file system, a link count at its maximum, a file
    // system without hard links) is worth a copy; the copy's error is the one reported.
    if let Err(link_err) = std::fs::hard_link(lease.path(), dest) {
        tracing::debug!(
            "linking {} to {}: {link_err}; copying instead",
            lease.path().display(),
            dest.display()
        );
        if let Err(e) = std::fs::copy(lease.path(), dest) {
            crate::cleanup::remove_file(dest, "a partly copied artifact");
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "copying {} to {}: {e} (linking failed too: {link_err})",
                    lease.path().display(),
                    dest.display()
                ),
            ));
        }
    }
    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(EXECUTABLE)).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("making {} executable: {e}", dest.display()),
        )
    })
}

/// What an error response says: the controller's JSON message when there is one, else
/// the start of the body as text, else the status's name.
async fn error_message(resp: reqwest::Response, after: Duration) -> String {
    let reason = resp
        .status()
        .canonical_reason()
        .unwrap_or("no message")
        .to_string();
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while body.len() < MAX_ERROR_BODY {
        match tokio::time::timeout(after, stream.next()).await {
            Ok(Some(Ok(chunk))) => body.extend_from_slice(&chunk),
            // A body that fails or stalls still leaves the status to report.
            _ => break,
        }
    }
    if let Ok(e) = serde_json::from_slice::<ErrorBody>(&body) {
        return e.error;
    }
    body.truncate(MAX_ERROR_BODY);
    let text = String::from_utf8_lossy(&body);
    let text = text.trim();
    if text.is_empty() {
        reason
    } else {
        text.to_string()
    }
}

/// An error and its causes on one line: reqwest's own message rarely says what failed.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
