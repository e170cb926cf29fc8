//! Collective algorithms, written against the transport's batches of sends and receives only.
//!
//! Each function runs one collective for one rank of a group. Ranks are group ranks; the context
//! maps them to transport peers, stamps every frame with the operation's key and fingerprint,
//! and carries the deadline.

mod direct;
mod doubling;
mod hier;
mod pairwise;
mod ring;
mod tree;

pub(crate) use direct::{
    all_reduce as direct_all_reduce, MAX_BYTES as DIRECT_MAX_BYTES, MAX_RANKS as DIRECT_MAX_RANKS,
};
pub(crate) use doubling::all_reduce as doubling_all_reduce;
pub(crate) use hier::{all_reduce as hier_all_reduce, broadcast as hier_broadcast, HostLayout};
pub(crate) use pairwise::all_to_all;
pub(crate) use ring::{all_gather as ring_all_gather, all_reduce as ring_all_reduce};
pub(crate) use ring::{reduce as ring_reduce, reduce_scatter as ring_reduce_scatter};
pub(crate) use tree::{broadcast as tree_broadcast, reduce as tree_reduce};

pub(crate) use ring::scatter_allgather_broadcast;

use std::ops::Range;

use crate::transport::{Deadline, Drain, Mesh, Op, Reducer, Reduction, Tag, TransportError};

use super::dtype::{DType, ReduceOp};
use super::reduce::reduce_into;

/// One collective call's view of the group.
pub(crate) struct Ctx<'a> {
    pub(crate) mesh: &'a Mesh,
    /// Transport peer of each group rank.
    pub(crate) members: &'a [usize],
    /// This rank in the group.
    pub(crate) rank: usize,
    pub(crate) key: u64,
    /// Added to every step number: the phases of a composite algorithm (`hier`) run the
    /// algorithms above on sub-contexts under the same key, each in its own range of steps.
    pub(crate) step_base: u32,
    pub(crate) fingerprint: u64,
    /// The call's deadline (fixed at its first wait).
    pub(crate) deadline: &'a Deadline,
    /// What a blocked send reads meanwhile (`Drain::BatchPairs` on a thread that shares the
    /// rank's pairs with another thread of the same call).
    pub(crate) drain: Drain,
    /// Frame size of pipelined transfers (a multiple of 8 bytes).
    pub(crate) segment_bytes: usize,
    pub(crate) dtype: DType,
}

impl<'a> Ctx<'a> {
    pub(crate) fn size(&self) -> usize {
        self.members.len()
    }

    fn tag(&self, step: u32) -> Tag {
        Tag {
            key: self.key,
            step: self.step_base + step,
        }
    }

    /// The same call seen by a subset of the group: `members` are the transport peers of the
    /// subset, `rank` this rank's place in it, and its steps start at `step_base` (relative to
    /// this context's).
    pub(crate) fn subset<'m>(&'m self, members: &'m [usize], rank: usize, step_base: u32) -> Ctx<'m> {
        Ctx {
            mesh: self.mesh,
            members,
            rank,
            key: self.key,
            step_base: self.step_base + step_base,
            fingerprint: self.fingerprint,
            deadline: self.deadline,
            drain: self.drain,
            segment_bytes: self.segment_bytes,
            dtype: self.dtype,
        }
    }

    pub(crate) fn send<'b>(&self, to: usize, step: u32, data: &'b [u8]) -> Op<'b> {
        Op::Send {
            peer: self.members[to],
            tag: self.tag(step),
            fingerprint: self.fingerprint,
            data,
            segment_bytes: self.segment_bytes,
        }
    }

    pub(crate) fn recv<'b>(&self, from: usize, step: u32, data: &'b mut [u8]) -> Op<'b> {
        Op::Recv {
            peer: self.members[from],
            tag: self.tag(step),
            fingerprint: self.fingerprint,
            data,
            segment_bytes: self.segment_bytes,
            reduce: None,
        }
    }

    pub(crate) fn recv_reduce<'b>(&self, from: usize, step: u32, data: &'b mut [u8], reducer: Reducer<'b>) -> Op<'b> {
        Op::Recv {
            peer: self.members[from],
            tag: self.tag(step),
            fingerprint: self.fingerprint,
            data,
            segment_bytes: self.segment_bytes,
            reduce: Some(Reduction {
                combine: reducer,
                elem_bytes: self.dtype.size_bytes(),
            }),
        }
    }

    pub(crate) fn run(&self, ops: Vec<Op<'_>>) -> Result<(), TransportError> {
        if ops.is_empty() {
            return Ok(());
        }
        self.mesh.exchange_with(ops, self.deadline, self.drain)
    }

    /// This context, its blocked sends draining only their own batch's pairs.
    pub(crate) fn draining_batch_only(&self) -> Ctx<'a> {
        Ctx {
            drain: Drain::BatchPairs,
            ..*self
        }
    }

    /// Sends `data` to `to` as one frame by the eager path when it can (a small buffer to a
    /// same-host peer: `transport::eager`), else through the engine. Only for buffers a single
    /// frame carries; the engine's result is the same either way.
    pub(crate) fn send_now(&self, to: usize, step: u32, data: &[u8]) -> Result<(), TransportError> {
        let (peer, tag) = (self.members[to], self.tag(step));
        if self
            .mesh
            .send_eager(peer, tag, self.fingerprint, data, self.segment_bytes)
        {
            return Ok(());
        }
        self.run(vec![self.send(to, step, data)])
    }

    /// Receives from `from` into `data` (combined into it with `reducer`) by the eager path when
    /// it can, else through the engine (see [`Ctx::send_now`]).
    pub(crate) fn recv_now(
        &self,
        from: usize,
        step: u32,
        data: &mut [u8],
        reducer: Option<Reducer<'_>>,
    ) -> Result<(), TransportError> {
        let (peer, tag) = (self.members[from], self.tag(step));
        let reduce = reducer.map(|combine| Reduction {
            combine,
            elem_bytes: self.dtype.size_bytes(),
        });
        if self
            .mesh
            .recv_eager(peer, tag, self.fingerprint, data, reduce, self.segment_bytes)
        {
            return Ok(());
        }
        let op = match reducer {
            Some(r) => self.recv_reduce(from, step, data, r),
            None => self.recv(from, step, data),
        };
        self.run(vec![op])
    }

    /// Byte ranges of `parts` nearly equal chunks of `numel` elements (sizes differ by at most one
    /// element, larger ones first).
    pub(crate) fn chunks(&self, numel: usize, parts: usize) -> Vec<Range<usize>> {
        let elem = self.dtype.size_bytes();
        let (base, extra) = (numel / parts, numel % parts);
        let mut start = 0;
        (0..parts)
            .map(|i| {
                let len = base + usize::from(i < extra);
                let range = start * elem..(start + len) * elem;
                start += len;
                range
            })
            .collect()
    }
}

/// A reducer for `dtype`/`op` in the transport's callback shape.
pub(crate) fn reducer(dtype: DType, op: ReduceOp) -> impl Fn(&mut [u8], &[u8]) + Sync {
    move |dst: &mut [u8], src: &[u8]| reduce_into(dtype, op, dst, src)
}

/// Splits `buf` into a shared view of `read` and a mutable view of `write`; the ranges must not
/// overlap (the ring sends one chunk while it receives another).
pub(crate) fn split_disjoint(buf: &mut [u8], read: Range<usize>, write: Range<usize>) -> (&[u8], &mut [u8]) {
    assert!(read.end <= write.start || write.end <= read.start || read.is_empty() || write.is_empty());
    if read.is_empty() {
        return (&[], &mut buf[write]);
    }
    if write.is_empty() {
        return (&buf[read], &mut []);
    }
    if read.start < write.start {
        let (left, right) = buf.split_at_mut(write.start);
        (&left[read], &mut right[..write.end - write.start])
    } else {
        let (left, right) = buf.split_at_mut(read.start);
        (&right[..read.end - read.start], &mut left[write])
    }
}

/// Cuts `buf` into the mutable parts named by `chunks` (contiguous ranges covering it in order).
pub(crate) fn chunks_mut<'b>(buf: &'b mut [u8], chunks: &[Range<usize>]) -> Vec<&'b mut [u8]> {
    let mut out = Vec::with_capacity(chunks.len());
    let mut rest = buf;
    for range in chunks {
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(range.len());
        out.push(head);
        rest = tail;
    }
    out
}
