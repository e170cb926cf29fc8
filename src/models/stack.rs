//! A model as a sequence of blocks, possibly only a slice of them (a pipeline stage).

use std::ops::Range;

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor};

use super::block::Block;
use super::error::ModelError;
use super::loss::cross_entropy;
use super::spec::ModelSpec;

/// A built-in model as a sequence of blocks, or a contiguous slice of them.
///
/// `blocks` always has one entry per block of the FULL model; a slice holds `None` outside its
/// range. So block `i`'s parameters are named `blocks.<i>.…` in the full model and in every slice
/// (burn's `Vec` and `Option` modules give exactly that path), and a checkpoint written by any
/// pipeline layout loads into any other by name.
///
/// Activations between blocks are `Tensor<2>` `[batch, features]` (see [`ModelSpec`] for each
/// model's widths), so a pipeline sends `[batch, width]` f32 buffers and splits micro-batches on
/// dim 0.
#[derive(Module, Debug)]
pub struct BlockStack {
    /// One entry per block of the full model; `None` where this slice does not hold the block.
    pub blocks: Vec<Option<Block>>,
    /// What the full model is.
    #[module(skip)]
    spec: ModelSpec,
    /// The blocks this value holds (`0..num_blocks` for a full model).
    #[module(skip)]
    held: Range<usize>,
}

impl BlockStack {
    /// Builds the full model on `device` (use an autodiff device to train). Every block draws its
    /// parameters from a generator derived from `(seed, block index)`, so every rank that calls
    /// this with the same arguments holds an identical replica.
    pub fn new(spec: ModelSpec, seed: u64, device: &Device) -> Result<Self, ModelError> {
        let range = 0..spec.num_blocks();
        Self::new_range(spec, range, seed, device)
    }

    /// Builds only the blocks in `range` (a pipeline stage): the values equal those of the same
    /// blocks in [`BlockStack::new`] with the same seed, and the other blocks are never allocated.
    pub fn new_range(spec: ModelSpec, range: Range<usize>, seed: u64, device: &Device) -> Result<Self, ModelError> {
        Self::new_range_tp(spec, range, seed, device, (0, 1))
    }

    /// [`BlockStack::new_range`] as tensor-parallel rank `tensor.0` of `tensor.1` holds it: each
    /// GPT transformer layer is that rank's share ([`crate::models::TpTransformerBlock`], built
    /// whole with the same draws and sliced), every other block whole.
    pub fn new_range_tp(
        spec: ModelSpec,
        range: Range<usize>,
        seed: u64,
        device: &Device,
        tensor: (usize, usize),
    ) -> Result<Self, ModelError> {
        spec.validate()?;
        spec.check_range(&range)?;
        let blocks = (0..spec.num_blocks())
            .map(|i| range.contains(&i).then(|| spec.build_block_tp(i, seed, device, tensor)))
            .collect();
        Ok(Self {
            blocks,
            spec,
            held: range,
        })
    }

    /// An MLP `input -> hidden[0] -> … -> classes` (see [`ModelSpec::Mlp`]).
    pub fn mlp(input: usize, hidden: &[usize], classes: usize, seed: u64, device: &Device) -> Result<Self, ModelError> {
        let spec = ModelSpec::Mlp {
            input,
            hidden: hidden.to_vec(),
            classes,
        };
        Self::new(spec, seed, device)
    }

    /// A small CNN on `[c, h, w]` images (see [`ModelSpec::Cnn`]).
    pub fn cnn(
        input: [usize; 3],
        channels: &[usize],
        hidden: &[usize],
        classes: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let spec = ModelSpec::Cnn {
            input,
            channels: channels.to_vec(),
            hidden: hidden.to_vec(),
            classes,
        };
        Self::new(spec, seed, device)
    }

    /// A small character-level GPT (see [`ModelSpec::Gpt`]).
    pub fn gpt(
        vocab: usize,
        block_size: usize,
        n_layer: usize,
        n_head: usize,
        n_embd: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let spec = ModelSpec::Gpt {
            vocab,
            block_size,
            n_layer,
            n_head,
            n_embd,
        };
        Self::new(spec, seed, device)
    }

    /// What the full model is.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Number of blocks of the FULL model (a slice counts the blocks it does not hold too).
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// The blocks this value holds.
    pub fn held(&self) -> Range<usize> {
        self.held.clone()
    }

    /// Whether this value holds the first block (it reads the data).
    pub fn holds_input(&self) -> bool {
        self.held.start == 0
    }

    /// Whether this value holds the last block (it produces the logits and computes the loss).
    pub fn holds_output(&self) -> bool {
        self.held.end == self.num_blocks()
    }

    /// Block `index`, if held.
    pub fn block(&self, index: usize) -> Option<&Block> {
        self.blocks.get(index).and_then(Option::as_ref)
    }

    /// Parameter values of every block of the full model (held or not), in block order.
    pub fn block_param_counts(&self) -> Vec<usize> {
        self.spec.block_param_counts()
    }

    /// Keeps only the blocks in `range` (which must lie inside [`BlockStack::held`]); the kept
    /// blocks keep their parameters, ids and names.
    pub fn slice(mut self, range: Range<usize>) -> Result<Self, ModelError> {
        self.spec.check_range(&range)?;
        if range.start < self.held.start || range.end > self.held.end {
            let block = if range.start < self.held.start {
                range.start
            } else {
                self.held.end
            };
            return Err(ModelError::BlockNotHeld {
                model: self.spec.name(),
                block,
                held: self.held,
            });
        }
        for (i, block) in self.blocks.iter_mut().enumerate() {
            if !range.contains(&i) {
                *block = None;
            }
        }
        self.held = range;
        Ok(self)
    }

    /// Runs every held block: for a full model, inputs to logits.
    pub fn forward(&self, x: Tensor<2>) -> Result<Tensor<2>, ModelError> {
        self.forward_range(x, self.held())
    }

    /// Runs blocks `range` (all held) on `x`, the activation entering block `range.start`, and
    /// returns the activation leaving block `range.end - 1`. Each block checks its input shape
    /// first, so a mismatch is an error naming the block, not a panic deep inside burn.
    pub fn forward_range(&self, x: Tensor<2>, range: Range<usize>) -> Result<Tensor<2>, ModelError> {
        self.spec.check_range(&range)?;
        let mut x = x;
        for index in range {
            x = self.checked_block(index, x.dims())?.forward(x);
        }
        Ok(x)
    }

    /// Block `index`, held, after checking that it accepts an input of `dims`.
    fn checked_block(&self, index: usize, dims: [usize; 2]) -> Result<&Block, ModelError> {
        let block = self.block(index).ok_or_else(|| ModelError::BlockNotHeld {
            model: self.spec.name(),
            block: index,
            held: self.held(),
        })?;
        block.check_input(dims).map_err(|expected| ModelError::BadInput {
            model: self.spec.name(),
            block: index,
            kind: block.kind(),
            expected,
            got: dims.to_vec(),
        })?;
        Ok(block)
    }

    /// Segments of block `index` (see [`Block::segments`]); 1 for a block not held.
    pub fn segments(&self, index: usize) -> usize {
        self.block(index).map_or(1, Block::segments)
    }

    /// Runs segment `segment` of block `index` (held) on `x`, its input checked first.
    pub fn forward_segment(&self, x: Tensor<2>, index: usize, segment: usize) -> Result<Tensor<2>, ModelError> {
        // Every segment of a block takes the block's input shape.
        Ok(self.checked_block(index, x.dims())?.forward_segment(x, segment))
    }

    /// The mean cross-entropy of the last block's output `logits` `[batch, t * classes]` against
    /// `targets` `[batch, t]` (`t = 1` for classification, `t = seq` for the GPT): one value, shape
    /// `[1]`.
    pub fn loss(&self, logits: Tensor<2>, targets: Tensor<2, Int>) -> Result<Tensor<1>, ModelError> {
        cross_entropy(logits, targets, self.spec.classes())
    }
}
