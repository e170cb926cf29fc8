//! The error type of the models layer.

use std::ops::Range;

/// Everything that can go wrong when building, slicing, running or (re)loading a built-in model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A model dimension is zero or inconsistent with another one.
    #[error("model {model}: invalid {what}: {why}")]
    InvalidSpec {
        /// Which model (`mlp`, `cnn`, `gpt`).
        model: &'static str,
        /// The parameter at fault, e.g. `n_embd`.
        what: &'static str,
        /// Why it is refused, with the values involved.
        why: String,
    },
    /// A block range is empty, reversed or outside the model.
    #[error("model {model}: block range {range:?} is not a non-empty part of 0..{num_blocks}")]
    BadRange {
        /// Which model.
        model: &'static str,
        /// The range asked for.
        range: Range<usize>,
        /// How many blocks the full model has.
        num_blocks: usize,
    },
    /// A forward asked for a block this slice (pipeline stage) does not hold.
    #[error("model {model}: block {block} is not held by this slice (it holds blocks {held:?})")]
    BlockNotHeld {
        /// Which model.
        model: &'static str,
        /// The missing block.
        block: usize,
        /// The blocks this slice holds.
        held: Range<usize>,
    },
    /// The activation given to a block has the wrong shape.
    #[error("model {model}: block {block} ({kind}) expects an input of shape {expected}, got {got:?}")]
    BadInput {
        /// Which model.
        model: &'static str,
        /// The block that refused the input.
        block: usize,
        /// The block's kind (`dense`, `conv`, `embedding`, `transformer`, `lm_head`).
        kind: &'static str,
        /// The accepted shape, in words.
        expected: String,
        /// The shape received.
        got: Vec<usize>,
    },
    /// The logits or targets given to the loss do not fit together.
    #[error("loss: logits of shape {logits:?} and targets of shape {targets:?} do not match {classes} classes")]
    BadTargets {
        /// The logits' shape.
        logits: Vec<usize>,
        /// The targets' shape.
        targets: Vec<usize>,
        /// The number of classes per target.
        classes: usize,
    },
}
