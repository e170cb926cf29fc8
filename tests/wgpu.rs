//! burn's wgpu backend under burnrun, for real: on this machine it runs on Mesa's software Vulkan
//! driver (lavapipe, `apt-get install mesa-vulkan-drivers`, which `.ci/run` does). Built only with
//! `--features wgpu`; without a Vulkan adapter each test says it is skipped and returns.
#![cfg(feature = "wgpu")]

mod common;

use std::time::Duration;

use burn::nn::{Linear, LinearConfig};
use burn::optim::GradientsParams;
use burn::tensor::{Device, DeviceKind, Tensor, TensorData};
use burnrun::comm::{spawn_ranks, InitOptions};
use burnrun::parallel::flatten_params;
use burnrun::{Ddp, DdpOptions};

/// 2 ranks on wgpu against 1 rank on the CPU, 10 Adam steps of the default MLP: the GPU kernels
/// sum in another order than flex's (tiled matmuls, tree reductions), which moves the last bits
/// of every step; Adam's normalised update keeps that within a few 1e-6 of the weights (measured
/// 4.8e-7 for one MLP on lavapipe against flex, see the GPU notes). 1e-4 leaves room for 10 steps
/// and a world-size change while still catching a wrong average (a factor 2 moves weights by 1e-3).
const WGPU_PARITY_TOLERANCE: f32 = 1e-4;

/// Whether a wgpu adapter exists: creating one panics inside burn when none does.
fn adapter_present() -> bool {
    let probe = std::panic::catch_unwind(|| {
        let device = Device::wgpu(DeviceKind::DefaultDevice);
        let t = Tensor::<1>::from_data(TensorData::new(vec![1.0f32, 2.0], [2]), &device);
        t.sum().into_scalar::<f32>()
    });
    match probe {
        Ok(sum) => sum == 3.0,
        Err(_) => {
            eprintln!("skipped: no wgpu adapter (install mesa-vulkan-drivers for the software one)");
            false
        }
    }
}

/// Points burn's and Mesa's shader caches (`~/.cache` by default) into one folder of this test
/// binary, for this process and the ranks it starts; set before any wgpu device exists, and the
/// same value from every test, so tests running in parallel threads agree.
fn private_caches() {
    let dir = std::env::temp_dir().join(format!("burnrun-wgpu-cache-{}", std::process::id()));
    std::env::set_var("XDG_CACHE_HOME", dir);
}

#[test]
fn ddp_averages_gradients_of_a_model_on_the_wgpu_device() {
    private_caches();
    if !adapter_present() {
        return;
    }
    let options = InitOptions {
        timeout: Duration::from_secs(120),
        ..InitOptions::default()
    };
    let results = spawn_ranks(2, &options, |pg| {
        let device = Device::wgpu(DeviceKind::DefaultDevice).autodiff();
        let layer: Linear = LinearConfig::new(3, 2).init(&device);
        let (layer, mut ddp) = Ddp::new(&pg, layer, DdpOptions::default()).unwrap();
        let x = Tensor::<2>::from_data(TensorData::new(vec![1.0f32 + pg.rank() as f32; 3], [1, 3]), &device);
        let grads = GradientsParams::from_grads(layer.forward(x).sum().backward(), &layer);
        let grads = ddp.sync(&layer, grads).unwrap();
        let weight = grads.get::<2>(layer.weight.id).expect("a gradient for the weight");
        (
            flatten_params(&layer).unwrap(),
            weight.into_data().try_into_vec::<f32>().unwrap(),
        )
    })
    .expect("ranks join");
    assert_eq!(results[0].0, results[1].0, "both ranks hold rank 0's weights");
    // d(sum(x W + b))/dW = x^T 1: every entry is the input value, 1 on rank 0 and 2 on rank 1.
    for (rank, (_, grad)) in results.iter().enumerate() {
        assert!(grad.iter().all(|g| (g - 1.5).abs() < 1e-6), "rank {rank}: {grad:?}");
    }
}

#[test]
fn training_on_two_wgpu_ranks_matches_one_cpu_rank() {
    private_caches();
    if !adapter_present() {
        return;
    }
    let out = common::out_dir("wgpu-parity");
    let run = |nproc: usize, device: &str, folder: &str| {
        let dir = out.join(folder);
        // The global batch is the same: 2 ranks x 16 against 1 rank x 32.
        let batch = if nproc == 2 { "16" } else { "32" };
        let mut args = common::train_args(
            nproc,
            &common::config("mlp_synthetic.toml"),
            &dir,
            &common::sets(&["train.steps=10", "log.every_steps=5", "train.check_replicas_every=5"]),
        );
        for set in [format!("train.device={device}"), format!("train.batch_size={batch}")] {
            args.push("--set".into());
            args.push(set);
        }
        common::burnrun(&args).assert_success(&format!("{nproc} rank(s) on {device}"));
        common::final_params(&dir)
    };
    let cpu = run(1, "cpu", "cpu");
    let wgpu = run(2, "wgpu", "wgpu");
    common::assert_params_close(&cpu, &wgpu, WGPU_PARITY_TOLERANCE, "2 ranks on wgpu vs 1 rank on cpu");
}

#[test]
fn a_local_rank_beyond_the_adapters_of_its_kind_is_an_error_naming_it_and_what_exists() {
    use burnrun::config::{DeviceSpec, WgpuAdapter};
    private_caches();
    if !adapter_present() {
        return;
    }
    // Lavapipe is a CPU adapter: a discrete GPU for local rank 3 does not exist here. (On a machine
    // with four discrete GPUs this would be a device, which is the point of the check.)
    match burnrun::device::device_for(DeviceSpec::Wgpu(WgpuAdapter::Discrete), 3) {
        Ok(_) => eprintln!("skipped: this machine has at least four discrete GPUs"),
        Err(e) => {
            let text = e.to_string();
            assert!(
                text.contains("LOCAL_RANK 3") && text.contains("wgpu:discrete"),
                "{text}"
            );
        }
    }
    assert!(burnrun::device::device_for(DeviceSpec::Wgpu(WgpuAdapter::Default), 3).is_ok());
}
