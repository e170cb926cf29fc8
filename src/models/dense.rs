//! A fully connected block: `linear`, then ReLU unless it is the model's last block.

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};

use super::init::linear_uniform;
use crate::rng::SplitMix64;

/// `y = relu(x W + b)` (or without the ReLU for a final classifier layer).
/// Parameters: `linear.weight` `[d_input, d_output]`, `linear.bias` `[d_output]`.
#[derive(Module, Debug)]
pub struct DenseBlock {
    /// The affine map.
    pub linear: Linear,
    /// Whether a ReLU follows (false on the layer that produces logits).
    #[module(skip)]
    pub relu: bool,
}

impl DenseBlock {
    /// A block `d_input -> d_output`, drawing its parameters from `rng`.
    pub(crate) fn new(d_input: usize, d_output: usize, relu: bool, rng: &mut SplitMix64, device: &Device) -> Self {
        Self {
            linear: linear_uniform(d_input, d_output, rng, device),
            relu,
        }
    }

    /// The input width this block accepts.
    pub fn d_input(&self) -> usize {
        self.linear.weight.lazy_shape()[0]
    }

    /// `[batch, d_input] -> [batch, d_output]`.
    pub(crate) fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let y = self.linear.forward(x); // [batch, d_output]
        if self.relu {
            relu(y)
        } else {
            y
        }
    }
}
