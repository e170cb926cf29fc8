//! The in-process store: a map behind a mutex, and one condvar that wakes the waiters on every write.
//! The TCP server serves one of these.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::wire::{check_key, check_keys, check_value, deadline_after};
use super::{Store, StoreError};

/// A store inside one process, for thread-per-rank tests; also the state behind the TCP server.
#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<State>,
    /// Notified on every write and on close.
    changed: Condvar,
}

#[derive(Default)]
struct State {
    map: HashMap<String, Vec<u8>>,
    /// Set by the server's shutdown: every waiter returns `Closed`.
    closed: bool,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("MemoryStore")
            .field("keys", &state.map.len())
            .field("closed", &state.closed)
            .finish()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Wakes every waiter with `StoreError::Closed`, now and for every later wait.
    pub(super) fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while the lock was held cannot leave the map half-written (each write is one
        // insert or remove), so a poisoned lock is still safe to use.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self, key: &str, value: Vec<u8>) {
        self.lock().map.insert(key.to_owned(), value);
        self.changed.notify_all();
    }

    /// Re-checks `ready` after every write until it answers `Ok`, the deadline passes (the error
    /// lists what `ready` reported missing) or the store is closed.
    fn block_until<T>(
        &self,
        op: &'static str,
        timeout: Duration,
        mut ready: impl FnMut(&HashMap<String, Vec<u8>>) -> Result<T, Vec<String>>,
    ) -> Result<T, StoreError> {
        let deadline = deadline_after(timeout);
        let mut state = self.lock();
        loop {
            let missing = match ready(&state.map) {
                Ok(found) => return Ok(found),
                Err(missing) => missing,
            };
            if state.closed {
                return Err(StoreError::Closed { op });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(StoreError::Timeout {
                    op,
                    keys: missing,
                    timeout,
                });
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl Store for MemoryStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        check_key("set", key)?;
        check_value("set", key, value)?;
        self.write(key, value.to_vec());
        Ok(())
    }

    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>, StoreError> {
        check_key("get", key)?;
        self.block_until("get", timeout, |map| {
            map.get(key).cloned().ok_or_else(|| vec![key.to_owned()])
        })
    }

    fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        check_key("try_get", key)?;
        Ok(self.lock().map.get(key).cloned())
    }

    fn wait(&self, keys: &[&str], timeout: Duration) -> Result<(), StoreError> {
        check_keys("wait", keys)?;
        self.block_until("wait", timeout, |map| {
            let missing: Vec<String> = keys
                .iter()
                .filter(|key| !map.contains_key(**key))
                .map(|key| key.to_string())
                .collect();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(missing)
            }
        })
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64, StoreError> {
        check_key("add", key)?;
        let mut state = self.lock();
        let current = match state.map.get(key) {
            None => 0,
            Some(value) => std::str::from_utf8(value)
                .ok()
                .and_then(|text| text.parse::<i64>().ok())
                .ok_or_else(|| StoreError::NotAnInteger { key: key.to_owned() })?,
        };
        let sum = current.checked_add(delta).ok_or_else(|| StoreError::AddOverflow {
            key: key.to_owned(),
            delta,
        })?;
        state.map.insert(key.to_owned(), sum.to_string().into_bytes());
        drop(state);
        self.changed.notify_all();
        Ok(sum)
    }

    /// As the trait says; when the key is absent and stays absent, returns an empty value.
    fn compare_set(&self, key: &str, expected: Option<&[u8]>, desired: &[u8]) -> Result<Vec<u8>, StoreError> {
        check_key("compare_set", key)?;
        check_value("compare_set", key, desired)?;
        let mut state = self.lock();
        match (state.map.get(key), expected) {
            (None, None) => {}
            (Some(current), Some(expected)) if current.as_slice() == expected => {}
            (Some(current), _) => return Ok(current.clone()),
            (None, Some(_)) => return Ok(Vec::new()),
        }
        state.map.insert(key.to_owned(), desired.to_vec());
        drop(state);
        self.changed.notify_all();
        Ok(desired.to_vec())
    }

    fn delete(&self, key: &str) -> Result<bool, StoreError> {
        check_key("delete", key)?;
        Ok(self.lock().map.remove(key).is_some())
    }
}
