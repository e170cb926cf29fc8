//! `[precision]`: the compute dtype and the dynamic loss scaler.

use serde::{Deserialize, Serialize};

use super::choice::choice;

choice! {
    /// `precision.compute`: dtype of forward and backward. Master weights, optimizer state and
    /// gradient reduction stay in f32.
    ComputeDtype, default F32 {
        /// Full precision.
        F32 = "f32",
        /// bfloat16: f32's range, no loss scaling needed.
        Bf16 = "bf16",
        /// IEEE half: needs the dynamic loss scaler below.
        F16 = "f16",
    }
}

/// `[precision]`: mixed precision. The loss-scaler keys are used only with `compute = "f16"`.
///
/// The scaler multiplies the loss by `scale`; a step whose gradients hold an inf or NaN on any
/// rank is skipped by every rank and the scale is multiplied by `backoff` (not below `min_scale`);
/// after `growth_interval` steps in a row without overflow it is multiplied by `growth_factor`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrecisionConfig {
    /// Compute dtype: `"f32"`, `"bf16"` or `"f16"`. Default `"f32"`.
    pub compute: ComputeDtype,
    /// Initial loss scale. Default `65536.0` (2^16).
    pub loss_scale_init: f64,
    /// Overflow-free steps before the scale grows. Default `2000`.
    pub growth_interval: u64,
    /// Factor applied to the scale on overflow, in `(0, 1)`. Default `0.5`.
    pub backoff: f64,
    /// Factor applied to the scale after `growth_interval` clean steps, `> 1`. Default `2.0`.
    pub growth_factor: f64,
    /// The scale never goes below this. Default `1.0`.
    pub min_scale: f64,
}

impl Default for PrecisionConfig {
    fn default() -> Self {
        Self {
            compute: ComputeDtype::F32,
            loss_scale_init: 65536.0,
            growth_interval: 2000,
            backoff: 0.5,
            growth_factor: 2.0,
            min_scale: 1.0,
        }
    }
}
