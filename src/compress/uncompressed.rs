//! `none`: the f32 all-reduce with averaging every other method is measured against.

use super::codec::{check_shapes, collective, CodecStats, GradCodec};
use super::error::CompressError;
use crate::comm::{ProcessGroup, ReduceOp};

/// Exact averaging: one f32 all-reduce (`Avg`) per bucket.
#[derive(Debug, Clone, Copy, Default)]
pub struct Uncompressed;

impl Uncompressed {
    /// Averages `grads` exactly; shared with the warm-up and the codecs' fallbacks.
    pub(crate) fn average(
        group: &ProcessGroup,
        method: &'static str,
        bucket: usize,
        grads: &mut [f32],
        step: u64,
    ) -> Result<CodecStats, CompressError> {
        let before = group.bytes_sent();
        if !grads.is_empty() {
            collective(method, bucket, step, group.all_reduce(grads, ReduceOp::Avg))?;
        }
        Ok(CodecStats {
            wire_bytes: std::mem::size_of_val(grads) as u64,
            transport_bytes: group.bytes_sent().saturating_sub(before),
            relative_error: 0.0,
            compressed: false,
        })
    }
}

impl GradCodec for Uncompressed {
    fn all_reduce_avg(
        &mut self,
        group: &ProcessGroup,
        bucket: usize,
        shapes: &[Vec<usize>],
        grads: &mut [f32],
        step: u64,
    ) -> Result<CodecStats, CompressError> {
        check_shapes(group, self.name(), bucket, shapes, grads.len())?;
        Self::average(group, self.name(), bucket, grads, step)
    }

    fn name(&self) -> &'static str {
        "none"
    }

    fn describe(&self) -> String {
        "none".to_string()
    }
}
