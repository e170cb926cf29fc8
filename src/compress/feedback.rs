//! Error feedback: what a rank did not send this step is added to its next gradient.
//!
//! A lossy codec sends `sent(g + r)` and keeps `r' = (g + r) - sent(g + r)`, so over many steps
//! everything is sent eventually: `sum of gradients = sum of what was sent + the last residual`
//! (Seide et al. 2014; Stich et al. 2018; Vogels et al. 2019). The residual is committed only when
//! the step's averaged result is finite: a step the loss scaler skips must not poison later ones.

use super::error::CompressError;
use super::state::{bucket_numel, residual_name, StateTensor, StateTensors};

/// Per-bucket residuals, created as zeros on first use.
#[derive(Debug, Default)]
pub(crate) struct ErrorFeedback {
    enabled: bool,
    /// Indexed by bucket; an empty vector is a bucket not seen yet (or of zero elements).
    residuals: Vec<Vec<f32>>,
}

impl ErrorFeedback {
    /// Residuals are kept only when `enabled`.
    pub(crate) fn new(enabled: bool) -> Self {
        Self {
            enabled,
            residuals: Vec::new(),
        }
    }

    /// The residual of `bucket` (zeros the first time), or `None` when feedback is off. Fails when
    /// the bucket's size changed since the residual was made.
    pub(crate) fn residual_mut(
        &mut self,
        rank: usize,
        method: &'static str,
        bucket: usize,
        numel: usize,
    ) -> Result<Option<&mut [f32]>, CompressError> {
        if !self.enabled {
            return Ok(None);
        }
        if self.residuals.len() <= bucket {
            self.residuals.resize_with(bucket + 1, Vec::new);
        }
        let residual = &mut self.residuals[bucket];
        if residual.is_empty() {
            residual.resize(numel, 0.0);
        } else if residual.len() != numel {
            return Err(CompressError::Layout {
                rank,
                method,
                bucket,
                reason: format!(
                    "the bucket has {numel} elements but its error-feedback residual was made for {}",
                    residual.len()
                ),
            });
        }
        Ok(Some(residual.as_mut_slice()))
    }

    /// Whether residuals are kept.
    pub(crate) fn enabled(&self) -> bool {
        self.enabled
    }

    /// The residual of `bucket`, if any.
    pub(crate) fn get(&self, bucket: usize) -> Option<&[f32]> {
        self.residuals.get(bucket).filter(|r| !r.is_empty()).map(Vec::as_slice)
    }

    /// Forgets every residual.
    pub(crate) fn clear(&mut self) {
        self.residuals.clear();
    }

    /// Every residual made so far, as `residual.bucket<b>` of shape `[numel]`.
    pub(crate) fn state(&self) -> Vec<StateTensor> {
        self.residuals
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.is_empty())
            .map(|(bucket, r)| StateTensor {
                name: residual_name(bucket),
                shape: vec![r.len()],
                data: r.clone(),
            })
            .collect()
    }

    /// Takes the residuals of `buckets` (the shapes of each bucket's parameters) out of
    /// `tensors`, checked but not installed: [`ErrorFeedback::install`] does that once the whole
    /// state is known to fit. A bucket without one starts from zeros, as on a first step.
    pub(crate) fn take_state(
        &self,
        buckets: &[Vec<Vec<usize>>],
        tensors: &mut StateTensors,
    ) -> Result<Vec<Vec<f32>>, CompressError> {
        if !self.enabled {
            return Ok(Vec::new());
        }
        buckets
            .iter()
            .enumerate()
            .map(|(bucket, shapes)| {
                let numel = bucket_numel(shapes);
                Ok(tensors.take(&residual_name(bucket), &[numel])?.unwrap_or_default())
            })
            .collect()
    }

    /// The whole `load_state` of a codec whose only state is its residuals (`method` names it in
    /// errors): every tensor must be one of them and fit, or nothing changes.
    pub(crate) fn load_only_state(
        &mut self,
        method: &'static str,
        buckets: &[Vec<Vec<usize>>],
        tensors: Vec<StateTensor>,
    ) -> Result<(), CompressError> {
        let mut tensors = StateTensors::new(method, tensors)?;
        let residuals = self.take_state(buckets, &mut tensors)?;
        tensors.finish()?;
        self.install(residuals);
        Ok(())
    }

    /// Replaces every residual by `residuals` (from [`ErrorFeedback::take_state`]).
    pub(crate) fn install(&mut self, residuals: Vec<Vec<f32>>) {
        self.residuals = residuals;
    }
}

/// `sqrt(lost_sq / input_sq)`: 0 for a zero input, NaN when either is not finite.
pub(crate) fn relative_error(lost_sq: f64, input_sq: f64) -> f64 {
    if !lost_sq.is_finite() || !input_sq.is_finite() {
        f64::NAN
    } else if input_sq == 0.0 {
        0.0
    } else {
        (lost_sq / input_sq).sqrt()
    }
}

/// True when every element is finite. `x * 0` is 0 for finite `x` and NaN for inf or NaN, so the
/// sum is NaN exactly when one element is not finite; eight lanes let it vectorise.
pub(crate) fn all_finite(values: &[f32]) -> bool {
    let mut lanes = [0f32; 8];
    let chunks = values.chunks_exact(8);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane += x * 0.0;
        }
    }
    let tail_sum: f32 = tail.iter().map(|&x| x * 0.0).sum();
    (lanes.iter().sum::<f32>() + tail_sum) == 0.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_finite_finds_one_bad_element_anywhere() {
        for len in [0usize, 1, 7, 8, 9, 100] {
            let v = vec![1.5f32; len];
            assert!(all_finite(&v));
            for i in 0..len {
                for bad in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
                    let mut w = v.clone();
                    w[i] = bad;
                    assert!(!all_finite(&w), "len {len}, index {i}, {bad}");
                }
            }
        }
        assert!(all_finite(&[f32::MAX, -f32::MAX, f32::MIN_POSITIVE]));
    }
}
