//! A slice of a task's block chain run micro-batch by micro-batch: the compute side of a pipeline
//! stage (a whole model is a pipeline of one stage).

use std::collections::HashMap;
use std::ops::Range;

use burn::optim::GradientsParams;
use burn::tensor::{Device, Gradients, Tensor};

use crate::parallel::params::flatten_grads_via_device;
use crate::parallel::{flatten_grads_into, Activation, PipelineError, StageCompute};

use super::device_grads::DeviceGrads;
use super::task::{BlockChain, Task};

/// What a forward keeps until its backward.
struct Held {
    /// The received activation, a leaf whose gradient goes back to the previous stage.
    input: Option<Tensor<2>>,
    /// The stage's output: the loss on the last stage, an activation elsewhere (under tensor
    /// parallelism the last segment's partial output: its gradient is the summed output's).
    output: HeldOutput,
    /// Under tensor parallelism, every segment of the stage in order: its input leaf (none for
    /// the first, whose input is `input`), its partial output, whether it is split over the
    /// group.
    segments: Vec<(Option<Tensor<2>>, Tensor<2>, bool)>,
}

/// The tensor-parallel group of a stage and which of its blocks are split over it.
pub(crate) struct StageTensorParallel<'a> {
    pub(crate) group: &'a crate::comm::ProcessGroup,
    /// `Task::BlockChain::tensor_parallel` of each block of the stage.
    pub(crate) split: Vec<bool>,
}

enum HeldOutput {
    Loss(Tensor<1>),
    Activation(Tensor<2>),
}

/// Runs the blocks `range` of `model` on the micro-batches of one step.
pub(crate) struct StageRunner<'a, T: Task> {
    pub(crate) task: &'a T,
    pub(crate) chain: &'a dyn BlockChain<T::Model, T::Batch>,
    pub(crate) model: &'a T::Model,
    pub(crate) range: Range<usize>,
    pub(crate) device: Device,
    /// This rank's samples of the step, one slice per micro-batch. Only the first stage reads
    /// inputs and only the last one targets; each builds the micro-batch it needs from these.
    pub(crate) micro_indices: Vec<&'a [usize]>,
    pub(crate) first: bool,
    pub(crate) last: bool,
    /// Where each backward's gradients go.
    pub(crate) grads: GradSink<'a>,
    /// Sum of micro-batch losses (last stage only).
    pub(crate) loss_sum: f64,
    /// Number of losses summed.
    pub(crate) loss_count: usize,
    /// Time in forward and backward, seconds.
    pub(crate) compute_secs: f64,
    /// The loss is multiplied by this before backward (dynamic loss scaling; 1 without it).
    pub(crate) loss_scale: f32,
    /// Tensor parallelism: the stage runs segment by segment with the group's sums.
    pub(crate) tensor_parallel: Option<StageTensorParallel<'a>>,
    held: HashMap<usize, Held>,
}

impl<'a, T: Task> StageRunner<'a, T> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        task: &'a T,
        chain: &'a dyn BlockChain<T::Model, T::Batch>,
        model: &'a T::Model,
        range: Range<usize>,
        device: Device,
        micro_indices: Vec<&'a [usize]>,
        (first, last): (bool, bool),
        grads: GradSink<'a>,
    ) -> Self {
        Self {
            task,
            chain,
            model,
            range,
            device,
            micro_indices,
            first,
            last,
            grads,
            loss_sum: 0.0,
            loss_count: 0,
            compute_secs: 0.0,
            loss_scale: 1.0,
            tensor_parallel: None,
            held: HashMap::new(),
        }
    }

    fn err(&self, source: impl std::fmt::Display) -> PipelineError {
        PipelineError::Compute {
            stage: self.range.start,
            reason: source.to_string(),
        }
    }

    fn activation_tensor(&self, a: Activation) -> Tensor<2> {
        a.into_tensor(&self.device)
    }

    fn micro_batch(&self, micro: usize) -> Result<T::Batch, PipelineError> {
        let indices = self
            .micro_indices
            .get(micro)
            .ok_or_else(|| self.err(format!("no micro-batch {micro}")))?;
        self.task.batch(indices, &self.device).map_err(|e| self.err(e))
    }
}

impl<T: Task> StageCompute for StageRunner<'_, T> {
    fn forward(&mut self, micro: usize, input: Option<Activation>) -> Result<Option<Activation>, PipelineError> {
        let started = std::time::Instant::now();
        let leaf = input.map(|a| self.activation_tensor(a).require_grad());
        let batch = if self.first || self.last {
            Some(self.micro_batch(micro)?)
        } else {
            None
        };
        let x = match (&leaf, &batch) {
            (Some(x), _) => x.clone(),
            (None, Some(batch)) => self.chain.input(batch).map_err(|e| self.err(e))?,
            (None, None) => return Err(self.err(format!("micro-batch {micro}: a middle stage got no activation"))),
        };
        let mut segments = Vec::new();
        let out = match &self.tensor_parallel {
            None => self
                .chain
                .forward_range(self.model, x, self.range.clone())
                .map_err(|e| self.err(e))?,
            Some(tp) => {
                // Segment by segment: each input a fresh leaf, a split segment's output summed
                // over the group (the sum is what the next segment and the next stage see).
                let mut x = x;
                for (b, &split) in self.range.clone().zip(&tp.split) {
                    for seg in 0..self.chain.segments(b) {
                        let leaf = (!segments.is_empty()).then(|| x.clone().detach().require_grad());
                        let partial = self
                            .chain
                            .forward_segment(self.model, leaf.clone().unwrap_or(x), b, seg)
                            .map_err(|e| self.err(e))?;
                        x = if split {
                            super::tensor_parallel::sum_over(tp.group, partial.clone()).map_err(|e| self.err(e))?
                        } else {
                            partial.clone()
                        };
                        segments.push((leaf, partial, split));
                    }
                }
                if self.last && segments.last().is_some_and(|(_, _, split)| *split) {
                    return Err(self.err(
                        "the model's last block is split over the tensor-parallel group; the loss needs a whole one",
                    ));
                }
                x
            }
        };
        let (result, output) = match (self.last, &batch) {
            (true, Some(batch)) => {
                let loss = self.chain.loss_of_output(out, batch).map_err(|e| self.err(e))?;
                self.loss_sum += loss_value(&loss);
                self.loss_count += 1;
                (None, HeldOutput::Loss(loss))
            }
            _ => {
                // Under tensor parallelism the last segment's partial output is back-propagated
                // (the gradient of a sum is the gradient of each term).
                let held = segments
                    .last()
                    .map_or_else(|| out.clone(), |(_, partial, _)| partial.clone());
                (Some(Activation::Tensor(Box::new(out))), HeldOutput::Activation(held))
            }
        };
        self.held.insert(
            micro,
            Held {
                input: leaf,
                output,
                segments,
            },
        );
        self.compute_secs += started.elapsed().as_secs_f64();
        Ok(result)
    }

    fn backward(&mut self, micro: usize, grad_output: Option<Activation>) -> Result<Option<Activation>, PipelineError> {
        let started = std::time::Instant::now();
        let held = self
            .held
            .remove(&micro)
            .ok_or_else(|| self.err(format!("backward of micro-batch {micro} before its forward")))?;
        let grads = match held.output {
            HeldOutput::Loss(loss) => scaled(loss, self.loss_scale).backward(),
            HeldOutput::Activation(out) => {
                let upstream = grad_output
                    .ok_or_else(|| self.err(format!("backward of micro-batch {micro} got no output gradient")))?;
                // d(sum(out * g))/d(theta) = g^T d(out)/d(theta): back-propagates g exactly.
                let g = self.activation_tensor(upstream);
                (out * g).sum().backward()
            }
        };
        let input_grad = match &self.tensor_parallel {
            Some(tp) if !held.segments.is_empty() => {
                // Segment by segment back to the stage's input, a split segment's input gradient
                // summed over the group.
                let mut grads = grads;
                let mut segments = held.segments;
                loop {
                    // Invariant: the loop stops when the first segment is done.
                    let (leaf, _, split) = segments.pop().expect("a segment left");
                    let leaf = leaf.as_ref().or(held.input.as_ref().filter(|_| segments.is_empty()));
                    let mut g = match leaf {
                        Some(leaf) => Some(Tensor::from_inner(leaf.grad(&grads).ok_or_else(|| {
                            self.err(format!("micro-batch {micro}: a segment's input got no gradient"))
                        })?)),
                        None => None,
                    };
                    if split {
                        if let Some(partial) = g.take() {
                            g = Some(super::tensor_parallel::sum_over(tp.group, partial).map_err(|e| self.err(e))?);
                        }
                    }
                    self.grads.add(self.model, grads).map_err(|e| self.err(e))?;
                    let Some((_, partial, _)) = segments.last() else {
                        break g.map(|g| Activation::Tensor(Box::new(g.inner())));
                    };
                    let g = g.ok_or_else(|| self.err(format!("micro-batch {micro}: no gradient between segments")))?;
                    grads = (partial.clone() * g).sum().backward();
                }
            }
            _ => {
                let input_grad = match &held.input {
                    Some(leaf) => {
                        let g = leaf.grad(&grads).ok_or_else(|| {
                            self.err(format!("micro-batch {micro}: the received activation got no gradient"))
                        })?;
                        Some(Activation::Tensor(Box::new(g)))
                    }
                    None => None,
                };
                self.grads.add(self.model, grads).map_err(|e| self.err(e))?;
                input_grad
            }
        };
        self.compute_secs += started.elapsed().as_secs_f64();
        Ok(if self.first { None } else { input_grad })
    }
}

/// `loss * scale`, or `loss` itself when the scale is 1 (no extra node in the graph).
pub(crate) fn scaled(loss: Tensor<1>, scale: f32) -> Tensor<1> {
    if scale == 1.0 {
        loss
    } else {
        loss * scale
    }
}

/// The value of a one-element loss tensor (NaN if it cannot be read).
pub(crate) fn loss_value(loss: &Tensor<1>) -> f64 {
    loss.clone()
        .into_data()
        .convert::<f32>()
        .as_slice::<f32>()
        .map_or(f64::NAN, |v| v[0] as f64)
}

/// Where a stage's gradients are summed over a step's backwards.
#[derive(Debug)]
pub(crate) enum GradSink<'a> {
    /// Read to the host after each backward.
    Host(Accumulator<'a>),
    /// Kept on the device until the step's reduction (the NCCL path).
    Device(&'a mut DeviceGrads),
}

impl GradSink<'_> {
    /// Adds the gradients of one backward of `model`.
    pub(crate) fn add<M: burn::module::Module>(
        &mut self,
        model: &M,
        grads: Gradients,
    ) -> Result<(), crate::parallel::ParamError> {
        match self {
            Self::Host(acc) => acc.add(model, grads),
            Self::Device(device) => device.add(model, grads),
        }
    }
}

/// Sums the gradients of every backward of a step into one flat buffer, in the model's layout
/// order (zeros for parameters without a gradient).
#[derive(Debug)]
pub(crate) struct Accumulator<'a> {
    /// The sum so far; emptied, not zeroed, at the start of a step: the step's first backward
    /// writes straight into it, and it keeps its capacity from step to step (no scratch buffer to
    /// grow and fault in every step, no pass adding the first gradients into zeros).
    pub(crate) sum: &'a mut Vec<f32>,
    /// One backward's gradients, when there is already a sum.
    pub(crate) scratch: &'a mut Vec<f32>,
    /// Read the gradients through one buffer on the device (GPU devices: one transfer per
    /// backward instead of one per parameter).
    pub(crate) via_device: bool,
}

impl Accumulator<'_> {
    /// Adds the gradients of one backward of `model`.
    pub(crate) fn add<M: burn::module::Module>(
        &mut self,
        model: &M,
        grads: Gradients,
    ) -> Result<(), crate::parallel::ParamError> {
        let params = GradientsParams::from_grads(grads, model);
        let read = if self.via_device {
            flatten_grads_via_device::<M>
        } else {
            flatten_grads_into::<M>
        };
        if self.sum.is_empty() {
            return read(model, &params, self.sum);
        }
        read(model, &params, self.scratch)?;
        for (acc, g) in self.sum.iter_mut().zip(self.scratch.iter()) {
            *acc += g;
        }
        Ok(())
    }
}
