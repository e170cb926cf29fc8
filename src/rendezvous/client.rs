//! The TCP store client, used by every rank and by the other nodes' launchers.
//!
//! One connection per client, one request in flight at a time (a mutex around the stream), every
//! read and write under a deadline: the operation's own timeout plus [`IO_MARGIN`].

use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::wire::{self, check_key, check_keys, check_value, deadline_after, timeout_ms, Frame, Reader, WireError};
use super::{Store, StoreError};
use crate::auth::{self, AuthError, Channel, JobSecret};

/// Time a server gets, beyond the operation's own timeout, to answer.
const IO_MARGIN: Duration = Duration::from_secs(10);
/// The handshake gets at least this long, even when connecting used up most of the timeout.
const MIN_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between connection attempts doubles from the first to the last.
const RETRY_FIRST: Duration = Duration::from_millis(20);
const RETRY_LAST: Duration = Duration::from_secs(1);

/// A connection to a [`TcpStoreServer`](super::TcpStoreServer); `Send + Sync`, one request at a time.
///
/// A `get` or `wait` holds the connection until it returns, so a thread that must `set` while
/// another waits should use its own client. After an I/O or protocol error the connection is not
/// reused: later calls fail with `StoreError::Io` at once (connect again to recover).
#[derive(Debug)]
pub struct TcpStore {
    addr: String,
    local_addr: SocketAddr,
    /// `None` once an error left the stream at an unknown point of the protocol.
    conn: Mutex<Option<TcpStream>>,
}

/// What an error of one call names.
struct Call<'a> {
    op: &'static str,
    key: &'a str,
    timeout: Duration,
    delta: i64,
}

impl<'a> Call<'a> {
    fn new(op: &'static str, key: &'a str) -> Self {
        Call {
            op,
            key,
            timeout: Duration::ZERO,
            delta: 0,
        }
    }
}

/// How the server answered a well-formed request.
enum Reply<T> {
    Done(T),
    Timeout(Vec<String>),
    NotAnInteger,
    Overflow,
    Closed,
}

fn deadline_passed(deadline: Instant) -> bool {
    Instant::now() >= deadline
}

fn try_connect(addr: &str, timeout: Duration) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::InvalidInput, "the address resolves to nothing");
    for candidate in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&candidate, timeout.max(Duration::from_millis(10))) {
            Ok(stream) => return Ok(stream),
            Err(e) => last = e,
        }
    }
    Err(last)
}

impl TcpStore {
    /// Connects to "host:port", retrying until `timeout` (the server may start later), then runs the handshake.
    pub fn connect(addr: &str, secret: &JobSecret, timeout: Duration) -> Result<Self, StoreError> {
        let io = |source| StoreError::Io {
            op: "connect",
            addr: addr.to_owned(),
            source,
        };
        let deadline = deadline_after(timeout);
        let mut pause = RETRY_FIRST;
        let stream = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let last = match try_connect(addr, left) {
                Ok(mut stream) => {
                    let handshake_timeout = left.max(MIN_HANDSHAKE_TIMEOUT);
                    match auth::client_handshake(&mut stream, secret, Channel::Store, handshake_timeout) {
                        Ok(()) => break stream,
                        // Closed in the middle (a server flooded by strangers closes the oldest
                        // pending handshakes): try again. A wrong secret is final.
                        Err(AuthError::Io { source, .. }) if !deadline_passed(deadline) => source,
                        Err(source) => {
                            return Err(StoreError::Auth {
                                addr: addr.to_owned(),
                                source,
                            })
                        }
                    }
                }
                Err(e) => e,
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let message = format!("no store server answered within {timeout:?} (last attempt: {last})");
                return Err(io(io::Error::new(last.kind(), message)));
            }
            std::thread::sleep(pause.min(left));
            pause = (pause * 2).min(RETRY_LAST);
        };
        stream.set_nodelay(true).map_err(io)?;
        let local_addr = stream.local_addr().map_err(io)?;
        Ok(Self {
            addr: addr.to_owned(),
            local_addr,
            conn: Mutex::new(Some(stream)),
        })
    }

    /// Local address of the connection (ranks advertise this IP for their data listeners).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    fn io_error(&self, op: &'static str, source: io::Error) -> StoreError {
        StoreError::Io {
            op,
            addr: self.addr.clone(),
            source,
        }
    }

    /// Sends `frame`, reads the answer (`parse_done` reads the fields of a successful one).
    fn call<T>(
        &self,
        call: Call<'_>,
        frame: Frame,
        parse_done: impl FnOnce(&mut Reader<'_, TcpStream>) -> Result<T, WireError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn.lock().unwrap_or_else(|poisoned| {
            // A thread panicked mid-call: the stream may be mid-frame, so it is not used again.
            let mut conn = poisoned.into_inner();
            *conn = None;
            conn
        });
        let Some(stream) = conn.as_mut() else {
            let broken = io::Error::new(io::ErrorKind::NotConnected, "the connection broke in an earlier call");
            return Err(self.io_error(call.op, broken));
        };
        let read_timeout = call.timeout.saturating_add(IO_MARGIN);
        let reply = exchange(stream, &frame, read_timeout, parse_done);
        if !matches!(
            reply,
            Ok(Reply::Done(_) | Reply::Timeout(_) | Reply::NotAnInteger | Reply::Overflow)
        ) {
            *conn = None;
        }
        match reply {
            Ok(Reply::Done(value)) => Ok(value),
            Ok(Reply::Timeout(keys)) => Err(StoreError::Timeout {
                op: call.op,
                keys,
                timeout: call.timeout,
            }),
            Ok(Reply::NotAnInteger) => Err(StoreError::NotAnInteger {
                key: call.key.to_owned(),
            }),
            Ok(Reply::Overflow) => Err(StoreError::AddOverflow {
                key: call.key.to_owned(),
                delta: call.delta,
            }),
            Ok(Reply::Closed) => Err(self.io_error(
                call.op,
                io::Error::new(io::ErrorKind::ConnectionAborted, "the store server shut down"),
            )),
            Err(WireError::Io(e)) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                let message = format!("no answer within {read_timeout:?}");
                Err(self.io_error(call.op, io::Error::new(io::ErrorKind::TimedOut, message)))
            }
            Err(WireError::Io(e)) => Err(self.io_error(call.op, e)),
            Err(WireError::Malformed(reason)) => Err(StoreError::Protocol {
                op: call.op,
                peer: self.addr.clone(),
                reason,
            }),
        }
    }
}

fn exchange<T>(
    stream: &mut TcpStream,
    frame: &Frame,
    read_timeout: Duration,
    parse_done: impl FnOnce(&mut Reader<'_, TcpStream>) -> Result<T, WireError>,
) -> Result<Reply<T>, WireError> {
    stream.set_write_timeout(Some(IO_MARGIN))?;
    stream.set_read_timeout(Some(read_timeout))?;
    stream.write_all(&frame.0)?;
    let mut reader = Reader(stream);
    Ok(match reader.u8()? {
        wire::STATUS_OK => Reply::Done(parse_done(&mut reader)?),
        wire::STATUS_TIMEOUT => Reply::Timeout(reader.keys()?),
        wire::STATUS_NOT_AN_INTEGER => Reply::NotAnInteger,
        wire::STATUS_OVERFLOW => Reply::Overflow,
        wire::STATUS_CLOSED => Reply::Closed,
        wire::STATUS_PROTOCOL => {
            let reason = reader.bytes("reason", wire::MAX_KEY_BYTES)?;
            let reason = String::from_utf8_lossy(&reason);
            return Err(WireError::Malformed(format!(
                "the server refused the request: {reason}"
            )));
        }
        other => return Err(WireError::Malformed(format!("unknown response status {other}"))),
    })
}

impl Store for TcpStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        check_key("set", key)?;
        check_value("set", key, value)?;
        let frame = Frame::new(wire::OP_SET).bytes(key.as_bytes()).bytes(value);
        self.call(Call::new("set", key), frame, |_| Ok(()))
    }

    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>, StoreError> {
        check_key("get", key)?;
        let frame = Frame::new(wire::OP_GET).u64(timeout_ms(timeout)).bytes(key.as_bytes());
        let call = Call {
            timeout,
            ..Call::new("get", key)
        };
        self.call(call, frame, |reader| reader.value())
    }

    fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        check_key("try_get", key)?;
        let frame = Frame::new(wire::OP_TRY_GET).bytes(key.as_bytes());
        self.call(Call::new("try_get", key), frame, |reader| {
            Ok(if reader.flag("present")? {
                Some(reader.value()?)
            } else {
                None
            })
        })
    }

    fn wait(&self, keys: &[&str], timeout: Duration) -> Result<(), StoreError> {
        check_keys("wait", keys)?;
        // At most MAX_WAIT_KEYS keys (checked above), so the count fits in u32.
        let frame = Frame::new(wire::OP_WAIT)
            .u64(timeout_ms(timeout))
            .u32(keys.len() as u32);
        let frame = keys.iter().fold(frame, |frame, key| frame.bytes(key.as_bytes()));
        let call = Call {
            timeout,
            ..Call::new("wait", keys.first().copied().unwrap_or_default())
        };
        self.call(call, frame, |_| Ok(()))
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64, StoreError> {
        check_key("add", key)?;
        let frame = Frame::new(wire::OP_ADD).bytes(key.as_bytes()).i64(delta);
        let call = Call {
            delta,
            ..Call::new("add", key)
        };
        self.call(call, frame, |reader| reader.i64())
    }

    fn compare_set(&self, key: &str, expected: Option<&[u8]>, desired: &[u8]) -> Result<Vec<u8>, StoreError> {
        check_key("compare_set", key)?;
        check_value("compare_set", key, expected.unwrap_or_default())?;
        check_value("compare_set", key, desired)?;
        let frame = Frame::new(wire::OP_COMPARE_SET).bytes(key.as_bytes());
        let frame = match expected {
            Some(expected) => frame.u8(1).bytes(expected),
            None => frame.u8(0),
        };
        self.call(Call::new("compare_set", key), frame.bytes(desired), |reader| {
            reader.value()
        })
    }

    fn delete(&self, key: &str) -> Result<bool, StoreError> {
        check_key("delete", key)?;
        let frame = Frame::new(wire::OP_DELETE).bytes(key.as_bytes());
        self.call(Call::new("delete", key), frame, |reader| reader.flag("existed"))
    }
}
