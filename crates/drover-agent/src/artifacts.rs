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
//!
//! The bookkeeping (single flight, leases, eviction, reopening) is the agent's generic
//! cache (`cache.rs`); this module says how a blob is fetched and verified, where it
//! lives, how it goes and how a complete one is told from a partial one.

use crate::cache::{self, Built, Cache, Eviction, Found, Joined, Kind, Policy, Report};
use drover_core::api::ErrorBody;
use drover_core::artifact::Digest;
use futures_util::StreamExt;
use std::fmt;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

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

/// The blobs on disk, as the generic cache sees them: how one is fetched, where it is,
/// how it goes.
struct Blobs {
    cfg: CacheConfig,
    client: reqwest::Client,
    downloads: AtomicU64,
    /// Makes each download's temporary file name unique.
    partials: AtomicU64,
}

pub struct ArtifactCache {
    cache: Arc<Cache<Blobs>>,
}

impl ArtifactCache {
    /// Opens the cache in `cfg.dir`, adopting the blobs already there (least recently
    /// used first by modification time) and removing partial downloads left by an
    /// earlier agent. Files whose names are not digests are left alone.
    pub fn open(cfg: CacheConfig) -> io::Result<Arc<ArtifactCache>> {
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
        // Eager: a blob is one file, cheap to remove whenever the limit is passed, and
        // a task keeps its own link to it, so evicting a blob takes nothing from a task.
        let policy = Policy {
            limit: cfg.limit_bytes,
            eviction: Eviction::Eager,
            release_is_use: false,
        };
        let blobs = Blobs {
            cfg,
            client,
            downloads: AtomicU64::new(0),
            partials: AtomicU64::new(0),
        };
        Ok(Arc::new(ArtifactCache {
            cache: Cache::open(blobs, policy)?,
        }))
    }

    /// Returns a lease on the verified local file for `digest`, downloading it from
    /// `GET {server}/v1/blobs/{digest}` when it is not cached. Concurrent calls for one
    /// digest share one download. `size` is what the download must deliver (the first
    /// caller's, when calls share a download); a cached blob is identified by its
    /// digest alone.
    ///
    /// The download runs in its own task: a caller that gives up does not cut it short
    /// for the others, and what it fetched is cached all the same.
    pub async fn get(&self, digest: &Digest, size: u64) -> Result<Lease, CacheError> {
        self.get_expecting(digest, Expect::Exactly(size)).await
    }

    /// Like [`ArtifactCache::get`] for a blob whose size the caller does not know (a
    /// job's working_dir archive): the controller's answer says it, and it may be at
    /// most `max` bytes.
    pub async fn get_up_to(&self, digest: &Digest, max: u64) -> Result<Lease, CacheError> {
        self.get_expecting(digest, Expect::AtMost(max)).await
    }

    async fn get_expecting(&self, digest: &Digest, size: Expect) -> Result<Lease, CacheError> {
        let waiting = match self.cache.join(digest, size) {
            Joined::Ready(lease) => return Ok(Lease(lease)),
            // Blobs never remember a failure (see `Blobs::remember`), but were one
            // remembered, its error is the answer.
            Joined::Remembered(r) => return Err(r.error),
            Joined::Waiting(waiting) => waiting,
        };
        // Unbounded here: the download bounds each of its own steps by `cfg.timeout`.
        match waiting.outcome().await {
            Some((result, ())) => result.map(Lease),
            None => Err(CacheError::Abandoned {
                digest: digest.clone(),
            }),
        }
    }

    /// A lease on the blob when it is already cached; `None` when it is not (nothing is
    /// downloaded). A restarted agent uses it for a task it adopts.
    pub fn lease_cached(&self, digest: &Digest) -> Option<Lease> {
        self.cache.lease_existing(digest).map(Lease)
    }

    /// How many downloads were started; a cache hit or a shared download starts none.
    pub fn downloads(&self) -> u64 {
        self.cache.kind().downloads.load(Ordering::Relaxed)
    }

    /// The total size of the cached blobs.
    pub fn cached_bytes(&self) -> u64 {
        self.cache.bytes()
    }
}

impl Kind for Blobs {
    const NAME: &'static str = "artifact cache";
    type Key = Digest;
    type Meta = ();
    type Request = Expect;
    type Error = CacheError;
    type Note = ();

    fn path(&self, digest: &Digest) -> PathBuf {
        self.cfg.dir.join(digest.hex())
    }

    /// Adopts the files named by a digest, removes partial downloads (their content was
    /// never verified) and leaves anything else alone.
    fn scan(&self) -> io::Result<Vec<Found<Blobs>>> {
        std::fs::create_dir_all(&self.cfg.dir)?;
        let mut found = Vec::new();
        for e in std::fs::read_dir(&self.cfg.dir)? {
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
            let meta = match e.metadata() {
                Ok(m) => m,
                // Removed since it was listed (an eviction finishing): not in the cache.
                Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                Err(err) => return Err(err),
            };
            match Digest::of_hex(name) {
                Ok(digest) if meta.is_file() => found.push(Found {
                    key: digest,
                    meta: (),
                    size: meta.len(),
                    last_used: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                }),
                _ => tracing::warn!(
                    "artifact cache: ignoring {}, which is not a blob",
                    e.path().display()
                ),
            }
        }
        Ok(found)
    }

    async fn build(&self, digest: &Digest, expect: Expect) -> Report<Blobs> {
        self.downloads.fetch_add(1, Ordering::Relaxed);
        let fetched = self.fetch(digest, expect).await;
        (fetched.map(|size| Built { meta: (), size }), ())
    }

    /// Never: a failed download is tried again at the next ask, since the controller
    /// may have the right bytes by then.
    fn remember(&self, _: &CacheError) -> Option<Duration> {
        None
    }

    /// Removes the blob's file at once: one unlink is quick enough to make under the
    /// lock, so a new download of the same digest cannot be moved into place before the
    /// old file goes.
    fn remove(&self, digest: &Digest) -> Option<PathBuf> {
        let path = self.path(digest);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("artifact cache: evicting {}: {e}", path.display()),
        }
        None
    }

    /// Never called, since `remove` sets nothing aside; were it called, the leftover
    /// would be a file.
    fn delete(leftover: &Path) {
        crate::cleanup::remove_file(leftover, "an evicted blob");
    }
}

impl Blobs {
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
pub struct Lease(cache::Lease<Blobs>);

impl Lease {
    /// The blob's file. Do not write to it: it is shared with every task that uses it.
    pub fn path(&self) -> &Path {
        self.0.path()
    }

    pub fn digest(&self) -> &Digest {
        self.0.key()
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("digest", self.digest())
            .field("path", &self.path())
            .finish()
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
