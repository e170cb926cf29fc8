//! Starting one rank's process: its environment, its own process group, and death with the launcher.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

use super::RankCommand;

/// Where a rank sits in the job; becomes torchrun's variables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Placement {
    pub(crate) rank: usize,
    pub(crate) local_rank: usize,
    pub(crate) world_size: usize,
    pub(crate) local_world_size: usize,
    pub(crate) node_rank: usize,
}

/// What every rank of the job is told besides its placement.
#[derive(Debug, Clone)]
pub(crate) struct JobEnv {
    pub(crate) master_addr: String,
    pub(crate) master_port: u16,
    pub(crate) run_id: String,
    pub(crate) secret_hex: String,
    pub(crate) timeout_secs: u64,
    pub(crate) rdzv_timeout_secs: u64,
    /// The job's generation: 0, then 1 after the first restart, ...
    pub(crate) restart_count: u32,
    /// `--max-restarts`.
    pub(crate) max_restarts: u32,
}

impl Placement {
    /// The variables that `crate::env::DistEnv::from_env` reads in the rank.
    pub(crate) fn env(&self, job: &JobEnv) -> Vec<(&'static str, String)> {
        vec![
            ("RANK", self.rank.to_string()),
            ("LOCAL_RANK", self.local_rank.to_string()),
            ("WORLD_SIZE", self.world_size.to_string()),
            ("LOCAL_WORLD_SIZE", self.local_world_size.to_string()),
            ("GROUP_RANK", self.node_rank.to_string()),
            ("MASTER_ADDR", job.master_addr.clone()),
            ("MASTER_PORT", job.master_port.to_string()),
            ("BURNRUN_RUN_ID", job.run_id.clone()),
            ("BURNRUN_SECRET", job.secret_hex.clone()),
            ("BURNRUN_TIMEOUT_SECS", job.timeout_secs.to_string()),
            ("BURNRUN_RDZV_TIMEOUT_SECS", job.rdzv_timeout_secs.to_string()),
            (crate::env::RESTART_COUNT_VAR, job.restart_count.to_string()),
            // torchrun's names, for programs written against torchelastic.
            ("TORCHELASTIC_RESTART_COUNT", job.restart_count.to_string()),
            ("TORCHELASTIC_MAX_RESTARTS", job.max_restarts.to_string()),
            // The launcher reads every rank's control lines (see `crate::names::ControlLine`).
            (crate::env::CONTROL_LINES_VAR, "1".into()),
        ]
    }
}

/// Starts a rank: stdin from /dev/null, stdout and stderr piped to the launcher, in a process
/// group of its own (so teardown reaches the processes it starts), killed by the kernel if the
/// launcher dies (`PR_SET_PDEATHSIG`).
///
/// Call it from the thread that lives as long as the launcher: the death signal fires when the
/// thread that forked the child exits, not only the process.
pub(crate) fn spawn(command: &RankCommand, env: &[(&'static str, String)]) -> std::io::Result<Child> {
    let launcher_pid = std::process::id() as libc::pid_t;
    let mut cmd = Command::new(&command.program);
    cmd.args(&command.args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let die_with_launcher = move || {
        // SAFETY: prctl and getppid are async-signal-safe and touch no memory of ours.
        unsafe {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The launcher may have died before the prctl: then nobody would kill this rank.
            if libc::getppid() != launcher_pid {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
        }
        Ok(())
    };
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe calls.
    unsafe { cmd.pre_exec(die_with_launcher) };
    cmd.spawn()
}
