//! `[optim]`: the optimizer, the learning-rate schedule and gradient clipping.

use serde::{Deserialize, Serialize};

use super::choice::choice;

choice! {
    /// `optim.kind`: the update rule.
    OptimKind, default Adam {
        /// SGD with heavy-ball momentum (`momentum = 0` is plain SGD), L2 weight decay.
        Sgd = "sgd",
        /// Adam with bias correction, L2 weight decay (as torch's `Adam`).
        Adam = "adam",
        /// Adam with decoupled weight decay (as torch's `AdamW`).
        AdamW = "adamw",
    }
}

choice! {
    /// `optim.schedule`: how the learning rate moves after warm-up.
    LrSchedule, default Constant {
        /// Stay at `lr`.
        Constant = "constant",
        /// Half a cosine from `lr` down to `min_lr` at the last step.
        Cosine = "cosine",
    }
}

/// `[optim]`: optimizer and learning rate.
///
/// The learning rate at step `s` (counted from 0): during warm-up (`s < warmup_steps`)
/// `lr * (s + 1) / warmup_steps`; after it, `lr` (`constant`) or
/// `min_lr + (lr - min_lr) * (1 + cos(pi * t)) / 2` with `t = (s - warmup_steps) / (steps - warmup_steps)` (`cosine`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// Update rule: `"sgd"`, `"adam"` or `"adamw"`. Default `"adam"`.
    pub kind: OptimKind,
    /// Peak learning rate. Default `1e-3`.
    pub lr: f64,
    /// Momentum factor of SGD, in `[0, 1)` (ignored by Adam and AdamW). Default `0.9`.
    pub momentum: f64,
    /// Weight decay: L2 in the gradient for SGD and Adam, decoupled for AdamW. Default `0.0`.
    pub weight_decay: f64,
    /// Adam's first-moment decay, in `[0, 1)`. Default `0.9`.
    pub beta1: f64,
    /// Adam's second-moment decay, in `[0, 1)`. Default `0.999`.
    pub beta2: f64,
    /// Adam's denominator guard, `> 0`. Default `1e-8`.
    pub eps: f64,
    /// Steps of linear warm-up from `lr / warmup_steps` to `lr`. Default `0` (no warm-up).
    pub warmup_steps: u64,
    /// Schedule after warm-up: `"constant"` or `"cosine"`. Default `"constant"`.
    pub schedule: LrSchedule,
    /// Learning rate the cosine schedule ends at, `<= lr`. Default `0.0`.
    pub min_lr: f64,
    /// Clip gradients so that their global L2 norm, over every parameter on every rank (after the
    /// all-reduce), is at most this. `0` turns clipping off. Default `0.0`.
    pub grad_clip_norm: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            kind: OptimKind::Adam,
            lr: 1e-3,
            momentum: 0.9,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            warmup_steps: 0,
            schedule: LrSchedule::Constant,
            min_lr: 0.0,
            grad_clip_norm: 0.0,
        }
    }
}
