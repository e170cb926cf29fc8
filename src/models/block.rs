//! The unit of slicing: one block of a model, and what every block can do.

use burn::module::Module;
use burn::tensor::Tensor;

use super::conv::ConvBlock;
use super::dense::DenseBlock;
use super::gpt::{EmbeddingBlock, LmHeadBlock, TpTransformerBlock, TransformerBlock};

/// One block of a built-in model. Every block maps a `[batch, features]` activation to another
/// `[batch, features]` activation (see the module docs for each model's widths).
///
/// The variant name is not part of parameter names: block 3's query/key/value weight is
/// `blocks.3.qkv.weight`, see [`crate::parallel::params`].
// A transformer block's handles are ~1 KB, the others' a few hundred bytes; a model holds a
// few dozen blocks at most, and burn's `Module` is not implemented for `Box`, so no indirection.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Block {
    /// Linear (+ ReLU): the MLP's blocks and the CNN's classifier blocks.
    Dense(DenseBlock),
    /// 3x3 convolution + ReLU + 2x2 max pooling.
    Conv(ConvBlock),
    /// GPT token + position embedding (its input is float token ids).
    Embedding(EmbeddingBlock),
    /// GPT pre-LN transformer layer.
    Transformer(TransformerBlock),
    /// One tensor-parallel rank's share of a GPT transformer layer (`parallel.tensor > 1`).
    TpTransformer(TpTransformerBlock),
    /// GPT final norm + language-model head.
    LmHead(LmHeadBlock),
}

impl Block {
    /// The block's kind, as used in error messages: `dense`, `conv`, `embedding`, `transformer`,
    /// `lm_head`.
    pub fn kind(&self) -> &'static str {
        match self {
            Block::Dense(_) => "dense",
            Block::Conv(_) => "conv",
            Block::Embedding(_) => "embedding",
            Block::Transformer(_) | Block::TpTransformer(_) => "transformer",
            Block::LmHead(_) => "lm_head",
        }
    }

    /// `Ok` if this block accepts a `[batch, width]` input, otherwise the accepted shape in words.
    pub fn check_input(&self, dims: [usize; 2]) -> Result<(), String> {
        let [batch, width] = dims;
        let (ok, expected) = match self {
            Block::Dense(b) => (width == b.d_input(), format!("[batch, {}]", b.d_input())),
            Block::Conv(b) => {
                let [c, h, w] = b.input;
                (width == c * h * w, format!("[batch, {c}*{h}*{w} = {}]", c * h * w))
            }
            Block::Embedding(b) => (
                (1..=b.block_size()).contains(&width),
                format!("[batch, seq] float token ids with 1 <= seq <= {}", b.block_size()),
            ),
            Block::Transformer(b) => {
                let d = b.n_embd();
                (width > 0 && width % d == 0, format!("[batch, seq * {d}]"))
            }
            Block::TpTransformer(b) => {
                let d = b.n_embd();
                (width > 0 && width % d == 0, format!("[batch, seq * {d}]"))
            }
            Block::LmHead(b) => {
                let d = b.n_embd();
                (width > 0 && width % d == 0, format!("[batch, seq * {d}]"))
            }
        };
        if ok && batch > 0 {
            Ok(())
        } else {
            Err(format!("{expected} with batch > 0"))
        }
    }

    /// Runs the block on a `[batch, width]` activation the caller has checked with
    /// [`Block::check_input`]. A tensor-parallel share runs its segments back to back, which is
    /// the layer only when it is split one way (the trainer runs the segments and their sums).
    pub(crate) fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        match self {
            Block::Dense(b) => b.forward(x),
            Block::Conv(b) => b.forward(x),
            Block::Embedding(b) => b.forward(x),
            Block::Transformer(b) => b.forward(x),
            Block::TpTransformer(b) => b.forward_segment(b.forward_segment(x, 0), 1),
            Block::LmHead(b) => b.forward(x),
        }
    }

    /// Segments the block runs as (2 for a tensor-parallel transformer share, else 1).
    pub fn segments(&self) -> usize {
        match self {
            Block::TpTransformer(_) => 2,
            _ => 1,
        }
    }

    /// Segment `segment` of the block: the whole block, or a tensor-parallel share's partial
    /// output (see [`TpTransformerBlock`]).
    pub(crate) fn forward_segment(&self, x: Tensor<2>, segment: usize) -> Tensor<2> {
        match self {
            Block::TpTransformer(b) => b.forward_segment(x, segment),
            other => other.forward(x),
        }
    }
}
