//! The store trait: bytes in, bytes out, every wait bounded.

use std::time::Duration;

/// Errors of a store operation. Each names the operation and the key.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `wait`/`get` ran out of time.
    #[error("store {op}: timed out after {timeout:?} waiting for key(s) {keys:?}")]
    Timeout {
        /// The operation.
        op: &'static str,
        /// The keys still missing.
        keys: Vec<String>,
        /// The deadline.
        timeout: Duration,
    },
    /// The store server cannot be reached or the connection broke.
    #[error("store {op} on {addr}: {source}")]
    Io {
        /// The operation.
        op: &'static str,
        /// The server address.
        addr: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The handshake failed (wrong secret or not a burnrun store).
    #[error("store at {addr}: {source}")]
    Auth {
        /// The server address.
        addr: String,
        /// The handshake error.
        source: crate::auth::AuthError,
    },
    /// A malformed or oversized frame.
    #[error("store {op}: protocol error from {peer}: {reason}")]
    Protocol {
        /// The operation.
        op: &'static str,
        /// Who sent it.
        peer: String,
        /// What was wrong.
        reason: String,
    },
    /// `add` on a key whose value is not a decimal integer.
    #[error("store add on key {key:?}: existing value is not an integer")]
    NotAnInteger {
        /// The key.
        key: String,
    },
    /// `add` would leave the range of `i64`.
    #[error("store add on key {key:?}: adding {delta} overflows i64")]
    AddOverflow {
        /// The key.
        key: String,
        /// The delta that overflowed.
        delta: i64,
    },
    /// A key, value or key list is larger than the store accepts.
    #[error("store {op} on key {key:?}: {what} of {len} exceeds the limit of {max}")]
    TooLarge {
        /// The operation.
        op: &'static str,
        /// The key (its first 64 characters).
        key: String,
        /// What was too large ("key bytes", "value bytes", "key count").
        what: &'static str,
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The store was shut down while the operation waited.
    #[error("store {op}: the store was shut down")]
    Closed {
        /// The operation.
        op: &'static str,
    },
}

/// A key-value store shared by all ranks of a job.
///
/// Keys are strings, values bytes. Every call that can wait takes a timeout.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Sets `key` to `value`, waking every waiter on it.
    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError>;
    /// Returns the value of `key`, waiting up to `timeout` for it to be set.
    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>, StoreError>;
    /// Returns the value of `key` now, or `None`.
    fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Waits until every key in `keys` is set.
    fn wait(&self, keys: &[&str], timeout: Duration) -> Result<(), StoreError>;
    /// Adds `delta` to the integer stored at `key` (0 if missing) and returns the new value.
    fn add(&self, key: &str, delta: i64) -> Result<i64, StoreError>;
    /// Sets `key` to `desired` if its current value is `expected` (`None`: the key is absent).
    /// Returns the value after the call (either `desired` or the current one).
    fn compare_set(&self, key: &str, expected: Option<&[u8]>, desired: &[u8]) -> Result<Vec<u8>, StoreError>;
    /// Deletes `key`; returns whether it existed.
    fn delete(&self, key: &str) -> Result<bool, StoreError>;
}
