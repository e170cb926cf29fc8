//! Pipeline parallelism end to end (issue 4), through the real launcher: a model cut into P stages,
//! run with GPipe or 1F1B over micro-batches (and replicated over data-parallel ranks), must end at
//! the parameters one rank reaches on the same global batch; its checkpoints load into another
//! layout by name; and a stage that dies stops the job with a summary instead of a hang.

mod common;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{assert_params_close, config, final_params, out_dir, params_at, sets, train, Job, Params};

/// MLP pipelines: the stages compute the same blocks on micro-batches of B / M samples, and the
/// single rank on the whole batch of B, so f32 sums run in another order; the stages' gradient
/// norms add up for clipping in another order too. Measured: 3e-8 after 10 steps.
const PIPELINE_TOL: f32 = 2e-6;

/// The GPT pipeline: the same rounding through layer norms, attention softmax and AdamW, whose
/// division by the root of tiny second moments magnifies it; still far below one update (lr).
/// Measured: 3.9e-6.
const GPT_PIPELINE_TOL: f32 = 2e-5;

/// A checkpoint resumed in another layout: each block computes the same micro-batches in the same
/// order whatever stage holds it; only the sum of the stages' squared gradient norms (clipping)
/// is grouped differently.
const RESHARD_TOL: f32 = 1e-6;

/// A dead stage must bring the whole job down within this.
const TEARDOWN_DEADLINE: Duration = Duration::from_secs(20);

/// Training seed of the MLP runs. As in the data-parallel parity tests, a ReLU whose
/// pre-activation lies within rounding distance of 0 would turn rounding into an O(1) difference
/// of one unit's gradient; this seed's 10-step trajectory has no such tie.
const SEED: u64 = 1;

/// Steps of every parity run.
const STEPS: u64 = 10;

/// Per-replica batch of the MLP runs; split into `MICRO_BATCHES` micro-batches of 2 by pipelines.
const B: usize = 8;

/// Micro-batches of every pipeline run.
const MICRO_BATCHES: usize = 4;

/// An MLP with four blocks (hidden [32, 32, 32] plus the classifier: one block per stage at P = 4)
/// on a small synthetic set; SGD with momentum, gradients clipped by the global norm (so the
/// stages must add their norms up), one compute thread per rank, the replica check every 2 steps.
fn mlp(batch_size: usize, extra: &[String]) -> Vec<String> {
    let mut out = sets(&[
        "data.synthetic.features=16",
        "data.synthetic.samples=1024",
        "model.mlp.hidden=[32, 32, 32]",
        "optim.kind=sgd",
        "optim.lr=0.1",
        "optim.momentum=0.9",
        "optim.grad_clip_norm=0.5",
        "train.threads=1",
        "train.check_replicas_every=2",
        "log.every_steps=5",
        "log.progress=plain",
    ]);
    out.push(format!("train.seed={SEED}"));
    out.push(format!("train.steps={STEPS}"));
    out.push(format!("train.batch_size={batch_size}"));
    out.extend(extra.iter().cloned());
    out
}

fn pipeline_sets(stages: usize, schedule: &str) -> Vec<String> {
    vec![
        format!("parallel.pipeline={stages}"),
        format!("parallel.micro_batches={MICRO_BATCHES}"),
        format!("parallel.schedule={schedule}"),
    ]
}

/// The single-rank MLP run on a global batch of `batch_size`, trained once per test binary.
fn single_rank(batch_size: usize) -> &'static Params {
    static B1: OnceLock<Params> = OnceLock::new();
    static B2: OnceLock<Params> = OnceLock::new();
    let cell = match batch_size {
        B => &B1,
        _ if batch_size == 2 * B => &B2,
        _ => unreachable!("no reference run for batch {batch_size}"),
    };
    cell.get_or_init(|| {
        let out = out_dir(&format!("pp-single-{batch_size}"));
        train(1, &config("mlp_synthetic.toml"), &out, &mlp(batch_size, &[]));
        let params = final_params(&out);
        let _ = std::fs::remove_dir_all(&out);
        params
    })
}

/// Trains the MLP on `ranks` ranks with `extra` settings and compares with the single rank.
fn assert_mlp_parity(test: &str, ranks: usize, replicas: usize, extra: Vec<String>) {
    let out = out_dir(test);
    let finished = train(ranks, &config("mlp_synthetic.toml"), &out, &mlp(B, &extra));
    let stages = ranks / replicas;
    let ckpt = burnrun::train::checkpoint::step_dir(&out.join("checkpoints"), STEPS);
    for stage in 0..stages {
        let file = ckpt.join(format!("model-stage{stage}.safetensors"));
        assert!(file.is_file(), "{test}: no {}\n{}", file.display(), finished.output());
    }
    let reference = single_rank(B * replicas);
    assert_params_close(&final_params(&out), reference, PIPELINE_TOL, test);
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn two_stages_with_gpipe_end_at_the_single_rank_parameters() {
    assert_mlp_parity("pp2-gpipe", 2, 1, pipeline_sets(2, "gpipe"));
}

#[test]
fn two_stages_with_1f1b_end_at_the_single_rank_parameters() {
    assert_mlp_parity("pp2-1f1b", 2, 1, pipeline_sets(2, "1f1b"));
}

#[test]
fn three_stages_with_gpipe_end_at_the_single_rank_parameters() {
    assert_mlp_parity("pp3-gpipe", 3, 1, pipeline_sets(3, "gpipe"));
}

#[test]
fn three_stages_with_1f1b_end_at_the_single_rank_parameters() {
    assert_mlp_parity("pp3-1f1b", 3, 1, pipeline_sets(3, "1f1b"));
}

#[test]
fn four_stages_with_gpipe_end_at_the_single_rank_parameters() {
    assert_mlp_parity("pp4-gpipe", 4, 1, pipeline_sets(4, "gpipe"));
}

#[test]
fn four_stages_with_1f1b_end_at_the_single_rank_parameters() {
    assert_mlp_parity("pp4-1f1b", 4, 1, pipeline_sets(4, "1f1b"));
}

#[test]
fn two_replicas_of_two_stages_end_at_the_single_rank_parameters_on_the_global_batch() {
    let mut extra = pipeline_sets(2, "1f1b");
    extra.push("parallel.data=2".into());
    assert_mlp_parity("dp2-pp2", 4, 2, extra);
}

#[test]
fn an_explicit_partition_ends_at_the_single_rank_parameters() {
    // Blocks 0..1 on stage 0 and 1..4 on stage 1: a split the balanced rule would not choose.
    let mut extra = pipeline_sets(2, "gpipe");
    extra.push("parallel.partition=[1]".into());
    assert_mlp_parity("pp2-partition", 2, 1, extra);
}

/// A small GPT (n_layer 2: embeddings, two transformer blocks, head = 4 blocks) on the text shipped
/// in configs/data, with the example's AdamW, warm-up, cosine schedule and clipping.
fn gpt(extra: &[String]) -> Vec<String> {
    let mut out = sets(&[
        "model.gpt.block_size=16",
        "model.gpt.n_layer=2",
        "model.gpt.n_head=2",
        "model.gpt.n_embd=32",
        "train.batch_size=4",
        "train.threads=1",
        "train.check_replicas_every=2",
        "log.every_steps=5",
        "log.progress=plain",
        "optim.warmup_steps=3",
    ]);
    out.push(format!("train.steps={STEPS}"));
    out.extend(extra.iter().cloned());
    out
}

#[test]
fn a_gpt_cut_into_two_stages_ends_at_the_single_rank_parameters() {
    let single = out_dir("gpt-single");
    train(1, &config("gpt_text.toml"), &single, &gpt(&[]));
    for schedule in ["gpipe", "1f1b"] {
        let piped = out_dir(&format!("gpt-pp2-{schedule}"));
        let mut extra = pipeline_sets(2, schedule);
        extra[1] = "parallel.micro_batches=2".into();
        train(2, &config("gpt_text.toml"), &piped, &gpt(&extra));
        assert_params_close(
            &final_params(&piped),
            &final_params(&single),
            GPT_PIPELINE_TOL,
            &format!("GPT, 2 stages, {schedule}"),
        );
        let _ = std::fs::remove_dir_all(&piped);
    }
    let _ = std::fs::remove_dir_all(&single);
}

#[test]
fn a_checkpoint_saved_at_four_stages_resumes_at_two_stages_and_at_one_rank_to_the_same_parameters() {
    const SAVED_AT: u64 = 5;
    let four = out_dir("reshard-p4");
    let mut extra = pipeline_sets(4, "1f1b");
    extra.extend(sets(&["checkpoint.every_steps=5", "checkpoint.keep_last=0"]));
    train(4, &config("mlp_synthetic.toml"), &four, &mlp(B, &extra));
    let uninterrupted = params_at(&four, STEPS);
    let saved = burnrun::train::checkpoint::step_dir(&four.join("checkpoints"), SAVED_AT);
    for stage in 0..4 {
        assert!(
            saved.join(format!("model-stage{stage}.safetensors")).is_file(),
            "stage {stage} of the checkpoint"
        );
    }

    for (ranks, schedule) in [(2, "gpipe"), (1, "gpipe")] {
        let out = out_dir(&format!("reshard-p{ranks}"));
        let mut args = common::train_args(
            ranks,
            &config("mlp_synthetic.toml"),
            &out,
            &mlp(B, &pipeline_sets(ranks, schedule)),
        );
        args.push("--resume".into());
        args.push(saved.display().to_string());
        let finished = common::burnrun(&args);
        finished.assert_success(&format!("resuming at {ranks} stage(s)"));
        let all = format!("{}{}", finished.stdout, finished.stderr);
        assert!(
            all.contains(&format!("at step {SAVED_AT}")),
            "did not resume at step {SAVED_AT}\n{all}"
        );
        assert_params_close(
            &params_at(&out, STEPS),
            &uninterrupted,
            RESHARD_TOL,
            &format!("saved at 4 stages, resumed at {ranks}"),
        );
        let _ = std::fs::remove_dir_all(&out);
    }
    let _ = std::fs::remove_dir_all(&four);
}

/// The `peak held activations N` each stage logs at the end, by stage.
fn peak_held_by_stage(output: &str, stages: usize) -> Vec<usize> {
    (0..stages)
        .map(|stage| {
            let marker = format!("pipeline stage {stage} of {stages}:");
            let line = output
                .lines()
                .find(|l| l.contains(&marker))
                .unwrap_or_else(|| panic!("no line with {marker:?} in\n{output}"));
            let count = line
                .split("peak held activations")
                .nth(1)
                .and_then(|t| t.split_whitespace().next());
            count
                .and_then(|c| c.parse().ok())
                .unwrap_or_else(|| panic!("no peak count in {line:?}"))
        })
        .collect()
}

#[test]
fn with_1f1b_a_stage_holds_at_most_p_activations_while_gpipe_holds_every_micro_batch() {
    const STAGES: usize = 2;
    const MANY_MICRO_BATCHES: usize = 8;
    for schedule in ["gpipe", "1f1b"] {
        let out = out_dir(&format!("pp-held-{schedule}"));
        let mut extra = pipeline_sets(STAGES, schedule);
        extra[1] = format!("parallel.micro_batches={MANY_MICRO_BATCHES}");
        extra.push("train.steps=3".into());
        let finished = train(STAGES, &config("mlp_synthetic.toml"), &out, &mlp(2 * B, &extra));
        let peaks = peak_held_by_stage(&format!("{}{}", finished.stdout, finished.stderr), STAGES);
        eprintln!("{schedule}: peak held activations by stage {peaks:?}");
        if schedule == "gpipe" {
            assert_eq!(peaks, vec![MANY_MICRO_BATCHES; STAGES], "GPipe holds every micro-batch");
        } else {
            // Stage s holds at most P - s: the first stage P, the last one 1.
            assert_eq!(peaks, vec![STAGES, 1], "1F1B");
        }
        let _ = std::fs::remove_dir_all(&out);
    }
}

/// Processes whose command line mentions `needle`, as `(pid, ppid, RANK)`.
fn processes_mentioning(needle: &str) -> Vec<(i32, i32, Option<String>)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            if !String::from_utf8_lossy(&cmdline).contains(needle) {
                return None;
            }
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // "pid (comm) state ppid ...": comm may hold spaces, so fields start after the last ')'.
            let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
            let state = fields.next()?;
            if state == "Z" {
                return None;
            }
            let ppid = fields.next()?.parse().ok()?;
            let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
            let rank = environ.split(|&b| b == 0).find_map(|kv| {
                kv.strip_prefix(b"RANK=")
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            });
            Some((pid, ppid, rank))
        })
        .collect()
}

#[test]
fn a_stage_that_dies_takes_the_job_down_with_a_summary_naming_its_rank() {
    let out = out_dir("pp-dies");
    let mut extra = pipeline_sets(3, "1f1b");
    extra.extend(sets(&[
        "train.steps=1000000",
        "log.every_steps=50",
        "checkpoint.every_steps=0",
    ]));
    // A later --set of the same key wins: this job would run for hours.
    let args = common::train_args(3, &config("mlp_synthetic.toml"), &out, &mlp(B, &extra));
    let mut job = Job::start(&args);
    job.wait_for_output("[rank0]: step", Duration::from_secs(60));

    // The middle stage (rank 1): both its neighbours wait on it.
    let needle = out.display().to_string();
    let launcher = job.pid() as i32;
    let ranks = processes_mentioning(&needle);
    let middle = ranks
        .iter()
        .find(|(_, ppid, rank)| *ppid == launcher && rank.as_deref() == Some("1"))
        .unwrap_or_else(|| panic!("no rank 1 among {ranks:?}"))
        .0;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(middle), nix::sys::signal::Signal::SIGKILL).expect("kill rank 1");
    let killed_at = Instant::now();

    let finished = job.wait(Duration::from_secs(60) + TEARDOWN_DEADLINE);
    let took = killed_at.elapsed();
    let summary: Vec<&str> = finished.stderr.lines().filter(|l| l.starts_with("burnrun:")).collect();
    eprintln!("stopped {took:?} after the kill:\n{}", summary.join("\n"));
    assert!(!finished.status.success(), "the job succeeded\n{}", finished.output());
    assert!(
        took < TEARDOWN_DEADLINE,
        "the job took {took:?} to stop\n{}",
        finished.output()
    );
    // The launcher names the first failure it sees. Usually that is rank 1 and its signal; when
    // the machine is loaded, a neighbour that lost rank 1's connection may exit first, and then
    // the summary quotes that neighbour's last error, which names rank 1 as the lost peer.
    let summary = summary.join("\n");
    let names_rank_1 = summary.contains("job failed: rank 1 ") && summary.contains("SIGKILL");
    let names_peer_1 = summary.contains("job failed: rank ") && summary.contains("connection to peer 1 lost");
    assert!(
        names_rank_1 || names_peer_1,
        "the summary does not name rank 1\n{}",
        finished.output()
    );
    // No rank outlives the launcher.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = processes_mentioning(&needle);
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "ranks left behind: {left:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn the_device_path_of_the_gradients_with_two_replicas_of_two_stages_ends_at_the_single_rank_parameters() {
    // The path NCCL takes (each stage's gradients summed on its device and averaged over its
    // replicas as one flat tensor), with the host group's all-reduce standing in for NCCL.
    let out = out_dir("dp2-pp2-device-path");
    let mut overrides = mlp(B, &pipeline_sets(2, "1f1b"));
    overrides.push("parallel.data=2".into());
    overrides.push("log.progress=off".into());
    overrides.push(format!("train.out_dir={}", out.display()));
    let options = burnrun::train::TrainOptions {
        device_path_via_host: true,
        ..Default::default()
    };
    common::train_in_process(4, "mlp_synthetic.toml", &overrides, &options, STEPS);
    assert_params_close(
        &final_params(&out),
        single_rank(2 * B),
        PIPELINE_TOL,
        "dp2-pp2 device path",
    );
    let _ = std::fs::remove_dir_all(&out);
}
