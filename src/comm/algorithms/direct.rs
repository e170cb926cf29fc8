//! Direct all-reduce, for small buffers among the ranks of one host: every rank sends its buffer
//! to every other at once, then combines all n of them in rank order.
//!
//! One round where recursive doubling takes log2(n). On one host a small frame is one trip of a
//! few cache lines through a shared-memory box slot, and the n - 1 frames of a rank leave
//! together. Where ranks outnumber cores it matters more: a rank that runs late finds its peers'
//! buffers waiting and finishes without waiting for each round's partner to be scheduled again.
//! Every rank computes `((b0 op b1) op b2) ...` in the same order, so all end with identical bits.
//! Each rank sends n - 1 copies of its buffer, so this is for a handful of ranks and small
//! buffers only ([`MAX_RANKS`], [`MAX_BYTES`]).

use crate::transport::TransportError;

use super::super::dtype::ReduceOp;
use super::super::reduce::finish_avg;
use super::{reducer, Ctx};

/// Largest buffer reduced directly (one shared-memory box slot carries it).
pub(crate) const MAX_BYTES: usize = 1024;
/// Most ranks reduced directly: each sends n - 1 frames and combines n buffers.
pub(crate) const MAX_RANKS: usize = 8;

/// All-reduce of `buf` (at most [`MAX_BYTES`]) by sending it to every rank.
pub(crate) fn all_reduce(ctx: &Ctx<'_>, op: ReduceOp, buf: &mut [u8]) -> Result<(), TransportError> {
    assert!(buf.len() <= MAX_BYTES, "direct all-reduce of {} bytes", buf.len());
    let (n, rank) = (ctx.size(), ctx.rank);
    for i in 1..n {
        ctx.send_now((rank + i) % n, 0, buf)?;
    }
    let mut words = [0u64; MAX_BYTES / 8];
    let acc = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..buf.len()];
    let combine = reducer(ctx.dtype, op);
    for r in 0..n {
        match (r == rank, r == 0) {
            (true, true) => acc.copy_from_slice(buf),
            (true, false) => combine(acc, buf),
            (false, true) => ctx.recv_now(r, 0, acc, None)?,
            (false, false) => ctx.recv_now(r, 0, acc, Some(&combine))?,
        }
    }
    if op == ReduceOp::Avg {
        finish_avg(ctx.dtype, acc, n);
    }
    buf.copy_from_slice(acc);
    Ok(())
}
