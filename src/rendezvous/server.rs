//! The TCP store server, hosted by the node-0 launcher: one accept thread, one thread per connection.
//!
//! A connection is served only after it passes the job's handshake, run on the connection's own
//! thread so a silent client never holds up `accept`. Waits block that thread on the store's
//! condvar until the client's deadline. Shutdown stops accepting, wakes every waiter and closes
//! every connection, so no thread outlives it by more than a few system calls.
//!
//! Strangers cost little: at most [`MAX_PENDING_HANDSHAKES`] connections are in their handshake at
//! once, each under [`HANDSHAKE_TIMEOUT`]; a new connection beyond that closes the oldest pending one
//! at once (the newest gets its chance, so a flood of silent connections cannot lock a rank out: a
//! real client finishes its handshake in one round trip, and retries if it was closed). Refused
//! connections are logged once, then counted: one line per [`REFUSAL_LOG_WINDOW`]
//! ("refused N unauthenticated connection(s) in the last 10 s, last from ADDR").

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::wire::{self, Frame, Reader, Request, WireError};
use super::{MemoryStore, Store, StoreError};
use crate::auth::{self, Channel, JobSecret};

/// Deadline of the handshake that opens every connection: one round trip, even across a slow
/// network, with room for a loaded machine.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connections in their handshake at once: each holds a thread until it authenticates or
/// its deadline passes. A job's ranks and launchers connect in waves far smaller than this.
pub const MAX_PENDING_HANDSHAKES: usize = 64;
/// How long the accept loop waits for a handshake thread to end when all are busy, before it
/// closes the new connection instead.
const HANDSHAKE_SLOT_WAIT: Duration = Duration::from_secs(1);
/// Refused connections after the first are counted and logged once per this period.
pub const REFUSAL_LOG_WINDOW: Duration = Duration::from_secs(10);
/// Once a request has started, each read of its remaining bytes must make progress within this.
const FRAME_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A client that stops reading its responses is dropped after this long.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the accept loop looks at the shutdown flag while no connection arrives.
const ACCEPT_TICK_MS: u16 = 100;

/// The store server. Serves on background threads until [`TcpStoreServer::shutdown`] or drop.
pub struct TcpStoreServer {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

struct Shared {
    store: MemoryStore,
    secret: JobSecret,
    stopping: AtomicBool,
    /// A handle on every open connection, so shutdown can close them and wake their threads.
    connections: Mutex<HashMap<u64, TcpStream>>,
    /// Connections in their handshake, oldest first: id and a handle to close it when evicted.
    pending: Mutex<VecDeque<(u64, TcpStream)>>,
    /// Threads still in their handshake, and a condvar notified when one passes it or is about
    /// to exit: the accept loop starts a new one only below [`MAX_PENDING_HANDSHAKES`]. A thread
    /// whose handshake failed (or was evicted) counts until the accept loop has joined it, so
    /// the bound holds for the threads that exist, not only for the handshakes in progress.
    handshaking: (Mutex<usize>, Condvar),
    refusals: Mutex<Refusals>,
    local_addr: SocketAddr,
}

/// The rate limit on refusal lines: the first refusal of a window is logged in full, the others
/// are counted and summed up when the window ends.
#[derive(Debug, Default)]
struct Refusals {
    /// When the current window opened (its first refusal), `None` while no refusal is recent.
    window_start: Option<Instant>,
    /// Refusals since the window's first.
    count: u64,
    last_peer: Option<SocketAddr>,
}

impl Shared {
    /// Counts one more thread in its handshake if fewer than [`MAX_PENDING_HANDSHAKES`] are;
    /// otherwise waits up to `wait` for one to pass or end (then the caller reaps and tries again).
    fn try_enter_handshake(&self, wait: Duration) -> bool {
        let (count, left) = &self.handshaking;
        let mut count = count.lock().unwrap_or_else(PoisonError::into_inner);
        if *count < MAX_PENDING_HANDSHAKES {
            *count += 1;
            return true;
        }
        drop(left.wait_timeout(count, wait).unwrap_or_else(PoisonError::into_inner));
        false
    }

    /// A thread has left its handshake: it passed, or it was joined after it ended.
    fn leave_handshake(&self) {
        let (count, left) = &self.handshaking;
        let mut count = count.lock().unwrap_or_else(PoisonError::into_inner);
        *count = count.saturating_sub(1);
        left.notify_one();
    }

    /// Wakes the accept loop: a thread whose handshake did not pass is about to exit, and its
    /// slot is given back once the loop has joined it.
    fn handshaker_ending(&self) {
        self.handshaking.1.notify_one();
    }

    fn pending(&self) -> MutexGuard<'_, VecDeque<(u64, TcpStream)>> {
        // Socket handles only: a panic elsewhere cannot leave the queue inconsistent.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts (and logs, rate-limited) a connection refused before it authenticated.
    fn refused(&self, peer: SocketAddr, why: &dyn std::fmt::Display) {
        let mut refusals = self.refusals.lock().unwrap_or_else(PoisonError::into_inner);
        if refusals.window_start.is_none() {
            refusals.window_start = Some(Instant::now());
            tracing::warn!(
                store = %self.local_addr, %peer, error = %why,
                "store server: refused a connection that failed the handshake (more are counted, one line per {REFUSAL_LOG_WINDOW:?})"
            );
            return;
        }
        refusals.count += 1;
        refusals.last_peer = Some(peer);
        drop(refusals);
        self.log_refusals(false);
    }

    /// Writes the count of the refusals since the window opened, once it has lasted
    /// [`REFUSAL_LOG_WINDOW`] (or now, if `force`).
    fn log_refusals(&self, force: bool) {
        let mut refusals = self.refusals.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(start) = refusals.window_start else { return };
        let elapsed = start.elapsed();
        if !force && elapsed < REFUSAL_LOG_WINDOW {
            return;
        }
        if refusals.count == 0 {
            refusals.window_start = None;
            return;
        }
        let last = refusals.last_peer.map_or_else(|| "?".to_string(), |p| p.to_string());
        tracing::warn!(
            store = %self.local_addr,
            "store server: refused {} unauthenticated connection(s) in the last {:.0} s, last from {last}",
            refusals.count,
            elapsed.as_secs_f64().max(1.0)
        );
        // The next window opens now: a flood that goes on gets one line per window.
        refusals.window_start = Some(Instant::now());
        refusals.count = 0;
    }

    fn connections(&self) -> MutexGuard<'_, HashMap<u64, TcpStream>> {
        // The map holds only socket handles; a panic elsewhere cannot leave it inconsistent.
        self.connections.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
}

impl std::fmt::Debug for TcpStoreServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpStoreServer")
            .field("local_addr", &self.local_addr)
            .field("connections", &self.shared.connections().len())
            .field("store", &self.shared.store)
            .finish()
    }
}

impl TcpStoreServer {
    /// Binds (port 0 = pick a free port) and serves on background threads until dropped/shutdown.
    pub fn bind(addr: SocketAddr, secret: JobSecret) -> Result<Self, StoreError> {
        let io = |source| StoreError::Io {
            op: "bind",
            addr: addr.to_string(),
            source,
        };
        let listener = TcpListener::bind(addr).map_err(io)?;
        // Non-blocking so a connection that vanishes between poll and accept cannot block the loop.
        listener.set_nonblocking(true).map_err(io)?;
        let local_addr = listener.local_addr().map_err(io)?;
        let shared = Arc::new(Shared {
            store: MemoryStore::new(),
            secret,
            stopping: AtomicBool::new(false),
            connections: Mutex::new(HashMap::new()),
            pending: Mutex::new(VecDeque::new()),
            handshaking: (Mutex::new(0), Condvar::new()),
            refusals: Mutex::new(Refusals::default()),
            local_addr,
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("store-accept-{}", local_addr.port()))
                .spawn(move || accept_loop(&listener, &shared))
                .map_err(io)?
        };
        tracing::debug!(%local_addr, "store server listening");
        Ok(Self {
            local_addr,
            shared,
            acceptor: Some(acceptor),
        })
    }

    /// The address the server listens on (with the port picked when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, wakes every blocked waiter and closes every connection.
    pub fn shutdown(self) {
        drop(self);
    }
}

impl Drop for TcpStoreServer {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        if let Some(acceptor) = self.acceptor.take() {
            // Returns within one accept tick; a panic there has already been reported.
            let _ = acceptor.join();
        }
        self.shared.store.close();
        for (_, connection) in self.shared.connections().drain() {
            // Wakes the connection's thread out of any read; it then exits.
            let _ = connection.shutdown(Shutdown::Both);
        }
        self.shared.log_refusals(true);
        tracing::debug!(local_addr = %self.local_addr, "store server shut down");
    }
}

/// Puts a new connection in the handshake queue, closing the oldest pending one if the queue is
/// full; false if the connection cannot be tracked (then it is dropped, which closes it).
fn admit(shared: &Shared, id: u64, stream: &TcpStream, peer: SocketAddr) -> bool {
    let handle = match stream.try_clone() {
        Ok(handle) => handle,
        Err(e) => {
            shared.refused(peer, &format_args!("cannot track the connection: {e}"));
            return false;
        }
    };
    let evicted = {
        let mut pending = shared.pending();
        let evicted = if pending.len() >= MAX_PENDING_HANDSHAKES {
            pending.pop_front()
        } else {
            None
        };
        pending.push_back((id, handle));
        evicted
    };
    if let Some((_, oldest)) = evicted {
        // Its thread wakes from the handshake's read and ends; the refusal is counted here, once.
        let peer = oldest.peer_addr();
        let _ = oldest.shutdown(Shutdown::Both);
        if let Ok(peer) = peer {
            shared.refused(
                peer,
                &format_args!("closed: {MAX_PENDING_HANDSHAKES} connections were already in their handshake"),
            );
        }
    }
    true
}

/// A connection thread counted among the handshakes, and whether its handshake passed (then it
/// gave its slot back itself and serves a client: the accept loop lets it go).
struct Handshaker {
    thread: JoinHandle<()>,
    passed: Arc<AtomicBool>,
}

/// Lets go of the threads whose handshake passed, and joins those that ended without passing,
/// giving their slots back: a slot is free only once its thread no longer exists.
fn reap(shared: &Shared, handshakers: &mut Vec<Handshaker>) {
    let mut kept = Vec::with_capacity(handshakers.len());
    for h in handshakers.drain(..) {
        if h.passed.load(Ordering::Acquire) {
            continue;
        }
        if h.thread.is_finished() {
            // It returned: the join only waits for the thread's exit to complete.
            let _ = h.thread.join();
            shared.leave_handshake();
        } else {
            kept.push(h);
        }
    }
    *handshakers = kept;
}

/// Waits until fewer than [`MAX_PENDING_HANDSHAKES`] threads are in their handshake and counts
/// one more; false if none left within [`HANDSHAKE_SLOT_WAIT`] (an evicted thread wakes from
/// its read at once, so this waits only when the machine is too loaded to schedule it).
fn enter_handshake(shared: &Shared, handshakers: &mut Vec<Handshaker>) -> bool {
    let deadline = Instant::now() + HANDSHAKE_SLOT_WAIT;
    loop {
        reap(shared, handshakers);
        let wait = deadline.saturating_duration_since(Instant::now());
        if shared.try_enter_handshake(wait.min(REAP_TICK)) {
            return true;
        }
        if wait.is_zero() {
            return false;
        }
    }
}

/// How often a full accept loop looks again for handshake threads that ended (each one also
/// wakes it as it ends).
const REAP_TICK: Duration = Duration::from_millis(10);

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    let mut next_id = 0u64;
    let mut handshakers = Vec::new();
    while !shared.stopping() {
        reap(shared, &mut handshakers);
        shared.log_refusals(false);
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ACCEPT_TICK_MS)) {
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => {}
            Err(errno) => {
                tracing::warn!(error = %errno, "store server: poll on the listener failed");
                std::thread::sleep(Duration::from_millis(ACCEPT_TICK_MS.into()));
                continue;
            }
        }
        match listener.accept() {
            Ok((stream, peer)) => {
                next_id += 1;
                let id = next_id;
                if !admit(shared, id, &stream, peer) {
                    continue;
                }
                if !enter_handshake(shared, &mut handshakers) {
                    shared.pending().retain(|(pending, _)| *pending != id);
                    shared.refused(peer, &"closed: every handshake slot stayed busy");
                    continue;
                }
                let connection_shared = Arc::clone(shared);
                let passed = Arc::new(AtomicBool::new(false));
                let thread_passed = Arc::clone(&passed);
                let spawned = std::thread::Builder::new()
                    .name(format!("store-conn-{id}"))
                    .spawn(move || serve_connection(stream, peer, id, &connection_shared, &thread_passed));
                match spawned {
                    Ok(thread) => handshakers.push(Handshaker { thread, passed }),
                    Err(e) => {
                        shared.pending().retain(|(pending, _)| *pending != id);
                        shared.leave_handshake();
                        tracing::warn!(%peer, error = %e, "store server: cannot start a thread for a connection");
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // E.g. out of file descriptors: back off instead of spinning.
                tracing::warn!(error = %e, "store server: accept failed");
                std::thread::sleep(Duration::from_millis(ACCEPT_TICK_MS.into()));
            }
        }
    }
}

/// One connection's thread. Its handshake slot is given back by `serve` when the handshake
/// passes (setting `passed`); otherwise by the accept loop once this thread has ended.
fn serve_connection(mut stream: TcpStream, peer: SocketAddr, id: u64, shared: &Shared, passed: &AtomicBool) {
    let registered = {
        let mut connections = shared.connections();
        // Checked under the lock that shutdown takes to close connections: either this connection
        // is registered before the sweep and closed by it, or it sees the flag and leaves.
        if shared.stopping() {
            false
        } else {
            match stream.try_clone() {
                Ok(handle) => {
                    connections.insert(id, handle);
                    true
                }
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "store server: cannot register a connection");
                    false
                }
            }
        }
    };
    if registered {
        serve(&mut stream, peer, id, shared, passed);
        shared.connections().remove(&id);
    }
    drop(stream);
    if !passed.load(Ordering::Acquire) {
        shared.handshaker_ending();
    }
}

/// Authenticates the connection and serves its requests until it closes; when the handshake
/// passes, gives its slot among the handshakes back and sets `passed`.
fn serve(stream: &mut TcpStream, peer: SocketAddr, id: u64, shared: &Shared, passed: &AtomicBool) {
    let handshake = auth::server_handshake(stream, &shared.secret, Channel::Store, HANDSHAKE_TIMEOUT);
    if handshake.is_ok() {
        // Set before the slot is given back: the accept loop never counts it twice.
        passed.store(true, Ordering::Release);
        shared.leave_handshake();
    }
    // Still queued means not evicted: an evicted connection's refusal was counted by `admit`.
    let was_pending = {
        let mut pending = shared.pending();
        let before = pending.len();
        pending.retain(|(pending, _)| *pending != id);
        pending.len() < before
    };
    if let Err(e) = handshake {
        if was_pending && !shared.stopping() {
            shared.refused(peer, &e);
        }
        return;
    }
    tracing::debug!(%peer, "store server: client connected");
    if let Err(e) = stream
        .set_nodelay(true)
        .and(stream.set_write_timeout(Some(WRITE_TIMEOUT)))
    {
        tracing::warn!(%peer, error = %e, "store server: cannot configure a connection");
        return;
    }
    loop {
        let request = match read_request(stream) {
            Ok(Some(request)) => request,
            Ok(None) => {
                tracing::debug!(%peer, "store server: client disconnected");
                return;
            }
            Err(_) if shared.stopping() => return,
            Err(WireError::Malformed(reason)) => {
                tracing::warn!(%peer, %reason, "store server: malformed frame, closing the connection");
                // Best effort: the client may already be gone.
                let _ = stream.write_all(&Frame::new(wire::STATUS_PROTOCOL).bytes(reason.as_bytes()).0);
                return;
            }
            Err(e @ WireError::Io(_)) => {
                tracing::warn!(%peer, error = %e, "store server: closing the connection in the middle of a frame");
                return;
            }
        };
        let response = answer(&shared.store, request);
        if let Err(e) = stream.write_all(&response.0) {
            if !shared.stopping() {
                tracing::warn!(%peer, error = %e, "store server: cannot send a response, closing the connection");
            }
            return;
        }
    }
}

/// Reads one request; `None` when the client closed the connection between requests.
fn read_request(stream: &mut TcpStream) -> Result<Option<Request>, WireError> {
    // Between requests a client may stay silent for the whole job; shutdown wakes this read.
    stream.set_read_timeout(None)?;
    let mut opcode = [0u8; 1];
    loop {
        match stream.read(&mut opcode) {
            Ok(0) => return Ok(None),
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
    }
    stream.set_read_timeout(Some(FRAME_READ_TIMEOUT))?;
    Reader(stream).request(opcode[0]).map(Some)
}

/// Runs one request against the store and encodes its answer.
fn answer(store: &MemoryStore, request: Request) -> Frame {
    let ok = || Frame::new(wire::STATUS_OK);
    let result = match request {
        Request::Set { key, value } => store.set(&key, &value).map(|()| ok()),
        Request::Get { key, timeout_ms } => store
            .get(&key, Duration::from_millis(timeout_ms))
            .map(|value| ok().bytes(&value)),
        Request::TryGet { key } => store.try_get(&key).map(|value| match value {
            Some(value) => ok().u8(1).bytes(&value),
            None => ok().u8(0),
        }),
        Request::Wait { keys, timeout_ms } => {
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            store.wait(&keys, Duration::from_millis(timeout_ms)).map(|()| ok())
        }
        Request::Add { key, delta } => store.add(&key, delta).map(|sum| ok().i64(sum)),
        Request::CompareSet { key, expected, desired } => store
            .compare_set(&key, expected.as_deref(), &desired)
            .map(|value| ok().bytes(&value)),
        Request::Delete { key } => store.delete(&key).map(|existed| ok().u8(existed.into())),
    };
    result.unwrap_or_else(|e| match e {
        StoreError::Timeout { keys, .. } => {
            // At most MAX_WAIT_KEYS keys, so the count fits in u32.
            let frame = Frame::new(wire::STATUS_TIMEOUT).u32(keys.len() as u32);
            keys.iter().fold(frame, |frame, key| frame.bytes(key.as_bytes()))
        }
        StoreError::NotAnInteger { .. } => Frame::new(wire::STATUS_NOT_AN_INTEGER),
        StoreError::AddOverflow { .. } => Frame::new(wire::STATUS_OVERFLOW),
        StoreError::Closed { .. } => Frame::new(wire::STATUS_CLOSED),
        // The wire limits equal the store's, so nothing else can come back; answer it anyway.
        other => Frame::new(wire::STATUS_PROTOCOL).bytes(other.to_string().as_bytes()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rendezvous::TcpStore;

    const LONG: Duration = Duration::from_secs(10);

    fn start() -> (TcpStoreServer, JobSecret) {
        let secret = JobSecret::generate().unwrap();
        let server = TcpStoreServer::bind("127.0.0.1:0".parse().unwrap(), secret.clone()).unwrap();
        (server, secret)
    }

    /// A connection that passed the handshake and speaks raw bytes from then on.
    fn authenticated(server: &TcpStoreServer, secret: &JobSecret) -> TcpStream {
        let mut stream = TcpStream::connect(server.local_addr()).unwrap();
        auth::client_handshake(&mut stream, secret, Channel::Store, LONG).unwrap();
        stream
    }

    /// Sends `bytes`, then expects a protocol error (when `answered`) and the connection closed.
    fn assert_refused(server: &TcpStoreServer, secret: &JobSecret, bytes: &[u8], answered: bool) {
        let mut stream = authenticated(server, secret);
        stream.write_all(bytes).unwrap();
        // The server may have closed already (it answers as soon as a frame goes wrong).
        let _ = stream.shutdown(Shutdown::Write);
        stream.set_read_timeout(Some(LONG)).unwrap();
        let mut received = Vec::new();
        if let Err(e) = stream.read_to_end(&mut received) {
            assert_eq!(
                e.kind(),
                io::ErrorKind::ConnectionReset,
                "the server did not close the connection: {e}"
            );
        }
        if answered {
            assert_eq!(received.first(), Some(&wire::STATUS_PROTOCOL), "{received:?}");
        }
        // The server keeps serving everyone else.
        let client = TcpStore::connect(&server.local_addr().to_string(), secret, LONG).unwrap();
        client.set("alive", b"yes").unwrap();
        assert_eq!(client.get("alive", LONG).unwrap(), b"yes");
    }

    #[test]
    fn an_unknown_opcode_is_answered_with_a_protocol_error_and_the_connection_closed() {
        let (server, secret) = start();
        // Only the opcode: bytes the server never reads would make its close a reset, which may
        // discard its answer before this test reads it.
        assert_refused(&server, &secret, &[0xEE], true);
    }

    #[test]
    fn an_oversized_key_length_prefix_closes_the_connection_without_allocating() {
        let (server, secret) = start();
        let frame = Frame::new(wire::OP_SET).u32(u32::MAX);
        assert_refused(&server, &secret, &frame.0, true);
        let frame = Frame::new(wire::OP_GET).u64(1).u32(wire::MAX_KEY_BYTES as u32 + 1);
        assert_refused(&server, &secret, &frame.0, true);
    }

    #[test]
    fn an_oversized_value_length_prefix_closes_the_connection_without_allocating() {
        let (server, secret) = start();
        let frame = Frame::new(wire::OP_SET)
            .bytes(b"k")
            .u32(wire::MAX_VALUE_BYTES as u32 + 1);
        assert_refused(&server, &secret, &frame.0, true);
        let frame = Frame::new(wire::OP_WAIT).u64(1).u32(u32::MAX);
        assert_refused(&server, &secret, &frame.0, true);
    }

    #[test]
    fn a_key_that_is_not_utf8_or_a_bad_flag_is_a_protocol_error() {
        let (server, secret) = start();
        let frame = Frame::new(wire::OP_DELETE).bytes(&[0xFF, 0xFE]);
        assert_refused(&server, &secret, &frame.0, true);
        let frame = Frame::new(wire::OP_COMPARE_SET).bytes(b"k").u8(7);
        assert_refused(&server, &secret, &frame.0, true);
    }

    #[test]
    fn a_truncated_frame_closes_the_connection() {
        let (server, secret) = start();
        let mut frame = Frame::new(wire::OP_SET).bytes(b"key").u32(100).0;
        frame.extend_from_slice(b"only part of the value");
        assert_refused(&server, &secret, &frame, false);
    }

    #[test]
    fn frames_round_trip_through_the_reader() {
        let frame = Frame::new(wire::OP_COMPARE_SET)
            .bytes(b"key")
            .u8(1)
            .bytes(b"old")
            .bytes(b"new");
        let mut bytes = &frame.0[1..];
        let request = Reader(&mut bytes).request(frame.0[0]).unwrap();
        let expected = Request::CompareSet {
            key: "key".into(),
            expected: Some(b"old".to_vec()),
            desired: b"new".to_vec(),
        };
        assert_eq!(request, expected);
        assert!(bytes.is_empty());
    }
}
