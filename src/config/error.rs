//! Config errors: each names the file (or the `--set` override), the key path and the line.

use std::fmt;

/// Where a key's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Written in the config file, at this 1-based line and column (of the key).
    File {
        /// Line, from 1.
        line: usize,
        /// Column in characters, from 1.
        column: usize,
    },
    /// Set on the command line by this override (`section.key=value`).
    Override(String),
    /// Not written anywhere: the documented default.
    Default,
}

/// A place to point a user at: `configs/x.toml:12:1`, `--set optim.lr=x`, or just the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The config's name (its path, or `configs/mlp_synthetic.toml` for the embedded default).
    pub file: String,
    /// Where in it.
    pub origin: Origin,
}

impl Location {
    /// The line in the file, if the value was written in it.
    pub fn line(&self) -> Option<usize> {
        match self.origin {
            Origin::File { line, .. } => Some(line),
            _ => None,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.origin {
            Origin::File { line, column } => write!(f, "{}:{line}:{column}", self.file),
            Origin::Override(set) => write!(f, "--set {set}"),
            Origin::Default => write!(f, "{}", self.file),
        }
    }
}

/// One failed check of [`RunConfig::validate`](super::RunConfig::validate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where the first key involved was set (the file alone if every key is at its default).
    pub at: Location,
    /// Key paths involved, most relevant first (e.g. `["parallel.data", "parallel.pipeline"]`).
    pub keys: Vec<String>,
    /// What is wrong, with every term (e.g. `parallel: data(2) * tensor(1) * pipeline(3) = 6 != WORLD_SIZE(4)`).
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.at, self.message)
    }
}

/// Everything that can be wrong with a config; raised before any rank starts training.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The path given.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{at}: invalid TOML: {message}")]
    Syntax {
        /// Where the parser stopped.
        at: Location,
        /// The parser's message.
        message: String,
    },
    /// A key the schema does not have.
    #[error("{at}: unknown key `{name}` {scope} ({}expected one of: {})", did_you_mean(.suggestion), .expected.join(", "))]
    UnknownKey {
        /// Where the key is written.
        at: Location,
        /// Its full path, e.g. `optim.lrr`.
        key: String,
        /// Its last component, e.g. `lrr`.
        name: String,
        /// `in [optim]` or `at the top level`.
        scope: String,
        /// The closest existing key, if one is close.
        suggestion: Option<String>,
        /// The keys that exist there.
        expected: Vec<String>,
    },
    /// A value of the wrong type, or a choice that does not exist.
    #[error("{at}: {key}: {message}")]
    Type {
        /// Where the key is written.
        at: Location,
        /// Its full path, e.g. `optim.lr`.
        key: String,
        /// What was expected.
        message: String,
    },
    /// A `--set section.key=value` override that names no key or does not fit its type.
    #[error("--set {set}: {message}")]
    Override {
        /// The override as given.
        set: String,
        /// The key path it names (as far as it could be read).
        key: String,
        /// What is wrong.
        message: String,
    },
    /// The settings parse but do not work together, or do not fit the world size.
    #[error("{}", problems_text(.problems))]
    Invalid {
        /// Every failed check, in schema order.
        problems: Vec<Problem>,
    },
}

impl ConfigError {
    /// The key path the error is about (the first one, for [`ConfigError::Invalid`]).
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::Read { .. } | Self::Syntax { .. } => None,
            Self::UnknownKey { key, .. } | Self::Type { key, .. } | Self::Override { key, .. } => Some(key),
            Self::Invalid { problems } => problems.first().and_then(|p| p.keys.first()).map(String::as_str),
        }
    }

    /// The line in the config file the error points at, when it points into the file.
    pub fn line(&self) -> Option<usize> {
        match self {
            Self::Read { .. } | Self::Override { .. } => None,
            Self::Syntax { at, .. } | Self::UnknownKey { at, .. } | Self::Type { at, .. } => at.line(),
            Self::Invalid { problems } => problems.first().and_then(|p| p.at.line()),
        }
    }
}

fn did_you_mean(suggestion: &Option<String>) -> String {
    match suggestion {
        Some(key) => format!("did you mean `{key}`? "),
        None => String::new(),
    }
}

fn problems_text(problems: &[Problem]) -> String {
    match problems {
        [one] => one.to_string(),
        many => {
            let mut text = format!("{} problems in the config:", many.len());
            for problem in many {
                text.push_str("\n  ");
                text.push_str(&problem.to_string());
            }
            text
        }
    }
}
