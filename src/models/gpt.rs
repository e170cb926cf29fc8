//! The blocks of a small GPT (decoder-only, pre-LN, learned positions; nanoGPT's layout).
//!
//! Between blocks the activation is `[batch, seq * n_embd]` (flattened so every model's activations
//! are `Tensor<2>`); each block reshapes it to `[batch, seq, n_embd]` inside. The token ids enter the
//! first block as FLOAT values `[batch, seq]` (exact for ids below 2^24) and are cast to integers
//! there, so a pipeline stage sends and receives one kind of tensor only.

use burn::module::{Module, Param};
use burn::nn::{LayerNorm, LayerNormConfig, Linear};
use burn::tensor::activation::{gelu, softmax};
use burn::tensor::module::{embedding, linear};
use burn::tensor::{Bool, Device, Tensor, TensorData};

use super::init::{constant_param, linear_normal, normal_param};
use crate::config::TensorSplit;
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
        let n_embd = x.dims()[2];
        self.attn_proj.forward(attend(self.qkv.forward(x), self.n_head, n_embd))
    }
}

/// Causal self-attention of `heads` heads over `width` values per position, from the fused
/// query/key/value projection `qkv` `[batch, seq, 3 width]` (queries, then keys, then values);
/// returns the heads side by side, `[batch, seq, width]`, before the output projection.
fn attend(qkv: Tensor<3>, heads: usize, width: usize) -> Tensor<3> {
    {
        let [batch, seq, _] = qkv.dims();
        let n_embd = width;
        let head_dim = width / heads;
        let split_heads = |t: Tensor<3>| t.reshape([batch, seq, heads, head_dim]).swap_dims(1, 2);
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
        y.swap_dims(1, 2).reshape([batch, seq, n_embd]) // [batch, seq, width]
    }
}

/// One of `ranks` tensor-parallel shares of a [`TransformerBlock`] (Megatron-LM's split), with
/// the same parameter names: `qkv` and `fc` keep `1/ranks` of their output columns
/// (column-parallel; `qkv` the same heads' queries, keys and values, so `n_head / ranks` whole
/// heads), `attn_proj` and `fc_proj` the matching `1/ranks` of their input rows (row-parallel);
/// the layer norms and the two output biases are replicated.
///
/// It runs as two segments, each from a replicated input to a PARTIAL output whose sum over the
/// ranks is the full layer's: segment 0 `x -> x / ranks + attn_share(ln1(x)) + attn_proj.bias /
/// ranks`, segment 1 likewise with the MLP. The trainer sums the partial outputs over the group
/// in forward and the gradients of the segment inputs in backward (the two all-reduces per
/// column/row pair of Megatron); dividing the residual and the replicated bias by `ranks` makes
/// their gradients, too, partial sums, as are the layer norms' (each rank back-propagates
/// through its own heads only), so every replicated parameter's gradient is summed over the
/// group.
#[derive(Module, Debug)]
pub struct TpTransformerBlock {
    /// Norm before attention (replicated).
    pub ln1: LayerNorm,
    /// This rank's heads' query, key and value columns, `[n_embd, 3 n_embd / ranks]`.
    pub qkv: Linear,
    /// The matching rows of the output projection, `[n_embd / ranks, n_embd]`; bias replicated.
    pub attn_proj: Linear,
    /// Norm before the MLP (replicated).
    pub ln2: LayerNorm,
    /// This rank's columns of the MLP expansion, `[n_embd, 4 n_embd / ranks]`.
    pub fc: Linear,
    /// The matching rows of the MLP projection, `[4 n_embd / ranks, n_embd]`; bias replicated.
    pub fc_proj: Linear,
    /// Attention heads of this share (`n_head / ranks`).
    #[module(skip)]
    pub n_head: usize,
    /// Tensor-parallel ranks sharing the layer.
    #[module(skip)]
    pub ranks: usize,
}

impl TpTransformerBlock {
    /// Rank `rank` of `ranks`'s share of `full` (`ranks` divides its heads).
    pub(crate) fn from_full(full: TransformerBlock, rank: usize, ranks: usize, device: &Device) -> Self {
        let n_embd = full.n_embd();
        let split = |field: &str| Self::split(field, n_embd, rank, ranks);
        let take2 = |p: Param<Tensor<2>>, field: &str| match split(field) {
            Some(s) => slice_param(p, &s, device),
            None => p,
        };
        let take1 = |p: Param<Tensor<1>>, field: &str| match split(field) {
            Some(s) => slice_param(p, &s, device),
            None => p,
        };
        let linear = |l: Linear, name: &str| Linear {
            weight: take2(l.weight, &format!("{name}.weight")),
            bias: l.bias.map(|b| take1(b, &format!("{name}.bias"))),
        };
        Self {
            ln1: full.ln1,
            qkv: linear(full.qkv, "qkv"),
            attn_proj: linear(full.attn_proj, "attn_proj"),
            ln2: full.ln2,
            fc: linear(full.fc, "fc"),
            fc_proj: linear(full.fc_proj, "fc_proj"),
            n_head: full.n_head / ranks,
            ranks,
        }
    }

    /// Where rank `rank` of `ranks`'s slice of parameter `field` (`qkv.weight`, `fc.bias`, ...)
    /// of a layer `n_embd` wide lies in the full parameter; `None` for a replicated one.
    pub fn split(field: &str, n_embd: usize, rank: usize, ranks: usize) -> Option<TensorSplit> {
        let hidden = MLP_RATIO * n_embd;
        let (shape, dim, sections) = match field {
            "qkv.weight" => (vec![n_embd, 3 * n_embd], 1, 3),
            "qkv.bias" => (vec![3 * n_embd], 0, 3),
            "attn_proj.weight" => (vec![n_embd, n_embd], 0, 1),
            "fc.weight" => (vec![n_embd, hidden], 1, 1),
            "fc.bias" => (vec![hidden], 0, 1),
            "fc_proj.weight" => (vec![hidden, n_embd], 0, 1),
            _ => return None,
        };
        Some(TensorSplit::even(shape, dim, sections, rank, ranks))
    }

    /// Parameter values of one share of a layer `n_embd` wide split `ranks` ways.
    pub fn param_count(n_embd: usize, ranks: usize) -> usize {
        let hidden = MLP_RATIO * n_embd;
        let sharded = n_embd * 3 * n_embd + 3 * n_embd + n_embd * n_embd + n_embd * hidden + hidden + hidden * n_embd;
        let replicated = 4 * n_embd + n_embd + n_embd;
        sharded / ranks + replicated
    }

    /// The embedding width.
    pub fn n_embd(&self) -> usize {
        self.qkv.weight.lazy_shape()[0]
    }

    /// Segment `segment` (0: attention, 1: MLP) on `[batch, seq * n_embd]`: this rank's partial
    /// output (see the type's docs).
    pub(crate) fn forward_segment(&self, x: Tensor<2>, segment: usize) -> Tensor<2> {
        let [batch, width] = x.dims();
        let n_embd = self.n_embd();
        let seq = width / n_embd;
        let share = 1.0 / self.ranks as f32;
        let x = x.reshape([batch, seq, n_embd]); // [batch, seq, n_embd]
        let (inner, proj) = if segment == 0 {
            let heads = attend(
                self.qkv.forward(self.ln1.forward(x.clone())),
                self.n_head,
                n_embd / self.ranks,
            );
            (heads, &self.attn_proj) // [batch, seq, n_embd / ranks]
        } else {
            (gelu(self.fc.forward(self.ln2.forward(x.clone()))), &self.fc_proj) // [batch, seq, 4 n_embd / ranks]
        };
        let mut y = linear(inner, proj.weight.val(), None) + x * share; // [batch, seq, n_embd]
        if let Some(bias) = &proj.bias {
            y = y + bias.val().reshape([1, 1, n_embd]) * share;
        }
        y.reshape([batch, width])
    }
}

/// The slice `split` of `param`, a new trainable parameter on `device`.
fn slice_param<const D: usize>(param: Param<Tensor<D>>, split: &TensorSplit, device: &Device) -> Param<Tensor<D>> {
    let full: Vec<f32> = param.val().into_data().try_into_vec_as::<f32>().unwrap_or_default();
    let shape: [usize; D] = split
        .local_shape()
        .try_into()
        .unwrap_or_else(|_| panic!("a {D}-d parameter sliced as {:?}", split.full_shape));
    Param::from_tensor(Tensor::from_data(TensorData::new(split.take(&full), shape), device))
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
