//! The dynamic loss scaler for f16 training.
//!
//! The loss is multiplied by `scale` before backward so small gradients survive f16; the
//! gradients are divided by it ([`DynamicLossScaler::unscale`]) before the optimizer. When a
//! gradient overflows (inf or NaN) on any rank, every rank skips the step and the scale backs off;
//! after `growth_interval` good steps in a row it grows again (Micikevicius et al., 2018; torch's
//! `GradScaler`, apex's dynamic scaler). The overflow is agreed with ONE all-reduce of one byte per
//! rank, and the first overflowing parameter is named, so a collapsing scale can be traced.

use std::collections::VecDeque;
use std::ops::Range;

use super::error::PrecisionError;
use crate::comm::{ProcessGroup, ReduceOp};

/// Scale events kept in [`DynamicLossScaler::history`]; older ones are dropped.
pub const HISTORY_CAPACITY: usize = 1024;

/// The scaler's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossScalerOptions {
    /// The first scale. Default 2^16 (torch's `GradScaler`): large, and the first overflows bring
    /// it down within a few steps.
    pub init_scale: f32,
    /// Good steps in a row before the scale grows. Default 2000 (torch, apex).
    pub growth_interval: u64,
    /// Factor applied on overflow, in (0, 1). Default 0.5.
    pub backoff_factor: f32,
    /// Factor applied after `growth_interval` good steps, above 1. Default 2.0.
    pub growth_factor: f32,
    /// The scale never backs off below this. Default 1.0: below it, scaling no longer helps.
    pub min_scale: f32,
    /// The scale never grows above this. Default 2^24 (apex's `max_loss_scale`): larger scales
    /// only buy overflows.
    pub max_scale: f32,
    /// Stop with [`PrecisionError::Collapsed`] after this many overflowing steps in a row at
    /// `min_scale`; `None` never stops. Default `Some(20)`: fairseq stops at the first one, we
    /// tolerate a short burst of bad batches.
    pub max_overflows_at_min_scale: Option<u64>,
}

impl Default for LossScalerOptions {
    fn default() -> Self {
        Self {
            init_scale: 65536.0,
            growth_interval: 2000,
            backoff_factor: 0.5,
            growth_factor: 2.0,
            min_scale: 1.0,
            max_scale: 16_777_216.0,
            max_overflows_at_min_scale: Some(20),
        }
    }
}

impl LossScalerOptions {
    /// Checks every range.
    pub fn validate(&self) -> Result<(), PrecisionError> {
        let bad = |key, value: f64, reason| {
            Err(PrecisionError::InvalidOption {
                key,
                value: value.to_string(),
                reason,
            })
        };
        if !(self.min_scale > 0.0 && self.min_scale.is_finite()) {
            return bad("min_scale", self.min_scale.into(), "must be a positive finite number");
        }
        if !(self.max_scale >= self.min_scale && self.max_scale.is_finite()) {
            return bad(
                "max_scale",
                self.max_scale.into(),
                "must be finite and at least min_scale",
            );
        }
        if !(self.init_scale >= self.min_scale && self.init_scale <= self.max_scale) {
            return bad(
                "init_scale",
                self.init_scale.into(),
                "must be within [min_scale, max_scale]",
            );
        }
        if !(self.backoff_factor > 0.0 && self.backoff_factor < 1.0) {
            return bad("backoff_factor", self.backoff_factor.into(), "must be in (0, 1)");
        }
        if !(self.growth_factor > 1.0 && self.growth_factor.is_finite()) {
            return bad(
                "growth_factor",
                self.growth_factor.into(),
                "must be a finite number above 1",
            );
        }
        if self.growth_interval == 0 {
            return bad("growth_interval", 0.0, "must be at least 1 step");
        }
        if self.max_overflows_at_min_scale == Some(0) {
            return bad(
                "max_overflows_at_min_scale",
                0.0,
                "must be at least 1 (or unset to never stop)",
            );
        }
        Ok(())
    }
}

/// A named parameter's elements in the flat gradient vector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpan<'a> {
    /// The parameter's name (as in checkpoints).
    pub name: &'a str,
    /// Its elements in the flat gradient.
    pub elements: Range<usize>,
}

impl<'a> ParamSpan<'a> {
    /// Consecutive spans for parameters laid out in order: `names[i]` has `numels[i]` elements.
    pub fn from_numels(names: &'a [String], numels: &[usize]) -> Vec<ParamSpan<'a>> {
        let mut start = 0;
        names
            .iter()
            .zip(numels)
            .map(|(name, &numel)| {
                let span = ParamSpan {
                    name,
                    elements: start..start + numel,
                };
                start += numel;
                span
            })
            .collect()
    }
}

/// What [`DynamicLossScaler::check_and_update`] decided. Identical on every rank except
/// `first_overflow`, which only the overflowing ranks know.
#[derive(Debug, Clone, PartialEq)]
pub struct StepDecision {
    /// Skip the optimizer step (and the gradient sync): some rank overflowed.
    pub skip: bool,
    /// The first parameter, in the order given, whose gradient has inf or NaN on this rank.
    pub first_overflow: Option<String>,
    /// Group ranks whose gradients overflowed (empty when none did).
    pub overflow_ranks: Vec<usize>,
    /// The scale for the next step.
    pub scale: f32,
    /// The scale these gradients carry (the one in force at backward, before this decision grew
    /// or backed it off): divide by it ([`StepDecision::unscale`]).
    pub scale_used: f32,
}

impl StepDecision {
    /// Divides the gradients by the scale they were computed with.
    pub fn unscale(&self, grads: &mut [f32]) {
        let inverse = 1.0 / self.scale_used;
        grads.iter_mut().for_each(|g| *g *= inverse);
    }
}

/// Why the scale changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleEventKind {
    /// A rank overflowed: the step was skipped and the scale backed off (or stayed at the minimum).
    Overflow,
    /// `growth_interval` good steps in a row: the scale grew (or stayed at the maximum).
    Growth,
}

/// One entry of the scale history.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleEvent {
    /// The optimizer step.
    pub step: u64,
    /// What happened.
    pub kind: ScaleEventKind,
    /// Scale before.
    pub scale_before: f32,
    /// Scale after.
    pub scale_after: f32,
    /// Group ranks that overflowed (empty for growth).
    pub overflow_ranks: Vec<usize>,
    /// The first overflowing parameter on this rank, if this rank overflowed.
    pub first_overflow: Option<String>,
}

/// Dynamic loss scaling with overflows agreed across ranks.
#[derive(Debug, Clone, PartialEq)]
pub struct DynamicLossScaler {
    /// The current scale: multiply the loss by it before backward.
    pub scale: f32,
    /// Good steps in a row before growth.
    pub growth_interval: u64,
    /// Factor on overflow.
    pub backoff_factor: f32,
    /// Factor on growth.
    pub growth_factor: f32,
    /// Lower bound of the scale.
    pub min_scale: f32,
    /// Upper bound of the scale.
    pub max_scale: f32,
    /// Stop after this many overflows in a row at `min_scale` (`None`: never).
    pub max_overflows_at_min_scale: Option<u64>,
    /// Good steps since the last overflow or growth.
    pub good_steps: u64,
    /// Steps skipped since the start.
    pub skipped_steps: u64,
    /// Overflowing steps in a row while at `min_scale`.
    pub overflows_at_min_scale: u64,
    /// The last [`HISTORY_CAPACITY`] scale events, oldest first.
    pub history: VecDeque<ScaleEvent>,
}

impl Default for DynamicLossScaler {
    fn default() -> Self {
        Self::from_valid(&LossScalerOptions::default())
    }
}

impl DynamicLossScaler {
    /// A scaler with these options, checked.
    pub fn new(options: &LossScalerOptions) -> Result<Self, PrecisionError> {
        options.validate()?;
        Ok(Self::from_valid(options))
    }

    fn from_valid(o: &LossScalerOptions) -> Self {
        Self {
            scale: o.init_scale,
            growth_interval: o.growth_interval,
            backoff_factor: o.backoff_factor,
            growth_factor: o.growth_factor,
            min_scale: o.min_scale,
            max_scale: o.max_scale,
            max_overflows_at_min_scale: o.max_overflows_at_min_scale,
            good_steps: 0,
            skipped_steps: 0,
            overflows_at_min_scale: 0,
            history: VecDeque::new(),
        }
    }

    /// Looks for inf/NaN in this rank's (still scaled) gradients, agrees with every rank of `group`
    /// (`None`: a single process) in one all-reduce of one byte per rank, and updates the scale:
    /// on an overflow anywhere, every rank skips, the scale backs off (not below `min_scale`) and
    /// the good-step count restarts; after `growth_interval` good steps, it grows (not above
    /// `max_scale`).
    ///
    /// `group` must span every rank whose gradients feed this optimizer step (the world group under
    /// pipeline parallelism, not only the data-parallel one). `params` name the gradient's
    /// elements, in model order, for the report. Errors: the collective failed, a span is out of
    /// range, or the scale collapsed ([`PrecisionError::Collapsed`]).
    pub fn check_and_update(
        &mut self,
        group: Option<&ProcessGroup>,
        step: u64,
        grads: &[f32],
        params: &[ParamSpan<'_>],
    ) -> Result<StepDecision, PrecisionError> {
        let rank = group.map_or(0, ProcessGroup::rank);
        if let Some(span) = params
            .iter()
            .find(|s| s.elements.end > grads.len() || s.elements.start > s.elements.end)
        {
            return Err(PrecisionError::Span {
                rank,
                name: span.name.to_string(),
                elements: span.elements.clone(),
                numel: grads.len(),
            });
        }
        let first_overflow = first_non_finite(grads).map(|index| {
            params
                .iter()
                .find(|s| !all_finite(&grads[s.elements.clone()]))
                .map_or_else(
                    || format!("element {index} (outside every named parameter)"),
                    |s| s.name.to_string(),
                )
        });

        // One byte per rank, max-reduced: every rank learns who overflowed.
        let overflow_ranks = match group {
            Some(group) => {
                let mut flags = vec![0u8; group.world_size()];
                flags[rank] = u8::from(first_overflow.is_some());
                group
                    .all_reduce(&mut flags, ReduceOp::Max)
                    .map_err(|source| PrecisionError::Comm { step, source })?;
                flags
                    .iter()
                    .enumerate()
                    .filter(|(_, &f)| f != 0)
                    .map(|(r, _)| r)
                    .collect()
            }
            None => first_overflow.iter().map(|_| 0).collect::<Vec<usize>>(),
        };
        let skip = !overflow_ranks.is_empty();
        let scale_before = self.scale;

        if skip {
            self.skipped_steps += 1;
            self.good_steps = 0;
            if self.scale <= self.min_scale {
                self.overflows_at_min_scale += 1;
            }
            self.scale = (self.scale * self.backoff_factor).max(self.min_scale);
            self.record(ScaleEvent {
                step,
                kind: ScaleEventKind::Overflow,
                scale_before,
                scale_after: self.scale,
                overflow_ranks: overflow_ranks.clone(),
                first_overflow: first_overflow.clone(),
            });
            if let Some(limit) = self.max_overflows_at_min_scale {
                if self.overflows_at_min_scale >= limit {
                    return Err(PrecisionError::Collapsed {
                        step,
                        scale: self.scale,
                        consecutive: self.overflows_at_min_scale,
                        ranks: overflow_ranks,
                        rank,
                        first_param: first_overflow.unwrap_or_else(|| "none on this rank".to_string()),
                    });
                }
            }
        } else {
            self.good_steps += 1;
            self.overflows_at_min_scale = 0;
            if self.good_steps >= self.growth_interval {
                self.good_steps = 0;
                self.scale = (self.scale * self.growth_factor).min(self.max_scale);
                self.record(ScaleEvent {
                    step,
                    kind: ScaleEventKind::Growth,
                    scale_before,
                    scale_after: self.scale,
                    overflow_ranks: Vec::new(),
                    first_overflow: None,
                });
            }
        }
        Ok(StepDecision {
            skip,
            first_overflow,
            overflow_ranks,
            scale: self.scale,
            scale_used: scale_before,
        })
    }

    /// Divides the gradients by the current scale. After [`DynamicLossScaler::check_and_update`]
    /// the scale may already have grown: unscale with [`StepDecision::unscale`] then.
    pub fn unscale(&self, grads: &mut [f32]) {
        let inverse = 1.0 / self.scale;
        grads.iter_mut().for_each(|g| *g *= inverse);
    }

    fn record(&mut self, event: ScaleEvent) {
        if self.history.len() == HISTORY_CAPACITY {
            self.history.pop_front();
        }
        self.history.push_back(event);
    }
}

/// True when every element is finite (`x * 0` is NaN exactly for inf and NaN; eight lanes vectorise).
fn all_finite(values: &[f32]) -> bool {
    let mut lanes = [0f32; 8];
    let chunks = values.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|&x| x * 0.0).sum();
    for chunk in chunks {
        lanes.iter_mut().zip(chunk).for_each(|(lane, &x)| *lane += x * 0.0);
    }
    lanes.iter().sum::<f32>() + tail == 0.0
}

/// Index of the first inf or NaN, if any (a fast pass first: overflow is rare).
fn first_non_finite(values: &[f32]) -> Option<usize> {
    if all_finite(values) {
        None
    } else {
        values.iter().position(|x| !x.is_finite())
    }
}
