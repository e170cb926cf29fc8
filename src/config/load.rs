//! Reading a config: file or text, then `--set` overrides; unknown keys and wrong types are errors
//! that name the file, the key path and the line.

use std::path::Path;

use super::error::ConfigError;
use super::overrides::apply_all;
use super::run::ConfigSource;
use super::spans::{one_line, KeyMap};
use super::RunConfig;

/// The embedded default run (`configs/mlp_synthetic.toml`): what `burnrun train` trains when
/// given no file.
pub const DEFAULT_CONFIG: &str = include_str!("../../configs/mlp_synthetic.toml");

/// The name [`DEFAULT_CONFIG`] goes by in messages and in the default `train.out_dir`.
pub const DEFAULT_CONFIG_NAME: &str = "configs/mlp_synthetic.toml";

impl RunConfig {
    /// Reads the TOML file at `path` and applies `overrides` (`section.key=value`, in order).
    pub fn load(path: impl AsRef<Path>, overrides: &[String]) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: name.clone(),
            source,
        })?;
        Self::from_str_named(&text, &name, overrides)
    }

    /// The embedded default ([`DEFAULT_CONFIG`]) with `overrides` applied.
    pub fn embedded_default(overrides: &[String]) -> Result<Self, ConfigError> {
        Self::from_str_named(DEFAULT_CONFIG, DEFAULT_CONFIG_NAME, overrides)
    }

    /// Reads TOML `text`, called `name` in messages (a path, usually), and applies `overrides`.
    ///
    /// Keys not written keep their documented defaults. An empty `train.out_dir` becomes
    /// `runs/<stem of name>`.
    pub fn from_str_named(text: &str, name: &str, overrides: &[String]) -> Result<Self, ConfigError> {
        let keys = KeyMap::scan(text, name)?;
        let mut config: RunConfig = toml::from_str(text).map_err(|err| {
            let (key, at) = keys.locate_error(err.span().map(|span| span.start));
            ConfigError::Type {
                at,
                key,
                message: one_line(err.message()),
            }
        })?;
        let mut source = ConfigSource {
            name: name.to_string(),
            origins: keys.origins(),
        };
        if !overrides.is_empty() {
            let document: toml::Table = toml::from_str(text).map_err(|err| ConfigError::Syntax {
                at: keys.locate_error(err.span().map(|span| span.start)).1,
                message: one_line(err.message()),
            })?;
            config = apply_all(document, config, overrides, &mut source)?;
        }
        if config.train.out_dir.is_empty() {
            let stem = Path::new(name)
                .file_stem()
                .and_then(|stem| stem.to_str())
                .unwrap_or("run");
            config.train.out_dir = format!("runs/{stem}");
        }
        config.source = source;
        Ok(config)
    }
}
