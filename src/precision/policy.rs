//! The precision policy: which float type computes, which keeps the weights, which reduces.

use serde::{Deserialize, Serialize};

use super::error::PrecisionError;

/// A floating-point type of the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FloatDtype {
    /// 32-bit float.
    #[default]
    F32,
    /// bfloat16: f32's exponent range with an 8-bit mantissa; needs no loss scaling.
    Bf16,
    /// IEEE half: 5-bit exponent (max 65504, smallest normal 6.1e-5); needs a loss scaler.
    F16,
}

impl FloatDtype {
    /// The config name.
    pub const fn name(self) -> &'static str {
        match self {
            FloatDtype::F32 => "f32",
            FloatDtype::Bf16 => "bf16",
            FloatDtype::F16 => "f16",
        }
    }

    /// Bytes per element.
    pub const fn size_bytes(self) -> usize {
        match self {
            FloatDtype::F32 => 4,
            FloatDtype::Bf16 | FloatDtype::F16 => 2,
        }
    }
}

impl std::fmt::Display for FloatDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for FloatDtype {
    type Err = PrecisionError;
    fn from_str(s: &str) -> Result<Self, PrecisionError> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(FloatDtype::F32),
            "bf16" | "bfloat16" => Ok(FloatDtype::Bf16),
            "f16" | "fp16" | "float16" | "half" => Ok(FloatDtype::F16),
            _ => Err(PrecisionError::InvalidOption {
                key: "compute",
                value: format!("{s:?}"),
                reason: "expected one of f32, bf16, f16",
            }),
        }
    }
}

/// Which dtype each part of training uses.
///
/// Defaults: everything in f32 (`PrecisionPolicy::default()`), because burn's CPU backend computes
/// in f32; on an accelerator prefer `PrecisionPolicy::mixed(FloatDtype::Bf16)` (no loss scaler
/// needed). Whether the backend can compute in the chosen dtype is the trainer's decision, which it
/// states at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrecisionPolicy {
    /// Forward and backward. Default f32.
    pub compute: FloatDtype,
    /// Master weights and optimizer state. Only f32 is supported: updates smaller than half's
    /// precision would be lost (Micikevicius et al., 2018). Default f32.
    pub master: FloatDtype,
    /// Gradient reduction across ranks. Default f32; bf16 or f16 is what the `fp16`/`bf16`
    /// compression methods do (cast on the wire, reduce, cast back).
    pub reduce: FloatDtype,
}

impl PrecisionPolicy {
    /// Computes in `compute`, keeps f32 master weights and reduces in f32.
    pub const fn mixed(compute: FloatDtype) -> Self {
        Self {
            compute,
            master: FloatDtype::F32,
            reduce: FloatDtype::F32,
        }
    }

    /// Whether training needs a [`DynamicLossScaler`](super::DynamicLossScaler): f16 compute, whose
    /// gradients underflow (below 6e-8) or overflow (above 65504) without one.
    pub const fn needs_loss_scaler(&self) -> bool {
        matches!(self.compute, FloatDtype::F16)
    }

    /// Whether any part runs below f32.
    pub const fn is_mixed(&self) -> bool {
        !matches!(self.compute, FloatDtype::F32) || !matches!(self.reduce, FloatDtype::F32)
    }

    /// Checks the combination: master weights must be f32.
    pub fn validate(&self) -> Result<(), PrecisionError> {
        if self.master != FloatDtype::F32 {
            return Err(PrecisionError::InvalidOption {
                key: "master",
                value: format!("{:?}", self.master.name()),
                reason: "master weights and optimizer state are kept in f32 (half precision loses small updates)",
            });
        }
        Ok(())
    }
}
