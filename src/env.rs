//! The only reader of environment variables.
//!
//! The launcher hands every rank torchrun's variables (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`,
//! `LOCAL_WORLD_SIZE`, `GROUP_RANK`, `MASTER_ADDR`, `MASTER_PORT`) so that users' habits carry
//! over, plus burnrun's own:
//!
//! | variable | meaning |
//! |---|---|
//! | `BURNRUN_RUN_ID` | the job's id (`--run-id`), scopes store keys |
//! | `BURNRUN_SECRET` | 64 hex digits: the per-job secret every connection must prove it knows |
//! | `BURNRUN_TIMEOUT_SECS` | deadline of every blocking collective (default [`DEFAULT_TIMEOUT_SECS`]) |
//! | `BURNRUN_RDZV_TIMEOUT_SECS` | deadline of the rendezvous (default [`DEFAULT_RDZV_TIMEOUT_SECS`]) |
//! | `BURNRUN_RING_THRESHOLD_BYTES` | all-reduce switches from halving-doubling to ring at this size |
//! | `BURNRUN_SEGMENT_BYTES` | I/O unit of the pipelined algorithms |
//! | `BURNRUN_NODE_ADDR` | address this node's ranks listen on for data connections |
//! | `BURNRUN_SHM` | `0` sends same-host frames over loopback TCP instead of shared memory (default `1`) |
//! | `BURNRUN_SHM_RING_BYTES` | bytes of one shared-memory ring (a power of two) |
//! | `BURNRUN_HIERARCHICAL` | `auto` (default): all-reduce and broadcast go host by host when the group spans hosts and the buffer reaches the ring threshold; `on`: at any size; `off`: never |
//! | `BURNRUN_SHM_SPIN_US` | microseconds a rank busy-polls shared memory before it sleeps |
//! | `BURNRUN_DEVICE` | the device `burnrun::device()` gives a hand-written loop (`cpu`, `wgpu`, ...) |
//! | `BURNRUN_CONTROL_LINES` | `1`: the launcher reads control lines (`crate::names::ControlLine`) from this rank |
//! | `BURNRUN_RESTART_COUNT` | the job's generation: how many times it was restarted (`--max-restarts`); also `TORCHELASTIC_RESTART_COUNT` |
//! | `BURNRUN_FAULT` | faults to inject, for tests (see `crate::fault`) |

use std::time::Duration;

/// Collective deadline used when `BURNRUN_TIMEOUT_SECS` is not set: long enough for a slow step
/// on a loaded machine, short enough that a hang is reported in minutes, not torch's 30.
pub const DEFAULT_TIMEOUT_SECS: u64 = 300;
/// Rendezvous deadline used when `BURNRUN_RDZV_TIMEOUT_SECS` is not set (torchrun's default is 900).
pub const DEFAULT_RDZV_TIMEOUT_SECS: u64 = 300;

/// Errors reading the environment.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    /// A variable is set but does not parse.
    #[error("environment variable {name}={value:?} is invalid: {reason}")]
    Invalid {
        /// Variable name.
        name: &'static str,
        /// Its value.
        value: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A variable the launcher always sets is missing while others are present.
    #[error("environment variable {name} is missing ({context})")]
    Missing {
        /// Variable name.
        name: &'static str,
        /// Which other variable made it required.
        context: &'static str,
    },
}

/// What a launcher reads from its own environment: values a user or a job script exported,
/// which the launcher's flags override.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct LauncherEnv {
    /// `BURNRUN_SECRET`: the job secret (64 hex digits), e.g. exported on every node of a multi-node job.
    pub secret_hex: Option<String>,
    /// `BURNRUN_TIMEOUT_SECS`: the collective deadline to hand to the ranks.
    pub timeout_secs: Option<u64>,
    /// `BURNRUN_RDZV_TIMEOUT_SECS`: the rendezvous deadline.
    pub rdzv_timeout_secs: Option<u64>,
}

impl std::fmt::Debug for LauncherEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LauncherEnv")
            .field("secret_hex", &self.secret_hex.as_ref().map(|_| "<redacted>"))
            .field("timeout_secs", &self.timeout_secs)
            .field("rdzv_timeout_secs", &self.rdzv_timeout_secs)
            .finish()
    }
}

impl LauncherEnv {
    /// Reads the variables a launcher honours.
    pub fn from_env() -> Result<Self, EnvError> {
        Ok(Self {
            secret_hex: var("BURNRUN_SECRET"),
            timeout_secs: parse("BURNRUN_TIMEOUT_SECS")?,
            rdzv_timeout_secs: parse("BURNRUN_RDZV_TIMEOUT_SECS")?,
        })
    }
}

/// What a rank learns from its launcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    /// Global rank.
    pub rank: usize,
    /// Rank within this node.
    pub local_rank: usize,
    /// Number of ranks in the job.
    pub world_size: usize,
    /// Number of ranks on this node.
    pub local_world_size: usize,
    /// This node's index (torchrun's `GROUP_RANK`).
    pub group_rank: usize,
    /// Host of the rendezvous store.
    pub master_addr: String,
    /// Port of the rendezvous store.
    pub master_port: u16,
    /// Job id.
    pub run_id: String,
    /// Hex-encoded job secret, if the launcher handed one.
    pub secret_hex: Option<String>,
    /// Deadline of every blocking collective.
    pub timeout: Duration,
    /// Deadline of the rendezvous.
    pub rdzv_timeout: Duration,
    /// Override of the all-reduce ring threshold.
    pub ring_threshold_bytes: Option<usize>,
    /// Override of the pipelining segment size.
    pub segment_bytes: Option<usize>,
    /// Address to listen on for data connections, if not the one used to reach the store.
    pub node_addr: Option<String>,
    /// Whether same-host ranks use shared memory (`None`: the default, yes).
    pub shm: Option<bool>,
    /// Override of the shared-memory ring size.
    pub shm_ring_bytes: Option<usize>,
    /// Override of the shared-memory spin before sleeping, in microseconds.
    pub shm_spin_us: Option<u64>,
    /// Hierarchical all-reduce and broadcast (`BURNRUN_HIERARCHICAL`): `Some(true)` at any size (`on`),
    /// `Some(false)` never (`off`), `None` the engine's rule (`auto`, or not set).
    pub hierarchical: Option<bool>,
    /// The job's generation (`BURNRUN_RESTART_COUNT`): 0 until the launcher restarts it.
    pub restart_count: u32,
}

/// `BURNRUN_DEVICE`: the device a hand-written training loop asked for, if set.
pub fn device_name() -> Option<String> {
    var("BURNRUN_DEVICE")
}

/// `CUDA_VISIBLE_DEVICES`, if set: which GPUs CUDA shows this process (the launcher passes it
/// through untouched; each rank picks device `LOCAL_RANK` among them, as under torchrun).
pub fn cuda_visible_devices() -> Option<String> {
    var("CUDA_VISIBLE_DEVICES")
}

/// Set by the launcher to `1` for every rank it starts: the rank's output goes to a launcher that
/// reads control lines ([`crate::names::ControlLine`]), so rank 0 sends its progress that way and a
/// rank may ask for its stdout to be copied unprefixed. Anything but `1` (or unset) means no launcher.
pub const CONTROL_LINES_VAR: &str = "BURNRUN_CONTROL_LINES";

/// The variable the launcher sets to the job's generation (0 until the first restart).
pub const RESTART_COUNT_VAR: &str = "BURNRUN_RESTART_COUNT";

/// How many times the launcher restarted this job (`BURNRUN_RESTART_COUNT`, or torchrun's
/// `TORCHELASTIC_RESTART_COUNT`); 0 without a launcher or an unreadable value.
pub fn restart_count() -> u32 {
    var(RESTART_COUNT_VAR)
        .or_else(|| var("TORCHELASTIC_RESTART_COUNT"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// `BURNRUN_FAULT`: the faults a test asks this rank to inject (see `crate::fault`).
pub fn fault_spec() -> Option<String> {
    var("BURNRUN_FAULT")
}

/// True when this process's output is read by a burnrun launcher that understands control lines.
pub fn control_lines() -> bool {
    var(CONTROL_LINES_VAR).is_some_and(|v| v.trim() == "1")
}

/// Where to look for NCCL (and NVRTC), in the order they are tried: `NCCL_LIBRARY` (or
/// `NVRTC_LIBRARY`: a file or a folder), then every folder of `LD_LIBRARY_PATH`, then the Python environments a PyPI
/// wheel (`nvidia-nccl-cu12`/`-cu13`, which every PyTorch install carries) may sit in:
/// `VIRTUAL_ENV`, `CONDA_PREFIX`, `~/.local`, `PYENV_ROOT` (default `~/.pyenv`) versions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LibrarySearch {
    /// `NCCL_LIBRARY`.
    pub nccl_library: Option<std::path::PathBuf>,
    /// `NVRTC_LIBRARY` (the CUDA runtime compiler the kernels are built with).
    pub nvrtc_library: Option<std::path::PathBuf>,
    /// The folders of `LD_LIBRARY_PATH`, in order.
    pub ld_library_path: Vec<std::path::PathBuf>,
    /// Prefixes of Python environments (`<prefix>/lib/python3.*/site-packages` is searched).
    pub python_prefixes: Vec<std::path::PathBuf>,
}

impl LibrarySearch {
    /// Reads the variables above.
    pub fn from_env() -> Self {
        use std::path::PathBuf;
        let ld_library_path = var("LD_LIBRARY_PATH")
            .map(|v| v.split(':').filter(|p| !p.is_empty()).map(PathBuf::from).collect())
            .unwrap_or_default();
        let home = var("HOME").map(PathBuf::from);
        let mut python_prefixes: Vec<PathBuf> = [var("VIRTUAL_ENV"), var("CONDA_PREFIX")]
            .into_iter()
            .flatten()
            .map(PathBuf::from)
            .collect();
        if let Some(home) = &home {
            python_prefixes.push(home.join(".local"));
        }
        let pyenv = var("PYENV_ROOT")
            .map(PathBuf::from)
            .or_else(|| home.map(|h| h.join(".pyenv")));
        if let Some(versions) = pyenv.map(|p| p.join("versions")) {
            if let Ok(entries) = std::fs::read_dir(&versions) {
                let mut found: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
                found.sort();
                python_prefixes.extend(found);
            }
        }
        python_prefixes.extend(["/usr/local", "/usr"].map(PathBuf::from));
        Self {
            nccl_library: var("NCCL_LIBRARY").map(PathBuf::from),
            nvrtc_library: var("NVRTC_LIBRARY").map(PathBuf::from),
            ld_library_path,
            python_prefixes,
        }
    }

    /// The package folders of the Python environments: every existing
    /// `<prefix>/lib/python3.*/site-packages` (or Debian's `dist-packages`), prefixes in order.
    pub fn site_packages(&self) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        for prefix in &self.python_prefixes {
            let Ok(entries) = std::fs::read_dir(prefix.join("lib")) else {
                continue;
            };
            let mut found: Vec<std::path::PathBuf> = entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
                .flat_map(|e| ["site-packages", "dist-packages"].map(|s| e.path().join(s)))
                .filter(|p| p.is_dir())
                .collect();
            found.sort();
            out.extend(found);
        }
        out
    }
}

fn var(name: &'static str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn parse<T: std::str::FromStr>(name: &'static str) -> Result<Option<T>, EnvError>
where
    T::Err: std::fmt::Display,
{
    match var(name) {
        None => Ok(None),
        Some(value) => value.trim().parse().map(Some).map_err(|e: T::Err| EnvError::Invalid {
            name,
            reason: e.to_string(),
            value,
        }),
    }
}

/// A boolean variable: `1`/`true`/`yes`/`on` or `0`/`false`/`no`/`off`.
fn parse_bool(name: &'static str) -> Result<Option<bool>, EnvError> {
    match var(name) {
        None => Ok(None),
        Some(value) => match value.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(Some(true)),
            "0" | "false" | "no" | "off" => Ok(Some(false)),
            _ => Err(EnvError::Invalid {
                name,
                value,
                reason: "expected 1/true/yes/on or 0/false/no/off".into(),
            }),
        },
    }
}

/// A three-way variable: `auto` (or not set) is `None`, else a boolean as [`parse_bool`] reads it.
fn parse_auto_bool(name: &'static str) -> Result<Option<bool>, EnvError> {
    if var(name).is_some_and(|v| v.trim().eq_ignore_ascii_case("auto")) {
        return Ok(None);
    }
    parse_bool(name).map_err(|e| match e {
        EnvError::Invalid { name, value, .. } => EnvError::Invalid {
            name,
            value,
            reason: "expected auto, 1/true/yes/on or 0/false/no/off".into(),
        },
        other => other,
    })
}

fn required<T: std::str::FromStr>(name: &'static str) -> Result<T, EnvError>
where
    T::Err: std::fmt::Display,
{
    parse(name)?.ok_or(EnvError::Missing {
        name,
        context: "WORLD_SIZE is set, so the launcher must set it too",
    })
}

impl DistEnv {
    /// Reads the environment. Without `WORLD_SIZE` this is a single rank with no launcher.
    pub fn from_env() -> Result<Self, EnvError> {
        let timeout = Duration::from_secs(parse("BURNRUN_TIMEOUT_SECS")?.unwrap_or(DEFAULT_TIMEOUT_SECS));
        let rdzv_timeout =
            Duration::from_secs(parse("BURNRUN_RDZV_TIMEOUT_SECS")?.unwrap_or(DEFAULT_RDZV_TIMEOUT_SECS));
        let single = Self {
            ring_threshold_bytes: parse("BURNRUN_RING_THRESHOLD_BYTES")?,
            segment_bytes: parse("BURNRUN_SEGMENT_BYTES")?,
            node_addr: var("BURNRUN_NODE_ADDR"),
            shm: parse_bool("BURNRUN_SHM")?,
            shm_ring_bytes: parse("BURNRUN_SHM_RING_BYTES")?,
            shm_spin_us: parse("BURNRUN_SHM_SPIN_US")?,
            hierarchical: parse_auto_bool("BURNRUN_HIERARCHICAL")?,
            ..Self::single(timeout, rdzv_timeout)
        };
        let Some(world_size) = parse::<usize>("WORLD_SIZE")? else {
            return Ok(single);
        };
        let rank: usize = required("RANK")?;
        if world_size == 0 || rank >= world_size {
            return Err(EnvError::Invalid {
                name: "RANK",
                value: rank.to_string(),
                reason: format!("must be below WORLD_SIZE={world_size}"),
            });
        }
        Ok(Self {
            rank,
            local_rank: parse("LOCAL_RANK")?.unwrap_or(rank),
            world_size,
            local_world_size: parse("LOCAL_WORLD_SIZE")?.unwrap_or(world_size),
            group_rank: parse("GROUP_RANK")?.unwrap_or(0),
            master_addr: var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
            master_port: required("MASTER_PORT")?,
            run_id: var("BURNRUN_RUN_ID").unwrap_or_else(|| "none".into()),
            secret_hex: var("BURNRUN_SECRET"),
            restart_count: restart_count(),
            ..single
        })
    }

    /// A world of one rank, no launcher, no overrides.
    fn single(timeout: Duration, rdzv_timeout: Duration) -> Self {
        Self {
            rank: 0,
            local_rank: 0,
            world_size: 1,
            local_world_size: 1,
            group_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: 0,
            run_id: "none".into(),
            secret_hex: None,
            timeout,
            rdzv_timeout,
            ring_threshold_bytes: None,
            segment_bytes: None,
            node_addr: None,
            shm: None,
            shm_ring_bytes: None,
            shm_spin_us: None,
            hierarchical: None,
            restart_count: 0,
        }
    }

    /// The prefix of the ranks' keys in the job's store: the run id, and the generation after a
    /// restart, so that a restarted job never reads what the failed attempt wrote.
    pub fn store_prefix(&self) -> String {
        match self.restart_count {
            0 => format!("burnrun/{}/world", self.run_id),
            n => format!("burnrun/{}/g{n}/world", self.run_id),
        }
    }

    /// True when a launcher started this process as one rank of a job.
    pub fn launched(&self) -> bool {
        self.master_port != 0
    }
}

#[cfg(feature = "nccl")]
/// How many CUDA devices this process sees, or why none (no driver library, a driver error).
pub fn cuda_device_count() -> Result<usize, String> {
    // SAFETY: only checks whether the driver library loads; calls nothing in it.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("libcuda.so (the NVIDIA driver) is not on this machine".into());
    }
    cudarc::driver::CudaContext::device_count()
        .map(|n| n.max(0) as usize)
        .map_err(|e| format!("the CUDA driver cannot count its devices: {e}"))
}
