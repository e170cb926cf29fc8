//! What a built-in model is, in plain numbers, and how its blocks are laid out.
//!
//! The spec knows each block's parameter count and activation widths without building anything,
//! so a pipeline can plan a balanced split and agree on activation shapes before any rank holds
//! a tensor.

use std::ops::Range;

use burn::tensor::Device;

use super::block::Block;
use super::conv::{ConvBlock, KERNEL};
use super::dense::DenseBlock;
use super::error::ModelError;
use super::gpt::{EmbeddingBlock, LmHeadBlock, TpTransformerBlock, TransformerBlock};
use super::init::block_rng;

/// Token ids travel as f32 between the data and the embedding block: every integer below 2^24
/// is exact in f32, larger vocabularies are refused.
const MAX_VOCAB: usize = 1 << 24;
/// The MLP inside a GPT layer is this many times wider than `n_embd` (kept in sync with `gpt.rs`).
const GPT_MLP_RATIO: usize = 4;

/// A built-in model, described by plain numbers. Block order (the pipeline's split points):
///
/// - `Mlp`: `hidden.len()` blocks `Linear + ReLU`, then one `Linear` to `classes` logits.
///   Input `[batch, input]`, output `[batch, classes]`.
/// - `Cnn`: one `conv3x3(pad 1) + ReLU + maxpool2x2` block per entry of `channels`, then one
///   `Linear + ReLU` block per entry of `hidden`, then one `Linear` to `classes`. Input
///   `[batch, c*h*w]` (images flattened row-major from `[c, h, w]`), output `[batch, classes]`.
/// - `Gpt`: an embedding block (token + learned position), `n_layer` pre-LN transformer blocks
///   (causal self-attention + MLP), and a final `LayerNorm + LM head` block. Input `[batch, seq]`
///   float token ids (`seq <= block_size`), output `[batch, seq * vocab]` logits; between blocks
///   `[batch, seq * n_embd]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSpec {
    /// Multi-layer perceptron.
    Mlp {
        /// Input features.
        input: usize,
        /// Width of each hidden layer (may be empty: a linear classifier).
        hidden: Vec<usize>,
        /// Number of classes (logits).
        classes: usize,
    },
    /// Small convolutional network.
    Cnn {
        /// Per-sample image shape `[channels, height, width]`.
        input: [usize; 3],
        /// Output channels of each convolution block (each halves height and width).
        channels: Vec<usize>,
        /// Width of each hidden linear layer after flattening (may be empty).
        hidden: Vec<usize>,
        /// Number of classes (logits).
        classes: usize,
    },
    /// Small character-level GPT.
    Gpt {
        /// Vocabulary size (token ids `0..vocab`).
        vocab: usize,
        /// Longest sequence (number of learned positions).
        block_size: usize,
        /// Number of transformer blocks.
        n_layer: usize,
        /// Attention heads per block (divides `n_embd`).
        n_head: usize,
        /// Embedding width.
        n_embd: usize,
    },
}

/// How one block is built: the spec resolved to the dimensions of a single block.
#[derive(Debug, Clone, Copy)]
enum BlockPlan {
    Dense {
        d_input: usize,
        d_output: usize,
        relu: bool,
    },
    Conv {
        input: [usize; 3],
        c_out: usize,
    },
    Embedding {
        vocab: usize,
        block_size: usize,
        n_embd: usize,
    },
    Transformer {
        n_embd: usize,
        n_head: usize,
        n_layer: usize,
    },
    LmHead {
        n_embd: usize,
        vocab: usize,
    },
}

impl ModelSpec {
    /// The model's short name: `mlp`, `cnn` or `gpt`.
    pub fn name(&self) -> &'static str {
        match self {
            ModelSpec::Mlp { .. } => "mlp",
            ModelSpec::Cnn { .. } => "cnn",
            ModelSpec::Gpt { .. } => "gpt",
        }
    }

    /// Checks every dimension; every error names the parameter and the values involved.
    pub fn validate(&self) -> Result<(), ModelError> {
        let model = self.name();
        let invalid = |what: &'static str, why: String| Err(ModelError::InvalidSpec { model, what, why });
        let nonzero = |what: &'static str, value: usize| {
            if value == 0 {
                invalid(what, "must be at least 1".to_string())
            } else {
                Ok(())
            }
        };
        let nonzero_list = |what: &'static str, values: &[usize]| {
            if values.contains(&0) {
                invalid(what, format!("{values:?} contains a zero width"))
            } else {
                Ok(())
            }
        };
        match self {
            ModelSpec::Mlp { input, hidden, classes } => {
                nonzero("input", *input)?;
                nonzero_list("hidden", hidden)?;
                nonzero("classes", *classes)
            }
            ModelSpec::Cnn {
                input,
                channels,
                hidden,
                classes,
            } => {
                if input.contains(&0) {
                    return invalid("input", format!("image shape {input:?} contains a zero"));
                }
                nonzero_list("channels", channels)?;
                nonzero_list("hidden", hidden)?;
                nonzero("classes", *classes)?;
                // Each convolution block halves height and width (floor): they must stay >= 1.
                let halvings = channels.len();
                let [_, h, w] = *input;
                if (h >> halvings.min(63)) == 0 || (w >> halvings.min(63)) == 0 {
                    return invalid(
                        "channels",
                        format!("{halvings} conv blocks halve the {h}x{w} image below 1x1 (each block pools 2x2)"),
                    );
                }
                Ok(())
            }
            ModelSpec::Gpt {
                vocab,
                block_size,
                n_layer: _,
                n_head,
                n_embd,
            } => {
                nonzero("vocab", *vocab)?;
                if *vocab > MAX_VOCAB {
                    return invalid(
                        "vocab",
                        format!("{vocab} is above 2^24: token ids travel as f32 and would lose precision"),
                    );
                }
                nonzero("block_size", *block_size)?;
                nonzero("n_head", *n_head)?;
                nonzero("n_embd", *n_embd)?;
                if n_embd % n_head != 0 {
                    return invalid(
                        "n_embd",
                        format!("n_embd = {n_embd} is not divisible by n_head = {n_head}"),
                    );
                }
                Ok(())
            }
        }
    }

    /// Number of blocks of the full model.
    pub fn num_blocks(&self) -> usize {
        match self {
            ModelSpec::Mlp { hidden, .. } => hidden.len() + 1,
            ModelSpec::Cnn { channels, hidden, .. } => channels.len() + hidden.len() + 1,
            ModelSpec::Gpt { n_layer, .. } => n_layer + 2,
        }
    }

    /// Number of logits per target: `classes`, or `vocab` for the GPT.
    pub fn classes(&self) -> usize {
        match self {
            ModelSpec::Mlp { classes, .. } | ModelSpec::Cnn { classes, .. } => *classes,
            ModelSpec::Gpt { vocab, .. } => *vocab,
        }
    }

    /// Width of a sample at the model's input: features (MLP), `c*h*w` (CNN), `block_size` (GPT,
    /// the longest accepted sequence; shorter ones are accepted too).
    pub fn input_width(&self) -> usize {
        match self {
            ModelSpec::Mlp { input, .. } => *input,
            ModelSpec::Cnn { input, .. } => input.iter().product(),
            ModelSpec::Gpt { block_size, .. } => *block_size,
        }
    }

    /// Width of the activation ENTERING block `block` (`block == num_blocks()` gives the output
    /// width, i.e. the logits), for a model input of width `input_width` (only the GPT depends on
    /// it: there `input_width` is the sequence length). What a pipeline stage must expect to
    /// receive: `[micro_batch, activation_width(first block of the stage, ...)]`.
    pub fn activation_width(&self, block: usize, input_width: usize) -> Result<usize, ModelError> {
        let num_blocks = self.num_blocks();
        if block > num_blocks {
            return Err(ModelError::BadRange {
                model: self.name(),
                range: block..block + 1,
                num_blocks,
            });
        }
        if block == num_blocks {
            return Ok(match self {
                ModelSpec::Gpt { vocab, .. } => input_width * vocab,
                _ => self.classes(),
            });
        }
        Ok(match self.plan(block) {
            BlockPlan::Dense { d_input, .. } => d_input,
            BlockPlan::Conv { input, .. } => input.iter().product(),
            BlockPlan::Embedding { .. } => input_width,
            BlockPlan::Transformer { n_embd, .. } | BlockPlan::LmHead { n_embd, .. } => input_width * n_embd,
        })
    }

    /// The number of parameter values of each block of the full model, in block order (for a
    /// balanced pipeline partition). Equal to `Module::num_params` of the built block. Saturates
    /// at `usize::MAX` instead of wrapping: a model that large is refused by the memory estimate,
    /// never built.
    pub fn block_param_counts(&self) -> Vec<usize> {
        (0..self.num_blocks())
            .map(|block| match self.plan(block) {
                BlockPlan::Dense { d_input, d_output, .. } => d_input.saturating_mul(d_output).saturating_add(d_output),
                BlockPlan::Conv { input, c_out } => c_out
                    .saturating_mul(input[0])
                    .saturating_mul(KERNEL * KERNEL)
                    .saturating_add(c_out),
                BlockPlan::Embedding {
                    vocab,
                    block_size,
                    n_embd,
                } => vocab.saturating_add(block_size).saturating_mul(n_embd),
                BlockPlan::Transformer { n_embd: d, .. } => {
                    // 2 layer norms, qkv, attention projection, MLP in and out (all with bias):
                    // 4d + 3d^2 + 3d + d^2 + d + 4d^2 + 4d + 4d^2 + d = 12 d^2 + 13 d.
                    d.saturating_mul(d)
                        .saturating_mul(12)
                        .saturating_add(d.saturating_mul(13))
                }
                // Final layer norm and the bias-free head.
                BlockPlan::LmHead { n_embd, vocab } => n_embd.saturating_mul(vocab).saturating_add(2 * n_embd),
            })
            .collect()
    }

    /// Parameter values of the blocks `range` (a pipeline stage; `0..num_blocks()` for the whole
    /// model), saturating like [`ModelSpec::block_param_counts`].
    pub fn param_count(&self, range: Range<usize>) -> usize {
        let counts = self.block_param_counts();
        counts
            .get(range)
            .unwrap_or_default()
            .iter()
            .fold(0usize, |sum, &n| sum.saturating_add(n))
    }

    /// Activation values one sample keeps alive through block `block` (`< num_blocks()`) for the
    /// backward pass, for a model input of width `input_width` (the sequence length of the GPT):
    /// each layer's output and, where a nonlinearity or a softmax follows, its input too. An
    /// estimate for the memory check, not an exact count of burn's tensors.
    pub fn activation_values(&self, block: usize, input_width: usize) -> usize {
        let seq = input_width;
        match self.plan(block) {
            // Linear output, then ReLU output.
            BlockPlan::Dense { d_output, relu, .. } => d_output.saturating_mul(if relu { 2 } else { 1 }),
            // Convolution and ReLU outputs at full size, the pooled output at a quarter.
            BlockPlan::Conv {
                input: [_, h, w],
                c_out,
            } => c_out.saturating_mul(h).saturating_mul(w).saturating_mul(9) / 4,
            BlockPlan::Embedding { n_embd, .. } => seq.saturating_mul(n_embd).saturating_mul(2),
            BlockPlan::Transformer { n_embd, n_head, .. } => {
                // Per position: 2 layer norms, q/k/v, attention output, projection and two
                // residuals (8 n_embd), the MLP's hidden layer before and after GELU (2 x 4
                // n_embd); per head: the attention scores and their softmax (2 seq^2).
                let per_position = n_embd.saturating_mul(8 + 2 * GPT_MLP_RATIO);
                let scores = n_head.saturating_mul(seq).saturating_mul(seq).saturating_mul(2);
                seq.saturating_mul(per_position).saturating_add(scores)
            }
            // Layer norm, logits and their softmax.
            BlockPlan::LmHead { n_embd, vocab } => seq.saturating_mul(n_embd.saturating_add(vocab.saturating_mul(2))),
        }
    }

    /// Checks that `range` is a non-empty part of `0..num_blocks()`.
    pub fn check_range(&self, range: &Range<usize>) -> Result<(), ModelError> {
        let num_blocks = self.num_blocks();
        if range.start < range.end && range.end <= num_blocks {
            Ok(())
        } else {
            Err(ModelError::BadRange {
                model: self.name(),
                range: range.clone(),
                num_blocks,
            })
        }
    }

    /// Builds block `block` (`< num_blocks()`, checked by the caller) with its own generator
    /// derived from `(seed, block)`: the same values whether or not the other blocks are built.
    /// Block `block` as rank `tensor.0` of `tensor.1` tensor-parallel ranks holds it: a GPT
    /// transformer layer's share (built whole with the same draws, then sliced), every other
    /// block whole.
    pub(crate) fn build_block_tp(&self, block: usize, seed: u64, device: &Device, tensor: (usize, usize)) -> Block {
        match self.build_block(block, seed, device) {
            Block::Transformer(full) if tensor.1 > 1 => {
                Block::TpTransformer(TpTransformerBlock::from_full(full, tensor.0, tensor.1, device))
            }
            other => other,
        }
    }

    /// Parameter values of each block as one of `ranks` tensor-parallel ranks holds it.
    pub fn block_param_counts_tp(&self, ranks: usize) -> Vec<usize> {
        let full = self.block_param_counts();
        match self {
            ModelSpec::Gpt { n_embd, n_layer, .. } if ranks > 1 => full
                .iter()
                .enumerate()
                .map(|(b, &count)| {
                    if (1..=*n_layer).contains(&b) {
                        TpTransformerBlock::param_count(*n_embd, ranks)
                    } else {
                        count
                    }
                })
                .collect(),
            _ => full,
        }
    }

    pub(crate) fn build_block(&self, block: usize, seed: u64, device: &Device) -> Block {
        let mut rng = block_rng(seed, block);
        match self.plan(block) {
            BlockPlan::Dense {
                d_input,
                d_output,
                relu,
            } => Block::Dense(DenseBlock::new(d_input, d_output, relu, &mut rng, device)),
            BlockPlan::Conv { input, c_out } => Block::Conv(ConvBlock::new(input, c_out, &mut rng, device)),
            BlockPlan::Embedding {
                vocab,
                block_size,
                n_embd,
            } => Block::Embedding(EmbeddingBlock::new(vocab, block_size, n_embd, &mut rng, device)),
            BlockPlan::Transformer {
                n_embd,
                n_head,
                n_layer,
            } => Block::Transformer(TransformerBlock::new(n_embd, n_head, n_layer, &mut rng, device)),
            BlockPlan::LmHead { n_embd, vocab } => Block::LmHead(LmHeadBlock::new(n_embd, vocab, &mut rng, device)),
        }
    }

    /// Resolves block `block` (`< num_blocks()`) to its dimensions.
    fn plan(&self, block: usize) -> BlockPlan {
        match self {
            ModelSpec::Mlp { input, hidden, classes } => {
                let d_input = if block == 0 { *input } else { hidden[block - 1] };
                match hidden.get(block) {
                    Some(&d_output) => BlockPlan::Dense {
                        d_input,
                        d_output,
                        relu: true,
                    },
                    None => BlockPlan::Dense {
                        d_input,
                        d_output: *classes,
                        relu: false,
                    },
                }
            }
            ModelSpec::Cnn {
                input,
                channels,
                hidden,
                classes,
            } => {
                // Image shape entering each conv block, then the flattened width after the last.
                let mut shape = *input;
                for (i, &c_out) in channels.iter().enumerate() {
                    if i == block {
                        return BlockPlan::Conv { input: shape, c_out };
                    }
                    shape = ConvBlock::output_shape_for(shape, c_out);
                }
                let dense = block - channels.len();
                let d_input = if dense == 0 {
                    shape.iter().product()
                } else {
                    hidden[dense - 1]
                };
                match hidden.get(dense) {
                    Some(&d_output) => BlockPlan::Dense {
                        d_input,
                        d_output,
                        relu: true,
                    },
                    None => BlockPlan::Dense {
                        d_input,
                        d_output: *classes,
                        relu: false,
                    },
                }
            }
            ModelSpec::Gpt {
                vocab,
                block_size,
                n_layer,
                n_head,
                n_embd,
            } => {
                let (vocab, block_size, n_layer, n_head, n_embd) = (*vocab, *block_size, *n_layer, *n_head, *n_embd);
                if block == 0 {
                    BlockPlan::Embedding {
                        vocab,
                        block_size,
                        n_embd,
                    }
                } else if block <= n_layer {
                    BlockPlan::Transformer {
                        n_embd,
                        n_head,
                        n_layer,
                    }
                } else {
                    BlockPlan::LmHead { n_embd, vocab }
                }
            }
        }
    }
}
