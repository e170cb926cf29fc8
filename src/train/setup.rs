//! Setting a run up: where this rank sits in the mesh, the out_dir lock, the compute threads, the
//! device, and the memory check before the large buffers exist.

use std::ops::Range;
use std::path::Path;

use burn::tensor::{Device, FloatDType};

use crate::comm::ProcessGroup;
use crate::config::{ComputeDtype, Partition, Resolved, RunConfig};
use crate::parallel::{partition_balanced, ParallelDims};

use super::lock::{LockOwner, OutDirLock};
use super::memory::{self, MemoryAvailable, MemoryEstimate};
use super::TrainError;

/// Where this rank sits and who it talks to.
#[derive(Debug)]
pub(crate) struct Placement {
    pub(crate) rank: usize,
    pub(crate) dims: ParallelDims,
    pub(crate) replica: usize,
    pub(crate) stage: usize,
    pub(crate) data_group: ProcessGroup,
    pub(crate) pipe_group: Option<ProcessGroup>,
    /// The ranks that split this stage's layers with this one (`parallel.tensor > 1`).
    pub(crate) tensor_group: Option<ProcessGroup>,
    /// This rank's blocks (`0..1` for a model that is not a block chain).
    pub(crate) blocks: Range<usize>,
    /// Every stage's blocks.
    pub(crate) all_blocks: Vec<Range<usize>>,
    /// Blocks of the full model (1 for a model that is not a block chain).
    pub(crate) num_blocks: usize,
}

impl Placement {
    /// Whether this rank holds the first block (it reads the inputs).
    pub(crate) fn first(&self) -> bool {
        self.blocks.start == 0
    }

    /// Whether this rank holds the last block (it computes the loss).
    pub(crate) fn last(&self) -> bool {
        self.blocks.end == self.num_blocks
    }
}

/// Places this rank in the `data x tensor x pipeline` mesh; `block_counts` are the parameter counts of the
/// model's blocks (`None`: not a block chain, which cannot be pipelined).
pub(crate) fn place(
    world: &ProcessGroup,
    resolved: &Resolved,
    block_counts: Option<&[usize]>,
) -> Result<Placement, TrainError> {
    let rank = world.rank();
    let cfg = &resolved.config;
    let unsupported = |what: &str, why: String| TrainError::Unsupported {
        rank,
        what: what.into(),
        why,
    };
    let dims = ParallelDims::new(
        resolved.mesh.data,
        resolved.mesh.tensor,
        resolved.mesh.pipeline,
        world.world_size(),
    )
    .map_err(|e| unsupported("parallel", e.to_string()))?;
    let coords = dims.coords(rank);
    let all_blocks = match block_counts {
        Some(counts) => stage_blocks(&cfg.parallel.partition, counts, dims.pipeline)
            .map_err(|why| unsupported("parallel.partition", why))?,
        None if dims.pipeline > 1 => {
            return Err(unsupported(
                &format!("parallel.pipeline = {}", dims.pipeline),
                "the model is not a chain of blocks (its Task gives no `blocks()`), so it cannot be split into \
                 pipeline stages"
                    .into(),
            ))
        }
        None => std::iter::once(0..1).collect(),
    };
    // Every rank makes the same splits in the same order (each is a collective on `world`).
    let comm_err = |source| TrainError::Comm { rank, source };
    let data_group = if dims.pipeline == 1 && dims.tensor == 1 {
        world.clone()
    } else {
        world.split(&dims.data_colors()).map_err(comm_err)?
    };
    let pipe_group = if dims.pipeline > 1 {
        Some(world.split(&dims.pipeline_colors()).map_err(comm_err)?)
    } else {
        None
    };
    let tensor_group = if dims.tensor > 1 {
        Some(world.split(&dims.tensor_colors()).map_err(comm_err)?)
    } else {
        None
    };
    Ok(Placement {
        rank,
        dims,
        replica: coords.data,
        stage: coords.stage,
        data_group,
        pipe_group,
        tensor_group,
        blocks: all_blocks[coords.stage].clone(),
        num_blocks: block_counts.map_or(1, <[usize]>::len),
        all_blocks,
    })
}

/// The block ranges of the stages, for blocks with parameter counts `counts`.
pub fn stage_blocks(partition: &Partition, counts: &[usize], stages: usize) -> Result<Vec<Range<usize>>, String> {
    let n = counts.len();
    if stages > n {
        return Err(format!("{stages} pipeline stages but the model has only {n} blocks"));
    }
    Ok(match partition {
        Partition::Balanced => partition_balanced(counts, stages),
        Partition::Boundaries(starts) => {
            let mut bounds = vec![0];
            bounds.extend(starts.iter().copied());
            bounds.push(n);
            if bounds.len() != stages + 1 || bounds.windows(2).any(|w| w[0] >= w[1]) {
                return Err(format!(
                    "partition {starts:?} must give {} increasing first blocks within 1..{n} for {stages} stages",
                    stages - 1
                ));
            }
            bounds.windows(2).map(|w| w[0]..w[1]).collect()
        }
    })
}

/// Refuses a rank share that cannot fit in this node's memory, before any of it is allocated
/// (an allocation that fails aborts the process). `block_params` are the parameter values of the
/// rank's blocks, `activation_values` the values per sample they keep for backward.
pub(crate) fn check_memory(
    resolved: &Resolved,
    rank: usize,
    block_params: &[usize],
    activation_values: u64,
) -> Result<(), TrainError> {
    let estimate = MemoryEstimate::of(resolved, block_params, activation_values);
    let local_ranks = crate::env::DistEnv::from_env().map_or(1, |e| e.local_world_size);
    let available = MemoryAvailable::of_this_node(local_ranks);
    if !memory::fits(&estimate, &available) {
        return Err(TrainError::OutOfMemory {
            rank,
            estimate,
            available,
        });
    }
    if rank == 0 {
        tracing::info!("memory: {estimate}; {available}");
    }
    Ok(())
}

/// This rank's autodiff device, in the compute dtype of `[precision]`.
pub(crate) fn device(resolved: &Resolved, rank: usize) -> Result<Device, TrainError> {
    let cfg = &resolved.config;
    let local_rank = crate::env::DistEnv::from_env().map(|e| e.local_rank).unwrap_or(0);
    let mut base = crate::device::base_device(resolved.device, local_rank).map_err(|e| TrainError::Unsupported {
        rank,
        what: format!("train.device = {}", resolved.device),
        why: e.to_string(),
    })?;
    let compute = match cfg.precision.compute {
        ComputeDtype::F32 => None,
        ComputeDtype::Bf16 => Some(FloatDType::BF16),
        ComputeDtype::F16 => Some(FloatDType::F16),
    };
    if let Some(dtype) = compute {
        base.configure(dtype).map_err(|e| TrainError::Unsupported {
            rank,
            what: format!("precision.compute = {}", cfg.precision.compute),
            why: format!("{e:?}"),
        })?;
        if rank == 0 {
            tracing::info!(
                "mixed precision: forward and backward in {} on {}, f32 master weights and optimizer state, \
                 gradients reduced in f32{}{}",
                cfg.precision.compute,
                resolved.device,
                if cfg.precision.compute == ComputeDtype::F16 {
                    ", dynamic loss scaling"
                } else {
                    ""
                },
                if resolved.device.is_cpu() {
                    "; on CPU this saves memory, not time"
                } else {
                    ""
                }
            );
        }
    }
    let device = base.autodiff();
    device.seed(cfg.train.seed);
    Ok(device)
}

/// Sizes burn's CPU thread pool before the first tensor exists: `threads`, or with 0 the cores
/// shared out among this node's ranks (torchrun sets `OMP_NUM_THREADS=1` for the same reason:
/// ranks that each take every core fight over them).
pub(crate) fn configure_compute_threads(threads: usize) {
    let local = crate::env::DistEnv::from_env()
        .map(|e| e.local_world_size)
        .unwrap_or(1)
        .max(1);
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let threads = if threads == 0 { (cores / local).max(1) } else { threads };
    // A second call in one process (tests running several trainers) keeps the first pool.
    let _ = rayon::ThreadPoolBuilder::new().num_threads(threads).build_global();
}

/// Lets the allocator keep the memory a step frees for the next step. Every step allocates and
/// frees the same few MB blocks (activations, gradient and parameter tensors); by default glibc
/// serves blocks over its mmap threshold with fresh mappings and trims the heap's free top, so
/// each step faulted its whole working set in again: on the benchmark MLP 280k page faults in 60
/// steps and a third of the step time. Blocks up to 32 MiB now come from the heap, and the heap is
/// trimmed only past 512 MiB of free top. Process-wide; repeated calls are harmless.
pub(crate) fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters (under the allocator's lock, so it is safe
    // with other threads allocating); both values are within glibc's accepted ranges.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
    }
}

/// Gives the memory the allocator holds free back to the system, once (glibc's `malloc_trim`
/// also releases whole free pages inside the heap): ZeRO-3 calls it after releasing the whole
/// model built at start, which [`keep_freed_memory`] would otherwise keep resident (and charged
/// to a memory cgroup) beside the rank's shards for the whole run.
pub(crate) fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the system, under the allocator's locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// How long a rank told that rank 0 could not lock `train.out_dir` waits before it exits, so that
/// rank 0's exit, with the reason, comes first (the launcher stops every other rank then).
const REFUSAL_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// Rank 0 locks `train.out_dir` (see [`super::lock`]) and tells the other ranks whether it could,
/// so they stop too instead of waiting for it in the first collective.
pub(crate) fn lock_out_dir(world: &ProcessGroup, cfg: &RunConfig) -> Result<Option<OutDirLock>, TrainError> {
    let rank = world.rank();
    let dir = Path::new(&cfg.train.out_dir);
    let (mut lock, mut failure) = (None, None);
    if rank == 0 {
        let env = crate::env::DistEnv::from_env().ok().filter(|e| e.launched());
        let owner = LockOwner::this_process(env.as_ref().map(|e| e.run_id.as_str()));
        match OutDirLock::acquire(dir, &owner) {
            Ok(held) => lock = Some(held),
            Err(source) => failure = Some(source),
        }
    }
    if world.world_size() > 1 {
        let mut locked = [u8::from(failure.is_none())];
        world
            .broadcast(&mut locked, 0)
            .map_err(|source| TrainError::Comm { rank, source })?;
        if rank != 0 && locked[0] == 0 {
            // Rank 0 holds the reason (the other job's pid, host and run id) and exits with it at
            // once; were this rank to exit first, the launcher would tear rank 0 down before it
            // printed, and the job's report would say only "rank 0 could not lock".
            std::thread::sleep(REFUSAL_GRACE);
            return Err(TrainError::OutDirRefused {
                rank,
                dir: dir.display().to_string(),
            });
        }
    }
    match failure {
        Some(source) => Err(TrainError::OutDir { rank, source }),
        None => Ok(lock),
    }
}
