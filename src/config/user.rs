//! `[user]`: a section of the config file that belongs to the program, not to burnrun. A user's
//! own training binary reads it as its own settings type with [`RunConfig::user_section`], with
//! the same errors as every other section (unknown key with a suggestion, wrong type, each with
//! the file and the line); `--set user.key=value` overrides it like any other key.

use serde::de::DeserializeOwned;

use super::error::ConfigError;
use super::schema::fields_of;
use super::suggest::closest;
use super::RunConfig;

impl RunConfig {
    /// The `[user]` section as `S` (keys not written keep `S`'s defaults when `S` derives
    /// `#[serde(default)]`).
    pub fn user_section<S: DeserializeOwned>(&self) -> Result<S, ConfigError> {
        let fields = fields_of::<S>();
        if !fields.is_empty() {
            if let Some(name) = self.user.keys().find(|k| !fields.contains(&k.as_str())) {
                let key = format!("user.{name}");
                return Err(ConfigError::UnknownKey {
                    at: self.source.locate(&[&key]),
                    key,
                    name: name.clone(),
                    scope: "in [user]".into(),
                    suggestion: closest(name, fields).map(str::to_string),
                    expected: fields.iter().map(|f| f.to_string()).collect(),
                });
            }
        }
        toml::Value::Table(self.user.clone()).try_into::<S>().map_err(|whole| {
            // Which key: the first one that fails on its own (the others left at their defaults).
            let culprit = self.user.iter().find(|(name, value)| {
                let mut alone = toml::Table::new();
                alone.insert(name.to_string(), (*value).clone());
                toml::Value::Table(alone).try_into::<S>().is_err()
            });
            let key = culprit.map_or_else(|| "user".to_string(), |(name, _)| format!("user.{name}"));
            ConfigError::Type {
                at: self.source.locate(&[&key, "user"]),
                key,
                message: whole.message().to_string(),
            }
        })
    }
}
