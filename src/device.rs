//! Which burn [`Device`] this rank trains on: the one place that knows the backends.
//!
//! A device is named by a short string, the same in `train.device`, in `BURNRUN_DEVICE` (read by
//! [`device`] for hand-written loops) and in error messages:
//!
//! | name | device | rank r of a node gets |
//! |---|---|---|
//! | `cpu` (or `flex`) | burn's flex CPU backend | the CPU (its threads shared out among the node's ranks) |
//! | `wgpu` | burn's wgpu backend, the best adapter found (feature `wgpu`) | the same adapter: one GPU per node, or a software one |
//! | `wgpu:discrete` | wgpu, discrete GPUs | the r-th discrete GPU (torchrun's one-GPU-per-rank) |
//! | `wgpu:integrated` | wgpu, integrated GPUs | the r-th integrated GPU |
//! | `wgpu:cpu` | wgpu on a CPU adapter (Mesa's lavapipe) | that adapter |
//! | `cuda`, `cuda:N` | burn's CUDA backend | GPU r (or N); not in this build yet |
//!
//! A name this build cannot serve is an error that says what it supports, never a silent fall
//! back to the CPU. Every device returned tracks gradients (`.autodiff()`): it is for training.

use burn::tensor::Device;

/// A device this build cannot give.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// The name is not a device at all.
    #[error("device `{name}`: unknown; this build supports {supported}")]
    Unknown {
        /// The name given.
        name: String,
        /// The names this build accepts.
        supported: String,
    },
    /// The backend exists, but this build was compiled without it.
    #[error("device `{name}`: this build has no {backend} backend ({how}); it supports {supported}")]
    NotBuilt {
        /// The name given.
        name: String,
        /// The missing backend.
        backend: &'static str,
        /// How to get it.
        how: &'static str,
        /// The names this build accepts.
        supported: String,
    },
}

/// Which kind of wgpu adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WgpuAdapter {
    /// The best adapter found (`wgpu`); every rank of a node shares it.
    Default,
    /// The local-rank-th discrete GPU.
    Discrete,
    /// The local-rank-th integrated GPU.
    Integrated,
    /// A CPU adapter (software Vulkan).
    Cpu,
}

/// A parsed device name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// burn's flex CPU backend.
    Cpu,
    /// burn's wgpu backend.
    Wgpu(WgpuAdapter),
    /// burn's CUDA backend: the given GPU, or the local rank's.
    Cuda(Option<usize>),
}

impl DeviceChoice {
    /// Parses a device name (see the module docs); whether this build has the backend is checked
    /// by [`DeviceChoice::check_built`].
    pub fn parse(name: &str) -> Result<Self, DeviceError> {
        let unknown = || DeviceError::Unknown {
            name: name.to_owned(),
            supported: supported(),
        };
        Ok(match name.trim() {
            "cpu" | "flex" => DeviceChoice::Cpu,
            "wgpu" | "wgpu:default" => DeviceChoice::Wgpu(WgpuAdapter::Default),
            "wgpu:discrete" => DeviceChoice::Wgpu(WgpuAdapter::Discrete),
            "wgpu:integrated" => DeviceChoice::Wgpu(WgpuAdapter::Integrated),
            "wgpu:cpu" => DeviceChoice::Wgpu(WgpuAdapter::Cpu),
            "cuda" => DeviceChoice::Cuda(None),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(index)) => DeviceChoice::Cuda(Some(index)),
                _ => return Err(unknown()),
            },
        })
    }

    /// Parses `name` and checks that this build has its backend.
    pub fn parse_built(name: &str) -> Result<Self, DeviceError> {
        let choice = Self::parse(name)?;
        choice.check_built(name)?;
        Ok(choice)
    }

    /// An error unless this build can create the device.
    pub fn check_built(self, name: &str) -> Result<(), DeviceError> {
        let missing = |backend, how| DeviceError::NotBuilt {
            name: name.to_owned(),
            backend,
            how,
            supported: supported(),
        };
        match self {
            DeviceChoice::Cpu => Ok(()),
            DeviceChoice::Wgpu(_) if cfg!(feature = "wgpu") => Ok(()),
            DeviceChoice::Wgpu(_) => Err(missing("wgpu", "rebuild with `cargo build --release --features wgpu`")),
            DeviceChoice::Cuda(_) => Err(missing(
                "CUDA",
                "burn's CUDA backend is not wired into burnrun yet; use `cpu` or `wgpu`",
            )),
        }
    }

    /// Whether this is burn's flex CPU backend (whose thread pool the trainer sizes).
    pub fn is_cpu(self) -> bool {
        self == DeviceChoice::Cpu
    }

    /// The autodiff device for the rank with this `local_rank`.
    pub fn device(self, name: &str, local_rank: usize) -> Result<Device, DeviceError> {
        self.check_built(name)?;
        Ok(match self {
            DeviceChoice::Cpu => Device::flex().autodiff(),
            #[cfg(feature = "wgpu")]
            DeviceChoice::Wgpu(adapter) => {
                use burn::tensor::DeviceKind;
                let kind = match adapter {
                    WgpuAdapter::Default => DeviceKind::DefaultDevice,
                    WgpuAdapter::Discrete => DeviceKind::DiscreteGpu(local_rank),
                    WgpuAdapter::Integrated => DeviceKind::IntegratedGpu(local_rank),
                    WgpuAdapter::Cpu => DeviceKind::Cpu,
                };
                Device::wgpu(kind).autodiff()
            }
            // `check_built` refused the backends this build lacks.
            _ => {
                let _ = local_rank;
                return Err(DeviceError::Unknown {
                    name: name.to_owned(),
                    supported: supported(),
                });
            }
        })
    }
}

/// The device names this build accepts, for messages.
pub fn supported() -> String {
    if cfg!(feature = "wgpu") {
        "`cpu` (or `flex`), `wgpu`, `wgpu:discrete`, `wgpu:integrated`, `wgpu:cpu`".into()
    } else {
        "`cpu` (or `flex`); `wgpu` with the `wgpu` feature".into()
    }
}

/// This rank's training device for a hand-written loop: `BURNRUN_DEVICE` (default `cpu`), the
/// local rank's one where the kind has several (see the module docs). The trainer uses
/// `train.device` instead.
pub fn device() -> Result<Device, crate::Error> {
    let env = crate::env::DistEnv::from_env()?;
    let name = crate::env::device_name().unwrap_or_else(|| "cpu".to_owned());
    Ok(DeviceChoice::parse(&name)?.device(&name, env.local_rank)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_name_parses_and_others_are_refused_with_the_list() {
        assert_eq!(DeviceChoice::parse("flex"), Ok(DeviceChoice::Cpu));
        assert_eq!(
            DeviceChoice::parse("wgpu:discrete"),
            Ok(DeviceChoice::Wgpu(WgpuAdapter::Discrete))
        );
        assert_eq!(DeviceChoice::parse("cuda:3"), Ok(DeviceChoice::Cuda(Some(3))));
        let err = DeviceChoice::parse("tpu").unwrap_err().to_string();
        assert!(err.contains("`tpu`") && err.contains("`cpu`"), "{err}");
        assert!(DeviceChoice::parse("cuda:x").is_err());
    }

    #[test]
    fn cuda_is_an_error_that_names_what_this_build_supports() {
        let err = DeviceChoice::parse_built("cuda:0").unwrap_err().to_string();
        assert!(
            err.contains("`cuda:0`") && err.contains("no CUDA backend") && err.contains("`cpu`"),
            "{err}"
        );
    }
}
