//! Loss and accuracy on the last block's output.
//!
//! Every model's logits are `[batch, t * classes]` and its targets `[batch, t]`: `t = 1` for the
//! classifiers, `t = seq` for the GPT (one next-token target per position). Both are reshaped to
//! `[batch * t, classes]` and `[batch * t]`, so one function serves all models. The mean runs over
//! all `batch * t` targets, so the average over data-parallel ranks of equal batches equals the
//! loss of the whole global batch.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor};

use super::error::ModelError;

/// Checks the shapes and returns `(rows, classes)` of the flattened logits.
fn flat_shape(logits: &Tensor<2>, targets: &Tensor<2, Int>, classes: usize) -> Result<(usize, usize), ModelError> {
    let [batch, width] = logits.dims();
    let [target_batch, per_sample] = targets.dims();
    if classes == 0 || batch != target_batch || width != per_sample * classes {
        return Err(ModelError::BadTargets {
            logits: vec![batch, width],
            targets: vec![target_batch, per_sample],
            classes,
        });
    }
    Ok((batch * per_sample, classes))
}

/// Mean cross-entropy of `logits` `[batch, t * classes]` against class ids `targets` `[batch, t]`,
/// shape `[1]`.
pub fn cross_entropy(logits: Tensor<2>, targets: Tensor<2, Int>, classes: usize) -> Result<Tensor<1>, ModelError> {
    let (rows, classes) = flat_shape(&logits, &targets, classes)?;
    let log_probs = log_softmax(logits.reshape([rows, classes]), 1); // [rows, classes]
    let picked = log_probs.gather(1, targets.reshape([rows, 1])); // [rows, 1]
    Ok(picked.mean().neg())
}

/// Fraction of targets whose arg-max logit is the target, shape `[1]` (stays on the device: read
/// it only when logging).
pub fn accuracy(logits: Tensor<2>, targets: Tensor<2, Int>, classes: usize) -> Result<Tensor<1>, ModelError> {
    let (rows, classes) = flat_shape(&logits, &targets, classes)?;
    let predicted = logits.reshape([rows, classes]).argmax(1); // [rows, 1]
    let hits = predicted.equal(targets.reshape([rows, 1])).float(); // [rows, 1]
    Ok(hits.mean().detach())
}
