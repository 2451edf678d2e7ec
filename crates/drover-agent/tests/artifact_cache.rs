//! The artifact blob cache against a tiny blob server: downloads, single flight,
//! verification, eviction, installation and reopening.

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use drover_agent::artifacts::{ArtifactCache, CacheConfig, CacheError, install};
use drover_core::artifact::Digest;
use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

const TOKEN: &str = "s3cret";

/// A stand-in for the controller's blob API.
#[derive(Default)]
struct Server {
    /// What is served for each digest, which a test may make wrong on purpose.
    blobs: Mutex<HashMap<String, Vec<u8>>>,
    requests: AtomicUsize,
    delay: Mutex<Duration>,
    /// Send the first bytes of a blob, then nothing more, ever.
    stall: AtomicBool,
}

impl Server {
    fn put(&self, content: &[u8]) -> Digest {
        let digest = Digest::of(content);
        self.serve(&digest, content);
        digest
    }

    fn serve(&self, digest: &Digest, content: &[u8]) {
        self.blobs
            .lock()
            .unwrap()
            .insert(digest.to_string(), content.to_vec());
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

fn error(status: StatusCode, code: &str, message: String) -> Response {
    let body = serde_json::json!({ "error": message, "code": code });
    (status, axum::Json(body)).into_response()
}

async fn blob(
    State(s): State<Arc<Server>>,
    UrlPath(digest): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    s.requests.fetch_add(1, Ordering::SeqCst);
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if auth != Some(&format!("Bearer {TOKEN}")) {
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or unknown bearer token".into(),
        );
    }
    let delay = *s.delay.lock().unwrap();
    tokio::time::sleep(delay).await;
    let Some(content) = s.blobs.lock().unwrap().get(&digest).cloned() else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("blob {digest} not found"),
        );
    };
    if s.stall.load(Ordering::SeqCst) {
        let first =
            futures_util::stream::once(
                async move { Ok::<_, std::io::Error>(content[..10].to_vec()) },
            );
        let body = Body::from_stream(futures_util::StreamExt::chain(
            first,
            futures_util::stream::pending(),
        ));
        return body.into_response();
    }
    content.into_response()
}

struct Fixture {
    server: Arc<Server>,
    url: String,
    dir: tempfile::TempDir,
}

impl Fixture {
    async fn new() -> Fixture {
        let server = Arc::new(Server::default());
        let app = Router::new()
            .route("/v1/blobs/{digest}", get(blob))
            .with_state(server.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Fixture {
            server,
            url,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn cache_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("blobs")
    }

    fn config(&self, limit_bytes: u64) -> CacheConfig {
        CacheConfig {
            dir: self.cache_dir(),
            limit_bytes,
            server: self.url.clone(),
            token: TOKEN.into(),
            timeout: Duration::from_secs(5),
            tls: None,
        }
    }

    fn cache(&self, limit_bytes: u64) -> Arc<ArtifactCache> {
        ArtifactCache::open(self.config(limit_bytes)).unwrap()
    }

    /// The names in the cache directory, sorted.
    fn files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.cache_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }
}

/// Distinct content of `len` bytes.
fn content(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add(i as u8))
        .collect()
}

fn cached(f: &Fixture, d: &Digest) -> bool {
    f.cache_dir().join(d.hex()).exists()
}

#[tokio::test]
async fn a_miss_downloads_once_and_then_hits() {
    let f = Fixture::new().await;
    let bytes = content(1, 5000);
    let d = f.server.put(&bytes);
    let cache = f.cache(1 << 20);

    let first = cache.get(&d, bytes.len() as u64).await.unwrap();
    assert_eq!(std::fs::read(first.path()).unwrap(), bytes);
    assert_eq!(first.path(), f.cache_dir().join(d.hex()));
    drop(first);
    let second = cache.get(&d, bytes.len() as u64).await.unwrap();
    assert_eq!(std::fs::read(second.path()).unwrap(), bytes);

    assert_eq!(cache.downloads(), 1);
    assert_eq!(f.server.requests(), 1);
    assert_eq!(cache.cached_bytes(), 5000);
    assert_eq!(f.files(), vec![d.hex().to_string()]);
}

#[tokio::test]
async fn concurrent_gets_of_one_blob_share_one_download() {
    let f = Fixture::new().await;
    let bytes = content(2, 100_000);
    let d = f.server.put(&bytes);
    // Slow enough that all eight calls arrive while the download is in flight.
    *f.server.delay.lock().unwrap() = Duration::from_millis(200);
    let cache = f.cache(1 << 20);

    let gets: Vec<_> = (0..8)
        .map(|_| {
            let cache = cache.clone();
            let d = d.clone();
            tokio::spawn(async move { cache.get(&d, 100_000).await })
        })
        .collect();
    let mut leases = Vec::new();
    for g in gets {
        leases.push(g.await.unwrap().unwrap());
    }

    assert_eq!(f.server.requests(), 1);
    assert_eq!(cache.downloads(), 1);
    for l in &leases {
        assert_eq!(std::fs::read(l.path()).unwrap(), bytes);
    }
    assert_eq!(cache.cached_bytes(), 100_000);
}

#[tokio::test]
async fn a_tampered_blob_is_rejected_and_leaves_nothing_behind() {
    let f = Fixture::new().await;
    let bytes = content(3, 4096);
    let d = Digest::of(&bytes);
    let mut tampered = bytes.clone();
    tampered[100] ^= 1;
    f.server.serve(&d, &tampered);
    let cache = f.cache(1 << 20);

    let err = cache.get(&d, 4096).await.unwrap_err();
    assert!(matches!(err, CacheError::Mismatch { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&format!(
            "blob {d} from the controller did not match its digest"
        )),
        "{msg}"
    );
    assert!(f.files().is_empty(), "{:?}", f.files());
    assert_eq!(cache.cached_bytes(), 0);

    // More bytes than announced are refused too, before they fill the disk.
    let mut longer = bytes.clone();
    longer.extend_from_slice(b"more");
    f.server.serve(&d, &longer);
    let err = cache.get(&d, 4096).await.unwrap_err();
    assert!(matches!(err, CacheError::TooLarge { .. }), "{err:?}");
    assert!(f.files().is_empty(), "{:?}", f.files());

    // Once the controller serves the right bytes, the next get tries again and succeeds.
    f.server.serve(&d, &bytes);
    let lease = cache.get(&d, 4096).await.unwrap();
    assert_eq!(std::fs::read(lease.path()).unwrap(), bytes);
    assert_eq!(cache.downloads(), 3);
    assert_eq!(f.server.requests(), 3);
}

#[tokio::test]
async fn least_recently_used_unleased_blobs_are_evicted() {
    let f = Fixture::new().await;
    let [a, b, c, d] = [10, 11, 12, 13].map(|seed| f.server.put(&content(seed, 1000)));
    let cache = f.cache(2500);

    drop(cache.get(&a, 1000).await.unwrap());
    let b_lease = cache.get(&b, 1000).await.unwrap();
    drop(cache.get(&c, 1000).await.unwrap());
    // Three blobs are over the limit: A, least recently used and unleased, goes.
    assert!(!cached(&f, &a));
    assert!(cached(&f, &b) && cached(&f, &c));
    assert_eq!(cache.cached_bytes(), 2000);

    drop(cache.get(&d, 1000).await.unwrap());
    // B is now the least recently used, but it is leased: C goes instead.
    assert!(cached(&f, &b), "a leased blob was evicted");
    assert!(!cached(&f, &c));
    assert!(cached(&f, &d));
    assert_eq!(cache.cached_bytes(), 2000);
    assert_eq!(std::fs::read(b_lease.path()).unwrap(), content(11, 1000));
    drop(b_lease);

    // A hit counts as a use: B, used now, outlives D.
    drop(cache.get(&b, 1000).await.unwrap());
    drop(cache.get(&a, 1000).await.unwrap());
    assert!(cached(&f, &b) && cached(&f, &a));
    assert!(!cached(&f, &d));
    assert_eq!(cache.downloads(), 5);
}

#[tokio::test]
async fn a_blob_bigger_than_the_limit_is_kept_only_while_leased() {
    let f = Fixture::new().await;
    let big = f.server.put(&content(20, 1000));
    let cache = f.cache(500);

    let lease = cache.get(&big, 1000).await.unwrap();
    assert!(lease.path().exists());
    assert_eq!(cache.cached_bytes(), 1000);
    drop(lease);
    assert!(f.files().is_empty(), "{:?}", f.files());
    assert_eq!(cache.cached_bytes(), 0);
}

#[tokio::test]
async fn install_links_an_executable_into_the_task_dir() {
    let f = Fixture::new().await;
    let bytes = content(30, 3000);
    let d = f.server.put(&bytes);
    let cache = f.cache(1 << 20);
    let lease = cache.get(&d, 3000).await.unwrap();

    let task_dir = f.dir.path().join("task");
    std::fs::create_dir(&task_dir).unwrap();
    let dest = task_dir.join("app");
    install(&lease, &dest).unwrap();
    // A second install (a retried preparation) replaces the first.
    install(&lease, &dest).unwrap();
    let meta = std::fs::metadata(&dest).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), bytes);
    assert_eq!(meta.permissions().mode() & 0o777, 0o755);
    assert_eq!(
        meta.ino(),
        std::fs::metadata(lease.path()).unwrap().ino(),
        "on one file system it is a hard link"
    );

    // The installed file outlives the blob's eviction.
    drop(lease);
    let small = ArtifactCache::open(f.config(0)).unwrap();
    assert_eq!(small.cached_bytes(), 0);
    assert!(!cached(&f, &d));
    assert_eq!(std::fs::read(&dest).unwrap(), bytes);
}

#[tokio::test]
async fn install_copies_across_file_systems() {
    let shm = Path::new("/dev/shm");
    let Ok(other) = tempfile::tempdir_in(shm) else {
        eprintln!("no /dev/shm to install into: skipped");
        return;
    };
    let f = Fixture::new().await;
    if std::fs::metadata(shm).unwrap().dev() == std::fs::metadata(f.dir.path()).unwrap().dev() {
        eprintln!("/dev/shm is on the same file system as the cache: skipped");
        return;
    }
    let bytes = content(31, 3000);
    let d = f.server.put(&bytes);
    let cache = f.cache(1 << 20);
    let lease = cache.get(&d, 3000).await.unwrap();

    let dest = other.path().join("app");
    install(&lease, &dest).unwrap();
    let meta = std::fs::metadata(&dest).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), bytes);
    assert_eq!(meta.permissions().mode() & 0o777, 0o755);
    assert_ne!(meta.ino(), std::fs::metadata(lease.path()).unwrap().ino());
}

#[tokio::test]
async fn http_errors_name_the_status_and_the_controllers_message() {
    let f = Fixture::new().await;
    let d = f.server.put(&content(40, 100));

    let mut cfg = f.config(1 << 20);
    cfg.token = "wrong".into();
    let wrong_token = ArtifactCache::open(cfg).unwrap();
    let err = wrong_token.get(&d, 100).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, CacheError::Status { status: 401, .. }),
        "{err:?}"
    );
    assert!(msg.contains(&d.to_string()), "{msg}");
    assert!(msg.contains("HTTP 401"), "{msg}");
    assert!(msg.contains("missing or unknown bearer token"), "{msg}");

    let cache = f.cache(1 << 20);
    let missing = Digest::of(b"never uploaded");
    let err = cache.get(&missing, 14).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("HTTP 404"), "{msg}");
    assert!(msg.contains(&format!("blob {missing} not found")), "{msg}");
    assert!(f.files().is_empty(), "{:?}", f.files());
}

#[tokio::test]
async fn network_waits_time_out() {
    let f = Fixture::new().await;
    let bytes = content(50, 1000);
    let d = f.server.put(&bytes);
    let mut cfg = f.config(1 << 20);
    cfg.timeout = Duration::from_millis(200);
    let cache = ArtifactCache::open(cfg).unwrap();

    *f.server.delay.lock().unwrap() = Duration::from_secs(2);
    let err = cache.get(&d, 1000).await.unwrap_err();
    assert!(matches!(err, CacheError::Timeout { .. }), "{err:?}");
    assert!(err.to_string().contains("timed out"), "{err}");

    *f.server.delay.lock().unwrap() = Duration::ZERO;
    f.server.stall.store(true, Ordering::SeqCst);
    let err = cache.get(&d, 1000).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&format!(
            "blob {d}: waiting for more of the download timed out"
        )),
        "{msg}"
    );
    assert!(f.files().is_empty(), "{:?}", f.files());
}

#[tokio::test]
async fn a_reopened_cache_adopts_its_blobs() {
    let f = Fixture::new().await;
    let [a, b] = [60, 61].map(|seed| f.server.put(&content(seed, 1000)));
    let cache = f.cache(1 << 20);
    drop(cache.get(&a, 1000).await.unwrap());
    drop(cache.get(&b, 1000).await.unwrap());
    drop(cache);
    // A is older on disk, so it is the first to go when the limit is tight.
    let old = SystemTime::now() - Duration::from_secs(3600);
    std::fs::File::open(f.cache_dir().join(a.hex()))
        .unwrap()
        .set_modified(old)
        .unwrap();
    std::fs::write(f.cache_dir().join(".partial-abc-0"), b"half a blob").unwrap();
    std::fs::write(f.cache_dir().join("notes.txt"), b"not ours").unwrap();

    let reopened = f.cache(1 << 20);
    assert_eq!(reopened.cached_bytes(), 2000);
    let lease = reopened.get(&a, 1000).await.unwrap();
    assert_eq!(std::fs::read(lease.path()).unwrap(), content(60, 1000));
    drop(lease);
    assert_eq!(reopened.downloads(), 0);
    assert_eq!(f.server.requests(), 2);
    let mut expected = vec![a.hex().to_string(), b.hex().to_string(), "notes.txt".into()];
    expected.sort();
    assert_eq!(f.files(), expected, "the partial download is removed");
    drop(reopened);

    let tight = f.cache(1500);
    assert_eq!(tight.cached_bytes(), 1000);
    assert!(!cached(&f, &a) && cached(&f, &b));
}
