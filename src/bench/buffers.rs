//! One benchmark step per operation, the buffers it works on, and the check of its result.

use crate::comm::{BufMut, CommError, ProcessGroup, ReduceOp};

use super::options::BenchOp;
use super::values::{max_value, pattern, BenchValue};

/// Tag of the benchmark's point-to-point messages ("benc").
const SENDRECV_TAG: u32 = 0x6265_6e63;

/// The buffers of one operation at one size, for one rank.
///
/// `count` is the element count of the buffer the size refers to (nccl-tests' convention): the
/// all-reduce/broadcast/send buffer, the all-gather output, the reduce-scatter input, each
/// rank's whole all-to-all buffer. For the chunked operations it is a multiple of the world
/// size and `block = count / world_size` is one rank's chunk.
pub(crate) struct OpBuffers<T> {
    op: BenchOp,
    root: usize,
    rank: usize,
    world_size: usize,
    count: usize,
    max: u32,
    input: Vec<T>,
    output: Vec<T>,
}

impl<T: BenchValue> OpBuffers<T> {
    /// Allocates the buffers and fills them with this rank's pattern.
    pub(crate) fn new(pg: &ProcessGroup, op: BenchOp, root: usize, count: usize) -> Self {
        let (rank, world_size) = (pg.rank(), pg.world_size());
        let block = count / world_size;
        let (input_len, output_len) = match op {
            // In place: `input` is the buffer.
            BenchOp::AllReduce | BenchOp::Broadcast => (count, 0),
            BenchOp::AllGather => (block, count),
            BenchOp::ReduceScatter => (count, block),
            BenchOp::AllToAll | BenchOp::SendRecv => (count, count),
        };
        let zero = T::from_small(0);
        let mut buffers = Self {
            op,
            root,
            rank,
            world_size,
            count,
            max: max_value(world_size),
            input: vec![zero; input_len],
            output: vec![zero; output_len],
        };
        buffers.fill();
        buffers
    }

    /// Element `i` of this rank's input is `pattern(rank, i)`; outputs are zeroed.
    pub(crate) fn fill(&mut self) {
        let (rank, max) = (self.rank, self.max);
        for (i, x) in self.input.iter_mut().enumerate() {
            *x = T::from_small(pattern(rank, i, max));
        }
        self.output.fill(T::from_small(0));
    }

    /// Runs the operation once.
    pub(crate) fn step(&mut self, pg: &ProcessGroup) -> Result<(), CommError> {
        let n = self.world_size;
        match self.op {
            BenchOp::AllReduce => pg.all_reduce(&mut self.input, ReduceOp::Sum),
            BenchOp::AllGather => pg.all_gather(&self.input, &mut self.output),
            BenchOp::ReduceScatter => pg.reduce_scatter(&self.input, &mut self.output, ReduceOp::Sum),
            BenchOp::Broadcast => pg.broadcast(&mut self.input, self.root),
            BenchOp::AllToAll => pg.all_to_all(&self.input, &mut self.output),
            BenchOp::SendRecv => {
                // The send runs on the group's async thread while this thread receives, so both
                // directions of every link are busy at once (nccl-tests' sendrecv). The buffer
                // travels to the send and comes back from `wait`.
                let (left, right) = ((self.rank + n - 1) % n, (self.rank + 1) % n);
                let send = pg.send_async(std::mem::take(&mut self.input), right, SENDRECV_TAG);
                let received = pg
                    .communicator()
                    .recv(BufMut::host(&mut self.output), left, SENDRECV_TAG);
                let sent = send.wait();
                received?;
                self.input = sent?;
                Ok(())
            }
        }
    }

    /// Number of elements of the result that differ from the expected value. Call right after
    /// one `step` on freshly filled buffers.
    pub(crate) fn count_wrong(&self) -> u64 {
        let (rank, n, max) = (self.rank, self.world_size, self.max);
        let block = self.count / n;
        let sum_over_ranks = |index: usize| (0..n).map(|s| pattern(s, index, max)).sum::<u32>();
        let wrong = |got: &[T], expected: &dyn Fn(usize) -> u32| {
            got.iter()
                .enumerate()
                .filter(|&(i, &x)| x != T::from_small(expected(i)))
                .count() as u64
        };
        match self.op {
            BenchOp::AllReduce => wrong(&self.input, &sum_over_ranks),
            BenchOp::Broadcast => wrong(&self.input, &|i| pattern(self.root, i, max)),
            BenchOp::AllGather => wrong(&self.output, &|k| pattern(k / block, k % block, max)),
            BenchOp::ReduceScatter => wrong(&self.output, &|i| sum_over_ranks(rank * block + i)),
            BenchOp::AllToAll => wrong(&self.output, &|k| pattern(k / block, rank * block + k % block, max)),
            BenchOp::SendRecv => wrong(&self.output, &|i| pattern((rank + n - 1) % n, i, max)),
        }
    }
}
