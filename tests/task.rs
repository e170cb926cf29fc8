//! A user's own model through the trainer's `Task` trait, ranks on threads: buffers (BatchNorm's
//! running statistics) stay identical on every replica, frozen weights stay frozen, and what a
//! task cannot do (be pipelined or shard its parameters without blocks, or a block chain whose
//! counts are wrong) is an error that says so before the first step. As a block chain it trains
//! under ZeRO-3, its BatchNorm and frozen layer in different blocks.

mod common;

use std::ops::Range;
use std::path::Path;

use burn::module::Module;
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig};
use burn::tensor::{Device, Int, Tensor, TensorData};
use burnrun::comm::{spawn_ranks, InitOptions};
use burnrun::config::RunConfig;
use burnrun::train::{train_task_on, TrainError, TrainOptions, TrainSummary};
use burnrun::{BlockChain, Task, TaskError};

/// A user's model: a layer, a BatchNorm, a frozen layer, a classifier head.
#[derive(Module, Debug)]
struct Net {
    a: Linear,
    bn: BatchNorm,
    frozen: Linear,
    head: Linear,
}

/// Samples of 4 features in 3 classes, the class a function of the features.
struct Blobs {
    /// Whether the task gives its model as a block chain, and whether that chain's block sizes
    /// are right or off by one value (a broken contract).
    chain: Chain,
}

#[derive(Clone, Copy, PartialEq)]
enum Chain {
    None,
    Right,
    Wrong,
}

const SAMPLES: usize = 256;

fn features(i: usize) -> [f32; 4] {
    let x = (i as f32 * 0.37).sin();
    let y = (i as f32 * 0.11).cos();
    [x, y, x * y, (i % 3) as f32 - 1.0]
}

impl Task for Blobs {
    type Model = Net;
    type Batch = (Tensor<2>, Tensor<1, Int>);

    fn describe(&self) -> String {
        "a user's net on blobs".into()
    }

    fn len(&self) -> usize {
        SAMPLES
    }

    fn model(&self, device: &Device) -> Result<Net, TaskError> {
        let frozen = LinearConfig::new(8, 8).init(device);
        Ok(Net {
            a: LinearConfig::new(4, 8).init(device),
            bn: BatchNormConfig::new(8).init(device),
            frozen: Linear {
                weight: frozen.weight.set_require_grad(false),
                bias: frozen.bias.map(|b| b.set_require_grad(false)),
            },
            head: LinearConfig::new(8, 3).init(device),
        })
    }

    fn batch(&self, indices: &[usize], device: &Device) -> Result<Self::Batch, TaskError> {
        let x: Vec<f32> = indices.iter().flat_map(|&i| features(i)).collect();
        let y: Vec<i64> = indices.iter().map(|&i| (i % 3) as i64).collect();
        Ok((
            Tensor::from_data(TensorData::new(x, [indices.len(), 4]), device),
            Tensor::from_data(TensorData::new(y, [indices.len()]), device),
        ))
    }

    fn loss(&self, model: &Net, (x, y): &Self::Batch) -> Result<Tensor<1>, TaskError> {
        let h = model.bn.forward(model.a.forward(x.clone())); // [batch, 8]
        let logits = model.head.forward(model.frozen.forward(h)); // [batch, 3]
        let log_probs = burn::tensor::activation::log_softmax(logits, 1);
        let [batch] = y.dims();
        Ok(log_probs.gather(1, y.clone().reshape([batch, 1])).neg().mean())
    }

    fn blocks(&self) -> Option<&dyn BlockChain<Net, Self::Batch>> {
        (self.chain != Chain::None).then_some(self as &dyn BlockChain<Net, Self::Batch>)
    }
}

/// The same net as two blocks (block 0's count one value short with `Chain::Wrong`).
impl BlockChain<Net, (Tensor<2>, Tensor<1, Int>)> for Blobs {
    fn num_blocks(&self) -> usize {
        2
    }
    fn block_param_counts(&self) -> Vec<usize> {
        // a (4*8+8) + bn (8+8+8+8) = 72, frozen 72, head 27.
        match self.chain {
            Chain::Wrong => vec![71, 72 + 27 + 1],
            _ => vec![72, 72 + 27],
        }
    }
    fn model_range(&self, _range: Range<usize>, device: &Device) -> Result<Net, TaskError> {
        self.model(device)
    }
    fn input(&self, batch: &(Tensor<2>, Tensor<1, Int>)) -> Result<Tensor<2>, TaskError> {
        Ok(batch.0.clone())
    }
    fn forward_range(&self, model: &Net, x: Tensor<2>, range: Range<usize>) -> Result<Tensor<2>, TaskError> {
        Ok(match range.start {
            0 => model.bn.forward(model.a.forward(x)),
            _ => model.head.forward(model.frozen.forward(x)),
        })
    }
    fn loss_of_output(&self, output: Tensor<2>, batch: &(Tensor<2>, Tensor<1, Int>)) -> Result<Tensor<1>, TaskError> {
        let [batch_size] = batch.1.dims();
        let log_probs = burn::tensor::activation::log_softmax(output, 1);
        Ok(log_probs
            .gather(1, batch.1.clone().reshape([batch_size, 1]))
            .neg()
            .mean())
    }
    fn activation_width(&self, block: usize) -> usize {
        [4, 8, 3][block]
    }
}

fn config(out: &Path, extra: &[&str]) -> RunConfig {
    let mut sets: Vec<String> = [
        "optim.kind=adam",
        "optim.lr=0.01",
        "train.steps=30",
        "train.batch_size=16",
        "train.threads=1",
        "train.check_replicas_every=1",
        "log.every_steps=10",
        "log.progress=off",
        "checkpoint.every_steps=10",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    sets.push(format!("train.out_dir={}", out.display()));
    sets.extend(extra.iter().map(|s| s.to_string()));
    RunConfig::from_str_named("", "task.toml", &sets).unwrap()
}

fn train_on_threads(n: usize, task: &Blobs, cfg: &RunConfig) -> Vec<Result<TrainSummary, TrainError>> {
    spawn_ranks(n, &InitOptions::default(), |pg| {
        train_task_on(pg, task, cfg.clone(), &TrainOptions::default())
    })
    .expect("ranks start")
}

#[test]
fn a_users_model_with_batchnorm_and_a_frozen_layer_trains_with_identical_replicas_and_frozen_weights() {
    let out = common::out_dir("task-bn");
    let task = Blobs { chain: Chain::None };
    let cfg = config(&out, &[]);
    for (rank, result) in train_on_threads(2, &task, &cfg).into_iter().enumerate() {
        // check_replicas_every = 1 compares every tensor, running statistics included, each step.
        let summary = result.unwrap_or_else(|e| panic!("rank {rank}: {e}"));
        assert!(summary.final_loss < summary.first_loss, "rank {rank}: {summary:?}");
    }
    // Checkpoints at steps 10, 20 and 30: the frozen layer is where it was, the others moved.
    let (early, last) = (common::params_at(&out, 10), common::final_params(&out));
    assert_eq!(
        early["frozen.weight"].data, last["frozen.weight"].data,
        "the frozen layer did not move"
    );
    assert_ne!(early["a.weight"].data, last["a.weight"].data, "the trained layer moved");
    let params = last;
    let running_var = &params["bn.running_var"].data;
    assert!(
        running_var.iter().any(|v| (v - 1.0).abs() > 1e-3),
        "running statistics were updated: {running_var:?}"
    );
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn a_users_model_with_buffers_and_a_frozen_layer_trains_under_zero_1_and_2() {
    // Ranks on threads of one process share burn's device RNG, so two runs here start from
    // different weights (rank 0's, broadcast): each run is checked on its own, and parity with
    // plain data parallelism is tests/train_zero.rs's (one process per rank).
    let task = Blobs { chain: Chain::None };
    for mode in ["optimizer", "gradients"] {
        let out = common::out_dir(&format!("task-zero-{mode}"));
        let shard = format!("parallel.shard={mode}");
        for (rank, result) in train_on_threads(2, &task, &config(&out, &[&shard]))
            .into_iter()
            .enumerate()
        {
            // check_replicas_every = 1: after every step's all-gather the replicas hold the same
            // values, running statistics included.
            let summary = result.unwrap_or_else(|e| panic!("{mode}: rank {rank}: {e}"));
            assert!(
                summary.final_loss < summary.first_loss,
                "{mode}: rank {rank}: {summary:?}"
            );
        }
        let (early, last) = (common::params_at(&out, 10), common::final_params(&out));
        assert_eq!(
            early["frozen.weight"].data, last["frozen.weight"].data,
            "{mode}: the frozen layer moved"
        );
        assert_ne!(
            early["a.weight"].data, last["a.weight"].data,
            "{mode}: the trained layer did not move"
        );
        let dir = burnrun::train::checkpoint::step_dir(&out.join("checkpoints"), 30);
        assert!(
            dir.join("optim-stage0-shard1.safetensors").is_file(),
            "{mode}: no shard file"
        );
        let _ = std::fs::remove_dir_all(&out);
    }
}

#[test]
fn a_task_without_blocks_asked_for_a_pipeline_is_refused_saying_why() {
    let out = common::out_dir("task-pipe");
    let task = Blobs { chain: Chain::None };
    let cfg = config(&out, &["parallel.pipeline=2"]);
    for result in train_on_threads(2, &task, &cfg) {
        let text = result.expect_err("no pipeline without blocks").to_string();
        assert!(
            text.contains("parallel.pipeline = 2") && text.contains("not a chain of blocks"),
            "{text}"
        );
    }
}

#[test]
fn a_block_chain_whose_counts_do_not_match_its_parameters_is_refused_naming_the_block() {
    let out = common::out_dir("task-chain");
    let task = Blobs { chain: Chain::Wrong };
    for result in train_on_threads(2, &task, &config(&out, &[])) {
        let text = result.expect_err("the counts are wrong").to_string();
        assert!(text.contains("block 0") && text.contains("71"), "{text}");
    }
}

#[test]
fn a_users_block_chain_with_buffers_and_a_frozen_layer_trains_under_zero_3() {
    // Block 0 holds the BatchNorm (running statistics), block 1 the frozen layer: each is
    // gathered, recomputed in backward and released, and its buffers kept from that recompute.
    let out = common::out_dir("task-zero-3");
    let task = Blobs { chain: Chain::Right };
    for (rank, result) in train_on_threads(2, &task, &config(&out, &["parallel.shard=parameters"]))
        .into_iter()
        .enumerate()
    {
        let summary = result.unwrap_or_else(|e| panic!("rank {rank}: {e}"));
        assert!(summary.final_loss < summary.first_loss, "rank {rank}: {summary:?}");
    }
    let dir = burnrun::train::checkpoint::step_dir(&out.join("checkpoints"), 30);
    for file in ["model-stage0-shard0", "model-stage0-shard1", "optim-stage0-shard1"] {
        assert!(dir.join(format!("{file}.safetensors")).is_file(), "no {file}");
    }
    assert!(
        !dir.join("model-stage0.safetensors").exists(),
        "a whole model file under ZeRO-3"
    );
    // Joined from the two replicas' slices.
    let (early, last) = (common::params_at(&out, 10), common::final_params(&out));
    assert_eq!(
        early["frozen.weight"].data, last["frozen.weight"].data,
        "the frozen layer moved"
    );
    assert_ne!(
        early["a.weight"].data, last["a.weight"].data,
        "the trained layer did not move"
    );
    let (var_early, var_last) = (&early["bn.running_var"].data, &last["bn.running_var"].data);
    assert_ne!(var_early, var_last, "running statistics were not updated");
    assert!(var_last.iter().all(|v| v.is_finite() && *v > 0.0), "{var_last:?}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn a_task_without_blocks_asked_to_shard_its_parameters_is_refused_saying_why() {
    let out = common::out_dir("task-zero-3-no-blocks");
    let task = Blobs { chain: Chain::None };
    for result in train_on_threads(2, &task, &config(&out, &["parallel.shard=parameters"])) {
        let text = result.expect_err("no ZeRO-3 without blocks").to_string();
        assert!(
            text.contains("parallel.shard = \"parameters\"") && text.contains("not a chain of blocks"),
            "{text}"
        );
    }
    let _ = std::fs::remove_dir_all(&out);
}
