//! `--set section.key=value`: command-line overrides, applied to the TOML document before it
//! becomes a [`RunConfig`].
//!
//! An override must name a key of the schema (keys left at their default included) and keep its
//! type. The value is read as a TOML value (`3`, `1e-3`, `true`, `[64, 64]`, `"adam"`); text that
//! is not TOML, or a scalar where the key takes a string, is taken as a bare string, so
//! `--set parallel.schedule=1f1b` and `--set 'parallel.schedule="1f1b"'` mean the same.

use super::error::{ConfigError, Origin};
use super::run::ConfigSource;
use super::schema::{check_key, find_table, join};
use super::RunConfig;

/// Applies `overrides` in order to `document` (which deserializes to `config`) and deserializes
/// the result after each one, so an error names the override that caused it; records each
/// overridden key in `source`.
pub(crate) fn apply_all(
    mut document: toml::Table,
    mut config: RunConfig,
    overrides: &[String],
    source: &mut ConfigSource,
) -> Result<RunConfig, ConfigError> {
    for set in overrides {
        config = apply_one(&mut document, set)?;
        let (key, _) = split(set)?;
        source.origins.insert(key, Origin::Override(set.clone()));
    }
    Ok(config)
}

/// `optim.lr=1e-3` into the key path and the raw value text (both trimmed).
fn split(set: &str) -> Result<(String, &str), ConfigError> {
    let Some((key, raw)) = set.split_once('=') else {
        return Err(ConfigError::Override {
            set: set.to_string(),
            key: set.trim().to_string(),
            message: "expected section.key=value".to_string(),
        });
    };
    Ok((key.trim().to_string(), raw.trim()))
}

fn apply_one(document: &mut toml::Table, set: &str) -> Result<RunConfig, ConfigError> {
    let (key, raw) = split(set)?;
    let fail = |message: String| ConfigError::Override {
        set: set.to_string(),
        key: key.clone(),
        message,
    };
    check_path(&key).map_err(fail)?;

    let (value, bare) = parse_value(raw);
    let parts: Vec<&str> = key.split('.').collect();
    set_path(document, &parts, value.clone()).map_err(fail)?;
    match deserialize(document) {
        Ok(config) => Ok(config),
        Err(typed_error) => {
            // A bare scalar for a string key (`--set train.out_dir=2024`): the key's type says
            // it was meant as text.
            let is_scalar = !matches!(
                value,
                toml::Value::String(_) | toml::Value::Array(_) | toml::Value::Table(_)
            );
            if bare && is_scalar {
                set_path(document, &parts, toml::Value::String(raw.to_string())).map_err(fail)?;
                if let Ok(config) = deserialize(document) {
                    return Ok(config);
                }
            }
            Err(fail(typed_error))
        }
    }
}

/// Checks that `key` names a key (not a table) of the schema.
fn check_path(key: &str) -> Result<(), String> {
    if key.is_empty() || key.split('.').any(str::is_empty) {
        return Err("expected section.key=value".to_string());
    }
    // `[user]` belongs to the program: its keys are checked when the program reads them.
    if key.starts_with("user.") {
        return Ok(());
    }
    let mut parent = String::new();
    for name in key.split('.') {
        if find_table(&parent).is_none() {
            return Err(format!("`{parent}` is a key, not a section: it has no key `{name}`"));
        }
        check_key(&parent, name).map_err(|miss| miss.message())?;
        parent = join(&parent, name);
    }
    if let Some(table) = find_table(&parent) {
        let keys = table.keys.join(", ");
        return Err(format!(
            "[{parent}] is a section, not a key: name one of its keys ({keys})"
        ));
    }
    Ok(())
}

/// Reads `raw` as a TOML value, and whether it was bare (anything but a quoted string). Text that
/// is not a TOML value is a bare string.
fn parse_value(raw: &str) -> (toml::Value, bool) {
    let parsed = toml::from_str::<toml::Table>(&format!("value = {raw}"))
        .ok()
        .filter(|table| table.len() == 1)
        .and_then(|mut table| table.remove("value"));
    match parsed {
        Some(value @ toml::Value::String(_)) => (value, false),
        Some(value) => (value, true),
        None => (toml::Value::String(raw.to_string()), true),
    }
}

/// Sets `parts` (a key path) in `document`, creating the tables on the way.
fn set_path(document: &mut toml::Table, parts: &[&str], value: toml::Value) -> Result<(), String> {
    let Some((leaf, tables)) = parts.split_last() else {
        return Err("expected section.key=value".to_string());
    };
    let mut table = document;
    for (depth, name) in tables.iter().enumerate() {
        let entry = table
            .entry(name.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = match entry {
            toml::Value::Table(inner) => inner,
            _ => return Err(format!("`{}` is not a table in the config", parts[..=depth].join("."))),
        };
    }
    table.insert(leaf.to_string(), value);
    Ok(())
}

fn deserialize(document: &toml::Table) -> Result<RunConfig, String> {
    toml::Value::Table(document.clone())
        .try_into::<RunConfig>()
        .map_err(|err| err.message().to_string())
}
