//! A rank's connections to its peers, and the progress engine that drives several transfers at
//! once.
//!
//! [`Mesh::exchange`] takes a batch of sends and receives (to and from any peers) and makes
//! progress on all of them in one thread with non-blocking sockets and `poll(2)`: while one
//! segment is being written to the right neighbour, the next is read from the left one and the
//! last one received is reduced. The kernel's socket buffers are the pipeline; no thread hand-off
//! sits on the data path.

use std::io::IoSlice;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use super::error::TransportError;
use super::frame::{FrameHeader, Tag, HEADER_BYTES, MAX_FRAME_BYTES};
use super::pair::{AlignedBytes, Incoming, Pair, RecvHalf, Stashed, STASH_LIMIT_BYTES};
use super::shm::{BoxFrame, Inbox, Next, BOX_PAYLOAD_BYTES};

/// Combines a received segment into the destination segment (`dst = dst op incoming`).
pub type Reducer<'a> = &'a (dyn Fn(&mut [u8], &[u8]) + Sync);

/// How a receive combines what arrives into its destination.
#[derive(Clone, Copy)]
#[allow(missing_debug_implementations)] // holds a closure
pub struct Reduction<'a> {
    /// The element-wise operator; both slices hold whole elements, aligned for their type.
    pub combine: Reducer<'a>,
    /// Bytes of one element: the unit the combiner may be called on.
    pub elem_bytes: usize,
}

/// When a call gives up: `timeout` after the first time it had to wait. Fixed on first use, so a
/// call that never waits (a small exchange between busy ranks) never reads the clock; the work
/// done before the first wait (which cannot hang: nothing waits) is not counted.
#[derive(Debug)]
pub struct Deadline {
    timeout: Duration,
    at: OnceLock<Instant>,
}

impl Deadline {
    /// A deadline `timeout` after the first wait.
    pub fn after(timeout: Duration) -> Self {
        Self {
            timeout,
            at: OnceLock::new(),
        }
    }

    /// A deadline at `at` (reported as a timeout of `timeout`).
    pub fn at(at: Instant, timeout: Duration) -> Self {
        Self {
            timeout,
            at: OnceLock::from(at),
        }
    }

    /// The instant, fixed now if nothing fixed it yet.
    pub fn instant(&self) -> Instant {
        *self.at.get_or_init(|| Instant::now() + self.timeout)
    }

    /// The timeout it stands for.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// Which pairs a blocked send of a batch reads from (into the stash) while it waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// Every pair of the mesh: ranks that each send to the next one before receiving (a ring
    /// shift, sends to every peer posted before the receives) would otherwise wait on each other
    /// in a cycle. The default.
    AllPairs,
    /// Only the pairs the batch sends to or receives from. For a thread that runs beside another
    /// thread of the same rank on other pairs (a pipelined phase): draining those would take the
    /// other thread's frames into the stash behind its back, while it sleeps on a socket or
    /// doorbell that then has nothing more to say. Only for batches whose sends each have their
    /// peer reading them in the same step (every algorithm here posts a step's sends and
    /// receives together).
    BatchPairs,
}

/// One transfer of a batch.
pub enum Op<'a> {
    /// Send `data` to `peer` as frames of at most `segment_bytes`.
    Send {
        /// Destination rank (mesh numbering).
        peer: usize,
        /// Tag the receiver matches.
        tag: Tag,
        /// Fingerprint of the sending operation.
        fingerprint: u64,
        /// The payload.
        data: &'a [u8],
        /// Frame size.
        segment_bytes: usize,
    },
    /// Receive into `data` from `peer`, frames of at most `segment_bytes`; with `reduce`, each
    /// segment is combined into `data` instead of copied.
    Recv {
        /// Source rank (mesh numbering).
        peer: usize,
        /// Tag to match.
        tag: Tag,
        /// Expected fingerprint.
        fingerprint: u64,
        /// Destination.
        data: &'a mut [u8],
        /// Frame size; must equal the sender's.
        segment_bytes: usize,
        /// Optional reduction.
        reduce: Option<Reduction<'a>>,
    },
}

impl std::fmt::Debug for Op<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::Send { peer, tag, data, .. } => write!(f, "Send(peer {peer}, tag {tag}, {} bytes)", data.len()),
            Op::Recv {
                peer,
                tag,
                data,
                reduce,
                ..
            } => {
                let kind = if reduce.is_some() { "RecvReduce" } else { "Recv" };
                write!(f, "{kind}(peer {peer}, tag {tag}, {} bytes)", data.len())
            }
        }
    }
}

/// The connections of one rank to all others.
#[derive(Debug)]
pub struct Mesh {
    rank: usize,
    world_size: usize,
    pairs: Vec<Option<Arc<Pair>>>,
    /// This rank's shared-memory inbox, when some pairs use one.
    inbox: Option<Arc<Inbox>>,
    shm_spin: Duration,
    /// The start of `shm_spin` that does not yield the core ([`SHM_PURE_SPIN`], or none when
    /// this host runs more ranks than it has cores).
    pure_spin: Duration,
}

static NEXT_TOKEN: AtomicU64 = AtomicU64::new(1);

/// Number of frames a buffer of `len` bytes is cut into (an empty buffer still sends one frame,
/// so the receiver sees the fingerprint).
fn segment_count(len: usize, segment_bytes: usize) -> usize {
    len.div_ceil(segment_bytes.max(1)).max(1)
}

fn segment_range(len: usize, segment_bytes: usize, index: usize) -> std::ops::Range<usize> {
    let start = (index * segment_bytes).min(len);
    start..(start + segment_bytes).min(len)
}

struct SendState<'a> {
    pair: &'a Pair,
    tag: Tag,
    fingerprint: u64,
    data: &'a [u8],
    segment_bytes: usize,
    segments: usize,
    next: usize,
    header: [u8; HEADER_BYTES],
    /// Bytes of the current frame written (header included); `None` between frames.
    written: Option<usize>,
}

struct RecvState<'a, 'b> {
    pair: &'a Pair,
    tag: Tag,
    fingerprint: u64,
    data: &'b mut [u8],
    segment_bytes: usize,
    segments: usize,
    next: usize,
    reduce: Option<Reduction<'b>>,
    scratch: AlignedBytes,
}

enum State<'a, 'b> {
    Send(SendState<'a>),
    Recv(RecvState<'a, 'b>),
}

impl State<'_, '_> {
    fn done(&self) -> bool {
        match self {
            State::Send(s) => s.next == s.segments,
            State::Recv(r) => r.next == r.segments,
        }
    }

    fn pair(&self) -> &Pair {
        match self {
            State::Send(s) => s.pair,
            State::Recv(r) => r.pair,
        }
    }
}

/// Result of one attempt to move bytes.
#[derive(Default)]
struct Progress {
    moved: bool,
    /// Another operation owns the frame in flight on this pair.
    blocked_by_other: bool,
}

impl SendState<'_> {
    fn progress(&mut self, token: u64) -> Result<Progress, TransportError> {
        let mut out = Progress::default();
        let mut half = self.pair.lock_send();
        while self.next < self.segments {
            match half.owner {
                Some(owner) if owner != token => {
                    out.blocked_by_other = true;
                    return Ok(out);
                }
                _ => {}
            }
            let range = segment_range(self.data.len(), self.segment_bytes, self.next);
            let payload = &self.data[range];
            let written = match self.written {
                Some(w) => w,
                None => {
                    self.header = FrameHeader {
                        tag: self.tag,
                        fingerprint: self.fingerprint,
                        len: payload.len() as u64,
                    }
                    .encode();
                    half.owner = Some(token);
                    0
                }
            };
            let total = HEADER_BYTES + payload.len();
            let n = if written < HEADER_BYTES {
                self.pair
                    .write_some(&[IoSlice::new(&self.header[written..]), IoSlice::new(payload)])?
            } else {
                self.pair
                    .write_some(&[IoSlice::new(&payload[written - HEADER_BYTES..])])?
            };
            let Some(n) = n else {
                self.written = Some(written);
                return Ok(out);
            };
            out.moved |= n > 0;
            if written + n == total {
                self.written = None;
                half.owner = None;
                self.next += 1;
            } else {
                self.written = Some(written + n);
            }
        }
        Ok(out)
    }
}

impl RecvState<'_, '_> {
    fn expected_len(&self) -> usize {
        segment_range(self.data.len(), self.segment_bytes, self.next).len()
    }

    /// Checks a frame that carries this operation's tag.
    fn check(&self, fingerprint: u64, len: u64) -> Result<(), TransportError> {
        let (rank, peer) = (self.pair.rank(), self.pair.peer());
        if fingerprint != self.fingerprint {
            return Err(TransportError::Mismatch {
                rank,
                peer,
                tag: self.tag,
                ours: self.fingerprint,
                theirs: fingerprint,
            });
        }
        let expected = self.expected_len();
        if len != expected as u64 {
            return Err(TransportError::SizeMismatch {
                rank,
                peer,
                tag: self.tag,
                expected,
                got: len,
            });
        }
        Ok(())
    }

    /// Where the payload of the current segment is read to: the destination, or scratch space
    /// when it must be reduced.
    fn landing(&mut self) -> &mut [u8] {
        let range = segment_range(self.data.len(), self.segment_bytes, self.next);
        if self.reduce.is_some() {
            self.scratch.prefix_mut(range.len())
        } else {
            &mut self.data[range]
        }
    }

    /// The current segment's payload is in place: reduce it if needed and move on.
    fn finish_segment(&mut self) {
        let range = segment_range(self.data.len(), self.segment_bytes, self.next);
        if let Some(reduce) = self.reduce {
            let len = range.len();
            (reduce.combine)(&mut self.data[range], &self.scratch.as_slice()[..len]);
        }
        self.next += 1;
    }

    fn consume_stashed(&mut self, frame: Stashed) -> Result<(), TransportError> {
        self.take_whole(frame.fingerprint, frame.payload.as_slice())
    }

    /// A whole frame of this operation's tag (from the stash or a box): checked, then copied or
    /// combined into the current segment (`payload` aligned for the element type).
    fn take_whole(&mut self, fingerprint: u64, payload: &[u8]) -> Result<(), TransportError> {
        self.check(fingerprint, payload.len() as u64)?;
        let range = segment_range(self.data.len(), self.segment_bytes, self.next);
        match self.reduce {
            Some(reduce) => (reduce.combine)(&mut self.data[range], payload),
            None => self.data[range].copy_from_slice(payload),
        }
        self.next += 1;
        Ok(())
    }

    /// Checks a frame of another step under this operation's key: every step of one operation
    /// carries its fingerprint, so another one means the peer runs a different call at the same
    /// point of the sequence (e.g. an all-gather against an all-reduce, whose steps are numbered
    /// differently, so their tags never meet and both sides would wait for the deadline).
    fn check_other_step(&self, tag: Tag, fingerprint: u64) -> Result<(), TransportError> {
        if tag.key == self.tag.key && tag.step != self.tag.step && fingerprint != self.fingerprint {
            let (rank, peer) = (self.pair.rank(), self.pair.peer());
            return Err(TransportError::Mismatch {
                rank,
                peer,
                tag,
                ours: self.fingerprint,
                theirs: fingerprint,
            });
        }
        Ok(())
    }

    /// Applies [`RecvState::check_other_step`] to the frames stashed before this operation started.
    fn check_stash(&self) -> Result<(), TransportError> {
        let half = self.pair.lock_recv();
        for (tag, frames) in half.stash.iter().filter(|(tag, _)| tag.key == self.tag.key) {
            for frame in frames {
                self.check_other_step(*tag, frame.fingerprint)?;
            }
        }
        Ok(())
    }

    fn progress(&mut self, token: u64) -> Result<Progress, TransportError> {
        let mut out = Progress::default();
        let pair = self.pair;
        let mut half = pair.lock_recv();
        while self.next < self.segments {
            match &mut half.incoming {
                Incoming::Owned { token: owner, .. } if *owner != token => {
                    out.blocked_by_other = true;
                    return Ok(out);
                }
                Incoming::Owned { header, filled, .. } => {
                    let len = header.len as usize;
                    let mut at = *filled;
                    // From shared memory, reduce straight out of the ring: no copy to scratch.
                    let in_ring = self.reduce.filter(|_| pair.shm().is_some());
                    while at < len {
                        let got = match in_ring {
                            Some(reduce) => {
                                let range = segment_range(self.data.len(), self.segment_bytes, self.next);
                                let dst = &mut self.data[range][at..len];
                                pair.reduce_some(dst, reduce, &mut self.scratch)?
                            }
                            None => {
                                let streaming = self.reduce.is_none() && self.data.len() >= STREAMING_RECV_BYTES;
                                let landing = self.landing();
                                pair.read_some_with(&mut landing[at..len], streaming)?
                            }
                        };
                        match got {
                            Some(n) => {
                                at += n;
                                out.moved |= n > 0;
                            }
                            None => break,
                        }
                    }
                    if at < len {
                        if let Incoming::Owned { filled, .. } = &mut half.incoming {
                            *filled = at;
                        }
                        return Ok(out);
                    }
                    half.incoming = Incoming::Idle;
                    if in_ring.is_some() {
                        self.next += 1;
                    } else {
                        self.finish_segment();
                    }
                }
                Incoming::Stash { .. } => {
                    if !fill_stash(pair, &mut half, &mut out.moved)? {
                        return Ok(out);
                    }
                }
                Incoming::Idle => {
                    // (An empty stash, the usual case, costs no hashing of the tag.)
                    let stashed = match half.stash.is_empty() {
                        true => None,
                        false => half.stash.get_mut(&self.tag).and_then(|q| q.pop_front()),
                    };
                    if let Some(frame) = stashed {
                        half.stash_bytes -= frame.payload.len();
                        pair.stash_frames.fetch_sub(1, Ordering::Release);
                        if half.stash.get(&self.tag).is_some_and(|q| q.is_empty()) {
                            half.stash.remove(&self.tag);
                        }
                        self.consume_stashed(frame)?;
                        out.moved = true;
                        continue;
                    }
                    if half.header_filled == 0 {
                        match pair.next_frame()? {
                            Next::Nothing => return Ok(out),
                            Next::Ring => {}
                            Next::Box(frame) => {
                                let header = box_header(pair, &frame)?;
                                let payload = frame.payload(header.len as usize);
                                if header.tag == self.tag {
                                    self.take_whole(header.fingerprint, payload)?;
                                } else {
                                    self.check_other_step(header.tag, header.fingerprint)?;
                                    stash_whole(pair, &mut half, header, payload)?;
                                }
                                frame.consume();
                                out.moved = true;
                                continue;
                            }
                        }
                    }
                    let Some(header) = read_header(pair, &mut half, &mut out.moved)? else {
                        return Ok(out);
                    };
                    if header.tag == self.tag {
                        self.check(header.fingerprint, header.len)?;
                        half.incoming = Incoming::Owned {
                            token,
                            header,
                            filled: 0,
                        };
                    } else {
                        self.check_other_step(header.tag, header.fingerprint)?;
                        start_stash(pair, &mut half, header)?;
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Reads the next frame header; `None` until all of it arrived.
fn read_header(pair: &Pair, half: &mut RecvHalf, moved: &mut bool) -> Result<Option<FrameHeader>, TransportError> {
    while half.header_filled < HEADER_BYTES {
        let at = half.header_filled;
        let mut chunk = [0u8; HEADER_BYTES];
        match pair.read_some(&mut chunk[..HEADER_BYTES - at])? {
            Some(n) => {
                half.header[at..at + n].copy_from_slice(&chunk[..n]);
                half.header_filled += n;
                *moved |= n > 0;
            }
            None => return Ok(None),
        }
    }
    half.header_filled = 0;
    FrameHeader::decode(&half.header)
        .map(Some)
        .map_err(|reason| TransportError::Protocol {
            rank: pair.rank(),
            peer: pair.peer(),
            reason,
        })
}

/// Decodes the header of a box frame: a protocol error (naming the peer) when it is not a frame
/// header or announces more than a slot holds.
fn box_header(pair: &Pair, frame: &BoxFrame<'_>) -> Result<FrameHeader, TransportError> {
    let protocol = |reason: String| TransportError::Protocol {
        rank: pair.rank(),
        peer: pair.peer(),
        reason,
    };
    let header = FrameHeader::decode(frame.header).map_err(protocol)?;
    if header.len > BOX_PAYLOAD_BYTES as u64 {
        return Err(protocol(format!(
            "a shared-memory box frame announces {} bytes, more than a slot's {BOX_PAYLOAD_BYTES}",
            header.len
        )));
    }
    Ok(header)
}

/// Stores a whole frame nobody waits for yet (a box frame) in the stash, within its limit.
fn stash_whole(pair: &Pair, half: &mut RecvHalf, header: FrameHeader, payload: &[u8]) -> Result<(), TransportError> {
    reserve_stash(pair, half, &header)?;
    let mut buf = AlignedBytes::zeroed(payload.len());
    buf.as_mut_slice().copy_from_slice(payload);
    push_stashed(pair, half, &header, buf);
    Ok(())
}

/// Appends a complete frame to the stash (its bytes were reserved).
fn push_stashed(pair: &Pair, half: &mut RecvHalf, header: &FrameHeader, payload: AlignedBytes) {
    half.stash.entry(header.tag).or_default().push_back(Stashed {
        fingerprint: header.fingerprint,
        payload,
    });
    pair.stash_frames.fetch_add(1, Ordering::Release);
}

/// Counts a frame of `header.len` bytes against the stash's limit, or the protocol error.
fn reserve_stash(pair: &Pair, half: &mut RecvHalf, header: &FrameHeader) -> Result<(), TransportError> {
    let len = header.len as usize;
    if half.stash_bytes + len > STASH_LIMIT_BYTES || header.len > MAX_FRAME_BYTES {
        return Err(TransportError::Protocol {
            rank: pair.rank(),
            peer: pair.peer(),
            reason: format!(
                "{} bytes of frames nobody asked for are waiting (limit {STASH_LIMIT_BYTES}); \
                 the ranks are likely running different collectives",
                half.stash_bytes + len
            ),
        });
    }
    half.stash_bytes += len;
    Ok(())
}

/// Starts reading a frame nobody waits for into the stash, within the stash's limit.
fn start_stash(pair: &Pair, half: &mut RecvHalf, header: FrameHeader) -> Result<(), TransportError> {
    reserve_stash(pair, half, &header)?;
    let len = header.len as usize;
    half.incoming = Incoming::Stash {
        header,
        buf: AlignedBytes::zeroed(len),
        filled: 0,
    };
    Ok(())
}

/// Continues reading a stashed frame; true once it is complete and stored.
fn fill_stash(pair: &Pair, half: &mut RecvHalf, moved: &mut bool) -> Result<bool, TransportError> {
    let Incoming::Stash { header, buf, filled } = &mut half.incoming else {
        return Ok(true);
    };
    let len = header.len as usize;
    while *filled < len {
        match pair.read_some(&mut buf.as_mut_slice()[*filled..len])? {
            Some(n) => {
                *filled += n;
                *moved |= n > 0;
            }
            None => return Ok(false),
        }
    }
    let Incoming::Stash { header, buf, .. } = std::mem::replace(&mut half.incoming, Incoming::Idle) else {
        unreachable!("matched Incoming::Stash above")
    };
    push_stashed(pair, half, &header, buf);
    Ok(true)
}

/// While a send is blocked (the peer is not reading), reads whatever the peer sends into the
/// stash: two ranks that send to each other at once can then never deadlock on full socket
/// buffers, whatever order they post their receives in.
fn drain_unsolicited(pair: &Pair) -> Result<bool, TransportError> {
    let mut half = pair.lock_recv();
    let mut moved = false;
    loop {
        match half.incoming {
            Incoming::Owned { .. } => return Ok(moved),
            Incoming::Stash { .. } => {
                if !fill_stash(pair, &mut half, &mut moved)? {
                    return Ok(moved);
                }
            }
            Incoming::Idle => {
                if half.header_filled == 0 {
                    match pair.next_frame()? {
                        Next::Nothing => return Ok(moved),
                        Next::Ring => {}
                        Next::Box(frame) => {
                            let header = box_header(pair, &frame)?;
                            stash_whole(pair, &mut half, header, frame.payload(header.len as usize))?;
                            frame.consume();
                            moved = true;
                            continue;
                        }
                    }
                }
                match read_header(pair, &mut half, &mut moved)? {
                    None => return Ok(moved),
                    Some(header) => start_stash(pair, &mut half, header)?,
                }
            }
        }
    }
}

impl Mesh {
    /// A mesh over `pairs[peer]` (`None` at this rank's own index, and for peers never connected).
    pub fn new(rank: usize, world_size: usize, pairs: Vec<Option<Pair>>) -> Self {
        let inbox = pairs
            .iter()
            .flatten()
            .find_map(|p| p.shm().map(|link| Arc::clone(link.inbox())));
        // Ranks of this host: this one and its shared-memory peers. More of them than cores
        // means a waited-for peer may be queued behind us on our core: then no pure spin.
        let local_ranks = 1 + pairs.iter().flatten().filter(|p| p.shm().is_some()).count();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            rank,
            world_size,
            pairs: pairs.into_iter().map(|p| p.map(Arc::new)).collect(),
            inbox,
            shm_spin: DEFAULT_SHM_SPIN,
            pure_spin: if local_ranks > cores {
                Duration::ZERO
            } else {
                SHM_PURE_SPIN
            },
        }
    }

    /// Sets how long a rank busy-polls its shared-memory pairs before it sleeps.
    pub fn with_shm_spin(mut self, spin: Duration) -> Self {
        self.shm_spin = spin;
        self
    }

    /// What each peer's frames travel through: `"shm"`, `"tcp"`, or `None` (this rank, or a peer
    /// never connected).
    pub fn transports(&self) -> Vec<Option<&'static str>> {
        self.pairs.iter().map(|p| p.as_ref().map(|p| p.transport())).collect()
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// Cuts the connection to `peer` (both directions, as a network failure would): every later
    /// transfer with it fails, and so do the peer's with this rank. Fault injection uses it.
    pub fn sever(&self, peer: usize, reason: &str) {
        if let Some(pair) = self.pairs.get(peer).and_then(|p| p.as_deref()) {
            pair.mark_broken(reason.to_owned());
        }
    }

    /// Tags and fingerprints of the frames from `peer` that arrived and wait unread.
    pub fn stashed_from(&self, peer: usize) -> Vec<(Tag, u64)> {
        match self.pairs.get(peer).and_then(|p| p.as_deref()) {
            Some(pair) => pair.stashed(),
            None => Vec::new(),
        }
    }

    /// Bytes this rank has written to all its peers so far (frame headers included).
    pub fn bytes_sent(&self) -> u64 {
        self.pairs.iter().flatten().map(|p| p.bytes_sent()).sum()
    }

    /// Bytes this rank has written to `peer` so far (frame headers included; 0 for itself).
    pub fn bytes_sent_to(&self, peer: usize) -> u64 {
        self.pairs
            .get(peer)
            .and_then(|p| p.as_ref())
            .map_or(0, |p| p.bytes_sent())
    }

    /// The pair with `peer`, if connected.
    pub(crate) fn pair_ref(&self, peer: usize) -> Option<&Pair> {
        self.pairs.get(peer).and_then(|p| p.as_deref())
    }

    /// How long a wait for a shared-memory peer spins without yielding the core.
    pub(crate) fn pure_spin(&self) -> Duration {
        self.pure_spin
    }

    fn pair(&self, peer: usize) -> Result<&Pair, TransportError> {
        self.pairs
            .get(peer)
            .and_then(|p| p.as_deref())
            .ok_or_else(|| TransportError::Protocol {
                rank: self.rank,
                peer,
                reason: format!("no connection to peer {peer} (world size {})", self.world_size),
            })
    }

    /// Runs every operation of the batch to completion, concurrently, or fails at `deadline`
    /// (reported as a timeout of `timeout`). On failure the pairs involved are marked unusable.
    pub fn exchange(&self, ops: Vec<Op<'_>>, deadline: Instant, timeout: Duration) -> Result<(), TransportError> {
        self.exchange_until(ops, &Deadline::at(deadline, timeout))
    }

    /// [`Mesh::exchange`] against a [`Deadline`] that may not be fixed yet.
    pub fn exchange_until(&self, ops: Vec<Op<'_>>, deadline: &Deadline) -> Result<(), TransportError> {
        self.exchange_with(ops, deadline, Drain::AllPairs)
    }

    /// [`Mesh::exchange_until`], draining while blocked as `drain` says.
    pub fn exchange_with(&self, ops: Vec<Op<'_>>, deadline: &Deadline, drain: Drain) -> Result<(), TransportError> {
        let mut states = Vec::with_capacity(ops.len());
        for op in ops {
            states.push(match op {
                Op::Send {
                    peer,
                    tag,
                    fingerprint,
                    data,
                    segment_bytes,
                } => State::Send(SendState {
                    pair: self.pair(peer)?,
                    tag,
                    fingerprint,
                    data,
                    segment_bytes,
                    segments: segment_count(data.len(), segment_bytes),
                    next: 0,
                    header: [0; HEADER_BYTES],
                    written: None,
                }),
                Op::Recv {
                    peer,
                    tag,
                    fingerprint,
                    data,
                    segment_bytes,
                    reduce,
                } => State::Recv(RecvState {
                    pair: self.pair(peer)?,
                    tag,
                    fingerprint,
                    segments: segment_count(data.len(), segment_bytes),
                    data,
                    segment_bytes,
                    next: 0,
                    reduce,
                    scratch: AlignedBytes::default(),
                }),
            });
        }
        for state in &states {
            state.pair().check_broken()?;
        }
        let token = NEXT_TOKEN.fetch_add(1, Ordering::Relaxed);
        let stashed_mismatch = states.iter().try_for_each(|state| match state {
            State::Recv(r) => r.check_stash(),
            State::Send(_) => Ok(()),
        });
        let result = stashed_mismatch.and_then(|()| {
            let wait = Wait {
                inbox: self.inbox.as_deref(),
                spin: self.shm_spin,
                pure_spin: self.pure_spin,
            };
            drive(&mut states, &self.pairs, wait, token, deadline, drain)
        });
        if let Err(e) = &result {
            for state in &states {
                state.pair().mark_broken(e.to_string());
            }
        }
        result
    }
}

/// The mesh's pair with `peer`, if a blocked send may read from it.
fn drainable<'p>(mesh_pairs: &'p [Option<Arc<Pair>>], skip_drain: &[bool], peer: usize) -> Option<&'p Pair> {
    mesh_pairs[peer]
        .as_deref()
        .filter(|p| !skip_drain.get(peer).copied().unwrap_or(false) && p.check_broken().is_ok())
}

/// Marks `peer` as not to be drained for the rest of the call.
fn skip(skip_drain: &mut Vec<bool>, peer: usize) {
    if skip_drain.len() <= peer {
        skip_drain.resize(peer + 1, false);
    }
    skip_drain[peer] = true;
}

/// What one pass over a batch achieved.
struct Pass {
    moved: bool,
    blocked_by_other: bool,
    all_done: bool,
    sending: bool,
}

/// Whether a blocked send drains `pair` now: at once, unless this batch already received all it
/// wanted from that pair; then only once `due` (see [`DRAIN_DELAY`]).
fn drain_now(states: &[State<'_, '_>], pair: &Pair, due: bool) -> bool {
    due || !states
        .iter()
        .any(|s| matches!(s, State::Recv(r) if s.done() && std::ptr::eq(r.pair, pair)))
}

/// Tries every unfinished operation once; a blocked send also drains the other pairs (see
/// [`drain_now`]; `drain`: the delay is over).
fn progress_pass(
    states: &mut [State<'_, '_>],
    mesh_pairs: &[Option<Arc<Pair>>],
    skip_drain: &mut Vec<bool>,
    token: u64,
    drain: bool,
) -> Result<Pass, TransportError> {
    let mut pass = Pass {
        moved: false,
        blocked_by_other: false,
        all_done: true,
        sending: false,
    };
    for state in states.iter_mut() {
        if state.done() {
            continue;
        }
        let progress = match state {
            State::Send(s) => s.progress(token)?,
            State::Recv(r) => r.progress(token)?,
        };
        pass.moved |= progress.moved;
        pass.blocked_by_other |= progress.blocked_by_other;
        pass.all_done &= state.done();
    }
    if pass.all_done || pass.moved {
        return Ok(pass);
    }
    // A blocked send reads whatever any peer sends, not only the peer it writes to: ranks that
    // each send to the next one (a ring shift, or sends to every peer posted before the
    // receives) would otherwise wait on each other in a cycle.
    pass.sending = states.iter().any(|s| matches!(s, State::Send(_)) && !s.done());
    if !pass.sending {
        return Ok(pass);
    }
    for peer in 0..mesh_pairs.len() {
        let Some(pair) = drainable(mesh_pairs, skip_drain, peer) else {
            continue;
        };
        // A pair this batch receives from is read by that receive's progress already.
        let receiving = states
            .iter()
            .any(|s| matches!(s, State::Recv(r) if !s.done() && std::ptr::eq(r.pair, pair)));
        if receiving || !drain_now(states, pair, drain) {
            continue;
        }
        match drain_unsolicited(pair) {
            Ok(drained) => pass.moved |= drained,
            Err(e) if states.iter().any(|s| !s.done() && std::ptr::eq(s.pair(), pair)) => return Err(e),
            // Not a pair this batch still needs: its failure belongs to its next user. A peer
            // that sent everything and exited leaves its frames in the stash, still readable;
            // a malformed stream cannot be read further.
            Err(e) => {
                skip(skip_drain, peer);
                if !matches!(e, TransportError::PeerLost { .. }) {
                    pair.mark_broken(e.to_string());
                }
            }
        }
    }
    Ok(pass)
}

/// Receives of at least this many bytes (half this machine's 32 MiB last-level cache) copy out
/// of shared memory with non-temporal stores: their destination would not stay cached anyway,
/// and skipping the read-for-ownership of its lines cuts the copy's memory traffic by a third.
/// Measured with `burnrun bench allreduce` (README); smaller receives stay in the cache for the
/// reduction or the caller that reads them next.
pub(crate) const STREAMING_RECV_BYTES: usize = 16 << 20;

/// How long a rank whose batch involves shared-memory pairs polls them in a busy loop before it
/// sleeps on its doorbell. Ring transfers on one host take microseconds; sleeping costs a
/// system call on each side (the doorbell's write and the wake-up).
pub const DEFAULT_SHM_SPIN: Duration = Duration::from_micros(50);

/// How long a blocked send waits before it drains a pair this batch already received everything
/// from. Draining it at once would read the frames a ring neighbour already sends for the next
/// step into heap buffers, to be copied again when that step starts; left in the socket (or
/// ring) they land straight in their destination, and flow control holds the neighbour back
/// meanwhile. Other pairs are drained at once, as mutual blocked sends need.
const DRAIN_DELAY: Duration = Duration::from_millis(1);

/// Part of the spin that does not yield the core: a peer that runs on another core answers
/// within this. Skipped where the host has more ranks than cores: a yield at once lets the peer
/// that may share our core run (what MPI's `mpi_yield_when_idle` does when oversubscribed).
const SHM_PURE_SPIN: Duration = Duration::from_micros(5);

/// Longest sleep while shared-memory pairs are involved: wake-ups are not lost by design (also
/// with several threads of a rank asleep on its doorbell); this bounds the cost of a bug.
const SHM_SLEEP_CAP: Duration = Duration::from_millis(10);

/// Announcement of a sleeper in this rank's inbox, withdrawn on drop (also on error paths).
struct Announced<'i>(&'i Inbox);

impl<'i> Announced<'i> {
    /// Announces this thread. The sole sleeper empties the doorbell of wake-ups already seen
    /// (after announcing: whatever is published from then on rings again, and what was published
    /// before the drain is seen by the look that follows). With other threads of the rank asleep
    /// on it, a byte left there may be theirs: it stays, at the price of a spurious wake-up here.
    fn new(inbox: &'i Inbox) -> Self {
        if inbox.sleep_begin() == 0 {
            inbox.drain_bell();
        }
        Self(inbox)
    }
}

impl Drop for Announced<'_> {
    fn drop(&mut self) {
        self.0.sleep_end();
    }
}

/// Where the engine waits, besides the sockets: this rank's shared-memory inbox, if it has one.
#[derive(Clone, Copy)]
struct Wait<'m> {
    inbox: Option<&'m Inbox>,
    spin: Duration,
    pure_spin: Duration,
}

/// Whether some pair's drain waits for [`DRAIN_DELAY`] (see [`drain_now`]): the batch holds a
/// finished receive.
fn delayed_drain(states: &[State<'_, '_>]) -> bool {
    states.iter().any(|s| matches!(s, State::Recv(_)) && s.done())
}

/// Adds `pair`'s socket to the poll set (once). A shared-memory pair's socket only ever becomes
/// readable when the peer is gone, so only that is watched, and the pair is noted in `liveness`.
fn watch<'p>(
    pollfds: &mut Vec<libc::pollfd>,
    liveness: &mut Vec<Option<&'p Pair>>,
    pair: &'p Pair,
    events: libc::c_short,
) {
    let fd = pair.fd();
    let events = if pair.shm().is_some() { libc::POLLIN } else { events };
    match pollfds.iter_mut().find(|p| p.fd == fd) {
        Some(p) => p.events |= events,
        None => {
            pollfds.push(libc::pollfd { fd, events, revents: 0 });
            liveness.push(pair.shm().map(|_| pair));
        }
    }
}

fn drive(
    states: &mut [State<'_, '_>],
    mesh_pairs: &[Option<Arc<Pair>>],
    wait: Wait<'_>,
    token: u64,
    deadline: &Deadline,
    drain_scope: Drain,
) -> Result<(), TransportError> {
    // Allocated on the first sleep only: a small exchange between busy ranks never sleeps.
    let mut pollfds: Vec<libc::pollfd> = Vec::new();
    // The pair behind each entry of `pollfds` that is a shared-memory pair's idle socket.
    let mut liveness: Vec<Option<&Pair>> = Vec::new();
    // Pairs not drained for the rest of the call (indexed by peer, grown on the first): outside
    // the batch with `Drain::BatchPairs`, and those outside it that failed while drained.
    let mut skip_drain: Vec<bool> = Vec::new();
    if drain_scope == Drain::BatchPairs {
        for (peer, pair) in mesh_pairs.iter().enumerate() {
            let in_batch = pair
                .as_deref()
                .is_some_and(|pair| states.iter().any(|s| std::ptr::eq(s.pair(), pair)));
            if !in_batch {
                skip(&mut skip_drain, peer);
            }
        }
    }
    let mut idle_since: Option<Instant> = None;
    let mut announced: Option<Announced<'_>> = None;
    loop {
        let drain = idle_since.is_some_and(|since: Instant| since.elapsed() >= DRAIN_DELAY);
        let pass = progress_pass(states, mesh_pairs, &mut skip_drain, token, drain)?;
        if pass.all_done {
            return Ok(());
        }
        if pass.moved {
            idle_since = None;
            announced = None;
            continue;
        }
        let now = Instant::now();
        if now >= deadline.instant() {
            return Err(timeout_error(states, deadline.timeout()));
        }
        let idle = now.duration_since(*idle_since.get_or_insert(now));
        let shm_inbox = wait
            .inbox
            .filter(|_| pass.sending || states.iter().any(|s| !s.done() && s.pair().shm().is_some()));
        if let Some(inbox) = shm_inbox {
            if idle < wait.spin {
                // Spin briefly, then yield between looks: on a machine with more ranks (or
                // compute threads) than cores, the peer we wait for may need this core.
                if idle < wait.pure_spin {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
                continue;
            }
            if announced.is_none() {
                // Announce, then look once more: data published before the announcement was
                // not rung for.
                announced = Some(Announced::new(inbox));
                continue;
            }
        }
        // Sleep until a socket or the doorbell is ready. When another thread owns a frame on one
        // of our pairs it reads our frames into the stash, which poll cannot see: wake up often
        // then.
        let cap = if pass.blocked_by_other || (pass.sending && !drain && delayed_drain(states)) {
            // Also: a blocked send looks again when its drain is due.
            Duration::from_millis(1)
        } else if shm_inbox.is_some() {
            SHM_SLEEP_CAP
        } else {
            Duration::from_millis(200)
        };
        let wait_ms = deadline
            .instant()
            .saturating_duration_since(now)
            .min(cap)
            .as_millis()
            .max(1) as libc::c_int;
        pollfds.clear();
        liveness.clear();
        for state in states.iter() {
            if state.done() {
                continue;
            }
            match state {
                State::Send(s) => {
                    // Incoming data on a pair we send to is read by the drain, when it may run.
                    let events = if drain_now(states, s.pair, drain) {
                        libc::POLLOUT | libc::POLLIN
                    } else {
                        libc::POLLOUT
                    };
                    watch(&mut pollfds, &mut liveness, s.pair, events)
                }
                State::Recv(r) => watch(&mut pollfds, &mut liveness, r.pair, libc::POLLIN),
            }
        }
        if pass.sending {
            // Wake up for data from any peer the drain may read.
            for peer in 0..mesh_pairs.len() {
                if let Some(pair) = drainable(mesh_pairs, &skip_drain, peer).filter(|p| drain_now(states, p, drain)) {
                    watch(&mut pollfds, &mut liveness, pair, libc::POLLIN);
                }
            }
        }
        if let Some(inbox) = shm_inbox {
            pollfds.push(libc::pollfd {
                fd: inbox.bell_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            liveness.push(None);
        }
        // SAFETY: `pollfds` is a valid, initialised array of `pollfds.len()` entries that lives
        // across the call, and every fd in it belongs to a socket borrowed from `states` or from
        // the mesh, or to the inbox, which outlive the call.
        let rc = unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, wait_ms) };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                let pair = states[0].pair();
                return Err(TransportError::Io {
                    rank: pair.rank(),
                    what: "poll the data sockets".into(),
                    source: err,
                });
            }
        }
        announced = None;
        for (pfd, pair) in pollfds.iter().zip(&liveness) {
            let Some(pair) = pair else { continue };
            if pfd.revents == 0 {
                continue;
            }
            // A closed socket marks the peer gone: its operations fail once its ring is empty.
            if let Err(e) = pair.note_socket_event() {
                if states.iter().any(|s| std::ptr::eq(s.pair(), *pair)) {
                    return Err(e);
                }
                pair.mark_broken(e.to_string());
            }
            if pair.shm_peer_gone() && !states.iter().any(|s| !s.done() && std::ptr::eq(s.pair(), *pair)) {
                // Not needed by this batch: its next user finds out. Stop draining (and polling) it.
                skip(&mut skip_drain, pair.peer());
            }
        }
    }
}

fn timeout_error(states: &[State<'_, '_>], timeout: Duration) -> TransportError {
    // Report the first unfinished receive: the peer we are waiting on. Sends block only when the
    // peer stopped reading, so they come second.
    let waiting = states
        .iter()
        .find(|s| !s.done() && matches!(s, State::Recv(_)))
        .or_else(|| states.iter().find(|s| !s.done()))
        .expect("timeout_error is called only while an operation is unfinished");
    let (direction, tag) = match waiting {
        State::Send(s) => ("send", s.tag),
        State::Recv(r) => ("recv", r.tag),
    };
    let pair = waiting.pair();
    TransportError::Timeout {
        rank: pair.rank(),
        peer: pair.peer(),
        direction,
        tag,
        timeout,
        stashed: pair.stashed(),
    }
}
