//! The eager path: one small frame to or from a same-host peer, without the progress engine.
//!
//! A small collective (a loss-scale agreement, a barrier, a 4-byte all-reduce) is a few frames of
//! a few bytes. Through [`Mesh::exchange`] each costs a batch: its allocations, the locks and
//! checks of every operation, passes over its states, the clock read for the deadline; together
//! more than the frame's trip between two cores. Here a send writes header and payload with one
//! publish, into a slot of the peer's box when it fits one (up to 1040 bytes), else into its ring;
//! a receive polls for the frame it expects, combines (or copies) the payload straight out of
//! shared memory and releases header and payload with one update.
//!
//! The eager path takes the easy case only and **declines** everything else: it returns `false`
//! having consumed nothing, and the caller runs the same transfer through [`Mesh::exchange`],
//! where every check lives. So the engine, not this file, judges any frame that is not exactly
//! the one expected (another tag, another fingerprint or length: a mismatch is reported there,
//! with the same words), a frame not yet complete, a non-empty stash, a broken pair or a peer that
//! is gone, a lock held by another thread, a ring without room, a TCP pair, and any wait longer
//! than the mesh's pure spin (the engine then waits, with the deadline and the liveness checks).

use std::time::Instant;

use super::frame::{FrameHeader, Tag, HEADER_BYTES};
use super::mesh::{Mesh, Reduction};
use super::pair::{Incoming, Pair};
use super::shm::{BoxFrame, Next};

/// Largest payload the eager path moves. A frame must fit a ring several times over (the smallest
/// ring is `MIN_SHM_RING_BYTES`, 4 KiB; the default 2 MiB), so that a send finds room at once.
pub const EAGER_MAX_BYTES: usize = 16 * 1024;

/// Looks at the ring between reads of the clock while the eager receive spins.
const LOOKS_PER_CLOCK_READ: u32 = 64;

impl Mesh {
    /// The pair with `peer` if it moves frames through shared memory and is usable.
    fn eager_pair(&self, peer: usize, len: usize, segment_bytes: usize) -> Option<&Pair> {
        if len > EAGER_MAX_BYTES || len > segment_bytes {
            // The engine would cut it into several frames.
            return None;
        }
        self.pair_ref(peer)
            .filter(|p| p.shm().is_some() && !p.is_broken() && !p.shm_peer_gone())
    }

    /// Sends `data` to `peer` as one frame through shared memory, now, if that is the easy case
    /// (see the module doc); `false`: nothing was written, run the send through the engine.
    pub fn send_eager(&self, peer: usize, tag: Tag, fingerprint: u64, data: &[u8], segment_bytes: usize) -> bool {
        let Some(pair) = self.eager_pair(peer, data.len(), segment_bytes) else {
            return false;
        };
        let Ok(half) = pair.send.try_lock() else {
            return false;
        };
        if half.owner.is_some() {
            // Another operation's frame is half written.
            return false;
        }
        let header = FrameHeader {
            tag,
            fingerprint,
            len: data.len() as u64,
        }
        .encode();
        let link = pair.shm().expect("eager_pair returns shared-memory pairs");
        if !link.box_send(&header, data) && !link.write_all_or_none(&[&header, data]) {
            return false;
        }
        pair.note_sent(HEADER_BYTES + data.len());
        true
    }

    /// Receives from `peer` the one frame of `tag` into `data` (combined into it with `reduce`)
    /// straight out of the shared-memory ring, if it is the easy case and arrives within the
    /// mesh's pure spin; `false`: nothing was consumed, run the receive through the engine.
    pub fn recv_eager(
        &self,
        peer: usize,
        tag: Tag,
        fingerprint: u64,
        data: &mut [u8],
        reduce: Option<Reduction<'_>>,
        segment_bytes: usize,
    ) -> bool {
        let Some(pair) = self.eager_pair(peer, data.len(), segment_bytes) else {
            return false;
        };
        let Ok(mut half) = pair.recv.try_lock() else {
            return false;
        };
        if !matches!(half.incoming, Incoming::Idle) || half.header_filled != 0 || !half.stash.is_empty() {
            return false;
        }
        let link = pair.shm().expect("eager_pair returns shared-memory pairs");
        let frame_len = HEADER_BYTES + data.len();
        let mut looks = 0u32;
        let mut since: Option<Instant> = None;
        let mut header_seen = false;
        let mut in_ring = false;
        loop {
            if !in_ring {
                match link.next_frame() {
                    Next::Box(frame) => return take_boxed(frame, tag, fingerprint, data, reduce),
                    Next::Ring => in_ring = true,
                    Next::Nothing => {}
                }
            }
            let readable = if in_ring { link.readable() } else { 0 };
            if !header_seen && readable >= HEADER_BYTES {
                let mut raw = [0u8; HEADER_BYTES];
                link.peek(0, &mut raw);
                match FrameHeader::decode(&raw) {
                    Ok(h) if h.tag == tag && h.fingerprint == fingerprint && h.len == data.len() as u64 => {
                        header_seen = true;
                    }
                    // Another frame first, or one the engine must report: its job.
                    _ => return false,
                }
            }
            if readable >= frame_len {
                break;
            }
            looks += 1;
            if looks % LOOKS_PER_CLOCK_READ == 0 {
                let start = *since.get_or_insert_with(Instant::now);
                if start.elapsed() >= self.pure_spin() {
                    return false;
                }
            } else if self.pure_spin().is_zero() {
                // More ranks than cores here: the peer may need this core; the engine yields.
                return false;
            }
            std::hint::spin_loop();
        }
        let (a, b) = link.published(HEADER_BYTES, data.len());
        match reduce {
            Some(r) => {
                let aligned = |s: &[u8]| (s.as_ptr() as usize) % r.elem_bytes == 0 && s.len() % r.elem_bytes == 0;
                if b.is_empty() && aligned(a) {
                    (r.combine)(data, a);
                } else {
                    let stage = half.eager_stage.prefix_mut(data.len());
                    stage[..a.len()].copy_from_slice(a);
                    stage[a.len()..].copy_from_slice(b);
                    (r.combine)(data, stage);
                }
            }
            None => {
                data[..a.len()].copy_from_slice(a);
                data[a.len()..].copy_from_slice(b);
            }
        }
        link.consume(frame_len);
        true
    }
}

/// Takes a box frame if it is the one expected (tag, fingerprint, length), combining or copying
/// its payload into `data`; otherwise leaves it (false) for the engine to stash or report.
fn take_boxed(frame: BoxFrame<'_>, tag: Tag, fingerprint: u64, data: &mut [u8], reduce: Option<Reduction<'_>>) -> bool {
    match FrameHeader::decode(frame.header) {
        Ok(h) if h.tag == tag && h.fingerprint == fingerprint && h.len == data.len() as u64 => {}
        _ => return false,
    }
    // In a slot: aligned for every element type.
    let payload = frame.payload(data.len());
    match reduce {
        Some(r) => (r.combine)(data, payload),
        None => data.copy_from_slice(payload),
    }
    frame.consume();
    true
}
