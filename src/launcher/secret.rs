//! Where the job secret comes from.
//!
//! In order: `--secret-file` (node 0 creates it, mode 0600, when it does not exist; the other nodes
//! wait for it; a file other users may read or write, `mode & 0o077 != 0`, is refused as ssh refuses
//! such a private key), then
//! `BURNRUN_SECRET`; otherwise a single-node job draws a fresh one, and a multi-node job derives one
//! from `--run-id` (or, without one, the store's port, `--master-port`), loudly: anyone who knows
//! that can join the job. Every node must then be given the same `--run-id`, or none.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::output::say;
use super::{LaunchError, LaunchOptions};
use crate::auth::{AuthError, JobSecret};
use crate::env::LauncherEnv;

/// How often a node > 0 looks for the secret file node 0 is about to write.
const FILE_POLL: Duration = Duration::from_millis(100);

/// Resolves this node's job secret. A node > 0 given a `--secret-file` that does not exist yet
/// waits for node 0 to write it (a shared file system), until `deadline`.
pub(crate) fn resolve(
    options: &LaunchOptions,
    env: &LauncherEnv,
    deadline: Instant,
    mut interrupted: impl FnMut() -> Option<Signal>,
) -> Result<JobSecret, LaunchError> {
    if let Some(path) = &options.secret_file {
        if options.node_rank == 0 {
            return read_or_create(path);
        }
        loop {
            match read(path) {
                Err(LaunchError::SecretFile { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound && Instant::now() < deadline =>
                {
                    if let Some(signal) = interrupted() {
                        return Err(LaunchError::RendezvousAborted {
                            node_rank: options.node_rank,
                            reason: format!("received {signal} while waiting for node 0 to write {}", path.display()),
                        });
                    }
                    std::thread::sleep(FILE_POLL);
                }
                other => return other,
            }
        }
    }
    if let Some(hex) = &env.secret_hex {
        return JobSecret::from_hex(hex).map_err(|source| LaunchError::Secret {
            origin: "BURNRUN_SECRET".into(),
            source,
        });
    }
    if options.nnodes == 1 {
        return JobSecret::generate().map_err(random_error);
    }
    let public = match &options.run_id {
        Some(run_id) => format!("run id {run_id}"),
        // The port, not the address: every node passes the same port, but may spell node 0's name differently.
        None => format!("store port {}", options.master_port),
    };
    say(format_args!(
        "WARNING: no job secret (--secret-file or BURNRUN_SECRET): deriving one from the {public} \
         (--run-id, or without one --master-port); anyone who knows it can join this job. \
         Prefer a real secret: --secret-file on a shared file system, or the same \
         BURNRUN_SECRET=$(openssl rand -hex 32) exported on every node."
    ));
    Ok(JobSecret::derive_from(&public))
}

fn random_error(source: AuthError) -> LaunchError {
    LaunchError::Secret {
        origin: "the operating system's random source".into(),
        source,
    }
}

fn read(path: &Path) -> Result<JobSecret, LaunchError> {
    let metadata = std::fs::metadata(path).map_err(|source| LaunchError::SecretFile {
        path: path.to_owned(),
        source,
    })?;
    let mode = metadata.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(LaunchError::SecretFileOpen {
            path: path.to_owned(),
            mode,
        });
    }
    let text = std::fs::read_to_string(path).map_err(|source| LaunchError::SecretFile {
        path: path.to_owned(),
        source,
    })?;
    JobSecret::from_hex(&text).map_err(|source| LaunchError::Secret {
        origin: path.display().to_string(),
        source,
    })
}

/// Node 0: reads the file, or writes a fresh secret there. The secret is written to a private
/// temporary file first and linked into place, so a node polling `path` never reads half of it and
/// an existing file is never overwritten.
fn read_or_create(path: &Path) -> Result<JobSecret, LaunchError> {
    let file_error = |path: &Path, source| LaunchError::SecretFile {
        path: path.to_owned(),
        source,
    };
    match read(path) {
        Err(LaunchError::SecretFile { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
        other => return other,
    }
    let secret = JobSecret::generate().map_err(random_error)?;
    let mut staging = path.as_os_str().to_owned();
    staging.push(format!(".{}.tmp", std::process::id()));
    let staging = PathBuf::from(staging);
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&staging)
        .and_then(|mut file| writeln!(file, "{}", secret.to_hex()))
        .and_then(|()| std::fs::hard_link(&staging, path));
    let _ = std::fs::remove_file(&staging);
    match written {
        Ok(()) => {
            say(format_args!(
                "wrote a new job secret to {}: the other nodes need the same file",
                path.display()
            ));
            Ok(secret)
        }
        // Another launcher created it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read(path),
        Err(e) => Err(file_error(path, e)),
    }
}
