//! Pairs: the authenticated, framed, non-blocking connection between two ranks.
//!
//! A [`Pair`] wraps the TCP connection to one peer and, when the peer shares this host, the
//! shared-memory link its frames travel through instead (the socket then only tells whether the
//! peer is alive). A pair is shared by every group that uses the peer. Its receive and send halves each
//! have a lock held only for non-blocking bursts of I/O, never while waiting, so groups driven by
//! different threads cannot deadlock on it. A frame being read into (or written from) one
//! operation's buffer is owned by that operation until it is complete; other operations skip the
//! pair meanwhile. Frames that arrive for an operation nobody is waiting for yet are kept in a
//! bounded stash, in arrival order per tag.

use std::collections::{HashMap, VecDeque};
use std::io::{IoSlice, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use super::error::TransportError;
use super::frame::{FrameHeader, Tag, HEADER_BYTES};
use super::shm::{Next, ShmLink};

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
    /// Staging for the eager path (`eager.rs`) when a payload in the ring is not aligned for its
    /// element type or wraps around the ring's end.
    pub(crate) eager_stage: AlignedBytes,
}

#[derive(Debug)]
pub(crate) struct SendHalf {
    /// Operation whose frame is partly written.
    pub(crate) owner: Option<u64>,
}

/// An authenticated connection to one peer.
#[derive(Debug)]
pub struct Pair {
    rank: usize,
    peer: usize,
    stream: TcpStream,
    /// Same-host peers: the frames go through shared memory, the socket stays idle.
    shm: Option<ShmLink>,
    /// Why the shared-memory peer is gone (its socket closed): what it wrote before stays
    /// readable; reading past it, or writing, is then an error.
    shm_peer_gone: std::sync::OnceLock<String>,
    pub(crate) recv: Mutex<RecvHalf>,
    pub(crate) send: Mutex<SendHalf>,
    broken: Mutex<Option<String>>,
    /// Set with `broken`: one load tells the eager path to leave the pair to the engine.
    broken_flag: AtomicBool,
    /// Frames in the stash, kept by whoever changes it (under the receive lock), so that the
    /// check after every collective reads one atomic, not the lock.
    pub(crate) stash_frames: AtomicUsize,
    bytes_sent: AtomicU64,
}

impl Pair {
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
            shm: None,
            shm_peer_gone: std::sync::OnceLock::new(),
            recv: Mutex::new(RecvHalf {
                header: [0; HEADER_BYTES],
                header_filled: 0,
                incoming: Incoming::Idle,
                stash: HashMap::new(),
                stash_bytes: 0,
                eager_stage: AlignedBytes::default(),
            }),
            send: Mutex::new(SendHalf { owner: None }),
            broken: Mutex::new(None),
            broken_flag: AtomicBool::new(false),
            stash_frames: AtomicUsize::new(0),
            bytes_sent: AtomicU64::new(0),
        })
    }

    /// Sends this pair's frames through `link` from now on. Both sides must switch before either
    /// sends a frame (the world group's set-up does it before any collective).
    pub fn attach_shm(&mut self, link: ShmLink) {
        debug_assert_eq!(link.peer(), self.peer);
        self.shm = Some(link);
    }

    /// The shared-memory link, when the peer shares this host.
    pub(crate) fn shm(&self) -> Option<&ShmLink> {
        self.shm.as_ref()
    }

    /// `"shm"` or `"tcp"`: what this pair's frames travel through.
    pub fn transport(&self) -> &'static str {
        if self.shm.is_some() {
            "shm"
        } else {
            "tcp"
        }
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

    /// Counts `n` bytes written. Under the send lock (a load and a store, not a locked add).
    pub(crate) fn note_sent(&self, n: usize) {
        let sent = self.bytes_sent.load(Ordering::Relaxed);
        self.bytes_sent.store(sent + n as u64, Ordering::Relaxed);
    }

    /// Whether the pair was marked unusable (without taking the lock of the reason).
    pub(crate) fn is_broken(&self) -> bool {
        self.broken_flag.load(Ordering::Acquire)
    }

    pub(crate) fn lock_recv(&self) -> MutexGuard<'_, RecvHalf> {
        self.recv.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn lock_send(&self) -> MutexGuard<'_, SendHalf> {
        self.send.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Non-blocking read: `Ok(None)` when nothing is available now.
    pub(crate) fn read_some(&self, buf: &mut [u8]) -> Result<Option<usize>, TransportError> {
        self.read_some_with(buf, false)
    }

    /// [`Pair::read_some`]; `streaming`: the receive is far larger than the caches, so a
    /// shared-memory pair copies out with non-temporal stores (`shm::stream_copy`).
    pub(crate) fn read_some_with(&self, buf: &mut [u8], streaming: bool) -> Result<Option<usize>, TransportError> {
        debug_assert!(!buf.is_empty());
        if let Some(link) = &self.shm {
            return match link.read_some_with(buf, streaming) {
                0 => self.shm_idle(),
                n => Ok(Some(n)),
            };
        }
        match (&self.stream).read(buf) {
            Ok(0) => Err(self.lost("the peer closed the connection")),
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(Some(0)),
            Err(e) => Err(self.lost(&e.to_string())),
        }
    }

    /// Combines published bytes of a shared-memory pair's ring straight into `dst` (whole
    /// elements only); `None` when none are there. Only for pairs with [`Pair::shm`].
    pub(crate) fn reduce_some(
        &self,
        dst: &mut [u8],
        reduce: super::mesh::Reduction<'_>,
        scratch: &mut AlignedBytes,
    ) -> Result<Option<usize>, TransportError> {
        let Some(link) = self.shm.as_ref() else {
            return Ok(None);
        };
        match link.reduce_some(dst, reduce.elem_bytes, reduce.combine, scratch) {
            0 => self.shm_idle(),
            n => Ok(Some(n)),
        }
    }

    /// At a frame boundary of the receive half (nothing half read): where the next frame is.
    /// A TCP pair's is always in its stream (`Ring`); a shared-memory pair's may wait in the box.
    /// `Nothing` from a peer that is gone is the error that it is gone.
    pub(crate) fn next_frame(&self) -> Result<Next<'_>, TransportError> {
        match &self.shm {
            None => Ok(Next::Ring),
            Some(link) => match link.next_frame() {
                Next::Nothing => self.shm_idle().map(|_| Next::Nothing),
                next => Ok(next),
            },
        }
    }

    /// True once the shared-memory peer closed its socket.
    pub(crate) fn shm_peer_gone(&self) -> bool {
        self.shm_peer_gone.get().is_some()
    }

    /// Nothing to read from the ring: wait, unless the peer is gone.
    fn shm_idle(&self) -> Result<Option<usize>, TransportError> {
        match self.shm_peer_gone.get() {
            Some(reason) => Err(self.lost(reason)),
            None => Ok(None),
        }
    }

    /// Non-blocking vectored write: `Ok(None)` when the socket buffer is full.
    pub(crate) fn write_some(&self, bufs: &[IoSlice<'_>]) -> Result<Option<usize>, TransportError> {
        if let Some(link) = &self.shm {
            if let Some(reason) = self.shm_peer_gone.get() {
                return Err(self.lost(reason));
            }
            return Ok(match link.write_some(bufs) {
                0 => None,
                n => {
                    self.note_sent(n);
                    Some(n)
                }
            });
        }
        match (&self.stream).write_vectored(bufs) {
            Ok(0) => Err(self.lost("the connection accepts no more data")),
            Ok(n) => {
                self.note_sent(n);
                Ok(Some(n))
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(Some(0)),
            Err(e) => Err(self.lost(&e.to_string())),
        }
    }

    /// For a pair on shared memory, whose socket carries nothing: called when `poll` reports
    /// the idle socket. A closed socket (the peer exited, or gave up on the pair) marks the peer
    /// gone: reads fail once the ring is empty, writes fail at once. Bytes on the socket are a
    /// protocol error.
    pub(crate) fn note_socket_event(&self) -> Result<(), TransportError> {
        match self.check_alive() {
            Err(TransportError::PeerLost { reason, .. }) => {
                let _ = self.shm_peer_gone.set(reason);
                Ok(())
            }
            other => other,
        }
    }

    fn check_alive(&self) -> Result<(), TransportError> {
        let mut byte = [0u8; 1];
        // SAFETY: peeks at most one byte into a local buffer from a socket this pair owns.
        let n = unsafe {
            libc::recv(
                self.stream.as_raw_fd(),
                byte.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        match n {
            0 => Err(self.lost("the peer closed the connection")),
            n if n > 0 => Err(TransportError::Protocol {
                rank: self.rank,
                peer: self.peer,
                reason: "bytes arrived on the TCP socket of a pair that moves its frames through shared memory".into(),
            }),
            _ => {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => Ok(()),
                    _ => Err(self.lost(&e.to_string())),
                }
            }
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
        self.broken_flag.store(true, Ordering::Release);
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// The error every later operation on a broken pair gets.
    pub(crate) fn check_broken(&self) -> Result<(), TransportError> {
        if !self.is_broken() {
            return Ok(());
        }
        match &*self.broken.lock().unwrap_or_else(|p| p.into_inner()) {
            None => Ok(()),
            Some(reason) => Err(self.lost(&format!("unusable after an earlier failure: {reason}"))),
        }
    }

    /// Tags and fingerprints of the frames waiting in the stash, for diagnostics.
    pub(crate) fn stashed(&self) -> Vec<(Tag, u64)> {
        if self.stash_frames.load(Ordering::Acquire) == 0 {
            return Vec::new();
        }
        let recv = self.lock_recv();
        if recv.stash.is_empty() {
            return Vec::new();
        }
        let mut out: Vec<(Tag, u64)> = recv
            .stash
            .iter()
            .flat_map(|(tag, q)| q.iter().map(move |s| (*tag, s.fingerprint)))
            .collect();
        out.sort_by_key(|(t, _)| (t.key, t.step));
        out
    }
}
