//! `[train]`: the loop's length, batch, seed, device and output folder.

use std::fmt;

use serde::{Deserialize, Serialize};

/// `[train]`: how long, how big, where.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Optimizer steps to run (each of `grad_accum_steps` micro steps). Default `1000`.
    pub steps: u64,
    /// Samples per rank per micro step (torch's per-process batch). The global batch is
    /// `batch_size * grad_accum_steps * data-parallel ranks`. Default `32`.
    pub batch_size: usize,
    /// Micro steps whose gradients are accumulated (without communication) before each
    /// synchronized optimizer step. Default `1`.
    pub grad_accum_steps: usize,
    /// Seed of parameter initialization, shuffling and dropout. Default `42`.
    pub seed: u64,
    /// Folder for checkpoints (`<out_dir>/checkpoints/`) and `metrics.jsonl`. Default `""`, which
    /// loading turns into `runs/<config name>` (the config file's stem, e.g. `runs/mlp_synthetic`).
    pub out_dir: String,
    /// Device to compute on: `"cpu"` (burn's flex backend) or `"flex"` (the same, by name);
    /// `"wgpu"`, `"wgpu:discrete"`, `"wgpu:integrated"`, `"wgpu:cpu"` (feature `wgpu`); `"cuda"`
    /// (GPU number `LOCAL_RANK`) and `"cuda:N"` (feature `cuda`). A device the build lacks is
    /// refused by validation. Default `"cpu"`.
    pub device: String,
    /// Every this many steps, compare a checksum of the parameters across ranks and stop, naming
    /// the first differing parameter, if replicas diverged. `0` turns the check off. Default `50`.
    pub check_replicas_every: u64,
    /// Compute threads per rank. `0` means all cores divided by the ranks on this node. Default `0`.
    pub threads: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 1000,
            batch_size: 32,
            grad_accum_steps: 1,
            seed: 42,
            out_dir: String::new(),
            device: "cpu".to_string(),
            check_replicas_every: 50,
            threads: 0,
        }
    }
}

/// Which kind of wgpu adapter a `wgpu` device name asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WgpuAdapter {
    /// `"wgpu"`: the best adapter found; every rank of a node shares it.
    Default,
    /// `"wgpu:discrete"`: the local rank's discrete GPU (one GPU per rank).
    Discrete,
    /// `"wgpu:integrated"`: the local rank's integrated GPU.
    Integrated,
    /// `"wgpu:cpu"`: a CPU adapter (software Vulkan such as Mesa's lavapipe).
    Cpu,
}

/// A parsed device name: `train.device`, and `BURNRUN_DEVICE` for `burnrun::device()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// `"cpu"`: burn's default CPU backend (flex).
    Cpu,
    /// `"flex"`: burn's flex CPU backend, named explicitly.
    Flex,
    /// `"wgpu"`, `"wgpu:discrete"`, `"wgpu:integrated"`, `"wgpu:cpu"`: burn's wgpu backend.
    Wgpu(WgpuAdapter),
    /// `"cuda"` (`None`: the GPU numbered `LOCAL_RANK`) or `"cuda:N"` (`Some(N)`).
    Cuda(Option<usize>),
}

impl DeviceSpec {
    /// Reads a device name; `None` if it is none of the accepted forms.
    pub fn parse(text: &str) -> Option<Self> {
        match text.trim() {
            "cpu" => Some(Self::Cpu),
            "flex" => Some(Self::Flex),
            "wgpu" | "wgpu:default" => Some(Self::Wgpu(WgpuAdapter::Default)),
            "wgpu:discrete" => Some(Self::Wgpu(WgpuAdapter::Discrete)),
            "wgpu:integrated" => Some(Self::Wgpu(WgpuAdapter::Integrated)),
            "wgpu:cpu" => Some(Self::Wgpu(WgpuAdapter::Cpu)),
            "cuda" => Some(Self::Cuda(None)),
            text => text
                .strip_prefix("cuda:")?
                .parse()
                .ok()
                .map(|index| Self::Cuda(Some(index))),
        }
    }

    /// Whether this is a GPU.
    pub fn is_cuda(self) -> bool {
        matches!(self, Self::Cuda(_))
    }

    /// Whether this is burn's flex CPU backend (whose thread pool the trainer sizes).
    pub fn is_cpu(self) -> bool {
        matches!(self, Self::Cpu | Self::Flex)
    }

    /// `Err(why)` when this build cannot create the device: the backend, and how to get it.
    pub fn check_built(self) -> Result<(), String> {
        match self {
            Self::Cpu | Self::Flex => Ok(()),
            Self::Wgpu(_) if cfg!(feature = "wgpu") => Ok(()),
            Self::Wgpu(_) => Err("this build has no wgpu backend (rebuild with `--features wgpu`)".into()),
            Self::Cuda(_) if cfg!(feature = "cuda") => Ok(()),
            Self::Cuda(_) => Err("this build has no CUDA backend (rebuild with `--features cuda`)".into()),
        }
    }

    /// The device names this build accepts, for messages.
    pub fn supported() -> &'static str {
        match (cfg!(feature = "wgpu"), cfg!(feature = "cuda")) {
            (true, true) => {
                "\"cpu\" and \"flex\" (burn's flex CPU backend), \"wgpu\", \"wgpu:discrete\", \"wgpu:integrated\", \"wgpu:cpu\", \"cuda\", \"cuda:N\""
            }
            (true, false) => {
                "\"cpu\" and \"flex\" (burn's flex CPU backend), \"wgpu\", \"wgpu:discrete\", \"wgpu:integrated\", \"wgpu:cpu\"; \"cuda\" with the `cuda` feature"
            }
            (false, true) => {
                "\"cpu\" and \"flex\" (burn's flex CPU backend), \"cuda\" (GPU number LOCAL_RANK), \"cuda:N\"; \"wgpu\" with the `wgpu` feature"
            }
            (false, false) => {
                "\"cpu\" and \"flex\" (both burn's flex CPU backend); \"wgpu\" with the `wgpu` feature, \"cuda\" with the `cuda` feature"
            }
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Flex => f.write_str("flex"),
            Self::Wgpu(WgpuAdapter::Default) => f.write_str("wgpu"),
            Self::Wgpu(WgpuAdapter::Discrete) => f.write_str("wgpu:discrete"),
            Self::Wgpu(WgpuAdapter::Integrated) => f.write_str("wgpu:integrated"),
            Self::Wgpu(WgpuAdapter::Cpu) => f.write_str("wgpu:cpu"),
            Self::Cuda(None) => f.write_str("cuda"),
            Self::Cuda(Some(index)) => write!(f, "cuda:{index}"),
        }
    }
}
