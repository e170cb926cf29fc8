//! Building the world process group: from the launcher's environment, or from any store.
//!
//! Every rank binds a data listener (on the address it reaches the store from, so multi-node jobs
//! advertise a routable address), publishes it, and connects to every lower rank while it
//! accepts the higher ones. Each connection is authenticated with the job secret and says which
//! rank it comes from.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth::JobSecret;
use crate::env::DistEnv;
use crate::error::Error;
use crate::rendezvous::{PrefixStore, Store, TcpStore};
use crate::transport::{self, DataListener, Mesh, TcpPair, TransportError};

use super::communicator::CommError;
use super::group::ProcessGroup;
use super::host::{HostComm, Tuning};

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
}

impl Default for InitOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(crate::env::DEFAULT_TIMEOUT_SECS),
            rdzv_timeout: Duration::from_secs(crate::env::DEFAULT_RDZV_TIMEOUT_SECS),
            tuning: Tuning::default(),
            listen_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        }
    }
}

/// Joins the job described by the environment (set by the `burnrun` launcher, or torchrun's
/// variables). Without a launcher this is a world of one rank.
pub fn init() -> Result<ProcessGroup, Error> {
    init_from(&DistEnv::from_env()?)
}

/// Joins the job described by `env`.
pub fn init_from(env: &DistEnv) -> Result<ProcessGroup, Error> {
    let mut tuning = Tuning::default();
    if let Some(bytes) = env.ring_threshold_bytes {
        tuning.ring_threshold_bytes = bytes;
    }
    if let Some(bytes) = env.segment_bytes {
        tuning.segment_bytes = bytes;
    }
    let mut options = InitOptions {
        timeout: env.timeout,
        rdzv_timeout: env.rdzv_timeout,
        tuning,
        ..Default::default()
    };
    if !env.launched() || env.world_size == 1 {
        let mesh = Arc::new(Mesh::new(0, 1, vec![None]));
        return Ok(ProcessGroup::new(
            Box::new(HostComm::world(mesh, options.timeout, tuning)),
            vec![0],
        ));
    }
    let secret = match &env.secret_hex {
        Some(hex) => JobSecret::from_hex(hex).map_err(|e| crate::env::EnvError::Invalid {
            name: "BURNRUN_SECRET",
            value: "<redacted>".into(),
            reason: e.to_string(),
        })?,
        None => {
            tracing::warn!("BURNRUN_SECRET is not set: authenticating with a secret derived from the run id");
            JobSecret::derive_from(&env.run_id)
        }
    };
    let addr = format!("{}:{}", env.master_addr, env.master_port);
    let store = TcpStore::connect(&addr, &secret, env.rdzv_timeout)?;
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
    let store: Arc<dyn Store> = Arc::new(PrefixStore::new(
        format!("burnrun/{}/world", env.run_id),
        Arc::new(store),
    ));
    init_with_store(store, env.rank, env.world_size, &secret, &options)
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

    let mut pairs: Vec<Option<TcpPair>> = (0..world_size).map(|_| None).collect();
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
            *slot = Some(TcpPair::new(rank, peer, stream)?);
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
        pairs[peer] = Some(TcpPair::new(rank, peer, stream)?);
    }
    let mesh = Arc::new(Mesh::new(rank, world_size, pairs));
    tracing::debug!(rank, world_size, "data connections established");
    let comm = HostComm::world(mesh, options.timeout, options.tuning);
    Ok(ProcessGroup::new(Box::new(comm), (0..world_size).collect()))
}

/// Runs `f` on `world_size` ranks, one thread each, joined through a memory store and real TCP
/// connections on 127.0.0.1 (gloo's `spawn`): the way collectives are tested. Returns each rank's
/// result in rank order.
pub fn spawn_ranks<R: Send>(
    world_size: usize,
    options: &InitOptions,
    f: impl Fn(ProcessGroup) -> R + Sync,
) -> Result<Vec<R>, Error> {
    let store: Arc<dyn Store> = Arc::new(crate::rendezvous::MemoryStore::new());
    let secret = JobSecret::generate().map_err(|e| crate::env::EnvError::Invalid {
        name: "BURNRUN_SECRET",
        value: String::new(),
        reason: e.to_string(),
    })?;
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..world_size)
            .map(|rank| {
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
