//! Hierarchical all-reduce: for a group whose ranks sit on several hosts, reduce inside each
//! host over shared memory first, so the slow links between hosts carry each byte once per host
//! instead of once per rank.
//!
//! A flat ring over n ranks on H hosts crosses a host boundary at H of its n links; the ranks at
//! those links send 2(n-1)/n of the buffer each, so every host pushes about 2x the buffer out
//! through one rank while its other ranks' network links stay idle. Here:
//!
//! - Let L_h be the number of the group's ranks on host h and M = max L_h. The buffer is cut into
//!   M nearly equal chunks; on host h, local rank j (position among the group's ranks of h, in
//!   group-rank order) owns the chunks c with c mod L_h == j. A host with fewer ranks gives some
//!   of them several chunks, so every host has exactly one owner of every chunk.
//! - Phase 1, inside each host (a direct reduce-scatter): in round r = 1..L_h local rank j sends
//!   the chunks owned by local rank j+r to it and reduces the chunks it owns with what local rank
//!   j-r sends, straight out of the ring. Afterwards each owner holds its chunks reduced over its
//!   host.
//! - Phase 2, across hosts: for every chunk, its H owners (one per host) all-reduce it among
//!   themselves with the flat algorithms (ring for large chunks, recursive doubling for small
//!   ones). Different local ranks own different chunks, so up to M inter-host all-reduces run at
//!   once, each over its own connections. Each host sends 2(H-1)/H of the buffer in all, the
//!   minimum for any all-reduce between H hosts, spread over its ranks.
//! - Phase 3, inside each host (a direct all-gather): every owner sends its finished chunks to
//!   the other local ranks.
//!
//! Replicas are bit-identical: a chunk's final value is computed once, by the inter-host
//! all-reduce, which leaves identical bits on its participants (see `ring` and `doubling`); an
//! average divides those identical bits the same way on each owner; phase 3 only copies.
//!
//! Every phase runs under the call's key and fingerprint, in its own steps: phase 1 sends chunk
//! c as step c, phase 3 as step M + c, and chunk c's inter-host all-reduce takes the steps from
//! 2M + c * span on (`span` covers every step the ring or doubling can use).
//!
//! Broadcast goes the same way round, without chunks: among one leader per host, then inside
//! each host (see [`broadcast`]).

use std::collections::HashMap;

use crate::transport::TransportError;

use super::super::dtype::ReduceOp;
use super::super::reduce::finish_avg;
use super::{chunks_mut, doubling, reducer, Ctx};

/// Where a group's ranks sit: the group's ranks of each host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HostLayout {
    /// Group ranks of each host, in group-rank order; hosts in the order of their first rank.
    locals: Vec<Vec<usize>>,
    /// Host (index into `locals`) of each group rank.
    host_of: Vec<usize>,
    /// Position of each group rank among its host's ranks.
    local_of: Vec<usize>,
}

impl HostLayout {
    /// The layout of a group whose rank i sits on host `hosts[i]` (any labels; equal labels mean
    /// the same host).
    pub(crate) fn new(hosts: &[usize]) -> Self {
        let mut index: HashMap<usize, usize> = HashMap::new();
        let mut locals: Vec<Vec<usize>> = Vec::new();
        let mut host_of = Vec::with_capacity(hosts.len());
        let mut local_of = Vec::with_capacity(hosts.len());
        for (rank, label) in hosts.iter().enumerate() {
            let host = *index.entry(*label).or_insert_with(|| {
                locals.push(Vec::new());
                locals.len() - 1
            });
            local_of.push(locals[host].len());
            locals[host].push(rank);
            host_of.push(host);
        }
        Self {
            locals,
            host_of,
            local_of,
        }
    }

    /// Number of hosts the group spans.
    pub(crate) fn hosts(&self) -> usize {
        self.locals.len()
    }

    /// The most ranks of the group on one host (M, the number of chunks).
    pub(crate) fn max_local(&self) -> usize {
        self.locals.iter().map(Vec::len).max().unwrap_or(0)
    }

    /// Whether the hierarchical all-reduce differs from the flat one and can run: the group spans
    /// two hosts or more, one of them holds two of its ranks or more, and the steps of all phases
    /// fit in a frame's 32-bit step number (they do below tens of millions of ranks).
    pub(crate) fn is_hierarchical(&self) -> bool {
        self.hosts() >= 2 && self.max_local() >= 2 && last_step(self.max_local(), self.hosts()) <= u64::from(u32::MAX)
    }
}

/// Steps one chunk's inter-host all-reduce among `hosts` owners may use: the ring's 2(H-1), or
/// recursive doubling's.
fn span(hosts: usize) -> u64 {
    (2 * hosts as u64).max(u64::from(doubling::STEPS))
}

/// One past the last step number of an all-reduce over `chunks` chunks and `hosts` hosts.
fn last_step(chunks: usize, hosts: usize) -> u64 {
    2 * chunks as u64 + chunks as u64 * span(hosts)
}

/// Buffers of at least this many bytes are all-reduced in [`PIPELINE_PIECES`] pieces, pipelined:
/// while one piece crosses hosts (phase 2, on a thread of its own), the next one is reduced inside
/// the host and the one before is copied back (phases 1 and 3, on the calling thread), so the
/// link is busy for all but one piece's phases 1 and 3 instead of waiting through all of them.
/// Below this, the phases inside a host take a few percent of a call on a 1 Gbit/s link and the
/// thread costs more than it saves.
pub(crate) const PIPELINE_MIN_BYTES: usize = 4 << 20;
/// Pieces of a pipelined all-reduce: the link then idles for an eighth of one buffer's phases 1
/// and 3 instead of all of them. Measured on two nodes of two ranks over 1 Gbit/s
/// (`benches/shaped_allreduce.py`, 16-64 MiB): 0.92-0.96 of the link's bound unpipelined, 0.97
/// with 4 pieces, 0.99 with 8.
const PIPELINE_PIECES: usize = 8;

/// What every phase of one rank's hierarchical all-reduce needs to know.
struct Plan<'l> {
    layout: &'l HostLayout,
    op: ReduceOp,
    /// `op`, except that an average sums through phases 1 and 2 and divides once, by the whole
    /// group's size.
    combine: ReduceOp,
    ring_threshold_bytes: usize,
}

impl Plan<'_> {
    /// Phase 1: reduce-scatter of `buf` inside the host. Empty chunks (fewer elements than M) are
    /// skipped: every rank cuts the same chunks, so both ends of a transfer skip it alike.
    fn reduce_inside(&self, ctx: &Ctx<'_>, buf: &mut [u8]) -> Result<(), TransportError> {
        let local = &self.layout.locals[self.layout.host_of[ctx.rank]];
        let (l, j) = (local.len(), self.layout.local_of[ctx.rank]);
        let chunks = ctx.chunks(buf.len() / ctx.dtype.size_bytes(), self.layout.max_local());
        let reduce = reducer(ctx.dtype, self.combine);
        for r in 1..l {
            let (to, from) = ((j + r) % l, (j + l - r) % l);
            let mut ops = Vec::new();
            for (c, part) in chunks_mut(buf, &chunks).into_iter().enumerate() {
                if part.is_empty() {
                    continue;
                }
                let owner = c % l;
                if owner == to {
                    ops.push(ctx.send(local[to], c as u32, part));
                } else if owner == j {
                    ops.push(ctx.recv_reduce(local[from], c as u32, part, &reduce));
                }
            }
            ctx.run(ops)?;
        }
        Ok(())
    }

    /// Phase 2: each owned chunk of `buf`, in increasing order, all-reduced among its owners on
    /// all hosts. No cycle of waits can form: the all-reduce of chunk c waits only for the owners
    /// of c, each of which reaches it once its own chunks below c are done; the all-reduce of the
    /// smallest chunk has every owner there (it is each one's first), so by induction on c every
    /// one completes. Frames a peer sends early, for a later chunk, wait under their own step.
    fn reduce_across(&self, ctx: &Ctx<'_>, buf: &mut [u8]) -> Result<(), TransportError> {
        let layout = self.layout;
        let elem = ctx.dtype.size_bytes();
        let host = layout.host_of[ctx.rank];
        let (l, j, m, hosts) = (
            layout.locals[host].len(),
            layout.local_of[ctx.rank],
            layout.max_local(),
            layout.hosts(),
        );
        let (phase2_base, span) = (2 * m as u32, span(hosts) as u32);
        let chunks = ctx.chunks(buf.len() / elem, m);
        let mut owners = Vec::with_capacity(hosts);
        for c in (j..m).step_by(l) {
            let range = chunks[c].clone();
            if range.is_empty() {
                continue;
            }
            owners.clear();
            owners.extend(layout.locals.iter().map(|ranks| ctx.members[ranks[c % ranks.len()]]));
            let sub = ctx.subset(&owners, host, phase2_base + c as u32 * span);
            let part = &mut buf[range];
            if part.len() >= self.ring_threshold_bytes && part.len() / elem >= hosts {
                super::ring_all_reduce(&sub, self.combine, part)?;
            } else {
                super::doubling_all_reduce(&sub, self.combine, part)?;
            }
            if self.op == ReduceOp::Avg {
                finish_avg(ctx.dtype, part, ctx.size());
            }
        }
        Ok(())
    }

    /// Phase 3: all-gather of `buf` inside the host, every transfer at once.
    fn gather_inside(&self, ctx: &Ctx<'_>, buf: &mut [u8]) -> Result<(), TransportError> {
        let local = &self.layout.locals[self.layout.host_of[ctx.rank]];
        let (l, j, m) = (local.len(), self.layout.local_of[ctx.rank], self.layout.max_local());
        let chunks = ctx.chunks(buf.len() / ctx.dtype.size_bytes(), m);
        let mut ops = Vec::new();
        for (c, part) in chunks_mut(buf, &chunks).into_iter().enumerate() {
            if part.is_empty() || l == 1 {
                continue;
            }
            let owner = c % l;
            let step = m as u32 + c as u32;
            if owner == j {
                let part: &[u8] = part;
                for &peer in local.iter().filter(|&&g| g != ctx.rank) {
                    ops.push(ctx.send(peer, step, part));
                }
            } else {
                ops.push(ctx.recv(local[owner], step, part));
            }
        }
        ctx.run(ops)
    }
}

/// Hierarchical all-reduce of `buf` (whole elements of `ctx.dtype`) over a group laid out as
/// `layout` says ([`HostLayout::is_hierarchical`] must hold). Chunks of at least
/// `ring_threshold_bytes` (and one element per host) cross hosts by ring, smaller ones by
/// recursive doubling. From [`PIPELINE_MIN_BYTES`] up, pipelined in pieces.
pub(crate) fn all_reduce(
    ctx: &Ctx<'_>,
    layout: &HostLayout,
    op: ReduceOp,
    buf: &mut [u8],
    ring_threshold_bytes: usize,
) -> Result<(), TransportError> {
    let (m, hosts) = (layout.max_local(), layout.hosts());
    // Invariant: `is_hierarchical` checked that every step number of one piece fits in a u32.
    debug_assert!(last_step(m, hosts) <= u64::from(u32::MAX));
    let plan = Plan {
        layout,
        op,
        combine: if op == ReduceOp::Avg { ReduceOp::Sum } else { op },
        ring_threshold_bytes,
    };
    let numel = buf.len() / ctx.dtype.size_bytes();
    let per_piece = last_step(m, hosts);
    let pipelined = buf.len() >= PIPELINE_MIN_BYTES
        && numel >= PIPELINE_PIECES * m * hosts
        && per_piece * PIPELINE_PIECES as u64 <= u64::from(u32::MAX);
    if !pipelined {
        plan.reduce_inside(ctx, buf)?;
        plan.reduce_across(ctx, buf)?;
        return plan.gather_inside(ctx, buf);
    }
    // Piece p runs under steps from p * per_piece on. The calling thread runs every rank's
    // phases 1 and 3 in the same order (1 of piece p, then 3 of piece p - 1), so the ranks of a
    // host never wait on each other in a cycle; phase 2 waits only for other hosts' phase 2 of
    // the same piece, which their phase 1 feeds without waiting for anything of ours.
    let pieces = ctx.chunks(numel, PIPELINE_PIECES);
    // Two threads of this rank at once, on different pairs: neither may drain the other's.
    let ctx = &ctx.draining_batch_only();
    let step_base = |p: usize| (p as u64 * per_piece) as u32;
    let members = ctx.members;
    std::thread::scope(|scope| {
        let (to_across, across_rx) = std::sync::mpsc::channel::<(usize, &mut [u8])>();
        let (to_inside, inside_rx) = std::sync::mpsc::channel::<(usize, &mut [u8])>();
        let plan = &plan;
        let across = scope.spawn(move || -> Result<(), TransportError> {
            for (p, piece) in across_rx {
                plan.reduce_across(&ctx.subset(members, ctx.rank, step_base(p)), piece)?;
                if to_inside.send((p, piece)).is_err() {
                    break;
                }
            }
            Ok(())
        });
        let inside = || -> Result<(), TransportError> {
            let back = |expected: usize| -> Result<(), TransportError> {
                // The phase-2 thread hands every piece back in order, unless it failed (its
                // error is the one to report: this one only says it stopped).
                let Ok((p, piece)) = inside_rx.recv() else {
                    return Ok(());
                };
                debug_assert_eq!(p, expected);
                plan.gather_inside(&ctx.subset(members, ctx.rank, step_base(p)), piece)
            };
            for (p, piece) in chunks_mut(buf, &pieces).into_iter().enumerate() {
                plan.reduce_inside(&ctx.subset(members, ctx.rank, step_base(p)), piece)?;
                if to_across.send((p, piece)).is_err() {
                    return Ok(());
                }
                if p > 0 {
                    back(p - 1)?;
                }
            }
            drop(to_across);
            back(PIPELINE_PIECES - 1)
        };
        let inside_result = inside();
        let across_result = across.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        across_result.and(inside_result)
    })
}

/// Hierarchical broadcast from group rank `root`: first among one leader per host (the root on
/// its own host, the first of the group's ranks on each other one), then inside each host from
/// its leader. The buffer crosses into each host once (twice per host boundary with the
/// scatter + all-gather among leaders) instead of wherever the flat tree or ring happens to cross.
/// `large` picks scatter + ring all-gather over the binomial tree, in each phase where it has
/// more than two ranks and one element per rank; the inside phase starts its steps after the
/// leaders' (which use fewer than H).
pub(crate) fn broadcast(
    ctx: &Ctx<'_>,
    layout: &HostLayout,
    root: usize,
    buf: &mut [u8],
    large: bool,
) -> Result<(), TransportError> {
    let numel = buf.len() / ctx.dtype.size_bytes();
    let root_host = layout.host_of[root];
    let leader = |h: usize| if h == root_host { root } else { layout.locals[h][0] };
    let host = layout.host_of[ctx.rank];
    let flat = |sub: &Ctx<'_>, from: usize, buf: &mut [u8]| {
        if sub.size() == 1 {
            Ok(())
        } else if large && sub.size() > 2 && numel >= sub.size() {
            super::scatter_allgather_broadcast(sub, from, buf)
        } else {
            super::tree_broadcast(sub, from, buf)
        }
    };
    if ctx.rank == leader(host) {
        let leaders: Vec<usize> = (0..layout.hosts()).map(|h| ctx.members[leader(h)]).collect();
        flat(&ctx.subset(&leaders, host, 0), root_host, buf)?;
    }
    let locals: Vec<usize> = layout.locals[host].iter().map(|&g| ctx.members[g]).collect();
    let sub = ctx.subset(&locals, layout.local_of[ctx.rank], layout.hosts() as u32);
    flat(&sub, layout.local_of[leader(host)], buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_numbers_hosts_by_their_first_rank_and_ranks_within_each_host() {
        let layout = HostLayout::new(&[7, 3, 7, 9, 3]);
        assert_eq!(layout.locals, vec![vec![0, 2], vec![1, 4], vec![3]]);
        assert_eq!(layout.host_of, vec![0, 1, 0, 2, 1]);
        assert_eq!(layout.local_of, vec![0, 0, 1, 0, 1]);
        assert_eq!((layout.hosts(), layout.max_local()), (3, 2));
        assert!(layout.is_hierarchical());
    }

    #[test]
    fn one_host_or_one_rank_per_host_is_not_hierarchical() {
        assert!(!HostLayout::new(&[0, 0, 0]).is_hierarchical());
        assert!(!HostLayout::new(&[0, 1, 2]).is_hierarchical());
        assert!(!HostLayout::new(&[5]).is_hierarchical());
        assert!(HostLayout::new(&[0, 0, 1]).is_hierarchical());
    }
}
