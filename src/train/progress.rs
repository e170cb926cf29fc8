//! Progress on rank 0: an indicatif bar on a terminal, plain log lines otherwise, never silence.
//!
//! Under a launcher (`BURNRUN_CONTROL_LINES=1`) rank 0's stderr is a pipe, so a bar of its own
//! would be hidden (indicatif draws nothing to a target that is not a terminal, and its `println`
//! goes with it). Rank 0 then sends control lines instead ([`ControlLine`]: a tick at most
//! [`TICKS_PER_SEC`] times a second, every logged step, the end) and the launcher draws the one bar
//! on its own terminal, or writes the logged steps as plain lines to a pipe, a file or `--log-dir`.

use std::io::{IsTerminal, Write};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use super::metrics::StepMetrics;
use crate::names::{ControlLine, PROGRESS_BAR_TEMPLATE};

/// Most ticks a second sent to the launcher: a bar needs no more, and a fast loop must not flood
/// the pipe. Logged steps are always sent.
pub const TICKS_PER_SEC: u32 = 10;

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// A bar when stderr is a terminal (or the launcher's is), plain lines otherwise.
    Auto,
    /// A bar where one can be drawn (a terminal), plain lines otherwise.
    Bar,
    /// Always plain lines.
    Plain,
    /// Nothing, not even the final line.
    Off,
}

/// Where rank 0's progress goes.
#[derive(Debug)]
enum Sink {
    /// Its own bar on its own terminal.
    Bar(ProgressBar),
    /// Plain lines on stderr.
    Plain,
    /// Control lines to the launcher; the time of the last tick sent, for the rate limit.
    Launcher { last_tick: Mutex<Option<Instant>> },
    /// Nothing (other ranks, or `off`).
    Off,
}

/// The progress reporter.
#[derive(Debug)]
pub struct Progress {
    sink: Sink,
    total: u64,
}

impl Progress {
    /// A reporter for `total` steps starting at `start`; `enabled` is false on every rank but 0.
    pub fn new(mode: ProgressMode, total: u64, start: u64, enabled: bool) -> Self {
        let sink = Self::choose(
            mode,
            enabled,
            crate::env::control_lines(),
            std::io::stderr().is_terminal(),
        );
        let sink = match sink {
            SinkKind::Bar => {
                let bar = ProgressBar::new(total);
                bar.set_style(bar_style());
                bar.set_position(start);
                Sink::Bar(bar)
            }
            SinkKind::Plain => Sink::Plain,
            SinkKind::Launcher => Sink::Launcher {
                last_tick: Mutex::new(None),
            },
            SinkKind::Off => Sink::Off,
        };
        let progress = Self { sink, total };
        if matches!(progress.sink, Sink::Launcher { .. }) {
            // The launcher learns the length (and where a resumed run starts) at once.
            progress.send(&ControlLine::Tick { step: start, total });
        }
        progress
    }

    /// The sink for a mode: under a launcher, the launcher decides between bar and lines; alone, a
    /// bar only on a terminal (indicatif hides one anywhere else), plain lines otherwise.
    fn choose(mode: ProgressMode, enabled: bool, launcher: bool, terminal: bool) -> SinkKind {
        match mode {
            _ if !enabled => SinkKind::Off,
            ProgressMode::Off => SinkKind::Off,
            ProgressMode::Plain => SinkKind::Plain,
            ProgressMode::Auto | ProgressMode::Bar if launcher => SinkKind::Launcher,
            ProgressMode::Auto | ProgressMode::Bar if terminal => SinkKind::Bar,
            ProgressMode::Auto | ProgressMode::Bar => SinkKind::Plain,
        }
    }

    /// Advances to `step` steps done.
    pub fn tick(&self, step: u64) {
        match &self.sink {
            Sink::Bar(bar) => bar.set_position(step),
            Sink::Launcher { last_tick } => {
                let now = Instant::now();
                let mut last = last_tick.lock().unwrap_or_else(PoisonError::into_inner);
                let due = last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1) / TICKS_PER_SEC);
                if due || step == self.total {
                    *last = Some(now);
                    self.send(&ControlLine::Tick {
                        step,
                        total: self.total,
                    });
                }
            }
            Sink::Plain | Sink::Off => {}
        }
    }

    /// Shows a logged step.
    pub fn log(&self, m: &StepMetrics) {
        let text = format!(
            "loss {:.4}  lr {:.2e}  {:.0} samples/s  step {:.1} ms (compute {:.1}, comm {:.1})",
            m.loss, m.lr, m.samples_per_sec, m.step_ms, m.compute_ms, m.comm_ms
        );
        match &self.sink {
            Sink::Bar(bar) => bar.set_message(text),
            Sink::Plain => eprintln!("{}", ControlLine::plain_step(m.step, self.total, &text)),
            Sink::Launcher { .. } => self.send(&ControlLine::Step {
                step: m.step,
                total: self.total,
                text,
            }),
            Sink::Off => {}
        }
    }

    /// Prints a line above the bar (or plainly; under a launcher, which prints it above its bar).
    pub fn println(&self, line: &str) {
        match &self.sink {
            Sink::Bar(bar) => bar.println(line),
            Sink::Plain | Sink::Launcher { .. } => eprintln!("{line}"),
            Sink::Off => {}
        }
    }

    /// Finishes the bar.
    pub fn finish(&self) {
        match &self.sink {
            Sink::Bar(bar) => bar.finish(),
            Sink::Launcher { .. } => self.send(&ControlLine::Done),
            Sink::Plain | Sink::Off => {}
        }
    }

    fn send(&self, control: &ControlLine) {
        let line = format!("{}\n", control.encode());
        // One write per line, so it never interleaves with another thread's; a closed stderr
        // (launcher gone) leaves nobody to show progress to.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }
}

/// Which sink [`Progress::choose`] picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SinkKind {
    Bar,
    Plain,
    Launcher,
    Off,
}

/// The bar's look, the same whether the rank or the launcher draws it.
fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template(PROGRESS_BAR_TEMPLATE).unwrap_or_else(|_| ProgressStyle::default_bar())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bar_is_drawn_only_on_a_terminal_and_a_launcher_gets_control_lines() {
        use ProgressMode::*;
        use SinkKind as K;
        // (mode, launcher, terminal) -> sink, for rank 0.
        let cases = [
            (Bar, false, false, K::Plain),
            (Bar, false, true, K::Bar),
            (Auto, false, false, K::Plain),
            (Auto, false, true, K::Bar),
            (Bar, true, false, K::Launcher),
            (Auto, true, true, K::Launcher),
            (Plain, true, true, K::Plain),
            (Plain, false, true, K::Plain),
            (Off, true, true, K::Off),
            (Off, false, false, K::Off),
        ];
        for (mode, launcher, terminal, expected) in cases {
            assert_eq!(
                Progress::choose(mode, true, launcher, terminal),
                expected,
                "{mode:?}, launcher {launcher}, terminal {terminal}"
            );
        }
        assert_eq!(Progress::choose(Bar, false, true, true), K::Off, "not rank 0");
    }
}
