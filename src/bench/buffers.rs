//! One benchmark step per operation, the buffers it works on, and the check of its result.
//!
//! [`Layout`] is what every backend shares: how long each buffer is, what a rank puts in its
//! input and what it must find in the result. [`OpBuffers`] keeps the buffers in host memory for
//! the CPU engine; the CUDA benchmark keeps the same layout in device memory.

use crate::comm::{BufMut, CommError, ProcessGroup, ReduceOp};

use super::options::BenchOp;
use super::values::{max_value, pattern, BenchValue};

/// Tag of the benchmark's point-to-point messages ("benc").
const SENDRECV_TAG: u32 = 0x6265_6e63;

/// The buffers of one rank for one operation at one size, wherever they live.
pub(crate) trait Workload {
    /// Fills the input with this rank's pattern and zeroes the output.
    fn fill(&mut self) -> Result<(), CommError>;
    /// Runs the operation once, to completion.
    fn step(&mut self) -> Result<(), CommError>;
    /// Number of elements of the result that differ from the expected value. Call right after
    /// one `step` on freshly filled buffers.
    fn count_wrong(&mut self) -> Result<u64, CommError>;
}

/// The shape of one operation at one size, for one rank.
///
/// `count` is the element count of the buffer the size refers to (nccl-tests' convention): the
/// all-reduce/broadcast/send buffer, the all-gather output, the reduce-scatter input, each
/// rank's whole all-to-all buffer. For the chunked operations it is a multiple of the world
/// size and `block = count / world_size` is one rank's chunk.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Layout {
    pub(crate) op: BenchOp,
    pub(crate) root: usize,
    pub(crate) rank: usize,
    pub(crate) world_size: usize,
    pub(crate) count: usize,
    max: u32,
}

impl Layout {
    pub(crate) fn new(op: BenchOp, root: usize, rank: usize, world_size: usize, count: usize) -> Self {
        Self {
            op,
            root,
            rank,
            world_size,
            count,
            max: max_value(world_size),
        }
    }

    /// One rank's chunk of a chunked operation.
    pub(crate) fn block(&self) -> usize {
        self.count / self.world_size
    }

    /// Elements of the input and of the output buffer; the in-place operations (all-reduce,
    /// broadcast) have no output: their result is the input.
    pub(crate) fn lengths(&self) -> (usize, usize) {
        let (count, block) = (self.count, self.block());
        match self.op {
            BenchOp::AllReduce | BenchOp::Broadcast => (count, 0),
            BenchOp::AllGather => (block, count),
            BenchOp::ReduceScatter => (count, block),
            BenchOp::AllToAll | BenchOp::SendRecv => (count, count),
        }
    }

    /// True when the result is left in the input buffer.
    pub(crate) fn in_place(&self) -> bool {
        matches!(self.op, BenchOp::AllReduce | BenchOp::Broadcast)
    }

    /// Element `i` of this rank's input is `pattern(rank, i)`.
    pub(crate) fn fill_input<T: BenchValue>(&self, input: &mut [T]) {
        for (i, x) in input.iter_mut().enumerate() {
            *x = T::from_small(pattern(self.rank, i, self.max));
        }
    }

    /// Number of elements of `result` (the output, or the input of an in-place operation) that
    /// differ from the exact expected value.
    pub(crate) fn count_wrong<T: BenchValue>(&self, result: &[T]) -> u64 {
        let (rank, n, max, block) = (self.rank, self.world_size, self.max, self.block());
        let sum_over_ranks = |index: usize| (0..n).map(|s| pattern(s, index, max)).sum::<u32>();
        let wrong = |expected: &dyn Fn(usize) -> u32| {
            result
                .iter()
                .enumerate()
                .filter(|&(i, &x)| x != T::from_small(expected(i)))
                .count() as u64
        };
        match self.op {
            BenchOp::AllReduce => wrong(&sum_over_ranks),
            BenchOp::Broadcast => wrong(&|i| pattern(self.root, i, max)),
            BenchOp::AllGather => wrong(&|k| pattern(k / block, k % block, max)),
            BenchOp::ReduceScatter => wrong(&|i| sum_over_ranks(rank * block + i)),
            BenchOp::AllToAll => wrong(&|k| pattern(k / block, rank * block + k % block, max)),
            BenchOp::SendRecv => wrong(&|i| pattern((rank + n - 1) % n, i, max)),
        }
    }
}

/// The buffers of one operation at one size, for one rank, in host memory.
pub(crate) struct OpBuffers<'g, T> {
    pg: &'g ProcessGroup,
    layout: Layout,
    input: Vec<T>,
    output: Vec<T>,
}

impl<'g, T: BenchValue> OpBuffers<'g, T> {
    /// Allocates the buffers and fills them with this rank's pattern.
    pub(crate) fn new(pg: &'g ProcessGroup, op: BenchOp, root: usize, count: usize) -> Self {
        let layout = Layout::new(op, root, pg.rank(), pg.world_size(), count);
        let (input_len, output_len) = layout.lengths();
        let zero = T::from_small(0);
        let mut buffers = Self {
            pg,
            layout,
            input: vec![zero; input_len],
            output: vec![zero; output_len],
        };
        buffers.refill();
        buffers
    }

    fn refill(&mut self) {
        self.layout.fill_input(&mut self.input);
        self.output.fill(T::from_small(0));
    }
}

impl<T: BenchValue> Workload for OpBuffers<'_, T> {
    fn fill(&mut self) -> Result<(), CommError> {
        self.refill();
        Ok(())
    }

    fn step(&mut self) -> Result<(), CommError> {
        let (pg, root) = (self.pg, self.layout.root);
        match self.layout.op {
            BenchOp::AllReduce => pg.all_reduce(&mut self.input, ReduceOp::Sum),
            BenchOp::AllGather => pg.all_gather(&self.input, &mut self.output),
            BenchOp::ReduceScatter => pg.reduce_scatter(&self.input, &mut self.output, ReduceOp::Sum),
            BenchOp::Broadcast => pg.broadcast(&mut self.input, root),
            BenchOp::AllToAll => pg.all_to_all(&self.input, &mut self.output),
            BenchOp::SendRecv => {
                // The send runs on the group's async thread while this thread receives, so both
                // directions of every link are busy at once (nccl-tests' sendrecv). The buffer
                // travels to the send and comes back from `wait`.
                let (rank, n) = (self.layout.rank, self.layout.world_size);
                let (left, right) = ((rank + n - 1) % n, (rank + 1) % n);
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

    fn count_wrong(&mut self) -> Result<u64, CommError> {
        let result = if self.layout.in_place() {
            &self.input
        } else {
            &self.output
        };
        Ok(self.layout.count_wrong(result))
    }
}
