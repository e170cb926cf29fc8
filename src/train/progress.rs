//! Progress on rank 0: an indicatif bar on a terminal, plain log lines otherwise.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

use super::metrics::StepMetrics;

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// A bar when stderr is a terminal, plain lines otherwise.
    Auto,
    /// Always a bar.
    Bar,
    /// Always plain lines.
    Plain,
    /// Nothing.
    Off,
}

/// The progress reporter.
#[derive(Debug)]
pub struct Progress {
    bar: Option<ProgressBar>,
    plain: bool,
    total: u64,
}

impl Progress {
    /// A reporter for `total` steps starting at `start`; `enabled` is false on every rank but 0.
    pub fn new(mode: ProgressMode, total: u64, start: u64, enabled: bool) -> Self {
        let use_bar = enabled
            && match mode {
                ProgressMode::Auto => std::io::stderr().is_terminal(),
                ProgressMode::Bar => true,
                ProgressMode::Plain | ProgressMode::Off => false,
            };
        let bar = use_bar.then(|| {
            let bar = ProgressBar::new(total);
            let style = ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len} steps  {msg}  ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_position(start);
            bar
        });
        let plain = enabled && !use_bar && mode != ProgressMode::Off;
        Self { bar, plain, total }
    }

    /// Advances by one step.
    pub fn tick(&self, step: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(step);
        }
    }

    /// Shows a logged step.
    pub fn log(&self, m: &StepMetrics) {
        let text = format!(
            "loss {:.4}  lr {:.2e}  {:.0} samples/s  step {:.1} ms (compute {:.1}, comm {:.1})",
            m.loss, m.lr, m.samples_per_sec, m.step_ms, m.compute_ms, m.comm_ms
        );
        if let Some(bar) = &self.bar {
            bar.set_message(text);
        } else if self.plain {
            eprintln!("step {:>6}/{}  {text}", m.step, self.total);
        }
    }

    /// Prints a line above the bar (or plainly).
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None if self.plain => eprintln!("{line}"),
            None => {}
        }
    }

    /// Finishes the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}
