//! Shared-memory links between ranks on one host.
//!
//! Loopback TCP moves every byte twice through the kernel (into a socket buffer, out of it) and
//! costs a few system calls per segment; between ranks of one host that is most of an
//! all-reduce's CPU time. Here each rank owns an **inbox**: one file in [`SHM_DIR`] that holds one
//! single-producer, single-consumer byte ring per same-host peer, mapped by the owner and by every
//! peer that writes into it. A frame then costs one copy in (by the sender) and one copy out (by
//! the receiver), and no system call while both sides are busy.
//!
//! The rings carry exactly the byte stream a TCP connection would carry (frame headers, tags,
//! fingerprints), so the progress engine, the stash and every check above it are shared by both
//! transports. The TCP connection of the pair stays open, idle, as the liveness signal: a peer
//! that dies closes it, which the engine's `poll` sees.
//!
//! Waiting: a rank with nothing to do first spins briefly (the data is usually a few microseconds
//! away), then announces itself in its inbox's sleeper count and sleeps in `poll` on its doorbell,
//! a FIFO next to the inbox. A peer that publishes data into, or frees space in, a ring of a
//! sleeping rank writes one byte to that rank's doorbell. Both sides write their own variable,
//! fence, then read the other's (Dekker), so a wake-up is never lost between the check and the
//! sleep; the engine also caps each sleep, so even a missed one costs milliseconds, not a hang.
//!
//! Files are created `0600` with `O_EXCL` under names that carry the run id, and unlinked as soon
//! as every peer mapped them (the mappings live on); the launcher sweeps the prefix of its run
//! when its ranks end, for ranks killed during set-up. Space is reserved with `posix_fallocate`, so
//! a full `/dev/shm` (small in containers) is an error at set-up, where the pair falls back to
//! TCP, never a `SIGBUS` in the middle of a collective.

use std::ffi::CString;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use super::pair::AlignedBytes;

/// Default bytes of one ring (one direction of one same-host pair). Measured with
/// `burnrun bench allreduce` (README): 2 MiB keeps a ring four 512 KiB segments deep, enough for
/// the sender to run ahead of the receiver, while a rank with 7 local peers maps 14 x 2 MiB.
pub const DEFAULT_SHM_RING_BYTES: usize = 2 << 20;

pub use crate::names::{shm_file_prefix, shm_rank_file_prefix, MIN_SHM_RING_BYTES, SHM_DIR};

/// Marks an inbox file (and the layout version).
const MAGIC: u64 = u64::from_le_bytes(*b"brnshm02");
/// Control block at the start of an inbox: magic, owner rank, slots, ring bytes, sleeper count.
const CONTROL_BYTES: usize = 4096;
const OFF_MAGIC: usize = 0;
const OFF_OWNER: usize = 8;
const OFF_SLOTS: usize = 16;
const OFF_RING_BYTES: usize = 24;
/// On its own cache line: written by the owner, read by every peer on each publish.
const OFF_SLEEPERS: usize = 128;
/// Per ring: the producer's head and the consumer's tail, 128 bytes apart (adjacent-line
/// prefetching pairs 64-byte lines), the box's tail, the box's slots, then the data.
const RING_HEADER_BYTES: usize = OFF_BOX + BOX_SLOTS as usize * BOX_SLOT_BYTES;
const OFF_HEAD: usize = 0;
const OFF_TAIL: usize = 128;
/// The consumer's count of box frames taken (its own line pair; the producer reads it only when
/// its cached copy shows every slot taken).
const OFF_BOX_TAIL: usize = 256;
const OFF_BOX: usize = 384;

/// The box: a second channel per ring for frames of at most [`BOX_PAYLOAD_BYTES`], in slots of
/// whole cache lines that carry their own sequence stamp. A receiver polls the stamp in the line
/// that also holds the header (and, up to 16 bytes, the payload): one line crosses between the
/// cores per small frame, where the byte ring moves the head's line and then the data's. Slot
/// layout: stamp (box frame number + 1, written last), the byte ring's head when the frame was
/// sent (its place in the stream), the 32-byte frame header, the payload.
const BOX_SLOTS: u64 = 16;
const BOX_SLOT_BYTES: usize = 1088;
const BOX_OFF_POS: usize = 8;
const BOX_OFF_HEADER: usize = 16;
const BOX_OFF_PAYLOAD: usize = BOX_OFF_HEADER + super::frame::HEADER_BYTES;
/// Largest payload a box slot carries.
pub(crate) const BOX_PAYLOAD_BYTES: usize = BOX_SLOT_BYTES - BOX_OFF_PAYLOAD;

/// Bytes of an inbox with `slots` rings of `ring_bytes`.
fn inbox_bytes(slots: usize, ring_bytes: usize) -> usize {
    CONTROL_BYTES + slots * (RING_HEADER_BYTES + ring_bytes)
}

fn io_error(what: String, source: std::io::Error) -> std::io::Error {
    std::io::Error::new(source.kind(), format!("{what}: {source}"))
}

fn c_path(path: &Path) -> std::io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} has a NUL byte", path.display()),
        )
    })
}

/// A shared mapping of a whole file, unmapped on drop.
#[derive(Debug)]
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory shared with other processes; every access to it goes
// through atomics or through ring ranges that the head/tail protocol gives to one side at a time.
unsafe impl Send for Mapping {}
// SAFETY: see `Send`.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn map(fd: RawFd, len: usize, path: &Path) -> std::io::Result<Self> {
        // SAFETY: a fresh shared mapping of `len` bytes of an open file; the kernel picks the
        // address. The result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io_error(
                format!("map {}", path.display()),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Self { ptr: ptr.cast(), len })
    }

    fn u64_at(&self, offset: usize) -> &AtomicU64 {
        assert!(offset % 8 == 0 && offset + 8 <= self.len);
        // SAFETY: in bounds and 8-aligned (the mapping is page-aligned); AtomicU64 has the
        // layout of u64 and any bit pattern is valid.
        unsafe { &*self.ptr.add(offset).cast::<AtomicU64>() }
    }

    fn u32_at(&self, offset: usize) -> &AtomicU32 {
        assert!(offset % 4 == 0 && offset + 4 <= self.len);
        // SAFETY: as in `u64_at`.
        unsafe { &*self.ptr.add(offset).cast::<AtomicU32>() }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned; nothing borrows the mapping any
        // more (rings and bells hold an `Arc` to it).
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

/// One ring of an inbox: a producer (the peer that sends) and a consumer (the inbox's owner).
#[derive(Debug)]
struct Ring {
    map: Arc<Mapping>,
    header: usize,
    data: usize,
    cap: usize,
}

impl Ring {
    fn new(map: Arc<Mapping>, slot: usize, cap: usize) -> Self {
        let header = CONTROL_BYTES + slot * (RING_HEADER_BYTES + cap);
        assert!(header + RING_HEADER_BYTES + cap <= map.len);
        Self {
            header,
            data: header + RING_HEADER_BYTES,
            cap,
            map,
        }
    }

    fn head(&self) -> &AtomicU64 {
        self.map.u64_at(self.header + OFF_HEAD)
    }

    fn tail(&self) -> &AtomicU64 {
        self.map.u64_at(self.header + OFF_TAIL)
    }

    fn box_tail(&self) -> &AtomicU64 {
        self.map.u64_at(self.header + OFF_BOX_TAIL)
    }

    /// Offset in the mapping of the slot of box frame `n`.
    fn box_slot(&self, n: u64) -> usize {
        self.header + OFF_BOX + (n % BOX_SLOTS) as usize * BOX_SLOT_BYTES
    }

    /// `len` bytes of the mapping at `offset`, inside this ring's header.
    ///
    /// # Safety
    /// Nobody may write them while the slice lives (the box protocol gives a published slot to
    /// the consumer until it advances the box's tail).
    unsafe fn header_bytes(&self, offset: usize, len: usize) -> &[u8] {
        assert!(offset >= self.header && offset + len <= self.data);
        // SAFETY: in bounds (asserted); the contract excludes concurrent writes.
        unsafe { std::slice::from_raw_parts(self.map.ptr.add(offset), len) }
    }

    /// Copies `src` into the ring at stream position `pos` (wrapping).
    ///
    /// # Safety
    /// `[pos, pos + src.len())` must be free: the caller is the ring's only producer and
    /// `pos + src.len() - tail <= cap`.
    unsafe fn copy_in(&self, pos: u64, src: &[u8]) {
        let at = (pos as usize) & (self.cap - 1);
        let first = src.len().min(self.cap - at);
        // SAFETY: `data + at .. + first` and `data .. + rest` lie inside the ring (at < cap,
        // first <= cap - at, rest <= at since len <= cap) and are free per the contract.
        unsafe {
            let base = self.map.ptr.add(self.data);
            std::ptr::copy_nonoverlapping(src.as_ptr(), base.add(at), first);
            std::ptr::copy_nonoverlapping(src.as_ptr().add(first), base, src.len() - first);
        }
    }

    /// Copies from stream position `pos` (wrapping) into `dst`; `streaming`: with non-temporal
    /// stores (see [`stream_copy`]).
    ///
    /// # Safety
    /// `[pos, pos + dst.len())` must be published: the caller is the ring's only consumer and
    /// `pos + dst.len() <= head`.
    unsafe fn copy_out(&self, pos: u64, dst: &mut [u8], streaming: bool) {
        let at = (pos as usize) & (self.cap - 1);
        let first = dst.len().min(self.cap - at);
        // SAFETY: as in `copy_in`; the ranges are published per the contract.
        let (a, b) = unsafe {
            let base = self.map.ptr.add(self.data);
            (
                std::slice::from_raw_parts(base.add(at), first),
                std::slice::from_raw_parts(base, dst.len() - first),
            )
        };
        let (out_a, out_b) = dst.split_at_mut(first);
        if streaming {
            stream_copy(out_a, a);
            stream_copy(out_b, b);
        } else {
            out_a.copy_from_slice(a);
            out_b.copy_from_slice(b);
        }
    }
}

/// Copies `src` to `dst` (equal lengths) with non-temporal stores where the CPU has them: the
/// destination's cache lines are written without being read first and bypass the caches. For a
/// receive far larger than the last-level cache this saves the read-for-ownership of every
/// destination line (a third of the copy's memory traffic), and the data would be evicted before
/// anyone reads it anyway; for small receives the caller copies normally, so the data stays hot.
fn stream_copy(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len());
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
        // Head: up to the first 16-byte aligned destination byte.
        let head = dst.as_ptr().align_offset(16).min(dst.len());
        dst[..head].copy_from_slice(&src[..head]);
        let body = (dst.len() - head) / 64 * 64;
        // SAFETY: SSE2 is part of the x86_64 baseline. `dst[head..head + body]` is 16-aligned and
        // in bounds, `src[head..head + body]` in bounds (unaligned loads); the slices do not
        // overlap (one is `&mut`). The fence orders the non-temporal stores before whatever
        // follows (the tail store, the ring's tail update that releases the bytes).
        unsafe {
            let mut d = dst.as_mut_ptr().add(head).cast::<__m128i>();
            let mut s = src.as_ptr().add(head).cast::<__m128i>();
            let end = d.add(body / 16);
            while d < end {
                let (x0, x1, x2, x3) = (
                    _mm_loadu_si128(s),
                    _mm_loadu_si128(s.add(1)),
                    _mm_loadu_si128(s.add(2)),
                    _mm_loadu_si128(s.add(3)),
                );
                _mm_stream_si128(d, x0);
                _mm_stream_si128(d.add(1), x1);
                _mm_stream_si128(d.add(2), x2);
                _mm_stream_si128(d.add(3), x3);
                d = d.add(4);
                s = s.add(4);
            }
            _mm_sfence();
        }
        dst[head + body..].copy_from_slice(&src[head + body..]);
    }
    #[cfg(not(target_arch = "x86_64"))]
    dst.copy_from_slice(src);
}

/// Opens a FIFO read-write and non-blocking: the owner reads it; peers only write, but holding it
/// read-write means a write never raises `SIGPIPE`, even after the owner exited.
fn open_fifo(path: &Path) -> std::io::Result<OwnedFd> {
    let c = c_path(path)?;
    // SAFETY: a valid NUL-terminated path; the returned descriptor is checked and owned below.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io_error(
            format!("open doorbell {}", path.display()),
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// This rank's inbox: the rings its same-host peers write into, its sleeper count and its
/// doorbell. Shared by all of its links.
#[derive(Debug)]
pub struct Inbox {
    rank: usize,
    map: Arc<Mapping>,
    bell: OwnedFd,
    peers: Vec<usize>,
    ring_bytes: usize,
    path: PathBuf,
    bell_path: PathBuf,
}

impl Inbox {
    /// Creates the inbox of `rank` in `dir` with one ring of `ring_bytes` (a power of two, at
    /// least [`MIN_SHM_RING_BYTES`]) per peer of `peers`, under a name that starts with `prefix`.
    pub fn create(dir: &Path, prefix: &str, rank: usize, peers: &[usize], ring_bytes: usize) -> std::io::Result<Self> {
        if !ring_bytes.is_power_of_two() || ring_bytes < MIN_SHM_RING_BYTES {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("ring size {ring_bytes} is not a power of two of at least {MIN_SHM_RING_BYTES} bytes"),
            ));
        }
        let mut nonce = [0u8; 8];
        getrandom::getrandom(&mut nonce).map_err(|e| std::io::Error::other(e.to_string()))?;
        // `prefix` + `r<rank>-`: the launcher sweeps by `shm_rank_file_prefix`.
        let stem = format!("{prefix}r{rank}-{:016x}", u64::from_le_bytes(nonce));
        let path = dir.join(&stem);
        let bell_path = dir.join(format!("{stem}.bell"));
        let len = inbox_bytes(peers.len(), ring_bytes);

        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode_0600()
            .open(&path)
            .map_err(|e| io_error(format!("create {}", path.display()), e))?;
        let cleanup = |e: std::io::Error| {
            let _ = std::fs::remove_file(&path);
            let _ = std::fs::remove_file(&bell_path);
            e
        };
        // SAFETY: a valid descriptor; posix_fallocate returns an errno value, checked.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) };
        if rc != 0 {
            return Err(cleanup(io_error(
                format!("reserve {len} bytes for {}", path.display()),
                std::io::Error::from_raw_os_error(rc),
            )));
        }
        let map = Arc::new(Mapping::map(file.as_raw_fd(), len, &path).map_err(cleanup)?);
        map.u64_at(OFF_OWNER).store(rank as u64, Ordering::Relaxed);
        map.u64_at(OFF_SLOTS).store(peers.len() as u64, Ordering::Relaxed);
        map.u64_at(OFF_RING_BYTES).store(ring_bytes as u64, Ordering::Relaxed);
        map.u64_at(OFF_MAGIC).store(MAGIC, Ordering::Release);

        let c = c_path(&bell_path).map_err(cleanup)?;
        // SAFETY: a valid NUL-terminated path.
        if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(cleanup(io_error(format!("create doorbell {}", bell_path.display()), e)));
        }
        let bell = open_fifo(&bell_path).map_err(cleanup)?;
        Ok(Self {
            rank,
            map,
            bell,
            peers: peers.to_vec(),
            ring_bytes,
            path,
            bell_path,
        })
    }

    /// What a peer needs to open this inbox: the lines `v1`, the file, the doorbell, the ring
    /// bytes and the peers (comma-separated), so paths may contain spaces.
    pub fn describe(&self) -> String {
        let peers: Vec<String> = self.peers.iter().map(|p| p.to_string()).collect();
        format!(
            "v1\n{}\n{}\n{}\n{}",
            self.path.display(),
            self.bell_path.display(),
            self.ring_bytes,
            peers.join(",")
        )
    }

    /// Removes the inbox's names from the file system; mappings and open descriptors stay valid.
    pub fn unlink(&self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(&self.bell_path);
    }

    /// The doorbell to `poll` for readability.
    pub(crate) fn bell_fd(&self) -> RawFd {
        self.bell.as_raw_fd()
    }

    /// Empties the doorbell (wake-ups already seen).
    pub(crate) fn drain_bell(&self) {
        let mut sink = [0u8; 64];
        loop {
            // SAFETY: reads into a local buffer of the given size from an owned descriptor.
            let n = unsafe { libc::read(self.bell.as_raw_fd(), sink.as_mut_ptr().cast(), sink.len()) };
            if n < sink.len() as isize {
                return;
            }
        }
    }

    /// Announces a sleeper: from now on peers ring the doorbell when they publish. Returns how
    /// many other threads of this rank sleep on it already.
    pub(crate) fn sleep_begin(&self) -> u32 {
        let others = self.map.u32_at(OFF_SLEEPERS).fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        others
    }

    /// Withdraws the announcement of [`Inbox::sleep_begin`].
    pub(crate) fn sleep_end(&self) {
        self.map.u32_at(OFF_SLEEPERS).fetch_sub(1, Ordering::SeqCst);
    }

    /// This inbox's owner.
    pub fn rank(&self) -> usize {
        self.rank
    }
}

/// The doorbell of a peer: its sleeper count (in its inbox, which we map) and its FIFO.
#[derive(Debug)]
struct Bell {
    map: Arc<Mapping>,
    fifo: OwnedFd,
}

impl Bell {
    /// Wakes the peer if it sleeps. Called after publishing a head or a tail.
    fn ring(&self) {
        fence(Ordering::SeqCst);
        if self.map.u32_at(OFF_SLEEPERS).load(Ordering::Relaxed) > 0 {
            let byte = 1u8;
            // SAFETY: writes one byte from a local to an owned descriptor. A full FIFO (EAGAIN)
            // already holds a pending wake-up, so the result is deliberately ignored.
            unsafe {
                libc::write(self.fifo.as_raw_fd(), (&byte as *const u8).cast(), 1);
            }
        }
    }
}

/// Both directions of one same-host pair.
#[derive(Debug)]
pub struct ShmLink {
    peer: usize,
    /// Our ring in the peer's inbox.
    tx: Ring,
    /// The peer's ring in our inbox.
    rx: Ring,
    peer_bell: Bell,
    inbox: Arc<Inbox>,
    /// The consumer's tail of `tx` as last read. The producer computes free space from it and
    /// reads the real tail (a cache line the consumer writes on every read) only when that is
    /// not enough, so a small frame into a ring with room does not pull that line back. Space
    /// computed from an older tail is a part of the true free space, so this is safe. Written
    /// under the pair's send lock only.
    tx_tail_seen: AtomicU64,
    /// Box frames sent into `tx`'s box, and its tail as last read (as `tx_tail_seen`). Under the
    /// pair's send lock.
    tx_box_head: AtomicU64,
    tx_box_tail_seen: AtomicU64,
}

/// Where the next frame of a stream is (see [`ShmLink::next_frame`]).
#[derive(Debug)]
pub(crate) enum Next<'l> {
    /// In the box.
    Box(BoxFrame<'l>),
    /// In the ring (at least one byte of it arrived).
    Ring,
    /// Nowhere yet.
    Nothing,
}

/// The next frame of a stream when it waits in the box: its header bytes and payload, in place
/// until [`ShmLink::box_consume`].
#[derive(Debug)]
pub(crate) struct BoxFrame<'l> {
    pub(crate) header: &'l [u8; super::frame::HEADER_BYTES],
    slot: usize,
    link: &'l ShmLink,
}

impl<'l> BoxFrame<'l> {
    /// Releases the slot (see [`ShmLink::box_consume`]).
    pub(crate) fn consume(self) {
        self.link.box_consume();
    }

    /// The payload, `len` bytes (from the decoded header; at most [`BOX_PAYLOAD_BYTES`]).
    pub(crate) fn payload(&self, len: usize) -> &'l [u8] {
        assert!(len <= BOX_PAYLOAD_BYTES, "box payload of {len} bytes");
        // SAFETY: inside the slot, which stays the consumer's until `box_consume`.
        unsafe { self.link.rx.header_bytes(self.slot + BOX_OFF_PAYLOAD, len) }
    }
}

/// Parses the text of [`Inbox::describe`].
fn parse_description(line: &str) -> Option<(PathBuf, PathBuf, usize, Vec<usize>)> {
    let mut parts = line.split('\n');
    if parts.next()? != "v1" {
        return None;
    }
    let path = PathBuf::from(parts.next()?);
    let bell = PathBuf::from(parts.next()?);
    let ring_bytes = parts.next()?.parse().ok()?;
    let peers = parts
        .next()?
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().ok())
        .collect::<Option<Vec<usize>>>()?;
    parts.next().is_none().then_some((path, bell, ring_bytes, peers))
}

impl ShmLink {
    /// Opens `peer`'s inbox from its description and pairs it with ours.
    pub fn open(inbox: &Arc<Inbox>, peer: usize, description: &str) -> std::io::Result<Self> {
        let bad = |reason: String| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("shared-memory inbox of rank {peer}: {reason}"),
            )
        };
        let (path, bell_path, ring_bytes, peer_peers) =
            parse_description(description).ok_or_else(|| bad(format!("unreadable description {description:?}")))?;
        let Some(our_slot_there) = peer_peers.iter().position(|&p| p == inbox.rank) else {
            return Err(bad(format!("it has no ring for rank {}", inbox.rank)));
        };
        let Some(their_slot_here) = inbox.peers.iter().position(|&p| p == peer) else {
            return Err(bad(format!("our inbox has no ring for rank {peer}")));
        };
        if ring_bytes != inbox.ring_bytes {
            return Err(bad(format!(
                "rings of {ring_bytes} bytes, ours have {}",
                inbox.ring_bytes
            )));
        }
        let len = inbox_bytes(peer_peers.len(), ring_bytes);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| io_error(format!("open {}", path.display()), e))?;
        let found = file
            .metadata()
            .map_err(|e| io_error(format!("stat {}", path.display()), e))?
            .len();
        if found != len as u64 {
            return Err(bad(format!("{} has {found} bytes, expected {len}", path.display())));
        }
        let map = Arc::new(Mapping::map(file.as_raw_fd(), len, &path)?);
        let header_ok = map.u64_at(OFF_MAGIC).load(Ordering::Acquire) == MAGIC
            && map.u64_at(OFF_OWNER).load(Ordering::Relaxed) == peer as u64
            && map.u64_at(OFF_SLOTS).load(Ordering::Relaxed) == peer_peers.len() as u64
            && map.u64_at(OFF_RING_BYTES).load(Ordering::Relaxed) == ring_bytes as u64;
        if !header_ok {
            return Err(bad(format!("{} is not its inbox (bad header)", path.display())));
        }
        let fifo = open_fifo(&bell_path)?;
        Ok(Self {
            peer,
            tx: Ring::new(Arc::clone(&map), our_slot_there, ring_bytes),
            rx: Ring::new(Arc::clone(&inbox.map), their_slot_here, ring_bytes),
            peer_bell: Bell { map, fifo },
            tx_tail_seen: AtomicU64::new(0),
            tx_box_head: AtomicU64::new(0),
            tx_box_tail_seen: AtomicU64::new(0),
            inbox: Arc::clone(inbox),
        })
    }

    /// The peer's rank.
    pub fn peer(&self) -> usize {
        self.peer
    }

    /// This rank's inbox.
    pub(crate) fn inbox(&self) -> &Arc<Inbox> {
        &self.inbox
    }

    /// The producer's head and the free bytes of `tx` behind it, reading the consumer's tail
    /// only when the cached one shows fewer than `wanted` free. Under the pair's send lock.
    fn tx_room(&self, wanted: usize) -> (u64, usize) {
        let head = self.tx.head().load(Ordering::Relaxed);
        let mut tail = self.tx_tail_seen.load(Ordering::Relaxed);
        if self.tx.cap - ((head - tail) as usize) < wanted {
            // Acquire: the consumer's reads of the bytes it released happen before we overwrite them.
            tail = self.tx.tail().load(Ordering::Acquire);
            self.tx_tail_seen.store(tail, Ordering::Relaxed);
        }
        (head, self.tx.cap - (head - tail) as usize)
    }

    /// Writes all of `parts` (in order) into the ring and publishes them at once, or nothing
    /// (false) when they do not all fit now. Only one thread at a time may write (the pair's
    /// send lock).
    pub(crate) fn write_all_or_none(&self, parts: &[&[u8]]) -> bool {
        let wanted: usize = parts.iter().map(|p| p.len()).sum();
        if wanted > self.tx.cap {
            return false;
        }
        let (head, free) = self.tx_room(wanted);
        if free < wanted {
            return false;
        }
        let mut at = head;
        for part in parts {
            // SAFETY: single producer (the send lock), and `[head, head + wanted)` lies within
            // the free bytes the consumer released (tail acquired in `tx_room`).
            unsafe { self.tx.copy_in(at, part) };
            at += part.len() as u64;
        }
        if wanted > 0 {
            self.tx.head().store(at, Ordering::Release);
            self.peer_bell.ring();
        }
        true
    }

    /// Sends one whole frame (its encoded header and payload) through the peer's box, if the
    /// payload fits a slot and a slot is free; false (nothing sent) otherwise. It takes its place
    /// in the stream after every byte written to the ring so far. Under the pair's send lock, at
    /// a frame boundary of the ring (no frame half written).
    pub(crate) fn box_send(&self, header: &[u8; super::frame::HEADER_BYTES], payload: &[u8]) -> bool {
        if payload.len() > BOX_PAYLOAD_BYTES {
            return false;
        }
        let n = self.tx_box_head.load(Ordering::Relaxed);
        if n - self.tx_box_tail_seen.load(Ordering::Relaxed) >= BOX_SLOTS {
            // Acquire: the consumer's reads of the slot happen before we overwrite it.
            let tail = self.tx.box_tail().load(Ordering::Acquire);
            self.tx_box_tail_seen.store(tail, Ordering::Relaxed);
            if n - tail >= BOX_SLOTS {
                return false;
            }
        }
        let slot = self.tx.box_slot(n);
        let pos = self.tx.head().load(Ordering::Relaxed);
        self.tx.map.u64_at(slot + BOX_OFF_POS).store(pos, Ordering::Relaxed);
        // SAFETY: the slot is ours until its stamp is published (the consumer took frame
        // n - BOX_SLOTS, tail acquired above), inside the ring's header, and neither range
        // overlaps the stamp or the position words.
        unsafe {
            let base = self.tx.map.ptr.add(slot);
            std::ptr::copy_nonoverlapping(header.as_ptr(), base.add(BOX_OFF_HEADER), header.len());
            std::ptr::copy_nonoverlapping(payload.as_ptr(), base.add(BOX_OFF_PAYLOAD), payload.len());
        }
        // Release: the slot's contents are visible before its stamp.
        self.tx.map.u64_at(slot).store(n + 1, Ordering::Release);
        self.tx_box_head.store(n + 1, Ordering::Relaxed);
        self.peer_bell.ring();
        true
    }

    /// The box frame at stream position `tail` (the ring's tail), if one is published there.
    fn box_at_tail(&self) -> Option<BoxFrame<'_>> {
        let n = self.rx.box_tail().load(Ordering::Relaxed);
        let slot = self.rx.box_slot(n);
        if self.rx.map.u64_at(slot).load(Ordering::Acquire) != n + 1 {
            return None;
        }
        // Sent after the ring bytes before `pos`, which are therefore published too: the ring's
        // frames come first until the tail reaches it.
        if self.rx.map.u64_at(slot + BOX_OFF_POS).load(Ordering::Relaxed) != self.rx.tail().load(Ordering::Relaxed) {
            return None;
        }
        // SAFETY: the slot was published (stamp acquired) and stays ours until `box_consume`.
        let bytes = unsafe { self.rx.header_bytes(slot + BOX_OFF_HEADER, super::frame::HEADER_BYTES) };
        Some(BoxFrame {
            header: bytes.try_into().expect("HEADER_BYTES bytes"),
            slot,
            link: self,
        })
    }

    /// Where the next frame of the stream is. Only at a frame boundary of the ring (no header
    /// or payload half read), under the pair's receive lock. `Ring` is final: the frame at the
    /// tail is a ring frame, read it with the ring's calls; after `Nothing` nothing may be read
    /// from the ring before asking again (bytes published since may follow a box frame).
    pub(crate) fn next_frame(&self) -> Next<'_> {
        if let Some(frame) = self.box_at_tail() {
            return Next::Box(frame);
        }
        if self.readable() == 0 {
            return Next::Nothing;
        }
        // A box frame published before the ring bytes we see now comes first; having acquired
        // the head, we see its stamp.
        match self.box_at_tail() {
            Some(frame) => Next::Box(frame),
            None => Next::Ring,
        }
    }

    /// Releases the box frame [`ShmLink::next_box_frame`] returned. No doorbell: a producer never
    /// waits for a slot (it writes to the ring instead).
    pub(crate) fn box_consume(&self) {
        let n = self.rx.box_tail().load(Ordering::Relaxed);
        self.rx.box_tail().store(n + 1, Ordering::Release);
    }

    /// Bytes published into our ring and not yet consumed. Under the pair's receive lock.
    pub(crate) fn readable(&self) -> usize {
        let tail = self.rx.tail().load(Ordering::Relaxed);
        (self.rx.head().load(Ordering::Acquire) - tail) as usize
    }

    /// Copies the published bytes `[offset, offset + dst.len())` past the tail into `dst`
    /// without consuming them. The caller saw at least `offset + dst.len()` [`ShmLink::readable`]
    /// bytes, under the pair's receive lock.
    pub(crate) fn peek(&self, offset: usize, dst: &mut [u8]) {
        let tail = self.rx.tail().load(Ordering::Relaxed);
        // SAFETY: single consumer (the receive lock); the range was published (see above).
        unsafe { self.rx.copy_out(tail + offset as u64, dst, false) };
    }

    /// The published bytes `[offset, offset + len)` past the tail, in place: one slice, or two
    /// when they wrap around the ring's end. Valid until [`ShmLink::consume`]; same contract as
    /// [`ShmLink::peek`].
    pub(crate) fn published(&self, offset: usize, len: usize) -> (&[u8], &[u8]) {
        let tail = self.rx.tail().load(Ordering::Relaxed);
        let at = ((tail + offset as u64) as usize) & (self.rx.cap - 1);
        let first = len.min(self.rx.cap - at);
        // SAFETY: both ranges lie inside our ring (at < cap, first <= cap - at, len <= cap) and
        // were published; the producer does not write them again before the tail passes them.
        unsafe {
            let base = self.rx.map.ptr.add(self.rx.data);
            (
                std::slice::from_raw_parts(base.add(at), first),
                std::slice::from_raw_parts(base, len - first),
            )
        }
    }

    /// Releases the next `n` published bytes to the producer (one tail update, one doorbell
    /// check). Under the pair's receive lock, after [`ShmLink::readable`] showed them.
    pub(crate) fn consume(&self, n: usize) {
        let tail = self.rx.tail().load(Ordering::Relaxed);
        self.rx.tail().store(tail + n as u64, Ordering::Release);
        self.peer_bell.ring();
    }

    /// Copies as much of `bufs` (in order) as fits into the ring; 0 when it is full.
    /// Only one thread at a time may write (the pair's send lock).
    pub(crate) fn write_some(&self, bufs: &[IoSlice<'_>]) -> usize {
        let wanted: usize = bufs.iter().map(|b| b.len()).sum();
        let (head, free) = self.tx_room(wanted);
        let mut written = 0;
        for buf in bufs {
            let n = buf.len().min(free - written);
            // SAFETY: single producer (the send lock), and `[head + written, + n)` lies within
            // the `free` bytes the consumer released (tail acquired above).
            unsafe { self.tx.copy_in(head + written as u64, &buf[..n]) };
            written += n;
            if written == free {
                break;
            }
        }
        if written > 0 {
            self.tx.head().store(head + written as u64, Ordering::Release);
            self.peer_bell.ring();
        }
        written
    }

    /// Copies up to `buf.len()` published bytes out of the ring; 0 when it is empty. `streaming`:
    /// with non-temporal stores (see [`stream_copy`]). Only one thread at a time may read (the
    /// pair's receive lock).
    pub(crate) fn read_some_with(&self, buf: &mut [u8], streaming: bool) -> usize {
        let tail = self.rx.tail().load(Ordering::Relaxed);
        let head = self.rx.head().load(Ordering::Acquire);
        let n = ((head - tail) as usize).min(buf.len());
        if n > 0 {
            // SAFETY: single consumer (the receive lock), and `[tail, tail + n)` was published
            // by the producer (head acquired above).
            unsafe { self.rx.copy_out(tail, &mut buf[..n], streaming) };
            self.rx.tail().store(tail + n as u64, Ordering::Release);
            self.peer_bell.ring();
        }
        n
    }
}

/// Bytes staged at a time when ring data is not aligned for the combiner.
const UNALIGNED_STAGE_BYTES: usize = 64 << 10; // a multiple of every element size

impl ShmLink {
    /// Combines up to `dst.len()` published bytes (whole `elem`-byte elements) out of the ring into
    /// `dst` with `combine`, reading the ring in place; returns the bytes consumed (0 when fewer
    /// than one element is there). Ring data that is not aligned for the element (the stream
    /// carried an odd-sized frame of a narrower type before) goes through `scratch` instead.
    /// Only one thread at a time may read (the pair's receive lock).
    pub(crate) fn reduce_some(
        &self,
        dst: &mut [u8],
        elem: usize,
        combine: &(dyn Fn(&mut [u8], &[u8]) + Sync),
        scratch: &mut AlignedBytes,
    ) -> usize {
        let tail = self.rx.tail().load(Ordering::Relaxed);
        let head = self.rx.head().load(Ordering::Acquire);
        let mut n = ((head - tail) as usize).min(dst.len());
        n -= n % elem;
        if n == 0 {
            return 0;
        }
        let at = (tail as usize) & (self.rx.cap - 1);
        let first = n.min(self.rx.cap - at);
        // SAFETY: the data pointer of our own inbox's ring, 64-aligned.
        let base = unsafe { self.rx.map.ptr.add(self.rx.data) };
        // SAFETY: `at < cap`, inside the ring.
        let start = unsafe { base.add(at) };
        if (start as usize) % elem == 0 && first % elem == 0 {
            // SAFETY: `[at, at + first)` and `[0, n - first)` lie inside the ring and were
            // published by the producer (head acquired above), which does not write them again
            // before we advance the tail.
            let (a, b) = unsafe {
                (
                    std::slice::from_raw_parts(start, first),
                    std::slice::from_raw_parts(base, n - first),
                )
            };
            let (out_a, out_b) = dst[..n].split_at_mut(first);
            combine(out_a, a);
            if !b.is_empty() {
                combine(out_b, b);
            }
        } else {
            let mut done = 0;
            while done < n {
                let len = (n - done).min(UNALIGNED_STAGE_BYTES);
                let stage = scratch.prefix_mut(len);
                // SAFETY: published bytes, as above (single consumer).
                unsafe { self.rx.copy_out(tail + done as u64, stage, false) };
                combine(&mut dst[done..done + len], stage);
                done += len;
            }
        }
        self.rx.tail().store(tail + n as u64, Ordering::Release);
        self.peer_bell.ring();
        n
    }
}

/// Extension for creating files with mode 0600.
trait Mode0600 {
    fn mode_0600(&mut self) -> &mut Self;
}

impl Mode0600 for std::fs::OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.mode(0o600).custom_flags(libc::O_CLOEXEC)
    }
}

/// Identifies the shared-memory domain of this process: ranks with equal ids can map each
/// other's inboxes. Boot id and host name tell machines apart, the network namespace tells
/// apart "nodes" that are namespaces of one machine (they are meant to talk over the network),
/// and the device of [`SHM_DIR`] tells apart containers with their own `/dev/shm`.
pub fn host_id() -> String {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let netns = std::fs::read_link("/proc/self/ns/net")
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let shm_dev = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(SHM_DIR).map(|m| m.dev()).unwrap_or(0)
    };
    format!(
        "{}|{}|{netns}|{shm_dev}",
        read("/proc/sys/kernel/random/boot_id"),
        read("/proc/sys/kernel/hostname")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::HEADER_BYTES;

    fn pair(ring_bytes: usize) -> (ShmLink, ShmLink, Arc<Inbox>, Arc<Inbox>) {
        let dir = std::env::temp_dir();
        let prefix = shm_file_prefix(&format!("unit-{}", std::process::id()));
        let a = Arc::new(Inbox::create(&dir, &prefix, 0, &[1], ring_bytes).unwrap());
        let b = Arc::new(Inbox::create(&dir, &prefix, 1, &[0], ring_bytes).unwrap());
        let ab = ShmLink::open(&a, 1, &b.describe()).unwrap();
        let ba = ShmLink::open(&b, 0, &a.describe()).unwrap();
        a.unlink();
        b.unlink();
        (ab, ba, a, b)
    }

    #[test]
    fn bytes_cross_the_ring_in_order_and_wrap() {
        let (ab, ba, _a, _b) = pair(MIN_SHM_RING_BYTES);
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + 3) as u8).collect();
        let mut got = vec![0u8; data.len()];
        let (mut sent, mut received) = (0, 0);
        while received < data.len() {
            sent += ab.write_some(&[IoSlice::new(&data[sent..(sent + 1000).min(data.len())])]);
            received += ba.read_some_with(&mut got[received..(received + 777).min(data.len())], false);
        }
        assert_eq!(got, data);
    }

    #[test]
    fn streaming_copies_equal_plain_copies_at_every_alignment_and_length() {
        let src: Vec<u8> = (0..5000u32).map(|i| (i * 7 + 3) as u8).collect();
        let mut dst = vec![0u8; 5100];
        for offset in [0, 1, 7, 15, 16, 33] {
            for len in [0, 1, 15, 16, 63, 64, 65, 127, 1000, 4096, 4999 - 33] {
                dst.iter_mut().for_each(|b| *b = 0xAA);
                stream_copy(&mut dst[offset..offset + len], &src[..len]);
                assert_eq!(&dst[offset..offset + len], &src[..len], "offset {offset} len {len}");
                assert!(
                    dst[..offset].iter().all(|&b| b == 0xAA),
                    "before, offset {offset} len {len}"
                );
                assert!(
                    dst[offset + len..].iter().all(|&b| b == 0xAA),
                    "after, offset {offset} len {len}"
                );
            }
        }
    }

    #[test]
    fn a_full_ring_takes_nothing_until_read() {
        let (ab, ba, _a, _b) = pair(MIN_SHM_RING_BYTES);
        let big = vec![5u8; MIN_SHM_RING_BYTES + 10];
        assert_eq!(ab.write_some(&[IoSlice::new(&big)]), MIN_SHM_RING_BYTES);
        assert_eq!(ab.write_some(&[IoSlice::new(&big)]), 0);
        let mut out = vec![0u8; 100];
        assert_eq!(ba.read_some_with(&mut out, false), 100);
        assert_eq!(ab.write_some(&[IoSlice::new(&big), IoSlice::new(&big)]), 100);
        let mut empty = vec![0u8; 8];
        assert_eq!(
            ab.read_some_with(&mut empty, false),
            0,
            "nothing was sent the other way"
        );
    }

    #[test]
    fn a_sleeper_is_woken_through_its_doorbell() {
        let (ab, _ba, _a, b) = pair(MIN_SHM_RING_BYTES);
        b.drain_bell();
        ab.write_some(&[IoSlice::new(b"x")]);
        let mut fds = [libc::pollfd {
            fd: b.bell_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one valid pollfd.
        assert_eq!(
            unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) },
            0,
            "nobody slept: no ring"
        );
        assert_eq!(b.sleep_begin(), 0, "no other sleeper");
        ab.write_some(&[IoSlice::new(b"y")]);
        // SAFETY: as above.
        assert_eq!(
            unsafe { libc::poll(fds.as_mut_ptr(), 1, 1000) },
            1,
            "the sleeper was rung"
        );
        b.sleep_end();
        b.drain_bell();
    }

    /// A frame of the test streams: header (the index as the key) and a payload derived from it.
    fn test_frame(index: u64, len: usize) -> ([u8; HEADER_BYTES], Vec<u8>) {
        let header = crate::transport::FrameHeader {
            tag: crate::transport::Tag { key: index, step: 0 },
            fingerprint: index ^ 0x5a5a,
            len: len as u64,
        }
        .encode();
        let payload = (0..len).map(|i| (index as usize * 31 + i) as u8).collect();
        (header, payload)
    }

    /// Sizes that alternate between the box and the ring, runs of each included.
    fn test_len(index: u64) -> usize {
        let x = index.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40;
        match x % 4 {
            0 | 1 => (x % 64) as usize,
            2 => BOX_PAYLOAD_BYTES - (x % 3) as usize,
            _ => BOX_PAYLOAD_BYTES + 1 + (x % 2000) as usize,
        }
    }

    /// Sends frame `index` through the box if it fits and a slot is free, else the ring;
    /// false when neither takes it now.
    fn send_test_frame(link: &ShmLink, index: u64) -> bool {
        let (header, payload) = test_frame(index, test_len(index));
        link.box_send(&header, &payload) || link.write_all_or_none(&[&header, &payload])
    }

    /// Reads exactly `buf.len()` ring bytes, failing after a second (a frame out of order would
    /// leave the reader waiting for bytes that never come).
    fn read_exact_test(link: &ShmLink, buf: &mut [u8]) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        let mut got = 0;
        while got < buf.len() {
            assert!(
                std::time::Instant::now() < deadline,
                "{} of {} bytes came",
                got,
                buf.len()
            );
            got += link.read_some_with(&mut buf[got..], false);
        }
    }

    /// Takes the next whole frame, box or ring (the ring's are written whole): its header and
    /// payload, or `None` when nothing is there yet.
    fn receive_test_frame(link: &ShmLink) -> Option<(crate::transport::FrameHeader, Vec<u8>)> {
        let decode = |raw: &[u8; HEADER_BYTES]| crate::transport::FrameHeader::decode(raw).unwrap();
        match link.next_frame() {
            Next::Nothing => None,
            Next::Box(frame) => {
                let header = decode(frame.header);
                let payload = frame.payload(header.len as usize).to_vec();
                frame.consume();
                Some((header, payload))
            }
            Next::Ring => {
                let mut raw = [0u8; HEADER_BYTES];
                read_exact_test(link, &mut raw);
                let header = decode(&raw);
                assert!(header.len < 1 << 20, "not a header of the test stream");
                let mut payload = vec![0u8; header.len as usize];
                read_exact_test(link, &mut payload);
                Some((header, payload))
            }
        }
    }

    fn check_test_frame(index: u64, header: &crate::transport::FrameHeader, payload: &[u8]) {
        let (want_header, want_payload) = test_frame(index, test_len(index));
        assert_eq!(header.encode(), want_header, "frame {index}: another frame came first");
        assert_eq!(payload, &want_payload[..], "frame {index}: payload");
    }

    #[test]
    fn box_and_ring_frames_arrive_in_the_order_they_were_sent() {
        // One thread, the consumer lagging by a random number of frames: runs of box frames fill
        // the box and spill to the ring, ring frames sit behind box frames and the other way.
        let (ab, ba, _a, _b) = pair(MIN_SHM_RING_BYTES * 4);
        let (mut sent, mut received) = (0u64, 0u64);
        while received < 5000 {
            let burst = (sent.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 59) + 1;
            for _ in 0..burst {
                if sent < 5000 && send_test_frame(&ab, sent) {
                    sent += 1;
                }
            }
            let take = (received.wrapping_mul(0x9e37_79b9) >> 60) + 1;
            for _ in 0..take {
                if let Some((header, payload)) = receive_test_frame(&ba) {
                    check_test_frame(received, &header, &payload);
                    received += 1;
                }
            }
        }
        assert!(receive_test_frame(&ba).is_none(), "nothing beyond what was sent");
    }

    #[test]
    fn box_and_ring_frames_keep_their_order_between_two_threads() {
        let (ab, ba, _a, _b) = pair(MIN_SHM_RING_BYTES * 4);
        const FRAMES: u64 = 200_000;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        /// Stops the producer when the consumer returns or fails.
        struct Stop<'f>(&'f std::sync::atomic::AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let mut sent = 0;
                while sent < FRAMES && !stop.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
                    if send_test_frame(&ab, sent) {
                        sent += 1;
                    }
                }
            });
            let _stop = Stop(&stop);
            let mut received = 0;
            while received < FRAMES {
                assert!(std::time::Instant::now() < deadline, "stuck at frame {received}");
                if let Some((header, payload)) = receive_test_frame(&ba) {
                    check_test_frame(received, &header, &payload);
                    received += 1;
                }
            }
        });
    }

    #[test]
    fn a_wrong_description_is_refused_with_the_reason() {
        let (_ab, _ba, a, _b) = pair(MIN_SHM_RING_BYTES);
        let err = ShmLink::open(&a, 1, "v2 nonsense").unwrap_err();
        assert!(err.to_string().contains("unreadable description"), "{err}");
        let err = ShmLink::open(&a, 1, "v1\n/nonexistent/x\n/nonexistent/y\n4096\n0").unwrap_err();
        assert!(err.to_string().contains("/nonexistent/x"), "{err}");
    }
}
