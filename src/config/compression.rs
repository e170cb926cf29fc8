//! `[compression]`: gradient compression in the data-parallel sync.

use serde::{Deserialize, Serialize};

use super::choice::choice;

choice! {
    /// `compression.method`: how gradient buckets travel.
    ///
    /// The one definition of the methods: the config reads it, and `compress` builds its codecs
    /// from it (re-exported as `crate::compress::CompressionMethod`, which also parses it from a
    /// string with a [`CompressError`](crate::compress::CompressError)).
    CompressionMethod, default None {
        /// f32 all-reduce with averaging: exact, the reference.
        None = "none",
        /// Cast to IEEE half on the wire, reduce in f32 (torch's `fp16_compress_hook`, Horovod's
        /// fp16 compression).
        Fp16 = "fp16",
        /// Cast to bfloat16 on the wire, reduce in f32 (torch's `bf16_compress_hook`).
        Bf16 = "bf16",
        /// Each rank sends its `topk_ratio` largest-magnitude entries per bucket, all-gathered as
        /// (index, value) pairs.
        TopK = "topk",
        /// Low-rank P, Q factors of rank `powersgd_rank` per matrix (Vogels et al., 2019).
        PowerSgd = "powersgd",
    }
}

impl CompressionMethod {
    /// Whether the method drops information beyond rounding (top-k, PowerSGD): those keep the
    /// residual for error feedback.
    pub fn is_sparsifying(self) -> bool {
        matches!(self, Self::TopK | Self::PowerSgd)
    }
}

/// `[compression]`: gradient compression, applied per bucket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompressionConfig {
    /// Method: `"none"`, `"fp16"`, `"bf16"`, `"topk"` or `"powersgd"`. Default `"none"`.
    pub method: CompressionMethod,
    /// Fraction of each bucket's entries top-k keeps, in `(0, 1]`. Default `0.01`.
    pub topk_ratio: f64,
    /// Rank of PowerSGD's factors, at least 1. Default `4`.
    pub powersgd_rank: usize,
    /// Keep what compression dropped and add it to the next step's gradient (top-k and PowerSGD;
    /// the fp16/bf16 casts do not use it). Default `true`.
    pub error_feedback: bool,
    /// Steps sent uncompressed before compression starts (as PowerSGD and 1-bit Adam warm up).
    /// Default `0`.
    pub start_step: u64,
}

impl Default for CompressionConfig {
    fn default() -> Self {
        Self {
            method: CompressionMethod::None,
            topk_ratio: 0.01,
            powersgd_rank: 4,
            error_feedback: true,
            start_step: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_reads_writes_and_displays_as_its_config_name() {
        let names = ["none", "fp16", "bf16", "topk", "powersgd"];
        assert_eq!(CompressionMethod::ALL.len(), names.len());
        for (&method, name) in CompressionMethod::ALL.iter().zip(names) {
            assert_eq!(method.as_str(), name);
            assert_eq!(method.to_string(), name);
            let read: CompressionConfig = toml::from_str(&format!("method = \"{name}\"")).unwrap();
            assert_eq!(read.method, method);
            let written = toml::to_string(&CompressionConfig {
                method,
                ..Default::default()
            })
            .unwrap();
            assert!(written.contains(&format!("method = \"{name}\"")), "{written}");
        }
    }
}
