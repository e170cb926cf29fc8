//! `start_step`: average uncompressed for the first steps, then hand over to the lossy codec.
//!
//! PowerSGD (Vogels et al. 2019) and 1-bit Adam (Tang et al. 2021) both warm up uncompressed:
//! early gradients change fast and error feedback has nothing to correct yet.

use super::codec::{check_shapes, CodecStats, GradCodec};
use super::error::CompressError;
use super::state::StateTensor;
use super::uncompressed::Uncompressed;
use crate::comm::ProcessGroup;

/// Runs `inner` from step `start_step` on and an exact f32 average before it.
#[derive(Debug)]
pub struct WarmUp {
    inner: Box<dyn GradCodec>,
    start_step: u64,
}

impl WarmUp {
    /// Wraps `inner`; steps `< start_step` are averaged uncompressed.
    pub fn new(inner: Box<dyn GradCodec>, start_step: u64) -> Self {
        Self { inner, start_step }
    }

    /// The first compressed step.
    pub fn start_step(&self) -> u64 {
        self.start_step
    }
}

impl GradCodec for WarmUp {
    fn all_reduce_avg(
        &mut self,
        group: &ProcessGroup,
        bucket: usize,
        shapes: &[Vec<usize>],
        grads: &mut [f32],
        step: u64,
    ) -> Result<CodecStats, CompressError> {
        if step >= self.start_step {
            return self.inner.all_reduce_avg(group, bucket, shapes, grads, step);
        }
        check_shapes(group, self.name(), bucket, shapes, grads.len())?;
        Uncompressed::average(group, self.name(), bucket, grads, step)
    }

    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn residual(&self, bucket: usize) -> Option<&[f32]> {
        self.inner.residual(bucket)
    }

    fn reset(&mut self) {
        self.inner.reset();
    }

    /// The inner codec's, with the start step: a resumed run with another start step drops the
    /// saved state rather than guess whether it was meant to exist yet.
    fn describe(&self) -> String {
        format!("{} from step {}", self.inner.describe(), self.start_step)
    }

    fn state(&self) -> Vec<StateTensor> {
        self.inner.state()
    }

    fn load_state(&mut self, buckets: &[Vec<Vec<usize>>], tensors: Vec<StateTensor>) -> Result<(), CompressError> {
        self.inner.load_state(buckets, tensors)
    }
}
