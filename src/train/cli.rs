//! [`main`]: the whole command line of a user's training binary, so that it takes a config the
//! way `burnrun train` does:
//!
//! ```text
//! PROGRAM [CONFIG.toml] [--set section.key=value]... [--resume PATH] [--check]
//! burnrun --nproc-per-node 2 -- target/release/examples/char_lm examples/char_lm.toml --set optim.lr=1e-3
//! ```

use std::process::ExitCode;

use crate::config::{RunConfig, TaskFacts};

use super::memory::{fits, largest_stage, MemoryAvailable};
use super::task::{Task, TaskError};
use super::{train_task, TrainOptions};

/// What the command line asked for.
#[derive(Debug, Default)]
struct Args {
    config: Option<String>,
    overrides: Vec<String>,
    resume: Option<String>,
    check: bool,
}

fn parse(program: &str, args: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let mut parsed = Args::default();
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        let mut value = |flag: &str| args.next().ok_or_else(|| format!("{flag} needs a value"));
        match arg.as_str() {
            "--help" | "-h" => {
                println!(
                    "usage: {program} [CONFIG.toml] [--set section.key=value]... [--resume PATH] [--check]\n\n\
                     Trains {program} as the TOML run config says (without CONFIG: the program's default), with \
                     every setting of `burnrun train`; the program's own settings are the config's [user] section.\n\
                     Start it with the launcher: burnrun --nproc-per-node N -- {program} ...\n\n  \
                     --set KEY=VALUE  override one key (repeatable), e.g. --set optim.lr=1e-3 or --set user.width=64\n  \
                     --resume PATH    resume from this checkpoint (or the latest one under it)\n  \
                     --check          print the resolved settings, the batch arithmetic and the memory estimate, \
                     and exit"
                );
                return Ok(None);
            }
            "--set" => parsed.overrides.push(value("--set")?),
            "--resume" => parsed.resume = Some(value("--resume")?),
            "--check" => parsed.check = true,
            _ if arg.starts_with("--set=") => parsed.overrides.push(arg["--set=".len()..].to_string()),
            _ if arg.starts_with('-') => return Err(format!("unknown option {arg} (see --help)")),
            _ if parsed.config.is_none() => parsed.config = Some(arg),
            _ => {
                return Err(format!(
                    "unexpected argument {arg}: one config file at most (see --help)"
                ))
            }
        }
    }
    Ok(Some(parsed))
}

/// Runs a user's training binary: reads the config (the file named on the command line, or
/// `default_config`, the program's own TOML text), builds the task with `make` (which reads its
/// own settings with [`RunConfig::user_section`]) and trains it with [`train_task`]. Errors are
/// printed as `PROGRAM: error: ...` and make the exit status 1, so the launcher tears the job
/// down with the message.
///
/// ```ignore
/// fn main() -> std::process::ExitCode {
///     burnrun::train::main("char_lm", include_str!("char_lm.toml"), |cfg| CharLmTask::new(cfg.user_section()?))
/// }
/// ```
pub fn main<T, F>(program: &str, default_config: &str, make: F) -> ExitCode
where
    T: Task,
    F: FnOnce(&RunConfig) -> Result<T, TaskError>,
{
    match run(program, default_config, make) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{program}: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run<T, F>(program: &str, default_config: &str, make: F) -> Result<(), TaskError>
where
    T: Task,
    F: FnOnce(&RunConfig) -> Result<T, TaskError>,
{
    let Some(args) = parse(program, std::env::args().skip(1))? else {
        return Ok(());
    };
    let cfg = match &args.config {
        Some(path) => RunConfig::load(path, &args.overrides)?,
        None => RunConfig::from_str_named(default_config, &format!("{program} (default config)"), &args.overrides)?,
    };
    let env = crate::env::DistEnv::from_env()?;
    crate::telemetry::init_logging(env.launched().then_some(env.rank));
    if args.check {
        let resolved = cfg.validate(env.world_size)?;
        let task = make(&resolved.config)?;
        let facts = TaskFacts {
            describe: task.describe(),
            samples: task.len(),
        };
        print!("{}", resolved.task_report(&facts));
        if let Some(chain) = task.blocks() {
            let estimate = largest_stage(&resolved, chain)?;
            let available = MemoryAvailable::of_this_node(env.local_world_size);
            println!("\nmemory: {estimate}\n        {available}");
            if !fits(&estimate, &available) {
                return Err(format!("the model does not fit in memory: it needs {estimate}; {available}").into());
            }
        }
        return Ok(());
    }
    let task = make(&cfg)?;
    let options = TrainOptions {
        resume: args.resume.map(Into::into),
        ..TrainOptions::default()
    };
    train_task(&task, cfg, &options)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Result<Option<Args>, String> {
        parse("prog", words.iter().map(|w| w.to_string()))
    }

    #[test]
    fn the_command_line_takes_a_config_overrides_a_resume_and_check() {
        let a = args(&[
            "run.toml",
            "--set",
            "optim.lr=1",
            "--set=user.width=8",
            "--resume",
            "ck",
            "--check",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(a.config.as_deref(), Some("run.toml"));
        assert_eq!(a.overrides, ["optim.lr=1", "user.width=8"]);
        assert_eq!(a.resume.as_deref(), Some("ck"));
        assert!(a.check);
    }

    #[test]
    fn a_second_config_or_an_unknown_option_is_an_error_that_names_it() {
        assert!(args(&["a.toml", "b.toml"]).unwrap_err().contains("b.toml"));
        assert!(args(&["--lr", "1"]).unwrap_err().contains("--lr"));
        assert!(args(&["--set"]).unwrap_err().contains("--set needs a value"));
    }
}
