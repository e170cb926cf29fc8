//! Job secrets and the handshake that opens every connection (store and data).
//!
//! Mutual challenge-response over HMAC-SHA256, so the secret never crosses the wire:
//! 1. client → server: `MAGIC`, channel kind, client nonce (16 bytes)
//! 2. server → client: `MAGIC`, server nonce, `HMAC(secret, "server" ‖ kind ‖ client nonce ‖ server nonce)`
//! 3. client checks the server's proof (a client never talks to an impostor), then sends
//!    `HMAC(secret, "client" ‖ kind ‖ server nonce ‖ client nonce)`
//! 4. server checks it and answers one status byte; on failure it logs the peer and closes.
//!
//! Every step runs under a deadline; a peer that sends garbage or nothing is refused, never trusted.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// First bytes of every burnrun connection, protocol version included.
pub const MAGIC: [u8; 8] = *b"BURNRUN1";
const NONCE_BYTES: usize = 16;
const PROOF_BYTES: usize = 32;
const ACCEPTED: u8 = 0xA5;

/// What a connection is for; part of the proof, so a store proof cannot open a data channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// A rendezvous store client.
    Store = 1,
    /// A rank-to-rank data connection.
    Data = 2,
}

/// Errors of the handshake.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The peer's proof did not match: it does not know this job's secret.
    #[error("handshake with {peer}: the peer does not know this job's secret (wrong BURNRUN_SECRET or another job)")]
    BadProof {
        /// The remote address.
        peer: String,
    },
    /// The peer does not speak burnrun's protocol.
    #[error("handshake with {peer}: not a burnrun {channel:?} peer (bad magic or channel)")]
    BadMagic {
        /// The remote address.
        peer: String,
        /// The expected channel.
        channel: Channel,
    },
    /// I/O failed or timed out during the handshake.
    #[error("handshake with {peer} failed after {elapsed:?} (deadline {timeout:?}): {source}")]
    Io {
        /// The remote address.
        peer: String,
        /// How long it ran.
        elapsed: Duration,
        /// The deadline.
        timeout: Duration,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The secret string is not 64 hex digits.
    #[error("job secret must be 64 hex digits, got {len} characters")]
    BadSecret {
        /// Length of what was given.
        len: usize,
    },
    /// The operating system's random source failed.
    #[error("cannot draw random bytes: {0}")]
    Random(String),
}

/// A job's shared secret (256 bits).
#[derive(Clone, PartialEq, Eq)]
pub struct JobSecret([u8; 32]);

impl std::fmt::Debug for JobSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JobSecret(<redacted>)")
    }
}

fn random_bytes<const N: usize>() -> Result<[u8; N], AuthError> {
    let mut out = [0u8; N];
    getrandom::getrandom(&mut out).map_err(|e| AuthError::Random(e.to_string()))?;
    Ok(out)
}

impl JobSecret {
    /// Draws a fresh secret from the operating system.
    pub fn generate() -> Result<Self, AuthError> {
        Ok(Self(random_bytes()?))
    }

    /// A secret derived from a public string (the run id, or the store port). Only for jobs started
    /// without a secret: it keeps strangers' jobs apart, but anyone who knows the run id can join.
    pub fn derive_from(public: &str) -> Self {
        use sha2::Digest;
        let digest = Sha256::digest(format!("burnrun-run-id:{public}").as_bytes());
        Self(digest.into())
    }

    /// Parses 64 hex digits.
    pub fn from_hex(hex: &str) -> Result<Self, AuthError> {
        let hex = hex.trim();
        let bad = || AuthError::BadSecret { len: hex.len() };
        if hex.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Self(out))
    }

    /// 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn proof(&self, role: &[u8], channel: Channel, first: &[u8], second: &[u8]) -> [u8; PROOF_BYTES] {
        // Invariant: HMAC accepts keys of any length, so `new_from_slice` cannot fail.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("hmac takes any key length");
        mac.update(role);
        mac.update(&[channel as u8]);
        mac.update(first);
        mac.update(second);
        mac.finalize().into_bytes().into()
    }
}

/// Compares two byte strings in time independent of where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

struct Deadline {
    start: Instant,
    timeout: Duration,
}

impl Deadline {
    fn arm(&self, stream: &TcpStream) -> std::io::Result<()> {
        let left = self
            .timeout
            .saturating_sub(self.start.elapsed())
            .max(Duration::from_millis(1));
        stream.set_read_timeout(Some(left))?;
        stream.set_write_timeout(Some(left))
    }

    /// Fills `buf` by the deadline. A read timeout alone would bound each read, not the step: a
    /// peer sending one byte just before every timeout could stretch a step to one deadline per byte.
    fn read_exact(&self, stream: &mut TcpStream, mut buf: &mut [u8]) -> std::io::Result<()> {
        while !buf.is_empty() {
            let left = self.timeout.saturating_sub(self.start.elapsed());
            if left.is_zero() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the handshake's deadline passed",
                ));
            }
            stream.set_read_timeout(Some(left))?;
            match stream.read(buf) {
                Ok(0) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the peer closed the connection",
                    ))
                }
                Ok(n) => buf = &mut buf[n..],
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

fn peer_name(stream: &TcpStream) -> String {
    stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "<unknown peer>".into())
}

/// Runs the client side on a freshly connected stream. On return the stream's timeouts are cleared.
pub fn client_handshake(
    stream: &mut TcpStream,
    secret: &JobSecret,
    channel: Channel,
    timeout: Duration,
) -> Result<(), AuthError> {
    let deadline = Deadline {
        start: Instant::now(),
        timeout,
    };
    let peer = peer_name(stream);
    let io = |source: std::io::Error| AuthError::Io {
        peer: peer.clone(),
        elapsed: deadline.start.elapsed(),
        timeout,
        source,
    };
    let client_nonce: [u8; NONCE_BYTES] = random_bytes()?;
    deadline.arm(stream).map_err(io)?;
    let mut hello = Vec::with_capacity(8 + 1 + NONCE_BYTES);
    hello.extend_from_slice(&MAGIC);
    hello.push(channel as u8);
    hello.extend_from_slice(&client_nonce);
    stream.write_all(&hello).map_err(io)?;

    let mut reply = [0u8; 8 + NONCE_BYTES + PROOF_BYTES];
    deadline.read_exact(stream, &mut reply).map_err(io)?;
    if reply[..8] != MAGIC {
        return Err(AuthError::BadMagic { peer, channel });
    }
    let server_nonce = &reply[8..8 + NONCE_BYTES];
    let expected = secret.proof(b"server", channel, &client_nonce, server_nonce);
    if !constant_time_eq(&expected, &reply[8 + NONCE_BYTES..]) {
        return Err(AuthError::BadProof { peer });
    }
    let proof = secret.proof(b"client", channel, server_nonce, &client_nonce);
    deadline.arm(stream).map_err(io)?;
    stream.write_all(&proof).map_err(io)?;
    let mut status = [0u8; 1];
    deadline.read_exact(stream, &mut status).map_err(io)?;
    if status[0] != ACCEPTED {
        return Err(AuthError::BadProof { peer });
    }
    stream.set_read_timeout(None).map_err(io)?;
    stream.set_write_timeout(None).map_err(io)?;
    Ok(())
}

/// Runs the server side on an accepted stream. On return the stream's timeouts are cleared.
pub fn server_handshake(
    stream: &mut TcpStream,
    secret: &JobSecret,
    channel: Channel,
    timeout: Duration,
) -> Result<(), AuthError> {
    let deadline = Deadline {
        start: Instant::now(),
        timeout,
    };
    let peer = peer_name(stream);
    let io = |source: std::io::Error| AuthError::Io {
        peer: peer.clone(),
        elapsed: deadline.start.elapsed(),
        timeout,
        source,
    };
    let mut hello = [0u8; 8 + 1 + NONCE_BYTES];
    deadline.read_exact(stream, &mut hello).map_err(io)?;
    if hello[..8] != MAGIC || hello[8] != channel as u8 {
        return Err(AuthError::BadMagic { peer, channel });
    }
    let client_nonce = &hello[9..];
    let server_nonce: [u8; NONCE_BYTES] = random_bytes()?;
    let mut reply = Vec::with_capacity(8 + NONCE_BYTES + PROOF_BYTES);
    reply.extend_from_slice(&MAGIC);
    reply.extend_from_slice(&server_nonce);
    reply.extend_from_slice(&secret.proof(b"server", channel, client_nonce, &server_nonce));
    deadline.arm(stream).map_err(io)?;
    stream.write_all(&reply).map_err(io)?;
    let mut proof = [0u8; PROOF_BYTES];
    deadline.read_exact(stream, &mut proof).map_err(io)?;
    let expected = secret.proof(b"client", channel, &server_nonce, client_nonce);
    if !constant_time_eq(&expected, &proof) {
        return Err(AuthError::BadProof { peer });
    }
    deadline.arm(stream).map_err(io)?;
    stream.write_all(&[ACCEPTED]).map_err(io)?;
    stream.set_read_timeout(None).map_err(io)?;
    stream.set_write_timeout(None).map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn pair_up(server_secret: JobSecret, client_secret: JobSecret) -> (Result<(), AuthError>, Result<(), AuthError>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            server_handshake(&mut s, &server_secret, Channel::Data, Duration::from_secs(5))
        });
        let mut c = TcpStream::connect(addr).unwrap();
        let client = client_handshake(&mut c, &client_secret, Channel::Data, Duration::from_secs(5));
        drop(c);
        (server.join().unwrap(), client)
    }

    #[test]
    fn peers_sharing_the_secret_are_accepted() {
        let s = JobSecret::generate().unwrap();
        let (server, client) = pair_up(s.clone(), s);
        server.unwrap();
        client.unwrap();
    }

    #[test]
    fn a_client_with_a_wrong_secret_is_refused_and_refuses_the_server() {
        let (server, client) = pair_up(JobSecret::generate().unwrap(), JobSecret::generate().unwrap());
        assert!(matches!(client, Err(AuthError::BadProof { .. })), "{client:?}");
        assert!(server.is_err());
    }

    #[test]
    fn secrets_round_trip_through_hex() {
        let s = JobSecret::generate().unwrap();
        assert_eq!(JobSecret::from_hex(&s.to_hex()).unwrap(), s);
        assert!(JobSecret::from_hex("abc").is_err());
        assert!(JobSecret::from_hex(&"zz".repeat(32)).is_err());
    }
}
