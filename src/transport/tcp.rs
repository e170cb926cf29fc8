//! TCP pairs: authenticated, framed, non-blocking connections between two ranks.
//!
//! A [`TcpPair`] is shared by every group that uses the peer. Its receive and send halves each
//! have a lock held only for non-blocking bursts of I/O, never while waiting, so groups driven by
//! different threads cannot deadlock on it. A frame being read into (or written from) one
//! operation's buffer is owned by that operation until it is complete; other operations skip the
//! pair meanwhile. Frames that arrive for an operation nobody is waiting for yet are kept in a
//! bounded stash, in arrival order per tag.

use std::collections::{HashMap, VecDeque};
use std::io::{IoSlice, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::auth::{self, Channel, JobSecret};

use super::error::TransportError;
use super::frame::{FrameHeader, Tag, HEADER_BYTES};

/// Most bytes of unexpected frames a pair keeps before it declares a protocol error.
pub const STASH_LIMIT_BYTES: usize = 2 << 30;

/// Heap bytes aligned to 8, so that a receiver may view them as any element type.
#[derive(Debug, Default)]
pub(crate) struct AlignedBytes {
    words: Vec<u64>,
    len: usize,
}

impl AlignedBytes {
    pub(crate) fn zeroed(len: usize) -> Self {
        Self {
            words: vec![0; len.div_ceil(8)],
            len,
        }
    }

    /// Sets the length to `len` (growing the allocation, never shrinking it) and returns the bytes.
    pub(crate) fn prefix_mut(&mut self, len: usize) -> &mut [u8] {
        if self.words.len() * 8 < len {
            self.words.resize(len.div_ceil(8), 0);
        }
        self.len = len;
        self.as_mut_slice()
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.words)[..self.len]
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut(&mut self.words)[..self.len]
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

/// A frame that arrived before anyone asked for it.
#[derive(Debug)]
pub(crate) struct Stashed {
    pub(crate) fingerprint: u64,
    pub(crate) payload: AlignedBytes,
}

/// What the receive half is in the middle of.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// Between frames; `header_filled` bytes of the next header are in `header`.
    Idle,
    /// Reading the payload of a frame that belongs to operation `token`.
    Owned {
        token: u64,
        header: FrameHeader,
        filled: usize,
    },
    /// Reading the payload of a frame nobody waits for yet.
    Stash {
        header: FrameHeader,
        buf: AlignedBytes,
        filled: usize,
    },
}

#[derive(Debug)]
pub(crate) struct RecvHalf {
    pub(crate) header: [u8; HEADER_BYTES],
    pub(crate) header_filled: usize,
    pub(crate) incoming: Incoming,
    pub(crate) stash: HashMap<Tag, VecDeque<Stashed>>,
    pub(crate) stash_bytes: usize,
}

#[derive(Debug)]
pub(crate) struct SendHalf {
    /// Operation whose frame is partly written.
    pub(crate) owner: Option<u64>,
}

/// An authenticated connection to one peer.
#[derive(Debug)]
pub struct TcpPair {
    rank: usize,
    peer: usize,
    stream: TcpStream,
    pub(crate) recv: Mutex<RecvHalf>,
    pub(crate) send: Mutex<SendHalf>,
    broken: Mutex<Option<String>>,
    bytes_sent: AtomicU64,
}

impl TcpPair {
    /// Wraps a connected, authenticated stream.
    pub fn new(rank: usize, peer: usize, stream: TcpStream) -> Result<Self, TransportError> {
        let io = |what: &str, source| TransportError::Io {
            rank,
            what: format!("{what} (peer {peer})"),
            source,
        };
        stream.set_nodelay(true).map_err(|e| io("set TCP_NODELAY", e))?;
        stream.set_nonblocking(true).map_err(|e| io("set non-blocking", e))?;
        Ok(Self {
            rank,
            peer,
            stream,
            recv: Mutex::new(RecvHalf {
                header: [0; HEADER_BYTES],
                header_filled: 0,
                incoming: Incoming::Idle,
                stash: HashMap::new(),
                stash_bytes: 0,
            }),
            send: Mutex::new(SendHalf { owner: None }),
            broken: Mutex::new(None),
            bytes_sent: AtomicU64::new(0),
        })
    }

    /// The peer's rank.
    pub fn peer(&self) -> usize {
        self.peer
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Bytes written to this connection so far (frame headers included).
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent.load(Ordering::Relaxed)
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    pub(crate) fn lock_recv(&self) -> MutexGuard<'_, RecvHalf> {
        self.recv.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn lock_send(&self) -> MutexGuard<'_, SendHalf> {
        self.send.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Non-blocking read: `Ok(None)` when nothing is available now.
    pub(crate) fn read_some(&self, buf: &mut [u8]) -> Result<Option<usize>, TransportError> {
        debug_assert!(!buf.is_empty());
        match (&self.stream).read(buf) {
            Ok(0) => Err(self.lost("the peer closed the connection")),
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(Some(0)),
            Err(e) => Err(self.lost(&e.to_string())),
        }
    }

    /// Non-blocking vectored write: `Ok(None)` when the socket buffer is full.
    pub(crate) fn write_some(&self, bufs: &[IoSlice<'_>]) -> Result<Option<usize>, TransportError> {
        match (&self.stream).write_vectored(bufs) {
            Ok(0) => Err(self.lost("the connection accepts no more data")),
            Ok(n) => {
                self.bytes_sent.fetch_add(n as u64, Ordering::Relaxed);
                Ok(Some(n))
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(Some(0)),
            Err(e) => Err(self.lost(&e.to_string())),
        }
    }

    fn lost(&self, reason: &str) -> TransportError {
        TransportError::PeerLost {
            rank: self.rank,
            peer: self.peer,
            reason: reason.to_string(),
        }
    }

    /// Marks the pair unusable: a failed operation may have left half a frame on the wire.
    pub(crate) fn mark_broken(&self, reason: String) {
        let mut broken = self.broken.lock().unwrap_or_else(|p| p.into_inner());
        broken.get_or_insert(reason);
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// The error every later operation on a broken pair gets.
    pub(crate) fn check_broken(&self) -> Result<(), TransportError> {
        match &*self.broken.lock().unwrap_or_else(|p| p.into_inner()) {
            None => Ok(()),
            Some(reason) => Err(self.lost(&format!("unusable after an earlier failure: {reason}"))),
        }
    }

    /// Tags and fingerprints of the frames waiting in the stash, for diagnostics.
    pub(crate) fn stashed(&self) -> Vec<(Tag, u64)> {
        let recv = self.lock_recv();
        let mut out: Vec<(Tag, u64)> = recv
            .stash
            .iter()
            .flat_map(|(tag, q)| q.iter().map(move |s| (*tag, s.fingerprint)))
            .collect();
        out.sort_by_key(|(t, _)| (t.key, t.step));
        out
    }
}

/// A listening socket for data connections from higher ranks.
#[derive(Debug)]
pub struct DataListener {
    rank: usize,
    listener: TcpListener,
}

impl DataListener {
    /// Binds to `ip` on a free port.
    pub fn bind(rank: usize, ip: IpAddr) -> Result<Self, TransportError> {
        let listener = TcpListener::bind(SocketAddr::new(ip, 0)).map_err(|source| TransportError::Io {
            rank,
            what: format!("bind a data listener on {ip}"),
            source,
        })?;
        listener.set_nonblocking(true).map_err(|source| TransportError::Io {
            rank,
            what: "set the listener non-blocking".into(),
            source,
        })?;
        Ok(Self { rank, listener })
    }

    /// The address peers connect to.
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.listener.local_addr().map_err(|source| TransportError::Io {
            rank: self.rank,
            what: "read the listener's address".into(),
            source,
        })
    }

    /// Accepts one authenticated connection and returns the peer's rank with it. Connections that
    /// fail the handshake are logged and dropped; waiting goes on until `deadline`.
    pub fn accept(&self, secret: &JobSecret, deadline: Instant) -> Result<(usize, TcpStream), TransportError> {
        let rank = self.rank;
        loop {
            match self.listener.accept() {
                Ok((mut stream, addr)) => {
                    let left = deadline
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(100));
                    let _ = stream.set_nonblocking(false);
                    match auth::server_handshake(&mut stream, secret, Channel::Data, left.min(HANDSHAKE_TIMEOUT))
                        .map_err(|source| TransportError::Auth { rank, source })
                        .and_then(|()| read_hello(rank, &mut stream))
                    {
                        Ok(peer) => return Ok((peer, stream)),
                        Err(e) => tracing::warn!("rank {rank}: refused a data connection from {addr}: {e}"),
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(TransportError::Io {
                            rank,
                            what: "wait for data connections from higher ranks".into(),
                            source: std::io::Error::new(std::io::ErrorKind::TimedOut, "deadline passed"),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(TransportError::Io {
                        rank,
                        what: "accept a data connection".into(),
                        source,
                    })
                }
            }
        }
    }
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn read_hello(rank: usize, stream: &mut TcpStream) -> Result<usize, TransportError> {
    let mut hello = [0u8; 4];
    stream
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .and_then(|()| stream.read_exact(&mut hello))
        .map_err(|source| TransportError::Io {
            rank,
            what: "read the connecting rank's id".into(),
            source,
        })?;
    let _ = stream.set_read_timeout(None);
    Ok(u32::from_le_bytes(hello) as usize)
}

/// Connects to `peer` at `addr`, retrying refused connections until `deadline`, and authenticates.
pub fn connect(
    rank: usize,
    peer: usize,
    addr: SocketAddr,
    secret: &JobSecret,
    deadline: Instant,
) -> Result<TcpStream, TransportError> {
    let fail = |reason: String| TransportError::Connect {
        rank,
        peer,
        addr: addr.to_string(),
        reason,
    };
    let mut stream = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(fail("deadline passed while retrying".into()));
        }
        match TcpStream::connect_timeout(&addr, left.min(Duration::from_secs(5))) {
            Ok(s) => break s,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::TimedOut
                ) =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(fail(e.to_string())),
        }
    };
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(100));
    auth::client_handshake(&mut stream, secret, Channel::Data, left.min(HANDSHAKE_TIMEOUT))
        .map_err(|source| TransportError::Auth { rank, source })?;
    stream
        .write_all(&(rank as u32).to_le_bytes())
        .map_err(|e| fail(e.to_string()))?;
    Ok(stream)
}
