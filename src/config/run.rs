//! [`RunConfig`]: the whole run, one field per TOML section, and where each key came from.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::error::{Location, Origin};
use super::{
    CheckpointConfig, CommConfig, CompressionConfig, DataConfig, LogConfig, ModelConfig, OptimConfig, ParallelConfig,
    PrecisionConfig, TrainConfig,
};

/// A training run: every section of the TOML file, defaults filled in.
///
/// Load it with [`RunConfig::load`] or [`RunConfig::from_str_named`], check it against the world
/// with [`RunConfig::validate`]. Two configs are equal when their settings are; where the settings
/// came from ([`RunConfig::source`]) is not compared.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// `[model]`: the built-in model and its shape.
    pub model: ModelConfig,
    /// `[data]`: the dataset and the last-batch rule.
    pub data: DataConfig,
    /// `[optim]`: optimizer, learning-rate schedule, clipping.
    pub optim: OptimConfig,
    /// `[train]`: steps, batch, seed, device, output folder.
    pub train: TrainConfig,
    /// `[parallel]`: data-parallel replicas x tensor-parallel ranks x pipeline stages.
    pub parallel: ParallelConfig,
    /// `[comm]`: collective backend and buckets.
    pub comm: CommConfig,
    /// `[checkpoint]`: saving and resuming.
    pub checkpoint: CheckpointConfig,
    /// `[log]`: progress and metrics.
    pub log: LogConfig,
    /// `[precision]`: compute dtype and loss scaling.
    pub precision: PrecisionConfig,
    /// `[compression]`: gradient compression.
    pub compression: CompressionConfig,
    /// `[user]`: the program's own settings, free-form here; a user's binary reads them as its
    /// own type with [`RunConfig::user_section`], which checks them.
    pub user: toml::Table,
    /// Where each key came from (not part of the settings: not serialized, not compared).
    #[serde(skip)]
    pub source: ConfigSource,
}

impl PartialEq for RunConfig {
    fn eq(&self, other: &Self) -> bool {
        self.model == other.model
            && self.data == other.data
            && self.optim == other.optim
            && self.train == other.train
            && self.parallel == other.parallel
            && self.comm == other.comm
            && self.checkpoint == other.checkpoint
            && self.log == other.log
            && self.precision == other.precision
            && self.compression == other.compression
            && self.user == other.user
    }
}

impl RunConfig {
    /// The settings as TOML, every key written out (except optional keys that are not set).
    /// Loading this text gives back an equal config; checkpoints store it.
    pub fn to_toml_string(&self) -> String {
        // Invariant: every field is a string, number, bool, array or table of those (optional
        // keys are skipped when unset), which TOML can always represent, and the sub-tables come
        // after the plain keys of each struct, which the serializer arranges itself.
        toml::to_string(self).expect("a RunConfig always serializes to TOML")
    }

    /// A stable 64-bit hash (FNV-1a) of [`RunConfig::to_toml_string`]: equal settings give equal
    /// hashes on every machine and every build, so ranks and nodes can compare configs cheaply.
    pub fn hash(&self) -> u64 {
        const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
        const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
        self.to_toml_string().bytes().fold(FNV_OFFSET_BASIS, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME)
        })
    }

    /// The file name and the origin of every key that was written or overridden.
    pub fn source(&self) -> &ConfigSource {
        &self.source
    }
}

/// Where a config came from: its name and, per key path, the line or override that set it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigSource {
    /// The file name (or the embedded default's name); empty for a config built in code.
    pub name: String,
    /// Key path (`optim.lr`, and tables such as `optim`) to where it was set. Keys at their
    /// default are absent.
    pub origins: BTreeMap<String, Origin>,
}

impl ConfigSource {
    /// Whether `key`, or any key under it when it is a table, was written or overridden.
    pub fn is_set(&self, key: &str) -> bool {
        let prefix = format!("{key}.");
        self.origins.keys().any(|k| k == key || k.starts_with(&prefix))
    }

    /// Where the first of `keys` that was set came from; the file alone if none was.
    pub fn locate(&self, keys: &[&str]) -> Location {
        let origin = keys
            .iter()
            .find_map(|key| self.origins.get(*key))
            .cloned()
            .unwrap_or(Origin::Default);
        let file = if self.name.is_empty() {
            "config".to_string()
        } else {
            self.name.clone()
        };
        Location { file, origin }
    }
}
