//! The launcher: starts a node's ranks, hosts (node 0) or joins the rendezvous store, prefixes
//! the ranks' output, watches them, forwards signals and tears the whole job down when one rank
//! fails, on every node. It never links burn or the collectives: it only runs processes.
//!
//! Each rank gets torchrun's variables and burnrun's own (see [`crate::env::DistEnv`]): `RANK`,
//! `LOCAL_RANK`, `WORLD_SIZE`, `LOCAL_WORLD_SIZE`, `GROUP_RANK`, `MASTER_ADDR`, `MASTER_PORT`,
//! `BURNRUN_RUN_ID`, `BURNRUN_SECRET`, `BURNRUN_TIMEOUT_SECS`, `BURNRUN_RDZV_TIMEOUT_SECS`.
//!
//! When ranks fail, the summary names the root cause, chosen among the failures seen within a
//! short window by a documented rule (a rank killed by a signal beats one that exited with a code,
//! a rank that lost its connection to a failed peer is secondary); see `report::root_cause`.
//! Once its ranks have all ended, a launcher removes the run's shared-memory files from its host
//! (`names::SHM_DIR`, names starting with `names::shm_rank_file_prefix(run_id, rank)` for its own ranks).
//!
//! No rank outlives its launcher: each runs in its own process group with `PR_SET_PDEATHSIG`,
//! and a forked watchdog kills those groups if the launcher is killed.
//!
//! With `--max-restarts K` a failed job is restarted, up to K times in all: every node tears its
//! ranks down, the launchers meet again under the next *generation* (every key of the launchers
//! and of the ranks is scoped by it, so nothing of the failed attempt is read), and the ranks
//! start again with `BURNRUN_RESTART_COUNT` (and torchrun's `TORCHELASTIC_RESTART_COUNT`) set to
//! the generation. A node whose launcher died can be started again: it joins the next generation.

mod coordination;
mod error;
mod launch;
mod options;
mod output;
mod report;
mod secret;
mod shm_sweep;
mod signals;
mod spawn;
mod supervise;
mod watchdog;

pub use error::LaunchError;
pub use launch::{launch, LaunchOutcome};
pub use options::{LaunchOptions, RankCommand, DEFAULT_GRACE_PERIOD, DEFAULT_MASTER_ADDR, DEFAULT_MONITOR_INTERVAL};
pub use output::STDERR_TAIL_LINES;
pub use report::{signal_name, ExitCause, Failure, RankFailure};
