//! PowerSGD on the gradients' device (`burnrun::parallel::DevicePowerSgd`) against the host codec
//! (`burnrun::compress::PowerSgd`), with the host group standing in for NCCL (`HostDeviceSum`):
//! the codecs side by side on the same buckets over several steps (outputs, residuals and Q
//! factors, a state handed from one to the other), the trainer's device path against its host
//! path at the same seed, and checkpoints of either path resumed by the other.

mod common;

use std::ops::Range;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use burnrun::comm::{spawn_ranks, InitOptions, ProcessGroup};
use burnrun::compress::{residual_name, GradCodec, PowerSgd, StateTensor};
use burnrun::parallel::{DevicePowerSgd, FlatReduce, HostDeviceSum};
use burnrun::train::checkpoint::{codec_state_path, read_tensors, step_dir};
use burnrun::train::TrainOptions;

use common::{assert_params_close, final_params, max_abs_diff, out_dir, params_at, sets, Params};

/// The codecs side by side: the device computes in f32 with burn's matmuls and classical
/// Gram-Schmidt, the host accumulates its column dots and norms in f64 with modified
/// Gram-Schmidt, so outputs, residuals and factors (values up to about 30: the Q factors are
/// sums over a matrix's rows) differ in their last bits only, a few ulps of the largest.
/// Measured: at most 5.7e-6 over 8 steps (outputs, residuals and Q factors, both ranks).
const CODEC_PARITY_TOL: f32 = 5e-5;

/// Rank of the factors in the side-by-side runs (the matrices have 3 columns or more).
const FACTOR_RANK: usize = 3;

/// Steps of the side-by-side runs, then two more after the states are swapped.
const CODEC_STEPS: u64 = 6;

/// At this step bucket 1's gradient is zero on every rank: every column of its P is dropped, its
/// Q factor vanishes, and every column is redrawn from the seed and the step.
const ZERO_STEP: u64 = 0;

/// At this step bucket 1's matrix is `u v_r^T` with the same `u` on every rank: the summed P has
/// rank 1, so Gram-Schmidt keeps one column and drops the others as dependent.
const RANK_ONE_STEP: u64 = 1;

/// At this step rank 1's gradient has a NaN in bucket 0's first matrix: the P sum is not finite,
/// both codecs return NaN for bucket 0's factored matrices and keep its state.
const NAN_STEP: u64 = 3;

/// The seed of the Q factors.
const SEED: u64 = 7;

/// Buckets of parameter shapes: factored matrices (2-D, and 3-D viewed as `[shape[0], rest]`), a
/// matrix too small to factor at rank 3 (sent dense), biases, a 0-d scalar, and a bucket with
/// nothing factored.
fn bucket_shapes() -> Vec<Vec<Vec<usize>>> {
    vec![
        vec![vec![16, 24], vec![24], vec![12, 4, 5], vec![10, 3]],
        vec![vec![20, 30], vec![30]],
        vec![vec![5], vec![]],
    ]
}

/// Each bucket's range of elements in the flat gradient.
fn bucket_ranges(shapes: &[Vec<Vec<usize>>]) -> Vec<Range<usize>> {
    let mut start = 0;
    shapes
        .iter()
        .map(|bucket| {
            let numel: usize = bucket.iter().map(|s| s.iter().product::<usize>()).sum();
            start += numel;
            start - numel..start
        })
        .collect()
}

/// A value in [-1, 1) drawn from `key` (SplitMix64's finaliser).
fn draw(key: u64) -> f32 {
    let mut z = key.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

/// Rank `rank`'s flat gradient at `step`, with the special steps above.
fn gradient(rank: usize, step: u64, shapes: &[Vec<Vec<usize>>]) -> Vec<f32> {
    let ranges = bucket_ranges(shapes);
    let mut grads: Vec<f32> = (0..ranges.last().map_or(0, |r| r.end))
        .map(|i| draw(((rank as u64) << 48) ^ (step << 32) ^ i as u64))
        .collect();
    let (rows, cols) = (shapes[1][0][0], shapes[1][0][1]);
    let matrix = &mut grads[ranges[1].start..ranges[1].start + rows * cols];
    match step {
        ZERO_STEP => matrix.fill(0.0),
        RANK_ONE_STEP => {
            for i in 0..rows {
                for k in 0..cols {
                    let u = draw(1000 + i as u64);
                    let v = draw(((rank as u64) << 20) ^ (2000 + k as u64));
                    matrix[i * cols + k] = u * v;
                }
            }
        }
        _ => {}
    }
    if step == NAN_STEP && rank == 1 {
        grads[ranges[0].start + 5] = f32::NAN;
    }
    grads
}

/// The host codec's residuals, buckets one after another (`None` before the first step).
fn host_residual(codec: &PowerSgd, buckets: usize) -> Option<Vec<f32>> {
    let mut flat = Vec::new();
    for b in 0..buckets {
        flat.extend_from_slice(codec.residual(b)?);
    }
    Some(flat)
}

/// The host codec's Q factors, by name.
fn host_factors(codec: &PowerSgd) -> Vec<StateTensor> {
    let mut q: Vec<StateTensor> = codec.state().into_iter().filter(|t| t.name.starts_with("q.")).collect();
    q.sort_by(|a, b| a.name.cmp(&b.name));
    q
}

/// Largest |a - b| over two equally long slices, NaN only where both are NaN; `Err` names the
/// first element that is NaN on one side only.
fn diff(what: &str, a: &[f32], b: &[f32]) -> Result<f32, String> {
    if a.len() != b.len() {
        return Err(format!("{what}: {} values against {}", a.len(), b.len()));
    }
    let mut worst = 0f32;
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        match (x.is_nan(), y.is_nan()) {
            (true, true) => continue,
            (false, false) => worst = worst.max((x - y).abs()),
            _ => return Err(format!("{what}: element {i} is {x} on one side, {y} on the other")),
        }
    }
    Ok(worst)
}

/// Largest difference between two sets of factors, which must have the same names and shapes.
fn factors_diff(what: &str, a: &[StateTensor], b: &[StateTensor]) -> Result<f32, String> {
    let mut b = b.to_vec();
    b.sort_by(|x, y| x.name.cmp(&y.name));
    let names = |t: &[StateTensor]| t.iter().map(|t| (t.name.clone(), t.shape.clone())).collect::<Vec<_>>();
    if names(a) != names(&b) {
        return Err(format!("{what}: factors {:?} against {:?}", names(a), names(&b)));
    }
    a.iter()
        .zip(&b)
        .try_fold(0f32, |worst, (x, y)| Ok(worst.max(diff(&x.name, &x.data, &y.data)?)))
}

/// The device codec over `pg`, as the trainer builds it.
fn device_codec(pg: &ProcessGroup, shapes: &[Vec<Vec<usize>>]) -> DevicePowerSgd {
    let codec = PowerSgd::new(FACTOR_RANK, true, SEED);
    DevicePowerSgd::new(Box::new(HostDeviceSum::new(pg)), codec, &bucket_ranges(shapes), shapes)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// One step of the host codec over every bucket of `grads` (in place).
fn host_step(codec: &mut PowerSgd, pg: &ProcessGroup, shapes: &[Vec<Vec<usize>>], grads: &mut [f32], step: u64) {
    for (b, range) in bucket_ranges(shapes).into_iter().enumerate() {
        codec
            .all_reduce_avg(pg, b, &shapes[b], &mut grads[range], step)
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

/// One step of the device codec on `grads`, uploaded to `device`; the output read back.
fn device_step(codec: &DevicePowerSgd, device: &Device, grads: &[f32], step: u64) -> Vec<f32> {
    let flat = Tensor::<1>::from_data(TensorData::new(grads.to_vec(), [grads.len()]), device);
    codec.set_step(step);
    let out = FlatReduce::average(codec, flat).unwrap_or_else(|e| panic!("{e}"));
    out.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 values")
}

/// Compares a host and a device codec after a step: outputs, residuals and factors; returns the
/// largest difference.
fn compare(
    what: &str,
    host: (&PowerSgd, &[f32]),
    device: (&DevicePowerSgd, &[f32]),
    buckets: usize,
) -> Result<f32, String> {
    let outputs = diff(&format!("{what}: outputs"), host.1, device.1)?;
    let host_res = host_residual(host.0, buckets).ok_or(format!("{what}: the host codec has no residual"))?;
    let device_res = device
        .0
        .residual()
        .map_err(|e| e.to_string())?
        .ok_or(format!("{what}: the device codec has no residual"))?;
    let residuals = diff(&format!("{what}: residuals"), &host_res, &device_res)?;
    let factors = factors_diff(
        &format!("{what}: Q factors"),
        &host_factors(host.0),
        &device.0.factors().map_err(|e| e.to_string())?,
    )?;
    Ok(outputs.max(residuals).max(factors))
}

#[test]
fn device_powersgd_matches_the_host_codec_step_by_step_and_either_state_resumes_the_other() {
    let shapes = bucket_shapes();
    let buckets = shapes.len();
    let results = spawn_ranks(2, &InitOptions::default(), |pg| -> Result<f32, String> {
        let rank = pg.rank();
        let device = Device::flex();
        let mut host = PowerSgd::new(FACTOR_RANK, true, SEED);
        let on_device = device_codec(&pg, &shapes);
        let mut worst = 0f32;
        for step in 0..CODEC_STEPS {
            let mut grads = gradient(rank, step, &shapes);
            let device_out = device_step(&on_device, &device, &grads, step);
            host_step(&mut host, &pg, &shapes, &mut grads, step);
            let what = format!("rank {rank}, step {step}");
            worst = worst.max(compare(&what, (&host, &grads), (&on_device, &device_out), buckets)?);
            if step == NAN_STEP {
                let bucket0 = &device_out[bucket_ranges(&shapes)[0].clone()];
                if !bucket0.iter().any(|x| x.is_nan()) {
                    return Err(format!("{what}: a NaN in bucket 0 did not reach the output"));
                }
            }
        }
        // Hand each codec's state to a fresh codec of the other kind, under the checkpoint's
        // names, and run on: all four agree.
        let mut host_from_device = PowerSgd::new(FACTOR_RANK, true, SEED);
        let residual = on_device.residual().map_err(|e| e.to_string())?.expect("a residual");
        let mut state = on_device.factors().map_err(|e| e.to_string())?;
        for (b, range) in bucket_ranges(&shapes).into_iter().enumerate() {
            state.push(StateTensor {
                name: residual_name(b),
                shape: vec![range.len()],
                data: residual[range].to_vec(),
            });
        }
        host_from_device
            .load_state(&shapes, state)
            .map_err(|e| format!("rank {rank}: the host codec refused the device state: {e}"))?;
        let device_from_host = device_codec(&pg, &shapes);
        device_from_host
            .load_factors(&host.state())
            .and_then(|()| device_from_host.load_residual(&host_residual(&host, buckets).expect("a residual")))
            .map_err(|e| format!("rank {rank}: the device codec refused the host state: {e}"))?;
        for step in CODEC_STEPS..CODEC_STEPS + 2 {
            let grads = gradient(rank, step, &shapes);
            let (mut host_out, mut swapped_out) = (grads.clone(), grads.clone());
            host_step(&mut host, &pg, &shapes, &mut host_out, step);
            host_step(&mut host_from_device, &pg, &shapes, &mut swapped_out, step);
            let device_out = device_step(&on_device, &device, &grads, step);
            let swapped_device_out = device_step(&device_from_host, &device, &grads, step);
            let what = format!("rank {rank}, step {step}");
            for (name, host_codec, host_values, device_codec, device_values) in [
                ("host vs device", &host, &host_out, &on_device, &device_out),
                (
                    "host from device state vs device from host state",
                    &host_from_device,
                    &swapped_out,
                    &device_from_host,
                    &swapped_device_out,
                ),
                (
                    "host vs device from host state",
                    &host,
                    &host_out,
                    &device_from_host,
                    &swapped_device_out,
                ),
            ] {
                worst = worst.max(compare(
                    &format!("{what}, {name}"),
                    (host_codec, host_values),
                    (device_codec, device_values),
                    buckets,
                )?);
            }
        }
        Ok(worst)
    })
    .expect("ranks join");
    for (rank, result) in results.into_iter().enumerate() {
        let worst = result.unwrap_or_else(|e| panic!("{e}"));
        eprintln!("rank {rank}: device vs host codec, max |difference| = {worst:e}, tolerance {CODEC_PARITY_TOL:e}");
        assert!(
            worst <= CODEC_PARITY_TOL,
            "rank {rank}: the device codec differs from the host codec by {worst:e}"
        );
    }
}

#[test]
fn a_device_codec_over_buckets_that_do_not_fit_its_shapes_is_refused_naming_the_rank_and_bucket() {
    let results = spawn_ranks(1, &InitOptions::default(), |pg| {
        let shapes = bucket_shapes();
        let mut ranges = bucket_ranges(&shapes);
        ranges[1].end += 1;
        ranges[2].start += 1;
        ranges[2].end += 1;
        let codec = PowerSgd::new(FACTOR_RANK, true, SEED);
        DevicePowerSgd::new(Box::new(HostDeviceSum::new(&pg)), codec, &ranges, &shapes)
            .map(|_| ())
            .unwrap_err()
            .to_string()
    })
    .expect("ranks join");
    assert!(
        results[0].contains("rank 0: powersgd codec, bucket 1: the shapes"),
        "{}",
        results[0]
    );
}

/// PowerSGD on the trainer's device path against the host codec, same seed, 2 ranks, SGD with
/// momentum: the same decisions, f32 rounding apart (see [`CODEC_PARITY_TOL`]; the gradients
/// here are small), which SGD carries forward and a lossy codec amplifies a little (the next
/// step's factors start from the rounded ones). Measured after 10 steps: parameters 1.3e-7 apart
/// (6.7e-8 accumulating 2 micro-batches), the codec states at step 5 1.7e-7, either path resumed
/// from the other's checkpoint 7.5e-8 from the other's whole run. A resume that drops the codec
/// state ends 4.5e-2 away, one that drops only the Q factors 2.6e-2 (measured once by disabling
/// the hand-over): far outside.
const TRAIN_PARITY_TOL: f32 = 1e-5;

/// Steps of the training runs; checkpoints at half.
const TRAIN_STEPS: u64 = 10;

/// A small MLP in 2-KiB buckets (so PowerSGD keeps state for several), SGD with momentum, one
/// compute thread per rank, gradients sent by `run.method` (PowerSGD of rank 2: every weight
/// matrix factored, biases dense), checkpoints every `TRAIN_STEPS / 2` steps.
fn mlp_sets(out: &Path, run: &Run) -> Vec<String> {
    let mut out_sets = sets(&[
        "data.synthetic.features=16",
        "data.synthetic.samples=512",
        "model.mlp.hidden=[32, 32]",
        "optim.kind=sgd",
        "optim.lr=0.1",
        "optim.momentum=0.9",
        "train.batch_size=8",
        "train.seed=1",
        "train.threads=1",
        "comm.bucket_cap_mb=0.002",
        "checkpoint.keep_last=0",
        "log.every_steps=5",
        "log.progress=off",
    ]);
    out_sets.push(format!("checkpoint.every_steps={}", TRAIN_STEPS / 2));
    out_sets.push(format!("train.steps={TRAIN_STEPS}"));
    out_sets.push(format!("train.grad_accum_steps={}", run.accum));
    out_sets.push(format!("compression.method={}", run.method));
    if run.method == "powersgd" {
        out_sets.push("compression.powersgd_rank=2".into());
    }
    out_sets.push(format!("train.out_dir={}", out.display()));
    out_sets
}

/// One training run of the MLP on 2 ranks.
struct Run {
    /// `compression.method`.
    method: &'static str,
    /// `train.grad_accum_steps`.
    accum: usize,
    /// The device path (with the host group standing in for NCCL), or the host path.
    device_path: bool,
    /// A checkpoint to resume from.
    resume: Option<PathBuf>,
}

impl Run {
    /// PowerSGD on the device path or the host path, accumulating `accum` micro-batches.
    fn powersgd(device_path: bool, accum: usize) -> Self {
        Self {
            method: "powersgd",
            accum,
            device_path,
            resume: None,
        }
    }

    /// Trains on 2 ranks in this process (threads) into `out`, to `TRAIN_STEPS`.
    fn train(self, out: &Path) {
        let overrides = mlp_sets(out, &self);
        let options = TrainOptions {
            device_path_via_host: self.device_path,
            resume: self.resume,
        };
        common::train_in_process(2, "mlp_synthetic.toml", &overrides, &options, TRAIN_STEPS);
    }
}

/// Rank `rank`'s codec state in the checkpoint at `step` under `out`.
fn codec_state(out: &Path, step: u64, rank: usize) -> Params {
    let path = codec_state_path(&step_dir(&out.join("checkpoints"), step), rank);
    read_tensors(&path).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn powersgd_on_the_device_path_trains_where_the_host_codec_does_also_when_accumulating() {
    for accum in [1, 2] {
        let device = out_dir(&format!("device-powersgd-{accum}"));
        let host = out_dir(&format!("host-powersgd-{accum}"));
        Run::powersgd(true, accum).train(&device);
        Run::powersgd(false, accum).train(&host);
        assert_params_close(
            &final_params(&device),
            &final_params(&host),
            TRAIN_PARITY_TOL,
            &format!("PowerSGD on the device path vs the host codec, accum {accum}"),
        );
        // The device path compressed: plain averaging ends far from it.
        let plain = out_dir(&format!("device-plain-{accum}"));
        Run {
            method: "none",
            ..Run::powersgd(true, accum)
        }
        .train(&plain);
        let (apart, name) = max_abs_diff(&final_params(&device), &final_params(&plain));
        assert!(
            apart > 100.0 * TRAIN_PARITY_TOL,
            "accum {accum}: the device path's PowerSGD ends only {apart:e} (at {name}) from uncompressed training"
        );
        for dir in [device, host, plain] {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

#[test]
fn a_checkpoint_of_either_path_resumes_the_other_with_its_residuals_and_q_factors() {
    // Two micro-batches per step: the device codec's state is in the host codec's units (the
    // mean gradient), not the sum's.
    let accum = 2;
    let device = out_dir("ckpt-device-powersgd");
    let host = out_dir("ckpt-host-powersgd");
    Run::powersgd(true, accum).train(&device);
    Run::powersgd(false, accum).train(&host);

    // The device path saved its state under the host codec's names, with the host's values.
    let half = TRAIN_STEPS / 2;
    for rank in 0..2 {
        let (on_device, on_host) = (codec_state(&device, half, rank), codec_state(&host, half, rank));
        let mut names: Vec<&String> = on_device.keys().collect();
        names.sort();
        let mut host_names: Vec<&String> = on_host.keys().collect();
        host_names.sort();
        assert_eq!(names, host_names, "rank {rank}: the device path saved other tensors");
        assert!(
            names.iter().any(|n| n.starts_with("q.bucket")) && names.iter().any(|n| n.starts_with("residual.bucket")),
            "rank {rank}: {names:?}"
        );
        assert_params_close(
            &on_device,
            &on_host,
            TRAIN_PARITY_TOL,
            &format!("rank {rank}'s codec state at step {half}, device path vs host"),
        );
    }

    // Each path resumes the other's checkpoint and ends where the other path's whole run does.
    let host_from_device = out_dir("host-from-device-powersgd");
    let device_from_host = out_dir("device-from-host-powersgd");
    let checkpoint = |out: &Path| Some(step_dir(&out.join("checkpoints"), half));
    Run {
        resume: checkpoint(&device),
        ..Run::powersgd(false, accum)
    }
    .train(&host_from_device);
    Run {
        resume: checkpoint(&host),
        ..Run::powersgd(true, accum)
    }
    .train(&device_from_host);
    assert_params_close(
        &params_at(&host_from_device, TRAIN_STEPS),
        &final_params(&host),
        TRAIN_PARITY_TOL,
        "the host codec resumed from the device path's checkpoint vs the host run",
    );
    assert_params_close(
        &params_at(&device_from_host, TRAIN_STEPS),
        &final_params(&device),
        TRAIN_PARITY_TOL,
        "the device path resumed from the host codec's checkpoint vs the device run",
    );
    for dir in [device, host, host_from_device, device_from_host] {
        let _ = std::fs::remove_dir_all(dir);
    }
}
