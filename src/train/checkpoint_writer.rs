//! Asynchronous checkpoints (`checkpoint.async = true`): the training thread copies what a
//! checkpoint holds into host buffers this module owns, and a writer thread writes, fsyncs and
//! renames the files while training goes on.
//!
//! **One write in flight.** A checkpoint due while the previous one is still being written first
//! waits for it; that wait is part of the step's checkpoint stall. The buffers of a finished write
//! come back and the next checkpoint copies into them, so after the first checkpoint nothing is
//! allocated (and no fresh page faulted in) on the training thread.
//!
//! **Errors are never lost.** At every step boundary the training thread looks whether its write
//! finished: a failed one fails the run there, with an error naming the checkpoint's folder, the
//! file and the rank. The run's end waits for the last write and agrees on it with every rank.
//!
//! **The commit across ranks.** `state.json` marks a checkpoint complete, so it must be written
//! only once every rank's files are durable. The writer threads cannot agree on that through the
//! training process group: collectives from two threads on one group would interleave. So:
//! - with the job's store ([`ProcessGroup::store`]: a launched job, and
//!   [`crate::comm::spawn_ranks`]) each rank's writer, once its files are renamed and fsynced,
//!   publishes `ckpt/<step>/done/<rank>`: the sha256 of every file it wrote, or the error that
//!   stopped it. Rank 0's writer, after its own files, polls those keys (short requests, so the
//!   store's one connection is never held for long) until every rank reported or
//!   `comm.timeout_secs` passed, then writes `state.json` with every rank's checksums (it reads
//!   no other rank's file), prunes old checkpoints and deletes the keys. A rank that reports an error, or
//!   none in time, fails rank 0's commit: the folder is never marked complete, and rank 0 (no
//!   other rank) removes it once every rank reported, so no rank finds it gone while it writes.
//! - without a store (a group built by hand) the writers only write. At the next checkpoint, or at
//!   the end of training (the same point on every rank, since every rank checkpoints at the same
//!   steps), the training thread waits for its writer, the ranks all-gather whether their part is
//!   on disk, and rank 0 hashes the files, writes `state.json`, prunes, and broadcasts the outcome
//!   (or, when a rank failed, removes the folder).
//!
//! At the end of training every rank waits for its last write and takes part in that same
//! agreement (store or not), so when `train` returns on any rank the final checkpoint is complete,
//! or the run failed.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::comm::{ProcessGroup, Store, StoreError};
use crate::compress::StateTensor;
use crate::config::RunConfig;
use crate::parallel::zero::ShardLayout;
use crate::parallel::ParamLayout;

use super::checkpoint::{self as ckpt, CheckpointError, CodecCheckpoint, TrainState};
use super::resume::{self, CodecPart, RankPart};
use super::TrainError;

/// How often rank 0's writer looks for the other ranks' reports: one short store request per
/// rank still missing, while the write it waits for takes far longer than this.
const REPORT_POLL: Duration = Duration::from_millis(10);

/// How long the training thread waits for its writer, in units of `comm.timeout_secs`. The
/// writer's own waits are bounded: rank 0's for the other ranks' reports by one timeout, and its
/// files by what a synchronous save allows (its barrier waits one timeout for the slowest
/// writer). Twice the timeout lets the writer's own, more precise error (which rank did not
/// report) arrive first.
const WAIT_TIMEOUTS: u32 = 2;

/// The store key under which rank `rank` reports its part of the checkpoint of step `step`.
fn done_key(step: u64, rank: usize) -> String {
    format!("ckpt/{step}/done/{rank}")
}

/// What a rank reports to the store about its part of a checkpoint.
#[derive(Debug, Serialize, Deserialize)]
enum PartReport {
    /// Its files are renamed and fsynced: their sha256 (hex) by file name.
    Written(BTreeMap<String, String>),
    /// Why they are not.
    Failed(String),
}

/// Why an asynchronous checkpoint is not complete.
#[derive(Debug, thiserror::Error)]
pub enum AsyncCheckpointError {
    /// This rank's file could not be written (the error names it), or rank 0's `state.json`.
    #[error(transparent)]
    Write(#[from] CheckpointError),
    /// Another rank reported that it could not write its part.
    #[error("rank {peer} could not write its part: {reason}")]
    PeerFailed {
        /// The rank.
        peer: usize,
        /// Its error (naming its file), or why its report could not be read.
        reason: String,
    },
    /// Ranks did not report their part in time.
    #[error("rank(s) {peers:?} did not report their part within {timeout:?} (comm.timeout_secs)")]
    PeerTimeout {
        /// The ranks still missing.
        peers: Vec<usize>,
        /// The deadline.
        timeout: Duration,
    },
    /// Ranks failed their part, as the ranks' agreement at the end (or without a store) found.
    #[error("rank(s) {peers:?} could not finish their part (each one's own error names its file)")]
    PeersFailed {
        /// The ranks that failed.
        peers: Vec<usize>,
    },
    /// Rank 0 could not mark the checkpoint complete (its own error names the file).
    #[error("rank 0 could not write its state.json (rank 0's error names the file)")]
    CommitFailed,
    /// Reporting through the job's store failed.
    #[error("reporting through the job's store: {source}")]
    Store {
        /// The store's error.
        source: StoreError,
    },
    /// The rank waited for its own writer past the deadline.
    #[error("this rank's writer did not finish within {timeout:?} (twice comm.timeout_secs)")]
    Timeout {
        /// The deadline.
        timeout: Duration,
    },
    /// The writer thread could not be started.
    #[error("cannot start the writer thread: {source}")]
    Spawn {
        /// The error.
        source: std::io::Error,
    },
    /// The writer thread panicked.
    #[error("the writer thread panicked: {message}")]
    Panicked {
        /// The panic's message.
        message: String,
    },
    /// The run stopped (for another error) before the checkpoint was complete.
    #[error("the run stopped before this checkpoint was complete")]
    Cancelled,
}

/// What one rank writes of one checkpoint, copied out of the training buffers.
#[derive(Debug)]
struct Snapshot {
    step: u64,
    dir: PathBuf,
    /// Replica 0 of each stage writes its stage's model and optimizer files.
    writes_stage: bool,
    /// ZeRO-3: `master` is this rank's share of the parameters.
    params_sharded: bool,
    stage: usize,
    /// The master weights (empty when `writes_stage` is false).
    master: Vec<f32>,
    /// The optimizer's buffers by name suffix (empty buffers when `writes_stage` is false).
    optim: Vec<(String, Vec<f32>)>,
    /// The codec's slot, description and state.
    codec: Option<(CodecCheckpoint, String, Vec<StateTensor>)>,
    /// `state.json` as rank 0 writes it once every rank's files are durable.
    state: TrainState,
}

impl Snapshot {
    /// Copies `part` into the buffers of `spare` (a finished write's), or into new ones.
    fn capture(
        spare: Option<Snapshot>,
        step: u64,
        dir: PathBuf,
        part: RankPart<'_>,
        state: TrainState,
    ) -> Result<Self, (usize, std::collections::TryReserveError)> {
        let (mut master, spare_optim) = spare.map(|s| (s.master, s.optim)).unwrap_or_default();
        let mut spare_optim = spare_optim.into_iter();
        let copy = |buffer: &mut Vec<f32>, from: &[f32], written: bool| {
            buffer.clear();
            if written {
                buffer.try_reserve_exact(from.len()).map_err(|e| (from.len() * 4, e))?;
                buffer.extend_from_slice(from);
            }
            Ok(())
        };
        copy(&mut master, part.master, part.writes_stage || part.params_sharded)?;
        // With ZeRO every replica writes its share of the optimizer state.
        let writes_optim = part.writes_stage || part.shard.is_some();
        let mut optim = Vec::with_capacity(part.optim.len());
        for &(suffix, from) in &part.optim {
            let mut buffer = spare_optim.next().map(|(_, b)| b).unwrap_or_default();
            copy(&mut buffer, from, writes_optim)?;
            optim.push((suffix.to_string(), buffer));
        }
        let codec = part
            .codec
            .map(|c| (c.slot.clone(), c.describe.to_string(), c.state.into_owned()));
        Ok(Self {
            step,
            dir,
            writes_stage: part.writes_stage,
            params_sharded: part.params_sharded,
            stage: part.stage,
            master,
            optim,
            codec,
            state,
        })
    }

    /// The part to write, borrowed from this copy.
    fn part<'a>(&'a self, layout: &'a ParamLayout, shard: Option<&'a ShardLayout>) -> RankPart<'a> {
        RankPart {
            shard,
            params_sharded: self.params_sharded,
            // Asynchronous checkpoints are refused with tensor parallelism (validation).
            tensor: None,
            writes_stage: self.writes_stage,
            stage: self.stage,
            layout,
            master: &self.master,
            optim: self.optim.iter().map(|(s, b)| (s.as_str(), b.as_slice())).collect(),
            codec: self.codec.as_ref().map(|(slot, describe, state)| CodecPart {
                slot,
                describe,
                state: Cow::Borrowed(state.as_slice()),
            }),
        }
    }
}

/// What a writer thread needs besides the snapshot: the same for every checkpoint of the run.
#[derive(Debug, Clone)]
struct Job {
    rank: usize,
    world_size: usize,
    root: PathBuf,
    keep_last: usize,
    timeout: Duration,
    store: Option<Arc<dyn Store>>,
    layout: Arc<ParamLayout>,
    /// ZeRO: this rank's share of the optimizer state.
    shard: Option<Arc<ShardLayout>>,
    cancel: Arc<AtomicBool>,
}

/// A write that ended: the snapshot's buffers back, and how it went.
struct Finished {
    snapshot: Snapshot,
    outcome: Result<(), AsyncCheckpointError>,
}

/// The write in flight.
struct InFlight {
    step: u64,
    dir: PathBuf,
    done: mpsc::Receiver<Finished>,
    thread: JoinHandle<()>,
    cancel: Arc<AtomicBool>,
}

/// A rank's background checkpoint writer (see the module documentation).
pub(crate) struct CheckpointWriter {
    rank: usize,
    root: PathBuf,
    timeout: Duration,
    job: Job,
    /// The buffers of the last finished write, refilled by the next checkpoint.
    spare: Option<Snapshot>,
    in_flight: Option<InFlight>,
    /// The last checkpoint started whose outcome the ranks have not agreed on yet.
    unagreed: Option<(u64, PathBuf)>,
}

impl std::fmt::Debug for CheckpointWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointWriter")
            .field("rank", &self.rank)
            .field("in_flight", &self.in_flight.as_ref().map(|w| w.step))
            .finish()
    }
}

impl CheckpointWriter {
    /// The writer of this rank of `world`, for checkpoints under `root` of a run of `cfg` whose
    /// parameters lie as `layout` says.
    pub(crate) fn new(
        world: &ProcessGroup,
        root: &Path,
        cfg: &RunConfig,
        layout: &ParamLayout,
        shard: Option<ShardLayout>,
    ) -> Self {
        let timeout = Duration::from_secs(cfg.comm.timeout_secs);
        let store = world.store().cloned();
        if world.rank() == 0 && store.is_none() {
            tracing::info!(
                "checkpoint.async: this group has no store; the ranks agree on each checkpoint at the next one \
                 (and at the end of training)"
            );
        }
        Self {
            rank: world.rank(),
            root: root.to_path_buf(),
            timeout,
            job: Job {
                rank: world.rank(),
                world_size: world.world_size(),
                root: root.to_path_buf(),
                keep_last: cfg.checkpoint.keep_last,
                timeout,
                store,
                layout: Arc::new(layout.clone()),
                shard: shard.map(Arc::new),
                cancel: Arc::new(AtomicBool::new(false)),
            },
            spare: None,
            in_flight: None,
            unagreed: None,
        }
    }

    /// At a step boundary (`done` steps completed): fails the run if the write in flight failed.
    pub(crate) fn poll(&mut self, done: u64) -> Result<(), TrainError> {
        let received = match &self.in_flight {
            Some(flight) => flight.done.try_recv(),
            None => return Ok(()),
        };
        match received {
            Ok(finished) => self.take(Some(finished), done),
            Err(mpsc::TryRecvError::Empty) => Ok(()),
            Err(mpsc::TryRecvError::Disconnected) => self.take(None, done),
        }
    }

    /// Checkpoints step `step`: waits for the previous write (and, without a store, agrees on
    /// it with every rank), copies `part` and `state`, and starts writing them. With `last` (the
    /// end of training) it then waits for this write and agrees on it too. Every rank calls it at
    /// the same steps.
    pub(crate) fn save(
        &mut self,
        world: &ProcessGroup,
        step: u64,
        part: RankPart<'_>,
        state: TrainState,
        last: bool,
    ) -> Result<PathBuf, TrainError> {
        if self.job.store.is_some() {
            self.wait_in_flight(step)?;
            self.unagreed = None;
        } else {
            self.agree(world, step)?;
        }
        let dir = ckpt::step_dir(&self.root, step);
        let snapshot =
            Snapshot::capture(self.spare.take(), step, dir.clone(), part, state).map_err(|(bytes, source)| {
                TrainError::Alloc {
                    rank: self.rank,
                    what: "asynchronous checkpoint copy",
                    bytes: bytes as u64,
                    source,
                }
            })?;
        self.start(snapshot)
            .map_err(|source| self.error(step, &dir, step, source))?;
        self.unagreed = Some((step, dir.clone()));
        if last {
            self.agree(world, step)?;
        }
        Ok(dir)
    }

    /// The end of training (`done` steps): waits for the write in flight and agrees on it with
    /// every rank, so the last checkpoint is complete when this returns `Ok` on any rank.
    pub(crate) fn finish(&mut self, world: &ProcessGroup, done: u64) -> Result<(), TrainError> {
        self.agree(world, done)
    }

    /// Starts the writer thread on `snapshot`.
    fn start(&mut self, snapshot: Snapshot) -> Result<(), AsyncCheckpointError> {
        let (step, dir) = (snapshot.step, snapshot.dir.clone());
        let cancel = Arc::new(AtomicBool::new(false));
        let job = Job {
            cancel: Arc::clone(&cancel),
            ..self.job.clone()
        };
        let (sender, done) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name(format!("ckpt-writer-{}", self.rank))
            .spawn(move || {
                let outcome = write_and_commit(&job, &snapshot);
                // Only rank 0 removes the folder, and only after every rank stopped writing into
                // it (its reports are in): removed under a writing peer, the peer's error would
                // be a missing folder instead of the real cause. Without a store the agreement
                // at the next checkpoint removes it.
                if outcome.is_err() && job.rank == 0 && job.store.is_some() {
                    ckpt::discard_incomplete(&snapshot.dir);
                }
                // The receiver is gone only when the run gave up on this write.
                let _ = sender.send(Finished { snapshot, outcome });
            })
            .map_err(|source| AsyncCheckpointError::Spawn { source })?;
        self.in_flight = Some(InFlight {
            step,
            dir,
            done,
            thread,
            cancel,
        });
        Ok(())
    }

    /// Waits (up to [`WAIT_TIMEOUTS`] x `comm.timeout_secs`) for the write in flight, if any, and
    /// returns its error.
    fn wait_in_flight(&mut self, done: u64) -> Result<(), TrainError> {
        let wait = self.timeout * WAIT_TIMEOUTS;
        let received = match &self.in_flight {
            Some(flight) => flight.done.recv_timeout(wait),
            None => return Ok(()),
        };
        match received {
            Ok(finished) => self.take(Some(finished), done),
            Err(mpsc::RecvTimeoutError::Disconnected) => self.take(None, done),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // Invariant: `received` came from the write in flight.
                let flight = self.in_flight.take().expect("a write in flight");
                flight.cancel.store(true, Ordering::Relaxed);
                // Left to finish its current file on its own: the run fails now.
                drop(flight.thread);
                Err(self.error(
                    flight.step,
                    &flight.dir,
                    done,
                    AsyncCheckpointError::Timeout { timeout: wait },
                ))
            }
        }
    }

    /// Ends the write in flight with what its thread sent (`None`: it panicked before sending).
    fn take(&mut self, finished: Option<Finished>, done: u64) -> Result<(), TrainError> {
        // Invariant: called only when a write was in flight.
        let flight = self.in_flight.take().expect("a write in flight");
        let joined = flight.thread.join();
        let outcome = match finished {
            Some(finished) => {
                self.spare = Some(finished.snapshot);
                finished.outcome
            }
            None => Err(AsyncCheckpointError::Panicked {
                message: joined.err().map(|p| panic_message(p.as_ref())).unwrap_or_default(),
            }),
        };
        outcome.map_err(|source| self.error(flight.step, &flight.dir, done, source))
    }

    /// Waits for the last checkpoint started and agrees on it with every rank: an all-gather of
    /// whether each rank's part is written, then (without a store) rank 0 marks it complete, then
    /// a broadcast of whether rank 0 did. A collective: every rank calls it at the same point.
    fn agree(&mut self, world: &ProcessGroup, done: u64) -> Result<(), TrainError> {
        let Some((step, dir)) = self.unagreed.take() else {
            return Ok(());
        };
        let rank = self.rank;
        let comm = |source| TrainError::Comm { rank, source };
        let own = self.wait_in_flight(done);
        let mut failed = vec![0u8; world.world_size()];
        world.all_gather(&[u8::from(own.is_err())], &mut failed).map_err(comm)?;
        // Without a store nobody removed a failed folder yet: rank 0 does, now that every writer
        // has stopped.
        if self.job.store.is_none() && rank == 0 && failed.contains(&1) {
            ckpt::discard_incomplete(&dir);
        }
        own?;
        let peers: Vec<usize> = (0..failed.len()).filter(|&r| failed[r] != 0).collect();
        if !peers.is_empty() {
            return Err(self.error(step, &dir, done, AsyncCheckpointError::PeersFailed { peers }));
        }
        let committed = match (&self.job.store, rank, &self.spare) {
            (None, 0, Some(snapshot)) if snapshot.step == step => commit_after_reading(&self.job, snapshot),
            // Invariant: rank 0's write of `step` just ended, so its buffers are the spare ones.
            (None, 0, _) => Err(AsyncCheckpointError::CommitFailed),
            _ => Ok(()),
        };
        let mut complete = [u8::from(committed.is_ok())];
        world.broadcast(&mut complete, 0).map_err(comm)?;
        committed.map_err(|source| self.error(step, &dir, done, source))?;
        if complete[0] == 0 {
            return Err(self.error(step, &dir, done, AsyncCheckpointError::CommitFailed));
        }
        Ok(())
    }

    fn error(&self, step: u64, dir: &Path, done: u64, source: AsyncCheckpointError) -> TrainError {
        TrainError::CheckpointAsync {
            rank: self.rank,
            step,
            dir: dir.display().to_string(),
            noticed_after: done,
            source,
        }
    }
}

impl Drop for CheckpointWriter {
    /// A run that stops with a write in flight (it failed elsewhere) cancels it: the writer stops
    /// before its files, or before rank 0's commit, and (rank 0, with a store) removes the
    /// incomplete folder. Waited for up to `comm.timeout_secs` (a file being written is finished
    /// first).
    fn drop(&mut self) {
        let Some(flight) = self.in_flight.take() else {
            return;
        };
        flight.cancel.store(true, Ordering::Relaxed);
        match flight.done.recv_timeout(self.timeout) {
            Ok(_) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                let _ = flight.thread.join();
            }
            Err(mpsc::RecvTimeoutError::Timeout) => tracing::warn!(
                "rank {}: the writer of checkpoint {} did not stop within {:?}; left running",
                self.rank,
                flight.dir.display(),
                self.timeout
            ),
        }
    }
}

/// The writer thread: this rank's files, its report through the store, and on rank 0 the
/// commit once every rank reported (see the module documentation).
fn write_and_commit(job: &Job, snapshot: &Snapshot) -> Result<(), AsyncCheckpointError> {
    let written = if job.cancel.load(Ordering::Relaxed) {
        Err(AsyncCheckpointError::Cancelled)
    } else {
        resume::write_part(&snapshot.dir, &snapshot.part(&job.layout, job.shard.as_deref()))
            .map_err(AsyncCheckpointError::from)
    };
    let Some(store) = &job.store else {
        // Without a store the training threads agree on it later.
        return written.map(drop);
    };
    let store_err = |source| AsyncCheckpointError::Store { source };
    if job.rank != 0 {
        let report = match &written {
            Ok(files) => PartReport::Written(files.clone()),
            Err(e) => PartReport::Failed(e.to_string()),
        };
        // Invariant: a map of strings or a string always serializes.
        let bytes = serde_json::to_vec(&report).expect("a report serializes");
        let published = store.set(&done_key(snapshot.step, job.rank), &bytes).map_err(store_err);
        return written.map(drop).and(published);
    }
    // Every report is collected even when this rank's own part failed: the folder is removed
    // after, once no rank writes into it.
    let reports = collect_reports(job, store.as_ref(), snapshot.step);
    let mut checksums = written?;
    checksums.extend(reports?);
    let state = TrainState {
        checksums,
        ..snapshot.state.clone()
    };
    ckpt::write_state(&snapshot.dir, &state)?;
    ckpt::prune(&job.root, job.keep_last)?;
    for peer in 1..job.world_size {
        // Best effort: a key left behind costs a few bytes in a store that ends with the job.
        let _ = store.delete(&done_key(snapshot.step, peer));
    }
    Ok(())
}

/// Rank 0's writer: every other rank's report of its part of the checkpoint of step `step`
/// (their files' checksums), polled until all are in, the run was cancelled, or
/// `comm.timeout_secs` passed. A failed report is the error, once all are in (until then a peer
/// may still be writing into the folder), and also when the wait ends early.
fn collect_reports(job: &Job, store: &dyn Store, step: u64) -> Result<BTreeMap<String, String>, AsyncCheckpointError> {
    let deadline = Instant::now() + job.timeout;
    let mut missing: Vec<usize> = (1..job.world_size).collect();
    let mut files = BTreeMap::new();
    let mut failed = None;
    loop {
        let mut still_missing = Vec::new();
        for &peer in &missing {
            let Some(bytes) = store
                .try_get(&done_key(step, peer))
                .map_err(|source| AsyncCheckpointError::Store { source })?
            else {
                still_missing.push(peer);
                continue;
            };
            let reason = match serde_json::from_slice(&bytes) {
                Ok(PartReport::Written(written)) => {
                    files.extend(written);
                    continue;
                }
                Ok(PartReport::Failed(reason)) => reason,
                Err(e) => format!("its report is unreadable ({e})"),
            };
            // The first failure is the one reported; the others are still waited for.
            failed.get_or_insert(AsyncCheckpointError::PeerFailed { peer, reason });
        }
        missing = still_missing;
        if missing.is_empty() {
            return failed.map_or(Ok(files), Err);
        }
        // A failure already reported is the better error than a missing report.
        if job.cancel.load(Ordering::Relaxed) {
            return Err(failed.unwrap_or(AsyncCheckpointError::Cancelled));
        }
        if Instant::now() >= deadline {
            return Err(failed.unwrap_or(AsyncCheckpointError::PeerTimeout {
                peers: missing,
                timeout: job.timeout,
            }));
        }
        std::thread::sleep(REPORT_POLL);
    }
}

/// Rank 0 without a store, once every rank said its part is written: hashes the folder's files,
/// writes `state.json`, prunes. A failure removes the folder.
fn commit_after_reading(job: &Job, snapshot: &Snapshot) -> Result<(), AsyncCheckpointError> {
    let committed = (|| {
        let state = TrainState {
            checksums: ckpt::checksum_files(&snapshot.dir)?,
            ..snapshot.state.clone()
        };
        ckpt::write_state(&snapshot.dir, &state)?;
        ckpt::prune(&job.root, job.keep_last)
    })();
    if committed.is_err() {
        ckpt::discard_incomplete(&snapshot.dir);
    }
    committed.map_err(AsyncCheckpointError::from)
}

/// The message of a panic payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_string())
}
