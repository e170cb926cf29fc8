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
//! | `cuda`, `cuda:N` | burn's CUDA backend (feature `cuda`) | GPU r (or N): torchrun's one GPU per rank |
//!
//! A name this build cannot serve is an error that says what it supports, never a silent fall
//! back to the CPU. Every device returned tracks gradients (`.autodiff()`): it is for training.

use burn::tensor::Device;

use crate::config::DeviceSpec;
#[cfg(feature = "wgpu")]
use crate::config::WgpuAdapter;

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
    /// The local rank asks for an adapter beyond those present.
    #[error(
        "device `{spec}`: LOCAL_RANK {local_rank} asks for adapter #{local_rank}, but this node has {count} \
         ({adapters}); start at most {count} rank(s) per node or use `wgpu` to share one adapter"
    )]
    NoSuchAdapter {
        /// The device asked for.
        spec: DeviceSpec,
        /// This rank's local rank.
        local_rank: usize,
        /// Adapters of that kind found.
        count: usize,
        /// Every adapter found, by name and kind.
        adapters: String,
    },
    /// The CUDA device this rank asks for is not there (no driver, or fewer GPUs).
    #[error("device `{spec}`: LOCAL_RANK {local_rank} asks for CUDA device {ordinal}, but {found}")]
    NoCudaDevice {
        /// The device asked for.
        spec: DeviceSpec,
        /// This rank's local rank.
        local_rank: usize,
        /// The device number asked for.
        ordinal: usize,
        /// What was found instead.
        found: String,
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
#[cfg_attr(not(feature = "wgpu"), allow(unused_variables))]
pub fn base_device(spec: DeviceSpec, local_rank: usize) -> Result<Device, DeviceError> {
    match spec {
        DeviceSpec::Cpu | DeviceSpec::Flex => Ok(Device::flex()),
        #[cfg(feature = "wgpu")]
        DeviceSpec::Wgpu(adapter) => {
            use burn::tensor::DeviceKind;
            check_adapter(spec, adapter, local_rank)?;
            let kind = match adapter {
                WgpuAdapter::Default => DeviceKind::DefaultDevice,
                WgpuAdapter::Discrete => DeviceKind::DiscreteGpu(local_rank),
                WgpuAdapter::Integrated => DeviceKind::IntegratedGpu(local_rank),
                WgpuAdapter::Cpu => DeviceKind::Cpu,
            };
            Ok(Device::wgpu(kind))
        }
        #[cfg(feature = "cuda")]
        DeviceSpec::Cuda(index) => {
            let ordinal = index.unwrap_or(local_rank);
            check_cuda(spec, ordinal, local_rank)?;
            Ok(Device::cuda(ordinal))
        }
        // A backend this build lacks: `check_built` says which and how to get it.
        _ => Err(DeviceError::NotBuilt {
            spec,
            why: spec.check_built().err().unwrap_or_else(|| "not built".into()),
            supported: DeviceSpec::supported(),
        }),
    }
}

/// Counts the CUDA devices first: burn panics on a driver or device that is not there.
#[cfg(feature = "cuda")]
fn check_cuda(spec: DeviceSpec, ordinal: usize, local_rank: usize) -> Result<(), DeviceError> {
    let no_device = |found: String| DeviceError::NoCudaDevice {
        spec,
        local_rank,
        ordinal,
        found,
    };
    let count = crate::env::cuda_device_count().map_err(no_device)?;
    if ordinal < count {
        return Ok(());
    }
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").map_or_else(|_| "not set".into(), |v| format!("{v:?}"));
    Err(no_device(format!(
        "this node shows {count} (CUDA_VISIBLE_DEVICES {visible}); start at most {count} rank(s) per node"
    )))
}

/// Counts the wgpu adapters of the kind asked for: burn panics on one that does not exist.
#[cfg(feature = "wgpu")]
fn check_adapter(spec: DeviceSpec, adapter: WgpuAdapter, local_rank: usize) -> Result<(), DeviceError> {
    use wgpu::DeviceType;
    let instance = wgpu::Instance::default();
    let listing = block_on(
        instance.enumerate_adapters(wgpu::Backends::all()),
        ADAPTER_LIST_DEADLINE,
    );
    let Some(adapters) = listing else {
        return Err(DeviceError::NoSuchAdapter {
            spec,
            local_rank,
            count: 0,
            adapters: format!("the adapter list did not come within {ADAPTER_LIST_DEADLINE:?}"),
        });
    };
    let infos: Vec<wgpu::AdapterInfo> = adapters.iter().map(|a| a.get_info()).collect();
    let wanted = |t: DeviceType| match adapter {
        WgpuAdapter::Default => true,
        WgpuAdapter::Discrete => t == DeviceType::DiscreteGpu,
        WgpuAdapter::Integrated => t == DeviceType::IntegratedGpu,
        WgpuAdapter::Cpu => t == DeviceType::Cpu,
    };
    let count = infos.iter().filter(|i| wanted(i.device_type)).count();
    // `wgpu` and `wgpu:cpu` share one adapter among the node's ranks; the others take the
    // local rank's.
    let index = match adapter {
        WgpuAdapter::Default | WgpuAdapter::Cpu => 0,
        WgpuAdapter::Discrete | WgpuAdapter::Integrated => local_rank,
    };
    if index < count {
        return Ok(());
    }
    let listed: Vec<String> = infos
        .iter()
        .map(|i| format!("{} ({:?}, {:?})", i.name, i.device_type, i.backend))
        .collect();
    Err(DeviceError::NoSuchAdapter {
        spec,
        local_rank,
        count,
        adapters: if listed.is_empty() {
            "no adapter at all: install a Vulkan driver, e.g. Debian's mesa-vulkan-drivers".into()
        } else {
            listed.join(", ")
        },
    })
}

/// How long listing the wgpu adapters may take (it asks the drivers, which answer at once).
#[cfg(feature = "wgpu")]
const ADAPTER_LIST_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs a future that completes without waiting on anything outside (wgpu's native adapter list
/// is ready at the first poll), polling again until `deadline`; `None` past it.
#[cfg(feature = "wgpu")]
fn block_on<F: std::future::Future>(future: F, deadline: std::time::Duration) -> Option<F::Output> {
    let start = std::time::Instant::now();
    let mut future = std::pin::pin!(future);
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(out) = future.as_mut().poll(&mut context) {
            return Some(out);
        }
        if start.elapsed() >= deadline {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
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
    use crate::config::WgpuAdapter;

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

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_is_an_error_that_names_what_this_build_supports() {
        let err = device_for(DeviceSpec::Cuda(Some(0)), 0).unwrap_err().to_string();
        assert!(
            err.contains("`cuda:0`") && err.contains("--features cuda") && err.contains("\"cpu\""),
            "{err}"
        );
    }
}
