//! A small character-level transformer language model with its own loss (label-smoothed
//! cross-entropy, written out by hand), trained data parallel with burnrun's `Ddp` in a
//! hand-written burn loop. Nothing here is part of burnrun but the three calls that make it
//! distributed (`init`, `Ddp::new`, `ddp.sync`).
//!
//! ```text
//! cargo build --release --examples
//! burnrun --nproc-per-node 2 -- target/release/examples/char_lm --steps 100
//! burnrun --nproc-per-node 2 -- target/release/examples/char_lm --wire bf16   # gradients as bf16 on the wire
//! ```
//!
//! Each step draws a global batch of `world x --batch` windows of `--context` characters from the
//! text at positions that depend only on (step, index in the global batch); rank r trains on its
//! own `--batch` of them. So 2 ranks x B see exactly the windows 1 rank x 2B sees.

use std::error::Error;
use std::path::PathBuf;

use burn::module::Module;
use burn::nn::attention::generate_autoregressive_mask;
use burn::nn::transformer::{TransformerEncoder, TransformerEncoderConfig, TransformerEncoderInput};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use burnrun::compress::{CodecOptions, CompressionMethod};

/// Weight of the uniform distribution mixed into the one-hot targets (Szegedy et al. 2016).
const LABEL_SMOOTHING: f32 = 0.1;

/// Token and position embeddings -> pre-LN transformer blocks -> LayerNorm -> vocabulary logits.
#[derive(Module, Debug)]
struct CharLm {
    tokens: Embedding,
    positions: Embedding,
    blocks: TransformerEncoder,
    norm: LayerNorm,
    head: Linear,
}

impl CharLm {
    fn new(vocab: usize, context: usize, width: usize, device: &Device) -> Self {
        Self {
            tokens: EmbeddingConfig::new(vocab, width).init(device),
            positions: EmbeddingConfig::new(context, width).init(device),
            blocks: TransformerEncoderConfig::new(width, 4 * width, 4, 2)
                .with_dropout(0.0)
                .with_norm_first(true)
                .init(device),
            norm: LayerNormConfig::new(width).init(device),
            head: LinearConfig::new(width, vocab).init(device),
        }
    }

    /// `[batch, seq]` token ids -> `[batch, seq, vocab]` logits, each position seeing only the past.
    fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let [batch, seq] = ids.dims();
        let device = ids.device();
        let positions = Tensor::<1, Int>::arange(0..seq as i64, &device)
            .reshape([1, seq])
            .repeat_dim(0, batch);
        let x = self.tokens.forward(ids) + self.positions.forward(positions); // [batch, seq, width]
        let mask = generate_autoregressive_mask(batch, seq, &device); // [batch, seq, seq]
        let x = self.blocks.forward(TransformerEncoderInput::new(x).mask_attn(mask));
        self.head.forward(self.norm.forward(x))
    }
}

/// Label-smoothed cross-entropy, mean over every position: `(1 - e) * NLL(target) + e * mean over
/// the vocabulary of -log p`.
fn smoothed_cross_entropy(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<1> {
    let [batch, seq, vocab] = logits.dims();
    let log_probs = log_softmax(logits.reshape([batch * seq, vocab]), 1); // [batch*seq, vocab]
    let targets = targets.reshape([batch * seq, 1]);
    let nll = log_probs.clone().gather(1, targets).neg().mean(); // [1]
    let uniform = log_probs.neg().mean(); // [1]: mean over positions and classes
    nll.mul_scalar(1.0 - LABEL_SMOOTHING) + uniform.mul_scalar(LABEL_SMOOTHING)
}

#[derive(Debug)]
struct Args {
    steps: usize,
    batch: usize,
    context: usize,
    width: usize,
    lr: f64,
    text: PathBuf,
    wire: CompressionMethod,
    losses: Option<PathBuf>,
}

impl Args {
    fn parse() -> Result<Self, Box<dyn Error>> {
        let mut args = Args {
            steps: 60,
            batch: 8,
            context: 32,
            width: 32,
            lr: 3e-3,
            text: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/configs/data/lighthouse.txt")),
            wire: CompressionMethod::None,
            losses: None,
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
            match flag.as_str() {
                "--steps" => args.steps = value()?.parse()?,
                "--batch" => args.batch = value()?.parse()?,
                "--context" => args.context = value()?.parse()?,
                "--width" => args.width = value()?.parse()?,
                "--lr" => args.lr = value()?.parse()?,
                "--text" => args.text = value()?.into(),
                "--losses" => args.losses = Some(value()?.into()),
                "--wire" => {
                    args.wire = match value()?.as_str() {
                        "f32" => CompressionMethod::None,
                        "fp16" => CompressionMethod::Fp16,
                        "bf16" => CompressionMethod::Bf16,
                        other => return Err(format!("--wire {other}: expected f32, fp16 or bf16").into()),
                    }
                }
                other => return Err(format!("unknown argument {other}").into()),
            }
        }
        Ok(args)
    }
}

/// Where window `index` of the global batch of `step` starts: a hash of both, so that it does not
/// depend on how the batch is split across ranks.
fn window_start(step: usize, index: usize, limit: usize) -> usize {
    let mut z = ((step as u64) << 32 | index as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) % limit as u64) as usize
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("char_lm: error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn Error>> {
    let args = Args::parse()?;
    let pg = burnrun::init()?;
    let (rank, world) = (pg.rank(), pg.world_size());

    let text = std::fs::read(&args.text).map_err(|e| format!("{}: {e}", args.text.display()))?;
    let mut alphabet: Vec<u8> = text.clone();
    alphabet.sort_unstable();
    alphabet.dedup();
    let ids: Vec<i64> = text
        .iter()
        .map(|b| alphabet.binary_search(b).unwrap_or(0) as i64)
        .collect();
    if ids.len() <= args.context + 1 {
        return Err(format!(
            "{}: {} characters, fewer than --context + 2",
            args.text.display(),
            ids.len()
        )
        .into());
    }

    let device = burnrun::device()?;
    let host = Device::flex().autodiff();
    host.seed(11);
    let model = CharLm::new(alphabet.len(), args.context, args.width, &host).to_device(&device);
    let options = burnrun::DdpOptions {
        compression: CodecOptions {
            method: args.wire,
            ..CodecOptions::default()
        },
        ..burnrun::DdpOptions::default()
    };
    let (mut model, mut ddp) = burnrun::Ddp::new(&pg, model, options)?;
    let mut optim = AdamWConfig::new().with_weight_decay(0.01).init();

    let limit = ids.len() - args.context - 1;
    let global_batch = world * args.batch;
    let mut losses = Vec::with_capacity(args.steps);
    for step in 0..args.steps {
        let (mut inputs, mut targets) = (Vec::new(), Vec::new());
        for index in rank * args.batch..(rank + 1) * args.batch {
            let start = window_start(step, index, limit);
            inputs.extend_from_slice(&ids[start..start + args.context]);
            targets.extend_from_slice(&ids[start + 1..start + args.context + 1]);
        }
        let shape = [args.batch, args.context];
        let x = Tensor::<2, Int>::from_data(TensorData::new(inputs, shape), &device);
        let y = Tensor::<2, Int>::from_data(TensorData::new(targets, shape), &device);
        let loss = smoothed_cross_entropy(model.forward(x), y);
        let mut mean = [loss.clone().into_scalar::<f32>()];
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let grads = ddp.sync(&model, grads)?;
        model = optim.step(args.lr, model, grads);
        pg.all_reduce(&mut mean, burnrun::ReduceOp::Avg)?;
        losses.push(mean[0]);
        if rank == 0 && (step % 10 == 0 || step + 1 == args.steps) {
            let s = ddp.stats();
            println!(
                "step {step:>4}  loss {:.4}  {} KiB of gradients, {} KiB on the wire, all-reduce {:.2} ms",
                mean[0],
                s.bytes >> 10,
                s.wire_bytes >> 10,
                s.comm_ms
            );
        }
    }
    ddp.check_replicas(&model)?;
    if rank == 0 {
        if let Some(path) = &args.losses {
            let text: Vec<String> = losses.iter().map(|l| format!("{l:.9}")).collect();
            std::fs::write(path, text.join("\n") + "\n")?;
        }
        println!(
            "trained {} steps on {world} rank(s), global batch {global_batch}",
            args.steps
        );
    }
    Ok(())
}
