//! Accepting and serving the controller's HTTP connections, with the limits that keep
//! one client from holding the server's file descriptors: a timeout on reading a
//! request's headers (which, as hyper runs it, also closes idle keep-alive
//! connections), a cap on the connections of one client address and a cap on all of
//! them. Connections over a cap are closed as soon as they are accepted.
//!
//! With a TLS configuration every connection is a TLS one, its handshake bounded by the
//! same header timeout, so a client that connects and never says hello is closed too.
//!
//! Connections are served as HTTP/1.1 with upgrades, the protocol every Drover client
//! speaks (the CLI and agents' downloads through reqwest, agents' WebSockets through
//! tungstenite). hyper-util's `auto` builder is not used: it first reads the bytes that
//! tell HTTP/1 from HTTP/2 with no timeout at all, so a client that connects and sends
//! nothing would never be timed out.

use crate::Inner;
use axum::extract::ConnectInfo;
use drover_tls::tokio_rustls;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How long connections still open at shutdown get to finish their request before
/// they are cut; below the 5 s the server's owners wait for `serve` to return.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);

/// Refused connections are logged at most this often, with a count, so a flood of
/// them cannot flood the log too.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// How long the accept loop pauses after an error that is not about one connection
/// (out of file descriptors, say), so it does not spin while the condition lasts.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(250);

/// The connection limits, from the controller's config.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub header_read_timeout: Duration,
    pub max_per_ip: usize,
    pub max_total: usize,
}

/// Why a connection was closed on accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    PerIp,
    Total,
}

impl Refusal {
    fn label(self) -> &'static str {
        match self {
            Refusal::PerIp => "per_ip",
            Refusal::Total => "total",
        }
    }
}

/// The open connections, by client address. One lock guards both counts, so a
/// connection is admitted against a consistent pair.
struct Table {
    limits: Limits,
    counts: Mutex<Counts>,
    /// The `http_connections` metric, kept equal to the admitted count.
    open: prometheus_client::metrics::gauge::Gauge,
}

#[derive(Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

impl Table {
    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        // Every change under this lock is a pair of counter updates that cannot panic
        // halfway, so a poisoned lock still holds consistent counts.
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a new connection from `ip`, or says which limit it is over.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Refusal> {
        let mut c = self.lock();
        if c.total >= self.limits.max_total {
            return Err(Refusal::Total);
        }
        let n = c.per_ip.entry(ip).or_default();
        if *n >= self.limits.max_per_ip {
            return Err(Refusal::PerIp);
        }
        *n += 1;
        c.total += 1;
        self.open.inc();
        Ok(Slot {
            table: self.clone(),
            ip,
        })
    }
}

/// One admitted connection; dropping it, however the connection ends, frees its place.
struct Slot {
    table: Arc<Table>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.table.lock();
        c.total = c.total.saturating_sub(1);
        self.table.open.dec();
        if let Some(n) = c.per_ip.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            // An address with no connection left is forgotten, so the map holds only
            // the addresses connected now, however many have come and gone.
            if *n == 0 {
                c.per_ip.remove(&self.ip);
            }
        }
    }
}

/// Counts refused connections between two log lines.
#[derive(Default)]
struct RefusalLog {
    last: Option<Instant>,
    per_ip: u64,
    total: u64,
}

impl RefusalLog {
    fn note(&mut self, why: Refusal, peer: SocketAddr, limits: &Limits) {
        match why {
            Refusal::PerIp => self.per_ip += 1,
            Refusal::Total => self.total += 1,
        }
        if self.last.is_some_and(|t| t.elapsed() < REFUSAL_LOG_EVERY) {
            return;
        }
        self.last = Some(Instant::now());
        tracing::warn!(
            "closing connections over the limits: {} from addresses already holding {} (the last from {}), {} past the {} allowed in all",
            self.per_ip,
            limits.max_per_ip,
            peer.ip(),
            self.total,
            limits.max_total,
        );
        self.per_ip = 0;
        self.total = 0;
    }
}

/// Serves `router` on `listener` until the controller shuts down, then lets open
/// connections finish for up to [`DRAIN_TIMEOUT`].
pub(crate) async fn serve(
    inner: Arc<Inner>,
    router: axum::Router,
    listener: TcpListener,
    limits: Limits,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> std::io::Result<()> {
    let table = Arc::new(Table {
        limits,
        counts: Mutex::new(Counts::default()),
        open: inner.metrics.http_connections.clone(),
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    // hyper starts the header timer when a connection opens and again whenever a
    // kept-alive connection waits for its next request, and stops it once a request's
    // headers are in: a streaming response or an upgraded WebSocket is never cut by it.
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let http = Arc::new(http);
    let shutdown = inner.shutdown.clone();
    let mut conns = JoinSet::new();
    let mut refusals = RefusalLog::default();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            // Finished connections are reaped as they end, so the set holds only open ones.
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) if is_per_connection(&e) => {
                    tracing::debug!("accepting a connection: {e}");
                    continue;
                }
                Err(e) => {
                    tracing::warn!("accepting connections: {e}; pausing for {}ms", ACCEPT_ERROR_PAUSE.as_millis());
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        // An IPv4 client of a server listening on IPv6 shows as ::ffff:a.b.c.d; it is
        // the same client as a.b.c.d and shares its limit.
        let ip = peer.ip().to_canonical();
        let slot = match table.admit(ip) {
            Ok(s) => s,
            Err(why) => {
                inner
                    .metrics
                    .http_connections_refused
                    .get_or_create(&crate::metrics::ReasonLabel {
                        reason: why.label().into(),
                    })
                    .inc();
                refusals.note(why, peer, &limits);
                // Dropping the stream closes it at once.
                drop(tcp);
                continue;
            }
        };
        // API answers and agent messages are small; without TCP_NODELAY a write that
        // follows another unacknowledged one waits out the peer's delayed-ACK timer
        // (40 ms on Linux).
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("setting TCP_NODELAY: {e}");
        }
        conns.spawn(connection(
            http.clone(),
            router.clone(),
            tcp,
            tls.clone(),
            peer,
            slot,
            shutdown.clone(),
            limits.header_read_timeout,
        ));
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, async {
        while conns.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tracing::warn!(
            "{} connections still open {}s after shutdown; closing them",
            conns.len(),
            DRAIN_TIMEOUT.as_secs()
        );
        conns.shutdown().await;
    }
    Ok(())
}

/// Whether an accept error is about the one connection (which the client gave up on
/// before it was accepted) rather than the listener.
fn is_per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    )
}

/// Serves one connection (after its TLS handshake, with `tls`) until it closes, or
/// until shutdown, when it gets to finish the request in progress.
#[allow(clippy::too_many_arguments)]
async fn connection(
    http: Arc<hyper::server::conn::http1::Builder>,
    router: axum::Router,
    tcp: TcpStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
    peer: SocketAddr,
    slot: Slot,
    shutdown: CancellationToken,
    handshake_timeout: Duration,
) {
    let Some(tls) = tls else {
        drive(&http, router, TokioIo::new(tcp), peer, shutdown).await;
        drop(slot);
        return;
    };
    let handshake = tokio::time::timeout(handshake_timeout, tls.accept(tcp));
    let stream = tokio::select! {
        _ = shutdown.cancelled() => return,
        r = handshake => match r {
            Ok(Ok(s)) => s,
            // A client that does not trust the certificate ends here, as does one
            // speaking plain HTTP to the TLS port: neither is the server's fault.
            Ok(Err(e)) => {
                tracing::debug!("TLS handshake with {peer}: {e}");
                return;
            }
            Err(_) => {
                tracing::debug!("TLS handshake with {peer}: none within {}s", handshake_timeout.as_secs_f64());
                return;
            }
        },
    };
    drive(&http, router, TokioIo::new(stream), peer, shutdown).await;
    drop(slot);
}

/// Runs HTTP on an established connection.
async fn drive<I>(
    http: &hyper::server::conn::http1::Builder,
    router: axum::Router,
    io: I,
    peer: SocketAddr,
    shutdown: CancellationToken,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        // Handlers may ask who is calling, as with axum's own server.
        req.extensions_mut().insert(ConnectInfo(peer));
        let mut router = router.clone();
        async move { tower_service::Service::call(&mut router, req).await }
    });
    let conn = http.serve_connection(io, service).with_upgrades();
    tokio::pin!(conn);
    let ended = tokio::select! {
        r = conn.as_mut() => Some(r),
        _ = shutdown.cancelled() => None,
    };
    let result = match ended {
        Some(r) => r,
        None => {
            // Answers the request in progress, if any, then closes; an idle connection
            // closes at once.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        // A header timeout, a client that went away, a malformed request: all of them
        // end only this connection, and none is the server's fault.
        tracing::debug!("connection from {peer}: {e}");
    }
}

/// The default cap on all connections: the process's open-file limit less a reserve
/// for everything else the controller opens (its store, the task logs it writes, blob
/// uploads), so a flood of connections cannot starve those of descriptors.
pub(crate) fn default_max_connections() -> usize {
    let limit = open_file_limit().unwrap_or(1024);
    let reserve = (limit / 4).clamp(64, 2048);
    limit.saturating_sub(reserve).max(1)
}

/// The soft limit on open files (`ulimit -n`), when the system says.
fn open_file_limit() -> Option<usize> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given, which lives on this stack
    // frame for the whole call.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    if rc != 0 {
        return None;
    }
    if lim.rlim_cur == libc::RLIM_INFINITY {
        // No limit: a million connections is far past what one controller serves.
        return Some(1 << 20);
    }
    usize::try_from(lim.rlim_cur).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(per_ip: usize, total: usize) -> Arc<Table> {
        Arc::new(Table {
            limits: Limits {
                header_read_timeout: Duration::from_secs(1),
                max_per_ip: per_ip,
                max_total: total,
            },
            counts: Mutex::new(Counts::default()),
            open: Default::default(),
        })
    }

    #[test]
    fn slots_are_counted_per_address_and_in_all_and_freed_on_drop() {
        let t = table(2, 3);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = t.admit(a).unwrap();
        let _a2 = t.admit(a).unwrap();
        assert_eq!(t.admit(a).err(), Some(Refusal::PerIp));
        let _b1 = t.admit(b).unwrap();
        assert_eq!(t.admit(b).err(), Some(Refusal::Total));
        drop(a1);
        let _b2 = t.admit(b).unwrap();
        assert_eq!(t.lock().per_ip.len(), 2);
    }

    #[test]
    fn an_address_with_no_connection_is_forgotten() {
        let t = table(2, 3);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        drop(t.admit(a).unwrap());
        assert!(t.lock().per_ip.is_empty());
        assert_eq!(t.lock().total, 0);
    }

    #[test]
    fn the_default_cap_stays_below_the_open_file_limit() {
        let cap = default_max_connections();
        if let Some(limit) = open_file_limit() {
            assert!(cap < limit, "{cap} >= {limit}");
        }
        assert!(cap >= 1);
    }
}
