//! The lock on `train.out_dir`: one job at a time writes a folder's checkpoints and metrics.
//!
//! Two jobs on the same folder interleave `metrics.jsonl` and delete each other's checkpoints, so
//! rank 0 locks `<out_dir>/burnrun.lock` before anything is written there, with `flock`: the
//! kernel drops the lock when its process dies, however it dies, so a lock can never be left
//! stale. The file also says who holds it (pid, host, run id), for the refusal message; a job
//! that ends normally empties it, so a job that finds it filled but unlocked knows the previous
//! holder died, says so, and takes it over.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

/// File name of the lock inside `train.out_dir`.
pub const LOCK_FILE: &str = "burnrun.lock";

/// Who holds (or held) a lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockOwner {
    /// Process id of the rank holding it.
    pub pid: u32,
    /// Host the process runs on.
    pub host: String,
    /// The job's run id (`BURNRUN_RUN_ID`), or `single process` for a job started without the
    /// launcher.
    pub run_id: String,
}

impl LockOwner {
    /// This process, in a job with the run id `run_id` (`None`: not started by a launcher).
    pub fn this_process(run_id: Option<&str>) -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "an unknown host".to_string());
        Self {
            pid: std::process::id(),
            host,
            run_id: run_id.unwrap_or("single process").to_string(),
        }
    }
}

impl std::fmt::Display for LockOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} on host {}, run id {}", self.pid, self.host, self.run_id)
    }
}

/// Why a lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another live process holds it.
    #[error(
        "train.out_dir {dir} is in use by another job ({}; lock file {file}): stop that job or give this one \
         another train.out_dir",
        holder.as_ref().map_or_else(|| "which one is not written yet".to_string(), |h| h.to_string())
    )]
    Busy {
        /// The folder.
        dir: PathBuf,
        /// The lock file.
        file: PathBuf,
        /// Who holds it, as its file says (`None` while the holder has not written it yet).
        holder: Option<LockOwner>,
    },
    /// The folder or the lock file could not be created, locked or written.
    #[error("train.out_dir {dir}: cannot lock {file}: {source}")]
    Io {
        /// The folder.
        dir: PathBuf,
        /// The lock file.
        file: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// A held lock on an output folder; released (and its file emptied) when dropped.
#[derive(Debug)]
pub struct OutDirLock {
    lock: Flock<File>,
    file: PathBuf,
}

impl OutDirLock {
    /// Locks `dir` (created if missing) for `owner`, without waiting: a folder another live
    /// process holds is refused at once, naming that process.
    pub fn acquire(dir: &Path, owner: &LockOwner) -> Result<Self, LockError> {
        let file_path = dir.join(LOCK_FILE);
        let io = |source| LockError::Io {
            dir: dir.to_path_buf(),
            file: file_path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        // Not truncated on open: the holder's record must survive a refused attempt.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&file_path)
            .map_err(io)?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((mut file, Errno::EWOULDBLOCK)) => {
                return Err(LockError::Busy {
                    dir: dir.to_path_buf(),
                    holder: read_owner(&mut file),
                    file: file_path,
                })
            }
            Err((_, errno)) => return Err(io(std::io::Error::from(errno))),
        };
        if let Some(previous) = read_owner(&mut lock) {
            // The failed attempt of this same job, which the launcher restarted: expected.
            if previous.run_id == owner.run_id && crate::env::restart_count() > 0 {
                tracing::info!(
                    "train.out_dir {}: taking the lock over from this job's failed attempt ({previous})",
                    dir.display()
                );
            } else {
                tracing::warn!(
                    "train.out_dir {}: the job that held it before ({previous}) ended without releasing it (it was \
                 killed or crashed); taking it over",
                    dir.display()
                );
            }
        }
        let record = serde_json::to_vec(owner).map_err(|e| io(std::io::Error::other(e)))?;
        lock.set_len(0).map_err(io)?;
        lock.rewind().map_err(io)?;
        lock.write_all(&record).map_err(io)?;
        lock.sync_all().map_err(io)?;
        Ok(Self { lock, file: file_path })
    }

    /// The lock file.
    pub fn file(&self) -> &Path {
        &self.file
    }
}

impl Drop for OutDirLock {
    fn drop(&mut self) {
        // Emptied while still locked: the next job then knows this one ended normally. The
        // flock itself goes with the file descriptor.
        if let Err(e) = self.lock.set_len(0) {
            tracing::warn!("cannot empty the lock file {}: {e}", self.file.display());
        }
    }
}

/// The owner recorded in a lock file, if it holds one.
fn read_owner(file: &mut File) -> Option<LockOwner> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut text).ok()?;
    serde_json::from_str(&text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_folder_is_refused_naming_the_holder_until_the_first_is_dropped() {
        let dir = std::env::temp_dir().join(format!("burnrun-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let owner = LockOwner::this_process(Some("first"));
        let first = OutDirLock::acquire(&dir, &owner).unwrap();
        // flock locks belong to the open file description: a second open, even in this
        // process, conflicts, as another process's would.
        let refused = OutDirLock::acquire(&dir, &LockOwner::this_process(Some("second"))).unwrap_err();
        let message = refused.to_string();
        assert!(
            message.contains("run id first") && message.contains(&format!("pid {}", owner.pid)),
            "{message}"
        );
        drop(first);
        assert_eq!(std::fs::read_to_string(dir.join(LOCK_FILE)).unwrap(), "");
        let again = OutDirLock::acquire(&dir, &LockOwner::this_process(Some("third"))).unwrap();
        drop(again);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
