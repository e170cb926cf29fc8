//! `[model]`: which built-in model, and its shape.
//!
//! The input size and the number of classes (MLP, CNN) or the vocabulary (GPT) come from the data,
//! so they are not keys here. Each kind has its own sub-table (`[model.mlp]`, `[model.cnn]`,
//! `[model.gpt]`); only the one `kind` names is used.

use serde::{Deserialize, Serialize};

use super::choice::choice;

choice! {
    /// `model.kind`: the built-in model to train.
    ModelKind, default Mlp {
        /// Multi-layer perceptron on flat features (`[model.mlp]`).
        Mlp = "mlp",
        /// Small convolutional network on images (`[model.cnn]`).
        Cnn = "cnn",
        /// Small decoder-only transformer on characters (`[model.gpt]`).
        Gpt = "gpt",
    }
}

/// `[model]`: the model to train.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Which model: `"mlp"`, `"cnn"` or `"gpt"`. Default `"mlp"`.
    pub kind: ModelKind,
    /// Shape of the MLP (used when `kind = "mlp"`).
    pub mlp: MlpConfig,
    /// Shape of the CNN (used when `kind = "cnn"`).
    pub cnn: CnnConfig,
    /// Shape of the GPT (used when `kind = "gpt"`).
    pub gpt: GptConfig,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            kind: ModelKind::Mlp,
            mlp: MlpConfig::default(),
            cnn: CnnConfig::default(),
            gpt: GptConfig::default(),
        }
    }
}

impl ModelConfig {
    /// Number of blocks the selected built-in model is made of. Pipeline stages split the model
    /// at block boundaries, so `parallel.pipeline` may not exceed it and an explicit
    /// `parallel.partition` names block indices below it.
    ///
    /// - MLP: one block per hidden layer (linear + activation), plus the output layer.
    /// - CNN: one block per conv layer (conv + activation + pooling), the hidden linear layer,
    ///   the classifier.
    /// - GPT: the embeddings, one block per transformer layer, the final norm + head.
    pub fn num_blocks(&self) -> usize {
        match self.kind {
            ModelKind::Mlp => self.mlp.hidden.len() + 1,
            ModelKind::Cnn => self.cnn.channels.len() + 2,
            ModelKind::Gpt => self.gpt.n_layer + 2,
        }
    }
}

/// `[model.mlp]`: a multi-layer perceptron.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MlpConfig {
    /// Widths of the hidden layers, input side first; the input width and the number of classes
    /// come from the data. `[]` is a linear classifier. Default `[1024, 1024]`.
    pub hidden: Vec<usize>,
}

impl Default for MlpConfig {
    fn default() -> Self {
        Self {
            hidden: vec![1024, 1024],
        }
    }
}

/// `[model.cnn]`: a small convolutional network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CnnConfig {
    /// Output channels of each convolution block, input side first. Default `[16, 32]`.
    pub channels: Vec<usize>,
    /// Width of the fully connected layer before the classifier. Default `128`.
    pub hidden: usize,
}

impl Default for CnnConfig {
    fn default() -> Self {
        Self {
            channels: vec![16, 32],
            hidden: 128,
        }
    }
}

/// `[model.gpt]`: a small decoder-only transformer over characters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GptConfig {
    /// Longest context, in tokens (the positional embedding's size). Default `64`.
    pub block_size: usize,
    /// Number of transformer blocks. Default `2`.
    pub n_layer: usize,
    /// Attention heads per block; must divide `n_embd`. Default `4`.
    pub n_head: usize,
    /// Embedding width. Default `64`.
    pub n_embd: usize,
    /// Dropout probability in attention and MLP, in `[0, 1)`. Default `0.0` (off: parity tests
    /// compare runs bit for bit).
    pub dropout: f64,
}

impl Default for GptConfig {
    fn default() -> Self {
        Self {
            block_size: 64,
            n_layer: 2,
            n_head: 4,
            n_embd: 64,
            dropout: 0.0,
        }
    }
}
