//! Host staging cost per MB: how long moving an f32 buffer from this rank's device to the host and
//! back takes, the price the CPU collective engine makes a GPU (or wgpu) rank pay per gradient
//! byte. Median of `REPS` transfers per size, on the device `BURNRUN_DEVICE` names (`cpu`,
//! `wgpu`, `wgpu:cpu`; default `cpu`).
//!
//! ```text
//! cargo bench --bench staging                                         # the CPU (a copy)
//! BURNRUN_DEVICE=wgpu cargo bench --features wgpu --bench staging     # wgpu (lavapipe here)
//! ```

use std::time::Instant;

use burn::tensor::{Tensor, TensorData};

/// Transfers timed per size and direction.
const REPS: usize = 7;
/// Buffer sizes, MiB.
const SIZES_MIB: [usize; 4] = [1, 4, 16, 64];

fn median(mut ms: Vec<f64>) -> f64 {
    ms.sort_by(f64::total_cmp);
    ms[ms.len() / 2]
}

fn main() {
    let device = match burnrun::device() {
        Ok(device) => device,
        Err(e) => {
            eprintln!("staging: {e}");
            std::process::exit(1);
        }
    };
    let name = std::env::var("BURNRUN_DEVICE").unwrap_or_else(|_| "cpu".into());
    println!("host staging on `{name}`, median of {REPS} transfers");
    println!("| MiB | device -> host ms | host -> device ms | round trip ms per MiB |");
    println!("|---|---|---|---|");
    for mib in SIZES_MIB {
        let numel = mib * 1024 * 1024 / 4;
        let values: Vec<f32> = (0..numel).map(|i| (i % 1000) as f32 * 1e-3).collect();
        let (mut down, mut up) = (Vec::new(), Vec::new());
        for _ in 0..REPS {
            let data = TensorData::new(values.clone(), [numel]);
            let started = Instant::now();
            let tensor = Tensor::<1>::from_data(data, &device);
            // Force the upload: a tiny read that depends on the whole buffer's arrival.
            let _ = tensor.clone().narrow(0, 0, 1).into_data();
            up.push(started.elapsed().as_secs_f64() * 1e3);
            let started = Instant::now();
            let back = tensor.into_data().try_into_vec::<f32>().expect("f32 data");
            down.push(started.elapsed().as_secs_f64() * 1e3);
            assert_eq!(back.len(), numel);
        }
        let (down, up) = (median(down), median(up));
        println!("| {mib} | {down:.2} | {up:.2} | {:.3} |", (down + up) / mib as f64);
    }
}
