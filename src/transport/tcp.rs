//! TCP connections between ranks: listening, connecting, and the job-secret handshake.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crate::auth::{self, Channel, JobSecret};

use super::error::TransportError;

/// A listening socket for data connections from higher ranks.
#[derive(Debug)]
pub struct DataListener {
    rank: usize,
    listener: TcpListener,
}

impl DataListener {
    /// Binds to `ip` on a free port.
    pub fn bind(rank: usize, ip: IpAddr) -> Result<Self, TransportError> {
        let listener = TcpListener::bind(SocketAddr::new(ip, 0)).map_err(|source| TransportError::Io {
            rank,
            what: format!("bind a data listener on {ip}"),
            source,
        })?;
        listener.set_nonblocking(true).map_err(|source| TransportError::Io {
            rank,
            what: "set the listener non-blocking".into(),
            source,
        })?;
        Ok(Self { rank, listener })
    }

    /// The address peers connect to.
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.listener.local_addr().map_err(|source| TransportError::Io {
            rank: self.rank,
            what: "read the listener's address".into(),
            source,
        })
    }

    /// Accepts one authenticated connection and returns the peer's rank with it. Connections that
    /// fail the handshake are logged and dropped; waiting goes on until `deadline`.
    pub fn accept(&self, secret: &JobSecret, deadline: Instant) -> Result<(usize, TcpStream), TransportError> {
        let rank = self.rank;
        loop {
            match self.listener.accept() {
                Ok((mut stream, addr)) => {
                    let left = deadline
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(100));
                    let _ = stream.set_nonblocking(false);
                    match auth::server_handshake(&mut stream, secret, Channel::Data, left.min(HANDSHAKE_TIMEOUT))
                        .map_err(|source| TransportError::Auth { rank, source })
                        .and_then(|()| read_hello(rank, &mut stream))
                    {
                        Ok(peer) => return Ok((peer, stream)),
                        Err(e) => tracing::warn!("rank {rank}: refused a data connection from {addr}: {e}"),
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(TransportError::Io {
                            rank,
                            what: "wait for data connections from higher ranks".into(),
                            source: std::io::Error::new(std::io::ErrorKind::TimedOut, "deadline passed"),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(TransportError::Io {
                        rank,
                        what: "accept a data connection".into(),
                        source,
                    })
                }
            }
        }
    }
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn read_hello(rank: usize, stream: &mut TcpStream) -> Result<usize, TransportError> {
    let mut hello = [0u8; 4];
    stream
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .and_then(|()| stream.read_exact(&mut hello))
        .map_err(|source| TransportError::Io {
            rank,
            what: "read the connecting rank's id".into(),
            source,
        })?;
    let _ = stream.set_read_timeout(None);
    Ok(u32::from_le_bytes(hello) as usize)
}

/// Connects to `peer` at `addr`, retrying refused connections until `deadline`, and authenticates.
pub fn connect(
    rank: usize,
    peer: usize,
    addr: SocketAddr,
    secret: &JobSecret,
    deadline: Instant,
) -> Result<TcpStream, TransportError> {
    let fail = |reason: String| TransportError::Connect {
        rank,
        peer,
        addr: addr.to_string(),
        reason,
    };
    let mut stream = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(fail("deadline passed while retrying".into()));
        }
        match TcpStream::connect_timeout(&addr, left.min(Duration::from_secs(5))) {
            Ok(s) => break s,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::TimedOut
                ) =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(fail(e.to_string())),
        }
    };
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(100));
    auth::client_handshake(&mut stream, secret, Channel::Data, left.min(HANDSHAKE_TIMEOUT))
        .map_err(|source| TransportError::Auth { rank, source })?;
    stream
        .write_all(&(rank as u32).to_le_bytes())
        .map_err(|e| fail(e.to_string()))?;
    Ok(stream)
}
