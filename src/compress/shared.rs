//! A codec with more than one owner: the gradient sync runs it, the checkpoint code reads and
//! restores its state (as torch users keep the `PowerSGDState` they register with DDP, to save it).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::codec::{CodecStats, GradCodec};
use super::error::CompressError;
use super::state::StateTensor;
use crate::comm::ProcessGroup;

/// A handle on one codec; clones share it. Every call locks it for its duration (uncontended:
/// one lock per bucket and step, next to a collective).
#[derive(Debug, Clone)]
pub struct SharedCodec {
    inner: Arc<Mutex<Box<dyn GradCodec>>>,
}

impl SharedCodec {
    /// Shares `codec`.
    pub fn new(codec: Box<dyn GradCodec>) -> Self {
        Self {
            inner: Arc::new(Mutex::new(codec)),
        }
    }

    /// The codec. A holder that panicked mid-call leaves it as the panic found it; its state is
    /// plain numbers, so it is still usable (and a step that failed is not resumed anyway).
    fn lock(&self) -> MutexGuard<'_, Box<dyn GradCodec>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl GradCodec for SharedCodec {
    fn all_reduce_avg(
        &mut self,
        group: &ProcessGroup,
        bucket: usize,
        shapes: &[Vec<usize>],
        grads: &mut [f32],
        step: u64,
    ) -> Result<CodecStats, CompressError> {
        self.lock().all_reduce_avg(group, bucket, shapes, grads, step)
    }

    fn name(&self) -> &'static str {
        self.lock().name()
    }

    /// Not available through a shared handle (the lock cannot outlive the call): `None`. Use
    /// [`GradCodec::state`] for a copy.
    fn residual(&self, _bucket: usize) -> Option<&[f32]> {
        None
    }

    fn reset(&mut self) {
        self.lock().reset();
    }

    fn describe(&self) -> String {
        self.lock().describe()
    }

    fn state(&self) -> Vec<StateTensor> {
        self.lock().state()
    }

    fn load_state(&mut self, buckets: &[Vec<Vec<usize>>], tensors: Vec<StateTensor>) -> Result<(), CompressError> {
        self.lock().load_state(buckets, tensors)
    }
}
