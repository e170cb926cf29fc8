//! A ResNet-style CNN with BatchNorm, trained on 16x16 digit images from IDX files, with burnrun's
//! `Ddp` in a hand-written burn training loop. Nothing here is part of burnrun: it is how a burn
//! user would write the model, the data and the loop, plus the three burnrun calls (`init`,
//! `Ddp::new`, `ddp.sync`) that make it data parallel.
//!
//! ```text
//! cargo build --release --examples
//! burnrun --nproc-per-node 2 -- target/release/examples/resnet_digits --steps 50
//! BURNRUN_DEVICE=wgpu burnrun --nproc-per-node 2 -- target/release/examples/resnet_digits   # --features wgpu
//! ```
//!
//! The digits are generated on first use (ten stroke templates, randomly shifted, thickened and
//! noised) and written as MNIST-format IDX files to `--data` (default `runs/digits`), then read
//! back like any IDX data set. Each step, rank r of W trains on its own `--batch` images of a
//! global batch of W x batch; `--accum k` splits a rank's share into k micro-batches whose
//! gradients are summed before the one all-reduce (torch's `no_sync`).

use std::error::Error;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::pool::{AdaptiveAvgPool2d, AdaptiveAvgPool2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsParams, SgdConfig};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Int, Tensor, TensorData};

/// Side of the square images.
const SIDE: usize = 16;
/// Classes (digits).
const CLASSES: usize = 10;

/// conv 3x3 -> BatchNorm (-> ReLU by the caller).
#[derive(Module, Debug)]
struct ConvBn {
    conv: Conv2d,
    bn: BatchNorm,
}

impl ConvBn {
    fn new(channels_in: usize, channels_out: usize, stride: usize, device: &Device) -> Self {
        let conv = Conv2dConfig::new([channels_in, channels_out], [3, 3])
            .with_stride([stride, stride])
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
            .with_bias(false)
            .init(device);
        let bn = BatchNormConfig::new(channels_out).init(device);
        Self { conv, bn }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.bn.forward(self.conv.forward(x))
    }
}

/// A basic residual block: relu(x + bn(conv(relu(bn(conv(x)))))).
#[derive(Module, Debug)]
struct Residual {
    first: ConvBn,
    second: ConvBn,
}

impl Residual {
    fn new(channels: usize, device: &Device) -> Self {
        Self {
            first: ConvBn::new(channels, channels, 1, device),
            second: ConvBn::new(channels, channels, 1, device),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let y = relu(self.first.forward(x.clone()));
        relu(self.second.forward(y) + x)
    }
}

/// stem (1 -> 16) -> residual(16) -> downsample (16 -> 32, stride 2) -> residual(32) -> global
/// average pool -> linear(32 -> 10).
#[derive(Module, Debug)]
struct ResNet {
    stem: ConvBn,
    block1: Residual,
    down: ConvBn,
    block2: Residual,
    pool: AdaptiveAvgPool2d,
    head: Linear,
}

impl ResNet {
    fn new(device: &Device) -> Self {
        Self {
            stem: ConvBn::new(1, 16, 1, device),
            block1: Residual::new(16, device),
            down: ConvBn::new(16, 32, 2, device),
            block2: Residual::new(32, device),
            pool: AdaptiveAvgPool2dConfig::new([1, 1]).init(),
            head: LinearConfig::new(32, CLASSES).init(device),
        }
    }

    /// `[batch, 1, 16, 16]` images -> `[batch, 10]` logits.
    fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let x = relu(self.stem.forward(images)); // [batch, 16, 16, 16]
        let x = self.block1.forward(x);
        let x = relu(self.down.forward(x)); // [batch, 32, 8, 8]
        let x = self.block2.forward(x);
        let x = self.pool.forward(x); // [batch, 32, 1, 1]
        let [batch, channels, _, _] = x.dims();
        self.head.forward(x.reshape([batch, channels]))
    }
}

/// Command line: `--steps N --batch B --accum K --lr F --seed S --data DIR --losses FILE`.
#[derive(Debug)]
struct Args {
    steps: usize,
    batch: usize,
    accum: usize,
    lr: f64,
    seed: u64,
    data: PathBuf,
    losses: Option<PathBuf>,
}

impl Args {
    fn parse() -> Result<Self, Box<dyn Error>> {
        let mut args = Args {
            steps: 50,
            batch: 32,
            accum: 1,
            lr: 0.05,
            seed: 7,
            data: PathBuf::from("runs/digits"),
            losses: None,
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
            match flag.as_str() {
                "--steps" => args.steps = value()?.parse()?,
                "--batch" => args.batch = value()?.parse()?,
                "--accum" => args.accum = value()?.parse()?,
                "--lr" => args.lr = value()?.parse()?,
                "--seed" => args.seed = value()?.parse()?,
                "--data" => args.data = value()?.into(),
                "--losses" => args.losses = Some(value()?.into()),
                other => return Err(format!("unknown argument {other}").into()),
            }
        }
        if args.batch == 0 || args.accum == 0 || args.batch % args.accum != 0 {
            return Err(format!(
                "--batch {} must be a positive multiple of --accum {}",
                args.batch, args.accum
            )
            .into());
        }
        Ok(args)
    }
}

/// A small deterministic generator (SplitMix64), so every rank makes the same data set.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Writes `count` digit images and labels as IDX files into `dir`, unless they exist.
fn generate_digits(dir: &Path, count: usize) -> Result<(), Box<dyn Error>> {
    let (images_path, labels_path) = (dir.join("images-idx3-ubyte"), dir.join("labels-idx1-ubyte"));
    if images_path.exists() && labels_path.exists() {
        return Ok(());
    }
    fs::create_dir_all(dir)?;
    // Seven-segment strokes per digit on an 8x12 box: (x0, y0, x1, y1) in box units.
    const SEGMENTS: [(usize, usize, usize, usize); 7] = [
        (0, 0, 7, 0),
        (7, 0, 7, 5),
        (7, 6, 7, 11),
        (0, 11, 7, 11),
        (0, 6, 0, 11),
        (0, 0, 0, 5),
        (0, 5, 7, 6),
    ];
    const DIGITS: [u8; CLASSES] = [0x3F, 0x06, 0x5B, 0x4F, 0x66, 0x6D, 0x7D, 0x07, 0x7F, 0x6F];
    let mut rng = Rng(2024);
    let mut images = Vec::with_capacity(count * SIDE * SIDE);
    let mut labels = Vec::with_capacity(count);
    for _ in 0..count {
        let digit = rng.below(CLASSES);
        let mut pixels = [0u8; SIDE * SIDE];
        let (dx, dy) = (rng.below(SIDE - 9), rng.below(SIDE - 13));
        for (s, &(x0, y0, x1, y1)) in SEGMENTS.iter().enumerate() {
            if DIGITS[digit] & (1 << s) == 0 {
                continue;
            }
            for y in y0.min(y1)..=y0.max(y1) {
                for x in x0.min(x1)..=x0.max(x1) {
                    pixels[(y + dy) * SIDE + x + dx] = 200 + rng.below(56) as u8;
                }
            }
        }
        for p in pixels.iter_mut() {
            *p = p.saturating_add(rng.below(60) as u8);
        }
        images.extend_from_slice(&pixels);
        labels.push(digit as u8);
    }
    let mut file = fs::File::create(&images_path)?;
    file.write_all(&[0, 0, 8, 3])?;
    for dim in [count, SIDE, SIDE] {
        file.write_all(&(dim as u32).to_be_bytes())?;
    }
    file.write_all(&images)?;
    let mut file = fs::File::create(&labels_path)?;
    file.write_all(&[0, 0, 8, 1])?;
    file.write_all(&(count as u32).to_be_bytes())?;
    file.write_all(&labels)?;
    Ok(())
}

/// Reads an IDX file of unsigned bytes: (dims, data).
fn read_idx(path: &Path) -> Result<(Vec<usize>, Vec<u8>), Box<dyn Error>> {
    let bytes = fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 || bytes[2] != 8 {
        return Err(format!("{}: not an IDX file of unsigned bytes", path.display()).into());
    }
    let rank = bytes[3] as usize;
    let mut dims = Vec::with_capacity(rank);
    for i in 0..rank {
        let at = 4 + 4 * i;
        let raw: [u8; 4] = bytes.get(at..at + 4).ok_or("truncated IDX header")?.try_into()?;
        dims.push(u32::from_be_bytes(raw) as usize);
    }
    let data = bytes[4 + 4 * rank..].to_vec();
    if data.len() != dims.iter().product::<usize>() {
        return Err(format!("{}: {} data bytes for dims {dims:?}", path.display(), data.len()).into());
    }
    Ok((dims, data))
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("resnet_digits: error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn Error>> {
    let args = Args::parse()?;
    let pg = burnrun::init()?;
    let (rank, world) = (pg.rank(), pg.world_size());

    // Rank 0 writes the data set; the others wait for it at the barrier.
    if rank == 0 {
        generate_digits(&args.data, 4096)?;
    }
    pg.barrier()?;
    let (_, images) = read_idx(&args.data.join("images-idx3-ubyte"))?;
    let (_, labels) = read_idx(&args.data.join("labels-idx1-ubyte"))?;
    let samples = labels.len();

    // This rank's device: BURNRUN_DEVICE (`cpu` by default, `wgpu` with the feature), the local
    // rank's GPU where there are several.
    let device = burnrun::device()?;
    // Built on the CPU from a seed, then moved (torch's `Net().to(device)`): the same initial
    // weights on every backend. Every rank may even use its own seed: Ddp::new gives all of them
    // rank 0's tensors.
    let host = Device::flex().autodiff();
    host.seed(args.seed + rank as u64);
    let model = ResNet::new(&host).to_device(&device);
    let (mut model, mut ddp) = burnrun::Ddp::new(&pg, model, burnrun::DdpOptions::default())?;
    let mut optim = SgdConfig::new()
        .with_momentum(Some(MomentumConfig::new().with_momentum(0.9)))
        .init();
    let loss_fn = CrossEntropyLossConfig::new().init(&device);

    let micro = args.batch / args.accum;
    let global_batch = world * args.batch;
    let mut losses = Vec::with_capacity(args.steps);
    let mut timed_from: Option<std::time::Instant> = None;
    for step in 0..args.steps {
        if step == 1 {
            // The first step warms up (allocations, thread pools): timed from the second on.
            timed_from = Some(std::time::Instant::now());
        }
        let mut step_loss = 0.0f32;
        for m in 0..args.accum {
            // This rank's micro-batch m of the global batch of this step (wrapping around).
            let first = step * global_batch + rank * args.batch + m * micro;
            let ids: Vec<usize> = (first..first + micro).map(|i| i % samples).collect();
            let pixels: Vec<f32> = ids
                .iter()
                .flat_map(|&i| {
                    images[i * SIDE * SIDE..(i + 1) * SIDE * SIDE]
                        .iter()
                        .map(|&p| p as f32 / 255.0)
                })
                .collect();
            let targets: Vec<i64> = ids.iter().map(|&i| labels[i] as i64).collect();
            let x = Tensor::<4>::from_data(TensorData::new(pixels, [micro, 1, SIDE, SIDE]), &device);
            let y = Tensor::<1, Int>::from_data(TensorData::new(targets, [micro]), &device);
            // Micro-batch gradients are summed: scale for the mean over this rank's batch.
            let loss = loss_fn.forward(model.forward(x), y) / args.accum as f32;
            step_loss += loss.clone().into_scalar::<f32>();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            if m + 1 < args.accum {
                ddp.accumulate(&model, grads)?;
            } else {
                let grads = ddp.sync(&model, grads)?;
                model = optim.step(args.lr, model, grads);
            }
        }
        model = ddp.sync_buffers(model)?;
        // The global mean loss of the step, for the log.
        let mut mean = [step_loss];
        pg.all_reduce(&mut mean, burnrun::ReduceOp::Avg)?;
        losses.push(mean[0]);
        if rank == 0 && (step % 10 == 0 || step + 1 == args.steps) {
            let s = ddp.stats();
            println!(
                "step {step:>4}  loss {:.4}  all-reduce {:.2} ms ({} buckets, {} KiB)",
                mean[0],
                s.comm_ms,
                s.buckets,
                s.bytes >> 10
            );
        }
    }
    ddp.check_replicas(&model)?;
    if rank == 0 {
        if let Some(path) = &args.losses {
            let text: Vec<String> = losses.iter().map(|l| format!("{l:.9}")).collect();
            fs::write(path, text.join("\n") + "\n")?;
        }
        let samples_per_sec = timed_from.filter(|_| args.steps > 1).map_or(0.0, |t| {
            ((args.steps - 1) * global_batch) as f64 / t.elapsed().as_secs_f64()
        });
        println!(
            "trained {} steps on {world} rank(s), global batch {global_batch}: {samples_per_sec:.0} samples/s",
            args.steps
        );
    }
    Ok(())
}
