//! `burnrun`: the command users type. Parses the command line and dispatches; nothing else.
//!
//! - `burnrun [launch options] train [CONFIG.toml] [--set key=value]... [--resume PATH]`
//! - `burnrun [launch options] bench <allreduce|allgather|reducescatter|broadcast|alltoall|sendrecv> [options]`
//! - `burnrun [launch options] check CONFIG.toml [--set key=value]...`
//! - `burnrun [launch options] -- PROGRAM [ARGS]...`
//!
//! With a launch option (or `--`), this process becomes the launcher: it starts the ranks, each
//! one this same binary with the subcommand's arguments (or PROGRAM), and supervises them. Without
//! one, the subcommand runs here, as a single rank or as the rank a launcher started.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, CommandFactory, Parser, Subcommand};

use burnrun::bench::{BenchDevice, CollectiveBenchOptions};
use burnrun::config::{check_report, RunConfig};
use burnrun::env::DistEnv;
use burnrun::launcher::{self, LaunchOptions, RankCommand};

/// Distributed training for burn: a torchrun-style launcher, collectives over TCP, benchmarks.
#[derive(Debug, Parser)]
#[command(name = "burnrun", version, after_help = EXAMPLES)]
struct Cli {
    #[command(flatten)]
    launch: LaunchArgs,
    #[command(subcommand)]
    command: Option<Command>,
    /// Any program to run as every rank, with its arguments (after `--`).
    #[arg(last = true, value_name = "PROGRAM [ARGS]")]
    program: Vec<OsString>,
}

const EXAMPLES: &str = "\
Examples:
  burnrun --nproc-per-node 4 bench allreduce --max-bytes 64M
  burnrun --nproc-per-node 8 bench allreduce --device cuda --max-bytes 1G     (feature nccl; one GPU per rank)
  burnrun --nproc-per-node 2 train configs/mlp_synthetic.toml --set optim.lr=3e-4
  burnrun --nnodes 2 --node-rank 0 --master-addr node0 --master-port 29500 --secret-file job.key -- ./my_program
  burnrun check configs/mlp_synthetic.toml";

/// Launch options, torchrun's names (`--nproc_per_node` spellings are accepted too). Giving any
/// of them starts a launcher; with none, the subcommand runs in this process as one rank.
#[derive(Debug, Default, Args)]
#[command(next_help_heading = "Launch options")]
struct LaunchArgs {
    /// Ranks to start on this node [default: 1].
    #[arg(long, alias = "nproc_per_node", value_name = "N")]
    nproc_per_node: Option<usize>,
    /// Nodes in the job [default: 1].
    #[arg(long, value_name = "M")]
    nnodes: Option<usize>,
    /// This node's index; node 0 hosts the rendezvous store [default: 0].
    #[arg(long, alias = "node_rank", value_name = "R")]
    node_rank: Option<usize>,
    /// Host of node 0's store [default: 127.0.0.1].
    #[arg(long, alias = "master_addr", value_name = "HOST")]
    master_addr: Option<String>,
    /// Port of node 0's store; 0 picks a free one (single node only) [default: 0].
    #[arg(long, alias = "master_port", value_name = "PORT")]
    master_port: Option<u16>,
    /// Deadline of the rendezvous, in seconds [default: BURNRUN_RDZV_TIMEOUT_SECS or 300].
    #[arg(long, alias = "rdzv_timeout", value_name = "SECS")]
    rdzv_timeout: Option<u64>,
    /// Deadline of every collective in the ranks, in seconds [default: BURNRUN_TIMEOUT_SECS or 300].
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
    /// Seconds between SIGTERM and SIGKILL when ranks are stopped [default: 5].
    #[arg(long, value_name = "SECS")]
    grace_period: Option<f64>,
    /// Also write each rank's output to DIR/rank_N.stdout and DIR/rank_N.stderr.
    #[arg(long, alias = "log_dir", value_name = "DIR")]
    log_dir: Option<PathBuf>,
    /// The job's id [default: random; other nodes take node 0's].
    #[arg(long, alias = "run_id", value_name = "ID")]
    run_id: Option<String>,
    /// File with the job secret (64 hex digits, mode 0600: a file others can read is refused);
    /// node 0 creates it (0600) when missing. Without it, and without BURNRUN_SECRET, a multi-node
    /// job derives its secret from --run-id, or without one from --master-port (insecure: anyone
    /// who knows it can join).
    #[arg(long, value_name = "PATH")]
    secret_file: Option<PathBuf>,
    /// Restart the whole job up to K times after a failure: every node stops its ranks, all meet
    /// again and start them anew (the trainer resumes from its latest checkpoint) [default: 0].
    #[arg(long, alias = "max_restarts", value_name = "K")]
    max_restarts: Option<u32>,
    /// Seconds between two looks at the other nodes' state in the store [default: 0.15].
    #[arg(long, alias = "monitor_interval", value_name = "SECS")]
    monitor_interval: Option<f64>,
    /// Stop the job with a hang report when a rank makes no progress (no collective finishes, no
    /// training step or phase begins) for SECS [default: off: only --timeout finds hangs].
    #[arg(long, value_name = "SECS")]
    stall_timeout: Option<f64>,
}

impl LaunchArgs {
    fn any(&self) -> bool {
        let Self {
            nproc_per_node,
            nnodes,
            node_rank,
            master_addr,
            master_port,
            rdzv_timeout,
            timeout,
            grace_period,
            log_dir,
            run_id,
            secret_file,
            max_restarts,
            monitor_interval,
            stall_timeout,
        } = self;
        nproc_per_node.is_some()
            || nnodes.is_some()
            || node_rank.is_some()
            || master_addr.is_some()
            || master_port.is_some()
            || rdzv_timeout.is_some()
            || timeout.is_some()
            || grace_period.is_some()
            || log_dir.is_some()
            || run_id.is_some()
            || secret_file.is_some()
            || max_restarts.is_some()
            || monitor_interval.is_some()
            || stall_timeout.is_some()
    }

    fn options(&self) -> anyhow::Result<LaunchOptions> {
        let defaults = LaunchOptions::default();
        let grace_period = match self.grace_period {
            Some(secs) => Duration::try_from_secs_f64(secs).context("--grace-period must be a non-negative number")?,
            None => defaults.grace_period,
        };
        let monitor_interval = match self.monitor_interval {
            Some(secs) if secs > 0.0 => {
                Duration::try_from_secs_f64(secs).context("--monitor-interval must be a positive number of seconds")?
            }
            Some(_) => anyhow::bail!("--monitor-interval must be a positive number of seconds"),
            None => defaults.monitor_interval,
        };
        let stall_timeout = match self.stall_timeout {
            Some(secs) if secs > 0.0 => Some(
                Duration::try_from_secs_f64(secs).context("--stall-timeout must be a positive number of seconds")?,
            ),
            Some(_) => anyhow::bail!("--stall-timeout must be a positive number of seconds"),
            None => None,
        };
        Ok(LaunchOptions {
            nproc_per_node: self.nproc_per_node.unwrap_or(defaults.nproc_per_node),
            nnodes: self.nnodes.unwrap_or(defaults.nnodes),
            node_rank: self.node_rank.unwrap_or(defaults.node_rank),
            master_addr: self.master_addr.clone().unwrap_or(defaults.master_addr),
            master_port: self.master_port.unwrap_or(defaults.master_port),
            rdzv_timeout: self.rdzv_timeout.map(Duration::from_secs),
            timeout: self.timeout.map(Duration::from_secs),
            grace_period,
            log_dir: self.log_dir.clone(),
            run_id: self.run_id.clone(),
            secret_file: self.secret_file.clone(),
            max_restarts: self.max_restarts.unwrap_or(defaults.max_restarts),
            monitor_interval,
            stall_timeout,
        })
    }

    fn world_size(&self) -> usize {
        self.nnodes.unwrap_or(1) * self.nproc_per_node.unwrap_or(1)
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train a model described by a TOML run config (the built-in trainer).
    Train(TrainArgs),
    /// Time a collective over a range of sizes and print nccl-tests' table.
    Bench(CollectiveBenchOptions),
    /// Load and validate a run config, and print the resolved settings, batch arithmetic and rank mesh.
    Check(CheckArgs),
}

#[derive(Debug, Args)]
struct TrainArgs {
    /// The run config [default: the built-in configs/mlp_synthetic.toml].
    #[arg(value_name = "CONFIG.toml")]
    config: Option<PathBuf>,
    /// Override one setting, e.g. `--set optim.lr=3e-4` (repeatable; the key must exist).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Resume from this checkpoint.
    #[arg(long, value_name = "PATH")]
    resume: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct CheckArgs {
    /// The run config.
    #[arg(value_name = "CONFIG.toml")]
    config: PathBuf,
    /// Override one setting, e.g. `--set optim.lr=3e-4` (repeatable; the key must exist).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("burnrun: error: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line; a cause already quoted by the message before it (the
/// library's errors include their source) is not repeated.
fn describe(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let launching = cli.launch.any() || !cli.program.is_empty();
    match (&cli.command, cli.program.first()) {
        (None, None) => {
            bail!("nothing to run: give a subcommand (train, bench, check) or `-- PROGRAM`; see `burnrun --help`")
        }
        (Some(_), Some(_)) => bail!("give either a subcommand or `-- PROGRAM`, not both"),
        _ => {}
    }
    // `check` never starts ranks: launch options only tell it the world size to check against.
    if launching && !matches!(cli.command, Some(Command::Check(_))) {
        burnrun::telemetry::init_logging(None);
        // A bad config fails here, naming the key and line, before any rank starts.
        // Likewise a bad benchmark option, before the store or any rank starts.
        match &cli.command {
            Some(Command::Train(args)) => {
                load_train_config(args)?.validate(cli.launch.world_size())?;
            }
            Some(Command::Bench(options)) => {
                options.validate(cli.launch.world_size())?;
                check_bench_device(options)?;
            }
            _ => {}
        }
        let command = match cli.program.split_first() {
            Some((program, args)) => RankCommand::new(program, args),
            None => subcommand_command()?,
        };
        let outcome = launcher::launch(&cli.launch.options()?, &command)?;
        return Ok(ExitCode::from(u8::try_from(outcome.exit_code).unwrap_or(1)));
    }
    let env = DistEnv::from_env()?;
    burnrun::telemetry::init_logging(env.launched().then_some(env.rank));
    match cli.command {
        Some(Command::Train(args)) => train(&args),
        Some(Command::Bench(options)) => bench(&options),
        Some(Command::Check(args)) => {
            let (world_size, local_ranks) = if cli.launch.any() {
                (cli.launch.world_size(), cli.launch.nproc_per_node.unwrap_or(1))
            } else {
                (env.world_size, env.local_world_size)
            };
            check(&args, world_size, local_ranks)
        }
        // Excluded above: no subcommand means `-- PROGRAM`, which always launches.
        None => unreachable!("`-- PROGRAM` always launches"),
    }?;
    Ok(ExitCode::SUCCESS)
}

/// The ranks of a subcommand run this binary with the command line minus the launch options.
fn subcommand_command() -> anyhow::Result<RankCommand> {
    let exe = std::env::current_exe().context("cannot find this program's path to start the ranks")?;
    let raw: Vec<OsString> = std::env::args_os().skip(1).collect();
    let mut command = RankCommand::new(exe, strip_launch_options(&raw));
    command.name = "burnrun".into();
    Ok(command)
}

/// Drops the leading launch options (`--flag VALUE` or `--flag=VALUE`; every one takes a value)
/// from `args`, leaving the subcommand and its arguments.
fn strip_launch_options(args: &[OsString]) -> Vec<OsString> {
    let cli = Cli::command();
    let takes_value = |name: &str| {
        cli.get_arguments().any(|arg| {
            arg.get_long() == Some(name) || arg.get_all_aliases().is_some_and(|aliases| aliases.contains(&name))
        })
    };
    let mut i = 0;
    while let Some(arg) = args.get(i).and_then(|a| a.to_str()) {
        let Some(flag) = arg.strip_prefix("--") else { break };
        let (name, inline_value) = match flag.split_once('=') {
            Some((name, _)) => (name, true),
            None => (flag, false),
        };
        if name.is_empty() || !takes_value(name) {
            break;
        }
        i += if inline_value { 1 } else { 2 };
    }
    args.get(i..).unwrap_or_default().to_vec()
}

fn load_train_config(args: &TrainArgs) -> anyhow::Result<RunConfig> {
    Ok(match &args.config {
        Some(path) => RunConfig::load(path, &args.overrides)?,
        None => RunConfig::embedded_default(&args.overrides)?,
    })
}

#[cfg(feature = "train")]
fn train(args: &TrainArgs) -> anyhow::Result<()> {
    let config = load_train_config(args)?;
    let options = burnrun::train::TrainOptions {
        resume: args.resume.clone(),
        ..Default::default()
    };
    burnrun::train::train(config, &options)?;
    Ok(())
}

#[cfg(not(feature = "train"))]
fn train(args: &TrainArgs) -> anyhow::Result<()> {
    let _ = load_train_config(args)?;
    bail!("this burnrun was built without the `train` feature (cargo build --features train)")
}

fn bench(options: &CollectiveBenchOptions) -> anyhow::Result<()> {
    match options.device {
        BenchDevice::Cpu => {
            let group = burnrun::init().context("joining the job's process group")?;
            burnrun::bench::run_collective(&group, options)?;
        }
        BenchDevice::Cuda => bench_cuda(options)?,
    }
    Ok(())
}

/// `bench --device cuda` needs NCCL in the binary: refused before any rank starts otherwise.
fn check_bench_device(options: &CollectiveBenchOptions) -> anyhow::Result<()> {
    if options.device == BenchDevice::Cuda && !cfg!(feature = "nccl") {
        bail!(
            "bench {} --device cuda: this burnrun was built without NCCL (feature `nccl`); build it with `cargo build \
             --release --no-default-features --features nccl` (or `--features nccl` to keep the trainer)",
            options.op
        );
    }
    Ok(())
}

#[cfg(feature = "nccl")]
fn bench_cuda(options: &CollectiveBenchOptions) -> anyhow::Result<()> {
    let env = DistEnv::from_env()?;
    let comm = burnrun::comm::nccl::init_world(&env).with_context(|| {
        format!(
            "rank {}: bench {} --device cuda: joining the NCCL communicator of {} rank(s) on CUDA device {} \
             (LOCAL_RANK)",
            env.rank, options.op, env.world_size, env.local_rank
        )
    })?;
    burnrun::bench::run_collective_cuda(&comm, options)?;
    Ok(())
}

#[cfg(not(feature = "nccl"))]
fn bench_cuda(options: &CollectiveBenchOptions) -> anyhow::Result<()> {
    check_bench_device(options)
}

fn check(args: &CheckArgs, world_size: usize, local_ranks: usize) -> anyhow::Result<()> {
    let config = RunConfig::load(&args.config, &args.overrides)?;
    print!("{}", check_report(&config, world_size)?);
    check_memory(&config, world_size, local_ranks)
}

/// The trainer's memory estimate for the rank with the largest share of the model (the largest
/// pipeline stage), against this node's memory shared by `local_ranks` ranks: a model that
/// cannot fit fails `check` as it would fail the trainer, before any allocation.
#[cfg(feature = "train")]
fn check_memory(config: &RunConfig, world_size: usize, local_ranks: usize) -> anyhow::Result<()> {
    use burnrun::train::memory::{fits, largest_stage, MemoryAvailable};
    let resolved = config.validate(world_size)?;
    let task = burnrun::train::BuiltIn::new(&resolved, 0).context("reading the data to size the model")?;
    let estimate = largest_stage(&resolved, &task).map_err(|why| anyhow::anyhow!(why))?;
    let available = MemoryAvailable::of_this_node(local_ranks);
    println!("\nmemory: {estimate}\n        {available}");
    if !fits(&estimate, &available) {
        bail!(
            "the model does not fit in memory: it needs {estimate}; {available}. Use a smaller model or batch, fewer \
             ranks per node, or more pipeline stages"
        );
    }
    Ok(())
}

#[cfg(not(feature = "train"))]
fn check_memory(_config: &RunConfig, _world_size: usize, _local_ranks: usize) -> anyhow::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strip(args: &[&str]) -> Vec<String> {
        let args: Vec<OsString> = args.iter().map(OsString::from).collect();
        strip_launch_options(&args)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    #[test]
    fn launch_options_are_stripped_from_the_ranks_command_line() {
        assert_eq!(
            strip(&[
                "--nproc-per-node",
                "2",
                "--run-id=x",
                "--nproc_per_node",
                "3",
                "bench",
                "allreduce",
                "--iters",
                "5"
            ]),
            ["bench", "allreduce", "--iters", "5"]
        );
        assert_eq!(strip(&["train", "--run-id", "x"]), ["train", "--run-id", "x"]);
    }

    #[test]
    fn the_command_line_parses_every_form() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["burnrun", "--nproc-per-node", "2", "--", "sh", "-c", "echo"]).unwrap();
        assert_eq!(cli.program.len(), 3);
        assert!(cli.launch.any());
        let cli = Cli::try_parse_from(["burnrun", "bench", "allreduce", "--max-bytes", "1M"]).unwrap();
        assert!(!cli.launch.any());
        assert!(matches!(cli.command, Some(Command::Bench(ref o)) if o.max_bytes == 1 << 20));
        let cli = Cli::try_parse_from(["burnrun", "train", "a.toml", "--set", "optim.lr=1", "--set", "x.y=2"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Train(ref t)) if t.overrides.len() == 2));
    }
}
