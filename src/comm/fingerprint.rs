//! Operation fingerprints and frame keys.
//!
//! Every frame carries the fingerprint of the collective that sent it: op, dtype, a 16-bit
//! argument (root and reduction operator) and the low 32 bits of the element count. A receiver
//! that finds another fingerprint under the tag it waits for reports both calls at once
//! ("this rank called all_reduce(f32 x 1000, sum), peer 3 called all_gather(f32 x 500)").

use super::dtype::{DType, ReduceOp};

/// The collectives, as numbered in fingerprints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// `all_reduce`.
    AllReduce = 1,
    /// `reduce`.
    Reduce = 2,
    /// `broadcast`.
    Broadcast = 3,
    /// `all_gather`.
    AllGather = 4,
    /// `reduce_scatter`.
    ReduceScatter = 5,
    /// `all_to_all`.
    AllToAll = 6,
    /// `send` and `recv`.
    SendRecv = 7,
    /// `barrier`.
    Barrier = 8,
}

impl OpKind {
    const ALL: [OpKind; 8] = [
        OpKind::AllReduce,
        OpKind::Reduce,
        OpKind::Broadcast,
        OpKind::AllGather,
        OpKind::ReduceScatter,
        OpKind::AllToAll,
        OpKind::SendRecv,
        OpKind::Barrier,
    ];

    /// The op's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::AllReduce => "all_reduce",
            OpKind::Reduce => "reduce",
            OpKind::Broadcast => "broadcast",
            OpKind::AllGather => "all_gather",
            OpKind::ReduceScatter => "reduce_scatter",
            OpKind::AllToAll => "all_to_all",
            OpKind::SendRecv => "send/recv",
            OpKind::Barrier => "barrier",
        }
    }
}

const REDUCE_OPS: [ReduceOp; 5] = ReduceOp::ALL;

/// Packs a fingerprint: op, dtype, root and reduction, and the low 32 bits of the count.
pub fn fingerprint(op: OpKind, dtype: DType, numel: usize, root: Option<usize>, reduce: Option<ReduceOp>) -> u64 {
    let reduce_code = reduce.map_or(0, |r| 1 + REDUCE_OPS.iter().position(|&x| x == r).unwrap_or(0) as u64);
    let root_code = root.map_or(0xfff, |r| (r as u64).min(0xffe));
    ((op as u64) << 56)
        | ((dtype.code() as u64) << 48)
        | (root_code << 36)
        | (reduce_code << 32)
        | (numel as u64 & 0xffff_ffff)
}

/// Renders a fingerprint for error messages.
pub fn describe(fp: u64) -> String {
    let op = OpKind::ALL
        .iter()
        .find(|k| **k as u64 == fp >> 56)
        .map_or("unknown op", |k| k.name());
    let dtype = DType::from_code(((fp >> 48) & 0xff) as u8).map_or("?".to_string(), |d| d.to_string());
    let root = (fp >> 36) & 0xfff;
    let reduce = ((fp >> 32) & 0xf) as usize;
    let numel = fp & 0xffff_ffff;
    let mut out = format!("{op}({dtype} x {numel}");
    if reduce > 0 {
        if let Some(r) = REDUCE_OPS.get(reduce - 1) {
            out.push_str(&format!(", {r}"));
        }
    }
    if root != 0xfff {
        out.push_str(&format!(", root {root}"));
    }
    out.push(')');
    out
}

/// Bit 63 marks point-to-point keys; collectives use the group id and the sequence number.
const P2P_BIT: u64 = 1 << 63;
const SEQ_BITS: u32 = 40;
const GROUP_MASK: u64 = (1 << 23) - 1;

/// Key of collective number `seq` of group `group_id`.
pub(crate) fn collective_key(group_id: u64, seq: u64) -> u64 {
    ((group_id & GROUP_MASK) << SEQ_BITS) | (seq & ((1 << SEQ_BITS) - 1))
}

/// Key of point-to-point messages with user tag `tag` in group `group_id`.
pub(crate) fn p2p_key(group_id: u64, tag: u32) -> u64 {
    P2P_BIT | ((group_id & GROUP_MASK) << SEQ_BITS) | tag as u64
}

/// The sequence number of a collective key of group `group_id`; `None` for other groups' keys
/// and for point-to-point keys.
pub(crate) fn collective_seq(key: u64, group_id: u64) -> Option<u64> {
    let same_group = (key >> SEQ_BITS) & GROUP_MASK == group_id & GROUP_MASK;
    (key & P2P_BIT == 0 && same_group).then_some(key & ((1 << SEQ_BITS) - 1))
}

/// Describes a key for error messages.
pub(crate) fn describe_key(key: u64) -> String {
    let group = (key >> SEQ_BITS) & GROUP_MASK;
    if key & P2P_BIT != 0 {
        format!("send/recv tag {} (group {group:#x})", key & 0xffff_ffff)
    } else {
        format!("collective #{} (group {group:#x})", key & ((1 << SEQ_BITS) - 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fingerprint_describes_its_call() {
        let fp = fingerprint(OpKind::AllReduce, DType::BF16, 1000, None, Some(ReduceOp::Max));
        assert_eq!(describe(fp), "all_reduce(bf16 x 1000, max)");
        let fp = fingerprint(OpKind::Broadcast, DType::U8, 7, Some(3), None);
        assert_eq!(describe(fp), "broadcast(u8 x 7, root 3)");
    }
}
