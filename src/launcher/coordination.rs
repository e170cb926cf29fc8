//! How the launchers of one job work together through node 0's store.
//!
//! Keys, all under `burnrun/launcher/`:
//! - `run_id`: set by node 0; the other nodes adopt it (or check theirs against it).
//! - `generation`: the job's current generation, 0 at the start, raised by node 0 when the job is
//!   restarted (`--max-restarts`). The keys below marked *per generation* live under
//!   `g<N>/`, so a restarted job reads nothing of a failed attempt.
//! - `node/<r>` (per generation): node r's registration (JSON [`NodeRecord`]), written once with `compare_set`, so
//!   two launchers given the same `--node-rank` are caught. Every node waits for all records and
//!   checks they agree on `--nnodes`, `--nproc-per-node` and the command.
//! - `failed` (per generation): the job's root cause (JSON [`Failure`]), written with `compare_set` so the first
//!   writer wins, unless a later rank failure is preferred to it by the root-cause rule of
//!   [`Failure::replaces`] (a rank killed by a signal over a rank on another node that exited
//!   because it lost its connection to it), which then replaces it; every launcher polls it and
//!   tears its ranks down when it appears, and reads it again before printing its summary.
//! - `heartbeat/<r>`: bumped by nodes r > 0 every [`HEARTBEAT_INTERVAL`]; node 0 declares a node
//!   lost when its counter stalls for [`NODE_SILENCE_LIMIT`]. Nodes > 0 notice a lost node 0
//!   because the store goes with it.
//! - `done/<r>` (per generation): written when node r's ranks have all ended; node 0 keeps the store up until every
//!   node wrote it (bounded), so late nodes can still read `failed`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use super::report::Failure;
use super::{LaunchError, LaunchOptions};
use crate::auth::JobSecret;
use crate::rendezvous::{Store, StoreError, TcpStore, TcpStoreServer};

const PREFIX: &str = "burnrun/launcher";
/// How often nodes > 0 prove they are alive.
pub(crate) const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// A node whose heartbeat stalls this long is lost (its launcher was killed or its host went down).
pub(crate) const NODE_SILENCE_LIMIT: Duration = Duration::from_secs(10);
/// Slice of a rendezvous wait between two checks for a failure or a signal.
const WAIT_SLICE: Duration = Duration::from_millis(200);
/// Node 0's own connection to the store it hosts.
const LOCAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Each attempt to reach node 0's store, between two checks for a signal.
const CONNECT_SLICE: Duration = Duration::from_secs(1);
/// Most attempts to replace the published failure with a preferred one; each failed attempt means
/// another node changed it meanwhile, which a handful of nodes failing at once cannot do for long.
const MAX_FAILURE_SWAPS: usize = 8;

fn key(suffix: impl std::fmt::Display) -> String {
    format!("{PREFIX}/{suffix}")
}

/// What a node tells the others when it joins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct NodeRecord {
    pub(crate) node_rank: usize,
    pub(crate) nnodes: usize,
    pub(crate) nproc_per_node: usize,
    pub(crate) host: String,
    pub(crate) pid: u32,
    /// The command its ranks run, as text (compared across nodes).
    pub(crate) command: String,
    /// Distinguishes this launcher from another one that registered the same node rank.
    pub(crate) nonce: u64,
    /// `--max-restarts` (compared across nodes: the budget is the job's).
    #[serde(default)]
    pub(crate) max_restarts: u32,
}

/// Why a rendezvous wait stopped early.
pub(crate) enum Interrupt {
    /// The launcher received a stop signal.
    Signal(Signal),
    /// Another node published a failure.
    Failed(Failure),
}

/// This launcher's handle on the job's store (and, on node 0, the store itself).
#[derive(Debug)]
pub(crate) struct Coordinator {
    store: TcpStore,
    /// Node 0 hosts the server; dropping it closes the store.
    server: Option<TcpStoreServer>,
    addr: String,
    port: u16,
    node_rank: usize,
    nnodes: usize,
    records: Vec<NodeRecord>,
    /// Node 0: per node, the last heartbeat value seen and when it last changed; `None` once done.
    heartbeats: Vec<Option<(i64, Instant)>>,
    next_heartbeat: Instant,
    /// The generation this launcher's keys are scoped by.
    generation: u32,
}

impl Coordinator {
    /// Node 0: hosts the store and connects to it.
    pub(crate) fn host(options: &LaunchOptions, secret: &JobSecret) -> Result<Self, LaunchError> {
        let bind_ip = bind_ip(options)?;
        let bind_addr = SocketAddr::new(bind_ip, options.master_port);
        let server = TcpStoreServer::bind(bind_addr, secret.clone()).map_err(|source| LaunchError::HostStore {
            addr: bind_addr.to_string(),
            source,
        })?;
        let port = server.local_addr().port();
        let reach_ip = match bind_ip {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        let addr = SocketAddr::new(reach_ip, port).to_string();
        let store = TcpStore::connect(&addr, secret, LOCAL_CONNECT_TIMEOUT).map_err(|source| LaunchError::Store {
            node_rank: 0,
            addr: addr.clone(),
            what: "connecting to the store this node hosts",
            source,
        })?;
        Ok(Self::new(store, Some(server), addr, port, options))
    }

    /// Nodes > 0: connect to node 0's store, retrying until `deadline` (node 0 may start later).
    /// `interrupted` is asked between attempts whether the launcher received a stop signal.
    pub(crate) fn join(
        options: &LaunchOptions,
        secret: &JobSecret,
        timeout: Duration,
        deadline: Instant,
        mut interrupted: impl FnMut() -> Option<Signal>,
    ) -> Result<Result<Self, Signal>, LaunchError> {
        let addr = join_addr(&options.master_addr, options.master_port);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match TcpStore::connect(&addr, secret, left.min(CONNECT_SLICE)) {
                Ok(store) => return Ok(Ok(Self::new(store, None, addr, options.master_port, options))),
                // Nobody answers yet: node 0 may not be up. Anything else (a wrong secret) is final.
                Err(StoreError::Io { .. }) if !left.is_zero() => {
                    if let Some(signal) = interrupted() {
                        return Ok(Err(signal));
                    }
                }
                Err(source) => {
                    return Err(LaunchError::Store {
                        node_rank: options.node_rank,
                        addr,
                        what: match source {
                            StoreError::Io { .. } => "joining node 0's store (is node 0 started? --rdzv-timeout ran out)",
                            _ => "joining node 0's store (same BURNRUN_SECRET or --secret-file? without either, the same --run-id or none?)",
                        },
                        source: match source {
                            StoreError::Io { op, addr, source } => StoreError::Io {
                                op,
                                addr,
                                source: std::io::Error::new(
                                    source.kind(),
                                    format!("gave up after {timeout:?}: {source}"),
                                ),
                            },
                            other => other,
                        },
                    })
                }
            }
        }
    }

    fn new(store: TcpStore, server: Option<TcpStoreServer>, addr: String, port: u16, options: &LaunchOptions) -> Self {
        Self {
            store,
            server,
            addr,
            port,
            node_rank: options.node_rank,
            nnodes: options.nnodes,
            records: Vec::new(),
            heartbeats: vec![None; options.nnodes],
            next_heartbeat: Instant::now(),
            generation: 0,
        }
    }

    /// A key of the current generation.
    fn gkey(&self, suffix: impl std::fmt::Display) -> String {
        key(format_args!("g{}/{suffix}", self.generation))
    }

    /// The generation this launcher works in.
    pub(crate) fn generation(&self) -> u32 {
        self.generation
    }

    /// Moves this launcher to `generation` (its registration, failure and done keys).
    pub(crate) fn set_generation(&mut self, generation: u32) {
        self.generation = generation;
    }

    /// The job's current generation as the store holds it (0 before node 0 wrote one).
    pub(crate) fn current_generation(&self) -> Result<u32, StoreError> {
        Ok(self
            .store
            .try_get(&key("generation"))?
            .and_then(|b| String::from_utf8_lossy(&b).parse().ok())
            .unwrap_or(0))
    }

    /// Node 0: makes `generation` the job's current one (the others wait for it, see
    /// [`Coordinator::wait_for_generation`]).
    pub(crate) fn publish_generation(&self, generation: u32) -> Result<(), LaunchError> {
        self.store
            .set(&key("generation"), generation.to_string().as_bytes())
            .map_err(|e| self.error("publishing the next generation", e))
    }

    /// Nodes > 0: waits until node 0 made `generation` (or a later one) current, until
    /// `deadline`; `None` when the deadline passed first. `interrupted` is asked between waits.
    pub(crate) fn wait_for_generation(
        &self,
        generation: u32,
        deadline: Instant,
        mut interrupted: impl FnMut() -> Option<Signal>,
    ) -> Result<Result<Option<u32>, Signal>, LaunchError> {
        loop {
            let current = self
                .current_generation()
                .map_err(|e| self.error("reading the job's generation", e))?;
            if current >= generation {
                return Ok(Ok(Some(current)));
            }
            if let Some(signal) = interrupted() {
                return Ok(Err(signal));
            }
            if Instant::now() >= deadline {
                return Ok(Ok(None));
            }
            std::thread::sleep(WAIT_SLICE.min(deadline.saturating_duration_since(Instant::now())));
        }
    }

    /// The store's port (the one picked, when bound to port 0).
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// The store's address as this node reaches it.
    pub(crate) fn addr(&self) -> &str {
        &self.addr
    }

    fn error(&self, what: &'static str, source: StoreError) -> LaunchError {
        LaunchError::Store {
            node_rank: self.node_rank,
            addr: self.addr.clone(),
            what,
            source,
        }
    }

    /// Node 0 publishes `run_id`; the others read it and check it against theirs, if given.
    pub(crate) fn agree_run_id(
        &self,
        wanted: Option<&str>,
        proposed: &str,
        deadline: Instant,
        mut interrupted: impl FnMut() -> Option<Signal>,
    ) -> Result<Result<String, Signal>, LaunchError> {
        let key = key("run_id");
        if self.node_rank == 0 {
            self.store
                .set(&key, proposed.as_bytes())
                .map_err(|e| self.error("publishing the run id", e))?;
            return Ok(Ok(proposed.to_owned()));
        }
        let theirs = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.store.get(&key, left.min(WAIT_SLICE)) {
                Ok(value) => break value,
                Err(StoreError::Timeout { .. }) if !left.is_zero() => {
                    if let Some(signal) = interrupted() {
                        return Ok(Err(signal));
                    }
                }
                Err(e) => return Err(self.error("reading node 0's run id", e)),
            }
        };
        let theirs = String::from_utf8_lossy(&theirs).into_owned();
        match wanted {
            Some(ours) if ours != theirs => Err(LaunchError::RunIdMismatch {
                node_rank: self.node_rank,
                ours: ours.to_owned(),
                theirs,
            }),
            _ => Ok(Ok(theirs)),
        }
    }

    /// Registers this node and waits for every node, checking they were started alike.
    /// `interrupted` is asked between waits whether the launcher received a stop signal.
    pub(crate) fn rendezvous(
        &mut self,
        record: &NodeRecord,
        deadline: Instant,
        timeout: Duration,
        mut interrupted: impl FnMut() -> Option<Signal>,
    ) -> Result<Result<(), Interrupt>, LaunchError> {
        // Invariant: a record holds only strings and integers, which always serialize.
        let own = serde_json::to_vec(record).expect("a node record always serializes");
        let registered = self
            .store
            .compare_set(&self.gkey(format_args!("node/{}", self.node_rank)), None, &own)
            .map_err(|e| self.error("registering this node", e))?;
        if registered != own {
            let other = parse_record(&registered)
                .map(|r| format!("the launcher on {} (pid {})", r.host, r.pid))
                .unwrap_or_else(|| "another launcher".into());
            return Err(LaunchError::NodeRankTaken {
                node_rank: self.node_rank,
                other,
            });
        }
        let keys: Vec<String> = (0..self.nnodes).map(|r| self.gkey(format_args!("node/{r}"))).collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.store.wait(&keys, left.min(WAIT_SLICE)) {
                Ok(()) => break,
                Err(StoreError::Timeout { keys: missing, .. }) => {
                    if let Some(signal) = interrupted() {
                        return Ok(Err(Interrupt::Signal(signal)));
                    }
                    if let Some(failure) = self.failure().map_err(|e| self.error("reading the failure key", e))? {
                        return Ok(Err(Interrupt::Failed(failure)));
                    }
                    if left <= WAIT_SLICE {
                        let missing = (0..self.nnodes)
                            .filter(|r| missing.iter().any(|k| k.ends_with(&format!("/node/{r}"))))
                            .collect();
                        return Err(LaunchError::NodesMissing {
                            node_rank: self.node_rank,
                            missing,
                            timeout,
                        });
                    }
                }
                Err(e) => return Err(self.error("waiting for the other nodes", e)),
            }
        }
        let mut records = Vec::with_capacity(self.nnodes);
        for (r, key) in keys.iter().enumerate() {
            let bytes = self
                .store
                .get(key, LOCAL_CONNECT_TIMEOUT)
                .map_err(|e| self.error("reading a node's registration", e))?;
            let record = parse_record(&bytes).ok_or_else(|| LaunchError::NodeMismatch {
                what: "a registration",
                node_a: self.node_rank,
                value_a: "burnrun's format".into(),
                node_b: r,
                value_b: format!("an unreadable record {:?}", String::from_utf8_lossy(&bytes)),
            })?;
            records.push(record);
        }
        check_alike(&records)?;
        let now = Instant::now();
        self.heartbeats = (0..self.nnodes).map(|r| (r != 0).then_some((0, now))).collect();
        self.records = records;
        Ok(Ok(()))
    }

    /// The job's root cause, if any launcher published one.
    pub(crate) fn failure(&self) -> Result<Option<Failure>, StoreError> {
        Ok(self
            .store
            .try_get(&self.gkey("failed"))?
            .map(|bytes| Failure::from_json(&bytes, "the store")))
    }

    /// Publishes `failure` as the job's root cause unless another one is there already and
    /// `failure` neither replaces it nor joins it ([`Failure::instead_of`]); returns the one the
    /// store then holds.
    pub(crate) fn publish_failure(&self, failure: &Failure) -> Result<Failure, StoreError> {
        let key = self.gkey("failed");
        let mut ours = failure.clone();
        let mut expected: Option<Vec<u8>> = None;
        for _ in 0..MAX_FAILURE_SWAPS {
            let json = ours.to_json();
            let current = self.store.compare_set(&key, expected.as_deref(), &json)?;
            if current == json {
                return Ok(ours);
            }
            let published = Failure::from_json(&current, "the store");
            let Some(better) = failure.instead_of(&published) else {
                return Ok(published);
            };
            ours = better;
            expected = Some(current);
        }
        Ok(self.failure()?.unwrap_or(ours))
    }

    /// One round of watching the job from this node: the failure key, then (once a
    /// [`HEARTBEAT_INTERVAL`]) this node's heartbeat or, on node 0, the other nodes' heartbeats.
    pub(crate) fn poll(&mut self) -> Result<Option<Failure>, StoreError> {
        if let Some(failure) = self.failure()? {
            return Ok(Some(failure));
        }
        let now = Instant::now();
        if now < self.next_heartbeat {
            return Ok(None);
        }
        self.next_heartbeat = now + HEARTBEAT_INTERVAL;
        if self.node_rank != 0 {
            self.store.add(&key(format_args!("heartbeat/{}", self.node_rank)), 1)?;
            return Ok(None);
        }
        for r in 1..self.nnodes {
            let Some((last, since)) = self.heartbeats[r] else {
                continue;
            };
            if self.store.try_get(&self.gkey(format_args!("done/{r}")))?.is_some() {
                self.heartbeats[r] = None;
                continue;
            }
            let beat = self
                .store
                .try_get(&key(format_args!("heartbeat/{r}")))?
                .and_then(|b| String::from_utf8_lossy(&b).parse::<i64>().ok())
                .unwrap_or(0);
            if beat != last {
                self.heartbeats[r] = Some((beat, now));
            } else if now.duration_since(since) >= NODE_SILENCE_LIMIT {
                let host = self.records.get(r).map(|rec| rec.host.clone()).unwrap_or_default();
                let lost = Failure::Node {
                    node_rank: 0,
                    host: self.records.first().map(|rec| rec.host.clone()).unwrap_or_default(),
                    reason: format!(
                        "node {r} ({host}) stopped reporting for {NODE_SILENCE_LIMIT:?}: its launcher was killed or its host is unreachable"
                    ),
                };
                return self.publish_failure(&lost).map(Some);
            }
        }
        Ok(None)
    }

    /// Publishes the flight records of this node's ranks (after a failure), for node 0's report.
    pub(crate) fn publish_flight(&self, records: &[crate::flight::Record]) -> Result<(), StoreError> {
        // Invariant: records hold only numbers, strings and enums, which always serialize.
        let json = serde_json::to_vec(records).expect("flight records serialize");
        self.store
            .set(&self.gkey(format_args!("flight/{}", self.node_rank)), &json)
    }

    /// Every node's published flight records (nodes that published none are left out).
    pub(crate) fn flight_records(&self) -> Result<Vec<crate::flight::Record>, StoreError> {
        let mut all = Vec::new();
        for r in 0..self.nnodes {
            if let Some(bytes) = self.store.try_get(&self.gkey(format_args!("flight/{r}")))? {
                all.extend(serde_json::from_slice::<Vec<crate::flight::Record>>(&bytes).unwrap_or_default());
            }
        }
        all.sort_by_key(|r| r.rank);
        Ok(all)
    }

    /// Records that this node's ranks have all ended.
    pub(crate) fn report_done(&self, succeeded: bool) -> Result<(), StoreError> {
        let value: &[u8] = if succeeded { b"ok" } else { b"failed" };
        self.store
            .set(&self.gkey(format_args!("done/{}", self.node_rank)), value)
    }

    /// The nodes that have not reported done yet.
    pub(crate) fn nodes_not_done(&self) -> Result<Vec<usize>, StoreError> {
        let mut pending = Vec::new();
        for r in 0..self.nnodes {
            if self.store.try_get(&self.gkey(format_args!("done/{r}")))?.is_none() {
                pending.push(r);
            }
        }
        Ok(pending)
    }

    /// Whether this launcher hosts the store.
    pub(crate) fn hosts_store(&self) -> bool {
        self.server.is_some()
    }
}

fn parse_record(bytes: &[u8]) -> Option<NodeRecord> {
    serde_json::from_slice(bytes).ok()
}

/// Every node must agree with node 0 on the job's shape and command.
fn check_alike(records: &[NodeRecord]) -> Result<(), LaunchError> {
    let Some(first) = records.first() else { return Ok(()) };
    for other in &records[1..] {
        let differ = |what: &'static str, a: String, b: String| LaunchError::NodeMismatch {
            what,
            node_a: first.node_rank,
            value_a: a,
            node_b: other.node_rank,
            value_b: b,
        };
        if other.nnodes != first.nnodes {
            return Err(differ("--nnodes", first.nnodes.to_string(), other.nnodes.to_string()));
        }
        if other.nproc_per_node != first.nproc_per_node {
            return Err(differ(
                "--nproc-per-node",
                first.nproc_per_node.to_string(),
                other.nproc_per_node.to_string(),
            ));
        }
        if other.max_restarts != first.max_restarts {
            return Err(differ(
                "--max-restarts",
                first.max_restarts.to_string(),
                other.max_restarts.to_string(),
            ));
        }
        if other.command != first.command {
            return Err(differ(
                "the command",
                format!("`{}`", first.command),
                format!("`{}`", other.command),
            ));
        }
    }
    Ok(())
}

/// The address node 0 binds: the master address itself on a single node (loopback by default, so a
/// lone job is not reachable from the network); every interface for a multi-node job, because the
/// name the other nodes use may resolve to another address on node 0 itself (127.0.1.1 in /etc/hosts).
fn bind_ip(options: &LaunchOptions) -> Result<IpAddr, LaunchError> {
    let resolved = (options.master_addr.as_str(), options.master_port)
        .to_socket_addrs()
        .and_then(|mut addrs| {
            addrs
                .next()
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "resolves to no address"))
        })
        .map_err(|source| LaunchError::Resolve {
            node_rank: options.node_rank,
            addr: options.master_addr.clone(),
            source,
        })?;
    Ok(match (options.nnodes, resolved.ip()) {
        (1, ip) => ip,
        (_, IpAddr::V4(_)) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        (_, IpAddr::V6(_)) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    })
}

/// "host:port", with brackets around a bare IPv6 address.
fn join_addr(host: &str, port: u16) -> String {
    match host.parse::<Ipv6Addr>() {
        Ok(ip) => SocketAddr::new(IpAddr::V6(ip), port).to_string(),
        Err(_) => format!("{host}:{port}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(node_rank: usize, nproc_per_node: usize, command: &str) -> NodeRecord {
        NodeRecord {
            node_rank,
            nnodes: 2,
            nproc_per_node,
            host: "h".into(),
            pid: 1,
            command: command.into(),
            nonce: 0,
            max_restarts: 0,
        }
    }

    #[test]
    fn nodes_running_different_commands_are_named_in_the_error() {
        let err = check_alike(&[
            record(0, 2, "burnrun bench allreduce"),
            record(1, 2, "burnrun bench allgather"),
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("node 1") && err.contains("node 0"), "{err}");
        assert!(err.contains("allgather") && err.contains("allreduce"), "{err}");
    }

    #[test]
    fn nodes_with_different_rank_counts_are_refused() {
        let err = check_alike(&[record(0, 2, "x"), record(1, 3, "x")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--nproc-per-node"), "{err}");
    }

    #[test]
    fn an_ipv6_master_address_gets_brackets() {
        assert_eq!(join_addr("::1", 5), "[::1]:5");
        assert_eq!(join_addr("node7", 5), "node7:5");
    }
}
