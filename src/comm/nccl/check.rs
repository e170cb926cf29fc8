//! Mismatched collectives on NCCL, found through the job's store instead of a silent hang.
//!
//! NCCL does not know what its peers called: two ranks that call different collectives (or one
//! with other sizes) at the same point wait on each other until the deadline, or worse, exchange
//! the wrong bytes. The host engine catches this with a fingerprint in every frame; NCCL's frames
//! are not ours, so [`CallCheck`] keeps the fingerprints of this rank's recent calls and compares
//! them with the peers' through the store:
//!
//! - [`CheckMode::OnFailure`] (the default): nothing on the happy path; when a call fails or
//!   times out, every failing rank publishes its recent calls and reads the others', and the error
//!   names the first call where two ranks differ, or the ranks that published nothing (gone, or
//!   stuck before the failing call).
//! - [`CheckMode::EveryCall`] (`BURNRUN_NCCL_CHECK=every`, for debugging, like
//!   `TORCH_NCCL_DESYNC_DEBUG`): every call first compares its fingerprint with every peer's on
//!   the store, so a mismatch is an error before NCCL is called at all; one store round trip per
//!   rank and call.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::comm::fingerprint::describe;
use crate::comm::CommError;
use crate::rendezvous::Store;

/// How many recent calls a rank keeps for the report of a failure.
const TRACE_LEN: usize = 32;

/// How long a failing rank waits for the peers' traces before it reports what it has.
const TRACE_WAIT: Duration = Duration::from_secs(3);

/// When the fingerprints of the ranks' calls are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckMode {
    /// Never (no store traffic at all).
    Off,
    /// When a call fails: the error then names the first differing call.
    OnFailure,
    /// Before every call (a store round trip each).
    EveryCall,
}

impl CheckMode {
    /// From `BURNRUN_NCCL_CHECK`: `off`, `failure` (the default, also when unset) or `every`.
    pub fn from_env() -> Result<Self, String> {
        Self::from_env_value(std::env::var("BURNRUN_NCCL_CHECK").ok().as_deref())
    }

    /// [`CheckMode::from_env`] of a given value (`None`: unset).
    pub fn from_env_value(value: Option<&str>) -> Result<Self, String> {
        match value {
            None | Some("") | Some("failure") => Ok(Self::OnFailure),
            Some("off") => Ok(Self::Off),
            Some("every") => Ok(Self::EveryCall),
            Some(other) => Err(format!(
                "BURNRUN_NCCL_CHECK={other:?}: expected \"off\", \"failure\" or \"every\""
            )),
        }
    }
}

/// One rank's side of the fingerprint comparison of an NCCL communicator.
pub struct CallCheck {
    store: Arc<dyn Store>,
    prefix: String,
    rank: usize,
    world_size: usize,
    mode: CheckMode,
    timeout: Duration,
    /// `(sequence number, fingerprint)` of the last [`TRACE_LEN`] calls.
    recent: Mutex<VecDeque<(u64, u64)>>,
}

impl std::fmt::Debug for CallCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallCheck")
            .field("prefix", &self.prefix)
            .field("rank", &self.rank)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl CallCheck {
    /// The check of `rank` among `world_size`, its keys under `prefix` (unique to the
    /// communicator); `timeout` bounds every wait for a peer in [`CheckMode::EveryCall`].
    pub fn new(
        store: Arc<dyn Store>,
        prefix: impl Into<String>,
        rank: usize,
        world_size: usize,
        mode: CheckMode,
        timeout: Duration,
    ) -> Self {
        Self {
            store,
            prefix: prefix.into(),
            rank,
            world_size,
            mode,
            timeout,
            recent: Mutex::new(VecDeque::with_capacity(TRACE_LEN)),
        }
    }

    /// The mode.
    pub fn mode(&self) -> CheckMode {
        self.mode
    }

    fn call_key(&self, seq: u64, rank: usize) -> String {
        format!("{}/call/{seq}/{rank}", self.prefix)
    }

    fn trace_key(&self, rank: usize) -> String {
        format!("{}/trace/{rank}", self.prefix)
    }

    /// Records call `seq` with fingerprint `fp` (made by `comm::fingerprint`); with
    /// [`CheckMode::EveryCall`] first compares it with every peer's call `seq`: a
    /// [`CommError::Mismatch`] naming both calls, or a timeout naming the peer that never came.
    pub fn before(&self, op: &'static str, seq: u64, fp: u64) -> Result<(), CommError> {
        if self.mode == CheckMode::Off {
            return Ok(());
        }
        {
            let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            if recent.len() == TRACE_LEN {
                recent.pop_front();
            }
            recent.push_back((seq, fp));
        }
        if self.mode != CheckMode::EveryCall || self.world_size == 1 {
            return Ok(());
        }
        let store_err = |source| CommError::Store {
            rank: self.rank,
            group: self.prefix.clone(),
            source,
        };
        self.store
            .set(&self.call_key(seq, self.rank), &fp.to_le_bytes())
            .map_err(store_err)?;
        for peer in (0..self.world_size).filter(|&p| p != self.rank) {
            let theirs = match self.store.get(&self.call_key(seq, peer), self.timeout) {
                Ok(bytes) => bytes,
                Err(crate::rendezvous::StoreError::Timeout { .. }) => {
                    return Err(CommError::Timeout {
                        rank: self.rank,
                        op,
                        seq,
                        peer,
                        timeout: self.timeout,
                        detail: " (the peer did not reach this call: BURNRUN_NCCL_CHECK=every)".into(),
                    })
                }
                Err(e) => return Err(store_err(e)),
            };
            let theirs = decode(&theirs);
            if theirs != Some(fp) {
                return Err(CommError::Mismatch {
                    rank: self.rank,
                    seq,
                    peer,
                    ours: describe(fp),
                    theirs: theirs.map_or_else(|| "an unreadable fingerprint".into(), describe),
                });
            }
        }
        // Every peer has read call seq - 2 before it published seq - 1, which this rank just
        // read: its own key of seq - 2 is no longer needed.
        if let Some(old) = seq.checked_sub(2) {
            let _ = self.store.delete(&self.call_key(old, self.rank));
        }
        Ok(())
    }

    /// After call `seq` failed: publishes this rank's recent calls, reads the peers' (waiting at
    /// most a few seconds) and says where they diverge, for the error message. Empty when the
    /// mode is [`CheckMode::Off`].
    pub fn diagnose(&self, seq: u64) -> String {
        if self.mode == CheckMode::Off || self.world_size == 1 {
            return String::new();
        }
        let ours: Vec<(u64, u64)> = self
            .recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect();
        let _ = self.store.set(&self.trace_key(self.rank), &encode_trace(&ours));
        let deadline = std::time::Instant::now() + TRACE_WAIT;
        let mut silent = Vec::new();
        let mut findings = Vec::new();
        for peer in (0..self.world_size).filter(|&p| p != self.rank) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let Some(theirs) = self
                .store
                .get(&self.trace_key(peer), left.max(Duration::from_millis(1)))
                .ok()
                .map(|b| decode_trace(&b))
            else {
                silent.push(peer);
                continue;
            };
            if let Some(finding) = first_difference(&ours, &theirs, peer) {
                findings.push(finding);
            }
        }
        let mut out = String::new();
        if !findings.is_empty() {
            out.push_str(&format!("; {}", findings.join("; ")));
        }
        if !silent.is_empty() {
            out.push_str(&format!(
                "; rank(s) {silent:?} did not report their calls within {TRACE_WAIT:?} (gone, or stuck before call #{seq})"
            ));
        }
        if out.is_empty() {
            out.push_str("; every rank made the same recent calls (the failure is not a mismatch)");
        }
        out
    }
}

/// Where `theirs` first differs from `ours` among the calls both recorded, as a sentence.
fn first_difference(ours: &[(u64, u64)], theirs: &[(u64, u64)], peer: usize) -> Option<String> {
    for &(seq, fp) in ours {
        if let Some(&(_, other)) = theirs.iter().find(|(s, _)| *s == seq) {
            if other != fp {
                return Some(format!(
                    "collective mismatch at #{seq}: this rank called {}, rank {peer} called {}",
                    describe(fp),
                    describe(other)
                ));
            }
        }
    }
    let last_ours = ours.last().map(|c| c.0);
    let last_theirs = theirs.last().map(|c| c.0);
    match (last_ours, last_theirs) {
        (Some(a), Some(b)) if b < a => Some(format!(
            "rank {peer} is behind: its last call was #{b} ({}), this rank's #{a}",
            describe(theirs[theirs.len() - 1].1)
        )),
        _ => None,
    }
}

fn decode(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

fn encode_trace(calls: &[(u64, u64)]) -> Vec<u8> {
    calls
        .iter()
        .flat_map(|(seq, fp)| seq.to_le_bytes().into_iter().chain(fp.to_le_bytes()))
        .collect()
}

fn decode_trace(bytes: &[u8]) -> Vec<(u64, u64)> {
    bytes
        .chunks_exact(16)
        .filter_map(|c| Some((decode(&c[..8])?, decode(&c[8..])?)))
        .collect()
}
