//! From a config to the objects of a run: the dataset, the model spec, the optimizer.

use std::sync::Arc;

use crate::compress::CodecOptions;
use crate::config::{CompressionMethod, DataKind, ModelKind, OptimKind, RunConfig};
use crate::data::{DataError, Dataset, IdxDataset, SyntheticDataset, TextDataset};
use crate::models::ModelSpec;

use super::optim::OptimizerKind;

/// Builds the dataset a config names. Deterministic: every rank builds the same one.
pub fn dataset(cfg: &RunConfig, seq_len: Option<usize>) -> Result<Arc<dyn Dataset>, DataError> {
    Ok(match cfg.data.kind {
        DataKind::Synthetic => {
            let s = &cfg.data.synthetic;
            Arc::new(SyntheticDataset::generate(
                s.samples,
                s.features,
                s.classes,
                s.noise as f32,
                s.seed,
                s.image_shape,
            )?)
        }
        DataKind::Idx => Arc::new(IdxDataset::open(&cfg.data.idx.images, &cfg.data.idx.labels)?),
        DataKind::Text => {
            let seq_len = seq_len.or(cfg.data.text.seq_len).unwrap_or(cfg.model.gpt.block_size);
            Arc::new(TextDataset::from_file(&cfg.data.text.path, seq_len, 1)?)
        }
    })
}

/// The model spec of a config, with the input and output sizes taken from the dataset.
pub fn model_spec(cfg: &RunConfig, data: &dyn Dataset) -> ModelSpec {
    let m = &cfg.model;
    match m.kind {
        ModelKind::Mlp => ModelSpec::Mlp {
            input: data.input_width(),
            hidden: m.mlp.hidden.clone(),
            classes: data.num_classes(),
        },
        ModelKind::Cnn => ModelSpec::Cnn {
            input: data.image_shape().unwrap_or([1, 1, data.input_width()]),
            channels: m.cnn.channels.clone(),
            hidden: if m.cnn.hidden > 0 {
                vec![m.cnn.hidden]
            } else {
                Vec::new()
            },
            classes: data.num_classes(),
        },
        ModelKind::Gpt => ModelSpec::Gpt {
            vocab: data.num_classes(),
            block_size: m.gpt.block_size,
            n_layer: m.gpt.n_layer,
            n_head: m.gpt.n_head,
            n_embd: m.gpt.n_embd,
        },
    }
}

/// The optimizer a config names.
pub fn optimizer_kind(cfg: &RunConfig) -> OptimizerKind {
    let o = &cfg.optim;
    let (beta1, beta2, eps, weight_decay) = (o.beta1 as f32, o.beta2 as f32, o.eps as f32, o.weight_decay as f32);
    match o.kind {
        OptimKind::Sgd => OptimizerKind::Sgd {
            momentum: o.momentum as f32,
            weight_decay,
        },
        OptimKind::Adam => OptimizerKind::Adam {
            beta1,
            beta2,
            eps,
            weight_decay,
        },
        OptimKind::AdamW => OptimizerKind::AdamW {
            beta1,
            beta2,
            eps,
            weight_decay,
        },
    }
}

/// The codec options of a config.
pub fn codec_options(cfg: &RunConfig) -> CodecOptions {
    let c = &cfg.compression;
    CodecOptions {
        method: c.method,
        topk_ratio: c.topk_ratio as f32,
        powersgd_rank: c.powersgd_rank,
        error_feedback: c.error_feedback,
        start_step: c.start_step,
        seed: cfg.train.seed,
    }
}

/// True when gradient synchronisation goes through a lossy or casting codec.
pub fn compressed(cfg: &RunConfig) -> bool {
    cfg.compression.method != CompressionMethod::None
}
