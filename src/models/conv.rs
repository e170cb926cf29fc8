//! A convolution block: 3x3 convolution (padding 1), ReLU, 2x2 max pooling.

use burn::module::{Module, Param};
use burn::tensor::activation::relu;
use burn::tensor::module::{conv2d, max_pool2d};
use burn::tensor::ops::{ConvOptions, MaxPoolOptions};
use burn::tensor::{Device, Tensor};

use super::init::uniform_param;
use crate::rng::SplitMix64;

/// Side of the square convolution kernel.
pub(crate) const KERNEL: usize = 3;
/// Side of the square pooling window (and its stride).
const POOL: usize = 2;

/// `[c_in, h, w] -> [c_out, h/2, w/2]` (floor), flattened on both sides so that every activation
/// between blocks is a `[batch, features]` tensor.
/// Parameters: `weight` `[c_out, c_in, 3, 3]`, `bias` `[c_out]`.
#[derive(Module, Debug)]
pub struct ConvBlock {
    /// Convolution kernels, `[c_out, c_in, 3, 3]`.
    pub weight: Param<Tensor<4>>,
    /// One bias per output channel, `[c_out]`.
    pub bias: Param<Tensor<1>>,
    /// The per-sample input shape `[c_in, h, w]`.
    #[module(skip)]
    pub input: [usize; 3],
}

impl ConvBlock {
    /// A block reading `[c_in, h, w]` images and producing `c_out` channels, drawing its
    /// parameters (weight first, then bias) from `rng`.
    pub(crate) fn new(input: [usize; 3], c_out: usize, rng: &mut SplitMix64, device: &Device) -> Self {
        let fan_in = input[0] * KERNEL * KERNEL;
        let weight = uniform_param([c_out, input[0], KERNEL, KERNEL], fan_in, rng, device);
        let bias = uniform_param([c_out], fan_in, rng, device);
        Self { weight, bias, input }
    }

    /// The per-sample output shape `[c_out, h/2, w/2]`.
    pub fn output_shape(&self) -> [usize; 3] {
        let c_out = self.weight.lazy_shape()[0];
        Self::output_shape_for(self.input, c_out)
    }

    /// The per-sample output shape of a block with this input and `c_out` channels.
    pub(crate) fn output_shape_for(input: [usize; 3], c_out: usize) -> [usize; 3] {
        [c_out, input[1] / POOL, input[2] / POOL]
    }

    /// `[batch, c_in*h*w] -> [batch, c_out*(h/2)*(w/2)]`.
    pub(crate) fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let [batch, _] = x.dims();
        let [c_in, h, w] = self.input;
        let images = x.reshape([batch, c_in, h, w]); // [batch, c_in, h, w]
        let padding = KERNEL / 2;
        let options = ConvOptions::new([1, 1], [padding, padding], [1, 1], 1);
        let y = conv2d(images, self.weight.val(), Some(self.bias.val()), options); // [batch, c_out, h, w]
        let y = max_pool2d(relu(y), MaxPoolOptions::new([POOL, POOL])); // [batch, c_out, h/2, w/2]
        let [c_out, h_out, w_out] = self.output_shape();
        y.reshape([batch, c_out * h_out * w_out])
    }
}
