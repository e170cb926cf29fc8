//! `[log]`: progress display and metrics.

use serde::{Deserialize, Serialize};

use super::choice::choice;

choice! {
    /// `log.progress`: how rank 0 shows progress.
    Progress, default Auto {
        /// A progress bar when standard error is a terminal, plain lines otherwise.
        Auto = "auto",
        /// Always a progress bar.
        Bar = "bar",
        /// Always plain log lines.
        Plain = "plain",
        /// Nothing but warnings and errors.
        Off = "off",
    }
}

/// `[log]`: what is reported, how often.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Report (progress line, metrics record) every this many steps, and after the last. Default `10`.
    pub every_steps: u64,
    /// Progress display: `"auto"`, `"bar"`, `"plain"` or `"off"`. Default `"auto"`.
    pub progress: Progress,
    /// Append one JSON object per reported step to `<train.out_dir>/metrics.jsonl`. Default `true`.
    pub metrics: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            every_steps: 10,
            progress: Progress::Auto,
            metrics: true,
        }
    }
}
