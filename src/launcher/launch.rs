//! The launcher from start to end: check the options, fork the orphan watchdog, host or join the
//! store, agree with the other nodes, start the ranks, supervise them.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::coordination::{Coordinator, Interrupt, NodeRecord};
use super::output::{self, say};
use super::report::{Failure, LAUNCHER_SIGNALLED};
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
    let node_failure = |reason: String| Failure::Node {
        node_rank,
        host: host.clone(),
        reason,
    };
    // A fresh job starts at generation 0. A launcher started again for a node of a running job
    // (its predecessor died) joins the generation after the current one, which the job reaches
    // when it restarts after losing that node's ranks.
    let mut generation = if node_rank == 0 {
        coordinator.publish_generation(0)?;
        0
    } else {
        coordinator.current_generation().map_err(|source| LaunchError::Store {
            node_rank,
            addr: coordinator.addr().to_owned(),
            what: "reading the job's generation",
            source,
        })?
    };
    let mut rdzv_deadline = deadline;
    let mut watchdog = watchdog;
    loop {
        coordinator.set_generation(generation);
        let record = NodeRecord {
            node_rank,
            nnodes: options.nnodes,
            nproc_per_node: options.nproc_per_node,
            host: host.clone(),
            pid: std::process::id(),
            command: command.display(),
            nonce: random_u64(),
            max_restarts: options.max_restarts,
        };
        match coordinator.rendezvous(&record, rdzv_deadline, rdzv_timeout, signals::take) {
            Ok(Ok(())) => {}
            Ok(Err(Interrupt::Signal(signal))) => {
                let _ = coordinator.publish_failure(&node_failure(format!("{LAUNCHER_SIGNALLED} {signal}")));
                watchdog.disarm();
                return Ok(stopped_before_start(signal, run_id));
            }
            Ok(Err(Interrupt::Failed(failure))) => {
                watchdog.disarm();
                return Err(LaunchError::RendezvousAborted {
                    node_rank,
                    reason: failure.summary_lines().join("; "),
                });
            }
            // This node's rank is taken in the current generation: a launcher started again for a
            // node whose previous launcher died. It waits for the job's next generation.
            Err(LaunchError::NodeRankTaken { .. }) if node_rank != 0 && generation < options.max_restarts => {
                say(format_args!(
                    "node {node_rank} is registered in generation {generation} by a launcher that is gone; joining \
                     generation {} when the job restarts",
                    generation + 1
                ));
                generation += 1;
                continue;
            }
            Err(e) => {
                // Tell the other nodes, so they stop waiting now rather than at their deadline.
                let _ = coordinator.publish_failure(&node_failure(e.to_string()));
                watchdog.disarm();
                return Err(e);
            }
        }
        let job = JobEnv {
            master_addr: options.master_addr.clone(),
            master_port: coordinator.port(),
            run_id: run_id.clone(),
            secret_hex: secret.to_hex(),
            timeout_secs: timeout.as_secs().max(1),
            rdzv_timeout_secs: rdzv_timeout.as_secs().max(1),
            restart_count: generation,
            max_restarts: options.max_restarts,
        };
        let ended = run_generation(options, command, &host, &job, &mut coordinator, watchdog)?;
        watchdog = ended.watchdog;
        let failure = match (ended.signal, ended.failure) {
            (Some(signal), failure) => {
                watchdog.disarm();
                return Ok(LaunchOutcome {
                    exit_code: 128 + signal as i32,
                    failure,
                    run_id,
                });
            }
            (None, None) => {
                watchdog.disarm();
                return Ok(LaunchOutcome {
                    exit_code: 0,
                    failure: None,
                    run_id,
                });
            }
            (None, Some(failure)) => failure,
        };
        if generation >= options.max_restarts || failure.stopped_on_purpose() {
            if options.max_restarts > 0 {
                say(format_args!(
                    "the job failed after {generation} restart(s): --max-restarts {} is spent",
                    options.max_restarts
                ));
            }
            watchdog.disarm();
            return Ok(LaunchOutcome {
                exit_code: 1,
                failure: Some(failure),
                run_id,
            });
        }
        // Restart: node 0 opens the next generation (every node has ended this one's ranks and
        // reported it, or was given up on); the others wait for it.
        let next = generation + 1;
        rdzv_deadline = Instant::now() + rdzv_timeout;
        if node_rank == 0 {
            coordinator.publish_generation(next)?;
        } else {
            match coordinator.wait_for_generation(next, rdzv_deadline, signals::take)? {
                Ok(Some(_)) => {}
                Ok(None) => {
                    say(format_args!(
                        "node 0 did not restart the job within {rdzv_timeout:?}; giving up"
                    ));
                    watchdog.disarm();
                    return Ok(LaunchOutcome {
                        exit_code: 1,
                        failure: Some(failure),
                        run_id,
                    });
                }
                Err(signal) => {
                    watchdog.disarm();
                    return Ok(stopped_before_start(signal, run_id));
                }
            }
        }
        say(format_args!(
            "restarting the job: restart {next} of {} (generation {next}); ranks resume from their latest checkpoint",
            options.max_restarts
        ));
        generation = next;
    }
}

/// Starts this node's ranks for the coordinator's current generation and supervises them until
/// they have all ended.
fn run_generation(
    options: &LaunchOptions,
    command: &RankCommand,
    host: &str,
    job: &JobEnv,
    coordinator: &mut Coordinator,
    mut watchdog: Watchdog,
) -> Result<supervise::Ended, LaunchError> {
    let run_id = job.run_id.as_str();
    let node_rank = options.node_rank;
    let generation = coordinator.generation();
    let world_size = options.nnodes * options.nproc_per_node;
    let first_rank = node_rank * options.nproc_per_node;
    if generation == 0 {
        if let Some(dir) = &options.log_dir {
            std::fs::create_dir_all(dir).map_err(|source| LaunchError::LogFile {
                path: dir.clone(),
                source,
            })?;
        }
        say(format_args!(
            "run {run_id}: {world_size} rank(s) = {} node(s) x {}; node {node_rank} ({host}) runs ranks {first_rank}..={}; store at {}:{}",
            options.nnodes,
            options.nproc_per_node,
            first_rank + options.nproc_per_node - 1,
            options.master_addr,
            coordinator.port()
        ));
    }
    let node_failure = |reason: String| Failure::Node {
        node_rank,
        host: host.to_owned(),
        reason,
    };
    let (events_tx, events) = mpsc::channel();
    let mut ranks = Vec::with_capacity(options.nproc_per_node);
    for local_rank in 0..options.nproc_per_node {
        let placement = Placement {
            rank: first_rank + local_rank,
            local_rank,
            world_size,
            local_world_size: options.nproc_per_node,
            node_rank,
        };
        let started = start_rank(command, &placement, job, options, &mut watchdog, &events_tx);
        match started {
            Ok(rank) => ranks.push(rank),
            Err(e) => {
                let _ = coordinator.publish_failure(&node_failure(e.to_string()));
                abort_started(&ranks, &events, options.grace_period);
                shm_sweep::sweep_run(run_id, first_rank..first_rank + options.nproc_per_node);
                watchdog.disarm();
                return Err(e);
            }
        }
    }
    // Only the waiting threads hold senders now, so the channel tells when they are all gone.
    drop(events_tx);

    let node = NodeJob {
        node_rank,
        host: host.to_owned(),
        run_id: run_id.to_owned(),
        grace_period: options.grace_period,
        monitor_interval: options.monitor_interval,
        stall_timeout: options.stall_timeout,
        log_dir: options.log_dir.clone(),
    };
    Ok(Supervisor::new(node, coordinator, ranks, events, watchdog).run())
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
