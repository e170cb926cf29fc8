//! The CPU engine: our algorithms over TCP pairs.
//!
//! Algorithm choice (logged at debug level per call, documented in the README):
//! - all-reduce: direct (every rank sends to every other, `algorithms/direct.rs`) for buffers
//!   of at most 1 KiB among 3 to 8 ranks of one host; recursive doubling below
//!   `ring_threshold_bytes`, ring (reduce-scatter +
//!   all-gather) from there up or, when the group spans several hosts and one of them holds two
//!   of its ranks or more, hierarchical (`algorithms/hier.rs`: reduce inside each host,
//!   all-reduce across hosts, copy back inside each host; [`Hierarchy`] forces it on or off);
//! - broadcast: binomial tree below the threshold, scatter + ring all-gather above; hierarchical
//!   (among one leader per host, then inside each host, each phase by tree or scatter +
//!   all-gather) under the same rule as all-reduce;
//! - reduce: binomial tree below, ring reduce-scatter + gather above;
//! - all-gather, reduce-scatter: ring; all-to-all: all pairs at once; barrier: a one-byte
//!   all-reduce.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::transport::{Deadline, Mesh, TransportError};

use super::algorithms::{self as alg, Ctx, HostLayout};
use super::buffer::{blocks_mismatch, BufMut, BufRef, HostBuffer, Memory, MemoryMut};
use super::communicator::{CommError, Communicator};
use super::dtype::{DType, ReduceOp};
use super::fingerprint::{collective_key, collective_seq, describe, describe_key, fingerprint, p2p_key, OpKind};

/// Default all-reduce switch point from recursive doubling to ring, in bytes. Measured with
/// `benches/sweep_allreduce.py` (threshold forced to 0 and to `usize::MAX`, f32, loopback, 2 cores):
/// recursive doubling wins at 64 KiB and below for 2, 3 and 4 ranks, ring at 256 KiB and above,
/// 128 KiB is a tie; broadcast's tree/scatter-all-gather switch falls at the same size.
pub const DEFAULT_RING_THRESHOLD_BYTES: usize = 128 * 1024;
/// Default frame size of the pipelined algorithms (256 KiB to 1 MiB measure alike on loopback;
/// 64 KiB costs more CPU per byte, 4 MiB pipelines too coarsely).
pub const DEFAULT_SEGMENT_BYTES: usize = 512 * 1024;

/// Tunables of the CPU engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// All-reduce/broadcast/reduce use the latency algorithms below this size.
    pub ring_threshold_bytes: usize,
    /// Frame size of pipelined transfers (rounded down to a multiple of 8, at least 8).
    pub segment_bytes: usize,
    /// When all-reduce and broadcast go hierarchical for a group that spans several hosts.
    pub hierarchical: Hierarchy,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            ring_threshold_bytes: DEFAULT_RING_THRESHOLD_BYTES,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            hierarchical: Hierarchy::Auto,
        }
    }
}

/// When all-reduce reduces inside each host before crossing hosts, and broadcast crosses hosts
/// once per host before it spreads inside each (`algorithms/hier.rs`). It only ever applies to
/// a group that spans two hosts or more with two of its ranks or more on one of them: otherwise
/// it would be the flat algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Hierarchy {
    /// For buffers of at least `ring_threshold_bytes`; below, recursive doubling's latency wins.
    #[default]
    Auto,
    /// For buffers of any size (tests, benchmarks).
    Always,
    /// Never: the flat ring or recursive doubling over all ranks.
    Never,
}

impl Hierarchy {
    /// From a three-way switch, as `BURNRUN_HIERARCHICAL` reads: `None` (auto) is `Auto`,
    /// `Some(true)` (on) `Always`, `Some(false)` (off) `Never`.
    pub(crate) fn from_switch(on: Option<bool>) -> Self {
        match on {
            None => Hierarchy::Auto,
            Some(true) => Hierarchy::Always,
            Some(false) => Hierarchy::Never,
        }
    }

    /// The name `BURNRUN_HIERARCHICAL` and `comm.hierarchical` give it.
    pub fn name(self) -> &'static str {
        match self {
            Hierarchy::Auto => "auto",
            Hierarchy::Always => "on",
            Hierarchy::Never => "off",
        }
    }
}

/// A group's communicator on the CPU engine.
#[derive(Debug)]
pub(crate) struct HostComm {
    mesh: Arc<Mesh>,
    /// Transport peer (global rank) of each group rank.
    members: Vec<usize>,
    /// Host index of each global rank (equal: same host), shared by the world and its
    /// sub-groups.
    world_hosts: Arc<[usize]>,
    /// Where this group's ranks sit (from `world_hosts`).
    layout: HostLayout,
    rank: usize,
    group_id: u64,
    seq: AtomicU64,
    groups_created: AtomicU64,
    timeout: Duration,
    tuning: Tuning,
    /// The first failure of a transfer. The pairs involved may hold half a frame and the peers
    /// saw the failure too, so every later call fails at once with `CommError::Poisoned` instead
    /// of waiting on a group that can no longer agree.
    failure: Mutex<Option<String>>,
    /// Set with `failure`: the usual call checks this flag, not the lock.
    poisoned: AtomicBool,
    /// The last [`RECENT_CALLS`] collectives, slot `seq % RECENT_CALLS`: to name this rank's
    /// call when a peer's frame of an earlier one turns up unread, and whether it still runs.
    recent: Box<[RecentSlot]>,
}

/// A collective this communicator ran or runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Call {
    seq: u64,
    fingerprint: u64,
    running: bool,
}

/// One entry of [`HostComm::recent`], written by the thread that runs the call and read (for
/// diagnostics) by another only when a stash is not empty: plain atomics, no lock on the path
/// of every call. `seq_state` holds `seq << 1 | running`, plus one so that 0 means empty.
#[derive(Debug, Default)]
struct RecentSlot {
    seq_state: AtomicU64,
    fingerprint: AtomicU64,
}

impl RecentSlot {
    fn store(&self, call: Call) {
        self.fingerprint.store(call.fingerprint, Ordering::Relaxed);
        let state = (call.seq << 1 | u64::from(call.running)) + 1;
        self.seq_state.store(state, Ordering::Release);
    }

    fn load(&self, seq: u64) -> Option<Call> {
        let state = self.seq_state.load(Ordering::Acquire).checked_sub(1)?;
        (state >> 1 == seq).then(|| Call {
            seq,
            fingerprint: self.fingerprint.load(Ordering::Relaxed),
            running: state & 1 == 1,
        })
    }
}

/// The all-reduce algorithm one call runs (see the module doc).
#[derive(Debug, Clone, Copy)]
enum AllReduce {
    /// A group of one: nothing to do.
    Local,
    /// `algorithms/hier.rs`.
    Hierarchical,
    /// Flat ring.
    Ring,
    /// Flat recursive doubling.
    Doubling,
    /// Every rank to every rank (`algorithms/direct.rs`).
    Direct,
}

/// How many past collectives [`HostComm`] remembers for error messages. Calls of one
/// communicator run one after another (async ones on its executor, in order) or two at a time
/// (a synchronous call beside the executor's), so a call still running is never overwritten.
const RECENT_CALLS: usize = 64;

impl HostComm {
    /// The world communicator over `mesh`; `hosts[r]` is the host index of rank r (equal
    /// indices: same host), for every rank of the world.
    pub(crate) fn world(mesh: Arc<Mesh>, hosts: Vec<usize>, timeout: Duration, tuning: Tuning) -> Self {
        let members = (0..mesh.world_size()).collect();
        let rank = mesh.rank();
        Self::new(mesh, members, hosts.into(), rank, 0, timeout, tuning)
    }

    fn new(
        mesh: Arc<Mesh>,
        members: Vec<usize>,
        world_hosts: Arc<[usize]>,
        rank: usize,
        group_id: u64,
        timeout: Duration,
        tuning: Tuning,
    ) -> Self {
        let segment_bytes = (tuning.segment_bytes / 8 * 8).max(8);
        let hosts: Vec<usize> = members.iter().map(|&m| world_hosts[m]).collect();
        Self {
            mesh,
            members,
            layout: HostLayout::new(&hosts),
            world_hosts,
            rank,
            group_id,
            seq: AtomicU64::new(0),
            groups_created: AtomicU64::new(0),
            timeout,
            tuning: Tuning {
                segment_bytes,
                ..tuning
            },
            failure: Mutex::new(None),
            poisoned: AtomicBool::new(false),
            recent: (0..RECENT_CALLS).map(|_| RecentSlot::default()).collect(),
        }
    }

    /// Whether an all-reduce or broadcast goes hierarchical (`large`: the buffer reaches the ring
    /// threshold).
    fn hierarchical(&self, large: bool) -> bool {
        self.layout.is_hierarchical()
            && match self.tuning.hierarchical {
                Hierarchy::Auto => large,
                Hierarchy::Always => true,
                Hierarchy::Never => false,
            }
    }

    /// Whether a small all-reduce of `bytes` goes direct: 3 to 8 ranks, all on one host (the
    /// host ids every rank agrees on, so every rank chooses alike; with 2 ranks it is recursive
    /// doubling's one exchange).
    fn direct(&self, bytes: usize) -> bool {
        let n = self.members.len();
        self.layout.hosts() == 1 && (3..=alg::DIRECT_MAX_RANKS).contains(&n) && bytes <= alg::DIRECT_MAX_BYTES
    }

    /// `Err(Poisoned)` once a call of this communicator failed in transfer.
    fn usable(&self) -> Result<(), CommError> {
        if !self.poisoned.load(Ordering::Acquire) {
            return Ok(());
        }
        match &*self.failure.lock().unwrap_or_else(|p| p.into_inner()) {
            None => Ok(()),
            Some(first) => Err(CommError::Poisoned {
                rank: self.global_rank(),
                first: first.clone(),
            }),
        }
    }

    /// Records the first failure (see `failure`) and passes the error on.
    fn failed(&self, error: CommError) -> CommError {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(|| error.to_string());
        self.poisoned.store(true, Ordering::Release);
        error
    }

    fn global_rank(&self) -> usize {
        self.mesh.rank()
    }

    fn ctx<'a>(&'a self, key: u64, fingerprint: u64, dtype: DType, deadline: &'a Deadline) -> Ctx<'a> {
        Ctx {
            mesh: &self.mesh,
            members: &self.members,
            rank: self.rank,
            key,
            step_base: 0,
            fingerprint,
            deadline,
            drain: crate::transport::Drain::AllPairs,
            segment_bytes: self.tuning.segment_bytes,
            dtype,
        }
    }

    fn invalid(&self, op: OpKind, reason: String) -> CommError {
        CommError::InvalidArgument {
            rank: self.global_rank(),
            op: op.name(),
            reason,
        }
    }

    fn check_root(&self, op: OpKind, root: usize) -> Result<(), CommError> {
        if root >= self.members.len() {
            return Err(self.invalid(
                op,
                format!("root {root} is not a rank of this group of {}", self.members.len()),
            ));
        }
        Ok(())
    }

    fn host<'b>(&self, op: OpKind, memory: MemoryMut<'b>) -> Result<&'b mut [u8], CommError> {
        match memory {
            MemoryMut::Host(bytes) => Ok(bytes),
            MemoryMut::Device(_) => Err(self.unsupported_device(op)),
        }
    }

    fn host_ref<'b>(&self, op: OpKind, memory: Memory<'b>) -> Result<&'b [u8], CommError> {
        match memory {
            Memory::Host(bytes) => Ok(bytes),
            Memory::Device(_) => Err(self.unsupported_device(op)),
        }
    }

    fn unsupported_device(&self, op: OpKind) -> CommError {
        CommError::Unsupported {
            rank: self.global_rank(),
            op: op.name(),
            backend: "tcp",
            reason: "device memory needs the nccl backend (feature `cuda`)".into(),
        }
    }

    /// Runs one collective: numbers it, builds its context, maps transport errors.
    fn collective(
        &self,
        op: OpKind,
        dtype: DType,
        numel: usize,
        root: Option<usize>,
        reduce: Option<ReduceOp>,
        body: impl FnOnce(&Ctx<'_>) -> Result<(), TransportError>,
    ) -> Result<(), CommError> {
        self.usable()?;
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        if self.group_id == 0 {
            crate::fault::at_collective(seq);
        }
        let fp = fingerprint(op, dtype, numel, root, reduce);
        let deadline = Deadline::after(self.timeout);
        let ctx = self.ctx(collective_key(self.group_id, seq), fp, dtype, &deadline);
        tracing::trace!(rank = self.global_rank(), seq, call = %describe(fp), "collective");
        self.note_call(Call {
            seq,
            fingerprint: fp,
            running: true,
        });
        let slot = crate::flight::begin(self.group_id, seq, op.name(), dtype.name(), numel as u64, root);
        let result = body(&ctx);
        crate::flight::end(slot, result.is_ok());
        self.note_call(Call {
            seq,
            fingerprint: fp,
            running: false,
        });
        result.map_err(|e| self.failed(self.map_error(op, seq, fp, e)))?;
        self.check_leftovers(seq).map_err(|e| self.failed(e))
    }

    /// Records a collective's start or end in `recent`.
    fn note_call(&self, call: Call) {
        self.recent[(call.seq % RECENT_CALLS as u64) as usize].store(call);
    }

    /// What `recent` knows of collective `seq`.
    fn recent_call(&self, seq: u64) -> Option<Call> {
        self.recent[(seq % RECENT_CALLS as u64) as usize].load(seq)
    }

    /// After collective `seq` completed here: a frame of it, or of an earlier collective of this
    /// group, still unread from a peer means the ranks disagreed on a call without noticing (each
    /// rank of a broadcast that believes it is the root only sends, for instance): an error now,
    /// not silently different data.
    fn check_leftovers(&self, seq: u64) -> Result<(), CommError> {
        for &peer in self.members.iter().filter(|&&m| m != self.mesh.rank()) {
            for (tag, theirs) in self.mesh.stashed_from(peer) {
                let Some(old) = collective_seq(tag.key, self.group_id).filter(|&old| old <= seq) else {
                    continue;
                };
                let known = self.recent_call(old);
                // Another thread may still run that call (async work): its frames are not late.
                if known.is_some_and(|c| c.running) {
                    continue;
                }
                let ours = known.map_or_else(|| "a call".into(), |c| describe(c.fingerprint));
                return Err(CommError::Mismatch {
                    rank: self.global_rank(),
                    seq: old,
                    peer,
                    ours: format!("{ours}, which completed without reading it"),
                    theirs: format!("{} and sent this rank a frame of it", describe(theirs)),
                });
            }
        }
        Ok(())
    }

    fn map_error(&self, op: OpKind, seq: u64, ours: u64, error: TransportError) -> CommError {
        let rank = self.global_rank();
        match error {
            TransportError::Timeout {
                peer,
                timeout,
                stashed,
                direction,
                ..
            } => {
                let mut detail = String::new();
                if direction == "send" {
                    detail.push_str(" (it stopped reading)");
                }
                if !stashed.is_empty() {
                    let seen: Vec<String> = stashed
                        .iter()
                        .take(4)
                        .map(|(tag, fp)| format!("{} {}", describe_key(tag.key), describe(*fp)))
                        .collect();
                    detail.push_str(&format!("; meanwhile it sent: {}", seen.join(", ")));
                }
                CommError::Timeout {
                    rank,
                    op: op.name(),
                    seq,
                    peer,
                    timeout,
                    detail,
                }
            }
            TransportError::PeerLost { peer, reason, .. } => CommError::PeerLost {
                rank,
                op: op.name(),
                seq,
                peer,
                reason,
            },
            TransportError::Mismatch { peer, theirs, .. } => CommError::Mismatch {
                rank,
                seq,
                peer,
                ours: describe(ours),
                theirs: describe(theirs),
            },
            other => CommError::Transport {
                rank,
                op: op.name(),
                seq,
                source: other,
            },
        }
    }
}

impl Communicator for HostComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.members.len()
    }

    fn backend(&self) -> &'static str {
        "tcp"
    }

    fn links(&self) -> String {
        let transports = self.mesh.transports();
        let count = |kind: &str| {
            self.members
                .iter()
                .filter(|&&m| m != self.mesh.rank() && transports[m] == Some(kind))
                .count()
        };
        let parts: Vec<String> = [("shm", "shared memory"), ("tcp", "TCP")]
            .into_iter()
            .map(|(kind, name)| (count(kind), name))
            .filter(|(n, _)| *n > 0)
            .map(|(n, name)| format!("{name} to {n} peer(s)"))
            .collect();
        parts.join(", ")
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn bytes_sent(&self) -> u64 {
        self.mesh.bytes_sent()
    }

    fn bytes_sent_across_hosts(&self) -> u64 {
        let host = self.world_hosts[self.mesh.rank()];
        (0..self.mesh.world_size())
            .filter(|&peer| self.world_hosts[peer] != host)
            .map(|peer| self.mesh.bytes_sent_to(peer))
            .sum()
    }

    fn all_reduce(&self, buf: BufMut<'_>, op: ReduceOp) -> Result<(), CommError> {
        let (dtype, numel) = (buf.dtype, buf.numel);
        let bytes = self.host(OpKind::AllReduce, buf.memory)?;
        let large = bytes.len() >= self.tuning.ring_threshold_bytes;
        let algorithm = if self.members.len() == 1 {
            AllReduce::Local
        } else if self.hierarchical(large) {
            AllReduce::Hierarchical
        } else if large && numel >= self.members.len() {
            AllReduce::Ring
        } else if self.direct(bytes.len()) {
            AllReduce::Direct
        } else {
            AllReduce::Doubling
        };
        tracing::debug!(
            rank = self.global_rank(),
            group = self.group_id,
            bytes = bytes.len(),
            hosts = self.layout.hosts(),
            ?algorithm,
            "all_reduce"
        );
        let threshold = self.tuning.ring_threshold_bytes;
        self.collective(OpKind::AllReduce, dtype, numel, None, Some(op), |ctx| match algorithm {
            AllReduce::Local => Ok(()),
            AllReduce::Hierarchical => alg::hier_all_reduce(ctx, &self.layout, op, bytes, threshold),
            AllReduce::Ring => alg::ring_all_reduce(ctx, op, bytes),
            AllReduce::Doubling => alg::doubling_all_reduce(ctx, op, bytes),
            AllReduce::Direct => alg::direct_all_reduce(ctx, op, bytes),
        })
    }

    fn reduce(&self, buf: BufMut<'_>, op: ReduceOp, root: usize) -> Result<(), CommError> {
        self.check_root(OpKind::Reduce, root)?;
        let (dtype, numel) = (buf.dtype, buf.numel);
        let bytes = self.host(OpKind::Reduce, buf.memory)?;
        let ring = bytes.len() >= self.tuning.ring_threshold_bytes && numel >= self.members.len();
        self.collective(OpKind::Reduce, dtype, numel, Some(root), Some(op), |ctx| {
            if ctx.size() == 1 {
                Ok(())
            } else if ring {
                alg::ring_reduce(ctx, op, root, bytes)
            } else {
                alg::tree_reduce(ctx, op, root, bytes)
            }
        })
    }

    fn broadcast(&self, buf: BufMut<'_>, root: usize) -> Result<(), CommError> {
        self.check_root(OpKind::Broadcast, root)?;
        let (dtype, numel) = (buf.dtype, buf.numel);
        let bytes = self.host(OpKind::Broadcast, buf.memory)?;
        let hierarchical = self.hierarchical(bytes.len() >= self.tuning.ring_threshold_bytes);
        let large = bytes.len() >= self.tuning.ring_threshold_bytes && numel >= self.members.len();
        tracing::debug!(
            rank = self.global_rank(),
            group = self.group_id,
            bytes = bytes.len(),
            hierarchical,
            large,
            "broadcast"
        );
        let threshold = self.tuning.ring_threshold_bytes;
        self.collective(OpKind::Broadcast, dtype, numel, Some(root), None, |ctx| {
            if ctx.size() == 1 {
                Ok(())
            } else if hierarchical {
                alg::hier_broadcast(ctx, &self.layout, root, bytes, bytes.len() >= threshold)
            } else if large && ctx.size() > 2 {
                alg::scatter_allgather_broadcast(ctx, root, bytes)
            } else {
                alg::tree_broadcast(ctx, root, bytes)
            }
        })
    }

    fn all_gather(&self, input: BufRef<'_>, output: BufMut<'_>) -> Result<(), CommError> {
        let n = self.members.len();
        let (dtype, numel) = (input.dtype, input.numel);
        if let Some(reason) = blocks_mismatch("output", (output.dtype, output.numel), (dtype, numel), n) {
            return Err(self.invalid(OpKind::AllGather, reason));
        }
        let input = self.host_ref(OpKind::AllGather, input.memory)?;
        let output = self.host(OpKind::AllGather, output.memory)?;
        let block = input.len();
        output[self.rank * block..(self.rank + 1) * block].copy_from_slice(input);
        self.collective(OpKind::AllGather, dtype, numel, None, None, |ctx| {
            if ctx.size() == 1 {
                Ok(())
            } else {
                alg::ring_all_gather(ctx, output)
            }
        })
    }

    fn reduce_scatter(&self, input: BufRef<'_>, output: BufMut<'_>, op: ReduceOp) -> Result<(), CommError> {
        let n = self.members.len();
        let (dtype, numel) = (output.dtype, output.numel);
        if let Some(reason) = blocks_mismatch("input", (input.dtype, input.numel), (dtype, numel), n) {
            return Err(self.invalid(OpKind::ReduceScatter, reason));
        }
        let input = self.host_ref(OpKind::ReduceScatter, input.memory)?;
        let output = self.host(OpKind::ReduceScatter, output.memory)?;
        let mut work = HostBuffer::zeros(dtype, numel * n);
        work.bytes_mut().copy_from_slice(input);
        let rank = self.rank;
        self.collective(OpKind::ReduceScatter, dtype, numel, None, Some(op), |ctx| {
            if ctx.size() > 1 {
                alg::ring_reduce_scatter(ctx, op, work.bytes_mut())?;
            }
            let block = output.len();
            output.copy_from_slice(&work.bytes()[rank * block..(rank + 1) * block]);
            Ok(())
        })
    }

    fn all_to_all(&self, input: BufRef<'_>, output: BufMut<'_>) -> Result<(), CommError> {
        let n = self.members.len();
        let (dtype, numel) = (input.dtype, input.numel);
        if output.dtype != dtype || output.numel != numel || numel % n != 0 {
            return Err(self.invalid(
                OpKind::AllToAll,
                format!(
                    "input {dtype} x {numel} and output {} x {} must have the same dtype and length, \
                     a multiple of the group size {n}",
                    output.dtype, output.numel
                ),
            ));
        }
        let input = self.host_ref(OpKind::AllToAll, input.memory)?;
        let output = self.host(OpKind::AllToAll, output.memory)?;
        self.collective(OpKind::AllToAll, dtype, numel, None, None, |ctx| {
            alg::all_to_all(ctx, input, output)
        })
    }

    fn send(&self, buf: BufRef<'_>, peer: usize, tag: u32) -> Result<(), CommError> {
        let (dtype, numel) = (buf.dtype, buf.numel);
        let bytes = self.host_ref(OpKind::SendRecv, buf.memory)?;
        self.point_to_point(peer, tag, dtype, numel, |ctx| ctx.send_now(peer, 0, bytes))
    }

    fn recv(&self, buf: BufMut<'_>, peer: usize, tag: u32) -> Result<(), CommError> {
        let (dtype, numel) = (buf.dtype, buf.numel);
        let bytes = self.host(OpKind::SendRecv, buf.memory)?;
        self.point_to_point(peer, tag, dtype, numel, |ctx| ctx.recv_now(peer, 0, bytes, None))
    }

    fn barrier(&self) -> Result<(), CommError> {
        let mut token = [1u8];
        self.collective(OpKind::Barrier, DType::U8, 1, None, Some(ReduceOp::Sum), |ctx| {
            if ctx.size() == 1 {
                Ok(())
            } else if self.direct(token.len()) {
                alg::direct_all_reduce(ctx, ReduceOp::Sum, &mut token)
            } else {
                alg::doubling_all_reduce(ctx, ReduceOp::Sum, &mut token)
            }
        })
    }

    fn new_group(&self, ranks: &[usize]) -> Result<Option<Box<dyn Communicator>>, CommError> {
        let n = self.members.len();
        let mut seen = vec![false; n];
        for &r in ranks {
            if r >= n || std::mem::replace(&mut seen[r], true) {
                return Err(CommError::InvalidArgument {
                    rank: self.global_rank(),
                    op: "new_group",
                    reason: format!("ranks {ranks:?} must be distinct ranks below the group size {n}"),
                });
            }
        }
        // Every rank of this group creates groups in the same order, so the counter (and the id
        // derived from it) agrees across ranks without a round trip.
        let index = self.groups_created.fetch_add(1, Ordering::Relaxed) + 1;
        let group_id = derive_group_id(self.group_id, index);
        let Some(rank) = ranks.iter().position(|&r| r == self.rank) else {
            return Ok(None);
        };
        let members = ranks.iter().map(|&r| self.members[r]).collect();
        Ok(Some(Box::new(HostComm::new(
            Arc::clone(&self.mesh),
            members,
            Arc::clone(&self.world_hosts),
            rank,
            group_id,
            self.timeout,
            self.tuning,
        ))))
    }
}

impl HostComm {
    fn point_to_point(
        &self,
        peer: usize,
        tag: u32,
        dtype: DType,
        numel: usize,
        body: impl FnOnce(&Ctx<'_>) -> Result<(), TransportError>,
    ) -> Result<(), CommError> {
        if peer >= self.members.len() || peer == self.rank {
            return Err(self.invalid(
                OpKind::SendRecv,
                format!(
                    "peer {peer} must be another rank of this group of {}",
                    self.members.len()
                ),
            ));
        }
        self.usable()?;
        let fp = fingerprint(OpKind::SendRecv, dtype, numel, None, None);
        let deadline = Deadline::after(self.timeout);
        let ctx = self.ctx(p2p_key(self.group_id, tag), fp, dtype, &deadline);
        body(&ctx).map_err(|e| self.failed(self.map_error(OpKind::SendRecv, tag as u64, fp, e)))
    }
}

/// A sub-group id from its parent's id and creation index (FNV-1a, folded to the key's bits).
fn derive_group_id(parent: u64, index: u64) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in parent.to_le_bytes().into_iter().chain(index.to_le_bytes()) {
        hash ^= byte as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    // Group 0 is the world.
    (hash % ((1 << 23) - 1)) + 1
}
