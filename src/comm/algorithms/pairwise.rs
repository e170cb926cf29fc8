//! All-to-all: every rank posts its n-1 sends and n-1 receives at once and the transport's
//! progress engine drives them together.

use crate::transport::TransportError;

use super::{chunks_mut, Ctx};

/// All-to-all of equal blocks: block j of `input` goes to rank j, block i of `output` comes from
/// rank i.
pub(crate) fn all_to_all(ctx: &Ctx<'_>, input: &[u8], output: &mut [u8]) -> Result<(), TransportError> {
    let n = ctx.size();
    let block = input.len() / n;
    let ranges: Vec<_> = (0..n).map(|i| i * block..(i + 1) * block).collect();
    let mut ops = Vec::with_capacity(2 * n);
    for (peer, part) in chunks_mut(output, &ranges).into_iter().enumerate() {
        if peer == ctx.rank {
            part.copy_from_slice(&input[ranges[peer].clone()]);
        } else {
            ops.push(ctx.send(peer, 0, &input[ranges[peer].clone()]));
            ops.push(ctx.recv(peer, 0, part));
        }
    }
    ctx.run(ops)
}
