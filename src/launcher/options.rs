//! What a launcher is asked to do: the launch options (torchrun's flags) and the command every rank runs.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

/// Default `--master-addr`: a single-node job talks over loopback only.
pub const DEFAULT_MASTER_ADDR: &str = "127.0.0.1";
/// Default `--grace-period`: how long ranks get between SIGTERM and SIGKILL.
pub const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(5);
/// Default `--monitor-interval`: how often a launcher looks at the store for the other nodes'
/// failures and heartbeats (its own ranks' exits are seen at once, whatever this is).
pub const DEFAULT_MONITOR_INTERVAL: Duration = Duration::from_millis(150);

/// The launch options of one node (one launcher).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchOptions {
    /// Ranks started on this node (`--nproc-per-node`).
    pub nproc_per_node: usize,
    /// Nodes in the job (`--nnodes`).
    pub nnodes: usize,
    /// This node's index, 0 hosts the store (`--node-rank`).
    pub node_rank: usize,
    /// Host of node 0's store (`--master-addr`).
    pub master_addr: String,
    /// Port of node 0's store; 0 picks a free one, single node only (`--master-port`).
    pub master_port: u16,
    /// Deadline of the rendezvous (`--rdzv-timeout`); `None`: `BURNRUN_RDZV_TIMEOUT_SECS` or the default.
    pub rdzv_timeout: Option<Duration>,
    /// Deadline of every collective, handed to ranks (`--timeout`); `None`: `BURNRUN_TIMEOUT_SECS` or the default.
    pub timeout: Option<Duration>,
    /// Time between SIGTERM and SIGKILL when ranks are torn down (`--grace-period`).
    pub grace_period: Duration,
    /// Where each rank's stdout and stderr are also written, as `rank_N.stdout`/`.stderr` (`--log-dir`).
    pub log_dir: Option<PathBuf>,
    /// The job's id (`--run-id`); `None`: a random one (node 0), node 0's (other nodes).
    pub run_id: Option<String>,
    /// File holding the job secret as 64 hex digits (`--secret-file`); node 0 creates it if missing.
    pub secret_file: Option<PathBuf>,
    /// Times the whole job is restarted after a failure (`--max-restarts`, torchrun's flag): every
    /// node tears its ranks down, all meet again under the next generation, and the ranks start
    /// again (the trainer resumes from its latest complete checkpoint). The budget is the job's.
    pub max_restarts: u32,
    /// How often the store is polled for the other nodes' failures (`--monitor-interval`).
    pub monitor_interval: Duration,
    /// A rank that makes no progress (no collective finished, no training step or phase begun)
    /// for this long stops the job with a hang report (`--stall-timeout`); `None`: only the
    /// collectives' own deadline (`--timeout`) finds a hang.
    pub stall_timeout: Option<Duration>,
}

impl Default for LaunchOptions {
    fn default() -> Self {
        Self {
            nproc_per_node: 1,
            nnodes: 1,
            node_rank: 0,
            master_addr: DEFAULT_MASTER_ADDR.into(),
            master_port: 0,
            rdzv_timeout: None,
            timeout: None,
            grace_period: DEFAULT_GRACE_PERIOD,
            log_dir: None,
            run_id: None,
            secret_file: None,
            max_restarts: 0,
            monitor_interval: DEFAULT_MONITOR_INTERVAL,
            stall_timeout: None,
        }
    }
}

/// The command every rank of this node runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankCommand {
    /// The executable.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// How the program is named when nodes compare their commands and in messages (`burnrun` for
    /// the built-in subcommands, whose executable may live at a different path on every node).
    pub name: String,
}

impl RankCommand {
    /// Runs `program` with `args`; it is named as given.
    pub fn new(program: impl Into<PathBuf>, args: impl IntoIterator<Item = impl Into<OsString>>) -> Self {
        let program = program.into();
        Self {
            name: program.to_string_lossy().into_owned(),
            program,
            args: args.into_iter().map(Into::into).collect(),
        }
    }

    /// The command line as one readable string (arguments with spaces are quoted).
    pub fn display(&self) -> String {
        let mut out = self.name.clone();
        for arg in &self.args {
            let arg = arg.to_string_lossy();
            out.push(' ');
            if arg.is_empty() || arg.contains(|c: char| c.is_whitespace() || c == '\'' || c == '"') {
                out.push('\'');
                out.push_str(&arg.replace('\'', "'\\''"));
                out.push('\'');
            } else {
                out.push_str(&arg);
            }
        }
        out
    }
}
