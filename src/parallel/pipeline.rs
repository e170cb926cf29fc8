//! Pipeline parallelism: schedules (GPipe, 1F1B) and the executor that runs one stage.
//!
//! A model is cut into `stages` consecutive slices of blocks, one per rank of a pipeline group.
//! Each global step feeds `micro_batches` micro-batches through it. Activations flow forward and
//! activation gradients backward with tagged send/recv on the pipeline group: tag `2m` carries
//! micro-batch m's activation, `2m + 1` its gradient. Shapes are agreed once, before the first
//! step, so a mismatch is reported naming both stages instead of surfacing as a size error.
//!
//! - GPipe: every forward, then every backward. A stage holds all M micro-batches' activations.
//! - 1F1B (PipeDream-flush): stage s runs `min(P - s - 1, M)` warm-up forwards, then alternates
//!   one forward and one backward, then drains the remaining backwards. A stage holds at most
//!   `P - s` activations, never more than P, with the same bubble as GPipe.
//!
//! The bubble, (P-1)/(M+P-1) of a step in theory, is measured from the executor's own timers:
//! the time a stage spends blocked waiting for an activation or a gradient.

use std::time::Instant;

use crate::comm::{CommError, ProcessGroup, Work};
use crate::config::PipelineSchedule;

/// One unit of work of a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Forward of micro-batch m.
    Forward(usize),
    /// Backward of micro-batch m.
    Backward(usize),
}

/// The actions of `stage` (of `stages`) for one step of `micro_batches` under `kind`
/// (`parallel.schedule`).
pub fn schedule(kind: PipelineSchedule, stage: usize, stages: usize, micro_batches: usize) -> Vec<Action> {
    let m = micro_batches;
    match kind {
        PipelineSchedule::GPipe => (0..m)
            .map(Action::Forward)
            .chain((0..m).map(Action::Backward))
            .collect(),
        PipelineSchedule::OneFOneB => {
            let warmup = (stages - stage - 1).min(m);
            let mut out: Vec<Action> = (0..warmup).map(Action::Forward).collect();
            for i in 0..m - warmup {
                out.push(Action::Forward(warmup + i));
                out.push(Action::Backward(i));
            }
            out.extend((m - warmup..m).map(Action::Backward));
            out
        }
    }
}

/// Most activations a stage holds at once under a schedule (forwards not yet backwarded).
pub fn peak_in_flight(actions: &[Action]) -> usize {
    let (mut held, mut peak) = (0usize, 0usize);
    for a in actions {
        match a {
            Action::Forward(_) => {
                held += 1;
                peak = peak.max(held);
            }
            Action::Backward(_) => held -= 1,
        }
    }
    peak
}

/// An activation (or an activation's gradient) between two stages.
#[derive(Debug, Clone)]
pub enum Activation {
    /// Values on the host, row-major, with their shape: what the host engine carries.
    Host {
        /// Shape, e.g. `[micro_batch, features]`.
        shape: Vec<usize>,
        /// Values, row-major.
        data: Vec<f32>,
    },
    /// A tensor where the stage computed it: what a device link (NCCL) carries without a host
    /// copy, and what a stage hands over before the link decides.
    #[cfg(feature = "train")]
    Tensor(Box<burn::tensor::Tensor<2>>),
}

impl Activation {
    /// Its shape.
    pub fn shape(&self) -> Vec<usize> {
        match self {
            Self::Host { shape, .. } => shape.clone(),
            #[cfg(feature = "train")]
            Self::Tensor(t) => t.dims().to_vec(),
        }
    }

    /// Its values on the host, row-major (read from the device when it is a tensor).
    pub fn into_host(self) -> Result<Vec<f32>, String> {
        match self {
            Self::Host { data, .. } => Ok(data),
            #[cfg(feature = "train")]
            Self::Tensor(t) => t
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .map_err(|e| format!("reading the activation: {e:?}")),
        }
    }

    /// As a tensor on `device` (uploaded when it is on the host).
    #[cfg(feature = "train")]
    pub fn into_tensor(self, device: &burn::tensor::Device) -> burn::tensor::Tensor<2> {
        match self {
            Self::Host { shape, data } => {
                burn::tensor::Tensor::from_data(burn::tensor::TensorData::new(data, shape), device)
            }
            // A tensor a device link received is on the inner backend: it joins the stage's
            // autodiff graph here.
            Self::Tensor(t) if device.is_autodiff() => t.autodiff(),
            Self::Tensor(t) => *t,
        }
    }
}

/// Errors of the pipeline.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// Adjacent stages disagree on the activation between them.
    #[error(
        "pipeline: stage {from} produces activations of shape {produced:?} but stage {to} expects {expected:?} \
         (check the partition and the micro-batch size)"
    )]
    ShapeMismatch {
        /// Sending stage.
        from: usize,
        /// Receiving stage.
        to: usize,
        /// What the sender produces.
        produced: Vec<usize>,
        /// What the receiver expects.
        expected: Vec<usize>,
    },
    /// A collective or send/recv failed (a stage died, a timeout).
    #[error("pipeline stage {stage}: {source}")]
    Comm {
        /// This stage.
        stage: usize,
        /// The error.
        source: CommError,
    },
    /// The stage's own computation failed.
    #[error("pipeline stage {stage}: {reason}")]
    Compute {
        /// This stage.
        stage: usize,
        /// What failed.
        reason: String,
    },
}

/// What a stage computes; implemented by the trainer over its slice of a burn model.
pub trait StageCompute {
    /// Forward of micro-batch `micro`. `input` is the previous stage's activation (`None` on the
    /// first stage, which reads its own data). Returns the activation for the next stage, or
    /// `None` on the last stage (which computes the loss and keeps it).
    fn forward(&mut self, micro: usize, input: Option<Activation>) -> Result<Option<Activation>, PipelineError>;
    /// Backward of micro-batch `micro`, given the gradient of the loss with respect to this
    /// stage's output (`None` on the last stage: from its loss). Accumulates this stage's
    /// parameter gradients and returns the gradient with respect to its input (`None` on the
    /// first stage).
    fn backward(&mut self, micro: usize, grad_output: Option<Activation>) -> Result<Option<Activation>, PipelineError>;
}

/// How a stage's activations and gradients travel to its neighbours. Sends must not wait for
/// the receiver (a stage in 1F1B sends an activation and then waits for a gradient from the
/// same neighbour, who is sending one too); receives block until the value is there, and that
/// time is the bubble. Between one pair of stages and in one direction, values arrive in the
/// order they were sent.
pub trait StageLink: std::fmt::Debug {
    /// Starts sending `value` to stage `to`, under `tag` (`2m`: micro-batch m's activation,
    /// `2m + 1`: its gradient). The step's [`StageLink::finish`] waits for it.
    fn send(&mut self, value: Activation, to: usize, tag: u32) -> Result<(), CommError>;
    /// Receives the value of `shape` that stage `from` sent under `tag`.
    fn recv(&mut self, shape: &[usize], from: usize, tag: u32) -> Result<Activation, CommError>;
    /// Waits for every send started since the last call.
    fn finish(&mut self) -> Result<(), CommError>;
}

/// The host engine's link: values read to the host and sent on the pipeline group
/// asynchronously (its queue holds them until the receiver posts).
#[derive(Debug)]
pub struct HostLink {
    group: ProcessGroup,
    sends: Vec<Work<Vec<f32>>>,
}

impl HostLink {
    /// A link over `group` (rank i of the group is stage i).
    pub fn new(group: ProcessGroup) -> Self {
        Self {
            group,
            sends: Vec::new(),
        }
    }
}

impl StageLink for HostLink {
    fn send(&mut self, value: Activation, to: usize, tag: u32) -> Result<(), CommError> {
        let data = value.into_host().map_err(|reason| CommError::InvalidArgument {
            rank: self.group.rank(),
            op: "send",
            reason,
        })?;
        self.sends.push(self.group.send_async(data, to, tag));
        Ok(())
    }

    fn recv(&mut self, shape: &[usize], from: usize, tag: u32) -> Result<Activation, CommError> {
        let mut data = vec![0f32; shape.iter().product()];
        self.group.recv(&mut data, from, tag)?;
        Ok(Activation::Host {
            shape: shape.to_vec(),
            data,
        })
    }

    fn finish(&mut self) -> Result<(), CommError> {
        // Every send is waited for, even after a failure: none is left running past the step.
        let mut first = Ok(());
        for send in self.sends.drain(..) {
            if let Err(e) = send.wait() {
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }
}

/// The executor's timers for one step.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepTimes {
    /// Wall time of the step on this stage, ms.
    pub step_ms: f64,
    /// Time blocked waiting for an activation or a gradient, ms (the bubble).
    pub idle_ms: f64,
    /// Most activations held at once.
    pub peak_held: usize,
}

impl StepTimes {
    /// Idle time as a fraction of the step.
    pub fn bubble_fraction(&self) -> f64 {
        if self.step_ms > 0.0 {
            self.idle_ms / self.step_ms
        } else {
            0.0
        }
    }
}

/// One stage of a pipeline over `group` (rank i of the group is stage i).
#[derive(Debug)]
pub struct PipelineStage {
    group: ProcessGroup,
    stage: usize,
    stages: usize,
    /// Shape of the activation this stage receives (none on stage 0).
    input_shape: Option<Vec<usize>>,
    /// How activations and gradients travel ([`HostLink`] unless [`PipelineStage::with_link`]).
    link: Box<dyn StageLink>,
}

impl PipelineStage {
    /// The stage of this rank in `group`.
    pub fn new(group: ProcessGroup) -> Self {
        let (stage, stages) = (group.rank(), group.world_size());
        Self {
            link: Box::new(HostLink::new(group.clone())),
            group,
            stage,
            stages,
            input_shape: None,
        }
    }

    /// The same stage with activations and gradients on `link` (e.g. NCCL between GPUs); the
    /// shapes are still agreed on the group.
    pub fn with_link(mut self, link: Box<dyn StageLink>) -> Self {
        self.link = link;
        self
    }

    /// The link's description, for the log.
    pub fn link(&self) -> &dyn StageLink {
        &*self.link
    }

    /// This stage's index.
    pub fn stage(&self) -> usize {
        self.stage
    }

    /// Number of stages.
    pub fn stages(&self) -> usize {
        self.stages
    }

    fn comm(&self, source: CommError) -> PipelineError {
        PipelineError::Comm {
            stage: self.stage,
            source,
        }
    }

    /// Agrees activation shapes with the neighbours, once: every stage sends the shape it
    /// produces; the next one compares it with the one it expects.
    pub fn agree_shapes(&mut self, produces: Option<&[usize]>, expects: Option<&[usize]>) -> Result<(), PipelineError> {
        const MAX_DIMS: usize = 8;
        const SHAPE_TAG: u32 = u32::MAX;
        let encode = |shape: &[usize]| {
            let mut out = [0i64; MAX_DIMS + 1];
            out[0] = shape.len() as i64;
            for (slot, &d) in out[1..].iter_mut().zip(shape) {
                *slot = d as i64;
            }
            out
        };
        if self.stage + 1 < self.stages {
            let shape = produces.unwrap_or(&[]);
            self.group
                .send(&encode(shape), self.stage + 1, SHAPE_TAG)
                .map_err(|e| self.comm(e))?;
        }
        if self.stage > 0 {
            let mut got = [0i64; MAX_DIMS + 1];
            self.group
                .recv(&mut got, self.stage - 1, SHAPE_TAG)
                .map_err(|e| self.comm(e))?;
            let produced: Vec<usize> = got[1..=(got[0] as usize).min(MAX_DIMS)]
                .iter()
                .map(|&d| d as usize)
                .collect();
            let expected = expects.unwrap_or(&[]).to_vec();
            if produced != expected {
                return Err(PipelineError::ShapeMismatch {
                    from: self.stage - 1,
                    to: self.stage,
                    produced,
                    expected,
                });
            }
            self.input_shape = Some(expected);
        }
        Ok(())
    }

    /// Runs one step's actions. Sends go out asynchronously so a stage never waits for its
    /// neighbour to post a receive; receives block, and that blocked time is the measured bubble.
    pub fn run(
        &mut self,
        actions: &[Action],
        output_shape: Option<&[usize]>,
        compute: &mut dyn StageCompute,
    ) -> Result<StepTimes, PipelineError> {
        let start = Instant::now();
        let outcome = self.run_actions(actions, output_shape, compute);
        // The step's sends are waited for even when it failed, so none outlives it.
        let finished = self.link.finish().map_err(|e| self.comm(e));
        let idle = outcome?;
        finished?;
        Ok(StepTimes {
            step_ms: start.elapsed().as_secs_f64() * 1e3,
            idle_ms: idle * 1e3,
            peak_held: peak_in_flight(actions),
        })
    }

    /// The actions of [`PipelineStage::run`]; returns the seconds spent waiting on receives.
    fn run_actions(
        &mut self,
        actions: &[Action],
        output_shape: Option<&[usize]>,
        compute: &mut dyn StageCompute,
    ) -> Result<f64, PipelineError> {
        let mut idle = 0.0f64;
        let (first, last) = (self.stage == 0, self.stage + 1 == self.stages);
        for &action in actions {
            match action {
                Action::Forward(m) => {
                    let input = if first {
                        None
                    } else {
                        // Invariant: agree_shapes ran before the first step on every stage but 0.
                        let shape = self.input_shape.clone().expect("agree_shapes before run");
                        let waited = Instant::now();
                        let value = self
                            .link
                            .recv(&shape, self.stage - 1, 2 * m as u32)
                            .map_err(|e| self.comm(e))?;
                        idle += waited.elapsed().as_secs_f64();
                        Some(value)
                    };
                    let out = compute.forward(m, input)?;
                    if !last {
                        let out = out.ok_or_else(|| PipelineError::Compute {
                            stage: self.stage,
                            reason: format!("forward of micro-batch {m} produced no activation"),
                        })?;
                        self.link
                            .send(out, self.stage + 1, 2 * m as u32)
                            .map_err(|e| self.comm(e))?;
                    }
                }
                Action::Backward(m) => {
                    let grad_output = if last {
                        None
                    } else {
                        let shape = output_shape.unwrap_or(&[]).to_vec();
                        let waited = Instant::now();
                        let value = self
                            .link
                            .recv(&shape, self.stage + 1, 2 * m as u32 + 1)
                            .map_err(|e| self.comm(e))?;
                        idle += waited.elapsed().as_secs_f64();
                        Some(value)
                    };
                    let grad_input = compute.backward(m, grad_output)?;
                    if !first {
                        let g = grad_input.ok_or_else(|| PipelineError::Compute {
                            stage: self.stage,
                            reason: format!("backward of micro-batch {m} produced no input gradient"),
                        })?;
                        self.link
                            .send(g, self.stage - 1, 2 * m as u32 + 1)
                            .map_err(|e| self.comm(e))?;
                    }
                }
            }
        }
        Ok(idle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_f_one_b_holds_at_most_p_minus_s_activations() {
        for stages in 1..=4 {
            for m in 1..=8 {
                for s in 0..stages {
                    let a = schedule(PipelineSchedule::OneFOneB, s, stages, m);
                    assert_eq!(a.len(), 2 * m);
                    assert!(
                        peak_in_flight(&a) <= (stages - s).min(m),
                        "P={stages} M={m} s={s}: {a:?}"
                    );
                    let g = schedule(PipelineSchedule::GPipe, s, stages, m);
                    assert_eq!(peak_in_flight(&g), m);
                }
            }
        }
    }

    #[test]
    fn one_f_one_b_on_the_last_stage_alternates_from_the_start() {
        use Action::*;
        assert_eq!(
            schedule(PipelineSchedule::OneFOneB, 1, 2, 3),
            vec![
                Forward(0),
                Backward(0),
                Forward(1),
                Backward(1),
                Forward(2),
                Backward(2)
            ]
        );
        assert_eq!(
            schedule(PipelineSchedule::OneFOneB, 0, 2, 3),
            vec![
                Forward(0),
                Forward(1),
                Backward(0),
                Forward(2),
                Backward(1),
                Backward(2)
            ]
        );
    }
}

/// Splits blocks with the given costs into `stages` contiguous, non-empty ranges minimising the
/// most expensive stage (exact, by binary search on the answer). Needs `stages <= costs.len()`.
pub fn partition_balanced(costs: &[usize], stages: usize) -> Vec<std::ops::Range<usize>> {
    let n = costs.len();
    assert!(
        stages >= 1 && stages <= n,
        "partition_balanced: {stages} stages for {n} blocks"
    );
    // Greedy cut for a cap, keeping at least one block for every later stage.
    let cut = |cap: usize| -> Option<Vec<std::ops::Range<usize>>> {
        let mut out = Vec::with_capacity(stages);
        let mut start = 0;
        for s in 0..stages {
            let must_leave = stages - s - 1;
            let mut end = start;
            let mut sum = 0;
            while end < n - must_leave && (end == start || sum + costs[end] <= cap) {
                sum += costs[end];
                end += 1;
            }
            if sum > cap {
                return None;
            }
            if s == stages - 1 && end < n {
                return None;
            }
            out.push(start..end);
            start = end;
        }
        Some(out)
    };
    let (mut lo, mut hi) = (
        costs.iter().copied().max().unwrap_or(0),
        costs.iter().sum::<usize>().max(1),
    );
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if cut(mid).is_some() {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    // Invariant: the total cost is always a feasible cap, and `lo` is the smallest feasible one.
    cut(lo).expect("the smallest feasible cap yields a partition")
}

#[cfg(test)]
mod partition_tests {
    use super::partition_balanced;

    #[test]
    fn the_balanced_partition_minimises_the_largest_stage() {
        assert_eq!(partition_balanced(&[10, 10, 10, 10], 2), vec![0..2, 2..4]);
        assert_eq!(partition_balanced(&[100, 1, 1, 1], 2), vec![0..1, 1..4]);
        assert_eq!(partition_balanced(&[1, 2, 3], 3), vec![0..1, 1..2, 2..3]);
        assert_eq!(partition_balanced(&[5, 1, 1, 1, 5], 3), vec![0..1, 1..4, 4..5]);
    }
}
