//! Logging set-up: `tracing` with the rank on every line.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs a stderr subscriber (filter from `RUST_LOG`, default `info`). Safe to call twice.
pub fn init_logging(rank: Option<usize>) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal());
    // A second call (tests, or a library user with their own subscriber) keeps the first one.
    let _ = match rank {
        Some(_) => builder.without_time().try_init(),
        None => builder.try_init(),
    };
}
