//! Building the world process group: from the launcher's environment, or from any store.
//!
//! Every rank binds a data listener (on the address it reaches the store from, so multi-node jobs
//! advertise a routable address), publishes it, and connects to every lower rank while it
//! accepts the higher ones. Each connection is authenticated with the job secret and says which
//! rank it comes from.
//!
//! Ranks of one host then move their frames through shared memory (see `transport::shm`): each
//! publishes a host id, the same-host ranks create their inboxes, open each other's, and agree on
//! which pairs succeeded, so both sides of a pair always use the same transport. A pair whose
//! set-up failed (a full `/dev/shm`, a container boundary) stays on TCP with a warning.
//!
//! Apart from that, every rank publishes the host it runs on whether or not it uses shared
//! memory, so the engine knows which ranks share a host (for the hierarchical all-reduce and
//! broadcast).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth::JobSecret;
use crate::env::DistEnv;
use crate::error::Error;
use crate::rendezvous::{PrefixStore, Store, TcpStore};
use crate::transport::{self, DataListener, Inbox, Mesh, Pair, ShmLink, TransportError};

use super::communicator::CommError;
use super::group::ProcessGroup;
use super::host::{Hierarchy, HostComm, Tuning};

/// How to build a group.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Deadline of every collective.
    pub timeout: Duration,
    /// Deadline of the rendezvous (address exchange and connections).
    pub rdzv_timeout: Duration,
    /// Engine tunables.
    pub tuning: Tuning,
    /// Address to listen on for data connections.
    pub listen_ip: IpAddr,
    /// Shared memory between ranks of one host.
    pub shm: ShmOptions,
}

impl Default for InitOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(crate::env::DEFAULT_TIMEOUT_SECS),
            rdzv_timeout: Duration::from_secs(crate::env::DEFAULT_RDZV_TIMEOUT_SECS),
            tuning: Tuning::default(),
            listen_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            shm: ShmOptions::default(),
        }
    }
}

/// How ranks of one host talk to each other.
#[derive(Debug, Clone)]
pub struct ShmOptions {
    /// Use shared memory between ranks of one host (else loopback TCP).
    pub enabled: bool,
    /// Bytes of each ring (a power of two of at least [`transport::MIN_SHM_RING_BYTES`]).
    pub ring_bytes: usize,
    /// Busy-polling before sleeping on the doorbell.
    pub spin: Duration,
    /// Start of the names of this job's files (the launcher sweeps [`transport::SHM_DIR`] by it).
    pub file_prefix: String,
    /// Where the files go: [`transport::SHM_DIR`] (a RAM file system) unless a test says otherwise.
    pub dir: std::path::PathBuf,
    /// Which host this rank counts as on; `None`: [`transport::host_id`]. Ranks with equal ids
    /// share memory. (Tests make "nodes" of threads with it.)
    pub host_id: Option<String>,
}

impl Default for ShmOptions {
    fn default() -> Self {
        Self {
            enabled: true,
            ring_bytes: transport::DEFAULT_SHM_RING_BYTES,
            spin: transport::DEFAULT_SHM_SPIN,
            file_prefix: transport::shm_file_prefix(&format!("pid{}", std::process::id())),
            dir: std::path::PathBuf::from(transport::SHM_DIR),
            host_id: None,
        }
    }
}

/// Joins the job described by the environment (set by the `burnrun` launcher, or torchrun's
/// variables). Without a launcher this is a world of one rank.
pub fn init() -> Result<ProcessGroup, Error> {
    init_from(&DistEnv::from_env()?)
}

/// Joins the job described by `env`. A launched rank also arms the faults a test asked of it
/// (`BURNRUN_FAULT`, see [`crate::fault`]; off by default).
pub fn init_from(env: &DistEnv) -> Result<ProcessGroup, Error> {
    if env.launched() {
        crate::fault::install(env.rank).map_err(|e| crate::env::EnvError::Invalid {
            name: "BURNRUN_FAULT",
            value: e.value,
            reason: e.reason,
        })?;
        // The flight recorder the launcher reads when the job hangs or fails (`crate::flight`).
        let path = crate::flight::path(&crate::names::shm_rank_file_prefix(&env.run_id, env.rank));
        if let Err(e) = crate::flight::install(&path, env.rank) {
            tracing::warn!("rank {}: no flight recorder at {}: {e}", env.rank, path.display());
        }
    }
    let mut tuning = Tuning::default();
    if let Some(bytes) = env.ring_threshold_bytes {
        tuning.ring_threshold_bytes = bytes;
    }
    if let Some(bytes) = env.segment_bytes {
        tuning.segment_bytes = bytes;
    }
    tuning.hierarchical = Hierarchy::from_switch(env.hierarchical);
    let defaults = ShmOptions::default();
    let shm = ShmOptions {
        enabled: env.shm.unwrap_or(defaults.enabled),
        ring_bytes: env.shm_ring_bytes.unwrap_or(defaults.ring_bytes),
        spin: env.shm_spin_us.map(Duration::from_micros).unwrap_or(defaults.spin),
        file_prefix: transport::shm_file_prefix(&env.run_id),
        ..defaults
    };
    let mut options = InitOptions {
        timeout: env.timeout,
        rdzv_timeout: env.rdzv_timeout,
        tuning,
        shm,
        ..Default::default()
    };
    if !env.launched() || env.world_size == 1 {
        let mesh = Arc::new(Mesh::new(0, 1, vec![None]));
        return Ok(ProcessGroup::new(
            Box::new(HostComm::world(mesh, vec![0], options.timeout, tuning)),
            vec![0],
        ));
    }
    let secret = job_secret(env)?;
    let store = connect_job_store(env, &secret)?;
    options.listen_ip = match &env.node_addr {
        Some(ip) => ip
            .parse()
            .map_err(|e: std::net::AddrParseError| crate::env::EnvError::Invalid {
                name: "BURNRUN_NODE_ADDR",
                value: ip.clone(),
                reason: e.to_string(),
            })?,
        None => store.local_addr().ip(),
    };
    let store: Arc<dyn Store> = Arc::new(PrefixStore::new(env.store_prefix(), Arc::new(store)));
    init_with_store(store, env.rank, env.world_size, &secret, &options)
}

/// The job's secret: `BURNRUN_SECRET`, or (with a warning) one derived from the run id.
pub(crate) fn job_secret(env: &DistEnv) -> Result<JobSecret, Error> {
    match &env.secret_hex {
        Some(hex) => Ok(JobSecret::from_hex(hex).map_err(|e| crate::env::EnvError::Invalid {
            name: "BURNRUN_SECRET",
            value: "<redacted>".into(),
            reason: e.to_string(),
        })?),
        None => {
            tracing::warn!("BURNRUN_SECRET is not set: authenticating with a secret derived from the run id");
            Ok(JobSecret::derive_from(&env.run_id))
        }
    }
}

/// A connection to the job's store on node 0 (`MASTER_ADDR:MASTER_PORT`), authenticated with
/// `secret`, within the rendezvous deadline.
pub(crate) fn connect_job_store(env: &DistEnv, secret: &JobSecret) -> Result<TcpStore, Error> {
    let addr = format!("{}:{}", env.master_addr, env.master_port);
    Ok(TcpStore::connect(&addr, secret, env.rdzv_timeout)?)
}

/// Builds the world group of `world_size` ranks that rendezvous through `store` (keys
/// `addr/<rank>`; give each job its own prefix).
pub fn init_with_store(
    store: Arc<dyn Store>,
    rank: usize,
    world_size: usize,
    secret: &JobSecret,
    options: &InitOptions,
) -> Result<ProcessGroup, Error> {
    let deadline = Instant::now() + options.rdzv_timeout;
    let listener = DataListener::bind(rank, options.listen_ip)?;
    let my_addr = listener.local_addr()?;
    let store_err = |source| CommError::Store {
        rank,
        group: "world".into(),
        source,
    };
    store
        .set(&format!("addr/{rank}"), my_addr.to_string().as_bytes())
        .map_err(store_err)?;

    let mut pairs: Vec<Option<Pair>> = (0..world_size).map(|_| None).collect();
    let higher = world_size - rank - 1;
    let accepted = std::thread::scope(|scope| -> Result<Vec<(usize, std::net::TcpStream)>, Error> {
        let acceptor = scope.spawn(|| -> Result<Vec<(usize, std::net::TcpStream)>, TransportError> {
            (0..higher).map(|_| listener.accept(secret, deadline)).collect()
        });
        for (peer, slot) in pairs.iter_mut().enumerate().take(rank) {
            let left = deadline.saturating_duration_since(Instant::now());
            let raw = store.get(&format!("addr/{peer}"), left).map_err(store_err)?;
            let peer_addr: SocketAddr = String::from_utf8_lossy(&raw)
                .parse()
                .map_err(|e| TransportError::Connect {
                    rank,
                    peer,
                    addr: String::from_utf8_lossy(&raw).into_owned(),
                    reason: format!("bad address in the store: {e}"),
                })?;
            let stream = transport::connect(rank, peer, peer_addr, secret, deadline)?;
            *slot = Some(Pair::new(rank, peer, stream)?);
        }
        // Invariant: the acceptor thread does not panic (it only returns errors).
        Ok(acceptor.join().expect("acceptor thread panicked")?)
    })?;
    for (peer, stream) in accepted {
        if peer <= rank || peer >= world_size || pairs[peer].is_some() {
            return Err(TransportError::Protocol {
                rank,
                peer,
                reason: format!("a connection claimed to come from rank {peer}, which must not connect to rank {rank}"),
            }
            .into());
        }
        pairs[peer] = Some(Pair::new(rank, peer, stream)?);
    }
    let hosts = match world_size {
        1 => vec![0],
        _ => host_indices(store.as_ref(), rank, world_size, &options.shm, deadline)?,
    };
    if world_size > 1 {
        for (peer, link) in shm_links(store.as_ref(), rank, world_size, &options.shm, deadline)? {
            if let Some(pair) = pairs[peer].as_mut() {
                pair.attach_shm(link);
            }
        }
    }
    let mesh = Arc::new(Mesh::new(rank, world_size, pairs).with_shm_spin(options.shm.spin));
    tracing::debug!(rank, world_size, transports = ?mesh.transports(), "data connections established");
    // A `drop` fault (`BURNRUN_FAULT`, tests only) cuts this rank's connection to a peer.
    let weak = Arc::downgrade(&mesh);
    crate::fault::on_drop(move |peer| {
        if let Some(mesh) = weak.upgrade() {
            mesh.sever(peer, "cut by fault injection (BURNRUN_FAULT)");
        }
    });
    tracing::debug!(rank, ?hosts, "host of each rank");
    let comm = HostComm::world(mesh, hosts, options.timeout, options.tuning);
    Ok(ProcessGroup::new(Box::new(comm), (0..world_size).collect()).with_store(store))
}

/// The host of every rank, numbered in order of each host's first rank: each publishes its host
/// id (`ShmOptions::host_id`, else [`transport::host_id`]) under `host_id/<rank>`, whether or not it
/// uses shared memory (`host/<rank>`, which `shm_links` compares, says "off" for a rank that
/// does not).
fn host_indices(
    store: &dyn Store,
    rank: usize,
    world_size: usize,
    options: &ShmOptions,
    deadline: Instant,
) -> Result<Vec<usize>, Error> {
    let store_err = |source| CommError::Store {
        rank,
        group: "world".into(),
        source,
    };
    let mine = options.host_id.clone().unwrap_or_else(transport::host_id);
    store
        .set(&format!("host_id/{rank}"), mine.as_bytes())
        .map_err(store_err)?;
    let mut ids: Vec<String> = Vec::with_capacity(world_size);
    let mut hosts = Vec::with_capacity(world_size);
    for other in 0..world_size {
        let id = if other == rank {
            mine.clone()
        } else {
            let left = deadline.saturating_duration_since(Instant::now());
            let raw = store.get(&format!("host_id/{other}"), left).map_err(store_err)?;
            String::from_utf8_lossy(&raw).into_owned()
        };
        let index = match ids.iter().position(|known| *known == id) {
            Some(index) => index,
            None => {
                ids.push(id);
                ids.len() - 1
            }
        };
        hosts.push(index);
    }
    Ok(hosts)
}

/// Sets up shared memory with the ranks of this host: returns the links both sides of each pair
/// opened (the others stay on TCP). Keys: `host/<rank>`, `shm/<rank>` (the inbox, or why there is
/// none), `shm_ok/<rank>` (the peers whose inboxes this rank opened).
fn shm_links(
    store: &dyn Store,
    rank: usize,
    world_size: usize,
    options: &ShmOptions,
    deadline: Instant,
) -> Result<Vec<(usize, ShmLink)>, Error> {
    let store_err = |source| CommError::Store {
        rank,
        group: "world".into(),
        source,
    };
    let get = |key: String| -> Result<String, Error> {
        let left = deadline.saturating_duration_since(Instant::now());
        let raw = store.get(&key, left).map_err(store_err)?;
        Ok(String::from_utf8_lossy(&raw).into_owned())
    };
    // A rank with shared memory off still answers, so that its peers on this host do not wait
    // for its host id; "off" matches no host.
    let host = match options.enabled {
        true => options.host_id.clone().unwrap_or_else(transport::host_id),
        false => "off".to_string(),
    };
    store.set(&format!("host/{rank}"), host.as_bytes()).map_err(store_err)?;
    if !options.enabled {
        return Ok(Vec::new());
    }
    let mut peers = Vec::new();
    for other in (0..world_size).filter(|&r| r != rank) {
        if get(format!("host/{other}"))? == host {
            peers.push(other);
        }
    }
    if peers.is_empty() {
        return Ok(Vec::new());
    }
    let inbox = match Inbox::create(&options.dir, &options.file_prefix, rank, &peers, options.ring_bytes) {
        Ok(inbox) => {
            store
                .set(&format!("shm/{rank}"), inbox.describe().as_bytes())
                .map_err(store_err)?;
            Some(Arc::new(inbox))
        }
        Err(e) => {
            tracing::warn!(
                "rank {rank}: no shared memory with ranks {peers:?} of this host, using TCP: {e}. If {} is \
                 too small (Docker gives 64 MiB; raise it with --shm-size), lower BURNRUN_SHM_RING_BYTES or \
                 comm.shm_ring_bytes",
                options.dir.display()
            );
            store
                .set(&format!("shm/{rank}"), format!("none {e}").as_bytes())
                .map_err(store_err)?;
            None
        }
    };
    let mut opened = Vec::new();
    for &peer in &peers {
        let description = get(format!("shm/{peer}"))?;
        let Some(inbox) = &inbox else { continue };
        if description.starts_with("none") {
            continue;
        }
        match ShmLink::open(inbox, peer, &description) {
            Ok(link) => opened.push((peer, link)),
            Err(e) => tracing::warn!("rank {rank}: shared memory with rank {peer} failed, using TCP: {e}"),
        }
    }
    let ok: Vec<String> = opened.iter().map(|(peer, _)| peer.to_string()).collect();
    store
        .set(&format!("shm_ok/{rank}"), ok.join(",").as_bytes())
        .map_err(store_err)?;
    let mut agreed = Vec::with_capacity(peers.len());
    for &peer in &peers {
        let theirs = get(format!("shm_ok/{peer}"))?;
        if theirs.split(',').any(|r| r == rank.to_string()) {
            agreed.push(peer);
        }
    }
    // Every peer that will ever open our inbox has done so (it answered above): drop the names.
    if let Some(inbox) = &inbox {
        inbox.unlink();
    }
    let links: Vec<(usize, ShmLink)> = opened.into_iter().filter(|(peer, _)| agreed.contains(peer)).collect();
    Ok(links)
}

/// Runs `f` on `world_size` ranks, one thread each, joined through a memory store and real TCP
/// connections on 127.0.0.1 (gloo's `spawn`): the way collectives are tested. Returns each rank's
/// result in rank order.
pub fn spawn_ranks<R: Send>(
    world_size: usize,
    options: &InitOptions,
    f: impl Fn(ProcessGroup) -> R + Sync,
) -> Result<Vec<R>, Error> {
    spawn_ranks_each(&vec![options.clone(); world_size], f)
}

/// [`spawn_ranks`] with options of its own for each rank (`options[r]` for rank r): ranks that
/// count as different hosts (`ShmOptions::host_id`), or one rank with shared memory off.
pub fn spawn_ranks_each<R: Send>(
    options: &[InitOptions],
    f: impl Fn(ProcessGroup) -> R + Sync,
) -> Result<Vec<R>, Error> {
    let world_size = options.len();
    let store: Arc<dyn Store> = Arc::new(crate::rendezvous::MemoryStore::new());
    let secret = JobSecret::generate().map_err(|e| crate::env::EnvError::Invalid {
        name: "BURNRUN_SECRET",
        value: String::new(),
        reason: e.to_string(),
    })?;
    std::thread::scope(|scope| {
        let handles: Vec<_> = options
            .iter()
            .enumerate()
            .map(|(rank, options)| {
                let (store, secret, f) = (Arc::clone(&store), &secret, &f);
                scope.spawn(move || init_with_store(store, rank, world_size, secret, options).map(f))
            })
            .collect();
        // Invariant: a panicking rank re-raises its panic here, as a test expects.
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}
