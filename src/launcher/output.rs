//! Everything the launcher prints: each rank's output, line by line with a `[rankN]: ` prefix
//! (and, with `--log-dir`, unprefixed into `rank_N.stdout`/`.stderr`), and its own lines, which start
//! with `burnrun: `.
//!
//! One thread per rank stream reads the pipe; a line is written under the console's lock so lines of
//! different ranks never interleave. The last lines of each rank's stderr are kept for the failure
//! summary.
//!
//! Control lines ([`ControlLine`]) are read, never printed as they are. Rank 0's progress becomes one
//! indicatif bar when the launcher's own stderr is a terminal (every other line is then printed above
//! it, so the two never garble); otherwise, and always in `--log-dir` files, each logged step becomes
//! a plain line (`step N/T loss ...`) and ticks are dropped. A rank that sends
//! [`ControlLine::RawStream`] on a stream has the rest of that stream copied without the prefix
//! (`bench --json` does so on stdout, so its JSON lines reach the launcher's stdout as written).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{IsTerminal, Read, Write};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::LaunchError;
use crate::names::{ControlLine, PROGRESS_BAR_TEMPLATE};

/// Lines of a rank's stderr kept for the failure summary.
pub const STDERR_TAIL_LINES: usize = 20;
/// A kept line is cut to this many characters (a stack dump line can be huge).
const TAIL_LINE_CHARS: usize = 400;
/// A line longer than this is printed in pieces rather than buffered without bound.
const MAX_LINE_BYTES: usize = 16 << 10;

/// The bar drawing rank 0's progress while one is shown on the launcher's terminal. Every line
/// goes to the console through [`console_write`], which lifts the bar for it.
static BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// Writes `bytes` (whole lines) to the launcher's stdout or stderr, above the progress bar if one
/// is shown. Write errors (a closed console) are ignored: the launcher goes on supervising, and a
/// rank must not block on a full pipe.
fn console_write(stream: Stream, bytes: &[u8]) {
    let bar = BAR.lock().unwrap_or_else(PoisonError::into_inner);
    let write = || {
        let _ = match stream {
            Stream::Stdout => std::io::stdout().lock().write_all(bytes),
            Stream::Stderr => std::io::stderr().lock().write_all(bytes),
        };
    };
    match bar.as_ref() {
        Some(bar) => bar.suspend(write),
        None => write(),
    }
}

/// Prints one of the launcher's own lines on stderr.
pub(crate) fn say(message: impl std::fmt::Display) {
    // One write per line, so lines of launchers sharing a terminal do not interleave.
    let line = format!("burnrun: {message}\n");
    console_write(Stream::Stderr, line.as_bytes());
}

/// Moves the launcher's bar to `step` of `total` (created at the first call), with `message`.
fn show_progress(step: u64, total: u64, message: Option<String>) {
    let mut bar = BAR.lock().unwrap_or_else(PoisonError::into_inner);
    let bar = bar.get_or_insert_with(|| {
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(PROGRESS_BAR_TEMPLATE).unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    });
    if bar.length() != Some(total) {
        bar.set_length(total);
    }
    bar.set_position(step);
    if let Some(message) = message {
        bar.set_message(message);
    }
}

/// Ends the launcher's bar, if one is shown: `done` leaves it complete, otherwise where it stopped.
fn end_progress(done: bool) {
    let bar = BAR.lock().unwrap_or_else(PoisonError::into_inner).take();
    if let Some(bar) = bar {
        if done {
            bar.finish();
        } else {
            bar.abandon();
        }
        // indicatif leaves the cursor at the end of the bar's line: the next line starts below it.
        if !bar.is_hidden() {
            let _ = std::io::stderr().lock().write_all(b"\n");
        }
    }
}

/// Which of the launcher's streams a rank stream goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn extension(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// A rank's output as the supervisor sees it: the stderr tail and whether both pipes have closed.
#[derive(Debug, Clone)]
pub(crate) struct RankOutput {
    tail: Arc<Mutex<VecDeque<String>>>,
    /// Number of the rank's streams still open, and a condvar notified when one closes.
    open: Arc<(Mutex<usize>, Condvar)>,
}

impl RankOutput {
    /// The last lines of the rank's stderr, oldest first.
    pub(crate) fn stderr_tail(&self) -> Vec<String> {
        self.tail
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }

    /// Waits until both of the rank's streams reached end of file, or `deadline`; true if they did.
    pub(crate) fn wait_closed(&self, deadline: Instant) -> bool {
        let (open, closed) = &*self.open;
        let mut open = open.lock().unwrap_or_else(PoisonError::into_inner);
        while *open > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            open = closed
                .wait_timeout(open, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }
}

/// A rank's log files (`--log-dir`), created before the rank starts.
#[derive(Debug, Default)]
pub(crate) struct LogFiles {
    stdout: Option<File>,
    stderr: Option<File>,
}

impl LogFiles {
    /// Creates `rank_N.stdout` and `rank_N.stderr` in `dir`, if a directory is given.
    pub(crate) fn create(rank: usize, dir: Option<&Path>) -> Result<Self, LaunchError> {
        let Some(dir) = dir else { return Ok(Self::default()) };
        let open = |stream: Stream| {
            let path = dir.join(format!("rank_{rank}.{}", stream.extension()));
            File::create(&path).map_err(|source| LaunchError::LogFile { path, source })
        };
        Ok(Self {
            stdout: Some(open(Stream::Stdout)?),
            stderr: Some(open(Stream::Stderr)?),
        })
    }
}

/// Starts the two threads that copy a rank's stdout and stderr.
pub(crate) fn start(
    rank: usize,
    stdout: impl Read + Send + 'static,
    stderr: impl Read + Send + 'static,
    logs: LogFiles,
) -> RankOutput {
    let output = RankOutput {
        tail: Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL_LINES))),
        open: Arc::new((Mutex::new(2), Condvar::new())),
    };
    spawn_pump(
        rank,
        LineSink::new(rank, Stream::Stdout, logs.stdout, None, None),
        stdout,
        &output,
    );
    // Rank 0's progress: a bar if a person watches the launcher's terminal, plain lines otherwise.
    let progress = (rank == 0).then(|| Progress {
        bar: std::io::stderr().is_terminal(),
    });
    let tail = Some(Arc::clone(&output.tail));
    spawn_pump(
        rank,
        LineSink::new(rank, Stream::Stderr, logs.stderr, tail, progress),
        stderr,
        &output,
    );
    output
}

fn spawn_pump(rank: usize, mut sink: LineSink, source: impl Read + Send + 'static, output: &RankOutput) {
    let open = Arc::clone(&output.open);
    let stream = sink.stream;
    let body = move || {
        copy_lines(source, &mut sink);
        let (open, closed) = &*open;
        *open.lock().unwrap_or_else(PoisonError::into_inner) -= 1;
        closed.notify_all();
    };
    // The thread ends when the rank's pipe closes, which teardown guarantees by killing its group.
    if let Err(e) = std::thread::Builder::new()
        .name(format!("rank{rank}-{}", stream.extension()))
        .spawn(body)
    {
        say(format_args!(
            "cannot start the thread copying rank {rank}'s {}: {e}",
            stream.extension()
        ));
    }
}

/// How rank 0's progress control lines are shown (only its stderr has one).
#[derive(Debug, Clone, Copy)]
struct Progress {
    /// Draw the bar (the launcher's stderr is a terminal); otherwise plain lines for logged steps.
    bar: bool,
}

/// Where a rank stream's lines go.
struct LineSink {
    prefix: String,
    stream: Stream,
    log: Option<File>,
    tail: Option<Arc<Mutex<VecDeque<String>>>>,
    progress: Option<Progress>,
    /// The rank asked for this stream to be copied without the prefix ([`ControlLine::RawStream`]).
    raw: bool,
}

impl LineSink {
    fn new(
        rank: usize,
        stream: Stream,
        log: Option<File>,
        tail: Option<Arc<Mutex<VecDeque<String>>>>,
        progress: Option<Progress>,
    ) -> Self {
        Self {
            prefix: format!("[rank{rank}]: "),
            stream,
            log,
            tail,
            progress,
            raw: false,
        }
    }

    fn line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        match ControlLine::decode(line) {
            None => self.text(line, true),
            Some(Ok(control)) => self.control(control),
            // From a newer or older burnrun, or garbled: never shown raw.
            Some(Err(reason)) => tracing::debug!(prefix = %self.prefix, %reason, "dropped an unreadable control line"),
        }
    }

    fn control(&mut self, control: ControlLine) {
        let bar = self.progress.is_some_and(|p| p.bar);
        match control {
            ControlLine::RawStream => self.raw = true,
            ControlLine::Tick { step, total } if bar => show_progress(step, total, None),
            ControlLine::Step { step, total, text } => {
                let plain = ControlLine::plain_step(step, total, &text);
                if bar {
                    show_progress(step, total, Some(text));
                }
                // The console gets the line unless the bar shows it; the log file always does.
                self.text(plain.as_bytes(), !bar);
            }
            ControlLine::Done if bar => end_progress(true),
            ControlLine::Tick { .. } | ControlLine::Done => {}
        }
    }

    /// Copies one line of text: to the console (if `console`), the log file and the tail.
    fn text(&mut self, line: &[u8], console: bool) {
        let prefix: &[u8] = if self.raw { b"" } else { self.prefix.as_bytes() };
        let mut framed = Vec::with_capacity(prefix.len() + line.len() + 1);
        framed.extend_from_slice(prefix);
        framed.extend_from_slice(line);
        framed.push(b'\n');
        // Write errors (a closed console, a full disk) must not stop the copy: the rank would block
        // on a full pipe. The line is dropped from that destination only.
        if console {
            console_write(self.stream, &framed);
        }
        if let Some(log) = self.log.as_mut() {
            let _ = log.write_all(&framed[prefix.len()..]);
        }
        if let Some(tail) = &self.tail {
            let text: String = String::from_utf8_lossy(line).chars().take(TAIL_LINE_CHARS).collect();
            let mut tail = tail.lock().unwrap_or_else(PoisonError::into_inner);
            if tail.len() == STDERR_TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(text);
        }
    }
}

/// Splits `source` into lines (a final line without newline included, an over-long line in pieces).
fn copy_lines(mut source: impl Read, sink: &mut LineSink) {
    let mut chunk = [0u8; 8192];
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let n = match source.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        pending.extend_from_slice(&chunk[..n]);
        let mut start = 0;
        while let Some(newline) = pending[start..].iter().position(|&b| b == b'\n') {
            sink.line(&pending[start..start + newline]);
            start += newline + 1;
        }
        pending.drain(..start);
        while pending.len() >= MAX_LINE_BYTES {
            sink.line(&pending[..MAX_LINE_BYTES]);
            pending.drain(..MAX_LINE_BYTES);
        }
    }
    if !pending.is_empty() {
        sink.line(&pending);
    }
    if sink.progress.is_some_and(|p| p.bar) {
        // Rank 0 ended without saying it was done (it failed): the bar stays where it stopped.
        end_progress(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(input: &[u8]) -> Vec<String> {
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let mut sink = LineSink::new(0, Stream::Stderr, None, Some(Arc::clone(&tail)), None);
        copy_lines(input, &mut sink);
        let lines = tail.lock().unwrap().iter().cloned().collect();
        lines
    }

    #[test]
    fn lines_are_split_on_newlines_and_a_last_unterminated_line_is_kept() {
        assert_eq!(collect(b"a\r\nb\n\nc"), ["a", "b", "", "c"]);
    }

    #[test]
    fn the_tail_keeps_only_the_last_lines() {
        let input: String = (0..50).map(|i| format!("line {i}\n")).collect();
        let lines = collect(input.as_bytes());
        assert_eq!(lines.len(), STDERR_TAIL_LINES);
        assert_eq!(lines.last().unwrap(), "line 49");
    }

    #[test]
    fn an_endless_line_is_cut_into_pieces() {
        let lines = collect(&vec![b'x'; MAX_LINE_BYTES * 2 + 10]);
        assert_eq!(lines.len(), 3);
    }
}
