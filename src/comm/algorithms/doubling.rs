//! Recursive doubling all-reduce: latency-optimal for small buffers.
//!
//! In round k every rank exchanges its whole buffer with the rank whose (virtual) number differs
//! in bit k and reduces, so log2(n) rounds suffice. When n is not a power of two, the first
//! 2*(n - p) ranks (p the largest power of two below n) pair up first: each even one hands its
//! data to its odd neighbour and sits out; the odd ones act for both and hand the result back at
//! the end (MPICH's scheme). Both sides of an exchange compute `a op b` with a commutative `op`,
//! so all ranks end with identical bits.
//!
//! Small buffers (up to [`EAGER_BYTES`]) go eagerly: each exchange first sends (the frame lands
//! in the peer's ring or socket buffer at once, nobody has to read it yet), then combines what
//! arrives straight into the buffer (out of the shared-memory ring, without a copy). No scratch
//! buffer is allocated, zeroed or copied through. Larger ones post the send and the receive
//! together into a scratch buffer, so neither side's send waits for the other's receive.

use crate::transport::TransportError;

use super::super::buffer::HostBuffer;
use super::super::dtype::ReduceOp;
use super::super::reduce::{finish_avg, reduce_into};
use super::{reducer, Ctx};

/// Largest buffer exchanged eagerly (send, then combine on arrival). Far below the smallest
/// socket buffer and the default shared-memory ring, so the send completes without the peer;
/// with a smaller ring it still completes, through the engine's drain of blocked sends.
pub(crate) const EAGER_BYTES: usize = 16 * 1024;

const FOLD_STEP: u32 = 0;
/// After the rounds, which take steps 1 to log2(p) <= 63.
const UNFOLD_STEP: u32 = 64;
/// Steps 0 to `STEPS - 1` are this algorithm's (a caller that runs several under one key gives
/// each its own range of this length).
pub(super) const STEPS: u32 = UNFOLD_STEP + 1;

/// All-reduce of `buf` by recursive doubling.
pub(crate) fn all_reduce(ctx: &Ctx<'_>, op: ReduceOp, buf: &mut [u8]) -> Result<(), TransportError> {
    let n = ctx.size();
    let rank = ctx.rank;
    let p = 1usize << (usize::BITS - 1 - n.leading_zeros());
    let rem = n - p;
    let numel = buf.len() / ctx.dtype.size_bytes();
    let eager = buf.len() <= EAGER_BYTES;
    let mut scratch = HostBuffer::zeros(ctx.dtype, if eager { 0 } else { numel });
    let incoming = scratch.bytes_mut();
    let combine = reducer(ctx.dtype, op);

    // Fold the ranks beyond the power of two onto their odd neighbours.
    let virtual_rank = if rank < 2 * rem {
        if rank % 2 == 0 {
            ctx.send_now(rank + 1, FOLD_STEP, buf)?;
            None
        } else {
            ctx.recv_now(rank - 1, FOLD_STEP, buf, Some(&combine))?;
            Some(rank / 2)
        }
    } else {
        Some(rank - rem)
    };

    if let Some(v) = virtual_rank {
        let to_real = |v: usize| if v < rem { 2 * v + 1 } else { v + rem };
        let mut mask = 1;
        let mut step = 1;
        while mask < p {
            let partner = to_real(v ^ mask);
            if eager {
                ctx.send_now(partner, step, buf)?;
                ctx.recv_now(partner, step, buf, Some(&combine))?;
            } else {
                ctx.run(vec![ctx.send(partner, step, buf), ctx.recv(partner, step, incoming)])?;
                reduce_into(ctx.dtype, op, buf, incoming);
            }
            mask <<= 1;
            step += 1;
        }
        if op == ReduceOp::Avg {
            finish_avg(ctx.dtype, buf, n);
        }
    }

    if rank < 2 * rem {
        if rank % 2 == 0 {
            ctx.recv_now(rank + 1, UNFOLD_STEP, buf, None)?;
        } else {
            ctx.send_now(rank - 1, UNFOLD_STEP, buf)?;
        }
    }
    Ok(())
}
