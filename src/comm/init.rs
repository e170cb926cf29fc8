//! Building the world process group from the launcher's environment.

use crate::env::DistEnv;
use crate::error::Error;

use super::group::ProcessGroup;

/// Joins the job described by the environment (set by the `burnrun` launcher, or torchrun's
/// variables). Without a launcher this is a world of one rank.
pub fn init() -> Result<ProcessGroup, Error> {
    init_from(&DistEnv::from_env()?)
}

/// Joins the job described by `env`.
pub fn init_from(env: &DistEnv) -> Result<ProcessGroup, Error> {
    let _ = env;
    todo!("host engine")
}
