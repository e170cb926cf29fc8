//! Reading a config: file or text, then `--set` overrides; unknown keys and wrong types are errors
//! that name the file, the key path and the line.

use std::path::Path;

use super::error::{ConfigError, Origin};
use super::overrides::apply_all;
use super::run::ConfigSource;
use super::spans::{one_line, KeyMap};
use super::RunConfig;

/// The embedded default run (`configs/mlp_synthetic.toml`): what `burnrun train` trains when
/// given no file.
pub const DEFAULT_CONFIG: &str = include_str!("../../configs/mlp_synthetic.toml");

/// The data paths a config file may name, in the order `resolve_data_paths` visits them.
const DATA_PATH_KEYS: [&str; 3] = ["data.text.path", "data.idx.images", "data.idx.labels"];

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
        let mut config = Self::from_str_named(&text, &name, overrides)?;
        config.resolve_data_paths(path.parent().unwrap_or(Path::new("")));
        Ok(config)
    }

    /// Makes the relative data paths written in the config file (`data.text.path`,
    /// `data.idx.images`, `data.idx.labels`) relative to `folder`, the file's folder, so a config
    /// and its data move together and work from any current directory. Paths given with `--set`
    /// stay relative to the current directory, where the user typed them.
    fn resolve_data_paths(&mut self, folder: &Path) {
        let written_in_file: Vec<bool> = DATA_PATH_KEYS
            .iter()
            .map(|key| matches!(self.source.origins.get(*key), Some(Origin::File { .. })))
            .collect();
        let data = &mut self.data;
        let paths = [&mut data.text.path, &mut data.idx.images, &mut data.idx.labels];
        for (path, in_file) in paths.into_iter().zip(written_in_file) {
            if in_file && !path.is_empty() && Path::new(path.as_str()).is_relative() {
                *path = folder.join(path.as_str()).display().to_string();
            }
        }
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
