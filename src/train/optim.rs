//! Optimizers over flat f32 buffers: the master weights and their state.
//!
//! The trainer keeps every parameter of its model (or pipeline stage) in one flat f32 vector in
//! model order, with the optimizer state beside it. That makes data parallelism a flat
//! all-reduce, checkpoints a list of named slices, and mixed precision a cast of the master copy.

use std::ops::Range;

/// Which update rule, with its hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OptimizerKind {
    /// SGD with (heavy-ball) momentum; `momentum = 0` is plain SGD. Weight decay is L2 added to
    /// the gradient, as torch's SGD.
    Sgd {
        /// Momentum factor.
        momentum: f32,
        /// L2 penalty.
        weight_decay: f32,
    },
    /// Adam (Kingma and Ba) with bias correction; weight decay as L2 in the gradient (torch's Adam).
    Adam {
        /// First-moment decay.
        beta1: f32,
        /// Second-moment decay.
        beta2: f32,
        /// Denominator guard.
        eps: f32,
        /// L2 penalty.
        weight_decay: f32,
    },
    /// AdamW: Adam with decoupled weight decay (Loshchilov and Hutter).
    AdamW {
        /// First-moment decay.
        beta1: f32,
        /// Second-moment decay.
        beta2: f32,
        /// Denominator guard.
        eps: f32,
        /// Decoupled decay.
        weight_decay: f32,
    },
}

/// An optimizer's state over a flat parameter vector.
#[derive(Debug, Clone, PartialEq)]
pub struct FlatOptimizer {
    kind: OptimizerKind,
    /// Momentum buffer (SGD) or first moment (Adam).
    exp_avg: Vec<f32>,
    /// Second moment (Adam only; empty for SGD).
    exp_avg_sq: Vec<f32>,
    /// Updates applied so far (Adam's bias correction).
    steps: u64,
}

impl FlatOptimizer {
    /// State for `numel` parameters.
    pub fn new(kind: OptimizerKind, numel: usize) -> Self {
        let second = if matches!(kind, OptimizerKind::Sgd { .. }) {
            0
        } else {
            numel
        };
        Self {
            kind,
            exp_avg: vec![0.0; numel],
            exp_avg_sq: vec![0.0; second],
            steps: 0,
        }
    }

    /// [`FlatOptimizer::new`], but a state too large for memory is an error instead of an abort.
    pub fn try_new(kind: OptimizerKind, numel: usize) -> Result<Self, std::collections::TryReserveError> {
        let second = if matches!(kind, OptimizerKind::Sgd { .. }) {
            0
        } else {
            numel
        };
        let zeros = |len: usize| -> Result<Vec<f32>, std::collections::TryReserveError> {
            let mut buffer = Vec::new();
            buffer.try_reserve_exact(len)?;
            buffer.resize(len, 0.0);
            Ok(buffer)
        };
        Ok(Self {
            kind,
            exp_avg: zeros(numel)?,
            exp_avg_sq: zeros(second)?,
            steps: 0,
        })
    }

    /// Updates applied so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Applies one update with learning rate `lr` to every parameter.
    pub fn step(&mut self, lr: f32, params: &mut [f32], grads: &[f32]) {
        assert_eq!(
            params.len(),
            self.exp_avg.len(),
            "optimizer: state was built for another size"
        );
        self.begin_step();
        self.update(lr, 0, params, grads);
    }

    /// Counts one more update: called once per optimizer step before [`Self::update`] (which may
    /// then run on several pieces of the state, as a sharded optimizer does).
    pub fn begin_step(&mut self) {
        self.steps += 1;
    }

    /// The update of the step begun by [`Self::begin_step`] for `params` and `grads`, whose state
    /// starts at element `state_offset` of this optimizer's buffers.
    pub fn update(&mut self, lr: f32, state_offset: usize, params: &mut [f32], grads: &[f32]) {
        assert_eq!(
            params.len(),
            grads.len(),
            "optimizer: params and grads differ in length"
        );
        let state = state_offset..state_offset + params.len();
        assert!(
            state.end <= self.exp_avg.len(),
            "optimizer: state {state:?} past the end of the buffers ({})",
            self.exp_avg.len()
        );
        let exp_avg = &mut self.exp_avg[state.clone()];
        match self.kind {
            OptimizerKind::Sgd { momentum, weight_decay } => {
                let first = self.steps == 1;
                for ((p, &g), m) in params.iter_mut().zip(grads).zip(exp_avg) {
                    let g = g + weight_decay * *p;
                    let d = if momentum == 0.0 {
                        g
                    } else {
                        // torch: the buffer starts as the first gradient.
                        *m = if first { g } else { momentum * *m + g };
                        *m
                    };
                    *p -= lr * d;
                }
            }
            OptimizerKind::Adam {
                beta1,
                beta2,
                eps,
                weight_decay,
            }
            | OptimizerKind::AdamW {
                beta1,
                beta2,
                eps,
                weight_decay,
            } => {
                let decoupled = matches!(self.kind, OptimizerKind::AdamW { .. });
                let t = self.steps as i32;
                let bias1 = 1.0 - beta1.powi(t);
                let bias2 = 1.0 - beta2.powi(t);
                let step_size = lr / bias1;
                let bias2_sqrt = bias2.sqrt();
                for (((p, &g), m), v) in params
                    .iter_mut()
                    .zip(grads)
                    .zip(exp_avg)
                    .zip(&mut self.exp_avg_sq[state])
                {
                    let g = if decoupled {
                        *p *= 1.0 - lr * weight_decay;
                        g
                    } else {
                        g + weight_decay * *p
                    };
                    *m = beta1 * *m + (1.0 - beta1) * g;
                    *v = beta2 * *v + (1.0 - beta2) * g * g;
                    *p -= step_size * *m / (v.sqrt() / bias2_sqrt + eps);
                }
            }
        }
    }

    /// Named state slices for a checkpoint: `(suffix, buffer)`.
    pub fn state(&self) -> Vec<(&'static str, &[f32])> {
        let mut out = vec![("exp_avg", self.exp_avg.as_slice())];
        if !self.exp_avg_sq.is_empty() {
            out.push(("exp_avg_sq", self.exp_avg_sq.as_slice()));
        }
        out
    }

    /// Mutable state slices, same names as [`Self::state`].
    pub fn state_mut(&mut self) -> Vec<(&'static str, &mut Vec<f32>)> {
        let mut out = vec![("exp_avg", &mut self.exp_avg)];
        if matches!(self.kind, OptimizerKind::Adam { .. } | OptimizerKind::AdamW { .. }) {
            out.push(("exp_avg_sq", &mut self.exp_avg_sq));
        }
        out
    }

    /// Restores the update counter (from a checkpoint).
    pub fn set_steps(&mut self, steps: u64) {
        self.steps = steps;
    }

    /// The state of the parameters in `range` (for re-slicing a checkpoint).
    pub fn slice_state(&self, range: Range<usize>) -> Vec<(&'static str, &[f32])> {
        self.state().into_iter().map(|(n, b)| (n, &b[range.clone()])).collect()
    }
}

/// Learning rate at `step` (0-based): linear warm-up over `warmup` steps, then constant or
/// cosine decay to `min_lr` at `total` steps.
pub fn learning_rate(step: u64, base: f32, min_lr: f32, warmup: u64, total: u64, cosine: bool) -> f32 {
    if warmup > 0 && step < warmup {
        return base * (step + 1) as f32 / warmup as f32;
    }
    if !cosine || total <= warmup {
        return base;
    }
    let progress = ((step - warmup) as f32 / (total - warmup) as f32).min(1.0);
    min_lr + 0.5 * (base - min_lr) * (1.0 + (std::f32::consts::PI * progress).cos())
}

/// Scales `grads` so that their global L2 norm is at most `max_norm`; `sum_sq` is the squared
/// norm over every rank's share (the caller all-reduces it when the parameters are split across
/// ranks). Returns the norm before clipping.
pub fn clip_by_global_norm(grads: &mut [f32], sum_sq: f64, max_norm: f32) -> f32 {
    let norm = sum_sq.sqrt() as f32;
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        grads.iter_mut().for_each(|g| *g *= scale);
    }
    norm
}

/// Squared L2 norm, accumulated in f64.
pub fn sum_of_squares(values: &[f32]) -> f64 {
    values.iter().map(|&v| (v as f64) * (v as f64)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sgd_with_momentum_matches_the_torch_recurrence() {
        let mut opt = FlatOptimizer::new(
            OptimizerKind::Sgd {
                momentum: 0.9,
                weight_decay: 0.0,
            },
            1,
        );
        let mut p = [1.0f32];
        opt.step(0.1, &mut p, &[1.0]);
        assert!((p[0] - 0.9).abs() < 1e-7);
        opt.step(0.1, &mut p, &[1.0]);
        assert!((p[0] - (0.9 - 0.1 * 1.9)).abs() < 1e-6);
    }

    #[test]
    fn adam_first_step_moves_by_the_learning_rate() {
        let kind = OptimizerKind::Adam {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let mut opt = FlatOptimizer::new(kind, 2);
        let mut p = [0.0f32, 0.0];
        opt.step(0.01, &mut p, &[3.0, -0.5]);
        assert!((p[0] + 0.01).abs() < 1e-6 && (p[1] - 0.01).abs() < 1e-6, "{p:?}");
    }

    #[test]
    fn warmup_then_cosine_reaches_the_floor() {
        assert!((learning_rate(0, 1.0, 0.1, 10, 100, true) - 0.1).abs() < 1e-6);
        assert!((learning_rate(9, 1.0, 0.1, 10, 100, true) - 1.0).abs() < 1e-6);
        assert!((learning_rate(100, 1.0, 0.1, 10, 100, true) - 0.1).abs() < 1e-6);
    }

    #[test]
    fn clipping_bounds_the_norm() {
        let mut g = [3.0f32, 4.0];
        let sum_sq = sum_of_squares(&g);
        let norm = clip_by_global_norm(&mut g, sum_sq, 1.0);
        assert!((norm - 5.0).abs() < 1e-6);
        assert!((sum_of_squares(&g).sqrt() - 1.0).abs() < 1e-4);
    }
}
