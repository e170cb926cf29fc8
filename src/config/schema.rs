//! The schema as data: which tables exist and which keys each one has.
//!
//! The key names are read from the serde derives themselves (a probe deserializer asks each
//! struct for its field list), so the schema cannot drift from the structs, and keys whose
//! default is "not set" (`Option`) are known even though they serialize to nothing.

use std::fmt;

use serde::de::{self, DeserializeOwned, Deserializer, Visitor};

use super::{
    CheckpointConfig, CnnConfig, CommConfig, CompressionConfig, DataConfig, GptConfig, IdxConfig, LogConfig, MlpConfig,
    ModelConfig, OptimConfig, ParallelConfig, PrecisionConfig, RunConfig, SyntheticConfig, TextConfig, TrainConfig,
};
use crate::config::suggest::closest;

/// A table of the schema: its dotted path (`""` for the top level) and its keys.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Table {
    /// `"optim"`, `"model.gpt"`, or `""` for the top level.
    pub(crate) path: &'static str,
    /// Its keys, in declaration order (sub-tables included).
    pub(crate) keys: &'static [&'static str],
}

/// Why a key path is not in the schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Miss {
    /// `in [optim]` or `at the top level`.
    pub(crate) scope: String,
    /// The last component, as typed.
    pub(crate) name: String,
    /// The closest existing key.
    pub(crate) suggestion: Option<String>,
    /// The keys that exist in that table.
    pub(crate) expected: Vec<String>,
}

impl Miss {
    /// `unknown key `lrr` in [optim] (did you mean `lr`? expected one of: kind, lr, ...)`.
    pub(crate) fn message(&self) -> String {
        let hint = self
            .suggestion
            .as_ref()
            .map(|s| format!("did you mean `{s}`? "))
            .unwrap_or_default();
        format!(
            "unknown key `{}` {} ({hint}expected one of: {})",
            self.name,
            self.scope,
            self.expected.join(", ")
        )
    }
}

/// Every table of [`RunConfig`], parents before children.
pub(crate) fn tables() -> Vec<Table> {
    vec![
        table::<RunConfig>(""),
        table::<ModelConfig>("model"),
        table::<MlpConfig>("model.mlp"),
        table::<CnnConfig>("model.cnn"),
        table::<GptConfig>("model.gpt"),
        table::<DataConfig>("data"),
        table::<SyntheticConfig>("data.synthetic"),
        table::<IdxConfig>("data.idx"),
        table::<TextConfig>("data.text"),
        table::<OptimConfig>("optim"),
        table::<TrainConfig>("train"),
        table::<ParallelConfig>("parallel"),
        table::<CommConfig>("comm"),
        table::<CheckpointConfig>("checkpoint"),
        table::<LogConfig>("log"),
        table::<PrecisionConfig>("precision"),
        table::<CompressionConfig>("compression"),
    ]
}

/// The table at `path`, if `path` names one.
pub(crate) fn find_table(path: &str) -> Option<Table> {
    tables().into_iter().find(|table| table.path == path)
}

/// Joins a table path and a key: `join("optim", "lr") == "optim.lr"`, `join("", "optim") == "optim"`.
pub(crate) fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

/// Checks that table `parent` has key `name`.
pub(crate) fn check_key(parent: &str, name: &str) -> Result<(), Miss> {
    let keys = find_table(parent).map(|table| table.keys).unwrap_or(&[]);
    if keys.contains(&name) {
        return Ok(());
    }
    let scope = if parent.is_empty() {
        "at the top level".to_string()
    } else {
        format!("in [{parent}]")
    };
    Err(Miss {
        scope,
        name: name.to_string(),
        suggestion: closest(name, keys).map(str::to_string),
        expected: keys.iter().map(|key| key.to_string()).collect(),
    })
}

fn table<T: DeserializeOwned>(path: &'static str) -> Table {
    Table {
        path,
        keys: fields_of::<T>(),
    }
}

/// The field names serde's derive hands to `deserialize_struct` for `T` (empty if `T` is not a
/// struct).
pub(crate) fn fields_of<T: DeserializeOwned>() -> &'static [&'static str] {
    match T::deserialize(FieldProbe) {
        Err(ProbeError::Fields(fields)) => fields,
        Ok(_) | Err(ProbeError::NotAStruct) => &[],
    }
}

/// A deserializer that deserializes nothing: it stops at the first `deserialize_struct` call and
/// returns the field list as its error.
struct FieldProbe;

#[derive(Debug)]
enum ProbeError {
    Fields(&'static [&'static str]),
    NotAStruct,
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fields(fields) => write!(f, "struct with fields {fields:?}"),
            Self::NotAStruct => f.write_str("not a struct"),
        }
    }
}

impl std::error::Error for ProbeError {}

impl de::Error for ProbeError {
    fn custom<T: fmt::Display>(_msg: T) -> Self {
        Self::NotAStruct
    }
}

impl<'de> Deserializer<'de> for FieldProbe {
    type Error = ProbeError;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, ProbeError> {
        Err(ProbeError::NotAStruct)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, ProbeError> {
        Err(ProbeError::Fields(fields))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
        unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
    }
}
