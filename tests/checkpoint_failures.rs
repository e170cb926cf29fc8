//! Checkpoints that fail or rot (issue 9): a full disk leaves nothing behind, a corrupt latest
//! checkpoint falls back to the previous one naming the file, and checksums catch silent
//! corruption.

mod common;

use std::path::{Path, PathBuf};

use burnrun::train::checkpoint::{self, TrainState};
use common::{burnrun, config, out_dir, sets, train, train_args};

/// A 1 MiB tmpfs mounted for the test, unmounted on drop.
struct SmallTmpfs(PathBuf);

impl SmallTmpfs {
    /// `None` when it cannot be mounted (not root, no mount namespace rights).
    fn mount(name: &str) -> Option<Self> {
        let dir = out_dir(name);
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(&dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Self(dir))
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Every path under `dir`, recursively.
fn all_paths(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(all_paths(&path));
        }
        out.push(path);
    }
    out
}

#[test]
fn a_full_disk_during_a_checkpoint_leaves_no_temporary_file_and_no_partial_folder() {
    let Some(tmpfs) = SmallTmpfs::mount("ckpt-full") else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let out = tmpfs.0.join("run");
    // 64 x 512 + 512 x 512 + 512 x 10 parameters: a 1.2 MB model file, on a 1 MiB disk.
    let finished = burnrun(&train_args(
        1,
        &config("mlp_synthetic.toml"),
        &out,
        &sets(&["train.steps=2", "model.mlp.hidden=[512, 512]", "log.progress=plain"]),
    ));
    assert!(!finished.status.success(), "{}", finished.output());
    let all = format!("{}\n{}", finished.stdout, finished.stderr);
    assert!(
        all.contains("the disk is full") && all.contains("model-stage0.safetensors"),
        "the error does not say the disk is full, naming the file\n{}",
        finished.output()
    );
    let left: Vec<PathBuf> = all_paths(&out.join("checkpoints"));
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Trains 10 steps with checkpoints at 5 and 10 into a fresh folder.
fn two_checkpoints(name: &str) -> PathBuf {
    let out = out_dir(name);
    train(
        1,
        &config("mlp_synthetic.toml"),
        &out,
        &sets(&["train.steps=10", "checkpoint.every_steps=5", "log.progress=plain"]),
    );
    out
}

fn resume_to_15(out: &Path) -> String {
    let finished = train(
        1,
        &config("mlp_synthetic.toml"),
        out,
        &sets(&[
            "train.steps=15",
            "checkpoint.every_steps=5",
            "checkpoint.resume=true",
            "log.progress=plain",
        ]),
    );
    format!("{}\n{}", finished.stdout, finished.stderr)
}

#[test]
fn a_truncated_latest_checkpoint_falls_back_to_the_previous_one_naming_the_corrupt_file() {
    let out = two_checkpoints("ckpt-truncated");
    let root = out.join("checkpoints");
    let file = checkpoint::step_dir(&root, 10).join("model-stage0.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    // Without checksums too (a checkpoint from before them): the truncation itself is caught.
    let state_path = checkpoint::step_dir(&root, 10).join("state.json");
    let mut state: TrainState = serde_json::from_slice(&std::fs::read(&state_path).unwrap()).unwrap();
    state.checksums.clear();
    std::fs::write(&state_path, serde_json::to_vec(&state).unwrap()).unwrap();

    let all = resume_to_15(&out);
    assert!(
        all.contains(&file.display().to_string()),
        "the corrupt file is not named\n{all}"
    );
    assert!(all.contains("resumed from") && all.contains("step_00000005"), "{all}");
    assert_eq!(
        checkpoint::read_state(&checkpoint::step_dir(&root, 15)).unwrap().step,
        15
    );
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn a_silently_corrupted_file_is_caught_by_its_checksum_and_the_previous_checkpoint_is_used() {
    let out = two_checkpoints("ckpt-bitflip");
    let root = out.join("checkpoints");
    let file = checkpoint::step_dir(&root, 10).join("optim-stage0.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    // A flipped bit in the last value: the file still parses.
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&file, &bytes).unwrap();

    let all = resume_to_15(&out);
    assert!(
        all.contains(&file.display().to_string()) && all.contains("sha256"),
        "the checksum did not catch it\n{all}"
    );
    assert!(all.contains("step_00000005"), "{all}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn an_explicit_corrupt_checkpoint_is_an_error_naming_the_file() {
    let out = two_checkpoints("ckpt-explicit");
    let dir = checkpoint::step_dir(&out.join("checkpoints"), 10);
    let file = dir.join("model-stage0.safetensors");
    std::fs::write(&file, b"not safetensors").unwrap();
    let mut args = train_args(1, &config("mlp_synthetic.toml"), &out, &sets(&["train.steps=15"]));
    args.push("--resume".to_string());
    args.push(dir.display().to_string());
    let finished = burnrun(&args);
    assert!(!finished.status.success(), "{}", finished.output());
    assert!(
        finished.stderr.contains(&file.display().to_string()),
        "{}",
        finished.output()
    );
    let _ = std::fs::remove_dir_all(&out);
}
