//! The blocks of a small GPT (decoder-only, pre-LN, learned positions; nanoGPT's layout).
//!
//! Between blocks the activation is `[batch, seq * n_embd]` (flattened so every model's activations
//! are `Tensor<2>`); each block reshapes it to `[batch, seq, n_embd]` inside. The token ids enter the
//! first block as FLOAT values `[batch, seq]` (exact for ids below 2^24) and are cast to integers
//! there, so a pipeline stage sends and receives one kind of tensor only.

use burn::module::{Module, Param};
use burn::nn::{LayerNorm, LayerNormConfig, Linear};
use burn::tensor::activation::{gelu, softmax};
use burn::tensor::module::embedding;
use burn::tensor::{Bool, Device, Tensor};

use super::init::{constant_param, linear_normal, normal_param};
use crate::rng::SplitMix64;

/// Standard deviation of GPT-2's weight and embedding initialisation.
const INIT_STD: f32 = 0.02;
/// Width of the MLP inside a transformer block, in multiples of `n_embd`.
const MLP_RATIO: usize = 4;
/// Layer-norm epsilon (PyTorch's default).
const LN_EPSILON: f64 = 1e-5;

/// A layer norm over `d` features with scale 1 and shift 0 (created eagerly, see `init`).
fn layer_norm(d: usize, device: &Device) -> LayerNorm {
    let mut norm = LayerNormConfig::new(d).with_epsilon(LN_EPSILON).init(device);
    norm.gamma = constant_param([d], 1.0, device);
    norm.beta = Some(constant_param([d], 0.0, device));
    norm
}

/// Token embedding plus learned position embedding.
/// Parameters: `token_embedding` `[vocab, n_embd]`, `position_embedding` `[block_size, n_embd]`.
#[derive(Module, Debug)]
pub struct EmbeddingBlock {
    /// One row per token id.
    pub token_embedding: Param<Tensor<2>>,
    /// One row per position `0..block_size`.
    pub position_embedding: Param<Tensor<2>>,
}

impl EmbeddingBlock {
    pub(crate) fn new(vocab: usize, block_size: usize, n_embd: usize, rng: &mut SplitMix64, device: &Device) -> Self {
        Self {
            token_embedding: normal_param([vocab, n_embd], INIT_STD, rng, device),
            position_embedding: normal_param([block_size, n_embd], INIT_STD, rng, device),
        }
    }

    /// The longest sequence this block accepts.
    pub fn block_size(&self) -> usize {
        self.position_embedding.lazy_shape()[0]
    }

    /// The embedding width.
    pub fn n_embd(&self) -> usize {
        self.token_embedding.lazy_shape()[1]
    }

    /// Float token ids `[batch, seq]` -> `[batch, seq * n_embd]`.
    pub(crate) fn forward(&self, ids: Tensor<2>) -> Tensor<2> {
        let [batch, seq] = ids.dims();
        let n_embd = self.n_embd();
        let tokens = embedding(self.token_embedding.val(), ids.int()); // [batch, seq, n_embd]
        let positions = self
            .position_embedding
            .val()
            .narrow(0, 0, seq)
            .reshape([1, seq, n_embd]); // [1, seq, n_embd]
        (tokens + positions).reshape([batch, seq * n_embd])
    }
}

/// One pre-LN transformer layer: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
/// Parameters: `ln1.{gamma,beta}`, `qkv.{weight,bias}` `[n_embd, 3 n_embd]`,
/// `attn_proj.{weight,bias}`, `ln2.{gamma,beta}`, `fc.{weight,bias}` `[n_embd, 4 n_embd]`,
/// `fc_proj.{weight,bias}` `[4 n_embd, n_embd]`.
#[derive(Module, Debug)]
pub struct TransformerBlock {
    /// Norm before attention.
    pub ln1: LayerNorm,
    /// Query, key and value projections side by side.
    pub qkv: Linear,
    /// Output projection of the attention.
    pub attn_proj: Linear,
    /// Norm before the MLP.
    pub ln2: LayerNorm,
    /// MLP expansion.
    pub fc: Linear,
    /// MLP projection back to `n_embd`.
    pub fc_proj: Linear,
    /// Number of attention heads (divides `n_embd`).
    #[module(skip)]
    pub n_head: usize,
}

impl TransformerBlock {
    pub(crate) fn new(n_embd: usize, n_head: usize, n_layer: usize, rng: &mut SplitMix64, device: &Device) -> Self {
        // GPT-2 scales the projections that write into the residual stream by 1/sqrt(2 n_layer),
        // so the stream's variance does not grow with depth.
        let residual_std = INIT_STD / ((2 * n_layer) as f32).sqrt();
        Self {
            ln1: layer_norm(n_embd, device),
            qkv: linear_normal(n_embd, 3 * n_embd, INIT_STD, true, rng, device),
            attn_proj: linear_normal(n_embd, n_embd, residual_std, true, rng, device),
            ln2: layer_norm(n_embd, device),
            fc: linear_normal(n_embd, MLP_RATIO * n_embd, INIT_STD, true, rng, device),
            fc_proj: linear_normal(MLP_RATIO * n_embd, n_embd, residual_std, true, rng, device),
            n_head,
        }
    }

    /// The embedding width.
    pub fn n_embd(&self) -> usize {
        self.qkv.weight.lazy_shape()[0]
    }

    /// `[batch, seq * n_embd] -> [batch, seq * n_embd]`.
    pub(crate) fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let [batch, width] = x.dims();
        let n_embd = self.n_embd();
        let seq = width / n_embd;
        let x = x.reshape([batch, seq, n_embd]); // [batch, seq, n_embd]
        let x = x.clone() + self.attention(self.ln1.forward(x));
        let hidden = gelu(self.fc.forward(self.ln2.forward(x.clone()))); // [batch, seq, 4 n_embd]
        let x = x + self.fc_proj.forward(hidden);
        x.reshape([batch, width])
    }

    /// Causal multi-head self-attention, `[batch, seq, n_embd] -> [batch, seq, n_embd]`.
    fn attention(&self, x: Tensor<3>) -> Tensor<3> {
        let [batch, seq, n_embd] = x.dims();
        let head_dim = n_embd / self.n_head;
        let qkv = self.qkv.forward(x); // [batch, seq, 3 n_embd]
        let split_heads = |t: Tensor<3>| t.reshape([batch, seq, self.n_head, head_dim]).swap_dims(1, 2);
        let q = split_heads(qkv.clone().narrow(2, 0, n_embd)); // [batch, heads, seq, head_dim]
        let k = split_heads(qkv.clone().narrow(2, n_embd, n_embd)); // [batch, heads, seq, head_dim]
        let v = split_heads(qkv.narrow(2, 2 * n_embd, n_embd)); // [batch, heads, seq, head_dim]

        let scores = q.matmul(k.swap_dims(2, 3)) / (head_dim as f64).sqrt(); // [batch, heads, seq, seq]
                                                                             // Position i may attend to positions j <= i only: -inf above the diagonal. burn's
                                                                             // `tril_mask` marks the cells OUTSIDE the lower triangle, i.e. exactly those to hide.
        let hidden = Tensor::<2, Bool>::tril_mask([seq, seq], 0, &scores.device()); // [seq, seq]
        let causal = Tensor::<2>::zeros([seq, seq], &scores.device())
            .mask_fill(hidden, f32::NEG_INFINITY)
            .reshape([1, 1, seq, seq]); // [1, 1, seq, seq]
        let weights = softmax(scores + causal, 3); // [batch, heads, seq, seq]
        let y = weights.matmul(v); // [batch, heads, seq, head_dim]
        let y = y.swap_dims(1, 2).reshape([batch, seq, n_embd]); // [batch, seq, n_embd]
        self.attn_proj.forward(y)
    }
}

/// Final layer norm and the language-model head (no bias).
/// Parameters: `ln_f.{gamma,beta}`, `lm_head.weight` `[n_embd, vocab]`.
#[derive(Module, Debug)]
pub struct LmHeadBlock {
    /// The final norm.
    pub ln_f: LayerNorm,
    /// Projection to one logit per vocabulary entry.
    pub lm_head: Linear,
}

impl LmHeadBlock {
    pub(crate) fn new(n_embd: usize, vocab: usize, rng: &mut SplitMix64, device: &Device) -> Self {
        Self {
            ln_f: layer_norm(n_embd, device),
            lm_head: linear_normal(n_embd, vocab, INIT_STD, false, rng, device),
        }
    }

    /// The embedding width.
    pub fn n_embd(&self) -> usize {
        self.lm_head.weight.lazy_shape()[0]
    }

    /// The vocabulary size.
    pub fn vocab(&self) -> usize {
        self.lm_head.weight.lazy_shape()[1]
    }

    /// `[batch, seq * n_embd] -> [batch, seq * vocab]` logits.
    pub(crate) fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let [batch, width] = x.dims();
        let n_embd = self.n_embd();
        let seq = width / n_embd;
        let x = x.reshape([batch, seq, n_embd]); // [batch, seq, n_embd]
        let logits = self.lm_head.forward(self.ln_f.forward(x)); // [batch, seq, vocab]
        logits.reshape([batch, seq * self.vocab()])
    }
}
