//! The machinery every on-disk cache of the agent shares, written once: the artifact
//! blobs (`artifacts.rs`) and the Python environments (`pyenv.rs`) are each a [`Cache`]
//! of a [`Kind`].
//!
//! An entry is named by a key (a digest, an environment's key) and kept on disk where
//! its kind says. The cache does the bookkeeping:
//! - single flight: however many callers ask for a missing entry at once, one build (a
//!   download, a pip install) runs, in a tokio task of its own so that a caller who gives
//!   up does not cut it short for the others, and every caller is told its outcome;
//! - leases: a [`Lease`] pins an entry, which is never evicted or pruned while one lives;
//! - eviction: unleased entries go, least recently used first, while the entries are
//!   over the size limit, at the moments [`Eviction`] names;
//! - pruning: every unleased entry removed on request;
//! - failures: a failed build may be remembered for as long as its kind says, so asking
//!   again within that time fails at once with the same error;
//! - reopening: the complete entries a kind finds on disk are adopted when the cache
//!   opens, least recently used first by the time the kind read from the disk.
//!
//! The kind owns everything about its entries: how one is built, where it lives, how it
//! is taken off the disk, and how a complete one is told from a partial one at opening.
//! **Never** does this module touch the disk itself, nor wait while holding its lock.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};
use tokio::sync::oneshot;
use tokio::time::Instant;

/// The longest [`Cache::prune`] waits for what it removed to be deleted from the disk.
const DELETE_TIMEOUT: Duration = Duration::from_secs(120);

/// What a cache holds and how its entries live on disk.
pub(crate) trait Kind: Send + Sync + Sized + 'static {
    /// Names the cache in the agent's log, e.g. `artifact cache`.
    const NAME: &'static str;
    /// What names an entry.
    type Key: Clone + Eq + Hash + fmt::Display + fmt::Debug + Send + Sync + 'static;
    /// What the cache keeps about an entry besides its size and its use, e.g. an
    /// environment's requirements; `()` for nothing.
    type Meta: Send + Sync + 'static;
    /// What a build needs besides the key, given by the caller whose ask started it.
    type Request: Send + 'static;
    /// Why an entry could not be had. It is `Clone` because one build's failure is
    /// reported to every caller that waited for it.
    type Error: Clone + fmt::Display + Send + Sync + 'static;
    /// What a build tells every caller that waited besides its result, e.g. the end of
    /// its output; `()` for nothing.
    type Note: Clone + Send + 'static;

    /// Where the entry `key` is on disk.
    fn path(&self, key: &Self::Key) -> PathBuf;

    /// Runs once, when the cache opens: creates the cache's directory, removes what
    /// earlier processes left partial (builds cut short by a crash, entries being
    /// deleted), and returns the complete entries.
    fn scan(&self) -> io::Result<Vec<Found<Self>>>;

    /// Builds (or fetches) the entry `key` into its place on disk. A build that fails
    /// leaves nothing of its own behind.
    fn build(
        &self,
        key: &Self::Key,
        request: Self::Request,
    ) -> impl Future<Output = Report<Self>> + Send;

    /// How long this failure is remembered, or `None` to not remember it (the next ask
    /// builds again).
    fn remember(&self, error: &Self::Error) -> Option<Duration>;

    /// Takes the entry `key` off the disk, or out of the way. It is called with the
    /// cache's lock held, so that a new build of the same key cannot meet the old entry,
    /// and must be quick: anything it moves aside rather than deletes is returned, and
    /// deleted by [`Kind::delete`] without the lock. A failure is logged, and the entry
    /// forgotten all the same, so that eviction moves on; what is left on disk is
    /// adopted again when the cache is next opened.
    fn remove(&self, key: &Self::Key) -> Option<PathBuf>;

    /// Deletes what [`Kind::remove`] moved aside; it runs on a blocking thread, and logs
    /// what it could not delete.
    fn delete(leftover: &Path);
}

/// A complete entry found on disk when the cache opens.
pub(crate) struct Found<K: Kind> {
    pub key: K::Key,
    pub meta: K::Meta,
    pub size: u64,
    /// When it was last used, as far as the disk tells.
    pub last_used: SystemTime,
}

/// What a build reports: what it made or why it failed, and its note for every caller
/// that waited.
pub(crate) type Report<K> = (
    Result<Built<<K as Kind>::Meta>, <K as Kind>::Error>,
    <K as Kind>::Note,
);

/// What a successful build made.
pub(crate) struct Built<M> {
    pub meta: M,
    /// The bytes it takes, as counted against the limit.
    pub size: u64,
}

/// When unleased entries are evicted to bring the cache within its limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Eviction {
    /// Whenever the limit may have been passed: at opening, after every build and when a
    /// lease is handed back, so the cache is over its limit only by what is leased.
    Eager,
    /// Only after a build, and never the entry just built, which is the one wanted now.
    AfterBuild,
}

/// How a cache keeps its size and orders its uses.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Policy {
    /// Unleased entries are evicted, least recently used first, while the entries take
    /// more than this many bytes.
    pub limit: u64,
    pub eviction: Eviction,
    /// Whether handing a lease back counts as a use, so an entry a long task held is as
    /// recent as the end of that task; otherwise only taking a lease does.
    pub release_is_use: bool,
}

/// One entry of the cache.
pub(crate) struct Entry<M> {
    pub meta: M,
    pub size: u64,
    /// Leases alive now.
    pub leases: u32,
    /// The wall-clock time of the last use, for people to read.
    pub last_used: SystemTime,
    /// The cache's clock at the last use; the smallest is evicted first. A counter rather
    /// than a time, since it orders uses exactly and cannot go backwards.
    clock: u64,
}

/// A remembered failure.
struct Failure<E> {
    error: E,
    at: Instant,
    until: Instant,
}

/// What a build tells each caller that waited for it.
pub(crate) type Outcome<K> = (Result<Lease<K>, <K as Kind>::Error>, <K as Kind>::Note);

struct State<K: Kind> {
    entries: HashMap<K::Key, Entry<K::Meta>>,
    /// Builds in progress and the callers waiting for each. A key is here or in
    /// `entries`, never both.
    pending: HashMap<K::Key, Vec<oneshot::Sender<Outcome<K>>>>,
    failures: HashMap<K::Key, Failure<K::Error>>,
    /// The sum of the sizes in `entries`.
    bytes: u64,
    clock: u64,
}

pub(crate) struct Cache<K: Kind> {
    kind: K,
    policy: Policy,
    state: Mutex<State<K>>,
}

/// What [`Cache::join`] found.
pub(crate) enum Joined<K: Kind> {
    /// The entry is complete, and leased to the caller.
    Ready(Lease<K>),
    /// Its last build failed too recently to try again.
    Remembered(Remembered<K::Error>),
    /// A build is in progress, started by this call or an earlier one.
    Waiting(Waiting<K>),
}

/// A remembered failure, as [`Cache::join`] reports it.
pub(crate) struct Remembered<E> {
    pub error: E,
    /// How long ago the build failed.
    pub ago: Duration,
    /// How long until asking builds again.
    pub retry_in: Duration,
}

/// A caller's place among those waiting for a build.
pub(crate) struct Waiting<K: Kind> {
    rx: oneshot::Receiver<Outcome<K>>,
    started: bool,
}

impl<K: Kind> Waiting<K> {
    /// Whether this caller's ask started the build, so its request is the one used.
    pub fn started(&self) -> bool {
        self.started
    }

    /// The build's outcome, or `None` when the build stopped without reporting (it
    /// panicked, or its runtime shut down). The caller bounds the wait.
    pub async fn outcome(self) -> Option<Outcome<K>> {
        self.rx.await.ok()
    }
}

impl<K: Kind> Cache<K> {
    /// Opens the cache: adopts the complete entries `kind` finds on disk, least recently
    /// used first, and, with [`Eviction::Eager`], evicts what is over the limit.
    pub fn open(kind: K, policy: Policy) -> io::Result<Arc<Cache<K>>> {
        let mut found = kind.scan()?;
        // Stable, so entries last used at the same time keep the order they were found in.
        found.sort_by_key(|f| f.last_used);
        let mut state = State {
            entries: HashMap::new(),
            pending: HashMap::new(),
            failures: HashMap::new(),
            bytes: 0,
            clock: 0,
        };
        for f in found {
            state.clock += 1;
            state.bytes += f.size;
            let entry = Entry {
                meta: f.meta,
                size: f.size,
                leases: 0,
                last_used: f.last_used,
                clock: state.clock,
            };
            state.entries.insert(f.key, entry);
        }
        let cache = Cache {
            kind,
            policy,
            state: Mutex::new(state),
        };
        if policy.eviction == Eviction::Eager {
            let leftovers = cache.evict(&mut cache.lock(), None);
            // Opening is synchronous already (the scan read the disk), and nothing else
            // can use the cache before it is returned.
            leftovers.iter().for_each(|p| K::delete(p));
        }
        Ok(Arc::new(cache))
    }

    fn lock(&self) -> MutexGuard<'_, State<K>> {
        // The state is consistent between statements that touch it, so a panic
        // elsewhere while it was held leaves nothing half done.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn kind(&self) -> &K {
        &self.kind
    }

    /// The total size of the entries.
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    /// Under the lock, one of: a lease on the complete entry, its remembered failure, or
    /// a place among the waiters for its build, starting the build with `request` when
    /// none is in progress. It never waits, so the lock is never held across an await.
    pub fn join(self: &Arc<Self>, key: &K::Key, request: K::Request) -> Joined<K> {
        let mut st = self.lock();
        if let Some(lease) = st.lease(self, key) {
            return Joined::Ready(lease);
        }
        if let Some(f) = st.failures.get(key) {
            let now = Instant::now();
            if now < f.until {
                return Joined::Remembered(Remembered {
                    error: f.error.clone(),
                    ago: now.duration_since(f.at),
                    retry_in: f.until.duration_since(now),
                });
            }
            st.failures.remove(key);
        }
        let (tx, rx) = oneshot::channel();
        if let Some(waiters) = st.pending.get_mut(key) {
            waiters.push(tx);
            return Joined::Waiting(Waiting { rx, started: false });
        }
        st.pending.insert(key.clone(), vec![tx]);
        tokio::spawn(self.clone().run(key.clone(), request));
        Joined::Waiting(Waiting { rx, started: true })
    }

    /// A lease on the entry when it is complete and cached, without building it. A
    /// restarted agent uses it to pin again what a task it adopts was using.
    pub fn lease_existing(self: &Arc<Self>, key: &K::Key) -> Option<Lease<K>> {
        self.lock().lease(self, key)
    }

    /// Applies `f` to every entry, in no particular order.
    pub fn list<T>(&self, mut f: impl FnMut(&K::Key, &Entry<K::Meta>) -> T) -> Vec<T> {
        self.lock().entries.iter().map(|(k, e)| f(k, e)).collect()
    }

    /// Removes every entry without a lease and returns them, once they are deleted from
    /// the disk or [`DELETE_TIMEOUT`] has passed (the deletion then goes on).
    pub async fn prune(&self) -> Vec<(K::Key, Entry<K::Meta>)> {
        let (removed, leftovers) = {
            let mut st = self.lock();
            let keys: Vec<K::Key> = st
                .entries
                .iter()
                .filter(|(_, e)| e.leases == 0)
                .map(|(k, _)| k.clone())
                .collect();
            let mut removed = Vec::new();
            let mut leftovers = Vec::new();
            for key in keys {
                if let Some(entry) = st.entries.remove(&key) {
                    st.bytes = st.bytes.saturating_sub(entry.size);
                    leftovers.extend(self.kind.remove(&key));
                    removed.push((key, entry));
                }
            }
            (removed, leftovers)
        };
        let delete =
            tokio::task::spawn_blocking(move || leftovers.iter().for_each(|p| K::delete(p)));
        match tokio::time::timeout(DELETE_TIMEOUT, delete).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("{}: deleting what was pruned: {e}", K::NAME),
            Err(_) => tracing::warn!(
                "{}: deleting what was pruned takes over {}s; it goes on in the background",
                K::NAME,
                DELETE_TIMEOUT.as_secs()
            ),
        }
        removed
    }

    /// Builds one entry and hands the outcome to everyone waiting for it.
    async fn run(self: Arc<Self>, key: K::Key, request: K::Request) {
        // Should this task panic or be dropped with its runtime, the guard takes the
        // waiters out so they are told rather than wait until their own timeouts.
        let mut guard = PendingGuard {
            cache: &self,
            key: Some(&key),
        };
        let (result, note) = self.kind.build(&key, request).await;
        let (replies, leftovers) = {
            let mut st = self.lock();
            let waiters = st.pending.remove(&key).unwrap_or_default();
            guard.key = None;
            match result {
                Ok(built) => {
                    // Used now even when every caller gave up meanwhile: it is the most
                    // recently wanted entry.
                    st.clock += 1;
                    st.bytes += built.size;
                    let entry = Entry {
                        meta: built.meta,
                        size: built.size,
                        leases: 0,
                        last_used: SystemTime::now(),
                        clock: st.clock,
                    };
                    st.entries.insert(key.clone(), entry);
                    // Leases are taken before evicting, under the same lock, so what the
                    // waiters asked for cannot be evicted before they have it.
                    let replies: Vec<_> = waiters
                        .into_iter()
                        .filter_map(|tx| st.lease(&self, &key).map(|l| (tx, Ok(l))))
                        .collect();
                    let spare = match self.policy.eviction {
                        Eviction::Eager => None,
                        Eviction::AfterBuild => Some(&key),
                    };
                    let leftovers = self.evict(&mut st, spare);
                    (replies, leftovers)
                }
                Err(e) => {
                    tracing::warn!("{}: {e}", K::NAME);
                    if let Some(memory) = self.kind.remember(&e) {
                        let at = Instant::now();
                        let failure = Failure {
                            error: e.clone(),
                            at,
                            until: at + memory,
                        };
                        st.failures.insert(key.clone(), failure);
                    }
                    let replies = waiters.into_iter().map(|tx| (tx, Err(e.clone()))).collect();
                    (replies, Vec::new())
                }
            }
        };
        // Sent without the lock: a caller that gave up hands its lease back here, and
        // dropping a lease takes the lock.
        for (tx, reply) in replies {
            if tx.send((reply, note.clone())).is_err() {
                // The caller gave up waiting. The lease it was sent comes back here and is
                // dropped, outside the lock, which is how it is handed back.
            }
        }
        delete_later::<K>(leftovers);
    }

    /// Removes unleased entries other than `spare`, least recently used first, until the
    /// entries fit the limit or only leased ones (and `spare`) are left. Returns what
    /// the kind moved aside, to be deleted without the lock.
    fn evict(&self, st: &mut State<K>, spare: Option<&K::Key>) -> Vec<PathBuf> {
        let mut leftovers = Vec::new();
        while st.bytes > self.policy.limit {
            let victim = st
                .entries
                .iter()
                .filter(|(k, e)| e.leases == 0 && Some(*k) != spare)
                .min_by_key(|(_, e)| e.clock)
                .map(|(k, _)| k.clone());
            let Some(key) = victim else { break };
            if let Some(entry) = st.entries.remove(&key) {
                st.bytes = st.bytes.saturating_sub(entry.size);
                tracing::info!(
                    "{}: evicting {key} ({} bytes) to stay within {} bytes",
                    K::NAME,
                    entry.size,
                    self.policy.limit
                );
            }
            leftovers.extend(self.kind.remove(&key));
        }
        leftovers
    }
}

impl<K: Kind> State<K> {
    /// A lease on a complete entry, which counts as a use.
    fn lease(&mut self, cache: &Arc<Cache<K>>, key: &K::Key) -> Option<Lease<K>> {
        let entry = self.entries.get_mut(key)?;
        self.clock += 1;
        entry.leases += 1;
        entry.clock = self.clock;
        entry.last_used = SystemTime::now();
        Some(Lease {
            cache: cache.clone(),
            key: key.clone(),
            path: cache.kind.path(key),
        })
    }
}

/// Deletes what eviction moved aside, on a blocking thread. Nothing waits for it: it was
/// moved out of the way under the lock, so no later build or lease can meet it.
fn delete_later<K: Kind>(leftovers: Vec<PathBuf>) {
    if leftovers.is_empty() {
        return;
    }
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => {
            // Not awaited: see above.
            rt.spawn_blocking(move || leftovers.iter().for_each(|p| K::delete(p)));
        }
        // A lease dropped outside any runtime: deleted here, since nothing else would.
        Err(_) => leftovers.iter().for_each(|p| K::delete(p)),
    }
}

/// Takes a build's waiters out of the pending table when the build ends without
/// reporting, so they are told it was abandoned.
struct PendingGuard<'a, K: Kind> {
    cache: &'a Cache<K>,
    key: Option<&'a K::Key>,
}

impl<K: Kind> Drop for PendingGuard<'_, K> {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            let waiters = self.cache.lock().pending.remove(key);
            // Dropped without the lock, closing the channels the callers wait on.
            drop(waiters);
        }
    }
}

/// An entry pinned for a caller: it is not evicted or pruned while a lease on it lives.
/// Dropping the lease hands it back.
pub(crate) struct Lease<K: Kind> {
    cache: Arc<Cache<K>>,
    key: K::Key,
    path: PathBuf,
}

impl<K: Kind> Lease<K> {
    pub fn key(&self) -> &K::Key {
        &self.key
    }

    /// The entry on disk. Do not write to it: it is shared with every lease on it.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl<K: Kind> fmt::Debug for Lease<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("key", &self.key)
            .field("path", &self.path)
            .finish()
    }
}

impl<K: Kind> Drop for Lease<K> {
    fn drop(&mut self) {
        let leftovers = {
            let cache = &self.cache;
            let mut guard = cache.lock();
            // Borrowed whole, so an entry and the clock can be changed together.
            let st = &mut *guard;
            if let Some(entry) = st.entries.get_mut(&self.key) {
                entry.leases = entry.leases.saturating_sub(1);
                if cache.policy.release_is_use {
                    st.clock += 1;
                    entry.clock = st.clock;
                    entry.last_used = SystemTime::now();
                }
            }
            match cache.policy.eviction {
                // An entry kept over the limit only because it was leased goes now.
                Eviction::Eager => cache.evict(st, None),
                Eviction::AfterBuild => Vec::new(),
            }
        };
        delete_later::<K>(leftovers);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::sync::Semaphore;

    /// The longest any wait in these tests may take before the test fails.
    const WAIT: Duration = Duration::from_secs(10);

    /// One file per entry, `<dir>/<key>`, of `size` zero bytes. A build writes
    /// `<key>.partial` and renames it into place; removal moves the file to
    /// `<key>.trash`, which `delete` removes.
    struct Files {
        dir: PathBuf,
        builds: AtomicU64,
        /// A build waits for a permit here, so a test can ask many times while one is in
        /// flight.
        gate: Semaphore,
        memory: Option<Duration>,
    }

    /// What a test's build does.
    enum Plan {
        Make(u64),
        Fail,
        Panic,
    }

    impl Kind for Files {
        const NAME: &'static str = "test cache";
        type Key = String;
        type Meta = ();
        type Request = Plan;
        type Error = String;
        /// The build's number, so a test can tell that every waiter heard from one build.
        type Note = u64;

        fn path(&self, key: &String) -> PathBuf {
            self.dir.join(key)
        }

        fn scan(&self) -> io::Result<Vec<Found<Files>>> {
            std::fs::create_dir_all(&self.dir)?;
            let mut found = Vec::new();
            for e in std::fs::read_dir(&self.dir)? {
                let e = e?;
                let name = e.file_name().to_string_lossy().into_owned();
                if name.ends_with(".partial") || name.ends_with(".trash") {
                    // An earlier cache's deletion may still be removing it.
                    match std::fs::remove_file(e.path()) {
                        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                        _ => continue,
                    }
                }
                let meta = match e.metadata() {
                    Ok(m) => m,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                };
                found.push(Found {
                    key: name,
                    meta: (),
                    size: meta.len(),
                    last_used: meta.modified()?,
                });
            }
            Ok(found)
        }

        async fn build(&self, key: &String, plan: Plan) -> Report<Files> {
            let n = self.builds.fetch_add(1, Ordering::SeqCst) + 1;
            let permit = tokio::time::timeout(WAIT, self.gate.acquire()).await;
            drop(permit.expect("the test opens the gate").unwrap());
            let result = match plan {
                Plan::Make(size) => {
                    let partial = self.dir.join(format!("{key}.partial"));
                    std::fs::write(&partial, vec![0u8; size as usize]).unwrap();
                    std::fs::rename(&partial, self.path(key)).unwrap();
                    Ok(Built { meta: (), size })
                }
                Plan::Fail => Err(format!("{key} cannot be built")),
                Plan::Panic => panic!("the build of {key} panicked, as the test asked"),
            };
            (result, n)
        }

        fn remember(&self, _: &String) -> Option<Duration> {
            self.memory
        }

        fn remove(&self, key: &String) -> Option<PathBuf> {
            let trash = self.dir.join(format!("{key}.trash"));
            std::fs::rename(self.path(key), &trash).unwrap();
            Some(trash)
        }

        fn delete(leftover: &Path) {
            match std::fs::remove_file(leftover) {
                Ok(()) => {}
                // The same key evicted twice in a row shares one name in the trash.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => panic!("deleting {}: {e}", leftover.display()),
            }
        }
    }

    fn files(dir: &Path, memory: Option<Duration>) -> Files {
        Files {
            dir: dir.to_path_buf(),
            builds: AtomicU64::new(0),
            gate: Semaphore::new(Semaphore::MAX_PERMITS),
            memory,
        }
    }

    fn open(dir: &Path, policy: Policy) -> Arc<Cache<Files>> {
        Cache::open(files(dir, None), policy).unwrap()
    }

    fn policy(limit: u64, eviction: Eviction, release_is_use: bool) -> Policy {
        Policy {
            limit,
            eviction,
            release_is_use,
        }
    }

    fn eager(limit: u64) -> Policy {
        policy(limit, Eviction::Eager, false)
    }

    /// Asks for `key`, built by `plan` when it is missing, and waits for the answer.
    async fn get(cache: &Arc<Cache<Files>>, key: &str, plan: Plan) -> Result<Lease<Files>, String> {
        match cache.join(&key.to_string(), plan) {
            Joined::Ready(lease) => Ok(lease),
            Joined::Remembered(r) => Err(format!("remembered: {}", r.error)),
            Joined::Waiting(w) => {
                let outcome = tokio::time::timeout(WAIT, w.outcome()).await;
                outcome
                    .expect("the build reports in time")
                    .expect("the build reports")
                    .0
            }
        }
    }

    /// The keys in the cache, sorted.
    fn keys(cache: &Cache<Files>) -> Vec<String> {
        let mut keys = cache.list(|k, _| k.clone());
        keys.sort();
        keys
    }

    /// The files in the directory, sorted, once what was moved to the trash is deleted
    /// (which happens in the background).
    async fn on_disk(dir: &Path) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        loop {
            let mut names: Vec<String> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            if !names.iter().any(|n| n.ends_with(".trash")) {
                return names;
            }
            assert!(Instant::now() < deadline, "never deleted: {names:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn builds(cache: &Cache<Files>) -> u64 {
        cache.kind().builds.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn concurrent_asks_share_one_build() {
        let dir = tempfile::tempdir().unwrap();
        let mut kind = files(dir.path(), None);
        kind.gate = Semaphore::new(0);
        let cache = Cache::open(kind, eager(1000)).unwrap();
        let key = "a".to_string();

        let waiting: Vec<Waiting<Files>> = (0..8)
            .map(|_| match cache.join(&key, Plan::Make(10)) {
                Joined::Waiting(w) => w,
                _ => panic!("the entry is being built, so every ask waits"),
            })
            .collect();
        assert!(waiting[0].started(), "the first ask starts the build");
        assert!(waiting[1..].iter().all(|w| !w.started()));
        cache.kind().gate.add_permits(1);
        let mut leases = Vec::new();
        for w in waiting {
            let (result, note) = tokio::time::timeout(WAIT, w.outcome())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(note, 1, "every caller hears from the one build");
            leases.push(result.unwrap());
        }
        assert_eq!(builds(&cache), 1);
        assert_eq!(leases[0].path(), dir.path().join("a"));
        assert_eq!(cache.list(|_, e| e.leases), vec![8]);
        drop(leases);
        assert_eq!(cache.list(|_, e| e.leases), vec![0]);

        // Asked again, it is ready at once, and the plan is not used.
        assert!(matches!(cache.join(&key, Plan::Fail), Joined::Ready(_)));
        assert_eq!(builds(&cache), 1);
    }

    #[tokio::test]
    async fn a_leased_entry_is_never_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let cache = open(dir.path(), eager(25));
        let a = get(&cache, "a", Plan::Make(10)).await.unwrap();
        drop(get(&cache, "b", Plan::Make(10)).await.unwrap());
        drop(get(&cache, "c", Plan::Make(10)).await.unwrap());
        // Over the limit: b, unleased and least recently used, goes.
        assert_eq!(keys(&cache), ["a", "c"]);
        drop(get(&cache, "d", Plan::Make(10)).await.unwrap());
        // a is now the least recently used, but it is leased: c goes instead.
        assert_eq!(keys(&cache), ["a", "d"]);
        assert!(a.path().exists());

        // With only leased entries left, the cache stays over its limit until one is
        // handed back.
        let big = get(&cache, "big", Plan::Make(30)).await.unwrap();
        assert_eq!(keys(&cache), ["a", "big"]);
        assert_eq!(cache.bytes(), 40);
        drop(big);
        assert_eq!(keys(&cache), ["a"]);
        assert_eq!(cache.bytes(), 10);
        drop(a);
        assert_eq!(keys(&cache), ["a"], "within the limit, nothing goes");
    }

    #[tokio::test]
    async fn eviction_takes_the_least_recently_used_first() {
        let dir = tempfile::tempdir().unwrap();
        let cache = open(dir.path(), eager(30));
        for key in ["a", "b", "c"] {
            drop(get(&cache, key, Plan::Make(10)).await.unwrap());
        }
        // A use of a leaves b the least recently used.
        drop(get(&cache, "a", Plan::Fail).await.unwrap());
        drop(get(&cache, "d", Plan::Make(10)).await.unwrap());
        assert_eq!(keys(&cache), ["a", "c", "d"]);
        drop(get(&cache, "e", Plan::Make(10)).await.unwrap());
        assert_eq!(keys(&cache), ["a", "d", "e"]);
        assert_eq!(on_disk(dir.path()).await, ["a", "d", "e"]);

        // Handing a lease back is a use only when the policy says so: a held while b is
        // used, then handed back, is the more recent of the two only then.
        for release_is_use in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let cache = open(dir.path(), policy(20, Eviction::Eager, release_is_use));
            let a = get(&cache, "a", Plan::Make(10)).await.unwrap();
            drop(get(&cache, "b", Plan::Make(10)).await.unwrap());
            drop(a);
            drop(get(&cache, "c", Plan::Make(10)).await.unwrap());
            let kept = if release_is_use { "a" } else { "b" };
            assert_eq!(
                keys(&cache),
                [kept, "c"],
                "release_is_use: {release_is_use}"
            );
        }
    }

    #[tokio::test]
    async fn after_build_eviction_waits_for_a_build_and_spares_it() {
        let dir = tempfile::tempdir().unwrap();
        let after_build = policy(15, Eviction::AfterBuild, true);
        let cache = open(dir.path(), after_build);
        drop(get(&cache, "a", Plan::Make(10)).await.unwrap());
        let b = get(&cache, "b", Plan::Make(10)).await.unwrap();
        assert_eq!(keys(&cache), ["b"], "a build evicts the unleased a");
        drop(b);
        let c = get(&cache, "c", Plan::Make(20)).await.unwrap();
        assert_eq!(keys(&cache), ["c"]);
        // Handing back an entry that is over the limit by itself evicts nothing.
        drop(c);
        assert_eq!(keys(&cache), ["c"]);

        // The entry just built is spared even when every caller gave up on it.
        drop(cache.join(&"d".to_string(), Plan::Make(5)));
        let deadline = Instant::now() + WAIT;
        while !keys(&cache).contains(&"d".to_string()) {
            assert!(Instant::now() < deadline, "d was never built");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(keys(&cache), ["d"], "c goes, d stays");
        drop(cache);

        // Nor does opening evict, unless the eviction is eager.
        drop(
            get(&open(dir.path(), after_build), "e", Plan::Make(20))
                .await
                .unwrap(),
        );
        let reopened = open(dir.path(), after_build);
        assert_eq!(keys(&reopened), ["e"]);
        drop(get(&reopened, "f", Plan::Make(1)).await.unwrap());
        drop(reopened);
        let reopened = open(dir.path(), eager(0));
        assert!(keys(&reopened).is_empty());
        assert!(on_disk(dir.path()).await.is_empty());
    }

    #[tokio::test]
    async fn a_failed_build_is_remembered_then_retried() {
        let dir = tempfile::tempdir().unwrap();
        let memory = Duration::from_millis(300);
        let cache = Cache::open(files(dir.path(), Some(memory)), eager(100)).unwrap();
        let key = "a".to_string();

        let failed = get(&cache, "a", Plan::Fail).await.unwrap_err();
        assert_eq!(failed, "a cannot be built");
        match cache.join(&key, Plan::Make(10)) {
            Joined::Remembered(r) => {
                assert_eq!(r.error, "a cannot be built");
                assert!(
                    r.ago < memory && r.retry_in <= memory,
                    "{:?}",
                    (r.ago, r.retry_in)
                );
            }
            _ => panic!("the failure is remembered"),
        }
        assert_eq!(builds(&cache), 1);

        tokio::time::sleep(memory).await;
        let lease = get(&cache, "a", Plan::Make(10)).await.unwrap();
        assert_eq!(builds(&cache), 2);
        assert!(lease.path().exists());

        // A failure the kind does not remember is built again at the next ask.
        let cache = open(dir.path(), eager(100));
        for _ in 0..2 {
            let failed = get(&cache, "b", Plan::Fail).await.unwrap_err();
            assert_eq!(failed, "b cannot be built");
        }
        assert_eq!(builds(&cache), 2);
    }

    #[tokio::test]
    async fn reopening_keeps_complete_entries_and_removes_partial_ones() {
        let dir = tempfile::tempdir().unwrap();
        let cache = open(dir.path(), eager(100));
        for key in ["a", "b"] {
            drop(get(&cache, key, Plan::Make(10)).await.unwrap());
        }
        drop(cache);
        std::fs::write(dir.path().join("c.partial"), b"cut short").unwrap();
        std::fs::write(dir.path().join("d.trash"), b"half deleted").unwrap();
        // b is older on disk, so it is the first to go when the limit is tight.
        let old = SystemTime::now() - Duration::from_secs(3600);
        std::fs::File::open(dir.path().join("b"))
            .unwrap()
            .set_modified(old)
            .unwrap();

        let reopened = open(dir.path(), eager(100));
        assert_eq!(keys(&reopened), ["a", "b"]);
        assert_eq!(on_disk(dir.path()).await, ["a", "b"]);
        assert_eq!(reopened.bytes(), 20);
        drop(get(&reopened, "a", Plan::Fail).await.unwrap());
        assert_eq!(builds(&reopened), 0, "a complete entry is used as it is");
        drop(reopened);

        let tight = open(dir.path(), eager(15));
        assert_eq!(keys(&tight), ["a"]);
        assert_eq!(on_disk(dir.path()).await, ["a"]);
    }

    #[tokio::test]
    async fn a_build_that_stops_without_reporting_leaves_no_waiter_hanging() {
        let dir = tempfile::tempdir().unwrap();
        let cache = open(dir.path(), eager(100));
        let key = "a".to_string();
        let Joined::Waiting(w) = cache.join(&key, Plan::Panic) else {
            panic!("a missing entry is built");
        };
        let outcome = tokio::time::timeout(WAIT, w.outcome()).await.unwrap();
        assert!(outcome.is_none(), "the waiter is told the build stopped");
        // Nothing of it is left pending: the next ask starts a new build.
        let Joined::Waiting(w) = cache.join(&key, Plan::Make(10)) else {
            panic!("a missing entry is built");
        };
        assert!(w.started());
        let (result, _) = tokio::time::timeout(WAIT, w.outcome())
            .await
            .unwrap()
            .unwrap();
        assert!(result.unwrap().path().exists());
        assert_eq!(builds(&cache), 2);
    }
}
