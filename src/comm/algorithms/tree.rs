//! Binomial trees: latency-optimal broadcast and reduce for small buffers.
//!
//! Ranks are renumbered relative to the root (`v = (rank - root) mod n`). In a broadcast, rank v
//! receives from `v - lowbit(v)` and then forwards to `v + 2^k` for every `2^k` below its lowest
//! set bit, all children at once; a reduce runs the same tree upwards.

use crate::transport::TransportError;

use super::super::buffer::HostBuffer;
use super::super::dtype::ReduceOp;
use super::super::reduce::{finish_avg, reduce_into};
use super::Ctx;

/// Binomial-tree broadcast from `root`.
pub(crate) fn broadcast(ctx: &Ctx<'_>, root: usize, buf: &mut [u8]) -> Result<(), TransportError> {
    let n = ctx.size();
    let v = (ctx.rank + n - root) % n;
    let real = |v: usize| (v + root) % n;
    let mut mask = 1;
    while mask < n {
        if v & mask != 0 {
            ctx.run(vec![ctx.recv(real(v - mask), 0, buf)])?;
            break;
        }
        mask <<= 1;
    }
    let mut children = Vec::new();
    mask >>= 1;
    while mask > 0 {
        if v + mask < n {
            children.push(real(v + mask));
        }
        mask >>= 1;
    }
    let ops = children.into_iter().map(|child| ctx.send(child, 0, buf)).collect();
    ctx.run(ops)
}

/// Binomial-tree reduce to `root`. Non-root buffers are used as scratch.
pub(crate) fn reduce(ctx: &Ctx<'_>, op: ReduceOp, root: usize, buf: &mut [u8]) -> Result<(), TransportError> {
    let n = ctx.size();
    let v = (ctx.rank + n - root) % n;
    let real = |v: usize| (v + root) % n;
    let mut scratch = HostBuffer::zeros(ctx.dtype, buf.len() / ctx.dtype.size_bytes());
    let incoming = scratch.bytes_mut();
    let mut mask = 1;
    while mask < n {
        if v & mask == 0 {
            let child = v | mask;
            if child < n {
                ctx.run(vec![ctx.recv(real(child), mask.trailing_zeros(), incoming)])?;
                reduce_into(ctx.dtype, op, buf, incoming);
            }
        } else {
            ctx.run(vec![ctx.send(real(v & !mask), mask.trailing_zeros(), buf)])?;
            break;
        }
        mask <<= 1;
    }
    if v == 0 && op == ReduceOp::Avg {
        finish_avg(ctx.dtype, buf, n);
    }
    Ok(())
}
