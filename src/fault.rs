//! Fault injection, compiled in and off unless asked for: a rank told by `BURNRUN_FAULT` kills
//! itself, exits, stops (SIGSTOP: a hang) or sleeps (a slow rank) at a given training step or
//! collective, in a given generation of the job. Tests use it to make the failures the launcher
//! must handle (`--max-restarts`, the hang report) at a chosen moment, on real processes.
//!
//! `BURNRUN_FAULT` holds one or more faults separated by `;`, each an action and `key=value`
//! fields separated by `,`:
//!
//! | field | meaning |
//! |---|---|
//! | `kill`, `exit`, `stop`, `sleep`, `drop` | the action: SIGKILL itself; exit with `code` (default 1); SIGSTOP itself; sleep `secs`; cut the connection to `peer` |
//! | `peer=P` | for `drop`: the global rank whose connection is cut |
//! | `rank=R` | only global rank R (default: every rank) |
//! | `step=S` | when the trainer is about to run step S (0-based; [`at_step`]) |
//! | `collective=N` | before the world group's collective number N (0-based; [`at_collective`]) |
//! | `gen=G` or `gen=any` | only in generation G of the job (`BURNRUN_RESTART_COUNT`; default 0: a restarted job runs clean) |
//! | `secs=X` | for `sleep`: how long (default 1) |
//! | `code=C` | for `exit`: the exit code (default 1) |
//!
//! Example: `BURNRUN_FAULT="kill,rank=1,step=7"`. A fault needs exactly one of `step` and
//! `collective`. A malformed value is an error at the start of every rank, naming the part.

use std::sync::OnceLock;
use std::time::Duration;

/// What a fault does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Action {
    /// SIGKILL to itself: a crash nothing can catch.
    Kill,
    /// `exit(code)`: a rank that gives up.
    Exit(i32),
    /// SIGSTOP to itself: a rank that hangs (alive, never answering).
    Stop,
    /// Sleep that long: a slow rank.
    Sleep(Duration),
    /// Cut the connection to this peer (global rank), as a network failure would.
    Drop(usize),
}

/// When a fault fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// Before training step `S` (0-based).
    Step(u64),
    /// Before the world group's collective number `N` (0-based).
    Collective(u64),
}

/// One fault of `BURNRUN_FAULT`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fault {
    /// What it does.
    pub action: Action,
    /// When.
    pub trigger: Trigger,
    /// Which global rank (`None`: every rank).
    pub rank: Option<usize>,
    /// Which generation (`None`: every one).
    pub generation: Option<u32>,
}

/// A malformed `BURNRUN_FAULT`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("BURNRUN_FAULT={value:?}: {reason} (e.g. \"kill,rank=1,step=7\"; see burnrun::fault)")]
pub struct FaultError {
    /// The whole value.
    pub value: String,
    /// What is wrong, naming the part.
    pub reason: String,
}

/// Parses a `BURNRUN_FAULT` value.
pub fn parse(value: &str) -> Result<Vec<Fault>, FaultError> {
    let err = |reason: String| FaultError {
        value: value.to_owned(),
        reason,
    };
    let mut faults = Vec::new();
    for part in value.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let mut fields = part.split(',').map(str::trim);
        let action_name = fields.next().unwrap_or_default();
        let (mut rank, mut generation, mut trigger) = (None, Some(0), None);
        let (mut secs, mut code, mut peer) = (1.0f64, 1i32, None);
        for field in fields {
            let (key, val) = field
                .split_once('=')
                .ok_or_else(|| err(format!("`{field}` in `{part}` is not key=value")))?;
            let number = |what: &str| -> Result<u64, FaultError> {
                val.parse()
                    .map_err(|_| err(format!("`{key}={val}` in `{part}`: {what} must be a whole number")))
            };
            match key {
                "rank" => rank = Some(number("a rank")? as usize),
                "peer" => peer = Some(number("a rank")? as usize),
                "gen" if val == "any" => generation = None,
                "gen" => generation = Some(number("a generation")? as u32),
                "step" | "collective" if trigger.is_some() => {
                    return Err(err(format!("`{part}` has both step and collective: give one")))
                }
                "step" => trigger = Some(Trigger::Step(number("a step")?)),
                "collective" => trigger = Some(Trigger::Collective(number("a collective number")?)),
                "secs" => {
                    secs = val
                        .parse()
                        .ok()
                        .filter(|s: &f64| s.is_finite() && *s >= 0.0)
                        .ok_or_else(|| err(format!("`secs={val}` in `{part}` is not a number of seconds")))?
                }
                "code" => {
                    code = val
                        .parse()
                        .map_err(|_| err(format!("`code={val}` in `{part}` is not an exit code")))?
                }
                other => {
                    return Err(err(format!(
                        "unknown field `{other}` in `{part}` (rank, step, collective, gen, secs, code, peer)"
                    )))
                }
            }
        }
        let action = match action_name {
            "kill" => Action::Kill,
            "exit" => Action::Exit(code),
            "stop" => Action::Stop,
            "sleep" => Action::Sleep(Duration::from_secs_f64(secs)),
            "drop" => Action::Drop(peer.ok_or_else(|| err(format!("`{part}`: drop needs peer=P")))?),
            other => return Err(err(format!("unknown action `{other}` (kill, exit, stop, sleep, drop)"))),
        };
        let trigger = trigger.ok_or_else(|| err(format!("`{part}` says neither step=S nor collective=N")))?;
        faults.push(Fault {
            action,
            trigger,
            rank,
            generation,
        });
    }
    Ok(faults)
}

/// This process's faults: those of `BURNRUN_FAULT` for its rank and generation.
static PLAN: OnceLock<Vec<Fault>> = OnceLock::new();

/// What cuts a connection to a peer (set by the communication layer once it has connections).
type Severer = Box<dyn Fn(usize) + Send + Sync>;
static SEVER: OnceLock<Severer> = OnceLock::new();

/// Registers how a `drop` fault cuts the connection to a peer (the first registration stays).
pub fn on_drop(sever: impl Fn(usize) + Send + Sync + 'static) {
    let _ = SEVER.set(Box::new(sever));
}

/// Reads `BURNRUN_FAULT` for global rank `rank` in the job's current generation; the first call
/// decides (a process is one rank). Called when a rank joins its job.
pub fn install(rank: usize) -> Result<(), FaultError> {
    let generation = crate::env::restart_count();
    let faults = match crate::env::fault_spec() {
        Some(value) => parse(&value)?,
        None => Vec::new(),
    };
    let mine = faults
        .into_iter()
        .filter(|f| f.rank.is_none_or(|r| r == rank))
        .filter(|f| f.generation.is_none_or(|g| g == generation))
        .collect::<Vec<_>>();
    if !mine.is_empty() {
        tracing::warn!("rank {rank}: fault injection armed (BURNRUN_FAULT): {mine:?}");
    }
    let _ = PLAN.set(mine);
    Ok(())
}

/// The trainer is about to run step `step`.
pub fn at_step(step: u64) {
    fire(Trigger::Step(step));
}

/// The world group is about to run its collective number `seq`.
pub fn at_collective(seq: u64) {
    fire(Trigger::Collective(seq));
}

fn fire(now: Trigger) {
    let Some(plan) = PLAN.get() else { return };
    for fault in plan.iter().filter(|f| f.trigger == now) {
        eprintln!("burnrun fault injection: {:?} at {now:?}", fault.action);
        match fault.action {
            // SAFETY: kill and getpid have no memory-safety preconditions.
            Action::Kill => unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            },
            Action::Exit(code) => std::process::exit(code),
            // SAFETY: as above; the process resumes here on SIGCONT.
            Action::Stop => unsafe {
                libc::kill(libc::getpid(), libc::SIGSTOP);
            },
            Action::Sleep(d) => std::thread::sleep(d),
            Action::Drop(peer) => match SEVER.get() {
                Some(sever) => sever(peer),
                None => eprintln!("burnrun fault injection: no connections to cut yet"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse_with_their_defaults_and_bad_ones_name_the_part() {
        let faults = parse("kill,rank=1,step=7; sleep,collective=3,secs=0.5,gen=any;exit,code=3,step=2,gen=1").unwrap();
        assert_eq!(
            faults,
            vec![
                Fault {
                    action: Action::Kill,
                    trigger: Trigger::Step(7),
                    rank: Some(1),
                    generation: Some(0)
                },
                Fault {
                    action: Action::Sleep(Duration::from_millis(500)),
                    trigger: Trigger::Collective(3),
                    rank: None,
                    generation: None
                },
                Fault {
                    action: Action::Exit(3),
                    trigger: Trigger::Step(2),
                    rank: None,
                    generation: Some(1)
                },
            ]
        );
        for (bad, needle) in [
            ("explode,step=1", "unknown action `explode`"),
            ("kill,rank=1", "neither step=S nor collective=N"),
            ("kill,step=x", "`step=x`"),
            ("kill,step=1,collective=2", "both step and collective"),
            ("kill,when=1", "unknown field `when`"),
            ("stop,step", "`step` in `stop,step` is not key=value"),
            ("drop,step=3", "drop needs peer=P"),
        ] {
            let message = parse(bad).unwrap_err().to_string();
            assert!(message.contains(needle), "{bad}: {message}");
            assert!(message.contains("BURNRUN_FAULT"), "{message}");
        }
    }
}
