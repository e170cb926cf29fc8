//! Everything the launcher prints: each rank's output, line by line with a `[rankN]: ` prefix
//! (and, with `--log-dir`, unprefixed into `rank_N.stdout`/`.stderr`), and its own lines, which start
//! with `burnrun: `.
//!
//! One thread per rank stream reads the pipe; a line is written under the console's lock so lines of
//! different ranks never interleave. The last lines of each rank's stderr are kept for the failure
//! summary.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Instant;

use super::LaunchError;

/// Lines of a rank's stderr kept for the failure summary.
pub const STDERR_TAIL_LINES: usize = 20;
/// A kept line is cut to this many characters (a stack dump line can be huge).
const TAIL_LINE_CHARS: usize = 400;
/// A line longer than this is printed in pieces rather than buffered without bound.
const MAX_LINE_BYTES: usize = 16 << 10;

/// Prints one of the launcher's own lines on stderr.
pub(crate) fn say(message: impl std::fmt::Display) {
    // One write per line, so lines of launchers sharing a terminal do not interleave.
    let line = format!("burnrun: {message}\n");
    // A closed stderr leaves nobody to tell; the launcher goes on supervising.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
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
    spawn_pump(rank, Stream::Stdout, stdout, logs.stdout, None, &output);
    spawn_pump(
        rank,
        Stream::Stderr,
        stderr,
        logs.stderr,
        Some(Arc::clone(&output.tail)),
        &output,
    );
    output
}

fn spawn_pump(
    rank: usize,
    stream: Stream,
    source: impl Read + Send + 'static,
    log: Option<File>,
    tail: Option<Arc<Mutex<VecDeque<String>>>>,
    output: &RankOutput,
) {
    let open = Arc::clone(&output.open);
    let mut sink = LineSink {
        prefix: format!("[rank{rank}]: "),
        stream,
        log,
        tail,
    };
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

/// Where a rank stream's lines go.
struct LineSink {
    prefix: String,
    stream: Stream,
    log: Option<File>,
    tail: Option<Arc<Mutex<VecDeque<String>>>>,
}

impl LineSink {
    fn line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let mut framed = Vec::with_capacity(self.prefix.len() + line.len() + 1);
        framed.extend_from_slice(self.prefix.as_bytes());
        framed.extend_from_slice(line);
        framed.push(b'\n');
        // Write errors (a closed console, a full disk) must not stop the copy: the rank would block
        // on a full pipe. The line is dropped from that destination only.
        let _ = match self.stream {
            Stream::Stdout => std::io::stdout().lock().write_all(&framed),
            Stream::Stderr => std::io::stderr().lock().write_all(&framed),
        };
        if let Some(log) = self.log.as_mut() {
            let _ = log.write_all(&framed[self.prefix.len()..]);
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(input: &[u8]) -> Vec<String> {
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let mut sink = LineSink {
            prefix: "[rank0]: ".into(),
            stream: Stream::Stderr,
            log: None,
            tail: Some(Arc::clone(&tail)),
        };
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
