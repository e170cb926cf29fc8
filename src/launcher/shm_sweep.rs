//! Removing the shared-memory files a run's ranks left behind on this host.
//!
//! Ranks on one host exchange data through files in [`SHM_DIR`] whose names start with
//! [`shm_rank_file_prefix`]`(run_id, rank)`. Each rank unlinks its files once every peer mapped
//! them, but a rank killed during start-up cannot: once a node's ranks have all ended, its launcher
//! removes whatever its own ranks left in that directory (not the other nodes' ranks': two nodes of
//! one run may share a host).

use std::io::ErrorKind;
use std::path::Path;

use super::output::say;
use crate::names::{shm_rank_file_prefix, SHM_DIR};

/// Removes every entry of [`SHM_DIR`] whose name starts with the prefix of one of `ranks` of run
/// `run_id`. Call it once those ranks (this node's) have all ended.
pub(crate) fn sweep_run(run_id: &str, ranks: std::ops::Range<usize>) {
    for rank in ranks {
        sweep(Path::new(SHM_DIR), &shm_rank_file_prefix(run_id, rank));
    }
}

/// Removes every entry of `dir` whose name starts with `prefix`; returns how many it removed.
///
/// A missing `dir` has nothing to remove. Symbolic links are removed, never followed: only names
/// inside `dir` go, whatever they point to (a directory is removed with its content, which
/// [`std::fs::remove_dir_all`] also does without following links). What cannot be removed is said
/// on stderr and skipped.
pub(crate) fn sweep(dir: &Path, prefix: &str) -> usize {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return 0,
        Err(e) => {
            say(format_args!(
                "cannot list {} to remove this run's shared-memory files ({prefix}*): {e}",
                dir.display()
            ));
            return 0;
        }
    };
    let mut removed = 0;
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                say(format_args!("cannot list {} completely: {e}", dir.display()));
                break;
            }
        };
        let name = entry.file_name();
        if !name.as_encoded_bytes().starts_with(prefix.as_bytes()) {
            continue;
        }
        // The entry's own type (lstat): a link to a directory is a link, not a directory.
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        let path = entry.path();
        let result = if is_dir {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match result {
            Ok(()) => {
                removed += 1;
                tracing::debug!(path = %path.display(), "removed a shared-memory file left by a rank");
            }
            // A rank unlinked it between the listing and now.
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => say(format_args!(
                "cannot remove {}, left behind by a rank: {e}",
                path.display()
            )),
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_entries_with_the_prefix_go_and_links_are_not_followed() {
        let root = std::env::temp_dir().join(format!("burnrun-sweep-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (dir, outside) = (root.join("shm"), root.join("outside"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let target = outside.join("keep.txt");
        std::fs::write(&target, b"x").unwrap();
        std::fs::write(dir.join("burnrun-r1-a"), b"x").unwrap();
        std::fs::write(dir.join("burnrun-r1x-other-run"), b"x").unwrap();
        std::fs::write(dir.join("unrelated"), b"x").unwrap();
        std::os::unix::fs::symlink(&target, dir.join("burnrun-r1-link")).unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("burnrun-r1-dirlink")).unwrap();
        std::fs::create_dir(dir.join("burnrun-r1-dir")).unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("burnrun-r1-dir").join("inner")).unwrap();

        assert_eq!(sweep(&dir, "burnrun-r1-"), 4);
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["burnrun-r1x-other-run", "unrelated"]);
        assert!(target.is_file(), "the link's target is kept");
        assert_eq!(sweep(&root.join("missing"), "burnrun-r1-"), 0);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
