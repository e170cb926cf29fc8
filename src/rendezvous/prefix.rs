//! A view of a store with every key scoped under a prefix (a process group, a restart generation).

use std::sync::Arc;
use std::time::Duration;

use super::{Store, StoreError};

/// Scopes keys as `"<prefix>/<key>"` on an inner store. Errors name the full, scoped keys.
#[derive(Debug, Clone)]
pub struct PrefixStore {
    prefix: String,
    inner: Arc<dyn Store>,
}

impl PrefixStore {
    /// Scopes `inner` under `prefix`; prefixes nest (`PrefixStore::new("b", Arc::new(PrefixStore::new("a", s)))`
    /// writes `a/b/key`).
    pub fn new(prefix: impl Into<String>, inner: Arc<dyn Store>) -> Self {
        Self {
            prefix: prefix.into(),
            inner,
        }
    }

    fn scoped(&self, key: &str) -> String {
        format!("{}/{key}", self.prefix)
    }
}

impl Store for PrefixStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.inner.set(&self.scoped(key), value)
    }

    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>, StoreError> {
        self.inner.get(&self.scoped(key), timeout)
    }

    fn try_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.try_get(&self.scoped(key))
    }

    fn wait(&self, keys: &[&str], timeout: Duration) -> Result<(), StoreError> {
        let scoped: Vec<String> = keys.iter().map(|key| self.scoped(key)).collect();
        let scoped: Vec<&str> = scoped.iter().map(String::as_str).collect();
        self.inner.wait(&scoped, timeout)
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64, StoreError> {
        self.inner.add(&self.scoped(key), delta)
    }

    fn compare_set(&self, key: &str, expected: Option<&[u8]>, desired: &[u8]) -> Result<Vec<u8>, StoreError> {
        self.inner.compare_set(&self.scoped(key), expected, desired)
    }

    fn delete(&self, key: &str) -> Result<bool, StoreError> {
        self.inner.delete(&self.scoped(key))
    }
}
