//! The flight recorder: every rank keeps its last [`ENTRIES`] collectives (sequence number,
//! group, operation, element type and count, peer or root, state, start and end times) and its
//! training step and phase in a small file in shared memory, and its launcher reads it from
//! outside, at any time: also when the rank is stopped (SIGSTOP), stuck in the kernel or dead.
//! So a hang is explained by the ranks' own records, not guessed from the timeouts of the others
//! (NCCL's Flight Recorder dumps from inside the process, which a stopped process cannot do).
//!
//! The file (`/dev/shm/<run prefix>r<rank>-flight`, removed with the run's other shared-memory
//! files) is a header and a ring of fixed-size entries, written through a shared mapping: a
//! record costs a few stores, no system call. Times are wall-clock nanoseconds, comparable across
//! the processes of a host. [`verdict`] turns every rank's record into one sentence: which rank
//! is behind, in which phase and call, and what the others wait for.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The group number NCCL's calls are recorded under (they are numbered by NCCL's communicator,
/// not by a host group; the verdict judges the host world group, the report shows both).
pub const NCCL_GROUP: u64 = u64::MAX;

/// Collectives a rank remembers.
pub const ENTRIES: usize = 64;
/// File magic and layout version ("BRFLIGHT", version 1 in the low byte).
const MAGIC: u64 = 0x4252_464C_4947_4801;
/// Header words: magic, rank, pid, step + 1 (0: none yet), phase, progress count, progress time,
/// next entry.
const HEADER_WORDS: usize = 8;
/// Entry words: seq, group, count, state, start, end, peer + 1 (0: none), then the op's name (16
/// bytes) and the element type's (8 bytes).
const ENTRY_WORDS: usize = 10;
const OP_BYTES: usize = 16;
const DTYPE_BYTES: usize = 8;
/// The longest text field of an entry.
const TEXT_BYTES_MAX: usize = OP_BYTES;
/// Bytes of the file.
pub const FILE_BYTES: usize = 8 * (HEADER_WORDS + ENTRIES * ENTRY_WORDS);

/// What a rank is doing, as the trainer says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Joining the job, building the model.
    Setup,
    /// Building a batch.
    Data,
    /// Forward pass.
    Forward,
    /// Backward pass.
    Backward,
    /// Averaging gradients (and the loss scaler's check).
    GradientSync,
    /// The optimizer's update.
    Optimizer,
    /// Writing a checkpoint.
    Checkpoint,
}

const PHASES: [Phase; 7] = [
    Phase::Setup,
    Phase::Data,
    Phase::Forward,
    Phase::Backward,
    Phase::GradientSync,
    Phase::Optimizer,
    Phase::Checkpoint,
];

impl Phase {
    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Setup => "setup",
            Phase::Data => "data",
            Phase::Forward => "forward",
            Phase::Backward => "backward",
            Phase::GradientSync => "gradient sync",
            Phase::Optimizer => "optimizer",
            Phase::Checkpoint => "checkpoint",
        }
    }
}

/// The state of a recorded collective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CallState {
    /// Entered, not finished.
    Started,
    /// Finished.
    Done,
    /// Failed (timed out, a peer lost).
    Failed,
}

/// One collective as a rank recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Call {
    /// Its sequence number in its group.
    pub seq: u64,
    /// The group (0: the world).
    pub group: u64,
    /// The operation (`all_reduce`, ...).
    pub op: String,
    /// Element type.
    pub dtype: String,
    /// Elements.
    pub count: u64,
    /// Peer (send/recv) or root, if any.
    pub peer: Option<u64>,
    /// Where it got to.
    pub state: CallState,
    /// Wall-clock start, ns since the Unix epoch.
    pub start_ns: u64,
    /// Wall-clock end (0 while running).
    pub end_ns: u64,
}

impl Call {
    /// `all_reduce #12 (f32 x 4096)`.
    pub fn describe(&self) -> String {
        let group = match self.group {
            0 => String::new(),
            NCCL_GROUP => " on NCCL".to_string(),
            g => format!(" of group {g}"),
        };
        format!("{} #{}{group} ({} x {})", self.op, self.seq, self.dtype, self.count)
    }
}

/// A rank's whole record, as its launcher reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Global rank.
    pub rank: u64,
    /// Its process.
    pub pid: u64,
    /// The training step it is in (`None` before the first).
    pub step: Option<u64>,
    /// Its phase.
    pub phase: Phase,
    /// When it last made progress (a collective finished, a step or phase began), ns.
    pub progress_ns: u64,
    /// Its last collectives, oldest first.
    pub calls: Vec<Call>,
}

/// Wall-clock nanoseconds since the Unix epoch.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Wall-clock nanoseconds since the Unix epoch from the kernel's coarse clock (a few ms of
/// resolution, no time-stamp-counter read): what the recording side stamps, twice per collective,
/// so a small collective does not pay for a precise clock. Readers compare with [`now_ns`]
/// through `saturating_sub`, so being up to a tick behind is harmless.
fn coarse_now_ns() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `now` is a valid, writable timespec that outlives the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut now) };
    if rc != 0 {
        return now_ns();
    }
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// The file of `rank`'s record, for the run whose shared-memory files start with `prefix`
/// (`names::shm_rank_file_prefix`).
pub fn path(rank_prefix: &str) -> PathBuf {
    Path::new(crate::names::SHM_DIR).join(format!("{rank_prefix}flight"))
}

/// A record file mapped for writing (the process's own is installed by [`install`]).
///
/// Writers (the main thread, a group's executor) take no lock: a collective claims its slot with
/// one atomic add on the entry counter and then writes only that slot, marking it invalid while
/// it does (a reader skips it); the header's words are single stores a reader may see old.
pub struct Recorder {
    words: *mut AtomicU64,
}

// SAFETY: the mapping lives as long as the process (never unmapped) and is only accessed through
// atomics.
unsafe impl Send for Recorder {}
// SAFETY: see `Send`.
unsafe impl Sync for Recorder {}

static RECORDER: OnceLock<Recorder> = OnceLock::new();

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").finish_non_exhaustive()
    }
}

impl Recorder {
    /// Creates the record file of `rank` at `path` and maps it (the mapping is never unmapped:
    /// a process records until it ends).
    pub fn create(path: &Path, rank: usize) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        file.set_len(FILE_BYTES as u64)?;
        // SAFETY: a fresh shared mapping of the whole file; checked before use; never unmapped,
        // so no reference into it can dangle.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                FILE_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let recorder = Recorder { words: ptr.cast() };
        recorder.set(1, rank as u64);
        recorder.set(2, u64::from(std::process::id()));
        recorder.set(6, coarse_now_ns());
        recorder.set(0, MAGIC);
        Ok(recorder)
    }

    /// A collective begins; returns its slot for [`Recorder::end`].
    pub fn begin(&self, group: u64, seq: u64, op: &str, dtype: &str, count: u64, peer: Option<usize>) -> usize {
        let slot = (self.word(7).fetch_add(1, Ordering::Relaxed) as usize) % ENTRIES;
        let base = HEADER_WORDS + slot * ENTRY_WORDS;
        self.set(base + 3, 0); // invalid while it is rewritten
        self.set(base, seq);
        self.set(base + 1, group);
        self.set(base + 2, count);
        self.set(base + 4, coarse_now_ns());
        self.set(base + 5, 0);
        self.set(base + 6, peer.map_or(0, |p| p as u64 + 1));
        self.set_text(base + 7, op, OP_BYTES);
        self.set_text(base + 9, dtype, DTYPE_BYTES);
        // Release: the fields above are in place before the slot reads as valid.
        self.word(base + 3).store(1, Ordering::Release);
        slot
    }

    /// The collective of `slot` ended (`ok`: it finished; else it failed).
    pub fn end(&self, slot: usize, ok: bool) {
        let base = HEADER_WORDS + (slot % ENTRIES) * ENTRY_WORDS;
        let now = coarse_now_ns();
        self.set(base + 5, now);
        self.set(base + 3, if ok { 2 } else { 3 });
        if ok {
            self.progressed_at(now);
        }
    }

    /// Step `step` (0-based) begins, with its data.
    pub fn step(&self, step: u64) {
        self.set(3, step + 1);
        self.set(4, PHASES.iter().position(|&p| p == Phase::Data).unwrap_or(0) as u64);
        self.progressed();
    }

    /// `phase` begins.
    pub fn phase(&self, phase: Phase) {
        let index = PHASES.iter().position(|&p| p == phase).unwrap_or(0) as u64;
        self.set(4, index);
        self.progressed();
    }

    fn word(&self, index: usize) -> &AtomicU64 {
        assert!(index < FILE_BYTES / 8);
        // SAFETY: in bounds of the mapping, which is page-aligned and never unmapped.
        unsafe { &*self.words.add(index) }
    }

    fn set(&self, index: usize, value: u64) {
        self.word(index).store(value, Ordering::Relaxed);
    }

    fn get(&self, index: usize) -> u64 {
        self.word(index).load(Ordering::Relaxed)
    }

    fn set_text(&self, first_word: usize, text: &str, bytes: usize) {
        let mut buf = [0u8; TEXT_BYTES_MAX];
        let bytes = bytes.min(TEXT_BYTES_MAX);
        let n = text.len().min(bytes);
        buf[..n].copy_from_slice(&text.as_bytes()[..n]);
        for (i, chunk) in buf[..bytes].chunks_exact(8).enumerate() {
            self.set(first_word + i, u64::from_le_bytes(chunk.try_into().expect("8 bytes")));
        }
    }

    fn progressed(&self) {
        self.progressed_at(coarse_now_ns());
    }

    /// Counts progress (word 5: a heartbeat a reader compares over time; two writers at once may
    /// count one) and stamps it (word 6).
    fn progressed_at(&self, now: u64) {
        self.set(5, self.get(5) + 1);
        self.set(6, now);
    }
}

/// Creates this rank's record at `path` and starts recording (once per process; later calls do
/// nothing). Without it every recording call is a no-op.
pub fn install(path: &Path, rank: usize) -> std::io::Result<()> {
    if RECORDER.get().is_none() {
        let _ = RECORDER.set(Recorder::create(path, rank)?);
    }
    Ok(())
}

/// A collective begins in this process; returns its slot for [`end`].
pub fn begin(group: u64, seq: u64, op: &str, dtype: &str, count: u64, peer: Option<usize>) -> Option<usize> {
    Some(RECORDER.get()?.begin(group, seq, op, dtype, count, peer))
}

/// The collective of `slot` ended (`ok`: it finished; else it failed).
pub fn end(slot: Option<usize>, ok: bool) {
    if let (Some(r), Some(slot)) = (RECORDER.get(), slot) {
        r.end(slot, ok);
    }
}

/// The trainer begins step `step` (0-based).
pub fn step(step: u64) {
    if let Some(r) = RECORDER.get() {
        r.step(step);
    }
}

/// The trainer enters `phase`.
pub fn phase(phase: Phase) {
    if let Some(r) = RECORDER.get() {
        r.phase(phase);
    }
}

/// Reads a rank's record from its file; `None` when there is none (yet) or it is not one.
pub fn read(path: &Path) -> Option<Record> {
    let bytes = std::fs::read(path).ok()?;
    parse(&bytes)
}

/// Parses a record file's bytes.
pub fn parse(bytes: &[u8]) -> Option<Record> {
    if bytes.len() < FILE_BYTES {
        return None;
    }
    let word = |i: usize| u64::from_le_bytes(bytes[8 * i..8 * i + 8].try_into().expect("8 bytes"));
    if word(0) != MAGIC {
        return None;
    }
    let text = |first: usize, n: usize| {
        let raw = &bytes[8 * first..8 * first + n];
        let end = raw.iter().position(|&b| b == 0).unwrap_or(n);
        String::from_utf8_lossy(&raw[..end]).into_owned()
    };
    let next = word(7);
    let count = (next as usize).min(ENTRIES);
    let mut calls = Vec::with_capacity(count);
    for k in 0..count {
        // Oldest first: the slots after `next` wrapped around.
        let slot = ((next as usize).wrapping_sub(count) + k) % ENTRIES;
        let base = HEADER_WORDS + slot * ENTRY_WORDS;
        let state = match word(base + 3) {
            1 => CallState::Started,
            2 => CallState::Done,
            3 => CallState::Failed,
            _ => continue,
        };
        calls.push(Call {
            seq: word(base),
            group: word(base + 1),
            count: word(base + 2),
            state,
            start_ns: word(base + 4),
            end_ns: word(base + 5),
            peer: word(base + 6).checked_sub(1),
            op: text(base + 7, OP_BYTES),
            dtype: text(base + 9, DTYPE_BYTES),
        });
    }
    Some(Record {
        rank: word(1),
        pid: word(2),
        step: word(3).checked_sub(1),
        phase: PHASES.get(word(4) as usize).copied().unwrap_or(Phase::Setup),
        progress_ns: word(6),
        calls,
    })
}

/// A rank's last call in the world group, if any.
fn last_world_call(record: &Record) -> Option<&Call> {
    record.calls.iter().rev().find(|c| c.group == 0)
}

/// Where a rank is, in words: `step 40, backward`.
fn whereabouts(record: &Record) -> String {
    match record.step {
        Some(step) => format!("step {step}, {}", record.phase.name()),
        None => record.phase.name().to_owned(),
    }
}

/// Ranks as `0-2, 5`.
pub fn ranks_text(ranks: &[u64]) -> String {
    let mut sorted = ranks.to_vec();
    sorted.sort_unstable();
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        // `checked_add`: ranks come from record files, and a corrupt one may hold `u64::MAX`.
        while i + 1 < sorted.len() && end.checked_add(1) == Some(sorted[i + 1]) {
            i += 1;
            end = sorted[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(", ")
}

/// The ranks behind the others: whose last world collective is older than the newest any rank
/// entered (they never entered it). Empty when every rank reached the same call.
pub fn behind(records: &[Record]) -> Vec<u64> {
    let front = records.iter().filter_map(|r| last_world_call(r).map(|c| c.seq)).max();
    let Some(front) = front else { return Vec::new() };
    records
        .iter()
        .filter(|r| last_world_call(r).is_none_or(|c| c.seq < front))
        .map(|r| r.rank)
        .collect()
}

/// One sentence from every rank's record at `now_ns`: the rank(s) behind, in which phase and
/// call, and what the others wait for. `None` when no record holds a collective of the world.
pub fn verdict(records: &[Record], now_ns: u64) -> Option<String> {
    let latest: Vec<(&Record, Option<&Call>)> = records.iter().map(|r| (r, last_world_call(r))).collect();
    let front = latest.iter().filter_map(|(_, c)| c.map(|c| c.seq)).max()?;
    let waiting: Vec<(&Record, &Call)> = latest
        .iter()
        .filter_map(|(r, c)| {
            c.filter(|c| c.seq == front && c.state == CallState::Started)
                .map(|c| (*r, c))
        })
        .collect();
    let behind: Vec<&Record> = latest
        .iter()
        .filter(|(_, c)| c.is_none_or(|c| c.seq < front))
        .map(|(r, _)| *r)
        .collect();
    let secs = |c: &Call| now_ns.saturating_sub(c.start_ns) as f64 / 1e9;
    let call = waiting
        .first()
        .map(|(_, c)| (*c).clone())
        .or_else(|| latest.iter().filter_map(|(_, c)| *c).find(|c| c.seq == front).cloned())?;
    let name = format!("{} #{}", call.op, call.seq);
    let wait = match waiting
        .iter()
        .map(|(_, c)| secs(c))
        .fold(None, |m: Option<f64>, s| Some(m.map_or(s, |m| m.max(s))))
    {
        Some(longest) => {
            let ranks: Vec<u64> = waiting.iter().map(|(r, _)| r.rank).collect();
            let verb = if ranks.len() == 1 { "waits" } else { "wait" };
            format!("; rank(s) {} {verb} in it for {longest:.0} s", ranks_text(&ranks))
        }
        None => String::new(),
    };
    if !behind.is_empty() {
        let parts: Vec<String> = behind
            .iter()
            .map(|r| {
                let last = last_world_call(r).map_or("none".to_owned(), |c| {
                    format!("{} #{} ({:?})", c.op, c.seq, c.state).to_lowercase()
                });
                format!(
                    "rank {} never entered {name} ({}; its last collective: {last})",
                    r.rank,
                    whereabouts(r)
                )
            })
            .collect();
        return Some(format!("{}{wait}", parts.join("; ")));
    }
    if waiting.len() == records.len() {
        let places: Vec<String> = records
            .iter()
            .map(|r| format!("rank {}: {}", r.rank, whereabouts(r)))
            .collect();
        return Some(format!(
            "every rank entered {name} and none finished it{wait}: the data is not moving between them (a \
             network or transport problem, or a rank stuck inside the call) [{}]",
            places.join("; ")
        ));
    }
    // A call that failed (timed out, lost a peer) ended on that rank but was not finished: a rank
    // whose record is the only one left (its peers' nodes were cut off) must not read as done.
    let ended_as = |state: CallState| -> Vec<u64> {
        latest
            .iter()
            .filter(|(_, c)| c.is_some_and(|c| c.seq == front && c.state == state))
            .map(|(r, _)| r.rank)
            .collect()
    };
    let mut parts = Vec::new();
    let done = ended_as(CallState::Done);
    if !done.is_empty() {
        parts.push(format!("rank(s) {} finished {name} and went on", ranks_text(&done)));
    }
    let failed = ended_as(CallState::Failed);
    if !failed.is_empty() {
        parts.push(format!(
            "rank(s) {} failed in {name} (timed out or lost a peer)",
            ranks_text(&failed)
        ));
    }
    Some(format!("{}{wait}", parts.join("; ")))
}

/// The report file: the verdict, then every rank's step, phase, time since its last progress and
/// last collectives (newest last), as of `now_ns`.
pub fn report(records: &[Record], verdict: Option<&str>, now_ns: u64) -> String {
    use std::fmt::Write;
    let secs = |ns: u64| now_ns.saturating_sub(ns) as f64 / 1e9;
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(out, "verdict: {}", verdict.unwrap_or("no collective recorded"));
    for r in records {
        let _ = writeln!(
            out,
            "\nrank {} (pid {}): {}, last progress {:.1} s ago",
            r.rank,
            r.pid,
            whereabouts(r),
            secs(r.progress_ns)
        );
        for c in r.calls.iter().rev().take(16).rev() {
            let when = match c.state {
                CallState::Started => format!("running for {:.1} s", secs(c.start_ns)),
                _ => format!(
                    "{:?} after {:.3} s, {:.1} s ago",
                    c.state,
                    c.end_ns.saturating_sub(c.start_ns) as f64 / 1e9,
                    secs(c.end_ns)
                )
                .to_lowercase(),
            };
            let peer = c.peer.map_or(String::new(), |p| format!(", peer/root {p}"));
            let _ = writeln!(out, "  {}{peer}: {when}", c.describe());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(seq: u64, state: CallState, start_ns: u64) -> Call {
        Call {
            seq,
            group: 0,
            op: "all_reduce".into(),
            dtype: "f32".into(),
            count: 10,
            peer: None,
            state,
            start_ns,
            end_ns: 0,
        }
    }

    fn record(rank: u64, step: u64, phase: Phase, calls: Vec<Call>) -> Record {
        Record {
            rank,
            pid: 1,
            step: Some(step),
            phase,
            progress_ns: 0,
            calls,
        }
    }

    #[test]
    fn the_verdict_names_the_rank_that_never_entered_the_call_the_others_wait_in() {
        let s = 1_000_000_000;
        let records = vec![
            record(
                0,
                40,
                Phase::GradientSync,
                vec![call(811, CallState::Done, 0), call(812, CallState::Started, s)],
            ),
            record(1, 40, Phase::GradientSync, vec![call(812, CallState::Started, 2 * s)]),
            record(2, 40, Phase::GradientSync, vec![call(812, CallState::Started, s)]),
            record(3, 40, Phase::Backward, vec![call(811, CallState::Done, 0)]),
        ];
        let v = verdict(&records, 42 * s).unwrap();
        assert_eq!(
            v,
            "rank 3 never entered all_reduce #812 (step 40, backward; its last collective: all_reduce #811 (done)); \
             rank(s) 0-2 wait in it for 41 s"
        );
        let all_in = vec![
            record(0, 3, Phase::GradientSync, vec![call(5, CallState::Started, 0)]),
            record(1, 3, Phase::GradientSync, vec![call(5, CallState::Started, 0)]),
        ];
        assert!(verdict(&all_in, 10 * s)
            .unwrap()
            .starts_with("every rank entered all_reduce #5 and none finished it"));
        assert_eq!(verdict(&[record(0, 0, Phase::Setup, vec![])], 0), None);
        // Ranks whose call failed did not finish it (their peers' records may be missing: a node
        // cut off from the network publishes none).
        let failed = vec![
            record(0, 10, Phase::GradientSync, vec![call(16, CallState::Failed, 0)]),
            record(1, 10, Phase::GradientSync, vec![call(16, CallState::Failed, 0)]),
            record(2, 10, Phase::GradientSync, vec![call(16, CallState::Done, 0)]),
        ];
        assert_eq!(
            verdict(&failed, s).unwrap(),
            "rank(s) 2 finished all_reduce #16 and went on; \
             rank(s) 0-1 failed in all_reduce #16 (timed out or lost a peer)"
        );
        assert_eq!(ranks_text(&[5, 0, 1, 2, 7, 8]), "0-2, 5, 7-8");
    }

    #[test]
    fn ranks_at_the_top_of_the_range_from_a_corrupt_record_are_listed_without_overflow() {
        let max = u64::MAX;
        assert_eq!(ranks_text(&[max, max]), format!("{max}, {max}"));
        assert_eq!(ranks_text(&[max, max - 1, 0]), format!("0, {}-{max}", max - 1));
    }

    #[test]
    fn a_record_written_through_the_mapping_reads_back_from_the_file() {
        let dir = std::env::temp_dir().join(format!("burnrun-flight-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("flight");
        let recorder = Recorder::create(&file, 3).unwrap();
        recorder.step(7);
        recorder.phase(Phase::Backward);
        let calls = ENTRIES as u64 + 2;
        for seq in 0..calls {
            let slot = recorder.begin(0, seq, "all_reduce", "f32", 16, None);
            if seq + 1 < calls {
                recorder.end(slot, true);
            }
        }
        let record = read(&file).expect("a record");
        assert_eq!((record.rank, record.step, record.phase), (3, Some(7), Phase::Backward));
        assert_eq!(record.calls.len(), ENTRIES);
        let last = record.calls.last().unwrap();
        assert_eq!(
            (last.seq, last.state, last.op.as_str(), last.count),
            (ENTRIES as u64 + 1, CallState::Started, "all_reduce", 16)
        );
        assert_eq!(record.calls[0].seq, 2, "the oldest two were overwritten");
        assert!(record.calls[0].state == CallState::Done);
        assert_eq!(parse(&[0u8; 16]), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
