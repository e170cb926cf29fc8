//! [`RunConfig::validate`]: every check that needs the whole config or the world size, run once at
//! start before any rank trains. Every failed check is reported (not just the first), each with
//! every term of the comparison and the line of the key that set it.

use std::path::Path;

use super::error::{ConfigError, Problem};
use super::mesh::ParallelDims;
use super::run::ConfigSource;
use super::{CommBackend, PipelineSchedule, RunConfig, ShardMode};
use super::{CompressionMethod, ComputeDtype, DataKind, DeviceSpec, LrSchedule, ModelKind, OptimKind, Partition};

/// A config checked against the world it runs in, with everything derived from it.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// The settings.
    pub config: RunConfig,
    /// `WORLD_SIZE`.
    pub world_size: usize,
    /// Data-parallel replicas x tensor-parallel ranks x pipeline stages (`parallel.data = 0`
    /// resolved).
    pub mesh: ParallelDims,
    /// The parsed `train.device`.
    pub device: DeviceSpec,
    /// `comm.backend` with `auto` resolved: `Host` or `Nccl`.
    pub backend: CommBackend,
    /// Samples per pipeline micro-batch: `batch_size / micro_batches`.
    pub micro_batch_size: usize,
    /// Samples per optimizer step over the whole job: `batch_size * grad_accum_steps * data`.
    pub global_batch: usize,
    /// Tokens per sequence for text data (`data.text.seq_len`, or `model.gpt.block_size`).
    pub seq_len: Option<usize>,
    /// Settings that are legal but probably not what was meant (a key set for another `kind`, a
    /// run that ends during warm-up, ...). Printed by `burnrun check` and at start.
    pub notes: Vec<String>,
}

/// Collects failed checks and notes.
struct Checks<'a> {
    source: &'a ConfigSource,
    problems: Vec<Problem>,
    notes: Vec<String>,
}

impl Checks<'_> {
    /// Records a problem about `keys` (the first one set in the file gives the line).
    fn fail(&mut self, keys: &[&str], message: String) {
        self.problems.push(Problem {
            at: self.source.locate(keys),
            keys: keys.iter().map(|key| key.to_string()).collect(),
            message,
        });
    }

    /// `fail` unless `ok`.
    fn require(&mut self, ok: bool, key: &str, message: impl FnOnce() -> String) {
        if !ok {
            self.fail(&[key], message());
        }
    }

    fn note(&mut self, message: String) {
        self.notes.push(message);
    }

    /// Notes every key of `keys` that was set although `why_unused` makes it irrelevant.
    fn unused(&mut self, keys: &[&str], why_unused: &str) {
        for key in keys {
            if self.source.is_set(key) {
                self.note(format!("{key} is set but {why_unused}: it is ignored"));
            }
        }
    }
}

impl RunConfig {
    /// Checks the config against a world of `world_size` ranks: value ranges, combinations that
    /// cannot work, and the mesh `parallel.data * parallel.pipeline = WORLD_SIZE`. Run once at
    /// start, before any rank trains.
    pub fn validate(&self, world_size: usize) -> Result<Resolved, ConfigError> {
        let mut checks = Checks {
            source: &self.source,
            problems: Vec::new(),
            notes: Vec::new(),
        };
        let c = &mut checks;
        if world_size == 0 {
            c.fail(&[], "WORLD_SIZE(0): a job needs at least one rank".to_string());
        }
        self.check_model(c);
        let seq_len = self.check_data(c);
        self.check_optim(c);
        let device = self.check_train(c);
        let mesh = self.check_parallel(c, world_size);
        self.check_data_fits_batch(c, mesh);
        self.check_comm(c, device);
        self.check_checkpoint_and_log(c);
        self.check_precision(c);
        self.check_compression(c, mesh);

        let (problems, notes) = (checks.problems, checks.notes);
        if !problems.is_empty() {
            return Err(ConfigError::Invalid { problems });
        }
        let micro_batches = self.parallel.micro_batches.max(1);
        Ok(Resolved {
            config: self.clone(),
            world_size,
            mesh,
            device: device.unwrap_or(DeviceSpec::Cpu),
            backend: self.backend_for(device.unwrap_or(DeviceSpec::Cpu)),
            micro_batch_size: self.train.batch_size / micro_batches,
            global_batch: self.train.batch_size * self.train.grad_accum_steps * mesh.data,
            seq_len,
            notes,
        })
    }

    fn check_model(&self, c: &mut Checks<'_>) {
        let model = &self.model;
        match model.kind {
            ModelKind::Mlp => {
                let hidden = &model.mlp.hidden;
                c.require(hidden.iter().all(|&w| w > 0), "model.mlp.hidden", || {
                    format!("model.mlp.hidden = {hidden:?}: every hidden layer needs at least 1 unit")
                });
            }
            ModelKind::Cnn => {
                let cnn = &model.cnn;
                c.require(
                    !cnn.channels.is_empty() && cnn.channels.iter().all(|&ch| ch > 0),
                    "model.cnn.channels",
                    || {
                        format!(
                            "model.cnn.channels = {:?}: needs at least one convolution, each with at least 1 channel",
                            cnn.channels
                        )
                    },
                );
                c.require(cnn.hidden > 0, "model.cnn.hidden", || {
                    "model.cnn.hidden = 0: must be at least 1".to_string()
                });
            }
            ModelKind::Gpt => {
                let gpt = &model.gpt;
                for (key, value) in [
                    ("model.gpt.block_size", gpt.block_size),
                    ("model.gpt.n_layer", gpt.n_layer),
                    ("model.gpt.n_head", gpt.n_head),
                    ("model.gpt.n_embd", gpt.n_embd),
                ] {
                    c.require(value > 0, key, || format!("{key} = 0: must be at least 1"));
                }
                if gpt.n_head > 0 && gpt.n_embd % gpt.n_head != 0 {
                    c.fail(
                        &["model.gpt.n_head", "model.gpt.n_embd"],
                        format!(
                            "model.gpt: n_embd({}) % n_head({}) = {} != 0: every head needs n_embd / n_head dimensions",
                            gpt.n_embd,
                            gpt.n_head,
                            gpt.n_embd % gpt.n_head
                        ),
                    );
                }
                c.require((0.0..1.0).contains(&gpt.dropout), "model.gpt.dropout", || {
                    format!("model.gpt.dropout = {}: must be in [0, 1)", gpt.dropout)
                });
            }
        }
        for kind in ModelKind::ALL.iter().filter(|&&kind| kind != model.kind) {
            let table = format!("model.{kind}");
            c.unused(&[&table], &format!("model.kind = \"{}\"", model.kind));
        }
    }

    /// Returns the sequence length of text data.
    fn check_data(&self, c: &mut Checks<'_>) -> Option<usize> {
        let data = &self.data;
        let model_kind = self.model.kind;
        let mut seq_len = None;
        match data.kind {
            DataKind::Synthetic => {
                let s = &data.synthetic;
                c.require(s.samples > 0, "data.synthetic.samples", || {
                    "data.synthetic.samples = 0: must be at least 1".into()
                });
                c.require(s.features > 0, "data.synthetic.features", || {
                    "data.synthetic.features = 0: must be at least 1".into()
                });
                c.require(s.classes >= 2, "data.synthetic.classes", || {
                    format!(
                        "data.synthetic.classes = {}: a classification needs at least 2 classes",
                        s.classes
                    )
                });
                c.require(s.noise.is_finite() && s.noise >= 0.0, "data.synthetic.noise", || {
                    format!("data.synthetic.noise = {}: must be a finite number >= 0", s.noise)
                });
                if let Some(shape) = s.image_shape {
                    let [channels, height, width] = shape;
                    let product = channels * height * width;
                    c.require(product == s.features, "data.synthetic.image_shape", || {
                        format!(
                            "data.synthetic: image_shape {shape:?} holds channels({channels}) x height({height}) x \
                             width({width}) = {product} values != features({})",
                            s.features
                        )
                    });
                }
                match model_kind {
                    ModelKind::Gpt => c.fail(
                        &["model.kind", "data.kind"],
                        "model.kind = \"gpt\" needs data.kind = \"text\" (got \"synthetic\")".to_string(),
                    ),
                    ModelKind::Cnn if s.image_shape.is_none() => c.fail(
                        &["model.kind", "data.synthetic.image_shape"],
                        format!(
                            "model.kind = \"cnn\" needs images: set data.synthetic.image_shape = [channels, height, \
                             width] with a product of features({}), or use data.kind = \"idx\"",
                            s.features
                        ),
                    ),
                    _ => {}
                }
            }
            DataKind::Idx => {
                for (key, path) in [
                    ("data.idx.images", &data.idx.images),
                    ("data.idx.labels", &data.idx.labels),
                ] {
                    check_file(c, key, path, "data.kind = \"idx\"");
                }
                if model_kind == ModelKind::Gpt {
                    c.fail(
                        &["model.kind", "data.kind"],
                        "model.kind = \"gpt\" needs data.kind = \"text\" (got \"idx\")".to_string(),
                    );
                }
            }
            DataKind::Text => {
                check_file(c, "data.text.path", &data.text.path, "data.kind = \"text\"");
                if model_kind == ModelKind::Gpt {
                    let block_size = self.model.gpt.block_size;
                    let len = data.text.seq_len.unwrap_or(block_size);
                    c.require(len > 0, "data.text.seq_len", || {
                        "data.text.seq_len = 0: must be at least 1".into()
                    });
                    c.require(len <= block_size, "data.text.seq_len", || {
                        format!("data.text.seq_len({len}) > model.gpt.block_size({block_size}): the model sees at most block_size tokens")
                    });
                    seq_len = Some(len);
                } else {
                    c.fail(
                        &["data.kind", "model.kind"],
                        format!(
                            "data.kind = \"text\" needs model.kind = \"gpt\" (got \"{model_kind}\"): only the GPT reads characters"
                        ),
                    );
                }
            }
        }
        for kind in DataKind::ALL.iter().filter(|&&kind| kind != data.kind) {
            let table = format!("data.{kind}");
            c.unused(&[&table], &format!("data.kind = \"{}\"", data.kind));
        }
        seq_len
    }

    fn check_optim(&self, c: &mut Checks<'_>) {
        let o = &self.optim;
        c.require(o.lr.is_finite() && o.lr > 0.0, "optim.lr", || {
            format!("optim.lr = {}: must be a finite number > 0", o.lr)
        });
        c.require((0.0..1.0).contains(&o.momentum), "optim.momentum", || {
            format!("optim.momentum = {}: must be in [0, 1)", o.momentum)
        });
        c.require(
            o.weight_decay.is_finite() && o.weight_decay >= 0.0,
            "optim.weight_decay",
            || format!("optim.weight_decay = {}: must be a finite number >= 0", o.weight_decay),
        );
        for (key, value) in [("optim.beta1", o.beta1), ("optim.beta2", o.beta2)] {
            c.require((0.0..1.0).contains(&value), key, || {
                format!("{key} = {value}: must be in [0, 1)")
            });
        }
        c.require(o.eps.is_finite() && o.eps > 0.0, "optim.eps", || {
            format!("optim.eps = {}: must be a finite number > 0", o.eps)
        });
        if !(o.min_lr >= 0.0 && o.min_lr <= o.lr) {
            c.fail(
                &["optim.min_lr", "optim.lr"],
                format!("optim: min_lr({}) must be in [0, lr({})]", o.min_lr, o.lr),
            );
        }
        c.require(
            o.grad_clip_norm.is_finite() && o.grad_clip_norm >= 0.0,
            "optim.grad_clip_norm",
            || {
                format!(
                    "optim.grad_clip_norm = {}: must be a finite number >= 0 (0 turns clipping off)",
                    o.grad_clip_norm
                )
            },
        );
        if o.warmup_steps >= self.train.steps && o.warmup_steps > 0 {
            c.note(format!(
                "optim.warmup_steps({}) >= train.steps({}): the run ends before the learning rate reaches optim.lr",
                o.warmup_steps, self.train.steps
            ));
        }
        match o.kind {
            OptimKind::Sgd => c.unused(&["optim.beta1", "optim.beta2", "optim.eps"], "optim.kind = \"sgd\""),
            OptimKind::Adam | OptimKind::AdamW => {
                c.unused(&["optim.momentum"], &format!("optim.kind = \"{}\"", o.kind))
            }
        }
        if o.schedule == LrSchedule::Constant {
            c.unused(&["optim.min_lr"], "optim.schedule = \"constant\"");
        }
    }

    /// Returns the parsed device.
    fn check_train(&self, c: &mut Checks<'_>) -> Option<DeviceSpec> {
        let t = &self.train;
        c.require(t.steps > 0, "train.steps", || {
            "train.steps = 0: must be at least 1".into()
        });
        c.require(t.batch_size > 0, "train.batch_size", || {
            "train.batch_size = 0: must be at least 1".into()
        });
        c.require(t.grad_accum_steps > 0, "train.grad_accum_steps", || {
            "train.grad_accum_steps = 0: must be at least 1 (1 = synchronize every micro step)".into()
        });
        c.require(!t.out_dir.is_empty(), "train.out_dir", || {
            "train.out_dir = \"\": needs a folder".into()
        });
        let device = DeviceSpec::parse(&t.device);
        match device {
            None => c.fail(
                &["train.device"],
                format!(
                    "train.device = {:?}: not a device; this build supports {}",
                    t.device,
                    DeviceSpec::supported()
                ),
            ),
            // A device this build cannot create would otherwise fail only in the ranks (or, before,
            // silently train on the CPU): refuse it here, where `burnrun check` sees it too.
            Some(spec) => {
                if let Err(why) = spec.check_built() {
                    c.fail(
                        &["train.device"],
                        format!(
                            "train.device = \"{spec}\" is not available: {why}; it supports {}",
                            DeviceSpec::supported()
                        ),
                    );
                }
            }
        }
        device
    }

    /// Returns the mesh (a placeholder `1 x 1 x 1` when it does not fit: the problem is recorded).
    fn check_parallel(&self, c: &mut Checks<'_>, world_size: usize) -> ParallelDims {
        let p = &self.parallel;
        let batch_size = self.train.batch_size;
        c.require(p.pipeline > 0, "parallel.pipeline", || {
            "parallel.pipeline = 0: must be at least 1".into()
        });
        c.require(p.micro_batches > 0, "parallel.micro_batches", || {
            "parallel.micro_batches = 0: must be at least 1".into()
        });
        if p.micro_batches > 0 && batch_size % p.micro_batches != 0 {
            c.fail(
                &["parallel.micro_batches", "train.batch_size"],
                format!(
                    "parallel: micro_batches({}) does not divide train.batch_size({batch_size}): {batch_size} % {} = {}",
                    p.micro_batches,
                    p.micro_batches,
                    batch_size % p.micro_batches
                ),
            );
        }

        c.require(p.tensor > 0, "parallel.tensor", || {
            "parallel.tensor = 0: must be at least 1".into()
        });
        let mut mesh = ParallelDims {
            data: 1,
            tensor: 1,
            pipeline: 1,
        };
        let (tensor, pipeline) = (p.tensor, p.pipeline);
        if pipeline > 0 && tensor > 0 && world_size > 0 {
            let per_replica = tensor * pipeline;
            if p.data == 0 {
                if world_size % per_replica == 0 {
                    mesh = ParallelDims {
                        data: world_size / per_replica,
                        tensor,
                        pipeline,
                    };
                } else {
                    c.fail(
                        &["parallel.pipeline", "parallel.tensor", "parallel.data"],
                        format!(
                            "parallel: data = 0 means WORLD_SIZE / (tensor * pipeline), but WORLD_SIZE({world_size}) % \
                             (tensor({tensor}) * pipeline({pipeline})) = {} != 0",
                            world_size % per_replica
                        ),
                    );
                }
            } else if p.data * per_replica != world_size {
                c.fail(
                    &["parallel.data", "parallel.tensor", "parallel.pipeline"],
                    format!(
                        "parallel: data({}) * tensor({tensor}) * pipeline({pipeline}) = {} != WORLD_SIZE({world_size})",
                        p.data,
                        p.data * per_replica
                    ),
                );
            } else {
                mesh = ParallelDims {
                    data: p.data,
                    tensor,
                    pipeline,
                };
            }
        }

        let blocks = self.model.num_blocks();
        let kind = self.model.kind;
        if p.pipeline > blocks {
            c.fail(
                &["parallel.pipeline"],
                format!(
                    "parallel.pipeline({}) > blocks({blocks}) of model \"{kind}\": every stage needs at least one block",
                    p.pipeline
                ),
            );
        }
        if let Partition::Boundaries(boundaries) = &p.partition {
            let expected = p.pipeline.saturating_sub(1);
            let increasing = boundaries.windows(2).all(|pair| pair[0] < pair[1]);
            let in_range = boundaries.iter().all(|&b| b >= 1 && b < blocks);
            if boundaries.len() != expected || !increasing || !in_range {
                c.fail(
                    &["parallel.partition", "parallel.pipeline"],
                    format!(
                        "parallel.partition = {boundaries:?}: needs pipeline({}) - 1 = {expected} strictly increasing \
                         block boundaries in 1..{blocks} (model \"{kind}\" has {blocks} blocks)",
                        p.pipeline
                    ),
                );
            }
        }
        let codec = self.compression.method != CompressionMethod::None;
        match p.shard {
            ShardMode::Gradients | ShardMode::Parameters if codec => c.fail(
                &["parallel.shard", "compression.method"],
                format!(
                    "parallel.shard = \"{}\" reduce-scatters plain gradients, but compression.method = \"{}\" \
                     compresses whole buckets for an all-reduce: use parallel.shard = \"optimizer\" (ZeRO-1) with a \
                     codec, or compression.method = \"none\"",
                    p.shard, self.compression.method
                ),
            ),
            ShardMode::Parameters if p.pipeline > 1 => c.fail(
                &["parallel.shard", "parallel.pipeline"],
                format!(
                    "parallel.shard = \"parameters\" (ZeRO-3) gathers and frees a whole replica's blocks one by one, \
                     and does not run inside a pipeline stage yet (parallel.pipeline = {}): use parallel.shard = \
                     \"gradients\" with a pipeline, or parallel.pipeline = 1",
                    p.pipeline
                ),
            ),
            ShardMode::Parameters if self.precision.compute == ComputeDtype::F16 => c.fail(
                &["parallel.shard", "precision.compute"],
                "parallel.shard = \"parameters\" (ZeRO-3) does not run with precision.compute = \"f16\" yet: the \
                 dynamic loss scaler checks a whole local gradient, which ZeRO-3 never holds; use \"bf16\" (no \
                 loss scaling needed)"
                    .to_string(),
            ),
            ShardMode::Optimizer | ShardMode::Gradients | ShardMode::Parameters if mesh.data == 1 => c.note(format!(
                "parallel.shard = \"{}\" has nothing to share: there is one data-parallel replica per stage",
                p.shard
            )),
            _ => {}
        }
        if p.tensor > 1 {
            self.check_tensor_parallel(c);
        }
        if p.shard == ShardMode::Parameters && self.train.check_replicas_every > 0 {
            c.note(
                "train.check_replicas_every is skipped under parallel.shard = \"parameters\": no two replicas hold \
                 the same values"
                    .to_string(),
            );
        }
        if p.pipeline == 1 {
            if p.micro_batches > 1 {
                c.note(format!(
                    "parallel.micro_batches({}) only matters with a pipeline (pipeline = 1); \
                     to accumulate gradients use train.grad_accum_steps",
                    p.micro_batches
                ));
            }
            c.unused(&["parallel.schedule", "parallel.partition"], "parallel.pipeline = 1");
        } else if p.schedule == PipelineSchedule::OneFOneB && p.micro_batches == 1 {
            c.note("parallel.schedule = \"1f1b\" with micro_batches = 1 runs exactly like \"gpipe\"".to_string());
        }
        mesh
    }

    /// With `drop_last`, an epoch of synthetic data must hold at least one batch on every rank.
    fn check_data_fits_batch(&self, c: &mut Checks<'_>, mesh: ParallelDims) {
        if self.data.kind != DataKind::Synthetic || !self.data.drop_last {
            return;
        }
        let samples = self.data.synthetic.samples;
        let per_micro_step = self.train.batch_size * mesh.data;
        if samples < per_micro_step {
            c.fail(
                &["data.synthetic.samples", "train.batch_size"],
                format!(
                    "data.synthetic.samples({samples}) < train.batch_size({}) x data-parallel ranks({}) = \
                     {per_micro_step}: with data.drop_last = true an epoch would hold no batch",
                    self.train.batch_size, mesh.data
                ),
            );
        }
    }

    fn check_comm(&self, c: &mut Checks<'_>, device: Option<DeviceSpec>) {
        let comm = &self.comm;
        c.require(
            comm.bucket_cap_mb.is_finite() && comm.bucket_cap_mb > 0.0,
            "comm.bucket_cap_mb",
            || {
                format!(
                    "comm.bucket_cap_mb = {}: must be a finite number > 0",
                    comm.bucket_cap_mb
                )
            },
        );
        c.require(comm.timeout_secs > 0, "comm.timeout_secs", || {
            "comm.timeout_secs = 0: must be at least 1".into()
        });
        c.require(comm.segment_bytes != Some(0), "comm.segment_bytes", || {
            "comm.segment_bytes = 0: must be at least 1 (or not set)".into()
        });
        if let Some(bytes) = comm.shm_ring_bytes {
            c.require(
                bytes.is_power_of_two() && bytes >= crate::names::MIN_SHM_RING_BYTES,
                "comm.shm_ring_bytes",
                || {
                    format!(
                        "comm.shm_ring_bytes = {bytes}: must be a power of two of at least {} (e.g. 2097152)",
                        crate::names::MIN_SHM_RING_BYTES
                    )
                },
            );
        }
        if comm.backend == CommBackend::Nccl {
            if device.is_some_and(|d| !d.is_cuda()) {
                c.fail(
                    &["comm.backend", "train.device"],
                    format!(
                        "comm.backend = \"nccl\" needs a GPU, but train.device = {:?} (use \"cuda\" or \"cuda:N\", or \
                         comm.backend = \"host\")",
                        self.train.device
                    ),
                );
            }
            if let Some(what) = self.nccl_unsupported() {
                c.fail(
                    &["comm.backend"],
                    format!(
                        "comm.backend = \"nccl\" does not run {what} yet: set comm.backend = \"host\" (or \"auto\", \
                         which then picks the host engine)"
                    ),
                );
            }
        }
        if comm.backend == CommBackend::Auto && device.is_some_and(|d| d.is_cuda()) {
            if let Some(what) = self.nccl_unsupported() {
                c.note(format!(
                    "comm.backend = \"auto\" picks the host engine, not NCCL: NCCL does not run {what} yet"
                ));
            }
        }
    }

    /// `parallel.tensor > 1`: the model must have a tensor-parallel form that the tensor size
    /// divides, and what does not run with it yet is refused here, naming both keys.
    fn check_tensor_parallel(&self, c: &mut Checks<'_>) {
        let t = self.parallel.tensor;
        match self.model.kind {
            ModelKind::Gpt => {
                let gpt = &self.model.gpt;
                if gpt.n_head % t != 0 {
                    c.fail(
                        &["parallel.tensor", "model.gpt.n_head"],
                        format!(
                            "parallel.tensor({t}) does not divide model.gpt.n_head({}): each tensor-parallel rank holds \
                             whole attention heads",
                            gpt.n_head
                        ),
                    );
                }
                if gpt.n_embd % t != 0 {
                    c.fail(
                        &["parallel.tensor", "model.gpt.n_embd"],
                        format!(
                            "parallel.tensor({t}) does not divide model.gpt.n_embd({}), the hidden size its layers \
                             are split along",
                            gpt.n_embd
                        ),
                    );
                }
            }
            kind => c.fail(
                &["parallel.tensor", "model.kind"],
                format!(
                    "parallel.tensor = {t}: tensor parallelism splits the attention heads and the MLP of the GPT's \
                     transformer layers, and model \"{kind}\" has none; use parallel.data or parallel.pipeline"
                ),
            ),
        }
        let not_yet = [
            (
                self.parallel.shard != ShardMode::None,
                "parallel.shard",
                "sharded data parallelism (parallel.shard)",
            ),
            (
                self.compression.method != CompressionMethod::None,
                "compression.method",
                "gradient compression",
            ),
            (
                self.checkpoint.async_write,
                "checkpoint.async",
                "asynchronous checkpoints",
            ),
        ];
        for (_, key, what) in not_yet.iter().filter(|(on, _, _)| *on) {
            c.fail(
                &["parallel.tensor", key],
                format!("parallel.tensor = {t} does not run with {what} yet: set {key} back to its default"),
            );
        }
    }

    /// What of this config the NCCL path of the trainer cannot run yet (`None`: all of it).
    fn nccl_unsupported(&self) -> Option<&'static str> {
        // fp16, bf16, top-k and PowerSGD all run on the GPU, but none has the warm-up yet.
        if self.compression.method != CompressionMethod::None && self.compression.start_step > 0 {
            Some("a codec that starts after step 0 (compression.start_step)")
        } else if self.parallel.tensor > 1 {
            Some("parallel.tensor > 1 (its all-reduces run on the host engine)")
        } else if matches!(self.parallel.shard, ShardMode::Gradients | ShardMode::Parameters) {
            Some("parallel.shard = \"gradients\" or \"parameters\" (their reduce-scatter runs on the host engine)")
        } else {
            None
        }
    }

    /// The backend that runs this config's collectives: `auto` resolved for `device`.
    pub fn backend_for(&self, device: DeviceSpec) -> CommBackend {
        match self.comm.backend {
            CommBackend::Auto if device.is_cuda() && self.nccl_unsupported().is_none() => CommBackend::Nccl,
            CommBackend::Auto => CommBackend::Host,
            chosen => chosen,
        }
    }

    fn check_checkpoint_and_log(&self, c: &mut Checks<'_>) {
        if let Some(path) = &self.checkpoint.path {
            if !self.checkpoint.resume {
                c.fail(
                    &["checkpoint.path", "checkpoint.resume"],
                    format!("checkpoint.path = {path:?} is only read when resuming: set checkpoint.resume = true"),
                );
            }
        }
        if self.checkpoint.async_write && self.checkpoint.every_steps == 0 {
            c.note(
                "checkpoint.async = true with checkpoint.every_steps = 0: the only checkpoint is the final one, \
                 which the run always waits for, so nothing is written in the background"
                    .to_string(),
            );
        }
        c.require(self.log.every_steps > 0, "log.every_steps", || {
            "log.every_steps = 0: must be at least 1".into()
        });
    }

    fn check_precision(&self, c: &mut Checks<'_>) {
        let p = &self.precision;
        c.require(
            p.loss_scale_init.is_finite() && p.loss_scale_init > 0.0,
            "precision.loss_scale_init",
            || {
                format!(
                    "precision.loss_scale_init = {}: must be a finite number > 0",
                    p.loss_scale_init
                )
            },
        );
        c.require(p.growth_interval > 0, "precision.growth_interval", || {
            "precision.growth_interval = 0: must be at least 1".into()
        });
        c.require(p.backoff > 0.0 && p.backoff < 1.0, "precision.backoff", || {
            format!("precision.backoff = {}: must be in (0, 1)", p.backoff)
        });
        c.require(
            p.growth_factor.is_finite() && p.growth_factor > 1.0,
            "precision.growth_factor",
            || {
                format!(
                    "precision.growth_factor = {}: must be a finite number > 1",
                    p.growth_factor
                )
            },
        );
        if !(p.min_scale > 0.0 && p.min_scale <= p.loss_scale_init) {
            c.fail(
                &["precision.min_scale", "precision.loss_scale_init"],
                format!(
                    "precision: min_scale({}) must be in (0, loss_scale_init({})]",
                    p.min_scale, p.loss_scale_init
                ),
            );
        }
        if p.compute != ComputeDtype::F16 {
            let why = format!("precision.compute = \"{}\" (the loss scaler is for \"f16\")", p.compute);
            c.unused(
                &[
                    "precision.loss_scale_init",
                    "precision.growth_interval",
                    "precision.backoff",
                    "precision.growth_factor",
                    "precision.min_scale",
                ],
                &why,
            );
        }
    }

    fn check_compression(&self, c: &mut Checks<'_>, mesh: ParallelDims) {
        let z = &self.compression;
        c.require(
            z.topk_ratio > 0.0 && z.topk_ratio <= 1.0,
            "compression.topk_ratio",
            || format!("compression.topk_ratio = {}: must be in (0, 1]", z.topk_ratio),
        );
        c.require(z.powersgd_rank > 0, "compression.powersgd_rank", || {
            "compression.powersgd_rank = 0: must be at least 1".into()
        });
        if z.method == CompressionMethod::None {
            c.unused(
                &[
                    "compression.topk_ratio",
                    "compression.powersgd_rank",
                    "compression.error_feedback",
                    "compression.start_step",
                ],
                "compression.method = \"none\"",
            );
            return;
        }
        let why = format!("compression.method = \"{}\"", z.method);
        if z.method != CompressionMethod::TopK {
            c.unused(&["compression.topk_ratio"], &why);
        }
        if z.method != CompressionMethod::PowerSgd {
            c.unused(&["compression.powersgd_rank"], &why);
        }
        if !z.method.is_sparsifying() {
            c.unused(&["compression.error_feedback"], &why);
        }
        if mesh.data == 1 {
            c.note(format!(
                "{why} has nothing to compress: there is one data-parallel rank"
            ));
        }
        if z.start_step >= self.train.steps {
            c.note(format!(
                "compression.start_step({}) >= train.steps({}): no step is compressed",
                z.start_step, self.train.steps
            ));
        }
    }
}

/// A data file must be named and exist (checked here so a typo fails before any rank starts).
/// Loading has already made a relative path written in the config file relative to the file's
/// folder; one given with `--set` (or in the embedded default) is relative to the current directory.
fn check_file(c: &mut Checks<'_>, key: &str, path: &str, needed_by: &str) {
    let relative_to = "a relative path in a config file starts at the file's folder, one given with --set at the \
                       current directory";
    if path.is_empty() {
        c.fail(
            &[key, "data.kind"],
            format!("{key} is not set, and {needed_by} needs it"),
        );
    } else if Path::new(path).is_dir() {
        c.fail(
            &[key],
            format!("{key} = {path:?} is a directory, not a file: name the data file in it"),
        );
    } else if !Path::new(path).is_file() {
        c.fail(&[key], format!("{key} = {path:?}: no such file ({relative_to})"));
    }
}
