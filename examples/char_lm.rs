//! A small character-level transformer language model with its own loss (label-smoothed
//! cross-entropy, written out by hand), trained by burnrun's trainer through the `Task` trait:
//! the model, the data and the loss are this file's; the config, `--set`, data parallelism,
//! compression, mixed precision, checkpoints with resume, metrics and the progress bar come with
//! `burnrun::train::main`.
//!
//! ```text
//! cargo build --release --examples
//! burnrun --nproc-per-node 2 -- target/release/examples/char_lm                    # examples/char_lm.toml
//! burnrun --nproc-per-node 2 -- target/release/examples/char_lm --set compression.method=bf16
//! burnrun --nproc-per-node 2 -- target/release/examples/char_lm --set user.width=64 --check
//! ```
//!
//! A sample is a window of `user.context` characters (sample i starts at character i) and its
//! next characters; burnrun's sampler splits each global batch over the ranks.

use std::process::ExitCode;

use burn::module::Module;
use burn::nn::attention::generate_autoregressive_mask;
use burn::nn::transformer::{TransformerEncoder, TransformerEncoderConfig, TransformerEncoderInput};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use burnrun::{Task, TaskError};
use serde::Deserialize;

/// Weight of the uniform distribution mixed into the one-hot targets (Szegedy et al. 2016).
const LABEL_SMOOTHING: f32 = 0.1;

/// Token and position embeddings -> pre-LN transformer blocks -> LayerNorm -> vocabulary logits.
#[derive(Module, Debug)]
struct CharLm {
    tokens: Embedding,
    positions: Embedding,
    blocks: TransformerEncoder,
    norm: LayerNorm,
    head: Linear,
}

impl CharLm {
    fn new(vocab: usize, s: &Settings, device: &Device) -> Self {
        let width = s.width;
        Self {
            tokens: EmbeddingConfig::new(vocab, width).init(device),
            positions: EmbeddingConfig::new(s.context, width).init(device),
            blocks: TransformerEncoderConfig::new(width, 4 * width, s.heads, s.layers)
                .with_dropout(0.0)
                .with_norm_first(true)
                .init(device),
            norm: LayerNormConfig::new(width).init(device),
            head: LinearConfig::new(width, vocab).init(device),
        }
    }

    /// `[batch, seq]` token ids -> `[batch, seq, vocab]` logits, each position seeing only the past.
    fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let [batch, seq] = ids.dims();
        let device = ids.device();
        let positions = Tensor::<1, Int>::arange(0..seq as i64, &device)
            .reshape([1, seq])
            .repeat_dim(0, batch);
        let x = self.tokens.forward(ids) + self.positions.forward(positions); // [batch, seq, width]
        let mask = generate_autoregressive_mask(batch, seq, &device); // [batch, seq, seq]
        let x = self.blocks.forward(TransformerEncoderInput::new(x).mask_attn(mask));
        self.head.forward(self.norm.forward(x))
    }
}

/// Label-smoothed cross-entropy, mean over every position: `(1 - e) * NLL(target) + e * mean over
/// the vocabulary of -log p`.
fn smoothed_cross_entropy(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<1> {
    let [batch, seq, vocab] = logits.dims();
    let log_probs = log_softmax(logits.reshape([batch * seq, vocab]), 1); // [batch*seq, vocab]
    let targets = targets.reshape([batch * seq, 1]);
    let nll = log_probs.clone().gather(1, targets).neg().mean(); // [1]
    let uniform = log_probs.neg().mean(); // [1]: mean over positions and classes
    nll.mul_scalar(1.0 - LABEL_SMOOTHING) + uniform.mul_scalar(LABEL_SMOOTHING)
}

/// `[user]` of the config: this program's own settings.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Settings {
    /// The training text (any bytes; the alphabet is the distinct bytes in it).
    text: String,
    /// Characters per window.
    context: usize,
    /// Embedding width.
    width: usize,
    /// Transformer layers.
    layers: usize,
    /// Attention heads (divide `width`).
    heads: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            text: concat!(env!("CARGO_MANIFEST_DIR"), "/configs/data/lighthouse.txt").into(),
            context: 32,
            width: 32,
            layers: 2,
            heads: 4,
        }
    }
}

/// The model, the text as character ids, and the loss.
struct CharLmTask {
    settings: Settings,
    /// The alphabet: the distinct bytes of the text, sorted; a character's id is its index.
    alphabet: Vec<u8>,
    ids: Vec<i64>,
}

impl CharLmTask {
    fn new(settings: Settings) -> Result<Self, TaskError> {
        let text = std::fs::read(&settings.text).map_err(|e| format!("user.text = {}: {e}", settings.text))?;
        let mut alphabet = text.clone();
        alphabet.sort_unstable();
        alphabet.dedup();
        let ids: Vec<i64> = text
            .iter()
            .map(|b| alphabet.binary_search(b).unwrap_or(0) as i64)
            .collect();
        if ids.len() <= settings.context + 1 {
            return Err(format!(
                "user.text = {}: {} characters, fewer than user.context + 2",
                settings.text,
                ids.len()
            )
            .into());
        }
        if settings.heads == 0 || settings.width % settings.heads != 0 {
            return Err(format!(
                "user.heads = {} must divide user.width = {}",
                settings.heads, settings.width
            )
            .into());
        }
        Ok(Self {
            settings,
            alphabet,
            ids,
        })
    }
}

impl Task for CharLmTask {
    type Model = CharLm;
    /// `[batch, context]` input ids and the ids that follow each of them.
    type Batch = (Tensor<2, Int>, Tensor<2, Int>);

    fn describe(&self) -> String {
        let s = &self.settings;
        format!(
            "char_lm ({} layers, width {}, {} heads, alphabet of {}) on {} windows of {} characters",
            s.layers,
            s.width,
            s.heads,
            self.alphabet.len(),
            self.len(),
            s.context
        )
    }

    fn len(&self) -> usize {
        self.ids.len() - self.settings.context - 1
    }

    fn model(&self, device: &Device) -> Result<CharLm, TaskError> {
        Ok(CharLm::new(self.alphabet.len(), &self.settings, device))
    }

    fn batch(&self, indices: &[usize], device: &Device) -> Result<Self::Batch, TaskError> {
        let context = self.settings.context;
        let (mut inputs, mut targets) = (Vec::new(), Vec::new());
        for &start in indices {
            inputs.extend_from_slice(&self.ids[start..start + context]);
            targets.extend_from_slice(&self.ids[start + 1..start + context + 1]);
        }
        let shape = [indices.len(), context];
        Ok((
            Tensor::from_data(TensorData::new(inputs, shape), device),
            Tensor::from_data(TensorData::new(targets, shape), device),
        ))
    }

    fn loss(&self, model: &CharLm, (inputs, targets): &Self::Batch) -> Result<Tensor<1>, TaskError> {
        Ok(smoothed_cross_entropy(model.forward(inputs.clone()), targets.clone()))
    }
}

fn main() -> ExitCode {
    burnrun::train::main("char_lm", include_str!("char_lm.toml"), |cfg| {
        CharLmTask::new(cfg.user_section()?)
    })
}
