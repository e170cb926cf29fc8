//! The launcher from start to end: check the options, fork the orphan watchdog, host or join the
//! store, agree with the other nodes, start the ranks, supervise them.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::coordination::{Coordinator, Interrupt, NodeRecord};
use super::output::{self, say};
use super::report::Failure;
use super::spawn::{self, JobEnv, Placement};
use super::supervise::{self, NodeJob, RankState, Supervisor};
use super::watchdog::Watchdog;
use super::{secret, shm_sweep, signals, LaunchError, LaunchOptions, RankCommand};
use crate::env::{LauncherEnv, DEFAULT_RDZV_TIMEOUT_SECS, DEFAULT_TIMEOUT_SECS};

/// How a job ended, from this node's point of view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchOutcome {
    /// The launcher's exit code: 0 if every rank succeeded, 128 + n after stop signal n, 1 otherwise.
    pub exit_code: i32,
    /// The job's root cause, as printed in the summary.
    pub failure: Option<Failure>,
    /// The job's run id.
    pub run_id: String,
}

/// Runs this node's part of a job: `options.nproc_per_node` ranks of `command`, each with the
/// environment of [`crate::env::DistEnv`], until they have all ended. Prints each rank's output
/// with a `[rankN]: ` prefix and, if the job fails, one summary naming the root cause (see
/// [`Failure`]); once the ranks have all ended, removes the run's shared-memory files on this host.
///
/// Errors are for jobs that could not start (bad options, no store, nodes that disagree); a
/// failing rank is a [`LaunchOutcome`] with a non-zero exit code.
pub fn launch(options: &LaunchOptions, command: &RankCommand) -> Result<LaunchOutcome, LaunchError> {
    validate(options)?;
    let env = LauncherEnv::from_env()?;
    let node_rank = options.node_rank;
    let system = |what: &'static str| {
        move |source| LaunchError::System {
            node_rank,
            what,
            source,
        }
    };
    // First, while the launcher has a single thread: the watchdog is forked.
    let watchdog = Watchdog::start().map_err(system("starting the orphan watchdog"))?;
    signals::install().map_err(system("installing the SIGINT/SIGTERM handlers"))?;

    let rdzv_timeout = options
        .rdzv_timeout
        .or(env.rdzv_timeout_secs.map(Duration::from_secs))
        .unwrap_or(Duration::from_secs(DEFAULT_RDZV_TIMEOUT_SECS));
    let timeout = options
        .timeout
        .or(env.timeout_secs.map(Duration::from_secs))
        .unwrap_or(Duration::from_secs(DEFAULT_TIMEOUT_SECS));
    let deadline = Instant::now() + rdzv_timeout;
    let secret = secret::resolve(options, &env, deadline, signals::take)?;
    let host = host_name();

    let mut coordinator = if node_rank == 0 {
        Coordinator::host(options, &secret)?
    } else {
        match Coordinator::join(options, &secret, rdzv_timeout, deadline, signals::take)? {
            Ok(coordinator) => coordinator,
            Err(signal) => return Ok(stopped_before_start(signal, options.run_id.clone().unwrap_or_default())),
        }
    };
    let proposed = options.run_id.clone().unwrap_or_else(random_run_id);
    let run_id = match coordinator.agree_run_id(options.run_id.as_deref(), &proposed, deadline, signals::take)? {
        Ok(run_id) => run_id,
        Err(signal) => return Ok(stopped_before_start(signal, proposed)),
    };
    let record = NodeRecord {
        node_rank,
        nnodes: options.nnodes,
        nproc_per_node: options.nproc_per_node,
        host: host.clone(),
        pid: std::process::id(),
        command: command.display(),
        nonce: random_u64(),
    };
    let node_failure = |reason: String| Failure::Node {
        node_rank,
        host: host.clone(),
        reason,
    };
    match coordinator.rendezvous(&record, deadline, rdzv_timeout, signals::take) {
        Ok(Ok(())) => {}
        Ok(Err(Interrupt::Signal(signal))) => {
            let _ = coordinator.publish_failure(&node_failure(format!("its launcher received {signal}")));
            return Ok(stopped_before_start(signal, run_id));
        }
        Ok(Err(Interrupt::Failed(failure))) => {
            return Err(LaunchError::RendezvousAborted {
                node_rank,
                reason: failure.summary_lines().join("; "),
            })
        }
        Err(e) => {
            // Tell the other nodes, so they stop waiting now rather than at their deadline.
            let _ = coordinator.publish_failure(&node_failure(e.to_string()));
            return Err(e);
        }
    }

    if let Some(dir) = &options.log_dir {
        std::fs::create_dir_all(dir).map_err(|source| LaunchError::LogFile {
            path: dir.clone(),
            source,
        })?;
    }
    let world_size = options.nnodes * options.nproc_per_node;
    let first_rank = node_rank * options.nproc_per_node;
    say(format_args!(
        "run {run_id}: {world_size} rank(s) = {} node(s) x {}; node {node_rank} ({host}) runs ranks {first_rank}..={}; store at {}:{}",
        options.nnodes,
        options.nproc_per_node,
        first_rank + options.nproc_per_node - 1,
        options.master_addr,
        coordinator.port()
    ));
    let job = JobEnv {
        master_addr: options.master_addr.clone(),
        master_port: coordinator.port(),
        run_id: run_id.clone(),
        secret_hex: secret.to_hex(),
        timeout_secs: timeout.as_secs().max(1),
        rdzv_timeout_secs: rdzv_timeout.as_secs().max(1),
    };
    let (events_tx, events) = mpsc::channel();
    let mut watchdog = watchdog;
    let mut ranks = Vec::with_capacity(options.nproc_per_node);
    for local_rank in 0..options.nproc_per_node {
        let placement = Placement {
            rank: first_rank + local_rank,
            local_rank,
            world_size,
            local_world_size: options.nproc_per_node,
            node_rank,
        };
        let started = start_rank(command, &placement, &job, options, &mut watchdog, &events_tx);
        match started {
            Ok(rank) => ranks.push(rank),
            Err(e) => {
                let _ = coordinator.publish_failure(&node_failure(e.to_string()));
                abort_started(&ranks, &events, options.grace_period);
                shm_sweep::sweep_run(&run_id, first_rank..first_rank + options.nproc_per_node);
                watchdog.disarm();
                return Err(e);
            }
        }
    }
    // Only the waiting threads hold senders now, so the channel tells when they are all gone.
    drop(events_tx);

    let node = NodeJob {
        node_rank,
        host,
        run_id: run_id.clone(),
        grace_period: options.grace_period,
    };
    let ended = Supervisor::new(node, &mut coordinator, ranks, events, watchdog).run();
    let exit_code = match (ended.signal, &ended.failure) {
        (Some(signal), _) => 128 + signal as i32,
        (None, Some(_)) => 1,
        (None, None) => 0,
    };
    drop(coordinator);
    Ok(LaunchOutcome {
        exit_code,
        failure: ended.failure,
        run_id,
    })
}

fn validate(options: &LaunchOptions) -> Result<(), LaunchError> {
    if options.nproc_per_node == 0 {
        return Err(LaunchError::Zero { flag: "nproc-per-node" });
    }
    if options.nnodes == 0 {
        return Err(LaunchError::Zero { flag: "nnodes" });
    }
    if options.node_rank >= options.nnodes {
        return Err(LaunchError::NodeRankOutOfRange {
            node_rank: options.node_rank,
            nnodes: options.nnodes,
        });
    }
    if options.nnodes > 1 && options.master_port == 0 {
        return Err(LaunchError::MultiNodeNeedsPort { nnodes: options.nnodes });
    }
    Ok(())
}

fn start_rank(
    command: &RankCommand,
    placement: &Placement,
    job: &JobEnv,
    options: &LaunchOptions,
    watchdog: &mut Watchdog,
    events: &mpsc::Sender<supervise::ExitEvent>,
) -> Result<RankState, LaunchError> {
    let logs = output::LogFiles::create(placement.rank, options.log_dir.as_deref())?;
    let mut child = spawn::spawn(command, &placement.env(job)).map_err(|source| LaunchError::Spawn {
        node_rank: placement.node_rank,
        rank: placement.rank,
        program: command.program.display().to_string(),
        source,
    })?;
    let pid = child.id();
    watchdog.guard(pid as i32);
    let started = Instant::now();
    // Both pipes were requested at spawn, so they are there.
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        unreachable!("spawn pipes stdout and stderr")
    };
    let output = output::start(placement.rank, stdout, stderr, logs);
    supervise::watch_exit(placement.local_rank, child, events.clone());
    Ok(RankState {
        placement: *placement,
        pid,
        started,
        output,
        exit: None,
    })
}

/// Kills the ranks started before a later one failed to start, and waits (bounded) for them.
fn abort_started(ranks: &[RankState], events: &mpsc::Receiver<supervise::ExitEvent>, grace_period: Duration) {
    for rank in ranks {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(rank.pid as i32), nix::sys::signal::SIGKILL);
    }
    let deadline = Instant::now() + grace_period;
    for _ in ranks {
        if events
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .is_err()
        {
            break;
        }
    }
}

fn stopped_before_start(signal: nix::sys::signal::Signal, run_id: String) -> LaunchOutcome {
    say(format_args!("received {signal} before the ranks started; stopping"));
    LaunchOutcome {
        exit_code: 128 + signal as i32,
        failure: None,
        run_id,
    }
}

/// This machine's name, for messages.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "unknown-host".into())
}

fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    // A failing random source only makes the id less unique; the pid and time still vary.
    if getrandom::getrandom(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default();
        return nanos ^ (u64::from(std::process::id()) << 32);
    }
    u64::from_le_bytes(bytes)
}

/// A short random run id (8 hex digits), so jobs on one machine keep their store keys apart.
fn random_run_id() -> String {
    format!("{:08x}", random_u64() as u32)
}
