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

use crate::config::{DeviceSpec, WgpuAdapter};

/// A device this build cannot give.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// The name is not a device at all.
    #[error("device `{name}`: unknown; this build supports {supported}")]
    Unknown {
        /// The name given.
        name: String,
        /// The names this build accepts.
        supported: &'static str,
    },
    /// The backend exists, but this build cannot create it.
    #[error("device `{spec}`: {why}; this build supports {supported}")]
    NotBuilt {
        /// The device asked for.
        spec: DeviceSpec,
        /// Which backend is missing and how to get it.
        why: String,
        /// The names this build accepts.
        supported: &'static str,
    },
}

/// The autodiff device named `spec` for the rank with this `local_rank`.
pub fn device_for(spec: DeviceSpec, local_rank: usize) -> Result<Device, DeviceError> {
    base_device(spec, local_rank).map(Device::autodiff)
}

/// The device named `spec` without autodiff, for callers that configure it first (a compute
/// dtype must be set before any tensor exists on it).
pub fn base_device(spec: DeviceSpec, local_rank: usize) -> Result<Device, DeviceError> {
    spec.check_built().map_err(|why| DeviceError::NotBuilt {
        spec,
        why,
        supported: DeviceSpec::supported(),
    })?;
    Ok(match spec {
        DeviceSpec::Cpu | DeviceSpec::Flex => Device::flex(),
        #[cfg(feature = "wgpu")]
        DeviceSpec::Wgpu(adapter) => {
            use burn::tensor::DeviceKind;
            let kind = match adapter {
                WgpuAdapter::Default => DeviceKind::DefaultDevice,
                WgpuAdapter::Discrete => DeviceKind::DiscreteGpu(local_rank),
                WgpuAdapter::Integrated => DeviceKind::IntegratedGpu(local_rank),
                WgpuAdapter::Cpu => DeviceKind::Cpu,
            };
            Device::wgpu(kind)
        }
        // `check_built` refused every backend this build lacks.
        other => {
            let _ = (local_rank, WgpuAdapter::Default);
            return Err(DeviceError::NotBuilt {
                spec: other,
                why: "not built".into(),
                supported: DeviceSpec::supported(),
            });
        }
    })
}

/// This rank's training device for a hand-written loop: `BURNRUN_DEVICE` (default `cpu`), the
/// local rank's one where the kind has several (see the module docs). The trainer reads
/// `train.device` instead.
pub fn device() -> Result<Device, crate::Error> {
    let env = crate::env::DistEnv::from_env()?;
    let name = crate::env::device_name().unwrap_or_else(|| "cpu".to_owned());
    let spec = DeviceSpec::parse(&name).ok_or_else(|| DeviceError::Unknown {
        name: name.clone(),
        supported: DeviceSpec::supported(),
    })?;
    Ok(device_for(spec, env.local_rank)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_name_parses_and_others_are_not_devices() {
        assert_eq!(DeviceSpec::parse("flex"), Some(DeviceSpec::Flex));
        assert_eq!(
            DeviceSpec::parse("wgpu:discrete"),
            Some(DeviceSpec::Wgpu(WgpuAdapter::Discrete))
        );
        assert_eq!(DeviceSpec::parse("cuda:3"), Some(DeviceSpec::Cuda(Some(3))));
        assert_eq!(DeviceSpec::parse("tpu"), None);
        assert_eq!(DeviceSpec::parse("cuda:x"), None);
        for name in [
            "cpu",
            "flex",
            "wgpu",
            "wgpu:discrete",
            "wgpu:integrated",
            "wgpu:cpu",
            "cuda",
            "cuda:1",
        ] {
            assert_eq!(DeviceSpec::parse(name).map(|d| d.to_string()).as_deref(), Some(name));
        }
    }

    #[test]
    fn cuda_is_an_error_that_names_what_this_build_supports() {
        let err = device_for(DeviceSpec::Cuda(Some(0)), 0).unwrap_err().to_string();
        assert!(
            err.contains("`cuda:0`") && err.contains("no GPU backend") && err.contains("\"cpu\""),
            "{err}"
        );
    }
}
