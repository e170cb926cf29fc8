//! The memory a rank needs, estimated from the model's block sizes before anything is allocated, and the
//! memory this node has for it.
//!
//! A model too large for the machine used to pass `burnrun check` and then kill every rank with
//! SIGABRT ("memory allocation of 256000000000 bytes failed"). `check` and the trainer now add up
//! what a rank holds (a block chain knows every count without building anything) and refuse, with the
//! breakdown and what is available, a run that cannot fit:
//! - parameters in burn's model, in the compute dtype, and their gradients from backward;
//! - f32 master weights and the flat f32 gradient buffer the trainer reduces and steps with;
//! - optimizer state: Adam and AdamW 2 values per parameter, SGD 1 (its momentum buffer); with
//!   ZeRO (`parallel.shard`) one data-parallel replica's share of it, with ZeRO-2 of the f32
//!   gradient buffer too, and with ZeRO-3 of the master weights as well, the model then holding
//!   only the block it computes and the next one's gather;
//! - activations kept for backward, for the samples of one micro step (all the micro-batches of a
//!   pipeline step with GPipe, the worst case);
//! - with `checkpoint.async`, the copy of the master weights and optimizer state the background
//!   writer writes from (kept between checkpoints and refilled).
//!
//! Available is `MemAvailable` of `/proc/meminfo`, bounded by the cgroup's `memory.max` minus its
//! `memory.current`, shared by the node's ranks.

use crate::config::{ComputeDtype, OptimKind, Resolved, ShardMode};
use std::fmt;
use std::ops::Range;

use super::setup::stage_blocks;
use super::task::BlockChain;

/// What one rank needs, in bytes, by kind.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryEstimate {
    /// Parameter values held by the rank (its pipeline stage).
    pub params: u64,
    /// The model's parameters (compute dtype).
    pub param_bytes: u64,
    /// burn's gradients (compute dtype) and the flat f32 gradient buffer.
    pub grad_bytes: u64,
    /// The f32 master weights.
    pub master_bytes: u64,
    /// Optimizer state.
    pub optim_bytes: u64,
    /// `adam, 2 values per parameter` or the like.
    pub optim_what: String,
    /// Activations kept for backward.
    pub activation_bytes: u64,
    /// The copy an asynchronous checkpoint is written from (master weights and optimizer state;
    /// 0 without `checkpoint.async`).
    pub checkpoint_copy_bytes: u64,
    /// Samples whose activations are held at once.
    pub samples: u64,
}

impl MemoryEstimate {
    /// The rank's share of the model for `resolved`'s config: blocks of `block_params` parameter
    /// values each, which keep `activation_values` values per sample for backward (see
    /// [`held_activations`]).
    pub fn of(resolved: &Resolved, block_params: &[usize], activation_values: u64) -> Self {
        let cfg = &resolved.config;
        let params: u64 = block_params.iter().map(|&c| c as u64).sum();
        let largest_block = block_params.iter().copied().max().unwrap_or(0) as u64;
        let compute_bytes: u64 = match cfg.precision.compute {
            ComputeDtype::F32 => 4,
            ComputeDtype::Bf16 | ComputeDtype::F16 => 2,
        };
        let (optim_values, optim_what) = match cfg.optim.kind {
            OptimKind::Sgd => (1, "sgd, 1 value (momentum) per parameter".to_string()),
            kind => (2, format!("{kind}, 2 values per parameter")),
        };
        let samples = resolved.micro_batch_size as u64 * cfg.parallel.micro_batches.max(1) as u64;
        // ZeRO: the replicas of a stage share the optimizer state (and with ZeRO-2 the f32
        // averaged gradients), each holding about one N-th.
        let replicas = resolved.mesh.data.max(1) as u64;
        let share = |values: u64, sharded: bool| if sharded { values.div_ceil(replicas) } else { values };
        let optim_values_held = share(
            params.saturating_mul(optim_values),
            cfg.parallel.shard != ShardMode::None,
        );
        let fsdp = cfg.parallel.shard == ShardMode::Parameters;
        let flat_grads_held = share(
            params,
            matches!(cfg.parallel.shard, ShardMode::Gradients | ShardMode::Parameters),
        );
        // ZeRO-3 holds the block it computes (loaded, and its gradients: burn's, read out, and
        // the reduce-scatter's buffer) and the next block's all-gather; plain data parallelism
        // and ZeRO-1/2 hold the whole model.
        let (param_bytes, grad_bytes) = if fsdp {
            (
                largest_block.saturating_mul(compute_bytes + 4),
                largest_block
                    .saturating_mul(compute_bytes + 8)
                    .saturating_add(flat_grads_held.saturating_mul(4)),
            )
        } else {
            (
                params.saturating_mul(compute_bytes),
                params
                    .saturating_mul(compute_bytes)
                    .saturating_add(flat_grads_held.saturating_mul(4)),
            )
        };
        let master_values = share(params, fsdp);
        Self {
            params,
            param_bytes,
            grad_bytes,
            master_bytes: master_values.saturating_mul(4),
            optim_bytes: optim_values_held.saturating_mul(4),
            optim_what: if cfg.parallel.shard == ShardMode::None || replicas == 1 {
                optim_what
            } else {
                format!(
                    "{optim_what}, 1/{replicas} of it held: parallel.shard = \"{}\"",
                    cfg.parallel.shard
                )
            },
            activation_bytes: activation_values.saturating_mul(samples).saturating_mul(compute_bytes),
            checkpoint_copy_bytes: if cfg.checkpoint.async_write {
                master_values.saturating_add(optim_values_held).saturating_mul(4)
            } else {
                0
            },
            samples,
        }
    }

    /// The sum.
    pub fn total_bytes(&self) -> u64 {
        [
            self.param_bytes,
            self.grad_bytes,
            self.master_bytes,
            self.optim_bytes,
            self.activation_bytes,
            self.checkpoint_copy_bytes,
        ]
        .into_iter()
        .fold(0, u64::saturating_add)
    }
}

impl fmt::Display for MemoryEstimate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "about {} per rank: parameters {} ({} values), gradients {}, master weights {}, optimizer state {} ({}), \
             activations {} ({} samples)",
            Bytes(self.total_bytes()),
            Bytes(self.param_bytes),
            self.params,
            Bytes(self.grad_bytes),
            Bytes(self.master_bytes),
            Bytes(self.optim_bytes),
            self.optim_what,
            Bytes(self.activation_bytes),
            self.samples,
        )?;
        if self.checkpoint_copy_bytes > 0 {
            write!(
                f,
                ", asynchronous checkpoint copy {}",
                Bytes(self.checkpoint_copy_bytes)
            )?;
        }
        Ok(())
    }
}

/// The estimate for the pipeline stage holding the largest share of a block-chain model (the
/// whole model without a pipeline); an error when `parallel.partition` does not fit the blocks.
pub fn largest_stage<M, B>(resolved: &Resolved, chain: &dyn BlockChain<M, B>) -> Result<MemoryEstimate, String> {
    let counts = chain.block_param_counts();
    let stages = stage_blocks(&resolved.config.parallel.partition, &counts, resolved.mesh.pipeline)
        .map_err(|why| format!("parallel.partition: {why}"))?;
    stages
        .into_iter()
        .map(|blocks| {
            MemoryEstimate::of(
                resolved,
                &counts[blocks.clone()],
                held_activations(resolved, chain, blocks),
            )
        })
        .max_by_key(MemoryEstimate::total_bytes)
        .ok_or_else(|| "the model has no pipeline stage".to_string())
}

/// Values per sample that the blocks `blocks` of `chain` keep for backward: what each block
/// keeps ([`BlockChain::activation_values`]), or under ZeRO-3, which recomputes each block in
/// backward, the input of every block and the insides of the widest one.
pub fn held_activations<M, B>(resolved: &Resolved, chain: &dyn BlockChain<M, B>, blocks: Range<usize>) -> u64 {
    let kept = blocks.clone().map(|b| chain.activation_values(b) as u64);
    if resolved.config.parallel.shard == ShardMode::Parameters {
        let inputs: u64 = blocks.clone().map(|b| chain.activation_width(b) as u64).sum();
        inputs + kept.max().unwrap_or(0)
    } else {
        kept.sum()
    }
}

/// The memory of this node and each rank's share of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryAvailable {
    /// `MemAvailable` of `/proc/meminfo` (`None`: not readable).
    pub mem_available: Option<u64>,
    /// The cgroup's `memory.max` (`None`: unlimited or not readable).
    pub cgroup_max: Option<u64>,
    /// The cgroup's `memory.current`, when it has a limit.
    pub cgroup_current: Option<u64>,
    /// Ranks on this node that share it.
    pub local_ranks: usize,
}

impl MemoryAvailable {
    /// Reads this node's memory, to be shared by `local_ranks` ranks.
    pub fn of_this_node(local_ranks: usize) -> Self {
        let read = |path: &str| std::fs::read_to_string(path).ok();
        let mem_available = read("/proc/meminfo").and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib.saturating_mul(1024))
        });
        // cgroup v2; "max" means no limit.
        let cgroup_max = read("/sys/fs/cgroup/memory.max").and_then(|t| t.trim().parse().ok());
        let cgroup_current = cgroup_max
            .and(read("/sys/fs/cgroup/memory.current"))
            .and_then(|t| t.trim().parse().ok());
        Self {
            mem_available,
            cgroup_max,
            cgroup_current,
            local_ranks: local_ranks.max(1),
        }
    }

    /// What the node has left (`None`: unknown, nothing could be read).
    pub fn node_bytes(&self) -> Option<u64> {
        let cgroup_left = self
            .cgroup_max
            .map(|max| max.saturating_sub(self.cgroup_current.unwrap_or(0)));
        match (self.mem_available, cgroup_left) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// One rank's share.
    pub fn per_rank_bytes(&self) -> Option<u64> {
        self.node_bytes().map(|bytes| bytes / self.local_ranks as u64)
    }
}

impl fmt::Display for MemoryAvailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let known = |v: Option<u64>| v.map_or_else(|| "unknown".to_string(), |b| Bytes(b).to_string());
        let cgroup = match self.cgroup_max {
            Some(max) => format!(
                "cgroup memory.max {} with {} in use",
                Bytes(max),
                known(self.cgroup_current)
            ),
            None => "no cgroup limit".to_string(),
        };
        write!(
            f,
            "{} available on this node (MemAvailable {}, {cgroup}) shared by {} rank(s): {} each",
            known(self.node_bytes()),
            known(self.mem_available),
            self.local_ranks,
            known(self.per_rank_bytes()),
        )
    }
}

/// Whether `estimate` fits a rank's share of `available`; an unknown amount fits (the check
/// cannot refuse what it cannot measure).
pub fn fits(estimate: &MemoryEstimate, available: &MemoryAvailable) -> bool {
    available
        .per_rank_bytes()
        .is_none_or(|share| estimate.total_bytes() <= share)
}

/// A byte count in binary units, for people.
#[derive(Debug, Clone, Copy)]
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
        let mut value = self.0 as f64;
        let mut unit = 0;
        while value >= 1024.0 && unit + 1 < UNITS.len() {
            value /= 1024.0;
            unit += 1;
        }
        if unit == 0 {
            write!(f, "{} B", self.0)
        } else {
            write!(f, "{value:.1} {}", UNITS[unit])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RunConfig;
    use crate::models::ModelSpec;

    /// The estimate for blocks `0..blocks` of a built-in model whose input is `input` wide.
    fn for_blocks(resolved: &Resolved, spec: &ModelSpec, blocks: usize, input: usize) -> MemoryEstimate {
        let activations: usize = (0..blocks).map(|b| spec.activation_values(b, input)).sum();
        MemoryEstimate::of(resolved, &spec.block_param_counts()[..blocks], activations as u64)
    }

    fn estimate(optim: &str) -> MemoryEstimate {
        let cfg = RunConfig::from_str_named(
            &format!("[optim]\nkind = \"{optim}\"\n[train]\nbatch_size = 2\n"),
            "x.toml",
            &[],
        )
        .unwrap();
        let resolved = cfg.validate(1).unwrap();
        let spec = ModelSpec::Mlp {
            input: 10,
            hidden: vec![100],
            classes: 5,
        };
        for_blocks(&resolved, &spec, 2, 10)
    }

    #[test]
    fn the_estimate_counts_every_kind_of_buffer_and_adam_twice_the_state_of_sgd() {
        // 10*100 + 100 + 100*5 + 5 = 1605 parameters.
        let adam = estimate("adam");
        assert_eq!(adam.params, 1605);
        assert_eq!(adam.param_bytes, 1605 * 4);
        assert_eq!(adam.grad_bytes, 1605 * 8);
        assert_eq!(adam.master_bytes, 1605 * 4);
        assert_eq!(adam.optim_bytes, 1605 * 8);
        // 2 samples x (100 x 2 + 5) values x 4 bytes.
        assert_eq!(adam.activation_bytes, 2 * 205 * 4);
        assert_eq!(estimate("sgd").optim_bytes, 1605 * 4);
    }

    #[test]
    fn zero_3_holds_a_share_of_the_flat_buffers_and_two_blocks_of_the_model() {
        let cfg = RunConfig::from_str_named(
            "[optim]\nkind = \"adam\"\n[train]\nbatch_size = 2\n[parallel]\nshard = \"parameters\"\n",
            "x.toml",
            &[],
        )
        .unwrap();
        let resolved = cfg.validate(2).unwrap();
        let spec = ModelSpec::Mlp {
            input: 10,
            hidden: vec![100],
            classes: 5,
        };
        // Blocks of 1100 and 505 values; 1605 in all, 803 per replica.
        let zero3 = for_blocks(&resolved, &spec, 2, 10);
        assert_eq!(zero3.master_bytes, 803 * 4);
        assert_eq!(zero3.optim_bytes, 1605 * 4);
        assert_eq!(zero3.param_bytes, 1100 * (4 + 4));
        assert_eq!(zero3.grad_bytes, 1100 * (4 + 8) + 803 * 4);
        assert!(zero3.total_bytes() < estimate("adam").total_bytes());
    }

    #[test]
    fn a_model_too_large_for_the_node_does_not_fit_and_the_message_says_both_sides() {
        let cfg = RunConfig::from_str_named("[model.mlp]\nhidden = [1000000000, 1000000000]\n", "x.toml", &[]).unwrap();
        let resolved = cfg.validate(1).unwrap();
        let spec = ModelSpec::Mlp {
            input: 64,
            hidden: vec![1_000_000_000, 1_000_000_000],
            classes: 10,
        };
        let estimate = for_blocks(&resolved, &spec, 3, 64);
        let available = MemoryAvailable {
            mem_available: Some(64 << 30),
            cgroup_max: Some(16 << 30),
            cgroup_current: Some(0),
            local_ranks: 2,
        };
        assert!(!fits(&estimate, &available));
        assert_eq!(available.per_rank_bytes(), Some(8 << 30));
        let text = format!("{estimate}; {available}");
        assert!(
            text.contains("optimizer state") && text.contains("8.0 GiB each"),
            "{text}"
        );
    }
}
