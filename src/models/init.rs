//! Deterministic parameter initialisation.
//!
//! burn's own initialisers are lazy (a parameter is drawn on first use, from the device's global
//! generator), so the values would depend on the order in which a process first touches its
//! parameters and on other threads sharing the device. Every rank must build identical replicas,
//! and a pipeline stage that builds only its own blocks must get the same values as the full model.
//! So each block draws its parameters eagerly, in a fixed order, from its own generator derived
//! from `(seed, block index)`.

use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::{Device, Tensor, TensorData};

use crate::rng::SplitMix64;

/// The generator of block `block` of a model built with `seed`.
pub(crate) fn block_rng(seed: u64, block: usize) -> SplitMix64 {
    SplitMix64::derive(seed, block as u64)
}

/// A trainable parameter of `shape` with values from `draw`.
pub(crate) fn param<const D: usize>(
    shape: [usize; D],
    device: &Device,
    mut draw: impl FnMut() -> f32,
) -> Param<Tensor<D>> {
    let numel = shape.iter().product();
    let values: Vec<f32> = (0..numel).map(|_| draw()).collect();
    Param::from_tensor(Tensor::from_data(TensorData::new(values, shape), device))
}

/// PyTorch's default for linear and convolution layers: weights and bias uniform in
/// `±1/sqrt(fan_in)`.
pub(crate) fn uniform_param<const D: usize>(
    shape: [usize; D],
    fan_in: usize,
    rng: &mut SplitMix64,
    device: &Device,
) -> Param<Tensor<D>> {
    let bound = 1.0 / (fan_in as f32).sqrt();
    param(shape, device, || rng.uniform(bound))
}

/// Normal with standard deviation `std` (GPT-2's 0.02 for weights and embeddings).
pub(crate) fn normal_param<const D: usize>(
    shape: [usize; D],
    std: f32,
    rng: &mut SplitMix64,
    device: &Device,
) -> Param<Tensor<D>> {
    param(shape, device, || rng.normal() * std)
}

/// Every value equal to `value` (layer-norm scales and shifts, GPT biases).
pub(crate) fn constant_param<const D: usize>(shape: [usize; D], value: f32, device: &Device) -> Param<Tensor<D>> {
    param(shape, device, || value)
}

/// A linear layer `[d_input, d_output]` (burn's layout: `y = x W + b`) with PyTorch's default
/// uniform initialisation: weight first, then bias.
pub(crate) fn linear_uniform(d_input: usize, d_output: usize, rng: &mut SplitMix64, device: &Device) -> Linear {
    let weight = uniform_param([d_input, d_output], d_input, rng, device);
    let bias = uniform_param([d_output], d_input, rng, device);
    Linear {
        weight,
        bias: Some(bias),
    }
}

/// A linear layer with GPT-2's initialisation: normal(0, `std`) weights, zero bias if any.
pub(crate) fn linear_normal(
    d_input: usize,
    d_output: usize,
    std: f32,
    bias: bool,
    rng: &mut SplitMix64,
    device: &Device,
) -> Linear {
    let weight = normal_param([d_input, d_output], std, rng, device);
    let bias = bias.then(|| constant_param([d_output], 0.0, device));
    Linear { weight, bias }
}
