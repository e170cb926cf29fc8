//! Where each key of a config file is written: parse once with spans, map byte offsets to lines,
//! and refuse keys the schema does not have.

use std::collections::BTreeMap;
use std::ops::Range;

use toml_edit::{ImDocument, TableLike};

use super::error::{ConfigError, Location, Origin};
use super::schema::{check_key, find_table, join};

/// A key written in the file.
#[derive(Debug, Clone)]
struct Written {
    /// Full dotted path.
    path: String,
    /// Byte range of the key.
    key_span: Option<Range<usize>>,
    /// Byte range of its value (for a table: its header or braces).
    value_span: Option<Range<usize>>,
}

/// The keys of one config text and where they are.
#[derive(Debug)]
pub(crate) struct KeyMap<'a> {
    text: &'a str,
    file: &'a str,
    written: Vec<Written>,
}

impl<'a> KeyMap<'a> {
    /// Parses `text` (named `file` in messages), checking every key against the schema.
    pub(crate) fn scan(text: &'a str, file: &'a str) -> Result<Self, ConfigError> {
        let document = ImDocument::parse(text).map_err(|err| ConfigError::Syntax {
            at: location_of(text, file, err.span().map(|span| span.start)),
            message: one_line(err.message()),
        })?;
        let mut map = Self {
            text,
            file,
            written: Vec::new(),
        };
        map.walk("", document.as_table())?;
        Ok(map)
    }

    fn walk(&mut self, parent: &str, table: &dyn TableLike) -> Result<(), ConfigError> {
        for (name, item) in table.iter() {
            let key_span = table.get_key_value(name).and_then(|(key, _)| key.span());
            let path = join(parent, name);
            let value_span = item.span();
            // `[user]` is the program's: its keys are recorded (for their lines) but checked
            // only when the program reads them (`RunConfig::user_section`).
            let free = parent == "user" || parent.starts_with("user.");
            if let (false, Err(miss)) = (free, check_key(parent, name)) {
                let offset = key_span.as_ref().or(value_span.as_ref()).map(|span| span.start);
                return Err(ConfigError::UnknownKey {
                    at: location_of(self.text, self.file, offset),
                    key: path,
                    name: miss.name,
                    scope: miss.scope,
                    suggestion: miss.suggestion,
                    expected: miss.expected,
                });
            }
            self.written.push(Written {
                path: path.clone(),
                key_span,
                value_span,
            });
            // A table of the schema given as something else (`optim = 3`) is left to serde,
            // whose type error is then located by `key_at`.
            let descend = find_table(&path).is_some() || path == "user" || free;
            if let (true, Some(child)) = (descend, item.as_table_like()) {
                self.walk(&path, child)?;
            }
        }
        Ok(())
    }

    /// The innermost written key whose key or value contains byte `offset`.
    pub(crate) fn key_at(&self, offset: usize) -> Option<&str> {
        let contains = |span: &Option<Range<usize>>| span.as_ref().is_some_and(|s| s.start <= offset && offset < s.end);
        self.written
            .iter()
            .filter(|w| contains(&w.key_span) || contains(&w.value_span))
            .max_by_key(|w| w.path.matches('.').count())
            .map(|w| w.path.as_str())
    }

    /// Where a `toml`/serde error at byte `offset` points: the key written there (with the key's
    /// line) or, if none, the offset itself.
    pub(crate) fn locate_error(&self, offset: Option<usize>) -> (String, Location) {
        match offset.and_then(|offset| self.key_at(offset)) {
            Some(path) => (path.to_string(), self.location(path)),
            None => (String::new(), location_of(self.text, self.file, offset)),
        }
    }

    /// The location of a written key (of its name, so `12:1` for a key at the start of line 12).
    fn location(&self, path: &str) -> Location {
        let offset = self
            .written
            .iter()
            .find(|w| w.path == path)
            .and_then(|w| w.key_span.as_ref().or(w.value_span.as_ref()))
            .map(|span| span.start);
        location_of(self.text, self.file, offset)
    }

    /// Origin of every written key, for validation messages.
    pub(crate) fn origins(&self) -> BTreeMap<String, Origin> {
        self.written
            .iter()
            .map(|w| (w.path.clone(), self.location(&w.path).origin))
            .collect()
    }
}

/// `file:line:column` of byte `offset` in `text` (1-based; the column counts characters), or the
/// file alone.
fn location_of(text: &str, file: &str, offset: Option<usize>) -> Location {
    let origin = match offset {
        Some(offset) => {
            let mut end = offset.min(text.len());
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            let before = &text[..end];
            let line = before.matches('\n').count() + 1;
            let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
            let column = before[line_start..].chars().count() + 1;
            Origin::File { line, column }
        }
        None => Origin::Default,
    };
    Location {
        file: file.to_string(),
        origin,
    }
}

/// A parser message on one line: `invalid array\nexpected `]`` becomes `invalid array: expected `]``.
pub(crate) fn one_line(message: &str) -> String {
    message
        .trim_end()
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(": ")
}
