//! A slice of a burn model run micro-batch by micro-batch: the compute side of data and
//! pipeline parallelism alike (a whole model is a pipeline of one stage).

use std::collections::HashMap;
use std::ops::Range;

use burn::optim::GradientsParams;
use burn::tensor::{Device, Gradients, Tensor, TensorData};

use crate::data::Batch;
use crate::models::BlockStack;
use crate::parallel::flatten_grads_into;
use crate::parallel::{Activation, PipelineError, StageCompute};

/// What a forward keeps until its backward.
struct Held {
    /// The received activation, a leaf whose gradient goes back to the previous stage.
    input: Option<Tensor<2>>,
    /// The stage's output: the loss on the last stage, an activation elsewhere.
    output: HeldOutput,
}

enum HeldOutput {
    Loss(Tensor<1>),
    Activation(Tensor<2>),
}

/// Runs the blocks `range` of `model` on micro-batches of `batch`.
pub(crate) struct StageRunner<'a> {
    pub(crate) model: &'a BlockStack,
    pub(crate) range: Range<usize>,
    pub(crate) device: Device,
    /// This rank's batch for the step (`micro_batches * micro_size` samples). Only the first
    /// stage reads inputs and only the last one targets, but every stage gets the same batch.
    pub(crate) batch: &'a Batch,
    pub(crate) micro_size: usize,
    pub(crate) first: bool,
    pub(crate) last: bool,
    /// Sum of this stage's parameter gradients over the micro-batches.
    pub(crate) grads: &'a mut Vec<f32>,
    /// Scratch for one backward's gradients.
    pub(crate) scratch: Vec<f32>,
    /// Sum of micro-batch losses (last stage only).
    pub(crate) loss_sum: f64,
    /// Number of losses summed.
    pub(crate) loss_count: usize,
    /// Time in forward and backward, seconds.
    pub(crate) compute_secs: f64,
    /// The loss is multiplied by this before backward (dynamic loss scaling; 1 without it).
    pub(crate) loss_scale: f32,
    held: HashMap<usize, Held>,
}

impl<'a> StageRunner<'a> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        model: &'a BlockStack,
        range: Range<usize>,
        device: Device,
        batch: &'a Batch,
        micro_size: usize,
        first: bool,
        last: bool,
        grads: &'a mut Vec<f32>,
    ) -> Self {
        Self {
            model,
            range,
            device,
            batch,
            micro_size,
            first,
            last,
            grads,
            scratch: Vec::new(),
            loss_sum: 0.0,
            loss_count: 0,
            compute_secs: 0.0,
            loss_scale: 1.0,
            held: HashMap::new(),
        }
    }

    fn err(&self, source: impl std::fmt::Display) -> PipelineError {
        PipelineError::Compute {
            stage: self.range.start,
            reason: source.to_string(),
        }
    }

    fn to_activation(t: &Tensor<2>) -> Result<Activation, String> {
        let shape = t.dims().to_vec();
        let data = t
            .clone()
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| format!("{e:?}"))?;
        Ok(Activation { shape, data })
    }

    fn activation_tensor(&self, a: Activation) -> Tensor<2> {
        Tensor::from_data(TensorData::new(a.data, a.shape), &self.device)
    }

    /// Adds this backward's parameter gradients into the accumulator.
    fn accumulate(&mut self, grads: Gradients) -> Result<(), PipelineError> {
        let params = GradientsParams::from_grads(grads, self.model);
        // The step's first backward writes straight into the accumulator, which keeps its
        // capacity from step to step: no scratch buffer to grow (and fault in) every step, and no
        // pass adding the gradients into zeros.
        if self.grads.is_empty() {
            return flatten_grads_into(self.model, &params, self.grads).map_err(|e| self.err(e));
        }
        self.scratch.clear();
        flatten_grads_into(self.model, &params, &mut self.scratch).map_err(|e| self.err(e))?;
        if self.grads.is_empty() {
            self.grads.resize(self.scratch.len(), 0.0);
        }
        for (acc, g) in self.grads.iter_mut().zip(&self.scratch) {
            *acc += g;
        }
        Ok(())
    }
}

impl StageCompute for StageRunner<'_> {
    fn forward(&mut self, micro: usize, input: Option<Activation>) -> Result<Option<Activation>, PipelineError> {
        let started = std::time::Instant::now();
        let start = micro * self.micro_size;
        let leaf = input.map(|a| self.activation_tensor(a).require_grad());
        let x = match &leaf {
            Some(x) => x.clone(),
            None => self.batch.inputs.clone().narrow(0, start, self.micro_size),
        };
        let out = self
            .model
            .forward_range(x, self.range.clone())
            .map_err(|e| self.err(e))?;
        let result = if self.last {
            let targets = self.batch.targets.clone().narrow(0, start, self.micro_size);
            let loss = self.model.loss(out, targets).map_err(|e| self.err(e))?;
            let value = loss
                .clone()
                .into_data()
                .convert::<f32>()
                .as_slice::<f32>()
                .map_or(f64::NAN, |v| v[0] as f64);
            self.loss_sum += value;
            self.loss_count += 1;
            self.held.insert(
                micro,
                Held {
                    input: leaf,
                    output: HeldOutput::Loss(loss),
                },
            );
            None
        } else {
            let activation = Self::to_activation(&out).map_err(|reason| PipelineError::Compute {
                stage: self.range.start,
                reason,
            })?;
            self.held.insert(
                micro,
                Held {
                    input: leaf,
                    output: HeldOutput::Activation(out),
                },
            );
            Some(activation)
        };
        self.compute_secs += started.elapsed().as_secs_f64();
        Ok(result)
    }

    fn backward(&mut self, micro: usize, grad_output: Option<Activation>) -> Result<Option<Activation>, PipelineError> {
        let started = std::time::Instant::now();
        let held = self.held.remove(&micro).ok_or_else(|| PipelineError::Compute {
            stage: self.range.start,
            reason: format!("backward of micro-batch {micro} before its forward"),
        })?;
        let grads = match held.output {
            HeldOutput::Loss(loss) if self.loss_scale == 1.0 => loss.backward(),
            HeldOutput::Loss(loss) => (loss * self.loss_scale).backward(),
            HeldOutput::Activation(out) => {
                let upstream = grad_output.ok_or_else(|| PipelineError::Compute {
                    stage: self.range.start,
                    reason: format!("backward of micro-batch {micro} got no output gradient"),
                })?;
                // d(sum(out * g))/d(theta) = g^T d(out)/d(theta): back-propagates g exactly.
                let g = self.activation_tensor(upstream);
                (out * g).sum().backward()
            }
        };
        let input_grad = match &held.input {
            Some(leaf) => {
                let g = leaf.grad(&grads).ok_or_else(|| PipelineError::Compute {
                    stage: self.range.start,
                    reason: format!("micro-batch {micro}: the received activation got no gradient"),
                })?;
                Some(Self::to_activation(&g).map_err(|reason| PipelineError::Compute {
                    stage: self.range.start,
                    reason,
                })?)
            }
            None => None,
        };
        self.accumulate(grads)?;
        self.compute_secs += started.elapsed().as_secs_f64();
        Ok(if self.first { None } else { input_grad })
    }
}
