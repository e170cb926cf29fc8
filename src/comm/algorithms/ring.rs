//! Ring algorithms: bandwidth-optimal for large buffers.
//!
//! All-reduce is a reduce-scatter followed by an all-gather (Patarasuk and Yuan). The buffer is
//! split into one chunk per rank; in each of the n-1 reduce-scatter steps a rank sends one chunk to
//! its right neighbour while it receives another from its left one and reduces it in, segment by
//! segment, so sending, receiving and reducing overlap. After them every rank owns one fully
//! reduced chunk, which n-1 all-gather steps pass around the ring. Each rank sends and receives
//! 2(n-1)/n of the buffer: the bus-bandwidth factor nccl-tests reports.

use crate::transport::TransportError;

use super::super::dtype::ReduceOp;
use super::super::reduce::finish_avg;
use super::{chunks_mut, reducer, split_disjoint, Ctx};

fn neighbours(ctx: &Ctx<'_>) -> (usize, usize) {
    let n = ctx.size();
    ((ctx.rank + n - 1) % n, (ctx.rank + 1) % n)
}

/// Reduce-scatter in place. `first_step` numbers the frames. On return rank r holds the reduced
/// chunk `(r + 1 + shift) % n`; `shift = n - 1` leaves chunk r at rank r.
fn reduce_scatter_in_place(
    ctx: &Ctx<'_>,
    op: ReduceOp,
    buf: &mut [u8],
    chunks: &[std::ops::Range<usize>],
    shift: usize,
) -> Result<(), TransportError> {
    let n = ctx.size();
    let (left, right) = neighbours(ctx);
    let reduce = reducer(ctx.dtype, op);
    for step in 0..n - 1 {
        let send_chunk = (ctx.rank + shift + n - step) % n;
        let recv_chunk = (ctx.rank + shift + 2 * n - step - 1) % n;
        let (outgoing, incoming) = split_disjoint(buf, chunks[send_chunk].clone(), chunks[recv_chunk].clone());
        ctx.run(vec![
            ctx.send(right, step as u32, outgoing),
            ctx.recv_reduce(left, step as u32, incoming, &reduce),
        ])?;
    }
    Ok(())
}

/// All-gather in place: rank r starts owning chunk `(r + owned_shift) % n`.
fn all_gather_in_place(
    ctx: &Ctx<'_>,
    buf: &mut [u8],
    chunks: &[std::ops::Range<usize>],
    owned_shift: usize,
    first_step: u32,
) -> Result<(), TransportError> {
    let n = ctx.size();
    let (left, right) = neighbours(ctx);
    for step in 0..n - 1 {
        let send_chunk = (ctx.rank + owned_shift + n - step) % n;
        let recv_chunk = (ctx.rank + owned_shift + 2 * n - step - 1) % n;
        let (outgoing, incoming) = split_disjoint(buf, chunks[send_chunk].clone(), chunks[recv_chunk].clone());
        let tag = first_step + step as u32;
        ctx.run(vec![ctx.send(right, tag, outgoing), ctx.recv(left, tag, incoming)])?;
    }
    Ok(())
}

/// Ring all-reduce of `buf` (whole elements of `ctx.dtype`).
pub(crate) fn all_reduce(ctx: &Ctx<'_>, op: ReduceOp, buf: &mut [u8]) -> Result<(), TransportError> {
    let n = ctx.size();
    let numel = buf.len() / ctx.dtype.size_bytes();
    let chunks = ctx.chunks(numel, n);
    reduce_scatter_in_place(ctx, op, buf, &chunks, 0)?;
    let owned = (ctx.rank + 1) % n;
    if op == ReduceOp::Avg {
        finish_avg(ctx.dtype, &mut buf[chunks[owned].clone()], n);
    }
    all_gather_in_place(ctx, buf, &chunks, 1, (n - 1) as u32)
}

/// Ring reduce-scatter of `work` (a scratch copy of the input): on return chunk `rank` of `work`
/// is the reduced result.
pub(crate) fn reduce_scatter(ctx: &Ctx<'_>, op: ReduceOp, work: &mut [u8]) -> Result<(), TransportError> {
    let n = ctx.size();
    let numel = work.len() / ctx.dtype.size_bytes();
    let chunks = ctx.chunks(numel, n);
    reduce_scatter_in_place(ctx, op, work, &chunks, n - 1)?;
    if op == ReduceOp::Avg {
        finish_avg(ctx.dtype, &mut work[chunks[ctx.rank].clone()], n);
    }
    Ok(())
}

/// Ring all-gather: `output` holds this rank's block at chunk `rank` on entry, every block on
/// return.
pub(crate) fn all_gather(ctx: &Ctx<'_>, output: &mut [u8]) -> Result<(), TransportError> {
    let n = ctx.size();
    let numel = output.len() / ctx.dtype.size_bytes();
    let chunks = ctx.chunks(numel, n);
    all_gather_in_place(ctx, output, &chunks, 0, 0)
}

/// Reduce to `root` for large buffers: ring reduce-scatter, then every rank sends its reduced
/// chunk to the root.
pub(crate) fn reduce(ctx: &Ctx<'_>, op: ReduceOp, root: usize, buf: &mut [u8]) -> Result<(), TransportError> {
    let n = ctx.size();
    let numel = buf.len() / ctx.dtype.size_bytes();
    let chunks = ctx.chunks(numel, n);
    reduce_scatter_in_place(ctx, op, buf, &chunks, 0)?;
    let owned = (ctx.rank + 1) % n;
    let gather_step = (n - 1) as u32;
    if ctx.rank == root {
        let ops = chunks_mut(buf, &chunks)
            .into_iter()
            .enumerate()
            .filter(|(chunk, _)| *chunk != owned)
            // Chunk c was reduced by rank c - 1.
            .map(|(chunk, part)| ctx.recv((chunk + n - 1) % n, gather_step, part))
            .collect();
        ctx.run(ops)?;
        if op == ReduceOp::Avg {
            finish_avg(ctx.dtype, buf, n);
        }
        Ok(())
    } else {
        ctx.run(vec![ctx.send(root, gather_step, &buf[chunks[owned].clone()])])
    }
}

/// Broadcast for large buffers (van de Geijn): the root scatters one chunk to each rank, then a
/// ring all-gather completes every copy. Each link carries about 2x the buffer instead of the
/// tree's log2(n) x.
pub(crate) fn scatter_allgather_broadcast(ctx: &Ctx<'_>, root: usize, buf: &mut [u8]) -> Result<(), TransportError> {
    let n = ctx.size();
    let numel = buf.len() / ctx.dtype.size_bytes();
    let chunks = ctx.chunks(numel, n);
    // Rank r receives chunk r, which the all-gather then passes around.
    if ctx.rank == root {
        let ops = (0..n)
            .filter(|&r| r != root)
            .map(|r| ctx.send(r, 0, &buf[chunks[r].clone()]))
            .collect();
        ctx.run(ops)?;
    } else {
        let range = chunks[ctx.rank].clone();
        ctx.run(vec![ctx.recv(root, 0, &mut buf[range])])?;
    }
    all_gather_in_place(ctx, buf, &chunks, 0, 1)
}
