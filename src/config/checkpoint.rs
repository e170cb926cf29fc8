//! `[checkpoint]`: when to save, how many to keep, whether to resume.

use serde::{Deserialize, Serialize};

/// `[checkpoint]`: checkpoints under `<train.out_dir>/checkpoints/`, one folder per step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Save every this many steps, and always after the last step. `0` saves only after the last
    /// step. Default `0`.
    pub every_steps: u64,
    /// Number of most recent checkpoints kept; older ones are deleted after a new one is complete.
    /// `0` keeps all. Default `3`.
    pub keep_last: usize,
    /// Continue from the latest complete checkpoint (the one in `path`, or the newest under
    /// `<train.out_dir>/checkpoints/`, skipping a corrupt one for the previous); starts from
    /// scratch, with a note, if `<train.out_dir>` holds none yet. A checkpoint at `train.steps`
    /// ends the run at once; one past it is an error. Default `false`.
    pub resume: bool,
    /// An explicit checkpoint folder to resume from (needs `resume = true`). Default: not set.
    pub path: Option<String>,
    /// `async`: write checkpoints in the background while training goes on. The step copies what
    /// the checkpoint holds (master weights, optimizer state, codec state) into host buffers and a
    /// writer thread writes and renames the files; at most one write is in flight (a checkpoint due
    /// while the previous one is still being written waits for it), an error of the write fails
    /// the run at the next step, and the final checkpoint is waited for before the run ends.
    /// `state.json` is still written last, once every rank's files are on disk, so a folder
    /// without it is still never resumed from. Costs one more host copy of the master weights and
    /// optimizer state. Default `false`.
    #[serde(rename = "async")]
    pub async_write: bool,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            every_steps: 0,
            keep_last: 3,
            resume: false,
            path: None,
            async_write: false,
        }
    }
}
