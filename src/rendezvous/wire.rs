//! The store's wire protocol: one request frame, one response frame, over an authenticated stream.
//!
//! Integers are little-endian. A `key` is `u32 length ‖ UTF-8 bytes` (at most [`MAX_KEY_BYTES`]), a
//! `value` is `u32 length ‖ bytes` (at most [`MAX_VALUE_BYTES`]). Every length is checked before
//! anything is allocated, so a hostile length prefix costs nothing.
//!
//! Requests, `opcode ‖ fields`:
//! - `SET key value`, `GET timeout_ms:u64 key`, `TRY_GET key`, `WAIT timeout_ms:u64 count:u32 key*`,
//!   `ADD key delta:i64`, `COMPARE_SET key has_expected:u8 [expected:value] desired:value`, `DELETE key`.
//!
//! Responses, `status ‖ fields`: `OK` followed by the operation's result (nothing for `SET`/`WAIT`,
//! a value for `GET`/`COMPARE_SET`, `present:u8 [value]` for `TRY_GET`, an `i64` for `ADD`, `existed:u8`
//! for `DELETE`); `TIMEOUT count:u32 key*` (the keys still missing); `NOT_AN_INTEGER`; `OVERFLOW`;
//! `CLOSED` (the server is shutting down); `PROTOCOL reason:value` (then the server closes the connection).

use std::io::{self, Read};

use super::StoreError;

/// Longest key the store accepts, in bytes.
pub const MAX_KEY_BYTES: usize = 4 << 10;
/// Largest value the store accepts, in bytes.
pub const MAX_VALUE_BYTES: usize = 64 << 20;
/// Most keys one `wait` may name.
pub const MAX_WAIT_KEYS: usize = 1 << 16;

pub(super) const OP_SET: u8 = 1;
pub(super) const OP_GET: u8 = 2;
pub(super) const OP_TRY_GET: u8 = 3;
pub(super) const OP_WAIT: u8 = 4;
pub(super) const OP_ADD: u8 = 5;
pub(super) const OP_COMPARE_SET: u8 = 6;
pub(super) const OP_DELETE: u8 = 7;

pub(super) const STATUS_OK: u8 = 0;
pub(super) const STATUS_TIMEOUT: u8 = 1;
pub(super) const STATUS_NOT_AN_INTEGER: u8 = 2;
pub(super) const STATUS_OVERFLOW: u8 = 3;
pub(super) const STATUS_CLOSED: u8 = 4;
pub(super) const STATUS_PROTOCOL: u8 = 5;

/// Why a frame could not be read.
#[derive(Debug)]
pub(super) enum WireError {
    /// The stream failed, timed out or ended in the middle of a frame.
    Io(io::Error),
    /// The bytes do not form a valid frame.
    Malformed(String),
}

impl From<io::Error> for WireError {
    fn from(e: io::Error) -> Self {
        WireError::Io(e)
    }
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => f.write_str("truncated frame"),
            WireError::Io(e) => write!(f, "{e}"),
            WireError::Malformed(reason) => f.write_str(reason),
        }
    }
}

/// A decoded request.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Request {
    Set {
        key: String,
        value: Vec<u8>,
    },
    Get {
        key: String,
        timeout_ms: u64,
    },
    TryGet {
        key: String,
    },
    Wait {
        keys: Vec<String>,
        timeout_ms: u64,
    },
    Add {
        key: String,
        delta: i64,
    },
    CompareSet {
        key: String,
        expected: Option<Vec<u8>>,
        desired: Vec<u8>,
    },
    Delete {
        key: String,
    },
}

/// Builds one outgoing frame in memory so it leaves in a single write.
#[derive(Debug)]
pub(super) struct Frame(pub(super) Vec<u8>);

impl Frame {
    pub(super) fn new(tag: u8) -> Self {
        Frame(vec![tag])
    }
    pub(super) fn u8(mut self, x: u8) -> Self {
        self.0.push(x);
        self
    }
    pub(super) fn u32(mut self, x: u32) -> Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    pub(super) fn u64(mut self, x: u64) -> Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    pub(super) fn i64(mut self, x: i64) -> Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    /// Appends `u32 length ‖ bytes`; callers have checked the length against the limits.
    pub(super) fn bytes(mut self, bytes: &[u8]) -> Self {
        // Invariant: callers check lengths against MAX_VALUE_BYTES (< u32::MAX) first.
        let len = u32::try_from(bytes.len()).expect("length checked against MAX_VALUE_BYTES");
        self.0.extend_from_slice(&len.to_le_bytes());
        self.0.extend_from_slice(bytes);
        self
    }
}

/// Reads the fields of a frame, every length checked before allocating.
pub(super) struct Reader<'a, R: Read>(pub(super) &'a mut R);

impl<R: Read> Reader<'_, R> {
    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut buf = [0u8; N];
        self.0.read_exact(&mut buf)?;
        Ok(buf)
    }
    pub(super) fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }
    pub(super) fn flag(&mut self, what: &str) -> Result<bool, WireError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(WireError::Malformed(format!("{what} flag must be 0 or 1, got {other}"))),
        }
    }
    pub(super) fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub(super) fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    pub(super) fn i64(&mut self) -> Result<i64, WireError> {
        Ok(i64::from_le_bytes(self.array()?))
    }
    /// A count prefix, refused above `max` before anything is allocated.
    pub(super) fn count(&mut self, what: &str, max: usize) -> Result<usize, WireError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(WireError::Malformed(format!("{what} {n} exceeds the limit of {max}")));
        }
        Ok(n)
    }
    /// `u32 length ‖ bytes` with the length refused above `max` before allocating.
    pub(super) fn bytes(&mut self, what: &str, max: usize) -> Result<Vec<u8>, WireError> {
        let len = self.count(&format!("{what} length"), max)?;
        let mut buf = vec![0u8; len];
        self.0.read_exact(&mut buf)?;
        Ok(buf)
    }
    pub(super) fn value(&mut self) -> Result<Vec<u8>, WireError> {
        self.bytes("value", MAX_VALUE_BYTES)
    }
    pub(super) fn key(&mut self) -> Result<String, WireError> {
        let bytes = self.bytes("key", MAX_KEY_BYTES)?;
        String::from_utf8(bytes).map_err(|_| WireError::Malformed("key is not UTF-8".into()))
    }
    pub(super) fn keys(&mut self) -> Result<Vec<String>, WireError> {
        let n = self.count("key count", MAX_WAIT_KEYS)?;
        // Grow as keys actually arrive: a large count alone allocates nothing.
        let mut keys = Vec::with_capacity(n.min(64));
        for _ in 0..n {
            keys.push(self.key()?);
        }
        Ok(keys)
    }

    /// Reads the fields of a request whose opcode has been read already.
    pub(super) fn request(&mut self, opcode: u8) -> Result<Request, WireError> {
        Ok(match opcode {
            OP_SET => Request::Set {
                key: self.key()?,
                value: self.value()?,
            },
            OP_GET => {
                let timeout_ms = self.u64()?;
                Request::Get {
                    key: self.key()?,
                    timeout_ms,
                }
            }
            OP_TRY_GET => Request::TryGet { key: self.key()? },
            OP_WAIT => {
                let timeout_ms = self.u64()?;
                Request::Wait {
                    keys: self.keys()?,
                    timeout_ms,
                }
            }
            OP_ADD => Request::Add {
                key: self.key()?,
                delta: self.i64()?,
            },
            OP_COMPARE_SET => {
                let key = self.key()?;
                let expected = if self.flag("has_expected")? {
                    Some(self.value()?)
                } else {
                    None
                };
                Request::CompareSet {
                    key,
                    expected,
                    desired: self.value()?,
                }
            }
            OP_DELETE => Request::Delete { key: self.key()? },
            other => return Err(WireError::Malformed(format!("unknown opcode {other}"))),
        })
    }
}

/// Milliseconds for the wire, rounded up so a short timeout never becomes zero.
pub(super) fn timeout_ms(timeout: std::time::Duration) -> u64 {
    let ms = timeout.as_nanos().div_ceil(1_000_000);
    u64::try_from(ms).unwrap_or(u64::MAX)
}

/// The first 64 characters of a key, for error messages.
fn key_head(key: &str) -> String {
    key.chars().take(64).collect()
}

/// Refuses a key longer than [`MAX_KEY_BYTES`].
pub(super) fn check_key(op: &'static str, key: &str) -> Result<(), StoreError> {
    if key.len() > MAX_KEY_BYTES {
        return Err(StoreError::TooLarge {
            op,
            key: key_head(key),
            what: "key bytes",
            len: key.len(),
            max: MAX_KEY_BYTES,
        });
    }
    Ok(())
}

/// Refuses a value larger than [`MAX_VALUE_BYTES`].
pub(super) fn check_value(op: &'static str, key: &str, value: &[u8]) -> Result<(), StoreError> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(StoreError::TooLarge {
            op,
            key: key_head(key),
            what: "value bytes",
            len: value.len(),
            max: MAX_VALUE_BYTES,
        });
    }
    Ok(())
}

/// Refuses a `wait` on more than [`MAX_WAIT_KEYS`] keys or on any key that is too long.
pub(super) fn check_keys(op: &'static str, keys: &[&str]) -> Result<(), StoreError> {
    if keys.len() > MAX_WAIT_KEYS {
        return Err(StoreError::TooLarge {
            op,
            key: keys.first().map(|k| key_head(k)).unwrap_or_default(),
            what: "key count",
            len: keys.len(),
            max: MAX_WAIT_KEYS,
        });
    }
    keys.iter().try_for_each(|key| check_key(op, key))
}

/// `now + timeout`, capped a year out so an absurd timeout cannot overflow `Instant`.
pub(super) fn deadline_after(timeout: std::time::Duration) -> std::time::Instant {
    const YEAR: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);
    std::time::Instant::now() + timeout.min(YEAR)
}
